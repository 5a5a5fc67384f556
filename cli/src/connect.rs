//! Connecting to the coordinator: the URL and the three TLS files are checked first, so a
//! mistake is named (`--coordinator http://...`, a key that is not the certificate's)
//! instead of surfacing as a transport error.

use std::path::Path;

use anyhow::{Context, bail};
use ferry_core::Bounded;
use ferry_proto::tls::TlsFiles;
use ferry_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::Cli;

/// How the coordinator is reached, e.g. `https://127.0.0.1:7400`.
const EXAMPLE: &str = "https://HOST:PORT, e.g. https://127.0.0.1:7400";

/// Checks `--coordinator`: a URL with scheme `https` (the coordinator speaks gRPC over
/// mutual TLS only; plain `http://` ends in an HTTP/2 error that says nothing of it).
///
/// # Errors
/// Not a URL, no scheme, or a scheme other than `https`, naming the flag and the fix.
pub(super) fn check_url(url: &str) -> anyhow::Result<Uri> {
    let shown = Bounded(url);
    let uri: Uri = url
        .parse()
        .with_context(|| format!("--coordinator {shown} is not a URL: give {EXAMPLE}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("https"), Some(_)) => Ok(uri),
        (Some("https"), None) => bail!("--coordinator {shown} names no host: give {EXAMPLE}"),
        (Some(scheme), Some(host)) => bail!(
            "--coordinator {shown}: the coordinator speaks only TLS (gRPC with mutual \
             certificates), not {scheme}: use https://{host}"
        ),
        (_, _) => bail!("--coordinator {shown} has no https:// scheme: give {EXAMPLE}"),
    }
}

/// The PEM blocks of `path` (read as the flag `flag`), as `(label, contents)`.
fn pem_blocks(flag: &str, path: &Path, bytes: &[u8]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut blocks = Vec::new();
    for pem in x509_parser::pem::Pem::iter_from_buffer(bytes) {
        match pem {
            Ok(p) => blocks.push((p.label, p.contents)),
            Err(x509_parser::prelude::PEMError::MissingHeader) => break,
            Err(e) => bail!("{flag} {}: not PEM: {e}", path.display()),
        }
    }
    Ok(blocks)
}

/// The first certificate of `path` given as `flag`.
///
/// # Errors
/// Unreadable, or no `CERTIFICATE` block.
fn first_certificate(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))?;
    pem_blocks(flag, path, &bytes)?
        .into_iter()
        .find(|(label, _)| label == "CERTIFICATE")
        .map(|(_, der)| der)
        .with_context(|| {
            format!(
                "{flag} {} holds no certificate (no -----BEGIN CERTIFICATE----- block)",
                path.display()
            )
        })
}

/// Checks the three TLS files before any connection: the CA and the certificate hold a
/// certificate, the key is a private key no one else may read, and it is the key the
/// certificate was issued for.
///
/// # Errors
/// Names the flag and file at fault (both files for a key that does not match).
pub(super) fn check_tls_files(tls: &TlsFiles) -> anyhow::Result<()> {
    first_certificate("--ca", &tls.ca)?;
    let cert_der = first_certificate("--cert", &tls.cert)?;
    let key = ferry_proto::tls::read_private_key(&tls.key)?;
    let blocks = pem_blocks("--key", &tls.key, &key)?;
    let Some((label, _)) = blocks.iter().find(|(l, _)| l.ends_with("PRIVATE KEY")) else {
        bail!(
            "--key {} holds no private key (no -----BEGIN PRIVATE KEY----- block)",
            tls.key.display()
        );
    };
    // `pki issue` writes PKCS#8 keys; other encodings are left to the TLS library.
    if label != "PRIVATE KEY" {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&key);
    let Ok(pair) = rcgen::KeyPair::from_pem(&text) else {
        return Ok(());
    };
    let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
        .map_err(|e| anyhow::anyhow!("--cert {}: {e}", tls.cert.display()))?;
    if cert.public_key().subject_public_key.data.as_ref() != pair.public_key_raw() {
        bail!(
            "--key {} does not match --cert {}: it is not the key that certificate was issued \
             for (`ferry-coordinator pki issue` writes NAME.pem and NAME.key together)",
            tls.key.display(),
            tls.cert.display()
        );
    }
    Ok(())
}

/// A client of the coordinator `cli` names, with its TLS files checked first.
///
/// # Errors
/// A missing flag, a bad URL or TLS file ([`check_url`], [`check_tls_files`]), or a
/// coordinator that cannot be reached.
pub(super) async fn client(cli: &Cli) -> anyhow::Result<CoordinatorClient<Channel>> {
    let missing = |what: &str, flag: &str, env: &str| {
        anyhow::anyhow!("no {what}: pass {flag} or set {env} (see `ferry --help`)")
    };
    let uri = check_url(&cli.coordinator)?;
    let tls = TlsFiles {
        ca: cli
            .ca
            .clone()
            .ok_or_else(|| missing("fleet CA", "--ca", "FERRY_CA"))?,
        cert: cli
            .cert
            .clone()
            .ok_or_else(|| missing("operator certificate", "--cert", "FERRY_CERT"))?,
        key: cli
            .key
            .clone()
            .ok_or_else(|| missing("operator key", "--key", "FERRY_KEY"))?,
    };
    check_tls_files(&tls)?;
    let channel = Endpoint::from(uri)
        .tls_config(tls.client_config(&cli.server_name)?)
        .with_context(|| {
            format!(
                "TLS with --cert {}, --key {} and --ca {}",
                tls.cert.display(),
                tls.key.display(),
                tls.ca.display()
            )
        })?
        .connect_timeout(std::time::Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {}", cli.coordinator))?;
    Ok(CoordinatorClient::new(channel)
        .max_encoding_message_size(ferry_proto::MAX_MESSAGE_BYTES)
        .max_decoding_message_size(ferry_proto::MAX_RESPONSE_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_urls_pass_and_the_refusal_says_to_use_https() {
        assert!(check_url("https://127.0.0.1:7400").is_ok());
        let e = check_url("http://127.0.0.1:7400").unwrap_err().to_string();
        assert!(e.contains("use https://127.0.0.1:7400"), "{e}");
        for bad in ["127.0.0.1:7400", "not a url", "https://", ""] {
            let e = check_url(bad).unwrap_err().to_string();
            assert!(e.contains("https://HOST:PORT"), "{bad:?}: {e}");
        }
    }

    /// A self-signed certificate for `name` and its PKCS#8 key, as `pki issue` writes them:
    /// `DIR/NAME.pem` (0644) and `DIR/NAME.key` (0600).
    fn issue(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        (cert_path, key_path)
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, ca_key) = issue(dir.path(), "ca");
        let (op_cert, op_key) = issue(dir.path(), "op");
        let (_, other_key) = issue(dir.path(), "other");
        let files = |key: &Path| TlsFiles {
            ca: ca.clone(),
            cert: op_cert.clone(),
            key: key.to_owned(),
        };
        check_tls_files(&files(&op_key)).unwrap();
        let e = check_tls_files(&files(&other_key)).unwrap_err().to_string();
        assert!(
            e.contains(&format!("--key {}", other_key.display()))
                && e.contains(&format!("--cert {}", op_cert.display())),
            "{e}"
        );
        // A certificate file that holds none is named as such.
        let e = check_tls_files(&TlsFiles {
            cert: ca_key,
            ..files(&op_key)
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--cert") && e.contains("holds no certificate"),
            "{e}"
        );
    }
}
