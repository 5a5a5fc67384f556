//! A restore: every file of the backup checked, streamed through the stages into the
//! datastore's restore session, and committed only once every hash matched.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};

use super::find::{FoundBackup, locate};
use super::{check_digest, compress, copy, hash, join_error, with_download};
use crate::config::{Keys, Settings};
use crate::datastore::{Datastore, PointInTime, RestoreError};
use crate::job::{JobError, JobReport, Progress};

/// What a restore puts back of the backup it reads.
#[derive(Clone, Debug, Default)]
pub struct RestoreTo {
    /// Only these namespaces (`db.collection`); all when empty.
    pub namespaces: Vec<String>,
    /// Recover to this instant (UTC) with the archived WAL after the base backup; `None`:
    /// to the backup's end.
    pub to_time: Option<DateTime<Utc>>,
}

/// Restores a backup of `datastore` from the source environment, the one `selection`
/// names (`(date, file)`, see [`super::find`]): verify every file, then stream each into
/// the datastore's restore session, then commit. With `to.to_time`, the backup must have
/// finished by then and the archive must hold WAL pushed at or after it ([`point_in_time`]).
///
/// # Errors
/// [`JobError`]; [`JobError::Restore`] says whether the target was left as it was.
pub async fn restore(
    settings: Arc<Settings>,
    datastore: Arc<dyn Datastore>,
    job_id: String,
    selection: super::find::Selection,
    to: RestoreTo,
    progress: Progress,
) -> Result<JobReport, JobError> {
    let RestoreTo {
        namespaces,
        to_time,
    } = to;
    let (environment, found) =
        locate(&settings, &datastore, selection, &progress, "restore").await?;
    let point = match to_time {
        Some(t) => {
            Some(point_in_time(&settings, &datastore, &environment, &found, t, &progress).await?)
        }
        None => None,
    };

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
        let (sha256, size) = with_download(
            &found.source.target,
            path,
            manifest.version_id.as_deref(),
            &progress,
            |r| hash::HashingReader::new(r).finish(),
        )
        .await?
        .map_err(|source| JobError::Stage {
            stage: "verify",
            source,
        })?;
        check_digest(path, manifest, &sha256, size)?;
    }

    let (main_path, main) = found.main().clone();
    let restore_err = |source: RestoreError, target_state: &str| JobError::Restore {
        datastore: datastore.name().to_owned(),
        source,
        target_state: target_state.to_owned(),
    };
    const UNTOUCHED: &str = "the target was left as it was";
    let restorer = datastore.restorer()?;
    let session = match &point {
        Some(p) => restorer.begin_to_time(&main, &job_id, p).await,
        None => restorer.begin(&main, &job_id, &namespaces).await,
    };
    let mut session = session.map_err(|e| restore_err(e, UNTOUCHED))?;
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
            recipient_fingerprints: Vec::new(),
            // The recovery point: the last transaction replayed up to the instant asked
            // for, else the backup's end.
            data_finished_ms: Some(
                point
                    .as_ref()
                    .and_then(|_| session.recovered_to())
                    .unwrap_or(main.finished)
                    .timestamp_millis(),
            ),
            stored_path: main_path,
            size_bytes: main.bytes_stored,
            sha256: main.sha256.clone(),
            bytes_uncompressed: main.bytes_uncompressed,
            environment,
            date: main.date.clone(),
            kind: main.kind.clone(),
            summary: found.summary(format!(
                "{summary} in {:.1} s",
                started.elapsed().as_secs_f64()
            )),
            target: found.source.name.clone(),
        }),
        Err(e) => {
            session.abort().await;
            Err(e)
        }
    }
}

