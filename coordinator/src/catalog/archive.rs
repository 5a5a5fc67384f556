//! Continuous archiving's lag: how old the newest WAL segment archived for each datastore
//! is (PostgreSQL's `archive_command = 'ferry-agent wal-push %p'`, [`ferry_core::wal`]), and
//! the newest MongoDB oplog slice ([`ferry_core::oplog`]).
//!
//! The coordinator reads the primary target with its maintenance credentials
//! (`[maintenance]`): every `archive_scan_seconds` (60) it lists each production environment's
//! folder for `<datastore>-wal` and `<datastore>-oplog` folders and reads the record of the
//! newest segment or slice in each ([`ferry_storage::wal::newest_segment_record`],
//! [`ferry_storage::oplog::newest_slice_record`]). A slice's instant is its `to` (every entry
//! written by then is archived); a chain of slices that started after a gap is reported
//! (`gap`, `ferry_archive_gap`) until a backup of the datastore finished after it started. It reads the target rather than asking
//! the agents, so the lag keeps growing when the production agent (or its host) is down,
//! which is when it matters. `ferry status` shows it and `/metrics` exports
//! `ferry_archive_lag_seconds{environment, datastore}` (now minus the newest segment's
//! push time, seconds), for the alert `FerryArchiveBehind` (over 5 minutes for 5 minutes).
//! A scan that fails keeps the last values and says why.

use std::sync::{Arc, Mutex};

use ferry_core::oplog::SliceRecord;
use ferry_core::wal::{MAX_WAL_RECORD_BYTES, WalRecord};
use ferry_storage::Target;

use crate::dispatch::Coordinator;

/// The newest archived WAL segment of one datastore, as last scanned.
#[derive(Clone, Debug, PartialEq)]
pub struct ArchiveStatus {
    /// Environment (production's).
    pub environment: String,
    /// Datastore whose WAL or oplog it is.
    pub datastore: String,
    /// `wal` or `oplog`.
    pub kind: &'static str,
    /// The newest segment's file name (24 hex digits), or the newest slice's.
    pub newest_file: String,
    /// When it was pushed, UTC ms (a segment record's `pushed`, a slice record's `to`).
    pub pushed_ms: i64,
    /// Oplog: when the newest chain of slices started after a gap, UTC ms, while no backup
    /// of the datastore has finished since: restores to an instant after the gap need one.
    pub gap_since_ms: Option<i64>,
    /// Why the last scan of the environment failed; `None` after a success.
    pub error: Option<String>,
}

impl ArchiveStatus {
    /// Now (`now_ms`, UTC ms) minus the newest segment's push time, seconds (0 if ahead).
    pub fn lag_seconds(&self, now_ms: i64) -> i64 {
        (now_ms - self.pushed_ms).max(0) / 1000
    }
}

/// The last scan's results, shared by the scanner and its readers.
#[derive(Default)]
pub struct Archives {
    statuses: Mutex<Vec<ArchiveStatus>>,
}

