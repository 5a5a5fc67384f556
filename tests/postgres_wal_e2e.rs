//! WAL shipping end to end against real PostgreSQL 15: `archive_command = 'ferry-agent
//! wal-push %p'` hands each file to the running production agent over its `[wal]` socket,
//! which stores it compressed and encrypted under `production/<datastore>-wal/<timeline>/`
//! on the backup server (a real sshd). Checked with stock tools (`age -d | zstd -d` equal
//! to the segment in `pg_wal`, `pg_waldump` reading it) and with PostgreSQL's own
//! `pg_stat_archiver`: a file pushed twice with the same content is accepted, with other
//! content refused loudly; with the agent down every push fails with a clear message, and
//! once it is back the backlog is archived with no segment missing. On the way back, a
//! base backup unpacked with stock tools recovers to a chosen time with `restore_command =
//! 'ferry-agent wal-get %f %p'` through the staging agent. On an S3 target (a real Ceph
//! RGW) each file is a version of its key, named in its record, which wal-get reads.
//! `ferry restore --to-time` while pgbench writes: restored to two instants, staging's
//! tables equal production's at each; an instant beyond the archive or before the first
//! base backup refused, an altered segment failing the restore before the swap; across a
//! promoted standby's timeline switch (its history file archived, the restore following
//! it); prune removing the WAL before the oldest kept base backup, which still replays; a
//! scheduled drill to a random instant; and the backup server unreachable while
//! PostgreSQL archives (pushes fail, the segments wait, none is missing once it is back).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_tests::*;
use sha2::{Digest, Sha256};

/// Everything of one test: the deployment, production's archiving cluster, the agent
/// binary the `postgres` user runs, and the `[wal]` sockets of both agents.
struct Wal {
    d: Deployment,
    pg: Postgres,
    agent: PathBuf,
    socket: PathBuf,
    stage_socket: PathBuf,
    /// Staging's cluster `wal-stage`, which restores replace, when the test asked for one.
    stage: Option<Postgres>,
}

/// A deployment whose production agent serves `[wal]` on a socket of the test's
/// directory, and a production cluster `wal-prod` archiving through `wal-push` (a copy of
/// the agent binary the `postgres` user can run); the staging agent has a physical
/// datastore `pgphys` too and serves `wal-get` on a socket of its own.
fn deploy() -> Wal {
    deploy_with(None, |_| {})
}

/// [`deploy`], with a staging cluster `wal-stage` that staging's `pgphys` restores into
/// (set up as `staging` says, its smoke check's least number 1) when `staging` is given;
/// `tweak` run last on the deployment before anything starts.
fn deploy_with(staging: Option<Staging>, tweak: impl FnOnce(&mut Deployment)) -> Wal {
    let mut out = None;
    let d = Deployment::start_with(DEFAULT_DATA, |d| {
        let dir = d.dir.path();
        let (pg, agent, socket) = archiving_cluster(dir, "");
        let wal = |socket: &Path| {
            format!(
                "[wal]\nsocket = {}\ngroup = \"postgres\"\nagent_binary = {}\n",
                toml_str(&socket.display().to_string()),
                toml_str(&agent.display().to_string())
            )
        };
        append(&d.prod_config, &production_entry(&pg));
        append(&d.prod_config, &wal(&socket));
        let stage_socket = dir.join("run-stage").join("wal.sock");
        let stage = staging.map(|staging| {
            let stage = Postgres::start_in(&dir.join("wal-stage"));
            append(&d.stage_config, &staging_entry(&stage, &staging, 1));
            stage
        });
        if stage.is_none() {
            append(
                &d.stage_config,
                &format!(
                    "[[datastores]]\nname = \"pgphys\"\nkind = \"postgres\"\nmethod = \"physical\"\n\
                     bin_dir = {}\ndata_dir = {}\nstop_command = [\"true\"]\nstart_command = [\"true\"]\n",
                    toml_str(&pg.bin_dir().display().to_string()),
                    toml_str(&dir.join("never-restored").display().to_string()),
                ),
            );
        }
        append(&d.stage_config, &wal(&stage_socket));
        tweak(d);
        out = Some((pg, agent, socket, stage_socket, stage));
    });
    let (pg, agent, socket, stage_socket, stage) = out.unwrap();
    Wal {
        d,
        pg,
        agent,
        socket,
        stage_socket,
        stage,
    }
}

/// `pg_stat_archiver`: `(archived_count, last_archived_wal, failed_count)`.
fn archiver(pg: &Postgres) -> (i64, String, i64) {
    let row = pg.psql(
        "postgres",
        "SELECT archived_count, coalesce(last_archived_wal, ''), failed_count FROM pg_stat_archiver",
    );
    let f: Vec<&str> = row.trim().split('|').collect();
    (
        f[0].parse().unwrap(),
        f[1].to_owned(),
        f[2].parse().unwrap(),
    )
}

/// Writes some rows and switches to a new segment; the name of the segment just closed.
fn write_and_switch(pg: &Postgres, round: usize) -> String {
    pg.psql(
        "postgres",
        &format!(
            "CREATE TABLE IF NOT EXISTS churn (round int, body text);
             INSERT INTO churn SELECT {round}, md5(g::text) || repeat('x', g % 100) FROM generate_series(1, 5000) g;"
        ),
    );
    pg.psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())")
        .trim()
        .to_owned()
}

/// Waits until PostgreSQL says `segment` (or a later one) was archived.
fn wait_archived(pg: &Postgres, segment: &str, d: &Deployment) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, last, _) = archiver(pg);
        if last.len() == 24 && last.as_str() >= segment {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{segment} not archived within 60 s: pg_stat_archiver {:?}\npostgres log:\n{}\nagent log:\n{}",
            archiver(pg),
            pg.log_tail(30),
            d.log_tail("agent-prod")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The stored WAL files of `pgphys` on timeline 1 (names without `.zst.age`), and the
/// folder.
fn stored(d: &Deployment) -> (Vec<String>, PathBuf) {
    let dir = d.sshd.root().join("production/pgphys-wal/00000001");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_suffix(".zst.age").map(str::to_owned))
        .collect();
    names.sort();
    (names, dir)
}

