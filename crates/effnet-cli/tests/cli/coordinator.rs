//! `effnet coordinator` as a process, driven by `effnet submit/status/cancel/logs`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::common::{Outcome, assert_bad_input, effnet_with_env};

const TOKEN: &str = "cli-test-token";

/// A running `effnet coordinator`; killed when dropped.
pub(crate) struct Coordinator {
    child: Child,
    pub(crate) url: String,
    /// The status page's URL for browsers (`/view/KEY/`), from the second line.
    page: String,
}

impl Coordinator {
    pub(crate) fn start(state_dir: &Path, token_file: &Path) -> Coordinator {
        Coordinator::start_on("127.0.0.1:0", state_dir, token_file, &Default::default())
    }

    /// On a given address, with a 5 s heartbeat timeout (workers heartbeat every second) and
    /// `envs` (the object store's credentials: it reads the job's data and checkpoints).
    pub(crate) fn start_on(
        listen: &str,
        state_dir: &Path,
        token_file: &Path,
        envs: &std::collections::BTreeMap<String, String>,
    ) -> Coordinator {
        let mut child = Command::new(env!("CARGO_BIN_EXE_effnet"))
            .args(["coordinator", "--heartbeat-timeout-s", "5", "--listen", listen, "--state-dir"])
            .arg(state_dir)
            .arg("--token-file")
            .arg(token_file)
            .env("RUST_LOG", "warn")
            .envs(envs)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("effnet coordinator starts");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let url = line
            .strip_prefix("coordinator listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        line.clear();
        stdout.read_line(&mut line).unwrap();
        let page = line
            .strip_prefix("status page ")
            .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
            .trim()
            .to_string();
        Coordinator { child, url, page }
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

pub(crate) fn client(coordinator: &Coordinator, token_file: &Path, args: &[&str]) -> Outcome {
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

/// A standalone coordinator and two MPI workers that join it (`mpirun -n 2 effnet worker
/// --coordinator URL --job ID`, data on the S3 server on loopback). The coordinator is SIGKILLed
/// mid-epoch and started again on its state directory and address: the workers train on (their
/// heartbeats fail and are retried), re-attach, and finish; the job succeeds in its first
/// generation and the epoch's good samples are trained exactly once.
#[test]
fn workers_carry_on_through_a_coordinator_killed_and_restarted_mid_job() {
    use crate::exactly_once::{
        assert_exactly_once, corrupt_keys, s3_data, skipped_keys_up_to, write_job_reading,
    };
    use std::time::Duration;

    let server = s3_data();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let state_dir = dir.path().join("state");
    let yaml = write_job_reading(dir.path(), &server.url("train"), 2);
    let job_dir = dir.path().join("job");
    // A fixed address, so the restarted coordinator is where the workers look.
    let address = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let coordinator = Coordinator::start_on(&address, &state_dir, &token_file, &server.env_vars());
    let submitted = client(&coordinator, &token_file, &["submit", yaml.to_str().unwrap()]);
    assert_eq!(submitted.code, 0, "{}", submitted.stderr);
    let id = submitted.stdout.trim().to_string();

    let mut workers = mpi_workers(2, &coordinator, &id, &token_file, &server.env_vars());
    crate::common::wait_for_commit(&mut workers, &job_dir.join("checkpoints"), 16);
    let url = coordinator.url.clone();
    drop(coordinator); // SIGKILL
    std::thread::sleep(Duration::from_millis(1500));
    let coordinator = Coordinator::start_on(&address, &state_dir, &token_file, &server.env_vars());
    assert_eq!(coordinator.url, url);

    let output = workers.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("heartbeat failed; training goes on and retries"), "{stderr}");
    let status = client(&coordinator, &token_file, &["status", &id, "--json"]);
    assert_eq!(status.code, 0, "{}", status.stderr);
    let detail: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(
        (detail["state"].as_str(), detail["restarts"].as_u64()),
        (Some("succeeded"), Some(0)),
        "{detail}"
    );
    // The coordinator dealt the generation (before its restart; the deal was kept).
    assert_eq!(detail["generations"][0]["start"], serde_json::json!({"from": "scratch"}), "{detail}");
    let last = detail["last_checkpoint"]["step"].as_u64().unwrap();
    assert!(last > 16, "the checkpoints after the restart were reported: {detail}");
    // The progress history spans the coordinator's restart.
    let logs = client(&coordinator, &token_file, &["logs", &id, "--json", "--limit", "1000"]);
    let steps: Vec<u64> = logs
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert!(steps.iter().any(|s| *s < 16) && steps.iter().any(|s| *s > 20), "{steps:?}");

    let trained: Vec<String> = crate::common::sample_lines(&job_dir).into_iter().flat_map(|l| l.3).collect();
    assert_exactly_once(&trained);
    assert_eq!(skipped_keys_up_to(&job_dir, u64::MAX), corrupt_keys());
    coordinator.terminate();
}

/// `mpirun -n W effnet worker --coordinator URL --job ID ...` with `envs` set, its output piped.
fn mpi_workers(
    workers: u32,
    coordinator: &Coordinator,
    id: &str,
    token_file: &Path,
    envs: &std::collections::BTreeMap<String, String>,
) -> Child {
    mpi_worker_command(workers, coordinator, id, token_file)
        .envs(envs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `mpirun -n W effnet worker --coordinator URL --job ID ...`, not started yet.
pub(crate) fn mpi_worker_command(
    workers: u32,
    coordinator: &Coordinator,
    id: &str,
    token_file: &Path,
) -> Command {
    let mut mpirun = Command::new("mpirun");
    mpirun.args(["-n", &workers.to_string(), "--bind-to", "none", "--oversubscribe"]);
    if std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
    {
        mpirun.arg("--allow-run-as-root");
    }
    mpirun
        .arg(env!("CARGO_BIN_EXE_effnet"))
        .args(["worker", "--coordinator", &coordinator.url, "--job", id, "--progress", "never"])
        .arg("--token-file")
        .arg(token_file)
        .env("RUST_LOG", "warn");
    mpirun
}

/// Elastic: a job of 3 workers with `min_workers: 2`, launched as `mpirun -n 3`; one worker is
/// SIGKILLed mid-epoch (mpirun ends the others) and its node is taken as lost, so the engine
/// relaunches only two. They wait for the first generation to expire, form the second with a
/// world of 2, resume from the coordinator's checkpoint with the rest of the epoch re-dealt to
/// two ranks, and finish: every good sample of the epoch trained exactly once.
#[test]
fn an_elastic_job_finishes_on_two_workers_after_losing_one_of_three() {
    use crate::exactly_once::{assert_resumed_epoch_exactly_once, data_dir, records, write_job_reading};
    use std::time::Duration;

    let data = data_dir();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let yaml = write_job_reading(dir.path(), &data.path().join("train").display().to_string(), 3);
    let text =
        std::fs::read_to_string(&yaml).unwrap().replace("  workers: 3\n", "  workers: 3\n  min_workers: 2\n");
    std::fs::write(&yaml, text).unwrap();
    let job_dir = dir.path().join("job");
    let coordinator = Coordinator::start(&dir.path().join("state"), &token_file);
    let submitted = client(&coordinator, &token_file, &["submit", yaml.to_str().unwrap()]);
    assert_eq!(submitted.code, 0, "{}", submitted.stderr);
    let id = submitted.stdout.trim().to_string();

    let mut three = mpi_workers(3, &coordinator, &id, &token_file, &Default::default());
    crate::common::wait_for_commit(&mut three, &job_dir.join("checkpoints"), 16);
    std::thread::sleep(Duration::from_millis(500));
    let workers = crate::common::worker_processes(&token_file);
    assert_eq!(workers.len(), 3, "{workers:?}");
    assert!(Command::new("kill").args(["-KILL", &workers[2].to_string()]).status().unwrap().success());
    let first = three.wait_with_output().unwrap();
    assert_ne!(first.status.code(), Some(0), "mpirun fails when a rank is killed");

    let two = mpi_workers(2, &coordinator, &id, &token_file, &Default::default()).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&two.stderr);
    assert_eq!(two.status.code(), Some(0), "{stderr}");
    let status = client(&coordinator, &token_file, &["status", &id, "--json"]);
    let detail: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(
        (detail["state"].as_str(), detail["restarts"].as_u64()),
        (Some("succeeded"), Some(1)),
        "{detail}"
    );
    let worlds: Vec<u64> =
        detail["generations"].as_array().unwrap().iter().map(|g| g["world_size"].as_u64().unwrap()).collect();
    assert_eq!(worlds, [3, 2]);

    let starts = records(&job_dir, "start");
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_eq!((starts[1]["world_size"].as_u64(), starts[1]["redealt"].as_bool()), (Some(2), Some(true)));
    let resumed_step = starts[1]["step"].as_u64().unwrap();
    assert!(resumed_step >= 16, "resumed at step {resumed_step}");
    // The coordinator chose that checkpoint and re-dealt its epoch to the 2 workers.
    let checkpoint = job_dir.join("checkpoints").join(format!("step-{resumed_step:08}"));
    assert_eq!(
        detail["generations"][1]["start"],
        serde_json::json!({"from": "checkpoint", "step": resumed_step, "url": checkpoint.display().to_string()}),
        "{detail}"
    );
    assert_resumed_epoch_exactly_once(&job_dir, resumed_step);
    coordinator.terminate();
}

/// A plain HTTP GET without a token: the status code.
fn get_status(url: &str) -> u16 {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The status page in headless Chromium, by the view URL `effnet coordinator` prints (browsers
/// cannot send the bearer token): every job with its state, generation, workers, step, loss
/// curve, restarts and checkpoint, drawn, no console errors, and a refresh to stay live. The
/// page needs the key (a wrong one is 404, `/` without the token 401) and the key opens nothing
/// else.
#[test]
fn the_status_page_opens_in_chromium_by_its_view_url() {
    use effnet_coordinator::protocol::{CheckpointReport, JoinRequest, Progress};

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let coordinator = Coordinator::start(&dir.path().join("state"), &token_file);
    let yaml = |name: &str| {
        format!("name: {name}\nmodel: {{variant: b0}}\ndata: {{train: x}}\ndistributed: {{workers: 2}}\n")
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let api = effnet_coordinator::Client::new(&coordinator.url, TOKEN).unwrap();
    runtime.block_on(async {
        api.submit(&yaml("fmnist"), "fmnist.yaml", &effnet_coordinator::protocol::JobStart::Latest)
            .await
            .unwrap();
        api.submit(&yaml("queued"), "queued.yaml", &effnet_coordinator::protocol::JobStart::Latest)
            .await
            .unwrap();
        let zero = api.join("fmnist-1", &JoinRequest::default()).await.unwrap();
        api.join("fmnist-1", &JoinRequest::default()).await.unwrap();
        for step in 1..=12u64 {
            let progress = Progress {
                step: Some(step),
                epoch: Some(step as f64 / 10.0),
                images_per_s: Some(250.0),
                loss: Some(2.3 / step as f64),
                checkpoint: (step % 4 == 0)
                    .then(|| CheckpointReport { step, url: format!("file:///ckpt/step-{step:08}") }),
            };
            api.heartbeat("fmnist-1", &zero.worker_id, &progress).await.unwrap();
        }
    });

    assert!(coordinator.page.starts_with(&format!("{}/view/", coordinator.url)), "{}", coordinator.page);
    assert_eq!(get_status(&coordinator.page), 200);
    assert_eq!(get_status(&format!("{}/view/{}/", coordinator.url, "0".repeat(64))), 404);
    assert_eq!(get_status(&format!("{}/", coordinator.url)), 401);
    let key = coordinator.page.trim_end_matches('/').rsplit('/').next().unwrap().to_string();
    assert_eq!(
        get_status(&format!("{}/v1/jobs?key={key}", coordinator.url)),
        401,
        "the key opens only the page"
    );

    let page = crate::common::browser::open_url(&coordinator.page, 1400, 500);
    let errors: Vec<&String> =
        page.console.iter().filter(|l| l.contains("ERROR") || l.contains("rror")).collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    let dom = &page.dom;
    for expected in [
        "fmnist-1",
        "queued-2",
        ">running<",
        ">queued<",
        "1 (running)",
        "2 / 2",
        ">12<",
        "1.20",
        "0.1917",
        "step 12",
        "file:///ckpt/step-00000012",
        "<polyline",
        "http-equiv=\"refresh\"",
    ] {
        assert!(dom.contains(expected), "{expected:?} not on the page:\n{dom}");
    }
    assert!(page.ink_pixels() > 5_000, "the page drew little: {} pixels", page.ink_pixels());
    assert!(page.pixels_of([0x1f, 0x6f, 0xeb], 40) > 20, "no loss curve drawn");
    coordinator.terminate();
}
