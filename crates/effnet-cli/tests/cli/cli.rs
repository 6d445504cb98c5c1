//! `effnet model summary|infer` end to end through the binary.

use crate::common::{assert_bad_input, effnet};
use effnet_model::{EfficientNet, EfficientNetConfig, Variant, save_safetensors};
use serde_json::Value;
use tch::{Device, Kind, Tensor, nn, nn::ModuleT};

fn json(args: &[&str]) -> Value {
    let outcome = effnet(args);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    serde_json::from_str(&outcome.stdout).expect("valid JSON")
}

#[test]
fn summary_all_matches_torchvision_parameter_counts() {
    let rows = json(&["model", "summary", "--all", "--json"]);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 8);
    let expected =
        [5_288_548, 7_794_184, 9_109_994, 12_233_232, 19_341_616, 30_389_784, 43_040_704, 66_347_960];
    for (row, parameters) in rows.iter().zip(expected) {
        assert_eq!(row["parameters"].as_i64(), Some(parameters), "{row}");
        assert_eq!(row["reference_parameters"].as_i64(), Some(parameters));
    }
    assert_eq!(rows[7]["resolution"], 600);
    let b0_gflops = rows[0]["gflops"].as_f64().unwrap();
    assert!((b0_gflops - 0.3858).abs() < 1e-4, "{b0_gflops}");

    let table = effnet(&["model", "summary", "--all"]);
    assert_eq!(table.code, 0);
    assert!(table.stdout.contains("66,347,960"), "{}", table.stdout);
    assert!(table.stdout.contains("parameter counts all equal torchvision's"));
}

#[test]
fn summary_of_b7_lists_stages() {
    let summary = json(&["model", "summary", "--variant", "b7", "--json"]);
    assert_eq!(summary["parameters"], 66_347_960);
    assert_eq!(summary["resolution"], 600);
    assert_eq!(summary["width"], 2.0);
    assert_eq!(summary["depth"], 3.1);
    assert_eq!(summary["dropout"], 0.5);
    assert_eq!(summary["batch_norm_eps"], 0.001);
    let stages = summary["stages"].as_array().unwrap();
    let channels: Vec<i64> = stages.iter().map(|s| s["channels"].as_i64().unwrap()).collect();
    assert_eq!(channels, [64, 32, 48, 80, 160, 224, 384, 640, 2560]);
    let layers: Vec<i64> = stages.iter().map(|s| s["layers"].as_i64().unwrap()).collect();
    assert_eq!(layers, [1, 4, 7, 7, 10, 10, 13, 4, 1]);
    let sides: Vec<i64> = stages.iter().map(|s| s["resolution"].as_i64().unwrap()).collect();
    assert_eq!(sides, [600, 300, 300, 150, 75, 38, 38, 19, 19]);
    let gflops = summary["gflops"].as_f64().unwrap();
    assert!((gflops - 37.75).abs() < 0.01, "{gflops}");

    // --resolution changes only the FLOPs count; --classes the head.
    let small =
        json(&["model", "summary", "--variant", "b7", "--resolution", "300", "--classes", "10", "--json"]);
    assert_eq!(small["resolution"], 300);
    assert_eq!(small["native_resolution"], 600);
    assert_eq!(small["parameters"], 66_347_960 - 2561 * 990);
    assert!(small["gflops"].as_f64().unwrap() < gflops / 3.5);
}

#[test]
fn summary_of_custom_phi() {
    let summary = json(&["model", "summary", "--phi", "1", "--json"]);
    assert!((summary["width"].as_f64().unwrap() - 1.1).abs() < 1e-12);
    assert!((summary["depth"].as_f64().unwrap() - 1.2).abs() < 1e-12);
    assert_eq!(summary["resolution"], 256); // 224 * 1.15 = 257.6 -> 256
    let with_coefficients = json(&[
        "model", "summary", "--phi", "2", "--alpha", "1.1", "--beta", "1.2", "--gamma", "1.0", "--json",
    ]);
    assert!((with_coefficients["width"].as_f64().unwrap() - 1.44).abs() < 1e-12);
    assert_eq!(with_coefficients["resolution"], 224);
    let text = effnet(&["model", "summary", "--phi", "1.5"]);
    assert_eq!(text.code, 0);
    assert!(text.stdout.starts_with("EfficientNet-phi1.5"), "{}", text.stdout);
}

