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
//! the agent puts them right on start and before the next restore ([`super::leftovers`]).
//!
//! Credentials: the password comes from `password_file` (mode 0600/0400) or
//! `password_env`, and reaches the tools as `PGPASSWORD` in their environment, never on
//! their command line.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use ferry_proto::Role;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Deserialize;
use tokio_postgres::{Client, NoTls};

use super::{
    DumpError, DumpOutcome, DumpStream, Dumper, Part, PartSink, RestoreError, RestoreSession,
    Restorer, StderrTail, ToolPaths, describe_status,
};
use ferry_core::manifest::{Manifest, Source};

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

/// Longest identifier PostgreSQL keeps (NAMEDATALEN - 1), bytes.
const MAX_IDENTIFIER: usize = 63;

/// The tag of a restore's scratch database: `<target>__ferry_new_<job>`.
const NEW_TAG: &str = "__ferry_new_";

/// The tag of the target moved aside by a restore's swap: `<target>__ferry_old_<job>`.
const OLD_TAG: &str = "__ferry_old_";

/// How long the search for leftovers waits for the server to answer a connection, seconds.
const RECOVER_CONNECT_SECONDS: u64 = 10;

/// `<target><tag><job>`, the job id in lower case, the target's name cut so that the whole
/// fits [`MAX_IDENTIFIER`] bytes: the name of a restore's scratch ([`NEW_TAG`]) or old
/// ([`OLD_TAG`]) database.
fn scratch_name(target: &str, tag: &str, job_id: &str) -> String {
    let suffix = job_id.to_lowercase();
    let keep = MAX_IDENTIFIER.saturating_sub(tag.len() + suffix.len());
    format!("{}{tag}{suffix}", truncate(target, keep))
}

/// The jobs that left a scratch or old database of `target` among the database `names`:
/// job id (upper case) → (scratch exists, old exists). Only the exact names
/// [`scratch_name`] gives count.
fn leftover_jobs(target: &str, names: &[String]) -> BTreeMap<String, (bool, bool)> {
    let mut jobs: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for name in names {
        let Some(cut) = name
            .len()
            .checked_sub(26)
            .filter(|&c| name.is_char_boundary(c))
        else {
            continue;
        };
        let Some(job) = super::leftovers::job_id(&name[cut..]) else {
            continue;
        };
        if *name == scratch_name(target, NEW_TAG, &job) {
            jobs.entry(job).or_default().0 = true;
        } else if *name == scratch_name(target, OLD_TAG, &job) {
            jobs.entry(job).or_default().1 = true;
        }
    }
    jobs
}

/// A PostgreSQL cluster as a [`super::leftovers::Store`]: names are databases.
struct Databases {
    client: Client,
}

impl Databases {
    /// Ends the sessions on `db`, so it can be renamed or dropped.
    async fn terminate(&self, db: &str) {
        let _ = self
            .client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&db],
            )
            .await;
    }

    async fn exists(&self, db: &str) -> Result<bool, String> {
        self.client
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_database WHERE datname = $1",
                &[&db],
            )
            .await
            .map(|r| r.is_some())
            .map_err(|e| e.to_string())
    }
}

impl super::leftovers::Store for Databases {
    fn rename<'a>(&'a mut self, from: &'a str, to: &'a str) -> BoxFuture<'a, Result<(), String>> {
        async move {
            let sql = format!(
                "ALTER DATABASE {} RENAME TO {}",
                quote_ident(from),
                quote_ident(to)
            );
            let mut last = String::new();
            // A session may connect again between the termination and the rename.
            for _ in 0..5 {
                self.terminate(from).await;
                match self.client.batch_execute(&sql).await {
                    Ok(()) => return Ok(()),
                    Err(e) => last = e.to_string(),
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(last)
        }
        .boxed()
    }

    fn remove<'a>(&'a mut self, name: &'a str) -> BoxFuture<'a, Result<(), String>> {
        async move {
            self.client
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    quote_ident(name)
                ))
                .await
                .map_err(|e| e.to_string())
        }
        .boxed()
    }

    fn show(&self, name: &str) -> String {
        format!("database {name}")
    }
}

