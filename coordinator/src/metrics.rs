//! Prometheus metrics on `GET /metrics` (text exposition format 0.0.4, written by
//! `prometheus-client`; <https://prometheus.io/docs/instrumenting/exposition_formats/>),
//! served over plain HTTP on `metrics_listen` when it is configured. Bind it to an address
//! only the Prometheus server reaches: it names hosts, datastores and sizes.
//!
//! Series (labels `environment`, `agent`, `datastore`; `kind` is `backup`, `restore` or
//! `verify`), one per kind that ever finished on the datastore, so a verify never hides
//! the last restore drill:
//! - `ferry_last_success_timestamp_seconds`: when the newest succeeded job of that kind
//!   finished (UTC).
//! - `ferry_last_success_duration_seconds`: how long it ran on the agent (for a staging
//!   restore, the restore time objective measured).
//! - `ferry_last_success_stored_bytes`: its stored size.
//! - `ferry_last_job_succeeded`: 1 if the newest job of that kind that finished succeeded,
//!   0 if it failed (absent before the first; a running or cancelled job changes nothing).
//! - `ferry_last_restore_rpo_seconds` (`kind="restore"` only): the recovery point of the
//!   newest succeeded restore: how old the restored backup was when the restore finished
//!   (the restore's end minus the backup's end), seconds.
//! - `ferry_backup_set_complete{environment}`: 1 if the newest backup set of a production
//!   environment is complete, 0 if a member is missing.
//! - `ferry_last_complete_set_timestamp_seconds{environment}`: the end of the newest
//!   complete set's last member backup (what a restore drill would take).
//! - `ferry_jobs_total{kind, outcome}`: jobs finished since the coordinator started.
//!
//! The per-datastore series are read from the store at each scrape (two point lookups per
//! datastore), so they survive a restart; the counter counts from the start.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::dispatch::Coordinator;
use crate::model::{Job, JobKind, JobState};

/// Labels of the per-datastore series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DatastoreLabels {
    environment: String,
    agent: String,
    datastore: String,
    kind: String,
}

/// Labels of the per-environment set series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EnvironmentLabels {
    environment: String,
}

/// Labels of `ferry_jobs_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    /// `backup`, `restore` or `verify`.
    pub kind: String,
    /// `succeeded` or `failed`.
    pub outcome: String,
}

/// The coordinator's counters (kept for the process's life).
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// Jobs finished, by kind and outcome.
    pub jobs: Family<JobLabels, Counter>,
}

impl Counters {
    /// Counts a job that reached a final state.
    pub fn job_finished(&self, job: &Job) {
        let outcome = match job.state {
            JobState::Succeeded => "succeeded",
            _ => "failed",
        };
        self.jobs
            .get_or_create(&JobLabels {
                kind: job.kind.to_string(),
                outcome: outcome.into(),
            })
            .inc();
    }
}

/// Renders the metrics text for one scrape.
///
/// # Errors
/// The store cannot be read.
pub async fn render(c: &Arc<Coordinator>) -> Result<String, String> {
    let states = c.datastore_states().await.map_err(|e| e.to_string())?;
    let last_success =
        Family::<DatastoreLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let duration = Family::<DatastoreLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let stored = Family::<DatastoreLabels, Gauge>::default();
    let succeeded = Family::<DatastoreLabels, Gauge>::default();
    let rpo = Family::<DatastoreLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for (agent, datastore, latest) in &states {
        for (kind, jobs) in &latest.by_kind {
            let l = DatastoreLabels {
                environment: agent.environment.clone(),
                agent: agent.id.clone(),
                datastore: datastore.clone(),
                kind: kind.to_string(),
            };
            if let Some(job) = &jobs.last_success {
                let finished_ms = job.finished_ms.unwrap_or_default();
                last_success
                    .get_or_create(&l)
                    .set(finished_ms as f64 / 1000.0);
                if let Some(r) = &job.result {
                    duration
                        .get_or_create(&l)
                        .set(r.duration_ms as f64 / 1000.0);
                    stored
                        .get_or_create(&l)
                        .set(i64::try_from(r.size_bytes).unwrap_or(i64::MAX));
                    if *kind == JobKind::Restore
                        && let Some((_, rpo_ms)) = r.rto_rpo_ms(finished_ms)
                    {
                        rpo.get_or_create(&l).set(rpo_ms as f64 / 1000.0);
                    }
                }
            }
            if let Some(job) = &jobs.last_outcome {
                succeeded
                    .get_or_create(&l)
                    .set(i64::from(job.state == JobState::Succeeded));
            }
        }
    }
    let set_complete = Family::<EnvironmentLabels, Gauge>::default();
    let complete_at =
        Family::<EnvironmentLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let all_sets = c.sets(None).await.map_err(|e| e.to_string())?;
    for env in c.production_environments() {
        let sets: Vec<_> = all_sets.iter().filter(|s| s.environment == env).collect();
        let l = EnvironmentLabels { environment: env };
        if let Some(newest) = sets.first() {
            set_complete
                .get_or_create(&l)
                .set(i64::from(newest.complete()));
        }
        if let Some(done) = sets.iter().find(|s| s.complete()) {
            let end = done
                .members
                .iter()
                .filter_map(|m| m.backup.as_ref().map(|b| b.finished_ms))
                .max()
                .unwrap_or_default();
            complete_at.get_or_create(&l).set(end as f64 / 1000.0);
        }
    }
    let mut registry = Registry::with_prefix("ferry");
    registry.register(
        "backup_set_complete",
        "1 if the newest backup set of an environment is complete, 0 if a member is missing",
        set_complete,
    );
    registry.register(
        "last_complete_set_timestamp_seconds",
        "When the newest complete backup set's last member finished, seconds since the epoch",
        complete_at,
    );
    registry.register(
        "last_success_timestamp_seconds",
        "When the newest succeeded job of a datastore finished, seconds since the epoch (UTC)",
        last_success,
    );
    registry.register(
        "last_success_duration_seconds",
        "How long the newest succeeded job ran on its agent, seconds",
        duration,
    );
    registry.register(
        "last_success_stored_bytes",
        "Stored size of the newest succeeded job's backup, bytes",
        stored,
    );
    registry.register(
        "last_job_succeeded",
        "1 if the newest finished job of a datastore succeeded, 0 if it failed",
        succeeded,
    );
    registry.register(
        "last_restore_rpo_seconds",
        "Age of the backup restored by the newest succeeded restore when it finished (restore end minus backup end), seconds",
        rpo,
    );
    registry.register(
        "jobs",
        "Jobs finished since the coordinator started, by kind and outcome",
        c.counters.jobs.clone(),
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
///
/// # Errors
/// Accepting connections failed.
pub async fn serve(
    c: Arc<Coordinator>,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let c = c.clone();
            async move {
                match render(&c).await {
                    Ok(text) => (
                        StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                        .into_response(),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
                }
            }
        }),
    );
    if let Ok(listen) = listener.local_addr() {
        tracing::info!(%listen, "Metrics serving on /metrics.");
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
