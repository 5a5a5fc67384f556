//! The `ferry.v1.Agent` gRPC service: thin handlers that validate, convert and hand the
//! order to the [`JobRunner`].

use std::pin::Pin;
use std::sync::Arc;

use ferry_core::Bounded;
use ferry_proto::v1;
use ferry_proto::v1::agent_server::Agent;
use futures::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status};

use crate::job::JobError;
use crate::jobs::{self, JobRunner, JobUpdate, OrderKind, Updates};

/// The gRPC service.
pub struct AgentService {
    runner: Arc<JobRunner>,
}

impl AgentService {
    /// Serves orders through `runner`.
    pub fn new(runner: Arc<JobRunner>) -> Self {
        Self { runner }
    }

    /// Takes requests only from the certificate names in `tls.allowed_clients` (the
    /// coordinator): an operator's or another agent's certificate, though signed by the
    /// fleet CA, is refused, so every order passes the coordinator's checks and audit log.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let allowed = &self.runner.settings().allowed_clients;
        let peer = ferry_proto::tls::peer_name(request);
        match &peer {
            Some(name) if allowed.iter().any(|a| a == name) => Ok(()),
            _ => {
                let who = Bounded(peer.as_deref().unwrap_or("(no name)"));
                tracing::warn!(client = %who, "Request refused: not an allowed client.");
                Err(Status::permission_denied(format!(
                    "agent {} takes orders only from {} (tls.allowed_clients); certificate {who} is not one",
                    self.runner.settings().id,
                    allowed.join(", ")
                )))
            }
        }
    }

    fn start(&self, job_id: &str, datastore: &str, kind: OrderKind) -> Result<EventStream, Status> {
        let order =
            jobs::validate(self.runner.settings(), job_id, datastore, kind).inspect_err(|e| {
                tracing::warn!(job_id = %Bounded(job_id), datastore = %Bounded(datastore),
                    error = %e, "Order refused.");
            })?;
        let job_id = order.job_id.clone();
        let updates = self.runner.start(order).inspect_err(|e| {
            tracing::warn!(job_id, datastore, error = %e, "Order refused.");
        })?;
        Ok(events(job_id, updates))
    }
}

