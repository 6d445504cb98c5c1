//! Streaming dataset writer: samples in, `part-NNNNN.parquet` files and `_manifest.json` out.
//!
//! Memory is bounded by one row group: rows are buffered until a row group is full, encoded, and
//! streamed to the store through a multipart upload while its SHA-256 is computed. The manifest
//! is written last, so an interrupted `prepare` leaves no readable dataset behind.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arrow_array::{BinaryArray, Int32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use effnet_store::StoreLocation;
use object_store::buffered::BufWriter;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWrite;

use crate::error::{Error, Result};
use crate::manifest::{MANIFEST_NAME, Manifest, PartFile, RowGroupInfo, SCHEMA_VERSION, SkippedSample, hex};

/// The dataset schema: `key: utf8`, `image: binary` (encoded JPEG/PNG), `label: int32`.
pub fn dataset_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Utf8, false),
        Field::new("image", DataType::Binary, false),
        Field::new("label", DataType::Int32, false),
    ]))
}

#[derive(Clone, Copy, Debug)]
pub struct WriterOptions {
    /// Images per row group: the unit of sharding, shuffling and ranged reads.
    pub rows_per_group: usize,
    /// Row groups per part file.
    pub groups_per_part: usize,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions { rows_per_group: 256, groups_per_part: 32 }
    }
}

impl WriterOptions {
    pub fn validate(&self) -> Result<()> {
        if self.rows_per_group == 0 || self.groups_per_part == 0 {
            return Err(Error::InvalidInput {
                what: "writer options".into(),
                reason: format!(
                    "rows per group and groups per part must be at least 1, got {} and {}",
                    self.rows_per_group, self.groups_per_part
                ),
            });
        }
        Ok(())
    }
}

/// SHA-256 and byte count of everything written through it.
struct HashingWriter {
    inner: BufWriter,
    hasher: Sha256,
    bytes: u64,
}

impl AsyncWrite for HashingWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(written)) => {
                this.hasher.update(&buf[..written]);
                this.bytes += written as u64;
                Poll::Ready(Ok(written))
            }
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct OpenPart {
    path: String,
    writer: AsyncArrowWriter<HashingWriter>,
    groups: usize,
}

pub struct DatasetWriter {
    location: StoreLocation,
    options: WriterOptions,
    name: String,
    classes: Vec<String>,
    schema: SchemaRef,
    properties: WriterProperties,
    part: Option<OpenPart>,
    keys: Vec<String>,
    images: Vec<Vec<u8>>,
    labels: Vec<i32>,
    seen_keys: HashSet<String>,
    files: Vec<PartFile>,
    skipped: Vec<SkippedSample>,
}

impl DatasetWriter {
    /// Start a dataset at `location`. Refuses a location that already holds a manifest, so an
    /// existing dataset is never overwritten by accident.
    pub async fn create(
        location: StoreLocation,
        name: impl Into<String>,
        classes: Vec<String>,
        options: WriterOptions,
    ) -> Result<Self> {
        options.validate()?;
        if classes.is_empty() {
            return Err(Error::InvalidInput {
                what: "classes".into(),
                reason: "at least one class is needed".into(),
            });
        }
        let manifest_path = location.path(MANIFEST_NAME)?;
        if effnet_store::exists(location.store.as_ref(), &manifest_path).await? {
            return Err(Error::InvalidInput {
                what: location.url.clone(),
                reason: "already holds a dataset (_manifest.json exists); choose another --out".into(),
            });
        }
        let properties = WriterProperties::builder()
            // Images are already compressed; keys and labels are tiny.
            .set_compression(Compression::UNCOMPRESSED)
            .set_max_row_group_row_count(Some(options.rows_per_group))
            .set_column_dictionary_enabled(ColumnPath::from("image"), false)
            .set_column_statistics_enabled(ColumnPath::from("image"), EnabledStatistics::None)
            .build();
        Ok(DatasetWriter {
            location,
            options,
            name: name.into(),
            classes,
            schema: dataset_schema(),
            properties,
            part: None,
            keys: Vec::new(),
            images: Vec::new(),
            labels: Vec::new(),
            seen_keys: HashSet::new(),
            files: Vec::new(),
            skipped: Vec::new(),
        })
    }

