//! Credentials in URLs never reach what people read (error lines, logs, job directory files,
//! checkpoints' `state.json`, reports), and no panic or stdout failure reaches a user as a
//! panic: one `error:` line and exit status 1.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::{Outcome, effnet_with_env, synthetic_dataset};

/// Fake secrets, each distinct so a leak names its source.
const PASSWORD: &str = "fake-password-2b7e";
const SIGNATURE: &str = "fake-signature-91c3";
const CREDENTIAL: &str = "AKIAFAKECREDENTIAL";
const SESSION: &str = "fake-session-token-5d08";

/// `run --check` of a job whose data URL has a password and an unreachable host: the one error
/// line names the URL, password masked.
#[test]
fn check_error_line_masks_the_password_of_an_unreachable_data_url() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.yaml");
    let url = format!("http://user:{PASSWORD}@127.0.0.1:9/data");
    std::fs::write(&path, format!("name: leak\nmodel:\n  variant: b0\ndata:\n  train: {url}\n")).unwrap();
    let outcome =
        effnet_with_env(&["run", path.to_str().unwrap(), "--check"], &[("EFFNET_STORE_MAX_RETRIES", "0")]);
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    assert_eq!(outcome.stderr.lines().count(), 1, "{}", outcome.stderr);
    assert!(
        outcome
            .stderr
            .starts_with("error: data.train: cannot open dataset http://user:REDACTED@127.0.0.1:9/data"),
        "{}",
        outcome.stderr
    );
    assert!(!outcome.stderr.contains(PASSWORD), "{}", outcome.stderr);
}

/// A job trained from `file://` datasets and into a `file://` checkpoint store whose URLs carry
/// a presigned query string (the local store ignores a query, so the run is real) and a password-bearing URL nowhere used: job.json,
/// metrics.jsonl, summary.json, evaluation.json, every checkpoint's state.json, the report and
/// the logs at debug level hold no secret, and a second run resumes from the first's checkpoint.
#[test]
fn a_run_with_presigned_data_urls_writes_no_secret_and_resumes() {
    let data = tempfile::tempdir().unwrap();
    synthetic_dataset(data.path().join("train").to_str().unwrap(), 64, 0, 16);
    synthetic_dataset(data.path().join("val").to_str().unwrap(), 16, 1, 16);
    let query =
        format!("X-Amz-Credential={CREDENTIAL}&X-Amz-Security-Token={SESSION}&X-Amz-Signature={SIGNATURE}");
    let dir = tempfile::tempdir().unwrap();
    let job_dir = dir.path().join("job");
    let yaml = dir.path().join("job.yaml");
    let write_job = |steps: u64| {
        let text = format!(
            "name: secrets\njob_dir: {job}\ndescription: data from http://reader:{PASSWORD}@example.invalid/x\nmodel:\n  variant: b0\n  input_channels: 1\n  resolution: 16\n\
             data:\n  train: 'file://{train}?{query}'\n  val: 'file://{val}?{query}'\n  batch_size: 8\n  loader_threads: 1\n  normalization: fashion_mnist\n\
             training:\n  steps: {steps}\n  threads: 1\neval:\n  every_steps: 4\n  max_samples: 8\ncheckpoint:\n  every_steps: 2\n  url: 'file://{checkpoints}?{query}'\n",
            job = job_dir.display(),
            train = data.path().join("train").display(),
            val = data.path().join("val").display(),
            checkpoints = dir.path().join("checkpoints").display(),
        );
        std::fs::write(&yaml, text).unwrap();
    };
    let run =
        || effnet_with_env(&["run", yaml.to_str().unwrap(), "--progress", "never"], &[("RUST_LOG", "debug")]);
    write_job(2);
    let first = run();
    assert_eq!(first.code, 0, "{}", first.stderr);
    write_job(4);
    let second = run();
    assert_eq!(second.code, 0, "{}", second.stderr);

    let starts = crate::common::metric_records(&job_dir, "start");
    assert_eq!(starts.last().unwrap()["step"], 2, "the second run resumes at step 2: {starts:?}");
    let job_json = std::fs::read_to_string(job_dir.join("job.json")).unwrap();
    assert!(job_json.contains("X-Amz-Signature=REDACTED"), "the URL is there, masked: {job_json}");

    assert!(
        second.stdout.contains("?X-Amz-Credential=REDACTED&"),
        "the summary names the checkpoint store, masked: {}",
        second.stdout
    );
    let mut outputs = vec![
        ("stdout of run 1".to_string(), first.stdout),
        ("stderr of run 1".to_string(), first.stderr),
        ("stdout of run 2".to_string(), second.stdout),
        ("stderr of run 2".to_string(), second.stderr),
    ];
    collect_files(&job_dir, &mut outputs);
    collect_files(&dir.path().join("checkpoints"), &mut outputs);
    let names: Vec<&str> = outputs.iter().map(|(name, _)| name.as_str()).collect();
    for expected in [
        "job.json",
        "metrics.jsonl",
        "summary.json",
        "evaluation.json",
        "state.json",
        "report.html",
        "report.md",
        "report.json",
    ] {
        assert!(names.iter().any(|name| name.ends_with(expected)), "no {expected} among {names:?}");
    }
    for (name, text) in &outputs {
        for secret in [PASSWORD, SIGNATURE, CREDENTIAL, SESSION] {
            assert!(!text.contains(secret), "{secret} in {name}");
        }
    }
}

/// Every text file under `dir`, by path.
fn collect_files(dir: &Path, into: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_files(&path, into);
        } else if let Ok(text) = std::fs::read_to_string(&path) {
            into.push((path.display().to_string(), text));
        }
    }
}

