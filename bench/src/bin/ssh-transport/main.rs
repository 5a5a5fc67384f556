//! Issue 20, transports side by side: raw SFTP throughput and CPU of the SSH clients Ferry
//! could upload with, against this machine's own sshd (the tests' [`Sshd`]: OpenSSH's
//! `internal-sftp` on loopback, the backup user, an ed25519 key, the host key pinned), its
//! backup root a tmpfs so that no disk is measured. Each method uploads `--gib` GiB
//! (default 1) of incompressible bytes from memory to a new file, asks the server to fsync
//! it (`fsync@openssh.com`, as Ferry does) and checks its size, then downloads it to
//! nowhere; every figure is a median over `--runs` runs (default 3), the methods taking
//! turns within each run, and the ratios are to row (1), Ferry's own transport:
//!
//! 1. Ferry: `ferry_storage`'s [`SftpConfig::connect`] (libssh2 through `ssh2`, its cipher
//!    list, aes128-gcm first) and the agent's calls: `stage` fed 1 MiB chunks by another
//!    thread over the agent's bounded channel (one copy of each chunk into it, as the
//!    agent's pipeline makes), and `download` into the same kind of channel.
//! 2. libssh2 through `ssh2` without Ferry's session (no watchdog, no channel, no copy):
//!    the same 1 MiB `write_all`s and 1 MiB reads, the cipher forced with `method_pref` to
//!    aes128-gcm@openssh.com, aes128-ctr and chacha20-poly1305@openssh.com (libssh2 1.11
//!    has it, in its own portable C).
//! 3. The OpenSSH client, `ssh -s ... sftp` (`-v` tells the cipher it negotiated), spoken
//!    to over its stdin and stdout with `openssh-sftp-client`: its default cipher, and
//!    `-c aes128-gcm@openssh.com`.
//! 4. russh 0.65 with ring and russh-sftp 3.0, forced to chacha20-poly1305 and to
//!    aes128-gcm: `bench/russh`, a child process and a workspace of its own (russh 0.65
//!    and Ferry's age 0.12 need two versions of `kem` that one `Cargo.lock` cannot hold),
//!    built by this benchmark into its target directory.
//!
//! The async clients (3 and 4) keep [`IN_FLIGHT`] requests of the server's largest size
//! (255 KiB for OpenSSH's sftp-server) outstanding in each direction; libssh2 pipelines by
//! itself within each 1 MiB call.
//!
//! `cargo run --release -p ferry-bench --bin ssh-transport -- [--gib 1] [--runs 3]`
//!
//! Per direction: wall time from opening the file to closing it (the connection is made
//! before, untimed), MB/s, and CPU seconds (user + system, `/proc/PID/stat`) of the client,
//! that is this whole process plus its child (`ssh`, or the russh client), and of the sshd
//! processes serving the connection. A broken transport cannot look fast: every uploaded
//! file's size is checked on the server's disk, its SHA-256 too in the first run, and
//! every downloaded byte is compared with the one sent.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use base64::Engine;
use bytes::BytesMut;
use clap::Parser;
use ferry_bench::{cpu_seconds, mb, median, ratio, settle};
use ferry_core::layout::StoredFile;
use ferry_storage::chunk::{self, CHUNK_BYTES};
use ferry_storage::sftp::SftpConfig;
use ferry_storage::{ReadSession, WriteSession};
use ferry_tests::{BACKUP_USER, Sshd, Tmpfs, require, run_ok, workspace_root};
use futures::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

mod data;
use data::{Data, PIECE_BYTES};

const _: () = assert!(PIECE_BYTES == CHUNK_BYTES, "the pieces are Ferry's chunks");

