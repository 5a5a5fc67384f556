//! `ferry-coordinator catalog rebuild`: the catalog is a cache of the manifests on the
//! storage targets, and is rebuilt from them (as restic and pgBackRest keep their truth in
//! the repository).
//!
//! [`scan`] reads, with the coordinator's maintenance credentials, every dated folder
//! (`<root>/<environment>/<YYYY-MM-DD>/`) of every environment of the inventory on the
//! primary (`[maintenance]`) and on each copy target (`[copies.<name>]`) the environment
//! copies to, and makes one [`BackupRecord`] per main manifest (`part` empty) whose files
//! are all there with their sizes:
//! - its fields from the manifest (agent, datastore, kind, sizes, SHA-256, `finished`,
//!   `job_id`), its `stored_path` the primary's path of the main archive;
//! - `copies`: each copy target holding its main manifest, at the time that manifest's
//!   `copied` gives;
//! - `retain_until_ms`, on a primary with Object Lock: the latest retain-until of its
//!   folder's objects (what the coordinator set by retention tier).
//!
//! A backup found only on copy targets (its primary folder lost) is listed too, with the
//! primary path a restore would read and the copies it can be read from instead.
//!
//! What is not a record is named in [`Rebuilt::skipped`], never counted: a manifest that
//! does not parse or describes another file, environment or date; a backup whose files are
//! missing or have other sizes; a folder dated after today (an agent's clock ahead: the
//! coordinator refused it); differential repositories (rsync mirrors, pgBackRest), whose
//! next backup records them again. Archived WAL and oplog slices are not catalog records
//! (the archive scan reads them).

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::NaiveDate;
use ferry_core::manifest::{MAX_MANIFEST_BYTES, Manifest};
use ferry_storage::{ReadSession, Target, TargetError};

use crate::config::Settings;
use crate::model::{BackupRecord, CopyNote};

/// Why the catalog could not be rebuilt at all.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// The config has no `[maintenance]` target to read.
    #[error(
        "the config has no [maintenance] target: the catalog is rebuilt from the primary it names"
    )]
    NoMaintenance,
    /// A target could not be opened or an environment's folder listed: a partial catalog
    /// would drop backups, so nothing is replaced.
    #[error("{doing}: {source}; the catalog is left as it was")]
    Target {
        /// What was being done.
        doing: String,
        /// The target's error.
        #[source]
        source: TargetError,
    },
}

/// What [`scan`] found.
#[derive(Debug, Default)]
pub struct Rebuilt {
    /// The records, newest first (by `finished_ms`).
    pub records: Vec<BackupRecord>,
    /// Dated folders read, on every target.
    pub folders: usize,
    /// What was not made a record, and why, one line each.
    pub skipped: Vec<String>,
}

/// Reads the backups of `environment` on `target` (named `name` in messages): date →
/// main archive file name → manifest; adds what is skipped to `skipped`, and counts the
/// folders read into `folders`.
fn read_target(
    name: &str,
    target: &dyn Target,
    environment: &str,
    today: NaiveDate,
    (folders, skipped): (&mut usize, &mut Vec<String>),
) -> Result<BTreeMap<(NaiveDate, String), Manifest>, RebuildError> {
    let on = |doing: String| move |source| RebuildError::Target { doing, source };
    let mut read = target
        .read()
        .map_err(on(format!("opening {name} ({})", target.describe())))?;
    let env_dir = target.environment_dir(environment);
    let entries = read
        .list(&env_dir)
        .map_err(on(format!("listing {env_dir} on {name}")))?;
    let mut out = BTreeMap::new();
    for entry in entries {
        let Some(date) = NaiveDate::parse_from_str(&entry, "%Y-%m-%d")
            .ok()
            .filter(|d| d.format("%Y-%m-%d").to_string() == entry)
        else {
            if !(entry.starts_with('.') || entry.ends_with("-wal") || entry.ends_with("-oplog")) {
                skipped.push(format!(
                    "{name}: {env_dir}/{entry}: not a dated folder (a differential repository, \
                     rsync mirror or pgBackRest, is not rebuilt: its next backup records it)"
                ));
            }
            continue;
        };
        let dir = target.dated_dir(environment, date);
        if date > today {
            skipped.push(format!(
                "{name}: {dir}: dated after today ({today}): an agent's clock ran ahead, and \
                 the coordinator refused its backups"
            ));
            continue;
        }
        *folders += 1;
        let names = read
            .list(&dir)
            .map_err(on(format!("listing {dir} on {name}")))?;
        for file in names
            .iter()
            .filter(|n| !n.starts_with('.'))
            .filter_map(|n| n.strip_suffix(".json"))
        {
            match read_backup(&mut *read, &dir, file, (environment, date), &names) {
                Ok(Some(manifest)) => {
                    out.insert((date, file.to_owned()), manifest);
                }
                Ok(None) => {}
                Err(why) => skipped.push(format!("{name}: {dir}/{file}: {why}")),
            }
        }
    }
    Ok(out)
}

