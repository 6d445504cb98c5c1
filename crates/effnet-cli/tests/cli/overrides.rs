//! `effnet run JOB.yaml --set key.path=value`: bad overrides exit 2 naming the key, `--check`
//! shows the overridden job, and the launcher hands the overrides to every worker, so the job
//! directory of a 2-rank run records the overridden spec.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tempfile::TempDir;

use crate::common::{assert_bad_input, effnet, synthetic_dataset};

fn data_dir() -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    synthetic_dataset(dir.path().join("train").to_str().unwrap(), 96, 0, 8);
    synthetic_dataset(dir.path().join("val").to_str().unwrap(), 32, 1, 8);
    dir
}

/// A one-process job of 10 steps of 8 images over `data`, in a new temporary directory.
fn write_job(data: &Path) -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("job.yaml");
    let text = format!(
        "name: set-test
job_dir: {job}
model:
  variant: b0
  input_channels: 1
  resolution: 16
data:
  train: {train}
  val: {val}
  batch_size: 8
  loader_threads: 1
  normalization: fashion_mnist
training:
  steps: 10
  threads: 1
eval:
  every_steps: 0
  max_samples: 16
distributed:
  workers: 1
  backend: local
",
        job = dir.path().join("job").display(),
        train = data.join("train").display(),
        val = data.join("val").display(),
    );
    std::fs::write(&yaml, text).unwrap();
    (dir, yaml)
}

#[test]
fn bad_overrides_exit_2_naming_the_key() {
    // The spec is rejected before any dataset is opened, so none is needed.
    let (dir, yaml) = write_job(Path::new("/nonexistent"));
    let yaml = yaml.to_str().unwrap();
    for command in ["run", "worker"] {
        let outcome = effnet(&[command, yaml, "--check", "--set", "data.batch_size=abc"]);
        assert_bad_input(
            &outcome,
            &["--set data.batch_size=abc: data.batch_size: ", "\"abc\"", "positive integer"],
        );
    }
    let outcome = effnet(&["run", yaml, "--set", "training.steps=2", "--set", "data.batch_sise=2"]);
    assert_bad_input(&outcome, &["--set data.batch_sise=2: data.batch_sise: unknown field, expected one of"]);
    let outcome = effnet(&["run", yaml, "--set", "model.dropout=1.5"]);
    assert_bad_input(&outcome, &["--set model.dropout=1.5: model.dropout: invalid value 1.5"]);
    let outcome = effnet(&["run", yaml, "--check", "--set", "data.batch_size"]);
    assert_bad_input(&outcome, &["--set data.batch_size: expected KEY=VALUE"]);
    let outcome = effnet(&["run", yaml, "--check", "--set", "=4"]);
    assert_bad_input(&outcome, &["--set =4: empty field path"]);
    // An error the file itself has still points at its line and column.
    let text = std::fs::read_to_string(yaml).unwrap().replace("batch_size: 8", "batch_size: -8");
    std::fs::write(yaml, text).unwrap();
    let outcome = effnet(&["run", yaml, "--check", "--set", "training.steps=2"]);
    assert_bad_input(&outcome, &[&format!("{yaml}:10:15: data.batch_size: invalid value -8")]);
    assert!(!dir.path().join("job").exists(), "a rejected job wrote its directory");
}

#[test]
fn check_prints_the_overridden_job() {
    let data = data_dir();
    let (dir, yaml) = write_job(data.path());
    let yaml = yaml.to_str().unwrap();
    let plain = effnet(&["run", yaml, "--check"]);
    assert_eq!(plain.code, 0, "{}", plain.stderr);
    assert!(
        plain.stdout.contains("steps            10 (12 per epoch, global batch 8; 10 steps)"),
        "{}",
        plain.stdout
    );

    let args = ["run", yaml, "--check", "--set", "data.batch_size=4", "--set", "training.steps=3"];
    let overridden = effnet(&args);
    assert_eq!(overridden.code, 0, "{}", overridden.stderr);
    assert!(
        overridden.stdout.contains("steps            3 (24 per epoch, global batch 4; 3 steps)"),
        "{}",
        overridden.stdout
    );
    let mut json_args = args.to_vec();
    json_args.extend(["--set", "model.resolution=32", "--json"]);
    let plan: Value = serde_json::from_str(&effnet(&json_args).stdout).unwrap();
    assert_eq!((plan["global_batch"].as_u64(), plan["resolution"].as_u64()), (Some(4), Some(32)), "{plan}");
    // A batch no machine holds is refused by name before the loader would allocate it (which
    // aborted the process: "memory allocation of 8192000000000 bytes failed").
    for command in ["run", "worker"] {
        let huge = effnet(&[command, yaml, "--check", "--set", "data.batch_size=2000000000"]);
        assert_bad_input(&huge, &["data.batch_size: a batch of 2000000000 images of ", " GiB of memory"]);
    }
    assert!(!dir.path().join("job").exists(), "--check wrote the job directory");
}

#[test]
fn launched_workers_train_the_overridden_job() {
    let data = data_dir();
    let (dir, yaml) = write_job(data.path());
    // The file says one local worker of batch 8 for 10 steps; the overrides make it two MPI
    // ranks of batch 4 for 2 steps. Rank 0 writes job.json from the spec it read itself, so
    // the overrides must have reached the worker processes.
    let outcome = effnet(&[
        "run",
        yaml.to_str().unwrap(),
        "--progress",
        "never",
        "--set",
        "distributed={workers: 2, backend: mpi, timeout_s: 60}",
        "--set",
        "data.batch_size=4",
        "--set",
        "training.steps=2",
        "--set",
        "checkpoint.at_epoch_end=false",
    ]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let job_dir = dir.path().join("job");
    let job: Value =
        serde_json::from_str(&std::fs::read_to_string(job_dir.join("job.json")).unwrap()).unwrap();
    let spec = &job["spec"];
    assert_eq!(spec["data"]["batch_size"], 4, "{spec}");
    assert_eq!(spec["training"]["steps"], 2, "{spec}");
    assert_eq!(
        (spec["distributed"]["workers"].as_u64(), spec["distributed"]["backend"].as_str()),
        (Some(2), Some("mpi"))
    );
    assert_eq!(spec["checkpoint"]["at_epoch_end"], false, "{spec}");
    // What the overrides did not touch is the file's.
    assert_eq!(
        (spec["model"]["resolution"].as_u64(), spec["data"]["loader_threads"].as_u64()),
        (Some(16), Some(1))
    );
    assert_eq!(job["plan"]["global_batch"], 8, "{}", job["plan"]);

    let records: Vec<Value> = std::fs::read_to_string(job_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let start = records.iter().find(|r| r["type"] == "start").expect("a start record");
    assert_eq!((start["world_size"].as_u64(), start["global_batch"].as_u64()), (Some(2), Some(8)), "{start}");
    let steps: Vec<&Value> = records.iter().filter(|r| r["type"] == "step").collect();
    assert_eq!(steps.len(), 2, "{records:?}");
    assert!(steps.iter().all(|s| s["samples"] == 8), "{steps:?}");
}
