//! `ferry-agent`: the daemon on each database host. It serves the `ferry.v1.Agent` gRPC
//! service over mTLS, and runs backups (production) or restores (staging), one job per
//! datastore at a time.
//!
//! Modules:
//! - [`config`]: `agent.toml`, validated into runtime [`config::Settings`].
//! - [`service`] and [`jobs`]: the gRPC handlers, order validation, the job runner.
//! - [`job`]: what a job reports and why it fails ([`job::JobError`], [`job::JobReport`]),
//!   and its live [`job::Progress`].
//! - [`pipeline`]: the streaming stages (compress, encrypt, hash, chunks) and the backup
//!   and restore orchestration.
//! - [`datastore`]: one folder per datastore kind.
//!
//! Where files go on the backup server and their `.json` sidecar are `ferry_core`'s
//! `layout` and `manifest`; the backup server itself is a `ferry_storage` target
//! (`[backup_server]`, an `Arc<dyn ferry_storage::Target>` in [`config::Settings`]).

use std::sync::Arc;

use ferry_proto::v1::agent_server::AgentServer;
use tokio_util::sync::CancellationToken;

pub mod config;
pub mod datastore;
pub mod job;
pub mod jobs;
pub mod pipeline;
pub mod service;

/// Serves the agent until `shutdown` is cancelled; running jobs are cancelled then. A
/// staging agent first puts right the leftovers of interrupted restores of its datastores
/// ([`datastore::recovery`]).
///
/// # Errors
/// TLS files unreadable or malformed, or the listen address unavailable.
pub async fn run(settings: config::Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    use anyhow::Context;
    let tls = settings.tls.server_config()?;
    let listen = settings.listen;
    let settings = Arc::new(settings);
    if settings.role == ferry_proto::Role::Staging {
        // No job runs yet: every leftover of an interrupted restore is a dead job's. Each
        // is logged, and told in the report of the datastore's next restore.
        for ds in settings.datastores.values() {
            ds.recover_at_start().await;
        }
    }
    let runner = jobs::JobRunner::new(settings.clone(), shutdown.clone());
    // Orders are a few hundred bytes and answers small: a larger message either way is
    // refused (`OutOfRange`) before a handler runs or anything is sent.
    let service = AgentServer::new(service::AgentService::new(runner))
        .max_decoding_message_size(ferry_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(ferry_proto::MAX_MESSAGE_BYTES);
    tracing::info!(agent = %settings.id, role = %settings.role, environment = %settings.environment,
        %listen, datastores = settings.datastores.len(), "Agent serving.");
    tonic::transport::Server::builder()
        .tls_config(tls)
        .context("TLS configuration (check [tls] cert, key and ca)")?
        .add_service(service)
        .serve_with_shutdown(listen, shutdown.cancelled_owned())
        .await
        .with_context(|| format!("serving gRPC on {listen}"))?;
    Ok(())
}
