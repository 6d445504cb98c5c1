//! `effnet report` on real (short) training runs: one interrupted by SIGKILL and resumed, one
//! without EMA. The numbers in report.md and report.html are those of report.json, which are the
//! evaluator's (`effnet eval --json` on the final checkpoint); the HTML is opened in headless
//! Chromium; bad job directories get one clear line.

use crate::common;
use crate::common::browser;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{assert_bad_input, effnet, synthetic_dataset};
use effnet_report::format::{count, percent};
use serde_json::Value;

struct Data {
    dir: PathBuf,
    _temp: tempfile::TempDir,
}

fn data() -> Data {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().to_path_buf();
    synthetic_dataset(dir.join("train").to_str().unwrap(), 64, 0, 16);
    synthetic_dataset(dir.join("val").to_str().unwrap(), 32, 1, 16);
    Data { dir, _temp: temp }
}

/// A job of `steps` steps (8 per epoch) evaluating and saving every 4.
fn job_yaml(data: &Data, name: &str, steps: u64, ema: bool) -> PathBuf {
    let yaml = data.dir.join(format!("{name}.yaml"));
    std::fs::write(
        &yaml,
        format!(
            "name: {name}
job_dir: {job}
seed: 5
model: {{variant: b0, input_channels: 1, resolution: 16, classifier_init: zero, drop_path: {{rate: 0.1, schedule: linear, ramp_steps: 6}}}}
data:
  train: {train}
  val: {val}
  batch_size: 8
  normalization: fashion_mnist
optimizer: {{kind: adamw, lr: 0.03}}
schedule: {{kind: cosine, warmup_steps: 2}}
training: {{steps: {steps}, threads: 1, ema: {{enabled: {ema}, decay: 0.9}}}}
eval: {{every_steps: 4}}
checkpoint: {{every_steps: 4, keep_last: 10}}
",
            job = data.dir.join(name).display(),
            train = data.dir.join("train").display(),
            val = data.dir.join("val").display(),
        ),
    )
    .unwrap();
    yaml
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap()
}

