//! The coordinator's domain service: turning triggers into jobs, sending orders to
//! agents, following their event streams, persisting every transition, retrying with
//! back-off, taking up the jobs of a previous process, and running the schedules.
//!
//! [`Coordinator`] is the state they share (settings, store, agents, counters, the
//! shutdown signal); its methods are split by concern:
//! - `trigger`: the trigger policy: what an operator or a schedule may order, checked
//!   against the role split and what the agent described, turned into queued jobs
//!   ([`Coordinator::trigger`], [`Selection`]).
//! - `runner`: attempts and retries: one order to an agent, its event stream followed to
//!   the end, retried with back-off; restores of a set run together.
//! - `recovery`: after a restart, the jobs a previous process left unfinished, asked about
//!   and taken up ([`Coordinator::reconcile`]).
//! - `schedule`: the cron schedules ([`Coordinator::run_schedules`]).
//!
//! What the catalog decides (backup sets, which backup a restore reads) is in
//! [`crate::catalog`].

use std::sync::Arc;
use std::time::Duration;

use ferry_core::Bounded;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agents::AgentPool;
use crate::config::Settings;
use crate::model::{Job, JobEventRecord};
use crate::store::{Store, StoreError, blocking};
use ferry_core::audit::AuditEntry;

mod recovery;
mod runner;
mod schedule;
mod trigger;

pub use runner::{CLOCK_TOLERANCE, future_dated};
pub use schedule::{SCHEDULE, schedule_key};
pub use trigger::Selection;

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
    Store(#[from] StoreError),
    /// The coordinator is shutting down: nothing was queued.
    #[error("the coordinator is shutting down: nothing was queued; order again once it is back")]
    ShuttingDown,
}

impl DispatchError {
    /// The same error with `text` added in parentheses to its message (the store's and the
    /// shutdown's stay as they are).
    pub fn context(self, text: &str) -> DispatchError {
        let add = |m: String| format!("{m} ({text})");
        match self {
            DispatchError::PermissionDenied(m) => DispatchError::PermissionDenied(add(m)),
            DispatchError::InvalidArgument(m) => DispatchError::InvalidArgument(add(m)),
            DispatchError::Unavailable(m) => DispatchError::Unavailable(add(m)),
            DispatchError::NotFound(m) => DispatchError::NotFound(add(m)),
            other => other,
        }
    }
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
    /// Every task the coordinator spawns (jobs, schedules, watches, agent checks): closed
    /// and awaited at shutdown, so [`crate::run`] returns only once all have ended.
    pub tasks: TaskTracker,
    /// Counters for `/metrics`.
    pub counters: crate::metrics::Counters,
    /// The copier's wake-up and progress ([`crate::catalog::copies`]).
    pub copier: crate::catalog::copies::Copier,
    /// The archive scanner's last results ([`crate::catalog::archive`]).
    pub archives: crate::catalog::archive::Archives,
    /// The webhooks' queues ([`crate::notify`]).
    pub notifier: crate::notify::Notifier,
    /// The self-backups since start ([`crate::state`]).
    pub self_backups: std::sync::Mutex<crate::state::SelfBackupProgress>,
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

    /// Every (agent, datastore) the coordinator knows of (described by the agent or named
    /// by a schedule) with its newest jobs, in inventory order.
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn datastore_states(
        &self,
    ) -> Result<Vec<(crate::config::Agent, String, crate::store::LatestJobs)>, StoreError> {
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

    /// Job `id`.
    ///
    /// # Errors
    /// [`DispatchError::InvalidArgument`] when `id` is not a ULID,
    /// [`DispatchError::NotFound`] when there is no such job, [`DispatchError::Store`].
    pub async fn job(&self, id: &str) -> Result<Job, DispatchError> {
        ulid::Ulid::from_string(id).map_err(|_| {
            DispatchError::InvalidArgument(format!("job id {} is not a ULID", Bounded(id)))
        })?;
        let (store, key) = (self.store.clone(), id.to_owned());
        blocking(move || store.get_job(&key))
            .await?
            .ok_or_else(|| DispatchError::NotFound(format!("no job {id}")))
    }

    /// At most `limit` jobs, newest first.
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn jobs(&self, limit: usize) -> Result<Vec<Job>, StoreError> {
        let store = self.store.clone();
        blocking(move || store.list_jobs(limit)).await
    }

    /// `f`'s output, unless shutdown comes first.
    ///
    /// # Errors
    /// [`DispatchError::ShuttingDown`]: [`Coordinator::shutdown`] was cancelled first (`f`
    /// is dropped).
    pub(crate) async fn unless_shutdown<T>(
        &self,
        f: impl Future<Output = T>,
    ) -> Result<T, DispatchError> {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => Err(DispatchError::ShuttingDown),
            out = f => Ok(out),
        }
    }

