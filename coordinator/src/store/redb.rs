//! [`RedbStore`]: the [`Store`] on redb (ACID, stable file format; synchronous, so async
//! callers go through `spawn_blocking`). Values are JSON of the [`crate::model`] types, so
//! a field added later reads back from older files with serde defaults.
//!
//! Tables:
//! - `jobs`: job id (ULID, so key order is creation order) → [`Job`].
//! - `unfinished`: ids of queued or running jobs (reconciled at start).
//! - `latest`: `agent\0datastore` → ids of the newest job and the newest succeeded one,
//!   and per job kind the newest that succeeded or failed and the newest that succeeded, so
//!   `ferry status` and `/metrics` are a few point lookups per datastore whatever the
//!   history size (and a verify never hides the last restore).
//! - `events`: (job id, sequence) → [`JobEventRecord`].
//! - `backups`: `<finished ms, 20 digits>\0<job id>` → [`BackupRecord`].
//! - `audit`: sequence number → [`AuditEntry`], hash-chained ([`ferry_core::audit`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_core::audit::AuditEntry;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{KindJobs, LatestJobs, Store, StoreError};
use crate::model::{BackupRecord, Job, JobEventRecord, JobKind, JobState};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const UNFINISHED: TableDefinition<&str, ()> = TableDefinition::new("unfinished");
const LATEST: TableDefinition<&str, &[u8]> = TableDefinition::new("latest");
const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");
const BACKUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("backups");
/// Schedule key (see [`crate::dispatch::schedule_key`]) → the last occurrence it ran
/// for, UTC ms.
const SCHEDULE_RUNS: TableDefinition<&str, i64> = TableDefinition::new("schedule_runs");
/// The audit log's table: its name and types are part of the file format.
pub const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

#[derive(Default, Serialize, Deserialize)]
struct LatestIds {
    last: Option<String>,
    last_success: Option<String>,
    /// Absent in stores written before it: [`RedbStore::latest_jobs`] then derives it from
    /// `last` and `last_success`.
    #[serde(default)]
    kinds: BTreeMap<JobKind, KindIds>,
}

#[derive(Default, Serialize, Deserialize)]
struct KindIds {
    last_outcome: Option<String>,
    last_success: Option<String>,
}

/// Sets `slot` to `id` unless it holds a newer id (ULIDs sort by creation).
fn newest(slot: &mut Option<String>, id: &str) {
    if slot.as_deref().is_none_or(|l| l <= id) {
        *slot = Some(id.to_owned());
    }
}

/// The redb implementation of [`Store`].
pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

fn latest_key(agent: &str, datastore: &str) -> String {
    format!("{agent}\0{datastore}")
}

