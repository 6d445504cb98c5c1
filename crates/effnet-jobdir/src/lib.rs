//! The job directory: what the trainer writes and the report reads. Both sides depend on this
//! crate, so data flows one way (trainer → files → report) and neither links the other.
//!
//! # Layout
//! - file names: [`JOB_FILE`], [`METRICS_FILE`], [`SUMMARY_FILE`], [`samples_file`] (one per
//!   rank), [`evaluation::EVALUATION_FILE`].
//! - [`evaluation`]: the evaluator's report of one checkpoint (`effnet eval --json`) and the
//!   trainer's final evaluation (`evaluation.json`).
//! - [`write_atomically`]: write beside, then rename.

use std::path::{Path, PathBuf};

pub mod evaluation;

/// The resolved job spec and plan, written once per attempt before training starts.
pub const JOB_FILE: &str = "job.json";
/// One JSON object per line: `start`, `step`, `eval`, `checkpoint`, `skipped`, `end`.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The run summary of the last attempt that finished.
pub const SUMMARY_FILE: &str = "summary.json";

/// The sample keys rank `rank` trained, one line per step (`data.log_sample_keys`). Every rank
/// writes its own file, so no two processes append to one.
pub fn samples_file(rank: usize) -> String {
    format!("samples-rank-{rank:04}.jsonl")
}

/// Every rank's sample-key file present in `job_dir`, in rank order.
pub fn sample_files(job_dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(job_dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("samples-rank-") && n.ends_with(".jsonl"))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Write beside, then rename: a reader never sees half a file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let partial = path.with_file_name(format!(".{name}.partial"));
    std::fs::write(&partial, bytes)?;
    std::fs::rename(&partial, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_files_are_found_per_rank_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for rank in [2, 0, 10] {
            std::fs::write(dir.path().join(samples_file(rank)), "").unwrap();
        }
        std::fs::write(dir.path().join(METRICS_FILE), "").unwrap();
        let names: Vec<String> = sample_files(dir.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["samples-rank-0000.jsonl", "samples-rank-0002.jsonl", "samples-rank-0010.jsonl"]);
    }

    #[test]
    fn atomic_write_leaves_no_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        write_atomically(&path, b"{}").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
