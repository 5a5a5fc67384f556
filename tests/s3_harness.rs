//! The S3 harness on a real Ceph cluster (issue 17, before Ferry's S3 target): a one-host
//! Ceph cluster starts, serves S3 to the stock client (boto3), and stops in order leaving
//! no process behind.

use std::time::Duration;

use serde_json::json;

use ferry_tests::*;

#[test]
fn cluster_stops_in_order_and_leaves_no_process() {
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
    drop(c);
    let took = t.elapsed();
    eprintln!("Ceph stopped in {:.1} s", took.as_secs_f64());
    assert!(
        took < STOP_GRACE * 3 + Duration::from_secs(5),
        "stopping took {took:?}"
    );
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
