//! Attempts and retries: one order to an agent (after checking that it is what the
//! inventory says, and choosing from the catalog the backup a restore or verify reads),
//! its event stream followed to the attempt's end, failed attempts retried with back-off,
//! every transition persisted. The restores of one set run together, checked first when
//! they are all-or-nothing, and are reported as one.

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::v1;
use ferry_proto::v1::job_event::Event;

use super::Coordinator;
use crate::agents::AgentError;
use crate::model::{BackupRecord, Job, JobKind, JobResult, JobState, MissingNote, Progress};
use crate::store::blocking;
use ferry_core::restore_set::{SetOutcome, set_outcome};
use ferry_proto::status::describe_status;

/// How far ahead of the coordinator's clock an agent's may be before its backups count as
/// dated in the future: clocks a few minutes apart are normal (a backup started at
/// 23:58 on an agent 3 minutes ahead is dated tomorrow, and that is fine).
pub const CLOCK_TOLERANCE: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// Why a backup `result` of `agent` must not enter the catalog: its date (the agent's
/// clock, which names the dated folder) is after the coordinator's date at `now` plus
/// [`CLOCK_TOLERANCE`], or the end its manifest gives (`data_finished_ms`, which the
/// catalog records) is after `now` plus [`CLOCK_TOLERANCE`]. `None` when both are fine.
pub fn future_dated(
    agent: &str,
    result: &JobResult,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<String> {
    let latest = now + CLOCK_TOLERANCE;
    let date = chrono::NaiveDate::parse_from_str(&result.date, "%Y-%m-%d").ok()?;
    let claim = if date > latest.date_naive() {
        format!("it is dated {}", result.date)
    } else {
        let finished = result
            .data_finished_ms
            .filter(|&f| f > latest.timestamp_millis())
            .and_then(chrono::DateTime::from_timestamp_millis)?;
        format!("it finished at {}", finished.format("%Y-%m-%d %H:%M:%S"))
    };
    Some(format!(
        "refused backup {}: {claim} by agent {agent}'s clock, but by the coordinator's clock \
         it is {} (UTC), so the agent's clock is ahead; it is not recorded in the catalog, \
         and no restore or verify takes it (its file stays on the backup server, outside \
         the catalog, until prune removes its folder). Set the clock of {agent}'s host \
         right (NTP), then back up again",
        result.stored_path,
        now.format("%Y-%m-%d %H:%M")
    ))
}

/// Where one attempt ended.
pub(super) enum Attempt {
    Succeeded(Box<JobResult>),
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

/// Why the check of one member of an all-or-nothing restore failed
/// ([`Coordinator::check_member`]).
#[derive(Debug, thiserror::Error)]
enum CheckFailed {
    /// The agent is unusable.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The catalog has no backup to check, or could not be read.
    #[error("{0}")]
    Choice(String),
    /// No answer to the order within the agent timeout.
    #[error("agent {agent} did not answer the check")]
    NoAnswer { agent: String },
    /// The agent refused the order.
    #[error("agent {agent} refused the check: {}", describe_status(status))]
    Refused {
        agent: String,
        status: tonic::Status,
    },
    /// No event within the agent timeout.
    #[error("agent {agent} stopped answering during the check")]
    Silent { agent: String },
    /// The event stream broke.
    #[error("lost agent {agent} during the check: {}", describe_status(status))]
    Lost {
        agent: String,
        status: tonic::Status,
    },
    /// The stream ended without a result.
    #[error("agent {agent} ended the check without a result")]
    NoResult { agent: String },
    /// The agent found the backup unusable: its message.
    #[error("{0}")]
    Failed(String),
}

impl Coordinator {
    /// Runs `job` to a final state, retrying as configured; `first` is the outcome of an
    /// attempt already made (one a restarted coordinator reconciled). At shutdown the job
    /// is left as stored (queued or running) for the next start to reconcile.
    pub(super) async fn run(self: Arc<Self>, mut job: Job, mut first: Option<Attempt>) {
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
                            // The manifest's end (the agent's clock, checked above not
                            // to run ahead) where the agent gives it, so that the catalog
                            // is what `catalog rebuild` reads back from the manifests.
                            finished_ms: result
                                .data_finished_ms
                                .unwrap_or(job.finished_ms.unwrap_or_default()),
                            job_id: job.id.clone(),
                            missing: None,
                            retain_until_ms: None,
                            lock_error: None,
                            copies: Vec::new(),
                            recipients: result.recipient_fingerprints.clone(),
                        };
                        let store = self.store.clone();
                        let to_lock = record.clone();
                        if let Err(e) = blocking(move || store.put_backup(&record)).await {
                            tracing::error!(error = %e, "Could not record the backup in the catalog.");
                        }
                        // On a target with Object Lock: its objects locked until its date
                        // + keep_daily, by the maintenance credentials (retried in the
                        // background if the first attempt fails).
                        self.clone().lock_finished_backup(to_lock).await;
                        // Its copies (copy_to), made in the background.
                        self.copier.wake();
                    }
                    let summary = format!(
                        "Succeeded: {} ({} bytes).",
                        result.summary, result.size_bytes
                    );
                    job.result = Some(*result);
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
    pub(super) async fn fail(&self, job: &mut Job, message: String) {
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
        let drill = job.kind == JobKind::Restore && job.trigger == "schedule";
        let mut e = crate::notify::Event::new(
            if drill {
                crate::notify::EventKind::DrillFailed
            } else {
                crate::notify::EventKind::JobFailed
            },
            format!(
                "{} {} of {} on {} failed after {} attempt(s): {message}",
                if drill { "the drill" } else { "the" },
                job.kind,
                job.datastore,
                job.agent,
                job.attempt
            ),
        );
        self.about(&mut e, &job.agent, Some(&job.datastore));
        e.job_id = Some(job.id.clone());
        self.notifier.notify(e);
    }

    /// Runs the restore jobs of one trigger together: with `--all-or-nothing`, first
    /// checks every member's backup ([`Coordinator::check_member`]) and fails every job,
    /// restoring none, if one does not pass; then runs each job to its end and, for a
    /// set, reports what the set's restore came to ([`Coordinator::report_set`]).
    pub(super) async fn run_together(self: Arc<Self>, mut jobs: Vec<Job>) {
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
            let checks = self
                .unless_shutdown(futures::future::join_all(
                    jobs.iter().map(|j| self.check_member(j)),
                ))
                .await;
            // At shutdown the jobs stay queued unchecked: the next start fails them.
            let Ok(checks) = checks else { return };
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
        let runs = jobs
            .into_iter()
            .map(|job| self.tasks.spawn(self.clone().run(job, None)));
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
    /// [`CheckFailed`]: why the member cannot be restored, in words for the job's error.
    async fn check_member(&self, job: &Job) -> Result<String, CheckFailed> {
        let agent = || job.agent.clone();
        let described = self.agents.describe(&job.agent).await?;
        let (date, file, record) = self
            .chosen_backup(job, &described.source_environment, "check", false)
            .await
            .map_err(|failed| {
                CheckFailed::Choice(match failed {
                    Attempt::Failed { message, .. } | Attempt::Missing { message } => message,
                    Attempt::Succeeded(_) => String::new(),
                })
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
            target: job.target.clone().unwrap_or_default(),
            to_time_unix_ms: 0,
        });
        let mut stream = match tokio::time::timeout(timeout, call).await {
            Err(_) => return Err(CheckFailed::NoAnswer { agent: agent() }),
            Ok(Err(status)) => {
                return Err(CheckFailed::Refused {
                    agent: agent(),
                    status,
                });
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        loop {
            match tokio::time::timeout(timeout, stream.message()).await {
                Err(_) => return Err(CheckFailed::Silent { agent: agent() }),
                Ok(Err(status)) => {
                    return Err(CheckFailed::Lost {
                        agent: agent(),
                        status,
                    });
                }
                Ok(Ok(None)) => return Err(CheckFailed::NoResult { agent: agent() }),
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
                        return Err(CheckFailed::Failed(f.message));
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
                return Attempt::Failed {
                    retryable: problem.is_transient(),
                    message: problem.to_string(),
                };
            }
        };
        // Whether this datastore replays WAL to an instant (a restore --to-time).
        let replays = replays_wal(&described, &job.datastore);
        // A restore or verify reads the backup the catalog chose, and no other.
        let (date, file, chosen) = match job.kind {
            JobKind::Backup => (String::new(), String::new(), None),
            JobKind::Restore | JobKind::Verify => {
                match self
                    .chosen_backup(
                        job,
                        &described.source_environment,
                        job.kind.as_str(),
                        replays,
                    )
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
                    message: e.to_string(),
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
                            target: job.target.clone().unwrap_or_default(),
                            // Only a datastore that replays WAL gets the instant; the
                            // others restore the newest backup finished by then, which
                            // chosen_backup picked.
                            to_time_unix_ms: if replays {
                                job.to_time_ms.unwrap_or_default()
                            } else {
                                0
                            },
                        })
                        .await
                }
            }
        };
        let stream = match tokio::time::timeout(timeout, call).await {
            Err(_) => {
                // The order may still reach a frozen agent and run beside the retry: it is
                // told to cancel (the agent refuses an order it was told to cancel first).
                self.cancel_attempt(&client, order_id.clone());
                let message = format!(
                    "agent {} did not answer the order within {} s; it was told to cancel it",
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
        let mut outcome = self.follow(job, &client, stream).await;
        // A datastore restored for an instant it cannot replay to says so.
        if let (Attempt::Succeeded(result), Some(to), JobKind::Restore) =
            (&mut outcome, job.to_time_ms, job.kind)
            && !replays
        {
            result.summary = format!(
                "the newest backup finished by {} (this datastore cannot replay to an instant): {}",
                super::trigger::utc_ms(to),
                result.summary
            );
        }
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
        replays_wal: bool,
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
        let records =
            self.backups(Some(source_environment))
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
            && !newest.is_archive()
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
        // A restore to a point in time starts from the newest backup finished by then.
        if let Some(to) = job.to_time_ms {
            let before: Vec<&BackupRecord> = of_datastore
                .iter()
                .filter(|r| r.is_archive() && r.finished_ms <= to)
                .collect();
            let Some(record) = before.iter().max_by_key(|r| r.finished_ms) else {
                let oldest = of_datastore
                    .iter()
                    .filter(|r| r.is_archive())
                    .min_by_key(|r| r.finished_ms)
                    .map(|r| {
                        format!(
                            "; the oldest it holds finished at {}",
                            super::trigger::utc_ms(r.finished_ms)
                        )
                    })
                    .unwrap_or_default();
                return Err(Attempt::Failed {
                    message: format!(
                        "the catalog has no backup of datastore {} in environment {source_environment} \
                         that finished by {}: nothing to restore to that instant from{oldest}",
                        job.datastore,
                        super::trigger::utc_ms(to)
                    ),
                    retryable: false,
                });
            };
            let file = record.stored_path.rsplit('/').next().unwrap_or_default();
            self.event(
                job,
                if replays_wal {
                    format!(
                        "Ordering the {what} of {} to {} (backed up {} by job {}), the newest backup in the \
                         catalog that finished by then, with the archived WAL after it.",
                        record.stored_path,
                        super::trigger::utc_ms(to),
                        record.date,
                        record.job_id
                    )
                } else {
                    format!(
                        "Ordering the {what} of {} (backed up {} by job {}), the newest backup in the \
                         catalog that finished by {}: this datastore cannot replay to an instant.",
                        record.stored_path,
                        record.date,
                        record.job_id,
                        super::trigger::utc_ms(to)
                    )
                },
            )
            .await;
            return Ok((
                record.date.clone(),
                file.to_owned(),
                Some((*record).clone()),
            ));
        }
        let chosen = of_datastore
            .into_iter()
            .filter(|r| r.is_archive() && job.date.as_ref().is_none_or(|d| *d == r.date))
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

    /// Tells the agent to cancel attempt `order_id`, in a task of its own: not awaited, as a
    /// frozen agent takes the cancel only when it wakes (or never, at shutdown).
    fn cancel_attempt(
        &self,
        client: &v1::agent_client::AgentClient<tonic::transport::Channel>,
        order_id: String,
    ) {
        let mut client = client.clone();
        let shutdown = self.shutdown.clone();
        self.spawn(async move {
            tokio::select! {
                _ = client.cancel_job(v1::CancelJobRequest { job_id: order_id }) => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }

    /// Follows a job's event stream from its agent to the attempt's end, persisting state
    /// and progress (at most once a second). An agent that shows no sign of life for
    /// `agent_timeout` is told to cancel and the attempt fails (retryable): no event at all,
    /// or only progress reports of a streaming stage whose byte counters do not move
    /// ([`shows_life`]).
    pub(super) async fn follow(
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
                    self.cancel_attempt(
                        client,
                        ferry_proto::attempt::attempt_id(&job.id, job.attempt),
                    );
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
                    return Attempt::Succeeded(Box::new(JobResult {
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
                        target: f.target,
                        recipient_fingerprints: f.recipient_fingerprints,
                    }));
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

/// Whether `datastore` of the agent that `described` itself replays archived WAL to an
/// instant (its Describe says `point_in_time`).
fn replays_wal(described: &v1::DescribeResponse, datastore: &str) -> bool {
    described
        .datastores
        .iter()
        .any(|d| d.name == datastore && d.point_in_time)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Today, but finished hours ahead: the catalog would record an end to come.
        let ahead = JobResult {
            data_finished_ms: Some(at("2026-12-04T23:30:00Z").timestamp_millis()),
            ..result("2026-12-04")
        };
        let m = future_dated("db1", &ahead, now).unwrap();
        assert!(
            m.contains("finished at 2026-12-04 23:30:00 by agent db1's clock"),
            "{m}"
        );
        let close = JobResult {
            data_finished_ms: Some(at("2026-12-04T21:04:00Z").timestamp_millis()),
            ..result("2026-12-04")
        };
        assert_eq!(future_dated("db1", &close, now), None);
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
