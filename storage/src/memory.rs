//! An in-memory target, for unit tests of the pipeline and of prune: objects in a map
//! shared by every session of the target (and its clones), with the same rules as the
//! real targets: a partial object is hidden (`.<name>.<job>.<attempt>.partial`, as on
//! SFTP) until its commit, a commit never overwrites, a reader sees only final names.
//! [`MemoryTarget::tamper`] alters a stored object, to test that readers catch it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_core::layout::StoredFile;

use crate::chunk::{self, READ_CHUNK_BYTES};
use crate::leftovers::{self, Entry};
use crate::now_seconds;
use crate::{
    Aborter, Leftover, MaintainSession, PartialFate, ReadSession, Staged, Target, TargetError,
    WriteSession,
};

/// One stored object.
#[derive(Clone, Debug)]
struct Object {
    bytes: Vec<u8>,
    /// Seconds since the Unix epoch.
    mtime: u64,
}

/// A target holding its objects in memory; clones share them.
#[derive(Clone, Debug)]
pub struct MemoryTarget {
    root: String,
    objects: Arc<Mutex<BTreeMap<String, Object>>>,
    attempts: Arc<AtomicU64>,
}

impl Default for MemoryTarget {
    fn default() -> Self {
        MemoryTarget::new("/memory")
    }
}

const ADDR: &str = "memory";

impl MemoryTarget {
    /// An empty target whose layout starts at `root` (e.g. `/memory`).
    pub fn new(root: &str) -> MemoryTarget {
        MemoryTarget {
            root: root.trim_end_matches('/').to_owned(),
            objects: Arc::default(),
            attempts: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Object>> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every object's full path, partial ones included, in order.
    pub fn paths(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// The bytes of the object at `path`, if there is one.
    pub fn get(&self, path: &str) -> Option<Vec<u8>> {
        self.lock().get(path).map(|o| o.bytes.clone())
    }

    /// Stores `bytes` at `path` (a full path) as if committed, replacing what is there: a
    /// test's fixture.
    pub fn insert(&self, path: &str, bytes: &[u8]) {
        let object = Object {
            bytes: bytes.to_vec(),
            mtime: now_seconds(),
        };
        self.lock().insert(path.to_owned(), object);
    }

    /// Alters the stored object at `path` in place with `f` (a test's corruption);
    /// whether it exists.
    pub fn tamper(&self, path: &str, f: impl FnOnce(&mut Vec<u8>)) -> bool {
        match self.lock().get_mut(path) {
            Some(o) => {
                f(&mut o.bytes);
                true
            }
            None => false,
        }
    }

    fn session(&self) -> MemorySession {
        MemorySession {
            target: self.clone(),
            aborted: Arc::default(),
        }
    }
}

impl Target for MemoryTarget {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn describe(&self) -> String {
        format!("{ADDR}:{}", self.root)
    }

    fn environment_dir(&self, environment: &str) -> String {
        ferry_core::layout::environment_dir(&self.root, environment)
    }

    fn write(&self) -> Result<Box<dyn WriteSession>, TargetError> {
        Ok(Box::new(self.session()))
    }

    fn read(&self) -> Result<Box<dyn ReadSession>, TargetError> {
        Ok(Box::new(self.session()))
    }

    fn maintain(&self) -> Result<Box<dyn MaintainSession>, TargetError> {
        Ok(Box::new(self.session()))
    }
}

/// A session on a [`MemoryTarget`].
struct MemorySession {
    target: MemoryTarget,
    aborted: Arc<AtomicBool>,
}

fn io(op: &'static str, path: &str, message: &str) -> TargetError {
    TargetError::Io {
        addr: ADDR.into(),
        op,
        path: path.to_owned(),
        message: message.to_owned(),
    }
}

impl WriteSession for MemorySession {
    fn stage(
        &mut self,
        file: &StoredFile,
        job_id: &str,
        chunks: Receiver<Vec<u8>>,
    ) -> Result<Staged, TargetError> {
        let final_path = file.path();
        if self.exists(&final_path)? {
            return Err(TargetError::Exists {
                addr: ADDR.into(),
                path: final_path,
            });
        }
        let attempt = self.target.attempts.fetch_add(1, Ordering::Relaxed);
        let partial = format!(
            "{}/{}",
            file.dir,
            file.partial_name(&format!("{job_id}.{attempt:x}"))
        );
        let mut bytes = Vec::new();
        for c in chunks {
            if self.aborted.load(Ordering::Relaxed) {
                return Err(io("write", &partial, "the session was aborted"));
            }
            bytes.extend_from_slice(&c);
            chunk::recycle(c);
        }
        let n = bytes.len() as u64;
        self.target.lock().insert(
            partial.clone(),
            Object {
                bytes,
                mtime: now_seconds(),
            },
        );
        Ok(Staged {
            file: file.clone(),
            partial,
            bytes: n,
        })
    }

    fn commit(&mut self, _job_id: &str, parts: &[(Staged, Vec<u8>)]) -> Result<(), TargetError> {
        let mut objects = self.target.lock();
        let commit_err = |source| TargetError::Commit {
            source: Box::new(source),
            left: Vec::new(),
            unsure: None,
        };
        // Every name checked first: nothing is put in place unless all of it can be.
        for (s, _) in parts {
            for path in [s.file.path(), s.file.manifest_path()] {
                if objects.contains_key(&path) {
                    return Err(commit_err(TargetError::Exists {
                        addr: ADDR.into(),
                        path,
                    }));
                }
            }
            match objects.get(&s.partial) {
                Some(o) if o.bytes.len() as u64 == s.bytes => {}
                Some(o) => {
                    return Err(commit_err(TargetError::SizeMismatch {
                        addr: ADDR.into(),
                        path: s.partial.clone(),
                        sent: s.bytes,
                        found: o.bytes.len() as u64,
                    }));
                }
                None => {
                    return Err(commit_err(TargetError::NotFound {
                        addr: ADDR.into(),
                        path: s.partial.clone(),
                    }));
                }
            }
        }
        let now = now_seconds();
        for (s, _) in parts {
            if let Some(o) = objects.remove(&s.partial) {
                objects.insert(s.file.path(), o);
            }
        }
        // The manifests last, the main part's (the last) at the very end.
        for (s, json) in parts {
            objects.insert(
                s.file.manifest_path(),
                Object {
                    bytes: json.clone(),
                    mtime: now,
                },
            );
        }
        Ok(())
    }

    fn abandon(&mut self, partials: &[String]) -> Vec<PartialFate> {
        let mut objects = self.target.lock();
        partials
            .iter()
            .map(|p| {
                objects.remove(p);
                PartialFate::Removed
            })
            .collect()
    }

    fn exists(&mut self, path: &str) -> Result<bool, TargetError> {
        Ok(self.target.lock().contains_key(path))
    }

    fn read_back(&mut self, path: &str, max: u64) -> Result<Option<Vec<u8>>, TargetError> {
        if !WriteSession::exists(self, path)? {
            return Ok(None);
        }
        ReadSession::read_small(self, path, max).map(Some)
    }

    fn aborter(&self) -> Aborter {
        let aborted = self.aborted.clone();
        Aborter::new(move || aborted.store(true, Ordering::Relaxed))
    }

    fn aborted(&self) -> bool {
        self.aborted.load(Ordering::Relaxed)
    }

    fn take_unremoved(&mut self) -> Vec<String> {
        Vec::new()
    }
}

impl MemorySession {
    /// The objects directly in `dir`, with their size and time.
    fn entries(&self, dir: &str) -> Vec<Entry> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        self.target
            .lock()
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| !k[prefix.len()..].contains('/'))
            .map(|(k, o)| Entry {
                name: k[prefix.len()..].to_owned(),
                size: o.bytes.len() as u64,
                mtime: Some(o.mtime),
            })
            .collect()
    }
}

impl ReadSession for MemorySession {
    fn list(&mut self, dir: &str) -> Result<Vec<String>, TargetError> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        let mut names: Vec<String> = self
            .target
            .lock()
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k[prefix.len()..].split('/').next().unwrap_or("").to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        names.dedup();
        Ok(names)
    }

