//! Kubernetes import: Pod, Deployment and StatefulSet objects to workload manifests.
//!
//! [`convert`] reads a YAML stream of one or more documents and maps each object onto a
//! [`Manifest`] as DESIGN.md section 2 describes. The walk is an explicit allowlist: every key
//! of every object is converted, accepted with a [`Note`] (it has no runtime effect here, or a
//! default had to be chosen where Kubernetes and BeeMesh differ), or refused with a diagnostic
//! that names its Kubernetes path (`spec.template.spec.volumes[0].hostPath`). A key this module
//! does not know is refused too, so nothing is ever dropped silently.
//!
//! The input is untrusted. Its size and number of documents are bounded; so are the YAML
//! scanner's work on flow collections, the values built where YAML aliases repeat a node
//! ("billion laughs"), nesting (by the YAML parser's recursion limit) and the number of
//! problems reported. No input makes this module panic.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::de::{self, DeserializeSeed, EnumAccess, MapAccess, SeqAccess, Visitor};
use serde_norway::{Mapping, Number, Value};

use crate::diag::{Diagnostic, Invalid, KeyPath};
use crate::input::MAX_KUBE_BYTES;
use crate::names::{check_capability, check_dns_label, check_env_name, check_label};
use crate::quantity::{Cpu, Duration, Memory};
use crate::workload::{
    API_VERSION, Consistency, ConsistencyMode, Container, Health, KIND_WORKLOAD, MAX_REPLICAS,
    Manifest, Placement, Policy, Port, Protocol, Resources, Rollout, Security, Volume,
};

/// Most documents one input may hold (empty documents included).
pub const MAX_DOCUMENTS: usize = 1000;

/// Most problems reported for one input; the rest are counted, not listed.
const MAX_PROBLEMS: usize = 1000;

/// Most `bytes × flow collections` one document may have (see [`check_flow_cost`]).
const MAX_FLOW_COST: u64 = 200_000_000;

/// Most bytes that `$(VAR)` expansion may produce for one container.
const MAX_EXPANDED_BYTES: usize = 1 << 20;

const UNSUPPORTED: &str = "field is not supported by BeeMesh";
const NO_EFFECT: &str = "accepted; it has no effect in BeeMesh";
const CLUSTER_BOOKKEEPING: &str = "written by a Kubernetes cluster; ignored";

/// Options for [`convert`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeOptions {
    /// The generation every produced manifest carries. It must exceed the generation a node
    /// has already accepted for the same workload.
    pub generation: u64,
}

impl Default for KubeOptions {
    fn default() -> Self {
        Self { generation: 1 }
    }
}

/// A field accepted without runtime effect here, or a default chosen where Kubernetes and
/// BeeMesh behave differently.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Note {
    /// The Kubernetes path the note is about (`spec.revisionHistoryLimit`); empty when it is
    /// about the object as a whole.
    pub path: String,
    /// What was accepted or chosen, and why.
    pub message: String,
}

/// One Kubernetes object converted to a workload manifest.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The object and its place in the input, e.g. `Deployment/web (document 2)`.
    pub source: String,
    /// The workload manifest; it passes [`Manifest::validate`].
    pub manifest: Manifest,
    /// Fields accepted without runtime effect, and defaults chosen, in document order.
    pub notes: Vec<Note>,
}

/// Converts every Pod, Deployment and StatefulSet in a YAML stream to a workload manifest.
///
/// `source` names the input in diagnostics (a file name, or `<stdin>`). Empty documents are
/// skipped; any other kind of object is an error. Either every object converts, or the error
/// lists every problem of every document, each with the document, the Kubernetes path and
/// what to do instead.
pub fn convert(source: &str, yaml: &str, opts: &KubeOptions) -> Result<Vec<Converted>, Invalid> {
    let whole = |reason: String| Diagnostic {
        source: source.to_owned(),
        line: None,
        column: None,
        key: String::new(),
        reason,
    };
    if u64::try_from(yaml.len()).map_or(true, |len| len > MAX_KUBE_BYTES) {
        return Err(Invalid::single(whole(format!(
            "{} bytes is more than the limit of {MAX_KUBE_BYTES} bytes for Kubernetes YAML",
            yaml.len()
        ))));
    }
    if opts.generation == 0 {
        return Err(Invalid::single(whole(
            "the generation to give the manifests must be at least 1".to_owned(),
        )));
    }

    if let Some(d) = check_flow_cost(source, yaml) {
        return Err(Invalid::single(d));
    }

    let budget = Budget::for_input(yaml.len());
    let mut report = Report::default();
    let mut converted = Vec::new();
    // Workload id -> the document that defines it.
    let mut defined: BTreeMap<String, usize> = BTreeMap::new();
    let mut objects = 0usize;

    for (index, document) in serde_norway::Deserializer::from_str(yaml).enumerate() {
        let number = index + 1;
        if number > MAX_DOCUMENTS {
            report.stopped = Some(whole(format!(
                "more than {MAX_DOCUMENTS} documents; split the input into several files"
            )));
            break;
        }
        let mut value = match Node(&budget).deserialize(document) {
            Ok(value) => value,
            Err(e) => {
                report.push(yaml_error(&format!("{source} (document {number})"), &e));
                // The parser cannot resynchronise after an error: later documents are unread.
                break;
            }
        };
        if let Err(e) = value.apply_merge() {
            report.push(yaml_error(&format!("{source} (document {number})"), &e));
            continue;
        }
        if value.is_null() {
            continue;
        }
        objects += 1;
        match convert_document(source, number, &value, opts, &mut defined) {
            Ok(c) => converted.push(c),
            Err(problems) => {
                for p in problems {
                    report.push(p);
                }
            }
        }
    }

    if report.is_empty() && objects == 0 {
        report.push(whole(
            "no Kubernetes object found (the input is empty or holds only empty documents)"
                .to_owned(),
        ));
    }
    report.finish(source)?;
    Ok(converted)
}

/// Converts the object of document `number` and validates the result. `defined` maps the
/// workloads of earlier documents to their document, so that a name is not defined twice.
fn convert_document(
    source: &str,
    number: usize,
    value: &Value,
    opts: &KubeOptions,
    defined: &mut BTreeMap<String, usize>,
) -> Result<Converted, Vec<Diagnostic>> {
    let label = describe(value);
    let doc_source = match &label {
        Some(l) => format!("{source} (document {number}, {l})"),
        None => format!("{source} (document {number})"),
    };
    let mut doc = Doc::default();
    let manifest = convert_object(&mut doc, value, opts);
    let mut problems = doc.diagnostics(&doc_source);
    let Some(manifest) = manifest else {
        return Err(problems);
    };

    if let Err(invalid) = manifest.validate().locate(&doc_source, None) {
        problems.extend(
            invalid
                .diagnostics
                .into_iter()
                .filter(|d| !doc.covers(&d.key))
                .map(|d| Diagnostic {
                    reason: format!("converted manifest: {}", d.reason),
                    ..d
                }),
        );
    }
    if !manifest.name.is_empty() {
        if let Some(first) = defined.get(&manifest.id()) {
            problems.push(Diagnostic {
                source: doc_source.clone(),
                line: None,
                column: None,
                key: "metadata.name".to_owned(),
                reason: format!(
                    "workload {} is already defined by document {first}; give each object its own name",
                    manifest.id()
                ),
            });
        } else {
            defined.insert(manifest.id(), number);
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Converted {
        source: match &label {
            Some(l) => format!("{l} (document {number})"),
            None => format!("document {number}"),
        },
        manifest,
        notes: doc.notes,
    })
}

/// Diagnostics of one input, with a bound on how many are kept.
#[derive(Default)]
struct Report {
    diagnostics: Vec<Diagnostic>,
    dropped: usize,
    /// Why the input was not read to its end; always reported.
    stopped: Option<Diagnostic>,
}

impl Report {
    fn push(&mut self, d: Diagnostic) {
        if self.diagnostics.len() < MAX_PROBLEMS {
            self.diagnostics.push(d);
        } else {
            self.dropped += 1;
        }
    }

    fn is_empty(&self) -> bool {
        self.diagnostics.is_empty() && self.dropped == 0 && self.stopped.is_none()
    }

    fn finish(mut self, source: &str) -> Result<(), Invalid> {
        if self.dropped > 0 {
            self.diagnostics.push(Diagnostic {
                source: source.to_owned(),
                line: None,
                column: None,
                key: String::new(),
                reason: format!("{} more problems are not listed", self.dropped),
            });
        }
        self.diagnostics.extend(self.stopped);
        if self.diagnostics.is_empty() {
            Ok(())
        } else {
            Err(Invalid {
                diagnostics: self.diagnostics,
            })
        }
    }
}

/// A YAML syntax (or expansion) error, located where the parser found it.
fn yaml_error(source: &str, e: &serde_norway::Error) -> Diagnostic {
    let location = e.location();
    let mut reason = e.to_string();
    if let Some(l) = &location {
        // The position is reported separately.
        reason = reason.replacen(
            &format!(" at line {} column {}", l.line(), l.column()),
            "",
            1,
        );
    }
    Diagnostic {
        source: source.to_owned(),
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        key: String::new(),
        reason,
    }
}

/// `Deployment/web` for diagnostics, from whatever the object names itself.
fn describe(value: &Value) -> Option<String> {
    fn clean(s: &str) -> String {
        s.chars().filter(|c| !c.is_control()).take(80).collect()
    }
    let kind = value.get("kind").and_then(Value::as_str).map(clean)?;
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .map(clean);
    Some(match name {
        Some(name) => format!("{kind}/{name}"),
        None => kind,
    })
}

// ---------------------------------------------------------------------------------------------
// Bounded YAML loading

/// Refuses documents whose flow collections would make the YAML scanner slow.
///
/// libyaml's scanner keeps one "simple key" per open flow collection (`[` or `{`) and walks
/// them for every token, so its work grows with the document's length times its flow nesting
/// depth: 40,000 nested `{a: ` (160 KB) take 20 seconds, ten times as many half an hour.
/// The depth is at most the
/// number of `[` and `{` characters in the document, so bounding length × that count bounds
/// the work, without having to tokenize YAML here. Documents are split at lines starting with
/// `---` or `...`; libyaml ends (or fails) a document at each of them, whatever it is
/// scanning. Real manifests, flow style and JSON included, stay far below the bound.
fn check_flow_cost(source: &str, yaml: &str) -> Option<Diagnostic> {
    let bytes = yaml.as_bytes();
    let marker = |i: usize| {
        let rest = bytes.get(i..).unwrap_or_default();
        (rest.starts_with(b"---") || rest.starts_with(b"..."))
            && matches!(rest.get(3), None | Some(b' ' | b'\t' | b'\r' | b'\n'))
    };
    let check = |start: usize, end: usize, openers: u64, line: usize| {
        let len = u64::try_from(end - start).unwrap_or(u64::MAX);
        (len.saturating_mul(openers) > MAX_FLOW_COST).then(|| Diagnostic {
            source: source.to_owned(),
            line: Some(line),
            column: Some(1),
            key: String::new(),
            reason: format!(
                "the document starting here has {openers} flow collections ('[' or '{{') in {len} bytes; \
                 the YAML reader's work grows with both, and their product may be at most {MAX_FLOW_COST}: \
                 write large or deeply nested documents in block style"
            ),
        })
    };
    let (mut start, mut start_line, mut line, mut openers) = (0, 1, 1, 0u64);
    for (i, b) in bytes.iter().enumerate() {
        if (i == 0 || bytes.get(i - 1) == Some(&b'\n')) && i > start && marker(i) {
            if let Some(d) = check(start, i, openers, start_line) {
                return Some(d);
            }
            (start, start_line, openers) = (i, line, 0);
        }
        match b {
            b'\n' => line += 1,
            b'[' | b'{' => openers += 1,
            _ => {}
        }
    }
    check(start, bytes.len(), openers, start_line)
}

const EXPANSION_LIMIT: &str = "the document expands (through YAML aliases) to far more data than the input holds; refusing it";

/// Bounds what one input may expand to once YAML aliases are resolved.
///
/// serde_norway bounds nesting (128 levels) and the number of alias jumps, but an alias to a
/// large node may still be repeated often enough to build gigabytes out of kilobytes. Every
/// node built is charged here, and every string its length, so the values built from an input
/// stay within a small multiple of its size.
struct Budget {
    left: Cell<usize>,
}

impl Budget {
    fn for_input(len: usize) -> Self {
        Self {
            left: Cell::new(len.saturating_mul(2).saturating_add(64 * 1024)),
        }
    }

    fn charge<E: de::Error>(&self, units: usize) -> Result<(), E> {
        match self.left.get().checked_sub(units) {
            Some(left) => {
                self.left.set(left);
                Ok(())
            }
            None => {
                self.left.set(0);
                Err(E::custom(EXPANSION_LIMIT))
            }
        }
    }
}

/// Builds a [`Value`] from a YAML document, charging every node to a [`Budget`], refusing
/// duplicate keys and local tags, and turning scalar keys into strings as Kubernetes does.
#[derive(Clone, Copy)]
struct Node<'b>(&'b Budget);

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.0.charge(1)?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.0.charge(1)?;
        Ok(Value::Number(Number::from(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.0.charge(1)?;
        Ok(Value::Number(Number::from(v)))
    }

    // Integers beyond 64 bits fit no Kubernetes field; keep them as (inexact) decimals so that
    // the field they sit in reports them.
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        self.0.charge(1)?;
        Ok(Value::Number(Number::from(v as f64)))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        self.0.charge(1)?;
        Ok(Value::Number(Number::from(v as f64)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.0.charge(1)?;
        Ok(Value::Number(Number::from(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.0.charge(v.len().saturating_add(1))?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.0.charge(v.len().saturating_add(1))?;
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.0.charge(1)?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.0.charge::<A::Error>(1)?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(Value::Sequence(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.0.charge::<A::Error>(1)?;
        let mut out = Mapping::new();
        while let Some(key) = map.next_key_seed(Key(self.0))? {
            let value = map.next_value_seed(self)?;
            if let Some(_previous) = out.insert(Value::String(key.clone()), value) {
                return Err(de::Error::custom(format!(
                    "key {key:?} appears twice in one mapping"
                )));
            }
        }
        Ok(Value::Mapping(out))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        let (tag, _rest): (String, _) = data.variant()?;
        Err(de::Error::custom(format!(
            "YAML tag !{tag} is not supported in Kubernetes objects; remove it"
        )))
    }
}

/// A mapping key: a string, or a number or boolean written as one.
struct Key<'b>(&'b Budget);

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = String;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        match Node(self.0).deserialize(deserializer)? {
            Value::String(s) => Ok(s),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            other => Err(de::Error::custom(format!(
                "a mapping key must be a string, not {}",
                type_name(&other)
            ))),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Walking objects

/// What the conversion of one document found.
#[derive(Default)]
struct Doc {
    errors: Vec<(KeyPath, String)>,
    /// Errors beyond [`MAX_PROBLEMS`], counted only.
    dropped: usize,
    notes: Vec<Note>,
    /// Manifest key paths whose validation problems would repeat an error already reported at
    /// a Kubernetes path (the manifest holds a placeholder there).
    covered: BTreeSet<String>,
}

impl Doc {
    fn error(&mut self, at: &KeyPath, reason: impl Into<String>) {
        if self.errors.len() < MAX_PROBLEMS {
            self.errors.push((at.clone(), reason.into()));
        } else {
            self.dropped += 1;
        }
    }

    fn note(&mut self, at: &KeyPath, message: impl Into<String>) {
        if self.notes.len() < MAX_PROBLEMS {
            self.notes.push(Note {
                path: at.to_string(),
                message: message.into(),
            });
        }
    }

    /// A mark to pass to [`Doc::cover_since`].
    fn mark(&self) -> usize {
        self.errors.len() + self.dropped
    }

    /// Covers `manifest_key` when errors were reported since `mark`.
    fn cover_since(&mut self, mark: usize, manifest_key: &KeyPath) {
        if self.mark() > mark {
            self.covered.insert(manifest_key.to_string());
        }
    }

    /// Whether `key` or a key path it lies under (`container[0]` for `container[0].image`)
    /// is covered.
    fn covers(&self, key: &str) -> bool {
        key.match_indices(['.', '['])
            .map(|(i, _)| i)
            .chain([key.len()])
            .any(|end| key.get(..end).is_some_and(|k| self.covered.contains(k)))
    }

    fn diagnostics(&self, source: &str) -> Vec<Diagnostic> {
        let mut out: Vec<Diagnostic> = self
            .errors
            .iter()
            .map(|(at, reason)| Diagnostic {
                source: source.to_owned(),
                line: None,
                column: None,
                key: at.to_string(),
                reason: reason.clone(),
            })
            .collect();
        if self.dropped > 0 {
            out.push(Diagnostic {
                source: source.to_owned(),
                line: None,
                column: None,
                key: String::new(),
                reason: format!(
                    "{} more problems in this document are not listed",
                    self.dropped
                ),
            });
        }
        out
    }
}

/// The keys of one object, each to be converted, noted or refused exactly once.
struct Fields<'v> {
    at: KeyPath,
    entries: Vec<(&'v str, &'v Value, bool)>,
}

impl<'v> Fields<'v> {
    /// The object at `at`; anything but a mapping is reported and reads as empty.
    fn new(doc: &mut Doc, value: &'v Value, at: &KeyPath) -> Self {
        let mut entries = Vec::new();
        match value {
            Value::Mapping(map) => {
                for (k, v) in map {
                    match k {
                        Value::String(k) => entries.push((k.as_str(), v, false)),
                        other => doc.error(
                            at,
                            format!("keys must be strings, not {}", type_name(other)),
                        ),
                    }
                }
            }
            Value::Null => {}
            other => doc.error(at, format!("must be an object, not {}", type_name(other))),
        }
        Self {
            at: at.clone(),
            entries,
        }
    }

    fn path(&self, key: &str) -> KeyPath {
        self.at.key(key)
    }

    /// The value of `key`, which is now handled. `null` reads as absent, as in Kubernetes.
    fn take(&mut self, key: &str) -> Option<&'v Value> {
        let entry = self.entries.iter_mut().find(|e| e.0 == key)?;
        entry.2 = true;
        Some(entry.1).filter(|v| !v.is_null())
    }

    /// Whether `key` is present at all (even as `null`).
    fn has(&self, key: &str) -> bool {
        self.entries.iter().any(|e| e.0 == key)
    }

    /// The string at `key`, if any (anything else is reported).
    fn str(&mut self, doc: &mut Doc, key: &str) -> Option<&'v str> {
        let at = self.path(key);
        self.take(key).and_then(|v| read_str(doc, v, &at))
    }

    /// The string at `key`, which must be there.
    fn required_str(&mut self, doc: &mut Doc, key: &str) -> Option<&'v str> {
        let at = self.path(key);
        match self.take(key) {
            Some(v) => read_str(doc, v, &at),
            None => {
                doc.error(&at, "is required");
                None
            }
        }
    }

    /// The integer at `key`, if any, within `min..=max`.
    fn int(&mut self, doc: &mut Doc, key: &str, min: i64, max: i64) -> Option<i64> {
        let at = self.path(key);
        self.take(key).and_then(|v| read_int(doc, v, &at, min, max))
    }

    /// The boolean at `key`, if any.
    fn bool(&mut self, doc: &mut Doc, key: &str) -> Option<bool> {
        let at = self.path(key);
        self.take(key).and_then(|v| read_bool(doc, v, &at))
    }

    /// Accepts `key` without runtime effect, noting it when it holds something.
    fn note(&mut self, doc: &mut Doc, key: &str, why: &str) {
        if let Some(v) = self.take(key)
            && !is_empty(v)
        {
            doc.note(&self.path(key), why);
        }
    }

    /// Refuses `key` when it holds something (an empty list or object is accepted).
    fn refuse(&mut self, doc: &mut Doc, key: &str, why: &str) {
        if let Some(v) = self.take(key)
            && !is_empty(v)
        {
            doc.error(&self.path(key), why);
        }
    }

    /// Refuses a boolean `key` set to true; false is what BeeMesh does anyway.
    fn refuse_true(&mut self, doc: &mut Doc, key: &str, why: &str) {
        if self.bool(doc, key) == Some(true) {
            doc.error(&self.path(key), why);
        }
    }

    /// The keys not handled yet, which are now handled.
    fn rest(&mut self) -> Vec<(&'v str, &'v Value)> {
        self.entries
            .iter_mut()
            .filter(|e| !e.2)
            .map(|e| {
                e.2 = true;
                (e.0, e.1)
            })
            .collect()
    }

    /// Refuses every key not handled.
    fn finish(mut self, doc: &mut Doc) {
        for (key, _) in self.rest() {
            doc.error(&self.path(key), UNSUPPORTED);
        }
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Sequence(s) => s.is_empty(),
        Value::Mapping(m) => m.is_empty(),
        _ => false,
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "an object",
        Value::Tagged(_) => "a tagged value",
    }
}

fn read_str<'v>(doc: &mut Doc, v: &'v Value, at: &KeyPath) -> Option<&'v str> {
    match v {
        Value::String(s) => Some(s.as_str()),
        Value::Number(_) | Value::Bool(_) => {
            doc.error(
                at,
                format!("must be a string, not {}; quote the value", type_name(v)),
            );
            None
        }
        _ => {
            doc.error(at, format!("must be a string, not {}", type_name(v)));
            None
        }
    }
}

fn read_bool(doc: &mut Doc, v: &Value, at: &KeyPath) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        _ => {
            doc.error(at, format!("must be true or false, not {}", type_name(v)));
            None
        }
    }
}

