//! A directory tree as a tar stream, both ways: written on a blocking thread into a pipe
//! (the `files` kind, InfluxDB's backup directory), and unpacked from one into a new
//! directory. The format is POSIX ustar with GNU long names (`tar` crate, see
//! <https://www.gnu.org/software/tar/manual/html_node/Standard.html>), so stock `tar -x`
//! reads it.
//!
//! Kept: regular files, directories, symbolic links (as links, never followed), modes,
//! mtimes, and owners (restored when the agent runs as root). Not kept: hard links (each
//! name is stored as a file of its own), sockets, FIFOs and devices (skipped and counted),
//! extended attributes and ACLs.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

use crate::datastore::RestoreError;

/// What a tree holds, as counted by [`write_tar`] and [`count_tree`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeCounts {
    /// Regular files.
    pub files: u64,
    /// Directories, the root included.
    pub directories: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Bytes of all regular files.
    pub bytes: u64,
    /// Sockets, FIFOs and devices left out (dump only).
    #[serde(default)]
    pub skipped: u64,
    /// Files gone between listing and reading (left out; dump only).
    #[serde(default)]
    pub vanished: u64,
    /// Files whose size changed while they were read (stored with the size they had
    /// when listed: cut, or padded with zeros; dump only).
    #[serde(default)]
    pub changed: u64,
}

impl TreeCounts {
    /// Whether the kept entries (files, directories, links, bytes) are equal.
    pub fn same_content(&self, other: &TreeCounts) -> bool {
        (self.files, self.directories, self.symlinks, self.bytes)
            == (other.files, other.directories, other.symlinks, other.bytes)
    }

    /// `N files, D directories, L links, B bytes` and what was left out.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} files, {} directories, {} links, {} bytes",
            self.files, self.directories, self.symlinks, self.bytes
        );
        for (n, what) in [
            (self.skipped, "special files skipped"),
            (self.vanished, "files vanished while listed"),
            (self.changed, "files changed while read"),
        ] {
            if n > 0 {
                s.push_str(&format!(", {n} {what}"));
            }
        }
        s
    }
}

/// Compiles exclude patterns (globset syntax, matched against paths relative to the root,
/// e.g. `.minio.sys/tmp` or `**/*.tmp`).
///
/// # Errors
/// [`ExcludeError::Pattern`] naming the first pattern that is not a valid glob.
pub fn excludes(patterns: &[String]) -> Result<GlobSet, ExcludeError> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(Glob::new(p).map_err(|error| ExcludeError::Pattern {
            pattern: p.clone(),
            error,
        })?);
    }
    b.build().map_err(ExcludeError::Set)
}

/// Exclude patterns that do not compile ([`excludes`]).
#[derive(Debug, thiserror::Error)]
pub enum ExcludeError {
    /// A pattern that is not a valid glob.
    #[error("{pattern:?}: {error}")]
    Pattern {
        /// The pattern as configured.
        pattern: String,
        /// Why it is not a glob.
        error: globset::Error,
    },
    /// The patterns, each valid, could not be compiled together.
    #[error("{0}")]
    Set(globset::Error),
}

/// The buffer between the tar crate and the pipe to or from the pipeline, bytes.
const IO_BUFFER_BYTES: usize = 1 << 20;

/// Reads exactly `remaining` bytes of a file that may change while it is read: stops at
/// `remaining` if it grew, pads with zeros if it shrank, and says so in `changed`.
struct Exactly {
    file: File,
    remaining: u64,
    changed: bool,
}

