//! etcd (`kind = "etcd"`, v3 API): `etcdctl snapshot save` into a temporary file, streamed
//! and removed, stored as `<name>_backup_<date>.db.zst.age`. The manifest records the
//! snapshot's revision, hash, database key count and size from `etcdctl snapshot status`,
//! and `keys`, the keys a `get` lists at that revision.
//!
//! Restore (staging) follows etcd's disaster-recovery procedure
//! (<https://etcd.io/docs/v3.4/op-guide/recovery/>): the snapshot is written to a file
//! beside the target data directory, its `snapshot status` compared with the manifest,
//! `etcdctl snapshot restore` builds a new data directory beside the target, and only
//! then is it swapped in for `data_dir`. etcd must not be running on `data_dir` at that
//! moment: the agent refuses the swap while a WAL file there is locked (etcd holds an
//! exclusive `flock` on its WAL), and says so; stop the member, restore, start it. A
//! restore replaces a member's data directory; for a cluster of several members, restore
//! every member from the same snapshot with its own `member_name` and the same
//! `initial_cluster`. A restore killed half-way leaves `.<dir>.ferry-snapshot-<job>`,
//! `-new-` and `-old-` siblings: the agent puts them right on start and before the next
//! restore ([`super::common::leftovers`]). A `data_dir` that is a mount point cannot be swapped:
//! it is refused before anything is downloaded.
//!
//! Credentials: the password comes from `password_file` (mode 0600/0400) or
//! `password_env`, and reaches etcdctl as `ETCDCTL_USER` in its environment, never on its
//! command line.

use std::fs;
use std::path::{Path, PathBuf};

use ferry_proto::Role;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::common::leftovers::Recovered;
use super::{
    CheckError, Datastore, DatastoreConfigError, DumpError, DumpOutcome, DumpStream, Dumper, Mode,
    Part, PartSink, RestoreError, RestoreSession, Restorer, ToolError, ToolPaths,
};
use ferry_core::manifest::{Manifest, Source};

/// The only part: an etcd snapshot (a bbolt database file).
pub const MAIN: Part = Part {
    name: "",
    format: "db",
};

/// `[[datastores]]` with `kind = "etcd"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Datastore name, used in stored file names.
    pub name: String,
    /// Production: the client URL of the member to snapshot, e.g. `https://10.0.0.9:2379`.
    pub endpoint: Option<String>,
    /// TLS to etcd: the CA, and a client certificate and key, as etcdctl's `--cacert`,
    /// `--cert`, `--key`.
    pub cacert: Option<PathBuf>,
    /// Client certificate.
    pub cert: Option<PathBuf>,
    /// Client key.
    pub key: Option<PathBuf>,
    /// etcd user (with `password_file` or `password_env`).
    pub user: Option<String>,
    /// File holding the password (mode 0600 or 0400).
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// Directory of `etcdctl`; `PATH` if unset.
    pub bin_dir: Option<PathBuf>,
    /// Production: where the snapshot file is written before it is streamed (and
    /// removed). Default: the system's temporary directory.
    pub scratch_dir: Option<PathBuf>,
    /// Staging: the member's data directory to restore into (absolute; created, or
    /// replaced at the end of a restore while etcd is stopped).
    pub data_dir: Option<PathBuf>,
    /// Staging: the member's name (`etcd --name`). Default `default`.
    pub member_name: Option<String>,
    /// Staging: `etcd --initial-cluster` of the restored cluster, e.g.
    /// `default=http://127.0.0.1:2380`.
    pub initial_cluster: Option<String>,
    /// Staging: `etcd --initial-advertise-peer-urls` of this member.
    pub initial_advertise_peer_urls: Option<String>,
}

