//! Faults (issue 6), provoked for real against the real binaries, PostgreSQL and sshd:
//! - the backup server's link is cut mid-backup (the server in a network namespace of its
//!   own): the attempt fails within the I/O timeout, nothing appears under a final name,
//!   the retry succeeds once the link is back and removes the first attempt's partial;
//! - the coordinator is killed mid-job and restarted: a job still running is followed
//!   again, one that finished meanwhile is recorded, one its agent forgot is retried;
//!   scheduled runs are neither lost nor doubled across the restart;
//! - (issue 16) the coordinator is stopped (SIGTERM) mid-job with an operator waiting on
//!   the job: it exits within seconds, and the next start follows the job to its end;
//! - (issue 16) the production agent is stopped (SIGTERM) mid-backup: it exits within
//!   10 s, pg_dump with it, nothing is stored under a final name, and once it is back the
//!   coordinator's retry stores a backup whose restore equals the source; with pg_dump
//!   waiting on a lock (writing nothing), it is killed and reaped within the 10 s too;
//! - the backup server's disk fills (a small tmpfs): "no space left on the backup
//!   server", nothing partial remains, earlier backups are untouched;
//! - pg_dump is killed half-way, the database restarts under it, or pg_dump exits 0
//!   having written nothing: the job fails naming the tool, nothing is stored;
//! - (issue 15) the backup server's session processes are stopped (SIGSTOP) mid-upload:
//!   the attempt fails within `io_timeout_seconds` naming the stall, and the retry
//!   succeeds; with a long I/O timeout, the coordinator fails the job after
//!   `agent_timeout_seconds` of progress reports that move no bytes;
//! - (issue 15) the server fails the rename of the backup's last manifest (`strace`
//!   injects the error): nothing is taken for a backup, the job says what is left, and
//!   `ferry prune` removes the orphans; a full disk behind an add-only key says the
//!   partial could not be removed, and `ferry prune` removes it at once.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_tests::*;
use serde_json::json;

/// About 40 MB of md5 text in 300,000 rows: about 20 MB stored, 10 s at 2 MiB/s.
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

