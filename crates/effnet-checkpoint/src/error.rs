//! Errors of the checkpoint store. Each message fits on one line and names the checkpoint's URL,
//! displayed redacted (`effnet_store::redact`): the URL may carry credentials.

use effnet_store::{redact, redact_text};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A checkpoint that cannot be used: not committed, checksum mismatch, unreadable content.
    #[error("checkpoint {}: {}", redact(.url), redact_text(.reason))]
    BadCheckpoint { url: String, reason: String },

    #[error("{}: {source}", redact_text(.path))]
    Io { path: String, source: std::io::Error },

    #[error(transparent)]
    Store(#[from] effnet_store::Error),

    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// True when the error is caused by what the user passed in (a damaged checkpoint, a bad URL).
    pub fn is_bad_input(&self) -> bool {
        match self {
            Error::BadCheckpoint { .. } => true,
            Error::Store(error) => error.is_bad_input(),
            Error::Io { .. } | Error::Internal(_) => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
