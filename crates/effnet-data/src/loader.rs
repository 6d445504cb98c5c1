//! Batches for training and evaluation: raw samples from a [`RankReader`] are decoded and
//! augmented on a thread pool straight into the slots of one contiguous N×C×H×W buffer.
//!
//! Each sample's augmentation is drawn from `SampleRng(seed, epoch, key)`, so it does not depend
//! on which thread ran it or on the world size. Samples that fail to decode are skipped, counted
//! and reported with their key; the batch is refilled from the stream so batches stay full until
//! the rank's work ends.

use effnet_vision::{BatchBuffer, BatchParts, EvalTransform, SampleRng, TrainTransform};
use rayon::prelude::*;

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::plan::{EpochPlan, RankCursor};
use crate::reader::{BadSample, Dataset, RankReader, RawSample};

/// Training (random crop, flip, RandAugment) or evaluation (resize + centre crop) preprocessing.
#[derive(Clone, Debug)]
pub enum Transform {
    Train(TrainTransform),
    Eval(EvalTransform),
}

impl Transform {
    fn shape(&self) -> (u8, u32) {
        match self {
            Transform::Train(t) => (t.config().channels.channels(), t.config().size),
            Transform::Eval(t) => (t.config().channels.channels(), t.config().size),
        }
    }

    fn apply(&self, sample: &RawSample, seed: u64, epoch: u64, out: &mut [f32]) -> effnet_vision::Result<()> {
        match self {
            Transform::Train(t) => t.apply(&sample.image, &mut SampleRng::new(seed, epoch, &sample.key), out),
            Transform::Eval(t) => t.apply(&sample.image, out),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct LoaderOptions {
    pub batch_size: usize,
    /// Decode threads.
    pub threads: usize,
    /// Job seed and epoch, for per-sample augmentation.
    pub seed: u64,
    pub epoch: u64,
}

/// How one rank's stream of batches is read: [`BatchLoader::open`]'s settings.
#[derive(Clone, Copy, Debug)]
pub struct StreamOptions {
    pub batch_size: usize,
    /// Decode threads.
    pub threads: usize,
    /// Job seed, for per-sample augmentation.
    pub seed: u64,
    /// Shuffle buffer capacity in samples (1: the plan's order).
    pub shuffle_buffer: usize,
    /// Row-group requests kept in flight.
    pub prefetch: usize,
}

pub struct BatchLoader {
    reader: RankReader,
    transform: Transform,
    options: LoaderOptions,
    pool: rayon::ThreadPool,
    corrupt: Vec<BadSample>,
}

impl BatchLoader {
    pub fn new(reader: RankReader, transform: Transform, options: LoaderOptions) -> Result<Self> {
        if options.batch_size == 0 || options.threads == 0 {
            return Err(Error::InvalidInput {
                what: "loader options".into(),
                reason: format!(
                    "batch size and threads must be at least 1, got {} and {}",
                    options.batch_size, options.threads
                ),
            });
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(options.threads)
            .thread_name(|i| format!("effnet-decode-{i}"))
            .build()
            .map_err(|e| Error::InvalidInput { what: "decode threads".into(), reason: e.to_string() })?;
        Ok(BatchLoader { reader, transform, options, pool, corrupt: Vec::new() })
    }

    /// Rank `rank`'s batches of `plan`, from `cursor` (a saved position) or from the start of its
    /// work: the one assembly of plan → cursor → reader → loader that training, evaluation and
    /// `effnet data` share.
    pub async fn open(
        dataset: Arc<Dataset>,
        plan: &EpochPlan,
        rank: usize,
        cursor: Option<RankCursor>,
        transform: Transform,
        options: StreamOptions,
    ) -> Result<Self> {
        let reader =
            RankReader::for_plan(dataset, plan, rank, cursor, options.shuffle_buffer, options.prefetch)
                .await?;
        let loader_options = LoaderOptions {
            batch_size: options.batch_size,
            threads: options.threads,
            seed: options.seed,
            epoch: plan.epoch,
        };
        BatchLoader::new(reader, transform, loader_options)
    }

    /// The next batch, shorter only at the end of the rank's work; `None` when nothing is left.
    pub async fn next_batch(&mut self) -> Result<Option<BatchParts>> {
        let (channels, size) = self.transform.shape();
        let mut buffer = BatchBuffer::new(self.options.batch_size, channels, size, size);
        let mut filled = 0;
        let mut exhausted = false;
        while filled < self.options.batch_size && !exhausted {
            // Pull as many raw samples as there are free slots, then decode them in parallel.
            let mut raw = Vec::with_capacity(self.options.batch_size - filled);
            while raw.len() < self.options.batch_size - filled {
                match self.reader.next().await? {
                    Some(sample) => raw.push(sample),
                    None => {
                        exhausted = true;
                        break;
                    }
                }
            }
            let (seed, epoch, transform) = (self.options.seed, self.options.epoch, &self.transform);
            let slots: Vec<_> = buffer.samples_mut().skip(filled).take(raw.len()).collect();
            // Decoding blocks this task while the pool works; the reader's prefetch requests are
            // spawned tasks and keep running on the runtime's workers meanwhile.
            let results: Vec<Option<String>> = self.pool.install(|| {
                slots
                    .into_par_iter()
                    .zip(raw.par_iter())
                    .map(|(slot, sample)| match transform.apply(sample, seed, epoch, slot.pixels) {
                        Ok(()) => {
                            *slot.label = sample.label as i64;
                            *slot.key = sample.key.clone();
                            None
                        }
                        Err(e) => Some(e.to_string()),
                    })
                    .collect()
            });
            // Compact: move good samples over the slots of failed ones, keeping stream order.
            let mut write = filled;
            for (offset, (result, sample)) in results.into_iter().zip(&raw).enumerate() {
                let index = filled + offset;
                match result {
                    Some(reason) => {
                        self.corrupt.push(BadSample { at: sample.at, key: sample.key.clone(), reason })
                    }
                    None => {
                        if write != index {
                            let pixels = buffer.slot(index).to_vec();
                            buffer.slot_mut(write).copy_from_slice(&pixels);
                            if let Some(slot) = buffer.samples_mut().nth(write) {
                                *slot.label = sample.label as i64;
                                *slot.key = sample.key.clone();
                            }
                        }
                        write += 1;
                    }
                }
            }
            filled = write;
        }
        if filled == 0 {
            return Ok(None);
        }
        buffer.truncate(filled);
        Ok(Some(buffer.into_parts()))
    }

    /// The reader's cursor: samples in returned batches and skipped corrupt ones count as consumed.
    pub fn cursor(&self) -> RankCursor {
        self.reader.cursor()
    }

    /// Samples skipped so far: undecodable images and labels outside the classes.
    pub fn skipped(&self) -> Vec<BadSample> {
        self.reader.bad_samples().iter().cloned().chain(self.corrupt.iter().cloned()).collect()
    }
}
