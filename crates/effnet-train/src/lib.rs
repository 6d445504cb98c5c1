//! The trainer: EfficientNet trained from a job spec, alone or as one rank of a data-parallel
//! group, with the paper's recipe, exact resume and asynchronous checkpoints to any store.
//!
//! # Layout
//! - [`job`]: the spec validated into a [`RunPlan`] and the parts' inputs (datasets, model
//!   config, transforms, schedules); [`check`] is `effnet run --check`.
//! - [`trainer`]: [`run`]: build the parts, restore them, the loop.
//! - The parts, each owning its state behind [`state::Stateful`]:
//!   [`network`] (the model and its EMA), [`optim`] (RMSProp-TF, SGD, AdamW with named slots),
//!   [`progress`] (step, epoch, consumed samples; the console), [`feed`] (the data: one
//!   epoch's share per rank, exactly once, and its cursor), [`state::RunIdentity`] (seed, spec,
//!   world size).
//! - [`step`]: one optimiser step across ranks; [`schedule`]: learning rate and drop-path ramp
//!   as functions of the position; [`checkpointer`]: the resume point (decided once, by rank 0)
//!   and background saves; [`evaluate`]: top-1/top-5/loss/confusion of a model, the trainer's
//!   evaluations and `effnet eval`.
//! - Below them: [`checkpoint`] (`step-NNNNNNNN/` + `COMMIT` in any store; the libtorch-free `effnet-checkpoint` crate), [`state`]
//!   (`state.json`), [`tensors`] (safetensors, batch tensors), [`amp`] (bf16 autocast and
//!   channels_last through a small C++ shim), [`autograd`] (autograd functions calling back
//!   into Rust, post-accumulate-grad hooks, CUDA memory, from the same shim), [`sync`] (collectives on tensors), [`metrics`]
//!   (the job directory's logs).

pub mod amp;
pub mod autograd;
pub use effnet_checkpoint as checkpoint;
pub mod checkpointer;
pub mod ema;
pub mod error;
pub mod evaluate;
pub mod feed;
pub mod hooks;
pub mod job;
pub mod metrics;
pub mod network;
pub mod optim;
pub mod progress;
pub mod schedule;
pub mod state;
pub mod step;
pub mod sync;
pub mod tensors;
pub mod trainer;

pub use error::{Error, Result};

/// libtorch's global random generator is one per process and unit tests run on parallel
/// threads: a test that seeds it and compares draws holds this lock, and so does every test that
/// draws from it (`Tensor::randn`), so no draw lands between another test's seed and its draws.
#[cfg(test)]
pub(crate) fn global_generator() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
pub use job::{RunPlan, check};
pub use trainer::{Launch, ResumeFrom, RunOptions, RunSummary, run};