/// `[[datastores]]` with `kind = "postgres"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Datastore name, used in stored file names.
    pub name: String,
    /// Server host name or address, or a Unix-socket directory (starting with `/`).
    #[serde(default = "default_host")]
    pub host: String,
    /// Server port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Role to connect as; restores need a superuser (roles, ownership).
    #[serde(default = "default_user")]
    pub user: String,
    /// Production: the database to back up.
    pub database: Option<String>,
    /// Staging: the database to restore into (created, or replaced at the end).
    pub target_database: Option<String>,
    /// Database to connect to for cluster-wide work (roles, create/rename/drop).
    #[serde(default = "default_maintenance")]
    pub maintenance_database: String,
    /// File holding the password (mode 0600 or 0400).
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// Directory of pg_dump, pg_dumpall, pg_restore and psql; `PATH` if unset.
    pub bin_dir: Option<PathBuf>,
    /// Keep role passwords (hashes) in the `globals` archive. Off by default: staging
    /// then has the roles, owners and grants, but not production's passwords.
    #[serde(default)]
    pub role_passwords: bool,
    /// Staging: smoke checks run after every restore, e.g.
    /// `[{ sql = "SELECT count(*) FROM orders", min = 1000 }]`.
    #[serde(default)]
    pub smoke: Vec<super::SmokeCheck>,
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    5432
}
fn default_user() -> String {
    "postgres".into()
}
fn default_maintenance() -> String {
    "postgres".into()
}