#[test]
fn summary_bad_input_is_one_line_and_exit_2() {
    assert_bad_input(&effnet(&["model", "summary", "--variant", "b9"]), &["'b9'"]);
    assert_bad_input(&effnet(&["model", "summary", "--classes", "0"]), &["--classes", "0"]);
    assert_bad_input(&effnet(&["model", "summary", "--classes", "-4"]), &["--classes", "-4"]);
    assert_bad_input(&effnet(&["model", "summary", "--phi", "1", "--alpha", "0"]), &["alpha", "0"]);
    assert_bad_input(&effnet(&["model", "summary", "--phi", "1", "--gamma", "-1.5"]), &["gamma", "-1.5"]);
    assert_bad_input(&effnet(&["model", "summary", "--phi", "nan"]), &["phi", "NaN"]);
    assert_bad_input(&effnet(&["model", "summary", "--resolution", "5"]), &["--resolution", "5"]);
    assert_bad_input(&effnet(&["model", "summary", "--drop-path-rate", "1.2"]), &["drop_path_rate", "1.2"]);
    assert_bad_input(&effnet(&["model", "summary", "--batch-norm", "keras"]), &["batch_norm", "keras"]);
    assert_bad_input(&effnet(&["model", "summary", "--bogus"]), &["--bogus"]);
    assert_bad_input(&effnet(&["model", "summary", "--classes", "many"]), &["--classes", "many"]);
}

