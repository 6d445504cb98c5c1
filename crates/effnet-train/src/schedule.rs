//! Learning-rate and drop-path schedules as pure functions of the optimiser step, so they need
//! no state in a checkpoint beyond the step itself.

use serde::Serialize;

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
    pub warmup_steps: u64,
    pub decay: Decay,
    pub total_steps: u64,
    /// Floor as a fraction of the peak (cosine's end point; exponential never goes below it).
    pub min_ratio: f64,
}

impl LrSchedule {
    /// The learning rate for optimiser step `step` (0-based: the step about to be taken).
    /// Warm-up rises linearly to reach the peak at its last step: `peak · (step + 1) / warmup`.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let floor = self.peak * self.min_ratio;
        match self.decay {
            Decay::Constant => self.peak,
            Decay::Exponential { rate, every, staircase } => {
                let mut exponent = step as f64 / every;
                if staircase {
                    exponent = exponent.floor();
                }
                (self.peak * rate.powf(exponent)).max(floor)
            }
            Decay::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
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
    /// From 0 at step 0 to the full rate at `steps`, then constant.
    Linear { steps: u64 },
}

impl DropPathRamp {
    pub fn multiplier(&self, step: u64) -> f64 {
        match *self {
            DropPathRamp::Constant => 1.0,
            DropPathRamp::Linear { steps: 0 } => 1.0,
            DropPathRamp::Linear { steps } => (step as f64 / steps as f64).min(1.0),
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
            warmup_steps: 5000,
            decay: Decay::Exponential { rate: 0.97, every: 2400.0, staircase: true },
            total_steps: 350_000,
            min_ratio: 0.0,
        };
        assert!(close(schedule.lr(0), 0.256 / 5000.0));
        assert!(close(schedule.lr(2499), 0.128));
        assert!(close(schedule.lr(4999), 0.256));
        // Step 5000 is past two whole decay periods (4800 steps): 0.256 · 0.97².
        assert!(close(schedule.lr(5000), 0.256 * 0.9409));
        assert!(close(schedule.lr(7199), 0.256 * 0.9409));
        assert!(close(schedule.lr(7200), 0.256 * 0.912673));
        // Smooth decay: half a period in.
        let smooth = LrSchedule {
            decay: Decay::Exponential { rate: 0.97, every: 2400.0, staircase: false },
            ..schedule
        };
        assert!(close(smooth.lr(6000), 0.256 * 0.97f64.powf(2.5)));
    }

    #[test]
    fn cosine_by_hand() {
        let schedule = LrSchedule {
            peak: 1.0,
            warmup_steps: 10,
            decay: Decay::Cosine,
            total_steps: 110,
            min_ratio: 0.1,
        };
        assert!(close(schedule.lr(9), 1.0));
        assert!(close(schedule.lr(10), 1.0));
        assert!(close(schedule.lr(60), 0.55));
        assert!(close(schedule.lr(35), 0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())));
        assert!(close(schedule.lr(110), 0.1));
        assert!(close(schedule.lr(500), 0.1));
    }

    #[test]
    fn no_warmup_and_constant() {
        let schedule = LrSchedule {
            peak: 0.5,
            warmup_steps: 0,
            decay: Decay::Constant,
            total_steps: 10,
            min_ratio: 0.0,
        };
        assert!(close(schedule.lr(0), 0.5));
        assert!(close(schedule.lr(9), 0.5));
    }

    #[test]
    fn drop_path_ramp() {
        let ramp = DropPathRamp::Linear { steps: 400 };
        assert_eq!(ramp.multiplier(0), 0.0);
        assert_eq!(ramp.multiplier(100), 0.25);
        assert_eq!(ramp.multiplier(400), 1.0);
        assert_eq!(ramp.multiplier(4000), 1.0);
        assert_eq!(DropPathRamp::Constant.multiplier(0), 1.0);
    }
}
