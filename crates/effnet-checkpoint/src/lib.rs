//! Checkpoints in any store: `step-NNNNNNNN/` directories committed by a `COMMIT` marker.
//!
//! A checkpoint directory holds `model.safetensors`, `optimizer.safetensors`, `ema.safetensors`
//! (when EMA is on) and `state.json`, and **last** `COMMIT`: JSON with the step, the validation
//! metric and the size and BLAKE3 (format 2; SHA-256 in format 1) of every other file. Object
//! stores have no rename, so the marker is the atomicity point: a directory without a parseable
//! `COMMIT` does not exist, and a committed one whose files do not match their checksums is
//! skipped (with a warning) in favour of the previous one. Purging deletes `COMMIT` first, so a
//! half-deleted checkpoint is never mistaken for a whole one.
//!
//! On a local disk the files are written around the page cache, checksummed on the way, and
//! flushed before the marker ([`local`]); elsewhere they go through the object store, each hashed
//! on its own thread meanwhile.
//!
//! No libtorch here: the trainer saves and loads through this crate, and the coordinator reads a
//! checkpoint's `state.json` ([`CheckpointStore::newest_state`]) to deal the rest of an epoch
//! without downloading the weights.

mod error;
pub mod local;

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use bytes::Bytes;
use effnet_store::{COMMIT_MARKER, Redacted, StoreLocation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The object [`CheckpointStore::check_writable`] writes and deletes at the start of a run.
pub const WRITE_PROBE: &str = ".effnet-write-check";

pub use crate::error::{Error, Result};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const EMA_FILE: &str = "ema.safetensors";
/// The JSON object of the components' state (step, data cursor, ...), one key per component.
pub const STATE_FILE: &str = "state.json";
/// The format this version writes. Format 2 checksums files with BLAKE3 (3× SHA-256's speed on
/// one core here, with SHA extensions); format 1 (SHA-256) is still read, so checkpoints taken by
/// earlier versions resume.
pub const COMMIT_FORMAT: u32 = 2;
/// Every format this version reads.
pub const COMMIT_FORMATS_READ: [u32; 2] = [1, 2];

/// The directory name of the checkpoint taken after `step` optimiser steps.
pub fn directory_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The URL of the checkpoint of `step` in the store at `base`: the step's directory appended to
/// the path, before any query string or fragment of a URL (`s3://b/run?x=1` gives
/// `s3://b/run/step-00000012?x=1`). A bare local path is a path, `?` and `#` included.
pub fn step_url(base: &str, step: u64) -> String {
    let split = if base.contains("://") { base.find(['?', '#']).unwrap_or(base.len()) } else { base.len() };
    let (path, suffix) = base.split_at(split);
    format!("{}/{}{suffix}", path.trim_end_matches('/'), directory_name(step))
}

fn parse_directory_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    (digits.len() >= 8 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok())?
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileDigest {
    pub bytes: u64,
    /// Format 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    /// Format 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl FileDigest {
    /// The digest this version writes.
    pub fn of(content: &[u8]) -> FileDigest {
        FileDigest::from_blake3(content.len() as u64, blake3::hash(content))
    }

    /// The digest this version writes, of `bytes` bytes whose BLAKE3 is `hash` (hashed piece by
    /// piece as they were written).
    pub fn from_blake3(bytes: u64, hash: blake3::Hash) -> FileDigest {
        FileDigest { bytes, blake3: Some(hash.to_hex().to_string()), sha256: None }
    }

    /// Whether `content` is the file this digest names: its size and every checksum it lists
    /// (at least one).
    pub fn matches(&self, content: &[u8]) -> bool {
        content.len() as u64 == self.bytes
            && (self.blake3.is_some() || self.sha256.is_some())
            && self.blake3.as_ref().is_none_or(|hex| *hex == blake3_hex(content))
            && self.sha256.as_ref().is_none_or(|hex| *hex == sha256_hex(content))
    }
}

/// The content of `COMMIT`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Commit {
    pub format: u32,
    pub step: u64,
    /// Validation top-1 of the raw weights at this step, when evaluated (ranks "best k").
    pub metric: Option<f64>,
    pub files: BTreeMap<String, FileDigest>,
}

