//! The coordinator's errors. Each maps to one HTTP status and displays as one line naming what
//! is wrong; the API sends that line as `{"error": "..."}`.

use std::path::PathBuf;

/// What can go wrong serving or persisting the coordinator's state.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong: a body that is not JSON, a job YAML that does not validate.
    #[error("{message}")]
    BadRequest { message: String },
    /// No `Authorization: Bearer` header, or the wrong token.
    #[error("missing or wrong bearer token (send 'Authorization: Bearer <token>')")]
    Unauthorized,
    #[error("unknown job {id}")]
    UnknownJob { id: String },
    #[error("no endpoint {method} {path}")]
    UnknownEndpoint { method: String, path: String },
    #[error("unknown worker {worker} of job {job}")]
    UnknownWorker { job: String, worker: String },
    /// The request does not fit the job's state (joining a cancelled job, a taken rank).
    #[error("{message}")]
    Conflict { message: String },
    /// The job's data or checkpoints cannot be dealt (a checkpoint without a readable cursor, a
    /// checkpoint the store lost): a restart would not cure it.
    #[error("{message}")]
    Unprocessable { message: String },
    /// The job's data or checkpoint store could not be read now; asking again may succeed.
    #[error("{message}")]
    Unavailable { message: String },
    /// A body larger than the limit.
    #[error("request body larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("state directory {path}: {source}")]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error("state database {path}: {source}")]
    Database { path: PathBuf, source: rusqlite::Error },
    /// A stored row that does not read back (an unknown state name): a damaged database.
    #[error("state database: {message}")]
    Corrupt { message: String },
    #[error("serving HTTP: {source}")]
    Serve { source: std::io::Error },
    /// A database task that panicked or was cancelled.
    #[error("internal error: {message}")]
    Internal { message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn bad_request(message: impl Into<String>) -> Error {
        Error::BadRequest { message: message.into() }
    }

    pub(crate) fn conflict(message: impl Into<String>) -> Error {
        Error::Conflict { message: message.into() }
    }

    /// The HTTP status the API answers this error with.
    pub fn status(&self) -> u16 {
        match self {
            Error::BadRequest { .. } => 400,
            Error::Unauthorized => 401,
            Error::UnknownJob { .. } | Error::UnknownWorker { .. } | Error::UnknownEndpoint { .. } => 404,
            Error::Conflict { .. } => 409,
            Error::TooLarge { .. } => 413,
            Error::Unprocessable { .. } => 422,
            Error::Unavailable { .. } => 503,
            Error::StateDir { .. }
            | Error::Database { .. }
            | Error::Corrupt { .. }
            | Error::Serve { .. }
            | Error::Internal { .. } => 500,
        }
    }
}
