//! What a datastore kind implements to be backed up and restored: [`Dumper`] and
//! [`Restorer`] for dated archives streamed through the pipeline (one or more [`Part`]s,
//! each a byte stream), or [`Repository`] for a kind that writes its own repository on the
//! backup server.

use std::io::{Read, Write};
use std::sync::Arc;

use futures::future::BoxFuture;

use super::error::{DumpError, RestoreError};
use crate::config::Settings;
use crate::job::{JobError, JobReport, Progress};
use ferry_core::manifest::{Manifest, Source};

/// One stored file of a backup. A backup has one main part (name `""`) and may have
/// companions, stored and restored before it (PostgreSQL's `globals`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    /// `""` for the main part, e.g. `globals` for a companion.
    pub name: &'static str,
    /// The `<format>` of the file name: `pgdump`, `sql`, `archive`, `tar`, `db`.
    pub format: &'static str,
}

/// The dump of one part: its bytes, and a future that resolves once the tool has exited.
pub struct DumpStream {
    /// The dump's bytes (a child's stdout, a driver cursor...). EOF at the end of the dump.
    pub reader: Box<dyn Read + Send>,
    /// Waits for the dump to end and reports whether it was complete. Await it after
    /// `reader` reached EOF (or was dropped).
    pub finish: BoxFuture<'static, Result<DumpOutcome, DumpError>>,
}

/// What a finished dump reports, for the manifest.
#[derive(Clone, Debug, Default)]
pub struct DumpOutcome {
    /// Tool and server versions.
    pub source: Source,
    /// The source's own counts (shape chosen by the kind).
    pub counts: serde_json::Value,
    /// A human line, e.g. `12 tables, 100000 rows`.
    pub summary: String,
}

/// Where restored bytes of one part go: a writer, and a future that resolves once the
/// restore tool has consumed them.
pub struct PartSink {
    /// The part's uncompressed bytes go here. Drop it (close) at the end of the stream.
    pub writer: Box<dyn Write + Send>,
    /// Waits for the restore tool to finish with this part.
    pub finish: BoxFuture<'static, Result<(), RestoreError>>,
}

/// A restore to a point in time ([`Restorer::begin_to_time`]): where the restored cluster
/// fetches the WAL it replays, and up to when.
#[derive(Clone, Debug)]
pub struct PointInTime {
    /// The instant to recover to, UTC (PostgreSQL's `recovery_target_time`, inclusive).
    pub time: chrono::DateTime<chrono::Utc>,
    /// The shell command that fetches one archived WAL file, with PostgreSQL's `%f` (file
    /// name) and `%p` (destination) in it: `'<agent>' wal-get --socket '<socket>'
    /// --datastore '<name>' %f %p`, PostgreSQL's `restore_command`.
    pub restore_command: String,
    /// The newest archived WAL segment and when it was pushed (UTC), for the summary; for
    /// the oplog, the newest slice and its end.
    pub newest: (String, chrono::DateTime<chrono::Utc>),
    /// MongoDB: the oplog slices replayed after the dump (the `restore_command` is empty
    /// then); `None` for WAL.
    pub oplog: Option<crate::datastore::mongodb::slices::OplogPlan>,
}

/// The backup side of a datastore kind.
pub trait Dumper: Send + Sync {
    /// The parts of a backup, in restore order (companions first, main part last).
    fn parts(&self) -> &'static [Part];
    /// Starts dumping `part`.
    fn dump<'a>(&'a self, part: &'a Part) -> BoxFuture<'a, Result<DumpStream, DumpError>>;
}

/// The restore side of a datastore kind.
pub trait Restorer: Send + Sync {
    /// Prepares a restore of the backup that `main` describes (for instance a scratch
    /// database beside the target). Nothing live is touched until
    /// [`RestoreSession::commit`]. `namespaces` (`db.collection`) restricts a restore to
    /// those namespaces where the kind has them; a kind without namespaces refuses a
    /// non-empty list.
    fn begin<'a>(
        &'a self,
        main: &'a Manifest,
        job_id: &'a str,
        namespaces: &'a [String],
    ) -> BoxFuture<'a, Result<Box<dyn RestoreSession>, RestoreError>>;

    /// Prepares a restore of the base backup `main` describes that then replays archived
    /// WAL up to `to.time` (see [`PointInTime`]); nothing live is touched until
    /// [`RestoreSession::commit`]. Only kinds that archive WAL implement it; the default
    /// refuses.
    ///
    /// # Errors
    /// [`RestoreError::Manifest`] by default; as [`Restorer::begin`] otherwise.
    fn begin_to_time<'a>(
        &'a self,
        main: &'a Manifest,
        job_id: &'a str,
        to: &'a PointInTime,
    ) -> BoxFuture<'a, Result<Box<dyn RestoreSession>, RestoreError>> {
        let _ = (job_id, to);
        Box::pin(async move {
            Err(RestoreError::Manifest(format!(
                "{}: a {} backup cannot be restored to a point in time",
                main.file, main.kind
            )))
        })
    }

    /// Whether streaming the part that `manifest` describes leaves every live target as
    /// it was until [`RestoreSession::commit`]: the part goes into a scratch database, a
    /// sibling directory or a local file. Such a part is hashed while it streams and its
    /// size and SHA-256 are checked against the manifest before commit, in one download;
    /// any other part (SQL that a tool executes as it reads, for instance) is downloaded
    /// and checked in a first pass before the restore begins. `false` by default, which
    /// is always safe.
    fn stages_part(&self, manifest: &Manifest) -> bool {
        let _ = manifest;
        false
    }

    /// After a restore: the operator's smoke checks of the restored data (the `smoke`
    /// entries of the datastore's config), each a line like `SELECT count(*) FROM orders
    /// = 1000 (at least 1)`. None by default.
    ///
    /// # Errors
    /// [`RestoreError::Mismatch`] naming the first check below its minimum, or the error
    /// of a check that could not run.
    fn smoke(&self) -> BoxFuture<'_, Result<Vec<String>, RestoreError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// One restore in progress.
