//! The training loop: prepare (validate everything, restore a checkpoint), then step, maybe
//! evaluate, maybe checkpoint, until the planned number of steps.
//!
//! Everything a resume needs is a function of the step or lives in the checkpoint: the learning
//! rate and drop-path multiplier are computed from the step, libtorch's generator (drop path,
//! dropout) is reseeded from (job seed, step) before every forward pass, and the data cursor, model,
//! optimiser slots and EMA are saved. So a run killed and resumed from step k ends with the same
//! bits as one that never stopped.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use effnet_config::{JobSpec, Span};
use effnet_data::DataCursor;
use effnet_data::loader::Transform;
use effnet_data::reader::Dataset;
use effnet_model::{EfficientNet, EfficientNetConfig};
use effnet_vision::{
    ChannelPolicy, EvalConfig, EvalTransform, Normalization, RandAugment, RandomResizedCrop, TrainConfig,
    TrainTransform,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tch::nn::VarStore;
use tch::{Device, Reduction, Tensor};

use crate::amp;
use crate::checkpoint::{self, CheckpointStore, EMA_FILE, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, SaveStats};
use crate::ema::Ema;
use crate::error::{Error, Result};
pub use crate::evaluate::{EvalMetrics, top_k_hits};
use crate::evaluate::{EvalSettings, Precision, ReportHeader, checkpoint_report, evaluate, peak_rss_bytes};
use crate::feed::{self, Feed, FeedSettings};
use crate::metrics::{EVALUATION_FILE, JOB_FILE, MetricsLog};
use crate::optim::{Optimizer, OptimizerRule};
use crate::schedule::{Decay, DropPathRamp, LrSchedule};
use crate::sync::{DataParallel, GradientDtype};
use crate::tensors::{from_safetensors, load_into, sorted_variables, to_safetensors};

/// Where a run starts.
#[derive(Clone, Debug, PartialEq)]
pub enum ResumeFrom {
    /// The newest committed checkpoint of the job, or step 0 when there is none.
    Latest,
    /// One checkpoint directory by URL.
    Url(String),
    /// Step 0; the job's existing checkpoints are deleted first.
    Fresh,
}

/// How this process was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    /// One process trains alone (`distributed.workers: 1`).
    Single,
    /// One rank of a data-parallel group started by a launcher (`mpirun`, or one process per
    /// GPU with `RANK`/`WORLD_SIZE`/`LOCAL_RANK` set).
    Worker,
}

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub resume: ResumeFrom,
    /// Show a progress bar (`None`: the job's setting, else when stderr is a terminal).
    pub progress: Option<bool>,
    pub launch: Launch,
}

/// What identifies a model's tensors: a checkpoint of another identity cannot be loaded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    pub architecture: String,
    pub classes: u32,
    pub input_channels: u32,
    pub parameters: i64,
}

/// `state.json` of a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainState {
    pub format: u32,
    pub step: u64,
    pub epoch: u64,
    pub samples_seen: u64,
    pub data: Option<DataCursor>,
    pub seed: u64,
    pub model: ModelIdentity,
    pub config_hash: String,
    pub optimizer_steps: u64,
    pub ema_updates: Option<u64>,
    pub world_size: u32,
    pub val: Option<EvalMetrics>,
    pub val_ema: Option<EvalMetrics>,
    /// The job spec the checkpoint was trained with, so it can be evaluated on its own
    /// (absent in checkpoints written before it was added).
    #[serde(default)]
    pub spec: Option<JobSpec>,
}

/// The plan derived from a job spec: numbers a user can check with `effnet run --check`.
#[derive(Clone, Debug, Serialize)]
pub struct RunPlan {
    pub job: String,
    pub job_dir: PathBuf,
    pub model: ModelIdentity,
    pub resolution: u32,
    /// The datasets' own names (their manifests' `name`, e.g. `fashion-mnist train`).
    pub train_dataset: String,
    pub val_dataset: Option<String>,
    pub train_samples: u64,
    pub val_samples: Option<u64>,
    pub global_batch: u64,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub schedule: LrSchedule,
    pub drop_path: DropPathRamp,
    pub eval_every_steps: Option<u64>,
    pub checkpoint_url: String,
    pub multiply_adds: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub plan: RunPlan,
    pub resumed_from: Option<u64>,
    pub steps: u64,
    pub val: Option<EvalMetrics>,
    pub val_ema: Option<EvalMetrics>,
    pub train_images_per_s: f64,
    pub data_wait_fraction: f64,
    /// Share of step time spent in collectives (0 for one process).
    pub comm_fraction: f64,
    /// This process's rank and the world size.
    pub rank: usize,
    pub world_size: usize,
    pub wall_s: f64,
    pub skipped_samples: u64,
    pub checkpoints: Vec<SaveStats>,
    /// Peak resident memory of this process (Linux VmHWM), bytes.
    pub peak_memory_bytes: Option<u64>,
}

const STATE_FORMAT: u32 = 1;

