//! Who may call what, end to end over real mTLS: every method of the coordinator's and of
//! the agents' gRPC services, called with each kind of certificate a fleet has (an
//! operator of each role, the production and staging agents', the coordinator's own), one
//! from a foreign CA, an expired one and none, checked against a table of what is allowed.
//! Allowed: the call is not refused (it may still fail for its own reasons, e.g. a datastore
//! that does not exist). Refused: `PermissionDenied` naming the certificate and what the
//! call needs, or, for the foreign, expired and missing certificates, a failed TLS session;
//! and nothing of a refused call is left behind (no job, no audit entry, no order).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use ferry_proto::v1;
use ferry_proto::v1::agent_client::AgentClient;
use ferry_proto::v1::coordinator_client::CoordinatorClient;
use ferry_tests::*;
use tonic::transport::Channel;

/// A kind of client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cert {
    /// `[[operators]]` role `viewer`.
    Viewer,
    /// `[[operators]]` role `operator`.
    Operator,
    /// `[[operators]]` role `admin` (the harness's CLI certificate, `operator`).
    Admin,
    /// The production agent's own certificate.
    ProdAgent,
    /// The staging agent's own certificate.
    StageAgent,
    /// The coordinator's own certificate.
    Coordinator,
    /// A certificate named as the admin, signed by another CA.
    Foreign,
    /// A fleet certificate of a viewer's name whose validity ended yesterday.
    Expired,
    /// No client certificate.
    None,
}

const CERTS: [Cert; 9] = [
    Cert::Viewer,
    Cert::Operator,
    Cert::Admin,
    Cert::ProdAgent,
    Cert::StageAgent,
    Cert::Coordinator,
    Cert::Foreign,
    Cert::Expired,
    Cert::None,
];

impl Cert {
    /// The certificate's common name (what a refusal names).
    fn name(self) -> &'static str {
        match self {
            Cert::Viewer => "vera",
            Cert::Operator => "otto",
            Cert::Admin | Cert::Foreign => "operator",
            Cert::ProdAgent => "pg-prod",
            Cert::StageAgent => "pg-stage",
            Cert::Coordinator => "coordinator",
            Cert::Expired => "expired-viewer",
            Cert::None => "",
        }
    }

    /// Refused in the TLS session, before any handler: not signed by the fleet CA, expired,
    /// or absent.
    fn fails_tls(self) -> bool {
        matches!(self, Cert::Foreign | Cert::Expired | Cert::None)
    }

    /// Its `[[operators]]` role, if any.
    fn role(self) -> Option<&'static str> {
        match self {
            Cert::Viewer | Cert::Expired => Some("viewer"),
            Cert::Operator => Some("operator"),
            Cert::Admin => Some("admin"),
            _ => None,
        }
    }
}

/// The least role each method of the Coordinator service needs: the table under test.
const COORDINATOR_METHODS: [(&str, &str); 12] = [
    ("ListAgents", "viewer"),
    ("ListJobs", "viewer"),
    ("GetJob", "viewer"),
    ("WatchJob", "viewer"),
    ("ListBackups", "viewer"),
    ("Status", "viewer"),
    ("ListAudit", "viewer"),
    ("ListSets", "viewer"),
    ("ListKeys", "viewer"),
    ("TriggerBackup", "operator"),
    ("TriggerRestore", "operator"),
    ("Prune", "admin"),
];

fn rank(role: &str) -> u8 {
    match role {
        "viewer" => 1,
        "operator" => 2,
        "admin" => 3,
        other => panic!("no role {other}"),
    }
}

/// Whether `cert` may call a method needing `needed` on the coordinator.
fn coordinator_allows(cert: Cert, needed: &str) -> bool {
    !cert.fails_tls() && cert.role().is_some_and(|r| rank(r) >= rank(needed))
}

/// The deployment, with the certificates of every kind and the operators' roles.
struct Setup {
    d: Deployment,
    foreign: Fleet,
}