    /// Add one sample. Keys must be unique and labels index the class list.
    pub async fn push(&mut self, key: String, image: Vec<u8>, label: i32) -> Result<()> {
        if label < 0 || label as usize >= self.classes.len() {
            return Err(Error::InvalidInput {
                what: format!("sample {key}"),
                reason: format!("label {label} is outside the {} classes", self.classes.len()),
            });
        }
        if !self.seen_keys.insert(key.clone()) {
            return Err(Error::InvalidInput {
                what: format!("sample {key}"),
                reason: "duplicate key".into(),
            });
        }
        self.keys.push(key);
        self.images.push(image);
        self.labels.push(label);
        if self.keys.len() == self.options.rows_per_group {
            self.flush_group().await?;
        }
        Ok(())
    }

    /// Record an input that could not be stored; it is listed in the manifest.
    pub fn skip(&mut self, source: impl Into<String>, reason: impl Into<String>) {
        self.skipped.push(SkippedSample { source: source.into(), reason: reason.into() });
    }

    pub fn rows(&self) -> u64 {
        self.files.iter().map(|f| f.rows).sum::<u64>() + self.keys.len() as u64
    }

    async fn flush_group(&mut self) -> Result<()> {
        if self.keys.is_empty() {
            return Ok(());
        }
        if self.part.is_none() {
            let path = format!("part-{:05}.parquet", self.files.len());
            let object = self.location.path(&path)?;
            let inner = effnet_store::buffered_writer(self.location.store.clone(), &object);
            let sink = HashingWriter { inner, hasher: Sha256::new(), bytes: 0 };
            let writer = AsyncArrowWriter::try_new(sink, self.schema.clone(), Some(self.properties.clone()))
                .map_err(|e| parquet_error(&self.location, &path, e))?;
            self.part = Some(OpenPart { path, writer, groups: 0 });
        }
        let batch = RecordBatch::try_new(
            self.schema.clone(),
            vec![
                Arc::new(StringArray::from(std::mem::take(&mut self.keys))),
                Arc::new(BinaryArray::from_iter_values(std::mem::take(&mut self.images))),
                Arc::new(Int32Array::from(std::mem::take(&mut self.labels))),
            ],
        )
        .map_err(|e| Error::InvalidInput { what: "record batch".into(), reason: e.to_string() })?;
        let part = self
            .part
            .as_mut()
            .ok_or_else(|| Error::InvalidInput { what: "writer".into(), reason: "no open part".into() })?;
        part.writer.write(&batch).await.map_err(|e| parquet_error(&self.location, &part.path, e))?;
        part.writer.flush().await.map_err(|e| parquet_error(&self.location, &part.path, e))?;
        part.groups += 1;
        if part.groups == self.options.groups_per_part {
            self.close_part().await?;
        }
        Ok(())
    }

    async fn close_part(&mut self) -> Result<()> {
        let Some(part) = self.part.take() else { return Ok(()) };
        let OpenPart { path, writer, .. } = part;
        let mut writer = writer;
        // Writes the footer and completes the multipart upload.
        let metadata = writer.finish().await.map_err(|e| parquet_error(&self.location, &path, e))?;
        let sink = writer.into_inner();
        let row_groups: Vec<RowGroupInfo> = metadata
            .row_groups()
            .iter()
            .map(|group| {
                let (start, end) = (0..group.num_columns())
                    .map(|c| group.column(c).byte_range())
                    .fold((u64::MAX, 0u64), |(lo, hi), (s, len)| (lo.min(s), hi.max(s + len)));
                RowGroupInfo { rows: group.num_rows() as u32, offset: start, bytes: end - start }
            })
            .collect();
        let rows = row_groups.iter().map(|g| g.rows as u64).sum();
        self.files.push(PartFile {
            path,
            rows,
            bytes: sink.bytes,
            sha256: hex(&sink.hasher.finalize()),
            row_groups,
        });
        Ok(())
    }

    /// Flush everything, then write the manifest (the commit point).
    pub async fn finish(mut self) -> Result<Manifest> {
        self.flush_group().await?;
        self.close_part().await?;
        let manifest = Manifest {
            schema_version: SCHEMA_VERSION,
            name: self.name,
            classes: self.classes,
            rows: self.files.iter().map(|f| f.rows).sum(),
            files: self.files,
            skipped: self.skipped,
            created_by: format!("effnet {}", env!("CARGO_PKG_VERSION")),
            checksum: String::new(),
        };
        let json = manifest.to_json()?;
        let path = self.location.path(MANIFEST_NAME)?;
        effnet_store::put_bytes(self.location.store.as_ref(), &path, json.clone()).await?;
        Manifest::from_json(&json)
    }
}

fn parquet_error(location: &StoreLocation, path: &str, error: parquet::errors::ParquetError) -> Error {
    Error::Write { path: format!("{}/{path}", location.url.trim_end_matches('/')), reason: error.to_string() }
}
