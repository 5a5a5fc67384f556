//! PostgreSQL backup and restore: Ferry end to end (the `ferry` CLI → coordinator → agent
//! → backup server over SSH) against the shell pipelines it replaces, on one database of
//! `--gib` GiB of `pg_dump -Fc -Z0` output (default 2), every figure a median over
//! `--runs` runs (default 3) and a ratio to a baseline measured in the same run:
//!
//! - backup (a): `pg_dump -Fc | gzip | openssl enc -aes-256-cbc -pbkdf2 | ssh cat >`
//! - backup (b): `pg_dump -Fc -Z0 | zstd -T0 | age -r | ssh cat >`
//! - backup (c), the floor: `pg_dump -Fc -Z0 > /dev/null`
//! - restore: Ferry against the reverse of (a) and (b) into an empty database, and the
//!   floor `pg_restore` of a local `-Z0` file.
//!
//! `cargo run --release -p ferry-bench --bin pg-pipeline -- [--gib 2] [--runs 3]
//! [--before-agent PATH] [--restore-jobs N] [--compression-level N]`
//!
//! `--compression-level N` adds two backup rows at zstd level N: Ferry with
//! `compression_level = N` (backed up before the default's run, so that the restores
//! read the default's archive) and (b) with `zstd -N -T0`.
//!
//! The data is one table of orders: ids, customer numbers, timestamps, a status, amounts,
//! a sentence of words with a hex reference, and a jsonb document (sku, quantities,
//! prices, currency, tags, an IP address): zstd at level 3 makes it about a third.
//! The agents are restarted before each of their runs, so each peak RSS (`VmHWM`) is the
//! run's own; the agent's bytes written to local storage are `write_bytes` of
//! `/proc/PID/io` (its reaped children, pg_dump and pg_restore, included). The
//! pipelines' RSS is that of their largest process (`/usr/bin/time`'s `%M`).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use ferry_bench::{
    Figures, mb, mib, newest_archive, ratio, run_pipeline, settle, ssh_command, time_ferry,
};
use ferry_tests::*;

/// Command-line arguments.
#[derive(Parser)]
struct Args {
    /// Size of the database's `pg_dump -Fc -Z0` output to aim for, GiB.
    #[arg(long, default_value_t = 2.0)]
    gib: f64,
    /// Runs of each method; the figures are medians over them.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Skip the restores.
    #[arg(long)]
    no_restore: bool,
    /// Another build of `ferry-agent` (for instance the one before a change), measured
    /// beside this workspace's in the same run, as the row "Ferry (before)".
    #[arg(long)]
    before_agent: Option<std::path::PathBuf>,
    /// Also restore with `restore_jobs = N` (`pg_restore --jobs N` from the archive written
    /// to a `scratch_dir` on the staging host), as the row "Ferry (restore_jobs = N)".
    #[arg(long)]
    restore_jobs: Option<u32>,
    /// Also back up at this zstd level: Ferry with `compression_level = N` and (b) with
    /// `zstd -N`, as the rows "Ferry (compression_level = N)" and "(b) … zstd -N".
    #[arg(long)]
    compression_level: Option<i32>,
}

/// Rows of `orders` per GiB of `pg_dump -Z0` output (measured: about 268 bytes a row).
const ROWS_PER_GIB: f64 = 4.0e6;

/// Rows inserted per statement while seeding.
const BATCH_ROWS: u64 = 500_000;

const SCHEMA: &str = "CREATE TABLE orders (id bigint NOT NULL, customer_id int NOT NULL, \
    placed timestamptz NOT NULL, status text NOT NULL, total numeric(12,2) NOT NULL, \
    items int NOT NULL, note text, details jsonb)";

