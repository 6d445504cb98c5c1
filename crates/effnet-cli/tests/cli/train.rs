//! `effnet run` end to end: exact resume after SIGKILL, checkpoint compatibility, bad job files,
//! and learning on real Fashion-MNIST.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::common::{assert_bad_input, effnet, effnet_with_env, synthetic_dataset, workspace_root};

struct Job {
    dir: PathBuf,
    yaml: PathBuf,
    /// Removes the directory when the test ends.
    _temp: tempfile::TempDir,
}

impl Job {
    fn checkpoints(&self) -> PathBuf {
        self.dir.join("job/checkpoints")
    }

    fn checkpoint_file(&self, step: u64, name: &str) -> Vec<u8> {
        std::fs::read(self.checkpoints().join(format!("step-{step:08}")).join(name)).unwrap()
    }

    fn run(&self, extra: &[&str]) -> common::Outcome {
        let mut args = vec!["run", self.yaml.to_str().unwrap(), "--progress", "never"];
        args.extend_from_slice(extra);
        effnet(&args)
    }

    /// The keys of every step, taking each step from the latest attempt that logged it.
    fn sample_keys(&self) -> BTreeMap<u64, Vec<String>> {
        common::sample_keys_by_step(&self.dir.join("job"))
    }
}

/// A job over the synthetic dataset in `data`; `body` overrides are appended as YAML.
fn job(data: &Path, variant: &str, steps: u64) -> Job {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().to_path_buf();
    let yaml = dir.join("job.yaml");
    let text = format!(
        "name: resume-test
job_dir: {job}
seed: 7
model:
  variant: {variant}
  input_channels: 1
  resolution: 16
  dropout: 0.2
  drop_path:
    rate: 0.2
data:
  train: {train}
  val: {val}
  batch_size: 8
  loader_threads: 2
  shuffle_buffer: 40
  prefetch: 2
  normalization: fashion_mnist
  log_sample_keys: true
  augmentation:
    crop_scale: [0.5, 1.0]
optimizer:
  kind: rmsprop_tf
  lr: 0.05
schedule:
  warmup_steps: 3
  decay_epochs: 0.5
training:
  steps: {steps}
  threads: 1
  ema:
    decay: 0.99
eval:
  every_steps: 6
  max_samples: 16
checkpoint:
  every_steps: 4
  keep_last: 20
",
        job = dir.join("job").display(),
        train = data.join("train").display(),
        val = data.join("val").display(),
    );
    std::fs::write(&yaml, text).unwrap();
    Job { dir, yaml, _temp: temp }
}

fn data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    synthetic_dataset(dir.path().join("train").to_str().unwrap(), 96, 0, 16);
    synthetic_dataset(dir.path().join("val").to_str().unwrap(), 32, 1, 16);
    dir
}