impl RedbStore {
    /// Opens (or creates) the store at `path`, with every table.
    ///
    /// # Errors
    /// [`StoreError::Redb`] naming the file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Redb {
                path: path.to_owned(),
                op: "create directory",
                source: Box::new(redb::Error::Io(e)),
            })?;
        }
        let store = Self {
            db: Database::create(path).map_err(|e| StoreError::Redb {
                path: path.to_owned(),
                op: "open",
                source: Box::new(e.into()),
            })?,
            path: path.to_owned(),
        };
        store.write("create tables", |tx| {
            tx.open_table(JOBS)?;
            tx.open_table(UNFINISHED)?;
            tx.open_table(LATEST)?;
            tx.open_table(EVENTS)?;
            tx.open_table(BACKUPS)?;
            tx.open_table(AUDIT)?;
            tx.open_table(SCHEDULE_RUNS)?;
            Ok(())
        })?;
        Ok(store)
    }

    fn err(&self, op: &'static str) -> impl FnOnce(redb::Error) -> StoreError + '_ {
        move |source| StoreError::Redb {
            path: self.path.clone(),
            op,
            source: Box::new(source),
        }
    }

    fn write<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let run = || -> Result<T, redb::Error> {
            let tx = self.db.begin_write()?;
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        };
        run().map_err(self.err(op))
    }

    fn read<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let run = || -> Result<T, redb::Error> {
            let tx = self.db.begin_read()?;
            f(&tx)
        };
        run().map_err(self.err(op))
    }

    fn decode<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
        bytes: &[u8],
    ) -> Result<T, StoreError> {
        serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
            path: self.path.clone(),
            key: key.to_owned(),
            source,
        })
    }

    fn get_jobs(&self, ids: &[Option<String>]) -> Result<Vec<Option<Job>>, StoreError> {
        let raw: Vec<Option<(String, Vec<u8>)>> = self.read("read jobs", |tx| {
            let jobs = tx.open_table(JOBS)?;
            let mut out = Vec::new();
            for id in ids {
                out.push(match id {
                    Some(id) => jobs
                        .get(id.as_str())?
                        .map(|v| (id.clone(), v.value().to_vec())),
                    None => None,
                });
            }
            Ok(out)
        })?;
        raw.into_iter()
            .map(|r| r.map(|(k, v)| self.decode(&k, &v)).transpose())
            .collect()
    }

    /// Inserts many jobs in one transaction (imports, tests with large histories).
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn put_jobs(&self, jobs: &[Job]) -> Result<(), StoreError> {
        self.write("put jobs", |tx| {
            for job in jobs {
                put_job_in(tx, job)?;
            }
            Ok(())
        })
    }

    /// Records many stored backups in the catalog in one transaction (imports, benchmarks
    /// with a large catalog).
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn put_backups(&self, records: &[BackupRecord]) -> Result<(), StoreError> {
        self.write("put backups", |tx| {
            let mut t = tx.open_table(BACKUPS)?;
            for record in records {
                let value = serde_json::to_vec(record).expect("a record always serializes");
                t.insert(backup_key(record).as_str(), value.as_slice())?;
            }
            Ok(())
        })
    }
}

/// Copies every entry of table `$def` from read transaction `$src` into write transaction
/// `$dst`; the number copied.
macro_rules! copy_table {
    ($src:expr, $dst:expr, $def:expr) => {{
        let from = $src.open_table($def)?;
        let mut to = $dst.open_table($def)?;
        let mut n = 0u64;
        for entry in from.iter()? {
            let (k, v) = entry?;
            to.insert(k.value(), v.value())?;
            n += 1;
        }
        n
    }};
}

impl RedbStore {
    /// Writes a consistent copy of the whole store (every table as one read transaction
    /// sees it, so a job and its catalog record are never half there) to a new redb file
    /// at `dest`, which must not exist; what it holds.
    ///
    /// # Errors
    /// [`StoreError::Redb`] naming this store (the read) or `dest` (the write).
    pub fn write_snapshot(&self, dest: &Path) -> Result<super::StoreCounts, StoreError> {
        let copy = || -> Result<super::StoreCounts, redb::Error> {
            let target = Database::builder().create(dest)?;
            let src = self.db.begin_read()?;
            let dst = target.begin_write()?;
            let counts = super::StoreCounts {
                jobs: copy_table!(src, dst, JOBS),
                backups: copy_table!(src, dst, BACKUPS),
                audit: copy_table!(src, dst, AUDIT),
            };
            copy_table!(src, dst, UNFINISHED);
            copy_table!(src, dst, LATEST);
            copy_table!(src, dst, EVENTS);
            copy_table!(src, dst, SCHEDULE_RUNS);
            dst.commit()?;
            Ok(counts)
        };
        copy().map_err(|e| StoreError::Redb {
            path: dest.to_owned(),
            op: "snapshot",
            source: Box::new(e),
        })
    }

    /// Replaces the whole catalog with `records`, in one transaction (`ferry-coordinator
    /// catalog rebuild`: a crash leaves the old catalog or the new, never half of each);
    /// returns how many records the catalog held before. Jobs, events and the audit log
    /// are left as they are.
    ///
    /// # Errors
    /// [`StoreError`].
    pub fn replace_backups(&self, records: &[BackupRecord]) -> Result<usize, StoreError> {
        self.write("replace the catalog", |tx| {
            let mut t = tx.open_table(BACKUPS)?;
            let before =
                usize::try_from(redb::ReadableTableMetadata::len(&t)?).unwrap_or(usize::MAX);
            t.retain(|_, _| false)?;
            for record in records {
                let value = serde_json::to_vec(record).expect("a record always serializes");
                t.insert(backup_key(record).as_str(), value.as_slice())?;
            }
            Ok(before)
        })
    }
}

