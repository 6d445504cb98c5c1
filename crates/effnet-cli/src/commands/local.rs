//! The local engine behind `effnet run JOB.yaml` when the job has several workers: a coordinator
//! in this process on loopback, its state under `<job_dir>/coordinator/` (token file beside the
//! database, mode 0600), the job submitted to it, and for each generation the workers as
//! processes of this machine that join it (`effnet worker --coordinator URL --job ID`):
//! `mpirun -n W` for MPI, or W processes with `RANK`/`WORLD_SIZE`/`LOCAL_RANK` for NCCL (the
//! first to fail ends the others; NCCL's unique id goes through the coordinator's rendezvous).
//!
//! When a generation's workers fail, the launcher ends the generation at the coordinator (no
//! waiting for the heartbeat timeout) and starts the next one, which resumes from the checkpoint
//! the coordinator chose, until the job succeeds or has used `distributed.max_restarts`. Workers
//! that exit 2 (bad input) are not relaunched. Started again on the same job directory (after a
//! crash of the whole group, or ctrl-c), `effnet run` submits a new coordinator job with a fresh
//! restart budget (the previous one, still marked running, is cancelled) and training resumes
//! from the job's newest committed checkpoint: a user's re-run is not one of the job's restarts.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use effnet_config::{Backend, JobSpec};
use effnet_coordinator::protocol::{JobStart, JobState, JobSummary, RestartRequest};
use effnet_coordinator::{Settings, State};

use super::run::{Progress, TrainArgs};
use crate::failure::{WorkersFailed, bad_input};

/// The file, in the coordinator's state directory, naming the job `effnet run` submitted.
const JOB_ID_FILE: &str = "job-id";
const TOKEN_FILE: &str = "token";

