//! Hostile and malformed input, end to end: names and dates that try to leave the backup
//! server's layout, crafted archives that try to write outside a restore target, absurdly
//! large gRPC messages, expired or misnamed certificates, agents the inventory no longer
//! lists, a backup server whose host key changed, secret files readable by others, and
//! secrets that must never show in logs, argv, manifests or stored bytes. Each is refused
//! before it does anything, with an error that says what and where, and leaves nothing
//! behind.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::v1;
use ferry_proto::v1::agent_client::AgentClient;
use ferry_proto::v1::coordinator_client::CoordinatorClient;
use ferry_tests::*;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// A job id the agents accept.
const JOB_ID: &str = "01KAAAAAAAAAAAAAAAAAAAAAAA";

/// Names that would leave or confuse `<root>/<environment>/<date>/<datastore>_backup_...`.
fn escaping_names() -> Vec<String> {
    vec![
        "../etc".into(),
        "postgres/../../etc".into(),
        "/etc".into(),
        "a/b".into(),
        "..".into(),
        "post\0gres".into(),
        "postgres\n".into(),
        "x".repeat(10_000),
    ]
}

/// Dates that are not `YYYY-MM-DD` calendar days.
fn escaping_dates() -> Vec<String> {
    vec![
        "../../etc".into(),
        "2026-01-01/../../x".into(),
        "2026-02-30".into(),
        "2026-01-0\0".into(),
        "9".repeat(10_000),
    ]
}

async fn agent(d: &Deployment, port: u16, server: &str) -> AgentClient<tonic::transport::Channel> {
    AgentClient::new(
        fleet_channel(&d.fleet, "coordinator", port, server)
            .await
            .unwrap(),
    )
}

/// The coordinator's gRPC client as the operator, bypassing the CLI.
async fn operator_client(d: &Deployment) -> CoordinatorClient<tonic::transport::Channel> {
    CoordinatorClient::new(
        fleet_channel(&d.fleet, "operator", d.coordinator_port, "coordinator")
            .await
            .unwrap(),
    )
}

