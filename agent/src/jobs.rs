//! Orders and the jobs they start: validation of an order against the agent's role and
//! config, one running job per datastore at a time, progress ticks, cancellation.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::datastore::Datastore;
use crate::layout;
use crate::pipeline::{self, JobError, JobReport, Progress};

/// How often a running job reports progress (also the liveness signal), seconds.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

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
    /// Check the newest backup (or the given `YYYY-MM-DD`'s) without restoring it.
    Verify {
        /// The date, if one was asked for.
        date: Option<String>,
    },
    /// Restore the newest backup, or the given `YYYY-MM-DD`'s.
    Restore {
        /// The date, if one was asked for.
        date: Option<String>,
        /// Only these namespaces (`db.collection`); all when empty.
        namespaces: Vec<String>,
    },
}

/// A validated order.
pub struct Order {
    /// The coordinator's job id (a ULID).
    pub job_id: String,
    /// The datastore.
    pub datastore: Arc<Datastore>,
    /// Backup or restore.
    pub kind: OrderKind,
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
}

impl From<OrderError> for tonic::Status {
    fn from(e: OrderError) -> Self {
        match e {
            OrderError::PermissionDenied(m) => tonic::Status::permission_denied(m),
            OrderError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            OrderError::Busy(m) => tonic::Status::failed_precondition(m),
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
            datastore
                .chars()
                .take(layout::MAX_NAME_LEN)
                .collect::<String>()
        )));
    }
    ulid::Ulid::from_string(job_id)
        .map_err(|_| OrderError::InvalidArgument(format!("job id {job_id:?} is not a ULID")))?;
    layout::validate_name("datastore", datastore)
        .map_err(|e| OrderError::InvalidArgument(e.to_string()))?;
    let ds = settings.datastores.get(datastore).cloned().ok_or_else(|| {
        OrderError::InvalidArgument(format!(
            "agent {} has no datastore {datastore:?}; it has: {}",
            settings.id,
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
                "datastore {datastore:?} ({}) takes no backup type {:?}{}",
                ds.kind(),
                t.chars().take(20).collect::<String>(),
                if types.is_empty() {
                    String::new()
                } else {
                    format!("; it takes {}", types.join(" or "))
                }
            )));
        }
    }
    if let OrderKind::Verify { date: Some(d) } = &kind {
        layout::parse_date(d).map_err(|e| OrderError::InvalidArgument(e.to_string()))?;
    }
    if let OrderKind::Restore { date, namespaces } = &kind {
        if let Some(d) = date {
            layout::parse_date(d).map_err(|e| OrderError::InvalidArgument(e.to_string()))?;
        }
        if let Some(bad) = namespaces.iter().find(|n| !ferry_proto::valid_namespace(n)) {
            return Err(OrderError::InvalidArgument(format!(
                "namespace {:?} is not of the form database.collection",
                bad.chars().take(300).collect::<String>()
            )));
        }
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
    kind: &'static str,
    updates: broadcast::Sender<JobUpdate>,
    outcome: Option<JobUpdate>,
}

/// The jobs this agent knows: the running ones and the last [`REMEMBERED_JOBS`] finished.
#[derive(Default)]
struct Book {
    jobs: HashMap<String, Tracked>,
    finished: VecDeque<String>,
}

