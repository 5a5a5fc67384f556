//! Secrets read from files and the environment: passwords, private keys, age identities.
//!
//! A secret file must be the owner's alone (mode 0600 or 0400, or stricter): one that group
//! or others may read is refused, with the `chmod` that fixes it. A datastore's password
//! comes from `password_file` (such a file, its trailing newline dropped) or from the
//! environment variable `password_env`, never both; a [`Password`] never prints.

use std::path::{Path, PathBuf};

/// A secret that cannot be read, or a password setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file cannot be examined or read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The secret file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Group or others may read the file.
    #[error(
        "{} has mode {mode:04o}; a secret file must not be readable by group or others \
         (chmod 600 {})",
        path.display(),
        path.display()
    )]
    TooOpen {
        /// The secret file.
        path: PathBuf,
        /// Its permission bits, e.g. `0o644`.
        mode: u32,
    },
    /// Both `password_file` and `password_env` are set.
    #[error("give password_file or password_env, not both")]
    FileAndEnv,
    /// `password_env` names a variable that is not set (or not Unicode).
    #[error("environment variable {var} is not set")]
    EnvUnset {
        /// The variable's name.
        var: String,
    },
    /// A password is configured without the user it belongs to.
    #[error("missing: a password needs a user")]
    NoUser,
}

impl SecretError {
    /// The datastore setting an error of [`read_password`] or [`user_password`] is about:
    /// `password_file`, `password_env` or `user`. For [`read_secret_file`]'s errors
    /// (`Read`, `TooOpen`) it is `password_file`, the file those functions read; a caller
    /// that read another file names that file's setting itself.
    pub fn field(&self) -> &'static str {
        match self {
            SecretError::Read { .. } | SecretError::TooOpen { .. } | SecretError::FileAndEnv => {
                "password_file"
            }
            SecretError::EnvUnset { .. } => "password_env",
            SecretError::NoUser => "user",
        }
    }
}

/// Reads a secret file (a password, a private key, an age identity), refusing one that
/// group or others may read: only modes 0600 and 0400 (and stricter) are accepted.
///
/// # Errors
/// [`SecretError::TooOpen`] naming the file and its mode, or [`SecretError::Read`].
pub fn read_secret_file(path: &Path) -> Result<String, SecretError> {
    use std::os::unix::fs::PermissionsExt;
    let read = |source| SecretError::Read {
        path: path.to_owned(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(read)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    std::fs::read_to_string(path).map_err(read)
}

/// A datastore password from `password_file` (mode 0600/0400, trailing newline dropped)
/// or from the environment variable `password_env`; `None` if neither is set.
///
/// # Errors
/// [`SecretError::FileAndEnv`] when both are given, [`SecretError::EnvUnset`], or as
/// [`read_secret_file`].
pub fn read_password(
    file: Option<&Path>,
    env: Option<&str>,
) -> Result<Option<String>, SecretError> {
    match (file, env) {
        (Some(_), Some(_)) => Err(SecretError::FileAndEnv),
        (Some(path), None) => Ok(Some(
            read_secret_file(path)?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
        )),
        (None, Some(var)) => std::env::var(var)
            .map(Some)
            .map_err(|_| SecretError::EnvUnset {
                var: var.to_owned(),
            }),
        (None, None) => Ok(None),
    }
}

/// A password that never prints (`Debug` shows `Password(***)`).
#[derive(Clone)]
pub struct Password(pub String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(***)")
    }
}

/// The password of a datastore's `user`, from `password_file` or `password_env` (see
/// [`read_password`]); a password without a user is refused.
///
/// # Errors
/// [`SecretError::NoUser`], or as [`read_password`].
pub fn user_password(
    user: Option<&str>,
    file: Option<&Path>,
    env: Option<&str>,
) -> Result<Option<Password>, SecretError> {
    if (file.is_some() || env.is_some()) && user.is_none() {
        return Err(SecretError::NoUser);
    }
    Ok(read_password(file, env)?.map(Password))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn secret(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_secret_file_others_may_read_is_refused_with_the_chmod_that_fixes_it() {
        let dir = tempfile::tempdir().unwrap();
        let open = secret(dir.path(), "open", "s3cret\n", 0o644);
        let e = read_secret_file(&open).unwrap_err();
        assert!(
            matches!(e, SecretError::TooOpen { mode: 0o644, .. }),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains("has mode 0644")
                && text.contains(&format!("chmod 600 {}", open.display())),
            "{text}"
        );
        for mode in [0o600, 0o400] {
            let closed = secret(dir.path(), &format!("closed{mode:o}"), "s3cret\n", mode);
            assert_eq!(read_secret_file(&closed).unwrap(), "s3cret\n");
        }
        let e = read_secret_file(&dir.path().join("absent")).unwrap_err();
        assert!(e.to_string().starts_with("cannot read "), "{e}");
    }

    #[test]
    fn a_password_comes_from_its_file_or_its_variable_and_never_prints() {
        let dir = tempfile::tempdir().unwrap();
        let file = secret(dir.path(), "pw", "hunter2\r\n", 0o600);
        assert_eq!(
            read_password(Some(&file), None).unwrap().as_deref(),
            Some("hunter2")
        );
        assert_eq!(read_password(None, None).unwrap(), None);
        let e = read_password(Some(&file), Some("PATH")).unwrap_err();
        assert_eq!(
            (e.field(), e.to_string().as_str()),
            (
                "password_file",
                "give password_file or password_env, not both"
            )
        );
        let unset = "FERRY_CORE_TEST_SURELY_UNSET";
        let e = read_password(None, Some(unset)).unwrap_err();
        assert_eq!(e.field(), "password_env");
        assert!(e.to_string().contains(unset), "{e}");

        let e = user_password(None, Some(&file), None).unwrap_err();
        assert_eq!(e.field(), "user");
        let pw = user_password(Some("backup"), Some(&file), None)
            .unwrap()
            .unwrap();
        assert_eq!(pw.0, "hunter2");
        assert_eq!(format!("{pw:?}"), "Password(***)");
    }
}
