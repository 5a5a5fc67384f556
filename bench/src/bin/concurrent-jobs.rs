//! Four jobs at once on one agent (issue 20): the production agent backs up four
//! datastores of different kinds at the same time, then the staging agent restores all four
//! at the same time, with `max_concurrent_jobs = 4` (the agent's default, written out in
//! both configs; `--max-concurrent-jobs 1` for comparison). Issue 20's bound: the agent's
//! peak RSS at most 64 MiB with `max_concurrent_jobs` jobs running at once.
//!
//! `cargo run --release -p ferry-bench --bin concurrent-jobs -- [--mib 256] [--runs 3]
//! [--etcd-keys 20000] [--max-concurrent-jobs 4]`
//!
//! The datastores, the same on both agents (production the sources, staging the restore
//! targets):
//! - `postgres`: the deployment's own PostgreSQL, one table `items` of `--mib` MiB
//!   (`pg_table_size`), each row ids, numbers, a sentence of words (compressible) and 128
//!   random bytes (not);
//! - `mongo`: SecantusDB, `bench.docs`, `--mib` MiB of 16 KiB documents, each half random
//!   bytes, half words;
//! - `files`: a tree of `--mib` MiB, half in small files (1 to 32 KiB, in 64 directories),
//!   half in four large ones; every other file random, the rest words;
//! - `etcd`: `--etcd-keys` keys (default 20,000) of 1 KiB hex values, about 20 MiB (etcd's
//!   quota is 2 GiB; the store is kept modest).
//!
//! Each run: the production agent is restarted (so its `VmHWM` is the phase's own), then
//! `ferry backup pg-prod --wait` orders the backups of all four datastores at once; then
//! the staging agent is restarted and `ferry restore pg-stage --wait` restores all four at
//! once. Recorded per phase: the CLI's wall time, the agent's `VmHWM` after it, and the
//! largest `RssAnon` and `RssFile` seen by a thread reading `/proc/PID/status` every
//! 100 ms. That the four jobs really ran at the same time is checked, not assumed: each
//! job's interval runs from its `Job accepted.` to its `Job succeeded.` line in the agent's
//! log, started later if `ferry jobs` (polled every 250 ms) still showed it at stage
//! `waiting` (for a slot beyond `max_concurrent_jobs`; the stage is the agent's progress
//! tick, once a second, so a wait shorter than that can go unseen: with four slots and four
//! jobs none waits); the table gives how long all four intervals overlapped, and flags a
//! run where they never all overlapped (`NOT CONCURRENT`: its figures prove nothing). A
//! job that fails fails the run. After each restore every datastore is compared with its source by cheap checks: the
//! table's row count and column sums, the document count, a hash of the whole file tree
//! (paths, modes, contents), the key count and one value (etcd started on the restored
//! data directory, then stopped again, since a restore refuses a running etcd).
//!
//! `FERRY_AGENT_WRAPPER=heaptrack` runs the agents under a profiler (see
//! `bench/README.md`); each agent is stopped with SIGTERM before its restart and at the
//! end, so the profiler writes a report per phase. The RSS figures are then those of the
//! `ferry-agent` process under the wrapper.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bson::{RawDocumentBuf, rawdoc, spec::BinarySubtype};
use clap::Parser;
use ferry_bench::{Xorshift, insert_documents, median, mib, peak_rss_bytes, settle};
use ferry_tests::*;
use sha2::{Digest, Sha256};

/// Command-line arguments.
#[derive(Parser)]
struct Args {
    /// Size of each of the PostgreSQL table, the MongoDB collection and the file tree, MiB.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// Runs (a backup phase and a restore phase each); the figures are medians over them.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Keys in etcd, 1 KiB each.
    #[arg(long, default_value_t = 20_000)]
    etcd_keys: u64,
    /// `max_concurrent_jobs` of both agents: 4, the agent's default and issue 20's
    /// setting; 1 runs the four jobs one after another (a comparison, and a check that the
    /// overlap check sees it).
    #[arg(long, default_value_t = 4)]
    max_concurrent_jobs: usize,
    /// Another build of `ferry-agent` (for instance the one before a change), measured
    /// beside this workspace's in each run (its backup and restore after this build's), as
    /// the rows "(before)".
    #[arg(long)]
    before_agent: Option<PathBuf>,
}

