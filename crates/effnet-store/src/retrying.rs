//! The retry layer every opened store sits behind ([`RetryingStore`]).
//!
//! object_store retries a remote request that fails before its answer arrives. What it cannot
//! retry is a body that breaks off half way: a multi-megabyte row group read over a connection
//! that drops at 60% fails the whole read. This layer resumes such a read from the byte it
//! reached (a range request pinned to the object's ETag, so a replaced object is never spliced
//! into the old one), retries reads and listings that fail transiently, checks that range reads
//! return the bytes asked for, and retries whole-object writes (an overwrite is idempotent).
//!
//! Not retried: conditional writes (a retry after a lost answer would find its own write and
//! fail), multipart parts (a part re-sent is a new part; the writer fails and its caller redoes
//! the whole object), renames, and errors that a retry cannot cure: missing objects, refused
//! credentials, and local disks that are full, read-only or deny permission.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetRange, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};

/// Attempts after the first; with [`FIRST_DELAY`] doubling to [`MAX_DELAY`] they span ~6 s.
pub const RETRIES: u32 = 6;
pub const FIRST_DELAY: Duration = Duration::from_millis(50);
pub const MAX_DELAY: Duration = Duration::from_secs(2);

/// Retries and resumes what the store below fails transiently; see the module docs.
#[derive(Debug)]
pub struct RetryingStore {
    inner: Arc<dyn ObjectStore>,
    retries: u32,
}

impl RetryingStore {
    /// With [`RETRIES`] retries.
    pub fn new(inner: Arc<dyn ObjectStore>) -> RetryingStore {
        RetryingStore::with_retries(inner, RETRIES)
    }

    /// With `retries` retries (0: none, as `EFFNET_STORE_MAX_RETRIES=0` asks of every layer).
    pub fn with_retries(inner: Arc<dyn ObjectStore>, retries: u32) -> RetryingStore {
        RetryingStore { inner, retries }
    }
}

/// The delay before retry number `attempt` (1-based).
fn delay(attempt: u32) -> Duration {
    FIRST_DELAY.saturating_mul(1 << attempt.saturating_sub(1).min(16)).min(MAX_DELAY)
}

/// A sleep that needs no particular async runtime (callers use tokio and `block_on` alike);
/// the fault injector's delays use it too.
pub(crate) async fn sleep(duration: Duration) {
    let (sender, receiver) = futures::channel::oneshot::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(duration);
        let _ = sender.send(());
    });
    let _ = receiver.await;
}

/// The kind of the first `std::io::Error` in an error's chain: how local disks say why.
pub fn io_kind(error: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cause = error.source();
    }
    None
}

/// True when a local disk refused for a reason no retry cures: full, read-only, denied.
pub fn is_refusal(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind;
    matches!(
        kind,
        ErrorKind::StorageFull
            | ErrorKind::PermissionDenied
            | ErrorKind::ReadOnlyFilesystem
            | ErrorKind::QuotaExceeded
            | ErrorKind::FileTooLarge
    )
}

/// True when trying again may succeed.
pub fn is_transient(error: &object_store::Error) -> bool {
    use std::io::ErrorKind;
    match error {
        object_store::Error::Generic { source, .. } => match io_kind(source.as_ref()) {
            Some(kind) => {
                !is_refusal(kind)
                    && !matches!(
                        kind,
                        ErrorKind::NotFound
                            | ErrorKind::IsADirectory
                            | ErrorKind::NotADirectory
                            | ErrorKind::InvalidInput
                    )
            }
            None => true,
        },
        object_store::Error::JoinError { .. } => true,
        _ => false,
    }
}

/// Run `attempt` until it succeeds, fails for good, or the `retries` are spent.
async fn retry<T, F, Fut>(retries: u32, what: &str, path: &Path, mut attempt: F) -> object_store::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = object_store::Result<T>>,
{
    let mut tries = 0;
    loop {
        match attempt().await {
            Err(error) if tries < retries && is_transient(&error) => {
                tries += 1;
                tracing_free_warn(what, path, tries, retries, &error);
                sleep(delay(tries)).await;
            }
            other => return other,
        }
    }
}

