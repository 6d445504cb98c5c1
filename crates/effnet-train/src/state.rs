//! What a checkpoint holds, and the one trait through which every component with state saves and
//! restores it.
//!
//! A checkpoint is a set of files (`model.safetensors`, `optimizer.safetensors`,
//! `ema.safetensors`) plus `state.json`, one JSON object whose keys belong to the components:
//!
//! | component | files | `state.json` keys |
//! |---|---|---|
//! | [`crate::network::Network`] | `model.safetensors` | `model` (architecture, classes, parameters) |
//! | [`crate::optim::Optimizer`] | `optimizer.safetensors` | `optimizer_steps` |
//! | [`crate::network::Averaged`] (EMA) | `ema.safetensors` | `ema_updates` |
//! | [`crate::progress::TrainProgress`] | | `step`, `epoch`, `samples_seen`, `samples_consumed`, `val`, `val_ema` |
//! | [`crate::feed::Feed`] (data cursor) | | `data` |
//! | [`RunIdentity`] (seed, spec, world) | | `format`, `seed`, `config_hash`, `world_size`, `spec` |
//!
//! The learning rate, drop-path multiplier and libtorch's generator are functions of the progress
//! (the generator is reseeded from (seed, step) before every forward pass), so they need no entry.
//! [`TrainState`] is the typed view of the whole `state.json` for readers such as `effnet eval`.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use effnet_config::JobSpec;
use effnet_data::DataCursor;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::evaluate::EvalMetrics;

pub use effnet_checkpoint::STATE_FILE;
pub const STATE_FORMAT: u32 = 1;

/// A component whose state goes into checkpoints.
pub trait Stateful {
    /// Add this component's files and `state.json` entries.
    fn save(&self, checkpoint: &mut CheckpointContent) -> Result<()>;
    /// Restore from a checkpoint, after checking that it fits this job; an unfit checkpoint is
    /// an error naming it.
    fn load(&mut self, checkpoint: &CheckpointContent) -> Result<()>;
}

/// A checkpoint's content on its way to or from the store: named files and `state.json`'s keys.
#[derive(Clone, Debug, Default)]
pub struct CheckpointContent {
    /// Where it was loaded from (empty while being assembled for a save).
    pub url: String,
    files: BTreeMap<String, Bytes>,
    state: serde_json::Map<String, Value>,
}

impl CheckpointContent {
    /// The files of a loaded checkpoint; `state.json` must be present, parseable and of this format.
    pub fn from_files(url: &str, mut files: HashMap<String, Bytes>) -> Result<CheckpointContent> {
        let damaged = |reason: String| Error::BadCheckpoint { url: url.to_string(), reason };
        let bytes = files.remove(STATE_FILE).ok_or_else(|| damaged(format!("{STATE_FILE} is missing")))?;
        let state: serde_json::Map<String, Value> =
            serde_json::from_slice(&bytes).map_err(|e| damaged(format!("unreadable {STATE_FILE}: {e}")))?;
        let format = state.get("format").and_then(Value::as_u64);
        if format != Some(STATE_FORMAT as u64) {
            return Err(Error::IncompatibleCheckpoint {
                url: url.to_string(),
                reason: format!(
                    "state format {} (this build reads {STATE_FORMAT})",
                    format.map_or("missing".to_string(), |f| f.to_string())
                ),
            });
        }
        Ok(CheckpointContent { url: url.to_string(), files: files.into_iter().collect(), state })
    }

    pub fn put_file(&mut self, name: &str, bytes: Vec<u8>) {
        self.files.insert(name.to_string(), Bytes::from(bytes));
    }

    pub fn file(&self, name: &str) -> Result<&Bytes> {
        self.files.get(name).ok_or_else(|| self.damaged(format!("{name} is missing")))
    }

    pub fn has_file(&self, name: &str) -> bool {
        self.files.contains_key(name)
    }

    pub fn set(&mut self, key: &str, value: impl Serialize) -> Result<()> {
        let value = serde_json::to_value(value).map_err(|e| Error::Internal(format!("state {key}: {e}")))?;
        self.state.insert(key.to_string(), value);
        Ok(())
    }

    /// A required `state.json` entry.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<T> {
        self.get_optional(key)?.ok_or_else(|| self.damaged(format!("{STATE_FILE} has no {key}")))
    }

    /// An entry that older checkpoints may lack (absent or null: `None`).
    pub fn get_optional<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.state.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => T::deserialize(value)
                .map(Some)
                .map_err(|e| self.damaged(format!("{STATE_FILE}: unreadable {key}: {e}"))),
        }
    }

    /// The whole `state.json` as a typed view.
    pub fn train_state(&self) -> Result<TrainState> {
        TrainState::deserialize(Value::Object(self.state.clone()))
            .map_err(|e| self.damaged(format!("unreadable {STATE_FILE}: {e}")))
    }

    /// The files to write, `state.json` included.
    pub fn into_files(mut self) -> Result<Vec<(String, Bytes)>> {
        self.state.insert("format".into(), Value::from(STATE_FORMAT));
        let state = serde_json::to_vec_pretty(&Value::Object(self.state))
            .map_err(|e| Error::Internal(format!("{STATE_FILE}: {e}")))?;
        let mut files: Vec<(String, Bytes)> = self.files.into_iter().collect();
        files.push((STATE_FILE.to_string(), Bytes::from(state)));
        Ok(files)
    }

    fn damaged(&self, reason: String) -> Error {
        Error::BadCheckpoint { url: self.url.clone(), reason }
    }
}

