//! Helpers shared by the CLI integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn effnet(args: &[&str]) -> Outcome {
    effnet_with_env(args, &[])
}

/// Run the binary with extra environment variables.
pub fn effnet_with_env(args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let output = Command::new(env!("CARGO_BIN_EXE_effnet"))
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .output()
        .expect("effnet binary runs");
    Outcome {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Assert exit status 2 and exactly one non-empty line on stderr containing every `needle`.
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
