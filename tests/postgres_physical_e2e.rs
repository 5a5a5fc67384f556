//! PostgreSQL physical base backups (`method = "physical"`) end to end against real
//! PostgreSQL 15: `pg_basebackup` streamed through zstd and age into the dated layout, the
//! manifest's LSNs, timeline, label and system identifier checked against PostgreSQL's own
//! tools, the stored file read back with stock tools (`age -d | zstd -d | tar`,
//! `pg_verifybackup`, PostgreSQL starting on it), a cluster with a tablespace refused
//! with nothing left on the backup server, and staging restores: checked beside the live
//! cluster then swapped in with `stop_command`/`start_command`, or refused by a smoke check
//! with the live cluster left as it was.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_tests::*;

/// A deployment with a production cluster `phys-prod` holding [`load_bench`]'s data and a
/// staging cluster `phys-stage`, and the physical datastores of both (`staging` and `min`
/// as for [`staging_entry`]).
fn deploy(staging: Staging, min: i64) -> (Deployment, Postgres, Postgres) {
    let mut clusters = None;
    let d = Deployment::start_with(DEFAULT_DATA, |d| {
        // Production archives its WAL: the restored staging cluster must not.
        let prod = Postgres::start_in_with_conf(
            &d.dir.path().join("phys-prod"),
            "archive_mode = on\narchive_command = '/bin/true'",
        );
        let stage = Postgres::start_in(&d.dir.path().join("phys-stage"));
        append(&d.prod_config, &production_entry(&prod));
        append(&d.stage_config, &staging_entry(&stage, &staging, min));
        clusters = Some((prod, stage));
    });
    let (prod, stage) = clusters.unwrap();
    load_bench(&prod);
    stage.psql("postgres", "CREATE DATABASE before_restore");
    (d, prod, stage)
}

/// Names beside `pg`'s data directory that a restore made (`.data.ferry-...`).
fn siblings(pg: &Postgres) -> Vec<String> {
    fs::read_dir(pg.dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("ferry-"))
        .collect()
}

/// `pg_controldata DIR`'s "Database system identifier".
fn system_identifier(bin: &Path, data: &Path) -> String {
    let out = run_ok(Command::new(bin.join("pg_controldata")).arg(data));
    out.lines()
        .find_map(|l| l.strip_prefix("Database system identifier:"))
        .expect("pg_controldata names the system identifier")
        .trim()
        .to_owned()
}

