//! `kind = "postgres"` in `[[datastores]]`: the fields, and their checks for a role.

use std::path::PathBuf;

use ferry_proto::Role;
use serde::Deserialize;

use super::{MAX_IDENTIFIER, Postgres};
use crate::datastore::common::smoke::SmokeCheck;
use crate::datastore::{DatastoreConfigError, ToolPaths};

/// The most `restore_jobs` a config may ask for.
pub const MAX_RESTORE_JOBS: u32 = 64;

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
    /// `[{ sql = "SELECT count(*) FROM orders", min = 1000 }]`. A logical restore runs
    /// them in `target_database`; a physical one in `smoke_database`, first on the
    /// restored cluster beside the live one (a failure leaves the live cluster as it
    /// was), then on the live cluster once it is swapped in and started.
    #[serde(default)]
    pub smoke: Vec<SmokeCheck>,
    /// Staging, `method = "dump"`: `pg_restore --jobs` (1 to 64). At 1, the default, the
    /// archive streams into `pg_restore`'s stdin and nothing is written on the staging
    /// host. Above 1, `pg_restore` restores that many tables and indexes at once, which
    /// needs the archive as a file: it is written to `scratch_dir` first (as
    /// `ferry-pg-<datastore>-<job>.dump`, mode 0600, removed when the restore ends or, after
    /// a crash, at the agent's next start), and a restore refuses to start when
    /// `scratch_dir` has less room than the archive (its manifest's `bytes_uncompressed`)
    /// plus 5 %.
    #[serde(default = "default_restore_jobs")]
    pub restore_jobs: u32,
    /// Staging, `restore_jobs` above 1: the directory (absolute) the archive is written to
    /// before `pg_restore --jobs` reads it.
    pub scratch_dir: Option<PathBuf>,
    /// `dump` (default): `pg_dump` of one database, restored with `pg_restore`.
    /// `physical`: a base backup of the whole cluster with `pg_basebackup` (see
    /// [`super::basebackup`]), restored as a new data directory beside the live one, checked
    /// and swapped in (see [`super::physical_restore`]).
    #[serde(default)]
    pub method: Method,
    /// Physical, staging: the data directory of the cluster to restore into (absolute;
    /// replaced at the end of a restore, while the cluster is stopped).
    pub data_dir: Option<PathBuf>,
    /// Physical, staging: the OS user that owns `data_dir` and runs PostgreSQL. Default
    /// `postgres`.
    #[serde(default = "default_os_user")]
    pub os_user: String,
    /// Physical, staging: the command that stops the live cluster, e.g.
    /// `["systemctl", "stop", "postgresql@15-main"]`.
    #[serde(default)]
    pub stop_command: Vec<String>,
    /// Physical, staging: the command that starts it again.
    #[serde(default)]
    pub start_command: Vec<String>,
    /// Physical, staging: the port of the PostgreSQL that checks a restored data
    /// directory beside the live cluster. It listens on no TCP address, only on a Unix
    /// socket in a private directory, so the port only names that socket. Default: `port`
    /// + 1.
    pub check_port: Option<u16>,
    /// Physical, staging: the database the smoke checks connect to. Default `postgres`.
    #[serde(default = "default_maintenance")]
    pub smoke_database: String,
}

/// How a `postgres` datastore is backed up (`method = "..."`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// `pg_dump` of one database, plus the cluster's roles.
    #[default]
    Dump,
    /// `pg_basebackup` of the whole cluster (tar format, to stdout, WAL included).
    Physical,
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
fn default_restore_jobs() -> u32 {
    1
}
fn default_os_user() -> String {
    "postgres".into()
}

impl Postgres {
    /// Validates `cfg` for `role` and reads the password.
    ///
    /// # Errors
    /// [`DatastoreConfigError`] naming the field.
    pub fn build(cfg: PostgresConfig, role: Role) -> Result<Self, DatastoreConfigError> {
        match cfg.method {
            Method::Dump => check_dump(&cfg, role)?,
            Method::Physical => check_physical(&cfg, role)?,
        }
        SmokeCheck::validate(&cfg.smoke, role, "sql", |c| {
            c.sql.is_some() && c.ns.is_none() && c.filter.is_none()
        })?;
        for (field, db) in [
            ("database", cfg.database.as_deref()),
            ("target_database", cfg.target_database.as_deref()),
            (
                "maintenance_database",
                Some(cfg.maintenance_database.as_str()),
            ),
            ("smoke_database", Some(cfg.smoke_database.as_str())),
        ] {
            if let Some(db) = db
                && (db.is_empty() || db.len() > MAX_IDENTIFIER || db.contains('\0'))
            {
                return Err(DatastoreConfigError::invalid(
                    field,
                    "must be 1 to 63 bytes, without NUL",
                ));
            }
        }
        let password = ferry_core::secrets::read_password(
            cfg.password_file.as_deref(),
            cfg.password_env.as_deref(),
        )
        .map_err(DatastoreConfigError::secret)?
        .map(ferry_core::secrets::Password);
        let tools = ToolPaths::new(cfg.bin_dir.clone());
        Ok(Self {
            cfg,
            password,
            tools,
            dropping: Default::default(),
        })
    }
}