/// The datastores of each agent, in the table's order.
const DATASTORES: [&str; 4] = ["postgres", "mongo", "files", "etcd"];

/// Issue 20's bound on the agent's peak RSS, MiB.
const BOUND_MIB: f64 = 64.0;

/// How often the RSS sampler reads `/proc/PID/status`.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// How often `ferry jobs` is polled for jobs waiting for a slot.
const POLL_EVERY: Duration = Duration::from_millis(250);

/// Bytes of each MongoDB document.
const DOC_BYTES: usize = 16 * 1024;

const SCHEMA: &str = "CREATE TABLE items (id bigint PRIMARY KEY, customer int NOT NULL, \
    placed timestamptz NOT NULL, note text NOT NULL, payload bytea NOT NULL)";

/// Rows `from..=to` of `items` (see the module docs).
fn insert_sql(from: u64, to: u64) -> String {
    let random16 = "md5(random()::text)";
    let payload = [random16; 8].join(" || ");
    format!(
        "INSERT INTO items SELECT g, (random() * 1000000)::int, \
           timestamptz '2024-01-01' + random() * interval '700 days', \
           w[1 + (random() * 19)::int] || ' ' || w[1 + (random() * 19)::int] || ' ' || \
           w[1 + (random() * 19)::int] || ' ' || w[1 + (random() * 19)::int] || ' ' || \
           w[1 + (random() * 19)::int] || ' ' || w[1 + (random() * 19)::int] || ' ' || \
           w[1 + (random() * 19)::int] || ' ' || w[1 + (random() * 19)::int] || ', ref ' || \
           substr(md5(g::text), 1, 12), \
           decode({payload}, 'hex') \
         FROM generate_series({from}, {to}) g, \
           (SELECT ARRAY['delivery','customer','invoice','package','address','returned', \
             'damaged','express','warehouse','payment','refund','order','item','quantity', \
             'discount','coupon','weekend','morning','evening','please'] AS w) words"
    )
}

/// What the source and a restored table must agree on: row count and column sums (the
/// payload's through the first 32 bits of its md5).
const PG_CHECK: &str = "SELECT count(*) || ' ' || sum(id) || ' ' || sum(customer) || ' ' || \
    sum(length(note)) || ' ' || sum(('x' || substr(md5(payload), 1, 8))::bit(32)::int::bigint) \
    FROM items";

/// Words for the compressible halves.
const WORDS: [&str; 24] = [
    "backup",
    "restore",
    "ferry",
    "staging",
    "production",
    "agent",
    "archive",
    "manifest",
    "stream",
    "chunk",
    "zstd",
    "age",
    "sftp",
    "coordinator",
    "schedule",
    "retention",
    "daily",
    "weekly",
    "catalog",
    "datastore",
    "snapshot",
    "verify",
    "encrypt",
    "server",
];

/// `len` bytes of words and newlines (zstd makes them about a quarter).
fn text(len: usize, rng: &mut Xorshift) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    let mut n = 0u32;
    while out.len() < len {
        out.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes());
        n += 1;
        out.push(if n.is_multiple_of(12) { b'\n' } else { b' ' });
    }
    out.truncate(len);
    out
}

/// `len` random bytes.
fn random(len: usize, rng: &mut Xorshift) -> Vec<u8> {
    let mut out: Vec<u8> = (0..len.div_ceil(8))
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    out.truncate(len);
    out
}

/// Fills `app.items` until `pg_table_size` reaches `bytes`; returns the rows and the size.
fn seed_postgres(pg: &Postgres, bytes: u64) -> (u64, u64) {
    let size = || -> u64 {
        pg.psql("app", "SELECT pg_table_size('items')")
            .parse()
            .expect("a size")
    };
    let mut rows = 0u64;
    let mut have = size();
    while have < bytes {
        // About 300 bytes a row on disk; at most 200,000 rows a statement.
        let more = ((bytes - have) / 300).clamp(1_000, 200_000);
        pg.psql("app", &insert_sql(rows + 1, rows + more));
        rows += more;
        have = size();
    }
    pg.psql("app", "VACUUM (FREEZE, ANALYZE) items");
    (rows, size())
}

