//! WAL shipping: PostgreSQL's `archive_command = 'ferry-agent wal-push %p'` hands each
//! file it archives (segments, timeline history files, backup history files, `.partial`
//! segments) to the running production agent over a Unix socket; the agent compresses
//! (zstd), encrypts (age) and writes it to the storage target at
//! `<root>/<env>/<datastore>-wal/<timeline>/<file>.zst.age`, with a `.json`
//! [`WalRecord`] beside it ([`ferry_core::wal`]). Nothing is staged on local disk:
//! PostgreSQL keeps the file in `pg_wal` until the push answers ok.
//!
//! - [`bind`] and [`serve`]: the agent's side, started by [`crate::run`] when `[wal]` is
//!   configured. The socket is created mode 0660, owned by root and `[wal] group` (the
//!   PostgreSQL OS user's), under a temporary name and renamed into place, so it is never
//!   reachable with other modes. Requests run one at a time; pushes share one write
//!   session of the target, kept open between them (reopened after a failure, and once if
//!   the kept one was dropped while idle); gets likewise share one read session.
//! - [`push`] and [`get`]: the client sides, `ferry-agent wal-push` (production's
//!   `archive_command`) and `ferry-agent wal-get` (a staging restore's `restore_command`:
//!   the staging agent reads the source environment's archive and decrypts it with its
//!   identity).
//!
//! # The protocol (version 1)
//!
//! One request and one response per connection; integers big-endian.
//!
//! ```text
//! request  = "FWAL" | u8 version = 1 | u8 op (1: push, production; 2: get, staging)
//!          | u8 n | n bytes: datastore name (UTF-8; 0 bytes: the agent's only WAL datastore)
//!          | u8 n | n bytes: file name (a name PostgreSQL archives, WalFileName; never a path)
//!          | u64 size: bytes of the file (push: at most MAX_WAL_FILE_BYTES, 1 GiB; get: 0)
//!          | size bytes: the file (push)
//! response = u8 status (0: stored or already stored with the same content, or the file
//!                       follows; 1: refused or failed; 2: get: not archived)
//!          | u16 n (at most MAX_RESPONSE_BYTES) | n bytes: a message (UTF-8)
//!          | get, status 0: u64 size | size bytes: the file
//!                         | u8 0 if its stored and plain sizes and SHA-256 matched its record, else 1
//! ```
//!
//! # Pushed twice
//!
//! PostgreSQL pushes a file again when it did not see the first push succeed. Before
//! uploading, the agent reads the record of that name back: if there is one, it hashes
//! what is pushed (SHA-256 of the plaintext) and answers ok when it equals the record's,
//! and fails loudly (logged at error, status 1) when it differs; it never overwrites. A
//! target whose writers may not read (S3 with put-only production credentials) cannot
//! compare: there the file is uploaded again as a new version of the key (the bucket's
//! versioning keeps the first).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::config::{Keys, Settings};
use crate::job::Progress;
use crate::pipeline::{chunks, compress, hash};
use ferry_core::Bounded;
use ferry_core::layout::StoredFile;
use ferry_core::wal::{
    self, MAX_WAL_FILE_BYTES, MAX_WAL_RECORD_BYTES, WAL_RECORD_VERSION, WalFileName, WalRecord,
};
use ferry_storage::{ReadSession, TargetError, WriteSession};

/// The request's first bytes.
pub const MAGIC: &[u8; 4] = b"FWAL";
/// The protocol version this agent speaks.
pub const VERSION: u8 = 1;
/// Longest response message, bytes.
pub const MAX_RESPONSE_BYTES: usize = 4096;
/// How long the agent waits for a request's header, and for each read of its bytes.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `wal-push` waits for the agent's answer once the file is sent (the upload of
/// a 1 GiB file to a slow target included).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);

/// The `[wal]` settings, validated ([`crate::config::WalConfig`]).
#[derive(Clone, Debug)]
pub struct WalSettings {
    /// The socket's path.
    pub socket: PathBuf,
    /// The socket's group id.
    pub gid: u32,
    /// Staging: the `ferry-agent` binary a restored cluster's `restore_command` runs.
    pub agent_binary: PathBuf,
}

