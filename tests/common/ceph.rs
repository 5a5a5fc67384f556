//! S3 for the tests: a one-host Ceph cluster from Debian's packages (`ceph-mon`, `ceph-osd`,
//! `radosgw`, `ceph-common`), with one monitor, three RAM-backed OSDs (memstore) and an RGW
//! serving S3 on a free loopback port, in a temporary directory; and the stock S3 client,
//! boto3 (Debian's `python3-boto3`), through `tests/tools/s3.py`, to read and write it as a
//! user would.
//!
//! Starting the cluster takes about 25 s, so the tests of one test binary share one:
//! [`CephCluster::shared`], with a bucket per test. [`CephCluster::start`] gives a cluster of
//! one's own, stopped on drop.
//!
//! The cluster: cephx everywhere, every key made with `ceph-authtool` and given to the
//! monitor at `--mkfs` (no `ceph auth` round trips); pools of size 3 and min_size 2 with
//! `osd crush chooseleaf type = 0`, so the three replicas land on three OSDs of one host;
//! no ceph-mgr (the RGW does not need one). Every daemon listens on 127.0.0.1 only (the
//! OSDs on ports of Ceph's 6800-7300 range). The daemons run in the foreground as children
//! of the test process, logging to `log/` in the cluster's directory.
//! [`CephCluster::start_with`] takes other OSD sizes and replicas ([`CephOptions`]), for
//! the benchmarks.
//!
//! Stopping: RGW, then the OSDs, then the monitor (OSDs linger on SIGTERM once the monitor
//! is gone), each given SIGTERM and [`STOP_GRACE`], then SIGKILL. Drop does it. For the
//! shared cluster, which lives in a `static` and is never dropped, a watchdog (`sh`, reading
//! a pipe from the test process) does the same when the test process ends, however it ends,
//! then removes the directory. `FERRY_KEEP_TEST_DIRS=1` keeps the directory.

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::process::{
    Proc, chmod, free_port, port_open, require, require_root, tail, workspace_root,
};

/// How long each daemon may take to exit after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// How long the RGW may take to serve S3 after the cluster is created (it creates its
/// pools first, which waits for the OSDs).
pub const RGW_START_TIMEOUT: Duration = Duration::from_secs(120);

/// The number of OSDs.
pub const OSDS: usize = 3;

/// How [`CephCluster::start_with`] sizes a cluster. The default is what the tests use:
/// OSDs of 1 GiB and pools of three replicas (min_size 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CephOptions {
    /// Each OSD's memstore capacity, bytes (`memstore device bytes`). Memstore takes RAM
    /// as objects are written, not up front; an OSD refuses writes past 95 % of this.
    pub memstore_bytes: u64,
    /// Replicas of every pool (`osd pool default size`), 1 to [`OSDS`]; min_size is 2 for
    /// 3 replicas, else 1.
    pub pool_size: usize,
}

impl Default for CephOptions {
    fn default() -> Self {
        CephOptions {
            memstore_bytes: 1 << 30,
            pool_size: OSDS,
        }
    }
}

/// An S3 user of the RGW (made with `radosgw-admin user create`).
#[derive(Clone, Debug)]
pub struct S3User {
    /// Its user id (`uid`), also the name in a bucket policy's principal
    /// (`arn:aws:iam:::user/<uid>`).
    pub uid: String,
    /// Its S3 access key.
    pub access_key: String,
    /// Its S3 secret key.
    pub secret_key: String,
}

/// An S3 call the server refused, as boto3 reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Error {
    /// The S3 error code, e.g. `AccessDenied`, `NoSuchKey`.
    pub code: String,
    /// The error message, if the server sent one (Ceph 16 often sends none).
    pub message: Option<String>,
    /// The HTTP status, e.g. 403.
    pub status: u16,
}

impl fmt::Display for S3Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (HTTP {})", self.code, self.status)?;
        if let Some(m) = &self.message {
            write!(f, ": {m}")?;
        }
        Ok(())
    }
}

/// The four users the S3 tests work with, as issue 17 sets them: the bucket owner, who
/// creates buckets and puts their policy (an operator's account, not on any host of the
/// fleet), and the three credential sets the bucket policy restricts.
#[derive(Clone, Debug)]
pub struct S3Roles {
    /// Owns the buckets and sets their policy.
    pub owner: S3User,
    /// Production agents: may only put.
    pub production: S3User,
    /// Staging agents: may only list and get.
    pub staging: S3User,
    /// The coordinator's maintenance credentials: may delete and extend retention.
    pub maintenance: S3User,
}

/// What [`CephCluster::stop`] did to one daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stopped {
    /// `rgw`, `osd` or `mon`.
    pub role: &'static str,
    /// Its process id.
    pub pid: u32,
    /// How it ended.
    pub outcome: StopOutcome,
}

