//! `ferry-storage`: where backups are stored. A storage target is a [`Target`] that opens
//! sessions with three faces, and nothing outside this crate names a kind of target:
//!
//! - [`WriteSession`] (production agents): create a new object from a stream of chunks,
//!   never overwriting one; an object is visible under its final name only once it is
//!   complete and its size checked (the SHA-256 is computed by the pipeline as it streams
//!   and written into the manifest); a backup's parts and their manifests are committed
//!   together, the main part's manifest last.
//! - [`ReadSession`] (staging agents): list, stat (size), read a small object whole,
//!   stream an object.
//! - [`MaintainSession`] (the coordinator's maintenance credentials): remove dated folders,
//!   list and remove the leftovers of failed uploads (partials and orphans) for `ferry
//!   prune`, and, later, extend an object's lock.
//!
//! A differential datastore (rsync mirrors, pgBackRest repositories) asks the target for a
//! [`Mirror`]; a target that cannot hold one says so ([`TargetError::Unsupported`]).
//!
//! [`TargetConfig`] is the serde config of a target (`kind = "sftp"`, the default), and
//! [`TargetConfig::build`] its one match arm per kind returning an `Arc<dyn Target>`.
//!
//! Modules:
//! - [`config`]: [`TargetConfig`], [`TargetConfigError`], `build()`.
//! - [`error`]: [`TargetError`] and [`PartialFate`].
//! - [`chunk`]: the bounded channel of chunks (512 KiB written, 256 KiB read back) between
//!   the pipeline's stages and a session, and the pool its buffers are reused from.
//! - [`leftovers`]: which files of a dated folder failed uploads left, for any target.
//! - [`sftp`]: the SFTP backup server over SSH (libssh2), its watchdog, and the rsync push
//!   and pull of mirrors ([`sftp::rsync`]).
//! - [`s3`]: an S3-compatible bucket (AWS SDK): multipart uploads, versioning, Object
//!   Lock.
//! - [`memory`]: an in-memory target, for unit tests of the pipeline.
//!
//! # How the seam fits object storage (S3)
//!
//! The traits speak of objects named by paths of the layout (`ferry_core::layout`:
//! `<root>/<env>/<date>/<ds>_backup_<stamp>...`); on S3 the path is the key under the
//! target's prefix. What each step is on each target:
//!
//! | step | SFTP | S3 |
//! |---|---|---|
//! | [`WriteSession::stage`] | a hidden `.<name>.<job>.<attempt>.partial` file, its size checked with `stat` | a multipart upload of the final key, parts growing with the stream, each with its `Content-MD5`; its size checked with `ListParts`; nothing is visible until it completes |
//! | [`Staged::partial`] | the hidden file's path | the key and the upload id |
//! | [`WriteSession::commit`] | a rename without overwrite of each part, then each manifest, the main one last | `CompleteMultipartUpload` of each part (its ETag checked against the parts'), then each manifest, with the version id its part's completion gave, uploaded and completed, the main one last; never-overwrite by the bucket's versioning (production may not read, so cannot check first) |
//! | [`ReadSession::download_version`], [`ReadSession::size_version`] | the path (no versions) | `GetObject`, `HeadObject` of the manifest's version id |
//! | [`WriteSession::abandon`] | unlink the hidden file, where the key may | `AbortMultipartUpload` |
//! | [`MaintainSession::leftovers`] | hidden partial files, and data files without a manifest | in-progress multipart uploads, and data objects without a manifest |
//! | [`MaintainSession::extend_lock`] | unsupported | `PutObjectRetention` |
//! | [`Target::check_write`] | list the environment's folder | `CreateMultipartUpload` and `AbortMultipartUpload` of a probe key in it (production may not list) |
//! | [`MaintainSession::retain_until`] | no lock (`None`) | `GetObjectRetention` of each version |
//! | [`Target::mirror`] | rsync over SSH | unsupported |
//!
//! The pipeline sees only these steps, so a new target does not change it: it streams the
//! chunks of [`chunk::channel`] into [`WriteSession::stage`] (one blocking thread per
//! session, no per-chunk dynamic dispatch), and commits once every part is staged.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender};

use ferry_core::layout::StoredFile;

pub mod chunk;
pub mod config;
pub mod error;
pub mod leftovers;
pub mod memory;
pub mod oplog;
pub mod s3;
pub mod sftp;
pub mod wal;

