//! Where training stands ([`TrainProgress`], checkpointed) and how that is shown ([`Console`]: a
//! progress bar on a terminal, log lines otherwise).

use effnet_config::Span;
use serde::Serialize;

use crate::error::Result;
use crate::evaluate::EvalMetrics;
use crate::state::{CheckpointContent, Stateful};

/// When a job is done: after so many real steps, or when so many epochs of samples are consumed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "unit", content = "length", rename_all = "snake_case")]
pub enum TrainLength {
    Steps(u64),
    Epochs(f64),
}

impl From<Span> for TrainLength {
    fn from(span: Span) -> TrainLength {
        match span {
            Span::Steps(steps) => TrainLength::Steps(steps),
            Span::Epochs(epochs) => TrainLength::Epochs(epochs),
        }
    }
}

/// Where this rank stands, for whoever watches it from another thread (a worker's heartbeats to
/// its coordinator): written by the loop after every step and every committed checkpoint.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Live {
    pub step: u64,
    /// Epochs done, with the current one's consumed fraction.
    pub epoch: f64,
    pub loss: Option<f64>,
    /// Every rank's images per second in the last step.
    pub images_per_s: Option<f64>,
    /// The newest checkpoint committed in this run (rank 0 writes them): step and URL.
    pub checkpoint: Option<(u64, String)>,
}

/// [`Live`] shared between the loop and its watcher.
pub type LiveProgress = std::sync::Arc<std::sync::Mutex<Live>>;

/// The training position, saved in every checkpoint.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainProgress {
    /// Optimiser steps taken.
    pub step: u64,
    /// The epoch being trained (epochs end when every rank has consumed its share).
    pub epoch: u64,
    /// Samples trained, all ranks.
    pub samples_seen: u64,
    /// Samples of the epoch plans consumed (trained or skipped), all ranks: the schedules' clock.
    pub samples_consumed: u64,
    pub val: Option<EvalMetrics>,
    pub val_ema: Option<EvalMetrics>,
}

impl TrainProgress {
    /// The schedules' position: consumed samples over the global batch (see [`crate::schedule`]).
    pub fn position(&self, global_batch: u64) -> f64 {
        self.samples_consumed as f64 / global_batch.max(1) as f64
    }

    pub fn is_done(&self, length: TrainLength, epoch_samples: u64) -> bool {
        match length {
            TrainLength::Steps(steps) => self.step >= steps,
            TrainLength::Epochs(epochs) => self.samples_consumed as f64 >= epochs * epoch_samples as f64,
        }
    }
}

impl Stateful for TrainProgress {
    fn save(&self, checkpoint: &mut CheckpointContent) -> Result<()> {
        checkpoint.set("step", self.step)?;
        checkpoint.set("epoch", self.epoch)?;
        checkpoint.set("samples_seen", self.samples_seen)?;
        checkpoint.set("samples_consumed", self.samples_consumed)?;
        checkpoint.set("val", self.val)?;
        checkpoint.set("val_ema", self.val_ema)
    }

    fn load(&mut self, checkpoint: &CheckpointContent) -> Result<()> {
        self.step = checkpoint.get("step")?;
        self.epoch = checkpoint.get("epoch")?;
        self.samples_seen = checkpoint.get("samples_seen")?;
        // Checkpoints from before the clock counted skipped samples: the trained ones.
        self.samples_consumed = checkpoint.get_optional("samples_consumed")?.unwrap_or(self.samples_seen);
        self.val = checkpoint.get_optional("val")?;
        self.val_ema = checkpoint.get_optional("val_ema")?;
        Ok(())
    }
}

/// The progress bar (a terminal) or periodic log lines (anything else).
pub struct Console {
    bar: Option<indicatif::ProgressBar>,
    log_every: u64,
    rank: usize,
}

impl Console {
    pub fn new(show_bar: bool, planned_steps: u64, position: u64, log_every: u64, rank: usize) -> Console {
        let bar = show_bar.then(|| {
            let bar = indicatif::ProgressBar::new(planned_steps);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            ) {
                bar.set_style(style);
            }
            bar.set_position(position);
            bar
        });
        Console { bar, log_every: log_every.max(1), rank }
    }

    pub fn step(&self, step: u64, epoch: u64, loss: f64, lr: f64, images_per_s: f64) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(format!(
                    "epoch {epoch}  loss {loss:.4}  lr {lr:.3e}  {images_per_s:.0} img/s"
                ));
            }
            None if step.is_multiple_of(self.log_every) => {
                tracing::info!(
                    rank = self.rank,
                    step,
                    epoch,
                    loss = format!("{loss:.4}"),
                    lr = format!("{lr:.3e}"),
                    images_per_s = format!("{images_per_s:.1}"),
                    "train"
                );
            }
            None => {}
        }
    }

    pub fn println(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => tracing::info!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_end_on_consumed_samples_and_steps_on_steps() {
        let mut progress = TrainProgress { samples_consumed: 199, step: 13, ..Default::default() };
        assert!(!progress.is_done(TrainLength::Epochs(2.0), 100));
        progress.samples_consumed = 200;
        assert!(progress.is_done(TrainLength::Epochs(2.0), 100));
        assert!(progress.is_done(TrainLength::Epochs(1.5), 100));
        assert!(!progress.is_done(TrainLength::Steps(14), 100));
        assert!(progress.is_done(TrainLength::Steps(13), 100));
        assert_eq!(progress.position(16), 12.5);
    }
}
