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
    /// Production: the replica set member dumps and oplog slices read from, as a MongoDB
    /// read preference (as Percona Backup for MongoDB and Stash offer): `primary` (the
    /// default), `primaryPreferred`, `secondary`, `secondaryPreferred` or `nearest`. One
    /// member is chosen per dump (and per slicer connection) and read alone, so the dump's
    /// data and its oplog window come from the same member ([`super::Mongo::read_client`]).
    pub read_preference: Option<String>,
    /// With a `read_preference` other than `primary`: tag sets tried in order, e.g.
    /// `[{ use = "backup" }, {}]` (an empty set matches any member).
    #[serde(default)]
    pub read_preference_tags: Vec<BTreeMap<String, String>>,
}

/// The read preference modes of `read_preference`, as MongoDB spells them.
pub const READ_PREFERENCES: [&str; 5] = [
    "primary",
    "primaryPreferred",
    "secondary",
    "secondaryPreferred",
    "nearest",
];

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
        if let Some(rp) = &cfg.read_preference {
            if role == Role::Staging {
                return Err(DatastoreConfigError::WrongRole {
                    field: "read_preference",
                    why: "a staging agent restores into the primary; remove it",
                });
            }
            if !READ_PREFERENCES.contains(&rp.as_str()) {
                return Err(DatastoreConfigError::invalid(
                    "read_preference",
                    format!(
                        "{:?} is not one of {}",
                        ferry_core::Bounded(rp),
                        READ_PREFERENCES.join(", ")
                    ),
                ));
            }
        }
        if !cfg.read_preference_tags.is_empty()
            && cfg.read_preference.as_deref().unwrap_or("primary") == "primary"
        {
            return Err(DatastoreConfigError::invalid(
                "read_preference_tags",
                "tags choose among secondaries: set read_preference to another mode than primary",
            ));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(read_preference: Option<&str>, tags: usize) -> MongoConfig {
        MongoConfig {
            name: "mongo".into(),
            uri: "mongodb://127.0.0.1:27017/?replicaSet=rs0".into(),
            user: None,
            password_file: None,
            password_env: None,
            auth_source: None,
            tls_ca_file: None,
            databases: None,
            rename: BTreeMap::new(),
            smoke: Vec::new(),
            oplog_slice_seconds: None,
            read_preference: read_preference.map(str::to_owned),
            read_preference_tags: (0..tags)
                .map(|_| BTreeMap::from([("use".to_owned(), "backup".to_owned())]))
                .collect(),
        }
    }

    #[test]
    fn a_read_preference_is_a_mongodb_mode_on_production_with_tags_only_off_the_primary() {
        for mode in READ_PREFERENCES {
            let tags = usize::from(mode != "primary");
            assert!(
                Mongo::build(cfg(Some(mode), tags), Role::Production).is_ok(),
                "{mode}"
            );
        }
        let e = Mongo::build(cfg(Some("secondaryOnly"), 0), Role::Production).unwrap_err();
        assert!(e.to_string().contains("is not one of primary"), "{e}");
        let e = Mongo::build(cfg(Some("secondary"), 0), Role::Staging).unwrap_err();
        assert!(e.to_string().contains("restores into the primary"), "{e}");
        let e = Mongo::build(cfg(None, 1), Role::Production).unwrap_err();
        assert!(
            e.to_string().contains("tags choose among secondaries"),
            "{e}"
        );
    }
}
