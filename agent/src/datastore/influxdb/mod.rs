//! InfluxDB 1.x (`kind = "influxdb"`): `influxd backup -portable` into a temporary
//! directory (a subdirectory a database), streamed as a tar archive ([`super::common::tree`]) and
//! removed, stored as
//! `<name>_backup_<date>.tar.zst.age`. The manifest holds, per database and measurement,
//! the point count taken just before and just after the backup (`points_min`,
//! `points_max`: equal on a database nobody writes to during the backup), from
//! `SELECT count(*) FROM /.*/` through the `influx` shell.
//!
//! Restore (staging), after the backup and restore docs of InfluxDB 1.x
//! (<https://docs.influxdata.com/influxdb/v1/administration/backup_and_restore/>):
//! the archive is unpacked into a temporary directory; every database is restored with
//! `influxd restore -portable -db X -newdb <target>__ferry_new_<job>`, a scratch database
//! beside the target, and its counts checked against the manifest. InfluxDB 1.x cannot
//! rename a database, so the swap is: drop the target, restore the same verified files
//! under the target's name, check the counts again, drop the scratch database. If that
//! second restore fails, the target is gone and the error says so, and the scratch
//! database, which holds the verified data, is kept. An empty marker database
//! `<target>__ferry_swap_<job>` exists from just before the drop until the target was
//! restored and checked, and the unpacked backup is in `<scratch_dir>/ferry-influxdb-
//! <datastore>-<job>`: the agent finds an interrupted restore by these names on start and
//! before the next restore, and finishes or undoes it ([`Influx::recover`]).
//!
//! Credentials: `user` with `password_file` or `password_env`, passed to the `influx`
//! shell as `INFLUX_USERNAME` and `INFLUX_PASSWORD` in its environment. `influxd backup`
//! and `restore` use the RPC port, which has no authentication in 1.x: bind it to
//! loopback on the database host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_proto::Role;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Deserialize;

use super::common::leftovers::{Action, Recovered, job_id, skipped};
use super::common::tree;
use super::{
    CheckError, Datastore, DatastoreConfigError, DumpError, DumpOutcome, DumpStream, Dumper, Mode,
    Part, PartSink, RestoreError, RestoreSession, Restorer, ToolError, ToolPaths,
};
use ferry_core::manifest::{Manifest, Source};

/// The only part: a tar of the portable backup directory.
pub const MAIN: Part = Part {
    name: "",
    format: "tar",
};

/// How long the search for leftovers waits for the server to list its databases, seconds.
const RECOVER_TIMEOUT_SECONDS: u64 = 30;

/// How long a restored database may take to show all its points, seconds.
const SETTLE_SECONDS: u64 = 10;

/// InfluxDB's own monitoring database, never backed up.
const INTERNAL: &str = "_internal";

/// The tag of a restore's scratch database: `<target>__ferry_new_<job>`.
const NEW_TAG: &str = "__ferry_new_";

/// The tag of a restore's marker database, made (empty) before the target is dropped and
/// dropped after it was restored and checked: `<target>__ferry_swap_<job>`.
const SWAP_TAG: &str = "__ferry_swap_";

/// The start of the name of a restore's unpacked backup in `scratch_dir`:
/// `ferry-influxdb-<datastore>-<job>`.
const UNPACK_PREFIX: &str = "ferry-influxdb-";

/// `(target, job, tag)` if `name` is a restore's scratch or marker database,
/// `<target><tag><job>` with the job id as the agent writes it (upper case).
fn scratch_parts(name: &str) -> Option<(String, String, &'static str)> {
    let cut = name
        .len()
        .checked_sub(26)
        .filter(|&c| name.is_char_boundary(c))?;
    let (head, job) = name.split_at(cut);
    let job = job_id(job).filter(|id| id == job)?;
    [NEW_TAG, SWAP_TAG].into_iter().find_map(|tag| {
        head.strip_suffix(tag)
            .filter(|t| !t.is_empty())
            .map(|t| (t.to_owned(), job.clone(), tag))
    })
}

