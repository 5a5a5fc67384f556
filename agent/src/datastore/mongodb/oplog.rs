//! Replay of the oplog window an archive holds (mongodump's `oplog` namespace) onto the
//! scratch databases of a restore, so the restored data is the source at the window's end.
//!
//! The dump reads collections one after another while the application writes, so a
//! document may be in the archive as it was at any instant of the window. Every entry of
//! the window is applied in order from its start; each sets values rather than computing
//! them from the old ones (mongod logs `$inc` as the resulting value), so applying an entry
//! to a document that already has its effect changes nothing, and the documents converge on
//! their state at the window's end.
//!
//! What is applied:
//! - `i` (insert, as an upsert by `_id`; into a collection the restore does not hold, it
//!   creates it, as the server did: SecantusDB logs no `create` then), `d` (delete by
//!   `_id`), `n` (no-op: skipped);
//! - `u` in every form a MongoDB-wire server writes: a whole replacement document; `$v: 1`
//!   modifiers (`$set`, `$unset`, sent to the server as they are); `$v: 2` diffs in mongod's
//!   `doc_diff` format (mongodb/mongo `src/mongo/db/update/document_diff_serialization.h` and
//!   `document_diff_applier.cpp`: sections `d`, `u`, `i`, `s<field>` sub-diffs, array diffs
//!   `{a: true, l: <new length>, u<index>: value, s<index>: sub-diff}`); and `$v: 2` diffs as
//!   SecantusDB writes them, a change stream's `updateDescription` (`updatedFields` by dotted
//!   path, `removedFields`, `truncatedArrays`, `disambiguatedPaths`). A diff is applied to the
//!   current document client side ([`apply_diff`]) and the result replaces it, field order
//!   kept;
//! - `c` commands that change data: `create`, `drop`, `renameCollection`, `createIndexes`,
//!   `commitIndexBuild` (`startIndexBuild` and `abortIndexBuild` change nothing),
//!   `dropIndexes`, `collMod`, `dropDatabase` (the restored namespaces of that database) and
//!   `applyOps` (each operation it holds).
//!
//! Anything else fails the restore with a [`ReplayError`] naming the entry (`ts`, `op`,
//! `ns`): other commands (`emptycapped`, `convertToCapped`, ...), transactions spread over
//! several entries (`partialTxn`, `prepare`), writes to `system.views` or
//! `system.buckets.*`, a rename of a collection the dump read after the rename, and an
//! update of a document that is in neither the dump nor the window and that no later entry
//! deletes (the dump and its oplog disagree). Entries of databases the archive does not hold
//! (`admin`, `config`, databases not dumped) or, in a selective restore, of other
//! namespaces, are skipped and counted apart. The replay runs before anything is moved into
//! place: a failure leaves the target as it was.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bson::{Bson, Document, doc};
use mongodb::Client;
use mongodb::error::ErrorKind;

use super::RestoreError;

/// Largest array index a path may create (padding with nulls), elements: a BSON document
/// holds at most 16 MiB, and each element takes at least 3 bytes. Beyond it the diff is
/// refused as malformed, before allocating.
const MAX_ARRAY_INDEX: usize = 16 * 1024 * 1024 / 3;

/// Why an update's `o` cannot be applied to a document.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DiffError {
    /// The update breaks its format.
    #[error("malformed {format}: {why}")]
    Malformed {
        /// `doc_diff`, `updateDescription` or `update`.
        format: &'static str,
        /// What is wrong, with the offending part.
        why: String,
    },
    /// A valid form that this replay does not apply.
    #[error("{0} is not replayed")]
    Unsupported(String),
}

fn malformed(format: &'static str, why: impl Into<String>) -> DiffError {
    DiffError::Malformed {
        format,
        why: why.into(),
    }
}

/// What an update entry (`op: "u"`) asks for, read from its `o`.
#[derive(Debug, PartialEq)]
pub enum UpdateForm<'a> {
    /// `o` is the whole new document.
    Replacement(&'a Document),
    /// `$v: 1` (or unversioned) modifiers, `$set` and `$unset` only, without `$v`.
    Modifiers(Document),
    /// A `$v: 2` diff in mongod's `doc_diff` format (the `diff` field).
    DocDiff(&'a Document),
    /// A `$v: 2` diff as SecantusDB writes it: an `updateDescription` (the `diff` field).
    Description(&'a Document),
}

fn as_i64(v: &Bson) -> Option<i64> {
    match v {
        Bson::Int32(n) => Some(i64::from(*n)),
        Bson::Int64(n) => Some(*n),
        Bson::Double(f) if f.fract() == 0.0 => Some(*f as i64),
        _ => None,
    }
}

/// Reads the form of an update entry's `o`.
///
/// # Errors
/// [`DiffError::Unsupported`] for a `$v` other than 1 or 2, or a modifier other than
/// `$set` and `$unset`; [`DiffError::Malformed`] for a `$v: 2` entry without a `diff`
/// document.
pub fn update_form(o: &Document) -> Result<UpdateForm<'_>, DiffError> {
    match o.get("$v").map(|v| (v, as_i64(v))) {
        Some((_, Some(2))) => {
            let diff = o
                .get_document("diff")
                .map_err(|_| malformed("update", format!("$v: 2 without a diff document: {o}")))?;
            let description = ["updatedFields", "removedFields", "truncatedArrays"]
                .iter()
                .any(|k| diff.contains_key(k));
            Ok(if description {
                UpdateForm::Description(diff)
            } else {
                UpdateForm::DocDiff(diff)
            })
        }
        Some((_, Some(1))) | None if o.keys().any(|k| k.starts_with('$')) => {
            let mut modifiers = Document::new();
            for (k, v) in o {
                match k.as_str() {
                    "$v" => {}
                    "$set" | "$unset" if matches!(v, Bson::Document(_)) => {
                        modifiers.insert(k.clone(), v.clone());
                    }
                    "$set" | "$unset" => {
                        return Err(malformed("update", format!("{k} is not a document: {o}")));
                    }
                    other => {
                        return Err(DiffError::Unsupported(format!("update operator {other}")));
                    }
                }
            }
            Ok(UpdateForm::Modifiers(modifiers))
        }
        None => Ok(UpdateForm::Replacement(o)),
        Some((v, _)) => Err(DiffError::Unsupported(format!("update format $v: {v}"))),
    }
}

/// The document `pre` becomes under a `$v: 2` diff ([`UpdateForm::DocDiff`] or
/// [`UpdateForm::Description`]); other forms are returned as [`DiffError::Unsupported`]
/// (they are applied by the server).
///
/// A diff written against an older version of the document than `pre` (the dump read it
/// later in the window) is applied as mongod's own applier does: a sub-diff of a field that
/// is missing does nothing, one of a field whose type changed sets it to null, a path
/// through a value that is not a document or an array is skipped; a later entry of the
/// window rewrites those fields.
///
/// # Errors
/// [`DiffError`] for a malformed diff or one with a `b` (binary, time-series buckets)
/// section.
pub fn apply_diff(pre: &Document, form: &UpdateForm<'_>) -> Result<Document, DiffError> {
    match form {
        UpdateForm::DocDiff(diff) => apply_doc_diff(pre, diff),
        UpdateForm::Description(d) => apply_description(pre, d),
        UpdateForm::Replacement(_) | UpdateForm::Modifiers(_) => Err(DiffError::Unsupported(
            "a replacement or modifier update as a diff".into(),
        )),
    }
}

// --- mongod's doc_diff ---------------------------------------------------------------

/// A change to one field in a document diff.
enum FieldChange<'a> {
    Delete,
    Update(&'a Bson),
    Insert,
    Sub(&'a Document),
}

fn is_array_diff(diff: &Document) -> bool {
    diff.keys().next().is_some_and(|k| k == "a")
}

/// Records one field's change; a field changed twice makes the diff malformed.
fn add_change<'a>(
    changes: &mut HashMap<&'a str, FieldChange<'a>>,
    field: &'a str,
    change: FieldChange<'a>,
    diff: &Document,
) -> Result<(), DiffError> {
    if changes.insert(field, change).is_some() {
        return Err(malformed(
            "doc_diff",
            format!("field {field:?} changed twice in {diff}"),
        ));
    }
    Ok(())
}

/// A document diff read and checked (its sub-diffs too, as mongod's reader does).
struct DocDiff<'a> {
    changes: HashMap<&'a str, FieldChange<'a>>,
    /// Fields appended when the pre-image lacks them: updates, then inserts.
    appended: Vec<(&'a str, &'a Bson)>,
}

