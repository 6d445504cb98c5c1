//! Checks that the types cannot express: ranges, settings that exclude each other, and
//! settings that need another one. Each failure names the field path and is located at the
//! offending value through the [`SourceMap`], or at its section when the value was defaulted.

use effnet_scaling::{MAX_MULTIPLIER, MAX_PHI, MIN_COEFFICIENT, MIN_MULTIPLIER, MIN_PHI};

use crate::error::ConfigError;
use crate::locate::SourceMap;
use crate::spec::{
    AugmentationConfig, Backend, DataConfig, Device, DropPathConfig, DropPathSchedule, JobSpec, ModelConfig,
    OptimizerConfig, ScheduleConfig,
};

type Check = Result<(), ConfigError>;

/// One end of an allowed interval.
#[derive(Clone, Copy)]
enum End {
    Inclusive(f64),
    Exclusive(f64),
    Open,
}

use End::{Exclusive, Inclusive, Open};

struct Checker<'a> {
    map: &'a SourceMap,
    source_name: &'a str,
}

pub(crate) fn validate(spec: &JobSpec, map: &SourceMap, source_name: &str) -> Check {
    let checker = Checker { map, source_name };
    checker.job(spec)?;
    checker.model(&spec.model)?;
    checker.data(&spec.data)?;
    checker.optimizer(&spec.optimizer)?;
    checker.schedule(&spec.schedule)?;
    checker.training(spec)?;
    checker.distributed(spec)?;
    checker.non_empty("checkpoint.url", spec.checkpoint.url.as_deref())?;
    checker.eval(spec)?;
    checker.non_empty("report.out", spec.report.out.as_deref())
}