fn read_int(doc: &mut Doc, v: &Value, at: &KeyPath, min: i64, max: i64) -> Option<i64> {
    match v {
        Value::Number(n) if !n.is_f64() => match n.as_i64() {
            Some(i) if (min..=max).contains(&i) => Some(i),
            _ => {
                doc.error(at, format!("{n} is out of range ({min} to {max})"));
                None
            }
        },
        _ => {
            doc.error(at, format!("must be an integer, not {}", type_name(v)));
            None
        }
    }
}

/// Seconds as Kubernetes writes them (an int32), at least `min`.
fn read_seconds(doc: &mut Doc, v: &Value, at: &KeyPath, min: i64) -> Option<Duration> {
    let secs = read_int(doc, v, at, min, i64::from(i32::MAX))?;
    u64::try_from(secs).ok().map(|s| Duration(s * 1000))
}

fn read_port(doc: &mut Doc, v: &Value, at: &KeyPath) -> Option<u16> {
    read_int(doc, v, at, 1, 65535).and_then(|p| u16::try_from(p).ok())
}

fn read_list<'v>(doc: &mut Doc, v: &'v Value, at: &KeyPath) -> &'v [Value] {
    match v {
        Value::Sequence(items) => items.as_slice(),
        _ => {
            doc.error(at, format!("must be a list, not {}", type_name(v)));
            &[]
        }
    }
}

fn read_str_list(doc: &mut Doc, v: &Value, at: &KeyPath) -> Vec<String> {
    read_list(doc, v, at)
        .iter()
        .enumerate()
        .filter_map(|(i, item)| read_str(doc, item, &at.index(i)).map(str::to_owned))
        .collect()
}

/// An object with free-form string keys (labels, nodeSelector).
fn read_str_map(doc: &mut Doc, v: &Value, at: &KeyPath) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match v {
        Value::Mapping(map) => {
            for (k, val) in map {
                let Value::String(k) = k else {
                    doc.error(at, format!("keys must be strings, not {}", type_name(k)));
                    continue;
                };
                // `key:` with no value is the empty string, as in Kubernetes.
                let value = match val {
                    Value::Null => Some(""),
                    other => read_str(doc, other, &at.key(k.as_str())),
                };
                if let Some(value) = value {
                    out.insert(k.clone(), value.to_owned());
                }
            }
        }
        _ => doc.error(at, format!("must be an object, not {}", type_name(v))),
    }
    out
}

/// Labels (or node selector terms), checked where they are written.
fn read_labels(doc: &mut Doc, v: &Value, at: &KeyPath) -> BTreeMap<String, String> {
    let labels = read_str_map(doc, v, at);
    for (k, value) in &labels {
        for (s, is_key) in [(k, true), (value, false)] {
            if let Err(e) = check_label(s, is_key) {
                doc.error(&at.key(k.as_str()), e);
            }
        }
    }
    labels
}

fn read_quantity<T: FromStr<Err = String>>(doc: &mut Doc, v: &Value, at: &KeyPath) -> Option<T> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => {
            doc.error(
                at,
                format!(
                    "must be a quantity such as \"250m\" or \"64Mi\", not {}",
                    type_name(v)
                ),
            );
            return None;
        }
    };
    match text.parse() {
        Ok(q) => Some(q),
        Err(e) => {
            doc.error(at, e);
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Objects

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pod,
    Deployment,
    StatefulSet,
}

impl Kind {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "Pod" => Some(Self::Pod),
            "Deployment" => Some(Self::Deployment),
            "StatefulSet" => Some(Self::StatefulSet),
            _ => None,
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::Pod => "v1",
            Self::Deployment | Self::StatefulSet => "apps/v1",
        }
    }
}

fn new_manifest(generation: u64) -> Manifest {
    Manifest {
        api: API_VERSION.to_owned(),
        kind: KIND_WORKLOAD.to_owned(),
        name: String::new(),
        namespace: "default".to_owned(),
        generation,
        expires: None,
        deleted: false,
        labels: BTreeMap::new(),
        placement: Placement::default(),
        consistency: Consistency::default(),
        rollout: Rollout::default(),
        containers: Vec::new(),
        policy: Policy::default(),
    }
}

/// Converts one object. `None` when it is not an object of a kind this module reads (the
/// reason is reported); otherwise the manifest, with placeholders where errors were reported.
fn convert_object(doc: &mut Doc, value: &Value, opts: &KubeOptions) -> Option<Manifest> {
    let root = KeyPath::root();
    if !matches!(value, Value::Mapping(_)) {
        doc.error(
            &root,
            format!(
                "a Kubernetes object must be a mapping, not {}",
                type_name(value)
            ),
        );
        return None;
    }
    let mut obj = Fields::new(doc, value, &root);

    let kind_at = obj.path("kind");
    let kind = match obj.take("kind") {
        None => {
            doc.error(&kind_at, "is required: Pod, Deployment or StatefulSet");
            return None;
        }
        Some(k) => {
            let k = read_str(doc, k, &kind_at)?;
            match Kind::parse(k) {
                Some(kind) => kind,
                None => {
                    doc.error(
                        &kind_at,
                        format!(
                            "kind {k:?} is not supported: BeeMesh imports Pod, Deployment and StatefulSet; \
                             remove this document (workloads reach each other through the mesh, without Services)"
                        ),
                    );
                    return None;
                }
            }
        }
    };
    let api_at = obj.path("apiVersion");
    match obj.take("apiVersion") {
        None => doc.error(&api_at, format!("is required: {:?}", kind.api_version())),
        Some(a) => {
            if let Some(a) = read_str(doc, a, &api_at)
                && a != kind.api_version()
            {
                doc.error(
                    &api_at,
                    format!(
                        "{a:?} is not supported for {kind:?}; write apiVersion: {}",
                        kind.api_version()
                    ),
                );
            }
        }
    }

    let mut m = new_manifest(opts.generation);
    let meta_at = obj.path("metadata");
    let labels = match obj.take("metadata") {
        Some(meta) => object_metadata(doc, meta, &meta_at, &mut m),
        None => {
            doc.error(&meta_at, "is required: metadata.name names the workload");
            doc.covered.insert("name".to_owned());
            BTreeMap::new()
        }
    };

    let spec_at = obj.path("spec");
    match obj.take("spec") {
        None => {
            doc.error(&spec_at, "is required");
            doc.covered.insert("container".to_owned());
        }
        Some(spec) => match kind {
            Kind::Pod => {
                m.labels = labels;
                pod_spec(doc, spec, &spec_at, &mut m, kind);
            }
            Kind::Deployment | Kind::StatefulSet => {
                workload_spec(doc, spec, &spec_at, kind, &mut m, labels);
            }
        },
    }
    obj.note(
        doc,
        "status",
        "status is written by a Kubernetes cluster; ignored",
    );
    obj.finish(doc);

    if m.placement.replicas > 1 {
        doc.note(
            &spec_at.key("replicas"),
            "BeeMesh places at most one replica per node (placement.spread = \"node\"); \
             Kubernetes may run several replicas on one node",
        );
    }
    if m.containers.iter().any(|c| !c.ports.is_empty()) {
        doc.note(
            &root,
            "policy.allow_from is empty: no workload may connect to this one until you list the \
             identities (namespace/name) allowed to; Kubernetes allows all traffic unless a NetworkPolicy says otherwise",
        );
    }
    doc.note(
        &root,
        "policy.egress is empty: the workload may not reach destinations outside the mesh until \
         you list them; Kubernetes allows all egress unless a NetworkPolicy says otherwise",
    );
    Some(m)
}

/// An object's metadata: the name, namespace and labels of the workload.
fn object_metadata(
    doc: &mut Doc,
    v: &Value,
    at: &KeyPath,
    m: &mut Manifest,
) -> BTreeMap<String, String> {
    let mut f = Fields::new(doc, v, at);

    let mark = doc.mark();
    let name_at = f.path("name");
    match f.take("name") {
        Some(n) => {
            if let Some(n) = read_str(doc, n, &name_at) {
                if let Err(e) = check_dns_label(n) {
                    doc.error(
                        &name_at,
                        format!("{e}; BeeMesh workload names are DNS-1123 labels"),
                    );
                }
                m.name = n.to_owned();
            }
            f.note(
                doc,
                "generateName",
                "ignored because metadata.name is set (as in Kubernetes)",
            );
        }
        None if f.has("generateName") => {
            f.take("generateName");
            doc.error(
                &f.path("generateName"),
                "is not supported: a workload needs a fixed name; set metadata.name instead",
            );
        }
        None => doc.error(&name_at, "is required: it names the workload"),
    }
    doc.cover_since(mark, &KeyPath::root().key("name"));

    let mark = doc.mark();
    let ns_at = f.path("namespace");
    match f.take("namespace") {
        Some(ns) => {
            if let Some(ns) = read_str(doc, ns, &ns_at) {
                if let Err(e) = check_dns_label(ns) {
                    doc.error(&ns_at, e);
                }
                m.namespace = ns.to_owned();
            }
        }
        None => doc.note(
            &ns_at,
            "not set: the workload goes to namespace \"default\" (kubectl would use the current context's namespace)",
        ),
    }
    doc.cover_since(mark, &KeyPath::root().key("namespace"));

    let mark = doc.mark();
    let labels = match f.take("labels") {
        Some(l) => read_labels(doc, l, &f.path("labels")),
        None => BTreeMap::new(),
    };
    doc.cover_since(mark, &KeyPath::root().key("labels"));

    f.note(
        doc,
        "annotations",
        "annotations have no effect in BeeMesh; ignored",
    );
    for key in [
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "generation",
        "managedFields",
        "selfLink",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "ownerReferences",
        "finalizers",
    ] {
        f.note(doc, key, CLUSTER_BOOKKEEPING);
    }
    f.finish(doc);
    labels
}

