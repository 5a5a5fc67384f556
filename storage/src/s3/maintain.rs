//! The S3 maintain session: remove a dated folder's versions, list and remove leftovers,
//! read and extend locks. Its reads are [`super::read::S3Read`]'s; the bucket policy allows
//! or refuses each call by the configuration's credentials.

use std::sync::mpsc::SyncSender;

use aws_sdk_s3::primitives::DateTime as S3DateTime;
use aws_sdk_s3::types::{ObjectLockRetention, ObjectLockRetentionMode};

use super::read::S3Read;
use super::{Conn, LockMode};
use crate::leftovers::{self, Entry};
use crate::{Leftover, LeftoverKind, MaintainSession, ReadSession, TargetError, now_seconds};

/// The maintain session of an [`super::S3Target`].
pub struct S3Maintain {
    conn: Conn,
    read: S3Read,
}

/// One version of an object, as `ListObjectVersions` gives it.
struct Version {
    key: String,
    version_id: Option<String>,
    size: u64,
    delete_marker: bool,
}

impl S3Maintain {
    pub(crate) fn new(conn: Conn) -> S3Maintain {
        S3Maintain {
            read: S3Read::new(conn.clone()),
            conn,
        }
    }

    fn bucket(&self) -> &str {
        &self.conn.config.bucket
    }

    /// Every version and delete marker of the keys under `prefix`.
    fn versions(&self, prefix: &str) -> Result<Vec<Version>, TargetError> {
        let mut out = Vec::new();
        let (mut key_marker, mut version_marker): (Option<String>, Option<String>) = (None, None);
        loop {
            let page = self.conn.call(
                "list versions",
                prefix,
                self.conn
                    .client
                    .list_object_versions()
                    .bucket(self.bucket())
                    .prefix(prefix)
                    .set_key_marker(key_marker.clone())
                    .set_version_id_marker(version_marker.clone())
                    .send(),
            )?;
            for v in page.versions() {
                out.push(Version {
                    key: v.key().unwrap_or_default().to_owned(),
                    version_id: v.version_id().map(str::to_owned),
                    size: v.size().unwrap_or(0).max(0) as u64,
                    delete_marker: false,
                });
            }
            for m in page.delete_markers() {
                out.push(Version {
                    key: m.key().unwrap_or_default().to_owned(),
                    version_id: m.version_id().map(str::to_owned),
                    size: 0,
                    delete_marker: true,
                });
            }
            key_marker = self.conn.next_page(
                "list versions",
                prefix,
                page.is_truncated(),
                page.next_key_marker(),
            )?;
            if key_marker.is_none() {
                return Ok(out);
            }
            version_marker = page.next_version_id_marker().map(str::to_owned);
        }
    }

