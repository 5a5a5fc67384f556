//! Datastores are plug-ins: one module per kind implements [`Dumper`] (backup side) and
//! [`Restorer`] (restore side), and the pipeline sees only byte streams. A kind that
//! writes its own repository on the backup server (pgBackRest, the rsync mirror)
//! implements [`Repository`] instead, and the job runner hands it the whole job. Adding a kind
//! touches its module, [`DatastoreConfig`], and the match arms in this file.
//!
//! - [`postgres`]: `pg_dump --format=custom` plus the cluster's roles (`pg_dumpall
//!   --roles-only`), restored with `psql` and `pg_restore` beside the target, then swapped.
//! - [`mongodb`]: the mongodump archive format written from the driver's raw documents.
//! - [`files`]: a directory tree as a tar stream, restored beside the target and swapped in.
//! - [`influxdb`]: `influxd backup -portable` as a tar stream, restored into scratch
//!   databases, checked, then under the target names.
//! - [`pgbackrest`]: PostgreSQL full and differential backups with pgBackRest, its
//!   repository pushed to the backup server with rsync; restored with `restore --delta`.
//! - [`etcd`]: `etcdctl snapshot save`, restored with `etcdctl snapshot restore` into a new
//!   data directory swapped in while etcd is stopped.
//! - [`leftovers`]: what an interrupted restore leaves beside its target, and how the agent
//!   puts it right on start and before each restore ([`Datastore::recover`]).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::ExitStatus;

use ferry_proto::Role;
use futures::future::BoxFuture;
use serde::Deserialize;

use std::sync::Arc;

use crate::config::Settings;
use crate::pipeline::{JobError, JobReport, Progress};
use ferry_core::manifest::{Manifest, Source};

pub mod etcd;
pub mod files;
pub mod influxdb;
pub mod leftovers;
pub mod mongodb;
pub mod pgbackrest;
pub mod postgres;
mod tool;
pub mod tree;

pub use tool::{StderrTail, ToolPaths, output as run_tool};

/// One stored file of a backup. A backup has one main part (name `""`) and may have
/// companions, stored and restored before it (PostgreSQL's `globals`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    /// `""` for the main part, e.g. `globals` for a companion.
    pub name: &'static str,
    /// The `<format>` of the file name: `pgdump`, `sql`, `archive`, `tar`, `db`.
    pub format: &'static str,
}

/// The dump of one part: its bytes, and a future that resolves once the tool has exited.
pub struct DumpStream {
    /// The dump's bytes (a child's stdout, a driver cursor...). EOF at the end of the dump.
    pub reader: Box<dyn Read + Send>,
    /// Waits for the dump to end and reports whether it was complete. Await it after
    /// `reader` reached EOF (or was dropped).
    pub finish: BoxFuture<'static, Result<DumpOutcome, DumpError>>,
}

/// What a finished dump reports, for the manifest.
#[derive(Clone, Debug, Default)]
pub struct DumpOutcome {
    /// Tool and server versions.
    pub source: Source,
    /// The source's own counts (shape chosen by the kind).
    pub counts: serde_json::Value,
    /// A human line, e.g. `12 tables, 100000 rows`.
    pub summary: String,
}

/// A dump that failed.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// The dump tool could not be started.
    #[error("cannot start {tool}: {source} (is it installed? set bin_dir in the datastore config)")]
    Spawn {
        /// Tool name.
        tool: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The dump tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// Tool name.
        tool: String,
        /// Its exit status.
        status: String,
        /// The last lines of its stderr.
        stderr: String,
    },
    /// The source database refused or failed a query.
    #[error("{0}")]
    Source(String),
}

/// Where restored bytes of one part go: a writer, and a future that resolves once the
/// restore tool has consumed them.
pub struct PartSink {
    /// The part's uncompressed bytes go here. Drop it (close) at the end of the stream.
    pub writer: Box<dyn Write + Send>,
    /// Waits for the restore tool to finish with this part.
    pub finish: BoxFuture<'static, Result<(), RestoreError>>,
}

