//! `ferry job ID`.

use ferry_proto::v1;
use ferry_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use super::format::{self, bytes, time};
use super::{Output, status_error};

pub(super) async fn run(
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
        format::print_json(&format::job_json(&j));
        return Ok(0);
    }
    println!("job        {}", j.id);
    println!(
        "kind       {} of {} on {}",
        format::kind(j.kind),
        j.datastore,
        j.agent
    );
    println!(
        "state      {} (attempt {})",
        format::state(j.state),
        j.attempt
    );
    println!("trigger    {}", j.trigger);
    println!("created    {}", time(j.created_unix_ms));
    println!("started    {}", time(j.started_unix_ms));
    println!("finished   {}", time(j.finished_unix_ms));
    if let Some(p) = &j.progress {
        println!(
            "progress   {}: {} read, {} written, {}/s",
            p.stage,
            bytes(p.bytes_read),
            bytes(p.bytes_written),
            bytes(p.rate_bytes_per_second as u64)
        );
    }
    if let Some(r) = &j.result {
        println!("stored     {}", r.stored_path);
        println!(
            "size       {} ({} before compression)",
            bytes(r.size_bytes),
            bytes(r.bytes_uncompressed)
        );
        println!("sha256     {}", r.sha256);
        println!("summary    {}", r.summary);
    }
    if !j.error.is_empty() {
        println!("error      {}", j.error);
    }
    Ok(0)
}
