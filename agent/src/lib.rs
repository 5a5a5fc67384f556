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
//! - [`wal`]: WAL shipping, the `[wal]` socket that `ferry-agent wal-push` (PostgreSQL's
//!   `archive_command`) hands WAL files to, and its protocol.
//!
//! Where files go on the backup server and their `.json` sidecar are `ferry_core`'s
//! `layout` and `manifest`; the backup server itself is a `ferry_storage` target
//! (`[backup_server]`, an `Arc<dyn ferry_storage::Target>` in [`config::Settings`]).

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::v1::agent_server::AgentServer;
use tokio_util::sync::CancellationToken;

pub mod config;
pub mod datastore;
pub mod job;
pub mod jobs;
pub mod pipeline;
pub mod service;
pub mod wal;

/// How long the agent gives its jobs to stop once `shutdown` is cancelled (SIGTERM or
/// SIGINT), on top of which the process takes about a second to end: a job still running
/// then is dropped, its tools killed ([`run`]).
pub const STOP_GRACE: Duration = Duration::from_secs(8);

/// Serves the agent until `shutdown` is cancelled, then stops: the gRPC server takes no
/// new order, the running jobs are cancelled ([`jobs::JobRunner::stop`]: their tools end,
/// an upload's partial file is removed or left hidden, each reports that the agent
/// stopped) and awaited, the server answering their watchers until they end. Returns once
/// all have ended, or after [`STOP_GRACE`] with a warning naming the jobs still running:
/// the caller ends the process then, which drops them and kills their tools. A staging
/// agent first puts right the leftovers of interrupted restores of its datastores
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
    // WAL shipping runs beside the jobs, until the shutdown; a socket that cannot be
    // created stops the agent (PostgreSQL would fail every push).
    let _wal = match &settings.wal {
        Some(w) => {
            let listener =
                wal::bind(w).with_context(|| format!("[wal] socket {}", w.socket.display()))?;
            let served = wal::serve(settings.clone(), listener, shutdown.clone());
            Some(AbortOnDrop(tokio::spawn(served)))
        }
        None => None,
    };
    // Oplog slices likewise, one task per MongoDB datastore with `oplog_slice_seconds`;
    // a state directory that cannot be made stops the agent (no slice could be chained).
    let mut _oplog = Vec::new();
    if settings.role == ferry_proto::Role::Production {
        for ds in settings.datastores.values() {
            if let Some((mongo, seconds)) = ds.oplog_slices() {
                make_state_dir(&settings.state_dir)
                    .with_context(|| format!("state_dir {}", settings.state_dir.display()))?;
                let shipper =
                    datastore::mongodb::slices::Shipper::new(settings.clone(), mongo, seconds);
                _oplog.push(AbortOnDrop(tokio::spawn(shipper.run(shutdown.clone()))));
            }
        }
    }
    let runner = jobs::JobRunner::new(settings.clone(), shutdown.clone());
    // Orders are a few hundred bytes and answers small: a larger message either way is
    // refused (`OutOfRange`) before a handler runs or anything is sent.
    let service = AgentServer::new(service::AgentService::new(runner.clone()))
        .max_decoding_message_size(ferry_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(ferry_proto::MAX_MESSAGE_BYTES);
    tracing::info!(agent = %settings.id, role = %settings.role, environment = %settings.environment,
        %listen, datastores = settings.datastores.len(), "Agent serving.");
    let server = tonic::transport::Server::builder()
        .tls_config(tls)
        .context("TLS configuration (check [tls] cert, key and ca)")?
        .add_service(service)
        .serve_with_shutdown(listen, shutdown.clone().cancelled_owned());
    // The server's graceful end waits for the jobs' event streams, which end with the
    // jobs: both are awaited together, within the grace.
    let stopped = async {
        let (served, ()) = tokio::join!(
            async {
                let served = server.await;
                // A server that failed (its address taken) stops the jobs too.
                shutdown.cancel();
                served
            },
            async {
                shutdown.cancelled().await;
                runner.stop().await;
            }
        );
        served.with_context(|| format!("serving gRPC on {listen}"))
    };
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(STOP_GRACE).await;
    };
    tokio::select! {
        stopped = stopped => {
            tracing::info!("Agent stopped.");
            stopped
        }
        () = deadline => {
            tracing::warn!(jobs = %runner.running_jobs().join(","), grace_seconds = STOP_GRACE.as_secs(),
                "Jobs still running after the stop grace: the agent ends them as it exits (their tools are killed; a partial file stays hidden).");
            Ok(())
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Creates `dir` with mode 0700 when missing.
fn make_state_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}
