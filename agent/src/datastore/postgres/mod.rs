//! PostgreSQL: `pg_dump --format=custom --compress=0` (Ferry compresses), the cluster's
//! roles from `pg_dumpall --roles-only` as a companion part `globals`, and row counts per
//! table taken in the same snapshot as the dump (`pg_export_snapshot()` +
//! `pg_dump --snapshot`).
//!
//! Restore (staging): roles first with `psql` ("already exists" is expected and not an
//! error), then `pg_restore --clean --if-exists --exit-on-error` into a scratch database
//! beside the target, row counts compared with the manifest, and only then the scratch
//! database renamed over the target. A failure before the swap drops the scratch
//! database and leaves the target as it was. A restore killed half-way leaves
//! `<target>__ferry_new_<job>` (and, killed during the swap, `<target>__ferry_old_<job>`):
//! the agent puts them right on start and before the next restore ([`crate::datastore::common::leftovers`]).
//!
//! `method = "physical"` backs up the whole cluster with `pg_basebackup` instead
//! ([`basebackup`]): one tar stream, its WAL included, the manifest recording start and
//! stop LSN, timeline, backup label and system identifier.
//!
//! Credentials: the password comes from `password_file` (mode 0600/0400) or
//! `password_env`, and reaches the tools as `PGPASSWORD` in their environment, never on
//! their command line.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio_postgres::{Client, NoTls};

use super::common::leftovers::Recovered;
use super::{CheckError, Datastore, Mode, Part, ReapedChild, RestoreError, StderrTail, ToolPaths};

pub mod basebackup;
mod config;
mod dump;
pub mod physical_restore;
mod restore;

pub use basebackup::BaseBackupInfo;
pub use config::{Method, PostgresConfig};

/// The main part: `pg_dump` custom format.
pub const MAIN: Part = Part {
    name: "",
    format: "pgdump",
};

/// The companion part: roles as SQL from `pg_dumpall --roles-only`.
pub const GLOBALS: Part = Part {
    name: "globals",
    format: "sql",
};

const PARTS: &[Part] = &[GLOBALS, MAIN];

/// The only part of a physical backup (`method = "physical"`): `pg_basebackup`'s tar.
pub const BASE: Part = Part {
    name: "",
    format: "tar",
};

/// Capacity asked for the pipe between the agent and pg_dump, pg_restore or psql, bytes
/// (kernel memory, not the agent's).
const TOOL_PIPE_BYTES: usize = 1024 * 1024;

/// Longest identifier PostgreSQL keeps (NAMEDATALEN - 1), bytes.
const MAX_IDENTIFIER: usize = 63;

/// A built PostgreSQL datastore.
#[derive(Clone, Debug)]
pub struct Postgres {
    cfg: PostgresConfig,
    password: Option<ferry_core::secrets::Password>,
    tools: ToolPaths,
    /// Held while the database a logical restore replaced is dropped, after the restore
    /// reported ([`restore`]); the search for leftovers that precedes every restore waits
    /// for it, so neither it nor the next restore races the drop.
    dropping: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// A connection to the server that could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to PostgreSQL {host}:{port} database {database:?} as {user}: {error}")]
pub struct ConnectError {
    /// `host` of the config (a name, an address or a socket directory).
    pub host: String,
    /// `port` of the config.
    pub port: u16,
    /// The database connected to.
    pub database: String,
    /// The role connected as.
    pub user: String,
    /// The driver's error.
    pub error: tokio_postgres::Error,
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

impl Datastore for Postgres {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn archives_wal(&self) -> bool {
        self.physical()
    }

    /// `(tool, version)` for pg_dump, pg_dumpall, pg_restore and psql, or for a physical
    /// datastore pg_basebackup, pg_verifybackup and pg_ctl (looked up once per method).
    fn tool_versions(&self) -> Vec<(String, String)> {
        static DUMP: OnceLock<Vec<(String, String)>> = OnceLock::new();
        static PHYSICAL: OnceLock<Vec<(String, String)>> = OnceLock::new();
        let (cache, tools): (_, &[&str]) = if self.physical() {
            (&PHYSICAL, &["pg_basebackup", "pg_verifybackup", "pg_ctl"])
        } else {
            (&DUMP, &["pg_dump", "pg_dumpall", "pg_restore", "psql"])
        };
        cache
            .get_or_init(|| {
                tools
                    .iter()
                    .map(|t| (t.to_string(), self.tools.version(t)))
                    .collect()
            })
            .clone()
    }

