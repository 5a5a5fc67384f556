//! The layout of archived PostgreSQL WAL, and the strict check of the file names that
//! PostgreSQL's `archive_command` hands over (`%f`, the name part of `%p`):
//!
//! ```text
//! <root>/<environment>/<datastore>-wal/<timeline>/<file>.zst.age        the file, compressed, encrypted
//! <root>/<environment>/<datastore>-wal/<timeline>/<file>.zst.age.json   its record (WalRecord)
//! ```
//!
//! `<timeline>` is the file's own timeline, 8 upper-case hex digits (the first 8 of a
//! segment's name). The file names are PostgreSQL's own (PostgreSQL 15,
//! `src/include/access/xlog_internal.h`: `XLogFileName`, `TLHistoryFileName`,
//! `BackupHistoryFileName`, and the `.partial` suffix of a segment cut short by a
//! timeline switch); nothing else is accepted, so a name can never be a path.

use serde::{Deserialize, Serialize};

use crate::Bounded;

/// Version of [`WalRecord`]'s format.
pub const WAL_RECORD_VERSION: u32 = 1;

/// Largest [`WalRecord`] read back, bytes.
pub const MAX_WAL_RECORD_BYTES: u64 = 64 * 1024;

/// Largest file accepted from `archive_command`, bytes: 1 GiB, PostgreSQL's largest
/// `wal_segment_size`.
pub const MAX_WAL_FILE_BYTES: u64 = 1024 * 1024 * 1024;

/// What kind of file PostgreSQL archives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WalFileKind {
    /// A WAL segment, `TTTTTTTTXXXXXXXXYYYYYYYY` (24 upper-case hex digits).
    Segment,
    /// A segment cut short at a timeline switch, `<segment>.partial`.
    Partial,
    /// A backup history file, `<segment>.XXXXXXXX.backup`.
    Backup,
    /// A timeline history file, `TTTTTTTT.history`.
    History,
}

/// A validated name of a file PostgreSQL archives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalFileName {
    /// The name, as PostgreSQL gave it.
    pub name: String,
    /// What it is.
    pub kind: WalFileKind,
    /// Its timeline, 8 upper-case hex digits (the folder it is stored in).
    pub timeline: String,
}

/// A name that is not one of PostgreSQL's WAL archive file names.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0} is not a WAL file name PostgreSQL archives: expected a segment (24 upper-case hex \
     digits), <segment>.partial, <segment>.<8 hex>.backup or <8 hex>.history"
)]
pub struct WalNameError(
    /// The value, quoted, escaped and cut as [`Bounded`] shows it.
    pub String,
);

fn upper_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

impl WalFileName {
    /// Checks `name` strictly (see the module docs).
    ///
    /// # Errors
    /// [`WalNameError`] for anything else (a path, a lower-case or short name, a timeline
    /// 0).
    pub fn parse(name: &str) -> Result<WalFileName, WalNameError> {
        let err = || WalNameError(Bounded(name).to_string());
        let parts: Vec<&str> = name.split('.').collect();
        let kind = match parts.as_slice() {
            [seg] if upper_hex(seg, 24) => WalFileKind::Segment,
            [seg, "partial"] if upper_hex(seg, 24) => WalFileKind::Partial,
            [seg, off, "backup"] if upper_hex(seg, 24) && upper_hex(off, 8) => WalFileKind::Backup,
            [tli, "history"] if upper_hex(tli, 8) => WalFileKind::History,
            _ => return Err(err()),
        };
        let timeline = name[..8].to_owned();
        if timeline == "00000000" {
            return Err(err());
        }
        Ok(WalFileName {
            name: name.to_owned(),
            kind,
            timeline,
        })
    }

    /// The stored file's name, `<name>.zst.age`.
    pub fn stored_name(&self) -> String {
        format!("{}.zst.age", self.name)
    }
}

/// The WAL segment where recovery of a base backup begins: the file named on the
/// `START WAL LOCATION: 0/5000028 (file 000000010000000000000005)` line of its
/// `backup_label` (PostgreSQL's `do_pg_backup_stop`/`build_backup_content`,
/// src/backend/access/transam/xlogbackup.c). `None` without such a line.
pub fn backup_start_segment(backup_label: &str) -> Option<WalFileName> {
    let line = backup_label
        .lines()
        .find(|l| l.starts_with("START WAL LOCATION:"))?;
    let file = line.split("(file ").nth(1)?.strip_suffix(')')?;
    WalFileName::parse(file)
        .ok()
        .filter(|f| f.kind == WalFileKind::Segment)
}

impl WalFileName {
    /// The position of a segment, `.partial` or backup history file in the WAL (its 16 hex
    /// digits after the timeline, log then segment number; fixed width, upper case, so
    /// that positions compare as strings); `None` for a timeline history file, which has
    /// no position.
    pub fn position(&self) -> Option<&str> {
        match self.kind {
            WalFileKind::History => None,
            _ => self.name.get(8..24),
        }
    }
}

