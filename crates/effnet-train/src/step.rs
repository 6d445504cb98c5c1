//! One optimiser step across all ranks: forward and backward of this rank's batches, one
//! all-reduce that agrees on the sample counts and the epoch's end, the gradient sum, and the
//! update of the optimiser and the EMA.
//!
//! Gradients are of the loss *summed* over each rank's samples, summed across ranks and divided
//! by the global sample count: the mean over every sample of the step, whatever each rank held
//! (a short last batch, or none at all once its share of the epoch is used up).
//!
//! With several ranks, forward and backward may run beside a communication thread
//! ([`DataParallel::with_comm_thread`]): SyncBatchNorm's sums go through it, and with
//! `distributed.overlap` the gradient buckets are all-reduced there as backward completes them
//! ([`OverlappedSum`]), before the step's small all-reduce of counts.

use effnet_store::faults::{Phase, point as fault_point};
use std::sync::Arc;
use std::time::Duration;

use effnet_config::JobSpec;
use effnet_vision::BatchParts;
use tch::{Kind, Reduction, Tensor};

use crate::autograd;
use crate::error::{Error, Result};
use crate::feed::StepInput;
use crate::hooks::SyncBatchNorm;
use crate::network::{Averaged, Network};
use crate::optim::Optimizer;
use crate::sync::{Buckets, DataParallel, OverlappedSum};
use crate::tensors::batch_tensors;

/// What a step did, summed over the ranks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutcome {
    /// Samples trained (all ranks); 0 when every rank's batches were empty (no update was made).
    pub samples: u64,
    /// Samples skipped as unusable in this step's reads (all ranks).
    pub skipped: u64,
    /// Every rank has now consumed its share of the epoch.
    pub epoch_ends: bool,
    /// Mean loss over the step's samples.
    pub loss: f64,
    /// This rank's samples.
    pub local_samples: u64,
    pub comm: Duration,
}

/// The per-step settings of the job.
pub struct TrainStep {
    pub seed: u64,
    pub rank: u64,
    pub accumulate: u64,
    pub label_smoothing: f64,
    pub grad_clip_norm: Option<f64>,
    /// `[channels, height, width]` of one input image (the shape of an empty micro-batch).
    pub input_shape: [i64; 3],
    /// The gradient buckets of the all-reduce (several ranks).
    pub buckets: Option<Buckets>,
    /// All-reduce the buckets while backward runs (`distributed.overlap`), not after it.
    pub overlap: bool,
    /// SyncBatchNorm's link to the step's communication thread (`model.sync_batch_norm`, several
    /// ranks). Every rank then runs `accumulate` forward passes per step, empty ones included,
    /// so the ranks' statistics sums pair up.
    pub sync_batch_norm: Option<Arc<SyncBatchNorm>>,
}

/// The seed of libtorch's generator (drop path, dropout) for one micro-batch of one step, and
/// (with `step = u64::MAX`) for the initial weights.
pub fn step_seed(seed: u64, step: u64, micro: u64) -> i64 {
    (effnet_data::rng::mix_seed(&[seed, step, micro]) >> 1) as i64
}

impl TrainStep {
    pub fn from_config(spec: &JobSpec, rank: usize, input_shape: [i64; 3]) -> TrainStep {
        TrainStep {
            seed: spec.seed,
            rank: rank as u64,
            accumulate: spec.optimizer.accumulate_steps as u64,
            label_smoothing: spec.optimizer.label_smoothing,
            grad_clip_norm: spec.optimizer.grad_clip_norm,
            input_shape,
            buckets: None,
            overlap: spec.distributed.overlap,
            sync_batch_norm: None,
        }
    }