/// Why a push was refused or failed; its text (with causes) is what `wal-push` prints.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// Not a request of this protocol.
    #[error("not a wal-push request of protocol version {VERSION}: {0}")]
    Protocol(String),
    /// The file name is not one PostgreSQL archives.
    #[error(transparent)]
    Name(#[from] wal::WalNameError),
    /// No such datastore, or it does not archive WAL.
    #[error("{0}")]
    Datastore(String),
    /// Larger than any WAL file.
    #[error("{name} is {size} bytes, more than any WAL file ({MAX_WAL_FILE_BYTES} bytes)")]
    TooLarge {
        /// The file name.
        name: String,
        /// Its announced size, bytes.
        size: u64,
    },
    /// The same name is stored with other content: never overwritten.
    #[error(
        "{path} is already archived with different content (stored: {stored_bytes} bytes, SHA-256 {stored_sha256}; \
         pushed: {bytes} bytes, SHA-256 {sha256}); it is not overwritten. Two clusters may be archiving to the \
         same datastore, or the cluster was re-created: give the new one a datastore of its own"
    )]
    Differs {
        /// The stored file.
        path: String,
        /// The stored record's byte count.
        stored_bytes: u64,
        /// The stored record's SHA-256.
        stored_sha256: String,
        /// Bytes pushed now.
        bytes: u64,
        /// SHA-256 of what was pushed now.
        sha256: String,
    },
    /// A stored file without its record (a commit cut short).
    #[error(
        "{0} exists without its .json record (an earlier push was cut short between the two); \
         remove it with the maintenance credentials so that the file can be archived again"
    )]
    Orphan(String),
    /// The stored record cannot be read.
    #[error(transparent)]
    Record(#[from] wal::WalRecordError),
    /// The connection ended before the announced size.
    #[error("the request ended after {got} of {size} bytes")]
    Short {
        /// Bytes received.
        got: u64,
        /// Bytes announced.
        size: u64,
    },
    /// The storage target failed.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// Reading the request, compressing or encrypting failed.
    #[error("{stage}: {source}")]
    Io {
        /// Where, e.g. `compress/encrypt/upload`.
        stage: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A thread of the push failed.
    #[error("internal error: {0}")]
    Internal(String),
    /// Get: no such file is archived.
    #[error("{0} is not archived")]
    NotArchived(String),
    /// This agent's role does not serve the operation.
    #[error("{0}")]
    Role(String),
    /// Get: what was read does not match the record.
    #[error("{0}")]
    Integrity(String),
}

impl PushError {
    /// A bounded name for logs (`error_type`).
    fn error_type(&self) -> &'static str {
        match self {
            PushError::Protocol(_) => "protocol",
            PushError::Name(_) => "file_name",
            PushError::Datastore(_) => "datastore",
            PushError::TooLarge { .. } => "too_large",
            PushError::Differs { .. } => "content_differs",
            PushError::Orphan(_) => "orphan",
            PushError::Record(_) => "record",
            PushError::Short { .. } => "short_request",
            PushError::Target(_) => "target",
            PushError::Io { .. } => "io",
            PushError::Internal(_) => "internal",
            PushError::NotArchived(_) => "not_archived",
            PushError::Role(_) => "role",
            PushError::Integrity(_) => "integrity",
        }
    }

    /// Whether the session may be broken (reopen it for the next push).
    fn session_suspect(&self) -> bool {
        matches!(
            self,
            PushError::Target(_) | PushError::Io { .. } | PushError::Internal(_)
        )
    }
}

/// What a request asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `wal-push`: store the file that follows (production).
    Push = 1,
    /// `wal-get`: send the file back (staging).
    Get = 2,
}

/// A parsed request header.
#[derive(Debug, PartialEq, Eq)]
pub struct Header {
    /// What is asked.
    pub op: Op,
    /// Datastore name; empty: the agent's only WAL datastore.
    pub datastore: String,
    /// The file name.
    pub file: String,
    /// Bytes that follow (0 for [`Op::Get`]).
    pub size: u64,
}

/// Writes a request header.
///
/// # Errors
/// A name longer than 255 bytes, or writing failed.
pub fn write_header(w: &mut impl Write, h: &Header) -> io::Result<()> {
    let mut buf = Vec::with_capacity(16 + h.datastore.len() + h.file.len());
    buf.extend_from_slice(MAGIC);
    buf.push(VERSION);
    buf.push(h.op as u8);
    for s in [&h.datastore, &h.file] {
        let n = u8::try_from(s.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name too long"))?;
        buf.push(n);
        buf.extend_from_slice(s.as_bytes());
    }
    buf.extend_from_slice(&h.size.to_be_bytes());
    w.write_all(&buf)
}

/// Reads a request header.
///
/// # Errors
/// [`PushError::Protocol`] for anything but a version-1 header, [`PushError::Io`] if
/// reading failed.
pub fn read_header(r: &mut impl Read) -> Result<Header, PushError> {
    let io = |source| PushError::Io {
        stage: "read request",
        source,
    };
    let mut head = [0u8; 6];
    r.read_exact(&mut head).map_err(io)?;
    if &head[..4] != MAGIC {
        return Err(PushError::Protocol("it does not start with FWAL".into()));
    }
    if head[4] != VERSION {
        return Err(PushError::Protocol(format!(
            "version {} (this agent speaks {VERSION}: run the wal-push of the same release)",
            head[4]
        )));
    }
    let op = match head[5] {
        1 => Op::Push,
        2 => Op::Get,
        other => return Err(PushError::Protocol(format!("unknown operation {other}"))),
    };
    let mut string = |what: &str| -> Result<String, PushError> {
        let mut n = [0u8; 1];
        r.read_exact(&mut n).map_err(io)?;
        let mut s = vec![0u8; usize::from(n[0])];
        r.read_exact(&mut s).map_err(io)?;
        String::from_utf8(s).map_err(|_| PushError::Protocol(format!("the {what} is not UTF-8")))
    };
    let datastore = string("datastore name")?;
    let file = string("file name")?;
    let mut size = [0u8; 8];
    r.read_exact(&mut size).map_err(io)?;
    Ok(Header {
        op,
        datastore,
        file,
        size: u64::from_be_bytes(size),
    })
}

/// A response's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Stored (push), or the file follows (get).
    Ok = 0,
    /// Refused or failed: the message says why.
    Failed = 1,
    /// Get: no such file is archived.
    NotArchived = 2,
}

/// Writes a response (the message cut to [`MAX_RESPONSE_BYTES`] on a character boundary).
///
/// # Errors
/// Writing failed.
pub fn write_response(w: &mut impl Write, status: Status, message: &str) -> io::Result<()> {
    let mut end = message.len().min(MAX_RESPONSE_BYTES);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let m = &message.as_bytes()[..end];
    let mut buf = vec![status as u8];
    buf.extend_from_slice(&(m.len() as u16).to_be_bytes());
    buf.extend_from_slice(m);
    w.write_all(&buf)
}

