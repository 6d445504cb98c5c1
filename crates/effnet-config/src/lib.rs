//! The job spec: one YAML file says what to train, on which data, with which recipe, where.
//!
//! ```text
//! job.yaml ──► SourceMap (path → line:column)        ┐
//!          └─► serde-saphyr + serde_path_to_error ──► JobSpec ──► validate ──► JobSpec
//!                  every failure ──► ConfigError "job.yaml:12:15: data.batch_size: …"
//! ```
//!
//! `--set key.path=value` overrides ([`Override`]) are written into the YAML before it is read,
//! so they are typed and validated like the file; an error about a value one of them wrote
//! names that argument instead of a line of the file.
//!
//! Unknown keys are errors, so a misspelt setting never silently falls back to its default.
//! Defaults are the paper's recipe (RMSProp-TF, lr 0.016 per 256 images decayed ×0.97 every 2.4
//! epochs after 5 warm-up epochs, label smoothing 0.1, EMA 0.9999, drop path 0.2); settings
//! whose default depends on another (resolution and dropout on the variant, eps and weight
//! decay on the optimiser) stay `None` in the spec and are resolved by methods, so the stored
//! spec records what the user wrote. `docs/config.md` lists every key.
//!
//! ```
//! use effnet_config::{JobSpec, Span};
//!
//! let spec = JobSpec::from_yaml_str("name: demo\nmodel: {variant: b5}\ndata: {train: s3://imagenet/train}\n", "job.yaml")?;
//! assert_eq!(spec.model.resolution(), 456);
//! assert_eq!(spec.training.length(), Span::Epochs(350.0));
//!
//! let error = JobSpec::from_yaml_str("name: demo\nmodel: {variant: b0}\ndata: {train: x, batch_size: -3}\n", "job.yaml")
//!     .unwrap_err();
//! assert_eq!(error.to_string(), "job.yaml:3:30: data.batch_size: invalid value -3, expected a positive integer");
//! # Ok::<(), effnet_config::ConfigError>(())
//! ```
//!
//! # Layout
//! - `spec`: the types, their defaults and the methods that resolve dependent defaults.
//! - `parse`: YAML → `JobSpec`, serde-saphyr errors → `ConfigError`.
//! - `locate`: a second pass over the YAML events mapping field paths to line and column (or to
//!   the `--set` argument that wrote them).
//! - `overrides`: `--set` arguments, applied to the document tree.
//! - `tree`: the YAML document as a tree, read from the parser's events and written back as YAML.
//! - `validate`: ranges and cross-field rules, located through `locate`.
//! - `integers`: integer fields whose errors say "a positive integer", not "u32".
//! - `error`: `ConfigError`.

mod error;
mod integers;
mod locate;
mod overrides;
mod parse;
mod spec;
mod tree;
mod validate;

use std::path::Path;

pub use error::ConfigError;
pub use overrides::Override;
pub use spec::{
    AugmentationConfig, Backend, BatchNormStyle, CheckpointConfig, CheckpointOnError, ClassifierInit,
    DataConfig, Device, DistributedConfig, DropPathConfig, DropPathSchedule, EmaConfig, EvalConfig,
    GradientDtype, JobSpec, ModelConfig, NormalizationKind, OptimizerConfig, OptimizerKind, Precision,
    RandAugmentConfig, ReportConfig, ScheduleConfig, ScheduleKind, Span, TrainingConfig, Variant,
};

impl JobSpec {
    /// Parses and validates a job spec. `source_name` (usually the file name) prefixes errors.
    pub fn from_yaml_str(text: &str, source_name: &str) -> Result<JobSpec, ConfigError> {
        JobSpec::from_yaml_str_with_overrides(text, source_name, &[])
    }

    /// Parses a job spec with `--set` overrides applied in order, then validates the result.
    ///
    /// ```
    /// use effnet_config::{JobSpec, Override};
    ///
    /// let text = "name: demo\nmodel: {variant: b0}\ndata: {train: x, batch_size: 64}\n";
    /// let set = |argument: &str| Override::parse(argument).unwrap();
    /// let spec = JobSpec::from_yaml_str_with_overrides(text, "job.yaml", &[set("data.batch_size=2")])?;
    /// assert_eq!(spec.data.batch_size, 2);
    ///
    /// let error = JobSpec::from_yaml_str_with_overrides(text, "job.yaml", &[set("data.batch_size=0")]).unwrap_err();
    /// assert_eq!(error.to_string(), "--set data.batch_size=0: data.batch_size: invalid value 0, expected a positive integer");
    /// # Ok::<(), effnet_config::ConfigError>(())
    /// ```
    pub fn from_yaml_str_with_overrides(
        text: &str,
        source_name: &str,
        overrides: &[Override],
    ) -> Result<JobSpec, ConfigError> {
        let map = locate::SourceMap::build(text);
        if overrides.is_empty() {
            let spec = parse::deserialize(text, source_name, &map)?;
            validate::validate(&spec, &map, source_name)?;
            return Ok(spec);
        }
        let (merged, map) = overrides::apply(text, source_name, map, overrides)?;
        let spec = parse::deserialize(&merged, source_name, &map)?;
        validate::validate(&spec, &map, source_name)?;
        Ok(spec)
    }

    /// Reads, parses and validates the job spec at `path`.
    pub fn load(path: &Path) -> Result<JobSpec, ConfigError> {
        JobSpec::load_with_overrides(path, &[])
    }

    /// Reads the job spec at `path`, applies `--set` overrides in order, and validates the result.
    pub fn load_with_overrides(path: &Path, overrides: &[Override]) -> Result<JobSpec, ConfigError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| {
            ConfigError::new(&source_name, None, "", format!("cannot read job spec {source_name}: {error}"))
        })?;
        JobSpec::from_yaml_str_with_overrides(&text, &source_name, overrides)
    }
}