/// Rows `from..=to` of `orders` (see the module docs).
fn insert_sql(from: u64, to: u64) -> String {
    format!(
        "INSERT INTO orders SELECT g, (random() * 1000000)::int, \
           timestamptz '2023-01-01' + random() * interval '1000 days', \
           (ARRAY['new','paid','packed','shipped','delivered','cancelled','refunded'])[1 + (random() * 6)::int], \
           round((random() * 2000)::numeric, 2), 1 + (random() * 9)::int, \
           w[1 + (random() * 39)::int] || ' ' || w[1 + (random() * 39)::int] || ' ' || w[1 + (random() * 39)::int] || ' ' || \
           w[1 + (random() * 39)::int] || ' ' || w[1 + (random() * 39)::int] || ' ' || w[1 + (random() * 39)::int] || ', ref ' || \
           substr(md5(random()::text), 1, 16), \
           jsonb_build_object('sku', upper(substr(md5(random()::text), 1, 10)), 'qty', (random() * 20)::int, \
             'price', round((random() * 500)::numeric, 2), 'currency', (ARRAY['EUR','USD','GBP'])[1 + (random() * 2)::int], \
             'ip', (random() * 255)::int || '.' || (random() * 255)::int || '.' || (random() * 255)::int || '.' || (random() * 255)::int, \
             'tags', jsonb_build_array(w[1 + (random() * 39)::int], w[1 + (random() * 39)::int]), \
             'gift', random() < 0.1) \
         FROM generate_series({from}, {to}) g, \
           (SELECT ARRAY['delivery','customer','invoice','package','address','returned','damaged','express', \
             'warehouse','payment','card','refund','order','item','quantity','discount','coupon','weekend', \
             'morning','evening','please','call','before','after','door','neighbour','office','reception', \
             'fragile','glass','books','shoes','coffee','tea','garden','kitchen','bike','phone','cable','lamp'] AS w) words"
    )
}