/// A message refused for its size, before any handler: `OutOfRange` (tonic's decoder) or
/// `ResourceExhausted`, with a short message.
fn assert_too_large(e: &tonic::Status) {
    assert!(
        matches!(
            e.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{e:?}"
    );
    assert!(e.message().len() < 1_000, "{} bytes", e.message().len());
}

/// A refusal: the expected code, a short message containing `says`.
fn assert_refused(what: &str, e: &tonic::Status, code: tonic::Code, says: &str) {
    assert_eq!(e.code(), code, "{what}: {e:?}");
    assert!(e.message().contains(says), "{what}: {}", e.message());
    assert!(
        e.message().len() < 1_000,
        "{what}: the message echoes the whole value ({} bytes)",
        e.message().len()
    );
}

#[test]
fn names_and_dates_escaping_the_layout_are_refused_by_agents_and_coordinator() {
    let d = Deployment::start();
    runtime().block_on(async {
        let mut prod = agent(&d, d.prod_port, "pg-prod").await;
        let mut stage = agent(&d, d.stage_port, "pg-stage").await;
        for name in escaping_names() {
            let what = format!("backup of {:?}", name.chars().take(20).collect::<String>());
            let e = prod
                .run_backup(v1::RunBackupRequest {
                    job_id: JOB_ID.into(),
                    datastore: name.clone(),
                    ..Default::default()
                })
                .await
                .expect_err(&what);
            assert_refused(&what, &e, tonic::Code::InvalidArgument, "not a valid name");
            let e = stage
                .run_restore(v1::RunRestoreRequest {
                    target: String::new(),
                    job_id: JOB_ID.into(),
                    datastore: name.clone(),
                    ..Default::default()
                })
                .await
                .expect_err(&what);
            assert_refused(&what, &e, tonic::Code::InvalidArgument, "not a valid name");
        }
        for date in escaping_dates() {
            let what = format!("restore of {:?}", date.chars().take(20).collect::<String>());
            for verify_only in [false, true] {
                let e = stage
                    .run_restore(v1::RunRestoreRequest {
                        target: String::new(),
                        job_id: JOB_ID.into(),
                        datastore: "postgres".into(),
                        date: date.clone(),
                        verify_only,
                        ..Default::default()
                    })
                    .await
                    .expect_err(&what);
                assert_refused(&what, &e, tonic::Code::InvalidArgument, "YYYY-MM-DD");
            }
        }

        // The coordinator, asked directly (a NUL cannot pass through the CLI's argv).
        let mut coordinator = operator_client(&d).await;
        for name in escaping_names() {
            let what = format!("trigger of {:?}", name.chars().take(20).collect::<String>());
            let e = coordinator
                .trigger_backup(v1::TriggerBackupRequest {
                    agent: "pg-prod".into(),
                    datastore: name.clone(),
                    ..Default::default()
                })
                .await
                .expect_err(&what);
            assert_refused(&what, &e, tonic::Code::InvalidArgument, "not a valid name");
        }
        for date in escaping_dates() {
            let e = coordinator
                .trigger_restore(v1::TriggerRestoreRequest {
                    from: String::new(),
                    agent: "pg-stage".into(),
                    date: date.clone(),
                    ..Default::default()
                })
                .await
                .expect_err("restore with a bad date");
            assert_refused(&date, &e, tonic::Code::InvalidArgument, "YYYY-MM-DD");
        }
    });

    // Through the CLI, as an operator would type them.
    let long = "x".repeat(10_000);
    for args in [
        vec!["backup", "pg-prod", "../etc"],
        vec!["backup", "pg-prod", "a/b", "--wait"],
        vec!["backup", "pg-prod", &long],
        vec!["restore", "pg-stage", "--datastore", "../../etc"],
        vec!["restore", "pg-stage", "--date", "../../etc"],
        vec!["restore", "pg-stage", "--date", "2026-01-01/../x"],
        vec!["verify", "pg-stage", "--date", &long],
    ] {
        let out = d.ferry(&args);
        let what = format!(
            "ferry {}",
            args.join(" ").chars().take(60).collect::<String>()
        );
        assert!(
            !out.status.success(),
            "{what} was accepted: {}",
            stdout(&out)
        );
        let err = stderr(&out);
        assert!(
            err.contains("InvalidArgument")
                && (err.contains("not a valid name") || err.contains("YYYY-MM-DD")),
            "{what}: {err}"
        );
        assert!(err.len() < 2_000, "{what}: {} bytes of error", err.len());
    }

    // No job was made, nothing was written, nothing restored.
    assert_eq!(d.ferry_json(&["jobs"]), serde_json::json!([]));
    assert!(d.sshd.files().is_empty(), "{:?}", d.sshd.files());
    assert!(!d.stage_pg.has_database("app"));
}

/// Writes `text` to `path`, runs `run` on it (an agent or coordinator start), and asserts
/// that it exits with an error holding every one of `needles`; returns that error.
fn assert_fails_at_start(run: fn(&Path) -> Output, path: &Path, text: &str, needles: &[&str]) {
    fs::write(path, text).unwrap();
    let out = run(path);
    let err = stderr(&out);
    assert!(!out.status.success(), "{needles:?}: it started");
    for n in needles {
        assert!(err.contains(n), "{needles:?}: no {n:?} in: {err}");
    }
    assert!(
        err.len() < 2_000,
        "{needles:?}: {} bytes of error",
        err.len()
    );
}

/// A deployment whose configs are written but whose agents and coordinator are not
/// started, and the texts of the production and staging agents' configs.
fn configs_only() -> (Deployment, String, String) {
    let d = Deployment::start_with_options(DeploymentOptions {
        source_sql: "SELECT 1".into(),
        start_agents: false,
        start_coordinator: false,
        ..DeploymentOptions::default()
    });
    let prod = fs::read_to_string(&d.prod_config).unwrap();
    let stage = fs::read_to_string(&d.stage_config).unwrap();
    (d, prod, stage)
}

#[test]
fn config_names_escaping_the_layout_fail_at_start_naming_the_field() {
    let (d, prod, stage) = configs_only();
    let dir = d.dir.path();
    let long = "x".repeat(10_000);
    let agent_cases = [
        (
            &prod,
            "name = \"postgres\"",
            "name = \"a/b\"".to_owned(),
            "datastores[0].name",
        ),
        (
            &prod,
            "name = \"postgres\"",
            "name = \"post\\u0000gres\"".to_owned(),
            "datastores[0].name",
        ),
        (
            &prod,
            "name = \"postgres\"",
            format!("name = \"{long}\""),
            "datastores[0].name",
        ),
        (
            &prod,
            "environment = \"production\"",
            "environment = \"../production\"".to_owned(),
            "environment",
        ),
        (
            &prod,
            "id = \"pg-prod\"",
            "id = \"/pg-prod\"".to_owned(),
            "id",
        ),
        (
            &stage,
            "source_environment = \"production\"",
            "source_environment = \"..\"".to_owned(),
            "restore.source_environment",
        ),
    ];
    for (text, from, to, field) in agent_cases {
        assert!(text.contains(from), "{from} not in the config");
        assert_fails_at_start(
            run_agent_expecting_exit,
            &dir.join("bad-agent.toml"),
            &text.replacen(from, &to, 1),
            &[&format!("field `{field}`"), "not a valid name"],
        );
    }

    let coordinator = fs::read_to_string(&d.coordinator_config).unwrap();
    let coordinator_cases = [
        (
            coordinator.replacen("id = \"pg-prod\"", "id = \"../pg-prod\"", 1),
            "agents[0].id",
        ),
        (
            coordinator.replacen(
                "environment = \"production\"",
                &format!("environment = \"{long}\""),
                1,
            ),
            "agents[0].environment",
        ),
        (
            format!(
                "{coordinator}\n[[schedules]]\nagent = \"pg-prod\"\ndatastore = \"../../x\"\n\
                 kind = \"backup\"\ncron = \"0 2 * * *\"\n"
            ),
            "schedules[0].datastore",
        ),
        (
            format!("{coordinator}\n[[retention]]\nenvironment = \"../..\"\nkeep_daily = 1\n"),
            "retention[0].environment",
        ),
    ];
    for (text, field) in coordinator_cases {
        assert_fails_at_start(
            run_coordinator_expecting_exit,
            &dir.join("bad-coordinator.toml"),
            &text,
            &[&format!("field `{field}`"), "not a valid name"],
        );
    }
    assert!(d.sshd.files().is_empty(), "{:?}", d.sshd.files());
}

/// Everything in `dir`, by name, with contents of files (not following links).
fn listing(dir: &Path) -> Vec<(String, Option<Vec<u8>>)> {
    let mut out: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let content = fs::symlink_metadata(&p)
                .unwrap()
                .is_file()
                .then(|| fs::read(&p).unwrap());
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                content,
            )
        })
        .collect();
    out.sort();
    out
}

