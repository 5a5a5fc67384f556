//! Operating Ferry (issue 5) end to end, on real PostgreSQL, SecantusDB, sshd and the real
//! binaries:
//! - the audit log records every command and order by certificate name, and `ferry audit
//!   --verify` finds an entry edited in the coordinator's store;
//! - `/metrics` answers the 0.0.4 text format (which `promtool check metrics` passes) unless
//!   asked for OpenMetrics, carries the expected series, and every job counter from 0;
//! - the alert rules pass `promtool check rules` and their unit tests (`promtool test
//!   rules`): a verify neither fires nor resolves the restore alert, and has one of its own;
//! - `ferry verify` checks without restoring and catches a one-byte change;
//! - GFS retention over 100 simulated days, `ferry prune` with the maintenance key;
//! - a backup set across PostgreSQL, MongoDB and files is not restored while a member is
//!   missing, and restores as one once complete;
//! - restore drills run smoke checks and report RTO and RPO; a verify after a drill hides
//!   neither the drill in `ferry status` nor its series (and RPO) in `/metrics`;
//! - triggers the agent would refuse (unknown datastore, `--type` or `--ns` where the
//!   datastore takes none, an agent never described) are refused before any job exists;
//! - a 10 kB environment and a 1 MiB job id come back cut in short, readable errors;
//! - the CLI stops quietly when its reader goes (`| head -1`), escapes control characters
//!   in tables, and its errors name the flag and file at fault, each cause once.

use ferry_tests::*;
use redb::ReadableTable;

/// The audit table as the coordinator's store defines it.
const AUDIT: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("audit");

#[test]
fn audit_log_records_commands_and_orders_and_detects_an_edited_entry() {
    let mut d = Deployment::start();
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    let refused = d.ferry(&["backup", "pg-stage"]);
    assert!(!refused.status.success());

    let log = d.ferry_json(&["audit"]);
    let entries = log.as_array().unwrap();
    let find = |who: &str, action: &str, target: &str| {
        entries.iter().find(|e| {
            e["who"] == who
                && e["action"] == action
                && e["target"].as_str().unwrap().contains(target)
        })
    };
    let trigger = find("operator", "trigger backup", "pg-prod/*").expect("the operator's backup");
    assert!(
        trigger["outcome"]
            .as_str()
            .unwrap()
            .starts_with("ok: jobs "),
        "{trigger}"
    );
    let order = find("coordinator", "order backup", "pg-prod/postgres").expect("the order");
    assert!(
        order["outcome"].as_str().unwrap().contains("sent"),
        "{order}"
    );
    let done = find("coordinator", "backup finished", "pg-prod/postgres").expect("the outcome");
    assert_eq!(done["outcome"], "succeeded");
    let no = find("operator", "trigger backup", "pg-stage/*").expect("the refused command");
    assert!(
        no["outcome"].as_str().unwrap().starts_with("refused: "),
        "{no}"
    );

    let ok = d.ferry_ok(&["audit", "--verify"]);
    assert!(ok.contains("audit log intact"), "{ok}");

    // Someone with access to the store file rewrites what the operator did.
    d.kill("coordinator");
    let store = d.dir.path().join("coordinator.redb");
    {
        let db = redb::Database::open(&store).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(AUDIT).unwrap();
            let seq = trigger["seq"].as_u64().unwrap();
            let mut e: serde_json::Value =
                serde_json::from_slice(t.get(seq).unwrap().unwrap().value()).unwrap();
            e["who"] = serde_json::json!("somebody-else");
            let bytes = serde_json::to_vec(&e).unwrap();
            t.insert(seq, bytes.as_slice()).unwrap();
        }
        tx.commit().unwrap();
    }
    d.start_coordinator();
    let out = d.ferry(&["audit", "--verify"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("entry {} was edited", trigger["seq"])),
        "{text}"
    );
}

/// `GET /metrics` on 127.0.0.1:`port` with `Accept: text/plain;version=0.0.4`: (status
/// line, body).
fn scrape(port: u16) -> (String, String) {
    let (status, _, body) = scrape_accepting(port, Some("text/plain;version=0.0.4"));
    (status, body)
}

/// `GET /metrics` on 127.0.0.1:`port` with `accept` as its `Accept` header (none if
/// `None`): (status line, Content-Type, body).
fn scrape_accepting(port: u16, accept: Option<&str>) -> (String, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n{accept}\r\n").as_bytes())
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    (
        head.lines().next().unwrap().to_owned(),
        content_type,
        body.to_owned(),
    )
}

