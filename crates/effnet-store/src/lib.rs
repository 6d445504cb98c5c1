//! Object storage for effnet: one function from a URL to an [`object_store::ObjectStore`] and
//! the prefix inside it, plus the few helpers the data, checkpoint and coordinator crates need.
//!
//! Datasets, checkpoints and logs are all named by URL in job files. [`open`] turns the URL
//! into a [`StoreLocation`] (store + prefix + scheme); readers and writers then use
//! [`StoreLocation::path`] and the helpers in [`io`] (or the store directly, e.g. behind parquet's
//! `AsyncFileReader` as effnet-data does), so the same code runs on a laptop directory and on a bucket.
//!
//! # URL forms
//!
//! | URL | Store | Prefix |
//! |-----|-------|--------|
//! | `file:///abs/dir`, `/abs/dir`, `rel/dir` | `LocalFileSystem` rooted at the directory (created if missing) | empty |
//! | `memory://NAME/prefix` | `InMemory`, one per NAME for the whole process | `prefix` |
//! | `s3://bucket/prefix` (`s3a://`) | `AmazonS3` | `prefix` |
//! | `gs://bucket/prefix` | `GoogleCloudStorage` | `prefix` |
//! | `az://container/prefix`, `abfss://container@account.dfs.core.windows.net/prefix` | `MicrosoftAzure` | `prefix` |
//! | `http(s)://host/path` | `HttpStore` rooted at the URL, read-only | empty |
//!
//! ```
//! # fn main() -> effnet_store::Result<()> {
//! # futures::executor::block_on(async {
//! use effnet_store::{get_bytes, open, put_bytes};
//!
//! let location = open("memory://docs/datasets/fmnist")?;
//! let manifest = location.path("_manifest.json")?;
//! assert_eq!(manifest.as_ref(), "datasets/fmnist/_manifest.json");
//! put_bytes(location.store.as_ref(), &manifest, &b"{}"[..]).await?;
//! assert_eq!(get_bytes(location.store.as_ref(), &manifest).await?, &b"{}"[..]);
//! # Ok(())
//! # })
//! # }
//! ```
//!
//! Credentials come from the usual environment variables (object_store's `from_env`):
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` /
//! `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`), `AWS_ALLOW_HTTP`;
//! `GOOGLE_APPLICATION_CREDENTIALS`, `GOOGLE_SERVICE_ACCOUNT(_KEY)`; `AZURE_STORAGE_ACCOUNT_NAME`,
//! `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_SAS_TOKEN`, `AZURE_CLIENT_ID`/`_SECRET`/`AZURE_TENANT_ID`.
//! [`StoreOptions`] overrides endpoint, region and `allow_http` (for local S3 servers) and takes raw
//! object_store keys. When no credential source is configured, [`open`] fails at once with
//! [`Error::MissingCredentials`] naming the variables to set, instead of probing a cloud metadata
//! endpoint for minutes; machines with instance credentials set
//! [`StoreOptions::ambient_credentials`].
//!
//! # Retries
//!
//! Every remote request is retried by object_store with exponential backoff and jitter: up to
//! **10 retries**, delays from **100 ms** doubling to at most **15 s**, and no retry later than
//! **3 minutes** after the first attempt. Retried are 5xx and 429 responses, connection errors
//! and timeouts of read-only requests. Tune with [`RetrySettings`] in [`StoreOptions::retry`];
//! `EFFNET_STORE_MAX_RETRIES` overrides the number of retries (0 fails at the first error).
//!
//! Above that, every store [`open`] returns sits behind [`retrying::RetryingStore`]: a read whose
//! body breaks off half way is resumed from the byte it reached (pinned to the object's ETag),
//! range reads are checked for length, and what still fails transiently is tried again up to
//! [`retrying::RETRIES`] times (50 ms doubling to 2 s), with one `store: ... retry N of 6` line on
//! stderr each (`EFFNET_STORE_QUIET_RETRIES=1` silences them). Full, read-only or denied local
//! disks are not retried.
//!
//! # Atomic directories
//!
//! Object stores have no rename. A directory of objects (a checkpoint, a prepared dataset) is
//! committed by writing all content first and a small marker object ([`COMMIT_MARKER`]) last
//! with [`write_marker`]; readers treat a directory without a marker ([`read_marker`] returns
//! `None`) as absent.
//!
//! # Layout
//!
//! - [`location`]: URL parsing, [`open`] / [`open_with`], the in-memory registry.
//! - [`options`]: [`StoreOptions`], [`RetrySettings`], [`Environment`].
//! - [`io`]: get/put/range/list/delete helpers, [`MultipartWriter`], [`buffered_writer`] (for
//!   parquet's `AsyncArrowWriter`), commit markers.
//! - [`read_only`]: the wrapper that makes `http(s)://` refuse writes.
//! - [`retrying`]: the layer every opened store sits behind: reads resumed where their body broke
//!   off, transient failures retried.
//! - [`faults`]: fault injection for the reliability tests (`EFFNET_FAULT`, `EFFNET_STORE_FAULTS`).
//! - [`redact`]: credentials (passwords, presigned queries, SAS tokens) masked out of URLs and
//!   messages before people see them.
//! - `testing` (feature `test-server`): a moto S3 server on loopback and the conformance suite.

pub mod error;
pub mod faults;
pub mod io;
pub mod location;
pub mod options;
pub mod read_only;
pub mod redact;
pub mod retrying;
#[cfg(feature = "test-server")]
pub mod testing;

pub use error::{Error, Result};
pub use io::{
    COMMIT_MARKER, DEFAULT_PART_SIZE, MIN_PART_SIZE, MultipartWriter, buffered_writer, delete, exists,
    get_bytes, get_range, head, list_prefix, put_bytes, read_marker, size, write_marker,
};
pub use location::{Scheme, StoreLocation, forget_memory_store, open, open_with};
pub use object_store;
pub use object_store::path::Path;
pub use options::{Environment, RetrySettings, StoreOptions};
pub use redact::{Redacted, redact, redact_json, redact_text, redacted_json};
