//! Parity with PyTorch: torchvision's and timm's EfficientNets with random weights are exported
//! by tests/reference/export_reference.py (run with the project's venv), loaded by
//! `effnet model infer`, and the logits compared. The script calibrates BatchNorm statistics so
//! logits are far from zero (with untouched statistics any model would "match").

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::common::{assert_bad_input, effnet, workspace_root};
use serde_json::{Value, json};
use tch::Tensor;

/// Relative tolerance on logits: max |ours - reference| / max |reference|.
const TOLERANCE: f64 = 1e-4;

struct Case {
    name: &'static str,
    source: &'static str,
    variant: &'static str,
    resolution: u32,
    classes: u32,
    input_channels: u32,
    /// Extra `effnet model infer` arguments.
    extra: &'static [&'static str],
}

const CASES: [Case; 5] = [
    Case {
        name: "tv_b0",
        source: "torchvision",
        variant: "b0",
        resolution: 224,
        classes: 1000,
        input_channels: 3,
        extra: &[],
    },
    Case {
        name: "tv_b7",
        source: "torchvision",
        variant: "b7",
        resolution: 96,
        classes: 1000,
        input_channels: 3,
        extra: &[],
    },
    Case {
        name: "tv_b2_grey",
        source: "torchvision",
        variant: "b2",
        resolution: 64,
        classes: 10,
        input_channels: 1,
        extra: &[],
    },
    Case {
        name: "timm_b0",
        source: "timm",
        variant: "b0",
        resolution: 160,
        classes: 10,
        input_channels: 1,
        extra: &[],
    },
    Case {
        name: "timm_b5",
        source: "timm",
        variant: "b5",
        resolution: 96,
        classes: 100,
        input_channels: 3,
        extra: &["--batch-norm", "timm"],
    },
];

fn reference_python() -> PathBuf {
    std::env::var_os("EFFNET_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"))
}

/// Export every case once per test binary.
fn exported() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<Value> = CASES
            .iter()
            .enumerate()
            .map(|(seed, c)| {
                json!({"name": c.name, "source": c.source, "variant": c.variant, "resolution": c.resolution,
                       "batch": 2, "classes": c.classes, "input_channels": c.input_channels, "seed": seed + 1})
            })
            .collect();
        let python = reference_python();
        let output = Command::new(&python)
            .arg(workspace_root().join("tests/reference/export_reference.py"))
            .arg(dir.path())
            .arg(serde_json::to_string(&cases).unwrap())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run {} ({e}): run `make venv-reference` (or `make test`)", python.display())
            });
        assert!(
            output.status.success(),
            "reference export failed (run `make venv-reference`): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        dir
    })
    .path()
}

fn case(name: &str) -> &'static Case {
    CASES.iter().find(|c| c.name == name).unwrap()
}

fn path_string(path: PathBuf) -> String {
    path.to_string_lossy().into_owned()
}

/// Run our inference on an exported case with optional overrides; return (ours, reference).
fn infer(case: &Case, overrides: &[&str], output_name: &str) -> (Tensor, Tensor) {
    let dir = exported().join(case.name);
    let classes = case.classes.to_string();
    let channels = case.input_channels.to_string();
    let (weights, input, output) = (
        path_string(dir.join("weights.safetensors")),
        path_string(dir.join("input.npy")),
        path_string(dir.join(output_name)),
    );
    let mut args = vec![
        "model",
        "infer",
        "--variant",
        case.variant,
        "--classes",
        &classes,
        "--input-channels",
        &channels,
        "--weights",
        &weights,
        "--input",
        &input,
        "--output",
        &output,
    ];
    args.extend_from_slice(case.extra);
    args.extend_from_slice(overrides);
    let outcome = effnet(&args);
    assert_eq!(outcome.code, 0, "{}: {}", case.name, outcome.stderr);
    (Tensor::read_npy(&output).unwrap(), Tensor::read_npy(dir.join("expected.npy")).unwrap())
}

fn relative_error(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.size(), reference.size());
    let scale = reference.abs().max().double_value(&[]);
    (ours - reference).abs().max().double_value(&[]) / scale
}

fn meta(case: &Case) -> Value {
    let text = std::fs::read_to_string(exported().join(case.name).join("meta.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn check(name: &str) {
    let case = case(name);
    let meta = meta(case);
    // The reference logits are far from zero and differ across classes.
    assert!(meta["logits_std"].as_f64().unwrap() > 0.1, "{name}: degenerate reference {meta}");
    let (ours, reference) = infer(case, &[], "ours.npy");
    let error = relative_error(&ours, &reference);
    assert!(error <= TOLERANCE, "{name}: relative error {error}");

    // Parameters and multiply-adds agree with PyTorch's own counts at this resolution.
    let resolution = case.resolution.to_string();
    let (classes, channels) = (case.classes.to_string(), case.input_channels.to_string());
    let summary = effnet(&[
        "model",
        "summary",
        "--variant",
        case.variant,
        "--classes",
        &classes,
        "--input-channels",
        &channels,
        "--resolution",
        &resolution,
        "--json",
    ]);
    let summary: Value = serde_json::from_str(&summary.stdout).unwrap();
    assert_eq!(summary["parameters"], meta["parameters"], "{name}: parameters");
    assert_eq!(
        summary["multiply_adds"], meta["multiply_adds"],
        "{name}: multiply-adds vs torch FlopCounterMode"
    );
}

#[test]
fn torchvision_b0_matches() {
    check("tv_b0");
}

#[test]
fn torchvision_b7_matches_at_reduced_resolution() {
    check("tv_b7");
}

#[test]
fn torchvision_b2_grey_matches() {
    check("tv_b2_grey");
}

#[test]
fn timm_b0_matches() {
    check("timm_b0");
}

#[test]
fn timm_b5_matches_at_reduced_resolution() {
    check("timm_b5");
}

#[test]
fn the_comparison_detects_a_wrong_model() {
    // Same weights, BatchNorm eps 1e-3 instead of torchvision's 1e-5 for B0: a small change
    // the comparison must catch, so a pass above means something.
    let (ours, reference) = infer(case("tv_b0"), &["--batch-norm", "tf"], "tf.npy");
    let error = relative_error(&ours, &reference);
    assert!(error > 10.0 * TOLERANCE, "eps change went unnoticed: {error}");

    // Weights of B0 do not load into B1.
    let dir = exported().join("tv_b0");
    let outcome = effnet(&[
        "model",
        "infer",
        "--variant",
        "b1",
        "--weights",
        &path_string(dir.join("weights.safetensors")),
        "--input",
        &path_string(dir.join("input.npy")),
        "--output",
        &path_string(dir.join("b1.npy")),
    ]);
    assert_bad_input(&outcome, &["weights.safetensors", "features."]);
}
