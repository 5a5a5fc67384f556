//! The agent's TOML config (`agent.toml`) and its validation.
//!
//! Shape (every key documented in README.md, unknown keys refused):
//!
//! ```toml
//! id = "pg-prod"
//! role = "production"            # or "staging"
//! environment = "production"
//! listen = "127.0.0.1:7443"
//! [tls]                          # own certificate and key, fleet CA (PEM)
//! cert = "..."; key = "..."; ca = "..."
//! [backup_server]
//! host = "backup.example"; port = 22; user = "ferry"
//! private_key_file = "..."; host_key = "ssh-ed25519 AAAA..."; root = "/srv/ferry"
//! [copies.offsite]             # staging: a copy target to read when the primary is down
//! kind = "s3"; endpoint = "https://s3.example"; bucket = "ferry-copy"; ...
//! [encryption]
//! recipients = ["age1..."]       # production only
//! identity_file = "..."          # staging only
//! [restore]                      # staging only
//! source_environment = "production"
//! [wal]                          # the socket of `ferry-agent wal-push` (production), `wal-get` (staging)
//! socket = "/run/ferry-agent/wal.sock"; group = "postgres"
//! agent_binary = "/usr/local/bin/ferry-agent"  # staging: what restore_command runs
//! [[datastores]]
//! name = "postgres"; kind = "postgres"; ...
//! ```
//!
//! [`AgentConfig::load`] reads and parses; [`AgentConfig::build`] checks everything that
//! can be checked without the network and returns the runtime [`Settings`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_proto::Role;
use ferry_proto::tls::TlsFiles;
use serde::Deserialize;

use crate::datastore::{self, Datastore, DatastoreConfig};
use crate::pipeline::encrypt::{Decryption, Encryption};
use ferry_core::config::ConfigError;
use ferry_core::layout::{self, NameError};
use ferry_storage::{Target, TargetConfig};

/// The agent's role as written in config.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RoleConfig {
    /// Backup only.
    Production,
    /// Restore only.
    Staging,
}

impl From<RoleConfig> for Role {
    fn from(r: RoleConfig) -> Self {
        match r {
            RoleConfig::Production => Role::Production,
            RoleConfig::Staging => Role::Staging,
        }
    }
}

/// `[tls]`: this agent's certificate and key, and the fleet CA, PEM files.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate, PEM.
    pub cert: PathBuf,
    /// Private key, PEM.
    pub key: PathBuf,
    /// Fleet CA certificate, PEM.
    pub ca: PathBuf,
    /// The certificate names (CN) whose orders this agent takes: the coordinator's. Any
    /// other certificate of the fleet (an operator's, another agent's) is refused with
    /// `PERMISSION_DENIED`, so every order goes through the coordinator, its checks and
    /// its audit log. Default: `["coordinator"]`.
    #[serde(default = "default_allowed_clients")]
    pub allowed_clients: Vec<String>,
}

fn default_allowed_clients() -> Vec<String> {
    vec!["coordinator".into()]
}

/// `[encryption]`: recipients on production, the identity on staging.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// age X25519 recipients (`age1...`); production only.
    #[serde(default)]
    pub recipients: Vec<String>,
    /// An age identity file (`AGE-SECRET-KEY-1...`, as written by `ferry-agent keygen` or
    /// `age-keygen`); staging only.
    pub identity_file: Option<PathBuf>,
}

/// `[restore]`: where a staging agent restores from.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    /// The environment whose backups are restored, e.g. `production`.
    pub source_environment: String,
}

/// `[wal]`: the Unix socket that `ferry-agent wal-push` (production, PostgreSQL's
/// `archive_command`) hands WAL files to, or `ferry-agent wal-get` (staging, a restored
/// cluster's `restore_command`) reads them from ([`crate::wal`]).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalConfig {
    /// The socket's path, absolute. Default `/run/ferry-agent/wal.sock`.
    #[serde(default = "default_wal_socket")]
    pub socket: PathBuf,
    /// The OS group given the socket (mode 0660): the PostgreSQL OS user's, e.g.
    /// `postgres`, from `/etc/group`.
    pub group: String,
    /// Staging: the `ferry-agent` binary a restored cluster's `restore_command` runs as
    /// `<agent_binary> wal-get` (absolute; the PostgreSQL OS user must be able to run it).
    /// Default: this agent's own executable.
    #[serde(default)]
    pub agent_binary: Option<PathBuf>,
}

