//! The checkpoint manager: decides once where a run starts, and saves the [`Stateful`]
//! components when a checkpoint is due, in the background, keeping the last and best k.
//!
//! Resume is decided once: by a coordinator for its generation (passed in as a URL or none), or
//! by rank 0 alone (the newest committed checkpoint; `--resume URL`; or none). Rank 0's choice
//! is broadcast; every rank then loads that same checkpoint (checksums verified), so ranks can
//! never start from different steps. A rank that cannot read it fails the job.

use std::collections::HashMap;

use bytes::Bytes;
use effnet_config::{CheckpointOnError, JobSpec};
use effnet_store::Redacted;
use serde_json::json;

use crate::checkpoint::{self, CheckpointStore, SaveStats};
use crate::error::{Error, Result};
use crate::metrics::MetricsLog;
use crate::state::{CheckpointContent, Stateful};
use crate::sync::DataParallel;

/// Where a run starts.
#[derive(Clone, Debug, PartialEq)]
pub enum ResumeFrom {
    /// The newest committed checkpoint of the job, or step 0 when there is none.
    Latest,
    /// Step 0, keeping the job's checkpoints: a coordinator found none to resume from.
    Scratch,
    /// One checkpoint directory by URL.
    Url(String),
    /// Step 0; the job's existing checkpoints are deleted first.
    Fresh,
}

/// A save in the background.
struct PendingSave {
    step: u64,
    /// Seconds it blocked the training thread.
    blocked: f64,
    /// The files' buffers, given back for the next save once it is done.
    files: Vec<Bytes>,
    task: tokio::task::JoinHandle<Result<(SaveStats, Vec<u64>)>>,
}

pub struct Checkpointer {
    url: String,
    /// Rank 0's handle on the store (other ranks write nothing). Opened on the first save when
    /// the local directory does not exist yet, so a rejected job creates nothing.
    store: Option<CheckpointStore>,
    writer: bool,
    every_steps: Option<u64>,
    at_epoch_end: bool,
    keep_last: usize,
    keep_best: usize,
    pending: Option<PendingSave>,
    on_error: CheckpointOnError,
    /// Saves finished so far in this run.
    pub saves: Vec<SaveStats>,
    /// Steps whose save failed (with `checkpoint.on_error: continue`).
    pub failed: Vec<u64>,
}

impl Checkpointer {
    pub fn from_config(spec: &JobSpec, writer: bool) -> Result<Checkpointer> {
        let url = spec.checkpoint_url();
        let store = if writer {
            checkpoint::existing(&url).map_err(|e| Error::invalid("checkpoint.url", e.to_string()))?
        } else {
            None
        };
        Ok(Checkpointer {
            url,
            store,
            writer,
            every_steps: spec.checkpoint.every_steps,
            at_epoch_end: spec.checkpoint.at_epoch_end,
            keep_last: spec.checkpoint.keep_last as usize,
            keep_best: spec.checkpoint.keep_best as usize,
            pending: None,
            on_error: spec.checkpoint.on_error,
            saves: Vec::new(),
            failed: Vec::new(),
        })
    }