fn sha256_hex(path: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg(path));
    out.split_whitespace().next().unwrap().to_owned()
}

#[test]
fn crafted_archive_writing_outside_the_target_is_refused_and_the_target_is_untouched() {
    let mut paths = None;
    let d = Deployment::start_with("SELECT 1", |d| {
        let source = d.dir.path().join("files-prod/data");
        let target = d.dir.path().join("files-stage/data");
        fs::create_dir_all(&source).unwrap();
        fs::create_dir_all(&target).unwrap();
        for (config, path) in [(&d.prod_config, &source), (&d.stage_config, &target)] {
            let entry = format!(
                "[[datastores]]\nname = \"tree\"\nkind = \"files\"\npath = {}\n",
                toml_str(&path.display().to_string())
            );
            append(config, &entry);
        }
        paths = Some((source, target));
    });
    let (source, target) = paths.unwrap();
    fs::write(source.join("a.txt"), b"from production").unwrap();
    fs::write(target.join("live.txt"), b"staging's current data").unwrap();
    let before = listing(&target);
    d.ferry_ok(&["backup", "pg-prod", "tree", "--wait"]);
    let (name, _) = d.todays_backup("tree", "tar.zst.age");
    let stored = d.sshd.root().join(&name);

    // Where the crafted entries aim: beside the deployment, outside any target.
    let outside = d.dir.path().join("outside");
    let outside_text = outside.display().to_string();
    let planted = d.dir.path().join("planted");
    fs::write(&planted, b"not for staging's tree").unwrap();
    let planted_text = planted.display().to_string();
    use tar::EntryType::{Link, Regular, Symlink};
    let variants: Vec<(&str, Vec<RawEntry<'_>>, &str)> = vec![
        (
            "a symlink to an outside directory, then a file below it",
            vec![
                RawEntry {
                    kind: Symlink,
                    name: "x",
                    link: &outside_text,
                    data: b"",
                },
                RawEntry {
                    kind: Regular,
                    name: "x/evil",
                    link: "",
                    data: b"written through the link",
                },
            ],
            "symbolic link",
        ),
        (
            "a symlink to .., then a file below it",
            vec![
                RawEntry {
                    kind: Symlink,
                    name: "up",
                    link: "..",
                    data: b"",
                },
                RawEntry {
                    kind: Regular,
                    name: "up/outside",
                    link: "",
                    data: b"written through the link",
                },
            ],
            "symbolic link",
        ),
        (
            "a name with ..",
            vec![RawEntry {
                kind: Regular,
                name: "../../outside",
                link: "",
                data: b"escaped",
            }],
            "`..`",
        ),
        (
            "a hard link to an absolute path",
            vec![RawEntry {
                kind: Link,
                name: "evil",
                link: &planted_text,
                data: b"",
            }],
            "hard link",
        ),
    ];
    for (what, entries, why) in variants {
        // Encrypted with the staging recipient, as production would, and a manifest that
        // matches the file: only the archive's content is hostile.
        let bytes = zstd_age_encrypt(&crafted_tar(&entries), &d.recipient);
        chmod(&stored, 0o640);
        fs::write(&stored, &bytes).unwrap();
        let sum = sha256_hex(&stored);
        d.edit_todays_manifest("tree", "tar.zst.age", |m| {
            m["sha256"] = serde_json::json!(sum);
            m["bytes_stored"] = serde_json::json!(bytes.len());
        });

        let out = d.ferry(&["restore", "pg-stage", "--datastore", "tree", "--wait"]);
        let text = stdout(&out);
        assert!(!out.status.success(), "{what}: restored:\n{text}");
        assert!(
            text.contains("refused") && text.contains(why),
            "{what}:\n{text}\n{}",
            stderr(&out)
        );
        assert!(!outside.exists(), "{what}: {outside_text} was written");
        assert_eq!(
            fs::read(&planted).unwrap(),
            b"not for staging's tree",
            "{what}"
        );
        assert_eq!(listing(&target), before, "{what}: the target changed");
        let beside: Vec<_> = fs::read_dir(target.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "data")
            .collect();
        assert!(
            beside.is_empty(),
            "{what}: left beside the target: {beside:?}"
        );
    }
}

