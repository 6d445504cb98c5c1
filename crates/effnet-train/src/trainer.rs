//! The training run: validate the job ([`crate::job`]), build the parts, restore them from the
//! checkpoint rank 0 chose, then the loop ([`Training::run_loop`]):
//!
//! ```text
//! while not done:
//!     input   = feed.next_step()        this rank's batches; none once its share of the epoch is done
//!     outcome = step.run(input)         forward, backward, agree on counts and the epoch's end,
//!                                       sum gradients, update optimiser and EMA
//!     record(outcome)                   progress, metrics, sample keys, skipped samples, console
//!     maybe evaluate                    every `eval.every_*` and after the last step
//!     maybe checkpoint                  every Stateful part, in the background
//! ```
//!
//! Everything a resume needs is in the parts' checkpointed state or a function of it (see
//! [`crate::state`]), so a run killed and resumed from step k ends with the same bits as one that
//! never stopped.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use effnet_config::JobSpec;
use effnet_store::{Redacted, redact, redacted_json};
use serde::Serialize;
use serde_json::json;
use tch::Device;

use crate::checkpoint::SaveStats;
use crate::checkpointer::Checkpointer;
pub use crate::checkpointer::ResumeFrom;
use crate::error::{Error, Result};
use crate::evaluate::{
    EvalMetrics, Evaluation, Evaluator, FinalEvaluation, ReportHeader, checkpoint_report, peak_rss_bytes,
};
use crate::feed::{Feed, FeedSettings, StepInput};
use crate::job::{Prepared, RunPlan, device, prepare, runtime};
use crate::metrics::{EVALUATION_FILE, JOB_FILE, MetricsLog, SUMMARY_FILE, previous_attempts};
use crate::network::{Averaged, Network};
use crate::optim::{Optimizer, OptimizerRule};
use crate::progress::{Console, LiveProgress, TrainProgress};
use crate::state::{CheckpointContent, RunIdentity, Stateful};
use crate::step::{StepOutcome, TrainStep, step_seed};
use crate::sync::{DataParallel, connect};
use effnet_store::faults::{Phase, point as fault_point};

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
    /// Kept up to date with this rank's step, loss and committed checkpoints (for heartbeats).
    pub live: Option<LiveProgress>,
    /// How NCCL's unique id reaches the ranks (a coordinator's); `None`: `MASTER_ADDR:MASTER_PORT`.
    pub rendezvous: Option<std::sync::Arc<dyn effnet_collective::rendezvous::Rendezvous>>,
    /// Where the data plans come from (a coordinator's deal); `None`: computed here.
    pub dealer: Option<std::sync::Arc<dyn crate::feed::Dealer>>,
}

/// A sample a rank could not use, with why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SkippedSample {
    pub key: String,
    pub reason: String,
    pub rank: usize,
    pub epoch: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    pub plan: RunPlan,
    pub resumed_from: Option<u64>,
    pub steps: u64,
    pub epochs_completed: u64,
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
    /// Samples skipped in this attempt, all ranks.
    pub skipped_samples: u64,
    pub skipped: Vec<SkippedSample>,
    pub checkpoints: Vec<SaveStats>,
    /// Steps whose checkpoint failed and was skipped (`checkpoint.on_error: continue`).
    pub failed_checkpoints: Vec<u64>,
    /// Peak resident memory of this process (Linux VmHWM), bytes.
    pub peak_memory_bytes: Option<u64>,
    /// Peak bytes held by tensors on this rank's GPU (the CUDA caching allocator's), on CUDA.
    pub gpu_memory_peak_bytes: Option<i64>,
    /// Peak bytes the allocator reserved from the driver (held plus cached), on CUDA.
    pub gpu_memory_reserved_peak_bytes: Option<i64>,
}

