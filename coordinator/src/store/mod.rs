//! The coordinator's persistent store: the [`Store`] trait (jobs, their events, the
//! catalog, the audit log, schedule marks) and its implementation on redb ([`RedbStore`]).
//! Stores are synchronous: async callers go through `spawn_blocking`.
//!
//! Implementations:
//! - [`RedbStore`]: the file the coordinator keeps (its tables are listed there).
//! - [`MemoryStore`]: in memory, for unit tests.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::model::{BackupRecord, Job, JobEventRecord, JobKind};
use ferry_core::audit::AuditEntry;

mod memory;
mod redb;

pub use self::memory::MemoryStore;
pub use self::redb::RedbStore;

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb failed (I/O, corruption, a transaction).
    #[error("store {path}: {op}: {source}")]
    Redb {
        /// The store file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// redb's error (boxed: it is large).
        #[source]
        source: Box<::redb::Error>,
    },
    /// A stored value does not decode.
    #[error("store {path}: value of {key:?} does not decode: {source}")]
    Decode {
        /// The store file.
        path: PathBuf,
        /// The key.
        key: String,
        /// serde's error.
        #[source]
        source: serde_json::Error,
    },
    /// The blocking task running a store operation did not finish: it panicked, or the
    /// runtime is shutting down ([`blocking`]).
    #[error("store operation did not finish: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// What this store cannot do.
    #[error("this store does not support {0}")]
    Unsupported(&'static str),
}

/// Runs `f`, a synchronous store operation, on tokio's blocking threads.
///
/// # Errors
/// What `f` returns, or [`StoreError::Task`] if it did not finish.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await?
}

/// The newest job and the newest succeeded job of one agent's datastore, overall and per
/// kind.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LatestJobs {
    /// The newest job, any state, any kind.
    pub last: Option<Job>,
    /// The newest succeeded job, any kind.
    pub last_success: Option<Job>,
    /// Per kind that ever finished: its newest outcome and newest success. A verify
    /// leaves the restore entry as it was: a drill's result stays until the next drill.
    pub by_kind: BTreeMap<JobKind, KindJobs>,
}

/// The newest outcomes of one kind of job on one datastore.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KindJobs {
    /// The newest job of this kind that succeeded or failed (a cancelled one is no
    /// outcome; one queued or running has none yet).
    pub last_outcome: Option<Job>,
    /// The newest job of this kind that succeeded.
    pub last_success: Option<Job>,
}

/// How much a store holds (what a self-backup reports).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreCounts {
    /// Jobs.
    pub jobs: u64,
    /// Catalog records.
    pub backups: u64,
    /// Audit log entries.
    pub audit: u64,
}

