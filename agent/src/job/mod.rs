//! A job as the runner ([`crate::jobs`]), the gRPC service and the pipeline share it: why
//! it failed ([`JobError`]), what it reports when it ends ([`JobReport`]), and its live
//! progress ([`Progress`]: stage, byte counters, cancellation).
//!
//! It depends on the datastores' and the storage target's error types only
//! ([`crate::datastore::error`], `ferry_storage::TargetError`), so that the datastores,
//! the pipeline and the runner all import it and none of them imports another in a circle.

use std::io;

use crate::datastore::error::{DumpError, RestoreError};
use ferry_core::manifest::ManifestError;
use ferry_storage::TargetError;

pub mod progress;

pub use progress::Progress;

/// Why a job failed, with enough to tell the operator what to do.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The order is outside this agent's role.
    #[error("{0}")]
    PermissionDenied(String),
    /// The order names something that does not exist or is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// No backup to restore.
    #[error("{0}")]
    NotFound(String),
    /// The dump failed.
    #[error("dump of datastore {datastore:?} failed: {source}")]
    Dump {
        /// Datastore name.
        datastore: String,
        /// What failed.
        #[source]
        source: DumpError,
    },
    /// The dump ended without producing anything.
    #[error("dump of datastore {0:?} produced no data; nothing was stored")]
    EmptyDump(String),
    /// The storage target (the backup server) could not be used.
    #[error(transparent)]
    Transport(#[from] TargetError),
    /// A stored file does not match its manifest, or does not decrypt.
    #[error("{0}")]
    Integrity(String),
    /// A manifest is unreadable.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The restore failed.
    #[error("restore of datastore {datastore:?} failed: {source}; {target_state}")]
    Restore {
        /// Datastore name.
        datastore: String,
        /// What failed.
        #[source]
        source: RestoreError,
        /// Whether the target was left as it was, or how it was changed.
        target_state: String,
    },
    /// The stages failed (compression, encryption, local I/O).
    #[error("{stage} failed: {source}")]
    Stage {
        /// Stage name.
        stage: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Cancelled by an operator (or the coordinator).
    #[error("job cancelled")]
    Cancelled,
    /// Stopped by the agent's shutdown (SIGTERM or SIGINT); trying again once the agent
    /// is back may succeed.
    #[error(
        "the agent stopped (SIGTERM or SIGINT) while the job ran; it can run again once the agent is back"
    )]
    Stopped,
    /// A bug or a panicked thread.
    #[error("internal error: {0}")]
    Internal(String),
}

impl JobError {
    /// Whether trying the same order again may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            JobError::Transport(t) => t.retryable(),
            JobError::Dump { .. }
            | JobError::Stage { .. }
            | JobError::Internal(_)
            | JobError::Stopped => true,
            _ => false,
        }
    }
}

/// What a finished job reports.
#[derive(Clone, Debug)]
pub struct JobReport {
    /// Backups of dated archives: the fingerprints of the recipients it was encrypted to,
    /// as in its manifest; empty for other jobs.
    pub recipient_fingerprints: Vec<String>,
    /// Path of the main archive on the backup server.
    pub stored_path: String,
    /// Its size, bytes.
    pub size_bytes: u64,
    /// Its SHA-256, lower-case hex.
    pub sha256: String,
    /// Size before compression, bytes.
    pub bytes_uncompressed: u64,
    /// Environment of the backup.
    pub environment: String,
    /// `YYYY-MM-DD` of its folder.
    pub date: String,
    /// Datastore kind.
    pub kind: String,
    /// A human summary.
    pub summary: String,
    /// Restores and verifies: when the backup they read finished (UTC ms), so the
    /// coordinator can tell the age of the restored data (the recovery point). Backups of
    /// dated archives: their manifest's `finished` (UTC ms), which the catalog records.
    pub data_finished_ms: Option<i64>,
    /// Restores, verifies and checks: the storage target read ([`ferry_storage::PRIMARY`]
    /// or a copy's name); empty for backups.
    pub target: String,
}
