//! The restore side: roles with `psql`, the pg_dump archive with `pg_restore` into a
//! scratch database beside the target, rows counted and compared with the manifest, then
//! the swap; the leftovers of interrupted restores; the operator's smoke checks.

use std::collections::BTreeMap;
use std::process::Command;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio_postgres::Client;

use super::{
    BASE, DatabaseCounts, MAIN, MAX_IDENTIFIER, Postgres, database_counts, inserted_counts,
    quote_ident,
};
use crate::datastore::common::smoke::{SmokeCheck, SmokeError, run_smoke};
use crate::datastore::common::{leftovers, tree};
use crate::datastore::{
    PartSink, PointInTime, ReapedChild, RestoreError, RestoreSession, Restorer, StderrTail,
    describe_status,
};
use ferry_core::manifest::Manifest;

/// The tag of a restore's scratch database: `<target>__ferry_new_<job>`.
const NEW_TAG: &str = "__ferry_new_";

/// Reads of the server's insert counters before the rows are counted with `count(*)`
/// ([`super::inserted_counts`]), [`STATS_RETRY`] apart.
const STATS_ATTEMPTS: u32 = 5;

/// Wait between two reads of the insert counters.
const STATS_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// The tag of the target moved aside by a restore's swap: `<target>__ferry_old_<job>`.
const OLD_TAG: &str = "__ferry_old_";

/// The start of the name of a restore's archive written to `scratch_dir` for
/// `pg_restore --jobs`: `ferry-pg-<datastore>-<job>.dump`.
const STAGED_PREFIX: &str = "ferry-pg-";

/// The end of that name.
const STAGED_SUFFIX: &str = ".dump";

/// How long the search for leftovers waits for the server to answer a connection, seconds.
const RECOVER_CONNECT_SECONDS: u64 = 10;

/// `<target><tag><job>`, the job id in lower case, the target's name cut so that the whole
/// fits [`MAX_IDENTIFIER`] bytes: the name of a restore's scratch ([`NEW_TAG`]) or old
/// ([`OLD_TAG`]) database.
fn scratch_name(target: &str, tag: &str, job_id: &str) -> String {
    let suffix = job_id.to_lowercase();
    let keep = MAX_IDENTIFIER.saturating_sub(tag.len() + suffix.len());
    format!("{}{tag}{suffix}", truncate(target, keep))
}

/// The jobs that left a scratch or old database of `target` among the database `names`:
/// job id (upper case) → (scratch exists, old exists). Only the exact names
/// [`scratch_name`] gives count.
fn leftover_jobs(target: &str, names: &[String]) -> BTreeMap<String, (bool, bool)> {
    let mut jobs: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    for name in names {
        let Some(cut) = name
            .len()
            .checked_sub(26)
            .filter(|&c| name.is_char_boundary(c))
        else {
            continue;
        };
        let Some(job) = leftovers::job_id(&name[cut..]) else {
            continue;
        };
        if *name == scratch_name(target, NEW_TAG, &job) {
            jobs.entry(job).or_default().0 = true;
        } else if *name == scratch_name(target, OLD_TAG, &job) {
            jobs.entry(job).or_default().1 = true;
        }
    }
    jobs
}

/// A PostgreSQL cluster as a [`leftovers::Store`]: names are databases.
struct Databases {
    client: Client,
}

impl Databases {
    /// Ends the sessions on `db`, so it can be renamed or dropped.
    async fn terminate(&self, db: &str) {
        let _ = self
            .client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&db],
            )
            .await;
    }

    async fn exists(&self, db: &str) -> Result<bool, tokio_postgres::Error> {
        self.client
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_database WHERE datname = $1",
                &[&db],
            )
            .await
            .map(|r| r.is_some())
    }
}

impl leftovers::Store for Databases {
    type Error = tokio_postgres::Error;

