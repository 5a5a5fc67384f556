//! The fleet PKI: one CA signs the certificates of the coordinator, every agent and every
//! operator; each side of a gRPC connection accepts only peers the CA signed (mutual
//! TLS). Keys are ECDSA P-256, written as PKCS#8 PEM with mode 0600.
//!
//! Files in the PKI directory: `ca.pem`, `ca.key`, and `<name>.pem`, `<name>.key` per
//! issued certificate. A certificate's subject alternative names always include `<name>`
//! as a DNS name: clients check the agent id (or `coordinator`) against it.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Validity of the CA, days (10 years).
pub const CA_DAYS: i64 = 3650;

/// The longest validity [`issue`] gives a certificate, days: the CA's own (10 years).
pub const MAX_DAYS: u32 = 3650;

/// Paths of a written certificate and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedFiles {
    /// Certificate, PEM.
    pub cert: PathBuf,
    /// Private key, PKCS#8 PEM, mode 0600.
    pub key: PathBuf,
}

/// A PKI operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A name that is not usable as a certificate name and file name.
    #[error(
        "certificate name {0:?} is not valid: use 1 to 64 characters of a-z, A-Z, 0-9, '.', '_' and '-', not starting with '.' or '-'"
    )]
    Name(String),
    /// The file exists already; PKI files are never overwritten.
    #[error(
        "{0} already exists; refusing to overwrite it (remove it first if you really mean to replace it)"
    )]
    Exists(PathBuf),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The CA files are missing or unusable.
    #[error(
        "CA in {dir} is not usable ({message}); create it with `ferry-coordinator pki init --dir {dir}`"
    )]
    Ca {
        /// The PKI directory.
        dir: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A validity outside 1 to [`MAX_DAYS`] days: 0 would write a certificate already
    /// expired, more would outlive the CA that signs it.
    #[error(
        "--days {0}: give 1 to {MAX_DAYS} days (0 writes a certificate already expired, more outlives the fleet CA); nothing was written"
    )]
    Days(u32),
    /// rcgen could not build or sign a certificate.
    #[error("cannot build the certificate for {name:?}: {source}")]
    Build {
        /// The certificate name.
        name: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
}

/// Checks a certificate name: 1 to 64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
///
/// # Errors
/// [`PkiError::Name`].
pub fn validate_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(PkiError::Name(name.to_owned()))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `contents` to a new file with `mode`; fails if it exists.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists(path.to_owned())
            } else {
                io(path)(e)
            }
        })?;
    f.write_all(contents.as_bytes()).map_err(io(path))
}

/// Creates the fleet CA in `dir` (created with mode 0700 if missing): `ca.pem` and
/// `ca.key`. Never overwrites an existing CA.
///
/// # Errors
/// [`PkiError::Exists`] if `dir/ca.key` or `dir/ca.pem` exists; I/O and build errors.
pub fn init_ca(dir: &Path) -> Result<IssuedFiles, PkiError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let files = IssuedFiles {
        cert: dir.join("ca.pem"),
        key: dir.join("ca.key"),
    };
    for p in [&files.key, &files.cert] {
        if p.exists() {
            return Err(PkiError::Exists(p.clone()));
        }
    }
    let build = |source| PkiError::Build {
        name: "ca".into(),
        source,
    };
    let key = KeyPair::generate().map_err(build)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Ferry fleet CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(CA_DAYS);
    let cert = params.self_signed(&key).map_err(build)?;
    write_new(&files.key, &key.serialize_pem(), 0o600)?;
    write_new(&files.cert, &cert.pem(), 0o644)?;
    Ok(files)
}