    fn size(&mut self, path: &str) -> Result<Option<u64>, TargetError> {
        Ok(self.target.lock().get(path).map(|o| o.bytes.len() as u64))
    }

    fn read_small(&mut self, path: &str, max: u64) -> Result<Vec<u8>, TargetError> {
        let bytes = self.target.get(path).ok_or_else(|| TargetError::NotFound {
            addr: ADDR.into(),
            path: path.to_owned(),
        })?;
        if bytes.len() as u64 > max {
            return Err(TargetError::TooLarge {
                addr: ADDR.into(),
                path: path.to_owned(),
                size: bytes.len() as u64,
                max,
            });
        }
        Ok(bytes)
    }

    fn download(&mut self, path: &str, chunks: SyncSender<Vec<u8>>) -> Result<u64, TargetError> {
        let bytes = self.target.get(path).ok_or_else(|| TargetError::NotFound {
            addr: ADDR.into(),
            path: path.to_owned(),
        })?;
        let mut total = 0;
        for piece in bytes.chunks(READ_CHUNK_BYTES) {
            let mut buf = chunk::read_buffer();
            buf.extend_from_slice(piece);
            if chunks.send(buf).is_err() {
                return Ok(total);
            }
            total += piece.len() as u64;
        }
        Ok(total)
    }
}

