//! Orders and the jobs they start: validation of an order against the agent's role and
//! config, one running job per datastore at a time, progress ticks, cancellation, and the
//! stop of every job at the agent's shutdown ([`JobRunner::stop`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_core::Bounded;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::datastore::Datastore;
use crate::job::{JobError, JobReport, Progress};
use crate::pipeline;
use ferry_core::layout;

/// How often a running job reports progress (also the liveness signal), seconds.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// How long a job has to end on its cancellation path once the agent is stopping, before
/// it is dropped ([`JobRunner::stop`]); less than [`crate::STOP_GRACE`].
pub const JOB_STOP_GRACE: Duration = Duration::from_secs(5);

/// How many finished jobs the agent remembers for [`JobRunner::watch`] (a restarted
/// coordinator asks for the outcome of the jobs it lost track of).
pub const REMEMBERED_JOBS: usize = 1000;

/// What an order asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrderKind {
    /// Back up the datastore.
    Backup {
        /// `full` or `diff` (pgBackRest datastores only); the datastore's default if `None`.
        backup_type: Option<String>,
    },
    /// Check a backup without restoring it: the one `file` names, else the newest (or the
    /// given `YYYY-MM-DD`'s).
    Verify {
        /// The date, if one was asked for; the date of `file` if that is given.
        date: Option<String>,
        /// The exact backup, as the coordinator's catalog chose it: the main archive's
        /// file name in the source environment's `date` folder. Dated archives only.
        file: Option<String>,
        /// The storage target to read: a copy's name, or `primary`; `None` reads the
        /// primary and falls back to a copy when it cannot be reached.
        target: Option<String>,
    },
    /// Check that a backup is there without downloading it ([`pipeline::check`]): the one
    /// `file` names, else the newest (or the given `YYYY-MM-DD`'s).
    Check {
        /// The date, if one was asked for; the date of `file` if that is given.
        date: Option<String>,
        /// The exact backup, as for [`OrderKind::Verify`].
        file: Option<String>,
        /// The target, as for [`OrderKind::Verify`].
        target: Option<String>,
    },
    /// Restore a backup: the one `file` names, else the newest (or the given
    /// `YYYY-MM-DD`'s).
    Restore {
        /// The date, if one was asked for; the date of `file` if that is given.
        date: Option<String>,
        /// The exact backup, as for [`OrderKind::Verify`].
        file: Option<String>,
        /// Only these namespaces (`db.collection`); all when empty.
        namespaces: Vec<String>,
        /// The target, as for [`OrderKind::Verify`].
        target: Option<String>,
        /// Restore to this instant (UTC) by replaying archived WAL after the base backup
        /// `file` names; `None`: to the backup's end. Only where
        /// [`Settings::point_in_time`] allows it.
        to_time: Option<chrono::DateTime<chrono::Utc>>,
    },
}

impl std::fmt::Display for OrderKind {
    /// What the order asks for, for logs: `backup`, `backup type full`, `verify date
    /// 2026-02-05 file "pg_backup_2026-02-05.pgdump.zst.age"`, `restore 3 namespace(s)
    /// "app.a,app.b,app.c"`. The values a client sent
    /// are shown [`Bounded`], so a log line never grows with the order.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, (date, file)) = match self {
            OrderKind::Backup { backup_type } => {
                f.write_str("backup")?;
                if let Some(t) = backup_type {
                    write!(f, " type {}", Bounded(t))?;
                }
                return Ok(());
            }
            OrderKind::Verify { date, file, .. } => ("verify", (date, file)),
            OrderKind::Check { date, file, .. } => ("check", (date, file)),
            OrderKind::Restore { date, file, .. } => ("restore", (date, file)),
        };
        f.write_str(what)?;
        if let Some(d) = date {
            write!(f, " date {}", Bounded(d))?;
        }
        if let Some(file) = file {
            write!(f, " file {}", Bounded(file))?;
        }
        if let OrderKind::Restore { namespaces, .. } = self
            && !namespaces.is_empty()
        {
            // The first few are enough for the 100 characters shown.
            let first: Vec<&str> = namespaces.iter().take(8).map(String::as_str).collect();
            write!(
                f,
                " {} namespace(s) {}",
                namespaces.len(),
                Bounded(&first.join(","))
            )?;
        }
        if let OrderKind::Restore {
            to_time: Some(t), ..
        } = self
        {
            write!(f, " to time {}", t.to_rfc3339())?;
        }
        Ok(())
    }
}

