//! Datastores are plug-ins. A kind is one folder implementing [`Datastore`] (name, kind,
//! check, tool versions, leftovers of interrupted restores) and either [`Dumper`] and
//! [`Restorer`] (dated archives streamed through the pipeline, which sees only byte
//! streams) or [`Repository`] (a repository it writes on the backup server itself, the job
//! runner handing it the whole job). [`build`] turns a `[[datastores]]` entry into an
//! `Arc<dyn Datastore>` with one match arm per [`DatastoreConfig`] variant, calling the
//! kind's own `build(config, role)`; nothing else names a kind. README.md, "Adding a
//! datastore", lists what a new kind takes.
//!
//! Errors: [`DatastoreConfigError`] for an entry that cannot be built (its field, which
//! the agent's config error places as `datastores[<i>].<field>`), [`CheckError`] for
//! `ferry-agent check`, [`DumpError`] and [`RestoreError`] for the two sides, and
//! [`ToolError`] for a command-line tool that failed.
//!
//! - [`postgres`]: `pg_dump --format=custom` plus the cluster's roles (`pg_dumpall
//!   --roles-only`), restored with `psql` and `pg_restore` beside the target, then swapped;
//!   or (`method = "physical"`) a `pg_basebackup` tar of the whole cluster, restored as a new
//!   data directory checked by PostgreSQL beside the live one, then swapped.
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

use crate::job::JobError;

pub mod common;
pub mod error;
pub mod etcd;
pub mod files;
pub mod influxdb;
pub mod mongodb;
pub mod pgbackrest;
pub mod postgres;
pub mod recovery;
mod stream;

