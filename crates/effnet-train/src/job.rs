//! From a job spec to everything the run needs, validated before anything is written: the
//! datasets (manifest and Parquet schema), the model, the transforms, the device, the schedules
//! and the derived [`RunPlan`] that `effnet run --check` prints.

use std::path::PathBuf;
use std::sync::Arc;

use effnet_config::JobSpec;
use effnet_data::EpochPlan;
use effnet_data::loader::Transform;
use effnet_data::reader::Dataset;
use effnet_data::{RowGroupRef, WorkUnit};
use effnet_model::{EfficientNet, EfficientNetConfig};
use effnet_vision::{
    ChannelPolicy, EvalConfig, EvalTransform, Normalization, RandAugment, RandomResizedCrop, TrainConfig,
    TrainTransform,
};
use serde::Serialize;
use tch::Device;
use tch::nn::VarStore;

use crate::error::{Error, Result};
use crate::progress::TrainLength;
use crate::schedule::{DropPathRamp, Interval, LrSchedule};
use crate::state::ModelIdentity;

/// The plan derived from a job spec: numbers a user can check with `effnet run --check`.
#[derive(Clone, Debug, Serialize)]
pub struct RunPlan {
    pub job: String,
    pub job_dir: PathBuf,
    pub model: ModelIdentity,
    pub resolution: u32,
    pub dropout: f64,
    /// The datasets' own names (their manifests' `name`, e.g. `fashion-mnist train`).
    pub train_dataset: String,
    pub val_dataset: Option<String>,
    pub train_samples: u64,
    pub val_samples: Option<u64>,
    pub global_batch: u64,
    /// Real steps of the first epoch (every rank's share in batches; the last may be short).
    pub steps_per_epoch: u64,
    /// Real steps of the whole run as planned (corrupt samples can only make it fewer).
    pub total_steps: u64,
    pub length: TrainLength,
    pub schedule: LrSchedule,
    pub drop_path: DropPathRamp,
    pub eval_every: Option<Interval>,
    pub checkpoint_url: String,
    pub multiply_adds: u64,
}

/// A validated job: its plan and the parts the run builds from.
pub struct Prepared {
    pub plan: RunPlan,
    pub train: Arc<Dataset>,
    pub val: Option<Arc<Dataset>>,
    pub config: EfficientNetConfig,
    pub train_transform: Transform,
    pub eval_transform: EvalTransform,
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("effnet-io")
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the I/O runtime: {e}")))
}

/// Open a dataset named by a job field, turning every failure into an error naming the field.
pub async fn open_dataset(field: &str, url: &str) -> Result<Arc<Dataset>> {
    let dataset = Dataset::open(url)
        .await
        .map_err(|e| Error::invalid(field, format!("cannot open dataset {url}: {e}")))?;
    // One row of the first row group: the Parquet footer's schema against the dataset format.
    if let Some(group) = dataset.row_groups().first().filter(|g| g.rows > 0) {
        dataset
            .read_unit(WorkUnit { row_group: group.id, start: 0, end: 1 })
            .await
            .map_err(|e| Error::invalid(field, format!("cannot read dataset {url}: {e}")))?;
    }
    Ok(dataset)
}

/// The device of this process: the CPU, or the GPU of its local rank.
pub fn device(spec: &JobSpec, local_rank: usize) -> Result<Device> {
    match spec.distributed.device {
        effnet_config::Device::Cpu => Ok(Device::Cpu),
        effnet_config::Device::Cuda if local_rank < tch::Cuda::device_count() as usize => {
            Ok(Device::Cuda(local_rank))
        }
        effnet_config::Device::Cuda if tch::Cuda::is_available() => Err(Error::invalid(
            "distributed.device",
            format!("local rank {local_rank} has no GPU: libtorch sees {}", tch::Cuda::device_count()),
        )),
        effnet_config::Device::Cuda => Err(Error::invalid(
            "distributed.device",
            "cuda was asked for but libtorch sees no CUDA device (a CPU-only build or no GPU)",
        )),
    }
}

fn normalization(spec: &JobSpec) -> Normalization {
    match spec.data.normalization {
        effnet_config::NormalizationKind::Imagenet => Normalization::IMAGENET,
        effnet_config::NormalizationKind::FashionMnist => Normalization::FASHION_MNIST,
    }
}

