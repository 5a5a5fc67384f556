//! Which backup a restore, verify or check reads: the one the order names, or the newest
//! complete one (of a date), found through a read session of the storage target.

use std::sync::Arc;

use chrono::Utc;

use super::join_error;
use crate::config::{Keys, Settings};
use crate::datastore::Datastore;
use crate::job::{JobError, JobReport, Progress};
use ferry_core::Bounded;
use ferry_core::layout;
use ferry_core::manifest::{MAX_MANIFEST_BYTES, Manifest};
use ferry_storage::{PRIMARY, ReadSession, Target, TargetError};

/// What a restore, verify or check reads: `(date, file, target)`, each optional: the
/// `YYYY-MM-DD` folder, the main archive's file name there (the coordinator's catalog
/// choice), and the storage target (a copy's name or [`PRIMARY`]; `None`: the primary,
/// falling back to a copy when it cannot be reached, see [`choose_source`]).
pub(crate) type Selection = (Option<String>, Option<String>, Option<String>);

/// The storage target a restore, verify or check reads.
#[derive(Clone)]
pub(crate) struct Source {
    /// [`PRIMARY`] or the copy's name.
    pub(crate) name: String,
    /// The target.
    pub(crate) target: Arc<dyn Target>,
    /// Why a copy is read although none was asked for: the primary could not be reached.
    pub(crate) fallback: Option<String>,
}

/// Whether `e` says a target cannot be reached at all (rather than refusing or lacking
/// something): what makes a restore fall back to a copy.
fn unreachable(e: &TargetError) -> bool {
    matches!(e, TargetError::Connect { .. } | TargetError::Stalled { .. })
}

/// The target to read `environment`'s backups from: the copy `target` names, the primary
/// (`[backup_server]`) when it names [`PRIMARY`] or nothing; with nothing named and the
/// primary unreachable (its environment folder cannot be listed: no connection, or it
/// stalls), the first copy (in name order) that can be, with the reason in
/// [`Source::fallback`].
///
/// # Errors
/// [`JobError::InvalidArgument`] for a target this agent does not have; the primary's
/// [`TargetError`] when neither it nor any copy can be reached (each copy's error added).
pub(crate) fn choose_source(
    settings: &Settings,
    environment: &str,
    target: Option<&str>,
) -> Result<Source, JobError> {
    let primary = || Source {
        name: PRIMARY.to_owned(),
        target: settings.backup_server.clone(),
        fallback: None,
    };
    match target {
        Some(PRIMARY) => return Ok(primary()),
        Some(name) => {
            return settings
                .copies
                .iter()
                .find(|(n, _)| n == name)
                .map(|(n, t)| Source {
                    name: n.clone(),
                    target: t.clone(),
                    fallback: None,
                })
                .ok_or_else(|| {
                    JobError::InvalidArgument(format!(
                        "agent {} has no storage target {}",
                        settings.id,
                        Bounded(name)
                    ))
                });
        }
        None if settings.copies.is_empty() => return Ok(primary()),
        None => {}
    }
    let reach = |t: &Arc<dyn Target>| -> Result<(), TargetError> {
        t.read()?.list(&t.environment_dir(environment)).map(|_| ())
    };
    let down = match reach(&settings.backup_server) {
        Ok(()) => return Ok(primary()),
        Err(e) if unreachable(&e) => e,
        Err(e) => return Err(e.into()),
    };
    let mut tried = Vec::new();
    for (name, t) in &settings.copies {
        match reach(t) {
            Ok(()) => {
                tracing::warn!(copy = %name, error = %down,
                    "The primary backup server cannot be reached; reading a copy.");
                return Ok(Source {
                    name: name.clone(),
                    target: t.clone(),
                    fallback: Some(format!(
                        "read from copy {name} ({}): the primary could not be reached: {down}",
                        t.describe()
                    )),
                });
            }
            Err(e) => tried.push(format!("copy {name}: {e}")),
        }
    }
    Err(JobError::Transport(TargetError::Connect {
        addr: settings.backup_server.describe(),
        message: format!(
            "{down}; no copy could be read either ({})",
            tried.join("; ")
        ),
    }))
}

/// A backup found on the server: every file in restore order, with its manifest, and
/// the target it was found on.
pub(crate) struct FoundBackup {
    pub(crate) files: Vec<(String, Manifest)>,
    pub(crate) source: Source,
}

impl FoundBackup {
    /// The main part's path and manifest: the last file.
    pub(crate) fn main(&self) -> &(String, Manifest) {
        self.files.last().expect("a backup has a main part")
    }

    /// What a verify or check of this backup in `environment` reports: its main part, the
    /// stored bytes of all its files, `plain_bytes` uncompressed, and `summary`.
    pub(crate) fn report(
        &self,
        environment: String,
        plain_bytes: u64,
        summary: String,
    ) -> JobReport {
        let (main_path, main) = self.main();
        JobReport {
            recipient_fingerprints: Vec::new(),
            data_finished_ms: Some(main.finished.timestamp_millis()),
            stored_path: main_path.clone(),
            size_bytes: self.files.iter().map(|(_, m)| m.bytes_stored).sum(),
            sha256: main.sha256.clone(),
            bytes_uncompressed: plain_bytes,
            environment,
            date: main.date.clone(),
            kind: main.kind.clone(),
            summary: self.summary(summary),
            target: self.source.name.clone(),
        }
    }
}