/// A validated order.
pub struct Order {
    /// The id the order carries, which names the job on this agent (`WatchJob`,
    /// `CancelJob`, events, logs): the coordinator's job id (a ULID) for a job's first
    /// attempt, `<job>-a<N>` for its Nth ([`ferry_proto::attempt`]).
    pub job_id: String,
    /// The datastore.
    pub datastore: Arc<dyn Datastore>,
    /// Backup or restore.
    pub kind: OrderKind,
}

impl Order {
    /// The coordinator's job id without the attempt: what names the files and scratch
    /// databases of the job, so a retry finds (and sweeps) what an earlier attempt left.
    pub fn job(&self) -> &str {
        ferry_proto::attempt::split_attempt_id(&self.job_id).map_or(&self.job_id, |(job, _)| job)
    }
}

/// An order refused before anything ran.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// Outside this agent's role.
    #[error("{0}")]
    PermissionDenied(String),
    /// Malformed or naming something unknown.
    #[error("{0}")]
    InvalidArgument(String),
    /// The datastore already has a running job.
    #[error("{0}")]
    Busy(String),
    /// The job id is already known here: another order for a running job, or a job that
    /// finished.
    #[error("{0}")]
    AlreadyExists(String),
    /// The agent is shutting down: it takes no new order.
    #[error("{0}")]
    ShuttingDown(String),
}

impl From<OrderError> for tonic::Status {
    fn from(e: OrderError) -> Self {
        match e {
            OrderError::PermissionDenied(m) => tonic::Status::permission_denied(m),
            OrderError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            OrderError::Busy(m) => tonic::Status::failed_precondition(m),
            OrderError::AlreadyExists(m) => tonic::Status::already_exists(m),
            OrderError::ShuttingDown(m) => tonic::Status::unavailable(m),
        }
    }
}

