//! The coordinator and its clients:
//! - `effnet coordinator --listen ADDR --state-dir DIR --token-file F`: serve the API
//!   (effnet-coordinator) until ctrl-c or SIGTERM; prints `coordinator listening on http://ADDR`,
//!   then `status page http://ADDR/view/KEY/` (the page for browsers, by a key derived from the
//!   token).
//! - `effnet submit JOB.yaml --coordinator URL`: validate the spec here with the messages of
//!   `effnet run --check`, then submit it; prints the job id.
//! - `effnet status [JOB] [--json]`, `effnet cancel JOB`, `effnet logs JOB`.
//!
//! The token comes from `--token-file` or `EFFNET_TOKEN`, the URL from `--coordinator` or
//! `EFFNET_COORDINATOR`. A request the coordinator refuses (4xx) exits 2 with its reason.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use effnet_config::JobSpec;
use effnet_coordinator::protocol::{JobDetail, JobStart, JobSummary, StartPoint, Submitted};
use effnet_coordinator::{Client, Settings, State};

use crate::failure::bad_input;

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// A file holding the shared bearer token (surrounding whitespace ignored); default: the
    /// EFFNET_TOKEN environment variable.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

impl TokenArgs {
    pub(crate) fn token(&self) -> Result<String> {
        let (token, origin) = match &self.token_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|error| bad_input!("--token-file {}: {error}", path.display()))?;
                (text, format!("--token-file {}", path.display()))
            }
            None => match std::env::var("EFFNET_TOKEN") {
                Ok(token) => (token, "EFFNET_TOKEN".to_string()),
                Err(_) => return Err(bad_input!("no token: pass --token-file FILE or set EFFNET_TOKEN")),
            },
        };
        let token = token.trim().to_string();
        if token.is_empty() {
            return Err(bad_input!("{origin}: the token is empty"));
        }
        Ok(token)
    }
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The coordinator's URL, e.g. http://127.0.0.1:7700.
    #[arg(long, value_name = "URL", env = "EFFNET_COORDINATOR")]
    coordinator: String,
    #[command(flatten)]
    token: TokenArgs,
}

impl ClientArgs {
    fn client(&self) -> Result<Client> {
        Ok(Client::new(&self.coordinator, &self.token.token()?)?)
    }
}

#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// Address to listen on (port 0 picks a free one; the line on stdout names it).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7700")]
    listen: String,
    /// Where the state database lives (created if missing); a restart on it carries on.
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    #[command(flatten)]
    token: TokenArgs,
    /// Seconds without a heartbeat after which a worker expires and its generation ends.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    heartbeat_timeout_s: f64,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The job file (YAML), checked here first like `effnet run --check` checks the spec.
    job: PathBuf,
    #[command(flatten)]
    client: ClientArgs,
    /// The first generation resumes from this checkpoint directory (a `step-NNNNNNNN` URL)
    /// instead of the job's newest.
    #[arg(long, value_name = "URL", conflicts_with = "fresh")]
    resume: Option<String>,
    /// The first generation starts from step 0 and deletes the job's existing checkpoints.
    #[arg(long)]
    fresh: bool,
    /// Idempotency key: submitting the same file with the same key again prints the first
    /// submission's job id instead of adding a job.
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
    /// Print the coordinator's answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One job's id; all jobs when left out.
    job: Option<String>,
    #[command(flatten)]
    client: ClientArgs,
    #[arg(long)]
    json: bool,
    /// Print only the job's state (`queued`, `running`, `succeeded`, `failed`, `cancelled`),
    /// for scripts such as an engine's relaunch loop.
    #[arg(long, requires = "job", conflicts_with = "json")]
    state: bool,
}

#[derive(Debug, Args)]
pub struct RestartArgs {
    job: String,
    #[command(flatten)]
    client: ClientArgs,
    /// Why, recorded as the generation's end reason.
    #[arg(long, default_value = "its workers failed")]
    reason: String,
    /// The workers failed on bad input and will not be relaunched: fail the job instead.
    #[arg(long)]
    give_up: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    job: String,
    #[command(flatten)]
    client: ClientArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    job: String,
    #[command(flatten)]
    client: ClientArgs,
    /// How many of the newest progress records to print.
    #[arg(long, default_value_t = 50)]
    limit: u32,
    #[arg(long)]
    json: bool,
}

