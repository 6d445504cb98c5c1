//! Reading a dataset: the manifest, row groups by ranged GET, and a rank's shuffled stream.
//!
//! `Dataset::open` refuses a prefix without a valid manifest. `RankReader` runs one rank's
//! [`RankWork`] the way [`crate::plan::simulate_rank`] describes it: units are fetched in order
//! with `prefetch` requests in flight, enter a bounded shuffle buffer, and samples come out in
//! the seeded order; `cursor()` at any point is what a checkpoint saves.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use effnet_store::StoreLocation;
use futures::FutureExt;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions, RowSelection, RowSelector};
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use tokio::sync::Mutex;

use arrow_array::{Array, BinaryArray, Int32Array, StringArray};

use crate::error::{Error, Result};
use crate::manifest::{MANIFEST_NAME, Manifest};
use crate::plan::{
    EpochPlan, RankCursor, RankWork, RowGroupRef, SampleRef, ShuffleBuffer, WorkUnit, initial_cursors,
};
use crate::writer::dataset_schema;

/// Rows decoded from Parquet per Arrow batch: a row group is read in batches of at most this many,
/// so no buffer is sized from a row count the file claims (a footer can claim billions of rows in
/// a few bytes). Row groups are 64–256 rows in practice, one batch.
const MAX_BATCH_ROWS: u32 = 1024;

/// One stored sample, still encoded.
#[derive(Clone, Debug, PartialEq)]
pub struct RawSample {
    pub at: SampleRef,
    pub key: String,
    pub image: Bytes,
    pub label: i32,
}

/// What reading one unit yields: usable samples and the ones skipped.
pub type UnitSamples = (Vec<RawSample>, Vec<BadSample>);

/// A sample that cannot be used (label outside the classes...): skipped and counted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadSample {
    pub at: SampleRef,
    pub key: String,
    pub reason: String,
}

pub struct Dataset {
    pub location: StoreLocation,
    pub manifest: Manifest,
    row_groups: Vec<RowGroupRef>,
    footers: Mutex<HashMap<u32, ArrowReaderMetadata>>,
}

impl Dataset {
    pub async fn open(url: &str) -> Result<Arc<Dataset>> {
        Self::open_location(effnet_store::open(url)?).await
    }

    pub async fn open_location(location: StoreLocation) -> Result<Arc<Dataset>> {
        let path = location.path(MANIFEST_NAME)?;
        let bytes = match effnet_store::get_bytes(location.store.as_ref(), &path).await {
            Ok(bytes) => bytes,
            Err(effnet_store::Error::NotFound { .. }) => {
                return Err(Error::NoDataset {
                    url: location.url.clone(),
                    reason: format!("{MANIFEST_NAME} not found"),
                });
            }
            Err(other) => return Err(other.into()),
        };
        let manifest = Manifest::from_json(&bytes)
            .map_err(|e| Error::NoDataset { url: location.url.clone(), reason: e.to_string() })?;
        let row_groups = manifest.row_groups();
        Ok(Arc::new(Dataset { location, manifest, row_groups, footers: Mutex::new(HashMap::new()) }))
    }

    pub fn row_groups(&self) -> &[RowGroupRef] {
        &self.row_groups
    }

    fn file_url(&self, file: u32) -> String {
        format!("{}/{}", self.location.url.trim_end_matches('/'), self.manifest.files[file as usize].path)
    }

    fn object_reader(&self, file: u32) -> Result<StoreFileReader> {
        let part = &self.manifest.files[file as usize];
        let path = self.location.path(&part.path)?;
        Ok(StoreFileReader { store: self.location.store.clone(), path, size: part.bytes })
    }

