//! The job spec tree: one struct per YAML section, with the paper's recipe as the defaults.
//!
//! Every struct denies unknown keys, so a typo is an error rather than a silently ignored
//! setting. Optional settings whose default depends on another setting (the variant, the
//! optimiser) are `Option`s here and resolved by a method of the same name, so the stored spec
//! says what the user wrote and the methods say what the trainer uses.

use std::path::PathBuf;

use effnet_scaling::{CompoundCoefficients, Scaling, compound_scaling, multiplier_scaling};
// The variant, BatchNorm style and classifier init are the model's own types, shared through
// effnet-scaling (re-exported from this crate under the same names), so nothing translates them.
pub use effnet_scaling::{BatchNormStyle, ClassifierInit, Variant};
use serde::{Deserialize, Serialize};

use crate::integers;

/// One training job: what to train, on what data, how, and where to put the results.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Names the job; `[A-Za-z0-9._-]+` so it can be a directory name.
    pub name: String,
    /// What is trained and why, in the job's own words: shown at the head of its report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Where checkpoints and reports go by default; `runs/<name>` when unset.
    #[serde(default)]
    pub job_dir: Option<String>,
    /// Seeds weight init, shuffling and augmentation.
    #[serde(default, deserialize_with = "integers::non_negative_u64")]
    pub seed: u64,
    pub model: ModelConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub training: TrainingConfig,
    #[serde(default)]
    pub distributed: DistributedConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub report: ReportConfig,
}

impl JobSpec {
    /// The job's directory: `job_dir`, or `runs/<name>`.
    pub fn job_dir(&self) -> PathBuf {
        match &self.job_dir {
            Some(dir) => PathBuf::from(dir),
            None => PathBuf::from("runs").join(&self.name),
        }
    }

    /// Where checkpoints go: `checkpoint.url`, or `<job_dir>/checkpoints`.
    /// The fewest workers a generation may run with (`distributed.min_workers`, else all).
    pub fn min_workers(&self) -> u32 {
        self.distributed.min_workers.unwrap_or(self.distributed.workers)
    }

    /// Images per evaluation step on each worker: `eval.batch_size`, else twice
    /// `data.batch_size` (evaluation keeps no activations for backward).
    pub fn eval_batch_size(&self) -> u64 {
        self.eval.batch_size.map_or(2 * u64::from(self.data.batch_size), u64::from)
    }

    pub fn checkpoint_url(&self) -> String {
        match &self.checkpoint.url {
            Some(url) => url.clone(),
            None => self.job_dir().join("checkpoints").display().to_string(),
        }
    }

    /// Where the report goes: `report.out`, or `<job_dir>/report`.
    pub fn report_dir(&self) -> String {
        match &self.report.out {
            Some(out) => out.clone(),
            None => self.job_dir().join("report").display().to_string(),
        }
    }
}

/// A length or interval counted in epochs or in optimiser steps.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Span {
    Epochs(f64),
    Steps(u64),
}

impl Span {
    /// The span in steps. Epochs round to the nearest step, and a non-zero span is never less
    /// than one step, so "every 0.001 epochs" on a small dataset still means something.
    pub fn to_steps(&self, steps_per_epoch: u64) -> u64 {
        match *self {
            Span::Steps(steps) => steps,
            Span::Epochs(epochs) => {
                let steps = epochs * steps_per_epoch as f64;
                if steps <= 0.0 || steps.is_nan() {
                    0
                } else {
                    // `as` saturates, so an absurd epoch count cannot wrap around.
                    (steps.round() as u64).max(1)
                }
            }
        }
    }
}

