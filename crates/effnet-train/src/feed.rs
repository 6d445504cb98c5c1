//! The training data: a task on the I/O runtime reads, decodes and augments this rank's batches
//! one epoch after another, and [`Feed`] hands them to the loop a step at a time.
//!
//! Exactly once per epoch, at any world size: every rank trains its whole share of the epoch's
//! plan, nothing is dropped and nothing is read ahead into the next epoch. The last batch of a
//! rank's share may be short; a lone last sample joins the batch before it (BatchNorm cannot
//! normalise a single sample at 1×1), so batches hold between 2 and `batch_size + 1` samples, and
//! a rank whose share is used up (or was all corrupt) takes part in the remaining steps of the
//! epoch with no samples. The epoch ends after the step in which the last rank finished its
//! share: ranks agree on that through the step's all-reduce ([`crate::step`]).
//!
//! Each item carries this rank's cursor *after* it, so a checkpoint saves the position of the
//! last batch trained, however far the task has read ahead; the trainer gathers every rank's
//! cursor before rank 0 writes it. A checkpoint taken at an epoch's end saves no cursor: the next
//! run starts the next epoch's plan.

use std::sync::Arc;

use effnet_data::loader::{BatchLoader, StreamOptions, Transform};
use effnet_data::plan::RankCursor;
use effnet_data::reader::{BadSample, Dataset};
use effnet_data::{DataCursor, EpochPlan};
use effnet_vision::BatchParts;
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::state::{CheckpointContent, Stateful};
use crate::sync::DataParallel;

/// One batch of this rank's share of an epoch.
pub struct FeedItem {
    pub batch: BatchParts,
    pub epoch: u64,
    /// The last batch of this rank's share of the epoch (possibly empty).
    pub last: bool,
    pub plan: Arc<EpochPlan>,
    /// This rank's position in `plan` after this batch.
    pub cursor: RankCursor,
    /// Samples skipped since the previous item: undecodable images, labels out of range.
    pub skipped: Vec<BadSample>,
}

enum Message {
    Item(FeedItem),
    Failed(Error),
}

#[derive(Clone)]
pub struct FeedSettings {
    pub dataset: Arc<Dataset>,
    pub transform: Transform,
    /// Channels, height, width of one sample (the shape of an empty batch).
    pub sample_shape: [i64; 3],
    pub stream: StreamOptions,
    /// This process's rank and the world size: each rank reads its share of every epoch.
    pub rank: usize,
    pub world_size: usize,
    /// Where the plans come from when they are not computed here (a coordinator's deal).
    pub dealer: Option<Arc<dyn Dealer>>,
}

/// The data plans of a run dealt elsewhere: a coordinator decides, once per generation, the
/// rest of the resumed epoch for this run's world and the plan of every new epoch. The feed
/// checks what it is given: a resumed epoch must hold exactly the samples the checkpoint's
/// cursor still had to train, and a new epoch's plan must deal every row of the dataset once.
pub trait Dealer: Send + Sync + std::fmt::Debug {
    /// The rest of the resumed checkpoint's epoch, dealt to this run's ranks (`None` when the
    /// run starts at an epoch's start).
    fn resumed(&self) -> Option<DataCursor>;
    /// The plan of epoch `epoch` (blocking; called from a blocking task).
    fn epoch_plan(&self, epoch: u64) -> Result<EpochPlan>;
}

/// What one rank trains in one step: up to `accumulate` batches of the current epoch.
pub struct StepInput {
    pub batches: Vec<BatchParts>,
    pub skipped: Vec<BadSample>,
    /// This rank has consumed its whole share of the epoch.
    pub share_done: bool,
    pub epoch: u64,
}

impl StepInput {
    pub fn samples(&self) -> u64 {
        self.batches.iter().map(|b| b.len() as u64).sum()
    }
}

pub struct Feed {
    settings: FeedSettings,
    /// A restored mid-epoch position, until the task starts from it.
    start: Option<DataCursor>,
    receiver: Option<mpsc::Receiver<Message>>,
    /// This rank's share of the current epoch is used up; it waits for the others.
    share_done: bool,
    /// The plan and this rank's cursor after the last batch taken (`None` at an epoch's start).
    position: Option<(Arc<EpochPlan>, RankCursor)>,
    /// Every rank's cursor, gathered for the next checkpoint.
    gathered: Option<DataCursor>,
}

