//! The coordinator's own backup (`[self_backup]`) and its restore (`ferry-coordinator
//! restore-state`): a control plane that can be lost and rebuilt.
//!
//! A self-backup ([`self_backup`]) writes to the primary (`[maintenance]`) and to every
//! copy target, with the maintenance credentials, under
//! `<root>/_ferry/<YYYY-MM-DD>/` ([`ferry_core::layout::COORDINATOR_FOLDER`]):
//! - `coordinator-state_backup_<date>T<HHMMSS>Z.tar.zst.age`: a tar (POSIX ustar, read by
//!   stock `tar`) of `coordinator.redb` (a consistent snapshot of the store: jobs and their
//!   events, the catalog, the audit chain, schedule marks), `coordinator.toml` (the config
//!   the coordinator runs with) and `pki/*.pem` (the fleet's CA certificate and issued
//!   certificates, no private key), compressed with zstd and encrypted with age to
//!   `escrow_recipients`, whose identity is kept offline (`age -d -i escrow.key FILE |
//!   zstd -d | tar -x` opens it by hand);
//! - `coordinator-ca-key_backup_<stamp>.pem.age`: the CA's private key (`<pki_dir>/ca.key`)
//!   alone, encrypted the same way (escrowed separately: restoring the state never needs it);
//! - beside each, its `.json` manifest ([`ferry_core::manifest::Manifest`], `environment`
//!   `_ferry`, `kind` `coordinator-state` or `coordinator-ca-key`, `counts` with the
//!   numbers of jobs, catalog records and audit entries and the audit chain's newest hash).
//!
//! Dated folders of `_ferry` older than `keep_days` are then removed on each target.
//!
//! [`restore_state`] reads the newest (or a given date's) self-backup from one target,
//! checks its size and SHA-256 against its manifest, decrypts it with the escrow identity,
//! checks the audit chain of the store inside, and puts the store in place (never over an
//! existing one), the config and certificates beside it for the operator to compare; the
//! restore is appended to the audit chain, which goes on from there.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use ferry_core::crypto::Decryption;
use ferry_core::layout::{COORDINATOR_FOLDER, StoredFile};
use ferry_core::manifest::{MANIFEST_VERSION, MAX_MANIFEST_BYTES, Manifest, Source};
use ferry_storage::{Target, TargetError};
use sha2::{Digest, Sha256};

use crate::config::{SelfBackup, Settings};
use crate::store::{RedbStore, Store, StoreCounts, StoreError};

/// The stem of the state archive's name.
pub const STATE_STEM: &str = "coordinator-state";
/// The stem of the escrowed CA key's name.
pub const CA_KEY_STEM: &str = "coordinator-ca-key";
/// The store's name inside the state archive.
pub const STORE_ENTRY: &str = "coordinator.redb";
/// The config's name inside the state archive.
pub const CONFIG_ENTRY: &str = "coordinator.toml";
/// Largest state archive [`restore_state`] reads, bytes (it is read whole).
pub const MAX_STATE_BYTES: u64 = 4 << 30;

/// Why a self-backup or a restore of the state failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The config has no `[self_backup]`.
    #[error("the config has no [self_backup] (its escrow_recipients)")]
    NotConfigured,
    /// The store could not be snapshotted or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A storage target failed.
    #[error("{doing}: {source}")]
    Target {
        /// What was being done, naming the target.
        doing: String,
        /// The target's error.
        #[source]
        source: TargetError,
    },
    /// What was read is not a self-backup this coordinator can restore.
    #[error("{0}")]
    Invalid(String),
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::File {
        path: path.to_owned(),
        source,
    }
}

/// What the coordinator knows of its self-backups since it started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SelfBackupProgress {
    /// When the newest self-backup that wrote to every target finished, UTC ms.
    pub last_success_ms: Option<i64>,
    /// The newest self-backup's failure (a target or all of them); `None` after a success.
    pub last_error: Option<String>,
}

/// What one self-backup wrote on one target.
#[derive(Clone, Debug, PartialEq)]
pub struct Written {
    /// The target's name: `primary` or a copy's.
    pub target: String,
    /// The state archive's path there.
    pub path: String,
    /// Whether the CA key was escrowed beside it.
    pub ca_key: bool,
    /// Self-backup folders removed there (older than `keep_days`).
    pub pruned: u32,
}