/// A pod template's metadata: its labels.
fn template_metadata(doc: &mut Doc, v: &Value, at: &KeyPath) -> BTreeMap<String, String> {
    let mut f = Fields::new(doc, v, at);
    // The workload carries these labels when the object has none.
    let mark = doc.mark();
    let labels = match f.take("labels") {
        Some(l) => read_labels(doc, l, &f.path("labels")),
        None => BTreeMap::new(),
    };
    doc.cover_since(mark, &KeyPath::root().key("labels"));
    f.note(
        doc,
        "annotations",
        "annotations have no effect in BeeMesh; ignored",
    );
    for key in ["name", "generateName", "namespace"] {
        f.note(doc, key, "ignored in a pod template (as in Kubernetes)");
    }
    for key in ["creationTimestamp", "uid", "resourceVersion", "generation"] {
        f.note(doc, key, CLUSTER_BOOKKEEPING);
    }
    f.finish(doc);
    labels
}

/// The spec of a Deployment or StatefulSet.
fn workload_spec(
    doc: &mut Doc,
    v: &Value,
    at: &KeyPath,
    kind: Kind,
    m: &mut Manifest,
    object_labels: BTreeMap<String, String>,
) {
    let mut f = Fields::new(doc, v, at);

    let mark = doc.mark();
    let replicas_at = f.path("replicas");
    if let Some(r) = f.take("replicas")
        && let Some(r) = read_int(doc, r, &replicas_at, 0, i64::from(i32::MAX))
    {
        match u32::try_from(r) {
            Ok(0) => doc.error(
                &replicas_at,
                "0 replicas is not supported: a BeeMesh workload runs at least one replica; \
                 delete the workload to stop it",
            ),
            Ok(n) if n > MAX_REPLICAS => doc.error(
                &replicas_at,
                format!("{n} is more than the maximum of {MAX_REPLICAS} replicas"),
            ),
            Ok(n) => m.placement.replicas = n,
            Err(_) => doc.error(&replicas_at, "is out of range"),
        }
    }
    doc.cover_since(mark, &KeyPath::root().key("placement").key("replicas"));
    let replicas = m.placement.replicas;

    let template_at = f.path("template");
    let template_labels = match f.take("template") {
        Some(t) => pod_template(doc, t, &template_at, m, kind),
        None => {
            doc.error(
                &template_at,
                "is required: it describes the replicas' containers",
            );
            doc.covered.insert("container".to_owned());
            BTreeMap::new()
        }
    };

    let template_labels_at = template_at.key("metadata").key("labels");
    if object_labels.is_empty() {
        if !template_labels.is_empty() {
            doc.note(
                &template_labels_at,
                "metadata.labels is not set: the workload carries the pod template's labels",
            );
        }
        m.labels = template_labels.clone();
    } else {
        if !template_labels.is_empty() && template_labels != object_labels {
            doc.note(
                &template_labels_at,
                "differ from metadata.labels: the workload carries metadata.labels",
            );
        }
        m.labels = object_labels;
    }

    if let Some(s) = f.take("selector") {
        selector(doc, s, &f.path("selector"), &template_labels);
    }

    match kind {
        Kind::Deployment => {
            let strategy_at = f.path("strategy");
            let strategy = f.take("strategy");
            let mark = doc.mark();
            m.rollout = deployment_strategy(doc, strategy, &strategy_at, replicas);
            doc.cover_since(mark, &KeyPath::root().key("rollout"));
            f.note(doc, "progressDeadlineSeconds", NO_EFFECT);
            f.refuse_true(
                doc,
                "paused",
                "a paused Deployment is not supported: BeeMesh rolls out every new generation; \
                 import it when it should run",
            );
        }
        Kind::StatefulSet => {
            m.consistency.mode = ConsistencyMode::Strong;
            doc.note(
                &KeyPath::root().key("kind"),
                "a StatefulSet becomes a workload with consistency.mode = \"strong\" (a Raft group among its replicas)",
            );
            let strategy_at = f.path("updateStrategy");
            let strategy = f.take("updateStrategy");
            let mark = doc.mark();
            m.rollout = statefulset_strategy(doc, strategy, &strategy_at, replicas);
            doc.cover_since(mark, &KeyPath::root().key("rollout"));
            f.note(
                doc,
                "serviceName",
                "there are no Services in BeeMesh: replicas reach each other through the mesh; ignored",
            );
            f.note(
                doc,
                "podManagementPolicy",
                "BeeMesh starts and replaces replicas without the ordering guarantees of Kubernetes; ignored",
            );
            f.refuse(
                doc,
                "volumeClaimTemplates",
                "persistent volume claims are not supported: BeeMesh volumes are per-replica \
                 scratch space (emptyDir) that lives and dies with the replica; remove them",
            );
            f.note(doc, "persistentVolumeClaimRetentionPolicy", NO_EFFECT);
        }
        Kind::Pod => {}
    }
    f.note(doc, "minReadySeconds", NO_EFFECT);
    f.note(doc, "revisionHistoryLimit", NO_EFFECT);
    f.finish(doc);
}

/// A pod template: its labels are returned, its spec is converted into `m`.
fn pod_template(
    doc: &mut Doc,
    v: &Value,
    at: &KeyPath,
    m: &mut Manifest,
    kind: Kind,
) -> BTreeMap<String, String> {
    let mut f = Fields::new(doc, v, at);
    let labels = match f.take("metadata") {
        Some(meta) => template_metadata(doc, meta, &f.path("metadata")),
        None => BTreeMap::new(),
    };
    let spec_at = f.path("spec");
    match f.take("spec") {
        Some(spec) => pod_spec(doc, spec, &spec_at, m, kind),
        None => {
            doc.error(&spec_at, "is required: it lists the containers");
            doc.covered.insert("container".to_owned());
        }
    }
    f.finish(doc);
    labels
}

/// A label selector: BeeMesh selects a workload's replicas by identity, so a selector is
/// accepted when it selects the pod template, as Kubernetes requires.
fn selector(doc: &mut Doc, v: &Value, at: &KeyPath, template: &BTreeMap<String, String>) {
    let mut f = Fields::new(doc, v, at);
    let mut matches = true;
    if let Some(ml) = f.take("matchLabels") {
        for (k, value) in read_str_map(doc, ml, &f.path("matchLabels")) {
            if template.get(&k) != Some(&value) {
                matches = false;
            }
        }
    }
    if let Some(me) = f.take("matchExpressions") {
        let me_at = f.path("matchExpressions");
        for (i, e) in read_list(doc, me, &me_at).iter().enumerate() {
            let e_at = me_at.index(i);
            let mut ef = Fields::new(doc, e, &e_at);
            let key = ef
                .take("key")
                .and_then(|k| read_str(doc, k, &e_at.key("key")))
                .unwrap_or_default();
            let values = ef
                .take("values")
                .map(|vs| read_str_list(doc, vs, &e_at.key("values")))
                .unwrap_or_default();
            let op_at = e_at.key("operator");
            let label = template.get(key);
            match ef.str(doc, "operator") {
                Some("In") => matches &= label.is_some_and(|l| values.contains(l)),
                Some("NotIn") => matches &= !label.is_some_and(|l| values.contains(l)),
                Some("Exists") => matches &= label.is_some(),
                Some("DoesNotExist") => matches &= label.is_none(),
                Some(other) => doc.error(
                    &op_at,
                    format!("{other:?} is not an operator: In, NotIn, Exists or DoesNotExist"),
                ),
                None => doc.error(&op_at, "is required"),
            }
            ef.finish(doc);
        }
    }
    f.finish(doc);
    if matches {
        doc.note(
            at,
            "accepted: it selects the pod template; BeeMesh knows a workload's replicas by identity",
        );
    } else {
        doc.error(
            at,
            "does not select the pod template's labels (Kubernetes refuses this too); make it match spec.template.metadata.labels",
        );
    }
}

/// An integer or a percentage, as in `maxUnavailable: 25%`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scaled {
    Count(u64),
    Percent(u64),
}

impl Scaled {
    /// The absolute number for `replicas`; percentages round up or down as Kubernetes does.
    fn of(self, replicas: u32, round_up: bool) -> u32 {
        let n = match self {
            Self::Count(n) => u128::from(n),
            Self::Percent(p) => {
                let x = u128::from(p) * u128::from(replicas);
                if round_up { x.div_ceil(100) } else { x / 100 }
            }
        };
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn is_zero(self) -> bool {
        matches!(self, Self::Count(0) | Self::Percent(0))
    }
}

fn read_scaled(doc: &mut Doc, v: &Value, at: &KeyPath) -> Option<Scaled> {
    let bad = "must be a non-negative integer or a percentage such as \"25%\"";
    match v {
        Value::Number(_) => read_int(doc, v, at, 0, i64::from(i32::MAX))
            .and_then(|n| u64::try_from(n).ok())
            .map(Scaled::Count),
        Value::String(s) => {
            match s.strip_suffix('%').and_then(|digits| {
                digits
                    .bytes()
                    .all(|b| b.is_ascii_digit())
                    .then(|| digits.parse::<u64>().ok())
                    .flatten()
            }) {
                Some(p) => Some(Scaled::Percent(p)),
                None => {
                    doc.error(at, format!("{s:?} {bad}"));
                    None
                }
            }
        }
        _ => {
            doc.error(at, format!("{bad}, not {}", type_name(v)));
            None
        }
    }
}

/// A Deployment's strategy as a rollout.
fn deployment_strategy(doc: &mut Doc, v: Option<&Value>, at: &KeyPath, replicas: u32) -> Rollout {
    let default = Scaled::Percent(25);
    let Some(v) = v else {
        let rollout = rolling(default, default, replicas);
        doc.note(
            at,
            format!(
                "not set: Kubernetes' default rolling update (maxUnavailable 25%, maxSurge 25%) of \
                 {replicas} replica(s) gives rollout.max_unavailable = {}, max_surge = {}",
                rollout.max_unavailable, rollout.max_surge
            ),
        );
        return rollout;
    };
    let mut f = Fields::new(doc, v, at);
    let type_at = f.path("type");
    let recreate = match f.str(doc, "type") {
        None | Some("RollingUpdate") => false,
        Some("Recreate") => true,
        Some(other) => {
            doc.error(
                &type_at,
                format!("{other:?} is not a strategy: RollingUpdate or Recreate"),
            );
            false
        }
    };
    let ru_at = f.path("rollingUpdate");
    let rolling_update = f.take("rollingUpdate");
    f.finish(doc);

    if recreate {
        if rolling_update.is_some_and(|r| !is_empty(r)) {
            doc.error(
                &ru_at,
                "may not be set when the strategy type is Recreate (Kubernetes refuses this too)",
            );
        }
        doc.note(
            &type_at,
            format!(
                "Recreate is approximated by replacing all {replicas} replica(s) at once \
                 (rollout.max_unavailable = {replicas}, max_surge = 0)"
            ),
        );
        return Rollout {
            max_unavailable: replicas,
            max_surge: 0,
        };
    }

    let (mut unavailable, mut surge) = (default, default);
    if let Some(ru) = rolling_update {
        let mut rf = Fields::new(doc, ru, &ru_at);
        let mu_at = rf.path("maxUnavailable");
        if let Some(mu) = rf
            .take("maxUnavailable")
            .and_then(|x| read_scaled(doc, x, &mu_at))
        {
            if matches!(mu, Scaled::Percent(p) if p > 100) {
                doc.error(&mu_at, "must not be more than 100%");
            }
            unavailable = mu;
        }
        let ms_at = rf.path("maxSurge");
        if let Some(ms) = rf
            .take("maxSurge")
            .and_then(|x| read_scaled(doc, x, &ms_at))
        {
            surge = ms;
        }
        rf.finish(doc);
        if unavailable.is_zero() && surge.is_zero() {
            doc.error(
                &mu_at,
                "maxUnavailable and maxSurge cannot both be 0 (a rollout could never progress)",
            );
        }
    }
    let rollout = rolling(unavailable, surge, replicas);
    if (unavailable, surge) != (default, default)
        && (matches!(unavailable, Scaled::Percent(_)) || matches!(surge, Scaled::Percent(_)))
    {
        doc.note(
            &ru_at,
            format!(
                "percentages of {replicas} replica(s) give rollout.max_unavailable = {}, max_surge = {} \
                 (maxUnavailable rounds down and maxSurge up, as in Kubernetes)",
                rollout.max_unavailable, rollout.max_surge
            ),
        );
    }
    rollout
}

/// Kubernetes' arithmetic for a rolling update: maxUnavailable rounds down, maxSurge up, and
/// when both come out as 0 one replica may be unavailable.
fn rolling(unavailable: Scaled, surge: Scaled, replicas: u32) -> Rollout {
    let max_surge = surge.of(replicas, true);
    let mut max_unavailable = unavailable.of(replicas, false);
    if max_unavailable == 0 && max_surge == 0 {
        max_unavailable = 1;
    }
    Rollout {
        max_unavailable,
        max_surge,
    }
}

/// A StatefulSet's update strategy as a rollout: replicas are replaced in place (no surge).
fn statefulset_strategy(doc: &mut Doc, v: Option<&Value>, at: &KeyPath, replicas: u32) -> Rollout {
    let mut rollout = Rollout {
        max_unavailable: 1,
        max_surge: 0,
    };
    let Some(v) = v else { return rollout };
    let mut f = Fields::new(doc, v, at);
    let type_at = f.path("type");
    match f.str(doc, "type") {
        None | Some("RollingUpdate") => {}
        Some("OnDelete") => doc.error(
            &type_at,
            "OnDelete is not supported: BeeMesh rolls out every new generation; use RollingUpdate",
        ),
        Some(other) => doc.error(
            &type_at,
            format!("{other:?} is not a strategy: RollingUpdate or OnDelete"),
        ),
    }
    let ru_at = f.path("rollingUpdate");
    if let Some(ru) = f.take("rollingUpdate") {
        let mut rf = Fields::new(doc, ru, &ru_at);
        if rf
            .int(doc, "partition", 0, i64::from(i32::MAX))
            .is_some_and(|p| p != 0)
        {
            doc.error(
                &rf.path("partition"),
                "staged rollouts are not supported: BeeMesh updates every replica; remove the partition (or set it to 0)",
            );
        }
        let mu_at = rf.path("maxUnavailable");
        if let Some(mu) = rf
            .take("maxUnavailable")
            .and_then(|x| read_scaled(doc, x, &mu_at))
        {
            if mu.is_zero() {
                doc.error(&mu_at, "cannot be 0 (a rollout could never progress)");
            } else {
                // Kubernetes rounds a StatefulSet's percentage up, to at least 1.
                rollout.max_unavailable = mu.of(replicas, true).max(1);
                doc.note(
                    &mu_at,
                    format!(
                        "rollout.max_unavailable = {} (Kubernetes honours this field only with the \
                         MaxUnavailableStatefulSet feature gate; BeeMesh always does)",
                        rollout.max_unavailable
                    ),
                );
            }
        }
        rf.finish(doc);
    }
    f.finish(doc);
    rollout
}

// ---------------------------------------------------------------------------------------------
// Pods

/// User and group settings that a pod's security context gives all its containers.
#[derive(Debug, Clone, Copy, Default)]
struct Identity {
    user: Option<u32>,
    group: Option<u32>,
    non_root: Option<bool>,
}

impl Identity {
    /// Reads `runAsUser`, `runAsGroup` and `runAsNonRoot` from a security context.
    fn read(doc: &mut Doc, f: &mut Fields<'_>) -> Self {
        let mut id = Self::default();
        for (key, slot) in [("runAsUser", &mut id.user), ("runAsGroup", &mut id.group)] {
            let at = f.path(key);
            if let Some(v) = f.take(key) {
                *slot = read_int(doc, v, &at, 0, i64::from(u32::MAX))
                    .and_then(|n| u32::try_from(n).ok());
            }
        }
        let at = f.path("runAsNonRoot");
        if let Some(v) = f.take("runAsNonRoot") {
            id.non_root = read_bool(doc, v, &at);
        }
        id
    }

