//! Dealing a generation: where it starts and which rows each of its ranks reads.
//!
//! Once per generation, at its first assignment request, the coordinator reads the job's
//! checkpoint store itself: the newest committed checkpoint (its `COMMIT` and `state.json`,
//! checked against their sizes and checksums; the weights are not read), at least the newest one
//! a worker reported, so a checkpoint committed just before a crash, whose report never arrived,
//! is not lost. From its data cursor the rest of the epoch is re-dealt to the generation's world
//! (effnet-data's re-dealing: exactly once at any world size). The deal is stored with the
//! generation, so every rank, and a coordinator restarted mid-generation, hands out the same one.
//!
//! New epochs' plans come from here too ([`epoch_plan`]): the dataset's manifest, read once per
//! job, dealt by `EpochPlan::new` for the generation's world.

use effnet_config::JobSpec;
use effnet_data::{DataCursor, EpochPlan, RowGroupRef};

use crate::error::{Error, Result};
use crate::protocol::{CheckpointReport, Deal, JobStart, StartPoint};

/// The start and data of a generation of `world_size` ranks of the job `spec`.
pub(crate) async fn deal(
    spec: &JobSpec,
    start: &JobStart,
    reported: Option<&CheckpointReport>,
    world_size: usize,
) -> Result<Deal> {
    let chosen = match (reported, start) {
        // Until the job has committed a checkpoint of its own, its start is what was submitted.
        (None, JobStart::Fresh) => return Ok(Deal { start: StartPoint::Fresh, data: None }),
        (None, JobStart::Checkpoint { url }) => {
            let (commit, state) = effnet_checkpoint::state_at_url(url).await.map_err(checkpoint_error)?;
            Some((commit.step, url.clone(), state))
        }
        (reported, _) => {
            let url = spec.checkpoint_url();
            let store = effnet_checkpoint::existing(&url).map_err(checkpoint_error)?;
            let newest = match store {
                Some(store) => store.newest_state().await.map_err(checkpoint_error)?,
                None => None,
            };
            match (newest, reported) {
                (Some((committed, _)), Some(reported)) if committed.step < reported.step => {
                    return Err(lost(&url, reported, &format!("step {}", committed.step)));
                }
                (None, Some(reported)) => return Err(lost(&url, reported, "none")),
                (Some((committed, state)), _) => Some((committed.step, committed.url, state)),
                (None, None) => None,
            }
        }
    };
    let Some((step, url, state)) = chosen else {
        return Ok(Deal { start: StartPoint::Scratch, data: None });
    };
    let data = match saved_cursor(&url, &state)? {
        Some(saved) => {
            let (plan, ranks) = saved.resume(world_size).map_err(|error| Error::Unprocessable {
                message: format!("checkpoint {url}: its data cursor cannot be re-dealt: {error}"),
            })?;
            Some(DataCursor { plan, ranks })
        }
        None => None,
    };
    Ok(Deal { start: StartPoint::Checkpoint { step, url }, data })
}

fn lost(url: &str, reported: &CheckpointReport, found: &str) -> Error {
    Error::Unprocessable {
        message: format!(
            "a worker of this job committed checkpoint step {} ({}), but the newest usable committed checkpoint in {url} is {found}: \
             the checkpoint store lost it",
            reported.step, reported.url
        ),
    }
}

/// The `data` entry of a checkpoint's `state.json` (`None` at an epoch's end).
fn saved_cursor(url: &str, state: &[u8]) -> Result<Option<DataCursor>> {
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        data: Option<DataCursor>,
    }
    let entry: Entry = serde_json::from_slice(state).map_err(|error| Error::Unprocessable {
        message: format!(
            "checkpoint {url}: its {} has no readable data cursor: {error}",
            effnet_checkpoint::STATE_FILE
        ),
    })?;
    if let Some(cursor) = &entry.data {
        cursor
            .validate()
            .map_err(|error| Error::Unprocessable { message: format!("checkpoint {url}: {error}") })?;
    }
    Ok(entry.data)
}

/// The row groups of the job's training data, from its manifest.
pub(crate) async fn row_groups(spec: &JobSpec) -> Result<Vec<RowGroupRef>> {
    let dataset = effnet_data::reader::Dataset::open(&spec.data.train).await.map_err(|error| {
        let message = format!("data.train: {error}");
        if error.is_bad_input() { Error::Unprocessable { message } } else { Error::Unavailable { message } }
    })?;
    Ok(dataset.row_groups().to_vec())
}

/// Epoch `epoch`'s plan for a generation of `world_size` ranks.
pub(crate) fn epoch_plan(
    spec: &JobSpec,
    row_groups: &[RowGroupRef],
    epoch: u64,
    world_size: usize,
) -> Result<EpochPlan> {
    EpochPlan::new(spec.seed, epoch, row_groups, world_size)
        .map_err(|error| Error::Unprocessable { message: format!("epoch {epoch}'s plan: {error}") })
}

/// A checkpoint that cannot be used is the job's problem (422); a store that cannot be reached
/// may come back (503, the worker asks again).
fn checkpoint_error(error: effnet_checkpoint::Error) -> Error {
    let message = error.to_string();
    if error.is_bad_input() { Error::Unprocessable { message } } else { Error::Unavailable { message } }
}
