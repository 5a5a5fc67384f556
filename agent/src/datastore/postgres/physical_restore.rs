//! The restore side of `method = "physical"` (staging): a base backup restored as a new
//! data directory beside the live one, checked by PostgreSQL itself, then swapped in.
//!
//! 1. The tar is unpacked into `<parent>/.<data_dir>.ferry-new-<job>` (mode 0700, owned by
//!    `os_user`), beside `data_dir` on the same file system; the live cluster runs on.
//! 2. `pg_verifybackup` checks every file and the included WAL against the backup's own
//!    `backup_manifest`; the system identifier in `global/pg_control` and the
//!    `backup_label` are compared with Ferry's manifest.
//! 3. PostgreSQL is started on the new directory (`pg_ctl start` as `os_user`) on
//!    `check_port`, listening on no TCP address but a Unix socket in a private directory
//!    (`.<data_dir>.ferry-check-<job>`, mode 0700; in the system's temporary directory if
//!    that path is too long for a socket),
//!    with its own `pg_hba.conf` (`local all all trust`, for the agent alone) and
//!    `archive_mode=off`. It recovers from the included WAL up to the backup's stop LSN and
//!    must then accept connections out of recovery; the operator's smoke checks run on it;
//!    `ALTER SYSTEM SET archive_mode = off` (as pgBackRest's `--archive-mode=off` does), so
//!    that the restored cluster never pushes WAL into production's archive; then it is
//!    stopped cleanly (`pg_ctl stop -m fast`). Any failure so far removes the new directory
//!    and leaves the live cluster as it was.
//! 4. `stop_command`; `data_dir` is renamed to `.<data_dir>.ferry-old-<job>` and the new
//!    directory to `data_dir`; `start_command`. If the cluster does not start, the swap is
//!    undone (the restored directory back to `-new-`, the old one back) and the cluster
//!    started on its old data; the error says which state it is left in. On success the
//!    old directory is removed.
//!
//! The restored `postgresql.conf` and `pg_hba.conf` are production's when production keeps
//! them in its data directory: `start_command` must give staging's own settings (port,
//! socket directory) on its command line or through `include` files outside the data
//! directory. A data directory without `postgresql.conf` (Debian keeps it in
//! `/etc/postgresql`) is checked with an empty one. The backup restores to its stop LSN.
//!
//! # To a point in time
//!
//! With a [`PointInTime`] (`ferry restore --to-time T`), step 3 first writes
//! `recovery.signal` and appends to the new directory's `postgresql.auto.conf` (as
//! pgBackRest's `--type=time` does): `restore_command` (`ferry-agent wal-get` through this
//! staging agent's `[wal]` socket, which reads and decrypts the source environment's
//! archive), `recovery_target_time = T` and `recovery_target_action = 'promote'`; the
//! timeline followed is PostgreSQL's default, the latest. The checking server replays the
//! archived WAL up to T (waiting up to an hour for recovery to end); the restore fails,
//! with the live cluster as it was, when PostgreSQL runs out of archived WAL before T
//! ("recovery ended before configured recovery target was reached"), or when the last
//! transaction it replayed committed after T. The three settings are then removed again
//! (`ALTER SYSTEM RESET`), so the swapped-in cluster does not fetch WAL on its own.
//!
//! A restore killed half-way leaves the `-new-`, `-check-` and `-old-` siblings, and perhaps a
//! PostgreSQL still running on `-new-`: on start and before the next restore the agent
//! stops that server (`pg_ctl stop -m immediate`) and puts the siblings right
//! ([`crate::datastore::common::leftovers::recover_dir`]); it does not run
//! `start_command`.

use std::fs;
use std::path::{Path, PathBuf};

use futures::FutureExt;
use futures::future::BoxFuture;

use super::{BASE, BaseBackupInfo, Postgres};
use crate::datastore::common::leftovers::{self, Recovered};
use crate::datastore::common::smoke::run_smoke;
use crate::datastore::common::tool::{os_user_ids, run_command};
use crate::datastore::common::tree;
use crate::datastore::{PartSink, PointInTime, RestoreError, RestoreSession};
use ferry_core::manifest::Manifest;

/// How long PostgreSQL may take to start on a restored directory (recovery of the
/// included WAL), seconds.
const START_SECONDS: u32 = 3600;

/// How long a clean stop may take, seconds.
const STOP_SECONDS: u32 = 600;

