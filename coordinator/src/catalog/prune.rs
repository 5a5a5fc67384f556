//! `ferry prune`: the retention policies ([`crate::catalog::retention`]) applied to the catalog's
//! dated folders, and, unless it is a dry run, the folders that go removed from the
//! backup server with the coordinator's `[maintenance]` key. The newest date and the
//! newest complete backup set are always kept. Every run and every removal is audited.
//!
//! With the maintenance key, prune also lists what failed or interrupted uploads left in
//! the dated folders ([`ferry_storage::Leftover`]) and removes what is safe to
//! remove ([`judge`]): hidden partial files of jobs that have ended (at once), of jobs the
//! coordinator does not know (after [`ABANDONED_AFTER`]), never of a job still queued or
//! running; and orphan data files, under a final name but part of no committed backup
//! (after [`ORPHAN_AFTER`], and never while a backup of their environment runs).
//!
//! Archived WAL (`<environment>/<datastore>-wal/`, [`ferry_core::wal`]) goes with the base
//! backups that need it ([`wal_plan`]): every segment, `.partial` and backup history file
//! before the start segment of the oldest base backup of the datastore that is kept, none
//! while no base backup of it is kept; timeline history files always stay. MongoDB oplog
//! slices (`<environment>/<datastore>-oplog/`, [`ferry_core::oplog`]) go with the dumps
//! ([`oplog_plan`]): every slice that ended over an hour before the oldest kept dump of the
//! datastore started (its replay starts at an entry of the dump's window, after that
//! start), none while no dump of it is kept.

use std::sync::Arc;

use ferry_storage::{Leftover, LeftoverKind};

use crate::dispatch::Coordinator;
use crate::model::JobState;
use crate::store::{StoreError, blocking};

/// What prune decided for one dated folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Environment.
    pub environment: String,
    /// `YYYY-MM-DD`.
    pub date: String,
    /// Why it is kept (`newest`, `daily`, `weekly`, `monthly`, `newest complete set`,
    /// `not in the catalog` for a folder known only by its leftovers); empty: it goes.
    pub keep: Vec<String>,
    /// Catalog records in that folder.
    pub backups: u32,
    /// Their stored bytes.
    pub size_bytes: u64,
    /// It was removed.
    pub removed: bool,
    /// Files that failed or interrupted uploads left in it.
    pub leftovers: Vec<LeftoverDecision>,
    /// On a target with Object Lock ([`crate::catalog::locks`]): until when its objects
    /// are locked (a kept folder: its tier's horizon, set by this run unless it is a dry
    /// run; a dropped one: its objects' latest lock still in force, which keeps it
    /// `locked until ...`); `None` elsewhere.
    pub retain_until: Option<chrono::DateTime<chrono::Utc>>,
}

/// What prune decided for one file a failed or interrupted upload left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeftoverDecision {
    /// Full path on the backup server.
    pub path: String,
    /// `partial` (a hidden upload) or `orphan` (a data file no committed backup includes).
    pub kind: &'static str,
    /// Its size, bytes.
    pub size_bytes: u64,
    /// It goes (or would, on a dry run).
    pub remove: bool,
    /// Why it goes or stays.
    pub reason: String,
    /// It was removed.
    pub removed: bool,
}

/// What prune decided for one datastore's archived WAL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalPrune {
    /// Environment.
    pub environment: String,
    /// Datastore whose WAL or oplog it is.
    pub datastore: String,
    /// `wal` or `oplog`.
    pub kind: &'static str,
    /// The start segment of the oldest kept base backup, or for the oplog the instant
    /// before which slices end that go: everything before it goes. `None`: nothing goes
    /// (`note` says why).
    pub keep_from: Option<String>,
    /// Files before it (segments, `.partial` and backup history files; slices), which go
    /// (or would, on a dry run).
    pub going: Vec<ferry_storage::ArchivedFile>,
    /// Bytes removed (not a dry run).
    pub removed_bytes: u64,
    /// They were removed.
    pub removed: bool,
    /// Why nothing goes, or which base backup keeps what stays.
    pub note: String,
}

impl WalPrune {
    /// Nothing going yet, for `datastore`'s archive of `kind` in `environment`.
    fn new(environment: &str, datastore: &str, kind: &'static str) -> WalPrune {
        WalPrune {
            environment: environment.to_owned(),
            datastore: datastore.to_owned(),
            kind,
            keep_from: None,
            going: Vec::new(),
            removed_bytes: 0,
            removed: false,
            note: String::new(),
        }
    }
}

/// The manifest (as JSON) of the catalog record `b` of `environment` on `target`, read
/// through `session`; `None` when it cannot be read.
fn kept_manifest(
    session: &mut dyn ferry_storage::ReadSession,
    target: &dyn ferry_storage::Target,
    environment: &str,
    b: &crate::model::BackupRecord,
) -> Option<serde_json::Value> {
    let file = b.stored_path.rsplit('/').next().unwrap_or_default();
    let date = chrono::NaiveDate::parse_from_str(&b.date, "%Y-%m-%d").ok()?;
    let path = format!("{}/{file}.json", target.dated_dir(environment, date));
    let bytes = session
        .read_small(&path, ferry_core::manifest::MAX_MANIFEST_BYTES)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// What a prune run decided and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Per dated folder, newest first per environment.
    pub decisions: Vec<Decision>,
    /// Per datastore whose WAL is archived (with the maintenance key).
    pub wal: Vec<WalPrune>,
    /// The backup server was searched for leftovers (only with the maintenance key).
    pub leftovers_checked: bool,
}

/// Why prune did not finish.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// No policy, or no maintenance key for a real run; nothing was removed.
    #[error("{0}")]
    Refused(String),
    /// The storage target failed a listing or a removal; what is listed before it was
    /// removed (`after` says so).
    #[error("{doing}: {source}{after}")]
    Target {
        /// What prune was doing, e.g. `removing production/2026-02-05`.
        doing: String,
        /// What the target said.
        #[source]
        source: ferry_storage::TargetError,
        /// What had been done before, e.g. `; folders listed before it were removed`.
        after: &'static str,
    },
    /// A task that talks to the target ended without an answer (it panicked).
    #[error("a prune task failed: {0}")]
    Task(String),
    /// The store failed.
    #[error("job store: {0}")]
    Store(#[from] StoreError),
}