    fn rename<'a>(
        &'a mut self,
        from: &'a str,
        to: &'a str,
    ) -> BoxFuture<'a, Result<(), tokio_postgres::Error>> {
        async move {
            let sql = format!(
                "ALTER DATABASE {} RENAME TO {}",
                quote_ident(from),
                quote_ident(to)
            );
            // A session may connect again between the termination and the rename.
            let mut attempt = 1;
            loop {
                self.terminate(from).await;
                match self.client.batch_execute(&sql).await {
                    Ok(()) => return Ok(()),
                    Err(e) if attempt == 5 => return Err(e),
                    Err(_) => attempt += 1,
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        .boxed()
    }

    fn remove<'a>(&'a mut self, name: &'a str) -> BoxFuture<'a, Result<(), tokio_postgres::Error>> {
        async move {
            self.client
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    quote_ident(name)
                ))
                .await
        }
        .boxed()
    }

    fn show(&self, name: &str) -> String {
        format!("database {name}")
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Differences between expected (manifest) and restored counts, one line each.
fn count_differences(expected: &DatabaseCounts, found: &DatabaseCounts) -> Vec<String> {
    let mut out = Vec::new();
    for (table, n) in &expected.rows {
        match found.rows.get(table) {
            None => out.push(format!(
                "table {table} is missing ({n} rows in the manifest)"
            )),
            Some(m) if m != n => out.push(format!(
                "table {table}: {n} rows in the manifest, {m} restored"
            )),
            _ => {}
        }
    }
    for table in found
        .rows
        .keys()
        .filter(|t| !expected.rows.contains_key(*t))
    {
        out.push(format!("table {table} is not in the manifest"));
    }
    out
}

impl Postgres {
    /// The scratch (`<target>__ferry_new_<job>`) and old (`<target>__ferry_old_<job>`)
    /// databases of `target_database` (see [`crate::datastore::common::leftovers`]), job by job.
    pub(super) async fn recover(
        &self,
        skip: &[String],
    ) -> Result<Vec<leftovers::Recovered>, RestoreError> {
        let Some(target) = self.cfg.target_database.clone() else {
            return Ok(Vec::new());
        };
        // A replaced database still being dropped is no leftover.
        let _dropped = self.dropping.lock().await;
        let db = &self.cfg.maintenance_database;
        let mut config = self.pg_config(db);
        config.connect_timeout(std::time::Duration::from_secs(RECOVER_CONNECT_SECONDS));
        let client = self
            .connect_with(config, db)
            .await
            .map_err(|e| RestoreError::Target(e.to_string()))?;
        let names: Vec<String> = client
            .query("SELECT datname FROM pg_catalog.pg_database", &[])
            .await
            .map_err(|e| RestoreError::Target(format!("listing databases: {e}")))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut store = Databases { client };
        let mut out = Vec::new();
        for (job, (new, old)) in leftover_jobs(&target, &names) {
            if leftovers::skipped(&job, skip) {
                continue;
            }
            let exists = store
                .exists(&target)
                .await
                .map_err(|e| RestoreError::Target(e.to_string()))?;
            let (new_name, old_name) = (
                scratch_name(&target, NEW_TAG, &job),
                scratch_name(&target, OLD_TAG, &job),
            );
            let swap = leftovers::Swap {
                job: &job,
                target: &target,
                old: &old_name,
                new: &new_name,
                exists: (exists, old, new),
            };
            out.extend(leftovers::recover_swap(&mut store, swap).await);
        }
        out.extend(self.remove_staged(skip));
        Ok(out)
    }

    /// With `restore_jobs` above 1, where a restore of job `job_id` writes the archive for
    /// `pg_restore --jobs`: `<scratch_dir>/ferry-pg-<datastore>-<job>.dump`.
    fn staged_path(&self, job_id: &str) -> Option<std::path::PathBuf> {
        if self.cfg.restore_jobs < 2 {
            return None;
        }
        let name = format!("{STAGED_PREFIX}{}-{job_id}{STAGED_SUFFIX}", self.cfg.name);
        self.cfg.scratch_dir.as_ref().map(|dir| dir.join(name))
    }

    /// Removes the archives that restores of this datastore wrote to `scratch_dir` and did
    /// not remove (the agent stopped during `pg_restore --jobs`), except those of the jobs in
    /// `skip`. Only the exact names [`Self::staged_path`] gives count; one that cannot be
    /// removed is reported as kept, with the error.
    fn remove_staged(&self, skip: &[String]) -> Vec<leftovers::Recovered> {
        let Some(dir) = &self.cfg.scratch_dir else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let prefix = format!("{STAGED_PREFIX}{}-", self.cfg.name);
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(job) = name
                .strip_prefix(&prefix)
                .and_then(|j| j.strip_suffix(STAGED_SUFFIX))
                .and_then(|j| leftovers::job_id(j).filter(|id| id == j))
            else {
                continue;
            };
            if leftovers::skipped(&job, skip) {
                continue;
            }
            let path = e.path();
            let action = match std::fs::remove_file(&path) {
                Ok(()) => leftovers::Action::Removed,
                Err(e) => leftovers::Action::Kept {
                    why: format!("cannot remove it: {e}"),
                },
            };
            out.push(leftovers::Recovered::new(
                &job,
                path.display().to_string(),
                action,
            ));
        }
        out
    }
}

