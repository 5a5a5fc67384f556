//! InfluxDB 1.x end to end against real influxd (Debian's influxdb): a portable backup
//! through the coordinator, stored as `influx_backup_<date>.tar.zst.age` with point counts
//! per measurement; a restore into staging, one database renamed, whose every point
//! equals the source and which replaces staging's older data; and a restore whose counts
//! do not match that leaves staging's database as it was and no scratch database.

use ferry_tests::*;

/// `metrics`: cpu (3 hosts × 1,000 points, two fields), mem (1,000 points, integer
/// fields, one missing field in half of them); `events`: 500 points with string fields.
fn seed(influx: &InfluxServer, dir: &std::path::Path) {
    influx.query(None, "CREATE DATABASE metrics");
    influx.query(None, "CREATE DATABASE events");
    let t0 = 1_700_000_000_000_000_000i64;
    let mut lines = String::new();
    for i in 0..1000i64 {
        for host in ["a", "b", "c"] {
            lines.push_str(&format!(
                "cpu,host={host},dc=eu user={}.5,system={} {}\n",
                i % 97,
                i % 13,
                t0 + i * 1_000_000_000
            ));
        }
        if i % 2 == 0 {
            lines.push_str(&format!(
                "mem,host=a used={}i,free={}i {}\n",
                i * 3,
                i,
                t0 + i
            ));
        } else {
            lines.push_str(&format!("mem,host=a used={}i {}\n", i * 3, t0 + i));
        }
    }
    influx.write("metrics", &lines, dir);
    let mut events = String::new();
    for i in 0..500i64 {
        events.push_str(&format!(
            "deploy,service=api version=\"1.{i}\",ok=true {}\n",
            t0 + i * 60_000_000_000
        ));
    }
    influx.write("events", &events, dir);
}

struct InfluxFleet {
    d: Deployment,
    prod: InfluxServer,
    stage: InfluxServer,
}

fn deploy() -> InfluxFleet {
    let mut servers = None;
    let d = Deployment::start_with("SELECT 1", |d| {
        let prod = InfluxServer::start(&d.dir.path().join("influx-prod"));
        let stage = InfluxServer::start(&d.dir.path().join("influx-stage"));
        append(
            &d.prod_config,
            &format!(
                "[[datastores]]\nname = \"influx\"\nkind = \"influxdb\"\nrpc_address = \"{}\"\nhttp_port = {}\n",
                prod.rpc_address(),
                prod.http_port()
            ),
        );
        append(
            &d.stage_config,
            &format!(
                "[[datastores]]\nname = \"influx\"\nkind = \"influxdb\"\nrpc_address = \"{}\"\nhttp_port = {}\nrename = {{ metrics = \"metrics_staging\" }}\n",
                stage.rpc_address(),
                stage.http_port()
            ),
        );
        servers = Some((prod, stage));
    });
    let (prod, stage) = servers.unwrap();
    seed(&prod, d.dir.path());
    // Staging's older copy, which the restore must replace.
    stage.query(None, "CREATE DATABASE metrics_staging");
    stage.write(
        "metrics_staging",
        "stale,host=old value=1 1600000000000000000\n",
        d.dir.path(),
    );
    InfluxFleet { d, prod, stage }
}

#[test]
fn influxdb_backup_then_restore_has_every_point_under_the_renamed_database() {
    let f = deploy();
    let out = f.d.ferry_ok(&["backup", "pg-prod", "influx", "--wait"]);
    assert!(out.contains("4500 points"), "{out}");
    let (_, manifest) = f.d.todays_backup("influx", "tar.zst.age");
    assert_eq!(
        manifest["counts"]["points_max"]["metrics"]["cpu"], 3000,
        "{manifest}"
    );
    assert_eq!(
        manifest["counts"]["points_max"]["metrics"]["mem"], 1000,
        "{manifest}"
    );
    assert_eq!(
        manifest["counts"]["points_min"],
        manifest["counts"]["points_max"]
    );

    let out =
        f.d.ferry_ok(&["restore", "pg-stage", "--datastore", "influx", "--wait"]);
    assert!(out.contains("equal to the manifest"), "{out}");
    assert_eq!(f.prod.dump("metrics"), f.stage.dump("metrics_staging"));
    assert_eq!(f.prod.dump("events"), f.stage.dump("events"));
    let mut dbs = f.stage.databases();
    dbs.retain(|d| d != "_internal");
    dbs.sort();
    assert_eq!(
        dbs,
        ["events", "metrics_staging"],
        "stale or scratch databases left"
    );
}

#[test]
fn influxdb_restore_with_wrong_counts_leaves_staging_as_it_was() {
    let f = deploy();
    f.d.ferry_ok(&["backup", "pg-prod", "influx", "--wait"]);
    f.d.edit_todays_manifest("influx", "tar.zst.age", |m| {
        for bound in ["points_min", "points_max"] {
            m["counts"][bound]["metrics"]["cpu"] = serde_json::json!(2999);
        }
    });

    let before = f.stage.dump("metrics_staging");
    let out =
        f.d.ferry(&["restore", "pg-stage", "--datastore", "influx", "--wait"]);
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("differs from the manifest"), "{text}");
    assert_eq!(before, f.stage.dump("metrics_staging"));
    let mut dbs = f.stage.databases();
    dbs.retain(|d| d != "_internal");
    dbs.sort();
    assert_eq!(dbs, ["metrics_staging"], "scratch databases left");
}
