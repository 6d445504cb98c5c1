//! `effnet run JOB.yaml`: train a job in this process, resuming from its newest checkpoint.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use effnet_config::JobSpec;
use effnet_train::{ResumeFrom, RunOptions, RunPlan, RunSummary};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job file (YAML; every key is described in docs/config.md).
    job: PathBuf,
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
    let spec = JobSpec::load(&args.job)?;
    if args.check {
        let plan = effnet_train::check(&spec)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            print_plan(&plan);
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
    let summary = effnet_train::run(&spec, RunOptions { resume, progress })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(())
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
    println!(
        "steps            {} ({} per epoch, global batch {})",
        plan.total_steps, plan.steps_per_epoch, plan.global_batch
    );
    println!(
        "learning rate    peak {:.4e} after {} warm-up steps, then {:?}",
        plan.schedule.peak, plan.schedule.warmup_steps, plan.schedule.decay
    );
    println!("drop path        {:?}", plan.drop_path);
    println!(
        "evaluation       {}",
        plan.eval_every_steps
            .map(|s| format!("every {s} steps and at the end"))
            .unwrap_or("at the end".into())
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
    if summary.skipped_samples > 0 {
        println!("skipped          {} unusable samples (keys in metrics.jsonl)", summary.skipped_samples);
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
