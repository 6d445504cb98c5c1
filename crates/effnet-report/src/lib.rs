//! The benchmark report (`effnet report`): one or more job directories (`job.json`,
//! `metrics.jsonl`, `evaluation.json`) read into a [`Report`], which is written as `report.json`
//! and rendered, from that same value, as `report.md` (with SVG plot files) and `report.html` (one
//! self-contained file: inline SVG, no script, no fetches). The paper's Table 2 sits beside the
//! measured rows, each of which names its dataset, resolution and epochs.
//!
//! This crate reads files only; it does not link libtorch. The numbers it shows come from the
//! trainer's logs and its final evaluation, which is the evaluator's own output for the final
//! checkpoint (the format of `effnet eval --json`).

pub mod format;
pub mod job;
pub mod paper;
pub mod render;
pub mod svg;

/// The job directory's evaluation records, defined in effnet-jobdir (the trainer writes them).
pub use effnet_jobdir::evaluation;
pub(crate) use effnet_jobdir::write_atomically;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use job::JobReport;
pub use paper::ReferenceRow;

/// The version of `report.json`'s layout.
pub const REPORT_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A job directory that cannot be reported on, and why.
    #[error("{path}: {reason}")]
    Job { path: String, reason: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Everything a report shows; `report.md` and `report.html` are rendered from it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub format: u32,
    /// The program that wrote it (`effnet 0.1.0`).
    pub generated_by: String,
    /// UTC, ISO 8601.
    pub generated_at: String,
    pub reference: Reference,
    /// One row per job and weights (raw, EMA) with an accuracy.
    pub measured: Vec<MeasuredRow>,
    pub jobs: Vec<JobReport>,
}

/// The paper's Table 2.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reference {
    pub source: String,
    pub dataset: String,
    pub rows: Vec<ReferenceRow>,
}

/// A measured accuracy, with what it was measured on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MeasuredRow {
    pub job: String,
    /// `EfficientNet-B0 (EMA)`.
    pub label: String,
    pub architecture: String,
    /// `raw` or `ema`.
    pub weights: String,
    /// The evaluation dataset's name and its number of classes.
    pub dataset: String,
    pub classes: u32,
    /// Whether it is ImageNet (1000 classes, named so): only then is the accuracy comparable
    /// with the paper's.
    pub imagenet: bool,
    pub resolution: u32,
    /// Epochs trained when it was measured.
    pub epochs: f64,
    pub step: u64,
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
    /// Evaluation samples.
    pub samples: u64,
    pub params: f64,
    /// Multiply-adds of one image at `resolution`.
    pub flops: f64,
    /// The paper's EfficientNet row the ratios are relative to, and why that one.
    pub reference: String,
    pub reference_basis: String,
    pub params_ratio: f64,
    pub flops_ratio: Option<f64>,
    /// Where the numbers come from.
    pub source: String,
    pub checkpoint: Option<String>,
}

/// Read the job directories (the first is the main one) into a report.
pub fn build(job_dirs: &[PathBuf], generated_by: &str) -> Result<Report> {
    if job_dirs.is_empty() {
        return Err(Error::Job { path: "--job-dir".into(), reason: "no job directory given".into() });
    }
    let jobs = job_dirs.iter().map(|dir| job::load(dir)).collect::<Result<Vec<_>>>()?;
    let measured = jobs.iter().flat_map(job::measured_rows).collect();
    Ok(Report {
        format: REPORT_FORMAT,
        generated_by: generated_by.to_string(),
        generated_at: format::utc_iso(format::unix_now()),
        reference: Reference {
            source: paper::SOURCE.to_string(),
            dataset: "ImageNet (ILSVRC-2012) validation".into(),
            rows: paper::reference_rows(),
        },
        measured,
        jobs,
    })
}

/// The files of a report, by name.
pub fn files(report: &Report) -> Vec<(String, Vec<u8>)> {
    let documents = render::documents(report);
    let mut files = vec![
        ("report.json".to_string(), serde_json::to_vec_pretty(report).expect("a report serialises")),
        ("report.md".to_string(), documents.markdown.into_bytes()),
        ("report.html".to_string(), documents.html.into_bytes()),
    ];
    for chart in documents.charts {
        files.push((format!("{}.svg", chart.id), chart.to_svg().into_bytes()));
    }
    files
}

/// Write the report's files into a local directory (created if needed).
pub fn write(report: &Report, out: &Path) -> Result<Vec<PathBuf>> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut written = Vec::new();
    for (name, bytes) in files(report) {
        let path = out.join(&name);
        write_atomically(&path, &bytes).map_err(io(&path))?;
        written.push(path);
    }
    Ok(written)
}
