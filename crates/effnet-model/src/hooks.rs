//! Where a trainer reaches into the forward pass: BatchNorm statistics summed across
//! data-parallel ranks (SyncBatchNorm) and blocks recomputed in backward (activation
//! checkpointing). The model only knows these two traits; the trainer implements them with its
//! collectives and libtorch autograd functions.

use std::sync::Arc;

use tch::{Kind, Tensor};

/// A differentiable sum across the data-parallel ranks.
pub trait CrossReplica: Send + Sync {
    /// Σ over the ranks of `tensor` (the same shape on every rank). Its gradient is the sum over
    /// the ranks of theirs, since every rank's result feeds every rank's loss. Every rank calls
    /// it the same number of times in the same order.
    fn sum(&self, tensor: &Tensor) -> Tensor;
}

/// Which run of a block a recomputed block's closure is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// The forward pass, without recording a graph: BatchNorm updates its running statistics.
    Forward,
    /// The rerun in backward: the same computation, running statistics left alone.
    Recompute,
}

/// A block's computation as a closure of its input, owning (shallow copies of) its tensors.
pub type BlockFn = Box<dyn Fn(&Tensor, Pass) -> Tensor + Send>;

/// Activation checkpointing.
pub trait Recompute: Send + Sync {
    /// `block(input, Pass::Forward)` whose intermediate activations are not kept: backward
    /// reruns `block(input, Pass::Recompute)` with the same random draws and backpropagates
    /// through the rerun.
    fn checkpoint(&self, input: &Tensor, block: BlockFn) -> Tensor;
}

/// The hooks a network runs its training forward pass with (none by default).
#[derive(Clone, Default)]
pub struct ForwardHooks {
    pub cross_replica: Option<Arc<dyn CrossReplica>>,
    pub recompute: Option<Arc<dyn Recompute>>,
}

impl std::fmt::Debug for ForwardHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardHooks")
            .field("sync_batch_norm", &self.cross_replica.is_some())
            .field("activation_checkpointing", &self.recompute.is_some())
            .finish()
    }
}

/// BatchNorm's tensors and settings, shallow copies of a layer's (they share storage and
/// autograd identity with the layer's variables).
pub(crate) struct BatchNormTensors {
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub eps: f64,
    pub momentum: f64,
}

impl BatchNormTensors {
    /// Batch normalisation of `xs` (N, C, H, W). In training, with the batch's statistics (over
    /// every rank's samples when `cross_replica` is given) and, when `update` is true, an update
    /// of the running statistics; at evaluation, with the running statistics.
    pub fn forward(
        &self,
        xs: &Tensor,
        train: bool,
        update: bool,
        cross_replica: Option<&dyn CrossReplica>,
    ) -> Tensor {
        match (train, cross_replica) {
            (true, Some(reducer)) => self.synchronised(xs, update, reducer),
            (true, None) if !update => Tensor::batch_norm(
                xs,
                self.weight.as_ref(),
                self.bias.as_ref(),
                None::<&Tensor>,
                None::<&Tensor>,
                true,
                self.momentum,
                self.eps,
                true,
            ),
            _ => Tensor::batch_norm(
                xs,
                self.weight.as_ref(),
                self.bias.as_ref(),
                Some(&self.running_mean),
                Some(&self.running_var),
                train,
                self.momentum,
                self.eps,
                true,
            ),
        }
    }

    /// SyncBatchNorm: the mean and the (biased) variance of every rank's samples, in float32
    /// and in two passes (the mean first, then the squared deviations from it), as exact as
    /// one rank holding every sample. Both sums are differentiable, so backward carries the
    /// matching reductions across ranks. Nothing is read back to the host (no device sync per
    /// layer on a GPU): when no rank holds a sample the output is empty anyway, and the running
    /// statistics are left as they were.
    fn synchronised(&self, xs: &Tensor, update: bool, reducer: &dyn CrossReplica) -> Tensor {
        let kind = xs.kind();
        let x = xs.to_kind(Kind::Float);
        let channels = x.size()[1];
        let local_count = (x.numel() as i64 / channels.max(1)) as f64;
        let dims = [0i64, 2, 3];
        let sums = Tensor::cat(
            &[
                x.sum_dim_intlist(dims.as_slice(), false, Kind::Float),
                Tensor::from_slice(&[local_count as f32]).to_device(x.device()),
            ],
            0,
        );
        let sums = reducer.sum(&sums);
        let count = sums.narrow(0, channels, 1).detach();
        let divisor = count.clamp_min(1.0);
        let mean = sums.narrow(0, 0, channels) / &divisor;
        let centred = &x - mean.view([1, channels, 1, 1]);
        let variance =
            reducer.sum(&centred.square().sum_dim_intlist(dims.as_slice(), false, Kind::Float)) / &divisor;
        let normalised = centred * (&variance + self.eps).rsqrt().view([1, channels, 1, 1]);
        let scaled = match &self.weight {
            Some(weight) => normalised * weight.to_kind(Kind::Float).view([1, channels, 1, 1]),
            None => normalised,
        };
        let ys = match &self.bias {
            Some(bias) => scaled + bias.to_kind(Kind::Float).view([1, channels, 1, 1]),
            None => scaled,
        };
        if update {
            tch::no_grad(|| {
                // Bessel's correction n/(n-1), 1 for a single value; no update without samples.
                let unbiased = &variance * (&divisor / (&count - 1.0).clamp_min(1.0)).clamp_min(1.0);
                let momentum = count.gt(0.0).to_kind(Kind::Float) * self.momentum;
                let mut running_mean = self.running_mean.shallow_clone();
                let mut running_var = self.running_var.shallow_clone();
                let new_mean = &running_mean + (mean.detach() - &running_mean) * &momentum;
                let new_var = &running_var + (unbiased.detach() - &running_var) * &momentum;
                running_mean.copy_(&new_mean);
                running_var.copy_(&new_var);
            });
        }
        ys.to_kind(kind)
    }
}
