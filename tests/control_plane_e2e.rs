//! A control plane that can be lost (issue 19), through the real binaries against a real
//! Ceph RGW, sshd and PostgreSQL:
//! - the catalog rebuilt from the targets: with backups on an S3 primary with Object Lock
//!   and copies on SFTP, the coordinator's store is deleted, `ferry-coordinator catalog
//!   rebuild` reads the manifests back, and `ferry backups` and `ferry backups --sets` (JSON)
//!   are equal to before; a restore from the rebuilt catalog equals the source, and the audit
//!   chain verifies with the rebuild recorded in it.
//! - the coordinator's own backup: a coordinator with history writes a self-backup to the
//!   SFTP server, read back with stock `age`, `zstd` and `tar` (the staging identity does
//!   not open it; the escrowed CA key equals the CA's); the coordinator's store is
//!   destroyed, `ferry-coordinator restore-state` brings a new one up on a new directory,
//!   and its jobs, catalog and audit chain (verified, carrying on) equal the old, and
//!   backups and restores carry on.
//! - notifications: webhooks to local receivers (an HTTP/1.1 server of the test's own)
//!   tell a failed job (JSON, with its token in the header only, after the receiver's 500
//!   was retried), a failed drill and a missed schedule (Slack's `{"text"}`, a hook filtered
//!   to those events) and an incomplete set at its deadline; a hook whose receiver is down
//!   never holds up dispatch.
//! - key rotation by epochs: production encrypts to the old and the new recipient, a drill
//!   with the new identity only restores the newest backup, while `ferry keys`, `ferry
//!   status` and `/metrics` say which older backups the new identity cannot open; then
//!   production drops the old recipient, and a drill with only the old identity fails,
//!   naming the recipients the backup needs.

use std::process::Command;

use serde_json::Value;

use ferry_tests::*;

