//! The `files` kind end to end (a MinIO data directory): backup through the coordinator as
//! a tar stream, restore into staging replacing an older tree; every file byte-identical
//! with its mode, mtime and owner, links kept as links, excludes left out; stock
//! `age -d | zstd -d | tar -t` reads the stored file; a restore that fails after unpacking
//! leaves the target as it was and nothing beside it; `compression_level` changes what is
//! stored, zstd's own decoder reads every level, and a level out of range is refused.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_tests::*;

/// One entry of a tree as a user would compare it.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Dir {
        mode: u32,
        uid: u32,
    },
    File {
        mode: u32,
        uid: u32,
        mtime: i64,
        content: Vec<u8>,
    },
    Link(PathBuf),
}

/// Every entry under `root` by relative path.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_owned();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.file_type().is_symlink() {
                out.insert(rel, Entry::Link(fs::read_link(&p).unwrap()));
            } else if m.is_dir() {
                out.insert(
                    rel,
                    Entry::Dir {
                        mode: m.mode() & 0o7777,
                        uid: m.uid(),
                    },
                );
                walk(root, &p, out);
            } else {
                out.insert(
                    rel,
                    Entry::File {
                        mode: m.mode() & 0o7777,
                        uid: m.uid(),
                        mtime: m.mtime(),
                        content: fs::read(&p).unwrap(),
                    },
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// A MinIO-like data directory: buckets with objects and `xl.meta` files, a 5 MiB object
/// of varied bytes, an empty file, odd modes and owners, a link, a long name, and a
/// `.minio.sys/tmp` directory that the config excludes.
fn seed(root: &Path) {
    let obj = root.join("photos/2026/cat.jpg");
    fs::create_dir_all(&obj).unwrap();
    let big = incompressible(5 * 1024 * 1024, 0x2545_F491_4F6C_DD1D);
    fs::write(obj.join("part.1"), &big).unwrap();
    fs::write(obj.join("xl.meta"), b"XL2 1 meta").unwrap();
    fs::create_dir_all(root.join("docs")).unwrap();
    fs::write(root.join("docs/empty"), b"").unwrap();
    fs::write(root.join("docs/secret.txt"), b"only the owner").unwrap();
    fs::set_permissions(
        root.join("docs/secret.txt"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::os::unix::fs::chown(root.join("docs/secret.txt"), Some(65534), Some(65534)).unwrap();
    fs::set_permissions(root.join("docs"), fs::Permissions::from_mode(0o750)).unwrap();
    symlink("../photos/2026/cat.jpg/xl.meta", root.join("docs/latest")).unwrap();
    let long = "n".repeat(150);
    fs::write(root.join("docs").join(&long), b"a long name").unwrap();
    fs::create_dir_all(root.join(".minio.sys/tmp/upload")).unwrap();
    fs::write(root.join(".minio.sys/tmp/upload/chunk"), b"half an upload").unwrap();
    fs::write(root.join(".minio.sys/format.json"), b"{\"version\":\"1\"}").unwrap();
    // A fixed mtime, so that the comparison also checks mtimes survive.
    let status = Command::new("touch")
        .args(["-h", "-d", "2024-02-29 12:34:56"])
        .arg(obj.join("part.1"))
        .status()
        .unwrap();
    assert!(status.success());
}

fn deploy() -> (Deployment, PathBuf, PathBuf) {
    let mut paths = None;
    let d = Deployment::start_with("SELECT 1", |d| {
        let source = d.dir.path().join("minio-prod/data");
        let target = d.dir.path().join("minio-stage/data");
        fs::create_dir_all(&source).unwrap();
        fs::create_dir_all(&target).unwrap();
        append(
            &d.prod_config,
            &format!(
                "[[datastores]]\nname = \"minio\"\nkind = \"files\"\npath = \"{}\"\nexclude = [\".minio.sys/tmp\"]\n",
                source.display()
            ),
        );
        append(
            &d.stage_config,
            &format!(
                "[[datastores]]\nname = \"minio\"\nkind = \"files\"\npath = \"{}\"\n",
                target.display()
            ),
        );
        paths = Some((source, target));
    });
    let (source, target) = paths.unwrap();
    (d, source, target)
}

fn siblings(target: &Path) -> Vec<String> {
    fs::read_dir(target.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("ferry"))
        .collect()
}

#[test]
fn files_backup_then_restore_is_identical_with_modes_owners_links_and_excludes() {
    let (d, source, target) = deploy();
    seed(&source);
    fs::write(target.join("stale-object"), b"from an older restore").unwrap();

    let out = d.ferry_ok(&["backup", "pg-prod", "minio", "--wait"]);
    assert!(out.contains("6 files"), "{out}");
    let (name, manifest) = d.todays_backup("minio", "tar.zst.age");
    assert_eq!(manifest["counts"]["files"], 6, "{manifest}");
    assert_eq!(manifest["counts"]["symlinks"], 1, "{manifest}");

    // Stock tools read the stored file: age, zstd, tar.
    let listing = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; age -d -i {} {} | zstd -d | tar -tv",
            d.identity.display(),
            d.sshd.root().join(&name).display()
        ))
        .output()
        .unwrap();
    assert!(
        listing.status.success(),
        "{}",
        String::from_utf8_lossy(&listing.stderr)
    );
    let listing = String::from_utf8(listing.stdout).unwrap();
    assert!(listing.contains("photos/2026/cat.jpg/part.1"), "{listing}");
    assert!(!listing.contains(".minio.sys/tmp"), "{listing}");

    let out = d.ferry_ok(&["restore", "pg-stage", "--datastore", "minio", "--wait"]);
    assert!(out.contains("equal to the manifest"), "{out}");
    let mut expected = snapshot(&source);
    expected.retain(|p, _| !p.starts_with(".minio.sys/tmp"));
    let got = snapshot(&target);
    assert_eq!(
        expected.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    for (path, entry) in &expected {
        assert_eq!(Some(entry), got.get(path), "{}", path.display());
    }
    assert!(!target.join("stale-object").exists());
    assert_eq!(
        fs::metadata(&target).unwrap().mode() & 0o7777,
        fs::metadata(&source).unwrap().mode() & 0o7777
    );
    assert!(siblings(&target).is_empty(), "{:?}", siblings(&target));
}

#[test]
fn files_restore_that_fails_after_unpacking_leaves_the_target_as_it_was() {
    let (d, source, target) = deploy();
    seed(&source);
    fs::write(target.join("live-object"), b"staging's current data").unwrap();
    let before = snapshot(&target);
    d.ferry_ok(&["backup", "pg-prod", "minio", "--wait"]);

    // The manifest now promises one file more than the archive holds: the restore unpacks
    // everything, counts, and must refuse to swap.
    d.edit_todays_manifest("minio", "tar.zst.age", |m| {
        m["counts"]["files"] = serde_json::json!(7);
    });

    let out = d.ferry(&["restore", "pg-stage", "--datastore", "minio", "--wait"]);
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("differs from the manifest"), "{text}");
    assert_eq!(before, snapshot(&target), "the target changed");
    assert!(
        siblings(&target).is_empty(),
        "left beside the target: {:?}",
        siblings(&target)
    );
}

/// Every file and link under `root` (directories left out) with mode, mtime and content,
/// owners left out: an rsync mirror is written by the backup server's unprivileged user.
fn content(root: &Path) -> BTreeMap<PathBuf, Entry> {
    snapshot(root)
        .into_iter()
        .filter_map(|(p, e)| match e {
            Entry::Dir { .. } => None,
            Entry::File {
                mode,
                mtime,
                content,
                ..
            } => Some((
                p,
                Entry::File {
                    mode,
                    uid: 0,
                    mtime,
                    content,
                },
            )),
            link => Some((p, link)),
        })
        .collect()
}

#[test]
fn rsync_mirror_sends_only_changes_and_restores_the_latest_state() {
    let mut paths = None;
    let d = Deployment::start_with("SELECT 1", |d| {
        let source = d.dir.path().join("share-prod/data");
        let target = d.dir.path().join("share-stage/data");
        fs::create_dir_all(&source).unwrap();
        fs::create_dir_all(&target).unwrap();
        append(
            &d.prod_config,
            &format!(
                "[[datastores]]\nname = \"share\"\nkind = \"files\"\nmethod = \"rsync\"\npath = \"{}\"\nexclude = [\"/.minio.sys/tmp\"]\n",
                source.display()
            ),
        );
        append(
            &d.stage_config,
            &format!(
                "[[datastores]]\nname = \"share\"\nkind = \"files\"\nmethod = \"rsync\"\npath = \"{}\"\n",
                target.display()
            ),
        );
        // rsync logs in with keys of its own, confined by rrsync as the Ansible role does:
        // production may only write into its environment, staging only read from it.
        let env_dir = d.sshd.root().join("production");
        fs::create_dir_all(&env_dir).unwrap();
        run_ok(Command::new("chown").arg(BACKUP_USER).arg(&env_dir));
        for (config, name, mode) in [
            (&d.prod_config, "id_prod_rsync", "-wo"),
            (&d.stage_config, "id_stage_rsync", "-ro"),
        ] {
            let key = d.sshd.add_client_key_named(
                name,
                &format!(
                    "restrict,command=\"rrsync {mode} -absolute {}\"",
                    env_dir.display()
                ),
            );
            append(
                config,
                &format!(
                    "[backup_server.rsync]\nuser = \"{BACKUP_USER}\"\nprivate_key_file = \"{}\"\n",
                    key.display()
                ),
            );
        }
        paths = Some((source, target));
    });
    let (source, target) = paths.unwrap();
    seed(&source);
    fs::write(target.join("stale"), b"older staging data").unwrap();

    let out = d.ferry_ok(&["backup", "pg-prod", "share", "--wait"]);
    assert!(out.contains("rsync mirror: 6 files"), "{out}");
    let mirror = d.sshd.root().join("production/share");
    let mut expected = content(&source);
    expected.retain(|p, _| !p.starts_with(".minio.sys/tmp"));
    let mut mirrored = content(&mirror);
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(mirror.join(".ferry-manifest.json")).unwrap()).unwrap();
    mirrored.remove(Path::new(".ferry-manifest.json"));
    assert_eq!(expected, mirrored, "the mirror differs from the source");
    assert!(
        manifest["bytes_sent"].as_u64().unwrap() >= 5 * 1024 * 1024,
        "{manifest}"
    );

    // A change, a new file and a deletion: the second sync sends only what changed.
    fs::write(source.join("docs/new.txt"), b"added later").unwrap();
    fs::write(source.join("photos/2026/cat.jpg/xl.meta"), b"XL2 2 meta").unwrap();
    fs::remove_file(source.join("docs/empty")).unwrap();
    d.ferry_ok(&["backup", "pg-prod", "share", "--wait"]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(mirror.join(".ferry-manifest.json")).unwrap()).unwrap();
    assert!(
        manifest["bytes_sent"].as_u64().unwrap() < 64 * 1024,
        "{manifest}"
    );
    assert!(
        !mirror.join("docs/empty").exists(),
        "--delete did not delete"
    );

    let listed = d.ferry_ok(&["backups"]);
    assert!(listed.contains("production/share"), "{listed}");

    // The production rsync key can neither read the mirror nor write outside its
    // environment; the staging one cannot write.
    let rsync_as = |key: &str, args: &[String]| {
        let ssh = format!(
            "ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -o UserKnownHostsFile={} -p {} -i {}",
            d.sshd.known_hosts().display(),
            d.sshd.port(),
            d.sshd.dir().join(key).display()
        );
        Command::new("rsync")
            .args(["-a", "-e", &ssh])
            .args(args)
            .output()
            .unwrap()
    };
    let remote = |p: &Path| format!("{BACKUP_USER}@{}:{}", d.sshd.host(), p.display());
    let scratch = d.dir.path().join("pulled");
    let pull = rsync_as(
        "id_prod_rsync",
        &[remote(&mirror), scratch.display().to_string()],
    );
    assert!(!pull.status.success(), "production read the mirror");
    assert!(!scratch.join("docs").exists());
    let outside = d.sshd.root().join("staging");
    let push = rsync_as(
        "id_prod_rsync",
        &[source.display().to_string(), remote(&outside)],
    );
    assert!(
        !push.status.success(),
        "production wrote outside its environment"
    );
    assert!(!outside.exists());
    let push = rsync_as(
        "id_stage_rsync",
        &[
            source.join("docs/new.txt").display().to_string(),
            remote(&mirror.join("docs/evil.txt")),
        ],
    );
    assert!(!push.status.success(), "staging wrote into the mirror");
    assert!(!mirror.join("docs/evil.txt").exists());

    let out = d.ferry_ok(&["restore", "pg-stage", "--datastore", "share", "--wait"]);
    assert!(out.contains("equal to the mirror's manifest"), "{out}");
    let mut expected = content(&source);
    expected.retain(|p, _| !p.starts_with(".minio.sys/tmp"));
    assert_eq!(expected, content(&target));
    assert!(!target.join("stale").exists());
    assert!(siblings(&target).is_empty(), "{:?}", siblings(&target));

    // A mirror holds only its last sync: another date is refused.
    let out = d.ferry(&[
        "restore",
        "pg-stage",
        "--datastore",
        "share",
        "--date",
        "2026-01-01",
        "--wait",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("holding only its last sync")
            || String::from_utf8_lossy(&out.stderr).contains("holding only its last sync"),
        "{out:?}"
    );
}

#[test]
fn upload_rate_is_held_to_max_upload_bytes_per_second() {
    let mut source = None;
    let d = Deployment::start_with("SELECT 1", |d| {
        let dir = d.dir.path().join("blobs");
        fs::create_dir_all(&dir).unwrap();
        let config = fs::read_to_string(&d.prod_config).unwrap().replace(
            "[backup_server]\n",
            "[backup_server]\nmax_upload_bytes_per_second = 1048576\n",
        );
        fs::write(&d.prod_config, config).unwrap();
        append(
            &d.prod_config,
            &format!(
                "[[datastores]]\nname = \"blobs\"\nkind = \"files\"\npath = \"{}\"\n",
                dir.display()
            ),
        );
        source = Some(dir);
    });
    // 3 MiB that zstd cannot shrink.
    let data = incompressible(3 * 1024 * 1024, 0x9E37_79B9_7F4A_7C15);
    fs::write(source.unwrap().join("random.bin"), &data).unwrap();
    let started = std::time::Instant::now();
    d.ferry_ok(&["backup", "pg-prod", "blobs", "--wait"]);
    let elapsed = started.elapsed();
    let (name, _) = d.todays_backup("blobs", "tar.zst.age");
    let stored = fs::metadata(d.sshd.root().join(name)).unwrap().len();
    assert!(stored > 3 * 1024 * 1024, "{stored}");
    // A lower bound only: a loaded machine makes it slower, never faster.
    let floor = std::time::Duration::from_secs_f64(stored as f64 / 1_048_576.0 * 0.9);
    assert!(
        elapsed >= floor,
        "{stored} bytes uploaded in {elapsed:?} despite a limit of 1 MiB/s"
    );
}

/// `len` bytes of order notes, the kind of text a database dump holds: sentences of words
/// and small numbers drawn from a fixed generator, on which zstd's levels 1, 3 and 9 store
/// visibly different sizes.
fn order_lines(len: usize) -> Vec<u8> {
    const WORDS: [&str; 24] = [
        "delivery",
        "customer",
        "invoice",
        "package",
        "address",
        "returned",
        "express",
        "warehouse",
        "payment",
        "refund",
        "coupon",
        "fragile",
        "please",
        "call",
        "before",
        "after",
        "door",
        "neighbour",
        "office",
        "reception",
        "glass",
        "books",
        "kitchen",
        "garden",
    ];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::with_capacity(len + 256);
    let mut id = 0u64;
    while out.len() < len {
        id += 1;
        let r = next();
        out.extend_from_slice(format!("{id}\t{}\t", r % 500).as_bytes());
        for i in 0..4 + r % 6 {
            let w = WORDS[(next() % WORDS.len() as u64) as usize];
            out.extend_from_slice(if i == 0 { b"" } else { b" " });
            out.extend_from_slice(w.as_bytes());
        }
        out.push(b'\n');
    }
    out.truncate(len);
    out
}

#[test]
fn compression_level_changes_what_is_stored_and_zstd_reads_every_level_back() {
    let (mut d, source, target) = deploy();
    let data = order_lines(6 * 1024 * 1024);
    fs::write(source.join("orders.tsv"), &data).unwrap();

    // The default (3), then 1 and 9, each read back by the stock age and zstd.
    let mut stored = Vec::new();
    for level in [None, Some(1), Some(9)] {
        if let Some(level) = level {
            set_top_level(&d.prod_config, "compression_level", &level.to_string());
            d.start_agent("agent-prod");
        }
        let before = d.sshd.final_files();
        d.ferry_ok(&["backup", "pg-prod", "minio", "--wait"]);
        // The day's first backup takes the day's name, later ones the instant's.
        let new: Vec<String> = d
            .sshd
            .final_files()
            .into_iter()
            .filter(|f| !before.contains(f) && f.ends_with(".tar.zst.age"))
            .collect();
        assert_eq!(new.len(), 1, "level {level:?}: {new:?}");
        let path = d.sshd.root().join(&new[0]);
        // A tar holds a regular file's bytes in one run: found whole in the plaintext.
        let tar = age_zstd_decrypt(&path, &d.identity);
        assert!(
            contains_bytes(&tar, &data),
            "level {level:?}: age -d | zstd -d gave a tar without orders.tsv's bytes"
        );
        stored.push(fs::metadata(&path).unwrap().len());
    }
    eprintln!("stored bytes at levels 3, 1, 9: {stored:?}");
    let [default, fast, small] = stored[..] else {
        unreachable!()
    };
    assert!(
        small < default && default < fast,
        "stored bytes at levels 3, 1, 9: {stored:?}"
    );

    // The level-9 backup restores byte for byte.
    d.ferry_ok(&["restore", "pg-stage", "--datastore", "minio", "--wait"]);
    assert!(fs::read(target.join("orders.tsv")).unwrap() == data);

    // Out of range: `ferry-agent check` refuses it, naming the key and the range.
    set_top_level(&d.prod_config, "compression_level", "10");
    let check = agent_check(&d.prod_config);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        !check.status.success()
            && text.contains("compression_level")
            && text.contains("levels 1 to 9"),
        "{text}"
    );
}