/// A physical restore in progress.
struct PhysicalRestore {
    pg: Postgres,
    expected: BaseBackupInfo,
    data_dir: PathBuf,
    new: PathBuf,
    old: PathBuf,
    ids: (u32, u32),
    /// `.<data_dir>.ferry-check-<job>`: the private directory of the checking server
    /// (socket, `pg_hba.conf`, log), unless its socket's path would be too long.
    check: PathBuf,
    /// The checking server's directory in use: `check`, or `side_tmp`'s.
    side_dir: Option<PathBuf>,
    /// A directory in the system's temporary directory instead of `check`, when a socket
    /// in `check` would pass the 107 bytes of a Unix socket's path (unix(7)).
    side_tmp: Option<tempfile::TempDir>,
    /// A checking server may be running on `new`.
    side_running: bool,
    /// `new` was made by this restore and still is the restored copy.
    unpacked: bool,
    /// How the live cluster is, once this restore has touched it.
    state: Option<String>,
    /// Recover up to this instant with archived WAL; `None`: to the backup's stop LSN.
    to: Option<PointInTime>,
    /// Once recovered to `to`: when the last transaction replayed committed.
    recovered_to: Option<chrono::DateTime<chrono::Utc>>,
}

/// The settings a restore to a point in time adds to `postgresql.auto.conf`, removed
/// again once the checking server has recovered.
const RECOVERY_SETTINGS: [&str; 3] = [
    "restore_command",
    "recovery_target_time",
    "recovery_target_action",
];

/// PostgreSQL's log line when the archive ran out before `recovery_target_time`
/// (src/backend/access/transam/xlogrecovery.c, PostgreSQL 13 and later).
const TARGET_NOT_REACHED: &str = "recovery ended before configured recovery target was reached";

