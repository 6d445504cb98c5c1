//! The trainer's side of the model's forward hooks (`effnet_model::hooks`):
//! - [`SyncBatchNorm`]: `model.sync_batch_norm`, BatchNorm statistics summed across ranks through
//!   the step's communication thread, differentiably (the autograd shim's cross-replica sum);
//! - [`Checkpointing`]: `model.activation_checkpointing`, each MBConv block recomputed in backward.

use std::sync::{Arc, Mutex};

use effnet_collective::ReduceOp;
use effnet_model::{CrossReplica, Recompute, hooks::BlockFn};
use tch::Tensor;

use crate::autograd;
use crate::error::{Error, Result};
use crate::sync::CommQueue;

/// SyncBatchNorm's sum across ranks. It works inside [`SyncBatchNorm::attach`] (a step's
/// communication thread); a failure is kept and reported by [`SyncBatchNorm::take_error`], since
/// a forward pass cannot return one.
#[derive(Default)]
pub struct SyncBatchNorm {
    queue: Mutex<Option<CommQueue>>,
    error: Mutex<Option<Error>>,
}

impl SyncBatchNorm {
    pub fn new() -> Arc<SyncBatchNorm> {
        Arc::new(SyncBatchNorm::default())
    }

    /// Reduce through `queue` until the returned guard is dropped.
    pub fn attach(&self, queue: &CommQueue) -> Attached<'_> {
        *lock(&self.queue) = Some(queue.clone());
        Attached(self)
    }

    /// The first failure since the last call.
    pub fn take_error(&self) -> Option<Error> {
        lock(&self.error).take()
    }

    fn fail(&self, error: Error) {
        lock(&self.error).get_or_insert(error);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Detaches the queue when dropped.
pub struct Attached<'a>(&'a SyncBatchNorm);

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        *lock(&self.0.queue) = None;
    }
}

impl CrossReplica for SyncBatchNorm {
    fn sum(&self, tensor: &Tensor) -> Tensor {
        let Some(queue) = lock(&self.queue).clone() else {
            self.fail(Error::Internal("SyncBatchNorm ran outside a training step".into()));
            return tensor.shallow_clone();
        };
        let sum: autograd::Closure = Box::new(move |_, t: &Tensor| {
            let reduced = queue.reduce(t, ReduceOp::Sum)?;
            Ok(reduced.to_device(t.device()))
        });
        match autograd::cross_replica_sum(tensor, sum) {
            Ok(summed) => summed,
            Err(error) => {
                self.fail(error);
                tensor.shallow_clone()
            }
        }
    }
}

/// Activation checkpointing of every MBConv block.
pub struct Checkpointing;

impl Recompute for Checkpointing {
    fn checkpoint(&self, input: &Tensor, block: BlockFn) -> Tensor {
        let closure: autograd::Closure = Box::new(move |phase, x: &Tensor| Ok(block(x, phase.into())));
        // The closure cannot fail; what can is libtorch itself (out of memory), which tch
        // reports by panicking too.
        match autograd::checkpoint(input, closure) {
            Ok(output) => output,
            Err(error) => panic!("activation checkpointing: {error}"),
        }
    }
}

/// Hooks for a network of the job: SyncBatchNorm across `world_size > 1` ranks, and
/// checkpointing.
pub fn forward_hooks(
    spec: &effnet_config::JobSpec,
    world_size: usize,
) -> (effnet_model::ForwardHooks, Option<Arc<SyncBatchNorm>>) {
    let sync = (spec.model.sync_batch_norm && world_size > 1).then(SyncBatchNorm::new);
    let hooks = effnet_model::ForwardHooks {
        cross_replica: sync.clone().map(|s| s as Arc<dyn CrossReplica>),
        recompute: spec.model.activation_checkpointing.then(|| Arc::new(Checkpointing) as Arc<dyn Recompute>),
    };
    (hooks, sync)
}

/// An error of the hooks, or `Ok`.
pub fn check(sync: Option<&SyncBatchNorm>) -> Result<()> {
    match sync.and_then(SyncBatchNorm::take_error) {
        Some(error) => Err(error),
        None => Ok(()),
    }
}