/// A committed checkpoint found in the store.
#[derive(Clone, Debug, PartialEq)]
pub struct Committed {
    pub step: u64,
    pub url: String,
    pub commit: Commit,
}

/// Timing and size of one save, for the metrics log.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct SaveStats {
    pub step: u64,
    pub bytes: u64,
    pub seconds: f64,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

pub fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Checkpoints under one URL.
#[derive(Clone, Debug)]
pub struct CheckpointStore {
    pub location: StoreLocation,
}

impl CheckpointStore {
    pub fn new(location: StoreLocation) -> CheckpointStore {
        CheckpointStore { location }
    }

    pub fn url_of(&self, step: u64) -> String {
        step_url(&self.location.url, step)
    }

    /// Write every file, then the marker. `files` must not contain `COMMIT`.
    pub async fn save(
        &self,
        step: u64,
        metric: Option<f64>,
        files: Vec<(String, Bytes)>,
    ) -> Result<SaveStats> {
        let started = Instant::now();
        let directory = directory_name(step);
        let total = files.iter().map(|(_, content)| content.len() as u64).sum();
        let local = self.local_root().map(|root| root.join(&directory));
        let digests = match &local {
            // Injected write faults (the reliability tests, the soak) act on the object store's
            // writes: with them, local files go through it too.
            Some(local)
                if effnet_store::faults::FaultPlan::from_env()
                    .is_ok_and(|plan| plan.is_none_or(|plan| !plan.writes)) =>
            {
                let local = local.clone();
                tokio::task::spawn_blocking(move || write_local(&local, step, &files))
                    .await
                    .map_err(|e| Error::Internal(format!("the checkpoint writer failed: {e}")))??
            }
            _ => self.write_objects(&directory, step, local.as_deref(), files).await?,
        };
        let commit = Commit { format: COMMIT_FORMAT, step, metric, files: digests };
        let store = self.location.store.as_ref();
        let marker = serde_json::to_vec_pretty(&commit).map_err(|e| Error::Internal(e.to_string()))?;
        effnet_store::write_marker(
            store,
            &self.location.path(&format!("{directory}/{COMMIT_MARKER}"))?,
            marker,
        )
        .await?;
        if let Some(local) = &local {
            // The marker's data, then the directory entries that name the files and the marker,
            // then the step directory's own entry in the root.
            sync_to_disk(&local.join(COMMIT_MARKER))?;
            sync_to_disk(local)?;
            if let Some(root) = local.parent() {
                sync_to_disk(root)?;
            }
        }
        Ok(SaveStats { step, bytes: total, seconds: started.elapsed().as_secs_f64() })
    }

    /// Every file through the object store, each hashed on its own thread meanwhile (one hashing
    /// thread would hold up the sends on a fast store); on a local disk (only with injected write
    /// faults) each file is flushed on its own thread as soon as it is written.
    async fn write_objects(
        &self,
        directory: &str,
        step: u64,
        local: Option<&std::path::Path>,
        files: Vec<(String, Bytes)>,
    ) -> Result<BTreeMap<String, FileDigest>> {
        let store = self.location.store.as_ref();
        let hashing: Vec<(String, std::thread::JoinHandle<FileDigest>)> = files
            .iter()
            .map(|(name, content)| {
                let content = content.clone();
                (name.clone(), std::thread::spawn(move || FileDigest::of(&content)))
            })
            .collect();
        let mut syncing = Vec::new();
        for (written, (name, content)) in files.into_iter().enumerate() {
            effnet_store::put_bytes(store, &self.location.path(&format!("{directory}/{name}"))?, content)
                .await?;
            if let Some(local) = local {
                let path = local.join(&name);
                syncing.push(std::thread::spawn(move || sync_to_disk(&path)));
            }
            if written == 0 {
                effnet_store::faults::point(effnet_store::faults::Phase::CheckpointUpload, step, None);
            }
        }
        let mut digests = BTreeMap::new();
        for (name, hashing) in hashing {
            let digest = hashing.join().map_err(|_| Error::Internal(format!("hashing {name} failed")))?;
            digests.insert(name, digest);
        }
        for synced in syncing {
            synced.join().map_err(|_| Error::Internal("flushing a checkpoint file failed".into()))??;
        }
        Ok(digests)
    }

