//! PostgreSQL differential backups with pgBackRest (`kind = "pgbackrest"`; Debian ships
//! 2.45): full and differential backups (`ferry backup AGENT NAME --type full|diff`, or
//! `type` in a schedule), restored on staging with `pgbackrest restore --delta`.
//!
//! Where the repository lives. pgBackRest 2.45 has no SFTP repository type (it came in
//! 2.46), and a repository host would mean pgBackRest on the backup server pulling from
//! production, against Ferry's push-only design. So the repository is a local posix
//! repository on the database host (`repo_dir`), encrypted by pgBackRest itself
//! (`aes-256-cbc`, passphrase from `cipher_pass_file`), and after every backup the agent
//! pushes it with rsync over SSH to `<root>/<environment>/<name>/` on the backup server
//! (the same key and pinned host key as every upload; see [`super::files::mirror`]).
//! The backup server holds only ciphertext. A staging agent pulls the source
//! environment's copy into its own `repo_dir` and restores from there. The cost: the
//! repository takes disk space on both hosts, and WAL archived between backups reaches
//! the backup server with the next backup.
//!
//! The agent writes pgBackRest's configuration to `config_file` (mode 0600, owned by
//! `os_user`) before every command; PostgreSQL's `archive_command` must use it:
//! `pgbackrest --config=<config_file> --stanza=<stanza> archive-push %p`. pgBackRest runs
//! as `os_user` (through `runuser` when the agent is root).
//!
//! Restore: the repository is pulled and checked with `pgbackrest info` before anything
//! is stopped; then `stop_command`, `pgbackrest restore --delta --set=<label>
//! --type=immediate --target-action=promote --archive-mode=off`, `start_command`. A restore
//! that fails after the stop has changed the data directory in place, and the error says
//! so.

use std::path::PathBuf;
use std::sync::Arc;

use ferry_proto::Role;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Deserialize;

use super::common::tool::{output_until_cancelled, run_command};
use super::{
    CheckError, Datastore, DatastoreConfigError, DumpError, Mode, RestoreError, ToolError,
};
use crate::config::Settings;
use crate::job::{JobError, JobReport, Progress};

/// `[[datastores]]` with `kind = "pgbackrest"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgBackRestConfig {
    /// Datastore name; the repository on the backup server is `<root>/<environment>/<name>/`.
    pub name: String,
    /// pgBackRest stanza. Default `main`.
    #[serde(default = "default_stanza")]
    pub stanza: String,
    /// The cluster's data directory (`pg1-path`): backed up (production) or restored
    /// into (staging).
    pub data_dir: PathBuf,
    /// The cluster's port. Default 5432.
    #[serde(default = "default_port")]
    pub port: u16,
    /// The cluster's Unix-socket directory (`pg1-socket-path`), if not the default.
    pub socket_dir: Option<PathBuf>,
    /// The OS user pgBackRest runs as (owner of the data directory). Default `postgres`.
    #[serde(default = "default_os_user")]
    pub os_user: String,
    /// The local repository (`repo1-path`), mirrored to the backup server.
    pub repo_dir: PathBuf,
    /// Where the agent writes pgBackRest's configuration.
    pub config_file: PathBuf,
    /// File holding the repository cipher passphrase (mode 0600 or 0400).
    pub cipher_pass_file: PathBuf,
    /// Full backups kept by `pgbackrest expire` (`repo1-retention-full`). Default 2.
    #[serde(default = "default_retention")]
    pub retention_full: u32,
    /// The `pgbackrest` binary. Default: `pgbackrest` on `PATH`.
    pub bin: Option<PathBuf>,
    /// Staging: the command that stops the cluster, e.g.
    /// `["systemctl", "stop", "postgresql@15-main"]`.
    #[serde(default)]
    pub stop_command: Vec<String>,
    /// Staging: the command that starts it again.
    #[serde(default)]
    pub start_command: Vec<String>,
}

fn default_stanza() -> String {
    "main".into()
}
fn default_port() -> u16 {
    5432
}
fn default_os_user() -> String {
    "postgres".into()
}
fn default_retention() -> u32 {
    2
}

/// A built pgBackRest datastore.
#[derive(Clone, Debug)]
pub struct PgBackRest {
    cfg: PgBackRestConfig,
    cipher_pass: Arc<ferry_core::secrets::Password>,
}

