//! The layout and record of MongoDB oplog slices: what a production agent writes while it
//! tails a replica set's oplog (`local.oplog.rs`), what a staging agent replays onto a dump
//! for a restore to a point in time, and what the coordinator reads for the archive lag.
//!
//! A slice is stored as `<environment dir>/<datastore>-oplog/<from>-<to>.bson.zst.age`: the
//! oplog entries back to back as BSON documents (the shape of a `mongodump` `.bson` file,
//! which `bsondump` reads), compressed with zstd, encrypted with age. `<from>` and `<to>` are
//! [`slice_instant`]s (UTC, milliseconds): every entry of the chain written up to `<to>` is
//! in this slice or an earlier one. Beside it, `<name>.json` is its [`SliceRecord`].
//!
//! Slices form chains: each names the timestamp of the entry it continues from
//! ([`SliceRecord::after`]), the greatest of the previous slice ([`SliceRecord::upto`]). A
//! chain starts where the agent first read the oplog, and again after a gap (the oplog no
//! longer held the entry the chain had reached: it rolled over while the agent was down or
//! behind), with [`SliceRecord::chain_start`] saying why.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// [`SliceRecord::record_version`] of this build.
pub const SLICE_RECORD_VERSION: u32 = 1;

/// Suffix of a stored slice.
pub const SLICE_SUFFIX: &str = ".bson.zst.age";

/// A MongoDB oplog timestamp: seconds since the Unix epoch (`t`) and an ordinal within
/// that second (`i`), as `bson::Timestamp`. Ordered as the server orders them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OplogTs {
    /// Seconds since the Unix epoch, UTC.
    pub t: u32,
    /// Ordinal within the second.
    pub i: u32,
}

impl std::fmt::Display for OplogTs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Timestamp({}, {})", self.t, self.i)
    }
}

/// `<environment dir>/<datastore>-oplog`.
pub fn oplog_dir(environment_dir: &str, datastore: &str) -> String {
    format!(
        "{}/{datastore}-oplog",
        environment_dir.trim_end_matches('/')
    )
}

/// An instant as it appears in a slice's name: `YYYYMMDDTHHMMSS.mmmZ`, UTC, so that names
/// sort in time order.
pub fn slice_instant(at: DateTime<Utc>) -> String {
    at.format("%Y%m%dT%H%M%S%.3fZ").to_string()
}

/// The stored name of the slice from `from` to `to`: `<from>-<to>.bson.zst.age`.
pub fn slice_name(from: DateTime<Utc>, to: DateTime<Utc>) -> String {
    format!(
        "{}-{}{SLICE_SUFFIX}",
        slice_instant(from),
        slice_instant(to)
    )
}

/// The time range `(from, to)` (UTC) that a stored slice's data file name says it covers,
/// `None` for a name that is not one ([`slice_name`]'s shape, `from` not after `to`).
pub fn slice_range(name: &str) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let (from, to) = name.strip_suffix(SLICE_SUFFIX)?.split_once('-')?;
    let parse = |s: &str| {
        chrono::NaiveDateTime::parse_from_str(s, "%Y%m%dT%H%M%S%.3fZ")
            .ok()
            .map(|t| t.and_utc())
    };
    let (from, to) = (parse(from)?, parse(to)?);
    (from <= to).then_some((from, to))
}

/// Whether `name` (a file name in an oplog folder) is a stored slice's data file.
pub fn is_slice_name(name: &str) -> bool {
    slice_range(name).is_some()
}

