//! One optimiser step across all ranks: forward and backward of this rank's batches, one
//! all-reduce that agrees on the sample counts and the epoch's end, the gradient sum, and the
//! update of the optimiser and the EMA.
//!
//! Gradients are of the loss *summed* over each rank's samples, summed across ranks and divided
//! by the global sample count: the mean over every sample of the step, whatever each rank held
//! (a short last batch, or none at all once its share of the epoch is used up).

use std::time::Duration;

use effnet_config::JobSpec;
use tch::{Reduction, Tensor};

use crate::error::{Error, Result};
use crate::feed::StepInput;
use crate::network::{Averaged, Network};
use crate::optim::Optimizer;
use crate::sync::DataParallel;
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
}

/// The seed of libtorch's generator (drop path, dropout) for one micro-batch of one step, and
/// (with `step = u64::MAX`) for the initial weights.
pub fn step_seed(seed: u64, step: u64, micro: u64) -> i64 {
    (effnet_data::rng::mix_seed(&[seed, step, micro]) >> 1) as i64
}

impl TrainStep {
    pub fn from_config(spec: &JobSpec, rank: usize) -> TrainStep {
        TrainStep {
            seed: spec.seed,
            rank: rank as u64,
            accumulate: spec.optimizer.accumulate_steps as u64,
            label_smoothing: spec.optimizer.label_smoothing,
            grad_clip_norm: spec.optimizer.grad_clip_norm,
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
        let mut loss_sum = 0.0;
        for (micro, batch) in input.batches.iter().enumerate() {
            // Rank r's micro-batch m is micro-batch r·accumulate + m of the global step: one
            // process accumulating the same batches draws the same drop-path and dropout masks.
            tch::manual_seed(step_seed(self.seed, step, self.rank * self.accumulate + micro as u64));
            let tensors = batch_tensors(batch, network.precision.device)?;
            let logits = network.forward(&tensors.images, true)?;
            let loss = logits.cross_entropy_loss::<Tensor>(
                &tensors.labels,
                None,
                Reduction::Sum,
                -100,
                self.label_smoothing,
            );
            loss.backward();
            loss_sum += loss.double_value(&[]);
        }
        let local_samples = input.samples();
        let mut totals =
            [loss_sum, local_samples as f64, input.skipped.len() as f64, f64::from(input.share_done)];
        let mut comm = Duration::ZERO;
        let ranks = match parallel {
            Some(parallel) => {
                parallel.sum(&mut totals)?;
                if totals[1] > 0.0 {
                    if local_samples == 0 {
                        network.define_gradients();
                    }
                    parallel.sum_gradients(&optimizer.parameters())?;
                }
                comm = parallel.take_comm_time();
                parallel.world_size()
            }
            None => 1,
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
}