/// What identifies a model's tensors: a checkpoint of another identity cannot be loaded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    pub architecture: String,
    pub classes: u32,
    pub input_channels: u32,
    pub parameters: i64,
}

/// `state.json` as a whole (every component's keys), for readers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainState {
    pub format: u32,
    pub step: u64,
    pub epoch: u64,
    pub samples_seen: u64,
    /// Samples of the plan consumed (trained or skipped) since the job started; absent in
    /// checkpoints written before it was added.
    #[serde(default)]
    pub samples_consumed: Option<u64>,
    pub data: Option<DataCursor>,
    pub seed: u64,
    pub model: ModelIdentity,
    pub config_hash: String,
    pub optimizer_steps: u64,
    pub ema_updates: Option<u64>,
    pub world_size: u32,
    pub val: Option<EvalMetrics>,
    pub val_ema: Option<EvalMetrics>,
    /// The job spec the checkpoint was trained with, so it can be evaluated on its own
    /// (absent in checkpoints written before it was added).
    #[serde(default)]
    pub spec: Option<JobSpec>,
}

/// The job a checkpoint belongs to: its seed, spec (so `effnet eval` can rebuild the model and
/// transform) and the world size that wrote it.
pub struct RunIdentity {
    pub seed: u64,
    pub spec: JobSpec,
    pub config_hash: String,
    pub world_size: u32,
    /// Set by [`Stateful::load`]: the world size of the restored checkpoint.
    pub restored_world_size: Option<u32>,
    /// Set by [`Stateful::load`]: the restored checkpoint's seed and whether its spec differs.
    pub restored_seed: Option<u64>,
    pub spec_changed: bool,
}

impl RunIdentity {
    pub fn new(spec: &JobSpec, world_size: usize) -> Result<RunIdentity> {
        // Hashed redacted, like the copy saved: new credentials for the same data are not a
        // change of the job.
        let redacted = effnet_store::redacted_json(spec).map_err(|e| Error::Internal(e.to_string()))?;
        let bytes = serde_json::to_vec(&redacted).map_err(|e| Error::Internal(e.to_string()))?;
        Ok(RunIdentity {
            seed: spec.seed,
            spec: spec.clone(),
            config_hash: crate::checkpoint::sha256_hex(&bytes)[..16].to_string(),
            world_size: world_size as u32,
            restored_world_size: None,
            restored_seed: None,
            spec_changed: false,
        })
    }
}

impl Stateful for RunIdentity {
    fn save(&self, checkpoint: &mut CheckpointContent) -> Result<()> {
        checkpoint.set("seed", self.seed)?;
        checkpoint.set("config_hash", &self.config_hash)?;
        checkpoint.set("world_size", self.world_size)?;
        // state.json is read by people and by `effnet eval` (the model and transform, never the
        // data URLs): the spec is saved with its credentials redacted.
        let spec = effnet_store::redacted_json(&self.spec).map_err(|e| Error::Internal(e.to_string()))?;
        checkpoint.set("spec", spec)
    }

    /// Records what differs (the trainer warns about it once the whole checkpoint has loaded):
    /// a changed spec or seed is allowed, the saved cursor keeps its epoch's order.
    fn load(&mut self, checkpoint: &CheckpointContent) -> Result<()> {
        self.restored_seed = Some(checkpoint.get("seed")?);
        self.spec_changed = checkpoint.get::<String>("config_hash")? != self.config_hash;
        self.restored_world_size = Some(checkpoint.get("world_size")?);
        Ok(())
    }
}

/// Read a loaded checkpoint's `state.json` (present, parseable, of this format) as a whole.
pub fn read_state(url: &str, files: HashMap<String, Bytes>) -> Result<TrainState> {
    CheckpointContent::from_files(url, files)?.train_state()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_missing_ones_name_themselves() {
        let mut content = CheckpointContent::default();
        content.set("step", 12u64).unwrap();
        content.set("val", Option::<u64>::None).unwrap();
        content.put_file("model.safetensors", vec![1, 2, 3]);
        let files: HashMap<String, Bytes> = content.into_files().unwrap().into_iter().collect();
        let state: Value = serde_json::from_slice(&files[STATE_FILE]).unwrap();
        assert_eq!(state["format"], STATE_FORMAT);
        let loaded = CheckpointContent::from_files("mem://c", files).unwrap();
        assert_eq!(loaded.get::<u64>("step").unwrap(), 12);
        assert_eq!(loaded.get_optional::<u64>("val").unwrap(), None);
        assert_eq!(loaded.file("model.safetensors").unwrap().as_ref(), &[1, 2, 3]);
        let missing = loaded.get::<u64>("epoch").unwrap_err().to_string();
        assert_eq!(missing, "checkpoint mem://c: state.json has no epoch");
        let wrong = loaded.get::<String>("step").unwrap_err().to_string();
        assert!(wrong.contains("unreadable step"), "{wrong}");
        assert!(loaded.file("optimizer.safetensors").unwrap_err().to_string().contains("is missing"));
    }

    #[test]
    fn other_formats_are_refused() {
        let files = HashMap::from([(STATE_FILE.to_string(), Bytes::from_static(b"{\"format\": 7}"))]);
        let err = CheckpointContent::from_files("mem://c", files).unwrap_err().to_string();
        assert!(err.contains("state format 7 (this build reads 1)"), "{err}");
        let err = CheckpointContent::from_files("mem://c", HashMap::new()).unwrap_err().to_string();
        assert!(err.contains("state.json is missing"), "{err}");
    }
}