/// The `.json` record beside each slice: its place in the chain, its entries and checksums.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SliceRecord {
    /// [`SLICE_RECORD_VERSION`].
    pub record_version: u32,
    /// The datastore.
    pub datastore: String,
    /// The production agent that wrote it.
    pub agent: String,
    /// That agent's host name.
    pub hostname: String,
    /// The environment.
    pub environment: String,
    /// The replica set's name.
    pub replica_set: String,
    /// Why a new chain starts here (the agent's first slice, or the gap before it), or
    /// `None` when this slice continues the previous one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_start: Option<String>,
    /// When this slice's chain started (its first slice's [`Self::from`]), UTC: a restore
    /// to a point in time with these slices starts from a dump made after it.
    pub chain_started: DateTime<Utc>,
    /// Whether the chain started after a gap (entries lost), not at the agent's first
    /// slice: the coordinator reports it until a dump is made after [`Self::chain_started`].
    pub chain_gap: bool,
    /// The entry this slice continues from: it holds every entry after it, up to
    /// [`Self::upto`]. `None` when the oplog was empty where the chain started.
    pub after: Option<OplogTs>,
    /// The greatest entry of the chain so far: [`Self::last`], or [`Self::after`] for a
    /// slice without entries. The next slice's `after`.
    pub upto: Option<OplogTs>,
    /// The first entry's timestamp, `None` without entries.
    pub first: Option<OplogTs>,
    /// The last entry's timestamp, `None` without entries.
    pub last: Option<OplogTs>,
    /// Start of the slice's time range, UTC: the previous slice's [`Self::to`], or when
    /// the chain started.
    pub from: DateTime<Utc>,
    /// End of the slice's time range, UTC: when the agent last read the oplog for it and
    /// found nothing newer. Every entry written by then is in the chain up to this slice;
    /// the newest instant a restore can reach.
    pub to: DateTime<Utc>,
    /// Entries.
    pub entries: u64,
    /// Bytes of the entries (BSON, back to back).
    pub bytes: u64,
    /// SHA-256 of those bytes, lower-case hex.
    pub sha256: String,
    /// Bytes stored (compressed, encrypted).
    pub bytes_stored: u64,
    /// SHA-256 of the stored bytes, lower-case hex.
    pub sha256_stored: String,
    /// `zst`.
    pub compression: String,
    /// `age`.
    pub encryption: String,
    /// Fingerprints of the age recipients it was encrypted to.
    pub recipients: Vec<String>,
    /// When it was written, UTC.
    pub written: DateTime<Utc>,
    /// On a target with versions (S3): the stored file's version, which a reader fetches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
}

/// A [`SliceRecord`] that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("oplog slice record {path} is not valid: {source}")]
pub struct SliceRecordError {
    /// Where it was read from.
    pub path: String,
    /// Why.
    #[source]
    pub source: serde_json::Error,
}

impl SliceRecord {
    /// The record as stored, pretty JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a slice record serialises")
    }

    /// Reads a record stored at `path` (for messages).
    ///
    /// # Errors
    /// [`SliceRecordError`] if it is not a record of this version's shape.
    pub fn from_slice(path: &str, bytes: &[u8]) -> Result<SliceRecord, SliceRecordError> {
        serde_json::from_slice(bytes).map_err(|source| SliceRecordError {
            path: path.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn slice_names_sort_in_time_order_and_parse_back() {
        let a = Utc.with_ymd_and_hms(2026, 12, 5, 9, 59, 59).unwrap();
        let b = a + chrono::Duration::milliseconds(1_250);
        let c = a + chrono::Duration::seconds(3_600);
        let ab = slice_name(a, b);
        let bc = slice_name(b, c);
        assert_eq!(ab, "20261205T095959.000Z-20261205T100000.250Z.bson.zst.age");
        assert!(ab < bc);
        assert!(is_slice_name(&ab) && is_slice_name(&bc));
        assert_eq!(slice_range(&ab), Some((a, b)));
        for bad in [
            "20261205T095959.000Z.bson.zst.age",
            "20261205T100000.250Z-20261205T095959.000Z.bson.zst.age",
            "x-y.bson.zst.age",
            "20261205T095959.000Z-20261205T100000.250Z.bson.zst.age.json",
            ".20261205T095959.000Z-20261205T100000.250Z.bson.zst.age.x.partial",
        ] {
            assert!(!is_slice_name(bad), "{bad}");
        }
    }

    #[test]
    fn timestamps_order_by_seconds_then_ordinal() {
        let a = OplogTs { t: 10, i: 5 };
        let b = OplogTs { t: 10, i: 6 };
        let c = OplogTs { t: 11, i: 1 };
        assert!(a < b && b < c);
        assert_eq!(a.to_string(), "Timestamp(10, 5)");
    }
}
