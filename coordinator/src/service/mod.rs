//! The `ferry.v1.Coordinator` gRPC service used by the `ferry` CLI: thin handlers that
//! validate, convert and delegate to [`Coordinator`], whose errors become a status in one
//! place (`From<Error> for Status` below).
//!
//! Modules:
//! - [`convert`]: domain types to `ferry.v1` messages and back.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ferry_core::Bounded;
use ferry_proto::v1;
use ferry_proto::v1::coordinator_server;
use futures::Stream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::Error;
use crate::catalog::prune::PruneError;
use crate::dispatch::{Coordinator, DispatchError, Selection};
use crate::model::JobKind;

pub mod convert;

/// The gRPC service.
pub struct CoordinatorService {
    coordinator: Arc<Coordinator>,
}

impl CoordinatorService {
    /// Serves `coordinator`.
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        Self { coordinator }
    }
}

/// The one mapping of the coordinator's errors to gRPC statuses: a refusal by its cause
/// (`PermissionDenied`, `InvalidArgument`, `NotFound`, `FailedPrecondition`), an agent or
/// the backup server away `Unavailable`, the store `Internal`.
impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let message = e.to_string();
        match e {
            Error::Access(_) | Error::Dispatch(DispatchError::PermissionDenied(_)) => {
                Status::permission_denied(message)
            }
            Error::Dispatch(DispatchError::InvalidArgument(_)) => Status::invalid_argument(message),
            Error::Dispatch(DispatchError::NotFound(_)) => Status::not_found(message),
            Error::Dispatch(DispatchError::Unavailable(_) | DispatchError::ShuttingDown)
            | Error::Prune(PruneError::Target { .. } | PruneError::Task(_)) => {
                Status::unavailable(message)
            }
            Error::Prune(PruneError::Refused(_)) => Status::failed_precondition(message),
            Error::Dispatch(DispatchError::Store(_))
            | Error::Prune(PruneError::Store(_))
            | Error::Store(_) => Status::internal(message),
        }
    }
}