impl Read for Exactly {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let mut n = self.file.read(&mut buf[..want])?;
        if n == 0 {
            self.changed = true;
            buf[..want].fill(0);
            n = want;
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Writes the tree under `root` as a tar archive to `out`, entries in file-name order,
/// names relative to `root` (the root itself is `./`), leaving out what `exclude` matches
/// (a matched directory with everything in it). Symbolic links are stored as links.
///
/// # Errors
/// `root` cannot be listed, or a file cannot be read (other than vanishing), or `out`
/// fails (the reader went away).
pub fn write_tar(root: &Path, exclude: &GlobSet, out: impl Write) -> io::Result<TreeCounts> {
    let mut counts = TreeCounts::default();
    // The tar crate writes each header, file and padding with its own small write: one
    // buffer in front of the pipe makes them a system call per MiB.
    let mut builder = tar::Builder::new(io::BufWriter::with_capacity(IO_BUFFER_BYTES, out));
    builder.follow_symlinks(false);
    let walk = walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            e.path()
                .strip_prefix(root)
                .map(|rel| rel.as_os_str().is_empty() || !exclude.is_match(rel))
                .unwrap_or(true)
        });
    for entry in walk {
        let entry = match entry {
            Ok(e) => e,
            Err(e) if e.io_error().map(io::Error::kind) == Some(io::ErrorKind::NotFound) => {
                counts.vanished += 1;
                continue;
            }
            Err(e) => return Err(io::Error::other(e)),
        };
        let rel = entry.path().strip_prefix(root).map_err(io::Error::other)?;
        let name: PathBuf = if rel.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            rel.to_owned()
        };
        let meta = match fs::symlink_metadata(entry.path()) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                counts.vanished += 1;
                continue;
            }
            Err(e) => return Err(with_path(e, entry.path())),
        };
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        let ft = meta.file_type();
        if ft.is_dir() {
            builder.append_data(&mut header, &name, io::empty())?;
            counts.directories += 1;
        } else if ft.is_symlink() {
            let target = match fs::read_link(entry.path()) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    counts.vanished += 1;
                    continue;
                }
                Err(e) => return Err(with_path(e, entry.path())),
            };
            header.set_size(0);
            builder.append_link(&mut header, &name, &target)?;
            counts.symlinks += 1;
        } else if ft.is_file() {
            let file = match File::open(entry.path()) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    counts.vanished += 1;
                    continue;
                }
                Err(e) => return Err(with_path(e, entry.path())),
            };
            let mut data = Exactly {
                file,
                remaining: meta.len(),
                changed: false,
            };
            builder.append_data(&mut header, &name, &mut data)?;
            if data.changed || data.file.metadata().map(|m| m.len()).ok() != Some(meta.len()) {
                counts.changed += 1;
            }
            counts.files += 1;
            counts.bytes += meta.len();
        } else {
            counts.skipped += 1;
        }
    }
    builder.into_inner()?.flush()?;
    Ok(counts)
}

/// An error and its sources, `: `-separated (the `tar` crate hides the cause in `source`).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

fn with_path(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Refuses an entry that would write outside `dir` or through a link: an absolute name,
/// a `..` component, a name whose parent inside `dir` is a symbolic link (made by an
/// earlier entry: [`write_tar`] never stores a name below a link), and a hard link whose
/// target is absolute, has `..`, or lies below a symbolic link. Symbolic links themselves
/// are kept whatever they point to: they are stored, never followed.
fn check_entry<R: Read>(entry: &tar::Entry<'_, R>, name: &Path, dir: &Path) -> io::Result<()> {
    let refuse = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: refused, {why}; a Ferry archive never holds such an entry, and nothing \
                 is written outside the target",
                name.display()
            ),
        ))
    };
    let outside = |p: &Path| -> Option<&'static str> {
        p.components().find_map(|c| match c {
            std::path::Component::RootDir | std::path::Component::Prefix(_) => Some("is absolute"),
            std::path::Component::ParentDir => Some("has a `..` component"),
            _ => None,
        })
    };
    let through_link = |p: &Path| -> Option<PathBuf> {
        let mut at = dir.to_owned();
        let parts: Vec<_> = p.components().collect();
        for c in parts.iter().take(parts.len().saturating_sub(1)) {
            at.push(c);
            if fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
                return at.strip_prefix(dir).ok().map(Path::to_owned);
            }
        }
        None
    };
    if let Some(why) = outside(name) {
        return refuse(format!("the name {why}"));
    }
    if let Some(link) = through_link(name) {
        return refuse(format!(
            "it goes through {}, a symbolic link an earlier entry made",
            link.display()
        ));
    }
    if entry.header().entry_type().is_hard_link() {
        let target = entry.link_name()?.unwrap_or_default().into_owned();
        if let Some(why) = outside(&target) {
            return refuse(format!(
                "it is a hard link to {}, which {why}",
                target.display()
            ));
        }
        if let Some(link) = through_link(&target.join("x")) {
            return refuse(format!(
                "it is a hard link to {}, which goes through the symbolic link {}",
                target.display(),
                link.display()
            ));
        }
    }
    Ok(())
}

