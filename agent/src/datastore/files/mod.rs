//! Directories (`kind = "files"`): a MinIO data directory, or any tree (the data
//! containers of older deployments). The dump is a tar stream of the tree ([`super::common::tree`]),
//! stored as `<name>_backup_<date>.tar.zst.age`; the manifest counts files, directories,
//! links and bytes.
//!
//! Restore (staging): the archive is unpacked into a new hidden sibling of the target
//! (`<parent>/.<name>.ferry-new-<job>`, same file system), its counts compared with the
//! manifest, and only then swapped in: the old tree is renamed aside, the new one renamed
//! to the target, the old one removed. A failure before the swap removes the new tree and
//! leaves the target as it was. A service reading the directory (MinIO) should be stopped
//! around the restore or pointed at the new tree; the swap itself is two renames. A
//! restore killed half-way leaves those siblings; the agent puts them right on start and
//! before the next restore ([`super::common::leftovers`]). A `path` that is a mount point cannot
//! be renamed: it is refused before anything is downloaded.

use std::fs;
use std::path::{Path, PathBuf};

use ferry_proto::Role;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Deserialize;

use super::common::leftovers::Recovered;
use super::common::tree::{self, TreeCounts};
use super::{
    CheckError, Datastore, DatastoreConfigError, DumpError, DumpOutcome, DumpStream, Dumper, Mode,
    Part, PartSink, RestoreError, RestoreSession, Restorer,
};
use ferry_core::manifest::{Manifest, Source};

pub mod mirror;

/// The only part: a tar archive.
pub const MAIN: Part = Part {
    name: "",
    format: "tar",
};

/// `[[datastores]]` with `kind = "files"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    /// Datastore name, used in stored file names.
    pub name: String,
    /// An absolute path. Production: the directory to back up. Staging: the directory
    /// to restore into (created, or replaced at the end of a restore).
    pub path: PathBuf,
    /// Production only: glob patterns (globset syntax) of paths relative to `path` to
    /// leave out, e.g. `.minio.sys/tmp` or `**/*.part`; a matched directory is left out
    /// with everything in it.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// `tar` (default): a dated, encrypted tar archive a backup. `rsync`: a differential
    /// mirror, `<root>/<environment>/<name>/`, kept in sync with `rsync --delete
    /// --checksum` over SSH (see [`mirror`]); it is NOT encrypted on the
    /// backup server, and the production key must be allowed to change it.
    #[serde(default)]
    pub method: Method,
}

/// How a `files` datastore is backed up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// A tar archive a backup, through the pipeline (compressed, encrypted).
    #[default]
    Tar,
    /// An rsync mirror on the backup server.
    Rsync,
}

/// A built `files` datastore.
#[derive(Clone, Debug)]
pub struct Files {
    cfg: FilesConfig,
    exclude: globset::GlobSet,
    role: Role,
}

impl Files {
    /// Validates `cfg` for `role`.
    ///
    /// # Errors
    /// [`DatastoreConfigError`] naming the field.
    pub fn build(cfg: FilesConfig, role: Role) -> Result<Self, DatastoreConfigError> {
        if !cfg.path.is_absolute() {
            return Err(DatastoreConfigError::invalid(
                "path",
                format!("{} is not an absolute path", cfg.path.display()),
            ));
        }
        if cfg.path.parent().is_none() || cfg.path.file_name().is_none() {
            return Err(DatastoreConfigError::invalid(
                "path",
                "the root directory cannot be a target",
            ));
        }
        if role == Role::Staging && !cfg.exclude.is_empty() {
            return Err(DatastoreConfigError::WrongRole {
                field: "exclude",
                why: "only a production agent backs up; remove it",
            });
        }
        let exclude = tree::excludes(&cfg.exclude)
            .map_err(|e| DatastoreConfigError::invalid("exclude", e.to_string()))?;
        Ok(Self { cfg, exclude, role })
    }

    /// The configuration.
    pub fn config(&self) -> &FilesConfig {
        &self.cfg
    }

    /// Whether this datastore is an rsync mirror rather than tar archives.
    pub fn is_mirror(&self) -> bool {
        self.cfg.method == Method::Rsync
    }
}