/// How a daemon ended when the cluster was stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// It exited on SIGTERM within [`STOP_GRACE`].
    Exited,
    /// It was still running after [`STOP_GRACE`] and was killed (SIGKILL).
    Killed,
    /// It had exited (or been killed) before the stop.
    AlreadyGone,
}

/// A running cluster (see the module docs).
pub struct CephCluster {
    dir: PathBuf,
    conf: PathBuf,
    mon_port: u16,
    rgw_port: u16,
    /// The RGW's HTTPS port, with a certificate for `127.0.0.1` issued by a CA of the
    /// cluster's own ([`CephCluster::tls_ca`]).
    tls_port: u16,
    /// Daemons in stop order: the RGW, the OSDs, the monitor. Each with its role (`rgw`,
    /// `osd`, `mon`) as the watchdog's pid file names it.
    daemons: Mutex<Vec<(&'static str, Proc)>>,
    watchdog: Mutex<Option<(Child, ChildStdin)>>,
    roles: OnceLock<S3Roles>,
    buckets: AtomicUsize,
    /// How long [`CephCluster::start`] took, from nothing to an RGW serving S3.
    pub startup: Duration,
}

impl CephCluster {
    /// The cluster shared by every test of this test binary, started by the first call.
    /// Panics (in every test that calls it) if it could not start, with the reason.
    pub fn shared() -> &'static CephCluster {
        static SHARED: OnceLock<Result<CephCluster, String>> = OnceLock::new();
        let started = SHARED.get_or_init(|| {
            let started = std::panic::catch_unwind(CephCluster::start);
            if let Ok(c) = &started {
                eprintln!(
                    "shared Ceph cluster in {} started in {:.1} s",
                    c.dir.display(),
                    c.startup.as_secs_f64()
                );
            }
            started.map_err(|e| {
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "(no message)".into())
            })
        });
        match started {
            Ok(c) => c,
            Err(e) => panic!("the shared Ceph cluster did not start: {e}"),
        }
    }

    /// Starts a new cluster in a new directory under the system's temporary directory.
    /// Panics, naming the step and showing the daemon's log, if any step fails; a missing
    /// binary names the Debian package to install.
    pub fn start() -> CephCluster {
        Self::start_with(CephOptions::default())
    }

    /// [`CephCluster::start`] with other OSD sizes or replicas (for the benchmarks, which
    /// store more than the tests). Panics as `start` does, and if `opts.pool_size` is not
    /// 1 to [`OSDS`].
    pub fn start_with(opts: CephOptions) -> CephCluster {
        assert!(
            (1..=OSDS).contains(&opts.pool_size),
            "a pool of {} replicas on {OSDS} OSDs",
            opts.pool_size
        );
        require_root("run Ceph's daemons, whose admin sockets and keyrings are root's");
        let t0 = Instant::now();
        let tools = Tools::find();
        let dir = tempfile::Builder::new()
            .prefix("ferry-ceph-")
            .tempdir()
            .expect("create a temporary directory for Ceph")
            .keep();
        for sub in ["mon", "run", "log", "rgw"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let conf = dir.join("ceph.conf");
        let mon_port = free_port();
        let rgw_port = free_port();
        let tls_port = free_port();
        write_rgw_tls(&dir);
        let fsid = fs::read_to_string("/proc/sys/kernel/random/uuid")
            .expect("read a random uuid")
            .trim()
            .to_owned();
        let mut text = ceph_conf(&dir, &fsid, mon_port, (rgw_port, tls_port), opts);
        for id in 0..OSDS {
            text.push_str(&format!(
                "[osd.{id}]\nosd data = {}\n",
                dir.join(format!("osd{id}")).display()
            ));
        }
        fs::write(&conf, text).unwrap();

        // The watchdog first, so that whatever is started below is stopped however the
        // test process ends.
        let keep = std::env::var("FERRY_KEEP_TEST_DIRS").is_ok_and(|v| v == "1");
        let mut guard = Command::new("/bin/sh");
        guard
            .arg("-c")
            .arg(WATCHDOG)
            .arg("ferry-ceph-watchdog")
            .arg(dir.join("pids"))
            .arg(&dir)
            .arg(if keep { "1" } else { "0" })
            .arg(STOP_GRACE.as_secs().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut guard = guard.spawn().expect("start the Ceph watchdog (/bin/sh)");
        let guard_in = guard.stdin.take().expect("watchdog stdin");

        let mut cluster = CephCluster {
            dir: dir.clone(),
            conf: conf.clone(),
            mon_port,
            rgw_port,
            tls_port,
            daemons: Mutex::new(Vec::new()),
            watchdog: Mutex::new(Some((guard, guard_in))),
            roles: OnceLock::new(),
            buckets: AtomicUsize::new(0),
            startup: Duration::ZERO,
        };

        // Keys: the monitor's, the admin's, each OSD's and the RGW's, all in the monitor's
        // keyring at mkfs, so the monitor knows them from the start.
        let mon_keyring = dir.join("mon.a.keyring");
        tools.authtool(&[
            "--create-keyring".as_ref(),
            mon_keyring.as_os_str(),
            "--gen-key".as_ref(),
            "-n".as_ref(),
            "mon.".as_ref(),
            "--cap".as_ref(),
            "mon".as_ref(),
            "allow *".as_ref(),
        ]);
        let mut entities: Vec<(String, Vec<(&str, &str)>)> = vec![(
            "client.admin".into(),
            vec![("mon", "allow *"), ("osd", "allow *"), ("mgr", "allow *")],
        )];
        for id in 0..OSDS {
            entities.push((
                format!("osd.{id}"),
                vec![
                    ("mon", "allow profile osd"),
                    ("osd", "allow *"),
                    ("mgr", "allow profile osd"),
                ],
            ));
        }
        entities.push((
            "client.rgw.a".into(),
            vec![("mon", "allow rw"), ("osd", "allow rwx")],
        ));
        for (name, caps) in &entities {
            let keyring = dir.join(format!("{name}.keyring"));
            let mut args: Vec<std::ffi::OsString> = vec![
                "--create-keyring".into(),
                keyring.clone().into(),
                "--gen-key".into(),
                "-n".into(),
                name.into(),
            ];
            for (service, cap) in caps {
                args.extend(["--cap".into(), (*service).into(), (*cap).into()]);
            }
            tools.authtool(&args);
            tools.authtool(&[
                mon_keyring.as_os_str(),
                "--import-keyring".as_ref(),
                keyring.as_os_str(),
            ]);
        }

        // The monitor.
        let monmap = dir.join("monmap");
        tools.run(
            &tools.monmaptool,
            &[
                "--create".as_ref(),
                "--addv".as_ref(),
                "a".as_ref(),
                format!("[v2:127.0.0.1:{mon_port}]").as_ref(),
                "--fsid".as_ref(),
                fsid.as_ref(),
                monmap.as_os_str(),
            ],
            &dir,
        );
        tools.run(
            &tools.mon,
            &[
                "-c".as_ref(),
                conf.as_os_str(),
                "--mkfs".as_ref(),
                "-i".as_ref(),
                "a".as_ref(),
                "--monmap".as_ref(),
                monmap.as_os_str(),
                "--keyring".as_ref(),
                mon_keyring.as_os_str(),
            ],
            &dir,
        );
        let mut mon = Command::new(&tools.mon);
        mon.args(["-f", "-i", "a", "-c"]).arg(&conf);
        cluster.spawn("mon", mon, "mon.a.out");
        cluster.wait_listening("mon", mon_port, Duration::from_secs(30));

        // The OSDs: each made known to the monitor, its store made, then all started at
        // once; each puts itself in the CRUSH map on start (`osd crush update on start`).
        for id in 0..OSDS {
            let got = cluster.ceph(&["osd", "create"]);
            assert_eq!(
                got.trim(),
                id.to_string(),
                "`ceph osd create` gave another id than expected"
            );
        }
        let mkfs: Vec<(usize, Child)> = (0..OSDS)
            .map(|id| {
                fs::create_dir_all(dir.join(format!("osd{id}"))).unwrap();
                let child = Command::new(&tools.osd)
                    .arg("-c")
                    .arg(&conf)
                    .args(["-i", &id.to_string(), "--mkfs"])
                    .env_remove("CEPH_ARGS")
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot run ceph-osd --mkfs: {e}"));
                (id, child)
            })
            .collect();
        for (id, child) in mkfs {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "ceph-osd -i {id} --mkfs failed ({}) in {}:\n{}{}",
                out.status,
                dir.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for id in 0..OSDS {
            let mut osd = Command::new(&tools.osd);
            osd.args(["-f", "-i", &id.to_string(), "-c"]).arg(&conf);
            cluster.spawn("osd", osd, &format!("osd.{id}.out"));
        }

        // The RGW; it creates its pools, which needs min_size OSDs up.
        let mut rgw = Command::new(&tools.rgw);
        rgw.args(["-f", "-n", "client.rgw.a", "-c"]).arg(&conf);
        cluster.spawn("rgw", rgw, "rgw.out");
        cluster.wait_listening("rgw", rgw_port, RGW_START_TIMEOUT);
        cluster.wait_s3();
        cluster.startup = t0.elapsed();
        cluster
    }

    /// The cluster's directory (config, keyrings, `log/`, the monitor's store).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its `ceph.conf`.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The S3 endpoint, `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.rgw_port)
    }

    /// The RGW's HTTPS endpoint, `https://127.0.0.1:PORT`: its certificate (for
    /// `127.0.0.1` and `localhost`) is issued by [`CephCluster::tls_ca`], which no system
    /// store trusts.
    pub fn tls_endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.tls_port)
    }

    /// The PEM file of the CA that issued the RGW's HTTPS certificate.
    pub fn tls_ca(&self) -> PathBuf {
        self.dir.join("rgw-ca.pem")
    }

    /// The RGW's port.
    pub fn rgw_port(&self) -> u16 {
        self.rgw_port
    }

    /// The monitor's port (messenger v2).
    pub fn mon_port(&self) -> u16 {
        self.mon_port
    }

    /// The process ids of the running daemons, as `(role, pid)`, in stop order.
    pub fn daemon_pids(&self) -> Vec<(&'static str, u32)> {
        self.daemons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(role, p)| (*role, p.pid()))
            .collect()
    }

    /// Kills one daemon with SIGKILL (a crash), e.g. `("osd", 1)` for the second OSD.
    /// Panics if there is no such daemon.
    pub fn kill_daemon(&self, role: &str, index: usize) {
        let mut daemons = self.daemons.lock().unwrap_or_else(|e| e.into_inner());
        let (_, proc) = daemons
            .iter_mut()
            .filter(|(r, _)| *r == role)
            .nth(index)
            .unwrap_or_else(|| panic!("no {role} number {index} in this cluster"));
        proc.kill();
    }

    /// Runs `ceph -c <conf> ARGS` as client.admin; its stdout, or a panic with its stderr
    /// and the monitor's log.
    pub fn ceph(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(require("ceph", "ceph-common"));
        cmd.arg("-c")
            .arg(&self.conf)
            .args(["--connect-timeout", "30"])
            .args(args);
        self.admin_command(cmd, &format!("ceph {}", args.join(" ")))
    }

    /// Runs `radosgw-admin -c <conf> ARGS`; its stdout, or a panic with its stderr.
    pub fn radosgw_admin(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(require("radosgw-admin", "radosgw"));
        cmd.arg("-c").arg(&self.conf).args(args);
        self.admin_command(cmd, &format!("radosgw-admin {}", args.join(" ")))
    }

    fn admin_command(&self, mut cmd: Command, what: &str) -> String {
        cmd.env_remove("CEPH_ARGS")
            .env_remove("CEPH_CONF")
            .current_dir(&self.dir);
        let out = crate::process::output_within(&mut cmd, b"", Duration::from_secs(120));
        assert!(
            out.status.success(),
            "`{what}` failed ({}):\n{}\nmonitor log ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.dir.join("log/mon.a.log").display(),
            tail(&self.dir.join("log/mon.a.log"), 20)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Creates an S3 user `uid` with `radosgw-admin user create` and returns its keys (made
    /// by the RGW). Panics if it exists or the RGW refuses.
    pub fn create_user(&self, uid: &str) -> S3User {
        let out = self.radosgw_admin(&["user", "create", "--uid", uid, "--display-name", uid]);
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("radosgw-admin user create: not JSON ({e}): {out}"));
        let key = &v["keys"][0];
        S3User {
            uid: uid.to_owned(),
            access_key: key["access_key"].as_str().expect("access_key").to_owned(),
            secret_key: key["secret_key"].as_str().expect("secret_key").to_owned(),
        }
    }

    /// The four users of issue 17 (`ferry-owner`, `ferry-production`, `ferry-staging`,
    /// `ferry-maintenance`), made by the first call.
    pub fn roles(&self) -> &S3Roles {
        self.roles.get_or_init(|| S3Roles {
            owner: self.create_user("ferry-owner"),
            production: self.create_user("ferry-production"),
            staging: self.create_user("ferry-staging"),
            maintenance: self.create_user("ferry-maintenance"),
        })
    }

    /// A bucket name not used before in this cluster: `<prefix>-<n>` (S3 names: 3 to 63
    /// lower-case letters, digits and hyphens).
    pub fn bucket_name(&self, prefix: &str) -> String {
        let n = self.buckets.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{n}")
    }

    /// One S3 call with the stock client (boto3, `tests/tools/s3.py`) as `user`:
    /// `operation` is a boto3 client method (`put_object`, ...) and `params` its keyword
    /// arguments as JSON (timestamps as RFC 3339 strings; `"BodyFile": path` for a body
    /// from a file). `Ok` is the response (timestamps as RFC 3339; a streamed `Body` as
    /// `Body`, `BodyLength` and `BodySha256`); `Err` the error the server answered.
    /// Panics if the client cannot run or reach the server.
    pub fn s3(&self, user: &S3User, operation: &str, params: Value) -> Result<Value, S3Error> {
        let mut cmd = Command::new(python3());
        cmd.arg(workspace_root().join("tests/tools/s3.py"))
            .arg(self.endpoint())
            .arg(operation)
            .arg(params.to_string());
        // Only these credentials: nothing from the developer's AWS setup.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("AWS_") {
                cmd.env_remove(&k);
            }
        }
        let none = self.dir.join("no-aws-config");
        cmd.env("AWS_ACCESS_KEY_ID", &user.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &user.secret_key)
            .env("AWS_CONFIG_FILE", &none)
            .env("AWS_SHARED_CREDENTIALS_FILE", &none)
            .env("NO_PROXY", "127.0.0.1")
            .env("no_proxy", "127.0.0.1");
        let out = crate::process::output_within(&mut cmd, b"", Duration::from_secs(120));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "s3.py {operation} as {} failed ({}):\n{}{}\nRGW log:\n{}",
            user.uid,
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr),
            self.log_tail("client.rgw.a", 20)
        );
        let v: Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("s3.py {operation}: not one JSON object ({e}): {stdout}"));
        if let Some(ok) = v.get("ok") {
            return Ok(ok.clone());
        }
        let e = &v["error"];
        Err(S3Error {
            code: e["Code"].as_str().unwrap_or_default().to_owned(),
            message: e["Message"].as_str().map(str::to_owned),
            status: e["HTTPStatusCode"]
                .as_u64()
                .and_then(|s| u16::try_from(s).ok())
                .unwrap_or(0),
        })
    }

    /// [`CephCluster::s3`] that must succeed: the response, or a panic naming the call,
    /// the user and the error.
    pub fn s3_ok(&self, user: &S3User, operation: &str, params: Value) -> Value {
        self.s3(user, operation, params.clone())
            .unwrap_or_else(|e| panic!("{operation} {params} as {} was refused: {e}", user.uid))
    }

    /// Creates `bucket`, owned by `owner`, with Object Lock enabled (which makes it
    /// versioned), with the stock client; panics unless the bucket then reports
    /// versioning `Enabled` and Object Lock `Enabled`.
    pub fn create_locked_bucket(&self, owner: &S3User, bucket: &str) {
        self.s3_ok(
            owner,
            "create_bucket",
            json!({"Bucket": bucket, "ObjectLockEnabledForBucket": true}),
        );
        let versioning = self.s3_ok(owner, "get_bucket_versioning", json!({"Bucket": bucket}));
        assert_eq!(
            versioning["Status"], "Enabled",
            "bucket {bucket} made with Object Lock is not versioned: {versioning}"
        );
        let lock = self.s3_ok(
            owner,
            "get_object_lock_configuration",
            json!({"Bucket": bucket}),
        );
        assert_eq!(
            lock["ObjectLockConfiguration"]["ObjectLockEnabled"], "Enabled",
            "bucket {bucket}: Object Lock is not enabled: {lock}"
        );
    }

    /// Puts `policy` (a JSON document) as `bucket`'s policy, as `owner`, with the stock
    /// client, and checks that the bucket then returns it.
    pub fn put_bucket_policy(&self, owner: &S3User, bucket: &str, policy: &str) {
        self.s3_ok(
            owner,
            "put_bucket_policy",
            json!({"Bucket": bucket, "Policy": policy}),
        );
        let got = self.s3_ok(owner, "get_bucket_policy", json!({"Bucket": bucket}));
        let got: Value = serde_json::from_str(got["Policy"].as_str().unwrap_or_default())
            .expect("the bucket's policy is JSON");
        let want: Value = serde_json::from_str(policy).expect("the policy put is JSON");
        assert_eq!(
            got, want,
            "bucket {bucket} returns another policy than was put"
        );
    }

    /// Sets `bucket`'s default retention, as `owner`: every new object version is locked in
    /// `mode` (`COMPLIANCE` or `GOVERNANCE`) for `days` days from its creation.
    pub fn put_default_retention(&self, owner: &S3User, bucket: &str, mode: &str, days: u32) {
        self.s3_ok(
            owner,
            "put_object_lock_configuration",
            json!({
                "Bucket": bucket,
                "ObjectLockConfiguration": {
                    "ObjectLockEnabled": "Enabled",
                    "Rule": {"DefaultRetention": {"Mode": mode, "Days": days}},
                },
            }),
        );
    }

    /// A new bucket with Object Lock, owned by [`S3Roles::owner`], with the policy of
    /// `docs/s3-bucket-policy.json` for the three other roles ([`ferry_bucket_policy`]).
    /// Returns its name (`<prefix>-<n>`).
    pub fn ferry_bucket(&self, prefix: &str) -> String {
        let roles = self.roles();
        let bucket = self.bucket_name(prefix);
        self.create_locked_bucket(&roles.owner, &bucket);
        let policy = ferry_bucket_policy(
            &bucket,
            &roles.production.uid,
            &roles.staging.uid,
            &roles.maintenance.uid,
        );
        self.put_bucket_policy(&roles.owner, &bucket, &policy);
        bucket
    }

    /// A new bucket with Object Lock for a copy target (issue 17's copies), owned by
    /// [`S3Roles::owner`], with the policy of `docs/s3-copy-bucket-policy.json`: the
    /// coordinator's maintenance user writes copies and maintains them, staging lists and
    /// gets, production may do nothing.
    pub fn ferry_copy_bucket(&self, prefix: &str) -> String {
        let roles = self.roles();
        let bucket = self.bucket_name(prefix);
        self.create_locked_bucket(&roles.owner, &bucket);
        let policy = bucket_policy_from(
            "docs/s3-copy-bucket-policy.json",
            &bucket,
            &roles.production.uid,
            &roles.staging.uid,
            &roles.maintenance.uid,
        );
        self.put_bucket_policy(&roles.owner, &bucket, &policy);
        bucket
    }

    /// The last `lines` lines of a daemon's log: `mon.a`, `osd.0`, `client.rgw.a`.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        tail(&self.dir.join(format!("log/{name}.log")), lines)
    }

    /// Stops the daemons in order (RGW, OSDs, monitor; SIGTERM, then SIGKILL after
    /// [`STOP_GRACE`]), reaps them, and lets the watchdog end (it then removes the
    /// directory unless `FERRY_KEEP_TEST_DIRS=1`). Returns what happened to each daemon, in
    /// the order they were stopped. Drop calls it; a second call stops nothing.
    pub fn stop(&self) -> Vec<Stopped> {
        let mut stopped = Vec::new();
        let mut daemons = self.daemons.lock().unwrap_or_else(|e| e.into_inner());
        for role in ["rgw", "osd", "mon"] {
            // SIGTERM to every daemon of the role at once, then wait for each.
            let mut these: Vec<(bool, &mut Proc)> = daemons
                .iter_mut()
                .filter(|(r, _)| *r == role)
                .map(|(_, p)| (p.try_exit().is_none(), p))
                .collect();
            for (running, p) in &mut these {
                if *running {
                    let _ = Command::new("kill")
                        .args(["-s", "TERM", &p.pid().to_string()])
                        .stderr(Stdio::null())
                        .status();
                }
            }
            let deadline = Instant::now() + STOP_GRACE;
            for (running, p) in &mut these {
                let outcome = if !*running {
                    StopOutcome::AlreadyGone
                } else if p
                    .wait_exit(deadline.saturating_duration_since(Instant::now()))
                    .is_some()
                {
                    StopOutcome::Exited
                } else {
                    StopOutcome::Killed
                };
                p.kill();
                stopped.push(Stopped {
                    role,
                    pid: p.pid(),
                    outcome,
                });
            }
        }
        daemons.clear();
        // Nothing left for the watchdog to signal (the pids may be reused from now on).
        let _ = fs::write(self.dir.join("pids"), "");
        self.end_watchdog();
        stopped
    }

    /// Closes the watchdog's pipe, as the end of the test process does, and waits up to
    /// 30 s for the watchdog to stop the daemons and remove the directory; whether it
    /// ended in time. For the test of what happens to [`CephCluster::shared`] when the test
    /// process ends; the cluster is unusable afterwards.
    pub fn end_watchdog(&self) -> bool {
        let Some((mut child, stdin)) = self
            .watchdog
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return true;
        };
        drop(stdin);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    fn spawn(&self, role: &'static str, mut cmd: Command, out: &str) {
        cmd.env_remove("CEPH_ARGS").env_remove("CEPH_CONF");
        let proc = Proc::spawn(cmd, &self.dir.join("log").join(out));
        let pid = proc.pid();
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("pids"))
            .expect("open the watchdog's pid file");
        writeln!(f, "{role} {pid}").expect("write the watchdog's pid file");
        self.daemons
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((role, proc));
    }

    /// Waits until `port` accepts connections, or panics if the daemon `role` exited or
    /// `timeout` passed, with its logs.
    fn wait_listening(&self, role: &str, port: u16, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if port_open(port) {
                return;
            }
            let exited: Vec<String> = self
                .daemons
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter_mut()
                .filter_map(|(r, p)| p.try_exit().map(|s| format!("{r} (pid {}) {s}", p.pid())))
                .collect();
            assert!(
                exited.is_empty() && Instant::now() < deadline,
                "Ceph's {role} did not listen on 127.0.0.1:{port} within {} s{}; logs in {}:\n{}",
                timeout.as_secs(),
                if exited.is_empty() {
                    String::new()
                } else {
                    format!("; exited: {}", exited.join(", "))
                },
                self.dir.join("log").display(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the RGW answers an anonymous `GET /` with HTTP 200.
    fn wait_s3(&self) {
        let deadline = Instant::now() + RGW_START_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            match http_status(self.rgw_port) {
                Ok(200) => return,
                Ok(s) => last = format!("HTTP {s}"),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "the RGW on {} did not answer GET / with 200 within {} s (last: {last}):\n{}",
            self.endpoint(),
            RGW_START_TIMEOUT.as_secs(),
            self.logs()
        );
    }

    /// The tails of every daemon's log.
    fn logs(&self) -> String {
        let mut s = String::new();
        for name in ["mon.a", "osd.0", "osd.1", "osd.2", "client.rgw.a"] {
            s.push_str(&format!("--- {name}.log:\n{}\n", self.log_tail(name, 15)));
        }
        s
    }
}

impl Drop for CephCluster {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The processes still running (not zombies) whose command line names `dir`, e.g. a
/// cluster's directory after it was stopped: `(pid, command line)`.
pub fn processes_naming(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !cmdline.contains(&needle) {
            continue;
        }
        let zombie = fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|s| Some(s[s.rfind(')')? + 1..].split_whitespace().next()? == "Z"))
            .unwrap_or(false);
        if !zombie {
            found.push((pid, cmdline.trim().to_owned()));
        }
    }
    found
}

/// The bucket policy of `docs/s3-bucket-policy.json` for `bucket` and the three RGW
/// users (uids) of issue 17; panics if the template does not give JSON.
pub fn ferry_bucket_policy(
    bucket: &str,
    production: &str,
    staging: &str,
    maintenance: &str,
) -> String {
    bucket_policy_from(
        "docs/s3-bucket-policy.json",
        bucket,
        production,
        staging,
        maintenance,
    )
}

/// The bucket policy template at `file` (relative to the workspace) for `bucket` and the
/// three RGW users (uids); panics if it does not give JSON.
pub fn bucket_policy_from(
    file: &str,
    bucket: &str,
    production: &str,
    staging: &str,
    maintenance: &str,
) -> String {
    let path = workspace_root().join(file);
    let template =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let policy = template
        .replace("{{ bucket }}", bucket)
        .replace("{{ production_user }}", production)
        .replace("{{ staging_user }}", staging)
        .replace("{{ maintenance_user }}", maintenance);
    assert!(
        !policy.contains("{{"),
        "{} has a placeholder the tests do not fill",
        path.display()
    );
    serde_json::from_str::<Value>(&policy)
        .unwrap_or_else(|e| panic!("{} does not give JSON: {e}", path.display()));
    policy
}

/// The Python with boto3: Debian's (`/usr/bin/python3` with `python3-boto3`), checked once.
fn python3() -> PathBuf {
    static CHECKED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let checked = CHECKED.get_or_init(|| {
        let python = PathBuf::from("/usr/bin/python3");
        let ok = Command::new(&python)
            .args(["-c", "import boto3"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Ok(python)
        } else {
            Err(
                "the stock S3 client is missing: /usr/bin/python3 cannot import boto3; \
                 install the Debian package python3-boto3 (scripts/install-deps installs \
                 everything the tests need)"
                    .into(),
            )
        }
    });
    checked.clone().unwrap_or_else(|e| panic!("{e}"))
}

/// The HTTP status of an anonymous `GET /` on `127.0.0.1:port`.
fn http_status(port: u16) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head)?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {line:?}")))
}

