//! Differential backups of a `files` datastore with `method = "rsync"`: an rsync mirror of
//! the directory at `<root>/<environment>/<name>/` on the backup server, kept in sync by
//! the stock `rsync` binary, which the storage target gives ([`ferry_storage::Mirror`]: over
//! SSH with the agent's key and the pinned host key of `[backup_server]` on SFTP).
//!
//! Backup (production): `rsync -a --delete --checksum --numeric-ids --stats` into the
//! mirror, then the mirror's manifest `.ferry-manifest.json` beside the data, with the
//! counts of the transfer's file list (`--stats`: files, directories, links, bytes). The
//! manifest is protected from `--delete` and written last, so a sync that failed half-way
//! leaves a mirror whose counts differ from its manifest, which a restore refuses.
//!
//! Restore (staging): `rsync -a --checksum --numeric-ids` from the mirror of the source
//! environment into a new sibling of the target, counts compared with the manifest, then
//! swapped in ([`crate::datastore::common::tree::replace_dir`]). A mirror has only its latest
//! state: `--date` is refused.
//!
//! Unlike the dated archives, the mirror is stored as plain files (not encrypted), and the
//! production key must be allowed to change and delete in it: use it for data that the
//! backup server may read, and keep the dated tar archives for the rest.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::Files;
use crate::config::Settings;
use crate::datastore::common::tool::output_until_cancelled;
use crate::datastore::common::tree::{self, TreeCounts};
use crate::datastore::{DumpError, RestoreError, ToolError};
use crate::job::{JobError, JobReport, Progress};

/// The mirror's manifest, in the mirror directory.
pub const MANIFEST: &str = ".ferry-manifest.json";

/// What `.ferry-manifest.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MirrorManifest {
    /// Always `files`.
    pub kind: String,
    /// Always `rsync`.
    pub method: String,
    /// Datastore name.
    pub datastore: String,
    /// Agent id and host name of the last sync.
    pub agent: String,
    /// Host name.
    pub hostname: String,
    /// Environment.
    pub environment: String,
    /// When the last sync finished (UTC).
    pub finished: chrono::DateTime<Utc>,
    /// The source's counts, from rsync's file list.
    pub counts: TreeCounts,
    /// Bytes rsync sent in the last sync (literal data; the differential part).
    pub bytes_sent: u64,
}

/// Counts from `rsync --stats`: `Number of files: 1,234 (reg: 1,000, dir: 230, link: 4)`
/// and `Total file size: 12,345 bytes` (regular files plus the lengths of link targets)
/// and `Literal data: 678 bytes`.
fn parse_stats(out: &str) -> Option<(TreeCounts, u64)> {
    let num = |s: &str| s.trim().replace(',', "").parse::<u64>().ok();
    let mut counts = TreeCounts::default();
    let mut literal = 0;
    let mut seen = false;
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("Number of files:") {
            seen = true;
            if let Some(inner) = rest.split_once('(').and_then(|(_, r)| r.split_once(')')) {
                for item in inner.0.split(", ") {
                    if let Some((k, v)) = item.split_once(": ") {
                        let v = num(v)?;
                        match k.trim() {
                            "reg" => counts.files = v,
                            "dir" => counts.directories = v,
                            "link" => counts.symlinks = v,
                            _ => counts.skipped += v,
                        }
                    }
                }
            }
        } else if let Some(rest) = line.strip_prefix("Total file size:") {
            counts.bytes = num(rest.trim().trim_end_matches("bytes"))?;
        } else if let Some(rest) = line.strip_prefix("Literal data:") {
            literal = num(rest.trim().trim_end_matches("bytes"))?;
        }
    }
    seen.then_some((counts, literal))
}

/// The summed lengths of the targets of every symbolic link under `root`, bytes.
fn link_target_bytes(root: &Path) -> u64 {
    walkdir::WalkDir::new(root)
        .follow_links(false)
        .into_iter()
        .flatten()
        .filter(|e| e.path_is_symlink())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.as_os_str().len() as u64)
        .sum()
}

fn setup(e: std::io::Error) -> JobError {
    JobError::Stage {
        stage: "rsync setup",
        source: e,
    }
}