pub use common::tool::{
    ReapedChild, StderrTail, ToolError, ToolPaths, describe_status, output as run_tool,
};
pub use error::{DumpError, RestoreError};
pub use recovery::Recovery;
pub use stream::{
    DumpOutcome, DumpStream, Dumper, Part, PartSink, PointInTime, Repository, RestoreSession,
    Restorer, expect_main, expect_whole,
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
    /// [`CheckError`]: what failed and where, for `ferry-agent check`.
    fn check(&self) -> BoxFuture<'_, Result<String, CheckError>>;

    /// How this datastore's backups are made and restored.
    fn mode(&self) -> Mode<'_>;

    /// Whether this datastore's WAL is archived through the agent's `[wal]` socket
    /// ([`crate::wal`]): a physical PostgreSQL datastore. `false` by default.
    fn archives_wal(&self) -> bool {
        false
    }

    /// The MongoDB datastore whose oplog this agent archives in slices, with its
    /// `oplog_slice_seconds` ([`mongodb::slices`]). `None` by default.
    fn oplog_slices(&self) -> Option<(mongodb::Mongo, u64)> {
        None
    }

    /// Whether a restore of this datastore to a point in time replays archived oplog
    /// slices after its dump (MongoDB). `false` by default.
    fn replays_oplog(&self) -> bool {
        false
    }

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

impl<'a> Mode<'a> {
    /// Both sides from one value that implements them, as most kinds do.
    pub fn streamed<T: Dumper + Restorer>(both: &'a T) -> Self {
        Mode::Streamed {
            dumper: both,
            restorer: both,
        }
    }
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
/// checked as every stored name is ([`ferry_core::layout::validate_name`]), then its kind's own
/// fields, by the kind's `build`. One arm per kind.
///
/// # Errors
/// [`DatastoreConfigError`] naming the field (`name`, or one of the kind's) that is missing,
/// wrong for the role, or not acceptable.
pub fn build(
    config: DatastoreConfig,
    role: Role,
) -> Result<Arc<dyn Datastore>, DatastoreConfigError> {
    match config {
        DatastoreConfig::Postgres(c) => {
            named(&c.name.clone(), || postgres::Postgres::build(c, role))
        }
        DatastoreConfig::Mongodb(c) => named(&c.name.clone(), || mongodb::Mongo::build(c, role)),
        DatastoreConfig::Files(c) => named(&c.name.clone(), || files::Files::build(c, role)),
        DatastoreConfig::Etcd(c) => named(&c.name.clone(), || etcd::Etcd::build(c, role)),
        DatastoreConfig::Influxdb(c) => named(&c.name.clone(), || influxdb::Influx::build(c, role)),
        DatastoreConfig::Pgbackrest(c) => {
            named(&c.name.clone(), || pgbackrest::PgBackRest::build(c, role))
        }
    }
}

/// Checks the datastore `name`, then runs the kind's `build`.
fn named<D: Datastore + 'static>(
    name: &str,
    build: impl FnOnce() -> Result<D, DatastoreConfigError>,
) -> Result<Arc<dyn Datastore>, DatastoreConfigError> {
    ferry_core::layout::validate_name("datastore", name).map_err(|e| {
        DatastoreConfigError::Invalid {
            field: "name".into(),
            message: e.to_string(),
        }
    })?;
    Ok(Arc::new(build()?))
}

/// A `[[datastores]]` entry that cannot be used. [`DatastoreConfigError::field`] names the
/// field within the entry (`target_database`, `smoke[0]`), which the agent's config error
/// places as `datastores[<i>].<field>`; the message says what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreConfigError {
    /// A field this role needs is not set.
    #[error("missing: {what}")]
    Missing {
        /// The field.
        field: &'static str,
        /// What it holds, e.g. `the database to back up`.
        what: &'static str,
    },
    /// A field that only an agent of the other role takes.
    #[error("{why}")]
    WrongRole {
        /// The field.
        field: &'static str,
        /// Why this role does not take it, and what to do.
        why: &'static str,
    },
    /// A value that is not acceptable.
    #[error("{message}")]
    Invalid {
        /// The field, e.g. `uri` or `smoke[1]`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A secret (a password file or variable, a key file) that cannot be read or that
    /// others may read.
    #[error("{message}")]
    Secret {
        /// The field, e.g. `password_file`.
        field: String,
        /// What is wrong, naming the file or variable.
        message: String,
    },
}

impl DatastoreConfigError {
    /// The field within the `[[datastores]]` entry.
    pub fn field(&self) -> &str {
        match self {
            DatastoreConfigError::Missing { field, .. }
            | DatastoreConfigError::WrongRole { field, .. } => field,
            DatastoreConfigError::Invalid { field, .. }
            | DatastoreConfigError::Secret { field, .. } => field,
        }
    }

    /// A value of `field` that is not acceptable, and why.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        DatastoreConfigError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A secret that [`ferry_core::secrets::read_password`] or its kin refused; the field
    /// is the one the error names ([`ferry_core::secrets::SecretError::field`]).
    pub fn secret(e: ferry_core::secrets::SecretError) -> Self {
        DatastoreConfigError::Secret {
            field: e.field().to_owned(),
            message: e.to_string(),
        }
    }
}

/// Why `ferry-agent check` could not vouch for a datastore ([`Datastore::check`]).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The server could not be reached, or refused or failed a query: what was asked
    /// and what it said.
    #[error("{0}")]
    Server(String),
    /// A tool failed.
    #[error("{tool} failed ({}): {}", .failure.status(), .failure.detail())]
    Tool {
        /// The tool and its arguments, e.g. `etcdctl endpoint status`.
        tool: String,
        /// How it failed.
        failure: ToolError,
    },
    /// The directory to back up or to restore into, or a file the kind writes, is not
    /// usable: which and why.
    #[error("{0}")]
    Path(String),
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn entry(text: &str) -> DatastoreConfig {
        toml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn each_kind_builds_into_a_datastore_of_its_kind_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let pass = dir.path().join("cipher");
        std::fs::write(&pass, "a passphrase of 24 chars").unwrap();
        std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
        let pgbackrest = format!(
            "name = \"pgbr\"\nkind = \"pgbackrest\"\ndata_dir = \"/var/lib/pg\"\n\
             repo_dir = \"/var/lib/repo\"\nconfig_file = \"/etc/pgbackrest.conf\"\n\
             cipher_pass_file = {:?}",
            pass.display().to_string()
        );
        // (entry, kind, repository, backup types, namespaces)
        let cases: [(&str, &str, bool, &[&str], bool); 7] = [
            (
                "name = \"pg\"\nkind = \"postgres\"\ndatabase = \"app\"",
                "postgres",
                false,
                &[],
                false,
            ),
            (
                "name = \"mongo\"\nkind = \"mongodb\"\nuri = \"mongodb://127.0.0.1:27017\"",
                "mongodb",
                false,
                &[],
                true,
            ),
            (
                "name = \"data\"\nkind = \"files\"\npath = \"/srv/data\"",
                "files",
                false,
                &[],
                false,
            ),
            (
                "name = \"data\"\nkind = \"files\"\npath = \"/srv/data\"\nmethod = \"rsync\"",
                "files",
                true,
                &[],
                false,
            ),
            (
                "name = \"etcd\"\nkind = \"etcd\"\nendpoint = \"http://127.0.0.1:2379\"",
                "etcd",
                false,
                &[],
                false,
            ),
            (
                "name = \"influx\"\nkind = \"influxdb\"",
                "influxdb",
                false,
                &[],
                false,
            ),
            (&pgbackrest, "pgbackrest", true, &["full", "diff"], false),
        ];
        for (text, kind, repository, types, namespaces) in cases {
            let ds = build(entry(text), Role::Production).unwrap_or_else(|e| panic!("{text}: {e}"));
            let name = text.lines().next().unwrap();
            assert_eq!(format!("name = {:?}", ds.name()), name);
            assert_eq!(ds.kind(), kind, "{text}");
            assert_eq!(ds.repository().is_some(), repository, "{text}");
            assert_eq!(ds.dumper().is_ok(), !repository, "{text}");
            assert_eq!(ds.restorer().is_ok(), !repository, "{text}");
            assert_eq!(ds.backup_types(), types, "{text}");
            assert_eq!(ds.takes_namespaces(), namespaces, "{text}");
            assert!(!ds.tool_versions().is_empty(), "{text}");
        }
    }

    #[test]
    fn a_refused_entry_names_its_field_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("password");
        std::fs::write(&open, "secret\n").unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
        let cases = [
            (
                "name = \"a/b\"\nkind = \"files\"\npath = \"/srv/data\"".to_owned(),
                Role::Production,
                "name",
                "",
            ),
            (
                "name = \"pg\"\nkind = \"postgres\"".to_owned(),
                Role::Production,
                "database",
                "missing: the database to back up",
            ),
            (
                "name = \"pg\"\nkind = \"postgres\"\ntarget_database = \"app\"\n\
                 smoke = [{ ns = \"app.a\", min = 1 }]"
                    .to_owned(),
                Role::Staging,
                "smoke[0]",
                "this datastore's smoke checks take sql (and min)",
            ),
            (
                "name = \"mongo\"\nkind = \"mongodb\"\nuri = \"mongodb://127.0.0.1\"\n\
                 smoke = [{ ns = \"app.a\", min = 1 }]"
                    .to_owned(),
                Role::Production,
                "smoke",
                "smoke checks run after restores: staging agents only",
            ),
            (
                format!(
                    "name = \"pg\"\nkind = \"postgres\"\ndatabase = \"app\"\npassword_file = {:?}",
                    open.display().to_string()
                ),
                Role::Production,
                "password_file",
                "chmod 600",
            ),
            (
                "name = \"etcd\"\nkind = \"etcd\"\ndata_dir = \"/var/lib/etcd\"".to_owned(),
                Role::Staging,
                "initial_cluster",
                "missing: e.g. default=http://127.0.0.1:2380",
            ),
            (
                "name = \"data\"\nkind = \"files\"\npath = \"/srv/data\"\nexclude = [\"a[\"]"
                    .to_owned(),
                Role::Production,
                "exclude",
                "\"a[\"",
            ),
        ];
        for (text, role, field, says) in cases {
            let Err(e) = build(entry(&text), role) else {
                panic!("{text} was accepted");
            };
            assert_eq!(e.field(), field, "{text}: {e}");
            assert!(e.to_string().contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn a_smoke_check_on_production_is_refused_for_its_role() {
        let text = "name = \"pg\"\nkind = \"postgres\"\ndatabase = \"app\"\n\
                    smoke = [{ sql = \"SELECT 1\", min = 1 }]";
        let Err(e) = build(entry(text), Role::Production) else {
            panic!("accepted");
        };
        assert!(
            matches!(e, DatastoreConfigError::WrongRole { field: "smoke", .. }),
            "{e:?}"
        );
    }
}
