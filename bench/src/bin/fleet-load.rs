//! A fleet under load: one coordinator, `--agents` real production `ferry-agent` processes
//! (default 200) on their own loopback ports, each backing up one tiny `files` datastore
//! to one sshd on a staggered cron schedule, with `--jobs` historical jobs (default
//! 100,000) and catalog records (default 20,000, about 100 days of 200 datastores) seeded
//! into the coordinator's store before it starts. Issue 6's bound:
//! `ferry status` under 200 ms with 100,000 jobs in the history.
//!
//! `cargo run --release -p ferry-bench --bin fleet-load -- [--agents 200] [--jobs 100000]
//! [--backups 20000] [--minutes 3] [--runs 20]`
//!
//! Two phases, each with its own coordinator process on the same store:
//! 1. idle: no schedules; `ferry status`, `ferry jobs` and `ferry backups` are each timed
//!    `--runs` times (the real CLI, spawned: wall time of the whole process).
//! 2. load: every agent backs up once a minute for `--minutes` minutes, agent `i` at second
//!    `i * 60 / agents` of each minute (so about `agents / 60` backups start every
//!    second); the same commands are timed `--runs` times spread over those minutes.
//!
//! Then it checks every job's state from the store itself (the coordinator stopped): each
//! scheduled occurrence made exactly one job and it succeeded, nothing is left queued or
//! running (the seeded orphans included), and the catalog (`ferry backups --output json`)
//! lists exactly the archives on the backup server. It prints medians and p95 of each
//! command, the coordinator's peak RSS and the agents' total RSS.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use ferry_bench::{Xorshift, median, mib, peak_rss_bytes, percentile, rss_bytes};
use ferry_coordinator::model::{BackupRecord, Job, JobKind, JobResult, JobState};
use ferry_coordinator::store::{RedbStore, Store};
use ferry_tests::*;

/// Command-line arguments.
#[derive(Parser)]
struct Args {
    /// Production agents to start, each a `ferry-agent` process with one datastore.
    #[arg(long, default_value_t = 200)]
    agents: usize,
    /// Historical jobs to seed into the store before the coordinator starts.
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// Catalog records to seed with the history: the newest this many of its succeeded
    /// backups (their paths are under `/srv/ferry`, not on this run's backup server).
    #[arg(long, default_value_t = 20_000)]
    backups: usize,
    /// Minutes of scheduled backups (each agent backs up once a minute).
    #[arg(long, default_value_t = 3)]
    minutes: u32,
    /// Timed runs of each CLI command, idle and under load.
    #[arg(long, default_value_t = 20)]
    runs: usize,
}

/// The CLI commands timed, as `ferry` arguments.
const COMMANDS: [(&str, &[&str]); 3] = [
    ("status", &["status"]),
    ("jobs", &["jobs"]),
    ("backups", &["backups"]),
];

/// The backup server root of the seeded jobs and catalog records (not this run's server).
const SEEDED_ROOT: &str = "/srv/ferry/";

/// Issue 6's bound on `ferry status`, ms.
const STATUS_BOUND_MS: f64 = 200.0;

fn agent_id(i: usize) -> String {
    format!("agent-{i:03}")
}