/// Waits (90 s at most) until every backup in the catalog has a copy on `target` and a
/// lock on the primary; the catalog then.
fn await_copied_and_locked(d: &Deployment, target: &str, n: usize) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let catalog = d.ferry_json(&["backups"]);
        let records = catalog.as_array().cloned().unwrap_or_default();
        let done = records.len() == n
            && records.iter().all(|r| {
                r["retain_until"].is_string()
                    && r["copies"]
                        .as_array()
                        .is_some_and(|c| c.iter().any(|c| c["target"] == target))
            });
        if done {
            return catalog;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not every backup copied to {target} and locked: {catalog:#}\n{}",
            d.log_tail("coordinator")
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// `ferry-coordinator catalog rebuild --config CONFIG`: its output (panics if it fails).
fn rebuild(d: &Deployment) -> String {
    coordinator_ok(d, &["catalog", "rebuild"])
}

/// `ferry-coordinator ARGS --config CONFIG`: its output (panics if it fails).
fn coordinator_ok(d: &Deployment, args: &[&str]) -> String {
    let mut cmd = Command::new(bin("ferry-coordinator"));
    hermetic(&mut cmd)
        .args(args)
        .arg("--config")
        .arg(&d.coordinator_config);
    let out = output_within(&mut cmd, b"", std::time::Duration::from_secs(120));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "ferry-coordinator {args:?} failed: {text}"
    );
    text
}

/// `age -d -i IDENTITY FILE`, the stock client: the plaintext, or age's error.
fn age_decrypt(identity: &std::path::Path, file: &std::path::Path) -> Result<Vec<u8>, String> {
    let out = Command::new("age")
        .arg("-d")
        .arg("-i")
        .arg(identity)
        .arg(file)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn the_catalog_rebuilt_from_the_targets_equals_the_one_kept_and_restores() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_bucket("rebuild");
    let mut d = Deployment::start_with(DEFAULT_DATA, |d| {
        let dir = d.dir.path().to_owned();
        let key = d.maintenance_key();
        use_s3_backup_server(d, c, &bucket);
        append(
            &d.coordinator_config,
            &format!(
                "\n[[retention]]\nenvironment = \"production\"\nkeep_daily = 7\n\n\
                 [[environments]]\nname = \"production\"\ncopy_to = [\"local\"]\n{}{}",
                s3_table(
                    "maintenance",
                    c,
                    &bucket,
                    &roles.maintenance,
                    &dir,
                    "lock = { mode = \"compliance\" }\n"
                ),
                d.sftp_table("copies.local", &key),
            ),
        );
    });
    for _ in 0..2 {
        let out = d.ferry_ok(&["backup", "pg-prod", "--wait"]);
        assert!(out.contains("succeeded"), "{out}");
    }
    let before = await_copied_and_locked(&d, "local", 2);
    // Two backups of one day on S3, whose production writer cannot look: two names (to
    // the second), never one name with two versions that a copy or a rebuild would merge.
    assert_ne!(
        before[0]["stored_path"], before[1]["stored_path"],
        "{before:#}"
    );
    let sets_before = d.ferry_json(&["backups", "--sets"]);
    assert_eq!(
        sets_before.as_array().map(Vec::len),
        Some(1),
        "{sets_before:#}"
    );

    // The coordinator's host is lost with its store; a new one starts from the targets.
    d.kill("coordinator");
    let store = d.dir.path().join("coordinator.redb");
    std::fs::remove_file(&store).unwrap();
    let out = rebuild(&d);
    assert!(
        out.contains("2 backups from 2 dated folders (the catalog held 0); 0 not rebuilt"),
        "{out}"
    );
    d.start_coordinator();
    let after = d.ferry_json(&["backups"]);
    assert_eq!(after, before, "the rebuilt catalog differs:\n{out}");
    assert_eq!(d.ferry_json(&["backups", "--sets"]), sets_before);

    // Restores take the rebuilt catalog's newest backup.
    let out = d.ferry_ok(&["restore", "pg-stage", "--datastore", "postgres", "--wait"]);
    assert!(out.contains("succeeded"), "{out}");
    assert_eq!(
        d.stage_pg.table_fingerprints("app"),
        d.prod_pg.table_fingerprints("app")
    );
    let restored = d.ferry_json(&["jobs"]);
    let newest = &restored.as_array().unwrap()[0];
    assert_eq!(
        newest["result"]["stored_path"], before[0]["stored_path"],
        "{newest:#}"
    );

    // A rebuild while the coordinator runs is refused, and changes nothing.
    let mut cmd = Command::new(bin("ferry-coordinator"));
    hermetic(&mut cmd)
        .args(["catalog", "rebuild", "--config"])
        .arg(&d.coordinator_config);
    let busy = output_within(&mut cmd, b"", std::time::Duration::from_secs(60));
    assert!(!busy.status.success());
    let text = String::from_utf8_lossy(&busy.stderr);
    assert!(text.contains("stop the coordinator first"), "{text}");

    // The audit chain holds the rebuild and verifies.
    let audit = d.ferry_ok(&["audit", "--verify"]);
    assert!(audit.contains("audit log intact"), "{audit}");
    let log = d.ferry_json(&["audit", "--limit", "0"]);
    assert!(
        log.as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "catalog rebuild"),
        "{log:#}"
    );
}

