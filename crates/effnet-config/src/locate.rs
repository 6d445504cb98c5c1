//! Where each field path sits in the YAML text.
//!
//! Serde reports *which* field failed (as a path); checks that run after deserialisation know
//! only the path. This second pass over the parser's events records, for every dotted path
//! (`data.batch_size`, `data.augmentation.crop_scale[1]`), where its key and its value start,
//! so any error can be pointed at a line and column. With `--set` overrides, the paths an
//! override wrote are placed at its argument instead, and positions serde-saphyr reports in the
//! merged text are translated back through the path found there.

use std::collections::HashMap;

use serde_saphyr::granit_parser::{Event, Parser};

/// A 1-based line and column (columns count characters, not bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Position {
    pub line: usize,
    pub column: usize,
}

/// Where the text of a key or value came from: the job file, or a `--set` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Place {
    File(Position),
    /// The argument as given, `data.batch_size=2`.
    Set(String),
}

#[derive(Debug, Default)]
pub(crate) struct SourceMap {
    keys: HashMap<String, Position>,
    values: HashMap<String, Position>,
    overrides: Option<Box<Overrides>>,
}

/// What `--set` changed: the paths each argument wrote (in order, a later entry winning), and
/// where paths sit in the merged text the deserialiser reads.
#[derive(Debug)]
struct Overrides {
    written: Vec<(String, String)>,
    merged: SourceMap,
}

/// A mapping or sequence being walked; `path` is `None` inside a complex (non-scalar) key,
/// which no field path can name.
enum Frame {
    Mapping { path: Option<String>, key: Option<String>, awaiting_value: bool },
    Sequence { path: Option<String>, next_index: usize },
}

impl SourceMap {
    /// Walks the events of `text`. A syntax error ends the walk early; the deserialiser reports
    /// it, and the paths seen so far still locate anything before it.
    pub(crate) fn build(text: &str) -> SourceMap {
        let mut map = SourceMap::default();
        let mut stack: Vec<Frame> = Vec::new();
        for event in Parser::new_from_str(text) {
            let Ok((event, span)) = event else { break };
            let position = Position { line: span.start.line(), column: span.start.col() + 1 };
            let (is_node, scalar) = match &event {
                Event::Scalar(text, ..) => (true, Some(text.to_string())),
                Event::MappingStart(..) | Event::SequenceStart(..) | Event::Alias(..) => (true, None),
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                    continue;
                }
                _ => (false, None),
            };
            if !is_node {
                continue;
            }
            let path = match stack.last_mut() {
                None => Some(String::new()),
                Some(Frame::Mapping { path, key, awaiting_value }) if !*awaiting_value => {
                    // This node is a key.
                    *awaiting_value = true;
                    *key = scalar.clone();
                    if let (Some(parent), Some(key)) = (path.as_deref(), key.as_deref()) {
                        map.keys.entry(join(parent, key)).or_insert(position);
                    }
                    // A complex key opens a collection that names no field.
                    push_collection(&mut stack, &event, None);
                    continue;
                }
                Some(Frame::Mapping { path, key, awaiting_value }) => {
                    *awaiting_value = false;
                    match (path.as_deref(), key.take()) {
                        (Some(parent), Some(key)) => Some(join(parent, &key)),
                        _ => None,
                    }
                }
                Some(Frame::Sequence { path, next_index }) => {
                    let index = *next_index;
                    *next_index += 1;
                    path.as_deref().map(|parent| format!("{parent}[{index}]"))
                }
            };
            if let Some(path) = &path {
                map.values.entry(path.clone()).or_insert(position);
            }
            push_collection(&mut stack, &event, path);
        }
        map
    }

    /// This map of the job file, with the paths `written` by `--set` arguments (path, argument,
    /// in the order applied) and the map of the `merged` text that is deserialised.
    pub(crate) fn with_overrides(self, written: Vec<(String, String)>, merged: SourceMap) -> SourceMap {
        SourceMap { overrides: Some(Box::new(Overrides { written, merged })), ..self }
    }

    /// Where the key of `path` starts (`None` for the root, sequence items and absent keys).
    pub(crate) fn key(&self, path: &str) -> Option<Place> {
        self.written_by(path).or_else(|| self.keys.get(path).copied().map(Place::File))
    }

    /// Where the value of `path` starts.
    pub(crate) fn value(&self, path: &str) -> Option<Place> {
        self.written_by(path).or_else(|| self.values.get(path).copied().map(Place::File))
    }

    /// The `--set` argument that wrote `path` or a section holding it, the last one if several did.
    fn written_by(&self, path: &str) -> Option<Place> {
        let overrides = self.overrides.as_deref()?;
        overrides
            .written
            .iter()
            .rev()
            .find(|(written, _)| {
                path.strip_prefix(written.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
            })
            .map(|(_, argument)| Place::Set(argument.clone()))
    }

    /// A position serde-saphyr reported in the text it read. Without overrides that is the
    /// file; with them it is the merged text, so the path written there is looked up instead.
    pub(crate) fn reported(&self, position: Position) -> Option<Place> {
        let Some(overrides) = self.overrides.as_deref() else { return Some(Place::File(position)) };
        let merged = &overrides.merged;
        // The key or value that starts last at or before the position holds it.
        let keys = merged.keys.iter().map(|(path, at)| (at, path, true));
        let values = merged.values.iter().map(|(path, at)| (at, path, false));
        let (_, path, is_key) = keys
            .chain(values)
            .filter(|(at, _, _)| (at.line, at.column) <= (position.line, position.column))
            .max_by_key(|(at, path, is_key)| (at.line, at.column, path.len(), *is_key))?;
        if is_key { self.key(path) } else { self.value(path) }
    }

    /// The value of `path`, else its key, else those of the nearest ancestor written in the
    /// file: a setting left at its default is blamed on the section that should have had it.
    pub(crate) fn nearest(&self, path: &str) -> Option<Place> {
        let mut path = path;
        loop {
            if let Some(position) = self.value(path).or_else(|| self.key(path)) {
                return Some(position);
            }
            if path.is_empty() {
                return None;
            }
            path = parent(path);
        }
    }
}