impl FoundBackup {
    /// `summary`, with the fallback to a copy said when there was one.
    pub(crate) fn summary(&self, summary: String) -> String {
        match &self.source.fallback {
            Some(why) => format!("{summary}; {why}"),
            None => summary,
        }
    }
}

/// Finds the backup of `datastore` in `environment` that a restore or verify reads:
/// `file` in `date`'s folder if the order names it (the coordinator's catalog choice),
/// else the complete one whose manifest finished last (on `date` if given; whatever the
/// folder names, and passing over any finished more than [`FUTURE_TOLERANCE`] in the
/// future by this agent's clock). A backup is complete when its main archive and the
/// archive's manifest are both under their final names.
///
/// # Errors
/// [`JobError::NotFound`] (naming `file` when it was named: no other backup is taken in
/// its place), [`JobError::Integrity`] for a manifest that describes another file,
/// [`JobError::InvalidArgument`] for a backup of another kind, transport errors.
fn find_backup(
    source: Source,
    environment: &str,
    datastore: &dyn Datastore,
    date: Option<&str>,
    file: Option<&str>,
) -> Result<FoundBackup, JobError> {
    let mut session = source.target.read()?;
    let env_dir = source.target.environment_dir(environment);
    let name = datastore.name();
    if let (Some(day), Some(f)) = (date, file) {
        let dir = format!("{env_dir}/{day}");
        let entries = session.list(&dir)?;
        let missing = match (
            entries.iter().any(|e| e == f),
            entries.contains(&format!("{f}.json")),
        ) {
            (true, true) => None,
            (true, false) => Some("its manifest is not there (an incomplete backup)"),
            (false, _) => Some("it is not there"),
        };
        if let Some(why) = missing {
            return Err(JobError::NotFound(format!(
                "the backup ordered, {dir}/{}, is not on the backup server: {why}; no other \
                 backup is read in its place (the coordinator's catalog and the server \
                 differ: see `ferry backups`, and restore another date with --date)",
                Bounded(f)
            )));
        }
        let (path, main) = read_main(&mut *session, &dir, f, name)?;
        let found = with_companions(&mut *session, datastore, &dir, path, main, &source)?;
        // A companion's data file gone (its manifest kept) is as missing as the main one.
        for (path, _) in &found.files {
            let part = path.rsplit('/').next().unwrap_or_default();
            if !entries.iter().any(|e| e == part) {
                return Err(JobError::NotFound(format!(
                    "{path}, a part of the backup ordered ({dir}/{}), is not on the backup \
                     server; no other backup is read in its place (see `ferry backups`, and \
                     restore another date with --date)",
                    Bounded(f)
                )));
            }
        }
        return Ok(found);
    }
    let dates: Vec<String> = session
        .list(&env_dir)?
        .into_iter()
        .filter(|d| layout::parse_date(d).is_ok())
        .filter(|d| date.is_none_or(|want| want == d))
        .collect();
    // The newest by the manifests' finish times, not by folder names: a production clock
    // that ran ahead wrote later folders for older data. A backup finished in the future
    // by this agent's clock is passed over (and said so): its clock was wrong.
    let horizon = Utc::now() + FUTURE_TOLERANCE;
    let mut best: Option<(String, String, Manifest)> = None;
    let mut future: Vec<String> = Vec::new();
    for day in &dates {
        let dir = format!("{env_dir}/{day}");
        let entries = session.list(&dir)?;
        for f in &entries {
            if layout::stamp_of(name, f).is_none() || !entries.contains(&format!("{f}.json")) {
                continue;
            }
            let (path, m) = read_main(&mut *session, &dir, f, name)?;
            if m.finished > horizon {
                tracing::warn!(path = %path, finished = %m.finished,
                    "Passing over a backup that finished in the future by this agent's clock.");
                future.push(format!("{path} (finished {})", m.finished.to_rfc3339()));
            } else if best
                .as_ref()
                .is_none_or(|(_, _, b)| m.finished > b.finished)
            {
                best = Some((dir.clone(), path, m));
            }
        }
    }
    if let Some((dir, path, main)) = best {
        return with_companions(&mut *session, datastore, &dir, path, main, &source);
    }
    let passed_over = if future.is_empty() {
        String::new()
    } else {
        format!(
            "; passed over, as finished in the future by this agent's clock (a production \
             clock ahead?): {}",
            future.join(", ")
        )
    };
    Err(JobError::NotFound(match date {
        Some(d) => {
            format!("no complete backup of datastore {name:?} in {env_dir}/{d}{passed_over}")
        }
        None => format!("no complete backup of datastore {name:?} under {env_dir}{passed_over}"),
    }))
}