    /// Train step number `step` on this rank's `input` with learning rate `lr`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        step: u64,
        input: &StepInput,
        lr: f64,
        network: &Network,
        optimizer: &mut Optimizer,
        averaged: Option<&mut Averaged>,
        parallel: Option<&mut DataParallel>,
    ) -> Result<StepOutcome> {
        let local_samples = input.samples();
        let parameters = optimizer.parameters();
        let mut comm = Duration::ZERO;
        let (totals, ranks) = match parallel {
            Some(parallel) => {
                let buckets = self
                    .buckets
                    .as_ref()
                    .ok_or_else(|| Error::Internal("a data-parallel step without gradient buckets".into()))?;
                let overlap = self.overlap.then_some(buckets);
                let loss_sum = if overlap.is_some() || self.sync_batch_norm.is_some() {
                    parallel.with_comm_thread(|queue| -> Result<f64> {
                        let _attached = self.sync_batch_norm.as_ref().map(|sync| sync.attach(queue));
                        let summed = overlap.map(|b| OverlappedSum::new(queue, &parameters, b));
                        let loss_sum =
                            self.forward_backward(step, input, network, &parameters, summed.as_ref())?;
                        if let Some(summed) = summed {
                            if local_samples == 0 {
                                network.define_gradients();
                            }
                            summed.finish()?;
                        }
                        Ok(loss_sum)
                    })?
                } else {
                    self.forward_backward(step, input, network, &parameters, None)?
                };
                let mut totals =
                    [loss_sum, local_samples as f64, input.skipped.len() as f64, f64::from(input.share_done)];
                fault_point(Phase::AllReduce, step + 1, Some(self.rank as usize));
                parallel.sum(&mut totals)?;
                if totals[1] > 0.0 && overlap.is_none() {
                    if local_samples == 0 {
                        network.define_gradients();
                    }
                    parallel.sum_gradients(&parameters, buckets)?;
                }
                comm = parallel.take_comm_time();
                (totals, parallel.world_size())
            }
            None => {
                let loss_sum = self.forward_backward(step, input, network, &parameters, None)?;
                ([loss_sum, local_samples as f64, input.skipped.len() as f64, f64::from(input.share_done)], 1)
            }
        };
        let [loss_total, samples, skipped, done] = totals;
        let outcome = StepOutcome {
            samples: samples as u64,
            skipped: skipped as u64,
            epoch_ends: done as usize == ranks,
            loss: if samples > 0.0 { loss_total / samples } else { 0.0 },
            local_samples,
            comm,
        };
        if outcome.samples == 0 {
            optimizer.zero_grad();
            return Ok(outcome);
        }
        optimizer.scale_grads(1.0 / samples);
        if let Some(max_norm) = self.grad_clip_norm {
            optimizer.clip_grad_norm(max_norm);
        }
        optimizer.step(lr);
        optimizer.zero_grad();
        if let Some(averaged) = averaged {
            averaged.ema.update();
        }
        if !outcome.loss.is_finite() {
            return Err(Error::Internal(format!(
                "the loss became {} at step {}; lower optimizer.lr or set optimizer.grad_clip_norm",
                outcome.loss,
                step + 1
            )));
        }
        Ok(outcome)
    }

    /// Forward and backward of this rank's micro-batches; the summed loss. With `overlap`, the
    /// last backward reports each finished gradient to it.
    fn forward_backward(
        &self,
        step: u64,
        input: &StepInput,
        network: &Network,
        parameters: &[(String, Tensor)],
        overlap: Option<&OverlappedSum<'_>>,
    ) -> Result<f64> {
        let device = network.precision.device;
        let mut micro_batches: Vec<Option<&BatchParts>> = input.batches.iter().map(Some).collect();
        if self.sync_batch_norm.is_some() {
            micro_batches.resize(self.accumulate.max(micro_batches.len() as u64) as usize, None);
        }
        let last = micro_batches.len().saturating_sub(1);
        let mut loss_sum = 0.0;
        for (micro, batch) in micro_batches.into_iter().enumerate() {
            // Rank r's micro-batch m is micro-batch r·accumulate + m of the global step: one
            // process accumulating the same batches draws the same drop-path and dropout masks.
            tch::manual_seed(step_seed(self.seed, step, self.rank * self.accumulate + micro as u64));
            let tensors = batch.map(|b| batch_tensors(b, device)).transpose()?;
            let empty;
            let (images, labels) = match &tensors {
                Some(t) => (&t.images, &t.labels),
                None => {
                    let [c, h, w] = self.input_shape;
                    empty = (
                        Tensor::zeros([0, c, h, w], (Kind::Float, device)),
                        Tensor::zeros([0], (Kind::Int64, device)),
                    );
                    (&empty.0, &empty.1)
                }
            };
            if micro == 0 {
                fault_point(Phase::Forward, step + 1, Some(self.rank as usize));
            }
            let logits = network.forward(images, true)?;
            crate::hooks::check(self.sync_batch_norm.as_deref())?;
            let loss =
                logits.cross_entropy_loss::<Tensor>(labels, None, Reduction::Sum, -100, self.label_smoothing);
            if micro == last {
                fault_point(Phase::Backward, step + 1, Some(self.rank as usize));
            }
            match overlap {
                Some(summed) if micro == last => {
                    let trainable: Vec<&Tensor> = parameters.iter().map(|(_, t)| t).collect();
                    let hook = |index: usize| summed.ready(index);
                    autograd::with_post_accumulate_hooks(&trainable, &hook, || loss.f_backward())??;
                }
                _ => loss.f_backward()?,
            }
            crate::hooks::check(self.sync_batch_norm.as_deref())?;
            loss_sum += loss.double_value(&[]);
        }
        Ok(loss_sum)
    }
}