/// Issues a certificate for `name`, valid for `days`, signed by the CA in `dir`: SAN DNS
/// `name` plus each of `sans` (an IP address if it parses as one, else a DNS name), usable
/// as both TLS server and client. Writes `dir/<name>.pem` and `dir/<name>.key`.
///
/// # Errors
/// [`PkiError::Days`] for `days` outside 1 to [`MAX_DAYS`], [`PkiError::Name`],
/// [`PkiError::Exists`], [`PkiError::Ca`], I/O and build errors. Nothing is written then.
pub fn issue(dir: &Path, name: &str, sans: &[String], days: u32) -> Result<IssuedFiles, PkiError> {
    if !(1..=MAX_DAYS).contains(&days) {
        return Err(PkiError::Days(days));
    }
    validate_name(name)?;
    if name == "ca" {
        return Err(PkiError::Name(name.to_owned()));
    }
    let ca_err = |message: String| PkiError::Ca {
        dir: dir.to_owned(),
        message,
    };
    let ca_cert =
        std::fs::read_to_string(dir.join("ca.pem")).map_err(|e| ca_err(format!("ca.pem: {e}")))?;
    let ca_key =
        std::fs::read_to_string(dir.join("ca.key")).map_err(|e| ca_err(format!("ca.key: {e}")))?;
    let ca_key = KeyPair::from_pem(&ca_key).map_err(|e| ca_err(format!("ca.key: {e}")))?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_cert, ca_key).map_err(|e| ca_err(format!("ca.pem: {e}")))?;

    let files = IssuedFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    for p in [&files.key, &files.cert] {
        if p.exists() {
            return Err(PkiError::Exists(p.clone()));
        }
    }
    let build = |source| PkiError::Build {
        name: name.to_owned(),
        source,
    };
    let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(build)?;
    for san in sans {
        let entry = match san.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(san.as_str().try_into().map_err(build)?),
        };
        params.subject_alt_names.push(entry);
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
    let key = KeyPair::generate().map_err(build)?;
    let cert = params.signed_by(&key, &issuer).map_err(build)?;
    write_new(&files.key, &key.serialize_pem(), 0o600)?;
    write_new(&files.cert, &cert.pem(), 0o644)?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn init_then_issue_writes_private_keys_0600_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        let ca = init_ca(&pki).unwrap();
        assert!(matches!(init_ca(&pki), Err(PkiError::Exists(_))));
        let leaf = issue(
            &pki,
            "pg-prod",
            &["127.0.0.1".into(), "db1.example".into()],
            30,
        )
        .unwrap();
        for key in [&ca.key, &leaf.key] {
            assert_eq!(
                std::fs::metadata(key).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let pem = std::fs::read_to_string(&leaf.cert).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(matches!(
            issue(&pki, "pg-prod", &[], 30),
            Err(PkiError::Exists(_))
        ));
    }

    #[test]
    fn names_that_escape_the_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        for bad in ["", "../x", "a/b", ".hidden", "-x", "ca"] {
            assert!(
                matches!(issue(dir.path(), bad, &[], 1), Err(PkiError::Name(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_validity_of_zero_days_or_beyond_the_cas_is_refused_naming_the_flag_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path()).unwrap();
        for days in [0, MAX_DAYS + 1, u32::MAX] {
            let e = issue(dir.path(), "op", &[], days).unwrap_err();
            assert!(matches!(e, PkiError::Days(d) if d == days), "{e}");
            let text = e.to_string();
            assert!(text.starts_with(&format!("--days {days}: ")), "{text}");
            assert!(!dir.path().join("op.pem").exists() && !dir.path().join("op.key").exists());
        }
        let ok = issue(dir.path(), "op", &[], 1).unwrap();
        let pem = std::fs::read_to_string(&ok.cert).unwrap();
        let der = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1;
        let cert = der.parse_x509().unwrap();
        let left = cert
            .validity()
            .time_to_expiration()
            .expect("not yet expired");
        assert!(left > Duration::hours(23), "{left}");
        issue(dir.path(), "longest", &[], MAX_DAYS).unwrap();
    }

    #[test]
    fn issue_without_a_ca_says_how_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        let e = issue(dir.path(), "x", &[], 1).unwrap_err().to_string();
        assert!(e.contains("pki init"), "{e}");
    }
}
