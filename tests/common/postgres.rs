//! A throwaway PostgreSQL cluster: initdb as the `postgres` OS user, trust
//! authentication, listening on 127.0.0.1 only, stopped (`pg_ctl stop -m immediate`) on drop.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::process::{
    free_port, hermetic, make_reachable, output_within, require, require_root, tail,
};

/// How long one psql run may take.
const PSQL_TIMEOUT: Duration = Duration::from_secs(600);

/// `/usr/lib/postgresql/<version>/bin` of the newest installed server (the one with
/// `initdb`), or a panic naming the Debian package.
pub fn pg_bin_dir() -> PathBuf {
    fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
        .unwrap_or_else(|| {
            panic!(
                "PostgreSQL is missing (no /usr/lib/postgresql/*/bin/initdb): install the Debian \
                 package postgresql (scripts/install-deps installs everything the tests need)"
            )
        })
}

/// Double-quotes an SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A throwaway PostgreSQL cluster on a free loopback port (see the module docs).
///
/// Its directory holds `data/`, `sock/` (the Unix socket), `postgres.log` and `initdb.log`.
pub struct Postgres {
    dir: PathBuf,
    port: u16,
    bin_dir: PathBuf,
    stopped: bool,
    // Last: removed after the server is stopped.
    _tmp: Option<TempDir>,
}

impl Postgres {
    /// Starts a cluster in a directory of its own, removed on drop.
    pub fn start() -> Postgres {
        let tmp = tempfile::Builder::new()
            .prefix("ferry-pg-")
            .tempdir()
            .expect("create a temporary directory");
        let mut pg = Self::start_in(&tmp.path().join("pg"));
        pg._tmp = Some(tmp);
        pg
    }

    /// Starts a cluster in `dir` (created; every ancestor must be traversable by others).
    pub fn start_in(dir: &Path) -> Postgres {
        Self::start_in_with_conf(dir, "")
    }

