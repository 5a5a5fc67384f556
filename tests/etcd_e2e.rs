//! etcd end to end against real etcd (Debian's etcd-server): a snapshot through the
//! coordinator, stored as `etcd_backup_<date>.db.zst.age` with its revision in the
//! manifest; a restore refused while staging's etcd runs on the data directory (which is
//! left as it was); then, etcd stopped, a restore whose data directory, started, holds every
//! key with its value and revisions.

use std::fs;

use ferry_tests::*;

/// 1,000 keys in transactions of 125 puts, then updates and a delete, so revisions and
/// versions are not all 1.
fn seed(etcd: &EtcdServer) {
    for t in 0..8 {
        let mut txn = String::from("\n");
        for i in 0..125 {
            let n = t * 125 + i;
            txn.push_str(&format!(
                "put /app/config/key{n:04} \"value {n} {}\"\n",
                "x".repeat(n % 50)
            ));
        }
        txn.push_str("\n\n");
        etcd.ctl(&["txn"], txn.as_bytes());
    }
    for n in 0..10 {
        etcd.ctl(&["put", &format!("/app/config/key{n:04}"), "updated"], b"");
    }
    etcd.ctl(&["put", "/registry/ünïcode", "välue"], b"");
    etcd.ctl(&["del", "/app/config/key0999"], b"");
}

#[test]
fn etcd_snapshot_restores_every_key_and_is_refused_while_etcd_runs() {
    let mut servers = None;
    let stage_ports = (free_port(), free_port());
    let d = Deployment::start_with("SELECT 1", |d| {
        let prod = EtcdServer::start(&d.dir.path().join("etcd-prod"), "prod");
        let stage_data = d.dir.path().join("etcd-stage/data");
        fs::create_dir_all(stage_data.parent().unwrap()).unwrap();
        append(
            &d.prod_config,
            &format!(
                "[[datastores]]\nname = \"etcd\"\nkind = \"etcd\"\nendpoint = \"{}\"\n",
                prod.endpoint()
            ),
        );
        append(
            &d.stage_config,
            &format!(
                "[[datastores]]\nname = \"etcd\"\nkind = \"etcd\"\ndata_dir = \"{}\"\nmember_name = \"stage\"\ninitial_cluster = \"stage=http://127.0.0.1:{}\"\ninitial_advertise_peer_urls = \"http://127.0.0.1:{}\"\n",
                stage_data.display(),
                stage_ports.1,
                stage_ports.1
            ),
        );
        servers = Some((prod, stage_data));
    });
    let (prod, stage_data) = servers.unwrap();
    seed(&prod);
    let source = prod.all();
    assert_eq!(source.len(), 1000);
    let revision = prod.revision();

    let out = d.ferry_ok(&["backup", "pg-prod", "etcd", "--wait"]);
    assert!(out.contains("1000 keys"), "{out}");
    let (_, manifest) = d.todays_backup("etcd", "db.zst.age");
    assert_eq!(manifest["counts"]["revision"], revision, "{manifest}");
    assert_eq!(manifest["counts"]["keys"], 1000, "{manifest}");

    // Staging's etcd runs on the data directory: the restore is refused, nothing changes.
    let mut stage = EtcdServer::start_on(&stage_data, "stage", stage_ports.0, stage_ports.1);
    stage.ctl(&["put", "/staging/only", "keep me"], b"");
    let before = stage.all();
    let out = d.ferry(&["restore", "pg-stage", "--datastore", "etcd", "--wait"]);
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("etcd is running on"), "{text}");
    assert_eq!(stage.all(), before);
    let beside: Vec<_> = fs::read_dir(stage_data.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("ferry"))
        .collect();
    assert!(beside.is_empty(), "{beside:?}");

    // Stopped: the restore replaces the data directory; started again, etcd has every key.
    stage.stop();
    let out = d.ferry_ok(&["restore", "pg-stage", "--datastore", "etcd", "--wait"]);
    assert!(out.contains("equal to the manifest"), "{out}");
    let restored = EtcdServer::start_on(&stage_data, "stage", stage_ports.0, stage_ports.1);
    assert_eq!(restored.all(), source);
    assert!(restored.revision() >= revision);
}