#[test]
fn a_coordinator_destroyed_is_restored_from_its_self_backup_and_carries_on() {
    let mut escrow = std::path::PathBuf::new();
    let metrics_port = free_port();
    let mut d = Deployment::start_with(DEFAULT_DATA, |d| {
        let text = std::fs::read_to_string(&d.coordinator_config).unwrap();
        std::fs::write(
            &d.coordinator_config,
            format!("metrics_listen = \"127.0.0.1:{metrics_port}\"\n{text}"),
        )
        .unwrap();
        d.add_maintenance();
        escrow = d.dir.path().join("escrow.key");
        let recipient = age_keygen(&escrow);
        append(
            &d.coordinator_config,
            &format!(
                "\n[self_backup]\nescrow_recipients = [\"{recipient}\"]\npki_dir = \"{}\"\n",
                d.fleet.pki.display()
            ),
        );
    });
    // History: a backup, a restore, the audit entries of both.
    for args in [
        &["backup", "pg-prod", "--wait"][..],
        &["restore", "pg-stage", "--datastore", "postgres", "--wait"],
    ] {
        let out = d.ferry_ok(args);
        assert!(out.contains("succeeded"), "{out}");
    }
    let jobs = d.ferry_json(&["jobs"]);
    let backups = d.ferry_json(&["backups"]);
    let audit = d.ferry_json(&["audit", "--limit", "0"]);
    assert!(audit.as_array().unwrap().len() >= 6, "{audit:#}");

    // The self-backup, with the coordinator stopped (a running one holds the store).
    d.kill("coordinator");
    let out = coordinator_ok(&d, &["self-backup"]);
    assert!(out.contains("and the escrowed CA key"), "{out}");
    let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let folder = d.sshd.root().join(format!("_ferry/{day}"));
    let names: Vec<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let find = |prefix: &str, suffix: &str| {
        names
            .iter()
            .find(|n| n.starts_with(prefix) && n.ends_with(suffix))
            .map(|n| folder.join(n))
            .unwrap_or_else(|| panic!("no {prefix}*{suffix} in {names:?}"))
    };
    let state = find("coordinator-state_backup_", ".tar.zst.age");
    let key = find("coordinator-ca-key_backup_", ".pem.age");
    assert!(names.contains(&format!(
        "{}.json",
        state.file_name().unwrap().to_string_lossy()
    )));
    // Stock tools open it with the escrow identity; the staging identity cannot.
    assert!(
        age_decrypt(&d.identity, &state).is_err(),
        "the staging identity opened the coordinator's state"
    );
    let compressed = age_decrypt(&escrow, &state).unwrap();
    let mut zstd = Command::new("zstd");
    zstd.args(["-d", "-c"]);
    let tar = output_within(&mut zstd, &compressed, std::time::Duration::from_secs(30));
    assert!(tar.status.success());
    let mut list = Command::new("tar");
    list.args(["-t", "-f", "-"]);
    let listed = output_within(&mut list, &tar.stdout, std::time::Duration::from_secs(30));
    let listed = String::from_utf8_lossy(&listed.stdout);
    for want in [
        "coordinator.redb",
        "coordinator.toml",
        "pki/ca.pem",
        "pki/coordinator.pem",
    ] {
        assert!(
            listed.lines().any(|l| l == want),
            "{want} not in:\n{listed}"
        );
    }
    assert!(
        !listed.contains(".key"),
        "a private key is in the state archive:\n{listed}"
    );
    assert_eq!(
        age_decrypt(&escrow, &key).unwrap(),
        std::fs::read(d.fleet.pki.join("ca.key")).unwrap(),
        "the escrowed CA key differs from the CA's"
    );

    // The coordinator's host is lost: a new one on a new directory, from the self-backup.
    std::fs::remove_file(d.dir.path().join("coordinator.redb")).unwrap();
    let fresh = d.dir.path().join("new-coordinator");
    std::fs::create_dir_all(&fresh).unwrap();
    let config = std::fs::read_to_string(&d.coordinator_config).unwrap();
    let old_store = format!("{}", d.dir.path().join("coordinator.redb").display());
    let new_store = fresh.join("coordinator.redb");
    assert!(config.contains(&old_store), "{config}");
    std::fs::write(
        &d.coordinator_config,
        config.replace(&old_store, &new_store.display().to_string()),
    )
    .unwrap();
    // The staging identity is refused, and leaves no store behind.
    let mut cmd = Command::new(bin("ferry-coordinator"));
    hermetic(&mut cmd)
        .args(["restore-state", "--identity"])
        .arg(&d.identity)
        .arg("--config")
        .arg(&d.coordinator_config);
    let refused = output_within(&mut cmd, b"", std::time::Duration::from_secs(60));
    assert!(!refused.status.success());
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(text.contains("does not open with"), "{text}");
    assert!(!new_store.exists());
    let out = coordinator_ok(
        &d,
        &[
            "restore-state",
            "--identity",
            escrow.to_str().unwrap(),
            "--from",
            "primary",
            "--with-ca-key",
        ],
    );
    assert!(out.contains("(the chain verified)"), "{out}");
    let beside = fresh
        .read_dir()
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .expect("restored-state-<stamp>/");
    assert_eq!(
        std::fs::read(beside.join("pki/ca.key")).unwrap(),
        std::fs::read(d.fleet.pki.join("ca.key")).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(beside.join("coordinator.toml")).unwrap(),
        config
    );
    d.start_coordinator();
    assert_eq!(d.ferry_json(&["jobs"]), jobs);
    assert_eq!(d.ferry_json(&["backups"]), backups);
    let verified = d.ferry_ok(&["audit", "--verify"]);
    assert!(verified.contains("audit log intact"), "{verified}");
    let restored_audit = d.ferry_json(&["audit", "--limit", "0"]);
    let restored_audit = restored_audit.as_array().unwrap();
    let old = audit.as_array().unwrap();
    assert_eq!(
        &restored_audit[..old.len()],
        &old[..],
        "the restored audit log does not begin with the old one"
    );
    let actions: Vec<&str> = restored_audit[old.len()..]
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    // The snapshot precedes the self-backup's own entry: the chain goes on with the
    // restore.
    assert_eq!(actions.first(), Some(&"restore-state"), "{actions:?}");

    // It carries on: a backup and a restore, recorded and chained.
    for args in [
        &["backup", "pg-prod", "--wait"][..],
        &["restore", "pg-stage", "--datastore", "postgres", "--wait"],
    ] {
        let out = d.ferry_ok(args);
        assert!(out.contains("succeeded"), "{out}");
    }
    assert_eq!(
        d.ferry_json(&["backups"]).as_array().unwrap().len(),
        backups.as_array().unwrap().len() + 1
    );
    assert_eq!(
        d.stage_pg.table_fingerprints("app"),
        d.prod_pg.table_fingerprints("app")
    );
    let verified = d.ferry_ok(&["audit", "--verify"]);
    assert!(verified.contains("audit log intact"), "{verified}");

    // A running coordinator writes its self-backups on `[self_backup] cron` (the table is
    // the config's last: a line appended is in it).
    append(&d.coordinator_config, "cron = \"*/2 * * * * *\"\n");
    d.start_coordinator();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let log = d.ferry_json(&["audit", "--limit", "0"]);
        let scheduled = log
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["action"] == "self-backup" && e["who"] == "schedule");
        if let Some(e) = scheduled {
            let outcome = e["outcome"].as_str().unwrap_or_default();
            assert!(
                outcome.contains("written to primary") && !outcome.contains("FAILED"),
                "{e}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scheduled self-backup: {log:#}\n{}",
            d.log_tail("coordinator")
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let states = std::fs::read_dir(&folder)
        .unwrap()
        .filter(|e| {
            let n = e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .into_owned();
            n.starts_with("coordinator-state_backup_") && n.ends_with(".age")
        })
        .count();
    assert!(
        states >= 2,
        "{states} state archives in {}",
        folder.display()
    );
    assert_eq!(
        metric(metrics_port, "ferry_self_backup_last_failed"),
        Some(0.0)
    );
    let success = metric(
        metrics_port,
        "ferry_self_backup_last_success_timestamp_seconds",
    )
    .expect("a self-backup success time");
    assert!((chrono::Utc::now().timestamp() as f64 - success).abs() < 60.0);

    // The backup server refuses the next ones (its folder read-only): the metric says so.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o555)).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while metric(metrics_port, "ferry_self_backup_last_failed") != Some(1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "a failing self-backup is not reported:\n{}",
            d.log_tail("coordinator")
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let log = d.ferry_json(&["audit", "--limit", "0"]);
    assert!(
        log.as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "self-backup"
                && e["outcome"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with("FAILED")),
        "{log:#}"
    );
    // The fault gone, the next scheduled self-backup succeeds unaided and says so.
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o755)).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while metric(metrics_port, "ferry_self_backup_last_failed") != Some(0.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "self-backups did not recover:\n{}",
            d.log_tail("coordinator")
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let after = metric(
        metrics_port,
        "ferry_self_backup_last_success_timestamp_seconds",
    )
    .unwrap();
    assert!(after > success, "no newer success than {success}: {after}");
}