pub trait RestoreSession: Send {
    /// A sink for the part that `manifest` describes; parts come in restore order.
    fn part<'a>(
        &'a mut self,
        manifest: &'a Manifest,
    ) -> BoxFuture<'a, Result<PartSink, RestoreError>>;
    /// Checks the restored data against `main` and puts it in place of the live target.
    /// Returns a human summary.
    fn commit<'a>(&'a mut self, main: &'a Manifest) -> BoxFuture<'a, Result<String, RestoreError>>;
    /// Removes whatever was restored beside the target; the target stays as it was.
    fn abort<'a>(&'a mut self) -> BoxFuture<'a, ()>;
    /// How the target is if the restore stops now: `None` while it is untouched (the
    /// default), else a sentence for the operator, e.g. which collections were replaced.
    fn target_state(&self) -> Option<String> {
        None
    }
    /// After a restore to a point in time that committed: when the last transaction the
    /// restored data holds committed (UTC), its recovery point; `None` otherwise (the
    /// default), or when no transaction was replayed after the backup.
    fn recovered_to(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        None
    }
}

/// A datastore that writes its own repository on the backup server instead of dated
/// archives streamed through the pipeline (pgBackRest, the rsync mirror of `files`): the
/// job runner hands it the whole job.
pub trait Repository: Send + Sync {
    /// The backup types an order may name (`ferry backup --type`); none by default.
    fn backup_types(&self) -> &'static [&'static str] {
        &[]
    }
    /// Backs up into the repository (`backup_type` is one of [`Repository::backup_types`]).
    fn backup<'a>(
        &'a self,
        settings: &'a Arc<Settings>,
        backup_type: Option<String>,
        progress: &'a Progress,
    ) -> BoxFuture<'a, Result<JobReport, JobError>>;
    /// Restores from the source environment's repository; `selection` is the order's
    /// `(date, namespaces)`.
    fn restore<'a>(
        &'a self,
        settings: &'a Arc<Settings>,
        job_id: &'a str,
        selection: (Option<String>, Vec<String>),
        progress: &'a Progress,
    ) -> BoxFuture<'a, Result<JobReport, JobError>>;
}

/// Checks that `main` is the main part of a `kind` backup in `part.format`, as a restorer
/// of `kind` expects.
///
/// # Errors
/// [`RestoreError::Manifest`] naming the file, what it is, and `what` was expected
/// (e.g. `a MongoDB archive`).
pub fn expect_main(
    main: &Manifest,
    kind: &str,
    part: &Part,
    what: &str,
) -> Result<(), RestoreError> {
    if main.kind != kind || main.part != part.name || main.format != part.format {
        return Err(RestoreError::Manifest(format!(
            "{} is a {} {} backup, not {what}",
            main.file, main.kind, main.format
        )));
    }
    Ok(())
}

/// For kinds restored whole: checks `main` as [`expect_main`] does, refuses a selection of
/// `namespaces`, and parses the manifest's counts as `T`.
///
/// # Errors
/// [`RestoreError::Manifest`]: another kind or format, namespaces given, or counts that
/// are not a `T`.
pub fn expect_whole<T: serde::de::DeserializeOwned>(
    main: &Manifest,
    kind: &str,
    part: &Part,
    what: &str,
    namespaces: &[String],
) -> Result<T, RestoreError> {
    expect_main(main, kind, part, what)?;
    if !namespaces.is_empty() {
        return Err(RestoreError::Manifest(format!(
            "a {kind} datastore has no namespaces; restore it whole"
        )));
    }
    serde_json::from_value(main.counts.clone())
        .map_err(|e| RestoreError::Manifest(format!("{}: counts: {e}", main.file)))
}
