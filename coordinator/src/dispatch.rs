//! The coordinator's domain service: turning triggers into jobs, sending orders to
//! agents, following their event streams, persisting every transition, retrying with
//! back-off, and failing jobs whose agent goes silent.

use std::sync::Arc;
use std::time::Duration;

use ferry_core::restore_set::{SetOutcome, set_outcome};
use ferry_core::{Bounded, layout};
use ferry_proto::status::describe_status;
use ferry_proto::v1;
use ferry_proto::v1::job_event::Event;
use tokio_util::sync::CancellationToken;

use crate::agents::AgentPool;
use crate::config::Settings;
use crate::model::{
    BackupRecord, Job, JobEventRecord, JobKind, JobResult, JobState, MissingNote, Progress,
};
use crate::store::Store;

/// A trigger refused by the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// Contrary to the role split.
    #[error("{0}")]
    PermissionDenied(String),
    /// Unknown agent or datastore, malformed date.
    #[error("{0}")]
    InvalidArgument(String),
    /// The agent cannot be used now.
    #[error("{0}")]
    Unavailable(String),
    /// Nothing to restore: no backup set, or not a complete one.
    #[error("{0}")]
    NotFound(String),
    /// The store failed.
    #[error("job store: {0}")]
    Store(String),
}

impl From<DispatchError> for tonic::Status {
    fn from(e: DispatchError) -> Self {
        match e {
            DispatchError::PermissionDenied(m) => tonic::Status::permission_denied(m),
            DispatchError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            DispatchError::Unavailable(m) => tonic::Status::unavailable(m),
            DispatchError::NotFound(m) => tonic::Status::not_found(m),
            DispatchError::Store(m) => tonic::Status::internal(format!("job store: {m}")),
        }
    }
}

/// What of a datastore a job selects: for restores a date and namespaces, for backups a
/// backup type (`full` or `diff`, pgBackRest). All empty by default.
#[derive(Clone, Copy, Debug, Default)]
pub struct Selection<'a> {
    /// Restore: `YYYY-MM-DD`, or the newest.
    pub date: Option<&'a str>,
    /// Restore: only these `db.collection` namespaces; empty for all.
    pub namespaces: &'a [String],
    /// Backup: `full` or `diff`; the datastore's default when `None`.
    pub backup_type: Option<&'a str>,
    /// Scheduled runs: the schedule's key ([`schedule_key`]) and the occurrence (UTC
    /// ms) the jobs run for; the jobs are stored only if the schedule has not run for
    /// it yet ([`Store::queue_jobs`]).
    pub occurrence: Option<(&'a str, i64)>,
    /// Restore: check every datastore's backup first and restore none unless all pass.
    pub all_or_nothing: bool,
}

impl Selection<'_> {
    /// `agent/datastore` (`*` for all) with the date, namespaces and backup type, for
    /// the audit log.
    pub fn describe(&self, agent: &str, datastore: Option<&str>) -> String {
        let mut s = format!("{agent}/{}", datastore.unwrap_or("*"));
        if let Some(d) = self.date {
            s.push_str(&format!(" date {d}"));
        }
        if !self.namespaces.is_empty() {
            s.push_str(&format!(" ns {}", self.namespaces.join(",")));
        }
        if let Some(t) = self.backup_type {
            s.push_str(&format!(" type {t}"));
        }
        if self.all_or_nothing {
            s.push_str(" all-or-nothing");
        }
        s
    }
}

/// Whether a catalog record is a dated archive (`.age`, read by file name) rather than a
/// differential repository (pgBackRest, rsync mirror: recorded as its folder, restored by
/// date).
fn is_archive(r: &BackupRecord) -> bool {
    r.stored_path
        .rsplit('/')
        .next()
        .is_some_and(|f| f.ends_with(".age"))
}

/// How far ahead of the coordinator's clock an agent's may be before its backups count as
/// dated in the future: clocks a few minutes apart are normal (a backup started at
/// 23:58 on an agent 3 minutes ahead is dated tomorrow, and that is fine).
pub const CLOCK_TOLERANCE: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// Why a backup `result` of `agent` must not enter the catalog: its date (the agent's
/// clock, which names the dated folder) is after the coordinator's date at `now` plus
/// [`CLOCK_TOLERANCE`]. `None` when the date is fine.
pub fn future_dated(
    agent: &str,
    result: &JobResult,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<String> {
    let date = chrono::NaiveDate::parse_from_str(&result.date, "%Y-%m-%d").ok()?;
    let latest = (now + CLOCK_TOLERANCE).date_naive();
    (date > latest).then(|| {
        format!(
            "refused backup {}: it is dated {} by agent {agent}'s clock, but by the \
             coordinator's clock it is {} (UTC), so the agent's clock is ahead; it is not \
             recorded in the catalog, and no restore or verify takes it (its file stays on \
             the backup server, outside the catalog, until prune removes its folder). Set \
             the clock of {agent}'s host right (NTP), then back up again",
            result.stored_path,
            result.date,
            now.format("%Y-%m-%d %H:%M")
        )
    })
}

/// Who triggers scheduled runs, in jobs and in the audit log.
pub const SCHEDULE: &str = "schedule";

/// A schedule's identity in the store: what it runs and when (agent, datastore or `*`,
/// kind, backup type, cron text), so an edited schedule starts afresh.
pub fn schedule_key(s: &crate::config::Schedule) -> String {
    format!(
        "{}/{} {} {} {}",
        s.agent,
        s.datastore.as_deref().unwrap_or("*"),
        s.kind,
        s.backup_type.as_deref().unwrap_or("-"),
        s.cron_text
    )
}

/// How many datastore names a refusal lists before `... and N more`.
const LISTED_DATASTORES: usize = 20;

/// Checks an order of `datastore` against what its agent described: the datastore exists,
/// a backup type is one it takes, namespaces only where a restore can select them.
///
/// # Errors
/// [`DispatchError::InvalidArgument`] naming the agent, the datastore and what it accepts.
fn check_order(
    described: &v1::DescribeResponse,
    datastore: &str,
    backup_type: Option<&str>,
    namespaces: &[String],
) -> Result<(), DispatchError> {
    let agent = &described.agent_id;
    let Some(info) = described.datastores.iter().find(|d| d.name == datastore) else {
        let mut names: Vec<&str> = described
            .datastores
            .iter()
            .take(LISTED_DATASTORES)
            .map(|d| d.name.as_str())
            .collect();
        let more = described.datastores.len().saturating_sub(LISTED_DATASTORES);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        if names.is_empty() {
            names.push("none");
        }
        return Err(DispatchError::InvalidArgument(format!(
            "agent {agent} has no datastore {}; it has: {}{more} (see `ferry agents`)",
            Bounded(datastore),
            names.join(", ")
        )));
    };
    if let Some(t) = backup_type
        && !info.backup_types.iter().any(|b| b == t)
    {
        return Err(DispatchError::InvalidArgument(
            if info.backup_types.is_empty() {
                format!(
                    "datastore {} on agent {agent} ({}) takes no backup type: leave out --type",
                    Bounded(datastore),
                    info.kind
                )
            } else {
                format!(
                    "datastore {} on agent {agent} ({}) takes backup type {}, not {}",
                    Bounded(datastore),
                    info.kind,
                    info.backup_types.join(" or "),
                    Bounded(t)
                )
            },
        ));
    }
    if !namespaces.is_empty() && !info.namespaces {
        return Err(DispatchError::InvalidArgument(format!(
            "datastore {} on agent {agent} ({}) is restored whole: it has no namespaces to \
             select with --ns",
            Bounded(datastore),
            info.kind
        )));
    }
    Ok(())
}

/// The coordinator's state shared by handlers, the scheduler and job tasks.
pub struct Coordinator {
    /// Validated settings.
    pub settings: Settings,
    /// The store.
    pub store: Arc<dyn Store>,
    /// The agents.
    pub agents: Arc<AgentPool>,
    /// Cancelled at shutdown.
    pub shutdown: CancellationToken,
    /// Counters for `/metrics`.
    pub counters: crate::metrics::Counters,
}

/// Where one attempt ended.
enum Attempt {
    Succeeded(JobResult),
    Failed {
        message: String,
        retryable: bool,
    },
    /// A restore or verify found the backup it was ordered to read gone from the backup
    /// server (the agent's `NotFound`): a final failure, and the catalog record is marked.
    Missing {
        message: String,
    },
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, DispatchError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DispatchError::Store(e.to_string()))?
        .map_err(|e| DispatchError::Store(e.to_string()))
}

