//! One whole Ferry deployment for one test: production and staging PostgreSQL, the backup
//! server, the fleet's certificates and age keys, two agents (`pg-prod`, `pg-stage`) and
//! the coordinator, in one temporary directory, all stopped on drop.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tempfile::TempDir;

use crate::config::{
    AgentConfig, AgentEntry, AgentRole, BackupServer, CoordinatorConfig, Datastore, Encryption,
    Operator, PostgresDatastore, Retry, Schedule,
};
use crate::fleet::{Fleet, age_keygen};
use crate::netns::Netns;
use crate::postgres::Postgres;
use crate::process::{Proc, bin, free_port, hermetic, make_reachable, output_within, tail};
use crate::sshd::Sshd;

/// How long one `ferry` CLI run may take before the test fails.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(600);

/// The default source dataset of production's `app`: four tables in two schemas, all
/// owned by the role `app_owner`, `SELECT` on `notes` granted to `app_reader`; a bigint
/// identity table of 10,000 rows (`accounts`), varied text (random, quotes, backslashes,
/// tabs and newlines, non-ASCII, empty and NULL) and jsonb (`notes`, 3,006 rows), an empty
/// table and a foreign key (`billing.invoices`, 500 rows).
pub const DEFAULT_DATA: &str = r#"
CREATE TABLE accounts (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL, balance numeric(12,2));
INSERT INTO accounts (name, balance) SELECT 'account ' || g || ' ' || md5(g::text), (g * 7 % 1000)::numeric / 3 FROM generate_series(1, 10000) g;
CREATE TABLE notes (id int PRIMARY KEY, body text, tags jsonb, created timestamptz);
INSERT INTO notes SELECT g, md5(random()::text) || ' ' || md5(random()::text), jsonb_build_object('n', g, 'even', g % 2 = 0), '2026-01-01'::timestamptz + g * interval '1 minute' FROM generate_series(1, 3000) g;
INSERT INTO notes VALUES
  (3001, 'it''s "quoted" and back\slashed \N', '{"s": "a\"b", "nested": {"list": [1, 2.5, null, true]}}', '2026-02-01 00:00:00+00'),
  (3002, E'tab\there\nnew line\r\nand a last one\n', '[]', NULL),
  (3003, 'non-ASCII: é ü ß ø 日本語 Ελληνικά 🚀', '{"ключ": "значение"}', '1999-12-31 23:59:59.999999+00'),
  (3004, '', '{}', 'infinity'),
  (3005, NULL, NULL, '-infinity'),
  (3006, repeat('long text ', 5000), '{"big": true}', now());
CREATE TABLE empty_table (x int);
CREATE SCHEMA billing AUTHORIZATION app_owner;
CREATE TABLE billing.invoices (id serial PRIMARY KEY, account bigint REFERENCES accounts(id), amount numeric);
INSERT INTO billing.invoices (account, amount) SELECT g, g * 1.5 FROM generate_series(1, 500) g;
ALTER TABLE accounts OWNER TO app_owner;
ALTER TABLE notes OWNER TO app_owner;
ALTER TABLE empty_table OWNER TO app_owner;
ALTER TABLE billing.invoices OWNER TO app_owner;
GRANT SELECT ON notes TO app_reader;
"#;

/// A change to a deployment between writing its configs and starting its processes.
pub type Tweak<'a> = Box<dyn FnOnce(&mut Deployment) + 'a>;

/// How [`Deployment::start_with_options`] builds a deployment.
pub struct DeploymentOptions<'a> {
    /// SQL run in production's `app` after the roles `app_owner`, `app_reader` and the
    /// database `app` (owned by `app_owner`) are created. Default: [`DEFAULT_DATA`].
    pub source_sql: String,
    /// The coordinator's schedules. Default: none.
    pub schedules: Vec<Schedule>,
    /// Start both agents. Default: true.
    pub start_agents: bool,
    /// Start the coordinator. Default: true.
    pub start_coordinator: bool,
    /// The coordinator's `agent_timeout_seconds`. Default: 10.
    pub agent_timeout_seconds: u64,
    /// The coordinator's `[retry]`. Default: 2 attempts, back-off 1 to 2 s.
    pub retry: Retry,
    /// The agents' `backup_server.io_timeout_seconds`. Default: 20.
    pub io_timeout_seconds: Option<u64>,
    /// Runs the backup server in a network namespace of its own ([`Netns`]), so the test
    /// can cut its link. Default: false (on 127.0.0.1).
    pub backup_server_netns: bool,
    /// Runs after every config file is written and before any process starts, e.g. to
    /// edit a config or start another service in the deployment's directory.
    pub tweak: Option<Tweak<'a>>,
}

