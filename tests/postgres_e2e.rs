//! PostgreSQL end to end: production backup through the coordinator to a real sshd,
//! restore into staging, and the refusals and failures that must leave nothing behind.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_proto::v1;
use ferry_proto::v1::agent_client::AgentClient;
use ferry_tests::*;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A gRPC client of an agent presenting `name`'s certificate from `fleet`.
async fn agent_client(
    fleet: &Fleet,
    name: &str,
    port: u16,
    server: &str,
) -> Result<AgentClient<tonic::transport::Channel>, String> {
    ferry_proto::tls::install_crypto_provider();
    let tls = ferry_proto::tls::TlsFiles {
        cert: fleet.pki.join(format!("{name}.pem")),
        key: fleet.pki.join(format!("{name}.key")),
        ca: fleet.ca(),
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls.client_config(server).unwrap())
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(AgentClient::new(channel))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

#[test]
fn backup_then_restore_reproduces_every_row_owner_and_grant() {
    let d = Deployment::start();
    // Staging's target has other data, which the restore replaces.
    d.stage_pg.psql("postgres", "CREATE DATABASE app");
    d.stage_pg.psql(
        "app",
        "CREATE TABLE stale (x int); INSERT INTO stale VALUES (1)",
    );

    let out = d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    assert!(out.contains("succeeded"), "{out}");
    let files = d.sshd.final_files();
    let day = chrono_today();
    for f in [
        format!("production/{day}/postgres_backup_{day}.pgdump.zst.age"),
        format!("production/{day}/postgres_backup_{day}.pgdump.zst.age.json"),
        format!("production/{day}/postgres-globals_backup_{day}.sql.zst.age"),
        format!("production/{day}/postgres-globals_backup_{day}.sql.zst.age.json"),
    ] {
        assert!(files.contains(&f), "{f} missing from {files:?}");
    }
    assert_eq!(files.len(), 4, "{files:?}");

    let out = d.ferry_ok(&["restore", "pg-stage", "--wait"]);
    assert!(
        out.contains("equal to the manifest (the server's count of the rows inserted)"),
        "{out}"
    );
    let source = d.prod_pg.table_fingerprints("app");
    let restored = d.stage_pg.table_fingerprints("app");
    assert_eq!(source.len(), 4, "{source:?}");
    assert_eq!(restored, source, "restored content differs from the source");
    // Owners and grants came along with the roles archive.
    assert_eq!(
        d.stage_pg.psql(
            "app",
            "SELECT tableowner FROM pg_tables WHERE tablename = 'notes'"
        ),
        "app_owner"
    );
    assert_eq!(
        d.stage_pg.psql(
            "app",
            "SELECT has_table_privilege('app_reader', 'notes', 'SELECT')"
        ),
        "t"
    );
    // No scratch or old database is left beside the target.
    let dbs = d.stage_pg.databases();
    assert!(dbs.iter().all(|db| !db.contains("__ferry_")), "{dbs:?}");

    // The manifest describes the stored file.
    let archive = d.stored_archive();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(format!("{}.json", archive.display())).unwrap()).unwrap();
    let bytes = fs::read(&archive).unwrap();
    assert_eq!(manifest["bytes_stored"], bytes.len() as u64);
    assert_eq!(manifest["sha256"], sha256_hex(&bytes));
    assert_eq!(manifest["counts"]["rows"]["public.accounts"], 10000);
    assert_eq!(manifest["environment"], "production");

    // Status and catalog show it.
    let status = d.ferry_json(&["status"]);
    let rows = status["datastores"].as_array().unwrap();
    let prod = rows.iter().find(|r| r["agent"] == "pg-prod").unwrap();
    assert_eq!(prod["last_success"]["result"]["sha256"], manifest["sha256"]);
    let backups = d.ferry_json(&["backups", "--env", "production"]);
    assert_eq!(backups.as_array().unwrap().len(), 1);

    // A second backup the same day gets a time suffix and overwrites nothing.
    d.ferry_ok(&["backup", "pg-prod", "postgres", "--wait"]);
    let files = d.sshd.final_files();
    assert_eq!(files.len(), 8, "{files:?}");
    assert!(
        files
            .iter()
            .any(|f| f.contains(&format!("postgres_backup_{day}T"))),
        "{files:?}"
    );
    assert_eq!(
        fs::read(&archive).unwrap(),
        bytes,
        "the first backup changed"
    );
}