#[test]
fn oversized_messages_are_refused_and_the_agent_keeps_serving() {
    let d = Deployment::start();
    let huge = "x".repeat(16 << 20);
    runtime().block_on(async {
        let mut prod = agent(&d, d.prod_port, "pg-prod").await;
        let e = prod
            .run_backup(v1::RunBackupRequest {
                job_id: JOB_ID.into(),
                datastore: huge.clone(),
                ..Default::default()
            })
            .await
            .expect_err("the agent took a 16 MiB order");
        assert_too_large(&e);
        // The same connection and a new one both still work.
        prod.describe(v1::DescribeRequest {}).await.unwrap();
        agent(&d, d.prod_port, "pg-prod")
            .await
            .describe(v1::DescribeRequest {})
            .await
            .unwrap();

        let mut coordinator = operator_client(&d).await;
        let e = coordinator
            .trigger_backup(v1::TriggerBackupRequest {
                agent: "pg-prod".into(),
                datastore: huge.clone(),
                ..Default::default()
            })
            .await
            .expect_err("the coordinator took a 16 MiB trigger");
        assert_too_large(&e);
        coordinator
            .list_jobs(v1::ListJobsRequest::default())
            .await
            .unwrap();
    });
    assert!(
        !d.logs().contains(&"x".repeat(1_000)),
        "the value was logged"
    );
    let out = d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    assert!(out.contains("succeeded"), "{out}");
}

