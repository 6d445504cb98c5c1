//! Building blocks: convolution + BatchNorm + SiLU, squeeze-excitation, MBConv, stochastic depth.
//!
//! Field and variable names mirror torchvision's modules (`block.0.0`, `fc1`, ...), so a
//! torchvision state dict is this crate's checkpoint format.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tch::{Tensor, nn, nn::Module, nn::ModuleT};

use crate::config::{BatchNormParams, BlockConfig};
use crate::error::{Error, Result};
use crate::hooks::{BatchNormTensors, CrossReplica, Pass};

/// Stochastic depth ("drop path", Huang et al. 2016) in row mode: each sample's residual branch
/// is zeroed with probability `p` and the survivors are scaled by `1/(1-p)`, so the expected
/// output equals the input. Identity at eval and at `p = 0`.
///
/// The noise comes from libtorch's global generator (`tch::manual_seed` makes it repeatable).
pub fn stochastic_depth(input: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if !(0.0..=1.0).contains(&p) {
        return Err(Error::InvalidDropPathProbability { value: p });
    }
    Ok(drop_path_unchecked(input, p, train))
}

fn drop_path_unchecked(input: &Tensor, p: f64, train: bool) -> Tensor {
    if !train || p == 0.0 {
        return input.shallow_clone();
    }
    let survival = 1.0 - p;
    let mut noise_shape = vec![1i64; input.dim()];
    if let Some(first) = noise_shape.first_mut() {
        *first = input.size()[0];
    }
    let mut noise = Tensor::empty(noise_shape, (input.kind(), input.device())).bernoulli_float_(survival);
    if survival > 0.0 {
        noise /= survival;
    }
    input * noise
}

/// A shared, lock-free scale for every block's drop-path rate, set by the trainer's schedule.
#[derive(Clone, Debug)]
pub struct DropPathMultiplier(Arc<AtomicU64>);

impl Default for DropPathMultiplier {
    fn default() -> Self {
        DropPathMultiplier(Arc::new(AtomicU64::new(1.0f64.to_bits())))
    }
}

impl DropPathMultiplier {
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    /// Set the multiplier; it must be finite and non-negative.
    pub fn set(&self, value: f64) -> Result<()> {
        if !(value.is_finite() && value >= 0.0) {
            return Err(Error::InvalidConfig {
                field: "drop_path_multiplier",
                reason: format!("must be a finite number >= 0, got {value}"),
            });
        }
        self.0.store(value.to_bits(), Ordering::Relaxed);
        Ok(())
    }
}

/// Module form of [`stochastic_depth`]: a fixed per-block rate times the shared multiplier.
#[derive(Clone, Debug)]
pub struct DropPath {
    rate: f64,
    multiplier: DropPathMultiplier,
}

impl DropPath {
    pub fn new(rate: f64, multiplier: DropPathMultiplier) -> Result<Self> {
        if !(0.0..=1.0).contains(&rate) {
            return Err(Error::InvalidDropPathProbability { value: rate });
        }
        Ok(DropPath { rate, multiplier })
    }

    /// The probability used now: `rate · multiplier`, capped at 1.
    pub fn effective_rate(&self) -> f64 {
        (self.rate * self.multiplier.get()).min(1.0)
    }
}

impl ModuleT for DropPath {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        drop_path_unchecked(xs, self.effective_rate(), train)
    }
}

/// Convolution (no bias) + BatchNorm + optional SiLU: torchvision's `Conv2dNormActivation`,
/// with the convolution at `path/0` and the norm at `path/1`.
#[derive(Debug)]
pub struct ConvBnAct {
    pub conv: nn::Conv2D,
    pub bn: nn::BatchNorm,
    pub activation: bool,
    /// The eps/momentum `bn` was built with.
    pub batch_norm: BatchNormParams,
    pub in_channels: u32,
    pub out_channels: u32,
    pub kernel: u32,
    pub stride: u32,
    pub groups: u32,
}

/// Shape of one convolution, as needed to build it and count its work.
#[derive(Clone, Copy, Debug)]
pub struct ConvShape {
    pub in_channels: u32,
    pub out_channels: u32,
    pub kernel: u32,
    pub stride: u32,
    pub groups: u32,
}

impl ConvBnAct {
    pub fn new(path: nn::Path, shape: ConvShape, activation: bool, batch_norm: BatchNormParams) -> Self {
        let ConvShape { in_channels, out_channels, kernel, stride, groups } = shape;
        let conv = conv2d(&(&path / 0), shape, false);
        let bn = nn::batch_norm2d(
            &path / 1,
            out_channels as i64,
            nn::BatchNormConfig {
                eps: batch_norm.eps,
                momentum: batch_norm.momentum,
                // tch defaults to uniform(0, 1) weights; torchvision starts BatchNorm at identity.
                ws_init: nn::Init::Const(1.0),
                bs_init: nn::Init::Const(0.0),
                ..Default::default()
            },
        );
        ConvBnAct { conv, bn, activation, batch_norm, in_channels, out_channels, kernel, stride, groups }
    }