/// Reads a response: `(status, message)`.
///
/// # Errors
/// Reading failed or the response is malformed.
pub fn read_response(r: &mut impl Read) -> io::Result<(Status, String)> {
    let mut head = [0u8; 3];
    r.read_exact(&mut head)?;
    let n = usize::from(u16::from_be_bytes([head[1], head[2]]));
    let status = match head[0] {
        0 => Status::Ok,
        1 => Status::Failed,
        2 => Status::NotArchived,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a malformed answer",
            ));
        }
    };
    if n > MAX_RESPONSE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "a malformed answer",
        ));
    }
    let mut m = vec![0u8; n];
    r.read_exact(&mut m)?;
    Ok((status, String::from_utf8_lossy(&m).into_owned()))
}

/// Why `wal-push` or `wal-get` failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The file PostgreSQL named cannot be read.
    #[error("cannot read {path}: {source}")]
    File {
        /// The path as given (`%p`).
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Its name is not a WAL file name.
    #[error(transparent)]
    Name(#[from] wal::WalNameError),
    /// The agent is not there.
    #[error(
        "cannot reach the Ferry agent at {socket}: {source}. Is ferry-agent running with [wal] socket = {socket:?} \
         (and is this user in its group)? PostgreSQL keeps the file and retries"
    )]
    Unreachable {
        /// The socket path.
        socket: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The connection broke.
    #[error(
        "the Ferry agent at {socket} stopped answering: {source}; PostgreSQL keeps the file and retries"
    )]
    Broken {
        /// The socket path.
        socket: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Not archived (wal-get).
    #[error("{0}")]
    NotArchived(String),
    /// The agent refused or failed.
    #[error("the Ferry agent did not archive or send {file}: {message}")]
    Refused {
        /// The file name.
        file: String,
        /// The agent's message.
        message: String,
    },
}

/// `ferry-agent wal-push`: sends the file at `path` (relative to the current directory,
/// the data directory when PostgreSQL runs `archive_command`) to the agent listening on
/// `socket`, for `datastore` (empty: the agent's only WAL datastore), and waits for its
/// answer. Returns the agent's message.
///
/// # Errors
/// [`ClientError`]: the file unreadable or misnamed, the agent unreachable, or its
/// refusal with its message.
pub fn push(socket: &Path, datastore: &str, path: &Path) -> Result<String, ClientError> {
    let shown = path.display().to_string();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = WalFileName::parse(&name)?;
    let file_err = |source| ClientError::File {
        path: shown.clone(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(file_err)?;
    let size = file.metadata().map_err(file_err)?.len();
    let (mut stream, sock) = send_header(
        socket,
        &Header {
            op: Op::Push,
            datastore: datastore.to_owned(),
            file: name.name.clone(),
            size,
        },
    )?;
    let broken = |source| ClientError::Broken {
        socket: sock.clone(),
        source,
    };
    // Exactly the announced size, even if the file grew (it does not: PostgreSQL
    // archives complete files only).
    let sent = io::copy(&mut (&mut file).take(size), &mut stream);
    // A refusal may come before the whole file was read: prefer the agent's answer.
    let answer = read_response(&mut stream);
    match (sent, answer) {
        (_, Ok((Status::Ok, message))) => Ok(message),
        (_, Ok((_, message))) => Err(ClientError::Refused {
            file: name.name,
            message,
        }),
        (Err(e), Err(_)) | (Ok(_), Err(e)) => Err(broken(e)),
    }
}

/// Connects to the agent listening on `socket` and sends `header`: the stream, ready for
/// the request's bytes or the answer (reads time out after [`ANSWER_TIMEOUT`]), and the
/// socket's path for errors.
///
/// # Errors
/// [`ClientError::Unreachable`] when nothing listens there; [`ClientError::Broken`] when
/// the header cannot be sent.
fn send_header(socket: &Path, header: &Header) -> Result<(UnixStream, String), ClientError> {
    let sock = socket.display().to_string();
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Unreachable {
        socket: sock.clone(),
        source,
    })?;
    let broken = |source| ClientError::Broken {
        socket: sock.clone(),
        source,
    };
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(broken)?;
    write_header(&mut stream, header).map_err(broken)?;
    Ok((stream, sock))
}

/// `ferry-agent wal-get`: asks the staging agent listening on `socket` for the archived
/// file `name` of `datastore` (empty: the agent's only WAL datastore) and writes it to
/// `dest` (PostgreSQL's `%p`, relative to the data directory): first to
/// `<dest>.ferry-partial`, renamed over `dest` only once whole and checked by the agent
/// against its record's SHA-256. Returns the bytes written.
///
/// # Errors
/// [`ClientError::NotArchived`] when no such file is archived (PostgreSQL asks for files
/// past the end of the archive; it takes a non-zero exit as "not there"); otherwise as
/// [`push`], or the destination cannot be written.
pub fn get(socket: &Path, datastore: &str, name: &str, dest: &Path) -> Result<u64, ClientError> {
    let name = WalFileName::parse(name)?;
    let (mut stream, sock) = send_header(
        socket,
        &Header {
            op: Op::Get,
            datastore: datastore.to_owned(),
            file: name.name.clone(),
            size: 0,
        },
    )?;
    let broken = |source| ClientError::Broken {
        socket: sock.clone(),
        source,
    };
    match read_response(&mut stream).map_err(broken)? {
        (Status::Ok, _) => {}
        (Status::NotArchived, message) => return Err(ClientError::NotArchived(message)),
        (Status::Failed, message) => {
            return Err(ClientError::Refused {
                file: name.name,
                message,
            });
        }
    }
    let mut size = [0u8; 8];
    stream.read_exact(&mut size).map_err(broken)?;
    let size = u64::from_be_bytes(size);
    let partial = PathBuf::from(format!("{}.ferry-partial", dest.display()));
    let file_err = |source| ClientError::File {
        path: partial.display().to_string(),
        source,
    };
    let written = (|| {
        let mut out = std::fs::File::create(&partial).map_err(file_err)?;
        let got = io::copy(&mut (&mut stream).take(size), &mut out).map_err(broken)?;
        let mut trailer = [0u8; 1];
        stream.read_exact(&mut trailer).map_err(broken)?;
        if got != size || trailer[0] != 0 {
            return Err(ClientError::Refused {
                file: name.name.clone(),
                message: if trailer[0] == 0 {
                    format!("the agent sent {got} of {size} bytes and stopped")
                } else {
                    "the agent could not read it whole, or what it read does not match the \
                     archive's record: the stored file is damaged or was altered (the agent's \
                     log says which)"
                        .to_owned()
                },
            });
        }
        out.sync_all().map_err(file_err)?;
        std::fs::rename(&partial, dest).map_err(|source| ClientError::File {
            path: dest.display().to_string(),
            source,
        })?;
        Ok(got)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

/// The bound `[wal]` socket, for [`serve`]; removes the socket file when dropped.
pub struct WalListener {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

impl Drop for WalListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves `listener` until `shutdown` is cancelled (see the module docs); then removes
/// the socket file.
pub async fn serve(settings: Arc<Settings>, listener: WalListener, shutdown: CancellationToken) {
    tracing::info!(socket = %listener.path.display(), "WAL socket listening.");
    let session: Arc<tokio::sync::Mutex<Kept>> = Arc::default();
    loop {
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "Accepting on the WAL socket failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (settings, session) = (settings.clone(), session.clone());
        tokio::spawn(async move {
            // One request at a time, on the sessions the previous ones left open.
            let mut held = session.lock().await;
            let Ok(stream) = stream.into_std() else {
                return;
            };
            let taken = std::mem::take(&mut *held);
            let result =
                tokio::task::spawn_blocking(move || handle(&settings, taken, stream)).await;
            match result {
                Ok(back) => *held = back,
                Err(e) => tracing::error!(error = %e, error_type = "internal", stage = "wal-push",
                    "A WAL push thread failed."),
            }
        });
    }
}

/// Creates the socket `wal.socket` (and its folder): bound under a temporary name, given
/// its group and mode 0660, then renamed over the path (where a stopped agent may have
/// left its socket; one that an agent listens on is refused). Call within the runtime.
///
/// # Errors
/// Another process listens there, or creating, chown, chmod or rename failed.
pub fn bind(wal: &WalSettings) -> io::Result<WalListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = &wal.socket;
    let context = |what: &str, p: &Path, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
    };
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "another process listens on the WAL socket {} (another agent?)",
                path.display()
            ),
        ));
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(|e| context("creating", dir, e))?;
    let tmp = dir.join(format!(
        ".{}.{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp).map_err(|e| context("binding", &tmp, e))?;
    let placed = std::os::unix::fs::chown(&tmp, None, Some(wal.gid))
        .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660)))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(context("placing", path, e));
    }
    Ok(WalListener {
        listener,
        path: path.clone(),
    })
}

