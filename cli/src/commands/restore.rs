//! `ferry restore AGENT [--datastore D] [--date YYYY-MM-DD] [--ns DB.COLL]...
//! [--all-or-nothing] [--from TARGET] [--wait]`, and
//! `ferry verify AGENT [--datastore D] [--date YYYY-MM-DD] [--from TARGET] [--wait]` (the
//! same order, checking instead of restoring).

use ferry_proto::v1;
use ferry_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use super::watch;
use crate::{Output, status_error};

pub(crate) async fn run(
    client: &mut CoordinatorClient<Channel>,
    out: Output,
    agent: String,
    (datastore, date, namespaces, from): (
        Option<String>,
        Option<String>,
        Vec<String>,
        Option<String>,
    ),
    (verify_only, all_or_nothing): (bool, bool),
    wait: bool,
) -> anyhow::Result<i32> {
    let ids = client
        .trigger_restore(v1::TriggerRestoreRequest {
            agent,
            datastore: datastore.unwrap_or_default(),
            date: date.unwrap_or_default(),
            namespaces,
            verify_only,
            all_or_nothing,
            from: from.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .job_ids;
    watch::report(client, out, ids, wait).await
}