fn channels(spec: &JobSpec) -> ChannelPolicy {
    if spec.model.input_channels == 1 { ChannelPolicy::Grey } else { ChannelPolicy::Rgb }
}

/// `data.max_image_pixels`, or the vision crate's default (Pillow's limit) when unset.
fn max_image_pixels(spec: &JobSpec) -> u64 {
    spec.data.max_image_pixels.unwrap_or(effnet_vision::DEFAULT_MAX_PIXELS)
}

/// A transform's refusal, named by the job field that caused it.
fn transform_error(error: effnet_vision::Error, other_field: &str) -> Error {
    match error {
        effnet_vision::Error::InvalidConfig { field: "size", reason } => {
            Error::invalid("model.resolution", reason)
        }
        other => Error::invalid(other_field, other.to_string()),
    }
}

pub fn train_transform(spec: &JobSpec) -> Result<TrainTransform> {
    let augmentation = &spec.data.augmentation;
    let config = TrainConfig {
        size: spec.model.resolution(),
        crop: RandomResizedCrop {
            scale: (augmentation.crop_scale[0], augmentation.crop_scale[1]),
            ratio: (augmentation.crop_ratio[0], augmentation.crop_ratio[1]),
        },
        flip_probability: augmentation.flip,
        rand_augment: augmentation
            .rand_augment
            .as_ref()
            .map(|r| RandAugment { num_ops: r.ops, magnitude: r.magnitude.round() as u32 }),
        normalization: normalization(spec),
        channels: channels(spec),
        dct_downscale: true,
        max_pixels: max_image_pixels(spec),
    };
    TrainTransform::new(config).map_err(|e| transform_error(e, "data.augmentation"))
}

pub fn eval_transform(spec: &JobSpec) -> Result<EvalTransform> {
    let config = EvalConfig {
        size: spec.model.resolution(),
        crop_pct: spec.data.eval_crop,
        normalization: normalization(spec),
        channels: channels(spec),
        dct_downscale: true,
        max_pixels: max_image_pixels(spec),
    };
    EvalTransform::new(config).map_err(|e| transform_error(e, "data.eval_crop"))
}

/// Batches (micro-batches) a rank's share of `rows` samples makes: full ones, a short last one,
/// and a lone last sample joined to the batch before it (see [`crate::feed`]).
fn batches_of(rows: u64, batch: u64) -> u64 {
    let full = rows / batch;
    match rows % batch {
        0 => full.max(1),
        1 if full > 0 && batch > 1 => full,
        _ => full + 1,
    }
}

/// Real steps of one epoch's plan: the rank with the most batches sets it.
fn epoch_steps(plan: &EpochPlan, batch: u64, accumulate: u64) -> u64 {
    plan.ranks.iter().map(|work| batches_of(work.samples(), batch).div_ceil(accumulate)).max().unwrap_or(0)
}

/// (steps of the first epoch, steps of the run) from the deterministic epoch plans.
fn planned_steps(
    seed: u64,
    groups: &[RowGroupRef],
    world_size: usize,
    batch: u64,
    accumulate: u64,
    length: TrainLength,
) -> Result<(u64, u64)> {
    let first = epoch_steps(&EpochPlan::new(seed, 0, groups, world_size)?, batch, accumulate);
    let total = match length {
        TrainLength::Steps(steps) => steps,
        TrainLength::Epochs(epochs) => {
            let mut total = 0.0;
            let mut epoch = 0u64;
            while (epoch as f64) < epochs {
                let steps = epoch_steps(&EpochPlan::new(seed, epoch, groups, world_size)?, batch, accumulate);
                total += steps as f64 * (epochs - epoch as f64).min(1.0);
                epoch += 1;
            }
            total.ceil() as u64
        }
    };
    Ok((first, total))
}

/// The loader fills each batch in host memory as float pixels (channels × resolution² × 4 bytes
/// an image), for training and, with a validation set, for evaluation: a batch larger than the
/// machine's memory would end the process when allocated, so it is refused with the field to
/// change.
fn batches_fit_in_memory(spec: &JobSpec, memory: Option<u64>) -> Result<()> {
    let (channels, resolution) = (spec.model.input_channels, spec.model.resolution());
    batch_fits(
        "data.batch_size",
        u64::from(spec.data.batch_size),
        (channels, resolution),
        memory,
        " (optimizer.accumulate_steps keeps a global batch with smaller steps)",
    )?;
    if spec.data.val.is_none() {
        return Ok(());
    }
    batch_fits("eval.batch_size", spec.eval_batch_size(), (channels, resolution), memory, "")
}