/// The target sessions kept open between requests: pushes' write session (production),
/// gets' read session (staging, where PostgreSQL's recovery asks for one file after
/// another). Each is dropped after a failure that may have broken it.
#[derive(Default)]
struct Kept {
    write: Option<Box<dyn WriteSession>>,
    read: Option<Box<dyn ReadSession>>,
}

/// Serves one connection on a blocking thread: reads the request, pushes or sends, answers.
/// Gives back the sessions, but those that may be broken.
fn handle(settings: &Settings, kept: Kept, mut stream: UnixStream) -> Kept {
    let Kept {
        write: session,
        read,
    } = kept;
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    let header = read_header(&mut stream);
    let (back, result, sent) = match header {
        Ok(mut h) => match (h.op, &settings.keys) {
            (Op::Push, Keys::Encrypt(_)) => {
                let (back, r) = push_one(settings, session, &mut h, &mut stream);
                (back, r.map(|m| (h, m)), false)
            }
            (Op::Get, Keys::Decrypt(_)) => {
                let (sent, back, r) = get_one(settings, read, &mut h, &mut stream);
                let kept = Kept {
                    write: session,
                    read: back,
                };
                return answer(kept, &mut stream, r.map(|m| (h, m)), sent);
            }
            (op, _) => {
                let e = PushError::Role(format!(
                    "agent {} has role {}: {}",
                    settings.id,
                    settings.role,
                    if op == Op::Push {
                        "it restores and may not archive WAL (wal-push runs against the production agent)"
                    } else {
                        "it archives WAL and may not read it back (wal-get runs against a staging agent)"
                    }
                ));
                (session, Err(e), false)
            }
        },
        Err(e) => (session, Err(e), false),
    };
    let kept = Kept { write: back, read };
    answer(kept, &mut stream, result, sent)
}