/// Which network to build. Exactly one of `variant`, `phi`, and the multipliers `width`/`depth`
/// is set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A published variant, b0 … b7.
    pub variant: Option<Variant>,
    /// A custom compound coefficient: depth α^φ, width β^φ, resolution 224·γ^φ.
    pub phi: Option<f64>,
    pub alpha: f64,
    pub beta: f64,
    pub gamma: f64,
    /// A custom member by its multipliers: B0's channels times `width` and repeats times
    /// `depth` (either alone leaves the other at 1), at `resolution` (224 when unset).
    pub width: Option<f64>,
    pub depth: Option<f64>,
    /// Output classes; `None` takes the count from the dataset's manifest.
    #[serde(deserialize_with = "integers::positive_u32_opt")]
    pub classes: Option<u32>,
    /// 3 for RGB, 1 for greyscale datasets such as Fashion-MNIST.
    #[serde(deserialize_with = "integers::positive_u32")]
    pub input_channels: u32,
    #[serde(deserialize_with = "integers::positive_u32_opt")]
    pub resolution: Option<u32>,
    pub dropout: Option<f64>,
    /// BatchNorm epsilon and momentum: torchvision's per-variant choice (B0–B4 eps 1e-5, B5–B7
    /// eps 1e-3 momentum 0.01), the TF reference (eps 1e-3, momentum 0.01 in PyTorch terms), or
    /// PyTorch's defaults (eps 1e-5, momentum 0.1; `timm` is accepted for `pytorch`).
    pub batch_norm: BatchNormStyle,
    /// How the classifier's weights start: `uniform` (±1/sqrt(classes), the paper's and
    /// torchvision's, sized for 1000 classes) or `zero` (every class starts at equal odds;
    /// better for few classes).
    pub classifier_init: ClassifierInit,
    pub drop_path: DropPathConfig,
    /// Normalise with the batch statistics of every rank's samples (SyncBatchNorm; the
    /// paper's TPU reference, timm's `--sync-bn`) instead of each rank's own. Costs two small
    /// all-reduces per BatchNorm layer in forward and two in backward.
    pub sync_batch_norm: bool,
    /// Recompute each MBConv block's activations in backward instead of keeping them (timm's
    /// `--grad-checkpointing`): less memory per sample, about one more forward pass of compute.
    pub activation_checkpointing: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        let paper = CompoundCoefficients::default();
        ModelConfig {
            variant: None,
            phi: None,
            alpha: paper.alpha,
            beta: paper.beta,
            gamma: paper.gamma,
            width: None,
            depth: None,
            classes: None,
            input_channels: 3,
            resolution: None,
            dropout: None,
            batch_norm: BatchNormStyle::Torchvision,
            classifier_init: ClassifierInit::Uniform,
            drop_path: DropPathConfig::default(),
            sync_batch_norm: false,
            activation_checkpointing: false,
        }
    }
}

impl ModelConfig {
    /// The compound-scaling bases α, β, γ.
    pub fn coefficients(&self) -> CompoundCoefficients {
        CompoundCoefficients { alpha: self.alpha, beta: self.beta, gamma: self.gamma }
    }

    /// The network's row of the scaling table (effnet-scaling, the one the model is built
    /// from): the variant's published row, or `compound_scaling(phi, α, β, γ)` for a custom
    /// `phi`. Fails only for a `phi` or coefficient that validation rejects.
    pub fn scaling(&self) -> Result<Scaling, effnet_scaling::Error> {
        match (self.variant, self.phi) {
            (Some(variant), _) => Ok(variant.scaling()),
            (None, Some(phi)) => compound_scaling(phi, self.coefficients()),
            (None, None) if self.width.is_some() || self.depth.is_some() => {
                multiplier_scaling(self.width.unwrap_or(1.0), self.depth.unwrap_or(1.0))
            }
            (None, None) => Ok(Variant::B0.scaling()),
        }
    }

    /// The scaling row of a spec that passed validation. Every `JobSpec` constructor validates,
    /// which rejects the only inputs `scaling()` fails on, so B0's row is a fallback that a
    /// spec built by hand and never validated can reach, not a default.
    fn table_row(&self) -> Scaling {
        self.scaling().unwrap_or_else(|_| Variant::B0.scaling())
    }

    /// Input resolution: as given, else the table's (the variant's, or `224·γ^φ` rounded to a
    /// multiple of 8 for a custom `phi`).
    pub fn resolution(&self) -> u32 {
        self.resolution.unwrap_or_else(|| self.table_row().resolution)
    }

    /// Classifier dropout: as given, else the table's (the variant's, or `0.2 + 0.05·φ` capped
    /// at 0.5 for a custom `phi`).
    pub fn dropout(&self) -> f64 {
        self.dropout.unwrap_or_else(|| self.table_row().dropout)
    }
}

/// Stochastic depth. The rate is the maximum, reached by the last block; block `i` of `n` uses
/// `rate·i/n`. The schedule ramps that maximum up from zero over the start of training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DropPathConfig {
    pub rate: f64,
    pub schedule: DropPathSchedule,
    pub ramp_epochs: Option<f64>,
    #[serde(deserialize_with = "integers::positive_u64_opt")]
    pub ramp_steps: Option<u64>,
}

