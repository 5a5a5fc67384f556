//! Conversions between the coordinator's domain types and `ferry.v1` messages.

use ferry_proto::v1;

use crate::model::{BackupRecord, Job, JobKind, JobResult, JobState, Progress};

impl From<JobKind> for v1::JobKind {
    fn from(k: JobKind) -> Self {
        match k {
            JobKind::Backup => v1::JobKind::Backup,
            JobKind::Restore => v1::JobKind::Restore,
            JobKind::Verify => v1::JobKind::Verify,
        }
    }
}

impl From<JobState> for v1::JobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Queued => v1::JobState::Queued,
            JobState::Running => v1::JobState::Running,
            JobState::Succeeded => v1::JobState::Succeeded,
            JobState::Failed => v1::JobState::Failed,
            JobState::Cancelled => v1::JobState::Cancelled,
        }
    }
}

impl From<&Progress> for v1::Progress {
    fn from(p: &Progress) -> Self {
        v1::Progress {
            stage: p.stage.clone(),
            bytes_read: p.bytes_read,
            bytes_written: p.bytes_written,
            rate_bytes_per_second: p.rate_bytes_per_second,
            // Only the agent's live reports say it (for the liveness rule).
            streaming: false,
        }
    }
}

impl From<&JobResult> for v1::Finished {
    fn from(r: &JobResult) -> Self {
        v1::Finished {
            stored_path: r.stored_path.clone(),
            size_bytes: r.size_bytes,
            sha256: r.sha256.clone(),
            duration_ms: r.duration_ms,
            bytes_uncompressed: r.bytes_uncompressed,
            environment: r.environment.clone(),
            date: r.date.clone(),
            kind: r.kind.clone(),
            summary: r.summary.clone(),
            data_finished_unix_ms: r.data_finished_ms.unwrap_or(0),
            target: r.target.clone(),
            recipient_fingerprints: r.recipient_fingerprints.clone(),
        }
    }
}

impl From<&Job> for v1::Job {
    fn from(j: &Job) -> Self {
        v1::Job {
            id: j.id.clone(),
            kind: v1::JobKind::from(j.kind) as i32,
            agent: j.agent.clone(),
            datastore: j.datastore.clone(),
            state: v1::JobState::from(j.state) as i32,
            attempt: j.attempt,
            created_unix_ms: j.created_ms,
            started_unix_ms: j.started_ms.unwrap_or_default(),
            finished_unix_ms: j.finished_ms.unwrap_or_default(),
            progress: j.progress.as_ref().map(Into::into),
            result: j.result.as_ref().map(Into::into),
            error: j.error.clone().unwrap_or_default(),
            trigger: j.trigger.clone(),
            date: j.date.clone().unwrap_or_default(),
            namespaces: j.namespaces.clone(),
            scheduled_unix_ms: j.scheduled_ms.unwrap_or_default(),
            file: j.file.clone().unwrap_or_default(),
            set_environment: j.set_environment.clone().unwrap_or_default(),
            all_or_nothing: j.all_or_nothing,
            to_time_unix_ms: j.to_time_ms.unwrap_or_default(),
        }
    }
}

impl From<&BackupRecord> for v1::BackupRecord {
    fn from(b: &BackupRecord) -> Self {
        v1::BackupRecord {
            environment: b.environment.clone(),
            date: b.date.clone(),
            datastore: b.datastore.clone(),
            kind: b.kind.clone(),
            agent: b.agent.clone(),
            stored_path: b.stored_path.clone(),
            size_bytes: b.size_bytes,
            sha256: b.sha256.clone(),
            finished_unix_ms: b.finished_ms,
            job_id: b.job_id.clone(),
            bytes_uncompressed: b.bytes_uncompressed,
            missing_found_unix_ms: b.missing.as_ref().map_or(0, |m| m.found_ms),
            missing_job_id: b
                .missing
                .as_ref()
                .map(|m| m.job_id.clone())
                .unwrap_or_default(),
            missing_error: b
                .missing
                .as_ref()
                .map(|m| m.error.clone())
                .unwrap_or_default(),
            retain_until_unix_ms: b.retain_until_ms.unwrap_or(0),
            lock_error: b.lock_error.clone().unwrap_or_default(),
            recipient_fingerprints: b.recipients.clone(),
            copies: b
                .copies
                .iter()
                .map(|c| v1::BackupCopy {
                    target: c.target.clone(),
                    copied_unix_ms: c.copied_ms,
                })
                .collect(),
        }
    }
}

impl From<&crate::catalog::sets::BackupSet> for v1::BackupSet {
    fn from(s: &crate::catalog::sets::BackupSet) -> Self {
        v1::BackupSet {
            environment: s.environment.clone(),
            date: s.date.clone(),
            complete: s.complete(),
            size_bytes: s.size_bytes(),
            members: s
                .members
                .iter()
                .map(|m| v1::SetMember {
                    agent: m.agent.clone(),
                    datastore: m.datastore.clone(),
                    present: m.backup.is_some(),
                    size_bytes: m.backup.as_ref().map_or(0, |b| b.size_bytes),
                    stored_path: m
                        .backup
                        .as_ref()
                        .map(|b| b.stored_path.clone())
                        .unwrap_or_default(),
                    finished_unix_ms: m.backup.as_ref().map_or(0, |b| b.finished_ms),
                })
                .collect(),
        }
    }
}

impl From<crate::catalog::prune::Outcome> for v1::PruneResponse {
    fn from(outcome: crate::catalog::prune::Outcome) -> Self {
        v1::PruneResponse {
            decisions: outcome
                .decisions
                .into_iter()
                .map(|d| v1::PruneDecision {
                    environment: d.environment,
                    date: d.date,
                    keep: d.keep,
                    backups: d.backups,
                    size_bytes: d.size_bytes,
                    removed: d.removed,
                    retain_until_unix_ms: d.retain_until.map_or(0, |t| t.timestamp_millis()),
                    leftovers: d
                        .leftovers
                        .into_iter()
                        .map(|l| v1::PruneLeftover {
                            path: l.path,
                            kind: l.kind.into(),
                            size_bytes: l.size_bytes,
                            remove: l.remove,
                            reason: l.reason,
                            removed: l.removed,
                        })
                        .collect(),
                })
                .collect(),
            leftovers_checked: outcome.leftovers_checked,
            wal: outcome
                .wal
                .into_iter()
                .map(|w| v1::PruneWal {
                    environment: w.environment,
                    datastore: w.datastore,
                    keep_from: w.keep_from.unwrap_or_default(),
                    going: w.going.len() as u32,
                    first_going: w
                        .going
                        .first()
                        .map(|f| f.name().to_owned())
                        .unwrap_or_default(),
                    last_going: w
                        .going
                        .last()
                        .map(|f| f.name().to_owned())
                        .unwrap_or_default(),
                    removed_bytes: w.removed_bytes,
                    removed: w.removed,
                    note: w.note,
                    kind: w.kind.to_owned(),
                })
                .collect(),
        }
    }
}