/// Runs `script` with bash (`pipefail`); its stdout, or a panic with its stderr.
fn bash(script: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -o pipefail; {script}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn physical_backup_is_a_base_backup_that_stock_tools_read_and_postgres_starts_from() {
    let mut prod = None;
    let d = Deployment::start_with(DEFAULT_DATA, |d| {
        let pg = Postgres::start_in(&d.dir.path().join("phys-prod"));
        append(&d.prod_config, &production_entry(&pg));
        prod = Some(pg);
    });
    let prod = prod.unwrap();
    load_bench(&prod);
    let source = prod.table_fingerprints("bench");
    assert_eq!(source["public.pgbench_accounts"].0, 200_000);

    let out = d.ferry_ok(&["backup", "pg-prod", "pgphys", "--wait"]);
    assert!(out.contains("succeeded"), "{out}");
    let (name, manifest) = d.todays_backup("pgphys", "tar.zst.age");
    let stored = d.sshd.root().join(&name);

    // The manifest: what PostgreSQL's own tools say of the cluster and of the backup.
    let counts = &manifest["counts"];
    assert_eq!(manifest["kind"], "postgres");
    assert_eq!(manifest["format"], "tar");
    assert_eq!(manifest["source"]["tool"], "pg_basebackup");
    assert_eq!(
        counts["system_identifier"],
        system_identifier(prod.bin_dir(), &prod.data_dir()),
        "{manifest}"
    );
    assert_eq!(counts["timeline"], 1, "{manifest}");
    assert_eq!(counts["wal"], "included");

    // Stock tools: age -d | zstd -d | tar -t lists a base backup with its WAL.
    let age = require("age", "age");
    require("zstd", "zstd");
    let decrypt = format!(
        "{} -d -i {} {} | zstd -d",
        age.display(),
        d.identity.display(),
        stored.display()
    );
    let listing = bash(&format!("{decrypt} | tar -t"));
    for entry in [
        "backup_label",
        "backup_manifest",
        "global/pg_control",
        "PG_VERSION",
    ] {
        assert!(
            listing.lines().any(|l| l == entry),
            "{entry} not in the tar"
        );
    }
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("pg_wal/0000000") && l.len() == "pg_wal/".len() + 24),
        "no WAL segment in the tar"
    );
    // The label in the manifest is the one in the stream, and its LSNs are the WAL range
    // of the stream's backup_manifest.
    let label = bash(&format!("{decrypt} | tar -xO backup_label"));
    assert_eq!(counts["backup_label"], label.as_str());
    assert!(
        label.contains(&format!(
            "START WAL LOCATION: {} ",
            counts["start_lsn"].as_str().unwrap()
        )),
        "{label}"
    );
    let pg_manifest: serde_json::Value =
        serde_json::from_str(&bash(&format!("{decrypt} | tar -xO backup_manifest"))).unwrap();
    let range = &pg_manifest["WAL-Ranges"][0];
    assert_eq!(range["Start-LSN"], counts["start_lsn"]);
    assert_eq!(range["End-LSN"], counts["stop_lsn"]);
    assert_eq!(range["Timeline"], counts["timeline"]);
    assert_eq!(
        pg_manifest["Manifest-Checksum"],
        counts["manifest_checksum"]
    );

    // Unpacked by tar, pg_verifybackup checks every file and the WAL against the backup's
    // manifest, and PostgreSQL starts on it with production's rows.
    let side = d.dir.path().join("unpacked");
    let data = side.join("data");
    fs::create_dir_all(&data).unwrap();
    bash(&format!("{decrypt} | tar -x -C {}", data.display()));
    let bin = prod.bin_dir().to_owned();
    let verified = bash(&format!(
        "{} {}",
        bin.join("pg_verifybackup").display(),
        data.display()
    ));
    assert!(
        verified.contains("backup successfully verified"),
        "{verified}"
    );
    chmod(&data, 0o700);
    run_ok(
        Command::new("chown")
            .arg("-R")
            .arg("postgres:postgres")
            .arg(&side),
    );
    let port = free_port();
    let sock = side.join("sock");
    fs::create_dir_all(&sock).unwrap();
    run_ok(Command::new("chown").arg("postgres").arg(&sock));
    let opts = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c archive_mode=off",
        sock.display()
    );
    let log = side.join("postgres.log").display().to_string();
    let started = pg_ctl(
        &bin,
        &data,
        &["-l", &log, "-w", "-t", "120", "-o", &opts, "start"],
    );
    assert!(
        started.status.success(),
        "PostgreSQL did not start on the unpacked backup: {}",
        tail(Path::new(&log), 30)
    );
    let restored = psql_fingerprints(&bin, port);
    let _ = pg_ctl(&bin, &data, &["-m", "immediate", "-w", "stop"]);
    assert_eq!(
        restored, source,
        "the base backup's rows differ from production's"
    );
    assert_eq!(
        system_identifier(&bin, &data),
        counts["system_identifier"].as_str().unwrap()
    );
}

/// [`Postgres::table_fingerprints`] of database `bench` of a server on `port` that the
/// harness did not start.
fn psql_fingerprints(bin: &Path, port: u16) -> std::collections::BTreeMap<String, (i64, String)> {
    Postgres::attach(bin, port).table_fingerprints("bench")
}