    /// The local directory of a `file://` or path location: there a committed checkpoint must
    /// also survive a crash of the machine, which needs explicit flushes (an object store is
    /// durable once a PUT returns).
    fn local_root(&self) -> Option<std::path::PathBuf> {
        if self.location.scheme != effnet_store::Scheme::File {
            return None;
        }
        let current = std::env::current_dir().ok()?;
        effnet_store::location::local_directory(&self.location.url, &current).ok()
    }

    /// Write and delete a small probe object, so that a location the run cannot write fails
    /// before training rather than at its first checkpoint.
    pub async fn check_writable(&self) -> Result<()> {
        let probe = self.location.path(WRITE_PROBE)?;
        let store = self.location.store.as_ref();
        effnet_store::put_bytes(store, &probe, &b"effnet write check"[..]).await?;
        effnet_store::delete(store, &probe).await?;
        Ok(())
    }

    /// Object stores have no directories, but a local one keeps each purged checkpoint's empty
    /// directory: a long run would leave thousands. Best effort: a directory that is not empty
    /// (or not there) stays as it is.
    fn remove_local_directory(&self, step: u64) {
        if let Some(root) = self.local_root() {
            let _ = std::fs::remove_dir(root.join(directory_name(step)));
        }
    }

    /// Step directories present (committed or not), ascending, with their objects.
    async fn directories(&self) -> Result<BTreeMap<u64, Vec<object_store::ObjectMeta>>> {
        let root = self.location.path("")?;
        let mut found: BTreeMap<u64, Vec<object_store::ObjectMeta>> = BTreeMap::new();
        for object in effnet_store::list_prefix(self.location.store.as_ref(), &root).await? {
            let relative: Vec<_> =
                object.location.prefix_match(&root).map(|parts| parts.collect()).unwrap_or_default();
            if relative.len() != 2 {
                continue;
            }
            if let Some(step) = parse_directory_name(relative[0].as_ref()) {
                found.entry(step).or_default().push(object.clone());
            }
        }
        Ok(found)
    }

    /// Committed checkpoints (a parseable `COMMIT` for the directory's own step), ascending.
    pub async fn committed(&self) -> Result<Vec<Committed>> {
        let mut out = Vec::new();
        for (step, objects) in self.directories().await? {
            if !objects.iter().any(|o| o.location.filename() == Some(COMMIT_MARKER)) {
                continue;
            }
            let marker_path = self.location.path(&format!("{}/{COMMIT_MARKER}", directory_name(step)))?;
            let Some(bytes) = effnet_store::read_marker(self.location.store.as_ref(), &marker_path).await?
            else {
                continue;
            };
            let url = self.url_of(step);
            match parse_commit(&bytes, &url) {
                Ok(commit) if commit.step == step => out.push(Committed { step, url, commit }),
                Ok(commit) => tracing::warn!(
                    url = %Redacted(&url),
                    "ignoring a checkpoint whose {COMMIT_MARKER} names step {}", commit.step
                ),
                Err(error) => tracing::warn!(url = %Redacted(&url), %error, "ignoring a checkpoint"),
            }
        }
        Ok(out)
    }

    /// Read and verify one committed checkpoint's files.
    pub async fn load(&self, checkpoint: &Committed) -> Result<HashMap<String, Bytes>> {
        Ok(load_directory(&self.location, &directory_name(checkpoint.step), &checkpoint.url).await?.1)
    }

