//! MongoDB with many small documents: Ferry's dump and restore of one collection of
//! `--docs` documents (default 10^6, about 400 bytes of BSON each) on SecantusDB, against
//! the floor of the same driver (the Rust `mongodb` crate the agent uses) on the same
//! server: a cursor over the collection read to nowhere for the dump, `insert_many` of
//! 1,000 documents at a time into an empty collection for the restore. Every figure is a
//! median over `--runs` runs (default 3) and a ratio to the floor measured in the same run.
//!
//! `cargo run --release -p ferry-bench --bin mongo-docs -- [--docs 1000000] [--runs 3] [--restore-runs 3]`
//!
//! No shell pipeline is compared: `mongodump`/`mongorestore` are not packaged for Debian.

use std::time::Instant;

use anyhow::Context;
use bson::{RawDocumentBuf, rawdoc};
use clap::Parser;
use ferry_bench::{
    CpuWatch, Xorshift, ferry_ok, insert_documents, io_write_bytes, mb, median, mib,
    peak_rss_bytes, ratio,
};
use ferry_tests::*;

/// Command-line arguments.
#[derive(Parser)]
struct Args {
    /// Documents in the collection.
    #[arg(long, default_value_t = 1_000_000)]
    docs: u64,
    /// Dumps of each method; the figures are medians over them.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Restores of each method (0 for none).
    #[arg(long, default_value_t = 3)]
    restore_runs: usize,
}

const CITIES: [&str; 8] = [
    "Lyon", "Porto", "Gdansk", "Leeds", "Malmo", "Ghent", "Turin", "Graz",
];
const STATUS: [&str; 5] = ["active", "trial", "suspended", "closed", "pending"];

/// Document `i`: a customer with strings, numbers, a date, an array and a subdocument.
fn document(i: u64, rng: &mut Xorshift) -> RawDocumentBuf {
    let city = CITIES[rng.below(8) as usize];
    rawdoc! {
        "_id": i as i64,
        "name": format!("customer {i} {:08x}", rng.next() as u32),
        "email": format!("c{i}.{:06x}@example.org", rng.below(1 << 24)),
        "status": STATUS[rng.below(5) as usize],
        "created": bson::DateTime::from_millis(1_600_000_000_000 + rng.below(100_000_000_000) as i64),
        "balance": rng.below(10_000_000) as f64 / 100.0,
        "orders": rng.below(500) as i32,
        "tags": [format!("t{}", rng.below(50)), format!("t{}", rng.below(50))],
        "address": {
            "street": format!("{} {} street", rng.below(300), city),
            "city": city,
            "zip": format!("{:05}", rng.below(100_000)),
        },
        "note": format!("{:016x}{:016x} preferred delivery {}", rng.next(), rng.next(), rng.below(7)),
    }
}

