//! The coordinator's TOML config (`coordinator.toml`) and its validation.
//!
//! ```toml
//! listen = "0.0.0.0:7400"
//! store = "/var/lib/ferry/coordinator.redb"
//! agent_timeout_seconds = 60
//! archive_scan_seconds = 60      # how often the WAL archive's lag is read ([maintenance])
//! [tls]    cert = "..."  key = "..."  ca = "..."
//! [retry]  max_attempts = 3  initial_backoff_seconds = 30  max_backoff_seconds = 600
//! [[agents]]     id = "pg-prod"  address = "https://10.0.0.5:7443"  role = "production"  environment = "production"
//! [[operators]]  name = "alice"  role = "admin"
//! [[schedules]]  agent = "pg-prod"  datastore = "postgres"  kind = "backup"  cron = "0 2 * * *"
//! [[schedules]]  agent = "pg-stage"  kind = "restore"  cron = "0 6 * * *"  point_in_time = "random"
//! [self_backup]  escrow_recipients = ["age1..."]  cron = "0 15 3 * * *"  pki_dir = "/etc/ferry/pki"  keep_days = 30
//! ```
//!
//! Rejected at start, naming the entry: an unknown key, a schedule for an unknown agent,
//! a schedule contrary to its agent's role, one agent with both backup and restore
//! schedules, an unknown operator role, and an operator name that is also an agent's or the
//! coordinator's own certificate name.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ferry_core::config::ConfigError;
use ferry_core::layout;
use ferry_proto::Role;
use ferry_proto::tls::TlsFiles;
use serde::Deserialize;

use crate::access::OperatorRole;
use crate::model::JobKind;

/// `[tls]`: the coordinator's certificate and key, and the fleet CA (PEM).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate, PEM (issued for the name `coordinator`).
    pub cert: PathBuf,
    /// Private key, PEM.
    pub key: PathBuf,
    /// Fleet CA certificate, PEM.
    pub ca: PathBuf,
}

/// `[retry]`: how failed jobs are retried.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Tries in all, including the first (1 = never retry).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Wait before the first retry, seconds; doubled each time.
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff_seconds: u64,
    /// Longest wait between tries, seconds.
    #[serde(default = "default_max_backoff")]
    pub max_backoff_seconds: u64,
}

fn default_attempts() -> u32 {
    3
}
fn default_initial_backoff() -> u64 {
    30
}
fn default_max_backoff() -> u64 {
    600
}
fn default_agent_timeout() -> u64 {
    60
}

fn default_archive_scan() -> u64 {
    60
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: default_attempts(),
            initial_backoff_seconds: default_initial_backoff(),
            max_backoff_seconds: default_max_backoff(),
        }
    }
}

impl RetryConfig {
    /// The wait before try `attempt + 1`, after try `attempt` (from 1) failed.
    pub fn backoff(&self, attempt: u32) -> std::time::Duration {
        let factor = 1u64 << attempt.saturating_sub(1).min(20);
        std::time::Duration::from_secs(
            self.initial_backoff_seconds
                .saturating_mul(factor)
                .min(self.max_backoff_seconds),
        )
    }
}

/// The expected role as written in config.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RoleConfig {
    /// Backup only.
    Production,
    /// Restore only.
    Staging,
}

/// One `[[agents]]` entry: the inventory.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEntry {
    /// Agent id; also the name in its certificate, which the coordinator checks.
    pub id: String,
    /// `https://host:port` of its gRPC service.
    pub address: String,
    /// The role it must have.
    pub role: RoleConfig,
    /// The environment it must be in.
    pub environment: String,
}

/// One `[[operators]]` entry: a certificate allowed to use the coordinator's gRPC
/// service (the `ferry` CLI), and what it may do there (see [`crate::access`]).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorEntry {
    /// The common name of the operator's certificate (`ferry-coordinator pki issue --name`).
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
}

/// One `[[schedules]]` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleEntry {
    /// Agent id.
    pub agent: String,
    /// Datastore name; all of the agent's when absent.
    pub datastore: Option<String>,
    /// `backup` (production agents) or `restore` (staging agents).
    pub kind: JobKind,
    /// Cron expression, 5 or 6 fields, evaluated in UTC, e.g. `0 2 * * *`.
    pub cron: String,
    /// Backups of a pgBackRest datastore: `full` or `diff` (e.g. a weekly full and a
    /// daily diff as two schedules). Needs `datastore`.
    #[serde(rename = "type")]
    pub backup_type: Option<String>,
    /// Restores: `"random"` restores to an instant picked at random in the last 24 hours
    /// (a drill of point-in-time recovery, `ferry restore --to-time`); absent: the newest
    /// backups.
    pub point_in_time: Option<String>,
}