/// `promtool check metrics` on `body` (the Debian package `prometheus` has promtool):
/// panics with promtool's complaints if it finds any.
fn promtool_check_metrics(body: &str) {
    let promtool = require("promtool", "prometheus");
    let out = output_within(
        std::process::Command::new(promtool).args(["check", "metrics"]),
        body.as_bytes(),
        std::time::Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- body\n{body}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metrics_parse_as_prometheus_text_and_carry_the_expected_series() {
    let port = free_port();
    let d = Deployment::start_with(DEFAULT_DATA, |d| {
        let text = std::fs::read_to_string(&d.coordinator_config).unwrap();
        std::fs::write(
            &d.coordinator_config,
            format!("metrics_listen = \"127.0.0.1:{port}\"\n{text}"),
        )
        .unwrap();
    });
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    d.ferry_ok(&["restore", "pg-stage", "--wait"]);
    // One datastore on its own skips the set check: the agent finds no such date and the
    // job fails.
    let refused = d.ferry(&[
        "restore",
        "pg-stage",
        "--datastore",
        "postgres",
        "--date",
        "2001-01-01",
        "--wait",
    ]);
    assert!(!refused.status.success());

    // What promtool and older scrapers ask for: the 0.0.4 text format, HELP and TYPE for
    // every family, and promtool finds nothing to complain of.
    let (status, content_type, body) = scrape_accepting(port, Some("text/plain;version=0.0.4"));
    assert!(status.contains("200"), "{status}");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert!(!body.contains("# EOF"), "{body}");
    assert!(
        body.contains("# TYPE ferry_jobs_total counter\n")
            && body.contains("# HELP ferry_jobs_total "),
        "{body}"
    );
    promtool_check_metrics(&body);
    // No Accept header at all: the same.
    let (_, content_type, _) = scrape_accepting(port, None);
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    // What Prometheus asks for: OpenMetrics.
    let (_, content_type, om) = scrape_accepting(
        port,
        Some(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
             version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        ),
    );
    assert!(
        content_type.starts_with("application/openmetrics-text; version=1.0.0"),
        "{content_type}"
    );
    assert!(
        om.ends_with("# EOF\n") && om.contains("# TYPE ferry_jobs counter\n"),
        "{om}"
    );

    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let value = |metric: &str, agent: &str, kind: &str| {
        scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == metric
                    && s.labels.get("agent") == Some(agent)
                    && s.labels.get("kind") == Some(kind)
                    && s.labels.get("datastore") == Some("postgres")
            })
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let backed_up = value("ferry_last_success_timestamp_seconds", "pg-prod", "backup")
        .unwrap_or_else(|| panic!("no last success series:\n{body}"));
    assert!((now - backed_up).abs() < 300.0, "{backed_up} vs {now}");
    assert!(value("ferry_last_success_stored_bytes", "pg-prod", "backup").unwrap() > 1000.0);
    assert!(value("ferry_last_success_duration_seconds", "pg-stage", "restore").unwrap() > 0.0);
    // The newest staging job is the refused date: it failed.
    assert_eq!(
        value("ferry_last_job_succeeded", "pg-stage", "restore"),
        Some(0.0)
    );
    let jobs = |kind: &str, outcome: &str| {
        scrape.samples.iter().find(|s| {
            s.metric == "ferry_jobs_total"
                && s.labels.get("kind") == Some(kind)
                && s.labels.get("outcome") == Some(outcome)
        })
    };
    assert!(jobs("backup", "succeeded").is_some(), "{body}");
    let set = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "ferry_backup_set_complete"
                && s.labels.get("environment") == Some("production")
        })
        .unwrap_or_else(|| panic!("no set series:\n{body}"));
    assert!(
        matches!(set.value, prometheus_parse::Value::Gauge(v) if v == 1.0),
        "{body}"
    );
    assert!(jobs("restore", "failed").is_some(), "{body}");
    // Every kind and outcome exists from the start, at 0 until its first job, so that
    // increase() sees the first one.
    let verify_failed = jobs("verify", "failed").unwrap_or_else(|| panic!("{body}"));
    assert!(
        matches!(verify_failed.value, prometheus_parse::Value::Counter(v) if v == 0.0),
        "{body}"
    );
}

