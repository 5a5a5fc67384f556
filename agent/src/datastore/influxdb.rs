//! InfluxDB 1.x (`kind = "influxdb"`): `influxd backup -portable` into a temporary
//! directory (a subdirectory a database), streamed as a tar archive ([`super::tree`]) and
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
//! database, which holds the verified data, is kept.
//!
//! Credentials: `user` with `password_file` or `password_env`, passed to the `influx`
//! shell as `INFLUX_USERNAME` and `INFLUX_PASSWORD` in its environment. `influxd backup`
//! and `restore` use the RPC port, which has no authentication in 1.x: bind it to
//! loopback on the database host.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ferry_proto::Role;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Deserialize;

use super::tree;
use super::{
    DumpError, DumpOutcome, DumpStream, Dumper, Part, PartSink, RestoreError, RestoreSession,
    Restorer, ToolPaths,
};
use crate::manifest::{Manifest, Source};

/// The only part: a tar of the portable backup directory.
pub const MAIN: Part = Part {
    name: "",
    format: "tar",
};

/// How long a restored database may take to show all its points, seconds.
const SETTLE_SECONDS: u64 = 10;

/// InfluxDB's own monitoring database, never backed up.
const INTERNAL: &str = "_internal";

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

/// A built InfluxDB datastore.
#[derive(Clone, Debug)]
pub struct Influx {
    cfg: InfluxConfig,
    password: Option<crate::config::Password>,
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
    /// Validates `cfg` for `role`.
    ///
    /// # Errors
    /// `(field, message)`.
    pub fn build(cfg: InfluxConfig, role: Role) -> Result<Self, (String, String)> {
        let err = |f: &str, m: String| Err((f.to_owned(), m));
        if role == Role::Staging && !cfg.databases.is_empty() {
            return err(
                "databases",
                "only a production agent backs up; remove it".into(),
            );
        }
        if role == Role::Production && !cfg.rename.is_empty() {
            return err("rename", "only a staging agent restores; remove it".into());
        }
        for db in cfg.databases.iter().chain(cfg.rename.values()) {
            if !valid_db(db) {
                return err(
                    "databases",
                    format!("{db:?}: use letters, digits, _ - . (at most 255)"),
                );
            }
        }
        Ok(Self {
            password: crate::config::user_password(
                cfg.user.as_deref(),
                cfg.password_file.as_deref(),
                cfg.password_env.as_deref(),
            )?,
            tools: ToolPaths::new(cfg.bin_dir.clone()),
            cfg,
        })
    }

