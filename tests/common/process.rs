//! Child processes, loopback ports, system tools and the workspace binaries.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// How long a service may take to accept TCP connections after it is started.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A loopback port nobody listens on, never handed out twice in this process.
///
/// Ports are drawn at random below the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), so an outgoing connection of another test
/// cannot take the port between this check and the service's own bind, and two test
/// processes running at once rarely pick the same one. Falls back to `bind 127.0.0.1:0`.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let low = 10_000u32;
    let high = ephemeral_low().min(65_535);
    if high > low + 1_000 {
        for _ in 0..2_000 {
            let port = (low + (random() % u64::from(high - low)) as u32) as u16;
            if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return port;
            }
        }
    }
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind 127.0.0.1:0")
            .local_addr()
            .expect("local address")
            .port();
        if given.insert(port) {
            return port;
        }
    }
}

fn ephemeral_low() -> u32 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// xorshift64*, seeded from the clock and the process id: enough to spread ports.
fn random() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut x = STATE.load(Ordering::Relaxed);
    if x == 0 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        x = (nanos ^ (u64::from(std::process::id()) << 32)) | 1;
    }
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    STATE.store(x, Ordering::Relaxed);
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Whether something accepts TCP on `127.0.0.1:port` right now.
pub fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .is_ok()
}

/// Waits until something accepts TCP on `port`, or panics with `what` and `log`'s tail.
/// Prefer [`Proc::wait_port`], which also notices a process that exited.
pub fn wait_port(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if port_open(port) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{what} did not accept connections on 127.0.0.1:{port} within {} s; {}:\n{}",
        START_TIMEOUT.as_secs(),
        log.display(),
        tail(log, 40)
    );
}