/// `e` as a status ([`From<Error> for Status`](Error)).
fn status(e: impl Into<Error>) -> Status {
    e.into().into()
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
        let jobs = self.coordinator.jobs(limit).await.map_err(status)?;
        Ok(Response::new(v1::ListJobsResponse {
            jobs: jobs.iter().map(Into::into).collect(),
        }))
    }

    async fn get_job(
        &self,
        request: Request<v1::GetJobRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        let job = self
            .coordinator
            .job(&request.into_inner().id)
            .await
            .map_err(status)?;
        Ok(Response::new((&job).into()))
    }

    async fn watch_job(
        &self,
        request: Request<v1::GetJobRequest>,
    ) -> Result<Response<JobStream>, Status> {
        let first = self
            .coordinator
            .job(&request.into_inner().id)
            .await
            .map_err(status)?;
        let jobs = self.coordinator.watch(first);
        let stream: JobStream = Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(jobs).map(|job| Ok((&job).into())),
        );
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
            .await
            .map_err(status)?;
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
        let selection = Selection {
            date: opt(&r.date),
            namespaces: &r.namespaces,
            backup_type: None,
            occurrence: None,
            all_or_nothing: r.all_or_nothing,
            from: opt(&r.from),
            to_time_ms: (r.to_time_unix_ms != 0).then_some(r.to_time_unix_ms),
        };
        let job_ids = self
            .coordinator
            .trigger_restores(
                kind,
                (opt(&r.environment), &r.agent, opt(&r.datastore)),
                &selection,
                &who,
            )
            .await
            .map_err(status)?;
        Ok(Response::new(v1::TriggerResponse { job_ids }))
    }

    async fn list_audit(
        &self,
        request: Request<v1::ListAuditRequest>,
    ) -> Result<Response<v1::ListAuditResponse>, Status> {
        let limit = request.into_inner().limit;
        let limit = (limit > 0).then_some(limit as usize);
        let entries = self.coordinator.audit_log(limit).await.map_err(status)?;
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
        let outcome =
            crate::catalog::prune::run(&self.coordinator, &who, opt(&r.environment), r.dry_run)
                .await
                .map_err(status)?;
        Ok(Response::new(outcome.into()))
    }

    async fn list_sets(
        &self,
        request: Request<v1::ListSetsRequest>,
    ) -> Result<Response<v1::ListSetsResponse>, Status> {
        let env = request.into_inner().environment;
        let sets = self.coordinator.sets(opt(&env)).await.map_err(status)?;
        Ok(Response::new(v1::ListSetsResponse {
            sets: sets.iter().map(Into::into).collect(),
        }))
    }

    async fn list_backups(
        &self,
        request: Request<v1::ListBackupsRequest>,
    ) -> Result<Response<v1::ListBackupsResponse>, Status> {
        let env = request.into_inner().environment;
        let backups = self.coordinator.backups(opt(&env)).await.map_err(status)?;
        Ok(Response::new(v1::ListBackupsResponse {
            backups: backups.iter().map(Into::into).collect(),
        }))
    }

    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let c = &self.coordinator;
        let states = c.datastore_states().await.map_err(status)?;
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
        let now_unix_ms = ferry_proto::now_unix_ms();
        let copies = c
            .copy_status(now_unix_ms)
            .await
            .map_err(status)?
            .into_iter()
            .map(|s| v1::CopyStatus {
                environment: s.environment,
                target: s.target,
                lacking: s.lacking,
                lag_seconds: s.lag_seconds,
                last_copy_unix_ms: s.progress.last_copy_ms.unwrap_or(0),
                last_error: s.progress.last_error.unwrap_or_default(),
            })
            .collect();
        let archives = c
            .archive_status()
            .into_iter()
            .map(|a| v1::ArchiveStatus {
                lag_seconds: a.lag_seconds(now_unix_ms),
                environment: a.environment,
                datastore: a.datastore,
                newest_file: a.newest_file,
                pushed_unix_ms: a.pushed_ms,
                last_error: a.error.unwrap_or_default(),
                kind: a.kind.to_owned(),
                gap_since_unix_ms: a.gap_since_ms.unwrap_or(0),
            })
            .collect();
        let unopenable_backups = c
            .keys()
            .await
            .map_err(status)?
            .unopenable_by_environment()
            .into_iter()
            .collect();
        Ok(Response::new(v1::StatusResponse {
            datastores,
            now_unix_ms,
            copies,
            archives,
            unopenable_backups,
        }))
    }

    async fn list_keys(
        &self,
        _: Request<v1::ListKeysRequest>,
    ) -> Result<Response<v1::ListKeysResponse>, Status> {
        let r = self.coordinator.keys().await.map_err(status)?;
        Ok(Response::new(v1::ListKeysResponse {
            keys: r
                .keys
                .into_iter()
                .map(|k| v1::KeyUse {
                    fingerprint: k.fingerprint,
                    backups: k.backups,
                    oldest_unix_ms: k.oldest_ms,
                    newest_unix_ms: k.newest_ms,
                    staging_agents: k.staging_agents,
                })
                .collect(),
            unopenable: r.unopenable.iter().map(Into::into).collect(),
            unknown: r.unknown,
            undescribed_agents: r.undescribed,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_job_id_that_is_no_ulid_is_invalid_and_an_unknown_one_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let c = crate::dispatch::test_coordinator(dir.path(), &[], Duration::from_secs(1));
        let service = CoordinatorService::new(c);
        let ask = |id: &str| {
            coordinator_server::Coordinator::get_job(
                &service,
                Request::new(v1::GetJobRequest { id: id.into() }),
            )
        };
        let bad = ask("../etc").await.unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert_eq!(bad.message(), "job id \"../etc\" is not a ULID");
        let id = ulid::Ulid::new().to_string();
        let unknown = ask(&id).await.unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);
        assert_eq!(unknown.message(), format!("no job {id}"));
    }

    #[test]
    fn each_error_has_its_status_code() {
        use tonic::Code;
        let code = |e: Error| Status::from(e).code();
        let refused = |m: &str| DispatchError::PermissionDenied(m.into());
        assert_eq!(code(refused("x").into()), Code::PermissionDenied);
        assert_eq!(code(DispatchError::ShuttingDown.into()), Code::Unavailable);
        assert_eq!(
            code(PruneError::Refused("no policy".into()).into()),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(
                PruneError::Target {
                    doing: "removing production/2026-02-05".into(),
                    source: ferry_storage::TargetError::Connect {
                        addr: "backup:22".into(),
                        message: "gone".into(),
                    },
                    after: "",
                }
                .into()
            ),
            Code::Unavailable
        );
        let access = crate::access::Access::default()
            .check(Some("bob"), "/ferry.v1.Coordinator/Status")
            .unwrap_err();
        assert_eq!(code(access.into()), Code::PermissionDenied);
    }
}