/// Partial uploads of jobs this coordinator does not know, untouched this long, are
/// abandoned (another coordinator's, or from before its store) and removed by prune: 24
/// hours, longer than any upload stalls.
pub const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Orphan data files untouched this long, while no backup of their environment is queued
/// or running, are removed by prune: 5 minutes, far longer than the few round trips
/// between a part's rename and its backup's last manifest.
pub const ORPHAN_AFTER: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// What the coordinator knows that decides a leftover's fate.
pub struct Known<'a> {
    /// The state of a job by id, if the store has it.
    pub job: &'a dyn Fn(&str) -> Option<JobState>,
    /// Whether a backup job of the leftover's environment is queued or running.
    pub backup_running: bool,
}

/// Whether `leftover` goes, and why.
pub fn judge(leftover: &Leftover, known: &Known<'_>) -> (bool, String) {
    let idle = leftover.idle_seconds;
    match &leftover.kind {
        LeftoverKind::Partial { job_ids } => {
            let job = job_ids
                .iter()
                .find_map(|id| (known.job)(id).map(|state| (id, state)));
            match job {
                Some((id, state)) if state.is_final() => {
                    (true, format!("its job {id} has ended ({state})"))
                }
                Some((id, state)) => (
                    false,
                    format!("its job {id} is {state}: a live job's partial is never removed"),
                ),
                None if idle >= ABANDONED_AFTER.as_secs() => (
                    true,
                    format!(
                        "untouched for {} h and its job is unknown here",
                        idle / 3600
                    ),
                ),
                None => (
                    false,
                    format!(
                        "its job is unknown here: removed once untouched for {} h ({} min so far)",
                        ABANDONED_AFTER.as_secs() / 3600,
                        idle / 60
                    ),
                ),
            }
        }
        LeftoverKind::Orphan if known.backup_running => (
            false,
            "a backup of this environment is queued or running and may be committing it".into(),
        ),
        LeftoverKind::Orphan if idle < ORPHAN_AFTER.as_secs() => (
            false,
            format!(
                "written {idle} s ago: an orphan is removed once untouched for {} min",
                ORPHAN_AFTER.as_secs() / 60
            ),
        ),
        LeftoverKind::Orphan => (
            true,
            match &leftover.manifest {
                None => "no manifest: an interrupted commit left it, and no restore or verify \
                         takes it for a backup"
                    .into(),
                Some(_) => "a companion part whose main part was never committed: no restore \
                            or verify takes it for a backup"
                    .into(),
            },
        ),
    }
}

