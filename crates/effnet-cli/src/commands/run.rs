//! `effnet run JOB.yaml`: train a job, resuming from its newest checkpoint. One worker trains in
//! this process; with `distributed.workers: W > 1` the job is checked here, then W worker
//! processes are launched on this machine (`mpirun -n W effnet worker JOB.yaml` for MPI, or W
//! processes with `RANK`/`WORLD_SIZE`/`LOCAL_RANK`/`MASTER_ADDR`/`MASTER_PORT` for NCCL).
//!
//! `--set key.path=value` (repeatable) overrides a setting of the job file; the launcher passes
//! the same arguments to every worker, so all ranks read the same spec.
//!
//! `effnet worker JOB.yaml`: one rank of such a group, started by a launcher (mpirun, Slurm's
//! srun, torchrun-style environment). Rank 0 writes the job directory and prints the summary.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use effnet_config::{JobSpec, Override};
use effnet_train::{Launch, ResumeFrom, RunOptions, RunPlan, RunSummary};

use crate::failure::{WorkersFailed, bad_input};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job file (YAML; every key is described in docs/config.md).
    job: PathBuf,
    /// Override a setting of the job file: a dotted key and a YAML value, e.g.
    /// `--set data.batch_size=32` or `--set 'data.augmentation={crop_scale: [0.5, 1.0]}'`.
    /// Repeatable, applied in order; checked like the file.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Validate the job (spec, datasets, model, derived schedule) and print the plan, without
    /// training or writing anything.
    #[arg(long)]
    check: bool,
    /// Resume from this checkpoint directory (a `step-NNNNNNNN` URL) instead of the job's newest.
    #[arg(long, value_name = "URL", conflicts_with = "fresh")]
    resume: Option<String>,
    /// Start from step 0 and delete the job's existing checkpoints.
    #[arg(long)]
    fresh: bool,
    /// Progress bar on stderr (auto: when stderr is a terminal).
    #[arg(long, value_enum, default_value_t = Progress::Auto)]
    progress: Progress,
    /// Print the plan (with --check) or the run summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Progress {
    Auto,
    Always,
    Never,
}

pub fn run(args: RunArgs) -> Result<()> {
    train(args, Launch::Single)
}

/// `effnet worker JOB.yaml`: one rank of a launched group.
pub fn worker(args: RunArgs) -> Result<()> {
    train(args, Launch::Worker)
}

fn train(args: RunArgs, launch: Launch) -> Result<()> {
    let overrides =
        args.set.iter().map(|argument| Override::parse(argument)).collect::<Result<Vec<_>, _>>()?;
    let spec = JobSpec::load_with_overrides(&args.job, &overrides)?;
    if launch == Launch::Single && spec.distributed.workers > 1 && !args.check {
        // Reject a bad job here, in one line, before any worker starts.
        effnet_train::check(&spec)?;
        return launch_workers(&args, &spec);
    }
    if args.check {
        let plan = effnet_train::check(&spec)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            print_plan(&plan);
            let workers = spec.distributed.workers;
            if workers > 1 {
                let backend = format!("{:?}", backend(&spec)).to_lowercase();
                println!("workers          {workers} ({backend}, device {:?})", spec.distributed.device);
            }
            println!("{}: ok", args.job.display());
        }
        return Ok(());
    }
    let resume = match (args.resume, args.fresh) {
        (Some(url), _) => ResumeFrom::Url(url),
        (None, true) => ResumeFrom::Fresh,
        (None, false) => ResumeFrom::Latest,
    };
    let progress = match args.progress {
        Progress::Auto => None,
        Progress::Always => Some(true),
        Progress::Never => Some(false),
    };
    let summary = effnet_train::run(&spec, RunOptions { resume, progress, launch })?;
    if summary.rank != 0 {
        return Ok(());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    if spec.report.enabled {
        super::report::after_run(&summary.plan.job_dir, &spec.report_dir(), args.json);
    }
    Ok(())
}

