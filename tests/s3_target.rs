//! Ferry's S3 target (`kind = "s3"` in `ferry-storage`) against a real Ceph RGW, with the
//! bucket policy of `docs/s3-bucket-policy.json` and the three credential sets of issue 17;
//! everything Ferry wrote is read back with the stock client (boto3, `tests/tools/s3.py`):
//! - a write session's object equals the stream (content and SHA-256 read with boto3), its
//!   key is the layout's path under the prefix, nothing is visible before the commit, and a
//!   20 MiB stream is stored in three parts (8 + 8 + 4 MiB);
//! - an abandoned session and a cancelled one leave no object and no multipart upload;
//! - a read session with staging's credentials lists, sizes, reads and streams; production's
//!   are refused;
//! - a maintenance session finds and removes the leftovers (an in-progress multipart upload,
//!   an object without manifest), extends a lock without ever shortening it, and removes a
//!   dated folder with its versions; staging's credentials may not.

use std::sync::Arc;
use std::sync::mpsc::Receiver;

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use ferry_core::layout::StoredFile;
use ferry_core::manifest::Manifest;
use ferry_storage::{
    LeftoverKind, PartialFate, Staged, Target, TargetConfig, TargetError, WriteSession, chunk,
};
use ferry_tests::*;

/// The prefix every test's target writes under.
const PREFIX: &str = "ferry";

/// A target on `bucket` with `user`'s keys in files of mode 0600 (kept in `dir`), locking.
fn target(
    c: &CephCluster,
    bucket: &str,
    user: &S3User,
    dir: &tempfile::TempDir,
) -> Arc<dyn Target> {
    target_at(
        c.endpoint(),
        bucket,
        user,
        dir,
        json!({"lock": {"mode": "compliance"}}),
    )
}

/// A target on `bucket` at `endpoint` with `user`'s keys (files in `dir`) and the keys of
/// `extra` (an object) added to its config.
fn target_at(
    endpoint: String,
    bucket: &str,
    user: &S3User,
    dir: &tempfile::TempDir,
    extra: Value,
) -> Arc<dyn Target> {
    let (access, secret) = key_files(user, dir.path());
    let mut config = json!({
        "kind": "s3",
        "endpoint": endpoint,
        "bucket": bucket,
        "prefix": PREFIX,
        "path_style": true,
        "access_key_file": access,
        "secret_key_file": secret,
        "io_timeout_seconds": 30,
        "connect_timeout_seconds": 5,
    });
    for (k, v) in extra.as_object().expect("extra keys are an object") {
        config[k] = v.clone();
    }
    let config: TargetConfig =
        serde_json::from_value(config).expect("the S3 target's config parses");
    config.build().expect("the S3 target's config is valid")
}

/// The file of `name` in `environment`'s folder of `date` on `target`.
fn file(target: &dyn Target, environment: &str, date: &str, name: &str) -> StoredFile {
    StoredFile {
        dir: target.dated_dir(environment, date.parse().unwrap()),
        name: name.to_owned(),
    }
}

/// A chunk channel fed with `data` in chunks of [`chunk::CHUNK_BYTES`] by a thread.
fn feed(data: Vec<u8>) -> Receiver<Vec<u8>> {
    let (tx, rx) = chunk::channel();
    std::thread::spawn(move || {
        for piece in data.chunks(chunk::CHUNK_BYTES) {
            if tx.send(piece.to_vec()).is_err() {
                return;
            }
        }
    });
    rx
}

/// Stages `data` as `file` on a new write session; the session and what it staged.
fn stage(target: &dyn Target, file: &StoredFile, data: &[u8]) -> (Box<dyn WriteSession>, Staged) {
    let mut w = target.write().expect("open a write session");
    let staged = w
        .stage(file, "01KBX8Z3E5M1Q2W3E4R5T6Y7U8", feed(data.to_vec()))
        .unwrap_or_else(|e| panic!("stage {}: {e}", file.path()));
    (w, staged)
}

/// A main part's manifest for `name` (the fuzz corpus's seed with the name set).
fn manifest(name: &str) -> Vec<u8> {
    let seed = include_bytes!("../fuzz/corpus/manifest/seed-main");
    let mut m = Manifest::from_slice("seed.json", seed).expect("the seed parses");
    m.file = name.into();
    m.part = String::new();
    m.companions = Vec::new();
    m.to_json()
}

/// The current version id of `key`, read with boto3 as staging (`head_object`).
fn version_of(c: &CephCluster, bucket: &str, key: &str) -> String {
    let head = c.s3_ok(
        &c.roles().staging,
        "head_object",
        json!({"Bucket": bucket, "Key": key}),
    );
    head["VersionId"]
        .as_str()
        .unwrap_or_else(|| panic!("no VersionId: {head}"))
        .to_owned()
}

/// What the target stores as the manifest of `file` committed with [`manifest`]: that
/// manifest with the version id of `file`'s current version (read with boto3).
fn stored_manifest(c: &CephCluster, bucket: &str, file: &StoredFile) -> Vec<u8> {
    let mut m = Manifest::from_slice("seed.json", &manifest(&file.name)).unwrap();
    m.version_id = Some(version_of(c, bucket, &file.path()));
    m.to_json()
}

/// Writes and commits a backup of `data` as `file`, its manifest beside it.
fn commit(target: &dyn Target, file: &StoredFile, data: &[u8]) {
    let (mut w, staged) = stage(target, file, data);
    w.commit(
        "01KBX8Z3E5M1Q2W3E4R5T6Y7U8",
        &[(staged, manifest(&file.name))],
    )
    .unwrap_or_else(|e| panic!("commit {}: {e}", file.path()));
}

