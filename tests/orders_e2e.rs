//! Orders between the coordinator and its agents (issue 14, item 4), end to end on real
//! PostgreSQL, sshd and the real binaries, the agents called directly with the
//! coordinator's certificate where the test plays the coordinator:
//! - an agent's job streams (`RunBackup`, `RunRestore`, `WatchJob`) end after their final
//!   event;
//! - orders with oversized fields (a 3 MiB job id, a 10 kB datastore name) are refused
//!   with a short, readable error, malformed protobuf is `InvalidArgument`, and no agent log
//!   line grows with what a client sent;
//! - an order reusing a job id the agent knows is refused (`AlreadyExists`), except the
//!   same order for a job still running, and the coordinator's retries carry an id per
//!   attempt;
//! - a restore or verify reads the exact backup the coordinator chose from its catalog,
//!   never a newer one the catalog did not record, and fails naming it if it is gone;
//! - the daemons' log files hold no terminal colour codes.

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_proto::v1;
use ferry_proto::v1::agent_client::AgentClient;
use ferry_proto::v1::job_event::Event;
use ferry_tests::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// A job id the agents accept (a ULID), distinct per `n`.
fn job_id(n: u8) -> String {
    format!("01KAAAAAAAAAAAAAAAAAAAAA{n:02}")
}

/// The agent on `port` (certificate name `server`), called with the coordinator's
/// certificate, as the coordinator calls it.
async fn agent(d: &Deployment, port: u16, server: &str) -> AgentClient<tonic::transport::Channel> {
    AgentClient::new(
        fleet_channel(&d.fleet, "coordinator", port, server)
            .await
            .unwrap(),
    )
}

/// Whether `e` is a job's final event.
fn is_final(e: &v1::JobEvent) -> bool {
    matches!(e.event, Some(Event::Finished(_) | Event::Failed(_)))
}

/// How long a job stream may stay open after its final event before the test calls it
/// hung: a client reading to the end would otherwise wait for its deadline.
const END_AFTER_FINAL: Duration = Duration::from_secs(5);

/// Reads a job stream to its end, as a client that reads until the server closes it:
/// every event, the last one final. Panics if no final event comes within 120 s, or if
/// the stream is still open [`END_AFTER_FINAL`] after it.
async fn read_to_end(what: &str, mut stream: tonic::Streaming<v1::JobEvent>) -> Vec<v1::JobEvent> {
    let mut events = Vec::new();
    let mut final_at: Option<Instant> = None;
    loop {
        let wait = match final_at {
            Some(_) => END_AFTER_FINAL,
            None => Duration::from_secs(120),
        };
        match tokio::time::timeout(wait, stream.message()).await {
            Err(_) if final_at.is_some() => panic!(
                "{what}: the stream was still open {END_AFTER_FINAL:?} after its final event {:?}",
                events.last()
            ),
            Err(_) => panic!("{what}: no final event within {wait:?}: {events:?}"),
            Ok(Err(status)) => panic!("{what}: the stream failed: {status:?} after {events:?}"),
            Ok(Ok(None)) => {
                assert!(
                    final_at.is_some(),
                    "{what}: the stream ended without a final event: {events:?}"
                );
                return events;
            }
            Ok(Ok(Some(e))) => {
                assert!(
                    final_at.is_none(),
                    "{what}: an event after the final one: {e:?}"
                );
                if is_final(&e) {
                    final_at = Some(Instant::now());
                }
                events.push(e);
            }
        }
    }
}