/// `age -d -i IDENTITY FILE | zstd -d`, the stock tools.
fn decrypt(d: &Deployment, file: &Path) -> Vec<u8> {
    let age = require("age", "age");
    require("zstd", "zstd");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; {} -d -i {} {} | zstd -d",
            age.display(),
            d.identity.display(),
            file.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "decrypting {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `ferry-agent wal-push --socket SOCKET PATH`, run in `cwd`.
fn wal_push(socket: &Path, cwd: &Path, path: &str) -> std::process::Output {
    Command::new(bin("ferry-agent"))
        .args(["wal-push", "--socket"])
        .arg(socket)
        .arg(path)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

#[test]
fn archived_segments_decrypt_to_the_bytes_postgres_wrote_and_a_second_push_is_compared() {
    // The coordinator reads the archive with its maintenance key, for the archive's lag.
    let Wal { d, pg, socket, .. } = deploy_with(None, |d| {
        let key = d.maintenance_key();
        append(&d.coordinator_config, &d.sftp_table("maintenance", &key));
    });
    let pg_wal = pg.data_dir().join("pg_wal");

    // The socket: mode 0660, group postgres (wal-push runs as the PostgreSQL user).
    let meta = fs::metadata(&socket).unwrap();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o777, 0o660, "socket mode");
    let postgres_gid = run_ok(Command::new("id").args(["-g", "postgres"]));
    assert_eq!(meta.gid().to_string(), postgres_gid.trim());

    let switched: Vec<String> = (0..3).map(|i| write_and_switch(&pg, i)).collect();
    wait_archived(&pg, switched.last().unwrap(), &d);
    let (names, dir) = stored(&d);
    for seg in &switched {
        assert!(names.contains(seg), "{seg} not stored: {names:?}");
        // Stock tools give back the very bytes PostgreSQL wrote (still in pg_wal: no
        // checkpoint has recycled it).
        let plain = decrypt(&d, &dir.join(format!("{seg}.zst.age")));
        let original = fs::read(pg_wal.join(seg)).unwrap();
        assert_eq!(plain.len(), 16 * 1024 * 1024, "{seg}");
        assert!(plain == original, "{seg} decrypts to other bytes");
        // Its record names the plaintext's size and SHA-256.
        let record: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join(format!("{seg}.zst.age.json"))).unwrap())
                .unwrap();
        assert_eq!(record["sha256"], sha256_hex(&original), "{record}");
        assert_eq!(record["bytes"], original.len());
        assert_eq!(record["kind"], "segment");
        assert_eq!(record["datastore"], "pgphys");
    }
    // `ferry status` shows the newest archived segment and its lag, read from the archive.
    let newest = switched.last().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let archive = loop {
        let status: serde_json::Value =
            serde_json::from_str(&d.ferry_ok(&["status", "--output", "json"])).unwrap();
        let found = status["archives"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["datastore"] == "pgphys").cloned());
        match found {
            Some(a) if a["newest_file"] == newest.as_str() => break a,
            other => assert!(
                Instant::now() < deadline,
                "no archive status naming {newest}: {other:?}\n{}",
                d.log_tail("coordinator")
            ),
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(archive["environment"], "production", "{archive}");
    let lag = archive["lag_seconds"].as_i64().unwrap();
    assert!((0..60).contains(&lag), "{archive}");
    assert!(archive["last_error"].is_null(), "{archive}");
    let table = d.ferry_ok(&["status"]);
    assert!(
        table.contains("WAL ARCHIVE OF") && table.contains(newest.as_str()),
        "{table}"
    );

    // The first segment kept aside: the base backup's checkpoint below recycles pg_wal.
    let copy = d.dir.path().join("again");
    make_reachable(&copy);
    let original = fs::read(pg_wal.join(&switched[0])).unwrap();
    fs::write(copy.join(&switched[0]), &original).unwrap();

    // pg_waldump reads the decrypted segment as WAL: the rows' inserts and the switch.
    let seg = &switched[1];
    let scratch = d.dir.path().join("waldump");
    make_reachable(&scratch);
    fs::write(
        scratch.join(seg),
        decrypt(&d, &dir.join(format!("{seg}.zst.age"))),
    )
    .unwrap();
    let dump = Command::new(pg.bin_dir().join("pg_waldump"))
        .arg("-p")
        .arg(&scratch)
        .arg(seg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(
        text.contains("rmgr: Heap") && text.contains("INSERT"),
        "{text:.2000}"
    );
    assert!(text.contains("SWITCH"), "no XLOG SWITCH record in {seg}");

    // A base backup's history file is archived too.
    let out = d.ferry_ok(&["backup", "pg-prod", "pgphys", "--wait"]);
    assert!(out.contains("succeeded"), "{out}");
    let after = write_and_switch(&pg, 9);
    wait_archived(&pg, &after, &d);
    let (names, _) = stored(&d);
    assert!(
        names.iter().any(|n| n.ends_with(".backup")),
        "no backup history file stored: {names:?}"
    );

    // Pushed again with the same content (PostgreSQL retrying): accepted, nothing changed.
    let record_path = dir.join(format!("{}.zst.age.json", switched[0]));
    let record_before = fs::read(&record_path).unwrap();
    let again = wal_push(&socket, &copy, &switched[0]);
    assert!(
        again.status.success(),
        "same content refused: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(fs::read(&record_path).unwrap(), record_before);

    // Other content under the same name: refused loudly, the stored file untouched.
    let mut altered = fs::read(copy.join(&switched[0])).unwrap();
    altered[4096] ^= 0xff;
    fs::write(copy.join(&switched[0]), &altered).unwrap();
    let refused = wal_push(&socket, &copy, &switched[0]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "different content accepted");
    assert!(
        stderr.contains("already archived with different content")
            && stderr.contains(&sha256_hex(&altered)),
        "{stderr}"
    );
    assert_eq!(fs::read(&record_path).unwrap(), record_before);
    assert!(
        decrypt(&d, &dir.join(format!("{}.zst.age", switched[0]))) == original,
        "the stored file changed"
    );
    assert!(
        d.log_tail("agent-prod").contains("content_differs"),
        "the refusal is not in the agent's log"
    );

    // A name that is not a WAL file name never leaves wal-push.
    fs::write(copy.join("notes.txt"), b"x").unwrap();
    let bad = wal_push(&socket, &copy, "notes.txt");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("is not a WAL file name"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// `(log, seg)` of a segment name as one sequence number (16 MiB segments: 256 a log).
fn sequence(segment: &str) -> u64 {
    let log = u64::from_str_radix(&segment[8..16], 16).unwrap();
    let seg = u64::from_str_radix(&segment[16..24], 16).unwrap();
    log * 256 + seg
}

/// `ferry-agent check --offline` of `config` written to `name` in the test's directory:
/// its success and its output.
fn check_offline(d: &Deployment, name: &str, config: &str) -> (bool, String) {
    let path = d.dir.path().join(name);
    fs::write(&path, config).unwrap();
    let out = Command::new(bin("ferry-agent"))
        .args(["check", "--offline", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn with_the_agent_down_pushes_fail_clearly_and_the_backlog_is_archived_once_it_is_back() {
    let Wal {
        mut d, pg, socket, ..
    } = deploy();

    // What [wal] accepts: production only, a known group, a datastore that archives WAL.
    let prod = fs::read_to_string(&d.prod_config).unwrap();
    let (ok, out) = check_offline(&d, "good.toml", &prod);
    assert!(ok, "{out}");
    let wal = |group: &str| {
        format!(
            "[wal]\nsocket = {}\ngroup = {}\n",
            toml_str(&socket.display().to_string()),
            toml_str(group)
        )
    };
    let refusals = [
        (
            prod.replace("group = \"postgres\"", "group = \"no-such-group\""),
            "no OS group \"no-such-group\"",
        ),
        (
            format!("{}\n{}", d.prod_agent.to_toml(), wal("postgres")),
            "no datastore archives WAL",
        ),
        (
            format!("{}\n{}", d.stage_agent.to_toml(), wal("postgres")),
            "no datastore archives WAL",
        ),
    ];
    for (i, (config, expected)) in refusals.iter().enumerate() {
        let (ok, out) = check_offline(&d, &format!("bad{i}.toml"), config);
        assert!(!ok && out.contains(expected), "{expected}: {out}");
    }
    // A second agent on the same socket is refused before it serves anything.
    let second = run_agent_expecting_exit(&d.prod_config);
    let text = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    assert!(
        text.contains("another process listens on the WAL socket"),
        "{text}"
    );

    let first = write_and_switch(&pg, 0);
    wait_archived(&pg, &first, &d);

    d.kill("agent-prod");
    let (archived_before, _, failed_before) = archiver(&pg);
    let backlog: Vec<String> = (1..4).map(|i| write_and_switch(&pg, i)).collect();
    // PostgreSQL counts the failures and logs wal-push's message; nothing is archived.
    let deadline = Instant::now() + Duration::from_secs(60);
    while archiver(&pg).2 <= failed_before {
        assert!(Instant::now() < deadline, "no archive failure counted");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (archived, _, _) = archiver(&pg);
    assert_eq!(archived, archived_before, "archived with the agent down");
    let log = pg.log_tail(50);
    assert!(
        log.contains("ferry-agent wal-push: error: cannot reach the Ferry agent"),
        "{log}"
    );
    // The segments wait in pg_wal.
    for seg in &backlog {
        assert!(pg.data_dir().join("pg_wal").join(seg).exists(), "{seg}");
    }

    d.start_agent("agent-prod");
    let last = backlog.last().unwrap();
    wait_archived(&pg, last, &d);
    let (names, _) = stored(&d);
    let segments: Vec<&String> = names.iter().filter(|n| n.len() == 24).collect();
    let (lo, hi) = (
        sequence(segments[0]),
        sequence(segments[segments.len() - 1]),
    );
    assert!(hi >= sequence(last), "{last} missing from {names:?}");
    let have: Vec<u64> = segments.iter().map(|s| sequence(s)).collect();
    let missing: Vec<u64> = (lo..=hi).filter(|n| !have.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "segments missing: {missing:?} of {names:?}"
    );
    for seg in &backlog {
        assert!(names.contains(seg), "{seg} not stored: {names:?}");
    }
}

/// Readies `dir` (holding a `data` directory) for a server the test starts with `pg_ctl`:
/// a `sock` directory, everything given to `postgres`; a free port and the `pg_ctl -o`
/// options that put the server on it, on 127.0.0.1 and that socket directory.
fn server_dir(dir: &Path) -> (u16, String) {
    let sock = dir.join("sock");
    fs::create_dir(&sock).unwrap();
    run_ok(
        Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir),
    );
    let port = free_port();
    (
        port,
        format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1",
            sock.display()
        ),
    )
}

/// `SELECT clock_timestamp()` in UTC, as `recovery_target_time` takes it.
fn now_utc(pg: &Postgres) -> String {
    pg.psql(
        "postgres",
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'",
    )
    .trim()
    .to_owned()
}

#[test]
fn a_base_backup_replays_archived_wal_through_wal_get_to_a_chosen_time() {
    let Wal {
        d,
        pg,
        agent,
        socket,
        stage_socket,
        ..
    } = deploy();
    pg.psql(
        "postgres",
        "CREATE TABLE events (id int, phase text); INSERT INTO events SELECT g, 'base' FROM generate_series(1, 1000) g;",
    );
    let out = d.ferry_ok(&["backup", "pg-prod", "pgphys", "--wait"]);
    assert!(out.contains("succeeded"), "{out}");
    let (name, _) = d.todays_backup("pgphys", "tar.zst.age");

    // After the base backup: rows before the target time, then rows after it, in later
    // segments that only the WAL archive holds.
    pg.psql(
        "postgres",
        "INSERT INTO events SELECT g, 'before' FROM generate_series(1, 500) g",
    );
    write_and_switch(&pg, 1);
    std::thread::sleep(Duration::from_millis(1100));
    let target = now_utc(&pg);
    std::thread::sleep(Duration::from_millis(1100));
    pg.psql(
        "postgres",
        "INSERT INTO events SELECT g, 'after' FROM generate_series(1, 700) g",
    );
    let last = write_and_switch(&pg, 2);
    wait_archived(&pg, &last, &d);

    // The base backup unpacked with stock tools, then PostgreSQL recovering from it with
    // `restore_command = 'ferry-agent wal-get %f %p'` through the staging agent.
    let restored = d.dir.path().join("pitr");
    make_reachable(&restored);
    let data = restored.join("data");
    fs::create_dir(&data).unwrap();
    let age = require("age", "age");
    let tar = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; {} -d -i {} {} | zstd -d | tar -x -C {} && chown -R postgres:postgres {} && chmod 0700 {}",
            age.display(),
            d.identity.display(),
            d.sshd.root().join(&name).display(),
            data.display(),
            restored.display(),
            data.display()
        ))
        .output()
        .unwrap();
    assert!(
        tar.status.success(),
        "{}",
        String::from_utf8_lossy(&tar.stderr)
    );
    fs::write(data.join("recovery.signal"), "").unwrap();
    let (port, listen) = server_dir(&restored);
    let opts = format!(
        "{listen} -c archive_mode=off -c \"restore_command={} wal-get --socket {} %f %p\" \
         -c \"recovery_target_time={target}\" -c recovery_target_action=promote",
        agent.display(),
        stage_socket.display()
    );
    let log = restored.join("postgres.log");
    let started = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(pg.bin_dir().join("pg_ctl"))
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(&log)
        .args(["-w", "-t", "120", "-o", &opts, "start"])
        .output()
        .unwrap();
    let log_text = || fs::read_to_string(&log).unwrap_or_default();
    assert!(
        started.status.success(),
        "{}\n{}\nstaging agent:\n{}",
        String::from_utf8_lossy(&started.stderr),
        log_text(),
        d.log_tail("agent-stage")
    );
    let recovered = Postgres::attach(pg.bin_dir(), port);
    let deadline = Instant::now() + Duration::from_secs(60);
    while recovered
        .psql("postgres", "SELECT pg_is_in_recovery()")
        .trim()
        != "f"
    {
        assert!(
            Instant::now() < deadline,
            "still recovering:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let phases = recovered.psql(
        "postgres",
        "SELECT phase || '=' || count(*) FROM events GROUP BY phase ORDER BY phase",
    );
    let stop = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(pg.bin_dir().join("pg_ctl"))
        .arg("-D")
        .arg(&data)
        .args(["-m", "immediate", "-w", "stop"])
        .output()
        .unwrap();
    assert!(stop.status.success());
    let text = log_text();
    assert_eq!(
        phases.split_whitespace().collect::<Vec<_>>(),
        ["base=1000", "before=500"],
        "{text}"
    );
    assert!(
        text.contains("restored log file"),
        "nothing came from the archive:\n{text}"
    );
    assert!(text.contains("recovery stopping before commit"), "{text}");

    // wal-get says so when a file is not archived, and production's agent serves no reads.
    let probe = d.dir.path().join("probe");
    make_reachable(&probe);
    let missing = Command::new(bin("ferry-agent"))
        .args(["wal-get", "--socket"])
        .arg(&stage_socket)
        .args(["0000000100000000000000FE", "out"])
        .current_dir(&probe)
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("is not archived"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    assert!(!probe.join("out").exists() && !probe.join("out.ferry-partial").exists());
    let refused = Command::new(bin("ferry-agent"))
        .args(["wal-get", "--socket"])
        .arg(&socket)
        .args([&last, "out"])
        .current_dir(&probe)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("may not read it back"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[test]
fn on_s3_archived_wal_is_a_version_of_its_key_and_wal_get_reads_the_recorded_one() {
    let c = CephCluster::shared();
    let roles = c.roles();
    let bucket = c.ferry_bucket("wal");
    let Wal {
        d,
        pg,
        socket,
        stage_socket,
        ..
    } = deploy_with(None, |d| use_s3_backup_server(d, c, &bucket));
    let seg = write_and_switch(&pg, 0);
    let original = fs::read(pg.data_dir().join("pg_wal").join(&seg)).unwrap();
    wait_archived(&pg, &seg, &d);
    assert!(
        d.sshd.final_files().is_empty(),
        "the SFTP server was written to"
    );

    // The object and its record, read with boto3 as staging: the record names the
    // object's version and the plaintext's SHA-256.
    let key = format!("ferry/production/pgphys-wal/00000001/{seg}.zst.age");
    let get = |key: &str| {
        c.s3_ok(
            &roles.staging,
            "get_object",
            serde_json::json!({"Bucket": bucket, "Key": key}),
        )
    };
    let record: serde_json::Value =
        serde_json::from_str(get(&format!("{key}.json"))["Body"].as_str().unwrap()).unwrap();
    let object = get(&key);
    assert_eq!(record["version_id"], object["VersionId"], "{record}");
    assert_eq!(record["sha256_stored"], object["BodySha256"]);
    assert_eq!(record["sha256"], sha256_hex(&original));

    // Production may not read back: a second push cannot be compared, and is stored as a
    // new version of the object and of its record (versioning keeps the first).
    let copy = d.dir.path().join("again");
    make_reachable(&copy);
    fs::write(copy.join(&seg), &original).unwrap();
    let again = wal_push(&socket, &copy, &seg);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // wal-get through the staging agent: the recorded version, decrypted, equal to the
    // segment PostgreSQL wrote.
    let out = Command::new(bin("ferry-agent"))
        .args(["wal-get", "--socket"])
        .arg(&stage_socket)
        .args([seg.as_str(), "fetched"])
        .current_dir(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_tail("agent-stage")
    );
    assert!(fs::read(copy.join("fetched")).unwrap() == original);
}

/// pgbench's tables, locked against writes while an instant is recorded.
const BENCH_TABLES: &str = "pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history";

/// Table → (rows, md5 of its rows), as [`Postgres::table_fingerprints`] gives them.
type Fingerprints = std::collections::BTreeMap<String, (i64, String)>;

/// Database `bench` of `pg` at one instant while pgbench writes: pgbench's tables locked
/// in SHARE mode (every transaction that wrote them has committed, none can commit until
/// the lock ends), the instant taken 20 ms into the lock (UTC, to the millisecond, so no
/// commit lies between the lock and it), then each of those tables' fingerprint, all in
/// one transaction.
fn instant_and_fingerprints(pg: &Postgres) -> (String, Fingerprints) {
    let tables = pg.psql(
        "bench",
        "SELECT string_agg(format('SELECT %L || ''|'' || count(*) || ''|'' || \
         coalesce(md5(string_agg(r::text, E''\\n'' ORDER BY r::text COLLATE \"C\")), md5('''')) \
         FROM %I.%I r', schemaname || '.' || tablename, schemaname, tablename), ' UNION ALL ' \
         ORDER BY tablename) FROM pg_tables WHERE tablename LIKE 'pgbench%'",
    );
    let out = run_ok(
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg.bin_dir().join("psql"))
            .args([
                "-X",
                "-At",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-U",
                "postgres",
                "-d",
                "bench",
                "-p",
                &pg.port().to_string(),
            ])
            .args(["-c", "BEGIN ISOLATION LEVEL REPEATABLE READ"])
            .args(["-c", &format!("LOCK TABLE {BENCH_TABLES} IN SHARE MODE")])
            .args(["-c", "SELECT 'sleep' FROM pg_sleep(0.02)"])
            .args([
                "-c",
                "SELECT to_char(date_trunc('milliseconds', clock_timestamp()) AT TIME ZONE 'UTC', \
                 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
            ])
            .args(["-c", &tables])
            .args(["-c", "SELECT 'sleep' FROM pg_sleep(0.02)"])
            .args(["-c", "COMMIT"]),
    );
    let mut lines = out.lines().filter(|l| !l.is_empty() && *l != "sleep");
    let instant = lines.next().expect("the instant").to_owned();
    let rest: Vec<&str> = lines.collect();
    (instant, parse_fingerprints(&rest.join("\n")))
}

/// pgbench's tables of database `bench` of `pg`, as [`instant_and_fingerprints`] gives them.
fn bench_tables(pg: &Postgres) -> Fingerprints {
    pg.table_fingerprints("bench")
        .into_iter()
        .filter(|(table, _)| table.starts_with("public.pgbench"))
        .collect()
}

/// An instant of `pg` ([`instant_and_fingerprints`]) with a write to 5,000 accounts
/// (adding `n` to their balance) just before it and another (adding `2n`) just after.
fn instant_between_writes(pg: &Postgres, n: i64) -> (String, Fingerprints) {
    let write = |by: i64| {
        pg.psql(
            "bench",
            &format!("UPDATE pgbench_accounts SET abalance = abalance + {by} WHERE aid <= 5000"),
        )
    };
    write(n);
    let at = instant_and_fingerprints(pg);
    write(2 * n);
    at
}

/// `pgbench -c 2 -T seconds` on database `bench` of `pg`, in the background.
fn pgbench_for(pg: &Postgres, seconds: u32) -> std::process::Child {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(pg.bin_dir().join("pgbench"))
        .args([
            "-n",
            "-c",
            "2",
            "-T",
            &seconds.to_string(),
            "-h",
            "127.0.0.1",
        ])
        .args(["-U", "postgres", "-p", &pg.port().to_string(), "bench"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start pgbench")
}

fn restore_to(d: &Deployment, t: &str) -> (bool, String) {
    d.restore_to_time("pgphys", t)
}

#[test]
fn a_restore_to_a_point_in_time_equals_the_database_at_that_instant_while_pgbench_writes() {
    let Wal { d, pg, stage, .. } = deploy_with(Some(Staging::smoke(ACCOUNTS)), |_| {});
    let stage = stage.expect("a staging cluster");
    load_bench(&pg);
    let before_backup = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    std::thread::sleep(Duration::from_millis(50));
    let out = d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    assert!(out.contains("pgphys") && out.contains("postgres"), "{out}");

    // pgbench writes throughout; T1 and T2 are two instants with the tables as they were.
    let mut bench = pgbench_for(&pg, 120);
    std::thread::sleep(Duration::from_secs(3));
    let (t1, at_t1) = instant_and_fingerprints(&pg);
    // The segment written at T1: only the archive has it (the base backup ended before).
    let t1_segment = pg.psql("postgres", "SELECT pg_walfile_name(pg_current_wal_lsn())");
    std::thread::sleep(Duration::from_secs(3));
    let (t2, at_t2) = instant_and_fingerprints(&pg);
    assert_ne!(at_t1, at_t2, "pgbench wrote nothing between T1 and T2");
    assert_eq!(at_t1.len(), 4, "{at_t1:?}");
    std::thread::sleep(Duration::from_secs(2));
    // Everything up to now archived: the segment in use is switched and pushed.
    let last = pg.psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())");
    wait_archived(&pg, &last, &d);

    // An instant later than the newest archived WAL is refused, naming it, and staging
    // is untouched.
    stage.psql("postgres", "CREATE DATABASE before_restore");
    let later = chrono::Utc::now() + chrono::TimeDelta::seconds(1);
    std::thread::sleep(Duration::from_secs(2));
    let (ok, text) = restore_to(
        &d,
        &later.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    );
    let _ = bench.kill();
    let _ = bench.wait();
    assert!(!ok, "{text}");
    assert!(text.contains("is beyond the archived WAL"), "{text}");
    assert!(
        text.contains("the newest instant a restore can reach"),
        "{text}"
    );
    assert!(stage.has_database("before_restore"));
    // An instant before the first base backup: nothing to start from.
    let (ok, text) = restore_to(&d, &before_backup);
    assert!(!ok, "{text}");
    assert!(text.contains("that finished by"), "{text}");
    assert!(stage.has_database("before_restore"));

    for (t, expected) in [(&t1, &at_t1), (&t2, &at_t2)] {
        let (ok, out) = restore_to(&d, t);
        assert!(ok, "restore to {t}: {out}\n{}", d.log_tail("agent-stage"));
        assert!(out.contains("with the archived WAL"), "{out}");
        let restored = bench_tables(&stage);
        assert_eq!(&restored, expected, "restored to {t}:\n{out}");
        // The restored cluster fetches no WAL of its own and archives none.
        assert_eq!(stage.psql("postgres", "SHOW restore_command"), "");
        assert_eq!(stage.psql("postgres", "SHOW archive_mode"), "off");
    }
    assert!(!stage.has_database("before_restore"));
    let job = d.ferry_ok(&["jobs", "--output", "json"]);
    assert!(job.contains(&t2[..19]), "{job}");

    // The whole staging environment (its one agent) to T1: pgphys replays to it, the
    // logical `postgres` datastore takes its newest backup finished by then; each job says
    // which it did. Production has no staging agent to restore.
    let refused = d.ferry(&["restore", "--env", "production", "--to-time", &t1]);
    let text = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(
        !refused.status.success() && text.contains("has no staging agent"),
        "{text}"
    );
    let out = d.ferry_ok(&["restore", "--env", "staging", "--to-time", &t1, "--wait"]);
    let restored = bench_tables(&stage);
    assert_eq!(restored, at_t1, "{out}");
    assert!(out.contains("with the archived WAL"), "{out}");
    assert!(
        out.contains("(this datastore cannot replay to an instant): 4 tables"),
        "{out}"
    );

    // A WAL segment altered on the backup server: wal-get refuses it, recovery cannot
    // reach T2, and the restore fails before the swap, saying why.
    let (names, dir) = stored(&d);
    assert!(names.contains(&t1_segment), "{t1_segment} not in {names:?}");
    let object = dir.join(format!("{t1_segment}.zst.age"));
    let mut bytes = fs::read(&object).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    fs::write(&object, bytes).unwrap();
    stage.psql("postgres", "CREATE DATABASE before_altered");
    let (ok, text) = restore_to(&d, &t2);
    assert!(
        !ok,
        "a restore through an altered WAL segment succeeded: {text}"
    );
    assert!(
        text.contains("does not match the archive's record"),
        "{text}"
    );
    assert!(stage.has_database("before_altered"));
}

#[test]
fn prune_removes_the_wal_before_the_oldest_kept_base_backup_and_that_backup_still_replays() {
    let Wal { d, pg, stage, .. } =
        deploy_with(Some(Staging::smoke(ACCOUNTS)), |d| d.add_maintenance());
    let stage = stage.expect("a staging cluster");
    load_bench(&pg);
    // WAL archived before any base backup: no kept backup needs it.
    let early: Vec<String> = (0..2).map(|i| write_and_switch(&pg, i)).collect();
    wait_archived(&pg, early.last().unwrap(), &d);
    d.ferry_ok(&["backup", "pg-prod", "pgphys", "--wait"]);
    // T between the two base backups: only the first one and the WAL after it reach it.
    let (t, at_t) = instant_between_writes(&pg, 1);
    write_and_switch(&pg, 2);
    std::thread::sleep(Duration::from_millis(1100));
    d.ferry_ok(&["backup", "pg-prod", "pgphys", "--wait"]);
    let last = write_and_switch(&pg, 3);
    wait_archived(&pg, &last, &d);

    let (before, _) = stored(&d);
    let plan = d.ferry_ok(&["prune", "--dry-run"]);
    assert!(
        plan.contains("Archived WAL") && plan.contains("remove "),
        "{plan}"
    );
    assert_eq!(stored(&d).0, before, "a dry run removed WAL");
    let out = d.ferry_ok(&["prune"]);
    assert!(out.contains("removed "), "{out}");
    let (after, _) = stored(&d);
    for segment in &early {
        assert!(!after.contains(segment), "{segment} kept: {after:?}\n{out}");
    }
    assert!(after.contains(&last), "{after:?}");
    let audit = d.ferry_ok(&["audit"]);
    assert!(audit.contains("prune wal"), "{audit}");

    // The oldest kept base backup still recovers to T with what is left.
    let (ok, text) = restore_to(&d, &t);
    assert!(ok, "{text}\n{}", d.log_tail("agent-stage"));
    let restored = bench_tables(&stage);
    assert_eq!(restored, at_t, "{text}");
}

/// Stops (immediately) the server on `data` when dropped: the promoted standby the harness
/// did not start.
struct StopOnDrop(PathBuf, PathBuf);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = pg_ctl(&self.0, &self.1, &["-m", "immediate", "-w", "stop"]);
    }
}

/// Waits until the standby on `standby` has replayed everything `primary` wrote.
fn wait_replayed(primary: &Postgres, standby: &Postgres) {
    let lsn = primary.psql("postgres", "SELECT pg_current_wal_lsn()");
    let deadline = Instant::now() + Duration::from_secs(60);
    while standby.psql(
        "postgres",
        &format!(
            "SELECT pg_last_wal_replay_lsn() >= '{}'::pg_lsn",
            lsn.trim()
        ),
    ) != "t"
    {
        assert!(
            Instant::now() < deadline,
            "the standby did not catch up to {lsn}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_restore_to_a_point_in_time_follows_a_promoted_standby_onto_its_timeline() {
    let Wal {
        d,
        mut pg,
        agent,
        socket,
        stage,
        ..
    } = deploy_with(Some(Staging::smoke(ACCOUNTS)), |_| {});
    let stage = stage.expect("a staging cluster");
    load_bench(&pg);
    d.ferry_ok(&["backup", "pg-prod", "pgphys", "--wait"]);

    // A streaming standby of production that archives through the same agent once promoted.
    let standby_dir = d.dir.path().join("wal-standby");
    make_reachable(&standby_dir);
    run_ok(
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&standby_dir),
    );
    let data = standby_dir.join("data");
    run_ok(
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg.bin_dir().join("pg_basebackup"))
            .arg("-D")
            .arg(&data)
            .args(["-R", "-X", "stream", "-h", "127.0.0.1", "-U", "postgres"])
            .args(["-p", &pg.port().to_string()]),
    );
    let (port, listen) = server_dir(&standby_dir);
    let opts = format!(
        "{listen} -c archive_mode=on -c \"archive_command={} wal-push --socket {} %p\"",
        agent.display(),
        socket.display()
    );
    let log = standby_dir.join("postgres.log");
    let log_arg = log.display().to_string();
    let started = pg_ctl(
        pg.bin_dir(),
        &data,
        &["-l", &log_arg, "-w", "-t", "60", "-o", &opts, "start"],
    );
    assert!(
        started.status.success(),
        "{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    let _stop = StopOnDrop(pg.bin_dir().to_owned(), data.clone());
    let standby = Postgres::attach(pg.bin_dir(), port);

    // T1 on timeline 1, while the primary runs.
    let (t1, at_t1) = instant_between_writes(&pg, 1);
    let last = write_and_switch(&pg, 1);
    wait_archived(&pg, &last, &d);
    wait_replayed(&pg, &standby);

    // The primary goes; the standby is promoted onto timeline 2 and archives from there.
    let stopped = pg_ctl(pg.bin_dir(), &pg.data_dir(), &["-m", "fast", "-w", "stop"]);
    assert!(stopped.status.success());
    pg.stop();
    let promoted = pg_ctl(pg.bin_dir(), &data, &["-w", "promote"]);
    assert!(
        promoted.status.success(),
        "{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    let (t2, at_t2) = instant_between_writes(&standby, 4);
    let on_two = write_and_switch(&standby, 2);
    assert!(on_two.starts_with("00000002"), "{on_two}");
    wait_archived(&standby, &on_two, &d);
    let history = d
        .sshd
        .root()
        .join("production/pgphys-wal/00000002/00000002.history.zst.age");
    assert!(
        history.exists(),
        "the timeline history file was not archived"
    );

    // From the base backup of timeline 1: to T1 on it, and to T2 across the switch.
    for (t, expected) in [(&t1, &at_t1), (&t2, &at_t2)] {
        let (ok, out) = restore_to(&d, t);
        assert!(ok, "restore to {t}: {out}\n{}", d.log_tail("agent-stage"));
        let restored = bench_tables(&stage);
        assert_eq!(&restored, expected, "restored to {t}:\n{out}");
    }
}

#[test]
fn a_scheduled_drill_restores_to_a_random_instant_within_the_archive_and_status_shows_it() {
    let Wal { d, pg, stage, .. } = deploy_with(Some(Staging::smoke(ACCOUNTS)), |d| {
        d.add_maintenance();
        append(
            &d.coordinator_config,
            "\n[[schedules]]\nagent = \"pg-stage\"\ndatastore = \"pgphys\"\nkind = \"restore\"\n\
             cron = \"*/10 * * * * *\"\npoint_in_time = \"random\"\n",
        );
    });
    let stage = stage.expect("a staging cluster");
    load_bench(&pg);
    let at_start = bench_tables(&pg);
    // pgbench commits from before the base backup ends (so that the drill's window, which
    // starts at that end, never begins without commits) through the 25 s after it, and
    // 12 s more: the archive holds a commit after any instant up to 10 s before its newest
    // push.
    let mut bench = pgbench_for(&pg, 45);
    d.ferry_ok(&["backup", "pg-prod", "pgphys", "--wait"]);
    std::thread::sleep(Duration::from_secs(25));
    let middle = pg.psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())");
    wait_archived(&pg, &middle, &d);
    let _ = bench.wait();
    let last = write_and_switch(&pg, 1);
    wait_archived(&pg, &last, &d);

    // Drills fire every 10 s; one after the archive covers the window succeeds.
    let deadline = Instant::now() + Duration::from_secs(120);
    let drill = loop {
        let jobs = d.ferry_json(&["jobs"]);
        let done = jobs.as_array().unwrap().iter().find(|j| {
            j["trigger"] == "schedule" && j["state"] == "succeeded" && j["to_time"].is_string()
        });
        if let Some(j) = done {
            break j.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no scheduled drill succeeded: {jobs:#}\n{}",
            d.log_tail("coordinator")
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    // PostgreSQL replayed up to the instant picked: its last transaction committed in the
    // second before it (pgbench commits many times a second), after the base backup.
    let replayed_ms = |job: &serde_json::Value| {
        job["result"]["summary"]
            .as_str()
            .unwrap_or_default()
            .split("last transaction replayed committed at ")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .map(|at| {
                chrono::DateTime::parse_from_rfc3339(at)
                    .unwrap()
                    .timestamp_millis()
            })
            .unwrap_or_else(|| panic!("no replayed transaction: {job:#}"))
    };
    let to = drill["to_time_unix_ms"].as_i64().unwrap();
    let replayed = replayed_ms(&drill);
    assert!(
        (to - 1000..=to).contains(&replayed),
        "replayed to {replayed} ms for an instant of {to} ms: {drill:#}"
    );
    // Drills go on firing every 10 s and each swaps the staging cluster: a read that a swap
    // cuts is read again. Every drill restores an instant after the base backup ended, with
    // pgbench's commits from before that end, so any of them differs from the start.
    let deadline = Instant::now() + Duration::from_secs(60);
    let restored = loop {
        match stage.try_table_fingerprints("bench") {
            Ok(tables) => break tables,
            Err(e) if Instant::now() < deadline => {
                eprintln!("staging read cut by a drill's swap, reading again: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("staging's bench never read in 60 s: {e}"),
        }
    };
    let restored: Fingerprints = restored
        .into_iter()
        .filter(|(table, _)| table.starts_with("public.pgbench"))
        .collect();
    assert!(!restored.is_empty(), "no pgbench tables on staging");
    assert_ne!(restored, at_start, "nothing replayed: {drill:#}");
    let status = d.ferry_json(&["status"]);
    let row = status["datastores"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["agent"] == "pg-stage" && r["datastore"] == "pgphys")
        .cloned()
        .expect("staging's pgphys in status");
    // The status shows the newest drill, which may be a later one than `drill`: its recovery
    // point is that drill's instant less its last replayed commit.
    assert_eq!(row["last_drill"]["passed"], true, "{row:#}");
    let shown_to = row["last_drill"]["to_time"]
        .as_str()
        .expect("a drill's instant");
    let jobs = d.ferry_json(&["jobs"]);
    let shown = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["trigger"] == "schedule" && j["state"] == "succeeded")
        .find(|j| j["to_time"] == shown_to)
        .unwrap_or_else(|| panic!("no drill to {shown_to} in {jobs:#}"));
    let expected =
        (shown["to_time_unix_ms"].as_i64().unwrap() - replayed_ms(shown)) as f64 / 1000.0;
    let rpo = row["last_drill"]["rpo_seconds"].as_f64().unwrap();
    assert!(
        (rpo - expected).abs() < 0.002,
        "RPO {rpo} s, expected {expected} s: {row:#}"
    );
    let table = d.ferry_ok(&["status"]);
    assert!(table.contains("pass to "), "{table}");
}

#[test]
fn with_the_backup_server_unreachable_archiving_waits_and_catches_up_with_no_segment_missing() {
    let Wal { mut d, pg, .. } = deploy();
    let first = write_and_switch(&pg, 0);
    wait_archived(&pg, &first, &d);

    // The backup server hangs: its listener stops answering (new connections hang in the
    // handshake until the agent's connect timeout) and the agent's kept session is cut.
    let listener = d.sshd.process().pid().to_string();
    run_ok(Command::new("kill").args(["-STOP", &listener]));
    for pid in d.sshd.sessions() {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    let (archived_before, _, failed_before) = archiver(&pg);
    let backlog: Vec<String> = (1..4).map(|i| write_and_switch(&pg, i)).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    while archiver(&pg).2 <= failed_before {
        assert!(
            Instant::now() < deadline,
            "no archive failure counted:\n{}",
            d.log_tail("agent-prod")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        archiver(&pg).0,
        archived_before,
        "archived while unreachable"
    );
    for seg in &backlog {
        assert!(pg.data_dir().join("pg_wal").join(seg).exists(), "{seg}");
    }

    // Back: the next segment wakes the archiver, and the backlog goes with no gap.
    run_ok(Command::new("kill").args(["-CONT", &listener]));
    let last = write_and_switch(&pg, 4);
    wait_archived(&pg, &last, &d);
    let (names, _) = stored(&d);
    let have: Vec<u64> = names
        .iter()
        .filter(|n| n.len() == 24)
        .map(|s| sequence(s))
        .collect();
    for seg in backlog.iter().chain([&first, &last]) {
        assert!(have.contains(&sequence(seg)), "{seg} not stored: {names:?}");
    }
    let (lo, hi) = (sequence(&first), sequence(&last));
    let missing: Vec<u64> = (lo..=hi).filter(|n| !have.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "segments missing: {missing:?} of {names:?}"
    );
}

/// A thread writing to `mongo` (inserts, updates, deletes in `app.events`) every 20 ms
/// until `stop`, pausing while `pause` is set (and saying so through `paused`).
struct MongoWriter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pause: std::sync::Arc<std::sync::atomic::AtomicBool>,
    paused: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl MongoWriter {
    fn start(uri: String) -> MongoWriter {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let pause = std::sync::Arc::new(AtomicBool::new(false));
        let paused = std::sync::Arc::new(AtomicBool::new(false));
        let (s, p, pd) = (stop.clone(), pause.clone(), paused.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let c = mongodb::Client::with_uri_str(&uri).await.unwrap();
                let events = c.database("app").collection::<bson::Document>("events");
                let mut n: u64 = 0;
                while !s.load(Ordering::SeqCst) {
                    if p.load(Ordering::SeqCst) {
                        pd.store(true, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    pd.store(false, Ordering::SeqCst);
                    let i = n as i64;
                    events
                        .insert_one(bson::doc! {"_id": i, "n": i, "tag": "w"})
                        .await
                        .unwrap();
                    if i >= 3 {
                        events
                            .update_one(
                                bson::doc! {"_id": i - 3},
                                bson::doc! {"$inc": {"n": 1000}, "$set": {"seen": true}},
                            )
                            .await
                            .unwrap();
                    }
                    if i % 5 == 4 {
                        events.delete_one(bson::doc! {"_id": i - 4}).await.unwrap();
                    }
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                n
            })
        });
        MongoWriter {
            stop,
            pause,
            paused,
            thread: Some(thread),
        }
    }

    /// Runs `f` with the writer held still.
    fn still<T>(&self, f: impl FnOnce() -> T) -> T {
        use std::sync::atomic::Ordering;
        self.pause.store(true, Ordering::SeqCst);
        while !self.paused.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(30));
        let out = f();
        std::thread::sleep(Duration::from_millis(30));
        self.pause.store(false, Ordering::SeqCst);
        out
    }

    /// Stops it; how many rounds it wrote.
    fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

#[test]
fn the_environment_restored_to_one_instant_has_postgresql_and_mongodb_as_they_were_then() {
    let mut servers = None;
    let Wal { d, pg, stage, .. } = deploy_with(Some(Staging::smoke(ACCOUNTS)), |d| {
        let prod = MongoServer::start(&d.dir.path().join("mongo-prod"));
        let stage = MongoServer::start(&d.dir.path().join("mongo-stage"));
        let state_dir = d.dir.path().join("prod-state");
        set_top_level(
            &d.prod_config,
            "state_dir",
            &toml_str(&state_dir.display().to_string()),
        );
        append(
            &d.prod_config,
            &format!("{}oplog_slice_seconds = 2\n", prod.datastore_toml()),
        );
        append(&d.stage_config, &stage.datastore_toml());
        servers = Some((prod, stage));
    });
    let (mongo, mongo_stage) = servers.unwrap();
    let stage = stage.expect("a staging cluster");
    load_bench(&pg);
    let writer = MongoWriter::start(mongo.uri());
    std::thread::sleep(Duration::from_millis(500));
    let out = d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    assert!(out.contains("pgphys") && out.contains("mongo"), "{out}");

    // pgbench and the MongoDB writer throughout; T is an instant at which both are held
    // still for the snapshots.
    let mut bench = pgbench_for(&pg, 60);
    std::thread::sleep(Duration::from_secs(3));
    let (t, pg_at_t, mongo_at_t) = writer.still(|| {
        let (t, fingerprints) = instant_and_fingerprints(&pg);
        (t, fingerprints, mongo.contents("app"))
    });
    std::thread::sleep(Duration::from_secs(3));
    let _ = bench.kill();
    let _ = bench.wait();
    let rounds = writer.stop();
    assert!(rounds > 10, "the writer wrote {rounds} rounds");
    assert_ne!(mongo.contents("app"), mongo_at_t, "MongoDB changed after T");
    let last = pg.psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())");
    wait_archived(&pg, &last, &d);
    // The newest oplog slice ends after T.
    let t_at = chrono::DateTime::parse_from_rfc3339(&t).unwrap().to_utc();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fs::read_dir(d.sshd.root().join("production/mongo-oplog"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let to = n
                .strip_suffix(".bson.zst.age.json")?
                .split_once('-')?
                .1
                .to_owned();
            chrono::NaiveDateTime::parse_from_str(&to, "%Y%m%dT%H%M%S%.3fZ").ok()
        })
        .any(|to| to.and_utc() > t_at)
    {
        assert!(Instant::now() < deadline, "no oplog slice ends after {t}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let out = d.ferry_ok(&["restore", "--env", "staging", "--to-time", &t, "--wait"]);
    assert!(out.contains("with the archived WAL"), "{out}");
    assert!(out.contains("oplog slices"), "{out}");
    assert_eq!(bench_tables(&stage), pg_at_t, "PostgreSQL at {t}:\n{out}");
    assert_eq!(
        mongo_stage.contents("app"),
        mongo_at_t,
        "MongoDB at {t}:\n{out}"
    );
}
