//! `effnet model summary` and `effnet model infer`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use effnet_model::{
    Architecture, BatchNormStyle, CompoundCoefficients, EfficientNet, EfficientNetConfig, KeyLayout, Variant,
    load_safetensors,
};
use serde::Serialize;
use tch::{Device, Kind, Tensor, nn, nn::ModuleT};

use crate::commands::positive_u32;
use crate::failure::bad_input;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Width, depth, resolution, per-stage channels and repeats, parameters and GFLOPs.
    Summary(SummaryArgs),
    /// Eval-mode logits for a batch of images stored as .npy (N×C×H×W float).
    Infer(InferArgs),
}

/// Which network: a named variant, or a custom compound coefficient.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Named variant b0..b7 (ignored when --phi is given).
    #[arg(long, default_value = "b0")]
    pub variant: String,
    /// Custom compound coefficient in [-4, 16]: depth alpha^phi, width beta^phi, resolution
    /// 224·gamma^phi rounded to a multiple of 8, dropout 0.2 + 0.05·phi (at most 0.5), the
    /// rule a job's `model.phi` follows too.
    #[arg(long, allow_negative_numbers = true)]
    pub phi: Option<f64>,
    /// Depth base (at least 1).
    #[arg(long, default_value_t = 1.2, allow_negative_numbers = true)]
    pub alpha: f64,
    /// Width base (at least 1).
    #[arg(long, default_value_t = 1.1, allow_negative_numbers = true)]
    pub beta: f64,
    /// Resolution base (at least 1).
    #[arg(long, default_value_t = 1.15, allow_negative_numbers = true)]
    pub gamma: f64,
    /// Output classes.
    #[arg(long, default_value_t = 1000, allow_negative_numbers = true)]
    pub classes: i64,
    /// Input image channels (1 for grey data).
    #[arg(long, default_value_t = 3, allow_negative_numbers = true)]
    pub input_channels: i64,
    /// Dropout before the classifier (default: the variant's, or 0.2 + 0.05·phi).
    #[arg(long, allow_negative_numbers = true)]
    pub dropout: Option<f64>,
    /// Maximum stochastic-depth rate.
    #[arg(long, default_value_t = 0.2, allow_negative_numbers = true)]
    pub drop_path_rate: f64,
    /// BatchNorm eps/momentum: `torchvision` (per variant: B0–B4 1e-5/0.1, B5–B7 1e-3/0.01),
    /// `tf` (1e-3/0.01 everywhere) or `pytorch` / `timm` (1e-5/0.1 everywhere, for timm weights).
    #[arg(long, default_value = "torchvision")]
    pub batch_norm: String,
}

impl ModelArgs {
    pub fn config(&self) -> anyhow::Result<EfficientNetConfig> {
        let base = match self.phi {
            Some(phi) => EfficientNetConfig::custom(
                phi,
                CompoundCoefficients { alpha: self.alpha, beta: self.beta, gamma: self.gamma },
            ),
            None => EfficientNetConfig::named(self.variant.parse::<Variant>()?),
        };
        let classes = positive_u32("--classes", self.classes)?;
        let input_channels = positive_u32("--input-channels", self.input_channels)?;
        let batch_norm: BatchNormStyle = self.batch_norm.parse()?;
        let mut config = base
            .with_classes(classes)
            .with_input_channels(input_channels)
            .with_drop_path_rate(self.drop_path_rate)
            .with_batch_norm(batch_norm);
        if let Some(dropout) = self.dropout {
            config = config.with_dropout(dropout);
        }
        config.validate()?;
        Ok(config)
    }
}

#[derive(Debug, Args)]
pub struct SummaryArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Resolution for the FLOPs count (default: the variant's).
    #[arg(long, allow_negative_numbers = true)]
    pub resolution: Option<i64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Summarise B0–B7 side by side with the published numbers (ignores the model options).
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct InferArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Weights (.safetensors) with torchvision or timm names.
    #[arg(long)]
    pub weights: PathBuf,
    /// Tensor names in the weights file: auto, torchvision or timm.
    #[arg(long, default_value = "auto")]
    pub layout: String,
    /// Input images, N×C×H×W float32/float64 .npy, already normalised.
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the N×classes float32 logits (.npy).
    #[arg(long)]
    pub output: PathBuf,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16, allow_negative_numbers = true)]
    pub batch_size: i64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Summary(args) if args.all => summary_all(args.json),
        ModelCommand::Summary(args) => summary(&args),
        ModelCommand::Infer(args) => infer(&args),
    }
}

/// One row of the per-stage table (the paper's Table 1 layout).
#[derive(Debug, Serialize)]
struct StageRow {
    stage: usize,
    operator: String,
    /// Input side length of the stage.
    resolution: u32,
    channels: u32,
    layers: u32,
}

