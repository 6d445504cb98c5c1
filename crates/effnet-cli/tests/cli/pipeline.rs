//! `effnet pipeline run`: the shipped compound-scaling pipeline's quick version end to end
//! (Fashion-MNIST prepared, three jobs trained by two MPI workers each through `effnet run`'s
//! coordinator, the report and the study's chart), stages skipped when their outputs exist, a
//! lost job output redone alone, and bad pipeline files refused in one line.

use std::path::Path;
use std::process::Command;

use crate::common::{assert_bad_input, effnet_in, workspace_root};

fn copy(from: &str, to: &Path) {
    let target = to.join(from);
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::copy(workspace_root().join(from), target).unwrap();
}

#[test]
fn the_compound_scaling_pipeline_runs_quick_and_skips_what_is_done() {
    let dir = tempfile::tempdir().unwrap();
    copy("pipelines/compound-scaling.yaml", dir.path());
    copy("pipelines/jobs/fashion-mnist-small.yaml", dir.path());
    let run = || effnet_in(dir.path(), &["pipeline", "run", "pipelines/compound-scaling.yaml", "--quick"]);

    let first = run();
    assert_eq!(first.code, 0, "{}{}", first.stdout, first.stderr);
    for job in ["base", "width-1", "compound-1"] {
        assert!(first.stdout.contains(&format!("stage train: job {job} finished in")), "{}", first.stdout);
    }
    assert!(!first.stdout.contains("job depth-1"), "only the quick jobs: {}", first.stdout);
    let out = dir.path().join(".work/pipelines/compound-scaling-quick/report");
    let study: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("study.json")).unwrap()).unwrap();
    let rows = study.as_array().unwrap();
    let field = |key: &str| rows.iter().map(|r| r[key].clone()).collect::<Vec<_>>();
    assert_eq!(field("job"), ["base", "width-1", "compound-1"]);
    assert_eq!(field("width"), [0.5, 0.55, 0.55]);
    assert_eq!(field("depth"), [0.5, 0.5, 0.6]);
    assert_eq!(field("resolution"), [24, 24, 28]);
    assert_eq!(field("steps"), [20, 20, 20]);
    assert_eq!(rows[0]["groups"], serde_json::json!(["width", "depth", "resolution", "compound"]));
    let flops: Vec<u64> = rows.iter().map(|r| r["flops"].as_u64().unwrap()).collect();
    assert!(flops[0] < flops[1] && flops[1] < flops[2], "{flops:?}");
    assert!(rows.iter().all(|r| (0.0..=1.0).contains(&r["top1"].as_f64().unwrap())), "{study}");
    let svg = std::fs::read_to_string(out.join("study.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("compound") && svg.contains("width"), "{svg}");
    let markdown = std::fs::read_to_string(out.join("study.md")).unwrap();
    assert!(markdown.contains("| width | width-1 | EfficientNet-w0.55-d0.5 |"), "{markdown}");
    assert!(out.join("report.html").exists() && out.join("report.json").exists());
    // Each job ran through `effnet run` with two workers and the coordinator.
    let jobs = dir.path().join(".work/pipelines/compound-scaling-quick");
    assert!(jobs.join("base/coordinator").join(effnet_coordinator::DATABASE_FILE).exists());
    // The resolved job files and the coordinator's database keep the URLs' credentials: the
    // owner's only.
    let mode = |path: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&path.metadata().unwrap().permissions()) & 0o777
    };
    let written: Vec<_> = std::fs::read_dir(jobs.join("jobs")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(written.len(), 3, "{written:?}");
    for file in written.iter().chain([&jobs.join("base/coordinator").join(effnet_coordinator::DATABASE_FILE)])
    {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }

    // Everything is there: every stage is skipped.
    let again = run();
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(again.stdout.contains("stage data: skipped"), "{}", again.stdout);
    for job in ["base", "width-1", "compound-1"] {
        assert!(again.stdout.contains(&format!("job {job} skipped (finished in")), "{}", again.stdout);
    }
    assert!(again.stdout.contains("stage report: skipped"), "{}", again.stdout);

    // A job whose output is lost is run again (it resumes from its last checkpoint), alone, and
    // the report is rebuilt.
    std::fs::remove_file(jobs.join("width-1/summary.json")).unwrap();
    let redo = run();
    assert_eq!(redo.code, 0, "{}", redo.stderr);
    assert!(redo.stdout.contains("job base skipped") && redo.stdout.contains("job compound-1 skipped"));
    assert!(redo.stdout.contains("stage train: job width-1 finished in"), "{}", redo.stdout);
    assert!(!redo.stdout.contains("stage report: skipped"), "{}", redo.stdout);
    assert!(jobs.join("width-1/summary.json").exists());

    // Changed settings make a finished job start over: its old checkpoints belong to the old ones.
    let file = dir.path().join("pipelines/compound-scaling.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("training.steps=20,", "training.steps=24,")).unwrap();
    let changed = run();
    assert_eq!(changed.code, 0, "{}", changed.stderr);
    assert_eq!(changed.stdout.matches("--fresh: its settings changed)").count(), 3, "{}", changed.stdout);
    let study: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("study.json")).unwrap()).unwrap();
    let steps: Vec<u64> = study.as_array().unwrap().iter().map(|r| r["steps"].as_u64().unwrap()).collect();
    assert_eq!(steps, [24, 24, 24]);
}