/// The keys of `bucket`, listed with boto3 as staging.
fn keys(c: &CephCluster, bucket: &str) -> Vec<String> {
    let listed = c.s3_ok(
        &c.roles().staging,
        "list_objects_v2",
        json!({"Bucket": bucket}),
    );
    listed["Contents"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|o| o["Key"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The in-progress multipart uploads of `bucket`, listed with boto3 as maintenance:
/// `(key, upload id)`.
fn uploads(c: &CephCluster, bucket: &str) -> Vec<(String, String)> {
    let listed = c.s3_ok(
        &c.roles().maintenance,
        "list_multipart_uploads",
        json!({"Bucket": bucket}),
    );
    listed["Uploads"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|u| {
                    (
                        u["Key"].as_str().unwrap_or_default().to_owned(),
                        u["UploadId"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The object `key` read with boto3 as staging.
fn get(c: &CephCluster, bucket: &str, key: &str) -> Result<Value, S3Error> {
    c.s3(
        &c.roles().staging,
        "get_object",
        json!({"Bucket": bucket, "Key": key}),
    )
}

/// `now + days`, to the second.
fn in_days(days: i64) -> DateTime<Utc> {
    (Utc::now() + chrono::Duration::days(days)).trunc_subsecs(0)
}

/// The retain-until of `key`'s current version read with boto3 as maintenance.
fn retain_until(c: &CephCluster, bucket: &str, key: &str) -> (String, DateTime<Utc>) {
    let r = c.s3_ok(
        &c.roles().maintenance,
        "get_object_retention",
        json!({"Bucket": bucket, "Key": key}),
    );
    let until = r["Retention"]["RetainUntilDate"]
        .as_str()
        .unwrap_or_else(|| panic!("no RetainUntilDate in {r}"));
    (
        r["Retention"]["Mode"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        DateTime::parse_from_rfc3339(until)
            .unwrap()
            .with_timezone(&Utc),
    )
}

#[test]
fn a_written_object_equals_the_stream_and_is_invisible_until_committed() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_bucket("write");
    let dir = tempfile::tempdir().unwrap();
    let production = target(c, &bucket, &roles.production, &dir);
    let name = "pg_backup_2026-12-05.pgdump.zst.age";
    let f = file(&*production, "production", "2026-12-05", name);
    let key = format!("{PREFIX}/production/2026-12-05/{name}");
    assert_eq!(f.path(), key, "the key is not SFTP's path under the prefix");

    // 20 MiB and a bit: parts of 8, 8 and 4 MiB and a bit.
    let data = incompressible((20 << 20) + 4096, 5);
    let (mut w, staged) = stage(&*production, &f, &data);
    assert_eq!(staged.bytes, data.len() as u64);
    // Staged: nothing visible, one multipart upload of the final key in progress.
    assert_eq!(
        keys(c, &bucket),
        Vec::<String>::new(),
        "visible before commit"
    );
    let e = get(c, &bucket, &key).unwrap_err();
    assert_eq!(e.code, "NoSuchKey", "{e}");
    let up = uploads(c, &bucket);
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(up[0].0, key);

    let json = manifest(name);
    w.commit("01KBX8Z3E5M1Q2W3E4R5T6Y7U8", &[(staged, json.clone())])
        .unwrap();
    let got = get(c, &bucket, &key).unwrap();
    assert_eq!(got["BodyLength"], data.len());
    assert_eq!(
        got["BodySha256"].as_str().unwrap(),
        hex::encode(Sha256::digest(&data)),
        "the object read with boto3 differs from the stream"
    );
    assert!(
        got["ETag"].as_str().unwrap().ends_with("-3\""),
        "not three parts: ETag {}",
        got["ETag"]
    );
    // The manifest as given, with the version id of the object it describes.
    let m = get(c, &bucket, &format!("{key}.json")).unwrap();
    assert_eq!(
        m["BodySha256"].as_str().unwrap(),
        hex::encode(Sha256::digest(stored_manifest(c, &bucket, &f))),
        "{m}"
    );
    assert_ne!(stored_manifest(c, &bucket, &f), json);
    assert_eq!(
        keys(c, &bucket),
        vec![key.clone(), format!("{key}.json")],
        "other objects than the backup and its manifest"
    );
    assert_eq!(
        uploads(c, &bucket),
        vec![],
        "multipart uploads left after commit"
    );
}

#[test]
fn four_parts_in_flight_store_the_stream_in_order_with_each_parts_md5() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_bucket("inflight");
    let dir = tempfile::tempdir().unwrap();
    let production = target_at(
        c.endpoint(),
        &bucket,
        &roles.production,
        &dir,
        json!({"parts_in_flight": 4}),
    );
    let name = "files_backup_2026-12-05.tar.zst.age";
    let f = file(&*production, "production", "2026-12-05", name);
    // Six full parts of 8 MiB and a short one: four in flight, the fifth fills once the
    // first has ended, in its buffer, so the buffers of the first parts carry later ones.
    let part = 8usize << 20;
    let data = incompressible(6 * part + 12345, 11);
    let (mut w, staged) = stage(&*production, &f, &data);
    assert_eq!(staged.bytes, data.len() as u64);
    w.commit("01KBX8Z3E5M1Q2W3E4R5T6Y7U9", &[(staged, manifest(name))])
        .unwrap();
    let got = get(c, &bucket, &f.path()).unwrap();
    assert_eq!(got["BodyLength"], data.len());
    assert_eq!(
        got["BodySha256"].as_str().unwrap(),
        hex::encode(Sha256::digest(&data)),
        "the object read with boto3 differs from the stream"
    );
    // S3's multipart ETag: the MD5 of the parts' MD5s in order, and their count.
    let mut md5s = Vec::new();
    for p in data.chunks(part) {
        md5s.extend_from_slice(&<md5::Md5 as md5::Digest>::digest(p));
    }
    let etag = format!(
        "\"{}-7\"",
        hex::encode(<md5::Md5 as md5::Digest>::digest(&md5s))
    );
    assert_eq!(
        got["ETag"].as_str().unwrap(),
        etag,
        "parts out of order or altered"
    );
    assert_eq!(uploads(c, &bucket), vec![], "multipart uploads left");
}

#[test]
fn an_abandoned_or_cancelled_upload_leaves_no_object_and_no_multipart_upload() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_bucket("abandon");
    let dir = tempfile::tempdir().unwrap();
    let production = target(c, &bucket, &roles.production, &dir);

    // Staged whole, then abandoned.
    let f = file(
        &*production,
        "production",
        "2026-12-05",
        "etcd_backup_2026-12-05.db.zst.age",
    );
    let (mut w, staged) = stage(&*production, &f, &incompressible(3 << 20, 7));
    assert_eq!(uploads(c, &bucket).len(), 1);
    assert_eq!(w.abandon(&[staged.partial]), vec![PartialFate::Removed]);
    assert_eq!(
        uploads(c, &bucket),
        vec![],
        "the abandoned multipart upload is left"
    );

    // Cancelled mid-stream, after a first part is stored.
    let f = file(
        &*production,
        "production",
        "2026-12-05",
        "files_backup_2026-12-05.tar.zst.age",
    );
    let mut w = production.write().unwrap();
    let aborter = w.aborter();
    let (tx, rx) = chunk::channel();
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let feeder = std::thread::spawn(move || {
        for _ in 0..12 {
            tx.send(vec![7u8; chunk::CHUNK_BYTES]).unwrap();
        }
        sent_tx.send(()).unwrap();
        // The session takes no more once cancelled; a few more chunks, then hang up.
        for _ in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(200));
            if tx.send(vec![7u8; chunk::CHUNK_BYTES]).is_err() {
                return;
            }
        }
    });
    let cancel = std::thread::spawn(move || {
        sent_rx.recv().unwrap();
        aborter.abort();
    });
    let e = w
        .stage(&f, "01KBX8Z3E5M1Q2W3E4R5T6Y7U8", rx)
        .expect_err("a cancelled upload fails");
    feeder.join().unwrap();
    cancel.join().unwrap();
    assert!(w.aborted());
    assert!(e.to_string().contains("cancelled"), "{e}");
    assert_eq!(w.take_unremoved(), Vec::<String>::new());
    assert_eq!(
        uploads(c, &bucket),
        vec![],
        "the cancelled multipart upload is left"
    );
    assert_eq!(
        keys(c, &bucket),
        Vec::<String>::new(),
        "an object is visible"
    );

    // Refused from the start (staging may not put): nothing either.
    let staging = target(c, &bucket, &roles.staging, &dir);
    let e = staging
        .write()
        .unwrap()
        .stage(&f, "01KBX8Z3E5M1Q2W3E4R5T6Y7U8", feed(vec![1; 100]))
        .expect_err("staging may not put");
    assert!(matches!(e, TargetError::PermissionDenied { .. }), "{e}");
    assert_eq!(uploads(c, &bucket), vec![]);
}

#[test]
fn staging_reads_what_production_wrote_and_production_may_not_read() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_bucket("read");
    let dir = tempfile::tempdir().unwrap();
    let production = target(c, &bucket, &roles.production, &dir);
    let name = "mongo_backup_2026-12-05.archive.zst.age";
    let f = file(&*production, "production", "2026-12-05", name);
    let data = incompressible((2 << 20) + 777, 11);
    commit(&*production, &f, &data);
    // Production's write session cannot tell that it exists (it may not read).
    assert!(!production.write().unwrap().exists(&f.path()).unwrap());

    let staging = target(c, &bucket, &roles.staging, &dir);
    let mut r = staging.read().unwrap();
    let mut names = r.list(&f.dir).unwrap();
    names.sort();
    assert_eq!(names, vec![name.to_owned(), format!("{name}.json")]);
    assert_eq!(
        r.list(&staging.environment_dir("production")).unwrap(),
        vec!["2026-12-05".to_owned()]
    );
    assert_eq!(
        r.list(&staging.environment_dir("staging")).unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(r.size(&f.path()).unwrap(), Some(data.len() as u64));
    assert_eq!(r.size(&format!("{}/missing", f.dir)).unwrap(), None);
    assert_eq!(
        r.read_small(&f.manifest_path(), 1 << 20).unwrap(),
        stored_manifest(c, &bucket, &f)
    );
    let e = r.read_small(&f.path(), 1000).unwrap_err();
    assert!(matches!(e, TargetError::TooLarge { .. }), "{e}");
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
    let collector = std::thread::spawn(move || {
        let mut all = Vec::new();
        for c in rx {
            assert!(c.len() <= chunk::CHUNK_BYTES);
            all.extend(c);
        }
        all
    });
    assert_eq!(r.download(&f.path(), tx).unwrap(), data.len() as u64);
    assert_eq!(
        Sha256::digest(collector.join().unwrap()),
        Sha256::digest(&data),
        "the stream read back differs"
    );

    let mut p = production.read().unwrap();
    for e in [
        p.list(&f.dir).unwrap_err(),
        p.read_small(&f.manifest_path(), 1 << 20).unwrap_err(),
    ] {
        assert!(matches!(e, TargetError::PermissionDenied { .. }), "{e}");
    }
}

#[test]
fn maintenance_removes_leftovers_and_folders_and_extends_locks_without_shortening() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_bucket("maintain");
    let dir = tempfile::tempdir().unwrap();
    let production = target(c, &bucket, &roles.production, &dir);
    let maintenance = target(c, &bucket, &roles.maintenance, &dir);
    let date = "2026-12-04";
    let kept = file(
        &*production,
        "production",
        date,
        "pg_backup_2026-12-04.pgdump.zst.age",
    );
    commit(&*production, &kept, b"a committed backup");
    // An object without manifest (a commit cut short), and an upload never completed.
    let orphan = file(
        &*production,
        "production",
        date,
        "pg_backup_2026-12-04T0300Z.pgdump.zst.age",
    );
    c.s3_ok(
        &roles.production,
        "put_object",
        json!({"Bucket": bucket, "Key": orphan.path(), "Body": "orphan"}),
    );
    let partial = file(
        &*production,
        "production",
        date,
        "etcd_backup_2026-12-04.db.zst.age",
    );
    let (_w, staged) = stage(&*production, &partial, b"never committed");

    let mut m = maintenance.maintain().unwrap();
    let mut found = m.leftovers("production").unwrap();
    found.sort_by(|a, b| a.path.cmp(&b.path));
    let got: Vec<(&str, &LeftoverKind)> =
        found.iter().map(|l| (l.path.as_str(), &l.kind)).collect();
    let orphan_path = orphan.path();
    let no_jobs = LeftoverKind::Partial { job_ids: vec![] };
    assert_eq!(
        got,
        vec![
            (staged.partial.as_str(), &no_jobs),
            (orphan_path.as_str(), &LeftoverKind::Orphan),
        ]
    );
    assert!(found.iter().all(|l| l.idle_seconds < 600 && l.date == date));
    for l in &found {
        m.remove_leftover(l).unwrap();
    }
    assert_eq!(
        uploads(c, &bucket),
        vec![],
        "the multipart upload was not aborted"
    );
    assert_eq!(
        keys(c, &bucket),
        vec![kept.path(), kept.manifest_path()],
        "the leftovers were not all removed, or more was"
    );
    assert_eq!(m.leftovers("production").unwrap(), vec![]);

    // Locks: set, never shortened, extended.
    let two = in_days(2);
    m.extend_lock(&kept.path(), two).unwrap();
    assert_eq!(
        retain_until(c, &bucket, &kept.path()),
        ("COMPLIANCE".into(), two)
    );
    m.extend_lock(&kept.path(), in_days(1)).unwrap();
    assert_eq!(
        retain_until(c, &bucket, &kept.path()).1,
        two,
        "a lock was shortened"
    );
    let three = in_days(3);
    m.extend_lock(&kept.path(), three).unwrap();
    assert_eq!(retain_until(c, &bucket, &kept.path()).1, three);
    // Locked: the folder cannot be removed, even by maintenance.
    assert!(m.remove_dated_folder("production", date).is_err());

    // An unlocked dated folder goes, every version of it; staging may not remove it.
    let old = file(
        &*production,
        "production",
        "2026-11-01",
        "pg_backup_2026-11-01.pgdump.zst.age",
    );
    commit(&*production, &old, b"an old backup");
    let old_manifest = stored_manifest(c, &bucket, &old);
    let e = staging_maintain(c, &bucket, &dir)
        .remove_dated_folder("production", "2026-11-01")
        .unwrap_err();
    assert!(matches!(e, TargetError::PermissionDenied { .. }), "{e}");
    let (objects, bytes) = m.remove_dated_folder("production", "2026-11-01").unwrap();
    assert_eq!(objects, 2);
    assert_eq!(
        bytes,
        b"an old backup".len() as u64 + old_manifest.len() as u64
    );
    let versions = c.s3_ok(
        &roles.maintenance,
        "list_object_versions",
        json!({"Bucket": bucket, "Prefix": format!("{PREFIX}/production/2026-11-01/")}),
    );
    assert!(
        versions["Versions"].as_array().is_none_or(|v| v.is_empty())
            && versions["DeleteMarkers"]
                .as_array()
                .is_none_or(|v| v.is_empty()),
        "versions left: {versions}"
    );

    // An archived WAL file goes with every version of it and its record (a second push of
    // the same name adds a version); its neighbour stays; staging may not remove one.
    let wal = format!("{PREFIX}/production/pg-wal/00000001");
    for (name, body) in [
        ("000000010000000000000002", "first push"),
        ("000000010000000000000002", "second push"),
        ("000000010000000000000003", "next"),
    ] {
        for (key, body) in [
            (format!("{wal}/{name}.zst.age"), body),
            (format!("{wal}/{name}.zst.age.json"), "{}"),
        ] {
            c.s3_ok(
                &roles.production,
                "put_object",
                json!({"Bucket": bucket, "Key": key, "Body": body}),
            );
        }
    }
    let segment = ferry_storage::ArchivedFile::Wal(
        ferry_core::wal::WalFileName::parse("000000010000000000000002").unwrap(),
    );
    let e = staging_maintain(c, &bucket, &dir)
        .remove_archived_file("production", "pg", &segment)
        .unwrap_err();
    assert!(matches!(e, TargetError::PermissionDenied { .. }), "{e}");
    assert!(
        m.remove_archived_file("../production", "pg", &segment)
            .is_err()
    );
    let bytes = m
        .remove_archived_file("production", "pg", &segment)
        .unwrap();
    assert_eq!(bytes, ("first push".len() + "second push".len()) as u64);
    let versions = c.s3_ok(
        &roles.maintenance,
        "list_object_versions",
        json!({"Bucket": bucket, "Prefix": format!("{wal}/")}),
    );
    let left: Vec<&str> = versions["Versions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v["Key"].as_str().unwrap())
        .collect();
    assert_eq!(
        left,
        [
            format!("{wal}/000000010000000000000003.zst.age"),
            format!("{wal}/000000010000000000000003.zst.age.json"),
        ],
        "{versions}"
    );
    assert!(
        versions["DeleteMarkers"]
            .as_array()
            .is_none_or(|v| v.is_empty()),
        "{versions}"
    );
}

/// A maintain session with staging's credentials.
fn staging_maintain(
    c: &CephCluster,
    bucket: &str,
    dir: &tempfile::TempDir,
) -> Box<dyn ferry_storage::MaintainSession> {
    target(c, bucket, &c.roles().staging, dir)
        .maintain()
        .unwrap()
}

/// `config`'s `[backup_server]` table replaced by an S3 one on `bucket` with `user`'s keys
/// (files of mode 0600 in `dir`).
fn with_s3_backup_server(
    config: &str,
    c: &CephCluster,
    bucket: &str,
    user: &S3User,
    dir: &std::path::Path,
) -> String {
    replace_backup_server(config, &s3_table("backup_server", c, bucket, user, dir, ""))
}

#[test]
fn a_production_agent_backs_up_to_the_bucket_and_a_staging_agent_restores_from_it() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_bucket("agents");
    let d = Deployment::start_with(DEFAULT_DATA, |d| {
        let dir = d.dir.path().to_owned();
        for (config, user) in [
            (&d.prod_config, &roles.production),
            (&d.stage_config, &roles.staging),
        ] {
            let text = std::fs::read_to_string(config).unwrap();
            std::fs::write(config, with_s3_backup_server(&text, c, &bucket, user, &dir)).unwrap();
        }
        // The coordinator's [maintenance] on the bucket, with the maintenance keys.
        let table =
            with_s3_backup_server("[backup_server]\n", c, &bucket, &roles.maintenance, &dir)
                .replace("[backup_server]", "[maintenance]");
        append(
            &d.coordinator_config,
            &format!("\n[[retention]]\nenvironment = \"production\"\nkeep_daily = 7\n\n{table}"),
        );
    });

    let out = d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    assert!(out.contains("succeeded"), "{out}");
    let day = Utc::now().format("%Y-%m-%d").to_string();
    // Production may not look in the bucket, so it names every backup to the second: a
    // second backup of the day never takes the first one's key.
    let main = d.ferry_json(&["backups"])[0]["stored_path"]
        .as_str()
        .unwrap()
        .to_owned();
    let stamp = main
        .strip_prefix(&format!("{PREFIX}/production/{day}/postgres_backup_"))
        .and_then(|rest| rest.strip_suffix(".pgdump.zst.age"))
        .unwrap_or_else(|| panic!("{main}"));
    assert!(
        stamp.len() == "2026-12-05T133044Z".len() && stamp.starts_with(&format!("{day}T")),
        "{main}"
    );
    let globals = format!("{PREFIX}/production/{day}/postgres-globals_backup_{stamp}.sql.zst.age");
    let mut want = vec![
        main.clone(),
        format!("{main}.json"),
        globals.clone(),
        format!("{globals}.json"),
    ];
    want.sort();
    assert_eq!(keys(c, &bucket), want, "the bucket holds other objects");
    assert_eq!(uploads(c, &bucket), vec![], "multipart uploads left");
    assert!(
        d.sshd.final_files().is_empty(),
        "the SFTP server was written to"
    );
    // The manifest, read with boto3, describes the object boto3 reads.
    let manifest: Value = serde_json::from_str(
        get(c, &bucket, &format!("{main}.json")).unwrap()["Body"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let archive = get(c, &bucket, &main).unwrap();
    assert_eq!(archive["BodySha256"], manifest["sha256"]);
    assert_eq!(archive["BodyLength"], manifest["bytes_stored"]);
    assert_eq!(manifest["version_id"], archive["VersionId"], "{manifest}");
    // A racing writer of the same key adds a version after the backup: the restore reads
    // the version the manifest records.
    c.s3_ok(
        &roles.production,
        "put_object",
        json!({"Bucket": bucket, "Key": main, "Body": "a racing write"}),
    );

    let out = d.ferry_ok(&["restore", "pg-stage", "--wait"]);
    assert!(out.contains("equal to the manifest"), "{out}");
    let source = d.prod_pg.table_fingerprints("app");
    assert_eq!(source.len(), 4, "{source:?}");
    assert_eq!(
        d.stage_pg.table_fingerprints("app"),
        source,
        "restored content differs from the source"
    );

    // `ferry prune` lists, through the coordinator's maintenance keys, what failed uploads
    // left in the bucket: an upload never completed and an object without manifest, both
    // young, so kept (24 h and 5 min); the backup is no leftover.
    let keys_dir = tempfile::tempdir().unwrap();
    let production = target(c, &bucket, &roles.production, &keys_dir);
    let partial = file(
        &*production,
        "production",
        &day,
        &format!("etcd_backup_{day}.db.zst.age"),
    );
    let (_w, staged) = stage(&*production, &partial, b"never committed");
    let orphan = format!("{PREFIX}/production/{day}/postgres_backup_{day}T0300Z.pgdump.zst.age");
    c.s3_ok(
        &roles.production,
        "put_object",
        json!({"Bucket": bucket, "Key": orphan, "Body": "cut short"}),
    );
    let plan = d.ferry_json(&["prune", "--dry-run"]);
    let mut found: Vec<(String, String, bool)> = plan
        .as_array()
        .unwrap_or_else(|| panic!("prune printed no list: {plan}"))
        .iter()
        .flat_map(|d| d["leftovers"].as_array().cloned().unwrap_or_default())
        .map(|l| {
            (
                l["path"].as_str().unwrap_or_default().to_owned(),
                l["kind"].as_str().unwrap_or_default().to_owned(),
                l["remove"].as_bool().unwrap_or(true),
            )
        })
        .collect();
    found.sort();
    assert_eq!(
        found,
        vec![
            (staged.partial.clone(), "partial".to_owned(), false),
            (orphan.clone(), "orphan".to_owned(), false),
        ],
        "{plan}"
    );
    d.ferry_json(&["prune"]);
    assert_eq!(uploads(c, &bucket).len(), 1, "a young upload was aborted");
    want.push(orphan);
    want.sort();
    assert_eq!(
        keys(c, &bucket),
        want,
        "prune removed a young object or the backup"
    );
}

#[test]
fn agent_check_proves_what_each_agent_may_do_and_leaves_nothing_in_the_bucket() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_bucket("check");
    let d = Deployment::start_with(DEFAULT_DATA, |_| {});
    let dir = d.dir.path().to_owned();
    let check = |base: &std::path::Path, user: &S3User| {
        let text = std::fs::read_to_string(base).unwrap();
        let config = base.with_file_name(format!("check-{}.toml", user.uid));
        std::fs::write(
            &config,
            with_s3_backup_server(&text, c, &bucket, user, &dir),
        )
        .unwrap();
        let out = std::process::Command::new(bin("ferry-agent"))
            .arg("check")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let server = text
            .lines()
            .find(|l| l.starts_with("backup server:"))
            .unwrap_or_else(|| panic!("no backup server line: {text}"))
            .to_owned();
        println!("{} with {}'s keys: {server}", base.display(), user.uid);
        (out.status.success(), server, text)
    };
    let wrong = S3User {
        uid: "nobody".into(),
        access_key: "FERRYNOSUCHKEY000000".into(),
        secret_key: "not-a-secret-the-endpoint-knows".into(),
    };

    // Production with its put-only keys: passes by starting and aborting an upload.
    let (ok, line, all) = check(&d.prod_config, &roles.production);
    assert!(ok, "{all}");
    assert!(
        line.contains("put-only credentials: an upload may start in ferry/production")
            && line.contains("started and aborted"),
        "{all}"
    );
    // Staging with its list-and-get keys: lists its source environment's folder.
    let (ok, line, all) = check(&d.stage_config, &roles.staging);
    assert!(ok, "{all}");
    assert!(
        line.contains("ferry/production holds") && line.contains("restores read from it"),
        "{all}"
    );
    // Wrong keys fail plainly, on either agent; staging's keys on production may not put.
    for (config, user, want) in [
        (&d.prod_config, &wrong, "does not know these keys"),
        (&d.stage_config, &wrong, "does not know these keys"),
        (&d.prod_config, &roles.staging, "permission denied"),
    ] {
        let (ok, line, all) = check(config, user);
        assert!(!ok, "{all}");
        assert!(
            line.starts_with("backup server: FAILED") && line.contains(want),
            "{}: {all}",
            user.uid
        );
    }

    // Nothing is left: no object, version, delete marker or multipart upload.
    let versions = c.s3_ok(
        &roles.maintenance,
        "list_object_versions",
        json!({"Bucket": bucket}),
    );
    assert!(
        versions["Versions"].as_array().is_none_or(|v| v.is_empty())
            && versions["DeleteMarkers"]
                .as_array()
                .is_none_or(|v| v.is_empty()),
        "the check left versions: {versions}"
    );
    assert_eq!(uploads(c, &bucket), vec![], "the check left an upload");
}

#[test]
fn the_rgw_refuses_a_part_whose_content_md5_differs() {
    // What the write session's per-part checksum rests on: RGW checks each part's
    // Content-MD5 against the bytes it received.
    let c = CephCluster::shared();
    let p = &c.roles().production;
    let bucket = c.ferry_bucket("md5");
    let key = format!("{PREFIX}/production/2026-12-05/x.age");
    let up = c.s3_ok(
        p,
        "create_multipart_upload",
        json!({"Bucket": bucket, "Key": key}),
    );
    let upload_id = up["UploadId"].as_str().unwrap();
    let e = c
        .s3(
            p,
            "upload_part",
            json!({
                "Bucket": bucket, "Key": key, "UploadId": upload_id, "PartNumber": 1,
                "Body": "the bytes sent",
                // The MD5 of other bytes ("other bytes").
                "ContentMD5": "bv80UBBUl8ws4i6iZ/Vkug==",
            }),
        )
        .expect_err("a part with a wrong Content-MD5 was stored");
    assert_eq!(e.code, "BadDigest", "{e}");
    c.s3_ok(
        p,
        "abort_multipart_upload",
        json!({"Bucket": bucket, "Key": key, "UploadId": upload_id}),
    );
}

/// In a child process of [`credentials_come_from_the_aws_chain_without_key_files`]:
/// `FERRY_S3_CHILD` holds `endpoint bucket key`; writes `key` through a target without key
/// files, so that the standard AWS chain (this process's environment) gives the keys.
fn chain_child() -> bool {
    let Ok(args) = std::env::var("FERRY_S3_CHILD") else {
        return false;
    };
    let [endpoint, bucket, name]: [&str; 3] = args
        .split(' ')
        .collect::<Vec<_>>()
        .try_into()
        .expect("FERRY_S3_CHILD: endpoint bucket name");
    let config: TargetConfig = serde_json::from_value(json!({
        "kind": "s3", "endpoint": endpoint, "bucket": bucket, "prefix": PREFIX,
        "path_style": true,
    }))
    .unwrap();
    let target = config.build().unwrap();
    let f = file(&*target, "production", "2026-12-05", name);
    commit(&*target, &f, name.as_bytes());
    true
}

#[test]
fn credentials_come_from_the_aws_chain_without_key_files() {
    if chain_child() {
        return;
    }
    let c = CephCluster::shared();
    let p = &c.roles().production;
    let bucket = c.ferry_bucket("chain");
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("credentials");
    std::fs::write(
        &profile,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            p.access_key, p.secret_key
        ),
    )
    .unwrap();
    let run = |name: &str, env: &[(&str, &std::ffi::OsStr)]| {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "credentials_come_from_the_aws_chain_without_key_files",
            "--nocapture",
        ])
        .env(
            "FERRY_S3_CHILD",
            format!("{} {bucket} {name}", c.endpoint()),
        )
        .env("AWS_CONFIG_FILE", dir.path().join("no-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.path().join("no-credentials"),
        )
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "the child writing {name} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // The environment, then a profile in the shared credentials file.
    run(
        "from-env.age",
        &[
            ("AWS_ACCESS_KEY_ID", p.access_key.as_ref()),
            ("AWS_SECRET_ACCESS_KEY", p.secret_key.as_ref()),
        ],
    );
    run(
        "from-profile.age",
        &[("AWS_SHARED_CREDENTIALS_FILE", profile.as_os_str())],
    );
    for name in ["from-env.age", "from-profile.age"] {
        let key = format!("{PREFIX}/production/2026-12-05/{name}");
        assert_eq!(get(c, &bucket, &key).unwrap()["Body"], name, "{key}");
    }
}

#[test]
fn a_second_write_of_a_key_adds_a_version_and_the_first_stays() {
    // Production may not read, so it cannot check first: the bucket's versioning is what
    // keeps a backup from being replaced.
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_bucket("versions");
    let dir = tempfile::tempdir().unwrap();
    let production = target(c, &bucket, &roles.production, &dir);
    let f = file(
        &*production,
        "production",
        "2026-12-05",
        "x_backup_2026-12-05.age",
    );
    commit(&*production, &f, b"the first backup");
    commit(&*production, &f, b"a second writer");
    let listed = c.s3_ok(
        &roles.staging,
        "list_object_versions",
        json!({"Bucket": bucket, "Prefix": f.path()}),
    );
    let versions: Vec<&Value> = listed["Versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["Key"] == f.path())
        .collect();
    assert_eq!(versions.len(), 2, "{listed}");
    let oldest = versions
        .iter()
        .find(|v| v["IsLatest"] == false)
        .unwrap_or_else(|| panic!("no older version: {listed}"));
    let first = c.s3_ok(
        &roles.staging,
        "get_object",
        json!({"Bucket": bucket, "Key": f.path(), "VersionId": oldest["VersionId"]}),
    );
    assert_eq!(first["Body"], "the first backup");
}

#[test]
fn a_restore_reads_the_version_its_manifest_records_whatever_a_racing_write_added() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_bucket("racing");
    let dir = tempfile::tempdir().unwrap();
    let production = target(c, &bucket, &roles.production, &dir);
    let f = file(
        &*production,
        "production",
        "2026-12-05",
        "pg_backup_2026-12-05.pgdump.zst.age",
    );
    let first = incompressible((9 << 20) + 5, 21);
    commit(&*production, &f, &first);
    // A racing writer of the same key, after the commit (production's keys, boto3).
    c.s3_ok(
        &roles.production,
        "put_object",
        json!({"Bucket": bucket, "Key": f.path(), "Body": "a racing write"}),
    );

    // boto3: both versions exist, the racer's is the current one, and the manifest names
    // the first.
    let listed = c.s3_ok(
        &roles.staging,
        "list_object_versions",
        json!({"Bucket": bucket, "Prefix": f.path()}),
    );
    let versions: Vec<&Value> = listed["Versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["Key"] == f.path())
        .collect();
    assert_eq!(versions.len(), 2, "{listed}");
    let version = |latest: bool| {
        versions
            .iter()
            .find(|v| v["IsLatest"] == latest)
            .and_then(|v| v["VersionId"].as_str())
            .unwrap_or_else(|| panic!("no version with IsLatest {latest}: {listed}"))
            .to_owned()
    };
    let (older, latest) = (version(false), version(true));
    let stored: Manifest = Manifest::from_slice(
        "boto3",
        get(c, &bucket, &f.manifest_path()).unwrap()["Body"]
            .as_str()
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(
        stored.version_id.as_deref(),
        Some(older.as_str()),
        "the manifest does not record the version it describes ({listed})"
    );
    assert_ne!(older, latest);
    assert_eq!(
        get(c, &bucket, &f.path()).unwrap()["Body"],
        "a racing write"
    );
    let first_read = c.s3_ok(
        &roles.staging,
        "get_object",
        json!({"Bucket": bucket, "Key": f.path(), "VersionId": older}),
    );
    assert_eq!(
        first_read["BodySha256"].as_str().unwrap(),
        hex::encode(Sha256::digest(&first))
    );

    // What a restore reads (staging's read session, the version its manifest names): the
    // first backup, not the racer's bytes.
    let staging = target(c, &bucket, &roles.staging, &dir);
    let mut r = staging.read().unwrap();
    let m =
        Manifest::from_slice("read", &r.read_small(&f.manifest_path(), 1 << 20).unwrap()).unwrap();
    assert_eq!(m, stored);
    // `ferry restore --all-or-nothing`'s check sizes that version too.
    assert_eq!(
        r.size_version(&f.path(), m.version_id.as_deref()).unwrap(),
        Some(first.len() as u64)
    );
    assert_eq!(
        r.size(&f.path()).unwrap(),
        Some(b"a racing write".len() as u64)
    );
    let (tx, rx) = chunk::channel();
    let collector = std::thread::spawn(move || rx.into_iter().flatten().collect::<Vec<u8>>());
    let n = r
        .download_version(&f.path(), m.version_id.as_deref(), tx)
        .unwrap();
    assert_eq!(n, first.len() as u64);
    assert_eq!(
        Sha256::digest(collector.join().unwrap()),
        Sha256::digest(&first),
        "the restore read other bytes than the first backup's"
    );
}

/// An RGW this test started again after [`CephCluster::kill_daemon`]; killed on drop.
struct Restarted(std::process::Child);

impl Drop for Restarted {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn rgw_killed_mid_upload_fails_the_stage_plainly_and_its_upload_is_aborted_once_back() {
    // A cluster of its own: its RGW is killed.
    let c = CephCluster::start();
    let roles = c.roles();
    let bucket = c.ferry_bucket("fault");
    let dir = tempfile::tempdir().unwrap();
    let production = target(&c, &bucket, &roles.production, &dir);
    let f = file(
        &*production,
        "production",
        "2026-12-05",
        "pg_backup_2026-12-05.pgdump.zst.age",
    );

    // 12 MiB (a first 8 MiB part sent), then the RGW is killed, then 12 MiB more.
    let (tx, rx) = chunk::channel();
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let feeder = std::thread::spawn(move || {
        for i in 0..24 {
            if i == 12 {
                sent_tx.send(()).unwrap();
                go_rx.recv().unwrap();
            }
            if tx.send(vec![3u8; chunk::CHUNK_BYTES]).is_err() {
                return;
            }
        }
    });
    let mut w = production.write().unwrap();
    let staging = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let r = w.stage(&f, "01KBX8Z3E5M1Q2W3E4R5T6Y7U8", rx);
        (w, r, started.elapsed())
    });
    sent_rx.recv().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    c.kill_daemon("rgw", 0);
    go_tx.send(()).unwrap();
    let (mut w, r, took) = staging.join().unwrap();
    feeder.join().unwrap();
    let e = r.expect_err("the stage cannot succeed without the RGW");
    let text = e.to_string();
    assert!(
        text.contains(&c.endpoint()) && e.retryable(),
        "not a plain, retryable error naming the endpoint: {text}"
    );
    assert!(took < std::time::Duration::from_secs(60), "took {took:?}");
    // The upload could not be aborted with the RGW down: the session says so.
    let left = w.take_unremoved();
    assert_eq!(left.len(), 1, "{left:?} ({text})");
    println!("{text}");

    // The RGW back (same config and port), a new session aborts the upload, and the
    // retry succeeds.
    let rgw = Restarted(
        std::process::Command::new("radosgw")
            .args(["-f", "-n", "client.rgw.a", "-c"])
            .arg(c.conf())
            .env_remove("CEPH_ARGS")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start radosgw again"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !port_open(c.rgw_port()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the RGW did not come back"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let mut w = production.write().unwrap();
    // The RGW may take a moment to serve S3 after it listens.
    let mut fates = w.abandon(&left);
    for _ in 0..50 {
        if fates == vec![PartialFate::Removed] {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        fates = w.abandon(&left);
    }
    assert_eq!(fates, vec![PartialFate::Removed]);
    assert_eq!(
        uploads(&c, &bucket),
        vec![],
        "the interrupted upload is left"
    );
    assert_eq!(
        keys(&c, &bucket),
        Vec::<String>::new(),
        "something is visible"
    );
    let data = incompressible(10 << 20, 3);
    let f = file(
        &*production,
        "production",
        "2026-12-05",
        "pg_backup_2026-12-05.pgdump.zst.age",
    );
    commit(&*production, &f, &data);
    let got = get(&c, &bucket, &f.path()).unwrap();
    assert_eq!(
        got["BodySha256"].as_str().unwrap(),
        hex::encode(Sha256::digest(&data))
    );
    drop(rgw);
}

#[test]
fn a_bucket_over_its_quota_fails_the_stage_as_no_space_and_leaves_no_upload() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_bucket("quota");
    for args in [
        &[
            "quota",
            "set",
            "--quota-scope=bucket",
            "--bucket",
            &bucket,
            "--max-size=4194304",
        ][..],
        &[
            "quota",
            "enable",
            "--quota-scope=bucket",
            "--bucket",
            &bucket,
        ][..],
    ] {
        c.radosgw_admin(args);
    }
    let dir = tempfile::tempdir().unwrap();
    let production = target(c, &bucket, &roles.production, &dir);
    let f = file(
        &*production,
        "production",
        "2026-12-05",
        "pg_backup_2026-12-05.pgdump.zst.age",
    );
    let e = production
        .write()
        .unwrap()
        .stage(
            &f,
            "01KBX8Z3E5M1Q2W3E4R5T6Y7U8",
            feed(incompressible(12 << 20, 9)),
        )
        .expect_err("12 MiB do not fit in a 4 MiB quota");
    let text = e.to_string();
    println!("{text}");
    assert!(
        matches!(
            &e,
            TargetError::QuotaExceeded {
                partial: PartialFate::Removed,
                ..
            }
        ),
        "{text}"
    );
    // The text says what a user can check: the bucket's quota refused the upload of this
    // key, and its multipart upload is gone (not "0 bytes free", which S3 never says).
    assert!(
        text.contains(&bucket)
            && text.contains(&f.path())
            && text.contains("the bucket's quota refused a part of")
            && text.contains("its multipart upload was aborted, so none of its parts stay")
            && !text.contains("bytes free"),
        "{text}"
    );
    assert_eq!(uploads(c, &bucket), vec![], "the failed upload is left");
}

#[test]
fn an_osd_killed_mid_upload_does_not_fail_the_backup() {
    // A cluster of its own: one of its three OSDs is killed; pools keep min_size 2.
    let c = CephCluster::start();
    let roles = c.roles();
    let bucket = c.ferry_bucket("osd");
    let dir = tempfile::tempdir().unwrap();
    let production = target(&c, &bucket, &roles.production, &dir);
    let f = file(
        &*production,
        "production",
        "2026-12-05",
        "pg_backup_2026-12-05.pgdump.zst.age",
    );
    let data = incompressible(24 << 20, 21);
    let (tx, rx) = chunk::channel();
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let feeder = {
        let data = data.clone();
        std::thread::spawn(move || {
            for (i, piece) in data.chunks(chunk::CHUNK_BYTES).enumerate() {
                if i == 12 {
                    sent_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                }
                // A stage that failed hangs up: its error is what the test reports.
                if tx.send(piece.to_vec()).is_err() {
                    return;
                }
            }
        })
    };
    let mut w = production.write().unwrap();
    let staging = std::thread::spawn(move || {
        let r = w.stage(&f, "01KBX8Z3E5M1Q2W3E4R5T6Y7U8", rx);
        (w, r, f)
    });
    sent_rx.recv().unwrap();
    c.kill_daemon("osd", 1);
    go_tx.send(()).unwrap();
    let (mut w, staged, f) = staging.join().unwrap();
    feeder.join().unwrap();
    let staged = staged.expect("the stage succeeds with two OSDs of three");
    w.commit("01KBX8Z3E5M1Q2W3E4R5T6Y7U8", &[(staged, manifest(&f.name))])
        .expect("the commit succeeds with two OSDs of three");
    let got = get(&c, &bucket, &f.path()).unwrap();
    assert_eq!(
        got["BodySha256"].as_str().unwrap(),
        hex::encode(Sha256::digest(&data)),
        "the object read back differs"
    );
}

/// A target on the RGW's HTTPS endpoint with `user`'s keys, trusting `ca_file` when
/// given.
fn https_target(
    c: &CephCluster,
    bucket: &str,
    user: &S3User,
    dir: &tempfile::TempDir,
    ca_file: Option<std::path::PathBuf>,
) -> Arc<dyn Target> {
    let extra = match ca_file {
        Some(ca) => json!({ "ca_file": ca }),
        None => json!({}),
    };
    target_at(c.tls_endpoint(), bucket, user, dir, extra)
}

#[test]
fn ca_file_lets_a_target_reach_a_private_https_endpoint_and_without_it_the_certificate_is_refused()
{
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_bucket("https");
    let dir = tempfile::tempdir().unwrap();
    let day = Utc::now().format("%Y-%m-%d").to_string();

    // Without the CA: the RGW's certificate is not trusted, and the error says so.
    let untrusting = https_target(c, &bucket, &roles.production, &dir, None);
    let f = file(
        &*untrusting,
        "production",
        &day,
        &format!("etcd_backup_{day}.db.zst.age"),
    );
    let mut w = untrusting.write().unwrap();
    let e = w
        .stage(
            &f,
            "01KBX8Z3E5M1Q2W3E4R5T6Y7U8",
            feed(b"never sent".to_vec()),
        )
        .expect_err("an untrusted certificate was accepted");
    let text = e.to_string();
    assert!(
        text.contains(&c.tls_endpoint().replace("https://", "")) || text.contains("127.0.0.1"),
        "the error does not name the endpoint: {text}"
    );
    assert!(
        text.to_lowercase().contains("certificate")
            || text.to_lowercase().contains("unknownissuer"),
        "the error does not say the certificate was refused: {text}"
    );
    drop(w);

    // With ca_file: a backup is written over HTTPS and read back over HTTPS, and boto3
    // (plain HTTP, another reader) reads the same bytes.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let writer = https_target(c, &bucket, &roles.production, &dir, Some(c.tls_ca()));
    commit(&*writer, &f, &data);
    let reader = https_target(c, &bucket, &roles.staging, &dir, Some(c.tls_ca()));
    let mut r = reader.read().unwrap();
    let (tx, rx) = chunk::channel();
    let path = f.path();
    let got = std::thread::spawn(move || rx.into_iter().flatten().collect::<Vec<u8>>());
    r.download(&path, tx).unwrap();
    assert!(got.join().unwrap() == data, "read back over HTTPS differs");
    let object = get(c, &bucket, &f.path()).unwrap();
    assert_eq!(
        object["BodySha256"].as_str().unwrap(),
        hex::encode(Sha256::digest(&data))
    );
}

#[test]
fn a_manifest_refused_after_its_data_part_completed_leaves_no_backup_and_the_next_write_succeeds() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_bucket("manifest");
    let policy = ferry_bucket_policy(
        &bucket,
        &roles.production.uid,
        &roles.staging.uid,
        &roles.maintenance.uid,
    );
    let dir = tempfile::tempdir().unwrap();
    let production = target(c, &bucket, &roles.production, &dir);
    let day = Utc::now().format("%Y-%m-%d").to_string();
    let f = file(
        &*production,
        "production",
        &day,
        &format!("etcd_backup_{day}.db.zst.age"),
    );
    // The bucket refuses production this backup's manifest (and only it): the data part
    // completes, the manifest that would make it a backup does not.
    let mut denied: Value = serde_json::from_str(&policy).unwrap();
    denied["Statement"].as_array_mut().unwrap().push(json!({
        "Sid": "NoManifest", "Effect": "Deny",
        "Principal": {"AWS": [format!("arn:aws:iam:::user/{}", roles.production.uid)]},
        "Action": ["s3:PutObject"],
        "Resource": [format!("arn:aws:s3:::{bucket}/{}.json", f.path())],
    }));
    c.put_bucket_policy(&roles.owner, &bucket, &denied.to_string());

    let first = b"first attempt ".repeat(10_000);
    let (mut w, staged) = stage(&*production, &f, &first);
    let e = w
        .commit("01KBX8Z3E5M1Q2W3E4R5T6Y7U8", &[(staged, manifest(&f.name))])
        .expect_err("a commit whose manifest was refused succeeded");
    assert!(matches!(e, TargetError::Commit { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("permission denied") && text.contains(&f.path()),
        "the error does not say what was refused and what was left: {text}"
    );
    drop(w);
    // Read with boto3: the data object is there without its manifest, and no multipart
    // upload is left; the maintenance credentials see it as an orphan for `ferry prune`.
    assert_eq!(keys(c, &bucket), vec![f.path()]);
    assert_eq!(uploads(c, &bucket), vec![]);
    let found = target(c, &bucket, &roles.maintenance, &dir)
        .maintain()
        .unwrap()
        .leftovers("production")
        .unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (found[0].path.as_str(), &found[0].kind),
        (f.path().as_str(), &LeftoverKind::Orphan)
    );

    // The policy put right, the retry writes the same key: a new version, which its
    // manifest names, and reading that version gives the retry's bytes.
    c.put_bucket_policy(&roles.owner, &bucket, &policy);
    let second = b"second attempt ".repeat(10_000);
    commit(&*production, &f, &second);
    let stored: Manifest = Manifest::from_slice(
        "m",
        get(c, &bucket, &format!("{}.json", f.path())).unwrap()["Body"]
            .as_str()
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    let version = stored
        .version_id
        .clone()
        .expect("the manifest names a version");
    assert_eq!(version, version_of(c, &bucket, &f.path()));
    let object = c.s3_ok(
        &roles.staging,
        "get_object",
        json!({"Bucket": bucket, "Key": f.path(), "VersionId": version}),
    );
    assert_eq!(
        object["BodySha256"].as_str().unwrap(),
        hex::encode(Sha256::digest(&second))
    );
    let found = target(c, &bucket, &roles.maintenance, &dir)
        .maintain()
        .unwrap()
        .leftovers("production")
        .unwrap();
    assert!(
        found.is_empty(),
        "the committed backup is taken for a leftover: {found:?}"
    );
}