/// Runs jobs, at most one per datastore.
pub struct JobRunner {
    settings: Arc<Settings>,
    running: Mutex<HashMap<String, (String, CancellationToken)>>,
    book: Mutex<Book>,
    /// `max_concurrent_jobs` permits.
    slots: Arc<tokio::sync::Semaphore>,
    shutdown: CancellationToken,
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
        })
    }

    /// The settings.
    pub fn settings(&self) -> &Arc<Settings> {
        &self.settings
    }

    /// Starts `order` and returns its updates; the job keeps running if the receiver is
    /// dropped (a coordinator restart does not kill a backup). An order for the job that
    /// is already running (the same job id, sent again by a coordinator that lost the
    /// answer) follows that job instead of starting another.
    ///
    /// # Errors
    /// [`OrderError::Busy`] if the datastore has another running job.
    pub fn start(self: &Arc<Self>, order: Order) -> Result<Updates, OrderError> {
        let name = order.datastore.name().to_owned();
        let cancel = self.shutdown.child_token();
        {
            let mut running = self.running.lock().expect("jobs lock");
            if let Some((other, _)) = running.get(&name) {
                if *other == order.job_id
                    && let Some(updates) = self.watch(other)
                {
                    return Ok(updates);
                }
                return Err(OrderError::Busy(format!(
                    "datastore {name:?} on agent {} is busy with job {other}; one job per datastore at a time",
                    self.settings.id
                )));
            }
            running.insert(name.clone(), (order.job_id.clone(), cancel.clone()));
        }
        let kind = order.datastore.kind();
        let (tx, rx) = broadcast::channel(64);
        self.book.lock().expect("book lock").jobs.insert(
            order.job_id.clone(),
            Tracked {
                kind,
                updates: tx.clone(),
                outcome: None,
            },
        );
        let runner = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let progress = Progress::new(cancel.clone());
            let span = tracing::info_span!("job", job_id = %order.job_id, datastore = %name);
            let _ = tx.send(JobUpdate::Accepted { kind });
            tracing::info!(parent: &span, order = ?order.kind, "Job accepted.");
            let ticker = tokio::spawn(tick(progress.clone(), tx.clone()));
            // Beyond max_concurrent_jobs, wait (progress says so, so the coordinator
            // sees a live job); a cancel while waiting ends it.
            progress.set_stage("waiting");
            let _slot = tokio::select! {
                permit = runner.slots.clone().acquire_owned() => permit.ok(),
                _ = cancel.cancelled() => None,
            };
            let result = match (order.kind, order.datastore.repository()) {
                (OrderKind::Verify { .. }, Some(_)) => Err(JobError::InvalidArgument(format!(
                    "datastore {name:?} is a differential repository, not dated archives: \
                     its restore checks it (rsync checksums, pgBackRest's own checksums)"
                ))),
                (OrderKind::Backup { backup_type }, Some(r)) => {
                    r.backup(&runner.settings, backup_type, &progress).await
                }
                (OrderKind::Restore { date, namespaces }, Some(r)) => {
                    r.restore(
                        &runner.settings,
                        &order.job_id,
                        (date, namespaces),
                        &progress,
                    )
                    .await
                }
                (OrderKind::Verify { date }, None) => {
                    pipeline::verify(
                        runner.settings.clone(),
                        order.datastore.clone(),
                        date,
                        progress.clone(),
                    )
                    .await
                }
                (OrderKind::Backup { .. }, None) => {
                    pipeline::backup(
                        runner.settings.clone(),
                        order.datastore.clone(),
                        order.job_id.clone(),
                        progress.clone(),
                    )
                    .await
                }
                (OrderKind::Restore { date, namespaces }, None) => {
                    pipeline::restore(
                        runner.settings.clone(),
                        order.datastore.clone(),
                        order.job_id.clone(),
                        date,
                        namespaces,
                        progress.clone(),
                    )
                    .await
                }
            };
            ticker.abort();
            let result = match result {
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
            // A retried job id may be running again: keep it.
            if book.jobs.get(&old).is_some_and(|t| t.outcome.is_some())
                && !book.finished.contains(&old)
            {
                book.jobs.remove(&old);
            }
        }
    }

    /// Follows job `job_id`: a running job's updates from now on (after an `Accepted`),
    /// or a finished job's outcome alone; `None` if this agent does not know the job
    /// (it never ran here, the agent restarted, or it is older than the last
    /// [`REMEMBERED_JOBS`]).
    pub fn watch(&self, job_id: &str) -> Option<Updates> {
        let book = self.book.lock().expect("book lock");
        let t = book.jobs.get(job_id)?;
        let live = t.updates.subscribe();
        let first = match &t.outcome {
            Some(outcome) => vec![outcome.clone()],
            None => vec![JobUpdate::Accepted { kind: t.kind }],
        };
        Some(Updates { first, live })
    }

    /// Cancels job `job_id` if it is running here; returns whether it was.
    pub fn cancel(&self, job_id: &str) -> bool {
        let running = self.running.lock().expect("jobs lock");
        match running.values().find(|(id, _)| id == job_id) {
            Some((_, token)) => {
                token.cancel();
                true
            }
            None => false,
        }
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
        JobError::Internal(_) => "internal",
    }
}

async fn tick(progress: Progress, tx: broadcast::Sender<JobUpdate>) {
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