/// The arguments a worker gets: the same job, overrides and resume choice.
fn worker_args(args: &RunArgs) -> Vec<String> {
    let mut out = vec!["worker".to_string(), args.job.display().to_string()];
    for argument in &args.set {
        out.extend(["--set".into(), argument.clone()]);
    }
    if let Some(url) = &args.resume {
        out.extend(["--resume".into(), url.clone()]);
    }
    if args.fresh {
        out.push("--fresh".into());
    }
    let progress = match args.progress {
        Progress::Auto => "auto",
        Progress::Always => "always",
        Progress::Never => "never",
    };
    out.extend(["--progress".into(), progress.into()]);
    if args.json {
        out.push("--json".into());
    }
    out
}

/// The collective backend of a job: as set, else NCCL on CUDA and MPI on the CPU.
fn backend(spec: &JobSpec) -> effnet_config::Backend {
    let cuda = spec.distributed.device == effnet_config::Device::Cuda;
    spec.distributed.backend.unwrap_or(if cuda {
        effnet_config::Backend::Nccl
    } else {
        effnet_config::Backend::Mpi
    })
}

/// Start `distributed.workers` worker processes on this machine and wait for them.
fn launch_workers(args: &RunArgs, spec: &JobSpec) -> Result<()> {
    let workers = spec.distributed.workers as usize;
    let exe = std::env::current_exe().context("locating the effnet binary")?;
    let status = match backend(spec) {
        effnet_config::Backend::Mpi => {
            let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            let mut command = Command::new("mpirun");
            command.arg("-n").arg(workers.to_string());
            // One core per rank when there are enough; otherwise let them share.
            if cores >= workers {
                command.args(["--bind-to", "core"]);
            } else {
                command.args(["--bind-to", "none", "--oversubscribe"]);
            }
            if is_root() {
                command.arg("--allow-run-as-root");
            }
            command.arg(&exe).args(worker_args(args));
            command.status().map_err(|e| {
                bad_input!(
                    "distributed.backend: mpi needs Open MPI's mpirun on PATH (Debian: apt install openmpi-bin): {e}"
                )
            })?
        }
        effnet_config::Backend::Nccl => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .context("choosing a rendezvous port")?
                .port();
            let mut children = Vec::with_capacity(workers);
            for rank in 0..workers {
                let child = Command::new(&exe)
                    .args(worker_args(args))
                    .env("RANK", rank.to_string())
                    .env("WORLD_SIZE", workers.to_string())
                    .env("LOCAL_RANK", rank.to_string())
                    .env("LOCAL_WORLD_SIZE", workers.to_string())
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", port.to_string())
                    .spawn()
                    .context("starting a worker")?;
                children.push(child);
            }
            // The first failure ends the others (they would wait for it until their timeout).
            let mut first_failure = None;
            let mut running = children;
            while !running.is_empty() {
                let mut still = Vec::new();
                for mut child in running {
                    match child.try_wait()? {
                        Some(status) if !status.success() && first_failure.is_none() => {
                            first_failure = Some(status)
                        }
                        Some(_) => {}
                        None => still.push(child),
                    }
                }
                if first_failure.is_some() {
                    for child in &mut still {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    still.clear();
                }
                running = still;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            match first_failure {
                Some(status) => status,
                None => return Ok(()),
            }
        }
        effnet_config::Backend::Local => {
            return Err(bad_input!(
                "distributed.backend: local trains in one process, but distributed.workers is {workers}"
            ));
        }
    };
    if status.success() {
        Ok(())
    } else {
        Err(anyhow::Error::new(WorkersFailed { code: status.code().unwrap_or(1) }))
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

fn print_plan(plan: &RunPlan) {
    let model = &plan.model;
    println!("job              {}  (directory {})", plan.job, plan.job_dir.display());
    println!(
        "model            {} at {}×{}, {} classes, {} input channel(s), {} parameters, {:.3} GFLOPs",
        model.architecture,
        plan.resolution,
        plan.resolution,
        model.classes,
        model.input_channels,
        model.parameters,
        plan.multiply_adds as f64 / 1e9
    );
    println!(
        "data             {} training samples{}",
        plan.train_samples,
        plan.val_samples.map(|v| format!(", {v} validation samples")).unwrap_or_default()
    );
    let length = match plan.length {
        effnet_train::progress::TrainLength::Steps(steps) => format!("{steps} steps"),
        effnet_train::progress::TrainLength::Epochs(epochs) => format!("{epochs} epochs"),
    };
    println!(
        "steps            {} ({} per epoch, global batch {}; {length})",
        plan.total_steps, plan.steps_per_epoch, plan.global_batch
    );
    println!(
        "learning rate    peak {:.4e} after {:.2} warm-up steps, then {:?}",
        plan.schedule.peak, plan.schedule.warmup_steps, plan.schedule.decay
    );
    println!("drop path        {:?}", plan.drop_path);
    println!("dropout          {}", plan.dropout);
    println!(
        "evaluation       {}",
        match plan.eval_every {
            Some(effnet_train::schedule::Interval::Steps(steps)) =>
                format!("every {steps} steps and at the end"),
            Some(effnet_train::schedule::Interval::Epochs(epochs)) =>
                format!("every {epochs} epochs and at the end"),
            None => "at the end".into(),
        }
    );
    println!("checkpoints      {}", plan.checkpoint_url);
}

fn print_summary(summary: &RunSummary) {
    print_plan(&summary.plan);
    if let Some(step) = summary.resumed_from {
        println!("resumed from     step {step}");
    }
    println!(
        "trained          {} steps, {:.1} images/s, data wait {:.1}% of step time, {:.0} s wall",
        summary.steps,
        summary.train_images_per_s,
        summary.data_wait_fraction * 100.0,
        summary.wall_s
    );
    if summary.world_size > 1 {
        println!(
            "workers          {} (all-reduce {:.1}% of rank 0's step time)",
            summary.world_size,
            summary.comm_fraction * 100.0
        );
    }
    let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
    match (summary.peak_memory_bytes, summary.gpu_memory_peak_bytes) {
        (Some(host), Some(gpu)) => println!(
            "peak memory      {:.0} MiB resident, {:.0} MiB on the GPU (held by tensors)",
            mib(host as f64),
            mib(gpu as f64)
        ),
        (Some(host), None) => println!("peak memory      {:.0} MiB resident", mib(host as f64)),
        (None, Some(gpu)) => {
            println!("peak memory      {:.0} MiB on the GPU (held by tensors)", mib(gpu as f64))
        }
        (None, None) => {}
    }
    if summary.skipped_samples > 0 {
        let keys: Vec<String> =
            summary.skipped.iter().map(|s| format!("{} (rank {}: {})", s.key, s.rank, s.reason)).collect();
        println!("skipped          {} unusable samples: {}", summary.skipped_samples, keys.join(", "));
    }
    if let Some(val) = summary.val {
        println!(
            "validation       top-1 {:.2}%  top-5 {:.2}%  loss {:.4}  ({} samples)",
            val.top1 * 100.0,
            val.top5 * 100.0,
            val.loss,
            val.samples
        );
    }
    if let Some(val) = summary.val_ema {
        println!(
            "validation (EMA) top-1 {:.2}%  top-5 {:.2}%  loss {:.4}",
            val.top1 * 100.0,
            val.top5 * 100.0,
            val.loss
        );
    }
    if let Some(last) = summary.checkpoints.last() {
        println!(
            "last checkpoint  {}/step-{:08} ({:.1} MB, saved in {:.2} s)",
            summary.plan.checkpoint_url.trim_end_matches('/'),
            last.step,
            last.bytes as f64 / 1e6,
            last.seconds
        );
    }
}
