//! Evaluation of a model on a dataset: top-1, top-5, loss, and the confusion matrix (so per-class
//! accuracy), with the variant's eval transform (resize + centre crop). Used by the trainer at
//! its evaluation interval and by `effnet eval` on any committed checkpoint. With several ranks
//! each evaluates its share of the dataset and the counts are summed.
//!
//! Deterministic: the dataset is read in a fixed order (plan seed 0, no shuffling), the model is
//! in eval mode, and the counts are integers.

use std::sync::Arc;
use std::time::Instant;

use effnet_data::EpochPlan;
use effnet_data::loader::{BatchLoader, StreamOptions, Transform};
use effnet_data::reader::Dataset;
use effnet_model::{EfficientNet, EfficientNetConfig};
use effnet_store::redact;
use effnet_vision::EvalTransform;
use serde::{Deserialize, Serialize};
use tch::nn::ModuleT;
use tch::{Device, Kind, Reduction, Tensor};

pub use effnet_jobdir::evaluation::{CheckpointReport, ClassResult, FinalEvaluation};

use crate::amp;
use crate::error::{Error, Result};
use crate::sync::DataParallel;
use crate::tensors::batch_tensors;

/// The summary kept in checkpoints and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
    pub samples: u64,
    pub images_per_s: f64,
}

/// Everything one evaluation measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub metrics: EvalMetrics,
    /// `confusion[true][predicted]`: sample counts.
    pub confusion: Vec<Vec<u64>>,
}

impl Evaluation {
    /// Top-1 accuracy of each true class (`None` for a class with no samples).
    pub fn per_class(&self) -> Vec<Option<f64>> {
        self.confusion
            .iter()
            .enumerate()
            .map(|(class, row)| {
                let total: u64 = row.iter().sum();
                (total > 0).then(|| row[class] as f64 / total as f64)
            })
            .collect()
    }
}

/// What [`evaluate`] reads and how.
pub struct EvalSettings<'a> {
    pub dataset: &'a Arc<Dataset>,
    pub transform: &'a EvalTransform,
    pub batch_size: usize,
    /// All samples, or the first `max_samples` (split over the ranks).
    pub max_samples: Option<u64>,
    pub precision: Precision,
    /// Decode threads.
    pub threads: usize,
}

/// How the forward pass runs: device, bf16 autocast, channels_last inputs.
#[derive(Clone, Copy, Debug)]
pub struct Precision {
    pub device: Device,
    pub bf16: bool,
    pub channels_last: bool,
}

impl Precision {
    /// Logits in float32 whatever the compute precision, so losses and metrics are computed in
    /// float32.
    pub fn forward(&self, model: &EfficientNet, xs: &Tensor, train: bool) -> Result<Tensor> {
        let xs = if self.channels_last { amp::channels_last(xs)? } else { xs.shallow_clone() };
        let logits = if self.bf16 {
            amp::autocast_bf16(self.device, || model.forward_t(&xs, train))?
        } else {
            model.forward_t(&xs, train)
        };
        Ok(logits.to_kind(Kind::Float))
    }
}

/// Correct predictions among the top 1 and the top `k` logits of each row. Ties are broken
/// towards the lower class index (a stable descending sort), so the result is deterministic.
pub fn top_k_hits(logits: &Tensor, labels: &Tensor, k: i64) -> (i64, i64) {
    let (_, indices) = logits.sort_stable(true, -1, true);
    let indices = indices.narrow(1, 0, k);
    let matches = indices.eq_tensor(&labels.unsqueeze(1));
    let top1 = matches.narrow(1, 0, 1).sum(Kind::Int64).int64_value(&[]);
    let topk = matches.any_dim(1, false).sum(Kind::Int64).int64_value(&[]);
    (top1, topk)
}

