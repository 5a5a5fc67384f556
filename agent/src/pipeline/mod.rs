//! The streaming pipeline of DESIGN.md, for any datastore:
//!
//! - backup: `dump → count → compress (zstd) → encrypt (age) → hash (SHA-256) → upload`,
//!   one blocking thread for the stages and one for the SSH transport, joined by a
//!   bounded channel of 1 MiB chunks: memory is constant and back-pressure reaches the
//!   dump tool. Every part is written as a hidden partial; only after every part dumped
//!   and uploaded completely does one connection (the last part's) write the manifests
//!   (hidden too), then rename the parts into place, then the manifests, the main part's
//!   last: it is what makes readers take it for a backup.
//! - restore: find the backup the order names (the coordinator's catalog choice), or the
//!   newest complete backup (or a date's); check the size and SHA-256
//!   of each part that a tool applies to live data as it reads (PostgreSQL's roles) in a
//!   first pass that reads and hashes only; then stream every part `download → hash →
//!   decrypt → decompress → restore tool` into the datastore's session, which stages it
//!   beside the target ([`crate::datastore::Restorer::stages_part`]); check each part's
//!   hash at its end, and only then let the datastore commit (swap into place).
//!
//! The pipeline never names a datastore: it sees [`Dumper`], [`Restorer`](crate::datastore::Restorer) and bytes.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};

use crate::config::{Keys, Settings};
use crate::datastore::{Datastore, DumpError, Dumper, Part, RestoreError};
use crate::transport::sftp::SftpSession;
use crate::transport::watchdog::Aborter;
use crate::transport::{Downloader, Staged, TransportError, Uploader};
use ferry_core::Bounded;
use ferry_core::layout::{self, StoredFile};
use ferry_core::manifest::{MANIFEST_VERSION, MAX_MANIFEST_BYTES, Manifest, ManifestError};

pub mod chunks;
pub mod compress;
pub mod encrypt;
pub mod hash;
pub mod mirror;
pub mod progress;

pub use progress::Progress;

/// Why a job failed, with enough to tell the operator what to do.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The order is outside this agent's role.
    #[error("{0}")]
    PermissionDenied(String),
    /// The order names something that does not exist or is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// No backup to restore.
    #[error("{0}")]
    NotFound(String),
    /// The dump failed.
    #[error("dump of datastore {datastore:?} failed: {source}")]
    Dump {
        /// Datastore name.
        datastore: String,
        /// What failed.
        #[source]
        source: DumpError,
    },
    /// The dump ended without producing anything.
    #[error("dump of datastore {0:?} produced no data; nothing was stored")]
    EmptyDump(String),
    /// The backup server could not be used.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A stored file does not match its manifest, or does not decrypt.
    #[error("{0}")]
    Integrity(String),
    /// A manifest is unreadable.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The restore failed.
    #[error("restore of datastore {datastore:?} failed: {source}; {target_state}")]
    Restore {
        /// Datastore name.
        datastore: String,
        /// What failed.
        #[source]
        source: RestoreError,
        /// Whether the target was left as it was, or how it was changed.
        target_state: String,
    },
    /// The stages failed (compression, encryption, local I/O).
    #[error("{stage} failed: {source}")]
    Stage {
        /// Stage name.
        stage: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Cancelled by an operator (or the coordinator).
    #[error("job cancelled")]
    Cancelled,
    /// Stopped by the agent's shutdown (SIGTERM or SIGINT); trying again once the agent
    /// is back may succeed.
    #[error(
        "the agent stopped (SIGTERM or SIGINT) while the job ran; it can run again once the agent is back"
    )]
    Stopped,
    /// A bug or a panicked thread.
    #[error("internal error: {0}")]
    Internal(String),
}

impl JobError {
    /// Whether trying the same order again may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            JobError::Transport(t) => t.retryable(),
            JobError::Dump { .. }
            | JobError::Stage { .. }
            | JobError::Internal(_)
            | JobError::Stopped => true,
            _ => false,
        }
    }
}

/// What a finished job reports.
#[derive(Clone, Debug)]
pub struct JobReport {
    /// Path of the main archive on the backup server.
    pub stored_path: String,
    /// Its size, bytes.
    pub size_bytes: u64,
    /// Its SHA-256, lower-case hex.
    pub sha256: String,
    /// Size before compression, bytes.
    pub bytes_uncompressed: u64,
    /// Environment of the backup.
    pub environment: String,
    /// `YYYY-MM-DD` of its folder.
    pub date: String,
    /// Datastore kind.
    pub kind: String,
    /// A human summary.
    pub summary: String,
    /// Restores and verifies: when the backup they read finished (UTC ms), so the
    /// coordinator can tell the age of the restored data (the recovery point).
    pub data_finished_ms: Option<i64>,
}

/// Bytes moved at a time between the stages of one thread: std's `io::copy` moves 8 KiB,
/// a system call per 8 KiB from a dump tool's pipe or into a restore tool's.
const COPY_BUFFER_BYTES: usize = 256 * 1024;

