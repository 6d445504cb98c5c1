//! Helpers shared by the CLI integration tests.
#![allow(dead_code)]

pub mod browser;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use effnet_data::prepare::encode_grey_png;
use effnet_data::writer::{DatasetWriter, WriterOptions};

pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Outcome {
    fn from(output: std::process::Output) -> Outcome {
        Outcome {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

pub fn effnet(args: &[&str]) -> Outcome {
    effnet_with_env(args, &[])
}

/// Run the binary with extra environment variables.
pub fn effnet_with_env(args: &[&str], env: &[(&str, &str)]) -> Outcome {
    effnet_command(args).envs(env.iter().copied()).output().expect("effnet binary runs").into()
}

/// `effnet ARGS` with `dir` as the working directory (for files with relative paths).
pub fn effnet_in(dir: &Path, args: &[&str]) -> Outcome {
    effnet_command(args).current_dir(dir).output().expect("effnet binary runs").into()
}

fn effnet_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_effnet"));
    command.args(args).env("RUST_LOG", "warn");
    command
}

/// `effnet eval ARGS --json`, which must succeed, as JSON.
pub fn eval_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["eval"];
    all.extend_from_slice(args);
    all.push("--json");
    let outcome = effnet(&all);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    serde_json::from_str(&outcome.stdout).unwrap()
}

/// Assert exit status 2 and exactly one non-empty line on stderr containing every `needle`.
/// The model weights of a job directory's checkpoint at `step`, sorted by name.
pub fn model_weights(job_dir: &Path, step: u64) -> Vec<(String, tch::Tensor)> {
    let path = job_dir.join(format!("checkpoints/step-{step:08}/model.safetensors"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut tensors: Vec<(String, tch::Tensor)> =
        effnet_train::tensors::from_safetensors(&bytes).unwrap().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

/// The records of `kind` (`start`, `step`, ...) in a job directory's metrics file, in order.
pub fn metric_records(job_dir: &Path, kind: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(job_dir.join("metrics.jsonl")).expect("metrics file");
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|record| record["type"] == kind)
        .collect()
}

pub fn assert_bad_input(outcome: &Outcome, needles: &[&str]) {
    assert_eq!(outcome.code, 2, "expected exit 2, stderr: {}", outcome.stderr);
    let lines: Vec<&str> = outcome.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {:?}", outcome.stderr);
    for needle in needles {
        assert!(lines[0].contains(needle), "'{}' does not name '{needle}'", lines[0]);
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).expect("workspace root").to_path_buf()
}

pub const CLASSES: usize = 4;

/// A learnable grey dataset: class `c` lights up quadrant `c` of a 16×16 image, plus noise.
pub fn synthetic_dataset(url: &str, samples: usize, salt: usize, rows_per_group: usize) {
    synthetic_dataset_with_corrupt(url, samples, salt, rows_per_group, &[]);
}

/// [`synthetic_dataset`] where the samples at `corrupt` positions hold bytes that are no image
/// (keys `s{salt}-{i}-corrupt`): stored as given, found only when decoded.
pub fn synthetic_dataset_with_corrupt(
    url: &str,
    samples: usize,
    salt: usize,
    rows_per_group: usize,
    corrupt: &[usize],
) {
    synthetic_dataset_at(effnet_store::open(url).unwrap(), samples, salt, rows_per_group, corrupt)
}

/// [`synthetic_dataset_with_corrupt`] in an opened store location (e.g. the S3 test server's).
pub fn synthetic_dataset_at(
    location: effnet_store::StoreLocation,
    samples: usize,
    salt: usize,
    rows_per_group: usize,
    corrupt: &[usize],
) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let classes = (0..CLASSES).map(|c| format!("quadrant-{c}")).collect();
        let options = WriterOptions { rows_per_group, groups_per_part: 4 };
        let mut writer = DatasetWriter::create(location, "synthetic", classes, options).await.unwrap();
        for i in 0..samples {
            let label = i % CLASSES;
            if corrupt.contains(&i) {
                let bytes = b"\x89PNG but not really an image".to_vec();
                writer.push(format!("s{salt}-{i:04}-corrupt"), bytes, label as i32).await.unwrap();
                continue;
            }
            let pixels: Vec<u8> = (0..256)
                .map(|p| {
                    let (x, y) = (p % 16, p / 16);
                    let quadrant = (y / 8) * 2 + x / 8;
                    let noise = ((p * 31 + i * 17 + salt * 7) % 41) as u8;
                    if quadrant == label { 180 + noise } else { noise }
                })
                .collect();
            let image = encode_grey_png(&pixels, 16, 16).unwrap();
            writer.push(format!("s{salt}-{i:04}"), image, label as i32).await.unwrap();
        }
        writer.finish().await.unwrap();
    });
}