impl Setup {
    fn start() -> Setup {
        let d = Deployment::start_with(DEFAULT_DATA, |d| {
            d.coordinator.operators = vec![
                Operator::new("vera", "viewer"),
                Operator::new("otto", "operator"),
                Operator::admin("operator"),
                Operator::new("expired-viewer", "viewer"),
            ];
            d.coordinator.write(&d.coordinator_config);
        });
        d.fleet.issue("vera");
        d.fleet.issue("otto");
        let now = time::OffsetDateTime::now_utc();
        let day = time::Duration::days(1);
        issue_with_validity(&d.fleet, "expired-viewer", now - 30 * day, now - day);
        let foreign = Fleet::new(&d.dir.path().join("foreign"));
        foreign.issue("operator");
        Setup { d, foreign }
    }

    /// A channel to `port` (a server named `server`) presenting `cert`; `Err` if the TLS
    /// handshake or connection fails.
    async fn channel(&self, cert: Cert, port: u16, server: &str) -> Result<Channel, String> {
        let fleet = &self.d.fleet;
        let files: Option<(PathBuf, PathBuf)> = match cert {
            Cert::None => None,
            Cert::Foreign => Some((self.foreign.cert("operator"), self.foreign.key("operator"))),
            other => Some((fleet.cert(other.name()), fleet.key(other.name()))),
        };
        tls_channel(
            files.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
            &fleet.ca(),
            port,
            server,
        )
        .await
    }
}

type Call<'a> = Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send + 'a>>;

/// Calls `method` of the coordinator once through `c`, with a request that is valid for an
/// allowed caller (`job_id`: a job that exists). Streams are read to their end.
fn call_coordinator<'a>(
    c: &'a mut CoordinatorClient<Channel>,
    method: &str,
    job_id: &str,
) -> Call<'a> {
    let job_id = job_id.to_owned();
    match method {
        "ListAgents" => {
            Box::pin(async move { c.list_agents(v1::ListAgentsRequest {}).await.map(drop) })
        }
        "ListJobs" => Box::pin(async move {
            c.list_jobs(v1::ListJobsRequest { limit: 10 })
                .await
                .map(drop)
        }),
        "GetJob" => {
            Box::pin(async move { c.get_job(v1::GetJobRequest { id: job_id }).await.map(drop) })
        }
        "WatchJob" => Box::pin(async move {
            let mut stream = c
                .watch_job(v1::GetJobRequest { id: job_id })
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok(())
        }),
        "ListBackups" => Box::pin(async move {
            c.list_backups(v1::ListBackupsRequest {
                environment: String::new(),
            })
            .await
            .map(drop)
        }),
        "Status" => Box::pin(async move { c.status(v1::StatusRequest {}).await.map(drop) }),
        "ListAudit" => Box::pin(async move {
            c.list_audit(v1::ListAuditRequest { limit: 0 })
                .await
                .map(drop)
        }),
        "ListSets" => Box::pin(async move {
            c.list_sets(v1::ListSetsRequest {
                environment: String::new(),
            })
            .await
            .map(drop)
        }),
        "ListKeys" => Box::pin(async move { c.list_keys(v1::ListKeysRequest {}).await.map(drop) }),
        "TriggerBackup" => Box::pin(async move {
            c.trigger_backup(v1::TriggerBackupRequest {
                agent: "pg-prod".into(),
                datastore: "postgres".into(),
                ..Default::default()
            })
            .await
            .map(drop)
        }),
        "TriggerRestore" => Box::pin(async move {
            c.trigger_restore(v1::TriggerRestoreRequest {
                from: String::new(),
                agent: "pg-stage".into(),
                datastore: "postgres".into(),
                verify_only: true,
                ..Default::default()
            })
            .await
            .map(drop)
        }),
        "Prune" => Box::pin(async move {
            c.prune(v1::PruneRequest {
                environment: "production".into(),
                dry_run: true,
            })
            .await
            .map(drop)
        }),
        other => panic!("no Coordinator method {other} in this test: add it to the table"),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// What one call did: `Ok`, refused by the service, refused in TLS, or failed otherwise.
fn describe(r: &Result<(), tonic::Status>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => format!(
            "{:?}: {} [{}]",
            e.code(),
            e.message(),
            std::error::Error::source(e)
                .map(error_chain)
                .unwrap_or_default(),
        ),
    }
}