/// `value` as a single-quoted string of `postgresql.conf` (quotes doubled).
fn conf_string(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// The system identifier in a data directory's `global/pg_control` (its first 8 bytes,
/// `uint64` in the server's byte order, src/include/catalog/pg_control.h).
fn control_system_identifier(data: &Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut id = [0u8; 8];
    fs::File::open(data.join("global/pg_control"))?.read_exact(&mut id)?;
    Ok(u64::from_ne_bytes(id))
}

/// Gives `root` and everything under it (links themselves, not their targets) to
/// `uid:gid`.
fn chown_tree(root: &Path, (uid, gid): (u32, u32)) -> std::io::Result<()> {
    for entry in walkdir::WalkDir::new(root).follow_links(false) {
        let entry = entry.map_err(std::io::Error::other)?;
        std::os::unix::fs::lchown(entry.path(), Some(uid), Some(gid))?;
    }
    Ok(())
}

/// The last `n` lines of the file at `path`, joined by ` | ` (empty if unreadable).
fn last_lines(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(n).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

impl Postgres {
    /// `pg_ctl ARGS` as `os_user` (through `runuser` when the agent runs as root).
    fn pg_ctl(&self, args: &[&std::ffi::OsStr]) -> tokio::process::Command {
        let pg_ctl = self.tools.path("pg_ctl");
        let mut cmd = if tree::is_root() && self.cfg.os_user != "root" {
            let mut c = tokio::process::Command::new("runuser");
            c.args(["-u", &self.cfg.os_user, "--"]).arg(pg_ctl);
            c
        } else {
            tokio::process::Command::new(pg_ctl)
        };
        cmd.args(args).current_dir("/").kill_on_drop(true);
        cmd
    }

    /// Stops a checking server on `data` at once (`pg_ctl stop -m immediate`); errors are
    /// logged: it may not run.
    async fn stop_side(&self, data: &Path) {
        let cmd = self.pg_ctl(&[
            "-D".as_ref(),
            data.as_os_str(),
            "-m".as_ref(),
            "immediate".as_ref(),
            "-w".as_ref(),
            "stop".as_ref(),
        ]);
        if let Err(e) = crate::datastore::run_tool(cmd).await {
            tracing::debug!(path = %data.display(), error = %e, "No checking server to stop.");
        }
    }

    /// Staging: begins the restore of the base backup `main` describes (see the module
    /// docs); nothing is touched yet.
    pub(super) async fn begin_physical(
        &self,
        main: &Manifest,
        job_id: &str,
        namespaces: &[String],
        to: Option<PointInTime>,
    ) -> Result<Box<dyn RestoreSession>, RestoreError> {
        let expected: BaseBackupInfo = crate::datastore::expect_whole(
            main,
            "postgres",
            &BASE,
            "a PostgreSQL base backup (method = \"physical\")",
            namespaces,
        )?;
        let data_dir = self
            .cfg
            .data_dir
            .clone()
            .ok_or_else(|| RestoreError::Target("no data_dir configured".into()))?;
        tree::refuse_mount_point(&data_dir, "data_dir")?;
        tree::ensure_room(&data_dir, main.bytes_uncompressed)?;
        let ids = os_user_ids(&self.cfg.os_user)
            .map_err(|e| RestoreError::Target(format!("os_user: {e}")))?;
        Ok(Box::new(PhysicalRestore {
            pg: self.clone(),
            expected,
            new: tree::sibling(&data_dir, "new", job_id),
            old: tree::sibling(&data_dir, "old", job_id),
            check: tree::sibling(&data_dir, "check", job_id),
            data_dir,
            ids,
            side_dir: None,
            side_tmp: None,
            side_running: false,
            unpacked: false,
            state: None,
            to,
            recovered_to: None,
        }))
    }

    /// Staging, `method = "physical"`: stops a checking server left running on a `-new-`
    /// sibling of `data_dir` by an interrupted restore, then puts the siblings right.
    pub(super) async fn recover_physical(
        &self,
        skip: &[String],
    ) -> Result<Vec<Recovered>, RestoreError> {
        let Some(dir) = self.cfg.data_dir.clone() else {
            return Ok(Vec::new());
        };
        let listing = |e: std::io::Error| {
            RestoreError::Target(format!(
                "cannot list the parent of {} for leftovers: {e}",
                dir.display()
            ))
        };
        for job in leftovers::sibling_jobs(&dir, &[]).map_err(listing)? {
            let new = tree::sibling(&dir, "new", &job);
            if !leftovers::skipped(&job, skip) && new.join("postmaster.pid").exists() {
                self.stop_side(&new).await;
            }
        }
        let skip = skip.to_vec();
        let target = dir.clone();
        tokio::task::spawn_blocking(move || leftovers::recover_dir(&target, &["check"], &skip))
            .await
            .map_err(|e| RestoreError::Target(e.to_string()))?
            .map_err(listing)
    }
}

impl PhysicalRestore {
    /// Checks the unpacked directory with `pg_verifybackup` and against the manifest.
    async fn verify(&self) -> Result<(), RestoreError> {
        let mut cmd = tokio::process::Command::new(self.pg.tools.path("pg_verifybackup"));
        cmd.arg(&self.new).kill_on_drop(true);
        crate::datastore::run_tool(cmd)
            .await
            .map_err(RestoreError::tool("pg_verifybackup"))?;
        let found = control_system_identifier(&self.new).map_err(|e| {
            RestoreError::Target(format!("{}/global/pg_control: {e}", self.new.display()))
        })?;
        if found.to_string() != self.expected.system_identifier {
            return Err(RestoreError::Mismatch(format!(
                "the manifest says system {}, the restored pg_control says {found}",
                self.expected.system_identifier
            )));
        }
        let label = fs::read_to_string(self.new.join("backup_label")).unwrap_or_default();
        if label != self.expected.backup_label {
            return Err(RestoreError::Mismatch(format!(
                "the restored backup_label differs from the manifest's: {label:?}"
            )));
        }
        Ok(())
    }

    /// A restore to a point in time: `recovery.signal` and the recovery settings in the
    /// new directory's `postgresql.auto.conf` (see the module docs).
    fn prepare_recovery(&self, to: &PointInTime) -> Result<(), RestoreError> {
        use std::io::Write;
        let target = |what: &str, e: std::io::Error| {
            RestoreError::Target(format!("{what} in {}: {e}", self.new.display()))
        };
        let auto = self.new.join("postgresql.auto.conf");
        let lines = format!(
            "\n# Added by ferry-agent for a restore to a point in time; removed once recovered.\n\
             restore_command = {}\nrecovery_target_time = {}\nrecovery_target_action = 'promote'\n",
            conf_string(&to.restore_command),
            conf_string(&to.time.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()),
        );
        fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&auto)
            .and_then(|mut f| f.write_all(lines.as_bytes()))
            .map_err(|e| {
                target(
                    "cannot add the recovery settings to postgresql.auto.conf",
                    e,
                )
            })?;
        let signal = self.new.join("recovery.signal");
        fs::write(&signal, "").map_err(|e| target("cannot write recovery.signal", e))?;
        if tree::is_root() {
            for file in [&auto, &signal] {
                std::os::unix::fs::lchown(file, Some(self.ids.0), Some(self.ids.1))
                    .map_err(|e| target("cannot give the recovery files to os_user", e))?;
            }
        }
        Ok(())
    }

    /// A restore to a point in time: waits until the checking server has replayed the
    /// archived WAL up to `to.time` and promoted itself (at most [`START_SECONDS`]); the
    /// commit time (UTC) of the last transaction it replayed, if any.
    ///
    /// # Errors
    /// [`RestoreError::Target`] when the archive ends before `to.time` or the server stops;
    /// [`RestoreError::Mismatch`] when it replayed a transaction committed after it.
    async fn await_recovery(
        &self,
        to: &PointInTime,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, RestoreError> {
        let log = self
            .side_dir
            .clone()
            .unwrap_or_default()
            .join("postgres.log");
        let deadline =
            std::time::Instant::now() + std::time::Duration::from_secs(START_SECONDS.into());
        let ended = |why: String| {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if text.contains(TARGET_NOT_REACHED) {
                RestoreError::Target(format!(
                    "PostgreSQL ran out of WAL before reaching {}: the archive's newest segment is {}, \
                     pushed {}, and a file it asked for could not be fetched or is not archived: {}",
                    to.time.to_rfc3339(),
                    to.newest.0,
                    to.newest.1.to_rfc3339(),
                    last_lines(&log, 12)
                ))
            } else {
                RestoreError::Target(format!(
                    "PostgreSQL did not finish recovering {} to {}: {why}: {}",
                    self.new.display(),
                    to.time.to_rfc3339(),
                    last_lines(&log, 8)
                ))
            }
        };
        loop {
            let state = match self.side_client().await {
                Ok(client) => client
                    .query_one(
                        "SELECT pg_catalog.pg_is_in_recovery(), \
                         (extract(epoch FROM pg_catalog.pg_last_xact_replay_timestamp()) * 1000)::bigint",
                        &[],
                    )
                    .await
                    .map(|row| (row.get::<_, bool>(0), row.get::<_, Option<i64>>(1)))
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match state {
                Ok((false, replayed)) => {
                    let replayed = replayed.and_then(chrono::DateTime::from_timestamp_millis);
                    if let Some(at) = replayed
                        && at > to.time
                    {
                        return Err(RestoreError::Mismatch(format!(
                            "recovery to {} replayed a transaction committed at {}",
                            to.time.to_rfc3339(),
                            at.to_rfc3339()
                        )));
                    }
                    return Ok(replayed);
                }
                Ok((true, _)) => {}
                // The server went away: the log says why.
                Err(e) if !self.new.join("postmaster.pid").exists() => return Err(ended(e)),
                Err(_) => {}
            }
            if std::time::Instant::now() > deadline {
                return Err(ended(format!("still in recovery after {START_SECONDS} s")));
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }

    /// Starts the checking server on the new directory (see the module docs).
    async fn start_side(&mut self) -> Result<(), RestoreError> {
        use std::os::unix::fs::PermissionsExt;
        let target = |what: &str, e: std::io::Error| RestoreError::Target(format!("{what}: {e}"));
        use std::os::unix::fs::DirBuilderExt;
        // `<dir>/.s.PGSQL.<port>` must fit a socket address, and the path goes into pg_ctl's
        // `-o` between single quotes.
        let fits = self.check.as_os_str().len() + "/.s.PGSQL.65535".len() < 108
            && !self.check.to_string_lossy().contains(['\'', '\\']);
        let dir = if fits {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&self.check)
                .map_err(|e| target(&format!("cannot create {}", self.check.display()), e))?;
            self.check.clone()
        } else {
            let tmp = tempfile::Builder::new()
                .prefix("ferry-pgcheck-")
                .tempdir()
                .map_err(|e| target("cannot create the checking server's directory", e))?;
            let dir = tmp.path().to_owned();
            self.side_tmp = Some(tmp);
            dir
        };
        self.side_dir = Some(dir.clone());
        fs::write(
            dir.join("pg_hba.conf"),
            "# ferry-agent's check of a restored cluster: Unix socket, this directory only\n\
             local all all trust\n",
        )
        .map_err(|e| target("pg_hba.conf of the check", e))?;
        let mut opts = format!(
            "-c port={} -c listen_addresses='' -c unix_socket_directories='{d}' \
             -c hba_file='{d}/pg_hba.conf' -c archive_mode=off -c logging_collector=off",
            self.pg.cfg.check_port(),
            d = dir.display()
        );
        if !self.new.join("postgresql.conf").exists() {
            fs::write(dir.join("postgresql.conf"), "")
                .map_err(|e| target("postgresql.conf of the check", e))?;
            opts.push_str(&format!(
                " -c config_file='{}/postgresql.conf'",
                dir.display()
            ));
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .and_then(|()| chown_tree(&dir, self.ids))
            .map_err(|e| target("the checking server's directory", e))?;
        let log = dir.join("postgres.log");
        self.side_running = true;
        let cmd = self.pg.pg_ctl(&[
            "-D".as_ref(),
            self.new.as_os_str(),
            "-l".as_ref(),
            log.as_os_str(),
            "-w".as_ref(),
            "-t".as_ref(),
            START_SECONDS.to_string().as_ref(),
            "-o".as_ref(),
            opts.as_ref(),
            "start".as_ref(),
        ]);
        crate::datastore::run_tool(cmd).await.map_err(|e| {
            RestoreError::Target(format!(
                "PostgreSQL did not start on the restored data directory {} ({}): {}",
                self.new.display(),
                e,
                last_lines(&log, 8)
            ))
        })?;
        Ok(())
    }

    /// Connects to the checking server as the configured user, to `smoke_database`.
    async fn side_client(&self) -> Result<tokio_postgres::Client, RestoreError> {
        let dir = self.side_dir.clone().unwrap_or_default();
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&dir)
            .port(self.pg.cfg.check_port())
            .user(&self.pg.cfg.user)
            .dbname(&self.pg.cfg.smoke_database)
            .application_name("ferry-agent")
            .connect_timeout(std::time::Duration::from_secs(30));
        self.pg
            .connect_with(config, &self.pg.cfg.smoke_database)
            .await
            .map_err(|e| RestoreError::Target(format!("the checking server: {e}")))
    }

    /// Checks the recovered cluster on the checking server; its summary and smoke lines.
    async fn check_side(&self) -> Result<(i64, Vec<String>), RestoreError> {
        let client = self.side_client().await?;
        let q =
            |e: tokio_postgres::Error| RestoreError::Target(format!("the checking server: {e}"));
        let row = client
            .query_one(
                "SELECT pg_catalog.pg_is_in_recovery(), \
                 (SELECT count(*) FROM pg_catalog.pg_database WHERE datallowconn)",
                &[],
            )
            .await
            .map_err(q)?;
        let (in_recovery, databases): (bool, i64) = (row.get(0), row.get(1));
        if in_recovery {
            return Err(RestoreError::Mismatch(
                "the restored cluster is still in recovery after it started".into(),
            ));
        }
        let smoke = run_smoke(&self.pg.cfg.smoke, |c| {
            let client = &client;
            async move { super::restore::smoke_one(client, c).await }
        })
        .await?;
        client
            .batch_execute("ALTER SYSTEM SET archive_mode = off")
            .await
            .map_err(q)?;
        if self.to.is_some() {
            for setting in RECOVERY_SETTINGS {
                client
                    .batch_execute(&format!("ALTER SYSTEM RESET {setting}"))
                    .await
                    .map_err(q)?;
            }
        }
        Ok((databases, smoke))
    }

    /// Stops the checking server cleanly, so the directory starts without recovery.
    async fn stop_side_cleanly(&mut self) -> Result<(), RestoreError> {
        let cmd = self.pg.pg_ctl(&[
            "-D".as_ref(),
            self.new.as_os_str(),
            "-m".as_ref(),
            "fast".as_ref(),
            "-w".as_ref(),
            "-t".as_ref(),
            STOP_SECONDS.to_string().as_ref(),
            "stop".as_ref(),
        ]);
        crate::datastore::run_tool(cmd)
            .await
            .map_err(RestoreError::tool("pg_ctl stop (the checking server)"))?;
        self.side_running = false;
        self.remove_side_dir();
        Ok(())
    }

    /// Removes the checking server's directory, once it is stopped.
    fn remove_side_dir(&mut self) {
        if self.side_dir.take().is_some_and(|d| d == self.check)
            && let Err(e) = fs::remove_dir_all(&self.check)
        {
            tracing::warn!(path = %self.check.display(), error = %e, "Cannot remove the checking server's directory.");
        }
        self.side_tmp = None;
    }

    /// After `stop_command`, the swap failed and `data_dir` holds its old data: starts
    /// the cluster again and says so in the target's state.
    async fn restart_unchanged(&mut self) {
        let cfg = &self.pg.cfg;
        let dir = self.data_dir.display();
        self.state = Some(
            match run_command(&cfg.start_command, "start_command").await {
                Ok(()) => format!("{dir} is unchanged and the cluster was started again"),
                Err(e) => format!(
                    "{dir} is unchanged but the cluster, stopped for the swap, did not start again ({e})"
                ),
            },
        );
    }

    /// `stop_command`, the swap, `start_command`; undone if the cluster does not start.
    async fn swap_in(&mut self) -> Result<(), RestoreError> {
        let cfg = &self.pg.cfg;
        self.state = Some(format!(
            "stop_command was run, so the cluster may be stopped; {} is unchanged",
            self.data_dir.display()
        ));
        run_command(&cfg.stop_command, "stop_command").await?;
        let (new, old, target) = (self.new.clone(), self.old.clone(), self.data_dir.clone());
        let had_target = target.exists();
        if had_target && let Err(e) = fs::rename(&target, &old) {
            self.restart_unchanged().await;
            return Err(RestoreError::Target(format!(
                "cannot move {} aside: {e}",
                target.display()
            )));
        }
        if let Err(e) = fs::rename(&new, &target) {
            let back = if had_target {
                fs::rename(&old, &target)
            } else {
                Ok(())
            };
            if back.is_ok() && had_target {
                self.restart_unchanged().await;
            }
            return Err(RestoreError::Target(match back {
                Ok(()) => format!(
                    "cannot move the restored directory to {}: {e}",
                    target.display()
                ),
                Err(e2) => {
                    self.state = Some(format!(
                        "THE DATA DIRECTORY IS NOT IN PLACE: the old one is {}, the restored one {}; the cluster is stopped",
                        old.display(),
                        new.display()
                    ));
                    format!(
                        "cannot move the restored directory to {}: {e}, nor the old one back: {e2}",
                        target.display()
                    )
                }
            }));
        }
        self.unpacked = false;
        self.state = Some(format!(
            "{} holds the restored, checked backup (the old data is in {}) but the cluster is stopped",
            target.display(),
            old.display()
        ));
        if let Err(e) = run_command(&cfg.start_command, "start_command").await {
            return Err(self.undo_swap(e, had_target).await);
        }
        self.state = None;
        if had_target {
            let old = self.old.clone();
            let removed = tokio::task::spawn_blocking(move || fs::remove_dir_all(&old)).await;
            if let Ok(Err(e)) | Err(e) = removed.map_err(std::io::Error::other) {
                tracing::warn!(path = %self.old.display(), error = %e, "Cannot remove the replaced data directory; remove it by hand.");
            }
        }
        Ok(())
    }

    /// After `start_command` failed on the restored directory (`error`): puts the old
    /// directory back and starts the cluster on it; the error to return, saying the state.
    async fn undo_swap(&mut self, error: RestoreError, had_target: bool) -> RestoreError {
        let cfg = &self.pg.cfg;
        let _ = run_command(&cfg.stop_command, "stop_command").await;
        let moved = if had_target {
            fs::rename(&self.data_dir, &self.new)
                .and_then(|()| fs::rename(&self.old, &self.data_dir))
        } else {
            Ok(())
        };
        match moved {
            Ok(()) if had_target => {
                self.unpacked = true;
                match run_command(&cfg.start_command, "start_command").await {
                    Ok(()) => {
                        self.state = Some(format!(
                            "the cluster did not start on the restored directory, so the old data was put back in {} and the cluster started on it",
                            self.data_dir.display()
                        ));
                    }
                    Err(e2) => {
                        self.state = Some(format!(
                            "the cluster did not start on the restored directory; the old data is back in {} but start_command failed again ({e2}): the cluster is stopped",
                            self.data_dir.display()
                        ));
                    }
                }
            }
            Ok(()) => {
                self.state = Some(format!(
                    "{} holds the restored backup (there was no data directory before) but the cluster did not start",
                    self.data_dir.display()
                ));
            }
            Err(e2) => {
                self.state = Some(format!(
                    "the cluster did not start on the restored directory {}, and the old one ({}) could not be put back ({e2}); the cluster is stopped",
                    self.data_dir.display(),
                    self.old.display()
                ));
            }
        }
        error
    }
}

impl RestoreSession for PhysicalRestore {
    fn part<'a>(
        &'a mut self,
        manifest: &'a Manifest,
    ) -> BoxFuture<'a, Result<PartSink, RestoreError>> {
        async move {
            if manifest.part != BASE.name || manifest.format != BASE.format {
                return Err(RestoreError::Manifest(format!(
                    "{}: unexpected part {:?} of format {:?} for a PostgreSQL base backup",
                    manifest.file, manifest.part, manifest.format
                )));
            }
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&self.new)
                .and_then(|()| {
                    if tree::is_root() {
                        std::os::unix::fs::chown(&self.new, Some(self.ids.0), Some(self.ids.1))
                    } else {
                        Ok(())
                    }
                })
                .map_err(|e| {
                    RestoreError::Target(format!("cannot create {}: {e}", self.new.display()))
                })?;
            self.unpacked = true;
            tree::unpack_sink(self.new.clone())
        }
        .boxed()
    }

    fn commit<'a>(
        &'a mut self,
        _main: &'a Manifest,
    ) -> BoxFuture<'a, Result<String, RestoreError>> {
        async move {
            if !self.unpacked {
                return Err(RestoreError::Manifest("the backup has no base backup part".into()));
            }
            if tree::is_root() {
                let (new, ids) = (self.new.clone(), self.ids);
                tokio::task::spawn_blocking(move || chown_tree(&new, ids))
                    .await
                    .map_err(|e| RestoreError::Target(e.to_string()))?
                    .map_err(|e| {
                        RestoreError::Target(format!("cannot give {} to os_user: {e}", self.new.display()))
                    })?;
            }
            self.verify().await?;
            if let Some(to) = &self.to {
                self.prepare_recovery(to)?;
            }
            self.start_side().await?;
            let replayed = match self.to.clone() {
                Some(to) => Some((self.await_recovery(&to).await?, to)),
                None => None,
            };
            self.recovered_to = replayed.as_ref().and_then(|(last, _)| *last);
            let (databases, smoke) = self.check_side().await?;
            self.stop_side_cleanly().await?;
            self.swap_in().await?;
            let e = &self.expected;
            let recovered = match &replayed {
                None => "PostgreSQL recovered it".to_owned(),
                Some((last, to)) => format!(
                    "PostgreSQL recovered it to {} with the archived WAL (newest archived segment {}, pushed {}; {})",
                    to.time.to_rfc3339(),
                    to.newest.0,
                    to.newest.1.to_rfc3339(),
                    match last {
                        Some(at) => format!("last transaction replayed committed at {}", at.to_rfc3339()),
                        None => "no transaction after the base backup".to_owned(),
                    }
                ),
            };
            let mut summary = format!(
                "base backup of system {} (timeline {}, WAL {} to {}) restored into {}: pg_verifybackup passed, \
                 {recovered} beside the live cluster ({databases} databases) and the cluster is started on it",
                e.system_identifier,
                e.timeline,
                e.start_lsn,
                e.stop_lsn,
                self.data_dir.display()
            );
            if !smoke.is_empty() {
                summary.push_str(&format!("; checked before the swap: {}", smoke.join("; ")));
            }
            Ok(summary)
        }
        .boxed()
    }

    fn abort<'a>(&'a mut self) -> BoxFuture<'a, ()> {
        async move {
            if self.side_running {
                self.pg.stop_side(&self.new).await;
                self.side_running = false;
            }
            if self.unpacked {
                let new = self.new.clone();
                let removed = tokio::task::spawn_blocking(move || fs::remove_dir_all(&new)).await;
                if let Ok(Err(e)) = removed {
                    tracing::warn!(path = %self.new.display(), error = %e, "Cannot remove the restored directory.");
                }
            }
            self.remove_side_dir();
        }
        .boxed()
    }

    fn target_state(&self) -> Option<String> {
        self.state.clone()
    }

    fn recovered_to(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.recovered_to
    }
}