/// One thread: the clients make one request each, and the coordinator's requests are short
/// (a SQLite transaction of tens of microseconds), so a second worker thread would only cost
/// wake-ups (docs/benchmarks.md: 1,000 workers heartbeating take a tenth of one core).
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")
}

pub fn serve(args: CoordinatorArgs) -> Result<()> {
    let token = args.token.token()?;
    if !(args.heartbeat_timeout_s.is_finite() && args.heartbeat_timeout_s > 0.0) {
        return Err(bad_input!(
            "--heartbeat-timeout-s must be a positive number of seconds, got {}",
            args.heartbeat_timeout_s
        ));
    }
    let heartbeat_timeout = Duration::from_secs_f64(args.heartbeat_timeout_s);
    let settings = Settings {
        heartbeat_timeout,
        // Often enough that a worker expires within a few percent of the timeout.
        sweep_every: (heartbeat_timeout / 10).clamp(Duration::from_millis(100), Duration::from_secs(5)),
        ..Settings::default()
    };
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .map_err(|error| bad_input!("--listen {}: {error}", args.listen))?;
        let address = listener.local_addr().context("reading the listening address")?;
        let state = Arc::new(State::open(&args.state_dir, &token, settings).await?);
        out!("coordinator listening on http://{address} (state in {})", args.state_dir.display());
        // For browsers, which cannot send the bearer token: a read-only capability URL.
        out!("status page http://{address}/view/{}/", state.view_key());
        tracing::info!(%address, state_dir = %args.state_dir.display(), "coordinator started");
        effnet_coordinator::run(listener, state, shutdown_signal()).await?;
        Ok(())
    })
}