#[test]
fn a_cluster_with_a_tablespace_is_refused_naming_it_and_nothing_is_stored() {
    let mut prod = None;
    let d = Deployment::start_with(DEFAULT_DATA, |d| {
        let pg = Postgres::start_in(&d.dir.path().join("phys-prod"));
        append(&d.prod_config, &production_entry(&pg));
        prod = Some(pg);
    });
    let prod = prod.unwrap();
    let location: PathBuf = prod.dir().join("ts_archive");
    fs::create_dir_all(&location).unwrap();
    run_ok(Command::new("chown").arg("postgres").arg(&location));
    prod.psql(
        "postgres",
        &format!(
            "CREATE TABLESPACE archive_space LOCATION '{}'",
            location.display()
        ),
    );
    prod.psql(
        "postgres",
        "CREATE TABLE old_orders (id int) TABLESPACE archive_space; INSERT INTO old_orders VALUES (1)",
    );

    // `ferry-agent check` says so before any backup.
    let check = Command::new(bin("ferry-agent"))
        .arg("check")
        .arg("--config")
        .arg(&d.prod_config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout).into_owned()
        + &String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success(), "check passed: {said}");
    assert!(said.contains("\"archive_space\""), "{said}");

    let out = d.ferry(&["backup", "pg-prod", "pgphys", "--wait"]);
    assert!(
        !out.status.success(),
        "a cluster with a tablespace was backed up"
    );
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains(&format!("\"archive_space\" ({})", location.display())),
        "the refusal does not name the tablespace: {text}"
    );
    assert!(text.contains("only one tablespace to stdout"), "{text}");
    let files = d.sshd.files();
    assert!(
        files.iter().all(|f| !f.contains("pgphys")),
        "the refused backup left {files:?} on the backup server"
    );
}

#[test]
fn physical_restore_is_checked_beside_the_live_cluster_then_swapped_in() {
    let (d, prod, stage) = deploy(Staging::smoke(ACCOUNTS), 200_000);
    let source = prod.table_fingerprints("bench");
    d.ferry_ok(&["backup", "pg-prod", "pgphys", "--wait"]);

    let out = d.ferry_ok(&["restore", "pg-stage", "--datastore", "pgphys", "--wait"]);
    assert!(out.contains("pg_verifybackup passed"), "{out}");
    assert!(
        out.contains("SELECT count(*) FROM pgbench_accounts = 200000 (at least 200000)"),
        "{out}"
    );
    // Staging now runs on production's files: every row, the same system, and not the
    // database staging had before; it does not archive WAL.
    assert_eq!(stage.table_fingerprints("bench"), source);
    assert_eq!(
        system_identifier(stage.bin_dir(), &stage.data_dir()),
        system_identifier(prod.bin_dir(), &prod.data_dir())
    );
    assert!(!stage.has_database("before_restore"));
    assert_eq!(prod.psql("postgres", "SHOW archive_mode"), "on");
    assert_eq!(stage.psql("postgres", "SHOW archive_mode"), "off");
    assert_eq!(siblings(&stage), Vec::<String>::new());
}

#[test]
fn physical_restore_failing_its_smoke_check_leaves_the_live_cluster_as_it_was() {
    let (d, _prod, stage) = deploy(Staging::smoke(ACCOUNTS), 1_000_000);
    let before = system_identifier(stage.bin_dir(), &stage.data_dir());
    d.ferry_ok(&["backup", "pg-prod", "pgphys", "--wait"]);

    let out = d.ferry(&["restore", "pg-stage", "--datastore", "pgphys", "--wait"]);
    assert!(
        !out.status.success(),
        "a restore below its smoke check succeeded"
    );
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("SELECT count(*) FROM pgbench_accounts = 200000 (at least 1000000)"),
        "{text}"
    );
    // The live cluster was never stopped: it answers with its own data, and the restored
    // directory and its checking server are gone.
    assert!(stage.has_database("before_restore"));
    assert_eq!(
        system_identifier(stage.bin_dir(), &stage.data_dir()),
        before
    );
    assert_eq!(siblings(&stage), Vec::<String>::new());
    assert_eq!(checking_servers(&stage), "", "a checking server still runs");
}