/// A restore that failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A restore tool could not be started.
    #[error("cannot start {tool}: {source} (is it installed? set bin_dir in the datastore config)")]
    Spawn {
        /// Tool name.
        tool: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// A restore tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// Tool name.
        tool: String,
        /// Its exit status.
        status: String,
        /// The last lines of its stderr.
        stderr: String,
    },
    /// The restored data differs from the manifest.
    #[error("restored data differs from the manifest: {0}")]
    Mismatch(String),
    /// The target refused or failed a query.
    #[error("{0}")]
    Target(String),
    /// The manifest does not describe what this restorer expects.
    #[error("{0}")]
    Manifest(String),
}

impl DumpError {
    /// Maps a failed tool run, `(status, stderr)` as [`run_tool`] returns it, to
    /// [`DumpError::Tool`] naming `tool`.
    pub fn tool(tool: &str) -> impl FnOnce((String, String)) -> DumpError + use<> {
        let tool = tool.to_owned();
        move |(status, stderr)| DumpError::Tool {
            tool,
            status,
            stderr,
        }
    }
}

impl RestoreError {
    /// Maps a failed tool run, `(status, stderr)` as [`run_tool`] returns it, to
    /// [`RestoreError::Tool`] naming `tool`.
    pub fn tool(tool: &str) -> impl FnOnce((String, String)) -> RestoreError + use<> {
        let tool = tool.to_owned();
        move |(status, stderr)| RestoreError::Tool {
            tool,
            status,
            stderr,
        }
    }
}

/// The backup side of a datastore kind.
pub trait Dumper: Send + Sync {
    /// The parts of a backup, in restore order (companions first, main part last).
    fn parts(&self) -> &'static [Part];
    /// Starts dumping `part`.
    fn dump<'a>(&'a self, part: &'a Part) -> BoxFuture<'a, Result<DumpStream, DumpError>>;
}

/// The restore side of a datastore kind.
pub trait Restorer: Send + Sync {
    /// Prepares a restore of the backup that `main` describes (for instance a scratch
    /// database beside the target). Nothing live is touched until
    /// [`RestoreSession::commit`]. `namespaces` (`db.collection`) restricts a restore to
    /// those namespaces where the kind has them; a kind without namespaces refuses a
    /// non-empty list.
    fn begin<'a>(
        &'a self,
        main: &'a Manifest,
        job_id: &'a str,
        namespaces: &'a [String],
    ) -> BoxFuture<'a, Result<Box<dyn RestoreSession>, RestoreError>>;

    /// Whether streaming the part that `manifest` describes leaves every live target as
    /// it was until [`RestoreSession::commit`]: the part goes into a scratch database, a
    /// sibling directory or a local file. Such a part is hashed while it streams and its
    /// size and SHA-256 are checked against the manifest before commit, in one download;
    /// any other part (SQL that a tool executes as it reads, for instance) is downloaded
    /// and checked in a first pass before the restore begins. `false` by default, which
    /// is always safe.
    fn stages_part(&self, manifest: &Manifest) -> bool {
        let _ = manifest;
        false
    }

    /// After a restore: the operator's smoke checks of the restored data (the `smoke`
    /// entries of the datastore's config), each a line like `SELECT count(*) FROM orders
    /// = 1000 (at least 1)`. None by default.
    ///
    /// # Errors
    /// [`RestoreError::Mismatch`] naming the first check below its minimum, or the error
    /// of a check that could not run.
    fn smoke(&self) -> BoxFuture<'_, Result<Vec<String>, RestoreError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Finds the leftovers of this datastore's interrupted restores (see [`leftovers`]):
    /// only the exact scratch names its restores give beside its own targets, never those
    /// of a job in `skip` (jobs running in this agent). Puts each job's leftovers right,
    /// finishing or undoing its swap, and says what it did. Called on the agent's start
    /// and before each restore, when this datastore runs no job. The default finds
    /// nothing: a kind whose restores leave nothing behind.
    ///
    /// # Errors
    /// [`RestoreError::Target`] if the leftovers cannot be looked for (the server is
    /// unreachable, the directory unreadable); nothing was touched then.
    fn recover<'a>(
        &'a self,
        skip: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<leftovers::Recovered>, RestoreError>> {
        let _ = skip;
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// One smoke check of a restored datastore (`smoke = [...]` in a staging datastore's
/// config): PostgreSQL runs `sql` (one row, one integer column) in the target database;
/// MongoDB counts the documents of `ns` (`db.collection`, before `rename`) matching
/// `filter` (Extended JSON, default `{}`). The check passes when the number is at least
/// `min`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmokeCheck {
    /// PostgreSQL: the query.
    pub sql: Option<String>,
    /// MongoDB: the namespace.
    pub ns: Option<String>,
    /// MongoDB: the filter, Extended JSON.
    pub filter: Option<String>,
    /// The least acceptable number.
    pub min: i64,
}

