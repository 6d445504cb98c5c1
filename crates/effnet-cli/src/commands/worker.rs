//! `effnet worker --coordinator URL --job ID`: one worker of a coordinator's job.
//!
//! 1. Read the job's spec from the coordinator (the YAML as submitted, validated here again).
//! 2. Join its forming generation, with the rank and world size the engine gave this process
//!    (`RANK`/`WORLD_SIZE`, a Kubernetes Indexed Job's `JOB_COMPLETION_INDEX` with `WORLD_SIZE`,
//!    Slurm's `SLURM_PROCID`/`SLURM_NTASKS`, mpirun's `OMPI_COMM_WORLD_*`);
//!    the coordinator refuses a rank that is taken or a world that is not the job's.
//! 3. Heartbeat until the generation is complete (`train`), then fetch the generation's
//!    assignment (the checkpoint the coordinator chose and the rest of its epoch dealt to this
//!    generation's ranks; new epochs' plans come from it too) and train, heartbeating from a
//!    thread with the step, loss, throughput and every committed checkpoint (sent as soon as it
//!    is committed, so the coordinator knows the newest one).
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
use effnet_collective::rendezvous::Rendezvous;
use effnet_config::JobSpec;
use effnet_coordinator::Client;
use effnet_coordinator::protocol::{
    Action, Assignment, CheckpointReport, HeartbeatAnswer, JoinRequest, LeaveOutcome, LeaveRequest, Progress,
    StartPoint,
};
use effnet_train::feed::Dealer;
use effnet_train::progress::{Live, LiveProgress};
use effnet_train::{Launch, ResumeFrom, RunOptions};

use super::coordinator::TokenArgs;
use super::run::TrainArgs;
use crate::failure::{RESTART_EXIT, Restart, bad_input};

/// How often the heartbeat thread looks for a newly committed checkpoint.
const CHECKPOINT_POLL: Duration = Duration::from_millis(100);

