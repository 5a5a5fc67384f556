//! The `ferry.v1.Coordinator` gRPC service used by the `ferry` CLI: thin handlers that
//! validate, convert and delegate to [`Coordinator`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::Bounded;
use ferry_proto::v1;
use ferry_proto::v1::coordinator_server;
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::dispatch::{Coordinator, Selection};
use crate::model::{Job, JobKind};
use crate::store::StoreError;

/// The gRPC service.
pub struct CoordinatorService {
    coordinator: Arc<Coordinator>,
}

impl CoordinatorService {
    /// Serves `coordinator`.
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        Self { coordinator }
    }

    async fn store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn crate::store::Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self.coordinator.store.clone();
        tokio::task::spawn_blocking(move || f(&*store))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("job store: {e}")))
    }

    async fn job(&self, id: &str) -> Result<Job, Status> {
        ulid::Ulid::from_string(id).map_err(|_| {
            Status::invalid_argument(format!("job id {} is not a ULID", Bounded(id)))
        })?;
        let key = id.to_owned();
        self.store(move |s| s.get_job(&key))
            .await?
            .ok_or_else(|| Status::not_found(format!("no job {id}")))
    }
}

/// Who sent `request`: the common name of its client certificate (mTLS is mandatory, so
/// there is one), else its address.
fn peer_name<T>(request: &Request<T>) -> String {
    ferry_proto::tls::peer_name(request).unwrap_or_else(|| {
        request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into())
    })
}