impl Coordinator {
    /// Appends to the audit log ([`ferry_core::audit`]); a store failure is logged as an error
    /// (the command itself already happened).
    pub async fn audit(&self, who: &str, action: &str, target: &str, outcome: &str) {
        let store = self.store.clone();
        let (who, action, target, outcome) = (
            who.to_owned(),
            action.to_owned(),
            target.to_owned(),
            outcome.to_owned(),
        );
        if let Err(e) = blocking(move || store.append_audit(&who, &action, &target, &outcome)).await
        {
            tracing::error!(error = %e, "Could not append to the audit log.");
        }
    }

    /// The datastores of `agent`: those it described, then those its schedules name.
    fn datastores_of(&self, agent: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .agents
            .state(agent)
            .described
            .map(|d| d.datastores.into_iter().map(|d| d.name).collect())
            .unwrap_or_default();
        for s in self.settings.schedules.iter().filter(|s| s.agent == agent) {
            if let Some(d) = &s.datastore
                && !names.contains(d)
            {
                names.push(d.clone());
            }
        }
        names
    }

    /// The production datastores of `environment`: `(agent, datastore)` for every
    /// production agent there, its described datastores and those its schedules name.
    pub fn expected_members(&self, environment: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for a in self
            .agents
            .all()
            .filter(|a| a.environment == environment && a.role.may_backup())
        {
            out.extend(
                self.datastores_of(&a.id)
                    .into_iter()
                    .map(|n| (a.id.clone(), n)),
            );
        }
        out
    }

    /// The environments that have production agents, sorted.
    pub fn production_environments(&self) -> Vec<String> {
        let mut envs: Vec<String> = self
            .agents
            .all()
            .filter(|a| a.role.may_backup())
            .map(|a| a.environment.clone())
            .collect();
        envs.sort();
        envs.dedup();
        envs
    }

    /// The backup sets of `environment` (every environment with production agents when
    /// `None`), newest first by their members' finish times ([`crate::sets`]); the catalog
    /// is read once.
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn sets(
        &self,
        environment: Option<&str>,
    ) -> Result<Vec<crate::sets::BackupSet>, DispatchError> {
        let store = self.store.clone();
        let backups = blocking(move || store.list_backups(None)).await?;
        let mut sets: Vec<crate::sets::BackupSet> = match environment {
            Some(e) => vec![e.to_owned()],
            None => self.production_environments(),
        }
        .iter()
        .flat_map(|e| crate::sets::build(e, &self.expected_members(e), &backups))
        .collect();
        // Newest first by when their backups finished (the coordinator's clock), not by
        // folder name: an agent's clock that ran ahead named later folders for older data.
        sets.sort_by(|a, b| {
            b.finished_ms()
                .cmp(&a.finished_ms())
                .then(b.date.cmp(&a.date))
                .then(a.environment.cmp(&b.environment))
        });
        Ok(sets)
    }

    /// The date a staging agent restores all its datastores from: `date`'s set if given,
    /// else the newest complete set of its source environment. Refuses an incomplete set.
    async fn set_date(
        &self,
        agent: &str,
        source_environment: &str,
        date: Option<&str>,
    ) -> Result<String, DispatchError> {
        if source_environment.is_empty() {
            return Err(DispatchError::InvalidArgument(format!(
                "agent {agent} does not say which environment it restores from; give --datastore, or upgrade it"
            )));
        }
        let sets = self.sets(Some(source_environment)).await?;
        let describe = |s: &crate::sets::BackupSet| {
            format!(
                "the set of {} {} is incomplete (missing {})",
                s.environment,
                s.date,
                s.missing().join(", ")
            )
        };
        match date {
            Some(d) => match sets.iter().find(|s| s.date == d) {
                Some(s) if s.complete() => Ok(d.to_owned()),
                Some(s) => Err(DispatchError::NotFound(format!(
                    "{}: restore datastores one by one with --datastore, or choose another date",
                    describe(s)
                ))),
                None => Err(DispatchError::NotFound(format!(
                    "no backups of {source_environment} dated {d}"
                ))),
            },
            None => match sets.iter().find(|s| s.complete()) {
                Some(s) => Ok(s.date.clone()),
                None => Err(DispatchError::NotFound(match sets.first() {
                    Some(newest) => format!(
                        "no complete backup set of {source_environment}: {}",
                        describe(newest)
                    ),
                    None => format!("no backups of {source_environment} yet"),
                })),
            },
        }
    }

