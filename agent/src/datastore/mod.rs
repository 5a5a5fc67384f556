//! Datastores are plug-ins. A kind is one folder implementing [`Datastore`] (name, kind,
//! check, tool versions, leftovers of interrupted restores) and either [`Dumper`] and
//! [`Restorer`] (dated archives streamed through the pipeline, which sees only byte
//! streams) or [`Repository`] (a repository it writes on the backup server itself, the job
//! runner handing it the whole job). [`build`] turns a `[[datastores]]` entry into an
//! `Arc<dyn Datastore>` with one match arm per [`DatastoreConfig`] variant; nothing else
//! names a kind. README.md, "Adding a datastore", lists what a new kind takes.
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
//! - [`common`]: what the kinds share: their tools, directory trees, smoke checks, and the
//!   leftovers of interrupted restores.
//! - [`recovery`]: those leftovers put right on the agent's start and before each restore
//!   (`recover` on a `dyn Datastore`), and told in the next restore's report.

use std::sync::Arc;

use ferry_proto::Role;
use futures::future::BoxFuture;
use serde::Deserialize;

use crate::pipeline::JobError;

pub mod common;
pub mod etcd;
pub mod files;
pub mod influxdb;
pub mod mongodb;
pub mod pgbackrest;
pub mod postgres;
pub mod recovery;
mod stream;

pub use common::tool::{StderrTail, ToolPaths, describe_status, output as run_tool};
pub use recovery::Recovery;
pub use stream::{
    DumpError, DumpOutcome, DumpStream, Dumper, Part, PartSink, Repository, RestoreError,
    RestoreSession, Restorer, expect_main, expect_whole,
};

use common::leftovers::Recovered;

/// A configured datastore of one kind: what the job runner, the gRPC service and
/// `ferry-agent check` ask of it. Each kind implements it in its own folder; [`build`]
/// makes one from a `[[datastores]]` entry.
pub trait Datastore: Send + Sync {
    /// The configured name (`name = "..."`), used in stored file names.
    fn name(&self) -> &str;

    /// The kind as `kind = "..."` spells it, e.g. `postgres`. Manifests carry it, and a
    /// restore refuses a backup of another kind.
    fn kind(&self) -> &'static str;

    /// Versions of the tools this kind runs, `(tool, version line)`; a missing tool reports
    /// its error as the version.
    fn tool_versions(&self) -> Vec<(String, String)>;

    /// Connects to the datastore (production) or looks at the restore target (staging)
    /// and says what it found, e.g. the server version and the database size.
    ///
    /// # Errors
    /// What failed and where, for `ferry-agent check`.
    fn check(&self) -> BoxFuture<'_, Result<String, String>>;

    /// How this datastore's backups are made and restored.
    fn mode(&self) -> Mode<'_>;

    /// Whether a restore may select namespaces (`db.collection`); a kind restored whole
    /// refuses a selection. `false` by default.
    fn takes_namespaces(&self) -> bool {
        false
    }

    /// Staging: finds the leftovers of this datastore's interrupted restores (see
    /// [`common::leftovers`]): only the exact scratch names its restores give beside its
    /// own targets, never those of a job in `skip` (jobs running in this agent). Puts each
    /// job's leftovers right, finishing or undoing its swap, and says what it did. Called
    /// on the agent's start and before each restore, when this datastore runs no job. The
    /// default finds nothing: a kind whose restores leave nothing behind.
    ///
    /// # Errors
    /// [`RestoreError::Target`] if the leftovers cannot be looked for (the server is
    /// unreachable, the directory unreadable); nothing was touched then.
    fn recover_leftovers<'a>(
        &'a self,
        skip: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Recovered>, RestoreError>> {
        let _ = skip;
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// How a datastore is backed up and restored ([`Datastore::mode`]).
pub enum Mode<'a> {
    /// Dated archives streamed through the pipeline: both sides.
    Streamed {
        /// The backup side.
        dumper: &'a dyn Dumper,
        /// The restore side.
        restorer: &'a dyn Restorer,
    },
    /// A repository the datastore writes on the backup server itself (pgBackRest, the
    /// rsync mirror of `files`): the job runner hands it the whole job.
    Repository(&'a dyn Repository),
}

impl dyn Datastore + '_ {
    /// The backup types an order may name (`full`, `diff`): its repository's
    /// ([`Repository::backup_types`]); none for a streamed datastore.
    pub fn backup_types(&self) -> &'static [&'static str] {
        self.repository().map_or(&[], |r| r.backup_types())
    }

    /// The repository, for a datastore that writes its own ([`Mode::Repository`]); `None`
    /// for the datastores whose dated archives stream through the pipeline.
    pub fn repository(&self) -> Option<&dyn Repository> {
        match self.mode() {
            Mode::Repository(r) => Some(r),
            Mode::Streamed { .. } => None,
        }
    }

    /// The backup side of a streamed datastore.
    ///
    /// # Errors
    /// [`JobError::Internal`] for a [`Repository`] datastore (the job runner never
    /// streams those).
    pub fn dumper(&self) -> Result<&dyn Dumper, JobError> {
        match self.mode() {
            Mode::Streamed { dumper, .. } => Ok(dumper),
            Mode::Repository(_) => Err(self.not_streamed()),
        }
    }

    /// The restore side of a streamed datastore.
    ///
    /// # Errors
    /// As [`dumper`](#method.dumper).
    pub fn restorer(&self) -> Result<&dyn Restorer, JobError> {
        match self.mode() {
            Mode::Streamed { restorer, .. } => Ok(restorer),
            Mode::Repository(_) => Err(self.not_streamed()),
        }
    }

    fn not_streamed(&self) -> JobError {
        JobError::Internal(format!(
            "datastore {:?} writes its own repository; it is not streamed",
            self.name()
        ))
    }
}

/// A kind's `[[datastores]]` entry once parsed: its name, and how it becomes a
/// [`Datastore`] for an agent's role. Each kind implements it on its config struct.
pub trait KindConfig {
    /// The configured name.
    fn name(&self) -> &str;

    /// Checks every field for `role` and builds the datastore.
    ///
    /// # Errors
    /// `(field, message)` for a field that is missing or wrong for the role.
    fn build(self: Box<Self>, role: Role) -> Result<Arc<dyn Datastore>, (String, String)>;
}

/// One `[[datastores]]` entry; `kind` picks the variant, each variant a kind's config.
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

/// Builds the datastore of one `[[datastores]]` entry for an agent of `role`: its name
/// checked as every stored name is ([`crate::layout::validate_name`]), then its kind's own
/// fields ([`KindConfig::build`]).
///
/// # Errors
/// `(field, message)` for a field that is missing or wrong for the role.
pub fn build(config: DatastoreConfig, role: Role) -> Result<Arc<dyn Datastore>, (String, String)> {
    let config: Box<dyn KindConfig> = match config {
        DatastoreConfig::Postgres(c) => Box::new(c),
        DatastoreConfig::Mongodb(c) => Box::new(c),
        DatastoreConfig::Files(c) => Box::new(c),
        DatastoreConfig::Etcd(c) => Box::new(c),
        DatastoreConfig::Influxdb(c) => Box::new(c),
        DatastoreConfig::Pgbackrest(c) => Box::new(c),
    };
    crate::layout::validate_name("datastore", config.name())
        .map_err(|e| ("name".to_owned(), e.to_string()))?;
    config.build(role)
}
