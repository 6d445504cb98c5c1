//! A job directory written by hand (the trainer's record format) read into a report: the
//! attempts, time lost, throughput, curves and measured rows come out as computed here by hand.

use std::path::Path;

use effnet_report::format::percent;
use serde_json::json;

fn write_job(dir: &Path, classes: u32, val: &str) {
    let job = json!({
        "spec": {"name": "hand", "description": "A hand-made job:\n  B0 on <four> classes.", "model": {"drop_path": {"rate": 0.2}}, "data": {"train": "/data/train", "val": "/data/val"}},
        "plan": {
            "job": "hand", "steps_per_epoch": 4, "total_steps": 8, "global_batch": 16, "resolution": 224,
            "multiply_adds": 390_000_000u64, "train_dataset": "train set", "val_dataset": val,
            "train_samples": 64, "val_samples": 32,
            "model": {"architecture": "EfficientNet-B0", "classes": classes, "input_channels": 3, "parameters": 5_288_548}
        }
    });
    std::fs::write(dir.join("job.json"), serde_json::to_vec(&job).unwrap()).unwrap();
    let mut lines = Vec::new();
    let env = json!({"libtorch": "2.11.0"});
    // Attempt 1: starts at t=100, steps 1..6 each 1 s (ending at t=101..106), checkpoint at 4.
    lines.push(
        json!({"type": "start", "attempt": 1, "time": 100.0, "step": 0, "world_size": 1, "environment": env}),
    );
    for step in 1..=6u64 {
        lines.push(json!({"type": "step", "attempt": 1, "time": 100.0 + step as f64, "step": step,
            "loss": 2.0 - 0.1 * step as f64, "lr": 0.01, "drop_path": step as f64 / 8.0,
            "images_per_s": 16.0, "data_wait": 0.25, "comm": 0.0, "step_s": 1.0}));
        if step == 4 {
            lines.push(json!({"type": "eval", "attempt": 1, "time": 104.5, "step": 4, "epoch": 1,
                "raw": {"top1": 0.5, "top5": 0.9, "loss": 1.5, "samples": 32, "images_per_s": 100.0}, "ema": null}));
            lines.push(json!({"type": "checkpoint", "attempt": 1, "time": 104.6, "step": 4, "bytes": 1_000_000, "save_s": 0.5, "purged": []}));
        }
    }
    // Killed after step 6. Attempt 2 starts at t=110 from step 4; its first step (5) takes 2 s and
    // ends at t=114, so it began at 112: 2 s of start-up.
    lines.push(json!({"type": "start", "attempt": 2, "time": 110.0, "step": 4, "resumed_from": "ckpt/step-00000004", "world_size": 1, "environment": env}));
    for step in 5..=8u64 {
        let time = 112.0 + 2.0 * (step - 4) as f64;
        lines
            .push(json!({"type": "step", "attempt": 2, "time": time, "step": step, "loss": 1.0, "lr": 0.005,
            "drop_path": 1.0, "images_per_s": 8.0, "data_wait": 0.5, "comm": 0.0, "step_s": 2.0}));
    }
    lines.push(json!({"type": "eval", "attempt": 2, "time": 120.5, "step": 8, "epoch": 2,
        "raw": {"top1": 0.75, "top5": 1.0, "loss": 0.7, "samples": 32, "images_per_s": 100.0},
        "ema": {"top1": 0.8125, "top5": 1.0, "loss": 0.6, "samples": 32, "images_per_s": 100.0}}));
    lines.push(json!({"type": "checkpoint", "attempt": 2, "time": 121.0, "step": 8, "bytes": 1_000_100, "save_s": 0.25, "purged": []}));
    lines.push(json!({"type": "end", "attempt": 2, "time": 121.0, "steps": 8, "summary": {"peak_memory_bytes": 123_456_789}}));
    let mut text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    text.push_str("{\"type\": \"step\", \"attem"); // a torn line
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
}