/// The first of `restore_jobs` (other than 1) and `scratch_dir` that `cfg` sets, for the
/// configs that take neither (production, `method = "physical"`).
fn restore_jobs_key(cfg: &PostgresConfig) -> Option<&'static str> {
    if cfg.restore_jobs != 1 {
        Some("restore_jobs")
    } else if cfg.scratch_dir.is_some() {
        Some("scratch_dir")
    } else {
        None
    }
}

/// `method = "dump"`: each role its own database field, and none of the physical fields.
fn check_dump(cfg: &PostgresConfig, role: Role) -> Result<(), DatastoreConfigError> {
    use DatastoreConfigError::{Missing, WrongRole};
    let physical_only = [
        ("data_dir", cfg.data_dir.is_some()),
        ("stop_command", !cfg.stop_command.is_empty()),
        ("start_command", !cfg.start_command.is_empty()),
        ("check_port", cfg.check_port.is_some()),
    ];
    if let Some((field, _)) = physical_only.iter().find(|(_, set)| *set) {
        return Err(DatastoreConfigError::invalid(
            *field,
            "only method = \"physical\" takes it; remove it or set method = \"physical\"",
        ));
    }
    if !(1..=MAX_RESTORE_JOBS).contains(&cfg.restore_jobs) {
        return Err(DatastoreConfigError::invalid(
            "restore_jobs",
            "must be 1 to 64 (pg_restore --jobs)",
        ));
    }
    if let Some(dir) = &cfg.scratch_dir
        && !dir.is_absolute()
    {
        return Err(DatastoreConfigError::invalid(
            "scratch_dir",
            "must be an absolute path",
        ));
    }
    if role == Role::Staging && cfg.restore_jobs > 1 && cfg.scratch_dir.is_none() {
        return Err(DatastoreConfigError::Missing {
            field: "scratch_dir",
            what: "the directory the archive is written to for pg_restore --jobs (restore_jobs above 1)",
        });
    }
    if role == Role::Production
        && let Some(field) = restore_jobs_key(cfg)
    {
        return Err(WrongRole {
            field,
            why: "only a staging agent restores; remove it",
        });
    }
    match role {
        Role::Production => {
            if cfg.database.is_none() {
                return Err(Missing {
                    field: "database",
                    what: "the database to back up",
                });
            }
            if cfg.target_database.is_some() {
                return Err(WrongRole {
                    field: "target_database",
                    why: "only a staging agent restores; remove it",
                });
            }
        }
        Role::Staging => {
            if cfg.target_database.is_none() {
                return Err(Missing {
                    field: "target_database",
                    what: "the database to restore into",
                });
            }
            if cfg.database.is_some() {
                return Err(WrongRole {
                    field: "database",
                    why: "a staging agent does not back up; use target_database for the restore target",
                });
            }
        }
    }
    Ok(())
}

/// `method = "physical"`: a whole cluster, so no database to dump or restore into;
/// staging needs the data directory and the commands that stop and start the cluster.
fn check_physical(cfg: &PostgresConfig, role: Role) -> Result<(), DatastoreConfigError> {
    use DatastoreConfigError::{Missing, WrongRole};
    let whole = "a physical backup is of the whole cluster; remove it";
    if cfg.database.is_some() {
        return Err(DatastoreConfigError::invalid("database", whole));
    }
    if cfg.target_database.is_some() {
        return Err(DatastoreConfigError::invalid("target_database", whole));
    }
    if let Some(field) = restore_jobs_key(cfg) {
        return Err(DatastoreConfigError::invalid(
            field,
            "only method = \"dump\" restores with pg_restore; remove it",
        ));
    }
    if cfg.role_passwords {
        return Err(DatastoreConfigError::invalid(
            "role_passwords",
            "a physical backup holds the cluster's files, passwords included; remove it",
        ));
    }
    if !cfg
        .os_user
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        || cfg.os_user.is_empty()
    {
        return Err(DatastoreConfigError::invalid("os_user", "not a user name"));
    }
    match role {
        Role::Production => {
            for (field, set) in [
                ("data_dir", cfg.data_dir.is_some()),
                ("stop_command", !cfg.stop_command.is_empty()),
                ("start_command", !cfg.start_command.is_empty()),
                ("check_port", cfg.check_port.is_some()),
            ] {
                if set {
                    return Err(WrongRole {
                        field,
                        why: "only a staging agent restores; remove it",
                    });
                }
            }
        }
        Role::Staging => {
            match &cfg.data_dir {
                None => {
                    return Err(Missing {
                        field: "data_dir",
                        what: "the data directory of the cluster to restore into",
                    });
                }
                Some(d) if !d.is_absolute() || d.parent().is_none() || d.file_name().is_none() => {
                    return Err(DatastoreConfigError::invalid(
                        "data_dir",
                        "must be an absolute path below /",
                    ));
                }
                Some(_) => {}
            }
            if cfg.stop_command.is_empty() {
                return Err(Missing {
                    field: "stop_command",
                    what: "a restore stops the cluster before it swaps the data directory",
                });
            }
            if cfg.start_command.is_empty() {
                return Err(Missing {
                    field: "start_command",
                    what: "a restore starts the cluster again after it swaps the data directory",
                });
            }
            if cfg.check_port() == cfg.port {
                return Err(DatastoreConfigError::invalid(
                    "check_port",
                    "must differ from port",
                ));
            }
        }
    }
    Ok(())
}

