//! Learning-rate and drop-path schedules as pure functions of the training position, so they
//! need no state in a checkpoint beyond the position itself.
//!
//! The position is measured in steps of the job's global batch: samples of the epoch plans
//! consumed so far (trained or skipped as corrupt) divided by the global batch. With full batches
//! it is the step count; the short last step of an epoch advances it by its fraction, and
//! skipped samples count as consumed, so "5 warm-up epochs" or "×0.97 every 2.4 epochs" fall on
//! real epoch boundaries whatever the ranks, batch remainders and corrupt samples did.

use effnet_config::{JobSpec, Span};
use serde::Serialize;

/// A span of the job (`warmup_epochs: 5`, `ramp_steps: 400`) in position units.
pub fn span_steps(span: Span, steps_per_epoch: f64) -> f64 {
    match span {
        Span::Steps(steps) => steps as f64,
        Span::Epochs(epochs) => (epochs * steps_per_epoch).max(0.0),
    }
}

/// How the learning rate moves after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Decay {
    /// Held at the peak.
    Constant,
    /// `peak · rate^(step / every)` counted from step 0 as in TF's EfficientNet (`every` in
    /// steps; `staircase` floors the exponent, so the rate drops in jumps).
    Exponential { rate: f64, every: f64, staircase: bool },
    /// Half a cosine from the peak at the end of warm-up to `min_ratio · peak` at the last step.
    Cosine,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LrSchedule {
    /// The learning rate after warm-up (already scaled by global batch / reference batch).
    pub peak: f64,
    pub warmup_steps: f64,
    pub decay: Decay,
    pub total_steps: f64,
    /// Floor as a fraction of the peak (cosine's end point; exponential never goes below it).
    pub min_ratio: f64,
}

impl LrSchedule {
    /// The job's schedule. `steps_per_epoch` is the epoch's samples over the global batch
    /// (fractional), `total_steps` the training length in the same units.
    pub fn from_config(
        spec: &JobSpec,
        global_batch: u64,
        steps_per_epoch: f64,
        total_steps: f64,
    ) -> LrSchedule {
        let scale = if spec.optimizer.scale_lr {
            global_batch as f64 / spec.optimizer.reference_batch as f64
        } else {
            1.0
        };
        let decay = match spec.schedule.kind {
            effnet_config::ScheduleKind::Constant => Decay::Constant,
            effnet_config::ScheduleKind::Cosine => Decay::Cosine,
            effnet_config::ScheduleKind::Exponential => Decay::Exponential {
                rate: spec.schedule.decay_rate,
                every: (spec.schedule.decay_epochs * steps_per_epoch).max(1.0),
                staircase: spec.schedule.staircase,
            },
        };
        LrSchedule {
            peak: spec.optimizer.lr * scale,
            warmup_steps: span_steps(spec.schedule.warmup(), steps_per_epoch),
            decay,
            total_steps,
            min_ratio: spec.schedule.min_lr_ratio,
        }
    }