impl Restorer for Postgres {
    /// The pg_dump archive goes into a scratch database; the globals part is SQL that
    /// psql executes against the live cluster as it reads, so it is checked first.
    /// A physical backup is unpacked into a new directory beside the data directory.
    fn stages_part(&self, manifest: &Manifest) -> bool {
        if self.physical() {
            return manifest.part == BASE.name && manifest.format == BASE.format;
        }
        manifest.part == MAIN.name && manifest.format == MAIN.format
    }

    /// The smoke checks, on the live cluster: in `target_database`, or for a physical
    /// restore in `smoke_database` (they also ran on the restored cluster before the swap).
    fn smoke(&self) -> BoxFuture<'_, Result<Vec<String>, RestoreError>> {
        async move {
            let db = if self.physical() {
                self.cfg.smoke_database.clone()
            } else {
                self.cfg.target_database.clone().unwrap_or_default()
            };
            let client = self
                .connect(&db)
                .await
                .map_err(|e| RestoreError::Target(e.to_string()))?;
            run_smoke(&self.cfg.smoke, |c| {
                let client = &client;
                async move { smoke_one(client, c).await }
            })
            .await
        }
        .boxed()
    }

    /// A physical datastore's base backup, recovered up to `to.time` with the archived
    /// WAL (see [`super::physical_restore`]).
    fn begin_to_time<'a>(
        &'a self,
        main: &'a Manifest,
        job_id: &'a str,
        to: &'a PointInTime,
    ) -> BoxFuture<'a, Result<Box<dyn RestoreSession>, RestoreError>> {
        async move {
            if !self.physical() {
                return Err(RestoreError::Manifest(
                    "a pg_dump backup cannot be restored to a point in time: that takes \
                     method = \"physical\" and archived WAL"
                        .into(),
                ));
            }
            self.begin_physical(main, job_id, &[], Some(to.clone()))
                .await
        }
        .boxed()
    }

    fn begin<'a>(
        &'a self,
        main: &'a Manifest,
        job_id: &'a str,
        namespaces: &'a [String],
    ) -> BoxFuture<'a, Result<Box<dyn RestoreSession>, RestoreError>> {
        async move {
            if !namespaces.is_empty() {
                return Err(RestoreError::Manifest(
                    "a PostgreSQL backup is restored whole; --ns selects MongoDB namespaces".into(),
                ));
            }
            if self.physical() {
                return self.begin_physical(main, job_id, namespaces, None).await;
            }
            crate::datastore::expect_main(main, "postgres", &MAIN, "a PostgreSQL pg_dump archive")?;
            let expected = DatabaseCounts::from_json(&main.counts).ok_or_else(|| {
                RestoreError::Manifest(format!(
                    "manifest of {} has no PostgreSQL row counts",
                    main.file
                ))
            })?;
            let target = self
                .cfg
                .target_database
                .clone()
                .ok_or_else(|| RestoreError::Target("no target_database configured".into()))?;
            let session = PgRestore {
                pg: self.clone(),
                staged: self.staged_path(job_id),
                scratch: scratch_name(&target, NEW_TAG, job_id),
                old: scratch_name(&target, OLD_TAG, job_id),
                target,
                expected,
                created: false,
                roles_applied: false,
            };
            let maint = session.maintenance().await?;
            maint
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    quote_ident(&session.scratch)
                ))
                .await
                .map_err(|e| RestoreError::Target(e.to_string()))?;
            Ok(Box::new(session) as Box<dyn RestoreSession>)
        }
        .boxed()
    }
}