/// Where `[wal] socket` and `ferry-agent wal-push --socket` default to.
pub const DEFAULT_WAL_SOCKET: &str = "/run/ferry-agent/wal.sock";

fn default_wal_socket() -> PathBuf {
    PathBuf::from(DEFAULT_WAL_SOCKET)
}

/// The whole `agent.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This agent's id; must match the name in its certificate and the coordinator's inventory.
    pub id: String,
    /// `production` or `staging`.
    pub role: RoleConfig,
    /// The environment this host belongs to; backups go under `<root>/<environment>/`.
    pub environment: String,
    /// gRPC listen address, e.g. `0.0.0.0:7443`.
    pub listen: SocketAddr,
    /// mTLS files.
    pub tls: TlsConfig,
    /// The storage target backups are written to or read from (`kind = "sftp"`, the
    /// default: the backup server reached over SSH).
    pub backup_server: TargetConfig,
    /// Staging: the copy targets (`copy_to` in coordinator.toml) by name, with read
    /// credentials: a restore or verify reads one when asked (`ferry restore --from
    /// NAME`) or when `[backup_server]` cannot be reached. Names as in coordinator.toml's
    /// `[copies]`; `primary` is `[backup_server]`'s.
    #[serde(default)]
    pub copies: BTreeMap<String, TargetConfig>,
    /// Recipients or identity.
    #[serde(default)]
    pub encryption: EncryptionConfig,
    /// Staging only.
    pub restore: Option<RestoreConfig>,
    /// The datastores on this host.
    #[serde(default)]
    pub datastores: Vec<DatastoreConfig>,
    /// At most this many jobs run at once (one per datastore in any case); orders beyond
    /// it are accepted and wait their turn, reported at stage `waiting`. Bounds the SSH
    /// sessions to the backup server and the load on this host. Default 4.
    #[serde(default = "default_max_concurrent_jobs")]
    pub max_concurrent_jobs: usize,
    /// WAL shipping's socket.
    pub wal: Option<WalConfig>,
    /// zstd worker threads compressing backups beside their stages threads, 0 to
    /// [`crate::pipeline::compress::MAX_WORKERS`], shared by the backups running at once
    /// (the first takes them, the others compress in their stages threads until they are
    /// free again: [`crate::pipeline::compress::WorkerPool`]); 0: the stages thread
    /// compresses ([`crate::pipeline::compress::Compressor::new`] gives each one's memory). Default:
    /// 0 when `[backup_server]` is S3, whose 3 parts in flight hold 24 MiB, so that a backup
    /// stays under 64 MiB; 2 otherwise, since the stages thread alone made the SFTP pipeline
    /// slower (`bench/README.md`, s3-upload). Fixed, not the host's cores: the memory is
    /// the same on every host.
    pub compression_workers: Option<u32>,
    /// The zstd level of backups, WAL segments and oplog slices,
    /// [`crate::pipeline::compress::MIN_LEVEL`] (1) to
    /// [`crate::pipeline::compress::MAX_LEVEL`] (9); default
    /// [`crate::pipeline::compress::LEVEL`] (3), as pgBackRest's `compress-level` for zst.
    /// Lower levels take less CPU and store more (on `bench/` pg-pipeline's dump, level 1
    /// compresses about 1.6 times as fast as 3 and stores 2 % more); higher ones the
    /// reverse, and hold more memory than the agent's bound of 64 MiB allows with several
    /// backups at once ([`crate::pipeline::compress::MAX_LEVEL`]). Restores read every
    /// level; the level is not recorded.
    pub compression_level: Option<i32>,
    /// Where the agent keeps what must outlive a restart: where each MongoDB datastore's
    /// chain of oplog slices has reached (`oplog_slice_seconds`). Absolute; created with
    /// mode 0700 when missing. Default `/var/lib/ferry-agent`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
}

/// Where `state_dir` defaults to.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ferry-agent";

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