    /// The file's footer, read once and checked against the dataset schema.
    async fn footer(&self, file: u32) -> Result<ArrowReaderMetadata> {
        if let Some(found) = self.footers.lock().await.get(&file) {
            return Ok(found.clone());
        }
        let mut reader = self.object_reader(file)?;
        let loaded =
            crate::panics::catching(ArrowReaderMetadata::load_async(&mut reader, ArrowReaderOptions::new()))
                .await
                .map_err(|panic| Error::Read { path: self.file_url(file), reason: corrupt_parquet(panic) })?;
        let metadata =
            loaded.map_err(|e| Error::Read { path: self.file_url(file), reason: e.to_string() })?;
        let expected = dataset_schema();
        let found = metadata.schema();
        let matches = found.fields().len() == expected.fields().len()
            && found
                .fields()
                .iter()
                .zip(expected.fields())
                .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
        if !matches {
            let described: Vec<String> =
                found.fields().iter().map(|f| format!("{}: {}", f.name(), f.data_type())).collect();
            return Err(Error::Schema { path: self.file_url(file), found: described.join(", ") });
        }
        let groups = metadata.metadata().num_row_groups();
        let listed = &self.manifest.files[file as usize].row_groups;
        if groups != listed.len() {
            return Err(Error::Read {
                path: self.file_url(file),
                reason: format!("{groups} row groups in the file, {} in the manifest", listed.len()),
            });
        }
        // The manifest's row counts size reads and plans: hold them to what the file's footer says,
        // so an edited or hostile manifest (rows: 4294967295) is refused here instead of sizing
        // anything.
        for (index, (group, claimed)) in metadata.metadata().row_groups().iter().zip(listed).enumerate() {
            if group.num_rows() != claimed.rows as i64 {
                return Err(Error::Read {
                    path: self.file_url(file),
                    reason: format!(
                        "row group {index} holds {} rows, the manifest's files[{file}].row_groups[{index}].rows says {}",
                        group.num_rows(),
                        claimed.rows
                    ),
                });
            }
        }
        self.footers.lock().await.insert(file, metadata.clone());
        Ok(metadata)
    }

    /// Read rows `[start, end)` of one row group (one ranged request for the row group's bytes).
    pub async fn read_unit(&self, unit: WorkUnit) -> Result<UnitSamples> {
        let group =
            self.row_groups.get(unit.row_group as usize).copied().ok_or_else(|| Error::InvalidCursor {
                reason: format!("row group {} does not exist in this dataset", unit.row_group),
            })?;
        if unit.end > group.rows || unit.start > unit.end {
            return Err(Error::InvalidCursor {
                reason: format!(
                    "rows {}..{} of row group {} ({} rows)",
                    unit.start, unit.end, unit.row_group, group.rows
                ),
            });
        }
        let metadata = self.footer(group.file).await?;
        let mut selectors = Vec::new();
        if unit.start > 0 {
            selectors.push(RowSelector::skip(unit.start as usize));
        }
        selectors.push(RowSelector::select(unit.rows() as usize));
        let stream =
            ParquetRecordBatchStreamBuilder::new_with_metadata(self.object_reader(group.file)?, metadata)
                .with_row_groups(vec![group.index as usize])
                .with_row_selection(RowSelection::from(selectors))
                .with_batch_size(unit.rows().clamp(1, MAX_BATCH_ROWS) as usize)
                .build()
                .map_err(|e| Error::Read { path: self.file_url(group.file), reason: e.to_string() })?;
        // parquet-rs panics on some corrupt pages (one flipped byte in a page header's encoding:
        // "Decoder for dict should have been set", found by tests/fuzz_dataset.rs); a corrupt file
        // must be an error naming it, not a panic that takes the worker down.
        let batches: Vec<_> = crate::panics::catching(stream.collect::<Vec<_>>()).await.map_err(|panic| {
            Error::Read { path: self.file_url(group.file), reason: corrupt_parquet(panic) }
        })?;
        let classes = self.manifest.classes.len() as i32;
        // Capacity from a count the file claims is capped: the Vec grows with what is really read.
        let mut samples = Vec::with_capacity(unit.rows().min(MAX_BATCH_ROWS) as usize);
        let mut bad = Vec::new();
        let mut row = unit.start;
        for batch in batches {
            let batch =
                batch.map_err(|e| Error::Read { path: self.file_url(group.file), reason: e.to_string() })?;
            let column_error =
                || Error::Schema { path: self.file_url(group.file), found: "unexpected column types".into() };
            let keys = batch.column(0).as_any().downcast_ref::<StringArray>().ok_or_else(column_error)?;
            let images = batch.column(1).as_any().downcast_ref::<BinaryArray>().ok_or_else(column_error)?;
            let labels = batch.column(2).as_any().downcast_ref::<Int32Array>().ok_or_else(column_error)?;
            for i in 0..batch.num_rows() {
                let key = keys.value(i).to_string();
                let label = labels.value(i);
                if labels.is_null(i) || !(0..classes).contains(&label) {
                    bad.push(BadSample {
                        at: SampleRef { row_group: unit.row_group, row },
                        key,
                        reason: format!("label {label} outside the {classes} classes"),
                    });
                } else {
                    let image = Bytes::copy_from_slice(images.value(i));
                    samples.push(RawSample {
                        at: SampleRef { row_group: unit.row_group, row },
                        key,
                        image,
                        label,
                    });
                }
                row += 1;
            }
        }
        if row != unit.end {
            return Err(Error::Read {
                path: self.file_url(group.file),
                reason: format!(
                    "row group {} yielded {} rows, expected {}",
                    group.index,
                    row - unit.start,
                    unit.rows()
                ),
            });
        }
        Ok((samples, bad))
    }