    /// The newest committed checkpoint whose files match their checksums; newer ones that do not
    /// are reported and skipped.
    pub async fn latest(&self) -> Result<Option<(Committed, HashMap<String, Bytes>)>> {
        for checkpoint in self.committed().await?.into_iter().rev() {
            match self.load(&checkpoint).await {
                Ok(files) => return Ok(Some((checkpoint, files))),
                Err(Error::BadCheckpoint { url, reason }) => {
                    tracing::warn!(url = %Redacted(&url), %reason, "skipping a damaged checkpoint; trying the previous one")
                }
                Err(other) => return Err(other),
            }
        }
        Ok(None)
    }

    /// The newest committed checkpoint whose files are all present at their committed sizes, with
    /// its `state.json` verified against its checksum, without reading the other files (the
    /// weights of a large model are gigabytes). Newer ones that fail these checks are reported
    /// and skipped, as [`CheckpointStore::latest`] does; a file damaged at its committed size is
    /// only found when it is loaded.
    pub async fn newest_state(&self) -> Result<Option<(Committed, Bytes)>> {
        let directories = self.directories().await?;
        for checkpoint in self.committed().await?.into_iter().rev() {
            let objects = directories.get(&checkpoint.step).map(Vec::as_slice).unwrap_or_default();
            let size_of =
                |name: &str| objects.iter().find(|o| o.location.filename() == Some(name)).map(|o| o.size);
            let mismatch = checkpoint.commit.files.iter().find_map(|(name, digest)| match size_of(name) {
                None => Some(format!("{name} is missing")),
                Some(size) if size != digest.bytes => {
                    Some(format!("{name} is {size} bytes, {} in {COMMIT_MARKER}", digest.bytes))
                }
                Some(_) => None,
            });
            let state = match mismatch {
                Some(reason) => Err(Error::BadCheckpoint { url: checkpoint.url.clone(), reason }),
                None => {
                    let path = format!("{}/{STATE_FILE}", directory_name(checkpoint.step));
                    read_verified(&self.location, &path, STATE_FILE, &checkpoint.commit, &checkpoint.url)
                        .await
                }
            };
            match state {
                Ok(state) => return Ok(Some((checkpoint, state))),
                Err(Error::BadCheckpoint { url, reason }) => {
                    tracing::warn!(url = %Redacted(&url), %reason, "skipping a damaged checkpoint; trying the previous one")
                }
                Err(other) => return Err(other),
            }
        }
        Ok(None)
    }

    /// Keep the newest `keep_last` and the `keep_best` with the highest metric; delete the other
    /// committed checkpoints and uncommitted directories older than the newest commit (leftovers
    /// of interrupted saves). Returns the steps deleted.
    pub async fn purge(&self, keep_last: usize, keep_best: usize) -> Result<Vec<u64>> {
        let committed = self.committed().await?;
        let mut keep: Vec<u64> = committed.iter().rev().take(keep_last).map(|c| c.step).collect();
        let mut ranked: Vec<&Committed> = committed.iter().filter(|c| c.commit.metric.is_some()).collect();
        ranked.sort_by(|a, b| {
            b.commit
                .metric
                .partial_cmp(&a.commit.metric)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(b.step.cmp(&a.step))
        });
        keep.extend(ranked.iter().take(keep_best).map(|c| c.step));
        let newest = committed.last().map(|c| c.step);
        let mut deleted = Vec::new();
        let store = self.location.store.as_ref();
        for (step, mut objects) in self.directories().await? {
            let is_committed = committed.iter().any(|c| c.step == step);
            let stale = if is_committed { !keep.contains(&step) } else { newest.is_some_and(|n| step < n) };
            if !stale {
                continue;
            }
            // COMMIT first: from that moment the directory no longer counts as a checkpoint.
            objects.sort_by_key(|o| o.location.filename() != Some(COMMIT_MARKER));
            for object in objects {
                effnet_store::delete(store, &object.location).await?;
            }
            self.remove_local_directory(step);
            deleted.push(step);
        }
        Ok(deleted)
    }
}