    /// The checkpoint every rank starts from, chosen by rank 0, or `None` for step 0. With
    /// [`ResumeFrom::Fresh`] rank 0 deletes the job's checkpoints first.
    pub fn resume_point(
        &self,
        runtime: &tokio::runtime::Runtime,
        resume: &ResumeFrom,
        parallel: Option<&mut DataParallel>,
    ) -> Result<Option<CheckpointContent>> {
        let mut chosen: Option<(String, HashMap<String, Bytes>)> = None;
        if self.writer {
            chosen = match (resume, &self.store) {
                (ResumeFrom::Fresh | ResumeFrom::Scratch, _) | (ResumeFrom::Latest, None) => None,
                (ResumeFrom::Latest, Some(store)) => {
                    runtime.block_on(store.latest())?.map(|(committed, files)| (committed.url, files))
                }
                (ResumeFrom::Url(url), _) => {
                    Some((url.clone(), runtime.block_on(checkpoint::load_url(url))?.1))
                }
            };
            if *resume == ResumeFrom::Fresh
                && let Some(store) = &self.store
            {
                let committed = runtime.block_on(store.committed())?;
                if !committed.is_empty() {
                    tracing::warn!(url = %Redacted(&self.url), count = committed.len(), "--fresh: deleting the job's existing checkpoints");
                    runtime.block_on(store.purge(0, 0))?;
                }
            }
        }
        let (url, files) = match parallel {
            None => match chosen {
                Some(found) => found,
                None => return Ok(None),
            },
            Some(parallel) => {
                let url = chosen.as_ref().map(|(url, _)| url.clone()).unwrap_or_default();
                let url = String::from_utf8(parallel.broadcast_bytes(url.as_bytes())?)
                    .map_err(|e| Error::Internal(format!("the resume URL from rank 0: {e}")))?;
                if url.is_empty() {
                    return Ok(None);
                }
                match chosen {
                    Some(found) => found,
                    // Every other rank reads rank 0's choice itself and verifies its checksums.
                    None => {
                        let files = runtime.block_on(checkpoint::load_url(&url)).map_err(|e| {
                            Error::Internal(format!("cannot read the checkpoint rank 0 resumes from: {e}"))
                        })?;
                        (url, files.1)
                    }
                }
            }
        };
        CheckpointContent::from_files(&url, files).map(Some)
    }

    /// Fail now, not at the first checkpoint an hour in, when the checkpoint location refuses
    /// writes (denied, read-only, full): that is the job's configuration, exit status 2. Rank 0
    /// (the writer) only; called once the resume is settled, so a refused resume writes nothing.
    pub fn check_writable(&self, runtime: &tokio::runtime::Runtime) -> Result<()> {
        if !self.writer {
            return Ok(());
        }
        let store = match &self.store {
            Some(store) => store.clone(),
            None => CheckpointStore::new(
                effnet_store::open(&self.url).map_err(|e| Error::invalid("checkpoint.url", e.to_string()))?,
            ),
        };
        runtime.block_on(store.check_writable()).map_err(|error| {
            let refused =
                effnet_store::retrying::io_kind(&error).is_some_and(effnet_store::retrying::is_refusal);
            if refused {
                Error::invalid(
                    "checkpoint.url",
                    format!("'{}' cannot be written: {error}", Redacted(&self.url)),
                )
            } else {
                error.into()
            }
        })
    }

    /// A checkpoint is due after this step.
    pub fn due(&self, step: u64, epoch_ended: bool, last: bool) -> bool {
        self.every_steps.is_some_and(|every| step.is_multiple_of(every))
            || (self.at_epoch_end && epoch_ended)
            || last
    }

    /// The files of a checkpoint of `components`.
    pub fn assemble(components: &[&dyn Stateful]) -> Result<Vec<(String, Bytes)>> {
        let mut content = CheckpointContent::default();
        for component in components {
            component.save(&mut content)?;
        }
        content.into_files()
    }

    /// Save `files` (see [`Checkpointer::assemble`]) as the checkpoint of `step` in the
    /// background (rank 0; others return). At most one save is in flight: the previous one is
    /// waited for first. `begun` is when the training thread started on this checkpoint: the
    /// time from then until the save is handed over is logged as its `blocked_s`.
    pub fn save(
        &mut self,
        runtime: &tokio::runtime::Runtime,
        step: u64,
        metric: Option<f64>,
        files: Vec<(String, Bytes)>,
        begun: std::time::Instant,
        metrics: &mut MetricsLog,
    ) -> Result<()> {
        if !self.writer {
            return Ok(());
        }
        if let Some(previous) = self.pending.take() {
            self.finish_one(runtime, previous, metrics)?;
        }
        let store = match &self.store {
            Some(store) => store.clone(),
            None => {
                let store = CheckpointStore::new(
                    effnet_store::open(&self.url)
                        .map_err(|e| Error::invalid("checkpoint.url", e.to_string()))?,
                );
                self.store = Some(store.clone());
                store
            }
        };
        let (keep_last, keep_best) = (self.keep_last, self.keep_best);
        let kept = files.iter().map(|(_, content)| content.clone()).collect();
        let task = runtime.spawn(async move {
            let stats = store.save(step, metric, files).await?;
            let deleted = store.purge(keep_last, keep_best).await?;
            return_freed_memory();
            Ok((stats, deleted))
        });
        self.pending = Some(PendingSave { step, blocked: begun.elapsed().as_secs_f64(), files: kept, task });
        Ok(())
    }