pub use config::{TargetConfig, TargetConfigError};
pub use error::{PartialFate, TargetError};

/// The name of a backup's first storage target (the agents' `[backup_server]`, the
/// coordinator's `[maintenance]`) where copy targets are named (`[copies.<name>]`,
/// `ferry restore --from`).
pub const PRIMARY: &str = "primary";

/// Checks a copy target's name: letters, digits and `-`, at most 64 bytes
/// (`ferry_core::layout::validate_name`), and not [`PRIMARY`].
///
/// # Errors
/// What is wrong with it, for a config error under the name's key.
pub fn validate_target_name(name: &str) -> Result<(), String> {
    ferry_core::layout::validate_name("copy target name", name).map_err(|e| e.to_string())?;
    if name == PRIMARY {
        return Err(format!(
            "{PRIMARY:?} names the first target ([backup_server], [maintenance]); give the copy another name"
        ));
    }
    Ok(())
}

/// A file of continuous archiving, as prune removes it: a WAL file
/// (`<datastore>-wal/<timeline>/<name>.zst.age`) or a MongoDB oplog slice
/// (`<datastore>-oplog/<name>`, [`ferry_core::oplog`]), each with its `.json` record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArchivedFile {
    /// A WAL file.
    Wal(ferry_core::wal::WalFileName),
    /// An oplog slice's stored name (`<from>-<to>.bson.zst.age`).
    Slice(String),
}

impl ArchivedFile {
    /// Its name: the WAL file's as PostgreSQL gave it, the slice's as stored.
    pub fn name(&self) -> &str {
        match self {
            ArchivedFile::Wal(w) => &w.name,
            ArchivedFile::Slice(s) => s,
        }
    }
}

/// The data file and the record of `file` of `datastore` in `environment` under `root`:
/// `(<dir>/<stored name>, <dir>/<stored name>.json)`, or `None` for an environment or
/// datastore name that is not one of the layout, or a slice name that is not one.
pub fn archived_file_paths(
    root: &str,
    environment: &str,
    datastore: &str,
    file: &ArchivedFile,
) -> Option<(String, String)> {
    match file {
        ArchivedFile::Wal(w) => wal::wal_file_paths(root, environment, datastore, w),
        ArchivedFile::Slice(name) => {
            if ferry_core::layout::validate_name("environment", environment).is_err()
                || ferry_core::layout::validate_name("datastore", datastore).is_err()
                || !ferry_core::oplog::is_slice_name(name)
            {
                return None;
            }
            let env_dir = ferry_core::layout::environment_dir(root, environment);
            let data = format!(
                "{}/{name}",
                ferry_core::oplog::oplog_dir(&env_dir, datastore)
            );
            let record = format!("{data}.json");
            Some((data, record))
        }
    }
}

/// Seconds since the Unix epoch, now (for objects' idle times).
pub(crate) fn now_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// A part written whole to its partial object, waiting for [`WriteSession::commit`] or
/// [`WriteSession::abandon`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Staged {
    /// Where it goes.
    pub file: StoredFile,
    /// The partial object, as the session that staged it names it: on SFTP the full path
    /// of the hidden partial file.
    pub partial: String,
    /// Bytes stored, checked against the target's size of the object.
    pub bytes: u64,
}

/// An object that a failed or interrupted upload left in a dated folder
/// ([`MaintainSession::leftovers`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leftover {
    /// Environment.
    pub environment: String,
    /// `YYYY-MM-DD` of its folder.
    pub date: String,
    /// Full path on the target.
    pub path: String,
    /// Size, bytes.
    pub size: u64,
    /// Seconds since it was last modified (the target's modification time against this
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
    /// A partial upload (on SFTP a hidden `.<name>.<job>.<attempt>.partial` file), with
    /// the job ids (ULIDs) in its name (none in names of other writers).
    Partial {
        /// ULIDs found in the name.
        job_ids: Vec<String>,
    },
    /// A data object under its final name that no committed backup includes: it has no
    /// manifest, or it is a companion part whose main part was never committed. Readers
    /// ignore it; only its bytes are lost.
    Orphan,
}

/// Closes a session's connection from another thread (a cancelled job): the call waiting
/// on it fails at once, and so does every later one.
#[derive(Clone)]
pub struct Aborter(Arc<dyn Fn() + Send + Sync>);

impl Aborter {
    /// An aborter that calls `abort`.
    pub fn new(abort: impl Fn() + Send + Sync + 'static) -> Aborter {
        Aborter(Arc::new(abort))
    }

