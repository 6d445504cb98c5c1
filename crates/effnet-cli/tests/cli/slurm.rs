//! `infra/slurm/effnet.sbatch` on a real Slurm: Debian's slurmctld and slurmd with munge, one node
//! (this host) on loopback, started by `infra/slurm/local-cluster.sh` and torn down after. The
//! batch script starts a coordinator, submits the job and runs `srun --mpi=pmix effnet worker` as
//! a step loop; one task is SIGKILLed mid-epoch and the job finishes through the restart path.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{fashion_mnist_subset_at, workspace_root};
use crate::exactly_once::{
    CORRUPT, ROWS_PER_GROUP, SAMPLES, assert_resumed_epoch_exactly_once, records, write_job_reading,
};

/// A Slurm cluster on loopback; stopped when dropped, whatever the test's outcome.
struct LocalSlurm {
    dir: PathBuf,
}

impl LocalSlurm {
    fn start(dir: &Path) -> LocalSlurm {
        let script = workspace_root().join("infra/slurm/local-cluster.sh");
        let output = Command::new(&script).arg("start").arg(dir).output().unwrap();
        assert!(
            output.status.success(),
            "{} start failed (root and Debian's slurm-wlm + munge are needed; scripts/bootstrap.sh installs them as root):\n{}{}",
            script.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        LocalSlurm { dir: dir.to_path_buf() }
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.env("SLURM_CONF", self.dir.join("slurm.conf"));
        command
    }

    /// `scontrol show job ID`'s `JobState` and `ExitCode`.
    fn job_state(&self, id: &str) -> (String, String) {
        let output = self.command("scontrol").args(["show", "job", id]).output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        let field = |name: &str| {
            text.split_whitespace()
                .find_map(|word| word.strip_prefix(&format!("{name}=")))
                .unwrap_or("")
                .to_string()
        };
        (field("JobState"), field("ExitCode"))
    }
}

impl Drop for LocalSlurm {
    fn drop(&mut self) {
        let _ = Command::new(workspace_root().join("infra/slurm/local-cluster.sh"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

#[test]
fn sbatch_trains_on_a_real_slurm_and_survives_a_killed_task() {
    let dir = tempfile::tempdir().unwrap();
    let slurm = LocalSlurm::start(&dir.path().join("slurm"));
    let train = dir.path().join("train");
    fashion_mnist_subset_at(
        effnet_store::open(train.to_str().unwrap()).unwrap(),
        SAMPLES,
        ROWS_PER_GROUP,
        &CORRUPT,
    );
    let yaml = write_job_reading(dir.path(), train.to_str().unwrap(), 2);
    let job_dir = dir.path().join("job");
    let state_dir = dir.path().join("coordinator");
    let output_file = dir.path().join("sbatch.out");

    let submitted = slurm
        .command("sbatch")
        .args(["--parsable", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-task=0"])
        .arg(format!("--output={}", output_file.display()))
        .arg(format!(
            "--export=ALL,EFFNET={},EFFNET_SRUN_ARGS=--mpi=pmix,EFFNET_STATE_DIR={},EFFNET_COORDINATOR_HOST=127.0.0.1,RUST_LOG=warn",
            env!("CARGO_BIN_EXE_effnet"),
            state_dir.display()
        ))
        .arg(workspace_root().join("infra/slurm/effnet.sbatch"))
        .arg(&yaml)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(submitted.status.success(), "sbatch: {}", String::from_utf8_lossy(&submitted.stderr));
    let id = String::from_utf8_lossy(&submitted.stdout).trim().to_string();
    let sbatch_output = || std::fs::read_to_string(&output_file).unwrap_or_default();

    // Kill one task once step 16 is committed (two tasks of the step running).
    let marker = job_dir.join("checkpoints/step-00000016/COMMIT");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !marker.exists() {
        let (state, _) = slurm.job_state(&id);
        assert!(matches!(state.as_str(), "PENDING" | "RUNNING"), "batch job {state}:\n{}", sbatch_output());
        assert!(Instant::now() < deadline, "no checkpoint at step 16:\n{}", sbatch_output());
        std::thread::sleep(Duration::from_millis(5));
    }
    let tasks = crate::common::worker_processes(&state_dir.join("token"));
    assert_eq!(tasks.len(), 2, "two worker tasks: {tasks:?}");
    assert!(Command::new("kill").args(["-KILL", &tasks[1].to_string()]).status().unwrap().success());

    let deadline = Instant::now() + Duration::from_secs(300);
    let (state, exit) = loop {
        let (state, exit) = slurm.job_state(&id);
        if !matches!(state.as_str(), "PENDING" | "RUNNING" | "COMPLETING" | "") {
            break (state, exit);
        }
        assert!(Instant::now() < deadline, "the batch job did not finish:\n{}", sbatch_output());
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = sbatch_output();
    assert_eq!((state.as_str(), exit.as_str()), ("COMPLETED", "0:0"), "{log}");
    assert!(log.contains("srun step 1 exited") && log.contains("relaunching the workers"), "{log}");
    assert!(log.contains("succeeded"), "{log}");

    // The coordinator's view, as the batch script printed it at the end: one restart, the second
    // generation started from a checkpoint the coordinator dealt.
    let line = |prefix: &str| log.lines().find(|l| l.starts_with(prefix)).unwrap_or("").to_string();
    assert_eq!(line("state "), "state            succeeded", "{log}");
    assert_eq!(line("restarts "), "restarts         1", "{log}");
    assert!(line("generation 2 ").contains("from step "), "{log}");

    // Trained, checkpointed, reported, and the epoch's good samples exactly once.
    let starts = records(&job_dir, "start");
    assert_eq!(starts.len(), 2, "{starts:?}");
    let resumed_step = starts[1]["step"].as_u64().unwrap();
    assert!(resumed_step >= 16, "resumed at step {resumed_step}");
    assert_resumed_epoch_exactly_once(&job_dir, resumed_step);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(job_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["epochs_completed"], 1);
    assert!(job_dir.join("report/report.html").exists() && job_dir.join("report/report.json").exists());
    assert!(crate::common::worker_processes(&state_dir.join("token")).is_empty(), "no task outlives the job");
}
