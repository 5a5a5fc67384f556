//! Object Lock by retention tier, on a storage target with locks (an S3 target with
//! `lock`; [`ferry_storage::Target::object_lock`]).
//!
//! Every object of a dated folder (its backups' data parts and manifests) is locked until
//! the folder's *horizon*, UTC midnight at the start of a day:
//! - when a backup finishes, its date + `keep_daily` days of its environment's policy
//!   ([`Coordinator::lock_finished_backup`], retried; a lock that could not be set is
//!   marked on the catalog record, shown by `ferry backups`, and set by the next prune);
//! - at prune time, for every date the policy keeps, the horizon of its longest tier:
//!   daily date + `keep_daily` days, weekly date + `keep_weekly` weeks, monthly date +
//!   `keep_monthly` months ([`horizon`]); a lock is only ever extended, never shortened.
//!
//! Both use the coordinator's `[maintenance]` target (the credentials that may
//! `PutObjectRetention`): Ceph 16's RGW ignores lock headers on `CreateMultipartUpload`,
//! and production may not set retention. A horizon already past sets nothing (the lock
//! it would have been has expired).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Days, Months, NaiveDate, Utc};
use ferry_storage::{MaintainSession, Target, TargetError};

use crate::catalog::retention::Policy;
use crate::dispatch::Coordinator;
use crate::model::BackupRecord;
use crate::store::blocking;

/// UTC midnight at the start of `date` + `keep_daily` days: how long a new backup of
/// `date` is locked.
pub fn daily_horizon(date: NaiveDate, policy: &Policy) -> DateTime<Utc> {
    midnight(date.checked_add_days(Days::new(policy.keep_daily.into())))
}

/// The lock horizon of a dated folder the policy keeps for the reasons `keep`
/// (`newest`, `daily`, `weekly`, `monthly`, ...): the latest of its tiers' horizons (UTC
/// midnight): daily date + `keep_daily` days, weekly date + `keep_weekly` weeks, monthly
/// date + `keep_monthly` calendar months (clamped to the month's last day). A folder kept
/// for another reason (the newest, the newest complete set) gets the daily horizon.
pub fn horizon<S: AsRef<str>>(date: NaiveDate, policy: &Policy, keep: &[S]) -> DateTime<Utc> {
    let mut out = daily_horizon(date, policy);
    for reason in keep {
        let tier = match reason.as_ref() {
            "weekly" => {
                midnight(date.checked_add_days(Days::new(7 * u64::from(policy.keep_weekly))))
            }
            "monthly" => midnight(date.checked_add_months(Months::new(policy.keep_monthly))),
            _ => continue,
        };
        out = out.max(tier);
    }
    out
}

fn midnight(date: Option<NaiveDate>) -> DateTime<Utc> {
    date.unwrap_or(NaiveDate::MAX)
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc()
}

/// The objects of `environment`'s dated folder of `date` (full paths).
fn folder_objects(
    target: &dyn Target,
    session: &mut dyn MaintainSession,
    environment: &str,
    date: NaiveDate,
) -> Result<Vec<String>, TargetError> {
    let dir = target.dated_dir(environment, date);
    Ok(session
        .list(&dir)?
        .into_iter()
        .filter(|n| !n.contains('/') && !n.starts_with('.'))
        .map(|n| format!("{dir}/{n}"))
        .collect())
}