/// Ceph's binaries, each required with the Debian package that has it.
struct Tools {
    authtool: PathBuf,
    monmaptool: PathBuf,
    mon: PathBuf,
    osd: PathBuf,
    rgw: PathBuf,
}

impl Tools {
    fn find() -> Tools {
        // Checked first: the S3 client, so that a missing one fails before 25 s of start.
        python3();
        require("ceph", "ceph-common");
        require("radosgw-admin", "radosgw");
        Tools {
            authtool: require("ceph-authtool", "ceph-common"),
            monmaptool: require("monmaptool", "ceph-common"),
            mon: require("ceph-mon", "ceph-mon"),
            osd: require("ceph-osd", "ceph-osd"),
            rgw: require("radosgw", "radosgw"),
        }
    }

    fn authtool<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) {
        let mut cmd = Command::new(&self.authtool);
        cmd.args(args);
        crate::process::run_ok(&mut cmd);
    }

    fn run(&self, tool: &Path, args: &[&std::ffi::OsStr], dir: &Path) {
        let mut cmd = Command::new(tool);
        cmd.args(args).current_dir(dir).env_remove("CEPH_ARGS");
        crate::process::run_ok(&mut cmd);
    }
}

/// A CA of the cluster's own (`rgw-ca.pem`) and the RGW's HTTPS certificate it issued for
/// `127.0.0.1` and `localhost` (`rgw-tls.pem`, key `rgw-tls.key`), in `dir`.
fn write_rgw_tls(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("a CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "ferry test RGW CA");
    let ca_cert = ca.self_signed(&ca_key).expect("a self-signed CA");
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).expect("leaf params");
    leaf.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let key = KeyPair::generate().expect("a key");
    let cert = leaf.signed_by(&key, &issuer).expect("signed by the CA");
    fs::write(dir.join("rgw-ca.pem"), ca_cert.pem()).unwrap();
    fs::write(dir.join("rgw-tls.pem"), cert.pem()).unwrap();
    fs::write(dir.join("rgw-tls.key"), key.serialize_pem()).unwrap();
    chmod(&dir.join("rgw-tls.key"), 0o600);
}

