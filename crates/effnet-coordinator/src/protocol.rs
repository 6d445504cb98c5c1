//! The JSON bodies of the HTTP API, shared by the server and [`crate::Client`].
//!
//! Times are seconds since the Unix epoch (`f64`), so a restarted coordinator and every client
//! read the same clock. Requests deny unknown fields: a misspelt key is a 400, not a silently
//! ignored setting.

use std::fmt;
use std::str::FromStr;

use effnet_data::DataCursor;
use effnet_store::{redact, redact_text};
use serde::{Deserialize, Serialize};

/// Where a job is in its life.
///
/// ```text
/// queued ──(first generation complete)──► running ──(all ranks leave "finished")──► succeeded
///    │                                       │  ──(a rank leaves "failed")──────────► failed
///    └──────────────(cancel)─────────────────┴──(cancel)─────────────────────────────► cancelled
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] =
        [JobState::Queued, JobState::Running, JobState::Succeeded, JobState::Failed, JobState::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Succeeded, failed or cancelled: nothing joins or restarts it any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(text: &str) -> Result<JobState, String> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| format!("job state {text:?}"))
    }
}

/// Where a generation (one attempt of a job with a fixed set of ranks) is.
///
/// ```text
/// forming ──(world_size members joined)──► running ──► ended (finished, failed, restart,
///    └──────────────(a member leaves or expires, cancel)──►┘     expired member, cancelled)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GenerationState {
    Forming,
    Running,
    Ended,
}

impl GenerationState {
    pub fn as_str(self) -> &'static str {
        match self {
            GenerationState::Forming => "forming",
            GenerationState::Running => "running",
            GenerationState::Ended => "ended",
        }
    }
}

impl FromStr for GenerationState {
    type Err = String;
    fn from_str(text: &str) -> Result<GenerationState, String> {
        match text {
            "forming" => Ok(GenerationState::Forming),
            "running" => Ok(GenerationState::Running),
            "ended" => Ok(GenerationState::Ended),
            _ => Err(format!("generation state {text:?}")),
        }
    }
}

/// A worker's standing in its generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Joined and heartbeating (or not yet past the timeout).
    Active,
    /// Said goodbye (`POST .../leave`).
    Left,
    /// Silent past the heartbeat timeout.
    Expired,
}

impl MemberState {
    pub const ALL: [MemberState; 3] = [MemberState::Active, MemberState::Left, MemberState::Expired];

    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Active => "active",
            MemberState::Left => "left",
            MemberState::Expired => "expired",
        }
    }
}

impl FromStr for MemberState {
    type Err = String;
    fn from_str(text: &str) -> Result<MemberState, String> {
        MemberState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| format!("member state {text:?}"))
    }
}

/// `POST /v1/jobs` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Submitted {
    pub id: String,
    pub name: String,
    pub state: JobState,
}

/// Where a job's first generation starts, chosen at submission (`--fresh`, `--resume URL`);
/// later generations start from the job's newest committed checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "snake_case", deny_unknown_fields)]
pub enum JobStart {
    /// The newest committed checkpoint in the job's checkpoint store, or step 0.
    #[default]
    Latest,
    /// Step 0; the first generation's rank 0 deletes the job's existing checkpoints.
    Fresh,
    /// This checkpoint directory (of this job or another).
    Checkpoint { url: String },
}

impl JobStart {
    /// The start the command-line flags `--resume URL` and `--fresh` ask for (they exclude each
    /// other; neither is the newest checkpoint).
    pub fn from_flags(resume: Option<String>, fresh: bool) -> JobStart {
        match (resume, fresh) {
            (Some(url), _) => JobStart::Checkpoint { url },
            (None, true) => JobStart::Fresh,
            (None, false) => JobStart::Latest,
        }
    }
}

/// Where a generation starts, decided by the coordinator once for all its ranks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "snake_case", deny_unknown_fields)]
pub enum StartPoint {
    /// Step 0: there is no committed checkpoint to resume (existing files are left alone).
    Scratch,
    /// Step 0 after rank 0 deleted the job's checkpoints ([`JobStart::Fresh`]).
    Fresh,
    /// This committed checkpoint.
    Checkpoint { step: u64, url: String },
}

/// What the coordinator dealt a generation: its start and, when that is mid-epoch, the rest of
/// the epoch re-dealt to the generation's ranks (exactly once, at its world size).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deal {
    pub start: StartPoint,
    /// The plan and every rank's cursor; `None` when the start is an epoch's start.
    pub data: Option<DataCursor>,
}