/// Unpacks the tar archive read from `input` into `dir` (which must exist and be empty),
/// keeping modes and mtimes, and owners when running as root; then reads `input` to its
/// end, so the writer never sees a closed pipe. An entry that would land outside `dir`
/// (an absolute name, `..`, a name below a symbolic link, a hard link to outside) is
/// refused before anything of it is written.
///
/// # Errors
/// A malformed archive, a refused entry, or a file system error, naming the entry.
pub fn unpack(input: impl Read, dir: &Path) -> io::Result<()> {
    // Headers are read 512 bytes at a time: buffered, not a system call each.
    let mut archive = tar::Archive::new(io::BufReader::with_capacity(IO_BUFFER_BYTES, input));
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(is_root());
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        check_entry(&entry, &path, dir)?;
        let ok = entry
            .unpack_in(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {}", path.display(), chain(&e))))?;
        if !ok {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: refused, the name leads outside the target",
                    path.display()
                ),
            ));
        }
    }
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink())?;
    Ok(())
}

/// Checks before a restore that the file system holding `dir` (or its nearest existing
/// ancestor) has `need` bytes free for an unprivileged user, plus 5 %.
///
/// # Errors
/// [`RestoreError::Target`] naming the file system's free and needed bytes; the
/// caller has touched nothing yet.
pub fn ensure_room(dir: &Path, need: u64) -> Result<(), RestoreError> {
    let mut probe = dir;
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => break,
        }
    }
    let st = rustix::fs::statvfs(probe).map_err(|e| {
        RestoreError::Target(format!(
            "cannot read free space of {}: {e}",
            probe.display()
        ))
    })?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    let wanted = need.saturating_add(need / 20);
    if free < wanted {
        return Err(RestoreError::Target(format!(
            "not enough room to restore into {}: {free} bytes free, the backup needs about {wanted}; nothing was touched",
            dir.display()
        )));
    }
    Ok(())
}

/// Whether `path` is a mount point: its device differs from its parent's, or the
/// kernel's mount table (`/proc/self/mountinfo`, proc(5): the fifth field, with `\NNN`
/// octal escapes) lists it, as for a bind mount within one file system. A path that does
/// not exist is not one.
///
/// # Errors
/// `path` or its parent cannot be examined.
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if meta.file_type().is_symlink() {
        // Renaming a link renames the link, whatever it points to.
        return Ok(false);
    }
    let real = fs::canonicalize(path)?;
    let parent = real.parent().unwrap_or(Path::new("/"));
    if real == parent || fs::metadata(parent)?.dev() != meta.dev() {
        return Ok(true);
    }
    let table = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    Ok(mountinfo_lists(&table, &real))
}

/// Refuses a restore target `path` (the config's `field`) that is a mount point
/// ([`is_mount_point`]): the swap renames the target, which a mount point refuses
/// (`EBUSY`), so the restore would fail only at its end, after the whole download.
///
/// # Errors
/// [`RestoreError::Target`] naming the path and what to configure instead.
pub fn refuse_mount_point(path: &Path, field: &str) -> Result<(), RestoreError> {
    match is_mount_point(path) {
        Ok(false) => Ok(()),
        Ok(true) => Err(RestoreError::Target(format!(
            "{} is a mount point: a restore replaces the directory by renaming it, which a mount point refuses; \
             set {field} to a directory inside the mount (e.g. {}) and move the data there; nothing was downloaded or changed",
            path.display(),
            path.join("data").display()
        ))),
        Err(e) => Err(RestoreError::Target(format!(
            "cannot tell whether {} is a mount point: {e}",
            path.display()
        ))),
    }
}

