//! `ferry agents`.

use ferry_proto::v1;
use ferry_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use crate::format;
use crate::{Output, status_error};

pub(crate) async fn run(
    client: &mut CoordinatorClient<Channel>,
    out: Output,
) -> anyhow::Result<i32> {
    let listed = client
        .list_agents(v1::ListAgentsRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let (agents, now) = (listed.agents, listed.now_unix_ms);
    let reached = |a: &v1::AgentInfo| {
        (a.last_reached_unix_ms != 0).then(|| now.saturating_sub(a.last_reached_unix_ms))
    };
    if out == Output::Json {
        let v: Vec<_> = agents
            .iter()
            .map(|a| {
                serde_json::json!({
                    "id": a.id, "address": a.address, "role": format::role(a.role), "environment": a.environment,
                    "reachable": a.reachable, "problem": (!a.problem.is_empty()).then_some(&a.problem),
                    "last_reached": (a.last_reached_unix_ms != 0).then(|| format::time(a.last_reached_unix_ms)),
                    "last_reached_age_seconds": reached(a).map(|ms| ms as f64 / 1000.0),
                    "version": a.version, "hostname": a.hostname,
                    "datastores": a.datastores.iter().map(|d| serde_json::json!({"name": d.name, "kind": d.kind})).collect::<Vec<_>>(),
                    "tools": a.tools.iter().map(|t| serde_json::json!({"name": t.name, "version": t.version})).collect::<Vec<_>>(),
                })
            })
            .collect();
        format::print_json(&serde_json::json!(v))?;
        return Ok(0);
    }
    let rows = agents
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                format::role(a.role).into(),
                a.environment.clone(),
                a.address.clone(),
                if a.reachable {
                    "ok".into()
                } else {
                    a.problem.clone()
                },
                reached(a).map_or_else(
                    || "never".into(),
                    |ms| format!("{} ago", format::duration_ms(ms)),
                ),
                a.datastores
                    .iter()
                    .map(|d| format!("{} ({})", d.name, d.kind))
                    .collect::<Vec<_>>()
                    .join(", "),
            ]
        })
        .collect();
    format::table(
        &[
            "AGENT",
            "ROLE",
            "ENVIRONMENT",
            "ADDRESS",
            "STATE",
            "LAST REACHED",
            "DATASTORES",
        ],
        rows,
    )?;
    Ok(0)
}