#[test]
fn alert_rules_pass_promtool_and_follow_each_job_kind() {
    // deploy/prometheus/ferry-alerts.test.yml: a failed drill keeps FerryRestoreFailed
    // firing through a successful verify; a failed verify fires FerryVerifyFailed.
    let promtool = require("promtool", "prometheus");
    let dir = workspace_root().join("deploy/prometheus");
    for args in [
        ["check", "rules", "ferry-alerts.yml"],
        ["test", "rules", "ferry-alerts.test.yml"],
    ] {
        let out = output_within(
            std::process::Command::new(&promtool)
                .args(args)
                .current_dir(&dir),
            b"",
            std::time::Duration::from_secs(120),
        );
        assert!(
            out.status.success(),
            "promtool {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn verify_checks_without_restoring_and_catches_a_one_byte_change() {
    let d = Deployment::start();
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    let before = d.stage_pg.databases();

    let out = d.ferry_ok(&["verify", "pg-stage", "--wait"]);
    assert!(
        out.contains("decrypted and decompressed to the end"),
        "{out}"
    );
    assert_eq!(before, d.stage_pg.databases(), "verify restored something");
    let jobs = d.ferry_json(&["jobs"]);
    assert!(
        jobs.as_array()
            .unwrap()
            .iter()
            .any(|j| j["kind"] == "verify" && j["state"] == "succeeded"),
        "{jobs}"
    );

    // One byte changed: age's authentication (or, past the last chunk read, the SHA-256)
    // refuses it.
    let (name, _) = d.todays_backup("postgres", "pgdump.zst.age");
    let path = d.sshd.root().join(&name);
    chmod(&path, 0o640);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let out = d.ferry(&["verify", "pg-stage", "--datastore", "postgres", "--wait"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("does not match its manifest") || text.contains("does not decrypt"),
        "{text}"
    );

    // The manifest rewritten to match the changed file: age's authentication still fails.
    let sum = run_ok(std::process::Command::new("sha256sum").arg(&path));
    d.edit_todays_manifest("postgres", "pgdump.zst.age", |m| {
        m["sha256"] = serde_json::json!(sum.split_whitespace().next().unwrap());
    });
    let out = d.ferry(&["verify", "pg-stage", "--datastore", "postgres", "--wait"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("does not decrypt and decompress to its end"),
        "{text}"
    );
}

/// The catalog's table as the coordinator's store defines it.
const BACKUPS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("backups");

/// Writes catalog records dated `dates` (copies of the real one, which is kept only if
/// `keep_real`) with the coordinator stopped, then starts it again.
fn write_history(
    d: &mut Deployment,
    dates: impl Iterator<Item = chrono::NaiveDate>,
    keep_real: bool,
) {
    d.kill("coordinator");
    {
        let db = redb::Database::open(d.dir.path().join("coordinator.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(BACKUPS).unwrap();
            let (key, real): (String, serde_json::Value) = {
                let (k, v) = t.iter().unwrap().next().unwrap().unwrap();
                (
                    k.value().to_owned(),
                    serde_json::from_slice(v.value()).unwrap(),
                )
            };
            if !keep_real {
                t.remove(key.as_str()).unwrap();
            }
            for (i, date) in dates.enumerate() {
                let ms = date
                    .and_hms_opt(2, 0, 0)
                    .unwrap()
                    .and_utc()
                    .timestamp_millis();
                let mut r = real.clone();
                r["date"] = serde_json::json!(date.format("%Y-%m-%d").to_string());
                r["finished_ms"] = serde_json::json!(ms);
                r["job_id"] = serde_json::json!(format!("sim{i:03}"));
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
fn prune_dry_run_applies_gfs_to_a_hundred_days_of_backups_and_never_drops_the_newest() {
    let mut d = Deployment::start_with(DEFAULT_DATA, |d| {
        append(
            &d.coordinator_config,
            "[[retention]]\nenvironment = \"production\"\nkeep_daily = 7\nkeep_weekly = 4\nkeep_monthly = 3\n",
        );
    });
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    // A hundred nights of history, 2026-01-01 to 2026-04-10, written into the catalog
    // the way the coordinator writes it (a simulated clock).
    let start = chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
    write_history(
        &mut d,
        (0..100).map(|i| start + chrono::Days::new(i)),
        false,
    );
    d.start_coordinator();

    let plan = d.ferry_json(&["prune", "--env", "production", "--dry-run"]);
    let kept: Vec<&str> = plan
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["remove"] == false)
        .map(|p| p["date"].as_str().unwrap())
        .collect();
    assert_eq!(
        kept,
        [
            "2026-04-10",
            "2026-04-09",
            "2026-04-08",
            "2026-04-07",
            "2026-04-06",
            "2026-04-05",
            "2026-04-04",
            "2026-03-31",
            "2026-03-29",
            "2026-03-22",
            "2026-02-28"
        ],
        "{plan}"
    );
    assert_eq!(plan[0]["keep"][0], "newest");
    assert_eq!(plan.as_array().unwrap().len(), 100);

    // Without --dry-run nothing is deleted: the coordinator has no deletion key yet.
    let out = d.ferry(&["prune", "--env", "production"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing was removed"),
        "{out:?}"
    );
    assert!(
        d.sshd
            .final_files()
            .iter()
            .any(|f| f.ends_with(".pgdump.zst.age"))
    );
}

#[test]
fn a_set_with_a_failed_member_is_not_restored_and_a_complete_set_restores_as_one() {
    let mut dirs = None;
    let mut mongos = None;
    let d = Deployment::start_with(DEFAULT_DATA, |d| {
        let prod = MongoServer::start(&d.dir.path().join("mongo-prod"));
        let stage = MongoServer::start(&d.dir.path().join("mongo-stage"));
        for (config, server) in [(&d.prod_config, &prod), (&d.stage_config, &stage)] {
            append(config, &server.datastore_toml());
        }
        mongos = Some((prod, stage));
        // Production's files datastore points at a directory that does not exist yet:
        // its backup fails, and the night's set is incomplete.
        let source = d.dir.path().join("minio-prod");
        let target = d.dir.path().join("minio-stage");
        append(
            &d.prod_config,
            &format!(
                "[[datastores]]\nname = \"minio\"\nkind = \"files\"\npath = \"{}\"\n",
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
        dirs = Some((source, target));
    });
    let (source, target) = dirs.unwrap();
    let (mongo_prod, mongo_stage) = mongos.unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let count = |uri: String| {
        rt.block_on(async move {
            let c = mongodb::Client::with_uri_str(&uri).await.unwrap();
            c.database("shop")
                .collection::<bson::Document>("orders")
                .count_documents(bson::doc! {})
                .await
                .unwrap()
        })
    };
    rt.block_on(async {
        let c = mongodb::Client::with_uri_str(&mongo_prod.uri())
            .await
            .unwrap();
        let docs: Vec<bson::Document> = (0..2_000i32)
            .map(|i| bson::doc! {"_id": i, "qty": i % 7})
            .collect();
        c.database("shop")
            .collection::<bson::Document>("orders")
            .insert_many(docs)
            .await
            .unwrap();
    });
    let out = d.ferry(&["backup", "pg-prod", "--wait"]);
    assert!(!out.status.success(), "the files backup should have failed");

    let sets = d.ferry_json(&["backups", "--sets"]);
    assert_eq!(sets[0]["complete"], false, "{sets}");
    let before = d.stage_pg.databases();
    let out = d.ferry(&["restore", "pg-stage", "--wait"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        text.contains("no complete backup set of production") && text.contains("pg-prod/minio"),
        "{text}"
    );
    assert_eq!(
        before,
        d.stage_pg.databases(),
        "an incomplete set was restored"
    );
    assert!(!target.exists());

    // The missing member backed up: the set is complete and restores as one.
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("object"), b"from the same night").unwrap();
    d.ferry_ok(&["backup", "pg-prod", "minio", "--wait"]);
    let sets = d.ferry_json(&["backups", "--sets"]);
    assert_eq!(sets[0]["complete"], true, "{sets}");
    assert_eq!(sets[0]["members"].as_array().unwrap().len(), 3, "{sets}");
    assert_eq!(
        count(mongo_stage.uri()),
        0,
        "staging restored before the set was complete"
    );
    d.ferry_ok(&["restore", "pg-stage", "--wait"]);
    assert_eq!(
        d.prod_pg.table_fingerprints("app"),
        d.stage_pg.table_fingerprints("app")
    );
    assert_eq!(
        std::fs::read(target.join("object")).unwrap(),
        b"from the same night"
    );
    let jobs = d.ferry_json(&["jobs"]);
    let restores: Vec<&serde_json::Value> = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["kind"] == "restore" && j["state"] == "succeeded")
        .collect();
    assert_eq!(count(mongo_stage.uri()), count(mongo_prod.uri()));
    assert_eq!(restores.len(), 3, "{jobs}");
    assert!(
        restores.iter().all(|j| j["date"] == sets[0]["date"]),
        "both restores come from the set's date: {jobs}"
    );
}

/// `ferry status --output json`'s row for the staging agent.
fn staging_status(status: &serde_json::Value) -> &serde_json::Value {
    status["datastores"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["agent"] == "pg-stage")
        .unwrap()
}

/// A deployment whose staging PostgreSQL datastore has `smoke` as its smoke checks.
fn with_smoke(smoke: &str) -> Deployment {
    let smoke = smoke.to_owned();
    Deployment::start_with(DEFAULT_DATA, move |d| {
        // The staging config's last table is its postgres datastore.
        append(&d.stage_config, &format!("smoke = {smoke}\n"));
    })
}

#[test]
fn a_restore_drill_runs_its_smoke_checks_and_status_shows_rto_and_rpo() {
    let d = with_smoke(r#"[{ sql = "SELECT count(*) FROM notes", min = 1 }]"#);
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    let out = d.ferry_ok(&["restore", "pg-stage", "--wait"]);
    assert!(
        out.contains("smoke checks passed: SELECT count(*) FROM notes ="),
        "{out}"
    );
    let status = d.ferry_json(&["status"]);
    let stage = staging_status(&status);
    let drill = &stage["last_drill"];
    assert_eq!(drill["passed"], true, "{status}");
    let rto = drill["rto_seconds"].as_f64().unwrap();
    let rpo = drill["rpo_seconds"].as_f64().unwrap();
    assert!(rto > 0.0 && rto < 600.0, "{drill}");
    // The backup was taken moments before: the restored data is seconds old.
    assert!((0.0..600.0).contains(&rpo), "{drill}");
    assert!(d.ferry_ok(&["status"]).contains("pass RTO"));
}

#[test]
fn a_restore_drill_below_its_smoke_minimum_fails_and_says_the_data_is_in_place() {
    let d = with_smoke(r#"[{ sql = "SELECT count(*) FROM notes", min = 1000000000 }]"#);
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    let out = d.ferry(&["restore", "pg-stage", "--wait"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("smoke check") && text.contains("at least 1000000000"),
        "{text}"
    );
    assert!(text.contains("the restored data is in place"), "{text}");
    let status = d.ferry_json(&["status"]);
    let stage = staging_status(&status);
    assert_eq!(stage["last_drill"]["passed"], false, "{status}");
}

#[test]
fn prune_with_the_maintenance_key_removes_what_the_policy_drops_and_keeps_the_newest() {
    let mut d = Deployment::start_with(DEFAULT_DATA, |d| {
        let key = d.sshd.add_client_key_named("id_maintenance", "");
        append(
            &d.coordinator_config,
            &format!(
                "[[retention]]\nenvironment = \"production\"\nkeep_daily = 1\n{}",
                d.sftp_table("maintenance", &key)
            ),
        );
    });
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    // Three older nights: folders on the server and records in the catalog.
    let old: Vec<chrono::NaiveDate> = (1..=3)
        .map(|day| chrono::NaiveDate::from_ymd_opt(2026, 1, day).unwrap())
        .collect();
    for date in &old {
        let dir = d.sshd.root().join(format!("production/{date}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(format!("postgres_backup_{date}.pgdump.zst.age")),
            b"old",
        )
        .unwrap();
        run_ok(
            std::process::Command::new("chown")
                .args(["-R", BACKUP_USER])
                .arg(&dir),
        );
    }
    write_history(&mut d, old.iter().copied(), true);
    // Two partial uploads in today's folder: one abandoned two days ago (its agent's key
    // could not delete it), one still being written.
    let today_dir = d.sshd.root().join(format!("production/{}", today_utc()));
    let abandoned = today_dir.join(".postgres_backup_x.pgdump.zst.age.01JOB.1.partial");
    let live = today_dir.join(".postgres_backup_y.pgdump.zst.age.01JOB.2.partial");
    for p in [&abandoned, &live] {
        std::fs::write(p, b"partial").unwrap();
        run_ok(std::process::Command::new("chown").arg(BACKUP_USER).arg(p));
    }
    run_ok(
        std::process::Command::new("touch")
            .args(["-m", "-d", "2 days ago"])
            .arg(&abandoned),
    );

    let plan = d.ferry_json(&["prune", "--env", "production"]);
    assert!(
        !abandoned.exists(),
        "prune removes abandoned partial uploads"
    );
    assert!(live.exists(), "prune leaves an upload in progress alone");
    let removed: Vec<&str> = plan
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["removed"] == true)
        .map(|p| p["date"].as_str().unwrap())
        .collect();
    assert_eq!(
        removed,
        ["2026-01-03", "2026-01-02", "2026-01-01"],
        "{plan}"
    );
    for date in &old {
        assert!(!d.sshd.root().join(format!("production/{date}")).exists());
    }
    let today = today_utc();
    assert!(
        d.sshd
            .final_files()
            .iter()
            .any(|f| f.starts_with(&format!("production/{today}/"))),
        "the newest set was removed"
    );
    let listed = d.ferry_json(&["backups"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["date"] == today.as_str()),
        "{listed}"
    );
    let audit = d.ferry_json(&["audit"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "prune" && e["target"] == "production/2026-01-01"),
        "{audit}"
    );
}

/// A deployment whose coordinator serves `/metrics` on 127.0.0.1:`port`.
fn with_metrics(port: u16) -> Deployment {
    Deployment::start_with(DEFAULT_DATA, move |d| {
        let text = std::fs::read_to_string(&d.coordinator_config).unwrap();
        std::fs::write(
            &d.coordinator_config,
            format!("metrics_listen = \"127.0.0.1:{port}\"\n{text}"),
        )
        .unwrap();
    })
}

/// The value of `metric` for `agent`'s `postgres` datastore and `kind` in a scrape.
fn sample(scrape: &prometheus_parse::Scrape, metric: &str, agent: &str, kind: &str) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == metric
                && s.labels.get("agent") == Some(agent)
                && s.labels.get("kind") == Some(kind)
                && s.labels.get("datastore") == Some("postgres")
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[test]
fn a_verify_after_a_restore_keeps_the_drill_with_its_rpo_in_status_and_metrics() {
    let port = free_port();
    let d = with_metrics(port);
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    d.ferry_ok(&["restore", "pg-stage", "--wait"]);
    d.ferry_ok(&["verify", "pg-stage", "--wait"]);

    let status = d.ferry_json(&["status"]);
    let stage = staging_status(&status);
    assert_eq!(stage["last_job"]["kind"], "verify", "{status}");
    let drill = &stage["last_drill"];
    assert_eq!(drill["passed"], true, "the verify hid the drill: {status}");
    let rpo = drill["rpo_seconds"].as_f64().unwrap();
    assert!(rpo > 0.0 && rpo < 600.0, "{drill}");
    let human = d.ferry_ok(&["status"]);
    assert!(human.contains("pass RTO"), "{human}");

    let (_, body) = scrape(port);
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let value = |metric: &str, kind: &str| sample(&scrape, metric, "pg-stage", kind);
    for kind in ["restore", "verify"] {
        assert!(
            value("ferry_last_success_timestamp_seconds", kind).is_some(),
            "no {kind} series:\n{body}"
        );
        assert_eq!(
            value("ferry_last_job_succeeded", kind),
            Some(1.0),
            "{kind}:\n{body}"
        );
    }
    // The restored backup's age when the restore finished: the backup was moments older.
    let rpo = value("ferry_last_restore_rpo_seconds", "restore")
        .unwrap_or_else(|| panic!("ferry_last_restore_rpo_seconds is not set:\n{body}"));
    assert!(rpo > 0.0 && rpo < 600.0, "{rpo}\n{body}");
    assert_eq!(
        value("ferry_last_restore_rpo_seconds", "verify"),
        None,
        "{body}"
    );
}

/// `ferry ARGS`, expected to be refused: its stderr, after checking it failed and said
/// `code` and every one of `says`.
fn refused(d: &Deployment, args: &[&str], code: &str, says: &[&str]) -> String {
    let out = d.ferry(args);
    let cut = |s: &str| s.chars().take(2_000).collect::<String>();
    let (err, what) = (String::from_utf8_lossy(&out.stderr), cut(&args.join(" ")));
    assert!(
        !out.status.success(),
        "ferry {what} was accepted: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(err.contains(code), "ferry {what}: {}", cut(&err));
    for s in says {
        assert!(err.contains(s), "ferry {what}: no {s:?} in {}", cut(&err));
    }
    err.into_owned()
}

#[test]
fn triggers_the_agent_would_refuse_are_refused_before_any_job_exists() {
    // pg-gone is in the inventory but has never answered.
    let d = Deployment::start_with(DEFAULT_DATA, |d| {
        d.coordinator.agents.push(AgentEntry {
            id: "pg-gone".into(),
            address: format!("https://127.0.0.1:{}", free_port()),
            ..AgentEntry::of(&d.prod_agent)
        });
        d.coordinator.write(&d.coordinator_config);
    });
    refused(
        &d,
        &["backup", "pg-prod", "nope"],
        "InvalidArgument",
        &[
            "agent pg-prod has no datastore \"nope\"",
            "it has: postgres",
        ],
    );
    refused(
        &d,
        &["restore", "pg-stage", "--datastore", "nope"],
        "InvalidArgument",
        &[
            "agent pg-stage has no datastore \"nope\"",
            "it has: postgres",
        ],
    );
    refused(
        &d,
        &["backup", "pg-prod", "postgres", "--type", "full"],
        "InvalidArgument",
        &["datastore \"postgres\" on agent pg-prod (postgres) takes no backup type"],
    );
    refused(
        &d,
        &[
            "restore",
            "pg-stage",
            "--datastore",
            "postgres",
            "--ns",
            "app.notes",
        ],
        "InvalidArgument",
        &["datastore \"postgres\" on agent pg-stage (postgres) is restored whole"],
    );
    refused(
        &d,
        &["backup", "pg-gone", "postgres"],
        "Unavailable",
        &["agent pg-gone has not described itself yet", "ferry agents"],
    );
    assert_eq!(d.ferry_json(&["jobs"]), serde_json::json!([]));
    // What the agent takes still goes through.
    let out = d.ferry_ok(&["backup", "pg-prod", "postgres", "--wait"]);
    assert!(out.contains("succeeded"), "{out}");
}

#[test]
fn a_prune_of_a_10_kb_environment_and_a_1_mib_job_id_get_short_readable_errors() {
    let d = Deployment::start();
    let env = "x".repeat(10_000);
    let err = refused(
        &d,
        &["prune", "--env", &env],
        "FailedPrecondition",
        &["no [[retention]] policy", "(cut; 10000 bytes)"],
    );
    assert!(err.len() < 1_000, "{} bytes: {err}", err.len());

    let id = "y".repeat(1 << 20);
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let channel = fleet_channel(&d.fleet, "operator", d.coordinator_port, "coordinator")
            .await
            .unwrap();
        let mut c = ferry_proto::v1::coordinator_client::CoordinatorClient::new(channel);
        let get = c
            .get_job(ferry_proto::v1::GetJobRequest { id: id.clone() })
            .await
            .expect_err("a 1 MiB job id was found");
        let watch = c
            .watch_job(ferry_proto::v1::GetJobRequest { id: id.clone() })
            .await
            .expect_err("a 1 MiB job id was watched");
        for e in [get, watch] {
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
            let m = e.message();
            assert!(
                m.contains("is not a ULID") && m.contains("(cut; 1048576 bytes)"),
                "{m}"
            );
            assert!(m.len() < 1_000, "{} bytes", m.len());
        }
    });
    let audit = d.ferry_json(&["audit"]);
    assert!(
        !audit.to_string().contains(&env),
        "the audit log holds the whole environment"
    );
    assert!(
        !d.logs().contains(&"x".repeat(1_000)) && !d.logs().contains(&"y".repeat(1_000)),
        "a log line holds the whole value"
    );
}

/// `ferry` with the deployment's connection flags, each of `changed` (flag, value)
/// replaced, and `args`.
fn ferry_changed(d: &Deployment, changed: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let mut flags = d.ferry_flags();
    for (flag, value) in changed {
        let i = flags
            .iter()
            .position(|f| f == flag)
            .expect("a connection flag");
        flags[i + 1] = (*value).to_owned();
    }
    let mut cmd = std::process::Command::new(bin("ferry"));
    hermetic(&mut cmd).args(flags).args(args);
    output_within(&mut cmd, b"", std::time::Duration::from_secs(60))
}

/// Asserts that an error line names no cause twice: its `: `-separated parts are all
/// different.
fn assert_each_cause_once(err: &str) {
    let parts: Vec<&str> = err.trim().split(": ").collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(!parts[i + 1..].contains(p), "{p:?} twice in: {err}");
    }
}

#[test]
fn the_cli_exits_quietly_when_its_reader_goes_and_escapes_control_characters_in_tables() {
    let d = Deployment::start();
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    // A refused name holding a newline and a terminal escape goes in the audit log as typed.
    let out = d.ferry(&["backup", "pg-prod", "post\ngres\u{1b}[2J"]);
    assert!(!out.status.success());

    let table = d.ferry_ok(&["audit"]);
    let entries = d.ferry_json(&["audit"]).as_array().unwrap().len();
    assert_eq!(
        table.lines().count(),
        entries + 1,
        "a row was split:\n{table}"
    );
    for line in table.lines().skip(1) {
        let seq = line.split_whitespace().next().unwrap();
        assert!(seq.parse::<u64>().is_ok(), "a row was split: {line:?}");
    }
    assert!(table.contains("post\\ngres\\u{1b}[2J"), "{table}");
    assert!(!table.contains('\u{1b}'), "{table}");

    // The reader is gone before ferry writes anything: it stops without a word.
    for args in [
        &["jobs"][..],
        &["status"],
        &["audit"],
        &["agents"],
        &["backups", "--sets"],
        &["--output", "json", "jobs"],
    ] {
        let mut cmd = std::process::Command::new(bin("ferry"));
        hermetic(&mut cmd)
            .args(d.ferry_flags())
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.is_empty(), "ferry {args:?}: {err}");
        assert_eq!(out.status.code(), Some(141), "ferry {args:?}");
    }
    // As typed at a shell.
    let mut sh = std::process::Command::new("sh");
    sh.arg("-c")
        .arg("\"$0\" \"$@\" audit | head -1; \"$0\" \"$@\" jobs | head -1")
        .arg(bin("ferry"))
        .args(d.ferry_flags());
    let out = output_within(hermetic(&mut sh), b"", std::time::Duration::from_secs(60));
    let (text, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!err.contains("panicked") && err.is_empty(), "{err}");
    assert_eq!(text.lines().collect::<Vec<_>>().len(), 2, "{text}");
    assert!(text.starts_with("SEQ"), "{text}");
}

#[test]
fn cli_errors_name_the_flag_and_file_at_fault_and_say_each_cause_once() {
    let d = Deployment::start();
    let port = d.coordinator_port;
    let dir = d.dir.path();
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    let http = format!("http://127.0.0.1:{port}");
    let out = ferry_changed(&d, &[("--coordinator", &http)], &["jobs"]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("use https://127.0.0.1:{port}")) && !err.contains("broken pipe"),
        "{err}"
    );

    // A key of another certificate: both files named.
    let (op_cert, prod_key) = (d.fleet.cert("operator"), d.fleet.key("pg-prod"));
    let out = ferry_changed(&d, &[("--key", &prod_key.display().to_string())], &["jobs"]);
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "--key {} does not match --cert {}",
            prod_key.display(),
            op_cert.display()
        )),
        "{err}"
    );

    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let missing = dir.join("missing.pem");
    let open_key = dir.join("open.key");
    std::fs::copy(d.fleet.key("operator"), &open_key).unwrap();
    chmod(&open_key, 0o644);
    let stopped = format!("https://127.0.0.1:{}", free_port());
    let path = |p: &std::path::Path| p.display().to_string();
    // One flag changed each time: (flag, value, what the error says).
    let cases: Vec<(&str, String, Vec<String>)> = vec![
        (
            "--coordinator",
            stopped.clone(),
            vec![
                format!("cannot reach the coordinator at {stopped}"),
                "Connection refused".into(),
            ],
        ),
        (
            "--ca",
            path(&missing),
            vec![format!("--ca {}", path(&missing)), "No such file".into()],
        ),
        (
            "--ca",
            path(dir),
            vec![format!("--ca {}", path(dir)), "Is a directory".into()],
        ),
        (
            "--ca",
            path(&junk),
            vec![format!("--ca {} holds no certificate", path(&junk))],
        ),
        (
            "--cert",
            path(&junk),
            vec![format!("--cert {} holds no certificate", path(&junk))],
        ),
        (
            "--key",
            path(&open_key),
            vec![path(&open_key), "chmod 600".into()],
        ),
        (
            "--ca",
            path(&d.fleet.cert("pg-prod")),
            vec!["invalid peer certificate".into()],
        ),
    ];
    for (flag, value, says) in cases {
        let out = ferry_changed(&d, &[(flag, &value)], &["jobs"]);
        let err = stderr(&out);
        let what = format!("{flag} {value}");
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
        for s in &says {
            assert!(err.contains(s.as_str()), "{what}: no {s:?} in {err}");
        }
        assert_each_cause_once(&err);
    }
}