impl Feed {
    pub fn new(settings: FeedSettings) -> Feed {
        Feed { settings, start: None, receiver: None, share_done: false, position: None, gathered: None }
    }

    /// Start reading: from the restored position, or at the start of `epoch`.
    pub fn start(&mut self, runtime: &tokio::runtime::Runtime, epoch: u64) {
        let (sender, receiver) = mpsc::channel(2);
        let settings = self.settings.clone();
        let start = self.start.take();
        runtime.spawn(async move {
            if let Err(error) = produce(settings, start, epoch, &sender).await {
                let _ = sender.send(Message::Failed(error)).await;
            }
        });
        self.receiver = Some(receiver);
    }

    /// This rank's batches for the next step: up to `accumulate`, none once its share of the
    /// epoch is done. Never reads into the next epoch.
    pub fn next_step(&mut self, accumulate: usize) -> Result<StepInput> {
        let mut input =
            StepInput { batches: Vec::new(), skipped: Vec::new(), share_done: self.share_done, epoch: 0 };
        while !self.share_done && input.batches.len() < accumulate {
            let receiver = self
                .receiver
                .as_mut()
                .ok_or_else(|| Error::Internal("the data feed was not started".into()))?;
            let item = match receiver.blocking_recv() {
                Some(Message::Item(item)) => item,
                Some(Message::Failed(error)) => return Err(error),
                None => return Err(Error::Internal("the data feed stopped".into())),
            };
            input.epoch = item.epoch;
            input.skipped.extend(item.skipped);
            if !item.batch.is_empty() {
                input.batches.push(item.batch);
            }
            self.position = Some((item.plan, item.cursor));
            self.share_done = item.last;
        }
        input.share_done = self.share_done;
        Ok(input)
    }

    /// Every rank finished the epoch: the next step starts the next one.
    pub fn end_epoch(&mut self) {
        self.share_done = false;
        self.position = None;
    }

    /// Collect every rank's cursor for the checkpoint rank 0 writes (every rank must call it).
    pub fn gather(&mut self, parallel: Option<&mut DataParallel>) -> Result<()> {
        self.gathered = match (&self.position, parallel) {
            // At an epoch's start every rank is there (the end is agreed): no cursor, no collective.
            (None, _) => None,
            (Some((plan, mine)), None) => {
                Some(DataCursor { plan: (**plan).clone(), ranks: vec![mine.clone()] })
            }
            (Some((plan, mine)), Some(parallel)) => {
                let bytes = serde_json::to_vec(mine).map_err(|e| Error::Internal(e.to_string()))?;
                let ranks = parallel
                    .all_gather_bytes(&bytes)?
                    .iter()
                    .map(|part| serde_json::from_slice(part))
                    .collect::<std::result::Result<Vec<RankCursor>, _>>()
                    .map_err(|e| Error::Internal(format!("a rank's data cursor: {e}")))?;
                Some(DataCursor { plan: (**plan).clone(), ranks })
            }
        };
        Ok(())
    }
}

impl Stateful for Feed {
    fn save(&self, checkpoint: &mut CheckpointContent) -> Result<()> {
        checkpoint.set("data", &self.gathered)
    }

    fn load(&mut self, checkpoint: &CheckpointContent) -> Result<()> {
        let cursor: Option<DataCursor> = checkpoint.get_optional("data")?;
        if let Some(cursor) = &cursor {
            let groups = self.settings.dataset.row_groups();
            let fits = cursor.validate().is_ok()
                && cursor.plan.ranks.iter().flat_map(|r| &r.units).all(|u| {
                    groups.get(u.row_group as usize).is_some_and(|g| u.start <= u.end && u.end <= g.rows)
                })
                && cursor
                    .ranks
                    .iter()
                    .flat_map(|r| &r.buffered)
                    .all(|s| groups.get(s.row_group as usize).is_some_and(|g| s.row < g.rows));
            if !fits {
                return Err(Error::IncompatibleCheckpoint {
                    url: checkpoint.url.clone(),
                    reason: "its data cursor does not fit the training dataset".into(),
                });
            }
        }
        self.start = match &self.settings.dealer {
            Some(dealer) => check_dealt(cursor, dealer.resumed(), self.settings.world_size, &checkpoint.url)?,
            None => cursor,
        };
        Ok(())
    }
}

