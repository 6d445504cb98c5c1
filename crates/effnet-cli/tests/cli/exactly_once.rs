//! Exactly once per epoch across ranks, under a real `mpirun`: every good sample of an epoch is
//! trained once whatever the world size, also when the dataset does not divide by ranks × batch
//! × row-group size, when samples are corrupt, and after a SIGKILL mid-epoch resumed at another
//! world size (1 or 3 ranks; the rest of the epoch is re-dealt).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::common::{
    effnet, fashion_mnist_subset_at, run_and_kill_after, sample_lines, synthetic_dataset_with_corrupt,
    wait_for_commit, worker_processes,
};

/// 1,006 samples in row groups of 16 (62 of 16 and one of 14), 3 of them corrupt: 1,003 good.
/// Two ranks of batch 8 make a global batch of 16; 1,006 is no multiple of 2 × 8 × 16.
pub(crate) const SAMPLES: usize = 1006;
pub(crate) const CORRUPT: [usize; 3] = [5, 517, 1003];
pub(crate) const ROWS_PER_GROUP: usize = 16;

pub(crate) fn data_dir() -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    synthetic_dataset_with_corrupt(
        dir.path().join("train").to_str().unwrap(),
        SAMPLES,
        0,
        ROWS_PER_GROUP,
        &CORRUPT,
    );
    dir
}

pub(crate) fn good_keys() -> BTreeSet<String> {
    (0..SAMPLES).filter(|i| !CORRUPT.contains(i)).map(|i| format!("s0-{i:04}")).collect()
}

pub(crate) fn corrupt_keys() -> BTreeSet<String> {
    CORRUPT.iter().map(|i| format!("s0-{i:04}-corrupt")).collect()
}

/// A one-epoch job of `workers` ranks, batch 8, checkpoints every 8 steps. Small and fast: B0
/// at 16×16, one thread per rank, no evaluation data.
fn write_job(dir: &Path, data: &Path, workers: u32) -> PathBuf {
    write_job_reading(dir, &data.join("train").display().to_string(), workers)
}

/// [`write_job`] with its training data at `train` (a path or store URL).
pub(crate) fn write_job_reading(dir: &Path, train: &str, workers: u32) -> PathBuf {
    let yaml = dir.join("job.yaml");
    let text = format!(
        "name: exactly-once
job_dir: {job}
seed: 5
model:
  variant: b0
  input_channels: 1
  resolution: 16
data:
  train: {train}
  batch_size: 8
  loader_threads: 1
  shuffle_buffer: 24
  normalization: fashion_mnist
  log_sample_keys: true
optimizer:
  kind: sgd
  lr: 0.01
training:
  epochs: 1
  threads: 1
  ema:
    enabled: false
checkpoint:
  every_steps: 8
  keep_last: 20
distributed:
  workers: {workers}
  backend: {backend}
  timeout_s: 120
",
        job = dir.join("job").display(),
        backend = if workers > 1 { "mpi" } else { "local" },
    );
    std::fs::write(&yaml, text).unwrap();
    yaml
}

/// The metrics log's records of one type.
pub(crate) fn records(job_dir: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(job_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == kind)
        .collect()
}

/// Assert every good key is in `trained` exactly once and nothing else is.
pub(crate) fn assert_exactly_once(trained: &[String]) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for key in trained {
        *counts.entry(key.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(
        twice.is_empty(),
        "{} keys trained more than once, e.g. {twice:?}",
        counts.values().filter(|n| **n > 1).count()
    );
    let seen: BTreeSet<String> = counts.keys().map(|k| k.to_string()).collect();
    let good = good_keys();
    let missing: Vec<_> = good.difference(&seen).take(5).collect();
    assert!(
        missing.is_empty(),
        "{} good keys never trained, e.g. {missing:?}",
        good.difference(&seen).count()
    );
    let extra: Vec<_> = seen.difference(&good).collect();
    assert!(extra.is_empty(), "trained keys that are not good samples: {extra:?}");
    assert_eq!(trained.len(), good.len());
}

/// The skipped samples recorded in the metrics log (all ranks), by key.
fn skipped_keys(job_dir: &Path) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for record in records(job_dir, "skipped") {
        for sample in record["samples"].as_array().unwrap() {
            assert!(sample["rank"].is_u64(), "{sample}");
            assert!(keys.insert(sample["key"].as_str().unwrap().to_string()), "{sample} reported twice");
        }
    }
    keys
}