/// Evaluate `model` on the settings' dataset. Every rank of `parallel` must call it; every rank
/// returns the same result.
pub fn evaluate(
    runtime: &tokio::runtime::Runtime,
    model: &EfficientNet,
    settings: &EvalSettings<'_>,
    parallel: Option<&mut DataParallel>,
) -> Result<Evaluation> {
    let (rank, world) = parallel.as_ref().map_or((0, 1), |p| (p.rank(), p.world_size()));
    let device = settings.precision.device;
    let classes = model.architecture().classes as usize;
    let started = Instant::now();
    let plan = EpochPlan::new(0, 0, settings.dataset.row_groups(), world)?;
    let limit =
        settings.max_samples.map(|max| max / world as u64 + u64::from((rank as u64) < max % world as u64));
    let options = StreamOptions {
        batch_size: settings.batch_size,
        threads: settings.threads.max(1),
        seed: 0,
        shuffle_buffer: 1,
        prefetch: 4,
    };
    let transform = Transform::Eval(settings.transform.clone());
    let mut loader = runtime.block_on(BatchLoader::open(
        settings.dataset.clone(),
        &plan,
        rank,
        None,
        transform,
        options,
    ))?;
    let (mut samples, mut top1, mut top5, mut loss) = (0u64, 0i64, 0i64, 0f64);
    let mut confusion = Tensor::zeros([(classes * classes) as i64], (Kind::Int64, Device::Cpu));
    while limit.is_none_or(|l| samples < l)
        && let Some(batch) = runtime.block_on(loader.next_batch())?
    {
        let mut n = batch.labels.len();
        if let Some(limit) = limit {
            n = n.min((limit - samples) as usize);
        }
        let tensors = batch_tensors(&batch, device)?;
        let xs = tensors.images.narrow(0, 0, n as i64);
        let ys = tensors.labels.narrow(0, 0, n as i64);
        let (batch_loss, hits1, hits5, cells) = tch::no_grad(|| -> Result<(f64, i64, i64, Tensor)> {
            let logits = settings.precision.forward(model, &xs, false)?;
            let batch_loss =
                logits.cross_entropy_loss::<Tensor>(&ys, None, Reduction::Sum, -100, 0.0).double_value(&[]);
            let (hits1, hits5) = top_k_hits(&logits, &ys, (classes as i64).min(5));
            let predicted = logits.argmax(-1, false);
            let cells = (&ys * classes as i64 + predicted)
                .to_device(Device::Cpu)
                .bincount::<Tensor>(None, (classes * classes) as i64);
            Ok((batch_loss, hits1, hits5, cells))
        })?;
        loss += batch_loss;
        top1 += hits1;
        top5 += hits5;
        confusion += cells;
        samples += n as u64;
    }
    let cells =
        Vec::<i64>::try_from(&confusion).map_err(|e| Error::Internal(format!("confusion matrix: {e}")))?;
    let mut counts: Vec<f64> = [samples as f64, top1 as f64, top5 as f64, loss].into_iter().collect();
    counts.extend(cells.iter().map(|&c| c as f64));
    if let Some(parallel) = parallel {
        parallel.sum(&mut counts)?;
    }
    let (samples, top1, top5, loss) = (counts[0], counts[1], counts[2], counts[3]);
    let confusion: Vec<Vec<u64>> =
        counts[4..].chunks(classes).map(|row| row.iter().map(|&c| c as u64).collect()).collect();
    let denominator = samples.max(1.0);
    Ok(Evaluation {
        metrics: EvalMetrics {
            top1: top1 / denominator,
            top5: top5 / denominator,
            loss: loss / denominator,
            samples: samples as u64,
            images_per_s: samples / started.elapsed().as_secs_f64().max(1e-9),
        },
        confusion,
    })
}

/// The trainer's evaluations: when they are due, on which data, with which transform.
pub struct Evaluator {
    dataset: Option<Arc<Dataset>>,
    transform: EvalTransform,
    batch_size: usize,
    max_samples: Option<u64>,
    every: Option<crate::schedule::Interval>,
    /// Evaluate the EMA weights too.
    pub ema: bool,
}

impl Evaluator {
    pub fn from_config(
        spec: &effnet_config::JobSpec,
        dataset: Option<Arc<Dataset>>,
        transform: EvalTransform,
        every: Option<crate::schedule::Interval>,
    ) -> Evaluator {
        Evaluator {
            dataset,
            transform,
            batch_size: spec.eval_batch_size() as usize,
            max_samples: spec.eval.max_samples,
            every,
            ema: spec.eval.ema,
        }
    }

    /// An evaluation is due after the step that took the job from `consumed_before` to
    /// `consumed_after` samples (`step` steps done), and always after the last.
    pub fn due(
        &self,
        step: u64,
        consumed_before: u64,
        consumed_after: u64,
        epoch_samples: u64,
        last: bool,
    ) -> bool {
        self.dataset.is_some()
            && (last
                || self
                    .every
                    .is_some_and(|every| every.crossed(step, consumed_before, consumed_after, epoch_samples)))
    }