/// Command-line arguments.
#[derive(Parser)]
struct Args {
    /// Bytes to upload and download with each method, GiB.
    #[arg(long, default_value_t = 1.0)]
    gib: f64,
    /// Runs of each method; the figures are medians over them.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// Requests outstanding at once in the async clients (russh-sftp's default).
const IN_FLIGHT: usize = 16;

/// The largest read OpenSSH's sftp-server answers in full (its `limits@openssh.com`
/// `max-read-length`, 256 KiB less 1 KiB of headers), bytes.
const READ_BYTES: usize = 255 * 1024;

const AES128_GCM: &str = "aes128-gcm@openssh.com";
const AES128_CTR: &str = "aes128-ctr";
const CHACHA20: &str = "chacha20-poly1305@openssh.com";

/// How each client connects.
#[derive(Clone, Copy)]
enum Method {
    /// Ferry's `SftpConfig::connect` and session.
    Ferry,
    /// `ssh2` directly, the cipher forced.
    Libssh2(&'static str),
    /// `ssh -s sftp` with `-c CIPHER` if given, and `openssh-sftp-client`.
    OpenSsh(Option<&'static str>),
    /// russh + russh-sftp (`bench/russh`), the cipher forced.
    Russh(&'static str),
}

const METHODS: [Method; 8] = [
    Method::Ferry,
    Method::Libssh2(AES128_GCM),
    Method::Libssh2(AES128_CTR),
    Method::Libssh2(CHACHA20),
    Method::OpenSsh(None),
    Method::OpenSsh(Some(AES128_GCM)),
    Method::Russh(CHACHA20),
    Method::Russh(AES128_GCM),
];

impl Method {
    fn name(self) -> String {
        match self {
            Method::Ferry => "(1) Ferry: SftpConfig::connect, stage, download (libssh2)".into(),
            Method::Libssh2(c) => format!("(2) libssh2 via ssh2, forced {}", short(c)),
            Method::OpenSsh(None) => "(3) OpenSSH ssh -s sftp, its default cipher".into(),
            Method::OpenSsh(Some(c)) => format!("(3) OpenSSH ssh -s sftp -c {}", short(c)),
            Method::Russh(c) => format!("(4) russh + russh-sftp (ring), forced {}", short(c)),
        }
    }
}

/// A cipher's name without `@openssh.com`.
fn short(cipher: &str) -> &str {
    cipher.trim_end_matches("@openssh.com")
}

/// The data and its SHA-256 (hex).
struct Payload {
    data: Data,
    sha256: String,
}

impl Payload {
    fn new(total: u64) -> Payload {
        let data = Data::new(total);
        let mut hash = Sha256::new();
        data.pieces().for_each(|c| hash.update(c));
        Payload {
            sha256: hex::encode(hash.finalize()),
            data,
        }
    }
}

/// What the methods share: the server, its login and the data.
struct Ctx<'a> {
    sshd: &'a Sshd,
    key: PathBuf,
    /// The directory of the uploads, as the server's SFTP sees it (no chroot: also a
    /// local path).
    dir: String,
    data: &'a Data,
    /// Where the `ssh` clients' `-v` logs and the russh client's errors go.
    logs: PathBuf,
    /// The russh client's executable.
    russh_client: Option<PathBuf>,
}

/// One direction of one run of one method.
#[derive(Clone, Copy, Default)]
struct Transfer {
    seconds: f64,
    /// CPU seconds of this process.
    own_cpu: f64,
    /// CPU seconds of the client's child process (`ssh`, the russh client).
    child_cpu: f64,
    /// CPU seconds of the sshd processes serving the connection.
    sshd_cpu: f64,
}

/// Wall time and CPU from [`Meter::start`] to [`Meter::stop`].
struct Meter {
    started: Instant,
    own: f64,
    child: Option<(u32, f64)>,
    sshd: Vec<(u32, f64)>,
}

impl Meter {
    /// Lets the machine [`settle`], then starts: this process, the client's child process
    /// if any, and the sshd processes serving connections now.
    fn start(sshd: &Sshd, child: Option<u32>) -> anyhow::Result<Meter> {
        settle()?;
        let sshd = sshd
            .sessions()
            .into_iter()
            .filter_map(|pid| cpu_seconds(pid).ok().map(|c| (pid, c)))
            .collect();
        let child = match child {
            Some(pid) => Some((pid, cpu_seconds(pid)?)),
            None => None,
        };
        Ok(Meter {
            own: cpu_seconds(std::process::id())?,
            child,
            sshd,
            started: Instant::now(),
        })
    }

    fn stop(self) -> anyhow::Result<Transfer> {
        let seconds = self.started.elapsed().as_secs_f64();
        let own_cpu = cpu_seconds(std::process::id())? - self.own;
        let child_cpu = match self.child {
            Some((pid, before)) => cpu_seconds(pid).context("the client's child process")? - before,
            None => 0.0,
        };
        // A process that ended meanwhile (an earlier connection's) is left out.
        let sshd_cpu = self
            .sshd
            .iter()
            .filter_map(|&(pid, before)| cpu_seconds(pid).ok().map(|c| c - before))
            .sum();
        Ok(Transfer {
            seconds,
            own_cpu,
            child_cpu,
            sshd_cpu,
        })
    }
}

/// What one run of one method gives: its two directions, the uploaded file (as the
/// server's SFTP names it) and the cipher negotiated.
struct Run {
    upload: Transfer,
    download: Transfer,
    file: String,
    cipher: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.gib > 0.0 && args.runs > 0,
        "--gib and --runs must be positive"
    );
    let total = (args.gib * (1u64 << 30) as f64).round() as u64;
    require("ssh", "openssh-client");
    // Built first: a build error fails at once, not after the other methods' runs.
    let russh_client = build_russh_client();
    if let Err(e) = &russh_client {
        eprintln!("the russh client cannot be built, its rows are skipped: {e:#}");
    }
    let tmp = tempfile::Builder::new()
        .prefix("ferry-bench-ssh-")
        .tempdir()?;
    let sshd = Sshd::start_in(&tmp.path().join("sshd"));
    // The backup root on a tmpfs (one file at a time, and some room), unmounted before the
    // sshd's directory is removed.
    let _tmpfs = Tmpfs::mount(sshd.root(), total + (64 << 20), BACKUP_USER);
    let dir = sshd.root().join("bench");
    fs::create_dir(&dir)?;
    run_ok(Command::new("chown").arg(BACKUP_USER).arg(&dir));
    let key = sshd.add_client_key();
    eprintln!("generating {:.0} MB of data and its SHA-256 ...", mb(total));
    let payload = Payload::new(total);
    let ctx = Ctx {
        sshd: &sshd,
        key,
        dir: dir.display().to_string(),
        data: &payload.data,
        logs: tmp.path().to_owned(),
        russh_client: russh_client.as_ref().ok().cloned(),
    };
    let rt = tokio::runtime::Runtime::new()?;

    let mut runs: Vec<Vec<Run>> = METHODS.iter().map(|_| Vec::new()).collect();
    let mut failures: Vec<Option<String>> = METHODS.iter().map(|_| None).collect();
    for run in 1..=args.runs {
        for (i, &method) in METHODS.iter().enumerate() {
            if failures[i].is_some() {
                continue;
            }
            let tag = format!("r{run}m{i}");
            let result = match method {
                Method::Ferry => ferry(&ctx, &tag),
                Method::Libssh2(cipher) => libssh2(&ctx, &tag, cipher),
                Method::OpenSsh(cipher) => rt.block_on(openssh(&ctx, &tag, cipher)),
                Method::Russh(cipher) => russh(&ctx, &tag, cipher),
            }
            .and_then(|r| {
                check_upload(&payload, &r.file, run == 1)?;
                Ok(r)
            });
            match result {
                Ok(r) => {
                    eprintln!(
                        "run {run} {} [{}]: up {:.2} s, down {:.2} s",
                        method.name(),
                        r.cipher,
                        r.upload.seconds,
                        r.download.seconds
                    );
                    runs[i].push(r);
                }
                Err(e) => {
                    eprintln!("run {run} {} failed: {e:#}", method.name());
                    failures[i] = Some(format!("{e:#}"));
                }
            }
            // The upload, or whatever a failed method left.
            for f in fs::read_dir(&dir)?.flatten() {
                let _ = fs::remove_file(f.path());
            }
        }
    }

    let client = Command::new("ssh")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_default();
    println!();
    println!(
        "ssh-transport: {:.0} MB ({:.2} GiB) each way, medians of {} runs, 2 cores, loopback \
         sshd (internal-sftp), its files on tmpfs; {client}",
        mb(total),
        total as f64 / (1u64 << 30) as f64,
        args.runs
    );
    let upload: fn(&Run) -> Transfer = |r| r.upload;
    let download: fn(&Run) -> Transfer = |r| r.download;
    print_table("upload", &runs, &failures, total, upload);
    print_table("download", &runs, &failures, total, download);
    println!();
    println!(
        "Client CPU: this process (every thread) plus its child (ssh, or the russh client), \
         in brackets; sshd CPU: the connection's sshd processes (internal-sftp runs in \
         them). Ratios are to row (1); time: lower is faster."
    );
    for (i, f) in failures.iter().enumerate() {
        if let Some(e) = f {
            println!("{} failed: {e}", METHODS[i].name());
        }
    }
    Ok(())
}

/// Prints the markdown table of one direction.
fn print_table(
    title: &str,
    runs: &[Vec<Run>],
    failures: &[Option<String>],
    total: u64,
    pick: fn(&Run) -> Transfer,
) {
    let med = |i: usize, f: fn(&Transfer) -> f64| -> Option<f64> {
        let v: Vec<f64> = runs[i].iter().map(|r| f(&pick(r))).collect();
        (!v.is_empty() && failures[i].is_none()).then(|| median(&v))
    };
    let client = |t: &Transfer| t.own_cpu + t.child_cpu;
    let base = (med(0, |t| t.seconds), med(0, client));
    println!();
    println!(
        "| {title} | cipher | wall s | MB/s | time vs (1) | client CPU s | CPU vs (1) | sshd CPU s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (i, method) in METHODS.iter().enumerate() {
        let Some(s) = med(i, |t| t.seconds) else {
            println!("| {} | — | failed | | | | | |", method.name());
            continue;
        };
        let cpu = med(i, client).unwrap_or(0.0);
        let child = med(i, |t| t.child_cpu).unwrap_or(0.0);
        let cipher = runs[i].last().map_or("", |r| r.cipher.as_str());
        println!(
            "| {} | {cipher} | {s:.2} | {:.0} | {} | {cpu:.2}{} | {} | {:.2} |",
            method.name(),
            mb(total) / s,
            base.0.map_or("—".into(), |b| ratio(s, b)),
            if matches!(method, Method::OpenSsh(_) | Method::Russh(_)) {
                format!(" ({child:.2})")
            } else {
                String::new()
            },
            base.1.map_or("—".into(), |b| ratio(cpu, b)),
            med(i, |t| t.sshd_cpu).unwrap_or(0.0),
        );
    }
}

/// Checks the uploaded `file` on the server's disk: its size, and if `hash`, its SHA-256.
fn check_upload(payload: &Payload, file: &str, hash: bool) -> anyhow::Result<()> {
    let total = payload.data.total();
    let size = fs::metadata(file).with_context(|| file.to_owned())?.len();
    ensure!(
        size == total,
        "{file} holds {size} bytes, not the {total} uploaded"
    );
    if hash {
        let mut f = fs::File::open(file)?;
        let mut h = Sha256::new();
        let mut buf = vec![0; CHUNK_BYTES];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        let found = hex::encode(h.finalize());
        ensure!(
            found == payload.sha256,
            "{file}: SHA-256 {found}, not the data's {}",
            payload.sha256
        );
    }
    Ok(())
}

/// Method 1: Ferry's own SFTP session, as the agent uses it.
fn ferry(ctx: &Ctx, tag: &str) -> anyhow::Result<Run> {
    let config = SftpConfig {
        host: ctx.sshd.host().to_owned(),
        port: ctx.sshd.port(),
        user: ctx.sshd.user().to_owned(),
        private_key_file: ctx.key.clone(),
        host_key: ctx.sshd.host_key(),
        root: ctx.sshd.root().display().to_string(),
        connect_timeout_seconds: 10,
        io_timeout_seconds: 120,
        max_upload_bytes_per_second: None,
        rsync: None,
    };
    config.validate()?;
    let mut session = config.connect()?;
    let file = StoredFile {
        dir: ctx.dir.clone(),
        name: format!("{tag}.bin"),
    };
    let data = ctx.data;

    let meter = Meter::start(ctx.sshd, None)?;
    let staged = std::thread::scope(|s| {
        let (tx, rx) = chunk::channel();
        s.spawn(move || {
            for piece in data.pieces() {
                let mut buf = chunk::buffer();
                buf.extend_from_slice(piece);
                if tx.send(buf).is_err() {
                    break;
                }
            }
        });
        session.stage(&file, "bench", rx)
    })?;
    let upload = meter.stop()?;
    ensure!(
        staged.bytes == data.total(),
        "Ferry staged {} bytes",
        staged.bytes
    );

    let meter = Meter::start(ctx.sshd, None)?;
    std::thread::scope(|s| -> anyhow::Result<()> {
        let (tx, rx) = chunk::channel();
        let path = staged.partial.clone();
        let session = &mut session;
        let reader = s.spawn(move || session.download(&path, tx));
        let mut v = data.verifier();
        let mut checked = Ok(());
        for buf in rx {
            if checked.is_ok() {
                checked = v.feed(&buf);
            }
            chunk::recycle(buf);
        }
        let n = reader.join().expect("the download thread panicked")?;
        checked?;
        ensure!(n == data.total(), "Ferry downloaded {n} bytes");
        v.finish()?;
        Ok(())
    })?;
    let download = meter.stop()?;
    Ok(Run {
        upload,
        download,
        file: staged.partial,
        // Not observable through Ferry's session: the first of its list, which OpenSSH
        // offers (the libssh2 row forced to it checks that libssh2 negotiates it).
        cipher: "chacha20-poly1305 (Ferry's first)".into(),
    })
}

/// Method 2: libssh2 through `ssh2`, `cipher` forced.
fn libssh2(ctx: &Ctx, tag: &str, cipher: &str) -> anyhow::Result<Run> {
    let tcp = TcpStream::connect((ctx.sshd.host(), ctx.sshd.port()))?;
    tcp.set_nodelay(true)?;
    let mut session = ssh2::Session::new()?;
    session.set_tcp_stream(tcp);
    session.method_pref(ssh2::MethodType::CryptCs, cipher)?;
    session.method_pref(ssh2::MethodType::CryptSc, cipher)?;
    session.method_pref(ssh2::MethodType::HostKey, "ssh-ed25519")?;
    session.handshake()?;
    let (blob, _) = session.host_key().context("no host key")?;
    let line = ctx.sshd.host_key();
    let pinned = base64::engine::general_purpose::STANDARD
        .decode(line.split_whitespace().nth(1).context("host key line")?)?;
    ensure!(blob == pinned.as_slice(), "not the pinned host key");
    session.userauth_pubkey_file(ctx.sshd.user(), None, &ctx.key, None)?;
    let negotiated = [ssh2::MethodType::CryptCs, ssh2::MethodType::CryptSc]
        .map(|m| session.methods(m).unwrap_or("?").to_owned());
    ensure!(
        negotiated.iter().all(|c| c == cipher),
        "libssh2 negotiated {negotiated:?}, not {cipher}"
    );
    let sftp = session.sftp()?;
    let path = format!("{}/{tag}.bin", ctx.dir);

    let meter = Meter::start(ctx.sshd, None)?;
    let mut f = sftp.create(Path::new(&path))?;
    for piece in ctx.data.pieces() {
        f.write_all(piece)?;
    }
    f.fsync()?;
    let size = f.stat()?.size.unwrap_or(0);
    drop(f);
    let upload = meter.stop()?;
    ensure!(
        size == ctx.data.total(),
        "the server's fstat says {size} bytes"
    );

    let meter = Meter::start(ctx.sshd, None)?;
    let mut f = sftp.open(Path::new(&path))?;
    let mut v = ctx.data.verifier();
    let mut buf = vec![0; CHUNK_BYTES];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        v.feed(&buf[..n])?;
    }
    drop(f);
    v.finish()?;
    let download = meter.stop()?;
    drop(sftp);
    let _ = session.disconnect(None, "done", None);
    Ok(Run {
        upload,
        download,
        file: path,
        cipher: short(cipher).to_owned(),
    })
}

/// Method 3: the OpenSSH client, `-c cipher` if given, driven by `openssh-sftp-client`.
async fn openssh(ctx: &Ctx<'_>, tag: &str, cipher: Option<&str>) -> anyhow::Result<Run> {
    use openssh_sftp_client::file::TokioCompatFile;
    use openssh_sftp_client::{Sftp, SftpOptions};

    let log = ctx.logs.join(format!("ssh-{tag}.log"));
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(ctx.sshd.client_options(&ctx.key))
        .arg("-v")
        .arg("-p")
        .arg(ctx.sshd.port().to_string());
    if let Some(c) = cipher {
        cmd.args(["-c", c]);
    }
    cmd.arg("-s")
        .arg(format!("{}@{}", ctx.sshd.user(), ctx.sshd.host()))
        .arg("sftp")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&log)?)
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("cannot run ssh")?;
    let pid = child.id().context("ssh exited at once")?;
    let (stdin, stdout) = (
        child.stdin.take().context("ssh's stdin")?,
        child.stdout.take().context("ssh's stdout")?,
    );
    let options = SftpOptions::new().tokio_compat_file_write_limit(
        std::num::NonZeroUsize::new(IN_FLIGHT * READ_BYTES).expect("not zero"),
    );
    let sftp = match Sftp::new(stdin, stdout, options).await {
        Ok(s) => s,
        Err(e) => bail!(
            "SFTP over ssh failed: {e}; {}:\n{}",
            log.display(),
            fs::read_to_string(&log).unwrap_or_default()
        ),
    };
    let negotiated = negotiated_ciphers(&log)?;
    let path = format!("{}/{tag}.bin", ctx.dir);

    let meter = Meter::start(ctx.sshd, Some(pid))?;
    let mut file = sftp
        .options()
        // Readable too: fstat needs it.
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .await?;
    {
        // Writes pipelined up to its limit (IN_FLIGHT of the largest), on a clone of the
        // handle.
        let mut f = std::pin::pin!(TokioCompatFile::new(file.clone()));
        for piece in ctx.data.pieces() {
            f.write_all(piece).await?;
        }
        f.flush().await?;
    }
    file.sync_all().await?;
    let size = file.metadata().await?.len().unwrap_or(0);
    file.close().await?;
    let upload = meter.stop()?;
    ensure!(
        size == ctx.data.total(),
        "the server's fstat says {size} bytes"
    );

    let meter = Meter::start(ctx.sshd, Some(pid))?;
    let file = sftp.open(&path).await?;
    let mut v = ctx.data.verifier();
    let total = ctx.data.total();
    // IN_FLIGHT reads at once, each of its own offset on a clone of the handle, taken in
    // order.
    let mut pieces = futures::stream::iter((0..total).step_by(READ_BYTES))
        .map(|at| {
            let mut f = file.clone();
            async move {
                f.seek(std::io::SeekFrom::Start(at)).await?;
                let n = (total - at).min(READ_BYTES as u64) as usize;
                f.read_all(n, BytesMut::with_capacity(n)).await
            }
        })
        .buffered(IN_FLIGHT);
    while let Some(piece) = pieces.try_next().await? {
        v.feed(&piece)?;
    }
    drop(pieces);
    file.close().await?;
    v.finish()?;
    let download = meter.stop()?;

    sftp.close().await?;
    let status = child.wait().await?;
    ensure!(status.success(), "ssh exited with {status}");
    Ok(Run {
        upload,
        download,
        file: path,
        cipher: negotiated,
    })
}

