//! pgBackRest end to end against real PostgreSQL 15 and pgBackRest 2.45: a full backup,
//! changes, a differential backup, the repository on the backup server encrypted, and a
//! `restore --delta` of the diff into a staging cluster whose every row then equals
//! production's; a restore from a damaged repository stops before the staging cluster is
//! touched.

use std::fs;
use std::path::Path;

use ferry_tests::*;

struct PgbrFleet {
    d: Deployment,
    prod: Postgres,
    stage: Postgres,
}

fn deploy() -> PgbrFleet {
    let mut clusters = None;
    let d = Deployment::start_with("SELECT 1", |d| {
        let dir = d.dir.path();
        let pass = dir.join("pgbackrest.pass");
        fs::write(&pass, "correct horse battery staple 2026\n").unwrap();
        chmod(&pass, 0o600);
        let prod_conf = dir.join("pgbackrest-prod.conf");
        let prod = Postgres::start_in_with_conf(
            &dir.join("pgbr-prod"),
            &format!(
                "archive_mode = on\nwal_level = replica\narchive_command = 'pgbackrest --config={} --stanza=main archive-push %p'\n",
                prod_conf.display()
            ),
        );
        let stage = Postgres::start_in(&dir.join("pgbr-stage"));
        append(
            &d.prod_config,
            &format!(
                "[[datastores]]\nname = \"pgbr\"\nkind = \"pgbackrest\"\ndata_dir = {}\nport = {}\nsocket_dir = {}\nrepo_dir = {}\nconfig_file = {}\ncipher_pass_file = {}\n",
                toml_str(&prod.data_dir().display().to_string()),
                prod.port(),
                toml_str(&prod.dir().join("sock").display().to_string()),
                toml_str(&dir.join("pgbr-prod-repo").display().to_string()),
                toml_str(&prod_conf.display().to_string()),
                toml_str(&pass.display().to_string()),
            ),
        );
        let data = stage.data_dir().display().to_string();
        let as_postgres = |args: &[&str]| pg_ctl_command(&stage, args);
        let stop = as_postgres(&["-m", "fast", "-w", "stop"]);
        // The restored postgresql.conf is production's: the port and socket come from -o.
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            stage.port(),
            stage.dir().join("sock").display()
        );
        let log = stage.dir().join("postgres.log").display().to_string();
        let start = as_postgres(&["-l", &log, "-w", "-t", "60", "-o", &opts, "start"]);
        append(
            &d.stage_config,
            &format!(
                "[[datastores]]\nname = \"pgbr\"\nkind = \"pgbackrest\"\ndata_dir = {}\nport = {}\nsocket_dir = {}\nrepo_dir = {}\nconfig_file = {}\ncipher_pass_file = {}\nstop_command = {}\nstart_command = {}\n",
                toml_str(&data),
                stage.port(),
                toml_str(&stage.dir().join("sock").display().to_string()),
                toml_str(&dir.join("pgbr-stage-repo").display().to_string()),
                toml_str(&dir.join("pgbackrest-stage.conf").display().to_string()),
                toml_str(&pass.display().to_string()),
                toml_list(&stop),
                toml_list(&start),
            ),
        );
        clusters = Some((prod, stage));
    });
    let (prod, stage) = clusters.unwrap();
    prod.psql("postgres", "CREATE DATABASE shop");
    prod.psql(
        "shop",
        "CREATE TABLE orders (id bigint PRIMARY KEY, item text, qty int, note text);
         INSERT INTO orders SELECT g, 'item-' || (g % 500), g % 9, md5(g::text) FROM generate_series(1, 100000) g;",
    );
    PgbrFleet { d, prod, stage }
}

fn starts_encrypted(path: &Path) -> bool {
    fs::read(path).is_ok_and(|b| b.starts_with(b"Salted__"))
}

#[test]
fn pgbackrest_full_then_diff_restores_every_row_into_staging() {
    let f = deploy();
    let out =
        f.d.ferry_ok(&["backup", "pg-prod", "pgbr", "--type", "full", "--wait"]);
    assert!(out.contains("pgBackRest full backup"), "{out}");

    f.prod.psql(
        "shop",
        "INSERT INTO orders SELECT g, 'late-' || g, 1, md5(g::text) FROM generate_series(100001, 120000) g;
         UPDATE orders SET qty = qty + 100 WHERE id % 1000 = 0;
         DELETE FROM orders WHERE id BETWEEN 500 AND 599;
         CREATE TABLE refunds AS SELECT id, qty FROM orders WHERE id % 97 = 0;",
    );
    let out =
        f.d.ferry_ok(&["backup", "pg-prod", "pgbr", "--type", "diff", "--wait"]);
    assert!(out.contains("pgBackRest diff backup"), "{out}");

    // The repository on the backup server is pgBackRest's ciphertext.
    let repo = f.d.sshd.root().join("production/pgbr");
    assert!(starts_encrypted(&repo.join("backup/main/backup.info")));
    assert!(starts_encrypted(&repo.join("archive/main/archive.info")));

    // `ferry backups` lists the repository's full and diff backups, with sizes and times.
    let listed = f.d.ferry_json(&["backups"]);
    let kinds: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["datastore"] == "pgbr")
        .map(|b| b["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["pgbackrest diff", "pgbackrest full"], "{listed}");
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["datastore"] == "pgbr")
            .all(|b| b["size_bytes"].as_u64() > Some(0)
                && b["stored_path"]
                    .as_str()
                    .unwrap()
                    .ends_with("production/pgbr")),
        "{listed}"
    );

    let out =
        f.d.ferry_ok(&["restore", "pg-stage", "--datastore", "pgbr", "--wait"]);
    assert!(out.contains("restored pgBackRest diff backup"), "{out}");
    assert_eq!(
        f.prod.table_fingerprints("shop"),
        f.stage.table_fingerprints("shop"),
        "staging's rows differ from production's"
    );
}

#[test]
fn pgbackrest_restore_from_a_damaged_repository_leaves_staging_running_as_it_was() {
    let f = deploy();
    f.stage.psql("postgres", "CREATE DATABASE before_restore");
    f.d.ferry_ok(&["backup", "pg-prod", "pgbr", "--type", "full", "--wait"]);
    let info =
        f.d.sshd
            .root()
            .join("production/pgbr/backup/main/backup.info");
    chmod(&info, 0o640);
    let mut bytes = fs::read(&info).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    bytes[n - 3] ^= 0xff;
    fs::write(&info, bytes).unwrap();
    let copy =
        f.d.sshd
            .root()
            .join("production/pgbr/backup/main/backup.info.copy");
    let _ = fs::remove_file(copy);

    let out =
        f.d.ferry(&["restore", "pg-stage", "--datastore", "pgbr", "--wait"]);
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("the target was left as it was"), "{text}");
    assert!(
        f.stage.has_database("before_restore"),
        "the staging cluster is not as it was"
    );
}
