//! The cron schedules: each run claimed in the store with its jobs, so a restart never
//! doubles one, and runs missed while the coordinator was down caught up once.

use std::sync::Arc;

use super::trigger::Selection;
use super::{Coordinator, DispatchError};
use crate::store::blocking;

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

impl Coordinator {
    /// Runs the cron schedules until shutdown. Each run is claimed in the store with its
    /// jobs ([`crate::store::Store::queue_jobs`]), so a restart never doubles one; occurrences
    /// missed while the coordinator was down are caught up by one run at start (the
    /// newest missed occurrence), as anacron does. A schedule that never ran starts from
    /// now.
    pub async fn run_schedules(self: Arc<Self>) {
        let schedules = self.settings.schedules.clone();
        futures::future::join_all(
            schedules
                .into_iter()
                .map(|schedule| self.clone().run_schedule(schedule)),
        )
        .await;
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
        if let Err(DispatchError::ShuttingDown) = triggered {
            tracing::info!(agent = %schedule.agent, kind = %schedule.kind,
                "Scheduled run not started: the coordinator is shutting down; the next start runs it.");
        } else if let Err(e) = triggered {
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