    /// Read individual samples (a cursor's buffered ones), grouped by row group.
    pub async fn read_samples(&self, refs: &[SampleRef]) -> Result<UnitSamples> {
        let mut by_group: HashMap<u32, Vec<u32>> = HashMap::new();
        for r in refs {
            by_group.entry(r.row_group).or_default().push(r.row);
        }
        let mut found: HashMap<SampleRef, RawSample> = HashMap::new();
        let mut bad = Vec::new();
        let wanted: std::collections::HashSet<SampleRef> = refs.iter().copied().collect();
        for (group, rows) in by_group {
            let (start, end) =
                (rows.iter().min().copied().unwrap_or(0), rows.iter().max().copied().unwrap_or(0) + 1);
            let (samples, unit_bad) = self.read_unit(WorkUnit { row_group: group, start, end }).await?;
            // The range covers rows that were not asked for (consumed before the cursor was
            // saved): their bad samples were reported then, not again now.
            bad.extend(unit_bad.into_iter().filter(|b| wanted.contains(&b.at)));
            for sample in samples {
                found.insert(sample.at, sample);
            }
        }
        // Keep the caller's order; refs whose sample was bad are absent.
        let samples = refs.iter().filter_map(|r| found.remove(r)).collect();
        Ok((samples, bad))
    }
}

