//! The network description: B0's stage table, scaled into final per-block numbers.
//!
//! `EfficientNetConfig` is what a user chooses (variant or custom phi, classes, input channels,
//! dropout, drop path, BatchNorm style). `EfficientNetConfig::architecture()` turns it into an
//! `Architecture`: every block with its final channels, kernel, stride and drop-path rate. The
//! model builder and the FLOPs counter both read the `Architecture`, never the multipliers.

use serde::Serialize;

pub use effnet_scaling::{BatchNormParams, BatchNormStyle, ClassifierInit};

use crate::error::{Error, Result};
use crate::scaling::{
    CompoundCoefficients, Scaling, Variant, compound_scaling, multiplier_scaling, round_channels, scale_depth,
};

/// Channels are rounded to multiples of this (hardware-friendly, as in the reference code).
pub const CHANNEL_DIVISOR: u32 = 8;
/// Squeeze-excitation squeezes to this fraction of the block's *input* channels.
pub const SE_RATIO: f64 = 0.25;
/// The stem's output channels before width scaling.
pub const STEM_CHANNELS: u32 = 32;
/// The head's 1×1 convolution widens the last stage by this factor (1280 = 4 · 320 for B0).
pub const HEAD_EXPANSION: u32 = 4;
/// Default maximum stochastic-depth rate (the paper's 0.2).
pub const DEFAULT_DROP_PATH_RATE: f64 = 0.2;

/// One row of B0's architecture table (paper, Table 1): an MBConv stage before scaling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct StageSpec {
    /// Expansion ratio of the inverted bottleneck (1 = no expansion convolution).
    pub expand_ratio: u32,
    /// Depthwise kernel size.
    pub kernel: u32,
    /// Stride of the first block of the stage.
    pub stride: u32,
    /// Output channels before width scaling.
    pub channels: u32,
    /// Repeats before depth scaling.
    pub repeats: u32,
}

/// EfficientNet-B0, found by neural architecture search (paper, Table 1).
pub const B0_STAGES: [StageSpec; 7] = [
    StageSpec { expand_ratio: 1, kernel: 3, stride: 1, channels: 16, repeats: 1 },
    StageSpec { expand_ratio: 6, kernel: 3, stride: 2, channels: 24, repeats: 2 },
    StageSpec { expand_ratio: 6, kernel: 5, stride: 2, channels: 40, repeats: 2 },
    StageSpec { expand_ratio: 6, kernel: 3, stride: 2, channels: 80, repeats: 3 },
    StageSpec { expand_ratio: 6, kernel: 5, stride: 1, channels: 112, repeats: 3 },
    StageSpec { expand_ratio: 6, kernel: 5, stride: 2, channels: 192, repeats: 4 },
    StageSpec { expand_ratio: 6, kernel: 3, stride: 1, channels: 320, repeats: 1 },
];

/// Which network to build.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ModelSpec {
    /// One of B0–B7 with the published multipliers.
    Named { variant: Variant },
    /// A custom compound coefficient.
    Custom { phi: f64, coefficients: CompoundCoefficients },
    /// A custom member by its width and depth multipliers.
    Multipliers { width: f64, depth: f64 },
}

impl ModelSpec {
    pub fn scaling(&self) -> Result<Scaling> {
        match *self {
            ModelSpec::Named { variant } => Ok(variant.scaling()),
            ModelSpec::Custom { phi, coefficients } => Ok(compound_scaling(phi, coefficients)?),
            ModelSpec::Multipliers { width, depth } => Ok(multiplier_scaling(width, depth)?),
        }
    }

    /// The named variant, `None` for a custom phi.
    pub fn variant(&self) -> Option<Variant> {
        match *self {
            ModelSpec::Named { variant } => Some(variant),
            ModelSpec::Custom { .. } | ModelSpec::Multipliers { .. } => None,
        }
    }