impl Default for DeploymentOptions<'_> {
    fn default() -> Self {
        DeploymentOptions {
            source_sql: DEFAULT_DATA.to_owned(),
            schedules: Vec::new(),
            start_agents: true,
            start_coordinator: true,
            agent_timeout_seconds: 10,
            retry: Retry {
                max_attempts: 2,
                initial_backoff_seconds: 1,
                max_backoff_seconds: 2,
            },
            io_timeout_seconds: Some(20),
            backup_server_netns: false,
            tweak: None,
        }
    }
}

/// Everything of one test (see the module docs). Fields are declared in drop order:
/// processes first, the directory last.
///
/// The directory holds `pg-prod/`, `pg-stage/`, `sshd/` (with `backups/`, the keys
/// `id_prod` and `id_stage`), `pki/`, `staging.key`, `pg-prod.toml`, `pg-stage.toml`,
/// `coordinator.toml`, `coordinator.redb` and the logs `agent-prod.log`,
/// `agent-stage.log`, `coordinator.log`. `FERRY_KEEP_TEST_DIRS=1` keeps it after the test.
pub struct Deployment {
    /// Running processes by name: `agent-prod`, `agent-stage`, `coordinator`.
    pub procs: BTreeMap<&'static str, Proc>,
    /// Production cluster; database `app` holds the source data.
    pub prod_pg: Postgres,
    /// Staging cluster (a separate cluster: roles come only from the restore); database
    /// `app` is the restore target.
    pub stage_pg: Postgres,
    /// The backup server.
    pub sshd: Sshd,
    /// The backup server's network namespace, if it has one (removed after sshd stops).
    pub netns: Option<Netns>,
    /// Certificates: `coordinator`, `pg-prod`, `pg-stage`, `operator` (the CLI's, an admin
    /// in `[[operators]]`).
    pub fleet: Fleet,
    /// The staging age identity file.
    pub identity: PathBuf,
    /// Its recipient, in production's config.
    pub recipient: String,
    /// Production's SSH private key.
    pub prod_key: PathBuf,
    /// Staging's SSH private key.
    pub stage_key: PathBuf,
    /// Production agent's config as first written to [`Deployment::prod_config`].
    pub prod_agent: AgentConfig,
    /// Staging agent's config as first written to [`Deployment::stage_config`].
    pub stage_agent: AgentConfig,
    /// Coordinator's config as first written to [`Deployment::coordinator_config`].
    pub coordinator: CoordinatorConfig,
    /// Production agent's config file.
    pub prod_config: PathBuf,
    /// Staging agent's config file.
    pub stage_config: PathBuf,
    /// Coordinator's config file.
    pub coordinator_config: PathBuf,
    /// Production agent's port.
    pub prod_port: u16,
    /// Staging agent's port.
    pub stage_port: u16,
    /// Coordinator's port.
    pub coordinator_port: u16,
    /// The agent binary that [`Deployment::start_agent`] runs; `None`: this workspace's
    /// `ferry-agent`. A benchmark sets it to measure another build in the same run.
    pub agent_bin: Option<PathBuf>,
    /// The test's directory, removed on drop (last).
    pub dir: TempDir,
}

