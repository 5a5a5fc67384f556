//! A MongoDB wire-protocol server for the tests: SecantusDB (a one-node replica set
//! `secantus`) from the venv that `scripts/install-deps` makes, on a free loopback port,
//! killed on drop; and [`check_mongo_archive`], the archive checker that is not Ferry's.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::{Proc, free_port, tail};

/// The venv holding SecantusDB and pymongo: `$FERRY_VENV`, by default `/opt/ferry-test/venv`.
fn venv() -> String {
    std::env::var("FERRY_VENV").unwrap_or_else(|_| "/opt/ferry-test/venv".into())
}

/// Runs `tests/tools/check_mongo_archive.py` (an independent reader written from
/// mongo-tools' `common/archive`, see its header) with the venv's Python on the plaintext
/// archive at `archive`. Returns `Ok(summary)`, the checker's JSON summary (namespaces with
/// their types, document counts, UUIDs and indexes; the oplog's entry count), or
/// `Err(why)`, the violation it found.
pub fn check_mongo_archive(archive: &Path) -> Result<serde_json::Value, String> {
    let python = PathBuf::from(venv()).join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/install-deps (it makes the venv with pymongo)",
        python.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/check_mongo_archive.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(archive)
        .output()
        .unwrap_or_else(|e| panic!("{} {}: {e}", python.display(), script.display()));
    match out.status.code() {
        Some(0) => Ok(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "the checker printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })),
        Some(1) => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        _ => panic!(
            "the checker failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// A SecantusDB server (see the module docs).
pub struct MongoServer {
    port: u16,
    proc: Proc,
}

impl MongoServer {
    /// Starts a server storing its data in `dir/data`, its log in `dir/server.log`.
    /// The venv is `$FERRY_VENV`, by default `/opt/ferry-test/venv`.
    pub fn start(dir: &Path) -> MongoServer {
        let venv = venv();
        let server = PathBuf::from(&venv).join("bin/secantusd-py");
        assert!(
            server.exists(),
            "{} is missing: run scripts/install-deps (it installs SecantusDB from PyPI into {venv})",
            server.display()
        );
        fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let mut cmd = Command::new(server);
        cmd.args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--storage-path",
        ])
        .arg(dir.join("data"));
        let mut proc = Proc::spawn(cmd, &dir.join("server.log"));
        proc.wait_port(port, "SecantusDB");
        MongoServer { port, proc }
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The connection string (`directConnection=true`).
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// A `[[datastores]]` entry named `mongo` for this server, to append to an agent's
    /// config.
    pub fn datastore_toml(&self) -> String {
        format!(
            "[[datastores]]\nname = \"mongo\"\nkind = \"mongodb\"\nuri = \"{}\"\n",
            self.uri()
        )
    }

    /// The last 30 lines of its log.
    pub fn log(&self) -> String {
        tail(&self.proc.log, 30)
    }
}
