//! Object Lock by retention tier on the S3 target (issue 17), against a real Ceph RGW with
//! the bucket policy of `docs/s3-bucket-policy.json`; every lock is read with the stock
//! client (boto3 `get_object_retention`, `tests/tools/s3.py`), not Ferry's reader:
//! - after a backup, every version of every object of its dated folder is locked until
//!   its date + `keep_daily` (UTC midnight), and `ferry backups` shows that retain-until;
//! - a delete of a locked version is refused to each of the three credential sets;
//! - over a hundred simulated nights (objects written in dated folders with production's
//!   write session, catalog records written as the coordinator writes them), `ferry prune
//!   --dry-run` shows each folder's retain-until and keeps a dropped folder still locked
//!   ("locked until ..."); `ferry prune` then leaves exactly the folders it kept, every
//!   remaining version locked until its tier's horizon (daily date + 7 days, weekly date +
//!   4 weeks, monthly date + 3 months, the longest of its tiers), and the folders the policy
//!   dropped whose lock had expired are gone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Datelike, Days, Months, NaiveDate, Utc};
use redb::ReadableTable;
use serde_json::{Value, json};

use ferry_core::layout::StoredFile;
use ferry_core::manifest::Manifest;
use ferry_storage::{Target, TargetConfig, chunk};
use ferry_tests::*;

/// The prefix the targets write under.
const PREFIX: &str = "ferry";

/// The retention policy of `production`.
const KEEP_DAILY: u64 = 7;
const KEEP_WEEKLY: u64 = 4;
const KEEP_MONTHLY: u32 = 3;

/// Production's write target on `bucket`.
fn production_target(c: &CephCluster, bucket: &str, dir: &std::path::Path) -> Arc<dyn Target> {
    let (access, secret) = key_files(&c.roles().production, dir);
    let config: TargetConfig = serde_json::from_value(json!({
        "kind": "s3", "endpoint": c.endpoint(), "bucket": bucket, "prefix": PREFIX,
        "path_style": true, "access_key_file": access, "secret_key_file": secret,
        "io_timeout_seconds": 30,
    }))
    .unwrap();
    config.build().unwrap()
}

/// Writes and commits a backup of `data` named `name` in `date`'s folder of production,
/// with its manifest, through production's write session.
fn write_backup(target: &dyn Target, date: NaiveDate, name: &str, data: &[u8]) {
    let file = StoredFile {
        dir: target.dated_dir("production", date),
        name: name.to_owned(),
    };
    let seed = include_bytes!("../fuzz/corpus/manifest/seed-main");
    let mut m = Manifest::from_slice("seed.json", seed).unwrap();
    m.file = name.into();
    m.part = String::new();
    m.companions = Vec::new();
    let (tx, rx) = chunk::channel();
    tx.send(data.to_vec()).unwrap();
    drop(tx);
    let mut w = target.write().unwrap();
    let staged = w
        .stage(&file, "01KBX8Z3E5M1Q2W3E4R5T6Y7U8", rx)
        .unwrap_or_else(|e| panic!("stage {}: {e}", file.path()));
    w.commit("01KBX8Z3E5M1Q2W3E4R5T6Y7U8", &[(staged, m.to_json())])
        .unwrap_or_else(|e| panic!("commit {}: {e}", file.path()));
}

/// Every version of every object under `prefix`, listed with boto3 as maintenance:
/// `(key, version id)`; panics on a delete marker.
fn versions(c: &CephCluster, bucket: &str, prefix: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut params = json!({"Bucket": bucket, "Prefix": prefix});
    loop {
        let page = c.s3_ok(
            &c.roles().maintenance,
            "list_object_versions",
            params.clone(),
        );
        assert!(
            page["DeleteMarkers"]
                .as_array()
                .is_none_or(|a| a.is_empty()),
            "delete markers: {page}"
        );
        for v in page["Versions"].as_array().cloned().unwrap_or_default() {
            out.push((
                v["Key"].as_str().unwrap().to_owned(),
                v["VersionId"].as_str().unwrap().to_owned(),
            ));
        }
        if page["IsTruncated"] != true {
            return out;
        }
        params["KeyMarker"] = page["NextKeyMarker"].clone();
        params["VersionIdMarker"] = page["NextVersionIdMarker"].clone();
    }
}

