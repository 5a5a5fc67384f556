//! Domain types of the coordinator: jobs, their progress and results, and the catalog of
//! stored backups. These are what the [`crate::store::Store`] persists (as JSON values in
//! redb tables) and what the gRPC handlers convert to and from `ferry.v1` messages.
//! Times are UTC milliseconds since the Unix epoch; sizes are bytes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What a job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// Dump a datastore on a production agent and upload it.
    Backup,
    /// Download a backup on a staging agent and restore it.
    Restore,
    /// Download a backup on a staging agent and check it without restoring.
    Verify,
}

impl JobKind {
    /// `backup` or `restore`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Backup => "backup",
            JobKind::Restore => "restore",
            JobKind::Verify => "verify",
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a job is in its life: `queued → running → succeeded | failed | cancelled`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Created, not yet accepted by its agent (or waiting for a retry).
    Queued,
    /// Accepted by its agent, running.
    Running,
    /// Finished; its result is set.
    Succeeded,
    /// Gave up; its error is set.
    Failed,
    /// Cancelled by an operator.
    Cancelled,
}

impl JobState {
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Whether the job can no longer change.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The last progress an agent reported for a job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Pipeline stage, e.g. `dump`, `upload`, `verify`, `restore`.
    pub stage: String,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes written to the sink.
    pub bytes_written: u64,
    /// Recent rate of `bytes_read`, bytes per second.
    pub rate_bytes_per_second: f64,
}

/// What a succeeded job produced or restored.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// Path of the archive on the backup server.
    pub stored_path: String,
    /// Size of the stored archive, bytes.
    pub size_bytes: u64,
    /// Lower-case hex SHA-256 of the stored archive.
    pub sha256: String,
    /// Duration on the agent, milliseconds.
    pub duration_ms: u64,
    /// Size of the dump before compression, bytes.
    pub bytes_uncompressed: u64,
    /// Environment of the backup (the source environment, for a restore).
    pub environment: String,
    /// `YYYY-MM-DD` of the backup's dated folder.
    pub date: String,
    /// Datastore kind, e.g. `postgres`.
    pub kind: String,
    /// Human summary from the agent.
    pub summary: String,
    /// Restores and verifies: when the backup they read finished, UTC ms.
    #[serde(default)]
    pub data_finished_ms: Option<i64>,
    /// Restores, verifies and checks: the storage target the agent read (`primary` or a
    /// copy's name); empty for backups and results of older agents.
    #[serde(default)]
    pub target: String,
    /// Backups of dated archives: the fingerprints of the recipients it was encrypted to.
    #[serde(default)]
    pub recipient_fingerprints: Vec<String>,
}

impl JobResult {
    /// For a restore: the recovery time (how long the restore ran) and the recovery point
    /// (how old the restored data was at `finished_ms`: the restore's end, or the instant
    /// a restore to a point in time was asked for), milliseconds.
    pub fn rto_rpo_ms(&self, finished_ms: i64) -> Option<(u64, i64)> {
        self.data_finished_ms
            .map(|d| (self.duration_ms, (finished_ms - d).max(0)))
    }
}

/// One job, as persisted after every transition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// ULID, sortable by creation time.
    pub id: String,
    /// Backup or restore.
    pub kind: JobKind,
    /// Agent id from the inventory.
    pub agent: String,
    /// Datastore name on that agent.
    pub datastore: String,
    /// Current state.
    pub state: JobState,
    /// 1 for the first try, incremented on each retry.
    pub attempt: u32,
    /// `schedule` or `operator`.
    pub trigger: String,
    /// For restores, the requested `YYYY-MM-DD`; `None` for the newest.
    pub date: Option<String>,
    /// For restores, only these namespaces (`db.collection`); empty for all.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// For backups, `full` or `diff` (pgBackRest); `None` for the datastore's default.
    #[serde(default)]
    pub backup_type: Option<String>,
    /// For a verify of a date, the exact backup it checks (its catalog `stored_path`): such
    /// a verify makes one job per backup the catalog lists for the date. `None`: the
    /// newest backup (of the date, if given) when the job runs.
    #[serde(default)]
    pub file: Option<String>,
    /// For the restores of a whole set (every datastore of a staging agent, from one
    /// date, `date`): the set's environment. `None` otherwise.
    #[serde(default)]
    pub set_environment: Option<String>,
    /// Restored `--all-or-nothing`: no job of the set runs before every member's backup
    /// was checked, and none if one failed its check.
    #[serde(default)]
    pub all_or_nothing: bool,
    /// For a restore to a point in time (`ferry restore --to-time`): that instant, UTC
    /// ms. The job restores the newest base backup the catalog holds that finished at or
    /// before it, and the agent replays archived WAL up to it. `None` otherwise.
    #[serde(default)]
    pub to_time_ms: Option<i64>,
    /// Restores and verifies: the storage target to read (`ferry restore --from`), a copy's
    /// name or `primary`; `None`: the agent reads the primary and falls back to a copy.
    #[serde(default)]
    pub target: Option<String>,
    /// For an `--all-or-nothing` restore: when every member passed its check, UTC ms. A
    /// job without it never runs (a coordinator restarted mid-check fails it).
    #[serde(default)]
    pub checked_ms: Option<i64>,
    /// For scheduled jobs, the schedule occurrence it runs for, UTC ms (a restarted
    /// coordinator catching up a missed run gives the missed occurrence).
    #[serde(default)]
    pub scheduled_ms: Option<i64>,
    /// When the job was created, UTC ms.
    pub created_ms: i64,
    /// When its agent accepted it (the latest attempt), UTC ms.
    pub started_ms: Option<i64>,
    /// When it reached a final state, UTC ms.
    pub finished_ms: Option<i64>,
    /// Last progress reported.
    pub progress: Option<Progress>,
    /// Set when succeeded.
    pub result: Option<JobResult>,
    /// Set when failed or cancelled: what went wrong, for an operator.
    pub error: Option<String>,
}