impl SmokeCheck {
    /// Checks a datastore's `smoke` list for `role`: staging only, and each entry with
    /// the field its kind needs (`sql` for PostgreSQL, `ns` for MongoDB).
    ///
    /// # Errors
    /// `(field, message)` naming `smoke[i]`.
    pub fn validate(
        checks: &[SmokeCheck],
        role: Role,
        needs: &str,
    ) -> Result<(), (String, String)> {
        if !checks.is_empty() && role == Role::Production {
            return Err((
                "smoke".into(),
                "smoke checks run after restores: staging agents only".into(),
            ));
        }
        for (i, c) in checks.iter().enumerate() {
            let ok = match needs {
                "sql" => c.sql.is_some() && c.ns.is_none() && c.filter.is_none(),
                _ => c.ns.is_some() && c.sql.is_none(),
            };
            if !ok {
                return Err((
                    format!("smoke[{i}]"),
                    format!("this datastore's smoke checks take {needs} (and min)"),
                ));
            }
        }
        Ok(())
    }

    /// The line for the report: `WHAT = N (at least MIN)`, and whether it passed.
    pub fn judge(&self, what: &str, n: i64) -> (String, bool) {
        (
            format!("{what} = {n} (at least {})", self.min),
            n >= self.min,
        )
    }
}

/// Runs `checks` one by one with `run` (which gives a label and the number).
///
/// # Errors
/// The first failing or erroring check.
pub async fn run_smoke<'a, F, Fut>(
    checks: &'a [SmokeCheck],
    mut run: F,
) -> Result<Vec<String>, RestoreError>
where
    F: FnMut(&'a SmokeCheck) -> Fut,
    Fut: std::future::Future<Output = Result<(String, i64), String>>,
{
    let mut out = Vec::new();
    for c in checks {
        let (what, n) = run(c)
            .await
            .map_err(|e| RestoreError::Target(format!("smoke check failed to run: {e}")))?;
        let (line, ok) = c.judge(&what, n);
        if !ok {
            return Err(RestoreError::Mismatch(format!("smoke check: {line}")));
        }
        out.push(line);
    }
    Ok(out)
}

/// One restore in progress.
pub trait RestoreSession: Send {
    /// A sink for the part that `manifest` describes; parts come in restore order.
    fn part<'a>(
        &'a mut self,
        manifest: &'a Manifest,
    ) -> BoxFuture<'a, Result<PartSink, RestoreError>>;
    /// Checks the restored data against `main` and puts it in place of the live target.
    /// Returns a human summary.
    fn commit<'a>(&'a mut self, main: &'a Manifest) -> BoxFuture<'a, Result<String, RestoreError>>;
    /// Removes whatever was restored beside the target; the target stays as it was.
    fn abort<'a>(&'a mut self) -> BoxFuture<'a, ()>;
    /// How the target is if the restore stops now: `None` while it is untouched (the
    /// default), else a sentence for the operator, e.g. which collections were replaced.
    fn target_state(&self) -> Option<String> {
        None
    }
}

