//! `ferry keys`: the recipients the catalog's backups were encrypted to, the staging agents
//! holding each identity, and the backups no staging agent can open (key rotation).

use ferry_proto::v1;
use ferry_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use crate::format::{self, time};
use crate::{Output, status_error};

/// Exit code 0, or 1 when a backup in the catalog can be opened by no staging agent.
pub(crate) async fn run(
    client: &mut CoordinatorClient<Channel>,
    out: Output,
) -> anyhow::Result<i32> {
    let r = client
        .list_keys(v1::ListKeysRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let code = i32::from(!r.unopenable.is_empty());
    if out == Output::Json {
        format::print_json(&serde_json::json!({
            "keys": r.keys.iter().map(|k| serde_json::json!({
                "fingerprint": k.fingerprint, "backups": k.backups,
                "oldest": (k.backups > 0).then(|| time(k.oldest_unix_ms)),
                "newest": (k.backups > 0).then(|| time(k.newest_unix_ms)),
                "staging_agents": k.staging_agents,
            })).collect::<Vec<_>>(),
            "unopenable": r.unopenable.iter().map(|b| serde_json::json!({
                "environment": b.environment, "date": b.date, "datastore": b.datastore,
                "stored_path": b.stored_path, "job_id": b.job_id,
                "recipients": b.recipient_fingerprints,
            })).collect::<Vec<_>>(),
            "unknown": r.unknown,
            "undescribed_agents": r.undescribed_agents,
        }))?;
        return Ok(code);
    }
    let rows = r
        .keys
        .iter()
        .map(|k| {
            vec![
                k.fingerprint.clone(),
                k.backups.to_string(),
                if k.backups == 0 {
                    "-".into()
                } else {
                    format!("{} .. {}", time(k.oldest_unix_ms), time(k.newest_unix_ms))
                },
                if k.staging_agents.is_empty() {
                    "NONE".into()
                } else {
                    k.staging_agents.join(",")
                },
                if k.backups == 0 {
                    "retirable: no backup needs it".into()
                } else {
                    String::new()
                },
            ]
        })
        .collect();
    format::table(
        &["RECIPIENT", "BACKUPS", "FINISHED", "OPENED BY", "NOTE"],
        rows,
    )?;
    if r.unknown > 0 {
        println!(
            "\n{} backup(s) were recorded without their recipients (before Ferry kept them).",
            r.unknown
        );
    }
    if !r.undescribed_agents.is_empty() {
        println!(
            "\nNot described yet (what they open is not known): {}.",
            r.undescribed_agents.join(", ")
        );
    }
    if !r.unopenable.is_empty() {
        println!(
            "\nWARNING: {} backup(s) can be opened by no staging agent's identity:",
            r.unopenable.len()
        );
        for b in &r.unopenable {
            println!(
                "  {} {} {} needs {}",
                b.environment,
                b.date,
                b.stored_path,
                b.recipient_fingerprints.join(" or ")
            );
        }
    }
    Ok(code)
}