/// `<environment dir>/<datastore>-wal`: the folder of a datastore's archived WAL.
pub fn wal_dir(environment_dir: &str, datastore: &str) -> String {
    format!("{}/{datastore}-wal", environment_dir.trim_end_matches('/'))
}

/// `<environment dir>/<datastore>-wal/<timeline>`: where `file` is stored.
pub fn timeline_dir(environment_dir: &str, datastore: &str, file: &WalFileName) -> String {
    format!("{}/{}", wal_dir(environment_dir, datastore), file.timeline)
}

/// The `.json` record beside each archived WAL file: what a second push of the same name
/// is compared with (the SHA-256 of the plaintext: the ciphertext differs on every push,
/// age drawing a new file key each time), and what a restore checks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalRecord {
    /// [`WAL_RECORD_VERSION`].
    pub record_version: u32,
    /// The file's name as PostgreSQL gave it.
    pub file: String,
    /// What it is.
    pub kind: WalFileKind,
    /// Its timeline, 8 hex digits.
    pub timeline: String,
    /// The datastore.
    pub datastore: String,
    /// The production agent that pushed it.
    pub agent: String,
    /// That agent's host name.
    pub hostname: String,
    /// The environment.
    pub environment: String,
    /// When the push finished, UTC.
    pub pushed: chrono::DateTime<chrono::Utc>,
    /// Bytes of the file as PostgreSQL wrote it.
    pub bytes: u64,
    /// SHA-256 of the file as PostgreSQL wrote it, lower-case hex.
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
    /// On a target with versions (S3): the stored file's version, which a reader fetches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
}

/// A [`WalRecord`] that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("WAL record {path} is not valid: {source}")]
pub struct WalRecordError {
    /// Where it was read from.
    pub path: String,
    /// Why.
    #[source]
    pub source: serde_json::Error,
}

impl WalRecord {
    /// The record as stored, pretty JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a WAL record serialises")
    }

    /// Reads a record stored at `path` (for messages).
    ///
    /// # Errors
    /// [`WalRecordError`] if it is not a record of this version's shape.
    pub fn from_slice(path: &str, bytes: &[u8]) -> Result<WalRecord, WalRecordError> {
        serde_json::from_slice(bytes).map_err(|source| WalRecordError {
            path: path.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_archive_names_parse_with_their_timeline() {
        let seg = WalFileName::parse("000000010000000000000003").unwrap();
        assert_eq!(
            (seg.kind, seg.timeline.as_str()),
            (WalFileKind::Segment, "00000001")
        );
        assert_eq!(seg.stored_name(), "000000010000000000000003.zst.age");
        let cases = [
            (
                "000000020000000000000003.partial",
                WalFileKind::Partial,
                "00000002",
            ),
            (
                "00000001000000000000000A.00000028.backup",
                WalFileKind::Backup,
                "00000001",
            ),
            ("0000000A.history", WalFileKind::History, "0000000A"),
        ];
        for (name, kind, tli) in cases {
            let f = WalFileName::parse(name).unwrap();
            assert_eq!((f.kind, f.timeline.as_str()), (kind, tli), "{name}");
        }
    }

    #[test]
    fn anything_but_a_postgres_archive_name_is_refused() {
        for bad in [
            "",
            "../000000010000000000000003",
            "pg_wal/000000010000000000000003",
            "000000010000000000000003/",
            "00000001000000000000000a",
            "0000000100000000000000003",
            "00000001000000000000003",
            "000000000000000000000003",
            "00000000.history",
            "000000010000000000000003.partial.partial",
            "000000010000000000000003.backup",
            "00000001.history.json",
            "000000010000000000000003\0",
            "archive_status",
        ] {
            assert!(WalFileName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn paths_put_the_file_under_its_datastore_and_timeline() {
        let f = WalFileName::parse("000000020000000100000004").unwrap();
        assert_eq!(
            timeline_dir("/backups/production/", "pg", &f),
            "/backups/production/pg-wal/00000002"
        );
    }

    #[test]
    fn a_backup_label_names_where_recovery_begins() {
        let label = "START WAL LOCATION: 0/5000028 (file 000000010000000000000005)\n\
                     CHECKPOINT LOCATION: 0/5000060\nBACKUP METHOD: streamed\n";
        let start = backup_start_segment(label).unwrap();
        assert_eq!(start.name, "000000010000000000000005");
        assert_eq!(start.position(), Some("0000000000000005"));
        assert!(backup_start_segment("LABEL: x\n").is_none());
        let partial = WalFileName::parse("000000020000000100000002.partial").unwrap();
        assert_eq!(partial.position(), Some("0000000100000002"));
        assert!(partial.position().unwrap() > start.position().unwrap());
        assert_eq!(
            WalFileName::parse("00000002.history").unwrap().position(),
            None
        );
    }
}
