//! Fault injection for the reliability tests (docs/reliability.md). Nothing here runs unless the
//! environment asks for it; a production run never sets these variables.
//!
//! - **Process faults**, `EFFNET_FAULT=ACTION@PHASE:STEP[:RANK]`: the process sends itself
//!   `SIGKILL` (`kill`) or `SIGSTOP` (`stop`) when it reaches `PHASE` of step `STEP` (1-based, the
//!   step being trained; the checkpoint's step for `checkpoint-upload`), on rank `RANK` only when
//!   given. Phases: [`Phase`]. The training code calls [`point`] at each phase; the test that
//!   sets the variable relaunches without it.
//! - **Store faults**, `EFFNET_STORE_FAULTS=seed=S,error=P,throttle=P,timeout=P,truncate=P,slow=P[,writes]`:
//!   every store [`crate::open`] returns is wrapped in a [`FaultyStore`] that fails requests with
//!   those probabilities (seeded, so a run's faults repeat), on reads and, with `writes`, on
//!   writes too. [`crate::retrying::RetryingStore`] sits above it, as it sits above every store.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};

use crate::{Error, Result};

/// The variable naming a process fault.
pub const PROCESS_FAULT_VAR: &str = "EFFNET_FAULT";
/// The variable configuring store faults.
pub const STORE_FAULTS_VAR: &str = "EFFNET_STORE_FAULTS";

/// Where in a worker's life a process fault can strike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the step's batches from the loader.
    DataRead,
    /// Before the forward pass of the step's first micro-batch.
    Forward,
    /// Before the backward pass of the step's last micro-batch.
    Backward,
    /// Before the ranks sum the step's counts and gradients.
    AllReduce,
    /// During a checkpoint's upload: after its first file, before its commit marker.
    CheckpointUpload,
    /// After joining a generation, before the collective of its ranks is formed.
    Rendezvous,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::DataRead,
        Phase::Forward,
        Phase::Backward,
        Phase::AllReduce,
        Phase::CheckpointUpload,
        Phase::Rendezvous,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::DataRead => "data-read",
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::AllReduce => "all-reduce",
            Phase::CheckpointUpload => "checkpoint-upload",
            Phase::Rendezvous => "rendezvous",
        }
    }
}

/// What a process fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Kill,
    Stop,
}

/// A parsed `EFFNET_FAULT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessFault {
    pub action: Action,
    pub phase: Phase,
    pub step: u64,
    pub rank: Option<usize>,
}

impl ProcessFault {
    /// Parse `ACTION@PHASE:STEP[:RANK]`.
    ///
    /// ```
    /// use effnet_store::faults::{Action, Phase, ProcessFault};
    /// let fault = ProcessFault::parse("kill@all-reduce:12:1").unwrap();
    /// assert_eq!(fault, ProcessFault { action: Action::Kill, phase: Phase::AllReduce, step: 12, rank: Some(1) });
    /// assert!(ProcessFault::parse("kill@lunch:3").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<ProcessFault> {
        let invalid = |reason: &str| Error::InvalidOption {
            name: PROCESS_FAULT_VAR.into(),
            reason: format!(
                "'{text}': {reason} (expected ACTION@PHASE:STEP[:RANK], e.g. kill@backward:12:1)"
            ),
        };
        let (action, rest) = text.trim().split_once('@').ok_or_else(|| invalid("no '@'"))?;
        let action = match action {
            "kill" => Action::Kill,
            "stop" => Action::Stop,
            _ => return Err(invalid("the action is kill or stop")),
        };
        let mut parts = rest.split(':');
        let phase = parts.next().unwrap_or_default();
        let phase =
            Phase::ALL.into_iter().find(|p| p.name() == phase).ok_or_else(|| invalid("unknown phase"))?;
        let step = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| invalid("no step number"))?;
        let rank = match parts.next() {
            Some(rank) => Some(rank.parse().map_err(|_| invalid("the rank is not a number"))?),
            None => None,
        };
        if parts.next().is_some() {
            return Err(invalid("too many fields"));
        }
        Ok(ProcessFault { action, phase, step, rank })
    }

    /// The process fault of this process's environment, parsed once.
    pub fn from_env() -> Option<ProcessFault> {
        static FAULT: std::sync::OnceLock<Option<ProcessFault>> = std::sync::OnceLock::new();
        *FAULT.get_or_init(|| {
            let text = std::env::var(PROCESS_FAULT_VAR).ok()?;
            match ProcessFault::parse(&text) {
                Ok(fault) => Some(fault),
                Err(error) => {
                    eprintln!("error: {error}; no fault is injected");
                    None
                }
            }
        })
    }
}