    /// The learning rate of the step taken at `position` (0 for the first step). Warm-up rises
    /// linearly to reach the peak at its last step: `peak · (position + 1) / warmup`.
    pub fn lr(&self, position: f64) -> f64 {
        if position < self.warmup_steps {
            return self.peak * ((position + 1.0) / self.warmup_steps).min(1.0);
        }
        let floor = self.peak * self.min_ratio;
        match self.decay {
            Decay::Constant => self.peak,
            Decay::Exponential { rate, every, staircase } => {
                let mut exponent = position / every;
                if staircase {
                    exponent = exponent.floor();
                }
                (self.peak * rate.powf(exponent)).max(floor)
            }
            Decay::Cosine => {
                let span = (self.total_steps - self.warmup_steps).max(1.0);
                let progress = ((position - self.warmup_steps) / span).min(1.0);
                floor + (self.peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

/// The training-time multiplier on every block's drop-path rate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DropPathRamp {
    /// Always the full rate.
    Constant,
    /// From 0 at position 0 to the full rate at `steps`, then constant.
    Linear { steps: f64 },
}

impl DropPathRamp {
    pub fn from_config(spec: &JobSpec, steps_per_epoch: f64) -> DropPathRamp {
        match spec.model.drop_path.ramp() {
            None if spec.model.drop_path.schedule == effnet_config::DropPathSchedule::Constant => {
                DropPathRamp::Constant
            }
            span => DropPathRamp::Linear {
                steps: span.map(|span| span_steps(span, steps_per_epoch)).unwrap_or(0.0),
            },
        }
    }

    pub fn multiplier(&self, position: f64) -> f64 {
        match *self {
            DropPathRamp::Constant => 1.0,
            DropPathRamp::Linear { steps } if steps <= 0.0 => 1.0,
            DropPathRamp::Linear { steps } => (position / steps).min(1.0),
        }
    }
}

/// When something recurs (evaluation): every so many real steps, or every so many epochs of
/// consumed samples (so "every epoch" is every real epoch end).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "unit", content = "every", rename_all = "snake_case")]
pub enum Interval {
    Steps(u64),
    Epochs(f64),
}

impl Interval {
    pub fn from_span(span: Span) -> Interval {
        match span {
            Span::Steps(steps) => Interval::Steps(steps.max(1)),
            Span::Epochs(epochs) => Interval::Epochs(epochs),
        }
    }

    /// True when the step that went from `before` to `after` crossed a multiple of the interval.
    /// Epochs compare in samples (`epoch_samples` per epoch), exact integers in f64.
    pub fn crossed(
        &self,
        step_after: u64,
        consumed_before: u64,
        consumed_after: u64,
        epoch_samples: u64,
    ) -> bool {
        match *self {
            Interval::Steps(every) => step_after.is_multiple_of(every),
            Interval::Epochs(epochs) => {
                let every = (epochs * epoch_samples as f64).max(1.0);
                (consumed_after as f64 / every).floor() > (consumed_before as f64 / every).floor()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn paper_recipe_by_hand() {
        // lr 0.016 per 256 images at global batch 4096 → 0.256; 1000 steps per epoch;
        // 5 warm-up epochs; ×0.97 every 2.4 epochs (staircase).
        let schedule = LrSchedule {
            peak: 0.016 * 4096.0 / 256.0,
            warmup_steps: 5000.0,
            decay: Decay::Exponential { rate: 0.97, every: 2400.0, staircase: true },
            total_steps: 350_000.0,
            min_ratio: 0.0,
        };
        assert!(close(schedule.lr(0.0), 0.256 / 5000.0));
        assert!(close(schedule.lr(2499.0), 0.128));
        assert!(close(schedule.lr(4999.0), 0.256));
        // Step 5000 is past two whole decay periods (4800 steps): 0.256 · 0.97².
        assert!(close(schedule.lr(5000.0), 0.256 * 0.9409));
        assert!(close(schedule.lr(7199.0), 0.256 * 0.9409));
        assert!(close(schedule.lr(7200.0), 0.256 * 0.912673));
        // Smooth decay: half a period in.
        let smooth = LrSchedule {
            decay: Decay::Exponential { rate: 0.97, every: 2400.0, staircase: false },
            ..schedule
        };
        assert!(close(smooth.lr(6000.0), 0.256 * 0.97f64.powf(2.5)));
    }

    #[test]
    fn cosine_by_hand() {
        let schedule = LrSchedule {
            peak: 1.0,
            warmup_steps: 10.0,
            decay: Decay::Cosine,
            total_steps: 110.0,
            min_ratio: 0.1,
        };
        assert!(close(schedule.lr(9.0), 1.0));
        assert!(close(schedule.lr(10.0), 1.0));
        assert!(close(schedule.lr(60.0), 0.55));
        assert!(close(schedule.lr(35.0), 0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())));
        assert!(close(schedule.lr(110.0), 0.1));
        assert!(close(schedule.lr(500.0), 0.1));
    }

    #[test]
    fn no_warmup_and_constant() {
        let schedule = LrSchedule {
            peak: 0.5,
            warmup_steps: 0.0,
            decay: Decay::Constant,
            total_steps: 10.0,
            min_ratio: 0.0,
        };
        assert!(close(schedule.lr(0.0), 0.5));
        assert!(close(schedule.lr(9.0), 0.5));
    }

    #[test]
    fn drop_path_ramp() {
        let ramp = DropPathRamp::Linear { steps: 400.0 };
        assert_eq!(ramp.multiplier(0.0), 0.0);
        assert_eq!(ramp.multiplier(100.0), 0.25);
        assert_eq!(ramp.multiplier(400.0), 1.0);
        assert_eq!(ramp.multiplier(4000.0), 1.0);
        assert_eq!(DropPathRamp::Constant.multiplier(0.0), 1.0);
    }

    #[test]
    fn a_short_last_step_advances_the_position_by_its_fraction() {
        // 100 samples, global batch 16: 6 full steps and one of 4 samples per epoch. Warm-up of
        // one epoch (6.25 positions) ends exactly at the epoch's end, not a step later.
        let schedule = LrSchedule {
            peak: 1.0,
            warmup_steps: 6.25,
            decay: Decay::Constant,
            total_steps: 62.5,
            min_ratio: 0.0,
        };
        assert!(close(schedule.lr(0.0), 1.0 / 6.25));
        assert!(close(schedule.lr(6.0), 1.0), "the short step reaches the peak");
        assert!(close(schedule.lr(6.25), 1.0));
    }

    #[test]
    fn epoch_intervals_fall_on_consumed_samples() {
        let every_epoch = Interval::Epochs(1.0);
        // Epoch of 100 samples: crossed by the step that consumes sample 100, not before.
        assert!(!every_epoch.crossed(6, 80, 96, 100));
        assert!(every_epoch.crossed(7, 96, 100, 100));
        assert!(!every_epoch.crossed(8, 100, 116, 100));
        let half = Interval::Epochs(0.5);
        assert!(half.crossed(4, 48, 64, 100));
        let steps = Interval::Steps(3);
        assert!(steps.crossed(6, 0, 0, 100));
        assert!(!steps.crossed(7, 0, 0, 100));
    }
}