impl Default for DropPathConfig {
    fn default() -> Self {
        DropPathConfig {
            rate: 0.2,
            schedule: DropPathSchedule::Constant,
            ramp_epochs: None,
            ramp_steps: None,
        }
    }
}

impl DropPathConfig {
    /// The ramp length of a linear schedule; `None` for a constant one.
    pub fn ramp(&self) -> Option<Span> {
        match self.schedule {
            DropPathSchedule::Constant => None,
            DropPathSchedule::Linear => {
                self.ramp_steps.map(Span::Steps).or(self.ramp_epochs.map(Span::Epochs))
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropPathSchedule {
    Constant,
    Linear,
}

/// Where the images come from and how they are turned into batches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training split: an object-store URL (`s3://…`, `file://…`) or a local path.
    pub train: String,
    /// Validation split; no evaluation without it.
    #[serde(default)]
    pub val: Option<String>,
    /// Images per step on each worker (before gradient accumulation).
    #[serde(default = "defaults::batch_size", deserialize_with = "integers::positive_u32")]
    pub batch_size: u32,
    /// Decode and augmentation threads per worker.
    #[serde(default = "defaults::loader_threads", deserialize_with = "integers::positive_u32")]
    pub loader_threads: u32,
    /// Batches decoded ahead of the training step.
    #[serde(default = "defaults::prefetch", deserialize_with = "integers::positive_u32")]
    pub prefetch: u32,
    /// Samples held for shuffling across row groups.
    #[serde(default = "defaults::shuffle_buffer", deserialize_with = "integers::positive_u32")]
    pub shuffle_buffer: u32,
    #[serde(default)]
    pub augmentation: AugmentationConfig,
    /// Evaluation centre-crop fraction: resize to `resolution / eval_crop`, crop `resolution`.
    #[serde(default = "defaults::eval_crop")]
    pub eval_crop: f64,
    #[serde(default = "defaults::normalization")]
    pub normalization: NormalizationKind,
    /// Log the sample keys of the first batches, to check shuffling and resumption.
    #[serde(default)]
    pub log_sample_keys: bool,
    /// Decoded-pixel budget (width × height) per image, checked from the header before decoding;
    /// larger images are skipped as corrupt samples. Unset: the vision crate's default, Pillow's
    /// `MAX_IMAGE_PIXELS` (89,478,485). Not serialised when unset, so the job's settings (and
    /// anything hashed from them) are unchanged for jobs that do not set it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "integers::positive_u64_opt"
    )]
    pub max_image_pixels: Option<u64>,
}

mod defaults {
    use super::NormalizationKind;

    pub fn batch_size() -> u32 {
        64
    }
    pub fn loader_threads() -> u32 {
        2
    }
    pub fn prefetch() -> u32 {
        4
    }
    pub fn shuffle_buffer() -> u32 {
        4096
    }
    pub fn eval_crop() -> f64 {
        0.875
    }
    pub fn normalization() -> NormalizationKind {
        NormalizationKind::Imagenet
    }
}

/// Training-time augmentation (evaluation only resizes, centre-crops and normalises).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentationConfig {
    /// RandomResizedCrop area fraction range.
    pub crop_scale: [f64; 2],
    /// RandomResizedCrop aspect-ratio range.
    pub crop_ratio: [f64; 2],
    /// Horizontal flip probability.
    pub flip: f64,
    /// RandAugment; off when absent.
    pub rand_augment: Option<RandAugmentConfig>,
}

impl Default for AugmentationConfig {
    fn default() -> Self {
        AugmentationConfig {
            crop_scale: [0.08, 1.0],
            crop_ratio: [0.75, 4.0 / 3.0],
            flip: 0.5,
            rand_augment: None,
        }
    }
}

/// RandAugment (Cubuk et al. 2019): `ops` random operations per image at `magnitude` out of 30.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RandAugmentConfig {
    #[serde(deserialize_with = "integers::positive_u32")]
    pub ops: u32,
    pub magnitude: f64,
}

impl Default for RandAugmentConfig {
    fn default() -> Self {
        RandAugmentConfig { ops: 2, magnitude: 9.0 }
    }
}