/// The last `lines` lines of a file (or a note that it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let s = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = s.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// The path of a system tool, or a panic naming the Debian package that has it.
///
/// `tool` is a name looked up in `PATH`, `/usr/sbin` and `/usr/bin`, or a path.
pub fn require(tool: &str, package: &str) -> PathBuf {
    let found = if tool.contains('/') {
        Some(PathBuf::from(tool)).filter(|p| p.exists())
    } else {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .chain([
                PathBuf::from("/usr/local/sbin"),
                PathBuf::from("/usr/local/bin"),
                PathBuf::from("/usr/sbin"),
                PathBuf::from("/usr/bin"),
                PathBuf::from("/sbin"),
                PathBuf::from("/bin"),
            ])
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    };
    found.unwrap_or_else(|| {
        panic!(
            "{tool} is missing: install the Debian package {package} \
             (scripts/install-deps installs everything the tests need)"
        )
    })
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Panics unless this process runs as root, saying `why` root is needed.
pub fn require_root(why: &str) {
    assert!(
        is_root(),
        "the end-to-end tests must run as root: they {why}. Run them with scripts/test as root"
    );
}

/// The workspace root (the directory of the top `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// The path of a workspace binary (`ferry-agent`, `ferry-coordinator`, `ferry`) in the
/// target directory of this test executable (`target/debug/deps/x` → `target/debug/`).
///
/// The first call in a test process runs `cargo build --workspace --bins` (`$CARGO` if set,
/// in the workspace root, with the test's profile): the same command as `scripts/test`, so
/// it is a quick no-op when the binaries are fresh, and a test never runs a stale binary
/// after an edit. `FERRY_TEST_NO_BUILD=1` skips it and only requires that the file exists.
/// Panics with cargo's stderr if the build fails.
pub fn bin(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    static FAILED: Mutex<Option<String>> = Mutex::new(None);
    let exe = std::env::current_exe().expect("path of the test executable");
    let mut dir = exe.parent().expect("executable's directory").to_owned();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let path = dir.join(name);
    BUILD.call_once(|| {
        let skip = std::env::var("FERRY_TEST_NO_BUILD").is_ok_and(|v| v == "1");
        if skip && path.exists() {
            return;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(&cargo);
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
        cmd.current_dir(workspace_root())
            .args(["build", "--workspace", "--bins"]);
        match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(profile) => {
                cmd.args(["--profile", profile]);
            }
        }
        let result = cmd.output();
        let failure = match result {
            Ok(out) if out.status.success() => None,
            Ok(out) => Some(format!(
                "{cmd:?} failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )),
            Err(e) => Some(format!("cannot run {cargo} ({e}): install Rust (rustup)")),
        };
        *FAILED.lock().unwrap_or_else(|e| e.into_inner()) = failure;
    });
    if let Some(failure) = FAILED.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        panic!("building the ferry binaries failed: {failure}");
    }
    assert!(
        path.exists(),
        "{} does not exist after `cargo build --workspace --bins`",
        path.display()
    );
    path
}

/// Removes from `cmd`'s environment every `PG*` and `FERRY_*` variable of the developer's
/// shell, so that a test sees only what the harness sets.
pub fn hermetic(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("PG") || k.starts_with("FERRY_") {
            cmd.env_remove(&*k);
        }
    }
    cmd
}

/// Runs `cmd`; returns its stdout, or panics with the command, status, stdout and stderr.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` with `stdin` as its standard input and returns its output, or panics
/// (after killing it) if it has not exited within `timeout`. For commands that must
/// finish, e.g. `ferry-agent run` with a broken config.
pub fn output_within(cmd: &mut Command, stdin: &[u8], timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let input = stdin.to_vec();
    let mut child_in = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        // A command that does not read its input is not an error here.
        let _ = child_in.write_all(&input);
    });
    let mut out_pipe = child.stdout.take().expect("stdout");
    let mut err_pipe = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if Instant::now() >= deadline {
            kill_tree(&mut child);
            let stdout = out_reader.join().unwrap_or_default();
            let stderr = err_reader.join().unwrap_or_default();
            panic!(
                "{cmd:?} did not exit within {} s (killed):\nstdout: {}\nstderr: {}",
                timeout.as_secs(),
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = writer.join();
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// `len` bytes (rounded down to 8) that compressors cannot shrink, the same for the same
/// `seed` (xorshift64).
pub fn incompressible(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// Today's date in UTC, `YYYY-MM-DD`: the dated directory a backup made now goes to.
pub fn today_utc() -> String {
    run_ok(Command::new("date").args(["-u", "+%Y-%m-%d"]))
        .trim()
        .to_owned()
}

/// Appends `text` on a new line to a file, e.g. a `[[datastores]]` entry to an agent config.
pub fn append(path: &Path, text: &str) {
    let mut s =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    s.push('\n');
    s.push_str(text);
    fs::write(path, s).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Sets the top-level key `key` of the agent or coordinator config at `path` to `value`
/// (TOML text: `3`, or [`crate::toml_str`] of a string). It goes first, where top-level
/// keys belong (before the first table), replacing an earlier top-level line of `key`; a
/// line of the same name inside a table is left alone.
pub fn set_top_level(path: &Path, key: &str, value: &str) {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut out = format!("{key} = {value}\n");
    let mut in_table = false;
    for line in text.lines() {
        in_table |= line.trim_start().starts_with('[');
        let same_key = line.split_once('=').is_some_and(|(k, _)| k.trim() == key);
        if in_table || !same_key {
            out.push_str(line);
            out.push('\n');
        }
    }
    fs::write(path, out).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Sets a file's mode bits.
pub fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// Makes `dir` (created if needed) reachable by other OS users (`postgres`, `ferrybk`):
/// mode 0755 on it, and a panic naming the first ancestor they cannot traverse.
pub fn make_reachable(dir: &Path) {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", dir.display()));
    chmod(dir, 0o755);
    for a in dir.ancestors().skip(1) {
        if let Ok(m) = fs::metadata(a) {
            assert!(
                m.mode() & 0o001 != 0,
                "{} is not traversable by other users (mode {:o}), so the postgres and \
                 ferrybk OS users cannot reach {}; use a directory under /tmp",
                a.display(),
                m.mode() & 0o7777,
                dir.display()
            );
        }
    }
}

/// What `/proc/<pid>/stat` says of a running (or zombie) process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// Its command name (`comm`, at most 15 bytes), e.g. `pg_dump`.
    pub comm: String,
    /// Its state letter: `R`, `S`, `D`, `Z` (a zombie: exited, not yet reaped)...
    pub state: char,
    /// Its parent's process id.
    pub ppid: u32,
    /// When it started, in clock ticks since boot: with the pid, what tells a process from
    /// a later one given the same id.
    pub start_ticks: u64,
}

/// `/proc/<pid>/stat` read, or `None` if no process has that id (any more).
pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...; comm may contain spaces and parentheses.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    Some(ProcStat {
        comm: stat[open + 1..close].to_owned(),
        state: rest.first()?.chars().next()?,
        ppid: rest.get(1)?.parse().ok()?,
        // Field 22 of stat(5); `rest` starts at field 3.
        start_ticks: rest.get(19)?.parse().ok()?,
    })
}

/// The process ids of every descendant of `pid` (children first), from `/proc/*/stat`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(stat) = proc_stat(p) {
            parent_of.push((p, stat.ppid));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parent_of {
            if parent == p && !out.contains(&child) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

/// Sends `signal` (e.g. `KILL`, `TERM`) to processes that are not our direct children.
fn signal(pids: &[u32], signal: &str) {
    if pids.is_empty() {
        return;
    }
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    let _ = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("kill -s {signal} {} 2>/dev/null", list.join(" ")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// SIGKILLs a child and everything it started, and reaps it.
fn kill_tree(child: &mut Child) {
    let below = descendants(child.id());
    let _ = child.kill();
    signal(&below, "KILL");
    let _ = child.wait();
}

/// A child process with its stdout and stderr in a log file; it and everything it started
/// are killed (SIGKILL) on drop.
pub struct Proc {
    child: Child,
    /// Its stdout and stderr.
    pub log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` (stdin from /dev/null) with stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, log: &Path) -> Proc {
        let f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup log file"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Proc {
            child,
            log: log.to_owned(),
            exited: None,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status if it has exited (without waiting).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits up to `timeout` for it to exit; its status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it and everything it started with SIGKILL (a host that dies) and reaps it.
    pub fn kill(&mut self) {
        if self.exited.is_none() {
            kill_tree(&mut self.child);
            self.exited = self.child.try_wait().ok().flatten();
        }
    }

    /// Sends SIGTERM (a clean shutdown) and waits up to `grace` for it to exit, then kills
    /// whatever is left. Returns the exit status if it exited within `grace`.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_exit() {
            return Some(s);
        }
        signal(&[self.pid()], "TERM");
        let status = self.wait_exit(grace);
        self.kill();
        status
    }

    /// Waits until it accepts TCP on `127.0.0.1:port`. Panics with the log's tail if it
    /// exits first or does not listen within [`START_TIMEOUT`].
    pub fn wait_port(&mut self, port: u16, what: &str) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if port_open(port) {
                return;
            }
            if let Some(status) = self.try_exit() {
                panic!(
                    "{what} exited ({status}) before accepting connections on 127.0.0.1:{port}; {}:\n{}",
                    self.log.display(),
                    self.log_tail(40)
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "{what} did not accept connections on 127.0.0.1:{port} within {} s; {}:\n{}",
                    START_TIMEOUT.as_secs(),
                    self.log.display(),
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A tmpfs of `bytes` mounted on `dir` (as root) and owned by `owner`, lazily unmounted on
/// drop: a small disk, or a directory that is a mount point of its own.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts it; panics (naming the command) if that fails.
    pub fn mount(dir: &Path, bytes: u64, owner: &str) -> Tmpfs {
        require_root("mount a tmpfs");
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={bytes},mode=0755"))
                .arg("ferry-test-tmpfs")
                .arg(dir),
        );
        let t = Tmpfs(dir.to_owned());
        run_ok(Command::new("chown").arg(owner).arg(dir));
        t
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// `GET /metrics` on 127.0.0.1:`port`: the value of the sample `series` (name and labels
/// exactly as written), if there is one.
pub fn metric(port: u16, series: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}