/// The dealer's rest of the epoch, checked against the checkpoint's own cursor: the same
/// samples still to train, dealt to this run's world of `world_size`.
fn check_dealt(
    saved: Option<DataCursor>,
    dealt: Option<DataCursor>,
    world_size: usize,
    url: &str,
) -> Result<Option<DataCursor>> {
    let disagree = |reason: String| Error::IncompatibleCheckpoint {
        url: url.to_string(),
        reason: format!("the coordinator's deal disagrees with its data cursor: {reason}"),
    };
    match (saved, dealt) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(disagree("no rest of the epoch was dealt for a mid-epoch checkpoint".into())),
        (None, Some(_)) => Err(disagree("a rest of the epoch was dealt for an epoch-end checkpoint".into())),
        (Some(saved), Some(dealt)) => {
            dealt.validate().map_err(|e| disagree(e.to_string()))?;
            if dealt.plan.world_size() != world_size {
                return Err(disagree(format!(
                    "dealt to {} ranks, this run has {world_size}",
                    dealt.plan.world_size()
                )));
            }
            if (dealt.plan.seed, dealt.plan.epoch) != (saved.plan.seed, saved.plan.epoch) {
                return Err(disagree(format!(
                    "seed {} epoch {}, the checkpoint's seed {} epoch {}",
                    dealt.plan.seed, dealt.plan.epoch, saved.plan.seed, saved.plan.epoch
                )));
            }
            match (saved.remaining_rows(), dealt.remaining_rows()) {
                (Some(left), Some(given)) if left == given => Ok(Some(dealt)),
                _ => Err(disagree(format!(
                    "{} samples dealt, {} left in the checkpoint's epoch, or not the same ones",
                    dealt.remaining(),
                    saved.remaining()
                ))),
            }
        }
    }
}

/// Epoch `epoch`'s plan: the dealer's, checked to cover the dataset once at this world size, or
/// computed here.
async fn epoch_plan(settings: &FeedSettings, epoch: u64) -> Result<EpochPlan> {
    let Some(dealer) = settings.dealer.clone() else {
        return Ok(EpochPlan::new(
            settings.stream.seed,
            epoch,
            settings.dataset.row_groups(),
            settings.world_size,
        )?);
    };
    let plan = tokio::task::spawn_blocking(move || dealer.epoch_plan(epoch))
        .await
        .map_err(|e| Error::Internal(format!("asking for epoch {epoch}'s plan: {e}")))??;
    if (plan.seed, plan.epoch, plan.generation) != (settings.stream.seed, epoch, 0) {
        return Err(Error::Internal(format!(
            "the coordinator's plan for epoch {epoch} is seed {} epoch {} generation {}, expected seed {} epoch {epoch} generation 0",
            plan.seed, plan.epoch, plan.generation, settings.stream.seed
        )));
    }
    plan.check_covers(settings.dataset.row_groups(), settings.world_size)
        .map_err(|e| Error::Internal(format!("the coordinator's plan: {e}")))?;
    Ok(plan)
}

