//! The inventory's agents: mTLS channels to them, and what each last said of itself in
//! `Describe`, checked against the inventory (id, role, environment). An agent that
//! does not match is reported and never sent an order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::Role;
use ferry_proto::status::describe_status;
use ferry_proto::tls::TlsFiles;
use ferry_proto::v1;
use ferry_proto::v1::agent_client::AgentClient;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Channel, Endpoint};

use crate::config::Agent;

/// What the coordinator knows of one agent.
#[derive(Clone, Debug, Default)]
pub struct AgentState {
    /// The last `Describe` answer, if any.
    pub described: Option<v1::DescribeResponse>,
    /// Why the agent is unusable (unreachable, or not what the inventory says); `None`
    /// when the last call answered and its last `Describe` matched.
    pub problem: Option<String>,
    /// When a call last reached the agent (a `Describe` answered, an order taken, a job
    /// event received), UTC ms; `None` if never since the coordinator started.
    pub last_reached_ms: Option<i64>,
    /// When the coordinator last called the agent or heard from it (reached or not), UTC
    /// ms.
    pub last_checked_ms: Option<i64>,
    /// The agent answered its last `Describe` but not as the inventory says: `problem`
    /// says how, and only a matching `Describe` clears it.
    pub mismatch: bool,
}

/// Channels to the inventory's agents and their last known state.
pub struct AgentPool {
    agents: std::collections::BTreeMap<String, Agent>,
    tls: TlsFiles,
    channels: Mutex<HashMap<String, Channel>>,
    states: Mutex<HashMap<String, AgentState>>,
    timeout: Duration,
    /// Cancelled at shutdown: calls in the background give up.
    shutdown: CancellationToken,
    /// The coordinator's tasks, which the background calls join.
    tasks: TaskTracker,
}

/// Why an agent cannot be used: not in the inventory, no channel to it, no answer, or an
/// answer that does not match the inventory.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The id is not in the inventory (`[[agents]]`).
    #[error("agent {0:?} is not in the inventory")]
    NotInInventory(String),
    /// The TLS files for the channel are unusable.
    #[error(transparent)]
    TlsFiles(#[from] ferry_proto::tls::TlsError),
    /// The inventory's address is not a usable URL.
    #[error("agent {id}: address {address:?}: {source}")]
    Address {
        /// Agent id.
        id: String,
        /// The address as configured.
        address: String,
        /// tonic's error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The channel's TLS could not be set up.
    #[error("agent {id}: TLS: {source}")]
    Tls {
        /// Agent id.
        id: String,
        /// tonic's error.
        #[source]
        source: tonic::transport::Error,
    },
    /// `Describe` got no answer within the agent timeout.
    #[error("agent {id} at {address} did not answer within {timeout:?}")]
    Timeout {
        /// Agent id.
        id: String,
        /// Its address.
        address: String,
        /// How long the coordinator waited.
        timeout: Duration,
    },
    /// `Describe` failed (unreachable, refused).
    #[error("agent {id} at {address}: {}", describe_status(status))]
    Call {
        /// Agent id.
        id: String,
        /// Its address.
        address: String,
        /// The call's status.
        status: tonic::Status,
    },
    /// The agent at the address says it is another agent.
    #[error("the agent at {address} says it is {says:?}, the inventory expects {expected:?}")]
    OtherAgent {
        /// The address called.
        address: String,
        /// The id it gave.
        says: String,
        /// The inventory's id.
        expected: String,
    },
    /// The agent's role is not the inventory's.
    #[error(
        "agent {id} says its role is {says}, the inventory says {expected}; no order is sent to it until they agree"
    )]
    OtherRole {
        /// Agent id.
        id: String,
        /// The role it gave.
        says: Role,
        /// The inventory's role.
        expected: Role,
    },
    /// The agent gave a role this coordinator does not know.
    #[error("agent {id}: {message}")]
    UnknownRole {
        /// Agent id.
        id: String,
        /// What is wrong with the role.
        message: String,
    },
    /// The agent's environment is not the inventory's.
    #[error("agent {id} says its environment is {says:?}, the inventory says {expected:?}")]
    OtherEnvironment {
        /// Agent id.
        id: String,
        /// The environment it gave.
        says: String,
        /// The inventory's environment.
        expected: String,
    },
}