/// `[[retention]]`: the GFS policy of one environment's dated folders.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionEntry {
    /// The environment, e.g. `production`.
    pub environment: String,
    /// See [`crate::catalog::retention::Policy::keep_daily`].
    #[serde(default)]
    pub keep_daily: u32,
    /// See [`crate::catalog::retention::Policy::keep_weekly`].
    #[serde(default)]
    pub keep_weekly: u32,
    /// See [`crate::catalog::retention::Policy::keep_monthly`].
    #[serde(default)]
    pub keep_monthly: u32,
}

/// `[[environments]]`: what an environment has besides its agents.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentEntry {
    /// The environment, e.g. `production`.
    pub name: String,
    /// The copy targets (`[copies.<name>]`) that keep a copy of each of its backups
    /// (3-2-1), made by the coordinator from the primary (`[maintenance]`).
    #[serde(default)]
    pub copy_to: Vec<String>,
    /// `HH:MM` (UTC): by then each day its backup set is complete, else `set_incomplete`
    /// is notified ([`crate::notify`]).
    pub set_deadline: Option<String>,
}

/// The whole `coordinator.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// gRPC listen address for the CLI.
    pub listen: SocketAddr,
    /// Where Prometheus scrapes `GET /metrics` (plain HTTP); not served if absent.
    pub metrics_listen: Option<SocketAddr>,
    /// The redb file holding jobs and the catalog.
    pub store: PathBuf,
    /// A running job whose agent sends nothing for this long is failed, seconds.
    #[serde(default = "default_agent_timeout")]
    pub agent_timeout_seconds: u64,
    /// How often the WAL archive of every production environment is scanned for its newest
    /// segment (`ferry_archive_lag_seconds`, [`crate::catalog::archive`]), seconds; 1 to
    /// 3600, default 60.
    #[serde(default = "default_archive_scan")]
    pub archive_scan_seconds: u64,
    /// mTLS files.
    pub tls: TlsConfig,
    /// Retries.
    #[serde(default)]
    pub retry: RetryConfig,
    /// The inventory.
    #[serde(default)]
    pub agents: Vec<AgentEntry>,
    /// Who may use the gRPC service, and with which role; nobody else may.
    #[serde(default)]
    pub operators: Vec<OperatorEntry>,
    /// Retention policies of dated folders, one per environment.
    #[serde(default)]
    pub retention: Vec<RetentionEntry>,
    /// The storage target (the backup server) as the coordinator's maintenance job
    /// reaches it, with a key of its own that may delete (the agents' keys cannot): what
    /// `ferry prune` uses. `kind = "sftp"` (the default) and its keys.
    pub maintenance: Option<ferry_storage::TargetConfig>,
    /// Copy targets by name, with credentials that may read, write (new objects only on
    /// S3), delete and extend locks there: the coordinator copies backups to them from the
    /// primary (`[maintenance]`) for the environments whose `copy_to` names them, and
    /// prunes them with the same policy.
    #[serde(default)]
    pub copies: BTreeMap<String, ferry_storage::TargetConfig>,
    /// Per-environment settings (`copy_to`).
    #[serde(default)]
    pub environments: Vec<EnvironmentEntry>,
    /// Cron schedules.
    #[serde(default)]
    pub schedules: Vec<ScheduleEntry>,
    /// The coordinator's own backup ([`crate::state`]); none without it.
    pub self_backup: Option<SelfBackupConfig>,
    /// Webhooks ([`crate::notify`]).
    #[serde(default)]
    pub notify: Vec<crate::notify::NotifyEntry>,
}

/// `[self_backup]`: the coordinator's store, config and public PKI, encrypted to escrow
/// recipients and written to every target under `<root>/_ferry/<date>/` ([`crate::state`]).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfBackupConfig {
    /// age X25519 recipients (`age1...`) whose identities are kept offline: not the
    /// staging identity (a staging host must not read the coordinator's state).
    pub escrow_recipients: Vec<String>,
    /// When (a cron expression with seconds, UTC); default every night at 03:15:00.
    #[serde(default = "default_self_backup_cron")]
    pub cron: String,
    /// The fleet PKI directory (`ferry-coordinator pki init --dir`): its certificates
    /// (`*.pem`) go into the self-backup; its CA key (`ca.key`), if there, is escrowed in
    /// a file of its own.
    pub pki_dir: Option<PathBuf>,
    /// Days of self-backups kept on each target; older dated folders of `_ferry` are
    /// removed after each self-backup. Default 30, at least 1.
    #[serde(default = "default_self_backup_keep")]
    pub keep_days: u32,
}