/// Train a job of several workers on this machine, through an in-process coordinator.
pub fn launch(job_file: &Path, args: &TrainArgs, spec: &JobSpec) -> Result<()> {
    let backend = backend(spec);
    if backend == Backend::Local {
        return Err(bad_input!(
            "distributed.backend: local trains in one process, but distributed.workers is {}",
            spec.distributed.workers
        ));
    }
    let state_dir = spec.job_dir().join("coordinator");
    std::fs::create_dir_all(&state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
    let token_file = state_dir.join(TOKEN_FILE);
    let token = token(&token_file)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let settings = Settings {
        // Workers heartbeat every 6 s; a silent one ends its generation after 30 s.
        heartbeat_timeout: Duration::from_secs(30),
        ..Settings::default()
    };
    let state = Arc::new(runtime.block_on(State::open(&state_dir, &token, settings))?);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .context("listening on loopback for the coordinator")?;
    let url = format!("http://{}", listener.local_addr().context("the coordinator's address")?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(effnet_coordinator::run(listener, state.clone(), async {
        let _ = stopped.await;
    }));
    let outcome = (|| {
        let start = JobStart::from_flags(args.resume.clone(), args.fresh);
        let id = job_id(&runtime, &state, &state_dir, job_file, spec, start)?;
        let launcher = Launcher { url, id, token_file, backend, workers: spec.distributed.workers as usize };
        launcher.generations(&runtime, &state, args)
    })();
    let _ = stop.send(());
    let _ = runtime.block_on(server);
    outcome
}

/// A new coordinator job for this run; the one this job directory's previous `effnet run`
/// submitted is cancelled if it is still marked running (its launcher died with it).
fn job_id(
    runtime: &tokio::runtime::Runtime,
    state: &State,
    state_dir: &Path,
    job_file: &Path,
    spec: &JobSpec,
    start: JobStart,
) -> Result<String> {
    let id_file = state_dir.join(JOB_ID_FILE);
    if let Ok(previous) = std::fs::read_to_string(&id_file)
        && let Ok(summary) = runtime.block_on(state.job(previous.trim())).map(|d| d.summary)
        && !summary.state.is_terminal()
    {
        runtime.block_on(state.cancel(&summary.id))?;
        tracing::info!(job = %summary.id, "cancelled the previous run's coordinator job");
    }
    // The spec as JSON (which is YAML), overrides applied: every worker trains exactly this.
    let yaml = serde_json::to_string_pretty(spec).context("the job spec as JSON")?;
    let submitted = runtime.block_on(state.submit(yaml, &job_file.display().to_string(), start, None))?;
    std::fs::write(&id_file, &submitted.id).with_context(|| format!("writing {}", id_file.display()))?;
    Ok(submitted.id)
}

struct Launcher {
    url: String,
    id: String,
    token_file: PathBuf,
    backend: Backend,
    workers: usize,
}

impl Launcher {
    /// Launch generations until the job is over.
    fn generations(&self, runtime: &tokio::runtime::Runtime, state: &State, args: &TrainArgs) -> Result<()> {
        loop {
            let status = self.generation(args)?;
            let summary = runtime.block_on(state.job(&self.id))?.summary;
            match summary.state {
                JobState::Succeeded => return Ok(()),
                JobState::Failed | JobState::Cancelled => return Err(failed(&summary, Some(status))),
                JobState::Queued | JobState::Running => {}
            }
            let reason =
                format!("the workers of generation {} exited ({})", summary.generation, describe(status));
            // Bad input (exit 2) is not cured by a restart.
            let give_up = status.code() == Some(2);
            let summary = runtime.block_on(
                state.restart(&self.id, RestartRequest { reason: Some(reason.clone()), give_up }),
            )?;
            if summary.state.is_terminal() {
                return Err(failed(&summary, Some(status)));
            }
            let _ = writeln!(
                std::io::stderr(),
                "effnet: {reason}; restarting job {} from its last checkpoint (restart {} of at most {})",
                self.id,
                summary.restarts + 1,
                summary.max_restarts
            );
        }
    }

    /// One generation's workers, until they have all exited.
    fn generation(&self, args: &TrainArgs) -> Result<ExitStatus> {
        let exe = std::env::current_exe().context("locating the effnet binary")?;
        let worker_args = self.worker_args(args);
        match self.backend {
            Backend::Mpi => {
                let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
                let mut command = Command::new("mpirun");
                command.arg("-n").arg(self.workers.to_string());
                // One core per rank when there are enough; otherwise let them share.
                if cores >= self.workers {
                    command.args(["--bind-to", "core"]);
                } else {
                    command.args(["--bind-to", "none", "--oversubscribe"]);
                }
                if is_root() {
                    command.arg("--allow-run-as-root");
                }
                command.arg(&exe).args(&worker_args);
                command.status().map_err(|e| {
                    bad_input!(
                        "distributed.backend: mpi needs Open MPI's mpirun on PATH (Debian: apt install openmpi-bin): {e}"
                    )
                })
            }
            Backend::Nccl | Backend::Local => {
                let mut running = Vec::with_capacity(self.workers);
                for rank in 0..self.workers {
                    let child = Command::new(&exe)
                        .args(&worker_args)
                        .env("RANK", rank.to_string())
                        .env("WORLD_SIZE", self.workers.to_string())
                        .env("LOCAL_RANK", rank.to_string())
                        .env("LOCAL_WORLD_SIZE", self.workers.to_string())
                        .spawn()
                        .context("starting a worker")?;
                    running.push(child);
                }
                // The first failure ends the others (they would wait for it in a collective).
                let mut first_failure = None;
                let mut last = None;
                while !running.is_empty() {
                    let mut still = Vec::new();
                    for mut child in running {
                        match child.try_wait()? {
                            Some(status) if !status.success() && first_failure.is_none() => {
                                first_failure = Some(status)
                            }
                            Some(status) => last = Some(status),
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
                    std::thread::sleep(Duration::from_millis(100));
                }
                first_failure.or(last).context("no worker ran")
            }
        }
    }

    /// A worker's arguments: the coordinator's job (which says where each generation starts).
    fn worker_args(&self, args: &TrainArgs) -> Vec<String> {
        let mut out = vec![
            "worker".to_string(),
            "--coordinator".into(),
            self.url.clone(),
            "--job".into(),
            self.id.clone(),
            "--token-file".into(),
            self.token_file.display().to_string(),
        ];
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
}

/// The job ended without success: its reason, and the workers' exit status (2 stays 2).
fn failed(summary: &JobSummary, status: Option<ExitStatus>) -> anyhow::Error {
    let reason = summary.reason.clone().unwrap_or_else(|| summary.state.to_string());
    let _ = writeln!(std::io::stderr(), "effnet: job {} {}: {reason}", summary.id, summary.state);
    let code = match status.and_then(|s| s.code()) {
        Some(2) => 2,
        _ => 1,
    };
    anyhow::Error::new(WorkersFailed { code })
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "unknown status".into(),
    }
}

/// The collective backend of a job: as set, else NCCL on CUDA and MPI on the CPU.
pub(crate) fn backend(spec: &JobSpec) -> Backend {
    let cuda = spec.distributed.device == effnet_config::Device::Cuda;
    spec.distributed.backend.unwrap_or(if cuda { Backend::Nccl } else { Backend::Mpi })
}

/// The launcher's token, created once (random, mode 0600) and reused by later runs.
fn token(path: &Path) -> Result<String> {
    if let Ok(text) = std::fs::read_to_string(path)
        && !text.trim().is_empty()
    {
        return Ok(text.trim().to_string());
    }
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?,
        &mut bytes,
    )
    .context("reading /dev/urandom")?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(token.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(token)
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}