fn chrono_today() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .unwrap();
    stdout(&out).trim().to_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(bytes)?;
            c.wait_with_output()
        })
        .unwrap();
    stdout(&out).split_whitespace().next().unwrap().to_owned()
}

#[test]
fn stored_archive_restores_with_stock_tools_and_only_with_the_identity() {
    let d = Deployment::start();
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    let archive = d.stored_archive();
    let age = require("age", "age");
    require("zstd", "zstd");

    // Nothing of the data is readable in the stored bytes.
    let stored = fs::read(&archive).unwrap();
    assert!(stored.starts_with(b"age-encryption.org/v1"));
    assert!(
        !stored.windows(8).any(|w| w == b"account "),
        "plaintext in the stored file"
    );

    // Stock tools: age -d -i KEY FILE | zstd -d | pg_restore.
    d.stage_pg.psql("postgres", "CREATE ROLE app_owner");
    d.stage_pg.psql("postgres", "CREATE ROLE app_reader");
    d.stage_pg.psql("postgres", "CREATE DATABASE manual");
    let script = format!(
        "set -o pipefail; {age} -d -i {key} {file} | zstd -d | {bin}/pg_restore --exit-on-error -h 127.0.0.1 -p {port} -U postgres -d manual",
        age = age.display(),
        key = d.identity.display(),
        file = archive.display(),
        bin = d.stage_pg.bin_dir().display(),
        port = d.stage_pg.port()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stock restore failed: {}",
        stderr(&out)
    );
    assert_eq!(
        d.stage_pg.table_fingerprints("manual"),
        d.prod_pg.table_fingerprints("app")
    );

    // Another identity cannot decrypt it.
    let other = d.dir.path().join("other.key");
    age_keygen(&other);
    let out = Command::new(&age)
        .arg("-d")
        .arg("-i")
        .arg(&other)
        .arg(&archive)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "decrypted without the staging identity"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn agents_refuse_orders_outside_their_role_and_leave_nothing_behind() {
    let d = Deployment::start();
    runtime().block_on(async {
        let mut stage = agent_client(&d.fleet, "coordinator", d.stage_port, "pg-stage")
            .await
            .unwrap();
        let e = stage
            .run_backup(v1::RunBackupRequest {
                job_id: "01KAAAAAAAAAAAAAAAAAAAAAAA".into(),
                datastore: "postgres".into(),
                backup_type: String::new(),
            })
            .await
            .expect_err("staging agent accepted a backup order");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("role staging"), "{}", e.message());

        let mut prod = agent_client(&d.fleet, "coordinator", d.prod_port, "pg-prod")
            .await
            .unwrap();
        let e = prod
            .run_restore(v1::RunRestoreRequest {
                target: String::new(),
                job_id: "01KAAAAAAAAAAAAAAAAAAAAAAA".into(),
                datastore: "postgres".into(),
                date: String::new(),
                namespaces: Vec::new(),
                verify_only: false,
                file: String::new(),
                check_only: false,
                to_time_unix_ms: 0,
            })
            .await
            .expect_err("production agent accepted a restore order");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("role production"), "{}", e.message());
    });
    assert!(d.sshd.files().is_empty(), "{:?}", d.sshd.files());
    assert!(!d.stage_pg.has_database("app"));
}