/// Answers `result` on `stream` (unless the file was `sent` already, its trailer then
/// saying whether it was whole) and logs it; gives back `kept`.
fn answer(
    kept: Kept,
    stream: &mut UnixStream,
    result: Result<(Header, String), PushError>,
    sent: bool,
) -> Kept {
    let answered = match &result {
        Ok((h, message)) => {
            tracing::info!(datastore = %h.datastore, file = %h.file, bytes = h.size, "{message}");
            if sent {
                Ok(())
            } else {
                write_response(stream, Status::Ok, message)
            }
        }
        Err(PushError::NotArchived(path)) => {
            tracing::info!(path = %path, "wal-get asked for a file that is not archived.");
            write_response(
                stream,
                Status::NotArchived,
                &format!("{path} is not archived"),
            )
        }
        Err(e) => {
            let text = ferry_core::telemetry::error_text(e);
            tracing::error!(error = %text, error_type = e.error_type(), stage = "wal",
                "A WAL request failed.");
            if sent {
                Ok(())
            } else {
                write_response(stream, Status::Failed, &text)
            }
        }
    };
    if let Err(e) = answered {
        tracing::warn!(error = %e, "The WAL client left before the answer.");
    }
    kept
}

/// A SHA-256 (lower-case hex) and a byte count.
type Digest = (String, u64);

/// Sends the archived file `h` names back (staging): the response, its size from its
/// record, the plaintext streamed from the target through age and zstd, and a trailer
/// byte saying whether the stored and plain sizes and SHA-256 matched the record, read on
/// `kept` (the session the previous get left open; opened if `None`, and once more if a
/// kept one fails at once: the server may have dropped it while idle). Whether the
/// response was sent (later failures show only in the trailer), the session to keep
/// (`None` after a target failure) and the log message.
fn get_one(
    settings: &Settings,
    kept: Option<Box<dyn ReadSession>>,
    h: &mut Header,
    stream: &mut UnixStream,
) -> (
    bool,
    Option<Box<dyn ReadSession>>,
    Result<String, PushError>,
) {
    let Keys::Decrypt(dec) = &settings.keys else {
        return (false, kept, Err(PushError::Internal("no identity".into())));
    };
    let named = (|| {
        let name = WalFileName::parse(&h.file)?;
        let datastore = wal_datastore(settings, &h.datastore)?;
        Ok::<_, PushError>((name, datastore))
    })();
    let (name, datastore) = match named {
        Ok(n) => n,
        Err(e) => return (false, kept, Err(e)),
    };
    h.datastore.clone_from(&datastore);
    let env = settings
        .source_environment
        .as_deref()
        .unwrap_or(&settings.environment);
    let env_dir = settings.backup_server.environment_dir(env);
    let file = StoredFile {
        dir: wal::timeline_dir(&env_dir, &datastore, &name),
        name: name.stored_name(),
    };
    let record_path = file.manifest_path();
    // A target failure drops the session (`None`); anything else keeps it.
    let prepared = (|| {
        let broken = |e: TargetError| (None, PushError::from(e));
        let reused = kept.is_some();
        let mut session = match kept {
            Some(s) => s,
            None => settings.backup_server.read().map_err(broken)?,
        };
        let size = match session.size(&record_path) {
            Err(_) if reused => {
                session = settings.backup_server.read().map_err(broken)?;
                session.size(&record_path).map_err(broken)?
            }
            other => other.map_err(broken)?,
        };
        if size.is_none() {
            return Err((Some(session), PushError::NotArchived(file.path())));
        }
        let bytes = session
            .read_small(&record_path, MAX_WAL_RECORD_BYTES)
            .map_err(broken)?;
        match WalRecord::from_slice(&record_path, &bytes) {
            Ok(record) => Ok((session, record)),
            Err(e) => Err((Some(session), e.into())),
        }
    })();
    let (mut session, record) = match prepared {
        Ok(p) => p,
        Err((back, e)) => return (false, back, Err(e)),
    };
    h.size = record.bytes;
    let io_err = |stage| move |source| PushError::Io { stage, source };
    let mut head = Vec::new();
    if let Err(e) = write_response(&mut head, Status::Ok, "")
        .and_then(|()| head.write_all(&record.bytes.to_be_bytes()))
        .and_then(|()| stream.write_all(&head))
    {
        return (false, Some(session), Err(io_err("answer")(e)));
    }
    let progress = Progress::new(CancellationToken::new());
    let (tx, rx) = chunks::channel();
    let path = file.path();
    let (downloaded, streamed) = std::thread::scope(|s| {
        let (path, version) = (&path, record.version_id.as_deref());
        let session = &mut session;
        let download = s.spawn(move || session.download_version(path, version, tx));
        let mut sent = 0u64;
        let streamed = (|| -> io::Result<(u64, Digest, Digest)> {
            let (stored, stored_digest) =
                hash::HashingReader::shared(chunks::ChunkReader::new(rx, progress.clone()));
            let plain = compress::decompressor(dec.wrap(stored)?)?;
            let mut plain = hash::HashingReader::new(plain);
            let mut buf = vec![0u8; 64 * 1024];
            let mut rest = (&mut plain).take(record.bytes);
            loop {
                let n = rest.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                stream.write_all(&buf[..n])?;
                sent += n as u64;
            }
            let plain_digest = plain.finish()?;
            Ok((sent, plain_digest, stored_digest.drain()?))
        })();
        // The client reads exactly the announced size before the trailer: a file that
        // failed half-way (it does not decrypt) is padded out, then the trailer says so.
        if streamed.is_err() || sent < record.bytes {
            let pad = vec![0u8; 64 * 1024];
            let mut left = record.bytes.saturating_sub(sent);
            while left > 0 {
                let n = left.min(pad.len() as u64) as usize;
                if stream.write_all(&pad[..n]).is_err() {
                    break;
                }
                left -= n as u64;
            }
        }
        (download.join(), streamed)
    });
    let checked = match (downloaded, streamed) {
        (Err(_), _) => Err(PushError::Internal("the download thread panicked".into())),
        (Ok(Err(e)), _) => Err(e.into()),
        (Ok(Ok(_)), Err(e)) => Err(io_err("download/decrypt/decompress/send")(e)),
        (Ok(Ok(_)), Ok((sent, plain, stored))) => {
            if plain != (record.sha256.clone(), record.bytes)
                || stored != (record.sha256_stored.clone(), record.bytes_stored)
            {
                Err(PushError::Integrity(format!(
                    "{path} does not match its record: stored {} bytes SHA-256 {}, plain {} bytes SHA-256 {} \
                     (the record: {} bytes {}, plain {} bytes {})",
                    stored.1,
                    stored.0,
                    plain.1,
                    plain.0,
                    record.bytes_stored,
                    record.sha256_stored,
                    record.bytes,
                    record.sha256
                )))
            } else {
                Ok(format!(
                    "Sent {path} ({sent} bytes, checked against its record)."
                ))
            }
        }
    };
    // The session stays unless the target failed (the download's error).
    let back = match &checked {
        Err(PushError::Target(_) | PushError::Internal(_)) => None,
        _ => Some(session),
    };
    let trailer = [u8::from(checked.is_err())];
    if let Err(e) = stream.write_all(&trailer) {
        return (true, back, checked.and(Err(io_err("answer")(e))));
    }
    (true, back, checked)
}

