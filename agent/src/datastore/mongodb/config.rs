//! `kind = "mongodb"` in `[[datastores]]`: the fields, and their checks for a role.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ferry_proto::Role;
use serde::Deserialize;

use super::Mongo;
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
}

impl crate::datastore::KindConfig for MongoConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn build(
        self: Box<Self>,
        role: Role,
    ) -> Result<std::sync::Arc<dyn crate::datastore::Datastore>, (String, String)> {
        Ok(std::sync::Arc::new(Mongo::build(*self, role)?))
    }
}

impl Mongo {
    /// Validates `cfg` for `role`.
    ///
    /// # Errors
    /// `(field, message)`.
    pub fn build(cfg: MongoConfig, role: Role) -> Result<Self, (String, String)> {
        let err = |f: &str, m: String| Err((f.to_owned(), m));
        SmokeCheck::validate(&cfg.smoke, role, "ns")?;
        if !cfg.uri.starts_with("mongodb://") && !cfg.uri.starts_with("mongodb+srv://") {
            return err(
                "uri",
                format!("{:?} is not a mongodb:// connection string", cfg.uri),
            );
        }
        if cfg
            .uri
            .split('/')
            .nth(2)
            .is_some_and(|host| host.contains('@'))
        {
            return err(
                "uri",
                "holds credentials; put the user in `user` and the password in password_file or password_env".into(),
            );
        }
        if role == Role::Staging && cfg.databases.is_some() {
            return err(
                "databases",
                "a staging agent restores what the backup holds; remove it".into(),
            );
        }
        if role == Role::Production && !cfg.rename.is_empty() {
            return err("rename", "only a staging agent restores; remove it".into());
        }
        let password = crate::config::read_password(
            cfg.password_file.as_deref(),
            cfg.password_env.as_deref(),
        )?
        .map(crate::config::Password);
        if password.is_some() && cfg.user.is_none() {
            return err("user", "a password is configured but no user".into());
        }
        Ok(Self { cfg, password })
    }
}
