//! Copies (3-2-1): every dated archive of an environment with `copy_to` is copied from the
//! primary (`[maintenance]`) to each of its copy targets (`[copies.<name>]`) by the
//! coordinator, with its maintenance credentials on both sides.
//!
//! A copy streams the stored ciphertext: it is never decrypted (the coordinator holds no
//! identity). Each file of the backup (its companions, then the main archive) is read
//! from the primary (the version its manifest names), hashed as it streams into a write
//! session of the copy target, and committed only if its SHA-256 and size equal its
//! manifest's; the manifests go last, the main archive's at the very end, as a backup
//! does, so a reader of the copy target never takes a half-copied backup for one. On a
//! copy target with Object Lock the copied folder is locked like the primary's (date +
//! `keep_daily`), and `ferry prune` extends and removes there too.
//!
//! The copier ([`Coordinator::run_copies`]) runs at start, after each backup the catalog
//! records, and every [`COPY_INTERVAL`]: for each environment and copy target, the
//! backups it lacks, newest first, one at a time; then the archived WAL and oplog slices
//! it lacks ([`copy_archives`]), each checked against its record. What it did is recorded on the catalog
//! record ([`crate::model::BackupRecord::copies`]); what it could not do, in
//! [`CopyProgress::last_error`], shown by `ferry status` and `/metrics`
//! (`ferry_copy_lag_seconds`, alert `FerryCopyBehind` past 26 h).

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::NaiveDate;
use ferry_core::layout::StoredFile;
use ferry_core::manifest::{MAX_MANIFEST_BYTES, Manifest};
use ferry_storage::{Staged, Target, TargetError};
use sha2::{Digest, Sha256};

use crate::dispatch::Coordinator;
use crate::model::{BackupRecord, CopyNote};
use crate::store::blocking;

/// How often the copier looks for backups a copy target lacks, besides after each backup.
pub const COPY_INTERVAL: Duration = Duration::from_secs(600);

/// Why one backup could not be copied.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Reading the primary or writing the copy target failed.
    #[error("{doing}: {source}")]
    Target {
        /// What was being done, e.g. `reading production/2026-12-05/x.age from primary`.
        doing: String,
        /// The target's error.
        #[source]
        source: TargetError,
    },
    /// A manifest on the primary does not read, or does not describe its file.
    #[error("{0}")]
    Manifest(String),
    /// The bytes read are not those the manifest describes: nothing was committed.
    #[error(
        "{path}: read {size} bytes with SHA-256 {sha256} from the primary, its manifest says \
         {expected_size} bytes with {expected_sha256}; nothing was committed on the copy target"
    )]
    Integrity {
        /// The file.
        path: String,
        /// Bytes read.
        size: u64,
        /// Their SHA-256, lower-case hex.
        sha256: String,
        /// The manifest's size.
        expected_size: u64,
        /// The manifest's SHA-256.
        expected_sha256: String,
    },
    /// The coordinator is shutting down: the copy stopped, nothing was committed.
    #[error(
        "the copy stopped as the coordinator shuts down; nothing was committed on the copy target"
    )]
    Cancelled,
}

/// What the copier knows of one environment's copy target since the coordinator started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CopyProgress {
    /// When the newest copy to it was committed, UTC ms.
    pub last_copy_ms: Option<i64>,
    /// The newest copy's error; `None` after a success.
    pub last_error: Option<String>,
}

/// The copier's shared state: its wake-up, and each `(environment, target)`'s progress.
#[derive(Default)]
pub struct Copier {
    wake: tokio::sync::Notify,
    progress: Mutex<BTreeMap<(String, String), CopyProgress>>,
}

impl Copier {
    /// Asks the copier to look for backups to copy now (after a backup was recorded).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The progress of `environment`'s copy target `target`.
    pub fn progress(&self, environment: &str, target: &str) -> CopyProgress {
        self.progress
            .lock()
            .expect("copy progress lock")
            .get(&(environment.to_owned(), target.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    fn set(&self, environment: &str, target: &str, f: impl FnOnce(&mut CopyProgress)) {
        let mut map = self.progress.lock().expect("copy progress lock");
        f(map
            .entry((environment.to_owned(), target.to_owned()))
            .or_default());
    }
}

/// One copy target's state for `ferry status` and `/metrics`.
#[derive(Clone, Debug, PartialEq)]
pub struct CopyStatus {
    /// Environment.
    pub environment: String,
    /// Copy target's name.
    pub target: String,
    /// Dated archives in the catalog it lacks.
    pub lacking: u32,
    /// Age of the oldest backup it lacks, seconds (0 when it lacks none).
    pub lag_seconds: i64,
    /// Progress since the coordinator started.
    pub progress: CopyProgress,
}

/// The backups of `records` that `target` lacks (dated archives only: differential
/// repositories are not copied), newest first.
pub fn lacking<'a>(records: &'a [BackupRecord], target: &str) -> Vec<&'a BackupRecord> {
    let mut out: Vec<&BackupRecord> = records
        .iter()
        .filter(|r| r.is_archive() && !r.copies.iter().any(|c| c.target == target))
        .collect();
    out.sort_by_key(|r| std::cmp::Reverse(r.finished_ms));
    out
}

/// The lag of a copy target lacking `lacking` at `now_ms`: the age of the oldest backup
/// it lacks, seconds; 0 when it lacks none.
pub fn lag_seconds(lacking: &[&BackupRecord], now_ms: i64) -> i64 {
    lacking
        .iter()
        .map(|r| r.finished_ms)
        .min()
        .map_or(0, |oldest| ((now_ms - oldest) / 1000).max(0))
}

/// A file's name in its dated folder: the last component of a stored path.
fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// What [`copy_backup`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copied {
    /// Bytes copied; 0 when the backup was already on the copy target.
    pub bytes: u64,
    /// When the copy was committed (UTC ms), as its manifests on the copy target say
    /// (`copied`); for a backup found there, its manifest's, else now.
    pub at_ms: i64,
}

