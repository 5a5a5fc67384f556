//! WAL archiving under load (issue 18): how long after PostgreSQL finishes a WAL segment it
//! is visible on the target, and how many segments a second are archived, for Ferry's
//! `ferry-agent wal-push` and for pgBackRest 2.45's `archive-push`, both writing to the same
//! S3 endpoint (the tests' Ceph RGW), in one run.
//!
//! `cargo run --release -p ferry-bench --bin wal-lag -- [--minutes 10] [--clients 8] [--scale 20]`
//!
//! For each tool in turn, on a fresh PostgreSQL cluster (`wal_level = replica`,
//! `archive_mode = on`, `archive_timeout = 60`, everything else the harness's defaults)
//! with `pgbench -i -s SCALE` loaded:
//! - Ferry: `archive_command = 'ferry-agent wal-push --socket S %p'`, handing each segment to
//!   the production agent (the test harness's deployment, its `[backup_server]` the bucket
//!   over HTTPS with the RGW's CA and production's keys, a physical PostgreSQL datastore),
//!   which compresses (zstd level 3), encrypts (age) and uploads it, keeping its S3 session
//!   between segments.
//! - pgBackRest: `archive_command = 'pgbackrest --stanza=bench archive-push %p'` with an S3
//!   repository on the same RGW (HTTPS without verifying the certificate: the RGW's names
//!   127.0.0.1 as an IP address, which pgBackRest 2.45 does not match),
//!   `compress-type=zst` (level 3),
//!   `repo1-cipher-type=aes-256-cbc`, `archive-async=n` (synchronous, as Ferry is), after
//!   `stanza-create`.
//!
//! Then `pgbench -c CLIENTS -j 2 -T MINUTES*60 -n` writes while a watcher polls, every 50 ms,
//! `pg_wal/archive_status` for segments PostgreSQL has finished (`.ready`, or `.done` when
//! one was archived between two polls), taking the segment file's modification time as the
//! instant it was finished (its last write), and, every 100 ms, the target's listing for
//! the archived objects (Ferry's segment records, `.zst.age.json`, which is what makes a
//! segment archived for a reader; pgBackRest's `<segment>-<sha1>.zst`). A segment's lag is
//! the first listing that shows it minus the instant it was finished; the polling adds up
//! to 0.1 s. After pgbench ends, `pg_switch_wal()` and a wait until every finished segment
//! is visible (at most 5 minutes).
//!
//! Printed per tool: segments archived, segments per second over the load, lag p50, p99 and
//! max, and PostgreSQL's `pg_stat_archiver` failures; the ratio of the p99s. Issue 18's goal:
//! Ferry's p99 at most 10 s.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use ferry_bench::{median, percentile};
use ferry_tests::*;

/// Command-line arguments.
#[derive(Parser)]
struct Args {
    /// Minutes of pgbench for each tool.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// pgbench clients (`-c`).
    #[arg(long, default_value_t = 8)]
    clients: u32,
    /// pgbench scale (`-i -s`).
    #[arg(long, default_value_t = 20)]
    scale: u32,
}

/// What the watcher saw of one segment.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    /// When PostgreSQL finished it (the segment file's mtime).
    finished: Option<SystemTime>,
    /// When the target's listing first showed it.
    visible: Option<SystemTime>,
}

/// Segment name → what was seen of it.
type Segments = Arc<Mutex<BTreeMap<String, Seen>>>;