/// A `COMMIT` marker of a format this version reads.
fn parse_commit(marker: &[u8], url: &str) -> Result<Commit> {
    let bad = |reason: String| Error::BadCheckpoint { url: url.to_string(), reason };
    let commit: Commit =
        serde_json::from_slice(marker).map_err(|e| bad(format!("unreadable {COMMIT_MARKER}: {e}")))?;
    if !COMMIT_FORMATS_READ.contains(&commit.format) {
        return Err(bad(format!(
            "{COMMIT_MARKER} has format {}, this version of effnet reads formats {COMMIT_FORMATS_READ:?} \
             (written by a newer version?)",
            commit.format
        )));
    }
    Ok(commit)
}

/// The file `name` of a committed checkpoint (at `path` under `location`), verified against its
/// `COMMIT`.
async fn read_verified(
    location: &StoreLocation,
    path: &str,
    name: &str,
    commit: &Commit,
    url: &str,
) -> Result<Bytes> {
    let bad = |reason: String| Error::BadCheckpoint { url: url.to_string(), reason };
    let digest = commit.files.get(name).ok_or_else(|| bad(format!("{COMMIT_MARKER} lists no {name}")))?;
    let content = match effnet_store::get_bytes(location.store.as_ref(), &location.path(path)?).await {
        Ok(content) => content,
        Err(effnet_store::Error::NotFound { .. }) => return Err(bad(format!("{name} is missing"))),
        Err(other) => return Err(other.into()),
    };
    if !digest.matches(&content) {
        return Err(bad(format!("{name} does not match the checksum in {COMMIT_MARKER}")));
    }
    Ok(content)
}

/// Load the files of the checkpoint directory `directory` (relative to `location`; empty when
/// the location is the directory itself) and verify them against its `COMMIT`.
pub async fn load_directory(
    location: &StoreLocation,
    directory: &str,
    url: &str,
) -> Result<(Commit, HashMap<String, Bytes>)> {
    let bad = |reason: String| Error::BadCheckpoint { url: url.to_string(), reason };
    let join =
        |name: &str| if directory.is_empty() { name.to_string() } else { format!("{directory}/{name}") };
    let store = location.store.as_ref();
    let marker =
        effnet_store::read_marker(store, &location.path(&join(COMMIT_MARKER))?).await?.ok_or_else(|| {
            bad(format!("no {COMMIT_MARKER} marker (never committed, or interrupted while saving)"))
        })?;
    let commit = parse_commit(&marker, url)?;
    let mut files = HashMap::new();
    for name in commit.files.keys() {
        let content = read_verified(location, &join(name), name, &commit, url).await?;
        files.insert(name.clone(), content);
    }
    Ok((commit, files))
}

/// The checkpoints under `url`, or `None` for a local directory that does not exist yet (opening
/// it would create it).
pub fn existing(url: &str) -> Result<Option<CheckpointStore>> {
    if !local_directory_exists(url)? {
        return Ok(None);
    }
    Ok(Some(CheckpointStore::new(effnet_store::open(url)?)))
}

fn local_directory_exists(url: &str) -> Result<bool> {
    use effnet_store::location::{Scheme, local_directory};
    if Scheme::of(url)? != Scheme::File {
        return Ok(true);
    }
    let here = std::env::current_dir().map_err(|source| Error::Io { path: ".".into(), source })?;
    Ok(local_directory(url, &here)?.is_dir())
}

/// The `COMMIT` and verified `state.json` of a single checkpoint directory by URL, without
/// reading its other files.
pub async fn state_at_url(url: &str) -> Result<(Commit, Bytes)> {
    if !local_directory_exists(url)? {
        return Err(Error::BadCheckpoint { url: url.to_string(), reason: "no such directory".into() });
    }
    let location = effnet_store::open(url)?;
    let marker = effnet_store::read_marker(location.store.as_ref(), &location.path(COMMIT_MARKER)?)
        .await?
        .ok_or_else(|| Error::BadCheckpoint {
            url: url.to_string(),
            reason: format!("no {COMMIT_MARKER} marker (never committed, or interrupted while saving)"),
        })?;
    let commit = parse_commit(&marker, url)?;
    let state = read_verified(&location, STATE_FILE, STATE_FILE, &commit, url).await?;
    Ok((commit, state))
}