/// Checks a sub-diff: an array diff if its first field is `a`, else a document diff.
fn check_sub(sub: &Document) -> Result<(), DiffError> {
    if is_array_diff(sub) {
        parse_array_diff(sub).map(|_| ())
    } else {
        parse_doc_diff(sub).map(|_| ())
    }
}

fn parse_doc_diff(diff: &Document) -> Result<DocDiff<'_>, DiffError> {
    const F: &str = "doc_diff";
    if diff.is_empty() {
        return Err(malformed(F, "an empty diff"));
    }
    // Sections in mongod's order, each at most once, sub-diffs last.
    let mut changes: HashMap<&str, FieldChange<'_>> = HashMap::new();
    let mut appended: Vec<(&str, &Bson)> = Vec::new();
    let mut last_section = 0;
    for (key, value) in diff {
        let (order, name) = match key.as_str() {
            "d" => (1, "d"),
            "u" => (2, "u"),
            "i" => (3, "i"),
            "b" => {
                return Err(DiffError::Unsupported(
                    "a binary (b) diff section, written for time-series buckets".into(),
                ));
            }
            k if k.starts_with('s') => (5, "s"),
            other => return Err(malformed(F, format!("unknown section {other:?} in {diff}"))),
        };
        if order < last_section || (order == last_section && order != 5) {
            return Err(malformed(
                F,
                format!("section {name} out of order in {diff}"),
            ));
        }
        last_section = order;
        let Bson::Document(section) = value else {
            return Err(malformed(
                F,
                format!("section {key} is not a document in {diff}"),
            ));
        };
        let mut add = |field, change| add_change(&mut changes, field, change, diff);
        match name {
            "d" => {
                for field in section.keys() {
                    add(field, FieldChange::Delete)?;
                }
            }
            "u" => {
                for (field, v) in section {
                    add(field, FieldChange::Update(v))?;
                    appended.push((field, v));
                }
            }
            "i" => {
                for (field, v) in section {
                    add(field, FieldChange::Insert)?;
                    appended.push((field, v));
                }
            }
            _ => {
                if section.is_empty() {
                    return Err(malformed(F, format!("an empty sub-diff {key} in {diff}")));
                }
                check_sub(section)?;
                add(&key[1..], FieldChange::Sub(section))?;
            }
        }
    }
    Ok(DocDiff { changes, appended })
}

fn apply_doc_diff(pre: &Document, diff: &Document) -> Result<Document, DiffError> {
    let DocDiff { changes, appended } = parse_doc_diff(diff)?;
    let mut out = Document::new();
    let mut done: BTreeSet<&str> = BTreeSet::new();
    for (field, value) in pre {
        match changes.get(field.as_str()) {
            None => {
                out.insert(field.clone(), value.clone());
            }
            Some(FieldChange::Delete) => {}
            Some(FieldChange::Update(v)) => {
                out.insert(field.clone(), (*v).clone());
                done.insert(field);
            }
            // Moved to the end.
            Some(FieldChange::Insert) => {}
            Some(FieldChange::Sub(sub)) => {
                let new = match (value, is_array_diff(sub)) {
                    (Bson::Document(d), false) => Bson::Document(apply_doc_diff(d, sub)?),
                    (Bson::Array(a), true) => Bson::Array(apply_array_diff(a, sub)?),
                    // The type changed later in the window; a later entry rewrites it.
                    _ => Bson::Null,
                };
                out.insert(field.clone(), new);
            }
        }
    }
    for (field, value) in appended {
        if !done.contains(field) {
            out.insert(field, value.clone());
        }
    }
    Ok(out)
}

/// A change to one element in an array diff.
enum ElementChange<'a> {
    Update(&'a Bson),
    Sub(&'a Document),
}

/// An array diff read and checked.
struct ArrayDiff<'a> {
    resize: Option<usize>,
    changes: BTreeMap<usize, ElementChange<'a>>,
}

fn parse_array_diff(diff: &Document) -> Result<ArrayDiff<'_>, DiffError> {
    const F: &str = "doc_diff array";
    let mut fields = diff.iter();
    match fields.next() {
        Some((k, Bson::Boolean(true))) if k == "a" => {}
        _ => return Err(malformed(F, format!("no leading a: true in {diff}"))),
    }
    let mut resize = None;
    let mut changes: BTreeMap<usize, ElementChange<'_>> = BTreeMap::new();
    for (key, value) in fields {
        if key == "l" {
            let len = as_i64(value)
                .and_then(|n| usize::try_from(n).ok())
                .filter(|n| *n <= MAX_ARRAY_INDEX && resize.is_none() && changes.is_empty())
                .ok_or_else(|| malformed(F, format!("bad or misplaced l in {diff}")))?;
            resize = Some(len);
            continue;
        }
        let index = key
            .get(1..)
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<usize>().ok())
            .filter(|i| *i <= MAX_ARRAY_INDEX)
            .ok_or_else(|| {
                malformed(F, format!("{key:?} is not u<index> or s<index> in {diff}"))
            })?;
        let change = match (key.as_bytes()[0], value) {
            (b'u', v) => ElementChange::Update(v),
            (b's', Bson::Document(sub)) if !sub.is_empty() => {
                check_sub(sub)?;
                ElementChange::Sub(sub)
            }
            _ => return Err(malformed(F, format!("{key:?} in {diff}"))),
        };
        if changes.insert(index, change).is_some() {
            return Err(malformed(
                F,
                format!("index {index} changed twice in {diff}"),
            ));
        }
    }
    let last_change = changes.keys().next_back().map(|i| i + 1).unwrap_or(0);
    if resize.is_some_and(|len| last_change > len) {
        return Err(malformed(
            F,
            format!("a change beyond the new length in {diff}"),
        ));
    }
    Ok(ArrayDiff { resize, changes })
}

