//! One job directory read for the report: the resolved spec and plan (`job.json`), the log
//! (`metrics.jsonl`: `start`, `step`, `eval`, `checkpoint`, `skipped`, `end`, each with its
//! `attempt`) and the final evaluation (`evaluation.json`).

use std::collections::BTreeMap;
use std::path::Path;

use effnet_store::{redact, redact_json};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::evaluation::{EVALUATION_FILE, FinalEvaluation};
use crate::paper;
use crate::{Error, MeasuredRow, Result};

pub use effnet_jobdir::{JOB_FILE, METRICS_FILE};

/// At most this many points per plotted series (longer ones are averaged in buckets).
pub const MAX_POINTS: usize = 500;

/// What the report says about one job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobReport {
    pub name: String,
    /// The job file's `description`: what was trained and why.
    #[serde(default)]
    pub description: Option<String>,
    pub dir: String,
    pub status: String,
    pub finished: bool,
    pub model: ModelInfo,
    pub data: DataInfo,
    pub steps_done: u64,
    pub total_steps: u64,
    pub steps_per_epoch: u64,
    pub global_batch: u64,
    pub epochs_done: f64,
    pub epochs_planned: f64,
    pub world_size: u64,
    pub throughput: Throughput,
    pub attempts: Vec<Attempt>,
    pub restarts: u64,
    /// Time lost to interruptions: steps redone, downtime, restart start-up.
    pub time_lost_s: f64,
    pub wall_s: f64,
    pub evals: Vec<EvalPoint>,
    pub checkpoints: Vec<CheckpointInfo>,
    pub skipped_samples: u64,
    /// Lines of metrics.jsonl that could not be read (a torn last line after a crash).
    pub unreadable_lines: u64,
    /// What the report could not use, and why.
    pub notes: Vec<String>,
    pub series: Series,
    /// `evaluation.json` as the trainer wrote it (`effnet eval --json`'s format), when it belongs
    /// to the newest step.
    pub final_evaluation: Option<FinalEvaluation>,
    pub peak_memory_bytes: Option<u64>,
    /// Peak GPU memory held by tensors (rank 0, CUDA runs).
    pub gpu_memory_peak_bytes: Option<u64>,
    pub environment: Value,
    pub config: Value,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelInfo {
    pub architecture: String,
    pub classes: u32,
    pub input_channels: u32,
    pub params: f64,
    pub flops: f64,
    pub resolution: u32,
    /// The final drop-path rate (last block), before its schedule.
    pub drop_path_rate: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DataInfo {
    pub train: String,
    pub train_url: String,
    pub train_samples: u64,
    pub val: Option<String>,
    pub val_url: Option<String>,
    pub val_samples: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Throughput {
    /// Training images per second over all steps (all ranks).
    pub images_per_s: f64,
    /// Shares of step time spent waiting for data and in collectives.
    pub data_wait_fraction: f64,
    pub comm_fraction: f64,
    pub train_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attempt {
    pub attempt: u64,
    pub started_at: f64,
    pub start_step: u64,
    pub resumed_from: Option<String>,
    pub last_step: u64,
    pub steps: u64,
    pub wall_s: f64,
    /// `finished`, `interrupted` (a later attempt followed) or `running or stopped`.
    pub outcome: String,
    /// For an interrupted attempt: steps the next attempt did again, their compute time, the
    /// gap until the next attempt started and that attempt's start-up before its first step.
    pub redone_steps: u64,
    pub redone_s: f64,
    pub downtime_s: f64,
    pub restart_s: f64,
    pub lost_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalPoint {
    pub step: u64,
    pub epoch: f64,
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
    pub ema_top1: Option<f64>,
    pub ema_top5: Option<f64>,
    pub ema_loss: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointInfo {
    pub step: u64,
    pub attempt: u64,
    pub bytes: u64,
    pub save_s: f64,
}

/// Plotted series as `[x, y]` pairs: x in epochs, or in minutes since the job's first start.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Series {
    /// Training loss per attempt (`attempt`, points), so redone steps show.
    pub loss: Vec<(u64, Vec<(f64, f64)>)>,
    pub lr: Vec<(f64, f64)>,
    pub drop_path: Vec<(f64, f64)>,
    pub data_wait: Vec<(f64, f64)>,
    /// Images/s against minutes since the first start, per attempt.
    pub throughput: Vec<(u64, Vec<(f64, f64)>)>,
}

fn bad(dir: &Path, reason: impl Into<String>) -> Error {
    Error::Job { path: dir.display().to_string(), reason: reason.into() }
}

fn f(value: &Value) -> Option<f64> {
    value.as_f64()
}

fn u(value: &Value) -> Option<u64> {
    value.as_u64()
}

/// Read one job directory.
pub fn load(dir: &Path) -> Result<JobReport> {
    if !dir.is_dir() {
        return Err(bad(dir, "no such job directory"));
    }
    let job_path = dir.join(JOB_FILE);
    let metrics_path = dir.join(METRICS_FILE);
    if !job_path.is_file() && !metrics_path.is_file() {
        return Err(bad(dir, "not a job directory: no job.json or metrics.jsonl (has the job started?)"));
    }
    let job_text = std::fs::read_to_string(&job_path)
        .map_err(|e| bad(dir, format!("{JOB_FILE} cannot be read: {e}")))?;
    let mut job: Value = serde_json::from_str(&job_text)
        .map_err(|e| bad(dir, format!("{JOB_FILE} is not valid JSON: {e}")))?;
    // The trainer writes job.json and metrics.jsonl redacted; a job directory written before it
    // did still shows no credentials in a report.
    redact_json(&mut job);
    let (spec, plan) = (&job["spec"], &job["plan"]);
    if !plan.is_object() || !spec.is_object() {
        return Err(bad(dir, format!("{JOB_FILE} has no spec or plan")));
    }
    let need_u = |value: &Value, what: &str| {
        u(value).ok_or_else(|| bad(dir, format!("{JOB_FILE}: {what} is missing")))
    };
    let steps_per_epoch = need_u(&plan["steps_per_epoch"], "plan.steps_per_epoch")?.max(1);
    let total_steps = need_u(&plan["total_steps"], "plan.total_steps")?;
    let model = ModelInfo {
        architecture: plan["model"]["architecture"].as_str().unwrap_or("unknown").to_string(),
        classes: need_u(&plan["model"]["classes"], "plan.model.classes")? as u32,
        input_channels: u(&plan["model"]["input_channels"]).unwrap_or(3) as u32,
        params: f(&plan["model"]["parameters"]).unwrap_or(0.0),
        flops: f(&plan["multiply_adds"]).unwrap_or(0.0),
        resolution: need_u(&plan["resolution"], "plan.resolution")? as u32,
        drop_path_rate: f(&spec["model"]["drop_path"]["rate"]).unwrap_or(0.0),
    };
    let url_name = |url: &str| url.trim_end_matches('/').rsplit('/').next().unwrap_or(url).to_string();
    let train_url = spec["data"]["train"].as_str().unwrap_or_default().to_string();
    let val_url = spec["data"]["val"].as_str().map(str::to_string);
    let data = DataInfo {
        train: plan["train_dataset"].as_str().map(str::to_string).unwrap_or_else(|| url_name(&train_url)),
        train_samples: u(&plan["train_samples"]).unwrap_or(0),
        val: plan["val_dataset"].as_str().map(str::to_string).or_else(|| val_url.as_deref().map(url_name)),
        val_samples: u(&plan["val_samples"]),
        train_url,
        val_url,
    };

    if !metrics_path.is_file() {
        return Err(bad(dir, format!("no {METRICS_FILE}: no run has started in this job directory")));
    }
    let text = std::fs::read_to_string(&metrics_path)
        .map_err(|e| bad(dir, format!("{METRICS_FILE} cannot be read: {e}")))?;
    let mut records = Vec::new();
    let mut unreadable_lines = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Value>(line) {
            Ok(mut value) if value["type"].is_string() => {
                redact_json(&mut value);
                records.push(value)
            }
            _ => unreadable_lines += 1,
        }
    }
    // A run started with `--fresh` began the job again: what came before it is another run.
    let fresh_from = records
        .iter()
        .filter(|r| r["type"] == "start" && r["fresh"] == true)
        .filter_map(|r| u(&r["attempt"]))
        .max();
    if let Some(first) = fresh_from {
        records.retain(|r| u(&r["attempt"]).is_some_and(|a| a >= first));
    }
    let of = |kind: &'static str| records.iter().filter(move |r| r["type"] == kind);
    if of("start").next().is_none() {
        return Err(bad(dir, format!("{METRICS_FILE} has no start record: the job has not started")));
    }
    let epoch_of = |step: u64| step as f64 / steps_per_epoch as f64;

    // Steps: the newest attempt's record of each step counts (an interrupted attempt's steps
    // after its last checkpoint were done again).
    let mut steps: BTreeMap<u64, &Value> = BTreeMap::new();
    for record in of("step") {
        if let Some(step) = u(&record["step"]) {
            steps.insert(step, record);
        }
    }
    let steps_done = steps.keys().next_back().copied().unwrap_or(0);

    let attempts = attempts(&records);
    let restarts = attempts.len().saturating_sub(1) as u64;
    let time_lost_s = attempts.iter().map(|a| a.lost_s).sum();
    let wall_s = attempts.iter().map(|a| a.wall_s).sum();
    // The trainer says whether the run reached its length (its planned step count is an upper
    // bound: skipped samples can end an epoch a step early); older logs only have the count.
    let finished = of("end").any(|end| end["finished"] == true || steps_done >= total_steps);

    // Throughput over every step record (redone steps too: they were trained).
    let mut throughput = Throughput::default();
    let (mut images, mut wait, mut comm) = (0.0, 0.0, 0.0);
    for record in of("step") {
        let step_s = f(&record["step_s"]).unwrap_or(0.0);
        images += f(&record["images_per_s"]).unwrap_or(0.0) * step_s;
        wait += f(&record["data_wait"]).unwrap_or(0.0) * step_s;
        comm += f(&record["comm"]).unwrap_or(0.0) * step_s;
        throughput.train_s += step_s;
    }
    if throughput.train_s > 0.0 {
        throughput.images_per_s = images / throughput.train_s;
        throughput.data_wait_fraction = wait / throughput.train_s;
        throughput.comm_fraction = comm / throughput.train_s;
    }

    let mut evals: BTreeMap<u64, EvalPoint> = BTreeMap::new();
    for record in of("eval") {
        let (Some(step), Some(top1)) = (u(&record["step"]), f(&record["raw"]["top1"])) else { continue };
        let ema = &record["ema"];
        evals.insert(
            step,
            EvalPoint {
                step,
                epoch: epoch_of(step),
                top1,
                top5: f(&record["raw"]["top5"]).unwrap_or(0.0),
                loss: f(&record["raw"]["loss"]).unwrap_or(0.0),
                ema_top1: f(&ema["top1"]),
                ema_top5: f(&ema["top5"]),
                ema_loss: f(&ema["loss"]),
            },
        );
    }
    let checkpoints = of("checkpoint")
        .filter_map(|r| {
            Some(CheckpointInfo {
                step: u(&r["step"])?,
                attempt: u(&r["attempt"]).unwrap_or(0),
                bytes: u(&r["bytes"]).unwrap_or(0),
                save_s: f(&r["save_s"]).unwrap_or(0.0),
            })
        })
        .collect();
    let skipped_samples = of("skipped").map(|r| r["samples"].as_array().map_or(0, |s| s.len() as u64)).sum();

    // Series.
    let first_start = attempts.first().map(|a| a.started_at).unwrap_or(0.0);
    let mut loss = Vec::new();
    let mut speed = Vec::new();
    for attempt in &attempts {
        let mine = || of("step").filter(|r| u(&r["attempt"]) == Some(attempt.attempt));
        let points: Vec<(f64, f64)> =
            mine().filter_map(|r| Some((epoch_of(u(&r["step"])?), f(&r["loss"])?))).collect();
        if !points.is_empty() {
            loss.push((attempt.attempt, downsample(&points, MAX_POINTS)));
        }
        let points: Vec<(f64, f64)> = mine()
            .filter_map(|r| Some(((f(&r["time"])? - first_start) / 60.0, f(&r["images_per_s"])?)))
            .collect();
        if !points.is_empty() {
            speed.push((attempt.attempt, downsample(&points, MAX_POINTS)));
        }
    }
    let over_steps = |field: &str, scale: f64| {
        let points: Vec<(f64, f64)> =
            steps.iter().filter_map(|(&s, r)| Some((epoch_of(s), f(&r[field])? * scale))).collect();
        downsample(&points, MAX_POINTS)
    };
    let series = Series {
        loss,
        lr: over_steps("lr", 1.0),
        drop_path: over_steps("drop_path", model.drop_path_rate),
        data_wait: over_steps("data_wait", 1.0),
        throughput: speed,
    };

    let mut notes = Vec::new();
    let final_evaluation = match read_final_evaluation(dir, steps_done) {
        Ok(evaluation) => evaluation,
        Err(reason) => {
            notes.push(format!("{reason}; the measured rows come from metrics.jsonl"));
            None
        }
    };
    let last_end = of("end").next_back();
    let last_start = of("start").next_back().expect("checked above");
    let mut environment = last_start["environment"].clone();
    if let Some(object) = environment.as_object_mut() {
        for key in ["device", "world_size", "backend", "threads"] {
            object.insert(key.to_string(), last_start[key].clone());
        }
    }
    let world_size = u(&last_start["world_size"]).unwrap_or(1);
    let epochs_planned = total_steps as f64 / steps_per_epoch as f64;
    let status = if finished {
        format!("finished: {steps_done} of {total_steps} steps")
    } else {
        format!("not finished: {steps_done} of {total_steps} steps (running, or stopped before the end)")
    };
    Ok(JobReport {
        name: spec["name"].as_str().or(plan["job"].as_str()).unwrap_or("job").to_string(),
        description: spec["description"].as_str().map(|d| d.split_whitespace().collect::<Vec<_>>().join(" ")),
        dir: dir.display().to_string(),
        status,
        finished,
        model,
        data,
        steps_done,
        total_steps,
        steps_per_epoch,
        global_batch: u(&plan["global_batch"]).unwrap_or(0),
        epochs_done: epoch_of(steps_done),
        epochs_planned,
        world_size,
        throughput,
        attempts,
        restarts,
        time_lost_s,
        wall_s,
        evals: evals.into_values().collect(),
        checkpoints,
        skipped_samples,
        unreadable_lines,
        notes,
        series,
        final_evaluation,
        peak_memory_bytes: last_end.and_then(|e| u(&e["summary"]["peak_memory_bytes"])),
        gpu_memory_peak_bytes: last_end.and_then(|e| u(&e["summary"]["gpu_memory_peak_bytes"])),
        environment,
        config: spec.clone(),
    })
}

/// The final evaluation when there is one for the newest step; an unreadable one is a reason.
fn read_final_evaluation(
    dir: &Path,
    steps_done: u64,
) -> std::result::Result<Option<FinalEvaluation>, String> {
    // One from an earlier end (the job was extended since) is not the newest step's.
    let evaluation = FinalEvaluation::read(dir)?.filter(|evaluation| evaluation.raw.step == steps_done);
    Ok(evaluation.map(|mut evaluation| {
        for report in std::iter::once(&mut evaluation.raw).chain(evaluation.ema.as_mut()) {
            report.checkpoint = redact(&report.checkpoint);
            report.data = redact(&report.data);
        }
        evaluation
    }))
}

/// Per attempt: its span, how it ended, and what its interruption cost.
fn attempts(records: &[Value]) -> Vec<Attempt> {
    let mut by_attempt: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
    for record in records {
        by_attempt.entry(u(&record["attempt"]).unwrap_or(0)).or_default().push(record);
    }
    let mut attempts: Vec<Attempt> = Vec::new();
    for (&number, lines) in &by_attempt {
        let Some(start) = lines.iter().find(|r| r["type"] == "start") else { continue };
        let started_at = f(&start["time"]).unwrap_or(0.0);
        let start_step = u(&start["step"]).unwrap_or(0);
        let step_lines: Vec<&&Value> = lines.iter().filter(|r| r["type"] == "step").collect();
        let last_time = lines.iter().filter_map(|r| f(&r["time"])).fold(started_at, f64::max);
        attempts.push(Attempt {
            attempt: number,
            started_at,
            start_step,
            resumed_from: start["resumed_from"].as_str().map(str::to_string),
            last_step: step_lines.iter().filter_map(|r| u(&r["step"])).max().unwrap_or(start_step),
            steps: step_lines.len() as u64,
            wall_s: last_time - started_at,
            outcome: if lines.iter().any(|r| r["type"] == "end") {
                "finished".into()
            } else {
                "running or stopped".into()
            },
            redone_steps: 0,
            redone_s: 0.0,
            downtime_s: 0.0,
            restart_s: 0.0,
            lost_s: 0.0,
        });
    }
    for i in 0..attempts.len().saturating_sub(1) {
        let next = attempts[i + 1].clone();
        let this_attempt = attempts[i].attempt;
        let lines = &by_attempt[&this_attempt];
        let redone: Vec<f64> = lines
            .iter()
            .filter(|r| r["type"] == "step" && u(&r["step"]).is_some_and(|s| s > next.start_step))
            .map(|r| f(&r["step_s"]).unwrap_or(0.0))
            .collect();
        let last_time = lines.iter().filter_map(|r| f(&r["time"])).fold(attempts[i].started_at, f64::max);
        // The next attempt's start-up: from its start record to the beginning of its first step.
        let next_lines = &by_attempt[&next.attempt];
        let restart_s = next_lines
            .iter()
            .find(|r| r["type"] == "step")
            .and_then(|r| Some(f(&r["time"])? - f(&r["step_s"])? - next.started_at))
            .unwrap_or(0.0)
            .max(0.0);
        let attempt = &mut attempts[i];
        if attempt.outcome != "finished" {
            attempt.outcome = "interrupted".into();
        }
        attempt.redone_steps = redone.len() as u64;
        attempt.redone_s = redone.iter().sum();
        attempt.downtime_s = (next.started_at - last_time).max(0.0);
        attempt.restart_s = restart_s;
        attempt.lost_s = if attempt.outcome == "interrupted" {
            attempt.redone_s + attempt.downtime_s + attempt.restart_s
        } else {
            0.0
        };
    }
    attempts
}

/// At most `max` points: consecutive points averaged in equal buckets (x and y).
pub fn downsample(points: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max || max == 0 {
        return points.to_vec();
    }
    let bucket = points.len().div_ceil(max);
    points
        .chunks(bucket)
        .map(|chunk| {
            let n = chunk.len() as f64;
            (chunk.iter().map(|p| p.0).sum::<f64>() / n, chunk.iter().map(|p| p.1).sum::<f64>() / n)
        })
        .collect()
}

/// Whether a dataset is ImageNet-1k: named so, with 1000 classes.
pub fn is_imagenet(name: &str, classes: u32) -> bool {
    classes == 1000 && name.to_ascii_lowercase().replace(['-', '_', ' '], "").contains("imagenet")
}

/// The measured rows of a job: the final evaluation (raw and EMA) when there is one, else the
/// newest in-training evaluation.
pub fn measured_rows(job: &JobReport) -> Vec<MeasuredRow> {
    let dataset = job.data.val.clone().unwrap_or_else(|| "no validation data".into());
    let imagenet = is_imagenet(&dataset, job.model.classes);
    let mut rows = Vec::new();
    let mut push = |weights: &str,
                    step: u64,
                    top1: f64,
                    top5: f64,
                    loss: f64,
                    samples: u64,
                    source: String,
                    checkpoint: Option<String>| {
        let (reference, basis) = reference_for(&job.model, top1, imagenet);
        rows.push(MeasuredRow {
            job: job.name.clone(),
            label: if weights == "ema" {
                format!("{} (EMA)", job.model.architecture)
            } else {
                job.model.architecture.clone()
            },
            architecture: job.model.architecture.clone(),
            weights: weights.to_string(),
            dataset: dataset.clone(),
            classes: job.model.classes,
            imagenet,
            resolution: job.model.resolution,
            epochs: step as f64 / job.steps_per_epoch as f64,
            step,
            top1,
            top5,
            loss,
            samples,
            params: job.model.params,
            flops: job.model.flops,
            reference: reference.model.to_string(),
            reference_basis: basis,
            params_ratio: job.model.params / reference.params,
            flops_ratio: reference.flops.map(|f| job.model.flops / f),
            source,
            checkpoint,
        });
    };
    if let Some(evaluation) = &job.final_evaluation {
        for e in std::iter::once(&evaluation.raw).chain(&evaluation.ema) {
            push(
                &e.weights,
                e.step,
                e.top1,
                e.top5,
                e.loss,
                e.samples,
                format!("final evaluation of {} ({EVALUATION_FILE})", e.checkpoint),
                Some(e.checkpoint.clone()),
            );
        }
    } else if let Some(last) = job.evals.last() {
        let source =
            format!("in-training evaluation at step {} ({METRICS_FILE}; no final evaluation)", last.step);
        push("raw", last.step, last.top1, last.top5, last.loss, 0, source.clone(), None);
        if let (Some(top1), Some(top5), Some(loss)) = (last.ema_top1, last.ema_top5, last.ema_loss) {
            push("ema", last.step, top1, top5, loss, 0, source, None);
        }
    }
    rows
}

/// Which EfficientNet row a measured row's ratios refer to: on ImageNet the one of similar
/// top-1 (as the paper's table does); elsewhere accuracies are not comparable, so the same
/// variant, or for a custom φ the one of nearest size.
fn reference_for(model: &ModelInfo, top1: f64, imagenet: bool) -> (&'static paper::PaperRow, String) {
    if imagenet {
        return (paper::efficientnet_of_similar_accuracy(top1), "similar ImageNet top-1".into());
    }
    if let Some(row) = paper::efficientnet(&model.architecture) {
        return (row, "same variant; accuracy not comparable: not ImageNet".into());
    }
    let nearest = paper::TABLE2
        .iter()
        .filter(|r| r.is_efficientnet())
        .min_by(|a, b| {
            let d = |r: &paper::PaperRow| (r.params / model.params.max(1.0)).ln().abs();
            d(a).total_cmp(&d(b))
        })
        .expect("the table has EfficientNets");
    (nearest, "nearest size; accuracy not comparable: not ImageNet".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsampling_averages_buckets() {
        let points: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, (i * 2) as f64)).collect();
        assert_eq!(downsample(&points, 20), points);
        assert_eq!(
            downsample(&points, 5),
            vec![(0.5, 1.0), (2.5, 5.0), (4.5, 9.0), (6.5, 13.0), (8.5, 17.0)]
        );
        assert_eq!(downsample(&points, 3).len(), 3);
    }

    #[test]
    fn imagenet_is_recognised_by_name_and_classes() {
        assert!(is_imagenet("imagenet val", 1000));
        assert!(is_imagenet("ImageNet-1k validation", 1000));
        assert!(!is_imagenet("imagenet val", 100));
        assert!(!is_imagenet("fashion-mnist/test", 10));
        assert!(!is_imagenet("my dataset", 1000));
    }
}