/// [`batches_fit_in_memory`] for one batch size, named by `field` in the error.
pub(crate) fn batch_fits_in_memory(field: &str, batch: u64, channels: u32, resolution: u32) -> Result<()> {
    batch_fits(field, batch, (channels, resolution), crate::metrics::memory_bytes(), "")
}

fn batch_fits(
    field: &str,
    batch: u64,
    (channels, resolution): (u32, u32),
    memory: Option<u64>,
    advice: &str,
) -> Result<()> {
    let Some(memory) = memory else { return Ok(()) };
    let bytes = u128::from(batch) * u128::from(channels) * u128::from(resolution).pow(2) * 4;
    if bytes <= u128::from(memory) {
        return Ok(());
    }
    let gib = |bytes: u128| bytes as f64 / f64::from(1u32 << 30);
    Err(Error::invalid(
        field,
        format!(
            "a batch of {batch} images of {channels}×{resolution}×{resolution} float pixels takes {:.1} GiB, \
             more than this machine's {:.1} GiB of memory{advice}",
            gib(bytes),
            gib(u128::from(memory)),
        ),
    ))
}

/// Validate a job and derive its plan. Nothing is written.
pub async fn prepare(spec: &JobSpec) -> Result<Prepared> {
    let train_transform = Transform::Train(train_transform(spec)?);
    let eval_transform = eval_transform(spec)?;
    batches_fit_in_memory(spec, crate::metrics::memory_bytes())?;
    let train = open_dataset("data.train", &spec.data.train).await?;
    let classes = train.manifest.classes.len() as u32;
    if let Some(wanted) = spec.model.classes
        && wanted != classes
    {
        return Err(Error::invalid(
            "model.classes",
            format!("{wanted} classes asked for but {} has {classes}", spec.data.train),
        ));
    }
    let val = match &spec.data.val {
        Some(url) => {
            let val = open_dataset("data.val", url).await?;
            if val.manifest.classes != train.manifest.classes {
                return Err(Error::invalid(
                    "data.val",
                    format!(
                        "{url} has classes {:?}, the training set {:?}",
                        val.manifest.classes, train.manifest.classes
                    ),
                ));
            }
            Some(val)
        }
        None => None,
    };
    let config = EfficientNetConfig::from_spec(&spec.model, classes);
    config.validate().map_err(|e| Error::invalid("model", e.to_string()))?;
    config.architecture().map_err(|e| Error::invalid("model", e.to_string()))?;

    let workers = spec.distributed.workers as u64;
    let batch = spec.data.batch_size as u64;
    let accumulate = spec.optimizer.accumulate_steps as u64;
    let global_batch = batch * accumulate * workers;
    let train_samples = train.manifest.rows;
    if train_samples < workers {
        return Err(Error::invalid(
            "distributed.workers",
            format!("{workers} workers cannot each get a share of {train_samples} training samples"),
        ));
    }
    let length = TrainLength::from(spec.training.length());
    let (steps_per_epoch, total_steps) =
        planned_steps(spec.seed, train.row_groups(), workers as usize, batch, accumulate, length)?;
    // The schedules run on consumed samples over the global batch (see `schedule`).
    let epoch_position = train_samples as f64 / global_batch as f64;
    let total_position = match length {
        TrainLength::Steps(steps) => steps as f64,
        TrainLength::Epochs(epochs) => epochs * epoch_position,
    };
    // Parameters and multiply-adds from a throwaway CPU build (cheap next to training).
    let vs = VarStore::new(Device::Cpu);
    let model = EfficientNet::new(&vs.root(), &config)?;
    let identity = ModelIdentity {
        architecture: config.spec.display_name(),
        classes,
        input_channels: spec.model.input_channels,
        parameters: model.parameter_count(),
    };
    let plan = RunPlan {
        job: spec.name.clone(),
        job_dir: spec.job_dir(),
        model: identity,
        resolution: spec.model.resolution(),
        dropout: spec.model.dropout(),
        train_dataset: train.manifest.name.clone(),
        val_dataset: val.as_ref().map(|v| v.manifest.name.clone()),
        train_samples,
        val_samples: val.as_ref().map(|v| v.manifest.rows),
        global_batch,
        steps_per_epoch,
        total_steps,
        length,
        schedule: LrSchedule::from_config(spec, global_batch, epoch_position, total_position),
        drop_path: DropPathRamp::from_config(spec, epoch_position),
        eval_every: spec.eval.interval().map(Interval::from_span),
        checkpoint_url: spec.checkpoint_url(),
        multiply_adds: model.multiply_adds(spec.model.resolution()),
    };
    Ok(Prepared { plan, train, val, config, train_transform, eval_transform })
}