/// A catalog record's key: `<finished ms, 20 digits>\0<job id>`, so key order is age.
fn backup_key(record: &BackupRecord) -> String {
    format!("{:020}\0{}", record.finished_ms.max(0), record.job_id)
}

fn append_event_in(tx: &redb::WriteTransaction, event: &JobEventRecord) -> Result<(), redb::Error> {
    let value = serde_json::to_vec(event).expect("an event always serializes");
    let mut t = tx.open_table(EVENTS)?;
    let next = match t
        .range((event.job_id.as_str(), 0)..=(event.job_id.as_str(), u64::MAX))?
        .next_back()
    {
        Some(last) => last?.0.value().1 + 1,
        None => 0,
    };
    t.insert((event.job_id.as_str(), next), value.as_slice())?;
    Ok(())
}

fn put_job_in(tx: &redb::WriteTransaction, job: &Job) -> Result<(), redb::Error> {
    let value = serde_json::to_vec(job).expect("a job always serializes");
    tx.open_table(JOBS)?
        .insert(job.id.as_str(), value.as_slice())?;
    let mut unfinished = tx.open_table(UNFINISHED)?;
    if job.state.is_final() {
        unfinished.remove(job.id.as_str())?;
    } else {
        unfinished.insert(job.id.as_str(), ())?;
    }
    let mut latest = tx.open_table(LATEST)?;
    let key = latest_key(&job.agent, &job.datastore);
    let mut ids: LatestIds = match latest.get(key.as_str())? {
        Some(v) => serde_json::from_slice(v.value()).unwrap_or_default(),
        None => LatestIds::default(),
    };
    newest(&mut ids.last, &job.id);
    if matches!(job.state, JobState::Succeeded | JobState::Failed) {
        let kind = ids.kinds.entry(job.kind).or_default();
        newest(&mut kind.last_outcome, &job.id);
        if job.state == JobState::Succeeded {
            newest(&mut kind.last_success, &job.id);
            newest(&mut ids.last_success, &job.id);
        }
    }
    let value = serde_json::to_vec(&ids).expect("ids serialize");
    latest.insert(key.as_str(), value.as_slice())?;
    Ok(())
}

impl Store for RedbStore {
    fn schedule_mark(&self, key: &str) -> Result<Option<i64>, StoreError> {
        self.read("read schedule runs", |tx| {
            Ok(tx.open_table(SCHEDULE_RUNS)?.get(key)?.map(|v| v.value()))
        })
    }

    fn snapshot_to(&self, dest: &std::path::Path) -> Result<super::StoreCounts, StoreError> {
        self.write_snapshot(dest)
    }

    fn queue_jobs(
        &self,
        jobs: &[Job],
        events: &[JobEventRecord],
        claim: Option<(&str, i64)>,
    ) -> Result<bool, StoreError> {
        self.write("queue jobs", |tx| {
            if let Some((key, occurrence_ms)) = claim {
                let mut runs = tx.open_table(SCHEDULE_RUNS)?;
                if runs
                    .get(key)?
                    .is_some_and(|last| last.value() >= occurrence_ms)
                {
                    return Ok(false);
                }
                runs.insert(key, occurrence_ms)?;
            }
            for job in jobs {
                put_job_in(tx, job)?;
            }
            for event in events {
                append_event_in(tx, event)?;
            }
            Ok(true)
        })
    }

    fn put_job(&self, job: &Job) -> Result<(), StoreError> {
        self.write("put job", |tx| put_job_in(tx, job))
    }

