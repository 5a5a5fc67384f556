//! The backup side of `method = "physical"`: a base backup of the whole cluster with
//! `pg_basebackup --pgdata=- --format=tar --wal-method=fetch --checkpoint=fast`, one tar
//! stream on its stdout, stored as `<name>_backup_<date>.tar.zst.age`.
//!
//! What `pg_basebackup` to stdout can and cannot do (PostgreSQL 15, checked with its
//! binary):
//! - It writes one tar only, so a cluster with tablespaces beyond `pg_default` and
//!   `pg_global` cannot go to stdout ("can only write single tablespace to stdout"). The
//!   agent lists them before it starts and refuses the backup naming each (name and
//!   location); nothing is uploaded. Move their objects to `pg_default` (`ALTER TABLE ...
//!   SET TABLESPACE pg_default`) and drop them, or back the cluster up with `method =
//!   "dump"` or `kind = "pgbackrest"`.
//! - `--wal-method=stream` is refused with `--pgdata=-` ("cannot stream write-ahead logs
//!   in tar mode to stdout"). So the WAL the backup needs to be consistent is fetched at its
//!   end (`--wal-method=fetch`) into `pg_wal/` of the same tar, and the backup restores
//!   alone, with no WAL archive. The segments written during the backup must still be on
//!   the server when it ends: set `wal_keep_size` to more than the WAL written during a
//!   backup, or the backup fails ("requested WAL segment ... has already been removed") and
//!   nothing is stored. A replication slot cannot hold them: `--slot` needs `stream`.
//! - `--checkpoint=fast`: the backup starts at once rather than after a spread checkpoint.
//!
//! The manifest's counts ([`BaseBackupInfo`]) come from the stream itself, read as it
//! passes on its way to compression (a copy of the bytes through a pipe into a tar reader
//! on a thread of its own; memory stays bounded): the start WAL location, checkpoint
//! location, start time, label and timeline from `backup_label`; the stop LSN and timeline
//! from the `WAL-Ranges` of `backup_manifest` (PostgreSQL's backup manifest, last entry of
//! the tar); the system identifier from `global/pg_control`. The server version comes from
//! the server (`server_version`).

use std::io::{self, Read, Write};

use futures::FutureExt;
use serde::{Deserialize, Serialize};

use super::{Postgres, quote_ident};
use crate::datastore::{DumpError, DumpOutcome, DumpStream, describe_status};
use ferry_core::manifest::Source;

/// Largest `backup_label` read from the stream, bytes (PostgreSQL writes about 250).
const MAX_LABEL_BYTES: u64 = 64 * 1024;

/// A physical base backup as its manifest's `counts` records it (JSON, the field names
/// below). LSNs are written as PostgreSQL prints them (`0/2000028`: the high and low 32
/// bits in hexadecimal).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseBackupInfo {
    /// Always `physical`.
    pub method: String,
    /// The cluster's system identifier (`pg_controldata`'s "Database system identifier"),
    /// in decimal: a string, as JSON readers lose the low digits of numbers above 2^53.
    pub system_identifier: String,
    /// The timeline of the backup (`backup_manifest`'s WAL range).
    pub timeline: u32,
    /// `START WAL LOCATION` of `backup_label`: where recovery of this backup begins.
    pub start_lsn: String,
    /// The `End-LSN` of `backup_manifest`'s WAL range: the restored cluster is consistent
    /// once recovery has replayed up to it.
    pub stop_lsn: String,
    /// `CHECKPOINT LOCATION` of `backup_label`.
    pub checkpoint_lsn: String,
    /// `START TIME` of `backup_label`, as PostgreSQL wrote it (server time zone).
    pub start_time: String,
    /// `LABEL` of `backup_label`.
    pub label: String,
    /// The whole `backup_label` file.
    pub backup_label: String,
    /// `Manifest-Checksum` of `backup_manifest` (SHA-256, hexadecimal): the manifest that
    /// `pg_verifybackup` checks the restored files against.
    pub manifest_checksum: String,
    /// How the WAL needed for consistency is kept: `included` (`--wal-method=fetch`, in
    /// `pg_wal/` of the tar).
    pub wal: String,
}

/// What the tar reader found in the stream.
#[derive(Debug, Default)]
struct Scanned {
    label: Option<String>,
    manifest: Option<BackupManifest>,
    system_identifier: Option<u64>,
}