impl AgentError {
    /// Whether waiting may help: `false` when the agent is not in the inventory or does not
    /// match it (only a config change fixes that), `true` otherwise.
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            AgentError::NotInInventory(_)
                | AgentError::OtherAgent { .. }
                | AgentError::OtherRole { .. }
                | AgentError::OtherEnvironment { .. }
        )
    }
}

/// Checks a `Describe` answer against the inventory entry.
///
/// # Errors
/// What differs ([`AgentError::OtherAgent`], [`AgentError::OtherRole`],
/// [`AgentError::UnknownRole`], [`AgentError::OtherEnvironment`]), in words an operator
/// can act on.
pub fn check_description(agent: &Agent, d: &v1::DescribeResponse) -> Result<(), AgentError> {
    if d.agent_id != agent.id {
        return Err(AgentError::OtherAgent {
            address: agent.address.clone(),
            says: d.agent_id.clone(),
            expected: agent.id.clone(),
        });
    }
    match Role::try_from(d.role) {
        Ok(role) if role == agent.role => {}
        Ok(role) => {
            return Err(AgentError::OtherRole {
                id: agent.id.clone(),
                says: role,
                expected: agent.role,
            });
        }
        Err(e) => {
            return Err(AgentError::UnknownRole {
                id: agent.id.clone(),
                message: e.to_string(),
            });
        }
    }
    if d.environment != agent.environment {
        return Err(AgentError::OtherEnvironment {
            id: agent.id.clone(),
            says: d.environment.clone(),
            expected: agent.environment.clone(),
        });
    }
    Ok(())
}

