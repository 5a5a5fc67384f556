//! Transports to the backup server. The pipeline sees only the [`Uploader`] and
//! [`Downloader`] traits and byte chunks; [`sftp`] implements them over SSH with the
//! `ssh2` crate (libssh2), whose blocking API runs on a thread of its own, and
//! [`watchdog`] bounds how long any of its calls may go without progress.

use std::sync::mpsc::{Receiver, SyncSender};

use ferry_core::layout::StoredFile;

pub mod sftp;
pub mod watchdog;

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
         free there; {partial}; earlier backups are untouched (free space on the server, e.g. \
         with `ferry prune`, then back up again)"
    )]
    NoSpace {
        /// `host:port`.
        addr: String,
        /// Remote path (the hidden partial file).
        path: String,
        /// Bytes available to the SSH user on that file system.
        free_bytes: u64,
        /// What became of the partial file.
        partial: PartialFate,
    },
    /// A call on the server made no progress for the I/O timeout: the agent shut the
    /// connection down (the server is stopped or overloaded, its disk hangs, or the link
    /// silently drops packets).
    #[error(
        "backup server {addr} stalled: {op}{sep}{path} made no progress for {seconds} s \
         (io_timeout_seconds), so the agent closed the connection; a new attempt reconnects \
         (if it keeps happening, look at the server's load, disk and sshd)",
        sep = if path.is_empty() { "" } else { " of " }
    )]
    Stalled {
        /// `host:port`.
        addr: String,
        /// The call, e.g. `write`, `rename`, `SSH handshake`.
        op: &'static str,
        /// Remote path; empty for calls on the connection itself.
        path: String,
        /// The I/O timeout, seconds.
        seconds: u64,
    },
    /// Putting a backup in place (its parts, then their manifests) failed part-way.
    #[error("{source}; the backup was not committed: {}", describe_left(left, unsure.as_deref()))]
    Commit {
        /// What failed.
        source: Box<TransportError>,
        /// Files left under a final name without the manifest that completes the backup
        /// (the agent's key may not delete them): no reader takes them for a backup.
        left: Vec<String>,
        /// When the connection failed: the path of the last rename sent, which the server
        /// may still carry out.
        unsure: Option<String>,
    },
}

fn describe_left(left: &[String], unsure: Option<&str>) -> String {
    let mut s = if left.is_empty() {
        "nothing of it is left under a final name".to_owned()
    } else {
        format!(
            "left under a final name without the manifest that completes the backup, which no \
             restore or verify takes for one (`ferry prune` with the maintenance key removes \
             them): {}",
            left.join(", ")
        )
    };
    if let Some(path) = unsure {
        s.push_str(&format!(
            "; the connection failed, so the server may yet carry out the last request sent \
             (the rename to {path})"
        ));
    }
    s
}

impl TransportError {
    /// Whether a new attempt may succeed: the connection or the server failed, not the
    /// configuration, the keys, the data or a full disk.
    pub fn retryable(&self) -> bool {
        match self {
            TransportError::Connect { .. }
            | TransportError::Sftp { .. }
            | TransportError::Stalled { .. } => true,
            TransportError::Commit { source, .. } => source.retryable(),
            _ => false,
        }
    }
}

/// What became of a failed upload's hidden partial file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartialFate {
    /// Not known yet (the error was made before the clean-up).
    Unknown,
    /// Removed (or already gone).
    Removed,
    /// Still on the server, and why: the key may not delete, or the link failed.
    Kept(String),
}

impl std::fmt::Display for PartialFate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PartialFate::Unknown => f.write_str(
                "the partial file may remain (`ferry prune` with the maintenance key removes it \
                 once the job has ended)",
            ),
            PartialFate::Removed => f.write_str("the partial file was removed"),
            PartialFate::Kept(reason) => write!(
                f,
                "the partial file could not be removed ({reason}): it still takes room; \
                 `ferry prune` with the maintenance key removes it now that the job has ended"
            ),
        }
    }
}

/// A part written whole to its hidden partial file, waiting for [`Uploader::commit`] or
/// [`Uploader::abandon`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Staged {
    /// Where it goes.
    pub file: StoredFile,
    /// Full path of the hidden partial file.
    pub partial: String,
    /// Bytes stored, checked against the server's size of the file.
    pub bytes: u64,
}

/// A file that a failed or interrupted upload left in a dated folder
/// ([`sftp::SftpSession::leftovers`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leftover {
    /// Environment.
    pub environment: String,
    /// `YYYY-MM-DD` of its folder.
    pub date: String,
    /// Full path on the server.
    pub path: String,
    /// Size, bytes.
    pub size: u64,
    /// Seconds since it was last modified (the server's modification time against this
    /// host's clock).
    pub idle_seconds: u64,
    /// What it is.
    pub kind: LeftoverKind,
    /// For an orphan companion part: its own manifest, removed with it.
    pub manifest: Option<String>,
}

/// What kind of [`Leftover`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeftoverKind {
    /// A hidden `.<name>.<job>.<attempt>.partial` upload, with the job ids (ULIDs) in its
    /// name (none in names of other writers).
    Partial {
        /// ULIDs found in the name.
        job_ids: Vec<String>,
    },
    /// A data file under its final name that no committed backup includes: it has no
    /// manifest, or it is a companion part whose main part was never committed. Readers
    /// ignore it; only its bytes are lost.
    Orphan,
}

/// Writes new files on the backup server; never overwrites a file, and deletes only its
/// own hidden partial files (where the server lets it) and, when a commit fails half-way,
/// what that commit had put in place.
pub trait Uploader {
    /// Streams chunks from `chunks` into the hidden partial file of `file` (named with
    /// `job_id` and the attempt) until the sender hangs up, then checks the stored size.
    /// Creates missing dated directories and first removes the datastore's abandoned
    /// partials. The partial stays hidden until [`Uploader::commit`].
    ///
    /// # Errors
    /// [`TransportError`]; the partial is removed where the server allows it
    /// ([`TransportError::NoSpace`] says whether it was).
    fn stage(
        &mut self,
        file: &StoredFile,
        job_id: &str,
        chunks: Receiver<Vec<u8>>,
    ) -> Result<Staged, TransportError>;

    /// Puts a backup in place: `parts` in order, each with its manifest's bytes, the main
    /// part last. Writes every manifest as a hidden partial first, then renames the data
    /// parts, then the manifests: a reader takes a backup for one only by its main
    /// part's manifest, which comes last, so an interruption at any step leaves nothing a
    /// reader takes for a backup.
    ///
    /// # Errors
    /// [`TransportError::Commit`] naming what could not be undone (left under a final
    /// name without a manifest, for `ferry prune`).
    fn commit(&mut self, job_id: &str, parts: &[(Staged, Vec<u8>)]) -> Result<(), TransportError>;

    /// Removes hidden partial files (full paths, e.g. [`Staged::partial`]) that will not be
    /// committed, where the server allows it; what became of each.
    fn abandon(&mut self, partials: &[String]) -> Vec<PartialFate>;

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