pub(crate) fn model_config(spec: &JobSpec, classes: u32) -> EfficientNetConfig {
    let model = &spec.model;
    let base = match (model.variant, model.phi) {
        (Some(variant), _) => EfficientNetConfig::named(effnet_model::Variant::ALL[variant_index(variant)]),
        (None, phi) => EfficientNetConfig::custom(
            phi.unwrap_or(0.0),
            effnet_model::CompoundCoefficients { alpha: model.alpha, beta: model.beta, gamma: model.gamma },
        ),
    };
    let batch_norm = match model.batch_norm {
        effnet_config::BatchNormStyle::Torchvision => effnet_model::BatchNormStyle::Torchvision,
        effnet_config::BatchNormStyle::Tf => effnet_model::BatchNormStyle::Tf,
        effnet_config::BatchNormStyle::Pytorch => effnet_model::BatchNormStyle::Pytorch,
    };
    let classifier_init = match model.classifier_init {
        effnet_config::ClassifierInit::Uniform => effnet_model::ClassifierInit::Uniform,
        effnet_config::ClassifierInit::Zero => effnet_model::ClassifierInit::Zero,
    };
    base.with_classes(classes)
        .with_input_channels(model.input_channels)
        .with_dropout(model.dropout())
        .with_drop_path_rate(model.drop_path.rate)
        .with_batch_norm(batch_norm)
        .with_classifier_init(classifier_init)
}

