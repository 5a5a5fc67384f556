//! The backup server: a real OpenSSH sshd on a free loopback port with its own host key
//! and config, serving SFTP (internal-sftp) to the OS user [`BACKUP_USER`], stopped on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tempfile::TempDir;

use crate::netns::Netns;
use crate::process::{
    Proc, chmod, free_port, make_reachable, output_within, require, require_root, run_ok, tail,
};

/// The OS user owning the backup server's files (Debian's own `backup` user is taken).
pub const BACKUP_USER: &str = "ferrybk";

/// Creates the OS user [`BACKUP_USER`] (`useradd -m -s /bin/sh`) if it is missing, and
/// makes sure its account is not locked (sshd refuses locked accounts even for keys).
/// Race-free across threads and processes: an exclusive lock on a file in the temporary
/// directory, and "already exists" is not an error.
pub fn ensure_backup_user() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let result = DONE.get_or_init(|| {
        require_root("create the backup server's OS user ferrybk and run sshd");
        let useradd = require("useradd", "passwd");
        let usermod = require("usermod", "passwd");
        let lock_path = std::env::temp_dir().join("ferry-tests-backup-user.lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
        lock.lock()
            .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
        let exists = || {
            Command::new("id")
                .arg(BACKUP_USER)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !exists() {
            let out = Command::new(&useradd)
                .args(["-m", "-s", "/bin/sh", BACKUP_USER])
                .output()
                .map_err(|e| format!("cannot run useradd: {e}"))?;
            // Exit code 9: the name is already in use (created meanwhile): fine.
            if !out.status.success() && !exists() {
                return Err(format!(
                    "useradd -m -s /bin/sh {BACKUP_USER} failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        let shadow = fs::read_to_string("/etc/shadow").unwrap_or_default();
        let locked = shadow
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{BACKUP_USER}:")))
            .is_some_and(|rest| rest.starts_with('!'));
        if locked {
            // No password, but not locked.
            let out = Command::new(&usermod)
                .args(["-p", "*", BACKUP_USER])
                .output()
                .map_err(|e| format!("cannot run usermod: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "usermod -p '*' {BACKUP_USER} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        drop(lock);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// An sshd acting as the backup server (see the module docs).
///
/// Its directory holds `sshd_config`, `host_key`, `authorized_keys`, `known_hosts`
/// (the pinned host key for OpenSSH clients), `sshd.log`, client keys and `backups/`,
/// the layout's root, owned by [`BACKUP_USER`].
pub struct Sshd {
    proc: Proc,
    dir: PathBuf,
    host: String,
    port: u16,
    root: PathBuf,
    keys: AtomicUsize,
    authorized: Mutex<()>,
    // Last: removed after sshd is stopped.
    _tmp: Option<TempDir>,
}

impl Sshd {
    /// Starts an sshd in a directory of its own, removed on drop.
    pub fn start() -> Sshd {
        let tmp = tempfile::Builder::new()
            .prefix("ferry-sshd-")
            .tempdir()
            .expect("create a temporary directory");
        let mut s = Self::start_in(&tmp.path().join("sshd"));
        s._tmp = Some(tmp);
        s
    }

    /// Starts an sshd in `dir` (created; every ancestor must be traversable by others,
    /// since sshd reads `authorized_keys` as [`BACKUP_USER`]).
    pub fn start_in(dir: &Path) -> Sshd {
        Self::start_in_with_config(dir, "")
    }

    /// Starts an sshd in `dir` with `extra` appended to its `sshd_config` (e.g. `Match`
    /// blocks).
    pub fn start_in_with_config(dir: &Path, extra: &str) -> Sshd {
        Self::start_inner(dir, extra, None)
    }

    /// Starts an sshd in `dir` inside network namespace `netns`, listening on its address
    /// ([`Netns::ip`]): a backup server on a host of its own, whose link a test can cut.
    pub fn start_in_netns(dir: &Path, netns: &Netns) -> Sshd {
        Self::start_inner(dir, "", Some(netns))
    }

    fn start_inner(dir: &Path, extra: &str, netns: Option<&Netns>) -> Sshd {
        let host = netns.map_or("127.0.0.1", Netns::ip).to_owned();
        let sshd = require("sshd", "openssh-server");
        let keygen = require("ssh-keygen", "openssh-client");
        ensure_backup_user();
        make_reachable(dir);
        fs::create_dir_all("/run/sshd").expect("mkdir -p /run/sshd");
        let host_key = dir.join("host_key");
        run_ok(
            Command::new(&keygen)
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "ferry-test-host"])
                .arg("-f")
                .arg(&host_key),
        );
        let root = dir.join("backups");
        fs::create_dir_all(&root).unwrap();
        run_ok(Command::new("chown").arg(BACKUP_USER).arg(&root));
        chmod(&root, 0o755);
        let authorized = dir.join("authorized_keys");
        fs::write(&authorized, "").unwrap();
        chmod(&authorized, 0o644);
        let conf = dir.join("sshd_config");
        let log = dir.join("sshd.log");

        // OpenSSH >= 9.8 penalises sources that fail to log in, loopback included, which
        // would punish tests that provoke failures; older versions reject the option.
        let mut penalties = "PerSourcePenalties no\n";
        for attempt in 1..=5 {
            let port = free_port();
            fs::write(
                &conf,
                format!(
                    "Port {port}\nListenAddress {host}\nHostKey {hk}\nPidFile {d}/sshd.pid\n\
                     AuthorizedKeysFile {ak}\nStrictModes no\nPasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin no\n\
                     AllowUsers {BACKUP_USER}\nMaxStartups 100\nMaxSessions 100\n\
                     Subsystem sftp internal-sftp\nLogLevel VERBOSE\n{penalties}{extra}\n",
                    hk = host_key.display(),
                    d = dir.display(),
                    ak = authorized.display(),
                ),
            )
            .unwrap();
            let mut check = match netns {
                Some(n) => n.command(&sshd.to_string_lossy()),
                None => Command::new(&sshd),
            };
            let check = check
                .arg("-t")
                .arg("-f")
                .arg(&conf)
                .output()
                .expect("run sshd -t");
            if !check.status.success() {
                let stderr = String::from_utf8_lossy(&check.stderr);
                if !penalties.is_empty() && stderr.contains("PerSourcePenalties") {
                    penalties = "";
                    continue;
                }
                panic!(
                    "sshd -t -f {} rejected the config: {stderr}",
                    conf.display()
                );
            }
            let _ = fs::remove_file(&log);
            let mut cmd = match netns {
                Some(n) => n.command(&sshd.to_string_lossy()),
                None => Command::new(&sshd),
            };
            cmd.arg("-D").arg("-f").arg(&conf).arg("-E").arg(&log);
            let mut proc = Proc::spawn(cmd, &dir.join("sshd.out"));
            // sshd exits at once if the port was taken meanwhile: then try another.
            let deadline = std::time::Instant::now() + crate::process::START_TIMEOUT;
            loop {
                let open = std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::new(host.parse().expect("an IP address"), port),
                    Duration::from_millis(200),
                )
                .is_ok();
                if open {
                    let s = Sshd {
                        proc,
                        dir: dir.to_owned(),
                        host: host.clone(),
                        port,
                        root,
                        keys: AtomicUsize::new(0),
                        authorized: Mutex::new(()),
                        _tmp: None,
                    };
                    fs::write(
                        s.known_hosts(),
                        format!("[{host}]:{port} {}\n", s.host_key()),
                    )
                    .unwrap();
                    return s;
                }
                if proc.try_exit().is_some() || std::time::Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let taken = tail(&log, 20).contains("Address already in use");
            if !taken || attempt == 5 {
                proc.kill();
                panic!(
                    "sshd did not accept connections on {host}:{port}; {}:\n{}\n{}",
                    log.display(),
                    tail(&log, 40),
                    proc.log_tail(20)
                );
            }
        }
        unreachable!()
    }

    /// Its port on [`Sshd::host`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address it listens on: `127.0.0.1`, or its network namespace's address.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The user to log in as: [`BACKUP_USER`].
    pub fn user(&self) -> &'static str {
        BACKUP_USER
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The public host key line, `ssh-ed25519 AAAA...`, without comment.
    pub fn host_key(&self) -> String {
        let pubkey = fs::read_to_string(self.dir.join("host_key.pub")).expect("host_key.pub");
        pubkey
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// A `known_hosts` file pinning the host key (`[127.0.0.1]:PORT ssh-ed25519 AAAA...`),
    /// for `-o UserKnownHostsFile=`.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }

    /// The layout's root directory, owned by [`BACKUP_USER`].
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A new ed25519 client key pair allowed to log in; returns the private key's path
    /// (mode 0600; the public key is beside it with `.pub`).
    pub fn add_client_key(&self) -> PathBuf {
        let n = self.keys.fetch_add(1, Ordering::SeqCst) + 1;
        self.add_client_key_named(&format!("client_key_{n}"), "")
    }

    /// Like [`Sshd::add_client_key`], with the key file named `name` in the sshd's
    /// directory and `options` (e.g. `restrict`; empty for none) before the key in
    /// `authorized_keys`.
    pub fn add_client_key_named(&self, name: &str, options: &str) -> PathBuf {
        let key = self.dir.join(name);
        assert!(!key.exists(), "{} exists already", key.display());
        run_ok(
            Command::new(require("ssh-keygen", "openssh-client"))
                .args(["-q", "-t", "ed25519", "-N", "", "-C", name])
                .arg("-f")
                .arg(&key),
        );
        chmod(&key, 0o600);
        let public = fs::read_to_string(self.dir.join(format!("{name}.pub"))).unwrap();
        let line = if options.is_empty() {
            public.trim().to_owned()
        } else {
            format!("{options} {}", public.trim())
        };
        let _guard = self.authorized.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.dir.join("authorized_keys");
        let mut keys = fs::read_to_string(&path).unwrap();
        keys.push_str(&line);
        keys.push('\n');
        fs::write(&path, keys).unwrap();
        key
    }

    /// Every file (not directory) under the root, as paths relative to it, sorted, hidden
    /// ones (e.g. `.x.partial`) included.
    pub fn files(&self) -> Vec<String> {
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                match e.file_type() {
                    Ok(t) if t.is_dir() => walk(base, &p, out),
                    Ok(_) => out.push(p.strip_prefix(base).unwrap().display().to_string()),
                    Err(_) => {}
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &self.root, &mut out);
        out.sort();
        out
    }

    /// [`Sshd::files`] whose name is final (not hidden, e.g. not a `.x.partial`).
    pub fn final_files(&self) -> Vec<String> {
        self.files()
            .into_iter()
            .filter(|f| {
                !Path::new(f)
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect()
    }

    /// The options of an OpenSSH client (`ssh`, `sftp`) that logs in with `key` only, no
    /// user or system config, and this server's host key pinned (`StrictHostKeyChecking`):
    /// `-F /dev/null -i KEY -o UserKnownHostsFile=... ...`. The port flag differs between
    /// `ssh` (`-p`) and `sftp` (`-P`), so the caller adds it.
    pub fn client_options(&self, key: &Path) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec!["-F".into(), "/dev/null".into(), "-i".into()];
        args.push(key.into());
        args.push("-o".into());
        args.push(format!("UserKnownHostsFile={}", self.known_hosts().display()).into());
        for o in [
            "GlobalKnownHostsFile=/dev/null",
            "StrictHostKeyChecking=yes",
            "BatchMode=yes",
            "IdentitiesOnly=yes",
        ] {
            args.push("-o".into());
            args.push(o.into());
        }
        args
    }

    /// Runs the OpenSSH `sftp` client in batch mode as [`BACKUP_USER`] with `key`, the
    /// pinned host key and no user config, feeding it `batch` (one command a line; see
    /// sftp(1)); its output. Fails on the first failing command unless it starts with `-`.
    pub fn sftp(&self, key: &Path, batch: &str) -> Output {
        let mut cmd = Command::new(require("sftp", "openssh-client"));
        cmd.args(["-b", "-"])
            .args(self.client_options(key))
            .arg("-P")
            .arg(self.port.to_string())
            .args(["-o", "ConnectTimeout=10"])
            .arg(format!("{BACKUP_USER}@127.0.0.1"));
        output_within(&mut cmd, batch.as_bytes(), Duration::from_secs(120))
    }

    /// The last `lines` lines of the sshd log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.dir.join("sshd.log"), lines)
    }

    /// The last 30 lines of the sshd log.
    pub fn log(&self) -> String {
        self.log_tail(30)
    }

    /// The sshd process (e.g. to kill it).
    pub fn process(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// The listening sshd's process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The processes serving its connections now: every descendant of the listening
    /// sshd (for each connection, the privileged monitor and the user's session that runs
    /// internal-sftp), e.g. to stop them (SIGSTOP) as a server that hangs would. New
    /// connections get new processes.
    pub fn sessions(&self) -> Vec<u32> {
        descendants(self.proc.pid())
    }
}

/// The process ids of every descendant of `ancestor` (from `/proc`).
fn descendants(ancestor: u32) -> Vec<u32> {
    let mut parent = std::collections::HashMap::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces and parentheses.
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        if let Some(ppid) = stat
            .get(close + 2..)
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok())
        {
            parent.insert(pid, ppid);
        }
    }
    let mut out: Vec<u32> = parent
        .keys()
        .copied()
        .filter(|&p| {
            let mut at = p;
            for _ in 0..64 {
                match parent.get(&at) {
                    Some(&pp) if pp == ancestor => return true,
                    Some(&pp) if pp > 1 => at = pp,
                    _ => return false,
                }
            }
            false
        })
        .collect();
    out.sort_unstable();
    out
}
