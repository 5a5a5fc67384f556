//! Writers of `agent.toml` and `coordinator.toml`, with exactly the keys the binaries
//! accept (their configs refuse unknown keys). Build a value, adjust its public fields,
//! then `write(path)`; `to_toml()` gives the text, e.g. to break it on purpose.

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::postgres::Postgres;
use crate::sshd::{BACKUP_USER, Sshd};

/// A TOML basic string, quoted and escaped.
pub fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_path(p: &Path) -> String {
    toml_str(&p.display().to_string())
}

fn write_file(path: &Path, text: &str) -> PathBuf {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path.to_owned()
}

/// `[tls]`: own certificate and key, and the fleet CA (PEM files).
#[derive(Clone, Debug)]
pub struct Tls {
    /// Certificate.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// Fleet CA certificate.
    pub ca: PathBuf,
}

impl Tls {
    fn to_toml(&self) -> String {
        format!(
            "[tls]\ncert = {}\nkey = {}\nca = {}\n",
            toml_path(&self.cert),
            toml_path(&self.key),
            toml_path(&self.ca)
        )
    }
}

/// An agent's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentRole {
    /// Backup only.
    Production,
    /// Restore only.
    Staging,
}

impl AgentRole {
    /// `production` or `staging`.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentRole::Production => "production",
            AgentRole::Staging => "staging",
        }
    }
}

/// `[backup_server]` of an agent.
#[derive(Clone, Debug)]
pub struct BackupServer {
    /// Host.
    pub host: String,
    /// SSH port.
    pub port: u16,
    /// SSH user.
    pub user: String,
    /// The agent's SSH private key.
    pub private_key_file: PathBuf,
    /// Pinned host key, `ssh-ed25519 AAAA...`.
    pub host_key: String,
    /// The layout's root on the server.
    pub root: PathBuf,
    /// `io_timeout_seconds`, written only when set (the agent's default otherwise).
    pub io_timeout_seconds: Option<u64>,
}

impl BackupServer {
    /// `sshd` as the backup server, logging in with `private_key_file`.
    pub fn of(sshd: &Sshd, private_key_file: &Path) -> BackupServer {
        BackupServer {
            host: sshd.host().to_owned(),
            port: sshd.port(),
            user: BACKUP_USER.to_owned(),
            private_key_file: private_key_file.to_owned(),
            host_key: sshd.host_key(),
            root: sshd.root().to_owned(),
            io_timeout_seconds: None,
        }
    }

    fn to_toml(&self) -> String {
        let mut s = format!(
            "[backup_server]\nhost = {}\nport = {}\nuser = {}\nprivate_key_file = {}\nhost_key = {}\nroot = {}\n",
            toml_str(&self.host),
            self.port,
            toml_str(&self.user),
            toml_path(&self.private_key_file),
            toml_str(&self.host_key),
            toml_path(&self.root)
        );
        if let Some(t) = self.io_timeout_seconds {
            let _ = writeln!(s, "io_timeout_seconds = {t}");
        }
        s
    }
}

/// `[encryption]` of an agent: exactly one of the two per role.
#[derive(Clone, Debug)]
pub enum Encryption {
    /// Production: `recipients = ["age1..."]`.
    Recipients(Vec<String>),
    /// Staging: `identity_file = "..."`.
    Identity(PathBuf),
}

impl Encryption {
    fn to_toml(&self) -> String {
        match self {
            Encryption::Recipients(r) => {
                let list: Vec<String> = r.iter().map(|x| toml_str(x)).collect();
                format!("[encryption]\nrecipients = [{}]\n", list.join(", "))
            }
            Encryption::Identity(p) => format!("[encryption]\nidentity_file = {}\n", toml_path(p)),
        }
    }
}

/// A `[[datastores]]` entry of kind `postgres`.
#[derive(Clone, Debug)]
pub struct PostgresDatastore {
    /// Datastore name (used in stored file names).
    pub name: String,
    /// Server host.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Role to connect as.
    pub user: String,
    /// Production: the database to dump.
    pub database: Option<String>,
    /// Staging: the database to restore into.
    pub target_database: Option<String>,
    /// Directory of pg_dump, pg_restore, psql.
    pub bin_dir: PathBuf,
}