    /// Log a save that finished in the background now, not when the next one starts: a run
    /// killed before then still has its checkpoint in the log.
    pub fn poll(&mut self, runtime: &tokio::runtime::Runtime, metrics: &mut MetricsLog) -> Result<()> {
        if self.pending.as_ref().is_some_and(|save| save.task.is_finished())
            && let Some(done) = self.pending.take()
        {
            self.finish_one(runtime, done, metrics)?;
        }
        Ok(())
    }

    /// Whether a save is running in the background.
    pub fn saving(&self) -> bool {
        self.pending.as_ref().is_some_and(|save| !save.task.is_finished())
    }

    /// Wait for the save in flight.
    pub fn finish(&mut self, runtime: &tokio::runtime::Runtime, metrics: &mut MetricsLog) -> Result<()> {
        if let Some(previous) = self.pending.take() {
            self.finish_one(runtime, previous, metrics)?;
        }
        Ok(())
    }

    /// The URL of the checkpoint of `step`.
    pub fn url_of(&self, step: u64) -> String {
        checkpoint::step_url(&self.url, step)
    }

    fn finish_one(
        &mut self,
        runtime: &tokio::runtime::Runtime,
        save: PendingSave,
        metrics: &mut MetricsLog,
    ) -> Result<()> {
        let PendingSave { step, blocked, files, task } = save;
        let saved = runtime
            .block_on(task)
            .map_err(|e| Error::Internal(format!("checkpoint task failed: {e}")))
            .and_then(|saved| saved);
        crate::tensors::recycle(files);
        let (stats, deleted) = match saved {
            Ok(saved) => saved,
            Err(error) => {
                let url = effnet_store::redact(&self.url_of(step));
                let newest =
                    self.saves.last().map_or("none in this run".to_string(), |s| format!("step {}", s.step));
                let reason = error.to_string();
                if self.on_error == CheckpointOnError::Stop {
                    return Err(Error::CheckpointFailed { url, reason, newest });
                }
                tracing::warn!(%url, %reason, "checkpoint failed; training goes on (checkpoint.on_error: continue)");
                metrics.write("checkpoint_failed", json!({ "step": step, "url": url, "error": reason }))?;
                self.failed.push(step);
                return Ok(());
            }
        };
        metrics.write(
            "checkpoint",
            json!({
                "step": stats.step,
                "bytes": stats.bytes,
                "save_s": stats.seconds,
                "blocked_s": blocked,
                "purged": deleted,
            }),
        )?;
        self.saves.push(stats);
        Ok(())
    }
}

/// Give the pages of freed allocations back to the system, from every malloc arena. A save's
/// threads (hashing and flushing each file, the store's I/O) allocate in their own arenas, and
/// glibc keeps what they free; with new threads every save (one hashing and one flushing each
/// file) the checkpointing rank's resident memory crept up by ~45 MiB over 1,400 steps of the
/// soak's job, and stayed flat with one arena (`MALLOC_ARENA_MAX=1`) or this after each save.
/// It takes 1–2 ms after a small model's save and 10–40 ms after a B7 state's, on the save's
/// thread, not the training thread.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory the allocator holds; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}
