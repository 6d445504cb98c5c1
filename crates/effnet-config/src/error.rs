//! The one error type: a message pinned to a file, a line and column, and a field path.

use std::fmt;

use crate::locate::Place;

/// A job spec that could not be read, parsed or validated.
///
/// Displays as one line, `file:line:column: field.path: message`, the form editors and
/// terminals turn into a link:
/// `job.yaml:12:15: data.batch_size: invalid value -3, expected a positive integer`.
/// Parts that are unknown are left out (a read error has no line; a YAML syntax error before
/// the first key has no path). A value that came from a `--set` override is placed at that
/// argument instead of a line of the file:
/// `--set data.batch_size=abc: data.batch_size: invalid type: string "abc", expected a positive integer`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or the name given to [`crate::JobSpec::from_yaml_str`]), or `--set KEY=VALUE`
    /// when the offending key or value came from that override.
    pub source_name: String,
    /// 1-based line of the offending key or value.
    pub line: Option<usize>,
    /// 1-based column, counted in characters.
    pub column: Option<usize>,
    /// Dotted field path, `data.augmentation.crop_scale[1]`; empty for the whole document.
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn new(
        source_name: &str,
        place: Option<Place>,
        path: impl Into<String>,
        message: impl AsRef<str>,
    ) -> ConfigError {
        let (source_name, position) = match place {
            Some(Place::File(position)) => (source_name.to_owned(), Some(position)),
            Some(Place::Set(argument)) => (format!("--set {argument}"), None),
            None => (source_name.to_owned(), None),
        };
        ConfigError {
            source_name,
            line: position.map(|p| p.line),
            column: position.map(|p| p.column),
            path: path.into(),
            message: one_line(message.as_ref()),
        }
    }
}

/// Collapses line breaks (and the indentation after them) so the error stays one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl fmt::Display for ConfigError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}", self.source_name)?;
        match (self.line, self.column) {
            (Some(line), Some(column)) => write!(formatter, ":{line}:{column}")?,
            (Some(line), None) => write!(formatter, ":{line}")?,
            _ => {}
        }
        if !self.path.is_empty() {
            write!(formatter, ": {}", self.path)?;
        }
        write!(formatter, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::locate::Position;

    #[test]
    fn displays_one_line_leaving_out_unknown_parts() {
        let error = ConfigError::new(
            "job.yaml",
            Some(Place::File(Position { line: 12, column: 15 })),
            "data.batch_size",
            "invalid value -3,\n   expected a positive integer",
        );
        assert_eq!(
            error.to_string(),
            "job.yaml:12:15: data.batch_size: invalid value -3, expected a positive integer"
        );
        let error = ConfigError::new("job.yaml", None, "", "cannot read: not found");
        assert_eq!(error.to_string(), "job.yaml: cannot read: not found");
        let error = ConfigError::new(
            "job.yaml",
            Some(Place::Set("data.batch_size=0".into())),
            "data.batch_size",
            "bad",
        );
        assert_eq!(error.to_string(), "--set data.batch_size=0: data.batch_size: bad");
        assert_eq!((error.line, error.column), (None, None));
    }
}
