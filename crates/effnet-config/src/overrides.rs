//! `--set key.path=value`: settings given on the command line, written into the job file's YAML
//! before it is read, so they are typed, defaulted and validated exactly like the file.
//!
//! ```text
//! job.yaml ──► Node tree ──► each --set, in order ──► flow YAML ──► serde-saphyr ──► JobSpec
//!                               (value parsed as YAML)
//! ```
//!
//! A value replaces what the file had at its path, except that a mapping is merged into a
//! mapping already there (as if each of its keys had been set on its own). Sections on the way
//! that the file lacks (or left empty) are created. The paths each override wrote are kept, so
//! an error about one of them names the `--set` argument instead of a line of the file.

use std::fmt;
use std::str::FromStr;

use crate::error::ConfigError;
use crate::locate::{Place, SourceMap, join};
use crate::parse;
use crate::tree::Node;

/// One `--set key.path=value`: a dotted field path and a YAML value for it.
///
/// ```
/// use effnet_config::Override;
///
/// let setting: Override = "data.augmentation={crop_scale: [0.5, 1.0]}".parse()?;
/// assert_eq!(setting.path(), "data.augmentation");
/// assert_eq!(setting.value(), "{crop_scale: [0.5, 1.0]}");
///
/// let error = Override::parse("data.batch_size").unwrap_err();
/// assert_eq!(error.to_string(), "--set data.batch_size: expected KEY=VALUE: a dotted field path, '=', a YAML value");
/// # Ok::<(), effnet_config::ConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Override {
    path: String,
    value: String,
}

impl Override {
    /// Splits `key.path=value` at the first `=`. The path's field names are letters, digits,
    /// `_` and `-`; the value is YAML (`2`, `bf16`, `[0.5, 1.0]`, `{ops: 2}`, empty or `~` for
    /// the default).
    pub fn parse(argument: &str) -> Result<Override, ConfigError> {
        let malformed = |message: String| ConfigError::new(&format!("--set {argument}"), None, "", message);
        let Some((path, value)) = argument.split_once('=') else {
            return Err(malformed("expected KEY=VALUE: a dotted field path, '=', a YAML value".to_owned()));
        };
        let path = path.trim();
        if path.is_empty() {
            return Err(malformed("empty field path before '=', expected KEY=VALUE".to_owned()));
        }
        for name in path.split('.') {
            if name.is_empty() {
                return Err(malformed(format!("empty field name in {path}")));
            }
            if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-')) {
                return Err(malformed(format!(
                    "invalid field name {name:?} in {path}: field names are letters, digits and '_' \
                     (a list is set whole, key=[a, b])"
                )));
            }
        }
        Ok(Override { path: path.to_owned(), value: value.to_owned() })
    }

    /// The dotted field path, `data.batch_size`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The value as written, YAML text.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl FromStr for Override {
    type Err = ConfigError;

    fn from_str(argument: &str) -> Result<Override, ConfigError> {
        Override::parse(argument)
    }
}

/// `key.path=value`, the form [`Override::parse`] reads.
impl fmt::Display for Override {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}={}", self.path, self.value)
    }
}

/// The job text with `overrides` applied, as YAML for the deserialiser, and the map that
/// locates its paths: in the file, or at the `--set` argument that wrote them.
pub(crate) fn apply(
    text: &str,
    source_name: &str,
    file_map: SourceMap,
    overrides: &[Override],
) -> Result<(String, SourceMap), ConfigError> {
    let mut entries = match Node::parse(text) {
        Ok(Some(Node::Mapping { entries, tag: None })) => entries,
        Ok(None) => Vec::new(),
        Ok(Some(root)) if root.is_null() => Vec::new(),
        // A file that is no YAML mapping fails on its own, with the deserialiser's error.
        other => {
            return Err(match parse::deserialize(text, source_name, &file_map) {
                Err(error) => error,
                Ok(_) => match other {
                    Err(error) => {
                        ConfigError::new(source_name, error.position.map(Place::File), "", error.message)
                    }
                    Ok(_) => ConfigError::new(
                        source_name,
                        None,
                        "",
                        "expected a mapping with name, model and data",
                    ),
                },
            });
        }
    };
    let mut written = Vec::new();
    for setting in overrides {
        let argument = setting.to_string();
        let value = match Node::parse(&setting.value) {
            Ok(value) => value.unwrap_or_else(Node::null),
            Err(error) => {
                let message = format!("the value is not YAML: {}", error.message);
                return Err(ConfigError::new(
                    source_name,
                    Some(Place::Set(argument)),
                    setting.path(),
                    message,
                ));
            }
        };
        let names: Vec<&str> = setting.path.split('.').collect();
        let mut writer = Writer { argument: &argument, source_name, written: &mut written };
        writer.set(&mut entries, "", &names, value)?;
    }
    let merged = Node::Mapping { entries, tag: None }.to_yaml();
    let map = file_map.with_overrides(written, SourceMap::build(&merged));
    Ok((merged, map))
}

