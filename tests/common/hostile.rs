//! What an attacker (or a broken network) would do to a deployment: certificates with a
//! chosen validity signed by the fleet CA, raw gRPC clients that bypass the `ferry` CLI, a
//! backup server whose host key changed, and crafted tar archives encrypted as a
//! production agent would.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_proto::tls::TlsFiles;
use tonic::transport::{Channel, Endpoint};

use crate::fleet::Fleet;
use crate::process::{Proc, bin, chmod, hermetic, output_within, port_open, require, run_ok};
use crate::sshd::Sshd;

/// Issues a certificate for `name` signed by `fleet`'s CA, valid from `not_before` to
/// `not_after` (e.g. both in the past: an expired certificate), with SANs `name` and
/// `127.0.0.1`, usable as TLS server and client, written as `PKI/NAME.pem` and
/// `PKI/NAME.key` (0600). `ferry-coordinator pki issue` only issues certificates valid
/// from now, so this uses rcgen directly, as the coordinator does.
pub fn issue_with_validity(
    fleet: &Fleet,
    name: &str,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> (PathBuf, PathBuf) {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
        KeyUsagePurpose, SanType,
    };
    let ca_key = fs::read_to_string(fleet.pki.join("ca.key")).expect("the fleet's ca.key");
    let ca_key = KeyPair::from_pem(&ca_key).expect("ca.key is a PEM key");
    let ca_pem = fs::read_to_string(fleet.ca()).expect("the fleet's ca.pem");
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("ca.pem is a CA certificate");
    let mut params = CertificateParams::new(vec![name.to_owned()]).expect("a DNS name");
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    let key = KeyPair::generate().expect("a key pair");
    let cert = params.signed_by(&key, &issuer).expect("signed by the CA");
    let (cert_path, key_path) = (fleet.cert(name), fleet.key(name));
    fs::write(&key_path, key.serialize_pem()).unwrap();
    chmod(&key_path, 0o600);
    fs::write(&cert_path, cert.pem()).unwrap();
    (cert_path, key_path)
}

/// An mTLS channel to `127.0.0.1:port` presenting `name`'s certificate from `fleet` and
/// expecting the server's certificate to be for `server`; `Err` with the whole error chain
/// if the handshake or connection fails.
pub async fn fleet_channel(
    fleet: &Fleet,
    name: &str,
    port: u16,
    server: &str,
) -> Result<Channel, String> {
    tls_channel(
        Some((&fleet.cert(name), &fleet.key(name))),
        &fleet.ca(),
        port,
        server,
    )
    .await
}

/// A TLS channel to `127.0.0.1:port` trusting `ca` for a server certificate for `server`,
/// presenting `identity` (certificate, key: any, e.g. one from a foreign CA) or no client
/// certificate at all; `Err` with the whole error chain if the handshake or connection
/// fails. With TLS 1.3 a server that refuses the client's certificate may only say so at
/// the first call: see [`tls_refused`].
pub async fn tls_channel(
    identity: Option<(&Path, &Path)>,
    ca: &Path,
    port: u16,
    server: &str,
) -> Result<Channel, String> {
    ferry_proto::tls::install_crypto_provider();
    let config = match identity {
        Some((cert, key)) => TlsFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            ca: ca.to_owned(),
        }
        .client_config(server)
        .map_err(|e| e.to_string())?,
        None => tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(
                fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?,
            ))
            .domain_name(server),
    };
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .map_err(|e| e.to_string())?
        .tls_config(config)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| error_chain(&e))
}

/// Whether `status` is a call that never reached the server's handlers because the TLS
/// session failed (the server refused the client's certificate after the handshake, as TLS
/// 1.3 allows, and closed the connection): an error of the client's transport (its
/// `source` is a `tonic::transport::Error`), never an answer of the service itself such as
/// `PermissionDenied`.
pub fn tls_refused(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some_and(|s| s.is::<tonic::transport::Error>())
}