#[test]
fn every_coordinator_method_is_open_to_the_operators_whose_role_allows_it_and_no_one_else() {
    let s = Setup::start();
    let d = &s.d;
    // A finished job to get and watch, made by the admin through the CLI.
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    let jobs = d.ferry_json(&["jobs"]);
    let job_id = jobs[0]["id"]
        .as_str()
        .expect("the backup's job id")
        .to_owned();
    let jobs_before = jobs.as_array().unwrap().len();
    let audit_before = d.ferry_json(&["audit"]).as_array().unwrap().len();

    let mut failures = Vec::new();
    runtime().block_on(async {
        // Those refused every trigger first (no role, then viewers), so that the jobs and
        // the audit log can be checked untouched after each.
        let mut order: Vec<Cert> = CERTS.to_vec();
        order.sort_by_key(|c| match c.role() {
            Some(r) if !c.fails_tls() => rank(r),
            _ => 0,
        });
        for cert in order {
            for (method, needed) in COORDINATOR_METHODS {
                // A channel of its own per call: one whose TLS session failed stays failed.
                let channel = s.channel(cert, d.coordinator_port, "coordinator").await;
                let allowed = coordinator_allows(cert, needed);
                let what = format!("{cert:?} ({}) calling {method}", cert.name());
                let result = match &channel {
                    Err(e) => {
                        if !cert.fails_tls() {
                            failures.push(format!("{what}: no connection: {e}"));
                        }
                        continue;
                    }
                    Ok(ch) => {
                        let mut client = CoordinatorClient::new(ch.clone());
                        call_coordinator(&mut client, method, &job_id).await
                    }
                };
                let refusal = result.as_ref().err();
                let problem = if cert.fails_tls() {
                    match refusal {
                        Some(e) if tls_refused(e) => None,
                        _ => Some("expected the TLS session to fail".to_owned()),
                    }
                } else if allowed {
                    match refusal {
                        Some(e)
                            if matches!(
                                e.code(),
                                tonic::Code::PermissionDenied
                                    | tonic::Code::Unauthenticated
                                    | tonic::Code::Unavailable
                            ) || tls_refused(e) =>
                        {
                            Some("expected it allowed".to_owned())
                        }
                        _ => None,
                    }
                } else {
                    match refusal {
                        Some(e)
                            if e.code() == tonic::Code::PermissionDenied
                                && e.message()
                                    .contains(&format!("certificate \"{}\"", cert.name()))
                                && e.message().contains(&format!("the {needed} role"))
                                && e.message().contains(method) =>
                        {
                            None
                        }
                        _ => Some(format!(
                            "expected PermissionDenied naming the certificate and the {needed} role"
                        )),
                    }
                };
                if let Some(p) = problem {
                    failures.push(format!("{what}: {p}; got {}", describe(&result)));
                }
            }
            if !coordinator_allows(cert, "operator") {
                // Every refused trigger left nothing behind.
                let jobs = d.ferry_json(&["jobs"]);
                if jobs.as_array().unwrap().len() != jobs_before {
                    failures.push(format!("after {cert:?}'s calls, jobs changed: {jobs}"));
                }
                let audit = d.ferry_json(&["audit"]);
                if audit.as_array().unwrap().len() != audit_before {
                    failures.push(format!(
                        "after {cert:?}'s calls, the audit log grew: {audit}"
                    ));
                }
            }
        }
    });
    assert!(failures.is_empty(), "{}\n{}", failures.join("\n"), d.logs());

    // The allowed triggers made jobs, audited under the certificates' names; no one else
    // triggered anything.
    let audit = d.ferry_json(&["audit"]);
    let triggered_by: std::collections::BTreeSet<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["action"]
                .as_str()
                .is_some_and(|a| a.starts_with("trigger"))
        })
        .map(|e| e["who"].as_str().expect("who"))
        .collect();
    assert_eq!(
        triggered_by,
        ["operator", "otto"].into(),
        "the triggers' authors in the audit log: {audit}"
    );
    let jobs = d.ferry_json(&["jobs"]);
    assert!(
        jobs.as_array().unwrap().len() > jobs_before,
        "the allowed triggers made no job: {jobs}"
    );
}

/// Every method of the Agent service. The coordinator's orders in this test name a
/// datastore the agents do not have, so that an allowed call starts no real job; the
/// others' name the real one, and are refused before the order is even read.
const AGENT_METHODS: [&str; 5] = [
    "Describe",
    "RunBackup",
    "RunRestore",
    "CancelJob",
    "WatchJob",
];