    /// The configured name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// `influxd version` and `influx -version`.
    pub fn tool_versions(&self) -> Vec<(String, String)> {
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

    /// `influx -execute QUERY -format json [-database DB]`, parsed.
    async fn query(&self, db: Option<&str>, q: &str) -> Result<serde_json::Value, String> {
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
        let out = super::tool::output(cmd)
            .await
            .map_err(|(s, e)| format!("influx -execute {q:?} failed ({s}): {e}"))?;
        let v: serde_json::Value = serde_json::from_slice(&out).map_err(|e| {
            format!(
                "influx -execute {q:?}: unexpected output {:?}: {e}",
                String::from_utf8_lossy(&out)
            )
        })?;
        if let Some(err) = v["results"]
            .as_array()
            .and_then(|r| r.iter().find_map(|x| x["error"].as_str()))
            .or_else(|| v["error"].as_str())
        {
            return Err(format!("influx -execute {q:?}: {err}"));
        }
        Ok(v)
    }

    /// The databases on the server, `_internal` left out.
    async fn databases(&self) -> Result<Vec<String>, String> {
        let v = self.query(None, "SHOW DATABASES").await?;
        Ok(rows(&v)
            .filter_map(|r| r.first().and_then(|n| n.as_str()).map(str::to_owned))
            .filter(|n| n != INTERNAL)
            .collect())
    }

    /// Points per measurement of `db`: the largest `count_<field>` of each measurement
    /// (a point has at least one field).
    async fn points(&self, db: &str) -> Result<BTreeMap<String, u64>, String> {
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

    async fn all_points(&self, dbs: &[String]) -> Result<Points, String> {
        let mut out = Points::new();
        for db in dbs {
            out.insert(db.clone(), self.points(db).await?);
        }
        Ok(out)
    }

    /// The server's version and databases.
    ///
    /// # Errors
    /// The `influx` shell's error.
    pub async fn check(&self) -> Result<String, String> {
        let dbs = self.databases().await?;
        Ok(format!(
            "InfluxDB at {}:{}, databases: {}",
            self.cfg.http_host,
            self.cfg.http_port,
            dbs.join(", ")
        ))
    }

    fn scratch(&self) -> PathBuf {
        self.cfg
            .scratch_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir)
    }

    /// `influxd` with `args`, as a restore or backup tool.
    async fn influxd(&self, args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, (String, String)> {
        let mut cmd = tokio::process::Command::new(self.tools.path("influxd"));
        cmd.args(args);
        super::tool::output(cmd).await
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

impl Dumper for Influx {
    fn parts(&self) -> &'static [Part] {
        &[MAIN]
    }

    fn dump<'a>(&'a self, _part: &'a Part) -> BoxFuture<'a, Result<DumpStream, DumpError>> {
        async move {
            let dbs = if self.cfg.databases.is_empty() {
                self.databases().await.map_err(DumpError::Source)?
            } else {
                self.cfg.databases.clone()
            };
            let before = self.all_points(&dbs).await.map_err(DumpError::Source)?;
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
                .map_err(|(status, stderr)| DumpError::Tool {
                    tool: format!("influxd backup -database {db}"),
                    status,
                    stderr,
                })?;
            }
            let after = self.all_points(&dbs).await.map_err(DumpError::Source)?;
            let (reader, writer) = std::io::pipe().map_err(|e| DumpError::Spawn {
                tool: "tar writer".into(),
                source: e,
            })?;
            let none = tree::excludes(&[]).map_err(DumpError::Source)?;
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
            let dir = tempfile::Builder::new()
                .prefix("ferry-influxdb-")
                .tempdir_in(&scratch)
                .map_err(|e| {
                    RestoreError::Target(format!(
                        "cannot create a directory in {}: {e}",
                        scratch.display()
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

/// An InfluxDB restore in progress: the unpacked backup, and the scratch databases made.
struct InfluxRestore {
    influx: Influx,
    dir: tempfile::TempDir,
    job_id: String,
    expected: InfluxCounts,
    scratch_dbs: Vec<String>,
    /// Target databases dropped so far.
    dropped: Vec<String>,
}

impl InfluxRestore {
    fn target(&self, db: &str) -> String {
        self.influx
            .cfg
            .rename
            .get(db)
            .cloned()
            .unwrap_or_else(|| db.to_owned())
    }

    async fn restore_as(&self, db: &str, new: &str) -> Result<(), RestoreError> {
        self.influx
            .influxd(&[
                "restore".as_ref(),
                "-portable".as_ref(),
                "-host".as_ref(),
                self.influx.cfg.rpc_address.as_ref(),
                "-db".as_ref(),
                db.as_ref(),
                "-newdb".as_ref(),
                new.as_ref(),
                self.dir.path().join(db).as_os_str(),
            ])
            .await
            .map(drop)
            .map_err(|(status, stderr)| RestoreError::Tool {
                tool: format!("influxd restore -db {db} -newdb {new}"),
                status,
                stderr,
            })
    }

    /// Counts `db` (restored as `name`) and compares with the manifest's bounds. A shard
    /// restored live is queryable a moment after `influxd restore` returns (its index is
    /// loaded in the background), so the count is retried for up to
    /// [`SETTLE_SECONDS`] before a difference is reported.
    async fn verify(&self, db: &str, name: &str) -> Result<u64, RestoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(SETTLE_SECONDS);
        loop {
            // A query may also fail for a moment ("engine is closed") while the shard opens.
            let checked = match self.influx.points(name).await {
                Ok(got) => self.compare(db, name, &got).map(|()| got.values().sum()),
                Err(e) => Err(RestoreError::Target(e)),
            };
            match checked {
                Ok(points) => return Ok(points),
                Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
            }
        }
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
            // 1. Every database into a scratch database, checked.
            for db in &dbs {
                let scratch = format!("{}__ferry_new_{}", self.target(db), self.job_id);
                self.scratch_dbs.push(scratch.clone());
                self.restore_as(db, &scratch).await?;
                self.verify(db, &scratch).await?;
            }
            // 2. Each target dropped and restored under its own name from the same files.
            let mut summary = Vec::new();
            for (db, scratch) in dbs.iter().zip(self.scratch_dbs.clone()) {
                let target = self.target(db);
                // From here on the scratch database may be the only copy: abort keeps it.
                self.scratch_dbs.retain(|s| s != &scratch);
                self.influx
                    .query(None, &format!("DROP DATABASE \"{target}\""))
                    .await
                    .map_err(RestoreError::Target)?;
                self.dropped.push(target.clone());
                let kept = |e: RestoreError| {
                    RestoreError::Target(format!(
                        "{target} was dropped and its restore failed: {e}; the verified data is in the database {scratch}, kept"
                    ))
                };
                self.restore_as(db, &target).await.map_err(kept)?;
                let points = self.verify(db, &target).await.map_err(kept)?;
                self.influx
                    .query(None, &format!("DROP DATABASE \"{scratch}\""))
                    .await
                    .map_err(RestoreError::Target)?;
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
                let _ = self
                    .influx
                    .query(None, &format!("DROP DATABASE \"{db}\""))
                    .await;
            }
        }
        .boxed()
    }
}