/// Whether a client presenting `name`'s certificate from `fleet` is refused by the agent
/// on `port` (in the handshake or at its first call).
async fn agent_refuses(fleet: &Fleet, name: &str, port: u16, server: &str) -> bool {
    match fleet_channel(fleet, name, port, server).await {
        Err(_) => true,
        Ok(ch) => AgentClient::new(ch)
            .describe(v1::DescribeRequest {})
            .await
            .is_err(),
    }
}

fn ferry_as(d: &Deployment, cert: &Path, key: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("ferry"));
    cmd.arg("--coordinator")
        .arg(format!("https://127.0.0.1:{}", d.coordinator_port))
        .arg("--ca")
        .arg(d.fleet.ca())
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .args(args);
    output_within(&mut cmd, b"", Duration::from_secs(60))
}

#[test]
fn expired_and_not_yet_valid_fleet_certificates_are_refused_both_ways() {
    let mut d = Deployment::start();
    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    issue_with_validity(&d.fleet, "expired", now - 30 * day, now - day);
    issue_with_validity(&d.fleet, "future", now + day, now + 30 * day);
    for name in ["expired", "future"] {
        runtime().block_on(async {
            assert!(
                agent_refuses(&d.fleet, name, d.prod_port, "pg-prod").await,
                "the agent served a client with an {name} certificate"
            );
        });
        let out = ferry_as(
            &d,
            &d.fleet.cert(name),
            &d.fleet.key(name),
            &["backup", "pg-prod"],
        );
        assert!(
            !out.status.success(),
            "the coordinator served an operator with an {name} certificate: {}",
            stdout(&out)
        );
    }
    assert_eq!(d.ferry_json(&["jobs"]), serde_json::json!([]));

    // The other way: an agent whose own certificate expired is not given orders.
    issue_with_validity(&d.fleet, "pg-prod", now - 30 * day, now - day);
    d.start_agent("agent-prod");
    let out = d.ferry(&["backup", "pg-prod", "--wait"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        text.contains("pg-prod") && text.to_lowercase().contains("expired"),
        "{text}"
    );
    assert!(d.sshd.files().is_empty(), "{:?}", d.sshd.files());
    let log = fs::read_to_string(d.dir.path().join("agent-prod.log")).unwrap();
    assert!(!log.contains("Job accepted"), "{log}");
}

#[test]
fn agents_not_in_the_inventory_or_answering_under_another_name_get_no_order() {
    // pg-prod is revoked: the inventory no longer lists it. pg-new is listed at pg-prod's
    // address, so the agent answering there has a certificate for another name.
    let d = Deployment::start_with(DEFAULT_DATA, |d| {
        d.coordinator.agents = vec![
            AgentEntry {
                id: "pg-new".into(),
                ..AgentEntry::of(&d.prod_agent)
            },
            AgentEntry::of(&d.stage_agent),
        ];
        d.coordinator.write(&d.coordinator_config);
    });
    let out = d.ferry(&["backup", "pg-prod", "--wait"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("\"pg-prod\" is not in the inventory"),
        "{}",
        stderr(&out)
    );

    let out = d.ferry(&["backup", "pg-new", "--wait"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        text.contains("pg-new") && text.contains("certificate"),
        "{text}"
    );

    let log = fs::read_to_string(d.dir.path().join("agent-prod.log")).unwrap();
    assert!(
        !log.contains("Job accepted") && !log.contains("Order refused"),
        "an order reached the agent:\n{log}"
    );
    assert!(d.sshd.files().is_empty(), "{:?}", d.sshd.files());
}

#[test]
fn fleet_certificates_other_than_the_coordinators_cannot_order_an_agent() {
    // Signed by the fleet CA, but not the coordinator: an operator going around the
    // coordinator (its checks, its audit log), or one agent ordering another.
    let d = Deployment::start();
    runtime().block_on(async {
        for name in ["operator", "pg-stage"] {
            let mut agent = AgentClient::new(
                fleet_channel(&d.fleet, name, d.prod_port, "pg-prod")
                    .await
                    .unwrap(),
            );
            let e = agent
                .run_backup(v1::RunBackupRequest {
                    job_id: "01M890KGY9J1FTW174S1KTQ459".into(),
                    datastore: "postgres".into(),
                    backup_type: String::new(),
                })
                .await
                .expect_err("refused");
            assert_refused(name, &e, tonic::Code::PermissionDenied, "allowed_clients");
            assert!(e.message().contains(name), "{}", e.message());
            let e = agent
                .describe(v1::DescribeRequest {})
                .await
                .expect_err("refused");
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        }
        // The coordinator's certificate still orders it.
        agent(&d, d.prod_port, "pg-prod")
            .await
            .describe(v1::DescribeRequest {})
            .await
            .unwrap();
    });
    let log = fs::read_to_string(d.dir.path().join("agent-prod.log")).unwrap();
    assert!(!log.contains("Job accepted"), "{log}");
    assert!(d.sshd.files().is_empty(), "{:?}", d.sshd.files());
}

#[test]
fn backup_server_whose_host_key_changed_is_refused_and_nothing_is_written() {
    let mut d = Deployment::start();
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    let before = d.sshd.files();
    assert!(!before.is_empty());

    restart_sshd_with_new_host_key(&mut d.sshd);
    let check = agent_check(&d.prod_config);
    let text = stdout(&check);
    assert!(
        !check.status.success() && text.contains("not the pinned"),
        "{text}"
    );
    // Production cannot write, and staging (which pinned the old key too) reads nothing.
    for args in [
        &["backup", "pg-prod", "--wait"][..],
        &["restore", "pg-stage", "--datastore", "postgres", "--wait"],
    ] {
        let out = d.ferry(args);
        let text = stdout(&out);
        assert!(
            !out.status.success() && text.contains("host key"),
            "{args:?}: {text}"
        );
    }
    assert_eq!(d.sshd.files(), before, "something was written");
    assert!(!d.stage_pg.has_database("app"));
}

/// A copy of `file` with `mode`, beside it, named `NAME.open`.
fn open_copy(file: &Path, mode: u32) -> PathBuf {
    let copy = PathBuf::from(format!("{}.open", file.display()));
    fs::copy(file, &copy).unwrap();
    chmod(&copy, mode);
    copy
}

#[test]
fn secret_files_readable_by_others_are_refused_at_start_naming_the_field_and_file() {
    let (d, prod, stage) = configs_only();
    let dir = d.dir.path();
    let path_of = |p: &Path| toml_str(&p.display().to_string());
    let password = dir.join("pg.pass");
    fs::write(&password, "secret\n").unwrap();
    let password = open_copy(&password, 0o644);
    let tls_key = open_copy(&d.fleet.key("pg-prod"), 0o640);
    let ssh_key = open_copy(&d.prod_key, 0o644);
    let identity = open_copy(&d.identity, 0o604);
    let coordinator = fs::read_to_string(&d.coordinator_config).unwrap();
    let coordinator_key = open_copy(&d.fleet.key("coordinator"), 0o644);
    let maintenance_key = open_copy(&d.stage_key, 0o640);
    let maintenance = format!(
        "\n[maintenance]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{BACKUP_USER}\"\n\
         private_key_file = {}\nhost_key = {}\nroot = {}\n",
        d.sshd.port(),
        path_of(&maintenance_key),
        toml_str(&d.sshd.host_key()),
        path_of(d.sshd.root())
    );
    let agent: fn(&Path) -> Output = run_agent_expecting_exit;
    let coord: fn(&Path) -> Output = run_coordinator_expecting_exit;
    let cases = [
        (
            agent,
            prod.replacen(&path_of(&d.fleet.key("pg-prod")), &path_of(&tls_key), 1),
            "tls.key",
            &tls_key,
            "0640",
        ),
        (
            agent,
            prod.replacen(&path_of(&d.prod_key), &path_of(&ssh_key), 1),
            "backup_server.private_key_file",
            &ssh_key,
            "0644",
        ),
        (
            agent,
            prod.replacen(
                "user = \"postgres\"",
                &format!(
                    "user = \"postgres\"\npassword_file = {}",
                    path_of(&password)
                ),
                1,
            ),
            "datastores[0].password_file",
            &password,
            "0644",
        ),
        (
            agent,
            stage.replacen(&path_of(&d.identity), &path_of(&identity), 1),
            "encryption.identity_file",
            &identity,
            "0604",
        ),
        (
            coord,
            coordinator.replacen(
                &path_of(&d.fleet.key("coordinator")),
                &path_of(&coordinator_key),
                1,
            ),
            "tls.key",
            &coordinator_key,
            "0644",
        ),
        (
            coord,
            coordinator.replacen("\n[[agents]]", &format!("{maintenance}\n[[agents]]"), 1),
            "maintenance.private_key_file",
            &maintenance_key,
            "0640",
        ),
    ];
    for (run, text, field, file, mode) in cases {
        assert_fails_at_start(
            run,
            &dir.join("open.toml"),
            &text,
            &[
                &format!("field `{field}`"),
                &file.display().to_string(),
                mode,
            ],
        );
    }

    // The CLI refuses an operator key others can read, before it connects.
    let operator_key = open_copy(&d.fleet.key("operator"), 0o644);
    let out = ferry_as(&d, &d.fleet.cert("operator"), &operator_key, &["jobs"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&operator_key.display().to_string()) && err.contains("0644"),
        "{err}"
    );
}

/// What the `/proc` watcher saw of the PostgreSQL tools the agents ran.
#[derive(Default)]
struct Seen {
    /// Tools seen running (`pg_dump`, `pg_restore`, `psql`, `pg_dumpall`).
    tools: BTreeSet<String>,
    /// Tools seen without PGPASSWORD or PGPASSFILE in their environment.
    without_password_env: BTreeSet<String>,
    /// Command lines holding the password.
    leaks: Vec<String>,
}

fn parent_of(pid: &str) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)
        .map(str::to_owned)
}

/// Watches every process until `stop`: any command line with `password` is a leak; the
/// PostgreSQL tools descending from one of `agents` (but `--version` probes) are recorded
/// with whether their environment carries the password.
fn watch_processes(
    agents: Vec<u32>,
    password: String,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) {
    let tools = ["pg_dump", "pg_restore", "psql", "pg_dumpall"];
    while !stop.load(Ordering::Relaxed) {
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            let pid = entry.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let mut seen = seen.lock().unwrap();
            if contains_bytes(&cmdline, password.as_bytes()) {
                seen.leaks
                    .push(String::from_utf8_lossy(&cmdline).replace('\0', " "));
            }
            let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
            let argv0 = String::from_utf8_lossy(argv0);
            let Some(tool) = tools.iter().find(|t| argv0.rsplit('/').next() == Some(**t)) else {
                continue;
            };
            let mut ancestor = parent_of(&pid);
            let mut from_agent = false;
            for _ in 0..6 {
                match &ancestor {
                    Some(a) if agents.iter().any(|p| p.to_string() == *a) => {
                        from_agent = true;
                        break;
                    }
                    Some(a) => ancestor = parent_of(a),
                    None => break,
                }
            }
            // `--version` probes connect nowhere and need no password.
            let probe = cmdline
                .split(|b| *b == 0)
                .any(|a| a == b"--version" || a == b"-V");
            if !from_agent || probe {
                continue;
            }
            let Ok(environ) = fs::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            seen.tools.insert((*tool).to_owned());
            let has = environ.split(|b| *b == 0).any(|var| {
                var == format!("PGPASSWORD={password}").as_bytes()
                    || var.starts_with(b"PGPASSFILE=")
            });
            if !has {
                seen.without_password_env.insert((*tool).to_owned());
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Every file under `dir`, recursively.
fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(all_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn passwords_and_the_age_identity_never_show_in_logs_argv_manifests_or_stored_bytes() {
    const PASSWORD: &str = "Hq7-unlikely-pw-3f9c2e";
    const USER: &str = "ferry_backup";
    // Enough rows for pg_dump and pg_restore to run long enough to be watched.
    let sql = format!(
        "{DEFAULT_DATA}\nCREATE TABLE bulk AS SELECT g, md5(g::text) || md5((g + 1)::text) AS body \
         FROM generate_series(1, 300000) g;"
    );
    let d = Deployment::start_with(&sql, |d| {
        let pass = d.dir.path().join("pg.pass");
        fs::write(&pass, format!("{PASSWORD}\n")).unwrap();
        chmod(&pass, 0o600);
        for pg in [&d.prod_pg, &d.stage_pg] {
            pg.psql(
                "postgres",
                &format!("CREATE ROLE {USER} LOGIN SUPERUSER PASSWORD '{PASSWORD}'"),
            );
            // That role must give its password: scram over TCP, before the trust lines.
            let hba = pg.data_dir().join("pg_hba.conf");
            let rest = fs::read_to_string(&hba).unwrap();
            fs::write(
                &hba,
                format!("host all {USER} 127.0.0.1/32 scram-sha-256\n{rest}"),
            )
            .unwrap();
            pg.psql("postgres", "SELECT pg_reload_conf()");
        }
        for config in [&d.prod_config, &d.stage_config] {
            let text = fs::read_to_string(config).unwrap().replacen(
                "user = \"postgres\"",
                &format!(
                    "user = \"{USER}\"\npassword_file = {}",
                    toml_str(&pass.display().to_string())
                ),
                1,
            );
            fs::write(config, text).unwrap();
        }
    });
    // The password is really needed.
    let no_password = Command::new(d.prod_pg.bin_dir().join("psql"))
        .args([
            "-w",
            "-h",
            "127.0.0.1",
            "-U",
            USER,
            "-d",
            "postgres",
            "-c",
            "SELECT 1",
        ])
        .arg("-p")
        .arg(d.prod_pg.port().to_string())
        .env_remove("PGPASSWORD")
        .output()
        .unwrap();
    assert!(
        !no_password.status.success(),
        "{USER} logs in without its password"
    );

    let agents = ["agent-prod", "agent-stage"]
        .iter()
        .map(|a| d.procs[a].pid())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watcher = {
        let (stop, seen) = (stop.clone(), seen.clone());
        std::thread::spawn(move || watch_processes(agents, PASSWORD.into(), stop, seen))
    };
    let backup = d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    let restore = d.ferry_ok(&["restore", "pg-stage", "--wait"]);
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    assert_eq!(
        d.stage_pg.psql("app", "SELECT count(*) FROM bulk"),
        "300000"
    );

    let seen = seen.lock().unwrap();
    assert!(
        seen.leaks.is_empty(),
        "the password in argv: {:?}",
        seen.leaks
    );
    for tool in ["pg_dump", "pg_restore"] {
        assert!(
            seen.tools.contains(tool),
            "{tool} was never seen running; seen: {:?}",
            seen.tools
        );
    }
    assert!(
        seen.without_password_env.is_empty(),
        "without PGPASSWORD or PGPASSFILE: {:?}",
        seen.without_password_env
    );

    let identity = fs::read_to_string(&d.identity).unwrap();
    let secret_key = identity
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .expect("an identity line")
        .to_owned();
    let secrets = [PASSWORD, secret_key.as_str(), "AGE-SECRET-KEY-"];
    let mut places: Vec<(String, Vec<u8>)> = ["agent-prod", "agent-stage", "coordinator"]
        .iter()
        .map(|w| {
            let log = d.dir.path().join(format!("{w}.log"));
            (log.display().to_string(), fs::read(&log).unwrap())
        })
        .collect();
    places.push(("backup output".into(), backup.into_bytes()));
    places.push(("restore output".into(), restore.into_bytes()));
    let store = d.dir.path().join("coordinator.redb");
    places.push((store.display().to_string(), fs::read(&store).unwrap()));
    let stored = all_files(d.sshd.root());
    assert!(stored.len() >= 4, "{stored:?}");
    for file in &stored {
        let name = file.display().to_string();
        places.push((name.clone(), fs::read(file).unwrap()));
        if name.ends_with(".age") {
            places.push((
                format!("plaintext of {name}"),
                age_zstd_decrypt(file, &d.identity),
            ));
        }
    }
    for (place, bytes) in &places {
        for secret in secrets {
            assert!(
                !contains_bytes(bytes, secret.as_bytes()),
                "{place} holds a secret ({:.12}...)",
                secret
            );
        }
    }
}
