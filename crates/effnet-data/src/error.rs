//! Errors of the data crate; each message names the dataset, file, field or sample at fault.

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("manifest: {reason}")]
    Manifest { reason: String },

    #[error("shard plan: {reason}")]
    InvalidPlan { reason: String },

    #[error("data cursor: {reason}")]
    InvalidCursor { reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