/// Checks and pushes one file (naming in `h` the datastore it resolved to); gives back the
/// session (unless it may be broken) and the message for `wal-push`.
fn push_one(
    settings: &Settings,
    session: Option<Box<dyn WriteSession>>,
    h: &mut Header,
    stream: &mut UnixStream,
) -> (Option<Box<dyn WriteSession>>, Result<String, PushError>) {
    let checked = (|| {
        let name = WalFileName::parse(&h.file)?;
        let datastore = wal_datastore(settings, &h.datastore)?;
        h.datastore.clone_from(&datastore);
        if h.size > MAX_WAL_FILE_BYTES {
            return Err(PushError::TooLarge {
                name: name.name,
                size: h.size,
            });
        }
        Ok((name, datastore))
    })();
    let (name, datastore) = match checked {
        Ok(c) => c,
        Err(e) => return (session, Err(e)),
    };
    let file = stored_file(settings, &datastore, &name);
    let reused = session.as_ref().is_some_and(|s| !s.aborted());
    let open = || settings.backup_server.write().map_err(PushError::from);
    let mut session = match session {
        Some(s) if reused => s,
        _ => match open() {
            Ok(s) => s,
            Err(e) => return (None, Err(e)),
        },
    };
    // Nothing is read from wal-push yet: a kept connection that the server dropped while
    // idle is replaced once.
    let mut found = existing(&mut *session, &file);
    if reused && found.is_err() {
        session = match open() {
            Ok(s) => s,
            Err(e) => return (None, Err(e)),
        };
        found = existing(&mut *session, &file);
    }
    let result = found.map_err(PushError::from).and_then(|found| {
        store(
            settings,
            &mut *session,
            &datastore,
            (&name, &file),
            found,
            h.size,
            stream,
        )
    });
    match result {
        Err(e) if e.session_suspect() => (None, Err(e)),
        r => (Some(session), r),
    }
}

/// Staging: the record of the newest WAL segment archived for `datastore` in the source
/// environment on the primary target (`[backup_server]`, where production pushes WAL): the
/// greatest segment name with its record, in the greatest timeline folder that has one;
/// `None` when nothing is archived. History, backup history and `.partial` files are not
/// segments and are passed over.
///
/// # Errors
/// [`PushError::Target`]; [`PushError::Record`] for a record that cannot be read.
pub(crate) fn newest_segment(
    settings: &Settings,
    environment: &str,
    datastore: &str,
) -> Result<Option<WalRecord>, PushError> {
    let env_dir = settings.backup_server.environment_dir(environment);
    let dir = wal::wal_dir(&env_dir, datastore);
    let mut session = settings.backup_server.read()?;
    match ferry_storage::wal::newest_segment_record(&mut *session, &dir, MAX_WAL_RECORD_BYTES)? {
        Some((path, bytes)) => Ok(Some(WalRecord::from_slice(&path, &bytes)?)),
        None => Ok(None),
    }
}

/// `value` quoted for `sh` (single quotes, a quote inside as `'\''`) with every `%`
/// doubled, so that PostgreSQL's `restore_command` placeholders (`%f`, `%p`, `%r`, `%%`)
/// never match inside it.
fn restore_command_word(value: &str) -> String {
    format!("'{}'", value.replace('\'', "'\\''").replace('%', "%%"))
}

/// The `restore_command` a cluster restored by this staging agent runs: `'<agent_binary>'
/// wal-get --socket '<socket>' --datastore '<datastore>' %f %p`, or `None` without
/// `[wal]`.
pub(crate) fn restore_command(settings: &Settings, datastore: &str) -> Option<String> {
    let wal = settings.wal.as_ref()?;
    Some(format!(
        "{} wal-get --socket {} --datastore {} %f %p",
        restore_command_word(&wal.agent_binary.to_string_lossy()),
        restore_command_word(&wal.socket.to_string_lossy()),
        restore_command_word(datastore)
    ))
}

/// Where `name` of `datastore` is stored.
fn stored_file(settings: &Settings, datastore: &str, name: &WalFileName) -> StoredFile {
    let env_dir = settings
        .backup_server
        .environment_dir(&settings.environment);
    StoredFile {
        dir: wal::timeline_dir(&env_dir, datastore, name),
        name: name.stored_name(),
    }
}