/// Ctrl-c or SIGTERM (what Kubernetes and Slurm send).
async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match terminate.as_mut() {
                Some(signal) => { signal.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}

/// A job file checked exactly as `effnet run --check` checks its spec (the datasets are read by
/// the coordinator and the workers, which may see them where this machine does not), so the
/// messages are the same, then submitted.
fn submit_file(client: &Client, job: &Path, start: &JobStart, key: Option<&str>) -> Result<Submitted> {
    JobSpec::load(job)?;
    let yaml = std::fs::read_to_string(job).map_err(|error| bad_input!("{}: {error}", job.display()))?;
    Ok(runtime()?.block_on(client.submit_keyed(&yaml, &source_name(job), start, key))?)
}

pub fn submit(args: SubmitArgs) -> Result<()> {
    let client = args.client.client()?;
    let start = JobStart::from_flags(args.resume, args.fresh);
    let submitted = submit_file(&client, &args.job, &start, args.key.as_deref())?;
    if args.json {
        out!("{}", serde_json::to_string_pretty(&submitted)?);
    } else {
        out!("{}", submitted.id);
    }
    Ok(())
}

fn source_name(path: &Path) -> String {
    path.display().to_string()
}

pub fn status(args: StatusArgs) -> Result<()> {
    let client = args.client.client()?;
    let runtime = runtime()?;
    match &args.job {
        None => {
            let jobs = runtime.block_on(client.jobs())?;
            if args.json {
                out!("{}", serde_json::to_string_pretty(&jobs)?);
            } else {
                print_jobs(&jobs);
            }
        }
        Some(id) => {
            let detail = runtime.block_on(client.job(id))?;
            if args.state {
                out!("{}", detail.summary.state);
            } else if args.json {
                out!("{}", serde_json::to_string_pretty(&detail)?);
            } else {
                print_job(&detail);
            }
        }
    }
    Ok(())
}

pub fn cancel(args: CancelArgs) -> Result<()> {
    let client = args.client.client()?;
    let summary = runtime()?.block_on(client.cancel(&args.job))?;
    if args.json {
        out!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        out!("{} {}", summary.id, summary.state);
    }
    Ok(())
}

/// `effnet worker --job-file F --key K`: the job file checked like `effnet submit` checks it and
/// submitted with the key (idempotent); the job's id.
pub(crate) fn submit_keyed(url: &str, token: &TokenArgs, job: &Path, key: &str) -> Result<String> {
    let client = Client::new(url, &token.token()?)?;
    let submitted = submit_file(&client, job, &JobStart::Latest, Some(key))?;
    tracing::info!(job = %submitted.id, key, "job file submitted (or found by its key)");
    Ok(submitted.id)
}

/// An engine saw the job's workers fail: end its generation now (the next launch forms the next
/// one, a restart), or with `--give-up` fail the job.
pub fn restart(args: RestartArgs) -> Result<()> {
    let client = args.client.client()?;
    let summary = runtime()?.block_on(client.restart(&args.job, &args.reason, args.give_up))?;
    if args.json {
        out!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        out!(
            "{} {} (restarts {} of at most {})",
            summary.id,
            summary.state,
            summary.restarts,
            summary.max_restarts
        );
    }
    Ok(())
}

pub fn logs(args: LogsArgs) -> Result<()> {
    let client = args.client.client()?;
    let records = runtime()?.block_on(client.progress(&args.job, args.limit))?;
    if args.json {
        for record in &records {
            out!("{}", serde_json::to_string(record)?);
        }
        return Ok(());
    }
    if records.is_empty() {
        out!("{}: no progress reported yet", args.job);
    }
    for record in &records {
        out!(
            "{:.3}  gen {} rank {} ({})  step {}  epoch {}  {}  loss {}",
            record.at,
            record.generation,
            record.rank,
            record.worker_id,
            record.step,
            dash(record.epoch, |e| format!("{e:.3}")),
            dash(record.images_per_s, |r| format!("{r:.1} img/s")),
            dash(record.loss, |l| format!("{l:.4}")),
        );
    }
    Ok(())
}

fn dash<T>(value: Option<T>, format: impl Fn(T) -> String) -> String {
    value.map_or_else(|| "-".to_string(), format)
}

fn print_jobs(jobs: &[JobSummary]) {
    out!(
        "{:<24} {:<10} {:>4} {:>8} {:>8} {:>11} {:>8} {:>8}",
        "JOB",
        "STATE",
        "GEN",
        "WORKERS",
        "STEP",
        "IMAGES/S",
        "LOSS",
        "RESTARTS"
    );
    for job in jobs {
        out!(
            "{:<24} {:<10} {:>4} {:>8} {:>8} {:>11} {:>8} {:>8}",
            job.id,
            job.state.as_str(),
            job.generation,
            format!("{}/{}", job.workers, job.world_size),
            dash(job.step, |s| s.to_string()),
            dash(job.images_per_s, |r| format!("{r:.1}")),
            dash(job.loss, |l| format!("{l:.4}")),
            job.restarts
        );
    }
}

fn print_job(detail: &JobDetail) {
    let job = &detail.summary;
    out!("job              {} ({})", job.id, job.name);
    out!("state            {}", job.state);
    out!("workers          {} of {} active", job.workers, job.world_size);
    out!("restarts         {}", job.restarts);
    out!(
        "progress         step {}, epoch {}, {}, loss {}",
        dash(job.step, |s| s.to_string()),
        dash(job.epoch, |e| format!("{e:.3}")),
        dash(job.images_per_s, |r| format!("{r:.1} images/s")),
        dash(job.loss, |l| format!("{l:.4}"))
    );
    if let Some(checkpoint) = &job.last_checkpoint {
        out!("last checkpoint  step {} at {}", checkpoint.step, checkpoint.url);
    }
    for generation in &detail.generations {
        let start = match &generation.start {
            None => String::new(),
            Some(StartPoint::Scratch) => ", from step 0".to_string(),
            Some(StartPoint::Fresh) => ", fresh from step 0".to_string(),
            Some(StartPoint::Checkpoint { step, .. }) => format!(", from step {step}"),
        };
        out!(
            "generation {:<5} {} ({} ranks{start}){}",
            generation.number,
            generation.state.as_str(),
            generation.world_size,
            generation.end_reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
        );
        for member in detail.members.iter().filter(|m| m.generation == generation.number) {
            out!(
                "  rank {:<4} {:<8} {:<8} host {}  step {}{}",
                member.rank,
                member.id,
                member.state.as_str(),
                member.host.as_deref().unwrap_or("-"),
                dash(member.step, |s| s.to_string()),
                member.end_reason.as_ref().map(|r| format!("  ({r})")).unwrap_or_default()
            );
        }
    }
}
