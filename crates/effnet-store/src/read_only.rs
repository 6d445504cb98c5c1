//! A store wrapper that refuses every write, for sources that must not be written (`http(s)://`).
//!
//! object_store's `HttpStore` would happily issue WebDAV `PUT`/`DELETE` requests; a dataset
//! served over plain HTTP is an input, so writes are refused here before any request is sent.

use std::fmt;
use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};

/// The error inside `object_store::Error::NotSupported` when a write reaches a [`ReadOnlyStore`];
/// [`crate::Error::ReadOnly`] is made from it.
#[derive(Debug, thiserror::Error)]
#[error("'{url}' is read-only, refusing to write {path}")]
pub struct ReadOnlyRefusal {
    pub url: String,
    pub path: String,
}

/// Wraps a store so that reads pass through and writes fail with [`ReadOnlyRefusal`].
#[derive(Debug)]
pub struct ReadOnlyStore<T> {
    inner: T,
    url: String,
}

impl<T: ObjectStore> ReadOnlyStore<T> {
    pub fn new(inner: T, url: impl Into<String>) -> Self {
        ReadOnlyStore { inner, url: url.into() }
    }

    fn refuse(&self, path: &Path) -> object_store::Error {
        object_store::Error::NotSupported {
            source: Box::new(ReadOnlyRefusal { url: self.url.clone(), path: path.to_string() }),
        }
    }
}

impl<T: ObjectStore> fmt::Display for ReadOnlyStore<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReadOnly({})", self.inner)
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl<T: ObjectStore> ObjectStore for ReadOnlyStore<T> {
    async fn put_opts(
        &self,
        location: &Path,
        _payload: PutPayload,
        _opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        Err(self.refuse(location))
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        _opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Err(self.refuse(location))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let url = self.url.clone();
        locations
            .map(move |location| {
                let path = location?.to_string();
                Err(object_store::Error::NotSupported {
                    source: Box::new(ReadOnlyRefusal { url: url.clone(), path }),
                })
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, _from: &Path, to: &Path, _options: CopyOptions) -> object_store::Result<()> {
        Err(self.refuse(to))
    }

    async fn rename_opts(
        &self,
        _from: &Path,
        to: &Path,
        _options: RenameOptions,
    ) -> object_store::Result<()> {
        Err(self.refuse(to))
    }
}
