//! Files: Ferry's backup and restore of a directory tree (`kind = "files"`, a tar stream
//! through zstd and age to the backup server) against the shell pipeline it replaces, for
//! a tree of `--small` small files (default 100,000, 512 B to 8 KiB) and one of `--large`
//! large files (default 4 of `--large-mib` MiB each, 256 by default), every figure a
//! median over `--runs` runs (default 3) and a ratio to a baseline measured in the same
//! run:
//!
//! - backup: `tar -cf - . | zstd -T0 | age -r | ssh cat >`, floor `tar -cf - . | cat > /dev/null`
//!   (GNU tar reads nothing when it writes straight to /dev/null)
//! - restore: `ssh cat | age -d | zstd -d | tar -x` into a new directory
//!
//! `cargo run --release -p ferry-bench --bin files-tree -- [--small 100000] [--large 4] [--large-mib 256] [--runs 3]`
//!
//! Content: each file half random bytes and half words, so zstd stores about 60 %.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use ferry_bench::{
    Figures, Xorshift, mb, mib, newest_archive, ratio, run_pipeline, settle, ssh_command,
    time_ferry,
};
use ferry_tests::*;

/// Command-line arguments.
#[derive(Parser)]
struct Args {
    /// Small files in the first tree (1,000 per directory).
    #[arg(long, default_value_t = 100_000)]
    small: u64,
    /// Large files in the second tree.
    #[arg(long, default_value_t = 4)]
    large: u64,
    /// Size of each large file, MiB.
    #[arg(long, default_value_t = 256)]
    large_mib: u64,
    /// Runs of each method; the figures are medians over them.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Another build of `ferry-agent` (for instance the one before a change), measured
    /// beside this workspace's in the same run, as the rows "Ferry (before)".
    #[arg(long)]
    before_agent: Option<std::path::PathBuf>,
}

const WORDS: [&str; 16] = [
    "object",
    "bucket",
    "version",
    "metadata",
    "tenant",
    "upload",
    "part",
    "etag",
    "region",
    "storage",
    "policy",
    "lifecycle",
    "replica",
    "checksum",
    "header",
    "content",
];

/// `len` bytes: the first half random, the second words.
fn content(len: usize, rng: &mut Xorshift) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len / 2 {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    while out.len() < len {
        out.extend_from_slice(WORDS[rng.below(16) as usize].as_bytes());
        out.push(b' ');
    }
    out.truncate(len);
    out
}

/// Writes the small tree (`n` files, 1,000 per directory) and returns its bytes.
fn small_tree(root: &Path, n: u64) -> anyhow::Result<u64> {
    let mut rng = Xorshift(0x5DEE_CE66_D1CE_4E5B);
    let mut bytes = 0;
    for i in 0..n {
        let dir = root.join(format!(
            "bucket-{:03}/obj-{:02}",
            i / 10_000,
            (i / 1000) % 10
        ));
        if i % 1000 == 0 {
            fs::create_dir_all(&dir)?;
        }
        let len = 512 + rng.below(8 * 1024 - 512) as usize;
        fs::write(dir.join(format!("{i:07}.dat")), content(len, &mut rng))?;
        bytes += len as u64;
    }
    Ok(bytes)
}

/// Writes the large tree (`n` files of `each` MiB) and returns its bytes.
fn large_tree(root: &Path, n: u64, each_mib: u64) -> anyhow::Result<u64> {
    let mut rng = Xorshift(0x2545_F491_4F6C_DD1D);
    fs::create_dir_all(root)?;
    for i in 0..n {
        let mut f = std::io::BufWriter::new(fs::File::create(root.join(format!("big-{i}.bin")))?);
        for _ in 0..each_mib {
            f.write_all(&content(1 << 20, &mut rng))?;
        }
        f.flush()?;
    }
    Ok((n * each_mib) << 20)
}