/// A command whose stdout is a full disk: one `error:` line, exit status 1, no panic.
#[test]
fn a_full_stdout_is_one_error_line_and_status_1() {
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full exists on Linux");
    let output = Command::new(env!("CARGO_BIN_EXE_effnet"))
        .args(["model", "summary", "--variant", "b0"])
        .stdout(Stdio::from(full))
        .output()
        .unwrap();
    let outcome = Outcome::from(output);
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    assert_eq!(outcome.stderr, "error: writing to stdout: No space left on device (os error 28)\n");
}

/// `--help` and `--version` on a full stdout fail the same way (clap printed them and exited 0).
#[test]
fn help_and_version_on_a_full_stdout_are_one_error_line_and_status_1() {
    for flag in ["--help", "--version"] {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let output =
            Command::new(env!("CARGO_BIN_EXE_effnet")).arg(flag).stdout(Stdio::from(full)).output().unwrap();
        let outcome = Outcome::from(output);
        assert_eq!(outcome.code, 1, "{flag}: {}", outcome.stderr);
        assert_eq!(
            outcome.stderr, "error: writing to stdout: No space left on device (os error 28)\n",
            "{flag}"
        );
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let output = Command::new(env!("CARGO_BIN_EXE_effnet")).arg(flag).stdout(writer).output().unwrap();
        let outcome = Outcome::from(output);
        assert_eq!((outcome.code, outcome.stderr.as_str()), (0, ""), "{flag} into a closed pipe");
    }
}

/// A reader that went away (broken pipe: the pipe's read end is closed before the command
/// starts, so its first write fails) stays quiet with status 0.
#[test]
fn a_closed_stdout_is_quiet_and_status_0() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = Command::new(env!("CARGO_BIN_EXE_effnet"))
        .args(["model", "summary", "--all"])
        .stdout(writer)
        .output()
        .unwrap();
    let outcome = Outcome::from(output);
    assert_eq!((outcome.code, outcome.stderr.as_str()), (0, ""));
}

/// The binary run as a user runs it: no `RUST_BACKTRACE` from the test's environment.
fn without_backtrace(args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let mut command = Command::new(env!("CARGO_BIN_EXE_effnet"));
    command
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    Outcome::from(command.output().unwrap())
}

/// A panic on the main thread and on another thread: one line naming the place and where to
/// report it, exit status 1, no "panicked" text. `EFFNET_TEST_PANIC` is the binary's hook for
/// this test (no input is known to make the tool panic).
#[test]
fn a_panic_on_any_thread_is_one_line_and_status_1() {
    for (thread, message) in [("main", "on the main thread"), ("thread", "on a thread")] {
        let outcome = without_backtrace(&["model", "summary"], &[("EFFNET_TEST_PANIC", thread)]);
        assert_eq!(outcome.code, 1, "{}", outcome.stderr);
        assert_eq!(outcome.stderr.lines().count(), 1, "{}", outcome.stderr);
        let line = outcome.stderr.trim_end();
        assert!(line.starts_with(&format!("error: internal error: EFFNET_TEST_PANIC asked for a panic {message} (at crates/effnet-cli/src/main.rs:")), "{line}");
        assert!(line.ends_with("; please report it at https://github.com/effnet/effnet/issues"), "{line}");
        assert!(!outcome.stderr.contains("panicked"), "{line}");
        assert_eq!(outcome.stdout, "", "the command never ran");
    }
    // A developer's RUST_BACKTRACE still gets the backtrace, after the same first line.
    let output = Command::new(env!("CARGO_BIN_EXE_effnet"))
        .args(["model", "summary"])
        .env("EFFNET_TEST_PANIC", "main")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let outcome = Outcome::from(output);
    assert_eq!(outcome.code, 1);
    assert!(outcome.stderr.starts_with("error: internal error: EFFNET_TEST_PANIC"), "{}", outcome.stderr);
    assert!(outcome.stderr.contains("panic_if_asked"), "a backtrace follows: {}", outcome.stderr);
}

/// libtorch running out of memory (tch panics with its error) is one line saying so and what to
/// change, status 2, not an internal error with libtorch's C++ stack: a model whose classifier
/// alone would take 20 TiB.
#[test]
fn running_out_of_memory_is_one_line_and_status_2() {
    let outcome = without_backtrace(&["model", "summary", "--classes", "4294967295"], &[]);
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    assert_eq!(outcome.stderr.lines().count(), 1, "{}", outcome.stderr);
    let line = outcome.stderr.trim_end();
    assert!(
        line.starts_with(
            "error: out of memory: DefaultCPUAllocator: can't allocate memory: you tried to allocate 21990232550400 bytes."
        ),
        "{line}"
    );
    assert!(line.ends_with("lower data.batch_size (optimizer.accumulate_steps keeps the global batch), set model.activation_checkpointing: true, or choose a smaller model or resolution"), "{line}");
    assert!(!line.contains("frame #") && !line.contains("internal error"), "{line}");
}

/// A panic the data reader catches (parquet-rs panics on some corrupt pages; the reader reports
/// the file as corrupt) does not end the process: the hook leaves it alone and the command runs.
#[test]
fn a_panic_the_data_reader_catches_does_not_end_the_process() {
    let output = Command::new(env!("CARGO_BIN_EXE_effnet"))
        .args(["model", "summary"])
        .env("EFFNET_TEST_PANIC", "caught")
        .output()
        .unwrap();
    let outcome = Outcome::from(output);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert_eq!(outcome.stderr.trim_end(), "the caught panic was handled");
    assert!(outcome.stdout.contains("EfficientNet-B0"), "{}", outcome.stdout);
}
