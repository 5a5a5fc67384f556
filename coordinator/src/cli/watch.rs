//! Following triggered jobs: print their ids, or with `--wait` watch each to its end with
//! a progress bar (stderr, only on a terminal) and print the outcome.

use std::time::Duration;

use ferry_proto::v1;
use ferry_proto::v1::coordinator_client::CoordinatorClient;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tonic::transport::Channel;

use super::format::{self, bytes, outln};
use super::{Output, status_error};

/// Prints the job ids, or waits for every job and returns 1 if any did not succeed.
pub(super) async fn report(
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
        }
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

async fn watch_one(
    mut client: CoordinatorClient<Channel>,
    id: String,
    bars: MultiProgress,
) -> anyhow::Result<v1::Job> {
    let bar = bars.add(ProgressBar::new_spinner());
    bar.set_style(ProgressStyle::with_template("{spinner} {prefix} {wide_msg}").expect("template"));
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut stream = client
        .watch_job(v1::GetJobRequest { id: id.clone() })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut last = None;
    while let Some(job) = stream.message().await.map_err(status_error)? {
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
    bar.finish_and_clear();
    last.ok_or_else(|| anyhow::anyhow!("the coordinator sent nothing about job {id}"))
}