fn join<T>(h: std::thread::ScopedJoinHandle<'_, T>) -> T {
    h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

impl Deployment {
    /// Starts everything with the default options ([`DEFAULT_DATA`] in production).
    pub fn start() -> Deployment {
        Self::start_with_options(DeploymentOptions::default())
    }

    /// Starts everything with `sql` as production's data; `tweak` runs after the configs
    /// are written and before the processes start.
    pub fn start_with<'a>(sql: &str, tweak: impl FnOnce(&mut Deployment) + 'a) -> Deployment {
        Self::start_with_options(DeploymentOptions {
            source_sql: sql.to_owned(),
            tweak: Some(Box::new(tweak)),
            ..DeploymentOptions::default()
        })
    }

    /// Starts everything as `opts` says.
    pub fn start_with_options(opts: DeploymentOptions<'_>) -> Deployment {
        let dir = tempfile::Builder::new()
            .prefix("ferry-test-")
            .tempdir()
            .expect("create a temporary directory");
        make_reachable(dir.path());
        let d = dir.path().to_owned();

        // The slow, independent parts at once.
        let (prod_pg, stage_pg, sshd, (fleet, identity, recipient)) = std::thread::scope(|s| {
            let prod = s.spawn(|| {
                let pg = Postgres::start_in(&d.join("pg-prod"));
                pg.psql(
                    "postgres",
                    "CREATE ROLE app_owner; CREATE ROLE app_reader; CREATE DATABASE app OWNER app_owner;",
                );
                pg.psql("app", &opts.source_sql);
                pg
            });
            let stage = s.spawn(|| Postgres::start_in(&d.join("pg-stage")));
            let sshd = s.spawn(|| {
                if opts.backup_server_netns {
                    let netns = Netns::create();
                    (Sshd::start_in_netns(&d.join("sshd"), &netns), Some(netns))
                } else {
                    (Sshd::start_in(&d.join("sshd")), None)
                }
            });
            let fleet = s.spawn(|| {
                let fleet = Fleet::new(&d);
                for n in ["coordinator", "pg-prod", "pg-stage", "operator"] {
                    fleet.issue(n);
                }
                let identity = d.join("staging.key");
                let recipient = age_keygen(&identity);
                (fleet, identity, recipient)
            });
            (join(prod), join(stage), join(sshd), join(fleet))
        });
        let (sshd, netns) = sshd;
        let prod_key = sshd.add_client_key_named("id_prod", "");
        let stage_key = sshd.add_client_key_named("id_stage", "");
        let (prod_port, stage_port, coordinator_port) = (free_port(), free_port(), free_port());
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));

        let server = |key: &Path| BackupServer {
            io_timeout_seconds: opts.io_timeout_seconds,
            ..BackupServer::of(&sshd, key)
        };
        let prod_agent = AgentConfig {
            id: "pg-prod".into(),
            role: AgentRole::Production,
            environment: "production".into(),
            listen: loopback(prod_port),
            tls: fleet.tls("pg-prod"),
            backup_server: server(&prod_key),
            encryption: Encryption::Recipients(vec![recipient.clone()]),
            source_environment: None,
            datastores: vec![Datastore::Postgres(PostgresDatastore::source(
                &prod_pg, "app",
            ))],
        };
        let stage_agent = AgentConfig {
            id: "pg-stage".into(),
            role: AgentRole::Staging,
            environment: "staging".into(),
            listen: loopback(stage_port),
            tls: fleet.tls("pg-stage"),
            backup_server: server(&stage_key),
            encryption: Encryption::Identity(identity.clone()),
            source_environment: Some("production".into()),
            datastores: vec![Datastore::Postgres(PostgresDatastore::target(
                &stage_pg, "app",
            ))],
        };
        let coordinator = CoordinatorConfig {
            listen: loopback(coordinator_port),
            store: d.join("coordinator.redb"),
            agent_timeout_seconds: opts.agent_timeout_seconds,
            tls: fleet.tls("coordinator"),
            retry: Some(opts.retry),
            agents: vec![AgentEntry::of(&prod_agent), AgentEntry::of(&stage_agent)],
            operators: vec![Operator::admin("operator")],
            schedules: opts.schedules,
        };
        let prod_config = prod_agent.write(&d.join("pg-prod.toml"));
        let stage_config = stage_agent.write(&d.join("pg-stage.toml"));
        let coordinator_config = coordinator.write(&d.join("coordinator.toml"));

        let mut dep = Deployment {
            procs: BTreeMap::new(),
            prod_pg,
            stage_pg,
            sshd,
            netns,
            fleet,
            identity,
            recipient,
            prod_key,
            stage_key,
            prod_agent,
            stage_agent,
            coordinator,
            prod_config,
            stage_config,
            coordinator_config,
            prod_port,
            stage_port,
            coordinator_port,
            agent_bin: None,
            dir,
        };
        if let Some(tweak) = opts.tweak {
            tweak(&mut dep);
        }
        if opts.start_agents {
            // Both start at once; then wait for each.
            let prod = dep.spawn_agent("agent-prod");
            let stage = dep.spawn_agent("agent-stage");
            dep.procs.insert("agent-prod", prod);
            dep.procs.insert("agent-stage", stage);
            dep.wait_ready("agent-prod");
            dep.wait_ready("agent-stage");
        }
        if opts.start_coordinator {
            dep.start_coordinator();
        }
        dep
    }

    fn port_of(&self, which: &str) -> u16 {
        match which {
            "agent-prod" => self.prod_port,
            "agent-stage" => self.stage_port,
            "coordinator" => self.coordinator_port,
            other => panic!("no process {other:?}: agent-prod, agent-stage or coordinator"),
        }
    }

    fn spawn_agent(&self, which: &str) -> Proc {
        let config = match which {
            "agent-prod" => &self.prod_config,
            "agent-stage" => &self.stage_config,
            other => panic!("no agent {other:?}: agent-prod or agent-stage"),
        };
        spawn_agent_bin(
            config,
            &self.dir.path().join(format!("{which}.log")),
            self.agent_bin.as_deref(),
        )
    }

    fn wait_ready(&mut self, which: &'static str) {
        let port = self.port_of(which);
        self.procs
            .get_mut(which)
            .expect("started")
            .wait_port(port, which);
    }

    /// Starts (or restarts) `agent-prod` or `agent-stage` and waits until it listens.
    /// A restart appends to the same log.
    pub fn start_agent(&mut self, which: &'static str) {
        if let Some(mut old) = self.procs.remove(which) {
            old.kill();
        }
        let proc = self.spawn_agent(which);
        self.procs.insert(which, proc);
        self.wait_ready(which);
    }

    /// Restarts `agent-prod` or `agent-stage` under `wrapper` (a command and its
    /// arguments, given the agent's command line after them, e.g. `["faketime", "-f",
    /// "+1d"]` for a host whose clock is a day ahead) and waits until it listens.
    pub fn start_agent_wrapped(&mut self, which: &'static str, wrapper: &[&str]) {
        if let Some(mut old) = self.procs.remove(which) {
            old.kill();
        }
        let config = match which {
            "agent-prod" => &self.prod_config,
            "agent-stage" => &self.stage_config,
            other => panic!("no agent {other:?}: agent-prod or agent-stage"),
        };
        let (program, args) = wrapper.split_first().expect("a wrapper command");
        let mut cmd = Command::new(program);
        cmd.args(args).arg(bin("ferry-agent"));
        hermetic(&mut cmd)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("FERRY_LOG", "info,ferry_agent=debug");
        let proc = Proc::spawn(cmd, &self.dir.path().join(format!("{which}.log")));
        self.procs.insert(which, proc);
        self.wait_ready(which);
    }

    /// Starts (or restarts) the coordinator and waits until it listens.
    pub fn start_coordinator(&mut self) {
        if let Some(mut old) = self.procs.remove("coordinator") {
            old.kill();
        }
        let log = self.dir.path().join("coordinator.log");
        let proc = spawn_coordinator(&self.coordinator_config, &log);
        self.procs.insert("coordinator", proc);
        self.wait_ready("coordinator");
    }

    /// A TOML table named `table` (`maintenance`, `copies.local`) for this deployment's
    /// SFTP backup server, logging in with `key`; it starts with a newline, for appending.
    pub fn sftp_table(&self, table: &str, key: &Path) -> String {
        format!(
            "\n[{table}]\nhost = \"{}\"\nport = {}\nuser = \"{}\"\nprivate_key_file = \"{}\"\n\
             host_key = \"{}\"\nroot = \"{}\"\n",
            self.sshd.host(),
            self.sshd.port(),
            crate::BACKUP_USER,
            key.display(),
            self.sshd.host_key(),
            self.sshd.root().display()
        )
    }

    /// A retention policy for production (a week) and the coordinator's `[maintenance]` key
    /// ([`Deployment::maintenance_key`]), appended to the coordinator's config before it
    /// starts.
    pub fn add_maintenance(&self) {
        let key = self.maintenance_key();
        crate::append(
            &self.coordinator_config,
            &format!(
                "\n[[retention]]\nenvironment = \"production\"\nkeep_daily = 7\n{}",
                self.sftp_table("maintenance", &key)
            ),
        );
    }

    /// The coordinator's maintenance key on the SFTP server (`id_maintenance`), restricted
    /// as the Ansible role restricts it: it may remove and read, not rename over.
    pub fn maintenance_key(&self) -> PathBuf {
        self.sshd.add_client_key_named(
            "id_maintenance",
            &format!(
                "restrict,command=\"internal-sftp -P posix-rename,setstat,fsetstat,lsetstat,\
                 symlink,hardlink,copy-data -u 0027 -d {}\"",
                self.sshd.root().display()
            ),
        )
    }

    /// Kills (SIGKILL) a process by name, as if its host died.
    pub fn kill(&mut self, which: &str) {
        self.procs
            .get_mut(which)
            .unwrap_or_else(|| panic!("no running process {which:?}"))
            .kill();
    }

    /// The `ferry` CLI's connection flags: `--coordinator URL --ca --cert --key` (operator).
    pub fn ferry_flags(&self) -> Vec<String> {
        vec![
            "--coordinator".into(),
            format!("https://127.0.0.1:{}", self.coordinator_port),
            "--ca".into(),
            self.fleet.ca().display().to_string(),
            "--cert".into(),
            self.fleet.cert("operator").display().to_string(),
            "--key".into(),
            self.fleet.key("operator").display().to_string(),
        ]
    }

    /// Runs `ferry --coordinator ... --ca ... --cert operator.pem --key operator.key ARGS`
    /// and returns its output (panics if it runs longer than [`CLI_TIMEOUT`]).
    pub fn ferry(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("ferry"));
        hermetic(&mut cmd).args(self.ferry_flags()).args(args);
        output_within(&mut cmd, b"", CLI_TIMEOUT)
    }

    /// `ferry restore pg-stage --datastore DATASTORE --to-time T --wait`: whether it
    /// succeeded, and what it printed (stdout, then stderr).
    pub fn restore_to_time(&self, datastore: &str, t: &str) -> (bool, String) {
        let out = self.ferry(&[
            "restore",
            "pg-stage",
            "--datastore",
            datastore,
            "--to-time",
            t,
            "--wait",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// Runs `ferry ARGS` and returns its stdout; panics with stdout, stderr and the tails
    /// of every log if it exits non-zero.
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

    /// Runs `ferry ARGS`, which must fail; returns what it printed (stdout, then stderr).
    pub fn ferry_failing(&self, args: &[&str]) -> String {
        let out = self.ferry(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "ferry {args:?} succeeded: {text}");
        text
    }

    /// `ferry --output json ARGS`, parsed (whatever its exit code).
    pub fn ferry_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let out = self.ferry(&all);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "ferry {args:?} printed no JSON ({e}):\nstdout: {}\nstderr: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            )
        })
    }

    /// Today's backup of `datastore` in production, `<datastore>_backup_<today>.<suffix>`
    /// (e.g. suffix `db.zst.age`): asserts the file is on the backup server under its
    /// final name, and returns its path relative to the root and its manifest.
    pub fn todays_backup(&self, datastore: &str, suffix: &str) -> (String, serde_json::Value) {
        let day = crate::today_utc();
        let name = format!("production/{day}/{datastore}_backup_{day}.{suffix}");
        let files = self.sshd.final_files();
        assert!(files.contains(&name), "{name} is not among {files:?}");
        let manifest = self.sshd.root().join(format!("{name}.json"));
        let manifest = serde_json::from_slice(
            &fs::read(&manifest).unwrap_or_else(|e| panic!("{}: {e}", manifest.display())),
        )
        .unwrap_or_else(|e| panic!("{name}.json: {e}"));
        (name, manifest)
    }

    /// Rewrites the manifest of today's backup of `datastore` (`suffix` as for
    /// [`Deployment::todays_backup`]) with `edit`, as someone with write access to the
    /// backup server could: the restore or verify that follows must catch it.
    pub fn edit_todays_manifest(
        &self,
        datastore: &str,
        suffix: &str,
        edit: impl FnOnce(&mut serde_json::Value),
    ) {
        let (name, mut manifest) = self.todays_backup(datastore, suffix);
        edit(&mut manifest);
        let path = self.sshd.root().join(format!("{name}.json"));
        crate::chmod(&path, 0o640);
        fs::write(&path, serde_json::to_vec(&manifest).expect("JSON"))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    /// The last 40 lines of a log: `agent-prod`, `agent-stage`, `coordinator`, `sshd`,
    /// `pg-prod` or `pg-stage`.
    pub fn log_tail(&self, which: &str) -> String {
        match which {
            "sshd" => self.sshd.log_tail(40),
            "pg-prod" => self.prod_pg.log_tail(40),
            "pg-stage" => self.stage_pg.log_tail(40),
            "agent-prod" | "agent-stage" | "coordinator" => {
                tail(&self.dir.path().join(format!("{which}.log")), 40)
            }
            other => panic!(
                "no log {other:?}: agent-prod, agent-stage, coordinator, sshd, pg-prod or pg-stage"
            ),
        }
    }

    /// The tails of the agents', the coordinator's and the sshd's logs.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for which in ["coordinator", "agent-prod", "agent-stage"] {
            let log = self.dir.path().join(format!("{which}.log"));
            if log.exists() {
                s.push_str(&format!(
                    "--- {which} ({})\n{}\n",
                    log.display(),
                    tail(&log, 25)
                ));
            }
        }
        s.push_str(&format!("--- sshd\n{}\n", self.sshd.log_tail(15)));
        s
    }

    /// The stored main archive of the newest production PostgreSQL backup (absolute path).
    pub fn stored_archive(&self) -> PathBuf {
        let f = self
            .sshd
            .final_files()
            .into_iter()
            .rfind(|f| f.contains("/postgres_backup_") && f.ends_with(".age"))
            .unwrap_or_else(|| panic!("no stored archive; files: {:?}", self.sshd.files()));
        self.sshd.root().join(f)
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        // The coordinator first, so that it records nothing about agents being killed.
        if let Some(mut c) = self.procs.remove("coordinator") {
            c.kill();
        }
        for p in self.procs.values_mut() {
            p.kill();
        }
        let keep = std::env::var("FERRY_KEEP_TEST_DIRS").is_ok_and(|v| v == "1");
        if std::thread::panicking() {
            eprintln!(
                "ferry test directory: {}{}\n{}",
                self.dir.path().display(),
                if keep {
                    " (kept)"
                } else {
                    " (set FERRY_KEEP_TEST_DIRS=1 to keep it)"
                },
                self.logs()
            );
        }
        if keep {
            self.dir.disable_cleanup(true);
        }
    }
}

