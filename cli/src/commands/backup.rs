//! `ferry backup AGENT [DATASTORE] [--type full|diff] [--wait]`.

use ferry_proto::v1;
use ferry_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use super::watch;
use crate::{Output, status_error};

pub(crate) async fn run(
    client: &mut CoordinatorClient<Channel>,
    out: Output,
    agent: String,
    (datastore, backup_type): (Option<String>, Option<String>),
    wait: bool,
) -> anyhow::Result<i32> {
    let ids = client
        .trigger_backup(v1::TriggerBackupRequest {
            agent,
            datastore: datastore.unwrap_or_default(),
            backup_type: backup_type.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .job_ids;
    watch::report(client, out, ids, wait).await
}