/// What the target holds under a file's name.
enum Existing {
    /// Its record's bytes.
    Record(Vec<u8>),
    /// Nothing.
    Nothing,
    /// The file without its record.
    Orphan,
    /// This writer may not read: unknown.
    Unknown,
}

/// Looks at what the target holds under `file`'s name.
///
/// # Errors
/// The target's, other than a writer's being unable to read.
fn existing(session: &mut dyn WriteSession, file: &StoredFile) -> Result<Existing, TargetError> {
    match session.read_back(&file.manifest_path(), MAX_WAL_RECORD_BYTES) {
        Ok(Some(bytes)) => Ok(Existing::Record(bytes)),
        Ok(None) if session.exists(&file.path())? => Ok(Existing::Orphan),
        Ok(None) => Ok(Existing::Nothing),
        // A writer that may not read: the target's versions keep what is there.
        Err(TargetError::Unsupported { .. }) => Ok(Existing::Unknown),
        Err(e) => Err(e),
    }
}

/// The datastore a request names (or the only one archiving WAL).
fn wal_datastore(settings: &Settings, name: &str) -> Result<String, PushError> {
    let archiving: Vec<&str> = settings
        .datastores
        .values()
        .filter(|d| d.archives_wal())
        .map(|d| d.name())
        .collect();
    if name.is_empty() {
        return match archiving.as_slice() {
            [one] => Ok((*one).to_owned()),
            [] => Err(PushError::Datastore(format!(
                "agent {} has no datastore that archives WAL (kind = \"postgres\", method = \"physical\")",
                settings.id
            ))),
            many => Err(PushError::Datastore(format!(
                "agent {} has several datastores that archive WAL ({}): name one with wal-push --datastore",
                settings.id,
                many.join(", ")
            ))),
        };
    }
    if archiving.contains(&name) {
        Ok(name.to_owned())
    } else {
        Err(PushError::Datastore(format!(
            "agent {} has no datastore {} that archives WAL (those that do: {})",
            settings.id,
            Bounded(name),
            archiving.join(", ")
        )))
    }
}