    /// Container settings win over the pod's.
    fn or(self, pod: Self) -> Self {
        Self {
            user: self.user.or(pod.user),
            group: self.group.or(pod.group),
            non_root: self.non_root.or(pod.non_root),
        }
    }
}

/// The confinement profiles both security contexts may name.
fn profiles(doc: &mut Doc, f: &mut Fields<'_>) {
    for (key, what, accepted) in [
        (
            "seccompProfile",
            "seccomp",
            "accepted: containers run under the container runtime's default seccomp profile",
        ),
        (
            "appArmorProfile",
            "AppArmor",
            "accepted: containers run under the container runtime's default AppArmor profile",
        ),
    ] {
        let at = f.path(key);
        let Some(v) = f.take(key) else { continue };
        let mut pf = Fields::new(doc, v, &at);
        let type_at = pf.path("type");
        match pf.str(doc, "type") {
            Some("RuntimeDefault") => doc.note(&at, accepted),
            Some(other) => doc.error(
                &type_at,
                format!("{what} profile {other:?} is not supported: only RuntimeDefault is"),
            ),
            None => doc.error(&type_at, "is required"),
        }
        pf.refuse(
            doc,
            "localhostProfile",
            "host profiles are not supported: only RuntimeDefault is",
        );
        pf.finish(doc);
    }
    f.refuse(
        doc,
        "seLinuxOptions",
        "SELinux options are not supported: containers get the runtime's default label",
    );
    f.refuse(
        doc,
        "windowsOptions",
        "Windows containers are not supported",
    );
}

/// A pod-level security context.
fn pod_security(doc: &mut Doc, v: &Value, at: &KeyPath) -> Identity {
    let mut f = Fields::new(doc, v, at);
    let id = Identity::read(doc, &mut f);
    profiles(doc, &mut f);
    f.refuse(
        doc,
        "fsGroup",
        "is not supported: BeeMesh does not change the group of volumes; run the containers as \
         a user that may write them (runAsUser/runAsGroup) instead",
    );
    f.note(doc, "fsGroupChangePolicy", NO_EFFECT);
    f.refuse(
        doc,
        "supplementalGroups",
        "supplementary groups are not supported; use runAsGroup",
    );
    f.refuse(
        doc,
        "supplementalGroupsPolicy",
        "supplementary groups are not supported; use runAsGroup",
    );
    f.refuse(doc, "sysctls", "sysctls are not supported");
    f.refuse(
        doc,
        "seLinuxChangePolicy",
        "SELinux options are not supported",
    );
    f.finish(doc);
    id
}

/// A volume a pod declares.
struct PodVolume {
    at: KeyPath,
    /// `None` for a kind of volume BeeMesh cannot provide (already reported).
    empty_dir: Option<(bool, Option<Memory>)>,
    mounts: usize,
}

/// The volumes a pod declares, by name.
#[derive(Default)]
struct PodVolumes {
    at: KeyPath,
    by_name: BTreeMap<String, PodVolume>,
}

fn volume_kind_hint(kind: &str) -> &'static str {
    match kind {
        "hostPath" => {
            "host directories are never exposed to workloads; use an emptyDir volume, or bake the files into the image"
        }
        "configMap" | "secret" | "projected" | "downwardAPI" => {
            "BeeMesh has no ConfigMaps, Secrets or downward API; bake the files into the image, or pass values through env"
        }
        "image" => "image volumes are not supported; build the files into the container's image",
        _ => {
            "persistent and network volumes are not supported: BeeMesh volumes are per-replica scratch space (emptyDir)"
        }
    }
}

fn pod_volumes(doc: &mut Doc, v: &Value, at: &KeyPath) -> PodVolumes {
    let mut out = PodVolumes {
        at: at.clone(),
        by_name: BTreeMap::new(),
    };
    for (i, item) in read_list(doc, v, at).iter().enumerate() {
        let v_at = at.index(i);
        let mut f = Fields::new(doc, item, &v_at);
        let name_at = f.path("name");
        let name = f.required_str(doc, "name");
        if let Some(n) = name
            && let Err(e) = check_dns_label(n)
        {
            doc.error(&name_at, e);
        }
        let mut empty_dir = None;
        let has_empty_dir = f.has("emptyDir");
        if has_empty_dir {
            let ed_at = f.path("emptyDir");
            let ed = f.take("emptyDir");
            empty_dir = Some(match ed {
                Some(ed) => read_empty_dir(doc, ed, &ed_at),
                None => (false, None),
            });
        }
        let others = f.rest();
        for (kind, _) in &others {
            doc.error(
                &v_at.key(*kind),
                format!(
                    "{kind} volumes are not supported: {}",
                    volume_kind_hint(kind)
                ),
            );
        }
        if !others.is_empty() {
            empty_dir = None;
        } else if !has_empty_dir {
            doc.note(
                &v_at,
                "no volume source: an emptyDir volume, as Kubernetes defaults to",
            );
            empty_dir = Some((false, None));
        }
        if let Some(name) = name {
            if out.by_name.contains_key(name) {
                doc.error(&name_at, format!("volume name {name:?} is used twice"));
            } else {
                out.by_name.insert(
                    name.to_owned(),
                    PodVolume {
                        at: v_at,
                        empty_dir,
                        mounts: 0,
                    },
                );
            }
        }
    }
    out
}

/// An emptyDir volume source: whether it lives in memory, and its size limit.
fn read_empty_dir(doc: &mut Doc, v: &Value, at: &KeyPath) -> (bool, Option<Memory>) {
    let mut f = Fields::new(doc, v, at);
    let medium_at = f.path("medium");
    let memory = match f.str(doc, "medium") {
        None | Some("") => false,
        Some("Memory") => true,
        Some(other) => {
            doc.error(
                &medium_at,
                format!("medium {other:?} is not supported: leave it empty (disk) or write Memory"),
            );
            false
        }
    };
    let size_at = f.path("sizeLimit");
    let size = f
        .take("sizeLimit")
        .and_then(|s| read_quantity::<Memory>(doc, s, &size_at));
    if size.is_some_and(|s| s.bytes() == 0) {
        doc.error(&size_at, "must be more than 0");
    }
    f.finish(doc);
    (memory, size)
}

/// A pod spec, converted into `m` (selector and containers).
fn pod_spec(doc: &mut Doc, v: &Value, at: &KeyPath, m: &mut Manifest, kind: Kind) {
    let mut f = Fields::new(doc, v, at);
    let pod_identity = match f.take("securityContext") {
        Some(sc) => pod_security(doc, sc, &f.path("securityContext")),
        None => Identity::default(),
    };
    let mut volumes = match f.take("volumes") {
        Some(vs) => pod_volumes(doc, vs, &f.path("volumes")),
        None => PodVolumes {
            at: f.path("volumes"),
            by_name: BTreeMap::new(),
        },
    };

    let containers_at = f.path("containers");
    match f.take("containers") {
        None => {
            doc.error(
                &containers_at,
                "is required: a pod needs at least one container",
            );
            doc.covered.insert("container".to_owned());
        }
        Some(list) => {
            let items = read_list(doc, list, &containers_at);
            if items.is_empty() {
                if matches!(list, Value::Sequence(_)) {
                    doc.error(&containers_at, "must list at least one container");
                }
                doc.covered.insert("container".to_owned());
            }
            let mut names = BTreeSet::new();
            for (i, item) in items.iter().enumerate() {
                let c_at = containers_at.index(i);
                let m_at = KeyPath::root().key("container").index(i);
                let c = container(doc, item, &c_at, &m_at, pod_identity, &mut volumes);
                if !c.name.is_empty() && !names.insert(c.name.clone()) {
                    doc.error(
                        &c_at.key("name"),
                        format!("container name {:?} is used twice", c.name),
                    );
                    doc.covered.insert(m_at.key("name").to_string());
                }
                m.containers.push(c);
            }
        }
    }
    for (name, vol) in &volumes.by_name {
        if vol.mounts == 0 && vol.empty_dir.is_some() {
            doc.note(
                &vol.at,
                format!("volume {name:?} is not mounted by any container; ignored"),
            );
        }
    }

    let mark = doc.mark();
    if let Some(ns) = f.take("nodeSelector") {
        m.placement.selector = read_labels(doc, ns, &f.path("nodeSelector"));
    }
    doc.cover_since(mark, &KeyPath::root().key("placement").key("selector"));

    let restart_at = f.path("restartPolicy");
    match f.str(doc, "restartPolicy") {
        None => {}
        Some("Always") => doc.note(
            &restart_at,
            "accepted: BeeMesh keeps a workload's containers running",
        ),
        Some(p @ ("OnFailure" | "Never")) => doc.error(
            &restart_at,
            format!(
                "{p} is not supported: BeeMesh keeps a workload's containers running (run-to-completion \
                 jobs are not supported); use Always"
            ),
        ),
        Some(other) => doc.error(
            &restart_at,
            format!("{other:?} is not a restart policy; use Always"),
        ),
    }
    if kind == Kind::Pod {
        f.refuse(
            doc,
            "activeDeadlineSeconds",
            "deadlines are not supported: BeeMesh keeps a workload running until it is deleted",
        );
    }

    f.refuse(
        doc,
        "initContainers",
        "init containers are not supported: BeeMesh starts a replica's containers together; \
         run the setup step at the start of the container's command",
    );
    f.refuse(
        doc,
        "ephemeralContainers",
        "ephemeral containers are not supported",
    );
    for key in ["hostNetwork", "hostPID", "hostIPC"] {
        f.refuse_true(
            doc,
            key,
            "host namespaces are never shared with workloads: every replica has its own network, \
             process and IPC namespace; remove it",
        );
    }
    f.refuse_true(
        doc,
        "shareProcessNamespace",
        "a process namespace shared between containers is not supported",
    );
    f.refuse(
        doc,
        "affinity",
        "affinity rules are not supported: use nodeSelector for required node labels \
         (replicas are spread one per node already)",
    );
    f.refuse(
        doc,
        "tolerations",
        "tolerations are not supported: BeeMesh nodes have labels, not taints; use nodeSelector",
    );
    f.refuse(
        doc,
        "topologySpreadConstraints",
        "topology spread constraints are not supported: replicas are spread one per node already",
    );
    f.refuse(
        doc,
        "nodeName",
        "pinning a pod to a node is not supported: use nodeSelector with a node label",
    );
    f.refuse(
        doc,
        "hostAliases",
        "host aliases are not supported: workloads reach each other through the mesh",
    );
    f.refuse(doc, "dnsConfig", "custom DNS settings are not supported");
    f.refuse(doc, "hostname", "setting the hostname is not supported");
    f.refuse(doc, "subdomain", "setting the hostname is not supported");
    f.refuse_true(
        doc,
        "setHostnameAsFQDN",
        "setting the hostname is not supported",
    );
    f.refuse(doc, "runtimeClassName", "runtime classes are not supported");
    f.refuse(
        doc,
        "readinessGates",
        "readiness gates are not supported: use readinessProbe",
    );

    let os_at = f.path("os");
    if let Some(os) = f.take("os") {
        let mut of = Fields::new(doc, os, &os_at);
        let name_at = of.path("name");
        match of.str(doc, "name") {
            Some("linux") => {}
            Some(other) => doc.error(
                &name_at,
                format!("{other:?} is not supported: BeeMesh runs Linux containers"),
            ),
            None => doc.error(&name_at, "is required"),
        }
        of.finish(doc);
    }

    f.note(doc, "terminationGracePeriodSeconds", NO_EFFECT);
    f.note(
        doc,
        "dnsPolicy",
        "accepted: workloads resolve names through the node's resolver",
    );
    f.note(
        doc,
        "schedulerName",
        "BeeMesh places workloads itself, without a scheduler; ignored",
    );
    for key in ["priorityClassName", "priority", "preemptionPolicy"] {
        f.note(doc, key, "BeeMesh has no priorities or preemption; ignored");
    }
    for key in [
        "serviceAccountName",
        "serviceAccount",
        "automountServiceAccountToken",
    ] {
        f.note(
            doc,
            key,
            "there is no Kubernetes API here (a workload's identity comes from the mesh); ignored",
        );
    }
    f.note(
        doc,
        "enableServiceLinks",
        "there are no Services, so no Service environment variables; ignored",
    );
    f.note(
        doc,
        "imagePullSecrets",
        "images come from the node's local store; ignored",
    );
    f.finish(doc);
}

/// One container.
fn container(
    doc: &mut Doc,
    v: &Value,
    at: &KeyPath,
    m_at: &KeyPath,
    pod_identity: Identity,
    volumes: &mut PodVolumes,
) -> Container {
    let mut c = Container {
        name: String::new(),
        image: String::new(),
        command: Vec::new(),
        args: Vec::new(),
        env: BTreeMap::new(),
        workdir: None,
        ports: Vec::new(),
        resources: Resources::default(),
        health: None,
        ready: None,
        volumes: Vec::new(),
        security: Security::default(),
    };
    let mut f = Fields::new(doc, v, at);

    let mark = doc.mark();
    let name_at = f.path("name");
    if let Some(n) = f.required_str(doc, "name") {
        if let Err(e) = check_dns_label(n) {
            doc.error(&name_at, e);
        }
        c.name = n.to_owned();
    }
    doc.cover_since(mark, &m_at.key("name"));

    let mark = doc.mark();
    let image_at = f.path("image");
    match f.required_str(doc, "image") {
        Some(i) if i.trim().is_empty() => doc.error(&image_at, "must name an image"),
        Some(i) if i.chars().any(|c| c.is_whitespace() || c.is_control()) => {
            doc.error(&image_at, format!("{i:?} contains whitespace"));
        }
        Some(i) => c.image = i.to_owned(),
        None => {}
    }
    doc.cover_since(mark, &m_at.key("image"));

    // Values may refer to earlier variables and command and args to any, as `$(NAME)`.
    let mut expansion = MAX_EXPANDED_BYTES;
    let mark = doc.mark();
    if let Some(env) = f.take("env") {
        c.env = read_env(doc, env, &f.path("env"), &mut expansion);
    }
    doc.cover_since(mark, &m_at.key("env"));
    f.refuse(
        doc,
        "envFrom",
        "environment from ConfigMaps or Secrets is not supported: list the variables in env with their values",
    );
    for (key, slot, m_key) in [
        ("command", &mut c.command, "command"),
        ("args", &mut c.args, "args"),
    ] {
        let mark = doc.mark();
        let list_at = f.path(key);
        if let Some(list) = f.take(key) {
            let raw = read_str_list(doc, list, &list_at);
            *slot = expand_list(doc, &raw, &list_at, &c.env, &mut expansion);
        }
        doc.cover_since(mark, &m_at.key(m_key));
    }

    let mark = doc.mark();
    let wd_at = f.path("workingDir");
    if let Some(w) = f.str(doc, "workingDir")
        && !w.is_empty()
    {
        if w.starts_with('/') {
            c.workdir = Some(w.to_owned());
        } else {
            doc.error(&wd_at, format!("{w:?} must be an absolute path"));
        }
    }
    doc.cover_since(mark, &m_at.key("workdir"));

    let mark = doc.mark();
    let mut named_ports = Vec::new();
    if let Some(ports) = f.take("ports") {
        (c.ports, named_ports) = read_ports(doc, ports, &f.path("ports"));
    }
    doc.cover_since(mark, &m_at.key("ports"));

    let mark = doc.mark();
    let res_at = f.path("resources");
    c.resources = read_resources(doc, f.take("resources"), &res_at);
    doc.cover_since(mark, &m_at.key("resources"));

    for (key, slot, m_key) in [
        ("livenessProbe", &mut c.health, "health"),
        ("readinessProbe", &mut c.ready, "ready"),
    ] {
        let mark = doc.mark();
        let p_at = f.path(key);
        if let Some(p) = f.take(key) {
            *slot = Some(read_probe(doc, p, &p_at, &named_ports));
        }
        doc.cover_since(mark, &m_at.key(m_key));
    }
    f.refuse(
        doc,
        "startupProbe",
        "startup probes are not supported: give livenessProbe an initialDelaySeconds (or a higher \
         failureThreshold) that covers the start-up time instead",
    );

    let mark = doc.mark();
    if let Some(mounts) = f.take("volumeMounts") {
        c.volumes = read_mounts(doc, mounts, &f.path("volumeMounts"), volumes);
    }
    doc.cover_since(mark, &m_at.key("volumes"));
    f.refuse(doc, "volumeDevices", "block devices are not supported");

    let mark = doc.mark();
    let sc_at = f.path("securityContext");
    c.security = container_security(doc, f.take("securityContext"), &sc_at, pod_identity);
    doc.cover_since(mark, &m_at.key("security"));

    f.note(
        doc,
        "imagePullPolicy",
        "images come from the node's local store; ignored",
    );
    f.note(doc, "terminationMessagePath", NO_EFFECT);
    f.note(doc, "terminationMessagePolicy", NO_EFFECT);
    f.note(doc, "resizePolicy", NO_EFFECT);
    f.refuse(
        doc,
        "lifecycle",
        "lifecycle hooks are not supported: run start-up steps in the command, and handle SIGTERM to stop cleanly",
    );
    f.refuse(
        doc,
        "restartPolicy",
        "per-container restart policies are not supported",
    );
    for key in ["stdin", "stdinOnce", "tty"] {
        f.refuse_true(doc, key, "interactive containers are not supported");
    }
    f.finish(doc);
    c
}