/// One backup as `pgbackrest info --output=json` lists it.
#[derive(Clone, Debug, Deserialize)]
struct InfoBackup {
    label: String,
    #[serde(rename = "type")]
    kind: String,
    info: InfoSizes,
    timestamp: InfoTimes,
    prior: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
struct InfoSizes {
    size: u64,
    repository: InfoRepo,
}

#[derive(Clone, Debug, Deserialize)]
struct InfoRepo {
    delta: u64,
}

#[derive(Clone, Debug, Deserialize)]
struct InfoTimes {
    stop: i64,
}

fn simple_word(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

impl PgBackRest {
    /// Validates `cfg` for `role` and reads the cipher passphrase.
    ///
    /// # Errors
    /// [`DatastoreConfigError`] naming the field.
    pub fn build(cfg: PgBackRestConfig, role: Role) -> Result<Self, DatastoreConfigError> {
        let invalid = DatastoreConfigError::invalid;
        if !simple_word(&cfg.stanza) {
            return Err(invalid("stanza", "use letters, digits, _ - . (at most 64)"));
        }
        if !simple_word(&cfg.os_user) {
            return Err(invalid("os_user", "not a user name"));
        }
        for (field, p) in [
            ("data_dir", &cfg.data_dir),
            ("repo_dir", &cfg.repo_dir),
            ("config_file", &cfg.config_file),
        ] {
            if !p.is_absolute() {
                return Err(invalid(field, "must be an absolute path"));
            }
        }
        match role {
            Role::Production if !cfg.stop_command.is_empty() || !cfg.start_command.is_empty() => {
                return Err(DatastoreConfigError::WrongRole {
                    field: "stop_command",
                    why: "only a staging agent restores; remove stop_command and start_command",
                });
            }
            Role::Staging if cfg.stop_command.is_empty() || cfg.start_command.is_empty() => {
                return Err(DatastoreConfigError::Missing {
                    field: "stop_command",
                    what: "a restore stops the cluster and starts it again (stop_command and start_command)",
                });
            }
            _ => {}
        }
        let pass = ferry_core::secrets::read_password(Some(&cfg.cipher_pass_file), None)
            .map_err(|e| DatastoreConfigError::Secret {
                field: "cipher_pass_file".into(),
                message: e.to_string(),
            })?
            .ok_or_else(|| invalid("cipher_pass_file", "empty"))?;
        if pass.len() < 16 || pass.contains(['\n', '\r']) {
            return Err(invalid(
                "cipher_pass_file",
                "the passphrase must be one line of at least 16 characters",
            ));
        }
        Ok(Self {
            cfg,
            cipher_pass: Arc::new(ferry_core::secrets::Password(pass)),
        })
    }

    fn bin(&self) -> PathBuf {
        self.cfg.bin.clone().unwrap_or_else(|| "pgbackrest".into())
    }

    /// The configuration file's text.
    fn config_text(&self) -> String {
        let mut pg = format!(
            "pg1-path={}\npg1-port={}\n",
            self.cfg.data_dir.display(),
            self.cfg.port
        );
        if let Some(s) = &self.cfg.socket_dir {
            pg.push_str(&format!("pg1-socket-path={}\n", s.display()));
        }
        format!(
            "# Written by ferry-agent for datastore {name:?}; changes are overwritten.\n\
             [global]\nrepo1-path={repo}\nrepo1-cipher-type=aes-256-cbc\nrepo1-cipher-pass={pass}\n\
             repo1-retention-full={ret}\nlock-path={lock}\nstart-fast=y\nlog-level-file=off\n\
             log-level-console=warn\n\n\
             [{stanza}]\n{pg}",
            name = self.cfg.name,
            repo = self.cfg.repo_dir.display(),
            pass = self.cipher_pass.0,
            ret = self.cfg.retention_full,
            lock = self.lock_dir().display(),
            stanza = self.cfg.stanza,
        )
    }

    /// pgBackRest's lock directory, one a datastore (its default, `/tmp/pgbackrest`, is
    /// shared by every stanza of the host): `<repo_dir>.lock`.
    fn lock_dir(&self) -> PathBuf {
        let mut name = self.cfg.repo_dir.as_os_str().to_owned();
        name.push(".lock");
        PathBuf::from(name)
    }

    /// `(uid, gid)` of `os_user`, from `/etc/passwd`.
    fn os_ids(&self) -> std::io::Result<(u32, u32)> {
        super::common::tool::os_user_ids(&self.cfg.os_user)
    }

    /// Writes the configuration file (0600, owned by `os_user`) and makes sure the
    /// repository directory exists and belongs to `os_user`.
    fn write_config(&self) -> std::io::Result<()> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let (uid, gid) = self.os_ids()?;
        let path = &self.cfg.config_file;
        let tmp = path.with_extension("ferry-tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, self.config_text().as_bytes())?;
        drop(f);
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        if super::common::tree::is_root() {
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))?;
        }
        std::fs::rename(&tmp, path)?;
        for dir in [self.cfg.repo_dir.clone(), self.lock_dir()] {
            std::fs::create_dir_all(&dir)?;
            if super::common::tree::is_root() {
                std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
            }
        }
        Ok(())
    }