    /// Closes the connection now.
    pub fn abort(&self) {
        (self.0)()
    }
}

impl std::fmt::Debug for Aborter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Aborter")
    }
}

/// A configured storage target: opens sessions, and places the layout's folders.
/// [`TargetConfig::build`] makes one.
pub trait Target: Send + Sync + std::fmt::Debug {
    /// The target's kind, as in its config: `sftp`, `memory`.
    fn kind(&self) -> &'static str;

    /// Who and where, for messages: `user@host:port` on SFTP.
    fn describe(&self) -> String;

    /// The folder of `environment` in the layout on this target (`<root>/<environment>`),
    /// the parent of its dated folders.
    fn environment_dir(&self, environment: &str) -> String;

    /// The dated folder of `environment` for `date` (`<root>/<environment>/<YYYY-MM-DD>`),
    /// where a backup of that day goes.
    fn dated_dir(&self, environment: &str, date: chrono::NaiveDate) -> String {
        format!(
            "{}/{}",
            self.environment_dir(environment),
            date.format("%Y-%m-%d")
        )
    }

    /// What `ferry-agent check` says of a writer's access to `environment`'s folder, where
    /// its backups go, e.g. `/srv/ferry/production holds 3 entries`. By default the folder
    /// is listed on a read session; a target whose writers may not list (S3, whose
    /// production credentials may only put) proves instead that an upload may start there,
    /// and leaves nothing behind.
    ///
    /// # Errors
    /// [`TargetError`] of the call that was refused or failed, naming the path.
    fn check_write(&self, environment: &str) -> Result<String, TargetError> {
        let dir = self.environment_dir(environment);
        let n = self.read()?.list(&dir)?.len();
        Ok(format!("{dir} holds {n} entries"))
    }

    /// Opens a session to write new objects.
    ///
    /// # Errors
    /// [`TargetError::Connect`], [`TargetError::HostKey`], [`TargetError::Auth`],
    /// [`TargetError::Stalled`].
    fn write(&self) -> Result<Box<dyn WriteSession>, TargetError>;

    /// Opens a session to read objects.
    ///
    /// # Errors
    /// As [`Target::write`].
    fn read(&self) -> Result<Box<dyn ReadSession>, TargetError>;

    /// Opens a maintenance session (with credentials that may delete).
    ///
    /// # Errors
    /// As [`Target::write`].
    fn maintain(&self) -> Result<Box<dyn MaintainSession>, TargetError>;

    /// Whether this target locks objects ([`MaintainSession::extend_lock`] and
    /// [`MaintainSession::retain_until`] work): an S3 target with `lock`; `false` by
    /// default.
    fn object_lock(&self) -> bool {
        false
    }

    /// The mirror access of differential datastores (rsync mirrors, pgBackRest
    /// repositories), for this target's own login.
    ///
    /// # Errors
    /// [`TargetError::Unsupported`] on a target that cannot hold a mirror (the default);
    /// [`TargetError::Io`] if its local set-up fails.
    fn mirror(&self) -> Result<Box<dyn Mirror>, TargetError> {
        Err(TargetError::Unsupported {
            addr: self.describe(),
            kind: self.kind(),
            what: "an rsync mirror (a differential datastore)",
        })
    }
}

/// Writes new objects; never overwrites one, and deletes only its own partial objects
/// (where the target lets it) and, when a commit fails half-way, what that commit had put
/// in place. Its calls block: run them on a thread of their own.
pub trait WriteSession: Send {
    /// Streams chunks from `chunks` into the partial object of `file` (named with
    /// `job_id` and the attempt) until the sender hangs up, then checks the stored size.
    /// Creates missing folders and first removes the datastore's abandoned partials. The
    /// partial stays invisible until [`WriteSession::commit`]. A sender that hangs up
    /// early ends the stream as well: the caller, which knows whether the stream was
    /// whole, commits or abandons.
    ///
    /// # Errors
    /// [`TargetError`]; [`TargetError::Exists`] if `file` exists; the partial is removed
    /// where the target allows it ([`TargetError::NoSpace`] and
    /// [`TargetError::QuotaExceeded`] say whether it was).
    fn stage(
        &mut self,
        file: &StoredFile,
        job_id: &str,
        chunks: Receiver<Vec<u8>>,
    ) -> Result<Staged, TargetError>;