/// `[[datastores]]` with `kind = "influxdb"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InfluxConfig {
    /// Datastore name, used in stored file names.
    pub name: String,
    /// `host:port` of the RPC service that `influxd backup` and `restore` use
    /// (influxd's top-level `bind-address`). Default `127.0.0.1:8088`.
    #[serde(default = "default_rpc")]
    pub rpc_address: String,
    /// Host of the HTTP API, for the `influx` shell's counts. Default `127.0.0.1`.
    #[serde(default = "default_host")]
    pub http_host: String,
    /// Port of the HTTP API. Default 8086.
    #[serde(default = "default_http_port")]
    pub http_port: u16,
    /// Production: the databases to back up. Default: every database but `_internal`.
    #[serde(default)]
    pub databases: Vec<String>,
    /// Staging: database names to restore under another name, e.g.
    /// `{ telegraf = "telegraf_staging" }`.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// HTTP user (with `password_file` or `password_env`).
    pub user: Option<String>,
    /// File holding the password (mode 0600 or 0400).
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// Directory of `influxd` and `influx`; `PATH` if unset.
    pub bin_dir: Option<PathBuf>,
    /// Where the backup (production) or the unpacked archive (staging) is kept while it
    /// is streamed or restored. Default: the system's temporary directory.
    pub scratch_dir: Option<PathBuf>,
}

fn default_rpc() -> String {
    "127.0.0.1:8088".into()
}
fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_http_port() -> u16 {
    8086
}

/// Point counts: database → measurement → points.
pub type Points = BTreeMap<String, BTreeMap<String, u64>>;

/// The manifest's counts of an InfluxDB backup.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct InfluxCounts {
    /// Counted just before the backup.
    pub points_min: Points,
    /// Counted just after it.
    pub points_max: Points,
}

/// A query through the `influx` shell that failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The shell failed.
    #[error("influx -execute {query:?} failed ({}): {}", .failure.status(), .failure.detail())]
    Tool {
        /// The query.
        query: String,
        /// How the shell failed.
        failure: ToolError,
    },
    /// The shell's output is not the JSON asked for.
    #[error("influx -execute {query:?}: unexpected output {output:?}: {error}")]
    Output {
        /// The query.
        query: String,
        /// What it printed.
        output: String,
        /// Why it does not parse.
        error: serde_json::Error,
    },
    /// The server answered with an error.
    #[error("influx -execute {query:?}: {message}")]
    Server {
        /// The query.
        query: String,
        /// The server's error.
        message: String,
    },
    /// The server did not list its databases in time.
    #[error("InfluxDB at {host}:{port} did not answer SHOW DATABASES within {seconds} s")]
    Timeout {
        /// `http_host` of the config.
        host: String,
        /// `http_port` of the config.
        port: u16,
        /// How long the agent waited, seconds.
        seconds: u64,
    },
}

impl From<QueryError> for DumpError {
    fn from(e: QueryError) -> Self {
        DumpError::Source(e.to_string())
    }
}

impl From<QueryError> for RestoreError {
    fn from(e: QueryError) -> Self {
        RestoreError::Target(e.to_string())
    }
}

impl From<QueryError> for CheckError {
    fn from(e: QueryError) -> Self {
        CheckError::Server(e.to_string())
    }
}

/// A built InfluxDB datastore.
#[derive(Clone, Debug)]
pub struct Influx {
    cfg: InfluxConfig,
    password: Option<ferry_core::secrets::Password>,
    tools: ToolPaths,
}