/// Runs one smoke check (`sql`, one row of one integer) through `client`: the query and
/// the number.
///
/// # Errors
/// [`SmokeError`]: no `sql`, the query failed, or it gave no integer.
pub(super) async fn smoke_one(
    client: &Client,
    c: &SmokeCheck,
) -> Result<(String, i64), SmokeError> {
    let sql = c
        .sql
        .as_deref()
        .ok_or_else(|| SmokeError::Check("a PostgreSQL smoke check needs sql".into()))?;
    let row = client
        .query_one(sql, &[])
        .await
        .map_err(|e| SmokeError::Query {
            query: sql.to_owned(),
            reason: e.to_string(),
        })?;
    let n: i64 = row.try_get(0).map_err(|e| SmokeError::Query {
        query: sql.to_owned(),
        reason: format!("not one integer: {e}"),
    })?;
    Ok((sql.to_owned(), n))
}

/// Waits for `tool` to exit and for its stderr to be read; its stderr's tail.
///
/// # Errors
/// [`RestoreError::Tool`] with the exit status and the stderr's tail if it failed;
/// [`RestoreError::Target`] if it could not be waited for.
async fn tool_ended(
    child: &mut ReapedChild,
    tail: StderrTail,
    tool: &str,
) -> Result<StderrTail, RestoreError> {
    let status = child
        .wait()
        .await
        .map_err(|e| RestoreError::Target(format!("waiting for {tool}: {e}")))?;
    tail.wait();
    if !status.success() {
        return Err(RestoreError::Tool {
            tool: tool.into(),
            status: describe_status(status),
            stderr: tail.text(),
        });
    }
    Ok(tail)
}

/// The archive being written for `pg_restore --jobs`: the first write error is kept for
/// the sink's `finish` to report (the pipeline reports a failed write as the stream's own
/// failure, which would hide a full disk).
struct StagedFile {
    file: std::fs::File,
    failed: std::sync::Arc<std::sync::Mutex<Option<std::io::Error>>>,
}

