//! The S3 harness on a real Ceph cluster (issue 17, before Ferry's S3 target): with only
//! the stock S3 client (boto3), a bucket with Object Lock and the bucket policy of
//! `docs/s3-bucket-policy.json` holds what README promises:
//! - a COMPLIANCE-locked version cannot be deleted with any of the three credential sets,
//!   and its retain-until reads back as set;
//! - a multipart object (whose lock headers Ceph 16 ignores) locked after completion with
//!   `PutObjectRetention` is really locked, and so is one in a bucket with a default
//!   retention;
//! - production may only put, staging only list and get, maintenance may delete and extend
//!   locks, and each is refused the others' work;
//! - the cluster stops and leaves no process behind, when dropped and when the test
//!   process ends (its watchdog).
//!
//! The tests share one cluster ([`CephCluster::shared`]), each with a bucket of its own;
//! the two stop tests start one each of their own.

use std::fs;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::{Value, json};

use ferry_tests::*;

/// `now + days`, to the second (S3 keeps retain-until dates to the second).
fn in_days(days: i64) -> DateTime<Utc> {
    (Utc::now() + chrono::Duration::days(days)).trunc_subsecs(0)
}

/// An RFC 3339 timestamp for a request.
fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The `Retention` of `key` (version `version`) read back with `GetObjectRetention` as
/// `user`: (mode, retain-until).
fn retention(
    c: &CephCluster,
    user: &S3User,
    bucket: &str,
    key: &str,
    version: &str,
) -> (String, DateTime<Utc>) {
    let r = c.s3_ok(
        user,
        "get_object_retention",
        json!({"Bucket": bucket, "Key": key, "VersionId": version}),
    );
    let mode = r["Retention"]["Mode"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let until = r["Retention"]["RetainUntilDate"]
        .as_str()
        .unwrap_or_else(|| panic!("no RetainUntilDate in {r}"));
    let until = DateTime::parse_from_rfc3339(until)
        .unwrap_or_else(|e| panic!("RetainUntilDate {until:?}: {e}"))
        .with_timezone(&Utc);
    (mode, until)
}

/// Asserts that `result` is the server's `AccessDenied` (HTTP 403); `what` says which call.
fn assert_denied(result: Result<Value, S3Error>, what: &str) {
    match result {
        Err(e) => assert!(
            e.code == "AccessDenied" && e.status == 403,
            "{what}: expected AccessDenied (HTTP 403), got {e}"
        ),
        Ok(v) => panic!("{what}: expected AccessDenied, but it was allowed: {v}"),
    }
}

/// Asserts that a HEAD (which has no body for an error code) was refused with HTTP 403.
fn assert_head_denied(result: Result<Value, S3Error>, what: &str) {
    match result {
        Err(e) => assert_eq!(e.status, 403, "{what}: expected HTTP 403, got {e}"),
        Ok(v) => panic!("{what}: expected HTTP 403, but it was allowed: {v}"),
    }
}

/// Every version id of `key` in `bucket`, listed as `user`.
fn versions(c: &CephCluster, user: &S3User, bucket: &str, key: &str) -> Vec<String> {
    let v = c.s3_ok(
        user,
        "list_object_versions",
        json!({"Bucket": bucket, "Prefix": key}),
    );
    v["Versions"]
        .as_array()
        .map(|vs| {
            vs.iter()
                .filter(|v| v["Key"] == key)
                .filter_map(|v| v["VersionId"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Puts `body` at `key` as production, locked in COMPLIANCE mode until `until`; its
/// version id.
fn put_locked(
    c: &CephCluster,
    bucket: &str,
    key: &str,
    body: &str,
    until: DateTime<Utc>,
) -> String {
    let r = c.s3_ok(
        &c.roles().production,
        "put_object",
        json!({
            "Bucket": bucket, "Key": key, "Body": body,
            "ObjectLockMode": "COMPLIANCE",
            "ObjectLockRetainUntilDate": rfc3339(until),
        }),
    );
    r["VersionId"]
        .as_str()
        .unwrap_or_else(|| panic!("put_object in a versioned bucket gave no VersionId: {r}"))
        .to_owned()
}

#[test]
fn locked_version_cannot_be_deleted_with_any_credentials_and_keeps_its_retain_until() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_bucket("locked");
    let key = "production/2026-12-01/pg_backup_2026-12-01.dump.zst.age";
    let until = in_days(2);
    let version = put_locked(c, &bucket, key, "ciphertext", until);

    for (who, user) in [
        ("production", &roles.production),
        ("staging", &roles.staging),
        ("maintenance", &roles.maintenance),
    ] {
        assert_denied(
            c.s3(
                user,
                "delete_object",
                json!({"Bucket": bucket, "Key": key, "VersionId": version}),
            ),
            &format!("{who} deletes the locked version"),
        );
    }
    // Maintenance may delete versions: what refuses it is the lock, not the policy.
    let e = c
        .s3(
            &roles.maintenance,
            "delete_object",
            json!({"Bucket": bucket, "Key": key, "VersionId": version}),
        )
        .unwrap_err();
    assert!(
        e.message
            .as_deref()
            .unwrap_or_default()
            .contains("object lock"),
        "maintenance's delete of the locked version was refused for another reason: {e}"
    );

    let (mode, read) = retention(c, &roles.maintenance, &bucket, key, &version);
    assert_eq!(mode, "COMPLIANCE");
    assert_eq!(
        read, until,
        "retain-until read back differs from the one set"
    );
    assert_eq!(
        versions(c, &roles.staging, &bucket, key),
        vec![version.clone()]
    );
    let got = c.s3_ok(
        &roles.staging,
        "get_object",
        json!({"Bucket": bucket, "Key": key, "VersionId": version}),
    );
    assert_eq!(got["Body"], "ciphertext");
}

#[test]
fn multipart_object_locked_after_completion_is_locked() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_bucket("multipart");
    let key = "production/2026-12-01/files_backup_2026-12-01.tar.zst.age";
    let dir = tempfile::tempdir().unwrap();
    // A first part of the 5 MiB minimum, and a short last one.
    let part1 = incompressible(5 << 20, 17);
    let part2 = b"the last part".to_vec();
    fs::write(dir.path().join("part1"), &part1).unwrap();
    fs::write(dir.path().join("part2"), &part2).unwrap();

    let until = in_days(3);
    // Lock headers on CreateMultipartUpload, as a client would send them; Ceph 16 ignores
    // them, hence the lock after completion below.
    let upload = c.s3_ok(
        &roles.production,
        "create_multipart_upload",
        json!({
            "Bucket": bucket, "Key": key,
            "ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": rfc3339(until),
        }),
    );
    let upload_id = upload["UploadId"].as_str().unwrap().to_owned();
    let mut parts = Vec::new();
    for (n, file) in [(1, "part1"), (2, "part2")] {
        let r = c.s3_ok(
            &roles.production,
            "upload_part",
            json!({
                "Bucket": bucket, "Key": key, "UploadId": upload_id, "PartNumber": n,
                "BodyFile": dir.path().join(file),
            }),
        );
        parts.push(json!({"PartNumber": n, "ETag": r["ETag"]}));
    }
    let done = c.s3_ok(
        &roles.production,
        "complete_multipart_upload",
        json!({
            "Bucket": bucket, "Key": key, "UploadId": upload_id,
            "MultipartUpload": {"Parts": parts},
        }),
    );
    let version = done["VersionId"].as_str().unwrap().to_owned();

    c.s3_ok(
        &roles.maintenance,
        "put_object_retention",
        json!({
            "Bucket": bucket, "Key": key, "VersionId": version,
            "Retention": {"Mode": "COMPLIANCE", "RetainUntilDate": rfc3339(until)},
        }),
    );
    let (mode, read) = retention(c, &roles.maintenance, &bucket, key, &version);
    assert_eq!(mode, "COMPLIANCE");
    assert_eq!(
        read, until,
        "the multipart object's retain-until differs from the one set"
    );
    for (who, user) in [
        ("production", &roles.production),
        ("staging", &roles.staging),
        ("maintenance", &roles.maintenance),
    ] {
        assert_denied(
            c.s3(
                user,
                "delete_object",
                json!({"Bucket": bucket, "Key": key, "VersionId": version}),
            ),
            &format!("{who} deletes the locked multipart version"),
        );
    }
    // Still there and whole.
    let got = c.s3_ok(
        &roles.staging,
        "get_object",
        json!({"Bucket": bucket, "Key": key, "VersionId": version}),
    );
    let mut whole = part1;
    whole.extend_from_slice(&part2);
    fs::write(dir.path().join("whole"), &whole).unwrap();
    let sum = run_ok(std::process::Command::new("sha256sum").arg(dir.path().join("whole")));
    assert_eq!(got["BodyLength"], whole.len());
    assert_eq!(
        got["BodySha256"].as_str(),
        sum.split_whitespace().next(),
        "the multipart object read back differs from its parts"
    );
}

#[test]
fn bucket_default_retention_locks_a_multipart_object_on_completion() {
    // The other way to lock what production uploads in parts, without giving production
    // PutObjectRetention: the bucket's default retention, applied by Ceph on completion.
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_bucket("default-retention");
    c.put_default_retention(&roles.owner, &bucket, "COMPLIANCE", 2);
    let key = "production/2026-12-05/etcd_backup_2026-12-05.db.zst.age";
    let before = Utc::now();
    let upload = c.s3_ok(
        &roles.production,
        "create_multipart_upload",
        json!({"Bucket": bucket, "Key": key}),
    );
    let upload_id = upload["UploadId"].as_str().unwrap().to_owned();
    let part = c.s3_ok(
        &roles.production,
        "upload_part",
        json!({
            "Bucket": bucket, "Key": key, "UploadId": upload_id, "PartNumber": 1,
            "Body": "one small part",
        }),
    );
    let done = c.s3_ok(
        &roles.production,
        "complete_multipart_upload",
        json!({
            "Bucket": bucket, "Key": key, "UploadId": upload_id,
            "MultipartUpload": {"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
        }),
    );
    let after = Utc::now();
    let version = done["VersionId"].as_str().unwrap().to_owned();
    let (mode, until) = retention(c, &roles.maintenance, &bucket, key, &version);
    assert_eq!(mode, "COMPLIANCE");
    let days = chrono::Duration::days(2);
    assert!(
        until >= (before + days).trunc_subsecs(0) && until <= after + days,
        "retain-until {until} is not 2 days after the completion ({before} .. {after})"
    );
    assert_denied(
        c.s3(
            &roles.maintenance,
            "delete_object",
            json!({"Bucket": bucket, "Key": key, "VersionId": version}),
        ),
        "maintenance deletes the version locked by the default retention",
    );
}

#[test]
fn production_may_only_put() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let p = &roles.production;
    let bucket = c.ferry_bucket("production");
    let key = "production/2026-12-02/pg_backup_2026-12-02.dump.zst.age";

    // Allowed: put, and a multipart upload it may abort (a failed upload).
    let put = c.s3_ok(
        p,
        "put_object",
        json!({"Bucket": bucket, "Key": key, "Body": "ciphertext"}),
    );
    let version = put["VersionId"].as_str().unwrap().to_owned();
    let up = c.s3_ok(
        p,
        "create_multipart_upload",
        json!({"Bucket": bucket, "Key": "production/aborted"}),
    );
    let upload_id = up["UploadId"].as_str().unwrap();
    c.s3_ok(
        p,
        "upload_part",
        json!({
            "Bucket": bucket, "Key": "production/aborted", "UploadId": upload_id,
            "PartNumber": 1, "Body": "part",
        }),
    );
    c.s3_ok(
        p,
        "list_parts",
        json!({"Bucket": bucket, "Key": "production/aborted", "UploadId": upload_id}),
    );
    c.s3_ok(
        p,
        "abort_multipart_upload",
        json!({"Bucket": bucket, "Key": "production/aborted", "UploadId": upload_id}),
    );

    // Refused: reading, listing, deleting, locking; even its own object.
    let obj = json!({"Bucket": bucket, "Key": key});
    let ver = json!({"Bucket": bucket, "Key": key, "VersionId": version});
    assert_denied(c.s3(p, "get_object", obj.clone()), "production gets");
    assert_denied(
        c.s3(p, "get_object", ver.clone()),
        "production gets a version",
    );
    assert_head_denied(c.s3(p, "head_object", obj.clone()), "production heads");
    assert_denied(
        c.s3(p, "list_objects_v2", json!({"Bucket": bucket})),
        "production lists",
    );
    assert_denied(
        c.s3(p, "list_object_versions", json!({"Bucket": bucket})),
        "production lists versions",
    );
    assert_denied(
        c.s3(p, "delete_object", obj.clone()),
        "production deletes (a delete marker)",
    );
    assert_denied(
        c.s3(p, "delete_object", ver.clone()),
        "production deletes a version",
    );
    assert_denied(
        c.s3(
            p,
            "put_object_retention",
            json!({
                "Bucket": bucket, "Key": key, "VersionId": version,
                "Retention": {"Mode": "COMPLIANCE", "RetainUntilDate": rfc3339(in_days(1))},
            }),
        ),
        "production locks",
    );
    assert_denied(
        c.s3(p, "get_object_retention", ver.clone()),
        "production reads a lock",
    );
    // Nothing production was refused changed anything: its one version is there.
    assert_eq!(
        versions(c, &roles.staging, &bucket, key),
        vec![version],
        "the object's versions changed"
    );
}

#[test]
fn staging_may_only_list_and_get() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let s = &roles.staging;
    let bucket = c.ferry_bucket("staging");
    let key = "production/2026-12-03/pg_backup_2026-12-03.dump.zst.age";
    let version = put_locked(c, &bucket, key, "restore me", in_days(1));
    let unlocked = "production/2026-12-03/unlocked";
    let unlocked_version = c.s3_ok(
        &roles.production,
        "put_object",
        json!({"Bucket": bucket, "Key": unlocked, "Body": "x"}),
    )["VersionId"]
        .as_str()
        .unwrap()
        .to_owned();

    // Allowed: list, list versions, get, get a version, head.
    let listed = c.s3_ok(s, "list_objects_v2", json!({"Bucket": bucket}));
    let keys: Vec<&str> = listed["Contents"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["Key"].as_str())
        .collect();
    assert_eq!(keys, vec![key, unlocked]);
    assert_eq!(versions(c, s, &bucket, key), vec![version.clone()]);
    let got = c.s3_ok(s, "get_object", json!({"Bucket": bucket, "Key": key}));
    assert_eq!(got["Body"], "restore me");
    let got = c.s3_ok(
        s,
        "get_object",
        json!({"Bucket": bucket, "Key": key, "VersionId": version}),
    );
    assert_eq!(got["Body"], "restore me");
    c.s3_ok(s, "head_object", json!({"Bucket": bucket, "Key": key}));

    // Refused: put (new key and over an existing one), delete, multipart, lock.
    assert_denied(
        c.s3(
            s,
            "put_object",
            json!({"Bucket": bucket, "Key": "staging/new", "Body": "x"}),
        ),
        "staging puts",
    );
    assert_denied(
        c.s3(
            s,
            "put_object",
            json!({"Bucket": bucket, "Key": key, "Body": "overwritten"}),
        ),
        "staging puts over a backup",
    );
    assert_denied(
        c.s3(
            s,
            "create_multipart_upload",
            json!({"Bucket": bucket, "Key": "staging/new"}),
        ),
        "staging starts a multipart upload",
    );
    assert_denied(
        c.s3(
            s,
            "delete_object",
            json!({"Bucket": bucket, "Key": unlocked}),
        ),
        "staging deletes (a delete marker)",
    );
    assert_denied(
        c.s3(
            s,
            "delete_object",
            json!({"Bucket": bucket, "Key": unlocked, "VersionId": unlocked_version}),
        ),
        "staging deletes an unlocked version",
    );
    assert_denied(
        c.s3(
            s,
            "put_object_retention",
            json!({
                "Bucket": bucket, "Key": key, "VersionId": version,
                "Retention": {"Mode": "COMPLIANCE", "RetainUntilDate": rfc3339(in_days(5))},
            }),
        ),
        "staging extends a lock",
    );
    assert_eq!(versions(c, s, &bucket, key), vec![version]);
    assert_eq!(versions(c, s, &bucket, unlocked), vec![unlocked_version]);
}

#[test]
fn maintenance_may_delete_and_extend_locks_but_not_put_or_shorten() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let m = &roles.maintenance;
    let bucket = c.ferry_bucket("maintenance");
    let locked = "production/2026-12-04/pg_backup_2026-12-04.dump.zst.age";
    let until = in_days(1);
    let version = put_locked(c, &bucket, locked, "weekly keeper", until);
    let unlocked = "production/2026-12-04/expired";
    let unlocked_version = c.s3_ok(
        &roles.production,
        "put_object",
        json!({"Bucket": bucket, "Key": unlocked, "Body": "dropped by the policy"}),
    )["VersionId"]
        .as_str()
        .unwrap()
        .to_owned();

    // Allowed: list, delete an unlocked version (gone for good), extend a lock, abort a
    // multipart upload production left behind.
    c.s3_ok(m, "list_objects_v2", json!({"Bucket": bucket}));
    c.s3_ok(
        m,
        "delete_object",
        json!({"Bucket": bucket, "Key": unlocked, "VersionId": unlocked_version}),
    );
    assert_eq!(
        versions(c, m, &bucket, unlocked),
        Vec::<String>::new(),
        "the unlocked version maintenance deleted is still listed"
    );
    let later = in_days(30);
    c.s3_ok(
        m,
        "put_object_retention",
        json!({
            "Bucket": bucket, "Key": locked, "VersionId": version,
            "Retention": {"Mode": "COMPLIANCE", "RetainUntilDate": rfc3339(later)},
        }),
    );
    assert_eq!(
        retention(c, m, &bucket, locked, &version),
        ("COMPLIANCE".to_owned(), later),
        "the extended lock did not read back"
    );
    let up = c.s3_ok(
        &roles.production,
        "create_multipart_upload",
        json!({"Bucket": bucket, "Key": "production/abandoned"}),
    );
    let upload_id = up["UploadId"].as_str().unwrap();
    let uploads = c.s3_ok(m, "list_multipart_uploads", json!({"Bucket": bucket}));
    assert!(
        uploads["Uploads"]
            .as_array()
            .is_some_and(|u| u.iter().any(|u| u["UploadId"] == upload_id)),
        "maintenance does not see the abandoned upload: {uploads}"
    );
    c.s3_ok(
        m,
        "abort_multipart_upload",
        json!({"Bucket": bucket, "Key": "production/abandoned", "UploadId": upload_id}),
    );

    // Refused: shortening the lock (no one may), putting, deleting the locked version.
    assert_denied(
        c.s3(
            m,
            "put_object_retention",
            json!({
                "Bucket": bucket, "Key": locked, "VersionId": version,
                "Retention": {"Mode": "COMPLIANCE", "RetainUntilDate": rfc3339(until)},
            }),
        ),
        "maintenance shortens a lock",
    );
    assert_denied(
        c.s3(
            m,
            "put_object_retention",
            json!({
                "Bucket": bucket, "Key": locked, "VersionId": version,
                "Retention": {"Mode": "GOVERNANCE", "RetainUntilDate": rfc3339(later)},
            }),
        ),
        "maintenance turns a COMPLIANCE lock into GOVERNANCE",
    );
    assert_denied(
        c.s3(
            m,
            "put_object",
            json!({"Bucket": bucket, "Key": "maintenance/new", "Body": "x"}),
        ),
        "maintenance puts",
    );
    assert_denied(
        c.s3(
            m,
            "create_multipart_upload",
            json!({"Bucket": bucket, "Key": "maintenance/new"}),
        ),
        "maintenance starts a multipart upload",
    );
    assert_denied(
        c.s3(
            m,
            "delete_object",
            json!({"Bucket": bucket, "Key": locked, "VersionId": version}),
        ),
        "maintenance deletes the locked version",
    );
    assert_eq!(
        retention(c, m, &bucket, locked, &version),
        ("COMPLIANCE".to_owned(), later),
        "a refused call changed the lock"
    );
}

#[test]
fn cluster_stops_in_order_on_sigterm_and_leaves_no_process() {
    let c = CephCluster::start();
    eprintln!(
        "Ceph (1 mon, {OSDS} OSDs, RGW) started in {:.1} s",
        c.startup.as_secs_f64()
    );
    let dir = c.dir().to_owned();
    let pids = c.daemon_pids();
    assert_eq!(
        pids.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
        vec!["mon", "osd", "osd", "osd", "rgw"],
        "the daemons started"
    );
    let running = processes_naming(&dir);
    for (role, pid) in &pids {
        assert!(
            running.iter().any(|(p, _)| p == pid),
            "{role} (pid {pid}) is not among the processes naming {}: {running:?}",
            dir.display()
        );
    }
    // Every daemon listens on loopback only.
    let ss = run_ok(std::process::Command::new(require("ss", "iproute2")).arg("-ltnpH"));
    for (role, pid) in &pids {
        let mine: Vec<&str> = ss
            .lines()
            .filter(|l| l.contains(&format!("pid={pid},")))
            .filter_map(|l| l.split_whitespace().nth(3))
            .collect();
        assert!(
            !mine.is_empty(),
            "{role} (pid {pid}) listens on nothing:\n{ss}"
        );
        assert!(
            mine.iter().all(|a| a.starts_with("127.0.0.1:")),
            "{role} (pid {pid}) listens beyond loopback: {mine:?}"
        );
    }
    // It serves S3: a user puts and gets an object.
    let u = c.create_user("ferry-stop-test");
    c.s3_ok(&u, "create_bucket", json!({"Bucket": "stop-test"}));
    c.s3_ok(
        &u,
        "put_object",
        json!({"Bucket": "stop-test", "Key": "k", "Body": "v"}),
    );
    assert_eq!(
        c.s3_ok(&u, "get_object", json!({"Bucket": "stop-test", "Key": "k"}))["Body"],
        "v"
    );
    let (mon_port, rgw_port) = (c.mon_port(), c.rgw_port());

    let t = std::time::Instant::now();
    let stopped = c.stop();
    let took = t.elapsed();
    eprintln!("Ceph stopped in {:.1} s", took.as_secs_f64());
    // RGW first, the monitor last, each on SIGTERM (OSDs stopped after the monitor would
    // linger and be killed).
    assert_eq!(
        stopped
            .iter()
            .map(|s| (s.role, s.outcome))
            .collect::<Vec<_>>(),
        vec![
            ("rgw", StopOutcome::Exited),
            ("osd", StopOutcome::Exited),
            ("osd", StopOutcome::Exited),
            ("osd", StopOutcome::Exited),
            ("mon", StopOutcome::Exited),
        ],
        "how the daemons stopped"
    );
    assert!(
        took < STOP_GRACE * 3 + Duration::from_secs(5),
        "stopping took {took:?}"
    );
    drop(c);
    assert_eq!(
        processes_naming(&dir),
        Vec::<(u32, String)>::new(),
        "processes of the cluster left after drop"
    );
    for (role, pid) in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "{role} (pid {pid}) is still there after drop"
        );
    }
    assert!(!port_open(rgw_port), "the RGW's port is still open");
    assert!(!port_open(mon_port), "the monitor's port is still open");
    if std::env::var("FERRY_KEEP_TEST_DIRS").is_err() {
        assert!(!dir.exists(), "{} was not removed", dir.display());
    }
}

