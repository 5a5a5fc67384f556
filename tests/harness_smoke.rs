//! The harness itself, without any Ferry binary: a throwaway PostgreSQL takes data and
//! fingerprints it, and the backup server's sshd accepts a client key, serves SFTP as
//! `ferrybk` under the pinned host key only, and shows the uploaded file under its root.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use ferry_tests::*;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn harness_starts_postgres_and_sshd() {
    let pg = Postgres::start();
    pg.create_database("smoke");
    pg.psql(
        "smoke",
        "CREATE TABLE items (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body text);
         INSERT INTO items (body) SELECT md5(g::text) FROM generate_series(1, 100) g;
         INSERT INTO items (body) VALUES (E'quote '' tab\\t newline\\n é');
         CREATE SCHEMA other; CREATE TABLE other.empty (x int);",
    );
    assert_eq!(pg.psql("smoke", "SELECT count(*) FROM items"), "101");
    assert!(pg.has_database("smoke"));
    assert!(pg.bin_dir().join("pg_dump").exists());
    let fp = pg.table_fingerprints("smoke");
    assert_eq!(
        fp.keys().collect::<Vec<_>>(),
        ["other.empty", "public.items"]
    );
    assert_eq!(fp["public.items"].0, 101);
    assert_eq!(fp["other.empty"].0, 0);
    // The fingerprint sees a change to one value.
    pg.psql("smoke", "UPDATE items SET body = 'changed' WHERE id = 50");
    let after = pg.table_fingerprints("smoke");
    assert_eq!(after["public.items"].0, 101);
    assert_ne!(after["public.items"].1, fp["public.items"].1);
    assert_eq!(after["other.empty"], fp["other.empty"]);
    // The async client reaches the same cluster.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let c = pg.client("smoke").await;
        let n: i64 = c
            .query_one("SELECT count(*) FROM items", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 101);
    });

    let sshd = Sshd::start();
    let key = sshd.add_client_key();
    assert!(sshd.host_key().starts_with("ssh-ed25519 AAAA"));
    assert_eq!(sshd.host_key().split(' ').count(), 2, "{}", sshd.host_key());
    assert_eq!(fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
    let local = sshd.dir().join("hello.txt");
    fs::write(&local, "hello backup server\n").unwrap();
    let root = sshd.root().display().to_string();

    // The pinned host key, as the agents use it.
    let known_hosts = sshd.dir().join("pinned_known_hosts");
    fs::write(
        &known_hosts,
        format!("[127.0.0.1]:{} {}\n", sshd.port(), sshd.host_key()),
    )
    .unwrap();
    let sftp = |known_hosts: &std::path::Path, batch: &str| {
        let mut cmd = Command::new(require("sftp", "openssh-client"));
        cmd.args(["-b", "-", "-F", "/dev/null", "-i"])
            .arg(&key)
            .arg("-P")
            .arg(sshd.port().to_string())
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .args([
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
            ])
            .arg(format!("{BACKUP_USER}@127.0.0.1"));
        output_within(
            &mut cmd,
            batch.as_bytes(),
            std::time::Duration::from_secs(60),
        )
    };
    let out = sftp(
        &known_hosts,
        &format!(
            "mkdir {root}/production\nput {} {root}/production/hello.txt\nls -la {root}/production\n",
            local.display()
        ),
    );
    assert!(
        out.status.success(),
        "sftp failed: {}\n{}\nsshd log:\n{}",
        text(&out.stdout),
        text(&out.stderr),
        sshd.log()
    );
    assert!(
        text(&out.stdout).contains("hello.txt"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(sshd.files(), ["production/hello.txt"]);
    let stored = sshd.root().join("production/hello.txt");
    assert_eq!(
        fs::read_to_string(&stored).unwrap(),
        "hello backup server\n"
    );
    // Written by the backup user, not by root.
    let uid = run_ok(Command::new("id").args(["-u", BACKUP_USER]));
    assert_eq!(fs::metadata(&stored).unwrap().uid().to_string(), uid.trim());

    // Hidden files are listed too; the harness's own helper works the same way.
    let out = sshd.sftp(
        &key,
        &format!(
            "put {} {root}/production/.hello.txt.partial\n",
            local.display()
        ),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        sshd.files(),
        ["production/.hello.txt.partial", "production/hello.txt"]
    );
    assert_eq!(sshd.final_files(), ["production/hello.txt"]);

    // Another host key is refused: the pin is real.
    let other = sshd.dir().join("other_host_key");
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", ""])
            .arg("-f")
            .arg(&other),
    );
    let other_pub = fs::read_to_string(other.with_extension("pub")).unwrap();
    let wrong = sshd.dir().join("wrong_known_hosts");
    fs::write(
        &wrong,
        format!(
            "[127.0.0.1]:{} {}\n",
            sshd.port(),
            other_pub
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        ),
    )
    .unwrap();
    let out = sftp(&wrong, &format!("ls {root}\n"));
    assert!(
        !out.status.success(),
        "connected despite a wrong pinned host key"
    );
    assert!(
        text(&out.stderr).contains("HOST IDENTIFICATION HAS CHANGED")
            || text(&out.stderr).contains("Host key verification failed"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn free_ports_are_distinct_and_bindable() {
    let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
    let mut unique = ports.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ports.len());
    for p in ports.iter().take(20) {
        std::net::TcpListener::bind(("127.0.0.1", *p)).unwrap();
    }
}

#[test]
fn config_writers_escape_and_omit_what_is_unset() {
    let tls = Tls {
        cert: "/x/c.pem".into(),
        key: "/x/c.key".into(),
        ca: "/x/ca.pem".into(),
    };
    let agent = AgentConfig {
        id: "pg-stage".into(),
        role: AgentRole::Staging,
        environment: "staging".into(),
        listen: "127.0.0.1:7443".parse().unwrap(),
        tls: tls.clone(),
        backup_server: BackupServer {
            host: "127.0.0.1".into(),
            port: 2222,
            user: BACKUP_USER.into(),
            private_key_file: "/x/id \"stage\"".into(),
            host_key: "ssh-ed25519 AAAA".into(),
            root: "/x/backups".into(),
            io_timeout_seconds: None,
        },
        encryption: Encryption::Identity("/x/staging.key".into()),
        source_environment: Some("production".into()),
        datastores: vec![Datastore::Postgres(PostgresDatastore {
            name: "postgres".into(),
            host: "127.0.0.1".into(),
            port: 5432,
            user: "postgres".into(),
            database: None,
            target_database: Some("app".into()),
            bin_dir: "/usr/lib/postgresql/15/bin".into(),
        })],
    };
    let text = agent.to_toml();
    assert!(
        text.contains("private_key_file = \"/x/id \\\"stage\\\"\"\n"),
        "{text}"
    );
    assert!(
        text.contains("identity_file = \"/x/staging.key\"\n"),
        "{text}"
    );
    assert!(
        text.contains("[restore]\nsource_environment = \"production\"\n"),
        "{text}"
    );
    assert!(text.contains("target_database = \"app\"\n"), "{text}");
    assert!(
        !text.contains("recipients")
            && !text.contains("io_timeout")
            && !text.contains("\ndatabase ="),
        "{text}"
    );

    let coordinator = CoordinatorConfig {
        listen: "127.0.0.1:7000".parse().unwrap(),
        store: "/x/c.redb".into(),
        agent_timeout_seconds: 30,
        tls,
        retry: None,
        agents: vec![AgentEntry::of(&agent)],
        operators: vec![Operator::admin("alice"), Operator::new("bob", "viewer")],
        schedules: vec![Schedule::restore("pg-stage", Some("postgres"), "0 5 * * *")],
    };
    let text = coordinator.to_toml();
    assert!(
        text.contains("address = \"https://127.0.0.1:7443\"\nrole = \"staging\"\n"),
        "{text}"
    );
    assert!(text.contains("[[schedules]]\nagent = \"pg-stage\"\ndatastore = \"postgres\"\nkind = \"restore\"\ncron = \"0 5 * * *\"\n"), "{text}");
    assert!(!text.contains("[retry]"), "{text}");
    assert!(
        text.contains(
            "[[operators]]\nname = \"alice\"\nrole = \"admin\"\n\n[[operators]]\nname = \"bob\"\nrole = \"viewer\"\n"
        ),
        "{text}"
    );
}

#[test]
fn set_top_level_puts_the_key_first_and_replaces_only_a_top_level_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    fs::write(
        &path,
        "id = \"a\"\ncompression_level = 9\n\n[tls]\ncompression_level = \"a table's\"\n",
    )
    .unwrap();
    set_top_level(&path, "compression_level", "1");
    set_top_level(&path, "state_dir", &toml_str("/x/state"));
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        "state_dir = \"/x/state\"\ncompression_level = 1\nid = \"a\"\n\n[tls]\ncompression_level = \"a table's\"\n"
    );
}
