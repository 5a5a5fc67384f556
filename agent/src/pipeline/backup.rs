//! A backup: every part of a datastore dumped and streamed through the stages into a
//! write session of the storage target, then committed with the manifests.

use std::io;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{chunks, compress, copy, hash, join_error};
use crate::config::{Keys, Settings};
use crate::datastore::{Datastore, Dumper, Part};
use crate::job::progress;
use crate::job::{JobError, JobReport, Progress};
use ferry_core::layout::{self, StoredFile};
use ferry_core::manifest::{MANIFEST_VERSION, Manifest};
use ferry_storage::{Aborter, Staged, WriteSession};

/// One part streamed whole to its hidden partial file, waiting for the commit.
struct StagedPart {
    part: Part,
    staged: Staged,
    sha256: String,
    uncompressed: u64,
    outcome: crate::datastore::DumpOutcome,
    started: DateTime<Utc>,
}

/// How long a dropped backup waits for its staged parts to be abandoned
/// ([`StagedGuard`]): the agent is stopping ([`crate::jobs::JOB_STOP_GRACE`] has passed,
/// and the whole stop must stay within [`crate::STOP_GRACE`]).
const ABANDON_ON_DROP: std::time::Duration = std::time::Duration::from_secs(2);

/// The parts a backup staged and has neither committed nor abandoned yet. If the backup's
/// future is dropped (the agent stopping while a tool writes nothing, so the job does not
/// end on its cancellation path within [`crate::jobs::JOB_STOP_GRACE`]), they are
/// abandoned on a thread of their own, waited for at most [`ABANDON_ON_DROP`]: an S3
/// target's multipart uploads are aborted and SFTP's hidden partial files removed now,
/// rather than left to the datastore's next upload or `ferry prune`.
struct StagedGuard {
    target: Arc<dyn ferry_storage::Target>,
    partials: Vec<String>,
}

impl StagedGuard {
    /// The parts are someone else's to commit or abandon from now on.
    fn disarm(&mut self) {
        self.partials.clear();
    }
}

impl Drop for StagedGuard {
    fn drop(&mut self) {
        if self.partials.is_empty() {
            return;
        }
        let (target, partials) = (self.target.clone(), std::mem::take(&mut self.partials));
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("abandon".into())
            .spawn(move || {
                let fates = target.write().map(|mut s| s.abandon(&partials));
                let _ = tx.send((partials, fates));
            });
        if spawned.is_err() {
            return;
        }
        match rx.recv_timeout(ABANDON_ON_DROP) {
            Ok((partials, Ok(fates))) => {
                tracing::info!(partials = ?partials, fates = ?fates,
                    "A stopped backup's staged parts were abandoned.");
            }
            Ok((partials, Err(e))) => {
                tracing::warn!(partials = ?partials, error = %e,
                    "A stopped backup's staged parts could not be abandoned; the next upload or `ferry prune` removes them.");
            }
            Err(_) => {
                tracing::warn!(
                    "A stopped backup's staged parts were not abandoned within {} s; the next upload or `ferry prune` removes them.",
                    ABANDON_ON_DROP.as_secs()
                );
            }
        }
    }
}

/// Runs `f` with the session on a blocking thread and gives the session back (lost only
/// if `f` panicked).
async fn on_session<T: Send + 'static>(
    mut session: Box<dyn WriteSession>,
    f: impl FnOnce(&mut dyn WriteSession) -> T + Send + 'static,
) -> Result<(Box<dyn WriteSession>, T), JobError> {
    tokio::task::spawn_blocking(move || {
        let out = f(&mut *session);
        (session, out)
    })
    .await
    .map_err(join_error)
}

/// Runs a backup of `datastore`: every part dumped, compressed, encrypted, hashed and
/// streamed to a hidden partial file, then, once every part is whole, the manifests
/// written and everything put in place on the last part's connection
/// ([`WriteSession::commit`]: the main part's manifest last, so that a reader never takes an
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
            let mut session = settings.backup_server.write()?;
            choose_names(&mut *session, &settings, &name, parts, started)
        })
        .await
        .map_err(join_error)??
    };

    // Each part streams on a connection of its own, opened once its dump has started (a
    // dump tool may take long to produce its first byte, and an idle connection may be
    // dropped on the way); the last one, fresh, commits them all.
    let mut staged: Vec<StagedPart> = Vec::new();
    let mut guard = StagedGuard {
        target: settings.backup_server.clone(),
        partials: Vec::new(),
    };
    let mut last: Option<Box<dyn WriteSession>> = None;
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
                guard.partials.push(p.staged.partial.clone());
                staged.push(p);
            }
            Err((back, this, e)) => {
                guard.disarm();
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
            // Filled by a target with versions at commit.
            version_id: None,
            job_id: Some(
                ferry_proto::attempt::split_attempt_id(&job_id)
                    .map_or(job_id.as_str(), |(job, _)| job)
                    .to_owned(),
            ),
            copied: None,
        };
        commit.push((p.staged.clone(), manifest.to_json()));
        if is_main {
            report = Some(JobReport {
                recipient_fingerprints: recipients.iter().map(|r| r.fingerprint.clone()).collect(),
                // The manifest's end: the catalog records it, so that a catalog rebuilt
                // from the manifests equals the one kept.
                data_finished_ms: Some(finished.timestamp_millis()),
                target: String::new(),
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
    guard.disarm();
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
async fn abandon(
    settings: &Arc<Settings>,
    session: Option<Box<dyn WriteSession>>,
    partials: Vec<Staged>,
) {
    let mut paths: Vec<String> = partials.into_iter().map(|s| s.partial).collect();
    let session = match session {
        Some(mut aborted) if aborted.aborted() => {
            paths.extend(aborted.take_unremoved());
            drop(aborted);
            if paths.is_empty() {
                return;
            }
            let server = settings.backup_server.clone();
            match tokio::task::spawn_blocking(move || server.write()).await {
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

/// Picks the first stamp under which no part's file (nor its manifest) exists yet; on a
/// target that does not let this writer look ([`WriteSession::sees_existing`]), the last
/// (to the second), so that a second backup of the day never takes the first one's name.
fn choose_names(
    session: &mut dyn WriteSession,
    settings: &Settings,
    datastore: &str,
    parts: &'static [Part],
    at: DateTime<Utc>,
) -> Result<Vec<StoredFile>, JobError> {
    let dir = settings
        .backup_server
        .dated_dir(&settings.environment, at.date_naive());
    let stamps = layout::candidate_stamps(at);
    let last = stamps.len() - 1;
    for (i, stamp) in stamps.into_iter().enumerate() {
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
        if free && (i == last || session.sees_existing()) {
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
) -> Result<(Box<dyn WriteSession>, StagedPart), PartFailure> {
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
            let mut session = match settings.backup_server.write() {
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
            let mut compressed = compress::Compressor::with_workers(
                encrypted,
                settings.compression_level,
                settings.compression_workers.take(),
            )?;
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
type PartFailure = (Option<Box<dyn WriteSession>>, Option<Staged>, JobError);
