//! `ferry prune [--env E] [--dry-run]`.

use ferry_proto::v1;
use ferry_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use super::format::{self, bytes};
use super::{Output, status_error};

pub(super) async fn run(
    client: &mut CoordinatorClient<Channel>,
    out: Output,
    environment: Option<String>,
    dry_run: bool,
) -> anyhow::Result<i32> {
    let decisions = client
        .prune(v1::PruneRequest {
            environment: environment.unwrap_or_default(),
            dry_run,
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .decisions;
    if out == Output::Json {
        let v: Vec<_> = decisions
            .iter()
            .map(|d| {
                serde_json::json!({
                    "environment": d.environment, "date": d.date, "keep": d.keep,
                    "remove": d.keep.is_empty(), "removed": d.removed, "backups": d.backups,
                    "size_bytes": d.size_bytes,
                })
            })
            .collect();
        format::print_json(&serde_json::json!(v))?;
        return Ok(0);
    }
    let rows = decisions
        .iter()
        .map(|d| {
            vec![
                d.environment.clone(),
                d.date.clone(),
                if d.removed {
                    "removed".into()
                } else if d.keep.is_empty() {
                    "remove".into()
                } else {
                    format!("keep ({})", d.keep.join(", "))
                },
                d.backups.to_string(),
                bytes(d.size_bytes),
            ]
        })
        .collect();
    format::table(
        &["ENVIRONMENT", "DATE", "DECISION", "BACKUPS", "SIZE"],
        rows,
    )?;
    Ok(0)
}