fn apply_array_diff(pre: &[Bson], diff: &Document) -> Result<Vec<Bson>, DiffError> {
    let ArrayDiff { resize, changes } = parse_array_diff(diff)?;
    let last_change = changes.keys().next_back().map(|i| i + 1).unwrap_or(0);
    let len = resize.unwrap_or_else(|| pre.len().max(last_change));
    let mut out = Vec::with_capacity(len);
    for i in 0..len {
        let before = pre.get(i);
        out.push(match (changes.get(&i), before) {
            (Some(ElementChange::Update(v)), _) => (*v).clone(),
            (Some(ElementChange::Sub(sub)), Some(Bson::Document(d))) if !is_array_diff(sub) => {
                Bson::Document(apply_doc_diff(d, sub)?)
            }
            (Some(ElementChange::Sub(sub)), Some(Bson::Array(a))) if is_array_diff(sub) => {
                Bson::Array(apply_array_diff(a, sub)?)
            }
            // Shorter than the diff expects, or another type: a later entry rewrites it.
            (Some(ElementChange::Sub(_)), _) => Bson::Null,
            (None, Some(v)) => v.clone(),
            (None, None) => Bson::Null,
        });
    }
    Ok(out)
}

// --- SecantusDB's updateDescription ----------------------------------------------------

/// One step of a path: a field name, an array index, or (from a dotted path without
/// `disambiguatedPaths`) either, as the container found there says.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    Field(String),
    Index(usize),
    Either(String),
}

fn steps(path: &str, disambiguated: Option<&Document>) -> Result<Vec<Step>, DiffError> {
    const F: &str = "updateDescription";
    match disambiguated.and_then(|d| d.get(path)) {
        None => Ok(path
            .split('.')
            .map(|s| Step::Either(s.to_owned()))
            .collect()),
        Some(Bson::Array(segments)) => segments
            .iter()
            .map(|s| match s {
                Bson::String(name) => Ok(Step::Field(name.clone())),
                n => as_i64(n)
                    .and_then(|i| usize::try_from(i).ok())
                    .map(Step::Index)
                    .ok_or_else(|| malformed(F, format!("disambiguated path {path:?}: {n}"))),
            })
            .collect(),
        Some(other) => Err(malformed(
            F,
            format!("disambiguated path {path:?} is {other}, not an array"),
        )),
    }
}

fn field_name(step: &Step) -> Option<&str> {
    match step {
        Step::Field(f) | Step::Either(f) => Some(f),
        Step::Index(_) => None,
    }
}

fn array_index(step: &Step) -> Result<Option<usize>, DiffError> {
    let index = match step {
        Step::Index(i) => Some(*i),
        Step::Either(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
        Step::Field(_) | Step::Either(_) => None,
    };
    match index {
        Some(i) if i > MAX_ARRAY_INDEX => Err(malformed(
            "updateDescription",
            format!("array index {i} is beyond any BSON document"),
        )),
        other => Ok(other),
    }
}

/// Sets `value` at `path` below `doc`, creating missing documents and padding arrays with
/// nulls (what `$set` does); a path through a value that is neither is skipped.
fn set_in_doc(doc: &mut Document, path: &[Step], value: Bson) -> Result<(), DiffError> {
    let Some((step, rest)) = path.split_first() else {
        return Ok(());
    };
    let Some(name) = field_name(step) else {
        return Ok(());
    };
    if rest.is_empty() {
        doc.insert(name, value);
        return Ok(());
    }
    if !doc.contains_key(name) {
        doc.insert(name, Document::new());
    }
    match doc.get_mut(name) {
        Some(Bson::Document(d)) => set_in_doc(d, rest, value),
        Some(Bson::Array(a)) => set_in_array(a, rest, value),
        _ => Ok(()),
    }
}

fn set_in_array(array: &mut Vec<Bson>, path: &[Step], value: Bson) -> Result<(), DiffError> {
    let Some((step, rest)) = path.split_first() else {
        return Ok(());
    };
    let Some(index) = array_index(step)? else {
        return Ok(());
    };
    if array.len() <= index {
        array.resize(index, Bson::Null);
        array.push(if rest.is_empty() {
            Bson::Null
        } else {
            Bson::Document(Document::new())
        });
    }
    if rest.is_empty() {
        array[index] = value;
        return Ok(());
    }
    match &mut array[index] {
        Bson::Document(d) => set_in_doc(d, rest, value),
        Bson::Array(a) => set_in_array(a, rest, value),
        _ => Ok(()),
    }
}

/// What `path` names below `doc`, if it exists.
fn get_mut_in<'a>(doc: &'a mut Document, path: &[Step]) -> Result<Option<&'a mut Bson>, DiffError> {
    let Some((first, rest)) = path.split_first() else {
        return Ok(None);
    };
    let Some(mut node) = field_name(first).and_then(|n| doc.get_mut(n)) else {
        return Ok(None);
    };
    for step in rest {
        node = match node {
            Bson::Document(d) => match field_name(step).and_then(|n| d.get_mut(n)) {
                Some(v) => v,
                None => return Ok(None),
            },
            Bson::Array(a) => match array_index(step)?.and_then(|i| a.get_mut(i)) {
                Some(v) => v,
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
    }
    Ok(Some(node))
}

/// Removes what `path` names: a field is deleted, an array element becomes null (what
/// `$unset` does).
fn unset_in(doc: &mut Document, path: &[Step]) -> Result<(), DiffError> {
    let Some((last, parent)) = path.split_last() else {
        return Ok(());
    };
    if parent.is_empty() {
        if let Some(name) = field_name(last) {
            doc.remove(name);
        }
        return Ok(());
    }
    match get_mut_in(doc, parent)? {
        Some(Bson::Document(d)) => {
            if let Some(name) = field_name(last) {
                d.remove(name);
            }
        }
        Some(Bson::Array(a)) => {
            if let Some(slot) = array_index(last)?.and_then(|i| a.get_mut(i)) {
                *slot = Bson::Null;
            }
        }
        _ => {}
    }
    Ok(())
}

fn apply_description(pre: &Document, d: &Document) -> Result<Document, DiffError> {
    const F: &str = "updateDescription";
    for key in d.keys() {
        if ![
            "updatedFields",
            "removedFields",
            "truncatedArrays",
            "disambiguatedPaths",
        ]
        .contains(&key.as_str())
        {
            return Err(malformed(F, format!("unknown field {key:?} in {d}")));
        }
    }
    let disambiguated = match d.get("disambiguatedPaths") {
        None => None,
        Some(Bson::Document(p)) => Some(p),
        Some(other) => return Err(malformed(F, format!("disambiguatedPaths is {other}"))),
    };
    let mut doc = pre.clone();
    match d.get("updatedFields") {
        None => {}
        Some(Bson::Document(updated)) => {
            for (path, value) in updated {
                set_in_doc(&mut doc, &steps(path, disambiguated)?, value.clone())?;
            }
        }
        Some(other) => return Err(malformed(F, format!("updatedFields is {other}"))),
    }
    match d.get("removedFields") {
        None => {}
        Some(Bson::Array(removed)) => {
            for path in removed {
                let Bson::String(path) = path else {
                    return Err(malformed(F, format!("removedFields holds {path}")));
                };
                unset_in(&mut doc, &steps(path, disambiguated)?)?;
            }
        }
        Some(other) => return Err(malformed(F, format!("removedFields is {other}"))),
    }
    match d.get("truncatedArrays") {
        None => {}
        Some(Bson::Array(truncated)) => {
            for t in truncated {
                let (Some(Bson::String(path)), Some(size)) = (
                    t.as_document().and_then(|t| t.get("field")),
                    t.as_document()
                        .and_then(|t| t.get("newSize"))
                        .and_then(as_i64)
                        .and_then(|n| usize::try_from(n).ok()),
                ) else {
                    return Err(malformed(F, format!("truncatedArrays holds {t}")));
                };
                if let Some(Bson::Array(a)) = get_mut_in(&mut doc, &steps(path, disambiguated)?)? {
                    a.truncate(size);
                }
            }
        }
        Some(other) => return Err(malformed(F, format!("truncatedArrays is {other}"))),
    }
    Ok(doc)
}

// --- the replay ------------------------------------------------------------------------

/// An oplog entry that the replay cannot apply, or that the server refused: it names the
/// entry (`ts`, `op`, `ns`) and says why.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The entry is of a form the replay does not apply.
    #[error("{entry}: {why}")]
    Unsupported {
        /// `oplog entry ts Timestamp(T, I), op OP, ns NS`.
        entry: String,
        /// What in it is not replayed.
        why: String,
    },
    /// The entry's update cannot be applied to its document.
    #[error("{entry}: {source}")]
    Diff {
        /// As for [`ReplayError::Unsupported`].
        entry: String,
        /// What is wrong with the update.
        source: DiffError,
    },
    /// The scratch database refused the entry.
    #[error("{entry}: applying it to {target} failed: {error}")]
    Target {
        /// As for [`ReplayError::Unsupported`].
        entry: String,
        /// The scratch namespace.
        target: String,
        /// The server's answer.
        error: String,
    },
    /// An update of a document that the restore does not hold and that no later entry
    /// deletes.
    #[error(
        "{entry}: updates a document that is neither in the dump nor inserted earlier in its oplog window, \
         and no later entry deletes it: the dump and its oplog disagree; take the backup again"
    )]
    Orphan {
        /// As for [`ReplayError::Unsupported`].
        entry: String,
    },
}