/// Reads every document of `db.customers` through a cursor; returns (documents, bytes).
async fn read_all(uri: &str, db: &str) -> anyhow::Result<(u64, u64)> {
    let client = mongodb::Client::with_uri_str(uri).await?;
    let coll = client
        .database(db)
        .collection::<RawDocumentBuf>("customers");
    let mut cursor = coll.find(bson::doc! {}).await?;
    let (mut n, mut bytes) = (0u64, 0u64);
    while cursor.advance().await? {
        bytes += cursor.current().as_bytes().len() as u64;
        n += 1;
    }
    Ok((n, bytes))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut servers = None;
    let mut d = Deployment::start_with_options(DeploymentOptions {
        source_sql: "SELECT 1".into(),
        io_timeout_seconds: Some(600),
        tweak: Some(Box::new(|d: &mut Deployment| {
            let prod = MongoServer::start(&d.dir.path().join("mongo-prod"));
            let stage = MongoServer::start(&d.dir.path().join("mongo-stage"));
            for (config, server) in [(&d.prod_config, &prod), (&d.stage_config, &stage)] {
                append(config, &server.datastore_toml());
            }
            servers = Some((prod, stage));
        })),
        ..DeploymentOptions::default()
    });
    let (prod, stage) = servers.context("MongoDB servers started")?;
    let rt = tokio::runtime::Runtime::new()?;

    eprintln!("seeding bench.customers: {} documents ...", args.docs);
    let t = Instant::now();
    let bson_bytes = rt.block_on(insert_documents(
        &prod.uri(),
        ("bench", "customers"),
        args.docs,
        1000,
        document,
    ))?;
    let seed_s = t.elapsed().as_secs_f64();
    eprintln!("seeded {:.1} MiB of BSON in {seed_s:.0} s", mib(bson_bytes));
    let docs = args.docs as f64;

    // Dumps.
    let (mut ferry_s, mut ferry_rss, mut ferry_disk, mut floor_s) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut stored = 0;
    for run in 1..=args.runs {
        let cpu = CpuWatch::when_asked();
        let t = Instant::now();
        let (n, _) = rt.block_on(read_all(&prod.uri(), "bench"))?;
        floor_s.push(t.elapsed().as_secs_f64());
        CpuWatch::print(cpu, "the dump's floor (a cursor read to nowhere)");
        assert_eq!(n, args.docs, "documents read");

        d.start_agent("agent-prod");
        let pid = d.procs["agent-prod"].pid();
        let io0 = io_write_bytes(pid)?;
        let cpu = CpuWatch::when_asked();
        let t = Instant::now();
        ferry_ok(&d, &["backup", "pg-prod", "mongo", "--wait"])?;
        let s = t.elapsed().as_secs_f64();
        CpuWatch::print(cpu, "Ferry's dump");
        ferry_s.push(s);
        ferry_rss.push(mib(peak_rss_bytes(pid)?));
        ferry_disk.push((io_write_bytes(pid)? - io0) as f64);
        let f = d
            .sshd
            .final_files()
            .into_iter()
            .rfind(|f| f.contains("/mongo_backup_") && f.ends_with(".age"))
            .context("no stored MongoDB archive")?;
        stored = std::fs::metadata(d.sshd.root().join(f))?.len();
        eprintln!(
            "run {run}: ferry {s:.1} s, cursor floor {:.1} s",
            floor_s[run - 1]
        );
    }

    // Restores.
    let (mut rferry_s, mut rferry_rss, mut rfloor_s) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=args.restore_runs {
        let cpu = CpuWatch::when_asked();
        let t = Instant::now();
        rt.block_on(insert_documents(
            &stage.uri(),
            ("floor", "customers"),
            args.docs,
            1000,
            document,
        ))?;
        rfloor_s.push(t.elapsed().as_secs_f64());
        CpuWatch::print(cpu, "the restore's floor (insert_many)");
        rt.block_on(async {
            let c = mongodb::Client::with_uri_str(stage.uri()).await?;
            c.database("floor").drop().await
        })?;

        d.start_agent("agent-stage");
        let pid = d.procs["agent-stage"].pid();
        let cpu = CpuWatch::when_asked();
        let t = Instant::now();
        ferry_ok(
            &d,
            &["restore", "pg-stage", "--datastore", "mongo", "--wait"],
        )?;
        let s = t.elapsed().as_secs_f64();
        CpuWatch::print(cpu, "Ferry's restore");
        rferry_s.push(s);
        rferry_rss.push(mib(peak_rss_bytes(pid)?));
        eprintln!(
            "run {run}: ferry restore {s:.1} s, insert_many floor {:.1} s",
            rfloor_s[run - 1]
        );
    }

    println!();
    println!(
        "mongo-docs: {} documents, {:.1} MiB of BSON ({:.0} bytes each), stored {:.1} MiB; medians, 2 cores; seeding took {seed_s:.0} s",
        args.docs,
        mib(bson_bytes),
        bson_bytes as f64 / docs,
        mib(stored)
    );
    println!();
    println!(
        "| method | runs | wall s | documents/s | MB/s of BSON | vs floor | peak RSS MiB | local disk written |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let row = |label: &str, s: &[f64], floor: &[f64], rss: &str, disk: &str| {
        let m = median(s);
        println!(
            "| {label} | {} | {m:.1} | {:.0} | {:.1} | {} | {rss} | {disk} |",
            s.len(),
            docs / m,
            mb(bson_bytes) / m,
            ratio(m, median(floor))
        );
    };
    row(
        "dump: Ferry (driver → archive → zstd → age → SFTP)",
        &ferry_s,
        &floor_s,
        &format!("{:.1} (agent)", median(&ferry_rss)),
        &format!("{:.0} B", median(&ferry_disk)),
    );
    row(
        "dump floor: driver cursor to nowhere",
        &floor_s,
        &floor_s,
        "—",
        "0 B",
    );
    if args.restore_runs > 0 {
        row(
            "restore: Ferry (SFTP → age → zstd → scratch db → rename)",
            &rferry_s,
            &rfloor_s,
            &format!("{:.1} (agent)", median(&rferry_rss)),
            "—",
        );
        row(
            "restore floor: driver insert_many of 1,000",
            &rfloor_s,
            &rfloor_s,
            "—",
            "—",
        );
    }
    Ok(())
}
