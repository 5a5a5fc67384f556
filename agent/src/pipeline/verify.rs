//! Verify (download, hash, decrypt and decompress to the end, without restoring) and
//! check (present with the manifests' sizes, nothing downloaded).

use std::io;
use std::sync::Arc;

use super::find::locate;
use super::{check_digest, compress, hash, join_error, with_download};
use crate::config::{Keys, Settings};
use crate::datastore::Datastore;
use crate::job::{JobError, JobReport, Progress};

/// Checks a backup of `datastore` in the source environment without restoring it: the one
/// `selection` names (`(date, file)`, see [`super::find`]): every file is downloaded once, its SHA-256 and size
/// compared with its manifest, and it is decrypted and decompressed to its very end (age
/// authenticates every chunk, so tampering fails here even with a matching manifest).
///
/// # Errors
/// [`JobError::Integrity`] naming the file and what failed; [`JobError::NotFound`].
pub async fn verify(
    settings: Arc<Settings>,
    datastore: Arc<dyn Datastore>,
    selection: super::find::Selection,
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
            &found.source.target,
            path,
            manifest.version_id.as_deref(),
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
    let main = &found.main().1;
    Ok(found.report(
        environment,
        plain_bytes,
        format!(
            "verified {} file(s) of {}: SHA-256 equal to the manifests, decrypted and decompressed to the end ({plain_bytes} bytes)",
            found.files.len(),
            main.date
        ),
    ))
}

/// Checks that a backup of `datastore` in the source environment is there, downloading
/// nothing: the one `selection` names (`(date, file)`, see [`super::find`]); its manifests
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
    selection: super::find::Selection,
    progress: Progress,
) -> Result<JobReport, JobError> {
    let (environment, found) = locate(&settings, &datastore, selection, &progress, "check").await?;
    progress.set_stage("check");
    let files = found.files.clone();
    let source = found.source.target.clone();
    tokio::task::spawn_blocking(move || -> Result<(), JobError> {
        let mut session = source.read()?;
        for (path, manifest) in &files {
            match session.size_version(path, manifest.version_id.as_deref())? {
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
    let main = &found.main().1;
    Ok(found.report(
        environment,
        found.files.iter().map(|(_, m)| m.bytes_uncompressed).sum(),
        format!(
            "checked {} file(s) of {}: manifests readable, every file present with its \
             manifest's size (nothing downloaded)",
            found.files.len(),
            main.date
        ),
    ))
}
