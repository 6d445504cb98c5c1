//! `infra/k8s` without a cluster (none can run here): the kustomization rendered and every
//! resource validated against the Kubernetes schemas in strict mode (`infra/k8s/validate.py`,
//! kubernetes-validate), broken copies refused, and the workers' exact command line from
//! `workers.yaml` run against a real coordinator as a pod would run it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{Outcome, synthetic_dataset, workspace_root};
use crate::coordinator::{Coordinator, client};

fn python() -> PathBuf {
    let python = workspace_root().join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run `make venv-reference`", python.display());
    python
}

fn validate(dir: &Path) -> Outcome {
    Command::new(python())
        .arg(workspace_root().join("infra/k8s/validate.py"))
        .arg(dir)
        .output()
        .unwrap()
        .into()
}

/// A copy of infra/k8s with `edit` applied to `file`.
fn edited_copy(file: &str, edit: impl Fn(&str) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(workspace_root().join("infra/k8s")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let text = if name == file { edit(&text) } else { text };
        std::fs::write(dir.path().join(&name), text).unwrap();
    }
    dir
}

#[test]
fn manifests_validate_offline_and_the_worker_command_line_trains() {
    let valid = validate(&workspace_root().join("infra/k8s"));
    assert_eq!(valid.code, 0, "{}{}", valid.stdout, valid.stderr);
    for resource in [
        "statefulset/effnet-coordinator",
        "service/effnet-coordinator",
        "job/effnet-workers",
        "configmap/effnet-job",
    ] {
        assert!(
            valid.stdout.contains(&format!("valid {resource} (Kubernetes 1.33.0, strict)")),
            "{}",
            valid.stdout
        );
    }
    // The job file is a valid effnet job.
    effnet_config::JobSpec::load(&workspace_root().join("infra/k8s/job.yaml")).unwrap();

    // Broken copies are refused, naming what is wrong.
    let typo = edited_copy("workers.yaml", |t| t.replace("completionMode:", "completionMod:"));
    let refused = validate(typo.path());
    assert_eq!(refused.code, 1, "{}", refused.stdout);
    assert!(refused.stdout.contains("'completionMod' was unexpected"), "{}", refused.stdout);
    let sizes = edited_copy("job.yaml", |t| t.replace("workers: 2", "workers: 3"));
    let refused = validate(sizes.path());
    assert_eq!(refused.code, 1, "{}", refused.stdout);
    assert!(refused.stdout.contains("world sizes disagree"), "{}", refused.stdout);
    let restart = edited_copy("workers.yaml", |t| t.replace("values: [75]", "values: [76]"));
    let refused = validate(restart.path());
    assert!(refused.stdout.contains("exit 75 must be Ignore"), "{}", refused.stdout);

    // The workers' container arguments, exactly as the manifest has them.
    let output = Command::new(python())
        .args([
            "-c",
            "import json, sys, yaml\n\
             job = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d][0]\n\
             print(json.dumps(job['spec']['template']['spec']['containers'][0]['args']))",
        ])
        .arg(workspace_root().join("infra/k8s/workers.yaml"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let args: Vec<String> = serde_json::from_slice(&output.stdout).unwrap();

    // A pod of a one-worker Job: its mounts and downward-API variable replaced by local ones.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "k8s-test-token").unwrap();
    let coordinator = Coordinator::start(&dir.path().join("state"), &token_file);
    let train = dir.path().join("train");
    synthetic_dataset(train.to_str().unwrap(), 96, 0, 16);
    let job_file = crate::exactly_once::write_job_reading(dir.path(), train.to_str().unwrap(), 1);
    let args: Vec<String> = args
        .into_iter()
        .map(|arg| match arg.as_str() {
            "http://effnet-coordinator:7700" => coordinator.url.clone(),
            "/etc/effnet/job/job.yaml" => job_file.display().to_string(),
            "/etc/effnet/token/token" => token_file.display().to_string(),
            "$(EFFNET_JOB_KEY)" => "0b7c-uid-of-the-job".to_string(),
            other => other.to_string(),
        })
        .collect();
    assert!(args.iter().all(|a| !a.starts_with("/etc/") && !a.contains("$(")), "{args:?}");
    let pod = Command::new(env!("CARGO_BIN_EXE_effnet"))
        .args(&args)
        .env("JOB_COMPLETION_INDEX", "0")
        .env("WORLD_SIZE", "1")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(pod.status.code(), Some(0), "{}", String::from_utf8_lossy(&pod.stderr));

    // One coordinator job, found again by the Job's uid.
    let status = client(&coordinator, &token_file, &["status", "--json"]);
    let jobs: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(jobs.as_array().unwrap().len(), 1, "{jobs}");
    assert_eq!(
        (jobs[0]["id"].as_str(), jobs[0]["state"].as_str()),
        (Some("exactly-once-1"), Some("succeeded"))
    );
    let again = client(
        &coordinator,
        &token_file,
        &["submit", job_file.to_str().unwrap(), "--key", "0b7c-uid-of-the-job"],
    );
    assert_eq!((again.code, again.stdout.trim()), (0, "exactly-once-1"), "{}", again.stderr);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("job/summary.json")).unwrap()).unwrap();
    assert_eq!(summary["epochs_completed"], 1);
}