async fn produce(
    settings: FeedSettings,
    start: Option<DataCursor>,
    first_epoch: u64,
    sender: &mpsc::Sender<Message>,
) -> Result<()> {
    let mut resume = start;
    let mut epoch = first_epoch;
    let [channels, height, width] = settings.sample_shape;
    loop {
        let (plan, cursor) = match resume.take() {
            Some(saved) => {
                // The rest of the saved epoch, re-dealt when the world size changed.
                let (plan, mut cursors) = saved.resume(settings.world_size)?;
                epoch = plan.epoch;
                (plan, Some(cursors.swap_remove(settings.rank)))
            }
            None => (epoch_plan(&settings, epoch).await?, None),
        };
        let plan = Arc::new(plan);
        let mut loader = BatchLoader::open(
            settings.dataset.clone(),
            &plan,
            settings.rank,
            cursor,
            settings.transform.clone(),
            settings.stream,
        )
        .await?;
        let mut reported = 0;
        // One batch is held back until the next is known, so the last one can say it is last.
        let mut held: Option<FeedItem> = None;
        loop {
            let next = loader.next_batch().await?;
            let skipped = loader.skipped();
            let new_skipped = skipped[reported..].to_vec();
            reported = skipped.len();
            match next {
                // Batches are full until the share runs out: a single sample is the last one.
                Some(batch) if batch.len() == 1 && settings.stream.batch_size > 1 && held.is_some() => {
                    if let Some(item) = held.as_mut() {
                        item.batch.append(batch).map_err(Error::Internal)?;
                        item.cursor = loader.cursor();
                        item.skipped.extend(new_skipped);
                    }
                }
                Some(batch) => {
                    if let Some(previous) = held.take()
                        && sender.send(Message::Item(previous)).await.is_err()
                    {
                        return Ok(());
                    }
                    held = Some(FeedItem {
                        batch,
                        epoch,
                        last: false,
                        plan: plan.clone(),
                        cursor: loader.cursor(),
                        skipped: new_skipped,
                    });
                }
                None => {
                    let mut item = held.take().unwrap_or_else(|| FeedItem {
                        batch: BatchParts::empty(channels, height, width),
                        epoch,
                        last: true,
                        plan: plan.clone(),
                        cursor: loader.cursor(),
                        skipped: Vec::new(),
                    });
                    item.last = true;
                    item.cursor = loader.cursor();
                    item.skipped.extend(new_skipped);
                    if sender.send(Message::Item(item)).await.is_err() {
                        return Ok(());
                    }
                    break;
                }
            }
        }
        epoch += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use effnet_data::RowGroupRef;
    use effnet_data::plan::{initial_cursors, simulate_rank};

    /// Epoch 0 of 2 ranks over 6 row groups of 10, each rank part-way through its share.
    fn saved() -> DataCursor {
        let groups: Vec<RowGroupRef> =
            (0..6).map(|id| RowGroupRef { id, file: 0, index: id, rows: 10 }).collect();
        let plan = EpochPlan::new(3, 0, &groups, 2).unwrap();
        let ranks = plan
            .ranks
            .iter()
            .zip(initial_cursors(&plan))
            .map(|(work, cursor)| simulate_rank(work, &cursor, 8, Some(13)).1)
            .collect();
        DataCursor { plan, ranks }
    }

    #[test]
    fn a_deal_must_hold_the_checkpoints_rest_of_the_epoch_for_this_world() {
        let saved = saved();
        let (plan, ranks) = saved.resume(3).unwrap();
        let dealt = DataCursor { plan, ranks };
        let kept = check_dealt(Some(saved.clone()), Some(dealt.clone()), 3, "ckpt").unwrap();
        assert_eq!(kept, Some(dealt.clone()));
        assert_eq!(check_dealt(None, None, 3, "ckpt").unwrap(), None);

        let refused = |saved: Option<DataCursor>, dealt: Option<DataCursor>, world: usize| {
            let error = check_dealt(saved, dealt, world, "ckpt").unwrap_err();
            assert!(matches!(error, Error::IncompatibleCheckpoint { .. }), "{error}");
            error.to_string()
        };
        let message = refused(Some(saved.clone()), Some(dealt.clone()), 2);
        assert!(message.contains("dealt to 3 ranks, this run has 2"), "{message}");
        let message = refused(Some(saved.clone()), None, 3);
        assert!(message.contains("no rest of the epoch was dealt"), "{message}");
        let message = refused(None, Some(dealt.clone()), 3);
        assert!(message.contains("epoch-end checkpoint"), "{message}");
        // A sample lost from a buffer, or one that is not the checkpoint's: refused.
        let mut lost = dealt.clone();
        let rank = lost.ranks.iter().position(|r| !r.buffered.is_empty()).expect("a buffered sample");
        lost.ranks[rank].buffered.pop();
        let message = refused(Some(saved.clone()), Some(lost), 3);
        assert!(message.contains("or not the same ones"), "{message}");
        let mut other_epoch = dealt;
        other_epoch.plan.epoch = 1;
        let message = refused(Some(saved), Some(other_epoch), 3);
        assert!(message.contains("epoch 1, the checkpoint's seed 3 epoch 0"), "{message}");
    }
}