fn valid_db(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

impl Influx {
    /// Validates `cfg` for `role` and reads the password.
    ///
    /// # Errors
    /// [`DatastoreConfigError`] naming the field.
    pub fn build(cfg: InfluxConfig, role: Role) -> Result<Self, DatastoreConfigError> {
        if role == Role::Staging && !cfg.databases.is_empty() {
            return Err(DatastoreConfigError::WrongRole {
                field: "databases",
                why: "only a production agent backs up; remove it",
            });
        }
        if role == Role::Production && !cfg.rename.is_empty() {
            return Err(DatastoreConfigError::WrongRole {
                field: "rename",
                why: "only a staging agent restores; remove it",
            });
        }
        for db in cfg.databases.iter().chain(cfg.rename.values()) {
            if !valid_db(db) {
                return Err(DatastoreConfigError::invalid(
                    "databases",
                    format!("{db:?}: use letters, digits, _ - . (at most 255)"),
                ));
            }
        }
        Ok(Self {
            password: ferry_core::secrets::user_password(
                cfg.user.as_deref(),
                cfg.password_file.as_deref(),
                cfg.password_env.as_deref(),
            )
            .map_err(DatastoreConfigError::secret)?,
            tools: ToolPaths::new(cfg.bin_dir.clone()),
            cfg,
        })
    }

    /// `influx -execute QUERY -format json [-database DB]`, parsed.
    async fn query(&self, db: Option<&str>, q: &str) -> Result<serde_json::Value, QueryError> {
        let mut cmd = tokio::process::Command::new(self.tools.path("influx"));
        cmd.args(["-host", &self.cfg.http_host])
            .args(["-port", &self.cfg.http_port.to_string()])
            .args(["-format", "json", "-execute", q])
            .env_remove("INFLUX_USERNAME")
            .env_remove("INFLUX_PASSWORD");
        if let Some(db) = db {
            cmd.args(["-database", db]);
        }
        if let Some(user) = &self.cfg.user {
            cmd.env("INFLUX_USERNAME", user);
            if let Some(p) = &self.password {
                cmd.env("INFLUX_PASSWORD", &p.0);
            }
        }
        let out = super::common::tool::output(cmd)
            .await
            .map_err(|failure| QueryError::Tool {
                query: q.to_owned(),
                failure,
            })?;
        let v: serde_json::Value =
            serde_json::from_slice(&out).map_err(|error| QueryError::Output {
                query: q.to_owned(),
                output: String::from_utf8_lossy(&out).into_owned(),
                error,
            })?;
        if let Some(err) = v["results"]
            .as_array()
            .and_then(|r| r.iter().find_map(|x| x["error"].as_str()))
            .or_else(|| v["error"].as_str())
        {
            return Err(QueryError::Server {
                query: q.to_owned(),
                message: err.to_owned(),
            });
        }
        Ok(v)
    }

    /// The databases on the server, `_internal` left out.
    async fn databases(&self) -> Result<Vec<String>, QueryError> {
        let v = self.query(None, "SHOW DATABASES").await?;
        Ok(rows(&v)
            .filter_map(|r| r.first().and_then(|n| n.as_str()).map(str::to_owned))
            .filter(|n| n != INTERNAL)
            .collect())
    }

    /// Points per measurement of `db`: the largest `count_<field>` of each measurement
    /// (a point has at least one field).
    async fn points(&self, db: &str) -> Result<BTreeMap<String, u64>, QueryError> {
        let v = self.query(Some(db), "SELECT count(*) FROM /.*/").await?;
        let mut out = BTreeMap::new();
        for series in v["results"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["series"].as_array())
            .flatten()
        {
            let name = series["name"].as_str().unwrap_or_default().to_owned();
            let max = series["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|row| row.as_array())
                .flat_map(|row| row.iter().skip(1).filter_map(serde_json::Value::as_u64))
                .max()
                .unwrap_or(0);
            out.insert(name, max);
        }
        Ok(out)
    }

    async fn all_points(&self, dbs: &[String]) -> Result<Points, QueryError> {
        let mut out = Points::new();
        for db in dbs {
            out.insert(db.clone(), self.points(db).await?);
        }
        Ok(out)
    }

    fn scratch(&self) -> PathBuf {
        self.cfg
            .scratch_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir)
    }

    /// The name `db` of a backup is restored under: its `rename`, or itself.
    fn target_of(&self, db: &str) -> String {
        self.cfg
            .rename
            .get(db)
            .cloned()
            .unwrap_or_else(|| db.to_owned())
    }

    /// Where a restore of job `job_id` unpacks the backup: `<scratch_dir>/ferry-influxdb-
    /// <datastore>-<job>`.
    fn unpack_dir(&self, job_id: &str) -> PathBuf {
        self.scratch()
            .join(format!("{UNPACK_PREFIX}{}-{job_id}", self.cfg.name))
    }

    /// `influxd restore -portable -db DB -newdb NEW DIR/DB`.
    async fn restore_from(&self, dir: &Path, db: &str, new: &str) -> Result<(), RestoreError> {
        self.influxd(&[
            "restore".as_ref(),
            "-portable".as_ref(),
            "-host".as_ref(),
            self.cfg.rpc_address.as_ref(),
            "-db".as_ref(),
            db.as_ref(),
            "-newdb".as_ref(),
            new.as_ref(),
            dir.join(db).as_os_str(),
        ])
        .await
        .map(drop)
        .map_err(RestoreError::tool(&format!(
            "influxd restore -db {db} -newdb {new}"
        )))
    }

    /// Counts `name` with `check` until it passes or [`SETTLE_SECONDS`] have passed: a
    /// shard restored live is queryable a moment after `influxd restore` returns (its
    /// index is loaded in the background), and a query may fail for a moment ("engine is
    /// closed") while it opens. The total points.
    async fn settle(
        &self,
        name: &str,
        check: impl Fn(&BTreeMap<String, u64>) -> Result<(), RestoreError>,
    ) -> Result<u64, RestoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(SETTLE_SECONDS);
        loop {
            let checked = match self.points(name).await {
                Ok(got) => check(&got).map(|()| got.values().sum()),
                Err(e) => Err(e.into()),
            };
            match checked {
                Ok(points) => return Ok(points),
                Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
            }
        }
    }

    async fn drop_database(&self, db: &str) -> Result<(), QueryError> {
        self.query(None, &format!("DROP DATABASE \"{db}\""))
            .await
            .map(drop)
    }

    /// Staging: puts right the leftovers of interrupted restores (see
    /// [`super::common::leftovers`]), job by job. For each target `X` of a job:
    /// - its scratch database `X__ferry_new_<job>` without a marker: the swap had not
    ///   reached `X`, which is as it was; the scratch database is dropped;
    /// - the marker `X__ferry_swap_<job>` without the scratch database: `X` was restored
    ///   and checked; the marker is dropped;
    /// - both: `X` was dropped and may be missing or incomplete; it is restored again from
    ///   the job's unpacked backup, checked against the scratch database (the checked
    ///   copy), and only then are both dropped. Without the unpacked backup, or if that
    ///   fails, both are kept and the report says what to do.
    ///
    /// The unpacked backup is removed once nothing of its job is kept.
    ///
    /// # Errors
    /// [`RestoreError::Target`]: the server does not list its databases; nothing was
    /// touched then.
    pub async fn recover(&self, skip: &[String]) -> Result<Vec<Recovered>, RestoreError> {
        // A server that does not answer must not hold up the agent's start.
        let listed = tokio::time::timeout(
            std::time::Duration::from_secs(RECOVER_TIMEOUT_SECONDS),
            self.query(None, "SHOW DATABASES"),
        )
        .await
        .unwrap_or_else(|_| {
            Err(QueryError::Timeout {
                host: self.cfg.http_host.clone(),
                port: self.cfg.http_port,
                seconds: RECOVER_TIMEOUT_SECONDS,
            })
        });
        let names = listed.map_err(RestoreError::from)?;
        let names: Vec<String> = rows(&names)
            .filter_map(|r| r.first().and_then(|n| n.as_str()).map(str::to_owned))
            .collect();
        // job → target → (scratch, marker)
        let mut jobs: BTreeMap<String, BTreeMap<String, (bool, bool)>> = BTreeMap::new();
        for name in &names {
            if let Some((target, job, tag)) = scratch_parts(name) {
                let slot = jobs.entry(job).or_default().entry(target).or_default();
                if tag == NEW_TAG {
                    slot.0 = true;
                } else {
                    slot.1 = true;
                }
            }
        }
        let prefix = format!("{UNPACK_PREFIX}{}-", self.cfg.name);
        if let Ok(entries) = std::fs::read_dir(self.scratch()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(job) = name
                    .strip_prefix(&prefix)
                    .and_then(|j| job_id(j).filter(|id| id == j))
                {
                    jobs.entry(job).or_default();
                }
            }
        }
        let mut out = Vec::new();
        for (job, targets) in jobs {
            if skipped(&job, skip) {
                continue;
            }
            let dir = self.unpack_dir(&job);
            if locked(&dir) {
                // Running in another agent that shares scratch_dir (or in this one).
                continue;
            }
            let mut kept = false;
            for (target, (scratch, marker)) in targets {
                let s = format!("{target}{NEW_TAG}{job}");
                let m = format!("{target}{SWAP_TAG}{job}");
                let done = self
                    .recover_target(&job, &dir, &target, (&s, scratch), (&m, marker))
                    .await;
                kept |= done.iter().any(|r| matches!(r.action, Action::Kept { .. }));
                out.extend(done);
            }
            if !kept && std::fs::symlink_metadata(&dir).is_ok() {
                let shown = dir.display().to_string();
                out.push(match std::fs::remove_dir_all(&dir) {
                    Ok(()) => Recovered::new(&job, shown, Action::Removed),
                    Err(e) => Recovered::new(
                        &job,
                        shown,
                        Action::Kept {
                            why: format!("cannot remove it: {e}; remove it by hand"),
                        },
                    ),
                });
            }
        }
        Ok(out)
    }

    /// One target's leftovers of `job` (see [`Influx::recover`]).
    async fn recover_target(
        &self,
        job: &str,
        dir: &Path,
        target: &str,
        (scratch, has_scratch): (&str, bool),
        (marker, has_marker): (&str, bool),
    ) -> Vec<Recovered> {
        let db = |name: &str| format!("database {name}");
        let drop_one = |name: String| async move {
            match self.drop_database(&name).await {
                Ok(()) => Recovered::new(job, db(&name), Action::Removed),
                Err(e) => Recovered::new(
                    job,
                    db(&name),
                    Action::Kept {
                        why: format!("cannot drop it: {e}; drop it by hand"),
                    },
                ),
            }
        };
        match (has_scratch, has_marker) {
            (false, false) => Vec::new(),
            (true, false) => vec![drop_one(scratch.to_owned()).await],
            (false, true) => vec![drop_one(marker.to_owned()).await],
            (true, true) => match self.rebuild(dir, target, scratch).await {
                Ok(points) => vec![
                    Recovered::new(
                        job,
                        db(scratch),
                        Action::SwappedIn {
                            target: format!("database {target} ({points} points)"),
                        },
                    ),
                    drop_one(scratch.to_owned()).await,
                    drop_one(marker.to_owned()).await,
                ],
                Err(e) => vec![
                    Recovered::new(
                        job,
                        db(scratch),
                        Action::Kept {
                            why: format!(
                                "job {job} was stopped while it replaced {target}, which may be missing or incomplete, \
                                 and it cannot be restored again here ({e}); this is its checked copy: restore again, \
                                 then drop {scratch} and {marker}"
                            ),
                        },
                    ),
                    Recovered::new(
                        job,
                        db(marker),
                        Action::Kept {
                            why: format!("the marker of that interrupted replacement of {target}"),
                        },
                    ),
                ],
            },
        }
    }

    /// Restores `target` again from the unpacked backup in `dir` (the database of the
    /// backup whose target it is), and checks it holds what `scratch` holds; its points.
    async fn rebuild(&self, dir: &Path, target: &str, scratch: &str) -> Result<u64, RestoreError> {
        let dbs: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| {
                RestoreError::Target(format!("no unpacked backup at {}: {e}", dir.display()))
            })?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let db = dbs
            .into_iter()
            .find(|d| self.target_of(d) == target)
            .ok_or_else(|| {
                RestoreError::Target(format!("{} holds no backup of {target}", dir.display()))
            })?;
        let expected = self.points(scratch).await.map_err(RestoreError::from)?;
        self.drop_database(target)
            .await
            .map_err(RestoreError::from)?;
        self.restore_from(dir, &db, target).await?;
        self.settle(target, |got| {
            if *got == expected {
                Ok(())
            } else {
                Err(RestoreError::Mismatch(format!(
                    "{target} holds {got:?} points, its checked copy {scratch} {expected:?}"
                )))
            }
        })
        .await
    }

    /// `influxd` with `args`, as a restore or backup tool.
    async fn influxd(&self, args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, ToolError> {
        let mut cmd = tokio::process::Command::new(self.tools.path("influxd"));
        cmd.args(args);
        super::common::tool::output(cmd).await
    }
}