#[test]
fn webhooks_tell_failures_missed_schedules_and_incomplete_sets_and_a_dead_receiver_blocks_nothing()
{
    let json_hook = Webhook::start(1);
    let slack_hook = Webhook::start(0);
    // Nothing listens there: every post to it fails.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!(
        "http://127.0.0.1:{}/down",
        dead.local_addr().unwrap().port()
    );
    drop(dead);
    let token = "s3cr3t-hook-token";
    let mut d = Deployment::start_with(DEFAULT_DATA, |d| {
        let token_file = d.dir.path().join("hook.token");
        std::fs::write(&token_file, token).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        append(
            &d.coordinator_config,
            &format!(
                "\n[[environments]]\nname = \"production\"\nset_deadline = \"00:00\"\n\n\
                 [[schedules]]\nagent = \"pg-stage\"\ndatastore = \"postgres\"\nkind = \"restore\"\n\
                 cron = \"*/3 * * * * *\"\n\n\
                 [[notify]]\nurl = \"{dead_url}\"\n\n\
                 [[notify]]\nurl = \"{}\"\ntoken_file = \"{}\"\n\n\
                 [[notify]]\nurl = \"{}\"\nformat = \"slack\"\n\
                 events = [\"drill_failed\", \"schedule_missed\"]\n",
                json_hook.url("/ferry"),
                token_file.display(),
                slack_hook.url("/services/T0/B0/secret-path"),
            ),
        );
    });
    let wait = std::time::Duration::from_secs(60);
    // At start, today's set has no backup and its deadline (00:00) has passed.
    let set = json_hook.wait_for("set_incomplete", wait).json();
    assert_eq!(set["environment"], "production", "{set}");
    assert!(
        set["summary"]
            .as_str()
            .unwrap()
            .contains("pg-prod/postgres"),
        "{set}"
    );
    // No backup yet: the drills fail, told to the Slack hook as text.
    let drill = slack_hook.wait_for("drill_failed", wait).json();
    let text = drill["text"].as_str().unwrap();
    assert!(
        text.starts_with("Ferry drill_failed: the drill restore of postgres on pg-stage failed"),
        "{drill}"
    );

    // A backup that fails for good (its database is gone), told once, with its job.
    d.prod_pg
        .psql("postgres", "ALTER DATABASE app RENAME TO app_elsewhere");
    let out = d.ferry(&["backup", "pg-prod", "--wait"]);
    assert!(!out.status.success());
    let jobs = d.ferry_json(&["jobs"]);
    let failed = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["kind"] == "backup")
        .unwrap()
        .clone();
    assert_eq!(failed["state"], "failed", "{failed:#}");
    let told = json_hook.wait_for("job_failed", wait);
    let body = told.json();
    assert_eq!(body["event"], "job_failed");
    assert_eq!(body["agent"], "pg-prod");
    assert_eq!(body["datastore"], "postgres");
    assert_eq!(body["environment"], "production");
    assert_eq!(body["job_id"], failed["id"], "{body}");
    assert!(
        body["summary"]
            .as_str()
            .unwrap()
            .contains("failed after 2 attempt(s)"),
        "{body}"
    );
    assert_eq!(told.path, "/ferry");
    assert_eq!(
        told.header("authorization"),
        Some(&*format!("Bearer {token}"))
    );
    assert_eq!(told.header("content-type"), Some("application/json"));
    // The receiver's first answer was a 500: the post was retried, never doubled.
    let all = json_hook.received();
    assert_eq!(all[0].status, 500, "{all:#?}");
    assert_eq!(
        all.iter()
            .filter(|r| r.status == 200 && r.body.contains("job_failed"))
            .count(),
        1
    );
    for r in all.iter().chain(&slack_hook.received()) {
        assert!(!r.body.contains(token), "a token in a body: {}", r.body);
        assert!(
            !r.body.contains("secret-path"),
            "the URL in a body: {}",
            r.body
        );
    }
    // The Slack hook takes only what it asked for.
    assert!(
        slack_hook
            .received()
            .iter()
            .all(|r| !r.body.contains("job_failed") && !r.body.contains("set_incomplete"))
    );

    // The dead hook held nothing up: the next backup runs at once and succeeds.
    d.prod_pg
        .psql("postgres", "ALTER DATABASE app_elsewhere RENAME TO app");
    let started = std::time::Instant::now();
    let out = d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    assert!(out.contains("succeeded"), "{out}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let log = std::fs::read_to_string(d.dir.path().join("coordinator.log")).unwrap();
    assert!(
        log.contains("Could not post a notification; retrying.")
            && log.contains("hook=http://127.0.0.1:")
            && !log.contains("secret-path"),
        "{log}"
    );

    // The coordinator down for a few runs of the drill schedule: the missed runs are told.
    d.kill("coordinator");
    std::thread::sleep(std::time::Duration::from_secs(7));
    d.start_coordinator();
    let missed = slack_hook.wait_for("schedule_missed", wait).json();
    let text = missed["text"].as_str().unwrap();
    assert!(
        text.contains("the restore schedule of pg-stage/postgres") && text.contains("missed"),
        "{missed}"
    );
}