/// Document `i`: half random bytes, half words.
fn document(i: u64, rng: &mut Xorshift) -> RawDocumentBuf {
    rawdoc! {
        "_id": i as i64,
        "n": (i % 1000) as i32,
        "blob": bson::Binary { subtype: BinarySubtype::Generic, bytes: random(DOC_BYTES / 2, rng) },
        "text": String::from_utf8(text(DOC_BYTES / 2, rng)).expect("ASCII"),
    }
}

/// Writes the tree of `bytes` bytes under `root` (see the module docs); returns its file
/// count.
fn seed_files(root: &Path, bytes: u64) -> anyhow::Result<u64> {
    let mut rng = Xorshift(0x2545_F491_4F6C_DD1D);
    let small_total = bytes / 2;
    let mut written = 0u64;
    let mut files = 0u64;
    while written < small_total {
        let len = (1024 + rng.below(31 * 1024)).min(small_total - written);
        let dir = root.join(format!("small/d{:02}", files % 64));
        fs::create_dir_all(&dir)?;
        let content = if files.is_multiple_of(2) {
            random(len as usize, &mut rng)
        } else {
            text(len as usize, &mut rng)
        };
        fs::write(dir.join(format!("f{files:06}")), content)?;
        written += len;
        files += 1;
    }
    let large_dir = root.join("large");
    fs::create_dir_all(&large_dir)?;
    let large_total = bytes - small_total;
    for k in 0..4u64 {
        let len = large_total / 4 + if k == 3 { large_total % 4 } else { 0 };
        let mut f = fs::File::create(large_dir.join(format!("large{k}.bin")))?;
        let mut left = len;
        while left > 0 {
            let n = left.min(1 << 20) as usize;
            let chunk = if k.is_multiple_of(2) {
                random(n, &mut rng)
            } else {
                text(n, &mut rng)
            };
            f.write_all(&chunk)?;
            left -= n as u64;
        }
        files += 1;
    }
    Ok(files)
}

