//! A YAML document as a tree, so `--set` overrides can change it before it is read.
//!
//! The tree is built from the parser's events (aliases expanded into copies of their anchors)
//! and written back as flow-style YAML that reads to the same values: plain scalars stay plain,
//! so `2`, `0.1`, `true` and `~` keep their types, and every other scalar is written
//! double-quoted, which keeps it a string. The text it writes is only ever read back by
//! serde-saphyr; errors are located through field paths, never through its positions.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde_saphyr::granit_parser::{Event, Parser, ScalarStyle, Tag};

use crate::locate::Position;

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Node {
    Scalar { text: String, plain: bool, tag: Option<String> },
    Sequence { items: Vec<Node>, tag: Option<String> },
    Mapping { entries: Vec<(Node, Node)>, tag: Option<String> },
}

/// Text the tree builder could not read: a syntax error, an alias to nothing, a second document.
#[derive(Debug)]
pub(crate) struct TreeError {
    pub position: Option<Position>,
    pub message: String,
}

/// Values (scalars, with aliases counted as the copies they become) a document may expand to. A
/// job spec holds a few hundred; the cap stops an alias bomb before it exhausts memory (serde-saphyr
/// has its own budget, but this tree is built first when `--set` overrides are given).
const MAX_NODES: usize = 100_000;

fn too_large(position: Position) -> TreeError {
    TreeError {
        position: Some(position),
        message: format!(
            "the document expands to more than {MAX_NODES} values through its aliases (an alias bomb?)"
        ),
    }
}

/// A collection whose end has not been seen yet.
enum Open {
    Sequence { items: Vec<Node>, tag: Option<String>, anchor: usize },
    Mapping { entries: Vec<(Node, Node)>, key: Option<Node>, tag: Option<String>, anchor: usize },
}

impl Node {
    /// The null scalar, as an omitted value reads.
    pub(crate) fn null() -> Node {
        Node::Scalar { text: "~".to_owned(), plain: true, tag: None }
    }

