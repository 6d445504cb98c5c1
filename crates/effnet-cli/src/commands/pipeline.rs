//! `effnet pipeline run FILE [--quick]`: a file of stages run in order (prepare → train jobs →
//! report), each skipped when its outputs exist.
//!
//! - `prepare`: `effnet prepare` into `out`; its output is the dataset's manifest (both splits'
//!   for Fashion-MNIST).
//! - `train`: jobs made from one job file and `--set`-style overrides (the stage's, the job's,
//!   and with `--quick` the quick ones), each named `<pipeline>-<job>` in `<work_dir>/<job>`;
//!   each runs as `effnet run` would run it (several workers: through the coordinator in
//!   process), one after another. A job's output is its finished run (`summary.json` at its
//!   last step); a finished job is not run again, an interrupted one resumes.
//! - `report`: the report of every job of a train stage (`effnet report`'s files) plus the
//!   study's own view, `study.md`/`study.json`/`study.svg`: top-1 against FLOPs with one line
//!   per group of jobs. Rebuilt when a job's summary is newer than it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use effnet_config::{JobSpec, Override};
use effnet_report::svg::{Axis, Chart, Mark, PALETTE, Series, Shape};
use serde::{Deserialize, Serialize};

use crate::failure::bad_input;

#[derive(Debug, Subcommand)]
pub enum PipelineCommand {
    /// Run a pipeline's stages in order, skipping those whose outputs exist.
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pipeline file (YAML).
    file: PathBuf,
    /// The reduced version the file defines under `quick` (its jobs, settings and output
    /// places), for a fast end-to-end check.
    #[arg(long)]
    quick: bool,
    /// Submit the train stages' jobs to this coordinator, all at once, and wait for them: the
    /// cluster's engine runs their workers (in parallel when it has the machines). Without it,
    /// each job runs here as `effnet run` runs it. The job directories must be where this
    /// command can read them for the report (shared storage).
    #[arg(long, value_name = "URL")]
    coordinator: Option<String>,
    #[command(flatten)]
    token: super::coordinator::TokenArgs,
}

