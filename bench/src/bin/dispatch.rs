//! Coordinator dispatch: the time for the coordinator to take and dispatch `--orders`
//! backup orders at once (default 1,000), one per datastore of one production agent
//! (`--orders` tiny `files` datastores of one 4 KiB file each), over `--runs` runs
//! (default 3):
//!
//! - trigger: wall time of `ferry backup pg-prod` (no `--wait`): the coordinator records
//!   a job per datastore and returns their ids;
//! - all done: from the trigger until every job of the trigger is terminal (read with
//!   `ferry --output json jobs --limit N` every 200 ms), with the count that succeeded.
//!
//! `cargo run --release -p ferry-bench --bin dispatch -- [--orders 1000] [--runs 3]`
//!
//! `ferry status` with 100,000 jobs in history is `fleet-load`'s (see bench/README.md).

use std::collections::BTreeSet;
use std::fs;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use ferry_bench::{median, mib, peak_rss_bytes};
use ferry_tests::*;

/// Command-line arguments.
#[derive(Parser)]
struct Args {
    /// Orders (datastores of the agent) per trigger.
    #[arg(long, default_value_t = 1000)]
    orders: usize,
    /// Triggers; the figures are medians over them.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let n = args.orders;
    let d = Deployment::start_with_options(DeploymentOptions {
        source_sql: "SELECT 1".into(),
        tweak: Some(Box::new(move |d: &mut Deployment| {
            // Only the tiny datastores: the agent's PostgreSQL one is dropped.
            let base = fs::read_to_string(&d.prod_config).expect("config");
            let base = base
                .split("[[datastores]]")
                .next()
                .expect("head")
                .to_owned();
            let mut config = base;
            for i in 0..n {
                let dir = d.dir.path().join(format!("tiny/{i:04}"));
                fs::create_dir_all(&dir).expect("mkdir");
                fs::write(dir.join("data"), vec![b'x'; 4096]).expect("write");
                config.push_str(&format!(
                    "\n[[datastores]]\nname = \"t{i:04}\"\nkind = \"files\"\npath = \"{}\"\n",
                    dir.display()
                ));
            }
            fs::write(&d.prod_config, config).expect("write config");
        })),
        ..DeploymentOptions::default()
    });
    let coordinator = d.procs["coordinator"].pid();
    let agent = d.procs["agent-prod"].pid();

    let (mut trigger_s, mut done_s, mut ok) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=args.runs {
        let t = Instant::now();
        let out = d.ferry(&["--output", "json", "backup", "pg-prod"]);
        let trig = t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!(
                "ferry backup failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                d.logs()
            );
        }
        let ids: BTreeSet<String> = {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            v["job_ids"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|j| j.as_str().map(str::to_owned))
                .collect()
        };
        if ids.len() != n {
            bail!(
                "expected {n} job ids, got {}: {}",
                ids.len(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let limit = (n * (args.runs + 1)).to_string();
        let (finished, succeeded) = loop {
            let jobs = d.ferry_json(&["jobs", "--limit", &limit]);
            let ours: Vec<&serde_json::Value> = jobs
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|j| j["id"].as_str().is_some_and(|id| ids.contains(id)))
                        .collect()
                })
                .unwrap_or_default();
            let terminal = ours
                .iter()
                .filter(|j| {
                    ["succeeded", "failed", "cancelled"]
                        .contains(&j["state"].as_str().unwrap_or(""))
                })
                .count();
            if terminal == n {
                let good = ours.iter().filter(|j| j["state"] == "succeeded").count();
                break (t.elapsed().as_secs_f64(), good);
            }
            if t.elapsed() > Duration::from_secs(1800) {
                bail!("{terminal} of {n} jobs terminal after 30 min");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        eprintln!(
            "run {run}: trigger {trig:.2} s, all terminal {finished:.1} s, {succeeded} succeeded"
        );
        trigger_s.push(trig);
        done_s.push(finished);
        ok.push(succeeded);
    }
    println!();
    println!(
        "dispatch: {n} backup orders per trigger (one per datastore of one agent), medians of {} runs, 2 cores",
        args.runs
    );
    println!();
    println!("| figure | median | per order |");
    println!("|---|---|---|");
    let t = median(&trigger_s);
    println!(
        "| `ferry backup pg-prod` returns ({n} jobs recorded) | {t:.2} s | {:.2} ms |",
        t * 1000.0 / n as f64
    );
    let a = median(&done_s);
    println!(
        "| every job terminal | {a:.1} s | {:.1} ms |",
        a * 1000.0 / n as f64
    );
    println!(
        "\nsucceeded per run: {ok:?}; peak RSS: coordinator {:.1} MiB, agent {:.1} MiB",
        mib(peak_rss_bytes(coordinator)?),
        mib(peak_rss_bytes(agent)?)
    );
    Ok(())
}