/// `env`: names with values; `$(NAME)` in a value refers to an earlier variable.
fn read_env(
    doc: &mut Doc,
    v: &Value,
    at: &KeyPath,
    expansion: &mut usize,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for (i, item) in read_list(doc, v, at).iter().enumerate() {
        let e_at = at.index(i);
        let mut f = Fields::new(doc, item, &e_at);
        let name_at = f.path("name");
        let name = f.required_str(doc, "name");
        if let Some(n) = name
            && let Err(e) = check_env_name(n)
        {
            doc.error(&name_at, e);
        }
        let value_at = f.path("value");
        let raw = match f.take("value") {
            Some(v) => read_str(doc, v, &value_at),
            None => Some(""),
        };
        f.refuse(
            doc,
            "valueFrom",
            "values from cluster objects (ConfigMaps, Secrets, the downward API) are not \
             supported: write the value into env[].value",
        );
        f.finish(doc);
        let (Some(name), Some(raw)) = (name, raw) else {
            continue;
        };
        let Some(value) = expand_one(doc, raw, &value_at, &env, expansion) else {
            continue;
        };
        if env.insert(name.to_owned(), value).is_some() {
            doc.note(
                &name_at,
                format!("{name:?} is set twice; the last value wins, as in Kubernetes"),
            );
        }
    }
    env
}

fn expand_list(
    doc: &mut Doc,
    raw: &[String],
    at: &KeyPath,
    env: &BTreeMap<String, String>,
    expansion: &mut usize,
) -> Vec<String> {
    raw.iter()
        .enumerate()
        .filter_map(|(i, s)| expand_one(doc, s, &at.index(i), env, expansion))
        .collect()
}

/// Expands one string, noting when that changed it.
fn expand_one(
    doc: &mut Doc,
    raw: &str,
    at: &KeyPath,
    env: &BTreeMap<String, String>,
    expansion: &mut usize,
) -> Option<String> {
    match expand(raw, env, expansion) {
        Some(s) => {
            if s != raw {
                doc.note(
                    at,
                    "$(VAR) references are expanded here, as Kubernetes would expand them",
                );
            }
            Some(s)
        }
        None => {
            doc.error(
                at,
                format!(
                    "$(VAR) references expand to more than {MAX_EXPANDED_BYTES} bytes in this container"
                ),
            );
            None
        }
    }
}