impl PostgresDatastore {
    /// Production: datastore `postgres` dumping `database` of `pg`.
    pub fn source(pg: &Postgres, database: &str) -> PostgresDatastore {
        PostgresDatastore {
            name: "postgres".into(),
            host: pg.host().into(),
            port: pg.port(),
            user: "postgres".into(),
            database: Some(database.into()),
            target_database: None,
            bin_dir: pg.bin_dir().to_owned(),
        }
    }

    /// Staging: datastore `postgres` restoring into `target_database` of `pg`.
    pub fn target(pg: &Postgres, target_database: &str) -> PostgresDatastore {
        PostgresDatastore {
            database: None,
            target_database: Some(target_database.into()),
            ..Self::source(pg, "")
        }
    }

    fn to_toml(&self) -> String {
        let mut s = format!(
            "[[datastores]]\nname = {}\nkind = \"postgres\"\nhost = {}\nport = {}\nuser = {}\n",
            toml_str(&self.name),
            toml_str(&self.host),
            self.port,
            toml_str(&self.user)
        );
        if let Some(d) = &self.database {
            let _ = writeln!(s, "database = {}", toml_str(d));
        }
        if let Some(d) = &self.target_database {
            let _ = writeln!(s, "target_database = {}", toml_str(d));
        }
        let _ = writeln!(s, "bin_dir = {}", toml_path(&self.bin_dir));
        s
    }
}

/// A `[[datastores]]` entry.
#[derive(Clone, Debug)]
pub enum Datastore {
    /// Kind `postgres`.
    Postgres(PostgresDatastore),
    /// Any other kind, as TOML text starting with `[[datastores]]`.
    Toml(String),
}

/// The whole `agent.toml`.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Agent id (also its certificate's name).
    pub id: String,
    /// Role.
    pub role: AgentRole,
    /// Environment (`production`, `staging`).
    pub environment: String,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// mTLS files.
    pub tls: Tls,
    /// The backup server.
    pub backup_server: BackupServer,
    /// Recipients (production) or identity (staging).
    pub encryption: Encryption,
    /// `[restore] source_environment`, staging only.
    pub source_environment: Option<String>,
    /// Datastores.
    pub datastores: Vec<Datastore>,
}

impl AgentConfig {
    /// The coordinator's address of this agent: `https://LISTEN`.
    pub fn address(&self) -> String {
        format!("https://{}", self.listen)
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        let mut s = format!(
            "id = {}\nrole = {}\nenvironment = {}\nlisten = {}\n\n{}\n{}\n{}",
            toml_str(&self.id),
            toml_str(self.role.as_str()),
            toml_str(&self.environment),
            toml_str(&self.listen.to_string()),
            self.tls.to_toml(),
            self.backup_server.to_toml(),
            self.encryption.to_toml()
        );
        if let Some(env) = &self.source_environment {
            let _ = write!(s, "\n[restore]\nsource_environment = {}\n", toml_str(env));
        }
        for d in &self.datastores {
            s.push('\n');
            match d {
                Datastore::Postgres(p) => s.push_str(&p.to_toml()),
                Datastore::Toml(t) => {
                    s.push_str(t);
                    if !t.ends_with('\n') {
                        s.push('\n');
                    }
                }
            }
        }
        s
    }

    /// Writes it to `path`; returns `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        write_file(path, &self.to_toml())
    }
}

/// `[retry]` of the coordinator.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// First back-off, seconds.
    pub initial_backoff_seconds: u64,
    /// Longest back-off, seconds.
    pub max_backoff_seconds: u64,
}

/// An `[[agents]]` entry of the coordinator.
#[derive(Clone, Debug)]
pub struct AgentEntry {
    /// Agent id.
    pub id: String,
    /// `https://HOST:PORT`.
    pub address: String,
    /// Role.
    pub role: AgentRole,
    /// Environment.
    pub environment: String,
}

impl AgentEntry {
    /// The entry for `agent`.
    pub fn of(agent: &AgentConfig) -> AgentEntry {
        AgentEntry {
            id: agent.id.clone(),
            address: agent.address(),
            role: agent.role,
            environment: agent.environment.clone(),
        }
    }
}