/// The main manifest of `file` in `dir` if it describes a whole backup; `None` for a
/// companion's manifest (its main one lists it); `Err` saying why it is not a backup.
fn read_backup(
    read: &mut dyn ReadSession,
    dir: &str,
    file: &str,
    (environment, date): (&str, NaiveDate),
    names: &[String],
) -> Result<Option<Manifest>, String> {
    let path = format!("{dir}/{file}.json");
    let bytes = read
        .read_small(&path, MAX_MANIFEST_BYTES)
        .map_err(|e| e.to_string())?;
    let m = Manifest::from_slice(&path, &bytes).map_err(|e| e.to_string())?;
    if !m.part.is_empty() {
        return Ok(None);
    }
    let date_text = date.format("%Y-%m-%d").to_string();
    if m.file != file || m.environment != environment || m.date != date_text {
        return Err(format!(
            "its manifest describes {} of {} dated {}",
            ferry_core::Bounded(&m.file),
            ferry_core::Bounded(&m.environment),
            ferry_core::Bounded(&m.date)
        ));
    }
    // Every file there, with the size its manifest gives (a stat each, nothing read).
    let mut files = vec![(file.to_owned(), m.bytes_stored)];
    for companion in &m.companions {
        let cpath = format!("{dir}/{companion}.json");
        let c = read
            .read_small(&cpath, MAX_MANIFEST_BYTES)
            .map_err(|e| format!("its companion's manifest: {e}"))
            .and_then(|b| Manifest::from_slice(&cpath, &b).map_err(|e| e.to_string()))?;
        files.push((companion.clone(), c.bytes_stored));
    }
    for (name, size) in files {
        if !names.contains(&name) {
            return Err(format!("{name} is missing"));
        }
        let found = read
            .size_version(&format!("{dir}/{name}"), None)
            .map_err(|e| e.to_string())?;
        if found != Some(size) {
            return Err(format!(
                "{name} has {} bytes, its manifest says {size}",
                found.map_or_else(|| "no".to_owned(), |s| s.to_string())
            ));
        }
    }
    Ok(Some(m))
}