fn default_self_backup_cron() -> String {
    "0 15 3 * * *".into()
}

fn default_self_backup_keep() -> u32 {
    30
}

/// A validated `[self_backup]`.
#[derive(Clone)]
pub struct SelfBackup {
    /// The escrow recipients.
    pub encryption: std::sync::Arc<ferry_core::crypto::Encryption>,
    /// The cron text.
    pub cron_text: String,
    /// Parsed cron.
    pub cron: croner::Cron,
    /// The fleet PKI directory, if given.
    pub pki_dir: Option<PathBuf>,
    /// Days kept.
    pub keep_days: u32,
    /// The config file the coordinator runs with (it goes into the self-backup).
    pub config_file: PathBuf,
}

impl std::fmt::Debug for SelfBackup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfBackup")
            .field("cron", &self.cron_text)
            .field("pki_dir", &self.pki_dir)
            .field("keep_days", &self.keep_days)
            .finish_non_exhaustive()
    }
}

/// A validated inventory agent.
#[derive(Clone, Debug)]
pub struct Agent {
    /// Id.
    pub id: String,
    /// gRPC endpoint.
    pub address: String,
    /// Expected role.
    pub role: Role,
    /// Expected environment.
    pub environment: String,
}

/// A validated schedule.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// Agent id.
    pub agent: String,
    /// Datastore, or all.
    pub datastore: Option<String>,
    /// Backup or restore.
    pub kind: JobKind,
    /// Backups: `full` or `diff` (pgBackRest), or the datastore's default.
    pub backup_type: Option<String>,
    /// Restores to a random instant of the last 24 hours (`point_in_time = "random"`).
    pub random_point_in_time: bool,
    /// The cron text.
    pub cron_text: String,
    /// Parsed cron.
    pub cron: croner::Cron,
}

/// Runtime settings built from [`CoordinatorConfig`].
#[derive(Clone, Debug)]
pub struct Settings {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// `GET /metrics` address, if served.
    pub metrics_listen: Option<SocketAddr>,
    /// Store file.
    pub store: PathBuf,
    /// Silence after which a running job is failed.
    pub agent_timeout: std::time::Duration,
    /// How often the WAL archive is scanned (`archive_scan_seconds`).
    pub archive_scan: std::time::Duration,
    /// mTLS files.
    pub tls: TlsFiles,
    /// Retries.
    pub retry: RetryConfig,
    /// Agents by id.
    pub agents: BTreeMap<String, Agent>,
    /// Operators' roles by certificate name.
    pub operators: BTreeMap<String, OperatorRole>,
    /// Schedules.
    pub schedules: Vec<Schedule>,
    /// The storage target with the maintenance credentials, if configured.
    pub maintenance: Option<std::sync::Arc<dyn ferry_storage::Target>>,
    /// Retention policy by environment.
    pub retention: BTreeMap<String, crate::catalog::retention::Policy>,
    /// Copy targets by name (`[copies.<name>]`).
    pub copies: BTreeMap<String, std::sync::Arc<dyn ferry_storage::Target>>,
    /// The copy targets of each environment (`copy_to`), by environment.
    pub copy_to: BTreeMap<String, Vec<String>>,
    /// The coordinator's own backup, if configured.
    pub self_backup: Option<SelfBackup>,
    /// The webhooks.
    pub notify: Vec<std::sync::Arc<crate::notify::Hook>>,
    /// Each environment's `set_deadline` (UTC time of day).
    pub set_deadlines: BTreeMap<String, chrono::NaiveTime>,
}