fn opt(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// `ferry agents` describes again every agent not called within this long, and waits at
/// most this long for the answers.
const AGENTS_FRESH: Duration = Duration::from_secs(2);

type JobStream = Pin<Box<dyn Stream<Item = Result<v1::Job, Status>> + Send>>;

#[tonic::async_trait]
impl coordinator_server::Coordinator for CoordinatorService {
    type WatchJobStream = JobStream;

    async fn list_agents(
        &self,
        _: Request<v1::ListAgentsRequest>,
    ) -> Result<Response<v1::ListAgentsResponse>, Status> {
        let pool = &self.coordinator.agents;
        pool.refresh_stale(AGENTS_FRESH, AGENTS_FRESH).await;
        let agents = pool
            .all()
            .map(|a| {
                let state = pool.state(&a.id);
                let d = state.described.unwrap_or_default();
                let problem = match (&state.problem, d.agent_id.is_empty()) {
                    (Some(p), _) => p.clone(),
                    (None, true) => "not described yet".into(),
                    (None, false) => String::new(),
                };
                v1::AgentInfo {
                    id: a.id.clone(),
                    address: a.address.clone(),
                    role: a.role.into(),
                    environment: a.environment.clone(),
                    reachable: problem.is_empty(),
                    problem,
                    version: d.version,
                    hostname: d.hostname,
                    datastores: d.datastores,
                    tools: d.tools,
                    last_reached_unix_ms: state.last_reached_ms.unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(v1::ListAgentsResponse {
            agents,
            now_unix_ms: ferry_proto::now_unix_ms(),
        }))
    }

    async fn list_jobs(
        &self,
        request: Request<v1::ListJobsRequest>,
    ) -> Result<Response<v1::ListJobsResponse>, Status> {
        let limit = match request.into_inner().limit {
            0 => 50,
            n => n.min(10_000) as usize,
        };
        let jobs = self.store(move |s| s.list_jobs(limit)).await?;
        Ok(Response::new(v1::ListJobsResponse {
            jobs: jobs.iter().map(Into::into).collect(),
        }))
    }

    async fn get_job(
        &self,
        request: Request<v1::GetJobRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        let job = self.job(&request.into_inner().id).await?;
        Ok(Response::new((&job).into()))
    }

    async fn watch_job(
        &self,
        request: Request<v1::GetJobRequest>,
    ) -> Result<Response<JobStream>, Status> {
        let id = request.into_inner().id;
        let first = self.job(&id).await?;
        let store = self.coordinator.store.clone();
        let stream = async_stream(first, move |id: String| {
            let store = store.clone();
            async move {
                tokio::task::spawn_blocking(move || store.get_job(&id))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten()
            }
        });
        Ok(Response::new(stream))
    }

    async fn trigger_backup(
        &self,
        request: Request<v1::TriggerBackupRequest>,
    ) -> Result<Response<v1::TriggerResponse>, Status> {
        let who = peer_name(&request);
        let r = request.into_inner();
        tracing::info!(who, agent = %Bounded(&r.agent), datastore = %Bounded(&r.datastore),
            "Backup requested.");
        let job_ids = self
            .coordinator
            .trigger(
                JobKind::Backup,
                &r.agent,
                opt(&r.datastore),
                &Selection {
                    backup_type: opt(&r.backup_type),
                    ..Selection::default()
                },
                &who,
            )
            .await?;
        Ok(Response::new(v1::TriggerResponse { job_ids }))
    }

    async fn trigger_restore(
        &self,
        request: Request<v1::TriggerRestoreRequest>,
    ) -> Result<Response<v1::TriggerResponse>, Status> {
        let who = peer_name(&request);
        let r = request.into_inner();
        tracing::info!(who, agent = %Bounded(&r.agent), datastore = %Bounded(&r.datastore),
            date = %Bounded(&r.date), "Restore requested.");
        let kind = if r.verify_only {
            JobKind::Verify
        } else {
            JobKind::Restore
        };
        let job_ids = self
            .coordinator
            .trigger(
                kind,
                &r.agent,
                opt(&r.datastore),
                &Selection {
                    date: opt(&r.date),
                    namespaces: &r.namespaces,
                    backup_type: None,
                    occurrence: None,
                    all_or_nothing: r.all_or_nothing,
                },
                &who,
            )
            .await?;
        Ok(Response::new(v1::TriggerResponse { job_ids }))
    }

    async fn list_audit(
        &self,
        request: Request<v1::ListAuditRequest>,
    ) -> Result<Response<v1::ListAuditResponse>, Status> {
        let limit = request.into_inner().limit;
        let limit = (limit > 0).then_some(limit as usize);
        let entries = self.store(move |s| s.list_audit(limit)).await?;
        Ok(Response::new(v1::ListAuditResponse {
            entries: entries.into_iter().map(Into::into).collect(),
        }))
    }

    async fn prune(
        &self,
        request: Request<v1::PruneRequest>,
    ) -> Result<Response<v1::PruneResponse>, Status> {
        let who = peer_name(&request);
        let r = request.into_inner();
        let outcome = crate::prune::run(&self.coordinator, &who, opt(&r.environment), r.dry_run)
            .await
            .map_err(|e| match e {
                crate::prune::PruneError::Refused(m) => Status::failed_precondition(m),
                crate::prune::PruneError::Server(m) => Status::unavailable(m),
                crate::prune::PruneError::Dispatch(d) => d.into(),
            })?;
        Ok(Response::new(v1::PruneResponse {
            decisions: outcome
                .decisions
                .into_iter()
                .map(|d| v1::PruneDecision {
                    environment: d.environment,
                    date: d.date,
                    keep: d.keep,
                    backups: d.backups,
                    size_bytes: d.size_bytes,
                    removed: d.removed,
                    leftovers: d
                        .leftovers
                        .into_iter()
                        .map(|l| v1::PruneLeftover {
                            path: l.path,
                            kind: l.kind.into(),
                            size_bytes: l.size_bytes,
                            remove: l.remove,
                            reason: l.reason,
                            removed: l.removed,
                        })
                        .collect(),
                })
                .collect(),
            leftovers_checked: outcome.leftovers_checked,
        }))
    }

    async fn list_sets(
        &self,
        request: Request<v1::ListSetsRequest>,
    ) -> Result<Response<v1::ListSetsResponse>, Status> {
        let env = request.into_inner().environment;
        let sets = self.coordinator.sets(opt(&env)).await?;
        Ok(Response::new(v1::ListSetsResponse {
            sets: sets.iter().map(Into::into).collect(),
        }))
    }

    async fn list_backups(
        &self,
        request: Request<v1::ListBackupsRequest>,
    ) -> Result<Response<v1::ListBackupsResponse>, Status> {
        let env = request.into_inner().environment;
        let backups = self.store(move |s| s.list_backups(opt(&env))).await?;
        Ok(Response::new(v1::ListBackupsResponse {
            backups: backups.iter().map(Into::into).collect(),
        }))
    }

    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let c = &self.coordinator;
        let states = c
            .datastore_states()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let datastores = states
            .into_iter()
            .map(|(a, n, l)| v1::DatastoreStatus {
                environment: a.environment.clone(),
                agent: a.id.clone(),
                next_run_unix_ms: c.next_run(&a.id, &n).unwrap_or_default(),
                datastore: n,
                role: a.role.into(),
                last_success: l.last_success.as_ref().map(Into::into),
                last_job: l.last.as_ref().map(Into::into),
                last_drill: l
                    .by_kind
                    .get(&JobKind::Restore)
                    .and_then(|k| k.last_outcome.as_ref())
                    .map(Into::into),
            })
            .collect();
        Ok(Response::new(v1::StatusResponse {
            datastores,
            now_unix_ms: ferry_proto::now_unix_ms(),
        }))
    }
}

/// A stream of a job's snapshots: the first, then each change (polled from the store),
/// ending after a final state.
fn async_stream<F, Fut>(first: Job, fetch: F) -> JobStream
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<Job>> + Send,
{
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        let mut last = first;
        if tx.send(Ok((&last).into())).await.is_err() || last.state.is_final() {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let Some(job) = fetch(last.id.clone()).await else {
                return;
            };
            if job != last {
                if tx.send(Ok((&job).into())).await.is_err() {
                    return;
                }
                last = job;
            }
            if last.state.is_final() {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