/// Reads the catalog back from the targets of `settings` (see the module's doc); `today`
/// is the coordinator's date (UTC), after which a dated folder is not taken. Blocking:
/// run it on a thread of its own.
///
/// # Errors
/// [`RebuildError`] when there is no `[maintenance]` target, or a target or an
/// environment's folder cannot be read.
pub fn scan(settings: &Settings, today: NaiveDate) -> Result<Rebuilt, RebuildError> {
    let primary = settings
        .maintenance
        .clone()
        .ok_or(RebuildError::NoMaintenance)?;
    let mut environments: Vec<&str> = settings
        .agents
        .values()
        .map(|a| a.environment.as_str())
        .collect();
    environments.sort_unstable();
    environments.dedup();
    let mut out = Rebuilt::default();
    for env in environments {
        let on_primary = read_target(
            ferry_storage::PRIMARY,
            &*primary,
            env,
            today,
            (&mut out.folders, &mut out.skipped),
        )?;
        let copy_targets: Vec<(String, Arc<dyn Target>)> = settings
            .copy_to
            .get(env)
            .into_iter()
            .flatten()
            .filter_map(|n| settings.copies.get(n).map(|t| (n.clone(), t.clone())))
            .collect();
        let mut on_copies = Vec::new();
        for (name, target) in &copy_targets {
            on_copies.push((
                name.clone(),
                read_target(
                    name,
                    &**target,
                    env,
                    today,
                    (&mut out.folders, &mut out.skipped),
                )?,
            ));
        }
        let mut keys: Vec<&(NaiveDate, String)> = on_primary.keys().collect();
        for (_, found) in &on_copies {
            keys.extend(found.keys());
        }
        keys.sort_unstable();
        keys.dedup();
        let mut retain: BTreeMap<NaiveDate, Option<i64>> = BTreeMap::new();
        for key @ (date, file) in keys {
            let copies: Vec<CopyNote> = on_copies
                .iter()
                .filter_map(|(name, found)| {
                    found.get(key).map(|m| CopyNote {
                        target: name.clone(),
                        copied_ms: m.copied.unwrap_or(m.finished).timestamp_millis(),
                    })
                })
                .collect();
            let Some(manifest) = on_primary
                .get(key)
                .or_else(|| on_copies.iter().find_map(|(_, f)| f.get(key)))
            else {
                continue;
            };
            let retain_until_ms = if primary.object_lock() && on_primary.contains_key(key) {
                match retain.get(date) {
                    Some(r) => *r,
                    None => {
                        let r = crate::catalog::locks::folder_retain_until(&*primary, env, *date)
                            .map_err(|source| RebuildError::Target {
                                doing: format!(
                                    "reading the locks of {} on primary",
                                    primary.dated_dir(env, *date)
                                ),
                                source,
                            })?
                            .map(|t| t.timestamp_millis());
                        retain.insert(*date, r);
                        r
                    }
                }
            } else {
                None
            };
            out.records.push(record(
                manifest,
                format!("{}/{file}", primary.dated_dir(env, *date)),
                retain_until_ms,
                sorted(copies),
            ));
        }
    }
    out.records.sort_by(|a, b| {
        b.finished_ms
            .cmp(&a.finished_ms)
            .then(a.job_id.cmp(&b.job_id))
    });
    Ok(out)
}

/// Copy notes in the order the copier made them (by time, then name).
fn sorted(mut copies: Vec<CopyNote>) -> Vec<CopyNote> {
    copies.sort_by(|a, b| a.copied_ms.cmp(&b.copied_ms).then(a.target.cmp(&b.target)));
    copies
}

/// The catalog record of a backup whose main manifest is `m`, stored at `stored_path` on
/// the primary.
fn record(
    m: &Manifest,
    stored_path: String,
    retain_until_ms: Option<i64>,
    copies: Vec<CopyNote>,
) -> BackupRecord {
    BackupRecord {
        environment: m.environment.clone(),
        date: m.date.clone(),
        datastore: m.datastore.clone(),
        kind: m.kind.clone(),
        agent: m.agent.clone(),
        stored_path,
        size_bytes: m.bytes_stored,
        bytes_uncompressed: m.bytes_uncompressed,
        sha256: m.sha256.clone(),
        finished_ms: m.finished.timestamp_millis(),
        job_id: m
            .job_id
            .clone()
            .unwrap_or_else(|| format!("manifest:{}", m.file)),
        missing: None,
        retain_until_ms,
        lock_error: None,
        copies,
        recipients: m.recipients.iter().map(|r| r.fingerprint.clone()).collect(),
    }
}