/// Writes one override's value into the tree, recording the paths it wrote.
struct Writer<'a> {
    argument: &'a str,
    source_name: &'a str,
    /// (path, `--set` argument) in the order written; a later entry wins over an earlier one.
    written: &'a mut Vec<(String, String)>,
}

impl Writer<'_> {
    fn set(
        &mut self,
        entries: &mut Vec<(Node, Node)>,
        parent: &str,
        names: &[&str],
        value: Node,
    ) -> Result<(), ConfigError> {
        let Some((name, rest)) = names.split_first() else { return Ok(()) };
        let path = join(parent, name);
        let index = match entries.iter().rposition(|(key, _)| key.as_key() == Some(name)) {
            Some(index) => Some(index),
            // A key the mapping takes from a YAML merge (`<<: *defaults`) is copied in, so that
            // setting one field inside it keeps the others.
            None => merged_in(entries, name).map(|inherited| {
                entries.push((Node::Scalar { text: (*name).to_owned(), plain: true, tag: None }, inherited));
                entries.len() - 1
            }),
        };
        if rest.is_empty() {
            match (index, value) {
                (Some(index), Node::Mapping { entries: new_entries, tag: None })
                    if matches!(entries[index].1, Node::Mapping { .. })
                        && new_entries.iter().all(|(key, _)| key.as_key().is_some()) =>
                {
                    let Node::Mapping { entries: existing, .. } = &mut entries[index].1 else {
                        return Ok(());
                    };
                    for (key, value) in new_entries {
                        let key = key.as_key().unwrap_or_default().to_owned();
                        self.set(existing, &path, &[&key], value)?;
                    }
                }
                (Some(index), value) => {
                    entries[index].1 = value;
                    self.written.push((path, self.argument.to_owned()));
                }
                (None, value) => {
                    entries.push((key_node(name), value));
                    self.written.push((path, self.argument.to_owned()));
                }
            }
            return Ok(());
        }
        let index = match index {
            Some(index) if entries[index].1.is_null() => {
                entries[index].1 = Node::Mapping { entries: Vec::new(), tag: None };
                self.written.push((path.clone(), self.argument.to_owned()));
                index
            }
            Some(index) => index,
            None => {
                entries.push((key_node(name), Node::Mapping { entries: Vec::new(), tag: None }));
                self.written.push((path.clone(), self.argument.to_owned()));
                entries.len() - 1
            }
        };
        match &mut entries[index].1 {
            Node::Mapping { entries: inner, .. } => self.set(inner, &path, rest, value),
            other => {
                let found = if matches!(other, Node::Sequence { .. }) { "a list" } else { "a single value" };
                let message = format!("cannot set {} inside {found}, expected a mapping", rest.join("."));
                Err(ConfigError::new(
                    self.source_name,
                    Some(Place::Set(self.argument.to_owned())),
                    path,
                    message,
                ))
            }
        }
    }
}

fn key_node(name: &str) -> Node {
    Node::Scalar { text: name.to_owned(), plain: true, tag: None }
}