/// Whether the `/proc/self/mountinfo` text `table` has a mount on `path`.
fn mountinfo_lists(table: &str, path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let want = path.as_os_str().as_bytes();
    table.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .is_some_and(|field| unescape_octal(field) == want)
    })
}

/// Undoes the kernel's `\NNN` octal escapes (space, tab, newline, backslash).
fn unescape_octal(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(d.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// `<parent>/.<name>.ferry-<what>-<job>`: a hidden sibling of `path`, on the same file
/// system, for a restore to build in before it swaps.
pub fn sibling(path: &Path, what: &str, job_id: &str) -> PathBuf {
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{base}.ferry-{what}-{job_id}"))
}

/// Puts the directory `new` in place of `target`: renames `target` (if it exists) to
/// `old`, `new` to `target`, then removes `old`. If the second rename fails, `old` is
/// renamed back. A failure to remove `old` is logged, not returned: the swap happened.
///
/// # Errors
/// [`RestoreError::Target`]: what failed, and the state the target is left in.
pub fn replace_dir(new: &Path, old: &Path, target: &Path) -> Result<(), RestoreError> {
    let had_target = target.exists();
    if had_target {
        fs::rename(target, old).map_err(|e| {
            RestoreError::Target(format!(
                "cannot move {} aside: {e}; it is unchanged",
                target.display()
            ))
        })?;
    }
    if let Err(e) = fs::rename(new, target) {
        let back = if had_target {
            fs::rename(old, target)
        } else {
            Ok(())
        };
        return Err(RestoreError::Target(match back {
            Ok(()) => format!(
                "cannot move the restored tree to {}: {e}; the target is unchanged",
                target.display()
            ),
            Err(e2) => format!(
                "cannot move the restored tree to {}: {e}, nor the old tree back: {e2}; the old tree is at {}",
                target.display(),
                old.display()
            ),
        }));
    }
    if had_target && let Err(e) = fs::remove_dir_all(old) {
        tracing::warn!(path = %old.display(), error = %e, "cannot remove the replaced tree");
    }
    Ok(())
}

/// A restore sink that unpacks the tar stream written to it into `dir` ([`unpack`], on a
/// blocking thread); its `finish` reports an unpacking error naming `dir`.
///
/// # Errors
/// No pipe could be made.
pub fn unpack_sink(dir: PathBuf) -> Result<crate::datastore::PartSink, RestoreError> {
    use futures::FutureExt;
    let (reader, writer) =
        io::pipe().map_err(|e| RestoreError::Target(format!("cannot make a pipe: {e}")))?;
    let into = dir.clone();
    let task = tokio::task::spawn_blocking(move || unpack(reader, &into));
    let finish = async move {
        task.await
            .map_err(|e| RestoreError::Target(format!("tar reader: {e}")))?
            .map_err(|e| RestoreError::Target(format!("unpacking into {}: {e}", dir.display())))
    }
    .boxed();
    Ok(crate::datastore::PartSink {
        writer: Box::new(writer),
        finish,
    })
}

/// Whether this process runs as root (then owners are restored, and tools that must run
/// as another OS user are started through `runuser`).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Counts what the tree under `root` holds (the root counts as a directory), without
/// following links.
///
/// # Errors
/// The tree cannot be listed.
pub fn count_tree(root: &Path) -> io::Result<TreeCounts> {
    let mut counts = TreeCounts::default();
    for entry in walkdir::WalkDir::new(root).follow_links(false) {
        let entry = entry.map_err(io::Error::other)?;
        let ft = entry.file_type();
        if ft.is_dir() {
            counts.directories += 1;
        } else if ft.is_symlink() {
            counts.symlinks += 1;
        } else if ft.is_file() {
            counts.files += 1;
            counts.bytes += entry.metadata().map_err(io::Error::other)?.len();
        } else {
            counts.skipped += 1;
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn sample(dir: &Path) {
        fs::create_dir_all(dir.join("a/b")).unwrap();
        fs::write(dir.join("a/b/data.bin"), vec![7u8; 100_000]).unwrap();
        fs::write(dir.join("top.txt"), "hello").unwrap();
        fs::set_permissions(dir.join("top.txt"), fs::Permissions::from_mode(0o640)).unwrap();
        symlink("a/b/data.bin", dir.join("link")).unwrap();
        let long = "x".repeat(120);
        fs::create_dir_all(dir.join(&long)).unwrap();
        fs::write(dir.join(&long).join(&long), "long name").unwrap();
        fs::create_dir_all(dir.join("tmp")).unwrap();
        fs::write(dir.join("tmp/skip.me"), "excluded").unwrap();
    }

    #[test]
    fn round_trip_keeps_files_modes_links_and_long_names_and_excludes() {
        let src = tempfile::tempdir().unwrap();
        sample(src.path());
        let mut tar = Vec::new();
        let counts = write_tar(src.path(), &excludes(&["tmp".into()]).unwrap(), &mut tar).unwrap();
        assert_eq!(
            (
                counts.files,
                counts.directories,
                counts.symlinks,
                counts.bytes
            ),
            (3, 4, 1, 100_000 + 5 + 9)
        );
        let dst = tempfile::tempdir().unwrap();
        unpack(&tar[..], dst.path()).unwrap();
        assert!(count_tree(dst.path()).unwrap().same_content(&counts));
        assert_eq!(
            fs::read(dst.path().join("a/b/data.bin")).unwrap(),
            vec![7u8; 100_000]
        );
        assert_eq!(
            fs::metadata(dst.path().join("top.txt"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o640
        );
        assert_eq!(
            fs::read_link(dst.path().join("link")).unwrap(),
            Path::new("a/b/data.bin")
        );
        assert!(!dst.path().join("tmp").exists());
    }

    #[test]
    fn stock_tar_lists_the_archive() {
        let src = tempfile::tempdir().unwrap();
        sample(src.path());
        let out = tempfile::NamedTempFile::new().unwrap();
        write_tar(src.path(), &excludes(&[]).unwrap(), out.reopen().unwrap()).unwrap();
        let listed = std::process::Command::new("tar")
            .arg("-tf")
            .arg(out.path())
            .output()
            .unwrap();
        assert!(listed.status.success());
        let names = String::from_utf8(listed.stdout).unwrap();
        assert!(names.contains("a/b/data.bin"), "{names}");
        assert!(names.contains(&"x".repeat(120)), "{names}");
    }

    #[test]
    fn an_entry_leading_outside_the_target_is_refused() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // Bypass the builder's own check: write the name into the header directly.
        h.as_old_mut().name[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        b.append(&h, &b"bad"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let dst = tempfile::tempdir().unwrap();
        fs::create_dir(dst.path().join("inner")).unwrap();
        let err = unpack(&tar[..], &dst.path().join("inner")).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        assert!(!dst.path().join("escape").exists());
    }

    /// One raw tar entry: type, name, link target, data.
    type Raw<'a> = (tar::EntryType, &'a str, &'a str, &'a [u8]);

    /// A tar archive of raw entries, names written into the header directly (the `tar`
    /// builder would refuse the hostile ones).
    fn crafted(entries: &[Raw<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (kind, name, link, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h.set_entry_type(*kind);
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn crafted_entries_that_would_write_outside_are_refused_and_write_nothing_there() {
        use tar::EntryType::{Directory, Link, Regular, Symlink};
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), "do not touch").unwrap();
        let out = outside.display().to_string();
        let abs_file = format!("{out}/abs");
        let secret = format!("{out}/secret");
        let cases: Vec<(&str, Vec<Raw<'_>>, &str)> = vec![
            (
                "dot-dot name",
                vec![(Regular, "../outside/evil", "", b"bad")],
                "`..`",
            ),
            (
                "absolute name",
                vec![(Regular, &abs_file, "", b"bad")],
                "absolute",
            ),
            (
                "file below a symlink to an absolute directory",
                vec![(Symlink, "x", &out, b""), (Regular, "x/evil", "", b"bad")],
                "symbolic link",
            ),
            (
                "file below a symlink to ..",
                vec![
                    (Symlink, "x", "..", b""),
                    (Regular, "x/outside/evil", "", b"bad"),
                ],
                "symbolic link",
            ),
            (
                "directory below a symlink",
                vec![(Symlink, "x", &out, b""), (Directory, "x/evil/", "", b"")],
                "symbolic link",
            ),
            (
                "hard link to an absolute path",
                vec![(Link, "evil", &secret, b"")],
                "hard link",
            ),
            (
                "hard link with ..",
                vec![(Link, "evil", "../outside/secret", b"")],
                "hard link",
            ),
            (
                "hard link through a symlink",
                vec![(Symlink, "x", &out, b""), (Link, "evil", "x/secret", b"")],
                "hard link",
            ),
        ];
        for (what, entries, why) in cases {
            let dst = tmp.path().join("inner");
            fs::create_dir(&dst).unwrap();
            let err = unpack(&crafted(&entries)[..], &dst)
                .expect_err(what)
                .to_string();
            assert!(
                err.contains("refused") && err.contains(why),
                "{what}: {err}"
            );
            let mut left: Vec<_> = fs::read_dir(&outside)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            left.sort();
            assert_eq!(left, ["secret"], "{what}: something was written outside");
            assert_eq!(fs::read(outside.join("secret")).unwrap(), b"do not touch");
            assert!(!tmp.path().join("evil").exists(), "{what}");
            assert!(!dst.join("evil").exists(), "{what}");
            fs::remove_dir_all(&dst).unwrap();
        }
    }

    #[test]
    fn a_symlink_to_anywhere_is_kept_as_a_link_and_never_followed() {
        use tar::EntryType::{Regular, Symlink};
        let tmp = tempfile::tempdir().unwrap();
        let dst = tmp.path().join("inner");
        fs::create_dir(&dst).unwrap();
        let tar = crafted(&[
            (Symlink, "etc", "/etc", b""),
            (Symlink, "up", "..", b""),
            (Regular, "file", "", b"ok"),
        ]);
        unpack(&tar[..], &dst).unwrap();
        assert_eq!(fs::read_link(dst.join("etc")).unwrap(), Path::new("/etc"));
        assert_eq!(fs::read_link(dst.join("up")).unwrap(), Path::new(".."));
        assert_eq!(fs::read(dst.join("file")).unwrap(), b"ok");
    }

    #[test]
    fn room_is_checked_on_the_nearest_existing_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("not/yet/there");
        ensure_room(&target, 1024).unwrap();
        let err = ensure_room(&target, u64::MAX / 4).unwrap_err();
        assert!(err.to_string().contains("not enough room"), "{err}");
        assert!(!target.exists());
    }

    #[test]
    fn mount_points_are_found_by_device_or_in_the_mount_table() {
        assert!(is_mount_point(Path::new("/proc")).unwrap());
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(dir.path()).unwrap());
        assert!(!is_mount_point(&dir.path().join("missing")).unwrap());
        let table = "36 35 98:0 /mnt1 /srv/minio\\040data rw,noatime master:1 - ext3 /dev/root rw\n\
                     37 35 98:0 / /var/lib/etcd rw - ext4 /dev/sda1 rw\n";
        assert!(mountinfo_lists(table, Path::new("/srv/minio data")));
        assert!(mountinfo_lists(table, Path::new("/var/lib/etcd")));
        assert!(!mountinfo_lists(table, Path::new("/var/lib")));
    }

    #[test]
    fn bad_exclude_pattern_is_named() {
        let err = excludes(&["a[".into()]).unwrap_err();
        assert!(err.to_string().contains("a["), "{err}");
        assert!(matches!(err, ExcludeError::Pattern { .. }), "{err:?}");
    }
}