/// What [`self_backup`] did.
#[derive(Clone, Debug)]
pub struct SelfBackupReport {
    /// What the store held.
    pub counts: StoreCounts,
    /// The state archive's size, bytes.
    pub bytes: u64,
    /// Each target written.
    pub written: Vec<Written>,
    /// Each target that failed: `(name, error)`.
    pub failed: Vec<(String, String)>,
}

impl SelfBackupReport {
    /// One line for logs, the audit log and the CLI.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} jobs, {} catalog records, {} audit entries ({} bytes) written to {}",
            self.counts.jobs,
            self.counts.backups,
            self.counts.audit,
            self.bytes,
            if self.written.is_empty() {
                "no target".to_owned()
            } else {
                self.written
                    .iter()
                    .map(|w| w.target.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
        for (name, e) in &self.failed {
            out.push_str(&format!("; {name} FAILED: {e}"));
        }
        out
    }
}

/// The targets a self-backup goes to: the primary, then the copy targets by name.
fn targets(settings: &Settings) -> Vec<(String, Arc<dyn Target>)> {
    let mut out: Vec<(String, Arc<dyn Target>)> = settings
        .maintenance
        .iter()
        .map(|t| (ferry_storage::PRIMARY.to_owned(), t.clone()))
        .collect();
    out.extend(settings.copies.iter().map(|(n, t)| (n.clone(), t.clone())));
    out
}

/// The tar of the state: the store snapshot, the config, the PKI certificates.
fn state_tar(
    sb: &SelfBackup,
    snapshot: &Path,
    now: DateTime<Utc>,
) -> Result<(Vec<u8>, Vec<String>), StateError> {
    let mut files: Vec<(String, Vec<u8>)> = vec![
        (
            STORE_ENTRY.to_owned(),
            std::fs::read(snapshot).map_err(file_err(snapshot))?,
        ),
        (
            CONFIG_ENTRY.to_owned(),
            std::fs::read(&sb.config_file).map_err(file_err(&sb.config_file))?,
        ),
    ];
    if let Some(dir) = &sb.pki_dir {
        let mut pems: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(file_err(dir))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "pem") && p.is_file())
            .collect();
        pems.sort();
        for p in pems {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            files.push((
                format!("pki/{name}"),
                std::fs::read(&p).map_err(file_err(&p))?,
            ));
        }
    }
    let mut tar = tar::Builder::new(Vec::new());
    let names = files.iter().map(|(n, _)| n.clone()).collect();
    for (name, bytes) in files {
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(u64::try_from(now.timestamp()).unwrap_or(0));
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, &name, bytes.as_slice())
            .map_err(file_err(Path::new(&name)))?;
    }
    let bytes = tar.into_inner().map_err(file_err(Path::new("the tar")))?;
    Ok((bytes, names))
}

/// `bytes` encrypted to the escrow recipients.
fn seal(sb: &SelfBackup, bytes: &[u8]) -> Result<Vec<u8>, StateError> {
    let mut w = sb
        .encryption
        .wrap(Vec::new())
        .map_err(file_err(Path::new("age")))?;
    w.write_all(bytes).map_err(file_err(Path::new("age")))?;
    w.finish().map_err(file_err(Path::new("age")))
}

/// Uploads `bytes` as `file` with `manifest` (its size and SHA-256 filled in) on `target`,
/// never over an existing object.
fn put(
    target: &dyn Target,
    file: &StoredFile,
    bytes: &[u8],
    mut manifest: Manifest,
    job: &str,
) -> Result<(), TargetError> {
    manifest.bytes_stored = bytes.len() as u64;
    manifest.sha256 = hex::encode(Sha256::digest(bytes));
    let mut w = target.write()?;
    let (tx, rx) = ferry_storage::chunk::channel();
    let staged = std::thread::scope(|s| {
        s.spawn(move || {
            for chunk in bytes.chunks(ferry_storage::chunk::CHUNK_BYTES) {
                if tx.send(chunk.to_vec()).is_err() {
                    break;
                }
            }
        });
        w.stage(file, job, rx)
    })?;
    if staged.bytes != bytes.len() as u64 {
        w.abandon(std::slice::from_ref(&staged.partial));
        return Err(TargetError::Io {
            addr: target.describe(),
            op: "upload",
            path: file.path(),
            message: format!("stored {} bytes of {}", staged.bytes, bytes.len()),
        });
    }
    w.commit(job, &[(staged, manifest.to_json())])
}

