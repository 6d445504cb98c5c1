//! Exponential moving average of the weights (and BatchNorm statistics), kept in a second copy of
//! the model so it can be evaluated and checkpointed like the raw one.
//!
//! With warm-up the decay of update `n` (0-based) is `min(decay, (1 + n) / (10 + n))`, TF's
//! `num_updates` correction: early averages follow the fast-moving weights instead of staying
//! near the random initialisation for the ~10,000 steps a 0.9999 decay would need.

use tch::Tensor;

use crate::error::{Error, Result};

pub struct Ema {
    pub decay: f64,
    pub warmup: bool,
    updates: u64,
    /// (model variable, averaged variable), sorted by name.
    pairs: Vec<(String, Tensor, Tensor)>,
}

impl Ema {
    /// `model` and `average` are the variables of two identically built models; the average
    /// starts as a copy of the model.
    pub fn new(
        decay: f64,
        warmup: bool,
        model: &tch::nn::VarStore,
        average: &tch::nn::VarStore,
    ) -> Result<Ema> {
        let mut model_vars: Vec<(String, Tensor)> = model.variables().into_iter().collect();
        model_vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut average_vars = average.variables();
        let mut pairs = Vec::with_capacity(model_vars.len());
        for (name, tensor) in model_vars {
            let shadow = average_vars
                .remove(&name)
                .ok_or_else(|| Error::Internal(format!("EMA model lacks variable {name}")))?;
            pairs.push((name, tensor, shadow));
        }
        if let Some(extra) = average_vars.keys().next() {
            return Err(Error::Internal(format!("EMA model has an extra variable {extra}")));
        }
        let mut ema = Ema { decay, warmup, updates: 0, pairs };
        ema.restart();
        Ok(ema)
    }

    /// Start the average over: a copy of the model's current weights, no updates counted.
    pub fn restart(&mut self) {
        tch::no_grad(|| {
            for (_, model, average) in &mut self.pairs {
                average.copy_(model);
            }
        });
        self.updates = 0;
    }

    /// The decay the next update will use.
    pub fn current_decay(&self) -> f64 {
        decay_at(self.decay, self.warmup, self.updates)
    }

    pub fn updates(&self) -> u64 {
        self.updates
    }

    pub fn set_updates(&mut self, updates: u64) {
        self.updates = updates;
    }

    /// `average ← d · average + (1 − d) · model`.
    pub fn update(&mut self) {
        let decay = self.current_decay();
        tch::no_grad(|| {
            for (_, model, average) in &mut self.pairs {
                let _ = average.g_mul_scalar_(decay);
                let _ = average.f_add_(&(&*model * (1.0 - decay)));
            }
        });
        self.updates += 1;
    }
}

pub fn decay_at(decay: f64, warmup: bool, updates: u64) -> f64 {
    if warmup { decay.min((1.0 + updates as f64) / (10.0 + updates as f64)) } else { decay }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;
    use tch::{Device, Kind};

    fn store(values: &[f32]) -> VarStore {
        let vs = VarStore::new(Device::Cpu);
        let layer = vs.root().sub("layer");
        let _ = layer.var_copy("weight", &Tensor::from_slice(values));
        let _ = layer.zeros_no_train("running_mean", &[values.len() as i64]);
        vs
    }

    #[test]
    fn matches_a_reference_computation() {
        let model = store(&[1.0, -2.0, 0.5]);
        let average = store(&[0.0, 0.0, 0.0]);
        let mut ema = Ema::new(0.9999, true, &model, &average).unwrap();
        // Reference: plain f64 arithmetic on the same sequence of weights.
        let mut reference = [1.0f64, -2.0, 0.5];
        let mut weights = [1.0f64, -2.0, 0.5];
        for n in 0..50u64 {
            for (i, w) in weights.iter_mut().enumerate() {
                *w += 0.1 * ((n as f64) * 0.37 + i as f64).sin();
            }
            let mut current = model.variables()["layer.weight"].shallow_clone();
            tch::no_grad(|| current.copy_(&Tensor::from_slice(&weights.map(|w| w as f32))));
            let d = if n == 0 { 0.1 } else { (0.9999f64).min((1.0 + n as f64) / (10.0 + n as f64)) };
            assert!((ema.current_decay() - d).abs() < 1e-15);
            for (r, w) in reference.iter_mut().zip(weights) {
                *r = d * *r + (1.0 - d) * w;
            }
            ema.update();
        }
        let averaged = average.variables()["layer.weight"].to_kind(Kind::Double);
        for (i, r) in reference.iter().enumerate() {
            let got = averaged.double_value(&[i as i64]);
            assert!((got - r).abs() < 1e-5, "{i}: {got} vs {r}");
        }
        assert_eq!(ema.updates(), 50);
    }

    #[test]
    fn decay_without_warmup_is_constant() {
        assert_eq!(decay_at(0.9999, false, 0), 0.9999);
        assert_eq!(decay_at(0.9999, true, 0), 0.1);
        assert_eq!(decay_at(0.9999, true, 90), 91.0 / 100.0);
        assert_eq!(decay_at(0.99, true, 1_000_000), 0.99);
    }
}