/// Polls `ferry job ID` until `done` holds for it; panics with the logs after `limit`.
fn wait_job(
    d: &Deployment,
    id: &str,
    limit: Duration,
    what: &str,
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
                "job {id} not {what} after {limit:?}: {j}\n{}",
                d.logs()
            );
        } else {
            assert!(
                Instant::now() < deadline,
                "ferry job {id} failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                d.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until an upload of production's PostgreSQL backup has more than `bytes` in its
/// partial file on the backup server.
fn wait_partial(d: &Deployment, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let growing = d.sshd.files().iter().any(|f| {
            f.ends_with(".partial")
                && f.contains("postgres_backup_")
                && !f.contains("globals")
                && fs::metadata(d.sshd.root().join(f)).is_ok_and(|m| m.len() > bytes)
        });
        if growing {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no partial upload over {bytes} bytes appeared: {:?}\n{}",
            d.sshd.files(),
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until job `id` is succeeded or failed.
fn wait_final(d: &Deployment, id: &str, limit: Duration) -> serde_json::Value {
    wait_job(d, id, limit, "final", |j| {
        j["state"] == "succeeded" || j["state"] == "failed"
    })
}

/// Nothing on the backup server under a final name, and no partial file left.
fn assert_nothing_stored(d: &Deployment) {
    assert!(
        d.sshd.final_files().is_empty(),
        "{:?}",
        d.sshd.final_files()
    );
    assert!(partials(d).is_empty(), "{:?}", d.sshd.files());
}

fn partials(d: &Deployment) -> Vec<String> {
    d.sshd
        .files()
        .into_iter()
        .filter(|f| f.ends_with(".partial"))
        .collect()
}

/// The production PostgreSQL archives (not manifests) under a final name.
fn archives(d: &Deployment) -> Vec<String> {
    d.sshd
        .final_files()
        .into_iter()
        .filter(|f| f.contains("postgres_backup_") && f.ends_with(".age"))
        .collect()
}

#[test]
fn cutting_the_backup_servers_link_mid_backup_fails_the_attempt_and_the_retry_succeeds() {
    let d = Deployment::start_with_options(DeploymentOptions {
        source_sql: BIG.into(),
        backup_server_netns: true,
        io_timeout_seconds: Some(4),
        agent_timeout_seconds: 15,
        retry: Retry {
            max_attempts: 4,
            initial_backoff_seconds: 6,
            max_backoff_seconds: 10,
        },
        tweak: Some(Box::new(|d| limit_upload(d, 2 << 20))),
        ..DeploymentOptions::default()
    });
    let netns = d
        .netns
        .as_ref()
        .expect("the backup server has its own namespace");
    let job = d.ferry_ok(&["backup", "pg-prod"]).trim().to_owned();
    wait_partial(&d, 3 << 20);

    netns.cut();
    let cut = Instant::now();
    let failed = wait_job(&d, &job, Duration::from_secs(60), "failed once", |j| {
        j["error"].is_string()
    });
    let detected = cut.elapsed();
    assert_eq!(failed["attempt"], 1, "{failed}");
    assert_ne!(failed["state"], "succeeded", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("backup server") || error.contains(netns.ip()),
        "the error names the backup server: {error}"
    );
    assert!(
        archives(&d).is_empty(),
        "nothing under a final name while the link is down: {:?}",
        d.sshd.final_files()
    );
    // The agent's I/O timeout (4 s) bounds how long a dead link goes unnoticed.
    assert!(
        detected < Duration::from_secs(40),
        "took {detected:?} to notice"
    );

    netns.restore();
    let done = wait_job(
        &d,
        &job,
        Duration::from_secs(120),
        "succeeded after the link came back",
        |j| j["state"] == "succeeded" || j["state"] == "failed",
    );
    assert_eq!(done["state"], "succeeded", "{done}\n{}", d.logs());
    assert!(done["attempt"].as_u64().unwrap() >= 2, "{done}");
    assert_eq!(
        archives(&d).len(),
        1,
        "one archive: {:?}",
        d.sshd.final_files()
    );
    assert!(
        partials(&d).is_empty(),
        "the first attempt's partial is removed by the retry: {:?}",
        d.sshd.files()
    );
    // What the retry stored is whole: the staging agent verifies it end to end.
    d.ferry_ok(&["verify", "pg-stage", "--wait"]);
    println!(
        "link cut noticed after {:.1} s; retried and succeeded on attempt {}",
        detected.as_secs_f64(),
        done["attempt"]
    );
}

#[test]
fn a_coordinator_killed_mid_job_takes_up_running_finished_and_forgotten_jobs_when_it_restarts() {
    let mut d = Deployment::start_with_options(DeploymentOptions {
        source_sql: BIG.into(),
        retry: Retry {
            max_attempts: 3,
            initial_backoff_seconds: 1,
            max_backoff_seconds: 2,
        },
        tweak: Some(Box::new(|d| limit_upload(d, 4 << 20))),
        ..DeploymentOptions::default()
    });

    // 1. Still running when the coordinator comes back: followed to the end.
    let job = d.ferry_ok(&["backup", "pg-prod"]).trim().to_owned();
    wait_partial(&d, 2 << 20);
    d.kill("coordinator");
    d.start_coordinator();
    let j = wait_final(&d, &job, Duration::from_secs(120));
    assert_eq!(j["state"], "succeeded", "{j}\n{}", d.logs());
    assert_eq!(j["attempt"], 1, "followed, not run again: {j}");
    assert_eq!(archives(&d).len(), 1, "{:?}", d.sshd.final_files());

    // 2. Finished while the coordinator was down: recorded as it ended.
    let job = d.ferry_ok(&["backup", "pg-prod"]).trim().to_owned();
    wait_partial(&d, 2 << 20);
    d.kill("coordinator");
    let deadline = Instant::now() + Duration::from_secs(120);
    while archives(&d).len() < 2 {
        assert!(Instant::now() < deadline, "{}", d.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    d.start_coordinator();
    let j = wait_final(&d, &job, Duration::from_secs(30));
    assert_eq!(j["state"], "succeeded", "{j}\n{}", d.logs());
    assert_eq!(j["attempt"], 1, "{j}");
    let stored = j["result"]["stored_path"].as_str().unwrap().to_owned();
    let catalog = d.ferry_json(&["backups"]);
    assert!(
        catalog.to_string().contains(&stored),
        "the catalog has the backup that finished while the coordinator was down: {catalog}"
    );

    // 3. The agent restarted too, and forgot the job: a failed attempt, retried.
    let job = d.ferry_ok(&["backup", "pg-prod"]).trim().to_owned();
    wait_partial(&d, 2 << 20);
    d.kill("coordinator");
    d.start_agent("agent-prod");
    d.start_coordinator();
    let j = wait_final(&d, &job, Duration::from_secs(180));
    assert_eq!(j["state"], "succeeded", "{j}\n{}", d.logs());
    assert_eq!(j["attempt"], 2, "the lost attempt counts: {j}");
    assert_eq!(archives(&d).len(), 3, "{:?}", d.sshd.final_files());
    assert!(partials(&d).is_empty(), "{:?}", d.sshd.files());

    // History survived every restart.
    let jobs = d.ferry_json(&["jobs"]);
    let n = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["state"] == "succeeded")
        .count();
    assert_eq!(n, 3, "{jobs}");
}

#[test]
fn sigterm_ends_the_coordinator_within_seconds_with_a_job_running_and_a_restart_takes_it_up() {
    let mut d = Deployment::start_with_options(DeploymentOptions {
        source_sql: BIG.into(),
        tweak: Some(Box::new(|d| limit_upload(d, 2 << 20))),
        ..DeploymentOptions::default()
    });
    // A backup running, and an operator waiting for it: `--wait` holds a watch stream open
    // on the coordinator for as long as the job runs.
    let mut cmd = Command::new(bin("ferry"));
    hermetic(&mut cmd)
        .args(d.ferry_flags())
        .args(["--output", "json", "backup", "pg-prod", "--wait"]);
    let waiting_log = d.dir.path().join("ferry-wait.log");
    let mut waiting = Proc::spawn(cmd, &waiting_log);
    wait_partial(&d, 2 << 20);
    let jobs = d.ferry_json(&["jobs"]);
    let job = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["state"] == "running")
        .unwrap_or_else(|| panic!("a running job: {jobs}"))["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let asked = Instant::now();
    let status = d
        .procs
        .get_mut("coordinator")
        .unwrap()
        .terminate(Duration::from_secs(30));
    let took = asked.elapsed();
    let log = d.log_tail("coordinator");
    let status = status
        .unwrap_or_else(|| panic!("the coordinator was still running 30 s after SIGTERM:\n{log}"));
    assert!(status.success(), "{status:?}\n{log}");
    assert!(
        took < Duration::from_secs(5),
        "the coordinator took {took:?} to exit after SIGTERM:\n{log}"
    );

    // Left running in the store, not failed: the next start follows it to its end, and
    // the operator's wait reconnects and sees it succeed.
    d.start_coordinator();
    let j = wait_final(&d, &job, Duration::from_secs(120));
    assert_eq!(j["state"], "succeeded", "{j}\n{}", d.logs());
    assert_eq!(j["attempt"], 1, "followed, not run again: {j}");
    let exit = waiting.wait_exit(Duration::from_secs(60));
    let said = fs::read_to_string(&waiting_log).unwrap_or_default();
    assert!(
        exit.is_some_and(|s| s.success()),
        "ferry backup --wait: {exit:?}\n{said}"
    );
    assert!(
        said.contains(&job) && said.contains("\"succeeded\""),
        "{said}"
    );
    println!(
        "coordinator exited {:.1} s after SIGTERM with a job running",
        took.as_secs_f64()
    );
}

/// The processes under the agent `agent`, with what `/proc` says of each: pg_dump among
/// them (panics if it is not).
fn pg_dump_running_under(agent: u32) -> Vec<(u32, ProcStat)> {
    let children: Vec<(u32, ProcStat)> = descendants(agent)
        .into_iter()
        .filter_map(|p| proc_stat(p).map(|s| (p, s)))
        .collect();
    assert!(
        children.iter().any(|(_, s)| s.comm == "pg_dump"),
        "pg_dump runs under the agent: {children:?}"
    );
    children
}

/// Stops the production agent with SIGTERM and checks that it stopped cleanly: it exits
/// 0 within 10 s; none of `children` (its processes, recorded while it ran) is left, not
/// even as a zombie (a process of the same id started later is another one); nothing is
/// under a final name on the backup server, at most a hidden partial. How long it took,
/// and how many children it had.
fn stop_production_agent(d: &mut Deployment, children: &[(u32, ProcStat)]) -> (Duration, usize) {
    let asked = Instant::now();
    let status = d
        .procs
        .get_mut("agent-prod")
        .unwrap()
        .terminate(Duration::from_secs(30));
    let took = asked.elapsed();
    let log = d.log_tail("agent-prod");
    let status =
        status.unwrap_or_else(|| panic!("the agent was still running 30 s after SIGTERM:\n{log}"));
    assert!(status.success(), "{status:?}\n{log}");
    assert!(
        took < Duration::from_secs(10),
        "the agent took {took:?} to exit after SIGTERM:\n{log}"
    );
    let left: Vec<&(u32, ProcStat)> = children
        .iter()
        .filter(|(p, s)| proc_stat(*p).is_some_and(|now| now.start_ticks == s.start_ticks))
        .collect();
    assert!(
        left.is_empty(),
        "left after the agent exited: {left:?}\n{log}"
    );
    assert!(
        d.sshd.final_files().is_empty(),
        "{:?}",
        d.sshd.final_files()
    );
    assert!(
        d.sshd.files().iter().all(|f| f.ends_with(".partial")),
        "{:?}",
        d.sshd.files()
    );
    (took, children.len())
}

#[test]
fn sigterm_ends_the_agent_within_seconds_mid_backup_leaving_no_pg_dump_and_the_retry_succeeds() {
    let mut d = Deployment::start_with_options(DeploymentOptions {
        source_sql: BIG.into(),
        // Enough attempts at 1 to 2 s apart to outlast the agent's restart.
        retry: Retry {
            max_attempts: 10,
            initial_backoff_seconds: 1,
            max_backoff_seconds: 2,
        },
        tweak: Some(Box::new(|d| limit_upload(d, 2 << 20))),
        ..DeploymentOptions::default()
    });
    let agent = d.procs["agent-prod"].pid();
    let job = d.ferry_ok(&["backup", "pg-prod"]).trim().to_owned();
    wait_partial(&d, 2 << 20);
    // Every process the agent runs for the backup, as it streams: pg_dump among them.
    let children = pg_dump_running_under(agent);
    let (took, children) = stop_production_agent(&mut d, &children);

    // Back, the agent takes the coordinator's retry, which stores the whole backup; its
    // restore equals the source.
    d.start_agent("agent-prod");
    let j = wait_final(&d, &job, Duration::from_secs(120));
    assert_eq!(j["state"], "succeeded", "{j}\n{}", d.logs());
    assert!(j["attempt"].as_u64().unwrap() >= 2, "{j}");
    assert_eq!(archives(&d).len(), 1, "{:?}", d.sshd.final_files());
    assert!(partials(&d).is_empty(), "{:?}", d.sshd.files());
    let out = d.ferry_ok(&["restore", "pg-stage", "--wait"]);
    assert!(out.contains("succeeded"), "{out}");
    assert_eq!(
        d.stage_pg.table_fingerprints("app"),
        d.prod_pg.table_fingerprints("app"),
        "restored content differs from the source"
    );
    println!(
        "agent exited {:.1} s after SIGTERM mid-backup; {children} child process(es) gone; \
         retried and succeeded on attempt {}",
        took.as_secs_f64(),
        j["attempt"]
    );
}

#[test]
fn sigterm_ends_the_agent_within_seconds_while_pg_dump_waits_on_a_lock_killing_and_reaping_it() {
    let mut d = Deployment::start_with_options(DeploymentOptions {
        // Long enough that the coordinator does not cancel the silent job itself.
        agent_timeout_seconds: 60,
        retry: Retry {
            max_attempts: 10,
            initial_backoff_seconds: 1,
            max_backoff_seconds: 2,
        },
        ..DeploymentOptions::default()
    });
    // A transaction holding a table: pg_dump waits for it without writing a byte, so no
    // closed pipe ends it when the job is cancelled.
    let (rt, locker) = lock_accounts(&d);
    let agent = d.procs["agent-prod"].pid();
    let job = d.ferry_ok(&["backup", "pg-prod"]).trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.prod_pg.psql(
        "app",
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
         AND query LIKE 'LOCK TABLE%'",
    ) == "0"
    {
        assert!(
            Instant::now() < deadline,
            "pg_dump never waited on the lock\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let children = pg_dump_running_under(agent);
    let (took, _) = stop_production_agent(&mut d, &children);

    // The table free and the agent back, the coordinator's retry succeeds.
    rt.block_on(locker.batch_execute("ROLLBACK")).unwrap();
    d.start_agent("agent-prod");
    let j = wait_final(&d, &job, Duration::from_secs(120));
    assert_eq!(j["state"], "succeeded", "{j}\n{}", d.logs());
    assert!(j["attempt"].as_u64().unwrap() >= 2, "{j}");
    assert_eq!(archives(&d).len(), 1, "{:?}", d.sshd.final_files());
    println!(
        "agent exited {:.1} s after SIGTERM with pg_dump waiting on a lock; retried and \
         succeeded on attempt {}",
        took.as_secs_f64(),
        j["attempt"]
    );
}

#[test]
fn scheduled_runs_are_neither_lost_nor_doubled_across_a_coordinator_restart() {
    let mut d = Deployment::start_with_options(DeploymentOptions {
        schedules: vec![Schedule::backup("pg-prod", None, "*/5 * * * * *")],
        ..DeploymentOptions::default()
    });
    let scheduled = |d: &Deployment| -> Vec<(i64, String)> {
        let jobs = d.ferry_json(&["jobs", "--limit", "1000"]);
        let mut v: Vec<(i64, String)> = jobs
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["trigger"] == "schedule")
            .map(|j| {
                (
                    j["scheduled_unix_ms"]
                        .as_i64()
                        .expect("scheduled jobs say when for"),
                    j["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while scheduled(&d).len() < 2 {
        assert!(Instant::now() < deadline, "{}", d.logs());
        std::thread::sleep(Duration::from_millis(250));
    }
    let before = scheduled(&d);
    d.kill("coordinator");
    let killed_ms = now_ms();
    // Down across at least two occurrences.
    std::thread::sleep(Duration::from_secs(12));
    let restarted_ms = now_ms();
    d.start_coordinator();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let after = scheduled(&d);
        if after.iter().filter(|(at, _)| *at > restarted_ms).count() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{after:?}\n{}", d.logs());
        std::thread::sleep(Duration::from_millis(250));
    }
    // Let the last jobs finish.
    std::thread::sleep(Duration::from_secs(3));
    let after = scheduled(&d);

    // Not doubled: every occurrence ran at most once.
    let mut occurrences: Vec<i64> = after.iter().map(|(at, _)| *at).collect();
    occurrences.dedup();
    assert_eq!(
        occurrences.len(),
        after.len(),
        "an occurrence ran twice: {after:?}"
    );
    // History survived.
    for (at, _) in &before {
        assert!(
            occurrences.contains(at),
            "{at} lost from history: {after:?}"
        );
    }
    // Not lost: the occurrences missed while down were caught up by exactly one run (for
    // the newest of them), as anacron does.
    let missed: Vec<i64> = occurrences
        .iter()
        .copied()
        .filter(|at| *at > killed_ms && *at <= restarted_ms)
        .collect();
    assert_eq!(missed.len(), 1, "one catch-up run: {after:?}");
    assert!(
        missed[0] > restarted_ms - 5_000,
        "the catch-up is for the newest missed occurrence: {missed:?} (restart {restarted_ms})"
    );
    // Every occurrence since the restart ran, 5 s apart.
    let since: Vec<i64> = occurrences
        .iter()
        .copied()
        .filter(|at| *at > restarted_ms)
        .collect();
    for w in since.windows(2) {
        assert_eq!(w[1] - w[0], 5_000, "{since:?}");
    }
    assert!(
        after
            .iter()
            .all(|(_, s)| s == "succeeded" || s == "running" || s == "queued"),
        "{after:?}\n{}",
        d.logs()
    );
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A tmpfs of `bytes` mounted on `dir` (as root), unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, bytes: u64, owner: &str) -> Tmpfs {
        require_root("mount a tmpfs");
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={bytes},mode=0755"))
                .arg("ferry-test-full")
                .arg(dir),
        );
        let t = Tmpfs(dir.to_owned());
        run_ok(Command::new("chown").arg(owner).arg(dir));
        t
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// Every file under a final name on the backup server, with its bytes.
fn stored(d: &Deployment) -> Vec<(String, Vec<u8>)> {
    d.sshd
        .final_files()
        .into_iter()
        .map(|f| {
            let bytes = fs::read(d.sshd.root().join(&f)).unwrap();
            (f, bytes)
        })
        .collect()
}

#[test]
fn a_full_backup_server_disk_fails_the_job_plainly_and_keeps_earlier_backups() {
    let d = Deployment::start_with_options(DeploymentOptions {
        retry: Retry {
            max_attempts: 3,
            initial_backoff_seconds: 1,
            max_backoff_seconds: 1,
        },
        ..DeploymentOptions::default()
    });
    // 8 MiB: the first, small backup fits, the big one does not.
    let _full = Tmpfs::mount(d.sshd.root(), 8 << 20, BACKUP_USER);
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    let earlier = stored(&d);
    assert!(!earlier.is_empty());

    d.prod_pg.psql("app", BIG);
    let text = d.ferry_failing(&["backup", "pg-prod", "--wait"]);
    assert!(
        text.contains("no space left on the backup server")
            && text.contains("the partial file was removed"),
        "says plainly what is wrong, and what became of the partial: {text}\n{}",
        d.logs()
    );
    let jobs = d.ferry_json(&["jobs"]);
    let failed = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["state"] == "failed")
        .expect("a failed job");
    assert_eq!(
        failed["attempt"], 1,
        "a full disk is not retried blindly: {failed}"
    );
    assert!(partials(&d).is_empty(), "{:?}", d.sshd.files());
    let now = stored(&d);
    assert_eq!(now, earlier, "earlier backups untouched, nothing new");
    // And the earlier backup still verifies.
    d.ferry_ok(&["verify", "pg-stage", "--wait"]);
}

/// The PIDs of processes named `name` descending from `ancestor`.
fn descendants_named(ancestor: u32, name: &str) -> Vec<u32> {
    descendants(ancestor)
        .into_iter()
        .filter(|p| proc_stat(*p).is_some_and(|s| s.comm == name))
        .collect()
}

fn one_attempt() -> Retry {
    Retry {
        max_attempts: 1,
        initial_backoff_seconds: 1,
        max_backoff_seconds: 1,
    }
}

#[test]
fn pg_dump_killed_or_its_database_restarted_half_way_fails_the_job_naming_it_and_stores_nothing() {
    let d = Deployment::start_with_options(DeploymentOptions {
        source_sql: BIG.into(),
        retry: one_attempt(),
        tweak: Some(Box::new(|d| limit_upload(d, 2 << 20))),
        ..DeploymentOptions::default()
    });
    let agent = d.procs["agent-prod"].pid();

    // pg_dump killed.
    let job = d.ferry_ok(&["backup", "pg-prod"]).trim().to_owned();
    wait_partial(&d, 1 << 20);
    let pids = descendants_named(agent, "pg_dump");
    assert!(!pids.is_empty(), "pg_dump runs under the agent");
    for pid in pids {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status();
    }
    let j = wait_final(&d, &job, Duration::from_secs(60));
    assert_eq!(j["state"], "failed", "{j}");
    let error = j["error"].as_str().unwrap();
    assert!(error.contains("pg_dump"), "names the tool: {error}");
    assert!(
        error.contains("signal") || error.contains("killed"),
        "says how it ended: {error}"
    );
    assert_nothing_stored(&d);

    // The database restarted under pg_dump. pg_dump is stopped first, in the middle of its
    // COPY, so that it cannot read the rest of the table before the restart: the pipeline in
    // front of the throttled upload holds megabytes, and on a loaded machine pg_dump once
    // read the whole table before the restart began, and the backup rightly succeeded.
    let job = d.ferry_ok(&["backup", "pg-prod"]).trim().to_owned();
    wait_partial(&d, 1 << 20);
    let pids = descendants_named(agent, "pg_dump");
    assert!(!pids.is_empty(), "pg_dump runs under the agent");
    let signal = |sig: &str| {
        for pid in &pids {
            let _ = Command::new("kill").arg(sig).arg(pid.to_string()).status();
        }
    };
    signal("-STOP");
    let copying = d.prod_pg.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
         AND state = 'active' AND query LIKE 'COPY %'",
    );
    if copying.trim() != "1" {
        signal("-CONT");
    }
    assert_eq!(
        copying.trim(),
        "1",
        "pg_dump is in its COPY when the database restarts"
    );
    let restart = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(d.prod_pg.bin_dir().join("pg_ctl"))
        .arg("-D")
        .arg(d.prod_pg.data_dir())
        .arg("-l")
        .arg(d.prod_pg.dir().join("restart.log"))
        .args(["-m", "fast", "-w", "-t", "60", "restart"])
        .current_dir(d.prod_pg.dir())
        .output()
        .unwrap();
    signal("-CONT");
    assert!(
        restart.status.success(),
        "pg_ctl restart: {}",
        String::from_utf8_lossy(&restart.stderr)
    );
    let j = wait_final(&d, &job, Duration::from_secs(60));
    assert_eq!(j["state"], "failed", "{j}");
    let error = j["error"].as_str().unwrap();
    assert!(error.contains("pg_dump"), "names the tool: {error}");
    assert!(
        error.contains("terminat") || error.contains("connection") || error.contains("server"),
        "carries pg_dump's own words (stderr tail): {error}"
    );
    assert_nothing_stored(&d);

    // Once the database is back, the next backup works.
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
}

#[test]
fn a_pg_dump_that_exits_0_having_written_nothing_fails_the_job_and_stores_nothing() {
    let d = Deployment::start_with_options(DeploymentOptions {
        retry: one_attempt(),
        tweak: Some(Box::new(|d| {
            // Production's PostgreSQL tools, but a pg_dump that says nothing and exits 0.
            let fake = d.dir.path().join("fake-bin");
            fs::create_dir_all(&fake).unwrap();
            let real = d.prod_pg.bin_dir().to_owned();
            for e in fs::read_dir(&real).unwrap().flatten() {
                std::os::unix::fs::symlink(e.path(), fake.join(e.file_name())).unwrap();
            }
            fs::remove_file(fake.join("pg_dump")).unwrap();
            let version = Command::new(real.join("pg_dump"))
                .arg("--version")
                .output()
                .unwrap();
            fs::write(
                fake.join("pg_dump"),
                format!(
                    "#!/bin/sh\nif [ \"$1\" = --version ]; then echo '{}'; fi\nexit 0\n",
                    String::from_utf8_lossy(&version.stdout).trim()
                ),
            )
            .unwrap();
            chmod(&fake.join("pg_dump"), 0o755);
            make_reachable(&fake);
            let config = fs::read_to_string(&d.prod_config)
                .unwrap()
                .replace(&real.display().to_string(), &fake.display().to_string());
            assert!(config.contains("fake-bin"), "bin_dir replaced");
            fs::write(&d.prod_config, config).unwrap();
        })),
        ..DeploymentOptions::default()
    });
    let text = d.ferry_failing(&["backup", "pg-prod", "--wait"]);
    assert!(
        text.contains("nothing") || text.contains("empty"),
        "says the dump was empty: {text}"
    );
    assert_nothing_stored(&d);
}

#[test]
fn a_frozen_agent_is_failed_after_agent_timeout_and_its_upload_is_cancelled_when_it_wakes() {
    // SIGSTOP: the host hangs (a frozen VM, a kernel stall) without closing a connection.
    let d = Deployment::start_with_options(DeploymentOptions {
        source_sql: BIG.into(),
        agent_timeout_seconds: 5,
        retry: one_attempt(),
        tweak: Some(Box::new(|d| limit_upload(d, 2 << 20))),
        ..DeploymentOptions::default()
    });
    let agent = d.procs["agent-prod"].pid().to_string();
    let job = d.ferry_ok(&["backup", "pg-prod"]).trim().to_owned();
    wait_partial(&d, 1 << 20);
    run_ok(Command::new("kill").args(["-STOP", &agent]));
    let frozen = Instant::now();
    let j = wait_final(&d, &job, Duration::from_secs(60));
    let noticed = frozen.elapsed();
    run_ok(Command::new("kill").args(["-CONT", &agent]));
    assert_eq!(j["state"], "failed", "{j}");
    assert!(
        j["error"]
            .as_str()
            .unwrap()
            .contains("agent_timeout_seconds"),
        "{j}"
    );
    assert!(
        noticed < Duration::from_secs(20),
        "agent_timeout is 5 s; took {noticed:?}"
    );
    // Woken, the agent gets the coordinator's cancel and stores nothing.
    std::thread::sleep(Duration::from_secs(15));
    assert_nothing_stored(&d);
    let log = fs::read_to_string(d.dir.path().join("agent-prod.log")).unwrap();
    assert!(!log.contains("Job succeeded"), "{log}");
}

/// A transaction of production's holding `accounts` (ACCESS EXCLUSIVE), so that pg_dump
/// waits on it without writing a byte: the runtime and the client, whose
/// `batch_execute("ROLLBACK")` lets it go.
fn lock_accounts(d: &Deployment) -> (tokio::runtime::Runtime, tokio_postgres::Client) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let locker = rt.block_on(async {
        let c = d.prod_pg.client("app").await;
        c.batch_execute("BEGIN; LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        c
    });
    (rt, locker)
}

/// Sends `signal` (e.g. `STOP`, `CONT`, `KILL`) to each of `pids` (one that is gone is no
/// error).
fn signal(pids: &[u32], signal: &str) {
    for pid in pids {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status();
    }
}

#[test]
fn a_stalled_backup_server_fails_the_attempt_within_io_timeout_and_the_retry_succeeds() {
    let d = Deployment::start_with_options(DeploymentOptions {
        source_sql: BIG.into(),
        io_timeout_seconds: Some(5),
        // Far longer: what must notice the stall here is the agent's own I/O timeout.
        agent_timeout_seconds: 60,
        retry: Retry {
            max_attempts: 3,
            initial_backoff_seconds: 3,
            max_backoff_seconds: 3,
        },
        tweak: Some(Box::new(|d| limit_upload(d, 2 << 20))),
        ..DeploymentOptions::default()
    });
    let job = d.ferry_ok(&["backup", "pg-prod"]).trim().to_owned();
    wait_partial(&d, 3 << 20);

    // The server hangs: its session processes stop, the TCP connection stays open.
    let stopped = d.sshd.sessions();
    assert!(!stopped.is_empty(), "sshd serves the upload");
    signal(&stopped, "STOP");
    let at = Instant::now();
    let failed = wait_job(&d, &job, Duration::from_secs(90), "failed once", |j| {
        j["error"].is_string()
    });
    let detected = at.elapsed();
    signal(&stopped, "CONT");
    assert_eq!(failed["attempt"], 1, "{failed}");
    assert_ne!(failed["state"], "succeeded", "{failed}");
    let error = failed["error"].as_str().unwrap();
    let server = format!("127.0.0.1:{}", d.sshd.port());
    assert!(
        error.contains(&server)
            && error.contains("stalled")
            && error.contains("io_timeout_seconds"),
        "names the backup server and the stall: {error}"
    );
    // 5 s of I/O timeout, then the failure travels to the coordinator (and the CLI polls).
    assert!(
        detected < Duration::from_secs(12),
        "io_timeout is 5 s; the stall was noticed after {detected:?}\n{}",
        d.logs()
    );
    assert!(
        archives(&d).is_empty(),
        "nothing under a final name: {:?}",
        d.sshd.final_files()
    );

    let done = wait_final(&d, &job, Duration::from_secs(120));
    assert_eq!(done["state"], "succeeded", "{done}\n{}", d.logs());
    assert!(done["attempt"].as_u64().unwrap() >= 2, "{done}");
    assert_eq!(archives(&d).len(), 1, "{:?}", d.sshd.final_files());
    assert!(
        partials(&d).is_empty(),
        "the retry removes the first attempt's partial: {:?}",
        d.sshd.files()
    );
    d.ferry_ok(&["verify", "pg-stage", "--wait"]);
    println!(
        "stall noticed after {:.1} s (io_timeout 5 s); succeeded on attempt {}",
        detected.as_secs_f64(),
        done["attempt"]
    );
}

#[test]
fn progress_reports_that_move_no_bytes_do_not_keep_a_stalled_job_alive() {
    let d = Deployment::start_with_options(DeploymentOptions {
        source_sql: BIG.into(),
        // The agent would wait a minute: the coordinator must not.
        io_timeout_seconds: Some(60),
        agent_timeout_seconds: 5,
        retry: one_attempt(),
        tweak: Some(Box::new(|d| limit_upload(d, 2 << 20))),
        ..DeploymentOptions::default()
    });
    let job = d.ferry_ok(&["backup", "pg-prod"]).trim().to_owned();
    wait_partial(&d, 2 << 20);
    let stopped = d.sshd.sessions();
    assert!(!stopped.is_empty(), "sshd serves the upload");
    signal(&stopped, "STOP");
    let at = Instant::now();
    let j = wait_final(&d, &job, Duration::from_secs(90));
    let noticed = at.elapsed();
    assert_eq!(j["state"], "failed", "{j}");
    let error = j["error"].as_str().unwrap();
    assert!(
        error.contains("moved no bytes") && error.contains("agent_timeout_seconds"),
        "says the job made no progress: {error}"
    );
    assert!(
        noticed < Duration::from_secs(12),
        "agent_timeout is 5 s; the coordinator noticed after {noticed:?}"
    );
    // Told to cancel, the agent drops the stalled connection and ends the job at once,
    // the server still stopped (not an I/O timeout later).
    let log = d.dir.path().join("agent-prod.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ended = fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("Job failed") && l.contains(&job) && l.contains("\"cancelled\""));
        if ended {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not end the cancelled job:\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    signal(&stopped, "CONT");
    // Nothing stored; its partial removed over a new connection.
    assert_nothing_stored(&d);
}

/// The production key as the Ansible role makes it: forced `internal-sftp` that may add
/// files and nothing else (no remove, no overwriting rename, no setstat).
fn add_only_production_key(d: &mut Deployment) {
    let key = d.sshd.add_client_key_named(
        "id_prod_add_only",
        &format!(
            "restrict,command=\"internal-sftp -P remove,rmdir,posix-rename,setstat,fsetstat,\
             lsetstat,symlink,hardlink,copy-data -u 0027 -d {}\"",
            d.sshd.root().display()
        ),
    );
    let old = d.prod_key.display().to_string();
    let config = fs::read_to_string(&d.prod_config).unwrap();
    assert!(config.contains(&old), "the production key is in {config}");
    fs::write(
        &d.prod_config,
        config.replace(&old, &key.display().to_string()),
    )
    .unwrap();
    d.prod_key = key;
}

/// `ferry prune ARGS --output json`'s leftovers, flattened: (path, kind, remove, removed,
/// reason).
fn leftovers(plan: &serde_json::Value) -> Vec<(String, String, bool, bool, String)> {
    plan.as_array()
        .unwrap_or_else(|| panic!("prune printed no list: {plan}"))
        .iter()
        .flat_map(|d| d["leftovers"].as_array().cloned().unwrap_or_default())
        .map(|l| {
            (
                l["path"].as_str().unwrap().to_owned(),
                l["kind"].as_str().unwrap().to_owned(),
                l["remove"].as_bool().unwrap(),
                l["removed"].as_bool().unwrap(),
                l["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Runs `strace` on the backup server's sshd (and every process it forks from now on) so
/// that the `link(2)` the server makes to rename a file to `path` fails with `ENOSPC`, as
/// a full disk would fail it; stopped on drop.
struct FailLinkTo(Proc);

impl FailLinkTo {
    fn start(d: &Deployment, path: &Path) -> FailLinkTo {
        let strace = require("strace", "strace");
        let mut cmd = Command::new(strace);
        cmd.args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=link,linkat"])
            .args(["-e", "inject=link,linkat:error=ENOSPC", "-P"])
            .arg(path)
            .arg("-p")
            .arg(d.sshd.pid().to_string());
        let tracer = FailLinkTo(Proc::spawn(cmd, &d.dir.path().join("strace.out")));
        let status = format!("/proc/{}/status", d.sshd.pid());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let traced = fs::read_to_string(&status)
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0"));
            if traced {
                return tracer;
            }
            assert!(Instant::now() < deadline, "strace did not attach to sshd");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for FailLinkTo {
    fn drop(&mut self) {
        self.0.kill();
    }
}

#[test]
fn an_interrupted_commit_leaves_nothing_taken_for_a_backup_and_prune_removes_the_orphans() {
    let d = Deployment::start_with_options(DeploymentOptions {
        retry: one_attempt(),
        tweak: Some(Box::new(|d| {
            add_only_production_key(d);
            d.add_maintenance();
        })),
        ..DeploymentOptions::default()
    });
    let today = today_utc();
    let folder = d.sshd.root().join(format!("production/{today}"));
    // A good backup first: the one readers must keep taking.
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    let good = format!("postgres_backup_{today}.pgdump.zst.age");
    let before = d.sshd.final_files();
    assert!(before.contains(&format!("production/{today}/{good}.json")));

    // The next one is named with its minute: not in a minute's last seconds, so that the
    // name is known before it starts.
    while run_ok(Command::new("date").args(["-u", "+%S"]))
        .trim()
        .parse::<u32>()
        .unwrap()
        > 45
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    let stamp = run_ok(Command::new("date").args(["-u", "+%Y-%m-%dT%H%MZ"]))
        .trim()
        .to_owned();
    let main = format!("postgres_backup_{stamp}.pgdump.zst.age");
    let globals = format!("postgres-globals_backup_{stamp}.sql.zst.age");

    // The server fails the rename of the main part's manifest, the backup's last step.
    let tracer = FailLinkTo::start(&d, &folder.join(format!("{main}.json")));
    let text = d.ferry_failing(&["backup", "pg-prod", "--wait"]);
    drop(tracer);
    assert!(
        text.contains("not committed") && text.contains(&main) && text.contains("ferry prune"),
        "says the backup was not committed and what is left: {text}"
    );
    println!("{text}");
    let finals = d.sshd.final_files();
    let main_path = format!("production/{today}/{main}");
    assert!(finals.contains(&main_path), "{finals:?}");
    assert!(!finals.contains(&format!("{main_path}.json")), "{finals:?}");
    // The add-only key could not undo the renames: the job's error lists what is left.
    assert!(
        finals.contains(&format!("production/{today}/{globals}")) && text.contains(&globals),
        "{finals:?}\n{text}"
    );

    // Nothing of it is taken for a backup: not by the catalog, not by the staging agent,
    // which verifies the good one.
    let catalog = d.ferry_json(&["backups"]).to_string();
    assert!(
        catalog.contains(&good) && !catalog.contains(&stamp),
        "{catalog}"
    );
    d.ferry_ok(&["verify", "pg-stage", "--wait"]);
    let jobs = d.ferry_json(&["jobs"]);
    let verified = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["kind"] == "verify")
        .unwrap_or_else(|| panic!("no verify job: {jobs}"));
    let path = verified["result"]["stored_path"]
        .as_str()
        .unwrap_or_default();
    assert!(path.ends_with(&format!("/{good}")), "{verified}");

    // prune names the orphans; young ones stay (a commit may be under way).
    let orphan = |plan: &serde_json::Value, name: &str| {
        leftovers(plan)
            .into_iter()
            .find(|l| l.0.ends_with(&format!("/{name}")) && l.1 == "orphan")
            .unwrap_or_else(|| panic!("{name} is not named an orphan: {plan}"))
    };
    println!("{}", d.ferry_ok(&["prune", "--dry-run"]));
    let plan = d.ferry_json(&["prune", "--dry-run"]);
    let found = leftovers(&plan);
    assert!(!orphan(&plan, &main).2, "kept while young: {plan}");
    assert!(!orphan(&plan, &globals).2, "kept while young: {plan}");
    assert!(
        found.iter().all(|l| l.0.contains(&stamp)),
        "only the failed backup's files: {plan}"
    );
    let partials_found: Vec<_> = found.iter().filter(|l| l.1 == "partial").collect();
    assert!(
        !partials_found.is_empty() && partials_found.iter().all(|l| l.2 && l.4.contains("failed")),
        "the failed job's partial files go at once: {plan}"
    );

    // Minutes later (the files' times set back as if they had passed), prune removes
    // every file the failed commit left, and nothing else.
    for e in fs::read_dir(&folder).unwrap().flatten() {
        if e.file_name().to_string_lossy().contains(&stamp) {
            run_ok(
                Command::new("touch")
                    .args(["-m", "-d", "10 minutes ago"])
                    .arg(e.path()),
            );
        }
    }
    let plan = d.ferry_json(&["prune"]);
    let found = leftovers(&plan);
    assert!(
        orphan(&plan, &main).3 && orphan(&plan, &globals).3,
        "{plan}"
    );
    assert!(found.iter().all(|l| l.3), "everything removed: {plan}");
    assert_eq!(d.sshd.files(), before, "only the good backup is left");

    // And the next backup succeeds.
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    d.ferry_ok(&["verify", "pg-stage", "--wait"]);
}

#[test]
fn a_full_disk_behind_an_add_only_key_says_the_partial_stayed_and_prune_removes_it_at_once() {
    let d = Deployment::start_with_options(DeploymentOptions {
        retry: one_attempt(),
        tweak: Some(Box::new(|d| {
            add_only_production_key(d);
            d.add_maintenance();
        })),
        ..DeploymentOptions::default()
    });
    let _full = Tmpfs::mount(d.sshd.root(), 8 << 20, BACKUP_USER);
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);

    d.prod_pg.psql("app", BIG);
    let text = d.ferry_failing(&["backup", "pg-prod", "--wait"]);
    assert!(
        text.contains("no space left on the backup server")
            && text.contains("could not be removed")
            && text.contains("permission denied")
            && !text.contains("was removed"),
        "says what is true of the partial file: {text}\n{}",
        d.logs()
    );
    println!("{text}");
    // The main part's partial, and the companion's staged before it.
    let left = partials(&d);
    assert!(!left.is_empty(), "{:?}", d.sshd.files());

    // The job has ended: prune removes its partials at once.
    let plan = d.ferry_json(&["prune"]);
    let found = leftovers(&plan);
    for partial in &left {
        assert!(
            found
                .iter()
                .any(|l| l.0.ends_with(partial.as_str()) && l.3 && l.4.contains("failed")),
            "{partial} removed: {plan}"
        );
    }
    assert!(partials(&d).is_empty(), "{:?}", d.sshd.files());

    // With the room back (and the table that never fit gone), the next backup succeeds.
    d.prod_pg.psql("app", "DROP TABLE big");
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
}

#[test]
fn sigterm_mid_backup_to_s3_aborts_the_agents_multipart_uploads_and_the_retry_succeeds() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_bucket("sigterm");
    let mut d = Deployment::start_with_options(DeploymentOptions {
        agent_timeout_seconds: 60,
        retry: Retry {
            max_attempts: 10,
            initial_backoff_seconds: 1,
            max_backoff_seconds: 2,
        },
        tweak: Some(Box::new(|d: &mut Deployment| {
            let text = std::fs::read_to_string(&d.prod_config).unwrap();
            let table = s3_table(
                "backup_server",
                c,
                &bucket,
                &roles.production,
                d.dir.path(),
                "",
            );
            std::fs::write(&d.prod_config, replace_backup_server(&text, &table)).unwrap();
        })),
        ..DeploymentOptions::default()
    });
    let uploads = || {
        c.s3_ok(
            &roles.maintenance,
            "list_multipart_uploads",
            json!({"Bucket": bucket}),
        )["Uploads"]
            .as_array()
            .map_or(0, Vec::len)
    };
    let objects = || {
        c.s3_ok(&roles.staging, "list_objects_v2", json!({"Bucket": bucket}))["Contents"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|o| o["Key"].as_str().unwrap().to_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    // pg_dump waits on a table held by a transaction, after the globals part was staged:
    // that part's multipart upload is in progress when the agent is stopped.
    let (rt, locker) = lock_accounts(&d);
    let agent = d.procs["agent-prod"].pid();
    let job = d.ferry_ok(&["backup", "pg-prod"]).trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.prod_pg.psql(
        "app",
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
         AND query LIKE 'LOCK TABLE%'",
    ) == "0"
        || uploads() == 0
    {
        assert!(
            Instant::now() < deadline,
            "pg_dump never waited on the lock with an upload in progress\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let children = pg_dump_running_under(agent);
    stop_production_agent(&mut d, &children);
    // Read with boto3: the agent aborted what it had started, and nothing is visible.
    assert_eq!(uploads(), 0, "multipart uploads left after SIGTERM");
    assert_eq!(objects(), Vec::<String>::new());

    rt.block_on(locker.batch_execute("ROLLBACK")).unwrap();
    d.start_agent("agent-prod");
    let j = wait_final(&d, &job, Duration::from_secs(120));
    assert_eq!(j["state"], "succeeded", "{j}\n{}", d.logs());
    assert!(j["attempt"].as_u64().unwrap() >= 2, "{j}");
    assert_eq!(uploads(), 0);
    assert_eq!(objects().len(), 4, "{:?}", objects());
}