/// The retention of one version, read with boto3 as maintenance: `(mode, retain-until)`,
/// `None` if it has none.
fn retention(
    c: &CephCluster,
    bucket: &str,
    key: &str,
    version: &str,
) -> Option<(String, DateTime<Utc>)> {
    match c.s3(
        &c.roles().maintenance,
        "get_object_retention",
        json!({"Bucket": bucket, "Key": key, "VersionId": version}),
    ) {
        Ok(r) => Some((
            r["Retention"]["Mode"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            DateTime::parse_from_rfc3339(r["Retention"]["RetainUntilDate"].as_str().unwrap())
                .unwrap()
                .with_timezone(&Utc),
        )),
        Err(e) => {
            assert!(
                e.code.contains("ObjectLockConfigurationNotFound")
                    || e.code == "NoSuchObjectLockConfiguration",
                "get_object_retention {key}: {e}"
            );
            None
        }
    }
}

/// UTC midnight at the start of `date`.
fn midnight(date: NaiveDate) -> DateTime<Utc> {
    date.and_hms_opt(0, 0, 0).unwrap().and_utc()
}

/// The date of the dated folder of `key` (`<prefix>/production/<date>/<name>`).
fn date_of(key: &str) -> NaiveDate {
    key.split('/').nth(2).unwrap().parse().unwrap()
}

/// The catalog's table as the coordinator's store defines it.
const BACKUPS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("backups");

/// Adds catalog records for `dates` (copies of the first one, dated and named for each
/// date) with the coordinator stopped, then starts it again.
fn write_history(d: &mut Deployment, dates: &[NaiveDate]) {
    d.kill("coordinator");
    {
        let db = redb::Database::open(d.dir.path().join("coordinator.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(BACKUPS).unwrap();
            let real: Value = {
                let (_, v) = t.iter().unwrap().next().unwrap().unwrap();
                serde_json::from_slice(v.value()).unwrap()
            };
            for (i, date) in dates.iter().enumerate() {
                let ms = date
                    .and_hms_opt(2, 0, 0)
                    .unwrap()
                    .and_utc()
                    .timestamp_millis();
                let day = date.format("%Y-%m-%d").to_string();
                let mut r = real.clone();
                r["date"] = json!(day);
                r["stored_path"] = json!(format!(
                    "{PREFIX}/production/{day}/postgres_backup_{day}.pgdump.zst.age"
                ));
                r["finished_ms"] = json!(ms);
                r["job_id"] = json!(format!("sim{i:03}"));
                r["retain_until_ms"] = Value::Null;
                let key = format!("{ms:020}\0sim{i:03}");
                t.insert(key.as_str(), serde_json::to_vec(&r).unwrap().as_slice())
                    .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    d.start_coordinator();
}

#[test]
fn locks_follow_the_retention_tiers_and_prune_removes_only_expired_dropped_folders() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_bucket("locks");
    let mut d = Deployment::start_with(DEFAULT_DATA, |d| {
        let dir = d.dir.path().to_owned();
        use_s3_backup_server(d, c, &bucket);
        let maintenance = s3_table(
            "maintenance",
            c,
            &bucket,
            &roles.maintenance,
            &dir,
            "lock = { mode = \"compliance\" }\n",
        );
        append(
            &d.coordinator_config,
            &format!(
                "\n[[retention]]\nenvironment = \"production\"\nkeep_daily = {KEEP_DAILY}\n\
                 keep_weekly = {KEEP_WEEKLY}\nkeep_monthly = {KEEP_MONTHLY}\n\n{maintenance}"
            ),
        );
    });

    // A real backup: every version of its folder is locked until today + keep_daily.
    let out = d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    assert!(out.contains("succeeded"), "{out}");
    let today = Utc::now().date_naive();
    let daily = midnight(today + Days::new(KEEP_DAILY));
    let today_prefix = format!("{PREFIX}/production/{today}/");
    let written = versions(c, &bucket, &today_prefix);
    assert_eq!(written.len(), 4, "data parts and manifests: {written:?}");
    for (key, version) in &written {
        assert_eq!(
            retention(c, &bucket, key, version),
            Some(("COMPLIANCE".to_owned(), daily)),
            "{key} {version}"
        );
    }
    let listed = d.ferry_json(&["backups"]);
    let want = daily.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    for b in listed.as_array().unwrap() {
        assert_eq!(b["retain_until"], json!(want), "{listed}");
        assert_eq!(b["lock_error"], Value::Null, "{listed}");
    }
    let table = d.ferry_ok(&["backups"]);
    assert!(
        table.contains("RETAIN UNTIL") && table.contains(&want),
        "{table}"
    );

    // A delete of a locked version is refused to each of the three credential sets.
    let (key, version) = &written[0];
    for (who, user) in [
        ("production", &roles.production),
        ("staging", &roles.staging),
        ("maintenance", &roles.maintenance),
    ] {
        let r = c.s3(
            user,
            "delete_object",
            json!({"Bucket": bucket, "Key": key, "VersionId": version}),
        );
        assert!(r.is_err(), "{who} deleted a locked version of {key}: {r:?}");
    }
    assert_eq!(
        versions(c, &bucket, &today_prefix),
        written,
        "a locked version went"
    );

    // 99 nights before today, written by production's write session and recorded in the
    // catalog as the coordinator records them.
    let history: Vec<NaiveDate> = (1..100).map(|i| today - Days::new(i)).collect();
    let dir = tempfile::tempdir().unwrap();
    let production = production_target(c, &bucket, dir.path());
    std::thread::scope(|scope| {
        for dates in history.chunks(25) {
            let production = &production;
            scope.spawn(move || {
                for date in dates {
                    write_backup(
                        &**production,
                        *date,
                        &format!("postgres_backup_{date}.pgdump.zst.age"),
                        format!("night of {date}").as_bytes(),
                    );
                }
            });
        }
    });
    write_history(&mut d, &history);
    // One night the policy drops, still locked (say, by a longer policy of before):
    // 40 days ago, locked until the day after tomorrow.
    let mut held = today - Days::new(40);
    if (held + Days::new(1)).day() == 1 {
        // A month's last day may be a monthly keeper.
        held = held - Days::new(1);
    }
    let held_until = midnight(today + Days::new(2));
    for (key, version) in versions(c, &bucket, &format!("{PREFIX}/production/{held}/")) {
        c.s3_ok(
            &roles.maintenance,
            "put_object_retention",
            json!({"Bucket": bucket, "Key": key, "VersionId": version,
                   "Retention": {"Mode": "COMPLIANCE",
                                 "RetainUntilDate": held_until.to_rfc3339()}}),
        );
    }

    // The dry run: each folder's retain-until; the held one kept "locked until ...".
    let plan = d.ferry_json(&["prune", "--env", "production", "--dry-run"]);
    let plan = plan.as_array().unwrap_or_else(|| panic!("{plan}"));
    assert_eq!(plan.len(), 100, "{plan:?}");
    let horizon = |date: NaiveDate, keep: &[String]| {
        let mut h = midnight(date + Days::new(KEEP_DAILY));
        if keep.iter().any(|k| k == "weekly") {
            h = h.max(midnight(date + Days::new(7 * KEEP_WEEKLY)));
        }
        if keep.iter().any(|k| k == "monthly") {
            h = h.max(midnight(
                date.checked_add_months(Months::new(KEEP_MONTHLY)).unwrap(),
            ));
        }
        h
    };
    let mut kept: BTreeMap<NaiveDate, DateTime<Utc>> = BTreeMap::new();
    for p in plan {
        let date: NaiveDate = p["date"].as_str().unwrap().parse().unwrap();
        let keep: Vec<String> = p["keep"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect();
        if date == held {
            assert_eq!(
                keep,
                [format!(
                    "locked until {}",
                    held_until.format("%Y-%m-%dT%H:%M:%SZ")
                )],
                "{p}"
            );
            assert_eq!(
                p["retain_until"],
                json!(held_until.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            );
            kept.insert(date, held_until);
        } else if keep.is_empty() {
            assert_eq!(p["retain_until"], Value::Null, "{p}");
        } else {
            let h = horizon(date, &keep);
            assert_eq!(
                p["retain_until"],
                json!(h.format("%Y-%m-%dT%H:%M:%SZ").to_string()),
                "{p}"
            );
            kept.insert(date, h);
        }
    }
    // 7 days, 2 more weeks, 2 more months, and the held one.
    assert!((10..=15).contains(&kept.len()), "kept {kept:?} of {plan:?}");
    assert_eq!(
        versions(c, &bucket, &format!("{PREFIX}/production/")).len(),
        4 + 2 * 99,
        "the dry run removed something"
    );

    let out = d.ferry_json(&["prune", "--env", "production"]);
    assert!(out.is_array(), "{out}");
    // What remains: exactly the kept folders, every version locked to its horizon.
    let remaining = versions(c, &bucket, &format!("{PREFIX}/production/"));
    let dates: BTreeSet<NaiveDate> = remaining.iter().map(|(k, _)| date_of(k)).collect();
    assert_eq!(
        dates,
        kept.keys().copied().collect::<BTreeSet<_>>(),
        "the folders left are not the kept ones"
    );
    let read: Vec<_> = std::thread::scope(|scope| {
        let threads: Vec<_> = remaining
            .chunks(remaining.len().div_ceil(4).max(1))
            .map(|versions| {
                let bucket = &bucket;
                scope.spawn(move || {
                    versions
                        .iter()
                        .map(|(key, version)| {
                            (
                                key.clone(),
                                version.clone(),
                                retention(c, bucket, key, version),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    for (key, version, got) in read {
        let want = kept[&date_of(&key)];
        assert_eq!(
            got,
            Some(("COMPLIANCE".to_owned(), want)),
            "{key} {version}"
        );
    }
    // The catalog follows: `ferry backups` lists the kept dates with their retain-until.
    let listed = d.ferry_json(&["backups", "--env", "production"]);
    let mut shown: BTreeMap<NaiveDate, String> = BTreeMap::new();
    for b in listed.as_array().unwrap() {
        shown.insert(
            b["date"].as_str().unwrap().parse().unwrap(),
            b["retain_until"].as_str().unwrap_or_default().to_owned(),
        );
    }
    let want: BTreeMap<NaiveDate, String> = kept
        .iter()
        .map(|(d, h)| (*d, h.format("%Y-%m-%dT%H:%M:%SZ").to_string()))
        .collect();
    assert_eq!(shown, want, "{listed}");
}

#[test]
fn a_backup_whose_lock_fails_is_shown_not_locked_and_the_next_prune_locks_it() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_bucket("lockfail");
    let metrics_port = free_port();
    // The coordinator's [maintenance] holds staging's keys by mistake: the bucket policy
    // refuses them PutObjectRetention.
    let mut d = Deployment::start_with(DEFAULT_DATA, |d| {
        let dir = d.dir.path().to_owned();
        use_s3_backup_server(d, c, &bucket);
        let maintenance = s3_table(
            "maintenance",
            c,
            &bucket,
            &roles.staging,
            &dir,
            "lock = { mode = \"compliance\" }\n",
        );
        append(
            &d.coordinator_config,
            &format!(
                "\n[[retention]]\nenvironment = \"production\"\nkeep_daily = {KEEP_DAILY}\n\n{maintenance}"
            ),
        );
        let text = std::fs::read_to_string(&d.coordinator_config).unwrap();
        std::fs::write(
            &d.coordinator_config,
            format!("metrics_listen = \"127.0.0.1:{metrics_port}\"\n{text}"),
        )
        .unwrap();
    });
    let out = d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    assert!(out.contains("succeeded"), "{out}");
    let today = Utc::now().date_naive();
    let daily = midnight(today + Days::new(KEEP_DAILY));
    let written = versions(c, &bucket, &format!("{PREFIX}/production/{today}/"));
    assert_eq!(written.len(), 4, "{written:?}");
    for (key, version) in &written {
        assert_eq!(retention(c, &bucket, key, version), None, "{key}");
    }
    // Not silently unlocked: the catalog says so, and `ferry backups` shows it.
    let listed = d.ferry_json(&["backups"]);
    let until = daily.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    for b in listed.as_array().unwrap() {
        let note = b["lock_error"].as_str().unwrap_or_default();
        assert!(
            note.starts_with(&format!("not locked until {until}: ")),
            "{listed}"
        );
        assert_eq!(b["retain_until"], Value::Null, "{listed}");
    }
    let table = d.ferry_ok(&["backups"]);
    assert!(table.contains("NOT LOCKED ("), "{table}");
    let records = listed.as_array().unwrap().len();
    assert!(
        scrape(metrics_port).contains(&format!(
            "ferry_backups_unlocked{{environment=\"production\"}} {records}"
        )),
        "{}",
        scrape(metrics_port)
    );

    // With the maintenance keys, the next prune locks the folder and clears the note.
    let config = std::fs::read_to_string(&d.coordinator_config).unwrap();
    let dir = d.dir.path().to_owned();
    let (staging_access, staging_secret) = key_files(&roles.staging, &dir);
    let (access, secret) = key_files(&roles.maintenance, &dir);
    let start = config.find("[maintenance]").unwrap();
    let fixed = config[start..]
        .replace(&staging_access, &access)
        .replace(&staging_secret, &secret);
    std::fs::write(
        &d.coordinator_config,
        format!("{}{fixed}", &config[..start]),
    )
    .unwrap();
    d.start_coordinator();
    d.ferry_json(&["prune", "--env", "production"]);
    for (key, version) in &written {
        assert_eq!(
            retention(c, &bucket, key, version),
            Some(("COMPLIANCE".to_owned(), daily)),
            "{key}"
        );
    }
    let listed = d.ferry_json(&["backups"]);
    for b in listed.as_array().unwrap() {
        assert_eq!(b["lock_error"], Value::Null, "{listed}");
        assert_eq!(b["retain_until"], json!(until), "{listed}");
    }
    assert!(
        scrape(metrics_port).contains("ferry_backups_unlocked{environment=\"production\"} 0"),
        "{}",
        scrape(metrics_port)
    );
}

/// The body of `GET /metrics` on 127.0.0.1:`port`.
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.split_once("\r\n\r\n").unwrap().1.to_owned()
}