#[test]
fn two_ranks_train_each_good_sample_of_an_epoch_exactly_once() {
    let data = data_dir();
    let dir = tempfile::tempdir().unwrap();
    let yaml = write_job(dir.path(), data.path(), 2);
    let outcome = effnet(&["run", yaml.to_str().unwrap(), "--progress", "never"]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let job_dir = dir.path().join("job");
    let lines = sample_lines(&job_dir);
    let ranks: BTreeSet<u64> = lines.iter().map(|l| l.2).collect();
    assert_eq!(ranks, BTreeSet::from([0, 1]), "both ranks record their keys");
    let trained: Vec<String> = lines.into_iter().flat_map(|l| l.3).collect();
    assert_exactly_once(&trained);
    // The three corrupt samples: skipped, reported by key in the log and the summary.
    assert_eq!(skipped_keys(&job_dir), corrupt_keys());
    assert!(outcome.stdout.contains("skipped          3 unusable samples"), "{}", outcome.stdout);
    for key in corrupt_keys() {
        assert!(outcome.stdout.contains(&key), "{key} not in the summary: {}", outcome.stdout);
    }
    // The epoch ended once, after the step in which the last rank finished its share, and the
    // checkpoint at its end saves no cursor (the next epoch starts from its own plan).
    let ends = records(&job_dir, "epoch_end");
    assert_eq!(ends.len(), 1, "{ends:?}");
    let last_step = ends[0]["step"].as_u64().unwrap();
    assert!(last_step > (SAMPLES as u64) / 16, "{last_step} steps: a rank's leftovers were dropped");
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(job_dir.join(format!("checkpoints/step-{last_step:08}/state.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(state["epoch"], 1);
    assert!(state["data"].is_null(), "{}", state["data"]);
    assert_eq!(state["samples_consumed"], SAMPLES as u64);
    assert_eq!(state["samples_seen"], good_keys().len() as u64);
}

/// Kill a 2-rank run mid-epoch, resume it at `resumed_workers` ranks, and check the union of
/// both attempts' keys (the first attempt's up to the resumed step) is the good set once.
fn killed_at_two_and_resumed_at(resumed_workers: u32) {
    let data = data_dir();
    let dir = tempfile::tempdir().unwrap();
    let yaml = write_job(dir.path(), data.path(), 2);
    let job_dir = dir.path().join("job");
    run_and_kill_after(&yaml, &job_dir.join("checkpoints"), 16);

    write_job(dir.path(), data.path(), resumed_workers);
    let outcome = effnet(&["run", yaml.to_str().unwrap(), "--progress", "never"]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let starts = records(&job_dir, "start");
    assert_eq!(starts.len(), 2);
    let resumed_step = starts[1]["step"].as_u64().unwrap();
    assert!((16..60).contains(&resumed_step), "resumed at step {resumed_step}");
    assert_eq!(starts[1]["resumed_world_size"], 2);
    assert_eq!(starts[1]["redealt"], true, "{}", starts[1]);
    assert_eq!(starts[1]["world_size"], resumed_workers);

    let resumed_ranks: BTreeSet<u64> =
        sample_lines(&job_dir).iter().filter(|l| l.0 == 2).map(|l| l.2).collect();
    assert_eq!(resumed_ranks, (0..resumed_workers as u64).collect());
    assert_resumed_epoch_exactly_once(&job_dir, resumed_step);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(job_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["epochs_completed"], 1);
}

/// An epoch interrupted and resumed at `resumed_step` (attempt 2): the first attempt's keys up
/// to that step and all of the second's are every good sample once, and its skipped samples are
/// the corrupt ones.
pub(crate) fn assert_resumed_epoch_exactly_once(job_dir: &Path, resumed_step: u64) {
    let trained: Vec<String> = sample_lines(job_dir)
        .into_iter()
        .filter(|(attempt, step, _, _)| *attempt == 2 || *step < resumed_step)
        .flat_map(|l| l.3)
        .collect();
    assert_exactly_once(&trained);
    assert_eq!(skipped_keys_up_to(job_dir, resumed_step), corrupt_keys());
}

/// Skipped samples of the first attempt up to `resumed_step` and all of the second.
pub(crate) fn skipped_keys_up_to(job_dir: &Path, resumed_step: u64) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for record in records(job_dir, "skipped") {
        // A record's step is the number of steps done when it was logged (the skip happened in
        // the step that made it so).
        if record["attempt"] == 1 && record["step"].as_u64().unwrap() > resumed_step {
            continue;
        }
        for sample in record["samples"].as_array().unwrap() {
            assert!(keys.insert(sample["key"].as_str().unwrap().to_string()), "{sample} reported twice");
        }
    }
    keys
}

#[test]
fn killed_mid_epoch_and_resumed_on_one_rank_is_exactly_once() {
    killed_at_two_and_resumed_at(1);
}

#[test]
fn killed_mid_epoch_and_resumed_on_three_ranks_is_exactly_once() {
    killed_at_two_and_resumed_at(3);
}

/// The exactly-once dataset in the S3 server's bucket under `train/`.
/// The S3 server on loopback holding `train`: the first [`SAMPLES`] Fashion-MNIST training
/// images, the [`CORRUPT`] ones replaced by bytes that are no image (same keys as
/// [`data_dir`]'s).
pub(crate) fn s3_data() -> effnet_store::testing::S3TestServer {
    let server =
        effnet_store::testing::S3TestServer::start().expect("S3 test server (run `make venv-reference`)");
    let location = server.open("train").unwrap();
    fashion_mnist_subset_at(location, SAMPLES, ROWS_PER_GROUP, &CORRUPT);
    server
}

/// One worker of a 2-rank `effnet run` (data on the S3 server on loopback) SIGKILLed mid-epoch
/// while the launcher, its in-process coordinator and the other worker live on: the launcher
/// ends the generation at the coordinator, launches the next one, which resumes from the
/// checkpoint the coordinator chose (the newest the workers reported), and the epoch's good
/// samples are trained exactly once.
#[test]
fn a_worker_killed_mid_epoch_is_relaunched_and_the_epoch_is_exactly_once() {
    use std::process::{Command, Stdio};
    use std::time::Duration;

    let server = s3_data();
    let dir = tempfile::tempdir().unwrap();
    let yaml = write_job_reading(dir.path(), &server.url("train"), 2);
    let job_dir = dir.path().join("job");
    let mut child = Command::new(env!("CARGO_BIN_EXE_effnet"))
        .args(["run", yaml.to_str().unwrap(), "--progress", "never"])
        .envs(server.env_vars())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_commit(&mut child, &job_dir.join("checkpoints"), 16);
    // Time for rank 0's heartbeat to report the checkpoint (it is sent when committed).
    std::thread::sleep(Duration::from_millis(500));
    let workers = worker_processes(&job_dir.join("coordinator/token"));
    assert_eq!(workers.len(), 2, "two worker processes: {workers:?}");
    let killed = Command::new("kill").args(["-KILL", &workers[1].to_string()]).status().unwrap();
    assert!(killed.success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("restarting job exactly-once-1 from its last checkpoint (restart 1 of at most 3)"),
        "{stderr}"
    );
    assert!(worker_processes(&job_dir.join("coordinator/token")).is_empty(), "no worker outlives the run");

    let starts = records(&job_dir, "start");
    assert_eq!(starts.len(), 2, "{starts:?}");
    let resumed_step = starts[1]["step"].as_u64().unwrap();
    assert!((16..60).contains(&resumed_step), "resumed at step {resumed_step}");
    assert_eq!(
        starts[1]["resumed_from"].as_str().unwrap(),
        format!("{}/step-{resumed_step:08}", job_dir.join("checkpoints").display()),
    );
    assert_resumed_epoch_exactly_once(&job_dir, resumed_step);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(job_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["epochs_completed"], 1);
}

/// With `distributed.max_restarts: 0` a killed worker fails the job: `effnet run` does not
/// relaunch, names why on stderr and exits 1.
#[test]
fn a_job_without_restarts_left_fails_with_the_reason() {
    use std::process::{Command, Stdio};

    let data = data_dir();
    let dir = tempfile::tempdir().unwrap();
    let yaml = write_job(dir.path(), data.path(), 2);
    let job_dir = dir.path().join("job");
    let mut child = Command::new(env!("CARGO_BIN_EXE_effnet"))
        .args(["run", yaml.to_str().unwrap(), "--progress", "never", "--set", "distributed.max_restarts=0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_commit(&mut child, &job_dir.join("checkpoints"), 8);
    let workers = worker_processes(&job_dir.join("coordinator/token"));
    assert_eq!(workers.len(), 2, "{workers:?}");
    assert!(Command::new("kill").args(["-KILL", &workers[0].to_string()]).status().unwrap().success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("effnet: job exactly-once-1 failed: generation 1 ended (the engine restarts it: the workers of generation 1 exited (")
            && stderr.contains("after 0 restarts, the job's distributed.max_restarts"),
        "{stderr}"
    );
    assert!(!stderr.contains("restarting job"), "{stderr}");
    assert_eq!(records(&job_dir, "start").len(), 1, "no second generation");
}

/// Two epochs on two ranks whose shares differ (1,006 samples in row groups of 16): every good
/// sample is trained once in each epoch, the epochs split at the step their `epoch_end` names
/// (a sample line's step counts the steps done before it: the first epoch's lines are those
/// below the step its `epoch_end` reports).
#[test]
fn two_epochs_on_two_ranks_train_each_good_sample_once_per_epoch() {
    let data = data_dir();
    let dir = tempfile::tempdir().unwrap();
    let yaml = write_job(dir.path(), data.path(), 2);
    let text = std::fs::read_to_string(&yaml).unwrap().replace("  epochs: 1\n", "  epochs: 2\n");
    std::fs::write(&yaml, text).unwrap();
    let outcome = effnet(&["run", yaml.to_str().unwrap(), "--progress", "never"]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let job_dir = dir.path().join("job");
    let ends: Vec<u64> = records(&job_dir, "epoch_end").iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(ends.len(), 2, "{ends:?}");
    let lines = sample_lines(&job_dir);
    let first: Vec<String> = lines.iter().filter(|l| l.1 < ends[0]).flat_map(|l| l.3.clone()).collect();
    let second: Vec<String> = lines.iter().filter(|l| l.1 >= ends[0]).flat_map(|l| l.3.clone()).collect();
    assert_exactly_once(&first);
    assert_exactly_once(&second);
}