/// `ceph.conf` of a cluster in `dir` (the `[osd.N]` sections are appended by the caller).
fn ceph_conf(
    dir: &Path,
    fsid: &str,
    mon_port: u16,
    (rgw_port, tls_port): (u16, u16),
    opts: CephOptions,
) -> String {
    let d = dir.display();
    let size = opts.pool_size;
    let min_size = if size >= 3 { 2 } else { 1 };
    let memstore_bytes = opts.memstore_bytes;
    format!(
        "[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}/0
mon initial members = a
keyring = {d}/$name.keyring
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
osd pool default size = {size}
osd pool default min size = {min_size}
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 1
mon data avail crit = 0
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
run dir = {d}/run
log file = {d}/log/$name.log
admin socket = {d}/run/$name.asok
ms bind ipv6 = false
[osd]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
[mon.a]
mon data = {d}/mon
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port} ssl_endpoint=127.0.0.1:{tls_port} ssl_certificate={d}/rgw-tls.pem ssl_private_key={d}/rgw-tls.key
rgw data = {d}/rgw
"
    )
}

/// The watchdog (`sh -c`; $1 the pid file, $2 the cluster's directory, $3 whether to keep
/// it, $4 the grace in seconds). It reads its stdin, a pipe from the test process, until
/// EOF: the test process dropped the cluster or ended. Then it stops whatever the pid file
/// (`ROLE PID` lines) still lists, in the order RGW, OSDs, monitor, SIGTERM then SIGKILL
/// after the grace (a zombie counts as gone), and removes the directory unless kept.
const WATCHDOG: &str = r#"
cat >/dev/null
alive() {
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] || continue
    state=$(sed 's/.*) //' "/proc/$p/stat" | cut -d' ' -f1)
    [ "$state" = Z ] || return 0
  done
  return 1
}
for role in rgw osd mon; do
  pids=$(awk -v r="$role" '$1 == r { print $2 }' "$1" 2>/dev/null)
  [ -n "$pids" ] || continue
  kill -TERM $pids 2>/dev/null
  i=0
  while alive $pids && [ "$i" -lt $(( $4 * 10 )) ]; do sleep 0.1; i=$((i + 1)); done
  kill -KILL $pids 2>/dev/null
