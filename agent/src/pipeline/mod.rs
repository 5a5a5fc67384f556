//! The streaming pipeline of DESIGN.md, for any datastore and any storage target:
//!
//! - [`backup`](mod@backup): `dump → count → compress (zstd) → encrypt (age) → hash (SHA-256) → upload`,
//!   one blocking thread for the stages and one for the target's write session, joined by
//!   a bounded channel of chunks (512 KiB written, 256 KiB read back): memory is constant
//!   and back-pressure reaches the dump tool. Every part is staged (on SFTP a hidden partial file); only after every part
//!   dumped and uploaded completely does one session (the last part's) commit them with
//!   their manifests, the main part's manifest last: it is what makes readers take it for
//!   a backup.
//! - [`restore`](mod@restore): find the backup the order names (the coordinator's catalog choice), or
//!   the newest complete backup (or a date's) ([`find`]); check the size and SHA-256
//!   of each part that a tool applies to live data as it reads (PostgreSQL's roles) in a
//!   first pass that reads and hashes only; then stream every part `download → hash →
//!   decrypt → decompress → restore tool` into the datastore's session, which stages it
//!   beside the target ([`crate::datastore::Restorer::stages_part`]); check each part's
//!   hash at its end, and only then let the datastore commit (swap into place).
//! - [`verify`](mod@verify): a backup read to its end and checked without restoring it, or only
//!   checked present with its manifests' sizes.
//! - the stages: [`chunks`], [`compress`], [`encrypt`], [`hash`].
//!
//! The pipeline never names a datastore nor a target: it sees [`Dumper`](crate::datastore::Dumper),
//! [`Restorer`](crate::datastore::Restorer), the sessions of `ferry_storage` and bytes.

use std::io;
use std::sync::Arc;

use crate::job::{JobError, Progress};
use ferry_core::manifest::Manifest;

pub mod backup;
pub mod chunks;
pub mod compress;
/// The encryption stage: [`ferry_core::crypto`] (the coordinator encrypts its self-backups too).
pub use ferry_core::crypto as encrypt;
pub mod find;
pub mod hash;
pub mod restore;
pub mod verify;

#[cfg(test)]
mod tests;

pub use backup::backup;
pub use restore::{RestoreTo, restore};
pub use verify::{check, verify};

/// Bytes moved at a time between the stages of one thread: std's `io::copy` moves 8 KiB,
/// a system call per 8 KiB from a dump tool's pipe or into a restore tool's.
const COPY_BUFFER_BYTES: usize = 256 * 1024;

/// Copies `reader` to `writer` to the end, [`COPY_BUFFER_BYTES`] at a time; the bytes
/// copied.
///
/// # Errors
/// Reading or writing failed (an interrupted call is retried).
pub(crate) fn copy(reader: &mut impl io::Read, writer: &mut impl io::Write) -> io::Result<u64> {
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

pub(crate) fn join_error(e: tokio::task::JoinError) -> JobError {
    JobError::Internal(format!("a pipeline thread failed: {e}"))
}

/// Streams `path` (the version `version_id` of it, a manifest's, where the target keeps
/// versions) from the server through `consume` on a pipeline thread, with the download on a
/// transport thread. `consume` gets a reader of the stored bytes.
pub(crate) async fn with_download<T: Send + 'static>(
    target: &Arc<dyn ferry_storage::Target>,
    path: &str,
    version_id: Option<&str>,
    progress: &Progress,
    consume: impl FnOnce(chunks::ChunkReader) -> T + Send + 'static,
) -> Result<T, JobError> {
    let (tx, rx) = chunks::channel();
    let download = {
        let target = target.clone();
        let path = path.to_owned();
        let version_id = version_id.map(str::to_owned);
        tokio::task::spawn_blocking(move || {
            target
                .read()?
                .download_version(&path, version_id.as_deref(), tx)
        })
    };
    let reader = chunks::ChunkReader::new(rx, progress.clone());
    let out = tokio::task::spawn_blocking(move || consume(reader))
        .await
        .map_err(join_error)?;
    download.await.map_err(join_error)??;
    Ok(out)
}

/// Compares a stored file's hash and size with its manifest.
pub(crate) fn check_digest(
    path: &str,
    manifest: &Manifest,
    sha256: &str,
    size: u64,
) -> Result<(), JobError> {
    if size != manifest.bytes_stored || sha256 != manifest.sha256 {
        return Err(JobError::Integrity(format!(
            "{path} does not match its manifest: {size} bytes with SHA-256 {sha256}, the manifest says \
             {} bytes with SHA-256 {}; the file was altered or damaged",
            manifest.bytes_stored, manifest.sha256
        )));
    }
    Ok(())
}
