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
//!   again: a wrapper of `influxd` holds that restore until the kill) is finished by the agent's restart from the unpacked backup, checked against
//!   the scratch copy, nothing of it is left, and the coordinator's retry reports it;
//! - a staging `files` path that is a mount point is refused by `ferry-agent check` and
//!   before a restore downloads anything;
//! - a MongoDB restore killed while it fills its scratch databases, with the agent down
//!   until the retries are spent, leaves them; the agent's restart drops them and logs it,
//!   the next restore's report says so, and staging then equals production;
//! - a MongoDB restore killed while it moves its collections into place (the targets partly
//!   replaced) is finished by the agent's restart: staging equals production, nothing of
//!   the killed restore is left, and the next restore's report says what was done;
//! - the scratch database of another dead MongoDB restore is dropped before a restore and
//!   named in its report; databases whose name or marker is not exactly this datastore's
//!   are left, and one of a datastore of the same name restoring into another target is
//!   named as kept.

use std::collections::BTreeMap;
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

/// The next restore of `pg-stage` succeeds, its report names `database` (of `job`) as
/// removed at the agent's start, staging's `app` equals production's, and the database
/// that restore replaced is dropped after its report (in the background).
fn next_restore_reports_removed(d: &Deployment, database: &str, job: &str) {
    let out = d.ferry_ok(&["restore", "pg-stage", "--wait"]);
    assert!(
        out.contains(&format!(
            "at the agent's start, removed database {database} (job {job})"
        )),
        "{out}"
    );
    assert_eq!(
        d.stage_pg.table_fingerprints("app"),
        d.prod_pg.table_fingerprints("app")
    );
    wait_for(
        d,
        Duration::from_secs(30),
        "the replaced database dropped",
        || stage_scratch(d).is_empty().then_some(()),
    );
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
    next_restore_reports_removed(&d, &scratch, &job);
}