/// The gRPC stream of `updates`, ending right after the final one (finished or failed).
/// The job's broadcast sender outlives the job (later watchers subscribe to it), so the
/// broadcast alone never ends: the stream stops itself, and a client reading to the end
/// returns at once instead of at its deadline. A watcher too slow for the progress ticks
/// misses some; the final update is never missed (see [`JobRunner::watch`]).
fn events(job_id: String, updates: Updates) -> EventStream {
    let live = BroadcastStream::new(updates.live).filter_map(Result::ok);
    let all: Pin<Box<dyn Stream<Item = JobUpdate> + Send>> =
        Box::pin(tokio_stream::iter(updates.first).chain(live));
    let until_final = futures::stream::unfold((all, false), |(mut all, ended)| async move {
        if ended {
            return None;
        }
        let update = all.next().await?;
        let ended = update.is_final();
        Some((update, (all, ended)))
    });
    Box::pin(until_final.map(move |u| Ok(to_event(&job_id, u))))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::JobEvent, Status>> + Send>>;

fn to_event(job_id: &str, update: JobUpdate) -> v1::JobEvent {
    use v1::job_event::Event;
    let event = match update {
        JobUpdate::Accepted { kind } => Event::Accepted(v1::Accepted { kind: kind.into() }),
        JobUpdate::Progress {
            stage,
            bytes_read,
            bytes_written,
            rate,
            streaming,
        } => Event::Progress(v1::Progress {
            stage: stage.into(),
            bytes_read,
            bytes_written,
            rate_bytes_per_second: rate,
            streaming,
        }),
        JobUpdate::Finished { report, duration } => Event::Finished(v1::Finished {
            stored_path: report.stored_path,
            size_bytes: report.size_bytes,
            sha256: report.sha256,
            duration_ms: duration.as_millis() as u64,
            bytes_uncompressed: report.bytes_uncompressed,
            environment: report.environment,
            date: report.date,
            kind: report.kind,
            summary: report.summary,
            data_finished_unix_ms: report.data_finished_ms.unwrap_or(0),
            target: report.target,
            recipient_fingerprints: report.recipient_fingerprints,
        }),
        JobUpdate::Failed(e) => Event::Failed(v1::Failed {
            code: failure_code(&e) as i32,
            retryable: e.retryable(),
            message: e.to_string(),
        }),
    };
    v1::JobEvent {
        job_id: job_id.to_owned(),
        at_unix_ms: ferry_proto::now_unix_ms(),
        event: Some(event),
    }
}

fn failure_code(e: &JobError) -> v1::FailureCode {
    use v1::FailureCode as C;
    match e {
        JobError::PermissionDenied(_) => C::PermissionDenied,
        JobError::InvalidArgument(_) => C::InvalidArgument,
        JobError::NotFound(_) => C::NotFound,
        JobError::Dump { .. } | JobError::EmptyDump(_) => C::DumpFailed,
        JobError::Transport(_) => C::TransportFailed,
        JobError::Integrity(_) | JobError::Manifest(_) => C::Integrity,
        JobError::Restore { .. } => C::RestoreFailed,
        JobError::Cancelled | JobError::Stopped => C::Cancelled,
        JobError::Stage { .. } | JobError::Internal(_) => C::Internal,
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    type RunBackupStream = EventStream;
    type RunRestoreStream = EventStream;
    type WatchJobStream = EventStream;

    async fn describe(
        &self,
        request: Request<v1::DescribeRequest>,
    ) -> Result<Response<v1::DescribeResponse>, Status> {
        self.authorize(&request)?;
        let s = self.runner.settings();
        let mut tools = Vec::new();
        for ds in s.datastores.values() {
            for (name, version) in ds.tool_versions() {
                if !tools.iter().any(|t: &v1::ToolVersion| t.name == name) {
                    tools.push(v1::ToolVersion { name, version });
                }
            }
        }
        Ok(Response::new(v1::DescribeResponse {
            agent_id: s.id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            role: s.role.into(),
            environment: s.environment.clone(),
            source_environment: s.source_environment.clone().unwrap_or_default(),
            identity_fingerprints: match &s.keys {
                crate::config::Keys::Decrypt(d) => d.fingerprints(),
                crate::config::Keys::Encrypt(_) => Vec::new(),
            },
            hostname: s.hostname.clone(),
            datastores: s
                .datastores
                .values()
                .map(|d| v1::DatastoreInfo {
                    name: d.name().into(),
                    kind: d.kind().into(),
                    backup_types: d.backup_types().iter().map(|t| (*t).into()).collect(),
                    namespaces: d.takes_namespaces(),
                    point_in_time: s.point_in_time(&**d),
                })
                .collect(),
            tools,
        }))
    }

    async fn run_backup(
        &self,
        request: Request<v1::RunBackupRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let backup_type = (!r.backup_type.is_empty()).then_some(r.backup_type);
        self.start(&r.job_id, &r.datastore, OrderKind::Backup { backup_type })
            .map(Response::new)
    }

    async fn run_restore(
        &self,
        request: Request<v1::RunRestoreRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        let date = (!r.date.is_empty()).then_some(r.date);
        let file = (!r.file.is_empty()).then_some(r.file);
        let target = (!r.target.is_empty()).then_some(r.target);
        let kind = if r.check_only {
            OrderKind::Check { date, file, target }
        } else if r.verify_only {
            OrderKind::Verify { date, file, target }
        } else {
            OrderKind::Restore {
                date,
                file,
                namespaces: r.namespaces,
                target,
                to_time: match r.to_time_unix_ms {
                    0 => None,
                    ms => Some(chrono::DateTime::from_timestamp_millis(ms).ok_or_else(|| {
                        Status::invalid_argument(format!("to_time_unix_ms {ms} is not an instant"))
                    })?),
                },
            }
        };
        self.start(&r.job_id, &r.datastore, kind).map(Response::new)
    }

    async fn cancel_job(
        &self,
        request: Request<v1::CancelJobRequest>,
    ) -> Result<Response<v1::CancelJobResponse>, Status> {
        self.authorize(&request)?;
        let cancelled = self.runner.cancel(&request.into_inner().job_id);
        Ok(Response::new(v1::CancelJobResponse { cancelled }))
    }

    async fn watch_job(
        &self,
        request: Request<v1::WatchJobRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.authorize(&request)?;
        let job_id = request.into_inner().job_id;
        match self.runner.watch(&job_id) {
            Some(updates) => Ok(Response::new(events(job_id, updates))),
            None => Err(Status::not_found(format!(
                "agent {} does not know job {}: it never ran here, the agent restarted since, \
                 or it is older than the last {} jobs",
                self.runner.settings().id,
                Bounded(&job_id),
                jobs::REMEMBERED_JOBS
            ))),
        }
    }
}