#[test]
fn cluster_left_running_is_stopped_when_the_test_process_ends() {
    // The shared cluster lives in a static and is never dropped: its watchdog stops it when
    // the test process ends and the pipe from it closes. Closing the pipe here does the same.
    let c = CephCluster::start();
    let dir = c.dir().to_owned();
    let pids = c.daemon_pids();
    assert!(
        c.s3(
            &c.create_user("ferry-watchdog-test"),
            "list_buckets",
            json!({})
        )
        .is_ok()
    );
    assert!(c.end_watchdog(), "the watchdog did not end within 30 s");
    assert_eq!(
        processes_naming(&dir),
        Vec::<(u32, String)>::new(),
        "processes of the cluster left after its watchdog ended"
    );
    for (role, pid) in &pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Not reaped yet (this process is their parent), but not running: a zombie.
        assert!(
            stat.is_empty()
                || stat[stat.rfind(')').unwrap() + 1..]
                    .trim_start()
                    .starts_with('Z'),
            "{role} (pid {pid}) still runs after the watchdog ended: {stat}"
        );
    }
    if std::env::var("FERRY_KEEP_TEST_DIRS").is_err() {
        assert!(
            !dir.exists(),
            "the watchdog did not remove {}",
            dir.display()
        );
    }
}

#[test]
fn readme_shows_the_bucket_policy_template() {
    let readme = fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let policy = fs::read_to_string(workspace_root().join("docs/s3-bucket-policy.json")).unwrap();
    assert!(
        readme.contains(&format!("```json\n{policy}```")),
        "README's \"S3 bucket and credentials (Ceph RGW)\" does not show \
         docs/s3-bucket-policy.json as it is"
    );
    // And the template gives JSON once filled.
    ferry_bucket_policy("b", "p", "s", "m");
}