/// Writes a self-backup of `store` (see the module's doc) to every target of `settings`
/// at `now`: a target that fails is reported in [`SelfBackupReport::failed`] and the others
/// are still written. Blocking: run it on a thread of its own.
///
/// # Errors
/// [`StateError::NotConfigured`] without `[self_backup]`; [`StateError`] when the store
/// cannot be snapshotted or a local file read.
pub fn self_backup(
    settings: &Settings,
    store: &dyn Store,
    now: DateTime<Utc>,
) -> Result<SelfBackupReport, StateError> {
    let sb = settings
        .self_backup
        .as_ref()
        .ok_or(StateError::NotConfigured)?;
    let scratch = tempfile::tempdir().map_err(file_err(Path::new("a temporary directory")))?;
    let snapshot = scratch.path().join(STORE_ENTRY);
    let counts = store.snapshot_to(&snapshot)?;
    let audit_head = RedbStore::open(&snapshot)?
        .list_audit(Some(1))?
        .pop()
        .map(|e| e.hash)
        .unwrap_or_default();
    let (tar, names) = state_tar(sb, &snapshot, now)?;
    let compressed = zstd::encode_all(tar.as_slice(), 3).map_err(file_err(&snapshot))?;
    let sealed = seal(sb, &compressed)?;
    let ca_key = match &sb.pki_dir {
        Some(dir) if dir.join("ca.key").is_file() => {
            let path = dir.join("ca.key");
            Some(seal(sb, &std::fs::read(&path).map_err(file_err(&path))?)?)
        }
        _ => None,
    };
    let stamp = now.format("%Y-%m-%dT%H%M%SZ").to_string();
    let date = now.date_naive();
    let job = ulid::Ulid::new().to_string();
    let manifest =
        |file: &str, kind: &str, format: &str, compression: &str, size: usize| Manifest {
            manifest_version: MANIFEST_VERSION,
            file: file.to_owned(),
            datastore: "coordinator".into(),
            kind: kind.into(),
            part: String::new(),
            format: format.into(),
            compression: compression.into(),
            encryption: "age".into(),
            agent: "coordinator".into(),
            hostname: ferry_core::config::hostname(),
            environment: COORDINATOR_FOLDER.into(),
            date: date.format("%Y-%m-%d").to_string(),
            started: now,
            finished: Utc::now(),
            source: Source {
                tool: "ferry-coordinator".into(),
                tool_version: env!("CARGO_PKG_VERSION").into(),
                server_version: String::new(),
            },
            bytes_uncompressed: size as u64,
            bytes_stored: 0,
            sha256: String::new(),
            recipients: sb.encryption.describe(),
            companions: Vec::new(),
            counts: serde_json::json!({
                "jobs": counts.jobs,
                "backups": counts.backups,
                "audit": counts.audit,
                "audit_head": audit_head,
                "files": names,
            }),
            version_id: None,
            job_id: Some(job.clone()),
            copied: None,
        };
    let state_name = format!("{STATE_STEM}_backup_{stamp}.tar.zst.age");
    let key_name = format!("{CA_KEY_STEM}_backup_{stamp}.pem.age");
    let mut report = SelfBackupReport {
        counts,
        bytes: sealed.len() as u64,
        written: Vec::new(),
        failed: Vec::new(),
    };
    for (name, target) in targets(settings) {
        let dir = target.dated_dir(COORDINATOR_FOLDER, date);
        let file = StoredFile {
            dir: dir.clone(),
            name: state_name.clone(),
        };
        let mut result = put(
            &*target,
            &file,
            &sealed,
            manifest(&state_name, "coordinator-state", "tar", "zst", tar.len()),
            &job,
        );
        if let (Ok(()), Some(key)) = (&result, &ca_key) {
            let file = StoredFile {
                dir: dir.clone(),
                name: key_name.clone(),
            };
            result = put(
                &*target,
                &file,
                key,
                manifest(&key_name, "coordinator-ca-key", "pem", "none", 0),
                &job,
            );
        }
        match result {
            Ok(()) => {
                let pruned = prune(&*target, sb.keep_days, date).unwrap_or_else(|e| {
                    tracing::warn!(target = %name, error = %e,
                        "Could not remove old self-backups.");
                    0
                });
                report.written.push(Written {
                    target: name,
                    path: file.path(),
                    ca_key: ca_key.is_some(),
                    pruned,
                });
            }
            Err(e) => report.failed.push((name, e.to_string())),
        }
    }
    Ok(report)
}

