//! `ferry job ID`.

use ferry_proto::v1;
use ferry_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use crate::format::{self, bytes, outln, time};
use crate::{Output, status_error};

pub(crate) async fn run(
    client: &mut CoordinatorClient<Channel>,
    out: Output,
    id: &str,
) -> anyhow::Result<i32> {
    let j = client
        .get_job(v1::GetJobRequest { id: id.to_owned() })
        .await
        .map_err(status_error)?
        .into_inner();
    if out == Output::Json {
        format::print_json(&format::job_json(&j))?;
        return Ok(0);
    }
    outln!("job        {}", j.id)?;
    outln!(
        "kind       {} of {} on {}",
        format::kind(j.kind),
        j.datastore,
        j.agent
    )?;
    outln!(
        "state      {} (attempt {})",
        format::state(j.state),
        j.attempt
    )?;
    outln!("trigger    {}", j.trigger)?;
    outln!("created    {}", time(j.created_unix_ms))?;
    outln!("started    {}", time(j.started_unix_ms))?;
    outln!("finished   {}", time(j.finished_unix_ms))?;
    if let Some(p) = &j.progress {
        outln!(
            "progress   {}: {} read, {} written, {}/s",
            p.stage,
            bytes(p.bytes_read),
            bytes(p.bytes_written),
            bytes(p.rate_bytes_per_second as u64)
        )?;
    }
    if let Some(r) = &j.result {
        outln!("stored     {}", r.stored_path)?;
        outln!(
            "size       {} ({} before compression)",
            bytes(r.size_bytes),
            bytes(r.bytes_uncompressed)
        )?;
        outln!("sha256     {}", r.sha256)?;
        outln!("summary    {}", r.summary)?;
    }
    if !j.error.is_empty() {
        outln!("error      {}", j.error)?;
    }
    Ok(0)
}
