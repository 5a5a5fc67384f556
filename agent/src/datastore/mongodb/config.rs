//! `kind = "mongodb"` in `[[datastores]]`: the fields, and their checks for a role.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ferry_proto::Role;
use serde::Deserialize;

use super::Mongo;
use crate::datastore::DatastoreConfigError;
use crate::datastore::common::smoke::SmokeCheck;

/// `[[datastores]]` with `kind = "mongodb"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoConfig {
    /// Datastore name, used in stored file names.
    pub name: String,
    /// Connection string without credentials, e.g.
    /// `mongodb://10.0.0.7:27017/?replicaSet=rs0` or `...?directConnection=true`.
    pub uri: String,
    /// User to authenticate as.
    pub user: Option<String>,
    /// File holding the password (mode 0600 or 0400).
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// Authentication database (`admin` if a user is given and this is not).
    pub auth_source: Option<String>,
    /// CA certificate for TLS to the server; TLS is on when this is set.
    pub tls_ca_file: Option<PathBuf>,
    /// Production: the databases to dump; all but admin, local and config when absent.
    pub databases: Option<Vec<String>>,
    /// Staging: source database → target database.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Staging: smoke checks run after every restore, e.g.
    /// `[{ ns = "app.users", filter = '{"active": true}', min = 100 }]` (the source
    /// namespace; `rename` applies).
    #[serde(default)]
    pub smoke: Vec<SmokeCheck>,
    /// Production, on a replica set: archive the oplog continuously, closing a slice every
    /// this many seconds (1 to 3600; 60 is Percona Backup for MongoDB's 10 minutes cut
    /// tenfold), for restores to a point in time ([`super::slices`]). Off when absent.
    pub oplog_slice_seconds: Option<u64>,
}

impl Mongo {
    /// Validates `cfg` for `role` and reads the password.
    ///
    /// # Errors
    /// [`DatastoreConfigError`] naming the field.
    pub fn build(cfg: MongoConfig, role: Role) -> Result<Self, DatastoreConfigError> {
        SmokeCheck::validate(&cfg.smoke, role, "ns", |c| {
            c.ns.is_some() && c.sql.is_none()
        })?;
        if !cfg.uri.starts_with("mongodb://") && !cfg.uri.starts_with("mongodb+srv://") {
            return Err(DatastoreConfigError::invalid(
                "uri",
                format!("{:?} is not a mongodb:// connection string", cfg.uri),
            ));
        }
        if cfg
            .uri
            .split('/')
            .nth(2)
            .is_some_and(|host| host.contains('@'))
        {
            return Err(DatastoreConfigError::invalid(
                "uri",
                "holds credentials; put the user in `user` and the password in password_file or password_env",
            ));
        }
        if role == Role::Staging && cfg.databases.is_some() {
            return Err(DatastoreConfigError::WrongRole {
                field: "databases",
                why: "a staging agent restores what the backup holds; remove it",
            });
        }
        if role == Role::Production && !cfg.rename.is_empty() {
            return Err(DatastoreConfigError::WrongRole {
                field: "rename",
                why: "only a staging agent restores; remove it",
            });
        }
        if let Some(n) = cfg.oplog_slice_seconds {
            if role == Role::Staging {
                return Err(DatastoreConfigError::WrongRole {
                    field: "oplog_slice_seconds",
                    why: "only a production agent archives the oplog; remove it",
                });
            }
            if !(1..=3600).contains(&n) {
                return Err(DatastoreConfigError::invalid(
                    "oplog_slice_seconds",
                    format!("is {n}: between 1 and 3600"),
                ));
            }
        }
        let password = ferry_core::secrets::read_password(
            cfg.password_file.as_deref(),
            cfg.password_env.as_deref(),
        )
        .map_err(DatastoreConfigError::secret)?
        .map(ferry_core::secrets::Password);
        if password.is_some() && cfg.user.is_none() {
            return Err(DatastoreConfigError::invalid(
                "user",
                "a password is configured but no user",
            ));
        }
        Ok(Self { cfg, password })
    }
}
