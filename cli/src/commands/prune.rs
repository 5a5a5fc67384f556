//! `ferry prune [--env E] [--dry-run]`. `--output json` prints the dated folders' decisions
//! (an array, as before archived WAL was pruned); the archived WAL's are in the table and
//! the audit log.

use ferry_proto::v1;
use ferry_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use crate::format::{self, bytes, outln, time};
use crate::{Output, status_error};

pub(crate) async fn run(
    client: &mut CoordinatorClient<Channel>,
    out: Output,
    environment: Option<String>,
    dry_run: bool,
) -> anyhow::Result<i32> {
    let response = client
        .prune(v1::PruneRequest {
            environment: environment.unwrap_or_default(),
            dry_run,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let decisions = response.decisions;
    if out == Output::Json {
        let v: Vec<_> = decisions
            .iter()
            .map(|d| {
                let leftovers: Vec<_> = d
                    .leftovers
                    .iter()
                    .map(|l| {
                        serde_json::json!({
                            "path": l.path, "kind": l.kind, "size_bytes": l.size_bytes,
                            "remove": l.remove, "removed": l.removed, "reason": l.reason,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "environment": d.environment, "date": d.date, "keep": d.keep,
                    "remove": d.keep.is_empty(), "removed": d.removed, "backups": d.backups,
                    "size_bytes": d.size_bytes, "leftovers": leftovers,
                    "retain_until": (d.retain_until_unix_ms != 0).then(|| time(d.retain_until_unix_ms)),
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
                if d.retain_until_unix_ms == 0 {
                    String::new()
                } else {
                    time(d.retain_until_unix_ms)
                },
            ]
        })
        .collect();
    format::table(
        &[
            "ENVIRONMENT",
            "DATE",
            "DECISION",
            "BACKUPS",
            "SIZE",
            "RETAIN UNTIL",
        ],
        rows,
    )?;
    let leftovers: Vec<Vec<String>> = decisions
        .iter()
        .flat_map(|d| d.leftovers.iter())
        .map(|l| {
            vec![
                l.path.clone(),
                l.kind.clone(),
                bytes(l.size_bytes),
                if l.removed {
                    "removed".into()
                } else if l.remove {
                    "remove".into()
                } else {
                    "keep".into()
                },
                l.reason.clone(),
            ]
        })
        .collect();
    if !response.leftovers_checked {
        outln!(
            "\nFiles left by failed uploads were not looked for: that needs the maintenance key \
             ([maintenance] in coordinator.toml)."
        )?;
    } else if leftovers.is_empty() {
        outln!("\nNo files left by failed uploads.")?;
    } else {
        outln!("\nLeft by failed or interrupted uploads:")?;
        format::table(&["FILE", "KIND", "SIZE", "DECISION", "WHY"], leftovers)?;
    }
    if !response.wal.is_empty() {
        outln!("\nArchived WAL and oplog slices:")?;
        let rows = response
            .wal
            .iter()
            .map(|w| {
                vec![
                    w.environment.clone(),
                    format!(
                        "{} ({})",
                        w.datastore,
                        if w.kind.is_empty() { "wal" } else { &w.kind }
                    ),
                    match (w.going, w.removed) {
                        (0, _) => "keep all".into(),
                        (n, true) => format!(
                            "removed {n} file(s), {} to {} ({})",
                            w.first_going,
                            w.last_going,
                            bytes(w.removed_bytes)
                        ),
                        (n, false) => {
                            format!("remove {n} file(s), {} to {}", w.first_going, w.last_going)
                        }
                    },
                    w.note.clone(),
                ]
            })
            .collect();
        format::table(&["ENVIRONMENT", "DATASTORE", "DECISION", "WHY"], rows)?;
    }
    Ok(0)
}