pub fn coordinated(url: &str, job_id: &str, token: &TokenArgs, args: &TrainArgs) -> Result<()> {
    let token = token.token()?;
    let client = Client::new(url, &token)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // As submitted: the worker opens the job's URLs, with whatever credentials they carry.
    let detail = runtime.block_on(client.job_with_credentials(job_id))?;
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
        let reason = "no launcher variables (RANK/WORLD_SIZE, JOB_COMPLETION_INDEX/WORLD_SIZE, SLURM_PROCID/SLURM_NTASKS, OMPI_COMM_WORLD_RANK/SIZE) for a job of several workers";
        leave(&runtime, &client, job_id, &worker, LeaveOutcome::Failed, reason);
        return Err(bad_input!("effnet worker: {reason}"));
    }
    let interval = Duration::from_secs_f64(joined.heartbeat_interval_s.clamp(0.05, 30.0));

    // Wait for the generation to be complete (through a coordinator restart, too).
    let waiting = Instant::now();
    let answer = loop {
        let answer = match runtime.block_on(client.heartbeat(job_id, &worker, &Progress::default())) {
            Ok(answer) => answer,
            Err(error) if !error.is_bad_input() && waiting.elapsed() < JOIN_PATIENCE => {
                tracing::warn!(%error, "heartbeat failed while the generation forms; retrying");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        match answer.action {
            Action::Wait => std::thread::sleep(interval.min(Duration::from_millis(200))),
            Action::Train => break answer,
            Action::Restart => return Err(restart(&answer)),
            Action::Stop => return Err(stopped(job_id, &answer)),
        }
    };
    // Where the generation starts and the rest of its epoch, dealt by the coordinator.
    let assignment = match assignment(&runtime, &client, job_id, &worker) {
        Ok(assignment) => assignment,
        Err(error) => {
            let bad = error.is_bad_input();
            let outcome = if bad { LeaveOutcome::Failed } else { LeaveOutcome::Restart };
            leave(&runtime, &client, job_id, &worker, outcome, &error.to_string());
            return Err(if bad { bad_input!("{error}") } else { Restart(error.to_string()).into() });
        }
    };
    tracing::info!(job = job_id, generation = answer.generation, start = ?assignment.deal.start, "dealt");
    let resume = match &assignment.deal.start {
        StartPoint::Checkpoint { url, .. } => ResumeFrom::Url(url.clone()),
        StartPoint::Fresh => ResumeFrom::Fresh,
        StartPoint::Scratch => ResumeFrom::Scratch,
    };
    let dealer = CoordinatorDealer {
        url: url.to_string(),
        token: token.clone(),
        job: job_id.to_string(),
        worker: worker.clone(),
        resumed: assignment.deal.data,
    };
    let live: LiveProgress = Arc::new(Mutex::new(Live::default()));
    let done = Arc::new(AtomicBool::new(false));
    let beating = std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn({
            // Its own client: pooled connections belong to the runtime that opened them.
            let client = Client::new(url, &token)?;
            let (job_id, worker, live, done) =
                (job_id.to_string(), worker.clone(), live.clone(), done.clone());
            move || heartbeats(client, &job_id, &worker, &live, &done, interval)
        })
        .context("starting the heartbeat thread")?;
    // A collective for several workers, or for one when the job names its backend (as
    // `effnet worker JOB.yaml` does: a world of one over NCCL or MPI).
    let named_backend =
        matches!(spec.distributed.backend, Some(effnet_config::Backend::Nccl | effnet_config::Backend::Mpi));
    let launch = if joined.world_size > 1 || (named_backend && engine_given) {
        Launch::Worker
    } else {
        Launch::Single
    };
    let rendezvous = CoordinatorRendezvous {
        url: url.to_string(),
        token: token.clone(),
        job: job_id.to_string(),
        worker: worker.clone(),
    };
    // Test fault point (docs/reliability.md): its "step" is the generation's number.
    effnet_store::faults::point(
        effnet_store::faults::Phase::Rendezvous,
        u64::from(answer.generation),
        Some(joined.rank as usize),
    );
    let options = RunOptions {
        resume,
        progress: args.progress(),
        launch,
        live: Some(live.clone()),
        rendezvous: Some(Arc::new(rendezvous)),
        dealer: Some(Arc::new(dealer)),
    };
    let outcome = effnet_train::run(&spec, options);
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

/// The generation's assignment; while the coordinator cannot read the job's store (503) or
/// cannot be reached, ask again for up to [`JOIN_PATIENCE`], heartbeating meanwhile so that
/// this worker does not expire while it waits.
fn assignment(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    job_id: &str,
    worker: &str,
) -> Result<Assignment, effnet_coordinator::ClientError> {
    let started = Instant::now();
    loop {
        match runtime.block_on(client.assignment(job_id, worker)) {
            Err(error) if !error.is_bad_input() && started.elapsed() < JOIN_PATIENCE => {
                tracing::warn!(%error, "the coordinator could not deal the generation yet; asking again");
                std::thread::sleep(Duration::from_secs(1));
                let _ = runtime.block_on(client.heartbeat(job_id, worker, &Progress::default()));
            }
            outcome => return outcome,
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
                        eprintln!("error: {}", effnet_store::redact_text(&restart(&answer).to_string()));
                        std::process::exit(i32::from(RESTART_EXIT));
                    }
                    Action::Stop => {
                        eprintln!(
                            "error: {}",
                            effnet_store::redact_text(&stopped(job_id, &answer).to_string())
                        );
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

/// NCCL's unique id through the coordinator: rank 0 publishes it for its generation, the other
/// ranks ask for it until it is there. Only members of the generation, with the job's token,
/// can publish or read it.
#[derive(Debug)]
struct CoordinatorRendezvous {
    url: String,
    token: String,
    job: String,
    worker: String,
}

impl Rendezvous for CoordinatorRendezvous {
    fn share(
        &self,
        rank: usize,
        _world_size: usize,
        bytes: Option<&[u8]>,
        timeout: Duration,
    ) -> effnet_collective::Result<Vec<u8>> {
        let fail = |reason: String| effnet_collective::Error::Rendezvous { address: self.address(), reason };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let client = Client::new(&self.url, &self.token).map_err(|e| fail(e.to_string()))?;
        if let Some(bytes) = bytes {
            runtime
                .block_on(client.publish_rendezvous(&self.job, &self.worker, bytes))
                .map_err(|e| fail(e.to_string()))?;
            return Ok(bytes.to_vec());
        }
        let deadline = Instant::now() + timeout;
        loop {
            match runtime.block_on(client.rendezvous(&self.job, &self.worker)) {
                Ok(Some(bytes)) => return Ok(bytes),
                Ok(None) => {}
                Err(error) if error.is_bad_input() => return Err(fail(error.to_string())),
                // Unreachable for a moment (restarting): ask again.
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                return Err(fail(format!(
                    "rank {rank}: rank 0 published nothing within {} s",
                    timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn address(&self) -> String {
        format!("{}/v1/jobs/{}/workers/{}/rendezvous", self.url, self.job, self.worker)
    }
}

/// The data plans from the coordinator: the rest of the resumed epoch from the assignment, and
/// each new epoch's plan asked for when the feed reaches it (the trainer checks both).
#[derive(Debug)]
struct CoordinatorDealer {
    url: String,
    token: String,
    job: String,
    worker: String,
    resumed: Option<effnet_data::DataCursor>,
}

impl Dealer for CoordinatorDealer {
    fn resumed(&self) -> Option<effnet_data::DataCursor> {
        self.resumed.clone()
    }

    fn epoch_plan(&self, epoch: u64) -> effnet_train::Result<effnet_data::EpochPlan> {
        let fail = |error: &dyn std::fmt::Display| {
            effnet_train::Error::Internal(format!("epoch {epoch}'s plan from the coordinator: {error}"))
        };
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| fail(&e))?;
        let client = Client::new(&self.url, &self.token).map_err(|e| fail(&e))?;
        let started = Instant::now();
        loop {
            match runtime.block_on(client.epoch_plan(&self.job, &self.worker, epoch)) {
                Ok(plan) => return Ok(plan),
                // Restarting, or its store is slow: ask again.
                Err(error) if !error.is_bad_input() && started.elapsed() < JOIN_PATIENCE => {
                    tracing::warn!(%error, epoch, "asking the coordinator for the epoch's plan again");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(error) => return Err(fail(&error)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use effnet_coordinator::protocol::JobStart;
    use effnet_coordinator::{Settings, State};

    const TOKEN: &str = "rendezvous-test-token";

    /// A coordinator on loopback with a running 2-worker job; its URL and the two worker ids.
    fn coordinator(runtime: &tokio::runtime::Runtime, dir: &std::path::Path) -> (String, String, String) {
        runtime.block_on(async {
            let state = Arc::new(State::open(dir, TOKEN, Settings::default()).await.unwrap());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(effnet_coordinator::run(listener, state, std::future::pending::<()>()));
            let client = Client::new(&url, TOKEN).unwrap();
            let yaml = "name: nccl\nmodel: {variant: b0}\ndata: {train: x}\ndistributed: {workers: 2}\n";
            client.submit(yaml, "nccl.yaml", &JobStart::Latest).await.unwrap();
            let zero =
                client.join("nccl-1", &JoinRequest { rank: Some(0), ..Default::default() }).await.unwrap();
            let one =
                client.join("nccl-1", &JoinRequest { rank: Some(1), ..Default::default() }).await.unwrap();
            (url, zero.worker_id, one.worker_id)
        })
    }

    fn rendezvous(url: &str, worker: &str) -> CoordinatorRendezvous {
        CoordinatorRendezvous {
            url: url.into(),
            token: TOKEN.into(),
            job: "nccl-1".into(),
            worker: worker.into(),
        }
    }

    #[test]
    fn rank_zeros_id_reaches_the_other_rank_through_the_coordinator() {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (url, zero, one) = coordinator(&runtime, dir.path());
        let id: Vec<u8> = (0..128).map(|i| (i * 7 % 256) as u8).collect();

        // Rank 1 asks first and waits; rank 0 publishes a moment later.
        let fetcher = {
            let peer = rendezvous(&url, &one);
            std::thread::spawn(move || peer.share(1, 2, None, Duration::from_secs(20)))
        };
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(rendezvous(&url, &zero).share(0, 2, Some(&id), Duration::from_secs(20)).unwrap(), id);
        assert_eq!(fetcher.join().unwrap().unwrap(), id);

        // Only rank 0 publishes, and only once.
        let refused =
            rendezvous(&url, &one).share(1, 2, Some(&[1, 2, 3]), Duration::from_secs(5)).unwrap_err();
        assert!(refused.to_string().contains("only rank 0 publishes the rendezvous"), "{refused}");
        let again = rendezvous(&url, &zero).share(0, 2, Some(&[9; 128]), Duration::from_secs(5)).unwrap_err();
        assert!(again.to_string().contains("already published"), "{again}");
        // The token is needed.
        let mut stranger = rendezvous(&url, &one);
        stranger.token = "wrong".into();
        let unauthorised = stranger.share(1, 2, None, Duration::from_secs(5)).unwrap_err();
        assert!(unauthorised.to_string().contains("(401)"), "{unauthorised}");
    }

    #[test]
    fn a_rank_waiting_for_an_id_that_never_comes_times_out() {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (url, _, one) = coordinator(&runtime, dir.path());
        let started = Instant::now();
        let error = rendezvous(&url, &one).share(1, 2, None, Duration::from_millis(500)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(error.to_string().contains("rank 1: rank 0 published nothing within 0.5 s"), "{error}");
    }
}