/// One line on stderr per retry: this crate has no logging dependency, and a retry is rare
/// enough in production that seeing it is worth a line.
fn tracing_free_warn(what: &str, path: &Path, tries: u32, retries: u32, error: &object_store::Error) {
    if std::env::var_os("EFFNET_STORE_QUIET_RETRIES").is_none() {
        let error = crate::redact::redact_text(&error.to_string()).replace('\n', " ");
        eprintln!("store: {what} {path} failed ({error}); retry {tries} of {retries}");
    }
}

impl fmt::Display for RetryingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The inner store's name: messages name the backend, not this layer.
        self.inner.fmt(f)
    }
}

/// A read's body, resumed from where it broke off.
struct Resumable {
    store: Arc<dyn ObjectStore>,
    location: Path,
    /// Absolute offset of the next byte wanted, and the end of the range.
    next: u64,
    end: u64,
    e_tag: Option<String>,
    version: Option<String>,
    body: BoxStream<'static, object_store::Result<Bytes>>,
    tries: u32,
    retries: u32,
}

impl Resumable {
    fn into_stream(self) -> BoxStream<'static, object_store::Result<Bytes>> {
        futures::stream::unfold(Some(self), |state| async move {
            let mut state = state?;
            loop {
                let failure = match state.body.next().await {
                    Some(Ok(bytes)) => {
                        state.next += bytes.len() as u64;
                        return Some((Ok(bytes), Some(state)));
                    }
                    None if state.next >= state.end => return None,
                    None => object_store::Error::Generic {
                        store: "retrying",
                        source: format!(
                            "the body of {} ended at byte {} of {}",
                            state.location, state.next, state.end
                        )
                        .into(),
                    },
                    Some(Err(error)) => error,
                };
                if state.tries >= state.retries || !is_transient(&failure) {
                    return Some((Err(failure), None));
                }
                state.tries += 1;
                tracing_free_warn("reading", &state.location, state.tries, state.retries, &failure);
                sleep(delay(state.tries)).await;
                let options = GetOptions {
                    range: Some(GetRange::Bounded(state.next..state.end)),
                    if_match: state.e_tag.clone(),
                    version: state.version.clone(),
                    ..GetOptions::default()
                };
                state.body = match state.store.get_opts(&state.location, options).await {
                    Ok(rest) => rest.into_stream(),
                    // Tried again (and counted) on the next turn of the loop.
                    Err(error) => futures::stream::iter([Err(error)]).boxed(),
                };
            }
        })
        // Readers may poll again after the end (object_store's own readers do).
        .fuse()
        .boxed()
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl ObjectStore for RetryingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if !matches!(opts.mode, PutMode::Overwrite) {
            return self.inner.put_opts(location, payload, opts).await;
        }
        retry(self.retries, "writing", location, || {
            self.inner.put_opts(location, payload.clone(), opts.clone())
        })
        .await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        retry(self.retries, "starting an upload of", location, || {
            self.inner.put_multipart_opts(location, opts.clone())
        })
        .await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        let head = options.head;
        let result =
            retry(self.retries, "reading", location, || self.inner.get_opts(location, options.clone()))
                .await?;
        if head || matches!(result.payload, GetResultPayload::File(..)) {
            return Ok(result);
        }
        let GetResult { payload, meta, range, attributes, extensions } = result;
        let GetResultPayload::Stream(body) = payload else { unreachable!("file payloads returned above") };
        let body = Resumable {
            store: self.inner.clone(),
            location: location.clone(),
            next: range.start,
            end: range.end,
            e_tag: meta.e_tag.clone(),
            version: meta.version.clone(),
            body,
            tries: 0,
            retries: self.retries,
        }
        .into_stream();
        Ok(GetResult { payload: GetResultPayload::Stream(body), meta, range, attributes, extensions })
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        retry(self.retries, "reading ranges of", location, || async {
            let parts = self.inner.get_ranges(location, ranges).await?;
            let short = ranges
                .iter()
                .zip(&parts)
                .find(|(range, bytes)| bytes.len() as u64 != range.end - range.start);
            match short {
                Some((range, bytes)) if parts.len() == ranges.len() => Err(object_store::Error::Generic {
                    store: "retrying",
                    source: format!("range {range:?} of {location} came back with {} bytes", bytes.len())
                        .into(),
                }),
                _ if parts.len() != ranges.len() => Err(object_store::Error::Generic {
                    store: "retrying",
                    source: format!("{} ranges of {location} asked, {} came back", ranges.len(), parts.len())
                        .into(),
                }),
                _ => Ok(parts),
            }
        })
        .await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        // A listing that fails half way is listed again whole: the objects are collected first.
        let (inner, retries) = (self.inner.clone(), self.retries);
        let prefix = prefix.cloned();
        futures::stream::once(async move {
            let path = prefix.clone().unwrap_or_default();
            retry(retries, "listing", &path, || inner.list(prefix.as_ref()).try_collect::<Vec<_>>()).await
        })
        .map_ok(|objects| futures::stream::iter(objects.into_iter().map(Ok)))
        .try_flatten()
        .boxed()
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let path = prefix.cloned().unwrap_or_default();
        retry(self.retries, "listing", &path, || self.inner.list_with_delimiter(prefix)).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> object_store::Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::{FaultPlan, FaultyStore};
    use object_store::ObjectStoreExt;