/// The parts of PostgreSQL's `backup_manifest` (JSON, "PostgreSQL-Backup-Manifest-Version"
/// 1, <https://www.postgresql.org/docs/15/backup-manifest-format.html>) the manifest
/// records; `Files` is read past without being kept.
#[derive(Debug, Deserialize)]
struct BackupManifest {
    #[serde(rename = "WAL-Ranges")]
    wal_ranges: Vec<WalRange>,
    #[serde(rename = "Manifest-Checksum")]
    checksum: String,
}

#[derive(Debug, Deserialize)]
struct WalRange {
    #[serde(rename = "Timeline")]
    timeline: u32,
    #[serde(rename = "Start-LSN")]
    start: String,
    #[serde(rename = "End-LSN")]
    end: String,
}

/// A reader that copies what it reads into `copy` (the tar reader's pipe), and closes the
/// pipe at the end of the stream or when it is dropped. If the tar reader has gone, the
/// stream goes on uncopied (the finish reports the reader's error).
struct Tap<R> {
    inner: R,
    copy: Option<io::PipeWriter>,
}

impl<R: Read> Read for Tap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 {
            self.copy = None;
        } else if let Some(w) = &mut self.copy
            && w.write_all(&buf[..n]).is_err()
        {
            self.copy = None;
        }
        Ok(n)
    }
}

/// Reads the tar stream `input` to its end and keeps `backup_label`, the WAL ranges of
/// `backup_manifest` and the system identifier of `global/pg_control`.
fn scan(input: impl Read) -> io::Result<Scanned> {
    let mut archive = tar::Archive::new(io::BufReader::with_capacity(1 << 20, input));
    let mut found = Scanned::default();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        match path.trim_start_matches("./") {
            "backup_label" => {
                let mut text = String::new();
                entry
                    .by_ref()
                    .take(MAX_LABEL_BYTES)
                    .read_to_string(&mut text)?;
                found.label = Some(text);
            }
            "backup_manifest" => {
                let m: BackupManifest = serde_json::from_reader(io::BufReader::new(&mut entry))
                    .map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("backup_manifest: {e}"))
                    })?;
                found.manifest = Some(m);
            }
            "global/pg_control" => {
                // ControlFileData begins with `uint64 system_identifier`, in the server's
                // byte order (src/include/catalog/pg_control.h).
                let mut id = [0u8; 8];
                entry.read_exact(&mut id)?;
                found.system_identifier = Some(u64::from_ne_bytes(id));
            }
            _ => {}
        }
    }
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink())?;
    Ok(found)
}

/// The value of `KEY: value` in `backup_label` text.
fn label_field<'a>(label: &'a str, key: &str) -> Option<&'a str> {
    label
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))
        .map(str::trim)
}

/// Builds the manifest's record from what the stream held.
///
/// # Errors
/// A sentence naming what is missing or inconsistent.
fn info(found: Scanned) -> Result<BaseBackupInfo, String> {
    let label = found
        .label
        .ok_or("the pg_basebackup stream has no backup_label")?;
    let manifest = found
        .manifest
        .ok_or("the pg_basebackup stream has no backup_manifest")?;
    let system_identifier = found
        .system_identifier
        .ok_or("the pg_basebackup stream has no global/pg_control")?;
    let field = |key: &str| {
        label_field(&label, key)
            .map(str::to_owned)
            .ok_or_else(|| format!("backup_label has no {key:?} line: {label:?}"))
    };
    let start = field("START WAL LOCATION")?;
    let start_lsn = start
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let (first, last) = match (manifest.wal_ranges.first(), manifest.wal_ranges.last()) {
        (Some(f), Some(l)) => (f, l),
        _ => return Err("backup_manifest has no WAL range".into()),
    };
    if first.start != start_lsn {
        return Err(format!(
            "backup_label starts at {start_lsn} but backup_manifest's WAL range at {}",
            first.start
        ));
    }
    let timeline: u32 = field("START TIMELINE")?
        .parse()
        .map_err(|e| format!("backup_label START TIMELINE: {e}"))?;
    if last.timeline != timeline {
        return Err(format!(
            "backup_label is on timeline {timeline} but backup_manifest ends on timeline {}",
            last.timeline
        ));
    }
    Ok(BaseBackupInfo {
        method: "physical".into(),
        system_identifier: system_identifier.to_string(),
        timeline,
        start_lsn,
        stop_lsn: last.end.clone(),
        checkpoint_lsn: field("CHECKPOINT LOCATION")?,
        start_time: field("START TIME")?,
        label: field("LABEL")?,
        manifest_checksum: manifest.checksum,
        backup_label: label,
        wal: "included".into(),
    })
}