/// What `etcdctl snapshot status -w json` says of a snapshot file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotStatus {
    /// The snapshot's hash (etcd's CRC-32 of the database).
    pub hash: u64,
    /// The store's revision at the snapshot.
    pub revision: i64,
    /// Keys in the snapshot's database: etcd's internal keys too (every revision of every
    /// key, and its own metadata), so more than the keys a `get` lists.
    #[serde(rename = "totalKey")]
    pub total_key: u64,
    /// Size of the database, bytes.
    #[serde(rename = "totalSize")]
    pub total_size: u64,
}

/// A built etcd datastore.
#[derive(Clone, Debug)]
pub struct Etcd {
    cfg: EtcdConfig,
    password: Option<ferry_core::secrets::Password>,
    tools: ToolPaths,
}

impl Etcd {
    /// Validates `cfg` for `role`.
    ///
    /// # Errors
    /// [`DatastoreConfigError`] naming the field.
    pub fn build(cfg: EtcdConfig, role: Role) -> Result<Self, DatastoreConfigError> {
        use DatastoreConfigError::{Missing, WrongRole};
        match role {
            Role::Production => {
                if cfg.endpoint.is_none() {
                    return Err(Missing {
                        field: "endpoint",
                        what: "the client URL of the member to back up",
                    });
                }
                if cfg.data_dir.is_some() {
                    return Err(WrongRole {
                        field: "data_dir",
                        why: "only a staging agent restores; remove it",
                    });
                }
            }
            Role::Staging => match &cfg.data_dir {
                None => {
                    return Err(Missing {
                        field: "data_dir",
                        what: "the data directory to restore into",
                    });
                }
                Some(d) if !d.is_absolute() || d.file_name().is_none() => {
                    return Err(DatastoreConfigError::invalid(
                        "data_dir",
                        "must be an absolute path below /",
                    ));
                }
                Some(_) => {
                    if cfg.initial_cluster.is_none() {
                        return Err(Missing {
                            field: "initial_cluster",
                            what: "e.g. default=http://127.0.0.1:2380",
                        });
                    }
                    if cfg.initial_advertise_peer_urls.is_none() {
                        return Err(Missing {
                            field: "initial_advertise_peer_urls",
                            what: "e.g. http://127.0.0.1:2380",
                        });
                    }
                }
            },
        }
        if let Some(key) = &cfg.key {
            // The client key is a secret like a password: owner-only, checked at start.
            ferry_core::secrets::read_secret_file(key).map_err(|e| {
                DatastoreConfigError::Secret {
                    field: "key".into(),
                    message: e.to_string(),
                }
            })?;
        }
        Ok(Self {
            password: ferry_core::secrets::user_password(
                cfg.user.as_deref(),
                cfg.password_file.as_deref(),
                cfg.password_env.as_deref(),
            )
            .map_err(DatastoreConfigError::secret)?,
            tools: ToolPaths::new(cfg.bin_dir.clone()),
            cfg,
        })
    }

    /// etcdctl with the v3 API, the connection flags and the credentials (environment).
    fn etcdctl(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(self.tools.path("etcdctl"));
        cmd.env("ETCDCTL_API", "3");
        // Never inherit credentials or endpoints from the agent's own environment.
        for var in ["ETCDCTL_USER", "ETCDCTL_PASSWORD", "ETCDCTL_ENDPOINTS"] {
            cmd.env_remove(var);
        }
        if let Some(e) = &self.cfg.endpoint {
            cmd.arg(format!("--endpoints={e}"));
        }
        for (flag, v) in [
            ("--cacert", &self.cfg.cacert),
            ("--cert", &self.cfg.cert),
            ("--key", &self.cfg.key),
        ] {
            if let Some(p) = v {
                cmd.arg(format!("{flag}={}", p.display()));
            }
        }
        if let Some(user) = &self.cfg.user {
            let secret = match &self.password {
                Some(p) => format!("{user}:{}", p.0),
                None => user.clone(),
            };
            cmd.env("ETCDCTL_USER", secret);
        }
        cmd.kill_on_drop(true);
        cmd
    }