/// What one environment's archives on `target` hold: for each `<datastore>-wal` folder
/// with a segment, then each `<datastore>-oplog` folder with a slice, in name order, its
/// status (`gap_since_ms` from the slice's chain, whether or not a backup came since).
///
/// # Errors
/// The target's, or a record that cannot be read (naming it).
fn scan_environment(
    target: &Arc<dyn Target>,
    environment: &str,
) -> Result<Vec<ArchiveStatus>, String> {
    let env_dir = target.environment_dir(environment);
    let mut session = target.read().map_err(|e| e.to_string())?;
    let status = |datastore: String, kind, newest_file, pushed_ms, gap_since_ms| ArchiveStatus {
        environment: environment.to_owned(),
        datastore,
        kind,
        newest_file,
        pushed_ms,
        gap_since_ms,
        error: None,
    };
    let mut out = Vec::new();
    for datastore in ferry_storage::wal::archived_datastores(&mut *session, &env_dir)
        .map_err(|e| e.to_string())?
    {
        let dir = ferry_core::wal::wal_dir(&env_dir, &datastore);
        let found =
            ferry_storage::wal::newest_segment_record(&mut *session, &dir, MAX_WAL_RECORD_BYTES)
                .map_err(|e| e.to_string())?;
        if let Some((path, bytes)) = found {
            let r = WalRecord::from_slice(&path, &bytes).map_err(|e| e.to_string())?;
            out.push(status(
                datastore,
                "wal",
                r.file,
                r.pushed.timestamp_millis(),
                None,
            ));
        }
    }
    for datastore in ferry_storage::oplog::archived_datastores(&mut *session, &env_dir)
        .map_err(|e| e.to_string())?
    {
        let dir = ferry_core::oplog::oplog_dir(&env_dir, &datastore);
        let found =
            ferry_storage::oplog::newest_slice_record(&mut *session, &dir, MAX_WAL_RECORD_BYTES)
                .map_err(|e| e.to_string())?;
        if let Some((path, bytes)) = found {
            let r = SliceRecord::from_slice(&path, &bytes).map_err(|e| e.to_string())?;
            let name = path
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .trim_end_matches(".json")
                .to_owned();
            let gap = r.chain_gap.then(|| r.chain_started.timestamp_millis());
            out.push(status(
                datastore,
                "oplog",
                name,
                r.to.timestamp_millis(),
                gap,
            ));
        }
    }
    out.sort_by(|a, b| a.datastore.cmp(&b.datastore));
    Ok(out)
}

impl Coordinator {
    /// The archive scanner: scans at start and every `archive_scan_seconds` until
    /// shutdown; nothing without `[maintenance]`.
    pub async fn run_archive_scans(self: Arc<Self>) {
        let Some(target) = self.settings.maintenance.clone() else {
            return;
        };
        loop {
            self.scan_archives(&target).await;
            tokio::select! {
                _ = tokio::time::sleep(self.settings.archive_scan) => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    /// One scan of every production environment's archives on `target`.
    pub async fn scan_archives(&self, target: &Arc<dyn Target>) {
        for environment in self.production_environments() {
            let (t, env) = (target.clone(), environment.clone());
            let scanned = tokio::task::spawn_blocking(move || scan_environment(&t, &env))
                .await
                .unwrap_or_else(|e| Err(format!("the scan failed: {e}")));
            let backups = match &scanned {
                Ok(found) if found.iter().any(|s| s.gap_since_ms.is_some()) => {
                    self.backups(Some(&environment)).await.unwrap_or_default()
                }
                _ => Vec::new(),
            };
            let mut statuses = self.archives.statuses.lock().expect("archive status lock");
            match scanned {
                Ok(mut found) => {
                    // A gap is behind once a backup of the datastore finished after it.
                    for s in found.iter_mut() {
                        if let Some(since) = s.gap_since_ms
                            && backups
                                .iter()
                                .any(|b| b.datastore == s.datastore && b.finished_ms > since)
                        {
                            s.gap_since_ms = None;
                        }
                    }
                    statuses.retain(|s| s.environment != environment);
                    statuses.extend(found);
                    statuses.sort_by(|a, b| {
                        (&a.environment, &a.datastore).cmp(&(&b.environment, &b.datastore))
                    });
                }
                Err(e) => {
                    tracing::warn!(environment = %environment, error = %e,
                        "Could not scan the WAL and oplog archive; keeping the last values.");
                    for s in statuses.iter_mut().filter(|s| s.environment == environment) {
                        s.error = Some(e.clone());
                    }
                }
            }
        }
    }

    /// The last scan's newest archived segment or slice of every datastore that archives
    /// WAL or its oplog, by environment and datastore.
    pub fn archive_status(&self) -> Vec<ArchiveStatus> {
        self.archives
            .statuses
            .lock()
            .expect("archive status lock")
            .clone()
    }
}