    /// Parses one YAML document; `None` when the text holds no document (empty, or comments).
    pub(crate) fn parse(text: &str) -> Result<Option<Node>, TreeError> {
        // Each anchor with the number of nodes it holds, which an alias to it copies.
        let mut anchors: HashMap<usize, (Node, usize)> = HashMap::new();
        let mut expanded = 0usize;
        let mut stack: Vec<Open> = Vec::new();
        let mut root = None;
        let mut documents = 0;
        for event in Parser::new_from_str(text) {
            let (event, span) = event.map_err(|error| TreeError {
                position: Some(Position { line: error.marker().line(), column: error.marker().col() + 1 }),
                message: error.info(),
            })?;
            let position = Position { line: span.start.line(), column: span.start.col() + 1 };
            let (node, anchor) = match event {
                Event::DocumentStart(..) => {
                    documents += 1;
                    if documents > 1 {
                        let message = "more than one YAML document".to_owned();
                        return Err(TreeError { position: Some(position), message });
                    }
                    continue;
                }
                Event::Scalar(text, style, anchor, tag) => {
                    expanded += 1;
                    if expanded > MAX_NODES {
                        return Err(too_large(position));
                    }
                    let plain = style == ScalarStyle::Plain;
                    (
                        Node::Scalar {
                            text: text.into_owned(),
                            plain,
                            tag: tag.map(|tag| written_tag(&tag)),
                        },
                        anchor,
                    )
                }
                Event::Alias(anchor) => match anchors.get(&anchor) {
                    Some((node, size)) => {
                        // Checked before the copy: a billion-laughs document (nine levels of ten
                        // aliases) would otherwise copy its way through all memory.
                        expanded = expanded.saturating_add(*size);
                        if expanded > MAX_NODES {
                            return Err(too_large(position));
                        }
                        (node.clone(), 0)
                    }
                    None => {
                        let message = "alias to an anchor that is not defined before it".to_owned();
                        return Err(TreeError { position: Some(position), message });
                    }
                },
                Event::SequenceStart(_, anchor, tag) => {
                    let tag = tag.map(|tag| written_tag(&tag));
                    stack.push(Open::Sequence { items: Vec::new(), tag, anchor });
                    continue;
                }
                Event::MappingStart(_, anchor, tag) => {
                    let tag = tag.map(|tag| written_tag(&tag));
                    stack.push(Open::Mapping { entries: Vec::new(), key: None, tag, anchor });
                    continue;
                }
                Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                    Some(Open::Sequence { items, tag, anchor }) => (Node::Sequence { items, tag }, anchor),
                    Some(Open::Mapping { entries, tag, anchor, .. }) => {
                        (Node::Mapping { entries, tag }, anchor)
                    }
                    None => continue,
                },
                Event::UnresolvedAlias(name) => {
                    let message = format!("alias *{name} to an anchor that is not defined before it");
                    return Err(TreeError { position: Some(position), message });
                }
                _ => continue,
            };
            if anchor != 0 {
                anchors.insert(anchor, (node.clone(), node.count()));
            }
            match stack.last_mut() {
                None => root = Some(node),
                Some(Open::Sequence { items, .. }) => items.push(node),
                Some(Open::Mapping { entries, key, .. }) => match key.take() {
                    None => *key = Some(node),
                    Some(key) => entries.push((key, node)),
                },
            }
        }
        Ok(root)
    }

    /// Nodes in this tree (scalars and collections), what an alias to it copies.
    fn count(&self) -> usize {
        match self {
            Node::Scalar { .. } => 1,
            Node::Sequence { items, .. } => 1 + items.iter().map(Node::count).sum::<usize>(),
            Node::Mapping { entries, .. } => {
                1 + entries.iter().map(|(key, value)| key.count() + value.count()).sum::<usize>()
            }
        }
    }

    /// The scalar's text when this is a plain or quoted scalar without a tag: a key a field
    /// path can name.
    pub(crate) fn as_key(&self) -> Option<&str> {
        match self {
            Node::Scalar { text, tag: None, .. } => Some(text),
            _ => None,
        }
    }

    /// True for an omitted value, `~` and `null` (what a section left empty reads as).
    pub(crate) fn is_null(&self) -> bool {
        matches!(self, Node::Scalar { text, plain: true, tag: None } if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// The node as flow-style YAML that reads to the same value.
    pub(crate) fn to_yaml(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        match self {
            Node::Scalar { text, plain, tag } => {
                write_tag(out, tag.as_deref());
                if *plain && text.is_empty() {
                    out.push('~');
                } else if *plain && !text.contains([',', '[', ']', '{', '}', '\n', '\r', '\t']) {
                    // A plain scalar read from block context is a valid plain scalar in flow
                    // context unless it holds a flow indicator or a line break; it then cannot
                    // be a number, boolean or null, and double quotes keep it the same string.
                    out.push_str(text);
                } else {
                    write_double_quoted(out, text);
                }
            }
            Node::Sequence { items, tag } => {
                write_tag(out, tag.as_deref());
                out.push('[');
                for (index, item) in items.iter().enumerate() {
                    if index > 0 {
                        out.push_str(", ");
                    }
                    item.write(out);
                }
                out.push(']');
            }
            Node::Mapping { entries, tag } => {
                write_tag(out, tag.as_deref());
                out.push('{');
                for (index, (key, value)) in entries.iter().enumerate() {
                    if index > 0 {
                        out.push_str(", ");
                    }
                    if !matches!(key, Node::Scalar { .. }) {
                        // A collection as a key needs the explicit-key indicator.
                        out.push_str("? ");
                    }
                    key.write(out);
                    out.push_str(": ");
                    value.write(out);
                }
                out.push('}');
            }
        }
    }
}

/// A tag as it can be written again: `!!str` for the core schema, `!local`, else verbatim.
fn written_tag(tag: &Tag) -> String {
    if tag.is_yaml_core_schema() {
        format!("!!{}", tag.suffix())
    } else if tag.handle() == "!" {
        format!("!{}", tag.suffix())
    } else {
        format!("!<{}{}>", tag.handle(), tag.suffix())
    }
}

fn write_tag(out: &mut String, tag: Option<&str>) {
    if let Some(tag) = tag {
        out.push_str(tag);
        out.push(' ');
    }
}

fn write_double_quoted(out: &mut String, text: &str) {
    out.push('"');
    for character in text.chars() {
        match character {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            // Control characters and the characters YAML treats as line breaks are escaped.
            c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}') => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_expansion_is_capped() {
        // Five levels of ten aliases: 10^5 copies of the innermost anchor, just over the cap.
        let mut text = String::from("a0: &a0 x\n");
        for level in 1..=5 {
            text += &format!("a{level}: &a{level} [{}]\n", vec![format!("*a{}", level - 1); 10].join(", "));
        }
        let error = Node::parse(&text).unwrap_err();
        assert_eq!(
            error.message,
            "the document expands to more than 100000 values through its aliases (an alias bomb?)"
        );
        assert_eq!(error.position.map(|p| p.line), Some(6), "refused on the last level's line");
        // Four levels (11,111 values each way) are fine.
        let four: String = text.lines().take(5).map(|line| format!("{line}\n")).collect();
        assert!(Node::parse(&four).unwrap().is_some());
    }

    fn round_trip(text: &str) -> String {
        Node::parse(text).unwrap().unwrap().to_yaml()
    }

    #[test]
    fn writes_flow_yaml_keeping_plain_scalars_plain() {
        let text = "\
name: demo job, v2
model: {variant: b0, dropout: 0.3}
data:
  train: s3://imagenet/train
  batch_size: 32
  val: ~
  augmentation:
    crop_scale: [0.5, 1.0]
    flip:
quoted: 'it''s \"2\"'
block: |
  two
  lines
";
        assert_eq!(
            round_trip(text),
            "{name: \"demo job, v2\", model: {variant: b0, dropout: 0.3}, data: {train: s3://imagenet/train, \
             batch_size: 32, val: ~, augmentation: {crop_scale: [0.5, 1.0], flip: ~}}, \
             quoted: \"it's \\\"2\\\"\", block: \"two\\nlines\\n\"}"
        );
    }

    #[test]
    fn written_text_reads_to_the_same_tree() {
        let text = "\
a: &base {x: 1, y: [1, 2]}
b: *base
c: !!str 12
d: \"tab\\there \\u00e9 \\x07\"
e:
  - ~
  -
  - 'x]'
";
        let tree = Node::parse(text).unwrap().unwrap();
        let written = tree.to_yaml();
        assert_eq!(Node::parse(&written).unwrap().unwrap(), tree, "{written}");
        assert!(written.contains("b: {x: 1, y: [1, 2]}"), "{written}");
        assert!(written.contains("c: !!str 12"), "{written}");
    }

    #[test]
    fn empty_documents_and_errors() {
        assert_eq!(Node::parse("").unwrap(), None);
        assert_eq!(Node::parse("# only a comment\n").unwrap(), None);
        assert!(Node::parse("a: 1\n---\nb: 2\n").unwrap_err().message.contains("more than one"));
        let error = Node::parse("a: [1, 2\n").unwrap_err();
        assert!(error.position.is_some(), "{error:?}");
        assert!(Node::parse("a: *nowhere\n").is_err());
    }
}