    /// Output side length for a square input of side `input`: padding `(k-1)/2` gives
    /// `floor((input - 1) / stride) + 1`.
    pub fn output_size(&self, input: u32) -> u32 {
        conv_output_size(input, self.kernel, self.stride)
    }

    /// Multiply-adds for a square input of side `input`.
    pub fn multiply_adds(&self, input: u32) -> u64 {
        let out = self.output_size(input) as u64;
        out * out
            * (self.in_channels / self.groups) as u64
            * (self.kernel * self.kernel) as u64
            * self.out_channels as u64
    }
}

impl ConvBnAct {
    /// Shallow copies of the layer's tensors with its settings, for a computation that must own
    /// them (a recomputed block).
    pub(crate) fn tensors(&self) -> ConvBnTensors {
        ConvBnTensors {
            weight: self.conv.ws.shallow_clone(),
            stride: self.stride as i64,
            padding: ((self.kernel - 1) / 2) as i64,
            groups: self.groups as i64,
            bn: BatchNormTensors {
                weight: self.bn.ws.as_ref().map(Tensor::shallow_clone),
                bias: self.bn.bs.as_ref().map(Tensor::shallow_clone),
                running_mean: self.bn.running_mean.shallow_clone(),
                running_var: self.bn.running_var.shallow_clone(),
                eps: self.batch_norm.eps,
                momentum: self.batch_norm.momentum,
            },
            activation: self.activation,
        }
    }
}

impl ModuleT for ConvBnAct {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.tensors().forward(xs, train, Pass::Forward, None)
    }
}

/// A [`ConvBnAct`]'s computation on tensors it owns (shallow copies of the layer's variables).
pub(crate) struct ConvBnTensors {
    weight: Tensor,
    stride: i64,
    padding: i64,
    groups: i64,
    bn: BatchNormTensors,
    activation: bool,
}

impl ConvBnTensors {
    /// Convolution (no bias), BatchNorm (statistics across ranks with `cross_replica`, running
    /// statistics updated only in [`Pass::Forward`]) and SiLU.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        train: bool,
        pass: Pass,
        cross_replica: Option<&dyn CrossReplica>,
    ) -> Tensor {
        let ys = xs.conv2d(
            &self.weight,
            None::<Tensor>,
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            self.groups,
        );
        let ys = self.bn.forward(&ys, train, pass == Pass::Forward, cross_replica);
        if self.activation { ys.silu() } else { ys }
    }
}

pub(crate) fn conv_output_size(input: u32, kernel: u32, stride: u32) -> u32 {
    let padding = (kernel - 1) / 2;
    (input + 2 * padding - kernel) / stride + 1
}

/// A 2-D convolution with TF-style init: normal with std `sqrt(2 / fan_out)`, where fan_out is
/// `out_channels · k · k` (torch's `kaiming_normal_(mode="fan_out")`), zero bias.
fn conv2d(path: &nn::Path, shape: ConvShape, bias: bool) -> nn::Conv2D {
    let fan_out = (shape.out_channels * shape.kernel * shape.kernel) as f64;
    nn::conv2d(
        path,
        shape.in_channels as i64,
        shape.out_channels as i64,
        shape.kernel as i64,
        nn::ConvConfig {
            stride: shape.stride as i64,
            padding: ((shape.kernel - 1) / 2) as i64,
            groups: shape.groups as i64,
            bias,
            ws_init: nn::Init::Randn { mean: 0.0, stdev: (2.0 / fan_out).sqrt() },
            bs_init: nn::Init::Const(0.0),
            ..Default::default()
        },
    )
}

/// Squeeze-excitation: global average pool, 1×1 down to `squeeze` channels, SiLU, 1×1 back up,
/// sigmoid gate. `fc1` / `fc2` as in torchvision.
#[derive(Debug)]
pub struct SqueezeExcitation {
    pub fc1: nn::Conv2D,
    pub fc2: nn::Conv2D,
    pub channels: u32,
    pub squeeze: u32,
}

impl SqueezeExcitation {
    pub fn new(path: nn::Path, channels: u32, squeeze: u32) -> Self {
        let shape = |in_channels, out_channels| ConvShape {
            in_channels,
            out_channels,
            kernel: 1,
            stride: 1,
            groups: 1,
        };
        SqueezeExcitation {
            fc1: conv2d(&(&path / "fc1"), shape(channels, squeeze), true),
            fc2: conv2d(&(&path / "fc2"), shape(squeeze, channels), true),
            channels,
            squeeze,
        }
    }

    pub fn multiply_adds(&self) -> u64 {
        2 * self.channels as u64 * self.squeeze as u64
    }
}

impl Module for SqueezeExcitation {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.tensors().forward(xs)
    }
}

impl SqueezeExcitation {
    fn tensors(&self) -> SqueezeTensors {
        let pair = |conv: &nn::Conv2D| (conv.ws.shallow_clone(), conv.bs.as_ref().map(Tensor::shallow_clone));
        SqueezeTensors { fc1: pair(&self.fc1), fc2: pair(&self.fc2) }
    }
}