impl Files {
    /// Staging: refuses a `path` that is a mount point. A restore replaces the directory
    /// by renaming it, and a mount point cannot be renamed (`EBUSY`), so such a restore
    /// would fail only at its swap, after the whole download. Checked by `ferry-agent
    /// check` and before a restore downloads anything.
    ///
    /// # Errors
    /// [`RestoreError::Target`] naming the path and what to configure instead.
    pub fn refuse_mount_point(&self) -> Result<(), RestoreError> {
        tree::refuse_mount_point(&self.cfg.path, "path")
    }

    /// Staging: puts right the leftovers beside `path` of interrupted restores (either
    /// method), skipping the jobs in `skip` ([`super::common::leftovers::recover_dir`]).
    ///
    /// # Errors
    /// [`RestoreError::Target`]: the parent of `path` cannot be listed.
    pub async fn recover(&self, skip: &[String]) -> Result<Vec<Recovered>, RestoreError> {
        if self.role != Role::Staging {
            return Ok(Vec::new());
        }
        let (path, skip) = (self.cfg.path.clone(), skip.to_vec());
        tokio::task::spawn_blocking(move || {
            super::common::leftovers::recover_dir(&path, &[], &skip).map_err(|e| {
                RestoreError::Target(format!(
                    "cannot list {} for leftovers: {e}",
                    path.parent().unwrap_or(&path).display()
                ))
            })
        })
        .await
        .map_err(|e| RestoreError::Target(e.to_string()))?
    }
}

/// `method = "rsync"`: the mirror ([`mirror`]).
impl super::Repository for Files {
    fn backup<'a>(
        &'a self,
        settings: &'a std::sync::Arc<crate::config::Settings>,
        _backup_type: Option<String>,
        progress: &'a crate::job::Progress,
    ) -> BoxFuture<'a, Result<crate::job::JobReport, crate::job::JobError>> {
        mirror::backup(settings.clone(), self, progress.clone()).boxed()
    }
    fn restore<'a>(
        &'a self,
        settings: &'a std::sync::Arc<crate::config::Settings>,
        job_id: &'a str,
        selection: (Option<String>, Vec<String>),
        progress: &'a crate::job::Progress,
    ) -> BoxFuture<'a, Result<crate::job::JobReport, crate::job::JobError>> {
        mirror::restore(settings.clone(), self, job_id, selection, progress.clone()).boxed()
    }
}

impl Datastore for Files {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn kind(&self) -> &'static str {
        "files"
    }

    /// No external tools: the tar writer is built in.
    fn tool_versions(&self) -> Vec<(String, String)> {
        vec![("tar".into(), "built in (tar crate)".into())]
    }

    /// Says whether `path` is there (production) or where its parent is (staging).
    ///
    /// # Errors
    /// The directory (production) or its parent (staging) is missing; staging: `path` is
    /// a mount point ([`Files::refuse_mount_point`]).
    fn check(&self) -> BoxFuture<'_, Result<String, CheckError>> {
        async move {
            let p = &self.cfg.path;
            if self.role == Role::Staging {
                self.refuse_mount_point()
                    .map_err(|e| CheckError::Path(e.to_string()))?;
            }
            if p.is_dir() {
                let counts = tokio::task::spawn_blocking({
                    let p = p.clone();
                    move || tree::count_tree(&p)
                })
                .await
                .map_err(|e| CheckError::Path(e.to_string()))?
                .map_err(|e| CheckError::Path(format!("{}: {e}", p.display())))?;
                Ok(format!("{}: {}", p.display(), counts.summary()))
            } else if p.exists() {
                Err(CheckError::Path(format!(
                    "{} is not a directory",
                    p.display()
                )))
            } else if p.parent().is_some_and(Path::is_dir) {
                Ok(format!(
                    "{} does not exist yet (a restore creates it)",
                    p.display()
                ))
            } else {
                Err(CheckError::Path(format!(
                    "{} does not exist, nor does its parent",
                    p.display()
                )))
            }
        }
        .boxed()
    }

    fn mode(&self) -> Mode<'_> {
        if self.is_mirror() {
            Mode::Repository(self)
        } else {
            Mode::streamed(self)
        }
    }

    /// Either method: see [`Files::recover`].
    fn recover_leftovers<'a>(
        &'a self,
        skip: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Recovered>, RestoreError>> {
        self.recover(skip).boxed()
    }
}