#[test]
fn attempts_time_lost_and_throughput_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    write_job(dir.path(), 4, "val set");
    let report = effnet_report::build(&[dir.path().to_path_buf()], "test").unwrap();
    let job = &report.jobs[0];
    assert!(job.finished);
    assert_eq!((job.steps_done, job.total_steps, job.restarts), (8, 8, 1));
    assert_eq!(job.unreadable_lines, 1);
    let first = &job.attempts[0];
    assert_eq!(first.outcome, "interrupted");
    assert_eq!((first.start_step, first.last_step, first.steps), (0, 6, 6));
    assert_eq!(first.redone_steps, 2); // steps 5 and 6
    assert_eq!(first.redone_s, 2.0);
    assert_eq!(first.downtime_s, 4.0); // last record at 106, next start at 110
    assert_eq!(first.restart_s, 2.0);
    assert_eq!(first.lost_s, 8.0);
    assert_eq!(job.time_lost_s, 8.0);
    assert_eq!(job.attempts[1].outcome, "finished");
    assert_eq!(job.attempts[1].lost_s, 0.0);
    assert_eq!(job.wall_s, 6.0 + 11.0);
    // 6 steps × 16 images in 6 s, 4 × 16 in 8 s: 160 images in 14 s.
    assert!((job.throughput.images_per_s - 160.0 / 14.0).abs() < 1e-12);
    assert!((job.throughput.data_wait_fraction - (6.0 * 0.25 + 8.0 * 0.5) / 14.0).abs() < 1e-12);
    // Curves: the newest record of each step; drop path scaled by the rate.
    assert_eq!(job.series.lr.len(), 8);
    assert_eq!(job.series.lr[5], (1.5, 0.005), "step 6 as attempt 2 did it");
    assert_eq!(job.series.drop_path[0], (0.25, 0.2 / 8.0));
    assert_eq!(job.series.loss.len(), 2);
    assert_eq!(job.checkpoints.iter().map(|c| c.step).collect::<Vec<_>>(), vec![4, 8]);
    assert_eq!(job.peak_memory_bytes, Some(123_456_789));
    assert_eq!(job.environment["libtorch"], "2.11.0");

    // No evaluation.json: the measured rows are the last in-training evaluation, and say so.
    assert_eq!(report.measured.len(), 2);
    let raw = &report.measured[0];
    assert_eq!((raw.top1, raw.step, raw.epochs), (0.75, 8, 2.0));
    assert!(raw.source.contains("no final evaluation"), "{}", raw.source);
    assert_eq!(report.measured[1].top1, 0.8125);
    assert_eq!(raw.reference, "EfficientNet-B0");
    assert!(!raw.imagenet);
    assert!((raw.params_ratio - 5_288_548.0 / 5.3e6).abs() < 1e-12);
    assert!((raw.flops_ratio.unwrap() - 1.0).abs() < 1e-12);

    let markdown = effnet_report::render::markdown(&report);
    let html = effnet_report::render::html(&report);
    for text in [&markdown, &html] {
        assert!(text.contains(&percent(0.8125)));
        assert!(text.contains("8.0 s"), "time lost");
        assert!(text.contains("val set (4 classes)"));
    }
    // The job's description, on one line (HTML-escaped there).
    assert!(markdown.contains("What was trained, and why: A hand-made job: B0 on <four> classes."));
    assert!(html.contains("<p>What was trained, and why: A hand-made job: B0 on &lt;four&gt; classes.</p>"));
}

#[test]
fn imagenet_rows_are_compared_by_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    write_job(dir.path(), 1000, "imagenet validation");
    let report = effnet_report::build(&[dir.path().to_path_buf()], "test").unwrap();
    let raw = &report.measured[0];
    assert!(raw.imagenet);
    // 75.0% top-1: the smallest EfficientNet at least as accurate is B0 (77.1%); 81.25% → B3.
    assert_eq!(raw.reference, "EfficientNet-B0");
    assert_eq!(report.measured[1].reference, "EfficientNet-B3");
    assert!((report.measured[1].params_ratio - 5_288_548.0 / 12e6).abs() < 1e-12);
}