impl Checker<'_> {
    fn fail(&self, path: &str, message: impl AsRef<str>) -> ConfigError {
        ConfigError::new(self.source_name, self.map.nearest(path), path, message)
    }

    /// `value` must lie between `low` and `high`; NaN never does.
    fn number(&self, path: &str, value: f64, low: End, high: End) -> Check {
        let above = match low {
            Inclusive(bound) => value >= bound,
            Exclusive(bound) => value > bound,
            Open => value > f64::NEG_INFINITY,
        };
        let below = match high {
            Inclusive(bound) => value <= bound,
            Exclusive(bound) => value < bound,
            Open => value < f64::INFINITY,
        };
        if above && below {
            return Ok(());
        }
        let expected = match (low, high) {
            (Inclusive(bound), Open) => format!("a number >= {bound}"),
            (Exclusive(bound), Open) => format!("a number > {bound}"),
            (low, high) => {
                let (open, low) = match low {
                    Inclusive(bound) => ('[', bound.to_string()),
                    Exclusive(bound) => ('(', bound.to_string()),
                    Open => ('(', "-inf".to_owned()),
                };
                let (close, high) = match high {
                    Inclusive(bound) => (']', bound.to_string()),
                    Exclusive(bound) => (')', bound.to_string()),
                    Open => (')', "inf".to_owned()),
                };
                format!("a number in {open}{low}, {high}{close}")
            }
        };
        Err(self.fail(path, format!("invalid value {value}, expected {expected}")))
    }

    fn optional_number(&self, path: &str, value: Option<f64>, low: End, high: End) -> Check {
        value.map_or(Ok(()), |value| self.number(path, value, low, high))
    }

    /// A probability-like rate in [0, 1).
    fn rate(&self, path: &str, value: f64) -> Check {
        self.number(path, value, Inclusive(0.0), Exclusive(1.0))
    }

    fn non_empty(&self, path: &str, value: Option<&str>) -> Check {
        match value {
            Some(value) if value.trim().is_empty() => Err(self.fail(path, "must not be empty")),
            _ => Ok(()),
        }
    }

    fn at_most_one(&self, first: (&str, bool), second: (&str, bool)) -> Check {
        if first.1 && second.1 {
            // Blame the second: it is the one added to a section that already said its piece.
            return Err(self.fail(second.0, format!("set either {} or {}, not both", first.0, second.0)));
        }
        Ok(())
    }

    fn job(&self, spec: &JobSpec) -> Check {
        let name_ok = !spec.name.is_empty()
            && spec.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            && spec.name.chars().any(|c| c != '.');
        if !name_ok {
            return Err(self.fail(
                "name",
                format!(
                    "invalid value {:?}, expected letters, digits, '.', '_' and '-' (it names the job's directory)",
                    spec.name
                ),
            ));
        }
        self.non_empty("job_dir", spec.job_dir.as_deref())
    }

    fn model(&self, model: &ModelConfig) -> Check {
        let multipliers = model.width.is_some() || model.depth.is_some();
        match (model.variant, model.phi, multipliers) {
            (Some(_), Some(_), _) => {
                return Err(self.fail("model.phi", "set either model.variant or model.phi, not both"));
            }
            (Some(_), None, true) | (None, Some(_), true) => {
                let key = if model.width.is_some() { "model.width" } else { "model.depth" };
                return Err(self.fail(
                    key,
                    "the multipliers describe a custom member by themselves: set them without model.variant or model.phi",
                ));
            }
            (None, None, false) => {
                return Err(self.fail(
                    "model.variant",
                    "missing: set model.variant (b0 … b7), model.phi (a custom compound coefficient) or model.width/model.depth (custom multipliers)",
                ));
            }
            _ => {}
        }
        self.optional_number(
            "model.width",
            model.width,
            Inclusive(MIN_MULTIPLIER),
            Inclusive(MAX_MULTIPLIER),
        )?;
        self.optional_number(
            "model.depth",
            model.depth,
            Inclusive(MIN_MULTIPLIER),
            Inclusive(MAX_MULTIPLIER),
        )?;
        // The ranges are effnet-scaling's, the ones the model is built with: phi in [-4, 16]
        // (negative phi shrinks B0), and the paper's α, β, γ >= 1.
        self.optional_number("model.phi", model.phi, Inclusive(MIN_PHI), Inclusive(MAX_PHI))?;
        self.number("model.alpha", model.alpha, Inclusive(MIN_COEFFICIENT), Open)?;
        self.number("model.beta", model.beta, Inclusive(MIN_COEFFICIENT), Open)?;
        self.number("model.gamma", model.gamma, Inclusive(MIN_COEFFICIENT), Open)?;
        if let Err(error) = model.scaling() {
            // Unreachable while the checks above mirror effnet-scaling's; kept so that a rule
            // added there is still reported against the job file.
            return Err(self.fail("model", error.to_string()));
        }
        if !matches!(model.input_channels, 1 | 3) {
            return Err(self.fail(
                "model.input_channels",
                format!("invalid value {}, expected 1 (greyscale) or 3 (RGB)", model.input_channels),
            ));
        }
        self.optional_number("model.dropout", model.dropout, Inclusive(0.0), Exclusive(1.0))?;
        self.drop_path(&model.drop_path)
    }

    fn drop_path(&self, drop_path: &DropPathConfig) -> Check {
        self.rate("model.drop_path.rate", drop_path.rate)?;
        let epochs = ("model.drop_path.ramp_epochs", drop_path.ramp_epochs.is_some());
        let steps = ("model.drop_path.ramp_steps", drop_path.ramp_steps.is_some());
        match drop_path.schedule {
            DropPathSchedule::Constant => {
                if let Some((path, _)) = [epochs, steps].into_iter().find(|(_, set)| *set) {
                    return Err(self.fail(path, "only used with model.drop_path.schedule: linear"));
                }
                Ok(())
            }
            DropPathSchedule::Linear => {
                self.at_most_one(epochs, steps)?;
                if !epochs.1 && !steps.1 {
                    return Err(self.fail(
                        "model.drop_path.schedule",
                        "linear needs model.drop_path.ramp_epochs or model.drop_path.ramp_steps",
                    ));
                }
                self.optional_number(epochs.0, drop_path.ramp_epochs, Exclusive(0.0), Open)
            }
        }
    }

    fn data(&self, data: &DataConfig) -> Check {
        self.non_empty("data.train", Some(&data.train))?;
        self.non_empty("data.val", data.val.as_deref())?;
        self.augmentation(&data.augmentation)?;
        self.number("data.eval_crop", data.eval_crop, Exclusive(0.0), Inclusive(1.0))
    }

    fn augmentation(&self, augmentation: &AugmentationConfig) -> Check {
        let [low, high] = augmentation.crop_scale;
        self.number("data.augmentation.crop_scale[0]", low, Exclusive(0.0), Inclusive(1.0))?;
        self.number("data.augmentation.crop_scale[1]", high, Inclusive(low), Inclusive(1.0))?;
        let [low, high] = augmentation.crop_ratio;
        self.number("data.augmentation.crop_ratio[0]", low, Exclusive(0.0), Open)?;
        self.number("data.augmentation.crop_ratio[1]", high, Inclusive(low), Open)?;
        self.number("data.augmentation.flip", augmentation.flip, Inclusive(0.0), Inclusive(1.0))?;
        if let Some(rand_augment) = &augmentation.rand_augment {
            // Magnitudes are on RandAugment's 0–30 scale.
            let path = "data.augmentation.rand_augment.magnitude";
            self.number(path, rand_augment.magnitude, Inclusive(0.0), Inclusive(30.0))?;
        }
        Ok(())
    }

    fn optimizer(&self, optimizer: &OptimizerConfig) -> Check {
        self.number("optimizer.lr", optimizer.lr, Exclusive(0.0), Open)?;
        self.rate("optimizer.momentum", optimizer.momentum)?;
        self.rate("optimizer.decay", optimizer.decay)?;
        self.optional_number("optimizer.eps", optimizer.eps, Exclusive(0.0), Open)?;
        self.rate("optimizer.betas[0]", optimizer.betas[0])?;
        self.rate("optimizer.betas[1]", optimizer.betas[1])?;
        self.optional_number("optimizer.weight_decay", optimizer.weight_decay, Inclusive(0.0), Open)?;
        self.rate("optimizer.label_smoothing", optimizer.label_smoothing)?;
        self.optional_number("optimizer.grad_clip_norm", optimizer.grad_clip_norm, Exclusive(0.0), Open)
    }

    fn schedule(&self, schedule: &ScheduleConfig) -> Check {
        self.at_most_one(
            ("schedule.warmup_epochs", schedule.warmup_epochs.is_some()),
            ("schedule.warmup_steps", schedule.warmup_steps.is_some()),
        )?;
        self.optional_number("schedule.warmup_epochs", schedule.warmup_epochs, Inclusive(0.0), Open)?;
        self.number("schedule.decay_rate", schedule.decay_rate, Exclusive(0.0), Inclusive(1.0))?;
        self.number("schedule.decay_epochs", schedule.decay_epochs, Exclusive(0.0), Open)?;
        self.number("schedule.min_lr_ratio", schedule.min_lr_ratio, Inclusive(0.0), Inclusive(1.0))
    }

    fn training(&self, spec: &JobSpec) -> Check {
        let training = &spec.training;
        self.at_most_one(
            ("training.epochs", training.epochs.is_some()),
            ("training.steps", training.steps.is_some()),
        )?;
        self.optional_number("training.epochs", training.epochs, Exclusive(0.0), Open)?;
        self.number("training.ema.decay", training.ema.decay, Exclusive(0.0), Exclusive(1.0))
    }

    fn distributed(&self, spec: &JobSpec) -> Check {
        let distributed = &spec.distributed;
        if distributed.backend == Some(Backend::Nccl) && distributed.device != Device::Cuda {
            return Err(self.fail("distributed.backend", "nccl needs distributed.device: cuda"));
        }
        if let Some(min) = distributed.min_workers
            && !(1..=distributed.workers).contains(&min)
        {
            return Err(self.fail(
                "distributed.min_workers",
                format!("must be from 1 to distributed.workers ({}), got {min}", distributed.workers),
            ));
        }
        self.number("distributed.bucket_mb", distributed.bucket_mb, Exclusive(0.0), Open)?;
        self.number("distributed.timeout_s", distributed.timeout_s, Exclusive(0.0), Open)
    }

    fn eval(&self, spec: &JobSpec) -> Check {
        let eval = &spec.eval;
        self.at_most_one(
            ("eval.every_epochs", eval.every_epochs.is_some()),
            ("eval.every_steps", eval.every_steps.is_some()),
        )?;
        self.optional_number("eval.every_epochs", eval.every_epochs, Inclusive(0.0), Open)
    }
}