impl PostgresConfig {
    /// The port of the PostgreSQL that checks a restored data directory: `check_port`, or
    /// `port` + 1 (`port` - 1 for 65535).
    pub fn check_port(&self) -> u16 {
        self.check_port.unwrap_or(if self.port == u16::MAX {
            self.port - 1
        } else {
            self.port + 1
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_need_their_own_database_field() {
        let cfg: PostgresConfig = toml::from_str("name = \"pg\"\ndatabase = \"app\"").unwrap();
        assert!(Postgres::build(cfg.clone(), Role::Production).is_ok());
        let err = Postgres::build(cfg, Role::Staging).unwrap_err();
        assert_eq!(err.field(), "target_database");
    }

    #[test]
    fn restore_jobs_above_one_need_a_scratch_dir_on_staging_only() {
        let staging = "name = \"pg\"\ntarget_database = \"app\"\n";
        let ok = |text: &str, role| {
            let cfg: PostgresConfig = toml::from_str(text).unwrap();
            Postgres::build(cfg, role).map(|_| ())
        };
        assert!(ok(staging, Role::Staging).is_ok());
        assert!(
            ok(
                &format!("{staging}restore_jobs = 4\nscratch_dir = \"/srv/scratch\""),
                Role::Staging
            )
            .is_ok()
        );
        // (entry, role, field refused)
        let cases = [
            (
                format!("{staging}restore_jobs = 4"),
                Role::Staging,
                "scratch_dir",
            ),
            (
                format!("{staging}restore_jobs = 0"),
                Role::Staging,
                "restore_jobs",
            ),
            (
                format!("{staging}restore_jobs = 65\nscratch_dir = \"/s\""),
                Role::Staging,
                "restore_jobs",
            ),
            (
                format!("{staging}restore_jobs = 2\nscratch_dir = \"rel\""),
                Role::Staging,
                "scratch_dir",
            ),
            (
                "name = \"pg\"\ndatabase = \"app\"\nrestore_jobs = 2".to_owned(),
                Role::Production,
                "restore_jobs",
            ),
            (
                "name = \"pg\"\ndatabase = \"app\"\nscratch_dir = \"/s\"".to_owned(),
                Role::Production,
                "scratch_dir",
            ),
            (
                "name = \"pg\"\nmethod = \"physical\"\nrestore_jobs = 2".to_owned(),
                Role::Production,
                "restore_jobs",
            ),
        ];
        for (text, role, field) in cases {
            assert_eq!(ok(&text, role).unwrap_err().field(), field, "{text}");
        }
    }

    #[test]
    fn a_physical_datastore_takes_a_data_directory_and_no_database() {
        let physical = "name = \"pg\"\nmethod = \"physical\"\n";
        let cfg: PostgresConfig = toml::from_str(physical).unwrap();
        let pg = Postgres::build(cfg.clone(), Role::Production).unwrap();
        assert!(pg.physical());
        assert_eq!(
            Postgres::build(cfg, Role::Staging).unwrap_err().field(),
            "data_dir"
        );
        let staging = format!(
            "{physical}data_dir = \"/var/lib/postgresql/15/main\"\n\
             stop_command = [\"true\"]\nstart_command = [\"true\"]\n"
        );
        let cfg: PostgresConfig = toml::from_str(&staging).unwrap();
        assert_eq!(cfg.check_port(), 5433);
        assert!(Postgres::build(cfg.clone(), Role::Staging).is_ok());
        assert_eq!(
            Postgres::build(cfg, Role::Production).unwrap_err().field(),
            "data_dir"
        );
        // (entry, role, field refused)
        let cases = [
            (
                format!("{physical}database = \"app\""),
                Role::Production,
                "database",
            ),
            (
                format!(
                    "{physical}data_dir = \"rel\"\nstop_command = [\"true\"]\nstart_command = [\"true\"]"
                ),
                Role::Staging,
                "data_dir",
            ),
            (
                format!("{physical}data_dir = \"/d\"\nstart_command = [\"true\"]"),
                Role::Staging,
                "stop_command",
            ),
            (
                format!(
                    "{physical}data_dir = \"/d\"\nstop_command = [\"true\"]\nstart_command = [\"true\"]\ncheck_port = 5432"
                ),
                Role::Staging,
                "check_port",
            ),
            (
                "name = \"pg\"\ndatabase = \"app\"\ndata_dir = \"/d\"".to_owned(),
                Role::Production,
                "data_dir",
            ),
        ];
        for (text, role, field) in cases {
            let cfg: PostgresConfig = toml::from_str(&text).unwrap();
            let e = Postgres::build(cfg, role).unwrap_err();
            assert_eq!(e.field(), field, "{text}: {e}");
        }
    }
}