#[test]
fn a_stale_final_evaluation_is_not_used() {
    let dir = tempfile::tempdir().unwrap();
    write_job(dir.path(), 4, "val set");
    // An evaluation.json from step 4 (the job went on since): ignored.
    let evaluation = json!({"raw": {"checkpoint": "c/step-00000004", "step": 4, "epoch": 1, "job": "hand", "weights": "raw",
        "data": "/data/val", "architecture": "EfficientNet-B0", "parameters": 5_288_548, "resolution": 224,
        "gflops": 0.39, "top1": 0.1, "top5": 0.2, "loss": 3.0, "samples": 32, "images_per_s": 1.0,
        "peak_memory_bytes": null, "device": "Cpu", "classes": [], "confusion": []}, "ema": null});
    std::fs::write(dir.path().join("evaluation.json"), evaluation.to_string()).unwrap();
    let report = effnet_report::build(&[dir.path().to_path_buf()], "test").unwrap();
    assert!(report.jobs[0].final_evaluation.is_none());
    assert_eq!(report.measured[0].top1, 0.75);
    // The same at step 8 is used.
    let mut current = evaluation.clone();
    current["raw"]["step"] = json!(8);
    std::fs::write(dir.path().join("evaluation.json"), current.to_string()).unwrap();
    let report = effnet_report::build(&[dir.path().to_path_buf()], "test").unwrap();
    assert_eq!(report.measured.len(), 1);
    assert_eq!(report.measured[0].top1, 0.1);
    assert!(report.measured[0].source.starts_with("final evaluation of c/step-00000004"));
    // A damaged one is left aside, with a note, rather than stopping the report.
    std::fs::write(dir.path().join("evaluation.json"), "{\"raw\": {\"step\"").unwrap();
    let report = effnet_report::build(&[dir.path().to_path_buf()], "test").unwrap();
    assert_eq!(report.measured[0].top1, 0.75);
    assert!(
        report.jobs[0].notes[0].starts_with("evaluation.json is not an evaluation"),
        "{:?}",
        report.jobs[0].notes
    );
    assert!(
        effnet_report::render::markdown(&report).contains("| note | evaluation.json is not an evaluation")
    );
}

#[test]
fn a_fresh_start_begins_the_report_again() {
    let dir = tempfile::tempdir().unwrap();
    write_job(dir.path(), 4, "val set");
    // `effnet run --fresh` after the job finished: attempt 3 starts over at step 0.
    let mut text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    text.push('\n');
    text.push_str(
        &json!({"type": "start", "attempt": 3, "time": 200.0, "step": 0, "fresh": true, "world_size": 1})
            .to_string(),
    );
    text.push('\n');
    text.push_str(
        &json!({"type": "step", "attempt": 3, "time": 201.0, "step": 1, "loss": 2.5, "lr": 0.001,
        "drop_path": 0.0, "images_per_s": 16.0, "data_wait": 0.0, "comm": 0.0, "step_s": 1.0})
        .to_string(),
    );
    text.push('\n');
    std::fs::write(dir.path().join("metrics.jsonl"), text).unwrap();
    let report = effnet_report::build(&[dir.path().to_path_buf()], "test").unwrap();
    let job = &report.jobs[0];
    assert_eq!(job.attempts.len(), 1);
    assert_eq!(job.attempts[0].attempt, 3);
    assert_eq!((job.steps_done, job.restarts, job.time_lost_s), (1, 0, 0.0));
    assert!(!job.finished);
    assert!(job.evals.is_empty() && job.checkpoints.is_empty());
    assert!(report.measured.is_empty(), "the earlier run's accuracy is not this run's");
}
