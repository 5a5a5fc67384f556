//! What Ferry reports after faults (issue 15, "Losses that go unnoticed" and "Reports and
//! metrics that say otherwise"), end to end on real PostgreSQL, sshd and the real binaries:
//! - `ferry agents` shows an agent killed a moment ago as unreachable, and when each agent
//!   was last reached;
//! - `ferry backup --wait` survives a coordinator restart under it: it reconnects, says so
//!   on stderr, and reports the job's end;
//! - the newest backup's data file deleted on the server (its manifest kept): restore and
//!   verify fail naming it, `ferry backups` marks it missing, and a verify of the date
//!   checks every backup the catalog lists for it;
//! - a production clock a day ahead: its backup, dated tomorrow, is refused (the job fails
//!   saying so, in status and metrics) and, once the clock is right, never shadows the
//!   later backups, neither in the coordinator's choice nor in the staging agent's own;
//! - a set whose PostgreSQL manifest is malformed: `ferry restore` says the set was
//!   restored partly (which datastores, which not and why), and `--all-or-nothing`
//!   checks every member first and restores none (a malformed manifest, a file of another
//!   size), then all once the set is whole.

use std::fs;
use std::time::{Duration, Instant};

use ferry_proto::v1;
use ferry_proto::v1::agent_client::AgentClient;
use ferry_tests::*;

/// `ferry agents --output json`'s entry for `id`.
fn agent_entry(d: &Deployment, id: &str) -> serde_json::Value {
    let agents = d.ferry_json(&["agents"]);
    agents
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == id)
        .unwrap_or_else(|| panic!("no agent {id}: {agents}"))
        .clone()
}

#[test]
fn ferry_agents_shows_a_killed_agent_unreachable_at_once_and_when_it_was_last_reached() {
    let mut d = Deployment::start();
    let stage = agent_entry(&d, "pg-stage");
    assert_eq!(stage["reachable"], true, "{stage}");
    let age = stage["last_reached_age_seconds"].as_f64().unwrap();
    assert!((0.0..30.0).contains(&age), "{stage}");
    let human = d.ferry_ok(&["agents"]);
    assert!(
        human.contains("LAST REACHED") && human.contains(" ago"),
        "{human}"
    );

    d.kill("agent-stage");
    let killed = Instant::now();
    // Past the 2 s a listing trusts an earlier call: the next `ferry agents` calls again.
    std::thread::sleep(Duration::from_millis(2_100));
    let stage = agent_entry(&d, "pg-stage");
    assert!(killed.elapsed() < Duration::from_secs(10));
    assert_eq!(stage["reachable"], false, "{stage}");
    assert!(
        stage["problem"].as_str().unwrap().contains("pg-stage"),
        "{stage}"
    );
    // When it was last reached is still shown: before the kill.
    let age = stage["last_reached_age_seconds"].as_f64().unwrap();
    assert!(age >= 2.0, "{stage}");
    assert_eq!(agent_entry(&d, "pg-prod")["reachable"], true);
}

/// About 40 MB of md5 text in 300,000 rows: about 20 MB stored, 5 s at 4 MiB/s.
const BIG: &str = "CREATE TABLE big (id int PRIMARY KEY, body text);
    INSERT INTO big SELECT g, md5(g::text) || md5(random()::text) || md5(random()::text) || md5(random()::text)
    FROM generate_series(1, 300000) g;";

/// Holds production's uploads to `rate` bytes per second, so a backup lasts long enough
/// to break something in the middle of it.
fn limit_upload(d: &Deployment, rate: u64) {
    let config = fs::read_to_string(&d.prod_config).unwrap().replace(
        "[backup_server]\n",
        &format!("[backup_server]\nmax_upload_bytes_per_second = {rate}\n"),
    );
    fs::write(&d.prod_config, config).unwrap();
}

