//! The model being trained and its weight average, as checkpointable components.
//!
//! [`Network`] owns the variables (a `VarStore` on the job's device), the EfficientNet built over
//! them, the identity a checkpoint must match, and how its forward pass runs (bf16 autocast,
//! channels_last). [`Averaged`] is the EMA: a second `Network` and the [`Ema`] that updates it.

use effnet_config::JobSpec;
use effnet_model::{EfficientNet, EfficientNetConfig};
use effnet_store::Redacted;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::amp;
use crate::checkpoint::{EMA_FILE, MODEL_FILE};
use crate::ema::Ema;
use crate::error::{Error, Result};
use crate::evaluate::Precision;
use crate::state::{CheckpointContent, ModelIdentity, Stateful};
use crate::tensors::{from_safetensors, load_into, sorted_variables, to_safetensors};

pub struct Network {
    pub vs: VarStore,
    pub model: EfficientNet,
    pub identity: ModelIdentity,
    pub precision: Precision,
}

impl Network {
    /// Build the model on `precision.device` with libtorch's generator as it stands (the trainer
    /// seeds it first, so every rank builds the same initial weights).
    pub fn build(
        config: &EfficientNetConfig,
        identity: &ModelIdentity,
        precision: Precision,
    ) -> Result<Network> {
        let vs = VarStore::new(precision.device);
        let model = EfficientNet::new(&vs.root(), config)?;
        if precision.channels_last {
            amp::variables_to_channels_last(&vs)?;
        }
        Ok(Network { vs, model, identity: identity.clone(), precision })
    }

    /// Parameters and buffers, sorted by name.
    pub fn variables(&self) -> Vec<(String, Tensor)> {
        sorted_variables(&self.vs)
    }

    /// The parameters that train, sorted by name.
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        self.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect()
    }

    /// Float32 logits of a batch of images.
    pub fn forward(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        self.precision.forward(&self.model, images, train)
    }

    /// Give every trainable parameter a zero gradient where it has none, so a rank with no
    /// samples in a step still contributes (zeros) to the gradient sum and steps its optimiser
    /// like the others.
    pub fn define_gradients(&self) {
        let trainable = self.trainable();
        if trainable.iter().all(|(_, t)| t.grad().defined()) {
            return;
        }
        let zero = trainable
            .iter()
            .map(|(_, t)| t.sum(Kind::Float) * 0.0)
            .reduce(|a, b| a + b)
            .unwrap_or_else(|| Tensor::zeros([], (Kind::Float, Device::Cpu)));
        if zero.requires_grad() {
            zero.backward();
        }
    }
}

impl Stateful for Network {
    fn save(&self, checkpoint: &mut CheckpointContent) -> Result<()> {
        checkpoint.set("model", &self.identity)?;
        checkpoint.put_file(MODEL_FILE, to_safetensors(&self.variables())?);
        Ok(())
    }

    fn load(&mut self, checkpoint: &CheckpointContent) -> Result<()> {
        let incompatible =
            |reason: String| Error::IncompatibleCheckpoint { url: checkpoint.url.clone(), reason };
        let saved: ModelIdentity = checkpoint.get("model")?;
        let mine = &self.identity;
        if &saved != mine {
            return Err(incompatible(format!(
                "it holds {} with {} classes and {} input channels ({} parameters); this job trains {} with {} classes and {} input channels ({} parameters)",
                saved.architecture,
                saved.classes,
                saved.input_channels,
                saved.parameters,
                mine.architecture,
                mine.classes,
                mine.input_channels,
                mine.parameters
            )));
        }
        let damaged = |reason: String| Error::BadCheckpoint { url: checkpoint.url.clone(), reason };
        let weights = from_safetensors(checkpoint.file(MODEL_FILE)?).map_err(damaged)?;
        load_into(&self.vs, weights).map_err(incompatible)
    }
}

/// The exponential moving average of a [`Network`]'s weights, in a network of its own so it can
/// be evaluated and checkpointed like the raw one.
pub struct Averaged {
    pub network: Network,
    pub ema: Ema,
}

impl Averaged {
    /// An average of `source` that starts as a copy of it.
    pub fn new(source: &Network, config: &EfficientNetConfig, spec: &JobSpec) -> Result<Averaged> {
        let network = Network::build(config, &source.identity, source.precision)?;
        let ema = Ema::new(spec.training.ema.decay, spec.training.ema.warmup, &source.vs, &network.vs)?;
        Ok(Averaged { network, ema })
    }
}

impl Stateful for Averaged {
    fn save(&self, checkpoint: &mut CheckpointContent) -> Result<()> {
        checkpoint.set("ema_updates", self.ema.updates())?;
        checkpoint.put_file(EMA_FILE, to_safetensors(&self.network.variables())?);
        Ok(())
    }

    /// Restore the average; a checkpoint without one (EMA was off) restarts it from the restored
    /// weights, so the raw network must be loaded first.
    fn load(&mut self, checkpoint: &CheckpointContent) -> Result<()> {
        let updates: Option<u64> = checkpoint.get_optional("ema_updates")?;
        match updates {
            Some(updates) if checkpoint.has_file(EMA_FILE) => {
                let damaged = |reason: String| Error::BadCheckpoint { url: checkpoint.url.clone(), reason };
                let weights = from_safetensors(checkpoint.file(EMA_FILE)?).map_err(damaged)?;
                load_into(&self.network.vs, weights).map_err(|reason| Error::IncompatibleCheckpoint {
                    url: checkpoint.url.clone(),
                    reason,
                })?;
                self.ema.set_updates(updates);
            }
            _ => {
                tracing::warn!(url = %Redacted(&checkpoint.url), "the checkpoint has no EMA; the average restarts from the restored weights");
                self.ema.restart();
            }
        }
        Ok(())
    }
}