impl Postgres {
    /// The tablespaces other than `pg_default` and `pg_global`, as `name (location)`.
    async fn extra_tablespaces(
        client: &tokio_postgres::Client,
    ) -> Result<Vec<String>, tokio_postgres::Error> {
        Ok(client
            .query(
                "SELECT spcname, pg_catalog.pg_tablespace_location(oid) FROM pg_catalog.pg_tablespace \
                 WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY 1",
                &[],
            )
            .await?
            .iter()
            .map(|r| {
                let (name, location): (String, String) = (r.get(0), r.get(1));
                format!("{} ({location})", quote_ident(&name))
            })
            .collect())
    }

    /// Why the cluster `client` is connected to cannot be backed up physically through
    /// Ferry's stream, `None` if it can: tablespaces besides `pg_default` and `pg_global`
    /// (named with their locations), or a role without `REPLICATION`. Checked before each
    /// backup and by `ferry-agent check`.
    ///
    /// # Errors
    /// The catalog query failed.
    pub(super) async fn physical_refusal(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<Option<String>, tokio_postgres::Error> {
        let extra = Self::extra_tablespaces(client).await?;
        if !extra.is_empty() {
            return Ok(Some(format!(
                "PostgreSQL {}:{} has tablespaces besides pg_default and pg_global: {}. \
                 pg_basebackup writes only one tablespace to stdout, so a physical backup streamed by Ferry cannot hold them; \
                 move their tables and indexes to pg_default (ALTER TABLE ... SET TABLESPACE pg_default) and drop them, \
                 or back this cluster up with method = \"dump\" or kind = \"pgbackrest\"",
                self.cfg.host,
                self.cfg.port,
                extra.join(", ")
            )));
        }
        let may: bool = client
            .query_one(
                "SELECT rolreplication OR rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user",
                &[],
            )
            .await?
            .get(0);
        Ok((!may).then(|| {
            format!(
                "role {:?} may not run pg_basebackup on PostgreSQL {}:{}: give it the REPLICATION attribute \
                 (ALTER ROLE {} REPLICATION) and a \"replication\" line in pg_hba.conf",
                self.cfg.user,
                self.cfg.host,
                self.cfg.port,
                quote_ident(&self.cfg.user)
            )
        }))
    }

    /// Starts `pg_basebackup` of the whole cluster to stdout (see the module docs), after
    /// refusing a cluster it cannot back up ([`Postgres::physical_refusal`]).
    pub(super) async fn dump_base(&self) -> Result<DumpStream, DumpError> {
        let db = &self.cfg.maintenance_database;
        let client = self
            .connect(db)
            .await
            .map_err(|e| DumpError::Source(e.to_string()))?;
        let q = |e: tokio_postgres::Error| {
            DumpError::Source(format!(
                "PostgreSQL {}:{}: {e}",
                self.cfg.host, self.cfg.port
            ))
        };
        let server_version: String = client
            .query_one("SELECT current_setting('server_version')", &[])
            .await
            .map_err(q)?
            .get(0);
        let refusal = self.physical_refusal(&client).await.map_err(q)?;
        drop(client);
        if let Some(why) = refusal {
            return Err(DumpError::Source(format!("{why}. Nothing was backed up")));
        }
        let mut cmd = self.command("pg_basebackup");
        cmd.args([
            "--pgdata=-",
            "--format=tar",
            "--wal-method=fetch",
            "--checkpoint=fast",
        ])
        .arg(format!("--label=ferry-agent {}", self.cfg.name));
        let (mut child, stdout, tail) =
            self.spawn(cmd, "pg_basebackup", false)
                .map_err(|source| DumpError::Spawn {
                    tool: "pg_basebackup".into(),
                    source,
                })?;
        let (pipe_out, pipe_in) =
            io::pipe().map_err(|e| DumpError::Source(format!("cannot make a pipe: {e}")))?;
        let scanner = tokio::task::spawn_blocking(move || scan(pipe_out));
        let tool_version = self.tools.version("pg_basebackup");
        let finish = async move {
            let status = child
                .wait()
                .await
                .map_err(|e| DumpError::Source(format!("waiting for pg_basebackup: {e}")))?;
            tail.wait();
            if !status.success() {
                return Err(DumpError::Tool {
                    tool: "pg_basebackup".into(),
                    status: describe_status(status),
                    stderr: tail.text(),
                });
            }
            let found = scanner
                .await
                .map_err(|e| DumpError::Source(format!("reading the base backup's tar: {e}")))?
                .map_err(|e| DumpError::Source(format!("reading the base backup's tar: {e}")))?;
            let info = info(found).map_err(DumpError::Source)?;
            let summary = format!(
                "base backup of system {} on timeline {}, WAL {} to {} included",
                info.system_identifier, info.timeline, info.start_lsn, info.stop_lsn
            );
            Ok(DumpOutcome {
                source: Source {
                    tool: "pg_basebackup".into(),
                    tool_version,
                    server_version,
                },
                counts: serde_json::to_value(&info).unwrap_or_default(),
                summary,
            })
        };
        Ok(DumpStream {
            reader: Box::new(Tap {
                inner: stdout,
                copy: Some(pipe_in),
            }),
            finish: finish.boxed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `backup_label` PostgreSQL 15's pg_basebackup wrote here.
    const LABEL: &str = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
        CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\n\
        START TIME: 2026-12-05 04:23:34 UTC\nLABEL: pg_basebackup base backup\nSTART TIMELINE: 1\n";

    const MANIFEST: &str = "{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n\
        { \"Path\": \"backup_label\", \"Size\": 225, \"Last-Modified\": \"2026-12-05 04:23:34 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"4baa9caa\" }\n],\n\
        \"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/2000028\", \"End-LSN\": \"0/2000100\" }\n],\n\
        \"Manifest-Checksum\": \"9517c4f78eaaa0e2b09418c05c7ed371b0820154bdf08a5b9457421048241424\"}\n";

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn the_manifest_record_comes_from_label_manifest_and_control_file() {
        let mut control = 7_715_670_861_050_199_422u64.to_ne_bytes().to_vec();
        control.extend_from_slice(&[0; 100]);
        let tar = tar_of(&[
            ("backup_label", LABEL.as_bytes()),
            ("base/1/1259", &[7; 3000]),
            ("global/pg_control", &control),
            ("backup_manifest", MANIFEST.as_bytes()),
        ]);
        let info = info(scan(tar.as_slice()).unwrap()).unwrap();
        assert_eq!(info.system_identifier, "7715670861050199422");
        assert_eq!(info.timeline, 1);
        assert_eq!(info.start_lsn, "0/2000028");
        assert_eq!(info.stop_lsn, "0/2000100");
        assert_eq!(info.checkpoint_lsn, "0/2000060");
        assert_eq!(info.start_time, "2026-12-05 04:23:34 UTC");
        assert_eq!(info.label, "pg_basebackup base backup");
        assert_eq!(info.backup_label, LABEL);
        assert!(info.manifest_checksum.starts_with("9517c4f7"));
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(
            serde_json::from_value::<BaseBackupInfo>(json).unwrap(),
            info
        );
    }

    #[test]
    fn a_stream_without_its_manifest_or_label_is_refused_by_name() {
        let tar = tar_of(&[("backup_label", LABEL.as_bytes())]);
        let e = info(scan(tar.as_slice()).unwrap()).unwrap_err();
        assert!(e.contains("no backup_manifest"), "{e}");
        let e = info(Scanned::default()).unwrap_err();
        assert!(e.contains("no backup_label"), "{e}");
    }

    #[test]
    fn the_tap_copies_every_byte_and_closes_its_pipe_at_the_end() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (mut out, pipe_in) = io::pipe().unwrap();
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            out.read_to_end(&mut v).unwrap();
            v
        });
        let mut tap = Tap {
            inner: data.as_slice(),
            copy: Some(pipe_in),
        };
        let mut seen = Vec::new();
        tap.read_to_end(&mut seen).unwrap();
        assert_eq!(seen, data);
        assert_eq!(
            reader.join().unwrap(),
            data,
            "the pipe saw every byte and its end"
        );
    }
}