    /// Runs etcdctl with `args`; its stdout.
    async fn run(&self, args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, ToolError> {
        let mut cmd = self.etcdctl();
        cmd.args(args);
        super::common::tool::output(cmd).await
    }

    /// `etcdctl snapshot status FILE -w json`.
    async fn status(&self, file: &Path) -> Result<SnapshotStatus, ToolError> {
        let out = self
            .run(&[
                "snapshot".as_ref(),
                "status".as_ref(),
                file.as_os_str(),
                "-w".as_ref(),
                "json".as_ref(),
            ])
            .await?;
        serde_json::from_slice(&out).map_err(|e| {
            ToolError::Output(format!(
                "unexpected output {:?}: {e}",
                String::from_utf8_lossy(&out)
            ))
        })
    }
}

impl Etcd {
    /// Staging: puts right the siblings of `data_dir` left by interrupted restores (see
    /// [`super::common::leftovers`]), skipping the jobs in `skip`: the snapshot file is
    /// removed, the new and old data directories put right by the swap's plan.
    ///
    /// # Errors
    /// [`RestoreError::Target`]: the parent of `data_dir` cannot be listed.
    pub async fn recover(&self, skip: &[String]) -> Result<Vec<Recovered>, RestoreError> {
        let Some(dir) = self.cfg.data_dir.clone() else {
            return Ok(Vec::new());
        };
        let skip = skip.to_vec();
        tokio::task::spawn_blocking(move || {
            super::common::leftovers::recover_dir(&dir, &["snapshot"], &skip).map_err(|e| {
                RestoreError::Target(format!(
                    "cannot list the parent of {} for leftovers: {e}",
                    dir.display()
                ))
            })
        })
        .await
        .map_err(|e| RestoreError::Target(e.to_string()))?
    }
}

impl Datastore for Etcd {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn kind(&self) -> &'static str {
        "etcd"
    }

    /// `etcdctl version`'s first line.
    fn tool_versions(&self) -> Vec<(String, String)> {
        let v = self.tools.version_with("etcdctl", &["version"]);
        vec![("etcdctl".into(), v)]
    }

    /// Production: the member's status; staging: where the data directory is.
    ///
    /// # Errors
    /// etcdctl's error, or a missing parent directory.
    fn check(&self) -> BoxFuture<'_, Result<String, CheckError>> {
        async move {
            if let Some(dir) = &self.cfg.data_dir {
                super::common::tree::refuse_mount_point(dir, "data_dir")
                    .map_err(|e| CheckError::Path(e.to_string()))?;
                return if dir.parent().is_some_and(Path::is_dir) {
                    Ok(format!("restores into {}", dir.display()))
                } else {
                    Err(CheckError::Path(format!(
                        "the parent of {} does not exist",
                        dir.display()
                    )))
                };
            }
            let out = self
                .run(&[
                    "endpoint".as_ref(),
                    "status".as_ref(),
                    "-w".as_ref(),
                    "table".as_ref(),
                ])
                .await
                .map_err(|failure| CheckError::Tool {
                    tool: "etcdctl endpoint status".into(),
                    failure,
                })?;
            Ok(String::from_utf8_lossy(&out).trim().to_owned())
        }
        .boxed()
    }

    fn mode(&self) -> Mode<'_> {
        Mode::streamed(self)
    }

    /// See [`Etcd::recover`].
    fn recover_leftovers<'a>(
        &'a self,
        skip: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Recovered>, RestoreError>> {
        self.recover(skip).boxed()
    }
}

