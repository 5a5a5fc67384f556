//! A control plane that can be lost (issue 19), through the real binaries against a real
//! Ceph RGW, sshd and PostgreSQL:
//! - the catalog rebuilt from the targets: with backups on an S3 primary with Object Lock
//!   and copies on SFTP, the coordinator's store is deleted, `ferry-coordinator catalog
//!   rebuild` reads the manifests back, and `ferry backups` and `ferry backups --sets` (JSON)
//!   are equal to before; a restore from the rebuilt catalog equals the source, and the audit
//!   chain verifies with the rebuild recorded in it.

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
    let mut cmd = Command::new(bin("ferry-coordinator"));
    hermetic(&mut cmd)
        .args(["catalog", "rebuild", "--config"])
        .arg(&d.coordinator_config);
    let out = output_within(&mut cmd, b"", std::time::Duration::from_secs(120));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "catalog rebuild failed: {text}");
    text
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