    /// Runs `pgbackrest --config=... --stanza=... ARGS` as `os_user`; its stdout.
    async fn pgbackrest(&self, args: &[&str]) -> Result<Vec<u8>, ToolError> {
        let mut cmd = if super::common::tree::is_root() && self.cfg.os_user != "root" {
            let mut c = tokio::process::Command::new("runuser");
            c.args(["-u", &self.cfg.os_user, "--"]).arg(self.bin());
            c
        } else {
            tokio::process::Command::new(self.bin())
        };
        cmd.arg(format!("--config={}", self.cfg.config_file.display()))
            .arg(format!("--stanza={}", self.cfg.stanza))
            .args(args)
            .current_dir("/");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("PGBACKREST_") {
                cmd.env_remove(k);
            }
        }
        super::run_tool(cmd).await
    }

    /// The stanza's backups, oldest first.
    async fn backups(&self) -> Result<Vec<InfoBackup>, ToolError> {
        let out = self.pgbackrest(&["info", "--output=json"]).await?;
        let v: serde_json::Value = serde_json::from_slice(&out)
            .map_err(|e| ToolError::Output(format!("pgbackrest info: unexpected output: {e}")))?;
        let list = v
            .as_array()
            .and_then(|a| a.first())
            .map(|s| s["backup"].clone())
            .unwrap_or_default();
        serde_json::from_value(list)
            .map_err(|e| ToolError::Output(format!("pgbackrest info: unexpected backup list: {e}")))
    }

    /// Production: stanza-create (a no-op once it exists), a `backup_type` backup
    /// (default `diff`; pgBackRest makes it a full when there is none), then the
    /// repository pushed to the backup server.
    ///
    /// # Errors
    /// [`JobError::Dump`] naming the failing command.
    pub async fn backup(
        &self,
        settings: &Arc<Settings>,
        backup_type: Option<String>,
        progress: &Progress,
    ) -> Result<JobReport, JobError> {
        let fail = |what: &str, e: ToolError| JobError::Dump {
            datastore: self.cfg.name.clone(),
            source: DumpError::tool(what)(e),
        };
        let kind = backup_type.unwrap_or_else(|| "diff".into());
        progress.set_stage("pgbackrest");
        self.write_config().map_err(|e| JobError::Stage {
            stage: "pgbackrest config",
            source: e,
        })?;
        self.pgbackrest(&["stanza-create"])
            .await
            .map_err(|e| fail("pgbackrest stanza-create", e))?;
        self.pgbackrest(&["backup", &format!("--type={kind}")])
            .await
            .map_err(|e| fail(&format!("pgbackrest backup --type={kind}"), e))?;
        let latest = self
            .backups()
            .await
            .map_err(|e| fail("pgbackrest info", e))?
            .pop()
            .ok_or_else(|| {
                fail(
                    "pgbackrest info",
                    ToolError::Output("no backup listed after the backup".into()),
                )
            })?;
        progress.set_stage("rsync");
        let remote = settings.backup_server.mirror()?;
        let dest = remote.dir(&settings.environment, &self.cfg.name);
        let mut cmd = remote.rsync_up();
        cmd.args(["--delete", "--mkpath"])
            .arg(format!("{}/", self.cfg.repo_dir.display()))
            .arg(format!("{}{dest}", remote.prefix()));
        output_until_cancelled(cmd, &progress.cancel)
            .await
            .map_err(|e| fail("rsync (the repository to the backup server)", e))?;
        let finished = chrono::DateTime::from_timestamp(latest.timestamp.stop, 0)
            .unwrap_or_else(chrono::Utc::now);
        Ok(JobReport {
            recipient_fingerprints: Vec::new(),
            data_finished_ms: None,
            target: String::new(),
            stored_path: dest.trim_end_matches('/').to_owned(),
            size_bytes: latest.info.repository.delta,
            sha256: String::new(),
            bytes_uncompressed: latest.info.size,
            environment: settings.environment.clone(),
            date: finished.format("%Y-%m-%d").to_string(),
            // Shown by `ferry backups`: which backups of the repository are full or diff.
            kind: format!("pgbackrest {}", latest.kind),
            summary: format!(
                "pgBackRest {} backup {}{}: {} bytes of database, {} bytes added to the repository",
                latest.kind,
                latest.label,
                latest
                    .prior
                    .as_deref()
                    .map(|p| format!(" (on {p})"))
                    .unwrap_or_default(),
                latest.info.size,
                latest.info.repository.delta
            ),
        })
    }

    /// Staging: pulls the source environment's repository, picks the newest backup (or
    /// the newest finished on `date`), stops the cluster, `restore --delta`, starts it.
    ///
    /// # Errors
    /// [`JobError::NotFound`] without a backup, [`JobError::Restore`] naming the failing
    /// step and the state of the data directory.
    pub async fn restore(
        &self,
        settings: &Arc<Settings>,
        (date, namespaces): (Option<String>, Vec<String>),
        progress: &Progress,
    ) -> Result<JobReport, JobError> {
        if !namespaces.is_empty() {
            return Err(JobError::InvalidArgument(format!(
                "datastore {:?} has no namespaces; restore it whole",
                self.cfg.name
            )));
        }
        let failed = |source: RestoreError, target_state: &str| JobError::Restore {
            datastore: self.cfg.name.clone(),
            source,
            target_state: target_state.to_owned(),
        };
        let untouched = "the target was left as it was";
        let env = settings
            .source_environment
            .clone()
            .unwrap_or_else(|| settings.environment.clone());
        progress.set_stage("rsync");
        self.write_config().map_err(|e| JobError::Stage {
            stage: "pgbackrest config",
            source: e,
        })?;
        let remote = settings.backup_server.mirror()?;
        let src = remote.remote(&env, &self.cfg.name);
        let mut cmd = remote.rsync();
        cmd.arg("--delete")
            .arg(&src)
            .arg(format!("{}/", self.cfg.repo_dir.display()));
        if super::common::tree::is_root() {
            let (uid, gid) = self.os_ids().map_err(|e| JobError::Stage {
                stage: "pgbackrest config",
                source: e,
            })?;
            cmd.arg(format!("--chown={uid}:{gid}"));
        }
        output_until_cancelled(cmd, &progress.cancel)
            .await
            .map_err(|e| {
                failed(
                    RestoreError::tool("rsync (the repository from the backup server)")(e),
                    untouched,
                )
            })?;
        let backups = self
            .backups()
            .await
            .map_err(|e| failed(RestoreError::tool("pgbackrest info")(e), untouched))?;
        let chosen = backups
            .iter()
            .rev()
            .find(|b| match &date {
                None => true,
                Some(d) => chrono::DateTime::from_timestamp(b.timestamp.stop, 0)
                    .is_some_and(|t| t.format("%Y-%m-%d").to_string() <= *d),
            })
            .cloned()
            .ok_or_else(|| {
                // A damaged backup.info can read as an empty repository rather than fail:
                // either way, nothing was changed yet.
                JobError::NotFound(format!(
                    "no pgBackRest backup of {:?} in {src}{}; {untouched}",
                    self.cfg.name,
                    date.as_deref()
                        .map(|d| format!(" finished on or before {d}"))
                        .unwrap_or_default()
                ))
            })?;
        progress.set_stage("restore");
        run_command(&self.cfg.stop_command, "stop_command")
            .await
            .map_err(|e| failed(e, untouched))?;
        let changed = "the data directory was changed in place and the cluster is stopped: \
                       restore again, or start it with start_command to see its state";
        self.pgbackrest(&[
            "restore",
            "--delta",
            &format!("--set={}", chosen.label),
            "--type=immediate",
            "--target-action=promote",
            "--archive-mode=off",
        ])
        .await
        .map_err(|e| failed(RestoreError::tool("pgbackrest restore --delta")(e), changed))?;
        run_command(&self.cfg.start_command, "start_command")
            .await
            .map_err(|e| {
                failed(
                    e,
                    "the data directory holds the restored backup but the cluster did not start",
                )
            })?;
        let finished = chrono::DateTime::from_timestamp(chosen.timestamp.stop, 0)
            .unwrap_or_else(chrono::Utc::now);
        Ok(JobReport {
            recipient_fingerprints: Vec::new(),
            data_finished_ms: Some(chosen.timestamp.stop * 1000),
            target: ferry_storage::PRIMARY.to_owned(),
            stored_path: src,
            size_bytes: chosen.info.repository.delta,
            sha256: String::new(),
            bytes_uncompressed: chosen.info.size,
            environment: env,
            date: finished.format("%Y-%m-%d").to_string(),
            kind: "pgbackrest".into(),
            summary: format!(
                "restored pgBackRest {} backup {} into {} with --delta; the cluster is started",
                chosen.kind,
                chosen.label,
                self.cfg.data_dir.display()
            ),
        })
    }
}

