//! The end-to-end harness: real PostgreSQL clusters, a real sshd as the backup server,
//! and the real `ferry-agent`, `ferry-coordinator` and `ferry` binaries, each on free
//! loopback ports in a per-test directory, stopped on drop. A missing service binary
//! fails the test with the Debian package to install; nothing is skipped.

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The OS user owning the backup server's files (Debian's `backup` user is taken).
pub const BACKUP_USER: &str = "ferrybk";

/// A loopback port nobody listens on, never handed out twice in this process.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind 127.0.0.1:0")
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Waits until something accepts TCP on `port`, or panics with `what` and `log`'s tail.
pub fn wait_port(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{what} did not listen on port {port} within 30 s; log:\n{}",
        tail(log, 40)
    );
}

/// The last `lines` lines of a file (or a note that it is missing).
pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read_to_string(path) {
        Ok(s) => {
            let all: Vec<&str> = s.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// The path of a system tool, or a panic naming the Debian package.
pub fn require(path: &str, package: &str) -> PathBuf {
    let p = if path.contains('/') {
        PathBuf::from(path)
    } else {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
            .map(|d| d.join(path))
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from(path))
    };
    assert!(
        p.exists(),
        "{path} is missing: install the Debian package {package} (scripts/install-deps does)"
    );
    p
}

/// A workspace binary (`ferry-agent`, `ferry-coordinator`, `ferry`), built (once per test
/// process, with `cargo build --workspace --bins`) so it is never stale.
pub fn bin(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_owned();
    let path = dir.join(name);
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut cmd = Command::new(cargo);
        // Drop the per-crate variables cargo sets for this test process: build scripts
        // that track them (ring tracks CARGO_MANIFEST_DIR) would otherwise rebuild.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().into_owned();
            let keep = ["CARGO_HOME", "CARGO_TARGET_DIR"].contains(&key.as_str())
                || [
                    "CARGO_BUILD_",
                    "CARGO_NET_",
                    "CARGO_REGISTRIES_",
                    "CARGO_REGISTRY_",
                    "CARGO_PROFILE_",
                ]
                .iter()
                .any(|p| key.starts_with(p));
            if (key.starts_with("CARGO_") && !keep) || key == "OUT_DIR" {
                cmd.env_remove(&key);
            }
        }
        let out = cmd
            .current_dir(root)
            .args([
                "build",
                "--bins",
                "-p",
                "ferry-agent",
                "-p",
                "ferry-coordinator",
            ])
            .output()
            .expect("run cargo build");
        assert!(
            out.status.success(),
            "cargo build failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    assert!(path.exists(), "{} was not built", path.display());
    path
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A child process killed on drop, with its output in a log file.
pub struct Proc {
    child: Child,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with output to `log`.
    pub fn spawn(mut cmd: Command, log: &Path) -> Proc {
        let f = fs::File::create(log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Proc {
            child,
            log: log.to_owned(),
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it with SIGKILL (a host that dies) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A throwaway PostgreSQL cluster listening on 127.0.0.1 only, trust authentication.
pub struct Postgres {
    dir: PathBuf,
    port: u16,
    bin_dir: PathBuf,
}

impl Postgres {
    /// initdb (as the `postgres` OS user) and start in `dir`.
    pub fn start(dir: &Path) -> Postgres {
        let bin_dir = fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| d.filter_map(Result::ok).map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).max())
            .unwrap_or_else(|| panic!("PostgreSQL server is missing: install the Debian package postgresql (scripts/install-deps does)"));
        fs::create_dir_all(dir.join("sock")).unwrap();
        run_ok(Command::new("chown").arg("-R").arg("postgres").arg(dir));
        let port = free_port();
        let su = |c: String| run_ok(Command::new("su").args(["postgres", "-c", &c]));
        su(format!(
            "{}/initdb -D {d}/data -U postgres --auth=trust -E UTF8 >{d}/initdb.txt 2>&1",
            bin_dir.display(),
            d = dir.display()
        ));
        su(format!(
            "{}/pg_ctl -D {d}/data -l {d}/postgres.log -o '-p {port} -c listen_addresses=127.0.0.1 -k {d}/sock' -w start >/dev/null",
            bin_dir.display(),
            d = dir.display()
        ));
        Postgres {
            dir: dir.to_owned(),
            port,
            bin_dir,
        }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory of pg_dump, psql and the rest.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Runs SQL with psql (ON_ERROR_STOP) in `db`; returns unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin_dir.join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
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
            .arg("-c")
            .arg(sql)
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {db}: {sql}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Whether database `db` exists.
    pub fn has_database(&self, db: &str) -> bool {
        self.psql(
            "postgres",
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{db}'"),
        ) == "1"
    }

    /// Every database name.
    pub fn databases(&self) -> Vec<String> {
        self.psql("postgres", "SELECT datname FROM pg_database ORDER BY 1")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// For every user table of `db`: `schema.table` → (row count, md5 of all rows in order).
    pub fn table_fingerprints(&self, db: &str) -> BTreeMap<String, (i64, String)> {
        let tables = self.psql(
            db,
            "SELECT schemaname || '.' || tablename FROM pg_tables \
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
        );
        tables
            .lines()
            .map(|t| {
                let row = self.psql(
                    db,
                    &format!("SELECT count(*) || '|' || coalesce(md5(string_agg(x::text, E'\\n' ORDER BY x::text)), 'empty') FROM {t} x"),
                );
                let (n, md5) = row.split_once('|').unwrap();
                (t.to_owned(), (n.parse().unwrap(), md5.to_owned()))
            })
            .collect()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("su")
            .args([
                "postgres",
                "-c",
                &format!(
                    "{}/pg_ctl -D {}/data -m immediate stop",
                    self.bin_dir.display(),
                    self.dir.display()
                ),
            ])
            .output();
    }
}

/// An sshd on loopback acting as the backup server for OS user [`BACKUP_USER`].
pub struct Sshd {
    dir: PathBuf,
    port: u16,
    root: PathBuf,
    proc: Proc,
}

fn ensure_backup_user() {
    static USER: Once = Once::new();
    USER.call_once(|| {
        let exists = |_: ()| {
            Command::new("id")
                .arg(BACKUP_USER)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !exists(()) {
            let _ = Command::new("useradd")
                .args(["-m", "-s", "/bin/sh", BACKUP_USER])
                .output();
        }
        assert!(
            exists(()),
            "cannot create the OS user {BACKUP_USER} (run the tests as root)"
        );
        // No password, but not locked: sshd refuses locked accounts.
        run_ok(Command::new("usermod").args(["-p", "*", BACKUP_USER]));
    });
}

impl Sshd {
    /// Starts an sshd with its own host key, serving SFTP (internal-sftp) on a free port.
    pub fn start(dir: &Path) -> Sshd {
        let sshd = require("sshd", "openssh-server");
        let keygen = require("ssh-keygen", "openssh-client");
        ensure_backup_user();
        fs::create_dir_all(dir).unwrap();
        fs::create_dir_all("/run/sshd").unwrap();
        run_ok(
            Command::new(&keygen)
                .args(["-q", "-t", "ed25519", "-N", ""])
                .arg("-f")
                .arg(dir.join("host_key")),
        );
        let root = dir.join("backups");
        fs::create_dir_all(&root).unwrap();
        run_ok(Command::new("chown").arg(BACKUP_USER).arg(&root));
        fs::write(dir.join("authorized_keys"), "").unwrap();
        let port = free_port();
        let conf = dir.join("sshd_config");
        fs::write(
            &conf,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nSubsystem sftp internal-sftp\nLogLevel VERBOSE\n",
                d = dir.display()
            ),
        )
        .unwrap();
        run_ok(Command::new(&sshd).arg("-t").arg("-f").arg(&conf));
        let mut cmd = Command::new(&sshd);
        cmd.arg("-D").arg("-e").arg("-f").arg(&conf);
        let proc = Proc::spawn(cmd, &dir.join("sshd.log"));
        wait_port(port, "sshd", &proc.log);
        Sshd {
            dir: dir.to_owned(),
            port,
            root,
            proc,
        }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host public key line, `ssh-ed25519 AAAA...`, without comment.
    pub fn host_key(&self) -> String {
        let pubkey = fs::read_to_string(self.dir.join("host_key.pub")).unwrap();
        pubkey
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The layout's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A new client key allowed to log in; returns the private key's path (mode 0600).
    pub fn add_client_key(&self, name: &str) -> PathBuf {
        let key = self.dir.join(name);
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", ""])
                .arg("-f")
                .arg(&key),
        );
        let public = fs::read_to_string(key.with_extension("pub")).unwrap();
        let mut keys = fs::read_to_string(self.dir.join("authorized_keys")).unwrap();
        keys.push_str(&public);
        fs::write(self.dir.join("authorized_keys"), keys).unwrap();
        chmod(&key, 0o600);
        key
    }

    /// Every file under the root, relative, sorted, hidden ones included.
    pub fn files(&self) -> Vec<String> {
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(base, &p, out);
                } else {
                    out.push(p.strip_prefix(base).unwrap().display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &self.root, &mut out);
        out.sort();
        out
    }

    /// Files whose name is final (not a hidden partial).
    pub fn final_files(&self) -> Vec<String> {
        self.files()
            .into_iter()
            .filter(|f| {
                !Path::new(f)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .collect()
    }

    /// The sshd log.
    pub fn log(&self) -> String {
        tail(&self.proc.log, 30)
    }
}

/// The fleet's certificates (made with `ferry-coordinator pki`) and age keys.
pub struct Fleet {
    /// The PKI directory.
    pub pki: PathBuf,
}

impl Fleet {
    /// A new fleet CA in `dir/pki`.
    pub fn new(dir: &Path) -> Fleet {
        let pki = dir.join("pki");
        run_ok(
            Command::new(bin("ferry-coordinator"))
                .args(["pki", "init", "--dir"])
                .arg(&pki),
        );
        Fleet { pki }
    }

    /// Issues `name`'s certificate with SAN 127.0.0.1: (cert, key).
    pub fn issue(&self, name: &str) -> (PathBuf, PathBuf) {
        run_ok(
            Command::new(bin("ferry-coordinator"))
                .args([
                    "pki",
                    "issue",
                    "--san",
                    "127.0.0.1",
                    "--name",
                    name,
                    "--dir",
                ])
                .arg(&self.pki),
        );
        (
            self.pki.join(format!("{name}.pem")),
            self.pki.join(format!("{name}.key")),
        )
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.pki.join("ca.pem")
    }
}

/// `ferry-agent keygen --out path`: writes the identity, returns the recipient.
pub fn age_keygen(path: &Path) -> String {
    run_ok(
        Command::new(bin("ferry-agent"))
            .arg("keygen")
            .arg("--out")
            .arg(path),
    )
    .trim()
    .to_owned()
}

/// Everything of one test: production and staging PostgreSQL, the backup server, the
/// fleet, two agents and the coordinator.
pub struct Deployment {
    /// The test's directory (removed on drop).
    pub dir: TempDir,
    /// Production cluster; database `app` holds the source data.
    pub prod_pg: Postgres,
    /// Staging cluster; database `app` is the restore target.
    pub stage_pg: Postgres,
    /// The backup server.
    pub sshd: Sshd,
    /// Certificates.
    pub fleet: Fleet,
    /// The staging identity file.
    pub identity: PathBuf,
    /// Agent config files: production, staging.
    pub prod_config: PathBuf,
    /// Staging agent config.
    pub stage_config: PathBuf,
    /// Coordinator config.
    pub coordinator_config: PathBuf,
    /// Ports: production agent, staging agent, coordinator.
    pub prod_port: u16,
    /// Staging agent port.
    pub stage_port: u16,
    /// Coordinator port.
    pub coordinator_port: u16,
    /// Running processes by name (`agent-prod`, `agent-stage`, `coordinator`).
    pub procs: BTreeMap<&'static str, Proc>,
}

/// A small source dataset: owned by a role, granted to another, with varied text, jsonb
/// and 10,000 rows in a bigint identity table.
pub const DEFAULT_DATA: &str = "
CREATE TABLE accounts (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL, balance numeric(12,2));
INSERT INTO accounts (name, balance) SELECT 'account ' || g || ' ' || md5(g::text), (g * 7 % 1000)::numeric / 3 FROM generate_series(1, 10000) g;
CREATE TABLE notes (id int PRIMARY KEY, body text, tags jsonb, created timestamptz);
INSERT INTO notes SELECT g, md5(random()::text) || ' ' || md5(random()::text), jsonb_build_object('n', g, 'even', g % 2 = 0), '2026-01-01'::timestamptz + g * interval '1 minute' FROM generate_series(1, 3000) g;
CREATE TABLE empty_table (x int);
CREATE SCHEMA billing;
CREATE TABLE billing.invoices (id serial PRIMARY KEY, account bigint REFERENCES accounts(id), amount numeric);
INSERT INTO billing.invoices (account, amount) SELECT g, g * 1.5 FROM generate_series(1, 500) g;
ALTER TABLE accounts OWNER TO app_owner;
ALTER TABLE notes OWNER TO app_owner;
GRANT SELECT ON notes TO app_reader;
";

impl Deployment {
    /// Starts everything with [`DEFAULT_DATA`] in production's `app`.
    pub fn start() -> Deployment {
        Self::start_with(DEFAULT_DATA, |_| {})
    }

    /// Starts everything with `sql` as production's data; `tweak` may edit the agent
    /// configs (production, staging) before the processes start.
    pub fn start_with(sql: &str, tweak: impl FnOnce(&mut Deployment)) -> Deployment {
        let dir = tempfile::Builder::new()
            .prefix("ferry-test-")
            .tempdir()
            .unwrap();
        chmod(dir.path(), 0o755);
        let prod_pg = Postgres::start(&dir.path().join("pg-prod"));
        let stage_pg = Postgres::start(&dir.path().join("pg-stage"));
        prod_pg.psql("postgres", "CREATE ROLE app_owner");
        prod_pg.psql("postgres", "CREATE ROLE app_reader");
        prod_pg.psql("postgres", "CREATE DATABASE app OWNER app_owner");
        prod_pg.psql("app", sql);
        let sshd = Sshd::start(&dir.path().join("sshd"));
        let prod_key = sshd.add_client_key("id_prod");
        let stage_key = sshd.add_client_key("id_stage");
        let fleet = Fleet::new(dir.path());
        for n in ["coordinator", "pg-prod", "pg-stage", "operator"] {
            fleet.issue(n);
        }
        let identity = dir.path().join("staging.key");
        let recipient = age_keygen(&identity);
        let (prod_port, stage_port, coordinator_port) = (free_port(), free_port(), free_port());
        let d = dir.path().to_owned();
        let server = |key: &Path| {
            format!(
                "[backup_server]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{BACKUP_USER}\"\nprivate_key_file = \"{}\"\n\
                 host_key = \"{}\"\nroot = \"{}\"\nio_timeout_seconds = 20\n",
                sshd.port(),
                key.display(),
                sshd.host_key(),
                sshd.root().display()
            )
        };
        let tls = |name: &str| {
            format!(
                "[tls]\ncert = \"{p}/{name}.pem\"\nkey = \"{p}/{name}.key\"\nca = \"{p}/ca.pem\"\n",
                p = fleet.pki.display()
            )
        };
        let prod_config = d.join("pg-prod.toml");
        fs::write(
            &prod_config,
            format!(
                "id = \"pg-prod\"\nrole = \"production\"\nenvironment = \"production\"\nlisten = \"127.0.0.1:{prod_port}\"\n\n{}\n{}\n\
                 [encryption]\nrecipients = [\"{recipient}\"]\n\n\
                 [[datastores]]\nname = \"postgres\"\nkind = \"postgres\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"postgres\"\n\
                 database = \"app\"\nbin_dir = \"{}\"\n",
                tls("pg-prod"),
                server(&prod_key),
                prod_pg.port(),
                prod_pg.bin_dir().display()
            ),
        )
        .unwrap();
        let stage_config = d.join("pg-stage.toml");
        fs::write(
            &stage_config,
            format!(
                "id = \"pg-stage\"\nrole = \"staging\"\nenvironment = \"staging\"\nlisten = \"127.0.0.1:{stage_port}\"\n\n{}\n{}\n\
                 [encryption]\nidentity_file = \"{}\"\n\n[restore]\nsource_environment = \"production\"\n\n\
                 [[datastores]]\nname = \"postgres\"\nkind = \"postgres\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"postgres\"\n\
                 target_database = \"app\"\nbin_dir = \"{}\"\n",
                tls("pg-stage"),
                server(&stage_key),
                identity.display(),
                stage_pg.port(),
                stage_pg.bin_dir().display()
            ),
        )
        .unwrap();
        let coordinator_config = d.join("coordinator.toml");
        fs::write(
            &coordinator_config,
            format!(
                "listen = \"127.0.0.1:{coordinator_port}\"\nstore = \"{}/coordinator.redb\"\nagent_timeout_seconds = 10\n\n{}\n\
                 [retry]\nmax_attempts = 2\ninitial_backoff_seconds = 1\nmax_backoff_seconds = 2\n\n\
                 [[agents]]\nid = \"pg-prod\"\naddress = \"https://127.0.0.1:{prod_port}\"\nrole = \"production\"\nenvironment = \"production\"\n\n\
                 [[agents]]\nid = \"pg-stage\"\naddress = \"https://127.0.0.1:{stage_port}\"\nrole = \"staging\"\nenvironment = \"staging\"\n",
                d.display(),
                tls("coordinator")
            ),
        )
        .unwrap();
        let mut dep = Deployment {
            dir,
            prod_pg,
            stage_pg,
            sshd,
            fleet,
            identity,
            prod_config,
            stage_config,
            coordinator_config,
            prod_port,
            stage_port,
            coordinator_port,
            procs: BTreeMap::new(),
        };
        tweak(&mut dep);
        dep.start_agent("agent-prod");
        dep.start_agent("agent-stage");
        dep.start_coordinator();
        dep
    }

    /// Starts (or restarts) `agent-prod` or `agent-stage`.
    pub fn start_agent(&mut self, which: &'static str) {
        let (config, port) = match which {
            "agent-prod" => (self.prod_config.clone(), self.prod_port),
            _ => (self.stage_config.clone(), self.stage_port),
        };
        let mut cmd = Command::new(bin("ferry-agent"));
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .env("FERRY_LOG", "info,ferry_agent=debug");
        let proc = Proc::spawn(cmd, &self.dir.path().join(format!("{which}.log")));
        wait_port(port, which, &proc.log);
        self.procs.insert(which, proc);
    }

    /// Starts the coordinator.
    pub fn start_coordinator(&mut self) {
        let mut cmd = Command::new(bin("ferry-coordinator"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.coordinator_config);
        let proc = Proc::spawn(cmd, &self.dir.path().join("coordinator.log"));
        wait_port(self.coordinator_port, "coordinator", &proc.log);
        self.procs.insert("coordinator", proc);
    }

    /// Runs the `ferry` CLI as the operator.
    pub fn ferry(&self, args: &[&str]) -> Output {
        let p = &self.fleet.pki;
        Command::new(bin("ferry"))
            .arg("--coordinator")
            .arg(format!("https://127.0.0.1:{}", self.coordinator_port))
            .arg("--ca")
            .arg(p.join("ca.pem"))
            .arg("--cert")
            .arg(p.join("operator.pem"))
            .arg("--key")
            .arg(p.join("operator.key"))
            .args(args)
            .output()
            .expect("run ferry")
    }

    /// Runs `ferry` and returns stdout; panics with everything useful if it fails.
    pub fn ferry_ok(&self, args: &[&str]) -> String {
        let out = self.ferry(args);
        assert!(
            out.status.success(),
            "ferry {args:?} failed ({}):\nstdout: {}\nstderr: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ferry --output json ARGS` parsed.
    pub fn ferry_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let out = self.ferry(&all);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "ferry {args:?} printed no JSON ({e}):\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// The last lines of every process log.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for (name, p) in &self.procs {
            s.push_str(&format!("--- {name}\n{}\n", tail(&p.log, 25)));
        }
        s
    }

    /// The stored main archive of the newest production backup (absolute path).
    pub fn stored_archive(&self) -> PathBuf {
        let f = self
            .sshd
            .final_files()
            .into_iter()
            .find(|f| f.contains("/postgres_backup_") && f.ends_with(".age"))
            .unwrap_or_else(|| panic!("no stored archive; files: {:?}", self.sshd.files()));
        self.sshd.root().join(f)
    }
}

/// A SecantusDB server (MongoDB wire protocol, a one-node replica set `secantus`) on a
/// free loopback port, from the venv that `scripts/install-deps` makes.
pub struct MongoServer {
    port: u16,
    proc: Proc,
}

impl MongoServer {
    /// Starts a server storing its data in `dir`.
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
        let proc = Proc::spawn(cmd, &dir.join("server.log"));
        wait_port(port, "SecantusDB", &proc.log);
        MongoServer { port, proc }
    }

    /// The connection string.
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// Its log.
    pub fn log(&self) -> String {
        tail(&self.proc.log, 30)
    }
}

/// Appends text to a file (a `[[datastores]]` entry to an agent config).
pub fn append(path: &Path, text: &str) {
    let mut s = fs::read_to_string(path).unwrap();
    s.push('\n');
    s.push_str(text);
    fs::write(path, s).unwrap();
}