    fn faulty(plan: &str) -> (Arc<FaultyStore>, RetryingStore) {
        let faulty = Arc::new(FaultyStore::new(
            Arc::new(object_store::memory::InMemory::new()),
            FaultPlan::parse(plan).unwrap(),
        ));
        (faulty.clone(), RetryingStore::new(faulty))
    }

    /// Every read and write through a store that fails one request in three still returns the
    /// exact bytes, and the faults really happened.
    #[test]
    fn reads_and_writes_survive_errors_throttling_timeouts_and_truncated_bodies() {
        futures::executor::block_on(async {
            let (faults, store) = faulty(
                "seed=11,error=0.08,throttle=0.08,timeout=0.04,truncate=0.12,slow=0.04,timeout_ms=5,slow_ms=5,writes",
            );
            let mut expected = Vec::new();
            for object in 0..40u32 {
                let bytes: Vec<u8> = (0..5_000 + object * 97).map(|i| (i * 31 + object) as u8).collect();
                let path = Path::from(format!("data/{object:03}"));
                store.put(&path, PutPayload::from(bytes.clone())).await.unwrap();
                expected.push((path, bytes));
            }
            for (path, bytes) in &expected {
                assert_eq!(store.get(path).await.unwrap().bytes().await.unwrap(), &bytes[..]);
                assert_eq!(store.get_range(path, 100..1_100).await.unwrap(), &bytes[100..1_100]);
                let ranges = store.get_ranges(path, &[0..10, 2_000..4_000]).await.unwrap();
                assert_eq!((&ranges[0][..], &ranges[1][..]), (&bytes[0..10], &bytes[2_000..4_000]));
            }
            let listed: Vec<ObjectMeta> = store.list(Some(&Path::from("data"))).try_collect().await.unwrap();
            assert_eq!(listed.len(), 40);
            let counts = &faults.counts;
            let injected = counts.failures();
            assert!(injected > 30, "only {injected} faults were injected");
            assert!(counts.truncate.load(std::sync::atomic::Ordering::Relaxed) > 5);
        });
    }

    #[test]
    fn a_store_that_always_fails_gives_up_with_the_last_error() {
        futures::executor::block_on(async {
            let (faults, store) = faulty("seed=1,error=1,writes");
            let error = store.put(&Path::from("x"), PutPayload::from_static(b"x")).await.unwrap_err();
            assert!(error.to_string().contains("503 Service Unavailable"), "{error}");
            assert_eq!(
                faults.counts.requests.load(std::sync::atomic::Ordering::Relaxed),
                u64::from(RETRIES) + 1
            );
        });
    }

    #[test]
    fn a_full_or_denied_local_disk_is_not_retried() {
        let full = object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(std::io::Error::from(std::io::ErrorKind::StorageFull)),
        };
        assert!(!is_transient(&full));
        let reset = object_store::Error::Generic {
            store: "S3",
            source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        };
        assert!(is_transient(&reset));
        assert!(!is_transient(&object_store::Error::NotFound { path: "x".into(), source: "gone".into() }));
    }
}