impl Dumper for Etcd {
    fn parts(&self) -> &'static [Part] {
        &[MAIN]
    }

    fn dump<'a>(&'a self, _part: &'a Part) -> BoxFuture<'a, Result<DumpStream, DumpError>> {
        async move {
            let scratch = self
                .cfg
                .scratch_dir
                .clone()
                .unwrap_or_else(std::env::temp_dir);
            let dir = tempfile::Builder::new()
                .prefix("ferry-etcd-")
                .tempdir_in(&scratch)
                .map_err(|e| {
                    DumpError::Source(format!(
                        "cannot create a directory in {}: {e}",
                        scratch.display()
                    ))
                })?;
            let file = dir.path().join("snapshot.db");
            self.run(&["snapshot".as_ref(), "save".as_ref(), file.as_os_str()])
                .await
                .map_err(DumpError::tool("etcdctl snapshot save"))?;
            let status = self
                .status(&file)
                .await
                .map_err(DumpError::tool("etcdctl snapshot status"))?;
            // User-visible keys at exactly the snapshot's revision (`totalKey` counts the
            // database's internal keys too). None if the revision was compacted since.
            let keys = self
                .run(&[
                    "get".as_ref(),
                    "".as_ref(),
                    "--from-key".as_ref(),
                    "--keys-only".as_ref(),
                    // The response's `count` is the whole range's, whatever the limit.
                    "--limit=1".as_ref(),
                    format!("--rev={}", status.revision).as_ref(),
                    "-w".as_ref(),
                    "json".as_ref(),
                ])
                .await
                .ok()
                .and_then(|out| serde_json::from_slice::<serde_json::Value>(&out).ok())
                .and_then(|v| v["count"].as_u64().or(Some(0)));
            // Open, then remove the directory: the open file stays readable, and nothing
            // is left behind whatever happens to the stream.
            let reader = fs::File::open(&file)
                .map_err(|e| DumpError::Source(format!("{}: {e}", file.display())))?;
            drop(dir);
            let server_version = self
                .tool_versions()
                .into_iter()
                .next()
                .map(|(_, v)| v)
                .unwrap_or_default();
            let outcome = DumpOutcome {
                source: Source {
                    tool: "etcdctl snapshot save".into(),
                    tool_version: server_version.clone(),
                    server_version: String::new(),
                },
                counts: {
                    let mut v = serde_json::to_value(status).unwrap_or_default();
                    v["keys"] = serde_json::json!(keys);
                    v
                },
                summary: format!(
                    "snapshot at revision {}, {} keys, {} bytes, hash {:#010x}",
                    status.revision,
                    keys.map_or_else(|| "?".to_owned(), |k| k.to_string()),
                    status.total_size,
                    status.hash
                ),
            };
            Ok(DumpStream {
                reader: Box::new(reader),
                finish: async move { Ok(outcome) }.boxed(),
            })
        }
        .boxed()
    }
}

impl Restorer for Etcd {
    /// The snapshot is written to a local file; `etcdctl snapshot restore` runs at commit.
    fn stages_part(&self, _manifest: &Manifest) -> bool {
        true
    }

    fn begin<'a>(
        &'a self,
        main: &'a Manifest,
        job_id: &'a str,
        namespaces: &'a [String],
    ) -> BoxFuture<'a, Result<Box<dyn RestoreSession>, RestoreError>> {
        async move {
            let expected: SnapshotStatus =
                super::expect_whole(main, "etcd", &MAIN, "an etcd snapshot", namespaces)?;
            let data_dir = self.cfg.data_dir.clone().unwrap_or_default();
            super::common::tree::refuse_mount_point(&data_dir, "data_dir")?;
            if in_use(&data_dir) {
                return Err(in_use_error(&data_dir));
            }
            // The snapshot file, then the data directory made from it.
            super::common::tree::ensure_room(&data_dir, main.bytes_uncompressed.saturating_mul(2))?;
            Ok(Box::new(EtcdRestore {
                etcd: self.clone(),
                snapshot: super::common::tree::sibling(&data_dir, "snapshot", job_id),
                new: super::common::tree::sibling(&data_dir, "new", job_id),
                old: super::common::tree::sibling(&data_dir, "old", job_id),
                expected,
            }) as Box<dyn RestoreSession>)
        }
        .boxed()
    }
}