/// Waits until production's PostgreSQL upload has more than `bytes` in its partial file.
fn wait_partial(d: &Deployment, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !d.sshd.files().iter().any(|f| {
        f.ends_with(".partial")
            && f.contains("postgres_backup_")
            && fs::metadata(d.sshd.root().join(f)).is_ok_and(|m| m.len() > bytes)
    }) {
        assert!(
            Instant::now() < deadline,
            "no partial upload over {bytes} bytes: {:?}\n{}",
            d.sshd.files(),
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn backup_wait_reconnects_when_the_coordinator_restarts_and_reports_the_jobs_end() {
    let mut d = Deployment::start_with_options(DeploymentOptions {
        source_sql: BIG.into(),
        tweak: Some(Box::new(|d| limit_upload(d, 4 << 20))),
        ..DeploymentOptions::default()
    });
    let mut cli = std::process::Command::new(bin("ferry"));
    hermetic(&mut cli)
        .args(d.ferry_flags())
        .args(["backup", "pg-prod", "postgres", "--wait"]);
    let waiting = std::thread::spawn(move || output_within(&mut cli, b"", CLI_TIMEOUT));
    wait_partial(&d, 2 << 20);
    d.kill("coordinator");
    std::thread::sleep(Duration::from_secs(1));
    d.start_coordinator();

    let out = waiting.join().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "ferry backup --wait failed ({}):\nstdout: {stdout}\nstderr: {stderr}\n{}",
        out.status,
        d.logs()
    );
    assert!(stdout.contains("succeeded"), "{stdout}");
    assert!(
        stderr.contains("lost the coordinator while watching job")
            && stderr.contains("reconnecting in 1 s")
            && stderr.contains("reconnected to the coordinator"),
        "{stderr}"
    );
}

/// `ferry ARGS`: (success, stdout and stderr together).
fn ferry_text(d: &Deployment, args: &[&str]) -> (bool, String) {
    let out = d.ferry(args);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_backup_whose_file_is_gone_fails_restore_and_verify_naming_it_and_is_marked_missing() {
    let d = Deployment::start();
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    d.ferry_ok(&["restore", "pg-stage", "--wait"]);
    let restored = d.stage_pg.table_fingerprints("app");
    d.prod_pg.psql(
        "app",
        "INSERT INTO empty_table SELECT generate_series(1, 10)",
    );
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    let catalog = d.ferry_json(&["backups"]);
    assert_eq!(catalog.as_array().unwrap().len(), 2, "{catalog}");
    let newest = catalog[0]["stored_path"].as_str().unwrap().to_owned();
    let older = catalog[1]["stored_path"].as_str().unwrap().to_owned();
    let newest_name = newest.rsplit('/').next().unwrap().to_owned();

    // The newest data file goes; its manifest stays.
    let on_disk = std::path::PathBuf::from(&newest);
    assert!(on_disk.starts_with(d.sshd.root()), "{newest}");
    let away = on_disk.with_file_name(".away");
    fs::rename(&on_disk, &away).unwrap();
    assert!(fs::metadata(format!("{newest}.json")).is_ok());

    // Neither the restore nor the verify takes the older backup in its place.
    for args in [
        ["restore", "pg-stage", "--wait"],
        ["verify", "pg-stage", "--wait"],
    ] {
        let (ok, text) = ferry_text(&d, &args);
        assert!(!ok, "{args:?} succeeded:\n{text}");
        assert!(
            text.contains(&newest_name) && text.contains("is not on the backup server"),
            "{args:?}:\n{text}"
        );
        assert!(!text.contains(" succeeded"), "{args:?}:\n{text}");
    }
    assert_eq!(
        d.stage_pg.table_fingerprints("app"),
        restored,
        "staging changed"
    );

    // The catalog says so.
    let catalog = d.ferry_json(&["backups"]);
    let missing = &catalog[0]["missing"];
    assert!(missing["job_id"].is_string(), "{catalog}");
    assert!(
        missing["error"].as_str().unwrap().contains(&newest_name),
        "{catalog}"
    );
    assert!(catalog[1]["missing"].is_null(), "{catalog}");
    let human = d.ferry_ok(&["backups"]);
    let row = human.lines().find(|l| l.contains(&newest)).unwrap();
    assert!(row.contains("MISSING (found by job"), "{human}");

    // A verify of the date checks both backups the catalog lists for it: one job each.
    let today = today_utc();
    let out = d.ferry(&[
        "--output", "json", "verify", "pg-stage", "--date", &today, "--wait",
    ]);
    assert!(!out.status.success());
    let jobs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let jobs = jobs.as_array().unwrap();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    let ok = jobs.iter().find(|j| j["state"] == "succeeded").unwrap();
    assert_eq!(ok["result"]["stored_path"], older.as_str(), "{jobs:?}");
    let failed = jobs.iter().find(|j| j["state"] == "failed").unwrap();
    assert!(
        failed["error"].as_str().unwrap().contains(&newest_name),
        "{jobs:?}"
    );

    // The file back: the verify of the date passes and clears the mark.
    fs::rename(&away, &on_disk).unwrap();
    d.ferry_ok(&["verify", "pg-stage", "--date", &today, "--wait"]);
    let catalog = d.ferry_json(&["backups"]);
    assert!(catalog[0]["missing"].is_null(), "{catalog}");
}

/// `GET /metrics` on 127.0.0.1:`port` (the 0.0.4 text format).
fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// A deployment whose coordinator serves `/metrics` on 127.0.0.1:`port`.
fn with_metrics(port: u16) -> Deployment {
    Deployment::start_with(DEFAULT_DATA, move |d| {
        let text = fs::read_to_string(&d.coordinator_config).unwrap();
        fs::write(
            &d.coordinator_config,
            format!("metrics_listen = \"127.0.0.1:{port}\"\n{text}"),
        )
        .unwrap();
    })
}

#[test]
fn a_backup_dated_tomorrow_by_a_clock_ahead_is_refused_and_never_shadows_later_backups() {
    let port = free_port();
    let mut d = with_metrics(port);
    let faketime = require("faketime", "faketime");
    let faketime = faketime.to_str().unwrap();
    d.start_agent_wrapped("agent-prod", &[faketime, "-f", "+1d"]);
    let today = today_utc();
    let tomorrow = (chrono::Utc::now() + chrono::TimeDelta::days(1))
        .format("%Y-%m-%d")
        .to_string();

    let (ok, text) = ferry_text(&d, &["backup", "pg-prod", "--wait"]);
    assert!(!ok, "a backup dated tomorrow was accepted:\n{text}");
    assert!(
        text.contains(&format!("it is dated {tomorrow} by agent pg-prod's clock"))
            && text.contains("not recorded in the catalog")
            && text.contains(&format!("postgres_backup_{tomorrow}")),
        "{text}"
    );
    // On the server under tomorrow's folder, but not in the catalog.
    let files = d.sshd.final_files();
    assert!(
        files
            .iter()
            .any(|f| f.starts_with(&format!("production/{tomorrow}/")) && f.ends_with(".age")),
        "{files:?}"
    );
    let catalog = d.ferry_json(&["backups"]);
    assert!(catalog.as_array().unwrap().is_empty(), "{catalog}");
    // Where it shows: the job's outcome in `ferry status` and /metrics.
    let status = d.ferry_json(&["status"]);
    let prod = status["datastores"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["agent"] == "pg-prod")
        .unwrap();
    assert_eq!(prod["last_job"]["state"], "failed", "{status}");
    assert!(
        prod["last_job"]["error"]
            .as_str()
            .unwrap()
            .contains("clock"),
        "{status}"
    );
    let metrics = scrape(port);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ferry_last_job_succeeded{")
                && l.contains("agent=\"pg-prod\"")
                && l.contains("kind=\"backup\"")
                && l.ends_with(" 0")),
        "{metrics}"
    );

    // The clock set right: the next backup is today's, and restores and verifies take it,
    // not the folder named tomorrow.
    d.start_agent("agent-prod");
    d.prod_pg.psql(
        "app",
        "INSERT INTO empty_table SELECT generate_series(1, 10)",
    );
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    let out = d.ferry_ok(&["restore", "pg-stage", "--wait"]);
    assert!(out.contains(&format!("production/{today}/")), "{out}");
    assert_eq!(
        d.stage_pg.table_fingerprints("app"),
        d.prod_pg.table_fingerprints("app")
    );
    // The staging agent's own choice (an order that names no file, as an older
    // coordinator sends) goes by the manifests' finish times too.
    let stored = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let channel = fleet_channel(&d.fleet, "coordinator", d.stage_port, "pg-stage")
            .await
            .unwrap();
        let mut stage = AgentClient::new(channel);
        let mut stream = stage
            .run_restore(v1::RunRestoreRequest {
                target: String::new(),
                job_id: "01KAAAAAAAAAAAAAAAAAAAAA01".into(),
                datastore: "postgres".into(),
                verify_only: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        loop {
            match stream.message().await.unwrap().map(|e| e.event) {
                Some(Some(v1::job_event::Event::Finished(f))) => break f.stored_path,
                Some(Some(v1::job_event::Event::Failed(f))) => panic!("{f:?}"),
                Some(_) => {}
                None => panic!("the stream ended without a result"),
            }
        }
    });
    assert!(stored.contains(&format!("production/{today}/")), "{stored}");
    let log = fs::read_to_string(d.dir.path().join("agent-stage.log")).unwrap();
    assert!(
        log.contains("Passing over a backup that finished in the future"),
        "{log}"
    );
}

/// Adds a `files` datastore named `minio` to both agents: production backs up `source`,
/// staging restores into `target`.
fn add_files_datastore(d: &Deployment, source: &std::path::Path, target: &std::path::Path) {
    for (config, path) in [(&d.prod_config, source), (&d.stage_config, target)] {
        append(
            config,
            &format!(
                "[[datastores]]\nname = \"minio\"\nkind = \"files\"\npath = \"{}\"\n",
                path.display()
            ),
        );
    }
}

/// The audit log's newest entry with `action`.
fn last_audit(d: &Deployment, action: &str) -> serde_json::Value {
    let audit = d.ferry_json(&["audit"]);
    audit
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|e| e["action"] == action)
        .unwrap_or_else(|| panic!("no {action:?} in the audit log: {audit}"))
        .clone()
}

#[test]
fn a_set_with_a_malformed_manifest_is_reported_restored_partly_and_all_or_nothing_restores_none() {
    let mut dirs = None;
    let d = Deployment::start_with(DEFAULT_DATA, |d| {
        let source = d.dir.path().join("minio-prod");
        let target = d.dir.path().join("minio-stage");
        fs::create_dir_all(&source).unwrap();
        fs::write(source.join("object"), b"from the same night").unwrap();
        add_files_datastore(d, &source, &target);
        dirs = Some((source, target));
    });
    let (_, target) = dirs.unwrap();
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    let today = today_utc();
    let (pg_name, _) = d.todays_backup("postgres", "pgdump.zst.age");
    let pg_manifest = d.sshd.root().join(format!("{pg_name}.json"));
    let good_manifest = fs::read(&pg_manifest).unwrap();
    chmod(&pg_manifest, 0o640);
    fs::write(&pg_manifest, b"{\"manifest_version\": 1, \"datastore\": ").unwrap();
    let before = d.stage_pg.databases();

    // Without --all-or-nothing: files restored, postgres not, and the result says so.
    let (ok, text) = ferry_text(&d, &["restore", "pg-stage", "--wait"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!(
            "set production {today} on pg-stage restored partly: restored: minio; not \
             restored: postgres ("
        )) && text.contains("is malformed"),
        "{text}"
    );
    assert_eq!(
        fs::read(target.join("object")).unwrap(),
        b"from the same night"
    );
    assert_eq!(before, d.stage_pg.databases());
    let entry = last_audit(&d, "restore set finished");
    assert!(
        entry["outcome"]
            .as_str()
            .unwrap()
            .starts_with("restored partly: restored: minio; not restored: postgres ("),
        "{entry}"
    );

    // --all-or-nothing: the malformed manifest is found before any datastore is touched.
    fs::remove_dir_all(&target).unwrap();
    let out = d.ferry(&[
        "--output",
        "json",
        "restore",
        "pg-stage",
        "--all-or-nothing",
        "--wait",
    ]);
    assert!(!out.status.success());
    let jobs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let jobs = jobs.as_array().unwrap();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    for j in jobs {
        assert_eq!(j["state"], "failed", "{j}");
        assert_eq!(j["all_or_nothing"], true, "{j}");
        let error = j["error"].as_str().unwrap();
        assert!(
            error.starts_with("not restored (--all-or-nothing)")
                && error.contains("postgres: ")
                && error.contains("is malformed")
                && error.contains("no datastore was touched"),
            "{j}"
        );
    }
    assert!(!target.exists(), "the files datastore was restored");
    assert_eq!(before, d.stage_pg.databases());
    let entry = last_audit(&d, "restore set finished");
    assert!(
        entry["outcome"]
            .as_str()
            .unwrap()
            .starts_with("not restored: restored: none"),
        "{entry}"
    );

    // The manifest whole again, but the files archive one byte longer than its manifest
    // says: refused again, naming the file and both sizes.
    fs::write(&pg_manifest, &good_manifest).unwrap();
    let (files_name, files_manifest) = d.todays_backup("minio", "tar.zst.age");
    let files_archive = d.sshd.root().join(&files_name);
    chmod(&files_archive, 0o640);
    let mut bytes = fs::read(&files_archive).unwrap();
    bytes.push(0);
    fs::write(&files_archive, &bytes).unwrap();
    let (ok, text) = ferry_text(&d, &["restore", "pg-stage", "--all-or-nothing", "--wait"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!(
            "holds {} bytes, its manifest says {}",
            bytes.len(),
            files_manifest["bytes_stored"]
        )) && text.contains(&format!("set production {today} on pg-stage not restored")),
        "{text}"
    );
    assert!(!target.exists(), "the files datastore was restored");

    // The set whole: restored whole.
    bytes.pop();
    fs::write(&files_archive, &bytes).unwrap();
    let out = d.ferry_ok(&["restore", "pg-stage", "--all-or-nothing", "--wait"]);
    assert!(
        out.contains(&format!(
            "set production {today} on pg-stage restored whole: restored: "
        )),
        "{out}"
    );
    assert_eq!(
        fs::read(target.join("object")).unwrap(),
        b"from the same night"
    );
    assert_eq!(
        d.prod_pg.table_fingerprints("app"),
        d.stage_pg.table_fingerprints("app")
    );
}