/// Syncs the datastore's directory into its mirror, then writes the mirror's manifest.
///
/// # Errors
/// [`JobError::Dump`] naming rsync's exit status and stderr.
pub async fn backup(
    settings: Arc<Settings>,
    files: &Files,
    progress: Progress,
) -> Result<JobReport, JobError> {
    let cfg = files.config();
    let fail = |what: &str, e: ToolError| JobError::Dump {
        datastore: cfg.name.clone(),
        source: DumpError::tool(what)(e),
    };
    let remote = settings.backup_server.mirror()?;
    let dest = remote.dir(&settings.environment, &cfg.name);
    progress.set_stage("rsync");
    let mut cmd = remote.rsync_up();
    cmd.args(["--delete", "--stats", "--mkpath"])
        .arg(format!("--filter=P /{MANIFEST}"))
        .arg(format!("--filter=- /{MANIFEST}"));
    for pattern in &cfg.exclude {
        cmd.arg(format!("--exclude={pattern}"));
    }
    let src = format!("{}/", cfg.path.display());
    cmd.arg(&src).arg(format!("{}{dest}", remote.prefix()));
    let out = output_until_cancelled(cmd, &progress.cancel)
        .await
        .map_err(|e| fail("rsync (to the mirror)", e))?;
    let text = String::from_utf8_lossy(&out);
    let (counts, bytes_sent) = parse_stats(&text).ok_or_else(|| {
        fail(
            "rsync --stats",
            ToolError::Output(format!("unexpected output: {text}")),
        )
    })?;
    let manifest = MirrorManifest {
        kind: "files".into(),
        method: "rsync".into(),
        datastore: cfg.name.clone(),
        agent: settings.id.clone(),
        hostname: settings.hostname.clone(),
        environment: settings.environment.clone(),
        finished: Utc::now(),
        counts,
        bytes_sent,
    };
    let local = tempfile::Builder::new()
        .prefix("ferry-mirror-")
        .tempdir()
        .map_err(setup)?;
    let file = local.path().join(MANIFEST);
    std::fs::write(
        &file,
        serde_json::to_vec_pretty(&manifest).unwrap_or_default(),
    )
    .map_err(|e| JobError::Stage {
        stage: "manifest",
        source: e,
    })?;
    let mut cmd = remote.rsync();
    cmd.arg(&file).arg(format!("{}{dest}", remote.prefix()));
    output_until_cancelled(cmd, &progress.cancel)
        .await
        .map_err(|e| fail("rsync (the mirror's manifest)", e))?;
    Ok(JobReport {
        recipient_fingerprints: Vec::new(),
        data_finished_ms: None,
        target: String::new(),
        stored_path: dest.trim_end_matches('/').to_owned(),
        size_bytes: counts.bytes,
        sha256: String::new(),
        bytes_uncompressed: counts.bytes,
        environment: settings.environment.clone(),
        date: manifest.finished.format("%Y-%m-%d").to_string(),
        kind: "files rsync".into(),
        summary: format!(
            "rsync mirror: {}, {bytes_sent} bytes sent",
            counts.summary()
        ),
    })
}

