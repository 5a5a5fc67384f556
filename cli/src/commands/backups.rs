//! `ferry backups [--env E] [--sets]`.

use ferry_proto::v1;
use ferry_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use crate::format::{self, bytes, time};
use crate::{Output, status_error};

pub(crate) async fn run(
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
                    "retain_until": (b.retain_until_unix_ms != 0).then(|| time(b.retain_until_unix_ms)),
                    "lock_error": (!b.lock_error.is_empty()).then_some(&b.lock_error),
                    "stored_on": stored_on(b),
                    "copies": b.copies.iter().map(|c| serde_json::json!({
                        "target": c.target, "copied": time(c.copied_unix_ms),
                    })).collect::<Vec<_>>(),
                    "missing": (b.missing_found_unix_ms != 0).then(|| serde_json::json!({
                        "found": time(b.missing_found_unix_ms), "job_id": b.missing_job_id,
                        "error": b.missing_error,
                    })),
                })
            })
            .collect();
        format::print_json(&serde_json::json!(v))?;
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
                if b.retain_until_unix_ms == 0 {
                    String::new()
                } else {
                    time(b.retain_until_unix_ms)
                },
                if b.missing_found_unix_ms == 0 && b.lock_error.is_empty() {
                    "ok".to_owned()
                } else if b.missing_found_unix_ms == 0 {
                    format!("NOT LOCKED ({})", b.lock_error)
                } else {
                    format!(
                        "MISSING (found by job {} at {})",
                        b.missing_job_id,
                        time(b.missing_found_unix_ms)
                    )
                },
                stored_on(b).join(","),
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
            "RETAIN UNTIL",
            "STATE",
            "STORED ON",
            "PATH",
        ],
        rows,
    )?;
    Ok(0)
}

/// Where a backup lives: `primary` (where the agent wrote it), then each copy target
/// holding a checked copy.
fn stored_on(b: &v1::BackupRecord) -> Vec<String> {
    std::iter::once("primary".to_owned())
        .chain(b.copies.iter().map(|c| c.target.clone()))
        .collect()
}

/// `ferry backups --sets`: one row per set (environment, date), its completeness, members
/// present out of expected, size, and the missing members.
pub(crate) async fn sets(
    client: &mut CoordinatorClient<Channel>,
    out: Output,
    environment: Option<String>,
) -> anyhow::Result<i32> {
    let sets = client
        .list_sets(v1::ListSetsRequest {
            environment: environment.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .sets;
    if out == Output::Json {
        let v: Vec<_> = sets
            .iter()
            .map(|s| {
                serde_json::json!({
                    "environment": s.environment, "date": s.date, "complete": s.complete,
                    "size_bytes": s.size_bytes,
                    "members": s.members.iter().map(|m| serde_json::json!({
                        "agent": m.agent, "datastore": m.datastore, "present": m.present,
                        "size_bytes": m.size_bytes, "stored_path": m.stored_path,
                        "finished": time(m.finished_unix_ms),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        format::print_json(&serde_json::json!(v))?;
        return Ok(0);
    }
    let rows = sets
        .iter()
        .map(|s| {
            let present = s.members.iter().filter(|m| m.present).count();
            let missing: Vec<String> = s
                .members
                .iter()
                .filter(|m| !m.present)
                .map(|m| format!("{}/{}", m.agent, m.datastore))
                .collect();
            vec![
                s.environment.clone(),
                s.date.clone(),
                if s.complete { "complete" } else { "INCOMPLETE" }.to_owned(),
                format!("{present}/{}", s.members.len()),
                bytes(s.size_bytes),
                missing.join(", "),
            ]
        })
        .collect();
    format::table(
        &["ENVIRONMENT", "DATE", "SET", "MEMBERS", "SIZE", "MISSING"],
        rows,
    )?;
    Ok(0)
}
