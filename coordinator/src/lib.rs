//! Ferry's coordinator.
//!
//! Modules:
//! - [`config`]: `coordinator.toml`, validated into [`config::Settings`] (role rules,
//!   schedules).
//! - [`model`]: jobs, progress, results and the backup catalog (domain types).
//! - [`store`]: the persistent [`store::Store`]: jobs, their events, the catalog, the audit
//!   log; [`store::RedbStore`] on disk, [`store::MemoryStore`] for unit tests.
//! - [`catalog`]: what the catalog holds and decides: backup sets, retention, prune.
//! - [`access`]: `[[operators]]` and their roles: which certificate may call which method.
//! - [`agents`]: mTLS channels to agents and their `Describe` checked against the inventory.
//! - [`dispatch`]: the domain service [`dispatch::Coordinator`]: triggers → jobs → orders
//!   (trigger policy), attempts and retries, recovery after a restart, schedules.
//! - [`service`]: the `ferry.v1.Coordinator` gRPC handlers, and the conversions between
//!   domain and wire types ([`service::convert`]).
//! - [`Error`]: the domain error a request can end in, made a gRPC status in one place.
//! - [`audit`]: the hash-chained audit log.
//! - [`metrics`]: Prometheus metrics on `GET /metrics`.
//! - [`notify`]: webhooks (`[[notify]]`) on failed jobs and drills, missed schedules,
//!   incomplete sets, copy and archive lag.
//! - [`pki`]: the fleet CA and the certificates of coordinator, agents and operators.
//! - [`state`]: the coordinator's own backup (`[self_backup]`) and `restore-state`.
//!
//! The `ferry` operator CLI is the `ferry-cli` crate: it reaches the coordinator over the
//! wire contract only.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_proto::v1::coordinator_server::CoordinatorServer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use error::Error;

pub mod access;
pub mod agents;
pub mod catalog;
pub mod config;
pub mod dispatch;
mod error;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod pki;
pub mod service;
pub mod state;
pub mod store;

/// How often every agent is described, to keep `ferry agents` and the role check fresh.
pub const DESCRIBE_INTERVAL: Duration = Duration::from_secs(30);

/// Serves the coordinator until `shutdown` is cancelled: the gRPC service for the CLI (open
/// only to the `[[operators]]`, each as its role allows: [`access`]), the schedules, and
/// the periodic agent checks. Returns once every task it spawned has ended: at shutdown,
/// jobs are left as stored (queued or running) for the next start to take up
/// ([`dispatch::Coordinator::reconcile`]), and watches of jobs end.
///
/// # Errors
/// The store cannot be opened, TLS files are unusable, or the address is taken.
pub async fn run(settings: config::Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let tasks = TaskTracker::new();
    let served = serve(settings, shutdown.clone(), tasks.clone()).await;
    shutdown.cancel();
    tasks.close();
    if !tasks.is_empty() {
        tracing::info!(
            tasks = tasks.len(),
            "Waiting for the coordinator's tasks to end."
        );
    }
    tasks.wait().await;
    tracing::info!("Coordinator stopped.");
    served
}

/// [`run`]'s work, its tasks spawned on `tasks`.
async fn serve(
    settings: config::Settings,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) -> anyhow::Result<()> {
    let store_path = settings.store.clone();
    let store: Arc<dyn store::Store> =
        Arc::new(tokio::task::spawn_blocking(move || store::RedbStore::open(&store_path)).await??);
    let tls = settings.tls.server_config()?;
    let agents = agents::AgentPool::new(
        settings.agents.clone(),
        settings.tls.clone(),
        settings.agent_timeout,
        shutdown.clone(),
        tasks.clone(),
    );
    let listen = settings.listen;
    let access = Arc::new(access::Access::new(settings.operators.clone()));
    if settings.operators.is_empty() {
        tracing::warn!(
            "No [[operators]] in the config: every call of the ferry CLI will be refused."
        );
    }
    let notifier = notify::Notifier::start(settings.notify.clone(), &shutdown, &tasks);
    let coordinator = Arc::new(dispatch::Coordinator {
        settings,
        store,
        agents: agents.clone(),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
        counters: metrics::Counters::default(),
        copier: Default::default(),
        archives: Default::default(),
        notifier,
        self_backups: Default::default(),
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
        let (c, shutdown) = (coordinator.clone(), shutdown.clone());
        tasks.spawn(async move {
            if let Err(e) = metrics::serve(c, listener, shutdown).await {
                tracing::error!(error = %e, error_type = "metrics", "Metrics server failed.");
            }
        });
    }
    tasks.spawn(agents.refresh_loop(DESCRIBE_INTERVAL));
    tasks.spawn(coordinator.clone().run_schedules());
    tasks.spawn(coordinator.clone().run_copies());
    tasks.spawn(coordinator.clone().run_archive_scans());
    tasks.spawn(coordinator.clone().run_self_backups());
    tasks.spawn(coordinator.clone().run_notification_checks());
    tracing::info!(%listen, agents = coordinator.settings.agents.len(),
        schedules = coordinator.settings.schedules.len(), "Coordinator serving.");
    tonic::transport::Server::builder()
        .tls_config(tls)
        .context("TLS configuration (check [tls] cert, key and ca)")?
        .add_service(access::Guarded::new(
            CoordinatorServer::new(service::CoordinatorService::new(coordinator))
                .max_decoding_message_size(ferry_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(ferry_proto::MAX_RESPONSE_BYTES),
            access,
        ))
        .serve_with_shutdown(listen, shutdown.cancelled_owned())
        .await
        .with_context(|| format!("serving gRPC on {listen}"))
}
