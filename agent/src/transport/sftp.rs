//! SFTP transport over SSH with `ssh2` (libssh2 1.11): public-key authentication, a
//! pinned server host key (an unknown key is refused), AES-GCM preferred (AES-NI), and
//! 1 MiB writes. All calls block: run them on a dedicated thread.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use ssh2::{ErrorCode, OpenFlags, OpenType, RenameFlags, Session, Sftp};

use super::{Downloader, TransportError, Uploader};
use crate::layout::StoredFile;
use crate::pipeline::chunks::CHUNK_BYTES;

/// `[backup_server]` in the agent config.
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
    /// A read or write that makes no progress for this long fails the job, seconds.
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
    fn pinned(&self) -> Result<(String, Vec<u8>), String> {
        let mut fields = self.host_key.split_whitespace();
        let (Some(kind), Some(b64)) = (fields.next(), fields.next()) else {
            return Err(
                "expected `<type> <base64>`, e.g. the server's ssh_host_ed25519_key.pub line"
                    .into(),
            );
        };
        let blob = STANDARD
            .decode(b64)
            .map_err(|e| format!("the key is not valid base64: {e}"))?;
        Ok((kind.to_owned(), blob))
    }

    /// Checks the fields that can be checked locally: `(field, message)` on failure.
    ///
    /// # Errors
    /// The field name and what is wrong with it.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.host.is_empty() {
            return Err(("host", "must not be empty".into()));
        }
        if !self.root.starts_with('/') || self.root.split('/').any(|c| c == ".." || c == ".") {
            return Err((
                "root",
                format!(
                    "{:?} must be an absolute path without . or .. components",
                    self.root
                ),
            ));
        }
        self.pinned().map_err(|m| ("host_key", m))?;
        crate::config::read_secret_file(&self.private_key_file)
            .map_err(|m| ("private_key_file", m))?;
        if let Some(r) = &self.rsync {
            if r.user.is_empty() {
                return Err(("rsync.user", "must not be empty".into()));
            }
            // Without --protect-args (rrsync refuses it) the remote shell splits paths:
            // plain characters only.
            let root = r.root.as_deref().unwrap_or(&self.root);
            let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+@".contains(c);
            if !root.starts_with('/')
                || root.split('/').any(|c| c == ".." || c == ".")
                || !root.chars().all(plain)
            {
                return Err((
                    "rsync.root",
                    format!(
                        "{root:?} must be an absolute path without . or .. components, of \
                         letters, digits and / . _ - + @ only"
                    ),
                ));
            }
            crate::config::read_secret_file(&r.private_key_file)
                .map_err(|m| ("rsync.private_key_file", m))?;
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
    /// private key and opens SFTP.
    ///
    /// # Errors
    /// [`TransportError::Connect`], [`TransportError::HostKey`], [`TransportError::Auth`].
    pub fn connect(&self) -> Result<SftpSession, TransportError> {
        let addr = self.addr();
        let connect_err = |message: String| TransportError::Connect {
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
        let io_timeout = Duration::from_secs(self.io_timeout_seconds);
        tcp.set_read_timeout(Some(io_timeout)).ok();
        tcp.set_write_timeout(Some(io_timeout)).ok();
        tcp.set_nodelay(true).ok();

        let mut session = Session::new().map_err(|e| connect_err(e.to_string()))?;
        session.set_tcp_stream(tcp);
        session.set_timeout(u32::try_from(io_timeout.as_millis()).unwrap_or(u32::MAX));
        // AES-GCM first: with AES-NI it is about twice chacha20-poly1305 here.
        let ciphers = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr,aes256-ctr,chacha20-poly1305@openssh.com";
        let _ = session.method_pref(ssh2::MethodType::CryptCs, ciphers);
        let _ = session.method_pref(ssh2::MethodType::CryptSc, ciphers);
        let (kind, pinned) = self.pinned().map_err(connect_err)?;
        let _ = session.method_pref(ssh2::MethodType::HostKey, &kind);
        session
            .handshake()
            .map_err(|e| connect_err(format!("SSH handshake failed: {e}")))?;

        let (blob, _) = session
            .host_key()
            .ok_or_else(|| connect_err("the server presented no host key".into()))?;
        if blob != pinned.as_slice() {
            return Err(TransportError::HostKey {
                addr,
                expected: fingerprint(&pinned),
                found: fingerprint(blob),
            });
        }

        session
            .userauth_pubkey_file(&self.user, None, &self.private_key_file, None)
            .map_err(|e| TransportError::Auth {
                addr: addr.clone(),
                user: self.user.clone(),
                key: self.private_key_file.display().to_string(),
                message: e.to_string(),
            })?;
        let sftp = session
            .sftp()
            .map_err(|e| connect_err(format!("cannot start SFTP: {e}")))?;
        Ok(SftpSession {
            addr,
            root: self.root.trim_end_matches('/').to_owned(),
            sftp,
            limit: self.max_upload_bytes_per_second,
            io_timeout,
            partial: None,
            broken: false,
            _session: session,
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
    /// The partial file of the last upload, until it is renamed.
    partial: Option<String>,
    /// Set when the connection itself failed (a timeout, a reset): cleanup is skipped.
    broken: bool,
    _session: Session,
}

impl Drop for SftpSession {
    fn drop(&mut self) {
        // Closing the SFTP channel waits for the server's answer: on a dead link, only
        // briefly.
        let short = self.io_timeout.min(CLEANUP_TIMEOUT);
        self._session
            .set_timeout(u32::try_from(short.as_millis()).unwrap_or(u32::MAX));
    }
}

/// Paces writes to at most `rate` bytes per second on average since `start`: returns how
/// long to wait after `sent` bytes.
fn pace(rate: u64, sent: u64, elapsed: Duration) -> Duration {
    let due = Duration::from_secs_f64(sent as f64 / rate.max(1) as f64);
    due.saturating_sub(elapsed)
}

/// SFTP status `SSH_FX_NO_SUCH_FILE`.
const FX_NO_SUCH_FILE: i32 = 2;

/// Free space under which a failed write is reported as a full disk, bytes.
const FULL_BELOW_BYTES: u64 = 4 * CHUNK_BYTES as u64;

/// How long removing a failed upload's partial file may take (on a link that just
/// failed, it cannot; the next upload sweeps it).
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(2);

/// A partial file untouched for this many I/O timeouts is abandoned (its writer would
/// have failed by then) and may be removed by the next upload.
const STALE_AFTER_TIMEOUTS: u32 = 2;

fn is_not_found(e: &ssh2::Error) -> bool {
    matches!(e.code(), ErrorCode::SFTP(FX_NO_SUCH_FILE))
}

impl SftpSession {
    fn err(&self, op: &'static str, path: &str, e: impl std::fmt::Display) -> TransportError {
        TransportError::Sftp {
            addr: self.addr.clone(),
            op,
            path: path.to_owned(),
            message: e.to_string(),
        }
    }

    /// Creates `dir` and its missing parents below the root (the root must exist).
    ///
    /// # Errors
    /// [`TransportError::Sftp`] if a component cannot be created and is not a directory.
    pub fn mkdir_p(&mut self, dir: &str) -> Result<(), TransportError> {
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
        }
        Ok(())
    }

    /// Removes a dated folder `<root>/<environment>/<YYYY-MM-DD>` and the files in it (for
    /// retention, with a key allowed to delete). Anything else is refused: a path outside
    /// the root, a last component that is not a date, a subdirectory inside.
    ///
    /// # Errors
    /// [`TransportError::Sftp`] naming the path.
    pub fn remove_dated_folder(
        &mut self,
        environment: &str,
        date: &str,
    ) -> Result<(u64, u64), TransportError> {
        let dir = format!("{}/{environment}/{date}", self.root);
        if crate::layout::validate_name("environment", environment).is_err()
            || crate::layout::parse_date(date).is_err()
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

    /// Removes the file at `path`; returns its size from `stat`, bytes.
    fn unlink_counted(
        &mut self,
        path: &Path,
        stat: &ssh2::FileStat,
    ) -> Result<u64, TransportError> {
        self.sftp
            .unlink(path)
            .map_err(|e| self.err("unlink", &path.display().to_string(), e))?;
        Ok(stat.size.unwrap_or(0))
    }

    /// Removes the partial files abandoned in `environment`'s dated folders (uploads
    /// that failed where the agent's key may not delete): hidden `*.partial` files not
    /// modified for `older_than`. For `ferry prune` with the maintenance key. Returns the
    /// files removed and their bytes.
    ///
    /// # Errors
    /// [`TransportError::Sftp`] naming the path that could not be listed or removed.
    pub fn remove_abandoned_partials(
        &mut self,
        environment: &str,
        older_than: Duration,
    ) -> Result<(u64, u64), TransportError> {
        let env_dir = format!("{}/{environment}", self.root);
        if crate::layout::validate_name("environment", environment).is_err() {
            return Err(self.err("remove", &env_dir, "not an environment of the layout"));
        }
        let folders = match self.sftp.readdir(Path::new(&env_dir)) {
            Ok(f) => f,
            Err(e) if is_not_found(&e) => return Ok((0, 0)),
            Err(e) => return Err(self.err("readdir", &env_dir, e)),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let (mut files, mut bytes) = (0u64, 0u64);
        for (folder, stat) in folders {
            let dated = folder
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| crate::layout::parse_date(n).is_ok());
            if !stat.is_dir() || !dated {
                continue;
            }
            let entries = self
                .sftp
                .readdir(&folder)
                .map_err(|e| self.err("readdir", &folder.display().to_string(), e))?;
            for (path, stat) in entries {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let idle = now.saturating_sub(stat.mtime.unwrap_or(now));
                if stat.is_file()
                    && name.starts_with('.')
                    && name.ends_with(".partial")
                    && idle >= older_than.as_secs()
                {
                    bytes += self.unlink_counted(&path, &stat)?;
                    files += 1;
                }
            }
        }
        Ok((files, bytes))
    }

    /// Removes the hidden partial of the last upload if it did not complete. Best effort:
    /// a server that denies removal to this key keeps it (the file is hidden and never
    /// read; the next upload of the datastore, or `ferry prune`, removes it).
    pub fn remove_partial(&mut self) {
        if let Some(partial) = self.partial.take()
            && !self.broken
        {
            // A dead link must not hold the job's failure for another full I/O timeout:
            // a live server unlinks in milliseconds.
            let short = self.io_timeout.min(CLEANUP_TIMEOUT);
            self._session
                .set_timeout(u32::try_from(short.as_millis()).unwrap_or(u32::MAX));
            self.unlink_quietly(&partial);
        }
    }

    fn unlink_quietly(&mut self, path: &str) {
        if let Err(e) = self.sftp.unlink(Path::new(path))
            && !is_not_found(&e)
        {
            tracing::warn!(path, error = %e, "Could not remove an abandoned partial upload.");
        }
    }

    /// Removes the partial files that earlier, failed uploads of `file`'s datastore
    /// left in its directory (a host that died, a link that went down): those of the
    /// same job (an earlier attempt), and any untouched for [`STALE_AFTER_TIMEOUTS`] I/O
    /// timeouts. Returns how many were removed.
    fn sweep_partials(&mut self, file: &StoredFile, job_id: &str) -> usize {
        let prefix = format!(
            ".{}",
            file.name.split("_backup_").next().unwrap_or(&file.name)
        );
        let Ok(entries) = self.sftp.readdir(Path::new(&file.dir)) else {
            return 0;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let stale = (self.io_timeout * STALE_AFTER_TIMEOUTS).as_secs();
        let mut removed = 0;
        for (path, stat) in entries {
            let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            if !(name.starts_with(&format!("{prefix}_backup_")) && name.ends_with(".partial")) {
                continue;
            }
            let ours = name.contains(&format!(".{job_id}."));
            let idle = now.saturating_sub(stat.mtime.unwrap_or(0));
            if ours || idle >= stale {
                let full = format!("{}/{name}", file.dir);
                tracing::info!(path = %full, idle_seconds = idle, "Removing an abandoned partial upload.");
                self.unlink_quietly(&full);
                removed += 1;
            }
        }
        removed
    }

    /// The error for a failed write of `path`: [`TransportError::NoSpace`] if the server
    /// answered and its file system is (nearly) full (OpenSSH's sftp-server reports
    /// `ENOSPC` as a bare `SSH_FX_FAILURE`, so the agent asks `statvfs@openssh.com`),
    /// else [`TransportError::Sftp`]. A timeout, or a server that no longer answers,
    /// marks the session broken.
    fn write_err(
        &mut self,
        remote: &mut ssh2::File,
        path: &str,
        e: std::io::Error,
    ) -> TransportError {
        // ssh2 turns its errors into io::Error by message: the SFTP status is lost.
        if e.kind() == std::io::ErrorKind::TimedOut {
            self.broken = true;
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
                    return TransportError::NoSpace {
                        addr: self.addr.clone(),
                        path: path.to_owned(),
                        free_bytes,
                    };
                }
            }
            Err(_) => self.broken = true,
        }
        self.err("write", path, e)
    }

    /// The root of the layout on the server.
    pub fn root(&self) -> &str {
        &self.root
    }
}

impl Uploader for SftpSession {
    fn upload(
        &mut self,
        file: &StoredFile,
        job_id: &str,
        chunks: Receiver<Vec<u8>>,
        complete: &dyn Fn() -> bool,
    ) -> Result<u64, TransportError> {
        self.mkdir_p(&file.dir)?;
        let final_path = file.path();
        if self.exists(&final_path)? {
            return Err(TransportError::Exists {
                addr: self.addr.clone(),
                path: final_path,
            });
        }
        self.sweep_partials(file, job_id);
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
        self.partial = Some(partial.clone());
        let mut sent = 0u64;
        let started = std::time::Instant::now();
        for chunk in chunks.iter() {
            match self.limit {
                None => remote
                    .write_all(&chunk)
                    .map_err(|e| self.write_err(&mut remote, &partial, e))?,
                Some(rate) => {
                    // Pieces of a tenth of a second's worth, each written when it is due.
                    let piece = usize::try_from(rate / 10).unwrap_or(usize::MAX).max(4096);
                    for (i, part) in chunk.chunks(piece).enumerate() {
                        let before = sent + (i * piece) as u64;
                        std::thread::sleep(pace(rate, before, started.elapsed()));
                        remote
                            .write_all(part)
                            .map_err(|e| self.write_err(&mut remote, &partial, e))?;
                    }
                }
            }
            sent += chunk.len() as u64;
            crate::pipeline::chunks::recycle(chunk);
        }
        if !complete() {
            return Err(TransportError::Abandoned { path: partial });
        }
        // fsync@openssh.com where the server has it; a server without it still renames.
        let _ = remote.fsync();
        let found = remote
            .stat()
            .map_err(|e| self.err("stat", &partial, e))?
            .size
            .unwrap_or(0);
        drop(remote);
        if found != sent {
            return Err(TransportError::SizeMismatch {
                addr: self.addr.clone(),
                path: partial,
                sent,
                found,
            });
        }
        // SSH_FXP_RENAME without OVERWRITE: OpenSSH refuses if the target exists.
        self.sftp
            .rename(
                Path::new(&partial),
                Path::new(&final_path),
                Some(RenameFlags::ATOMIC | RenameFlags::NATIVE),
            )
            .map_err(|e| self.err("rename", &partial, e))?;
        self.partial = None;
        Ok(sent)
    }

    fn exists(&mut self, path: &str) -> Result<bool, TransportError> {
        match self.sftp.lstat(Path::new(path)) {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(self.err("stat", path, e)),
        }
    }
}

impl Downloader for SftpSession {
    fn list(&mut self, dir: &str) -> Result<Vec<String>, TransportError> {
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

    fn size(&mut self, path: &str) -> Result<Option<u64>, TransportError> {
        match self.sftp.stat(Path::new(path)) {
            Ok(stat) => Ok(Some(stat.size.unwrap_or(0))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.err("stat", path, e)),
        }
    }

    fn read_small(&mut self, path: &str, max: u64) -> Result<Vec<u8>, TransportError> {
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
            return Err(TransportError::TooLarge {
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
            return Err(TransportError::TooLarge {
                addr: self.addr.clone(),
                path: path.to_owned(),
                size: out.len() as u64,
                max,
            });
        }
        Ok(out)
    }

    fn download(&mut self, path: &str, chunks: SyncSender<Vec<u8>>) -> Result<u64, TransportError> {
        let mut f = self
            .sftp
            .open(Path::new(path))
            .map_err(|e| self.err("open", path, e))?;
        let mut total = 0u64;
        loop {
            let mut buf = crate::pipeline::chunks::buffer();
            buf.resize(CHUNK_BYTES, 0);
            let mut filled = 0;
            while filled < CHUNK_BYTES {
                let n = f
                    .read(&mut buf[filled..])
                    .map_err(|e| self.err("read", path, e))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                return Ok(total);
            }
            buf.truncate(filled);
            total += filled as u64;
            if chunks.send(buf).is_err() {
                return Ok(total);
            }
        }
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
}