/// What the coordinator persists. Implementations are synchronous.
pub trait Store: Send + Sync + 'static {
    /// Inserts or replaces a job by id, keeping the indexes in the same transaction.
    ///
    /// # Errors
    /// [`StoreError`].
    fn put_job(&self, job: &Job) -> Result<(), StoreError>;
    /// One job.
    ///
    /// # Errors
    /// [`StoreError`].
    fn get_job(&self, id: &str) -> Result<Option<Job>, StoreError>;
    /// At most `limit` jobs, newest first.
    ///
    /// # Errors
    /// [`StoreError`].
    fn list_jobs(&self, limit: usize) -> Result<Vec<Job>, StoreError>;
    /// Jobs queued or running.
    ///
    /// # Errors
    /// [`StoreError`].
    fn unfinished_jobs(&self) -> Result<Vec<Job>, StoreError>;
    /// Appends an event to a job's history.
    ///
    /// # Errors
    /// [`StoreError`].
    fn append_event(&self, event: &JobEventRecord) -> Result<(), StoreError>;
    /// A job's events in the order they were appended.
    ///
    /// # Errors
    /// [`StoreError`].
    fn job_events(&self, job_id: &str) -> Result<Vec<JobEventRecord>, StoreError>;
    /// Records a stored backup in the catalog.
    ///
    /// # Errors
    /// [`StoreError`].
    fn put_backup(&self, record: &BackupRecord) -> Result<(), StoreError>;
    /// The catalog, newest first, optionally of one environment.
    ///
    /// # Errors
    /// [`StoreError`].
    fn list_backups(&self, environment: Option<&str>) -> Result<Vec<BackupRecord>, StoreError>;
    /// The newest and newest succeeded jobs of `agent`'s `datastore`.
    ///
    /// # Errors
    /// [`StoreError`].
    fn latest_jobs(&self, agent: &str, datastore: &str) -> Result<LatestJobs, StoreError>;
    /// Removes every catalog record of `environment` dated `date` (its folder was
    /// pruned); returns how many.
    ///
    /// # Errors
    /// [`StoreError`].
    fn delete_backups(&self, environment: &str, date: &str) -> Result<usize, StoreError>;
    /// Appends an audit entry after the newest one, in one transaction (so two appends
    /// never chain to the same predecessor); returns it.
    ///
    /// # Errors
    /// [`StoreError`].
    fn append_audit(
        &self,
        who: &str,
        action: &str,
        target: &str,
        outcome: &str,
    ) -> Result<AuditEntry, StoreError>;
    /// The audit log, oldest first; the newest `limit` entries if given.
    ///
    /// # Errors
    /// [`StoreError`].
    fn list_audit(&self, limit: Option<usize>) -> Result<Vec<AuditEntry>, StoreError>;
    /// The last occurrence (UTC ms) schedule `key` ran for, if it ever ran.
    ///
    /// # Errors
    /// [`StoreError`].
    fn schedule_mark(&self, key: &str) -> Result<Option<i64>, StoreError>;
    /// Stores new `jobs` with their first `events`, in one transaction (one commit for a
    /// trigger of 1,000 datastores, not 2,000). With `claim = Some((key, occurrence_ms))`
    /// it also records that schedule `key` ran for that occurrence, and returns `false`
    /// storing nothing if it already ran for it or a later one: so a scheduled run is
    /// never doubled, and never marked done without its jobs (a crash in between loses
    /// neither).
    ///
    /// # Errors
    /// [`StoreError`].
    fn queue_jobs(
        &self,
        jobs: &[Job],
        events: &[JobEventRecord],
        claim: Option<(&str, i64)>,
    ) -> Result<bool, StoreError>;
    /// Writes a consistent copy of the whole store to a new file at `dest` (the
    /// coordinator's self-backup); what it holds.
    ///
    /// # Errors
    /// [`StoreError`]; [`StoreError::Unsupported`] for a store that keeps no file (the
    /// default).
    fn snapshot_to(&self, dest: &std::path::Path) -> Result<StoreCounts, StoreError> {
        let _ = dest;
        Err(StoreError::Unsupported(
            "a snapshot of a store kept in memory",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobState, test_job};

    fn job(n: u64, kind: JobKind, state: JobState) -> Job {
        Job {
            kind,
            ..test_job(n, "a", state)
        }
    }

    fn record(environment: &str, date: &str, finished_ms: i64) -> BackupRecord {
        BackupRecord {
            environment: environment.into(),
            date: date.into(),
            datastore: "postgres".into(),
            kind: "postgres".into(),
            agent: "a".into(),
            stored_path: format!("/b/{environment}/{date}/{finished_ms}.age"),
            size_bytes: 1,
            bytes_uncompressed: 2,
            sha256: "00".into(),
            finished_ms,
            job_id: format!("j{finished_ms}"),
            missing: None,
            retain_until_ms: None,
            lock_error: None,
            copies: Vec::new(),
            recipients: Vec::new(),
        }
    }

    /// What every store does, whatever keeps it.
    fn behaves_as_a_store(s: &dyn Store) {
        use JobKind::{Restore, Verify};
        use JobState::{Failed, Running, Succeeded};
        // Jobs: newest first, the unfinished ones, replaced by id.
        let jobs = [
            job(1, Restore, Failed),
            job(2, Restore, Succeeded),
            job(3, Verify, Succeeded),
            job(4, Restore, Running),
        ];
        for j in &jobs {
            s.put_job(j).unwrap();
        }
        let ids = |v: Vec<Job>| v.into_iter().map(|j| j.id).collect::<Vec<_>>();
        assert_eq!(
            ids(s.list_jobs(2).unwrap()),
            [jobs[3].id.clone(), jobs[2].id.clone()]
        );
        assert_eq!(ids(s.unfinished_jobs().unwrap()), [jobs[3].id.clone()]);
        assert_eq!(s.get_job(&jobs[0].id).unwrap().as_ref(), Some(&jobs[0]));
        // The newest per kind: a running restore has no outcome yet, a verify leaves the
        // restore's.
        let l = s.latest_jobs("a", "postgres").unwrap();
        assert_eq!(l.last.as_ref(), Some(&jobs[3]));
        assert_eq!(l.last_success.as_ref(), Some(&jobs[2]));
        assert_eq!(l.by_kind[&Restore].last_outcome.as_ref(), Some(&jobs[1]));
        assert_eq!(l.by_kind[&Verify].last_success.as_ref(), Some(&jobs[2]));
        assert!(!l.by_kind.contains_key(&JobKind::Backup));
        let failed = job(4, Restore, Failed);
        s.put_job(&failed).unwrap();
        let l = s.latest_jobs("a", "postgres").unwrap();
        assert_eq!(l.by_kind[&Restore].last_outcome.as_ref(), Some(&failed));
        assert_eq!(l.by_kind[&Restore].last_success.as_ref(), Some(&jobs[1]));
        assert!(s.unfinished_jobs().unwrap().is_empty());
        assert_eq!(
            s.latest_jobs("nobody", "postgres").unwrap(),
            LatestJobs::default()
        );

        // Events in the order appended.
        for m in ["queued", "accepted"] {
            s.append_event(&JobEventRecord {
                job_id: jobs[0].id.clone(),
                at_ms: 1,
                message: m.into(),
            })
            .unwrap();
        }
        let events: Vec<_> = s
            .job_events(&jobs[0].id)
            .unwrap()
            .into_iter()
            .map(|e| e.message)
            .collect();
        assert_eq!(events, ["queued", "accepted"]);

        // The catalog: newest first, by environment; a record put again is replaced.
        for r in [
            record("production", "2026-11-24", 1),
            record("production", "2026-11-25", 3),
            record("staging", "2026-11-25", 2),
        ] {
            s.put_backup(&r).unwrap();
        }
        let mut missing = record("production", "2026-11-25", 3);
        missing.missing = Some(crate::model::MissingNote {
            found_ms: 9,
            job_id: "v".into(),
            error: "gone".into(),
        });
        s.put_backup(&missing).unwrap();
        let all = s.list_backups(None).unwrap();
        assert_eq!(
            all.iter().map(|r| r.finished_ms).collect::<Vec<_>>(),
            [3, 2, 1]
        );
        assert_eq!(all[0], missing);
        assert_eq!(s.list_backups(Some("staging")).unwrap().len(), 1);
        assert_eq!(s.delete_backups("production", "2026-11-25").unwrap(), 1);
        assert_eq!(s.list_backups(Some("production")).unwrap().len(), 1);

        // The audit log: oldest first, the newest `limit`, chained.
        for who in ["alice", "bob", "carol"] {
            s.append_audit(who, "trigger backup", "a/*", "ok").unwrap();
        }
        let log = s.list_audit(None).unwrap();
        assert_eq!(ferry_core::audit::verify(&log), Ok(3));
        let newest: Vec<_> = s
            .list_audit(Some(2))
            .unwrap()
            .into_iter()
            .map(|e| e.who)
            .collect();
        assert_eq!(newest, ["bob", "carol"]);

        // A schedule's run is claimed once, with its jobs, or not at all.
        let run = job(10, JobKind::Backup, JobState::Queued);
        assert_eq!(s.schedule_mark("k").unwrap(), None);
        assert!(
            s.queue_jobs(std::slice::from_ref(&run), &[], Some(("k", 100)))
                .unwrap()
        );
        let again = job(11, JobKind::Backup, JobState::Queued);
        assert!(
            !s.queue_jobs(std::slice::from_ref(&again), &[], Some(("k", 100)))
                .unwrap()
        );
        assert_eq!(s.get_job(&again.id).unwrap(), None);
        assert_eq!(s.schedule_mark("k").unwrap(), Some(100));
        assert!(
            s.queue_jobs(std::slice::from_ref(&again), &[], Some(("k", 160)))
                .unwrap()
        );
        assert_eq!(s.get_job(&run.id).unwrap(), Some(run));
    }

    #[test]
    fn the_redb_and_the_memory_store_behave_alike() {
        let dir = tempfile::tempdir().unwrap();
        behaves_as_a_store(&RedbStore::open(&dir.path().join("c.redb")).unwrap());
        behaves_as_a_store(&MemoryStore::new());
    }
}
