//! [`State`]: what every request handler and the expiry task share — the database, the token,
//! the settings, and the heartbeat deadlines of the workers being watched.
//!
//! Deadlines live in memory on tokio's clock (so tests can pause and advance it); the database
//! keeps wall-clock times for people. A restarted coordinator gives every active member a full
//! timeout from its start: workers that are alive re-attach with their next heartbeat.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use effnet_config::JobSpec;
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::protocol::{
    Assignment, Deal, HeartbeatAnswer, JobDetail, JobStart, JobSummary, JoinRequest, Joined, LeaveRequest,
    MemberState, Progress, ProgressRecord, RestartRequest, Submitted,
};
use crate::store::{self, Store};

/// Tunables of a coordinator.
#[derive(Clone, Debug)]
pub struct Settings {
    /// A worker silent this long expires and ends its generation.
    pub heartbeat_timeout: Duration,
    /// How often the expiry task looks for silent workers.
    pub sweep_every: Duration,
    /// Requests with a larger body are refused (413) before they are read in full.
    pub body_limit: usize,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            heartbeat_timeout: Duration::from_secs(60),
            sweep_every: Duration::from_secs(1),
            body_limit: 1024 * 1024,
        }
    }
}

/// The coordinator's shared state; one per process, passed to [`crate::run`] in an `Arc`.
pub struct State {
    store: Store,
    token: Vec<u8>,
    /// The status page's capability path segment (see [`State::view_key`]).
    view_key: String,
    settings: Settings,
    /// Worker id → the instant it expires unless it heartbeats.
    deadlines: Mutex<HashMap<String, Instant>>,
    /// Job id → the lock held while that job's generation is dealt, so concurrent first requests
    /// deal it once. One per job: a deal reads the job's checkpoint store, and one job's slow or
    /// unreachable store must not hold up the others' generations.
    dealing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Job id → its training data's row groups (read from the manifest once).
    row_groups: Mutex<HashMap<String, Arc<Vec<effnet_data::RowGroupRef>>>>,
}

/// SHA-256 of a domain tag and the token, in hex: the status page's key.
fn view_key(token: &str) -> String {
    use sha2::Digest as _;
    let digest =
        sha2::Sha256::new().chain_update(b"effnet status page\0").chain_update(token.as_bytes()).finalize();
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A stored job's spec (it validated when it was submitted).
fn stored_spec(yaml: &str, job_id: &str) -> Result<JobSpec> {
    JobSpec::from_yaml_str(yaml, &format!("job {job_id}"))
        .map_err(|error| Error::Corrupt { message: format!("job {job_id}'s stored spec: {error}") })
}

/// Seconds since the Unix epoch, the time format of the database and the API.
pub(crate) fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |elapsed| elapsed.as_secs_f64())
}