    /// Puts a backup in place: `parts` in order, each with its manifest's bytes, the main
    /// part last. Writes every manifest as a partial first, then commits the data parts,
    /// then the manifests (a target with versions, S3, commits the data parts first and then
    /// writes each manifest with its part's version id in `version_id`): a reader takes a backup for one only by its main part's
    /// manifest, which comes last, so an interruption at any step leaves nothing a reader
    /// takes for a backup. Never overwrites an object.
    ///
    /// # Errors
    /// [`TargetError::Commit`] naming what could not be undone (left under a final
    /// name without a manifest, for `ferry prune`).
    fn commit(&mut self, job_id: &str, parts: &[(Staged, Vec<u8>)]) -> Result<(), TargetError>;

    /// Removes partial objects (as in [`Staged::partial`]) that will not be committed,
    /// where the target allows it; what became of each.
    fn abandon(&mut self, partials: &[String]) -> Vec<PartialFate>;

    /// Whether `path` exists.
    ///
    /// # Errors
    /// [`TargetError::Io`] for failures other than "no such object".
    fn exists(&mut self, path: &str) -> Result<bool, TargetError>;

    /// Whether [`WriteSession::exists`] has seen what is there: `false` once the target
    /// refused this writer a look (S3, whose production credentials may only put: `exists`
    /// then says `false` for everything). A backup then takes the most specific name (to
    /// the second) rather than one an earlier backup of the day may hold.
    fn sees_existing(&self) -> bool {
        true
    }

    /// The whole of a small object (at most `max` bytes) where this writer's credentials
    /// may read it back; `None` if it does not exist. For a writer that must compare what
    /// is there before it writes again (a WAL file pushed twice).
    ///
    /// # Errors
    /// [`TargetError::Unsupported`] where writers may not read (the default: S3, whose
    /// production credentials may only put); [`TargetError::TooLarge`];
    /// [`TargetError::Io`].
    fn read_back(&mut self, path: &str, max: u64) -> Result<Option<Vec<u8>>, TargetError> {
        let _ = (path, max);
        Err(TargetError::Unsupported {
            addr: String::new(),
            kind: "write-only",
            what: "reading an object back with write credentials",
        })
    }

    /// A handle that closes this session's connection from another thread.
    fn aborter(&self) -> Aborter;

    /// Whether an [`Aborter`] closed the connection.
    fn aborted(&self) -> bool;

    /// The partial objects this session could not remove because its connection had
    /// failed or been aborted (another session may).
    fn take_unremoved(&mut self) -> Vec<String>;
}

/// Reads objects. Its calls block: run them on a thread of their own.
pub trait ReadSession: Send {
    /// Names in `dir` (no `.` or `..`); empty if the folder does not exist.
    ///
    /// # Errors
    /// [`TargetError::Io`].
    fn list(&mut self, dir: &str) -> Result<Vec<String>, TargetError>;

    /// The size of `path` in bytes; `None` if it does not exist.
    ///
    /// # Errors
    /// [`TargetError::Io`] for failures other than "no such object".
    fn size(&mut self, path: &str) -> Result<Option<u64>, TargetError>;

    /// The whole of a small object, at most `max` bytes.
    ///
    /// # Errors
    /// [`TargetError::TooLarge`] or [`TargetError::Io`].
    fn read_small(&mut self, path: &str, max: u64) -> Result<Vec<u8>, TargetError>;

    /// Streams `path` into `chunks` (of [`chunk::READ_CHUNK_BYTES`] at most); returns the
    /// bytes read. Stops early (Ok) if the receiver hangs up.
    ///
    /// # Errors
    /// [`TargetError::Io`].
    fn download(&mut self, path: &str, chunks: SyncSender<Vec<u8>>) -> Result<u64, TargetError>;

    /// [`ReadSession::size`] of the version `version_id` of `path` (a manifest's
    /// `version_id`); a target without versions ignores the id.
    ///
    /// # Errors
    /// As [`ReadSession::size`].
    fn size_version(
        &mut self,
        path: &str,
        version_id: Option<&str>,
    ) -> Result<Option<u64>, TargetError> {
        let _ = version_id;
        self.size(path)
    }