/// Why the common name of a certificate file could not be read ([`certificate_name`]).
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// The file cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no PEM block.
    #[error("{} holds no PEM certificate: {message}", path.display())]
    NotPem {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// The PEM block is not an X.509 certificate.
    #[error("{} holds no X.509 certificate: {message}", path.display())]
    NotX509 {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// The certificate's subject has no common name.
    #[error("the certificate in {} has no common name", path.display())]
    NoCommonName {
        /// The file.
        path: PathBuf,
    },
}

/// The common name of the certificate in the PEM file `path`, as
/// [`ferry_proto::tls::peer_name`] reads a peer's.
///
/// # Errors
/// [`CertificateError`] naming the file when it cannot be read, holds no certificate, or
/// the certificate has no common name.
pub fn certificate_name(path: &Path) -> Result<String, CertificateError> {
    let pem = std::fs::read(path).map_err(|source| CertificateError::Read {
        path: path.to_owned(),
        source,
    })?;
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(&pem).map_err(|e| CertificateError::NotPem {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    let cert = pem.parse_x509().map_err(|e| CertificateError::NotX509 {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| CertificateError::NoCommonName {
            path: path.to_owned(),
        })
}

impl CoordinatorConfig {
    /// Reads and parses `path`.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Parse`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        ferry_core::config::load(path)
    }

    /// Validates and builds the runtime [`Settings`].
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the entry.
    pub fn build(self, path: &Path) -> Result<Settings, ConfigError> {
        let invalid = |field: String, message: String| ConfigError::invalid(path, field, message);
        if self.agent_timeout_seconds == 0 {
            return Err(invalid(
                "agent_timeout_seconds".into(),
                "must be at least 1".into(),
            ));
        }
        if !(1..=3600).contains(&self.archive_scan_seconds) {
            return Err(invalid(
                "archive_scan_seconds".into(),
                format!("{} is not between 1 and 3600", self.archive_scan_seconds),
            ));
        }
        if self.retry.max_attempts == 0 {
            return Err(invalid(
                "retry.max_attempts".into(),
                "must be at least 1".into(),
            ));
        }
        ferry_proto::tls::read_private_key(&self.tls.key)
            .map_err(|e| invalid("tls.key".into(), e.to_string()))?;
        let own_name = certificate_name(&self.tls.cert)
            .map_err(|e| invalid("tls.cert".into(), e.to_string()))?;
        let maintenance = match &self.maintenance {
            Some(m) => Some(
                m.build()
                    .map_err(|e| invalid(format!("maintenance.{}", e.field()), e.to_string()))?,
            ),
            None => None,
        };
        let agent_ids: Vec<String> = self.agents.iter().map(|a| a.id.clone()).collect();
        let mut agents = BTreeMap::new();
        for (i, a) in self.agents.into_iter().enumerate() {
            layout::validate_name("agent id", &a.id)
                .map_err(|e| invalid(format!("agents[{i}].id"), e.to_string()))?;
            layout::validate_name("environment", &a.environment)
                .map_err(|e| invalid(format!("agents[{i}].environment"), e.to_string()))?;
            if !a.address.starts_with("https://")
                || a.address.parse::<tonic::transport::Uri>().is_err()
            {
                return Err(invalid(
                    format!("agents[{i}].address"),
                    format!(
                        "{:?} must be an https:// URL (agents serve mTLS only)",
                        a.address
                    ),
                ));
            }
            let agent = Agent {
                role: match a.role {
                    RoleConfig::Production => Role::Production,
                    RoleConfig::Staging => Role::Staging,
                },
                id: a.id.clone(),
                address: a.address,
                environment: a.environment,
            };
            if agents.insert(a.id.clone(), agent).is_some() {
                return Err(invalid(
                    format!("agents[{i}].id"),
                    format!("agent {:?} is listed twice", a.id),
                ));
            }
        }
        let mut operators = BTreeMap::new();
        for (i, o) in self.operators.into_iter().enumerate() {
            let field = format!("operators[{i}].name");
            crate::pki::validate_name(&o.name).map_err(|_| {
                invalid(
                    field.clone(),
                    format!(
                        "{} is not a certificate name `ferry-coordinator pki issue` makes: 1 to 64 \
                         characters of a-z, A-Z, 0-9, '.', '_' and '-', not starting with '.' or '-'",
                        ferry_core::Bounded(&o.name)
                    ),
                )
            })?;
            if let Some(j) = agent_ids.iter().position(|id| *id == o.name) {
                return Err(invalid(
                    field,
                    format!(
                        "{:?} is also an agent (agents[{j}].id): an agent's certificate is never an \
                         operator's; issue the operator a certificate of their own",
                        o.name
                    ),
                ));
            }
            if o.name == own_name {
                return Err(invalid(
                    field,
                    format!(
                        "{:?} is the coordinator's own certificate name (tls.cert): it is never an \
                         operator's; issue the operator a certificate of their own",
                        o.name
                    ),
                ));
            }
            let role = OperatorRole::parse(&o.role).ok_or_else(|| {
                invalid(
                    format!("operators[{i}].role"),
                    format!(
                        "{} is not a role: viewer (read only), operator (also backups and \
                         restores) or admin (also prune)",
                        ferry_core::Bounded(&o.role)
                    ),
                )
            })?;
            if operators.insert(o.name.clone(), role).is_some() {
                return Err(invalid(
                    field,
                    format!("operator {:?} is listed twice", o.name),
                ));
            }
        }
        let mut kinds: HashMap<String, (JobKind, usize)> = HashMap::new();
        let mut schedules = Vec::new();
        for (i, s) in self.schedules.into_iter().enumerate() {
            let agent = agents.get(&s.agent).ok_or_else(|| {
                invalid(
                    format!("schedules[{i}].agent"),
                    format!("agent {:?} is not in [[agents]]", s.agent),
                )
            })?;
            if let Some((other, j)) = kinds.get(&s.agent)
                && *other != s.kind
            {
                return Err(invalid(
                    format!("schedules[{i}].kind"),
                    format!(
                        "agent {:?} has a {} schedule here and a {other} schedule in schedules[{j}]; \
                         one agent never both backs up and restores",
                        s.agent, s.kind
                    ),
                ));
            }
            let allowed = match s.kind {
                JobKind::Backup => agent.role.may_backup(),
                JobKind::Restore | JobKind::Verify => agent.role.may_restore(),
            };
            if !allowed {
                return Err(invalid(
                    format!("schedules[{i}].kind"),
                    format!(
                        "a {} schedule for agent {:?}, whose role is {}: production agents only back up, \
                         staging agents only restore",
                        s.kind, s.agent, agent.role
                    ),
                ));
            }
            if let Some(ds) = &s.datastore {
                layout::validate_name("datastore", ds)
                    .map_err(|e| invalid(format!("schedules[{i}].datastore"), e.to_string()))?;
            }
            if let Some(t) = &s.backup_type {
                if !["full", "diff"].contains(&t.as_str()) {
                    return Err(invalid(
                        format!("schedules[{i}].type"),
                        format!("{t:?}: full or diff"),
                    ));
                }
                if s.kind != JobKind::Backup || s.datastore.is_none() {
                    return Err(invalid(
                        format!("schedules[{i}].type"),
                        "a backup type needs kind = \"backup\" and a datastore".into(),
                    ));
                }
            }
            let random_point_in_time = match s.point_in_time.as_deref() {
                None => false,
                Some("random") if s.kind == JobKind::Restore => true,
                Some(other) => {
                    return Err(invalid(
                        format!("schedules[{i}].point_in_time"),
                        format!(
                            "{}: only \"random\", on a restore schedule",
                            ferry_core::Bounded(other)
                        ),
                    ));
                }
            };
            let cron = croner::Cron::from_str(&s.cron).map_err(|e| {
                invalid(format!("schedules[{i}].cron"), format!("{:?}: {e}", s.cron))
            })?;
            kinds.insert(s.agent.clone(), (s.kind, i));
            schedules.push(Schedule {
                agent: s.agent,
                datastore: s.datastore,
                kind: s.kind,
                backup_type: s.backup_type,
                random_point_in_time,
                cron_text: s.cron,
                cron,
            });
        }
        for (i, r) in self.retention.iter().enumerate() {
            layout::validate_name("environment", &r.environment)
                .map_err(|e| invalid(format!("retention[{i}].environment"), e.to_string()))?;
        }
        let mut copies = BTreeMap::new();
        for (name, config) in &self.copies {
            let field = format!("copies.{}", ferry_core::Bounded(name));
            ferry_storage::validate_target_name(name).map_err(|e| invalid(field.clone(), e))?;
            let target = config
                .build()
                .map_err(|e| invalid(format!("{field}.{}", e.field()), e.to_string()))?;
            copies.insert(name.clone(), target);
        }
        let mut copy_to = BTreeMap::new();
        for (i, e) in self.environments.iter().enumerate() {
            layout::validate_name("environment", &e.name)
                .map_err(|err| invalid(format!("environments[{i}].name"), err.to_string()))?;
            for name in &e.copy_to {
                if !copies.contains_key(name) {
                    return Err(invalid(
                        format!("environments[{i}].copy_to"),
                        format!(
                            "{} is not a copy target: add [copies.{}] (its kind and credentials)",
                            ferry_core::Bounded(name),
                            ferry_core::Bounded(name)
                        ),
                    ));
                }
            }
            if !e.copy_to.is_empty() && maintenance.is_none() {
                return Err(invalid(
                    format!("environments[{i}].copy_to"),
                    "copies are read from the primary with the maintenance credentials: add \
                     [maintenance]"
                        .into(),
                ));
            }
            if copy_to.insert(e.name.clone(), e.copy_to.clone()).is_some() {
                return Err(invalid(
                    format!("environments[{i}].name"),
                    format!("environment {:?} is listed twice", e.name),
                ));
            }
        }
        let mut notify = Vec::new();
        for (i, n) in self.notify.iter().enumerate() {
            notify.push(std::sync::Arc::new(
                n.build().map_err(|e| invalid(format!("notify[{i}]"), e))?,
            ));
        }
        let mut set_deadlines = BTreeMap::new();
        for (i, e) in self.environments.iter().enumerate() {
            if let Some(d) = &e.set_deadline {
                let t = chrono::NaiveTime::parse_from_str(d, "%H:%M").map_err(|_| {
                    invalid(
                        format!("environments[{i}].set_deadline"),
                        format!("{:?} is not HH:MM (UTC)", ferry_core::Bounded(d)),
                    )
                })?;
                set_deadlines.insert(e.name.clone(), t);
            }
        }
        let self_backup = match self.self_backup {
            None => None,
            Some(c) => {
                let encryption = ferry_core::crypto::Encryption::from_recipients(
                    &c.escrow_recipients,
                )
                .map_err(|e| invalid("self_backup.escrow_recipients".into(), e.to_string()))?;
                let cron = croner::Cron::from_str(&c.cron).map_err(|e| {
                    invalid("self_backup.cron".into(), format!("{:?}: {e}", c.cron))
                })?;
                if c.keep_days == 0 {
                    return Err(invalid(
                        "self_backup.keep_days".into(),
                        "must be at least 1".into(),
                    ));
                }
                if maintenance.is_none() {
                    return Err(invalid(
                        "self_backup".into(),
                        "self-backups are written with the maintenance credentials: add \
                         [maintenance]"
                            .into(),
                    ));
                }
                Some(SelfBackup {
                    encryption: std::sync::Arc::new(encryption),
                    cron_text: c.cron,
                    cron,
                    pki_dir: c.pki_dir,
                    keep_days: c.keep_days,
                    config_file: path.to_owned(),
                })
            }
        };
        Ok(Settings {
            self_backup,
            notify,
            set_deadlines,
            listen: self.listen,
            metrics_listen: self.metrics_listen,
            store: self.store,
            agent_timeout: std::time::Duration::from_secs(self.agent_timeout_seconds),
            archive_scan: std::time::Duration::from_secs(self.archive_scan_seconds),
            tls: TlsFiles {
                cert: self.tls.cert,
                key: self.tls.key,
                ca: self.tls.ca,
            },
            retry: self.retry,
            agents,
            operators,
            schedules,
            maintenance,
            retention: self
                .retention
                .into_iter()
                .map(|r| {
                    let policy = crate::catalog::retention::Policy {
                        keep_daily: r.keep_daily,
                        keep_weekly: r.keep_weekly,
                        keep_monthly: r.keep_monthly,
                    };
                    (r.environment, policy)
                })
                .collect(),
            copies,
            copy_to,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
listen = "127.0.0.1:7400"
store = "/tmp/x.redb"
[tls]
cert = "c"
key = "k"
ca = "a"
[[agents]]
id = "pg-prod"
address = "https://127.0.0.1:7443"
role = "production"
environment = "production"
[[agents]]
id = "pg-stage"
address = "https://127.0.0.1:7444"
role = "staging"
environment = "staging"
"#;

    /// `BASE` + `extra`, with `tls.key` a real file of `mode`, built.
    fn build_with_key_mode(extra: &str, mode: u32) -> Result<Settings, String> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("coordinator.key");
        std::fs::write(&key, "key").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let pki = dir.path().join("pki");
        crate::pki::init_ca(&pki).unwrap();
        let cert = crate::pki::issue(&pki, "coordinator", &[], 1).unwrap().cert;
        let text = format!("{BASE}{extra}")
            .replace(
                "key = \"k\"",
                &format!("key = {:?}", key.display().to_string()),
            )
            .replace(
                "cert = \"c\"",
                &format!("cert = {:?}", cert.display().to_string()),
            );
        let cfg: CoordinatorConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
        cfg.build(Path::new("coordinator.toml"))
            .map_err(|e| e.to_string())
    }

    fn build(extra: &str) -> Result<Settings, String> {
        build_with_key_mode(extra, 0o600)
    }

    #[test]
    fn secret_files_readable_by_others_are_refused_naming_the_field_and_file() {
        let e = build_with_key_mode("", 0o644).unwrap_err();
        assert!(
            e.contains("tls.key") && e.contains("coordinator.key") && e.contains("0644"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let ssh_key = dir.path().join("maintenance_ed25519");
        std::fs::write(&ssh_key, "key").unwrap();
        let maintenance = format!(
            "[maintenance]\nhost = \"127.0.0.1\"\nuser = \"ferrybk\"\nprivate_key_file = {:?}\n\
             host_key = \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\"\n\
             root = \"/srv/ferry\"\n",
            ssh_key.display().to_string()
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ssh_key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = build(&maintenance).unwrap_err();
        assert!(
            e.contains("maintenance.private_key_file") && e.contains("maintenance_ed25519"),
            "{e}"
        );
        std::fs::set_permissions(&ssh_key, std::fs::Permissions::from_mode(0o400)).unwrap();
        build(&maintenance).unwrap();
    }

    #[test]
    fn a_self_backup_needs_escrow_recipients_a_cron_and_the_maintenance_target() {
        let (_, recipient) = ferry_core::crypto::generate_identity();
        let table = |body: &str| format!("[self_backup]\n{body}\n");
        let e = build(&table(&format!("escrow_recipients = [\"{recipient}\"]"))).unwrap_err();
        assert!(
            e.contains("self_backup") && e.contains("[maintenance]"),
            "{e}"
        );
        let e = build(&table("escrow_recipients = [\"age1nope\"]")).unwrap_err();
        assert!(e.contains("self_backup.escrow_recipients"), "{e}");
        let e = build(&table("escrow_recipients = []")).unwrap_err();
        assert!(e.contains("no recipients"), "{e}");
        let e = build(&table(&format!(
            "escrow_recipients = [\"{recipient}\"]\ncron = \"every night\""
        )))
        .unwrap_err();
        assert!(e.contains("self_backup.cron"), "{e}");
        let e = build(&table(&format!(
            "escrow_recipients = [\"{recipient}\"]\nkeep_days = 0"
        )))
        .unwrap_err();
        assert!(e.contains("self_backup.keep_days"), "{e}");
    }

    #[test]
    fn valid_schedules_build() {
        let s = build(
            "[[schedules]]\nagent = \"pg-prod\"\nkind = \"backup\"\ncron = \"0 2 * * *\"\n\
             [[schedules]]\nagent = \"pg-stage\"\nkind = \"restore\"\ncron = \"0 5 * * *\"\n",
        )
        .unwrap();
        assert_eq!(s.schedules.len(), 2);
    }

    #[test]
    fn backup_schedule_on_staging_agent_is_rejected_naming_the_entry() {
        let e =
            build("[[schedules]]\nagent = \"pg-stage\"\nkind = \"backup\"\ncron = \"0 2 * * *\"\n")
                .unwrap_err();
        assert!(
            e.contains("schedules[0].kind") && e.contains("staging"),
            "{e}"
        );
    }

    #[test]
    fn both_backup_and_restore_for_one_agent_is_rejected() {
        let e = build(
            "[[schedules]]\nagent = \"pg-prod\"\nkind = \"backup\"\ncron = \"0 2 * * *\"\n\
             [[schedules]]\nagent = \"pg-prod\"\nkind = \"restore\"\ncron = \"0 3 * * *\"\n",
        )
        .unwrap_err();
        assert!(
            e.contains("schedules[1].kind") && e.contains("never both"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_and_bad_cron_are_named() {
        let e = build("colour = \"blue\"\n").unwrap_err();
        assert!(e.contains("colour"), "{e}");
        let e =
            build("[[schedules]]\nagent = \"pg-prod\"\nkind = \"backup\"\ncron = \"99 * * * *\"\n")
                .unwrap_err();
        assert!(e.contains("schedules[0].cron"), "{e}");
        let e =
            build("[[schedules]]\nagent = \"nobody\"\nkind = \"backup\"\ncron = \"0 2 * * *\"\n")
                .unwrap_err();
        assert!(e.contains("schedules[0].agent"), "{e}");
    }

    #[test]
    fn weekly_full_and_daily_diff_schedules_are_accepted_and_a_bad_type_is_named() {
        build(
            "[[schedules]]\nagent = \"pg-prod\"\ndatastore = \"pgbr\"\nkind = \"backup\"\ntype = \"full\"\ncron = \"0 1 * * 0\"\n\
             [[schedules]]\nagent = \"pg-prod\"\ndatastore = \"pgbr\"\nkind = \"backup\"\ntype = \"diff\"\ncron = \"0 1 * * 1-6\"\n",
        )
        .unwrap();
        let e = build(
            "[[schedules]]\nagent = \"pg-prod\"\ndatastore = \"pgbr\"\nkind = \"backup\"\ntype = \"incr\"\ncron = \"0 1 * * *\"\n",
        )
        .unwrap_err();
        assert!(e.contains("schedules[0].type") && e.contains("incr"), "{e}");
        let e = build(
            "[[schedules]]\nagent = \"pg-prod\"\nkind = \"backup\"\ntype = \"full\"\ncron = \"0 1 * * *\"\n",
        )
        .unwrap_err();
        assert!(
            e.contains("schedules[0].type") && e.contains("datastore"),
            "{e}"
        );
    }

    #[test]
    fn operators_build_with_their_roles() {
        let s = build(
            "[[operators]]\nname = \"alice\"\nrole = \"admin\"\n\
             [[operators]]\nname = \"bob.ops\"\nrole = \"operator\"\n\
             [[operators]]\nname = \"carol\"\nrole = \"viewer\"\n",
        )
        .unwrap();
        assert_eq!(
            s.operators.into_iter().collect::<Vec<_>>(),
            [
                ("alice".to_owned(), OperatorRole::Admin),
                ("bob.ops".to_owned(), OperatorRole::Operator),
                ("carol".to_owned(), OperatorRole::Viewer),
            ]
        );
    }

    #[test]
    fn an_operator_named_as_an_agent_is_rejected_naming_the_field() {
        let e = build(
            "[[operators]]\nname = \"alice\"\nrole = \"admin\"\n\
             [[operators]]\nname = \"pg-stage\"\nrole = \"viewer\"\n",
        )
        .unwrap_err();
        assert!(
            e.contains("operators[1].name") && e.contains("pg-stage") && e.contains("agents[1].id"),
            "{e}"
        );
    }

    #[test]
    fn an_operator_named_as_the_coordinators_certificate_is_rejected_naming_the_field() {
        let e = build("[[operators]]\nname = \"coordinator\"\nrole = \"admin\"\n").unwrap_err();
        assert!(
            e.contains("operators[0].name") && e.contains("coordinator's own certificate"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_operator_role_or_key_or_a_bad_or_repeated_name_is_rejected_naming_the_field() {
        let e = build("[[operators]]\nname = \"alice\"\nrole = \"root\"\n").unwrap_err();
        assert!(
            e.contains("operators[0].role") && e.contains("\"root\"") && e.contains("viewer"),
            "{e}"
        );
        let e = build("[[operators]]\nname = \"alice\"\nrole = \"Admin\"\n").unwrap_err();
        assert!(e.contains("operators[0].role"), "{e}");
        let e = build("[[operators]]\nname = \"alice\"\nrole = \"admin\"\nrights = \"all\"\n")
            .unwrap_err();
        assert!(e.contains("rights"), "{e}");
        let e = build("[[operators]]\nname = \"alice\"\n").unwrap_err();
        assert!(e.contains("role"), "{e}");
        let e = build("[[operators]]\nname = \"al ice\"\nrole = \"admin\"\n").unwrap_err();
        assert!(e.contains("operators[0].name"), "{e}");
        let long = "a".repeat(5000);
        let e = build(&format!(
            "[[operators]]\nname = \"{long}\"\nrole = \"admin\"\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("operators[0].name") && e.contains("(cut; 5000 bytes)") && e.len() < 1000,
            "{e}"
        );
        let e = build(
            "[[operators]]\nname = \"alice\"\nrole = \"admin\"\n\
             [[operators]]\nname = \"alice\"\nrole = \"viewer\"\n",
        )
        .unwrap_err();
        assert!(
            e.contains("operators[1].name") && e.contains("twice"),
            "{e}"
        );
    }

    #[test]
    fn an_unreadable_coordinator_certificate_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("coordinator.key");
        std::fs::write(&key, "key").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = BASE.replace(
            "key = \"k\"",
            &format!("key = {:?}", key.display().to_string()),
        );
        let cfg: CoordinatorConfig = toml::from_str(&text).unwrap();
        let e = cfg
            .build(Path::new("coordinator.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls.cert") && e.contains("cannot read c"), "{e}");
    }

    #[test]
    fn backoff_doubles_up_to_the_limit() {
        let r = RetryConfig {
            max_attempts: 5,
            initial_backoff_seconds: 30,
            max_backoff_seconds: 100,
        };
        assert_eq!(r.backoff(1).as_secs(), 30);
        assert_eq!(r.backoff(2).as_secs(), 60);
        assert_eq!(r.backoff(3).as_secs(), 100);
    }
}
