//! The leftovers of interrupted restores as the agent's jobs see them: looked for and put
//! right on the agent's start and before each restore ([`Datastore::recover_leftovers`]),
//! logged, and told in the report of the datastore's next restore.

use std::collections::BTreeMap;

use super::Datastore;
use super::common::leftovers;
use crate::job::{JobError, JobReport};

/// What [`recover`](#method.recover) found of a datastore's interrupted restores and did with it.
#[derive(Clone, Debug, Default)]
pub struct Recovery {
    /// Put right at the agent's start and not yet told in a job's report.
    pub at_start: Vec<leftovers::Recovered>,
    /// Put right now, before this restore.
    pub now: Vec<leftovers::Recovered>,
    /// Why the leftovers could not be looked for, if they could not.
    pub error: Option<String>,
}

/// Recoveries done at the agent's start, by datastore name, until a restore of the
/// datastore reports them ([`recover`](#method.recover)).
static AT_START: std::sync::Mutex<BTreeMap<String, Vec<leftovers::Recovered>>> =
    std::sync::Mutex::new(BTreeMap::new());

impl Recovery {
    /// Whether nothing was found and nothing failed.
    pub fn is_empty(&self) -> bool {
        self.at_start.is_empty() && self.now.is_empty() && self.error.is_none()
    }

    /// A sentence for a job's report, `None` if there is nothing to tell: `leftovers of
    /// interrupted restores: at the agent's start, removed ... (job ...); before this
    /// restore, ...`.
    pub fn summary(&self) -> Option<String> {
        if self.is_empty() {
            return None;
        }
        let list = |v: &[leftovers::Recovered]| {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = Vec::new();
        if !self.at_start.is_empty() {
            parts.push(format!("at the agent's start, {}", list(&self.at_start)));
        }
        if !self.now.is_empty() {
            parts.push(format!("before this restore, {}", list(&self.now)));
        }
        if let Some(e) = &self.error {
            parts.push(format!("they could not be looked for: {e}"));
        }
        Some(format!(
            "leftovers of interrupted restores: {}",
            parts.join("; ")
        ))
    }

    /// Adds [`Recovery::summary`] to a restore's outcome: to the report's summary, or to
    /// the error's text where it has one (a transport error is left as it is; the
    /// recovery is in the agent's log).
    pub fn annotate(&self, result: Result<JobReport, JobError>) -> Result<JobReport, JobError> {
        let Some(note) = self.summary() else {
            return result;
        };
        match result {
            Ok(mut report) => {
                report.summary = format!("{}; {note}", report.summary);
                Ok(report)
            }
            Err(JobError::Restore {
                datastore,
                source,
                target_state,
            }) => Err(JobError::Restore {
                datastore,
                source,
                target_state: format!("{target_state}; {note}"),
            }),
            Err(JobError::Integrity(t)) => Err(JobError::Integrity(format!("{t}; {note}"))),
            Err(JobError::NotFound(t)) => Err(JobError::NotFound(format!("{t}; {note}"))),
            Err(JobError::InvalidArgument(t)) => {
                Err(JobError::InvalidArgument(format!("{t}; {note}")))
            }
            Err(JobError::Internal(t)) => Err(JobError::Internal(format!("{t}; {note}"))),
            Err(JobError::Stage { stage, source }) => Err(JobError::Stage {
                stage,
                source: std::io::Error::new(source.kind(), format!("{source}; {note}")),
            }),
            Err(e) => Err(e),
        }
    }
}

impl dyn Datastore + '_ {
    /// Staging: puts right the leftovers of this datastore's interrupted restores
    /// ([`Datastore::recover_leftovers`]) and logs each (event `Leftover
    /// of an interrupted restore`, fields `datastore`, `job_id`, `leftover`, `action`).
    /// `skip`: the jobs running in this agent, whose leftovers are never touched. Call it
    /// only while this datastore runs no job. The returned [`Recovery`] also carries what
    /// [`recover_at_start`](#method.recover_at_start) did and no job has reported yet.
    pub async fn recover(&self, skip: &[String]) -> Recovery {
        let found = self.recover_leftovers(skip).await;
        let at_start = AT_START
            .lock()
            .expect("recovery lock")
            .remove(self.name())
            .unwrap_or_default();
        let (now, error) = match found {
            Ok(v) => (v, None),
            Err(e) => {
                tracing::warn!(datastore = %self.name(), error = %e, error_type = "recovery_failed",
                    "Cannot look for the leftovers of interrupted restores.");
                (Vec::new(), Some(e.to_string()))
            }
        };
        for r in &now {
            log_recovered(self.name(), r);
        }
        Recovery {
            at_start,
            now,
            error,
        }
    }

    /// [`recover`](#method.recover) at the agent's start (no job runs): what it did is logged,
    /// and kept for the report of this datastore's next restore.
    pub async fn recover_at_start(&self) -> Recovery {
        let mut recovery = self.recover(&[]).await;
        recovery.at_start.append(&mut recovery.now);
        if !recovery.at_start.is_empty() {
            AT_START
                .lock()
                .expect("recovery lock")
                .entry(self.name().to_owned())
                .or_default()
                .extend(recovery.at_start.iter().cloned());
        }
        recovery
    }
}

fn log_recovered(datastore: &str, r: &leftovers::Recovered) {
    match &r.action {
        leftovers::Action::Kept { why } => tracing::warn!(%datastore, job_id = %r.job_id,
            leftover = %r.leftover, action = %r.action_name(), %why,
            "Leftover of an interrupted restore kept; it needs an operator."),
        _ => tracing::info!(%datastore, job_id = %r.job_id, leftover = %r.leftover,
            action = %r.action_name(), "Leftover of an interrupted restore put right: {r}."),
    }
}