/// An etcd restore in progress: the snapshot file, then the new data directory.
struct EtcdRestore {
    etcd: Etcd,
    snapshot: PathBuf,
    new: PathBuf,
    old: PathBuf,
    expected: SnapshotStatus,
}

impl RestoreSession for EtcdRestore {
    fn part<'a>(
        &'a mut self,
        _manifest: &'a Manifest,
    ) -> BoxFuture<'a, Result<PartSink, RestoreError>> {
        async move {
            let file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&self.snapshot)
                .map_err(|e| {
                    RestoreError::Target(format!("cannot create {}: {e}", self.snapshot.display()))
                })?;
            Ok(PartSink {
                writer: Box::new(file),
                finish: async { Ok(()) }.boxed(),
            })
        }
        .boxed()
    }

    fn commit<'a>(
        &'a mut self,
        _main: &'a Manifest,
    ) -> BoxFuture<'a, Result<String, RestoreError>> {
        async move {
            let got = self
                .etcd
                .status(&self.snapshot)
                .await
                .map_err(RestoreError::tool("etcdctl snapshot status"))?;
            if got != self.expected {
                return Err(RestoreError::Mismatch(format!(
                    "the manifest says revision {} with {} database keys (hash {:#010x}), the snapshot has revision {} with {} database keys (hash {:#010x})",
                    self.expected.revision,
                    self.expected.total_key,
                    self.expected.hash,
                    got.revision,
                    got.total_key,
                    got.hash
                )));
            }
            let cfg = &self.etcd.cfg;
            let name = cfg.member_name.clone().unwrap_or_else(|| "default".into());
            let mut args: Vec<std::ffi::OsString> = vec![
                "snapshot".into(),
                "restore".into(),
                self.snapshot.clone().into(),
                "--data-dir".into(),
                self.new.clone().into(),
                format!("--name={name}").into(),
            ];
            if let Some(c) = &cfg.initial_cluster {
                args.push(format!("--initial-cluster={c}").into());
            }
            if let Some(u) = &cfg.initial_advertise_peer_urls {
                args.push(format!("--initial-advertise-peer-urls={u}").into());
            }
            let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
            self.etcd
                .run(&refs)
                .await
                .map_err(RestoreError::tool("etcdctl snapshot restore"))?;
            let _ = fs::remove_file(&self.snapshot);
            let target = cfg.data_dir.clone().unwrap_or_default();
            let (new, old) = (self.new.clone(), self.old.clone());
            tokio::task::spawn_blocking(move || swap_in(&new, &old, &target))
                .await
                .map_err(|e| RestoreError::Target(e.to_string()))??;
            Ok(format!(
                "{}: revision {}, {} database keys, equal to the manifest; start etcd on it",
                cfg.data_dir.clone().unwrap_or_default().display(),
                got.revision,
                got.total_key
            ))
        }
        .boxed()
    }

    fn abort<'a>(&'a mut self) -> BoxFuture<'a, ()> {
        async move {
            let _ = fs::remove_file(&self.snapshot);
            let _ = fs::remove_dir_all(&self.new);
        }
        .boxed()
    }
}

/// Whether a running etcd holds `data_dir`: a WAL file there is locked. etcd locks its
/// WAL with open-file-description locks (`F_OFD_SETLK`, etcd's `pkg/fileutil`), which do
/// not conflict with `flock`, so the check reads the kernel's lock table, `/proc/locks`
/// (proc(5)), and looks for the WAL files' device and inode.
fn in_use(data_dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = fs::read_dir(data_dir.join("member/wal")) else {
        return false;
    };
    let wal: Vec<(u64, u64, u64)> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "wal"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| {
            let dev = m.dev();
            let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
            let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
            (major, minor, m.ino())
        })
        .collect();
    let locks = fs::read_to_string("/proc/locks").unwrap_or_default();
    locks_name(&locks, &wal)
}

