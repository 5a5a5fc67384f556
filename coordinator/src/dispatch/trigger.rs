//! The trigger policy: what an operator or a schedule may order, refused before any job
//! exists when the role split, the inventory or what the agent described forbids it; the
//! jobs of an accepted trigger queued in one transaction and started.

use std::sync::Arc;

use ferry_core::{Bounded, layout};
use ferry_proto::v1;

use super::schedule::SCHEDULE;
use super::{Coordinator, DispatchError};
use crate::model::{Job, JobEventRecord, JobKind, JobState};
use crate::store::blocking;

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
    /// Scheduled runs: the schedule's key ([`super::schedule_key`]) and the occurrence (UTC
    /// ms) the jobs run for; the jobs are stored only if the schedule has not run for
    /// it yet ([`crate::store::Store::queue_jobs`]).
    pub occurrence: Option<(&'a str, i64)>,
    /// Restore: check every datastore's backup first and restore none unless all pass.
    pub all_or_nothing: bool,
    /// Restore, verify: the storage target to read (a copy's name or `primary`); `None`:
    /// the primary, the agent falling back to a copy when it cannot be reached.
    pub from: Option<&'a str>,
    /// Restore one datastore to this instant (UTC ms): its newest base backup finished by
    /// then, and the archived WAL up to it.
    pub to_time_ms: Option<i64>,
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
        if let Some(t) = self.from {
            s.push_str(&format!(" from {t}"));
        }
        if let Some(ms) = self.to_time_ms {
            s.push_str(&format!(" to time {}", utc_ms(ms)));
        }
        if self.all_or_nothing {
            s.push_str(" all-or-nothing");
        }
        s
    }
}