/// Copies `reader` to `writer` to the end, [`COPY_BUFFER_BYTES`] at a time; the bytes
/// copied.
///
/// # Errors
/// Reading or writing failed (an interrupted call is retried).
fn copy(reader: &mut impl io::Read, writer: &mut impl io::Write) -> io::Result<u64> {
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        writer.write_all(&buf[..n])?;
        total += n as u64;
    }
}

fn join_error(e: tokio::task::JoinError) -> JobError {
    JobError::Internal(format!("a pipeline thread failed: {e}"))
}

/// One part streamed whole to its hidden partial file, waiting for the commit.
struct StagedPart {
    part: Part,
    staged: Staged,
    sha256: String,
    uncompressed: u64,
    outcome: crate::datastore::DumpOutcome,
    started: DateTime<Utc>,
}

/// Runs `f` with the session on a blocking thread and gives the session back (lost only
/// if `f` panicked).
async fn on_session<T: Send + 'static>(
    mut session: SftpSession,
    f: impl FnOnce(&mut SftpSession) -> T + Send + 'static,
) -> Result<(SftpSession, T), JobError> {
    tokio::task::spawn_blocking(move || {
        let out = f(&mut session);
        (session, out)
    })
    .await
    .map_err(join_error)
}

/// Runs a backup of `datastore`: every part dumped, compressed, encrypted, hashed and
/// streamed to a hidden partial file, then, once every part is whole, the manifests
/// written and everything put in place on the last part's connection
/// ([`Uploader::commit`]: the main part's manifest last, so that a reader never takes an
/// interrupted commit for a backup).
///
/// # Errors
/// [`JobError`]; on error nothing a reader takes for a backup is left, and the partial
/// files are removed where the server allows it.
pub async fn backup(
    settings: Arc<Settings>,
    datastore: Arc<dyn Datastore>,
    job_id: String,
    progress: Progress,
) -> Result<JobReport, JobError> {
    let Keys::Encrypt(_) = &settings.keys else {
        return Err(JobError::PermissionDenied(format!(
            "agent {} has role {}: it holds no recipients and may not back up",
            settings.id, settings.role
        )));
    };
    let started = Utc::now();
    let dumper = datastore.dumper()?;
    let parts = dumper.parts();
    let names = {
        let (settings, name) = (settings.clone(), datastore.name().to_owned());
        tokio::task::spawn_blocking(move || {
            let mut session = settings.backup_server.connect()?;
            choose_names(&mut session, &settings, &name, parts, started)
        })
        .await
        .map_err(join_error)??
    };

    // Each part streams on a connection of its own, opened once its dump has started (a
    // dump tool may take long to produce its first byte, and an idle connection may be
    // dropped on the way); the last one, fresh, commits them all.
    let mut staged: Vec<StagedPart> = Vec::new();
    let mut last: Option<SftpSession> = None;
    for (part, file) in parts.iter().zip(names) {
        // The previous part's connection is not needed any more.
        drop(last.take());
        let result = backup_part(
            &settings,
            dumper,
            datastore.name(),
            part,
            file,
            &job_id,
            &progress,
        )
        .await;
        match result {
            Ok((s, p)) => {
                last = Some(s);
                staged.push(p);
            }
            Err((back, this, e)) => {
                let mut partials: Vec<Staged> = staged.into_iter().map(|p| p.staged).collect();
                partials.extend(this);
                abandon(&settings, back, partials).await;
                return Err(e);
            }
        }
    }
    let Some(session) = last else {
        return Err(JobError::Internal("the datastore has no parts".into()));
    };

    // Every part is whole: describe each, then commit them all on one session (never a
    // new connection between the parts' renames and the manifests').
    progress.set_stage("commit");
    let finished = Utc::now();
    let recipients = match &settings.keys {
        Keys::Encrypt(enc) => enc.describe(),
        Keys::Decrypt(_) => Vec::new(),
    };
    let mut companions = Vec::new();
    let mut report = None;
    let mut commit = Vec::new();
    for p in &staged {
        let is_main = p.part.name.is_empty();
        let manifest = Manifest {
            manifest_version: MANIFEST_VERSION,
            file: p.staged.file.name.clone(),
            datastore: datastore.name().to_owned(),
            kind: datastore.kind().to_owned(),
            part: p.part.name.to_owned(),
            format: p.part.format.to_owned(),
            compression: compress::EXTENSION.to_owned(),
            encryption: "age".to_owned(),
            agent: settings.id.clone(),
            hostname: settings.hostname.clone(),
            environment: settings.environment.clone(),
            date: started.format("%Y-%m-%d").to_string(),
            started: p.started,
            finished,
            source: p.outcome.source.clone(),
            bytes_uncompressed: p.uncompressed,
            bytes_stored: p.staged.bytes,
            sha256: p.sha256.clone(),
            recipients: recipients.clone(),
            companions: if is_main {
                companions.clone()
            } else {
                Vec::new()
            },
            counts: p.outcome.counts.clone(),
        };
        commit.push((p.staged.clone(), manifest.to_json()));
        if is_main {
            report = Some(JobReport {
                data_finished_ms: None,
                stored_path: p.staged.file.path(),
                size_bytes: p.staged.bytes,
                sha256: p.sha256.clone(),
                bytes_uncompressed: p.uncompressed,
                environment: settings.environment.clone(),
                date: manifest.date.clone(),
                kind: manifest.kind.clone(),
                summary: p.outcome.summary.clone(),
            });
        } else {
            companions.push(p.staged.file.name.clone());
        }
    }
    let partials = || staged.iter().map(|p| p.staged.clone()).collect();
    let Some(report) = report else {
        abandon(&settings, Some(session), partials()).await;
        return Err(JobError::Internal("the datastore has no main part".into()));
    };
    if progress.cancel.is_cancelled() {
        abandon(&settings, Some(session), partials()).await;
        return Err(JobError::Cancelled);
    }
    let job = job_id.clone();
    let (_session, committed) = on_session(session, move |s| s.commit(&job, &commit)).await?;
    committed?;
    Ok(report)
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Removes staged partial files where the server allows it, on `session`, or on a new
/// connection when a cancel closed that one (the server itself is likely fine). A session
/// lost to a panic, or a connection that failed, leaves them hidden: the next upload of
/// the datastore, or `ferry prune`, removes them.
async fn abandon(settings: &Arc<Settings>, session: Option<SftpSession>, partials: Vec<Staged>) {
    let mut paths: Vec<String> = partials.into_iter().map(|s| s.partial).collect();
    let session = match session {
        Some(mut aborted) if aborted.aborted() => {
            paths.extend(aborted.take_unremoved());
            drop(aborted);
            if paths.is_empty() {
                return;
            }
            let server = settings.backup_server.clone();
            match tokio::task::spawn_blocking(move || server.connect()).await {
                Ok(Ok(s)) => s,
                _ => return,
            }
        }
        Some(s) => s,
        None => return,
    };
    if paths.is_empty() {
        return;
    }
    let _ = on_session(session, move |s| s.abandon(&paths)).await;
}

/// Picks the first stamp under which no part's file (nor its manifest) exists yet.
fn choose_names(
    session: &mut SftpSession,
    settings: &Settings,
    datastore: &str,
    parts: &'static [Part],
    at: DateTime<Utc>,
) -> Result<Vec<StoredFile>, JobError> {
    let dir = layout::dated_dir(session.root(), &settings.environment, at.date_naive());
    for stamp in layout::candidate_stamps(at) {
        let files: Vec<StoredFile> = parts
            .iter()
            .map(|p| StoredFile {
                dir: dir.clone(),
                name: layout::file_name(
                    &layout::part_stem(datastore, p.name),
                    &stamp,
                    p.format,
                    compress::EXTENSION,
                ),
            })
            .collect();
        let mut free = true;
        for f in &files {
            if session.exists(&f.path())? || session.exists(&f.manifest_path())? {
                free = false;
                break;
            }
        }
        if free {
            return Ok(files);
        }
    }
    Err(JobError::Internal(format!(
        "every name for a backup of {datastore} at {at} is taken in {dir}"
    )))
}

/// Streams one part to a hidden partial file on a new connection; gives the session back,
/// and on error the session (unless the connection failed or its thread panicked) and the
/// part's partial file if it was written whole.
async fn backup_part(
    settings: &Arc<Settings>,
    dumper: &dyn Dumper,
    datastore: &str,
    part: &Part,
    file: StoredFile,
    job_id: &str,
    progress: &Progress,
) -> Result<(SftpSession, StagedPart), PartFailure> {
    let started = Utc::now();
    progress.set_stage("dump");
    progress.reset();
    let stream = match dumper.dump(part).await {
        Ok(s) => s,
        Err(source) => {
            let e = JobError::Dump {
                datastore: datastore.to_owned(),
                source,
            };
            return Err((None, None, e));
        }
    };

    let (tx, rx) = chunks::channel();
    // A cancel (an operator's, or the coordinator's after agent_timeout_seconds) closes the
    // connection: a call waiting on a stalled server would otherwise hold the job until
    // io_timeout_seconds.
    let aborter: Arc<std::sync::Mutex<Option<Aborter>>> = Arc::default();
    let _on_cancel = {
        let (aborter, cancel) = (aborter.clone(), progress.cancel.clone());
        AbortOnDrop(tokio::spawn(async move {
            cancel.cancelled().await;
            if let Some(a) = aborter.lock().unwrap_or_else(|e| e.into_inner()).take() {
                a.abort();
            }
        }))
    };
    // Started at once: it takes the chunks as the stages produce them.
    let upload = {
        let (settings, file, job_id) = (settings.clone(), file.clone(), job_id.to_owned());
        tokio::task::spawn_blocking(move || {
            let mut session = match settings.backup_server.connect() {
                Ok(s) => s,
                Err(e) => {
                    drop(rx);
                    return (None, Err(e));
                }
            };
            *aborter.lock().unwrap_or_else(|e| e.into_inner()) = Some(session.aborter());
            let staged = session.stage(&file, &job_id, rx);
            (Some(session), staged)
        })
    };

    // From the dump's first byte to its end, while the upload holds the dump up, the byte
    // counters are what shows the job alive to the coordinator (`Progress::streaming`).
    progress.set_streaming(true);
    let stages = {
        let settings = settings.clone();
        let progress = progress.clone();
        let reader = stream.reader;
        tokio::task::spawn_blocking(move || -> io::Result<(String, u64, u64)> {
            let Keys::Encrypt(enc) = &settings.keys else {
                return Err(io::Error::other("no recipients"));
            };
            let mut source = progress::CountingReader::new(reader, progress.clone());
            let sink = chunks::ChunkWriter::new(tx, progress.clone());
            let hashed = hash::HashingWriter::new(sink);
            let encrypted = enc.wrap(hashed)?;
            let mut compressed = compress::Compressor::new(encrypted)?;
            copy(&mut source, &mut compressed)?;
            let encrypted = compressed.finish()?;
            let hashed = encrypted.finish()?;
            let (sink, sha256, stored) = hashed.finish();
            sink.finish()?;
            Ok((sha256, stored, progress.bytes().0))
        })
    };
    let produced = stages.await;
    progress.set_streaming(false);
    let outcome = stream.finish.await;
    let (session, uploaded) = match upload.await {
        Ok((s, r)) => (s, r),
        Err(e) => return Err((None, None, join_error(e))),
    };

    let checked: Result<StagedPart, (Option<Staged>, JobError)> =
        match (uploaded, outcome, produced) {
            (uploaded, _, _) if progress.cancel.is_cancelled() => {
                Err((uploaded.ok(), JobError::Cancelled))
            }
            // The transport's own error explains a broken pipe better than the pipe does.
            (Err(t), _, _) => Err((None, JobError::Transport(t))),
            (Ok(s), _, Err(e)) => Err((Some(s), join_error(e))),
            (Ok(s), Err(source), _) => Err((
                Some(s),
                JobError::Dump {
                    datastore: datastore.to_owned(),
                    source,
                },
            )),
            (Ok(s), _, Ok(Err(source))) => Err((
                Some(s),
                JobError::Stage {
                    stage: "compress/encrypt/upload",
                    source,
                },
            )),
            (Ok(s), Ok(_), Ok(Ok((_, _, 0)))) => {
                Err((Some(s), JobError::EmptyDump(datastore.to_owned())))
            }
            (Ok(s), Ok(_), Ok(Ok((_, stored, _)))) if s.bytes != stored => {
                let e = JobError::Integrity(format!(
                    "{} holds {} bytes, {stored} were produced",
                    s.partial, s.bytes
                ));
                Err((Some(s), e))
            }
            (Ok(s), Ok(outcome), Ok(Ok((sha256, _, uncompressed)))) => Ok(StagedPart {
                part: *part,
                staged: s,
                sha256,
                uncompressed,
                outcome,
                started,
            }),
        };
    match (session, checked) {
        (Some(session), Ok(p)) => Ok((session, p)),
        (None, Ok(p)) => Err((
            None,
            Some(p.staged),
            JobError::Internal("the upload's session was lost".into()),
        )),
        (session, Err((staged, e))) => Err((session, staged, e)),
    }
}

/// A part that failed: the session (unless its thread panicked), the part's partial file
/// if it was written whole, and the error.
type PartFailure = (Option<SftpSession>, Option<Staged>, JobError);

/// A backup found on the server: every file in restore order, with its manifest.
struct FoundBackup {
    files: Vec<(String, Manifest)>,
}

/// Finds the backup of `datastore` in `environment` that a restore or verify reads:
/// `file` in `date`'s folder if the order names it (the coordinator's catalog choice),
/// else the complete one whose manifest finished last (on `date` if given; whatever the
/// folder names, and passing over any finished more than [`FUTURE_TOLERANCE`] in the
/// future by this agent's clock). A backup is complete when its main archive and the
/// archive's manifest are both under their final names.
///
/// # Errors
/// [`JobError::NotFound`] (naming `file` when it was named: no other backup is taken in
/// its place), [`JobError::Integrity`] for a manifest that describes another file,
/// [`JobError::InvalidArgument`] for a backup of another kind, transport errors.
fn find_backup(
    settings: &Settings,
    environment: &str,
    datastore: &dyn Datastore,
    date: Option<&str>,
    file: Option<&str>,
) -> Result<FoundBackup, JobError> {
    let mut session = settings.backup_server.connect()?;
    let env_dir = layout::environment_dir(session.root(), environment);
    let name = datastore.name();
    if let (Some(day), Some(f)) = (date, file) {
        let dir = format!("{env_dir}/{day}");
        let entries = session.list(&dir)?;
        let missing = match (
            entries.iter().any(|e| e == f),
            entries.contains(&format!("{f}.json")),
        ) {
            (true, true) => None,
            (true, false) => Some("its manifest is not there (an incomplete backup)"),
            (false, _) => Some("it is not there"),
        };
        if let Some(why) = missing {
            return Err(JobError::NotFound(format!(
                "the backup ordered, {dir}/{}, is not on the backup server: {why}; no other \
                 backup is read in its place (the coordinator's catalog and the server \
                 differ: see `ferry backups`, and restore another date with --date)",
                Bounded(f)
            )));
        }
        let (path, main) = read_main(&mut session, &dir, f, name)?;
        let found = with_companions(&mut session, datastore, &dir, path, main)?;
        // A companion's data file gone (its manifest kept) is as missing as the main one.
        for (path, _) in &found.files {
            let part = path.rsplit('/').next().unwrap_or_default();
            if !entries.iter().any(|e| e == part) {
                return Err(JobError::NotFound(format!(
                    "{path}, a part of the backup ordered ({dir}/{}), is not on the backup \
                     server; no other backup is read in its place (see `ferry backups`, and \
                     restore another date with --date)",
                    Bounded(f)
                )));
            }
        }
        return Ok(found);
    }
    let dates: Vec<String> = session
        .list(&env_dir)?
        .into_iter()
        .filter(|d| layout::parse_date(d).is_ok())
        .filter(|d| date.is_none_or(|want| want == d))
        .collect();
    // The newest by the manifests' finish times, not by folder names: a production clock
    // that ran ahead wrote later folders for older data. A backup finished in the future
    // by this agent's clock is passed over (and said so): its clock was wrong.
    let horizon = Utc::now() + FUTURE_TOLERANCE;
    let mut best: Option<(String, String, Manifest)> = None;
    let mut future: Vec<String> = Vec::new();
    for day in &dates {
        let dir = format!("{env_dir}/{day}");
        let entries = session.list(&dir)?;
        for f in &entries {
            if layout::stamp_of(name, f).is_none() || !entries.contains(&format!("{f}.json")) {
                continue;
            }
            let (path, m) = read_main(&mut session, &dir, f, name)?;
            if m.finished > horizon {
                tracing::warn!(path = %path, finished = %m.finished,
                    "Passing over a backup that finished in the future by this agent's clock.");
                future.push(format!("{path} (finished {})", m.finished.to_rfc3339()));
            } else if best
                .as_ref()
                .is_none_or(|(_, _, b)| m.finished > b.finished)
            {
                best = Some((dir.clone(), path, m));
            }
        }
    }
    if let Some((dir, path, main)) = best {
        return with_companions(&mut session, datastore, &dir, path, main);
    }
    let passed_over = if future.is_empty() {
        String::new()
    } else {
        format!(
            "; passed over, as finished in the future by this agent's clock (a production \
             clock ahead?): {}",
            future.join(", ")
        )
    };
    Err(JobError::NotFound(match date {
        Some(d) => {
            format!("no complete backup of datastore {name:?} in {env_dir}/{d}{passed_over}")
        }
        None => format!("no complete backup of datastore {name:?} under {env_dir}{passed_over}"),
    }))
}

/// How far in the future (by this agent's clock) a backup's finish time may be before the
/// newest-backup search passes it over: clocks a few minutes apart are normal.
const FUTURE_TOLERANCE: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// Reads the manifest of main archive `f` of datastore `name` in `dir`; its path and
/// manifest.
///
/// # Errors
/// [`JobError::Integrity`] if the manifest describes another file, part or datastore.
fn read_main(
    session: &mut dyn Downloader,
    dir: &str,
    f: &str,
    name: &str,
) -> Result<(String, Manifest), JobError> {
    let path = format!("{dir}/{f}");
    let manifest_path = format!("{path}.json");
    let bytes = session.read_small(&manifest_path, MAX_MANIFEST_BYTES)?;
    let m = Manifest::from_slice(&manifest_path, &bytes)?;
    if m.file != *f || m.datastore != name || !m.part.is_empty() {
        return Err(JobError::Integrity(format!(
            "manifest {manifest_path} describes {} of datastore {}, not {f}",
            Bounded(&m.file),
            Bounded(&m.datastore)
        )));
    }
    Ok((path, m))
}

/// The backup whose main archive is `path` (described by `main`), with the companions its
/// manifest lists, in restore order (companions first).
///
/// # Errors
/// [`JobError::InvalidArgument`] for a backup of another kind, [`JobError::Integrity`] for
/// a companion that is not a file of the layout or has no readable manifest.
fn with_companions(
    session: &mut dyn Downloader,
    datastore: &dyn Datastore,
    dir: &str,
    path: String,
    main: Manifest,
) -> Result<FoundBackup, JobError> {
    if main.kind != datastore.kind() {
        return Err(JobError::InvalidArgument(format!(
            "{path} is a {} backup; datastore {:?} here is {}",
            Bounded(&main.kind),
            datastore.name(),
            datastore.kind()
        )));
    }
    let mut files = Vec::new();
    for c in &main.companions {
        layout::validate_companion(c).map_err(|e| JobError::Integrity(e.to_string()))?;
        let cpath = format!("{dir}/{c}");
        let mpath = format!("{cpath}.json");
        let bytes = session
            .read_small(&mpath, MAX_MANIFEST_BYTES)
            .map_err(|e| {
                JobError::Integrity(format!(
                    "companion {c} of {path} is missing or unreadable: {e}"
                ))
            })?;
        files.push((cpath, Manifest::from_slice(&mpath, &bytes)?));
    }
    files.push((path, main));
    Ok(FoundBackup { files })
}

/// Streams `path` from the server through `consume` on a pipeline thread, with the
/// download on a transport thread. `consume` gets a reader of the stored bytes.
async fn with_download<T: Send + 'static>(
    settings: &Arc<Settings>,
    path: &str,
    progress: &Progress,
    consume: impl FnOnce(chunks::ChunkReader) -> T + Send + 'static,
) -> Result<T, JobError> {
    let (tx, rx) = chunks::channel();
    let download = {
        let settings = settings.clone();
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || settings.backup_server.connect()?.download(&path, tx))
    };
    let reader = chunks::ChunkReader::new(rx, progress.clone());
    let out = tokio::task::spawn_blocking(move || consume(reader))
        .await
        .map_err(join_error)?;
    download.await.map_err(join_error)??;
    Ok(out)
}