/// Open a single checkpoint directory by URL (`--resume URL`) and load it.
pub async fn load_url(url: &str) -> Result<(Commit, HashMap<String, Bytes>)> {
    if !local_directory_exists(url)? {
        return Err(Error::BadCheckpoint { url: url.to_string(), reason: "no such directory".into() });
    }
    let location = effnet_store::open(url)?;
    load_directory(&location, "", url).await
}

/// Every file into the local step directory `directory`, one after another, each written around
/// the page cache and checksummed on the way ([`local`]). A `COMMIT` left there by an earlier
/// save of the same step goes first: the directory is not a checkpoint while its files change.
fn write_local(
    directory: &std::path::Path,
    step: u64,
    files: &[(String, Bytes)],
) -> Result<BTreeMap<String, FileDigest>> {
    let io_error = |path: &std::path::Path, source| Error::Io { path: path.display().to_string(), source };
    std::fs::create_dir_all(directory).map_err(|source| io_error(directory, source))?;
    let marker = directory.join(COMMIT_MARKER);
    match std::fs::remove_file(&marker) {
        Ok(()) => sync_to_disk(directory)?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(io_error(&marker, source)),
    }
    let mut digests = BTreeMap::new();
    for (index, (name, content)) in files.iter().enumerate() {
        let path = directory.join(name);
        let (digest, written) =
            local::write_file(&path, content).map_err(|source| io_error(&path, source))?;
        if written == local::Written::Buffered {
            tracing::debug!(path = %path.display(), "the filesystem refuses O_DIRECT: written through the page cache");
        }
        digests.insert(name.clone(), digest);
        if index == 0 {
            effnet_store::faults::point(effnet_store::faults::Phase::CheckpointUpload, step, None);
        }
    }
    Ok(digests)
}

/// fsync a file or directory (a directory: its entries).
fn sync_to_disk(path: &std::path::Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|file| file.sync_all())
        .map_err(|source| Error::Io { path: path.display().to_string(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_names() {
        assert_eq!(directory_name(1234), "step-00001234");
        assert_eq!(parse_directory_name("step-00001234"), Some(1234));
        assert_eq!(parse_directory_name("step-123456789"), Some(123_456_789));
        assert_eq!(parse_directory_name("step-12"), None);
        assert_eq!(parse_directory_name("step-0000001x"), None);
        assert_eq!(parse_directory_name("other"), None);
    }

    #[test]
    fn step_urls_keep_a_query_string_after_the_path() {
        assert_eq!(step_url("s3://b/run", 12), "s3://b/run/step-00000012");
        assert_eq!(step_url("s3://b/run/", 12), "s3://b/run/step-00000012");
        assert_eq!(step_url("s3://b/run/?x=1&y=2", 12), "s3://b/run/step-00000012?x=1&y=2");
        assert_eq!(step_url("gs://b/run#f", 3), "gs://b/run/step-00000003#f");
        assert_eq!(step_url("runs/a?b#c", 3), "runs/a?b#c/step-00000003");
    }

    /// The step URL a save reports is the one a resume loads, a query string or not.
    #[tokio::test]
    async fn a_checkpoint_saved_under_a_url_with_a_query_loads_from_its_step_url() {
        for base in ["memory://step-url/run", "memory://step-url/query?x=1"] {
            let store = CheckpointStore::new(effnet_store::open(base).unwrap());
            store.save(7, None, vec![("a".into(), Bytes::from_static(b"abc"))]).await.unwrap();
            let (commit, files) = load_url(&store.url_of(7)).await.unwrap();
            assert_eq!(commit.step, 7, "{base}");
            assert_eq!(files["a"], Bytes::from_static(b"abc"), "{base}");
        }
    }
}