/// The reason for a read whose Parquet decoder panicked, with the panic's message.
fn corrupt_parquet(panic: Box<dyn std::any::Any + Send>) -> String {
    let message = panic
        .downcast_ref::<&str>()
        .map(|m| m.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    format!("corrupt Parquet data (the decoder panicked: {message})")
}

/// Ranged reads of one part file; the size comes from the manifest, so no HEAD request.
struct StoreFileReader {
    store: Arc<dyn ObjectStore>,
    path: object_store::path::Path,
    size: u64,
}

fn external(error: object_store::Error) -> ParquetError {
    ParquetError::External(Box::new(error))
}

impl AsyncFileReader for StoreFileReader {
    fn get_bytes(&mut self, range: std::ops::Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        let (store, path) = (self.store.clone(), self.path.clone());
        async move { store.get_range(&path, range).await.map_err(external) }.boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<std::ops::Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        let (store, path) = (self.store.clone(), self.path.clone());
        async move { store.get_ranges(&path, &ranges).await.map_err(external) }.boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        let size = self.size;
        async move {
            // One request covers the footer of typical part files.
            let metadata = ParquetMetaDataReader::new()
                .with_prefetch_hint(Some(64 * 1024))
                .load_and_finish(self, size)
                .await?;
            Ok(Arc::new(metadata))
        }
        .boxed()
    }
}

/// One rank's stream of raw samples in shuffled order, with prefetching.
pub struct RankReader {
    dataset: Arc<Dataset>,
    work: RankWork,
    buffer: ShuffleBuffer,
    /// Samples by reference for everything in the shuffle buffer.
    loaded: HashMap<SampleRef, RawSample>,
    units_consumed: usize,
    next_fetch: usize,
    in_flight: FuturesOrdered<tokio::task::JoinHandle<Result<UnitSamples>>>,
    prefetch: usize,
    emitted: u64,
    bad: Vec<BadSample>,
}

impl RankReader {
    /// Start (or resume) a rank. `capacity` is the shuffle buffer size in samples, `prefetch`
    /// the number of row-group requests kept in flight.
    pub async fn new(
        dataset: Arc<Dataset>,
        work: RankWork,
        cursor: RankCursor,
        capacity: usize,
        prefetch: usize,
    ) -> Result<Self> {
        if cursor.units_consumed > work.units.len() {
            return Err(Error::InvalidCursor {
                reason: format!("{} units consumed of {}", cursor.units_consumed, work.units.len()),
            });
        }
        let (samples, bad) = dataset.read_samples(&cursor.buffered).await?;
        let loaded: HashMap<SampleRef, RawSample> = samples.into_iter().map(|s| (s.at, s)).collect();
        let buffered: Vec<SampleRef> =
            cursor.buffered.iter().filter(|r| loaded.contains_key(r)).copied().collect();
        Ok(RankReader {
            dataset,
            buffer: ShuffleBuffer::new(capacity, cursor.shuffle_state, buffered),
            loaded,
            units_consumed: cursor.units_consumed,
            next_fetch: cursor.units_consumed,
            work,
            in_flight: FuturesOrdered::new(),
            prefetch: prefetch.max(1),
            emitted: cursor.emitted,
            bad,
        })
    }

    /// Rank `rank`'s share of `plan`, from `cursor` (a saved position) or from the start.
    pub async fn for_plan(
        dataset: Arc<Dataset>,
        plan: &EpochPlan,
        rank: usize,
        cursor: Option<RankCursor>,
        capacity: usize,
        prefetch: usize,
    ) -> Result<Self> {
        let work = plan.ranks.get(rank).cloned().ok_or_else(|| Error::InvalidPlan {
            reason: format!("rank {rank} in a plan of {} ranks", plan.world_size()),
        })?;
        let cursor = match cursor {
            Some(cursor) => cursor,
            None => initial_cursors(plan).swap_remove(rank),
        };
        RankReader::new(dataset, work, cursor, capacity, prefetch).await
    }

    fn top_up_fetches(&mut self) {
        while self.in_flight.len() < self.prefetch && self.next_fetch < self.work.units.len() {
            let unit = self.work.units[self.next_fetch];
            let dataset = self.dataset.clone();
            self.in_flight.push_back(tokio::spawn(async move { dataset.read_unit(unit).await }));
            self.next_fetch += 1;
        }
    }

    /// The next sample, or `None` at the end of the rank's work.
    pub async fn next(&mut self) -> Result<Option<RawSample>> {
        loop {
            self.top_up_fetches();
            if self.buffer.wants_more() && self.units_consumed < self.work.units.len() {
                let joined = self.in_flight.next().await.ok_or_else(|| Error::InvalidCursor {
                    reason: "prefetch queue empty while units remain".into(),
                })?;
                let (samples, bad) = joined.map_err(|e| Error::Read {
                    path: self.dataset.location.url.clone(),
                    reason: e.to_string(),
                })??;
                self.units_consumed += 1;
                self.bad.extend(bad);
                // Bad samples keep their row slot in the plan but never enter the buffer.
                let mut refs = Vec::with_capacity(samples.len());
                for sample in samples {
                    refs.push(sample.at);
                    self.loaded.insert(sample.at, sample);
                }
                self.buffer.extend(refs);
                continue;
            }
            return Ok(match self.buffer.pop() {
                Some(at) => {
                    self.emitted += 1;
                    self.loaded.remove(&at)
                }
                None => None,
            });
        }
    }

    /// Where this rank is: what a checkpoint saves.
    pub fn cursor(&self) -> RankCursor {
        let (buffered, shuffle_state) = self.buffer.snapshot();
        RankCursor { units_consumed: self.units_consumed, buffered, shuffle_state, emitted: self.emitted }
    }

    /// Samples skipped so far (bad labels), with the reason.
    pub fn bad_samples(&self) -> &[BadSample] {
        &self.bad
    }
}