    /// Starts a cluster in `dir` with `conf` appended to `postgresql.conf` (e.g.
    /// `archive_mode = on`).
    pub fn start_in_with_conf(dir: &Path, conf: &str) -> Postgres {
        let bin_dir = pg_bin_dir();
        require_root("start PostgreSQL as the postgres OS user (initdb refuses root)");
        let runuser = require("runuser", "util-linux");
        assert!(
            Command::new("id")
                .arg("postgres")
                .output()
                .is_ok_and(|o| o.status.success()),
            "the OS user postgres is missing: install the Debian package postgresql \
             (scripts/install-deps)"
        );
        make_reachable(dir);
        fs::create_dir_all(dir.join("sock")).unwrap();
        let chown = Command::new("chown")
            .arg("-R")
            .arg("postgres:postgres")
            .arg(dir)
            .output()
            .expect("run chown");
        assert!(
            chown.status.success(),
            "chown -R postgres {}",
            dir.display()
        );

        let as_postgres = |program: &Path| {
            let mut c = Command::new(&runuser);
            c.args(["-u", "postgres", "--"])
                .arg(program)
                .current_dir(dir);
            hermetic(&mut c);
            c
        };
        let data = dir.join("data");
        let out = as_postgres(&bin_dir.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run initdb");
        let _ = fs::write(
            dir.join("initdb.log"),
            [out.stdout.as_slice(), out.stderr.as_slice()].concat(),
        );
        assert!(
            out.status.success(),
            "initdb -D {} failed ({}):\n{}",
            data.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );

        let conf_path = data.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf_path).unwrap();
        text.push_str(&format!(
            "\n# ferry test harness\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\n{conf}\n",
            dir.join("sock").display().to_string().replace('\'', "''")
        ));
        fs::write(&conf_path, text).unwrap();

        // A port can be taken between free_port() and the server's bind by another process:
        // then try another one.
        let log = dir.join("postgres.log");
        for attempt in 1..=5 {
            let port = free_port();
            append_line(&conf_path, &format!("port = {port}"));
            let out = as_postgres(&bin_dir.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "-s", "start"])
                .stdin(Stdio::null())
                .output()
                .expect("run pg_ctl start");
            if out.status.success() {
                return Postgres {
                    dir: dir.to_owned(),
                    port,
                    bin_dir,
                    stopped: false,
                    _tmp: None,
                };
            }
            let server_log = tail(&log, 40);
            let port_taken = server_log.contains("Address already in use")
                || server_log.contains("could not create any TCP/IP sockets");
            if !port_taken || attempt == 5 {
                panic!(
                    "pg_ctl start ({}) failed ({}): {}\n{}:\n{server_log}",
                    data.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr),
                    log.display()
                );
            }
        }
        unreachable!()
    }

    /// A handle on a server the harness did not start, listening on 127.0.0.1:`port`
    /// with trust authentication, `bin_dir` holding its tools: for [`Postgres::psql`] and
    /// [`Postgres::table_fingerprints`]. Dropping it leaves the server running.
    pub fn attach(bin_dir: &Path, port: u16) -> Postgres {
        Postgres {
            dir: PathBuf::new(),
            port,
            bin_dir: bin_dir.to_owned(),
            stopped: true,
            _tmp: None,
        }
    }

    /// Its TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address it listens on: `127.0.0.1`.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The directory of psql, pg_dump, pg_restore and the rest, e.g.
    /// `/usr/lib/postgresql/15/bin`.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Its directory (`data/`, `sock/`, `postgres.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.dir.join("postgres.log"), lines)
    }

    /// A libpq connection string for `db` as the superuser `postgres`.
    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname='{}'",
            self.port,
            db.replace('\\', "\\\\").replace('\'', "\\'")
        )
    }

    /// A `tokio_postgres` client of `db` as `postgres`; its connection runs on a spawned
    /// task (call inside a tokio runtime).
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname(db)
            .connect_timeout(Duration::from_secs(10))
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {db} on 127.0.0.1:{}: {e}", self.port));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("postgres connection ended: {e}");
            }
        });
        client
    }

    /// Runs `sql` (one or more statements, or psql meta-commands) in `db` with
    /// `psql -XAtq -v ON_ERROR_STOP=1` and returns its output (unaligned, tuples only,
    /// `|` between columns, trailing newlines removed); `Err(stderr)` if it fails.
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut cmd = Command::new(self.bin_dir.join("psql"));
        hermetic(&mut cmd)
            .args([
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(db)
            .args(["-f", "-"])
            .env("PGCONNECT_TIMEOUT", "10");
        let out = output_within(&mut cmd, sql.as_bytes(), PSQL_TIMEOUT);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout)
                .trim_end_matches('\n')
                .to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Like [`Postgres::try_psql`], but panics with psql's stderr if it fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql).unwrap_or_else(|stderr| {
            panic!(
                "psql on 127.0.0.1:{} database {db} failed:\n{stderr}\nSQL: {sql}",
                self.port
            )
        })
    }

    /// `CREATE DATABASE name`.
    pub fn create_database(&self, name: &str) {
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {}", quote_ident(name)),
        );
    }

    /// Whether database `db` exists.
    pub fn has_database(&self, db: &str) -> bool {
        self.psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_database WHERE datname = '{}'",
                db.replace('\'', "''")
            ),
        ) == "1"
    }

    /// Every database name, sorted.
    pub fn databases(&self) -> Vec<String> {
        self.psql("postgres", "SELECT datname FROM pg_database ORDER BY 1")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// For every user table of `db` (schemas other than `pg_catalog` and
    /// `information_schema`): `schema.table` → (row count, md5 of every row as text, sorted
    /// (collation "C") and joined with newlines; md5 of the empty string for an empty table).
    /// Two databases with equal fingerprints hold the same tables with the same rows.
    pub fn table_fingerprints(&self, db: &str) -> BTreeMap<String, (i64, String)> {
        self.try_table_fingerprints(db).unwrap_or_else(|stderr| {
            panic!(
                "fingerprints of database {db} on 127.0.0.1:{} failed:\n{stderr}",
                self.port
            )
        })
    }

    /// Like [`Postgres::table_fingerprints`], but returns psql's stderr if a query fails
    /// (for a server another process may restart while it is read).
    pub fn try_table_fingerprints(
        &self,
        db: &str,
    ) -> Result<BTreeMap<String, (i64, String)>, String> {
        let query = self.try_psql(
            db,
            "SELECT string_agg(format(
                 'SELECT %L || ''|'' || count(*) || ''|'' || coalesce(md5(string_agg(ferry_row__::text, E''\\n'' ORDER BY ferry_row__::text COLLATE \"C\")), md5('''')) FROM %I.%I ferry_row__',
                 schemaname || '.' || tablename, schemaname, tablename),
               E'\\nUNION ALL\\n' ORDER BY schemaname, tablename)
             FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
        )?;
        if query.trim().is_empty() {
            return Ok(BTreeMap::new());
        }
        Ok(parse_fingerprints(
            &self.try_psql(db, &format!("{query};"))?,
        ))
    }

    /// Stops the server now (`pg_ctl stop -m immediate`); drop does it otherwise.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let data = self.data_dir();
        let pid = fs::read_to_string(data.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()));
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"])
            .arg(self.bin_dir.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "-t", "30", "-s", "stop"])
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        let ok = cmd.output().is_ok_and(|o| o.status.success());
        if !ok && let Some(pid) = pid {
            let _ = Command::new("/bin/sh")
                .arg("-c")
                .arg(format!("kill -s KILL {pid} 2>/dev/null"))
                .status();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn append_line(path: &Path, line: &str) {
    let mut s = fs::read_to_string(path).unwrap();
    if !s.ends_with('\n') {
        s.push('\n');
    }
    s.push_str(line);
    s.push('\n');
    fs::write(path, s).unwrap();
}

/// Lines `table|rows|md5` (what [`Postgres::table_fingerprints`] queries) as table →
/// (rows, md5).
pub fn parse_fingerprints(text: &str) -> BTreeMap<String, (i64, String)> {
    text.lines()
        .map(|line| {
            let mut parts = line.rsplitn(3, '|');
            let md5 = parts.next().expect("md5").to_owned();
            let rows = parts.next().expect("count").parse().expect("a count");
            let table = parts.next().expect("table").to_owned();
            (table, (rows, md5))
        })
        .collect()
}
