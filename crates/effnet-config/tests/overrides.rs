//! `--set key.path=value` overrides: typed and validated like the file, errors naming the
//! argument for what it wrote and the file's line and column for everything else.

use std::path::{Path, PathBuf};

use effnet_config::{ConfigError, Device, JobSpec, Override, Precision, Span, Variant};

/// Lines 1–11 of a job file the tests override.
const FILE: &str = "\
name: demo
model:
  variant: b0
  dropout: 0.3
data:
  train: s3://imagenet/train
  batch_size: 64
  augmentation:
    flip: 0.25
    rand_augment: {ops: 2, magnitude: 9}
training: {epochs: 10}
";

fn with(text: &str, settings: &[&str]) -> Result<JobSpec, ConfigError> {
    let overrides: Vec<Override> = settings
        .iter()
        .map(|setting| Override::parse(setting).unwrap_or_else(|error| panic!("{error}")))
        .collect();
    JobSpec::from_yaml_str_with_overrides(text, "job.yaml", &overrides)
}

fn spec(settings: &[&str]) -> JobSpec {
    with(FILE, settings).unwrap_or_else(|error| panic!("{error}"))
}

/// The error, which must be one line placed at the `--set` argument (no line, no column).
fn rejected(settings: &[&str], argument: &str, path: &str) -> String {
    let error = match with(FILE, settings) {
        Ok(spec) => panic!("expected an error, parsed {spec:?}"),
        Err(error) => error,
    };
    let line = error.to_string();
    assert!(!line.contains('\n'), "not one line: {line:?}");
    assert_eq!(
        (error.source_name.as_str(), error.line, error.column, error.path.as_str()),
        (format!("--set {argument}").as_str(), None, None, path),
        "{line}"
    );
    assert!(line.starts_with(&format!("--set {argument}: {path}: ")), "{line}");
    error.message
}

#[test]
fn values_of_every_type() {
    let spec = spec(&[
        "data.batch_size=2",
        "training.precision=bf16",
        "distributed.device=cuda",
        "model.drop_path.rate=0.1",
        "data.log_sample_keys=true",
        "data.val=s3://imagenet/val",
        "model.variant=b3",
        "training.steps=2",
        "training.epochs=~",
        "seed=7",
    ]);
    assert_eq!(spec.data.batch_size, 2);
    assert_eq!(spec.training.precision, Precision::Bf16);
    assert_eq!(spec.distributed.device, Device::Cuda);
    assert_eq!(spec.model.drop_path.rate, 0.1);
    assert!(spec.data.log_sample_keys);
    assert_eq!(spec.data.val.as_deref(), Some("s3://imagenet/val"));
    assert_eq!(spec.model.variant, Some(Variant::B3));
    // The file's dropout stays; the variant's resolution follows the new variant.
    assert_eq!((spec.model.dropout(), spec.model.resolution()), (0.3, 300));
    assert_eq!(spec.training.length(), Span::Steps(2));
    assert_eq!(spec.seed, 7);
    // What the overrides did not touch is the file's.
    assert_eq!(spec.data.train, "s3://imagenet/train");
    assert_eq!(spec.data.augmentation.flip, 0.25);
}

#[test]
fn an_empty_value_or_null_restores_the_default() {
    let spec = spec(&["model.dropout=", "data.augmentation.rand_augment=~"]);
    assert_eq!(spec.model.dropout, None);
    assert_eq!(spec.model.dropout(), 0.2);
    assert_eq!(spec.data.augmentation.rand_augment, None);
}

#[test]
fn missing_sections_are_created() {
    // No `drop_path`, `training.ema`, `distributed` or `eval` in the file.
    let spec = spec(&[
        "model.drop_path.rate=0.05",
        "training.ema.decay=0.99",
        "distributed.workers=2",
        "eval.every_steps=0",
    ]);
    assert_eq!(spec.model.drop_path.rate, 0.05);
    assert_eq!(spec.training.ema.decay, 0.99);
    assert_eq!(spec.distributed.workers, 2);
    assert_eq!(spec.eval.every_steps, Some(0));
    // A job given entirely on the command line.
    let spec = with("", &["name=cli", "model.variant=b1", "data.train=file:///data/train"]).unwrap();
    assert_eq!(
        (spec.name.as_str(), spec.model.resolution(), spec.data.train.as_str()),
        ("cli", 240, "file:///data/train")
    );
}

#[test]
fn lists_replace_and_mappings_merge() {
    let listed = spec(&["data.augmentation.crop_scale=[0.5, 1.0]"]);
    assert_eq!(listed.data.augmentation.crop_scale, [0.5, 1.0]);
    // A mapping merges into the file's: flip and RandAugment stay, crop_scale changes.
    let merged = spec(&["data.augmentation={crop_scale: [0.5, 1.0], rand_augment: {magnitude: 15}}"]);
    assert_eq!(merged.data.augmentation.crop_scale, [0.5, 1.0]);
    assert_eq!(merged.data.augmentation.flip, 0.25);
    let rand_augment = merged.data.augmentation.rand_augment.expect("kept");
    assert_eq!((rand_augment.ops, rand_augment.magnitude), (2, 15.0));
    // Later arguments win.
    assert_eq!(spec(&["data.batch_size=8", "data={batch_size: 16}"]).data.batch_size, 16);
    assert_eq!(spec(&["data={batch_size: 16}", "data.batch_size=8"]).data.batch_size, 8);
}