/// Copies the backup whose main archive is `file` in `environment`'s folder of `date`
/// from `source` to `dest`: each file streamed and checked against its manifest's SHA-256
/// and size before anything is committed, then committed with its manifest (the version
/// id of the source removed: the copy target records its own; `copied` set to the time of
/// the commit), the main part last. A backup already on `dest` (its main manifest there)
/// is not copied again (`bytes` 0).
///
/// Once `cancel` is cancelled (the coordinator's shutdown) the copy stops within a chunk
/// (1 MiB) and nothing is committed.
///
/// # Errors
/// [`CopyError`]; nothing is left visible on `dest` (its partials abandoned).
pub fn copy_backup(
    source: &dyn Target,
    dest: &dyn Target,
    (environment, date, file): (&str, NaiveDate, &str),
    job_id: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Copied, CopyError> {
    let src_dir = source.dated_dir(environment, date);
    let dst_dir = dest.dated_dir(environment, date);
    let on = |what: &str, t: &dyn Target| format!("{what} ({})", t.describe());
    let mut read = source.read().map_err(|e| CopyError::Target {
        doing: on("opening the primary", source),
        source: e,
    })?;
    let read_manifest = |read: &mut Box<dyn ferry_storage::ReadSession>,
                         name: &str|
     -> Result<Manifest, CopyError> {
        let path = format!("{src_dir}/{name}.json");
        let bytes = read
            .read_small(&path, MAX_MANIFEST_BYTES)
            .map_err(|e| CopyError::Target {
                doing: format!("reading {path} on the primary"),
                source: e,
            })?;
        let m =
            Manifest::from_slice(&path, &bytes).map_err(|e| CopyError::Manifest(e.to_string()))?;
        if m.file != name {
            return Err(CopyError::Manifest(format!(
                "{path} describes {}, not {name}",
                ferry_core::Bounded(&m.file)
            )));
        }
        Ok(m)
    };
    let main = read_manifest(&mut read, file)?;
    // Already there (an earlier copy whose record was lost): nothing to do.
    {
        let mut dst_read = dest.read().map_err(|e| CopyError::Target {
            doing: on("opening the copy target", dest),
            source: e,
        })?;
        let there_path = format!("{dst_dir}/{file}.json");
        let there = dst_read.size(&there_path).map_err(|e| CopyError::Target {
            doing: format!("looking for {there_path} on the copy target"),
            source: e,
        })?;
        if there.is_some() {
            // The same backup (an earlier copy whose record was lost), or another that took
            // its name (two backups of one second on a target whose writers cannot look):
            // that one is never taken for this one.
            let bytes = dst_read
                .read_small(&there_path, MAX_MANIFEST_BYTES)
                .map_err(|e| CopyError::Target {
                    doing: format!("reading {there_path} on the copy target"),
                    source: e,
                })?;
            let there = Manifest::from_slice(&there_path, &bytes)
                .map_err(|e| CopyError::Manifest(e.to_string()))?;
            if there.sha256 != main.sha256 {
                return Err(CopyError::Manifest(format!(
                    "{there_path} on the copy target describes another backup of that name \
                     (SHA-256 {}, this one's {}); it is not copied over",
                    ferry_core::Bounded(&there.sha256),
                    main.sha256
                )));
            }
            let at_ms = there
                .copied
                .map_or_else(ferry_proto::now_unix_ms, |t| t.timestamp_millis());
            return Ok(Copied { bytes: 0, at_ms });
        }
    }
    // Whole milliseconds: the catalog keeps milliseconds, and a rebuilt catalog reads them
    // back from the manifests.
    let at_ms = ferry_proto::now_unix_ms();
    let copied_at = chrono::DateTime::from_timestamp_millis(at_ms).unwrap_or_default();
    let mut parts: Vec<(String, Manifest)> = Vec::new();
    for companion in &main.companions {
        parts.push((companion.clone(), read_manifest(&mut read, companion)?));
    }
    parts.push((file.to_owned(), main));

    let mut write = dest.write().map_err(|e| CopyError::Target {
        doing: on("opening the copy target", dest),
        source: e,
    })?;
    let mut staged: Vec<(Staged, Vec<u8>)> = Vec::new();
    let mut copied = 0u64;
    let abandon = |write: &mut Box<dyn ferry_storage::WriteSession>,
                   staged: &[(Staged, Vec<u8>)]| {
        let partials: Vec<String> = staged.iter().map(|(s, _)| s.partial.clone()).collect();
        write.abandon(&partials);
    };
    for (name, manifest) in &parts {
        let path = format!("{src_dir}/{name}");
        let stored = StoredFile {
            dir: dst_dir.clone(),
            name: name.clone(),
        };
        let version = manifest.version_id.as_deref();
        let streamed = stream_file(
            (source, &mut read),
            &mut write,
            (&path, version),
            &stored,
            job_id,
            cancel,
        );
        let (part, sha256, size) = match streamed {
            Ok(s) => s,
            Err(e) => {
                abandon(&mut write, &staged);
                return Err(e);
            }
        };
        if sha256 != manifest.sha256 || size != manifest.bytes_stored {
            abandon(&mut write, &staged);
            write.abandon(&[part.partial]);
            return Err(CopyError::Integrity {
                path,
                size,
                sha256,
                expected_size: manifest.bytes_stored,
                expected_sha256: manifest.sha256.clone(),
            });
        }
        copied += size;
        let mut m = manifest.clone();
        m.version_id = None;
        m.copied = Some(copied_at);
        staged.push((part, m.to_json()));
    }
    write
        .commit(job_id, &staged)
        .map_err(|e| CopyError::Target {
            doing: format!("committing the copy in {dst_dir} on the copy target"),
            source: e,
        })?;
    Ok(Copied {
        bytes: copied,
        at_ms,
    })
}

/// Streams `path` (its `version`) from the primary's `read` session into a partial of
/// `stored` on the copy target's `write` session, hashing it: `(staged, SHA-256, bytes)`.
/// Nothing is committed; on an error the partial is abandoned.
///
/// # Errors
/// [`CopyError::Target`] naming the side that failed; [`CopyError::Cancelled`] once
/// `cancel` is cancelled.
fn stream_file(
    (source, read): (&dyn Target, &mut Box<dyn ferry_storage::ReadSession>),
    write: &mut Box<dyn ferry_storage::WriteSession>,
    (path, version): (&str, Option<&str>),
    stored: &StoredFile,
    job_id: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(Staged, String, u64), CopyError> {
    let (tx, rx) = ferry_storage::chunk::channel();
    let (htx, hrx) = ferry_storage::chunk::channel();
    // Download → hash → stage, each on a thread of its own, as the channels are bounded:
    // the hash thread forwards every chunk as it hashes it. A side that stops hangs up its
    // channel, which ends the others.
    let (downloaded, stage, (sha256, size)) = std::thread::scope(|scope| {
        let hasher = scope.spawn(move || hash_forward(rx, htx, cancel));
        let download = scope.spawn(move || read.download_version(path, version, tx));
        let stage = write.stage(stored, job_id, hrx);
        let downloaded = download.join().unwrap_or_else(|_| {
            Err(ferry_storage::TargetError::Io {
                addr: source.describe(),
                op: "download",
                path: path.to_owned(),
                message: "the download thread panicked".to_owned(),
            })
        });
        (downloaded, stage, hasher.join().unwrap_or_default())
    });
    if cancel.is_cancelled() {
        if let Ok(s) = &stage {
            write.abandon(std::slice::from_ref(&s.partial));
        }
        return Err(CopyError::Cancelled);
    }
    match (downloaded, stage) {
        (Err(e), stage) => {
            if let Ok(s) = stage {
                write.abandon(&[s.partial]);
            }
            Err(CopyError::Target {
                doing: format!("reading {path} on the primary"),
                source: e,
            })
        }
        (Ok(_), Err(e)) => Err(CopyError::Target {
            doing: format!("writing {} on the copy target", stored.path()),
            source: e,
        }),
        (Ok(_), Ok(s)) => Ok((s, sha256, size)),
    }
}

/// Copies the archived WAL and oplog slices of `environment` that `dest` lacks from
/// `source`: every file of a `<datastore>-wal/<timeline>` or `<datastore>-oplog` folder
/// that has its `.json` record on the primary and no record on the copy target, streamed
/// and checked against its record's `sha256_stored` and `bytes_stored`, then committed
/// with its record (the primary's version id removed). Oldest first, by name. Returns
/// the files and bytes copied.
///
/// # Errors
/// [`CopyError`] for the first file that could not be copied (the ones before it stay
/// copied; nothing of it is left visible on `dest`).
pub fn copy_archives(
    source: &dyn Target,
    dest: &dyn Target,
    environment: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(u64, u64), CopyError> {
    let src_env = source.environment_dir(environment);
    let dst_env = dest.environment_dir(environment);
    let err = |doing: String| move |e| CopyError::Target { doing, source: e };
    let mut read = source
        .read()
        .map_err(err(format!("opening the primary ({})", source.describe())))?;
    let mut dst_read = dest.read().map_err(err(format!(
        "opening the copy target ({})",
        dest.describe()
    )))?;
    // Folders relative to the environment folder.
    let mut folders: Vec<String> = Vec::new();
    let listing = |read: &mut Box<dyn ferry_storage::ReadSession>, dir: &str| {
        read.list(dir)
            .map_err(err(format!("listing {dir} on the primary")))
    };
    for ds in ferry_storage::wal::archived_datastores(&mut *read, &src_env)
        .map_err(err(format!("listing {src_env} on the primary")))?
    {
        let mut timelines = listing(&mut read, &format!("{src_env}/{ds}-wal"))?;
        timelines.retain(|t| t.len() == 8 && t.bytes().all(|b| b.is_ascii_hexdigit()));
        timelines.sort();
        folders.extend(timelines.into_iter().map(|t| format!("{ds}-wal/{t}")));
    }
    for ds in ferry_storage::oplog::archived_datastores(&mut *read, &src_env)
        .map_err(err(format!("listing {src_env} on the primary")))?
    {
        folders.push(format!("{ds}-oplog"));
    }
    let mut write: Option<Box<dyn ferry_storage::WriteSession>> = None;
    let (mut files, mut bytes) = (0u64, 0u64);
    for folder in folders {
        let (src_dir, dst_dir) = (format!("{src_env}/{folder}"), format!("{dst_env}/{folder}"));
        let entries = listing(&mut read, &src_dir)?;
        let archived = |e: &str| {
            let Some(n) = e.strip_suffix(".json") else {
                return false;
            };
            !n.starts_with('.')
                && (ferry_core::oplog::is_slice_name(n)
                    || n.strip_suffix(".zst.age")
                        .is_some_and(|w| ferry_core::wal::WalFileName::parse(w).is_ok()))
                && entries.iter().any(|d| d == n)
        };
        let mut wanted: Vec<&String> = entries.iter().filter(|e| archived(e)).collect();
        wanted.sort();
        if wanted.is_empty() {
            continue;
        }
        let there = match dst_read.list(&dst_dir) {
            Ok(t) => t,
            Err(TargetError::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(err(format!("listing {dst_dir} on the copy target"))(e)),
        };
        for record_name in wanted.into_iter().filter(|r| !there.contains(r)) {
            if cancel.is_cancelled() {
                return Err(CopyError::Cancelled);
            }
            let name = record_name.trim_end_matches(".json");
            let record_path = format!("{src_dir}/{record_name}");
            let record_bytes = read
                .read_small(&record_path, MAX_MANIFEST_BYTES)
                .map_err(err(format!("reading {record_path} on the primary")))?;
            let mut record: serde_json::Value = serde_json::from_slice(&record_bytes)
                .map_err(|e| CopyError::Manifest(format!("{record_path}: {e}")))?;
            let (Some(expected_sha256), Some(expected_size)) = (
                record["sha256_stored"].as_str().map(str::to_owned),
                record["bytes_stored"].as_u64(),
            ) else {
                return Err(CopyError::Manifest(format!(
                    "{record_path} names no sha256_stored and bytes_stored"
                )));
            };
            let version = record
                .as_object_mut()
                .and_then(|o| o.remove("version_id"))
                .and_then(|v| v.as_str().map(str::to_owned));
            let w = match &mut write {
                Some(w) => w,
                None => write.insert(dest.write().map_err(err(format!(
                    "opening the copy target ({})",
                    dest.describe()
                )))?),
            };
            let stored = StoredFile {
                dir: dst_dir.clone(),
                name: name.to_owned(),
            };
            let job_id = format!("copy{}", ulid::Ulid::new());
            let path = format!("{src_dir}/{name}");
            let (part, sha256, size) = stream_file(
                (source, &mut read),
                w,
                (&path, version.as_deref()),
                &stored,
                &job_id,
                cancel,
            )?;
            if sha256 != expected_sha256 || size != expected_size {
                w.abandon(&[part.partial]);
                return Err(CopyError::Integrity {
                    path,
                    size,
                    sha256,
                    expected_size,
                    expected_sha256,
                });
            }
            let json = serde_json::to_vec_pretty(&record).expect("a record serialises");
            w.commit(&job_id, &[(part, json)]).map_err(err(format!(
                "committing {} on the copy target",
                stored.path()
            )))?;
            files += 1;
            bytes += size;
        }
    }
    Ok((files, bytes))
}

/// Hashes every chunk of `rx` and forwards it to `tx`; the SHA-256 (lower-case hex) and
/// the bytes seen. Stops forwarding (still draining `rx`) if `tx`'s receiver hangs up;
/// stops altogether (hanging up both, which ends the download and the upload) once
/// `cancel` is cancelled.
fn hash_forward(
    rx: Receiver<Vec<u8>>,
    tx: SyncSender<Vec<u8>>,
    cancel: &tokio_util::sync::CancellationToken,
) -> (String, u64) {
    let mut hasher = Sha256::new();
    let mut n = 0u64;
    let mut open = true;
    for chunk in rx {
        if cancel.is_cancelled() {
            break;
        }
        hasher.update(&chunk);
        n += chunk.len() as u64;
        if open && tx.send(chunk).is_err() {
            open = false;
        }
    }
    (hex::encode(hasher.finalize()), n)
}

impl Coordinator {
    /// The copy targets of `environment` (`copy_to`), with their targets.
    pub fn copy_targets(&self, environment: &str) -> Vec<(String, Arc<dyn Target>)> {
        self.settings
            .copy_to
            .get(environment)
            .into_iter()
            .flatten()
            .filter_map(|n| self.settings.copies.get(n).map(|t| (n.clone(), t.clone())))
            .collect()
    }

    /// Each environment's copy targets: what they lack and how far behind they are, at
    /// `now_ms` (UTC ms).
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn copy_status(
        &self,
        now_ms: i64,
    ) -> Result<Vec<CopyStatus>, crate::store::StoreError> {
        if self.settings.copy_to.values().all(Vec::is_empty) {
            return Ok(Vec::new());
        }
        let backups = self.backups(None).await?;
        let mut out = Vec::new();
        for (env, targets) in &self.settings.copy_to {
            let of_env: Vec<BackupRecord> = backups
                .iter()
                .filter(|b| &b.environment == env)
                .cloned()
                .collect();
            for t in targets {
                let lacks = lacking(&of_env, t);
                out.push(CopyStatus {
                    environment: env.clone(),
                    target: t.clone(),
                    lacking: lacks.len() as u32,
                    lag_seconds: lag_seconds(&lacks, now_ms),
                    progress: self.copier.progress(env, t),
                });
            }
        }
        Ok(out)
    }

    /// The copier: at start, when woken ([`Copier::wake`]) and every [`COPY_INTERVAL`],
    /// copies what each copy target lacks ([`Coordinator::copy_pending`]) until shutdown.
    pub async fn run_copies(self: Arc<Self>) {
        if self.settings.copy_to.values().all(Vec::is_empty) {
            return;
        }
        loop {
            self.copy_pending().await;
            tokio::select! {
                _ = self.copier.wake.notified() => {}
                _ = tokio::time::sleep(COPY_INTERVAL) => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    /// One pass: for each environment and copy target, the backups it lacks, newest
    /// first, copied one at a time; the first failure ends that target's pass (the next
    /// pass tries again) and is recorded in its progress.
    pub async fn copy_pending(&self) {
        let Some(source) = self.settings.maintenance.clone() else {
            return;
        };
        let backups = match self.backups(None).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "Could not read the catalog to copy backups.");
                return;
            }
        };
        for (env, targets) in self.settings.copy_to.clone() {
            let of_env: Vec<BackupRecord> = backups
                .iter()
                .filter(|b| b.environment == env)
                .cloned()
                .collect();
            for name in targets {
                let Some(dest) = self.settings.copies.get(&name).cloned() else {
                    continue;
                };
                let mut failed = false;
                for record in lacking(&of_env, &name) {
                    if self.shutdown.is_cancelled() {
                        return;
                    }
                    match self.copy_one(&source, &dest, &name, record).await {
                        Ok(()) => {}
                        Err(message) => {
                            tracing::error!(environment = %env, copy = %name,
                                stored_path = %record.stored_path, error = %message,
                                "Could not copy the backup; the next pass tries again.");
                            self.copier
                                .set(&env, &name, |p| p.last_error = Some(message));
                            failed = true;
                            break;
                        }
                    }
                }
                // Then the archived WAL and oplog slices the copy target lacks.
                let (src, dst, e, cancel) = (
                    source.clone(),
                    dest.clone(),
                    env.clone(),
                    self.shutdown.clone(),
                );
                let copied =
                    tokio::task::spawn_blocking(move || copy_archives(&*src, &*dst, &e, &cancel))
                        .await
                        .map_err(|e| format!("the copy task failed: {e}"))
                        .and_then(|r| r.map_err(|e| e.to_string()));
                match copied {
                    Ok((0, _)) => {}
                    Ok((files, bytes)) => {
                        tracing::info!(environment = %env, copy = %name, files, bytes,
                            "Copied archived WAL and oplog slices.");
                    }
                    Err(message) => {
                        tracing::error!(environment = %env, copy = %name, error = %message,
                            "Could not copy the archived WAL and oplog slices; the next pass tries again.");
                        if !failed {
                            self.copier.set(&env, &name, |p| {
                                p.last_error = Some(format!("archived WAL and oplog: {message}"));
                            });
                        }
                    }
                }
            }
        }
    }

    /// Copies `record` to `dest` (named `name`), locks it there on a target with locks,
    /// and notes the copy on its catalog record.
    async fn copy_one(
        &self,
        source: &Arc<dyn Target>,
        dest: &Arc<dyn Target>,
        name: &str,
        record: &BackupRecord,
    ) -> Result<(), String> {
        let Ok(date) = NaiveDate::parse_from_str(&record.date, "%Y-%m-%d") else {
            return Err(format!("{}: not a date", ferry_core::Bounded(&record.date)));
        };
        let (src, dst) = (source.clone(), dest.clone());
        let (env, file) = (
            record.environment.clone(),
            file_name(&record.stored_path).to_owned(),
        );
        let job_id = format!("{}-copy", record.job_id);
        let shutdown = self.shutdown.clone();
        let started = std::time::Instant::now();
        let Copied { bytes, at_ms } = tokio::task::spawn_blocking(move || {
            copy_backup(&*src, &*dst, (&env, date, &file), &job_id, &shutdown)
        })
        .await
        .map_err(|e| format!("the copy task failed: {e}"))?
        .map_err(|e| e.to_string())?;
        if dest.object_lock()
            && let Some(policy) = self.settings.retention.get(&record.environment).copied()
        {
            let until = crate::catalog::locks::daily_horizon(date, &policy);
            let (dst, env) = (dest.clone(), record.environment.clone());
            tokio::task::spawn_blocking(move || {
                crate::catalog::locks::lock_folder(&*dst, &env, date, until)
            })
            .await
            .map_err(|e| format!("the lock task failed: {e}"))?
            .map_err(|e| format!("copied, but its lock on the copy target failed: {e}"))?;
        }
        let now = at_ms;
        let (store, env, path, job, target) = (
            self.store.clone(),
            record.environment.clone(),
            record.stored_path.clone(),
            record.job_id.clone(),
            name.to_owned(),
        );
        blocking(move || {
            // Read afresh: a lock may have updated the record meanwhile.
            let Some(mut current) = store
                .list_backups(Some(&env))?
                .into_iter()
                .find(|r| r.job_id == job && r.stored_path == path)
            else {
                return Ok(());
            };
            if !current.copies.iter().any(|c| c.target == target) {
                current.copies.push(CopyNote {
                    target,
                    copied_ms: now,
                });
                store.put_backup(&current)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| format!("copied, but the catalog could not record it: {e}"))?;
        tracing::info!(environment = %record.environment, copy = %name,
            stored_path = %record.stored_path, bytes,
            seconds = started.elapsed().as_secs_f64(), "Copied a backup.");
        self.copier.set(&record.environment, name, |p| {
            p.last_copy_ms = Some(now);
            p.last_error = None;
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_storage::memory::MemoryTarget;
    use tokio_util::sync::CancellationToken;

    fn record(date: &str, name: &str, finished_ms: i64, copies: &[&str]) -> BackupRecord {
        BackupRecord {
            environment: "production".into(),
            date: date.into(),
            datastore: "files".into(),
            kind: "files".into(),
            agent: "a".into(),
            stored_path: format!("/srv/ferry/production/{date}/{name}"),
            size_bytes: 1,
            bytes_uncompressed: 1,
            sha256: String::new(),
            finished_ms,
            job_id: format!("j{finished_ms}"),
            missing: None,
            retain_until_ms: None,
            lock_error: None,
            copies: copies
                .iter()
                .map(|t| CopyNote {
                    target: (*t).into(),
                    copied_ms: finished_ms,
                })
                .collect(),
            recipients: Vec::new(),
        }
    }

    #[test]
    fn the_lag_is_the_age_of_the_oldest_backup_a_copy_lacks() {
        let records = vec![
            record(
                "2026-12-01",
                "files_backup_2026-12-01.tar.zst.age",
                1_000_000,
                &["s3"],
            ),
            record(
                "2026-12-02",
                "files_backup_2026-12-02.tar.zst.age",
                2_000_000,
                &[],
            ),
            record(
                "2026-12-03",
                "files_backup_2026-12-03.tar.zst.age",
                3_000_000,
                &[],
            ),
            // A differential repository is not copied, so never lacking.
            record("2026-12-03", "files", 3_500_000, &[]),
        ];
        let lacks = lacking(&records, "s3");
        assert_eq!(
            lacks.iter().map(|r| r.finished_ms).collect::<Vec<_>>(),
            [3_000_000, 2_000_000],
            "newest first, archives only"
        );
        assert_eq!(lag_seconds(&lacks, 5_000_000), 3000);
        assert_eq!(lag_seconds(&lacking(&records, "other")[..0], 5_000_000), 0);
        assert_eq!(lacking(&records, "other").len(), 3);
    }

    /// Writes a backup of two parts (a companion and the main archive) with manifests on
    /// `t` through a write session, as an agent does.
    fn put_backup(t: &MemoryTarget, date: &str, corrupt: bool) -> (String, Vec<u8>, Vec<u8>) {
        let dir = t.dated_dir(
            "production",
            NaiveDate::parse_from_str(date, "%Y-%m-%d").unwrap(),
        );
        let main_name = format!("postgres_backup_{date}.pgdump.zst.age");
        let comp_name = format!("postgres_backup_{date}.globals.sql.zst.age");
        let main_bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let comp_bytes = b"roles".to_vec();
        let seed = include_bytes!("../../../fuzz/corpus/manifest/seed-main");
        let manifest = |name: &str, bytes: &[u8], companions: Vec<String>| {
            let mut m = Manifest::from_slice("seed", seed).unwrap();
            m.file = name.into();
            m.sha256 = hex::encode(Sha256::digest(bytes));
            m.bytes_stored = bytes.len() as u64;
            m.companions = companions;
            m.version_id = Some("v-on-the-primary".into());
            m
        };
        let mut w = t.write().unwrap();
        let mut parts = Vec::new();
        for (name, bytes, companions) in [
            (comp_name.clone(), comp_bytes.clone(), vec![]),
            (
                main_name.clone(),
                main_bytes.clone(),
                vec![comp_name.clone()],
            ),
        ] {
            let mut m = manifest(&name, &bytes, companions);
            if corrupt && name == main_name {
                m.sha256 = "0".repeat(64);
            }
            let (tx, rx) = ferry_storage::chunk::channel();
            let sent = bytes.clone();
            let h = std::thread::spawn(move || {
                for c in sent.chunks(1 << 20) {
                    tx.send(c.to_vec()).unwrap();
                }
            });
            let file = StoredFile {
                dir: dir.clone(),
                name: name.clone(),
            };
            let staged = w.stage(&file, "job", rx).unwrap();
            h.join().unwrap();
            parts.push((staged, m.to_json()));
        }
        w.commit("job", &parts).unwrap();
        (main_name, main_bytes, comp_bytes)
    }

    fn read_all(t: &MemoryTarget, path: &str) -> Option<Vec<u8>> {
        let mut r = t.read().unwrap();
        r.size(path).unwrap()?;
        r.read_small(path, 1 << 30).ok()
    }

    /// What a second copy of a backup already there returns: nothing copied, the first
    /// copy's time.
    fn n_again(at_ms: i64) -> Copied {
        Copied { bytes: 0, at_ms }
    }

    #[test]
    fn a_copy_is_byte_equal_with_its_manifests_and_without_the_primarys_version_id() {
        let (src, dst) = (MemoryTarget::new("/srv/ferry"), MemoryTarget::new("/copy"));
        let (main, main_bytes, comp_bytes) = put_backup(&src, "2026-12-05", false);
        let date = NaiveDate::from_ymd_opt(2026, 12, 5).unwrap();
        let n = copy_backup(
            &src,
            &dst,
            ("production", date, &main),
            "job-copy",
            &CancellationToken::new(),
        )
        .unwrap();
        assert_eq!(n.bytes, (main_bytes.len() + comp_bytes.len()) as u64);
        let dir = "/copy/production/2026-12-05";
        assert_eq!(
            read_all(&dst, &format!("{dir}/{main}")).unwrap(),
            main_bytes
        );
        let m = Manifest::from_slice("m", &read_all(&dst, &format!("{dir}/{main}.json")).unwrap())
            .unwrap();
        assert_eq!(
            m.version_id, None,
            "the primary's version id is not carried over"
        );
        assert_eq!(
            m.copied.map(|t| t.timestamp_millis()),
            Some(n.at_ms),
            "the copy's manifest says when it was copied"
        );
        assert_eq!(m.companions.len(), 1);
        let comp = &m.companions[0];
        assert_eq!(
            read_all(&dst, &format!("{dir}/{comp}")).unwrap(),
            comp_bytes
        );
        assert!(read_all(&dst, &format!("{dir}/{comp}.json")).is_some());
        // A second copy finds it there and copies nothing.
        assert_eq!(
            copy_backup(
                &src,
                &dst,
                ("production", date, &main),
                "job-copy2",
                &CancellationToken::new()
            )
            .unwrap(),
            n_again(n.at_ms)
        );
    }

    /// Another backup under the same name on the copy target (two backups of one second
    /// on a primary whose writers cannot look) is never taken for this one.
    #[test]
    fn a_different_backup_of_the_same_name_on_the_copy_target_is_an_error_not_a_copy() {
        let (src, dst) = (MemoryTarget::new("/srv/ferry"), MemoryTarget::new("/copy"));
        let (main, _, _) = put_backup(&src, "2026-12-05", false);
        let date = NaiveDate::from_ymd_opt(2026, 12, 5).unwrap();
        let cancel = CancellationToken::new();
        copy_backup(&src, &dst, ("production", date, &main), "j1", &cancel).unwrap();
        let path = format!("/srv/ferry/production/2026-12-05/{main}.json");
        let mut m = Manifest::from_slice("m", &src.get(&path).unwrap()).unwrap();
        m.sha256 = "1".repeat(64);
        src.insert(&path, &m.to_json());
        let e = copy_backup(&src, &dst, ("production", date, &main), "j2", &cancel).unwrap_err();
        assert!(
            e.to_string()
                .contains("describes another backup of that name"),
            "{e}"
        );
    }

    #[test]
    fn a_copy_stopped_by_the_shutdown_commits_nothing_and_leaves_no_partial() {
        let (src, dst) = (MemoryTarget::new("/srv/ferry"), MemoryTarget::new("/copy"));
        let (main, _, _) = put_backup(&src, "2026-12-05", false);
        let date = NaiveDate::from_ymd_opt(2026, 12, 5).unwrap();
        let cancel = CancellationToken::new();
        cancel.cancel();
        let e =
            copy_backup(&src, &dst, ("production", date, &main), "job-copy", &cancel).unwrap_err();
        assert!(matches!(e, CopyError::Cancelled), "{e}");
        let mut r = dst.read().unwrap();
        assert_eq!(
            r.list("/copy/production/2026-12-05").unwrap(),
            Vec::<String>::new(),
            "no file, no partial left on the copy target"
        );
        assert!(dst.paths().is_empty(), "{:?}", dst.paths());
        // Not cancelled, the same copy goes through.
        copy_backup(
            &src,
            &dst,
            ("production", date, &main),
            "job-copy2",
            &CancellationToken::new(),
        )
        .unwrap();
    }

    #[test]
    fn a_copy_whose_bytes_differ_from_the_manifest_fails_and_leaves_nothing() {
        let (src, dst) = (MemoryTarget::new("/srv/ferry"), MemoryTarget::new("/copy"));
        let (main, _, _) = put_backup(&src, "2026-12-05", true);
        let date = NaiveDate::from_ymd_opt(2026, 12, 5).unwrap();
        let e = copy_backup(
            &src,
            &dst,
            ("production", date, &main),
            "job-copy",
            &CancellationToken::new(),
        )
        .unwrap_err();
        assert!(matches!(e, CopyError::Integrity { .. }), "{e}");
        assert!(e.to_string().contains("nothing was committed"), "{e}");
        let mut r = dst.read().unwrap();
        assert_eq!(
            r.list("/copy/production/2026-12-05").unwrap(),
            Vec::<String>::new(),
            "no file, no partial left on the copy target"
        );
    }

    #[test]
    fn archived_wal_and_oplog_slices_a_copy_lacks_are_copied_with_their_records_and_checked() {
        let primary = MemoryTarget::new("/primary");
        let copy = MemoryTarget::new("/copy");
        let record = |bytes: &[u8], sha: Option<&str>| {
            serde_json::json!({
                "sha256_stored": sha.map_or_else(|| hex::encode(Sha256::digest(bytes)), str::to_owned),
                "bytes_stored": bytes.len(),
                "version_id": "v-on-the-primary",
            })
            .to_string()
        };
        let files = [
            (
                "pg-wal/00000001/000000010000000000000002.zst.age",
                b"wal two".as_slice(),
            ),
            (
                "pg-wal/00000002/00000002.history.zst.age",
                b"history".as_slice(),
            ),
            (
                "mongo-oplog/20261205T100000.000Z-20261205T100100.000Z.bson.zst.age",
                b"slice".as_slice(),
            ),
        ];
        for (path, bytes) in files {
            primary.insert(&format!("/primary/production/{path}"), bytes);
            primary.insert(
                &format!("/primary/production/{path}.json"),
                record(bytes, None).as_bytes(),
            );
        }
        // Written, its record not yet: not archived, not copied.
        primary.insert(
            "/primary/production/pg-wal/00000001/000000010000000000000003.zst.age",
            b"wal three",
        );
        // Already on the copy target: left alone.
        copy.insert(
            "/copy/production/pg-wal/00000002/00000002.history.zst.age",
            b"history",
        );
        copy.insert(
            "/copy/production/pg-wal/00000002/00000002.history.zst.age.json",
            b"{}",
        );
        let cancel = CancellationToken::new();
        let (n, bytes) = copy_archives(&primary, &copy, "production", &cancel).unwrap();
        assert_eq!((n, bytes), (2, 12));
        for (path, data) in [files[0], files[2]] {
            assert_eq!(
                read_all(&copy, &format!("/copy/production/{path}")).unwrap(),
                data
            );
            let r: serde_json::Value = serde_json::from_slice(
                &read_all(&copy, &format!("/copy/production/{path}.json")).unwrap(),
            )
            .unwrap();
            assert!(r.get("version_id").is_none(), "{r}");
            assert_eq!(r["bytes_stored"], data.len());
        }
        assert!(
            !copy
                .paths()
                .iter()
                .any(|p| p.contains("000000010000000000000003"))
        );
        // A second pass copies nothing.
        assert_eq!(
            copy_archives(&primary, &copy, "production", &cancel).unwrap(),
            (0, 0)
        );

        // One whose bytes differ from its record: refused, nothing of it on the copy.
        let bad = "mongo-oplog/20261205T100100.000Z-20261205T100200.000Z.bson.zst.age";
        primary.insert(&format!("/primary/production/{bad}"), b"altered");
        primary.insert(
            &format!("/primary/production/{bad}.json"),
            record(b"altered", Some(&"0".repeat(64))).as_bytes(),
        );
        let e = copy_archives(&primary, &copy, "production", &cancel).unwrap_err();
        assert!(matches!(e, CopyError::Integrity { .. }), "{e}");
        assert!(
            !copy.paths().iter().any(|p| p.contains("T100200")),
            "{:?}",
            copy.paths()
        );
    }
}