impl MaintainSession for MemorySession {
    fn remove_archived_file(
        &mut self,
        environment: &str,
        datastore: &str,
        file: &crate::ArchivedFile,
    ) -> Result<u64, TargetError> {
        let Some((data, record)) =
            crate::archived_file_paths(&self.target.root, environment, datastore, file)
        else {
            return Err(io(
                "remove",
                file.name(),
                "not an archived file of the layout",
            ));
        };
        let mut objects = self.target.lock();
        let bytes = objects.remove(&data).map_or(0, |o| o.bytes.len() as u64);
        objects.remove(&record);
        Ok(bytes)
    }

    fn remove_dated_folder(
        &mut self,
        environment: &str,
        date: &str,
    ) -> Result<(u64, u64), TargetError> {
        let dir = format!("{}/{environment}/{date}", self.target.root);
        if !ferry_core::layout::holds_dated_folders(environment)
            || ferry_core::layout::parse_date(date).is_err()
        {
            return Err(io("remove", &dir, "not a dated folder of the layout"));
        }
        let prefix = format!("{dir}/");
        let mut objects = self.target.lock();
        let inside: Vec<String> = objects
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .cloned()
            .collect();
        if inside.iter().any(|k| k[prefix.len()..].contains('/')) {
            return Err(io(
                "remove",
                &dir,
                "a dated folder holds files only; nothing removed",
            ));
        }
        let mut bytes = 0;
        for k in &inside {
            bytes += objects.remove(k).map_or(0, |o| o.bytes.len() as u64);
        }
        Ok((inside.len() as u64, bytes))
    }

    fn leftovers(&mut self, environment: &str) -> Result<Vec<Leftover>, TargetError> {
        let env_dir = self.target.environment_dir(environment);
        let now = now_seconds();
        let mut out = Vec::new();
        for date in self.list(&env_dir)? {
            if ferry_core::layout::parse_date(&date).is_err() {
                continue;
            }
            let dir = format!("{env_dir}/{date}");
            let files = self.entries(&dir);
            let target = self.target.clone();
            out.extend(leftovers::classify(
                environment,
                &date,
                &dir,
                &files,
                now,
                |path| {
                    let bytes = target.get(path)?;
                    ferry_core::manifest::Manifest::from_slice(path, &bytes).ok()
                },
            ));
        }
        Ok(out)
    }

    fn extend_lock(
        &mut self,
        _path: &str,
        _until: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), TargetError> {
        Err(TargetError::Unsupported {
            addr: ADDR.into(),
            kind: "memory",
            what: "an object lock",
        })
    }

    fn remove_leftover(&mut self, leftover: &Leftover) -> Result<u64, TargetError> {
        if !leftovers::removable(&self.target.root, leftover) {
            return Err(io(
                "remove",
                &leftover.path,
                "not a file of a dated folder of the layout",
            ));
        }
        let mut objects = self.target.lock();
        for path in std::iter::once(&leftover.path).chain(&leftover.manifest) {
            objects.remove(path);
        }
        Ok(leftover.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(s: &mut dyn WriteSession, file: &StoredFile, bytes: &[u8]) -> Staged {
        let (tx, rx) = chunk::channel();
        tx.send(bytes.to_vec()).unwrap();
        drop(tx);
        s.stage(file, "01KBX8Z3E5M1Q2W3E4R5T6Y7U8", rx).unwrap()
    }

    #[test]
    fn a_staged_object_is_visible_only_once_committed_and_never_overwritten() {
        let target = MemoryTarget::default();
        let file = StoredFile {
            dir: "/memory/prod/2026-02-05".into(),
            name: "pg_backup_2026-02-05.pgdump.zst.age".into(),
        };
        let mut w = target.write().unwrap();
        let staged = stage(&mut *w, &file, b"data");
        let mut r = target.read().unwrap();
        let visible = |r: &mut Box<dyn ReadSession>| {
            r.list(&file.dir)
                .unwrap()
                .into_iter()
                .filter(|n| !n.starts_with('.'))
                .collect::<Vec<_>>()
        };
        assert!(visible(&mut r).is_empty());
        w.commit("j", &[(staged.clone(), b"{}".to_vec())]).unwrap();
        assert_eq!(
            visible(&mut r),
            [file.name.clone(), format!("{}.json", file.name)]
        );
        assert_eq!(r.read_small(&file.path(), 10).unwrap(), b"data");
        let (tx, rx) = chunk::channel();
        drop(tx);
        assert!(matches!(
            w.stage(&file, "j", rx),
            Err(TargetError::Exists { .. })
        ));
        let mut m = target.maintain().unwrap();
        assert!(m.leftovers("prod").unwrap().is_empty());
        assert_eq!(m.remove_dated_folder("prod", "2026-02-05").unwrap().0, 2);
        assert!(target.paths().is_empty());
    }
}