/// `compression_workers` as asked, or its default for a `[backup_server]` of `kind` (0 for
/// `s3`, 2 otherwise; see [`AgentConfig::compression_workers`]).
///
/// # Errors
/// A message for more than [`crate::pipeline::compress::MAX_WORKERS`].
fn compression_workers(asked: Option<u32>, kind: &str) -> Result<u32, String> {
    match asked {
        Some(n) if n > crate::pipeline::compress::MAX_WORKERS => Err(format!(
            "is {n}: at most {} (each worker adds about 6 MiB)",
            crate::pipeline::compress::MAX_WORKERS
        )),
        Some(n) => Ok(n),
        None if kind == "s3" => Ok(0),
        None => Ok(2),
    }
}

/// `compression_level` as asked, or [`crate::pipeline::compress::LEVEL`].
///
/// # Errors
/// A message for a level outside [`crate::pipeline::compress::MIN_LEVEL`] to
/// [`crate::pipeline::compress::MAX_LEVEL`].
fn compression_level(asked: Option<i32>) -> Result<i32, String> {
    use crate::pipeline::compress::{LEVEL, MAX_LEVEL, MIN_LEVEL};
    match asked {
        None => Ok(LEVEL),
        Some(n) if (MIN_LEVEL..=MAX_LEVEL).contains(&n) => Ok(n),
        Some(n) => Err(format!(
            "is {n}: zstd levels {MIN_LEVEL} to {MAX_LEVEL} (default {LEVEL}; higher levels hold more memory than the agent's bound allows)"
        )),
    }
}

fn default_max_concurrent_jobs() -> usize {
    4
}

/// Which key material this agent holds: recipients to encrypt (production) or the
/// identity to decrypt (staging). Never both.
pub enum Keys {
    /// Production: public keys only.
    Encrypt(Encryption),
    /// Staging: the identity.
    Decrypt(Decryption),
}

/// The validated runtime settings built from [`AgentConfig`].
pub struct Settings {
    /// Agent id.
    pub id: String,
    /// Role.
    pub role: Role,
    /// Environment.
    pub environment: String,
    /// This host's name, for manifests.
    pub hostname: String,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// mTLS files.
    pub tls: TlsFiles,
    /// Certificate names whose orders are taken (`tls.allowed_clients`).
    pub allowed_clients: Vec<String>,
    /// `max_concurrent_jobs`: jobs running at once.
    pub max_concurrent_jobs: usize,
    /// The storage target (the backup server).
    pub backup_server: Arc<dyn Target>,
    /// Staging: the copy targets, `(name, target)` in name order.
    pub copies: Vec<(String, Arc<dyn Target>)>,
    /// Key material for this role.
    pub keys: Keys,
    /// Staging: the environment restored from.
    pub source_environment: Option<String>,
    /// Datastores by name, in config order.
    pub datastores: BTreeMap<String, Arc<dyn Datastore>>,
    /// WAL shipping's socket (`[wal]`).
    pub wal: Option<crate::wal::WalSettings>,
    /// `compression_workers` (or its default for `[backup_server]`'s kind): the zstd
    /// workers shared by the backups running at once.
    pub compression_workers: crate::pipeline::compress::WorkerPool,
    /// `compression_level` (or its default, 3): the zstd level of everything the agent
    /// stores.
    pub compression_level: i32,
    /// `state_dir`.
    pub state_dir: PathBuf,
}

impl Settings {
    /// Whether `datastore` may be restored to a point in time here: on a staging agent, a
    /// datastore that replays oplog slices (MongoDB), or with `[wal]` (the restored
    /// cluster's `restore_command` fetches WAL through its socket) a datastore that
    /// archives WAL (physical PostgreSQL).
    pub fn point_in_time(&self, datastore: &dyn Datastore) -> bool {
        self.role.may_restore()
            && (datastore.replays_oplog() || (self.wal.is_some() && datastore.archives_wal()))
    }
}