    /// Spawns `task` as one of the coordinator's own ([`Coordinator::tasks`]): it must
    /// stop waiting (on an agent, a timer) when [`Coordinator::shutdown`] is cancelled.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// Snapshots of job `first` as it changes: `first`, then each change (polled from the
    /// store every 300 ms), ending after a final state, when the job can no longer be
    /// read, when the receiver is dropped, or at shutdown (a watcher then sees the stream
    /// end before the job and may ask again once the coordinator is back).
    pub fn watch(&self, first: Job) -> tokio::sync::mpsc::Receiver<Job> {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let store = self.store.clone();
        let shutdown = self.shutdown.clone();
        self.spawn(async move {
            let mut last = first;
            if tx.send(last.clone()).await.is_err() || last.state.is_final() {
                return;
            }
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                    _ = tx.closed() => return,
                    _ = shutdown.cancelled() => return,
                }
                let (store, id) = (store.clone(), last.id.clone());
                let Ok(Some(job)) = blocking(move || store.get_job(&id)).await else {
                    return;
                };
                if job != last {
                    if tx.send(job.clone()).await.is_err() {
                        return;
                    }
                    last = job;
                }
                if last.state.is_final() {
                    return;
                }
            }
        });
        rx
    }

    /// The audit log, oldest first; the newest `limit` entries if given.
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn audit_log(&self, limit: Option<usize>) -> Result<Vec<AuditEntry>, StoreError> {
        let store = self.store.clone();
        blocking(move || store.list_audit(limit)).await
    }

    pub(super) async fn put(&self, job: &Job) {
        let store = self.store.clone();
        let job = job.clone();
        if let Err(e) = blocking(move || store.put_job(&job)).await {
            tracing::error!(error = %e, error_type = "store", "Could not persist a job.");
        }
    }

    pub(super) async fn event(&self, job: &Job, message: String) {
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
}

/// A coordinator for unit tests: over a [`crate::store::MemoryStore`], with `agents`
/// (`(id, role, address)`, environment `production` or `staging` by role), the
/// coordinator's certificate from a throwaway fleet CA in `dir`, and `agent_timeout`.
#[cfg(test)]
pub(crate) fn test_coordinator(
    dir: &std::path::Path,
    agents: &[(&str, ferry_proto::Role, &str)],
    agent_timeout: Duration,
) -> Arc<Coordinator> {
    let pki = dir.join("pki");
    crate::pki::init_ca(&pki).unwrap();
    let issued = crate::pki::issue(&pki, "coordinator", &[], 1).unwrap();
    let tls = ferry_proto::tls::TlsFiles {
        cert: issued.cert,
        key: issued.key,
        ca: pki.join("ca.pem"),
    };
    let agents: std::collections::BTreeMap<String, crate::config::Agent> = agents
        .iter()
        .map(|(id, role, address)| {
            let agent = crate::config::Agent {
                id: (*id).to_owned(),
                address: (*address).to_owned(),
                role: *role,
                environment: if role.may_backup() {
                    "production"
                } else {
                    "staging"
                }
                .into(),
            };
            ((*id).to_owned(), agent)
        })
        .collect();
    let settings = Settings {
        listen: ([127, 0, 0, 1], 0).into(),
        metrics_listen: None,
        store: dir.join("unused.redb"),
        agent_timeout,
        archive_scan: Duration::from_secs(60),
        tls: tls.clone(),
        retry: crate::config::RetryConfig::default(),
        agents: agents.clone(),
        operators: Default::default(),
        schedules: Vec::new(),
        maintenance: None,
        retention: Default::default(),
        copies: Default::default(),
        copy_to: Default::default(),
        self_backup: None,
        notify: Vec::new(),
        set_deadlines: Default::default(),
    };
    let (shutdown, tasks) = (CancellationToken::new(), TaskTracker::new());
    Arc::new(Coordinator {
        settings,
        store: Arc::new(crate::store::MemoryStore::new()),
        agents: AgentPool::new(agents, tls, agent_timeout, shutdown.clone(), tasks.clone()),
        shutdown,
        tasks,
        counters: crate::metrics::Counters::default(),
        copier: Default::default(),
        archives: Default::default(),
        notifier: Default::default(),
        self_backups: Default::default(),
    })
}
