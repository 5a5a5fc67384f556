//! The fleet's certificates (made with `ferry-coordinator pki`) and age keys (made with
//! `ferry-agent keygen`): the real binaries, as an operator would.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::Tls;
use crate::process::{bin, hermetic, run_ok};

/// A fleet CA and the certificates it issued, all in one PKI directory.
pub struct Fleet {
    /// The PKI directory: `ca.pem`, `ca.key`, and `NAME.pem` / `NAME.key` per certificate.
    pub pki: PathBuf,
}

impl Fleet {
    /// `ferry-coordinator pki init --dir DIR/pki`: a new fleet CA.
    pub fn new(dir: &Path) -> Fleet {
        let pki = dir.join("pki");
        run_ok(
            hermetic(&mut Command::new(bin("ferry-coordinator")))
                .args(["pki", "init", "--dir"])
                .arg(&pki),
        );
        Fleet { pki }
    }

    /// Issues `name`'s certificate with SAN `127.0.0.1` (agents are named by their id, the
    /// coordinator `coordinator`, the CLI `operator`): (certificate, key).
    pub fn issue(&self, name: &str) -> (PathBuf, PathBuf) {
        self.issue_with_sans(name, &["127.0.0.1"])
    }

    /// `ferry-coordinator pki issue --dir PKI --name NAME [--san S]...`: (certificate, key),
    /// i.e. `PKI/NAME.pem` and `PKI/NAME.key`.
    pub fn issue_with_sans(&self, name: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
        let mut cmd = Command::new(bin("ferry-coordinator"));
        hermetic(&mut cmd)
            .args(["pki", "issue", "--dir"])
            .arg(&self.pki)
            .args(["--name", name]);
        for san in sans {
            cmd.args(["--san", san]);
        }
        run_ok(&mut cmd);
        let (cert, key) = (self.cert(name), self.key(name));
        assert!(cert.exists(), "pki issue wrote no {}", cert.display());
        assert!(key.exists(), "pki issue wrote no {}", key.display());
        (cert, key)
    }

    /// The CA certificate, `PKI/ca.pem`.
    pub fn ca(&self) -> PathBuf {
        self.pki.join("ca.pem")
    }

    /// `name`'s certificate, `PKI/NAME.pem`.
    pub fn cert(&self, name: &str) -> PathBuf {
        self.pki.join(format!("{name}.pem"))
    }

    /// `name`'s private key, `PKI/NAME.key`.
    pub fn key(&self, name: &str) -> PathBuf {
        self.pki.join(format!("{name}.key"))
    }

    /// The `[tls]` section for `name`: its certificate and key, and the CA.
    pub fn tls(&self, name: &str) -> Tls {
        Tls {
            cert: self.cert(name),
            key: self.key(name),
            ca: self.ca(),
        }
    }
}

/// `ferry-agent keygen --out PATH`: writes an age identity file (mode 0600) and returns
/// its recipient (`age1...`).
pub fn age_keygen(path: &Path) -> String {
    let recipient = run_ok(
        hermetic(&mut Command::new(bin("ferry-agent")))
            .arg("keygen")
            .arg("--out")
            .arg(path),
    )
    .trim()
    .to_owned();
    assert!(
        recipient.starts_with("age1"),
        "ferry-agent keygen printed no recipient: {recipient:?}"
    );
    recipient
}
