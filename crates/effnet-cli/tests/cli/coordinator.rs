//! `effnet coordinator` as a process, driven by `effnet submit/status/cancel/logs`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::common::{Outcome, assert_bad_input, effnet_with_env};

const TOKEN: &str = "cli-test-token";

/// A running `effnet coordinator`; killed when dropped.
struct Coordinator {
    child: Child,
    url: String,
}

impl Coordinator {
    fn start(state_dir: &Path, token_file: &Path) -> Coordinator {
        let mut child = Command::new(env!("CARGO_BIN_EXE_effnet"))
            .args(["coordinator", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state_dir)
            .arg("--token-file")
            .arg(token_file)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("effnet coordinator starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let url = line
            .strip_prefix("coordinator listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Coordinator { child, url }
    }

    /// SIGTERM, as Kubernetes and Slurm stop it: it must exit cleanly.
    fn terminate(mut self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        assert!(exit.success(), "coordinator exited with {exit:?} after SIGTERM");
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client(coordinator: &Coordinator, token_file: &Path, args: &[&str]) -> Outcome {
    let mut all: Vec<&str> = args.to_vec();
    let token_file = token_file.to_str().unwrap();
    all.extend(["--coordinator", &coordinator.url, "--token-file", token_file]);
    effnet_with_env(&all, &[])
}

#[test]
fn submit_status_cancel_and_logs_against_a_coordinator_process() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let state_dir = dir.path().join("state");
    let coordinator = Coordinator::start(&state_dir, &token_file);

    // A bad spec: the same one line as `effnet run --check`, exit 2, nothing submitted.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "name: demo\nmodel: {variant: b0}\ndata: {train: x, batch_size: -3}\n").unwrap();
    let bad = bad.to_str().unwrap();
    let checked = effnet_with_env(&["run", bad, "--check"], &[]);
    assert_bad_input(
        &checked,
        &["bad.yaml:3:30: data.batch_size: invalid value -3, expected a positive integer"],
    );
    let submitted = client(&coordinator, &token_file, &["submit", bad]);
    assert_bad_input(&submitted, &[]);
    assert_eq!(submitted.stderr, checked.stderr);

    let job = dir.path().join("demo.yaml");
    std::fs::write(
        &job,
        "name: demo\nmodel: {variant: b0}\ndata: {train: memory://x/train}\ndistributed: {workers: 2}\n",
    )
    .unwrap();
    let job = job.to_str().unwrap();
    let no_token = effnet_with_env(&["submit", job, "--coordinator", &coordinator.url], &[]);
    assert_bad_input(&no_token, &["no token: pass --token-file FILE or set EFFNET_TOKEN"]);
    let wrong_token =
        effnet_with_env(&["submit", job, "--coordinator", &coordinator.url], &[("EFFNET_TOKEN", "wrong")]);
    assert_bad_input(&wrong_token, &["missing or wrong bearer token", "401"]);

    let submitted = client(&coordinator, &token_file, &["submit", job]);
    assert_eq!(submitted.code, 0, "{}", submitted.stderr);
    assert_eq!(submitted.stdout, "demo-1\n");
    // EFFNET_TOKEN and EFFNET_COORDINATOR work in place of the flags.
    let second = effnet_with_env(
        &["submit", job],
        &[("EFFNET_TOKEN", TOKEN), ("EFFNET_COORDINATOR", &coordinator.url)],
    );
    assert_eq!((second.code, second.stdout.as_str()), (0, "demo-2\n"), "{}", second.stderr);

    let table = client(&coordinator, &token_file, &["status"]);
    assert_eq!(table.code, 0, "{}", table.stderr);
    let rows: Vec<Vec<&str>> = table.stdout.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        rows,
        [
            ["demo-1", "queued", "0", "0/2", "-", "-", "-", "0"],
            ["demo-2", "queued", "0", "0/2", "-", "-", "-", "0"]
        ]
    );
    let detail = client(&coordinator, &token_file, &["status", "demo-1", "--json"]);
    assert_eq!(detail.code, 0, "{}", detail.stderr);
    let detail: serde_json::Value = serde_json::from_str(&detail.stdout).unwrap();
    assert_eq!((detail["id"].as_str(), detail["state"].as_str()), (Some("demo-1"), Some("queued")));
    assert_eq!(detail["spec"]["distributed"]["workers"], 2);
    assert_bad_input(
        &client(&coordinator, &token_file, &["status", "nope-9"]),
        &["unknown job nope-9", "404"],
    );

    let cancelled = client(&coordinator, &token_file, &["cancel", "demo-1"]);
    assert_eq!(
        (cancelled.code, cancelled.stdout.as_str()),
        (0, "demo-1 cancelled\n"),
        "{}",
        cancelled.stderr
    );
    assert_bad_input(
        &client(&coordinator, &token_file, &["cancel", "demo-1"]),
        &["job demo-1 is already cancelled"],
    );
    let logs = client(&coordinator, &token_file, &["logs", "demo-2"]);
    assert_eq!(
        (logs.code, logs.stdout.as_str()),
        (0, "demo-2: no progress reported yet\n"),
        "{}",
        logs.stderr
    );

    // Stopped and started again on the same state directory: the jobs are still there.
    coordinator.terminate();
    let coordinator = Coordinator::start(&state_dir, &token_file);
    let states = client(&coordinator, &token_file, &["status", "--json"]);
    assert_eq!(states.code, 0, "{}", states.stderr);
    let states: serde_json::Value = serde_json::from_str(&states.stdout).unwrap();
    let states: Vec<(&str, &str)> = states
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["id"].as_str().unwrap(), j["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [("demo-1", "cancelled"), ("demo-2", "queued")]);
    let url = coordinator.url.clone();
    coordinator.terminate();

    // Nobody listening: not the user's input, exit 1.
    let unreachable = effnet_with_env(&["status", "--coordinator", &url], &[("EFFNET_TOKEN", TOKEN)]);
    assert_eq!(unreachable.code, 1, "{}", unreachable.stderr);
    assert!(
        unreachable.stderr.starts_with(&format!("error: coordinator {url}/v1/jobs: ")),
        "{}",
        unreachable.stderr
    );
}

#[test]
fn coordinator_refuses_bad_arguments_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing-token");
    let outcome = effnet_with_env(
        &[
            "coordinator",
            "--state-dir",
            dir.path().to_str().unwrap(),
            "--token-file",
            missing.to_str().unwrap(),
        ],
        &[],
    );
    assert_bad_input(&outcome, &["--token-file", "missing-token"]);
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "  \n").unwrap();
    let outcome = effnet_with_env(
        &[
            "coordinator",
            "--state-dir",
            dir.path().to_str().unwrap(),
            "--token-file",
            empty.to_str().unwrap(),
        ],
        &[],
    );
    assert_bad_input(&outcome, &["the token is empty"]);
    let outcome = effnet_with_env(&["status", "--coordinator", "localhost:7700"], &[("EFFNET_TOKEN", TOKEN)]);
    assert_bad_input(&outcome, &["coordinator URL localhost:7700: must start with http:// or https://"]);
}
