//! Optimisers written out on tensors: RMSProp in TensorFlow's form (the paper's), SGD with
//! Nesterov momentum, and AdamW.
//!
//! tch's own optimisers keep their state inside libtorch where it cannot be checkpointed, and its
//! RMSProp puts epsilon outside the square root. Here every slot is a named tensor
//! (`<parameter>/<slot>`), so a checkpoint holds the exact state and a resume continues bitwise.
//!
//! The update rules, per parameter `p` with gradient `g` and learning rate `lr`:
//!
//! - **RMSProp-TF** (timm's `RMSpropTF`, TF's `RMSPropOptimizer`): `g ← g + wd·p`;
//!   `v ← ρ·v + (1−ρ)·g²` with `v` starting at **1**; `m ← μ·m + lr·g / √(v + ε)`; `p ← p − m`.
//!   Epsilon sits inside the square root and the learning rate inside the momentum, as in TF.
//! - **SGD** (PyTorch's): `g ← g + wd·p`; `b ← μ·b + g`; Nesterov: `g ← g + μ·b`, else `g ← b`;
//!   `p ← p − lr·g`.
//! - **AdamW** (PyTorch's, decoupled decay): `p ← p·(1 − lr·wd)`; `m ← β₁m + (1−β₁)g`;
//!   `v ← β₂v + (1−β₂)g²`; `p ← p − lr·(m / (1−β₁ᵗ)) / (√(v / (1−β₂ᵗ)) + ε)`.
//!
//! Weight decay skips one-dimensional tensors (BatchNorm scales and shifts, biases) unless
//! `decay_norm_and_bias` is set, as in the reference implementations.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OptimizerRule {
    RmspropTf { decay: f64, momentum: f64, eps: f64 },
    Sgd { momentum: f64, nesterov: bool },
    Adamw { beta1: f64, beta2: f64, eps: f64 },
}

impl OptimizerRule {
    fn slots(&self) -> &'static [&'static str] {
        match self {
            OptimizerRule::RmspropTf { .. } => &["square_avg", "momentum_buffer"],
            OptimizerRule::Sgd { .. } => &["momentum_buffer"],
            OptimizerRule::Adamw { .. } => &["exp_avg", "exp_avg_sq"],
        }
    }

    pub fn from_config(config: &effnet_config::OptimizerConfig) -> OptimizerRule {
        use effnet_config::OptimizerKind;
        match config.kind {
            OptimizerKind::RmspropTf => {
                OptimizerRule::RmspropTf { decay: config.decay, momentum: config.momentum, eps: config.eps() }
            }
            OptimizerKind::Sgd => OptimizerRule::Sgd { momentum: config.momentum, nesterov: config.nesterov },
            OptimizerKind::Adamw => {
                OptimizerRule::Adamw { beta1: config.betas[0], beta2: config.betas[1], eps: config.eps() }
            }
        }
    }
}

struct Param {
    name: String,
    tensor: Tensor,
    weight_decay: f64,
    slots: Vec<Tensor>,
}

/// An optimiser over named parameters with checkpointable state.
pub struct Optimizer {
    rule: OptimizerRule,
    params: Vec<Param>,
    /// Optimiser steps taken (AdamW's bias correction uses it).
    steps: u64,
}

impl Optimizer {
    /// `params` are the trainable tensors with their names; their order fixes the update order.
    pub fn new(
        rule: OptimizerRule,
        params: Vec<(String, Tensor)>,
        weight_decay: f64,
        decay_norm_and_bias: bool,
    ) -> Optimizer {
        let params = params
            .into_iter()
            .map(|(name, tensor)| {
                let decays = decay_norm_and_bias || tensor.dim() > 1;
                let slots = rule
                    .slots()
                    .iter()
                    .map(|slot| match (rule, *slot) {
                        // TF initialises the mean square to one, so the first steps are not huge.
                        (OptimizerRule::RmspropTf { .. }, "square_avg") => tensor.ones_like().detach(),
                        _ => tensor.zeros_like().detach(),
                    })
                    .collect();
                Param { name, tensor, weight_decay: if decays { weight_decay } else { 0.0 }, slots }
            })
            .collect();
        Optimizer { rule, params, steps: 0 }
    }

    pub fn rule(&self) -> OptimizerRule {
        self.rule
    }