/// Output piped into a reader that has gone (`effnet model summary --all | head -1`) ends the
/// command quietly with status 0, not with a panic.
#[test]
fn a_closed_stdout_is_not_a_panic() {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_effnet"))
        .args(["model", "summary", "--all"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes before the first line is written
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn help_succeeds() {
    for args in [
        &["--help"][..],
        &["model", "--help"],
        &["model", "summary", "--help"],
        &["model", "infer", "--help"],
    ] {
        let outcome = effnet(args);
        assert_eq!(outcome.code, 0, "{args:?}");
        assert!(outcome.stdout.contains("Usage"), "{args:?}");
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    expected: Tensor,
}

impl Fixture {
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }
}

/// A grey 3-class B0 with non-trivial BatchNorm statistics, its weights, an input, and the
/// logits computed in this process.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let config = EfficientNetConfig::named(Variant::B0).with_classes(3).with_input_channels(1);
    let model = EfficientNet::new(&vs.root(), &config).unwrap();
    tch::no_grad(|| {
        for (name, mut tensor) in vs.variables() {
            if name.ends_with("running_var") {
                let _ = tensor.uniform_(0.5, 2.0);
            }
            // BatchNorm shift and scale, so activations do not vanish with depth.
            if name.ends_with(".1.bias") {
                let _ = tensor.normal_(0.0, 0.5);
            }
            if name.ends_with(".1.weight") {
                let _ = tensor.uniform_(0.5, 1.5);
            }
        }
    });
    save_safetensors(&vs, &dir.path().join("weights.safetensors")).unwrap();
    let input = Tensor::randn([5, 1, 48, 48], (Kind::Float, Device::Cpu));
    input.write_npy(dir.path().join("input.npy")).unwrap();
    let expected = tch::no_grad(|| model.forward_t(&input, false));
    Fixture { dir, expected }
}

fn infer_args<'a>(fixture_args: &'a [&'a str]) -> Vec<&'a str> {
    let mut args = vec!["model", "infer", "--variant", "b0", "--classes", "3", "--input-channels", "1"];
    args.extend_from_slice(fixture_args);
    args
}

#[test]
fn infer_reproduces_in_process_logits() {
    let fixture = fixture();
    let (weights, input, output) =
        (fixture.path("weights.safetensors"), fixture.path("input.npy"), fixture.path("out.npy"));
    let outcome = effnet(&infer_args(&[
        "--weights",
        &weights,
        "--input",
        &input,
        "--output",
        &output,
        "--batch-size",
        "2",
    ]));
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let logits = Tensor::read_npy(&output).unwrap();
    assert_eq!(logits.size(), [5, 3]);
    let scale = fixture.expected.abs().max().double_value(&[]);
    let error = (&logits - &fixture.expected).abs().max().double_value(&[]);
    assert!(scale > 1e-3, "degenerate logits");
    assert!(error <= 1e-5 * scale, "max error {error} vs scale {scale}");
}

#[test]
fn infer_logs_json_lines_when_asked() {
    let fixture = fixture();
    let (weights, input, output) =
        (fixture.path("weights.safetensors"), fixture.path("input.npy"), fixture.path("out.npy"));
    let mut args = vec!["--log-format", "json"];
    let tail = ["--weights", weights.as_str(), "--input", input.as_str(), "--output", output.as_str()];
    args.extend(infer_args(&tail));
    let result = std::process::Command::new(env!("CARGO_BIN_EXE_effnet"))
        .args(&args)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(result.status.success());
    let stderr = String::from_utf8(result.stderr).unwrap();
    let events: Vec<Value> =
        stderr.lines().map(|l| serde_json::from_str(l).expect("JSON log line")).collect();
    assert!(
        events.iter().any(|e| e["fields"]["message"] == "loaded weights" && e["fields"]["tensors"] == 311)
    );
}

#[test]
fn infer_bad_input_is_one_line_and_exit_2() {
    let fixture = fixture();
    let dir = fixture.dir.path();
    let (input, output) = (fixture.path("input.npy"), fixture.path("out.npy"));
    let saved = Tensor::read_safetensors(dir.join("weights.safetensors")).unwrap();

    let missing = fixture.path("missing.safetensors");
    let kept: Vec<(String, Tensor)> = saved
        .iter()
        .filter(|(n, _)| n != "features.4.0.block.1.1.weight")
        .map(|(n, t)| (n.clone(), t.copy()))
        .collect();
    Tensor::write_safetensors(&kept, &missing).unwrap();
    let run = |weights: &str, input: &str| {
        effnet(&infer_args(&["--weights", weights, "--input", input, "--output", &output]))
    };
    assert_bad_input(&run(&missing, &input), &["features.4.0.block.1.1.weight", "missing"]);

    let misshaped = fixture.path("misshaped.safetensors");
    let reshaped: Vec<(String, Tensor)> = saved
        .iter()
        .map(|(n, t)| {
            if n == "features.0.0.weight" {
                (n.clone(), Tensor::zeros([32, 3, 3, 3], (Kind::Float, Device::Cpu)))
            } else {
                (n.clone(), t.copy())
            }
        })
        .collect();
    Tensor::write_safetensors(&reshaped, &misshaped).unwrap();
    assert_bad_input(&run(&misshaped, &input), &["features.0.0.weight", "[32, 3, 3, 3]", "[32, 1, 3, 3]"]);

    let weights = fixture.path("weights.safetensors");
    assert_bad_input(&run(&fixture.path("nowhere.safetensors"), &input), &["nowhere.safetensors"]);
    assert_bad_input(&run(&input, &input), &["input.npy"]); // an .npy is no safetensors file

    let rgb = fixture.path("rgb.npy");
    Tensor::zeros([2, 3, 32, 32], (Kind::Float, Device::Cpu)).write_npy(&rgb).unwrap();
    assert_bad_input(&run(&weights, &rgb), &["rgb.npy", "3 channels"]);
    let flat = fixture.path("flat.npy");
    Tensor::zeros([2, 32], (Kind::Float, Device::Cpu)).write_npy(&flat).unwrap();
    assert_bad_input(&run(&weights, &flat), &["flat.npy", "4 dimensions"]);
    let text = fixture.path("text.npy");
    std::fs::write(&text, "not numpy").unwrap();
    assert_bad_input(&run(&weights, &text), &["text.npy"]);

    let other_variant = effnet(&[
        "model",
        "infer",
        "--variant",
        "b1",
        "--classes",
        "3",
        "--input-channels",
        "1",
        "--weights",
        &weights,
        "--input",
        &input,
        "--output",
        &output,
    ]);
    assert_bad_input(&other_variant, &["weights.safetensors"]);
    let bad_device = effnet(&infer_args(&[
        "--weights",
        &weights,
        "--input",
        &input,
        "--output",
        &output,
        "--device",
        "tpu",
    ]));
    assert_bad_input(&bad_device, &["--device", "tpu"]);
    let bad_layout = effnet(&infer_args(&[
        "--weights",
        &weights,
        "--input",
        &input,
        "--output",
        &output,
        "--layout",
        "keras",
    ]));
    assert_bad_input(&bad_layout, &["keras"]);
    assert!(!std::path::Path::new(&output).exists(), "no output may be written on bad input");
}