/// Debian's Fashion-MNIST (`dataset-fashion-mnist`, installed by the set-up as root).
pub const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// The first `samples` Fashion-MNIST training images (28×28 grey PNG, their labels and the ten
/// class names) in an opened store location, keys `s0-{i:04}`; the samples at `corrupt`
/// positions hold bytes that are no image (keys `s0-{i:04}-corrupt`).
pub fn fashion_mnist_subset_at(
    location: effnet_store::StoreLocation,
    samples: usize,
    rows_per_group: usize,
    corrupt: &[usize],
) {
    use effnet_data::prepare::{idx_pair, read_idx_images, read_idx_labels};
    let (images, labels) = idx_pair(&format!("{FASHION_MNIST}/train")).expect(
        "Debian's dataset-fashion-mnist is not installed; run scripts/bootstrap.sh as root (it installs it)",
    );
    let images = read_idx_images(&images).unwrap();
    let labels = read_idx_labels(&labels).unwrap();
    assert!(samples <= images.count);
    let pixels = images.rows * images.columns;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let classes = effnet_data::prepare::FASHION_MNIST_CLASSES.iter().map(|c| c.to_string()).collect();
        let options = WriterOptions { rows_per_group, groups_per_part: 4 };
        let mut writer =
            DatasetWriter::create(location, "fashion-mnist/subset", classes, options).await.unwrap();
        for (i, label) in labels.iter().take(samples).enumerate() {
            let label = i32::from(*label);
            if corrupt.contains(&i) {
                let bytes = b"\x89PNG but not really an image".to_vec();
                writer.push(format!("s0-{i:04}-corrupt"), bytes, label).await.unwrap();
                continue;
            }
            let image = &images.pixels[i * pixels..(i + 1) * pixels];
            let png = encode_grey_png(image, images.columns as u32, images.rows as u32).unwrap();
            writer.push(format!("s0-{i:04}"), png, label).await.unwrap();
        }
        writer.finish().await.unwrap();
    });
}

/// Every (attempt, step, rank, keys) line of the job's sample-key files.
pub fn sample_lines(job_dir: &Path) -> Vec<(u64, u64, u64, Vec<String>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(job_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("samples-rank-"))
        .collect();
    // Rank order, so a step's keys are listed rank 0 first.
    files.sort();
    let mut lines = Vec::new();
    for path in files {
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            let keys =
                value["keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_string()).collect();
            lines.push((
                value["attempt"].as_u64().unwrap(),
                value["step"].as_u64().unwrap(),
                value["rank"].as_u64().unwrap(),
                keys,
            ));
        }
    }
    lines
}

/// The sample keys every rank trained, by step, from the `samples-rank-*.jsonl` files of a job
/// directory: each step's keys come from the latest attempt that logged that step (a resumed
/// run redoes the steps after its checkpoint), all ranks together.
pub fn sample_keys_by_step(job_dir: &Path) -> std::collections::BTreeMap<u64, Vec<String>> {
    use std::collections::BTreeMap;
    let lines = sample_lines(job_dir);
    assert!(!lines.is_empty(), "no sample keys in {}", job_dir.display());
    let mut by_step: BTreeMap<u64, (u64, Vec<String>)> = BTreeMap::new();
    for (attempt, step, _, keys) in lines {
        match by_step.get_mut(&step) {
            Some((seen, existing)) if *seen == attempt => existing.extend(keys),
            Some((seen, _)) if *seen > attempt => {}
            _ => {
                by_step.insert(step, (attempt, keys));
            }
        }
    }
    by_step.into_iter().map(|(step, (_, keys))| (step, keys)).collect()
}

/// Start `effnet run` in its own process group, wait for the checkpoint of `step`, and SIGKILL
/// the whole group (the launcher, mpirun and every rank).
pub fn run_and_kill_after(yaml: &Path, checkpoints: &Path, step: u64) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_effnet"))
        .args(["run", yaml.to_str().unwrap(), "--progress", "never"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own group, so one kill reaches the launcher, mpirun and every rank.
        .process_group(0)
        .spawn()
        .unwrap();
    wait_for_commit(&mut child, checkpoints, step);
    let group = format!("-{}", child.id());
    let killed = Command::new("kill").args(["-KILL", "--", &group]).status().unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(status.code().is_none(), "killed by a signal, not exited: {status:?}");
    // No rank outlives the group (zombies, dead but not yet reaped, do not count).
    let deadline = Instant::now() + Duration::from_secs(10);
    while living_in_group(child.id()) > 0 {
        assert!(Instant::now() < deadline, "ranks survived the kill");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Processes of process group `group` that are not zombies, from /proc.
fn living_in_group(group: u32) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("stat")).ok())
        .filter(|stat| {
            // pid (comm) state ppid pgrp ...: split after the command's closing parenthesis.
            let Some((_, rest)) = stat.rsplit_once(')') else { return false };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields.len() > 2 && fields[2] == group.to_string() && fields[0] != "Z"
        })
        .count()
}

/// The `effnet worker` processes whose command line names `token_file`.
pub fn worker_processes(token_file: &Path) -> Vec<u32> {
    let token = token_file.display().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<String> =
            cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.get(1).map(String::as_str) == Some("worker") && args.contains(&token) {
            pids.push(pid);
        }
    }
    pids
}

/// Wait (up to 5 minutes) until the checkpoint of `step` under `checkpoints` is committed, while
/// `child` (the run, or the mpirun of its workers) is still running.
pub fn wait_for_commit(child: &mut std::process::Child, checkpoints: &Path, step: u64) {
    let marker = checkpoints.join(format!("step-{step:08}/COMMIT"));
    let deadline = Instant::now() + Duration::from_secs(300);
    while !marker.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        assert!(Instant::now() < deadline, "no checkpoint at step {step}");
        std::thread::sleep(Duration::from_millis(2));
    }
}