/// A logical PostgreSQL restore reports before the database it replaced is dropped (the
/// drop's forced checkpoint would hold the report up). An agent stopped in between leaves
/// `<target>__ferry_old_<job>` beside the restored target: at its next start the agent
/// removes it, the target keeps the restore, and the next restore reports the removal.
#[test]
fn a_replaced_database_left_by_an_agent_stopped_before_the_drop_is_removed_at_its_next_start() {
    let mut d = Deployment::start();
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    d.ferry_ok(&["restore", "pg-stage", "--wait"]);
    let job = d.ferry_ok(&["restore", "pg-stage"]).trim().to_owned();
    let j = wait_job(&d, &job, Duration::from_secs(120), final_state);
    assert_eq!(j["state"], "succeeded", "{j}");
    let restored = d.stage_pg.table_fingerprints("app");
    assert_eq!(restored, d.prod_pg.table_fingerprints("app"));
    wait_for(
        &d,
        Duration::from_secs(30),
        "the replaced database dropped",
        || stage_scratch(&d).is_empty().then_some(()),
    );

    // What the agent leaves when it stops between the swap and the drop.
    d.kill("agent-stage");
    let old = format!("app__ferry_old_{}", job.to_lowercase());
    d.stage_pg.psql(
        "postgres",
        &format!("CREATE DATABASE {old} TEMPLATE template0"),
    );
    assert_eq!(stage_scratch(&d), std::slice::from_ref(&old));

    d.start_agent("agent-stage");
    assert!(stage_scratch(&d).is_empty(), "{:?}", stage_scratch(&d));
    assert_eq!(
        d.stage_pg.table_fingerprints("app"),
        restored,
        "target kept"
    );
    let log = agent_log(&d);
    let event = log
        .lines()
        .find(|l| l.contains("Leftover of an interrupted restore") && l.contains(&old))
        .unwrap_or_else(|| panic!("no log event for {old}:\n{log}"));
    assert!(event.contains("action=removed"), "{event}");

    next_restore_reports_removed(&d, &old, &job);
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
        let bin = gated_influx_tools(&d.dir.path().join("influx-bin"));
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
                "[[datastores]]\nname = \"influx\"\nkind = \"influxdb\"\nrpc_address = \"{}\"\nhttp_port = {}\nscratch_dir = \"{}\"\nbin_dir = \"{}\"\n",
                stage.rpc_address(),
                stage.http_port(),
                scratch.display(),
                bin.display()
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
    // Killed while the target, dropped, is being restored again under its own name (the
    // gated influxd holds that restore until the agent is gone: polling for the marker
    // alone lost the race on a busy machine, the whole replacement done before the kill).
    let gate = d.dir.path().join("influx-bin").join("gate");
    wait_for(&d, Duration::from_secs(120), "the target's restore", || {
        gate.is_dir().then_some(())
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

/// `influxd` and `influx` in `dir` for a staging datastore's `bin_dir`: `influx` is the
/// real shell; `influxd` runs the real one, except for the first restore under the target's
/// own name (`-newdb metrics`), which makes `dir/gate` and then waits, restoring nothing,
/// until the agent that ran it is gone. `dir`.
fn gated_influx_tools(dir: &Path) -> PathBuf {
    make_reachable(dir);
    chmod(dir, 0o777);
    let influxd = require("influxd", "influxdb");
    std::os::unix::fs::symlink(require("influx", "influxdb-client"), dir.join("influx")).unwrap();
    let script = dir.join("influxd");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             # restore -portable -host H -db D -newdb N DIR\n\
             if [ \"$1\" = restore ] && [ \"$8\" = metrics ] && mkdir '{gate}' 2>/dev/null; then\n\
             \x20 while kill -0 $PPID 2>/dev/null; do sleep 0.05; done\n\
             \x20 exit 1\n\
             fi\n\
             exec '{real}' \"$@\"\n",
            gate = dir.join("gate").display(),
            real = influxd.display()
        ),
    )
    .unwrap();
    chmod(&script, 0o755);
    dir.to_owned()
}

/// A deployment with a MongoDB server on each side and a datastore `mongo` on each agent
/// (staging restores `shop` into `shop_staging`).
fn mongo_deployment() -> (Deployment, MongoServer, MongoServer) {
    let mut servers = None;
    let d = Deployment::start_with_options(DeploymentOptions {
        source_sql: "SELECT 1".into(),
        retry: Retry {
            max_attempts: 2,
            initial_backoff_seconds: 1,
            max_backoff_seconds: 1,
        },
        tweak: Some(Box::new(|d: &mut Deployment| {
            let prod = MongoServer::start(&d.dir.path().join("mongo-prod"));
            let stage = MongoServer::start(&d.dir.path().join("mongo-stage"));
            append(&d.prod_config, &prod.datastore_toml());
            append(
                &d.stage_config,
                &format!(
                    "[[datastores]]\nname = \"mongo\"\nkind = \"mongodb\"\nuri = \"{}\"\nrename = {{ shop = \"shop_staging\" }}\n",
                    stage.uri()
                ),
            );
            servers = Some((prod, stage));
        })),
        ..DeploymentOptions::default()
    });
    let (prod, stage) = servers.unwrap();
    (d, prod, stage)
}

/// Production's MongoDB data: `app.a_first` (3 documents, the first collection a restore
/// moves into place), `app.users` (40,000 documents, an index, a view `app.active` on it)
/// and `shop.orders` (30,000 documents): a restore long enough to kill while it inserts or
/// while it moves collections into place.
fn seed_mongo(prod: &MongoServer) {
    use bson::doc;
    prod.insert(
        "app",
        "a_first",
        &(0..3).map(|i| doc! {"_id": i, "v": 1}).collect::<Vec<_>>(),
    );
    let users: Vec<bson::Document> = (0..40_000i64)
        .map(|i| doc! {"_id": i, "email": format!("user{i}@example.com"), "n": i, "note": "x".repeat(100)})
        .collect();
    prod.insert("app", "users", &users);
    prod.run(
        "app",
        doc! {"createIndexes": "users", "indexes": [{"key": {"email": 1}, "name": "email_1", "unique": true}]},
    );
    prod.run(
        "app",
        doc! {"create": "active", "viewOn": "users", "pipeline": [{"$match": {"n": {"$lt": 10}}}]},
    );
    let orders: Vec<bson::Document> = (0..30_000i64)
        .map(|i| doc! {"_id": i, "item": format!("item-{}", i % 500), "qty": i % 9})
        .collect();
    prod.insert("shop", "orders", &orders);
}

/// A second version of production's data: a document more in every collection.
fn change_mongo(prod: &MongoServer) {
    use bson::doc;
    prod.insert("app", "a_first", &[doc! {"_id": 3, "v": 2}]);
    prod.insert(
        "app",
        "users",
        &[doc! {"_id": -1i64, "email": "new@example.com", "n": -1i64}],
    );
    prod.insert(
        "shop",
        "orders",
        &[doc! {"_id": -1i64, "item": "new", "qty": 1}],
    );
}

/// Staging's MongoDB databases whose name has `__ferry_`.
fn mongo_scratch(stage: &MongoServer) -> Vec<String> {
    stage
        .databases()
        .into_iter()
        .filter(|n| n.contains("__ferry_"))
        .collect()
}

/// Staging's targets as a user compares them with production's `app` and `shop`.
fn staging_targets(stage: &MongoServer) -> [BTreeMap<String, NamespaceContents>; 2] {
    [stage.contents("app"), stage.contents("shop_staging")]
}

/// Production's `app` and `shop`.
fn production(prod: &MongoServer) -> [BTreeMap<String, NamespaceContents>; 2] {
    [prod.contents("app"), prod.contents("shop")]
}

/// Backs up production, restores it into staging, changes production and backs it up
/// again: staging holds the first version, the newest backup the second. Returns staging's
/// targets as they are.
fn two_mongo_backups(
    d: &Deployment,
    prod: &MongoServer,
    stage: &MongoServer,
) -> [BTreeMap<String, NamespaceContents>; 2] {
    seed_mongo(prod);
    d.ferry_ok(&["backup", "pg-prod", "mongo", "--wait"]);
    d.ferry_ok(&["restore", "pg-stage", "--datastore", "mongo", "--wait"]);
    let before = staging_targets(stage);
    assert_eq!(before, production(prod), "the first restore");
    change_mongo(prod);
    d.ferry_ok(&["backup", "pg-prod", "mongo", "--wait"]);
    assert_ne!(production(prod), before);
    before
}

/// The names of job `job`'s scratch databases on staging.
fn mongo_scratch_of(job: &str) -> Vec<String> {
    let mut v = vec![
        format!("app__ferry_new_{}", job.to_lowercase()),
        format!("shop_staging__ferry_new_{}", job.to_lowercase()),
    ];
    v.sort();
    v
}

#[test]
fn a_mongodb_restore_killed_while_filling_its_scratch_databases_leaves_them_until_the_agent_restarts_and_drops_them()
 {
    let (mut d, prod, stage) = mongo_deployment();
    let before = two_mongo_backups(&d, &prod, &stage);

    let job = d
        .ferry_ok(&["restore", "pg-stage", "--datastore", "mongo"])
        .trim()
        .to_owned();
    let scratch = mongo_scratch_of(&job);
    // Killed while it inserts into the scratch database of `app`.
    wait_for(&d, Duration::from_secs(120), "documents in scratch", || {
        (stage.count(&scratch[0], "users") > 0).then_some(())
    });
    d.kill("agent-stage");
    let j = wait_job(&d, &job, Duration::from_secs(60), final_state);
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(
        mongo_scratch(&stage),
        scratch,
        "the killed restore left its scratch databases"
    );
    assert_eq!(staging_targets(&stage), before, "targets unchanged");

    // The agent comes back: before it serves, it drops the dead job's scratch databases.
    d.start_agent("agent-stage");
    assert!(
        mongo_scratch(&stage).is_empty(),
        "{:?}",
        mongo_scratch(&stage)
    );
    assert_eq!(staging_targets(&stage), before, "targets unchanged");
    let log = agent_log(&d);
    for name in &scratch {
        let event = log
            .lines()
            .find(|l| {
                l.contains("Leftover of an interrupted restore")
                    && l.contains(&format!("leftover=database {name}"))
            })
            .unwrap_or_else(|| panic!("no log event for {name}:\n{log}"));
        assert!(
            event.contains(&format!("job_id={job}")) && event.contains("action=removed"),
            "structured fields: {event}"
        );
    }

    // The next restore succeeds and its report says what the agent dropped.
    let out = d.ferry_ok(&["restore", "pg-stage", "--datastore", "mongo", "--wait"]);
    assert!(
        out.contains("at the agent's start, removed database"),
        "{out}"
    );
    for name in &scratch {
        assert!(
            out.contains(&format!("removed database {name} (job {job})")),
            "{out}"
        );
    }
    assert_eq!(staging_targets(&stage), production(&prod));
    assert!(
        mongo_scratch(&stage).is_empty(),
        "{:?}",
        mongo_scratch(&stage)
    );
}

#[test]
fn a_mongodb_restore_killed_while_moving_into_place_is_finished_when_the_agent_restarts() {
    let (mut d, prod, stage) = mongo_deployment();
    let before = two_mongo_backups(&d, &prod, &stage);

    let job = d
        .ferry_ok(&["restore", "pg-stage", "--datastore", "mongo"])
        .trim()
        .to_owned();
    let scratch = mongo_scratch_of(&job);
    // Killed once the first collection, `app.a_first`, was moved into place (it then holds
    // production's new document): `app.users` and `shop_staging.orders` are still to move.
    wait_for(&d, Duration::from_secs(180), "the move into place", || {
        (stage.count("app", "a_first") == 4).then_some(())
    });
    d.kill("agent-stage");
    let j = wait_job(&d, &job, Duration::from_secs(60), final_state);
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(
        mongo_scratch(&stage),
        scratch,
        "the killed restore left the rest of its restore in scratch"
    );
    // Partly replaced (what the server had begun when the agent died, it finished).
    assert_ne!(staging_targets(&stage), before, "app.a_first was replaced");

    // The agent comes back and finishes the move: staging is production's second version.
    d.start_agent("agent-stage");
    assert!(
        mongo_scratch(&stage).is_empty(),
        "{:?}",
        mongo_scratch(&stage)
    );
    assert_eq!(staging_targets(&stage), production(&prod));
    let log = agent_log(&d);
    for name in &scratch {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("leftover=database {name}"))
                    && l.contains(&format!("job_id={job}"))
                    && l.contains("action=swapped_in")),
            "no swapped_in event for {name}:\n{log}"
        );
    }

    // The next restore says what the agent did, and succeeds.
    let out = d.ferry_ok(&["restore", "pg-stage", "--datastore", "mongo", "--wait"]);
    for (name, target) in scratch.iter().zip(["app", "shop_staging"]) {
        assert!(
            out.contains(&format!(
                "put database {name} in place of database {target}, finishing the swap of job {job}"
            )),
            "{out}"
        );
        assert!(
            out.contains(&format!("removed database {name} (job {job})")),
            "{out}"
        );
    }
    assert_eq!(staging_targets(&stage), production(&prod));
    assert!(
        mongo_scratch(&stage).is_empty(),
        "{:?}",
        mongo_scratch(&stage)
    );
}

