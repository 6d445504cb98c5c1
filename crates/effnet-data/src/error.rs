//! Errors of the data crate; each message names the dataset, file, field or sample at fault.

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("manifest: {reason}")]
    Manifest { reason: String },

    #[error("{url}: no dataset here ({reason})")]
    NoDataset { url: String, reason: String },

    #[error("shard plan: {reason}")]
    InvalidPlan { reason: String },

    #[error("data cursor: {reason}")]
    InvalidCursor { reason: String },

    #[error("{what}: {reason}")]
    InvalidInput { what: String, reason: String },

    #[error("writing {path}: {reason}")]
    Write { path: String, reason: String },

    #[error("reading {path}: {reason}")]
    Read { path: String, reason: String },

    #[error("{path}: schema {found} is not key: utf8, image: binary, label: int32")]
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
