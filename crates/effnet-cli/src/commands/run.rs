//! `effnet run JOB.yaml`: train a job, resuming from its newest checkpoint. One worker trains in
//! this process; with `distributed.workers: W > 1` the job is checked here, then handed to the
//! local engine ([`super::local`]): a coordinator in this process and W worker processes per
//! generation (`mpirun -n W effnet worker --coordinator ...` for MPI, or W processes with
//! `RANK`/`WORLD_SIZE`/`LOCAL_RANK` for NCCL), relaunched when a generation fails.
//!
//! `--set key.path=value` (repeatable) overrides a setting of the job file; the coordinator gets
//! the overridden spec, so all ranks read the same one.
//!
//! `effnet worker JOB.yaml`: one rank of a group started by a launcher (mpirun, Slurm's srun,
//! torchrun-style environment) without a coordinator; `effnet worker --coordinator URL --job ID`:
//! a coordinator's worker ([`super::worker`]). Rank 0 writes the job directory and prints the
//! summary.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use effnet_config::{JobSpec, Override};
use effnet_train::{Launch, ResumeFrom, RunOptions, RunPlan, RunSummary};

use crate::failure::bad_input;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job file (YAML; every key is described in docs/config.md).
    job: PathBuf,
    #[command(flatten)]
    train: TrainArgs,
}

/// `effnet worker`: a job file, or a coordinator's job.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The job file, when a launcher (mpirun, srun, torchrun-style variables) starts this worker
    /// without a coordinator.
    #[arg(required_unless_present = "coordinator")]
    job: Option<PathBuf>,
    /// Join this coordinator's job (`--job ID`, or `--job-file F --key K`) instead of reading a
    /// job file: the coordinator hands out the spec, the rank, the resume checkpoint and the
    /// data plans, and hears this worker's progress. Where each generation starts is the
    /// coordinator's to say (`effnet submit --fresh/--resume`).
    #[arg(long, value_name = "URL", conflicts_with_all = ["job", "set", "check", "resume", "fresh"])]
    coordinator: Option<String>,
    /// The coordinator's job id (what `effnet submit` printed).
    #[arg(long = "job", value_name = "ID", requires = "coordinator", conflicts_with = "job_file")]
    job_id: Option<String>,
    /// Submit this job file to the coordinator, then join it: every worker submitting it with
    /// the same `--key` gets the one job (a Kubernetes Job's pods pass the Job's uid).
    #[arg(long, value_name = "FILE", requires_all = ["coordinator", "key"])]
    job_file: Option<PathBuf>,
    /// The idempotency key of `--job-file`'s submission.
    #[arg(long, value_name = "KEY", requires = "job_file")]
    key: Option<String>,
    #[command(flatten)]
    token: super::coordinator::TokenArgs,
    #[command(flatten)]
    train: TrainArgs,
}

/// What `run` and `worker` share.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Override a setting of the job file: a dotted key and a YAML value, e.g.
    /// `--set data.batch_size=32` or `--set 'data.augmentation={crop_scale: [0.5, 1.0]}'`.
    /// Repeatable, applied in order; checked like the file.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(crate) set: Vec<String>,
    /// Validate the job (spec, datasets, model, derived schedule) and print the plan, without
    /// training or writing anything.
    #[arg(long)]
    pub(crate) check: bool,
    /// Resume from this checkpoint directory (a `step-NNNNNNNN` URL) instead of the job's newest.
    #[arg(long, value_name = "URL", conflicts_with = "fresh")]
    pub(crate) resume: Option<String>,
    /// Start from step 0 and delete the job's existing checkpoints.
    #[arg(long)]
    pub(crate) fresh: bool,
    /// Progress bar on stderr (auto: when stderr is a terminal).
    #[arg(long, value_enum, default_value_t = Progress::Auto)]
    pub(crate) progress: Progress,
    /// Print the plan (with --check) or the run summary as JSON on stdout.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Progress {
    Auto,
    Always,
    Never,
}