/// The rows of every series of every result of an `influx -format json` answer.
fn rows(v: &serde_json::Value) -> impl Iterator<Item = &Vec<serde_json::Value>> {
    v["results"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["series"].as_array())
        .flatten()
        .filter_map(|s| s["values"].as_array())
        .flatten()
        .filter_map(|row| row.as_array())
}

impl Datastore for Influx {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn kind(&self) -> &'static str {
        "influxdb"
    }

    /// `influxd version` and `influx -version`.
    fn tool_versions(&self) -> Vec<(String, String)> {
        vec![
            (
                "influxd".into(),
                self.tools.version_with("influxd", &["version"]),
            ),
            (
                "influx".into(),
                self.tools.version_with("influx", &["-version"]),
            ),
        ]
    }

    /// The server's version and databases.
    ///
    /// # Errors
    /// The `influx` shell's error.
    fn check(&self) -> BoxFuture<'_, Result<String, CheckError>> {
        async move {
            let dbs = self.databases().await?;
            Ok(format!(
                "InfluxDB at {}:{}, databases: {}",
                self.cfg.http_host,
                self.cfg.http_port,
                dbs.join(", ")
            ))
        }
        .boxed()
    }

    fn mode(&self) -> Mode<'_> {
        Mode::streamed(self)
    }

    /// See [`Influx::recover`].
    fn recover_leftovers<'a>(
        &'a self,
        skip: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Recovered>, RestoreError>> {
        self.recover(skip).boxed()
    }
}

