//! A MongoDB wire-protocol server for the tests: SecantusDB (a one-node replica set
//! `secantus`) from the venv that `scripts/install-deps` makes, on a free loopback port,
//! killed on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::{Proc, free_port, tail};

/// A SecantusDB server (see the module docs).
pub struct MongoServer {
    port: u16,
    proc: Proc,
}

impl MongoServer {
    /// Starts a server storing its data in `dir/data`, its log in `dir/server.log`.
    /// The venv is `$FERRY_VENV`, by default `/opt/ferry-test/venv`.
    pub fn start(dir: &Path) -> MongoServer {
        let venv = std::env::var("FERRY_VENV").unwrap_or_else(|_| "/opt/ferry-test/venv".into());
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