/// `ms` (UTC ms since the Unix epoch) as RFC 3339 in UTC, to the millisecond.
pub(crate) fn utc_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("{ms} ms"))
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
    to_time: bool,
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
    if to_time && !info.point_in_time {
        return Err(DispatchError::InvalidArgument(format!(
            "datastore {} on agent {agent} ({}) cannot be restored to a point in time: that takes \
             a PostgreSQL datastore with method = \"physical\" on a staging agent with [wal]",
            Bounded(datastore),
            info.kind
        )));
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

impl Coordinator {
    /// [`Coordinator::trigger`] of a restore or verify on `agent`, or, with `environment`,
    /// on every staging agent of it in inventory order ([`Coordinator::staging_agents_of`]);
    /// the job ids of all. An agent refused after earlier ones were triggered fails the
    /// call with its refusal, naming it and the jobs already queued.
    ///
    /// # Errors
    /// [`DispatchError`].
    pub async fn trigger_restores(
        self: &Arc<Self>,
        kind: JobKind,
        (environment, agent, datastore): (Option<&str>, &str, Option<&str>),
        selection: &Selection<'_>,
        who: &str,
    ) -> Result<Vec<String>, DispatchError> {
        let agents = match environment {
            None => vec![agent.to_owned()],
            Some(env) => self.staging_agents_of(env, agent, datastore.unwrap_or_default())?,
        };
        let mut job_ids: Vec<String> = Vec::new();
        for agent in &agents {
            match self.trigger(kind, agent, datastore, selection, who).await {
                Ok(ids) => job_ids.extend(ids),
                Err(e) if job_ids.is_empty() => return Err(e),
                Err(e) => {
                    return Err(e.context(&format!(
                        "agent {agent}; the jobs of the agents before it are queued: {}",
                        job_ids.join(", ")
                    )));
                }
            }
        }
        Ok(job_ids)
    }

    /// The staging agents of `environment`, in inventory order, for a restore of the whole
    /// environment (`agent` and `datastore` must then be empty).
    ///
    /// # Errors
    /// [`DispatchError::InvalidArgument`] with an agent or a datastore, or for an
    /// environment without staging agents.
    pub fn staging_agents_of(
        &self,
        environment: &str,
        agent: &str,
        datastore: &str,
    ) -> Result<Vec<String>, DispatchError> {
        if !agent.is_empty() || !datastore.is_empty() {
            return Err(DispatchError::InvalidArgument(
                "--env restores every staging agent of the environment: no agent or \
                 --datastore with it"
                    .into(),
            ));
        }
        let agents: Vec<String> = self
            .agents
            .all()
            .filter(|a| a.environment == environment && a.role.may_restore())
            .map(|a| a.id.clone())
            .collect();
        if agents.is_empty() {
            return Err(DispatchError::InvalidArgument(format!(
                "environment {} has no staging agent in the inventory",
                Bounded(environment)
            )));
        }
        Ok(agents)
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
            from,
            to_time_ms,
        } = *selection;
        if let Some(ms) = to_time_ms {
            if kind != JobKind::Restore
                || date.is_some()
                || !namespaces.is_empty()
                || all_or_nothing
            {
                return Err(DispatchError::InvalidArgument(
                    "--to-time restores to an instant: no --date, --ns, --verify or \
                     --all-or-nothing with it"
                        .into(),
                ));
            }
            if ms > ferry_proto::now_unix_ms() {
                return Err(DispatchError::InvalidArgument(format!(
                    "{} is in the future",
                    utc_ms(ms)
                )));
            }
        }
        if let Some(t) = from {
            if kind == JobKind::Backup {
                return Err(DispatchError::InvalidArgument(
                    "a backup is written to the primary only; the coordinator copies it (copy_to)"
                        .into(),
                ));
            }
            if t != ferry_storage::PRIMARY && !self.settings.copies.contains_key(t) {
                let known: Vec<&str> = std::iter::once(ferry_storage::PRIMARY)
                    .chain(self.settings.copies.keys().map(String::as_str))
                    .collect();
                return Err(DispatchError::InvalidArgument(format!(
                    "no storage target {}: the coordinator knows {}",
                    Bounded(t),
                    known.join(", ")
                )));
            }
        }
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
                check_order(
                    &described,
                    name,
                    backup_type,
                    namespaces,
                    to_time_ms.is_some(),
                )?;
            }
        }
        let mut date = date.map(str::to_owned);
        let mut set_environment = None;
        let datastores = match datastore {
            Some(d) => vec![d.to_owned()],
            None => {
                let described = self.description(agent).await?;
                // Every datastore to an instant: those that replay WAL to it, the others
                // from their newest backup finished by then, each on its own.
                if kind != JobKind::Backup && to_time_ms.is_none() {
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
                to_time_ms,
                target: from.map(str::to_owned),
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
            self.spawn(self.clone().run_together(jobs));
        } else {
            for job in jobs {
                self.spawn(self.clone().run(job, None));
            }
        }
        Ok(ids)
    }

    /// What `agent` last said of itself in `Describe`, asking it now if it never answered.
    ///
    /// # Errors
    /// [`DispatchError::Unavailable`]: it never answered, so what it has is unknown.
    async fn description(&self, agent: &str) -> Result<v1::DescribeResponse, DispatchError> {
        if let Some(d) = self.agents.state(agent).described {
            return Ok(d);
        }
        self.unless_shutdown(self.agents.describe(agent))
            .await?
            .map_err(|problem| {
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
            Some(d) => Ok(Some(
                self.unless_shutdown(self.agents.describe(agent))
                    .await?
                    .unwrap_or(d),
            )),
            None => match self.description(agent).await {
                Ok(d) => Ok(Some(d)),
                Err(DispatchError::ShuttingDown) => Err(DispatchError::ShuttingDown),
                Err(_) if trigger == SCHEDULE => Ok(None),
                Err(e) => Err(e),
            },
        }
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
        let describe = |s: &crate::catalog::sets::BackupSet| {
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
            point_in_time: false,
        }
    }

    fn refusal(r: Result<(), DispatchError>) -> String {
        match r {
            Err(DispatchError::InvalidArgument(m)) => m,
            other => panic!("not InvalidArgument: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_trigger_caught_by_the_shutdown_is_refused_audited_and_queues_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let c = super::super::test_coordinator(
            dir.path(),
            &[("db1", ferry_proto::Role::Production, "https://127.0.0.1:1")],
            std::time::Duration::from_secs(30),
        );
        c.shutdown.cancel();
        let refused = c
            .trigger(
                JobKind::Backup,
                "db1",
                Some("postgres"),
                &Selection::default(),
                "alice",
            )
            .await;
        assert!(
            matches!(refused, Err(DispatchError::ShuttingDown)),
            "{refused:?}"
        );
        assert!(c.jobs(10).await.unwrap().is_empty());
        let audit = c.audit_log(None).await.unwrap();
        assert_eq!(audit.len(), 1, "{audit:?}");
        assert_eq!(
            (audit[0].who.as_str(), audit[0].action.as_str()),
            ("alice", "trigger backup")
        );
        assert!(
            audit[0]
                .outcome
                .starts_with("refused: the coordinator is shutting down"),
            "{audit:?}"
        );
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
        check_order(&d, "pg", None, &[], false).unwrap();
        check_order(&d, "pgbr", Some("diff"), &[], false).unwrap();
        check_order(&d, "mongo", None, &ns, false).unwrap();
        let m = refusal(check_order(&d, "nope", None, &[], false));
        assert_eq!(
            m,
            "agent db1 has no datastore \"nope\"; it has: pg, pgbr, mongo (see `ferry agents`)"
        );
        let m = refusal(check_order(&d, "pg", Some("full"), &[], false));
        assert!(
            m.contains("\"pg\" on agent db1 (postgres) takes no backup type"),
            "{m}"
        );
        let m = refusal(check_order(&d, "pgbr", Some("incr"), &[], false));
        assert!(
            m.contains("takes backup type full or diff, not \"incr\""),
            "{m}"
        );
        let m = refusal(check_order(&d, "pgbr", None, &ns, false));
        assert!(
            m.contains("\"pgbr\" on agent db1 (pgbackrest) is restored whole"),
            "{m}"
        );
        let mut d = d;
        d.datastores[0].point_in_time = true;
        check_order(&d, "pg", None, &[], true).unwrap();
        let m = refusal(check_order(&d, "mongo", None, &[], true));
        assert!(
            m.contains("\"mongo\" on agent db1 (mongodb) cannot be restored to a point in time"),
            "{m}"
        );
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
        let m = refusal(check_order(&d, "nope", None, &[], false));
        assert!(m.contains("d19 and 5 more") && !m.contains("d20"), "{m}");
    }
}
