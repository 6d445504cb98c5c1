//! The trainer: one process training EfficientNet from a job spec, with the paper's recipe,
//! exact resume and asynchronous checkpoints to any store.
//!
//! # Layout
//! - [`trainer`]: [`trainer::run`] (prepare, restore, the loop) and [`trainer::check`].
//! - [`feed`]: the data feed (read → decode → augment on the I/O runtime), cursor per batch.
//! - [`optim`]: RMSProp-TF, SGD (Nesterov) and AdamW with named, checkpointable state.
//! - [`schedule`]: learning rate (warm-up, exponential, cosine) and the drop-path ramp.
//! - [`ema`]: the weight average, kept in a second model.
//! - [`evaluate`]: top-1/top-5/loss and the confusion matrix of a model on a dataset.
//! - [`checkpoint`]: `step-NNNNNNNN/` directories with a `COMMIT` marker; keep last/best k.
//! - [`tensors`]: named tensors to and from safetensors bytes.
//! - [`amp`]: bf16 autocast and channels_last through a small C++ shim (tch has neither).
//! - [`metrics`]: `metrics.jsonl` / `samples.jsonl` in the job directory.
//! - [`sync`]: data-parallel synchronisation (broadcast, bucketed gradient all-reduce, BatchNorm
//!   statistics) over an `effnet-collective` backend.

pub mod amp;
pub mod checkpoint;
pub mod ema;
pub mod error;
pub mod evaluate;
pub mod feed;
pub mod metrics;
pub mod optim;
pub mod schedule;
pub mod sync;
pub mod tensors;
pub mod trainer;

pub use error::{Error, Result};
pub use trainer::{Launch, ResumeFrom, RunOptions, RunPlan, RunSummary, check, run};
