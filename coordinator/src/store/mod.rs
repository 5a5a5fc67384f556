//! The coordinator's persistent store: the [`Store`] trait (jobs, their events, the
//! catalog, the audit log, schedule marks) and its implementation on redb ([`RedbStore`]).
//! Stores are synchronous: async callers go through `spawn_blocking`.
//!
//! Modules:
//! - `redb`: [`RedbStore`], the file the coordinator keeps (its tables are listed there).

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::audit::AuditEntry;
use crate::model::{BackupRecord, Job, JobEventRecord, JobKind};

mod redb;

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
}