/// Spawns `ferry-agent run --config CONFIG` with its output to `log` (not waiting; see
/// [`Proc::wait_port`]). `FERRY_LOG=info,ferry_agent=debug`.
///
/// `FERRY_AGENT_WRAPPER`, when set, is a command (split at spaces) run with the agent's
/// command line as its arguments, e.g. `heaptrack` or `valgrind --tool=massif` to profile
/// the agent in a test or benchmark.
pub fn spawn_agent(config: &Path, log: &Path) -> Proc {
    spawn_agent_bin(config, log, None)
}

/// [`spawn_agent`] with `agent` instead of this workspace's `ferry-agent` if given (a
/// benchmark's other build).
pub fn spawn_agent_bin(config: &Path, log: &Path, agent: Option<&Path>) -> Proc {
    let wrapper = std::env::var("FERRY_AGENT_WRAPPER").unwrap_or_default();
    let agent = agent.map_or_else(|| bin("ferry-agent"), Path::to_owned);
    let mut words = wrapper.split_whitespace();
    let mut cmd = match words.next() {
        Some(program) => {
            let mut cmd = Command::new(program);
            cmd.args(words).arg(agent);
            cmd
        }
        None => Command::new(agent),
    };
    hermetic(&mut cmd)
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("FERRY_LOG", "info,ferry_agent=debug");
    Proc::spawn(cmd, log)
}

