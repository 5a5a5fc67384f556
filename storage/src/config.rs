//! [`TargetConfig`]: a storage target as configured (`[backup_server]` in `agent.toml`,
//! `[maintenance]` in `coordinator.toml`), and [`TargetConfig::build`], the one place that
//! turns a kind into a [`Target`].
//!
//! ```toml
//! [backup_server]
//! kind = "sftp"          # the default: configs without `kind` are SFTP targets
//! host = "backup.example"; user = "ferry"; private_key_file = "..."
//! host_key = "ssh-ed25519 AAAA..."; root = "/srv/ferry"
//! ```

use std::sync::Arc;

use serde::{Deserialize, Deserializer};

use crate::Target;
use crate::s3::{S3Config, S3Target};
use crate::sftp::{SftpConfig, SftpTarget};

/// A storage target's configuration, by `kind`; without `kind`, `sftp`.
#[derive(Clone, Debug)]
pub enum TargetConfig {
    /// `kind = "sftp"`: the SFTP backup server ([`crate::sftp`]).
    Sftp(SftpConfig),
    /// `kind = "s3"`: an S3-compatible bucket ([`crate::s3`]).
    S3(S3Config),
}

/// Why a target's configuration cannot be used. [`TargetConfigError::field`] names the
/// key, for the caller to place under its table (`backup_server.<field>`).
#[derive(Debug, thiserror::Error)]
pub enum TargetConfigError {
    /// A required value is empty.
    #[error("must not be empty")]
    Empty {
        /// The key.
        field: &'static str,
    },
    /// A path on the target is not one the layout accepts.
    #[error("{message}")]
    Path {
        /// The key.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A number is out of its range.
    #[error("{message}")]
    Range {
        /// The key.
        field: &'static str,
        /// The value and the range it must be in.
        message: String,
    },
    /// The pinned host key does not parse.
    #[error("{message}")]
    HostKey {
        /// What is wrong with it.
        message: String,
    },
    /// A secret file (a private key) cannot be used.
    #[error("{source}")]
    Secret {
        /// The key naming the file.
        field: &'static str,
        /// Why.
        #[source]
        source: ferry_core::secrets::SecretError,
    },
}

impl TargetConfigError {
    /// The key the error is about, e.g. `root`, `rsync.private_key_file`.
    pub fn field(&self) -> &'static str {
        match self {
            TargetConfigError::Empty { field }
            | TargetConfigError::Path { field, .. }
            | TargetConfigError::Range { field, .. }
            | TargetConfigError::Secret { field, .. } => field,
            TargetConfigError::HostKey { .. } => "host_key",
        }
    }
}

impl TargetConfig {
    /// The kind, as written in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            TargetConfig::Sftp(_) => "sftp",
            TargetConfig::S3(_) => "s3",
        }
    }

    /// Checks what can be checked without the network (paths, the pinned key, the
    /// private key files and their modes) and builds the target: one arm per kind.
    ///
    /// # Errors
    /// [`TargetConfigError`] naming the key.
    pub fn build(&self) -> Result<Arc<dyn Target>, TargetConfigError> {
        match self {
            TargetConfig::Sftp(c) => {
                c.validate()?;
                Ok(Arc::new(SftpTarget::new(c.clone())))
            }
            TargetConfig::S3(c) => {
                c.validate()?;
                Ok(Arc::new(S3Target::new(c.clone())))
            }
        }
    }
}

impl<'de> Deserialize<'de> for TargetConfig {
    /// Reads `kind` (default `sftp`), then the rest of the table as that kind's config,
    /// whose unknown keys are refused.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = serde_json::Map::deserialize(deserializer)?;
        let kind = match table.remove("kind") {
            None => "sftp".to_owned(),
            Some(serde_json::Value::String(k)) => k,
            Some(other) => {
                return Err(D::Error::custom(format!(
                    "kind: expected a string such as \"sftp\", found {other}"
                )));
            }
        };
        let rest = serde_json::Value::Object(table);
        match kind.as_str() {
            "sftp" => SftpConfig::deserialize(rest)
                .map(TargetConfig::Sftp)
                .map_err(D::Error::custom),
            "s3" => S3Config::deserialize(rest)
                .map(TargetConfig::S3)
                .map_err(D::Error::custom),
            other => Err(D::Error::unknown_variant(other, &["sftp", "s3"])),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TargetConfig, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_table_without_kind_is_an_sftp_target() {
        let c = parse(
            r#"{"host": "b", "user": "u", "private_key_file": "/k",
                "host_key": "ssh-ed25519 AAAA", "root": "/srv/ferry"}"#,
        )
        .unwrap();
        let TargetConfig::Sftp(s) = &c else {
            panic!("not sftp: {c:?}")
        };
        assert_eq!(
            (c.kind(), s.port, s.root.as_str()),
            ("sftp", 22, "/srv/ferry")
        );
        let c = parse(
            r#"{"kind": "sftp", "host": "b", "user": "u", "private_key_file": "/k",
                "host_key": "ssh-ed25519 AAAA", "root": "/srv/ferry", "port": 2222}"#,
        )
        .unwrap();
        let TargetConfig::Sftp(s) = &c else {
            panic!("not sftp: {c:?}")
        };
        assert_eq!(s.port, 2222);
    }

    #[test]
    fn unknown_kinds_and_keys_are_refused_by_name() {
        let e = parse(r#"{"kind": "ftp", "host": "b"}"#).unwrap_err();
        assert!(e.contains("ftp") && e.contains("sftp"), "{e}");
        let e = parse(
            r#"{"host": "b", "user": "u", "private_key_file": "/k",
                "host_key": "ssh-ed25519 AAAA", "root": "/srv/ferry", "colour": 1}"#,
        )
        .unwrap_err();
        assert!(e.contains("colour"), "{e}");
    }
}
