//! The evaluator's report of one checkpoint (what `effnet eval --json` prints) and the trainer's
//! final evaluation (`evaluation.json` in the job directory): one type for the program that writes
//! them and for the report that reads them.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The final evaluation in a job directory: `{"raw": report, "ema": report or null}`.
pub const EVALUATION_FILE: &str = "evaluation.json";

/// One evaluation of one checkpoint's weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointReport {
    pub checkpoint: String,
    pub step: u64,
    pub epoch: u64,
    pub job: String,
    /// `raw` or `ema`.
    pub weights: String,
    pub data: String,
    pub architecture: String,
    pub parameters: i64,
    pub resolution: u32,
    /// Multiply-adds of one image at `resolution`, in billions (the paper's "FLOPs").
    pub gflops: f64,
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
    pub samples: u64,
    pub images_per_s: f64,
    /// Peak resident memory of the evaluating process (VmHWM), bytes.
    pub peak_memory_bytes: Option<u64>,
    pub device: String,
    pub classes: Vec<ClassResult>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<u64>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassResult {
    pub class: String,
    pub samples: u64,
    pub top1: Option<f64>,
}

/// The trainer's final evaluation, raw and (when trained) EMA weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinalEvaluation {
    pub raw: CheckpointReport,
    pub ema: Option<CheckpointReport>,
}

impl FinalEvaluation {
    /// Write `evaluation.json` into a job directory, atomically.
    pub fn write(&self, job_dir: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::write_atomically(&job_dir.join(EVALUATION_FILE), &bytes)
    }

    /// Read a job directory's `evaluation.json`: `None` when there is none, the reason when it
    /// cannot be used.
    pub fn read(job_dir: &Path) -> Result<Option<FinalEvaluation>, String> {
        let path = job_dir.join(EVALUATION_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{EVALUATION_FILE} cannot be read: {e}"))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("{EVALUATION_FILE} is not an evaluation: {e}"))
    }
}