/// A datastore that writes its own repository on the backup server instead of dated
/// archives streamed through the pipeline (pgBackRest, the rsync mirror of `files`): the
/// job runner hands it the whole job.
pub trait Repository: Send + Sync {
    /// The backup types an order may name (`ferry backup --type`); none by default.
    fn backup_types(&self) -> &'static [&'static str] {
        &[]
    }
    /// Backs up into the repository (`backup_type` is one of [`Repository::backup_types`]).
    fn backup<'a>(
        &'a self,
        settings: &'a Arc<Settings>,
        backup_type: Option<String>,
        progress: &'a Progress,
    ) -> BoxFuture<'a, Result<JobReport, JobError>>;
    /// Restores from the source environment's repository; `selection` is the order's
    /// `(date, namespaces)`.
    fn restore<'a>(
        &'a self,
        settings: &'a Arc<Settings>,
        job_id: &'a str,
        selection: (Option<String>, Vec<String>),
        progress: &'a Progress,
    ) -> BoxFuture<'a, Result<JobReport, JobError>>;
}

/// A datastore streamed through the pipeline: both sides.
trait Streamed: Dumper + Restorer {}

impl<T: Dumper + Restorer> Streamed for T {}

/// One `[[datastores]]` entry; `kind` picks the module.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DatastoreConfig {
    /// `kind = "postgres"`.
    Postgres(postgres::PostgresConfig),
    /// `kind = "mongodb"`.
    Mongodb(mongodb::MongoConfig),
    /// `kind = "files"`.
    Files(files::FilesConfig),
    /// `kind = "etcd"`.
    Etcd(etcd::EtcdConfig),
    /// `kind = "influxdb"`.
    Influxdb(influxdb::InfluxConfig),
    /// `kind = "pgbackrest"`.
    Pgbackrest(pgbackrest::PgBackRestConfig),
}

impl DatastoreConfig {
    /// The configured name.
    pub fn name(&self) -> &str {
        match self {
            DatastoreConfig::Postgres(c) => &c.name,
            DatastoreConfig::Mongodb(c) => &c.name,
            DatastoreConfig::Files(c) => &c.name,
            DatastoreConfig::Etcd(c) => &c.name,
            DatastoreConfig::Influxdb(c) => &c.name,
            DatastoreConfig::Pgbackrest(c) => &c.name,
        }
    }
}

/// A built datastore.
pub enum Datastore {
    /// PostgreSQL.
    Postgres(postgres::Postgres),
    /// MongoDB.
    Mongodb(mongodb::Mongo),
    /// A directory tree.
    Files(files::Files),
    /// etcd.
    Etcd(etcd::Etcd),
    /// InfluxDB 1.x.
    Influxdb(influxdb::Influx),
    /// PostgreSQL with pgBackRest (differential). It runs its own job path (no
    /// [`Dumper`] or [`Restorer`]): see [`pgbackrest::PgBackRest::backup`].
    PgBackRest(pgbackrest::PgBackRest),
}

/// Builds a datastore for an agent of `role`.
///
/// # Errors
/// `(field, message)` for a field that is missing or wrong for the role.
pub fn build(config: DatastoreConfig, role: Role) -> Result<Datastore, (String, String)> {
    match config {
        DatastoreConfig::Postgres(c) => postgres::Postgres::build(c, role).map(Datastore::Postgres),
        DatastoreConfig::Mongodb(c) => mongodb::Mongo::build(c, role).map(Datastore::Mongodb),
        DatastoreConfig::Files(c) => files::Files::build(c, role).map(Datastore::Files),
        DatastoreConfig::Etcd(c) => etcd::Etcd::build(c, role).map(Datastore::Etcd),
        DatastoreConfig::Influxdb(c) => influxdb::Influx::build(c, role).map(Datastore::Influxdb),
        DatastoreConfig::Pgbackrest(c) => {
            pgbackrest::PgBackRest::build(c, role).map(Datastore::PgBackRest)
        }
    }
}

