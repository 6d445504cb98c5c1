//! `effnet report --job-dir DIR [--job-dir DIR ...] --out DIR|URL`: the benchmark report of one or
//! more job directories (`report.md`, `report.html`, `report.json` and the plots as SVG files).
//! `effnet run` writes the same report at the end of a job (`report.enabled`, `report.out`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use effnet_report::Report;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// A job directory (`job_dir` of a job: job.json, metrics.jsonl, evaluation.json). Repeat it
    /// to put other jobs' measured rows and curves beside the first one's.
    #[arg(long = "job-dir", value_name = "DIR", required = true)]
    job_dirs: Vec<PathBuf>,
    /// Where to write the report: a directory or a store URL (s3://, gs://, az://, memory://).
    #[arg(long, value_name = "DIR|URL")]
    out: String,
    /// Print report.json on stdout as well.
    #[arg(long)]
    json: bool,
}

pub fn run(args: ReportArgs) -> Result<()> {
    let report = build(&args.job_dirs)?;
    let index = write(&report, &args.out)?;
    if args.json {
        out!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_summary(&report);
        out!("report           {index}");
    }
    Ok(())
}

pub fn build(job_dirs: &[PathBuf]) -> Result<Report> {
    Ok(effnet_report::build(job_dirs, &format!("effnet {}", env!("CARGO_PKG_VERSION")))?)
}

/// Write the report's files to a directory or store URL; returns where report.html is.
pub fn write(report: &Report, out: &str) -> Result<String> {
    if effnet_store::Scheme::of(out)? == effnet_store::Scheme::File {
        let dir = effnet_store::location::local_directory(out, &std::env::current_dir()?)?;
        effnet_report::write(report, &dir)?;
        return Ok(dir.join("report.html").display().to_string());
    }
    let location = effnet_store::open(out)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        for (name, bytes) in effnet_report::files(report) {
            let path = location.path(&name)?;
            effnet_store::io::put_bytes(location.store.as_ref(), &path, bytes)
                .await
                .with_context(|| format!("writing the report to {out}"))?;
        }
        anyhow::Ok(())
    })?;
    Ok(format!("{}/report.html", out.trim_end_matches('/')))
}

fn print_summary(report: &Report) {
    for row in &report.measured {
        out!(
            "{:<16} {} top-1 {}  top-5 {}  ({}, {}×{}, {} epochs; {} params, {} FLOPs)",
            row.job,
            row.label,
            effnet_report::format::percent(row.top1),
            effnet_report::format::percent(row.top5),
            row.dataset,
            row.resolution,
            row.resolution,
            effnet_report::format::epochs(row.epochs),
            effnet_report::format::count(row.params),
            effnet_report::format::count(row.flops),
        );
    }
    for job in &report.jobs {
        if report.measured.iter().all(|r| r.job != job.name) {
            let why =
                if job.data.val.is_none() { "no validation data (data.val)" } else { "no evaluation yet" };
            out!("{:<16} {why}; {}", job.name, job.status);
        }
    }
}

/// The report at the end of `effnet run`, where the job says (`report.out`, else
/// `<job_dir>/report`). A report that cannot be written is a warning: the training it describes
/// is saved either way. With `--json` stdout holds only the summary, so the line goes to stderr.
pub fn after_run(job_dir: &Path, out: &str, json: bool) {
    match build(&[job_dir.to_path_buf()]).and_then(|report| write(&report, out)) {
        Ok(index) if json => eprintln!("report: {index}"),
        Ok(index) => out!("report           {index}"),
        Err(error) => tracing::warn!("the report could not be written: {error:#}"),
    }
}