    /// The validation classes' names.
    pub fn classes(&self) -> &[String] {
        self.dataset.as_ref().map(|d| d.manifest.classes.as_slice()).unwrap_or_default()
    }

    /// Evaluate the raw network and, when asked, the average (every rank must call it).
    pub fn run(
        &self,
        runtime: &tokio::runtime::Runtime,
        network: &crate::network::Network,
        averaged: Option<&crate::network::Network>,
        mut parallel: Option<&mut DataParallel>,
    ) -> Result<(Evaluation, Option<Evaluation>)> {
        let dataset = self.dataset.as_ref().ok_or_else(|| Error::Internal("no validation data".into()))?;
        let settings = EvalSettings {
            dataset,
            transform: &self.transform,
            batch_size: self.batch_size,
            max_samples: self.max_samples,
            precision: network.precision,
            threads: 1,
        };
        let raw = evaluate(runtime, &network.model, &settings, parallel.as_deref_mut())?;
        let average = match averaged {
            Some(averaged) if self.ema => Some(evaluate(runtime, &averaged.model, &settings, parallel)?),
            _ => None,
        };
        Ok((raw, average))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_counts_hand_made_logits() {
        // Four samples, six classes.
        let logits = Tensor::from_slice(&[
            0.1f32, 0.9, 0.0, 0.0, 0.0, 0.0, // argmax 1
            0.5, 0.1, 0.2, 0.3, 0.4, 0.0, // order 0, 4, 3, 2, 1, 5
            0.0, 0.0, 0.0, 0.0, 0.0, 1.0, // argmax 5
            0.3, 0.3, 0.2, 0.1, 0.0, 0.4, // order 5, then the 0.3 tie: 0 before 1, then 2, 3, 4
        ])
        .view([4, 6]);
        let labels = Tensor::from_slice(&[1i64, 1, 2, 4]);
        // Sample 0: top-1 hit. Sample 1: label 1 is 5th, outside top-1, inside top-5.
        // Sample 2: label 2 ties with four zeros after class 5; the stable sort ranks 0, 1, 2, 3, 4,
        // so 2 is 4th: top-5 hit. Sample 3: label 4 is 6th: no hit.
        assert_eq!(top_k_hits(&logits, &labels, 5), (1, 3));
        assert_eq!(top_k_hits(&logits, &labels, 1), (1, 1));
        assert_eq!(top_k_hits(&logits, &labels, 2), (1, 1));
    }

    #[test]
    fn per_class_accuracy_reads_the_confusion_rows() {
        let evaluation = Evaluation {
            metrics: EvalMetrics { top1: 0.0, top5: 0.0, loss: 0.0, samples: 7, images_per_s: 0.0 },
            confusion: vec![vec![3, 1, 0], vec![0, 0, 0], vec![1, 1, 1]],
        };
        assert_eq!(evaluation.per_class(), vec![Some(0.75), None, Some(1.0 / 3.0)]);
    }
}

/// `effnet eval`: which checkpoint, which data, which weights.
#[derive(Clone, Debug)]
pub struct CheckpointEvalOptions {
    pub checkpoint: String,
    pub data: String,
    /// Evaluate the EMA weights instead of the raw ones.
    pub ema: bool,
    pub batch_size: usize,
    pub max_samples: Option<u64>,
    /// libtorch threads (`None`: all cores).
    pub threads: Option<usize>,
}

/// What a [`CheckpointReport`] says about the checkpoint, model and data besides the evaluation.
#[derive(Clone, Debug)]
pub struct ReportHeader {
    pub checkpoint: String,
    pub step: u64,
    pub epoch: u64,
    pub job: String,
    pub data: String,
    pub architecture: String,
    pub parameters: i64,
    pub resolution: u32,
    pub gflops: f64,
    pub device: String,
}

/// The report of one evaluation (`weights`: "raw" or "ema"), with per-class accuracy named by the
/// dataset's classes. The trainer's final evaluation and `effnet eval` both build it here.
pub fn checkpoint_report(
    header: ReportHeader,
    weights: &str,
    class_names: &[String],
    evaluation: Evaluation,
) -> CheckpointReport {
    let classes = class_names
        .iter()
        .zip(&evaluation.confusion)
        .zip(evaluation.per_class())
        .map(|((name, row), top1)| ClassResult { class: name.clone(), samples: row.iter().sum(), top1 })
        .collect();
    let metrics = evaluation.metrics;
    CheckpointReport {
        checkpoint: header.checkpoint,
        step: header.step,
        epoch: header.epoch,
        job: header.job,
        weights: weights.to_string(),
        data: header.data,
        architecture: header.architecture,
        parameters: header.parameters,
        resolution: header.resolution,
        gflops: header.gflops,
        top1: metrics.top1,
        top5: metrics.top5,
        loss: metrics.loss,
        samples: metrics.samples,
        images_per_s: metrics.images_per_s,
        peak_memory_bytes: peak_rss_bytes(),
        device: header.device,
        classes,
        confusion: evaluation.confusion,
    }
}

/// Peak resident set size of this process, from /proc (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Evaluate one committed checkpoint (checksums verified) on a dataset with the eval transform
/// of the job it was trained with. Bad input (missing or uncommitted checkpoint, a dataset with
/// other classes) is an error naming it.
pub fn evaluate_checkpoint(options: &CheckpointEvalOptions) -> Result<CheckpointReport> {
    use crate::checkpoint::{self, EMA_FILE, MODEL_FILE};
    use crate::job::{eval_transform, open_dataset, runtime};
    use crate::state::read_state;
    use crate::tensors::{from_safetensors, load_into};

    let url = options.checkpoint.as_str();
    let damaged = |reason: String| Error::BadCheckpoint { url: url.to_string(), reason };
    let runtime = runtime()?;
    let (_, files) = runtime.block_on(checkpoint::load_url(url))?;
    let state = read_state(url, files.clone())?;
    let spec = state.spec.clone().ok_or_else(|| Error::IncompatibleCheckpoint {
        url: url.to_string(),
        reason:
            "it was written before checkpoints carried their job spec; evaluate it with the job that wrote it"
                .into(),
    })?;
    let dataset = runtime.block_on(open_dataset("--data", &options.data))?;
    let classes = dataset.manifest.classes.len() as u32;
    if classes != state.model.classes {
        return Err(Error::invalid(
            "--data",
            format!(
                "{} has {classes} classes but the checkpoint's model has {}",
                options.data, state.model.classes
            ),
        ));
    }
    if let Some(threads) = options.threads {
        tch::set_num_threads(threads.max(1) as i32);
    }
    let device = Device::Cpu;
    let vs = tch::nn::VarStore::new(device);
    let config = EfficientNetConfig::from_spec(&spec.model, classes);
    let model = EfficientNet::new(&vs.root(), &config)?;
    let (file, weights) = if options.ema { (EMA_FILE, "ema") } else { (MODEL_FILE, "raw") };
    let bytes = files.get(file).ok_or_else(|| {
        if options.ema {
            Error::invalid(
                "--ema",
                format!("checkpoint {url} has no EMA weights (training.ema.enabled was false)"),
            )
        } else {
            damaged(format!("{file} is missing"))
        }
    })?;
    load_into(&vs, from_safetensors(bytes).map_err(damaged)?)
        .map_err(|reason| Error::IncompatibleCheckpoint { url: url.to_string(), reason })?;
    let transform = eval_transform(&spec)?;
    let resolution = spec.model.resolution();
    let batch_size = options.batch_size.max(1);
    crate::job::batch_fits_in_memory(
        "--batch-size",
        batch_size as u64,
        spec.model.input_channels,
        resolution,
    )?;
    let settings = EvalSettings {
        dataset: &dataset,
        transform: &transform,
        batch_size,
        max_samples: options.max_samples,
        precision: Precision { device, bf16: false, channels_last: false },
        threads: 1,
    };
    let evaluation = evaluate(&runtime, &model, &settings, None)?;
    let header = ReportHeader {
        // Printed and written for people: URLs redacted.
        checkpoint: redact(url),
        step: state.step,
        epoch: state.epoch,
        job: spec.name.clone(),
        data: redact(&options.data),
        architecture: state.model.architecture.clone(),
        parameters: model.parameter_count(),
        resolution,
        gflops: model.multiply_adds(resolution) as f64 / 1e9,
        device: format!("{device:?}"),
    };
    Ok(checkpoint_report(header, weights, &dataset.manifest.classes, evaluation))
}