    /// A short display name: `EfficientNet-B3`, `EfficientNet-phi1.5` or `EfficientNet-w0.55-d0.6`.
    pub fn display_name(&self) -> String {
        match self {
            ModelSpec::Named { variant } => {
                format!("EfficientNet-{}", variant.name().to_uppercase())
            }
            ModelSpec::Custom { phi, .. } => format!("EfficientNet-phi{phi}"),
            ModelSpec::Multipliers { width, depth } => {
                format!(
                    "EfficientNet-w{}-d{}",
                    (width * 1000.0).round() / 1000.0,
                    (depth * 1000.0).round() / 1000.0
                )
            }
        }
    }
}

/// Everything a user chooses about the network.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EfficientNetConfig {
    pub spec: ModelSpec,
    /// Number of output classes.
    pub classes: u32,
    /// Channels of the input image (3 for RGB, 1 for grey data).
    pub input_channels: u32,
    /// Dropout before the classifier; `None` takes the variant's value.
    pub dropout: Option<f64>,
    /// Maximum stochastic-depth rate, reached by the last block.
    pub drop_path_rate: f64,
    pub batch_norm: BatchNormStyle,
    pub classifier_init: ClassifierInit,
}

impl EfficientNetConfig {
    /// The configuration of a named variant with ImageNet's 1000 classes and RGB input.
    pub fn named(variant: Variant) -> Self {
        EfficientNetConfig {
            spec: ModelSpec::Named { variant },
            classes: 1000,
            input_channels: 3,
            dropout: None,
            drop_path_rate: DEFAULT_DROP_PATH_RATE,
            batch_norm: BatchNormStyle::Torchvision,
            classifier_init: ClassifierInit::Uniform,
        }
    }

    pub fn custom(phi: f64, coefficients: CompoundCoefficients) -> Self {
        EfficientNetConfig { spec: ModelSpec::Custom { phi, coefficients }, ..Self::named(Variant::B0) }
    }

    /// The network a job's `model` section describes, with `classes` outputs (the section's
    /// `classes`, or the dataset's count when that is unset): the variant or custom phi with
    /// its coefficients, input channels, dropout (the section's, else the table's), drop-path
    /// rate, BatchNorm style and classifier init. The job spec and the model read the same
    /// scaling table, so `model.resolution()`/`model.dropout()` match the built network.
    pub fn from_spec(model: &effnet_config::ModelConfig, classes: u32) -> EfficientNetConfig {
        let base = match (model.variant, model.phi) {
            (Some(variant), _) => EfficientNetConfig::named(variant),
            (None, None) if model.width.is_some() || model.depth.is_some() => EfficientNetConfig {
                spec: ModelSpec::Multipliers {
                    width: model.width.unwrap_or(1.0),
                    depth: model.depth.unwrap_or(1.0),
                },
                ..Self::named(Variant::B0)
            },
            // A validated spec has exactly one of variant and phi; B0's phi for one without either.
            (None, phi) => EfficientNetConfig::custom(phi.unwrap_or(0.0), model.coefficients()),
        };
        base.with_classes(classes)
            .with_input_channels(model.input_channels)
            .with_dropout(model.dropout())
            .with_drop_path_rate(model.drop_path.rate)
            .with_batch_norm(model.batch_norm)
            .with_classifier_init(model.classifier_init)
    }

    pub fn with_classes(mut self, classes: u32) -> Self {
        self.classes = classes;
        self
    }

    pub fn with_input_channels(mut self, input_channels: u32) -> Self {
        self.input_channels = input_channels;
        self
    }

    pub fn with_drop_path_rate(mut self, drop_path_rate: f64) -> Self {
        self.drop_path_rate = drop_path_rate;
        self
    }

    pub fn with_dropout(mut self, dropout: f64) -> Self {
        self.dropout = Some(dropout);
        self
    }

    pub fn with_batch_norm(mut self, batch_norm: BatchNormStyle) -> Self {
        self.batch_norm = batch_norm;
        self
    }

    pub fn with_classifier_init(mut self, init: ClassifierInit) -> Self {
        self.classifier_init = init;
        self
    }