/// An `[[operators]]` entry of the coordinator: a certificate name and its role.
#[derive(Clone, Debug)]
pub struct Operator {
    /// The certificate's common name.
    pub name: String,
    /// `viewer`, `operator` or `admin` (any text: tests write wrong ones on purpose).
    pub role: String,
}

impl Operator {
    /// `name` with role `role`.
    pub fn new(name: &str, role: &str) -> Operator {
        Operator {
            name: name.into(),
            role: role.into(),
        }
    }

    /// `name` as an admin (every method), as the harness's CLI certificate `operator` is.
    pub fn admin(name: &str) -> Operator {
        Self::new(name, "admin")
    }
}

/// A `[[schedules]]` entry of the coordinator.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// Agent id.
    pub agent: String,
    /// Datastore name; every datastore of the agent if `None`.
    pub datastore: Option<String>,
    /// `backup` or `restore`.
    pub kind: String,
    /// Cron expression, e.g. `0 2 * * *`.
    pub cron: String,
}

impl Schedule {
    /// A backup of `agent`'s `datastore` on `cron`.
    pub fn backup(agent: &str, datastore: Option<&str>, cron: &str) -> Schedule {
        Schedule {
            agent: agent.into(),
            datastore: datastore.map(Into::into),
            kind: "backup".into(),
            cron: cron.into(),
        }
    }

    /// A restore by `agent` of its `datastore` on `cron`.
    pub fn restore(agent: &str, datastore: Option<&str>, cron: &str) -> Schedule {
        Schedule {
            kind: "restore".into(),
            ..Self::backup(agent, datastore, cron)
        }
    }
}

/// The whole `coordinator.toml`.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// The redb file.
    pub store: PathBuf,
    /// A running job whose agent is silent this long is failed, seconds.
    pub agent_timeout_seconds: u64,
    /// mTLS files.
    pub tls: Tls,
    /// `[retry]`, written only when set.
    pub retry: Option<Retry>,
    /// Inventory.
    pub agents: Vec<AgentEntry>,
    /// Who may use the CLI, and as what.
    pub operators: Vec<Operator>,
    /// Schedules.
    pub schedules: Vec<Schedule>,
}

impl CoordinatorConfig {
    /// The CLI's `--coordinator` value: `https://LISTEN`.
    pub fn address(&self) -> String {
        format!("https://{}", self.listen)
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        let mut s = format!(
            "listen = {}\nstore = {}\nagent_timeout_seconds = {}\narchive_scan_seconds = 2\n\n{}",
            toml_str(&self.listen.to_string()),
            toml_path(&self.store),
            self.agent_timeout_seconds,
            self.tls.to_toml()
        );
        if let Some(r) = &self.retry {
            let _ = write!(
                s,
                "\n[retry]\nmax_attempts = {}\ninitial_backoff_seconds = {}\nmax_backoff_seconds = {}\n",
                r.max_attempts, r.initial_backoff_seconds, r.max_backoff_seconds
            );
        }
        for a in &self.agents {
            let _ = write!(
                s,
                "\n[[agents]]\nid = {}\naddress = {}\nrole = {}\nenvironment = {}\n",
                toml_str(&a.id),
                toml_str(&a.address),
                toml_str(a.role.as_str()),
                toml_str(&a.environment)
            );
        }
        for o in &self.operators {
            let _ = write!(
                s,
                "\n[[operators]]\nname = {}\nrole = {}\n",
                toml_str(&o.name),
                toml_str(&o.role)
            );
        }
        for sc in &self.schedules {
            let _ = write!(s, "\n[[schedules]]\nagent = {}\n", toml_str(&sc.agent));
            if let Some(d) = &sc.datastore {
                let _ = writeln!(s, "datastore = {}", toml_str(d));
            }
            let _ = write!(
                s,
                "kind = {}\ncron = {}\n",
                toml_str(&sc.kind),
                toml_str(&sc.cron)
            );
        }
        s
    }

    /// Writes it to `path`; returns `path`.
    pub fn write(&self, path: &Path) -> PathBuf {
        write_file(path, &self.to_toml())
    }
}