/// Spawns `ferry-coordinator serve --config CONFIG` with its output to `log` (not waiting;
/// see [`Proc::wait_port`]). `FERRY_LOG=info,ferry_coordinator=debug`.
pub fn spawn_coordinator(config: &Path, log: &Path) -> Proc {
    let mut cmd = Command::new(bin("ferry-coordinator"));
    hermetic(&mut cmd)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env("FERRY_LOG", "info,ferry_coordinator=debug");
    Proc::spawn(cmd, log)
}

/// Runs `ferry-agent run --config CONFIG`, expecting it to exit (a broken config) within
/// 30 s; its output. Panics (after killing it) if it is still running.
pub fn run_agent_expecting_exit(config: &Path) -> Output {
    let mut cmd = Command::new(bin("ferry-agent"));
    hermetic(&mut cmd).arg("run").arg("--config").arg(config);
    output_within(&mut cmd, b"", Duration::from_secs(30))
}

/// Runs `ferry-coordinator serve --config CONFIG`, expecting it to exit (a broken config)
/// within 30 s; its output. Panics (after killing it) if it is still running.
pub fn run_coordinator_expecting_exit(config: &Path) -> Output {
    let mut cmd = Command::new(bin("ferry-coordinator"));
    hermetic(&mut cmd).arg("serve").arg("--config").arg(config);
    output_within(&mut cmd, b"", Duration::from_secs(30))
}
