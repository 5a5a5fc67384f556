//! What Ferry reports after faults (issue 15, "Losses that go unnoticed" and "Reports and
//! metrics that say otherwise"), end to end on real PostgreSQL, sshd and the real binaries:
//! - `ferry agents` shows an agent killed a moment ago as unreachable, and when each agent
//!   was last reached.

use std::time::{Duration, Instant};

use ferry_tests::*;

/// `ferry agents --output json`'s entry for `id`.
fn agent_entry(d: &Deployment, id: &str) -> serde_json::Value {
    let agents = d.ferry_json(&["agents"]);
    agents
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == id)
        .unwrap_or_else(|| panic!("no agent {id}: {agents}"))
        .clone()
}

#[test]
fn ferry_agents_shows_a_killed_agent_unreachable_at_once_and_when_it_was_last_reached() {
    let mut d = Deployment::start();
    let stage = agent_entry(&d, "pg-stage");
    assert_eq!(stage["reachable"], true, "{stage}");
    let age = stage["last_reached_age_seconds"].as_f64().unwrap();
    assert!((0.0..30.0).contains(&age), "{stage}");
    let human = d.ferry_ok(&["agents"]);
    assert!(
        human.contains("LAST REACHED") && human.contains(" ago"),
        "{human}"
    );

    d.kill("agent-stage");
    let killed = Instant::now();
    // Past the 2 s a listing trusts an earlier call: the next `ferry agents` calls again.
    std::thread::sleep(Duration::from_millis(2_100));
    let stage = agent_entry(&d, "pg-stage");
    assert!(killed.elapsed() < Duration::from_secs(10));
    assert_eq!(stage["reachable"], false, "{stage}");
    assert!(
        stage["problem"].as_str().unwrap().contains("pg-stage"),
        "{stage}"
    );
    // When it was last reached is still shown: before the kill.
    let age = stage["last_reached_age_seconds"].as_f64().unwrap();
    assert!(age >= 2.0, "{stage}");
    assert_eq!(agent_entry(&d, "pg-prod")["reachable"], true);
}