    fn get_job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        Ok(self.get_jobs(&[Some(id.to_owned())])?.pop().flatten())
    }

    fn list_jobs(&self, limit: usize) -> Result<Vec<Job>, StoreError> {
        let raw: Vec<(String, Vec<u8>)> = self.read("list jobs", |tx| {
            let jobs = tx.open_table(JOBS)?;
            let mut out = Vec::new();
            for entry in jobs.iter()?.rev().take(limit) {
                let (k, v) = entry?;
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok(out)
        })?;
        raw.iter().map(|(k, v)| self.decode(k, v)).collect()
    }

    fn unfinished_jobs(&self) -> Result<Vec<Job>, StoreError> {
        let ids: Vec<Option<String>> = self.read("list unfinished jobs", |tx| {
            let t = tx.open_table(UNFINISHED)?;
            let mut out = Vec::new();
            for entry in t.iter()? {
                out.push(Some(entry?.0.value().to_owned()));
            }
            Ok(out)
        })?;
        Ok(self.get_jobs(&ids)?.into_iter().flatten().collect())
    }

    fn append_event(&self, event: &JobEventRecord) -> Result<(), StoreError> {
        self.write("append event", |tx| append_event_in(tx, event))
    }

    fn job_events(&self, job_id: &str) -> Result<Vec<JobEventRecord>, StoreError> {
        let raw: Vec<Vec<u8>> = self.read("read events", |tx| {
            let t = tx.open_table(EVENTS)?;
            let mut out = Vec::new();
            for entry in t.range((job_id, 0)..=(job_id, u64::MAX))? {
                out.push(entry?.1.value().to_vec());
            }
            Ok(out)
        })?;
        raw.iter().map(|v| self.decode(job_id, v)).collect()
    }

    fn put_backup(&self, record: &BackupRecord) -> Result<(), StoreError> {
        let key = backup_key(record);
        let value = serde_json::to_vec(record).expect("a record always serializes");
        self.write("put backup", |tx| {
            tx.open_table(BACKUPS)?
                .insert(key.as_str(), value.as_slice())?;
            Ok(())
        })
    }

    fn list_backups(&self, environment: Option<&str>) -> Result<Vec<BackupRecord>, StoreError> {
        let raw: Vec<(String, Vec<u8>)> = self.read("list backups", |tx| {
            let t = tx.open_table(BACKUPS)?;
            let mut out = Vec::new();
            for entry in t.iter()?.rev() {
                let (k, v) = entry?;
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok(out)
        })?;
        let mut out = Vec::new();
        for (k, v) in raw {
            let record: BackupRecord = self.decode(&k, &v)?;
            if environment.is_none_or(|e| e == record.environment) {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn latest_jobs(&self, agent: &str, datastore: &str) -> Result<LatestJobs, StoreError> {
        let key = latest_key(agent, datastore);
        let raw: Option<Vec<u8>> = self.read("read latest", |tx| {
            Ok(tx
                .open_table(LATEST)?
                .get(key.as_str())?
                .map(|v| v.value().to_vec()))
        })?;
        let Some(raw) = raw else {
            return Ok(LatestJobs::default());
        };
        let ids: LatestIds = self.decode(&key, &raw)?;
        let kinds: Vec<JobKind> = ids.kinds.keys().copied().collect();
        let mut wanted = vec![ids.last, ids.last_success];
        for k in ids.kinds.into_values() {
            wanted.extend([k.last_outcome, k.last_success]);
        }
        let mut jobs = self.get_jobs(&wanted)?.into_iter();
        let last = jobs.next().flatten();
        let last_success = jobs.next().flatten();
        let mut by_kind = BTreeMap::new();
        for kind in kinds {
            let last_outcome = jobs.next().flatten();
            let last_success = jobs.next().flatten();
            by_kind.insert(
                kind,
                KindJobs {
                    last_outcome,
                    last_success,
                },
            );
        }
        if by_kind.is_empty() {
            // Written before per-kind entries: what the overall ones say.
            for job in [&last, &last_success].into_iter().flatten() {
                if matches!(job.state, JobState::Succeeded | JobState::Failed) {
                    let k: &mut KindJobs = by_kind.entry(job.kind).or_default();
                    if k.last_outcome.as_ref().is_none_or(|o| o.id < job.id) {
                        k.last_outcome = Some(job.clone());
                    }
                    if job.state == JobState::Succeeded
                        && k.last_success.as_ref().is_none_or(|o| o.id < job.id)
                    {
                        k.last_success = Some(job.clone());
                    }
                }
            }
        }
        Ok(LatestJobs {
            last,
            last_success,
            by_kind,
        })
    }

    fn delete_backups(&self, environment: &str, date: &str) -> Result<usize, StoreError> {
        let (environment, date) = (environment.to_owned(), date.to_owned());
        self.write("delete backups", move |tx| {
            let mut t = tx.open_table(BACKUPS)?;
            let mut doomed = Vec::new();
            for entry in t.iter()? {
                let (k, v) = entry?;
                let hit = serde_json::from_slice::<BackupRecord>(v.value())
                    .is_ok_and(|r| r.environment == environment && r.date == date);
                if hit {
                    doomed.push(k.value().to_owned());
                }
            }
            for k in &doomed {
                t.remove(k.as_str())?;
            }
            Ok(doomed.len())
        })
    }

    fn append_audit(
        &self,
        who: &str,
        action: &str,
        target: &str,
        outcome: &str,
    ) -> Result<AuditEntry, StoreError> {
        let at = ferry_proto::now_unix_ms();
        self.write("append audit", |tx| {
            let mut t = tx.open_table(AUDIT)?;
            let prev: Option<AuditEntry> = match t.last()? {
                Some((_, v)) => Some(serde_json::from_slice(v.value()).map_err(|e| {
                    redb::Error::from(redb::StorageError::Corrupted(format!(
                        "the newest audit entry is unreadable: {e}"
                    )))
                })?),
                None => None,
            };
            let entry = AuditEntry::next(prev.as_ref(), at, who, action, target, outcome);
            let value = serde_json::to_vec(&entry).expect("an entry always serializes");
            t.insert(entry.seq, value.as_slice())?;
            Ok(entry)
        })
    }

    fn list_audit(&self, limit: Option<usize>) -> Result<Vec<AuditEntry>, StoreError> {
        let raw: Vec<(u64, Vec<u8>)> = self.read("list audit", |tx| {
            let t = tx.open_table(AUDIT)?;
            let mut out = Vec::new();
            for entry in t.iter()?.rev().take(limit.unwrap_or(usize::MAX)) {
                let (k, v) = entry?;
                out.push((k.value(), v.value().to_vec()));
            }
            out.reverse();
            Ok(out)
        })?;
        raw.into_iter()
            .map(|(k, v)| self.decode(&k.to_string(), &v))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_job as job;

    #[test]
    fn jobs_events_and_backups_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        {
            let s = RedbStore::open(&path).unwrap();
            s.put_job(&job(1, "a", JobState::Running)).unwrap();
            for m in ["queued", "accepted"] {
                s.append_event(&JobEventRecord {
                    job_id: job(1, "a", JobState::Running).id,
                    at_ms: 1,
                    message: m.into(),
                })
                .unwrap();
            }
            s.put_backup(&BackupRecord {
                environment: "production".into(),
                date: "2026-11-25".into(),
                datastore: "postgres".into(),
                kind: "postgres".into(),
                agent: "a".into(),
                stored_path: "/x".into(),
                size_bytes: 1,
                bytes_uncompressed: 2,
                sha256: "00".into(),
                finished_ms: 5,
                job_id: "j".into(),
                missing: None,
                retain_until_ms: None,
                lock_error: None,
                copies: Vec::new(),
                recipients: Vec::new(),
            })
            .unwrap();
        }
        let s = RedbStore::open(&path).unwrap();
        let j = job(1, "a", JobState::Running);
        assert_eq!(s.get_job(&j.id).unwrap(), Some(j.clone()));
        let events: Vec<_> = s
            .job_events(&j.id)
            .unwrap()
            .into_iter()
            .map(|e| e.message)
            .collect();
        assert_eq!(events, ["queued", "accepted"]);
        assert_eq!(s.unfinished_jobs().unwrap(), vec![j.clone()]);
        s.put_job(&job(1, "a", JobState::Failed)).unwrap();
        assert!(s.unfinished_jobs().unwrap().is_empty());
        assert_eq!(s.list_backups(Some("production")).unwrap().len(), 1);
        assert!(s.list_backups(Some("staging")).unwrap().is_empty());
    }

    #[test]
    fn backups_put_in_one_batch_list_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(&dir.path().join("c.redb")).unwrap();
        let records: Vec<BackupRecord> = (0..3)
            .map(|n| BackupRecord {
                environment: "production".into(),
                date: "2026-11-25".into(),
                datastore: format!("d{n}"),
                kind: "files".into(),
                agent: "a".into(),
                stored_path: format!("/x/{n}"),
                size_bytes: 1,
                bytes_uncompressed: 2,
                sha256: "00".into(),
                finished_ms: n,
                job_id: format!("j{n}"),
                missing: None,
                retain_until_ms: None,
                lock_error: None,
                copies: Vec::new(),
                recipients: Vec::new(),
            })
            .collect();
        s.put_backups(&records).unwrap();
        let listed: Vec<_> = s
            .list_backups(None)
            .unwrap()
            .into_iter()
            .map(|r| r.job_id)
            .collect();
        assert_eq!(listed, ["j2", "j1", "j0"]);
    }

    #[test]
    fn latest_jobs_with_a_hundred_thousand_jobs_in_history() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(&dir.path().join("c.redb")).unwrap();
        let jobs: Vec<Job> = (0..100_000)
            .map(|n| {
                let state = if n % 3 == 0 {
                    JobState::Succeeded
                } else {
                    JobState::Failed
                };
                job(n, if n % 2 == 0 { "a" } else { "b" }, state)
            })
            .collect();
        for chunk in jobs.chunks(20_000) {
            s.put_jobs(chunk).unwrap();
        }
        let l = s.latest_jobs("a", "postgres").unwrap();
        assert_eq!(l.last.unwrap().id, jobs[99_998].id);
        // Newest even n that is a multiple of 3: 99_996.
        assert_eq!(l.last_success.unwrap().id, jobs[99_996].id);
        let newest = s.list_jobs(50).unwrap();
        assert_eq!(newest.len(), 50);
        assert_eq!(newest[0].id, jobs[99_999].id);
        assert_eq!(
            s.latest_jobs("nobody", "postgres").unwrap(),
            LatestJobs::default()
        );
    }

    #[test]
    fn a_verify_after_a_restore_leaves_the_restores_outcome_per_kind() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(&dir.path().join("c.redb")).unwrap();
        let of = |n, kind, state| Job {
            kind,
            ..job(n, "stage", state)
        };
        let failed_restore = of(1, JobKind::Restore, JobState::Failed);
        let restore = of(2, JobKind::Restore, JobState::Succeeded);
        let verify = of(3, JobKind::Verify, JobState::Succeeded);
        let running = of(4, JobKind::Restore, JobState::Running);
        for j in [&failed_restore, &restore, &verify, &running] {
            s.put_job(j).unwrap();
        }
        let l = s.latest_jobs("stage", "postgres").unwrap();
        assert_eq!(l.last.as_ref(), Some(&running));
        assert_eq!(l.last_success.as_ref(), Some(&verify));
        let r = &l.by_kind[&JobKind::Restore];
        // The running restore has no outcome yet: the last drill is still the success.
        assert_eq!(r.last_outcome.as_ref(), Some(&restore));
        assert_eq!(r.last_success.as_ref(), Some(&restore));
        assert_eq!(
            l.by_kind[&JobKind::Verify].last_outcome.as_ref(),
            Some(&verify)
        );
        assert!(!l.by_kind.contains_key(&JobKind::Backup));

        // It fails: the drill's outcome is now the failure, its last success stays.
        let failed = of(4, JobKind::Restore, JobState::Failed);
        s.put_job(&failed).unwrap();
        let l = s.latest_jobs("stage", "postgres").unwrap();
        let r = &l.by_kind[&JobKind::Restore];
        assert_eq!(r.last_outcome.as_ref(), Some(&failed));
        assert_eq!(r.last_success.as_ref(), Some(&restore));
    }

    #[test]
    fn latest_entries_written_before_per_kind_ones_are_read_per_kind() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(&dir.path().join("c.redb")).unwrap();
        let restore = Job {
            kind: JobKind::Restore,
            ..job(1, "stage", JobState::Succeeded)
        };
        s.put_job(&restore).unwrap();
        // As an older coordinator wrote it: no `kinds`.
        s.write("old latest", |tx| {
            let ids = serde_json::json!({"last": restore.id, "last_success": restore.id});
            let value = serde_json::to_vec(&ids).unwrap();
            tx.open_table(LATEST)?
                .insert(latest_key("stage", "postgres").as_str(), value.as_slice())?;
            Ok(())
        })
        .unwrap();
        let l = s.latest_jobs("stage", "postgres").unwrap();
        assert_eq!(
            l.by_kind[&JobKind::Restore].last_outcome.as_ref(),
            Some(&restore)
        );
    }
}
