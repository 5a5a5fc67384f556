//! Transports to the backup server. The pipeline sees only the [`Uploader`] and
//! [`Downloader`] traits and byte chunks; [`sftp`] implements them over SSH with the
//! `ssh2` crate (libssh2), whose blocking API runs on a thread of its own.

use std::sync::mpsc::{Receiver, SyncSender};

use crate::layout::StoredFile;

pub mod sftp;

/// A transport failure. Each variant names the server and the path involved.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// TCP connection or SSH handshake failed.
    #[error("cannot connect to backup server {addr}: {message}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// What failed.
        message: String,
    },
    /// The server's host key is not the pinned one: possibly another host.
    #[error(
        "backup server {addr} presented host key {found}, not the pinned {expected}; refusing to connect \
         (if the server's key really changed, update backup_server.host_key)"
    )]
    HostKey {
        /// `host:port`.
        addr: String,
        /// Fingerprint of the pinned key (`SHA256:...`).
        expected: String,
        /// Fingerprint of the presented key, or its type if of another type.
        found: String,
    },
    /// Public-key authentication refused.
    #[error("backup server {addr} refused key {key} for user {user}: {message}")]
    Auth {
        /// `host:port`.
        addr: String,
        /// SSH user.
        user: String,
        /// Private key file path.
        key: String,
        /// libssh2's message.
        message: String,
    },
    /// An SFTP operation failed.
    #[error("backup server {addr}: {op} {path}: {message}")]
    Sftp {
        /// `host:port`.
        addr: String,
        /// The operation, e.g. `write`.
        op: &'static str,
        /// Remote path.
        path: String,
        /// libssh2's or the server's message.
        message: String,
    },
    /// A file that must not exist yet already does.
    #[error("backup server {addr}: {path} already exists; Ferry never overwrites a backup")]
    Exists {
        /// `host:port`.
        addr: String,
        /// Remote path.
        path: String,
    },
    /// The file's size on the server is not what was sent.
    #[error("backup server {addr}: {path} holds {found} bytes after upload, {sent} were sent")]
    SizeMismatch {
        /// `host:port`.
        addr: String,
        /// Remote path.
        path: String,
        /// Bytes sent.
        sent: u64,
        /// Bytes found.
        found: u64,
    },
    /// A remote file is larger than the caller accepts.
    #[error("backup server {addr}: {path} is {size} bytes, more than the {max} accepted")]
    TooLarge {
        /// `host:port`.
        addr: String,
        /// Remote path.
        path: String,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The backup server's file system is full: the write failed and the server's
    /// `statvfs@openssh.com` shows (almost) no room left.
    #[error(
        "no space left on the backup server {addr}: writing {path} failed with {free_bytes} bytes \
         free there; the partial file was removed and earlier backups are untouched \
         (free space on the server, e.g. `ferry prune`, then back up again)"
    )]
    NoSpace {
        /// `host:port`.
        addr: String,
        /// Remote path.
        path: String,
        /// Bytes available to the SSH user on that file system.
        free_bytes: u64,
    },
    /// The stream was abandoned by the pipeline (it failed or was cancelled).
    #[error("upload of {path} abandoned: the pipeline stopped before the end of the stream")]
    Abandoned {
        /// Remote path.
        path: String,
    },
}

/// Writes new files on the backup server; never overwrites or deletes one.
pub trait Uploader {
    /// Streams chunks from `chunks` into `file`: written as the hidden
    /// `file.partial_name(job_id)`, renamed to the final name only when the sender closed
    /// cleanly and the stored size matches what was received. Creates missing dated
    /// directories. Returns the bytes stored.
    ///
    /// `complete` is called after the last chunk arrived and must say whether the
    /// producer finished successfully; if not, the partial file is left hidden.
    ///
    /// # Errors
    /// [`TransportError`]; nothing is left under the final name.
    fn upload(
        &mut self,
        file: &StoredFile,
        job_id: &str,
        chunks: Receiver<Vec<u8>>,
        complete: &dyn Fn() -> bool,
    ) -> Result<u64, TransportError>;

    /// Whether `path` exists.
    ///
    /// # Errors
    /// [`TransportError::Sftp`] for failures other than "no such file".
    fn exists(&mut self, path: &str) -> Result<bool, TransportError>;
}

/// Reads files from the backup server.
pub trait Downloader {
    /// Names in `dir` (no `.` or `..`); empty if the directory does not exist.
    ///
    /// # Errors
    /// [`TransportError::Sftp`].
    fn list(&mut self, dir: &str) -> Result<Vec<String>, TransportError>;

    /// The size of `path` in bytes; `None` if it does not exist.
    ///
    /// # Errors
    /// [`TransportError::Sftp`] for failures other than "no such file".
    fn size(&mut self, path: &str) -> Result<Option<u64>, TransportError>;

    /// The whole of a small file, at most `max` bytes.
    ///
    /// # Errors
    /// [`TransportError::TooLarge`] or [`TransportError::Sftp`].
    fn read_small(&mut self, path: &str, max: u64) -> Result<Vec<u8>, TransportError>;

    /// Streams `path` into `chunks`; returns the bytes read. Stops early (Ok) if the
    /// receiver hangs up.
    ///
    /// # Errors
    /// [`TransportError::Sftp`].
    fn download(&mut self, path: &str, chunks: SyncSender<Vec<u8>>) -> Result<u64, TransportError>;
}
