//! YAML text → [`JobSpec`], with serde-saphyr's errors turned into [`ConfigError`]s.
//!
//! serde-saphyr knows where in the text an error happened; `serde_path_to_error` knows which
//! field was being read. Together they give `file:line:column: field.path: message`.

use serde_path_to_error::Segment;
use serde_saphyr::{Error as YamlError, MessageFormatter, Options, UserMessageFormatter};

use crate::error::ConfigError;
use crate::locate::{Position, SourceMap, join};
use crate::spec::JobSpec;

pub(crate) fn deserialize(text: &str, source_name: &str, map: &SourceMap) -> Result<JobSpec, ConfigError> {
    let mut options = Options::default();
    // Our message is one line; the source snippet would add several.
    options.with_snippet = false;
    // `yes`/`no`/`on` as booleans surprise people; only `true`/`false` are booleans.
    options.strict_booleans = true;
    let mut failed_at = None;
    let result = serde_saphyr::with_deserializer_from_str_with_options(text, options, |deserializer| {
        serde_path_to_error::deserialize::<_, JobSpec>(deserializer).map_err(|error| {
            failed_at = Some(dotted(error.path()));
            error.into_inner()
        })
    });
    result.map_err(|error| convert(&error, failed_at.unwrap_or_default(), source_name, map))
}

/// `serde_path_to_error`'s path in our notation: `data.augmentation.crop_scale[1]`.
fn dotted(path: &serde_path_to_error::Path) -> String {
    let mut dotted = String::new();
    for segment in path {
        match segment {
            Segment::Map { key } => dotted = join(&dotted, key),
            Segment::Seq { index } => dotted.push_str(&format!("[{index}]")),
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    dotted
}

fn convert(error: &YamlError, path: String, source_name: &str, map: &SourceMap) -> ConfigError {
    let error = error.without_snippet();
    let reported = error.location().and_then(|location| {
        let line = usize::try_from(location.line()).ok()?;
        let column = usize::try_from(location.column()).ok()?;
        (line > 0).then_some(Position { line, column })
    });
    // Without overrides the file's own position; with them, the place of the path found there.
    let reported = reported.and_then(|position| map.reported(position));
    match error {
        YamlError::SerdeUnknownField { field, expected, .. } => {
            // The path may or may not already end in the unknown key, depending on where the
            // key's deserialisation failed; name it exactly once.
            let path = if path == *field || path.ends_with(&format!(".{field}")) {
                path
            } else {
                join(&path, field)
            };
            let position = map.key(&path).or(reported);
            ConfigError::new(
                source_name,
                position,
                path,
                format!("unknown field, expected {}", one_of(expected)),
            )
        }
        YamlError::SerdeMissingField { field, .. } => {
            // Point at the section that lacks the field (or the top of the file).
            let position = map.key(&path).or(map.value(&path)).or(reported);
            ConfigError::new(source_name, position, join(&path, field), "missing required field")
        }
        YamlError::SerdeUnknownVariant { variant, expected, .. } => {
            let position = reported.or(map.value(&path));
            let message = format!("unknown value {variant}, expected {}", one_of(expected));
            ConfigError::new(source_name, position, path, message)
        }
        YamlError::SerdeInvalidType { .. }
        | YamlError::SerdeInvalidValue { .. }
        | YamlError::SerdeInvalidLength { .. }
        | YamlError::Message { .. } => {
            // A value of the wrong shape: point at the value (serde-saphyr may report its key).
            let position = map.value(&path).or(reported);
            ConfigError::new(source_name, position, path, UserMessageFormatter.format_message(error))
        }
        YamlError::Eof { .. } if map.value("").is_none() => ConfigError::new(
            source_name,
            reported,
            path,
            "empty job spec, expected a mapping with name, model and data",
        ),
        other => {
            // Syntax errors and the like: serde-saphyr's position is the most precise there is.
            let position = reported.or(map.nearest(&path));
            let message = UserMessageFormatter.format_message(other);
            ConfigError::new(source_name, position, path, message)
        }
    }
}

fn one_of(expected: &[&str]) -> String {
    match expected {
        [] => "no fields here".to_owned(),
        [only] => (*only).to_owned(),
        _ => format!("one of {}", expected.join(", ")),
    }
}