impl Datastore {
    /// The configured name.
    pub fn name(&self) -> &str {
        match self {
            Datastore::Postgres(p) => p.name(),
            Datastore::Mongodb(m) => m.name(),
            Datastore::Files(f) => f.name(),
            Datastore::Etcd(e) => e.name(),
            Datastore::Influxdb(i) => i.name(),
            Datastore::PgBackRest(p) => p.name(),
        }
    }

    /// The kind, e.g. `postgres`.
    pub fn kind(&self) -> &'static str {
        match self {
            Datastore::Postgres(_) => "postgres",
            Datastore::Mongodb(_) => "mongodb",
            Datastore::Files(_) => "files",
            Datastore::Etcd(_) => "etcd",
            Datastore::Influxdb(_) => "influxdb",
            Datastore::PgBackRest(_) => "pgbackrest",
        }
    }

    /// The backup types an order may name (`full`, `diff`): its repository's
    /// ([`Repository::backup_types`]); none for a streamed datastore.
    pub fn backup_types(&self) -> &'static [&'static str] {
        self.repository().map_or(&[], |r| r.backup_types())
    }

    /// Whether a restore may select namespaces (`db.collection`): MongoDB's dumps only;
    /// every other kind is restored whole and refuses a selection.
    pub fn takes_namespaces(&self) -> bool {
        matches!(self, Datastore::Mongodb(_))
    }

    /// The repository, for a datastore that writes its own ([`Repository`]); `None` for
    /// the datastores whose dated archives stream through the pipeline.
    pub fn repository(&self) -> Option<&dyn Repository> {
        match self {
            Datastore::PgBackRest(p) => Some(p),
            Datastore::Files(f) if f.is_mirror() => Some(f),
            _ => None,
        }
    }

    /// Both sides of a datastore whose dated archives stream through the pipeline.
    fn streamed(&self) -> Result<&dyn Streamed, JobError> {
        match self {
            Datastore::Postgres(p) => Ok(p),
            Datastore::Mongodb(m) => Ok(m),
            Datastore::Files(f) if !f.is_mirror() => Ok(f),
            Datastore::Etcd(e) => Ok(e),
            Datastore::Influxdb(i) => Ok(i),
            _ => Err(JobError::Internal(format!(
                "datastore {:?} writes its own repository; it is not streamed",
                self.name()
            ))),
        }
    }

    /// The backup side of a streamed datastore.
    ///
    /// # Errors
    /// [`JobError::Internal`] for a [`Repository`] datastore (the job runner never
    /// streams those).
    pub fn dumper(&self) -> Result<&dyn Dumper, JobError> {
        Ok(self.streamed()?)
    }

    /// The restore side of a streamed datastore.
    ///
    /// # Errors
    /// As [`Datastore::dumper`].
    pub fn restorer(&self) -> Result<&dyn Restorer, JobError> {
        Ok(self.streamed()?)
    }

    /// Versions of the tools this kind runs, `(tool, version line)`; a missing tool reports
    /// its error as the version.
    pub fn tool_versions(&self) -> Vec<(String, String)> {
        match self {
            Datastore::Postgres(p) => p.tool_versions(),
            Datastore::Mongodb(m) => m.tool_versions(),
            Datastore::Files(f) => f.tool_versions(),
            Datastore::Etcd(e) => e.tool_versions(),
            Datastore::Influxdb(i) => i.tool_versions(),
            Datastore::PgBackRest(p) => p.tool_versions(),
        }
    }

    /// Connects to the datastore and says what it found (server version, size).
    ///
    /// # Errors
    /// What failed, for `ferry-agent check`.
    pub async fn check(&self) -> Result<String, String> {
        match self {
            Datastore::Postgres(p) => p.check().await,
            Datastore::Mongodb(m) => m.check().await,
            Datastore::Files(f) => f.check().await,
            Datastore::Etcd(e) => e.check().await,
            Datastore::Influxdb(i) => i.check().await,
            Datastore::PgBackRest(p) => p.check().await,
        }
    }
}