impl Dumper for Files {
    fn parts(&self) -> &'static [Part] {
        &[MAIN]
    }

    fn dump<'a>(&'a self, _part: &'a Part) -> BoxFuture<'a, Result<DumpStream, DumpError>> {
        async move {
            let root = self.cfg.path.clone();
            if !root.is_dir() {
                return Err(DumpError::Source(format!(
                    "{} is not a directory",
                    root.display()
                )));
            }
            let (reader, writer) = std::io::pipe().map_err(|e| DumpError::Spawn {
                tool: "tar writer".into(),
                source: e,
            })?;
            let exclude = self.exclude.clone();
            let task =
                tokio::task::spawn_blocking(move || tree::write_tar(&root, &exclude, writer));
            let path = self.cfg.path.clone();
            let finish = async move {
                let counts = task
                    .await
                    .map_err(|e| DumpError::Source(format!("tar writer: {e}")))?
                    .map_err(|e| DumpError::Source(format!("tar of {}: {e}", path.display())))?;
                Ok(DumpOutcome {
                    source: Source {
                        tool: "ferry-agent (tar)".into(),
                        tool_version: env!("CARGO_PKG_VERSION").into(),
                        server_version: String::new(),
                    },
                    counts: serde_json::to_value(counts).unwrap_or_default(),
                    summary: counts.summary(),
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

impl Restorer for Files {
    /// The tar stream is unpacked into a sibling of the target.
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
            let expected: TreeCounts =
                super::expect_whole(main, "files", &MAIN, "a files tar archive", namespaces)?;
            self.refuse_mount_point()?;
            let new = tree::sibling(&self.cfg.path, "new", job_id);
            tree::ensure_room(&new, main.bytes_uncompressed)?;
            fs::create_dir(&new).map_err(|e| {
                RestoreError::Target(if e.kind() == std::io::ErrorKind::AlreadyExists {
                    format!(
                        "cannot create {}: it exists, a leftover of this job's previous attempt that the agent kept \
                         (its log says why); remove it or move it away, then restore again",
                        new.display()
                    )
                } else {
                    format!("cannot create {}: {e}", new.display())
                })
            })?;
            Ok(Box::new(FilesRestore {
                target: self.cfg.path.clone(),
                old: tree::sibling(&self.cfg.path, "old", job_id),
                new,
                expected,
            }) as Box<dyn RestoreSession>)
        }
        .boxed()
    }
}

/// A `files` restore in progress: the archive goes into `new`.
struct FilesRestore {
    target: PathBuf,
    new: PathBuf,
    old: PathBuf,
    expected: TreeCounts,
}

impl RestoreSession for FilesRestore {
    fn part<'a>(
        &'a mut self,
        _manifest: &'a Manifest,
    ) -> BoxFuture<'a, Result<PartSink, RestoreError>> {
        async move { tree::unpack_sink(self.new.clone()) }.boxed()
    }

    fn commit<'a>(
        &'a mut self,
        _main: &'a Manifest,
    ) -> BoxFuture<'a, Result<String, RestoreError>> {
        async move {
            let (new, old, target, expected) = (
                self.new.clone(),
                self.old.clone(),
                self.target.clone(),
                self.expected,
            );
            tokio::task::spawn_blocking(move || swap_in(&new, &old, &target, &expected))
                .await
                .map_err(|e| RestoreError::Target(e.to_string()))?
        }
        .boxed()
    }

    fn abort<'a>(&'a mut self) -> BoxFuture<'a, ()> {
        async move {
            let new = self.new.clone();
            let _ = tokio::task::spawn_blocking(move || fs::remove_dir_all(new)).await;
        }
        .boxed()
    }
}

/// Checks the tree in `new` against `expected`, then puts it in place of `target`
/// ([`tree::replace_dir`]).
fn swap_in(
    new: &Path,
    old: &Path,
    target: &Path,
    expected: &TreeCounts,
) -> Result<String, RestoreError> {
    let got = tree::count_tree(new)
        .map_err(|e| RestoreError::Target(format!("counting {}: {e}", new.display())))?;
    if !got.same_content(expected) {
        return Err(RestoreError::Mismatch(format!(
            "the manifest says {}, the restored tree holds {}",
            expected.summary(),
            got.summary()
        )));
    }
    tree::replace_dir(new, old, target)?;
    Ok(format!(
        "{}: {}, equal to the manifest",
        target.display(),
        got.summary()
    ))
}
