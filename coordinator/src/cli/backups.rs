//! `ferry backups`.

use ferry_proto::v1;
use ferry_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use super::format::{self, bytes, time};
use super::{Output, status_error};

pub(super) async fn run(
    client: &mut CoordinatorClient<Channel>,
    out: Output,
    environment: Option<String>,
) -> anyhow::Result<i32> {
    let backups = client
        .list_backups(v1::ListBackupsRequest {
            environment: environment.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .backups;
    if out == Output::Json {
        let v: Vec<_> = backups
            .iter()
            .map(|b| {
                serde_json::json!({
                    "environment": b.environment, "date": b.date, "datastore": b.datastore, "kind": b.kind,
                    "agent": b.agent, "stored_path": b.stored_path, "size_bytes": b.size_bytes,
                    "bytes_uncompressed": b.bytes_uncompressed, "sha256": b.sha256,
                    "finished": time(b.finished_unix_ms), "job_id": b.job_id,
                })
            })
            .collect();
        format::print_json(&serde_json::json!(v));
        return Ok(0);
    }
    let rows = backups
        .iter()
        .map(|b| {
            vec![
                b.environment.clone(),
                b.date.clone(),
                b.datastore.clone(),
                b.kind.clone(),
                bytes(b.size_bytes),
                time(b.finished_unix_ms),
                b.stored_path.clone(),
            ]
        })
        .collect();
    format::table(
        &[
            "ENVIRONMENT",
            "DATE",
            "DATASTORE",
            "KIND",
            "SIZE",
            "FINISHED",
            "PATH",
        ],
        rows,
    );
    Ok(0)
}