/// `GET /v1/jobs/{id}/workers/{wid}/assignment`: a worker's start in a running generation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub generation: u32,
    pub rank: u32,
    pub world_size: u32,
    #[serde(flatten)]
    pub deal: Deal,
}

/// The newest checkpoint a worker reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointReport {
    pub step: u64,
    pub url: String,
}

/// The newest checkpoint of a job and when the coordinator heard of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastCheckpoint {
    pub step: u64,
    pub url: String,
    pub reported_at: f64,
}

/// One line of `GET /v1/jobs`, and the head of `GET /v1/jobs/{id}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSummary {
    pub id: String,
    pub name: String,
    pub state: JobState,
    pub created_at: f64,
    pub updated_at: f64,
    /// Generations started after the first.
    pub restarts: u32,
    /// `distributed.workers` of the spec.
    pub world_size: u32,
    /// The newest generation's number (1, 2, ...), 0 before any worker joined.
    pub generation: u32,
    pub generation_state: Option<GenerationState>,
    /// Active members of the newest generation.
    pub workers: u32,
    /// The highest step any member of the newest generation reported.
    pub step: Option<u64>,
    pub epoch: Option<f64>,
    /// Summed over the newest generation's active members.
    pub images_per_s: Option<f64>,
    /// Rank 0's latest loss (rank 0 holds the job's view of the loss).
    pub loss: Option<f64>,
    pub last_checkpoint: Option<LastCheckpoint>,
    /// Why the job failed or was cancelled (`None` while it runs and when it succeeded).
    pub reason: Option<String>,
    /// `distributed.max_restarts` of the spec.
    pub max_restarts: u32,
}

impl JobSummary {
    /// The summary people see (listings, the status page, `effnet status`): checkpoint URLs and
    /// the failure reason with credentials redacted (`effnet_store::redact`).
    pub fn redacted(mut self) -> JobSummary {
        if let Some(checkpoint) = &mut self.last_checkpoint {
            checkpoint.url = redact(&checkpoint.url);
        }
        self.reason = self.reason.as_deref().map(redact_text);
        self
    }
}

/// A generation as `GET /v1/jobs/{id}` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    pub number: u32,
    pub world_size: u32,
    pub state: GenerationState,
    pub end_reason: Option<String>,
    pub started_at: f64,
    pub ended_at: Option<f64>,
    /// The newest checkpoint any worker of the job had reported committed when the generation
    /// formed: the generation starts from it or a newer one.
    pub resume: Option<CheckpointReport>,
    /// Where the generation starts, once the coordinator dealt it (at its first assignment).
    pub start: Option<StartPoint>,
}

/// A worker of a generation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    pub generation: u32,
    pub rank: u32,
    pub host: Option<String>,
    pub state: MemberState,
    pub end_reason: Option<String>,
    pub joined_at: f64,
    pub last_heartbeat: f64,
    pub step: Option<u64>,
    pub epoch: Option<f64>,
    pub images_per_s: Option<f64>,
    pub loss: Option<f64>,
    pub checkpoint: Option<LastCheckpoint>,
}

/// `GET /v1/jobs/{id}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobDetail {
    #[serde(flatten)]
    pub summary: JobSummary,
    /// The YAML text as submitted.
    pub yaml: String,
    /// The validated spec (effnet-config's `JobSpec`) as JSON.
    pub spec: serde_json::Value,
    pub generations: Vec<Generation>,
    /// Members of every generation, oldest first.
    pub members: Vec<Member>,
}

impl JobDetail {
    /// The detail people see: [`JobSummary::redacted`], and the YAML, spec, starts, checkpoints
    /// and end reasons redacted too. Workers ask for the job as stored (`?credentials=true`),
    /// since they open its URLs.
    pub fn redacted(mut self) -> JobDetail {
        self.summary = self.summary.redacted();
        self.yaml = redact_text(&self.yaml);
        effnet_store::redact_json(&mut self.spec);
        for generation in &mut self.generations {
            if let Some(resume) = &mut generation.resume {
                resume.url = redact(&resume.url);
            }
            if let Some(StartPoint::Checkpoint { url, .. }) = &mut generation.start {
                *url = redact(url);
            }
            generation.end_reason = generation.end_reason.as_deref().map(redact_text);
        }
        for member in &mut self.members {
            if let Some(checkpoint) = &mut member.checkpoint {
                checkpoint.url = redact(&checkpoint.url);
            }
            member.end_reason = member.end_reason.as_deref().map(redact_text);
        }
        self
    }
}