#[cfg(test)]
impl Settings {
    /// Settings for unit tests: a production agent `agent` of environment `production`
    /// writing to `backup_server` with `keys`, one job at a time, no clients, copies,
    /// datastores or `[wal]`, and certificate paths that do not exist. Tests change the
    /// fields they need with struct update syntax.
    pub(crate) fn for_tests(backup_server: Arc<dyn Target>, keys: Keys) -> Settings {
        Settings {
            id: "agent".into(),
            role: Role::Production,
            environment: "production".into(),
            hostname: "host".into(),
            listen: "127.0.0.1:0".parse().expect("a socket address"),
            tls: TlsFiles {
                cert: "/nonexistent".into(),
                key: "/nonexistent".into(),
                ca: "/nonexistent".into(),
            },
            allowed_clients: Vec::new(),
            max_concurrent_jobs: 1,
            backup_server,
            copies: Vec::new(),
            keys,
            source_environment: None,
            datastores: BTreeMap::new(),
            wal: None,
            compression_workers: Default::default(),
            compression_level: crate::pipeline::compress::LEVEL,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
        }
    }
}

impl AgentConfig {
    /// Reads and parses `path`.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Parse`] (unknown keys, missing fields).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        ferry_core::config::load(path)
    }

    /// Parses TOML text read from `path` (used in messages).
    ///
    /// # Errors
    /// [`ConfigError::Parse`].
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        ferry_core::config::parse(path, text)
    }

    /// Validates every field that can be checked locally (names, role rules, key files
    /// and their modes, datastore settings) and builds the runtime [`Settings`].
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the field.
    pub fn build(self, path: &Path) -> Result<Settings, ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::invalid(path, field, message);
        let name_err = |field: &str, e: NameError| invalid(field, e.to_string());
        layout::validate_name("agent id", &self.id).map_err(|e| name_err("id", e))?;
        layout::validate_name("environment", &self.environment)
            .map_err(|e| name_err("environment", e))?;
        let role = Role::from(self.role);

        let keys = match role {
            Role::Production => {
                if self.encryption.identity_file.is_some() {
                    return Err(invalid(
                        "encryption.identity_file",
                        "a production agent must not hold the identity (the private key); \
                         give it only `recipients`"
                            .into(),
                    ));
                }
                if self.restore.is_some() {
                    return Err(invalid(
                        "restore",
                        "a production agent may not restore; remove the [restore] table".into(),
                    ));
                }
                Keys::Encrypt(
                    Encryption::from_recipients(&self.encryption.recipients)
                        .map_err(|e| invalid("encryption.recipients", e.to_string()))?,
                )
            }
            Role::Staging => {
                if !self.encryption.recipients.is_empty() {
                    return Err(invalid(
                        "encryption.recipients",
                        "a staging agent may not back up; remove `recipients` and set `identity_file`"
                            .into(),
                    ));
                }
                let file = self.encryption.identity_file.as_ref().ok_or_else(|| {
                    invalid(
                        "encryption.identity_file",
                        "a staging agent needs the age identity file to decrypt backups".into(),
                    )
                })?;
                Keys::Decrypt(
                    Decryption::from_identity_file(file)
                        .map_err(|e| invalid("encryption.identity_file", e.to_string()))?,
                )
            }
        };
        let source_environment = match (role, &self.restore) {
            (Role::Staging, Some(r)) => {
                layout::validate_name("environment", &r.source_environment)
                    .map_err(|e| name_err("restore.source_environment", e))?;
                Some(r.source_environment.clone())
            }
            (Role::Staging, None) => {
                return Err(invalid(
                    "restore",
                    "a staging agent needs [restore] source_environment = \"...\"".into(),
                ));
            }
            _ => None,
        };
        let backup_server = self
            .backup_server
            .build()
            .map_err(|e| invalid(&format!("backup_server.{}", e.field()), e.to_string()))?;
        if role == Role::Production && !self.copies.is_empty() {
            return Err(invalid(
                "copies",
                "a production agent writes only to [backup_server]; the coordinator makes the \
                 copies (copy_to): remove the [copies] tables"
                    .into(),
            ));
        }
        let mut copies = Vec::new();
        for (name, config) in &self.copies {
            ferry_storage::validate_target_name(name)
                .map_err(|e| invalid(&format!("copies.{}", ferry_core::Bounded(name)), e))?;
            let target = config
                .build()
                .map_err(|e| invalid(&format!("copies.{name}.{}", e.field()), e.to_string()))?;
            copies.push((name.clone(), target));
        }
        ferry_proto::tls::read_private_key(&self.tls.key)
            .map_err(|e| invalid("tls.key", e.to_string()))?;
        let compression_workers =
            compression_workers(self.compression_workers, self.backup_server.kind())
                .map_err(|m| invalid("compression_workers", m))?;
        let compression_level = compression_level(self.compression_level)
            .map_err(|m| invalid("compression_level", m))?;
        if self.max_concurrent_jobs == 0 {
            return Err(invalid(
                "max_concurrent_jobs",
                "must be at least 1 (the default is 4)".into(),
            ));
        }
        if self.tls.allowed_clients.is_empty() {
            return Err(invalid(
                "tls.allowed_clients",
                "is empty: no certificate could order this agent (the default is [\"coordinator\"])"
                    .into(),
            ));
        }

        let mut datastores = BTreeMap::new();
        for (i, ds) in self.datastores.into_iter().enumerate() {
            let field = format!("datastores[{i}]");
            let built = datastore::build(ds, role)
                .map_err(|e| invalid(&format!("{field}.{}", e.field()), e.to_string()))?;
            let name = built.name().to_owned();
            if datastores.insert(name.clone(), built).is_some() {
                return Err(invalid(
                    &format!("{field}.name"),
                    format!("datastore {name:?} is configured twice"),
                ));
            }
        }

        let wal = match &self.wal {
            None => None,
            Some(w) => {
                if !w.socket.is_absolute() || w.socket.file_name().is_none() {
                    return Err(invalid(
                        "wal.socket",
                        format!("{} is not an absolute file path", w.socket.display()),
                    ));
                }
                if !datastores.values().any(|d| d.archives_wal()) {
                    return Err(invalid(
                        "wal",
                        "no datastore archives WAL: [wal] needs a datastore with kind = \"postgres\" \
                         and method = \"physical\""
                            .into(),
                    ));
                }
                let gid = datastore::common::tool::os_group_id(&w.group)
                    .map_err(|e| invalid("wal.group", e.to_string()))?;
                let agent_binary = match &w.agent_binary {
                    Some(p) if !p.is_absolute() => {
                        return Err(invalid(
                            "wal.agent_binary",
                            format!("{} is not an absolute path", p.display()),
                        ));
                    }
                    Some(p) => p.clone(),
                    None => std::env::current_exe().map_err(|e| {
                        invalid("wal.agent_binary", format!("this agent's own path: {e}"))
                    })?,
                };
                Some(crate::wal::WalSettings {
                    socket: w.socket.clone(),
                    gid,
                    agent_binary,
                })
            }
        };

        Ok(Settings {
            id: self.id,
            role,
            environment: self.environment,
            hostname: hostname(),
            listen: self.listen,
            tls: TlsFiles {
                cert: self.tls.cert,
                key: self.tls.key,
                ca: self.tls.ca,
            },
            allowed_clients: self.tls.allowed_clients,
            max_concurrent_jobs: self.max_concurrent_jobs,
            compression_workers: crate::pipeline::compress::WorkerPool::new(compression_workers),
            compression_level,
            state_dir: self.state_dir.clone(),
            backup_server,
            copies,
            keys,
            source_environment,
            datastores,
            wal,
        })
    }
}

pub use ferry_core::config::hostname;

#[cfg(test)]
mod tests {
    #[test]
    fn compression_workers_default_by_target_kind_and_are_bounded() {
        assert_eq!(super::compression_workers(None, "s3"), Ok(0));
        assert_eq!(super::compression_workers(None, "sftp"), Ok(2));
        assert_eq!(super::compression_workers(Some(3), "s3"), Ok(3));
        assert_eq!(super::compression_workers(Some(0), "sftp"), Ok(0));
        let e = super::compression_workers(Some(5), "sftp").unwrap_err();
        assert!(e.contains("at most 4"), "{e}");
    }

    #[test]
    fn compression_level_defaults_to_3_and_is_bounded() {
        assert_eq!(super::compression_level(None), Ok(3));
        assert_eq!(super::compression_level(Some(1)), Ok(1));
        assert_eq!(super::compression_level(Some(9)), Ok(9));
        for n in [0, -1, 10, 22] {
            let e = super::compression_level(Some(n)).unwrap_err();
            assert!(e.contains("levels 1 to 9"), "{n}: {e}");
        }
    }
}
