//! `ferry restore AGENT|--env E [--datastore D] [--date YYYY-MM-DD] [--ns DB.COLL]...
//! [--all-or-nothing] [--from TARGET] [--to-time T] [--wait]`, and
//! `ferry verify AGENT [--datastore D] [--date YYYY-MM-DD] [--from TARGET] [--wait]` (the
//! same order, checking instead of restoring).

use ferry_proto::v1;
use ferry_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use super::watch;
use crate::{Output, status_error};

/// What `ferry restore` or `ferry verify` orders (see `TriggerRestoreRequest`).
#[derive(Debug, Default)]
pub(crate) struct Order {
    /// `--env`: every staging agent of it instead of one.
    pub(crate) environment: Option<String>,
    pub(crate) datastore: Option<String>,
    pub(crate) date: Option<String>,
    pub(crate) namespaces: Vec<String>,
    pub(crate) from: Option<String>,
    /// `--to-time`, UTC ms.
    pub(crate) to_time_ms: Option<i64>,
    pub(crate) verify_only: bool,
    pub(crate) all_or_nothing: bool,
}

pub(crate) async fn run(
    client: &mut CoordinatorClient<Channel>,
    out: Output,
    agent: String,
    order: Order,
    wait: bool,
) -> anyhow::Result<i32> {
    let ids = client
        .trigger_restore(v1::TriggerRestoreRequest {
            agent,
            datastore: order.datastore.unwrap_or_default(),
            date: order.date.unwrap_or_default(),
            namespaces: order.namespaces,
            verify_only: order.verify_only,
            all_or_nothing: order.all_or_nothing,
            from: order.from.unwrap_or_default(),
            to_time_unix_ms: order.to_time_ms.unwrap_or_default(),
            environment: order.environment.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .job_ids;
    watch::report(client, out, ids, wait).await
}
