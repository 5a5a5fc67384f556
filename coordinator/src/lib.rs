//! Ferry's coordinator.
//!
//! Modules:
//! - [`config`]: `coordinator.toml`, validated into [`config::Settings`] (role rules,
//!   schedules).
//! - [`model`]: jobs, progress, results and the backup catalog (domain types).
//! - [`store`]: the persistent [`store::Store`] (redb): jobs, their events, the catalog.
//! - [`access`]: `[[operators]]` and their roles: which certificate may call which method.
//! - [`agents`]: mTLS channels to agents and their `Describe` checked against the inventory.
//! - [`dispatch`]: triggers → jobs → orders, retries, timeouts, schedules.
//! - [`service`] and [`convert`]: the `ferry.v1.Coordinator` gRPC handlers.
//! - [`pki`]: the fleet CA and the certificates of coordinator, agents and operators.
//!
//! The `ferry` operator CLI is the `ferry-cli` crate: it reaches the coordinator over the
//! wire contract only.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_proto::v1::coordinator_server::CoordinatorServer;
use tokio_util::sync::CancellationToken;

pub mod access;
pub mod agents;
pub mod config;
pub mod convert;
pub mod dispatch;
pub mod metrics;
pub mod model;
pub mod pki;
pub mod prune;
pub mod retention;
pub mod service;
pub mod sets;
pub mod store;

/// How often every agent is described, to keep `ferry agents` and the role check fresh.
pub const DESCRIBE_INTERVAL: Duration = Duration::from_secs(30);

/// Serves the coordinator until `shutdown` is cancelled: the gRPC service for the CLI (open
/// only to the `[[operators]]`, each as its role allows: [`access`]), the schedules, and
/// the periodic agent checks.
///
/// # Errors
/// The store cannot be opened, TLS files are unusable, or the address is taken.
pub async fn run(settings: config::Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store_path = settings.store.clone();
    let store: Arc<dyn store::Store> =
        Arc::new(tokio::task::spawn_blocking(move || store::RedbStore::open(&store_path)).await??);
    let tls = settings.tls.server_config()?;
    let agents = agents::AgentPool::new(
        settings.agents.clone(),
        settings.tls.clone(),
        settings.agent_timeout,
    );
    let listen = settings.listen;
    let access = Arc::new(access::Access::new(settings.operators.clone()));
    if settings.operators.is_empty() {
        tracing::warn!(
            "No [[operators]] in the config: every call of the ferry CLI will be refused."
        );
    }
    let coordinator = Arc::new(dispatch::Coordinator {
        settings,
        store,
        agents: agents.clone(),
        shutdown: shutdown.clone(),
        counters: metrics::Counters::default(),
    });
    let reconciled = coordinator.reconcile().await;
    if reconciled > 0 {
        tracing::info!(
            jobs = reconciled,
            "Taking up the jobs a previous coordinator left unfinished."
        );
    }
    if let Some(addr) = coordinator.settings.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics_listen {addr}"))?;
        tokio::spawn(metrics::serve(
            coordinator.clone(),
            listener,
            shutdown.clone(),
        ));
    }
    let refresh = tokio::spawn(agents.refresh_loop(DESCRIBE_INTERVAL, shutdown.clone()));
    let schedules = tokio::spawn(coordinator.clone().run_schedules());
    tracing::info!(%listen, agents = coordinator.settings.agents.len(),
        schedules = coordinator.settings.schedules.len(), "Coordinator serving.");
    let served = tonic::transport::Server::builder()
        .tls_config(tls)
        .context("TLS configuration (check [tls] cert, key and ca)")?
        .add_service(access::Guarded::new(
            CoordinatorServer::new(service::CoordinatorService::new(coordinator))
                .max_decoding_message_size(ferry_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(ferry_proto::MAX_RESPONSE_BYTES),
            access,
        ))
        .serve_with_shutdown(listen, shutdown.clone().cancelled_owned())
        .await
        .with_context(|| format!("serving gRPC on {listen}"));
    shutdown.cancel();
    let _ = refresh.await;
    let _ = schedules.await;
    served
}