/// Plans (and unless `dry_run`, carries out) the retention of `environment`'s dated
/// folders, or of every environment with a policy, and the removal of what failed
/// uploads left there; decisions newest first per environment.
///
/// # Errors
/// [`PruneError`].
pub async fn run(
    c: &Arc<Coordinator>,
    who: &str,
    environment: Option<&str>,
    dry_run: bool,
) -> Result<Outcome, PruneError> {
    let policies: Vec<(String, crate::catalog::retention::Policy)> = c
        .settings
        .retention
        .iter()
        .filter(|(env, _)| environment.is_none_or(|e| e == env.as_str()))
        .map(|(e, p)| (e.clone(), *p))
        .collect();
    if policies.is_empty() {
        return Err(PruneError::Refused(format!(
            "no [[retention]] policy{} in coordinator.toml",
            environment
                .map(|e| format!(" for environment {}", ferry_core::Bounded(e)))
                .unwrap_or_default()
        )));
    }
    let backups = c.backups(None).await?;
    let mut decisions = Vec::new();
    for (env, policy) in &policies {
        let of_env: Vec<_> = backups.iter().filter(|b| &b.environment == env).collect();
        let dates: Vec<chrono::NaiveDate> = of_env
            .iter()
            .filter_map(|b| chrono::NaiveDate::parse_from_str(&b.date, "%Y-%m-%d").ok())
            .collect();
        // Never the newest complete set, whatever the policy says.
        let newest_complete = crate::catalog::sets::build(env, &c.expected_members(env), &backups)
            .into_iter()
            .find(|s| s.complete())
            .map(|s| s.date);
        for d in crate::catalog::retention::plan(&dates, policy) {
            let date = d.date.format("%Y-%m-%d").to_string();
            let mut keep: Vec<String> = d.keep.iter().map(|k| (*k).to_owned()).collect();
            if newest_complete.as_deref() == Some(date.as_str()) {
                keep.push("newest complete set".into());
            }
            let in_folder: Vec<_> = of_env.iter().filter(|b| b.date == date).collect();
            decisions.push(Decision {
                environment: env.clone(),
                backups: in_folder.len() as u32,
                size_bytes: in_folder.iter().map(|b| b.size_bytes).sum(),
                date,
                keep,
                removed: false,
                leftovers: Vec::new(),
                retain_until: None,
            });
        }
    }

    // What failed uploads left, judged with what the store knows of their jobs.
    let server = c.settings.maintenance.clone();
    let mut found: Vec<(Leftover, bool, String)> = Vec::new();
    if let Some(server) = &server {
        for (env, _) in &policies {
            let (server, env_name) = (server.clone(), env.clone());
            let listed =
                tokio::task::spawn_blocking(move || server.maintain()?.leftovers(&env_name))
                    .await
                    .map_err(|e| PruneError::Task(e.to_string()))?
                    .map_err(|source| PruneError::Target {
                        doing: format!("listing what failed uploads left in {env}"),
                        source,
                        after: "",
                    })?;
            let (store, env_name) = (c.store.clone(), env.clone());
            let environments: std::collections::BTreeMap<String, String> = c
                .settings
                .agents
                .iter()
                .map(|(id, a)| (id.clone(), a.environment.clone()))
                .collect();
            let judged = blocking(move || {
                let backup_running = store.unfinished_jobs()?.iter().any(|j| {
                    j.kind == crate::model::JobKind::Backup
                        && environments.get(&j.agent) == Some(&env_name)
                });
                let mut states = std::collections::HashMap::new();
                for l in &listed {
                    if let LeftoverKind::Partial { job_ids } = &l.kind {
                        for id in job_ids {
                            if let Some(job) = store.get_job(id)? {
                                states.insert(id.clone(), job.state);
                            }
                        }
                    }
                }
                let lookup = |id: &str| states.get(id).copied();
                let known = Known {
                    job: &lookup,
                    backup_running,
                };
                Ok(listed
                    .into_iter()
                    .map(|l| {
                        let (remove, reason) = judge(&l, &known);
                        (l, remove, reason)
                    })
                    .collect::<Vec<_>>())
            })
            .await?;
            found.extend(judged);
        }
    }

    // Object Lock by tier: each kept folder's horizon; a dropped folder still locked is
    // kept, and so is a locked orphan.
    if let Some(server) = server.as_ref().filter(|t| t.object_lock()) {
        locks_plan(c, server, &policies, &mut decisions, &mut found).await?;
    }

    // Archived WAL before the oldest kept base backup of each datastore.
    let mut wal = Vec::new();
    if let Some(server) = &server {
        for (env, _) in &policies {
            let kept: Vec<crate::model::BackupRecord> = backups
                .iter()
                .filter(|b| {
                    &b.environment == env
                        && decisions.iter().any(|d| {
                            &d.environment == env && d.date == b.date && !d.keep.is_empty()
                        })
                })
                .cloned()
                .collect();
            let (server, env) = (server.clone(), env.clone());
            let env2 = env.clone();
            let planned = tokio::task::spawn_blocking(move || {
                let mut plan = wal_plan(&*server, &env2, &kept)?;
                plan.extend(oplog_plan(&*server, &env2, &kept)?);
                Ok(plan)
            })
            .await
            .map_err(|e| PruneError::Task(e.to_string()))?
            .map_err(|source| PruneError::Target {
                doing: format!("listing the archived WAL and oplog of {env}"),
                source,
                after: "",
            })?;
            wal.extend(planned);
        }
    }

    let target = environment.unwrap_or("*");
    let going = decisions.iter().filter(|d| d.keep.is_empty()).count();
    let leftovers_going = found.iter().filter(|(_, remove, _)| *remove).count();
    if dry_run {
        attach(&mut decisions, found, &[]);
        c.audit(
            who,
            "prune --dry-run",
            target,
            &format!(
                "ok: {going} folder(s) and {leftovers_going} file(s) left by failed uploads would go"
            ),
        )
        .await;
        return Ok(Outcome {
            decisions,
            wal,
            leftovers_checked: server.is_some(),
        });
    }
    let Some(server) = server else {
        let message = format!(
            "{going} dated folder(s) would go, but deleting needs the maintenance key \
             ([maintenance] in coordinator.toml): nothing was removed (use --dry-run to list them)"
        );
        c.audit(who, "prune", target, &format!("refused: {message}"))
            .await;
        return Err(PruneError::Refused(message));
    };

    // Leftovers first: the folders that go take theirs with them anyway.
    let going_leftovers: Vec<Leftover> = found
        .iter()
        .filter(|(_, remove, _)| *remove)
        .map(|(l, _, _)| l.clone())
        .collect();
    let mut removed_paths = Vec::new();
    if !going_leftovers.is_empty() {
        let server2 = server.clone();
        let removed = tokio::task::spawn_blocking(move || {
            let mut session = server2.maintain()?;
            let mut done = Vec::new();
            for l in &going_leftovers {
                match session.remove_leftover(l) {
                    Ok(bytes) => done.push((l.clone(), bytes)),
                    Err(e) => return Ok((done, Some(e))),
                }
            }
            Ok::<_, ferry_storage::TargetError>((done, None))
        })
        .await
        .map_err(|e| PruneError::Task(e.to_string()))?
        .map_err(|source| PruneError::Target {
            doing: "removing what failed uploads left".into(),
            source,
            after: "",
        })?;
        let (done, failed) = removed;
        for (env, _) in &policies {
            let of_env: Vec<_> = done.iter().filter(|(l, _)| &l.environment == env).collect();
            if !of_env.is_empty() {
                c.audit(
                    who,
                    "prune leftovers",
                    env,
                    &format!(
                        "removed {} file(s) left by failed uploads, {} bytes: {}",
                        of_env.len(),
                        of_env.iter().map(|(_, b)| b).sum::<u64>(),
                        of_env
                            .iter()
                            .map(|(l, _)| l.path.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
                .await;
            }
        }
        removed_paths = done.into_iter().map(|(l, _)| l.path).collect();
        if let Some(e) = failed {
            c.audit(who, "prune leftovers", target, &format!("failed: {e}"))
                .await;
            return Err(PruneError::Target {
                doing: "removing what failed uploads left".into(),
                source: e,
                after: "; the files listed before it were removed",
            });
        }
    }
    attach(&mut decisions, found, &removed_paths);

    if server.object_lock() {
        extend_locks(c, who, &server, &decisions).await?;
    }
    // The copies of kept folders on copy targets with locks get the same horizons.
    for d in decisions.iter().filter(|d| !d.keep.is_empty()) {
        let Some(until) = d.retain_until.filter(|u| *u > chrono::Utc::now()) else {
            continue;
        };
        let Ok(date) = chrono::NaiveDate::parse_from_str(&d.date, "%Y-%m-%d") else {
            continue;
        };
        for (name, copy) in c.copy_targets(&d.environment) {
            if !copy.object_lock() {
                continue;
            }
            let env = d.environment.clone();
            let locked = tokio::task::spawn_blocking(move || {
                crate::catalog::locks::lock_folder(&*copy, &env, date, until)
            })
            .await
            .map_err(|e| PruneError::Task(e.to_string()))?;
            if let Err(e) = locked {
                let folder = format!("{}/{} on copy target {name}", d.environment, d.date);
                c.audit(who, "prune lock", &folder, &format!("failed: {e}"))
                    .await;
                return Err(PruneError::Target {
                    doing: format!("locking {folder}"),
                    source: e,
                    after: "; folders listed before it were locked",
                });
            }
        }
    }

    for d in decisions.iter_mut().filter(|d| d.keep.is_empty()) {
        // The copies first: once the primary's folder and its catalog records are gone,
        // nothing would name the copies' any more.
        for (name, copy) in c.copy_targets(&d.environment) {
            let folder = format!("{}/{} on copy target {name}", d.environment, d.date);
            remove_folder(c, who, copy, d, &folder, true).await?;
        }
        let folder = format!("{}/{}", d.environment, d.date);
        remove_folder(c, who, server.clone(), d, &folder, false).await?;
        let (store, env, date) = (c.store.clone(), d.environment.clone(), d.date.clone());
        blocking(move || store.delete_backups(&env, &date)).await?;
        d.removed = true;
    }
    // WAL last: the base backups it served are gone by now.
    for w in wal.iter_mut().filter(|w| !w.going.is_empty()) {
        let (server2, env, datastore, files) = (
            server.clone(),
            w.environment.clone(),
            w.datastore.clone(),
            w.going.clone(),
        );
        let removed = tokio::task::spawn_blocking(move || {
            let mut session = server2.maintain()?;
            let mut bytes = 0;
            for f in &files {
                bytes += session.remove_archived_file(&env, &datastore, f)?;
            }
            Ok::<_, ferry_storage::TargetError>(bytes)
        })
        .await
        .map_err(|e| PruneError::Task(e.to_string()))?;
        let folder = format!("{}/{}-{}", w.environment, w.datastore, w.kind);
        let action = format!("prune {}", w.kind);
        match removed {
            Ok(bytes) => {
                w.removed = true;
                w.removed_bytes = bytes;
                c.audit(
                    who,
                    &action,
                    &folder,
                    &format!(
                        "removed {} file(s) before {}, {bytes} bytes",
                        w.going.len(),
                        w.keep_from.as_deref().unwrap_or_default()
                    ),
                )
                .await;
            }
            Err(e) => {
                c.audit(who, &action, &folder, &format!("failed: {e}"))
                    .await;
                return Err(PruneError::Target {
                    doing: format!("removing the archived files of {folder}"),
                    source: e,
                    after: "; the dated folders listed before it were removed",
                });
            }
        }
    }
    Ok(Outcome {
        decisions,
        wal,
        leftovers_checked: true,
    })
}

/// The archived WAL of every datastore of `environment` on `target` and what goes of it,
/// given `kept`, the catalog records in the folders the policy keeps: the files before the
/// start segment (from its manifest's `backup_label`) of the oldest kept base backup of
/// the datastore (`.tar.zst.age` records); nothing while none is kept or its manifest
/// cannot be read. Timeline history files always stay.
///
/// # Errors
/// The target's, when the archive cannot be listed.
pub fn wal_plan(
    target: &dyn ferry_storage::Target,
    environment: &str,
    kept: &[crate::model::BackupRecord],
) -> Result<Vec<WalPrune>, ferry_storage::TargetError> {
    use ferry_core::wal::{WalFileName, backup_start_segment, wal_dir};
    let env_dir = target.environment_dir(environment);
    let mut session = target.read()?;
    let mut out = Vec::new();
    for datastore in ferry_storage::wal::archived_datastores(&mut *session, &env_dir)? {
        let datastore = datastore.as_str();
        let mut plan = WalPrune::new(environment, datastore, "wal");
        let oldest = kept
            .iter()
            .filter(|b| b.datastore == datastore && b.stored_path.ends_with(".tar.zst.age"))
            .min_by_key(|b| b.finished_ms);
        let Some(oldest) = oldest else {
            plan.note = "no base backup of it is kept: every archived WAL file stays".into();
            out.push(plan);
            continue;
        };
        // Only its `counts.backup_label` is needed.
        let start = kept_manifest(&mut *session, target, environment, oldest)
            .and_then(|m| backup_start_segment(m["counts"]["backup_label"].as_str()?));
        let Some(start) = start else {
            plan.note = format!(
                "the start segment of the oldest kept base backup, {}, cannot be read from its                  manifest: every archived WAL file stays",
                oldest.stored_path
            );
            out.push(plan);
            continue;
        };
        let from = start.position().unwrap_or_default().to_owned();
        let dir = wal_dir(&env_dir, datastore);
        let mut timelines = session.list(&dir)?;
        timelines.retain(|t| t.len() == 8 && t.bytes().all(|b| b.is_ascii_hexdigit()));
        timelines.sort();
        for timeline in &timelines {
            let mut files: Vec<WalFileName> = session
                .list(&format!("{dir}/{timeline}"))?
                .iter()
                .filter_map(|n| n.strip_suffix(".zst.age"))
                .filter_map(|n| WalFileName::parse(n).ok())
                .filter(|f| f.position().is_some_and(|p| p < from.as_str()))
                .collect();
            files.sort_by(|a, b| a.name.cmp(&b.name));
            plan.going
                .extend(files.into_iter().map(ferry_storage::ArchivedFile::Wal));
        }
        plan.note = format!(
            "the oldest kept base backup, {}, starts at {}",
            oldest.stored_path, start.name
        );
        plan.keep_from = Some(start.name);
        out.push(plan);
    }
    Ok(out)
}

/// The archived oplog slices of every datastore of `environment` on `target` and what goes
/// of them, given `kept`, the catalog records in the folders the policy keeps: the slices
/// whose name says they ended more than an hour before the oldest kept dump of the
/// datastore started (its manifest's `started`; the hour allows for the agent's and the
/// server's clocks); nothing while no dump of it is kept or its manifest cannot be read.
///
/// # Errors
/// The target's, when the archive cannot be listed.
pub fn oplog_plan(
    target: &dyn ferry_storage::Target,
    environment: &str,
    kept: &[crate::model::BackupRecord],
) -> Result<Vec<WalPrune>, ferry_storage::TargetError> {
    use ferry_core::oplog::{oplog_dir, slice_instant, slice_range};
    let env_dir = target.environment_dir(environment);
    let mut session = target.read()?;
    let mut out = Vec::new();
    for datastore in ferry_storage::oplog::archived_datastores(&mut *session, &env_dir)? {
        let mut plan = WalPrune::new(environment, &datastore, "oplog");
        let oldest = kept
            .iter()
            .filter(|b| b.datastore == datastore && b.kind == "mongodb")
            .min_by_key(|b| b.finished_ms);
        let Some(oldest) = oldest else {
            plan.note = "no dump of it is kept: every oplog slice stays".into();
            out.push(plan);
            continue;
        };
        let started = kept_manifest(&mut *session, target, environment, oldest)
            .and_then(|m| chrono::DateTime::parse_from_rfc3339(m["started"].as_str()?).ok());
        let Some(started) = started else {
            plan.note = format!(
                "when the oldest kept dump, {}, started cannot be read from its manifest: every \
                 oplog slice stays",
                oldest.stored_path
            );
            out.push(plan);
            continue;
        };
        let cutoff = started.to_utc() - chrono::Duration::hours(1);
        let before = slice_instant(cutoff);
        let dir = oplog_dir(&env_dir, &datastore);
        let mut going: Vec<String> = session
            .list(&dir)?
            .into_iter()
            .filter(|n| slice_range(n).is_some_and(|(_, to)| to < cutoff))
            .collect();
        going.sort();
        plan.going = going
            .into_iter()
            .map(ferry_storage::ArchivedFile::Slice)
            .collect();
        plan.note = format!(
            "the oldest kept dump, {}, started at {}",
            oldest.stored_path,
            started.to_utc().to_rfc3339()
        );
        plan.keep_from = Some(before);
        out.push(plan);
    }
    Ok(out)
}

/// Removes the dated folder of decision `d` on `target` (named `folder` in the audit log
/// and errors); with `if_present`, a folder that is not there (a copy target that never
/// got the copy) is no error.
///
/// # Errors
/// [`PruneError::Target`] naming the folder, audited as failed.
async fn remove_folder(
    c: &Arc<Coordinator>,
    who: &str,
    target: Arc<dyn ferry_storage::Target>,
    d: &Decision,
    folder: &str,
    if_present: bool,
) -> Result<(), PruneError> {
    let (env, date) = (d.environment.clone(), d.date.clone());
    let removed =
        tokio::task::spawn_blocking(move || -> Result<(u64, u64), ferry_storage::TargetError> {
            let mut session = target.maintain()?;
            if if_present
                && let Ok(day) = ferry_core::layout::parse_date(&date)
                && session.list(&target.dated_dir(&env, day))?.is_empty()
            {
                return Ok((0, 0));
            }
            session.remove_dated_folder(&env, &date)
        })
        .await
        .map_err(|e| PruneError::Task(e.to_string()))?;
    match removed {
        Ok((files, bytes)) => {
            c.audit(
                who,
                "prune",
                folder,
                &format!("removed {files} files, {bytes} bytes"),
            )
            .await;
            Ok(())
        }
        Err(e) => {
            c.audit(who, "prune", folder, &format!("failed: {e}")).await;
            Err(PruneError::Target {
                doing: format!("removing {folder}"),
                source: e,
                after: "; folders listed before it were removed",
            })
        }
    }
}

/// The keep reason of a folder or file whose lock is still in force.
fn locked_until(at: chrono::DateTime<chrono::Utc>) -> String {
    format!("locked until {}", at.format("%Y-%m-%dT%H:%M:%SZ"))
}

/// On a target with Object Lock: sets each kept folder's `retain_until` to its tier's
/// horizon (or the later lock the catalog records), reads the locks of the folders the
/// policy drops and keeps those still locked (`locked until ...`), and keeps the orphans
/// still locked.
///
/// # Errors
/// [`PruneError::Target`] if a lock cannot be read.
async fn locks_plan(
    c: &Arc<Coordinator>,
    server: &Arc<dyn ferry_storage::Target>,
    policies: &[(String, crate::catalog::retention::Policy)],
    decisions: &mut [Decision],
    found: &mut [(Leftover, bool, String)],
) -> Result<(), PruneError> {
    let now = chrono::Utc::now();
    let backups = c.backups(None).await?;
    for d in decisions.iter_mut() {
        let Some((_, policy)) = policies.iter().find(|(e, _)| *e == d.environment) else {
            continue;
        };
        let Ok(date) = chrono::NaiveDate::parse_from_str(&d.date, "%Y-%m-%d") else {
            continue;
        };
        if d.keep.is_empty() {
            let (t, env) = (server.clone(), d.environment.clone());
            let until = tokio::task::spawn_blocking(move || {
                crate::catalog::locks::folder_retain_until(&*t, &env, date)
            })
            .await
            .map_err(|e| PruneError::Task(e.to_string()))?
            .map_err(|source| PruneError::Target {
                doing: format!("reading the locks of {}/{}", d.environment, d.date),
                source,
                after: "",
            })?;
            if let Some(at) = until.filter(|at| *at > now) {
                d.keep.push(locked_until(at));
                d.retain_until = Some(at);
            }
        } else {
            let recorded = backups
                .iter()
                .filter(|b| b.environment == d.environment && b.date == d.date)
                .filter_map(|b| b.retain_until_ms)
                .max()
                .and_then(chrono::DateTime::from_timestamp_millis);
            let horizon = crate::catalog::locks::horizon(date, policy, &d.keep);
            d.retain_until = Some(recorded.map_or(horizon, |r| r.max(horizon)));
        }
    }
    for (l, remove, reason) in found.iter_mut() {
        if !*remove || !matches!(l.kind, LeftoverKind::Orphan) {
            continue;
        }
        let (t, path) = (server.clone(), l.path.clone());
        let until = tokio::task::spawn_blocking(move || t.maintain()?.retain_until(&path))
            .await
            .map_err(|e| PruneError::Task(e.to_string()))?;
        if let Ok(Some(at)) = until
            && at > now
        {
            *remove = false;
            *reason = format!("{reason}; but {}", locked_until(at));
        }
    }
    Ok(())
}

/// Extends the locks of every folder `decisions` keeps to its `retain_until` (never
/// shortening one), and records it on the catalog's records of that folder (clearing a
/// lock failure noted when the backup finished).
///
/// # Errors
/// [`PruneError::Target`] naming the folder whose lock failed; folders before it were
/// locked.
async fn extend_locks(
    c: &Arc<Coordinator>,
    who: &str,
    server: &Arc<dyn ferry_storage::Target>,
    decisions: &[Decision],
) -> Result<(), PruneError> {
    let now = chrono::Utc::now();
    for d in decisions.iter().filter(|d| !d.keep.is_empty()) {
        let Some(until) = d.retain_until.filter(|u| *u > now) else {
            continue;
        };
        let Ok(date) = chrono::NaiveDate::parse_from_str(&d.date, "%Y-%m-%d") else {
            continue;
        };
        let (t, env) = (server.clone(), d.environment.clone());
        let locked = tokio::task::spawn_blocking(move || {
            crate::catalog::locks::lock_folder(&*t, &env, date, until)
        })
        .await
        .map_err(|e| PruneError::Task(e.to_string()))?;
        let folder = format!("{}/{}", d.environment, d.date);
        if let Err(e) = locked {
            c.audit(who, "prune lock", &folder, &format!("failed: {e}"))
                .await;
            return Err(PruneError::Target {
                doing: format!("locking {folder}"),
                source: e,
                after: "; folders listed before it were locked",
            });
        }
        let (store, env, day) = (c.store.clone(), d.environment.clone(), d.date.clone());
        let ms = until.timestamp_millis();
        blocking(move || {
            for mut r in store.list_backups(Some(&env))? {
                if r.date == day && (r.retain_until_ms != Some(ms) || r.lock_error.is_some()) {
                    r.retain_until_ms = Some(ms);
                    r.lock_error = None;
                    store.put_backup(&r)?;
                }
            }
            Ok(())
        })
        .await?;
    }
    Ok(())
}

/// Attaches each judged leftover to its folder's decision (a folder the catalog does not
/// know gets one that keeps it: `not in the catalog`), marking those in `removed`; keeps
/// the decisions newest first per environment.
fn attach(decisions: &mut Vec<Decision>, found: Vec<(Leftover, bool, String)>, removed: &[String]) {
    for (l, remove, reason) in found {
        let decision = LeftoverDecision {
            removed: removed.contains(&l.path),
            path: l.path,
            kind: match l.kind {
                LeftoverKind::Partial { .. } => "partial",
                LeftoverKind::Orphan => "orphan",
            },
            size_bytes: l.size,
            remove,
            reason,
        };
        match decisions
            .iter_mut()
            .find(|d| d.environment == l.environment && d.date == l.date)
        {
            Some(d) => d.leftovers.push(decision),
            None => decisions.push(Decision {
                environment: l.environment,
                date: l.date,
                keep: vec!["not in the catalog".into()],
                backups: 0,
                size_bytes: 0,
                removed: false,
                leftovers: vec![decision],
                retain_until: None,
            }),
        }
    }
    decisions.sort_by(|a, b| {
        a.environment
            .cmp(&b.environment)
            .then_with(|| b.date.cmp(&a.date))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftover(kind: LeftoverKind, idle_seconds: u64) -> Leftover {
        Leftover {
            environment: "production".into(),
            date: "2026-02-05".into(),
            path: "/srv/ferry/production/2026-02-05/x".into(),
            size: 10,
            idle_seconds,
            kind,
            manifest: None,
        }
    }

    fn partial(job: &str) -> LeftoverKind {
        LeftoverKind::Partial {
            job_ids: vec![job.into()],
        }
    }

    #[test]
    fn a_partial_goes_at_once_when_its_job_ended_never_while_it_lives_and_after_a_day_if_unknown() {
        let states = |id: &str| match id {
            "FAILED" => Some(JobState::Failed),
            "DONE" => Some(JobState::Succeeded),
            "RUNNING" => Some(JobState::Running),
            "RETRYING" => Some(JobState::Queued),
            _ => None,
        };
        let known = Known {
            job: &states,
            backup_running: true,
        };
        let (go, why) = judge(&leftover(partial("FAILED"), 1), &known);
        assert!(
            go && why.contains("FAILED") && why.contains("failed"),
            "{why}"
        );
        assert!(judge(&leftover(partial("DONE"), 1), &known).0);
        for live in ["RUNNING", "RETRYING"] {
            let (go, why) = judge(&leftover(partial(live), 30 * 86_400), &known);
            assert!(!go && why.contains("never"), "{why}");
        }
        assert!(!judge(&leftover(partial("OTHER"), 23 * 3600), &known).0);
        assert!(judge(&leftover(partial("OTHER"), 24 * 3600), &known).0);
        let no_id = LeftoverKind::Partial { job_ids: vec![] };
        assert!(judge(&leftover(no_id, 25 * 3600), &known).0);
    }

    #[test]
    fn an_orphan_goes_once_old_enough_and_no_backup_of_its_environment_runs() {
        let none = |_: &str| None;
        let quiet = Known {
            job: &none,
            backup_running: false,
        };
        let busy = Known {
            job: &none,
            backup_running: true,
        };
        let old = leftover(LeftoverKind::Orphan, ORPHAN_AFTER.as_secs());
        let (go, why) = judge(&old, &quiet);
        assert!(go && why.contains("no manifest"), "{why}");
        assert!(!judge(&old, &busy).0);
        assert!(!judge(&leftover(LeftoverKind::Orphan, 10), &quiet).0);
    }

    #[test]
    fn leftovers_join_their_folder_or_a_kept_one_of_their_own() {
        let mut decisions = vec![Decision {
            environment: "production".into(),
            date: "2026-02-04".into(),
            keep: vec!["newest".into()],
            backups: 1,
            size_bytes: 5,
            removed: false,
            leftovers: Vec::new(),
            retain_until: None,
        }];
        let mut today = leftover(LeftoverKind::Orphan, 600);
        today.date = "2026-02-05".into();
        let mut older = leftover(partial("X"), 1);
        older.date = "2026-02-04".into();
        older.path = "/srv/ferry/production/2026-02-04/.p.partial".into();
        attach(
            &mut decisions,
            vec![(today, true, "why".into()), (older, false, "why".into())],
            &["/srv/ferry/production/2026-02-05/x".into()],
        );
        assert_eq!(decisions.len(), 2);
        assert_eq!(decisions[0].date, "2026-02-05");
        assert_eq!(decisions[0].keep, ["not in the catalog"]);
        assert!(decisions[0].leftovers[0].removed);
        assert_eq!(decisions[1].leftovers[0].kind, "partial");
        assert!(!decisions[1].leftovers[0].removed);
    }

    /// A committed backup of `date` on `target`, with a record in `c`'s catalog.
    fn backed_up(c: &Coordinator, target: &ferry_storage::memory::MemoryTarget, date: &str) {
        use ferry_storage::Target as _;
        // One job a date: the catalog keeps a record per job.
        let job = format!("01KBX8Z3E5M1Q2W3E4R5T6{}", &date.replace('-', "")[4..]);
        let file = ferry_core::layout::StoredFile {
            dir: format!("/srv/ferry/production/{date}"),
            name: format!("pg_backup_{date}.pgdump.zst.age"),
        };
        let mut w = target.write().unwrap();
        let (tx, rx) = ferry_storage::chunk::channel();
        tx.send(b"ciphertext".to_vec()).unwrap();
        drop(tx);
        let staged = w.stage(&file, &job, rx).unwrap();
        w.commit(&job, &[(staged, b"{}".to_vec())]).unwrap();
        c.store
            .put_backup(&crate::model::BackupRecord {
                environment: "production".into(),
                date: date.into(),
                datastore: "pg".into(),
                kind: "postgres".into(),
                agent: "db1".into(),
                stored_path: file.path(),
                size_bytes: 10,
                bytes_uncompressed: 10,
                sha256: String::new(),
                finished_ms: 0,
                job_id: job,
                missing: None,
                retain_until_ms: None,
                lock_error: None,
                copies: Vec::new(),
                recipients: Vec::new(),
            })
            .unwrap();
    }

    #[tokio::test]
    async fn prune_removes_what_the_policy_drops_through_the_maintain_session_and_keeps_a_live_partial()
     {
        use ferry_storage::Target as _;
        let dir = tempfile::tempdir().unwrap();
        let c =
            crate::dispatch::test_coordinator(dir.path(), &[], std::time::Duration::from_secs(60));
        let mut c = Arc::into_inner(c).expect("no other reference yet");
        let target = ferry_storage::memory::MemoryTarget::new("/srv/ferry");
        c.settings.maintenance = Some(Arc::new(target.clone()));
        c.settings.retention.insert(
            "production".into(),
            crate::catalog::retention::Policy {
                keep_daily: 1,
                keep_weekly: 0,
                keep_monthly: 0,
            },
        );
        let c = Arc::new(c);
        backed_up(&c, &target, "2026-02-04");
        backed_up(&c, &target, "2026-02-05");
        // An upload of a job this coordinator does not know, just written: it stays.
        let file = ferry_core::layout::StoredFile {
            dir: "/srv/ferry/production/2026-02-05".into(),
            name: "pg_backup_2026-02-05T0300Z.pgdump.zst.age".into(),
        };
        let (tx, rx) = ferry_storage::chunk::channel();
        drop(tx);
        let partial = target
            .write()
            .unwrap()
            .stage(&file, "01KBX8Z3E5M1Q2W3E4R5T6Y7U9", rx)
            .unwrap()
            .partial;

        let outcome = run(&c, "tester", Some("production"), false).await.unwrap();
        let dates: Vec<(&str, bool)> = outcome
            .decisions
            .iter()
            .map(|d| (d.date.as_str(), d.removed))
            .collect();
        assert_eq!(dates, [("2026-02-05", false), ("2026-02-04", true)]);
        assert!(outcome.leftovers_checked);
        let left = &outcome.decisions[0].leftovers;
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(
            (left[0].path.as_str(), left[0].kind),
            (partial.as_str(), "partial")
        );
        assert!(!left[0].remove && !left[0].removed, "{:?}", left[0]);
        assert_eq!(
            target.paths(),
            [
                partial,
                "/srv/ferry/production/2026-02-05/pg_backup_2026-02-05.pgdump.zst.age".into(),
                "/srv/ferry/production/2026-02-05/pg_backup_2026-02-05.pgdump.zst.age.json".into(),
            ]
        );
    }

    /// Puts a file of `date` on `target` (rooted at `root`), as a copy would.
    fn copied(target: &ferry_storage::memory::MemoryTarget, root: &str, date: &str) {
        use ferry_storage::Target as _;
        let file = ferry_core::layout::StoredFile {
            dir: format!("{root}/production/{date}"),
            name: format!("pg_backup_{date}.pgdump.zst.age"),
        };
        let mut w = target.write().unwrap();
        let (tx, rx) = ferry_storage::chunk::channel();
        tx.send(b"ciphertext".to_vec()).unwrap();
        drop(tx);
        let staged = w.stage(&file, "copy", rx).unwrap();
        w.commit("copy", &[(staged, b"{}".to_vec())]).unwrap();
    }

    #[tokio::test]
    async fn prune_removes_a_dropped_folder_from_the_copy_targets_too_and_one_never_copied_is_no_error()
     {
        let dir = tempfile::tempdir().unwrap();
        let c =
            crate::dispatch::test_coordinator(dir.path(), &[], std::time::Duration::from_secs(60));
        let mut c = Arc::into_inner(c).expect("no other reference yet");
        let target = ferry_storage::memory::MemoryTarget::new("/srv/ferry");
        let copy = ferry_storage::memory::MemoryTarget::new("/copy");
        c.settings.maintenance = Some(Arc::new(target.clone()));
        c.settings
            .copies
            .insert("offsite".into(), Arc::new(copy.clone()));
        c.settings
            .copy_to
            .insert("production".into(), vec!["offsite".into()]);
        c.settings.retention.insert(
            "production".into(),
            crate::catalog::retention::Policy {
                keep_daily: 1,
                keep_weekly: 0,
                keep_monthly: 0,
            },
        );
        let c = Arc::new(c);
        for date in ["2026-02-03", "2026-02-04", "2026-02-05"] {
            backed_up(&c, &target, date);
        }
        // 2026-02-03 never reached the copy target.
        copied(&copy, "/copy", "2026-02-04");
        copied(&copy, "/copy", "2026-02-05");

        let outcome = run(&c, "tester", Some("production"), false).await.unwrap();
        let removed: Vec<&str> = outcome
            .decisions
            .iter()
            .filter(|d| d.removed)
            .map(|d| d.date.as_str())
            .collect();
        assert_eq!(removed, ["2026-02-04", "2026-02-03"]);
        assert_eq!(
            copy.paths(),
            [
                "/copy/production/2026-02-05/pg_backup_2026-02-05.pgdump.zst.age",
                "/copy/production/2026-02-05/pg_backup_2026-02-05.pgdump.zst.age.json",
            ]
        );
        let audit = c.audit_log(None).await.unwrap();
        assert!(
            audit.iter().any(
                |e| e.target == "production/2026-02-04 on copy target offsite"
                    && e.outcome.starts_with("removed 2 files")
            ),
            "{audit:?}"
        );
    }

    /// A catalog record of a physical base backup of `pgbase` on `date` (`finished_ms`),
    /// and its manifest on `target` naming `start` in its `backup_label`.
    fn base_backup(
        target: &ferry_storage::memory::MemoryTarget,
        date: &str,
        finished_ms: i64,
        start: &str,
    ) -> crate::model::BackupRecord {
        let name = format!("pgbase_backup_{date}T{finished_ms:04}Z.tar.zst.age");
        let path = format!("/srv/ferry/production/{date}/{name}");
        let label = format!("START WAL LOCATION: 0/1 (file {start})\nCHECKPOINT LOCATION: 0/2\n");
        let manifest = serde_json::json!({ "counts": { "backup_label": label } });
        target.insert(&path, b"ciphertext");
        target.insert(&format!("{path}.json"), manifest.to_string().as_bytes());
        crate::model::BackupRecord {
            environment: "production".into(),
            date: date.into(),
            datastore: "pgbase".into(),
            kind: "postgres".into(),
            agent: "db1".into(),
            stored_path: path,
            size_bytes: 10,
            bytes_uncompressed: 10,
            sha256: String::new(),
            finished_ms,
            job_id: String::new(),
            missing: None,
            retain_until_ms: None,
            lock_error: None,
            copies: Vec::new(),
            recipients: Vec::new(),
        }
    }

    #[test]
    fn archived_wal_before_the_oldest_kept_base_backup_goes_and_history_files_stay() {
        let target = ferry_storage::memory::MemoryTarget::new("/srv/ferry");
        let wal = "/srv/ferry/production/pgbase-wal";
        for file in [
            "00000001/000000010000000000000002",
            "00000001/000000010000000000000003.00000028.backup",
            "00000001/000000010000000000000004",
            "00000001/000000010000000000000005",
            "00000001/000000010000000000000006.partial",
            "00000002/00000002.history",
            "00000002/000000020000000000000003",
            "00000002/000000020000000000000006",
        ] {
            target.insert(&format!("{wal}/{file}.zst.age"), b"wal");
            target.insert(&format!("{wal}/{file}.zst.age.json"), b"{}");
        }
        let older = base_backup(&target, "2026-02-04", 1, "000000010000000000000003");
        let newer = base_backup(&target, "2026-02-05", 2, "000000010000000000000005");
        let names = |plan: &WalPrune| -> Vec<String> {
            plan.going.iter().map(|f| f.name().to_owned()).collect()
        };

        // Both kept: everything before the older one's start goes, on every timeline.
        let plan = wal_plan(&target, "production", &[newer.clone(), older]).unwrap();
        assert_eq!(plan.len(), 1, "{plan:?}");
        assert_eq!(
            plan[0].keep_from.as_deref(),
            Some("000000010000000000000003")
        );
        assert_eq!(names(&plan[0]), ["000000010000000000000002"]);

        // Only the newer one kept: up to its start, the history file staying.
        let plan = wal_plan(&target, "production", std::slice::from_ref(&newer)).unwrap();
        assert_eq!(
            names(&plan[0]),
            [
                "000000010000000000000002",
                "000000010000000000000003.00000028.backup",
                "000000010000000000000004",
                "000000020000000000000003",
            ]
        );
        let mut session = ferry_storage::Target::maintain(&target).unwrap();
        for f in &plan[0].going {
            assert_eq!(
                session
                    .remove_archived_file("production", "pgbase", f)
                    .unwrap(),
                3
            );
        }
        let left: Vec<String> = target
            .paths()
            .into_iter()
            .filter_map(|p| p.strip_prefix(&format!("{wal}/")).map(str::to_owned))
            .filter(|p| !p.ends_with(".json"))
            .collect();
        assert_eq!(
            left,
            [
                "00000001/000000010000000000000005.zst.age",
                "00000001/000000010000000000000006.partial.zst.age",
                "00000002/00000002.history.zst.age",
                "00000002/000000020000000000000006.zst.age",
            ]
        );

        // No base backup kept (or only logical ones): everything stays.
        let plan = wal_plan(&target, "production", &[]).unwrap();
        assert!(
            plan[0].going.is_empty() && plan[0].keep_from.is_none(),
            "{plan:?}"
        );
        assert!(plan[0].note.contains("every archived WAL file stays"));
    }

    #[test]
    fn oplog_slices_ended_an_hour_before_the_oldest_kept_dump_started_go() {
        use ferry_storage::Target;
        let target = ferry_storage::memory::MemoryTarget::new("/srv/ferry");
        let dir = "/srv/ferry/production/mongo-oplog";
        let slices = [
            "20260203T220000.000Z-20260203T220100.000Z.bson.zst.age",
            "20260203T225900.000Z-20260203T225959.000Z.bson.zst.age",
            // Ends 30 minutes before the dump started: within the hour, it stays.
            "20260203T233000.000Z-20260203T233000.500Z.bson.zst.age",
            "20260204T000000.000Z-20260204T000100.000Z.bson.zst.age",
        ];
        for name in slices {
            target.insert(&format!("{dir}/{name}"), b"slice");
            target.insert(&format!("{dir}/{name}.json"), b"{}");
        }
        let mut dump = base_backup(&target, "2026-02-04", 5, "x");
        dump.datastore = "mongo".into();
        dump.kind = "mongodb".into();
        target.insert(
            &format!("{}.json", dump.stored_path),
            serde_json::json!({"started": "2026-02-04T00:00:00Z"})
                .to_string()
                .as_bytes(),
        );
        let plan = oplog_plan(&target, "production", std::slice::from_ref(&dump)).unwrap();
        assert_eq!(plan.len(), 1);
        let going: Vec<&str> = plan[0].going.iter().map(|f| f.name()).collect();
        assert_eq!(going, &slices[..2]);
        assert_eq!(plan[0].kind, "oplog");
        assert_eq!(plan[0].keep_from.as_deref(), Some("20260203T230000.000Z"));
        // Nothing goes without a kept dump.
        let plan = oplog_plan(&target, "production", &[]).unwrap();
        assert!(
            plan[0].going.is_empty() && plan[0].note.contains("no dump"),
            "{plan:?}"
        );
        // Removing one takes its record too; a name outside the layout is refused.
        let mut session = target.maintain().unwrap();
        let first = ferry_storage::ArchivedFile::Slice(slices[0].into());
        assert_eq!(
            session
                .remove_archived_file("production", "mongo", &first)
                .unwrap(),
            5
        );
        assert!(!target.paths().iter().any(|p| p.contains(slices[0])));
        let bad = ferry_storage::ArchivedFile::Slice("../x".into());
        assert!(
            session
                .remove_archived_file("production", "mongo", &bad)
                .is_err()
        );
    }
}
