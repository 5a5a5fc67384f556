//! The SFTP target: the backup server over SSH with `ssh2` (libssh2 1.11): public-key
//! authentication, a pinned server host key (an unknown key is refused), AES-GCM preferred
//! (AES-NI), and 1 MiB writes. All calls block: run them on a dedicated thread. Every call
//! that waits for the server is watched ([`watchdog`]): one that makes no progress for
//! `io_timeout_seconds` fails with [`TargetError::Stalled`], whatever libssh2 does.
//!
//! A partial upload is a hidden `.<name>.<job>.<attempt>.partial` file, created read-only
//! and exclusively; a commit is a rename without overwrite. [`rsync`] gives the
//! differential datastores their mirrors over the same server's SSH.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use ssh2::{ErrorCode, OpenFlags, OpenType, RenameFlags, Session, Sftp};

use crate::chunk::READ_CHUNK_BYTES;
use crate::config::TargetConfigError;
use crate::leftovers::{self, Entry};
use crate::{
    Aborter, Leftover, MaintainSession, Mirror, PartialFate, ReadSession, Staged, Target,
    TargetError, WriteSession, now_seconds,
};
use ferry_core::layout::StoredFile;
use watchdog::Watchdog;

pub mod rsync;
pub mod watchdog;

/// `kind = "sftp"`: `[backup_server]` in the agent config, `[maintenance]` in the
/// coordinator's.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftpConfig {
    /// Host name or address.
    pub host: String,
    /// SSH port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// SSH user (a dedicated one; not Debian's `backup`).
    pub user: String,
    /// This agent's SSH private key (OpenSSH format, no passphrase), mode 0600 or 0400.
    pub private_key_file: PathBuf,
    /// The server's public host key as in its `.pub` file or `known_hosts`:
    /// `ssh-ed25519 AAAA...` (a trailing comment is ignored).
    pub host_key: String,
    /// Absolute root of the layout on the server, e.g. `/srv/ferry`.
    pub root: String,
    /// TCP connect timeout, seconds.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_seconds: u64,
    /// A call on the backup server (the handshake, a read, a write, a rename) that makes
    /// no progress for this long fails the attempt: the agent shuts the connection down
    /// (seconds; 0 counts as 1).
    #[serde(default = "default_io_timeout")]
    pub io_timeout_seconds: u64,
    /// Upper bound on this agent's upload rate to the backup server, bytes per second
    /// (SFTP uploads, and rsync's `--bwlimit` for mirrors and pgBackRest repositories), so
    /// a backup does not saturate a production host's uplink. Unlimited if absent.
    pub max_upload_bytes_per_second: Option<u64>,
    /// `[backup_server.rsync]`: another login for the differential datastores (rsync
    /// mirrors, pgBackRest repositories), which need `rsync --server` where the SFTP
    /// login is confined to `internal-sftp`. On the server its key is typically forced to
    /// `rrsync -wo -absolute <root>/<environment>` (production) or `rrsync -ro ...`
    /// (staging). The SFTP login is used if absent.
    #[serde(default)]
    pub rsync: Option<RsyncLogin>,
}

/// `[backup_server.rsync]`: the SSH login rsync uses (same host, port and host key).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RsyncLogin {
    /// SSH user.
    pub user: String,
    /// Its private key (OpenSSH format, no passphrase), mode 0600 or 0400.
    pub private_key_file: PathBuf,
    /// The layout's root as this login sees it (the SFTP login may be chrooted);
    /// `backup_server.root` if absent.
    pub root: Option<String>,
}

