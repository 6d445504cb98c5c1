//! The training data feed: a task on the I/O runtime reads, decodes and augments batches one
//! epoch after another and hands them to the training loop through a short channel, each with the
//! data cursor that holds *after* it. A checkpoint taken after step `n` saves the cursor of the
//! last batch step `n` consumed, however far the feed has read ahead, so resume is exact.
//!
//! With several ranks each feed reads its rank's share of the epoch plan; the cursor it attaches
//! holds the full plan but only this rank's position (`ranks` has one entry), and the trainer
//! gathers the others' before rank 0 writes a checkpoint.

use std::sync::Arc;

use effnet_data::loader::{BatchLoader, LoaderOptions, Transform};
use effnet_data::plan::initial_cursors;
use effnet_data::reader::{BadSample, Dataset, RankReader};
use effnet_data::{DataCursor, EpochPlan};
use effnet_vision::BatchParts;
use tokio::sync::mpsc;

use crate::error::Result;

pub enum Feed {
    Batch {
        batch: BatchParts,
        epoch: u64,
        cursor: DataCursor,
    },
    /// Samples skipped in the epoch that just ended (corrupt images, labels out of range).
    EpochEnd {
        epoch: u64,
        skipped: Vec<BadSample>,
    },
    Failed(crate::Error),
}

#[derive(Clone)]
pub struct FeedSettings {
    pub dataset: Arc<Dataset>,
    pub transform: Transform,
    pub batch_size: usize,
    pub threads: usize,
    pub seed: u64,
    pub shuffle_buffer: usize,
    pub prefetch: usize,
    /// This process's rank and the world size: each rank reads its share of every epoch.
    pub rank: usize,
    pub world_size: usize,
}

/// Start the feed at `start` (a saved cursor) or at the beginning of epoch 0.
pub fn spawn(
    runtime: &tokio::runtime::Runtime,
    settings: FeedSettings,
    start: Option<DataCursor>,
) -> mpsc::Receiver<Feed> {
    let (sender, receiver) = mpsc::channel(2);
    runtime.spawn(async move {
        if let Err(error) = produce(settings, start, &sender).await {
            let _ = sender.send(Feed::Failed(error)).await;
        }
    });
    receiver
}

async fn produce(
    settings: FeedSettings,
    start: Option<DataCursor>,
    sender: &mpsc::Sender<Feed>,
) -> Result<()> {
    let mut resume = start;
    let mut epoch = resume.as_ref().map(|c| c.plan.epoch).unwrap_or(0);
    loop {
        let (plan, cursor) = match resume.take() {
            Some(saved) => {
                let (plan, mut cursors) = saved.resume(settings.world_size)?;
                (plan, cursors.swap_remove(settings.rank))
            }
            None => {
                let plan =
                    EpochPlan::new(settings.seed, epoch, settings.dataset.row_groups(), settings.world_size)?;
                let cursor = initial_cursors(&plan).swap_remove(settings.rank);
                (plan, cursor)
            }
        };
        let reader = RankReader::new(
            settings.dataset.clone(),
            plan.ranks[settings.rank].clone(),
            cursor,
            settings.shuffle_buffer,
            settings.prefetch,
        )
        .await?;
        let options = LoaderOptions {
            batch_size: settings.batch_size,
            threads: settings.threads,
            seed: settings.seed,
            epoch,
        };
        let mut loader = BatchLoader::new(reader, settings.transform.clone(), options)?;
        // Full batches only: the short remainder at the end of an epoch is dropped, as with
        // PyTorch's `drop_last`, so every step has the same batch size.
        while let Some(batch) = loader.next_batch().await? {
            if batch.labels.len() < settings.batch_size {
                break;
            }
            let cursor = DataCursor { plan: plan.clone(), ranks: vec![loader.cursor()] };
            if sender.send(Feed::Batch { batch, epoch, cursor }).await.is_err() {
                return Ok(());
            }
        }
        if sender.send(Feed::EpochEnd { epoch, skipped: loader.skipped() }).await.is_err() {
            return Ok(());
        }
        epoch += 1;
    }
}