/// What [`Datastore::recover`] found of a datastore's interrupted restores and did with it.
#[derive(Clone, Debug, Default)]
pub struct Recovery {
    /// Put right at the agent's start and not yet told in a job's report.
    pub at_start: Vec<leftovers::Recovered>,
    /// Put right now, before this restore.
    pub now: Vec<leftovers::Recovered>,
    /// Why the leftovers could not be looked for, if they could not.
    pub error: Option<String>,
}

/// Recoveries done at the agent's start, by datastore name, until a restore of the
/// datastore reports them ([`Datastore::recover`]).
static AT_START: std::sync::Mutex<BTreeMap<String, Vec<leftovers::Recovered>>> =
    std::sync::Mutex::new(BTreeMap::new());

impl Recovery {
    /// Whether nothing was found and nothing failed.
    pub fn is_empty(&self) -> bool {
        self.at_start.is_empty() && self.now.is_empty() && self.error.is_none()
    }

    /// A sentence for a job's report, `None` if there is nothing to tell: `leftovers of
    /// interrupted restores: at the agent's start, removed ... (job ...); before this
    /// restore, ...`.
    pub fn summary(&self) -> Option<String> {
        if self.is_empty() {
            return None;
        }
        let list = |v: &[leftovers::Recovered]| {
            v.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = Vec::new();
        if !self.at_start.is_empty() {
            parts.push(format!("at the agent's start, {}", list(&self.at_start)));
        }
        if !self.now.is_empty() {
            parts.push(format!("before this restore, {}", list(&self.now)));
        }
        if let Some(e) = &self.error {
            parts.push(format!("they could not be looked for: {e}"));
        }
        Some(format!(
            "leftovers of interrupted restores: {}",
            parts.join("; ")
        ))
    }

    /// Adds [`Recovery::summary`] to a restore's outcome: to the report's summary, or to
    /// the error's text where it has one (a transport error is left as it is; the
    /// recovery is in the agent's log).
    pub fn annotate(&self, result: Result<JobReport, JobError>) -> Result<JobReport, JobError> {
        let Some(note) = self.summary() else {
            return result;
        };
        match result {
            Ok(mut report) => {
                report.summary = format!("{}; {note}", report.summary);
                Ok(report)
            }
            Err(JobError::Restore {
                datastore,
                source,
                target_state,
            }) => Err(JobError::Restore {
                datastore,
                source,
                target_state: format!("{target_state}; {note}"),
            }),
            Err(JobError::Integrity(t)) => Err(JobError::Integrity(format!("{t}; {note}"))),
            Err(JobError::NotFound(t)) => Err(JobError::NotFound(format!("{t}; {note}"))),
            Err(JobError::InvalidArgument(t)) => {
                Err(JobError::InvalidArgument(format!("{t}; {note}")))
            }
            Err(JobError::Internal(t)) => Err(JobError::Internal(format!("{t}; {note}"))),
            Err(JobError::Stage { stage, source }) => Err(JobError::Stage {
                stage,
                source: std::io::Error::new(source.kind(), format!("{source}; {note}")),
            }),
            Err(e) => Err(e),
        }
    }
}

impl Datastore {
    /// Staging: puts right the leftovers of this datastore's interrupted restores
    /// ([`Restorer::recover`]; for `files`, either method) and logs each (event `Leftover
    /// of an interrupted restore`, fields `datastore`, `job_id`, `leftover`, `action`).
    /// `skip`: the jobs running in this agent, whose leftovers are never touched. Call it
    /// only while this datastore runs no job. The returned [`Recovery`] also carries what
    /// [`Datastore::recover_at_start`] did and no job has reported yet.
    pub async fn recover(&self, skip: &[String]) -> Recovery {
        let found = match self {
            Datastore::Files(f) => f.recover_leftovers(skip).await,
            Datastore::PgBackRest(_) => Ok(Vec::new()),
            other => match other.restorer() {
                Ok(r) => r.recover(skip).await,
                Err(_) => Ok(Vec::new()),
            },
        };
        let at_start = AT_START
            .lock()
            .expect("recovery lock")
            .remove(self.name())
            .unwrap_or_default();
        let (now, error) = match found {
            Ok(v) => (v, None),
            Err(e) => {
                tracing::warn!(datastore = %self.name(), error = %e, error_type = "recovery_failed",
                    "Cannot look for the leftovers of interrupted restores.");
                (Vec::new(), Some(e.to_string()))
            }
        };
        for r in &now {
            log_recovered(self.name(), r);
        }
        Recovery {
            at_start,
            now,
            error,
        }
    }

