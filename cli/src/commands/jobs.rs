//! `ferry jobs`.

use ferry_proto::v1;
use ferry_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use crate::format::{self, time};
use crate::{Output, status_error};

pub(crate) async fn run(
    client: &mut CoordinatorClient<Channel>,
    out: Output,
    limit: u32,
) -> anyhow::Result<i32> {
    let jobs = client
        .list_jobs(v1::ListJobsRequest { limit })
        .await
        .map_err(status_error)?
        .into_inner()
        .jobs;
    if out == Output::Json {
        format::print_json(&serde_json::json!(
            jobs.iter().map(format::job_json).collect::<Vec<_>>()
        ))?;
        return Ok(0);
    }
    let rows = jobs
        .iter()
        .map(|j| {
            let detail = if !j.error.is_empty() {
                j.error.clone()
            } else if let Some(r) = &j.result {
                r.stored_path.clone()
            } else {
                String::new()
            };
            vec![
                j.id.clone(),
                format::kind(j.kind).into(),
                j.agent.clone(),
                j.datastore.clone(),
                format::state(j.state).into(),
                j.attempt.to_string(),
                time(j.created_unix_ms),
                detail.chars().take(100).collect(),
            ]
        })
        .collect();
    format::table(
        &[
            "JOB",
            "KIND",
            "AGENT",
            "DATASTORE",
            "STATE",
            "TRY",
            "CREATED",
            "DETAIL",
        ],
        rows,
    )?;
    Ok(0)
}