/// The value `name` takes from the mapping's YAML merge key, if any: `<<: *one` or
/// `<<: [*first, *second]` (the first that has it wins).
fn merged_in(entries: &[(Node, Node)], name: &str) -> Option<Node> {
    let (_, sources) = entries.iter().rev().find(|(key, _)| key.as_key() == Some("<<"))?;
    let sources = match sources {
        Node::Sequence { items, .. } => items.iter().collect(),
        single => vec![single],
    };
    sources.into_iter().find_map(|source| match source {
        Node::Mapping { entries, .. } => entries
            .iter()
            .rev()
            .find(|(key, _)| key.as_key() == Some(name))
            .map(|(_, value)| value.clone())
            .or_else(|| merged_in(entries, name)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(text: &str, settings: &[&str]) -> String {
        let overrides: Vec<Override> = settings.iter().map(|s| Override::parse(s).unwrap()).collect();
        apply(text, "job.yaml", SourceMap::build(text), &overrides).unwrap().0
    }

    #[test]
    fn parses_key_and_value() {
        let setting = Override::parse(" data.train = s3://bucket/x?a=b").unwrap();
        assert_eq!((setting.path(), setting.value()), ("data.train", " s3://bucket/x?a=b"));
        assert_eq!(setting.to_string(), "data.train= s3://bucket/x?a=b");
        let empty = Override::parse("model.dropout=").unwrap();
        assert_eq!((empty.path(), empty.value()), ("model.dropout", ""));
    }

    #[test]
    fn malformed_arguments_say_why() {
        for (argument, expected) in [
            (
                "data.batch_size",
                "--set data.batch_size: expected KEY=VALUE: a dotted field path, '=', a YAML value",
            ),
            ("=3", "--set =3: empty field path before '=', expected KEY=VALUE"),
            (" =3", "--set  =3: empty field path before '=', expected KEY=VALUE"),
            ("data..batch_size=3", "--set data..batch_size=3: empty field name in data..batch_size"),
            (
                "data.augmentation.crop_scale[1]=0.9",
                "--set data.augmentation.crop_scale[1]=0.9: invalid field name \"crop_scale[1]\" in \
                 data.augmentation.crop_scale[1]: field names are letters, digits and '_' (a list is set whole, key=[a, b])",
            ),
        ] {
            let error = Override::parse(argument).unwrap_err();
            assert_eq!(error.to_string(), expected);
            assert_eq!((error.line, error.column, error.path.as_str()), (None, None, ""));
        }
    }

    #[test]
    fn replaces_creates_and_merges() {
        let text = "name: demo\nmodel: {variant: b0}\ndata:\n  train: x\n  augmentation:\n    flip: 0.2\n";
        assert_eq!(
            applied(text, &["data.train=y", "model.drop_path.rate=0.1", "training.steps=2"]),
            "{name: demo, model: {variant: b0, drop_path: {rate: 0.1}}, data: {train: y, augmentation: {flip: 0.2}}, \
             training: {steps: 2}}"
        );
        assert_eq!(
            applied(text, &["data.augmentation={crop_scale: [0.5, 1.0], rand_augment: {ops: 2}}"]),
            "{name: demo, model: {variant: b0}, data: {train: x, augmentation: {flip: 0.2, crop_scale: [0.5, 1.0], \
             rand_augment: {ops: 2}}}}"
        );
        // Later settings win; a list or scalar replaces whatever was there.
        assert_eq!(
            applied(text, &["data.augmentation=~", "data.augmentation.flip=0", "data.train=[a]"]),
            "{name: demo, model: {variant: b0}, data: {train: [a], augmentation: {flip: 0}}}"
        );
    }

    #[test]
    fn an_empty_file_takes_everything_from_the_overrides() {
        assert_eq!(
            applied("# nothing yet\n", &["name=x", "model.variant=b1", "data.train=t"]),
            "{name: x, model: {variant: b1}, data: {train: t}}"
        );
    }

    #[test]
    fn keys_from_a_merge_are_copied_before_one_field_changes() {
        let text = "base: &base {augmentation: {flip: 0.2, crop_scale: [0.5, 1.0]}}\ndata:\n  <<: *base\n  train: x\n";
        assert_eq!(
            applied(text, &["data.augmentation.flip=0.7"]),
            "{base: {augmentation: {flip: 0.2, crop_scale: [0.5, 1.0]}}, data: {<<: {augmentation: {flip: 0.2, \
             crop_scale: [0.5, 1.0]}}, train: x, augmentation: {flip: 0.7, crop_scale: [0.5, 1.0]}}}"
        );
    }

    #[test]
    fn records_which_argument_wrote_which_path() {
        let text = "name: demo\ndata:\n  train: x\n";
        let overrides: Vec<Override> =
            ["data.batch_size=2", "model.variant=b0"].iter().map(|s| Override::parse(s).unwrap()).collect();
        let (_, map) = apply(text, "job.yaml", SourceMap::build(text), &overrides).unwrap();
        assert_eq!(map.value("data.batch_size"), Some(Place::Set("data.batch_size=2".into())));
        assert_eq!(map.value("model.variant"), Some(Place::Set("model.variant=b0".into())));
        // The section `model` did not exist: the override that created it is blamed for it.
        assert_eq!(map.nearest("model.resolution"), Some(Place::Set("model.variant=b0".into())));
        assert!(matches!(map.value("data.train"), Some(Place::File(_))));
        assert!(matches!(map.nearest("data.eval_crop"), Some(Place::File(_))));
    }
}