/// Per-channel mean and standard deviation applied after augmentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormalizationKind {
    Imagenet,
    FashionMnist,
}

/// The optimiser. The defaults are the paper's RMSProp in its TensorFlow form.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    /// Peak learning rate per `reference_batch` images.
    pub lr: f64,
    #[serde(deserialize_with = "integers::positive_u32")]
    pub reference_batch: u32,
    /// Scale `lr` by global batch / `reference_batch` (global batch = batch_size × workers ×
    /// accumulate_steps).
    pub scale_lr: bool,
    pub momentum: f64,
    /// RMSProp's moving-average coefficient (rho).
    pub decay: f64,
    pub eps: Option<f64>,
    /// AdamW's (β1, β2).
    pub betas: [f64; 2],
    /// Nesterov momentum for SGD.
    pub nesterov: bool,
    pub weight_decay: Option<f64>,
    /// Apply weight decay to BatchNorm parameters and biases too.
    pub decay_norm_and_bias: bool,
    pub label_smoothing: f64,
    /// Clip the global gradient norm to this value.
    pub grad_clip_norm: Option<f64>,
    /// Steps whose gradients are summed before one optimiser update.
    #[serde(deserialize_with = "integers::positive_u32")]
    pub accumulate_steps: u32,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            kind: OptimizerKind::RmspropTf,
            lr: 0.016,
            reference_batch: 256,
            scale_lr: true,
            momentum: 0.9,
            decay: 0.9,
            eps: None,
            betas: [0.9, 0.999],
            nesterov: true,
            weight_decay: None,
            decay_norm_and_bias: false,
            label_smoothing: 0.1,
            grad_clip_norm: None,
            accumulate_steps: 1,
        }
    }
}

impl OptimizerConfig {
    /// Epsilon: as given, else 1e-3 for RMSProp-TF (added inside the square root, where it
    /// needs to be large) and 1e-8 for the others.
    pub fn eps(&self) -> f64 {
        self.eps.unwrap_or(match self.kind {
            OptimizerKind::RmspropTf => 1e-3,
            OptimizerKind::Sgd | OptimizerKind::Adamw => 1e-8,
        })
    }

    /// Weight decay: as given, else the paper's 1e-5 (an L2 term for RMSProp and SGD) or 0.05
    /// for AdamW, whose decoupled decay is not scaled by the learning rate's small size.
    pub fn weight_decay(&self) -> f64 {
        self.weight_decay.unwrap_or(match self.kind {
            OptimizerKind::RmspropTf | OptimizerKind::Sgd => 1e-5,
            OptimizerKind::Adamw => 0.05,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    RmspropTf,
    Sgd,
    Adamw,
}

/// The learning-rate schedule after a linear warm-up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    pub kind: ScheduleKind,
    pub warmup_epochs: Option<f64>,
    #[serde(deserialize_with = "integers::non_negative_u64_opt")]
    pub warmup_steps: Option<u64>,
    /// Exponential: multiply by `decay_rate` every `decay_epochs`.
    pub decay_rate: f64,
    pub decay_epochs: f64,
    /// Exponential: decay in steps (TF's staircase) rather than continuously.
    pub staircase: bool,
    /// The learning rate never falls below `min_lr_ratio` × peak.
    pub min_lr_ratio: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            kind: ScheduleKind::Exponential,
            warmup_epochs: None,
            warmup_steps: None,
            decay_rate: 0.97,
            decay_epochs: 2.4,
            staircase: true,
            min_lr_ratio: 0.0,
        }
    }
}

impl ScheduleConfig {
    /// The warm-up length: as given, else the paper's 5 epochs.
    pub fn warmup(&self) -> Span {
        match (self.warmup_epochs, self.warmup_steps) {
            (_, Some(steps)) => Span::Steps(steps),
            (Some(epochs), None) => Span::Epochs(epochs),
            (None, None) => Span::Epochs(5.0),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Exponential,
    Cosine,
    Constant,
}

/// How long to train and how the step runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    pub epochs: Option<f64>,
    #[serde(deserialize_with = "integers::positive_u64_opt")]
    pub steps: Option<u64>,
    pub precision: Precision,
    /// NHWC memory format; `None` lets the trainer choose.
    pub channels_last: Option<bool>,
    pub ema: EmaConfig,
    /// Intra-op threads for the tensor library; `None` leaves its default.
    #[serde(deserialize_with = "integers::positive_u32_opt")]
    pub threads: Option<u32>,
    /// Log metrics every this many steps.
    #[serde(deserialize_with = "integers::positive_u32")]
    pub log_every: u32,
    /// Progress bar; `None` shows it when stderr is a terminal.
    pub progress: Option<bool>,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            epochs: None,
            steps: None,
            precision: Precision::Fp32,
            channels_last: None,
            ema: EmaConfig::default(),
            threads: None,
            log_every: 10,
            progress: None,
        }
    }
}