/// `ferry keys --output json` and its exit code.
fn keys(d: &Deployment) -> (Value, i32) {
    let out = d.ferry(&["--output", "json", "keys"]);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ferry keys printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, out.status.code().unwrap_or(-1))
}

/// The staging agent restarted holding the identities of `files` (one file of their lines).
fn stage_identities(d: &mut Deployment, files: &[&std::path::Path]) {
    let joined = d.dir.path().join("stage-identities.key");
    let text: String = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    let _ = std::fs::remove_file(&joined);
    std::fs::write(&joined, text).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&joined, std::fs::Permissions::from_mode(0o600)).unwrap();
    d.stage_agent.encryption = Encryption::Identity(joined);
    d.stage_agent.write(&d.stage_config);
    d.start_agent("agent-stage");
    // The coordinator learns the new identities from the agent's Describe.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let want: Vec<String> = files.iter().map(|f| fingerprint_of_identity(f)).collect();
    loop {
        let (k, _) = keys(d);
        let held: Vec<String> = k["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| {
                k["staging_agents"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|a| a == "pg-stage")
            })
            .map(|k| k["fingerprint"].as_str().unwrap().to_owned())
            .collect();
        if held.len() == want.len() && want.iter().all(|w| held.contains(w)) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the coordinator never saw pg-stage hold {want:?}: {k:#}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// The fingerprint manifests give the recipient of identity file `f`: `sha256:` + 16 hex
/// digits of the SHA-256 of the `age1...` string, computed here with `age-keygen -y`.
fn fingerprint_of_identity(f: &std::path::Path) -> String {
    let out = Command::new("age-keygen")
        .arg("-y")
        .arg(f)
        .output()
        .unwrap();
    assert!(out.status.success());
    let recipient = String::from_utf8(out.stdout).unwrap();
    use sha2::Digest;
    let digest = sha2::Sha256::digest(recipient.trim().as_bytes());
    format!("sha256:{}", &hex::encode(digest)[..16])
}

#[test]
fn keys_rotate_by_epochs_and_a_drill_with_only_the_retired_identity_fails() {
    let mut d = Deployment::start();
    let old_identity = d.identity.clone();
    let old = fingerprint_of_identity(&old_identity);
    let out = d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    assert!(out.contains("succeeded"), "{out}");
    let (k, code) = keys(&d);
    assert_eq!(code, 0, "{k:#}");
    assert_eq!(k["keys"][0]["fingerprint"], old, "{k:#}");
    assert_eq!(k["keys"][0]["backups"], 1);
    assert_eq!(
        k["keys"][0]["staging_agents"],
        serde_json::json!(["pg-stage"])
    );

    // Epoch 2 begins: production encrypts to the old and the new recipient; staging holds
    // the new identity only (the drill proves it opens what production writes now).
    let new_identity = d.dir.path().join("new-identity.key");
    let new_recipient = age_keygen(&new_identity);
    let new = fingerprint_of_identity(&new_identity);
    d.prod_agent.encryption =
        Encryption::Recipients(vec![d.recipient.clone(), new_recipient.clone()]);
    d.prod_agent.write(&d.prod_config);
    d.start_agent("agent-prod");
    let out = d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    assert!(out.contains("succeeded"), "{out}");
    stage_identities(&mut d, &[&new_identity]);
    let out = d.ferry_ok(&["restore", "pg-stage", "--datastore", "postgres", "--wait"]);
    assert!(out.contains("succeeded"), "{out}");
    assert_eq!(
        d.stage_pg.table_fingerprints("app"),
        d.prod_pg.table_fingerprints("app")
    );
    // The first backup needs the old identity, which no staging agent holds now: told by
    // keys (exit 1), status and /metrics-backed status.
    let (k, code) = keys(&d);
    assert_eq!(code, 1, "{k:#}");
    let unopenable = k["unopenable"].as_array().unwrap();
    assert_eq!(unopenable.len(), 1, "{k:#}");
    assert_eq!(unopenable[0]["recipients"], serde_json::json!([old]));
    let of = |fp: &str| {
        k["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["fingerprint"] == fp)
            .cloned()
            .unwrap_or_else(|| panic!("no {fp} in {k:#}"))
    };
    assert_eq!(of(&old)["backups"], 2, "{k:#}");
    assert_eq!(of(&old)["staging_agents"], serde_json::json!([]));
    assert_eq!(of(&new)["backups"], 1);
    let status = d.ferry_json(&["status"]);
    assert_eq!(status["unopenable_backups"]["production"], 1, "{status:#}");
    let table = d.ferry_ok(&["status"]);
    assert!(
        table.contains("WARNING: 1 backup(s) of production can be opened by no staging agent"),
        "{table}"
    );

    // Staging holds both again (the old identity is retired only once no backup in the
    // catalog needs it); production drops the old recipient: epoch 2 proper.
    stage_identities(&mut d, &[&old_identity, &new_identity]);
    let (k, code) = keys(&d);
    assert_eq!(code, 0, "{k:#}");
    d.prod_agent.encryption = Encryption::Recipients(vec![new_recipient]);
    d.prod_agent.write(&d.prod_config);
    d.start_agent("agent-prod");
    let out = d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    assert!(out.contains("succeeded"), "{out}");
    let newest = d.ferry_json(&["backups"])[0].clone();
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(format!("{}.json", newest["stored_path"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    assert_eq!(
        manifest["recipients"].as_array().unwrap().len(),
        1,
        "{manifest}"
    );
    assert_eq!(manifest["recipients"][0]["fingerprint"], new);

    // A drill with only the retired identity: the newest backup does not open, and the
    // job says which recipients it needs.
    stage_identities(&mut d, &[&old_identity]);
    let out = d.ferry(&["restore", "pg-stage", "--datastore", "postgres", "--wait"]);
    assert!(!out.status.success());
    let jobs = d.ferry_json(&["jobs"]);
    let failed = &jobs.as_array().unwrap()[0];
    assert_eq!(failed["state"], "failed", "{failed:#}");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains(&new),
        "the error does not name the recipient needed: {error}"
    );
    let (k, code) = keys(&d);
    assert_eq!(code, 1);
    assert_eq!(k["unopenable"].as_array().unwrap().len(), 1, "{k:#}");
    assert_eq!(k["unopenable"][0]["stored_path"], newest["stored_path"]);
}