/// Polls `pg_wal/archive_status` of `data` every 50 ms and `list` every 100 ms until `stop`.
fn watch(
    data: PathBuf,
    list: impl Fn() -> anyhow::Result<Vec<String>> + Send + 'static,
    segments: Segments,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    std::thread::spawn(move || {
        let status = data.join("pg_wal/archive_status");
        let mut last_list = Instant::now() - Duration::from_secs(1);
        while !stop.load(Ordering::SeqCst) {
            for e in fs::read_dir(&status)?.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(seg) = name
                    .strip_suffix(".ready")
                    .or_else(|| name.strip_suffix(".done"))
                else {
                    continue;
                };
                if seg.len() != 24 {
                    continue;
                }
                let mut s = segments.lock().unwrap();
                let entry = s.entry(seg.to_owned()).or_default();
                if entry.finished.is_none() {
                    entry.finished = Some(
                        fs::metadata(data.join("pg_wal").join(seg))
                            .and_then(|m| m.modified())
                            .unwrap_or_else(|_| SystemTime::now()),
                    );
                }
            }
            if last_list.elapsed() >= Duration::from_millis(100) {
                last_list = Instant::now();
                let now = SystemTime::now();
                for seg in list()? {
                    let mut s = segments.lock().unwrap();
                    let entry = s.entry(seg).or_default();
                    entry.visible.get_or_insert(now);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    })
}

/// One tool's figures.
struct Figures {
    tool: &'static str,
    archived: usize,
    per_second: f64,
    lags: Vec<f64>,
    failed: i64,
}

impl Figures {
    fn print(&self) {
        if self.lags.is_empty() {
            println!("{:<11} nothing archived", self.tool);
            return;
        }
        println!(
            "{:<11} {:>8} {:>9.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7}",
            self.tool,
            self.archived,
            self.per_second,
            median(&self.lags),
            percentile(&self.lags, 99.0),
            self.lags.iter().copied().fold(0.0, f64::max),
            self.lags.iter().sum::<f64>() / self.lags.len().max(1) as f64,
            self.failed
        );
    }
}

/// `pgbench -i -s scale` into database `bench`.
fn init_bench(pg: &Postgres, scale: u32) -> anyhow::Result<()> {
    pg.create_database("bench");
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(pg.bin_dir().join("pgbench"))
        .args([
            "-i",
            "-s",
            &scale.to_string(),
            "-q",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
        ])
        .arg("-p")
        .arg(pg.port().to_string())
        .arg("bench")
        .output()?;
    ensure!(
        out.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Runs pgbench for `seconds` while `list` is watched; the figures.
fn measure(
    tool: &'static str,
    pg: &Postgres,
    args: &Args,
    list: impl Fn() -> anyhow::Result<Vec<String>> + Send + 'static,
) -> anyhow::Result<Figures> {
    let segments: Segments = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    // What was archived before the load (pgbench -i) is not counted.
    pg.psql("postgres", "SELECT pg_switch_wal()");
    std::thread::sleep(Duration::from_secs(5));
    let before: Vec<String> = list()?;
    let watcher = watch(pg.data_dir(), list, segments.clone(), stop.clone());
    let seconds = (args.minutes * 60.0).round() as u64;
    eprintln!("{tool}: pgbench -c {} for {seconds} s", args.clients);
    let started = Instant::now();
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(pg.bin_dir().join("pgbench"))
        .args(["-n", "-c", &args.clients.to_string(), "-j", "2", "-T"])
        .arg(seconds.to_string())
        .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
        .arg(pg.port().to_string())
        .arg("bench")
        .output()?;
    let load = started.elapsed().as_secs_f64();
    ensure!(
        out.status.success(),
        "pgbench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    pg.psql("postgres", "SELECT pg_switch_wal()");
    // Every finished segment visible, or 5 minutes.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let s = segments.lock().unwrap();
        let waiting = s
            .iter()
            .filter(|(name, v)| {
                !before.contains(name) && v.finished.is_some() && v.visible.is_none()
            })
            .count();
        if waiting == 0 || Instant::now() > deadline {
            if waiting > 0 {
                eprintln!("{tool}: {waiting} segments still not visible after 5 minutes");
            }
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    watcher
        .join()
        .map_err(|_| anyhow::anyhow!("watcher panicked"))??;
    let s = segments.lock().unwrap();
    let lags: Vec<f64> = s
        .iter()
        .filter(|(name, _)| !before.contains(name))
        .filter_map(|(_, v)| {
            let (f, vis) = (v.finished?, v.visible?);
            Some(vis.duration_since(f).map_or(0.0, |d| d.as_secs_f64()))
        })
        .collect();
    let failed: i64 = pg
        .psql("postgres", "SELECT failed_count FROM pg_stat_archiver")
        .trim()
        .parse()
        .unwrap_or(-1);
    Ok(Figures {
        tool,
        archived: lags.len(),
        per_second: lags.len() as f64 / load,
        lags,
        failed,
    })
}

/// An S3 target of Ferry's storage crate on `bucket` of `c` under `prefix`, with `user`'s
/// keys, for listing.
fn lister(
    c: &CephCluster,
    bucket: &str,
    prefix: &str,
    user: &S3User,
    dir: &Path,
) -> anyhow::Result<Arc<dyn ferry_storage::Target>> {
    #[derive(serde::Deserialize)]
    struct T {
        t: ferry_storage::config::TargetConfig,
    }
    let table = s3_table("t", c, bucket, user, dir, "")
        .replace("prefix = \"ferry\"", &format!("prefix = {prefix:?}"));
    let t: T = toml::from_str(&table).context("the lister's table")?;
    Ok(t.t.build()?)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let c = CephCluster::start_with(CephOptions {
        memstore_bytes: 8 << 30,
        pool_size: 1,
    });
    let roles = c.roles().clone();
    let bucket = c.ferry_bucket("wal");
    eprintln!("Ceph in {}, bucket {bucket}", c.dir().display());

    // Ferry: the production agent with [wal] and the bucket as its target.
    let mut made = None;
    let d = Deployment::start_with(DEFAULT_DATA, |d| {
        let dir = d.dir.path().to_owned();
        let (pg, _, socket) = archiving_cluster(&dir, "archive_timeout = 60");
        let text = fs::read_to_string(&d.prod_config).unwrap();
        // HTTPS with the RGW's CA, as pgBackRest's.
        let table = s3_table(
            "backup_server",
            &c,
            &bucket,
            &roles.production,
            &dir,
            &format!(
                "ca_file = {}\n",
                toml_str(&c.tls_ca().display().to_string())
            ),
        )
        .replace(&c.endpoint(), &c.tls_endpoint());
        fs::write(&d.prod_config, replace_backup_server(&text, &table)).unwrap();
        append(&d.prod_config, &production_entry(&pg));
        append(
            &d.prod_config,
            &format!(
                "[wal]\nsocket = {}\ngroup = \"postgres\"\n",
                toml_str(&socket.display().to_string())
            ),
        );
        made = Some(pg);
    });
    let pg = made.context("the production cluster")?;
    init_bench(&pg, args.scale)?;
    let target = lister(&c, &bucket, "ferry", &roles.staging, d.dir.path())?;
    let wal_dir = format!(
        "{}/pgphys-wal/00000001",
        target.environment_dir("production")
    );
    let ferry = measure("ferry", &pg, &args, move || {
        let mut s = target.read()?;
        Ok(s.list(&wal_dir)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|n| n.strip_suffix(".zst.age.json").map(str::to_owned))
            .filter(|n| n.len() == 24)
            .collect())
    })?;
    drop(pg);

    // pgBackRest: its own cluster, an S3 repository in another bucket on the same RGW.
    let repo_bucket = c.bucket_name("pgbr");
    c.s3_ok(
        &roles.maintenance,
        "create_bucket",
        serde_json::json!({"Bucket": repo_bucket}),
    );
    let dir = d.dir.path().join("pgbackrest");
    make_reachable(&dir);
    let conf = dir.join("pgbackrest.conf");
    let pg = Postgres::start_in_with_conf(
        &d.dir.path().join("wal-pgbr"),
        &format!(
            "wal_level = replica\narchive_mode = on\narchive_timeout = 60\narchive_command = 'pgbackrest --config={} --stanza=bench archive-push %p'",
            conf.display()
        ),
    );
    let port = c
        .tls_endpoint()
        .rsplit(':')
        .next()
        .context("the RGW's TLS port")?
        .to_owned();
    fs::write(
        &conf,
        format!(
            "[global]\nrepo1-type=s3\nrepo1-path=/pgbackrest\nrepo1-s3-bucket={repo_bucket}\n\
             repo1-s3-endpoint=127.0.0.1\nrepo1-storage-port={port}\nrepo1-s3-region=us-east-1\n\
             repo1-s3-key={}\nrepo1-s3-key-secret={}\nrepo1-s3-uri-style=path\n\
             repo1-storage-verify-tls=n\nrepo1-cipher-type=aes-256-cbc\nrepo1-cipher-pass=bench\n\
             compress-type=zst\ncompress-level=3\narchive-async=n\nlock-path={}\n\
             log-path={}\nlog-level-file=off\n\n[bench]\npg1-path={}\npg1-port={}\npg1-socket-path={}\n",
            roles.maintenance.access_key,
            roles.maintenance.secret_key,
            dir.join("lock").display(),
            dir.display(),
            pg.data_dir().display(),
            pg.port(),
            pg.dir().join("sock").display(),
        ),
    )?;
    let own = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&dir)
        .status()?;
    ensure!(own.success(), "chown {}", dir.display());
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--", "pgbackrest"])
        .arg(format!("--config={}", conf.display()))
        .args(["--stanza=bench", "stanza-create"])
        .output()?;
    if !out.status.success() {
        bail!(
            "pgbackrest stanza-create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    init_bench(&pg, args.scale)?;
    let target = lister(
        &c,
        &repo_bucket,
        "pgbackrest",
        &roles.maintenance,
        d.dir.path(),
    )?;
    let version = pg.psql(
        "postgres",
        "SELECT current_setting('server_version_num')::int / 10000",
    );
    let archive_dir = format!(
        "{}/archive/bench/{}-1/0000000100000000",
        target.environment_dir("x").trim_end_matches("/x"),
        version.trim()
    );
    let pgbr = measure("pgbackrest", &pg, &args, move || {
        let mut s = target.read()?;
        Ok(s.list(&archive_dir)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|n| n.split_once('-').map(|(seg, _)| seg.to_owned()))
            .filter(|n| n.len() == 24)
            .collect())
    })?;

    println!(
        "\nWAL lag, pgbench -c {} for {} min each (seconds from segment finished to visible on the target)",
        args.clients, args.minutes
    );
    println!(
        "{:<11} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "tool", "segments", "per s", "p50", "p99", "max", "mean", "failed"
    );
    ferry.print();
    pgbr.print();
    ensure!(
        !ferry.lags.is_empty() && !pgbr.lags.is_empty(),
        "a tool archived nothing"
    );
    println!(
        "Ferry's p99 / pgBackRest's: {:.2}; segments per second: {:.2}",
        percentile(&ferry.lags, 99.0) / percentile(&pgbr.lags, 99.0).max(1e-9),
        ferry.per_second / pgbr.per_second.max(1e-9)
    );
    Ok(())
}
