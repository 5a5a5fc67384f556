//! [`MemoryStore`]: the [`Store`] in memory, for unit tests of what the coordinator does
//! with its store (nothing is written to disk; everything is lost with it).

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{KindJobs, LatestJobs, Store, StoreError};
use crate::model::{BackupRecord, Job, JobEventRecord, JobState};
use ferry_core::audit::AuditEntry;

/// A [`Store`] held in memory. It keeps the same orders and rules as [`super::RedbStore`]
/// (jobs by id, the catalog newest first, a schedule's run claimed once, the audit log
/// hash-chained), and never fails.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// By id (ULID: creation order).
    jobs: BTreeMap<String, Job>,
    /// By job id, in the order appended.
    events: BTreeMap<String, Vec<JobEventRecord>>,
    /// By (finished ms, job id): age order, as the redb store's keys.
    backups: BTreeMap<(i64, String), BackupRecord>,
    /// Oldest first.
    audit: Vec<AuditEntry>,
    /// Schedule key → the last occurrence it ran for, UTC ms.
    schedule_runs: BTreeMap<String, i64>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A test that panicked while holding the lock leaves the data as it was.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The newest of `jobs` (by id) that `keep` selects.
fn newest<'a>(jobs: impl Iterator<Item = &'a Job>, keep: impl Fn(&Job) -> bool) -> Option<Job> {
    jobs.filter(|j| keep(j))
        .max_by(|a, b| a.id.cmp(&b.id))
        .cloned()
}

impl Store for MemoryStore {
    fn put_job(&self, job: &Job) -> Result<(), StoreError> {
        self.inner().jobs.insert(job.id.clone(), job.clone());
        Ok(())
    }

    fn get_job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        Ok(self.inner().jobs.get(id).cloned())
    }

    fn list_jobs(&self, limit: usize) -> Result<Vec<Job>, StoreError> {
        Ok(self
            .inner()
            .jobs
            .values()
            .rev()
            .take(limit)
            .cloned()
            .collect())
    }

    fn unfinished_jobs(&self) -> Result<Vec<Job>, StoreError> {
        Ok(self
            .inner()
            .jobs
            .values()
            .filter(|j| !j.state.is_final())
            .cloned()
            .collect())
    }

    fn append_event(&self, event: &JobEventRecord) -> Result<(), StoreError> {
        self.inner()
            .events
            .entry(event.job_id.clone())
            .or_default()
            .push(event.clone());
        Ok(())
    }

    fn job_events(&self, job_id: &str) -> Result<Vec<JobEventRecord>, StoreError> {
        Ok(self.inner().events.get(job_id).cloned().unwrap_or_default())
    }

    fn put_backup(&self, record: &BackupRecord) -> Result<(), StoreError> {
        let key = (record.finished_ms.max(0), record.job_id.clone());
        self.inner().backups.insert(key, record.clone());
        Ok(())
    }

    fn list_backups(&self, environment: Option<&str>) -> Result<Vec<BackupRecord>, StoreError> {
        Ok(self
            .inner()
            .backups
            .values()
            .rev()
            .filter(|r| environment.is_none_or(|e| e == r.environment))
            .cloned()
            .collect())
    }

    fn latest_jobs(&self, agent: &str, datastore: &str) -> Result<LatestJobs, StoreError> {
        let inner = self.inner();
        let of = || {
            inner
                .jobs
                .values()
                .filter(|j| j.agent == agent && j.datastore == datastore)
        };
        let ended = |j: &Job| matches!(j.state, JobState::Succeeded | JobState::Failed);
        let succeeded = |j: &Job| j.state == JobState::Succeeded;
        let mut by_kind = BTreeMap::new();
        for kind in of().filter(|j| ended(j)).map(|j| j.kind) {
            by_kind.entry(kind).or_insert_with(|| KindJobs {
                last_outcome: newest(of(), |j| j.kind == kind && ended(j)),
                last_success: newest(of(), |j| j.kind == kind && succeeded(j)),
            });
        }
        Ok(LatestJobs {
            last: newest(of(), |_| true),
            last_success: newest(of(), succeeded),
            by_kind,
        })
    }

    fn delete_backups(&self, environment: &str, date: &str) -> Result<usize, StoreError> {
        let backups = &mut self.inner().backups;
        let before = backups.len();
        backups.retain(|_, r| !(r.environment == environment && r.date == date));
        Ok(before - backups.len())
    }

    fn append_audit(
        &self,
        who: &str,
        action: &str,
        target: &str,
        outcome: &str,
    ) -> Result<AuditEntry, StoreError> {
        let mut inner = self.inner();
        let entry = AuditEntry::next(
            inner.audit.last(),
            ferry_proto::now_unix_ms(),
            who,
            action,
            target,
            outcome,
        );
        inner.audit.push(entry.clone());
        Ok(entry)
    }

    fn list_audit(&self, limit: Option<usize>) -> Result<Vec<AuditEntry>, StoreError> {
        let inner = self.inner();
        let skip = inner
            .audit
            .len()
            .saturating_sub(limit.unwrap_or(usize::MAX));
        Ok(inner.audit[skip..].to_vec())
    }

    fn schedule_mark(&self, key: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.inner().schedule_runs.get(key).copied())
    }

    fn queue_jobs(
        &self,
        jobs: &[Job],
        events: &[JobEventRecord],
        claim: Option<(&str, i64)>,
    ) -> Result<bool, StoreError> {
        let mut inner = self.inner();
        if let Some((key, occurrence_ms)) = claim {
            if inner
                .schedule_runs
                .get(key)
                .is_some_and(|last| *last >= occurrence_ms)
            {
                return Ok(false);
            }
            inner.schedule_runs.insert(key.to_owned(), occurrence_ms);
        }
        for job in jobs {
            inner.jobs.insert(job.id.clone(), job.clone());
        }
        for event in events {
            inner
                .events
                .entry(event.job_id.clone())
                .or_default()
                .push(event.clone());
        }
        Ok(true)
    }
}