/// The ciphers an `ssh -v` log says were negotiated (`kex: client->server cipher: ...`
/// and the other way), one name if they are the same.
fn negotiated_ciphers(log: &Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(log)?;
    let found: Vec<&str> = ["client->server", "server->client"]
        .iter()
        .map(|dir| {
            text.lines()
                .find_map(|l| l.split(&format!("kex: {dir} cipher: ")).nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or("?")
        })
        .collect();
    Ok(if found[0] == found[1] {
        short(found[0]).to_owned()
    } else {
        format!("{} / {}", short(found[0]), short(found[1]))
    })
}

/// Builds the russh client (`bench/russh`, a workspace of its own) into this executable's
/// target directory and profile, as the tests' harness builds the ferry binaries
/// (`FERRY_TEST_NO_BUILD=1`: use the one built); its path.
fn build_russh_client() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().context("the executable's directory")?;
    let target_dir = profile_dir.parent().context("the target directory")?;
    let path = profile_dir.join("ferry-bench-russh");
    if std::env::var("FERRY_TEST_NO_BUILD").is_ok_and(|v| v == "1") && path.exists() {
        return Ok(path);
    }
    let manifest = workspace_root().join("bench/russh/Cargo.toml");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // Not the variables cargo set for this crate (build scripts that track them would
    // rebuild), as the harness does.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME") || key == "OUT_DIR" {
            cmd.env_remove(&key);
        }
    }
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(profile) => {
            cmd.args(["--profile", profile]);
        }
    }
    eprintln!("building the russh client ({}) ...", manifest.display());
    let out = cmd.output().context("cannot run cargo")?;
    ensure!(
        out.status.success(),
        "cargo build --manifest-path {} failed:\n{}",
        manifest.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(path)
}