done
[ "$3" = 1 ] || rm -rf "$2"
"#;

/// `user`'s S3 key files (mode 0600) in `dir`, named by the user's uid: `(access, secret)`.
pub fn key_files(user: &S3User, dir: &Path) -> (String, String) {
    let access = dir.join(format!("{}-access", user.uid));
    let secret = dir.join(format!("{}-secret", user.uid));
    for (path, text) in [(&access, &user.access_key), (&secret, &user.secret_key)] {
        fs::write(path, format!("{text}\n")).unwrap();
        chmod(path, 0o600);
    }
    (access.display().to_string(), secret.display().to_string())
}

/// An S3 target's TOML table named `table` (`backup_server`, `maintenance`,
/// `copies.offsite`) on `bucket` of `c`'s RGW under the prefix `ferry`, with `user`'s keys
/// (files in `dir`), `extra` lines appended; it starts with a newline, for appending.
pub fn s3_table(
    table: &str,
    c: &CephCluster,
    bucket: &str,
    user: &S3User,
    dir: &Path,
    extra: &str,
) -> String {
    let (access, secret) = key_files(user, dir);
    format!(
        "\n[{table}]\nkind = \"s3\"\nendpoint = {:?}\nbucket = {bucket:?}\nprefix = \"ferry\"\n\
         path_style = true\naccess_key_file = {access:?}\nsecret_key_file = {secret:?}\n\
         io_timeout_seconds = 30\nconnect_timeout_seconds = 5\n{extra}",
        c.endpoint(),
    )
}

/// Points both agents of `d` at `bucket` as their `[backup_server]`: production with
/// [`S3Roles::production`]'s keys, staging with [`S3Roles::staging`]'s (key files in `d`'s
/// directory). Call it before the agents start.
pub fn use_s3_backup_server(d: &crate::Deployment, c: &CephCluster, bucket: &str) {
    let roles = c.roles();
    let dir = d.dir.path().to_owned();
    for (config, user) in [
        (&d.prod_config, &roles.production),
        (&d.stage_config, &roles.staging),
    ] {
        let text = std::fs::read_to_string(config).unwrap();
        let table = s3_table("backup_server", c, bucket, user, &dir, "");
        std::fs::write(config, replace_backup_server(&text, &table)).unwrap();
    }
}

/// An agent's `config` with its `[backup_server]` table replaced by `table`.
pub fn replace_backup_server(config: &str, table: &str) -> String {
    let start = config
        .find("[backup_server]\n")
        .expect("the agent's config has a [backup_server] table");
    let end = config[start + 1..]
        .find("\n[")
        .map_or(config.len(), |i| start + 2 + i);
    format!(
        "{}{}\n{}",
        &config[..start],
        table.trim_start(),
        &config[end..]
    )
}