/// Compares with what is stored (`found`), or uploads and commits the file with its
/// record.
fn store(
    settings: &Settings,
    session: &mut dyn WriteSession,
    datastore: &str,
    (name, file): (&WalFileName, &StoredFile),
    found: Existing,
    size: u64,
    stream: &mut UnixStream,
) -> Result<String, PushError> {
    let Keys::Encrypt(enc) = &settings.keys else {
        return Err(PushError::Datastore(format!(
            "agent {} has role {}: it may not archive WAL",
            settings.id, settings.role
        )));
    };
    let short = |got| PushError::Short { got, size };
    match found {
        Existing::Record(bytes) => {
            let stored = WalRecord::from_slice(&file.manifest_path(), &bytes)?;
            let (sha256, got) = hash::HashingReader::new(stream.take(size))
                .finish()
                .map_err(|source| PushError::Io {
                    stage: "read request",
                    source,
                })?;
            if got != size {
                return Err(short(got));
            }
            if stored.sha256 != sha256 || stored.bytes != size {
                return Err(PushError::Differs {
                    path: file.path(),
                    stored_bytes: stored.bytes,
                    stored_sha256: stored.sha256,
                    bytes: size,
                    sha256,
                });
            }
            return Ok(format!(
                "{} was already archived with the same content ({size} bytes).",
                file.path()
            ));
        }
        Existing::Orphan => return Err(PushError::Orphan(file.path())),
        Existing::Nothing | Existing::Unknown => {}
    }

    let job_id = format!("wal{}", ulid::Ulid::new());
    let progress = Progress::new(CancellationToken::new());
    let (tx, rx) = chunks::channel();
    let (staged, produced) = std::thread::scope(|s| {
        let producer = s.spawn(|| -> io::Result<(String, u64, String, u64)> {
            let mut source = hash::HashingReader::new(stream.take(size));
            let sink = chunks::ChunkWriter::new(tx, progress.clone());
            let hashed = hash::HashingWriter::new(sink);
            let encrypted = enc.wrap(hashed)?;
            let mut compressed =
                compress::Compressor::new(encrypted, settings.compression_level, 0)?;
            crate::pipeline::copy(&mut source, &mut compressed)?;
            let encrypted = compressed.finish()?;
            let hashed = encrypted.finish()?;
            let (sink, stored_sha, stored) = hashed.finish();
            sink.finish()?;
            let (sha, bytes) = source.finish()?;
            Ok((sha, bytes, stored_sha, stored))
        });
        let staged = session.stage(file, &job_id, rx);
        (staged, producer.join())
    });
    let staged = staged?;
    let produced = match produced {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(source)) => Err(PushError::Io {
            stage: "compress/encrypt/upload",
            source,
        }),
        Err(_) => Err(PushError::Internal(
            "the compress/encrypt thread panicked".into(),
        )),
    };
    let checked = produced.and_then(|(sha256, bytes, sha256_stored, stored)| {
        if bytes != size {
            Err(short(bytes))
        } else if stored != staged.bytes {
            Err(PushError::Target(TargetError::Io {
                addr: settings.backup_server.describe(),
                op: "check size",
                path: staged.partial.clone(),
                message: format!("holds {} bytes, {stored} were produced", staged.bytes),
            }))
        } else {
            Ok((sha256, sha256_stored))
        }
    });
    let (sha256, sha256_stored) = match checked {
        Ok(c) => c,
        Err(e) => {
            let fates = session.abandon(std::slice::from_ref(&staged.partial));
            tracing::info!(partial = %staged.partial, fates = ?fates, "A failed WAL push's partial file.");
            return Err(e);
        }
    };
    let record = WalRecord {
        record_version: WAL_RECORD_VERSION,
        file: name.name.clone(),
        kind: name.kind,
        timeline: name.timeline.clone(),
        datastore: datastore.to_owned(),
        agent: settings.id.clone(),
        hostname: settings.hostname.clone(),
        environment: settings.environment.clone(),
        pushed: Utc::now(),
        bytes: size,
        sha256,
        bytes_stored: staged.bytes,
        sha256_stored,
        compression: compress::EXTENSION.to_owned(),
        encryption: "age".to_owned(),
        recipients: enc.describe().into_iter().map(|r| r.fingerprint).collect(),
        // Filled by a target with versions at commit.
        version_id: None,
    };
    let stored_bytes = staged.bytes;
    session.commit(&job_id, &[(staged, record.to_json())])?;
    Ok(format!(
        "Archived {} ({size} bytes, {stored_bytes} stored).",
        file.path()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::encrypt::{Encryption, generate_identity};
    use ferry_storage::memory::MemoryTarget;

    fn production(target: &MemoryTarget) -> Settings {
        let (_, recipient) = generate_identity();
        Settings {
            id: "pg-prod".into(),
            ..Settings::for_tests(
                Arc::new(target.clone()),
                Keys::Encrypt(Encryption::from_recipients(&[recipient]).unwrap()),
            )
        }
    }

    /// [`store`] of `bytes` as `name`, sent over a socket pair as wal-push would.
    fn push_bytes(settings: &Settings, name: &str, bytes: &[u8]) -> Result<String, PushError> {
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        let sent = bytes.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = theirs.write_all(&sent);
        });
        let mut session = settings.backup_server.write().unwrap();
        let name = WalFileName::parse(name).unwrap();
        let file = stored_file(settings, "pg", &name);
        let found = existing(&mut *session, &file).unwrap();
        let r = store(
            settings,
            &mut *session,
            "pg",
            (&name, &file),
            found,
            bytes.len() as u64,
            &mut ours,
        );
        writer.join().unwrap();
        r
    }

    #[test]
    fn a_second_push_succeeds_with_the_same_content_and_fails_with_other_content() {
        let target = MemoryTarget::new("/srv/ferry");
        let settings = production(&target);
        let seg = "000000010000000000000007";
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        push_bytes(&settings, seg, &bytes).unwrap();
        let stored = "/srv/ferry/production/pg-wal/00000001/000000010000000000000007.zst.age";
        let first = target.get(stored).unwrap();
        let record = target.get(&format!("{stored}.json")).unwrap();
        let record = WalRecord::from_slice("record", &record).unwrap();
        assert_eq!(record.bytes, bytes.len() as u64);
        assert_eq!(record.kind, wal::WalFileKind::Segment);

        let again = push_bytes(&settings, seg, &bytes).unwrap();
        assert!(
            again.contains("already archived with the same content"),
            "{again}"
        );
        let mut other = bytes.clone();
        other[100] ^= 1;
        let e = push_bytes(&settings, seg, &other).unwrap_err();
        assert!(matches!(e, PushError::Differs { .. }), "{e}");
        // Never overwritten.
        assert_eq!(target.get(stored).unwrap(), first);
    }

    #[test]
    fn a_request_cut_short_leaves_nothing_under_a_final_name() {
        let target = MemoryTarget::new("/srv/ferry");
        let settings = production(&target);
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        theirs.write_all(&[7u8; 1000]).unwrap();
        drop(theirs);
        let mut session = settings.backup_server.write().unwrap();
        let name = WalFileName::parse("000000010000000000000008").unwrap();
        let file = stored_file(&settings, "pg", &name);
        let e = store(
            &settings,
            &mut *session,
            "pg",
            (&name, &file),
            Existing::Nothing,
            5000,
            &mut ours,
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                PushError::Short {
                    got: 1000,
                    size: 5000
                }
            ),
            "{e}"
        );
        let dir = "/srv/ferry/production/pg-wal/00000001";
        let mut read = ferry_storage::Target::read(&target).unwrap();
        let left: Vec<String> = read.list(dir).unwrap();
        assert!(left.iter().all(|n| n.starts_with('.')), "{left:?}");
    }

    #[test]
    fn a_header_reads_back_as_written() {
        let h = Header {
            op: Op::Get,
            datastore: "pg".into(),
            file: "000000010000000000000003".into(),
            size: 16 * 1024 * 1024,
        };
        let mut buf = Vec::new();
        write_header(&mut buf, &h).unwrap();
        assert_eq!(read_header(&mut buf.as_slice()).unwrap(), h);
        buf[4] = 2;
        let e = read_header(&mut buf.as_slice()).unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");
        let e = read_header(&mut &b"GET / HTTP/1.1\r\n"[..]).unwrap_err();
        assert!(matches!(e, PushError::Protocol(_)), "{e}");
    }

    #[test]
    fn a_response_is_bounded_and_reads_back() {
        let mut buf = Vec::new();
        write_response(&mut buf, Status::Failed, &"é".repeat(5000)).unwrap();
        let (status, m) = read_response(&mut buf.as_slice()).unwrap();
        assert_eq!(status, Status::Failed);
        assert!(m.len() <= MAX_RESPONSE_BYTES && m.chars().all(|c| c == 'é'));
        let mut buf = Vec::new();
        write_response(&mut buf, Status::NotArchived, "gone").unwrap();
        assert_eq!(
            read_response(&mut buf.as_slice()).unwrap(),
            (Status::NotArchived, "gone".into())
        );
    }
}
