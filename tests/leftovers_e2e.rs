//! Leftovers of killed restores (issue 15), provoked for real: the staging agent is killed
//! (SIGKILL, as a host that dies) in the middle of a restore, and
//! - with the agent down until the coordinator's retries are spent, PostgreSQL's scratch
//!   database stays; the agent's restart removes it and logs it, the next restore's report
//!   says so, and that restore succeeds;
//! - with the agent back before the retries are spent, the coordinator's retry of a
//!   `files` restore (the same job id, so the same sibling) succeeds, where it used to fail
//!   with "File exists", and its report names what was removed;
//! - leftovers of other (dead) jobs beside a `files` target are put right before a restore
//!   and named in its report, and names that are not exactly Ferry's are left alone;
//! - an InfluxDB restore killed while it replaced its target (dropped, being restored
//!   again) is finished by the agent's restart from the unpacked backup, checked against
//!   the scratch copy, nothing of it is left, and the coordinator's retry reports it;
//! - a staging `files` path that is a mount point is refused by `ferry-agent check` and
//!   before a restore downloads anything.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_tests::*;

/// About 40 MB of md5 text in 300,000 rows: a restore long enough to kill in the middle.
const BIG: &str = "CREATE TABLE big (id int PRIMARY KEY, body text);
    INSERT INTO big SELECT g, md5(g::text) || md5(random()::text) || md5(random()::text) || md5(random()::text)
    FROM generate_series(1, 300000) g;";