/// Method 4: the russh client (`bench/russh`), `cipher` forced; see its docs for the
/// protocol on its stdin and stdout.
fn russh(ctx: &Ctx, tag: &str, cipher: &str) -> anyhow::Result<Run> {
    let exe = ctx
        .russh_client
        .as_ref()
        .context("the russh client could not be built")?;
    let path = format!("{}/{tag}.bin", ctx.dir);
    let log = ctx.logs.join(format!("russh-{tag}.log"));
    let child = Command::new(exe)
        .arg(ctx.sshd.host())
        .arg(ctx.sshd.port().to_string())
        .arg(ctx.sshd.user())
        .arg(&ctx.key)
        .arg(ctx.sshd.host_key())
        .arg(cipher)
        .arg(&path)
        .arg(ctx.data.total().to_string())
        .arg(IN_FLIGHT.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    let mut client = RusshClient { child, log };
    client.expect("ready")?;
    let pid = client.child.id();

    let meter = Meter::start(ctx.sshd, Some(pid))?;
    let size = client.ask("upload", "uploaded")?;
    let upload = meter.stop()?;
    ensure!(
        size == ctx.data.total(),
        "the server's fstat says {size} bytes"
    );

    let meter = Meter::start(ctx.sshd, Some(pid))?;
    let n = client.ask("download", "downloaded")?;
    let download = meter.stop()?;
    ensure!(
        n == ctx.data.total(),
        "the russh client downloaded {n} bytes"
    );

    client.finish()?;
    Ok(Run {
        upload,
        download,
        file: path,
        cipher: short(cipher).to_owned(),
    })
}

/// The russh client running: killed on drop unless [`RusshClient::finish`]ed.
struct RusshClient {
    child: Child,
    log: PathBuf,
}

impl RusshClient {
    fn stdin(&mut self) -> anyhow::Result<&mut ChildStdin> {
        self.child.stdin.as_mut().context("its stdin")
    }

    /// Reads its next line, which must start with `word`; the rest of it.
    fn expect(&mut self, word: &str) -> anyhow::Result<String> {
        let stdout: &mut ChildStdout = self.child.stdout.as_mut().context("its stdout")?;
        let mut line = String::new();
        // One line at a time, unbuffered beyond it: nothing is left in a buffer between
        // two calls.
        let mut reader = BufReader::with_capacity(1, stdout);
        reader.read_line(&mut line)?;
        let Some(rest) = line.trim_end().strip_prefix(word) else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            bail!(
                "the russh client said {line:?}, not {word}; {}:\n{}",
                self.log.display(),
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        };
        Ok(rest.trim().to_owned())
    }

    /// Sends `command`, waits for the answer `word N`; N.
    fn ask(&mut self, command: &str, word: &str) -> anyhow::Result<u64> {
        writeln!(self.stdin()?, "{command}")?;
        self.stdin()?.flush()?;
        Ok(self.expect(word)?.parse()?)
    }

    /// Ends its input and waits for it to disconnect and exit.
    fn finish(mut self) -> anyhow::Result<()> {
        drop(self.child.stdin.take());
        let status = self.child.wait()?;
        ensure!(
            status.success(),
            "the russh client exited with {status}; {}:\n{}",
            self.log.display(),
            fs::read_to_string(&self.log).unwrap_or_default()
        );
        Ok(())
    }
}

impl Drop for RusshClient {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
