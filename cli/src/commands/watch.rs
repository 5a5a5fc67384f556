//! Following triggered jobs: print their ids, or with `--wait` watch each to its end with
//! a progress bar (stderr, only on a terminal) and print the outcome.

use std::time::Duration;

use ferry_proto::v1;
use ferry_proto::v1::coordinator_client::CoordinatorClient;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tonic::transport::Channel;

use crate::format::{self, bytes, outln};
use crate::{Output, status_error};

/// Prints the job ids, or waits for every job and returns 1 if any did not succeed.
pub(crate) async fn report(
    client: &mut CoordinatorClient<Channel>,
    out: Output,
    ids: Vec<String>,
    wait: bool,
) -> anyhow::Result<i32> {
    if !wait {
        match out {
            Output::Json => format::print_json(&serde_json::json!({ "job_ids": ids }))?,
            Output::Human => {
                for id in &ids {
                    outln!("{id}")?;
                }
            }
        }
        return Ok(0);
    }
    let bars = MultiProgress::new();
    let watches = ids
        .iter()
        .map(|id| watch_one(client.clone(), id.clone(), bars.clone()));
    let jobs = futures::future::try_join_all(watches).await?;
    let failed = jobs
        .iter()
        .filter(|j| j.state != v1::JobState::Succeeded as i32)
        .count();
    match out {
        Output::Json => format::print_json(&serde_json::json!(
            jobs.iter().map(format::job_json).collect::<Vec<_>>()
        ))?,
        Output::Human => {
            for j in &jobs {
                let written = match &j.result {
                    Some(r) if j.state == v1::JobState::Succeeded as i32 => outln!(
                        "{} {} of {} on {} succeeded: {} ({}, sha256 {})\n  {}",
                        j.id,
                        format::kind(j.kind),
                        j.datastore,
                        j.agent,
                        r.stored_path,
                        bytes(r.size_bytes),
                        &r.sha256[..r.sha256.len().min(16)],
                        r.summary
                    ),
                    _ => outln!(
                        "{} {} of {} on {} {}: {}",
                        j.id,
                        format::kind(j.kind),
                        j.datastore,
                        j.agent,
                        format::state(j.state),
                        j.error
                    ),
                };
                written?;
            }
            if let Some(summary) = set_summary(&jobs) {
                outln!("{summary}")?;
            }
        }
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

/// For the restores of one set (jobs with a `set_environment`): `set production
/// 2026-12-04 on pg-stage restored partly: restored: ...; not restored: postgres (why)`.
fn set_summary(jobs: &[v1::Job]) -> Option<String> {
    let first = jobs.first()?;
    if first.set_environment.is_empty()
        || jobs
            .iter()
            .any(|j| j.set_environment != first.set_environment || j.date != first.date)
    {
        return None;
    }
    let (outcome, details) = ferry_core::restore_set::set_outcome(jobs.iter().map(|j| {
        (
            j.datastore.as_str(),
            j.state == v1::JobState::Succeeded as i32,
            if j.error.is_empty() {
                format::state(j.state)
            } else {
                j.error.as_str()
            },
        )
    }));
    Some(format!(
        "set {} {} on {} {}: {details}",
        first.set_environment,
        first.date,
        first.agent,
        outcome.as_str()
    ))
}

/// How long `--wait` keeps trying to reach the coordinator again after losing it (a
/// restart, a network blip) before giving up on watching; the job itself goes on.
const RECONNECT_FOR: Duration = Duration::from_secs(300);
/// The longest pause between two reconnection tries (they start at 1 s and double).
const RECONNECT_MAX_PAUSE: Duration = Duration::from_secs(10);

/// Whether a failed watch is the connection lost (the coordinator restarted, the network
/// failed: reconnect and keep watching) rather than the coordinator's answer (no such job,
/// not allowed: give up).
fn is_connection_lost(s: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled | Code::Aborted
    )
}

async fn watch_one(
    mut client: CoordinatorClient<Channel>,
    id: String,
    bars: MultiProgress,
) -> anyhow::Result<v1::Job> {
    let bar = bars.add(ProgressBar::new_spinner());
    bar.set_style(ProgressStyle::with_template("{spinner} {prefix} {wide_msg}").expect("template"));
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut last: Option<v1::Job> = None;
    // Since when the coordinator is lost, and the next pause, while reconnecting.
    let mut lost: Option<(std::time::Instant, Duration)> = None;
    loop {
        let watched = async {
            let mut stream = client
                .watch_job(v1::GetJobRequest { id: id.clone() })
                .await?
                .into_inner();
            if let Some((since, _)) = lost.take() {
                bars.suspend(|| {
                    eprintln!(
                        "ferry: reconnected to the coordinator after {} s; watching job {id} again",
                        since.elapsed().as_secs()
                    );
                });
            }
            while let Some(job) = stream.message().await? {
                bar.set_prefix(format!(
                    "{} {} {}",
                    format::kind(job.kind),
                    job.agent,
                    job.datastore
                ));
                let msg = match &job.progress {
                    Some(p) if job.state == v1::JobState::Running as i32 => format!(
                        "{}: {} read, {} written, {}/s",
                        p.stage,
                        bytes(p.bytes_read),
                        bytes(p.bytes_written),
                        bytes(p.rate_bytes_per_second as u64)
                    ),
                    _ => format::state(job.state).to_owned(),
                };
                bar.set_message(msg);
                last = Some(job);
            }
            Ok::<(), tonic::Status>(())
        }
        .await;
        let status = match watched {
            Ok(()) if last.as_ref().is_some_and(is_final) => break,
            // The stream ended before the job did: the coordinator went away cleanly.
            Ok(()) => tonic::Status::unavailable("the coordinator ended the watch early"),
            Err(s) if is_connection_lost(&s) => s,
            Err(s) => return Err(status_error(s)),
        };
        let (since, pause) = *lost.get_or_insert((std::time::Instant::now(), Duration::ZERO));
        let pause = pause.max(Duration::from_secs(1));
        if since.elapsed() + pause > RECONNECT_FOR {
            bar.finish_and_clear();
            anyhow::bail!(
                "lost the coordinator while watching job {id} and could not reach it again for \
                 {} s: {}; the job goes on without this watch (`ferry job {id}` shows it)",
                RECONNECT_FOR.as_secs(),
                ferry_proto::status::describe_status(&status)
            );
        }
        bars.suspend(|| {
            eprintln!(
                "ferry: lost the coordinator while watching job {id} ({}); reconnecting in {} s",
                ferry_proto::status::describe_status(&status),
                pause.as_secs()
            );
        });
        tokio::time::sleep(pause).await;
        lost = Some((since, (pause * 2).min(RECONNECT_MAX_PAUSE)));
    }
    bar.finish_and_clear();
    last.ok_or_else(|| anyhow::anyhow!("the coordinator sent nothing about job {id}"))
}

/// Whether `job` can no longer change.
fn is_final(job: &v1::Job) -> bool {
    matches!(
        v1::JobState::try_from(job.state),
        Ok(v1::JobState::Succeeded | v1::JobState::Failed | v1::JobState::Cancelled)
    )
}