    /// The parameters it updates, in update order (shallow handles to the same tensors).
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|p| (p.name.clone(), p.tensor.shallow_clone())).collect()
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Names of the parameters that get weight decay.
    pub fn decayed(&self) -> Vec<&str> {
        self.params.iter().filter(|p| p.weight_decay > 0.0).map(|p| p.name.as_str()).collect()
    }

    pub fn zero_grad(&mut self) {
        for param in &mut self.params {
            let mut grad = param.tensor.grad();
            if grad.defined() {
                let _ = grad.detach_();
                let _ = grad.zero_();
            }
        }
    }

    /// Multiply every gradient by `factor` (gradient accumulation, averaging across ranks).
    pub fn scale_grads(&mut self, factor: f64) {
        tch::no_grad(|| {
            for param in &self.params {
                let mut grad = param.tensor.grad();
                if grad.defined() {
                    let _ = grad.g_mul_scalar_(factor);
                }
            }
        });
    }

    /// The global L2 norm of all gradients.
    pub fn grad_norm(&self) -> f64 {
        tch::no_grad(|| {
            let mut total = 0.0f64;
            for param in &self.params {
                let grad = param.tensor.grad();
                if grad.defined() {
                    let norm = grad.to_kind(tch::Kind::Double).norm().double_value(&[]);
                    total += norm * norm;
                }
            }
            total.sqrt()
        })
    }

    /// Scale gradients so their global norm is at most `max_norm` (PyTorch's `clip_grad_norm_`);
    /// returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.grad_norm();
        let factor = max_norm / (norm + 1e-6);
        if factor < 1.0 {
            self.scale_grads(factor);
        }
        norm
    }

    /// One update with learning rate `lr`. Parameters without a gradient are left alone.
    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let steps = self.steps;
        let rule = self.rule;
        tch::no_grad(|| {
            for param in &mut self.params {
                let grad = param.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                update(rule, steps, lr, param, grad);
            }
        });
    }

    /// The state as named tensors: `<parameter>/<slot>`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let slots = self.rule.slots();
        let mut out = Vec::new();
        for param in &self.params {
            for (slot, tensor) in slots.iter().zip(&param.slots) {
                out.push((format!("{}/{slot}", param.name), tensor.shallow_clone()));
            }
        }
        out
    }

    /// Restore the state written by [`Optimizer::state_tensors`]; every slot must be present
    /// with the right shape, and nothing changes unless all are.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>, steps: u64) -> Result<()> {
        let slots = self.rule.slots();
        for param in &self.params {
            for (slot, tensor) in slots.iter().zip(&param.slots) {
                let key = format!("{}/{slot}", param.name);
                let found = tensors
                    .get(&key)
                    .ok_or_else(|| Error::Internal(format!("optimizer state lacks {key}")))?;
                if found.size() != tensor.size() {
                    return Err(Error::Internal(format!(
                        "optimizer state {key} has shape {:?}, the parameter {:?}",
                        found.size(),
                        tensor.size()
                    )));
                }
            }
        }
        let expected: usize = self.params.len() * slots.len();
        if tensors.len() != expected {
            return Err(Error::Internal(format!(
                "optimizer state has {} tensors, this optimizer {expected}",
                tensors.len()
            )));
        }
        tch::no_grad(|| -> Result<()> {
            for param in &mut self.params {
                for (slot, tensor) in slots.iter().zip(param.slots.iter_mut()) {
                    let key = format!("{}/{slot}", param.name);
                    let source = tensors.remove(&key).expect("checked above");
                    tensor.f_copy_(&source.to_kind(tensor.kind()).to_device(tensor.device()))?;
                }
            }
            Ok(())
        })?;
        self.steps = steps;
        Ok(())
    }
}

fn update(rule: OptimizerRule, steps: u64, lr: f64, param: &mut Param, grad: Tensor) {
    let wd = param.weight_decay;
    match rule {
        OptimizerRule::RmspropTf { decay, momentum, eps } => {
            let grad = if wd > 0.0 { grad + &param.tensor * wd } else { grad };
            let (square_avg, rest) = param.slots.split_first_mut().expect("two slots");
            let momentum_buffer = &mut rest[0];
            let delta = (&grad * &grad - &*square_avg) * (1.0 - decay);
            let _ = square_avg.f_add_(&delta);
            let scaled = &grad / (&*square_avg + eps).sqrt() * lr;
            let _ = momentum_buffer.g_mul_scalar_(momentum);
            let _ = momentum_buffer.f_add_(&scaled);
            let _ = param.tensor.f_sub_(momentum_buffer);
        }
        OptimizerRule::Sgd { momentum, nesterov } => {
            let grad = if wd > 0.0 { grad + &param.tensor * wd } else { grad };
            let buffer = &mut param.slots[0];
            let _ = buffer.g_mul_scalar_(momentum);
            let _ = buffer.f_add_(&grad);
            let direction = if nesterov { grad + &*buffer * momentum } else { buffer.shallow_clone() };
            let _ = param.tensor.f_sub_(&(direction * lr));
        }
        OptimizerRule::Adamw { beta1, beta2, eps } => {
            if wd > 0.0 {
                let _ = param.tensor.g_mul_scalar_(1.0 - lr * wd);
            }
            let (exp_avg, rest) = param.slots.split_first_mut().expect("two slots");
            let exp_avg_sq = &mut rest[0];
            let _ = exp_avg.g_mul_scalar_(beta1);
            let _ = exp_avg.f_add_(&(&grad * (1.0 - beta1)));
            let _ = exp_avg_sq.g_mul_scalar_(beta2);
            let _ = exp_avg_sq.f_add_(&(&grad * &grad * (1.0 - beta2)));
            let correction1 = 1.0 - beta1.powi(steps as i32);
            let correction2 = 1.0 - beta2.powi(steps as i32);
            let denominator = (&*exp_avg_sq / correction2).sqrt() + eps;
            let _ = param.tensor.f_sub_(&(&*exp_avg / &denominator * (lr / correction1)));
        }
    }
}