#[derive(Debug, Serialize)]
struct Summary {
    name: String,
    width: f64,
    depth: f64,
    /// The variant's native resolution.
    native_resolution: u32,
    /// The resolution FLOPs were counted at.
    resolution: u32,
    dropout: f64,
    drop_path_rate: f64,
    classes: u32,
    input_channels: u32,
    batch_norm_eps: f64,
    batch_norm_momentum: f64,
    blocks: usize,
    stages: Vec<StageRow>,
    parameters: i64,
    multiply_adds: u64,
    gflops: f64,
}

fn build_summary(config: &EfficientNetConfig, resolution: Option<u32>) -> anyhow::Result<Summary> {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = EfficientNet::new(&vs.root(), config)?;
    let arch = model.architecture();
    let resolution = resolution.unwrap_or(arch.scaling.resolution);
    let multiply_adds = model.multiply_adds(resolution);
    Ok(Summary {
        name: arch.name.clone(),
        width: arch.scaling.width,
        depth: arch.scaling.depth,
        native_resolution: arch.scaling.resolution,
        resolution,
        dropout: arch.dropout,
        drop_path_rate: arch.drop_path_rate,
        classes: arch.classes,
        input_channels: arch.input_channels,
        batch_norm_eps: arch.batch_norm.eps,
        batch_norm_momentum: arch.batch_norm.momentum,
        blocks: arch.block_count(),
        stages: stage_rows(arch, resolution),
        parameters: model.parameter_count(),
        multiply_adds,
        gflops: multiply_adds as f64 / 1e9,
    })
}

fn stage_rows(arch: &Architecture, resolution: u32) -> Vec<StageRow> {
    let mut rows = vec![StageRow {
        stage: 1,
        operator: "Conv3x3".into(),
        resolution,
        channels: arch.stem_channels,
        layers: 1,
    }];
    let mut side = resolution.div_ceil(2);
    for (index, stage) in arch.stages.iter().enumerate() {
        rows.push(StageRow {
            stage: index + 2,
            operator: format!(
                "MBConv{}, k{}x{}",
                stage.spec.expand_ratio, stage.spec.kernel, stage.spec.kernel
            ),
            resolution: side,
            channels: stage.out_channels,
            layers: stage.repeats,
        });
        side = side.div_ceil(stage.spec.stride);
    }
    rows.push(StageRow {
        stage: arch.stages.len() + 2,
        operator: "Conv1x1 & Pooling & FC".into(),
        resolution: side,
        channels: arch.head_channels,
        layers: 1,
    });
    rows
}