impl Dumper for Influx {
    fn parts(&self) -> &'static [Part] {
        &[MAIN]
    }

    fn dump<'a>(&'a self, _part: &'a Part) -> BoxFuture<'a, Result<DumpStream, DumpError>> {
        async move {
            let dbs = if self.cfg.databases.is_empty() {
                self.databases().await.map_err(DumpError::from)?
            } else {
                self.cfg.databases.clone()
            };
            let before = self.all_points(&dbs).await.map_err(DumpError::from)?;
            let scratch = self.scratch();
            let dir = tempfile::Builder::new()
                .prefix("ferry-influxdb-")
                .tempdir_in(&scratch)
                .map_err(|e| {
                    DumpError::Source(format!(
                        "cannot create a directory in {}: {e}",
                        scratch.display()
                    ))
                })?;
            // One directory a database: `influxd restore -portable` reads one backup's
            // manifest from its directory.
            for db in &dbs {
                let into = dir.path().join(db);
                self.influxd(&[
                    "backup".as_ref(),
                    "-portable".as_ref(),
                    "-host".as_ref(),
                    self.cfg.rpc_address.as_ref(),
                    "-database".as_ref(),
                    db.as_ref(),
                    into.as_os_str(),
                ])
                .await
                .map_err(DumpError::tool(&format!("influxd backup -database {db}")))?;
            }
            let after = self.all_points(&dbs).await.map_err(DumpError::from)?;
            let (reader, writer) = std::io::pipe().map_err(|e| DumpError::Spawn {
                tool: "tar writer".into(),
                source: e,
            })?;
            let none = tree::excludes(&[]).map_err(|e| DumpError::Source(e.to_string()))?;
            // The directory moves into the task and is removed when the tar is written.
            let task = tokio::task::spawn_blocking(move || {
                let r = tree::write_tar(dir.path(), &none, writer);
                drop(dir);
                r
            });
            let version = self.tools.version_with("influxd", &["version"]);
            let finish = async move {
                task.await
                    .map_err(|e| DumpError::Source(format!("tar writer: {e}")))?
                    .map_err(|e| DumpError::Source(format!("tar of the backup: {e}")))?;
                let total: u64 = after.values().flat_map(|m| m.values()).sum();
                let summary = format!(
                    "{} databases, {} measurements, {total} points{}",
                    after.len(),
                    after.values().map(BTreeMap::len).sum::<usize>(),
                    if before == after {
                        ""
                    } else {
                        " (written to during the backup)"
                    }
                );
                Ok(DumpOutcome {
                    source: Source {
                        tool: "influxd backup -portable".into(),
                        tool_version: version.clone(),
                        server_version: version,
                    },
                    counts: serde_json::to_value(InfluxCounts {
                        points_min: before,
                        points_max: after,
                    })
                    .unwrap_or_default(),
                    summary,
                })
            }
            .boxed();
            Ok(DumpStream {
                reader: Box::new(reader),
                finish,
            })
        }
        .boxed()
    }
}