    /// [`Datastore::recover`] at the agent's start (no job runs): what it did is logged,
    /// and kept for the report of this datastore's next restore.
    pub async fn recover_at_start(&self) -> Recovery {
        let mut recovery = self.recover(&[]).await;
        recovery.at_start.append(&mut recovery.now);
        if !recovery.at_start.is_empty() {
            AT_START
                .lock()
                .expect("recovery lock")
                .entry(self.name().to_owned())
                .or_default()
                .extend(recovery.at_start.iter().cloned());
        }
        recovery
    }
}

fn log_recovered(datastore: &str, r: &leftovers::Recovered) {
    match &r.action {
        leftovers::Action::Kept { why } => tracing::warn!(%datastore, job_id = %r.job_id,
            leftover = %r.leftover, action = %r.action_name(), %why,
            "Leftover of an interrupted restore kept; it needs an operator."),
        _ => tracing::info!(%datastore, job_id = %r.job_id, leftover = %r.leftover,
            action = %r.action_name(), "Leftover of an interrupted restore put right: {r}."),
    }
}

/// Checks that `main` is the main part of a `kind` backup in `part.format`, as a restorer
/// of `kind` expects.
///
/// # Errors
/// [`RestoreError::Manifest`] naming the file, what it is, and `what` was expected
/// (e.g. `a MongoDB archive`).
pub fn expect_main(
    main: &Manifest,
    kind: &str,
    part: &Part,
    what: &str,
) -> Result<(), RestoreError> {
    if main.kind != kind || main.part != part.name || main.format != part.format {
        return Err(RestoreError::Manifest(format!(
            "{} is a {} {} backup, not {what}",
            main.file, main.kind, main.format
        )));
    }
    Ok(())
}

/// For kinds restored whole: checks `main` as [`expect_main`] does, refuses a selection of
/// `namespaces`, and parses the manifest's counts as `T`.
///
/// # Errors
/// [`RestoreError::Manifest`]: another kind or format, namespaces given, or counts that
/// are not a `T`.
pub fn expect_whole<T: serde::de::DeserializeOwned>(
    main: &Manifest,
    kind: &str,
    part: &Part,
    what: &str,
    namespaces: &[String],
) -> Result<T, RestoreError> {
    expect_main(main, kind, part, what)?;
    if !namespaces.is_empty() {
        return Err(RestoreError::Manifest(format!(
            "a {kind} datastore has no namespaces; restore it whole"
        )));
    }
    serde_json::from_value(main.counts.clone())
        .map_err(|e| RestoreError::Manifest(format!("{}: counts: {e}", main.file)))
}

/// Formats an exit status for messages: `exit code 1` or `killed by signal 9`.
pub fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}