/// Compares a stored file's hash and size with its manifest.
fn check_digest(path: &str, manifest: &Manifest, sha256: &str, size: u64) -> Result<(), JobError> {
    if size != manifest.bytes_stored || sha256 != manifest.sha256 {
        return Err(JobError::Integrity(format!(
            "{path} does not match its manifest: {size} bytes with SHA-256 {sha256}, the manifest says \
             {} bytes with SHA-256 {}; the file was altered or damaged",
            manifest.bytes_stored, manifest.sha256
        )));
    }
    Ok(())
}

/// For a staging agent that will `what` (restore, verify): the source environment and the
/// backup of `datastore` there that `selection` names ([`find_backup`]: `(date, file)`,
/// the exact file if given, else the newest complete backup, of the date if given).
///
/// # Errors
/// [`JobError::PermissionDenied`] without an identity, [`JobError::InvalidArgument`],
/// [`JobError::NotFound`].
async fn locate(
    settings: &Arc<Settings>,
    datastore: &Arc<dyn Datastore>,
    (date, file): (Option<String>, Option<String>),
    progress: &Progress,
    what: &str,
) -> Result<(String, FoundBackup), JobError> {
    let Keys::Decrypt(_) = &settings.keys else {
        return Err(JobError::PermissionDenied(format!(
            "agent {} has role {}: it holds no identity and may not {what}",
            settings.id, settings.role
        )));
    };
    if let Some(d) = &date {
        layout::parse_date(d).map_err(|e| JobError::InvalidArgument(e.to_string()))?;
    }
    if let Some(f) = &file {
        let d = date.as_deref().ok_or_else(|| {
            JobError::InvalidArgument(format!("backup file {} without its date", Bounded(f)))
        })?;
        layout::validate_main_file(datastore.name(), d, f)
            .map_err(|e| JobError::InvalidArgument(e.to_string()))?;
    }
    let environment = settings
        .source_environment
        .clone()
        .ok_or_else(|| JobError::InvalidArgument("no [restore] source_environment".into()))?;
    progress.set_stage("locate");
    let found = {
        let (settings, datastore, environment) =
            (settings.clone(), datastore.clone(), environment.clone());
        tokio::task::spawn_blocking(move || {
            find_backup(
                &settings,
                &environment,
                &*datastore,
                date.as_deref(),
                file.as_deref(),
            )
        })
        .await
        .map_err(join_error)??
    };
    Ok((environment, found))
}