pub fn run(args: RunArgs) -> Result<()> {
    train(args, Launch::Single)
}

/// `effnet worker JOB.yaml` (one rank of a launched group) or `effnet worker --coordinator URL
/// --job ID` (a coordinator's worker).
pub fn worker(args: WorkerArgs) -> Result<()> {
    match (args.job, args.coordinator, args.job_id, args.job_file, args.key) {
        (_, Some(url), Some(job_id), _, _) => {
            super::worker::coordinated(&url, &job_id, &args.token, &args.train)
        }
        (_, Some(url), None, Some(file), Some(key)) => {
            let job_id = super::coordinator::submit_keyed(&url, &args.token, &file, &key)?;
            super::worker::coordinated(&url, &job_id, &args.token, &args.train)
        }
        (Some(job), None, ..) => train(RunArgs { job, train: args.train }, Launch::Worker),
        _ => Err(bad_input!(
            "effnet worker needs a job file, or --coordinator URL with --job ID or --job-file FILE --key KEY"
        )),
    }
}

fn train(args: RunArgs, launch: Launch) -> Result<()> {
    let RunArgs { job, train: args } = args;
    let overrides =
        args.set.iter().map(|argument| Override::parse(argument)).collect::<Result<Vec<_>, _>>()?;
    let spec = JobSpec::load_with_overrides(&job, &overrides)?;
    if launch == Launch::Single && spec.distributed.workers > 1 && !args.check {
        // Reject a bad job here, in one line, before any worker starts.
        effnet_train::check(&spec)?;
        return super::local::launch(&job, &args, &spec);
    }
    if args.check {
        let plan = effnet_train::check(&spec)?;
        if args.json {
            out!("{}", serde_json::to_string_pretty(&effnet_store::redacted_json(&plan)?)?);
        } else {
            print_plan(&plan);
            let workers = spec.distributed.workers;
            if workers > 1 {
                let backend = format!("{:?}", super::local::backend(&spec)).to_lowercase();
                out!("workers          {workers} ({backend}, device {:?})", spec.distributed.device);
            }
            out!("{}: ok", job.display());
        }
        return Ok(());
    }
    let resume = match (&args.resume, args.fresh) {
        (Some(url), _) => ResumeFrom::Url(url.clone()),
        (None, true) => ResumeFrom::Fresh,
        (None, false) => ResumeFrom::Latest,
    };
    let summary = effnet_train::run(
        &spec,
        RunOptions { resume, progress: args.progress(), launch, live: None, rendezvous: None, dealer: None },
    )?;
    finish(&spec, &summary, &args);
    Ok(())
}

impl TrainArgs {
    /// The progress bar: forced on or off, or `None` for the job's setting.
    pub(crate) fn progress(&self) -> Option<bool> {
        match self.progress {
            Progress::Auto => None,
            Progress::Always => Some(true),
            Progress::Never => Some(false),
        }
    }
}

/// Rank 0 prints the summary and writes the report.
pub(crate) fn finish(spec: &JobSpec, summary: &RunSummary, args: &TrainArgs) {
    if summary.rank != 0 {
        return;
    }
    if args.json {
        out!(
            "{}",
            effnet_store::redacted_json(summary)
                .and_then(|s| serde_json::to_string_pretty(&s))
                .unwrap_or_default()
        );
    } else {
        print_summary(summary);
    }
    if spec.report.enabled {
        super::report::after_run(&summary.plan.job_dir, &spec.report_dir(), args.json);
    }
}