#[test]
fn coordinator_refuses_orders_contrary_to_the_role_split() {
    let d = Deployment::start();
    let out = d.ferry(&["backup", "pg-stage", "--wait"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("PermissionDenied") && stderr(&out).contains("role is staging"),
        "{}",
        stderr(&out)
    );
    let out = d.ferry(&["restore", "pg-prod", "--wait"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("role is production"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        d.ferry_json(&["jobs"]),
        serde_json::json!([]),
        "a refused trigger created a job"
    );
    assert!(d.sshd.files().is_empty());
}

#[test]
fn clients_without_a_fleet_certificate_are_refused() {
    let d = Deployment::start();
    // A certificate from another CA, presented to an agent and to the coordinator.
    let rogue = Fleet::new(&d.dir.path().join("rogue"));
    rogue.issue("coordinator");
    rogue.issue("operator");
    runtime().block_on(async {
        let refused = match agent_client(&rogue, "coordinator", d.prod_port, "pg-prod").await {
            Err(_) => true,
            Ok(mut c) => c.describe(v1::DescribeRequest {}).await.is_err(),
        };
        assert!(
            refused,
            "an agent served a client certificate from another CA"
        );
    });
    let out = Command::new(bin("ferry"))
        .arg("--coordinator")
        .arg(format!("https://127.0.0.1:{}", d.coordinator_port))
        .arg("--ca")
        .arg(d.fleet.ca())
        .arg("--cert")
        .arg(rogue.pki.join("operator.pem"))
        .arg("--key")
        .arg(rogue.pki.join("operator.key"))
        .arg("jobs")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the coordinator served a rogue operator: {}",
        stdout(&out)
    );

    // No client certificate at all: a plain TLS client is refused in the handshake.
    runtime().block_on(async {
        ferry_proto::tls::install_crypto_provider();
        let ca = tonic::transport::Certificate::from_pem(fs::read(d.fleet.ca()).unwrap());
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(ca)
            .domain_name("pg-prod");
        let channel =
            tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", d.prod_port))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await;
        let refused = match channel {
            Err(_) => true,
            Ok(ch) => AgentClient::new(ch)
                .describe(v1::DescribeRequest {})
                .await
                .is_err(),
        };
        assert!(refused, "an agent served a client without a certificate");
    });
}

/// `restore_jobs = 2`: the archive is written to `scratch_dir` and restored from there by
/// `pg_restore --jobs 2`; staging then equals production, the written archive is gone, the
/// archive a dead restore left there is removed and named in the report, and a file whose
/// name is not exactly Ferry's is left alone.
#[test]
fn a_restore_with_restore_jobs_restores_from_scratch_dir_and_leaves_nothing_there() {
    let mut scratch = None;
    let d = Deployment::start_with(DEFAULT_DATA, |d| {
        let dir = d.dir.path().join("pg-scratch");
        make_reachable(&dir);
        let config = fs::read_to_string(&d.stage_config).unwrap();
        let edited = config.replacen(
            "target_database = \"app\"\n",
            &format!(
                "target_database = \"app\"\nrestore_jobs = 2\nscratch_dir = \"{}\"\n",
                dir.display()
            ),
            1,
        );
        assert_ne!(edited, config, "no target_database line in {config}");
        fs::write(&d.stage_config, edited).unwrap();
        scratch = Some(dir);
    });
    let scratch = scratch.unwrap();
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    let dead = scratch.join("ferry-pg-postgres-01JDEAD0000000000000000000.dump");
    let lookalike = scratch.join("ferry-pg-postgres-notajob.dump");
    fs::write(&dead, b"left by a restore whose agent was killed").unwrap();
    fs::write(&lookalike, b"not Ferry's").unwrap();

    let out = d.ferry_ok(&["restore", "pg-stage", "--wait"]);
    assert!(out.contains("by pg_restore --jobs 2 from "), "{out}");
    assert!(
        out.contains(&format!(
            "removed {} (job 01JDEAD0000000000000000000)",
            dead.display()
        )),
        "{out}"
    );
    assert_eq!(
        d.stage_pg.table_fingerprints("app"),
        d.prod_pg.table_fingerprints("app"),
        "restored content differs from the source"
    );
    let left: Vec<_> = fs::read_dir(&scratch)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        left,
        [lookalike],
        "only the lookalike is left in scratch_dir"
    );
    let dbs = d.stage_pg.databases();
    assert!(dbs.iter().all(|db| !db.contains("__ferry_")), "{dbs:?}");
}

/// The rows restored are compared with the manifest's counts before the swap. Where the
/// server's insert counters differ from the manifest, every table is counted with
/// `count(*)`, and a difference fails the restore with the live database as it was.
#[test]
fn rows_that_differ_from_the_manifest_fail_the_restore_before_the_swap() {
    let d = Deployment::start();
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    d.ferry_ok(&["restore", "pg-stage", "--wait"]);
    let before = d.stage_pg.table_fingerprints("app");
    let mut claimed = String::new();
    d.edit_todays_manifest("postgres", "pgdump.zst.age", |m| {
        let rows = m["counts"]["rows"].as_object_mut().expect("row counts");
        let (table, n) = rows.iter_mut().next().expect("a table");
        *n = serde_json::json!(n.as_i64().unwrap() + 1);
        claimed = format!("table {table}: {n} rows in the manifest");
    });
    let out = d.ferry(&["restore", "pg-stage", "--wait"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(text.contains(&claimed), "{claimed:?} not in: {text}");
    assert_eq!(
        d.stage_pg.table_fingerprints("app"),
        before,
        "target unchanged"
    );
    let log = d.log_tail("agent-stage");
    assert!(
        log.contains("count(*) of every table"),
        "the counters' difference was decided by count(*):\n{log}"
    );
    assert!(
        !d.stage_pg
            .databases()
            .iter()
            .any(|n| n.contains("__ferry_")),
        "{:?}",
        d.stage_pg.databases()
    );
}

#[test]
fn altered_archive_fails_before_the_target_is_touched() {
    let d = Deployment::start();
    d.stage_pg.psql("postgres", "CREATE DATABASE app");
    d.stage_pg.psql(
        "app",
        "CREATE TABLE marker (x text); INSERT INTO marker VALUES ('before')",
    );
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);

    let archive = d.stored_archive();
    fs::set_permissions(&archive, fs::Permissions::from_mode(0o640)).unwrap();
    let mut bytes = fs::read(&archive).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    fs::write(&archive, &bytes).unwrap();

    let out = d.ferry(&["restore", "pg-stage", "--wait"]);
    assert!(
        !out.status.success(),
        "restore of an altered file succeeded"
    );
    let text = stdout(&out);
    assert!(text.contains("does not match its manifest"), "{text}");
    assert_eq!(d.stage_pg.psql("app", "SELECT x FROM marker"), "before");
    assert!(
        d.stage_pg
            .databases()
            .iter()
            .all(|db| !db.contains("__ferry_"))
    );
    // Not retried: an integrity failure is final.
    let jobs = d.ferry_json(&["jobs"]);
    let restore = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["kind"] == "restore")
        .unwrap();
    assert_eq!(restore["attempt"], 1);
    assert_eq!(restore["state"], "failed");
}

#[test]
fn unknown_backup_server_host_key_is_refused() {
    let d = Deployment::start_with(DEFAULT_DATA, |d| {
        let other = d.dir.path().join("other_host_key");
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", ""])
            .arg("-f")
            .arg(&other)
            .output()
            .unwrap();
        assert!(out.status.success());
        let other_pub = fs::read_to_string(other.with_extension("pub")).unwrap();
        let other_pub: String = other_pub
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let config = fs::read_to_string(&d.prod_config)
            .unwrap()
            .replace(&d.sshd.host_key(), &other_pub);
        fs::write(&d.prod_config, config).unwrap();
    });
    let check = Command::new(bin("ferry-agent"))
        .arg("check")
        .arg("--config")
        .arg(&d.prod_config)
        .output()
        .unwrap();
    assert!(!check.status.success());
    assert!(
        stdout(&check).contains("not the pinned"),
        "{}",
        stdout(&check)
    );

    let out = d.ferry(&["backup", "pg-prod", "--wait"]);
    assert!(!out.status.success());
    assert!(stdout(&out).contains("host key"), "{}", stdout(&out));
    assert!(d.sshd.files().is_empty(), "{:?}", d.sshd.files());
}

#[test]
fn killing_the_agent_mid_upload_leaves_no_file_under_a_final_name() {
    // ~150 MB of poorly compressible text, so the upload lasts long enough to be cut.
    let data = "CREATE TABLE big (id int, body text);
        INSERT INTO big SELECT g, md5(random()::text) || md5(random()::text) || md5(random()::text) || md5(random()::text)
        FROM generate_series(1, 1000000) g;";
    let mut d = Deployment::start_with(data, |_| {});
    let out = d.ferry_ok(&["backup", "pg-prod"]);
    let job = out.trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let growing = d.sshd.files().iter().any(|f| {
            f.ends_with(".partial")
                && f.contains("postgres_backup_")
                && fs::metadata(d.sshd.root().join(f))
                    .map(|m| m.len() > 4 << 20)
                    .unwrap_or(false)
        });
        if growing {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no partial upload appeared: {:?}\n{}",
            d.sshd.files(),
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d.procs.get_mut("agent-prod").unwrap().kill();

    // The coordinator fails the job (after its retry finds the agent gone).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = d.ferry_json(&["job", &job]);
        if j["state"] == "failed" {
            break;
        }
        assert_ne!(j["state"], "succeeded");
        assert!(
            Instant::now() < deadline,
            "job not failed: {j}\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        d.sshd.final_files().is_empty(),
        "{:?}",
        d.sshd.final_files()
    );
}

#[test]
fn bad_configs_fail_at_start_naming_the_field() {
    let d = Deployment::start();
    let dir = d.dir.path();
    let agent_config = fs::read_to_string(&d.prod_config).unwrap();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown key",
            agent_config.replace(
                "environment = \"production\"",
                "environment = \"production\"\ncolour = \"blue\"",
            ),
            "colour",
        ),
        (
            "missing field",
            agent_config.replace("environment = \"production\"\n", ""),
            "environment",
        ),
        (
            "staging identity on production",
            agent_config.replace(
                "[encryption]\n",
                &format!(
                    "[encryption]\nidentity_file = \"{}\"\n",
                    d.identity.display()
                ),
            ),
            "encryption.identity_file",
        ),
        (
            "escaping datastore name",
            agent_config.replace("name = \"postgres\"", "name = \"../etc\""),
            "datastores[0].name",
        ),
    ];
    for (what, text, field) in cases {
        let path = dir.join("bad-agent.toml");
        fs::write(&path, text).unwrap();
        let out = Command::new(bin("ferry-agent"))
            .arg("run")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{what}: the agent started");
        assert!(stderr(&out).contains(field), "{what}: {}", stderr(&out));
    }
    let coordinator = fs::read_to_string(&d.coordinator_config).unwrap();
    let conflict = format!(
        "{coordinator}\n[[schedules]]\nagent = \"pg-prod\"\nkind = \"backup\"\ncron = \"0 2 * * *\"\n\
         [[schedules]]\nagent = \"pg-prod\"\nkind = \"restore\"\ncron = \"0 3 * * *\"\n"
    );
    let staging_backup = format!(
        "{coordinator}\n[[schedules]]\nagent = \"pg-stage\"\nkind = \"backup\"\ncron = \"0 2 * * *\"\n"
    );
    for (what, text, field) in [
        ("both kinds on one agent", conflict, "schedules[1].kind"),
        ("backup on staging", staging_backup, "schedules[0].kind"),
        (
            "unknown key",
            coordinator.replacen("listen", "lisen", 1),
            "lisen",
        ),
    ] {
        let path = dir.join("bad-coordinator.toml");
        fs::write(&path, text).unwrap();
        let out = Command::new(bin("ferry-coordinator"))
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{what}: the coordinator started");
        assert!(stderr(&out).contains(field), "{what}: {}", stderr(&out));
    }
}