impl Datastore for PgBackRest {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn kind(&self) -> &'static str {
        "pgbackrest"
    }

    /// `pgbackrest version`.
    fn tool_versions(&self) -> Vec<(String, String)> {
        let v = super::ToolPaths::new(None)
            .version_with(&self.bin().display().to_string(), &["version"]);
        vec![("pgbackrest".into(), v)]
    }

    /// Says what `pgbackrest info` says of the stanza.
    ///
    /// # Errors
    /// pgBackRest's error.
    fn check(&self) -> BoxFuture<'_, Result<String, CheckError>> {
        async move {
            self.write_config()
                .map_err(|e| CheckError::Path(e.to_string()))?;
            let out = self
                .pgbackrest(&["info"])
                .await
                .map_err(|failure| CheckError::Tool {
                    tool: "pgbackrest info".into(),
                    failure,
                })?;
            Ok(String::from_utf8_lossy(&out).trim().to_owned())
        }
        .boxed()
    }

    fn mode(&self) -> Mode<'_> {
        Mode::Repository(self)
    }
}

impl super::Repository for PgBackRest {
    fn backup_types(&self) -> &'static [&'static str] {
        &["full", "diff"]
    }
    fn backup<'a>(
        &'a self,
        settings: &'a Arc<Settings>,
        backup_type: Option<String>,
        progress: &'a Progress,
    ) -> futures::future::BoxFuture<'a, Result<JobReport, JobError>> {
        Box::pin(PgBackRest::backup(self, settings, backup_type, progress))
    }
    fn restore<'a>(
        &'a self,
        settings: &'a Arc<Settings>,
        _job_id: &'a str,
        selection: (Option<String>, Vec<String>),
        progress: &'a Progress,
    ) -> futures::future::BoxFuture<'a, Result<JobReport, JobError>> {
        Box::pin(PgBackRest::restore(self, settings, selection, progress))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_json_of_2_45_parses() {
        let json = r#"[{"backup":[{"archive":{"start":"1","stop":"2"},"backrest":{"format":5,"version":"2.45"},
          "database":{"id":1,"repo-key":1},"error":false,"info":{"delta":22992374,"repository":{"delta":3069136,"size":3069136},
          "size":22992374},"label":"20261125-073148F","lsn":{"start":"0/2000028","stop":"0/2000100"},"prior":null,
          "reference":null,"timestamp":{"start":1795591908,"stop":1795591911},"type":"full"}],"name":"main"}]"#;
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        let b: Vec<InfoBackup> = serde_json::from_value(v[0]["backup"].clone()).unwrap();
        assert_eq!(b[0].label, "20261125-073148F");
        assert_eq!(b[0].kind, "full");
        assert_eq!(b[0].info.repository.delta, 3_069_136);
    }
}