fn default_port() -> u16 {
    22
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_io_timeout() -> u64 {
    120
}

/// OpenSSH-style fingerprint of a host key blob: `SHA256:` + unpadded base64.
pub fn fingerprint(blob: &[u8]) -> String {
    format!("SHA256:{}", STANDARD_NO_PAD.encode(Sha256::digest(blob)))
}

impl SftpConfig {
    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The pinned key: (type, blob).
    fn pinned(&self) -> Result<(String, Vec<u8>), TargetConfigError> {
        let mut fields = self.host_key.split_whitespace();
        let (Some(kind), Some(b64)) = (fields.next(), fields.next()) else {
            return Err(TargetConfigError::HostKey {
                message: "expected `<type> <base64>`, e.g. the server's \
                          ssh_host_ed25519_key.pub line"
                    .into(),
            });
        };
        let blob = STANDARD
            .decode(b64)
            .map_err(|e| TargetConfigError::HostKey {
                message: format!("the key is not valid base64: {e}"),
            })?;
        Ok((kind.to_owned(), blob))
    }

    /// Checks the fields that can be checked locally.
    ///
    /// # Errors
    /// [`TargetConfigError`] naming the field ([`TargetConfigError::field`]) and what is
    /// wrong with it.
    pub fn validate(&self) -> Result<(), TargetConfigError> {
        if self.host.is_empty() {
            return Err(TargetConfigError::Empty { field: "host" });
        }
        if !self.root.starts_with('/') || self.root.split('/').any(|c| c == ".." || c == ".") {
            return Err(TargetConfigError::Path {
                field: "root",
                message: format!(
                    "{:?} must be an absolute path without . or .. components",
                    self.root
                ),
            });
        }
        self.pinned()?;
        ferry_core::secrets::read_secret_file(&self.private_key_file).map_err(|source| {
            TargetConfigError::Secret {
                field: "private_key_file",
                source,
            }
        })?;
        if let Some(r) = &self.rsync {
            if r.user.is_empty() {
                return Err(TargetConfigError::Empty {
                    field: "rsync.user",
                });
            }
            // Without --protect-args (rrsync refuses it) the remote shell splits paths:
            // plain characters only.
            let root = r.root.as_deref().unwrap_or(&self.root);
            let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+@".contains(c);
            if !root.starts_with('/')
                || root.split('/').any(|c| c == ".." || c == ".")
                || !root.chars().all(plain)
            {
                return Err(TargetConfigError::Path {
                    field: "rsync.root",
                    message: format!(
                        "{root:?} must be an absolute path without . or .. components, of \
                         letters, digits and / . _ - + @ only"
                    ),
                });
            }
            ferry_core::secrets::read_secret_file(&r.private_key_file).map_err(|source| {
                TargetConfigError::Secret {
                    field: "rsync.private_key_file",
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// The login rsync uses: `(user, private key, root)`, from `[backup_server.rsync]`
    /// or else the SFTP login's.
    pub fn rsync_login(&self) -> (&str, &Path, &str) {
        match &self.rsync {
            Some(r) => (
                &r.user,
                &r.private_key_file,
                r.root.as_deref().unwrap_or(&self.root),
            ),
            None => (&self.user, &self.private_key_file, &self.root),
        }
    }

    /// Connects, checks the host key against the pinned one, authenticates with the
    /// private key and opens SFTP. From the TCP connection on, every call is watched: one
    /// that makes no progress for `io_timeout_seconds` fails.
    ///
    /// # Errors
    /// [`TargetError::Connect`], [`TargetError::HostKey`], [`TargetError::Auth`],
    /// [`TargetError::Stalled`].
    pub fn connect(&self) -> Result<SftpSession, TargetError> {
        let addr = self.addr();
        let connect_err = |message: String| TargetError::Connect {
            addr: addr.clone(),
            message,
        };
        let sock = addr
            .to_socket_addrs()
            .map_err(|e| connect_err(format!("cannot resolve: {e}")))?
            .next()
            .ok_or_else(|| connect_err("name resolves to no address".into()))?;
        let tcp =
            TcpStream::connect_timeout(&sock, Duration::from_secs(self.connect_timeout_seconds))
                .map_err(|e| connect_err(e.to_string()))?;
        let io_timeout = Duration::from_secs(self.io_timeout_seconds.max(1));
        tcp.set_nodelay(true).ok();
        let watch = tcp
            .try_clone()
            .and_then(|socket| Watchdog::start(socket, &addr, io_timeout))
            .map_err(|e| connect_err(format!("cannot watch the connection: {e}")))?;
        let busy = watch.busy();
        // The watchdog fails a stalled call; libssh2's own timeout only backs it up.
        let stalled = |op: &'static str, other: TargetError| match watch.fired() {
            Some(limit) => TargetError::Stalled {
                addr: addr.clone(),
                op,
                path: String::new(),
                seconds: limit.as_secs(),
            },
            None => other,
        };

        let mut session = Session::new().map_err(|e| connect_err(e.to_string()))?;
        session.set_tcp_stream(tcp);
        session.set_timeout(millis(io_timeout * BACKSTOP_TIMEOUTS));
        // chacha20-poly1305 first, then AES-CTR, AES-GCM last: through libssh2 1.11, GCM
        // costs the most CPU of the three (it calls the cipher once per 16-byte block),
        // whatever AES-NI does elsewhere. `bench/` ssh-transport, 1 GiB each way on
        // loopback: chacha20-poly1305 0.82× GCM's client CPU up, 0.76× down; aes128-ctr
        // 0.82× and 0.78× (bench/README.md, issue 20).
        let ciphers = "chacha20-poly1305@openssh.com,aes128-ctr,aes256-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com";
        let _ = session.method_pref(ssh2::MethodType::CryptCs, ciphers);
        let _ = session.method_pref(ssh2::MethodType::CryptSc, ciphers);
        let (kind, pinned) = self.pinned().map_err(|e| connect_err(e.to_string()))?;
        let _ = session.method_pref(ssh2::MethodType::HostKey, &kind);
        session.handshake().map_err(|e| {
            stalled(
                "SSH handshake",
                connect_err(format!("SSH handshake failed: {e}")),
            )
        })?;

        let (blob, _) = session
            .host_key()
            .ok_or_else(|| connect_err("the server presented no host key".into()))?;
        if blob != pinned.as_slice() {
            return Err(TargetError::HostKey {
                addr,
                expected: fingerprint(&pinned),
                found: fingerprint(blob),
            });
        }

        session
            .userauth_pubkey_file(&self.user, None, &self.private_key_file, None)
            .map_err(|e| {
                stalled(
                    "SSH authentication",
                    TargetError::Auth {
                        addr: addr.clone(),
                        user: self.user.clone(),
                        key: self.private_key_file.display().to_string(),
                        message: e.to_string(),
                    },
                )
            })?;
        let sftp = session.sftp().map_err(|e| {
            stalled(
                "start of SFTP",
                connect_err(format!("cannot start SFTP: {e}")),
            )
        })?;
        drop(busy);
        Ok(SftpSession {
            addr,
            root: self.root.trim_end_matches('/').to_owned(),
            sftp,
            limit: self.max_upload_bytes_per_second,
            io_timeout,
            held: Vec::new(),
            unremoved: Vec::new(),
            broken: false,
            session,
            watch,
        })
    }
}

/// An authenticated SFTP session on the backup server.
pub struct SftpSession {
    addr: String,
    root: String,
    sftp: Sftp,
    limit: Option<u64>,
    io_timeout: Duration,
    /// Hidden partial files this session wrote and has neither committed nor abandoned
    /// (never swept as abandoned).
    held: Vec<String>,
    /// Files it could not remove because its connection had failed or been aborted.
    unremoved: Vec<String>,
    /// Set when the connection itself failed (a timeout, a reset): clean-up is skipped.
    broken: bool,
    session: Session,
    /// Last: it watches the channel and the session as they close.
    watch: Watchdog,
}

impl Drop for SftpSession {
    fn drop(&mut self) {
        // Closing the SFTP channel waits for the server's answer: on a dead link, only
        // briefly. Staged partials stay: the pipeline commits them on another session, or
        // abandons them.
        self.watch.closing(CLEANUP_TIMEOUT);
        self.session.set_timeout(millis(CLEANUP_TIMEOUT));
    }
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// Paces writes to at most `rate` bytes per second on average since `start`: returns how
/// long to wait after `sent` bytes.
fn pace(rate: u64, sent: u64, elapsed: Duration) -> Duration {
    let due = Duration::from_secs_f64(sent as f64 / rate.max(1) as f64);
    due.saturating_sub(elapsed)
}

/// SFTP status `SSH_FX_NO_SUCH_FILE`.
const FX_NO_SUCH_FILE: i32 = 2;

/// SFTP status `SSH_FX_PERMISSION_DENIED`.
const FX_PERMISSION_DENIED: i32 = 3;

/// Free space under which a failed write is reported as a full disk, bytes (4 MiB: four
/// chunks written).
const FULL_BELOW_BYTES: u64 = 4 * 1024 * 1024;

/// How long removing a failed upload's partial file may take when the session closes (on
/// a link that just failed, it cannot; the next upload sweeps it).
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(2);

/// A partial file untouched for this many I/O timeouts is abandoned (its writer would
/// have failed by then) and may be removed by the next upload.
const STALE_AFTER_TIMEOUTS: u32 = 2;

/// libssh2's own session timeout, in I/O timeouts: only a backstop behind the watchdog.
const BACKSTOP_TIMEOUTS: u32 = 2;

fn is_not_found(e: &ssh2::Error) -> bool {
    matches!(e.code(), ErrorCode::SFTP(FX_NO_SUCH_FILE))
}

/// Why the server refused to remove a file, in words.
fn refusal(e: &ssh2::Error) -> String {
    match e.code() {
        ErrorCode::SFTP(FX_PERMISSION_DENIED) => {
            "the server answered permission denied: this key may not delete files".into()
        }
        _ => e.to_string(),
    }
}

impl SftpSession {
    /// The error for `op` on `path` that failed with `e`: [`TargetError::Stalled`] if
    /// the watchdog closed the connection, else [`TargetError::Io`].
    fn err(&self, op: &'static str, path: &str, e: impl std::fmt::Display) -> TargetError {
        if self.watch.aborted() {
            return TargetError::Io {
                addr: self.addr.clone(),
                op,
                path: path.to_owned(),
                message: "the job was cancelled, so the agent closed the connection".into(),
            };
        }
        if let Some(limit) = self.watch.fired() {
            return TargetError::Stalled {
                addr: self.addr.clone(),
                op,
                path: path.to_owned(),
                seconds: limit.as_secs(),
            };
        }
        TargetError::Io {
            addr: self.addr.clone(),
            op,
            path: path.to_owned(),
            message: e.to_string(),
        }
    }

    /// Whether the connection failed or was aborted (clean-up would only wait).
    fn is_broken(&self) -> bool {
        self.broken || self.watch.fired().is_some() || self.watch.aborted()
    }

    /// Creates `dir` and its missing parents below the root (the root must exist).
    ///
    /// # Errors
    /// [`TargetError::Io`] if a component cannot be created and is not a directory.
    fn mkdir_p(&mut self, dir: &str) -> Result<(), TargetError> {
        let _busy = self.watch.busy();
        let rel = dir
            .strip_prefix(&self.root)
            .ok_or_else(|| self.err("mkdir", dir, "is outside the configured root"))?;
        let mut path = self.root.clone();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            path.push('/');
            path.push_str(part);
            if let Err(e) = self.sftp.mkdir(Path::new(&path), 0o750) {
                match self.sftp.stat(Path::new(&path)) {
                    Ok(st) if st.is_dir() => {}
                    _ => return Err(self.err("mkdir", &path, e)),
                }
            }
            self.watch.progress();
        }
        Ok(())
    }

    /// Removes the file at `path`; returns its size from `stat`, bytes.
    fn unlink_counted(&mut self, path: &Path, stat: &ssh2::FileStat) -> Result<u64, TargetError> {
        self.sftp
            .unlink(path)
            .map_err(|e| self.err("unlink", &path.display().to_string(), e))?;
        self.watch.progress();
        Ok(stat.size.unwrap_or(0))
    }

    /// Removes `path` if the link still works; what became of it. A file that is already
    /// gone counts as removed.
    fn discard(&mut self, path: &str) -> PartialFate {
        self.held.retain(|h| h != path);
        if self.is_broken() {
            self.unremoved.push(path.to_owned());
            return PartialFate::Kept("the connection to the backup server failed".into());
        }
        let _busy = self.watch.busy();
        match self.sftp.unlink(Path::new(path)) {
            Ok(()) => PartialFate::Removed,
            Err(e) if is_not_found(&e) => PartialFate::Removed,
            Err(e) if self.is_broken() => {
                tracing::warn!(path, error = %e, "Could not remove a file of a failed upload.");
                self.unremoved.push(path.to_owned());
                PartialFate::Kept("the connection to the backup server failed".into())
            }
            Err(e) => {
                tracing::warn!(path, error = %e, "Could not remove a file of a failed upload.");
                PartialFate::Kept(refusal(&e))
            }
        }
    }

    /// Removes the partial files that earlier, failed uploads of `file`'s datastore
    /// left in its directory (a host that died, a link that went down): those of the
    /// same job (an earlier attempt), and any untouched for [`STALE_AFTER_TIMEOUTS`] I/O
    /// timeouts; never one this session holds. Returns how many were removed.
    fn sweep_partials(&mut self, file: &StoredFile, job_id: &str) -> usize {
        let _busy = self.watch.busy();
        let prefix = format!(
            ".{}",
            file.name.split("_backup_").next().unwrap_or(&file.name)
        );
        let Ok(entries) = self.sftp.readdir(Path::new(&file.dir)) else {
            return 0;
        };
        let now = now_seconds();
        let stale = (self.io_timeout * STALE_AFTER_TIMEOUTS).as_secs();
        let mut removed = 0;
        for (path, stat) in entries {
            let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            if !(name.starts_with(&format!("{prefix}_backup_")) && name.ends_with(".partial")) {
                continue;
            }
            let full = format!("{}/{name}", file.dir);
            if self.held.contains(&full) {
                continue;
            }
            let ours = name.contains(&format!(".{job_id}."));
            let idle = now.saturating_sub(stat.mtime.unwrap_or(0));
            if ours || idle >= stale {
                tracing::info!(path = %full, idle_seconds = idle, "Removing an abandoned partial upload.");
                if self.discard(&full) == PartialFate::Removed {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// The error for a failed write of `path`: [`TargetError::NoSpace`] if the server
    /// answered and its file system is (nearly) full (OpenSSH's sftp-server reports
    /// `ENOSPC` as a bare `SSH_FX_FAILURE`, so the agent asks `statvfs@openssh.com`),
    /// else [`TargetError::Io`] or [`TargetError::Stalled`]. A timeout, or a
    /// server that no longer answers, marks the session broken.
    fn write_err(&mut self, remote: &mut ssh2::File, path: &str, e: std::io::Error) -> TargetError {
        // ssh2 turns its errors into io::Error by message: the SFTP status is lost.
        if e.kind() == std::io::ErrorKind::TimedOut || self.watch.fired().is_some() {
            self.broken = true;
            self.watch.shut_down();
            return self.err("write", path, e);
        }
        match remote.statvfs() {
            Ok(vfs) => {
                let free_bytes = vfs.f_bavail.saturating_mul(vfs.f_frsize);
                tracing::debug!(
                    path,
                    free_bytes,
                    "A write failed; the server has this much room."
                );
                if free_bytes < FULL_BELOW_BYTES {
                    return TargetError::NoSpace {
                        addr: self.addr.clone(),
                        path: path.to_owned(),
                        free_bytes,
                        partial: PartialFate::Unknown,
                    };
                }
            }
            Err(_) => self.broken = true,
        }
        self.err("write", path, e)
    }

    /// Writes all of `buf` to `remote`, recording progress after each piece the server
    /// took.
    fn write_all(
        &mut self,
        remote: &mut ssh2::File,
        path: &str,
        buf: &[u8],
    ) -> Result<(), TargetError> {
        let mut at = 0;
        while at < buf.len() {
            match remote.write(&buf[at..]) {
                Ok(0) => {
                    let e = std::io::Error::new(std::io::ErrorKind::WriteZero, "wrote nothing");
                    return Err(self.write_err(remote, path, e));
                }
                Ok(n) => {
                    at += n;
                    self.watch.progress();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.write_err(remote, path, e)),
            }
        }
        Ok(())
    }

    /// Streams `chunks` into `remote` (the partial at `path`) until the sender hangs up,
    /// paced to the configured rate; then asks the server to flush the file and checks
    /// its size. Returns the bytes written.
    fn write_partial(
        &mut self,
        remote: &mut ssh2::File,
        path: &str,
        chunks: &Receiver<Vec<u8>>,
    ) -> Result<u64, TargetError> {
        let mut sent = 0u64;
        let started = Instant::now();
        loop {
            let next = {
                // Waiting for the pipeline (a slow dump) is not a stalled server.
                let _idle = self.watch.idle();
                chunks.recv()
            };
            let Ok(chunk) = next else { break };
            match self.limit {
                None => self.write_all(remote, path, &chunk)?,
                Some(rate) => {
                    // Pieces of a tenth of a second's worth, each written when it is due.
                    let piece = usize::try_from(rate / 10).unwrap_or(usize::MAX).max(4096);
                    for (i, part) in chunk.chunks(piece).enumerate() {
                        let before = sent + (i * piece) as u64;
                        let wait = pace(rate, before, started.elapsed());
                        if !wait.is_zero() {
                            let _idle = self.watch.idle();
                            std::thread::sleep(wait);
                        }
                        self.write_all(remote, path, part)?;
                    }
                }
            }
            sent += chunk.len() as u64;
            crate::chunk::recycle(chunk);
        }
        // fsync@openssh.com where the server has it; a server without it still commits.
        let _ = remote.fsync();
        let found = remote
            .stat()
            .map_err(|e| self.err("stat", path, e))?
            .size
            .unwrap_or(0);
        if found != sent {
            return Err(TargetError::SizeMismatch {
                addr: self.addr.clone(),
                path: path.to_owned(),
                sent,
                found,
            });
        }
        Ok(sent)
    }

    /// [`WriteSession::stage`], sweeping the datastore's abandoned partials first if `sweep`.
    fn stage_file(
        &mut self,
        file: &StoredFile,
        job_id: &str,
        chunks: Receiver<Vec<u8>>,
        sweep: bool,
    ) -> Result<Staged, TargetError> {
        let _busy = self.watch.busy();
        self.mkdir_p(&file.dir)?;
        let final_path = file.path();
        if self.exists(&final_path)? {
            return Err(TargetError::Exists {
                addr: self.addr.clone(),
                path: final_path,
            });
        }
        if sweep {
            self.sweep_partials(file, job_id);
        }
        // Unique per attempt: an earlier attempt's partial that could not be removed
        // (add-only key) never blocks a retry.
        let attempt = format!(
            "{job_id}.{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_micros()
        );
        let partial = format!("{}/{}", file.dir, file.partial_name(&attempt));
        // Read-only from the start: the handle stays writable, the file never is.
        let mut remote = self
            .sftp
            .open_mode(
                Path::new(&partial),
                OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::EXCLUSIVE,
                0o440,
                OpenType::File,
            )
            .map_err(|e| self.err("create", &partial, e))?;
        self.held.push(partial.clone());
        let written = self.write_partial(&mut remote, &partial, &chunks);
        drop(remote);
        drop(chunks);
        match written {
            Ok(bytes) => Ok(Staged {
                file: file.clone(),
                partial,
                bytes,
            }),
            Err(mut e) => {
                let fate = self.discard(&partial);
                tracing::info!(path = %partial, fate = %fate, "A failed upload's partial file.");
                if let TargetError::NoSpace { partial, .. } = &mut e {
                    *partial = fate;
                }
                Err(e)
            }
        }
    }

    /// Renames the new file `from` to `to`, which must not exist.
    fn rename_new(&mut self, from: &str, to: &str) -> Result<(), TargetError> {
        // SSH_FXP_RENAME without OVERWRITE: OpenSSH refuses if the target exists.
        self.sftp
            .rename(
                Path::new(from),
                Path::new(to),
                Some(RenameFlags::ATOMIC | RenameFlags::NATIVE),
            )
            .map_err(|e| self.err("rename", from, e))?;
        self.watch.progress();
        Ok(())
    }
}

impl WriteSession for SftpSession {
    fn stage(
        &mut self,
        file: &StoredFile,
        job_id: &str,
        chunks: Receiver<Vec<u8>>,
    ) -> Result<Staged, TargetError> {
        self.stage_file(file, job_id, chunks, true)
    }

    fn commit(&mut self, job_id: &str, parts: &[(Staged, Vec<u8>)]) -> Result<(), TargetError> {
        let _busy = self.watch.busy();
        let data: Vec<Staged> = parts.iter().map(|(s, _)| s.clone()).collect();
        // 1. Every manifest as a hidden partial: still nothing under a final name.
        let mut manifests = Vec::new();
        for (part, json) in parts {
            let file = StoredFile {
                dir: part.file.dir.clone(),
                name: format!("{}.json", part.file.name),
            };
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let _ = tx.send(json.clone());
            drop(tx);
            match self.stage_file(&file, job_id, rx, false) {
                Ok(s) => manifests.push(s),
                Err(e) => {
                    let staged: Vec<String> = data
                        .iter()
                        .chain(&manifests)
                        .map(|s| s.partial.clone())
                        .collect();
                    self.abandon(&staged);
                    return Err(TargetError::Commit {
                        source: Box::new(e),
                        left: Vec::new(),
                        unsure: None,
                    });
                }
            }
        }
        // 2. The data parts, then 3. their manifests, the main part's last: a reader takes
        // a backup for one only from its main part's manifest, so an interruption at any
        // step leaves nothing a reader takes for a backup.
        let order: Vec<Staged> = data.into_iter().chain(manifests).collect();
        let mut placed: Vec<String> = Vec::new();
        for (i, s) in order.iter().enumerate() {
            let to = s.file.path();
            if let Err(e) = self.rename_new(&s.partial, &to) {
                let unsure = self.is_broken().then(|| to.clone());
                // Undo what was put in place, newest first, where this key may delete.
                let mut left = Vec::new();
                for path in placed.iter().rev() {
                    if self.discard(path) != PartialFate::Removed {
                        left.push(path.clone());
                    }
                }
                left.reverse();
                for rest in &order[i..] {
                    let _ = self.discard(&rest.partial);
                }
                tracing::warn!(
                    left = ?left,
                    "The commit of a backup failed; what could not be undone is left without the manifest that completes it."
                );
                return Err(TargetError::Commit {
                    source: Box::new(e),
                    left,
                    unsure,
                });
            }
            self.held.retain(|h| h != &s.partial);
            placed.push(to);
        }
        Ok(())
    }

    fn abandon(&mut self, partials: &[String]) -> Vec<PartialFate> {
        partials.iter().map(|p| self.discard(p)).collect()
    }

    fn exists(&mut self, path: &str) -> Result<bool, TargetError> {
        let _busy = self.watch.busy();
        match self.sftp.lstat(Path::new(path)) {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(self.err("stat", path, e)),
        }
    }

    fn read_back(&mut self, path: &str, max: u64) -> Result<Option<Vec<u8>>, TargetError> {
        // A production key may read what it added (internal-sftp without -R).
        if !WriteSession::exists(self, path)? {
            return Ok(None);
        }
        ReadSession::read_small(self, path, max).map(Some)
    }

    fn aborter(&self) -> Aborter {
        let watch = self.watch.aborter();
        Aborter::new(move || watch.abort())
    }

    fn aborted(&self) -> bool {
        self.watch.aborted()
    }

    fn take_unremoved(&mut self) -> Vec<String> {
        std::mem::take(&mut self.unremoved)
    }
}

impl MaintainSession for SftpSession {
    fn remove_archived_file(
        &mut self,
        environment: &str,
        datastore: &str,
        file: &crate::ArchivedFile,
    ) -> Result<u64, TargetError> {
        let _busy = self.watch.busy();
        let Some((data, record)) =
            crate::archived_file_paths(&self.root, environment, datastore, file)
        else {
            return Err(self.err("remove", file.name(), "not an archived file of the layout"));
        };
        let mut bytes = 0;
        for path in [data, record] {
            let stat = match self.sftp.lstat(Path::new(&path)) {
                Ok(stat) => stat,
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(self.err("stat", &path, e)),
            };
            let removed = self.unlink_counted(Path::new(&path), &stat)?;
            if bytes == 0 {
                bytes = removed;
            }
        }
        Ok(bytes)
    }

    fn remove_dated_folder(
        &mut self,
        environment: &str,
        date: &str,
    ) -> Result<(u64, u64), TargetError> {
        let _busy = self.watch.busy();
        let dir = format!("{}/{environment}/{date}", self.root);
        if !ferry_core::layout::holds_dated_folders(environment)
            || ferry_core::layout::parse_date(date).is_err()
        {
            return Err(self.err("remove", &dir, "not a dated folder of the layout"));
        }
        let entries = self
            .sftp
            .readdir(Path::new(&dir))
            .map_err(|e| self.err("readdir", &dir, e))?;
        let (mut files, mut bytes) = (0u64, 0u64);
        for (path, stat) in &entries {
            if !stat.is_file() {
                return Err(self.err(
                    "remove",
                    &path.display().to_string(),
                    "a dated folder holds files only; this is not one; nothing more removed",
                ));
            }
        }
        for (path, stat) in entries {
            bytes += self.unlink_counted(&path, &stat)?;
            files += 1;
        }
        self.sftp
            .rmdir(Path::new(&dir))
            .map_err(|e| self.err("rmdir", &dir, e))?;
        Ok((files, bytes))
    }

    fn leftovers(&mut self, environment: &str) -> Result<Vec<Leftover>, TargetError> {
        let _busy = self.watch.busy();
        let env_dir = format!("{}/{environment}", self.root);
        if ferry_core::layout::validate_name("environment", environment).is_err() {
            return Err(self.err("list", &env_dir, "not an environment of the layout"));
        }
        let folders = match self.sftp.readdir(Path::new(&env_dir)) {
            Ok(f) => f,
            Err(e) if is_not_found(&e) => return Ok(Vec::new()),
            Err(e) => return Err(self.err("readdir", &env_dir, e)),
        };
        let now = now_seconds();
        let mut out = Vec::new();
        for (folder, stat) in folders {
            let Some(date) = folder
                .file_name()
                .and_then(|n| n.to_str())
                .filter(|n| ferry_core::layout::parse_date(n).is_ok())
                .map(str::to_owned)
            else {
                continue;
            };
            if !stat.is_dir() {
                continue;
            }
            let dir = folder.display().to_string();
            let entries = self
                .sftp
                .readdir(&folder)
                .map_err(|e| self.err("readdir", &dir, e))?;
            self.watch.progress();
            let files: Vec<Entry> = entries
                .into_iter()
                .filter(|(_, st)| st.is_file())
                .filter_map(|(p, st)| {
                    p.file_name().and_then(|n| n.to_str()).map(|n| Entry {
                        name: n.to_owned(),
                        size: st.size.unwrap_or(0),
                        mtime: st.mtime,
                    })
                })
                .collect();
            out.extend(leftovers::classify(
                environment,
                &date,
                &dir,
                &files,
                now,
                |path| {
                    self.read_small(path, ferry_core::manifest::MAX_MANIFEST_BYTES)
                        .ok()
                        .and_then(|b| ferry_core::manifest::Manifest::from_slice(path, &b).ok())
                },
            ));
        }
        Ok(out)
    }

    fn extend_lock(
        &mut self,
        _path: &str,
        _until: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), TargetError> {
        Err(TargetError::Unsupported {
            addr: self.addr.clone(),
            kind: "sftp",
            what: "an object lock",
        })
    }

    fn remove_leftover(&mut self, leftover: &Leftover) -> Result<u64, TargetError> {
        let _busy = self.watch.busy();
        if !leftovers::removable(&self.root, leftover) {
            return Err(self.err(
                "remove",
                &leftover.path,
                "not a file of a dated folder of the layout",
            ));
        }
        for path in std::iter::once(&leftover.path).chain(&leftover.manifest) {
            match self.sftp.unlink(Path::new(path)) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.err("unlink", path, e)),
            }
        }
        Ok(leftover.size)
    }
}

impl ReadSession for SftpSession {
    fn list(&mut self, dir: &str) -> Result<Vec<String>, TargetError> {
        let _busy = self.watch.busy();
        match self.sftp.readdir(Path::new(dir)) {
            Ok(entries) => Ok(entries
                .into_iter()
                .filter_map(|(p, _)| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .filter(|n| n != "." && n != "..")
                .collect()),
            Err(e) if is_not_found(&e) => Ok(Vec::new()),
            Err(e) => Err(self.err("list", dir, e)),
        }
    }

    fn size(&mut self, path: &str) -> Result<Option<u64>, TargetError> {
        match self.sftp.stat(Path::new(path)) {
            Ok(stat) => Ok(Some(stat.size.unwrap_or(0))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.err("stat", path, e)),
        }
    }

    fn read_small(&mut self, path: &str, max: u64) -> Result<Vec<u8>, TargetError> {
        let _busy = self.watch.busy();
        let mut f = self
            .sftp
            .open(Path::new(path))
            .map_err(|e| self.err("open", path, e))?;
        let size = f
            .stat()
            .map_err(|e| self.err("stat", path, e))?
            .size
            .unwrap_or(0);
        if size > max {
            return Err(TargetError::TooLarge {
                addr: self.addr.clone(),
                path: path.to_owned(),
                size,
                max,
            });
        }
        let mut out = Vec::with_capacity(size as usize);
        Read::by_ref(&mut f)
            .take(max + 1)
            .read_to_end(&mut out)
            .map_err(|e| self.err("read", path, e))?;
        if out.len() as u64 > max {
            return Err(TargetError::TooLarge {
                addr: self.addr.clone(),
                path: path.to_owned(),
                size: out.len() as u64,
                max,
            });
        }
        Ok(out)
    }

    fn download(&mut self, path: &str, chunks: SyncSender<Vec<u8>>) -> Result<u64, TargetError> {
        let _busy = self.watch.busy();
        let mut f = self
            .sftp
            .open(Path::new(path))
            .map_err(|e| self.err("open", path, e))?;
        let mut total = 0u64;
        loop {
            let mut buf = crate::chunk::read_buffer();
            buf.resize(READ_CHUNK_BYTES, 0);
            let mut filled = 0;
            while filled < READ_CHUNK_BYTES {
                let n = f
                    .read(&mut buf[filled..])
                    .map_err(|e| self.err("read", path, e))?;
                if n == 0 {
                    break;
                }
                filled += n;
                self.watch.progress();
            }
            if filled == 0 {
                return Ok(total);
            }
            buf.truncate(filled);
            total += filled as u64;
            // Waiting for a slow reader (a restore tool) is not a stalled server.
            let _idle = self.watch.idle();
            if chunks.send(buf).is_err() {
                return Ok(total);
            }
        }
    }
}

/// The SFTP backup server as a [`Target`]: each session is a connection of its own
/// ([`SftpConfig::connect`]); write, read and maintain differ only by the key the
/// configuration gives (the server confines each key).
#[derive(Clone, Debug)]
pub struct SftpTarget {
    config: SftpConfig,
}

impl SftpTarget {
    /// The target of a validated `config` ([`SftpConfig::validate`]).
    pub fn new(config: SftpConfig) -> SftpTarget {
        SftpTarget { config }
    }

    /// Its configuration.
    pub fn config(&self) -> &SftpConfig {
        &self.config
    }
}

impl Target for SftpTarget {
    fn kind(&self) -> &'static str {
        "sftp"
    }

    fn describe(&self) -> String {
        format!(
            "{}@{}:{}",
            self.config.user, self.config.host, self.config.port
        )
    }

    fn environment_dir(&self, environment: &str) -> String {
        ferry_core::layout::environment_dir(self.config.root.trim_end_matches('/'), environment)
    }

    fn write(&self) -> Result<Box<dyn WriteSession>, TargetError> {
        Ok(Box::new(self.config.connect()?))
    }

    fn read(&self) -> Result<Box<dyn ReadSession>, TargetError> {
        Ok(Box::new(self.config.connect()?))
    }

    fn maintain(&self) -> Result<Box<dyn MaintainSession>, TargetError> {
        Ok(Box::new(self.config.connect()?))
    }

    fn mirror(&self) -> Result<Box<dyn Mirror>, TargetError> {
        let remote = rsync::Remote::new(&self.config).map_err(|e| TargetError::Io {
            addr: self.config.addr(),
            op: "set up rsync (a temporary known_hosts file)",
            path: std::env::temp_dir().display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Box::new(remote))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_waits_until_the_bytes_are_due() {
        assert_eq!(pace(1000, 500, Duration::ZERO), Duration::from_millis(500));
        assert_eq!(pace(1000, 500, Duration::from_secs(1)), Duration::ZERO);
        assert_eq!(pace(0, 0, Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn a_server_that_accepts_and_never_answers_fails_the_handshake_within_the_io_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accepts, then says nothing (a stopped sshd's child would do the same).
        let server = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let config = SftpConfig {
            host: "127.0.0.1".into(),
            port,
            user: "nobody".into(),
            private_key_file: PathBuf::from("/nonexistent"),
            host_key:
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
                    .into(),
            root: "/srv/ferry".into(),
            connect_timeout_seconds: 5,
            io_timeout_seconds: 1,
            max_upload_bytes_per_second: None,
            rsync: None,
        };
        let started = Instant::now();
        let e = config
            .connect()
            .err()
            .expect("the handshake cannot succeed");
        let took = started.elapsed();
        let _socket = server.join().unwrap();
        assert!(matches!(e, TargetError::Stalled { .. }), "{e}");
        let text = e.to_string();
        assert!(text.contains("127.0.0.1") && text.contains("1 s"), "{text}");
        assert!(took < Duration::from_secs(4), "took {took:?}");
    }
}