/// An error and all its sources, `: `-separated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// Stops `sshd`, gives it a new host key (so that the key the agents pinned is no longer
/// the server's) and starts it again with the same config, on the same port; returns the
/// new public host key line. The files under its root are kept.
pub fn restart_sshd_with_new_host_key(sshd: &mut Sshd) -> String {
    let old = sshd.host_key();
    sshd.process().kill();
    let dir = sshd.dir().to_owned();
    let host_key = dir.join("host_key");
    fs::remove_file(&host_key).unwrap();
    fs::remove_file(dir.join("host_key.pub")).unwrap();
    run_ok(
        Command::new(require("ssh-keygen", "openssh-client"))
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "ferry-test-host-new"])
            .arg("-f")
            .arg(&host_key),
    );
    let new = sshd.host_key();
    assert_ne!(old, new, "ssh-keygen made the same key again");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    // The old listener may linger for a moment after the kill.
    loop {
        let mut cmd = Command::new(require("sshd", "openssh-server"));
        cmd.arg("-D")
            .arg("-f")
            .arg(dir.join("sshd_config"))
            .arg("-E")
            .arg(dir.join("sshd.log"));
        let mut proc = Proc::spawn(cmd, &dir.join("sshd.out"));
        let started = std::time::Instant::now();
        while proc.try_exit().is_none() && started.elapsed() < Duration::from_secs(5) {
            if port_open(sshd.port()) {
                *sshd.process() = proc;
                return new;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        proc.kill();
        assert!(
            std::time::Instant::now() < deadline,
            "sshd did not start again on port {}:\n{}",
            sshd.port(),
            sshd.log_tail(20)
        );
    }
}

/// `ferry-agent check --config CONFIG` (config, datastores, backup server): its output,
/// within 60 s.
pub fn agent_check(config: &Path) -> std::process::Output {
    let mut cmd = Command::new(bin("ferry-agent"));
    hermetic(&mut cmd).arg("check").arg("--config").arg(config);
    output_within(&mut cmd, b"", Duration::from_secs(60))
}

/// A tar entry as an attacker writes it: its type, its name and link target written into
/// the header as they are (the `tar` crate's builder would refuse `..` and absolute
/// names), and its data.
pub struct RawEntry<'a> {
    /// Regular, directory, symbolic or hard link.
    pub kind: tar::EntryType,
    /// The name, at most 100 bytes.
    pub name: &'a str,
    /// The link target (links only; empty otherwise), at most 100 bytes.
    pub link: &'a str,
    /// The content (regular files).
    pub data: &'a [u8],
}

/// A tar archive of `entries`, in order.
pub fn crafted_tar(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(e.data.len() as u64);
        h.set_mode(if e.kind.is_dir() { 0o755 } else { 0o644 });
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(e.kind);
        h.as_old_mut().name[..e.name.len()].copy_from_slice(e.name.as_bytes());
        h.as_old_mut().linkname[..e.link.len()].copy_from_slice(e.link.as_bytes());
        h.set_cksum();
        b.append(&h, e.data).unwrap();
    }
    b.into_inner().unwrap()
}

/// `plain | zstd | age -r RECIPIENT` with the stock tools, as a production agent stores
/// a backup: the stored bytes.
pub fn zstd_age_encrypt(plain: &[u8], recipient: &str) -> Vec<u8> {
    let age = require("age", "age");
    let zstd = require("zstd", "zstd");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("plain");
    fs::write(&input, plain).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; {} -q -c {} | {} -r {}",
            zstd.display(),
            input.display(),
            age.display(),
            recipient
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "zstd | age failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `age -d -i IDENTITY FILE | zstd -d`: the plaintext of a stored file.
pub fn age_zstd_decrypt(stored: &Path, identity: &Path) -> Vec<u8> {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; {} -d -i {} {} | {} -d -q",
            require("age", "age").display(),
            identity.display(),
            stored.display(),
            require("zstd", "zstd").display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "age -d | zstd -d {} failed: {}",
        stored.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Whether `needle` occurs in `haystack`.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