impl Restorer for Influx {
    /// The portable backup is unpacked into a local directory; databases are restored
    /// from it at commit.
    fn stages_part(&self, _manifest: &Manifest) -> bool {
        true
    }

    fn begin<'a>(
        &'a self,
        main: &'a Manifest,
        job_id: &'a str,
        namespaces: &'a [String],
    ) -> BoxFuture<'a, Result<Box<dyn RestoreSession>, RestoreError>> {
        async move {
            let expected: InfluxCounts = super::expect_whole(
                main,
                "influxdb",
                &MAIN,
                "an InfluxDB portable backup",
                namespaces,
            )?;
            let scratch = self.scratch();
            // The unpacked backup (the server's own disk is not visible from here).
            tree::ensure_room(&scratch, main.bytes_uncompressed)?;
            let dir = UnpackDir::create(&scratch, &self.unpack_dir(job_id)).map_err(|e| {
                RestoreError::Target(format!(
                    "cannot create {}: {e}",
                    self.unpack_dir(job_id).display()
                ))
            })?;
            Ok(Box::new(InfluxRestore {
                influx: self.clone(),
                dir,
                job_id: job_id.to_owned(),
                expected,
                scratch_dbs: Vec::new(),
                dropped: Vec::new(),
            }) as Box<dyn RestoreSession>)
        }
        .boxed()
    }
}