/// Polls `ferry job ID` until `done` holds for it; panics with the logs after `limit`.
fn wait_job(
    d: &Deployment,
    id: &str,
    limit: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let out = d.ferry(&["job", id, "--output", "json"]);
        if out.status.success() {
            let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if done(&j) {
                return j;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} not done after {limit:?}: {j}\n{}",
                d.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn final_state(j: &serde_json::Value) -> bool {
    j["state"] == "succeeded" || j["state"] == "failed"
}

/// Waits until `found` returns something (polling every 10 ms), at most `limit`.
fn wait_for<T>(d: &Deployment, limit: Duration, what: &str, found: impl Fn() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(t) = found() {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} after {limit:?}\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Staging's databases whose name has `__ferry_`.
fn stage_scratch(d: &Deployment) -> Vec<String> {
    d.stage_pg
        .databases()
        .into_iter()
        .filter(|n| n.contains("__ferry_"))
        .collect()
}

/// The names beside `target` that have `ferry` in them.
fn siblings(target: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(target.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("ferry"))
        .collect();
    v.sort();
    v
}

/// The staging agent's log, colours (ANSI escapes) taken out.
fn agent_log(d: &Deployment) -> String {
    let raw = fs::read_to_string(d.dir.path().join("agent-stage.log")).unwrap();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... m
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn a_restore_killed_until_the_retries_are_spent_leaves_a_scratch_database_that_the_agent_removes_and_reports()
 {
    let mut d = Deployment::start_with_options(DeploymentOptions {
        source_sql: BIG.into(),
        retry: Retry {
            max_attempts: 2,
            initial_backoff_seconds: 1,
            max_backoff_seconds: 1,
        },
        ..DeploymentOptions::default()
    });
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    // A first restore, so that the target exists and holds data the fault must not lose.
    d.ferry_ok(&["restore", "pg-stage", "--wait"]);
    let before = d.stage_pg.table_fingerprints("app");

    let job = d.ferry_ok(&["restore", "pg-stage"]).trim().to_owned();
    let scratch = format!("app__ferry_new_{}", job.to_lowercase());
    wait_for(&d, Duration::from_secs(120), "scratch database", || {
        d.stage_pg.has_database(&scratch).then_some(())
    });
    d.kill("agent-stage");
    let j = wait_job(&d, &job, Duration::from_secs(60), final_state);
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(
        stage_scratch(&d),
        std::slice::from_ref(&scratch),
        "the killed restore left its scratch database"
    );
    assert_eq!(
        d.stage_pg.table_fingerprints("app"),
        before,
        "target unchanged"
    );

    // The agent comes back: before it serves, it removes the dead job's scratch database.
    d.start_agent("agent-stage");
    assert!(stage_scratch(&d).is_empty(), "{:?}", stage_scratch(&d));
    let log = agent_log(&d);
    let event = log
        .lines()
        .find(|l| l.contains("Leftover of an interrupted restore") && l.contains(&scratch))
        .unwrap_or_else(|| panic!("no log event for {scratch}:\n{log}"));
    assert!(
        event.contains(&format!("job_id={job}")) && event.contains("action=removed"),
        "structured fields: {event}"
    );

    // The next restore succeeds and its report says what the agent removed.
    let out = d.ferry_ok(&["restore", "pg-stage", "--wait"]);
    assert!(
        out.contains(&format!(
            "at the agent's start, removed database {scratch} (job {job})"
        )),
        "{out}"
    );
    assert_eq!(
        d.stage_pg.table_fingerprints("app"),
        d.prod_pg.table_fingerprints("app")
    );
    assert!(stage_scratch(&d).is_empty(), "{:?}", stage_scratch(&d));
}

/// A deployment with a `files` datastore `minio`: production's tree (1,500 files of 32 KiB
/// of varied bytes, about 48 MiB: a restore that lasts long enough to kill) and staging's
/// target, which holds `live-object`.
fn files_deployment(
    retry: Retry,
    tweak: impl FnOnce(&Path) + 'static,
) -> (Deployment, PathBuf, PathBuf) {
    let mut paths = None;
    let d = Deployment::start_with_options(DeploymentOptions {
        source_sql: "SELECT 1".into(),
        retry,
        tweak: Some(Box::new(|d: &mut Deployment| {
            let source = d.dir.path().join("minio-prod/data");
            let target = d.dir.path().join("minio-stage/data");
            fs::create_dir_all(&target).unwrap();
            fs::write(target.join("live-object"), b"staging's current data").unwrap();
            for i in 0..1500u64 {
                let dir = source.join(format!("bucket/{:02}", i % 30));
                fs::create_dir_all(&dir).unwrap();
                fs::write(
                    dir.join(format!("object-{i}")),
                    incompressible(32 << 10, i + 1),
                )
                .unwrap();
            }
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
            tweak(&target);
            paths = Some((source, target));
        })),
        ..DeploymentOptions::default()
    });
    let (source, target) = paths.unwrap();
    (d, source, target)
}

/// `path`'s files relative to it, with their bytes.
fn tree_of(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push((
                    p.strip_prefix(root).unwrap().to_owned(),
                    fs::read(&p).unwrap(),
                ));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

#[test]
fn the_coordinators_retry_of_a_files_restore_killed_mid_unpack_succeeds_and_reports_the_removed_tree()
 {
    let (mut d, source, target) = files_deployment(
        Retry {
            max_attempts: 5,
            initial_backoff_seconds: 2,
            max_backoff_seconds: 4,
        },
        |_| {},
    );
    d.ferry_ok(&["backup", "pg-prod", "minio", "--wait"]);
    let job = d
        .ferry_ok(&["restore", "pg-stage", "--datastore", "minio"])
        .trim()
        .to_owned();
    let new = format!(".data.ferry-new-{job}");
    // Killed once the unpack has begun.
    wait_for(&d, Duration::from_secs(120), "unpack", || {
        let dir = target.parent().unwrap().join(&new);
        fs::read_dir(dir.join("bucket"))
            .is_ok_and(|mut e| e.next().is_some())
            .then_some(())
    });
    d.kill("agent-stage");
    assert_eq!(
        siblings(&target),
        std::slice::from_ref(&new),
        "the kill left the half tree"
    );
    assert!(
        target.join("live-object").exists(),
        "the target is untouched"
    );

    d.start_agent("agent-stage");
    let j = wait_job(&d, &job, Duration::from_secs(180), final_state);
    assert_eq!(j["state"], "succeeded", "{j}\n{}", d.logs());
    assert!(j["attempt"].as_u64().unwrap() >= 2, "{j}");
    let summary = j["result"]["summary"].as_str().unwrap();
    assert!(
        summary.contains(&format!(
            "removed {} (job {job})",
            target.parent().unwrap().join(&new).display()
        )),
        "the report names what was removed: {summary}"
    );
    assert!(siblings(&target).is_empty(), "{:?}", siblings(&target));
    assert_eq!(tree_of(&target), tree_of(&source));
}

#[test]
fn leftovers_of_dead_jobs_beside_a_files_target_are_put_right_before_a_restore_and_named_in_its_report()
 {
    // As two killed restores would leave them: one killed after its swap (the replaced
    // tree beside the target), one killed during its unpack; and lookalikes that are not
    // exactly Ferry's names for this target.
    let dead_swap = "01JAAAAAAAAAAAAAAAAAAAAAAA";
    let dead_unpack = "01JBBBBBBBBBBBBBBBBBBBBBBB";
    let lookalikes = [
        ".data.ferry-new-notajob",
        ".data.ferry-new-01jbbbbbbbbbbbbbbbbbbbbbbb",
        ".datax.ferry-old-01JAAAAAAAAAAAAAAAAAAAAAAA",
    ];
    let (d, source, target) = files_deployment(
        Retry {
            max_attempts: 1,
            initial_backoff_seconds: 1,
            max_backoff_seconds: 1,
        },
        |_| {},
    );
    let parent = target.parent().unwrap().to_owned();
    let old = parent.join(format!(".data.ferry-old-{dead_swap}"));
    let new = parent.join(format!(".data.ferry-new-{dead_unpack}"));
    for dir in [&old, &new] {
        fs::create_dir_all(dir.join("bucket")).unwrap();
        fs::write(dir.join("bucket/object"), b"a dead job's").unwrap();
    }
    for l in lookalikes {
        fs::create_dir_all(parent.join(l)).unwrap();
    }

    d.ferry_ok(&["backup", "pg-prod", "minio", "--wait"]);
    let out = d.ferry_ok(&["restore", "pg-stage", "--datastore", "minio", "--wait"]);
    assert!(
        out.contains(&format!(
            "before this restore, removed {} (job {dead_swap}), removed {} (job {dead_unpack})",
            old.display(),
            new.display()
        )),
        "{out}"
    );
    let mut left = lookalikes.map(str::to_owned).to_vec();
    left.sort();
    assert_eq!(siblings(&target), left, "only the lookalikes are left");
    assert_eq!(tree_of(&target), tree_of(&source));
}

#[test]
fn a_staging_files_path_that_is_a_mount_point_is_refused_by_check_and_before_the_download() {
    let mount = std::sync::Arc::new(std::sync::Mutex::new(None));
    let held = mount.clone();
    let (d, _source, target) = files_deployment(
        Retry {
            max_attempts: 1,
            initial_backoff_seconds: 1,
            max_backoff_seconds: 1,
        },
        move |target| {
            fs::remove_dir_all(target).unwrap();
            fs::create_dir(target).unwrap();
            *held.lock().unwrap() = Some(Tmpfs::mount(target, 64 << 20, "root"));
            fs::write(target.join("live-object"), b"staging's current data").unwrap();
        },
    );
    // Unmounted before the deployment's directory is removed.
    let mount = mount;
    assert!(mount.lock().unwrap().is_some());

    let check = agent_check(&d.stage_config);
    let text = String::from_utf8_lossy(&check.stdout).into_owned()
        + &String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success(), "{text}");
    assert!(
        text.contains(&format!("{} is a mount point", target.display())),
        "{text}"
    );

    d.ferry_ok(&["backup", "pg-prod", "minio", "--wait"]);
    let out = d.ferry(&["restore", "pg-stage", "--datastore", "minio", "--wait"]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("is a mount point") && text.contains("nothing was downloaded"),
        "{text}"
    );
    assert!(siblings(&target).is_empty(), "{:?}", siblings(&target));
    assert_eq!(
        tree_of(&target),
        [(
            PathBuf::from("live-object"),
            b"staging's current data".to_vec()
        )]
    );
}

#[test]
fn an_influxdb_restore_killed_while_replacing_its_target_is_finished_when_the_agent_restarts() {
    let mut servers = None;
    let mut d = Deployment::start_with("SELECT 1", |d| {
        let prod = InfluxServer::start(&d.dir.path().join("influx-prod"));
        let stage = InfluxServer::start(&d.dir.path().join("influx-stage"));
        let scratch = d.dir.path().join("influx-scratch");
        fs::create_dir_all(&scratch).unwrap();
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
                "[[datastores]]\nname = \"influx\"\nkind = \"influxdb\"\nrpc_address = \"{}\"\nhttp_port = {}\nscratch_dir = \"{}\"\n",
                stage.rpc_address(),
                stage.http_port(),
                scratch.display()
            ),
        );
        servers = Some((prod, stage, scratch));
    });
    let (prod, stage, scratch) = servers.unwrap();
    prod.query(None, "CREATE DATABASE metrics");
    let t0 = 1_700_000_000_000_000_000i64;
    let mut lines = String::new();
    for i in 0..20_000i64 {
        lines.push_str(&format!(
            "cpu,host=h{} user={}.5,system={}i {}\n",
            i % 50,
            i % 97,
            i % 13,
            t0 + i * 1_000_000_000
        ));
    }
    prod.write("metrics", &lines, d.dir.path());
    stage.query(None, "CREATE DATABASE metrics");
    stage.write(
        "metrics",
        "stale,host=old value=1 1600000000000000000\n",
        d.dir.path(),
    );
    d.ferry_ok(&["backup", "pg-prod", "influx", "--wait"]);

    let job = d
        .ferry_ok(&["restore", "pg-stage", "--datastore", "influx"])
        .trim()
        .to_owned();
    let marker = format!("metrics__ferry_swap_{job}");
    let copy = format!("metrics__ferry_new_{job}");
    // Killed once the marker says the target is being replaced.
    wait_for(&d, Duration::from_secs(120), "marker database", || {
        stage.databases().contains(&marker).then_some(())
    });
    d.kill("agent-stage");
    let dbs = stage.databases();
    assert!(dbs.contains(&copy) && dbs.contains(&marker), "{dbs:?}");
    let unpacked = scratch.join(format!("ferry-influxdb-influx-{job}"));
    assert!(unpacked.is_dir(), "the unpacked backup is left");

    d.start_agent("agent-stage");
    let mut dbs = stage.databases();
    dbs.retain(|n| n != "_internal");
    assert_eq!(dbs, ["metrics"], "nothing of the killed restore is left");
    assert!(!unpacked.exists());
    assert_eq!(stage.dump("metrics"), prod.dump("metrics"));
    let log = agent_log(&d);
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("leftover=database {copy}"))
                && l.contains("action=swapped_in")),
        "{log}"
    );
    // The coordinator's retry of the killed job runs on the restarted agent, and its
    // report says what the agent found and did.
    let j = wait_job(&d, &job, Duration::from_secs(60), final_state);
    assert_eq!(j["state"], "succeeded", "{j}");
    let summary = j["result"]["summary"].as_str().unwrap();
    assert!(
        summary.contains(&format!(
            "at the agent's start, put database {copy} in place of database metrics"
        )),
        "{summary}"
    );
    assert_eq!(stage.dump("metrics"), prod.dump("metrics"));
}