/// A hash of the tree under `root`: every entry's relative path and mode, and every file's
/// contents, in path order.
fn tree_hash(root: &Path) -> anyhow::Result<String> {
    fn walk(root: &Path, dir: &Path, h: &mut Sha256) -> anyhow::Result<()> {
        let mut entries: Vec<PathBuf> = fs::read_dir(dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for p in entries {
            let m = fs::symlink_metadata(&p)?;
            let rel = p.strip_prefix(root)?;
            h.update(rel.as_os_str().as_encoded_bytes());
            h.update(m.mode().to_le_bytes());
            if m.is_dir() {
                walk(root, &p, h)?;
            } else {
                h.update(m.len().to_le_bytes());
                std::io::copy(&mut fs::File::open(&p)?, h)?;
            }
        }
        Ok(())
    }
    let mut h = Sha256::new();
    walk(root, root, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// The name of etcd key `n`.
fn etcd_key(n: u64) -> String {
    format!("/bench/key{n:06}")
}

/// Puts `keys` keys of 1 KiB hex values, 125 a transaction; returns the last value.
fn seed_etcd(etcd: &EtcdServer, keys: u64) -> String {
    let mut rng = Xorshift(0x1234_5678_9ABC_DEF1);
    let mut last = String::new();
    let mut n = 0;
    while n < keys {
        let mut txn = String::from("\n");
        for _ in 0..125.min(keys - n) {
            last = hex::encode(random(512, &mut rng));
            txn.push_str(&format!("put {} {last}\n", etcd_key(n)));
            n += 1;
        }
        txn.push_str("\n\n");
        etcd.ctl(&["txn"], txn.as_bytes());
    }
    last
}

/// Keys under `/bench/` in `etcd` (the range's `count`, which `--limit` does not cut).
fn etcd_count(etcd: &EtcdServer) -> anyhow::Result<u64> {
    let out = etcd.ctl(
        &[
            "get",
            "/bench/",
            "--prefix",
            "--keys-only",
            "--limit=1",
            "-w",
            "json",
        ],
        b"",
    );
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["count"].as_u64().unwrap_or(0))
}

/// The servers beside the deployment's PostgreSQL clusters.
struct Servers {
    mongo_prod: MongoServer,
    mongo_stage: MongoServer,
    etcd_prod: EtcdServer,
    etcd_stage_data: PathBuf,
    etcd_stage_ports: (u16, u16),
    files_prod: PathBuf,
    files_stage: PathBuf,
}

/// What a restore must reproduce.
struct Source {
    pg: String,
    documents: u64,
    tree: String,
    etcd_keys: u64,
    etcd_last: String,
}

/// A `kB` line of `/proc/PID/status`, bytes.
fn status_field(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// The `ferry-agent` process of the deployment's process `pid`: itself, or under
/// `FERRY_AGENT_WRAPPER` its descendant of that name (heaptrack's child; valgrind runs the
/// agent in its own process, which is then `pid`).
fn agent_pid(pid: u32) -> u32 {
    let is_agent = |p: u32| proc_stat(p).is_some_and(|s| s.comm == "ferry-agent");
    if is_agent(pid) {
        return pid;
    }
    // The wrapper may not have started the agent yet when its port is open (it is open,
    // so it has); look twice.
    for _ in 0..2 {
        if let Some(p) = descendants(pid).into_iter().find(|&p| is_agent(p)) {
            return p;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    pid
}

/// Stops `which` with SIGTERM to the agent itself (not the wrapper), so a profiler wrapping
/// it writes its report, and waits for it.
fn stop_agent(d: &mut Deployment, which: &'static str) {
    let Some(p) = d.procs.get_mut(which) else {
        return;
    };
    if p.try_exit().is_some() {
        return;
    }
    let pid = agent_pid(p.pid());
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    if p.wait_exit(Duration::from_secs(60)).is_none() {
        p.kill();
    }
}

/// One `ferry jobs` poll: seconds since the phase began, and each running job's (id,
/// stage).
type Poll = (f64, Vec<(String, String)>);

/// One phase's figures.
struct Phase {
    seconds: f64,
    vm_hwm: u64,
    max_anon: u64,
    max_file: u64,
    idle_rss: u64,
    /// Seconds during which all four jobs ran at once.
    overlap: f64,
    /// The most jobs running at once.
    most_at_once: usize,
    /// Per datastore: (start, end) seconds since the phase began.
    intervals: BTreeMap<String, (f64, f64)>,
}

/// Per datastore, the times (seconds since `t0_ms`, Unix ms) of the first `Job accepted.`
/// and the last `Job succeeded.` or `Job failed.` line of `log` (an agent's log, from this
/// phase on).
fn log_times(log: &str, t0_ms: i64) -> BTreeMap<String, (Option<f64>, Option<f64>)> {
    let mut out: BTreeMap<String, (Option<f64>, Option<f64>)> = BTreeMap::new();
    for line in log.lines() {
        let accepted = line.contains("Job accepted.");
        let ended = line.contains("Job succeeded.") || line.contains("Job failed.");
        if !accepted && !ended {
            continue;
        }
        let Some(t) = line
            .split_whitespace()
            .next()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        else {
            continue;
        };
        let Some(ds) = line.split("datastore=").nth(1).map(|s| {
            s.split(['}', ' ', ':', ','])
                .next()
                .unwrap_or_default()
                .to_owned()
        }) else {
            continue;
        };
        let s = (t.timestamp_millis() - t0_ms) as f64 / 1000.0;
        let e = out.entry(ds).or_default();
        if accepted {
            e.0.get_or_insert(s);
        } else {
            e.1 = Some(s);
        }
    }
    out
}

/// Restarts `which` (`agent-prod` or `agent-stage`), then runs `ferry --output json ARGS`
/// (which orders its four jobs and waits for them) while sampling the agent's RSS and
/// polling `ferry jobs`; checks that all four succeeded and measures how they overlapped.
fn phase(
    d: &mut Deployment,
    which: &'static str,
    build: Option<&Path>,
    args: &[&str],
) -> anyhow::Result<Phase> {
    stop_agent(d, which);
    d.agent_bin = build.map(Path::to_owned);
    d.start_agent(which);
    d.agent_bin = None;
    let pid = agent_pid(d.procs[which].pid());
    let idle_rss =
        status_field(&fs::read_to_string(format!("/proc/{pid}/status"))?, "VmRSS").unwrap_or(0);
    let log_path = d.dir.path().join(format!("{which}.log"));
    let log_from = fs::metadata(&log_path)?.len();
    settle()?;

    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let (mut anon, mut file) = (0u64, 0u64);
            while !done.load(Ordering::Relaxed) {
                if let Ok(s) = fs::read_to_string(format!("/proc/{pid}/status")) {
                    anon = anon.max(status_field(&s, "RssAnon").unwrap_or(0));
                    file = file.max(status_field(&s, "RssFile").unwrap_or(0));
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
            (anon, file)
        })
    };
    let polls: Arc<Mutex<Vec<Poll>>> = Arc::default();
    let started = Instant::now();
    let poller = {
        let (done, polls) = (done.clone(), polls.clone());
        let flags = d.ferry_flags();
        let ferry = bin("ferry");
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let t = started.elapsed().as_secs_f64();
                let mut cmd = Command::new(&ferry);
                let out = hermetic(&mut cmd)
                    .args(&flags)
                    .args(["--output", "json", "jobs", "--limit", "16"])
                    .output();
                let jobs: Option<serde_json::Value> = out
                    .ok()
                    .filter(|o| o.status.success())
                    .and_then(|o| serde_json::from_slice(&o.stdout).ok());
                if let Some(serde_json::Value::Array(jobs)) = jobs {
                    // A finished job keeps its last progress: running jobs only.
                    let seen = jobs
                        .iter()
                        .filter(|j| j["state"] == "running")
                        .map(|j| {
                            (
                                j["id"].as_str().unwrap_or_default().to_owned(),
                                j["progress"]["stage"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .to_owned(),
                            )
                        })
                        .collect();
                    polls.lock().expect("polls lock").push((t, seen));
                }
                std::thread::sleep(POLL_EVERY);
            }
        })
    };
    let t0_ms = chrono::Utc::now().timestamp_millis();
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let out = d.ferry(&all);
    let seconds = started.elapsed().as_secs_f64();
    let vm_hwm = peak_rss_bytes(pid)?;
    done.store(true, Ordering::Relaxed);
    let (max_anon, max_file) = sampler.join().expect("sampler");
    poller.join().expect("poller");

    let jobs: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "ferry {all:?} printed no JSON:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            d.logs()
        )
    })?;
    let jobs = jobs.as_array().context("a list of jobs")?;
    let mut by_datastore: BTreeMap<String, String> = BTreeMap::new();
    for j in jobs {
        let ds = j["datastore"].as_str().unwrap_or_default().to_owned();
        ensure!(
            j["state"] == "succeeded",
            "{which}: job {} of {ds} {}: {}\n{}",
            j["id"],
            j["state"],
            j["error"],
            d.logs()
        );
        eprintln!(
            "  {ds}: attempt {}, {}",
            j["attempt"],
            j["result"]["summary"].as_str().unwrap_or_default()
        );
        by_datastore.insert(ds, j["id"].as_str().unwrap_or_default().to_owned());
    }
    let mut expected = DATASTORES;
    expected.sort_unstable();
    ensure!(
        out.status.success() && by_datastore.keys().eq(expected.iter().copied()),
        "{which}: expected one succeeded job for each of {DATASTORES:?}, got {by_datastore:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut log = fs::read(&log_path)?;
    log.drain(..(log_from as usize).min(log.len()));
    let times = log_times(&String::from_utf8_lossy(&log), t0_ms);
    let polls = polls.lock().expect("polls lock");
    let mut intervals = BTreeMap::new();
    for (ds, id) in &by_datastore {
        let (Some(accepted), Some(ended)) = times.get(ds).copied().unwrap_or_default() else {
            bail!("{which}: no `Job accepted.` and `Job succeeded.` of {ds} in its log");
        };
        // Seen waiting for a slot at a poll: it began its work only after that poll (or
        // later: the coordinator's stage is the agent's last progress tick, up to 1 s old,
        // so the start is late rather than early, and never after the end).
        let waited = polls
            .iter()
            .filter(|(_, seen)| seen.iter().any(|(i, st)| i == id && st == "waiting"))
            .map(|(t, _)| *t)
            .fold(f64::NEG_INFINITY, f64::max);
        intervals.insert(ds.clone(), (accepted.max(waited).min(ended), ended));
    }
    let latest_start = intervals.values().map(|i| i.0).fold(f64::MIN, f64::max);
    let earliest_end = intervals.values().map(|i| i.1).fold(f64::MAX, f64::min);
    let overlap = (earliest_end - latest_start).max(0.0);
    let mut events: Vec<(f64, i32)> = intervals
        .values()
        .flat_map(|&(s, e)| [(s, 1), (e, -1)])
        .collect();
    // Ends before starts at the same instant: touching intervals do not overlap.
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut most) = (0i32, 0i32);
    for (_, step) in events {
        now += step;
        most = most.max(now);
    }
    Ok(Phase {
        seconds,
        vm_hwm,
        max_anon,
        max_file,
        idle_rss,
        overlap,
        most_at_once: most as usize,
        intervals,
    })
}

