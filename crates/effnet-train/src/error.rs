//! Errors of the trainer. Each message fits on one line and names the offending field, URL or file;
//! URLs are displayed redacted (`effnet_store::redact`), as they may carry credentials.

use effnet_store::{redact, redact_text};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The job asks for something that cannot work (`what` is the job field).
    #[error("{what}: {}", redact_text(.reason))]
    InvalidJob { what: String, reason: String },

    /// The checkpoint exists but was written for another model or job.
    #[error("checkpoint {} does not fit this job: {}", redact(.url), redact_text(.reason))]
    IncompatibleCheckpoint { url: String, reason: String },

    /// A checkpoint that cannot be used: not committed, checksum mismatch, unreadable content.
    #[error("checkpoint {}: {}", redact(.url), redact_text(.reason))]
    BadCheckpoint { url: String, reason: String },

    #[error("{}: {source}", redact_text(.path))]
    Io { path: String, source: std::io::Error },

    /// A checkpoint could not be saved (with `checkpoint.on_error: stop`). It is not committed.
    #[error(
        "checkpoint {url} was not saved: {reason}; it is not committed, the newest committed one is intact ({newest}); set checkpoint.on_error: continue to train on without it"
    )]
    CheckpointFailed { url: String, reason: String, newest: String },

    #[error(transparent)]
    Data(#[from] effnet_data::Error),

    #[error(transparent)]
    Store(#[from] effnet_store::Error),

    #[error(transparent)]
    Model(#[from] effnet_model::Error),

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    /// A collective failed: a peer died, timed out, or the backend is missing.
    #[error("{0}")]
    Collective(String),

    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// True when the error is caused by what the user passed in (job file, URLs, checkpoints),
    /// so the command line exits with status 2.
    pub fn is_bad_input(&self) -> bool {
        match self {
            Error::InvalidJob { .. } | Error::IncompatibleCheckpoint { .. } | Error::BadCheckpoint { .. } => {
                true
            }
            Error::Data(error) => error.is_bad_input(),
            Error::Store(error) => error.is_bad_input(),
            Error::Model(error) => error.is_bad_input(),
            Error::Io { .. }
            | Error::CheckpointFailed { .. }
            | Error::Torch(_)
            | Error::Collective(_)
            | Error::Internal(_) => false,
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::InvalidJob { what: what.into(), reason: reason.into() }
    }
}

impl From<effnet_checkpoint::Error> for Error {
    fn from(error: effnet_checkpoint::Error) -> Error {
        match error {
            effnet_checkpoint::Error::BadCheckpoint { url, reason } => Error::BadCheckpoint { url, reason },
            effnet_checkpoint::Error::Io { path, source } => Error::Io { path, source },
            effnet_checkpoint::Error::Store(error) => Error::Store(error),
            other => Error::Internal(other.to_string()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