struct SqueezeTensors {
    fc1: (Tensor, Option<Tensor>),
    fc2: (Tensor, Option<Tensor>),
}

impl SqueezeTensors {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let one_by_one = |xs: &Tensor, (weight, bias): &(Tensor, Option<Tensor>)| {
            xs.conv2d(weight, bias.as_ref(), [1, 1], [0, 0], [1, 1], 1)
        };
        let scale =
            one_by_one(&one_by_one(&xs.adaptive_avg_pool2d([1, 1]), &self.fc1).silu(), &self.fc2).sigmoid();
        xs * scale
    }
}

/// Mobile inverted bottleneck: [expand 1×1] → depthwise k×k → squeeze-excitation → project 1×1,
/// plus an identity skip with stochastic depth when stride is 1 and channels match.
#[derive(Debug)]
pub struct MBConv {
    pub config: BlockConfig,
    pub expand: Option<ConvBnAct>,
    pub depthwise: ConvBnAct,
    pub se: SqueezeExcitation,
    pub project: ConvBnAct,
    /// Present only on blocks with an identity skip.
    pub drop_path: Option<DropPath>,
}

impl MBConv {
    /// Builds under `path/"block"/i` exactly as torchvision numbers the sub-layers.
    pub fn new(
        path: nn::Path,
        config: BlockConfig,
        batch_norm: BatchNormParams,
        multiplier: DropPathMultiplier,
    ) -> Result<Self> {
        let block = &path / "block";
        let mut index = 0;
        let expand = if config.has_expansion() {
            let layer = ConvBnAct::new(
                &block / index,
                ConvShape {
                    in_channels: config.in_channels,
                    out_channels: config.expanded_channels,
                    kernel: 1,
                    stride: 1,
                    groups: 1,
                },
                true,
                batch_norm,
            );
            index += 1;
            Some(layer)
        } else {
            None
        };
        let depthwise = ConvBnAct::new(
            &block / index,
            ConvShape {
                in_channels: config.expanded_channels,
                out_channels: config.expanded_channels,
                kernel: config.kernel,
                stride: config.stride,
                groups: config.expanded_channels,
            },
            true,
            batch_norm,
        );
        let se = SqueezeExcitation::new(&block / (index + 1), config.expanded_channels, config.se_channels);
        let project = ConvBnAct::new(
            &block / (index + 2),
            ConvShape {
                in_channels: config.expanded_channels,
                out_channels: config.out_channels,
                kernel: 1,
                stride: 1,
                groups: 1,
            },
            false,
            batch_norm,
        );
        let drop_path =
            if config.has_skip() { Some(DropPath::new(config.drop_path_rate, multiplier)?) } else { None };
        Ok(MBConv { config, expand, depthwise, se, project, drop_path })
    }

    /// Multiply-adds for a square input of side `input`, and the output side.
    pub fn multiply_adds(&self, input: u32) -> (u64, u32) {
        let mut total = 0;
        if let Some(expand) = &self.expand {
            total += expand.multiply_adds(input);
        }
        total += self.depthwise.multiply_adds(input);
        let output = self.depthwise.output_size(input);
        total += self.se.multiply_adds();
        total += self.project.multiply_adds(output);
        (total, output)
    }
}

impl MBConv {
    /// The block's computation on shallow copies of its tensors: what a recomputed block owns.
    pub fn tensors(&self) -> BlockTensors {
        BlockTensors {
            expand: self.expand.as_ref().map(ConvBnAct::tensors),
            depthwise: self.depthwise.tensors(),
            se: self.se.tensors(),
            project: self.project.tensors(),
            drop_path: self.drop_path.clone(),
        }
    }
}

impl ModuleT for MBConv {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.tensors().forward(xs, train, Pass::Forward, None)
    }
}

/// An [`MBConv`] block's computation on tensors it owns (shallow copies sharing storage and
/// gradients with the block's variables), so it can outlive a borrow of the network: activation
/// checkpointing reruns it in backward.
pub struct BlockTensors {
    expand: Option<ConvBnTensors>,
    depthwise: ConvBnTensors,
    se: SqueezeTensors,
    project: ConvBnTensors,
    drop_path: Option<DropPath>,
}

impl BlockTensors {
    /// The block's output; BatchNorm across ranks with `cross_replica`, and running statistics
    /// updated only in [`Pass::Forward`].
    pub fn forward(
        &self,
        xs: &Tensor,
        train: bool,
        pass: Pass,
        cross_replica: Option<&dyn CrossReplica>,
    ) -> Tensor {
        let mut ys = match &self.expand {
            Some(expand) => expand.forward(xs, train, pass, cross_replica),
            None => xs.shallow_clone(),
        };
        ys = self.depthwise.forward(&ys, train, pass, cross_replica);
        ys = self.se.forward(&ys);
        ys = self.project.forward(&ys, train, pass, cross_replica);
        match &self.drop_path {
            Some(drop_path) => ys.apply_t(drop_path, train) + xs,
            None => ys,
        }
    }
}