    /// Every (agent, datastore) the coordinator knows of (described by the agent or named
    /// by a schedule) with its newest jobs, in inventory order.
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn datastore_states(
        &self,
    ) -> Result<Vec<(crate::config::Agent, String, crate::store::LatestJobs)>, DispatchError> {
        let mut pairs = Vec::new();
        for a in self.agents.all() {
            for n in self.datastores_of(&a.id) {
                pairs.push((a.clone(), n));
            }
        }
        let keys: Vec<(String, String)> = pairs
            .iter()
            .map(|(a, n)| (a.id.clone(), n.clone()))
            .collect();
        let store = self.store.clone();
        let latest = blocking(move || {
            keys.iter()
                .map(|(a, n)| store.latest_jobs(a, n))
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
        Ok(pairs
            .into_iter()
            .zip(latest)
            .map(|((a, n), l)| (a, n, l))
            .collect())
    }

    /// What `agent` last said of itself in `Describe`, asking it now if it never answered.
    ///
    /// # Errors
    /// [`DispatchError::Unavailable`]: it never answered, so what it has is unknown.
    async fn description(&self, agent: &str) -> Result<v1::DescribeResponse, DispatchError> {
        if let Some(d) = self.agents.state(agent).described {
            return Ok(d);
        }
        self.agents.describe(agent).await.map_err(|problem| {
            DispatchError::Unavailable(format!(
                "agent {agent} has not described itself yet, so what it has is unknown: \
                 {problem}; try again once `ferry agents` shows it reachable"
            ))
        })
    }

    /// [`Coordinator::description`] for an order of `datastore`: asks the agent again if
    /// its last description lacks the datastore (it may have been added since). A
    /// scheduled run on an agent that never answered gets `None` and queues its job
    /// anyway: the job's attempts retry while the agent is away and fail visibly if it
    /// stays away, where a refused trigger would leave only a log line.
    ///
    /// # Errors
    /// As [`Coordinator::description`], for an operator's trigger.
    async fn description_with(
        &self,
        agent: &str,
        datastore: &str,
        trigger: &str,
    ) -> Result<Option<v1::DescribeResponse>, DispatchError> {
        let has = |d: &v1::DescribeResponse| d.datastores.iter().any(|i| i.name == datastore);
        match self.agents.state(agent).described {
            Some(d) if has(&d) => Ok(Some(d)),
            Some(d) => Ok(Some(self.agents.describe(agent).await.unwrap_or(d))),
            None => match self.description(agent).await {
                Ok(d) => Ok(Some(d)),
                Err(_) if trigger == SCHEDULE => Ok(None),
                Err(e) => Err(e),
            },
        }
    }

    async fn put(&self, job: &Job) {
        let store = self.store.clone();
        let job = job.clone();
        if let Err(e) = blocking(move || store.put_job(&job)).await {
            tracing::error!(error = %e, error_type = "store", "Could not persist a job.");
        }
    }

    async fn event(&self, job: &Job, message: String) {
        tracing::info!(job_id = %job.id, agent = %job.agent, datastore = %job.datastore, "{message}");
        let store = self.store.clone();
        let record = JobEventRecord {
            job_id: job.id.clone(),
            at_ms: ferry_proto::now_unix_ms(),
            message,
        };
        if let Err(e) = blocking(move || store.append_event(&record)).await {
            tracing::error!(error = %e, error_type = "store", "Could not persist a job event.");
        }
    }

    /// Creates jobs for a backup, restore or verify of `datastore` (all of the agent's
    /// when `None`) on `agent` and starts them, on behalf of `who` (an operator's
    /// certificate name, or [`SCHEDULE`]). Refuses what the role split forbids. Either
    /// way the request and its outcome go in the audit log.
    ///
    /// # Errors
    /// [`DispatchError`].
    pub async fn trigger(
        self: &Arc<Self>,
        kind: JobKind,
        agent: &str,
        datastore: Option<&str>,
        selection: &Selection<'_>,
        who: &str,
    ) -> Result<Vec<String>, DispatchError> {
        let trigger = if who == SCHEDULE {
            SCHEDULE
        } else {
            "operator"
        };
        let result = self
            .start_jobs(kind, agent, datastore, selection, trigger)
            .await;
        let outcome = match &result {
            Ok(ids) => format!("ok: jobs {}", ids.join(", ")),
            Err(e) => format!("refused: {e}"),
        };
        // Bounded: a refused trigger may carry a name of any length.
        let target: String = selection
            .describe(agent, datastore)
            .chars()
            .take(300)
            .collect();
        let outcome: String = outcome.chars().take(500).collect();
        self.audit(who, &format!("trigger {kind}"), &target, &outcome)
            .await;
        result
    }

    /// [`Coordinator::trigger`] without the audit entry; `trigger` is the jobs' `trigger`
    /// field (`operator` or `schedule`).
    async fn start_jobs(
        self: &Arc<Self>,
        kind: JobKind,
        agent: &str,
        datastore: Option<&str>,
        selection: &Selection<'_>,
        trigger: &str,
    ) -> Result<Vec<String>, DispatchError> {
        let Selection {
            date,
            namespaces,
            backup_type,
            occurrence: _,
            all_or_nothing,
        } = *selection;
        if all_or_nothing && kind != JobKind::Restore {
            return Err(DispatchError::InvalidArgument(
                "--all-or-nothing is for restores: a verify checks each backup on its own".into(),
            ));
        }
        // Names and dates that could leave the backup server's layout (`/`, `..`, NUL,
        // overlong) go no further.
        let invalid = |e: layout::NameError| DispatchError::InvalidArgument(e.to_string());
        layout::validate_name("agent", agent).map_err(invalid)?;
        if let Some(d) = datastore {
            layout::validate_name("datastore", d).map_err(invalid)?;
        }
        if let Some(d) = date {
            layout::parse_date(d).map_err(invalid)?;
        }
        if let Some(t) = backup_type {
            if kind != JobKind::Backup || datastore.is_none() {
                return Err(DispatchError::InvalidArgument(
                    "a backup type selects how one datastore is backed up: give the datastore too"
                        .into(),
                ));
            }
            if !["full", "diff"].contains(&t) {
                return Err(DispatchError::InvalidArgument(format!(
                    "backup type {} is not full or diff",
                    Bounded(t)
                )));
            }
        }
        let entry = self.agents.get(agent).ok_or_else(|| {
            DispatchError::InvalidArgument(format!("agent {agent:?} is not in the inventory"))
        })?;
        let allowed = match kind {
            JobKind::Backup => entry.role.may_backup(),
            JobKind::Restore | JobKind::Verify => entry.role.may_restore(),
        };
        if !allowed {
            return Err(DispatchError::PermissionDenied(format!(
                "refusing to {kind} on agent {agent}: its role is {}; {}",
                entry.role,
                if entry.role.may_backup() {
                    "production agents only back up"
                } else {
                    "staging agents only restore"
                }
            )));
        }
        if !namespaces.is_empty() {
            if kind != JobKind::Restore || datastore.is_none() {
                return Err(DispatchError::InvalidArgument(
                    "namespaces select what to restore of one datastore: give --datastore too \
                     (a backup or a verify takes none)"
                        .into(),
                ));
            }
            if let Some(bad) = namespaces.iter().find(|n| !ferry_proto::valid_namespace(n)) {
                return Err(DispatchError::InvalidArgument(format!(
                    "namespace {} is not of the form database.collection",
                    Bounded(bad)
                )));
            }
        }
        if let Some(name) = datastore {
            // What the agent would refuse, refused before any job exists.
            if let Some(described) = self.description_with(agent, name, trigger).await? {
                check_order(&described, name, backup_type, namespaces)?;
            }
        }
        let mut date = date.map(str::to_owned);
        let mut set_environment = None;
        let datastores = match datastore {
            Some(d) => vec![d.to_owned()],
            None => {
                let described = self.description(agent).await?;
                if kind != JobKind::Backup {
                    // All datastores at once: from one complete set.
                    date = Some(
                        self.set_date(agent, &described.source_environment, date.as_deref())
                            .await?,
                    );
                    set_environment = Some(described.source_environment.clone());
                }
                described.datastores.into_iter().map(|d| d.name).collect()
            }
        };
        if datastores.is_empty() {
            return Err(DispatchError::InvalidArgument(format!(
                "agent {agent} has no datastores"
            )));
        }
        // A verify of a given date checks every backup the catalog lists for it, one job
        // each; otherwise one job per datastore.
        let targets: Vec<(String, Option<String>)> = match (kind, selection.date) {
            (JobKind::Verify, Some(day)) => {
                let source = self.description(agent).await?.source_environment;
                self.backups_of_date(&source, &datastores, day).await?
            }
            _ => datastores.into_iter().map(|d| (d, None)).collect(),
        };
        let created_ms = ferry_proto::now_unix_ms();
        let jobs: Vec<Job> = targets
            .into_iter()
            .map(|(ds, file)| Job {
                id: ulid::Ulid::new().to_string(),
                kind,
                agent: agent.to_owned(),
                datastore: ds,
                state: JobState::Queued,
                attempt: 1,
                trigger: trigger.to_owned(),
                date: date.clone(),
                namespaces: namespaces.to_vec(),
                backup_type: backup_type.map(str::to_owned),
                file,
                set_environment: set_environment.clone().filter(|_| kind == JobKind::Restore),
                all_or_nothing,
                checked_ms: None,
                scheduled_ms: selection.occurrence.map(|(_, at)| at),
                created_ms,
                started_ms: None,
                finished_ms: None,
                progress: None,
                result: None,
                error: None,
            })
            .collect();
        let events: Vec<JobEventRecord> = jobs
            .iter()
            .map(|job| {
                let message = match &job.file {
                    Some(f) => format!(
                        "Queued {} of {} ({f}) on {} ({trigger}).",
                        job.kind, job.datastore, job.agent
                    ),
                    None => format!(
                        "Queued {} of {} on {} ({trigger}).",
                        job.kind, job.datastore, job.agent
                    ),
                };
                tracing::info!(job_id = %job.id, agent = %job.agent, datastore = %job.datastore, "{message}");
                JobEventRecord {
                    job_id: job.id.clone(),
                    at_ms: created_ms,
                    message,
                }
            })
            .collect();
        let store = self.store.clone();
        let stored = jobs.clone();
        let occurrence = selection.occurrence.map(|(key, at)| (key.to_owned(), at));
        let queued = blocking(move || {
            let claim = occurrence.as_ref().map(|(k, at)| (k.as_str(), *at));
            store.queue_jobs(&stored, &events, claim)
        })
        .await?;
        if !queued {
            tracing::info!(agent, schedule = ?selection.occurrence,
                "Schedule already ran for this occurrence; not running it twice.");
            return Ok(Vec::new());
        }
        let ids = jobs.iter().map(|j| j.id.clone()).collect();
        if kind == JobKind::Restore && (all_or_nothing || set_environment.is_some()) {
            // A set (or an all-or-nothing restore): checked first if asked, and reported
            // as one when every job has ended.
            let this = self.clone();
            tokio::spawn(async move { this.run_together(jobs).await });
        } else {
            for job in jobs {
                let this = self.clone();
                tokio::spawn(async move { this.run(job, None).await });
            }
        }
        Ok(ids)
    }

    /// For a verify of `date`: `(datastore, Some(stored_path))` for every dated archive the
    /// catalog lists of each of `datastores` in `source_environment` on `date`, oldest
    /// first; `(datastore, None)` for a datastore with none (its job then fails naming
    /// what the catalog lacks) or kept in a differential repository (checked by date).
    ///
    /// # Errors
    /// The catalog cannot be read.
    async fn backups_of_date(
        &self,
        source_environment: &str,
        datastores: &[String],
        date: &str,
    ) -> Result<Vec<(String, Option<String>)>, DispatchError> {
        let store = self.store.clone();
        let environment = source_environment.to_owned();
        let mut records = blocking(move || store.list_backups(Some(&environment))).await?;
        records.sort_by_key(|r| r.finished_ms);
        let mut out = Vec::new();
        for ds in datastores {
            let of_day: Vec<&BackupRecord> = records
                .iter()
                .filter(|r| r.datastore == *ds && r.date == date)
                .collect();
            if of_day.is_empty() || !of_day.iter().all(|r| is_archive(r)) {
                out.push((ds.clone(), None));
            } else {
                out.extend(
                    of_day
                        .into_iter()
                        .map(|r| (ds.clone(), Some(r.stored_path.clone()))),
                );
            }
        }
        Ok(out)
    }

    /// Runs `job` to a final state, retrying as configured; `first` is the outcome of an
    /// attempt already made (one a restarted coordinator reconciled). At shutdown the job
    /// is left as stored (queued or running) for the next start to reconcile.
    async fn run(self: Arc<Self>, mut job: Job, mut first: Option<Attempt>) {
        loop {
            let outcome = match first.take() {
                Some(o) => o,
                None => tokio::select! {
                    o = self.attempt(&mut job) => o,
                    _ = self.shutdown.cancelled() => return,
                },
            };
            // A backup dated in the future by this coordinator's clock never enters the
            // catalog: it would shadow the backups made once the agent's clock is right.
            let outcome = match outcome {
                Attempt::Succeeded(r) if job.kind == JobKind::Backup => {
                    match future_dated(&job.agent, &r, chrono::Utc::now()) {
                        Some(message) => Attempt::Failed {
                            message,
                            retryable: false,
                        },
                        None => Attempt::Succeeded(r),
                    }
                }
                other => other,
            };
            let (message, retryable) = match outcome {
                Attempt::Failed { message, retryable } => (message, retryable),
                Attempt::Missing { message } => (message, false),
                Attempt::Succeeded(result) => {
                    job.state = JobState::Succeeded;
                    job.finished_ms = Some(ferry_proto::now_unix_ms());
                    job.error = None;
                    if job.kind == JobKind::Backup {
                        let record = BackupRecord {
                            environment: result.environment.clone(),
                            date: result.date.clone(),
                            datastore: job.datastore.clone(),
                            kind: result.kind.clone(),
                            agent: job.agent.clone(),
                            stored_path: result.stored_path.clone(),
                            size_bytes: result.size_bytes,
                            bytes_uncompressed: result.bytes_uncompressed,
                            sha256: result.sha256.clone(),
                            finished_ms: job.finished_ms.unwrap_or_default(),
                            job_id: job.id.clone(),
                            missing: None,
                        };
                        let store = self.store.clone();
                        if let Err(e) = blocking(move || store.put_backup(&record)).await {
                            tracing::error!(error = %e, "Could not record the backup in the catalog.");
                        }
                    }
                    let summary = format!(
                        "Succeeded: {} ({} bytes).",
                        result.summary, result.size_bytes
                    );
                    job.result = Some(result);
                    self.put(&job).await;
                    self.counters.job_finished(&job);
                    self.audit(
                        "coordinator",
                        &format!("{} finished", job.kind),
                        &format!("{} {}/{}", job.id, job.agent, job.datastore),
                        "succeeded",
                    )
                    .await;
                    self.event(&job, summary).await;
                    return;
                }
            };
            job.error = Some(message.clone());
            if retryable
                && job.attempt < self.settings.retry.max_attempts
                && !self.shutdown.is_cancelled()
            {
                let wait = self.settings.retry.backoff(job.attempt);
                job.state = JobState::Queued;
                self.put(&job).await;
                self.event(
                    &job,
                    format!(
                        "Attempt {} failed: {message}; retrying in {} s.",
                        job.attempt,
                        wait.as_secs()
                    ),
                )
                .await;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = self.shutdown.cancelled() => return,
                }
                // Stored before the order goes out: a restarted coordinator asks
                // the agent about this attempt's id, not the last one's.
                job.attempt += 1;
                self.put(&job).await;
                continue;
            }
            self.fail(&mut job, message).await;
            return;
        }
    }

    /// Ends `job` as failed with `message`: stored, counted, audited, and its event.
    async fn fail(&self, job: &mut Job, message: String) {
        job.state = JobState::Failed;
        job.finished_ms = Some(ferry_proto::now_unix_ms());
        job.error = Some(message.clone());
        self.put(job).await;
        self.counters.job_finished(job);
        self.audit(
            "coordinator",
            &format!("{} finished", job.kind),
            &format!("{} {}/{}", job.id, job.agent, job.datastore),
            &format!("failed: {message}"),
        )
        .await;
        self.event(job, format!("Failed (attempt {}): {message}", job.attempt))
            .await;
    }

    /// Runs the restore jobs of one trigger together: with `--all-or-nothing`, first
    /// checks every member's backup ([`Coordinator::check_member`]) and fails every job,
    /// restoring none, if one does not pass; then runs each job to its end and, for a
    /// set, reports what the set's restore came to ([`Coordinator::report_set`]).
    async fn run_together(self: Arc<Self>, mut jobs: Vec<Job>) {
        if jobs.iter().any(|j| j.all_or_nothing) {
            for job in &jobs {
                self.event(
                    job,
                    format!(
                        "Checking the backup of every one of the {} datastore(s) before restoring \
                         any (--all-or-nothing).",
                        jobs.len()
                    ),
                )
                .await;
            }
            let checks = futures::future::join_all(jobs.iter().map(|j| self.check_member(j))).await;
            if self.shutdown.is_cancelled() {
                return;
            }
            let failed: Vec<String> = jobs
                .iter()
                .zip(&checks)
                .filter_map(|(j, c)| {
                    c.as_ref()
                        .err()
                        .map(|why| format!("{}: {why}", j.datastore))
                })
                .collect();
            if !failed.is_empty() {
                let message = format!(
                    "not restored (--all-or-nothing): checking every datastore's backup before \
                     restoring any found {} of {} unusable: {}; no datastore was touched",
                    failed.len(),
                    jobs.len(),
                    failed.join("; ")
                );
                for job in &mut jobs {
                    self.fail(job, message.clone()).await;
                }
                self.report_set(&jobs).await;
                return;
            }
            let now = ferry_proto::now_unix_ms();
            for (job, check) in jobs.iter_mut().zip(checks) {
                job.checked_ms = Some(now);
                self.put(job).await;
                self.event(
                    job,
                    format!(
                        "Every datastore's backup checked; restoring. This one: {}",
                        check.unwrap_or_default()
                    ),
                )
                .await;
            }
        }
        let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
        let runs = jobs.into_iter().map(|job| {
            let this = self.clone();
            tokio::spawn(async move { this.run(job, None).await })
        });
        futures::future::join_all(runs).await;
        if self.shutdown.is_cancelled() {
            return;
        }
        let store = self.store.clone();
        match blocking(move || {
            ids.iter()
                .map(|id| store.get_job(id))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        {
            Ok(jobs) => {
                let jobs: Vec<Job> = jobs.into_iter().flatten().collect();
                if jobs.iter().all(|j| j.state.is_final()) {
                    self.report_set(&jobs).await;
                }
            }
            Err(e) => tracing::error!(error = %e, "Could not read a set's jobs to report it."),
        }
    }

    /// Checks, for an `--all-or-nothing` restore, the backup `job` would read: the catalog's
    /// choice, on the backup server with readable manifests and every file of its
    /// manifest's size (a `check_only` order: nothing is downloaded). A differential
    /// repository passes: its own restore checks it. Returns the agent's summary.
    ///
    /// # Errors
    /// Why the member cannot be restored, in words for the job's error.
    async fn check_member(&self, job: &Job) -> Result<String, String> {
        let described = self.agents.describe(&job.agent).await?;
        let (date, file, record) = self
            .chosen_backup(job, &described.source_environment, "check")
            .await
            .map_err(|failed| match failed {
                Attempt::Failed { message, .. } | Attempt::Missing { message } => message,
                Attempt::Succeeded(_) => String::new(),
            })?;
        if file.is_empty() {
            return Ok("a differential repository: its restore checks it".into());
        }
        let mut client = self.agents.client(&job.agent)?;
        let order_id = ulid::Ulid::new().to_string();
        self.audit(
            "coordinator",
            "order check",
            &format!("{} {}/{}", job.id, job.agent, job.datastore),
            &format!("sent as {order_id}"),
        )
        .await;
        let timeout = self.settings.agent_timeout;
        let call = client.run_restore(v1::RunRestoreRequest {
            job_id: order_id,
            datastore: job.datastore.clone(),
            date,
            namespaces: Vec::new(),
            // An agent that predates check_only verifies the backup in full instead.
            verify_only: true,
            file,
            check_only: true,
        });
        let mut stream = match tokio::time::timeout(timeout, call).await {
            Err(_) => return Err(format!("agent {} did not answer the check", job.agent)),
            Ok(Err(status)) => {
                return Err(format!(
                    "agent {} refused the check: {}",
                    job.agent,
                    describe_status(&status)
                ));
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        loop {
            match tokio::time::timeout(timeout, stream.message()).await {
                Err(_) => {
                    return Err(format!(
                        "agent {} stopped answering during the check",
                        job.agent
                    ));
                }
                Ok(Err(status)) => {
                    return Err(format!(
                        "lost agent {} during the check: {}",
                        job.agent,
                        describe_status(&status)
                    ));
                }
                Ok(Ok(None)) => {
                    return Err(format!(
                        "agent {} ended the check without a result",
                        job.agent
                    ));
                }
                Ok(Ok(Some(e))) => match e.event {
                    Some(Event::Finished(f)) => return Ok(f.summary),
                    Some(Event::Failed(f)) => {
                        if f.code == v1::FailureCode::NotFound as i32
                            && let Some(record) = record
                        {
                            let missing = Attempt::Missing {
                                message: f.message.clone(),
                            };
                            self.note_presence(job, record, &missing).await;
                        }
                        return Err(f.message);
                    }
                    _ => {}
                },
            }
        }
    }

    /// Says what the restore of a set came to once every one of its `jobs` has ended:
    /// restored whole, partly (which datastores, which not and why) or not at all, in the
    /// audit log (`restore set finished`), the coordinator's log and each job's events.
    /// Jobs that are not a set's (one datastore restored on its own) are not reported.
    async fn report_set(&self, jobs: &[Job]) {
        let Some(first) = jobs.first() else { return };
        let Some(environment) = &first.set_environment else {
            return;
        };
        let date = first.date.clone().unwrap_or_default();
        let (outcome, details) = set_outcome(jobs.iter().map(|j| {
            (
                j.datastore.as_str(),
                j.state == JobState::Succeeded,
                j.error.as_deref().unwrap_or(j.state.as_str()),
            )
        }));
        let target = format!("{} {environment} {date}", first.agent);
        if outcome == SetOutcome::Whole {
            tracing::info!(agent = %first.agent, environment, date, "Set restored whole.");
        } else {
            tracing::warn!(agent = %first.agent, environment, date, details,
                "Set {}.", outcome.as_str());
        }
        self.audit(
            "coordinator",
            "restore set finished",
            &target,
            &format!("{}: {details}", outcome.as_str()),
        )
        .await;
        for job in jobs {
            self.event(
                job,
                format!(
                    "The set of {environment} {date} was {}: {details}",
                    outcome.as_str()
                ),
            )
            .await;
        }
    }

    /// One try: check the agent, send the order, follow its events.
    async fn attempt(&self, job: &mut Job) -> Attempt {
        // Never order an agent that is not what the inventory says.
        let described = match self.agents.describe(&job.agent).await {
            Ok(d) => d,
            Err(problem) => {
                let retryable = !problem.contains("the inventory");
                return Attempt::Failed {
                    message: problem,
                    retryable,
                };
            }
        };
        // A restore or verify reads the backup the catalog chose, and no other.
        let (date, file, chosen) = match job.kind {
            JobKind::Backup => (String::new(), String::new(), None),
            JobKind::Restore | JobKind::Verify => {
                match self
                    .chosen_backup(job, &described.source_environment, job.kind.as_str())
                    .await
                {
                    Ok(chosen) => chosen,
                    Err(failed) => return failed,
                }
            }
        };
        let mut client = match self.agents.client(&job.agent) {
            Ok(c) => c,
            Err(e) => {
                return Attempt::Failed {
                    message: e,
                    retryable: false,
                };
            }
        };
        // Each attempt under an id of its own: the agent refuses an id it already knows.
        let order_id = ferry_proto::attempt::attempt_id(&job.id, job.attempt);
        self.audit(
            "coordinator",
            &format!("order {}", job.kind),
            &format!("{} {}/{}", job.id, job.agent, job.datastore),
            &if order_id == job.id {
                format!("sent (attempt {})", job.attempt)
            } else {
                format!("sent (attempt {} as {order_id})", job.attempt)
            },
        )
        .await;
        let timeout = self.settings.agent_timeout;
        let call = async {
            match job.kind {
                JobKind::Backup => {
                    client
                        .run_backup(v1::RunBackupRequest {
                            job_id: order_id.clone(),
                            datastore: job.datastore.clone(),
                            backup_type: job.backup_type.clone().unwrap_or_default(),
                        })
                        .await
                }
                JobKind::Restore | JobKind::Verify => {
                    client
                        .run_restore(v1::RunRestoreRequest {
                            job_id: order_id.clone(),
                            datastore: job.datastore.clone(),
                            date,
                            namespaces: job.namespaces.clone(),
                            verify_only: job.kind == JobKind::Verify,
                            file,
                            check_only: false,
                        })
                        .await
                }
            }
        };
        let stream = match tokio::time::timeout(timeout, call).await {
            Err(_) => {
                let message = format!(
                    "agent {} did not answer the order within {} s",
                    job.agent,
                    timeout.as_secs()
                );
                self.agents.unreachable(&job.agent, &message);
                return Attempt::Failed {
                    message,
                    retryable: true,
                };
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                let message = format!(
                    "agent {} could not be reached with the order: {}",
                    job.agent,
                    describe_status(&status)
                );
                self.agents.unreachable(&job.agent, &message);
                return Attempt::Failed {
                    message,
                    retryable: true,
                };
            }
            Ok(Err(status)) => {
                use tonic::Code;
                self.agents.reached(&job.agent);
                let retryable = !matches!(
                    status.code(),
                    Code::PermissionDenied
                        | Code::InvalidArgument
                        | Code::Unauthenticated
                        | Code::NotFound
                );
                return Attempt::Failed {
                    message: format!(
                        "agent {} refused the order: {}",
                        job.agent,
                        describe_status(&status)
                    ),
                    retryable,
                };
            }
            Ok(Ok(r)) => {
                self.agents.reached(&job.agent);
                r.into_inner()
            }
        };
        let outcome = self.follow(job, &client, stream).await;
        if let Some(record) = chosen {
            self.note_presence(job, record, &outcome).await;
        }
        outcome
    }

    /// Marks `record`, the backup `job` was ordered to read, as missing from the backup
    /// server when the agent did not find it ([`Attempt::Missing`]), and clears the mark
    /// when the agent read it; `ferry backups` shows the mark.
    async fn note_presence(&self, job: &Job, mut record: BackupRecord, outcome: &Attempt) {
        record.missing = match outcome {
            Attempt::Missing { message } => Some(MissingNote {
                found_ms: ferry_proto::now_unix_ms(),
                job_id: job.id.clone(),
                error: message.clone(),
            }),
            Attempt::Succeeded(_) if record.missing.is_some() => None,
            _ => return,
        };
        let missing = record.missing.is_some();
        let store = self.store.clone();
        let path = record.stored_path.clone();
        if let Err(e) = blocking(move || store.put_backup(&record)).await {
            tracing::error!(error = %e, error_type = "store", "Could not mark a catalog record.");
            return;
        }
        if missing {
            tracing::warn!(job_id = %job.id, stored_path = %path,
                "The backup the catalog lists is not on the backup server; marked missing in the catalog.");
            self.event(
                job,
                format!("Marked {path} missing in the catalog: it is not on the backup server."),
            )
            .await;
        } else {
            self.event(job, format!("{path} is on the backup server again."))
                .await;
        }
    }

    /// The backup a restore or verify `job` reads, chosen from the catalog: the record the
    /// job names (`file`, a verify of a date), else the newest record (by the coordinator's
    /// finish time, never by folder name) of the job's datastore in `source_environment`,
    /// of the job's date if it has one. Returns the order's `(date, file)` and the record:
    /// `file` is the main archive's name, which the agent reads and nothing else. For a
    /// differential repository (its newest record is a folder, not an `.age` archive)
    /// `file` is empty, there is no record, and the date is the job's: the repository
    /// restores by date and says itself what it lacks. The choice is recorded as a job
    /// event.
    ///
    /// # Errors
    /// The attempt's failure: no such backup in the catalog or no source environment
    /// (final), or the catalog unreadable (retryable).
    async fn chosen_backup(
        &self,
        job: &Job,
        source_environment: &str,
        what: &str,
    ) -> Result<(String, String, Option<BackupRecord>), Attempt> {
        if source_environment.is_empty() {
            return Err(Attempt::Failed {
                message: format!(
                    "agent {} does not say which environment it restores from (its Describe has \
                     no source_environment); upgrade it",
                    job.agent
                ),
                retryable: false,
            });
        }
        let store = self.store.clone();
        let environment = source_environment.to_owned();
        let records = blocking(move || store.list_backups(Some(&environment)))
            .await
            .map_err(|e| Attempt::Failed {
                message: format!("could not read the catalog to choose the backup: {e}"),
                retryable: true,
            })?;
        let of_datastore: Vec<BackupRecord> = records
            .into_iter()
            .filter(|r| r.environment == source_environment && r.datastore == job.datastore)
            .collect();
        let dated = |d: &Option<String>| {
            d.as_ref()
                .map(|d| format!(" dated {d}"))
                .unwrap_or_default()
        };
        // A verify of one backup of a date checks that one, as long as the catalog has it.
        if let Some(path) = &job.file {
            let Some(record) = of_datastore.into_iter().find(|r| r.stored_path == *path) else {
                return Err(Attempt::Failed {
                    message: format!(
                        "the catalog no longer has backup {path} (pruned since the job was \
                         queued?): nothing to {}; `ferry backups` lists what it holds",
                        what
                    ),
                    retryable: false,
                });
            };
            let file = record.stored_path.rsplit('/').next().unwrap_or_default();
            self.event(
                job,
                format!(
                    "Ordering the {} of {} (backed up {} by job {}), one of the backups of that \
                     date in the catalog.",
                    what, record.stored_path, record.date, record.job_id
                ),
            )
            .await;
            return Ok((record.date.clone(), file.to_owned(), Some(record)));
        }
        // A differential repository (pgBackRest, rsync mirror) is recorded as its folder:
        // it holds its own history and restores by date (or its newest), as before.
        if let Some(newest) = of_datastore.iter().max_by_key(|r| r.finished_ms)
            && !is_archive(newest)
        {
            self.event(
                job,
                format!(
                    "Ordering the {} of repository {}{} (the repository holds its own backups).",
                    what,
                    newest.stored_path,
                    dated(&job.date)
                ),
            )
            .await;
            return Ok((job.date.clone().unwrap_or_default(), String::new(), None));
        }
        let chosen = of_datastore
            .into_iter()
            .filter(|r| is_archive(r) && job.date.as_ref().is_none_or(|d| *d == r.date))
            .max_by_key(|r| r.finished_ms);
        let Some(record) = chosen else {
            return Err(Attempt::Failed {
                message: format!(
                    "the catalog has no backup of datastore {} in environment {source_environment}{}: \
                     nothing to {}; `ferry backups` lists what the catalog holds",
                    job.datastore,
                    dated(&job.date),
                    what
                ),
                retryable: false,
            });
        };
        let file = record.stored_path.rsplit('/').next().unwrap_or_default();
        self.event(
            job,
            format!(
                "Ordering the {} of {} (backed up {} by job {}), the newest backup{} in the catalog.",
                what,
                record.stored_path,
                record.date,
                record.job_id,
                dated(&job.date)
            ),
        )
        .await;
        Ok((record.date.clone(), file.to_owned(), Some(record)))
    }

    /// Follows a job's event stream from its agent to the attempt's end, persisting state
    /// and progress (at most once a second). An agent that shows no sign of life for
    /// `agent_timeout` is told to cancel and the attempt fails (retryable): no event at all,
    /// or only progress reports of a streaming stage whose byte counters do not move
    /// ([`shows_life`]).
    async fn follow(
        &self,
        job: &mut Job,
        client: &v1::agent_client::AgentClient<tonic::transport::Channel>,
        mut stream: tonic::Streaming<v1::JobEvent>,
    ) -> Attempt {
        let timeout = self.settings.agent_timeout;
        let mut last_persist = std::time::Instant::now() - Duration::from_secs(10);
        let mut alive_at = tokio::time::Instant::now();
        let mut event_at = alive_at;
        let mut last_counts: Option<Counts> = None;
        loop {
            let left = timeout.saturating_sub(alive_at.elapsed());
            let next = match tokio::time::timeout(left, stream.message()).await {
                Err(_) => {
                    let mut client = client.clone();
                    let id = ferry_proto::attempt::attempt_id(&job.id, job.attempt);
                    tokio::spawn(async move {
                        client.cancel_job(v1::CancelJobRequest { job_id: id }).await
                    });
                    let message = match &last_counts {
                        Some(c) if event_at.elapsed() < timeout => format!(
                            "agent {} moved no bytes for {} s in stage {} (still {} bytes read, \
                             {} written; agent_timeout_seconds): the job was told to cancel \
                             (is the backup server stalled?)",
                            job.agent,
                            timeout.as_secs(),
                            ferry_core::Bounded(&c.stage),
                            c.bytes_read,
                            c.bytes_written
                        ),
                        _ => format!(
                            "agent {} stopped answering: no event for {} s (agent_timeout_seconds)",
                            job.agent,
                            timeout.as_secs()
                        ),
                    };
                    self.agents.unreachable(&job.agent, &message);
                    return Attempt::Failed {
                        message,
                        retryable: true,
                    };
                }
                Ok(Err(status)) => {
                    let message = format!("lost agent {}: {}", job.agent, describe_status(&status));
                    self.agents.unreachable(&job.agent, &message);
                    return Attempt::Failed {
                        message,
                        retryable: true,
                    };
                }
                Ok(Ok(None)) => {
                    return Attempt::Failed {
                        message: format!(
                            "agent {} ended the job's stream without a result",
                            job.agent
                        ),
                        retryable: true,
                    };
                }
                Ok(Ok(Some(e))) => e,
            };
            self.agents.reached(&job.agent);
            event_at = tokio::time::Instant::now();
            match &next.event {
                Some(Event::Progress(p)) => {
                    if shows_life(last_counts.as_ref(), p) {
                        alive_at = event_at;
                    }
                    last_counts = Some(Counts::of(p));
                }
                _ => alive_at = event_at,
            }
            match next.event {
                Some(Event::Accepted(_)) => {
                    job.state = JobState::Running;
                    job.started_ms = Some(next.at_unix_ms);
                    self.put(job).await;
                    self.event(
                        job,
                        format!("Accepted by agent {} (attempt {}).", job.agent, job.attempt),
                    )
                    .await;
                }
                Some(Event::Progress(p)) => {
                    job.progress = Some(Progress {
                        stage: p.stage,
                        bytes_read: p.bytes_read,
                        bytes_written: p.bytes_written,
                        rate_bytes_per_second: p.rate_bytes_per_second,
                    });
                    if last_persist.elapsed() >= Duration::from_secs(1) {
                        last_persist = std::time::Instant::now();
                        self.put(job).await;
                    }
                }
                Some(Event::Finished(f)) => {
                    return Attempt::Succeeded(JobResult {
                        stored_path: f.stored_path,
                        size_bytes: f.size_bytes,
                        sha256: f.sha256,
                        duration_ms: f.duration_ms,
                        bytes_uncompressed: f.bytes_uncompressed,
                        environment: f.environment,
                        date: f.date,
                        kind: f.kind,
                        summary: f.summary,
                        data_finished_ms: (f.data_finished_unix_ms != 0)
                            .then_some(f.data_finished_unix_ms),
                    });
                }
                Some(Event::Failed(f)) => {
                    if job.kind != JobKind::Backup && f.code == v1::FailureCode::NotFound as i32 {
                        return Attempt::Missing { message: f.message };
                    }
                    return Attempt::Failed {
                        message: f.message,
                        retryable: f.retryable,
                    };
                }
                None => {}
            }
        }
    }

    /// Takes up the jobs a previous coordinator process left queued or running: each
    /// agent is asked what became of its job ([`v1::agent_client::AgentClient::watch_job`]).
    /// A job still running is followed again, a finished one is recorded as it ended
    /// (succeeded, or failed and retried as configured), and one the agent does not know
    /// is run again if it was only queued, or counted as a failed attempt (the agent
    /// restarted) if it was running. Returns the number of jobs taken up.
    pub async fn reconcile(self: &Arc<Self>) -> usize {
        let store = self.store.clone();
        let orphans = match blocking(move || store.unfinished_jobs()).await {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(error = %e, "Could not list unfinished jobs.");
                return 0;
            }
        };
        let n = orphans.len();
        for mut job in orphans {
            let this = self.clone();
            if job.all_or_nothing && job.checked_ms.is_none() {
                // Its set was still being checked: no job of it may run unchecked.
                tokio::spawn(async move {
                    this.fail(
                        &mut job,
                        "not restored (--all-or-nothing): the coordinator restarted while the \
                         set was being checked, so no datastore was touched; order the restore \
                         again"
                            .into(),
                    )
                    .await;
                });
                continue;
            }
            tokio::spawn(async move {
                let first = this.recover(&mut job).await;
                this.run(job, first).await;
            });
        }
        n
    }

    /// What became of `job`, a job of a previous coordinator process: the outcome of the
    /// attempt its agent still runs or ran (asked under the stored attempt's id,
    /// [`ferry_proto::attempt::attempt_id`]), or `None` to make a new attempt.
    async fn recover(&self, job: &mut Job) -> Option<Attempt> {
        self.event(
            job,
            format!(
                "The coordinator restarted; asking agent {} about the job.",
                job.agent
            ),
        )
        .await;
        let mut client = match self.agents.client(&job.agent) {
            Ok(c) => c,
            Err(e) => {
                return Some(Attempt::Failed {
                    message: e,
                    retryable: false,
                });
            }
        };
        let asked = tokio::time::timeout(
            self.settings.agent_timeout,
            client.watch_job(v1::WatchJobRequest {
                job_id: ferry_proto::attempt::attempt_id(&job.id, job.attempt),
            }),
        )
        .await;
        let stream = match asked {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) if status.code() == tonic::Code::NotFound => {
                if job.state == JobState::Queued {
                    // Never accepted (or waiting for a retry): just go on.
                    return None;
                }
                return Some(Attempt::Failed {
                    message: format!(
                        "agent {} no longer knows the job (it restarted while the coordinator \
                         was down); the attempt's outcome is lost",
                        job.agent
                    ),
                    retryable: true,
                });
            }
            Ok(Err(status)) => {
                return Some(Attempt::Failed {
                    message: format!(
                        "could not ask agent {} about the job after a coordinator restart: {}",
                        job.agent,
                        describe_status(&status)
                    ),
                    retryable: true,
                });
            }
            Err(_) => {
                return Some(Attempt::Failed {
                    message: format!(
                        "agent {} did not answer within {} s after a coordinator restart",
                        job.agent,
                        self.settings.agent_timeout.as_secs()
                    ),
                    retryable: true,
                });
            }
        };
        Some(self.follow(job, &client, stream).await)
    }

    /// Runs the cron schedules until shutdown. Each run is claimed in the store with its
    /// jobs ([`Store::queue_jobs`]), so a restart never doubles one; occurrences
    /// missed while the coordinator was down are caught up by one run at start (the
    /// newest missed occurrence), as anacron does. A schedule that never ran starts from
    /// now.
    pub async fn run_schedules(self: Arc<Self>) {
        let mut tasks = Vec::new();
        for schedule in self.settings.schedules.clone() {
            tasks.push(tokio::spawn(self.clone().run_schedule(schedule)));
        }
        futures::future::join_all(tasks).await;
    }

    async fn run_schedule(self: Arc<Self>, schedule: crate::config::Schedule) {
        let key = schedule_key(&schedule);
        let store = self.store.clone();
        let k = key.clone();
        let now = chrono::Utc::now();
        match blocking(move || store.schedule_mark(&k)).await {
            Ok(Some(last)) => {
                let mut missed = (0u32, None);
                let mut t = chrono::DateTime::from_timestamp_millis(last).unwrap_or(now);
                while let Ok(next) = schedule.cron.find_next_occurrence(&t, false) {
                    if next > now || missed.0 >= 100_000 {
                        break;
                    }
                    missed = (missed.0 + 1, Some(next));
                    t = next;
                }
                if let (n, Some(occurrence)) = missed {
                    tracing::warn!(agent = %schedule.agent, cron = %schedule.cron_text, missed = n,
                        %occurrence, "Schedule missed runs while the coordinator was down; running once now.");
                    self.fire(&schedule, &key, occurrence).await;
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "Could not read the schedule's last run; starting from now.");
            }
        }
        loop {
            let now = chrono::Utc::now();
            let Ok(next) = schedule.cron.find_next_occurrence(&now, false) else {
                tracing::warn!(cron = %schedule.cron_text, "Schedule has no next occurrence.");
                return;
            };
            let wait = (next - now).to_std().unwrap_or_default();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.cancelled() => return,
            }
            self.fire(&schedule, &key, next).await;
        }
    }

    /// Triggers `schedule`'s run for `occurrence`.
    async fn fire(
        self: &Arc<Self>,
        schedule: &crate::config::Schedule,
        key: &str,
        occurrence: chrono::DateTime<chrono::Utc>,
    ) {
        let triggered = self
            .trigger(
                schedule.kind,
                &schedule.agent,
                schedule.datastore.as_deref(),
                &Selection {
                    backup_type: schedule.backup_type.as_deref(),
                    occurrence: Some((key, occurrence.timestamp_millis())),
                    ..Selection::default()
                },
                SCHEDULE,
            )
            .await;
        if let Err(e) = triggered {
            tracing::error!(agent = %schedule.agent, kind = %schedule.kind, error = %e,
                error_type = "schedule", "Scheduled run could not start.");
        }
    }

    /// The next scheduled run for `agent`'s `datastore`, UTC ms, if any.
    pub fn next_run(&self, agent: &str, datastore: &str) -> Option<i64> {
        let now = chrono::Utc::now();
        self.settings
            .schedules
            .iter()
            .filter(|s| s.agent == agent && s.datastore.as_deref().is_none_or(|d| d == datastore))
            .filter_map(|s| s.cron.find_next_occurrence(&now, false).ok())
            .map(|t| t.timestamp_millis())
            .min()
    }
}

/// The stage and byte counters of a progress report.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Counts {
    stage: String,
    bytes_read: u64,
    bytes_written: u64,
}

impl Counts {
    fn of(p: &v1::Progress) -> Counts {
        Counts {
            stage: p.stage.clone(),
            bytes_read: p.bytes_read,
            bytes_written: p.bytes_written,
        }
    }
}

/// Whether progress report `p` shows its job alive, given the counters of the report
/// before it (`last`): a stage the agent does not measure in bytes (`streaming` false:
/// waiting, a commit, pgBackRest...) always does; a streaming stage only when it changed
/// or its counters moved. An agent whose upload is stuck on a stalled server keeps
/// reporting the same counters: that is no sign of life.
fn shows_life(last: Option<&Counts>, p: &v1::Progress) -> bool {
    !p.streaming || last.is_none_or(|l| *l != Counts::of(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, kind: &str, types: &[&str], namespaces: bool) -> v1::DatastoreInfo {
        v1::DatastoreInfo {
            name: name.into(),
            kind: kind.into(),
            backup_types: types.iter().map(|t| (*t).into()).collect(),
            namespaces,
        }
    }

    fn refusal(r: Result<(), DispatchError>) -> String {
        match r {
            Err(DispatchError::InvalidArgument(m)) => m,
            other => panic!("not InvalidArgument: {other:?}"),
        }
    }

    #[test]
    fn orders_are_checked_against_what_the_agent_described() {
        let d = v1::DescribeResponse {
            agent_id: "db1".into(),
            datastores: vec![
                info("pg", "postgres", &[], false),
                info("pgbr", "pgbackrest", &["full", "diff"], false),
                info("mongo", "mongodb", &[], true),
            ],
            ..Default::default()
        };
        let ns = ["app.users".to_owned()];
        check_order(&d, "pg", None, &[]).unwrap();
        check_order(&d, "pgbr", Some("diff"), &[]).unwrap();
        check_order(&d, "mongo", None, &ns).unwrap();
        let m = refusal(check_order(&d, "nope", None, &[]));
        assert_eq!(
            m,
            "agent db1 has no datastore \"nope\"; it has: pg, pgbr, mongo (see `ferry agents`)"
        );
        let m = refusal(check_order(&d, "pg", Some("full"), &[]));
        assert!(
            m.contains("\"pg\" on agent db1 (postgres) takes no backup type"),
            "{m}"
        );
        let m = refusal(check_order(&d, "pgbr", Some("incr"), &[]));
        assert!(
            m.contains("takes backup type full or diff, not \"incr\""),
            "{m}"
        );
        let m = refusal(check_order(&d, "pgbr", None, &ns));
        assert!(
            m.contains("\"pgbr\" on agent db1 (pgbackrest) is restored whole"),
            "{m}"
        );
    }

    #[test]
    fn a_backup_dated_after_the_coordinators_date_is_refused_naming_it() {
        let result = |date: &str| JobResult {
            stored_path: format!("/b/production/{date}/postgres_backup_{date}.pgdump.zst.age"),
            date: date.into(),
            ..JobResult::default()
        };
        let at = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .unwrap()
                .with_timezone(&chrono::Utc)
        };
        let now = at("2026-12-04T21:00:00Z");
        assert_eq!(future_dated("db1", &result("2026-12-04"), now), None);
        assert_eq!(future_dated("db1", &result("2026-12-03"), now), None);
        let m = future_dated("db1", &result("2026-12-05"), now).unwrap();
        assert!(
            m.contains("postgres_backup_2026-12-05.pgdump.zst.age")
                && m.contains("dated 2026-12-05 by agent db1's clock")
                && m.contains("it is 2026-12-04 21:00 (UTC)")
                && m.contains("NTP"),
            "{m}"
        );
        // A few minutes before midnight, an agent slightly ahead dates tomorrow: fine.
        let late = at("2026-12-04T23:57:00Z");
        assert_eq!(future_dated("db1", &result("2026-12-05"), late), None);
        assert!(future_dated("db1", &result("2026-12-06"), late).is_some());
    }

    #[test]
    fn a_refusal_lists_at_most_twenty_datastores() {
        let d = v1::DescribeResponse {
            agent_id: "db1".into(),
            datastores: (0..25)
                .map(|i| info(&format!("d{i}"), "files", &[], false))
                .collect(),
            ..Default::default()
        };
        let m = refusal(check_order(&d, "nope", None, &[]));
        assert!(m.contains("d19 and 5 more") && !m.contains("d20"), "{m}");
    }

    fn progress(stage: &str, read: u64, written: u64, streaming: bool) -> v1::Progress {
        v1::Progress {
            stage: stage.into(),
            bytes_read: read,
            bytes_written: written,
            rate_bytes_per_second: 0.0,
            streaming,
        }
    }

    #[test]
    fn streaming_progress_whose_counters_do_not_move_is_no_sign_of_life() {
        let upload = progress("dump", 5 << 20, 2 << 20, true);
        let last = Counts::of(&upload);
        // The same counters again: the upload is stuck.
        assert!(!shows_life(Some(&last), &upload));
        // Bytes moved, or a new stage: alive.
        assert!(shows_life(
            Some(&last),
            &progress("dump", 6 << 20, 2 << 20, true)
        ));
        assert!(shows_life(
            Some(&last),
            &progress("dump", 5 << 20, 3 << 20, true)
        ));
        assert!(shows_life(
            Some(&last),
            &progress("commit", 5 << 20, 2 << 20, true)
        ));
        // The first report of a stream is alive.
        assert!(shows_life(None, &upload));
        // A stage the agent does not measure in bytes (pgBackRest, a commit, waiting)
        // is alive whatever its counters say.
        let tool = progress("pgbackrest", 0, 0, false);
        assert!(shows_life(Some(&Counts::of(&tool)), &tool));
    }
}