/// One event in a job's history, appended as it happens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobEventRecord {
    /// The job.
    pub job_id: String,
    /// When, UTC ms.
    pub at_ms: i64,
    /// A short description: `queued`, `accepted by agent`, `failed: ...`, `retry 2 in 30 s`.
    pub message: String,
}

/// One stored backup in the catalog, recorded when a backup job succeeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackupRecord {
    /// Environment the backup belongs to.
    pub environment: String,
    /// `YYYY-MM-DD` of its dated folder.
    pub date: String,
    /// Datastore name.
    pub datastore: String,
    /// Datastore kind.
    pub kind: String,
    /// Agent that made it.
    pub agent: String,
    /// Path on the backup server.
    pub stored_path: String,
    /// Stored size, bytes.
    pub size_bytes: u64,
    /// Size before compression, bytes.
    pub bytes_uncompressed: u64,
    /// Lower-case hex SHA-256 of the stored file.
    pub sha256: String,
    /// When the backup finished, UTC ms.
    pub finished_ms: i64,
    /// The job that made it.
    pub job_id: String,
    /// Set when a restore or verify of this very backup found its file gone from the
    /// backup server; cleared when one reads it again.
    #[serde(default)]
    pub missing: Option<MissingNote>,
    /// On a storage target with Object Lock: until when the coordinator locked the
    /// objects of its dated folder (UTC ms); `None` while unlocked or on a target without
    /// locks.
    #[serde(default)]
    pub retain_until_ms: Option<i64>,
    /// On a storage target with Object Lock: why the last attempt to lock its objects
    /// failed; `None` once a lock is set (prune retries it).
    #[serde(default)]
    pub lock_error: Option<String>,
    /// The copy targets holding a checked copy of it ([`crate::catalog::copies`]).
    #[serde(default)]
    pub copies: Vec<CopyNote>,
    /// The fingerprints of the recipients it was encrypted to (`sha256:` + 16 hex digits,
    /// as its manifest gives them); empty when not known (recorded before Ferry kept them,
    /// or a differential repository).
    #[serde(default)]
    pub recipients: Vec<String>,
}

/// A copy of a backup on a copy target, checked against its manifest's SHA-256.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CopyNote {
    /// The copy target's name (`[copies.<name>]`).
    pub target: String,
    /// When the copy was committed, UTC ms.
    pub copied_ms: i64,
}

impl BackupRecord {
    /// Whether it is a dated archive (`.age`, read by file name) rather than a
    /// differential repository (pgBackRest, rsync mirror: recorded as its folder, restored
    /// by date).
    pub fn is_archive(&self) -> bool {
        self.stored_path
            .rsplit('/')
            .next()
            .is_some_and(|f| f.ends_with(".age"))
    }
}

/// What a restore or verify found of a catalog record whose file is not on the backup
/// server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MissingNote {
    /// When it was found missing, UTC ms.
    pub found_ms: i64,
    /// The restore or verify job that found it.
    pub job_id: String,
    /// What the agent said.
    pub error: String,
}

/// A backup job of `agent`'s datastore `postgres` in `state`, for unit tests: its id is
/// the ULID of `n` ms after 2023-11-14 22:13:20 UTC (a larger `n` is a newer job).
#[cfg(test)]
pub(crate) fn test_job(n: u64, agent: &str, state: JobState) -> Job {
    Job {
        id: ulid::Ulid::from_parts(1_700_000_000_000 + n, 0).to_string(),
        kind: JobKind::Backup,
        agent: agent.into(),
        datastore: "postgres".into(),
        state,
        attempt: 1,
        trigger: "operator".into(),
        date: None,
        namespaces: Vec::new(),
        backup_type: None,
        file: None,
        set_environment: None,
        all_or_nothing: false,
        to_time_ms: None,
        target: None,
        checked_ms: None,
        scheduled_ms: None,
        created_ms: n as i64,
        started_ms: None,
        finished_ms: None,
        progress: None,
        result: None,
        error: None,
    }
}
