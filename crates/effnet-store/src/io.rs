//! Small async helpers over any `ObjectStore`, mapping object_store's errors to this crate's
//! (a missing object is always [`Error::NotFound`], whatever the backend says).

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

use crate::error::{Error, Result};
use crate::read_only::ReadOnlyRefusal;

/// The smallest part S3 accepts in a multipart upload (all parts but the last).
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;

/// Default part size of [`MultipartWriter`]: large enough that a 10,000-part S3 upload holds
/// 160 GiB, small enough that a few parts in flight fit comfortably in memory.
pub const DEFAULT_PART_SIZE: usize = 16 * 1024 * 1024;

/// Parts of one [`MultipartWriter`] uploading at the same time; writes wait beyond that, which
/// bounds memory to about `part_size × (MAX_PARTS_IN_FLIGHT + 1)`.
pub const MAX_PARTS_IN_FLIGHT: usize = 4;

/// The name of the commit marker written last into a checkpoint or dataset directory.
pub const COMMIT_MARKER: &str = "COMMIT";

/// Map an object_store error about `path` in `store` to this crate's error.
pub fn store_error(store: &dyn ObjectStore, path: &Path, error: object_store::Error) -> Error {
    match error {
        object_store::Error::NotFound { .. } => {
            Error::NotFound { path: path.to_string(), store: store.to_string() }
        }
        object_store::Error::NotSupported { source } if source.is::<ReadOnlyRefusal>() => {
            match source.downcast::<ReadOnlyRefusal>() {
                Ok(refusal) => Error::ReadOnly { url: refusal.url, path: refusal.path },
                Err(source) => Error::Store {
                    location: format!("{store}/{path}"),
                    source: object_store::Error::NotSupported { source },
                },
            }
        }
        source => Error::Store { location: format!("{store}/{path}"), source },
    }
}

/// Write `bytes` as the whole object at `path`, replacing any previous object (one request;
/// use [`MultipartWriter`] for objects larger than a few tens of MB).
pub async fn put_bytes(store: &dyn ObjectStore, path: &Path, bytes: impl Into<Bytes>) -> Result<()> {
    store
        .put(path, PutPayload::from_bytes(bytes.into()))
        .await
        .map(|_| ())
        .map_err(|e| store_error(store, path, e))
}

/// The whole object at `path`.
pub async fn get_bytes(store: &dyn ObjectStore, path: &Path) -> Result<Bytes> {
    let result = store.get(path).await.map_err(|e| store_error(store, path, e))?;
    result.bytes().await.map_err(|e| store_error(store, path, e))
}

/// Bytes `range` (end exclusive) of the object at `path`: one ranged GET, the way row groups
/// are read. A range past the end of the object is an error.
pub async fn get_range(store: &dyn ObjectStore, path: &Path, range: Range<u64>) -> Result<Bytes> {
    store.get_range(path, range).await.map_err(|e| store_error(store, path, e))
}

/// Size in bytes of the object at `path` (a HEAD request).
pub async fn size(store: &dyn ObjectStore, path: &Path) -> Result<u64> {
    head(store, path).await.map(|meta| meta.size)
}

/// Metadata of the object at `path` (a HEAD request).
pub async fn head(store: &dyn ObjectStore, path: &Path) -> Result<ObjectMeta> {
    store.head(path).await.map_err(|e| store_error(store, path, e))
}