impl crate::state::Stateful for Optimizer {
    fn save(&self, checkpoint: &mut crate::state::CheckpointContent) -> Result<()> {
        checkpoint.set("optimizer_steps", self.steps)?;
        checkpoint.put_file(
            crate::checkpoint::OPTIMIZER_FILE,
            crate::tensors::to_safetensors(&self.state_tensors())?,
        );
        Ok(())
    }

    fn load(&mut self, checkpoint: &crate::state::CheckpointContent) -> Result<()> {
        let url = checkpoint.url.clone();
        let steps: u64 = checkpoint.get("optimizer_steps")?;
        let slots = crate::tensors::from_safetensors(checkpoint.file(crate::checkpoint::OPTIMIZER_FILE)?)
            .map_err(|reason| Error::BadCheckpoint { url: url.clone(), reason })?;
        self.load_state(slots, steps)
            .map_err(|e| Error::IncompatibleCheckpoint { url, reason: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// One scalar parameter with gradient `c·p` each step (loss ½·c·p²).
    fn run(rule: OptimizerRule, wd: f64, lrs: &[f64], c: f64) -> Vec<f64> {
        let p = Tensor::from_slice(&[1.0f64]).set_requires_grad(true);
        let mut optimizer = Optimizer::new(rule, vec![("w".into(), p.shallow_clone())], wd, true);
        let mut values = Vec::new();
        for &lr in lrs {
            optimizer.zero_grad();
            let loss = (&p * &p * (0.5 * c)).sum(Kind::Double);
            loss.backward();
            optimizer.step(lr);
            values.push(p.double_value(&[0]));
        }
        values
    }

    #[test]
    fn rmsprop_tf_matches_hand_computation() {
        let rule = OptimizerRule::RmspropTf { decay: 0.9, momentum: 0.9, eps: 1e-3 };
        let got = run(rule, 0.0, &[0.1, 0.1], 2.0);
        // Step 1: g = 2, v = 0.9·1 + 0.1·4 = 1.3, m = 0.1·2/√1.301 = 0.17534..., p = 0.82465...
        let v1 = 1.3f64;
        let m1 = 0.1 * 2.0 / (v1 + 1e-3).sqrt();
        let p1 = 1.0 - m1;
        assert!((got[0] - p1).abs() < 1e-12, "{} vs {p1}", got[0]);
        assert!((p1 - 0.824_656_4).abs() < 1e-6);
        // Step 2: g = 2·p1.
        let g2 = 2.0 * p1;
        let v2 = 0.9 * v1 + 0.1 * g2 * g2;
        let m2 = 0.9 * m1 + 0.1 * g2 / (v2 + 1e-3).sqrt();
        assert!((got[1] - (p1 - m2)).abs() < 1e-12);
    }

    #[test]
    fn rmsprop_tf_weight_decay_is_coupled() {
        let rule = OptimizerRule::RmspropTf { decay: 0.9, momentum: 0.0, eps: 1e-3 };
        let got = run(rule, 0.5, &[0.1], 2.0);
        let g = 2.0 + 0.5;
        let v = 0.9 + 0.1 * g * g;
        assert!((got[0] - (1.0 - 0.1 * g / (v + 1e-3f64).sqrt())).abs() < 1e-12);
    }

    #[test]
    fn sgd_nesterov_matches_hand_computation() {
        let rule = OptimizerRule::Sgd { momentum: 0.9, nesterov: true };
        let got = run(rule, 0.0, &[0.1, 0.1], 1.0);
        // Step 1: g = 1, b = 1, d = 1 + 0.9 = 1.9, p = 1 − 0.19 = 0.81.
        assert!((got[0] - 0.81).abs() < 1e-12);
        // Step 2: g = 0.81, b = 0.9 + 0.81 = 1.71, d = 0.81 + 1.539 = 2.349, p = 0.81 − 0.2349.
        assert!((got[1] - 0.5751).abs() < 1e-12);
        let plain = run(OptimizerRule::Sgd { momentum: 0.9, nesterov: false }, 0.0, &[0.1, 0.1], 1.0);
        assert!((plain[0] - 0.9).abs() < 1e-12);
        assert!((plain[1] - (0.9 - 0.1 * (0.9 + 0.9))).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_hand_computation() {
        let rule = OptimizerRule::Adamw { beta1: 0.9, beta2: 0.999, eps: 1e-8 };
        let got = run(rule, 0.1, &[0.01, 0.01], 3.0);
        // Step 1: decay p = 1·(1 − 0.001) = 0.999; m̂ = g = 3, v̂ = 9 → p = 0.999 − 0.01·3/(3+1e-8).
        let p1 = 0.999 - 0.01 * 3.0 / (3.0 + 1e-8);
        assert!((got[0] - p1).abs() < 1e-12, "{} vs {p1}", got[0]);
        // Step 2: the gradient is taken before the decay, at p1.
        let g2 = 3.0 * p1;
        let m = 0.9 * 0.1 * 3.0 + 0.1 * g2;
        let v = 0.999 * 0.001 * 9.0 + 0.001 * g2 * g2;
        let m_hat = m / (1.0 - 0.81);
        let v_hat = v / (1.0 - 0.999f64.powi(2));
        let p2 = p1 * (1.0 - 0.001) - 0.01 * m_hat / (v_hat.sqrt() + 1e-8);
        assert!((got[1] - p2).abs() < 1e-12, "{} vs {p2}", got[1]);
    }

    #[test]
    fn one_dimensional_tensors_skip_weight_decay() {
        let weight = Tensor::ones([2, 2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let bias = Tensor::ones([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let rule = OptimizerRule::Sgd { momentum: 0.0, nesterov: false };
        let params = || {
            vec![
                ("conv.weight".to_string(), weight.shallow_clone()),
                ("bn.bias".to_string(), bias.shallow_clone()),
            ]
        };
        let optimizer = Optimizer::new(rule, params(), 1e-5, false);
        assert_eq!(optimizer.decayed(), vec!["conv.weight"]);
        let optimizer = Optimizer::new(rule, params(), 1e-5, true);
        assert_eq!(optimizer.decayed(), vec!["conv.weight", "bn.bias"]);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let p = Tensor::from_slice(&[3.0f64, 4.0]).set_requires_grad(true);
        let rule = OptimizerRule::Sgd { momentum: 0.0, nesterov: false };
        let mut optimizer = Optimizer::new(rule, vec![("w".into(), p.shallow_clone())], 0.0, false);
        (&p * &p * 0.5).sum(Kind::Double).backward();
        let norm = optimizer.clip_grad_norm(1.0);
        assert!((norm - 5.0).abs() < 1e-12);
        let grad = p.grad();
        assert!((grad.double_value(&[0]) - 0.6).abs() < 1e-6);
        assert!((grad.double_value(&[1]) - 0.8).abs() < 1e-6);
    }

    #[test]
    fn state_round_trips() {
        let rule = OptimizerRule::RmspropTf { decay: 0.9, momentum: 0.9, eps: 1e-3 };
        let p = Tensor::from_slice(&[1.0f64, 2.0]).set_requires_grad(true);
        let mut optimizer = Optimizer::new(rule, vec![("w".into(), p.shallow_clone())], 0.0, false);
        (&p * &p).sum(Kind::Double).backward();
        optimizer.step(0.1);
        let saved: HashMap<String, Tensor> =
            optimizer.state_tensors().into_iter().map(|(k, v)| (k, v.copy())).collect();
        assert_eq!(saved.len(), 2);
        let q = Tensor::from_slice(&[1.0f64, 2.0]).set_requires_grad(true);
        let mut restored = Optimizer::new(rule, vec![("w".into(), q)], 0.0, false);
        let copy = |m: &HashMap<String, Tensor>| -> HashMap<String, Tensor> {
            m.iter().map(|(k, v)| (k.clone(), v.copy())).collect()
        };
        restored.load_state(copy(&saved), optimizer.steps()).unwrap();
        for (name, tensor) in restored.state_tensors() {
            assert!(tensor.equal(&saved[&name]), "{name}");
        }
        let mut missing = saved;
        missing.remove("w/square_avg");
        assert!(restored.load_state(missing, 1).is_err());
    }
}