/// `POST /v1/jobs/{id}/workers` body; every field optional (an empty body is `{}`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JoinRequest {
    /// For the status page and logs.
    pub host: Option<String>,
    /// The rank the engine gave this process (Slurm `SLURM_PROCID`, Kubernetes
    /// `JOB_COMPLETION_INDEX`, `RANK`); the coordinator assigns it if free, else refuses.
    pub rank: Option<u32>,
    /// The world size the engine started (`SLURM_NTASKS`, `WORLD_SIZE`); must equal the job's.
    pub world_size: Option<u32>,
}

/// `POST /v1/jobs/{id}/workers` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Joined {
    pub worker_id: String,
    pub generation: u32,
    pub rank: u32,
    pub world_size: u32,
    /// Members joined so far; the generation runs when this reaches `world_size`.
    pub members: u32,
    pub generation_state: GenerationState,
    /// How often to heartbeat: a fifth of the coordinator's heartbeat timeout.
    pub heartbeat_interval_s: f64,
}

/// `POST .../heartbeat` body: the worker's progress, every field optional.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Progress {
    pub step: Option<u64>,
    pub epoch: Option<f64>,
    pub images_per_s: Option<f64>,
    pub loss: Option<f64>,
    pub checkpoint: Option<CheckpointReport>,
}

/// What a worker should do next, the answer to every heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The generation is still forming: keep heartbeating, do not start the collective.
    Wait,
    /// The generation is complete: train.
    Train,
    /// The generation ended while the job goes on: abort the communicator and exit with the
    /// restart status, so the engine relaunches and a new generation forms.
    Restart,
    /// The job is over (finished, failed or cancelled): exit.
    Stop,
}

/// `POST .../heartbeat` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatAnswer {
    pub action: Action,
    pub job_state: JobState,
    pub generation: u32,
    pub generation_state: GenerationState,
    pub rank: u32,
    pub world_size: u32,
    pub members: u32,
}

/// Why a worker leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveOutcome {
    /// Training reached its end on this rank; the job succeeds when every rank says so.
    Finished,
    /// An error that a restart will not cure (bad config, unreadable data): the job fails.
    Failed,
    /// A peer or collective failed: end the generation and let the engine relaunch.
    Restart,
}

/// `POST .../leave` body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaveRequest {
    pub outcome: LeaveOutcome,
    #[serde(default)]
    pub message: Option<String>,
}

/// `POST /v1/jobs/{id}/restart` body: an engine (or `effnet run`) saw the generation's workers
/// fail and ends the generation now instead of after the heartbeat timeout.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartRequest {
    pub reason: Option<String>,
    /// The engine will not relaunch (its workers failed on bad input): the job fails now.
    pub give_up: bool,
}

/// `POST`/`GET /v1/jobs/{id}/workers/{wid}/rendezvous`: the bytes rank 0 publishes for its
/// generation (NCCL's unique id), hex-encoded; `null` until published.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RendezvousBlob {
    pub blob: Option<String>,
}

/// The largest rendezvous blob, in bytes (NCCL's unique id is 128).
pub const RENDEZVOUS_LIMIT: usize = 4096;

/// One recorded step of a worker (`GET /v1/jobs/{id}/progress`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProgressRecord {
    pub at: f64,
    pub worker_id: String,
    pub generation: u32,
    pub rank: u32,
    pub step: u64,
    pub epoch: Option<f64>,
    pub images_per_s: Option<f64>,
    pub loss: Option<f64>,
}

/// Every error answer's body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jobs_start_from_the_command_line_flags() {
        let url = "s3://b/ckpt/step-00000100".to_string();
        assert_eq!(JobStart::from_flags(None, false), JobStart::Latest);
        assert_eq!(JobStart::from_flags(None, true), JobStart::Fresh);
        assert_eq!(JobStart::from_flags(Some(url.clone()), false), JobStart::Checkpoint { url });
        // As stored: tagged by `from`.
        let stored = serde_json::to_string(&JobStart::Fresh).unwrap();
        assert_eq!(stored, r#"{"from":"fresh"}"#);
        assert_eq!(serde_json::from_str::<JobStart>(&stored).unwrap(), JobStart::Fresh);
    }
}