impl From<ReplayError> for RestoreError {
    fn from(e: ReplayError) -> Self {
        RestoreError::Target(format!(
            "the oplog replay stopped at {e}; nothing was put in place"
        ))
    }
}

/// The name of an entry in errors: `oplog entry ts Timestamp(T, I), op OP, ns NS`, with
/// the `applyOps` entry holding it.
fn entry_name(entry: &Document, parent: Option<&str>) -> String {
    let ts = match entry.get("ts") {
        Some(Bson::Timestamp(t)) => format!("Timestamp({}, {})", t.time, t.increment),
        Some(other) => other.to_string(),
        None => "(none)".into(),
    };
    let op = entry.get_str("op").unwrap_or("(none)");
    let ns = entry.get_str("ns").unwrap_or("(none)");
    match parent {
        Some(p) => format!("operation op {op}, ns {ns} of the applyOps in {p}"),
        None => format!("oplog entry ts {ts}, op {op}, ns {ns}"),
    }
}

/// What a replay did, for the restore's result and its checks.
#[derive(Clone, Debug, Default)]
pub struct ReplayReport {
    /// Operations applied (an `applyOps` counts the operations it holds), including updates
    /// whose document a later entry deletes.
    pub applied: u64,
    /// Of `applied`, updates of a document that a later entry of the window deletes (the
    /// dump read it after its deletion).
    pub superseded: u64,
    /// No-ops (`n`, `startIndexBuild`, `abortIndexBuild`).
    pub noops: u64,
    /// Entries of databases or namespaces the restore does not hold, skipped.
    pub outside: u64,
    /// Source namespaces (`db.collection`) whose documents an applied entry changed (the
    /// entries at the window's start aside: their effect is in the dump).
    pub changed: BTreeSet<String>,
    /// Source namespaces created (by a command or a first insert), dropped, renamed,
    /// re-indexed or modified by a command.
    pub ddl: BTreeSet<String>,
}

/// Applies entries to a restore's scratch databases (see the module docs).
pub struct Replay {
    client: Client,
    /// Source database → its scratch database, for every database of the archive.
    scratch: BTreeMap<String, String>,
    /// Only these `db.collection` namespaces; all when empty.
    only: Vec<String>,
    /// Source namespaces that exist in the scratch databases at this point of the replay.
    known: BTreeSet<String>,
    /// Whether a rename keeps a collection's options on this server (probed once).
    rename_keeps: Option<bool>,
    /// Updates that found no document, until a later entry deletes it.
    orphans: Orphans,
    /// The `ts` of the window's first entry: the dump's start, whose entries are already
    /// in the dumped documents.
    start: Option<bson::Timestamp>,
    /// What was done so far.
    pub report: ReplayReport,
}

/// Updates that found no document to update. The dump read that document after its
/// deletion, which a later entry of the window must then hold; at the window's end any
/// left means the dump and its oplog disagree.
#[derive(Debug, Default)]
struct Orphans {
    /// (source namespace, `_id` as BSON) → the update entry's name.
    updates: BTreeMap<(String, Vec<u8>), String>,
}

fn id_key(id: &Bson) -> Vec<u8> {
    let mut out = Vec::new();
    doc! {"": id.clone()}
        .to_writer(&mut out)
        .expect("BSON to memory");
    out
}

impl Orphans {
    /// An update of document `id` of `ns` found nothing.
    fn updated(&mut self, ns: &str, id: &Bson, entry: &str) {
        self.updates
            .entry((ns.to_owned(), id_key(id)))
            .or_insert_with(|| entry.to_owned());
    }

    /// Document `id` of `ns` is deleted: its updates had nothing to do.
    fn deleted(&mut self, ns: &str, id: &Bson) {
        self.updates.remove(&(ns.to_owned(), id_key(id)));
    }

    /// `ns` is dropped (`to` is `None`) or renamed to `to`.
    fn moved(&mut self, ns: &str, to: Option<&str>) {
        let keys: Vec<(String, Vec<u8>)> = self
            .updates
            .keys()
            .filter(|(n, _)| n == ns)
            .cloned()
            .collect();
        for key in keys {
            let entry = self.updates.remove(&key).expect("listed");
            if let Some(to) = to {
                self.updates.insert((to.to_owned(), key.1), entry);
            }
        }
    }

    /// The first update left without a later delete, if any.
    fn left(&self) -> Option<&String> {
        self.updates.values().next()
    }
}

/// The server's error code, for the answers the replay tolerates.
fn error_code(e: &mongodb::error::Error) -> Option<i32> {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}