/// Checks an order: the role first (so a refusal never depends on what else is wrong),
/// then the job id, the datastore and the date.
///
/// # Errors
/// [`OrderError`] with a message naming the agent, its role and the datastore.
pub fn validate(
    settings: &Settings,
    job_id: &str,
    datastore: &str,
    kind: OrderKind,
) -> Result<Order, OrderError> {
    let (allowed, what) = match &kind {
        OrderKind::Backup { .. } => (settings.role.may_backup(), "back up"),
        OrderKind::Restore { .. } => (settings.role.may_restore(), "restore"),
        OrderKind::Verify { .. } => (settings.role.may_restore(), "verify"),
        OrderKind::Check { .. } => (settings.role.may_restore(), "check"),
    };
    if !allowed {
        return Err(OrderError::PermissionDenied(format!(
            "agent {} has role {}: it may only {}; refusing to {what} datastore {:?}",
            settings.id,
            settings.role,
            if settings.role.may_backup() {
                "back up"
            } else {
                "restore"
            },
            Bounded(datastore)
        )));
    }
    let is_ulid = |job: &str| ulid::Ulid::from_string(job).is_ok();
    if !ferry_proto::attempt::split_attempt_id(job_id).is_some_and(|(job, _)| is_ulid(job)) {
        return Err(OrderError::InvalidArgument(format!(
            "job id {} is not a ULID, or a ULID and -a<attempt> (2 or more)",
            Bounded(job_id)
        )));
    }
    layout::validate_name("datastore", datastore)
        .map_err(|e| OrderError::InvalidArgument(e.to_string()))?;
    let ds = settings.datastores.get(datastore).cloned().ok_or_else(|| {
        OrderError::InvalidArgument(format!(
            "agent {} has no datastore {}; it has: {}",
            settings.id,
            Bounded(datastore),
            settings
                .datastores
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    if let OrderKind::Backup {
        backup_type: Some(t),
    } = &kind
    {
        let types = ds.repository().map(|r| r.backup_types()).unwrap_or(&[]);
        if !types.contains(&t.as_str()) {
            return Err(OrderError::InvalidArgument(format!(
                "datastore {} ({}) takes no backup type {}{}",
                Bounded(datastore),
                ds.kind(),
                Bounded(t),
                if types.is_empty() {
                    String::new()
                } else {
                    format!("; it takes {}", types.join(" or "))
                }
            )));
        }
    }
    if let OrderKind::Verify { date, file, target }
    | OrderKind::Check { date, file, target }
    | OrderKind::Restore {
        date, file, target, ..
    } = &kind
    {
        if let Some(t) = target {
            if ds.repository().is_some() {
                return Err(OrderError::InvalidArgument(format!(
                    "datastore {} is a differential repository: it is not copied, and is read \
                     from [backup_server] only (not from target {})",
                    Bounded(datastore),
                    Bounded(t)
                )));
            }
            if t != ferry_storage::PRIMARY && !settings.copies.iter().any(|(n, _)| n == t) {
                let known: Vec<&str> = std::iter::once(ferry_storage::PRIMARY)
                    .chain(settings.copies.iter().map(|(n, _)| n.as_str()))
                    .collect();
                return Err(OrderError::InvalidArgument(format!(
                    "agent {} has no storage target {}: it reads {}",
                    settings.id,
                    Bounded(t),
                    known.join(", ")
                )));
            }
        }
        if let Some(d) = date {
            layout::parse_date(d).map_err(|e| OrderError::InvalidArgument(e.to_string()))?;
        }
        if let Some(f) = file {
            let Some(d) = date else {
                return Err(OrderError::InvalidArgument(format!(
                    "the order names backup file {} without its date",
                    Bounded(f)
                )));
            };
            if ds.repository().is_some() {
                return Err(OrderError::InvalidArgument(format!(
                    "datastore {} is a differential repository: it restores by date, not from \
                     backup file {}",
                    Bounded(datastore),
                    Bounded(f)
                )));
            }
            layout::validate_main_file(datastore, d, f)
                .map_err(|e| OrderError::InvalidArgument(e.to_string()))?;
        }
    }
    if let OrderKind::Restore {
        to_time: Some(_),
        namespaces,
        file,
        ..
    } = &kind
    {
        if !settings.point_in_time(&*ds) {
            return Err(OrderError::InvalidArgument(format!(
                "datastore {} ({}) on agent {} cannot be restored to a point in time: that takes a \
                 PostgreSQL datastore with method = \"physical\" on a staging agent with [wal] \
                 (its restored cluster replays the archived WAL through ferry-agent wal-get)",
                Bounded(datastore),
                ds.kind(),
                settings.id
            )));
        }
        if !namespaces.is_empty() || file.is_none() {
            return Err(OrderError::InvalidArgument(
                "a restore to a point in time names its base backup (file and date) and no \
                 namespaces"
                    .into(),
            ));
        }
    }
    if let OrderKind::Restore { namespaces, .. } = &kind
        && let Some(bad) = namespaces.iter().find(|n| !ferry_proto::valid_namespace(n))
    {
        return Err(OrderError::InvalidArgument(format!(
            "namespace {} is not of the form database.collection",
            Bounded(bad)
        )));
    }
    Ok(Order {
        job_id: job_id.to_owned(),
        datastore: ds,
        kind,
    })
}

/// What a job reports as it runs. Cloned to every watcher of the job.
#[derive(Clone, Debug)]
pub enum JobUpdate {
    /// The job started.
    Accepted {
        /// Datastore kind.
        kind: &'static str,
    },
    /// Periodic progress.
    Progress {
        /// Stage name.
        stage: &'static str,
        /// Bytes read from the source so far.
        bytes_read: u64,
        /// Bytes written to the sink so far.
        bytes_written: u64,
        /// Rate of `bytes_read` over the last interval, bytes per second.
        rate: f64,
        /// Whether the counters measure the stage ([`Progress::streaming`]).
        streaming: bool,
    },
    /// Succeeded.
    Finished {
        /// What was stored or restored.
        report: JobReport,
        /// Wall time.
        duration: Duration,
    },
    /// Failed.
    Failed(Arc<JobError>),
}

impl JobUpdate {
    /// Whether this is the job's last update (finished or failed).
    pub fn is_final(&self) -> bool {
        matches!(self, JobUpdate::Finished { .. } | JobUpdate::Failed(_))
    }
}

/// A job's updates as they come, ending with its final one.
pub struct Updates {
    /// Updates already known (the outcome of a finished job, or `Accepted` for a watcher
    /// joining a running one), sent before `live`.
    pub first: Vec<JobUpdate>,
    /// Updates from now on; the stream ends at the first final update.
    pub live: broadcast::Receiver<JobUpdate>,
}

/// A job this agent ran or runs.
struct Tracked {
    /// The datastore's kind.
    kind: &'static str,
    /// The datastore's name.
    datastore: String,
    /// What the order asked for.
    order: OrderKind,
    updates: broadcast::Sender<JobUpdate>,
    outcome: Option<JobUpdate>,
}

impl Tracked {
    /// Follows the job: its updates from now on after an `Accepted`, or its outcome alone.
    fn follow(&self) -> Updates {
        let live = self.updates.subscribe();
        let first = match &self.outcome {
            Some(outcome) => vec![outcome.clone()],
            None => vec![JobUpdate::Accepted { kind: self.kind }],
        };
        Updates { first, live }
    }

    /// `verify date 2026-02-05 of datastore "postgres"`, for refusals.
    fn describe(&self) -> String {
        format!("{} of datastore {}", self.order, Bounded(&self.datastore))
    }
}

/// The jobs this agent knows: the running ones and the last [`REMEMBERED_JOBS`] finished.
#[derive(Default)]
struct Book {
    jobs: HashMap<String, Tracked>,
    finished: VecDeque<String>,
    /// Job ids cancelled before their order arrived (a coordinator that gave up waiting
    /// for the answer), newest last, at most [`REMEMBERED_JOBS`]: their orders are refused.
    cancelled_unknown: VecDeque<String>,
}

/// Runs jobs, at most one per datastore.
pub struct JobRunner {
    settings: Arc<Settings>,
    running: Mutex<HashMap<String, (String, CancellationToken)>>,
    book: Mutex<Book>,
    /// `max_concurrent_jobs` permits.
    slots: Arc<tokio::sync::Semaphore>,
    shutdown: CancellationToken,
    /// Every job's task (its progress ticks run inside it): [`JobRunner::stop`] waits for
    /// them.
    tasks: TaskTracker,
}

impl JobRunner {
    /// A runner whose jobs are cancelled when `shutdown` is.
    pub fn new(settings: Arc<Settings>, shutdown: CancellationToken) -> Arc<Self> {
        let slots = Arc::new(tokio::sync::Semaphore::new(settings.max_concurrent_jobs));
        Arc::new(Self {
            settings,
            running: Mutex::new(HashMap::new()),
            book: Mutex::new(Book::default()),
            slots,
            shutdown,
            tasks: TaskTracker::new(),
        })
    }

    /// Stops every job and returns once each has ended: cancels the shutdown token (each
    /// job's cancel is a child of it), which ends a job on its cancellation path (its
    /// tools exit and are reaped, its upload's partial file is removed or left hidden, it
    /// reports [`JobError::Stopped`]); from then on orders are refused
    /// ([`OrderError::ShuttingDown`]). A job still running [`JOB_STOP_GRACE`] after the
    /// cancel is dropped (its tools killed on drop) and reports [`JobError::Stopped`].
    pub async fn stop(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        if !self.tasks.is_empty() {
            tracing::info!(
                jobs = %self.running_jobs().join(","),
                "Waiting for the running jobs to stop."
            );
        }
        self.tasks.wait().await;
    }

    /// The ids of the jobs running or waiting for a slot, sorted.
    pub fn running_jobs(&self) -> Vec<String> {
        let running = self.running.lock().expect("jobs lock");
        let mut ids: Vec<String> = running.values().map(|(id, _)| id.clone()).collect();
        ids.sort();
        ids
    }

    /// The settings.
    pub fn settings(&self) -> &Arc<Settings> {
        &self.settings
    }

    /// Starts `order` and returns its updates; the job keeps running if the receiver is
    /// dropped (a coordinator restart does not kill a backup). The same order again for a
    /// job still running (the same id, datastore and request, sent again by a coordinator
    /// that lost the answer) follows that job instead of starting another.
    ///
    /// # Errors
    /// [`OrderError::AlreadyExists`] if the job id is known here otherwise: a running job
    /// given another order (another kind, datastore, date...), or a finished job (of the
    /// last [`REMEMBERED_JOBS`]) sent again; a retry needs an id of its own
    /// ([`ferry_proto::attempt`]). [`OrderError::Busy`] if the datastore has another
    /// running job. [`OrderError::ShuttingDown`] once the agent is stopping.
    pub fn start(self: &Arc<Self>, order: Order) -> Result<Updates, OrderError> {
        if self.shutdown.is_cancelled() {
            return Err(OrderError::ShuttingDown(format!(
                "agent {} is shutting down and takes no new order; {} of datastore {} can be \
                 sent again once it is back",
                self.settings.id,
                order.kind,
                Bounded(order.datastore.name())
            )));
        }
        let name = order.datastore.name().to_owned();
        let cancel = self.shutdown.child_token();
        let kind = order.datastore.kind();
        let (tx, rx) = broadcast::channel(64);
        {
            // Lock order: `running`, then `book`.
            let mut running = self.running.lock().expect("jobs lock");
            let mut book = self.book.lock().expect("book lock");
            if let Some(known) = book.jobs.get(&order.job_id) {
                let this = format!("{} of datastore {}", order.kind, Bounded(&name));
                return match &known.outcome {
                    None if known.datastore == name && known.order == order.kind => {
                        Ok(known.follow())
                    }
                    None => Err(OrderError::AlreadyExists(format!(
                        "job {} is already running on agent {} as a {}; refusing to take it \
                         as a {this}: a new order needs a job id of its own",
                        order.job_id,
                        self.settings.id,
                        known.describe()
                    ))),
                    Some(outcome) => Err(OrderError::AlreadyExists(format!(
                        "job {} already ran on agent {} (a {}, {}); refusing to run it again \
                         as a {this}: a new order or a retry needs a job id of its own \
                         (the coordinator orders attempt N as <job>-a<N>)",
                        order.job_id,
                        self.settings.id,
                        known.describe(),
                        if matches!(outcome, JobUpdate::Finished { .. }) {
                            "succeeded"
                        } else {
                            "failed"
                        }
                    ))),
                };
            }
            if book.cancelled_unknown.contains(&order.job_id) {
                return Err(OrderError::AlreadyExists(format!(
                    "job {} was told to cancel before its order reached agent {}; refusing it \
                     (the coordinator retries under a job id of its own)",
                    order.job_id, self.settings.id
                )));
            }
            if let Some((other, _)) = running.get(&name) {
                return Err(OrderError::Busy(format!(
                    "datastore {name:?} on agent {} is busy with job {other}; one job per datastore at a time",
                    self.settings.id
                )));
            }
            running.insert(name.clone(), (order.job_id.clone(), cancel.clone()));
            book.jobs.insert(
                order.job_id.clone(),
                Tracked {
                    kind,
                    datastore: name.clone(),
                    order: order.kind.clone(),
                    updates: tx.clone(),
                    outcome: None,
                },
            );
        }
        let job = order.job().to_owned();
        let runner = self.clone();
        self.tasks.spawn(async move {
            let started = Instant::now();
            let progress = Progress::new(cancel.clone());
            let span = tracing::info_span!("job", job_id = %order.job_id, datastore = %name);
            let _ = tx.send(JobUpdate::Accepted { kind });
            tracing::info!(parent: &span, order = %order.kind, "Job accepted.");
            // The progress ticks run beside the work, inside this task, and end with it.
            let ticker = tick(progress.clone(), tx.clone());
            let work = async {
                // Beyond max_concurrent_jobs, wait (progress says so, so the coordinator
                // sees a live job); a cancel while waiting ends it.
                progress.set_stage("waiting");
                let _slot = tokio::select! {
                    permit = runner.slots.clone().acquire_owned() => permit.ok(),
                    _ = cancel.cancelled() => None,
                };
                // Before a restore, the leftovers of this datastore's interrupted restores
                // (this job's own previous attempt among them) are put right, and reported.
                let recovery = match &order.kind {
                    OrderKind::Restore { .. } if !cancel.is_cancelled() => {
                        progress.set_stage("recover");
                        Some(
                            order
                                .datastore
                                .recover(&runner.running_except(&order.job_id))
                                .await,
                        )
                    }
                    _ => None,
                };
                let result = match (order.kind, order.datastore.repository()) {
                    (OrderKind::Verify { .. } | OrderKind::Check { .. }, Some(_)) => {
                        Err(JobError::InvalidArgument(format!(
                            "datastore {name:?} is a differential repository, not dated archives: \
                             its restore checks it (rsync checksums, pgBackRest's own checksums)"
                        )))
                    }
                    (OrderKind::Check { date, file, target }, None) => {
                        pipeline::check(
                            runner.settings.clone(),
                            order.datastore.clone(),
                            (date, file, target),
                            progress.clone(),
                        )
                        .await
                    }
                    (OrderKind::Backup { backup_type }, Some(r)) => {
                        r.backup(&runner.settings, backup_type, &progress).await
                    }
                    (
                        OrderKind::Restore {
                            date, namespaces, ..
                        },
                        Some(r),
                    ) => {
                        r.restore(&runner.settings, &job, (date, namespaces), &progress)
                            .await
                    }
                    (OrderKind::Verify { date, file, target }, None) => {
                        pipeline::verify(
                            runner.settings.clone(),
                            order.datastore.clone(),
                            (date, file, target),
                            progress.clone(),
                        )
                        .await
                    }
                    (OrderKind::Backup { .. }, None) => {
                        pipeline::backup(
                            runner.settings.clone(),
                            order.datastore.clone(),
                            job,
                            progress.clone(),
                        )
                        .await
                    }
                    (
                        OrderKind::Restore {
                            date,
                            file,
                            namespaces,
                            target,
                            to_time,
                        },
                        None,
                    ) => {
                        pipeline::restore(
                            runner.settings.clone(),
                            order.datastore.clone(),
                            job,
                            (date, file, target),
                            pipeline::RestoreTo {
                                namespaces,
                                to_time,
                            },
                            progress.clone(),
                        )
                        .await
                    }
                };
                match &recovery {
                    Some(r) => r.annotate(result),
                    None => result,
                }
            };
            // At the agent's shutdown, a job that does not end on its cancellation path
            // (a tool that writes nothing, so no closed pipe stops it) is dropped after
            // JOB_STOP_GRACE: its tools are killed, its partial file stays hidden.
            let dropped = async {
                runner.shutdown.cancelled().await;
                tokio::time::sleep(JOB_STOP_GRACE).await;
            };
            let result = tokio::select! {
                result = work => result,
                never = ticker => match never {},
                () = dropped => {
                    tracing::warn!(parent: &span, stage = progress.stage(), grace_seconds = JOB_STOP_GRACE.as_secs(),
                        "Job still running after the stop grace: dropped, its tools killed.");
                    Err(JobError::Stopped)
                }
            };
            // Whatever failed once the job was cancelled failed because of it; at the
            // agent's shutdown, the coordinator may retry it once the agent is back.
            let result = match result {
                Err(_) if runner.shutdown.is_cancelled() => Err(JobError::Stopped),
                Err(_) if cancel.is_cancelled() => Err(JobError::Cancelled),
                other => other,
            };
            let update = match result {
                Ok(report) => {
                    tracing::info!(parent: &span, path = %report.stored_path, bytes = report.size_bytes,
                        seconds = started.elapsed().as_secs_f64(), "Job succeeded.");
                    JobUpdate::Finished {
                        report,
                        duration: started.elapsed(),
                    }
                }
                Err(e) => {
                    tracing::error!(parent: &span, stage = progress.stage(), error_type = error_type(&e),
                        error = %e, "Job failed.");
                    JobUpdate::Failed(Arc::new(e))
                }
            };
            runner.finish(&order.job_id, update.clone());
            runner.running.lock().expect("jobs lock").remove(&name);
            let _ = tx.send(update);
        });
        Ok(Updates {
            first: Vec::new(),
            live: rx,
        })
    }

    /// Records `job_id`'s outcome (before it is broadcast, so that a watcher either
    /// finds it here or receives it) and forgets the oldest finished jobs.
    fn finish(&self, job_id: &str, outcome: JobUpdate) {
        let mut book = self.book.lock().expect("book lock");
        if let Some(t) = book.jobs.get_mut(job_id) {
            t.outcome = Some(outcome);
        }
        book.finished.push_back(job_id.to_owned());
        while book.finished.len() > REMEMBERED_JOBS {
            let Some(old) = book.finished.pop_front() else {
                break;
            };
            book.jobs.remove(&old);
        }
    }

    /// Follows job `job_id`: a running job's updates from now on (after an `Accepted`),
    /// or a finished job's outcome alone; `None` if this agent does not know the job
    /// (it never ran here, the agent restarted, or it is older than the last
    /// [`REMEMBERED_JOBS`]).
    pub fn watch(&self, job_id: &str) -> Option<Updates> {
        let book = self.book.lock().expect("book lock");
        book.jobs.get(job_id).map(Tracked::follow)
    }

    /// The coordinator job ids (attempts folded) of the jobs running or waiting for a slot
    /// in this agent, but `job_id`'s.
    fn running_except(&self, job_id: &str) -> Vec<String> {
        // Scratch names carry the coordinator's job id, not the attempt's (`<job>-a<N>`).
        let job = |id: &str| {
            ferry_proto::attempt::split_attempt_id(id).map_or(id.to_owned(), |(j, _)| j.to_owned())
        };
        let this = job(job_id);
        let running = self.running.lock().expect("jobs lock");
        running
            .values()
            .map(|(id, _)| job(id))
            .filter(|id| *id != this)
            .collect()
    }

    /// Cancels job `job_id` if it is running here; returns whether it was. A job this agent
    /// has never seen is remembered as cancelled: its order, arriving late (a coordinator
    /// that gave up waiting for the answer and retries), is refused.
    pub fn cancel(&self, job_id: &str) -> bool {
        // Lock order: `running`, then `book`.
        let running = self.running.lock().expect("jobs lock");
        if let Some((_, token)) = running.values().find(|(id, _)| id == job_id) {
            token.cancel();
            return true;
        }
        let mut book = self.book.lock().expect("book lock");
        if !book.jobs.contains_key(job_id) && !book.cancelled_unknown.iter().any(|id| id == job_id)
        {
            book.cancelled_unknown.push_back(job_id.to_owned());
            while book.cancelled_unknown.len() > REMEMBERED_JOBS {
                book.cancelled_unknown.pop_front();
            }
        }
        false
    }
}

/// A bounded name for the kind of a job error, for logs and metrics.
pub fn error_type(e: &JobError) -> &'static str {
    match e {
        JobError::PermissionDenied(_) => "permission_denied",
        JobError::InvalidArgument(_) => "invalid_argument",
        JobError::NotFound(_) => "not_found",
        JobError::Dump { .. } | JobError::EmptyDump(_) => "dump_failed",
        JobError::Transport(_) => "transport_failed",
        JobError::Integrity(_) | JobError::Manifest(_) => "integrity",
        JobError::Restore { .. } => "restore_failed",
        JobError::Stage { .. } => "stage_failed",
        JobError::Cancelled => "cancelled",
        JobError::Stopped => "stopped",
        JobError::Internal(_) => "internal",
    }
}

/// Sends `progress` to the job's watchers every [`PROGRESS_INTERVAL`]; never ends.
async fn tick(progress: Progress, tx: broadcast::Sender<JobUpdate>) -> std::convert::Infallible {
    let mut last = (Instant::now(), 0u64);
    let mut interval = tokio::time::interval(PROGRESS_INTERVAL);
    interval.tick().await;
    loop {
        interval.tick().await;
        let (read, written) = progress.bytes();
        let now = Instant::now();
        let secs = now.duration_since(last.0).as_secs_f64().max(1e-3);
        let rate = read.saturating_sub(last.1) as f64 / secs;
        last = (now, read);
        let update = JobUpdate::Progress {
            stage: progress.stage(),
            bytes_read: read,
            bytes_written: written,
            rate,
            streaming: progress.streaming(),
        };
        // Never waits: a slow watcher misses ticks, one that is gone is no error.
        let _ = tx.send(update);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{CheckError, Mode, ReapedChild, Repository};
    use crate::pipeline::encrypt::{self, Encryption};
    use futures::future::BoxFuture;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    /// A repository datastore whose backup runs `sleep 60` as its tool. A polite one, told
    /// to cancel, kills and reaps its tool, then takes 300 ms to clean up and says so in
    /// `cleaned`; a stubborn one waits for its tool whatever happens (a dump tool that
    /// writes nothing, so no closed pipe ends it).
    struct Sleeper {
        stubborn: bool,
        tool: AtomicU32,
        cleaned: AtomicBool,
    }

    impl Datastore for Sleeper {
        fn name(&self) -> &str {
            "sleeper"
        }
        fn kind(&self) -> &'static str {
            "sleeper"
        }
        fn tool_versions(&self) -> Vec<(String, String)> {
            Vec::new()
        }
        fn check(&self) -> BoxFuture<'_, Result<String, CheckError>> {
            Box::pin(async { Ok(String::new()) })
        }
        fn mode(&self) -> Mode<'_> {
            Mode::Repository(self)
        }
    }

    impl Repository for Sleeper {
        fn backup<'a>(
            &'a self,
            _: &'a Arc<Settings>,
            _: Option<String>,
            progress: &'a Progress,
        ) -> BoxFuture<'a, Result<JobReport, JobError>> {
            Box::pin(async move {
                let mut tool = ReapedChild::new(
                    tokio::process::Command::new("sleep")
                        .arg("60")
                        .spawn()
                        .expect("sleep starts"),
                );
                self.tool
                    .store(tool.id().expect("running"), Ordering::SeqCst);
                if !self.stubborn {
                    progress.cancel.cancelled().await;
                    // Killed and reaped.
                    drop(tool);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    self.cleaned.store(true, Ordering::SeqCst);
                    return Err(JobError::Internal("sleep killed".into()));
                }
                let status = tool.wait().await;
                Err(JobError::Internal(format!("sleep ended: {status:?}")))
            })
        }

        fn restore<'a>(
            &'a self,
            _: &'a Arc<Settings>,
            _: &'a str,
            _: (Option<String>, Vec<String>),
            _: &'a Progress,
        ) -> BoxFuture<'a, Result<JobReport, JobError>> {
            unreachable!("only backups are ordered")
        }
    }

    fn sleeper(stubborn: bool) -> Arc<Sleeper> {
        Arc::new(Sleeper {
            stubborn,
            tool: AtomicU32::new(0),
            cleaned: AtomicBool::new(false),
        })
    }

    fn runner(ds: Arc<Sleeper>) -> Arc<JobRunner> {
        let (_, recipient) = encrypt::generate_identity();
        let settings = Settings {
            id: "agent-1".into(),
            allowed_clients: vec!["coordinator".into()],
            max_concurrent_jobs: 4,
            datastores: [("sleeper".to_owned(), ds as Arc<dyn Datastore>)].into(),
            ..Settings::for_tests(
                Arc::new(ferry_storage::memory::MemoryTarget::new("/srv/ferry")),
                crate::config::Keys::Encrypt(Encryption::from_recipients(&[recipient]).unwrap()),
            )
        };
        JobRunner::new(Arc::new(settings), CancellationToken::new())
    }

    /// Starts a backup of the sleeper; its id, once its tool runs.
    async fn start_backup(runner: &Arc<JobRunner>, ds: &Sleeper) -> String {
        let job_id = ulid::Ulid::new().to_string();
        let order = validate(
            runner.settings(),
            &job_id,
            "sleeper",
            OrderKind::Backup { backup_type: None },
        )
        .unwrap();
        runner.start(order).unwrap();
        while ds.tool.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        job_id
    }

    /// Whether process `pid` is gone: exited and reaped (a zombie is not gone).
    fn gone(pid: u32) -> bool {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    }

    /// The outcome the runner recorded for `job_id`.
    fn outcome(runner: &JobRunner, job_id: &str) -> JobUpdate {
        let updates = runner.watch(job_id).expect("the job is known");
        updates.first.into_iter().next().expect("an outcome")
    }

    #[tokio::test]
    async fn stop_returns_once_a_cancelled_job_has_cleaned_up_and_refuses_orders_after() {
        let ds = sleeper(false);
        let runner = runner(ds.clone());
        let job_id = start_backup(&runner, &ds).await;
        let tool = ds.tool.load(Ordering::SeqCst);
        assert!(!gone(tool));

        let asked = Instant::now();
        runner.stop().await;
        assert!(
            ds.cleaned.load(Ordering::SeqCst),
            "stop returned before the job had cleaned up"
        );
        assert!(asked.elapsed() < JOB_STOP_GRACE, "{:?}", asked.elapsed());
        assert!(gone(tool), "the job's tool outlived it");
        let JobUpdate::Failed(e) = outcome(&runner, &job_id) else {
            panic!("the stopped job failed");
        };
        assert!(
            matches!(*e, JobError::Stopped) && e.retryable(),
            "a job stopped by the shutdown may be retried: {e:?}"
        );
        assert!(runner.running_jobs().is_empty());

        let order = validate(
            runner.settings(),
            &ulid::Ulid::new().to_string(),
            "sleeper",
            OrderKind::Backup { backup_type: None },
        )
        .unwrap();
        let refused = runner.start(order).err().expect("refused");
        assert!(matches!(refused, OrderError::ShuttingDown(_)), "{refused}");
        assert_eq!(
            tonic::Status::from(refused).code(),
            tonic::Code::Unavailable
        );
    }

    #[tokio::test]
    async fn an_order_told_to_cancel_before_it_arrived_is_refused_and_the_retry_runs() {
        let ds = sleeper(false);
        let runner = runner(ds.clone());
        let job = ulid::Ulid::new().to_string();
        let order = |id: &str| {
            validate(
                runner.settings(),
                id,
                "sleeper",
                OrderKind::Backup { backup_type: None },
            )
            .unwrap()
        };
        // The coordinator gave up waiting for the answer and cancelled before the order
        // got here: the late order starts nothing.
        assert!(!runner.cancel(&job));
        let refused = runner.start(order(&job)).err().expect("refused");
        assert!(
            refused
                .to_string()
                .contains("was told to cancel before its order"),
            "{refused}"
        );
        assert!(runner.running_jobs().is_empty());
        // The retry, under its attempt id, runs.
        let retry = format!("{job}-a2");
        runner.start(order(&retry)).unwrap();
        assert_eq!(runner.running_jobs(), std::slice::from_ref(&retry));
        assert!(runner.cancel(&retry));
        runner.stop().await;
    }

    #[tokio::test]
    async fn a_job_that_ignores_the_cancel_is_dropped_after_the_grace_and_its_tool_killed() {
        let ds = sleeper(true);
        let runner = runner(ds.clone());
        let job_id = start_backup(&runner, &ds).await;
        let tool = ds.tool.load(Ordering::SeqCst);

        let asked = Instant::now();
        runner.stop().await;
        let took = asked.elapsed();
        assert!(
            took >= JOB_STOP_GRACE && took < JOB_STOP_GRACE + Duration::from_secs(2),
            "{took:?}"
        );
        assert!(
            gone(tool),
            "the dropped job's tool was not killed and reaped"
        );
        let JobUpdate::Failed(e) = outcome(&runner, &job_id) else {
            panic!("the dropped job failed");
        };
        assert!(matches!(*e, JobError::Stopped), "{e:?}");
    }
}