/// The processes running on a `-new-` sibling of `pg`'s data directory (a restore's
/// checking server), as `pgrep -a` lists them.
fn checking_servers(pg: &Postgres) -> String {
    let out = Command::new("pgrep")
        .arg("-af")
        .arg(format!("{}/.data.ferry-new-", pg.dir().display()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn a_restore_killed_during_its_check_is_cleaned_up_when_the_agent_starts_again() {
    // The smoke check holds the checking server up for a minute.
    let slow = "SELECT count(*) FROM pgbench_accounts, (SELECT pg_sleep(60)) AS slow";
    let (mut d, _prod, stage) = deploy(Staging::smoke(slow), 1);
    d.ferry_ok(&["backup", "pg-prod", "pgphys", "--wait"]);
    d.ferry_ok(&["restore", "pg-stage", "--datastore", "pgphys"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while checking_servers(&stage).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no checking server started: {}",
            d.log_tail("agent-stage")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    d.kill("agent-stage");
    assert_ne!(
        checking_servers(&stage),
        "",
        "the checking server died with the agent"
    );
    let left = siblings(&stage);
    assert!(
        left.len() == 2
            && left.iter().any(|n| n.starts_with(".data.ferry-new-"))
            && left.iter().any(|n| n.starts_with(".data.ferry-check-")),
        "{left:?}"
    );

    d.start_agent("agent-stage");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !siblings(&stage).is_empty() || !checking_servers(&stage).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?} {}",
            siblings(&stage),
            checking_servers(&stage)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The live cluster was never stopped.
    assert!(stage.has_database("before_restore"));
}

#[test]
fn a_cluster_that_does_not_start_on_the_restored_directory_gets_its_old_data_back() {
    // The restored directory has been recovered by the checking server, which leaves
    // backup_label.old behind; the live one has none.
    let refuse = Staging {
        smoke: ACCOUNTS,
        start_fails_if: Some("test -e \"$D/backup_label.old\""),
    };
    let (d, _prod, stage) = deploy(refuse, 1);
    let before = system_identifier(stage.bin_dir(), &stage.data_dir());
    d.ferry_ok(&["backup", "pg-prod", "pgphys", "--wait"]);

    let out = d.ferry(&["restore", "pg-stage", "--datastore", "pgphys", "--wait"]);
    assert!(!out.status.success(), "the restore succeeded");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("refused by the test"), "{text}");
    assert!(text.contains("the old data was put back"), "{text}");
    assert_eq!(
        system_identifier(stage.bin_dir(), &stage.data_dir()),
        before
    );
    assert!(
        stage.has_database("before_restore"),
        "staging is not running on its old data"
    );
    assert_eq!(siblings(&stage), Vec::<String>::new());
}

#[test]
fn a_role_without_replication_is_refused_by_check_and_backup() {
    let mut prod = None;
    let d = Deployment::start_with(DEFAULT_DATA, |d| {
        let pg = Postgres::start_in(&d.dir.path().join("phys-prod"));
        pg.psql("postgres", "CREATE ROLE plain LOGIN");
        append(
            &d.prod_config,
            &production_entry(&pg).replace("user = \"postgres\"", "user = \"plain\""),
        );
        prod = Some(pg);
    });
    let check = Command::new(bin("ferry-agent"))
        .arg("check")
        .arg("--config")
        .arg(&d.prod_config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout).into_owned()
        + &String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success(), "check passed: {said}");
    assert!(said.contains("ALTER ROLE \"plain\" REPLICATION"), "{said}");
    let out = d.ferry(&["backup", "pg-prod", "pgphys", "--wait"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("REPLICATION"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(d.sshd.files().iter().all(|f| !f.contains("pgphys")));
    drop(prod);
}

#[test]
fn a_manifest_naming_another_system_fails_the_restore_before_the_live_cluster_is_touched() {
    let (d, _prod, stage) = deploy(Staging::smoke(ACCOUNTS), 1);
    let before = system_identifier(stage.bin_dir(), &stage.data_dir());
    d.ferry_ok(&["backup", "pg-prod", "pgphys", "--wait"]);
    // Someone with write access to the backup server swaps in another system's identity.
    d.edit_todays_manifest("pgphys", "tar.zst.age", |m| {
        m["counts"]["system_identifier"] = serde_json::json!("7000000000000000001");
    });

    let out = d.ferry(&["restore", "pg-stage", "--datastore", "pgphys", "--wait"]);
    assert!(!out.status.success(), "the restore succeeded");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("the manifest says system 7000000000000000001"),
        "{text}"
    );
    assert!(stage.has_database("before_restore"));
    assert_eq!(
        system_identifier(stage.bin_dir(), &stage.data_dir()),
        before
    );
    assert_eq!(siblings(&stage), Vec::<String>::new());
}
