//! `effnet eval` on committed checkpoints of a real (short) training run: the same numbers as the
//! trainer's own evaluation, deterministic, consistent per-class figures, and bad input.

use std::path::{Path, PathBuf};

use crate::common::{assert_bad_input, effnet, eval_json, synthetic_dataset};
use effnet_data::writer::{DatasetWriter, WriterOptions};

struct Trained {
    dir: PathBuf,
    val: PathBuf,
    /// Removes the directory when the test ends.
    _temp: tempfile::TempDir,
}

impl Trained {
    fn checkpoint(&self, step: u64) -> String {
        self.dir.join(format!("job/checkpoints/step-{step:08}")).display().to_string()
    }
}

fn train() -> Trained {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().to_path_buf();
    synthetic_dataset(dir.join("train").to_str().unwrap(), 64, 0, 16);
    synthetic_dataset(dir.join("val").to_str().unwrap(), 32, 1, 16);
    let yaml = dir.join("job.yaml");
    std::fs::write(
        &yaml,
        format!(
            "name: eval-test
job_dir: {job}
seed: 3
model: {{variant: b0, input_channels: 1, resolution: 16, classifier_init: zero}}
data:
  train: {train}
  val: {val}
  batch_size: 8
  normalization: fashion_mnist
optimizer: {{kind: adamw, lr: 0.03}}
schedule: {{kind: cosine, warmup_steps: 2}}
training: {{steps: 8, threads: 1, ema: {{decay: 0.9}}}}
eval: {{every_steps: 4}}
checkpoint: {{every_steps: 4, keep_last: 5}}
",
            job = dir.join("job").display(),
            train = dir.join("train").display(),
            val = dir.join("val").display(),
        ),
    )
    .unwrap();
    let outcome = effnet(&["run", yaml.to_str().unwrap(), "--progress", "never"]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    Trained { val: dir.join("val"), dir, _temp: temp }
}

#[test]
fn eval_matches_the_trainer_and_is_deterministic() {
    let trained = train();
    let checkpoint = trained.checkpoint(8);
    let val = trained.val.to_str().unwrap();
    let report = eval_json(&["--checkpoint", &checkpoint, "--data", val]);
    let again = eval_json(&["--checkpoint", &checkpoint, "--data", val, "--batch-size", "5"]);

    // The trainer evaluated the same weights on the same data at step 8 (state.json).
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(Path::new(&checkpoint).join("state.json")).unwrap()).unwrap();
    assert_eq!(report["step"], 8);
    assert_eq!(report["samples"], 32);
    assert_eq!(report["top1"], state["val"]["top1"], "effnet eval and the trainer disagree");
    assert_eq!(report["top5"], state["val"]["top5"]);
    let loss = report["loss"].as_f64().unwrap();
    assert!(
        (loss - state["val"]["loss"].as_f64().unwrap()).abs() < 1e-5,
        "{loss} vs {}",
        state["val"]["loss"]
    );

    // Deterministic, whatever the batch size: same counts, same matrix.
    for key in ["top1", "top5", "samples", "confusion", "classes", "parameters", "gflops"] {
        assert_eq!(report[key], again[key], "{key} changed between two evaluations");
    }
    // The matrix accounts for every sample, its diagonal is the top-1, its rows are the classes.
    let confusion: Vec<Vec<u64>> = serde_json::from_value(report["confusion"].clone()).unwrap();
    assert_eq!(confusion.len(), 4);
    let total: u64 = confusion.iter().flatten().sum();
    assert_eq!(total, 32);
    let diagonal: u64 = (0..4).map(|c| confusion[c][c]).sum();
    assert_eq!(diagonal as f64 / 32.0, report["top1"].as_f64().unwrap());
    for (class, row) in report["classes"].as_array().unwrap().iter().zip(&confusion) {
        assert_eq!(class["samples"].as_u64().unwrap(), row.iter().sum::<u64>());
    }
    assert_eq!(report["classes"][0]["class"], "quadrant-0");
    assert_eq!(report["parameters"], 4_012_096);
    assert!(report["images_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["peak_memory_bytes"].as_u64().unwrap() > 10_000_000);

    // The EMA weights are other weights: the trainer's EMA figure, not the raw one.
    let ema = eval_json(&["--checkpoint", &checkpoint, "--data", val, "--ema"]);
    assert_eq!(ema["weights"], "ema");
    assert_eq!(ema["top1"], state["val_ema"]["top1"]);
}

#[test]
fn eval_rejects_bad_checkpoints_and_data() {
    let trained = train();
    let val = trained.val.to_str().unwrap();

    let missing = trained.checkpoint(99);
    let outcome = effnet(&["eval", "--checkpoint", &missing, "--data", val]);
    assert_bad_input(&outcome, &[&missing, "no such directory"]);

    // Without its COMMIT marker a checkpoint does not exist.
    let uncommitted = trained.checkpoint(4);
    std::fs::remove_file(Path::new(&uncommitted).join("COMMIT")).unwrap();
    let outcome = effnet(&["eval", "--checkpoint", &uncommitted, "--data", val]);
    assert_bad_input(&outcome, &[&uncommitted]);

    // A dataset with three classes for a four-class model.
    let other = trained.dir.join("three-classes");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let location = effnet_store::open(other.to_str().unwrap()).unwrap();
        let classes = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let mut writer = DatasetWriter::create(
            location,
            "three",
            classes,
            WriterOptions { rows_per_group: 4, groups_per_part: 2 },
        )
        .await
        .unwrap();
        for i in 0..6i32 {
            let image = effnet_data::prepare::encode_grey_png(&[(i * 40) as u8; 256], 16, 16).unwrap();
            writer.push(format!("k{i}"), image, i % 3).await.unwrap();
        }
        writer.finish().await.unwrap();
    });
    let outcome =
        effnet(&["eval", "--checkpoint", &trained.checkpoint(8), "--data", other.to_str().unwrap()]);
    assert_bad_input(&outcome, &["--data", "3 classes", "4"]);

    let outcome =
        effnet(&["eval", "--checkpoint", &trained.checkpoint(8), "--data", val, "--batch-size", "-3"]);
    assert_bad_input(&outcome, &["--batch-size", "-3"]);
}