#[test]
fn leftovers_of_dead_mongodb_restores_are_dropped_before_a_restore_and_lookalikes_are_left() {
    use bson::doc;
    let (d, prod, stage) = mongo_deployment();
    prod.insert("app", "users", &[doc! {"_id": 1, "email": "a@example.com"}]);
    prod.insert("shop", "orders", &[doc! {"_id": 1, "item": "tea"}]);
    let marker = |job: &str, datastore: &str, (source, target): (&str, &str)| {
        doc! {"_id": "restore", "datastore": datastore, "job": job, "source": source,
        "target": target, "state": "filling"}
    };
    // A restore of this datastore that died while it filled its scratch database.
    let dead = "01JAAAAAAAAAAAAAAAAAAAAAAA";
    let ours = format!("shop_staging__ferry_new_{}", dead.to_lowercase());
    stage.insert(
        &ours,
        "__ferry_restore",
        &[marker(dead, "mongo", ("shop", "shop_staging"))],
    );
    stage.insert(&ours, "orders", &[doc! {"_id": 1, "item": "half"}]);
    // Not exactly this datastore's: never dropped.
    let other_target = "01JDDDDDDDDDDDDDDDDDDDDDDD";
    let lookalikes = [
        // Not a job id; no marker; another datastore's.
        "app__ferry_new_backup".to_owned(),
        "app__ferry_new_01jbbbbbbbbbbbbbbbbbbbbbbb".to_owned(),
        "app__ferry_new_01jcccccccccccccccccccccccc".to_owned(),
        // A datastore of the same name restoring `shop` into `shop` (this one restores it
        // into `shop_staging`): kept, and named in the report.
        format!("shop__ferry_new_{}", other_target.to_lowercase()),
    ];
    for name in &lookalikes {
        stage.insert(name, "users", &[doc! {"_id": 1, "not": "ours"}]);
    }
    stage.insert(
        &lookalikes[2],
        "__ferry_restore",
        &[marker(
            "01JCCCCCCCCCCCCCCCCCCCCCCC",
            "other",
            ("app", "app"),
        )],
    );
    stage.insert(
        &lookalikes[3],
        "__ferry_restore",
        &[marker(other_target, "mongo", ("shop", "shop"))],
    );

    d.ferry_ok(&["backup", "pg-prod", "mongo", "--wait"]);
    let out = d.ferry_ok(&["restore", "pg-stage", "--datastore", "mongo", "--wait"]);
    assert!(
        out.contains(&format!(
            "before this restore, removed database {ours} (job {dead})"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "kept database {} (job {other_target}): a restore of database shop into shop",
            lookalikes[3]
        )),
        "{out}"
    );
    let mut left = lookalikes.to_vec();
    left.sort();
    assert_eq!(mongo_scratch(&stage), left, "only the lookalikes are left");
    for name in &lookalikes {
        assert_eq!(stage.count(name, "users"), 1, "{name} untouched");
    }
    assert_eq!(staging_targets(&stage), production(&prod));
}
