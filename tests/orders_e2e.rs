//! Orders between the coordinator and its agents (issue 14, item 4), end to end on real
//! PostgreSQL, sshd and the real binaries, the agents called directly with the
//! coordinator's certificate where the test plays the coordinator:
//! - an agent's job streams (`RunBackup`, `RunRestore`, `WatchJob`) end after their final
//!   event;
//! - the daemons' log files hold no terminal colour codes.

use std::fs;
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