/// A fault point: when `EFFNET_FAULT` names this phase, step and rank, the process kills or
/// stops itself here. A no-op otherwise (one load of a parsed-once value).
pub fn point(phase: Phase, step: u64, rank: Option<usize>) {
    let Some(fault) = ProcessFault::from_env() else { return };
    if fault.phase != phase || fault.step != step {
        return;
    }
    if let (Some(wanted), Some(rank)) = (fault.rank, rank)
        && wanted != rank
    {
        return;
    }
    let signal = match fault.action {
        Action::Kill => libc::SIGKILL,
        Action::Stop => libc::SIGSTOP,
    };
    eprintln!(
        "fault injected: {:?} at {} of step {step} (rank {})",
        fault.action,
        phase.name(),
        rank.map_or("-".to_string(), |r| r.to_string())
    );
    // SAFETY: kill(2) on this process with a valid signal number has no memory effects.
    unsafe {
        libc::kill(libc::getpid(), signal);
    }
}

/// Probabilities of each store fault per request, and the seed that makes them repeat.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultPlan {
    pub seed: u64,
    /// A 503 Service Unavailable.
    pub error: f64,
    /// A 429 / SlowDown.
    pub throttle: f64,
    /// The request hangs for `timeout` and then fails; on writes the object may have been written
    /// (the answer was lost), as with a real timeout.
    pub timeout: f64,
    /// A read's body stops half way with a connection error; a write stores half the object and
    /// fails.
    pub truncate: f64,
    /// The request succeeds after `slow`.
    pub slow: f64,
    /// Inject into writes (put, multipart, delete) as well as reads.
    pub writes: bool,
    pub timeout_after: Duration,
    pub slow_by: Duration,
}

impl FaultPlan {
    /// Parse `EFFNET_STORE_FAULTS`'s `key=value,...` form.
    ///
    /// ```
    /// use effnet_store::faults::FaultPlan;
    /// let plan = FaultPlan::parse("seed=7,error=0.05,truncate=0.1,writes").unwrap();
    /// assert_eq!((plan.seed, plan.error, plan.truncate, plan.writes), (7, 0.05, 0.1, true));
    /// assert!(FaultPlan::parse("error=2").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<FaultPlan> {
        let invalid = |reason: String| Error::InvalidOption { name: STORE_FAULTS_VAR.into(), reason };
        let mut plan = FaultPlan {
            timeout_after: Duration::from_millis(300),
            slow_by: Duration::from_millis(150),
            ..FaultPlan::default()
        };
        for field in text.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            if field == "writes" {
                plan.writes = true;
                continue;
            }
            let (key, value) =
                field.split_once('=').ok_or_else(|| invalid(format!("'{field}' is not key=value")))?;
            let number =
                |v: &str| v.parse::<f64>().map_err(|_| invalid(format!("{key}: '{v}' is not a number")));
            let probability = |v: &str| -> Result<f64> {
                let p = number(v)?;
                if (0.0..=1.0).contains(&p) {
                    Ok(p)
                } else {
                    Err(invalid(format!("{key}: {p} is not a probability in [0, 1]")))
                }
            };
            match key {
                "seed" => plan.seed = value.parse().map_err(|_| invalid(format!("seed: '{value}'")))?,
                "error" => plan.error = probability(value)?,
                "throttle" => plan.throttle = probability(value)?,
                "timeout" => plan.timeout = probability(value)?,
                "truncate" => plan.truncate = probability(value)?,
                "slow" => plan.slow = probability(value)?,
                "timeout_ms" => plan.timeout_after = Duration::from_secs_f64(number(value)?.max(0.0) / 1e3),
                "slow_ms" => plan.slow_by = Duration::from_secs_f64(number(value)?.max(0.0) / 1e3),
                _ => return Err(invalid(format!("unknown key '{key}'"))),
            }
        }
        let total = plan.error + plan.throttle + plan.timeout + plan.truncate + plan.slow;
        if total > 1.0 {
            return Err(invalid(format!("the probabilities add up to {total:.2}, more than 1")));
        }
        Ok(plan)
    }

    /// `EFFNET_STORE_FAULTS`, when set.
    pub fn from_env() -> Result<Option<FaultPlan>> {
        match std::env::var(STORE_FAULTS_VAR) {
            Ok(text) if !text.trim().is_empty() => FaultPlan::parse(&text).map(Some),
            _ => Ok(None),
        }
    }
}

