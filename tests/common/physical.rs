//! Physical PostgreSQL datastores for the tests of `method = "physical"`, WAL shipping and
//! point-in-time restores: staging's datastore entry and the pgbench data both restore.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Postgres, bin, chmod, free_port, make_reachable, toml_str};

/// Production's physical datastore, `pgphys`, of `pg`.
pub fn production_entry(pg: &Postgres) -> String {
    format!(
        "[[datastores]]\nname = \"pgphys\"\nkind = \"postgres\"\nmethod = \"physical\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"postgres\"\nbin_dir = {}\n",
        pg.port(),
        toml_str(&pg.bin_dir().display().to_string())
    )
}

/// A TOML list of strings.
pub fn toml_list(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
    format!("[{}]", items.join(", "))
}

/// How staging's datastore is set up: its smoke check, and a shell condition under which
/// its `start_command` fails instead of starting the cluster (`$D` is the data directory).
pub struct Staging {
    /// The smoke check's SQL (`smoke_database = "bench"`).
    pub smoke: &'static str,
    /// A shell condition under which `start_command` fails (`$D` is the data directory).
    pub start_fails_if: Option<&'static str>,
}

/// A smoke check that passes on [`load_bench`]'s data.
pub const ACCOUNTS: &str = "SELECT count(*) FROM pgbench_accounts";

impl Staging {
    /// A smoke check `sql`; `start_command` always starts the cluster.
    pub fn smoke(sql: &'static str) -> Staging {
        Staging {
            smoke: sql,
            start_fails_if: None,
        }
    }
}

/// `runuser -u postgres -- <bin_dir>/pg_ctl -D <data_dir> ARGS` for `pg`: a datastore's
/// `stop_command` or `start_command`.
pub fn pg_ctl_command(pg: &Postgres, args: &[&str]) -> Vec<String> {
    let pg_ctl = pg.bin_dir().join("pg_ctl").display().to_string();
    let data = pg.data_dir().display().to_string();
    let mut v: Vec<String> = ["runuser", "-u", "postgres", "--", &pg_ctl, "-D", &data]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

/// Staging's physical datastore, `pgphys`, restoring into `pg`'s data directory, stopped
/// and started with pg_ctl (its port and socket on the command line: the restored
/// `postgresql.conf` is production's); `min` the smoke check's least number.
pub fn staging_entry(pg: &Postgres, staging: &Staging, min: i64) -> String {
    let data = pg.data_dir().display().to_string();
    let as_postgres = |args: &[&str]| pg_ctl_command(pg, args);
    let opts = format!(
        "-p {} -k {} -c listen_addresses=127.0.0.1",
        pg.port(),
        pg.dir().join("sock").display()
    );
    let log = pg.dir().join("postgres.log").display().to_string();
    let mut start = as_postgres(&["-l", &log, "-w", "-t", "60", "-o", &opts, "start"]);
    if let Some(condition) = staging.start_fails_if {
        let quoted: Vec<String> = start.iter().map(|a| format!("'{a}'")).collect();
        start = vec![
            "bash".into(),
            "-c".into(),
            format!(
                "D='{data}'; if {condition}; then echo refused by the test >&2; exit 3; fi; exec {}",
                quoted.join(" ")
            ),
        ];
    }
    format!(
        "[[datastores]]\nname = \"pgphys\"\nkind = \"postgres\"\nmethod = \"physical\"\nhost = \"127.0.0.1\"\nport = {}\n\
         user = \"postgres\"\nbin_dir = {}\ndata_dir = {}\nstop_command = {}\nstart_command = {}\ncheck_port = {}\n\
         smoke_database = \"bench\"\nsmoke = [{{ sql = {}, min = {min} }}]\n",
        pg.port(),
        toml_str(&pg.bin_dir().display().to_string()),
        toml_str(&data),
        toml_list(&as_postgres(&["-m", "fast", "-w", "stop"])),
        toml_list(&start),
        free_port(),
        toml_str(staging.smoke),
    )
}

/// pgbench tables (scale 2: 200,000 accounts) in database `bench`, and a table of varied
/// text beside them.
pub fn load_bench(pg: &Postgres) {
    pg.create_database("bench");
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(pg.bin_dir().join("pgbench"))
        .args(["-i", "-s", "2", "-q", "-h", "127.0.0.1", "-U", "postgres"])
        .arg("-p")
        .arg(pg.port().to_string())
        .arg("bench")
        .output()
        .expect("run pgbench");
    assert!(
        out.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    pg.psql(
        "bench",
        "CREATE TABLE notes AS SELECT g AS id, md5(g::text) || ' ' || repeat(chr(65 + g % 26), g % 40) AS body \
         FROM generate_series(1, 20000) g;
         UPDATE pgbench_accounts SET abalance = aid % 997 WHERE aid % 3 = 0;",
    );
}

/// `pg_ctl` run as `postgres` on `data`, with `args`.
pub fn pg_ctl(bin: &Path, data: &Path, args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join("pg_ctl"))
        .arg("-D")
        .arg(data)
        .args(args)
        .output()
        .unwrap()
}

/// A PostgreSQL cluster in `dir/wal-prod` that archives its WAL through `ferry-agent
/// wal-push` (a copy of the agent's binary that the postgres OS user can run, in
/// `dir/tools`) to the socket `dir/run/wal.sock`, with `extra` lines in its configuration
/// (`wal_level = replica`, `archive_mode = on` and the `archive_command` are there):
/// `(cluster, agent binary, socket)`.
pub fn archiving_cluster(dir: &Path, extra: &str) -> (Postgres, PathBuf, PathBuf) {
    let tools = dir.join("tools");
    make_reachable(&tools);
    let agent = tools.join("ferry-agent");
    fs::copy(bin("ferry-agent"), &agent).unwrap();
    chmod(&agent, 0o755);
    let socket = dir.join("run").join("wal.sock");
    let pg = Postgres::start_in_with_conf(
        &dir.join("wal-prod"),
        &format!(
            "wal_level = replica\narchive_mode = on\narchive_command = '{} wal-push --socket {} %p'\n{extra}",
            agent.display(),
            socket.display()
        ),
    );
    (pg, agent, socket)
}
