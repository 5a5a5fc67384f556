//! Mutual TLS for both services: each side presents a certificate signed by the fleet
//! CA and accepts only peers whose certificate the same CA signed. Built on tonic's
//! rustls (`tls-ring`).

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Paths of one side's PEM files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// This side's certificate chain, PEM.
    pub cert: PathBuf,
    /// This side's private key, PEM (PKCS#8).
    pub key: PathBuf,
    /// The fleet CA certificate, PEM: the only issuer whose peers are accepted.
    pub ca: PathBuf,
}

/// Reading a TLS file failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot read TLS {what} file {path}: {source}")]
pub struct TlsError {
    /// Which file: `certificate`, `private key` or `CA certificate`.
    pub what: &'static str,
    /// The path as configured.
    pub path: PathBuf,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Reads a private key, refusing one that group or others may read (only modes 0600, 0400
/// and stricter pass), as every secret file of Ferry.
///
/// # Errors
/// [`TlsError`] with `what` = `private key`: unreadable, or its mode too open (the
/// message gives the mode and the `chmod` that fixes it).
pub fn read_private_key(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| TlsError {
        what: "private key",
        path: path.to_owned(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(err)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "mode {mode:04o}: a private key must not be readable by group or others \
                 (chmod 600 {})",
                path.display()
            ),
        )));
    }
    read("private key", path)
}

/// Installs rustls' ring crypto provider as the process default. Call once at start,
/// before any TLS object is built: with two providers linked, rustls panics at run time
/// if none was chosen. Calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl TlsFiles {
    fn identity(&self) -> Result<(Identity, Certificate), TlsError> {
        let cert = read("certificate", &self.cert)?;
        let key = read_private_key(&self.key)?;
        let ca = read("CA certificate", &self.ca)?;
        Ok((Identity::from_pem(cert, key), Certificate::from_pem(ca)))
    }

    /// A server config that requires a client certificate signed by the fleet CA; a client
    /// without one is refused during the handshake, before any handler runs.
    ///
    /// # Errors
    /// [`TlsError`] if a file cannot be read or the private key is readable by group or
    /// others. Malformed PEM is reported when serving starts.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        let (identity, ca) = self.identity()?;
        Ok(ServerTlsConfig::new()
            .identity(identity)
            .client_ca_root(ca)
            .client_auth_optional(false))
    }

    /// A client config that presents this side's certificate and accepts only a server
    /// whose certificate the fleet CA signed for `server_name` (the peer's id: agent ids
    /// and `coordinator` are the names `pki issue` puts in certificates).
    ///
    /// # Errors
    /// [`TlsError`] if a file cannot be read or the private key is readable by group or
    /// others.
    pub fn client_config(&self, server_name: &str) -> Result<ClientTlsConfig, TlsError> {
        let (identity, ca) = self.identity()?;
        Ok(ClientTlsConfig::new()
            .identity(identity)
            .ca_certificate(ca)
            .domain_name(server_name))
    }
}

/// The common name (CN) of the certificate a gRPC peer presented (the fleet names:
/// `coordinator`, agent ids, operators), or `None` without a parsable client certificate.
pub fn peer_name<T>(request: &tonic::Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    let der = certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_private_key_readable_by_others_is_refused_naming_the_file_and_mode() {
        let dir = std::env::temp_dir().join(format!("ferry-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("x.key");
        std::fs::write(&key, "not really a key").unwrap();
        for (mode, ok) in [(0o600, true), (0o400, true), (0o640, false), (0o644, false)] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let got = read_private_key(&key);
            assert_eq!(got.is_ok(), ok, "mode {mode:o}");
            if let Err(e) = got {
                let text = e.to_string();
                assert!(
                    text.contains(&key.display().to_string())
                        && text.contains(&format!("{mode:04o}")),
                    "{text}"
                );
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
