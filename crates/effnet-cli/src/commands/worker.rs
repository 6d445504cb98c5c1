//! `effnet worker --coordinator URL --job ID`: one worker of a coordinator's job.
//!
//! 1. Read the job's spec from the coordinator (the YAML as submitted, validated here again).
//! 2. Join its forming generation, with the rank and world size the engine gave this process
//!    (`RANK`/`WORLD_SIZE`, Slurm's `SLURM_PROCID`/`SLURM_NTASKS`, mpirun's `OMPI_COMM_WORLD_*`);
//!    the coordinator refuses a rank that is taken or a world that is not the job's.
//! 3. Heartbeat until the generation is complete (`train`), then train from the checkpoint the
//!    coordinator chose for the generation, heartbeating from a thread with the step, loss,
//!    throughput and every committed checkpoint (sent as soon as it is committed, so the
//!    coordinator's resume point is current).
//! 4. Leave: `finished`; `failed` on bad input (a restart would not cure it, exit 2); `restart`
//!    on any other error (exit [`RESTART_EXIT`]).
//!
//! When a heartbeat answers `restart` (a peer died or went silent, the engine ended the
//! generation) the worker exits at once with [`RESTART_EXIT`], from the heartbeat thread: the
//! training thread may be blocked in a collective with the dead peer. `stop` (the job was
//! cancelled or failed elsewhere) exits 1.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use effnet_config::JobSpec;
use effnet_coordinator::Client;
use effnet_coordinator::protocol::{
    Action, CheckpointReport, HeartbeatAnswer, JoinRequest, LeaveOutcome, LeaveRequest, Progress,
};
use effnet_train::progress::{Live, LiveProgress};
use effnet_train::{Launch, ResumeFrom, RunOptions};

use super::coordinator::TokenArgs;
use super::run::TrainArgs;
use crate::failure::{RESTART_EXIT, Restart, bad_input};

/// How often the heartbeat thread looks for a newly committed checkpoint.
const CHECKPOINT_POLL: Duration = Duration::from_millis(100);

pub fn coordinated(url: &str, job_id: &str, token: &TokenArgs, args: &TrainArgs) -> Result<()> {
    let client = Client::new(url, &token.token()?)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let detail = runtime.block_on(client.job(job_id))?;
    let mut spec = JobSpec::from_yaml_str(&detail.yaml, &format!("job {job_id}"))?;
    let world = effnet_collective::WorldInfo::from_env().map_err(|e| bad_input!("{e}"))?;
    let engine_given = world.source != "single";
    let request = JoinRequest {
        host: hostname(),
        rank: engine_given.then_some(world.rank as u32),
        world_size: engine_given.then_some(world.world_size as u32),
    };
    let joined = join(&runtime, &client, job_id, &request)?;
    let worker = joined.worker_id.clone();
    if joined.world_size != spec.distributed.workers {
        // An elastic job's generation runs with the world its engine launched.
        tracing::warn!(
            job = job_id,
            workers = joined.world_size,
            of = spec.distributed.workers,
            "elastic: this generation trains with fewer workers; the rest of the epoch is re-dealt"
        );
        spec.distributed.workers = joined.world_size;
    }
    tracing::info!(job = job_id, worker = %worker, rank = joined.rank, generation = joined.generation, "joined");
    if !engine_given && joined.world_size > 1 {
        // The collective needs the engine's world (mpirun, srun, RANK/WORLD_SIZE).
        let reason = "no launcher variables (RANK/WORLD_SIZE, SLURM_PROCID/SLURM_NTASKS, OMPI_COMM_WORLD_RANK/SIZE) for a job of several workers";
        leave(&runtime, &client, job_id, &worker, LeaveOutcome::Failed, reason);
        return Err(bad_input!("effnet worker: {reason}"));
    }
    let interval = Duration::from_secs_f64(joined.heartbeat_interval_s.clamp(0.05, 30.0));

    // Wait for the generation to be complete.
    let answer = loop {
        let answer = runtime.block_on(client.heartbeat(job_id, &worker, &Progress::default()))?;
        match answer.action {
            Action::Wait => std::thread::sleep(interval.min(Duration::from_millis(200))),
            Action::Train => break answer,
            Action::Restart => return Err(restart(&answer)),
            Action::Stop => return Err(stopped(job_id, &answer)),
        }
    };
    // The coordinator's checkpoint for the generation, or a newer one committed before its
    // report arrived (rank 0 chooses, every rank loads its choice); without one (no checkpoint
    // reported yet), what the engine asked for, else the job's newest committed checkpoint.
    let resume = match (&answer.resume, &args.resume, args.fresh) {
        (Some(checkpoint), _, _) => {
            ResumeFrom::NewestSince { step: checkpoint.step, url: checkpoint.url.clone() }
        }
        (None, Some(url), _) => ResumeFrom::Url(url.clone()),
        (None, None, true) => ResumeFrom::Fresh,
        (None, None, false) => ResumeFrom::Latest,
    };
    let live: LiveProgress = Arc::new(Mutex::new(Live::default()));
    let done = Arc::new(AtomicBool::new(false));
    let beating = std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn({
            // Its own client: pooled connections belong to the runtime that opened them.
            let client = Client::new(url, &token.token()?)?;
            let (job_id, worker, live, done) =
                (job_id.to_string(), worker.clone(), live.clone(), done.clone());
            move || heartbeats(client, &job_id, &worker, &live, &done, interval)
        })
        .context("starting the heartbeat thread")?;
    let launch = if joined.world_size > 1 { Launch::Worker } else { Launch::Single };
    let outcome = effnet_train::run(
        &spec,
        RunOptions { resume, progress: args.progress(), launch, live: Some(live.clone()) },
    );
    done.store(true, Ordering::SeqCst);
    let _ = beating.join();
    match outcome {
        Ok(summary) => {
            // The last checkpoint, so the coordinator's view ends where the job did.
            let _ = runtime.block_on(client.heartbeat(job_id, &worker, &progress(&live)));
            leave(&runtime, &client, job_id, &worker, LeaveOutcome::Finished, "");
            super::run::finish(&spec, &summary, args);
            Ok(())
        }
        Err(error) if error.is_bad_input() => {
            leave(&runtime, &client, job_id, &worker, LeaveOutcome::Failed, &error.to_string());
            Err(error.into())
        }
        Err(error) => {
            leave(&runtime, &client, job_id, &worker, LeaveOutcome::Restart, &error.to_string());
            Err(anyhow::Error::new(Restart(format!("{error}; the engine relaunches the job"))))
        }
    }
}