/// Train the job to its end, resuming as `options` says. Everything that can be rejected (spec,
/// datasets, transforms, checkpoint) is checked before anything is written.
///
/// With [`Launch::Worker`] this process is one rank of a data-parallel group started by a
/// launcher; an error on any rank aborts the whole group, so no peer waits for it until its
/// timeout.
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
    let mut parallel = connect(spec, options.launch, device, options.rendezvous.as_deref())?;
    let result = Training::build(spec, &options, &runtime, prepared, device, parallel.as_mut())
        .and_then(|training| training.run(&options, &mut parallel, started));
    if let (Err(error), Some(parallel)) = (&result, &parallel) {
        // The others would wait in their next collective until the timeout: end them now.
        eprintln!("effnet: rank {}: {error}", parallel.rank());
        parallel.abort(if error.is_bad_input() { 2 } else { 1 });
    }
    result
}

/// The parts of a run and the little the loop adds up.
struct Training<'a> {
    spec: &'a JobSpec,
    runtime: &'a tokio::runtime::Runtime,
    plan: RunPlan,
    rank: usize,
    world_size: usize,
    identity: RunIdentity,
    network: Network,
    optimizer: Optimizer,
    averaged: Option<Averaged>,
    progress: TrainProgress,
    feed: Feed,
    step: TrainStep,
    evaluator: Evaluator,
    checkpointer: Checkpointer,
    restored: Option<(String, u64)>,
    totals: Totals,
    live: Option<LiveProgress>,
}

#[derive(Default)]
struct Totals {
    train_time: Duration,
    wait_time: Duration,
    comm_time: Duration,
    /// This rank's trained samples.
    local_images: u64,
    /// Every rank's trained samples.
    global_images: u64,
    skipped: Vec<SkippedSample>,
    skipped_count: u64,
}

impl<'a> Training<'a> {
    fn build(
        spec: &'a JobSpec,
        options: &RunOptions,
        runtime: &'a tokio::runtime::Runtime,
        prepared: Prepared,
        device: Device,
        mut parallel: Option<&mut DataParallel>,
    ) -> Result<Training<'a>> {
        let Prepared { plan, train, val, config, train_transform, eval_transform } = prepared;
        let (rank, world_size) = parallel.as_ref().map_or((0, 1), |p| (p.rank(), p.world_size()));
        let threads = spec
            .training
            .threads
            .map(|t| t as usize)
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        tch::set_num_threads(threads as i32);