impl std::io::Write for StagedFile {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.file.write(data).inspect_err(|e| {
            let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
            failed.get_or_insert_with(|| std::io::Error::new(e.kind(), e.to_string()));
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// A PostgreSQL restore in progress: the scratch database beside the target.
struct PgRestore {
    pg: Postgres,
    /// With `restore_jobs` above 1: where the archive is written for `pg_restore --jobs`.
    staged: Option<std::path::PathBuf>,
    target: String,
    scratch: String,
    old: String,
    expected: DatabaseCounts,
    created: bool,
    /// psql has been given the globals part: roles of the backup may now exist in the
    /// live cluster, whatever becomes of the restore.
    roles_applied: bool,
}

impl PgRestore {
    async fn maintenance(&self) -> Result<Client, RestoreError> {
        self.pg
            .connect(&self.pg.cfg.maintenance_database)
            .await
            .map_err(|e| RestoreError::Target(e.to_string()))
    }

    /// Starts `tool` reading a part on its stdin. It fails if it exits unsuccessfully, or
    /// if `errors` finds errors in its stderr (psql goes on after an error and exits 0).
    fn tool_sink(
        &self,
        tool: &'static str,
        cmd: Command,
        errors: fn(&StderrTail) -> Option<String>,
    ) -> Result<PartSink, RestoreError> {
        let (mut child, stdin, tail) =
            self.pg
                .spawn(cmd, tool, true)
                .map_err(|source| RestoreError::Spawn {
                    tool: tool.into(),
                    source,
                })?;
        let finish = async move {
            let tail = tool_ended(&mut child, tail, tool).await?;
            match errors(&tail) {
                None => Ok(()),
                Some(stderr) => Err(RestoreError::Tool {
                    tool: tool.into(),
                    status: "errors reported".into(),
                    stderr,
                }),
            }
        };
        Ok(PartSink {
            writer: Box::new(stdin),
            finish: finish.boxed(),
        })
    }

    async fn restore_globals(&mut self) -> Result<PartSink, RestoreError> {
        let mut cmd = self.pg.command("psql");
        cmd.args([
            "--no-psqlrc",
            "--quiet",
            "--set",
            "ON_ERROR_STOP=0",
            "--file",
            "-",
            "--dbname",
        ])
        .arg(&self.pg.cfg.maintenance_database);
        // Roles that already exist (at least the connecting superuser) are expected.
        fn errors(tail: &StderrTail) -> Option<String> {
            let errors: Vec<String> = tail
                .lines()
                .into_iter()
                .filter(|l| l.contains("ERROR:") && !l.contains("already exists"))
                .collect();
            (!errors.is_empty()).then(|| errors.join(" | "))
        }
        self.tool_sink("psql", cmd, errors)
    }

    async fn restore_main(&mut self, manifest: &Manifest) -> Result<PartSink, RestoreError> {
        if let Some(path) = &self.staged {
            let dir = path.parent().unwrap_or(path);
            tree::ensure_room(dir, manifest.bytes_uncompressed)?;
        }
        let maint = self.maintenance().await?;
        let owner_exists = maint
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1",
                &[&self.expected.owner],
            )
            .await
            .map_err(|e| RestoreError::Target(e.to_string()))?
            .is_some();
        let mut create = format!(
            "CREATE DATABASE {} TEMPLATE template0 ENCODING '{}'",
            quote_ident(&self.scratch),
            self.expected.encoding.replace('\'', "")
        );
        if owner_exists {
            create.push_str(&format!(" OWNER {}", quote_ident(&self.expected.owner)));
        }
        maint.batch_execute(&create).await.map_err(|e| {
            RestoreError::Target(format!("creating scratch database {}: {e}", self.scratch))
        })?;
        self.created = true;
        let mut cmd = self.pg.command("pg_restore");
        cmd.args(["--clean", "--if-exists", "--exit-on-error", "--dbname"])
            .arg(&self.scratch);
        match self.staged.clone() {
            None => self.tool_sink("pg_restore", cmd, |_| None),
            Some(path) => self.staged_sink(cmd, path, manifest.bytes_uncompressed),
        }
    }

    /// The part written to `path` (created new, mode 0600), then `pg_restore --jobs
    /// <restore_jobs>` of that file (`cmd` without the file): `pg_restore` restores in
    /// parallel from a file, not from its stdin. The file is removed when `pg_restore` has
    /// ended, whatever the outcome. `pg_restore` runs only on a whole archive: the file must
    /// hold `expected` bytes (the manifest's `bytes_uncompressed`), or the stream was cut
    /// short (a failed download) and nothing is restored from it.
    ///
    /// # Errors
    /// [`RestoreError::Target`] if `path` cannot be created; the sink's `finish` returns
    /// [`RestoreError::Target`] for a write that failed (naming the file and the error,
    /// e.g. a full disk) or a file of another size, and the tool's errors as
    /// [`Self::tool_sink`] does.
    fn staged_sink(
        &self,
        mut cmd: Command,
        path: std::path::PathBuf,
        expected: u64,
    ) -> Result<PartSink, RestoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| {
                RestoreError::Target(format!(
                    "cannot create {} for pg_restore --jobs: {e}; nothing was restored",
                    path.display()
                ))
            })?;
        let failed = std::sync::Arc::new(std::sync::Mutex::new(None));
        let writer = StagedFile {
            file,
            failed: failed.clone(),
        };
        cmd.arg("--jobs")
            .arg(self.pg.cfg.restore_jobs.to_string())
            .arg(&path);
        let pg = self.pg.clone();
        let finish = async move {
            let restored = async {
                if let Some(e) = failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    return Err(RestoreError::Target(format!(
                        "writing the archive to {} for pg_restore --jobs: {e}",
                        path.display()
                    )));
                }
                let written = tokio::fs::metadata(&path)
                    .await
                    .map_err(|e| RestoreError::Target(format!("{}: {e}", path.display())))?
                    .len();
                if written != expected {
                    return Err(RestoreError::Target(format!(
                        "{} holds {written} bytes of the archive, its manifest {expected}: \
                         pg_restore was not run",
                        path.display()
                    )));
                }
                let (mut child, _, tail) =
                    pg.spawn(cmd, "pg_restore", false)
                        .map_err(|source| RestoreError::Spawn {
                            tool: "pg_restore".into(),
                            source,
                        })?;
                tool_ended(&mut child, tail, "pg_restore").await.map(drop)
            }
            .await;
            if let Err(e) = tokio::fs::remove_file(&path).await {
                tracing::warn!(file = %path.display(), error = %e, "Could not remove the archive written for pg_restore --jobs.");
            }
            restored
        };
        Ok(PartSink {
            writer: Box::new(writer),
            finish: finish.boxed(),
        })
    }

    /// Puts the scratch database in place of the target; true when a target was replaced
    /// (its drop then goes on in the background, [`PgRestore::drop_replaced`]).
    async fn swap(&mut self) -> Result<bool, RestoreError> {
        let maint = self.maintenance().await?;
        let target_exists = maint
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_database WHERE datname = $1",
                &[&self.target],
            )
            .await
            .map_err(|e| RestoreError::Target(e.to_string()))?
            .is_some();
        let terminate = "SELECT pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity \
                         WHERE datname = $1 AND pid <> pg_backend_pid()";
        if target_exists {
            let mut last = None;
            for _ in 0..5 {
                let _ = maint.execute(terminate, &[&self.target]).await;
                match maint
                    .batch_execute(&format!(
                        "ALTER DATABASE {} RENAME TO {}",
                        quote_ident(&self.target),
                        quote_ident(&self.old)
                    ))
                    .await
                {
                    Ok(()) => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            if let Some(e) = last {
                return Err(RestoreError::Target(format!(
                    "cannot move the live database {:?} aside (still in use?): {e}; it is unchanged",
                    self.target
                )));
            }
        }
        let _ = maint.execute(terminate, &[&self.scratch]).await;
        if let Err(e) = maint
            .batch_execute(&format!(
                "ALTER DATABASE {} RENAME TO {}",
                quote_ident(&self.scratch),
                quote_ident(&self.target)
            ))
            .await
        {
            let back = if target_exists {
                maint
                    .batch_execute(&format!(
                        "ALTER DATABASE {} RENAME TO {}",
                        quote_ident(&self.old),
                        quote_ident(&self.target)
                    ))
                    .await
            } else {
                Ok(())
            };
            return Err(RestoreError::Target(match back {
                Ok(()) => format!(
                    "cannot rename the restored database into place: {e}; {:?} is unchanged",
                    self.target
                ),
                Err(e2) => format!(
                    "cannot rename the restored database into place: {e}; and cannot put the old one back: {e2}. \
                     THE TARGET IS NOT IN PLACE: the old data is in database {:?}, the restored data in {:?}",
                    self.old, self.scratch
                ),
            }));
        }
        self.created = false;
        if target_exists {
            self.drop_replaced().await;
        }
        Ok(target_exists)
    }

    /// Drops the replaced database (`<target>__ferry_old_<job>`) on a task of its own, so
    /// the restore reports once the checked data is in place: PostgreSQL forces a
    /// checkpoint for every `DROP DATABASE`, which writes out the whole freshly restored
    /// database (seconds per GiB; `bench/README.md`, issue 20). The datastore's `dropping`
    /// lock is held until the drop ends; the next restore waits for it. If the agent stops
    /// first, its search for leftovers at the next start removes the database (the target
    /// exists, the new copy does not: the swap was finished).
    async fn drop_replaced(&self) {
        let held = self.pg.dropping.clone().lock_owned().await;
        let (pg, old) = (self.pg.clone(), self.old.clone());
        tokio::spawn(async move {
            let _held = held;
            let started = std::time::Instant::now();
            let dropped = match pg.connect(&pg.cfg.maintenance_database).await {
                Ok(client) => {
                    use leftovers::Store as _;
                    Databases { client }
                        .remove(&old)
                        .await
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            match dropped {
                Ok(()) => {
                    tracing::info!(database = %old, seconds = started.elapsed().as_secs_f64(), "Dropped the replaced database.")
                }
                Err(error) => {
                    tracing::warn!(database = %old, %error, "Could not drop the replaced database; the next restore or the agent's next start removes it.")
                }
            }
        });
    }
}

impl RestoreSession for PgRestore {
    fn target_state(&self) -> Option<String> {
        self.roles_applied.then(|| {
            format!(
                "database {:?} was left as it was, but the backup's roles (its globals part, \
                 checked before it was applied) were created or altered in the cluster",
                self.target
            )
        })
    }

    fn part<'a>(
        &'a mut self,
        manifest: &'a Manifest,
    ) -> BoxFuture<'a, Result<PartSink, RestoreError>> {
        async move {
            match (manifest.part.as_str(), manifest.format.as_str()) {
                ("globals", "sql") => {
                    self.roles_applied = true;
                    self.restore_globals().await
                }
                ("", "pgdump") => self.restore_main(manifest).await,
                (part, format) => Err(RestoreError::Manifest(format!(
                    "{}: unexpected part {part:?} of format {format:?} for PostgreSQL",
                    manifest.file
                ))),
            }
        }
        .boxed()
    }

    fn commit<'a>(
        &'a mut self,
        _main: &'a Manifest,
    ) -> BoxFuture<'a, Result<String, RestoreError>> {
        async move {
            if !self.created {
                return Err(RestoreError::Manifest(
                    "the backup has no main pg_dump part".into(),
                ));
            }
            let counting = std::time::Instant::now();
            let client = self
                .pg
                .connect(&self.scratch)
                .await
                .map_err(|e| RestoreError::Target(e.to_string()))?;
            let counted = |e: tokio_postgres::Error| {
                RestoreError::Target(format!("counting restored rows: {e}"))
            };
            // The server's own count of the rows pg_restore inserted, without a scan of the
            // restored data (which also dirtied every page of it, to set hint bits); a
            // session's counters reach the statistics as it exits, so a little later than
            // pg_restore's exit. Where they differ from the manifest, count(*) decides.
            let mut by_stats = None;
            for attempt in 0..STATS_ATTEMPTS {
                if attempt > 0 {
                    tokio::time::sleep(STATS_RETRY).await;
                }
                let found = inserted_counts(&client).await.map_err(counted)?;
                if count_differences(&self.expected, &found).is_empty() {
                    by_stats = Some(found);
                    break;
                }
            }
            let (found, how) = match by_stats {
                Some(found) => (found, "the server's count of the rows inserted"),
                None => (
                    database_counts(&client).await.map_err(counted)?,
                    "count(*) of every table",
                ),
            };
            drop(client);
            tracing::info!(
                database = %self.scratch,
                seconds = counting.elapsed().as_secs_f64(),
                how,
                "Counted the restored rows."
            );
            let diff = count_differences(&self.expected, &found);
            if !diff.is_empty() {
                return Err(RestoreError::Mismatch(diff.join("; ")));
            }
            let replaced = self.swap().await?;
            let parallel = match &self.staged {
                Some(path) => format!(
                    " by pg_restore --jobs {} from {} (removed)",
                    self.pg.cfg.restore_jobs,
                    path.display()
                ),
                None => String::new(),
            };
            Ok(format!(
                "{} tables, {} rows restored into database {:?}{parallel}, equal to the manifest ({how}){}",
                found.rows.len(),
                found.rows.values().sum::<i64>(),
                self.target,
                if replaced {
                    format!(
                        "; the database it replaced ({}) is dropped in the background",
                        self.old
                    )
                } else {
                    String::new()
                }
            ))
        }
        .boxed()
    }

    fn abort<'a>(&'a mut self) -> BoxFuture<'a, ()> {
        async move {
            if !self.created {
                return;
            }
            match self.maintenance().await {
                Ok(maint) => {
                    if let Err(e) = maint
                        .batch_execute(&format!(
                            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                            quote_ident(&self.scratch)
                        ))
                        .await
                    {
                        tracing::warn!(database = %self.scratch, error = %e, "Could not drop the scratch database.");
                    }
                }
                Err(e) => tracing::warn!(database = %self.scratch, error = %e, "Could not drop the scratch database."),
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staged_file_keeps_its_first_write_error_for_the_report() {
        use std::io::Write as _;
        // /dev/full refuses every write with ENOSPC, as a full scratch_dir would.
        let failed = std::sync::Arc::new(std::sync::Mutex::new(None));
        let mut staged = StagedFile {
            file: std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
            failed: failed.clone(),
        };
        assert!(staged.write_all(b"archive").is_err());
        assert!(staged.write_all(b"more").is_err());
        let kept = failed
            .lock()
            .unwrap()
            .take()
            .expect("the write error is kept");
        assert!(kept.to_string().contains("No space left"), "{kept}");
        assert_eq!(kept.kind(), std::io::ErrorKind::StorageFull, "{kept}");
    }

    #[test]
    fn differences_name_the_table() {
        let mut a = DatabaseCounts::default();
        a.rows.insert("public.t".into(), 10);
        a.rows.insert("public.u".into(), 1);
        let mut b = a.clone();
        b.rows.insert("public.t".into(), 9);
        b.rows.remove("public.u");
        let d = count_differences(&a, &b).join("; ");
        assert!(
            d.contains("public.t: 10 rows in the manifest, 9 restored"),
            "{d}"
        );
        assert!(d.contains("public.u is missing"), "{d}");
        assert_eq!(DatabaseCounts::from_json(&a.to_json()), Some(a));
    }

    #[test]
    fn scratch_names_fit_postgres_identifiers() {
        let long = "x".repeat(63);
        assert_eq!(truncate(&long, 10).len(), 10);
        assert_eq!(truncate("ééé", 3), "é");
    }

    #[test]
    fn leftovers_are_the_exact_scratch_names_of_the_target() {
        let job = "01JAAAAAAAAAAAAAAAAAAAAAAA";
        let other = "01JBBBBBBBBBBBBBBBBBBBBBBB";
        let long = "t".repeat(60);
        let names: Vec<String> = vec![
            "app".into(),
            scratch_name("app", NEW_TAG, job),
            scratch_name("app", OLD_TAG, other),
            // Another target's, a job id in the wrong case, not a ULID, a user's database.
            scratch_name("app2", NEW_TAG, job),
            format!("app{NEW_TAG}{job}"),
            format!("app{NEW_TAG}01jaaaaaaaaaaaaaaaaaaaaaa"),
            "app__ferry_new_backup".into(),
            scratch_name(&long, NEW_TAG, job),
        ];
        assert_eq!(names[1], "app__ferry_new_01jaaaaaaaaaaaaaaaaaaaaaaa");
        let found = leftover_jobs("app", &names);
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            [
                (job.to_owned(), (true, false)),
                (other.to_owned(), (false, true))
            ]
        );
        // A long target's names are cut as the restore cuts them.
        assert_eq!(scratch_name(&long, NEW_TAG, job).len(), MAX_IDENTIFIER);
        assert_eq!(leftover_jobs(&long, &names).len(), 1);
    }
}