/// Whether an object exists at `path` (a "directory" prefix does not count).
pub async fn exists(store: &dyn ObjectStore, path: &Path) -> Result<bool> {
    match head(store, path).await {
        Ok(_) => Ok(true),
        Err(Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Every object under `prefix` (recursively, whole path segments only: prefix `a` matches
/// `a/x` but not `ab`), sorted by path because stores list in no particular order.
pub async fn list_prefix(store: &dyn ObjectStore, prefix: &Path) -> Result<Vec<ObjectMeta>> {
    let mut objects: Vec<ObjectMeta> =
        store.list(Some(prefix)).try_collect().await.map_err(|e| store_error(store, prefix, e))?;
    objects.sort_by(|a, b| a.location.cmp(&b.location));
    Ok(objects)
}

/// Delete the object at `path`. Deleting a missing object succeeds, as on S3, so cleanup can
/// be retried; the local file store would otherwise report NotFound.
pub async fn delete(store: &dyn ObjectStore, path: &Path) -> Result<()> {
    match store.delete(path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(store_error(store, path, e)),
    }
}

/// Streaming upload of one large object in parts of a fixed size.
///
/// Bytes are buffered into parts of `part_size`; each full part is uploaded while writing goes
/// on, at most [`MAX_PARTS_IN_FLIGHT`] at a time. The object appears only when
/// [`finish`](Self::finish) succeeds; until then readers see the previous object or none.
/// Dropping the writer without `finish` or [`abort`](Self::abort) leaves the uploaded parts on
/// S3 as an incomplete upload (cleaned up by the bucket's lifecycle rule), so call `abort` on
/// error paths.
pub struct MultipartWriter {
    store: Arc<dyn ObjectStore>,
    path: Path,
    upload: WriteMultipart,
    written: u64,
}

impl MultipartWriter {
    /// Start a multipart upload to `path`. `part_size` must be at least [`MIN_PART_SIZE`].
    ///
    /// The writer owns a handle to the store, so it can move into a spawned task (checkpoints
    /// are written in the background while training goes on).
    pub async fn create(store: Arc<dyn ObjectStore>, path: &Path, part_size: usize) -> Result<Self> {
        if part_size < MIN_PART_SIZE {
            return Err(Error::PartTooSmall { part_size, minimum: MIN_PART_SIZE });
        }
        let upload = store.put_multipart(path).await.map_err(|e| store_error(store.as_ref(), path, e))?;
        Ok(MultipartWriter {
            store,
            path: path.clone(),
            upload: WriteMultipart::new_with_chunk_size(upload, part_size),
            written: 0,
        })
    }

    /// Append `data`; waits while too many parts are uploading.
    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        self.upload
            .wait_for_capacity(MAX_PARTS_IN_FLIGHT)
            .await
            .map_err(|e| store_error(self.store.as_ref(), &self.path, e))?;
        self.upload.write(data);
        self.written += data.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Upload the last part and complete the upload; returns the object's size.
    pub async fn finish(self) -> Result<u64> {
        let MultipartWriter { store, path, upload, written } = self;
        upload.finish().await.map_err(|e| store_error(store.as_ref(), &path, e))?;
        Ok(written)
    }

    /// Cancel the upload and discard the parts uploaded so far.
    pub async fn abort(self) -> Result<()> {
        let MultipartWriter { store, path, upload, .. } = self;
        upload.abort().await.map_err(|e| store_error(store.as_ref(), &path, e))
    }
}

/// An `AsyncWrite` for one object that switches to a multipart upload once `DEFAULT_PART_SIZE`
/// bytes are buffered (a single PUT for smaller objects).
///
/// This is what parquet 60 wants for writing to a store: pass it to `AsyncArrowWriter::try_new`
/// (parquet's own `ParquetObjectWriter` is deprecated in favour of it). The object appears when
/// the writer is shut down (`AsyncWriteExt::shutdown`, or `AsyncArrowWriter::close`).
pub fn buffered_writer(store: Arc<dyn ObjectStore>, path: &Path) -> BufWriter {
    BufWriter::with_capacity(store, path.clone(), DEFAULT_PART_SIZE).with_max_concurrency(MAX_PARTS_IN_FLIGHT)
}

/// Write the commit marker `path` (typically `<dir>/COMMIT`) with `bytes` (e.g. checksums of
/// the directory's files).
///
/// Object stores have no rename, so a directory of objects cannot appear atomically. Instead
/// the writer puts every content object first and, only after all of them succeeded, this small
/// marker; readers treat a directory without a valid marker as absent ([`read_marker`]). A single
/// PUT is atomic on every backend here, so a reader sees either no marker or the whole one.
pub async fn write_marker(store: &dyn ObjectStore, path: &Path, bytes: impl Into<Bytes>) -> Result<()> {
    put_bytes(store, path, bytes).await
}

/// The commit marker at `path`, or `None` when the directory was never committed.
pub async fn read_marker(store: &dyn ObjectStore, path: &Path) -> Result<Option<Bytes>> {
    match get_bytes(store, path).await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;

    use super::*;
    use crate::read_only::ReadOnlyStore;

    #[tokio::test]
    async fn missing_object_is_not_found_naming_path_and_store() {
        let store = InMemory::new();
        let path = Path::from("a/missing.bin");
        let err = get_bytes(&store, &path).await.unwrap_err();
        assert_eq!(err.to_string(), "object a/missing.bin not found in InMemory");
        assert!(matches!(size(&store, &path).await, Err(Error::NotFound { .. })));
        assert!(!exists(&store, &path).await.unwrap());
        assert_eq!(read_marker(&store, &path).await.unwrap(), None);
    }

    #[tokio::test]
    async fn writes_to_a_read_only_store_are_refused() {
        let store = ReadOnlyStore::new(InMemory::new(), "https://example.com/data");
        let path = Path::from("x/y");
        let err = put_bytes(&store, &path, Bytes::from_static(b"1")).await.unwrap_err();
        assert!(
            matches!(&err, Error::ReadOnly { url, path } if url == "https://example.com/data" && path == "x/y")
        );
        assert_eq!(err.to_string(), "'https://example.com/data' is read-only, refusing to write x/y");
        assert!(matches!(delete(&store, &path).await, Err(Error::ReadOnly { .. })));
        assert!(matches!(
            MultipartWriter::create(Arc::new(store), &path, MIN_PART_SIZE).await,
            Err(Error::ReadOnly { .. })
        ));
    }

    #[tokio::test]
    async fn part_size_below_the_s3_minimum_is_rejected() {
        let store = InMemory::new();
        let err = MultipartWriter::create(Arc::new(store), &Path::from("big"), 1024).await.err().unwrap();
        assert_eq!(err.to_string(), "multipart part size 1024 bytes is below the 5242880 bytes S3 requires");
    }

    #[test]
    fn multipart_writer_can_move_into_a_spawned_task() {
        fn assert_send_static<T: Send + 'static>() {}
        assert_send_static::<MultipartWriter>();
    }

    #[tokio::test]
    async fn delete_of_a_missing_object_succeeds() {
        let store = InMemory::new();
        delete(&store, &Path::from("nothing/here")).await.unwrap();
    }
}