fn print_plan(plan: &RunPlan) {
    let model = &plan.model;
    out!("job              {}  (directory {})", plan.job, plan.job_dir.display());
    out!(
        "model            {} at {}×{}, {} classes, {} input channel(s), {} parameters, {:.3} GFLOPs",
        model.architecture,
        plan.resolution,
        plan.resolution,
        model.classes,
        model.input_channels,
        model.parameters,
        plan.multiply_adds as f64 / 1e9
    );
    out!(
        "data             {} training samples{}",
        plan.train_samples,
        plan.val_samples.map(|v| format!(", {v} validation samples")).unwrap_or_default()
    );
    let length = match plan.length {
        effnet_train::progress::TrainLength::Steps(steps) => format!("{steps} steps"),
        effnet_train::progress::TrainLength::Epochs(epochs) => format!("{epochs} epochs"),
    };
    out!(
        "steps            {} ({} per epoch, global batch {}; {length})",
        plan.total_steps,
        plan.steps_per_epoch,
        plan.global_batch
    );
    out!(
        "learning rate    peak {:.4e} after {:.2} warm-up steps, then {:?}",
        plan.schedule.peak,
        plan.schedule.warmup_steps,
        plan.schedule.decay
    );
    out!("drop path        {:?}", plan.drop_path);
    out!("dropout          {}", plan.dropout);
    out!(
        "evaluation       {}",
        match plan.eval_every {
            Some(effnet_train::schedule::Interval::Steps(steps)) =>
                format!("every {steps} steps and at the end"),
            Some(effnet_train::schedule::Interval::Epochs(epochs)) =>
                format!("every {epochs} epochs and at the end"),
            None => "at the end".into(),
        }
    );
    out!("checkpoints      {}", effnet_store::Redacted(&plan.checkpoint_url));
}

fn print_summary(summary: &RunSummary) {
    print_plan(&summary.plan);
    if let Some(step) = summary.resumed_from {
        out!("resumed from     step {step}");
    }
    out!(
        "trained          {} steps, {:.1} images/s, data wait {:.1}% of step time, {:.0} s wall",
        summary.steps,
        summary.train_images_per_s,
        summary.data_wait_fraction * 100.0,
        summary.wall_s
    );
    if summary.world_size > 1 {
        out!(
            "workers          {} (all-reduce {:.1}% of rank 0's step time)",
            summary.world_size,
            summary.comm_fraction * 100.0
        );
    }
    let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
    match (summary.peak_memory_bytes, summary.gpu_memory_peak_bytes) {
        (Some(host), Some(gpu)) => out!(
            "peak memory      {:.0} MiB resident, {:.0} MiB on the GPU (held by tensors)",
            mib(host as f64),
            mib(gpu as f64)
        ),
        (Some(host), None) => out!("peak memory      {:.0} MiB resident", mib(host as f64)),
        (None, Some(gpu)) => {
            out!("peak memory      {:.0} MiB on the GPU (held by tensors)", mib(gpu as f64))
        }
        (None, None) => {}
    }
    if summary.skipped_samples > 0 {
        let keys: Vec<String> =
            summary.skipped.iter().map(|s| format!("{} (rank {}: {})", s.key, s.rank, s.reason)).collect();
        out!("skipped          {} unusable samples: {}", summary.skipped_samples, keys.join(", "));
    }
    if let Some(val) = summary.val {
        out!(
            "validation       top-1 {:.2}%  top-5 {:.2}%  loss {:.4}  ({} samples)",
            val.top1 * 100.0,
            val.top5 * 100.0,
            val.loss,
            val.samples
        );
    }
    if let Some(val) = summary.val_ema {
        out!(
            "validation (EMA) top-1 {:.2}%  top-5 {:.2}%  loss {:.4}",
            val.top1 * 100.0,
            val.top5 * 100.0,
            val.loss
        );
    }
    if let Some(last) = summary.checkpoints.last() {
        out!(
            "last checkpoint  {}/step-{:08} ({:.1} MB, saved in {:.2} s)",
            effnet_store::redact(summary.plan.checkpoint_url.trim_end_matches('/')),
            last.step,
            last.bytes as f64 / 1e6,
            last.seconds
        );
    }
    if !summary.failed_checkpoints.is_empty() {
        let steps: Vec<String> = summary.failed_checkpoints.iter().map(u64::to_string).collect();
        println!(
            "failed           {} checkpoint(s) not saved, of steps {} (checkpoint_failed in metrics.jsonl)",
            steps.len(),
            steps.join(", ")
        );
    }
}
