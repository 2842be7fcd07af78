//! Diagnostics that point at the offending place in an operator's file.
//!
//! Every parse or validation problem becomes a [`Diagnostic`]: the file, the line and column
//! where there is one, the key path (`placement.replicas`, `container[0].ports[1].container`)
//! and a reason a person can act on. Validation collects all problems of a document at once
//! ([`Invalid`]) so that an operator fixes a file in one pass, not one error per run.

use std::fmt;

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue};

/// One step of a key path inside a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A path to a value inside a TOML or YAML document, such as `container[0].resources.cpu`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(Vec<Seg>);

impl KeyPath {
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// A path parsed from dotted notation with `[n]` indexes (`container[0].image`).
    pub fn parse(dotted: &str) -> Self {
        let mut segs = Vec::new();
        for part in dotted.split('.').filter(|p| !p.is_empty()) {
            let mut rest = part;
            if let Some(open) = rest.find('[') {
                segs.push(Seg::Key(rest[..open].to_owned()));
                rest = &rest[open..];
                while let Some(stripped) = rest.strip_prefix('[') {
                    let Some(close) = stripped.find(']') else {
                        break;
                    };
                    match stripped[..close].parse() {
                        Ok(i) => segs.push(Seg::Index(i)),
                        Err(_) => segs.push(Seg::Key(stripped[..close].to_owned())),
                    }
                    rest = &stripped[close + 1..];
                }
            } else {
                segs.push(Seg::Key(rest.to_owned()));
            }
        }
        Self(segs)
    }

    pub fn key(&self, k: impl Into<String>) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.into()));
        p
    }

    pub fn index(&self, i: usize) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }

    pub fn segments(&self) -> &[Seg] {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if bare {
                        f.write_str(k)?;
                    } else {
                        write!(f, "{k:?}")?;
                    }
                }
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A problem with one place in one document.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Diagnostic {
    /// The file (or `<stdin>`, or a description such as `signed manifest`).
    pub source: String,
    /// 1-based line, where the problem has a position.
    pub line: Option<usize>,
    /// 1-based column (in characters), where the problem has a position.
    pub column: Option<usize>,
    /// The key path, where the problem belongs to a key (empty for document-wide problems).
    pub key: String,
    pub reason: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        f.write_str(": ")?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.reason)
    }
}

/// A document that failed to parse or validate, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Invalid {
    pub diagnostics: Vec<Diagnostic>,
}

