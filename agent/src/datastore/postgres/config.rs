//! `kind = "postgres"` in `[[datastores]]`: the fields, and their checks for a role.

use std::path::PathBuf;

use ferry_proto::Role;
use serde::Deserialize;

use super::{MAX_IDENTIFIER, Postgres};
use crate::datastore::common::smoke::SmokeCheck;
use crate::datastore::{DatastoreConfigError, ToolPaths};

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
    pub smoke: Vec<SmokeCheck>,
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

impl Postgres {
    /// Validates `cfg` for `role` and reads the password.
    ///
    /// # Errors
    /// [`DatastoreConfigError`] naming the field.
    pub fn build(cfg: PostgresConfig, role: Role) -> Result<Self, DatastoreConfigError> {
        use DatastoreConfigError::{Missing, WrongRole};
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
}
