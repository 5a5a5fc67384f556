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

use tokio_util::sync::CancellationToken;

use crate::agents::AgentPool;
use crate::config::Settings;
use crate::model::{Job, JobEventRecord};
use crate::store::Store;

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

/// What the restore of a set came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetOutcome {
    /// Every datastore restored.
    Whole,
    /// Some restored, some not.
    Partly,
    /// None restored.
    None,
}

impl SetOutcome {
    /// `restored whole`, `restored partly` or `not restored`.
    pub fn as_str(self) -> &'static str {
        match self {
            SetOutcome::Whole => "restored whole",
            SetOutcome::Partly => "restored partly",
            SetOutcome::None => "not restored",
        }
    }
}

/// What the restore of a set came to from its ended jobs, given as `(datastore, whether
/// it succeeded, its error)`, and in words: `restored: mongo, files; not restored:
/// postgres (why)` (each error cut to 300 characters).
pub fn set_outcome<'a>(
    jobs: impl IntoIterator<Item = (&'a str, bool, &'a str)>,
) -> (SetOutcome, String) {
    let mut restored: Vec<&str> = Vec::new();
    let mut not: Vec<String> = Vec::new();
    for (datastore, succeeded, error) in jobs {
        if succeeded {
            restored.push(datastore);
        } else {
            let why: String = error.chars().take(300).collect();
            not.push(format!("{datastore} ({why})"));
        }
    }
    let outcome = match (restored.is_empty(), not.is_empty()) {
        (_, true) => SetOutcome::Whole,
        (false, false) => SetOutcome::Partly,
        (true, false) => SetOutcome::None,
    };
    let mut details = format!(
        "restored: {}",
        if restored.is_empty() {
            "none".to_owned()
        } else {
            restored.join(", ")
        }
    );
    if !not.is_empty() {
        details.push_str(&format!("; not restored: {}", not.join("; ")));
    }
    (outcome, details)
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

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, DispatchError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DispatchError::Store(e.to_string()))?
        .map_err(|e| DispatchError::Store(e.to_string()))
}

impl Coordinator {
    /// Appends to the audit log ([`crate::audit`]); a store failure is logged as an error
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_restored_partly_names_what_was_restored_and_what_was_not_and_why() {
        let (o, d) = set_outcome([
            ("postgres", false, "manifest x.json does not parse"),
            ("files", true, ""),
            ("mongo", true, ""),
        ]);
        assert_eq!(o, SetOutcome::Partly);
        assert_eq!(
            d,
            "restored: files, mongo; not restored: postgres (manifest x.json does not parse)"
        );
        assert_eq!(set_outcome([("a", true, "")]).0, SetOutcome::Whole);
        let (o, d) = set_outcome([("a", false, "gone")]);
        assert_eq!(
            (o, d.as_str()),
            (SetOutcome::None, "restored: none; not restored: a (gone)")
        );
    }
}