/// Checks a backup of `datastore` in the source environment without restoring it: the one
/// `selection` names (`(date, file)`, see [`find_backup`]): every file is downloaded once, its SHA-256 and size
/// compared with its manifest, and it is decrypted and decompressed to its very end (age
/// authenticates every chunk, so tampering fails here even with a matching manifest).
///
/// # Errors
/// [`JobError::Integrity`] naming the file and what failed; [`JobError::NotFound`].
pub async fn verify(
    settings: Arc<Settings>,
    datastore: Arc<dyn Datastore>,
    selection: (Option<String>, Option<String>),
    progress: Progress,
) -> Result<JobReport, JobError> {
    let (environment, found) =
        locate(&settings, &datastore, selection, &progress, "verify").await?;
    progress.set_stage("verify");
    let mut plain_bytes = 0u64;
    for (path, manifest) in &found.files {
        progress.reset();
        let settings2 = settings.clone();
        let checked = with_download(
            &settings,
            path,
            &progress,
            move |reader| -> io::Result<(String, u64, u64)> {
                let Keys::Decrypt(dec) = &settings2.keys else {
                    return Err(io::Error::other("no identity"));
                };
                let (hashed, digest) = hash::HashingReader::shared(reader);
                let decrypted = dec.wrap(hashed)?;
                let mut plain = compress::decompressor(decrypted)?;
                let n = io::copy(&mut plain, &mut io::sink())?;
                drop(plain);
                let (sha, size) = digest.finish();
                Ok((sha, size, n))
            },
        )
        .await?;
        match checked {
            Ok((sha256, size, n)) => {
                check_digest(path, manifest, &sha256, size)?;
                if n != manifest.bytes_uncompressed {
                    return Err(JobError::Integrity(format!(
                        "{path} decompresses to {n} bytes, its manifest says {}",
                        manifest.bytes_uncompressed
                    )));
                }
                plain_bytes += n;
            }
            Err(e) => {
                return Err(JobError::Integrity(format!(
                    "{path} does not decrypt and decompress to its end: {e}"
                )));
            }
        }
    }
    let (main_path, main) = found
        .files
        .last()
        .expect("a backup has a main part")
        .clone();
    Ok(JobReport {
        data_finished_ms: Some(main.finished.timestamp_millis()),
        stored_path: main_path,
        size_bytes: found.files.iter().map(|(_, m)| m.bytes_stored).sum(),
        sha256: main.sha256.clone(),
        bytes_uncompressed: plain_bytes,
        environment,
        date: main.date.clone(),
        kind: main.kind.clone(),
        summary: format!(
            "verified {} file(s) of {}: SHA-256 equal to the manifests, decrypted and decompressed to the end ({plain_bytes} bytes)",
            found.files.len(),
            main.date
        ),
    })
}