/// Train `yaml`, SIGKILLed once the step-4 checkpoint is committed, then resumed to the end.
fn train_interrupted(yaml: &Path, job_dir: &Path) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_effnet"))
        .args(["run", yaml.to_str().unwrap(), "--progress", "never"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    crate::common::wait_for_commit(&mut child, &job_dir.join("checkpoints"), 4);
    // Let it train a little past the checkpoint, so the resumed run redoes steps.
    std::thread::sleep(Duration::from_millis(400));
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let resumed = effnet(&["run", yaml.to_str().unwrap(), "--progress", "never"]);
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    assert!(resumed.stdout.contains("report           "), "the run ends with its report: {}", resumed.stdout);
}

fn eval_final(checkpoint: &str, data: &Path, ema: bool) -> Value {
    let data = data.to_str().unwrap();
    // The trainer evaluates in batches of 2 × 8 on one thread: the same here, so even the loss
    // (a float sum) is bitwise the trainer's.
    let mut args = vec!["--checkpoint", checkpoint, "--data", data, "--batch-size", "16", "--threads", "1"];
    if ema {
        args.push("--ema");
    }
    common::eval_json(&args)
}

#[test]
fn report_of_real_runs_agrees_with_the_evaluator_and_renders_in_chromium() {
    let data = data();
    let main_dir = data.dir.join("main");
    train_interrupted(&job_yaml(&data, "main", 12, true), &main_dir);
    // The run wrote its own report at the end.
    for file in ["report.md", "report.html", "report.json", "accuracy-vs-params.svg"] {
        assert!(main_dir.join("report").join(file).is_file(), "{file} after effnet run");
    }
    let other_yaml = job_yaml(&data, "other", 8, false);
    let other = effnet(&["run", other_yaml.to_str().unwrap(), "--progress", "never"]);
    assert_eq!(other.code, 0, "{}", other.stderr);
    // Started over with --fresh: the report covers the second run only.
    let other = effnet(&["run", other_yaml.to_str().unwrap(), "--progress", "never", "--fresh"]);
    assert_eq!(other.code, 0, "{}", other.stderr);

    let out = data.dir.join("out");
    let outcome = effnet(&[
        "report",
        "--job-dir",
        main_dir.to_str().unwrap(),
        "--job-dir",
        data.dir.join("other").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let report = read_json(&out.join("report.json"));
    let markdown = std::fs::read_to_string(out.join("report.md")).unwrap();
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();

    // The paper's rows, as the paper prints them, with the source.
    let reference = report["reference"]["rows"].as_array().unwrap();
    assert_eq!(reference.len(), 24);
    let row = |name: &str| reference.iter().find(|r| r["model"] == name).unwrap().clone();
    assert_eq!(row("EfficientNet-B0")["top1"], 0.771);
    assert_eq!(row("ResNet-50")["params"], 26e6);
    assert_eq!(row("GPipe")["params"], 557e6);
    assert_eq!(row("GPipe")["top1"], 0.843);
    assert!(report["reference"]["source"].as_str().unwrap().contains("1905.11946"));
    assert!(markdown.contains("1905.11946") && html.contains("1905.11946"));
    assert!(markdown.contains("| ResNet-50 | ImageNet | – | – | 76.0% | 93.0% | 26M | 4.91× | 4.1B | 11× |"));
    assert!(html.contains("<td>ResNet-50</td><td>ImageNet</td>"));

    // Measured rows: the final evaluation of each job, equal to the evaluator's output.
    let measured = report["measured"].as_array().unwrap();
    assert_eq!(measured.len(), 3, "main raw + EMA, other raw: {measured:?}");
    let final_checkpoint = main_dir.join("checkpoints/step-00000012").display().to_string();
    let raw = eval_final(&final_checkpoint, &data.dir.join("val"), false);
    let ema = eval_final(&final_checkpoint, &data.dir.join("val"), true);
    let job = &report["jobs"][0];
    for (evaluated, stored, row) in [
        (&raw, &job["final_evaluation"]["raw"], &measured[0]),
        (&ema, &job["final_evaluation"]["ema"], &measured[1]),
    ] {
        for key in ["top1", "top5", "loss", "samples", "confusion", "classes", "parameters", "gflops", "step"]
        {
            assert_eq!(evaluated[key], stored[key], "{key}: effnet eval vs the report's final evaluation");
        }
        assert_eq!(row["top1"], evaluated["top1"]);
        assert_eq!(row["top5"], evaluated["top5"]);
        assert_eq!(row["loss"], evaluated["loss"]);
        assert_eq!(row["samples"], evaluated["samples"]);
        assert_eq!(row["params"].as_f64().unwrap(), evaluated["parameters"].as_f64().unwrap());
        assert_eq!(row["flops"].as_f64().unwrap(), evaluated["gflops"].as_f64().unwrap() * 1e9);
        assert_eq!(row["checkpoint"], final_checkpoint.as_str());
        // And the documents show those numbers.
        let top1 = percent(row["top1"].as_f64().unwrap());
        let top5 = percent(row["top5"].as_f64().unwrap());
        let params = count(row["params"].as_f64().unwrap());
        for (name, text) in [("report.md", &markdown), ("report.html", &html)] {
            for needle in [&top1, &top5, &params] {
                assert!(text.contains(needle.as_str()), "{name} lacks {needle}");
            }
        }
        for class in evaluated["classes"].as_array().unwrap() {
            let shown = percent(class["top1"].as_f64().unwrap());
            assert!(markdown.contains(&format!(
                "| {} | {} | {shown}",
                class["class"].as_str().unwrap(),
                class["samples"]
            )));
        }
    }
    assert_eq!(measured[0]["weights"], "raw");
    assert_eq!(measured[1]["weights"], "ema");
    assert_eq!(measured[2]["job"], "other");
    let other_job = &report["jobs"][1];
    assert_eq!(other_job["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(other_job["attempts"][0]["attempt"], 2);
    assert_eq!((other_job["restarts"].as_u64(), other_job["steps_done"].as_u64()), (Some(0), Some(8)));
    // Labelled with what they are: never an ImageNet number.
    for row in measured {
        assert_eq!(row["imagenet"], false);
        assert_eq!(row["dataset"], "synthetic");
        assert_eq!(row["resolution"], 16);
        assert_eq!(row["reference"], "EfficientNet-B0");
        assert!(row["reference_basis"].as_str().unwrap().contains("not ImageNet"));
        let ratio = row["params_ratio"].as_f64().unwrap();
        assert!((ratio - row["params"].as_f64().unwrap() / 5.3e6).abs() < 1e-12);
    }
    assert_eq!(measured[0]["epochs"], 1.5);
    assert!(markdown.contains("synthetic (4 classes) | 16×16 | 1.50 |"), "the measured row says what it is");

    // Restarts and time lost, against the log itself.
    let metrics: Vec<Value> = std::fs::read_to_string(main_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let resumed_at =
        metrics.iter().find(|r| r["type"] == "start" && r["attempt"] == 2).unwrap()["step"].as_u64();
    assert_eq!(resumed_at, Some(4));
    let redone = metrics
        .iter()
        .filter(|r| r["type"] == "step" && r["attempt"] == 1 && r["step"].as_u64().unwrap() > 4)
        .count() as u64;
    assert_eq!(job["restarts"], 1);
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["outcome"], "interrupted");
    assert_eq!(attempts[1]["outcome"], "finished");
    assert_eq!(attempts[0]["redone_steps"], redone);
    assert_eq!(attempts[1]["start_step"], 4);
    assert_eq!(attempts[1]["last_step"], 12);
    assert!(job["time_lost_s"].as_f64().unwrap() > 0.0);
    assert_eq!(job["finished"], true);
    assert_eq!(job["steps_done"], 12);

    // Checkpoints: every committed one, with the size of its files on disk.
    let checkpoints = job["checkpoints"].as_array().unwrap();
    let steps: Vec<u64> = checkpoints.iter().map(|c| c["step"].as_u64().unwrap()).collect();
    assert!(steps.ends_with(&[4, 8, 12]), "{steps:?}");
    let on_disk: u64 = std::fs::read_dir(main_dir.join("checkpoints/step-00000012"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != "COMMIT")
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert_eq!(checkpoints.last().unwrap()["bytes"], on_disk);

    // Curves: the drop-path schedule ramps to the rate, the lr follows the log.
    let drop_path = job["series"]["drop_path"].as_array().unwrap();
    assert_eq!(drop_path.len(), 12);
    assert!((drop_path[11][1].as_f64().unwrap() - 0.1).abs() < 1e-12);
    // Step 4 trains with the multiplier of step 3 of a 6-step ramp (records name the step done).
    assert!((drop_path[3][1].as_f64().unwrap() - 0.05).abs() < 1e-12, "{drop_path:?}");
    assert_eq!(job["series"]["loss"].as_array().unwrap().len(), 2, "one loss curve per attempt");
    assert_eq!(job["environment"]["libtorch"], "2.11.0");
    assert_eq!(job["environment"]["world_size"], 1);
    assert_eq!(job["config"]["name"], "main");

    // The same report into a real S3 server (moto on loopback).
    let server = effnet_store::testing::S3TestServer::start().unwrap();
    let env: Vec<(String, String)> = server.env_vars().into_iter().collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let url = server.url("reports/main");
    let outcome = common::effnet_with_env(
        &["report", "--job-dir", main_dir.to_str().unwrap(), "--out", &url, "--json"],
        &env,
    );
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let printed: Value = serde_json::from_str(&outcome.stdout).unwrap();
    let location = server.open("reports/main").unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let stored = runtime.block_on(async {
        let path = location.path("report.json").unwrap();
        effnet_store::get_bytes(location.store.as_ref(), &path).await.unwrap()
    });
    let stored: Value = serde_json::from_slice(&stored).unwrap();
    assert_eq!(stored, printed, "report.json in the bucket is what --json printed");
    assert_eq!(stored["measured"], Value::Array(report["measured"].as_array().unwrap()[..2].to_vec()));
    for name in ["report.md", "report.html", "accuracy-vs-flops.svg"] {
        let path = location.path(name).unwrap();
        let bytes = runtime.block_on(effnet_store::get_bytes(location.store.as_ref(), &path)).unwrap();
        assert!(!bytes.is_empty(), "{name} in the bucket");
    }

    // The HTML in a real browser: no console message (the page's CSP turns any fetch into one),
    // the table and both accuracy plots present, and drawn.
    assert!(!html.contains("<script"));
    let page = browser::open(&out.join("report.html"), 1280, 2000);
    assert!(page.console.is_empty(), "console messages: {:?}", page.console);
    for id in ["accuracy-table", "accuracy-vs-params", "accuracy-vs-flops", "loss", "attempts", "checkpoints"]
    {
        assert!(page.dom.contains(&format!("id=\"{id}\"")), "the page has no element {id}");
    }
    let screenshot = &page.screenshot;
    assert_eq!((screenshot.width, screenshot.height), (1280, 2000));
    let total = (screenshot.width * screenshot.height) as usize;
    let ink = page.ink_pixels();
    assert!(ink > total / 50, "the screenshot is nearly blank: {ink} of {total} pixels");
    // The plots' colours: paper EfficientNets (blue) and the measured point (red).
    assert!(page.pixels_of([0x1f, 0x77, 0xb4], 12) > 50, "no reference points drawn");
    assert!(page.pixels_of([0xd6, 0x27, 0x28], 12) > 10, "no measured point drawn");
}

/// The browser check itself can fail: a page that logs an error and fetches from the network is
/// caught.
#[test]
fn the_browser_check_sees_console_errors_and_blocked_fetches() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("bad.html");
    std::fs::write(
        &page,
        "<!doctype html><html><head><meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'\"></head>\
<body><p>x</p><img src=\"http://example.invalid/a.png\"><script>console.error('broken')</script></body></html>",
    )
    .unwrap();
    let check = browser::open(&page, 400, 300);
    assert!(check.console.iter().any(|l| l.contains("example.invalid")), "{:?}", check.console);
    assert!(check.console.iter().any(|l| l.contains("Content Security Policy")), "{:?}", check.console);
    assert!(check.ink_pixels() > 0);
}

#[test]
fn report_rejects_what_is_not_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let run = |job_dir: &Path| {
        effnet(&["report", "--job-dir", job_dir.to_str().unwrap(), "--out", out.to_str().unwrap()])
    };
    assert_bad_input(&run(&empty), &[empty.to_str().unwrap(), "not a job directory"]);
    let missing = dir.path().join("missing");
    assert_bad_input(&run(&missing), &[missing.to_str().unwrap(), "no such job directory"]);

    // A job that was configured but never started a run.
    let unstarted = dir.path().join("unstarted");
    std::fs::create_dir(&unstarted).unwrap();
    std::fs::write(unstarted.join("job.json"), r#"{"spec": {"name": "x"}, "plan": {"steps_per_epoch": 4, "total_steps": 8, "resolution": 16, "model": {"classes": 4}}}"#).unwrap();
    assert_bad_input(&run(&unstarted), &[unstarted.to_str().unwrap(), "no metrics.jsonl"]);
    std::fs::write(unstarted.join("metrics.jsonl"), "{\"type\": \"step\", \"step\": 1}\n{torn").unwrap();
    assert_bad_input(&run(&unstarted), &[unstarted.to_str().unwrap(), "no start record"]);
    std::fs::write(unstarted.join("job.json"), "{ not json").unwrap();
    assert_bad_input(&run(&unstarted), &["job.json is not valid JSON"]);
    assert!(!out.exists(), "nothing is written for a bad job directory");

    let outcome = effnet(&["report", "--out", out.to_str().unwrap()]);
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    assert!(outcome.stderr.contains("--job-dir"), "{}", outcome.stderr);
}