fn summary(args: &SummaryArgs) -> anyhow::Result<()> {
    let config = args.model.config()?;
    let resolution = match args.resolution {
        None => None,
        Some(r) if (32..=4096).contains(&r) => Some(r as u32),
        Some(r) => return Err(bad_input!("--resolution must be from 32 to 4096, got {r}")),
    };
    let summary = build_summary(&config, resolution)?;
    if args.json {
        out!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    out!(
        "{}  width {:.3}  depth {:.3}  resolution {}  dropout {:.2}  drop path {:.2}",
        summary.name,
        summary.width,
        summary.depth,
        summary.native_resolution,
        summary.dropout,
        summary.drop_path_rate
    );
    out!(
        "classes {}  input channels {}  BatchNorm eps {:e} momentum {}  blocks {}",
        summary.classes,
        summary.input_channels,
        summary.batch_norm_eps,
        summary.batch_norm_momentum,
        summary.blocks
    );
    out!();
    out!("{:<6} {:<24} {:>11} {:>9} {:>7}", "stage", "operator", "resolution", "channels", "layers");
    for row in &summary.stages {
        out!(
            "{:<6} {:<24} {:>11} {:>9} {:>7}",
            row.stage,
            row.operator,
            format!("{0}x{0}", row.resolution),
            row.channels,
            row.layers
        );
    }
    out!();
    out!("parameters  {}", group_thousands(summary.parameters));
    out!(
        "GFLOPs      {:.3} (multiply-adds at {}x{})",
        summary.gflops,
        summary.resolution,
        summary.resolution
    );
    Ok(())
}

#[derive(Debug, Serialize)]
struct ComparisonRow {
    variant: Variant,
    width: f64,
    depth: f64,
    resolution: u32,
    dropout: f64,
    blocks: usize,
    parameters: i64,
    reference_parameters: i64,
    gflops: f64,
    paper_gflops: f64,
    paper_top1: f64,
}

fn summary_all(json: bool) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for variant in Variant::ALL {
        let summary = build_summary(&EfficientNetConfig::named(variant), None)?;
        let reference = variant.reference();
        rows.push(ComparisonRow {
            variant,
            width: summary.width,
            depth: summary.depth,
            resolution: summary.resolution,
            dropout: summary.dropout,
            blocks: summary.blocks,
            parameters: summary.parameters,
            reference_parameters: reference.parameters,
            gflops: summary.gflops,
            paper_gflops: reference.paper_gflops,
            paper_top1: reference.paper_top1,
        });
    }
    if json {
        out!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    out!("EfficientNet B0–B7, 1000 classes: built here vs torchvision (parameters) and the paper (GFLOPs)");
    out!();
    out!(
        "{:<7} {:>5} {:>5} {:>5} {:>7} {:>6} {:>12} {:>12} {:>7} {:>7} {:>7}",
        "variant",
        "width",
        "depth",
        "res",
        "dropout",
        "blocks",
        "parameters",
        "torchvision",
        "GFLOPs",
        "paper",
        "top-1"
    );
    for row in &rows {
        out!(
            "{:<7} {:>5.1} {:>5.1} {:>5} {:>7.1} {:>6} {:>12} {:>12} {:>7.2} {:>7.2} {:>6.1}%",
            row.variant.name(),
            row.width,
            row.depth,
            row.resolution,
            row.dropout,
            row.blocks,
            group_thousands(row.parameters),
            group_thousands(row.reference_parameters),
            row.gflops,
            row.paper_gflops,
            row.paper_top1
        );
    }
    let all_equal = rows.iter().all(|r| r.parameters == r.reference_parameters);
    out!();
    out!("parameter counts {} torchvision's", if all_equal { "all equal" } else { "DIFFER from" });
    Ok(())
}

fn group_thousands(value: i64) -> String {
    let digits = value.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if value < 0 { format!("-{out}") } else { out }
}

fn parse_device(text: &str) -> anyhow::Result<Device> {
    let device = match text {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(index) => Device::Cuda(index),
            None => return Err(bad_input!("--device: '{other}' is not cpu, cuda or cuda:N")),
        },
    };
    if let Device::Cuda(index) = device {
        let available = tch::Cuda::device_count();
        if index as i64 >= available {
            return Err(bad_input!(
                "--device {text}: CUDA device {index} is not available ({available} visible)"
            ));
        }
    }
    Ok(device)
}

fn read_input(path: &Path, input_channels: u32) -> anyhow::Result<Tensor> {
    if !path.is_file() {
        return Err(bad_input!("input {}: no such file", path.display()));
    }
    let tensor = Tensor::read_npy(path).map_err(|e| {
        bad_input!(
            "input {}: not a readable .npy file ({})",
            path.display(),
            e.to_string().lines().next().unwrap_or("")
        )
    })?;
    let shape = tensor.size();
    if shape.len() != 4 {
        return Err(bad_input!(
            "input {}: expected 4 dimensions N×C×H×W, got shape {shape:?}",
            path.display()
        ));
    }
    if shape[1] != input_channels as i64 {
        return Err(bad_input!(
            "input {}: {} channels, the model takes {input_channels} (--input-channels)",
            path.display(),
            shape[1]
        ));
    }
    if shape[0] == 0 || shape[2] < 8 || shape[3] < 8 {
        return Err(bad_input!("input {}: shape {shape:?} is empty or smaller than 8×8", path.display()));
    }
    if !tensor.is_floating_point() {
        return Err(bad_input!("input {}: dtype {:?} is not floating point", path.display(), tensor.kind()));
    }
    Ok(tensor.to_kind(Kind::Float))
}

fn infer(args: &InferArgs) -> anyhow::Result<()> {
    let config = args.model.config()?;
    let layout: KeyLayout = args.layout.parse()?;
    let batch_size = positive_u32("--batch-size", args.batch_size)? as i64;
    let device = parse_device(&args.device)?;
    let input = read_input(&args.input, config.input_channels)?;

    let mut vs = nn::VarStore::new(Device::Cpu);
    let model = EfficientNet::new(&vs.root(), &config)?;
    let report = load_safetensors(&vs, &args.weights, layout)?;
    vs.set_device(device);
    tracing::info!(
        weights = %args.weights.display(),
        layout = ?report.layout,
        tensors = report.loaded,
        "loaded weights"
    );

    let logits = tch::no_grad(|| -> anyhow::Result<Tensor> {
        let chunks = input.split(batch_size, 0);
        let outputs: Vec<Tensor> = chunks
            .iter()
            .map(|chunk| model.forward_t(&chunk.to_device(device), false).to_device(Device::Cpu))
            .collect();
        Ok(Tensor::cat(&outputs, 0))
    })?;
    logits.write_npy(&args.output).with_context(|| format!("writing {}", args.output.display()))?;
    tracing::info!(output = %args.output.display(), shape = ?logits.size(), "wrote logits");
    Ok(())
}