/// Where a restore unpacks the backup, named after its job so that the agent finds it
/// again if the restore is interrupted, and locked (`flock` on the directory) while the
/// restore lives: a recovery, in this agent or another one sharing `scratch_dir`, leaves
/// a locked directory alone. Removed on drop unless kept.
struct UnpackDir {
    path: PathBuf,
    _lock: std::fs::File,
    keep: bool,
}

impl UnpackDir {
    /// Makes `path` (in `scratch`), already locked when it appears under that name: it is
    /// made under a random name, locked, then renamed (never over an existing one).
    fn create(scratch: &Path, path: &Path) -> std::io::Result<UnpackDir> {
        use rustix::fs::{CWD, FlockOperation, RenameFlags, flock, renameat_with};
        let mut tmp = tempfile::Builder::new()
            .prefix(".ferry-influxdb-")
            .tempdir_in(scratch)?;
        let lock = std::fs::File::open(tmp.path())?;
        flock(&lock, FlockOperation::NonBlockingLockExclusive)?;
        renameat_with(CWD, tmp.path(), CWD, path, RenameFlags::NOREPLACE)?;
        tmp.disable_cleanup(true);
        Ok(UnpackDir {
            path: path.to_owned(),
            _lock: lock,
            keep: false,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UnpackDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Whether a live process holds the lock of the unpacked backup `dir` ([`UnpackDir`]).
fn locked(dir: &Path) -> bool {
    use rustix::fs::{FlockOperation, flock};
    let Ok(f) = std::fs::File::open(dir) else {
        return false;
    };
    // Taken (and released when `f` closes) if nobody holds it.
    matches!(flock(&f, FlockOperation::NonBlockingLockExclusive), Err(e) if e == rustix::io::Errno::WOULDBLOCK)
}

/// An InfluxDB restore in progress: the unpacked backup, and the scratch databases made.
struct InfluxRestore {
    influx: Influx,
    dir: UnpackDir,
    job_id: String,
    expected: InfluxCounts,
    scratch_dbs: Vec<String>,
    /// Target databases dropped so far.
    dropped: Vec<String>,
}

impl InfluxRestore {
    /// Counts `db` (restored as `name`) and compares with the manifest's bounds
    /// ([`Influx::settle`]).
    async fn verify(&self, db: &str, name: &str) -> Result<u64, RestoreError> {
        self.influx
            .settle(name, |got| self.compare(db, name, got))
            .await
    }

    fn compare(
        &self,
        db: &str,
        name: &str,
        got: &BTreeMap<String, u64>,
    ) -> Result<(), RestoreError> {
        let min = self
            .expected
            .points_min
            .get(db)
            .cloned()
            .unwrap_or_default();
        let max = self
            .expected
            .points_max
            .get(db)
            .cloned()
            .unwrap_or_default();
        let measurements: std::collections::BTreeSet<&String> =
            min.keys().chain(max.keys()).chain(got.keys()).collect();
        for m in measurements {
            let (lo, hi, n) = (
                min.get(m).copied().unwrap_or(0),
                max.get(m).copied().unwrap_or(0),
                got.get(m).copied().unwrap_or(0),
            );
            if n < lo.min(hi) || n > lo.max(hi) {
                return Err(RestoreError::Mismatch(format!(
                    "{db}.{m}: {n} points restored into {name}, the manifest says {}",
                    if lo == hi {
                        lo.to_string()
                    } else {
                        format!("{lo} to {hi}")
                    }
                )));
            }
        }
        Ok(())
    }
}

impl RestoreSession for InfluxRestore {
    fn part<'a>(
        &'a mut self,
        _manifest: &'a Manifest,
    ) -> BoxFuture<'a, Result<PartSink, RestoreError>> {
        async move { tree::unpack_sink(self.dir.path().to_owned()) }.boxed()
    }

    fn commit<'a>(
        &'a mut self,
        _main: &'a Manifest,
    ) -> BoxFuture<'a, Result<String, RestoreError>> {
        async move {
            let dbs: Vec<String> = self.expected.points_max.keys().cloned().collect();
            let influx = self.influx.clone();
            let dir = self.dir.path().to_owned();
            // 1. Every database into a scratch database, checked.
            for db in &dbs {
                let scratch = format!("{}{NEW_TAG}{}", influx.target_of(db), self.job_id);
                self.scratch_dbs.push(scratch.clone());
                influx.restore_from(&dir, db, &scratch).await?;
                self.verify(db, &scratch).await?;
            }
            // 2. Each target dropped and restored under its own name from the same files,
            // between a marker made before the drop and dropped last: an interrupted
            // replacement is found again and finished ([`Influx::recover`]).
            let mut summary = Vec::new();
            for (db, scratch) in dbs.iter().zip(self.scratch_dbs.clone()) {
                let target = influx.target_of(db);
                let marker = format!("{target}{SWAP_TAG}{}", self.job_id);
                influx
                    .query(None, &format!("CREATE DATABASE \"{marker}\""))
                    .await
                    .map_err(RestoreError::from)?;
                // From here on the scratch database may be the only copy: abort keeps it,
                // and the unpacked backup, from which the agent can finish the replacement.
                self.scratch_dbs.retain(|s| s != &scratch);
                self.dir.keep = true;
                influx
                    .drop_database(&target)
                    .await
                    .map_err(RestoreError::from)?;
                self.dropped.push(target.clone());
                let kept = |e: RestoreError| {
                    RestoreError::Target(format!(
                        "{target} was dropped and its restore failed: {e}; the verified data is in the database {scratch}, kept \
                         (the agent restores {target} from it again before its next restore)"
                    ))
                };
                influx.restore_from(&dir, db, &target).await.map_err(kept)?;
                let points = self.verify(db, &target).await.map_err(kept)?;
                for done in [&scratch, &marker] {
                    influx.drop_database(done).await.map_err(RestoreError::from)?;
                }
                self.dir.keep = false;
                summary.push(format!("{target} ({points} points)"));
                self.dropped.retain(|d| d != &target);
            }
            self.scratch_dbs.clear();
            Ok(format!(
                "{}, equal to the manifest",
                summary.join(", ")
            ))
        }
        .boxed()
    }

