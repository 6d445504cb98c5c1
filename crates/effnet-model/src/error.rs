//! Errors of the model crate. Each message names the offending item and fits on one line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An unknown variant name, or a custom phi or coefficient outside the accepted range.
    #[error(transparent)]
    Scaling(#[from] effnet_scaling::Error),

    #[error("{field} {reason}")]
    InvalidConfig { field: &'static str, reason: String },

    #[error("stochastic depth probability must be in [0, 1], got {value}")]
    InvalidDropPathProbability { value: f64 },

    #[error("weights file {path}: missing tensor '{name}'")]
    MissingTensor { path: PathBuf, name: String },

    #[error("weights file {path}: tensor '{name}' has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch { path: PathBuf, name: String, expected: Vec<i64>, found: Vec<i64> },

    #[error(
        "weights file {path}: unexpected tensor '{name}' (not part of this model; wrong variant or classes?)"
    )]
    UnexpectedTensor { path: PathBuf, name: String },

    #[error("weights file {path}: tensor '{name}' has non-floating dtype {dtype}")]
    BadDtype { path: PathBuf, name: String, dtype: String },

    #[error("weights file {path}: {reason}")]
    UnreadableWeights { path: PathBuf, reason: String },

    #[error("input {what}: {reason}")]
    BadInput { what: String, reason: String },

    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

impl Error {
    /// True when the error is caused by what the user passed in (config, files), so a command
    /// line tool exits with status 2 rather than 1.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, Error::Torch(_))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
