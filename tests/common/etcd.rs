//! etcd for the tests: a one-member cluster (Debian's etcd-server) on free loopback ports,
//! killed on drop, and `etcdctl` (Debian's etcd-client) against it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{Proc, free_port, output_within, require};

/// A running etcd member (see the module docs).
pub struct EtcdServer {
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its member name.
    pub name: String,
    client_port: u16,
    peer_port: u16,
    proc: Proc,
}

impl EtcdServer {
    /// Starts a new member `name` with its data in `dir/data` and its log in
    /// `dir/etcd.log`.
    pub fn start(dir: &Path, name: &str) -> EtcdServer {
        std::fs::create_dir_all(dir).unwrap();
        Self::start_on(&dir.join("data"), name, free_port(), free_port())
    }

    /// Starts a member on an existing or new `data_dir` (e.g. one a restore made), with
    /// the given ports; its log goes beside the data directory (`etcd.log`).
    pub fn start_on(data_dir: &Path, name: &str, client_port: u16, peer_port: u16) -> EtcdServer {
        let etcd = require("etcd", "etcd-server");
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(etcd);
        cmd.arg(format!("--name={name}"))
            .arg(format!("--data-dir={}", data_dir.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={name}={peer}"))
            .env_remove("ETCDCTL_API");
        let log = data_dir.with_file_name("etcd.log");
        let mut proc = Proc::spawn(cmd, &log);
        proc.wait_port(client_port, "etcd");
        let server = EtcdServer {
            data_dir: data_dir.to_owned(),
            name: name.to_owned(),
            client_port,
            peer_port,
            proc,
        };
        server.ctl(&["endpoint", "health"], b"");
        server
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The peer URL (`--initial-advertise-peer-urls`).
    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// The peer port.
    pub fn peer_port(&self) -> u16 {
        self.peer_port
    }

    /// Runs `etcdctl --endpoints=... ARGS` with `stdin`; its stdout, or a panic with
    /// its stderr.
    pub fn ctl(&self, args: &[&str], stdin: &[u8]) -> String {
        let mut cmd = Command::new(require("etcdctl", "etcd-client"));
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .args(args);
        let out = output_within(&mut cmd, stdin, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.proc.log_tail(20)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every key with its value and revisions: `(key, value, create_revision,
    /// mod_revision, version)`, keys and values base64 as etcd's JSON gives them.
    pub fn all(&self) -> Vec<(String, String, i64, i64, i64)> {
        let out = self.ctl(&["get", "", "--from-key", "-w", "json"], b"");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter()
                    .map(|kv| {
                        (
                            kv["key"].as_str().unwrap_or_default().to_owned(),
                            kv["value"].as_str().unwrap_or_default().to_owned(),
                            kv["create_revision"].as_i64().unwrap_or_default(),
                            kv["mod_revision"].as_i64().unwrap_or_default(),
                            kv["version"].as_i64().unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The store's current revision.
    pub fn revision(&self) -> i64 {
        let out = self.ctl(&["get", "", "--from-key", "--limit=1", "-w", "json"], b"");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["header"]["revision"].as_i64().unwrap()
    }

    /// Stops it (SIGTERM, then SIGKILL after 10 s).
    pub fn stop(&mut self) {
        self.proc.terminate(Duration::from_secs(10));
    }
}