fn call_agent<'a>(a: &'a mut AgentClient<Channel>, method: &str, datastore: &str) -> Call<'a> {
    const JOB_ID: &str = "01KAAAAAAAAAAAAAAAAAAAAAAA";
    let datastore = datastore.to_owned();
    match method {
        "Describe" => Box::pin(async move { a.describe(v1::DescribeRequest {}).await.map(drop) }),
        "RunBackup" => Box::pin(async move {
            let mut stream = a
                .run_backup(v1::RunBackupRequest {
                    job_id: JOB_ID.into(),
                    datastore,
                    backup_type: String::new(),
                })
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok(())
        }),
        "RunRestore" => Box::pin(async move {
            let mut stream = a
                .run_restore(v1::RunRestoreRequest {
                    target: String::new(),
                    job_id: JOB_ID.into(),
                    datastore,
                    verify_only: true,
                    ..Default::default()
                })
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok(())
        }),
        "CancelJob" => Box::pin(async move {
            a.cancel_job(v1::CancelJobRequest {
                job_id: JOB_ID.into(),
            })
            .await
            .map(drop)
        }),
        "WatchJob" => Box::pin(async move {
            let mut stream = a
                .watch_job(v1::WatchJobRequest {
                    job_id: JOB_ID.into(),
                })
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok(())
        }),
        other => panic!("no Agent method {other} in this test: add it to the table"),
    }
}

#[test]
fn every_agent_method_is_open_to_the_coordinator_only() {
    let s = Setup::start();
    let d = &s.d;
    let mut failures = Vec::new();
    runtime().block_on(async {
        for (port, server) in [(d.prod_port, "pg-prod"), (d.stage_port, "pg-stage")] {
            // Backups go to the production agent, restores to the staging agent: either
            // refuses the other by its role, which is not what this test is about.
            let methods = AGENT_METHODS.iter().filter(|m| match **m {
                "RunBackup" => server == "pg-prod",
                "RunRestore" => server == "pg-stage",
                _ => true,
            });
            for cert in CERTS {
                let allowed = cert == Cert::Coordinator;
                for method in methods.clone().copied() {
                    let channel = s.channel(cert, port, server).await;
                    let what = format!("{cert:?} ({}) calling {server}'s {method}", cert.name());
                    let result = match &channel {
                        Err(e) => {
                            if !cert.fails_tls() {
                                failures.push(format!("{what}: no connection: {e}"));
                            }
                            continue;
                        }
                        Ok(ch) => {
                            let mut client = AgentClient::new(ch.clone());
                            let datastore = if allowed { "no-such-datastore" } else { "postgres" };
                            call_agent(&mut client, method, datastore).await
                        }
                    };
                    let refusal = result.as_ref().err();
                    let problem = if cert.fails_tls() {
                        match refusal {
                            Some(e) if tls_refused(e) => None,
                            _ => Some("expected the TLS session to fail".to_owned()),
                        }
                    } else if allowed {
                        match refusal {
                            Some(e)
                                if matches!(
                                    e.code(),
                                    tonic::Code::PermissionDenied
                                        | tonic::Code::Unauthenticated
                                        | tonic::Code::Unavailable
                                ) || tls_refused(e) =>
                            {
                                Some("expected it allowed".to_owned())
                            }
                            _ => None,
                        }
                    } else {
                        match refusal {
                            Some(e)
                                if e.code() == tonic::Code::PermissionDenied
                                    && e.message().contains(&format!("\"{}\"", cert.name()))
                                    && e.message().contains("allowed_clients") =>
                            {
                                None
                            }
                            _ => Some(
                                "expected PermissionDenied naming the certificate and allowed_clients"
                                    .to_owned(),
                            ),
                        }
                    };
                    if let Some(p) = problem {
                        failures.push(format!("{what}: {p}; got {}", describe(&result)));
                    }
                }
            }
        }
    });
    assert!(failures.is_empty(), "{}\n{}", failures.join("\n"), d.logs());
    for log in ["agent-prod.log", "agent-stage.log"] {
        let text = std::fs::read_to_string(d.dir.path().join(log)).unwrap();
        assert!(!text.contains("Job accepted"), "{log}: {text}");
    }
    assert!(d.sshd.files().is_empty(), "{:?}", d.sshd.files());
}