fn push_collection(stack: &mut Vec<Frame>, event: &Event<'_>, path: Option<String>) {
    match event {
        Event::MappingStart(..) => stack.push(Frame::Mapping { path, key: None, awaiting_value: false }),
        Event::SequenceStart(..) => stack.push(Frame::Sequence { path, next_index: 0 }),
        _ => {}
    }
}

/// `parent.key`, or `key` at the root.
pub(crate) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() { key.to_owned() } else { format!("{parent}.{key}") }
}

/// `data.augmentation.crop_scale[1]` → `data.augmentation.crop_scale` → `data.augmentation`.
pub(crate) fn parent(path: &str) -> &str {
    match path.rfind(['.', '[']) {
        Some(index) => &path[..index],
        None => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(line: usize, column: usize) -> Option<Place> {
        Some(Place::File(Position { line, column }))
    }

    const TEXT: &str = "\
name: demo
model:
  variant: b0
  drop_path: {rate: 0.1}
data:
  augmentation:
    crop_scale: [0.5, 1.0]
  batch_size: 32
";

    #[test]
    fn records_keys_and_values_with_one_based_columns() {
        let map = SourceMap::build(TEXT);
        assert_eq!(map.key("name"), at(1, 1));
        assert_eq!(map.value("name"), at(1, 7));
        assert_eq!(map.key("model.variant"), at(3, 3));
        assert_eq!(map.value("model.variant"), at(3, 12));
        assert_eq!(map.value("model.drop_path"), at(4, 14));
        assert_eq!(map.value("model.drop_path.rate"), at(4, 21));
        assert_eq!(map.value("data.augmentation.crop_scale"), at(7, 17));
        assert_eq!(map.value("data.augmentation.crop_scale[1]"), at(7, 23));
        assert_eq!(map.value("data.batch_size"), at(8, 15));
    }

    #[test]
    fn nearest_falls_back_to_the_closest_written_ancestor() {
        let map = SourceMap::build(TEXT);
        assert_eq!(map.nearest("data.eval_crop"), map.value("data"));
        assert_eq!(map.nearest("training.precision"), map.value(""));
        assert_eq!(map.nearest("data.augmentation.crop_scale[1]"), at(7, 23));
    }

    #[test]
    fn parents() {
        assert_eq!(parent("data.augmentation.crop_scale[1]"), "data.augmentation.crop_scale");
        assert_eq!(parent("data.augmentation"), "data");
        assert_eq!(parent("data"), "");
    }
}
