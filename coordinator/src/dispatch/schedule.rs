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
                    let mut e = crate::notify::Event::new(
                        crate::notify::EventKind::ScheduleMissed,
                        format!(
                            "the {} schedule of {}{} ({:?}, UTC) missed {n} run(s) while the \
                             coordinator was down, the last at {occurrence}; running once now",
                            schedule.kind,
                            schedule.agent,
                            schedule
                                .datastore
                                .as_deref()
                                .map(|d| format!("/{d}"))
                                .unwrap_or_default(),
                            schedule.cron_text
                        ),
                    );
                    self.about(&mut e, &schedule.agent, schedule.datastore.as_deref());
                    self.notifier.notify(e);
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

    /// For a drill at a random instant (`point_in_time = "random"`) of `agent`'s restore
    /// at `occurrence`: an instant picked uniformly between the occurrence less 24 hours
    /// (or the oldest physical base backup of the source environment in the catalog, if
    /// later) and the occurrence (or, if earlier, [`DRILL_ARCHIVE_MARGIN_MS`] before the
    /// newest archived WAL push of the environment the coordinator scanned), UTC ms.
    ///
    /// The margin: PostgreSQL recovers to an instant only when the archive holds a commit
    /// after it, and the newest segment's last commit precedes its push. A cluster idle for
    /// longer than that around the instant picked fails the drill, saying so.
    async fn drill_instant(&self, agent: &str, occurrence: i64) -> i64 {
        let day = 24 * 3600 * 1000;
        let source = self
            .agents
            .state(agent)
            .described
            .map(|d| d.source_environment)
            .unwrap_or_default();
        let oldest_base = self
            .backups(Some(&source))
            .await
            .unwrap_or_default()
            .iter()
            .filter(|b| b.stored_path.ends_with(".tar.zst.age"))
            .map(|b| b.finished_ms)
            .min();
        let newest_wal = self
            .archive_status()
            .iter()
            .filter(|a| a.environment == source)
            .map(|a| a.pushed_ms - DRILL_ARCHIVE_MARGIN_MS)
            .min();
        pick_instant(occurrence, day, oldest_base, newest_wal)
    }

    /// Triggers `schedule`'s run for `occurrence`.
    async fn fire(
        self: &Arc<Self>,
        schedule: &crate::config::Schedule,
        key: &str,
        occurrence: chrono::DateTime<chrono::Utc>,
    ) {
        let to_time_ms = if schedule.random_point_in_time {
            Some(
                self.drill_instant(&schedule.agent, occurrence.timestamp_millis())
                    .await,
            )
        } else {
            None
        };
        let triggered = self
            .trigger(
                schedule.kind,
                &schedule.agent,
                schedule.datastore.as_deref(),
                &Selection {
                    backup_type: schedule.backup_type.as_deref(),
                    occurrence: Some((key, occurrence.timestamp_millis())),
                    to_time_ms,
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

/// How far before the newest archived WAL push a drill's random instant stays, ms.
pub const DRILL_ARCHIVE_MARGIN_MS: i64 = 10_000;

/// An instant picked uniformly in `[max(occurrence - window, oldest_base), min(occurrence,
/// newest_wal)]` (UTC ms); the upper end when that range is empty.
fn pick_instant(
    occurrence: i64,
    window: i64,
    oldest_base: Option<i64>,
    newest_wal: Option<i64>,
) -> i64 {
    let low = (occurrence - window).max(oldest_base.unwrap_or(i64::MIN));
    let high = occurrence.min(newest_wal.unwrap_or(i64::MAX));
    if low >= high {
        return high;
    }
    rand::random_range(low..=high)
}

#[cfg(test)]
mod drill_tests {
    use super::pick_instant;

    #[test]
    fn a_drill_instant_lies_within_the_day_the_base_backups_and_the_archive() {
        let (now, day) = (1_000_000_000_000i64, 86_400_000i64);
        for _ in 0..1000 {
            let t = pick_instant(now, day, None, None);
            assert!((now - day..=now).contains(&t), "{t}");
            let t = pick_instant(now, day, Some(now - 3_600_000), Some(now - 60_000));
            assert!((now - 3_600_000..=now - 60_000).contains(&t), "{t}");
        }
        // A base backup newer than the archive's end: the archive's end.
        assert_eq!(
            pick_instant(now, day, Some(now - 10), Some(now - 20)),
            now - 20
        );
    }
}