/// Restores the mirror of the source environment into the datastore's directory.
///
/// # Errors
/// [`JobError::InvalidArgument`] for a date or namespaces (`selection`),
/// [`JobError::Restore`] naming what failed and the target's state.
pub async fn restore(
    settings: Arc<Settings>,
    files: &Files,
    job_id: &str,
    selection: (Option<String>, Vec<String>),
    progress: Progress,
) -> Result<JobReport, JobError> {
    let cfg = files.config();
    let (date, namespaces) = selection;
    if !namespaces.is_empty() {
        return Err(JobError::InvalidArgument(format!(
            "datastore {:?} has no namespaces; restore it whole",
            cfg.name
        )));
    }
    let env = settings
        .source_environment
        .clone()
        .unwrap_or_else(|| settings.environment.clone());
    let failed = |source: RestoreError| JobError::Restore {
        datastore: cfg.name.clone(),
        source,
        target_state: "the target was left as it was".into(),
    };
    let tool = RestoreError::tool;
    files.refuse_mount_point().map_err(failed)?;
    let remote = settings.backup_server.mirror()?;
    let src = remote.remote(&env, &cfg.name);
    let new = tree::sibling(&cfg.path, "new", job_id);
    let old = tree::sibling(&cfg.path, "old", job_id);
    let cleanup = |dir: &Path| {
        let _ = std::fs::remove_dir_all(dir);
    };
    progress.set_stage("rsync");
    // The manifest first: a mirror without one was never completely synced.
    let local = tempfile::Builder::new()
        .prefix("ferry-mirror-")
        .tempdir()
        .map_err(setup)?;
    let mut cmd = remote.rsync();
    cmd.arg(format!("{src}{MANIFEST}")).arg(local.path());
    output_until_cancelled(cmd, &progress.cancel)
        .await
        .map_err(|e| failed(tool("rsync (the mirror's manifest)")(e)))?;
    let manifest: MirrorManifest =
        serde_json::from_slice(&std::fs::read(local.path().join(MANIFEST)).unwrap_or_default())
            .map_err(|e| failed(RestoreError::Manifest(format!("{src}{MANIFEST}: {e}"))))?;
    // A mirror holds only the state of its last sync: a date (a backup set's) must be
    // that sync's date.
    let synced = manifest.finished.format("%Y-%m-%d").to_string();
    if let Some(d) = date.as_deref()
        && d != synced
    {
        return Err(JobError::NotFound(format!(
            "datastore {:?} is an rsync mirror holding only its last sync, of {synced}, not {d}",
            cfg.name
        )));
    }
    tree::ensure_room(&new, manifest.counts.bytes).map_err(failed)?;
    let mut cmd = remote.rsync();
    cmd.arg(format!("--exclude=/{MANIFEST}"))
        .arg(&src)
        .arg(format!("{}/", new.display()));
    if let Err(e) = output_until_cancelled(cmd, &progress.cancel).await {
        cleanup(&new);
        return Err(failed(tool("rsync (from the mirror)")(e)));
    }
    progress.set_stage("commit");
    let (n, o, t) = (new.clone(), old.clone(), cfg.path.clone());
    let expected = manifest.counts;
    let swapped = tokio::task::spawn_blocking(move || -> Result<TreeCounts, RestoreError> {
        let mut got = tree::count_tree(&n)
            .map_err(|e| RestoreError::Target(format!("counting {}: {e}", n.display())))?;
        // rsync's "Total file size" counts the length of every link's target too.
        got.bytes += link_target_bytes(&n);
        if !got.same_content(&expected) {
            return Err(RestoreError::Mismatch(format!(
                "the mirror's manifest says {}, the restored tree holds {}",
                expected.summary(),
                got.summary()
            )));
        }
        tree::replace_dir(&n, &o, &t)?;
        Ok(got)
    })
    .await
    .map_err(|e| JobError::Internal(e.to_string()))?;
    let got = match swapped {
        Ok(got) => got,
        Err(e) => {
            cleanup(&new);
            return Err(failed(e));
        }
    };
    Ok(JobReport {
        recipient_fingerprints: Vec::new(),
        data_finished_ms: Some(manifest.finished.timestamp_millis()),
        target: ferry_storage::PRIMARY.to_owned(),
        stored_path: src,
        size_bytes: got.bytes,
        sha256: String::new(),
        bytes_uncompressed: got.bytes,
        environment: env,
        date: manifest.finished.format("%Y-%m-%d").to_string(),
        kind: "files".into(),
        summary: format!(
            "{}: {}, equal to the mirror's manifest of {}",
            PathBuf::from(&cfg.path).display(),
            got.summary(),
            manifest.finished.to_rfc3339()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_rsync_3_are_parsed() {
        let out = "\nNumber of files: 1,234 (reg: 1,000, dir: 230, link: 4)\n\
                   Number of created files: 0\nTotal file size: 12,345,678 bytes\n\
                   Literal data: 678 bytes\n";
        let (c, literal) = parse_stats(out).unwrap();
        assert_eq!(
            (c.files, c.directories, c.symlinks, c.bytes, literal),
            (1000, 230, 4, 12_345_678, 678)
        );
        assert!(parse_stats("no stats here").is_none());
    }
}