/// Checks a restore of `found` to `time` before anything is touched, and says where the
/// restored cluster fetches its WAL: the backup finished at or before `time`, and the
/// newest WAL segment archived for the datastore (on the primary target, where production
/// pushes it) was pushed at or after `time`.
///
/// # Errors
/// [`JobError::InvalidArgument`] for a backup that finished after `time`, an agent without
/// `[wal]`, or a `time` beyond the archive (naming the newest instant it holds);
/// [`JobError::NotFound`] when no WAL is archived; the target's errors.
async fn point_in_time(
    settings: &Arc<Settings>,
    datastore: &Arc<dyn Datastore>,
    environment: &str,
    found: &FoundBackup,
    time: DateTime<Utc>,
    progress: &Progress,
) -> Result<PointInTime, JobError> {
    let (path, main) = found.main();
    if main.finished > time {
        return Err(JobError::InvalidArgument(format!(
            "{path} finished at {}, after {}: a restore to a point in time starts from a base \
             backup that ended before it",
            main.finished.to_rfc3339(),
            time.to_rfc3339()
        )));
    }
    if datastore.replays_oplog() {
        return oplog_point_in_time(
            settings,
            datastore.name(),
            environment,
            found,
            time,
            progress,
        )
        .await;
    }
    let restore_command =
        crate::wal::restore_command(settings, datastore.name()).ok_or_else(|| {
            JobError::InvalidArgument(format!(
                "agent {} has no [wal]: a restored cluster fetches its WAL through its socket",
                settings.id
            ))
        })?;
    progress.set_stage("locate");
    let newest = {
        let (settings, environment, name) = (
            settings.clone(),
            environment.to_owned(),
            datastore.name().to_owned(),
        );
        tokio::task::spawn_blocking(move || {
            crate::wal::newest_segment(&settings, &environment, &name)
        })
        .await
        .map_err(join_error)?
    };
    let wal_dir = ferry_core::wal::wal_dir(
        &settings.backup_server.environment_dir(environment),
        datastore.name(),
    );
    let newest = match newest {
        Ok(Some(record)) => record,
        Ok(None) => {
            return Err(JobError::NotFound(format!(
                "no WAL segment is archived under {wal_dir}: a restore to a point in time \
                 replays archived WAL (set archive_command = 'ferry-agent wal-push %p' on production)"
            )));
        }
        Err(crate::wal::PushError::Target(e)) => return Err(e.into()),
        Err(e) => return Err(JobError::Integrity(format!("{wal_dir}: {e}"))),
    };
    if newest.pushed < time {
        return Err(JobError::InvalidArgument(format!(
            "{} is beyond the archived WAL: the newest segment under {wal_dir}, {}, was pushed at {}, \
             the newest instant a restore can reach",
            time.to_rfc3339(),
            newest.file,
            newest.pushed.to_rfc3339()
        )));
    }
    Ok(PointInTime {
        time,
        restore_command,
        newest: (newest.file, newest.pushed),
        oplog: None,
    })
}