/// How long a relaunched worker keeps asking to join while the previous generation has not
/// ended yet (its dead members expire after the coordinator's heartbeat timeout).
const JOIN_PATIENCE: Duration = Duration::from_secs(180);

/// Join the job's forming generation. A 409 while the job goes on means the previous
/// generation is still running (an engine relaunched faster than the coordinator noticed the
/// failure): ask again every second until it ends.
fn join(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    job_id: &str,
    request: &JoinRequest,
) -> Result<effnet_coordinator::protocol::Joined> {
    let started = Instant::now();
    let mut said = false;
    loop {
        match runtime.block_on(client.join(job_id, request)) {
            Ok(joined) => return Ok(joined),
            Err(effnet_coordinator::ClientError::Rejected { status: 409, reason, .. })
                if started.elapsed() < JOIN_PATIENCE
                    && !runtime.block_on(client.job(job_id))?.summary.state.is_terminal() =>
            {
                if !said {
                    tracing::warn!(job = job_id, %reason, "waiting for the job's previous generation to end");
                    said = true;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// The heartbeat thread: every `interval`, and at once when a checkpoint was committed.
fn heartbeats(
    client: Client,
    job_id: &str,
    worker: &str,
    live: &LiveProgress,
    done: &AtomicBool,
    interval: Duration,
) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return;
    };
    let mut last_sent = Instant::now();
    let mut sent_checkpoint = None;
    let mut warned = false;
    while !done.load(Ordering::SeqCst) {
        std::thread::sleep(CHECKPOINT_POLL.min(interval));
        let report = progress(live);
        let new_checkpoint = report.checkpoint.as_ref().map(|c| c.step) != sent_checkpoint;
        if last_sent.elapsed() < interval && !new_checkpoint {
            continue;
        }
        last_sent = Instant::now();
        match runtime.block_on(client.heartbeat(job_id, worker, &report)) {
            Ok(answer) => {
                sent_checkpoint = report.checkpoint.as_ref().map(|c| c.step);
                warned = false;
                match answer.action {
                    Action::Train | Action::Wait => {}
                    Action::Restart | Action::Stop if done.load(Ordering::SeqCst) => return,
                    Action::Restart => {
                        eprintln!("error: {}", restart(&answer));
                        std::process::exit(i32::from(RESTART_EXIT));
                    }
                    Action::Stop => {
                        eprintln!("error: {}", stopped(job_id, &answer));
                        std::process::exit(1);
                    }
                }
            }
            // The coordinator may be restarting: keep training, retry on the next beat.
            Err(error) => {
                if !warned {
                    tracing::warn!(%error, "heartbeat failed; training goes on and retries");
                    warned = true;
                }
            }
        }
    }
}

fn progress(live: &LiveProgress) -> Progress {
    let live = live.lock().unwrap_or_else(PoisonError::into_inner).clone();
    Progress {
        step: Some(live.step),
        epoch: Some(live.epoch),
        images_per_s: live.images_per_s,
        loss: live.loss,
        checkpoint: live.checkpoint.map(|(step, url)| CheckpointReport { step, url }),
    }
}

fn leave(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    job_id: &str,
    worker: &str,
    outcome: LeaveOutcome,
    message: &str,
) {
    let request =
        LeaveRequest { outcome, message: (!message.is_empty()).then(|| message.replace('\n', " ")) };
    if let Err(error) = runtime.block_on(client.leave(job_id, worker, &request)) {
        tracing::warn!(%error, "could not tell the coordinator this worker left");
    }
}

fn restart(answer: &HeartbeatAnswer) -> anyhow::Error {
    anyhow::Error::new(Restart(format!(
        "generation {} ended (the coordinator says restart); the engine relaunches the job",
        answer.generation
    )))
}

fn stopped(job_id: &str, answer: &HeartbeatAnswer) -> anyhow::Error {
    anyhow::anyhow!("job {job_id} is {}; this worker stops", answer.job_state)
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}