/// The label of Ferry's row `k`: 3 is the `--before-agent` build.
fn before(k: usize) -> &'static str {
    if k == 3 { " (before)" } else { "" }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut trees = None;
    let mut d = Deployment::start_with_options(DeploymentOptions {
        source_sql: "SELECT 1".into(),
        io_timeout_seconds: Some(600),
        tweak: Some(Box::new(|d: &mut Deployment| {
            let prod = d.dir.path().join("files-prod");
            let stage = d.dir.path().join("files-stage");
            for name in ["small", "large"] {
                fs::create_dir_all(prod.join(name)).expect("mkdir");
                fs::create_dir_all(stage.join(name)).expect("mkdir");
                append(
                    &d.prod_config,
                    &format!(
                        "[[datastores]]\nname = \"{name}\"\nkind = \"files\"\npath = \"{}\"\n",
                        prod.join(name).display()
                    ),
                );
                append(
                    &d.stage_config,
                    &format!(
                        "[[datastores]]\nname = \"{name}\"\nkind = \"files\"\npath = \"{}\"\n",
                        stage.join(name).display()
                    ),
                );
            }
            trees = Some((prod, stage));
        })),
        ..DeploymentOptions::default()
    });
    let (prod, stage) = trees.context("trees")?;
    let started = Instant::now();
    let small_bytes = small_tree(&prod.join("small"), args.small)?;
    let large_bytes = large_tree(&prod.join("large"), args.large, args.large_mib)?;
    eprintln!(
        "wrote {} small files ({:.1} MiB) and {} large ({:.1} MiB) in {:.0} s",
        args.small,
        mib(small_bytes),
        args.large,
        mib(large_bytes),
        started.elapsed().as_secs_f64()
    );
    let remote_dir = d.sshd.root().join("bench");
    fs::create_dir_all(&remote_dir)?;
    std::process::Command::new("chown")
        .arg(BACKUP_USER)
        .arg(&remote_dir)
        .status()?;
    let ssh_prod = ssh_command(&d.sshd, &d.prod_key, "REMOTE");
    let ssh_stage = ssh_command(&d.sshd, &d.stage_key, "REMOTE");
    let recipient = d.recipient.clone();
    let identity = d.identity.clone();

    let mut report = Vec::new();
    for (name, files, bytes) in [
        ("small", args.small, small_bytes),
        ("large", args.large, large_bytes),
    ] {
        let src = prod.join(name);
        // Warm-up: the tree in the page cache, as for every method after it.
        run_pipeline(&format!(
            "tar -C {} -cf - . | cat > /dev/null",
            src.display()
        ))?;
        // [Ferry, pipeline, floor, Ferry before (if --before-agent)]
        let mut backup: [Figures; 4] = Default::default();
        let mut restore: [Figures; 4] = Default::default();
        let mut tar_bytes = 0;
        let remote = remote_dir.join(format!("{name}.tar.zst.age"));
        let agents: Vec<(usize, Option<std::path::PathBuf>)> = std::iter::once((0, None))
            .chain(args.before_agent.clone().map(|b| (3, Some(b))))
            .collect();
        for run in 1..=args.runs {
            for (k, agent) in &agents {
                let r = time_ferry(
                    &mut d,
                    "agent-prod",
                    agent.as_deref(),
                    &["backup", "pg-prod", name, "--wait"],
                )?;
                let s = r.seconds;
                backup[*k].add_ferry(r);
                let (path, manifest) = newest_archive(&d, name)?;
                backup[*k].stored = fs::metadata(&path)?.len();
                tar_bytes = manifest["bytes_uncompressed"].as_u64().unwrap_or(0);
                eprintln!("{name} run {run} ferry backup{}: {s:.1} s", before(*k));
            }

            let _ = fs::remove_file(&remote);
            settle()?;
            let b = run_pipeline(&format!(
                "tar -C {} -cf - . | zstd -q -T0 | age -r {recipient} | {}",
                src.display(),
                ssh_prod.replace("REMOTE", &format!("cat > {}", remote.display()))
            ))?;
            backup[1].add(b.seconds, b.peak_rss_bytes, b.disk_written_bytes);
            backup[1].stored = fs::metadata(&remote)?.len();
            settle()?;
            let c = run_pipeline(&format!(
                "tar -C {} -cf - . | cat > /dev/null",
                src.display()
            ))?;
            backup[2].add(c.seconds, c.peak_rss_bytes, c.disk_written_bytes);
            eprintln!(
                "{name} run {run} pipeline {:.1} s, floor {:.1} s",
                b.seconds, c.seconds
            );

            let mut ferry_restore = Vec::new();
            for (k, agent) in &agents {
                // The restored tree is the agent's output: its writes are expected here.
                let r = time_ferry(
                    &mut d,
                    "agent-stage",
                    agent.as_deref(),
                    &["restore", "pg-stage", "--datastore", name, "--wait"],
                )?;
                let s = r.seconds;
                restore[*k].add_ferry(r);
                ferry_restore.push(format!("{s:.1} s{}", before(*k)));
            }

            let out = stage.join(format!("{name}-pipeline"));
            fs::create_dir_all(&out)?;
            settle()?;
            let r = run_pipeline(&format!(
                "{} | age -d -i {} | zstd -q -d | tar -C {} -xf -",
                ssh_stage.replace("REMOTE", &format!("cat {}", remote.display())),
                identity.display(),
                out.display()
            ))?;
            restore[1].add(r.seconds, r.peak_rss_bytes, r.disk_written_bytes);
            fs::remove_dir_all(&out)?;
            let local = stage.join(format!("{name}.tar"));
            run_pipeline(&format!(
                "tar -C {} -cf {} .",
                src.display(),
                local.display()
            ))?;
            fs::create_dir_all(&out)?;
            settle()?;
            let f = run_pipeline(&format!("tar -C {} -xf {}", out.display(), local.display()))?;
            restore[2].add(f.seconds, f.peak_rss_bytes, f.disk_written_bytes);
            fs::remove_dir_all(&out)?;
            fs::remove_file(&local)?;
            eprintln!(
                "{name} run {run} restore: ferry {}, pipeline {:.1} s, floor {:.1} s",
                ferry_restore.join(", "),
                r.seconds,
                f.seconds
            );
        }
        report.push((name, files, bytes, tar_bytes, backup, restore));
    }

    println!();
    println!(
        "files-tree: medians of {} runs, 2 cores; MB/s of the tar stream",
        args.runs
    );
    for (name, files, bytes, tar_bytes, backup, restore) in &report {
        println!();
        println!(
            "{name}: {files} files, {:.1} MiB of file data, {:.1} MiB of tar",
            mib(*bytes),
            mib(*tar_bytes)
        );
        println!();
        println!(
            "| {name} | wall s | MB/s | files/s | vs pipeline | vs floor | stored MiB | peak RSS MiB | local disk written |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        let mut rows: Vec<(&str, &Figures, &Figures, &Figures)> = vec![
            ("backup: Ferry", &backup[0], &backup[1], &backup[2]),
            (
                "backup: tar \\| zstd -T0 \\| age \\| ssh",
                &backup[1],
                &backup[1],
                &backup[2],
            ),
            (
                "backup floor: tar \\| cat > /dev/null",
                &backup[2],
                &backup[1],
                &backup[2],
            ),
            ("restore: Ferry", &restore[0], &restore[1], &restore[2]),
            (
                "restore: ssh cat \\| age -d \\| zstd -d \\| tar -x",
                &restore[1],
                &restore[1],
                &restore[2],
            ),
            (
                "restore floor: tar -x of a local tar",
                &restore[2],
                &restore[1],
                &restore[2],
            ),
        ];
        if args.before_agent.is_some() {
            rows.insert(
                3,
                ("backup: Ferry (before)", &backup[3], &backup[1], &backup[2]),
            );
            rows.push((
                "restore: Ferry (before)",
                &restore[3],
                &restore[1],
                &restore[2],
            ));
        }
        for (label, f, base, floor) in rows.iter() {
            let s = f.s();
            println!(
                "| {label} | {s:.2} | {:.0} | {:.0} | {} | {} | {} | {:.1} | {:.1} MiB |",
                mb(*tar_bytes) / s,
                *files as f64 / s,
                ratio(s, base.s()),
                ratio(s, floor.s()),
                if f.stored > 0 {
                    format!("{:.1}", mib(f.stored))
                } else {
                    "—".into()
                },
                f.rss(),
                mib(f.disk() as u64),
            );
        }
    }
    Ok(())
}