/// One injected fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Error,
    Throttle,
    Timeout,
    Truncate,
    Slow,
}

/// How many faults of each kind a [`FaultyStore`] injected, and how many requests it saw.
#[derive(Debug, Default)]
pub struct FaultCounts {
    pub requests: AtomicU64,
    pub error: AtomicU64,
    pub throttle: AtomicU64,
    pub timeout: AtomicU64,
    pub truncate: AtomicU64,
    pub slow: AtomicU64,
}

impl FaultCounts {
    /// Faults that failed a request (slow ones do not).
    pub fn failures(&self) -> u64 {
        [&self.error, &self.throttle, &self.timeout, &self.truncate]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    fn count(&self, fault: Fault) {
        let counter = match fault {
            Fault::Error => &self.error,
            Fault::Throttle => &self.throttle,
            Fault::Timeout => &self.timeout,
            Fault::Truncate => &self.truncate,
            Fault::Slow => &self.slow,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A store that injects the faults of a [`FaultPlan`] into the requests it passes to `inner`.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    plan: FaultPlan,
    state: Mutex<u64>,
    pub counts: Arc<FaultCounts>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>, plan: FaultPlan) -> FaultyStore {
        // Never zero: xorshift stays at zero forever.
        let state = Mutex::new(plan.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        FaultyStore { inner, plan, state, counts: Arc::default() }
    }

    /// The fault for the next request (None: pass it through), drawn from the seeded sequence.
    fn draw(&self, write: bool) -> Option<Fault> {
        self.counts.requests.fetch_add(1, Ordering::Relaxed);
        if write && !self.plan.writes {
            return None;
        }
        let uniform = {
            let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            (*state >> 11) as f64 / (1u64 << 53) as f64
        };
        let plan = &self.plan;
        let mut edge = 0.0;
        for (probability, fault) in [
            (plan.error, Fault::Error),
            (plan.throttle, Fault::Throttle),
            (plan.timeout, Fault::Timeout),
            (plan.truncate, Fault::Truncate),
            (plan.slow, Fault::Slow),
        ] {
            edge += probability;
            if uniform < edge {
                self.counts.count(fault);
                return Some(fault);
            }
        }
        None
    }

    fn failure(&self, fault: Fault, what: &str, path: &Path) -> object_store::Error {
        let message = match fault {
            Fault::Error => "503 Service Unavailable",
            Fault::Throttle => "429 SlowDown: please reduce your request rate",
            Fault::Timeout => "operation timed out",
            Fault::Truncate => "connection reset while transferring the body",
            Fault::Slow => "slow",
        };
        object_store::Error::Generic {
            store: "faults",
            source: format!("injected fault on {what} {path}: {message}").into(),
        }
    }

    /// Delay and fail for the faults that fail before any byte moves; `Ok(fault)` for the rest.
    async fn before(&self, write: bool, what: &str, path: &Path) -> object_store::Result<Option<Fault>> {
        match self.draw(write) {
            Some(fault @ (Fault::Error | Fault::Throttle)) => Err(self.failure(fault, what, path)),
            Some(Fault::Timeout) if !write => {
                crate::retrying::sleep(self.plan.timeout_after).await;
                Err(self.failure(Fault::Timeout, what, path))
            }
            Some(Fault::Slow) => {
                crate::retrying::sleep(self.plan.slow_by).await;
                Ok(None)
            }
            other => Ok(other),
        }
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        match self.before(true, "put", location).await? {
            Some(Fault::Timeout) => {
                // The write lands, the answer is lost.
                self.inner.put_opts(location, payload, opts).await?;
                crate::retrying::sleep(self.plan.timeout_after).await;
                Err(self.failure(Fault::Timeout, "put", location))
            }
            Some(Fault::Truncate) => {
                let bytes: Bytes = payload.into();
                let half = bytes.slice(..bytes.len() / 2);
                self.inner.put_opts(location, PutPayload::from_bytes(half), opts).await?;
                Err(self.failure(Fault::Truncate, "put", location))
            }
            _ => self.inner.put_opts(location, payload, opts).await,
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        if let Some(fault) = self.before(true, "multipart upload", location).await? {
            return Err(self.failure(fault, "multipart upload", location));
        }
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        let fault = self.before(false, "get", location).await?;
        let result = self.inner.get_opts(location, options).await?;
        if fault != Some(Fault::Truncate) || result.range.end - result.range.start < 2 {
            return Ok(result);
        }
        // Half the body, then a connection error, as when a connection drops mid-transfer.
        let (meta, range, attributes, extensions) =
            (result.meta.clone(), result.range.clone(), result.attributes.clone(), result.extensions.clone());
        let whole = result.bytes().await?;
        let half = whole.slice(..whole.len() / 2);
        let error = self.failure(Fault::Truncate, "get", location);
        let stream = futures::stream::iter([Ok(half), Err(error)]).boxed();
        Ok(GetResult { payload: GetResultPayload::Stream(stream), meta, range, attributes, extensions })
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        match self.before(false, "get ranges", location).await? {
            Some(Fault::Truncate) => Err(self.failure(Fault::Truncate, "get ranges", location)),
            _ => self.inner.get_ranges(location, ranges).await,
        }
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let path = prefix.cloned().unwrap_or_default();
        match self.draw(false) {
            Some(fault @ (Fault::Error | Fault::Throttle | Fault::Timeout | Fault::Truncate)) => {
                futures::stream::iter([Err(self.failure(fault, "list", &path))]).boxed()
            }
            _ => self.inner.list(prefix),
        }
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let path = prefix.cloned().unwrap_or_default();
        if let Some(fault) = self.before(false, "list", &path).await? {
            return Err(self.failure(fault, "list", &path));
        }
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        if let Some(fault) = self.before(true, "copy", to).await? {
            return Err(self.failure(fault, "copy", to));
        }
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> object_store::Result<()> {
        if let Some(fault) = self.before(true, "rename", to).await? {
            return Err(self.failure(fault, "rename", to));
        }
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_faults_in_the_stated_proportions() {
        let plan = FaultPlan::parse("seed=3,error=0.1,throttle=0.1,truncate=0.2").unwrap();
        let draws = |plan: &FaultPlan| {
            let store = FaultyStore::new(Arc::new(object_store::memory::InMemory::new()), plan.clone());
            (0..10_000).map(|_| store.draw(false)).collect::<Vec<_>>()
        };
        let first = draws(&plan);
        assert_eq!(first, draws(&plan));
        let share = |fault| first.iter().filter(|f| **f == Some(fault)).count() as f64 / 1e4;
        assert!((share(Fault::Error) - 0.1).abs() < 0.015, "{}", share(Fault::Error));
        assert!((share(Fault::Truncate) - 0.2).abs() < 0.02, "{}", share(Fault::Truncate));
        assert_eq!(share(Fault::Slow), 0.0);
        let other = draws(&FaultPlan { seed: 4, ..plan });
        assert_ne!(first, other);
    }

    #[test]
    fn bad_plans_and_faults_are_refused_with_the_reason() {
        let error = FaultPlan::parse("error=0.7,throttle=0.6").unwrap_err().to_string();
        assert!(error.contains("add up to 1.30"), "{error}");
        let error = FaultPlan::parse("fire=0.1").unwrap_err().to_string();
        assert!(error.contains("unknown key 'fire'"), "{error}");
        let error = ProcessFault::parse("kill@forward").unwrap_err().to_string();
        assert!(error.contains("no step number"), "{error}");
        assert_eq!(
            ProcessFault::parse("stop@checkpoint-upload:40").unwrap(),
            ProcessFault { action: Action::Stop, phase: Phase::CheckpointUpload, step: 40, rank: None }
        );
    }
}
