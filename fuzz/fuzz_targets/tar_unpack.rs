//! The restore-side tar unpack (`agent/src/datastore/common/tree.rs`, `unpack`) on arbitrary
//! bytes, into `target/` inside a parent temp dir that also holds a sentinel file.
//! Properties, whether the unpack succeeds or not:
//!
//! - nothing is created, removed or changed outside `target/`: the parent holds exactly
//!   `sentinel` and `target`, `target` is still a directory (not a link), and the
//!   sentinel keeps its content, mode and single link (no hard link was made to it);
//! - it never panics.
//!
//! Runs as root in CI, as the agent does (owners are restored then).
#![no_main]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::OnceLock;

use ferry_agent::datastore::common::tree;
use libfuzzer_sys::fuzz_target;

const SENTINEL: &[u8] = b"outside the target: must never change\n";

fn parent() -> &'static Path {
    static PARENT: OnceLock<tempfile::TempDir> = OnceLock::new();
    PARENT
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir");
            fs::write(dir.path().join("sentinel"), SENTINEL).expect("sentinel");
            fs::set_permissions(
                dir.path().join("sentinel"),
                fs::Permissions::from_mode(0o640),
            )
            .expect("chmod sentinel");
            dir
        })
        .path()
}

/// Removes `dir` even where the archive left directories without write or search
/// permission (as a non-root user).
fn remove_tree(dir: &Path) {
    if fs::remove_dir_all(dir).is_ok() {
        return;
    }
    for entry in walk(dir) {
        let _ = fs::set_permissions(&entry, fs::Permissions::from_mode(0o700));
    }
    fs::remove_dir_all(dir).expect("remove the unpacked tree");
}

/// Every directory under `dir`, `dir` included, without following links.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_owned()];
    let mut i = 0;
    while i < out.len() {
        let d = out[i].clone();
        let _ = fs::set_permissions(&d, fs::Permissions::from_mode(0o700));
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let parent = parent();
    let target = parent.join("target");
    fs::create_dir(&target).expect("create target");
    let _ = tree::unpack(data, &target);

    let mut names: Vec<String> = fs::read_dir(parent)
        .expect("list parent")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["sentinel", "target"],
        "unpack created outside target/"
    );
    let meta = fs::symlink_metadata(&target).expect("target");
    assert!(
        meta.is_dir(),
        "target/ was replaced: {:?}",
        meta.file_type()
    );
    let sentinel = parent.join("sentinel");
    let meta = fs::symlink_metadata(&sentinel).expect("sentinel");
    assert!(meta.is_file());
    assert_eq!(meta.mode() & 0o7777, 0o640, "sentinel mode changed");
    assert_eq!(meta.nlink(), 1, "a hard link to the sentinel was made");
    assert_eq!(fs::read(&sentinel).expect("read sentinel"), SENTINEL);
    remove_tree(&target);
});
