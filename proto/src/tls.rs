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

/// Installs rustls' ring crypto provider as the process default. Call once at start,
/// before any TLS object is built: with two providers linked, rustls panics at run time
/// if none was chosen. Calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl TlsFiles {
    fn identity(&self) -> Result<(Identity, Certificate), TlsError> {
        let cert = read("certificate", &self.cert)?;
        let key = read("private key", &self.key)?;
        let ca = read("CA certificate", &self.ca)?;
        Ok((Identity::from_pem(cert, key), Certificate::from_pem(ca)))
    }

    /// A server config that requires a client certificate signed by the fleet CA; a client
    /// without one is refused during the handshake, before any handler runs.
    ///
    /// # Errors
    /// [`TlsError`] if a file cannot be read. Malformed PEM is reported when serving starts.
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
    /// [`TlsError`] if a file cannot be read.
    pub fn client_config(&self, server_name: &str) -> Result<ClientTlsConfig, TlsError> {
        let (identity, ca) = self.identity()?;
        Ok(ClientTlsConfig::new()
            .identity(identity)
            .ca_certificate(ca)
            .domain_name(server_name))
    }
}
