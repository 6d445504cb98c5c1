//! The job spec: one YAML file says what to train, on which data, with which recipe, where.
//!
//! ```text
//! job.yaml ──► SourceMap (path → line:column)        ┐
//!          └─► serde-saphyr + serde_path_to_error ──► JobSpec ──► validate ──► JobSpec
//!                  every failure ──► ConfigError "job.yaml:12:15: data.batch_size: …"
//! ```
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
//! - `locate`: a second pass over the YAML events mapping field paths to line and column.
//! - `validate`: ranges and cross-field rules, located through `locate`.
//! - `integers`: integer fields whose errors say "a positive integer", not "u32".
//! - `error`: `ConfigError`.

mod error;
mod integers;
mod locate;
mod parse;
mod spec;
mod validate;

use std::path::Path;

pub use error::ConfigError;
pub use spec::{
    AugmentationConfig, Backend, BatchNormStyle, CheckpointConfig, ClassifierInit, DataConfig, Device,
    DistributedConfig, DropPathConfig, DropPathSchedule, EmaConfig, EvalConfig, GradientDtype, JobSpec,
    ModelConfig, NormalizationKind, OptimizerConfig, OptimizerKind, Precision, RandAugmentConfig,
    ReportConfig, ScheduleConfig, ScheduleKind, Span, TrainingConfig, Variant,
};

impl JobSpec {
    /// Parses and validates a job spec. `source_name` (usually the file name) prefixes errors.
    pub fn from_yaml_str(text: &str, source_name: &str) -> Result<JobSpec, ConfigError> {
        let map = locate::SourceMap::build(text);
        let spec = parse::deserialize(text, source_name, &map)?;
        validate::validate(&spec, &map, source_name)?;
        Ok(spec)
    }

    /// Reads, parses and validates the job spec at `path`.
    pub fn load(path: &Path) -> Result<JobSpec, ConfigError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| {
            ConfigError::new(&source_name, None, "", format!("cannot read job spec {source_name}: {error}"))
        })?;
        JobSpec::from_yaml_str(&text, &source_name)
    }
}
