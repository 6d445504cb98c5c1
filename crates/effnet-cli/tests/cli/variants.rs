//! One scaling table: `effnet model summary` and `effnet run JOB --check` describe the same
//! network (resolution, dropout, parameters, multiply-adds) for every named variant and for
//! custom phi, and both print the table's values. The job spec once resolved a custom phi with
//! its own copy of the table (phi 1: 258 px, dropout 0.2) while the model used 256 px and 0.25.

use std::path::Path;

use crate::common::{CLASSES, effnet, synthetic_dataset};
use serde_json::Value;

/// What both commands print about the network.
#[derive(Debug, PartialEq)]
struct Network {
    architecture: String,
    resolution: u64,
    dropout: f64,
    parameters: i64,
    multiply_adds: u64,
}

fn run_json(args: &[&str]) -> Value {
    let outcome = effnet(args);
    assert_eq!(outcome.code, 0, "effnet {}: {}", args.join(" "), outcome.stderr);
    serde_json::from_str(&outcome.stdout).unwrap_or_else(|error| panic!("{error}: {}", outcome.stdout))
}

fn field<'a>(json: &'a Value, pointer: &str) -> &'a Value {
    json.pointer(pointer).unwrap_or_else(|| panic!("no {pointer} in {json}"))
}

/// `effnet model summary MODEL --json` for the job's classes and grey input.
fn summary(model: &[&str]) -> Network {
    let classes = CLASSES.to_string();
    let mut args = vec!["model", "summary"];
    args.extend_from_slice(model);
    args.extend(["--classes", &classes, "--input-channels", "1", "--json"]);
    let json = run_json(&args);
    Network {
        architecture: field(&json, "/name").as_str().unwrap().to_string(),
        // `resolution` is where FLOPs were counted; with no --resolution, the network's own.
        resolution: field(&json, "/native_resolution").as_u64().unwrap(),
        dropout: field(&json, "/dropout").as_f64().unwrap(),
        parameters: field(&json, "/parameters").as_i64().unwrap(),
        multiply_adds: field(&json, "/multiply_adds").as_u64().unwrap(),
    }
}

/// `effnet run JOB --check --json` for a job whose `model` section is `model` (no resolution
/// or dropout given, so both come from the table) over the synthetic dataset in `data`.
fn check(data: &Path, model: &str) -> Network {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("job.yaml");
    let text = format!(
        "name: variants
job_dir: {job}
model:
  {model}
  input_channels: 1
data:
  train: {train}
  batch_size: 8
  normalization: fashion_mnist
training:
  steps: 1
",
        job = dir.path().join("job").display(),
        train = data.join("train").display(),
    );
    std::fs::write(&yaml, text).unwrap();
    let json = run_json(&["run", yaml.to_str().unwrap(), "--check", "--json"]);
    assert_eq!(field(&json, "/model/classes").as_u64(), Some(CLASSES as u64), "{json}");
    Network {
        architecture: field(&json, "/model/architecture").as_str().unwrap().to_string(),
        resolution: field(&json, "/resolution").as_u64().unwrap(),
        dropout: field(&json, "/dropout").as_f64().unwrap(),
        parameters: field(&json, "/model/parameters").as_i64().unwrap(),
        multiply_adds: field(&json, "/multiply_adds").as_u64().unwrap(),
    }
}

fn data_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    synthetic_dataset(dir.path().join("train").to_str().unwrap(), 16, 0, 8);
    dir
}

/// Both commands agree with each other and with the expected row of the table.
fn assert_one_network(case: &str, summarised: Network, checked: Network, resolution: u64, dropout: f64) {
    assert_eq!(summarised, checked, "{case}: model summary vs run --check");
    assert_eq!(checked.resolution, resolution, "{case}: resolution");
    assert!((checked.dropout - dropout).abs() < 1e-12, "{case}: dropout {} != {dropout}", checked.dropout);
    assert!(checked.parameters > 0 && checked.multiply_adds > 0, "{case}: {checked:?}");
}

#[test]
fn summary_and_check_agree_on_every_named_variant() {
    let data = data_dir();
    // The published table (paper's released code, torchvision).
    let table = [
        ("b0", 224, 0.2),
        ("b1", 240, 0.2),
        ("b2", 260, 0.3),
        ("b3", 300, 0.3),
        ("b4", 380, 0.4),
        ("b5", 456, 0.4),
        ("b6", 528, 0.5),
        ("b7", 600, 0.5),
    ];
    let mut parameters = Vec::new();
    for (variant, resolution, dropout) in table {
        let summarised = summary(&["--variant", variant]);
        let checked = check(data.path(), &format!("variant: {variant}"));
        assert_eq!(checked.architecture, format!("EfficientNet-{}", variant.to_uppercase()));
        parameters.push(checked.parameters);
        assert_one_network(variant, summarised, checked, resolution, dropout);
    }
    // Guard against both commands printing one network whatever the variant.
    assert!(parameters.windows(2).all(|pair| pair[0] < pair[1]), "{parameters:?}");
}

#[test]
fn summary_and_check_agree_on_custom_phi() {
    let data = data_dir();
    // 224·1.15^phi to the nearest multiple of 8, and 0.2 + 0.05·phi (the one rule, effnet-scaling).
    let cases = [("-1", 192, 0.15), ("0.5", 240, 0.225), ("1", 256, 0.25), ("2.5", 320, 0.325)];
    let mut parameters = Vec::new();
    for (phi, resolution, dropout) in cases {
        let summarised = summary(&["--phi", phi]);
        let checked = check(data.path(), &format!("phi: {phi}"));
        parameters.push(checked.parameters);
        assert_one_network(&format!("phi {phi}"), summarised, checked, resolution, dropout);
    }
    assert!(parameters.windows(2).all(|pair| pair[0] < pair[1]), "{parameters:?}");
}