fn datastore_of(i: usize) -> String {
    format!("files-{i:03}")
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn day_of(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("a valid time")
        .format("%Y-%m-%d")
        .to_string()
}

/// What was seeded, for the checks.
struct Seeded {
    /// Jobs written.
    jobs: usize,
    /// Catalog records written.
    backups: usize,
    /// Ids of the jobs seeded as queued or running: a coordinator that crashed left them;
    /// the next one must take them up and bring them to a final state.
    orphans: Vec<String>,
    /// Jobs per state, as seeded.
    states: BTreeMap<&'static str, usize>,
    /// Seconds spent writing them.
    seconds: f64,
}

/// Writes `count` historical jobs into the store at `path` through the coordinator's own
/// store API, created over the 100 days before `before_ms`: 85 % backups of the fleet's
/// agents (succeeded 90 %, failed 8 %, cancelled 2 %, one to three attempts), 10 % restores
/// and 5 % verifies by 20 staging agents no longer in the inventory, and in the last hour
/// five jobs left queued or running by a coordinator that crashed. The catalog gets a record
/// for each of the newest `backups` succeeded backups.
fn seed(
    path: &Path,
    agents: usize,
    count: usize,
    backups: usize,
    before_ms: i64,
) -> anyhow::Result<Seeded> {
    let started = Instant::now();
    let store = RedbStore::open(path)?;
    let mut rng = Xorshift(0x9E37_79B9_7F4A_7C15);
    let span_ms: i64 = 100 * 86_400_000;
    let first_ms = before_ms - span_ms;
    let mut states = BTreeMap::new();
    let mut orphans = Vec::new();
    let mut batch = Vec::with_capacity(10_000);
    let mut catalog = Vec::new();
    for n in 0..count {
        let created_ms = first_ms + (span_ms - 3_600_000) * n as i64 / count.max(1) as i64;
        let orphan = n + 5 >= count;
        let roll = rng.below(100);
        let (kind, agent, datastore) = match roll {
            0..85 => {
                let i = rng.below(agents as u64) as usize;
                (JobKind::Backup, agent_id(i), datastore_of(i))
            }
            r => (
                if r < 95 {
                    JobKind::Restore
                } else {
                    JobKind::Verify
                },
                format!("stage-{:02}", rng.below(20)),
                datastore_of(rng.below(agents as u64) as usize),
            ),
        };
        let state = if orphan {
            if n % 2 == 0 {
                JobState::Running
            } else {
                JobState::Queued
            }
        } else {
            match rng.below(100) {
                0..90 => JobState::Succeeded,
                90..98 => JobState::Failed,
                _ => JobState::Cancelled,
            }
        };
        let duration_ms = 200 + rng.below(60_000) as i64;
        let date = day_of(created_ms);
        let size_bytes = 4096 + rng.below(1 << 30);
        let id = ulid::Ulid::from_parts(created_ms as u64, u128::from(rng.next())).to_string();
        if orphan {
            orphans.push(id.clone());
        }
        *states.entry(state.as_str()).or_insert(0) += 1;
        batch.push(Job {
            id,
            kind,
            agent,
            datastore: datastore.clone(),
            state,
            attempt: if state == JobState::Failed {
                3
            } else {
                1 + (rng.below(20) == 0) as u32
            },
            trigger: if rng.below(10) == 0 {
                "operator".into()
            } else {
                "schedule".into()
            },
            date: (kind != JobKind::Backup).then(|| date.clone()),
            namespaces: Vec::new(),
            backup_type: None,
            file: None,
            set_environment: None,
            all_or_nothing: false,
            to_time_ms: None,
            target: None,
            checked_ms: None,
            scheduled_ms: None,
            created_ms,
            started_ms: (state != JobState::Queued).then_some(created_ms + 50),
            finished_ms: state.is_final().then_some(created_ms + duration_ms),
            progress: None,
            result: (state == JobState::Succeeded).then(|| JobResult {
                stored_path: format!(
                    "{SEEDED_ROOT}production/{date}/{datastore}_backup_{date}.tar.zst.age"
                ),
                size_bytes,
                sha256: format!("{:016x}{:048x}", rng.next(), 0),
                duration_ms: duration_ms as u64,
                bytes_uncompressed: size_bytes * 3,
                environment: "production".into(),
                date: date.clone(),
                kind: "files".into(),
                summary: format!("tar of {} files", 1 + rng.below(10_000)),
                data_finished_ms: (kind != JobKind::Backup).then_some(created_ms - 3_600_000),
                target: String::new(),
                recipient_fingerprints: Vec::new(),
            }),
            error: match state {
                JobState::Failed => Some(format!(
                    "upload to 10.0.0.9:22 failed: connection reset (attempt 3 of 3, job on {date})"
                )),
                JobState::Cancelled => Some("cancelled by operator".into()),
                _ => None,
            },
        });
        let job = batch.last().expect("just pushed");
        if let (JobKind::Backup, Some(r)) = (job.kind, &job.result) {
            catalog.push(BackupRecord {
                environment: r.environment.clone(),
                date: r.date.clone(),
                datastore: job.datastore.clone(),
                kind: r.kind.clone(),
                agent: job.agent.clone(),
                stored_path: r.stored_path.clone(),
                size_bytes: r.size_bytes,
                bytes_uncompressed: r.bytes_uncompressed,
                sha256: r.sha256.clone(),
                finished_ms: job.finished_ms.unwrap_or_default(),
                job_id: job.id.clone(),
                missing: None,
                retain_until_ms: None,
                lock_error: None,
                copies: Vec::new(),
                recipients: Vec::new(),
            });
        }
        if batch.len() == 10_000 {
            store.put_jobs(&batch)?;
            batch.clear();
        }
    }
    store.put_jobs(&batch)?;
    let catalog = &catalog[catalog.len().saturating_sub(backups)..];
    for chunk in catalog.chunks(10_000) {
        store.put_backups(chunk)?;
    }
    Ok(Seeded {
        jobs: count,
        backups: catalog.len(),
        orphans,
        states,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The `ferry` CLI against one coordinator, as the operator.
struct Cli {
    flags: Vec<String>,
}

impl Cli {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("ferry"));
        hermetic(&mut cmd).args(&self.flags).args(args);
        cmd
    }

    /// Runs `ferry ARGS`; its stdout and its wall time, ms.
    fn run(&self, args: &[&str]) -> anyhow::Result<(String, f64)> {
        let started = Instant::now();
        let out = self.command(args).output()?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if !out.status.success() {
            bail!(
                "ferry {args:?} failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok((String::from_utf8_lossy(&out.stdout).into_owned(), ms))
    }

    /// `ferry --output json ARGS`, parsed.
    fn json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let (out, _) = self.run(&all)?;
        serde_json::from_str(&out).with_context(|| format!("ferry {args:?} printed no JSON"))
    }
}

/// Wall times of each of [`COMMANDS`], ms.
#[derive(Default)]
struct Timings(BTreeMap<&'static str, Vec<f64>>);

impl Timings {
    fn measure_once(&mut self, cli: &Cli) -> anyhow::Result<()> {
        for (name, args) in COMMANDS {
            let (_, ms) = cli.run(args)?;
            self.0.entry(name).or_default().push(ms);
        }
        Ok(())
    }

    fn of(&self, name: &str) -> &[f64] {
        &self.0[name]
    }
}

/// Waits until `ferry agents` reports all of them reachable (each described itself).
fn wait_described(cli: &Cli, agents: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = cli.json(&["agents"])?;
        let reachable = v
            .as_array()
            .map_or(0, |a| a.iter().filter(|x| x["reachable"] == true).count());
        if reachable == agents {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "only {reachable} of {agents} agents reachable after 120 s"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Waits (up to 300 s) until none of the newest `limit` jobs is queued or running.
fn wait_settled(cli: &Cli, limit: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let jobs = cli.json(&["jobs", "--limit", &limit.to_string()])?;
        let open = jobs.as_array().map_or(0, |a| {
            a.iter()
                .filter(|j| j["state"] == "queued" || j["state"] == "running")
                .count()
        });
        if open == 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{open} of the newest {limit} jobs still queued or running after 300 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Sum of `f(pid)` over `pids`, bytes.
fn total(pids: &[u32], f: fn(u32) -> anyhow::Result<u64>) -> anyhow::Result<u64> {
    pids.iter().map(|&p| f(p)).sum()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Starts the coordinator on `config` and waits until it listens on `port`.
fn start_coordinator(config: &Path, log: &Path, port: u16) -> Proc {
    let mut p = spawn_coordinator(config, log);
    p.wait_port(port, "ferry-coordinator");
    p
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.agents > 0 && args.runs > 0 && args.minutes > 0,
        "nothing to run"
    );
    let tmp = tempfile::Builder::new()
        .prefix("ferry-fleet-load-")
        .tempdir()?;
    let d = tmp.path().to_owned();
    make_reachable(&d);
    let ids: Vec<String> = (0..args.agents).map(agent_id).collect();

    // The backup server, the fleet CA and every certificate (issued four at a time).
    eprintln!(
        "starting sshd, issuing {} certificates ...",
        args.agents + 2
    );
    let started = Instant::now();
    let sshd = Sshd::start_in(&d.join("sshd"));
    let key = sshd.add_client_key_named("id_prod", "");
    let fleet = Fleet::new(&d);
    let mut names: Vec<String> = vec!["coordinator".into(), "operator".into()];
    names.extend(ids.iter().cloned());
    std::thread::scope(|s| {
        for chunk in names.chunks(names.len().div_ceil(4)) {
            let fleet = &fleet;
            s.spawn(move || {
                for n in chunk {
                    fleet.issue(n);
                }
            });
        }
    });
    let recipient = age_keygen(&d.join("staging.key"));
    eprintln!("  {:.1} s", started.elapsed().as_secs_f64());

    // The agents, each with a tiny directory of three files.
    eprintln!("starting {} agents ...", args.agents);
    let started = Instant::now();
    let mut configs = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let data = d.join("data").join(id);
        std::fs::create_dir_all(data.join("sub"))?;
        std::fs::write(data.join("a.txt"), format!("agent {id}\n").repeat(20))?;
        std::fs::write(data.join("b.bin"), incompressible(4096, i as u64 + 1))?;
        std::fs::write(data.join("sub/c.json"), format!("{{\"agent\": {i}}}\n"))?;
        let config = AgentConfig {
            id: id.clone(),
            role: AgentRole::Production,
            environment: "production".into(),
            listen: loopback(free_port()),
            tls: fleet.tls(id),
            backup_server: BackupServer::of(&sshd, &key),
            encryption: Encryption::Recipients(vec![recipient.clone()]),
            source_environment: None,
            datastores: vec![Datastore::Toml(format!(
                "[[datastores]]\nname = {}\nkind = \"files\"\npath = {}\n",
                toml_str(&datastore_of(i)),
                toml_str(&data.display().to_string())
            ))],
        };
        config.write(&d.join(format!("{id}.toml")));
        configs.push(config);
    }
    let mut agents: Vec<Proc> = ids
        .iter()
        .map(|id| spawn_agent(&d.join(format!("{id}.toml")), &d.join(format!("{id}.log"))))
        .collect();
    for (p, c) in agents.iter_mut().zip(&configs) {
        p.wait_port(c.listen.port(), &c.id);
    }
    let agent_pids: Vec<u32> = agents.iter().map(Proc::pid).collect();
    let agents_idle_rss = total(&agent_pids, rss_bytes)?;
    eprintln!(
        "  {:.1} s; agents' total RSS {:.0} MiB ({:.1} MiB each)",
        started.elapsed().as_secs_f64(),
        mib(agents_idle_rss),
        mib(agents_idle_rss) / args.agents as f64
    );

    // The history, before any coordinator opens the store.
    let store_path = d.join("coordinator.redb");
    eprintln!(
        "seeding {} jobs and {} catalog records ...",
        args.jobs, args.backups
    );
    let seeded = seed(
        &store_path,
        args.agents,
        args.jobs,
        args.backups,
        now_ms() - 60_000,
    )?;
    eprintln!(
        "  {:.1} s, {:.1} MiB store, states {:?}",
        seeded.seconds,
        mib(std::fs::metadata(&store_path)?.len()),
        seeded.states
    );

    let coordinator_port = free_port();
    let mut coordinator = CoordinatorConfig {
        listen: loopback(coordinator_port),
        store: store_path.clone(),
        agent_timeout_seconds: 120,
        tls: fleet.tls("coordinator"),
        retry: Some(Retry {
            max_attempts: 3,
            initial_backoff_seconds: 2,
            max_backoff_seconds: 10,
        }),
        agents: configs.iter().map(AgentEntry::of).collect(),
        operators: vec![Operator::admin("operator")],
        schedules: Vec::new(),
    };
    let coordinator_config = d.join("coordinator.toml");
    let cli = Cli {
        flags: vec![
            "--coordinator".into(),
            coordinator.address(),
            "--ca".into(),
            fleet.ca().display().to_string(),
            "--cert".into(),
            fleet.cert("operator").display().to_string(),
            "--key".into(),
            fleet.key("operator").display().to_string(),
        ],
    };

    // Phase 1: idle.
    coordinator.write(&coordinator_config);
    let log = d.join("coordinator.log");
    let mut c = start_coordinator(&coordinator_config, &log, coordinator_port);
    wait_described(&cli, args.agents)?;
    // The seeded orphans are taken up at start; let them finish before timing.
    wait_settled(&cli, 100)?;
    eprintln!("idle: timing {} runs of each command ...", args.runs);
    let mut idle = Timings::default();
    for _ in 0..args.runs {
        idle.measure_once(&cli)?;
    }
    let idle_peak = peak_rss_bytes(c.pid())?;
    c.terminate(Duration::from_secs(30));

    // Phase 2: the schedules, from the next minute at least 20 s away.
    let window_start_s = (now_ms() / 1000 + 20 + 59) / 60 * 60;
    let minutes: Vec<String> = (0..args.minutes as i64)
        .map(|k| ((window_start_s / 60 + k) % 60).to_string())
        .collect();
    let second_of = |i: usize| (i * 60 / args.agents) as i64;
    coordinator.schedules = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            Schedule::backup(
                id,
                Some(&datastore_of(i)),
                &format!("{} {} * * * *", second_of(i), minutes.join(",")),
            )
        })
        .collect();
    coordinator.write(&coordinator_config);
    let load_started_ms = now_ms();
    let mut c = start_coordinator(&coordinator_config, &log, coordinator_port);
    let window = Duration::from_secs(60 * u64::from(args.minutes));
    let window_start =
        Instant::now() + Duration::from_millis((window_start_s * 1000 - now_ms()).max(0) as u64);
    eprintln!(
        "load: {} backups a minute for {} minutes from {}; timing {} runs spread over them ...",
        args.agents,
        args.minutes,
        chrono::DateTime::from_timestamp(window_start_s, 0).expect("time"),
        args.runs
    );
    let mut load = Timings::default();
    for r in 0..args.runs {
        let at = window_start + window.mul_f64((r as f64 + 0.5) / args.runs as f64);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        load.measure_once(&cli)?;
    }
    std::thread::sleep((window_start + window).saturating_duration_since(Instant::now()));

    // Every job of the window final, then the state seen by the operator.
    let expected_jobs = args.agents * args.minutes as usize;
    wait_settled(&cli, expected_jobs + 100)?;
    let status = cli.json(&["status"])?;
    let backups = cli.json(&["backups"])?;
    let load_peak = peak_rss_bytes(c.pid())?;
    let agents_rss = total(&agent_pids, rss_bytes)?;
    let agents_peak = total(&agent_pids, peak_rss_bytes)?;
    let agents_max_peak = agent_pids
        .iter()
        .map(|&p| peak_rss_bytes(p))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .max()
        .unwrap_or(0);
    c.terminate(Duration::from_secs(30));
    for a in &mut agents {
        a.terminate(Duration::from_secs(10));
    }

    // The checks, from the store itself.
    let store = RedbStore::open(&store_path)?;
    let all = store.list_jobs(usize::MAX)?;
    let mut problems = Vec::new();
    let open: Vec<&Job> = all.iter().filter(|j| !j.state.is_final()).collect();
    if !open.is_empty() {
        problems.push(format!("{} jobs left queued or running", open.len()));
    }
    let orphans: Vec<&Job> = all
        .iter()
        .filter(|j| seeded.orphans.contains(&j.id))
        .collect();
    if orphans.len() != seeded.orphans.len() || orphans.iter().any(|j| !j.state.is_final()) {
        problems.push(format!(
            "seeded orphans: {:?}",
            orphans.iter().map(|j| (&j.id, j.state)).collect::<Vec<_>>()
        ));
    }
    let live: Vec<&Job> = all
        .iter()
        .filter(|j| j.created_ms >= load_started_ms)
        .collect();
    let mut retried = 0;
    for (i, id) in ids.iter().enumerate() {
        let mut mine: Vec<&&Job> = live.iter().filter(|j| &j.agent == id).collect();
        mine.sort_by_key(|j| j.created_ms);
        for k in 0..args.minutes as i64 {
            let occurrence_ms = (window_start_s + 60 * k + second_of(i)) * 1000;
            let hits: Vec<&&&Job> = mine
                .iter()
                .filter(|j| (j.created_ms - occurrence_ms).abs() < 30_000)
                .collect();
            match hits.as_slice() {
                [j] if j.state == JobState::Succeeded
                    && j.kind == JobKind::Backup
                    && j.trigger == "schedule"
                    && j.datastore == datastore_of(i) =>
                {
                    retried += usize::from(j.attempt > 1);
                }
                [j] => problems.push(format!(
                    "{id} at {occurrence_ms}: job {} is {} {} ({:?})",
                    j.id, j.kind, j.state, j.error
                )),
                hits => problems.push(format!(
                    "{id} at {occurrence_ms}: {} jobs, not one",
                    hits.len()
                )),
            }
        }
    }
    if live.len() != expected_jobs {
        problems.push(format!(
            "{} jobs created under load, {expected_jobs} expected",
            live.len()
        ));
    }
    if all.len() != seeded.jobs + live.len() {
        problems.push(format!(
            "{} jobs in the store, {} seeded + {} under load",
            all.len(),
            seeded.jobs,
            live.len()
        ));
    }
    let root = sshd.root().display().to_string();
    let listed: Vec<&str> = backups
        .as_array()
        .context("backups JSON is an array")?
        .iter()
        .filter_map(|b| b["stored_path"].as_str())
        .collect();
    // This run's records, not the seeded ones.
    let catalog: BTreeSet<String> = listed
        .iter()
        .filter(|p| !p.starts_with(SEEDED_ROOT))
        .map(|p| {
            p.strip_prefix(&root)
                .unwrap_or(p)
                .trim_start_matches('/')
                .to_owned()
        })
        .collect();
    if listed.len() - catalog.len() != seeded.backups {
        problems.push(format!(
            "{} seeded catalog records listed, {} seeded",
            listed.len() - catalog.len(),
            seeded.backups
        ));
    }
    let on_server: BTreeSet<String> = sshd
        .final_files()
        .into_iter()
        .filter(|f| !f.ends_with(".json"))
        .collect();
    let partial = sshd.files().len() - sshd.final_files().len();
    if catalog != on_server {
        problems.push(format!(
            "catalog and server differ: {} only in the catalog (e.g. {:?}), {} only on the server (e.g. {:?})",
            catalog.difference(&on_server).count(),
            catalog.difference(&on_server).next(),
            on_server.difference(&catalog).count(),
            on_server.difference(&catalog).next()
        ));
    }
    // What the catalog must hold: every backup that succeeded since the coordinator first
    // started (the window's and the orphans taken up).
    let made: BTreeSet<String> = live
        .iter()
        .chain(&orphans)
        .filter(|j| j.kind == JobKind::Backup && j.state == JobState::Succeeded)
        .filter_map(|j| j.result.as_ref())
        .map(|r| {
            r.stored_path
                .strip_prefix(&root)
                .unwrap_or(&r.stored_path)
                .trim_start_matches('/')
                .to_owned()
        })
        .collect();
    if catalog != made {
        problems.push(format!(
            "{} backups in the catalog, {} made by succeeded jobs",
            catalog.len(),
            made.len()
        ));
    }
    if partial != 0 {
        problems.push(format!("{partial} hidden (partial) files on the server"));
    }
    let rows = status["datastores"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let fresh = rows
        .iter()
        .filter(|r| r["last_job"]["state"] == "succeeded" && r["last_job"]["kind"] == "backup")
        .count();
    if rows.len() != args.agents || fresh != args.agents {
        problems.push(format!(
            "ferry status: {} rows, {fresh} with a succeeded backup as last job; {} expected",
            rows.len(),
            args.agents
        ));
    }

    // The figures.
    println!(
        "fleet-load: {} agents, {} seeded jobs and {} catalog records, {} minutes of schedules, {} runs per command",
        args.agents, seeded.jobs, seeded.backups, args.minutes, args.runs
    );
    println!(
        "  store: {:.1} MiB after the run; seeding took {:.1} s",
        mib(std::fs::metadata(&store_path)?.len()),
        seeded.seconds
    );
    println!("  wall time of the `ferry` CLI, ms     median    p95    max");
    for (phase, t) in [("idle", &idle), ("load", &load)] {
        for (name, _) in COMMANDS {
            let v = t.of(name);
            println!(
                "    {name:<8} {phase:<5}                 {:>7.1} {:>6.1} {:>6.1}",
                median(v),
                percentile(v, 95.0),
                v.iter().copied().fold(0.0, f64::max)
            );
        }
    }
    let status_worst = median(load.of("status")).max(median(idle.of("status")));
    println!(
        "  ferry status bound {STATUS_BOUND_MS:.0} ms (median): {}",
        if status_worst < STATUS_BOUND_MS {
            "within"
        } else {
            "EXCEEDED"
        }
    );
    println!(
        "  coordinator peak RSS: idle {:.1} MiB, under load {:.1} MiB",
        mib(idle_peak),
        mib(load_peak)
    );
    println!(
        "  agents' RSS: idle {:.0} MiB in all, after the load {:.0} MiB; peak {:.0} MiB in all, {:.1} MiB the largest",
        mib(agents_idle_rss),
        mib(agents_rss),
        mib(agents_peak),
        mib(agents_max_peak)
    );
    println!(
        "  jobs under load: {} ({} after a retry); catalog {} backups = {} archives on the server; seeded orphans taken up: {}",
        live.len(),
        retried,
        catalog.len(),
        on_server.len(),
        orphans
            .iter()
            .map(|j| format!("{} {}", j.kind, j.state))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if problems.is_empty() {
        println!("  every job's state is right");
        Ok(())
    } else {
        for p in &problems {
            println!("  WRONG: {p}");
        }
        if std::env::var("FERRY_KEEP_TEST_DIRS").is_ok_and(|v| v == "1") {
            eprintln!("kept {}", tmp.keep().display());
        }
        bail!("{} checks failed", problems.len())
    }
}