#[test]
fn killed_and_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one() {
    let data = data_dir();
    // 96 samples / batch 8 = 12 steps per epoch: 26 steps cross two epoch boundaries.
    let straight = job(data.path(), "b0", 26);
    let outcome = straight.run(&[]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert!(outcome.stdout.contains("trained          26 steps"), "{}", outcome.stdout);
    let peak =
        outcome.stdout.lines().find_map(|l| l.strip_prefix("peak memory      ")).expect("a peak memory line");
    let mib: f64 = peak.split(' ').next().unwrap().parse().unwrap();
    assert!((50.0..20_000.0).contains(&mib) && peak.ends_with("MiB resident"), "{peak}");

    let interrupted = job(data.path(), "b0", 26);
    let mut child = Command::new(env!("CARGO_BIN_EXE_effnet"))
        .args(["run", interrupted.yaml.to_str().unwrap(), "--progress", "never"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    crate::common::wait_for_commit(&mut child, &interrupted.checkpoints(), 8);
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(status.code().is_none(), "killed by a signal, not exited: {status:?}");
    assert!(!interrupted.checkpoints().join("step-00000026/COMMIT").exists());

    let resumed = interrupted.run(&[]);
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    let resumed_from: u64 = resumed
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("resumed from     step "))
        .expect("the run says where it resumed")
        .trim()
        .parse()
        .unwrap();
    assert!((8..26).contains(&resumed_from), "resumed from {resumed_from}");

    for file in ["model.safetensors", "optimizer.safetensors", "ema.safetensors"] {
        assert!(
            straight.checkpoint_file(26, file) == interrupted.checkpoint_file(26, file),
            "{file} differs between the uninterrupted and the resumed run"
        );
    }
    let keys = straight.sample_keys();
    assert_eq!(keys.len(), 26);
    assert_eq!(keys, interrupted.sample_keys());
    // Each epoch sees every training sample exactly once (12 steps × 8 = 96).
    let mut first_epoch: Vec<&String> = (0..12).flat_map(|s| &keys[&s]).collect();
    first_epoch.sort();
    first_epoch.dedup();
    assert_eq!(first_epoch.len(), 96);

    // The metrics log records both attempts.
    let metrics = std::fs::read_to_string(interrupted.dir.join("job/metrics.jsonl")).unwrap();
    let starts = metrics.lines().filter(|l| l.contains("\"type\":\"start\"")).count();
    assert_eq!(starts, 2);

    // A job for another model refuses this checkpoint and writes nothing.
    let other = job(data.path(), "b1", 26);
    let url = interrupted.checkpoints().join("step-00000008").display().to_string();
    let refused = other.run(&["--resume", &url]);
    assert_bad_input(&refused, &["step-00000008", "EfficientNet-B0", "EfficientNet-B1"]);
    assert!(!other.dir.join("job").exists(), "a refused run must not create its job directory");
}

#[test]
fn check_validates_without_writing() {
    let data = data_dir();
    let job = job(data.path(), "b0", 10);
    let outcome = effnet(&["run", job.yaml.to_str().unwrap(), "--check"]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert!(
        outcome.stdout.contains("steps            10 (12 per epoch, global batch 8; 10 steps)"),
        "{}",
        outcome.stdout
    );
    assert!(outcome.stdout.contains("96 training samples, 32 validation samples"), "{}", outcome.stdout);
    assert!(outcome.stdout.ends_with(": ok\n"), "{}", outcome.stdout);
    assert!(!job.dir.join("job").exists());

    // A resolution the transforms refuse (above 4096) used to pass --check and fail only after
    // job.json and metrics.jsonl were written: both now reject it and write nothing.
    let text = std::fs::read_to_string(&job.yaml).unwrap().replace("resolution: 16", "resolution: 5000");
    std::fs::write(&job.yaml, text).unwrap();
    for args in [vec!["--check"], vec!["--progress", "never"]] {
        let mut all = vec!["run", job.yaml.to_str().unwrap()];
        all.extend(args);
        let outcome = effnet(&all);
        assert_bad_input(&outcome, &["model.resolution", "4096", "5000"]);
        assert!(!job.dir.join("job").exists(), "a rejected job wrote {}", job.dir.join("job").display());
    }
}

/// Write `yaml` as a job file and run it; it must fail with exit 2, one line naming `needles`,
/// and leave no job directory behind.
fn assert_rejected(yaml: &str, needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.yaml");
    std::fs::write(&path, yaml.replace("JOB_DIR", &dir.path().join("job").display().to_string())).unwrap();
    let outcome = effnet(&["run", path.to_str().unwrap(), "--progress", "never"]);
    assert_bad_input(&outcome, needles);
    assert!(!dir.path().join("job").exists(), "nothing may be written for a rejected job");
}

const VALID_HEAD: &str = "name: bad\njob_dir: JOB_DIR\nmodel:\n  variant: b0\n";

#[test]
fn bad_job_files_are_rejected_with_field_and_position() {
    assert_rejected(&format!("{VALID_HEAD}data:\n  train: [unclosed\n"), &["job.yaml:6:"]);
    assert_rejected(
        &format!("{VALID_HEAD}  dropuot: 0.3\ndata:\n  train: x\n"),
        &["job.yaml:5:3", "model.dropuot", "unknown field"],
    );
    assert_rejected(
        &format!("{VALID_HEAD}data:\n  train: x\n  batch_size: many\n"),
        &["job.yaml:7:15", "data.batch_size"],
    );
    assert_rejected(
        &format!("{VALID_HEAD}data:\n  train: x\n  batch_size: -64\n"),
        &["job.yaml:7:15", "data.batch_size", "-64", "positive integer"],
    );
    let missing = tempfile::tempdir().unwrap();
    let url = missing.path().join("no-such-dataset").display().to_string();
    assert_rejected(&format!("{VALID_HEAD}data:\n  train: {url}\n"), &["data.train", &url]);
}

#[test]
fn unreachable_data_url_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.yaml");
    let job_dir = dir.path().join("job");
    // An S3 endpoint on a closed loopback port, with retries off so the test is quick.
    std::fs::write(
        &path,
        format!(
            "name: bad\njob_dir: {}\nmodel:\n  variant: b0\ndata:\n  train: s3://nowhere/fmnist\n",
            job_dir.display()
        ),
    )
    .unwrap();
    let outcome = effnet_with_env(
        &["run", path.to_str().unwrap()],
        &[
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:1"),
            ("AWS_ALLOW_HTTP", "true"),
            ("EFFNET_STORE_MAX_RETRIES", "0"),
        ],
    );
    assert_bad_input(&outcome, &["data.train", "s3://nowhere/fmnist"]);
    assert!(!job_dir.exists());
}

/// B0 at 32×32 on real Fashion-MNIST (one input channel) with the demo's recipe learns: 600 steps
/// (a third of an epoch, cosine-decayed to zero) reach a validation top-1 far above chance, in
/// float32 and in bf16 autocast alike. The full two-epoch figure (89.07%) is in
/// docs/benchmarks.md.
#[test]
fn learns_fashion_mnist_in_fp32_and_bf16() {
    let source = Path::new("/usr/share/datasets/fashion-mnist");
    assert!(
        source.is_dir(),
        "Debian's dataset-fashion-mnist is not installed; run scripts/bootstrap.sh as root (it installs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("fmnist");
    let prepared = effnet(&["prepare", "--from", "fashion-mnist", "--out", data.to_str().unwrap()]);
    assert_eq!(prepared.code, 0, "{}", prepared.stderr);
    let config = std::fs::read_to_string(workspace_root().join("configs/fashion-mnist-b0.yaml")).unwrap();
    let yaml = config
        .replace(".work/fashion-mnist/train", &data.join("train").display().to_string())
        .replace(".work/fashion-mnist/test", &data.join("test").display().to_string())
        .replace("  epochs: 2\n", "  steps: 600\n")
        .replace("  every_epochs: 1\n", "  every_epochs: 1\n  max_samples: 2000\n");
    assert!(
        yaml.contains("steps: 600") && yaml.contains("max_samples: 2000"),
        "the demo config changed shape"
    );
    let path = dir.path().join("job.yaml");
    std::fs::write(&path, yaml).unwrap();
    let train = |precision: &str| -> (f64, Vec<f64>) {
        let job_dir = format!("job_dir={}", dir.path().join(precision).display());
        let precision_set = format!("training.precision={precision}");
        let outcome = effnet(&[
            "run",
            path.to_str().unwrap(),
            "--progress",
            "never",
            "--json",
            "--set",
            &job_dir,
            "--set",
            &precision_set,
        ]);
        assert_eq!(outcome.code, 0, "{}", outcome.stderr);
        let summary: serde_json::Value = serde_json::from_str(&outcome.stdout).unwrap();
        assert_eq!(summary["val"]["samples"], 2000);
        assert_eq!(summary["steps"], 600);
        let start = &common::metric_records(&dir.path().join(precision), "start")[0];
        assert_eq!(start["precision"], precision);
        let losses = common::metric_records(&dir.path().join(precision), "step")
            .iter()
            .map(|r| r["loss"].as_f64().unwrap())
            .collect();
        (summary["val"]["top1"].as_f64().unwrap(), losses)
    };
    let (fp32, fp32_losses) = train("fp32");
    let (bf16, bf16_losses) = train("bf16");
    eprintln!("validation top-1 after 600 steps: fp32 {fp32}, bf16 {bf16}");
    // Chance is 10%; this recipe measured 81.45% here after 600 steps in float32 (a 2,000-sample
    // subset). The bar leaves room for other machines' float rounding.
    assert!(fp32 >= 0.70, "validation top-1 after 600 steps is only {fp32} in float32");
    // bf16 autocast computes convolutions and matrix products with 8-bit mantissas; weights,
    // optimiser state, loss and gradients stay float32, so it learns as well: within 3 points.
    assert!((bf16 - fp32).abs() <= 0.03, "bf16 reached {bf16}, float32 {fp32}");
    let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
    for losses in [&fp32_losses, &bf16_losses] {
        assert!(mean(&losses[500..]) < 0.6 * mean(&losses[..50]), "the loss did not fall: {losses:?}");
    }
}
