//! Reading a daemon's TOML config (`agent.toml`, `coordinator.toml`) and the one error
//! both daemons report about it: which file, which field, what is wrong and what to do.
//!
//! Each daemon reads its file with [`load`] (unknown keys, missing fields and wrong types
//! are the `serde` shape's to refuse), then validates it in its own `build()`, which
//! reports a value it cannot use with [`ConfigError::invalid`].

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A config that cannot be used. Each variant names the file; [`ConfigError::Invalid`]
/// also names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, a missing field or a wrong type.
    #[error("config {path}: {source}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// toml's message names the key and line.
        #[source]
        source: toml::de::Error,
    },
    /// A field's value is not acceptable.
    #[error("config {path}: field `{field}`: {message}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// Dotted field path, e.g. `datastores[0].name` or `schedules[1].kind`.
        field: String,
        /// What is wrong and what to do.
        message: String,
    },
}

impl ConfigError {
    /// [`ConfigError::Invalid`]: `field` of the config `path` holds a value that cannot be
    /// used, `message` saying why and what to do.
    pub fn invalid(path: &Path, field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.to_owned(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Reads and parses the TOML config file `path` into `T`.
///
/// # Errors
/// [`ConfigError::Read`] or [`ConfigError::Parse`] (see [`parse`]).
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Parses TOML `text` read from `path` (named in messages) into `T`.
///
/// # Errors
/// [`ConfigError::Parse`]: TOML syntax, or what `T`'s `Deserialize` refuses (an unknown
/// key under `deny_unknown_fields`, a missing field, a wrong type), with key and line.
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// This host's name from `/proc/sys/kernel/hostname` or `$HOSTNAME`, else `unknown`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Shape {
        #[allow(dead_code)]
        id: String,
    }

    #[test]
    fn every_error_names_the_file_and_a_bad_value_its_field() {
        let path = Path::new("/etc/ferry/agent.toml");
        let e = load::<Shape>(Path::new("/nonexistent/agent.toml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read config /nonexistent/agent.toml: "),
            "{e}"
        );
        let e = parse::<Shape>(path, "id = \"a\"\nidd = 1\n").unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("config /etc/ferry/agent.toml: ") && text.contains("idd"),
            "{text}"
        );
        parse::<Shape>(path, "id = \"a\"\n").unwrap();
        let e = ConfigError::invalid(path, "datastores[0].name", "is empty");
        assert_eq!(
            e.to_string(),
            "config /etc/ferry/agent.toml: field `datastores[0].name`: is empty"
        );
    }
}