/// A built PostgreSQL datastore.
#[derive(Clone, Debug)]
pub struct Postgres {
    cfg: PostgresConfig,
    password: Option<ferry_core::secrets::Password>,
    tools: ToolPaths,
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Postgres {
    /// Validates `cfg` for `role`.
    ///
    /// # Errors
    /// `(field, message)`.
    pub fn build(cfg: PostgresConfig, role: Role) -> Result<Self, (String, String)> {
        let err = |f: &str, m: &str| Err((f.to_owned(), m.to_owned()));
        match role {
            Role::Production => {
                if cfg.database.is_none() {
                    return err("database", "missing: the database to back up");
                }
                if cfg.target_database.is_some() {
                    return err(
                        "target_database",
                        "only a staging agent restores; remove it",
                    );
                }
            }
            Role::Staging => {
                if cfg.target_database.is_none() {
                    return err("target_database", "missing: the database to restore into");
                }
                if cfg.database.is_some() {
                    return err(
                        "database",
                        "a staging agent does not back up; use target_database for the restore target",
                    );
                }
            }
        }
        super::SmokeCheck::validate(&cfg.smoke, role, "sql")?;
        for (field, db) in [
            ("database", cfg.database.as_deref()),
            ("target_database", cfg.target_database.as_deref()),
            (
                "maintenance_database",
                Some(cfg.maintenance_database.as_str()),
            ),
        ] {
            if let Some(db) = db
                && (db.is_empty() || db.len() > MAX_IDENTIFIER || db.contains('\0'))
            {
                return err(field, "must be 1 to 63 bytes, without NUL");
            }
        }
        let password = ferry_core::secrets::read_password(
            cfg.password_file.as_deref(),
            cfg.password_env.as_deref(),
        )
        .map_err(|e| (e.field().to_owned(), e.to_string()))?
        .map(ferry_core::secrets::Password);
        let tools = ToolPaths::new(cfg.bin_dir.clone());
        Ok(Self {
            cfg,
            password,
            tools,
        })
    }

    /// The configured name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// `(tool, version)` for pg_dump, pg_dumpall, pg_restore and psql (looked up once).
    pub fn tool_versions(&self) -> Vec<(String, String)> {
        static CACHE: OnceLock<Vec<(String, String)>> = OnceLock::new();
        CACHE
            .get_or_init(|| {
                ["pg_dump", "pg_dumpall", "pg_restore", "psql"]
                    .iter()
                    .map(|t| (t.to_string(), self.tools.version(t)))
                    .collect()
            })
            .clone()
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

    async fn connect(&self, db: &str) -> Result<Client, String> {
        self.connect_with(self.pg_config(db), db).await
    }

    async fn connect_with(
        &self,
        config: tokio_postgres::Config,
        db: &str,
    ) -> Result<Client, String> {
        let (client, conn) = config.connect(NoTls).await.map_err(|e| {
            format!(
                "cannot connect to PostgreSQL {}:{} database {db:?} as {}: {e}",
                self.cfg.host, self.cfg.port, self.cfg.user
            )
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

    /// Connects and reports the server version and database size.
    ///
    /// # Errors
    /// The connection or query error.
    pub async fn check(&self) -> Result<String, String> {
        let db = self
            .cfg
            .database
            .as_deref()
            .unwrap_or(&self.cfg.maintenance_database);
        let client = self.connect(db).await?;
        let row = client
            .query_one(
                "SELECT current_setting('server_version'), pg_database_size(current_database())",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        let version: String = row.get(0);
        let size: i64 = row.get(1);
        Ok(format!(
            "PostgreSQL {version} at {}:{}, database {db:?} ({size} bytes)",
            self.cfg.host, self.cfg.port
        ))
    }

    fn spawn(
        &self,
        mut cmd: Command,
        tool: &str,
        stdin: bool,
    ) -> Result<(std::process::Child, StderrTail), std::io::Error> {
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(if stdin { Stdio::null() } else { Stdio::piped() })
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let tail = StderrTail::spawn(child.stderr.take().expect("stderr is piped"));
        tracing::debug!(tool, pid = child.id(), "Started tool.");
        Ok((child, tail))
    }

    async fn dump_main(&self) -> Result<DumpStream, DumpError> {
        let db = self
            .cfg
            .database
            .clone()
            .ok_or_else(|| DumpError::Source("no database configured to back up".into()))?;
        let client = self.connect(&db).await.map_err(DumpError::Source)?;
        let q = |e: tokio_postgres::Error| {
            DumpError::Source(format!("PostgreSQL database {db:?}: {e}"))
        };
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await
            .map_err(q)?;
        let snapshot: String = client
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
            .map_err(q)?
            .get(0);
        let server_version: String = client
            .query_one("SELECT current_setting('server_version')", &[])
            .await
            .map_err(q)?
            .get(0);

        let mut cmd = self.command("pg_dump");
        cmd.args(["--format=custom", "--compress=0", "--snapshot"])
            .arg(&snapshot)
            .arg("--dbname")
            .arg(&db);
        let (mut child, tail) =
            self.spawn(cmd, "pg_dump", false)
                .map_err(|source| DumpError::Spawn {
                    tool: "pg_dump".into(),
                    source,
                })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        // Counted in the exported snapshot while pg_dump streams; the transaction stays
        // open until pg_dump has finished.
        let counting = tokio::spawn(async move {
            let counts = database_counts(&client).await;
            (client, counts)
        });
        let tool_version = self.tools.version("pg_dump");
        let finish = async move {
            let status = tokio::task::spawn_blocking(move || child.wait())
                .await
                .map_err(|e| DumpError::Source(format!("waiting for pg_dump: {e}")))?
                .map_err(|e| DumpError::Source(format!("waiting for pg_dump: {e}")))?;
            tail.wait();
            let (client, counts) = counting
                .await
                .map_err(|e| DumpError::Source(format!("counting rows: {e}")))?;
            let _ = client.batch_execute("COMMIT").await;
            if !status.success() {
                return Err(DumpError::Tool {
                    tool: "pg_dump".into(),
                    status: describe_status(status),
                    stderr: tail.text(),
                });
            }
            let counts =
                counts.map_err(|e| DumpError::Source(format!("counting rows in {db:?}: {e}")))?;
            let summary = format!(
                "{} tables, {} rows",
                counts.rows.len(),
                counts.rows.values().sum::<i64>()
            );
            Ok(DumpOutcome {
                source: Source {
                    tool: "pg_dump".into(),
                    tool_version,
                    server_version,
                },
                counts: counts.to_json(),
                summary,
            })
        };
        Ok(DumpStream {
            reader: Box::new(stdout),
            finish: finish.boxed(),
        })
    }

    async fn dump_globals(&self) -> Result<DumpStream, DumpError> {
        let client = self
            .connect(&self.cfg.maintenance_database)
            .await
            .map_err(DumpError::Source)?;
        let row = client
            .query_one(
                "SELECT current_setting('server_version'), \
                 (SELECT count(*) FROM pg_roles WHERE rolname !~ '^pg_')",
                &[],
            )
            .await
            .map_err(|e| DumpError::Source(e.to_string()))?;
        let server_version: String = row.get(0);
        let roles: i64 = row.get(1);
        let mut cmd = self.command("pg_dumpall");
        cmd.arg("--roles-only")
            .arg("--database")
            .arg(&self.cfg.maintenance_database);
        if !self.cfg.role_passwords {
            cmd.arg("--no-role-passwords");
        }
        let (mut child, tail) =
            self.spawn(cmd, "pg_dumpall", false)
                .map_err(|source| DumpError::Spawn {
                    tool: "pg_dumpall".into(),
                    source,
                })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let tool_version = self.tools.version("pg_dumpall");
        let finish = async move {
            let status = tokio::task::spawn_blocking(move || child.wait())
                .await
                .map_err(|e| DumpError::Source(e.to_string()))?
                .map_err(|e| DumpError::Source(e.to_string()))?;
            tail.wait();
            if !status.success() {
                return Err(DumpError::Tool {
                    tool: "pg_dumpall".into(),
                    status: describe_status(status),
                    stderr: tail.text(),
                });
            }
            Ok(DumpOutcome {
                source: Source {
                    tool: "pg_dumpall".into(),
                    tool_version,
                    server_version,
                },
                counts: serde_json::json!({ "roles": roles }),
                summary: format!("{roles} roles"),
            })
        };
        Ok(DumpStream {
            reader: Box::new(stdout),
            finish: finish.boxed(),
        })
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

/// Counts rows of every user table through `client` (inside whatever transaction it has).
async fn database_counts(client: &Client) -> Result<DatabaseCounts, tokio_postgres::Error> {
    let db = client
        .query_one(
            "SELECT pg_catalog.pg_get_userbyid(datdba), pg_catalog.pg_encoding_to_char(encoding) \
             FROM pg_catalog.pg_database WHERE datname = current_database()",
            &[],
        )
        .await?;
    let tables = client
        .query(
            "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname !~ '^pg_(toast|temp)' \
               AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
                   WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e') \
             ORDER BY 1, 2",
            &[],
        )
        .await?;
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
    Ok(DatabaseCounts {
        owner: db.get(0),
        encoding: db.get(1),
        rows,
    })
}

/// Differences between expected (manifest) and restored counts, one line each.
fn count_differences(expected: &DatabaseCounts, found: &DatabaseCounts) -> Vec<String> {
    let mut out = Vec::new();
    for (table, n) in &expected.rows {
        match found.rows.get(table) {
            None => out.push(format!(
                "table {table} is missing ({n} rows in the manifest)"
            )),
            Some(m) if m != n => out.push(format!(
                "table {table}: {n} rows in the manifest, {m} restored"
            )),
            _ => {}
        }
    }
    for table in found
        .rows
        .keys()
        .filter(|t| !expected.rows.contains_key(*t))
    {
        out.push(format!("table {table} is not in the manifest"));
    }
    out
}

impl Dumper for Postgres {
    fn parts(&self) -> &'static [Part] {
        PARTS
    }

    fn dump<'a>(&'a self, part: &'a Part) -> BoxFuture<'a, Result<DumpStream, DumpError>> {
        async move {
            if *part == GLOBALS {
                self.dump_globals().await
            } else {
                self.dump_main().await
            }
        }
        .boxed()
    }
}

impl Restorer for Postgres {
    /// The pg_dump archive goes into a scratch database; the globals part is SQL that
    /// psql executes against the live cluster as it reads, so it is checked first.
    fn stages_part(&self, manifest: &Manifest) -> bool {
        manifest.part == MAIN.name && manifest.format == MAIN.format
    }

    /// The scratch (`<target>__ferry_new_<job>`) and old (`<target>__ferry_old_<job>`)
    /// databases of `target_database` (see [`super::leftovers`]), job by job.
    fn recover<'a>(
        &'a self,
        skip: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<super::leftovers::Recovered>, RestoreError>> {
        async move {
            let Some(target) = self.cfg.target_database.clone() else {
                return Ok(Vec::new());
            };
            let db = &self.cfg.maintenance_database;
            let mut config = self.pg_config(db);
            config.connect_timeout(std::time::Duration::from_secs(RECOVER_CONNECT_SECONDS));
            let client = self
                .connect_with(config, db)
                .await
                .map_err(RestoreError::Target)?;
            let names: Vec<String> = client
                .query("SELECT datname FROM pg_catalog.pg_database", &[])
                .await
                .map_err(|e| RestoreError::Target(format!("listing databases: {e}")))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut store = Databases { client };
            let mut out = Vec::new();
            for (job, (new, old)) in leftover_jobs(&target, &names) {
                if super::leftovers::skipped(&job, skip) {
                    continue;
                }
                let exists = store.exists(&target).await.map_err(RestoreError::Target)?;
                let (new_name, old_name) = (
                    scratch_name(&target, NEW_TAG, &job),
                    scratch_name(&target, OLD_TAG, &job),
                );
                let swap = super::leftovers::Swap {
                    job: &job,
                    target: &target,
                    old: &old_name,
                    new: &new_name,
                    exists: (exists, old, new),
                };
                out.extend(super::leftovers::recover_swap(&mut store, swap).await);
            }
            Ok(out)
        }
        .boxed()
    }

    fn smoke(&self) -> BoxFuture<'_, Result<Vec<String>, RestoreError>> {
        async move {
            let db = self.cfg.target_database.clone().unwrap_or_default();
            let client = self.connect(&db).await.map_err(RestoreError::Target)?;
            super::run_smoke(&self.cfg.smoke, |c| {
                let client = &client;
                async move {
                    let sql = c
                        .sql
                        .as_deref()
                        .ok_or("a PostgreSQL smoke check needs sql")?;
                    let row = client
                        .query_one(sql, &[])
                        .await
                        .map_err(|e| format!("{sql}: {e}"))?;
                    let n: i64 = row
                        .try_get(0)
                        .map_err(|e| format!("{sql}: not one integer: {e}"))?;
                    Ok((sql.to_owned(), n))
                }
            })
            .await
        }
        .boxed()
    }

    fn begin<'a>(
        &'a self,
        main: &'a Manifest,
        job_id: &'a str,
        namespaces: &'a [String],
    ) -> BoxFuture<'a, Result<Box<dyn RestoreSession>, RestoreError>> {
        async move {
            if !namespaces.is_empty() {
                return Err(RestoreError::Manifest(
                    "a PostgreSQL backup is restored whole; --ns selects MongoDB namespaces".into(),
                ));
            }
            super::expect_main(main, "postgres", &MAIN, "a PostgreSQL pg_dump archive")?;
            let expected = DatabaseCounts::from_json(&main.counts).ok_or_else(|| {
                RestoreError::Manifest(format!(
                    "manifest of {} has no PostgreSQL row counts",
                    main.file
                ))
            })?;
            let target = self
                .cfg
                .target_database
                .clone()
                .ok_or_else(|| RestoreError::Target("no target_database configured".into()))?;
            let session = PgRestore {
                pg: self.clone(),
                scratch: scratch_name(&target, NEW_TAG, job_id),
                old: scratch_name(&target, OLD_TAG, job_id),
                target,
                expected,
                created: false,
                roles_applied: false,
            };
            let maint = session.maintenance().await?;
            maint
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    quote_ident(&session.scratch)
                ))
                .await
                .map_err(|e| RestoreError::Target(e.to_string()))?;
            Ok(Box::new(session) as Box<dyn RestoreSession>)
        }
        .boxed()
    }
}

/// A PostgreSQL restore in progress: the scratch database beside the target.
struct PgRestore {
    pg: Postgres,
    target: String,
    scratch: String,
    old: String,
    expected: DatabaseCounts,
    created: bool,
    /// psql has been given the globals part: roles of the backup may now exist in the
    /// live cluster, whatever becomes of the restore.
    roles_applied: bool,
}

impl PgRestore {
    async fn maintenance(&self) -> Result<Client, RestoreError> {
        self.pg
            .connect(&self.pg.cfg.maintenance_database)
            .await
            .map_err(RestoreError::Target)
    }

    fn tool_sink(
        &self,
        tool: &'static str,
        cmd: Command,
        check: fn(&StderrTail) -> Result<(), String>,
    ) -> Result<PartSink, RestoreError> {
        let (mut child, tail) =
            self.pg
                .spawn(cmd, tool, true)
                .map_err(|source| RestoreError::Spawn {
                    tool: tool.into(),
                    source,
                })?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let finish = async move {
            let status = tokio::task::spawn_blocking(move || child.wait())
                .await
                .map_err(|e| RestoreError::Target(e.to_string()))?
                .map_err(|e| RestoreError::Target(e.to_string()))?;
            tail.wait();
            if !status.success() {
                return Err(RestoreError::Tool {
                    tool: tool.into(),
                    status: describe_status(status),
                    stderr: tail.text(),
                });
            }
            check(&tail).map_err(|stderr| RestoreError::Tool {
                tool: tool.into(),
                status: "errors reported".into(),
                stderr,
            })
        };
        Ok(PartSink {
            writer: Box::new(stdin),
            finish: finish.boxed(),
        })
    }

    async fn restore_globals(&mut self) -> Result<PartSink, RestoreError> {
        let mut cmd = self.pg.command("psql");
        cmd.args([
            "--no-psqlrc",
            "--quiet",
            "--set",
            "ON_ERROR_STOP=0",
            "--file",
            "-",
            "--dbname",
        ])
        .arg(&self.pg.cfg.maintenance_database);
        // Roles that already exist (at least the connecting superuser) are expected.
        fn check(tail: &StderrTail) -> Result<(), String> {
            let errors: Vec<String> = tail
                .lines()
                .into_iter()
                .filter(|l| l.contains("ERROR:") && !l.contains("already exists"))
                .collect();
            if errors.is_empty() {
                Ok(())
            } else {
                Err(errors.join(" | "))
            }
        }
        self.tool_sink("psql", cmd, check)
    }

    async fn restore_main(&mut self) -> Result<PartSink, RestoreError> {
        let maint = self.maintenance().await?;
        let owner_exists = maint
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1",
                &[&self.expected.owner],
            )
            .await
            .map_err(|e| RestoreError::Target(e.to_string()))?
            .is_some();
        let mut create = format!(
            "CREATE DATABASE {} TEMPLATE template0 ENCODING '{}'",
            quote_ident(&self.scratch),
            self.expected.encoding.replace('\'', "")
        );
        if owner_exists {
            create.push_str(&format!(" OWNER {}", quote_ident(&self.expected.owner)));
        }
        maint.batch_execute(&create).await.map_err(|e| {
            RestoreError::Target(format!("creating scratch database {}: {e}", self.scratch))
        })?;
        self.created = true;
        let mut cmd = self.pg.command("pg_restore");
        cmd.args(["--clean", "--if-exists", "--exit-on-error", "--dbname"])
            .arg(&self.scratch);
        self.tool_sink("pg_restore", cmd, |_| Ok(()))
    }

    async fn swap(&mut self) -> Result<(), RestoreError> {
        let maint = self.maintenance().await?;
        let target_exists = maint
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_database WHERE datname = $1",
                &[&self.target],
            )
            .await
            .map_err(|e| RestoreError::Target(e.to_string()))?
            .is_some();
        let terminate = "SELECT pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity \
                         WHERE datname = $1 AND pid <> pg_backend_pid()";
        if target_exists {
            let mut last = None;
            for _ in 0..5 {
                let _ = maint.execute(terminate, &[&self.target]).await;
                match maint
                    .batch_execute(&format!(
                        "ALTER DATABASE {} RENAME TO {}",
                        quote_ident(&self.target),
                        quote_ident(&self.old)
                    ))
                    .await
                {
                    Ok(()) => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            if let Some(e) = last {
                return Err(RestoreError::Target(format!(
                    "cannot move the live database {:?} aside (still in use?): {e}; it is unchanged",
                    self.target
                )));
            }
        }
        let _ = maint.execute(terminate, &[&self.scratch]).await;
        if let Err(e) = maint
            .batch_execute(&format!(
                "ALTER DATABASE {} RENAME TO {}",
                quote_ident(&self.scratch),
                quote_ident(&self.target)
            ))
            .await
        {
            let back = if target_exists {
                maint
                    .batch_execute(&format!(
                        "ALTER DATABASE {} RENAME TO {}",
                        quote_ident(&self.old),
                        quote_ident(&self.target)
                    ))
                    .await
            } else {
                Ok(())
            };
            return Err(RestoreError::Target(match back {
                Ok(()) => format!(
                    "cannot rename the restored database into place: {e}; {:?} is unchanged",
                    self.target
                ),
                Err(e2) => format!(
                    "cannot rename the restored database into place: {e}; and cannot put the old one back: {e2}. \
                     THE TARGET IS NOT IN PLACE: the old data is in database {:?}, the restored data in {:?}",
                    self.old, self.scratch
                ),
            }));
        }
        self.created = false;
        if target_exists
            && let Err(e) = maint
                .batch_execute(&format!(
                    "DROP DATABASE {} WITH (FORCE)",
                    quote_ident(&self.old)
                ))
                .await
        {
            tracing::warn!(database = %self.old, error = %e, "Could not drop the replaced database; drop it by hand.");
        }
        Ok(())
    }
}

impl RestoreSession for PgRestore {
    fn target_state(&self) -> Option<String> {
        self.roles_applied.then(|| {
            format!(
                "database {:?} was left as it was, but the backup's roles (its globals part, \
                 checked before it was applied) were created or altered in the cluster",
                self.target
            )
        })
    }

    fn part<'a>(
        &'a mut self,
        manifest: &'a Manifest,
    ) -> BoxFuture<'a, Result<PartSink, RestoreError>> {
        async move {
            match (manifest.part.as_str(), manifest.format.as_str()) {
                ("globals", "sql") => {
                    self.roles_applied = true;
                    self.restore_globals().await
                }
                ("", "pgdump") => self.restore_main().await,
                (part, format) => Err(RestoreError::Manifest(format!(
                    "{}: unexpected part {part:?} of format {format:?} for PostgreSQL",
                    manifest.file
                ))),
            }
        }
        .boxed()
    }