/// [`point_in_time`] for MongoDB: the dump's oplog window's end, and the chain of oplog
/// slices on the primary target (where production writes them) from there to `time`
/// ([`slices::plan_chain`]), each fetched when the replay reaches it.
///
/// # Errors
/// [`JobError::InvalidArgument`] for a dump without an oplog window (a standalone server)
/// or slices that do not reach `time` (naming the newest instant they do) or hold a gap;
/// [`JobError::NotFound`] when no slice is archived; [`JobError::Integrity`] for a record
/// that cannot be read; the target's errors.
async fn oplog_point_in_time(
    settings: &Arc<Settings>,
    datastore: &str,
    environment: &str,
    found: &FoundBackup,
    time: DateTime<Utc>,
    progress: &Progress,
) -> Result<PointInTime, JobError> {
    use crate::datastore::mongodb::slices::{self, OplogPlan, SliceToReplay};
    use ferry_core::oplog::{self as layout, OplogTs, SliceRecord};
    let (path, main) = found.main();
    let window_end: OplogTs = main
        .counts
        .get("oplog")
        .and_then(|o| o.get("end"))
        .and_then(|e| serde_json::from_value(e.clone()).ok())
        .ok_or_else(|| {
            JobError::InvalidArgument(format!(
                "{path} holds no oplog window (dumped from a standalone server): it cannot start \
                 a restore to a point in time"
            ))
        })?;
    progress.set_stage("locate");
    let dir = layout::oplog_dir(
        &settings.backup_server.environment_dir(environment),
        datastore,
    );
    // Slices ending before the dump began are not needed: their names say so.
    let since = main.started - chrono::Duration::seconds(60);
    let listed = {
        let (target, dir) = (settings.backup_server.clone(), dir.clone());
        tokio::task::spawn_blocking(move || -> Result<Vec<SliceToReplay>, JobError> {
            let mut session = target.read()?;
            let names = match session.list(&dir) {
                Ok(n) => n,
                Err(ferry_storage::TargetError::NotFound { .. }) => Vec::new(),
                Err(e) => return Err(e.into()),
            };
            let mut wanted: Vec<&String> = names
                .iter()
                .filter(|n| layout::slice_range(n).is_some_and(|(_, to)| to >= since))
                .filter(|n| names.contains(&format!("{n}.json")))
                .collect();
            wanted.sort();
            let mut out = Vec::with_capacity(wanted.len());
            for name in wanted {
                let path = format!("{dir}/{name}");
                let record_path = format!("{path}.json");
                let bytes = session.read_small(&record_path, 64 * 1024)?;
                let record = SliceRecord::from_slice(&record_path, &bytes)
                    .map_err(|e| JobError::Integrity(e.to_string()))?;
                out.push(SliceToReplay { path, record });
            }
            Ok(out)
        })
        .await
        .map_err(join_error)??
    };
    if listed.is_empty() {
        return Err(JobError::NotFound(format!(
            "no oplog slice after {} is archived under {dir}: a restore to a point in time replays \
             them (set oplog_slice_seconds on the production datastore)",
            since.to_rfc3339()
        )));
    }
    let chain =
        slices::plan_chain(&listed, window_end, time, &dir).map_err(JobError::InvalidArgument)?;
    let newest = listed
        .iter()
        .max_by_key(|s| s.record.to)
        .map(|s| (s.path.clone(), s.record.to))
        .expect("listed is not empty");
    let target = settings.backup_server.clone();
    let keys = settings.clone();
    let progress = progress.clone();
    let fetch: slices::SliceFetcher = Arc::new(move |slice: SliceToReplay| {
        let (target, keys, progress) = (target.clone(), keys.clone(), progress.clone());
        Box::pin(async move {
            let record = slice.record.clone();
            let got = with_download(
                &target,
                &slice.path,
                record.version_id.as_deref(),
                &progress,
                move |reader| -> Result<(Vec<u8>, String, u64), String> {
                    let Keys::Decrypt(dec) = &keys.keys else {
                        return Err("no identity".into());
                    };
                    let (hashed, digest) = hash::HashingReader::shared(reader);
                    let plain = (|| -> io::Result<Vec<u8>> {
                        let decrypted = dec.wrap(hashed)?;
                        let mut plain = compress::decompressor(decrypted)?;
                        let mut out = Vec::new();
                        io::Read::read_to_end(
                            &mut io::Read::take(&mut plain, record.bytes + 1),
                            &mut out,
                        )?;
                        io::copy(&mut plain, &mut io::sink())?;
                        Ok(out)
                    })();
                    let (sha, size) = digest
                        .drain()
                        .map_err(|e| format!("reading it to its end: {e}"))?;
                    match plain {
                        Ok(p) => Ok((p, sha, size)),
                        Err(e) if sha != record.sha256_stored || size != record.bytes_stored => {
                            Err(format!("it does not match its record ({size} bytes with SHA-256 {sha}, the record says {} with {}): altered or damaged ({e})", record.bytes_stored, record.sha256_stored))
                        }
                        Err(e) => Err(format!("decrypting and decompressing it: {e}")),
                    }
                },
            )
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{}: {e}", slice.path))?;
            let (plain, sha_stored, size_stored) = got;
            let sha = {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(&plain))
            };
            if sha_stored != slice.record.sha256_stored
                || size_stored != slice.record.bytes_stored
                || sha != slice.record.sha256
                || plain.len() as u64 != slice.record.bytes
            {
                return Err(format!(
                    "{} does not match its record: altered or damaged ({} bytes stored with \
                     SHA-256 {sha_stored}, {} bytes of entries with SHA-256 {sha}; the record says \
                     {} with {} and {} with {})",
                    slice.path,
                    size_stored,
                    plain.len(),
                    slice.record.bytes_stored,
                    slice.record.sha256_stored,
                    slice.record.bytes,
                    slice.record.sha256
                ));
            }
            Ok(plain)
        })
    });
    Ok(PointInTime {
        time,
        restore_command: String::new(),
        newest,
        oplog: Some(OplogPlan {
            window_end,
            slices: chain,
            fetch,
        }),
    })
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
        let streamed = with_download(
            &found.source.target,
            path,
            manifest.version_id.as_deref(),
            progress,
            move |reader| {
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
            },
        )
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