    /// Connects and reports the server version and database size; a physical datastore
    /// on production also checks that the cluster can be backed up physically (no
    /// tablespaces of its own, a role with `REPLICATION`), on staging that `data_dir` can
    /// be swapped (not a mount point, its parent exists).
    ///
    /// # Errors
    /// The connection or query error, or why the cluster cannot be backed up.
    fn check(&self) -> BoxFuture<'_, Result<String, CheckError>> {
        async move {
            if let Some(dir) = self.cfg.data_dir.as_deref() {
                super::common::tree::refuse_mount_point(dir, "data_dir")
                    .map_err(|e| CheckError::Path(e.to_string()))?;
                if !dir.parent().is_some_and(std::path::Path::is_dir) {
                    return Err(CheckError::Path(format!(
                        "the parent of data_dir {} does not exist",
                        dir.display()
                    )));
                }
            }
            if let Some(dir) = self.cfg.scratch_dir.as_deref()
                && !dir.is_dir()
            {
                return Err(CheckError::Path(format!(
                    "scratch_dir {} is not a directory (restores write the archive there for \
                     pg_restore --jobs)",
                    dir.display()
                )));
            }
            let db = self
                .cfg
                .database
                .as_deref()
                .unwrap_or(&self.cfg.maintenance_database);
            let client = self
                .connect(db)
                .await
                .map_err(|e| CheckError::Server(e.to_string()))?;
            let row = client
            .query_one(
                "SELECT current_setting('server_version'), pg_database_size(current_database())",
                &[],
            )
            .await
            .map_err(|e| CheckError::Server(e.to_string()))?;
            let version: String = row.get(0);
            let size: i64 = row.get(1);
            if self.physical() && self.cfg.data_dir.is_none() {
                let refusal = self
                    .physical_refusal(&client)
                    .await
                    .map_err(|e| CheckError::Server(e.to_string()))?;
                if let Some(why) = refusal {
                    return Err(CheckError::Server(why));
                }
            }
            Ok(format!(
                "PostgreSQL {version} at {}:{}, database {db:?} ({size} bytes)",
                self.cfg.host, self.cfg.port
            ))
        }
        .boxed()
    }

    fn mode(&self) -> Mode<'_> {
        Mode::streamed(self)
    }

    /// The scratch (`<target>__ferry_new_<job>`) and old (`<target>__ferry_old_<job>`)
    /// databases of `target_database` (see [`crate::datastore::common::leftovers`]), job by job.
    fn recover_leftovers<'a>(
        &'a self,
        skip: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Recovered>, RestoreError>> {
        if self.physical() {
            self.recover_physical(skip).boxed()
        } else {
            self.recover(skip).boxed()
        }
    }
}

impl Postgres {
    /// Whether this datastore makes physical base backups (`method = "physical"`).
    pub fn physical(&self) -> bool {
        self.cfg.method == Method::Physical
    }

    fn pg_config(&self, db: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.cfg.host)
            .port(self.cfg.port)
            .user(&self.cfg.user)
            .dbname(db)
            .application_name("ferry-agent");
        if let Some(p) = &self.password {
            c.password(&p.0);
        }
        c
    }

    async fn connect(&self, db: &str) -> Result<Client, ConnectError> {
        self.connect_with(self.pg_config(db), db).await
    }

    async fn connect_with(
        &self,
        config: tokio_postgres::Config,
        db: &str,
    ) -> Result<Client, ConnectError> {
        let (client, conn) = config.connect(NoTls).await.map_err(|error| ConnectError {
            host: self.cfg.host.clone(),
            port: self.cfg.port,
            database: db.to_owned(),
            user: self.cfg.user.clone(),
            error,
        })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "PostgreSQL connection closed.");
            }
        });
        Ok(client)
    }

    /// A command for `tool` with connection flags and the password in its environment.
    fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.tools.path(tool));
        cmd.arg("--host")
            .arg(&self.cfg.host)
            .arg("--port")
            .arg(self.cfg.port.to_string())
            .arg("--username")
            .arg(&self.cfg.user)
            .arg("--no-password")
            .env("PGAPPNAME", "ferry-agent")
            .env_remove("PGPASSWORD");
        if let Some(p) = &self.password {
            cmd.env("PGPASSWORD", &p.0);
        }
        cmd
    }

    /// Starts `tool`: its stdout piped out (or, with `stdin`, its stdin piped in), its
    /// stderr kept by a [`StderrTail`]. The child is killed and reaped if dropped before
    /// it was waited for ([`ReapedChild`]: a job dropped at the agent's shutdown leaves no
    /// tool behind); the pipe is a blocking file, for the pipeline's threads.
    fn spawn(
        &self,
        cmd: Command,
        tool: &str,
        stdin: bool,
    ) -> Result<(ReapedChild, std::fs::File, StderrTail), std::io::Error> {
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(if stdin { Stdio::null() } else { Stdio::piped() })
            .stderr(Stdio::piped())
            // Until it is owned by the ReapedChild below.
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let stderr = child
            .stderr
            .take()
            .expect("stderr is piped")
            .into_owned_fd()?;
        let tail = StderrTail::spawn(std::fs::File::from(stderr));
        let pipe = if stdin {
            child
                .stdin
                .take()
                .expect("stdin is piped")
                .into_owned_fd()?
        } else {
            child
                .stdout
                .take()
                .expect("stdout is piped")
                .into_owned_fd()?
        };
        // A pipe of 1 MiB instead of Linux's 64 KiB lets the pipeline thread run that far
        // ahead of (or behind) the tool instead of waking at every 64 KiB; best effort
        // (`/proc/sys/fs/pipe-max-size` may be lower).
        let _ = rustix::pipe::fcntl_setpipe_size(&pipe, TOOL_PIPE_BYTES);
        tracing::debug!(tool, pid = child.id(), "Started tool.");
        Ok((ReapedChild::new(child), std::fs::File::from(pipe), tail))
    }
}