fn size_of(path: &Path) -> anyhow::Result<u64> {
    Ok(fs::metadata(path)
        .with_context(|| path.display().to_string())?
        .len())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rows = (args.gib * ROWS_PER_GIB).ceil() as u64;
    eprintln!("df -h / before: {}", df());
    let mut d = Deployment::start_with_options(DeploymentOptions {
        source_sql: SCHEMA.to_owned(),
        io_timeout_seconds: Some(600),
        ..DeploymentOptions::default()
    });

    eprintln!("seeding app.orders: {rows} rows ...");
    let started = Instant::now();
    let mut from = 1;
    while from <= rows {
        let to = (from + BATCH_ROWS - 1).min(rows);
        d.prod_pg.psql("app", &insert_sql(from, to));
        from = to + 1;
    }
    d.prod_pg.psql(
        "app",
        "ALTER TABLE orders ADD PRIMARY KEY (id); VACUUM (FREEZE, ANALYZE) orders",
    );
    eprintln!(
        "seeded in {:.0} s; database {}",
        started.elapsed().as_secs_f64(),
        d.prod_pg
            .psql("app", "SELECT pg_size_pretty(pg_database_size('app'))")
    );
    // The staging cluster has the roles the pipelines' pg_restore needs (Ferry restores
    // them itself from the globals part).
    d.stage_pg
        .psql("postgres", "CREATE ROLE app_owner; CREATE ROLE app_reader");

    let bin_dir = d.prod_pg.bin_dir().to_owned();
    let pg = |tool: &str| bin_dir.join(tool).display().to_string();
    let conn = format!("-h 127.0.0.1 -p {} -U postgres", d.prod_pg.port());
    let stage_conn = format!("-h 127.0.0.1 -p {} -U postgres", d.stage_pg.port());
    let dir = d.dir.path().to_owned();
    let remote_dir = d.sshd.root().join("bench");
    fs::create_dir_all(&remote_dir)?;
    Command::new("chown")
        .arg(BACKUP_USER)
        .arg(&remote_dir)
        .status()?;
    let pass = dir.join("openssl.pass");
    fs::write(&pass, format!("{:032x}\n", ulid::Ulid::new().0))?;
    let recipient = d.recipient.clone();
    let (ssh_prod, ssh_stage) = (
        ssh_command(&d.sshd, &d.prod_key, "REMOTE"),
        ssh_command(&d.sshd, &d.stage_key, "REMOTE"),
    );
    let ssh = |remote: &str, key: &str| key.replace("REMOTE", remote);

    // Warm-up (hint bits, page cache) and the dump's size: pg_dump -Z0 to a local file,
    // kept for the restore floor.
    let local_dump = dir.join("floor.pgdump");
    let warm = run_pipeline(&format!(
        "{} {conn} -Fc -Z0 -f {} app",
        pg("pg_dump"),
        local_dump.display()
    ))?;
    let dump_bytes = size_of(&local_dump)?;
    eprintln!(
        "pg_dump -Fc -Z0: {:.1} MiB in {:.1} s (warm-up)",
        mib(dump_bytes),
        warm.seconds
    );
    eprintln!("df -h / after seeding: {}", df());

    let methods = ["ferry", "a", "b", "c"];
    let mut backup: Vec<Figures> = methods.iter().map(|_| Figures::default()).collect();
    let a_file = |run: usize| remote_dir.join(format!("a{run}.pgdump.gz.enc"));
    let b_file = |run: usize| remote_dir.join(format!("b{run}.pgdump.zst.age"));
    // Ferry's rows: this build, then the one of --before-agent if given.
    let agents: Vec<Option<std::path::PathBuf>> = std::iter::once(None)
        .chain(args.before_agent.clone().map(Some))
        .collect();
    let mut ferry_backup: Vec<Figures> = agents.iter().map(|_| Figures::default()).collect();
    let (mut level_ferry, mut level_b) = (Figures::default(), Figures::default());
    let prod_config = fs::read_to_string(&d.prod_config)?;
    for run in 1..=args.runs {
        if let Some(level) = args.compression_level {
            set_top_level(&d.prod_config, "compression_level", &level.to_string());
            let r = time_ferry(&mut d, "agent-prod", None, &["backup", "pg-prod", "--wait"]);
            fs::write(&d.prod_config, &prod_config)?;
            let r = r?;
            let s = r.seconds;
            let (path, _) = newest_archive(&d, "postgres")?;
            level_ferry.add_ferry(r);
            level_ferry.stored = size_of(&path)?;
            eprintln!(
                "run {run} ferry (compression_level = {level}): {s:.1} s, {:.1} MiB stored",
                mib(level_ferry.stored)
            );
        }
        for (k, agent) in agents.iter().enumerate() {
            // Ferry, with a fresh agent.
            let r = time_ferry(
                &mut d,
                "agent-prod",
                agent.as_deref(),
                &["backup", "pg-prod", "--wait"],
            )?;
            let s = r.seconds;
            let (path, manifest) = newest_archive(&d, "postgres")?;
            let f = &mut ferry_backup[k];
            f.add_ferry(r);
            f.stored = size_of(&path)?;
            let plain = manifest["bytes_uncompressed"].as_u64().unwrap_or(0);
            eprintln!(
                "run {run} ferry{}: {s:.1} s, {:.1} MiB stored of {:.1} MiB",
                if k == 0 { "" } else { " (before)" },
                mib(f.stored),
                mib(plain)
            );
        }

        settle()?;
        let a = run_pipeline(&format!(
            "{} {conn} -Fc app | gzip | openssl enc -aes-256-cbc -pbkdf2 -pass file:{} | {}",
            pg("pg_dump"),
            pass.display(),
            ssh(&format!("cat > {}", a_file(run).display()), &ssh_prod)
        ))?;
        backup[1].add(a.seconds, a.peak_rss_bytes, a.disk_written_bytes);
        backup[1].stored = size_of(&a_file(run))?;
        eprintln!("run {run} (a): {:.1} s", a.seconds);

        settle()?;
        let b = run_pipeline(&format!(
            "{} {conn} -Fc -Z0 app | zstd -q -T0 | age -r {recipient} | {}",
            pg("pg_dump"),
            ssh(&format!("cat > {}", b_file(run).display()), &ssh_prod)
        ))?;
        backup[2].add(b.seconds, b.peak_rss_bytes, b.disk_written_bytes);
        backup[2].stored = size_of(&b_file(run))?;
        eprintln!("run {run} (b): {:.1} s", b.seconds);

        if let Some(level) = args.compression_level {
            let file = remote_dir.join(format!("b{run}-level.pgdump.zst.age"));
            settle()?;
            let b = run_pipeline(&format!(
                "{} {conn} -Fc -Z0 app | zstd -q -{level} -T0 | age -r {recipient} | {}",
                pg("pg_dump"),
                ssh(&format!("cat > {}", file.display()), &ssh_prod)
            ))?;
            level_b.add(b.seconds, b.peak_rss_bytes, b.disk_written_bytes);
            level_b.stored = size_of(&file)?;
            fs::remove_file(&file)?;
            eprintln!("run {run} (b) zstd -{level}: {:.1} s", b.seconds);
        }

        settle()?;
        let c = run_pipeline(&format!("{} {conn} -Fc -Z0 app > /dev/null", pg("pg_dump")))?;
        backup[3].add(c.seconds, c.peak_rss_bytes, c.disk_written_bytes);
        eprintln!("run {run} (c): {:.1} s", c.seconds);
        // Keep one pipeline archive of each kind for the restores.
        if run > 1 {
            fs::remove_file(a_file(run))?;
            fs::remove_file(b_file(run))?;
        }
    }

    // Rows: Ferry, (a), (b), (c), then Ferry (before) if measured.
    let mut ferry_backup = ferry_backup.into_iter();
    backup[0] = ferry_backup.next().expect("this build was measured");
    backup.extend(ferry_backup);
    let mut backup_names: Vec<String> = vec![
        "Ferry (agent, zstd -3 + age, SFTP)".into(),
        "(a) pg_dump -Fc \\| gzip \\| openssl enc \\| ssh".into(),
        "(b) pg_dump -Z0 \\| zstd -T0 \\| age \\| ssh".into(),
        "(c) floor: pg_dump -Z0 > /dev/null".into(),
    ];
    if args.before_agent.is_some() {
        backup_names.push("Ferry (before: --before-agent)".into());
    }
    if let Some(level) = args.compression_level {
        backup.extend([level_ferry, level_b]);
        backup_names.push(format!("Ferry (compression_level = {level})"));
        backup_names.push(format!(
            "(b) pg_dump -Z0 \\| zstd -{level} -T0 \\| age \\| ssh"
        ));
    }

    // The restores' Ferry rows: the agents above with the staging config as it is, then
    // this build with `restore_jobs` if asked.
    let variants: Vec<(Option<std::path::PathBuf>, Option<u32>)> = agents
        .iter()
        .map(|a| (a.clone(), None))
        .chain(args.restore_jobs.map(|n| (None, Some(n))))
        .collect();
    let stage_config = fs::read_to_string(&d.stage_config)?;
    let scratch = dir.join("restore-scratch");
    fs::create_dir_all(&scratch)?;
    let mut restore: Vec<Figures> = methods.iter().map(|_| Figures::default()).collect();
    let mut ferry_restore: Vec<Figures> = variants.iter().map(|_| Figures::default()).collect();
    if !args.no_restore {
        // Untimed warm-up: a fresh cluster's first large restore creates its WAL segments
        // (zero-filled, 16 MiB each, up to max_wal_size) where later ones recycle them,
        // as a staging host's nightly restores do. Without it the invocation's first timed
        // restore, Ferry's, took about 4 s longer at 2 GiB (35.1 and 34.7 s against 30 to
        // 32 for the later ones, 3 CPU-seconds more in PostgreSQL).
        // No autovacuum in the staging cluster while restores are timed: the database a
        // Ferry restore leaves in place (`app`; the pipelines drop theirs) was vacuumed by an
        // autovacuum worker about a minute later, for a minute or more, into the following
        // steps' timed restores (seen in pg_stat_activity: `autovacuum: VACUUM ANALYZE
        // public.orders` beside the next pipeline's COPY). A staging host's restores are
        // hours apart.
        d.stage_pg
            .psql("postgres", "ALTER SYSTEM SET autovacuum = off");
        d.stage_pg.psql("postgres", "SELECT pg_reload_conf()");
        d.stage_pg.psql("postgres", "CREATE DATABASE bench_warm");
        let warm = run_pipeline(&format!(
            "{} {stage_conn} --exit-on-error -d bench_warm {}",
            pg("pg_restore"),
            local_dump.display()
        ))?;
        d.stage_pg.psql("postgres", "DROP DATABASE bench_warm");
        eprintln!("warm-up restore (untimed): {:.1} s", warm.seconds);
        let identity = d.identity.clone();
        for run in 1..=args.runs {
            for (k, (agent, jobs)) in variants.iter().enumerate() {
                let config = match jobs {
                    None => stage_config.clone(),
                    Some(n) => stage_config.replacen(
                        "target_database = \"app\"\n",
                        &format!(
                            "target_database = \"app\"\nrestore_jobs = {n}\nscratch_dir = \"{}\"\n",
                            scratch.display()
                        ),
                        1,
                    ),
                };
                anyhow::ensure!(
                    jobs.is_none() || config != stage_config,
                    "no target_database line in the staging config"
                );
                fs::write(&d.stage_config, config)?;
                let r = time_ferry(
                    &mut d,
                    "agent-stage",
                    agent.as_deref(),
                    &["restore", "pg-stage", "--wait"],
                )?;
                let s = r.seconds;
                ferry_restore[k].add_ferry(r);
                // The replaced database is dropped after the report (its forced checkpoint
                // writes the restored one out): the next timed step starts after it.
                let dropping = Instant::now();
                while d
                    .stage_pg
                    .databases()
                    .iter()
                    .any(|n| n.contains("__ferry_old_"))
                {
                    anyhow::ensure!(
                        dropping.elapsed().as_secs() < 300,
                        "the replaced database is still there after 300 s"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                eprintln!(
                    "run {run} ferry{} restore: {s:.1} s (then {:.1} s until the replaced database was dropped)",
                    match (k, jobs) {
                        (_, Some(n)) => format!(" (restore_jobs = {n})"),
                        (0, None) => String::new(),
                        _ => " (before)".into(),
                    },
                    dropping.elapsed().as_secs_f64()
                );
            }
            fs::write(&d.stage_config, &stage_config)?;
            let reverse = [
                format!(
                    "{} | openssl enc -d -aes-256-cbc -pbkdf2 -pass file:{} | gunzip",
                    ssh(&format!("cat {}", a_file(1).display()), &ssh_stage),
                    pass.display()
                ),
                format!(
                    "{} | age -d -i {} | zstd -q -d",
                    ssh(&format!("cat {}", b_file(1).display()), &ssh_stage),
                    identity.display()
                ),
            ];
            let restore_tool = format!(
                "{} {stage_conn} --exit-on-error -d bench_restore",
                pg("pg_restore")
            );
            let scripts = [
                format!("{} | {restore_tool}", reverse[0]),
                format!("{} | {restore_tool}", reverse[1]),
                format!("{restore_tool} {}", local_dump.display()),
            ];
            for (i, script) in scripts.iter().enumerate() {
                d.stage_pg.psql("postgres", "CREATE DATABASE bench_restore");
                settle()?;
                let r = run_pipeline(script)?;
                d.stage_pg.psql("postgres", "DROP DATABASE bench_restore");
                restore[i + 1].add(r.seconds, r.peak_rss_bytes, r.disk_written_bytes);
                eprintln!("run {run} ({}) restore: {:.1} s", methods[i + 1], r.seconds);
            }
        }
    }

    let mut ferry_restore = ferry_restore.into_iter();
    restore[0] = ferry_restore.next().expect("this build was measured");
    restore.extend(ferry_restore);

    let runs = args.runs;
    println!();
    println!(
        "pg-pipeline: {:.0} MB of pg_dump -Fc -Z0 output ({:.2} GiB), medians of {runs} runs, 2 cores",
        mb(dump_bytes),
        dump_bytes as f64 / (1u64 << 30) as f64
    );
    print_table(
        "| backup | wall s | MB/s of dump | vs (a) | vs (b) | vs floor (c) | stored MiB | peak RSS MiB | local disk written |",
        &backup_names,
        &backup,
        dump_bytes,
    );
    if !args.no_restore {
        print_table(
            "| restore | wall s | MB/s of dump | vs reverse (a) | vs reverse (b) | vs floor | stored MiB | peak RSS MiB | local disk written |",
            &[
                "Ferry (staging agent: roles checked, then pg_restore into a scratch db, hash, counts, swap)".into(),
                "reverse (a): ssh cat \\| openssl enc -d \\| gunzip \\| pg_restore".into(),
                "reverse (b): ssh cat \\| age -d \\| zstd -d \\| pg_restore".into(),
                "floor: pg_restore of a local -Z0 file".into(),
            ]
            .into_iter()
            .chain(variants.iter().skip(1).map(|(_, jobs)| match jobs {
                Some(n) => format!("Ferry (restore_jobs = {n}: pg_restore --jobs {n} from a file in scratch_dir)"),
                None => "Ferry (before: --before-agent)".into(),
            }))
            .collect::<Vec<String>>(),
            &restore,
            dump_bytes,
        );
    }
    println!();
    println!(
        "agent peak RSS per backup run (MiB): {:?}; bytes written to local disk by the agent per run: {:?}",
        backup[0].rss_mib, backup[0].disk_bytes
    );
    Ok(())
}

/// Prints one markdown table: a row per method (Ferry, (a), (b), the floor, then Ferry's
/// other rows: before, `restore_jobs`), each with its ratios to (a), (b) and the floor.
fn print_table(header: &str, names: &[String], figures: &[Figures], dump_bytes: u64) {
    println!();
    println!("{header}");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (i, f) in figures.iter().enumerate() {
        let s = f.s();
        println!(
            "| {} | {s:.1} | {:.0} | {} | {} | {} | {} | {:.1}{} | {:.0} B |",
            names[i],
            mb(dump_bytes) / s,
            ratio(s, figures[1].s()),
            ratio(s, figures[2].s()),
            ratio(s, figures[3].s()),
            if f.stored == 0 {
                "—".to_owned()
            } else {
                format!("{:.1}", mib(f.stored))
            },
            f.rss(),
            if names[i].starts_with("Ferry") {
                " (agent)"
            } else {
                " (largest process)"
            },
            f.disk()
        );
    }
}

fn df() -> String {
    Command::new("df")
        .args(["-h", "--output=avail", "/"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).replace('\n', " "))
        .unwrap_or_default()
}