    /// Check every user-chosen number; the error names the field and the bad value.
    pub fn validate(&self) -> Result<()> {
        if self.classes == 0 {
            return Err(Error::InvalidConfig {
                field: "classes",
                reason: "must be at least 1, got 0".into(),
            });
        }
        if self.input_channels == 0 {
            return Err(Error::InvalidConfig {
                field: "input_channels",
                reason: "must be at least 1, got 0".into(),
            });
        }
        check_probability("drop_path_rate", self.drop_path_rate)?;
        if let Some(dropout) = self.dropout {
            check_probability("dropout", dropout)?;
        }
        self.spec.scaling()?;
        Ok(())
    }

    /// Scale B0's table into the final network.
    pub fn architecture(&self) -> Result<Architecture> {
        self.validate()?;
        let scaling = self.spec.scaling()?;
        let stem_channels = round_channels(STEM_CHANNELS, scaling.width, CHANNEL_DIVISOR);
        let total_blocks: u32 = B0_STAGES.iter().map(|stage| scale_depth(stage.repeats, scaling.depth)).sum();

        let mut stages = Vec::with_capacity(B0_STAGES.len());
        let mut in_channels = stem_channels;
        let mut global_index = 0u32;
        for spec in B0_STAGES {
            let out_channels = round_channels(spec.channels, scaling.width, CHANNEL_DIVISOR);
            let repeats = scale_depth(spec.repeats, scaling.depth);
            let mut blocks = Vec::with_capacity(repeats as usize);
            for repeat in 0..repeats {
                let stride = if repeat == 0 { spec.stride } else { 1 };
                let block_in = if repeat == 0 { in_channels } else { out_channels };
                blocks.push(BlockConfig {
                    global_index,
                    in_channels: block_in,
                    out_channels,
                    expanded_channels: block_in * spec.expand_ratio,
                    se_channels: ((block_in as f64 * SE_RATIO) as u32).max(1),
                    kernel: spec.kernel,
                    stride,
                    drop_path_rate: block_drop_path_rate(self.drop_path_rate, global_index, total_blocks),
                });
                global_index += 1;
            }
            stages.push(StageConfig { spec, out_channels, repeats, blocks });
            in_channels = out_channels;
        }
        let head_channels = HEAD_EXPANSION * in_channels;
        let batch_norm = self.batch_norm.params(self.spec.variant());
        Ok(Architecture {
            name: self.spec.display_name(),
            scaling,
            input_channels: self.input_channels,
            classes: self.classes,
            stem_channels,
            stages,
            head_channels,
            dropout: self.dropout.unwrap_or(scaling.dropout),
            drop_path_rate: self.drop_path_rate,
            batch_norm,
        })
    }
}

fn check_probability(field: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(Error::InvalidConfig { field, reason: format!("must be in [0, 1), got {value}") })
    }
}

/// Stochastic-depth rate of one block: linear in the GLOBAL block index, from 0 for the first
/// block to `max_rate · (n-1)/n` for the last, as torchvision and timm do it. Blocks without an
/// identity skip get a rate too but never use it (see `BlockConfig::has_skip`).
pub fn block_drop_path_rate(max_rate: f64, global_index: u32, total_blocks: u32) -> f64 {
    if total_blocks == 0 {
        return 0.0;
    }
    max_rate * global_index as f64 / total_blocks as f64
}

/// The final architecture: numbers only, no multipliers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Architecture {
    pub name: String,
    pub scaling: Scaling,
    pub input_channels: u32,
    pub classes: u32,
    pub stem_channels: u32,
    pub stages: Vec<StageConfig>,
    pub head_channels: u32,
    pub dropout: f64,
    pub drop_path_rate: f64,
    pub batch_norm: BatchNormParams,
}

impl Architecture {
    pub fn blocks(&self) -> impl Iterator<Item = &BlockConfig> {
        self.stages.iter().flat_map(|stage| stage.blocks.iter())
    }

    pub fn block_count(&self) -> usize {
        self.blocks().count()
    }
}

/// A scaled stage.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StageConfig {
    /// The unscaled row it came from.
    pub spec: StageSpec,
    pub out_channels: u32,
    pub repeats: u32,
    pub blocks: Vec<BlockConfig>,
}

