//! The job directory's logs: `metrics.jsonl` (rank 0; one JSON object per line: `start`, `step`,
//! `eval`, `checkpoint`, `skipped`, `end`) and, when asked for, `samples-rank-NNNN.jsonl` (every
//! rank its own: the keys of each step's batches, for proving exactly-once). Lines carry the
//! `attempt` number: a resumed run appends with the next attempt, so steps redone after a crash
//! show up twice and the report can count the time lost.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, LineWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Value, json};

use crate::error::{Error, Result};

pub use effnet_jobdir::evaluation::EVALUATION_FILE;
pub use effnet_jobdir::{JOB_FILE, METRICS_FILE, SUMMARY_FILE, samples_file};

pub struct MetricsLog {
    path: PathBuf,
    /// `None` on ranks other than 0, which write nothing.
    metrics: Option<LineWriter<File>>,
    samples: Option<(PathBuf, LineWriter<File>)>,
    rank: usize,
    pub attempt: u64,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.display().to_string(), source }
}

fn append(path: &Path) -> Result<LineWriter<File>> {
    let file = OpenOptions::new().create(true).append(true).open(path).map_err(io_error(path))?;
    Ok(LineWriter::new(file))
}

/// How many runs have started in this job directory (`start` lines in the metrics log).
pub fn previous_attempts(job_dir: &Path) -> u64 {
    let Ok(file) = File::open(job_dir.join(METRICS_FILE)) else { return 0 };
    BufReader::new(file)
        .lines()
        .map_while(|line| line.ok())
        .filter(|line| serde_json::from_str::<Value>(line).is_ok_and(|v| v["type"] == "start"))
        .count() as u64
}

impl MetricsLog {
    /// Rank `rank`'s logs of attempt `attempt` (rank 0 counts it with [`previous_attempts`] and
    /// tells the others): rank 0 writes `metrics.jsonl`, every rank its sample keys if asked.
    pub fn open(job_dir: &Path, rank: usize, attempt: u64, log_samples: bool) -> Result<MetricsLog> {
        if rank == 0 || log_samples {
            std::fs::create_dir_all(job_dir).map_err(io_error(job_dir))?;
        }
        let path = job_dir.join(METRICS_FILE);
        let metrics = if rank == 0 { Some(append(&path)?) } else { None };
        let samples = if log_samples {
            let samples_path = job_dir.join(samples_file(rank));
            let writer = append(&samples_path)?;
            Some((samples_path, writer))
        } else {
            None
        };
        Ok(MetricsLog { path, metrics, samples, rank, attempt })
    }

    /// Write one record of `kind` with the fields of `record` (an object) plus attempt and time.
    pub fn write(&mut self, kind: &str, record: impl Serialize) -> Result<()> {
        let Some(metrics) = &mut self.metrics else { return Ok(()) };
        // Redacted: records carry the plan and checkpoint URLs, and metrics.jsonl is for people.
        let mut value = effnet_store::redacted_json(&record).map_err(|e| Error::Internal(e.to_string()))?;
        let object = value
            .as_object_mut()
            .ok_or_else(|| Error::Internal("metrics record must be an object".into()))?;
        object.insert("type".into(), json!(kind));
        object.insert("attempt".into(), json!(self.attempt));
        object.insert("time".into(), json!(unix_time()));
        let line = serde_json::to_string(&value).map_err(|e| Error::Internal(e.to_string()))?;
        writeln!(metrics, "{line}").map_err(io_error(&self.path))
    }

    /// The keys this rank trained in `step` (1-based: the step they went into).
    pub fn write_samples<'a>(&mut self, step: u64, keys: impl Iterator<Item = &'a String>) -> Result<()> {
        let (attempt, rank) = (self.attempt, self.rank);
        if let Some((path, samples)) = &mut self.samples {
            let keys: Vec<&String> = keys.collect();
            let line = json!({ "attempt": attempt, "step": step, "rank": rank, "keys": keys });
            writeln!(samples, "{line}").map_err(io_error(path))?;
        }
        Ok(())
    }
}

pub fn unix_time() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// This machine's memory in bytes (`MemTotal`), where the system says.
pub fn memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|line| line.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

/// Where a run ran, for the `start` record (so a report says what produced its numbers).
pub fn environment(device: tch::Device) -> Value {
    let read = |path: &str| std::fs::read_to_string(path).ok().map(|s| s.trim().to_string());
    let cpu = read("/proc/cpuinfo").and_then(|info| {
        info.lines()
            .find(|line| line.starts_with("model name"))
            .and_then(|line| line.split_once(':'))
            .map(|(_, name)| name.trim().to_string())
    });
    let cuda = matches!(device, tch::Device::Cuda(_));
    json!({
        "effnet": env!("CARGO_PKG_VERSION"),
        "libtorch": crate::amp::torch_version(),
        "os": format!("{} {}", std::env::consts::OS, read("/proc/sys/kernel/osrelease").unwrap_or_default()),
        "arch": std::env::consts::ARCH,
        "host": read("/proc/sys/kernel/hostname"),
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "memory_bytes": memory_bytes(),
        "cuda_devices": if cuda { tch::Cuda::device_count() } else { 0 },
        "cudnn": cuda && tch::Cuda::cudnn_is_available(),
    })
}
