//! MongoDB dump at scale: the production agent's peak RSS and throughput while it dumps
//! one collection of `--gib` GiB (default 1) from SecantusDB through zstd and age to the
//! backup server over SFTP. The agent is restarted before each run, so each run's peak RSS
//! is its own. Issue 3's bound: peak RSS under 64 MiB.
//!
//! `cargo run --release -p ferry-bench --bin mongo-dump -- [--gib 1] [--runs 3] [--restore]`
//!
//! No shell pipeline is compared: `mongodump` is not packaged for Debian, so the figure is
//! absolute. `--restore` also restores the backup into a second server and prints the
//! staging agent's peak RSS and time (slow: SecantusDB inserts at a few MB/s).

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use bson::{RawDocumentBuf, rawdoc, spec::BinarySubtype};
use clap::Parser;
use ferry_bench::{Xorshift, insert_documents, median, mib, peak_rss_bytes};
use ferry_tests::*;

/// Command-line arguments.
#[derive(Parser)]
struct Args {
    /// Size of the collection to dump, in GiB (2^30 bytes of BSON).
    #[arg(long, default_value_t = 1.0)]
    gib: f64,
    /// Backups to run; the figures are medians over them.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Also restore the newest backup into staging and measure that.
    #[arg(long)]
    restore: bool,
}

/// Bytes of each document: 256 KiB, so that 1 GiB is 4,096 documents.
const DOC_BYTES: usize = 256 * 1024;

/// Document `i`: half incompressible bytes, half hex text (compresses about 2:1), so the
/// compressor does real work and the stored size is honest.
fn document(i: u64, rng: &mut Xorshift) -> RawDocumentBuf {
    let random: Vec<u8> = (0..DOC_BYTES / 2 / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    let text: String = (0..DOC_BYTES / 2 / 16)
        .map(|_| format!("{:016x}", rng.next()))
        .collect();
    rawdoc! {
        "_id": i as i64,
        "blob": bson::Binary { subtype: BinarySubtype::Generic, bytes: random },
        "text": text,
    }
}

fn ferry(d: &Deployment, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin("ferry"))
        .args(d.ferry_flags())
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "ferry {args:?} failed:\n{}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            d.logs()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let documents = ((args.gib * (1u64 << 30) as f64) / DOC_BYTES as f64).ceil() as u64;
    let mut servers = None;
    let mut d = Deployment::start_with("SELECT 1", |d| {
        let prod = MongoServer::start(&d.dir.path().join("mongo-prod"));
        let stage = MongoServer::start(&d.dir.path().join("mongo-stage"));
        for (config, server) in [(&d.prod_config, &prod), (&d.stage_config, &stage)] {
            append(config, &server.datastore_toml());
        }
        servers = Some((prod, stage));
    });
    let (prod, _stage) = servers.context("MongoDB servers started")?;
    let rt = tokio::runtime::Runtime::new()?;

    eprintln!("seeding bench.blobs: {documents} documents of 256 KiB ...");
    let started = Instant::now();
    let source_bytes = rt.block_on(insert_documents(
        &prod.uri(),
        ("bench", "blobs"),
        documents,
        32,
        document,
    ))?;
    eprintln!(
        "seeded {:.1} MiB in {:.0} s",
        mib(source_bytes),
        started.elapsed().as_secs_f64()
    );

    let mut seconds = Vec::new();
    let mut rss = Vec::new();
    for run in 1..=args.runs {
        d.start_agent("agent-prod");
        let pid = d.procs["agent-prod"].pid();
        let idle = peak_rss_bytes(pid)?;
        let started = Instant::now();
        ferry(&d, &["backup", "pg-prod", "mongo", "--wait"])?;
        let s = started.elapsed().as_secs_f64();
        let peak = peak_rss_bytes(pid)?;
        eprintln!(
            "run {run}: {s:.1} s, agent peak RSS {:.1} MiB (idle {:.1} MiB)",
            mib(peak),
            mib(idle)
        );
        seconds.push(s);
        rss.push(mib(peak));
    }
    let stored: serde_json::Value =
        serde_json::from_str(&ferry(&d, &["--output", "json", "backups"])?)?;
    let stored_bytes = stored
        .as_array()
        .and_then(|a| a.iter().find(|b| b["datastore"] == "mongo"))
        .and_then(|b| b["size_bytes"].as_u64())
        .unwrap_or(0);

    let s = median(&seconds);
    let peak = median(&rss);
    println!("mongo-dump: one collection, {documents} documents");
    println!("  source BSON           {:>10.1} MiB", mib(source_bytes));
    println!("  stored (zstd + age)   {:>10.1} MiB", mib(stored_bytes));
    println!(
        "  backup time (median of {}) {:>6.1} s  ({:.1} MiB/s)",
        args.runs,
        s,
        mib(source_bytes) / s
    );
    println!(
        "  agent peak RSS (median) {:>8.1} MiB  (max {:.1}; bound 64 MiB: {})",
        peak,
        rss.iter().copied().fold(0.0, f64::max),
        if rss.iter().all(|&r| r < 64.0) {
            "within"
        } else {
            "EXCEEDED"
        }
    );

    if args.restore {
        let pid = d.procs["agent-stage"].pid();
        let started = Instant::now();
        ferry(
            &d,
            &["restore", "pg-stage", "--datastore", "mongo", "--wait"],
        )?;
        println!(
            "  restore time {:>17.1} s, staging agent peak RSS {:.1} MiB",
            started.elapsed().as_secs_f64(),
            mib(peak_rss_bytes(pid)?)
        );
    }
    // A clean shutdown (SIGTERM to the agent itself, also under FERRY_AGENT_WRAPPER), so
    // that a profiler wrapping it writes its report.
    for (name, config) in [
        ("agent-prod", &d.prod_config),
        ("agent-stage", &d.stage_config),
    ] {
        let _ = Command::new("pkill")
            .arg("-TERM")
            .arg("-f")
            .arg(format!("ferry-agent run --config {}", config.display()))
            .status();
        if let Some(p) = d.procs.get_mut(name) {
            p.wait_exit(std::time::Duration::from_secs(30));
        }
    }
    Ok(())
}