/// Checks every restored datastore against its source.
fn verify(d: &Deployment, s: &Servers, source: &Source) -> anyhow::Result<()> {
    let pg = d.stage_pg.psql("app", PG_CHECK);
    ensure!(
        pg == source.pg,
        "postgres: restored {pg:?}, source {:?}",
        source.pg
    );
    let docs = s.mongo_stage.count("bench", "docs");
    ensure!(
        docs == source.documents,
        "mongo: restored {docs} documents, source {}",
        source.documents
    );
    let tree = tree_hash(&s.files_stage)?;
    ensure!(
        tree == source.tree,
        "files: restored tree hash {tree}, source {}",
        source.tree
    );
    let (client, peer) = s.etcd_stage_ports;
    let mut etcd = EtcdServer::start_on(&s.etcd_stage_data, "stage", client, peer);
    let keys = etcd_count(&etcd)?;
    let last = etcd.ctl(
        &["get", &etcd_key(source.etcd_keys - 1), "--print-value-only"],
        b"",
    );
    etcd.stop();
    ensure!(
        keys == source.etcd_keys && last.trim() == source.etcd_last,
        "etcd: restored {keys} keys (source {}), last value equal: {}",
        source.etcd_keys,
        last.trim() == source.etcd_last
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.runs > 0 && args.mib > 0 && args.etcd_keys > 0 && args.max_concurrent_jobs > 0,
        "nothing to measure"
    );
    require_root("run PostgreSQL as the postgres user and create the backup server's user");
    let bytes = args.mib << 20;
    let mut servers = None;
    let mut d = Deployment::start_with_options(DeploymentOptions {
        source_sql: SCHEMA.to_owned(),
        io_timeout_seconds: Some(120),
        agent_timeout_seconds: 60,
        tweak: Some(Box::new(|d: &mut Deployment| {
            let dir = d.dir.path().to_owned();
            let mongo_prod = MongoServer::start(&dir.join("mongo-prod"));
            let mongo_stage = MongoServer::start(&dir.join("mongo-stage"));
            let etcd_prod = EtcdServer::start(&dir.join("etcd-prod"), "prod");
            let etcd_stage_data = dir.join("etcd-stage/data");
            let etcd_stage_ports = (free_port(), free_port());
            let (files_prod, files_stage) = (dir.join("files-prod"), dir.join("files-stage"));
            for p in [&files_prod, &files_stage, &dir.join("etcd-stage")] {
                fs::create_dir_all(p).expect("mkdir");
            }
            set_top_level(
                &d.prod_config,
                "max_concurrent_jobs",
                &args.max_concurrent_jobs.to_string(),
            );
            set_top_level(
                &d.stage_config,
                "max_concurrent_jobs",
                &args.max_concurrent_jobs.to_string(),
            );
            let files = |p: &Path| {
                format!(
                    "[[datastores]]\nname = \"files\"\nkind = \"files\"\npath = {}\n",
                    toml_str(&p.display().to_string())
                )
            };
            append(
                &d.prod_config,
                &format!(
                    "{}\n{}\n[[datastores]]\nname = \"etcd\"\nkind = \"etcd\"\nendpoint = \"{}\"\n",
                    mongo_prod.datastore_toml(),
                    files(&files_prod),
                    etcd_prod.endpoint()
                ),
            );
            let peer = format!("http://127.0.0.1:{}", etcd_stage_ports.1);
            append(
                &d.stage_config,
                &format!(
                    "{}\n{}\n[[datastores]]\nname = \"etcd\"\nkind = \"etcd\"\ndata_dir = {}\n\
                     member_name = \"stage\"\ninitial_cluster = \"stage={peer}\"\n\
                     initial_advertise_peer_urls = \"{peer}\"\n",
                    mongo_stage.datastore_toml(),
                    files(&files_stage),
                    toml_str(&etcd_stage_data.display().to_string())
                ),
            );
            servers = Some(Servers {
                mongo_prod,
                mongo_stage,
                etcd_prod,
                etcd_stage_data,
                etcd_stage_ports,
                files_prod,
                files_stage,
            });
        })),
        ..DeploymentOptions::default()
    });
    let s = servers.context("servers started")?;

    eprintln!(
        "seeding: {} MiB of each, {} etcd keys ...",
        args.mib, args.etcd_keys
    );
    let started = Instant::now();
    let (rows, table_bytes) = seed_postgres(&d.prod_pg, bytes);
    let documents = bytes.div_ceil(DOC_BYTES as u64);
    let rt = tokio::runtime::Runtime::new()?;
    let bson_bytes = rt.block_on(insert_documents(
        &s.mongo_prod.uri(),
        ("bench", "docs"),
        documents,
        64,
        document,
    ))?;
    let files = seed_files(&s.files_prod, bytes)?;
    let etcd_last = seed_etcd(&s.etcd_prod, args.etcd_keys);
    let source = Source {
        pg: d.prod_pg.psql("app", PG_CHECK),
        documents: s.mongo_prod.count("bench", "docs"),
        tree: tree_hash(&s.files_prod)?,
        etcd_keys: etcd_count(&s.etcd_prod)?,
        etcd_last,
    };
    ensure!(
        source.documents == documents && source.etcd_keys == args.etcd_keys,
        "seeding fell short: {} documents, {} keys",
        source.documents,
        source.etcd_keys
    );
    eprintln!(
        "seeded in {:.0} s: postgres {rows} rows ({:.1} MiB), mongo {documents} documents \
         ({:.1} MiB BSON), files {files} files ({:.1} MiB), etcd {} keys",
        started.elapsed().as_secs_f64(),
        mib(table_bytes),
        mib(bson_bytes),
        mib(bytes),
        args.etcd_keys
    );

    // This build's phases, then those of --before-agent if given.
    let builds: Vec<Option<&Path>> = std::iter::once(None)
        .chain(args.before_agent.as_deref().map(Some))
        .collect();
    let mut backups: Vec<Vec<Phase>> = builds.iter().map(|_| Vec::new()).collect();
    let mut restores: Vec<Vec<Phase>> = builds.iter().map(|_| Vec::new()).collect();
    for run in 1..=args.runs {
        for (k, build) in builds.iter().enumerate() {
            let tag = if k == 0 { "" } else { " (before)" };
            eprintln!("run {run}{tag}: backup");
            let b = phase(
                &mut d,
                "agent-prod",
                *build,
                &["backup", "pg-prod", "--wait"],
            )?;
            report(run, &format!("backup{tag}"), &b);
            backups[k].push(b);
            eprintln!("run {run}{tag}: restore");
            let r = phase(
                &mut d,
                "agent-stage",
                *build,
                &["restore", "pg-stage", "--wait"],
            )?;
            report(run, &format!("restore{tag}"), &r);
            verify(&d, &s, &source)?;
            eprintln!("run {run}{tag}: every restored datastore equals its source");
            restores[k].push(r);
        }
    }
    stop_agent(&mut d, "agent-prod");
    stop_agent(&mut d, "agent-stage");

    println!();
    println!(
        "concurrent-jobs: one agent, four datastores (postgres {:.0} MiB table, mongodb {:.0} MiB \
         BSON, files {:.0} MiB in {files} files, etcd {} keys of 1 KiB) backed up at once, then \
         restored at once; max_concurrent_jobs = {}; medians of {} runs",
        mib(table_bytes),
        mib(bson_bytes),
        mib(bytes),
        args.etcd_keys,
        args.max_concurrent_jobs,
        args.runs
    );
    println!();
    println!(
        "| phase | wall s | all 4 jobs at once s | peak RSS MiB (VmHWM) | max RssAnon MiB | max RssFile MiB | bound {BOUND_MIB:.0} MiB |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (k, _) in builds.iter().enumerate() {
        let tag = if k == 0 { "" } else { " (before)" };
        rows.push((format!("backup (agent-prod, 4 jobs){tag}"), &backups[k]));
        rows.push((format!("restore (agent-stage, 4 jobs){tag}"), &restores[k]));
    }
    for (name, phases) in &rows {
        let m = |f: fn(&Phase) -> f64| median(&phases.iter().map(f).collect::<Vec<_>>());
        let worst = phases.iter().map(|p| mib(p.vm_hwm)).fold(0.0, f64::max);
        let fewest = phases.iter().map(|p| p.most_at_once).min().unwrap_or(0);
        println!(
            "| {name} | {:.1} | {:.1}{} | {:.1} | {:.1} | {:.1} | {} (max {worst:.1}) |",
            m(|p| p.seconds),
            m(|p| p.overlap),
            if fewest < DATASTORES.len() {
                format!(" (NOT CONCURRENT in a run: at most {fewest} at once)")
            } else {
                String::new()
            },
            m(|p| mib(p.vm_hwm)),
            m(|p| mib(p.max_anon)),
            m(|p| mib(p.max_file)),
            if worst <= BOUND_MIB {
                "within"
            } else {
                "EXCEEDED"
            }
        );
    }
    println!();
    for (name, phases) in &rows {
        println!(
            "{name}: VmHWM per run (MiB) {:?}; idle RSS after the restart (MiB) {:?}; most jobs \
             at once per run {:?}",
            phases
                .iter()
                .map(|p| (mib(p.vm_hwm) * 10.0).round() / 10.0)
                .collect::<Vec<_>>(),
            phases
                .iter()
                .map(|p| (mib(p.idle_rss) * 10.0).round() / 10.0)
                .collect::<Vec<_>>(),
            phases.iter().map(|p| p.most_at_once).collect::<Vec<_>>()
        );
    }
    Ok(())
}

/// Prints one phase's figures and each job's interval to stderr; fails loudly (in the
/// output) when the jobs did not all run at once.
fn report(run: usize, what: &str, p: &Phase) {
    let jobs: Vec<String> = p
        .intervals
        .iter()
        .map(|(ds, (s, e))| format!("{ds} {s:.1}–{e:.1} s"))
        .collect();
    eprintln!(
        "run {run} {what}: {:.1} s, VmHWM {:.1} MiB (idle {:.1}), max RssAnon {:.1} MiB, max \
         RssFile {:.1} MiB; jobs {}; all four at once for {:.1} s{}",
        p.seconds,
        mib(p.vm_hwm),
        mib(p.idle_rss),
        mib(p.max_anon),
        mib(p.max_file),
        jobs.join(", "),
        p.overlap,
        if p.most_at_once < DATASTORES.len() {
            format!(
                " — NOT CONCURRENT: at most {} at once, the figures prove nothing",
                p.most_at_once
            )
        } else {
            String::new()
        }
    );
}
