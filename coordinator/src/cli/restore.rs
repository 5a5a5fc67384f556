//! `ferry restore AGENT [--datastore D] [--date YYYY-MM-DD] [--ns DB.COLL]... [--wait]`.

use ferry_proto::v1;
use ferry_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use super::{Output, status_error, watch};

pub(super) async fn run(
    client: &mut CoordinatorClient<Channel>,
    out: Output,
    agent: String,
    datastore: Option<String>,
    date: Option<String>,
    namespaces: Vec<String>,
    wait: bool,
) -> anyhow::Result<i32> {
    let ids = client
        .trigger_restore(v1::TriggerRestoreRequest {
            agent,
            datastore: datastore.unwrap_or_default(),
            date: date.unwrap_or_default(),
            namespaces,
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .job_ids;
    watch::report(client, out, ids, wait).await
}