        // The initial weights come from libtorch's generator: seed it so a job starts identically.
        tch::manual_seed(step_seed(spec.seed, u64::MAX, 0));
        let precision = crate::evaluate::Precision {
            device,
            bf16: spec.training.precision == effnet_config::Precision::Bf16,
            channels_last: spec.training.channels_last.unwrap_or(device.is_cuda()),
        };
        let mut network = Network::build(&config, &plan.model, precision)?;
        let (hooks, sync_batch_norm) = crate::hooks::forward_hooks(spec, world_size);
        network.model.set_hooks(hooks);
        let optimizer = Optimizer::new(
            OptimizerRule::from_config(&spec.optimizer),
            network.trainable(),
            spec.optimizer.weight_decay(),
            spec.optimizer.decay_norm_and_bias,
        );
        let averaged =
            if spec.training.ema.enabled { Some(Averaged::new(&network, &config, spec)?) } else { None };
        let [height, width] = [plan.resolution as i64; 2];
        let feed = Feed::new(FeedSettings {
            dataset: train,
            transform: train_transform,
            sample_shape: [spec.model.input_channels as i64, height, width],
            stream: effnet_data::loader::StreamOptions {
                batch_size: spec.data.batch_size as usize,
                threads: spec.data.loader_threads as usize,
                seed: spec.seed,
                shuffle_buffer: spec.data.shuffle_buffer as usize,
                prefetch: spec.data.prefetch as usize,
            },
            rank,
            world_size,
            dealer: options.dealer.clone(),
        });
        let mut step = TrainStep::from_config(spec, rank, [spec.model.input_channels as i64, height, width]);
        step.sync_batch_norm = sync_batch_norm;
        step.buckets =
            parallel.as_deref().map(|p| p.buckets(&optimizer.parameters(), &network.model.parameters()));
        let evaluator = Evaluator::from_config(spec, val, eval_transform, plan.eval_every);
        let checkpointer = Checkpointer::from_config(spec, rank == 0)?;
        let mut training = Training {
            spec,
            runtime,
            rank,
            world_size,
            identity: RunIdentity::new(spec, world_size)?,
            network,
            optimizer,
            averaged,
            progress: TrainProgress::default(),
            feed,
            step,
            evaluator,
            checkpointer,
            restored: None,
            totals: Totals::default(),
            live: options.live.clone(),
            plan,
        };
        if let Some(checkpoint) =
            training.checkpointer.resume_point(runtime, &options.resume, parallel.as_deref_mut())?
        {
            training.load(&checkpoint)?;
            training.restored = Some((checkpoint.url.clone(), training.progress.step));
        }
        training.checkpointer.check_writable(runtime)?;
        // Every rank built or loaded the same weights; rank 0's are authoritative all the same.
        if let Some(parallel) = parallel {
            parallel.broadcast_variables(&training.network.variables())?;
            if let Some(averaged) = &training.averaged {
                parallel.broadcast_variables(&averaged.network.variables())?;
            }
        }
        Ok(training)
    }

    /// Every part with state: what a checkpoint saves.
    fn stateful(&self) -> Vec<&dyn Stateful> {
        let mut parts: Vec<&dyn Stateful> = vec![&self.identity, &self.network, &self.optimizer];
        if let Some(averaged) = &self.averaged {
            parts.push(averaged);
        }
        parts.push(&self.progress);
        parts.push(&self.feed);
        parts
    }

    /// Restore every part. The EMA restarts from the restored weights when the checkpoint has
    /// none, so the network comes first; the identity last, so its warnings follow a load that
    /// succeeded.
    fn load(&mut self, checkpoint: &CheckpointContent) -> Result<()> {
        self.network.load(checkpoint)?;
        self.optimizer.load(checkpoint)?;
        if let Some(averaged) = &mut self.averaged {
            averaged.load(checkpoint)?;
        }
        self.progress.load(checkpoint)?;
        self.feed.load(checkpoint)?;
        self.identity.load(checkpoint)?;
        let url = &checkpoint.url;
        if self.rank == 0 && self.identity.spec_changed {
            tracing::warn!(url = %Redacted(url), "the job spec changed since this checkpoint was written; continuing with the new spec");
        }
        if self.rank == 0
            && let Some(saved) = self.identity.restored_seed.filter(|&s| s != self.identity.seed)
        {
            tracing::warn!(url = %Redacted(url), saved, job = self.identity.seed, "the checkpoint was trained with another seed; the rest of its epoch keeps its order, later epochs and masks follow the job's seed");
        }
        Ok(())
    }

    fn run(
        mut self,
        options: &RunOptions,
        parallel: &mut Option<DataParallel>,
        started: Instant,
    ) -> Result<RunSummary> {
        let mut metrics = self.open_logs(options, parallel.as_mut())?;
        let console = Console::new(
            self.rank == 0
                && options
                    .progress
                    .or(self.spec.training.progress)
                    .unwrap_or_else(|| std::io::stderr().is_terminal()),
            self.plan.total_steps,
            self.progress.step,
            self.spec.training.log_every as u64,
            self.rank,
        );
        let first_step = self.progress.step;
        self.feed.start(self.runtime, self.progress.epoch);
        self.run_loop(&mut metrics, &console, parallel.as_mut())?;
        self.checkpointer.finish(self.runtime, &mut metrics)?;
        self.publish_checkpoint();
        console.finish();
        self.summarise(&mut metrics, first_step, started)
    }

    /// The loop.
    fn run_loop(
        &mut self,
        metrics: &mut MetricsLog,
        console: &Console,
        mut parallel: Option<&mut DataParallel>,
    ) -> Result<()> {
        let epoch_samples = self.plan.train_samples;
        while !self.progress.is_done(self.plan.length, epoch_samples) {
            let step_started = Instant::now();
            fault_point(Phase::DataRead, self.progress.step + 1, Some(self.rank));
            let input = self.feed.next_step(self.step.accumulate as usize)?;
            let waited = step_started.elapsed();
            let before = self.progress.clone();
            let position = before.position(self.plan.global_batch);
            let (lr, drop_path) = (self.plan.schedule.lr(position), self.plan.drop_path.multiplier(position));
            self.network.model.set_drop_path_multiplier(drop_path)?;
            let outcome = self.step.run(
                before.step,
                &input,
                lr,
                &self.network,
                &mut self.optimizer,
                self.averaged.as_mut(),
                parallel.as_deref_mut(),
            )?;
            self.record(
                &input,
                &outcome,
                metrics,
                console,
                parallel.as_deref_mut(),
                (lr, drop_path),
                step_started,
                waited,
            )?;
            self.checkpointer.poll(self.runtime, metrics)?;
            self.publish_checkpoint();
            let last = self.progress.is_done(self.plan.length, epoch_samples);
            let step = self.progress.step;
            let evaluate = self.evaluator.due(
                step,
                before.samples_consumed,
                self.progress.samples_consumed,
                epoch_samples,
                last,
            );
            let checkpoint = self.checkpointer.due(step, outcome.epoch_ends, last);
            if evaluate || checkpoint {
                self.average_batch_norm(parallel.as_deref_mut())?;
            }
            let metric =
                if evaluate { self.evaluate(metrics, console, parallel.as_deref_mut(), last)? } else { None };
            if checkpoint {
                // What the save costs this thread (gathering the cursor, copying the state out,
                // waiting for the previous save) is logged with it as `blocked_s`.
                let begun = Instant::now();
                self.feed.gather(parallel.as_deref_mut())?;
                // Only rank 0 writes; the others skip serialising.
                let files =
                    if self.rank == 0 { Checkpointer::assemble(&self.stateful())? } else { Vec::new() };
                self.checkpointer.save(self.runtime, step, metric, files, begun, metrics)?;
            }
        }
        Ok(())
    }

    /// Advance the progress by a step's outcome and log it.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        input: &StepInput,
        outcome: &StepOutcome,
        metrics: &mut MetricsLog,
        console: &Console,
        parallel: Option<&mut DataParallel>,
        (lr, drop_path): (f64, f64),
        step_started: Instant,
        waited: Duration,
    ) -> Result<()> {
        let progress = &mut self.progress;
        let trained_step = progress.step;
        if outcome.samples > 0 {
            progress.step += 1;
        }
        progress.samples_seen += outcome.samples;
        progress.samples_consumed += outcome.samples + outcome.skipped;
        for batch in &input.batches {
            metrics.write_samples(trained_step, batch.keys.iter())?;
        }
        if outcome.skipped > 0 {
            self.record_skipped(input, metrics, console, parallel)?;
        }
        let (step, epoch) = (self.progress.step, self.progress.epoch);
        if outcome.epoch_ends {
            let expected = (epoch + 1) * self.plan.train_samples;
            if self.progress.samples_consumed != expected {
                tracing::warn!(
                    counted = self.progress.samples_consumed,
                    expected,
                    epoch,
                    "the epoch's sample count is off"
                );
                self.progress.samples_consumed = expected;
            }
            self.progress.epoch += 1;
            self.feed.end_epoch();
            metrics.write("epoch_end", json!({ "epoch": epoch, "step": step }))?;
        }
        let elapsed = step_started.elapsed();
        self.totals.train_time += elapsed;
        self.totals.wait_time += waited;
        self.totals.comm_time += outcome.comm;
        self.totals.local_images += outcome.local_samples;
        self.totals.global_images += outcome.samples;
        if outcome.samples == 0 {
            return Ok(());
        }
        let seconds = elapsed.as_secs_f64().max(1e-9);
        let images_per_s = outcome.samples as f64 / seconds;
        let gpu = self.gpu_memory();
        metrics.write(
            "step",
            json!({
                "gpu_memory_bytes": gpu.map(|m| m.allocated),
                "gpu_memory_peak_bytes": gpu.map(|m| m.allocated_peak),
                "step": step,
                "epoch": epoch,
                "samples": outcome.samples,
                "loss": outcome.loss,
                "lr": lr,
                "drop_path": drop_path,
                "images_per_s": images_per_s,
                "data_wait": waited.as_secs_f64() / seconds,
                "comm": outcome.comm.as_secs_f64() / seconds,
                "step_s": seconds,
            }),
        )?;
        console.step(step, epoch, outcome.loss, lr, images_per_s);
        if let Some(live) = &self.live {
            let mut live = live.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            live.step = step;
            live.epoch = self.progress.samples_consumed as f64 / self.plan.train_samples.max(1) as f64;
            live.loss = Some(outcome.loss);
            live.images_per_s = Some(images_per_s);
        }
        Ok(())
    }

    /// Tell the watcher about the newest committed checkpoint (saves finish in the background).
    fn publish_checkpoint(&self) {
        if let (Some(live), Some(save)) = (&self.live, self.checkpointer.saves.last()) {
            let mut live = live.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if live.checkpoint.as_ref().is_none_or(|(step, _)| *step != save.step) {
                live.checkpoint = Some((save.step, self.checkpointer.url_of(save.step)));
            }
        }
    }

    /// Every rank's skipped samples of this step, gathered; rank 0 logs them.
    fn record_skipped(
        &mut self,
        input: &StepInput,
        metrics: &mut MetricsLog,
        console: &Console,
        parallel: Option<&mut DataParallel>,
    ) -> Result<()> {
        let epoch = self.progress.epoch;
        let mine: Vec<SkippedSample> = input
            .skipped
            .iter()
            .map(|s| SkippedSample { key: s.key.clone(), reason: s.reason.clone(), rank: self.rank, epoch })
            .collect();
        let all: Vec<SkippedSample> = match parallel {
            None => mine,
            Some(parallel) => {
                let bytes = serde_json::to_vec(&mine).map_err(|e| Error::Internal(e.to_string()))?;
                let mut all = Vec::new();
                for part in parallel.all_gather_bytes(&bytes)? {
                    let mut samples: Vec<SkippedSample> = serde_json::from_slice(&part)
                        .map_err(|e| Error::Internal(format!("a rank's skipped samples: {e}")))?;
                    all.append(&mut samples);
                }
                all
            }
        };
        let keys: Vec<&str> = all.iter().map(|s| s.key.as_str()).collect();
        console.println(format!(
            "epoch {epoch}: skipped {} unusable samples: {}",
            keys.len(),
            keys.join(", ")
        ));
        metrics.write("skipped", json!({ "epoch": epoch, "step": self.progress.step, "samples": &all }))?;
        self.totals.skipped_count += all.len() as u64;
        self.totals.skipped.extend(all);
        Ok(())
    }

    /// Each rank's BatchNorm statistics saw only its own batches: evaluate and save their mean.
    fn average_batch_norm(&mut self, parallel: Option<&mut DataParallel>) -> Result<()> {
        if let Some(parallel) = parallel {
            parallel.average_buffers(&self.network.variables())?;
            if let Some(averaged) = &self.averaged {
                parallel.average_buffers(&averaged.network.variables())?;
            }
        }
        Ok(())
    }

    /// Evaluate, log, and after the last step write the full final evaluation (rank 0). Returns
    /// the metric that ranks checkpoints (raw top-1).
    fn evaluate(
        &mut self,
        metrics: &mut MetricsLog,
        console: &Console,
        parallel: Option<&mut DataParallel>,
        last: bool,
    ) -> Result<Option<f64>> {
        let averaged = self.averaged.as_ref().map(|a| &a.network);
        let (raw, average) = self.evaluator.run(self.runtime, &self.network, averaged, parallel)?;
        let (step, epoch) = (self.progress.step, self.progress.epoch);
        let (raw_metrics, average_metrics) = (raw.metrics, average.as_ref().map(|e| e.metrics));
        console.println(format!(
            "step {step} (epoch {epoch}): val top-1 {:.2}% top-5 {:.2}% loss {:.4}{}",
            raw_metrics.top1 * 100.0,
            raw_metrics.top5 * 100.0,
            raw_metrics.loss,
            average_metrics.map(|a| format!("; EMA top-1 {:.2}%", a.top1 * 100.0)).unwrap_or_default()
        ));
        metrics.write(
            "eval",
            json!({ "step": step, "epoch": epoch, "raw": raw_metrics, "ema": average_metrics }),
        )?;
        self.progress.val = Some(raw_metrics);
        self.progress.val_ema = average_metrics;
        if last && self.rank == 0 {
            self.write_final_evaluation(raw, average)?;
        }
        Ok(Some(raw_metrics.top1))
    }

    /// The final evaluation in full (per class, confusion), in the format `effnet eval --json`
    /// prints for the same checkpoint: what the report shows.
    fn write_final_evaluation(&self, raw: Evaluation, average: Option<Evaluation>) -> Result<()> {
        let plan = &self.plan;
        let header = ReportHeader {
            // For people (evaluation.json, the report): URLs redacted.
            checkpoint: redact(&self.checkpointer.url_of(self.progress.step)),
            step: self.progress.step,
            epoch: self.progress.epoch,
            job: self.spec.name.clone(),
            data: redact(self.spec.data.val.as_deref().unwrap_or_default()),
            architecture: plan.model.architecture.clone(),
            parameters: plan.model.parameters,
            resolution: plan.resolution,
            gflops: plan.multiply_adds as f64 / 1e9,
            device: format!("{:?}", self.network.precision.device),
        };
        let classes = self.evaluator.classes();
        let evaluation = FinalEvaluation {
            raw: checkpoint_report(header.clone(), "raw", classes, raw),
            ema: average.map(|e| checkpoint_report(header, "ema", classes, e)),
        };
        evaluation.write(&plan.job_dir).map_err(|source| Error::Io {
            path: plan.job_dir.join(EVALUATION_FILE).display().to_string(),
            source,
        })
    }

    /// Open the logs (rank 0: job directory, `job.json`, `metrics.jsonl`; every rank: its sample
    /// keys if asked) and write the `start` record.
    fn open_logs(&mut self, options: &RunOptions, parallel: Option<&mut DataParallel>) -> Result<MetricsLog> {
        let job_dir = &self.plan.job_dir;
        let mut attempt = if self.rank == 0 { previous_attempts(job_dir) + 1 } else { 0 };
        if let Some(parallel) = parallel {
            let bytes = parallel.broadcast_bytes(&attempt.to_le_bytes())?;
            attempt =
                u64::from_le_bytes(bytes.try_into().map_err(|_| Error::Internal("attempt number".into()))?);
        }
        let mut metrics = MetricsLog::open(job_dir, self.rank, attempt, self.spec.data.log_sample_keys)?;
        if self.rank != 0 {
            return Ok(metrics);
        }
        if options.resume == ResumeFrom::Fresh {
            // The previous run's final evaluation is not this run's.
            let path = job_dir.join(EVALUATION_FILE);
            if let Err(source) = std::fs::remove_file(&path)
                && source.kind() != std::io::ErrorKind::NotFound
            {
                return Err(Error::Io { path: path.display().to_string(), source });
            }
        }
        // Redacted: job.json is for people and the report; the run itself keeps the spec it was
        // given, credentials included, in memory.
        let resolved = redacted_json(&json!({ "spec": self.spec, "plan": &self.plan }))
            .map_err(|e| Error::Internal(e.to_string()))?;
        let path = job_dir.join(JOB_FILE);
        std::fs::write(&path, serde_json::to_vec_pretty(&resolved).unwrap_or_default())
            .map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        let device = self.network.precision.device;
        let restored_world = self.identity.restored_world_size;
        metrics.write(
            "start",
            json!({
                "step": self.progress.step,
                "epoch": self.progress.epoch,
                "resumed_from": self.restored.as_ref().map(|(url, _)| redact(url)),
                // A checkpoint of another world size: the rest of its epoch is re-dealt.
                "resumed_world_size": restored_world,
                "redealt": restored_world.is_some_and(|w| w as usize != self.world_size),
                // `--fresh`: the job starts over; reports ignore the attempts before this one.
                "fresh": options.resume == ResumeFrom::Fresh,
                "total_steps": self.plan.total_steps,
                "steps_per_epoch": self.plan.steps_per_epoch,
                "global_batch": self.plan.global_batch,
                "threads": tch::get_num_threads(),
                "device": format!("{device:?}"),
                "world_size": self.world_size,
                "precision": if self.network.precision.bf16 { "bf16" } else { "fp32" },
                "channels_last": self.network.precision.channels_last,
                "sync_batch_norm": self.step.sync_batch_norm.is_some(),
                "activation_checkpointing": self.spec.model.activation_checkpointing,
                // Gradient buckets all-reduced during backward (`distributed.overlap`).
                "overlap_buckets": self.step.buckets.as_ref().filter(|_| self.step.overlap).map(|b| b.len()),
                "model": &self.plan.model,
                "environment": crate::metrics::environment(device),
            }),
        )?;
        if let Some((url, step)) = &self.restored {
            tracing::info!(url = %Redacted(url), step, world_size = self.world_size, ?restored_world, "resuming");
        }
        Ok(metrics)
    }

    /// The CUDA caching allocator's bytes on this rank's GPU (none on CPU).
    fn gpu_memory(&self) -> Option<crate::autograd::CudaMemory> {
        match self.network.precision.device {
            Device::Cuda(index) => crate::autograd::cuda_memory(index as i32),
            _ => None,
        }
    }

    fn summarise(self, metrics: &mut MetricsLog, first_step: u64, started: Instant) -> Result<RunSummary> {
        let finished = self.progress.is_done(self.plan.length, self.plan.train_samples);
        let train_s = self.totals.train_time.as_secs_f64();
        let fraction = |part: Duration| if train_s > 0.0 { part.as_secs_f64() / train_s } else { 0.0 };
        if self.world_size > 1 {
            tracing::info!(
                rank = self.rank,
                images_per_s = format!("{:.1}", self.totals.local_images as f64 / train_s.max(1e-9)),
                comm = format!("{:.1}%", 100.0 * fraction(self.totals.comm_time)),
                "rank throughput"
            );
        }
        let gpu = self.gpu_memory();
        let summary = RunSummary {
            resumed_from: self.restored.as_ref().map(|(_, step)| *step),
            steps: self.progress.step,
            epochs_completed: self.progress.epoch,
            val: self.progress.val,
            val_ema: self.progress.val_ema,
            train_images_per_s: if train_s > 0.0 { self.totals.global_images as f64 / train_s } else { 0.0 },
            data_wait_fraction: fraction(self.totals.wait_time),
            comm_fraction: fraction(self.totals.comm_time),
            rank: self.rank,
            world_size: self.world_size,
            wall_s: started.elapsed().as_secs_f64(),
            skipped_samples: self.totals.skipped_count,
            skipped: self.totals.skipped,
            checkpoints: self.checkpointer.saves,
            failed_checkpoints: self.checkpointer.failed,
            peak_memory_bytes: peak_rss_bytes(),
            gpu_memory_peak_bytes: gpu.map(|m| m.allocated_peak),
            gpu_memory_reserved_peak_bytes: gpu.map(|m| m.reserved_peak),
            plan: self.plan,
        };
        if summary.rank == 0 {
            metrics.write(
                "end",
                json!({
                    "steps": summary.steps,
                    "steps_this_attempt": summary.steps - first_step,
                    "finished": finished,
                    "summary": &summary,
                }),
            )?;
            let path = summary.plan.job_dir.join(SUMMARY_FILE);
            let redacted = redacted_json(&summary).map_err(|e| Error::Internal(e.to_string()))?;
            std::fs::write(&path, serde_json::to_vec_pretty(&redacted).unwrap_or_default())
                .map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        }
        Ok(summary)
    }
}
