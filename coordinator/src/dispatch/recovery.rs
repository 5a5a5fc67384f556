//! Recovery after a restart: the jobs a previous coordinator process left queued or
//! running, each agent asked what became of its job, and taken up from there.

use std::sync::Arc;

use ferry_proto::v1;

use super::Coordinator;
use super::runner::Attempt;
use crate::model::{Job, JobState};
use crate::store::blocking;
use ferry_proto::status::describe_status;

impl Coordinator {
    /// Takes up the jobs a previous coordinator process left queued or running: each
    /// agent is asked what became of its job ([`v1::agent_client::AgentClient::watch_job`]).
    /// A job still running is followed again, a finished one is recorded as it ended
    /// (succeeded, or failed and retried as configured), and one the agent does not know
    /// is run again if it was only queued, or counted as a failed attempt (the agent
    /// restarted) if it was running. Returns the number of jobs taken up.
    pub async fn reconcile(self: &Arc<Self>) -> usize {
        let store = self.store.clone();
        let orphans = match blocking(move || store.unfinished_jobs()).await {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(error = %e, "Could not list unfinished jobs.");
                return 0;
            }
        };
        let n = orphans.len();
        for mut job in orphans {
            let this = self.clone();
            if job.all_or_nothing && job.checked_ms.is_none() {
                // Its set was still being checked: no job of it may run unchecked.
                self.spawn(async move {
                    this.fail(
                        &mut job,
                        "not restored (--all-or-nothing): the coordinator restarted while the \
                         set was being checked, so no datastore was touched; order the restore \
                         again"
                            .into(),
                    )
                    .await;
                });
                continue;
            }
            self.spawn(async move {
                // At shutdown the job stays as stored, for the next start.
                let Ok(first) = this.unless_shutdown(this.recover(&mut job)).await else {
                    return;
                };
                this.run(job, first).await;
            });
        }
        n
    }

    /// What became of `job`, a job of a previous coordinator process: the outcome of the
    /// attempt its agent still runs or ran (asked under the stored attempt's id,
    /// [`ferry_proto::attempt::attempt_id`]), or `None` to make a new attempt.
    async fn recover(&self, job: &mut Job) -> Option<Attempt> {
        self.event(
            job,
            format!(
                "The coordinator restarted; asking agent {} about the job.",
                job.agent
            ),
        )
        .await;
        let mut client = match self.agents.client(&job.agent) {
            Ok(c) => c,
            Err(e) => {
                return Some(Attempt::Failed {
                    message: e.to_string(),
                    retryable: false,
                });
            }
        };
        let asked = tokio::time::timeout(
            self.settings.agent_timeout,
            client.watch_job(v1::WatchJobRequest {
                job_id: ferry_proto::attempt::attempt_id(&job.id, job.attempt),
            }),
        )
        .await;
        let stream = match asked {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) if status.code() == tonic::Code::NotFound => {
                if job.state == JobState::Queued {
                    // Never accepted (or waiting for a retry): just go on.
                    return None;
                }
                return Some(Attempt::Failed {
                    message: format!(
                        "agent {} no longer knows the job (it restarted while the coordinator \
                         was down); the attempt's outcome is lost",
                        job.agent
                    ),
                    retryable: true,
                });
            }
            Ok(Err(status)) => {
                return Some(Attempt::Failed {
                    message: format!(
                        "could not ask agent {} about the job after a coordinator restart: {}",
                        job.agent,
                        describe_status(&status)
                    ),
                    retryable: true,
                });
            }
            Err(_) => {
                return Some(Attempt::Failed {
                    message: format!(
                        "agent {} did not answer within {} s after a coordinator restart",
                        job.agent,
                        self.settings.agent_timeout.as_secs()
                    ),
                    retryable: true,
                });
            }
        };
        Some(self.follow(job, &client, stream).await)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::test_job;

    #[tokio::test]
    async fn a_job_being_taken_up_at_shutdown_is_left_as_stored_and_its_task_ends() {
        // An agent that takes the connection and never answers: asking it about the job
        // waits for the agent timeout (a minute) unless the shutdown ends the wait.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = format!("https://{}", silent.local_addr().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let c = super::super::test_coordinator(
            dir.path(),
            &[("db1", ferry_proto::Role::Production, &address)],
            Duration::from_secs(60),
        );
        let job = Job {
            started_ms: Some(2),
            ..test_job(1, "db1", JobState::Running)
        };
        c.store.put_job(&job).unwrap();
        assert_eq!(c.reconcile().await, 1);
        // Cancelled once the agent is being asked.
        let asking = async {
            while c.store.job_events(&job.id).unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), asking)
            .await
            .expect("the job is taken up");
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.shutdown.cancel();
        c.tasks.close();
        tokio::time::timeout(Duration::from_secs(5), c.tasks.wait())
            .await
            .expect("the job's task ends within 5 s of the shutdown");
        assert_eq!(c.store.get_job(&job.id).unwrap(), Some(job.clone()));
        let events = c.store.job_events(&job.id).unwrap();
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(
            events[0].message.contains("asking agent db1 about the job"),
            "{events:?}"
        );
    }
}