fn variant_index(variant: effnet_config::Variant) -> usize {
    use effnet_config::Variant::*;
    match variant {
        B0 => 0,
        B1 => 1,
        B2 => 2,
        B3 => 3,
        B4 => 4,
        B5 => 5,
        B6 => 6,
        B7 => 7,
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

fn train_transform(spec: &JobSpec) -> Result<Transform> {
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
    };
    let transform =
        TrainTransform::new(config).map_err(|e| Error::invalid("data.augmentation", e.to_string()))?;
    Ok(Transform::Train(transform))
}

pub(crate) fn eval_transform(spec: &JobSpec) -> Result<EvalTransform> {
    let config = EvalConfig {
        size: spec.model.resolution(),
        crop_pct: spec.data.eval_crop,
        normalization: normalization(spec),
        channels: channels(spec),
        dct_downscale: true,
    };
    EvalTransform::new(config).map_err(|e| Error::invalid("data.eval_crop", e.to_string()))
}

/// The device of this process: the CPU, or the GPU of its local rank.
fn device(spec: &JobSpec, local_rank: usize) -> Result<Device> {
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

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("effnet-io")
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the I/O runtime: {e}")))
}

/// A short digest for `state.json` (the first 8 bytes of the SHA-256, in hex).
fn hash_hex(bytes: &[u8]) -> String {
    checkpoint::sha256_hex(bytes)[..16].to_string()
}

/// Open a dataset named by a job field, turning every failure into an error naming the field.
pub(crate) async fn open_dataset(field: &str, url: &str) -> Result<Arc<Dataset>> {
    Dataset::open(url).await.map_err(|e| Error::invalid(field, format!("cannot open dataset {url}: {e}")))
}

struct Prepared {
    plan: RunPlan,
    train: Arc<Dataset>,
    val: Option<Arc<Dataset>>,
    config: EfficientNetConfig,
}

async fn prepare(spec: &JobSpec) -> Result<Prepared> {
    if spec.training.precision == effnet_config::Precision::Bf16 {
        return Err(Error::invalid(
            "training.precision",
            "bf16 autocast is not available in this build; use fp32",
        ));
    }
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
    let config = model_config(spec, classes);
    config.validate().map_err(|e| Error::invalid("model", e.to_string()))?;
    config.architecture().map_err(|e| Error::invalid("model", e.to_string()))?;

    let global_batch = spec.data.batch_size as u64
        * spec.optimizer.accumulate_steps as u64
        * spec.distributed.workers as u64;
    let train_samples = train.manifest.rows;
    let steps_per_epoch = train_samples / global_batch;
    if steps_per_epoch == 0 {
        return Err(Error::invalid(
            "data.batch_size",
            format!("a global batch of {global_batch} is larger than the {train_samples} training samples"),
        ));
    }
    let total_steps = spec.training.length().to_steps(steps_per_epoch);
    let warmup_steps = spec.schedule.warmup().to_steps(steps_per_epoch);
    let scale = if spec.optimizer.scale_lr {
        global_batch as f64 / spec.optimizer.reference_batch as f64
    } else {
        1.0
    };
    let decay = match spec.schedule.kind {
        effnet_config::ScheduleKind::Constant => Decay::Constant,
        effnet_config::ScheduleKind::Cosine => Decay::Cosine,
        effnet_config::ScheduleKind::Exponential => Decay::Exponential {
            rate: spec.schedule.decay_rate,
            every: (spec.schedule.decay_epochs * steps_per_epoch as f64).max(1.0),
            staircase: spec.schedule.staircase,
        },
    };
    let schedule = LrSchedule {
        peak: spec.optimizer.lr * scale,
        warmup_steps,
        decay,
        total_steps,
        min_ratio: spec.schedule.min_lr_ratio,
    };
    let drop_path = match spec.model.drop_path.schedule {
        effnet_config::DropPathSchedule::Constant => DropPathRamp::Constant,
        effnet_config::DropPathSchedule::Linear => {
            let span = match (spec.model.drop_path.ramp_steps, spec.model.drop_path.ramp_epochs) {
                (Some(steps), _) => Span::Steps(steps),
                (None, Some(epochs)) => Span::Epochs(epochs),
                (None, None) => Span::Steps(0),
            };
            DropPathRamp::Linear { steps: span.to_steps(steps_per_epoch) }
        }
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
        train_dataset: train.manifest.name.clone(),
        val_dataset: val.as_ref().map(|v| v.manifest.name.clone()),
        train_samples,
        val_samples: val.as_ref().map(|v| v.manifest.rows),
        global_batch,
        steps_per_epoch,
        total_steps,
        schedule,
        drop_path,
        eval_every_steps: spec.eval.interval().map(|span| span.to_steps(steps_per_epoch).max(1)),
        checkpoint_url: spec.checkpoint_url(),
        multiply_adds: model.multiply_adds(spec.model.resolution()),
    };
    Ok(Prepared { plan, train, val, config })
}

/// Validate a job without training or writing anything: the spec, the datasets (opened and
/// read), the model, and the derived plan.
pub fn check(spec: &JobSpec) -> Result<RunPlan> {
    device(spec, 0)?;
    let runtime = runtime()?;
    Ok(runtime.block_on(prepare(spec))?.plan)
}

/// The per-step seed of libtorch's generator (drop path, dropout).
fn step_seed(seed: u64, step: u64, micro: u64) -> i64 {
    (effnet_data::rng::mix_seed(&[seed, step, micro]) >> 1) as i64
}

struct Restored {
    state: TrainState,
    url: String,
}

/// Load a checkpoint's files into the model, optimiser and EMA, after checking they belong to
/// this job's model. Nothing is modified unless the state and the model weights fit.
/// Read and check `state.json` of a loaded checkpoint: present, parseable, of this format.
pub(crate) fn read_state(url: &str, files: &HashMap<String, Bytes>) -> Result<TrainState> {
    let damaged = |reason: String| Error::BadCheckpoint { url: url.to_string(), reason };
    let bytes = files.get(STATE_FILE).ok_or_else(|| damaged(format!("{STATE_FILE} is missing")))?;
    let state: TrainState =
        serde_json::from_slice(bytes).map_err(|e| damaged(format!("unreadable {STATE_FILE}: {e}")))?;
    if state.format != STATE_FORMAT {
        return Err(Error::IncompatibleCheckpoint {
            url: url.to_string(),
            reason: format!("state format {} (this build reads {STATE_FORMAT})", state.format),
        });
    }
    Ok(state)
}

fn restore(
    url: &str,
    files: HashMap<String, Bytes>,
    identity: &ModelIdentity,
    vs: &VarStore,
    optimizer: &mut Optimizer,
    ema: Option<(&mut Ema, &VarStore)>,
    train: &Dataset,
) -> Result<TrainState> {
    let incompatible = |reason: String| Error::IncompatibleCheckpoint { url: url.to_string(), reason };
    let damaged = |reason: String| Error::BadCheckpoint { url: url.to_string(), reason };
    let file = |name: &str| files.get(name).ok_or_else(|| damaged(format!("{name} is missing")));
    let state = read_state(url, &files)?;
    if &state.model != identity {
        return Err(incompatible(format!(
            "it holds {} with {} classes and {} input channels ({} parameters); this job trains {} with {} classes and {} input channels ({} parameters)",
            state.model.architecture,
            state.model.classes,
            state.model.input_channels,
            state.model.parameters,
            identity.architecture,
            identity.classes,
            identity.input_channels,
            identity.parameters
        )));
    }
    if let Some(cursor) = &state.data {
        let groups = train.row_groups().len() as u32;
        let fits = cursor.validate().is_ok()
            && cursor.plan.ranks.iter().flat_map(|r| &r.units).all(|u| u.row_group < groups)
            && cursor.ranks.iter().flat_map(|r| &r.buffered).all(|s| s.row_group < groups);
        if !fits {
            return Err(incompatible("its data cursor does not fit the training dataset".into()));
        }
    }
    let weights = from_safetensors(file(MODEL_FILE)?).map_err(damaged)?;
    load_into(vs, weights).map_err(incompatible)?;
    let slots = from_safetensors(file(OPTIMIZER_FILE)?).map_err(damaged)?;
    optimizer.load_state(slots, state.optimizer_steps).map_err(|e| incompatible(e.to_string()))?;
    if let Some((ema, ema_vs)) = ema {
        match (files.get(EMA_FILE), state.ema_updates) {
            (Some(bytes), Some(updates)) => {
                load_into(ema_vs, from_safetensors(bytes).map_err(damaged)?).map_err(incompatible)?;
                ema.set_updates(updates);
            }
            _ => {
                tracing::warn!(%url, "the checkpoint has no EMA; the average restarts from the restored weights");
                ema.restart();
            }
        }
    }
    Ok(state)
}

struct Progress {
    bar: Option<indicatif::ProgressBar>,
    log_every: u64,
    rank: usize,
}

impl Progress {
    fn new(show: bool, total: u64, position: u64, log_every: u64, rank: usize) -> Progress {
        let bar = show.then(|| {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
            ) {
                bar.set_style(style);
            }
            bar.set_position(position);
            bar
        });
        Progress { bar, log_every: log_every.max(1), rank }
    }

    fn step(&self, step: u64, epoch: u64, loss: f64, lr: f64, images_per_s: f64) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(format!(
                    "epoch {epoch}  loss {loss:.4}  lr {lr:.3e}  {images_per_s:.0} img/s"
                ));
            }
            None if step.is_multiple_of(self.log_every) => {
                tracing::info!(
                    rank = self.rank,
                    step,
                    epoch,
                    loss = format!("{loss:.4}"),
                    lr = format!("{lr:.3e}"),
                    images_per_s = format!("{images_per_s:.1}"),
                    "train"
                );
            }
            None => {}
        }
    }

    fn println(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => tracing::info!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

type PendingSave = tokio::task::JoinHandle<Result<(SaveStats, Vec<u64>)>>;

/// Train the job to its last step, resuming as `options` says. Everything that can be rejected
/// (spec, datasets, checkpoint) is checked before anything is written.
///
/// With [`Launch::Worker`] this process is one rank of a data-parallel group started by a
/// launcher (`mpirun`, or one process per GPU with `RANK`/`WORLD_SIZE`); an error on any rank
/// aborts the whole group, so no peer waits for it until its timeout.
pub fn run(spec: &JobSpec, options: RunOptions) -> Result<RunSummary> {
    let started = Instant::now();
    let local_rank = match options.launch {
        Launch::Single => 0,
        Launch::Worker => {
            effnet_collective::WorldInfo::from_env()
                .map_err(|e| Error::invalid("environment", e.to_string()))?
                .local_rank
        }
    };
    let device = device(spec, local_rank)?;
    let runtime = runtime()?;
    let prepared = runtime.block_on(prepare(spec))?;
    let mut parallel = connect(spec, options.launch, device)?;
    let result = train(spec, &options, &runtime, prepared, device, &mut parallel, started);
    if let (Err(error), Some(parallel)) = (&result, &parallel) {
        // The others would wait in their next collective until the timeout: end them now.
        eprintln!("effnet: rank {}: {error}", parallel.rank());
        parallel.abort(if error.is_bad_input() { 2 } else { 1 });
    }
    result
}

/// The collective group of a worker, or `None` for a single process.
fn connect(spec: &JobSpec, launch: Launch, device: Device) -> Result<Option<DataParallel>> {
    let workers = spec.distributed.workers as usize;
    if launch == Launch::Single {
        if workers > 1 {
            return Err(Error::invalid(
                "distributed.workers",
                format!(
                    "{workers} workers need a launcher: `effnet run` starts them, or `mpirun -n {workers} effnet worker JOB.yaml`"
                ),
            ));
        }
        return Ok(None);
    }
    let backend = match (spec.distributed.backend, device) {
        (Some(effnet_config::Backend::Mpi), _) => effnet_collective::Backend::Mpi,
        (Some(effnet_config::Backend::Nccl), _) => effnet_collective::Backend::Nccl,
        (Some(effnet_config::Backend::Local), _) => {
            return Err(Error::invalid(
                "distributed.backend",
                "local trains in one process; workers need mpi (CPU) or nccl (CUDA)",
            ));
        }
        (None, Device::Cuda(_)) => effnet_collective::Backend::Nccl,
        (None, _) => effnet_collective::Backend::Mpi,
    };
    let timeout = Duration::from_secs_f64(spec.distributed.timeout_s);
    let collective: Box<dyn effnet_collective::Collective> = match backend {
        effnet_collective::Backend::Mpi => {
            if device.is_cuda() {
                return Err(Error::invalid(
                    "distributed.backend",
                    "mpi reduces host memory; with device cuda use nccl",
                ));
            }
            Box::new(effnet_collective::Mpi::init(timeout).map_err(|e| Error::Collective(e.to_string()))?)
        }
        effnet_collective::Backend::Nccl => {
            if !device.is_cuda() {
                return Err(Error::invalid("distributed.backend", "nccl needs distributed.device: cuda"));
            }
            let info = effnet_collective::WorldInfo::from_env()
                .map_err(|e| Error::invalid("environment", e.to_string()))?;
            let address = effnet_collective::rendezvous::address_from_env();
            Box::new(
                effnet_collective::Nccl::init(&info, &address, timeout)
                    .map_err(|e| Error::Collective(e.to_string()))?,
            )
        }
    };
    if collective.world_size() != workers {
        return Err(Error::invalid(
            "distributed.workers",
            format!("{workers} workers asked for, but the launcher started {}", collective.world_size()),
        ));
    }
    let gradient_dtype = match spec.distributed.gradient_dtype {
        effnet_config::GradientDtype::F32 => GradientDtype::F32,
        effnet_config::GradientDtype::Bf16 => GradientDtype::Bf16,
    };
    Ok(Some(DataParallel::new(collective, spec.distributed.bucket_mb, gradient_dtype, device)))
}

/// What the feed gave one rank for its next micro-batch.
enum Next {
    Batch(effnet_vision::BatchParts, u64, DataCursor),
    EpochEnd,
}

/// Take the feed's next item, reporting the samples skipped in an epoch that ended.
fn next_item(
    feed: &mut tokio::sync::mpsc::Receiver<Feed>,
    metrics: &mut MetricsLog,
    progress: &Progress,
    skipped_samples: &mut u64,
    waited: &mut Duration,
) -> Result<Next> {
    let wait_started = Instant::now();
    let item = feed.blocking_recv();
    *waited += wait_started.elapsed();
    match item {
        Some(Feed::Batch { batch, epoch, cursor }) => Ok(Next::Batch(batch, epoch, cursor)),
        Some(Feed::EpochEnd { epoch, skipped }) => {
            if !skipped.is_empty() {
                *skipped_samples += skipped.len() as u64;
                let keys: Vec<&str> = skipped.iter().map(|s| s.key.as_str()).collect();
                progress.println(format!(
                    "epoch {epoch}: skipped {} unusable samples: {}",
                    keys.len(),
                    keys.join(", ")
                ));
                let samples: Vec<_> =
                    skipped.iter().map(|s| json!({"key": s.key, "reason": s.reason})).collect();
                metrics.write("skipped", json!({ "epoch": epoch, "samples": samples }))?;
            }
            Ok(Next::EpochEnd)
        }
        Some(Feed::Failed(error)) => Err(error),
        None => Err(Error::Internal("the data feed stopped".into())),
    }
}

#[allow(clippy::too_many_arguments)]
fn train(
    spec: &JobSpec,
    options: &RunOptions,
    runtime: &tokio::runtime::Runtime,
    prepared: Prepared,
    device: Device,
    parallel: &mut Option<DataParallel>,
    started: Instant,
) -> Result<RunSummary> {
    let Prepared { plan, train, val, config } = prepared;
    let (rank, world_size) = parallel.as_ref().map_or((0, 1), |p| (p.rank(), p.world_size()));
    // Only rank 0 writes: job directory, metrics, checkpoints, summary.
    let writer = rank == 0;
    let threads = spec
        .training
        .threads
        .map(|t| t as usize)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    tch::set_num_threads(threads as i32);

    // The initial weights come from libtorch's generator: seed it so a job starts identically.
    tch::manual_seed(step_seed(spec.seed, u64::MAX, 0));
    let vs = VarStore::new(device);
    let model = EfficientNet::new(&vs.root(), &config)?;
    let bf16 = spec.training.precision == effnet_config::Precision::Bf16;
    let channels_last = spec.training.channels_last.unwrap_or(device.is_cuda());
    if channels_last {
        amp::variables_to_channels_last(&vs)?;
    }
    let precision = Precision { device, bf16, channels_last };
    let trainable: Vec<(String, Tensor)> =
        sorted_variables(&vs).into_iter().filter(|(_, t)| t.requires_grad()).collect();
    let synced_parameters: Vec<(String, Tensor)> =
        trainable.iter().map(|(name, t)| (name.clone(), t.shallow_clone())).collect();
    let mut optimizer = Optimizer::new(
        OptimizerRule::from_config(&spec.optimizer),
        trainable,
        spec.optimizer.weight_decay(),
        spec.optimizer.decay_norm_and_bias,
    );
    let ema_store = spec.training.ema.enabled.then(|| VarStore::new(device));
    let ema_model = match &ema_store {
        Some(store) => {
            let average = EfficientNet::new(&store.root(), &config)?;
            if channels_last {
                amp::variables_to_channels_last(store)?;
            }
            Some(average)
        }
        None => None,
    };
    let mut ema = match &ema_store {
        Some(store) => Some(Ema::new(spec.training.ema.decay, spec.training.ema.warmup, &vs, store)?),
        None => None,
    };

    // Opening a local directory creates it, so a job that is rejected must not open one that is
    // not there yet: nothing is written before every check has passed.
    let existing = checkpoint::existing(&plan.checkpoint_url)
        .map_err(|e| Error::invalid("checkpoint.url", e.to_string()))?;
    let found = match (&options.resume, &existing) {
        (ResumeFrom::Fresh, _) | (ResumeFrom::Latest, None) => None,
        (ResumeFrom::Latest, Some(store)) => {
            runtime.block_on(store.latest())?.map(|(committed, files)| (committed.url, files))
        }
        (ResumeFrom::Url(url), _) => Some((url.clone(), runtime.block_on(checkpoint::load_url(url))?.1)),
    };
    let restored = match found {
        Some((url, files)) => {
            let ema_parts = match (&mut ema, &ema_store) {
                (Some(ema), Some(store)) => Some((ema, store)),
                _ => None,
            };
            let state = restore(&url, files, &plan.model, &vs, &mut optimizer, ema_parts, &train)?;
            Some(Restored { state, url })
        }
        None => None,
    };
    // Every rank built or loaded the same weights; rank 0's are authoritative all the same.
    if let Some(parallel) = parallel.as_mut() {
        parallel.broadcast_variables(&sorted_variables(&vs))?;
        if let Some(store) = &ema_store {
            parallel.broadcast_variables(&sorted_variables(store))?;
        }
    }
    let config_hash = hash_hex(&serde_json::to_vec(spec).map_err(|e| Error::Internal(e.to_string()))?);
    if let Some(restored) = &restored
        && restored.state.config_hash != config_hash
        && writer
    {
        tracing::warn!(url = %restored.url, "the job spec changed since this checkpoint was written; continuing with the new spec");
    }
    if writer
        && options.resume == ResumeFrom::Fresh
        && let Some(store) = &existing
    {
        let committed = runtime.block_on(store.committed())?;
        if !committed.is_empty() {
            tracing::warn!(url = %plan.checkpoint_url, count = committed.len(), "--fresh: deleting the job's existing checkpoints");
            runtime.block_on(store.purge(0, 0))?;
        }
    }
    let checkpoints = match (writer, existing) {
        (false, _) => None,
        (true, Some(store)) => Some(store),
        (true, None) => Some(CheckpointStore::new(
            effnet_store::open(&plan.checkpoint_url)
                .map_err(|e| Error::invalid("checkpoint.url", e.to_string()))?,
        )),
    };

    // From here on rank 0 writes: job directory, metrics, checkpoints.
    let mut metrics = if writer {
        let metrics = MetricsLog::open(&plan.job_dir, spec.data.log_sample_keys)?;
        if options.resume == ResumeFrom::Fresh {
            // The previous run's final evaluation is not this run's.
            let path = plan.job_dir.join(EVALUATION_FILE);
            if let Err(source) = std::fs::remove_file(&path)
                && source.kind() != std::io::ErrorKind::NotFound
            {
                return Err(Error::Io { path: path.display().to_string(), source });
            }
        }
        let resolved = json!({ "spec": spec, "plan": &plan });
        let path = plan.job_dir.join(JOB_FILE);
        std::fs::write(&path, serde_json::to_vec_pretty(&resolved).unwrap_or_default())
            .map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        metrics
    } else {
        MetricsLog::disabled()
    };
    let mut step = restored.as_ref().map(|r| r.state.step).unwrap_or(0);
    let mut epoch = restored.as_ref().map(|r| r.state.epoch).unwrap_or(0);
    let mut samples_seen = restored.as_ref().map(|r| r.state.samples_seen).unwrap_or(0);
    let mut cursor = restored.as_ref().and_then(|r| r.state.data.clone());
    let mut val_metrics = restored.as_ref().and_then(|r| r.state.val);
    let mut val_ema_metrics = restored.as_ref().and_then(|r| r.state.val_ema);
    metrics.write(
        "start",
        json!({
            "step": step,
            "resumed_from": restored.as_ref().map(|r| &r.url),
            // `--fresh`: the job starts over; reports ignore the attempts before this one.
            "fresh": options.resume == ResumeFrom::Fresh,
            "total_steps": plan.total_steps,
            "steps_per_epoch": plan.steps_per_epoch,
            "global_batch": plan.global_batch,
            "threads": threads,
            "device": format!("{device:?}"),
            "world_size": world_size,
            "backend": parallel.as_ref().map(|p| p.collective().backend().to_string()),
            "model": &plan.model,
            "environment": if writer { crate::metrics::environment(device) } else { serde_json::Value::Null },
        }),
    )?;
    if let Some(restored) = &restored {
        tracing::info!(url = %restored.url, step, rank, "resuming");
    }

    let feed_settings = FeedSettings {
        dataset: train.clone(),
        transform: train_transform(spec)?,
        batch_size: spec.data.batch_size as usize,
        threads: spec.data.loader_threads as usize,
        seed: spec.seed,
        shuffle_buffer: spec.data.shuffle_buffer as usize,
        prefetch: spec.data.prefetch as usize,
        rank,
        world_size,
    };
    let mut feed = feed::spawn(runtime, feed_settings, cursor.clone());
    let eval = eval_transform(spec)?;
    let eval_batch = spec.eval.batch_size.unwrap_or(spec.data.batch_size * 2) as usize;
    let show_progress = writer
        && options.progress.or(spec.training.progress).unwrap_or_else(|| std::io::stderr().is_terminal());
    let progress = Progress::new(show_progress, plan.total_steps, step, spec.training.log_every as u64, rank);

    let accumulate = spec.optimizer.accumulate_steps as u64;
    let label_smoothing = spec.optimizer.label_smoothing;
    let first_step = step;
    let mut pending: Option<PendingSave> = None;
    let mut saves = Vec::new();
    let mut skipped_samples = 0u64;
    let mut train_time = Duration::ZERO;
    let mut wait_time = Duration::ZERO;
    let mut comm_time = Duration::ZERO;
    let mut trained_images = 0u64;

    while step < plan.total_steps {
        let step_started = Instant::now();
        let mut waited = Duration::ZERO;
        let multiplier = plan.drop_path.multiplier(step);
        model.set_drop_path_multiplier(multiplier)?;
        let mut loss_sum = 0.0;
        let mut images = 0u64;
        for micro in 0..accumulate {
            let (batch, batch_epoch, batch_cursor) = loop {
                let next = next_item(&mut feed, &mut metrics, &progress, &mut skipped_samples, &mut waited)?;
                let Some(parallel) = parallel.as_mut() else {
                    match next {
                        Next::Batch(batch, epoch, cursor) => break (batch, epoch, cursor),
                        Next::EpochEnd => continue,
                    }
                };
                // Ranks hold unequal shares of an epoch: it ends for all when one runs out.
                let mut ready = [if matches!(next, Next::Batch(..)) { 1.0 } else { 0.0 }];
                parallel.sum(&mut ready)?;
                match next {
                    Next::Batch(batch, epoch, cursor) if ready[0] as usize == world_size => {
                        break (batch, epoch, cursor);
                    }
                    Next::Batch(..) => {
                        // Drop this rank's rest of the epoch, as a single process drops a short batch.
                        while let Next::Batch(..) =
                            next_item(&mut feed, &mut metrics, &progress, &mut skipped_samples, &mut waited)?
                        {
                        }
                    }
                    Next::EpochEnd => {}
                }
            };
            metrics.write_samples(step, &batch.keys)?;
            // Rank r's micro-batch m is micro-batch r·accumulate + m of the global step: one
            // process accumulating the same batches draws the same drop-path and dropout masks.
            tch::manual_seed(step_seed(spec.seed, step, rank as u64 * accumulate + micro));
            let n = batch.labels.len() as u64;
            let xs = Tensor::from_slice(&batch.pixels).view(batch.shape).to_device(device);
            let ys = Tensor::from_slice(&batch.labels).to_device(device);
            let logits = precision.forward(&model, &xs, true)?;
            let loss = logits.cross_entropy_loss::<Tensor>(&ys, None, Reduction::Mean, -100, label_smoothing);
            if accumulate > 1 {
                (&loss / accumulate as f64).backward();
            } else {
                loss.backward();
            }
            loss_sum += loss.double_value(&[]);
            images += n;
            epoch = batch_epoch;
            cursor = Some(batch_cursor);
        }
        let mut loss = loss_sum / accumulate as f64;
        let mut step_comm = Duration::ZERO;
        if let Some(parallel) = parallel.as_mut() {
            parallel.all_reduce_gradients(&synced_parameters)?;
            let mut totals = [loss, images as f64];
            parallel.sum(&mut totals)?;
            loss = totals[0] / world_size as f64;
            step_comm = parallel.take_comm_time();
        }
        if let Some(max_norm) = spec.optimizer.grad_clip_norm {
            optimizer.clip_grad_norm(max_norm);
        }
        let lr = plan.schedule.lr(step);
        optimizer.step(lr);
        optimizer.zero_grad();
        if let Some(ema) = &mut ema {
            ema.update();
        }
        step += 1;
        let global_images = images * world_size as u64;
        samples_seen += global_images;
        let elapsed = step_started.elapsed();
        train_time += elapsed;
        wait_time += waited;
        comm_time += step_comm;
        trained_images += images;
        if !loss.is_finite() {
            return Err(Error::Internal(format!(
                "the loss became {loss} at step {step}; lower optimizer.lr or set optimizer.grad_clip_norm"
            )));
        }
        let images_per_s = images as f64 / elapsed.as_secs_f64().max(1e-9);
        metrics.write(
            "step",
            json!({
                "step": step,
                "epoch": epoch,
                "loss": loss,
                "lr": lr,
                "drop_path": multiplier,
                "images_per_s": images_per_s * world_size as f64,
                "data_wait": waited.as_secs_f64() / elapsed.as_secs_f64().max(1e-9),
                "comm": step_comm.as_secs_f64() / elapsed.as_secs_f64().max(1e-9),
                "step_s": elapsed.as_secs_f64(),
            }),
        )?;
        progress.step(step, epoch, loss, lr, images_per_s);
        // A save that has finished in the background is logged now, not when the next one
        // starts: a run killed before then still has its checkpoint in the log.
        if pending.as_ref().is_some_and(|save| save.is_finished())
            && let Some(done) = pending.take()
        {
            saves.push(finish_save(runtime, done, &mut metrics)?);
        }

        let last = step == plan.total_steps;
        let mut metric = None;
        let eval_due = plan.eval_every_steps.is_some_and(|every| step.is_multiple_of(every)) || last;
        let checkpoint_due = spec.checkpoint.every_steps.is_some_and(|every| step.is_multiple_of(every))
            || (spec.checkpoint.at_epoch_end && step.is_multiple_of(plan.steps_per_epoch))
            || last;
        if let Some(parallel) = parallel.as_mut()
            && ((eval_due && val.is_some()) || checkpoint_due)
        {
            // Each rank's BatchNorm statistics saw only its own batches: evaluate and save their mean.
            parallel.average_buffers(&sorted_variables(&vs))?;
            if let Some(store) = &ema_store {
                parallel.average_buffers(&sorted_variables(store))?;
            }
        }
        if eval_due && let Some(val) = &val {
            let settings = EvalSettings {
                dataset: val,
                transform: &eval,
                batch_size: eval_batch,
                max_samples: spec.eval.max_samples,
                precision,
                threads: 1,
            };
            let raw_evaluation = evaluate(runtime, &model, &settings, parallel.as_mut())?;
            let ema_evaluation = match (&ema_model, spec.eval.ema) {
                (Some(ema_model), true) => Some(evaluate(runtime, ema_model, &settings, parallel.as_mut())?),
                _ => None,
            };
            let raw = raw_evaluation.metrics;
            let averaged = ema_evaluation.as_ref().map(|e| e.metrics);
            if last && writer {
                // The final evaluation in full (per class, confusion), in the format `effnet eval
                // --json` prints for the same checkpoint: what the report shows.
                let header = ReportHeader {
                    checkpoint: format!(
                        "{}/{}",
                        plan.checkpoint_url.trim_end_matches('/'),
                        checkpoint::directory_name(step)
                    ),
                    step,
                    epoch,
                    job: spec.name.clone(),
                    data: spec.data.val.clone().unwrap_or_default(),
                    architecture: plan.model.architecture.clone(),
                    parameters: plan.model.parameters,
                    resolution: plan.resolution,
                    gflops: plan.multiply_adds as f64 / 1e9,
                    device: format!("{device:?}"),
                };
                let classes = &val.manifest.classes;
                let final_evaluation = effnet_report::evaluation::FinalEvaluation {
                    raw: checkpoint_report(header.clone(), "raw", classes, raw_evaluation),
                    ema: ema_evaluation.map(|e| checkpoint_report(header, "ema", classes, e)),
                };
                final_evaluation.write(&plan.job_dir).map_err(|source| Error::Io {
                    path: plan.job_dir.join(EVALUATION_FILE).display().to_string(),
                    source,
                })?;
            }
            progress.println(format!(
                "step {step} (epoch {epoch}): val top-1 {:.2}% top-5 {:.2}% loss {:.4}{}",
                raw.top1 * 100.0,
                raw.top5 * 100.0,
                raw.loss,
                averaged.map(|a| format!("; EMA top-1 {:.2}%", a.top1 * 100.0)).unwrap_or_default()
            ));
            metrics.write("eval", json!({ "step": step, "epoch": epoch, "raw": raw, "ema": averaged }))?;
            metric = Some(raw.top1);
            val_metrics = Some(raw);
            val_ema_metrics = averaged;
        }
        if checkpoint_due {
            let data = match (parallel.as_mut(), &cursor) {
                (Some(parallel), Some(mine)) => {
                    // Rank 0 saves every rank's position in the shared plan.
                    let bytes =
                        serde_json::to_vec(&mine.ranks).map_err(|e| Error::Internal(e.to_string()))?;
                    let mut ranks = Vec::with_capacity(world_size);
                    for part in parallel.all_gather_bytes(&bytes)? {
                        let mut cursors: Vec<effnet_data::plan::RankCursor> =
                            serde_json::from_slice(&part)
                                .map_err(|e| Error::Internal(format!("a rank's data cursor: {e}")))?;
                        ranks.append(&mut cursors);
                    }
                    Some(DataCursor { plan: mine.plan.clone(), ranks })
                }
                _ => cursor.clone(),
            };
            if let Some(checkpoints) = &checkpoints {
                let state = TrainState {
                    format: STATE_FORMAT,
                    step,
                    epoch,
                    samples_seen,
                    data,
                    seed: spec.seed,
                    model: plan.model.clone(),
                    config_hash: config_hash.clone(),
                    optimizer_steps: optimizer.steps(),
                    ema_updates: ema.as_ref().map(|e| e.updates()),
                    world_size: world_size as u32,
                    val: val_metrics,
                    val_ema: val_ema_metrics,
                    spec: Some(spec.clone()),
                };
                let mut files = vec![
                    (MODEL_FILE.to_string(), Bytes::from(to_safetensors(&sorted_variables(&vs))?)),
                    (OPTIMIZER_FILE.to_string(), Bytes::from(to_safetensors(&optimizer.state_tensors())?)),
                ];
                if let Some(store) = &ema_store {
                    files
                        .push((EMA_FILE.to_string(), Bytes::from(to_safetensors(&sorted_variables(store))?)));
                }
                let state_json =
                    serde_json::to_vec_pretty(&state).map_err(|e| Error::Internal(e.to_string()))?;
                files.push((STATE_FILE.to_string(), Bytes::from(state_json)));
                // At most one save in flight: wait for the previous one before starting the next.
                if let Some(previous) = pending.take() {
                    let stats = finish_save(runtime, previous, &mut metrics)?;
                    saves.push(stats);
                }
                let store = checkpoints.clone();
                let (keep_last, keep_best) =
                    (spec.checkpoint.keep_last as usize, spec.checkpoint.keep_best as usize);
                pending = Some(runtime.spawn(async move {
                    let stats = store.save(step, metric, files).await?;
                    let deleted = store.purge(keep_last, keep_best).await?;
                    Ok((stats, deleted))
                }));
            }
        }
    }
    if let Some(previous) = pending.take() {
        saves.push(finish_save(runtime, previous, &mut metrics)?);
    }
    progress.finish();
    let train_s = train_time.as_secs_f64();
    if world_size > 1 {
        tracing::info!(
            rank,
            images_per_s =
                format!("{:.1}", if train_s > 0.0 { trained_images as f64 / train_s } else { 0.0 }),
            comm = format!("{:.1}%", 100.0 * comm_time.as_secs_f64() / train_s.max(1e-9)),
            "rank throughput"
        );
    }
    let summary = RunSummary {
        resumed_from: restored.as_ref().map(|r| r.state.step),
        steps: step,
        val: val_metrics,
        val_ema: val_ema_metrics,
        train_images_per_s: if train_s > 0.0 {
            (trained_images * world_size as u64) as f64 / train_s
        } else {
            0.0
        },
        data_wait_fraction: if train_s > 0.0 { wait_time.as_secs_f64() / train_s } else { 0.0 },
        comm_fraction: if train_s > 0.0 { comm_time.as_secs_f64() / train_s } else { 0.0 },
        rank,
        world_size,
        wall_s: started.elapsed().as_secs_f64(),
        skipped_samples,
        checkpoints: saves,
        peak_memory_bytes: peak_rss_bytes(),
        plan,
    };
    if writer {
        metrics.write(
            "end",
            json!({ "steps": step, "steps_this_attempt": step - first_step, "summary": &summary }),
        )?;
        let path = summary.plan.job_dir.join("summary.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&summary).unwrap_or_default())
            .map_err(|source| Error::Io { path: path.display().to_string(), source })?;
    }
    Ok(summary)
}

fn finish_save(
    runtime: &tokio::runtime::Runtime,
    save: PendingSave,
    metrics: &mut MetricsLog,
) -> Result<SaveStats> {
    let (stats, deleted) =
        runtime.block_on(save).map_err(|e| Error::Internal(format!("checkpoint task failed: {e}")))??;
    metrics.write(
        "checkpoint",
        json!({ "step": stats.step, "bytes": stats.bytes, "save_s": stats.seconds, "purged": deleted }),
    )?;
    Ok(stats)
}
