//! InfluxDB 1.x for the tests (Debian's influxdb): a server with its directories in a
//! test directory, HTTP and RPC on free loopback ports, killed on drop; queries through
//! the `influx` shell (Debian's influxdb-client).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::process::{Proc, free_port, output_within, require, run_ok};

/// A running influxd (see the module docs).
pub struct InfluxServer {
    http_port: u16,
    rpc_port: u16,
    proc: Proc,
}

impl InfluxServer {
    /// Starts influxd with its meta, data and WAL directories under `dir`, its config in
    /// `dir/influxdb.conf` and its log in `dir/influxd.log`.
    pub fn start(dir: &Path) -> InfluxServer {
        let influxd = require("influxd", "influxdb");
        fs::create_dir_all(dir).unwrap();
        let (http_port, rpc_port) = (free_port(), free_port());
        let defaults = run_ok(Command::new(&influxd).arg("config"));
        let mut conf = String::new();
        let mut section = String::new();
        for line in defaults.lines() {
            let t = line.trim();
            if t.starts_with('[') {
                section = t.to_owned();
            }
            let replaced = if t.starts_with("bind-address") && section.is_empty() {
                format!("bind-address = \"127.0.0.1:{rpc_port}\"")
            } else if t.starts_with("bind-address") && section == "[http]" {
                format!("  bind-address = \"127.0.0.1:{http_port}\"")
            } else if t.starts_with("reporting-enabled") {
                "reporting-enabled = false".to_owned()
            } else {
                line.replace("/var/lib/influxdb", &dir.display().to_string())
            };
            conf.push_str(&replaced);
            conf.push('\n');
        }
        let conf_path = dir.join("influxdb.conf");
        fs::write(&conf_path, conf).unwrap();
        let mut cmd = Command::new(influxd);
        cmd.arg("run").arg("-config").arg(&conf_path);
        let mut proc = Proc::spawn(cmd, &dir.join("influxd.log"));
        proc.wait_port(http_port, "influxd (HTTP)");
        proc.wait_port(rpc_port, "influxd (RPC)");
        InfluxServer {
            http_port,
            rpc_port,
            proc,
        }
    }

    /// The HTTP port.
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// `127.0.0.1:<rpc port>`, for `influxd backup/restore -host`.
    pub fn rpc_address(&self) -> String {
        format!("127.0.0.1:{}", self.rpc_port)
    }

    fn influx(&self) -> Command {
        let mut cmd = Command::new(require("influx", "influxdb-client"));
        cmd.args(["-host", "127.0.0.1", "-port", &self.http_port.to_string()]);
        cmd
    }

    /// Runs an InfluxQL statement (in `db` if given) and returns the JSON answer; panics
    /// on an error.
    pub fn query(&self, db: Option<&str>, q: &str) -> serde_json::Value {
        let mut cmd = self.influx();
        cmd.args(["-format", "json", "-execute", q]);
        if let Some(db) = db {
            cmd.args(["-database", db]);
        }
        let out = output_within(&mut cmd, b"", Duration::from_secs(60));
        assert!(
            out.status.success(),
            "influx {q:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.proc.log_tail(20)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Writes `lines` (line protocol, nanosecond timestamps) into `db`.
    pub fn write(&self, db: &str, lines: &str, dir: &Path) {
        let file = dir.join(format!("import-{db}.txt"));
        fs::write(&file, format!("# DML\n# CONTEXT-DATABASE: {db}\n{lines}")).unwrap();
        let mut cmd = self.influx();
        cmd.arg("-import").arg("-path").arg(&file);
        let out = output_within(&mut cmd, b"", Duration::from_secs(120));
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains("Failed 0 inserts"),
            "influx -import: {text}"
        );
    }

    /// Database names.
    pub fn databases(&self) -> Vec<String> {
        let v = self.query(None, "SHOW DATABASES");
        v["results"][0]["series"][0]["values"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .filter_map(|r| r[0].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every point of `db` as the JSON of `SELECT * FROM /.*/` (series by measurement,
    /// rows by time), for comparing two databases.
    pub fn dump(&self, db: &str) -> serde_json::Value {
        self.query(Some(db), "SELECT * FROM /.*/ GROUP BY *")
    }
}
