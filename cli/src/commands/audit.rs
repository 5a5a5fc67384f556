//! `ferry audit [--limit N] [--verify]`.

use ferry_proto::v1;
use ferry_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use crate::format::{self, outln, time};
use crate::{Output, status_error};
use ferry_core::audit::{self, AuditEntry};

pub(crate) async fn run(
    client: &mut CoordinatorClient<Channel>,
    out: Output,
    limit: u32,
    verify: bool,
) -> anyhow::Result<i32> {
    // Verifying needs the whole chain, from its first entry.
    let limit = if verify { 0 } else { limit };
    let entries: Vec<AuditEntry> = client
        .list_audit(v1::ListAuditRequest { limit })
        .await
        .map_err(status_error)?
        .into_inner()
        .entries
        .into_iter()
        .map(Into::into)
        .collect();
    if verify {
        let result = audit::verify(&entries);
        let newest = entries.last().map(|e| e.hash.clone()).unwrap_or_default();
        if out == Output::Json {
            format::print_json(&match &result {
                Ok(n) => serde_json::json!({"ok": true, "entries": n, "newest_hash": newest}),
                Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
            })?;
        } else {
            match &result {
                Ok(n) => outln!("audit log intact: {n} entries, newest hash {newest}")?,
                Err(e) => outln!("audit log BROKEN: {e}")?,
            }
        }
        return Ok(if result.is_ok() { 0 } else { 1 });
    }
    if out == Output::Json {
        format::print_json(&serde_json::to_value(&entries)?)?;
        return Ok(0);
    }
    let rows = entries
        .iter()
        .map(|e| {
            vec![
                e.seq.to_string(),
                time(e.at_ms),
                e.who.clone(),
                e.action.clone(),
                e.target.clone(),
                e.outcome.clone(),
            ]
        })
        .collect();
    format::table(&["SEQ", "WHEN", "WHO", "ACTION", "TARGET", "OUTCOME"], rows)?;
    Ok(0)
}