/// How far in the future (by this agent's clock) a backup's finish time may be before the
/// newest-backup search passes it over: clocks a few minutes apart are normal.
const FUTURE_TOLERANCE: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// Reads the manifest of main archive `f` of datastore `name` in `dir`; its path and
/// manifest.
///
/// # Errors
/// [`JobError::Integrity`] if the manifest describes another file, part or datastore.
fn read_main(
    session: &mut dyn ReadSession,
    dir: &str,
    f: &str,
    name: &str,
) -> Result<(String, Manifest), JobError> {
    let path = format!("{dir}/{f}");
    let manifest_path = format!("{path}.json");
    let bytes = session.read_small(&manifest_path, MAX_MANIFEST_BYTES)?;
    let m = Manifest::from_slice(&manifest_path, &bytes)?;
    if m.file != *f || m.datastore != name || !m.part.is_empty() {
        return Err(JobError::Integrity(format!(
            "manifest {manifest_path} describes {} of datastore {}, not {f}",
            Bounded(&m.file),
            Bounded(&m.datastore)
        )));
    }
    Ok((path, m))
}

/// The backup whose main archive is `path` (described by `main`), with the companions its
/// manifest lists, in restore order (companions first).
///
/// # Errors
/// [`JobError::InvalidArgument`] for a backup of another kind, [`JobError::Integrity`] for
/// a companion that is not a file of the layout or has no readable manifest.
fn with_companions(
    session: &mut dyn ReadSession,
    datastore: &dyn Datastore,
    dir: &str,
    path: String,
    main: Manifest,
    source: &Source,
) -> Result<FoundBackup, JobError> {
    if main.kind != datastore.kind() {
        return Err(JobError::InvalidArgument(format!(
            "{path} is a {} backup; datastore {:?} here is {}",
            Bounded(&main.kind),
            datastore.name(),
            datastore.kind()
        )));
    }
    let mut files = Vec::new();
    for c in &main.companions {
        layout::validate_companion(c).map_err(|e| JobError::Integrity(e.to_string()))?;
        let cpath = format!("{dir}/{c}");
        let mpath = format!("{cpath}.json");
        let bytes = session
            .read_small(&mpath, MAX_MANIFEST_BYTES)
            .map_err(|e| {
                JobError::Integrity(format!(
                    "companion {c} of {path} is missing or unreadable: {e}"
                ))
            })?;
        files.push((cpath, Manifest::from_slice(&mpath, &bytes)?));
    }
    files.push((path, main));
    Ok(FoundBackup {
        files,
        source: source.clone(),
    })
}

/// For a staging agent that will `what` (restore, verify): the source environment and the
/// backup of `datastore` there that `selection` names ([`find_backup`]: `(date, file,
/// target)`, the exact file if given, else the newest complete backup, of the date if
/// given, on the target [`choose_source`] picks).
///
/// # Errors
/// [`JobError::PermissionDenied`] without an identity, [`JobError::InvalidArgument`],
/// [`JobError::NotFound`].
pub(crate) async fn locate(
    settings: &Arc<Settings>,
    datastore: &Arc<dyn Datastore>,
    (date, file, target): Selection,
    progress: &Progress,
    what: &str,
) -> Result<(String, FoundBackup), JobError> {
    let Keys::Decrypt(decryption) = &settings.keys else {
        return Err(JobError::PermissionDenied(format!(
            "agent {} has role {}: it holds no identity and may not {what}",
            settings.id, settings.role
        )));
    };
    if let Some(d) = &date {
        layout::parse_date(d).map_err(|e| JobError::InvalidArgument(e.to_string()))?;
    }
    if let Some(f) = &file {
        let d = date.as_deref().ok_or_else(|| {
            JobError::InvalidArgument(format!("backup file {} without its date", Bounded(f)))
        })?;
        layout::validate_main_file(datastore.name(), d, f)
            .map_err(|e| JobError::InvalidArgument(e.to_string()))?;
    }
    let environment = settings
        .source_environment
        .clone()
        .ok_or_else(|| JobError::InvalidArgument("no [restore] source_environment".into()))?;
    progress.set_stage("locate");
    let found = {
        let (settings, datastore, environment) =
            (settings.clone(), datastore.clone(), environment.clone());
        tokio::task::spawn_blocking(move || {
            find_backup(
                choose_source(&settings, &environment, target.as_deref())?,
                &environment,
                &*datastore,
                date.as_deref(),
                file.as_deref(),
            )
        })
        .await
        .map_err(join_error)??
    };
    // Before anything is downloaded: an identity of this agent must be among each file's
    // recipients (key rotation: an identity retired too early says so, not "no matching
    // keys" at the end of a download).
    let held = decryption.fingerprints();
    for (path, manifest) in &found.files {
        let needed: Vec<&str> = manifest
            .recipients
            .iter()
            .map(|r| r.fingerprint.as_str())
            .collect();
        if !needed.is_empty() && !needed.iter().any(|n| held.iter().any(|h| h == n)) {
            return Err(JobError::PermissionDenied(format!(
                "{path} was encrypted to recipient(s) {}, and agent {} holds the identities of \
                 {} only: give it the identity of one of them (`ferry keys` lists which \
                 backups need which); nothing was downloaded or touched",
                needed.join(", "),
                settings.id,
                held.join(", ")
            )));
        }
    }
    Ok((environment, found))
}
