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
}

/// Checks a `Describe` answer against the inventory entry.
///
/// # Errors
/// What differs, in words an operator can act on.
pub fn check_description(agent: &Agent, d: &v1::DescribeResponse) -> Result<(), String> {
    if d.agent_id != agent.id {
        return Err(format!(
            "the agent at {} says it is {:?}, the inventory expects {:?}",
            agent.address, d.agent_id, agent.id
        ));
    }
    match Role::try_from(d.role) {
        Ok(role) if role == agent.role => {}
        Ok(role) => {
            return Err(format!(
                "agent {} says its role is {role}, the inventory says {}; no order is sent to it until they agree",
                agent.id, agent.role
            ));
        }
        Err(e) => return Err(format!("agent {}: {e}", agent.id)),
    }
    if d.environment != agent.environment {
        return Err(format!(
            "agent {} says its environment is {:?}, the inventory says {:?}",
            agent.id, d.environment, agent.environment
        ));
    }
    Ok(())
}

impl AgentPool {
    /// A pool for `agents`, connecting with `tls`; calls that wait on an agent time out
    /// after `timeout`.
    pub fn new(
        agents: std::collections::BTreeMap<String, Agent>,
        tls: TlsFiles,
        timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            agents,
            tls,
            channels: Mutex::new(HashMap::new()),
            states: Mutex::new(HashMap::new()),
            timeout,
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
    /// Unknown agent, unreadable TLS files, or a malformed address.
    pub fn client(&self, id: &str) -> Result<AgentClient<Channel>, String> {
        let agent = self
            .agents
            .get(id)
            .ok_or_else(|| format!("agent {id:?} is not in the inventory"))?;
        let mut channels = self.channels.lock().expect("channels lock");
        let channel = match channels.get(id) {
            Some(c) => c.clone(),
            None => {
                let tls = self
                    .tls
                    .client_config(&agent.id)
                    .map_err(|e| e.to_string())?;
                let c = Endpoint::from_shared(agent.address.clone())
                    .map_err(|e| format!("agent {id}: address {:?}: {e}", agent.address))?
                    .tls_config(tls)
                    .map_err(|e| format!("agent {id}: TLS: {e}"))?
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
    /// The problem: unreachable, or not matching the inventory.
    pub async fn describe(&self, id: &str) -> Result<v1::DescribeResponse, String> {
        let mut answered = false;
        let result = async {
            let agent = self
                .agents
                .get(id)
                .ok_or_else(|| format!("agent {id:?} is not in the inventory"))?;
            let mut client = self.client(id)?;
            let d = tokio::time::timeout(self.timeout, client.describe(v1::DescribeRequest {}))
                .await
                .map_err(|_| {
                    format!(
                        "agent {id} at {} did not answer within {:?}",
                        agent.address, self.timeout
                    )
                })?
                .map_err(|s| format!("agent {id} at {}: {}", agent.address, describe_status(&s)))?
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
                state.problem = Some(p.clone());
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
                tokio::spawn(async move {
                    let _ = pool.describe(&id).await;
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

    /// Describes every agent now and then every `every`, until `shutdown`.
    pub async fn refresh_loop(
        self: Arc<Self>,
        every: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let ids: Vec<String> = self.agents.keys().cloned().collect();
            futures::future::join_all(ids.iter().map(|id| self.describe(id))).await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
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
}