/// Expands `$(NAME)` references to `env` as Kubernetes does: `$$` is a literal `$`, and a
/// reference to a name not in `env` stays as written. `None` once the output would exceed
/// what is `left` of the container's expansion allowance.
fn expand(input: &str, env: &BTreeMap<String, String>, left: &mut usize) -> Option<String> {
    let mut out = String::new();
    let mut rest = input;
    while let Some((before, after)) = rest.split_once('$') {
        out.push_str(before);
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.split_once(')') {
                Some((name, tail)) => {
                    match env.get(name) {
                        Some(value) => out.push_str(value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = tail;
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
        if out.len() > *left {
            return None;
        }
    }
    out.push_str(rest);
    *left = left.checked_sub(out.len())?;
    Some(out)
}

/// `ports`, and the named ones (for probes that refer to a port by name).
fn read_ports(doc: &mut Doc, v: &Value, at: &KeyPath) -> (Vec<Port>, Vec<(String, u16)>) {
    let mut ports = Vec::new();
    let mut named = Vec::new();
    for (i, item) in read_list(doc, v, at).iter().enumerate() {
        let p_at = at.index(i);
        let mut f = Fields::new(doc, item, &p_at);
        let cp_at = f.path("containerPort");
        let container = match f.take("containerPort") {
            Some(p) => read_port(doc, p, &cp_at),
            None => {
                doc.error(&cp_at, "is required");
                None
            }
        };
        let name_at = f.path("name");
        let name = f.str(doc, "name");
        if let Some(n) = name {
            if let Err(e) = check_dns_label(n) {
                doc.error(&name_at, e);
            } else if n.len() > 15 {
                doc.error(&name_at, format!("{n:?} is longer than 15 characters"));
            }
        }
        let proto_at = f.path("protocol");
        let protocol = match f.str(doc, "protocol") {
            None | Some("TCP") => Some(Protocol::Tcp),
            Some("UDP") => Some(Protocol::Udp),
            Some("SCTP") => {
                doc.error(&proto_at, "SCTP is not supported: use TCP or UDP");
                None
            }
            Some(other) => {
                doc.error(
                    &proto_at,
                    format!("{other:?} is not a protocol: TCP or UDP"),
                );
                None
            }
        };
        // 0 means no host port, as in Kubernetes.
        let host = f
            .int(doc, "hostPort", 0, 65535)
            .and_then(|h| u16::try_from(h).ok())
            .filter(|h| *h != 0);
        f.refuse(
            doc,
            "hostIP",
            "binding a host port to one address is not supported; remove hostIP",
        );
        f.finish(doc);

        let (Some(container), Some(protocol)) = (container, protocol) else {
            continue;
        };
        let name = match name {
            Some(n) => {
                named.push((n.to_owned(), container));
                n.to_owned()
            }
            None => {
                let generated = format!("p{container}");
                doc.note(
                    &p_at,
                    format!("the port has no name; BeeMesh names it {generated:?}"),
                );
                generated
            }
        };
        ports.push(Port {
            name,
            container,
            host,
            protocol,
        });
    }
    (ports, named)
}

/// Requested CPU and memory, or limits where there is no request.
#[derive(Debug, Default)]
struct Quantities {
    cpu: Option<Cpu>,
    memory: Option<Memory>,
}

fn read_quantities(doc: &mut Doc, v: &Value, at: &KeyPath) -> Quantities {
    let mut q = Quantities::default();
    let mut f = Fields::new(doc, v, at);
    let cpu_at = f.path("cpu");
    q.cpu = f.take("cpu").and_then(|c| read_quantity(doc, c, &cpu_at));
    let mem_at = f.path("memory");
    q.memory = f
        .take("memory")
        .and_then(|m| read_quantity(doc, m, &mem_at));
    for (name, _) in f.rest() {
        doc.error(
            &at.key(name),
            format!(
                "resource {name:?} is not supported: BeeMesh reserves cpu and memory only; remove it"
            ),
        );
    }
    q
}

fn read_resources(doc: &mut Doc, v: Option<&Value>, at: &KeyPath) -> Resources {
    let (requests, limits) = match v {
        Some(v) => {
            let mut f = Fields::new(doc, v, at);
            let req_at = f.path("requests");
            let requests = f
                .take("requests")
                .map(|r| read_quantities(doc, r, &req_at))
                .unwrap_or_default();
            let lim_at = f.path("limits");
            let limits = f
                .take("limits")
                .map(|l| read_quantities(doc, l, &lim_at))
                .unwrap_or_default();
            f.refuse(doc, "claims", "dynamic resource claims are not supported");
            f.finish(doc);
            (requests, limits)
        }
        None => (Quantities::default(), Quantities::default()),
    };
    let mut r = Resources::default();
    let mut defaulted = Vec::new();
    match (requests.cpu, limits.cpu) {
        (Some(req), lim) => {
            r.cpu = req;
            if lim.is_some_and(|l| l != req) {
                doc.note(
                    &at.key("limits").key("cpu"),
                    format!("BeeMesh reserves and limits one amount: the request ({req}) is used"),
                );
            }
        }
        (None, Some(lim)) => r.cpu = lim,
        (None, None) => defaulted.push(format!("cpu {}", r.cpu)),
    }
    match (requests.memory, limits.memory) {
        (Some(req), lim) => {
            r.memory = req;
            if lim.is_some_and(|l| l != req) {
                doc.note(
                    &at.key("limits").key("memory"),
                    format!("BeeMesh reserves and limits one amount: the request ({req}) is used"),
                );
            }
        }
        (None, Some(lim)) => r.memory = lim,
        (None, None) => defaulted.push(format!("memory {}", r.memory)),
    }
    if !defaulted.is_empty() {
        doc.note(
            at,
            format!(
                "no request or limit for {}: BeeMesh reserves (and limits the container to) that \
                 default, where Kubernetes would set no limit",
                defaulted.join(" and ")
            ),
        );
    }
    r
}

/// A liveness or readiness probe.
fn read_probe(doc: &mut Doc, v: &Value, at: &KeyPath, named_ports: &[(String, u16)]) -> Health {
    let mut h = Health {
        http: None,
        port: None,
        tcp: None,
        exec: None,
        interval: Duration::from_secs(10),
        timeout: Duration::from_secs(1),
        initial_delay: Duration(0),
        failures: 3,
    };
    let mut f = Fields::new(doc, v, at);
    let mut handlers = 0;

    let http_at = f.path("httpGet");
    if let Some(g) = f.take("httpGet") {
        handlers += 1;
        let mut gf = Fields::new(doc, g, &http_at);
        let path_at = gf.path("path");
        let path = gf
            .take("path")
            .and_then(|p| read_str(doc, p, &path_at))
            .unwrap_or("/");
        // Kubernetes probes `/path` for `path`.
        h.http = Some(if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        });
        let port_at = gf.path("port");
        match gf.take("port") {
            Some(p) => h.port = probe_port(doc, p, &port_at, named_ports),
            None => doc.error(&port_at, "is required"),
        }
        let scheme_at = gf.path("scheme");
        match gf.str(doc, "scheme") {
            None | Some("HTTP") => {}
            Some(other) => doc.error(
                &scheme_at,
                format!("{other:?} is not supported: BeeMesh probes over plain HTTP; use HTTP, or an exec probe"),
            ),
        }
        gf.refuse(
            doc,
            "host",
            "probing another host is not supported: probes go to the container itself",
        );
        gf.refuse(
            doc,
            "httpHeaders",
            "custom probe headers are not supported: probe a path that needs none, or use an exec probe",
        );
        gf.finish(doc);
    }

    let tcp_at = f.path("tcpSocket");
    if let Some(t) = f.take("tcpSocket") {
        handlers += 1;
        let mut tf = Fields::new(doc, t, &tcp_at);
        let port_at = tf.path("port");
        match tf.take("port") {
            Some(p) => h.tcp = probe_port(doc, p, &port_at, named_ports),
            None => doc.error(&port_at, "is required"),
        }
        tf.refuse(
            doc,
            "host",
            "probing another host is not supported: probes go to the container itself",
        );
        tf.finish(doc);
    }

    let exec_at = f.path("exec");
    if let Some(e) = f.take("exec") {
        handlers += 1;
        let mut ef = Fields::new(doc, e, &exec_at);
        let cmd_at = ef.path("command");
        let command = ef
            .take("command")
            .map(|c| read_str_list(doc, c, &cmd_at))
            .unwrap_or_default();
        if command.is_empty() {
            doc.error(&cmd_at, "must name a command");
        }
        h.exec = Some(command);
        ef.finish(doc);
    }

    let grpc = f.has("grpc");
    f.refuse(
        doc,
        "grpc",
        "gRPC probes are not supported: use an exec probe with a gRPC health client, or tcpSocket",
    );
    match handlers {
        0 if !grpc => doc.error(at, "needs one of httpGet, tcpSocket or exec"),
        0 | 1 => {}
        _ => doc.error(at, "set only one of httpGet, tcpSocket or exec"),
    }

    for (key, min, slot) in [
        ("periodSeconds", 1, &mut h.interval),
        ("timeoutSeconds", 1, &mut h.timeout),
        ("initialDelaySeconds", 0, &mut h.initial_delay),
    ] {
        let s_at = f.path(key);
        if let Some(s) = f.take(key).and_then(|s| read_seconds(doc, s, &s_at, min)) {
            *slot = s;
        }
    }
    if let Some(n) = f
        .int(doc, "failureThreshold", 1, i64::from(i32::MAX))
        .and_then(|n| u32::try_from(n).ok())
    {
        h.failures = n;
    }
    if f.int(doc, "successThreshold", 1, i64::from(i32::MAX))
        .is_some_and(|n| n != 1)
    {
        doc.error(
            &f.path("successThreshold"),
            "only 1 is supported: BeeMesh counts a probe as passing after one success",
        );
    }
    f.note(doc, "terminationGracePeriodSeconds", NO_EFFECT);
    f.finish(doc);
    h
}

/// A probe's port: a number, or the name of one of the container's ports.
fn probe_port(
    doc: &mut Doc,
    v: &Value,
    at: &KeyPath,
    named_ports: &[(String, u16)],
) -> Option<u16> {
    match v {
        Value::String(name) => match named_ports.iter().find(|(n, _)| n == name) {
            Some((_, port)) => Some(*port),
            None => {
                doc.error(
                    at,
                    format!("no port named {name:?} among this container's ports; name one, or write the number"),
                );
                None
            }
        },
        _ => read_port(doc, v, at),
    }
}

/// `volumeMounts`: emptyDir volumes become the container's volumes.
fn read_mounts(doc: &mut Doc, v: &Value, at: &KeyPath, volumes: &mut PodVolumes) -> Vec<Volume> {
    let mut out: Vec<Volume> = Vec::new();
    let mut mounted = BTreeSet::new();
    for (j, item) in read_list(doc, v, at).iter().enumerate() {
        let m_at = at.index(j);
        let mut f = Fields::new(doc, item, &m_at);
        let name_at = f.path("name");
        let name = f.required_str(doc, "name");
        let path_at = f.path("mountPath");
        let path = f.required_str(doc, "mountPath");
        match path {
            Some(p) if !p.starts_with('/') => {
                doc.error(&path_at, format!("{p:?} must be an absolute path"));
            }
            Some("/") => doc.error(&path_at, "cannot mount over /"),
            _ => {}
        }
        let ro_at = f.path("readOnly");
        if f.bool(doc, "readOnly") == Some(true) {
            doc.note(
                &ro_at,
                "BeeMesh mounts scratch volumes read-write: the container can write to it",
            );
        }
        for key in ["subPath", "subPathExpr"] {
            f.refuse(
                doc,
                key,
                "mounting part of a volume is not supported: mount the whole volume",
            );
        }
        let prop_at = f.path("mountPropagation");
        match f.str(doc, "mountPropagation") {
            None | Some("None") => {}
            Some(_) => doc.error(&prop_at, "mount propagation is not supported; use None"),
        }
        let rro_at = f.path("recursiveReadOnly");
        match f.str(doc, "recursiveReadOnly") {
            None | Some("Disabled") => {}
            Some(_) => doc.error(&rro_at, "recursive read-only mounts are not supported"),
        }
        f.finish(doc);

        let Some(name) = name else { continue };
        let Some(vol) = volumes.by_name.get_mut(name) else {
            doc.error(
                &name_at,
                format!("no volume named {name:?} in {}", volumes.at),
            );
            continue;
        };
        vol.mounts += 1;
        // A volume of another kind is reported where it is declared.
        let (Some((memory, size)), Some(path)) = (vol.empty_dir, path) else {
            continue;
        };
        if !mounted.insert(name) {
            doc.error(
                &name_at,
                format!("volume {name:?} is mounted twice in this container; BeeMesh mounts a volume once per container"),
            );
            continue;
        }
        if vol.mounts > 1 {
            doc.note(
                &name_at,
                format!("volume {name:?} is mounted by several containers: each mounts the replica's volume of that name"),
            );
        }
        out.push(Volume {
            name: name.to_owned(),
            path: path.to_owned(),
            memory,
            size,
        });
    }
    out
}

/// A container's security context over its pod's.
fn container_security(
    doc: &mut Doc,
    v: Option<&Value>,
    at: &KeyPath,
    pod_identity: Identity,
) -> Security {
    let mut sec = Security::default();
    let empty = Value::Null;
    let mut f = Fields::new(doc, v.unwrap_or(&empty), at);

    let id = Identity::read(doc, &mut f).or(pod_identity);
    sec.run_as_user = id.user;
    sec.run_as_group = id.group;
    sec.run_as_non_root = id.non_root == Some(true);

    let ro_at = f.path("readOnlyRootFilesystem");
    match f.take("readOnlyRootFilesystem") {
        Some(ro) => {
            if let Some(ro) = read_bool(doc, ro, &ro_at) {
                sec.read_only_root = ro;
            }
        }
        None => {
            sec.read_only_root = false;
            doc.note(
                &ro_at,
                "not set: the root filesystem stays writable, as in Kubernetes \
                 (security.read_only_root = false); set it to true for BeeMesh's safer default",
            );
        }
    }

    let caps_at = f.path("capabilities");
    let mut drop_all = false;
    let mut dropped = false;
    if let Some(caps) = f.take("capabilities") {
        let mut cf = Fields::new(doc, caps, &caps_at);
        let add_at = cf.path("add");
        if let Some(add) = cf.take("add") {
            for (i, cap) in read_str_list(doc, add, &add_at).iter().enumerate() {
                let upper = cap.to_ascii_uppercase();
                let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
                if bare == "ALL" {
                    doc.error(
                        &add_at.index(i),
                        "adding every capability is not supported: list the ones the container needs",
                    );
                } else if let Err(e) = check_capability(bare) {
                    doc.error(&add_at.index(i), e);
                } else if !sec.capabilities.iter().any(|c| c == bare) {
                    sec.capabilities.push(bare.to_owned());
                }
            }
        }
        let drop_at = cf.path("drop");
        if let Some(drop) = cf.take("drop") {
            let list = read_str_list(doc, drop, &drop_at);
            dropped = true;
            drop_all = list.iter().any(|c| c.eq_ignore_ascii_case("ALL"));
            for (i, cap) in list.iter().enumerate() {
                let upper = cap.to_ascii_uppercase();
                let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
                if sec.capabilities.iter().any(|c| c == bare) {
                    doc.error(
                        &drop_at.index(i),
                        format!(
                            "{bare} is both added and dropped; list it in add only, or in neither"
                        ),
                    );
                }
            }
        }
        cf.finish(doc);
    }
    let kept = if sec.capabilities.is_empty() {
        "none".to_owned()
    } else {
        sec.capabilities.join(", ")
    };
    if drop_all {
        doc.note(
            &caps_at.key("drop"),
            format!("accepted: BeeMesh drops every capability not added anyway (kept: {kept})"),
        );
    } else {
        let note_at = if dropped {
            caps_at.key("drop")
        } else {
            caps_at.clone()
        };
        doc.note(
            &note_at,
            format!(
                "BeeMesh keeps only the capabilities in add (kept: {kept}) and drops the rest, \
                 including the container runtime's defaults that Kubernetes would keep"
            ),
        );
    }

    f.refuse_true(
        doc,
        "privileged",
        "privileged containers are not supported: add the capabilities the container needs instead",
    );
    f.refuse_true(
        doc,
        "allowPrivilegeEscalation",
        "privilege escalation is never allowed (BeeMesh sets no_new_privs); remove it or set it to false",
    );
    let pm_at = f.path("procMount");
    match f.str(doc, "procMount") {
        None | Some("Default") => {}
        Some(_) => doc.error(&pm_at, "only the Default /proc mount is supported"),
    }
    profiles(doc, &mut f);
    f.finish(doc);
    sec
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DEPLOYMENT_EXAMPLE: &str = include_str!("../../../examples/kube/deployment.yaml");
    const STATEFULSET_EXAMPLE: &str = include_str!("../../../examples/kube/statefulset.yaml");
    const POD_EXAMPLE: &str = include_str!("../../../examples/kube/pod.yaml");

    /// The smallest Deployment; tests add fields to it.
    const MINIMAL: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
        - name: web
          image: localhost/web:1
";

    /// `MINIMAL` with `lines` added to the pod spec (indented by 6).
    fn with_pod(lines: &str) -> String {
        MINIMAL.replace(
            "      containers:\n",
            &format!("{lines}      containers:\n"),
        )
    }

    /// `MINIMAL` with `lines` added to the container (indented by 10).
    fn with_container(lines: &str) -> String {
        format!("{MINIMAL}{lines}")
    }

    fn convert_ok(yaml: &str) -> Vec<Converted> {
        match convert("t.yaml", yaml, &KubeOptions::default()) {
            Ok(c) => c,
            Err(e) => panic!("conversion failed: {:#?}", e.diagnostics),
        }
    }

    fn one(yaml: &str) -> Converted {
        let mut all = convert_ok(yaml);
        assert_eq!(all.len(), 1, "{all:#?}");
        all.remove(0)
    }

    fn errors(yaml: &str) -> Vec<Diagnostic> {
        convert("t.yaml", yaml, &KubeOptions::default())
            .expect_err("conversion must fail")
            .diagnostics
    }

    #[track_caller]
    fn assert_error(yaml: &str, key: &str, reason: &str) {
        let errs = errors(yaml);
        assert!(
            errs.iter()
                .any(|d| d.key == key && d.reason.contains(reason)),
            "no error at {key:?} containing {reason:?} in {errs:#?}"
        );
    }

    #[track_caller]
    fn assert_note(c: &Converted, path: &str, message: &str) {
        assert!(
            c.notes
                .iter()
                .any(|n| n.path == path && n.message.contains(message)),
            "no note at {path:?} containing {message:?} in {:#?}",
            c.notes
        );
    }

    const FULL: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels: {app: web, team: storefront}
spec:
  replicas: 4
  selector:
    matchLabels: {app: web}
    matchExpressions:
      - {key: team, operator: In, values: [storefront, ops]}
      - {key: canary, operator: DoesNotExist}
  strategy:
    type: RollingUpdate
    rollingUpdate: {maxUnavailable: 50%, maxSurge: 1}
  template:
    metadata:
      labels: {app: web, team: storefront}
    spec:
      nodeSelector: {zone: eu-1, power: solar}
      securityContext:
        runAsUser: 1000
        runAsGroup: 2000
        runAsNonRoot: true
      containers:
        - name: web
          image: localhost/web:1
          command: [httpd, -f]
          args: ["-p", "$(PORT)", "$$(PORT)"]
          workingDir: /srv
          env:
            - {name: PORT, value: "8080"}
            - {name: URL, value: "http://localhost:$(PORT)/"}
            - {name: EMPTY}
          ports:
            - {name: http, containerPort: 8080}
            - {containerPort: 9090, protocol: UDP, hostPort: 19090}
          resources:
            requests: {cpu: 250m, memory: 64Mi}
            limits: {cpu: 1, memory: 128Mi}
          livenessProbe:
            httpGet: {path: healthz, port: http}
            periodSeconds: 5
            timeoutSeconds: 2
            initialDelaySeconds: 3
            failureThreshold: 4
            successThreshold: 1
          readinessProbe:
            tcpSocket: {port: 8080}
          volumeMounts:
            - {name: cache, mountPath: /cache}
            - {name: scratch, mountPath: /tmp, readOnly: true}
          securityContext:
            readOnlyRootFilesystem: true
            runAsUser: 1001
            capabilities:
              add: [CAP_NET_BIND_SERVICE, chown]
              drop: [ALL]
        - name: sidecar
          image: localhost/sidecar:2
          resources:
            limits: {cpu: 100m, memory: 32Mi}
          readinessProbe:
            exec: {command: [cat, /tmp/ready]}
      volumes:
        - name: cache
          emptyDir: {medium: Memory, sizeLimit: 64Mi}
        - name: scratch
          emptyDir: {}
"#;

    #[test]
    fn deployment_maps_every_field() {
        let c = one(FULL);
        assert_eq!(c.source, "Deployment/web (document 1)");
        let m = &c.manifest;
        assert_eq!(
            (m.api.as_str(), m.kind.as_str()),
            ("beemesh/v1", "Workload")
        );
        assert_eq!((m.namespace.as_str(), m.name.as_str()), ("shop", "web"));
        assert_eq!(m.generation, 1);
        assert_eq!(m.labels.get("team").map(String::as_str), Some("storefront"));
        assert_eq!(m.placement.replicas, 4);
        assert_eq!(m.placement.selector.len(), 2);
        assert_eq!(
            m.placement.selector.get("zone").map(String::as_str),
            Some("eu-1")
        );
        assert_eq!(m.consistency.mode, ConsistencyMode::Eventual);
        // 50% of 4 rounds down to 2; a surge of 1 stays 1.
        assert_eq!((m.rollout.max_unavailable, m.rollout.max_surge), (2, 1));

        let web = &m.containers[0];
        assert_eq!(web.name, "web");
        assert_eq!(web.image, "localhost/web:1");
        assert_eq!(web.command, ["httpd", "-f"]);
        assert_eq!(web.args, ["-p", "8080", "$(PORT)"]);
        assert_eq!(web.workdir.as_deref(), Some("/srv"));
        assert_eq!(
            web.env.get("URL").map(String::as_str),
            Some("http://localhost:8080/")
        );
        assert_eq!(web.env.get("EMPTY").map(String::as_str), Some(""));
        assert_eq!(
            web.ports,
            [
                Port {
                    name: "http".into(),
                    container: 8080,
                    host: None,
                    protocol: Protocol::Tcp
                },
                Port {
                    name: "p9090".into(),
                    container: 9090,
                    host: Some(19090),
                    protocol: Protocol::Udp
                },
            ]
        );
        assert_eq!(
            web.resources,
            Resources {
                cpu: Cpu(250),
                memory: Memory(64 << 20)
            }
        );
        let health = web.health.as_ref().expect("liveness probe");
        assert_eq!(health.http.as_deref(), Some("/healthz"));
        assert_eq!(health.port, Some(8080));
        assert_eq!(health.interval, Duration::from_secs(5));
        assert_eq!(health.timeout, Duration::from_secs(2));
        assert_eq!(health.initial_delay, Duration::from_secs(3));
        assert_eq!(health.failures, 4);
        let ready = web.ready.as_ref().expect("readiness probe");
        assert_eq!(
            (ready.tcp, ready.interval, ready.timeout, ready.failures),
            (
                Some(8080),
                Duration::from_secs(10),
                Duration::from_secs(1),
                3
            )
        );
        assert_eq!(
            web.volumes,
            [
                Volume {
                    name: "cache".into(),
                    path: "/cache".into(),
                    memory: true,
                    size: Some(Memory(64 << 20))
                },
                Volume {
                    name: "scratch".into(),
                    path: "/tmp".into(),
                    memory: false,
                    size: None
                },
            ]
        );
        assert!(web.security.read_only_root);
        assert_eq!(web.security.capabilities, ["NET_BIND_SERVICE", "CHOWN"]);
        // The container's user wins, the pod's group and non-root setting apply.
        assert_eq!(web.security.run_as_user, Some(1001));
        assert_eq!(web.security.run_as_group, Some(2000));
        assert!(web.security.run_as_non_root);

        let sidecar = &m.containers[1];
        // Limits stand in for missing requests.
        assert_eq!(
            sidecar.resources,
            Resources {
                cpu: Cpu(100),
                memory: Memory(32 << 20)
            }
        );
        assert_eq!(
            sidecar.ready.as_ref().and_then(|r| r.exec.clone()),
            Some(vec!["cat".to_owned(), "/tmp/ready".to_owned()])
        );
        assert!(
            !sidecar.security.read_only_root,
            "Kubernetes semantics when unset"
        );
        assert_eq!(sidecar.security.run_as_user, Some(1000));

        let c0 = "spec.template.spec.containers[0]";
        assert_note(&c, &format!("{c0}.ports[1]"), "BeeMesh names it \"p9090\"");
        assert_note(
            &c,
            &format!("{c0}.resources.limits.cpu"),
            "the request (250m) is used",
        );
        assert_note(
            &c,
            &format!("{c0}.args[1]"),
            "$(VAR) references are expanded",
        );
        assert_note(&c, &format!("{c0}.volumeMounts[1].readOnly"), "read-write");
        assert_note(
            &c,
            &format!("{c0}.securityContext.capabilities.drop"),
            "kept: NET_BIND_SERVICE, CHOWN",
        );
        assert_note(
            &c,
            "spec.template.spec.containers[1].securityContext.readOnlyRootFilesystem",
            "read_only_root = false",
        );
        assert_note(
            &c,
            "spec.template.spec.containers[1].securityContext.capabilities",
            "runtime's defaults",
        );
        assert_note(&c, "spec.selector", "selects the pod template");
        assert_note(
            &c,
            "spec.strategy.rollingUpdate",
            "max_unavailable = 2, max_surge = 1",
        );
        assert_note(&c, "spec.replicas", "one replica per node");
        assert!(m.validate().is_empty());
    }

    #[test]
    fn statefulset_maps_to_strong_consistency() {
        let yaml = MINIMAL
            .replace("kind: Deployment", "kind: StatefulSet")
            .replace("  replicas: 2\n", "  replicas: 5\n  serviceName: web\n  podManagementPolicy: Parallel\n  volumeClaimTemplates: []\n");
        let c = one(&yaml);
        assert_eq!(c.manifest.consistency.mode, ConsistencyMode::Strong);
        assert_eq!(
            (
                c.manifest.rollout.max_unavailable,
                c.manifest.rollout.max_surge
            ),
            (1, 0)
        );
        assert_note(&c, "spec.serviceName", "no Services");
        assert_note(&c, "spec.podManagementPolicy", "ordering");
        assert_note(&c, "kind", "consistency.mode = \"strong\"");

        // maxUnavailable of a StatefulSet rounds up.
        let yaml = yaml.replace(
            "  serviceName: web\n",
            "  serviceName: web\n  updateStrategy:\n    type: RollingUpdate\n    rollingUpdate: {partition: 0, maxUnavailable: 30%}\n",
        );
        let c = one(&yaml);
        assert_eq!(
            (
                c.manifest.rollout.max_unavailable,
                c.manifest.rollout.max_surge
            ),
            (2, 0)
        );
        assert_note(
            &c,
            "spec.updateStrategy.rollingUpdate.maxUnavailable",
            "feature gate",
        );

        let partitioned = yaml.replace("partition: 0", "partition: 2");
        assert_error(
            &partitioned,
            "spec.updateStrategy.rollingUpdate.partition",
            "staged rollouts",
        );
        let on_delete = yaml.replace("type: RollingUpdate", "type: OnDelete");
        assert_error(
            &on_delete,
            "spec.updateStrategy.type",
            "OnDelete is not supported",
        );
    }

    #[test]
    fn pod_maps_with_defaults_and_notes() {
        let yaml = "\
apiVersion: v1
kind: Pod
metadata: {name: solo, labels: {run: solo}}
spec:
  containers:
    - name: solo
      image: localhost/solo:1
";
        let c = one(yaml);
        let m = &c.manifest;
        assert_eq!(c.source, "Pod/solo (document 1)");
        assert_eq!((m.namespace.as_str(), m.placement.replicas), ("default", 1));
        assert_eq!(m.labels.get("run").map(String::as_str), Some("solo"));
        assert_eq!(m.rollout, Rollout::default());
        assert_eq!(m.containers[0].resources, Resources::default());
        assert!(!m.containers[0].security.read_only_root);
        assert_note(&c, "metadata.namespace", "namespace \"default\"");
        assert_note(
            &c,
            "spec.containers[0].resources",
            "no request or limit for cpu 100m and memory 64Mi",
        );
        assert_note(
            &c,
            "spec.containers[0].securityContext.readOnlyRootFilesystem",
            "stays writable",
        );
        assert_note(&c, "", "policy.egress is empty");
        assert_error(
            &yaml.replace("v1", "apps/v1"),
            "apiVersion",
            "write apiVersion: v1",
        );
        assert_error(
            &format!("{yaml}  restartPolicy: Never\n"),
            "spec.restartPolicy",
            "Never is not supported",
        );
    }

    #[test]
    fn rolling_update_rounds_like_kubernetes() {
        let p = Scaled::Percent;
        let n = Scaled::Count;
        // (maxUnavailable, maxSurge, replicas) -> (max_unavailable, max_surge)
        let cases = [
            (p(25), p(25), 1, (0, 1)),
            (p(25), p(25), 4, (1, 1)),
            (p(25), p(25), 10, (2, 3)),
            (p(33), p(33), 10, (3, 4)),
            (p(0), p(0), 3, (1, 0)),
            (p(10), n(0), 5, (1, 0)),
            (n(2), p(100), 3, (2, 3)),
            (p(100), n(0), 7, (7, 0)),
        ];
        for (u, s, replicas, want) in cases {
            let r = rolling(u, s, replicas);
            assert_eq!(
                (r.max_unavailable, r.max_surge),
                want,
                "{u:?} {s:?} of {replicas}"
            );
        }

        // Without a strategy, Kubernetes' 25%/25% applies, with a note.
        let c = one(MINIMAL);
        assert_eq!(
            (
                c.manifest.rollout.max_unavailable,
                c.manifest.rollout.max_surge
            ),
            (0, 1)
        );
        assert_note(&c, "spec.strategy", "maxUnavailable 25%, maxSurge 25%");

        let zero = MINIMAL.replace(
            "  replicas: 2\n",
            "  replicas: 2\n  strategy: {rollingUpdate: {maxUnavailable: 0, maxSurge: 0%}}\n",
        );
        assert_error(
            &zero,
            "spec.strategy.rollingUpdate.maxUnavailable",
            "cannot both be 0",
        );
        let bad = zero.replace("maxSurge: 0%", "maxSurge: \"3\"");
        assert_error(&bad, "spec.strategy.rollingUpdate.maxSurge", "percentage");
        let over = zero.replace("maxUnavailable: 0", "maxUnavailable: 101%");
        assert_error(&over, "spec.strategy.rollingUpdate.maxUnavailable", "100%");
    }

    #[test]
    fn recreate_replaces_every_replica_at_once() {
        let yaml = MINIMAL.replace(
            "  replicas: 2\n",
            "  replicas: 3\n  strategy: {type: Recreate}\n",
        );
        let c = one(&yaml);
        assert_eq!(
            (
                c.manifest.rollout.max_unavailable,
                c.manifest.rollout.max_surge
            ),
            (3, 0)
        );
        assert_note(&c, "spec.strategy.type", "Recreate is approximated");
        let both = yaml.replace(
            "{type: Recreate}",
            "{type: Recreate, rollingUpdate: {maxSurge: 1}}",
        );
        assert_error(&both, "spec.strategy.rollingUpdate", "Recreate");
    }

    #[test]
    fn refused_fields_are_named_by_their_path() {
        let pod = "spec.template.spec";
        let c0 = "spec.template.spec.containers[0]";
        let cases: Vec<(String, String, &str)> = vec![
            (
                with_pod("      volumes:\n        - {name: host, hostPath: {path: /etc}}\n"),
                format!("{pod}.volumes[0].hostPath"),
                "host directories are never exposed",
            ),
            (
                with_pod("      volumes:\n        - {name: cfg, configMap: {name: cfg}}\n"),
                format!("{pod}.volumes[0].configMap"),
                "no ConfigMaps",
            ),
            (
                with_pod("      hostNetwork: true\n"),
                format!("{pod}.hostNetwork"),
                "host namespaces",
            ),
            (
                with_pod("      hostPID: true\n"),
                format!("{pod}.hostPID"),
                "host namespaces",
            ),
            (
                with_container("          securityContext: {privileged: true}\n"),
                format!("{c0}.securityContext.privileged"),
                "privileged containers are not supported",
            ),
            (
                with_container("          securityContext: {allowPrivilegeEscalation: true}\n"),
                format!("{c0}.securityContext.allowPrivilegeEscalation"),
                "never allowed",
            ),
            (
                with_container(
                    "          env:\n            - {name: A, value: a}\n            - {name: B, value: b}\n            - name: C\n              valueFrom: {secretKeyRef: {name: s, key: k}}\n",
                ),
                format!("{c0}.env[2].valueFrom"),
                "write the value into env[].value",
            ),
            (
                with_container("          envFrom: [{configMapRef: {name: cfg}}]\n"),
                format!("{c0}.envFrom"),
                "not supported",
            ),
            (
                with_container("          imagePulPolicy: Always\n"),
                format!("{c0}.imagePulPolicy"),
                UNSUPPORTED,
            ),
            (
                MINIMAL.replace("  replicas: 2\n", "  replicas: 2\n  bogus: 1\n"),
                "spec.bogus".to_owned(),
                UNSUPPORTED,
            ),
            (
                MINIMAL
                    .replace("kind: Deployment", "kind: StatefulSet")
                    .replace(
                        "  replicas: 2\n",
                        "  replicas: 2\n  volumeClaimTemplates:\n    - metadata: {name: data}\n",
                    ),
                "spec.volumeClaimTemplates".to_owned(),
                "persistent volume claims are not supported",
            ),
            (
                with_container("          resources: {requests: {memory: 64MB}}\n"),
                format!("{c0}.resources.requests.memory"),
                "unknown memory unit \"MB\"",
            ),
            (
                with_container("          resources: {limits: {cpu: 100Mi}}\n"),
                format!("{c0}.resources.limits.cpu"),
                "CPU",
            ),
            (
                with_container("          resources: {limits: {nvidia.com/gpu: 1}}\n"),
                format!("{c0}.resources.limits.\"nvidia.com/gpu\""),
                "cpu and memory only",
            ),
            (
                with_container("          startupProbe: {tcpSocket: {port: 80}}\n"),
                format!("{c0}.startupProbe"),
                "initialDelaySeconds",
            ),
            (
                with_pod("      initContainers:\n        - {name: init, image: busybox}\n"),
                format!("{pod}.initContainers"),
                "init containers are not supported",
            ),
            (
                with_container("          ports: [{containerPort: 5000, protocol: SCTP}]\n"),
                format!("{c0}.ports[0].protocol"),
                "SCTP",
            ),
            (
                with_pod("      volumes: [{name: v, emptyDir: {}}]\n")
                    + "          volumeMounts: [{name: v, mountPath: /v, subPath: x}]\n",
                format!("{c0}.volumeMounts[0].subPath"),
                "mount the whole volume",
            ),
            (
                with_container("          volumeMounts: [{name: nope, mountPath: /v}]\n"),
                format!("{c0}.volumeMounts[0].name"),
                "no volume named \"nope\" in spec.template.spec.volumes",
            ),
            (
                with_pod("      securityContext: {fsGroup: 2000}\n"),
                format!("{pod}.securityContext.fsGroup"),
                "group",
            ),
            (
                with_pod("      securityContext: {seccompProfile: {type: Unconfined}}\n"),
                format!("{pod}.securityContext.seccompProfile.type"),
                "only RuntimeDefault",
            ),
            (
                with_pod("      tolerations: [{key: k, operator: Exists}]\n"),
                format!("{pod}.tolerations"),
                "use nodeSelector",
            ),
            (
                with_pod("      affinity:\n        nodeAffinity: {}\n"),
                format!("{pod}.affinity"),
                "affinity rules are not supported",
            ),
            (
                with_container(
                    "          livenessProbe: {httpGet: {port: 80, httpHeaders: [{name: X, value: y}]}}\n",
                ),
                format!("{c0}.livenessProbe.httpGet.httpHeaders"),
                "headers",
            ),
            (
                with_container("          livenessProbe: {httpGet: {port: 80, scheme: HTTPS}}\n"),
                format!("{c0}.livenessProbe.httpGet.scheme"),
                "plain HTTP",
            ),
            (
                with_container("          livenessProbe: {periodSeconds: 5}\n"),
                format!("{c0}.livenessProbe"),
                "needs one of httpGet, tcpSocket or exec",
            ),
            (
                with_container(
                    "          securityContext: {capabilities: {add: [SYS_ADMIN, FLY]}}\n",
                ),
                format!("{c0}.securityContext.capabilities.add[1]"),
                "\"FLY\" is not a Linux capability name",
            ),
            (
                with_container("          workingDir: srv\n"),
                format!("{c0}.workingDir"),
                "absolute path",
            ),
            (
                MINIMAL.replace("  replicas: 2\n", "  replicas: 0\n"),
                "spec.replicas".to_owned(),
                "at least one replica",
            ),
            (
                MINIMAL.replace(
                    "      containers:\n        - name: web\n          image: localhost/web:1\n",
                    "      containers: []\n",
                ),
                format!("{pod}.containers"),
                "at least one container",
            ),
        ];
        for (yaml, key, reason) in &cases {
            assert_error(yaml, key, reason);
        }
    }

    #[test]
    fn unsupported_kinds_name_kind_and_document() {
        let yaml = format!(
            "{MINIMAL}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{ports: [{{port: 80}}]}}\n"
        );
        let errs = errors(&yaml);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(errs[0].source, "t.yaml (document 2, Service/web)");
        assert_eq!(errs[0].key, "kind");
        assert!(
            errs[0].reason.contains("kind \"Service\" is not supported"),
            "{}",
            errs[0]
        );
        assert_eq!(
            errs[0].to_string().split(": ").next(),
            Some("t.yaml (document 2, Service/web)")
        );

        assert_error(
            "apiVersion: apps/v1beta1\nkind: Deployment\n",
            "apiVersion",
            "write apiVersion: apps/v1",
        );
        assert_error("- a\n- b\n", "", "must be a mapping");
        assert_error("metadata: {name: x}\n", "kind", "is required");
    }

    #[test]
    fn names_must_be_dns_labels() {
        let yaml = MINIMAL.replace("name: web\nspec", "name: Web_1\nspec");
        let errs = errors(&yaml);
        assert_eq!(
            errs.len(),
            1,
            "the manifest's own check must not repeat it: {errs:#?}"
        );
        assert_eq!(errs[0].key, "metadata.name");
        assert!(errs[0].reason.contains("DNS-1123"), "{}", errs[0]);
        assert_error(
            &MINIMAL.replace("name: web\nspec", "generateName: web-\nspec"),
            "metadata.generateName",
            "set metadata.name",
        );
    }

    #[test]
    fn multi_document_streams() {
        let second = MINIMAL.replace("name: web\nspec", "name: api\nspec");
        let yaml = format!("---\n# leading comment\n{MINIMAL}---\n---\n{second}...\n---\n");
        let all = convert_ok(&yaml);
        let sources: Vec<_> = all.iter().map(|c| c.source.as_str()).collect();
        assert_eq!(
            sources,
            ["Deployment/web (document 1)", "Deployment/api (document 3)"]
        );
        assert_eq!(all[1].manifest.name, "api");
    }

    #[test]
    fn problems_of_every_document_are_collected() {
        let bad1 = with_pod("      hostNetwork: true\n");
        let bad3 = with_container("          securityContext: {privileged: true}\n")
            .replace("name: web\nspec", "name: other\nspec");
        let yaml = format!(
            "{bad1}---\n{}---\n{bad3}",
            MINIMAL.replace("name: web\nspec", "name: fine\nspec")
        );
        let errs = errors(&yaml);
        assert_eq!(errs.len(), 2, "{errs:#?}");
        assert_eq!(errs[0].source, "t.yaml (document 1, Deployment/web)");
        assert_eq!(errs[0].key, "spec.template.spec.hostNetwork");
        assert_eq!(errs[1].source, "t.yaml (document 3, Deployment/other)");
        assert_eq!(
            errs[1].key,
            "spec.template.spec.containers[0].securityContext.privileged"
        );
        assert!(errs.iter().all(|d| d.line.is_none()));
    }

    #[test]
    fn no_effect_fields_are_accepted_with_notes() {
        let yaml = MINIMAL
            .replace(
                "  name: web\n",
                "  name: web\n  annotations: {a: b}\n  uid: 0b6f\n  resourceVersion: \"42\"\n  creationTimestamp: null\n  generation: 7\n",
            )
            .replace(
                "  replicas: 2\n",
                "  replicas: 2\n  revisionHistoryLimit: 3\n  progressDeadlineSeconds: 60\n  minReadySeconds: 1\n",
            )
            .replace(
                "      containers:\n",
                "      terminationGracePeriodSeconds: 5\n      dnsPolicy: ClusterFirst\n      restartPolicy: Always\n      schedulerName: default-scheduler\n      serviceAccountName: web\n      hostNetwork: false\n      tolerations: []\n      containers:\n",
            )
            + "          imagePullPolicy: Always\n          terminationMessagePolicy: File\nstatus: {replicas: 2}\n";
        let c = one(&yaml);
        for (path, message) in [
            ("metadata.annotations", "annotations have no effect"),
            ("metadata.uid", CLUSTER_BOOKKEEPING),
            ("metadata.resourceVersion", CLUSTER_BOOKKEEPING),
            ("metadata.generation", CLUSTER_BOOKKEEPING),
            ("spec.revisionHistoryLimit", NO_EFFECT),
            ("spec.progressDeadlineSeconds", NO_EFFECT),
            ("spec.minReadySeconds", NO_EFFECT),
            (
                "spec.template.spec.terminationGracePeriodSeconds",
                NO_EFFECT,
            ),
            ("spec.template.spec.dnsPolicy", "resolver"),
            (
                "spec.template.spec.restartPolicy",
                "keeps a workload's containers running",
            ),
            ("spec.template.spec.schedulerName", "without a scheduler"),
            ("spec.template.spec.serviceAccountName", "no Kubernetes API"),
            (
                "spec.template.spec.containers[0].imagePullPolicy",
                "local store",
            ),
            (
                "spec.template.spec.containers[0].terminationMessagePolicy",
                NO_EFFECT,
            ),
            ("status", "ignored"),
        ] {
            assert_note(&c, path, message);
        }
        // Null and default-valued fields need no note.
        assert!(!c.notes.iter().any(|n| n.path.contains("creationTimestamp")
            || n.path.contains("hostNetwork")
            || n.path.contains("tolerations")));
    }

    #[test]
    fn alias_bombs_are_refused() {
        // Each level repeats the one before nine times: 9^9 strings once expanded.
        let mut laughs = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h"]
            .iter()
            .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
        {
            let refs = vec![format!("*{prev}"); 9].join(",");
            laughs.push_str(&format!("{name}: &{name} [{refs}]\n"));
        }
        let errs = errors(&laughs);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(errs[0].reason.contains("expands"), "{}", errs[0]);
        assert!(errs[0].line.is_some());

        // Few nodes, but a long string repeated many times.
        let long = format!(
            "s: &s \"{}\"\nl: [{}]\n",
            "x".repeat(100_000),
            vec!["*s"; 10_000].join(",")
        );
        let errs = errors(&long);
        assert!(errs[0].reason.contains("expands"), "{}", errs[0]);

        // An alias used a few times within reason is fine.
        let reuse = MINIMAL
            .replace("labels: {app: web}", "labels: &labels {app: web}")
            .replace(
                "matchLabels: {app: web}",
                "matchLabels: {app: web}\n  # reuse\n",
            )
            + "          env: &env [{name: A, value: a}]\n";
        assert_eq!(one(&reuse).manifest.containers[0].env.len(), 1);
    }

    #[test]
    fn deep_nesting_is_refused() {
        // Deeper than serde_norway's recursion limit, yet cheap to scan: refused while reading.
        let flow = format!("{}{}", "[".repeat(1_000), "]".repeat(1_000));
        let errs = errors(&flow);
        assert!(errs[0].reason.contains("recursion limit"), "{}", errs[0]);
        let block: String = (0..300).map(|i| format!("{}a:\n", " ".repeat(i))).collect();
        let errs = errors(&block);
        assert!(errs[0].reason.contains("recursion limit"), "{}", errs[0]);
        assert!(errs[0].line.is_some());
    }

    #[test]
    fn deep_flow_nesting_is_refused_before_parsing() {
        // libyaml's scanner needs minutes for this; the guard refuses it up front.
        let nested = "{a: ".repeat(40_000);
        let errs = errors(&nested);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].reason.contains("40000 flow collections"),
            "{}",
            errs[0]
        );
        assert_eq!((errs[0].line, errs[0].column), (Some(1), Some(1)));
        // The document that is too dense is the one named.
        let second = format!("{MINIMAL}---\n{}", "[".repeat(20_000));
        assert_eq!(errors(&second)[0].line, Some(16), "the `---` line");

        // Flow style and JSON, which is YAML too, read as usual: the bound is per document.
        let json = r#"{
  "apiVersion": "apps/v1", "kind": "Deployment",
  "metadata": {"name": "web", "labels": {"app": "web"}, "annotations": {}},
  "spec": {
    "replicas": 2,
    "selector": {"matchLabels": {"app": "web"}},
    "template": {
      "metadata": {"labels": {"app": "web"}},
      "spec": {"containers": [{"name": "web", "image": "localhost/web:1",
        "ports": [{"name": "http", "containerPort": 8080}],
        "env": [{"name": "A", "value": "1"}], "resources": {}}]}
    }
  },
  "status": {}
}"#;
        assert_eq!(one(json).manifest.containers[0].ports[0].container, 8080);
        let many = vec![MINIMAL.replace("name: web\nspec", "name: web-NUM\nspec"); 300]
            .iter()
            .enumerate()
            .map(|(i, d)| d.replace("NUM", &i.to_string()))
            .collect::<Vec<_>>()
            .join("---\n");
        assert_eq!(convert_ok(&many).len(), 300);
    }

    #[test]
    fn size_and_document_limits() {
        let max = usize::try_from(MAX_KUBE_BYTES).expect("fits");
        let huge = " ".repeat(max + 1);
        let errs = errors(&huge);
        assert!(errs[0].reason.contains("limit"), "{}", errs[0]);

        let many = "---\n{}\n".repeat(MAX_DOCUMENTS + 5);
        let errs = convert("t.yaml", &many, &KubeOptions::default())
            .expect_err("too many")
            .diagnostics;
        assert!(
            errs.iter()
                .any(|d| d.reason.contains("more than 1000 documents")),
            "{:#?}",
            errs.last()
        );
        assert!(errs.len() <= MAX_PROBLEMS + 2);

        let opts = KubeOptions { generation: 0 };
        assert!(convert("t.yaml", MINIMAL, &opts).is_err());
        let opts = KubeOptions { generation: 9 };
        assert_eq!(
            convert("t.yaml", MINIMAL, &opts).expect("valid")[0]
                .manifest
                .generation,
            9
        );
    }

    #[test]
    fn yaml_syntax_errors_have_positions() {
        let yaml = format!("{MINIMAL}---\nkind: Pod\nmetadata:\n  name: [unclosed\n");
        let errs = errors(&yaml);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        let d = &errs[0];
        assert_eq!(d.source, "t.yaml (document 2)");
        assert!(d.line.is_some_and(|l| l > 16), "{d:?}");
        assert!(d.column.is_some());
        assert!(
            !d.reason
                .contains(&format!("at line {}", d.line.unwrap_or(0))),
            "{d:?}"
        );

        let dup = MINIMAL.replace("  replicas: 2\n", "  replicas: 2\n  replicas: 3\n");
        let errs = errors(&dup);
        assert!(
            errs[0].reason.contains("\"replicas\" appears twice"),
            "{}",
            errs[0]
        );
        assert!(errs[0].line.is_some());
    }

    #[test]
    fn empty_input_is_an_error() {
        for yaml in ["", "---\n", "# nothing\n---\n...\n", "~\n"] {
            let errs = errors(yaml);
            assert!(
                errs[0].reason.contains("no Kubernetes object"),
                "{yaml:?}: {errs:?}"
            );
        }
    }

    #[test]
    fn env_references_expand_like_kubernetes() {
        let env: BTreeMap<String, String> = [("A", "1"), ("B", "two")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
        let mut left = 1 << 20;
        for (input, want) in [
            ("$(A)-$(B)", "1-two"),
            ("$$(A)", "$(A)"),
            ("$(MISSING)", "$(MISSING)"),
            ("$(A", "$(A"),
            ("$HOME $", "$HOME $"),
            ("$$$", "$$"),
            ("€$(A)€", "€1€"),
            ("$€", "$€"),
            ("", ""),
        ] {
            assert_eq!(
                expand(input, &env, &mut left).as_deref(),
                Some(want),
                "{input:?}"
            );
        }
        let mut small = 3;
        assert_eq!(expand("$(B)$(B)", &env, &mut small), None);

        // Doubling references cannot blow up: the expansion allowance is bounded.
        let mut doubling =
            String::from("          env:\n            - {name: V0, value: xxxxxxxxxxxxxxxx}\n");
        for i in 1..40 {
            doubling.push_str(&format!(
                "            - {{name: V{i}, value: \"$(V{p})$(V{p})\"}}\n",
                p = i - 1
            ));
        }
        let errs = errors(&with_container(&doubling));
        assert!(
            errs.iter()
                .any(|d| d.reason.contains("expand to more than")),
            "{errs:#?}"
        );
    }

    #[test]
    fn selector_must_select_the_template() {
        let yaml = MINIMAL.replace("matchLabels: {app: web}", "matchLabels: {app: api}");
        assert_error(&yaml, "spec.selector", "does not select");
        let yaml = MINIMAL.replace(
            "matchLabels: {app: web}",
            "matchExpressions: [{key: app, operator: NotIn, values: [web]}]",
        );
        assert_error(&yaml, "spec.selector", "does not select");
        let yaml = MINIMAL.replace(
            "matchLabels: {app: web}",
            "matchExpressions: [{key: app, operator: Near}]",
        );
        assert_error(
            &yaml,
            "spec.selector.matchExpressions[0].operator",
            "not an operator",
        );
    }

    #[test]
    fn labels_fall_back_to_the_template() {
        let c = one(MINIMAL);
        assert_eq!(
            c.manifest.labels.get("app").map(String::as_str),
            Some("web")
        );
        assert_note(
            &c,
            "spec.template.metadata.labels",
            "carries the pod template's labels",
        );
        let bad = MINIMAL.replace("name: web\nspec", "name: web\n  labels: {\"-x\": y}\nspec");
        assert_error(&bad, "metadata.labels.-x", "label key");
    }

    #[test]
    fn each_problem_is_reported_once() {
        // Kubernetes-side checks cover the manifest keys they fill, so validation does not
        // repeat them under the manifest's names.
        let yaml = MINIMAL.replace(
            "      labels: {app: web}",
            "      labels: {app: web, \"bad key\": x}",
        ) + "          ports: [{name: http, containerPort: 8080}]\n          livenessProbe: {httpGet: {port: nope}}\n";
        let errs = errors(&yaml);
        let keys: Vec<_> = errs.iter().map(|d| d.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "spec.template.metadata.labels.\"bad key\"",
                "spec.template.spec.containers[0].livenessProbe.httpGet.port",
            ],
            "{errs:#?}"
        );
    }

    #[test]
    fn one_workload_is_defined_once() {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec: {containers: [{name: a, image: b}]}\n";
        let yaml = format!("{MINIMAL}---\n{pod}");
        let errs = errors(&yaml);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(errs[0].key, "metadata.name");
        assert!(
            errs[0]
                .reason
                .contains("default/web is already defined by document 1"),
            "{}",
            errs[0]
        );
        // Another namespace is another workload.
        let other = pod.replace("{name: web}", "{name: web, namespace: other}");
        assert_eq!(convert_ok(&format!("{MINIMAL}---\n{other}")).len(), 2);
    }

    #[test]
    fn tags_are_refused_and_merge_keys_apply() {
        let tagged = MINIMAL.replace("replicas: 2", "replicas: !custom 2");
        let errs = errors(&tagged);
        assert!(errs[0].reason.contains("YAML tag !custom"), "{}", errs[0]);
        // Core schema tags are plain values.
        let core = MINIMAL.replace("replicas: 2", "replicas: !!int 2");
        assert_eq!(one(&core).manifest.placement.replicas, 2);

        let merged = format!(
            "base: &base\n  apiVersion: apps/v1\n  kind: Deployment\n---\n{}",
            MINIMAL.replace(
                "apiVersion: apps/v1\nkind: Deployment\n",
                "<<: {apiVersion: apps/v1, kind: Deployment}\n"
            )
        );
        let errs = errors(&merged);
        // Document 1 is not an object of a known kind; document 2 converts through the merge.
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(errs[0].source, "t.yaml (document 1)");
        let only_second = merged
            .split_once("---\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        assert_eq!(one(&only_second).manifest.name, "web");
    }

    #[test]
    fn probe_ports_resolve_by_name() {
        let yaml = with_container(
            "          ports: [{name: http, containerPort: 8080}]\n          readinessProbe: {httpGet: {port: web}}\n",
        );
        assert_error(
            &yaml,
            "spec.template.spec.containers[0].readinessProbe.httpGet.port",
            "no port named \"web\"",
        );
        let c = one(&yaml.replace("port: web", "port: http"));
        let ready = c.manifest.containers[0].ready.clone().expect("probe");
        assert_eq!((ready.http.as_deref(), ready.port), (Some("/"), Some(8080)));
    }

    #[test]
    fn values_keep_their_kubernetes_types() {
        let yaml = with_container("          env: [{name: PORT, value: 8080}]\n");
        assert_error(
            &yaml,
            "spec.template.spec.containers[0].env[0].value",
            "quote the value",
        );
        let yaml = MINIMAL.replace("replicas: 2", "replicas: \"2\"");
        assert_error(&yaml, "spec.replicas", "must be an integer");
        let yaml = with_container("          env: [{name: MY-VAR, value: x}]\n");
        assert_error(
            &yaml,
            "spec.template.spec.containers[0].env[0].name",
            "environment variable",
        );
        // Integer quantities are read as Kubernetes reads them.
        let c = one(&with_container(
            "          resources: {requests: {cpu: 2, memory: 134217728}}\n",
        ));
        assert_eq!(
            c.manifest.containers[0].resources,
            Resources {
                cpu: Cpu(2000),
                memory: Memory(128 << 20)
            }
        );
    }

    #[test]
    fn manifest_validation_problems_are_reported() {
        let tiny = with_container("          resources: {requests: {memory: 1Mi}}\n");
        let errs = errors(&tiny);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(errs[0].key, "container[0].resources.memory");
        assert!(
            errs[0]
                .reason
                .starts_with("converted manifest: must be at least 4Mi"),
            "{}",
            errs[0]
        );
        assert_eq!(errs[0].source, "t.yaml (document 1, Deployment/web)");
    }

    #[test]
    fn examples_convert_validate_and_round_trip() {
        for (file, text, count) in [
            ("examples/kube/deployment.yaml", DEPLOYMENT_EXAMPLE, 2),
            ("examples/kube/statefulset.yaml", STATEFULSET_EXAMPLE, 1),
            ("examples/kube/pod.yaml", POD_EXAMPLE, 1),
        ] {
            let all = match convert(file, text, &KubeOptions::default()) {
                Ok(all) => all,
                Err(e) => panic!("{file}: {:#?}", e.diagnostics),
            };
            assert_eq!(all.len(), count, "{file}");
            for c in &all {
                assert!(c.manifest.validate().is_empty(), "{}", c.source);
                let toml = c.manifest.to_toml();
                let again = Manifest::from_toml(&c.source, &toml)
                    .unwrap_or_else(|e| panic!("{}: {e}\n{toml}", c.source));
                assert_eq!(again, c.manifest, "{}", c.source);
            }
        }

        let web = &convert_ok(DEPLOYMENT_EXAMPLE)[0];
        assert_eq!(
            web.manifest.containers[0]
                .args
                .first()
                .map(|a| a.contains("-p 8080 -h /www")),
            Some(true)
        );
        assert_eq!(
            (
                web.manifest.rollout.max_unavailable,
                web.manifest.rollout.max_surge
            ),
            (1, 1)
        );
        let kv = &convert_ok(STATEFULSET_EXAMPLE)[0];
        assert_eq!(kv.manifest.consistency.mode, ConsistencyMode::Strong);
        assert_eq!(kv.manifest.placement.replicas, 3);
        assert!(kv.manifest.containers[0].security.capabilities.is_empty());
        assert_eq!(kv.manifest.containers[0].security.run_as_user, Some(10001));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
            let _ = convert("fuzz", &text, &KubeOptions::default());
        }

        #[test]
        fn yaml_like_text_never_panics(text in "[-:{}\\[\\],&*!|>'\"#% \\n a-z0-9$()<~?]{0,300}") {
            let _ = convert("fuzz", &text, &KubeOptions::default());
        }

        #[test]
        fn edited_examples_never_panic(
            which in 0usize..3,
            at in 0usize..4000,
            cut in 0usize..40,
            insert in "[-:{}\\[\\],&*!|>'\" \\n a-zA-Z0-9$()]{0,12}",
        ) {
            let base = [DEPLOYMENT_EXAMPLE, STATEFULSET_EXAMPLE, POD_EXAMPLE][which];
            let at = at.min(base.len());
            let end = (at + cut).min(base.len());
            if let (Some(head), Some(tail)) = (base.get(..at), base.get(end..)) {
                let edited = format!("{head}{insert}{tail}");
                let _ = convert("fuzz", &edited, &KubeOptions::default());
            }
        }
    }
}