    fn commit<'a>(
        &'a mut self,
        _main: &'a Manifest,
    ) -> BoxFuture<'a, Result<String, RestoreError>> {
        async move {
            if !self.created {
                return Err(RestoreError::Manifest(
                    "the backup has no main pg_dump part".into(),
                ));
            }
            let found = {
                let client = self
                    .pg
                    .connect(&self.scratch)
                    .await
                    .map_err(RestoreError::Target)?;
                database_counts(&client)
                    .await
                    .map_err(|e| RestoreError::Target(format!("counting restored rows: {e}")))?
            };
            let diff = count_differences(&self.expected, &found);
            if !diff.is_empty() {
                return Err(RestoreError::Mismatch(diff.join("; ")));
            }
            self.swap().await?;
            Ok(format!(
                "{} tables, {} rows restored into database {:?}, equal to the manifest",
                found.rows.len(),
                found.rows.values().sum::<i64>(),
                self.target
            ))
        }
        .boxed()
    }

    fn abort<'a>(&'a mut self) -> BoxFuture<'a, ()> {
        async move {
            if !self.created {
                return;
            }
            match self.maintenance().await {
                Ok(maint) => {
                    if let Err(e) = maint
                        .batch_execute(&format!(
                            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                            quote_ident(&self.scratch)
                        ))
                        .await
                    {
                        tracing::warn!(database = %self.scratch, error = %e, "Could not drop the scratch database.");
                    }
                }
                Err(e) => tracing::warn!(database = %self.scratch, error = %e, "Could not drop the scratch database."),
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_the_table() {
        let mut a = DatabaseCounts::default();
        a.rows.insert("public.t".into(), 10);
        a.rows.insert("public.u".into(), 1);
        let mut b = a.clone();
        b.rows.insert("public.t".into(), 9);
        b.rows.remove("public.u");
        let d = count_differences(&a, &b).join("; ");
        assert!(
            d.contains("public.t: 10 rows in the manifest, 9 restored"),
            "{d}"
        );
        assert!(d.contains("public.u is missing"), "{d}");
        assert_eq!(DatabaseCounts::from_json(&a.to_json()), Some(a));
    }

    #[test]
    fn scratch_names_fit_postgres_identifiers() {
        let long = "x".repeat(63);
        assert_eq!(truncate(&long, 10).len(), 10);
        assert_eq!(truncate("ééé", 3), "é");
    }

    #[test]
    fn leftovers_are_the_exact_scratch_names_of_the_target() {
        let job = "01JAAAAAAAAAAAAAAAAAAAAAAA";
        let other = "01JBBBBBBBBBBBBBBBBBBBBBBB";
        let long = "t".repeat(60);
        let names: Vec<String> = vec![
            "app".into(),
            scratch_name("app", NEW_TAG, job),
            scratch_name("app", OLD_TAG, other),
            // Another target's, a job id in the wrong case, not a ULID, a user's database.
            scratch_name("app2", NEW_TAG, job),
            format!("app{NEW_TAG}{job}"),
            format!("app{NEW_TAG}01jaaaaaaaaaaaaaaaaaaaaaa"),
            "app__ferry_new_backup".into(),
            scratch_name(&long, NEW_TAG, job),
        ];
        assert_eq!(names[1], "app__ferry_new_01jaaaaaaaaaaaaaaaaaaaaaaa");
        let found = leftover_jobs("app", &names);
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            [
                (job.to_owned(), (true, false)),
                (other.to_owned(), (false, true))
            ]
        );
        // A long target's names are cut as the restore cuts them.
        assert_eq!(scratch_name(&long, NEW_TAG, job).len(), MAX_IDENTIFIER);
        assert_eq!(leftover_jobs(&long, &names).len(), 1);
    }

    #[test]
    fn roles_need_their_own_database_field() {
        let cfg: PostgresConfig = toml::from_str("name = \"pg\"\ndatabase = \"app\"").unwrap();
        assert!(Postgres::build(cfg.clone(), Role::Production).is_ok());
        let err = Postgres::build(cfg, Role::Staging).unwrap_err();
        assert_eq!(err.0, "target_database");
    }
}