#[test]
fn bad_pipeline_files_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let write = |text: &str| {
        std::fs::write(dir.path().join("p.yaml"), text).unwrap();
        effnet_in(dir.path(), &["pipeline", "run", "p.yaml"])
    };
    let unknown = write("name: p\nwork_dir: w\nstages: []\nstagse: []\n");
    assert_bad_input(&unknown, &["p.yaml", "stagse"]);
    let two = write(
        "name: p\nwork_dir: w\nstages:\n  - name: s\n    prepare: {from: idx, out: o}\n    report: {jobs: t, out: r}\n",
    );
    assert_bad_input(&two, &["p.yaml: stage s: give exactly one of prepare, train, report"]);
    let order = write("name: p\nwork_dir: w\nstages:\n  - name: r\n    report: {jobs: t, out: r}\n");
    assert_bad_input(&order, &["p.yaml: stage r: report.jobs: no train stage \"t\" before it"]);
    let quick = effnet_in(dir.path(), &["pipeline", "run", "p.yaml", "--quick"]);
    assert_bad_input(&quick, &["p.yaml"]);
    let missing = effnet_in(dir.path(), &["pipeline", "run", "absent.yaml"]);
    assert_bad_input(&missing, &["absent.yaml"]);
}

/// With `--coordinator URL` the quick pipeline's jobs are submitted to a standalone coordinator
/// and waited for; a stand-in for a cluster's engine (`mpirun -n 2 effnet worker ...` for each
/// queued job) runs them. The study is built from the job directories the workers wrote, and a
/// second run finds every job done.
#[test]
fn a_pipeline_submits_its_jobs_to_a_coordinator_and_waits_for_them() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    copy("pipelines/compound-scaling.yaml", dir.path());
    copy("pipelines/jobs/fashion-mnist-small.yaml", dir.path());
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "pipeline-token").unwrap();
    // Started elsewhere than the pipeline: the submitted jobs carry absolute paths.
    let coordinator = crate::coordinator::Coordinator::start(&dir.path().join("state"), &token_file);
    let args = |extra: &[&str]| -> Vec<String> {
        let mut all: Vec<String> =
            ["pipeline", "run", "pipelines/compound-scaling.yaml", "--quick", "--coordinator"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        all.push(coordinator.url.clone());
        all.extend(["--token-file".to_string(), token_file.display().to_string()]);
        all.extend(extra.iter().map(|s| s.to_string()));
        all
    };
    let pipeline = Command::new(env!("CARGO_BIN_EXE_effnet"))
        .args(args(&[]))
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // The engine: each queued job's two workers, one job after another, from another directory.
    let elsewhere = tempfile::tempdir().unwrap();
    let mut launched = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while launched.len() < 3 {
        assert!(Instant::now() < deadline, "jobs were not submitted: {launched:?}");
        let status = crate::coordinator::client(&coordinator, &token_file, &["status", "--json"]);
        let jobs: serde_json::Value = serde_json::from_str(&status.stdout).unwrap_or_default();
        for job in jobs.as_array().into_iter().flatten() {
            let id = job["id"].as_str().unwrap().to_string();
            if job["state"] != "queued" || !launched.insert(id.clone()) {
                continue;
            }
            let workers = crate::coordinator::mpi_worker_command(2, &coordinator, &id, &token_file)
                .current_dir(elsewhere.path())
                .output()
                .unwrap();
            assert!(workers.status.success(), "job {id}: {}", String::from_utf8_lossy(&workers.stderr));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let output = pipeline.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    for job in ["base", "width-1", "compound-1"] {
        assert!(
            stdout.contains(&format!("stage train: job {job} submitted to {}", coordinator.url)),
            "{stdout}"
        );
    }
    assert_eq!(stdout.matches(") succeeded").count(), 3, "{stdout}");
    let study: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join(".work/pipelines/compound-scaling-quick/report/study.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(study.as_array().unwrap().len(), 3, "{study}");
    assert!(!elsewhere.path().join(".work").exists(), "the workers wrote where the pipeline said");

    let again = effnet_in(dir.path(), &args(&[]).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.stdout.matches(" skipped (finished in").count(), 3, "{}", again.stdout);
    let status = crate::coordinator::client(&coordinator, &token_file, &["status", "--json"]);
    let jobs: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let states: Vec<&str> = jobs.as_array().unwrap().iter().map(|j| j["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["succeeded"; 3]);
}