/// A pipeline file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineFile {
    name: String,
    #[serde(default)]
    description: Option<String>,
    /// Where the jobs' directories go.
    work_dir: PathBuf,
    stages: Vec<Stage>,
    #[serde(default)]
    quick: Option<Quick>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stage {
    name: String,
    #[serde(default)]
    prepare: Option<PrepareStage>,
    #[serde(default)]
    train: Option<TrainStage>,
    #[serde(default)]
    report: Option<ReportStage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrepareStage {
    /// `fashion-mnist`, `idx` or `image-folder`, as `effnet prepare --from`.
    from: String,
    #[serde(default)]
    source: Option<PathBuf>,
    out: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainStage {
    /// The job file every job starts from.
    job: PathBuf,
    /// Overrides for every job (`key=value`, as `effnet run --set`).
    #[serde(default)]
    set: Vec<String>,
    jobs: Vec<TrainJob>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainJob {
    name: String,
    /// The lines of the study's chart this job is a point of (a base network starts several).
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    set: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportStage {
    /// The train stage whose jobs are reported.
    jobs: String,
    out: PathBuf,
    /// Groups drawn as separate points rather than a line (a grid of alternatives).
    #[serde(default)]
    points: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Quick {
    /// Only these jobs (all when empty).
    #[serde(default)]
    jobs: Vec<String>,
    /// Overrides for every job, after the others.
    #[serde(default)]
    set: Vec<String>,
    /// Instead of `work_dir`, so a quick run never mixes with the full one.
    work_dir: PathBuf,
    /// Instead of each report stage's `out`.
    report_out: PathBuf,
}

/// One study point, as `study.json` lists it.
#[derive(Debug, Serialize)]
struct StudyRow {
    job: String,
    groups: Vec<String>,
    model: String,
    width: f64,
    depth: f64,
    resolution: u64,
    parameters: u64,
    flops: u64,
    steps: u64,
    top1: Option<f64>,
    top1_ema: Option<f64>,
    wall_s: f64,
}

pub fn run(command: PipelineCommand) -> Result<()> {
    match command {
        PipelineCommand::Run(args) => run_pipeline(&args),
    }
}

fn run_pipeline(args: &RunArgs) -> Result<()> {
    let source = args.file.display().to_string();
    let text = std::fs::read_to_string(&args.file).map_err(|error| bad_input!("{source}: {error}"))?;
    let pipeline: PipelineFile = serde_saphyr::from_str(&text)
        .map_err(|error| bad_input!("{source}: {}", error.to_string().replace('\n', " ")))?;
    check(&pipeline, &source, args.quick)?;
    let quick = if args.quick { pipeline.quick.as_ref() } else { None };
    let work_dir = quick.map_or(&pipeline.work_dir, |q| &q.work_dir);
    let started = Instant::now();
    out!("pipeline {}{}", pipeline.name, if quick.is_some() { " (quick)" } else { "" });
    let mut trained: Vec<(String, Vec<(TrainJob, JobSpec)>)> = Vec::new();
    for stage in &pipeline.stages {
        if let Some(prepare) = &stage.prepare {
            run_prepare(&stage.name, prepare)?;
        } else if let Some(train) = &stage.train {
            let jobs = resolve_jobs(&pipeline.name, train, quick, work_dir)?;
            match &args.coordinator {
                Some(url) => submit_and_wait(&stage.name, &pipeline.name, &jobs, work_dir, url, &args.token)?,
                None => {
                    for (job, spec) in &jobs {
                        run_job(&stage.name, job, spec, work_dir)?;
                    }
                }
            }
            trained.push((stage.name.clone(), jobs));
        } else if let Some(report) = &stage.report {
            let jobs = &trained
                .iter()
                .find(|(name, _)| *name == report.jobs)
                .with_context(|| format!("stage {}: no train stage {} before it", stage.name, report.jobs))?
                .1;
            let out = quick.map_or(&report.out, |q| &q.report_out);
            run_report(&stage.name, &pipeline, jobs, out, &report.points)?;
        }
    }
    out!("pipeline {} done in {:.0} s", pipeline.name, started.elapsed().as_secs_f64());
    Ok(())
}

/// Everything a run could trip over later, said before anything runs.
fn check(pipeline: &PipelineFile, source: &str, quick: bool) -> Result<()> {
    let valid_name = |name: &str| {
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    if !valid_name(&pipeline.name) {
        return Err(bad_input!(
            "{source}: name: expected letters, digits, '.', '_' and '-', got {:?}",
            pipeline.name
        ));
    }
    let mut train_stages = Vec::new();
    for stage in &pipeline.stages {
        let kinds = [stage.prepare.is_some(), stage.train.is_some(), stage.report.is_some()];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(bad_input!(
                "{source}: stage {}: give exactly one of prepare, train, report",
                stage.name
            ));
        }
        if let Some(prepare) = &stage.prepare
            && !matches!(prepare.from.as_str(), "fashion-mnist" | "idx" | "image-folder")
        {
            return Err(bad_input!(
                "{source}: stage {}: prepare.from: expected fashion-mnist, idx or image-folder, got {:?}",
                stage.name,
                prepare.from
            ));
        }
        if let Some(train) = &stage.train {
            let mut names = std::collections::BTreeSet::new();
            for job in &train.jobs {
                if !valid_name(&job.name) || !names.insert(job.name.as_str()) {
                    return Err(bad_input!(
                        "{source}: stage {}: job name {:?} is invalid or repeated",
                        stage.name,
                        job.name
                    ));
                }
            }
            train_stages.push((stage.name.as_str(), names));
        }
        if let Some(report) = &stage.report
            && !train_stages.iter().any(|(name, _)| *name == report.jobs)
        {
            return Err(bad_input!(
                "{source}: stage {}: report.jobs: no train stage {:?} before it",
                stage.name,
                report.jobs
            ));
        }
    }
    if quick {
        let Some(quick) = &pipeline.quick else {
            return Err(bad_input!("{source}: --quick: the file defines no quick version"));
        };
        for job in &quick.jobs {
            if !train_stages.iter().any(|(_, names)| names.contains(job.as_str())) {
                return Err(bad_input!("{source}: quick.jobs: no job {job:?}"));
            }
        }
    }
    Ok(())
}

fn run_prepare(stage: &str, prepare: &PrepareStage) -> Result<()> {
    let base = prepare.out.trim_end_matches('/');
    let outputs: Vec<String> = if prepare.from == "fashion-mnist" {
        vec![format!("{base}/train/_manifest.json"), format!("{base}/test/_manifest.json")]
    } else {
        vec![format!("{base}/_manifest.json")]
    };
    if outputs.iter().all(|o| Path::new(o).exists()) {
        out!("stage {stage}: skipped ({} exists)", outputs.join(", "));
        return Ok(());
    }
    out!("stage {stage}: effnet prepare --from {} --out {}", prepare.from, prepare.out);
    let mut command = Command::new(std::env::current_exe().context("locating the effnet binary")?);
    command.args(["prepare", "--from", &prepare.from, "--out", &prepare.out]);
    if let Some(source) = &prepare.source {
        command.arg(source);
    }
    let status = command.status().context("running effnet prepare")?;
    if !status.success() {
        bail!("stage {stage}: effnet prepare failed ({status})");
    }
    Ok(())
}

/// Each job's spec: the stage's job file with the stage's, the job's and the quick overrides,
/// named after the pipeline and the job, in its own directory under `work_dir`.
fn resolve_jobs(
    pipeline: &str,
    train: &TrainStage,
    quick: Option<&Quick>,
    work_dir: &Path,
) -> Result<Vec<(TrainJob, JobSpec)>> {
    let mut out = Vec::new();
    for job in &train.jobs {
        if quick.is_some_and(|q| !q.jobs.is_empty() && !q.jobs.contains(&job.name)) {
            continue;
        }
        let mut settings: Vec<String> = train.set.clone();
        settings.extend(job.set.iter().cloned());
        if let Some(quick) = quick {
            settings.extend(quick.set.iter().cloned());
        }
        settings.push(format!("name={pipeline}-{}", job.name));
        settings.push(format!("job_dir={}", work_dir.join(&job.name).display()));
        let overrides = settings.iter().map(|s| Override::parse(s)).collect::<Result<Vec<_>, _>>()?;
        let spec = JobSpec::load_with_overrides(&train.job, &overrides)
            .map_err(|error| bad_input!("job {}: {error}", job.name))?;
        out.push((job.clone(), spec));
    }
    Ok(out)
}

/// `summary.json` of a job that reached its last step.
fn finished_summary(job_dir: &Path) -> Option<serde_json::Value> {
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(job_dir.join(effnet_jobdir::SUMMARY_FILE)).ok()?).ok()?;
    let total = summary["plan"]["total_steps"].as_u64()?;
    (summary["steps"].as_u64()? >= total).then_some(summary)
}

/// Whether the job directory last ran with other settings than `spec` (its `job.json`): the
/// job must start over, since its checkpoints and summary belong to the old settings.
fn settings_changed(job_dir: &Path, spec: &JobSpec) -> Result<bool> {
    let Ok(bytes) = std::fs::read(job_dir.join(effnet_jobdir::JOB_FILE)) else { return Ok(false) };
    let previous: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    // job.json holds the spec redacted (effnet_store::redact), so the comparison is too: a spec
    // with credentials in a URL is not "changed" on every run.
    Ok(previous["spec"] != effnet_store::redacted_json(spec)?)
}

/// The resolved spec as a job file (JSON is YAML), so the run is exactly what was resolved.
fn write_job_file(job: &TrainJob, spec: &JobSpec, work_dir: &Path) -> Result<PathBuf> {
    let jobs_dir = work_dir.join("jobs");
    std::fs::create_dir_all(&jobs_dir).with_context(|| format!("creating {}", jobs_dir.display()))?;
    let file = jobs_dir.join(format!("{}.yaml", job.name));
    // The resolved spec keeps the URLs' credentials (the run needs them): owner-only, as the
    // coordinator's database.
    let write = || -> std::io::Result<()> {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            options.mode(0o600);
            // A file an earlier version wrote keeps its mode through `open`: narrow it first.
            if file.exists() {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
            }
        }
        std::io::Write::write_all(&mut options.open(&file)?, serde_json::to_string_pretty(spec)?.as_bytes())
    };
    write().with_context(|| format!("writing {}", file.display()))?;
    Ok(file)
}

/// Every unfinished job submitted to the coordinator (with a key made of the pipeline, the job
/// and its resolved spec, so running the pipeline again finds the same coordinator jobs), then
/// polled until all are over.
fn submit_and_wait(
    stage: &str,
    pipeline: &str,
    jobs: &[(TrainJob, JobSpec)],
    work_dir: &Path,
    url: &str,
    token: &super::coordinator::TokenArgs,
) -> Result<()> {
    use effnet_coordinator::protocol::{JobStart, JobState};
    use sha2::Digest as _;
    let client = effnet_coordinator::Client::new(url, &token.token()?)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut waiting = Vec::new();
    for (job, spec) in jobs {
        // Paths as this machine sees them: the coordinator and the workers run elsewhere.
        let spec = absolute_paths(spec)?;
        let changed = settings_changed(&spec.job_dir(), &spec)?;
        if !changed && finished_summary(&spec.job_dir()).is_some() {
            out!("stage {stage}: job {} skipped (finished in {})", job.name, spec.job_dir().display());
            continue;
        }
        let file = write_job_file(job, &spec, work_dir)?;
        let yaml = std::fs::read_to_string(&file)?;
        let digest: String =
            sha2::Sha256::digest(yaml.as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect();
        let key = format!("pipeline/{pipeline}/{}/{digest}", job.name);
        let start = if changed { JobStart::Fresh } else { JobStart::Latest };
        let submitted =
            runtime.block_on(client.submit_keyed(&yaml, &file.display().to_string(), &start, Some(&key)))?;
        out!("stage {stage}: job {} submitted to {url} as {} ({})", job.name, submitted.id, submitted.state);
        waiting.push((job.name.clone(), submitted.id, submitted.state));
    }
    let started = Instant::now();
    while !waiting.is_empty() {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let mut still = Vec::new();
        for (name, id, last) in waiting {
            let state = runtime.block_on(client.job(&id))?.summary;
            match state.state {
                JobState::Succeeded => out!("stage {stage}: job {name} ({id}) succeeded"),
                JobState::Failed | JobState::Cancelled => bail!(
                    "stage {stage}: job {name} ({id}) {}: {}",
                    state.state,
                    state.reason.unwrap_or_else(|| "no reason given".into())
                ),
                now => {
                    if now != last {
                        out!("stage {stage}: job {name} ({id}) {now}");
                    }
                    still.push((name, id, now));
                }
            }
        }
        waiting = still;
        if !waiting.is_empty() && started.elapsed().as_secs().is_multiple_of(60) {
            out!("stage {stage}: waiting for {} jobs at {url}", waiting.len());
        }
    }
    Ok(())
}

/// The spec with its relative local paths (data, job directory, checkpoints, report) made
/// absolute against this directory; URLs and absolute paths are left as they are.
fn absolute_paths(spec: &JobSpec) -> Result<JobSpec> {
    let here = std::env::current_dir().context("the working directory")?;
    let absolute = |path: &str| -> Result<String> {
        let relative = effnet_store::Scheme::of(path)? == effnet_store::Scheme::File
            && !path.starts_with("file:")
            && Path::new(path).is_relative();
        Ok(if relative { here.join(path).display().to_string() } else { path.to_string() })
    };
    let mut spec = spec.clone();
    spec.data.train = absolute(&spec.data.train)?;
    spec.data.val = spec.data.val.as_deref().map(absolute).transpose()?;
    spec.job_dir = Some(absolute(&spec.job_dir().display().to_string())?);
    spec.checkpoint.url = spec.checkpoint.url.as_deref().map(absolute).transpose()?;
    spec.report.out = spec.report.out.as_deref().map(absolute).transpose()?;
    Ok(spec)
}

fn run_job(stage: &str, job: &TrainJob, spec: &JobSpec, work_dir: &Path) -> Result<()> {
    let job_dir = spec.job_dir();
    let changed = settings_changed(&job_dir, spec)?;
    if !changed && finished_summary(&job_dir).is_some() {
        out!("stage {stage}: job {} skipped (finished in {})", job.name, job_dir.display());
        return Ok(());
    }
    let file = write_job_file(job, spec, work_dir)?;
    let fresh = if changed { " --fresh: its settings changed" } else { "" };
    out!("stage {stage}: job {} (effnet run {}{fresh})", job.name, file.display());
    let started = Instant::now();
    let mut arguments =
        vec!["run".to_string(), file.display().to_string(), "--progress".into(), "never".into()];
    if changed {
        arguments.push("--fresh".into());
    }
    let status = Command::new(std::env::current_exe().context("locating the effnet binary")?)
        .args(&arguments)
        .stdout(std::process::Stdio::null())
        .status()
        .context("running effnet run")?;
    if !status.success() {
        bail!("stage {stage}: job {} failed ({status}); its logs are in {}", job.name, job_dir.display());
    }
    out!("stage {stage}: job {} finished in {:.0} s", job.name, started.elapsed().as_secs_f64());
    Ok(())
}

/// `points`: the groups drawn unconnected (the stage's `report.points`).
fn run_report(
    stage: &str,
    pipeline: &PipelineFile,
    jobs: &[(TrainJob, JobSpec)],
    out: &Path,
    points: &[String],
) -> Result<()> {
    let study_file = out.join("study.json");
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let newest_job =
        jobs.iter().filter_map(|(_, spec)| modified(&spec.job_dir().join(effnet_jobdir::SUMMARY_FILE))).max();
    if let (Some(study), Some(newest)) = (modified(&study_file), newest_job)
        && study >= newest
    {
        out!("stage {stage}: skipped ({} is newer than every job)", study_file.display());
        return Ok(());
    }
    let dirs: Vec<PathBuf> = jobs.iter().map(|(_, spec)| spec.job_dir()).collect();
    let report = super::report::build(&dirs)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    super::report::write(&report, &out.display().to_string())?;
    let rows = study_rows(jobs)?;
    let chart = study_chart(&rows, points);
    std::fs::write(out.join("study.svg"), chart.to_svg())?;
    std::fs::write(&study_file, serde_json::to_string_pretty(&rows)?)?;
    std::fs::write(out.join("study.md"), study_markdown(pipeline, &rows))?;
    out!("stage {stage}: {} (and report.html beside it)", out.join("study.md").display());
    Ok(())
}

fn study_rows(jobs: &[(TrainJob, JobSpec)]) -> Result<Vec<StudyRow>> {
    let mut rows = Vec::new();
    for (job, spec) in jobs {
        let summary = finished_summary(&spec.job_dir())
            .with_context(|| format!("job {} has not finished (no complete summary.json)", job.name))?;
        let plan = &summary["plan"];
        let scaling = spec.model.scaling()?;
        rows.push(StudyRow {
            job: job.name.clone(),
            groups: if job.groups.is_empty() { vec![job.name.clone()] } else { job.groups.clone() },
            model: plan["model"]["architecture"].as_str().unwrap_or_default().to_string(),
            width: scaling.width,
            depth: scaling.depth,
            resolution: plan["resolution"].as_u64().unwrap_or_default(),
            parameters: plan["model"]["parameters"].as_u64().unwrap_or_default(),
            flops: plan["multiply_adds"].as_u64().unwrap_or_default(),
            steps: summary["steps"].as_u64().unwrap_or_default(),
            top1: summary["val"]["top1"].as_f64(),
            top1_ema: summary["val_ema"]["top1"].as_f64(),
            wall_s: summary["wall_s"].as_f64().unwrap_or_default(),
        });
    }
    Ok(rows)
}

/// Top-1 (raw weights) against FLOPs, one line per group, in the order the groups first appear;
/// the `points` groups unconnected.
fn study_chart(rows: &[StudyRow], points_only: &[String]) -> Chart {
    let mut chart = Chart::new(
        "study",
        "Top-1 against FLOPs, one line per way of scaling",
        Axis::log("FLOPs (multiply-adds)"),
        Axis::linear("top-1 accuracy").percent(),
    );
    let mut groups: Vec<&str> = Vec::new();
    for group in rows.iter().flat_map(|r| &r.groups) {
        if !groups.contains(&group.as_str()) {
            groups.push(group);
        }
    }
    for (i, group) in groups.iter().enumerate() {
        let mut points: Vec<(f64, f64, String)> = rows
            .iter()
            .filter(|r| r.groups.iter().any(|g| g == group))
            .filter_map(|r| Some((r.flops as f64, r.top1?, r.job.clone())))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let labels = points.iter().map(|p| Some(p.2.clone())).collect();
        let line = points.len() > 1 && !points_only.iter().any(|g| g == group);
        let mark = if line { Mark::LinePoints(Shape::Circle) } else { Mark::Points(Shape::Diamond) };
        chart.push(
            Series::new(group, PALETTE[i % PALETTE.len()], mark, points.iter().map(|p| (p.0, p.1)).collect())
                .with_labels(labels),
        );
    }
    chart
}

fn study_markdown(pipeline: &PipelineFile, rows: &[StudyRow]) -> String {
    use std::fmt::Write as _;
    let percent = |v: Option<f64>| v.map_or("–".to_string(), effnet_report::format::percent);
    let mut out = format!("# {}\n\n", pipeline.name);
    if let Some(description) = &pipeline.description {
        let _ = writeln!(out, "{}\n", description.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    let _ = writeln!(out, "![top-1 against FLOPs](study.svg)\n");
    let _ = writeln!(
        out,
        "| groups | job | model | width | depth | resolution | parameters | FLOPs | steps | top-1 | top-1 (EMA) | wall |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.3} | {:.3} | {} | {} | {} | {} | {} | {} | {:.0} s |",
            r.groups.join(", "),
            r.job,
            r.model,
            r.width,
            r.depth,
            r.resolution,
            effnet_report::format::count(r.parameters as f64),
            effnet_report::format::count(r.flops as f64),
            r.steps,
            percent(r.top1),
            percent(r.top1_ema),
            r.wall_s
        );
    }
    let total: f64 = rows.iter().map(|r| r.wall_s).sum();
    let _ = writeln!(
        out,
        "\n{} jobs, {:.1} minutes of training in all. The full report of every job: report.html.",
        rows.len(),
        total / 60.0
    );
    out
}