#[test]
fn a_value_of_the_wrong_type_names_the_key_and_the_argument() {
    let message = rejected(&["data.batch_size=abc"], "data.batch_size=abc", "data.batch_size");
    assert!(message.contains("\"abc\"") && message.contains("positive integer"), "{message}");
    let message =
        rejected(&["training.steps=2", "data.batch_size=0"], "data.batch_size=0", "data.batch_size");
    assert_eq!(message, "invalid value 0, expected a positive integer");
    let message = rejected(&["training.precision=fp8"], "training.precision=fp8", "training.precision");
    assert_eq!(message, "unknown value fp8, expected one of fp32, bf16");
    // `yes` is no boolean here, as in the file.
    let message = rejected(&["data.log_sample_keys=yes"], "data.log_sample_keys=yes", "data.log_sample_keys");
    assert_eq!(message, "invalid boolean (true or false expected)");
    let message = rejected(
        &["data.augmentation.crop_scale=[0.5]"],
        "data.augmentation.crop_scale=[0.5]",
        "data.augmentation.crop_scale",
    );
    assert!(message.contains("length 1") && message.contains('2'), "{message}");
}

#[test]
fn ranges_and_rules_blame_the_argument() {
    let message = rejected(&["model.dropout=1.5"], "model.dropout=1.5", "model.dropout");
    assert_eq!(message, "invalid value 1.5, expected a number in [0, 1)");
    let argument = "data.augmentation={crop_scale: [0.5, 2]}";
    let message = rejected(&[argument], argument, "data.augmentation.crop_scale[1]");
    assert_eq!(message, "invalid value 2, expected a number in [0.5, 1]");
    let message = rejected(&["training.steps=5"], "training.steps=5", "training.steps");
    assert_eq!(message, "set either training.epochs or training.steps, not both");
}

#[test]
fn unknown_keys_are_rejected_like_the_files() {
    let message = rejected(&["data.batch_sise=2"], "data.batch_sise=2", "data.batch_sise");
    assert!(message.starts_with("unknown field, expected one of train, val, batch_size"), "{message}");
    let message = rejected(&["trainig.steps=2"], "trainig.steps=2", "trainig");
    assert!(
        message.starts_with("unknown field, expected one of name, description, job_dir, seed"),
        "{message}"
    );
    let argument = "data.augmentation={crop: [0.5, 1.0]}";
    let message = rejected(&[argument], argument, "data.augmentation.crop");
    assert!(message.starts_with("unknown field, expected one of crop_scale"), "{message}");
}

#[test]
fn values_that_cannot_be_written_say_why() {
    let message = rejected(&["data.train.url=x"], "data.train.url=x", "data.train");
    assert_eq!(message, "cannot set url inside a single value, expected a mapping");
    let message = rejected(
        &["data.augmentation={crop_scale: [0.5"],
        "data.augmentation={crop_scale: [0.5",
        "data.augmentation",
    );
    assert!(message.starts_with("the value is not YAML: "), "{message}");
}

#[test]
fn errors_in_the_file_keep_their_line_and_column() {
    // Line 7, column 15 is the file's `batch_size: -3`; the overrides elsewhere do not move it.
    let text = FILE.replace("batch_size: 64", "batch_size: -3");
    let error = with(&text, &["training.epochs=2", "model.drop_path.rate=0.1"]).unwrap_err();
    assert_eq!(
        error.to_string(),
        "job.yaml:7:15: data.batch_size: invalid value -3, expected a positive integer"
    );
    let text = FILE.replace("  dropout: 0.3", "  dropuot: 0.3");
    let error = with(&text, &["data.batch_size=2"]).unwrap_err();
    assert_eq!(
        (error.line, error.column, error.path.as_str()),
        (Some(4), Some(3), "model.dropuot"),
        "{error}"
    );
    let text = FILE.replace("training: {epochs: 10}", "training: {epochs: 10, precision: fp8}");
    let error = with(&text, &["data.batch_size=2"]).unwrap_err();
    assert_eq!(
        (error.line, error.column, error.path.as_str()),
        (Some(11), Some(35), "training.precision"),
        "{error}"
    );
    // An override that replaces the bad value mends the file.
    let text = FILE.replace("batch_size: 64", "batch_size: -3");
    assert_eq!(with(&text, &["data.batch_size=4"]).unwrap().data.batch_size, 4);
    // A file with a syntax error reports it, overrides or not.
    let error = with("name: demo\nmodel: [b0\n", &["data.train=x"]).unwrap_err();
    assert_eq!((error.source_name.as_str(), error.line.is_some()), ("job.yaml", true), "{error}");
}

#[test]
fn missing_fields_in_a_section_the_override_created_blame_it() {
    let text = "name: demo\nmodel: {variant: b0}\n";
    let error = with(text, &["data.batch_size=2"]).unwrap_err();
    assert_eq!(error.to_string(), "--set data.batch_size=2: data.train: missing required field");
}

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs")
}

#[test]
fn every_shipped_config_reads_the_same_through_an_override() {
    let mut checked = 0;
    for entry in std::fs::read_dir(configs_dir()).expect("configs/") {
        let path = entry.expect("configs/ entry").path();
        if path.extension().is_none_or(|extension| extension != "yaml") {
            continue;
        }
        let plain = JobSpec::load(&path).unwrap_or_else(|error| panic!("{error}"));
        // Setting the name to itself rewrites the whole document and must change nothing.
        let same_name = Override::parse(&format!("name={}", plain.name)).unwrap();
        let through =
            JobSpec::load_with_overrides(&path, &[same_name]).unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(through, plain, "{}", path.display());
        let smaller =
            JobSpec::load_with_overrides(&path, &[Override::parse("data.batch_size=2").unwrap()]).unwrap();
        assert_eq!(smaller.data.batch_size, 2);
        assert_eq!(JobSpec { data: plain.data.clone(), ..smaller.clone() }, plain, "{}", path.display());
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} configs");
}
