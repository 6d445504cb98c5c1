//! The EfficientNet network: stem, MBConv stages, head, pool, dropout, classifier.
//!
//! Variable layout (torchvision's `EfficientNet` state dict):
//! `features.0` stem · `features.1..=7` stages with `features.S.I.block.*` · `features.8` head ·
//! `classifier.1` linear.

use tch::{Tensor, nn, nn::ModuleT};

use crate::blocks::{ConvBnAct, ConvShape, DropPathMultiplier, MBConv};
use crate::config::{Architecture, ClassifierInit, EfficientNetConfig};
use crate::error::Result;
use crate::hooks::{ForwardHooks, Pass};

#[derive(Debug)]
pub struct EfficientNet {
    architecture: Architecture,
    stem: ConvBnAct,
    /// Stages in order, each a list of blocks.
    stages: Vec<Vec<MBConv>>,
    head: ConvBnAct,
    classifier: nn::Linear,
    drop_path_multiplier: DropPathMultiplier,
    hooks: ForwardHooks,
}

impl EfficientNet {
    /// Build the network under `path` (usually `vs.root()`), with TF-style initialisation.
    pub fn new(path: &nn::Path, config: &EfficientNetConfig) -> Result<Self> {
        let architecture = config.architecture()?;
        let batch_norm = architecture.batch_norm;
        let features = path / "features";
        let stem = ConvBnAct::new(
            &features / 0,
            ConvShape {
                in_channels: architecture.input_channels,
                out_channels: architecture.stem_channels,
                kernel: 3,
                stride: 2,
                groups: 1,
            },
            true,
            batch_norm,
        );
        let drop_path_multiplier = DropPathMultiplier::default();
        let mut stages = Vec::with_capacity(architecture.stages.len());
        for (stage_index, stage) in architecture.stages.iter().enumerate() {
            let stage_path = &features / (stage_index + 1);
            let blocks = stage
                .blocks
                .iter()
                .enumerate()
                .map(|(block_index, block)| {
                    MBConv::new(&stage_path / block_index, *block, batch_norm, drop_path_multiplier.clone())
                })
                .collect::<Result<Vec<_>>>()?;
            stages.push(blocks);
        }
        let last_channels = architecture.stages.last().map_or(architecture.stem_channels, |s| s.out_channels);
        let head = ConvBnAct::new(
            &features / (architecture.stages.len() + 1),
            ConvShape {
                in_channels: last_channels,
                out_channels: architecture.head_channels,
                kernel: 1,
                stride: 1,
                groups: 1,
            },
            true,
            batch_norm,
        );
        // torchvision: uniform(-1/sqrt(out), 1/sqrt(out)) weights, zero bias.
        let range = 1.0 / (architecture.classes as f64).sqrt();
        let ws_init = match config.classifier_init {
            ClassifierInit::Uniform => nn::Init::Uniform { lo: -range, up: range },
            ClassifierInit::Zero => nn::Init::Const(0.0),
        };
        let classifier = nn::linear(
            path / "classifier" / 1,
            architecture.head_channels as i64,
            architecture.classes as i64,
            nn::LinearConfig { ws_init, bs_init: Some(nn::Init::Const(0.0)), bias: true },
        );
        Ok(EfficientNet {
            architecture,
            stem,
            stages,
            head,
            classifier,
            drop_path_multiplier,
            hooks: ForwardHooks::default(),
        })
    }

    pub fn architecture(&self) -> &Architecture {
        &self.architecture
    }

    pub fn blocks(&self) -> impl Iterator<Item = &MBConv> {
        self.stages.iter().flatten()
    }

    /// The scale the trainer's drop-path schedule applies to every block's rate (default 1).
    pub fn drop_path_multiplier(&self) -> f64 {
        self.drop_path_multiplier.get()
    }

    pub fn set_drop_path_multiplier(&self, multiplier: f64) -> Result<()> {
        self.drop_path_multiplier.set(multiplier)
    }

    /// Trainable tensors of the built network (BatchNorm running statistics excluded), the
    /// same set torchvision's `parameters()` yields.
    pub fn parameters(&self) -> Vec<&Tensor> {
        fn conv_bn<'a>(layer: &'a ConvBnAct, out: &mut Vec<&'a Tensor>) {
            out.push(&layer.conv.ws);
            out.extend(layer.conv.bs.as_ref());
            out.extend(layer.bn.ws.as_ref());
            out.extend(layer.bn.bs.as_ref());
        }
        let mut out = Vec::new();
        conv_bn(&self.stem, &mut out);
        for block in self.blocks() {
            if let Some(expand) = &block.expand {
                conv_bn(expand, &mut out);
            }
            conv_bn(&block.depthwise, &mut out);
            for fc in [&block.se.fc1, &block.se.fc2] {
                out.push(&fc.ws);
                out.extend(fc.bs.as_ref());
            }
            conv_bn(&block.project, &mut out);
        }
        conv_bn(&self.head, &mut out);
        out.push(&self.classifier.ws);
        out.extend(self.classifier.bs.as_ref());
        out
    }

    /// Number of trainable scalars.
    pub fn parameter_count(&self) -> i64 {
        self.parameters().iter().map(|t| t.numel() as i64).sum()
    }

    /// Multiply-adds of one forward pass at a square `resolution`, counted layer by layer from
    /// the built network: convolutions, squeeze-excitation and the classifier (biases,
    /// BatchNorm and activations excluded, the convention of the paper's FLOPs column).
    pub fn multiply_adds(&self, resolution: u32) -> u64 {
        let mut total = self.stem.multiply_adds(resolution);
        let mut side = self.stem.output_size(resolution);
        for block in self.blocks() {
            let (work, output) = block.multiply_adds(side);
            total += work;
            side = output;
        }
        total += self.head.multiply_adds(side);
        total += self.architecture.head_channels as u64 * self.architecture.classes as u64;
        total
    }

    /// Run the training forward pass with `hooks`: SyncBatchNorm when it has a cross-replica
    /// sum, activation checkpointing of every MBConv block when it has a recompute. Evaluation
    /// (`train = false`) uses neither.
    pub fn set_hooks(&mut self, hooks: ForwardHooks) {
        self.hooks = hooks;
    }

    pub fn hooks(&self) -> &ForwardHooks {
        &self.hooks
    }

    /// Pooled features before dropout and the classifier.
    pub fn features(&self, xs: &Tensor, train: bool) -> Tensor {
        let cross_replica = if train { self.hooks.cross_replica.as_deref() } else { None };
        let mut ys = self.stem.tensors().forward(xs, train, Pass::Forward, cross_replica);
        for block in self.blocks() {
            let tensors = block.tensors();
            ys = match (&self.hooks.recompute, train) {
                (Some(recompute), true) => {
                    let cross_replica = self.hooks.cross_replica.clone();
                    recompute.checkpoint(
                        &ys,
                        Box::new(move |xs, pass| tensors.forward(xs, true, pass, cross_replica.as_deref())),
                    )
                }
                _ => tensors.forward(&ys, train, Pass::Forward, cross_replica),
            };
        }
        self.head
            .tensors()
            .forward(&ys, train, Pass::Forward, cross_replica)
            .adaptive_avg_pool2d([1, 1])
            .flatten(1, -1)
    }
}

impl ModuleT for EfficientNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.features(xs, train).dropout(self.architecture.dropout, train).apply(&self.classifier)
    }
}
