//! Errors of the store crate. Each message names the offending URL or object and fits on one line.

use std::path::PathBuf;

use crate::redact::redact_text;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(
        "unknown storage scheme '{scheme}' in '{url}' (expected file, memory, s3, gs, az, abfs(s), http or https)"
    )]
    UnknownScheme { url: String, scheme: String },

    #[error("invalid storage URL '{url}': {reason}")]
    InvalidUrl { url: String, reason: String },

    #[error("no credentials for '{url}': {hint}")]
    MissingCredentials { url: String, hint: String },

    #[error("invalid store option {name}: {reason}")]
    InvalidOption { name: String, reason: String },

    #[error("'{url}' is read-only, refusing to write {path}")]
    ReadOnly { url: String, path: String },

    #[error("object {path} not found in {store}")]
    NotFound { path: String, store: String },

    #[error("multipart part size {part_size} bytes is below the {minimum} bytes S3 requires")]
    PartTooSmall { part_size: usize, minimum: usize },

    #[error("local directory {path}: {source}")]
    LocalDirectory { path: PathBuf, source: std::io::Error },

    /// `location` is redacted when the error is made; object_store's message quotes the URL it
    /// was given, credentials included, so it is redacted when displayed. (Code that walks the
    /// source chain itself must redact too: the effnet binary redacts every line it prints.)
    #[error("{location}: {}", redact_text(&.source.to_string()))]
    Store { location: String, source: object_store::Error },
}

impl Error {
    /// True when the error is caused by what the user passed in (URL, options, credentials), so
    /// a command line tool exits with status 2 rather than 1.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Error::UnknownScheme { .. }
                | Error::InvalidUrl { .. }
                | Error::MissingCredentials { .. }
                | Error::InvalidOption { .. }
                | Error::ReadOnly { .. }
                | Error::PartTooSmall { .. }
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