/// What is counted in a database: its owner and encoding, and rows per table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DatabaseCounts {
    /// Owner role of the database.
    pub owner: String,
    /// Server encoding name, e.g. `UTF8`.
    pub encoding: String,
    /// `schema.table` → rows, for every ordinary table outside the system schemas and
    /// extensions.
    pub rows: BTreeMap<String, i64>,
}

impl DatabaseCounts {
    /// The manifest's `counts`: `{"owner", "encoding", "tables", "rows": {...}}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "owner": self.owner,
            "encoding": self.encoding,
            "tables": self.rows.len(),
            "rows": self.rows,
        })
    }

    fn from_json(v: &serde_json::Value) -> Option<Self> {
        let rows = v
            .get("rows")?
            .as_object()?
            .iter()
            .map(|(k, n)| Some((k.clone(), n.as_i64()?)))
            .collect::<Option<_>>()?;
        Some(Self {
            owner: v.get("owner")?.as_str()?.to_owned(),
            encoding: v.get("encoding")?.as_str()?.to_owned(),
            rows,
        })
    }
}

/// The user tables counted in [`DatabaseCounts`]: ordinary tables outside the system
/// schemas that no extension owns, `schema`, `table`, and what `extra` selects of each (a
/// column of `c`, the table's `pg_class` row), in name order.
fn user_tables_sql(extra: &str) -> String {
    format!(
        "SELECT n.nspname, c.relname{extra} FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind = 'r' \
           AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
           AND n.nspname !~ '^pg_(toast|temp)' \
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
               WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e') \
         ORDER BY 1, 2"
    )
}

/// The database's owner and encoding, and `rows` for them.
async fn with_owner(
    client: &Client,
    rows: BTreeMap<String, i64>,
) -> Result<DatabaseCounts, tokio_postgres::Error> {
    let db = client
        .query_one(
            "SELECT pg_catalog.pg_get_userbyid(datdba), pg_catalog.pg_encoding_to_char(encoding) \
             FROM pg_catalog.pg_database WHERE datname = current_database()",
            &[],
        )
        .await?;
    Ok(DatabaseCounts {
        owner: db.get(0),
        encoding: db.get(1),
        rows,
    })
}

/// Counts rows of every user table through `client` (inside whatever transaction it has):
/// `count(*)` of each, a scan of the whole database.
async fn database_counts(client: &Client) -> Result<DatabaseCounts, tokio_postgres::Error> {
    let tables = client.query(&user_tables_sql(""), &[]).await?;
    let mut rows = BTreeMap::new();
    for t in tables {
        let (schema, table): (String, String) = (t.get(0), t.get(1));
        let n: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {}.{}",
                    quote_ident(&schema),
                    quote_ident(&table)
                ),
                &[],
            )
            .await?
            .get(0);
        rows.insert(format!("{schema}.{table}"), n);
    }
    with_owner(client, rows).await
}

/// The rows of every user table of a database that only pg_restore has written to, as the
/// server counted them while they were inserted: the cumulative statistics' tuples
/// inserted less tuples deleted (`pg_stat_get_tuples_inserted`, PostgreSQL's "Cumulative
/// Statistics System"), no scan. They are complete once the writing sessions have ended
/// and flushed their counters, which a session does as it exits; with `track_counts` off
/// they are all 0. [`database_counts`] is the authority where they differ from what is
/// expected.
async fn inserted_counts(client: &Client) -> Result<DatabaseCounts, tokio_postgres::Error> {
    let extra = ", pg_catalog.pg_stat_get_tuples_inserted(c.oid) \
                 - pg_catalog.pg_stat_get_tuples_deleted(c.oid)";
    let rows = client
        .query(&user_tables_sql(extra), &[])
        .await?
        .iter()
        .map(|t| {
            let (schema, table, n): (String, String, i64) = (t.get(0), t.get(1), t.get(2));
            (format!("{schema}.{table}"), n)
        })
        .collect();
    with_owner(client, rows).await
}
