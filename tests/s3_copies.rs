//! Copies (3-2-1, issue 17) through the real binaries, against a real Ceph RGW and sshd:
//! the coordinator copies each backup from the primary to the environment's copy targets
//! (`copy_to`), and every copy is read back with a stock client (boto3 for S3, the file
//! on disk for SFTP), not Ferry's reader:
//! - SFTP → S3: each copied object's bytes have the SHA-256 of the SFTP file and of its
//!   manifest; the copy's manifest names the copy's own version id; the copy is locked
//!   until date + keep_daily (boto3 `get_object_retention`); production cannot touch the
//!   copy bucket; `ferry backups` says where each backup lives and `ferry status` that the
//!   copy lacks nothing; `ferry restore --from offsite` restores from the copy, and with the
//!   SFTP server stopped a plain `ferry restore` falls back to the copy and says so; the
//!   restored data equals the source each time.
//! - S3 → S3 and S3 → SFTP: one backup on a primary bucket copied to a second bucket and to
//!   the SFTP server, each equal to the primary's object, each restored from with `--from`.

use std::collections::BTreeMap;

use chrono::{NaiveDate, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use ferry_tests::*;

/// The prefix every S3 table writes under.
const PREFIX: &str = "ferry";

/// [`DEFAULT_DATA`] and 12 MiB of random bytes (12 rows of 1 MiB), so that a copy streams
/// many more chunks than its channels hold: a copy that read the whole object before
/// writing any of it hung on every backup over about 300 KiB (the demo's), which the
/// default data alone did not show.
fn data_with_blobs() -> String {
    format!(
        "{DEFAULT_DATA}\nCREATE TABLE blobs (n int PRIMARY KEY, b bytea NOT NULL);\n\
         INSERT INTO blobs SELECT g % 12, decode(string_agg(md5(random()::text || g), ''), 'hex') \
         FROM generate_series(1, 786432) g GROUP BY g % 12;\n"
    )
}

/// `config`'s `[backup_server]` table, renamed `[copies.<name>]`.
fn backup_server_as_copy(config: &str, name: &str) -> String {
    let start = config.find("[backup_server]\n").unwrap();
    let end = config[start + 1..]
        .find("\n[")
        .map_or(config.len(), |i| start + 1 + i);
    format!(
        "\n{}\n",
        config[start..end].replace("[backup_server]", &format!("[copies.{name}]"))
    )
}

/// Waits (60 s at most) until every backup in the catalog has a copy on each of `targets`;
/// the catalog then.
fn await_copies(d: &Deployment, targets: &[&str]) -> Vec<Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let catalog = d.ferry_json(&["backups"]);
        let records = catalog.as_array().cloned().unwrap_or_default();
        let done = !records.is_empty()
            && records.iter().all(|r| {
                targets.iter().all(|t| {
                    r["copies"]
                        .as_array()
                        .is_some_and(|c| c.iter().any(|c| c["target"] == *t))
                })
            });
        if done {
            return records;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no copy on {targets:?} after 60 s: {catalog}\nstatus: {}\n{}",
            d.ferry_json(&["status"]),
            d.log_tail("coordinator")
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Every file the backup of `record` holds (its companions, then the main archive), as
/// names in its dated folder, read from its manifest on the SFTP server's disk.
fn files_of(main_manifest: &Value, main: &str) -> Vec<String> {
    let mut out: Vec<String> = main_manifest["companions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    out.push(main.to_owned());
    out
}

fn name_of(path: &str) -> &str {
    path.rsplit('/').next().unwrap()
}

/// `ferry restore pg-stage --datastore postgres --from FROM --wait`: it succeeds, staging's
/// tables equal `source`, and the newest job says it read `from`.
fn restore_from(d: &Deployment, from: &str, source: &BTreeMap<String, (i64, String)>) {
    let out = d.ferry_ok(&[
        "restore",
        "pg-stage",
        "--datastore",
        "postgres",
        "--from",
        from,
        "--wait",
    ]);
    assert!(out.contains("succeeded"), "{from}: {out}");
    assert_eq!(
        &d.stage_pg.table_fingerprints("app"),
        source,
        "restored from {from}"
    );
    let jobs = d.ferry_json(&["jobs"]);
    let newest = &jobs.as_array().unwrap()[0];
    assert_eq!(newest["result"]["target"], from, "{newest}");
}

#[test]
fn a_backup_is_copied_from_sftp_to_s3_and_restored_from_the_copy_when_the_primary_is_down() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_copy_bucket("copies");
    let mut d = Deployment::start_with(&data_with_blobs(), |d| {
        let dir = d.dir.path().to_owned();
        let key = d.maintenance_key();
        append(
            &d.coordinator_config,
            &format!(
                "\n[[retention]]\nenvironment = \"production\"\nkeep_daily = 7\n\n\
                 [[environments]]\nname = \"production\"\ncopy_to = [\"offsite\"]\n{}{}",
                d.sftp_table("maintenance", &key),
                s3_table(
                    "copies.offsite",
                    c,
                    &bucket,
                    &roles.maintenance,
                    &dir,
                    "lock = { mode = \"compliance\" }\n"
                ),
            ),
        );
        append(
            &d.stage_config,
            &s3_table("copies.offsite", c, &bucket, &roles.staging, &dir, ""),
        );
    });

    let out = d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    assert!(out.contains("succeeded"), "{out}");
    let records = await_copies(&d, &["offsite"]);
    let day = Utc::now().format("%Y-%m-%d").to_string();
    let date = NaiveDate::parse_from_str(&day, "%Y-%m-%d").unwrap();
    let horizon = date
        .checked_add_days(chrono::Days::new(7))
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let main_record = records
        .iter()
        .find(|r| r["datastore"] == "postgres")
        .unwrap();
    let main_path = main_record["stored_path"].as_str().unwrap();
    let folder = d.sshd.root().join(format!("production/{day}"));
    let main_manifest: Value = serde_json::from_slice(
        &std::fs::read(folder.join(format!("{}.json", name_of(main_path)))).unwrap(),
    )
    .unwrap();
    let files = files_of(&main_manifest, name_of(main_path));
    assert_eq!(
        files.len(),
        2,
        "the PostgreSQL backup has its globals: {files:?}"
    );
    for name in &files {
        let on_sftp = std::fs::read(folder.join(name)).unwrap();
        let sftp_manifest: Value =
            serde_json::from_slice(&std::fs::read(folder.join(format!("{name}.json"))).unwrap())
                .unwrap();
        let key = format!("{PREFIX}/production/{day}/{name}");
        let object = c.s3_ok(
            &roles.staging,
            "get_object",
            json!({"Bucket": bucket, "Key": key}),
        );
        assert_eq!(
            object["BodySha256"],
            sha256_hex(&on_sftp),
            "{key} differs from the SFTP file"
        );
        assert_eq!(object["BodySha256"], sftp_manifest["sha256"]);
        let manifest: Value = serde_json::from_str(
            c.s3_ok(
                &roles.staging,
                "get_object",
                json!({"Bucket": bucket, "Key": format!("{key}.json")}),
            )["Body"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(manifest["sha256"], sftp_manifest["sha256"]);
        assert_eq!(manifest["version_id"], object["VersionId"], "{manifest}");
        // Locked on the copy target like the primary's policy says: date + keep_daily.
        for k in [key.clone(), format!("{key}.json")] {
            let r = c.s3_ok(
                &roles.maintenance,
                "get_object_retention",
                json!({"Bucket": bucket, "Key": k}),
            );
            assert_eq!(r["Retention"]["Mode"], "COMPLIANCE", "{k}: {r}");
            let until = chrono::DateTime::parse_from_rfc3339(
                r["Retention"]["RetainUntilDate"].as_str().unwrap(),
            )
            .unwrap();
            assert_eq!(until, horizon, "{k}");
        }
    }
    // Production may not touch the copy bucket.
    let refused = c.s3(
        &roles.production,
        "put_object",
        json!({"Bucket": bucket, "Key": format!("{PREFIX}/production/{day}/x"), "Body": "x"}),
    );
    assert!(refused.is_err(), "production wrote to the copy bucket");

    let table = d.ferry_ok(&["backups"]);
    assert!(
        table.contains("STORED ON") && table.contains("primary,offsite"),
        "{table}"
    );
    let status = d.ferry_json(&["status"]);
    let copies = status["copies"].as_array().unwrap();
    assert_eq!(copies.len(), 1, "{status}");
    assert_eq!(copies[0]["target"], "offsite");
    assert_eq!(copies[0]["lacking"], 0, "{status}");
    assert_eq!(copies[0]["lag_seconds"], 0, "{status}");
    assert!(copies[0]["last_error"].is_null(), "{status}");
    assert!(copies[0]["last_copy"].is_string(), "{status}");

    let source = d.prod_pg.table_fingerprints("app");
    assert_eq!(source.len(), 5, "{source:?}");
    restore_from(&d, "offsite", &source);

    // The primary is lost: a plain restore reads the copy, and says so.
    d.stage_pg.psql("app", "DROP TABLE IF EXISTS notes CASCADE");
    d.sshd.process().kill();
    let out = d.ferry_ok(&["restore", "pg-stage", "--datastore", "postgres", "--wait"]);
    assert!(out.contains("succeeded"), "{out}");
    let jobs = d.ferry_json(&["jobs"]);
    let newest = &jobs.as_array().unwrap()[0];
    assert_eq!(newest["result"]["target"], "offsite", "{newest}");
    let summary = newest["result"]["summary"].as_str().unwrap_or_default();
    assert!(
        summary.contains("read from copy offsite") && summary.contains("could not be reached"),
        "{newest}"
    );
    assert_eq!(
        d.stage_pg.table_fingerprints("app"),
        source,
        "restored from the copy after the primary was lost"
    );
}

#[test]
fn a_backup_on_s3_is_copied_to_a_second_bucket_and_to_sftp_and_each_copy_restores() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let primary = c.ferry_bucket("primary");
    let offsite = c.ferry_copy_bucket("offsite");
    let d = Deployment::start_with(&data_with_blobs(), |d| {
        let dir = d.dir.path().to_owned();
        let key = d.maintenance_key();
        let stage_sftp =
            backup_server_as_copy(&std::fs::read_to_string(&d.stage_config).unwrap(), "local");
        use_s3_backup_server(d, c, &primary);
        append(
            &d.stage_config,
            &format!(
                "{stage_sftp}{}",
                s3_table("copies.offsite", c, &offsite, &roles.staging, &dir, "")
            ),
        );
        append(
            &d.coordinator_config,
            &format!(
                "\n[[retention]]\nenvironment = \"production\"\nkeep_daily = 7\n\n\
                 [[environments]]\nname = \"production\"\ncopy_to = [\"offsite\", \"local\"]\n{}{}{}",
                s3_table("maintenance", c, &primary, &roles.maintenance, &dir, ""),
                s3_table("copies.offsite", c, &offsite, &roles.maintenance, &dir, ""),
                d.sftp_table("copies.local", &key),
            ),
        );
    });
    let out = d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    assert!(out.contains("succeeded"), "{out}");
    let records = await_copies(&d, &["offsite", "local"]);
    let day = Utc::now().format("%Y-%m-%d").to_string();
    let folder = d.sshd.root().join(format!("production/{day}"));
    assert_eq!(
        records.len(),
        1,
        "one backup (its globals are a companion): {records:?}"
    );
    let main = name_of(records[0]["stored_path"].as_str().unwrap()).to_owned();
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(folder.join(format!("{main}.json"))).unwrap())
            .unwrap();
    assert!(
        manifest.get("version_id").is_none(),
        "the SFTP copy's manifest names an S3 version: {manifest}"
    );
    for name in files_of(&manifest, &main) {
        let key = format!("{PREFIX}/production/{day}/{name}");
        let on_primary = c.s3_ok(
            &roles.staging,
            "get_object",
            json!({"Bucket": primary, "Key": key}),
        );
        let on_offsite = c.s3_ok(
            &roles.staging,
            "get_object",
            json!({"Bucket": offsite, "Key": key}),
        );
        let on_sftp = std::fs::read(folder.join(&name)).unwrap();
        assert_eq!(on_offsite["BodySha256"], on_primary["BodySha256"], "{key}");
        assert_eq!(
            on_primary["BodySha256"],
            sha256_hex(&on_sftp),
            "{name} on SFTP"
        );
    }
    let source = d.prod_pg.table_fingerprints("app");
    for (i, from) in ["local", "offsite", "primary"].into_iter().enumerate() {
        if i > 0 {
            // What the previous restore put in place changes, so each restore must redo it.
            d.stage_pg.psql("app", "DROP TABLE IF EXISTS notes CASCADE");
        }
        restore_from(&d, from, &source);
    }
    // A target nobody configured is refused before any job exists.
    let refused = d.ferry(&[
        "restore",
        "pg-stage",
        "--datastore",
        "postgres",
        "--from",
        "elsewhere",
        "--wait",
    ]);
    assert!(!refused.status.success());
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(
        text.contains(
            "no storage target \"elsewhere\": the coordinator knows primary, local, offsite"
        ),
        "{text}"
    );
}

/// `ferry status --output json`'s copy rows, once the copier has tried (`last_error` or
/// `last_copy` set; 60 s at most).
fn await_copy_attempt(d: &Deployment) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let status = d.ferry_json(&["status"]);
        let row = status["copies"][0].clone();
        if !row["last_error"].is_null() || !row["last_copy"].is_null() {
            return row;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the copier did not try within 60 s: {status}\n{}",
            d.log_tail("coordinator")
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// What the copy bucket holds, read with boto3 as maintenance: (keys, multipart uploads).
fn bucket_contents(c: &CephCluster, bucket: &str) -> (Vec<String>, Vec<String>) {
    let m = &c.roles().maintenance;
    let names = |v: &Value, list: &str| -> Vec<String> {
        v[list]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|o| o["Key"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let objects = c.s3_ok(m, "list_object_versions", json!({"Bucket": bucket}));
    let uploads = c.s3_ok(m, "list_multipart_uploads", json!({"Bucket": bucket}));
    (names(&objects, "Versions"), names(&uploads, "Uploads"))
}

#[test]
fn a_copy_that_fails_is_reported_and_made_once_the_fault_is_gone() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_copy_bucket("faults");
    let port = free_port();
    let mut d = Deployment::start_with(DEFAULT_DATA, |d| {
        let dir = d.dir.path().to_owned();
        let key = d.maintenance_key();
        let text = std::fs::read_to_string(&d.coordinator_config).unwrap();
        // The copy target's credentials are staging's by mistake: the bucket refuses them
        // every write.
        std::fs::write(
            &d.coordinator_config,
            format!(
                "metrics_listen = \"127.0.0.1:{port}\"\n{text}\n[[retention]]\n\
                 environment = \"production\"\nkeep_daily = 7\n\n[[environments]]\n\
                 name = \"production\"\ncopy_to = [\"offsite\"]\n{}{}",
                d.sftp_table("maintenance", &key),
                s3_table("copies.offsite", c, &bucket, &roles.staging, &dir, ""),
            ),
        )
        .unwrap();
        append(
            &d.stage_config,
            &s3_table("copies.offsite", c, &bucket, &roles.staging, &dir, ""),
        );
    });
    let series = "{environment=\"production\",target=\"offsite\"}";

    // 1. The copy is refused: the backup itself succeeded; status and metrics say the copy
    // failed and what it lacks; nothing is left in the copy bucket.
    let out = d.ferry_ok(&["backup", "pg-prod", "postgres", "--wait"]);
    assert!(out.contains("succeeded"), "{out}");
    let row = await_copy_attempt(&d);
    let error = row["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("permission denied") && error.contains("copy target"),
        "{row}"
    );
    assert_eq!(row["lacking"], 1, "{row}");
    assert!(row["last_copy"].is_null(), "{row}");
    assert_eq!(
        metric(port, &format!("ferry_copy_last_failed{series}")),
        Some(1.0)
    );
    assert_eq!(
        metric(port, &format!("ferry_copy_lacking{series}")),
        Some(1.0)
    );
    assert_eq!(bucket_contents(c, &bucket), (vec![], vec![]));
    let table = d.ferry_ok(&["status"]);
    assert!(table.contains("FAILED: "), "{table}");

    // 2. The right credentials, but the primary's archive no longer matches its manifest:
    // the copy fails on its SHA-256 and commits nothing.
    let catalog = d.ferry_json(&["backups"]);
    let stored = catalog[0]["stored_path"].as_str().unwrap().to_owned();
    let on_disk = d
        .sshd
        .root()
        .join(&stored[stored.find("/production/").unwrap() + 1..]);
    let original = std::fs::read(&on_disk).unwrap_or_else(|e| panic!("{}: {e}", on_disk.display()));
    let mut tampered = original.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0x01;
    std::fs::write(&on_disk, &tampered).unwrap();
    let text = std::fs::read_to_string(&d.coordinator_config).unwrap();
    std::fs::write(
        &d.coordinator_config,
        text.replace(
            &format!("{}-access", roles.staging.uid),
            &format!("{}-access", roles.maintenance.uid),
        )
        .replace(
            &format!("{}-secret", roles.staging.uid),
            &format!("{}-secret", roles.maintenance.uid),
        ),
    )
    .unwrap();
    key_files(&roles.maintenance, d.dir.path());
    d.start_coordinator();
    let row = await_copy_attempt(&d);
    let error = row["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("SHA-256") && error.contains("nothing was committed"),
        "{row}"
    );
    assert_eq!(row["lacking"], 1, "{row}");
    assert_eq!(
        bucket_contents(c, &bucket),
        (vec![], vec![]),
        "a copy that failed its check left something"
    );

    // 3. The archive put right, the coordinator restarted: the copy is made, status and
    // metrics say the copy target lacks nothing, and a restore from it equals the source.
    std::fs::write(&on_disk, &original).unwrap();
    d.start_coordinator();
    await_copies(&d, &["offsite"]);
    let status = d.ferry_json(&["status"]);
    let row = &status["copies"][0];
    assert_eq!(row["lacking"], 0, "{status}");
    assert_eq!(row["lag_seconds"], 0, "{status}");
    assert!(row["last_error"].is_null(), "{status}");
    assert_eq!(
        metric(port, &format!("ferry_copy_last_failed{series}")),
        Some(0.0)
    );
    assert_eq!(
        metric(port, &format!("ferry_copy_lag_seconds{series}")),
        Some(0.0)
    );
    assert_eq!(
        metric(port, &format!("ferry_copy_lacking{series}")),
        Some(0.0)
    );
    let (objects, uploads) = bucket_contents(c, &bucket);
    assert_eq!(
        (objects.len(), uploads.len()),
        (4, 0),
        "{objects:?} {uploads:?}"
    );
    restore_from(&d, "offsite", &d.prod_pg.table_fingerprints("app"));
}