/// Checks that a backup of `datastore` in the source environment is there, downloading
/// nothing: the one `selection` names (`(date, file)`, see [`find_backup`]); its manifests
/// (the main archive's and each companion's) read and parsed, and every file present on
/// the backup server with the size its manifest gives. What `ferry restore
/// --all-or-nothing` asks of every member of a set before restoring any.
///
/// # Errors
/// [`JobError::NotFound`] naming a missing file, [`JobError::Integrity`] naming a file of
/// another size or a manifest that does not read, transport errors.
pub async fn check(
    settings: Arc<Settings>,
    datastore: Arc<dyn Datastore>,
    selection: (Option<String>, Option<String>),
    progress: Progress,
) -> Result<JobReport, JobError> {
    let (environment, found) = locate(&settings, &datastore, selection, &progress, "check").await?;
    progress.set_stage("check");
    let files = found.files.clone();
    let server = settings.clone();
    tokio::task::spawn_blocking(move || -> Result<(), JobError> {
        let mut session = server.backup_server.connect()?;
        for (path, manifest) in &files {
            match session.size(path)? {
                None => {
                    return Err(JobError::NotFound(format!(
                        "{path} is not on the backup server (its manifest is)"
                    )));
                }
                Some(size) if size != manifest.bytes_stored => {
                    return Err(JobError::Integrity(format!(
                        "{path} holds {size} bytes, its manifest says {}; the file was \
                         altered or cut",
                        manifest.bytes_stored
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(())
    })
    .await
    .map_err(join_error)??;
    let (main_path, main) = found
        .files
        .last()
        .expect("a backup has a main part")
        .clone();
    Ok(JobReport {
        data_finished_ms: Some(main.finished.timestamp_millis()),
        stored_path: main_path,
        size_bytes: found.files.iter().map(|(_, m)| m.bytes_stored).sum(),
        sha256: main.sha256.clone(),
        bytes_uncompressed: found.files.iter().map(|(_, m)| m.bytes_uncompressed).sum(),
        environment,
        date: main.date.clone(),
        kind: main.kind.clone(),
        summary: format!(
            "checked {} file(s) of {}: manifests readable, every file present with its \
             manifest's size (nothing downloaded)",
            found.files.len(),
            main.date
        ),
    })
}

/// Restores a backup of `datastore` from the source environment, the one `selection`
/// names (`(date, file)`, see [`find_backup`]): verify every file, then stream each into
/// the datastore's restore session, then commit.
///
/// # Errors
/// [`JobError`]; [`JobError::Restore`] says whether the target was left as it was.
pub async fn restore(
    settings: Arc<Settings>,
    datastore: Arc<dyn Datastore>,
    job_id: String,
    selection: (Option<String>, Option<String>),
    namespaces: Vec<String>,
    progress: Progress,
) -> Result<JobReport, JobError> {
    let (environment, found) =
        locate(&settings, &datastore, selection, &progress, "restore").await?;

    // First pass, for the parts that a tool applies to live data as it reads them: each
    // file is whole and is the one its manifest describes before anything is touched.
    // Parts that the datastore stages beside the target are checked as they stream,
    // before commit (one download instead of two).
    progress.set_stage("verify");
    let restorer = datastore.restorer()?;
    for (path, manifest) in &found.files {
        if restorer.stages_part(manifest) {
            continue;
        }
        progress.reset();
        let (sha256, size) = with_download(&settings, path, &progress, |r| {
            hash::HashingReader::new(r).finish()
        })
        .await?
        .map_err(|source| JobError::Stage {
            stage: "verify",
            source,
        })?;
        check_digest(path, manifest, &sha256, size)?;
    }

    let (main_path, main) = found
        .files
        .last()
        .expect("a backup has a main part")
        .clone();
    let restore_err = |source: RestoreError, target_state: &str| JobError::Restore {
        datastore: datastore.name().to_owned(),
        source,
        target_state: target_state.to_owned(),
    };
    const UNTOUCHED: &str = "the target was left as it was";
    let mut session = datastore
        .restorer()?
        .begin(&main, &job_id, &namespaces)
        .await
        .map_err(|e| restore_err(e, UNTOUCHED))?;
    let started = Instant::now();
    let result = restore_files(&settings, &found, &mut *session, &progress).await;
    let result = match result {
        Ok(()) => {
            progress.set_stage("commit");
            let committed = session.commit(&main).await;
            committed.map_err(|e| {
                let state = session.target_state();
                restore_err(e, state.as_deref().unwrap_or(UNTOUCHED))
            })
        }
        // A failure while the parts streamed: the session says whether it had begun to
        // change the target.
        Err(JobError::Restore {
            datastore,
            source,
            target_state,
        }) => Err(JobError::Restore {
            datastore,
            source,
            target_state: session.target_state().unwrap_or(target_state),
        }),
        // A part that did not match its manifest: nothing of it was put in place, but an
        // earlier, checked part may have been (PostgreSQL's roles).
        Err(JobError::Integrity(text)) => Err(JobError::Integrity(match session.target_state() {
            Some(state) => format!("{text}; {state}"),
            None => text,
        })),
        Err(e) => Err(e),
    };
    // The drill's own checks, once the restored data is in place.
    let result = match result {
        Ok(summary) => match datastore.restorer()?.smoke().await {
            Ok(lines) if lines.is_empty() => Ok(summary),
            Ok(lines) => Ok(format!(
                "{summary}; smoke checks passed: {}",
                lines.join("; ")
            )),
            Err(e) => {
                return Err(JobError::Restore {
                    datastore: datastore.name().to_owned(),
                    source: e,
                    target_state: format!(
                        "the restored data is in place ({summary}) but failed the smoke check"
                    ),
                });
            }
        },
        Err(e) => Err(e),
    };
    match result {
        Ok(summary) => Ok(JobReport {
            data_finished_ms: Some(main.finished.timestamp_millis()),
            stored_path: main_path,
            size_bytes: main.bytes_stored,
            sha256: main.sha256.clone(),
            bytes_uncompressed: main.bytes_uncompressed,
            environment,
            date: main.date.clone(),
            kind: main.kind.clone(),
            summary: format!("{summary} in {:.1} s", started.elapsed().as_secs_f64()),
        }),
        Err(e) => {
            session.abort().await;
            Err(e)
        }
    }
}

async fn restore_files(
    settings: &Arc<Settings>,
    found: &FoundBackup,
    session: &mut dyn crate::datastore::RestoreSession,
    progress: &Progress,
) -> Result<(), JobError> {
    for (path, manifest) in &found.files {
        progress.set_stage("restore");
        progress.reset();
        let sink = session
            .part(manifest)
            .await
            .map_err(|source| JobError::Restore {
                datastore: manifest.datastore.clone(),
                source,
                target_state: "the target was left as it was".into(),
            })?;
        let settings2 = settings.clone();
        let mut writer = sink.writer;
        let streamed = with_download(settings, path, progress, move |reader| {
            let Keys::Decrypt(dec) = &settings2.keys else {
                return (Err(io::Error::other("no identity")), None);
            };
            let (hashed, digest) = hash::HashingReader::shared(reader);
            let result = (|| -> io::Result<()> {
                let decrypted = dec.wrap(hashed)?;
                let mut plain = compress::decompressor(decrypted)?;
                let copied = copy(&mut plain, &mut writer);
                drop(writer);
                copied?;
                // Read to the very end: age authenticates the last chunk there.
                io::copy(&mut plain, &mut io::sink())?;
                Ok(())
            })();
            // After a failure half-way (a chunk that does not authenticate, a tool that
            // stopped reading), the rest is still hashed: the digest tells an altered file
            // from a tool's error.
            (result, digest.drain().ok())
        })
        .await?;
        let tool = sink.finish.await;
        let (streamed, digest) = streamed;
        match digest {
            Some((sha256, size)) => check_digest(path, manifest, &sha256, size)?,
            None => {
                return Err(JobError::Integrity(format!(
                    "{path} could not be read to its end to check its SHA-256; nothing was put in place"
                )));
            }
        }
        match (streamed, tool) {
            (_, Err(source)) => {
                return Err(JobError::Restore {
                    datastore: manifest.datastore.clone(),
                    source,
                    target_state: "the target was left as it was".into(),
                });
            }
            (Err(e), Ok(())) => {
                return Err(JobError::Integrity(format!(
                    "{path} could not be decrypted and decompressed to its end: {e}; nothing was put in place"
                )));
            }
            (Ok(()), Ok(())) => {}
        }
    }
    Ok(())
}