/// Whether the `/proc/locks` text `locks` has a lock on any of `files` (`(major, minor,
/// inode)`; the table writes `MAJOR:MINOR:INODE`, the device numbers in hexadecimal).
fn locks_name(locks: &str, files: &[(u64, u64, u64)]) -> bool {
    locks.lines().any(|line| {
        line.split_whitespace().any(|field| {
            let mut parts = field.split(':');
            let (Some(ma), Some(mi), Some(ino), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return false;
            };
            let parsed = (
                u64::from_str_radix(ma, 16),
                u64::from_str_radix(mi, 16),
                ino.parse::<u64>(),
            );
            matches!(parsed, (Ok(a), Ok(b), Ok(c)) if files.contains(&(a, b, c)))
        })
    })
}

fn in_use_error(data_dir: &Path) -> RestoreError {
    RestoreError::Target(format!(
        "etcd is running on {} (its WAL is locked): stop the member and restore again; {} is unchanged",
        data_dir.display(),
        data_dir.display()
    ))
}

/// Puts `new` in place of `target` ([`super::common::tree::replace_dir`]), unless etcd is running
/// on `target`.
fn swap_in(new: &Path, old: &Path, target: &Path) -> Result<(), RestoreError> {
    if in_use(target) {
        return Err(in_use_error(target));
    }
    super::common::tree::replace_dir(new, old, target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staging(data_dir: &Path) -> Etcd {
        let cfg: EtcdConfig = toml::from_str(&format!(
            "name = \"etcd\"\ndata_dir = {:?}\ninitial_cluster = \"default=http://127.0.0.1:2380\"\n\
             initial_advertise_peer_urls = \"http://127.0.0.1:2380\"\n",
            data_dir.display().to_string()
        ))
        .unwrap();
        Etcd::build(cfg, Role::Staging).unwrap()
    }

    #[tokio::test]
    async fn a_restore_killed_in_its_swap_is_finished_and_its_snapshot_removed() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("default");
        let job = "01JAAAAAAAAAAAAAAAAAAAAAAA";
        let sibling = |what| crate::datastore::common::tree::sibling(&data, what, job);
        // Killed between moving the member's data aside and moving the restored one in.
        fs::create_dir_all(sibling("old").join("member/wal")).unwrap();
        fs::write(sibling("old").join("member/wal/0.wal"), "previous").unwrap();
        fs::create_dir_all(sibling("new").join("member/wal")).unwrap();
        fs::write(sibling("new").join("member/wal/0.wal"), "restored").unwrap();
        fs::write(sibling("snapshot"), "snapshot").unwrap();
        let etcd = staging(&data);
        let done = etcd.recover(&[]).await.unwrap();
        let actions: Vec<&str> = done.iter().map(|r| r.action_name()).collect();
        assert_eq!(actions, ["removed", "swapped_in", "removed"], "{done:?}");
        assert_eq!(
            fs::read_to_string(data.join("member/wal/0.wal")).unwrap(),
            "restored"
        );
        let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
        // A job running in this agent is left alone.
        fs::write(sibling("snapshot"), "in progress").unwrap();
        assert!(etcd.recover(&[job.to_owned()]).await.unwrap().is_empty());
        assert!(sibling("snapshot").exists());
    }

    #[test]
    fn a_lock_on_the_wal_is_found_in_the_lock_table() {
        let table = "1: OFDLCK ADVISORY  WRITE -1 fd:01:1051234 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 812 00:19:77 0 EOF\n";
        assert!(locks_name(table, &[(0xfd, 1, 1_051_234)]));
        assert!(locks_name(table, &[(0, 0x19, 77)]));
        assert!(!locks_name(table, &[(0xfd, 1, 1_051_235)]));
        assert!(!locks_name("", &[(0xfd, 1, 1_051_234)]));
    }
}