    /// Deletes one version (or the key's current one without a version id).
    fn delete_version(&self, key: &str, version_id: Option<&str>) -> Result<(), TargetError> {
        let r = self.conn.call(
            "delete",
            key,
            self.conn
                .client
                .delete_object()
                .bucket(self.bucket())
                .key(key)
                .set_version_id(version_id.map(str::to_owned))
                .send(),
        );
        match r {
            Ok(_) | Err(TargetError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes every version of exactly `key`; the bytes they held.
    fn delete_all_versions(&self, key: &str) -> Result<u64, TargetError> {
        let mut bytes = 0;
        for v in self.versions(key)?.into_iter().filter(|v| v.key == key) {
            self.delete_version(&v.key, v.version_id.as_deref())?;
            bytes += v.size;
        }
        Ok(bytes)
    }

    /// The in-progress multipart uploads under `prefix`: `(key, upload id, initiated)`.
    fn uploads(&self, prefix: &str) -> Result<Vec<(String, String, Option<u64>)>, TargetError> {
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker): (Option<String>, Option<String>) = (None, None);
        loop {
            let page = self.conn.call(
                "list multipart uploads",
                prefix,
                self.conn
                    .client
                    .list_multipart_uploads()
                    .bucket(self.bucket())
                    .prefix(prefix)
                    .set_key_marker(key_marker.clone())
                    .set_upload_id_marker(id_marker.clone())
                    .send(),
            )?;
            for u in page.uploads() {
                if let (Some(k), Some(id)) = (u.key(), u.upload_id()) {
                    out.push((
                        k.to_owned(),
                        id.to_owned(),
                        u.initiated().map(|t| t.secs().max(0) as u64),
                    ));
                }
            }
            key_marker = self.conn.next_page(
                "list multipart uploads",
                prefix,
                page.is_truncated(),
                page.next_key_marker(),
            )?;
            if key_marker.is_none() {
                return Ok(out);
            }
            id_marker = page.next_upload_id_marker().map(str::to_owned);
        }
    }

    /// The bytes stored so far by the multipart upload (0 if its parts cannot be listed).
    fn upload_bytes(&self, key: &str, upload_id: &str) -> u64 {
        self.conn
            .call(
                "list parts",
                key,
                self.conn
                    .client
                    .list_parts()
                    .bucket(self.bucket())
                    .key(key)
                    .upload_id(upload_id)
                    .send(),
            )
            .map(|p| {
                p.parts()
                    .iter()
                    .map(|p| p.size().unwrap_or(0).max(0) as u64)
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The current retention of one version: `(mode, retain-until seconds)`, `None` if it
    /// has none.
    fn retention(
        &self,
        key: &str,
        version_id: Option<&str>,
    ) -> Result<Option<(ObjectLockRetentionMode, i64)>, TargetError> {
        // Its error's code tells "no lock" from a failure.
        let r = super::runtime().block_on(
            self.conn
                .client
                .get_object_retention()
                .bucket(self.bucket())
                .key(key)
                .set_version_id(version_id.map(str::to_owned))
                .send(),
        );
        match r {
            Ok(out) => Ok(out
                .retention()
                .and_then(|r| Some((r.mode()?.clone(), r.retain_until_date()?.secs())))),
            Err(e) => {
                let code = super::code(&e);
                if matches!(
                    code.as_deref(),
                    Some("NoSuchObjectLockConfiguration" | "ObjectLockConfigurationNotFoundError")
                ) {
                    Ok(None)
                } else {
                    Err(self.conn.err("get object retention", key, e))
                }
            }
        }
    }
}

/// Reads with the maintenance credentials are the read session's (the bucket policy says
/// which of them these credentials may make).
impl ReadSession for S3Maintain {
    fn list(&mut self, dir: &str) -> Result<Vec<String>, TargetError> {
        self.read.list(dir)
    }

    fn size(&mut self, path: &str) -> Result<Option<u64>, TargetError> {
        self.read.size(path)
    }

    fn read_small(&mut self, path: &str, max: u64) -> Result<Vec<u8>, TargetError> {
        self.read.read_small(path, max)
    }

    fn download(&mut self, path: &str, chunks: SyncSender<Vec<u8>>) -> Result<u64, TargetError> {
        self.read.download(path, chunks)
    }

    fn size_version(
        &mut self,
        path: &str,
        version_id: Option<&str>,
    ) -> Result<Option<u64>, TargetError> {
        self.read.size_version(path, version_id)
    }

    fn download_version(
        &mut self,
        path: &str,
        version_id: Option<&str>,
        chunks: SyncSender<Vec<u8>>,
    ) -> Result<u64, TargetError> {
        self.read.download_version(path, version_id, chunks)
    }
}

impl MaintainSession for S3Maintain {
    /// Removes every version and delete marker of the objects in the dated folder: with
    /// versioning, a plain delete would only hide them. A locked version refuses.
    fn remove_archived_file(
        &mut self,
        environment: &str,
        datastore: &str,
        file: &crate::ArchivedFile,
    ) -> Result<u64, TargetError> {
        let Some((data, record)) =
            crate::archived_file_paths(self.conn.config.root(), environment, datastore, file)
        else {
            return Err(TargetError::Io {
                addr: self.conn.addr.clone(),
                op: "remove",
                path: file.name().to_owned(),
                message: "not an archived file of the layout".into(),
            });
        };
        let mut bytes = 0;
        for (i, path) in [data, record].iter().enumerate() {
            let key = Conn::key(path);
            for v in self.versions(key)?.iter().filter(|v| v.key == key) {
                self.delete_version(&v.key, v.version_id.as_deref())?;
                if i == 0 && !v.delete_marker {
                    bytes += v.size;
                }
            }
        }
        Ok(bytes)
    }

    fn remove_dated_folder(
        &mut self,
        environment: &str,
        date: &str,
    ) -> Result<(u64, u64), TargetError> {
        let dir = format!("{}/{environment}/{date}", self.conn.config.root());
        if !ferry_core::layout::holds_dated_folders(environment)
            || ferry_core::layout::parse_date(date).is_err()
        {
            return Err(TargetError::Io {
                addr: self.conn.addr.clone(),
                op: "remove",
                path: dir,
                message: "not a dated folder of the layout".into(),
            });
        }
        let prefix = format!("{}/", Conn::key(&dir));
        let versions = self.versions(&prefix)?;
        if let Some(v) = versions
            .iter()
            .find(|v| v.key[prefix.len().min(v.key.len())..].contains('/'))
        {
            return Err(TargetError::Io {
                addr: self.conn.addr.clone(),
                op: "remove",
                path: v.key.clone(),
                message: "a dated folder holds objects only; this is below it; nothing removed"
                    .into(),
            });
        }
        let (mut objects, mut bytes) = (0u64, 0u64);
        for v in &versions {
            self.delete_version(&v.key, v.version_id.as_deref())?;
            if !v.delete_marker {
                objects += 1;
                bytes += v.size;
            }
        }
        Ok((objects, bytes))
    }

    /// In-progress multipart uploads of the environment (as [`LeftoverKind::Partial`]
    /// without job ids, their path `<key>#<upload id>`, idle since they were initiated)
    /// and, per dated folder, data objects no committed backup includes.
    fn leftovers(&mut self, environment: &str) -> Result<Vec<Leftover>, TargetError> {
        let env_dir = ferry_core::layout::environment_dir(self.conn.config.root(), environment);
        if ferry_core::layout::validate_name("environment", environment).is_err() {
            return Err(TargetError::Io {
                addr: self.conn.addr.clone(),
                op: "list",
                path: env_dir,
                message: "not an environment of the layout".into(),
            });
        }
        let env_prefix = format!("{}/", Conn::key(&env_dir));
        let now = now_seconds();
        let mut out = Vec::new();
        let (_, folders) = self.read.list_dir(&env_prefix)?;
        for date in folders {
            if ferry_core::layout::parse_date(&date).is_err() {
                continue;
            }
            let dir = format!("{env_dir}/{date}");
            let (objects, _) = self.read.list_dir(&format!("{env_prefix}{date}/"))?;
            let files: Vec<Entry> = objects
                .into_iter()
                .map(|(name, size, mtime)| Entry { name, size, mtime })
                .collect();
            out.extend(leftovers::classify(
                environment,
                &date,
                &dir,
                &files,
                now,
                |path| {
                    self.read_small(path, ferry_core::manifest::MAX_MANIFEST_BYTES)
                        .ok()
                        .and_then(|b| ferry_core::manifest::Manifest::from_slice(path, &b).ok())
                },
            ));
        }
        for (key, upload_id, initiated) in self.uploads(&env_prefix)? {
            let Some((date, _)) = key[env_prefix.len()..].split_once('/') else {
                continue;
            };
            if ferry_core::layout::parse_date(date).is_err() {
                continue;
            }
            out.push(Leftover {
                environment: environment.to_owned(),
                date: date.to_owned(),
                path: self
                    .conn
                    .path_of(&super::write::partial_name(&key, &upload_id)),
                size: self.upload_bytes(&key, &upload_id),
                idle_seconds: now.saturating_sub(initiated.unwrap_or(now)),
                kind: LeftoverKind::Partial {
                    job_ids: Vec::new(),
                },
                manifest: None,
            });
        }
        Ok(out)
    }

    /// Aborts a multipart upload, or deletes every version of an orphan (and of its
    /// manifest).
    fn remove_leftover(&mut self, leftover: &Leftover) -> Result<u64, TargetError> {
        if !leftovers::removable(self.conn.config.root(), leftover) {
            return Err(TargetError::Io {
                addr: self.conn.addr.clone(),
                op: "remove",
                path: leftover.path.clone(),
                message: "not an object of a dated folder of the layout".into(),
            });
        }
        match &leftover.kind {
            LeftoverKind::Partial { .. } => {
                let Some((key, upload_id)) = super::write::split_partial(&leftover.path) else {
                    return Err(TargetError::NotFound {
                        addr: self.conn.addr.clone(),
                        path: leftover.path.clone(),
                    });
                };
                let key = Conn::key(key);
                let r = self.conn.call(
                    "abort multipart upload",
                    key,
                    self.conn
                        .client
                        .abort_multipart_upload()
                        .bucket(self.bucket())
                        .key(key)
                        .upload_id(upload_id)
                        .send(),
                );
                match r {
                    Ok(_) | Err(TargetError::NotFound { .. }) => Ok(leftover.size),
                    Err(TargetError::Io { message, .. }) if message.starts_with("NoSuchUpload") => {
                        Ok(leftover.size)
                    }
                    Err(e) => Err(e),
                }
            }
            LeftoverKind::Orphan => {
                let mut bytes = self.delete_all_versions(Conn::key(&leftover.path))?;
                if let Some(m) = &leftover.manifest {
                    bytes += self.delete_all_versions(Conn::key(m))?;
                }
                Ok(bytes.max(leftover.size))
            }
        }
    }

    /// Sets every version of `path` to be retained until at least `until`: a version
    /// whose retain-until is already later keeps it (a lock is never shortened); one
    /// without a lock gets the configured mode, one with a lock keeps its mode.
    fn extend_lock(
        &mut self,
        path: &str,
        until: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), TargetError> {
        let Some(lock) = &self.conn.config.lock else {
            return Err(TargetError::Unsupported {
                addr: self.conn.addr.clone(),
                kind: "s3 (without `lock`)",
                what: "an object lock",
            });
        };
        let default_mode = match lock.mode {
            LockMode::Compliance => ObjectLockRetentionMode::Compliance,
            LockMode::Governance => ObjectLockRetentionMode::Governance,
        };
        let key = Conn::key(path);
        let versions: Vec<Version> = self
            .versions(key)?
            .into_iter()
            .filter(|v| v.key == key && !v.delete_marker)
            .collect();
        if versions.is_empty() {
            return Err(TargetError::NotFound {
                addr: self.conn.addr.clone(),
                path: path.to_owned(),
            });
        }
        let want = until.timestamp();
        for v in versions {
            let current = self.retention(key, v.version_id.as_deref())?;
            let mode = match current {
                Some((_, at)) if at >= want => continue,
                Some((mode, _)) => mode,
                None => default_mode.clone(),
            };
            self.conn.call(
                "put object retention",
                path,
                self.conn
                    .client
                    .put_object_retention()
                    .bucket(self.bucket())
                    .key(key)
                    .set_version_id(v.version_id.clone())
                    .retention(
                        ObjectLockRetention::builder()
                            .mode(mode)
                            .retain_until_date(S3DateTime::from_secs(want))
                            .build(),
                    )
                    .send(),
            )?;
        }
        Ok(())
    }

    /// The earliest retain-until among the versions of `path` (`GetObjectRetention` of
    /// each); `None` if one has no lock.
    fn retain_until(
        &mut self,
        path: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, TargetError> {
        let key = Conn::key(path);
        let versions: Vec<Version> = self
            .versions(key)?
            .into_iter()
            .filter(|v| v.key == key && !v.delete_marker)
            .collect();
        if versions.is_empty() {
            return Err(TargetError::NotFound {
                addr: self.conn.addr.clone(),
                path: path.to_owned(),
            });
        }
        let mut earliest: Option<i64> = None;
        for v in versions {
            match self.retention(key, v.version_id.as_deref())? {
                None => return Ok(None),
                Some((_, at)) => earliest = Some(earliest.map_or(at, |e| e.min(at))),
            }
        }
        Ok(earliest.and_then(|at| chrono::DateTime::from_timestamp(at, 0)))
    }
}