    fn target_state(&self) -> Option<String> {
        (!self.dropped.is_empty()).then(|| {
            format!(
                "the database(s) {} were dropped and not fully restored; their verified copies are kept as scratch databases",
                self.dropped.join(", ")
            )
        })
    }

    fn abort<'a>(&'a mut self) -> BoxFuture<'a, ()> {
        async move {
            for db in std::mem::take(&mut self.scratch_dbs) {
                let _ = self.influx.drop_database(&db).await;
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unpack_directory_is_locked_while_its_restore_lives() {
        let scratch = tempfile::tempdir().unwrap();
        let path = scratch
            .path()
            .join("ferry-influxdb-influx-01JAAAAAAAAAAAAAAAAAAAAAAA");
        let dir = UnpackDir::create(scratch.path(), &path).unwrap();
        assert!(locked(&path), "a live restore's directory is locked");
        assert!(
            UnpackDir::create(scratch.path(), &path).is_err(),
            "never over another"
        );
        drop(dir);
        assert!(!path.exists());
        // A killed restore's directory (no process holds it) is not locked.
        std::fs::create_dir(&path).unwrap();
        assert!(!locked(&path));
        let names: Vec<_> = std::fs::read_dir(scratch.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary name left: {names:?}");
    }

    #[test]
    fn scratch_and_marker_databases_are_told_by_their_exact_names() {
        let job = "01JAAAAAAAAAAAAAAAAAAAAAAA";
        assert_eq!(
            scratch_parts(&format!("telegraf{NEW_TAG}{job}")),
            Some(("telegraf".into(), job.into(), NEW_TAG))
        );
        assert_eq!(
            scratch_parts(&format!("a_b{SWAP_TAG}{job}")),
            Some(("a_b".into(), job.into(), SWAP_TAG))
        );
        for not_ours in [
            "telegraf".to_owned(),
            format!("{NEW_TAG}{job}"),
            format!("telegraf{NEW_TAG}{}", job.to_lowercase()),
            format!("telegraf__ferry_old_{job}"),
            format!("telegraf{NEW_TAG}{}", &job[1..]),
        ] {
            assert_eq!(scratch_parts(&not_ours), None, "{not_ours}");
        }
    }
}