/// NamespaceNotFound, IndexNotFound.
const NAMESPACE_NOT_FOUND: i32 = 26;
const INDEX_NOT_FOUND: i32 = 27;

impl Replay {
    /// A replay into `scratch` (source database → scratch database) of the namespaces in
    /// `only` (all when empty); `known` are the source namespaces the archive restores.
    pub fn new(
        client: Client,
        scratch: BTreeMap<String, String>,
        only: Vec<String>,
        known: BTreeSet<String>,
    ) -> Self {
        Self {
            client,
            scratch,
            only,
            known,
            rename_keeps: None,
            orphans: Orphans::default(),
            start: None,
            report: ReplayReport::default(),
        }
    }

    /// The scratch database of `db.coll` if the restore holds it.
    fn target(&self, db: &str, coll: &str) -> Option<String> {
        let scratch = self.scratch.get(db)?;
        let ns = format!("{db}.{coll}");
        (self.only.is_empty() || self.only.contains(&ns)).then(|| scratch.clone())
    }

    /// Applies one entry of the window.
    ///
    /// # Errors
    /// [`ReplayError`] naming the entry.
    pub async fn apply(&mut self, entry: &Document) -> Result<(), ReplayError> {
        let name = entry_name(entry, None);
        let ts = entry.get_timestamp("ts").ok();
        if self.start.is_none() {
            self.start = ts;
        }
        // The entries at the window's start are in the dumped documents already: applied
        // again, they change no count, and the restore still checks the counts of their
        // namespaces against the manifest.
        let before = (ts.is_some() && ts == self.start).then(|| self.report.changed.clone());
        self.apply_named(entry, &name, None).await?;
        if let Some(before) = before {
            self.report.changed = before;
        }
        Ok(())
    }

    /// Checks the end of the window: every update that found no document had a later
    /// delete.
    ///
    /// # Errors
    /// [`ReplayError::Orphan`] naming the first such update.
    pub fn finish(&self) -> Result<(), ReplayError> {
        match self.orphans.left() {
            Some(entry) => Err(ReplayError::Orphan {
                entry: entry.clone(),
            }),
            None => Ok(()),
        }
    }

    async fn apply_named(
        &mut self,
        entry: &Document,
        name: &str,
        parent: Option<&str>,
    ) -> Result<(), ReplayError> {
        let unsupported = |why: String| ReplayError::Unsupported {
            entry: name.to_owned(),
            why,
        };
        let op = entry
            .get_str("op")
            .map_err(|_| unsupported("it has no op".into()))?;
        match op {
            "n" => {
                self.report.noops += 1;
                Ok(())
            }
            "i" | "u" | "d" => self.crud(op, entry, name).await,
            "c" => {
                let o = entry
                    .get_document("o")
                    .map_err(|_| unsupported("a command entry without o".into()))?;
                let ns = entry.get_str("ns").unwrap_or("");
                let db = ns.split_once('.').map_or(ns, |(db, _)| db);
                self.command(db, o, name, parent).await
            }
            other => Err(unsupported(format!("op {other:?} is not replayed"))),
        }
    }

    async fn crud(&mut self, op: &str, entry: &Document, name: &str) -> Result<(), ReplayError> {
        let unsupported = |why: String| ReplayError::Unsupported {
            entry: name.to_owned(),
            why,
        };
        let ns = entry.get_str("ns").unwrap_or("");
        let Some((db, coll)) = ns.split_once('.') else {
            return Err(unsupported("its ns is not database.collection".into()));
        };
        if let Some(system) = coll.strip_prefix("system.") {
            if system == "views" || system.starts_with("buckets.") {
                return Err(unsupported(format!(
                    "writes to {coll} (view definitions, time-series buckets) are not replayed"
                )));
            }
            // Not dumped either.
            self.report.outside += 1;
            return Ok(());
        }
        let Some(target) = self.target(db, coll) else {
            self.report.outside += 1;
            return Ok(());
        };
        let o = entry
            .get_document("o")
            .map_err(|_| unsupported("it has no o document".into()))?;
        let collection = self.client.database(&target).collection::<Document>(coll);
        let refused = |e: mongodb::error::Error| ReplayError::Target {
            entry: name.to_owned(),
            target: format!("{target}.{coll}"),
            error: e.to_string(),
        };
        let mut found = true;
        match op {
            "i" => {
                let id = o
                    .get("_id")
                    .ok_or_else(|| unsupported("an insert without _id".into()))?;
                collection
                    .replace_one(doc! {"_id": id.clone()}, o.clone())
                    .upsert(true)
                    .await
                    .map_err(refused)?;
                // An insert creates its collection; SecantusDB logs no create entry then.
                if self.known.insert(ns.to_owned()) {
                    self.report.ddl.insert(ns.to_owned());
                }
            }
            "d" => {
                let id = o
                    .get("_id")
                    .ok_or_else(|| unsupported("a delete without _id".into()))?;
                collection.delete_one(o.clone()).await.map_err(refused)?;
                self.orphans.deleted(ns, id);
            }
            _ => {
                let selector = entry
                    .get_document("o2")
                    .map_err(|_| unsupported("an update without o2".into()))?;
                let form = update_form(o).map_err(|source| ReplayError::Diff {
                    entry: name.to_owned(),
                    source,
                })?;
                found = match &form {
                    UpdateForm::Replacement(new) => {
                        let r = collection
                            .replace_one(selector.clone(), (*new).clone())
                            .await
                            .map_err(refused)?;
                        r.matched_count > 0
                    }
                    UpdateForm::Modifiers(m) => {
                        let r = collection
                            .update_one(selector.clone(), m.clone())
                            .await
                            .map_err(refused)?;
                        r.matched_count > 0
                    }
                    UpdateForm::DocDiff(_) | UpdateForm::Description(_) => {
                        match collection
                            .find_one(selector.clone())
                            .await
                            .map_err(refused)?
                        {
                            None => false,
                            Some(pre) => {
                                let post = apply_diff(&pre, &form).map_err(|source| {
                                    ReplayError::Diff {
                                        entry: name.to_owned(),
                                        source,
                                    }
                                })?;
                                collection
                                    .replace_one(selector.clone(), post)
                                    .await
                                    .map_err(refused)?;
                                true
                            }
                        }
                    }
                };
                if !found {
                    let id = selector.get("_id").cloned().unwrap_or(Bson::Null);
                    self.orphans.updated(ns, &id, name);
                }
            }
        }
        self.report.applied += 1;
        if !found {
            self.report.superseded += 1;
        }
        self.report.changed.insert(ns.to_owned());
        Ok(())
    }

    /// Whether `db.coll` (a scratch namespace) exists.
    async fn exists(&self, db: &str, coll: &str) -> Result<bool, mongodb::error::Error> {
        let names = self
            .client
            .database(db)
            .list_collection_names()
            .filter(doc! {"name": coll})
            .await?;
        Ok(!names.is_empty())
    }

    fn ddl(&mut self, ns: String) {
        self.report.applied += 1;
        self.report.changed.insert(ns.clone());
        self.report.ddl.insert(ns);
    }