impl Invalid {
    pub fn single(d: Diagnostic) -> Self {
        Self {
            diagnostics: vec![d],
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.diagnostics.split_first() {
            None => f.write_str("invalid document"),
            Some((first, rest)) => {
                write!(f, "{first}")?;
                if !rest.is_empty() {
                    write!(
                        f,
                        " (and {} more problem{})",
                        rest.len(),
                        if rest.len() == 1 { "" } else { "s" }
                    )?;
                }
                Ok(())
            }
        }
    }
}

/// Problems found by a `validate` step, before they are given positions.
#[derive(Debug, Default)]
pub struct Problems(Vec<(KeyPath, String)>);

impl Problems {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, at: KeyPath, reason: impl Into<String>) {
        self.0.push((at, reason.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Turns the problems into diagnostics located in `text` (the document they came from).
    pub fn locate(self, source: &str, text: Option<&str>) -> Result<(), Invalid> {
        if self.0.is_empty() {
            return Ok(());
        }
        let doc = text.and_then(|t| DeTable::parse(t).ok().map(|d| (t, d)));
        let diagnostics = self
            .0
            .into_iter()
            .map(|(path, reason)| {
                let pos = doc.as_ref().and_then(|(t, d)| {
                    let span = span_of(d.get_ref(), &path)?;
                    Some(line_col(t, span.start))
                });
                Diagnostic {
                    source: source.to_owned(),
                    line: pos.map(|p| p.0),
                    column: pos.map(|p| p.1),
                    key: path.to_string(),
                    reason,
                }
            })
            .collect();
        Err(Invalid { diagnostics })
    }
}

/// The byte span of the deepest existing value along `path` in a parsed TOML document.
fn span_of(root: &DeTable<'_>, path: &KeyPath) -> Option<std::ops::Range<usize>> {
    let mut segs = path.segments().iter();
    let first = match segs.next()? {
        Seg::Key(k) => root.get(k.as_str())?,
        Seg::Index(_) => return None,
    };
    let mut cur = first;
    for seg in segs {
        let next = match (seg, cur.get_ref()) {
            (Seg::Key(k), v @ DeValue::Table(_)) => v.get(k.as_str()),
            (Seg::Index(i), v @ DeValue::Array(_)) => v.get(*i),
            _ => None,
        };
        match next {
            Some(n) => cur = n,
            // Point at the closest enclosing value that exists.
            None => break,
        }
    }
    Some(cur.span())
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Parses a TOML document into `T`, turning every syntax or type error into a located
/// diagnostic with its key path.
pub fn from_toml<T: DeserializeOwned>(source: &str, text: &str) -> Result<T, Invalid> {
    let de = toml::de::Deserializer::parse(text).map_err(|e| toml_error(source, text, &e, None))?;
    let mut track = serde_path_to_error::Track::new();
    let pd = serde_path_to_error::Deserializer::new(de, &mut track);
    match T::deserialize(pd) {
        Ok(v) => Ok(v),
        Err(e) => {
            let path = track.path();
            Err(toml_error(source, text, &e, Some(&path)))
        }
    }
}

fn toml_error(
    source: &str,
    text: &str,
    e: &toml::de::Error,
    path: Option<&serde_path_to_error::Path>,
) -> Invalid {
    let key = path.map(convert_path).unwrap_or_default();
    let mut pos = e.span().map(|s| line_col(text, s.start));
    if pos.is_none() && !key.is_root() {
        pos = DeTable::parse(text)
            .ok()
            .and_then(|d| span_of(d.get_ref(), &key))
            .map(|s| line_col(text, s.start));
    }
    Invalid::single(Diagnostic {
        source: source.to_owned(),
        line: pos.map(|p| p.0),
        column: pos.map(|p| p.1),
        key: key.to_string(),
        reason: e.message().trim().replace('\n', "; "),
    })
}

/// Converts serde_path_to_error's path into ours (and drops the `?` of unknown segments).
pub(crate) fn convert_path(p: &serde_path_to_error::Path) -> KeyPath {
    use serde_path_to_error::Segment;
    let mut out = KeyPath::root();
    for seg in p.iter() {
        out = match seg {
            Segment::Seq { index } => out.index(*index),
            Segment::Map { key } => out.key(key.clone()),
            Segment::Enum { variant } => out.key(variant.clone()),
            Segment::Unknown => out,
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_path_display_and_parse_round_trip() {
        let p = KeyPath::root()
            .key("container")
            .index(0)
            .key("ports")
            .index(2);
        assert_eq!(p.to_string(), "container[0].ports[2]");
        assert_eq!(KeyPath::parse("container[0].ports[2]"), p);
        assert_eq!(
            KeyPath::root().key("labels").key("a b").to_string(),
            "labels.\"a b\""
        );
    }

    #[test]
    fn line_col_counts_characters() {
        let t = "a = 1\nbé = 2\n";
        assert_eq!(line_col(t, 0), (1, 1));
        let off = t.find("= 2").unwrap_or(0);
        assert_eq!(line_col(t, off), (2, 4));
    }

    #[test]
    fn problems_are_located_at_their_key() {
        let text = "[placement]\nreplicas = 0\n";
        let mut p = Problems::new();
        p.push(KeyPath::parse("placement.replicas"), "must be at least 1");
        let err = p.locate("m.toml", Some(text)).expect_err("has problems");
        let d = &err.diagnostics[0];
        assert_eq!((d.line, d.column), (Some(2), Some(12)));
        assert_eq!(
            d.to_string(),
            "m.toml:2:12: placement.replicas: must be at least 1"
        );
    }
}