impl State {
    /// Opens (or creates) the state in `state_dir` and starts watching the workers it lists as
    /// active. `token` is the shared bearer token; it must not be empty.
    pub async fn open(state_dir: &Path, token: &str, settings: Settings) -> Result<State> {
        if token.is_empty() {
            return Err(Error::bad_request("the bearer token is empty"));
        }
        let store = Store::open(state_dir)?;
        let watched = store.call(store::watched_members).await?;
        let deadline = Instant::now() + settings.heartbeat_timeout;
        let deadlines = watched.into_iter().map(|id| (id, deadline)).collect();
        let view_key = view_key(token);
        Ok(State {
            store,
            token: token.as_bytes().to_vec(),
            view_key,
            settings,
            deadlines: Mutex::new(deadlines),
            dealing: Mutex::new(HashMap::new()),
            row_groups: Mutex::new(HashMap::new()),
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The status page for browsers, which cannot send a bearer header: `/view/{key}/` serves
    /// the page (and nothing else) to whoever has the key, a one-way digest of the token. The
    /// key shows job status, and cannot submit, cancel or act as a worker.
    pub fn view_key(&self) -> &str {
        &self.view_key
    }

    /// Whether `presented` is the view key (constant time for equal lengths).
    pub fn view_key_matches(&self, presented: &str) -> bool {
        bool::from(self.view_key.as_bytes().ct_eq(presented.as_bytes()))
    }

    /// Compares a presented token with the coordinator's in constant time (for equal lengths).
    pub fn token_matches(&self, presented: &[u8]) -> bool {
        bool::from(self.token.as_slice().ct_eq(presented))
    }

    fn deadlines(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.deadlines.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn watch(&self, worker_id: &str) {
        self.deadlines().insert(worker_id.to_string(), Instant::now() + self.settings.heartbeat_timeout);
    }

    fn unwatch(&self, worker_ids: &[String]) {
        let mut deadlines = self.deadlines();
        for id in worker_ids {
            deadlines.remove(id);
        }
    }

    /// Workers being watched for heartbeats.
    pub fn watched(&self) -> usize {
        self.deadlines().len()
    }

    /// Validates the job YAML exactly as `effnet run --check` validates a spec (effnet-config,
    /// errors named after `source_name`) and stores it as a queued job.
    /// With a `key`, submitting again (the same YAML) answers the job the first submission made:
    /// every pod of a Kubernetes Job can submit with the Job's uid, and one job is stored.
    pub async fn submit(
        &self,
        yaml: String,
        source_name: &str,
        start: JobStart,
        key: Option<String>,
    ) -> Result<Submitted> {
        if let Some(key) = &key
            && (key.is_empty() || key.len() > 200 || key.chars().any(|c| c.is_control()))
        {
            return Err(Error::bad_request("key: 1 to 200 printable characters"));
        }
        let spec = JobSpec::from_yaml_str(&yaml, source_name)
            .map_err(|error| Error::bad_request(error.to_string()))?;
        let spec_json = serde_json::to_value(&spec)
            .map_err(|error| Error::Internal { message: format!("spec to JSON: {error}") })?;
        let job = store::NewJob {
            name: spec.name.clone(),
            yaml,
            spec: spec_json,
            world_size: spec.distributed.workers,
            max_restarts: spec.distributed.max_restarts,
            min_workers: spec.min_workers(),
            start,
            key,
        };
        let now = now();
        self.store.call(move |db| store::insert_job(db, &job, now)).await
    }

    pub async fn jobs(&self) -> Result<Vec<JobSummary>> {
        self.store.call(store::list_jobs).await
    }

    pub async fn job(&self, id: &str) -> Result<JobDetail> {
        let id = id.to_string();
        self.store.call(move |db| store::job_detail(db, &id)).await
    }

    pub async fn cancel(&self, id: &str) -> Result<JobSummary> {
        let id = id.to_string();
        let now = now();
        let (summary, unwatched) = self.store.call(move |db| store::cancel(db, &id, now)).await?;
        self.unwatch(&unwatched);
        Ok(summary)
    }

    pub async fn join(&self, job_id: &str, request: JoinRequest) -> Result<Joined> {
        let job_id = job_id.to_string();
        let now = now();
        let mut joined = self.store.call(move |db| store::join(db, &job_id, &request, now)).await?;
        joined.heartbeat_interval_s = self.settings.heartbeat_timeout.as_secs_f64() / 5.0;
        self.watch(&joined.worker_id);
        Ok(joined)
    }

    /// Ends the job's newest generation now, for an engine that saw its workers fail; the job
    /// fails if that used up its `max_restarts`.
    pub async fn restart(&self, job_id: &str, request: RestartRequest) -> Result<JobSummary> {
        let job_id = job_id.to_string();
        let now = now();
        let (summary, unwatched) =
            self.store.call(move |db| store::restart(db, &job_id, &request, now)).await?;
        self.unwatch(&unwatched);
        Ok(summary)
    }

    pub async fn heartbeat(
        &self,
        job_id: &str,
        worker_id: &str,
        progress: Progress,
    ) -> Result<HeartbeatAnswer> {
        let (job, worker) = (job_id.to_string(), worker_id.to_string());
        let now = now();
        let (answer, watched) =
            self.store.call(move |db| store::heartbeat(db, &job, &worker, &progress, now)).await?;
        if watched {
            self.watch(worker_id);
        } else {
            self.unwatch(&[worker_id.to_string()]);
        }
        Ok(answer)
    }

    pub async fn leave(
        &self,
        job_id: &str,
        worker_id: &str,
        request: LeaveRequest,
    ) -> Result<HeartbeatAnswer> {
        let (job, worker) = (job_id.to_string(), worker_id.to_string());
        let now = now();
        let (answer, unwatched) =
            self.store.call(move |db| store::leave(db, &job, &worker, &request, now)).await?;
        self.unwatch(&unwatched);
        Ok(answer)
    }

    /// Rank 0 publishes its generation's rendezvous bytes (hex, at most
    /// [`crate::protocol::RENDEZVOUS_LIMIT`] bytes), once.
    pub async fn publish_rendezvous(&self, job_id: &str, worker_id: &str, blob: String) -> Result<()> {
        let valid = blob.len().is_multiple_of(2)
            && blob.len() / 2 <= crate::protocol::RENDEZVOUS_LIMIT
            && !blob.is_empty()
            && blob.bytes().all(|b| b.is_ascii_hexdigit());
        if !valid {
            return Err(Error::bad_request(format!(
                "rendezvous blob: expected 1 to {} bytes in hex",
                crate::protocol::RENDEZVOUS_LIMIT
            )));
        }
        let (job, worker) = (job_id.to_string(), worker_id.to_string());
        self.store.call(move |db| store::publish_rendezvous(db, &job, &worker, &blob)).await
    }

    /// The member's generation's rendezvous bytes (hex), `None` until published.
    pub async fn rendezvous(&self, job_id: &str, worker_id: &str) -> Result<Option<String>> {
        let (job, worker) = (job_id.to_string(), worker_id.to_string());
        self.store.call(move |db| store::rendezvous(db, &job, &worker)).await
    }

    /// A member's start in its running generation: the checkpoint and the rest of the epoch
    /// dealt to the generation's ranks, decided at the first request and stored (see
    /// [`crate::deal`]).
    pub async fn assignment(&self, job_id: &str, worker_id: &str) -> Result<Assignment> {
        let context = {
            let (job, worker) = (job_id.to_string(), worker_id.to_string());
            self.store.call(move |db| store::deal_context(db, &job, &worker)).await?
        };
        let deal = match context.deal {
            Some(deal) => deal,
            None => {
                let lock = self
                    .dealing
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(job_id.to_string())
                    .or_default()
                    .clone();
                let guard = lock.clone().lock_owned().await;
                let dealt = self.deal_once(job_id, worker_id).await;
                drop(guard);
                // The map's entry goes once nobody else holds or waits for it (clones are only
                // taken under the map's lock); a later request finds the stored deal.
                let mut locks = self.dealing.lock().unwrap_or_else(PoisonError::into_inner);
                if Arc::strong_count(&lock) == 2 {
                    locks.remove(job_id);
                }
                dealt?
            }
        };
        Ok(Assignment {
            generation: context.generation.number,
            rank: context.member.rank,
            world_size: context.generation.world_size,
            deal,
        })
    }

    /// The generation's deal, made and stored now unless a request before this one (which held
    /// the job's dealing lock) stored it.
    async fn deal_once(&self, job_id: &str, worker_id: &str) -> Result<Deal> {
        let (job, worker) = (job_id.to_string(), worker_id.to_string());
        let context = self.store.call(move |db| store::deal_context(db, &job, &worker)).await?;
        if let Some(deal) = context.deal {
            return Ok(deal);
        }
        let spec = stored_spec(&context.yaml, job_id)?;
        let (world, number) = (context.generation.world_size as usize, context.generation.number);
        let deal =
            crate::deal::deal(&spec, &context.start, context.generation.resume.as_ref(), world).await?;
        let job = job_id.to_string();
        let deal = self.store.call(move |db| store::save_deal(db, &job, number, &deal)).await?;
        tracing::info!(job = job_id, generation = number, start = ?deal.start, "generation dealt");
        Ok(deal)
    }

    /// Epoch `epoch`'s plan for a member's running generation.
    pub async fn epoch_plan(
        &self,
        job_id: &str,
        worker_id: &str,
        epoch: u64,
    ) -> Result<effnet_data::EpochPlan> {
        let (job, worker) = (job_id.to_string(), worker_id.to_string());
        let context = self.store.call(move |db| store::deal_context(db, &job, &worker)).await?;
        let spec = stored_spec(&context.yaml, job_id)?;
        let cached = self.row_groups.lock().unwrap_or_else(PoisonError::into_inner).get(job_id).cloned();
        let row_groups = match cached {
            Some(groups) => groups,
            None => {
                let groups = Arc::new(crate::deal::row_groups(&spec).await?);
                self.row_groups
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(job_id.to_string(), groups.clone());
                groups
            }
        };
        crate::deal::epoch_plan(&spec, &row_groups, epoch, context.generation.world_size as usize)
    }

    pub async fn progress(&self, job_id: &str, limit: u32) -> Result<Vec<ProgressRecord>> {
        let job_id = job_id.to_string();
        self.store.call(move |db| store::progress_history(db, &job_id, limit)).await
    }

    pub(crate) async fn member_counts(&self) -> Result<Vec<(String, MemberState, u64)>> {
        self.store.call(store::member_counts).await
    }

    /// Expires every watched worker whose deadline has passed; returns how many expired.
    pub async fn expire_silent(&self) -> Result<usize> {
        let now_instant = Instant::now();
        let silent: Vec<String> = self
            .deadlines()
            .iter()
            .filter(|(_, deadline)| **deadline <= now_instant)
            .map(|(id, _)| id.clone())
            .collect();
        let timeout_s = self.settings.heartbeat_timeout.as_secs_f64();
        let mut expired = 0;
        for worker_id in silent {
            // A heartbeat may have moved the deadline since it was read.
            if self.deadlines().get(&worker_id).is_some_and(|deadline| *deadline > Instant::now()) {
                continue;
            }
            let id = worker_id.clone();
            let now = now();
            let unwatched = self.store.call(move |db| store::expire(db, &id, timeout_s, now)).await?;
            if unwatched.first() == Some(&worker_id) {
                expired += 1;
                tracing::warn!(worker = %worker_id, timeout_s, "worker expired: no heartbeat within the timeout");
            }
            self.unwatch(&unwatched);
            self.unwatch(&[worker_id]);
        }
        Ok(expired)
    }
}
