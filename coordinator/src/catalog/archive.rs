//! Continuous archiving's lag: how old the newest WAL segment archived for each datastore
//! is (PostgreSQL's `archive_command = 'ferry-agent wal-push %p'`, [`ferry_core::wal`]).
//!
//! The coordinator reads the primary target with its maintenance credentials
//! (`[maintenance]`): every `archive_scan_seconds` (60) it lists each production environment's
//! folder for `<datastore>-wal` folders and reads the record of the newest segment in each
//! ([`ferry_storage::wal::newest_segment_record`]). It reads the target rather than asking
//! the agents, so the lag keeps growing when the production agent (or its host) is down,
//! which is when it matters. `ferry status` shows it and `/metrics` exports
//! `ferry_archive_lag_seconds{environment, datastore}` (now minus the newest segment's
//! push time, seconds), for the alert `FerryArchiveBehind` (over 5 minutes for 5 minutes).
//! A scan that fails keeps the last values and says why.

use std::sync::{Arc, Mutex};

use ferry_core::wal::{MAX_WAL_RECORD_BYTES, WalRecord};
use ferry_storage::Target;

use crate::dispatch::Coordinator;

/// The newest archived WAL segment of one datastore, as last scanned.
#[derive(Clone, Debug, PartialEq)]
pub struct ArchiveStatus {
    /// Environment (production's).
    pub environment: String,
    /// Datastore whose WAL it is.
    pub datastore: String,
    /// The newest segment's file name (24 hex digits).
    pub newest_file: String,
    /// When it was pushed, UTC ms (its record's `pushed`).
    pub pushed_ms: i64,
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

/// One environment's archives on `target`: `(datastore, newest segment record)` for each
/// `<datastore>-wal` folder holding a segment, in name order.
///
/// # Errors
/// The target's, or a record that cannot be read (naming it).
fn scan_environment(
    target: &Arc<dyn Target>,
    environment: &str,
) -> Result<Vec<(String, WalRecord)>, String> {
    let env_dir = target.environment_dir(environment);
    let mut session = target.read().map_err(|e| e.to_string())?;
    let datastores = ferry_storage::wal::archived_datastores(&mut *session, &env_dir)
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for datastore in datastores {
        let dir = ferry_core::wal::wal_dir(&env_dir, &datastore);
        let found =
            ferry_storage::wal::newest_segment_record(&mut *session, &dir, MAX_WAL_RECORD_BYTES)
                .map_err(|e| e.to_string())?;
        if let Some((path, bytes)) = found {
            let record = WalRecord::from_slice(&path, &bytes).map_err(|e| e.to_string())?;
            out.push((datastore, record));
        }
    }
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
            let mut statuses = self.archives.statuses.lock().expect("archive status lock");
            match scanned {
                Ok(found) => {
                    statuses.retain(|s| s.environment != environment);
                    statuses.extend(found.into_iter().map(|(datastore, r)| ArchiveStatus {
                        environment: environment.clone(),
                        datastore,
                        newest_file: r.file,
                        pushed_ms: r.pushed.timestamp_millis(),
                        error: None,
                    }));
                    statuses.sort_by(|a, b| {
                        (&a.environment, &a.datastore).cmp(&(&b.environment, &b.datastore))
                    });
                }
                Err(e) => {
                    tracing::warn!(environment = %environment, error = %e,
                        "Could not scan the WAL archive; keeping the last values.");
                    for s in statuses.iter_mut().filter(|s| s.environment == environment) {
                        s.error = Some(e.clone());
                    }
                }
            }
        }
    }

    /// The last scan's newest archived segment of every datastore that archives WAL,
    /// by environment and datastore.
    pub fn archive_status(&self) -> Vec<ArchiveStatus> {
        self.archives
            .statuses
            .lock()
            .expect("archive status lock")
            .clone()
    }
}
