//! Errors of the data crate; each message names the dataset, file, field or sample at fault.
//! URLs and the messages of other libraries (which quote URLs) are displayed redacted: a
//! dataset URL may carry credentials (`effnet_store::redact`).

use effnet_store::{redact, redact_text};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("manifest: {reason}")]
    Manifest { reason: String },

    #[error("{}: no dataset here ({})", redact(.url), redact_text(.reason))]
    NoDataset { url: String, reason: String },

    #[error("shard plan: {reason}")]
    InvalidPlan { reason: String },

    #[error("data cursor: {reason}")]
    InvalidCursor { reason: String },

    #[error("{}: {}", redact_text(.what), redact_text(.reason))]
    InvalidInput { what: String, reason: String },

    #[error("writing {}: {}", redact_text(.path), redact_text(.reason))]
    Write { path: String, reason: String },

    #[error("reading {}: {}", redact_text(.path), redact_text(.reason))]
    Read { path: String, reason: String },

    #[error("{}: schema {found} is not key: utf8, image: binary, label: int32", redact_text(.path))]
    Schema { path: String, found: String },

    #[error(transparent)]
    Store(#[from] effnet_store::Error),
}

impl Error {
    /// True when the user's input (URL, files, options) is at fault.
    pub fn is_bad_input(&self) -> bool {
        match self {
            Error::Store(e) => e.is_bad_input(),
            _ => true,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