/// Extends the lock of every object of `environment`'s dated folder of `date` to
/// `until` (never shortening one); the number of objects it holds. Nothing is set when
/// `until` is past.
///
/// # Errors
/// [`TargetError`] of the listing or of an object's lock.
pub fn lock_folder(
    target: &dyn Target,
    environment: &str,
    date: NaiveDate,
    until: DateTime<Utc>,
) -> Result<u32, TargetError> {
    let mut session = target.maintain()?;
    let objects = folder_objects(target, &mut *session, environment, date)?;
    if until <= Utc::now() {
        return Ok(objects.len() as u32);
    }
    for path in &objects {
        match session.extend_lock(path, until) {
            Ok(()) | Err(TargetError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(objects.len() as u32)
}

/// Until when `environment`'s dated folder of `date` stays: the latest retain-until of
/// its objects (each object's own is the earliest of its versions); `None` if none of
/// them is locked or the folder is empty.
///
/// # Errors
/// [`TargetError`] of the listing or of a retention read.
pub fn folder_retain_until(
    target: &dyn Target,
    environment: &str,
    date: NaiveDate,
) -> Result<Option<DateTime<Utc>>, TargetError> {
    let mut session = target.maintain()?;
    let mut latest: Option<DateTime<Utc>> = None;
    for path in folder_objects(target, &mut *session, environment, date)? {
        match session.retain_until(&path) {
            Ok(Some(at)) => latest = Some(latest.map_or(at, |l| l.max(at))),
            Ok(None) | Err(TargetError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(latest)
}

/// How many times a finished backup's lock is tried before it is left to prune.
const LOCK_ATTEMPTS: u32 = 5;

/// The wait before the second attempt; doubled after each failure.
const FIRST_RETRY: Duration = Duration::from_secs(2);

impl Coordinator {
    /// Locks the dated folder of the finished backup `record` until its date +
    /// `keep_daily` days, when the `[maintenance]` target has locks and its environment
    /// a retention policy. The first attempt is awaited (the record then carries the
    /// retain-until); if it fails, [`LOCK_ATTEMPTS`] more run in the background, and the
    /// last failure is noted on the catalog record (`ferry backups` shows it; the next
    /// `ferry prune` locks the folder).
    pub(crate) async fn lock_finished_backup(self: Arc<Self>, mut record: BackupRecord) {
        let Some(target) = self.settings.maintenance.clone() else {
            return;
        };
        let Some(policy) = self.settings.retention.get(&record.environment).copied() else {
            return;
        };
        if !target.object_lock() {
            return;
        }
        let Ok(date) = NaiveDate::parse_from_str(&record.date, "%Y-%m-%d") else {
            return;
        };
        let until = daily_horizon(date, &policy);
        let attempt = move |target: Arc<dyn Target>, env: String| async move {
            match tokio::task::spawn_blocking(move || lock_folder(&*target, &env, date, until))
                .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("the lock task failed: {e}")),
            }
        };
        let mut result = attempt(target.clone(), record.environment.clone()).await;
        if let Err(e) = &result {
            record.lock_error = Some(lock_note(until, e));
            self.put_record(record.clone()).await;
            let this = self.clone();
            let retry = async move {
                let mut wait = FIRST_RETRY;
                for n in 2..=LOCK_ATTEMPTS + 1 {
                    tracing::warn!(stored_path = %record.stored_path, attempt = n,
                        "Could not lock the backup's objects; retrying.");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = this.shutdown.cancelled() => return,
                    }
                    wait *= 2;
                    result = attempt(target.clone(), record.environment.clone()).await;
                    match &result {
                        Ok(()) => break,
                        Err(e) => record.lock_error = Some(lock_note(until, e)),
                    }
                }
                if result.is_ok() {
                    record.retain_until_ms = Some(until.timestamp_millis());
                    record.lock_error = None;
                } else {
                    tracing::error!(stored_path = %record.stored_path,
                        error = record.lock_error.as_deref().unwrap_or_default(),
                        "The backup's objects are not locked; the next prune tries again.");
                }
                // A prune may have locked it meanwhile: its record is not overwritten.
                let store = this.store.clone();
                let r = blocking(move || {
                    let current = store
                        .list_backups(Some(&record.environment))?
                        .into_iter()
                        .find(|r| r.job_id == record.job_id && r.stored_path == record.stored_path);
                    let newer = current
                        .and_then(|r| r.retain_until_ms)
                        .is_some_and(|u| record.retain_until_ms.is_none_or(|mine| u >= mine));
                    if newer {
                        Ok(())
                    } else {
                        store.put_backup(&record)
                    }
                })
                .await;
                if let Err(e) = r {
                    tracing::error!(error = %e, error_type = "store",
                        "Could not record the backup's lock in the catalog.");
                }
            };
            self.tasks.spawn(retry);
            return;
        }
        record.retain_until_ms = Some(until.timestamp_millis());
        record.lock_error = None;
        self.put_record(record).await;
    }

    /// Stores `record` (an update of a catalog record), logging a failure.
    async fn put_record(&self, record: BackupRecord) {
        let store = self.store.clone();
        if let Err(e) = blocking(move || store.put_backup(&record)).await {
            tracing::error!(error = %e, error_type = "store",
                "Could not record the backup's lock in the catalog.");
        }
    }
}

/// The note of a lock that could not be set.
fn lock_note(until: DateTime<Utc>, error: &str) -> String {
    format!(
        "not locked until {}: {error}; retried, and `ferry prune` locks it",
        until.format("%Y-%m-%dT%H:%M:%SZ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    const POLICY: Policy = Policy {
        keep_daily: 7,
        keep_weekly: 4,
        keep_monthly: 3,
    };

    #[test]
    fn a_new_backup_is_locked_until_midnight_of_date_plus_keep_daily() {
        assert_eq!(
            daily_horizon(day("2026-12-05"), &POLICY),
            at("2026-12-12T00:00:00Z")
        );
    }

    #[test]
    fn a_keeper_is_locked_to_its_longest_tier() {
        let d = day("2026-11-29");
        assert_eq!(horizon(d, &POLICY, &["daily"]), at("2026-12-06T00:00:00Z"));
        assert_eq!(
            horizon(d, &POLICY, &["daily", "weekly"]),
            at("2026-12-27T00:00:00Z")
        );
        // Months clamp to the last day: 2026-10-31 + 3 months is 2027-01-31; 2026-11-30 +
        // 3 months is 2027-02-28.
        assert_eq!(
            horizon(day("2026-10-31"), &POLICY, &["monthly"]),
            at("2027-01-31T00:00:00Z")
        );
        assert_eq!(
            horizon(day("2026-11-30"), &POLICY, &["weekly", "monthly"]),
            at("2027-02-28T00:00:00Z")
        );
        // The newest, kept whatever the policy: the daily horizon.
        assert_eq!(
            horizon(day("2026-12-05"), &POLICY, &["newest"]),
            at("2026-12-12T00:00:00Z")
        );
    }
}
