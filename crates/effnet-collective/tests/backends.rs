//! The conformance suite under a real `mpirun` (Open MPI), the fault test (a rank SIGKILLed while
//! the others wait in an all-reduce), and NCCL's behaviour on a machine without it.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

const CHECK: &str = env!("CARGO_BIN_EXE_effnet-collective-check");

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

fn mpirun(ranks: usize, mpirun_args: &[&str], args: &[&str]) -> (Output, Duration) {
    let mut command = Command::new("mpirun");
    command.args(["-n", &ranks.to_string(), "--oversubscribe", "--bind-to", "none"]).args(mpirun_args);
    if is_root() {
        command.arg("--allow-run-as-root");
    }
    command.arg(CHECK).args(args);
    let _one = ONE_JOB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let output =
        command.output().expect("mpirun runs (Debian: openmpi-bin; scripts/bootstrap.sh installs it)");
    (output, started.elapsed())
}

/// Tests in this file start whole MPI jobs; on a small machine they run one at a time.
static ONE_JOB_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn reports(dir: &std::path::Path, ranks: usize) -> Vec<serde_json::Value> {
    (0..ranks)
        .map(|rank| {
            let text =
                std::fs::read_to_string(dir.join(format!("rank-{rank}.json"))).expect("a report per rank");
            serde_json::from_str(&text).expect("a JSON report")
        })
        .collect()
}

fn assert_conformant(ranks: usize) {
    let out = tempfile::tempdir().unwrap();
    let (output, _) = mpirun(
        ranks,
        &[],
        &["--backend", "mpi", "--timeout-s", "120", "--out", out.path().to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "mpirun failed: {stderr}");
    let reports = reports(out.path(), ranks);
    assert_eq!(reports.len(), ranks, "one report per rank: {reports:?}");
    for (rank, report) in reports.iter().enumerate() {
        assert_eq!(report["rank"], rank);
        assert_eq!(report["world_size"], ranks);
        assert_eq!(report["backend"], "mpi");
        let cases = report["cases"].as_array().unwrap();
        let failed: Vec<_> = cases.iter().filter(|c| c["passed"] != true).collect();
        assert!(failed.is_empty(), "rank {rank} failed {failed:?}");
        // Sizes 1, 1000, 10^6 and one more than a 25 MB bucket, sum and average; plus f64, bf16,
        // broadcast from the first and last rank, and a barrier.
        let sizes: std::collections::BTreeSet<u64> = cases
            .iter()
            .filter(|c| c["name"] == "all_reduce sum f32")
            .map(|c| c["elements"].as_u64().unwrap())
            .collect();
        assert_eq!(sizes.into_iter().collect::<Vec<_>>(), vec![1, 1000, 1_000_000, 6_553_601]);
        assert_eq!(cases.len(), 8 + 1 + 2 + 4 + 1);
    }
}

#[test]
fn mpi_passes_the_conformance_suite_with_two_ranks() {
    assert_conformant(2);
}

#[test]
fn mpi_passes_the_conformance_suite_with_three_ranks() {
    assert_conformant(3);
}

/// A rank SIGKILLed while the others wait in an all-reduce. Open MPI's default: mpirun notices
/// the death and ends the whole job at once (well inside the timeout), naming the dead rank.
#[test]
fn a_killed_rank_ends_the_job_under_default_mpirun() {
    let (output, elapsed) = mpirun(3, &[], &["--backend", "mpi", "--timeout-s", "30", "--kill-rank", "1"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the group must fail: {stderr}");
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}, longer than the timeout: {stderr}");
    assert!(stderr.contains("process rank 1") && stderr.contains("signal 9"), "{stderr}");
}

/// With `--enable-recovery` mpirun keeps the survivors running: each must then fail on its own,
/// with the collective's timeout error naming the operation, its rank and the backend.
#[test]
fn a_killed_rank_makes_the_survivors_time_out_with_recovery_enabled() {
    let (output, elapsed) =
        mpirun(3, &["--enable-recovery"], &["--backend", "mpi", "--timeout-s", "5", "--kill-rank", "1"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(elapsed < Duration::from_secs(5 + 20), "took {elapsed:?}: {stderr}");
    for survivor in [0, 2] {
        let line = stderr
            .lines()
            .find(|l| l.starts_with(&format!("effnet-collective-check: rank {survivor}: ")))
            .unwrap_or_else(|| panic!("rank {survivor} reported nothing: {stderr}"));
        assert!(
            line.contains(&format!("all_reduce timed out after 5s on rank {survivor} of 3 (mpi)")),
            "{line}"
        );
        let noticed: f64 = line
            .rsplit("noticed after ")
            .next()
            .and_then(|rest| rest.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no time in {line}"));
        assert!((5.0..15.0).contains(&noticed), "noticed after {noticed} s: {line}");
    }
    assert!(!stderr.contains("effnet-collective-check: rank 1:"), "the dead rank cannot report: {stderr}");
}

/// The device check script, which runs the NCCL conformance suite on a GPU machine.
const DEVICE_CHECK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/device-check.sh");

#[test]
fn nccl_without_a_gpu_is_a_clear_error_not_a_panic() {
    if effnet_collective::nccl_available().is_ok() {
        // Nothing to test here: this is the no-GPU error path. Say so rather than pass silently.
        eprintln!(
            "SKIPPED nccl_without_a_gpu_is_a_clear_error_not_a_panic: this machine has a GPU and NCCL, so the \
             missing-NCCL error cannot occur; the NCCL conformance suite runs on GPU machines through \
             scripts/device-check.sh (docs/gpu.md)"
        );
        return;
    }
    let output = Command::new(CHECK)
        .args(["--backend", "nccl", "--timeout-s", "5"])
        .env("RANK", "0")
        .env("WORLD_SIZE", "1")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].contains("nccl is not available"), "{}", lines[0]);
    assert!(
        lines[0].contains("libcuda") || lines[0].contains("libnccl") || lines[0].contains("GPU"),
        "{}",
        lines[0]
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The NCCL suite cannot run here (no GPU); the script that runs it on a GPU machine must exist and
/// still call the check binary with the NCCL backend, as the skip above and docs/gpu.md say.
#[test]
fn the_device_check_runs_the_nccl_suite() {
    let script = std::fs::read_to_string(DEVICE_CHECK).expect("scripts/device-check.sh exists");
    assert!(script.contains("effnet-collective-check"), "scripts/device-check.sh no longer runs the suite");
    assert!(script.contains("--backend nccl"), "scripts/device-check.sh no longer runs the suite on NCCL");
}