impl TrainingConfig {
    /// The training length: as given, else the paper's 350 epochs.
    pub fn length(&self) -> Span {
        match (self.epochs, self.steps) {
            (_, Some(steps)) => Span::Steps(steps),
            (Some(epochs), None) => Span::Epochs(epochs),
            (None, None) => Span::Epochs(350.0),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    Bf16,
}

/// An exponential moving average of the weights, evaluated alongside the raw weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmaConfig {
    pub enabled: bool,
    pub decay: f64,
    /// Use `min(decay, (1+t)/(10+t))` early on, so the average is not dominated by the init.
    pub warmup: bool,
}

impl Default for EmaConfig {
    fn default() -> Self {
        EmaConfig { enabled: true, decay: 0.9999, warmup: true }
    }
}

/// Data-parallel training across workers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    #[serde(deserialize_with = "integers::positive_u32")]
    pub workers: u32,
    /// How gradients are all-reduced; `None` lets the trainer choose.
    pub backend: Option<Backend>,
    pub device: Device,
    /// Gradient bucket size for all-reduce, in MiB.
    pub bucket_mb: f64,
    /// The element type gradients are all-reduced in: `f32`, or `bf16` for half the bytes.
    pub gradient_dtype: GradientDtype,
    /// Collective-operation timeout, in seconds.
    pub timeout_s: f64,
    /// All-reduce each gradient bucket as soon as backward has produced it, while backward goes
    /// on with the rest (PyTorch DDP's overlap), instead of all of them after backward.
    pub overlap: bool,
    /// How many times a job may restart (a new generation of workers after a worker died, a
    /// collective failed or a worker went silent) before it fails.
    pub max_restarts: u32,
    /// Elastic jobs: a generation may run with this many workers or more (up to `workers`), as
    /// many as its engine launched, e.g. after a node was lost; `None` is `workers` (not elastic).
    pub min_workers: Option<u32>,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        DistributedConfig {
            workers: 1,
            backend: None,
            device: Device::Cpu,
            bucket_mb: 25.0,
            gradient_dtype: GradientDtype::F32,
            timeout_s: 300.0,
            overlap: true,
            max_restarts: 3,
            min_workers: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GradientDtype {
    F32,
    Bf16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Local,
    Mpi,
    Nccl,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    Cpu,
    Cuda,
}

/// When and where to checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Object-store URL or path; `<job_dir>/checkpoints` when unset.
    pub url: Option<String>,
    #[serde(deserialize_with = "integers::positive_u64_opt")]
    pub every_steps: Option<u64>,
    pub at_epoch_end: bool,
    /// Periodic checkpoints kept (oldest purged first).
    #[serde(deserialize_with = "integers::positive_u32")]
    pub keep_last: u32,
    /// Best-by-validation-accuracy checkpoints kept besides those.
    #[serde(deserialize_with = "integers::non_negative_u32")]
    pub keep_best: u32,
    /// What a failed save does (a full disk, a denied directory, a store that gave up).
    pub on_error: CheckpointOnError,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            url: None,
            every_steps: None,
            at_epoch_end: true,
            keep_last: 3,
            keep_best: 1,
            on_error: CheckpointOnError::Stop,
        }
    }
}

/// What a failed checkpoint save does. Either way the failed checkpoint is never committed (its
/// marker is written last), so the committed ones stay the resume points.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointOnError {
    /// The run stops with the error (a coordinator's engine restarts it from the newest committed
    /// checkpoint): no training goes on that a crash could lose.
    #[default]
    Stop,
    /// The run logs the failure (`checkpoint_failed` in metrics.jsonl, the summary) and trains on;
    /// the next checkpoint tries again.
    Continue,
}