/// One MBConv block with final numbers.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct BlockConfig {
    /// Position among all blocks of the network, from 0.
    pub global_index: u32,
    pub in_channels: u32,
    pub out_channels: u32,
    /// Channels after the 1×1 expansion (equal to `in_channels` at expand ratio 1).
    pub expanded_channels: u32,
    /// Squeeze-excitation bottleneck width: 0.25 of the block's input channels.
    pub se_channels: u32,
    pub kernel: u32,
    pub stride: u32,
    /// This block's stochastic-depth rate at multiplier 1.
    pub drop_path_rate: f64,
}

impl BlockConfig {
    /// Identity skip (and so stochastic depth) only where shapes allow it.
    pub fn has_skip(&self) -> bool {
        self.stride == 1 && self.in_channels == self.out_channels
    }

    pub fn has_expansion(&self) -> bool {
        self.expanded_channels != self.in_channels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b0_architecture_is_table_1() {
        let arch = EfficientNetConfig::named(Variant::B0).architecture().unwrap();
        assert_eq!(arch.stem_channels, 32);
        let channels: Vec<u32> = arch.stages.iter().map(|s| s.out_channels).collect();
        assert_eq!(channels, [16, 24, 40, 80, 112, 192, 320]);
        let repeats: Vec<u32> = arch.stages.iter().map(|s| s.repeats).collect();
        assert_eq!(repeats, [1, 2, 2, 3, 3, 4, 1]);
        assert_eq!(arch.head_channels, 1280);
        assert_eq!(arch.block_count(), 16);
        assert_eq!(arch.dropout, 0.2);
    }

    #[test]
    fn b7_architecture_channels_and_repeats() {
        let arch = EfficientNetConfig::named(Variant::B7).architecture().unwrap();
        assert_eq!(arch.stem_channels, 64);
        let channels: Vec<u32> = arch.stages.iter().map(|s| s.out_channels).collect();
        assert_eq!(channels, [32, 48, 80, 160, 224, 384, 640]);
        let repeats: Vec<u32> = arch.stages.iter().map(|s| s.repeats).collect();
        assert_eq!(repeats, [4, 7, 7, 10, 10, 13, 4]);
        assert_eq!(arch.head_channels, 2560);
        assert_eq!(arch.block_count(), 55);
        assert_eq!(arch.batch_norm, BatchNormParams { eps: 1e-3, momentum: 0.01 });
    }

    #[test]
    fn batch_norm_per_variant_and_tf_override() {
        let b4 = EfficientNetConfig::named(Variant::B4).architecture().unwrap();
        assert_eq!(b4.batch_norm, BatchNormParams { eps: 1e-5, momentum: 0.1 });
        let b0_tf = EfficientNetConfig::named(Variant::B0)
            .with_batch_norm(BatchNormStyle::Tf)
            .architecture()
            .unwrap();
        assert_eq!(b0_tf.batch_norm, BatchNormParams { eps: 1e-3, momentum: 0.01 });
    }

    #[test]
    fn se_and_expansion_follow_the_block_input() {
        let arch = EfficientNetConfig::named(Variant::B0).architecture().unwrap();
        let first = arch.blocks().next().unwrap();
        assert!(!first.has_expansion());
        assert_eq!(first.se_channels, 8); // 32 / 4
        let second = arch.blocks().nth(1).unwrap();
        assert_eq!((second.in_channels, second.expanded_channels, second.se_channels), (16, 96, 4));
        assert!(!second.has_skip());
        assert!(arch.blocks().nth(2).unwrap().has_skip());
    }

    #[test]
    fn drop_path_rates_are_linear_in_the_global_index() {
        let arch = EfficientNetConfig::named(Variant::B3).with_drop_path_rate(0.3).architecture().unwrap();
        let count = arch.block_count() as f64;
        for (position, block) in arch.blocks().enumerate() {
            assert_eq!(block.global_index as usize, position);
            let expected = 0.3 * position as f64 / count;
            assert!((block.drop_path_rate - expected).abs() < 1e-15);
        }
    }

    fn job_model(model: &str) -> effnet_config::ModelConfig {
        let text = format!("name: a\nmodel: {model}\ndata: {{train: t}}\n");
        effnet_config::JobSpec::from_yaml_str(&text, "job.yaml")
            .unwrap_or_else(|error| panic!("{error}"))
            .model
    }

    #[test]
    fn from_spec_builds_what_the_job_spec_describes() {
        let model = job_model(
            "{variant: b5, input_channels: 1, dropout: 0.1, batch_norm: timm, classifier_init: zero, \
             drop_path: {rate: 0.3}}",
        );
        let config = EfficientNetConfig::from_spec(&model, 10);
        let expected = EfficientNetConfig::named(Variant::B5)
            .with_classes(10)
            .with_input_channels(1)
            .with_dropout(0.1)
            .with_drop_path_rate(0.3)
            .with_batch_norm(BatchNormStyle::Pytorch)
            .with_classifier_init(ClassifierInit::Zero);
        assert_eq!(config, expected);

        let model = job_model("{phi: 1.5, alpha: 1.3, beta: 1.05, gamma: 1.1}");
        let config = EfficientNetConfig::from_spec(&model, 1000);
        let coefficients = CompoundCoefficients { alpha: 1.3, beta: 1.05, gamma: 1.1 };
        assert_eq!(config.spec, ModelSpec::Custom { phi: 1.5, coefficients });
        assert_eq!(config.batch_norm, BatchNormStyle::Torchvision);
        assert_eq!(config.classifier_init, ClassifierInit::Uniform);

        // By multipliers: B0's channels halved and its repeats doubled.
        let config = EfficientNetConfig::from_spec(&job_model("{width: 0.5, depth: 2, resolution: 32}"), 10);
        assert_eq!(config.spec, ModelSpec::Multipliers { width: 0.5, depth: 2.0 });
        assert_eq!(config.spec.display_name(), "EfficientNet-w0.5-d2");
        let arch = config.architecture().unwrap();
        let channels: Vec<u32> = arch.stages.iter().map(|s| s.out_channels).collect();
        assert_eq!(channels, [8, 16, 24, 40, 56, 96, 160]);
        let repeats: Vec<u32> = arch.stages.iter().map(|s| s.repeats).collect();
        assert_eq!(repeats, [2, 4, 4, 6, 6, 8, 2]);
        assert_eq!(arch.batch_norm, BatchNormParams::TF);
    }

    #[test]
    fn the_job_spec_and_the_built_network_read_one_table() {
        let mut models: Vec<String> =
            Variant::ALL.iter().map(|variant| format!("{{variant: {variant}}}")).collect();
        models.extend(["-1", "0", "0.5", "1", "2.5", "7"].map(|phi| format!("{{phi: {phi}}}")));
        models.push("{phi: 2, gamma: 1.2}".into());
        for text in models {
            let model = job_model(&text);
            let arch = EfficientNetConfig::from_spec(&model, 1000).architecture().unwrap();
            assert_eq!(arch.scaling.resolution, model.resolution(), "{text}");
            assert_eq!(arch.dropout, model.dropout(), "{text}");
            assert_eq!(Some(arch.scaling), model.scaling().ok(), "{text}");
        }
        // The disagreement this replaced: phi 1 trained at 258 px with dropout 0.2.
        let arch = EfficientNetConfig::from_spec(&job_model("{phi: 1}"), 1000).architecture().unwrap();
        assert_eq!((arch.scaling.resolution, arch.dropout), (256, 0.25));
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let zero_classes = EfficientNetConfig::named(Variant::B0).with_classes(0).validate().unwrap_err();
        assert!(zero_classes.to_string().contains("classes"), "{zero_classes}");
        let bad_rate =
            EfficientNetConfig::named(Variant::B0).with_drop_path_rate(1.5).validate().unwrap_err();
        assert!(bad_rate.to_string().contains("drop_path_rate") && bad_rate.to_string().contains("1.5"));
        let zero_channels =
            EfficientNetConfig::named(Variant::B0).with_input_channels(0).validate().unwrap_err();
        assert!(zero_channels.to_string().contains("input_channels"));
    }
}