    async fn command(
        &mut self,
        db: &str,
        o: &Document,
        name: &str,
        parent: Option<&str>,
    ) -> Result<(), ReplayError> {
        let unsupported = |why: String| ReplayError::Unsupported {
            entry: name.to_owned(),
            why,
        };
        let command = o.keys().next().map(String::as_str).unwrap_or("");
        let refused = |target: &str, e: mongodb::error::Error| ReplayError::Target {
            entry: name.to_owned(),
            target: target.to_owned(),
            error: e.to_string(),
        };
        // The collection a command names, and where it lives in the restore.
        let coll = o.get_str(command).ok();
        let target = coll.and_then(|c| self.target(db, c));
        match command {
            "applyOps" => {
                if o.contains_key("partialTxn") || o.contains_key("prepare") {
                    return Err(unsupported(
                        "a transaction spread over several entries or prepared (applyOps with \
                         partialTxn or prepare) is not replayed"
                            .into(),
                    ));
                }
                let ops = o
                    .get_array("applyOps")
                    .map_err(|_| unsupported("applyOps is not an array".into()))?;
                let holder = parent.unwrap_or(name).to_owned();
                for op in ops {
                    let op = op
                        .as_document()
                        .ok_or_else(|| unsupported(format!("applyOps holds {op}")))?;
                    let nested = entry_name(op, Some(&holder));
                    Box::pin(self.apply_named(op, &nested, Some(&holder))).await?;
                }
                Ok(())
            }
            "startIndexBuild" | "abortIndexBuild" => {
                self.report.noops += 1;
                Ok(())
            }
            "create" | "drop" | "createIndexes" | "commitIndexBuild" | "dropIndexes"
            | "deleteIndexes" | "collMod" => {
                let Some(coll) = coll else {
                    return Err(unsupported(format!("{command} names no collection")));
                };
                let Some(target) = target else {
                    self.report.outside += 1;
                    return Ok(());
                };
                let ns = format!("{db}.{coll}");
                let scratch = self.client.database(&target);
                let at = format!("{target}.{coll}");
                match command {
                    "create" => {
                        // Already there: the start entry, or a collection the dump saw.
                        if !self
                            .exists(&target, coll)
                            .await
                            .map_err(|e| refused(&at, e))?
                        {
                            scratch
                                .run_command(o.clone())
                                .await
                                .map_err(|e| refused(&at, e))?;
                        }
                        self.known.insert(ns.clone());
                    }
                    "drop" => {
                        scratch
                            .collection::<Document>(coll)
                            .drop()
                            .await
                            .map_err(|e| refused(&at, e))?;
                        self.known.remove(&ns);
                        self.orphans.moved(&ns, None);
                    }
                    "createIndexes" | "commitIndexBuild" => {
                        // SecantusDB and commitIndexBuild list the specs; mongod's
                        // createIndexes entry is one spec inline.
                        let specs: Vec<Bson> = match o.get_array("indexes") {
                            Ok(specs) => specs.clone(),
                            Err(_) => {
                                let mut spec = o.clone();
                                spec.remove(command);
                                vec![Bson::Document(spec)]
                            }
                        };
                        let specs: Vec<Bson> = specs
                            .into_iter()
                            .map(|s| match s {
                                // entryFormat: SecantusDB's own, refused by createIndexes.
                                Bson::Document(mut s) => {
                                    s.remove("entryFormat");
                                    s.remove("ns");
                                    Ok(Bson::Document(s))
                                }
                                other => Err(unsupported(format!("index spec {other}"))),
                            })
                            .collect::<Result<_, _>>()?;
                        scratch
                            .run_command(doc! {"createIndexes": coll, "indexes": specs})
                            .await
                            .map_err(|e| refused(&at, e))?;
                    }
                    _ => {
                        // dropIndexes, collMod: of a collection a later entry drops, they
                        // change nothing.
                        let mut cmd = o.clone();
                        if command == "deleteIndexes" {
                            cmd = doc! {"dropIndexes": coll, "index": o.get("index").cloned().unwrap_or(Bson::Null)};
                        }
                        match scratch.run_command(cmd).await {
                            Ok(_) => {}
                            Err(e)
                                if matches!(
                                    error_code(&e),
                                    Some(NAMESPACE_NOT_FOUND | INDEX_NOT_FOUND)
                                ) => {}
                            Err(e) => return Err(refused(&at, e)),
                        }
                    }
                }
                self.ddl(ns);
                Ok(())
            }
            "renameCollection" => self.rename(o, name).await,
            "dropDatabase" => {
                if !self.scratch.contains_key(db) {
                    self.report.outside += 1;
                    return Ok(());
                }
                let dropped: Vec<String> = self
                    .known
                    .iter()
                    .filter(|ns| ns.split_once('.').is_some_and(|(d, _)| d == db))
                    .filter(|ns| self.only.is_empty() || self.only.contains(ns))
                    .cloned()
                    .collect();
                let target = self.scratch[db].clone();
                for ns in dropped {
                    let coll = &ns[db.len() + 1..];
                    self.client
                        .database(&target)
                        .collection::<Document>(coll)
                        .drop()
                        .await
                        .map_err(|e| refused(&format!("{target}.{coll}"), e))?;
                    self.known.remove(&ns);
                    self.orphans.moved(&ns, None);
                    self.report.changed.insert(ns.clone());
                    self.report.ddl.insert(ns);
                }
                self.report.applied += 1;
                Ok(())
            }
            "" => Err(unsupported("an empty command".into())),
            other => Err(unsupported(format!(
                "command {other} is not replayed (it is not one of create, drop, \
                 renameCollection, createIndexes, dropIndexes, collMod, applyOps, dropDatabase)"
            ))),
        }
    }