    /// [`ReadSession::download`] of the version `version_id` of `path` (a manifest's
    /// `version_id`), so that a later write of the same key does not change what is read.
    /// A target without versions (SFTP, memory) ignores the id and reads `path` (a manifest
    /// copied from a versioned target names a version only there).
    ///
    /// # Errors
    /// [`TargetError::Io`]; [`TargetError::NotFound`] if that version does not exist.
    fn download_version(
        &mut self,
        path: &str,
        version_id: Option<&str>,
        chunks: SyncSender<Vec<u8>>,
    ) -> Result<u64, TargetError> {
        let _ = version_id;
        self.download(path, chunks)
    }
}

/// Removes what retention drops and what failed uploads left, with credentials that may
/// delete. Its calls block: run them on a thread of their own.
pub trait MaintainSession: ReadSession {
    /// Removes a dated folder `<root>/<environment>/<YYYY-MM-DD>` (or of `_ferry`, the
    /// coordinator's self-backups: [`ferry_core::layout::holds_dated_folders`]) and the
    /// objects in it; returns `(objects, bytes)` removed. Anything else is refused: a path
    /// outside the root, a last component that is not a date, a subfolder inside.
    ///
    /// # Errors
    /// [`TargetError::Io`] naming the path.
    fn remove_dated_folder(
        &mut self,
        environment: &str,
        date: &str,
    ) -> Result<(u64, u64), TargetError>;

    /// What failed or interrupted uploads left in `environment`'s dated folders
    /// ([`leftovers`]): partial objects, and data objects under a final name that no
    /// committed backup includes.
    ///
    /// # Errors
    /// [`TargetError::Io`] naming the folder that could not be listed.
    fn leftovers(&mut self, environment: &str) -> Result<Vec<Leftover>, TargetError>;

    /// Removes `leftover` (and the manifest of an orphan companion), as listed by
    /// [`MaintainSession::leftovers`]; returns the bytes removed. Refuses a path that is
    /// not in a dated folder of the layout.
    ///
    /// # Errors
    /// [`TargetError::Io`] naming the object that could not be removed.
    fn remove_leftover(&mut self, leftover: &Leftover) -> Result<u64, TargetError>;

    /// Removes one archived file ([`archived_file_paths`]: a WAL file,
    /// `<root>/<environment>/<datastore>-wal/<timeline>/<file>.zst.age`, or an oplog slice,
    /// `<root>/<environment>/<datastore>-oplog/<name>`; every version, on a target with
    /// versions) and then its `.json` record; returns the bytes removed (0 when it was not
    /// there). Anything that is not such a path is refused.
    ///
    /// # Errors
    /// [`TargetError::Io`] naming the object.
    fn remove_archived_file(
        &mut self,
        environment: &str,
        datastore: &str,
        file: &ArchivedFile,
    ) -> Result<u64, TargetError>;

    /// Keeps `path` from being deleted or overwritten until `until` (UTC), on a target
    /// with object locks; a lock is only ever extended.
    ///
    /// # Errors
    /// [`TargetError::Unsupported`] on a target without locks (SFTP, memory).
    fn extend_lock(
        &mut self,
        path: &str,
        until: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), TargetError>;

    /// Until when `path` is locked: the earliest retain-until (UTC) among its versions,
    /// `None` when a version has no lock (or the target has no locks, the default). A
    /// retain-until in the past means the lock has expired.
    ///
    /// # Errors
    /// [`TargetError::NotFound`] if `path` has no version; [`TargetError::Io`].
    fn retain_until(
        &mut self,
        path: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, TargetError> {
        let _ = path;
        Ok(None)
    }
}

/// How a differential datastore reaches its mirror on the target with the stock `rsync`
/// (no crate speaks the rsync protocol to a stock rsync). Holds what its commands need
/// (e.g. a temporary known_hosts file) until dropped.
pub trait Mirror: Send + Sync {
    /// The mirror folder of `name` in `environment`, with a trailing `/`, as the mirror's
    /// login sees it (for reports).
    fn dir(&self, environment: &str, name: &str) -> String;

    /// [`Mirror::dir`] as an rsync argument (`user@host:<dir>`).
    fn remote(&self, environment: &str, name: &str) -> String {
        format!("{}{}", self.prefix(), self.dir(environment, name))
    }

    /// What goes before a path on the target in an rsync argument (`user@host:`).
    fn prefix(&self) -> String;

    /// `rsync` for an upload: [`Mirror::rsync`] with the target's upload rate limit.
    fn rsync_up(&self) -> tokio::process::Command;

    /// `rsync` with the remote shell and the options both directions use (`-a
    /// --checksum --numeric-ids`).
    fn rsync(&self) -> tokio::process::Command;
}