impl AgentPool {
    /// A pool for `agents`, connecting with `tls`; calls that wait on an agent time out
    /// after `timeout`. Calls it makes in the background run on `tasks` and give up when
    /// `shutdown` is cancelled.
    pub fn new(
        agents: std::collections::BTreeMap<String, Agent>,
        tls: TlsFiles,
        timeout: Duration,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Arc<Self> {
        Arc::new(Self {
            agents,
            tls,
            channels: Mutex::new(HashMap::new()),
            states: Mutex::new(HashMap::new()),
            timeout,
            shutdown,
            tasks,
        })
    }

    /// The inventory entry of `id`.
    pub fn get(&self, id: &str) -> Option<&Agent> {
        self.agents.get(id)
    }

    /// Every inventory entry, by id.
    pub fn all(&self) -> impl Iterator<Item = &Agent> {
        self.agents.values()
    }

    /// A client for agent `id` (the channel connects lazily and is reused).
    ///
    /// # Errors
    /// [`AgentError::NotInInventory`], [`AgentError::TlsFiles`], [`AgentError::Address`]
    /// or [`AgentError::Tls`].
    pub fn client(&self, id: &str) -> Result<AgentClient<Channel>, AgentError> {
        let agent = self
            .agents
            .get(id)
            .ok_or_else(|| AgentError::NotInInventory(id.to_owned()))?;
        let mut channels = self.channels.lock().expect("channels lock");
        let channel = match channels.get(id) {
            Some(c) => c.clone(),
            None => {
                let tls = self.tls.client_config(&agent.id)?;
                let c = Endpoint::from_shared(agent.address.clone())
                    .map_err(|source| AgentError::Address {
                        id: id.to_owned(),
                        address: agent.address.clone(),
                        source,
                    })?
                    .tls_config(tls)
                    .map_err(|source| AgentError::Tls {
                        id: id.to_owned(),
                        source,
                    })?
                    .connect_timeout(Duration::from_secs(10))
                    .tcp_keepalive(Some(Duration::from_secs(30)))
                    .http2_keep_alive_interval(Duration::from_secs(15))
                    .keep_alive_timeout(self.timeout)
                    .connect_lazy();
                channels.insert(id.to_owned(), c.clone());
                c
            }
        };
        Ok(AgentClient::new(channel)
            .max_decoding_message_size(ferry_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(ferry_proto::MAX_MESSAGE_BYTES))
    }

    /// Asks agent `id` to describe itself, checks the answer against the inventory and
    /// records the result.
    ///
    /// # Errors
    /// The problem: unreachable ([`AgentError::Timeout`], [`AgentError::Call`]), no
    /// channel, or not matching the inventory ([`check_description`]).
    pub async fn describe(&self, id: &str) -> Result<v1::DescribeResponse, AgentError> {
        let mut answered = false;
        let result = async {
            let agent = self
                .agents
                .get(id)
                .ok_or_else(|| AgentError::NotInInventory(id.to_owned()))?;
            let mut client = self.client(id)?;
            let d = tokio::time::timeout(self.timeout, client.describe(v1::DescribeRequest {}))
                .await
                .map_err(|_| AgentError::Timeout {
                    id: id.to_owned(),
                    address: agent.address.clone(),
                    timeout: self.timeout,
                })?
                .map_err(|status| AgentError::Call {
                    id: id.to_owned(),
                    address: agent.address.clone(),
                    status,
                })?
                .into_inner();
            answered = true;
            check_description(agent, &d).map(|()| d)
        }
        .await;
        let now = ferry_proto::now_unix_ms();
        let mut states = self.states.lock().expect("states lock");
        let state = states.entry(id.to_owned()).or_default();
        state.last_checked_ms = Some(now);
        if answered {
            state.last_reached_ms = Some(now);
        }
        state.mismatch = answered && result.is_err();
        match &result {
            Ok(d) => {
                state.described = Some(d.clone());
                state.problem = None;
            }
            Err(p) => {
                tracing::warn!(agent = id, problem = %p, "Agent unusable.");
                state.problem = Some(p.to_string());
            }
        }
        result
    }

    /// Records that a call other than `Describe` reached agent `id` now (an order taken, a
    /// job event received): it is reachable, unless its last `Describe` did not match the
    /// inventory.
    pub fn reached(&self, id: &str) {
        let now = ferry_proto::now_unix_ms();
        let mut states = self.states.lock().expect("states lock");
        let state = states.entry(id.to_owned()).or_default();
        state.last_reached_ms = Some(now);
        state.last_checked_ms = Some(now);
        if state.described.is_some() && !state.mismatch {
            state.problem = None;
        }
    }

    /// Records that a call to agent `id` failed now for want of the agent (a broken
    /// stream, a refused connection, no answer in time): it shows unreachable with
    /// `problem` until a call reaches it again.
    pub fn unreachable(&self, id: &str, problem: &str) {
        let now = ferry_proto::now_unix_ms();
        let mut states = self.states.lock().expect("states lock");
        let state = states.entry(id.to_owned()).or_default();
        state.last_checked_ms = Some(now);
        if !state.mismatch {
            tracing::warn!(agent = id, problem, "Agent unreachable.");
            state.problem = Some(problem.to_owned());
        }
    }

    /// Describes, at once, every agent not checked within `fresh`, and waits at most
    /// `budget` for the answers (those still pending finish in the background and are
    /// recorded then): so `ferry agents` shows an agent killed a moment ago as
    /// unreachable, and a slow agent never holds the listing for long.
    pub async fn refresh_stale(self: &Arc<Self>, fresh: Duration, budget: Duration) {
        let now = ferry_proto::now_unix_ms();
        let fresh_ms = i64::try_from(fresh.as_millis()).unwrap_or(i64::MAX);
        let stale: Vec<String> = self
            .agents
            .keys()
            .filter(|id| {
                self.state(id)
                    .last_checked_ms
                    .is_none_or(|t| now.saturating_sub(t) >= fresh_ms)
            })
            .cloned()
            .collect();
        let calls: Vec<_> = stale
            .into_iter()
            .map(|id| {
                let pool = self.clone();
                self.tasks.spawn(async move {
                    tokio::select! {
                        _ = pool.describe(&id) => {}
                        _ = pool.shutdown.cancelled() => {}
                    }
                })
            })
            .collect();
        let _ = tokio::time::timeout(budget, futures::future::join_all(calls)).await;
    }

    /// The last known state of `id`.
    pub fn state(&self, id: &str) -> AgentState {
        self.states
            .lock()
            .expect("states lock")
            .get(id)
            .cloned()
            .unwrap_or_default()
    }

    /// Describes every agent now and then every `every`, until shutdown.
    pub async fn refresh_loop(self: Arc<Self>, every: Duration) {
        loop {
            let ids: Vec<String> = self.agents.keys().cloned().collect();
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = futures::future::join_all(ids.iter().map(|id| self.describe(id))) => {}
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_call_marks_an_agent_unreachable_and_a_call_that_reaches_it_clears_that() {
        let agent = Agent {
            id: "db1".into(),
            address: "https://127.0.0.1:1".into(),
            role: Role::Production,
            environment: "production".into(),
        };
        let pool = AgentPool::new(
            [("db1".to_owned(), agent)].into(),
            TlsFiles {
                cert: "c".into(),
                key: "k".into(),
                ca: "ca".into(),
            },
            Duration::from_secs(1),
            CancellationToken::new(),
            TaskTracker::new(),
        );
        assert_eq!(pool.state("db1").last_reached_ms, None);
        pool.states.lock().unwrap().insert(
            "db1".into(),
            AgentState {
                described: Some(v1::DescribeResponse::default()),
                ..AgentState::default()
            },
        );
        pool.reached("db1");
        let reached = pool.state("db1");
        assert!(reached.problem.is_none() && reached.last_reached_ms.is_some());
        pool.unreachable("db1", "lost agent db1: Unavailable");
        let lost = pool.state("db1");
        assert_eq!(lost.problem.as_deref(), Some("lost agent db1: Unavailable"));
        // When it was last reached stays shown.
        assert_eq!(lost.last_reached_ms, reached.last_reached_ms);
        pool.reached("db1");
        assert!(pool.state("db1").problem.is_none());

        // A mismatch with the inventory is cleared only by a matching Describe.
        pool.states.lock().unwrap().get_mut("db1").unwrap().mismatch = true;
        pool.unreachable("db1", "the agent says it is db2");
        pool.states.lock().unwrap().get_mut("db1").unwrap().problem = Some("mismatch".into());
        pool.reached("db1");
        pool.unreachable("db1", "lost");
        assert_eq!(pool.state("db1").problem.as_deref(), Some("mismatch"));
    }

    #[test]
    fn an_agent_unlike_the_inventory_is_a_lasting_problem_that_says_how() {
        let agent = Agent {
            id: "db1".into(),
            address: "https://127.0.0.1:1".into(),
            role: Role::Production,
            environment: "production".into(),
        };
        let described = |id: &str, role: Role, environment: &str| v1::DescribeResponse {
            agent_id: id.into(),
            role: role.into(),
            environment: environment.into(),
            ..Default::default()
        };
        check_description(&agent, &described("db1", Role::Production, "production")).unwrap();
        for (d, says) in [
            (
                described("db2", Role::Production, "production"),
                "the agent at https://127.0.0.1:1 says it is \"db2\", the inventory expects \"db1\"",
            ),
            (
                described("db1", Role::Staging, "production"),
                "agent db1 says its role is staging, the inventory says production; no order is \
                 sent to it until they agree",
            ),
            (
                described("db1", Role::Production, "staging"),
                "agent db1 says its environment is \"staging\", the inventory says \"production\"",
            ),
        ] {
            let e = check_description(&agent, &d).unwrap_err();
            assert_eq!(e.to_string(), says);
            assert!(!e.is_transient(), "{e}");
        }
        assert!(!AgentError::NotInInventory("db9".into()).is_transient());
        let silent = AgentError::Timeout {
            id: "db1".into(),
            address: agent.address.clone(),
            timeout: Duration::from_secs(1),
        };
        assert!(silent.is_transient());
    }
}