/// Periodic evaluation on `data.val`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    pub every_epochs: Option<f64>,
    #[serde(deserialize_with = "integers::non_negative_u64_opt")]
    pub every_steps: Option<u64>,
    /// Also evaluate the EMA weights.
    pub ema: bool,
    /// Defaults to twice `data.batch_size` ([`JobSpec::eval_batch_size`]).
    #[serde(deserialize_with = "integers::positive_u32_opt")]
    pub batch_size: Option<u32>,
    /// Evaluate on at most this many samples (for quick checks).
    #[serde(deserialize_with = "integers::positive_u64_opt")]
    pub max_samples: Option<u64>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig { every_epochs: None, every_steps: None, ema: true, batch_size: None, max_samples: None }
    }
}

impl EvalConfig {
    /// How often to evaluate: as given, else every epoch. An interval of 0 gives `None`: no
    /// periodic evaluation.
    pub fn interval(&self) -> Option<Span> {
        match (self.every_epochs, self.every_steps) {
            (_, Some(0)) => None,
            (_, Some(steps)) => Some(Span::Steps(steps)),
            (Some(0.0), None) => None,
            (Some(epochs), None) => Some(Span::Epochs(epochs)),
            (None, None) => Some(Span::Epochs(1.0)),
        }
    }
}

/// The end-of-run report (metrics, curves, the resolved spec).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportConfig {
    pub enabled: bool,
    /// Directory or URL; `<job_dir>/report` when unset.
    pub out: Option<String>,
}

impl Default for ReportConfig {
    fn default() -> Self {
        ReportConfig { enabled: true, out: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_resolve_to_the_shared_table() {
        let names: Vec<_> = Variant::ALL.iter().map(|variant| variant.name()).collect();
        assert_eq!(names, ["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7"]);
        for variant in Variant::ALL {
            let model = ModelConfig { variant: Some(variant), ..ModelConfig::default() };
            let row = variant.scaling();
            assert_eq!((model.resolution(), model.dropout()), (row.resolution, row.dropout), "{variant}");
            // The YAML name and the serde name are the same string.
            assert_eq!(serde_json::to_string(&variant).unwrap(), format!("\"{}\"", variant.name()));
        }
        let b3 = ModelConfig { variant: Some(Variant::B3), ..ModelConfig::default() };
        assert_eq!((b3.resolution(), b3.dropout()), (300, 0.3));
    }

    #[test]
    fn custom_phi_resolves_through_compound_scaling() {
        for phi in [-1.0, 0.0, 0.5, 1.0, 2.5, 7.0] {
            let model = ModelConfig { phi: Some(phi), ..ModelConfig::default() };
            let row = compound_scaling(phi, CompoundCoefficients::default()).unwrap();
            assert_eq!((model.resolution(), model.dropout()), (row.resolution, row.dropout), "phi {phi}");
        }
        let given = ModelConfig {
            phi: Some(1.0),
            resolution: Some(64),
            dropout: Some(0.1),
            ..ModelConfig::default()
        };
        assert_eq!((given.resolution(), given.dropout()), (64, 0.1));
    }

    #[test]
    fn enums_serialize_in_snake_case() {
        assert_eq!(serde_json::to_string(&OptimizerKind::RmspropTf).unwrap(), "\"rmsprop_tf\"");
        assert_eq!(serde_json::to_string(&NormalizationKind::FashionMnist).unwrap(), "\"fashion_mnist\"");
        assert_eq!(serde_json::to_string(&Precision::Bf16).unwrap(), "\"bf16\"");
        assert_eq!(serde_json::to_string(&BatchNormStyle::Tf).unwrap(), "\"tf\"");
        assert_eq!(serde_json::to_string(&ClassifierInit::Zero).unwrap(), "\"zero\"");
    }

    #[test]
    fn epochs_round_to_steps_but_never_to_zero() {
        assert_eq!(Span::Epochs(2.4).to_steps(1000), 2400);
        assert_eq!(Span::Epochs(0.5).to_steps(3), 2);
        assert_eq!(Span::Epochs(0.01).to_steps(10), 1);
        assert_eq!(Span::Epochs(0.0).to_steps(10), 0);
        assert_eq!(Span::Epochs(5.0).to_steps(0), 0);
        assert_eq!(Span::Steps(0).to_steps(10), 0);
    }
}