#[test]
fn agent_job_streams_end_after_their_final_event() {
    let d = Deployment::start();
    runtime().block_on(async {
        let mut prod = agent(&d, d.prod_port, "pg-prod").await;
        let mut stage = agent(&d, d.stage_port, "pg-stage").await;

        // A backup that succeeds, then the same job watched once finished.
        let backup = job_id(1);
        let stream = prod
            .run_backup(v1::RunBackupRequest {
                job_id: backup.clone(),
                datastore: "postgres".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let events = read_to_end("RunBackup", stream).await;
        assert!(
            matches!(events.last().unwrap().event, Some(Event::Finished(_))),
            "{events:?}"
        );
        let stream = prod
            .watch_job(v1::WatchJobRequest {
                job_id: backup.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let events = read_to_end("WatchJob of a finished backup", stream).await;
        assert_eq!(events.len(), 1, "{events:?}");

        // A verify that succeeds, and a restore that fails (no backup of that date).
        let stream = stage
            .run_restore(v1::RunRestoreRequest {
                target: String::new(),
                job_id: job_id(2),
                datastore: "postgres".into(),
                verify_only: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let events = read_to_end("RunRestore (verify)", stream).await;
        assert!(
            matches!(events.last().unwrap().event, Some(Event::Finished(_))),
            "{events:?}"
        );
        let failing = job_id(3);
        let stream = stage
            .run_restore(v1::RunRestoreRequest {
                target: String::new(),
                job_id: failing.clone(),
                datastore: "postgres".into(),
                date: "2001-01-01".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let events = read_to_end("RunRestore of a missing date", stream).await;
        assert!(
            matches!(events.last().unwrap().event, Some(Event::Failed(_))),
            "{events:?}"
        );
        let stream = stage
            .watch_job(v1::WatchJobRequest { job_id: failing })
            .await
            .unwrap()
            .into_inner();
        let events = read_to_end("WatchJob of a failed restore", stream).await;
        assert!(
            matches!(events.last().unwrap().event, Some(Event::Failed(_))),
            "{events:?}"
        );
    });
    assert!(!d.stage_pg.has_database("app"), "a verify restored");
}

#[test]
fn daemon_log_files_hold_no_terminal_colour_codes() {
    let d = Deployment::start();
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    d.ferry_ok(&["verify", "pg-stage", "--wait"]);
    for (which, says) in [
        ("agent-prod", "Job succeeded."),
        ("agent-stage", "Job succeeded."),
        ("coordinator", "Succeeded"),
    ] {
        let path = d.dir.path().join(format!("{which}.log"));
        let log = fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&log);
        assert!(text.contains(says), "{which}: {text}");
        if let Some(line) = text.lines().find(|l| l.contains('\u{1b}')) {
            panic!(
                "{} holds an ANSI escape (ESC byte), e.g. {line:?}",
                path.display()
            );
        }
    }
}

#[test]
fn daemons_stop_cleanly_within_seconds_of_sigterm_and_say_so() {
    let mut d = Deployment::start();
    for which in ["agent-prod", "agent-stage", "coordinator"] {
        let proc = d.procs.get_mut(which).unwrap();
        let status = proc.terminate(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "{which} after SIGTERM: {status:?}; its log ends:\n{}",
            proc.log_tail(20)
        );
        let log = fs::read_to_string(d.dir.path().join(format!("{which}.log"))).unwrap();
        assert!(log.contains("Shutting down."), "{which}: {log}");
    }
}

/// An order as raw bytes on the wire: field 1 (the job id of every order) and 2 (the
/// datastore) as bytes, so a test can send strings that are not UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawOrder {
    #[prost(bytes = "vec", tag = "1")]
    job_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    datastore: Vec<u8>,
}

/// A refusal a client can read: `code`, a message under 1 KiB holding every one of `says`.
fn assert_short_refusal(what: &str, e: &tonic::Status, code: tonic::Code, says: &[&str]) {
    assert_eq!(e.code(), code, "{what}: {e:?}");
    assert!(
        e.message().len() < 1024,
        "{what}: {} bytes of message",
        e.message().len()
    );
    for s in says {
        assert!(e.message().contains(s), "{what}: {}", e.message());
    }
}

/// The longest line of the agents' logs, and its first 200 characters.
fn longest_agent_log_line(d: &Deployment) -> (usize, String) {
    let mut longest = (0, String::new());
    for which in ["agent-prod", "agent-stage"] {
        let log = fs::read(d.dir.path().join(format!("{which}.log"))).unwrap();
        for line in String::from_utf8_lossy(&log).lines() {
            if line.len() > longest.0 {
                longest = (line.len(), line.chars().take(200).collect());
            }
        }
    }
    longest
}

#[test]
fn oversized_order_fields_come_back_cut_and_no_agent_log_line_grows_with_them() {
    use tonic::Code;
    let d = Deployment::start();
    let huge = "x".repeat(3 << 20);
    let cut = format!("(cut; {} bytes)", huge.len());
    let long_name = "d".repeat(10_000);
    runtime().block_on(async {
        let mut prod = agent(&d, d.prod_port, "pg-prod").await;
        let mut stage = agent(&d, d.stage_port, "pg-stage").await;

        let e = prod
            .run_backup(v1::RunBackupRequest {
                job_id: huge.clone(),
                datastore: "postgres".into(),
                ..Default::default()
            })
            .await
            .expect_err("a 3 MiB job id");
        assert_short_refusal(
            "backup job id",
            &e,
            Code::InvalidArgument,
            &["job id", &cut],
        );
        let e = prod
            .run_backup(v1::RunBackupRequest {
                job_id: job_id(1),
                datastore: long_name.clone(),
                ..Default::default()
            })
            .await
            .expect_err("a 10 kB datastore name");
        assert_short_refusal(
            "backup datastore",
            &e,
            Code::InvalidArgument,
            &["not a valid name", "(cut; 10000 bytes)"],
        );
        let e = prod
            .run_backup(v1::RunBackupRequest {
                job_id: job_id(1),
                datastore: "postgres".into(),
                backup_type: huge.clone(),
            })
            .await
            .expect_err("a 3 MiB backup type");
        assert_short_refusal("backup type", &e, Code::InvalidArgument, &[&cut]);
        // Outside the role: refused for that first, still short.
        let e = prod
            .run_restore(v1::RunRestoreRequest {
                target: String::new(),
                job_id: huge.clone(),
                datastore: long_name.clone(),
                ..Default::default()
            })
            .await
            .expect_err("a restore on production");
        assert_short_refusal(
            "restore on production",
            &e,
            Code::PermissionDenied,
            &["(cut; 10000 bytes)"],
        );

        for verify_only in [false, true] {
            let what = if verify_only { "verify" } else { "restore" };
            let e = stage
                .run_restore(v1::RunRestoreRequest {
                    target: String::new(),
                    job_id: huge.clone(),
                    datastore: "postgres".into(),
                    verify_only,
                    ..Default::default()
                })
                .await
                .expect_err(what);
            assert_short_refusal(what, &e, Code::InvalidArgument, &["job id", &cut]);
            let e = stage
                .run_restore(v1::RunRestoreRequest {
                    target: String::new(),
                    job_id: job_id(2),
                    datastore: "postgres".into(),
                    date: huge.clone(),
                    verify_only,
                    ..Default::default()
                })
                .await
                .expect_err(what);
            assert_short_refusal(what, &e, Code::InvalidArgument, &["YYYY-MM-DD", &cut]);
        }
        let e = stage
            .run_restore(v1::RunRestoreRequest {
                target: String::new(),
                job_id: job_id(2),
                datastore: "postgres".into(),
                namespaces: vec![huge.clone()],
                ..Default::default()
            })
            .await
            .expect_err("a 3 MiB namespace");
        assert_short_refusal("namespace", &e, Code::InvalidArgument, &[&cut]);
        let e = stage
            .watch_job(v1::WatchJobRequest {
                job_id: huge.clone(),
            })
            .await
            .expect_err("watching a 3 MiB job id");
        assert_short_refusal("watch", &e, Code::NotFound, &[&cut]);
        let cancelled = stage
            .cancel_job(v1::CancelJobRequest {
                job_id: huge.clone(),
            })
            .await
            .unwrap();
        assert!(!cancelled.into_inner().cancelled);

        // 200,000 valid namespaces (2.5 MB) in an order the agent accepts: the job fails
        // (there is no backup), its log lines stay short.
        let namespaces: Vec<String> = (0..200_000).map(|i| format!("app.c{i:07}")).collect();
        let stream = stage
            .run_restore(v1::RunRestoreRequest {
                target: String::new(),
                job_id: job_id(3),
                datastore: "postgres".into(),
                namespaces,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let events = read_to_end("restore of 200,000 namespaces", stream).await;
        assert!(
            matches!(events.last().unwrap().event, Some(Event::Failed(_))),
            "{events:?}"
        );

        // Malformed protobuf (a job id that is not UTF-8): the sender's fault.
        let channel = fleet_channel(&d.fleet, "coordinator", d.prod_port, "pg-prod")
            .await
            .unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let e = grpc
            .server_streaming(
                tonic::Request::new(RawOrder {
                    job_id: vec![0xff, 0xfe, b'x'],
                    datastore: b"postgres".to_vec(),
                }),
                tonic::codegen::http::uri::PathAndQuery::from_static("/ferry.v1.Agent/RunBackup"),
                tonic_prost::ProstCodec::<RawOrder, v1::JobEvent>::default(),
            )
            .await
            .expect_err("a job id that is not UTF-8");
        assert_short_refusal("malformed order", &e, Code::InvalidArgument, &["UTF-8"]);
        // The agent still serves.
        prod.describe(v1::DescribeRequest {}).await.unwrap();
    });
    let (len, line) = longest_agent_log_line(&d);
    assert!(len < 4096, "an agent log line of {len} bytes: {line}...");
    assert!(d.sshd.files().is_empty(), "{:?}", d.sshd.files());
}

/// Sends SIGSTOP (`stop`) or SIGCONT to the backup server's sshd: while it is stopped, a
/// new SSH connection hangs in its handshake (the kernel still accepts it), so a job that
/// needs the backup server stays running until the agent's I/O timeout.
fn freeze_backup_server(d: &mut Deployment, stop: bool) {
    let pid = d.sshd.process().pid().to_string();
    let signal = if stop { "-STOP" } else { "-CONT" };
    run_ok(Command::new("kill").args([signal, &pid]));
}

/// The first event of `stream`, within 30 s.
async fn first_event(what: &str, stream: &mut tonic::Streaming<v1::JobEvent>) -> v1::JobEvent {
    tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .unwrap_or_else(|_| panic!("{what}: no event within 30 s"))
        .unwrap_or_else(|e| panic!("{what}: {e:?}"))
        .unwrap_or_else(|| panic!("{what}: the stream ended at once"))
}

#[test]
fn an_order_reusing_a_known_job_id_is_refused_unless_it_is_the_same_running_order() {
    use tonic::Code;
    let mut d = Deployment::start();
    let verify = v1::RunRestoreRequest {
        target: String::new(),
        job_id: job_id(1),
        datastore: "postgres".into(),
        verify_only: true,
        ..Default::default()
    };
    // The verify stays running (in "locate") while the backup server is frozen.
    freeze_backup_server(&mut d, true);
    let rt = runtime();
    let (first, again) = rt.block_on(async {
        let mut stage = agent(&d, d.stage_port, "pg-stage").await;
        let mut first = stage
            .run_restore(verify.clone())
            .await
            .unwrap()
            .into_inner();
        let e = first_event("the verify", &mut first).await;
        assert!(matches!(e.event, Some(Event::Accepted(_))), "{e:?}");

        // The running verify's id on a restore, or on a verify of another date.
        for (what, order) in [
            (
                "a restore",
                v1::RunRestoreRequest {
                    target: String::new(),
                    verify_only: false,
                    ..verify.clone()
                },
            ),
            (
                "a verify of another date",
                v1::RunRestoreRequest {
                    target: String::new(),
                    date: "2026-01-01".into(),
                    ..verify.clone()
                },
            ),
        ] {
            let e = stage
                .run_restore(order)
                .await
                .expect_err(&format!("{what} under the running verify's id was taken"));
            assert_short_refusal(
                what,
                &e,
                Code::AlreadyExists,
                &[
                    &job_id(1),
                    "already running",
                    "verify of datastore \"postgres\"",
                ],
            );
        }
        // The very same order (a coordinator re-sending it) follows the running job.
        let mut again = stage
            .run_restore(verify.clone())
            .await
            .unwrap()
            .into_inner();
        let e = first_event("the same verify again", &mut again).await;
        assert!(matches!(e.event, Some(Event::Accepted(_))), "{e:?}");
        (first, again)
    });
    freeze_backup_server(&mut d, false);
    rt.block_on(async {
        let mut stage = agent(&d, d.stage_port, "pg-stage").await;
        let first = read_to_end("the verify", first).await;
        let again = read_to_end("the verify followed again", again).await;
        // Nothing was backed up: the verify finds nothing, once, seen by both.
        let last = first.last().unwrap().event.clone();
        assert!(matches!(last, Some(Event::Failed(_))), "{first:?}");
        assert_eq!(again.last().unwrap().event, last);

        // Finished: its id is refused whatever the order, the same one included.
        let e = stage
            .run_restore(verify.clone())
            .await
            .expect_err("a finished job's id was taken again");
        assert_short_refusal(
            "the finished verify again",
            &e,
            Code::AlreadyExists,
            &[&job_id(1), "already ran", "failed"],
        );

        // The same on production: a finished backup's id does not start another backup.
        let mut prod = agent(&d, d.prod_port, "pg-prod").await;
        let backup = v1::RunBackupRequest {
            job_id: job_id(2),
            datastore: "postgres".into(),
            ..Default::default()
        };
        let events = read_to_end(
            "a backup",
            prod.run_backup(backup.clone()).await.unwrap().into_inner(),
        )
        .await;
        assert!(
            matches!(events.last().unwrap().event, Some(Event::Finished(_))),
            "{events:?}"
        );
        let e = prod
            .run_backup(backup)
            .await
            .expect_err("a finished backup's id started another backup");
        assert_short_refusal(
            "the finished backup again",
            &e,
            Code::AlreadyExists,
            &[&job_id(2), "already ran", "succeeded"],
        );
    });
    let archives: Vec<String> = d
        .sshd
        .final_files()
        .into_iter()
        .filter(|f| f.contains("postgres_backup_") && f.ends_with(".age"))
        .collect();
    assert_eq!(archives.len(), 1, "{archives:?}");
    let log = fs::read_to_string(d.dir.path().join("agent-stage.log")).unwrap();
    assert_eq!(log.matches("Job accepted.").count(), 1, "{log}");
}

/// `ferry job ID --output json`, polled until `done` holds for it; panics with the logs
/// after 120 s.
fn wait_job(
    d: &Deployment,
    id: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let j = d.ferry_json(&["job", id]);
        if done(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id}: {j}\n{}", d.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_coordinators_retry_is_ordered_under_an_attempt_id_of_its_own_and_succeeds() {
    let mut d = Deployment::start_with_options(DeploymentOptions {
        // The first attempt gives up on the frozen backup server after 3 s.
        io_timeout_seconds: Some(3),
        retry: Retry {
            max_attempts: 3,
            initial_backoff_seconds: 3,
            max_backoff_seconds: 3,
        },
        ..DeploymentOptions::default()
    });
    freeze_backup_server(&mut d, true);
    let job = d
        .ferry_ok(&["backup", "pg-prod", "postgres"])
        .trim()
        .to_owned();
    let failed = wait_job(&d, &job, |j| j["error"].is_string());
    freeze_backup_server(&mut d, false);
    assert_eq!(failed["attempt"], 1, "{failed}");
    let done = wait_job(&d, &job, |j| {
        j["state"] == "succeeded" || j["state"] == "failed"
    });
    assert_eq!(done["state"], "succeeded", "{done}\n{}", d.logs());
    assert_eq!(done["attempt"], 2, "{done}");

    let log = fs::read_to_string(d.dir.path().join("agent-prod.log")).unwrap();
    let retry = format!("{job}-a2");
    for (id, outcome) in [(&job, "Job failed."), (&retry, "Job succeeded.")] {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("job_id={id} ")) && l.contains(outcome)),
            "no {outcome:?} for {id} in the agent's log:\n{log}"
        );
    }
    assert!(
        !log.contains("AlreadyExists") && !log.contains("already ran"),
        "{log}"
    );
    // The catalog records the backup under the job, not the attempt.
    let catalog = d.ferry_json(&["backups"]);
    assert_eq!(catalog[0]["job_id"], job.as_str(), "{catalog}");
}

/// The newest succeeded job of `kind` (`ferry jobs`, newest first).
fn newest_succeeded(d: &Deployment, kind: &str) -> serde_json::Value {
    let jobs = d.ferry_json(&["jobs"]);
    jobs.as_array()
        .unwrap()
        .iter()
        .find(|j| j["kind"] == kind && j["state"] == "succeeded")
        .unwrap_or_else(|| panic!("no succeeded {kind}: {jobs}"))
        .clone()
}

#[test]
fn a_restore_reads_the_backup_the_catalog_chose_not_a_newer_one_it_never_recorded() {
    let d = Deployment::start();
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    let catalog = d.ferry_json(&["backups"]);
    assert_eq!(catalog.as_array().unwrap().len(), 1, "{catalog}");
    let recorded = catalog[0]["stored_path"].as_str().unwrap().to_owned();
    let backed_up = d.prod_pg.table_fingerprints("app");

    // A later backup of other data, made behind the coordinator's back: complete on the
    // server (archive and manifest), never in the catalog.
    d.prod_pg.psql(
        "app",
        "INSERT INTO empty_table SELECT generate_series(1, 10)",
    );
    let unrecorded = runtime().block_on(async {
        let mut prod = agent(&d, d.prod_port, "pg-prod").await;
        let stream = prod
            .run_backup(v1::RunBackupRequest {
                job_id: job_id(1),
                datastore: "postgres".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        match read_to_end("the unrecorded backup", stream).await.pop() {
            Some(v1::JobEvent {
                event: Some(Event::Finished(f)),
                ..
            }) => f.stored_path,
            other => panic!("{other:?}"),
        }
    });
    assert_ne!(unrecorded, recorded);
    assert!(
        unrecorded > recorded,
        "the unrecorded backup is the newer name: {unrecorded} {recorded}"
    );
    assert_eq!(d.ferry_json(&["backups"]).as_array().unwrap().len(), 1);

    // Every datastore (the newest complete set), one datastore with --date, and a verify:
    // each reads the recorded backup.
    let today = today_utc();
    for args in [
        vec!["restore", "pg-stage", "--wait"],
        vec![
            "restore",
            "pg-stage",
            "--datastore",
            "postgres",
            "--date",
            &today,
            "--wait",
        ],
    ] {
        d.ferry_ok(&args);
        let job = newest_succeeded(&d, "restore");
        assert_eq!(
            job["result"]["stored_path"],
            recorded.as_str(),
            "{args:?}: {job}"
        );
        assert_eq!(
            d.stage_pg.table_fingerprints("app"),
            backed_up,
            "{args:?} restored other data than the recorded backup's"
        );
    }
    d.ferry_ok(&["verify", "pg-stage", "--wait"]);
    let job = newest_succeeded(&d, "verify");
    assert_eq!(job["result"]["stored_path"], recorded.as_str(), "{job}");
    // The choice is in the job's history (the coordinator's log shows its events).
    let log = fs::read_to_string(d.dir.path().join("coordinator.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains(job["id"].as_str().unwrap())
            && l.contains(&format!("Ordering the verify of {recorded}"))),
        "{log}"
    );

    // The recorded backup's manifest gone from the server: the restore fails naming the
    // backup, and does not fall back to the other one.
    let manifest = d.sshd.root().join(format!(
        "{}.json",
        recorded
            .strip_prefix(&format!("{}/", d.sshd.root().display()))
            .unwrap()
    ));
    fs::rename(&manifest, manifest.with_extension("json.away")).unwrap();
    let out = d.ferry(&["restore", "pg-stage", "--wait"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    let file = recorded.rsplit('/').next().unwrap();
    assert!(
        text.contains(file) && text.contains("is not on the backup server"),
        "{text}"
    );
    assert_eq!(d.stage_pg.table_fingerprints("app"), backed_up);
}