/// Validate a job without training or writing anything: everything [`prepare`] checks, and the
/// device of local rank 0.
pub fn check(spec: &JobSpec) -> Result<RunPlan> {
    device(spec, 0)?;
    let runtime = runtime()?;
    Ok(runtime.block_on(prepare(spec))?.plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_larger_than_the_memory_is_refused_naming_its_field() {
        let spec = |batches: &str| {
            JobSpec::from_yaml_str(
                &format!(
                    "name: x\nmodel: {{variant: b0}}\ndata: {{train: memory://x/t, val: memory://x/v, {batches}}}\n"
                ),
                "x",
            )
            .unwrap()
        };
        let gib = Some(1u64 << 30);
        // B0: 3×224×224 floats, 602,112 bytes an image; evaluation twice the batch by default.
        assert!(batches_fit_in_memory(&spec("batch_size: 891"), gib).is_ok());
        let eval = batches_fit_in_memory(&spec("batch_size: 892"), gib).unwrap_err().to_string();
        assert!(eval.contains("eval.batch_size") && eval.contains("a batch of 1784 images of 3×224×224 float pixels takes 1.0 GiB, more than this machine's 1.0 GiB of memory"), "{eval}");
        let train = batches_fit_in_memory(&spec("batch_size: 2000000000"), gib).unwrap_err().to_string();
        assert!(
            train.contains("data.batch_size")
                && train.contains("takes 1121521.0 GiB")
                && train.contains("optimizer.accumulate_steps"),
            "{train}"
        );
        let mut given = spec("batch_size: 1000");
        given.eval.batch_size = Some(8);
        assert!(batches_fit_in_memory(&given, gib).is_ok(), "eval.batch_size given");
        let mut no_val = spec("batch_size: 892");
        no_val.data.val = None;
        assert!(batches_fit_in_memory(&no_val, gib).is_ok(), "no evaluation, no evaluation batch");
        assert!(batches_fit_in_memory(&spec("batch_size: 2000000000"), None).is_ok(), "memory unknown");
    }

    #[test]
    fn batches_count_the_short_last_one_and_join_a_lone_sample() {
        assert_eq!(batches_of(16, 8), 2);
        assert_eq!(batches_of(17, 8), 2, "the 17th sample joins the second batch");
        assert_eq!(batches_of(18, 8), 3);
        assert_eq!(batches_of(1, 8), 1);
        assert_eq!(batches_of(0, 8), 1, "an empty share still sends its (empty) last item");
        assert_eq!(batches_of(5, 1), 5);
    }

    #[test]
    fn planned_steps_follow_the_rank_with_most_batches() {
        // 63 row groups of 16 (the last of 11): 1003 samples over 2 ranks of batch 8.
        let groups: Vec<RowGroupRef> = (0..63)
            .map(|id| RowGroupRef { id, file: id / 8, index: id % 8, rows: if id == 62 { 11 } else { 16 } })
            .collect();
        let plan = EpochPlan::new(3, 0, &groups, 2).unwrap();
        let shares: Vec<u64> = plan.ranks.iter().map(|r| r.samples()).collect();
        assert_eq!(shares.iter().sum::<u64>(), 1003);
        let expected = shares.iter().map(|&s| s.div_ceil(8)).max().unwrap();
        let (first, total) = planned_steps(3, &groups, 2, 8, 1, TrainLength::Epochs(1.0)).unwrap();
        assert_eq!(first, expected);
        assert_eq!(total, expected);
        assert!(first > 1003 / 16, "more than ⌊samples / global batch⌋: no rank's leftovers are dropped");
        let (_, half) = planned_steps(3, &groups, 2, 8, 1, TrainLength::Epochs(0.5)).unwrap();
        assert_eq!(half, expected.div_ceil(2));
        assert_eq!(planned_steps(3, &groups, 2, 8, 1, TrainLength::Steps(5)).unwrap().1, 5);
    }
}