    async fn rename(&mut self, o: &Document, name: &str) -> Result<(), ReplayError> {
        let unsupported = |why: String| ReplayError::Unsupported {
            entry: name.to_owned(),
            why,
        };
        let (Ok(from), Ok(to)) = (o.get_str("renameCollection"), o.get_str("to")) else {
            return Err(unsupported(
                "renameCollection without its namespaces".into(),
            ));
        };
        let (Some((from_db, from_coll)), Some((to_db, to_coll))) =
            (from.split_once('.'), to.split_once('.'))
        else {
            return Err(unsupported(format!("rename of {from} to {to}")));
        };
        let (source, target) = match (self.target(from_db, from_coll), self.target(to_db, to_coll))
        {
            (None, None) => {
                self.report.outside += 1;
                return Ok(());
            }
            (Some(s), Some(t)) => (s, t),
            _ => {
                return Err(unsupported(format!(
                    "renaming {from} to {to} crosses the edge of what is restored"
                )));
            }
        };
        let refused = |e: mongodb::error::Error| ReplayError::Target {
            entry: name.to_owned(),
            target: format!("{source}.{from_coll}"),
            error: e.to_string(),
        };
        if !self.exists(&source, from_coll).await.map_err(refused)? {
            return Err(unsupported(format!(
                "the dump read {from} after this rename, so the documents renamed to {to} \
                 are in neither; take the backup again (mongodump refuses renames during a \
                 dump for this reason)"
            )));
        }
        // A drop of the target comes as its own entry before; dropTarget covers older
        // servers that fold it in.
        let drop_target = !matches!(o.get("dropTarget"), None | Some(Bson::Boolean(false)));
        if drop_target {
            self.client
                .database(&target)
                .collection::<Document>(to_coll)
                .drop()
                .await
                .map_err(refused)?;
        }
        let keeps = match self.rename_keeps {
            Some(k) => k,
            None => {
                let k = super::restore::rename_keeps_options(&self.client, &source).await;
                self.rename_keeps = Some(k);
                k
            }
        };
        let options = super::restore::collection_options(&self.client, &source, from_coll)
            .await
            .map_err(|e| ReplayError::Target {
                entry: name.to_owned(),
                target: format!("{source}.{from_coll}"),
                error: e.to_string(),
            })?;
        if options.is_empty() || keeps {
            self.client
                .database("admin")
                .run_command(doc! {
                    "renameCollection": format!("{source}.{from_coll}"),
                    "to": format!("{target}.{to_coll}"),
                })
                .await
                .map_err(refused)?;
        } else {
            super::restore::copy_collection(
                &self.client,
                (&source, from_coll),
                (&target, to_coll),
                options,
            )
            .await
            .map_err(|e| ReplayError::Target {
                entry: name.to_owned(),
                target: format!("{target}.{to_coll}"),
                error: e.to_string(),
            })?;
        }
        self.known.remove(from);
        self.known.insert(to.to_owned());
        self.orphans.moved(from, Some(to));
        self.report.applied += 1;
        for ns in [from, to] {
            self.report.changed.insert(ns.to_owned());
            self.report.ddl.insert(ns.to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diff(pre: Document, o: Document) -> Result<Document, DiffError> {
        let form = update_form(&o)?;
        apply_diff(&pre, &form)
    }

    fn bytes(d: &Document) -> Vec<u8> {
        let mut out = Vec::new();
        d.to_writer(&mut out).unwrap();
        out
    }

    /// Equal as BSON bytes: field order counts.
    #[track_caller]
    fn assert_same(got: Document, want: Document) {
        assert_eq!(bytes(&got), bytes(&want), "got {got}, want {want}");
    }

    #[test]
    fn update_forms_are_told_apart() {
        let replacement = doc! {"_id": 1, "a": 1};
        assert_eq!(
            update_form(&replacement),
            Ok(UpdateForm::Replacement(&replacement))
        );
        assert_eq!(
            update_form(&doc! {"$v": 1, "$set": {"a": 1}, "$unset": {"b": true}}),
            Ok(UpdateForm::Modifiers(
                doc! {"$set": {"a": 1}, "$unset": {"b": true}}
            ))
        );
        assert_eq!(
            update_form(&doc! {"$set": {"a": 1}}),
            Ok(UpdateForm::Modifiers(doc! {"$set": {"a": 1}}))
        );
        let o = doc! {"$v": 2, "diff": {"u": {"a": 1}}};
        assert!(matches!(update_form(&o), Ok(UpdateForm::DocDiff(_))));
        let o = doc! {"$v": 2i64, "diff": {"updatedFields": {"a": 1}, "removedFields": [], "truncatedArrays": []}};
        assert!(matches!(update_form(&o), Ok(UpdateForm::Description(_))));
        assert_eq!(
            update_form(&doc! {"$inc": {"a": 1}}),
            Err(DiffError::Unsupported("update operator $inc".into()))
        );
        assert!(matches!(
            update_form(&doc! {"$v": 3, "diff": {}}),
            Err(DiffError::Unsupported(_))
        ));
        assert!(matches!(
            update_form(&doc! {"$v": 2, "nodiff": 1}),
            Err(DiffError::Malformed { .. })
        ));
    }

    /// mongod's doc_diff: updates in place, inserts and updates of absent fields at the end
    /// (updates first), deletes, nested sub-diffs.
    #[test]
    fn doc_diff_updates_inserts_deletes_and_nests() {
        let pre = doc! {"_id": 1, "a": 1, "b": 2, "c": {"x": 1, "y": 2}, "d": 4, "e": 5};
        let got = diff(
            pre,
            doc! {"$v": 2, "diff": {
                "d": {"b": false},
                "u": {"a": 10, "new_u": 1},
                "i": {"d": 40, "new_i": 2},
                "sc": {"d": {"x": false}, "u": {"y": 20}, "i": {"z": 30}},
            }},
        )
        .unwrap();
        assert_same(
            got,
            doc! {"_id": 1, "a": 10, "c": {"y": 20, "z": 30}, "e": 5, "new_u": 1, "d": 40, "new_i": 2},
        );
    }

    /// Array sub-diffs: `u<index>` in place and past the end (padding with null), `s<index>`
    /// into documents and arrays, `l` to shrink or grow.
    #[test]
    fn doc_diff_arrays_update_pad_nest_and_resize() {
        let pre = doc! {"arr": [1, {"x": 1}, [1, 2], 4, 5], "short": [1, 2, 3], "grow": [1]};
        let got = diff(
            pre,
            doc! {"$v": 2, "diff": {
                "sarr": {"a": true, "u0": 10, "s1": {"u": {"x": 2}}, "s2": {"a": true, "u3": 9}, "u6": 7},
                "sshort": {"a": true, "l": 2, "u0": 0},
                "sgrow": {"a": true, "l": 3},
            }},
        )
        .unwrap();
        assert_same(
            got,
            doc! {
                "arr": [10, {"x": 2}, [1, 2, Bson::Null, 9], 4, 5, Bson::Null, 7],
                "short": [0, 2],
                "grow": [1, Bson::Null, Bson::Null],
            },
        );
    }

    /// Applied to a later version of the document (the dump read it after the update), as
    /// mongod's applier does: a sub-diff of a missing field does nothing, of a field whose
    /// type changed gives null; applying the same diff twice gives what once gives.
    #[test]
    fn doc_diff_on_a_later_version_converges() {
        let o = doc! {"$v": 2, "diff": {"u": {"a": 2}, "i": {"b": 1}, "sgone": {"u": {"x": 1}}, "styp": {"a": true, "u0": 1}, "ssub": {"a": true, "s0": {"u": {"k": 1}}}}};
        let got = diff(doc! {"typ": "now a string", "a": 1, "sub": [5]}, o.clone()).unwrap();
        assert_same(
            got,
            doc! {"typ": Bson::Null, "a": 2, "sub": [Bson::Null], "b": 1},
        );
        let once = diff(doc! {"a": 1, "typ": [0], "gone": {"x": 0}}, o.clone()).unwrap();
        let twice = diff(once.clone(), o).unwrap();
        assert_same(twice, once);
    }

    #[test]
    fn malformed_or_unknown_doc_diffs_are_refused() {
        for (d, what) in [
            (
                doc! {"u": {"a": 1}, "d": {"b": false}},
                "sections out of order",
            ),
            (doc! {"x": {"a": 1}}, "unknown section"),
            (doc! {"u": {"a": 1}, "i": {"a": 2}}, "a field twice"),
            (doc! {"u": 5}, "a section that is not a document"),
            (doc! {"sa": {"l": 1}}, "an array diff without a: true"),
            (
                doc! {"sa": {"a": true, "x1": 1}},
                "an array change that is not u or s",
            ),
            (
                doc! {"sa": {"a": true, "l": 1, "u3": 1}},
                "a change beyond the new length",
            ),
            (
                doc! {"sa": {"a": true, "u99999999999": 1}},
                "an absurd index",
            ),
            (doc! {}, "an empty diff"),
        ] {
            let pre = doc! {"a": [1, 2]};
            assert!(
                matches!(
                    diff(pre, doc! {"$v": 2, "diff": d.clone()}),
                    Err(DiffError::Malformed { .. })
                ),
                "{what}: {d}"
            );
        }
        assert_eq!(
            diff(
                doc! {"a": 1},
                doc! {"$v": 2, "diff": {"b": {"a": {"o": 0}}}}
            ),
            Err(DiffError::Unsupported(
                "a binary (b) diff section, written for time-series buckets".into()
            ))
        );
    }

    fn description(updated: Document, removed: Vec<&str>, truncated: Vec<Document>) -> Document {
        doc! {"$v": 2, "diff": {
            "updatedFields": updated,
            "removedFields": removed,
            "truncatedArrays": truncated,
        }}
    }

    /// SecantusDB's `updateDescription` diffs, as its oplog holds them for `$set` (fields
    /// in the update's order, new ones at the end), `$set` of a deep new path, `$unset`,
    /// `$push` (`arr.<i>`), `$set` past an array's end (nulls between), `$unset` of an
    /// element (null), `$rename` and positional updates.
    #[test]
    fn update_descriptions_set_unset_push_and_pad_like_the_server() {
        let pre = doc! {"_id": 1, "a": 1, "b": {"c": 1, "d": [1, 2, 3]}, "arr": [1, {"x": 1}, 3], "s": "x", "y": 2};
        let o = description(
            doc! {"z": 1, "a": 2, "b.d.3": 4, "arr.1.x": 9, "arr.5": 7, "new": {"deep": {"f": 1}}, "yy": 2},
            vec!["s", "y", "arr.0"],
            vec![],
        );
        assert_same(
            diff(pre, o).unwrap(),
            doc! {
                "_id": 1, "a": 2, "b": {"c": 1, "d": [1, 2, 3, 4]},
                "arr": [Bson::Null, {"x": 9}, 3, Bson::Null, Bson::Null, 7],
                "z": 1, "new": {"deep": {"f": 1}}, "yy": 2,
            },
        );
    }

    /// Dotted paths through missing documents create them; through arrays past their end
    /// pad with null and create a document; a numeric step under a document is a field
    /// name (`disambiguatedPaths` says so explicitly); `truncatedArrays` shrinks.
    #[test]
    fn update_descriptions_create_paths_disambiguate_and_truncate() {
        let pre = doc! {"m": {"1": "one"}, "list": [], "t": [1, 2, 3, 4], "n": {"arr": [[1, 2]]}};
        let o = doc! {"$v": 2, "diff": {
            "updatedFields": {"m.2": "two", "m.1": "uno", "list.2.c": 1, "x.y": 1, "n.arr.0.1": 20},
            "removedFields": [],
            "truncatedArrays": [{"field": "t", "newSize": 2}],
            "disambiguatedPaths": {"m.2": ["m", "2"], "m.1": ["m", "1"]},
        }};
        assert_same(
            diff(pre, o).unwrap(),
            doc! {
                "m": {"1": "uno", "2": "two"},
                "list": [Bson::Null, Bson::Null, {"c": 1}],
                "t": [1, 2],
                "n": {"arr": [[1, 20]]},
                "x": {"y": 1},
            },
        );
    }

    /// Applied to a later version: a path through a value of another type is skipped, a
    /// removed field already gone is nothing, and applying twice gives what once gives.
    #[test]
    fn update_descriptions_on_a_later_version_converge() {
        let o = description(
            doc! {"a.b": 1, "arr.3": 4, "c": 3},
            vec!["gone", "arr.9"],
            vec![doc! {"field": "missing", "newSize": 0}],
        );
        let got = diff(doc! {"a": 5, "arr": [1, 2, 3, 4, 5], "c": 1}, o.clone()).unwrap();
        assert_same(got.clone(), doc! {"a": 5, "arr": [1, 2, 3, 4, 5], "c": 3});
        assert_same(diff(got.clone(), o).unwrap(), got);
    }

    #[test]
    fn malformed_update_descriptions_are_refused() {
        for d in [
            doc! {"updatedFields": 1},
            doc! {"updatedFields": {}, "removedFields": [1]},
            doc! {"updatedFields": {}, "truncatedArrays": [{"field": "a"}]},
            doc! {"updatedFields": {}, "other": 1},
            doc! {"updatedFields": {"a.99999999999": 1}},
            doc! {"updatedFields": {"m.1": 1}, "disambiguatedPaths": {"m.1": [true]}},
        ] {
            assert!(
                matches!(
                    diff(doc! {"a": []}, doc! {"$v": 2, "diff": d.clone()}),
                    Err(DiffError::Malformed { .. })
                ),
                "{d}"
            );
        }
    }

    /// An update that found no document is settled by a later delete of it, or a drop of
    /// its collection, and follows a rename; otherwise it is left for the error.
    #[test]
    fn orphan_updates_need_a_later_delete_or_drop() {
        let mut o = Orphans::default();
        o.updated("app.a", &Bson::Int32(1), "first");
        o.updated("app.a", &Bson::Int32(1), "second");
        o.updated("app.a", &Bson::String("x".into()), "third");
        o.updated("app.b", &Bson::Int32(1), "fourth");
        assert_eq!(o.left().map(String::as_str), Some("first"));
        o.deleted("app.a", &Bson::Int32(1));
        assert_eq!(o.left().map(String::as_str), Some("third"));
        o.moved("app.a", Some("app.c"));
        o.deleted("app.a", &Bson::String("x".into()));
        assert_eq!(o.left().map(String::as_str), Some("fourth"));
        o.moved("app.b", None);
        assert_eq!(o.left().map(String::as_str), Some("third"));
        o.deleted("app.c", &Bson::String("x".into()));
        assert_eq!(o.left(), None);
    }

    #[test]
    fn entries_are_named_by_ts_op_and_ns() {
        let entry = doc! {"ts": bson::Timestamp { time: 1_700_000_000, increment: 7 }, "op": "c", "ns": "app.$cmd", "o": {"emptycapped": "x"}};
        assert_eq!(
            entry_name(&entry, None),
            "oplog entry ts Timestamp(1700000000, 7), op c, ns app.$cmd"
        );
        assert_eq!(
            entry_name(
                &doc! {"op": "i", "ns": "app.x"},
                Some("oplog entry ts T, op c, ns admin.$cmd")
            ),
            "operation op i, ns app.x of the applyOps in oplog entry ts T, op c, ns admin.$cmd"
        );
    }
}