/// The dates of `target`'s self-backup folders, oldest first.
fn dates(target: &dyn Target) -> Result<Vec<NaiveDate>, TargetError> {
    let mut out: Vec<NaiveDate> = target
        .read()?
        .list(&target.environment_dir(COORDINATOR_FOLDER))?
        .iter()
        .filter_map(|n| ferry_core::layout::parse_date(n).ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// Removes `target`'s self-backup folders dated more than `keep_days` before `today`
/// (never today's); how many.
fn prune(target: &dyn Target, keep_days: u32, today: NaiveDate) -> Result<u32, TargetError> {
    let oldest_kept = today - chrono::Days::new(u64::from(keep_days.saturating_sub(1)));
    let mut session = target.maintain()?;
    let mut n = 0;
    for date in dates(target)?.into_iter().filter(|d| *d < oldest_kept) {
        session.remove_dated_folder(COORDINATOR_FOLDER, &date.format("%Y-%m-%d").to_string())?;
        n += 1;
    }
    Ok(n)
}

/// What [`restore_state`] put in place.
#[derive(Clone, Debug)]
pub struct Restored {
    /// The state archive read.
    pub path: String,
    /// What the restored store holds.
    pub counts: StoreCounts,
    /// Where the config and the certificates of the self-backup were written.
    pub beside: PathBuf,
}

/// Restores the coordinator's state from the self-backup of `date` (the newest if `None`)
/// on the target `from` (`primary` or a copy's name) of `settings`: the store is written
/// to `settings.store` (which must not exist), the config and certificates into
/// `<store's folder>/restored-state-<stamp>/`, and the CA key there too if it was
/// escrowed and `with_ca_key`. The restore is appended to the restored audit chain.
/// Blocking.
///
/// # Errors
/// [`StateError`]: no such target or self-backup, a file that differs from its
/// manifest, an identity that does not open it, a store already there, an audit chain that
/// does not verify.
pub fn restore_state(
    settings: &Settings,
    from: &str,
    identity: &Path,
    date: Option<NaiveDate>,
    with_ca_key: bool,
) -> Result<Restored, StateError> {
    let (_, target) = targets(settings)
        .into_iter()
        .find(|(n, _)| n == from)
        .ok_or_else(|| {
            StateError::Invalid(format!(
                "no storage target {:?}: the config names {}",
                ferry_core::Bounded(from),
                targets(settings)
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    if settings.store.exists() {
        return Err(StateError::Invalid(format!(
            "{} exists: restore-state never writes over a store; move it away first",
            settings.store.display()
        )));
    }
    let decryption =
        Decryption::from_identity_file(identity).map_err(|e| StateError::Invalid(e.to_string()))?;
    let on = |doing: String| move |source| StateError::Target { doing, source };
    let available = dates(&*target).map_err(on(format!("listing the self-backups on {from}")))?;
    let date = match date {
        Some(d) if available.contains(&d) => d,
        Some(d) => {
            return Err(StateError::Invalid(format!(
                "no self-backup dated {d} on {from} (it has {})",
                list_dates(&available)
            )));
        }
        None => *available
            .last()
            .ok_or_else(|| StateError::Invalid(format!("no self-backup on {from}")))?,
    };
    let dir = target.dated_dir(COORDINATOR_FOLDER, date);
    let mut read = target.read().map_err(on(format!("opening {from}")))?;
    let names = read
        .list(&dir)
        .map_err(on(format!("listing {dir} on {from}")))?;
    let newest = |stem: &str| {
        let mut v: Vec<&String> = names
            .iter()
            .filter(|n| n.starts_with(&format!("{stem}_backup_")) && n.ends_with(".age"))
            .filter(|n| names.contains(&format!("{n}.json")))
            .collect();
        v.sort();
        v.last().map(|n| (*n).clone())
    };
    let state = newest(STATE_STEM)
        .ok_or_else(|| StateError::Invalid(format!("{dir} on {from} holds no state archive")))?;
    let sealed = read_checked(&mut *read, &dir, &state, from)?;
    let mut compressed = Vec::new();
    decryption
        .wrap(sealed.as_slice())
        .and_then(|mut r| r.read_to_end(&mut compressed))
        .map_err(|e| {
            StateError::Invalid(format!(
                "{dir}/{state} does not open with {}: {e}",
                identity.display()
            ))
        })?;
    let tar = zstd::decode_all(compressed.as_slice()).map_err(file_err(Path::new(&state)))?;
    let stamp = state
        .trim_start_matches(&format!("{STATE_STEM}_backup_"))
        .trim_end_matches(".tar.zst.age")
        .to_owned();
    let parent = settings
        .store
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let beside = parent.join(format!("restored-state-{stamp}"));
    std::fs::create_dir_all(beside.join("pki")).map_err(file_err(&beside))?;
    let mut archive = tar::Archive::new(tar.as_slice());
    let mut store_bytes = None;
    for entry in archive.entries().map_err(file_err(Path::new(&state)))? {
        let mut entry = entry.map_err(file_err(Path::new(&state)))?;
        let name = entry
            .path()
            .map_err(file_err(Path::new(&state)))?
            .to_string_lossy()
            .into_owned();
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .map_err(file_err(Path::new(&name)))?;
        let dest = match name.as_str() {
            STORE_ENTRY => {
                store_bytes = Some(bytes);
                continue;
            }
            CONFIG_ENTRY => beside.join(CONFIG_ENTRY),
            n if n.starts_with("pki/")
                && !n[4..].contains('/')
                && n.ends_with(".pem")
                && n.len() > 8 =>
            {
                beside.join(n)
            }
            other => {
                return Err(StateError::Invalid(format!(
                    "{dir}/{state} holds {}, which no self-backup writes",
                    ferry_core::Bounded(other)
                )));
            }
        };
        write_private(&dest, &bytes, true)?;
    }
    let store_bytes = store_bytes
        .ok_or_else(|| StateError::Invalid(format!("{dir}/{state} holds no {STORE_ENTRY}")))?;
    if with_ca_key {
        let key = newest(CA_KEY_STEM).ok_or_else(|| {
            StateError::Invalid(format!("{dir} on {from} holds no escrowed CA key"))
        })?;
        let sealed = read_checked(&mut *read, &dir, &key, from)?;
        let mut pem = Vec::new();
        decryption
            .wrap(sealed.as_slice())
            .and_then(|mut r| r.read_to_end(&mut pem))
            .map_err(|e| StateError::Invalid(format!("{dir}/{key} does not open: {e}")))?;
        write_private(&beside.join("pki/ca.key"), &pem, true)?;
    }
    // The store goes in place last, under a temporary name first: never half a file.
    let partial = parent.join(format!(".restored-{stamp}.redb"));
    let _ = std::fs::remove_file(&partial);
    write_private(&partial, &store_bytes, false)?;
    let verified = {
        let s = RedbStore::open(&partial)?;
        let log = s.list_audit(None)?;
        ferry_core::audit::verify(&log).map_err(|e| {
            StateError::Invalid(format!(
                "the audit chain in {dir}/{state} does not verify: {e}"
            ))
        })?;
        let counts = StoreCounts {
            jobs: s.list_jobs(usize::MAX)?.len() as u64,
            backups: s.list_backups(None)?.len() as u64,
            audit: log.len() as u64,
        };
        s.append_audit(
            "ferry-coordinator",
            "restore-state",
            &format!("{from}:{dir}/{state}"),
            "restored",
        )?;
        counts
    };
    if settings.store.exists() {
        let _ = std::fs::remove_file(&partial);
        return Err(StateError::Invalid(format!(
            "{} appeared meanwhile: left as it is",
            settings.store.display()
        )));
    }
    std::fs::rename(&partial, &settings.store).map_err(file_err(&settings.store))?;
    Ok(Restored {
        path: format!("{dir}/{state}"),
        counts: verified,
        beside,
    })
}

fn list_dates(dates: &[NaiveDate]) -> String {
    if dates.is_empty() {
        "none".into()
    } else {
        dates
            .iter()
            .map(|d| d.format("%Y-%m-%d").to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Reads `dir/name` whole and checks it against its manifest's size and SHA-256.
fn read_checked(
    read: &mut dyn ferry_storage::ReadSession,
    dir: &str,
    name: &str,
    from: &str,
) -> Result<Vec<u8>, StateError> {
    let on = |doing: String| move |source| StateError::Target { doing, source };
    let mpath = format!("{dir}/{name}.json");
    let m = read
        .read_small(&mpath, MAX_MANIFEST_BYTES)
        .map_err(on(format!("reading {mpath} on {from}")))?;
    let m = Manifest::from_slice(&mpath, &m).map_err(|e| StateError::Invalid(e.to_string()))?;
    if m.bytes_stored > MAX_STATE_BYTES {
        return Err(StateError::Invalid(format!(
            "{dir}/{name}: {} bytes is more than {MAX_STATE_BYTES} this reads",
            m.bytes_stored
        )));
    }
    let path = format!("{dir}/{name}");
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
    let collect = std::thread::spawn(move || rx.into_iter().flatten().collect::<Vec<u8>>());
    let got = read.download_version(&path, m.version_id.as_deref(), tx);
    let bytes = collect.join().unwrap_or_default();
    got.map_err(on(format!("reading {path} on {from}")))?;
    let sha = hex::encode(Sha256::digest(&bytes));
    if bytes.len() as u64 != m.bytes_stored || sha != m.sha256 {
        return Err(StateError::Invalid(format!(
            "{path}: read {} bytes with SHA-256 {sha}, its manifest says {} bytes with {}",
            bytes.len(),
            m.bytes_stored,
            ferry_core::Bounded(&m.sha256)
        )));
    }
    Ok(bytes)
}

/// Writes `bytes` to `path` with mode 0600: a new file, or one replaced when `replace`.
fn write_private(path: &Path, bytes: &[u8], replace: bool) -> Result<(), StateError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(!replace)
        .create(replace)
        .truncate(replace)
        .mode(0o600)
        .open(path)
        .map_err(file_err(path))?;
    f.write_all(bytes).map_err(file_err(path))?;
    f.sync_all().map_err(file_err(path))
}

impl crate::dispatch::Coordinator {
    /// Runs a self-backup now (on a blocking thread): logged, and appended to the audit
    /// log with its outcome by `who`.
    ///
    /// # Errors
    /// [`StateError`] of [`self_backup`]; a self-backup that wrote to no target is an
    /// error naming each target's failure.
    pub async fn self_backup_now(&self, who: &str) -> Result<SelfBackupReport, String> {
        let (settings, store) = (self.settings.clone(), self.store.clone());
        let result =
            tokio::task::spawn_blocking(move || self_backup(&settings, &*store, Utc::now()))
                .await
                .map_err(|e| format!("the self-backup task failed: {e}"))
                .and_then(|r| r.map_err(|e| e.to_string()))
                .and_then(|r| {
                    if r.written.is_empty() {
                        Err(format!("written to no target: {}", r.summary()))
                    } else {
                        Ok(r)
                    }
                });
        let failure = match &result {
            Ok(r) if r.failed.is_empty() => None,
            Ok(r) => Some(r.summary()),
            Err(e) => Some(e.clone()),
        };
        let outcome = match &result {
            Ok(r) => {
                tracing::info!(summary = %r.summary(), "Self-backup written.");
                if !r.failed.is_empty() {
                    tracing::error!(summary = %r.summary(), "A self-backup target failed.");
                }
                r.summary()
            }
            Err(e) => {
                tracing::error!(error = %e, "Self-backup failed.");
                format!("FAILED: {e}")
            }
        };
        {
            let mut p = self.self_backups.lock().expect("self-backup progress lock");
            match &failure {
                None => {
                    p.last_success_ms = Some(ferry_proto::now_unix_ms());
                    p.last_error = None;
                }
                Some(e) => p.last_error = Some(e.clone()),
            }
        }
        if let Some(e) = failure {
            self.notifier.notify(crate::notify::Event::new(
                crate::notify::EventKind::SelfBackupFailed,
                format!("the coordinator's self-backup failed: {e}"),
            ));
        }
        self.audit(who, "self-backup", "coordinator state", &outcome)
            .await;
        result
    }

    /// Writes a self-backup at every occurrence of `[self_backup] cron` until shutdown;
    /// returns at once without `[self_backup]`.
    pub async fn run_self_backups(self: Arc<Self>) {
        let Some(sb) = self.settings.self_backup.clone() else {
            return;
        };
        loop {
            let now = chrono::Utc::now();
            let Ok(next) = sb.cron.find_next_occurrence(&now, false) else {
                return;
            };
            let wait = (next - now).to_std().unwrap_or_default();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.cancelled() => return,
            }
            let _ = self.self_backup_now("schedule").await;
        }
    }
}
