//! [`TargetError`]: what failed on a storage target, in terms any target can give (not
//! SSH's): not found, already exists, no space, stalled, permission denied, a protocol or
//! I/O failure; each names the target's address and the path.

/// A storage target failure. Each variant names the target (`addr`: `host:port` for SFTP,
/// the endpoint and bucket for S3) and the path (the object's key) involved.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The connection could not be set up (TCP, TLS or SSH handshake, name resolution).
    #[error("cannot connect to backup server {addr}: {message}")]
    Connect {
        /// The target's address.
        addr: String,
        /// What failed.
        message: String,
    },
    /// The server is not the one pinned in the configuration: possibly another host.
    #[error(
        "backup server {addr} presented host key {found}, not the pinned {expected}; refusing to connect \
         (if the server's key really changed, update backup_server.host_key)"
    )]
    HostKey {
        /// The target's address.
        addr: String,
        /// Fingerprint of the pinned key (`SHA256:...`).
        expected: String,
        /// Fingerprint of the presented key, or its type if of another type.
        found: String,
    },
    /// The credentials were refused.
    #[error("backup server {addr} refused key {key} for user {user}: {message}")]
    Auth {
        /// The target's address.
        addr: String,
        /// The user (SSH user, access key id).
        user: String,
        /// Where the credentials came from (a private key file).
        key: String,
        /// The server's message.
        message: String,
    },
    /// A call failed at the protocol or I/O level (the connection may work again).
    #[error("backup server {addr}: {op} {path}: {message}")]
    Io {
        /// The target's address.
        addr: String,
        /// The operation, e.g. `write`.
        op: &'static str,
        /// Path or key on the target.
        path: String,
        /// The library's or the server's message.
        message: String,
    },
    /// The target refused the call for these credentials (e.g. a key that may not delete).
    #[error("backup server {addr}: {op} {path}: permission denied ({message})")]
    PermissionDenied {
        /// The target's address.
        addr: String,
        /// The operation, e.g. `remove`.
        op: &'static str,
        /// Path or key on the target.
        path: String,
        /// The server's message.
        message: String,
    },
    /// An object that must exist does not.
    #[error("backup server {addr}: {path} does not exist")]
    NotFound {
        /// The target's address.
        addr: String,
        /// Path or key on the target.
        path: String,
    },
    /// An object that must not exist yet already does.
    #[error("backup server {addr}: {path} already exists; Ferry never overwrites a backup")]
    Exists {
        /// The target's address.
        addr: String,
        /// Path or key on the target.
        path: String,
    },
    /// The object's size on the target is not what was sent.
    #[error("backup server {addr}: {path} holds {found} bytes after upload, {sent} were sent")]
    SizeMismatch {
        /// The target's address.
        addr: String,
        /// Path or key on the target.
        path: String,
        /// Bytes sent.
        sent: u64,
        /// Bytes found.
        found: u64,
    },
    /// An object is larger than the caller accepts.
    #[error("backup server {addr}: {path} is {size} bytes, more than the {max} accepted")]
    TooLarge {
        /// The target's address.
        addr: String,
        /// Path or key on the target.
        path: String,
        /// Its size, bytes.
        size: u64,
        /// The limit, bytes.
        max: u64,
    },
    /// The target's file system is full (SFTP; an S3 quota is [`TargetError::QuotaExceeded`]):
    /// the write failed.
    #[error(
        "no space left on the backup server {addr}: writing {path} failed with {free_bytes} bytes \
         free there; {partial}; earlier backups are untouched (free space on the server, e.g. \
         with `ferry prune`, then back up again)"
    )]
    NoSpace {
        /// The target's address.
        addr: String,
        /// The partial object's path (the hidden partial file).
        path: String,
        /// Bytes available to these credentials there.
        free_bytes: u64,
        /// What became of the partial object.
        partial: PartialFate,
    },
    /// An S3 bucket's quota (the bucket's or its owner's) refused a part of an upload: the
    /// bucket holds what the quota allows, which says nothing of free bytes.
    #[error(
        "no space left for this backup on {addr}: the bucket's quota refused a part of {path} \
         (the bucket or its owner already holds what the quota allows), so the upload stopped \
         and the backup was not stored; {}; earlier backups are untouched (raise the bucket's \
         quota, or free room in it, e.g. with `ferry prune`, then back up again)",
        describe_upload(partial)
    )]
    QuotaExceeded {
        /// The target's address (endpoint and bucket).
        addr: String,
        /// The key being uploaded.
        path: String,
        /// What became of its multipart upload.
        partial: PartialFate,
    },
    /// A call on the target made no progress for the I/O timeout: the connection was shut
    /// down (the server is stopped or overloaded, its disk hangs, or the link silently
    /// drops packets).
    #[error(
        "backup server {addr} stalled: {op}{sep}{path} made no progress for {seconds} s \
         (io_timeout_seconds), so the agent closed the connection; a new attempt reconnects \
         (if it keeps happening, look at the server's load, disk and sshd)",
        sep = if path.is_empty() { "" } else { " of " }
    )]
    Stalled {
        /// The target's address.
        addr: String,
        /// The call, e.g. `write`, `rename`, `SSH handshake`.
        op: &'static str,
        /// Path on the target; empty for calls on the connection itself.
        path: String,
        /// The I/O timeout, seconds.
        seconds: u64,
    },
    /// Putting a backup in place (its parts, then their manifests) failed part-way.
    #[error("{source}; the backup was not committed: {}", describe_left(left, unsure.as_deref()))]
    Commit {
        /// What failed.
        source: Box<TargetError>,
        /// Objects left under a final name without the manifest that completes the backup
        /// (the writer's credentials may not delete them): no reader takes them for a
        /// backup.
        left: Vec<String>,
        /// When the connection failed: the path of the last commit call sent (a rename on
        /// SFTP), which the server may still carry out.
        unsure: Option<String>,
    },
    /// The target cannot do this at all (e.g. an rsync mirror on S3, a lock on SFTP).
    #[error("backup server {addr}: {what} is not supported by a {kind} target")]
    Unsupported {
        /// The target's address.
        addr: String,
        /// The target's kind (`sftp`, `memory`).
        kind: &'static str,
        /// What was asked, e.g. `an rsync mirror`.
        what: &'static str,
    },
}

/// What became of a refused S3 upload's multipart upload, for [`TargetError::QuotaExceeded`].
fn describe_upload(partial: &PartialFate) -> String {
    match partial {
        PartialFate::Removed => {
            "its multipart upload was aborted, so none of its parts stay in the bucket".to_owned()
        }
        PartialFate::Kept(reason) => format!(
            "its multipart upload could not be aborted ({reason}): its parts still count against \
             the quota until `ferry prune` with the maintenance keys aborts it"
        ),
        PartialFate::Unknown => "its multipart upload may remain (`ferry prune` with the \
                                 maintenance keys aborts it once the job has ended)"
            .to_owned(),
    }
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

impl TargetError {
    /// Whether a new attempt may succeed: the connection or the server failed, not the
    /// configuration, the credentials, the data or a full target.
    pub fn retryable(&self) -> bool {
        match self {
            TargetError::Connect { .. } | TargetError::Io { .. } | TargetError::Stalled { .. } => {
                true
            }
            TargetError::Commit { source, .. } => source.retryable(),
            _ => false,
        }
    }
}

/// What became of a failed upload's partial object (a hidden file on SFTP, an
/// in-progress multipart upload on S3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartialFate {
    /// Not known yet (the error was made before the clean-up).
    Unknown,
    /// Removed (or already gone).
    Removed,
    /// Still on the target, and why: the credentials may not delete, or the link failed.
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
