//! S3: Ferry's backup of `--gib` GiB (default 2) of incompressible files to a Ceph RGW
//! against the stock S3 client writing the same ciphertext to the same endpoint, and
//! Ferry's restore against the stock client's download (issue 17: Ferry at least 0.9× the
//! stock client's upload throughput; the agent's peak RSS under 64 MiB for a 4 GiB backup).
//!
//! `cargo run --release -p ferry-bench --bin s3-upload -- [--gib 2] [--runs 3] [--replicas 3] [--agent PATH] [--parts-in-flight 1,2,3]`
//!
//! The set-up is the e2e tests': a one-host Ceph cluster of the test harness (a monitor,
//! three memstore OSDs, an RGW on loopback), a bucket with Object Lock (so versioned) and
//! the bucket policy of `docs/s3-bucket-policy.json` for the three credential sets; a
//! production agent whose `[backup_server]` is that bucket with the production keys, a
//! staging agent reading it with the staging keys, a coordinator with the maintenance keys
//! as `[maintenance]` (no lock), and the real `ferry` CLI. The data is a `files` datastore
//! of `--gib` GiB of random bytes in files of 1 GiB, so zstd stores it as it is and the
//! ciphertext has about the data's size.
//!
//! Before the runs, a warm-up: a 24 MiB multipart upload with boto3 as production and its
//! download as staging, then removed. The RGW creates its data pools at the first write
//! into them, which made the first run's `CreateMultipartUpload` take 2 s and a HEAD 1 s.
//!
//! Each run, in this order, each timed step after a `sync`:
//! 1. Ferry's backup (`ferry backup pg-prod big --wait`, the production agent restarted
//!    first so its peak RSS is this run's), from the order to success; with
//!    `--parts-in-flight`, one backup for each value, set in the agent's `[backup_server]`
//!    before its restart, the previous one's object removed as in 5;
//! 2. (first run only, untimed) boto3 `download_fileobj` of the object Ferry wrote into a
//!    file in the deployment's directory, the ciphertext the stock client uploads;
//! 3. Ferry's restore (`ferry restore pg-stage --datastore big --wait`, the staging agent
//!    restarted first), which writes the files into staging's directory;
//! 4. boto3 `download_fileobj` of Ferry's object into `/dev/null`, staging's keys, with
//!    the default `TransferConfig`, then with `max_concurrency=1` (one range at a time,
//!    as Ferry's single streamed GET);
//! 5. every version of Ferry's object and manifest removed (maintenance's keys) and the
//!    RGW's garbage collected, so the OSDs hold nothing;
//! 6. the stock pipeline a user would run instead of Ferry, timed as a whole:
//!    `tar -cf - . | zstd -q -T0 | age -r RECIPIENT | s3-transfer.py upload ... -`, boto3
//!    `upload_fileobj(sys.stdin.buffer)` with the default `TransferConfig`, production's
//!    keys, so that it pays the same compression and encryption CPU on the same cores as
//!    Ferry's agent; its object's size checked against Ferry's, then removed as in 5;
//! 7. boto3 `upload_fileobj` of the ciphertext file (read from the page cache) to another
//!    key, production's keys, then removed as in 5; with the default `TransferConfig`,
//!    then, as diagnostics, with `max_concurrency=1` (one part in flight, as Ferry's
//!    agent with `parts_in_flight = 1`) and `max_concurrency=2`.
//!
//! boto3 runs with its default `TransferConfig` (8 MiB parts and ranges, 10 threads). In
//! steps 4 and 7 its time is the transfer call alone, measured inside the Python process,
//! after the interpreter started and the client was made, so the stock client is not
//! charged for them; the stock pipeline's (6) is the whole pipeline's wall time, as
//! `/usr/bin/time` sees it, with its largest process's peak RSS; Ferry's includes the CLI, the coordinator and the agent's order. The MB/s are of
//! the stored object (the ciphertext, what both clients send). boto3 is Debian's
//! (`python3-boto3`, `/usr/bin/python3`), the same as the tests'.
//!
//! Also printed: each agent's CPU time (user + system, from its start, so it includes the
//! start, about 0.1 s), and its peak RSS (`VmHWM`) against issue 17's bound of 64 MiB.
//! `--agent PATH` runs another build of `ferry-agent` as both agents.
//!
//! Memory: memstore keeps every replica in RAM, so one object of `--gib` GiB takes `--gib`
//! × `--replicas` GiB. The order above keeps one object at a time; the benchmark refuses
//! to start if the machine's available memory cannot take it with 2 GiB to spare (try
//! `--replicas 2` or `1`). Each OSD's memstore capacity is set to twice `--gib` plus 2 GiB
//! (a cap, not an allocation), so that no OSD reaches Ceph's full ratio.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use clap::Parser;
use ferry_bench::{
    FerryRun, Figures, PipelineRun, Xorshift, cpu_seconds, mb, median, mib, ratio, run_pipeline,
    settle, time_ferry,
};
use ferry_tests::*;
use serde_json::{Value, json};

/// Command-line arguments.
#[derive(Parser)]
struct Args {
    /// Size of the datastore, GiB (2^30 bytes of random data, in files of 1 GiB).
    #[arg(long, default_value_t = 2.0)]
    gib: f64,
    /// Runs of each step; the figures are medians over them.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Replicas of Ceph's pools (1 to 3; the tests use 3).
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Another build of `ferry-agent` to run as both agents instead of this workspace's
    /// (for instance one with a change to measure).
    #[arg(long)]
    agent: Option<std::path::PathBuf>,
    /// `parts_in_flight` values of the production agent's S3 target to measure, comma
    /// separated (e.g. `1,2,3`): one backup each per run. Default: the agent's default
    /// alone.
    #[arg(long, value_delimiter = ',')]
    parts_in_flight: Vec<usize>,
}

/// The datastore's name.
const DATASTORE: &str = "big";

/// The prefix the agents write under in the bucket.
const PREFIX: &str = "ferry";

/// The key prefix of the stock client's uploads.
const STOCK_PREFIX: &str = "stock";

/// Bytes of each data file.
const FILE_BYTES: u64 = 1 << 30;

/// Writes `bytes` of random data in files of [`FILE_BYTES`] (the last one shorter) under
/// `root`.
fn write_data(root: &Path, bytes: u64) -> anyhow::Result<()> {
    fs::create_dir_all(root)?;
    let mut rng = Xorshift(0x9E37_79B9_7F4A_7C15);
    let mut left = bytes;
    let mut i = 0;
    let mut block = vec![0u8; 1 << 20];
    while left > 0 {
        let len = left.min(FILE_BYTES);
        let path = root.join(format!("random-{i}.bin"));
        let mut f = std::io::BufWriter::new(fs::File::create(&path)?);
        let mut written = 0;
        while written < len {
            for word in block.chunks_exact_mut(8) {
                word.copy_from_slice(&rng.next().to_le_bytes());
            }
            let n = (len - written).min(block.len() as u64) as usize;
            f.write_all(&block[..n])?;
            written += n as u64;
        }
        f.flush()?;
        left -= len;
        i += 1;
    }
    Ok(())
}

/// `user`'s key files (mode 0600) in `dir`: `(access, secret)`.
fn key_files(user: &S3User, dir: &Path) -> anyhow::Result<(String, String)> {
    let access = dir.join(format!("{}-access", user.uid));
    let secret = dir.join(format!("{}-secret", user.uid));
    for (path, text) in [(&access, &user.access_key), (&secret, &user.secret_key)] {
        fs::write(path, format!("{text}\n"))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    }
    Ok((access.display().to_string(), secret.display().to_string()))
}

/// An S3 table named `table` on `bucket` with `user`'s keys, as the tests write it.
fn s3_table(
    table: &str,
    c: &CephCluster,
    bucket: &str,
    user: &S3User,
    dir: &Path,
) -> anyhow::Result<String> {
    let (access, secret) = key_files(user, dir)?;
    Ok(format!(
        "[{table}]\nkind = \"s3\"\nendpoint = {:?}\nbucket = {bucket:?}\nprefix = {PREFIX:?}\n\
         path_style = true\naccess_key_file = {access:?}\nsecret_key_file = {secret:?}\n\
         io_timeout_seconds = 120\n",
        c.endpoint(),
    ))
}

/// `config` with its `[backup_server]` table replaced by `table`.
fn replace_backup_server(config: &str, table: &str) -> anyhow::Result<String> {
    let start = config
        .find("[backup_server]\n")
        .context("the agent's config has no [backup_server] table")?;
    let end = config[start + 1..]
        .find("\n[")
        .map_or(config.len(), |i| start + 2 + i);
    Ok(format!("{}{table}\n{}", &config[..start], &config[end..]))
}

/// One timed transfer of the stock client (`bench/tools/s3-transfer.py`).
#[derive(Clone, Copy, Debug)]
struct Transfer {
    /// Wall time of the transfer call, seconds.
    seconds: f64,
    /// Bytes moved (`None` for an upload of stdin, which the tool does not count).
    bytes: Option<u64>,
    /// Peak RSS of the Python process, bytes.
    peak_rss_bytes: u64,
}

/// boto3's `upload_fileobj` (`op` = `upload`) of `file` as `key`, or `download_fileobj`
/// (`download`) of `key` into `file`, as `user`, with nothing from the developer's AWS
/// set-up; with the default `TransferConfig`, or with `threads` parts in flight.
fn boto3(
    c: &CephCluster,
    user: &S3User,
    (op, threads): (&str, Option<u32>),
    bucket: &str,
    key: &str,
    file: &Path,
) -> anyhow::Result<Transfer> {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(workspace_root().join("bench/tools/s3-transfer.py"))
        .arg(c.endpoint())
        .args([op, bucket, key])
        .arg(file)
        .args(threads.map(|t| t.to_string()));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(&k);
        }
    }
    let none = c.dir().join("no-aws-config");
    cmd.env("AWS_ACCESS_KEY_ID", &user.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &user.secret_key)
        .env("AWS_CONFIG_FILE", &none)
        .env("AWS_SHARED_CREDENTIALS_FILE", &none)
        .env("NO_PROXY", "127.0.0.1")
        .env("no_proxy", "127.0.0.1")
        .stdin(Stdio::null());
    let out = cmd
        .output()
        .context("run /usr/bin/python3 (python3-boto3)")?;
    if !out.status.success() {
        bail!(
            "boto3 {op} of {key} as {} failed ({}):\n{}\nRGW log:\n{}",
            user.uid,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            c.log_tail("client.rgw.a", 20)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("s3-transfer.py {op}: not JSON"))?;
    Ok(Transfer {
        seconds: v["seconds"].as_f64().context("seconds")?,
        bytes: v["bytes"].as_u64(),
        peak_rss_bytes: v["peak_rss_bytes"].as_u64().context("peak_rss_bytes")?,
    })
}

/// Removes every version and delete marker of the keys under `prefix` (maintenance's
/// keys, as `ferry prune` would), then has the RGW collect their data at once
/// (`radosgw-admin gc process --include-all`) so the OSDs give back the memory.
fn remove_all(c: &CephCluster, bucket: &str, prefix: &str) -> anyhow::Result<usize> {
    let maintenance = &c.roles().maintenance;
    let listed = c.s3_ok(
        maintenance,
        "list_object_versions",
        json!({"Bucket": bucket, "Prefix": prefix}),
    );
    let mut removed = 0;
    for field in ["Versions", "DeleteMarkers"] {
        for v in listed[field].as_array().into_iter().flatten() {
            c.s3_ok(
                maintenance,
                "delete_object",
                json!({"Bucket": bucket, "Key": v["Key"], "VersionId": v["VersionId"]}),
            );
            removed += 1;
        }
    }
    c.radosgw_admin(&["gc", "process", "--include-all"]);
    Ok(removed)
}

/// Bytes stored in the RGW's data pool (`ceph df`, before replication).
fn data_pool_bytes(c: &CephCluster) -> u64 {
    let df: Value = serde_json::from_str(&c.ceph(&["df", "--format", "json"])).unwrap_or_default();
    df["pools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == "default.rgw.buckets.data")
        .filter_map(|p| p["stats"]["stored"].as_u64())
        .sum()
}

/// `MemAvailable` of `/proc/meminfo`, bytes.
fn mem_available() -> anyhow::Result<u64> {
    let info = fs::read_to_string("/proc/meminfo")?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("/proc/meminfo has no MemAvailable line")?;
    Ok(kib * 1024)
}

/// The newest backup of [`DATASTORE`] in the catalog: `(key, size in bytes)`.
fn newest_backup(d: &Deployment) -> anyhow::Result<(String, u64)> {
    let listed = d.ferry_json(&["backups"]);
    let b = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["datastore"] == DATASTORE)
        .max_by_key(|b| b["finished"].as_str().unwrap_or_default().to_owned())
        .with_context(|| format!("no backup of {DATASTORE} in the catalog: {listed}"))?;
    Ok((
        b["stored_path"].as_str().context("stored_path")?.to_owned(),
        b["size_bytes"].as_u64().context("size_bytes")?,
    ))
}

/// Sets `parts_in_flight = n` in the `[backup_server]` table of the agent config
/// `config` (`None`: removes it, for the agent's default).
fn set_parts_in_flight(config: &Path, n: Option<usize>) -> anyhow::Result<()> {
    let text = fs::read_to_string(config)?;
    let mut out: String = text
        .lines()
        .filter(|l| !l.starts_with("parts_in_flight = "))
        .map(|l| format!("{l}\n"))
        .collect();
    if let Some(n) = n {
        let header = "[backup_server]\n";
        let at = out
            .find(header)
            .context("the agent's config has no [backup_server] table")?
            + header.len();
        out.insert_str(at, &format!("parts_in_flight = {n}\n"));
    }
    fs::write(config, out)?;
    Ok(())
}

/// The stock pipeline a user would run instead of Ferry, timed as a whole by
/// [`run_pipeline`]: `tar -C SOURCE -cf - . | zstd -q -T0 | age -r RECIPIENT |
/// s3-transfer.py ... upload BUCKET KEY -` (boto3 `upload_fileobj(sys.stdin.buffer)`, default
/// `TransferConfig`), as `user`, in a clean environment.
fn stock_pipeline(
    c: &CephCluster,
    user: &S3User,
    bucket: &str,
    key: &str,
    source: &Path,
    recipient: &str,
) -> anyhow::Result<PipelineRun> {
    let none = c.dir().join("no-aws-config");
    let script = format!(
        "tar -C '{}' -cf - . | zstd -q -T0 | age -r '{recipient}' | env -i PATH=/usr/bin:/bin \
         AWS_ACCESS_KEY_ID='{}' AWS_SECRET_ACCESS_KEY='{}' AWS_CONFIG_FILE='{}' \
         AWS_SHARED_CREDENTIALS_FILE='{}' NO_PROXY=127.0.0.1 no_proxy=127.0.0.1 \
         /usr/bin/python3 '{}' '{}' upload '{bucket}' '{key}' - > /dev/null",
        source.display(),
        user.access_key,
        user.secret_key,
        none.display(),
        none.display(),
        workspace_root()
            .join("bench/tools/s3-transfer.py")
            .display(),
        c.endpoint(),
    );
    run_pipeline(&script).with_context(|| {
        format!(
            "the stock pipeline's upload as {} failed; RGW log:\n{}",
            user.uid,
            c.log_tail("client.rgw.a", 20)
        )
    })
}

/// Checks that the restored tree `restored` has the files of `source`, byte for byte
/// (`cmp`).
fn check_restored(source: &Path, restored: &Path) -> anyhow::Result<()> {
    let mut names: Vec<_> = fs::read_dir(source)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    let mut got: Vec<_> = fs::read_dir(restored)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    got.sort();
    ensure!(
        names == got,
        "restored files {got:?}, the source has {names:?}"
    );
    for n in names {
        let status = Command::new("cmp")
            .arg("-s")
            .arg(source.join(&n))
            .arg(restored.join(&n))
            .status()?;
        ensure!(status.success(), "restored {n:?} differs from the source");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        (1..=OSDS).contains(&args.replicas),
        "--replicas is 1 to {OSDS}"
    );
    let data_bytes = (args.gib * (1u64 << 30) as f64) as u64;
    let need = (data_bytes as f64 * 1.1) as u64 * args.replicas as u64 + (2 << 30);
    let available = mem_available()?;
    ensure!(
        available >= need,
        "memstore keeps every replica in RAM: {} GiB of data × {} replicas needs about {:.1} GiB \
         with 2 GiB to spare, and {:.1} GiB are available; pass a smaller --replicas or --gib",
        args.gib,
        args.replicas,
        need as f64 / f64::from(1u32 << 30),
        available as f64 / f64::from(1u32 << 30)
    );

    let started = Instant::now();
    let c = CephCluster::start_with(CephOptions {
        memstore_bytes: 2 * data_bytes + (2 << 30),
        pool_size: args.replicas,
    });
    let roles = c.roles().clone();
    let bucket = c.ferry_bucket("bench");
    eprintln!(
        "Ceph ({} replicas) in {} started in {:.0} s, bucket {bucket} at {}",
        args.replicas,
        c.dir().display(),
        started.elapsed().as_secs_f64(),
        c.endpoint()
    );

    let mut dirs = None;
    let mut setup: anyhow::Result<()> = Ok(());
    let mut d = Deployment::start_with_options(DeploymentOptions {
        source_sql: "SELECT 1".into(),
        io_timeout_seconds: Some(600),
        tweak: Some(Box::new(|d: &mut Deployment| {
            setup = (|| {
                let dir = d.dir.path().to_owned();
                let prod = dir.join("files-prod").join(DATASTORE);
                let stage = dir.join("files-stage").join(DATASTORE);
                for (config, user, path) in [
                    (&d.prod_config, &roles.production, &prod),
                    (&d.stage_config, &roles.staging, &stage),
                ] {
                    fs::create_dir_all(path)?;
                    let text = fs::read_to_string(config)?;
                    let table = s3_table("backup_server", &c, &bucket, user, &dir)?;
                    fs::write(config, replace_backup_server(&text, &table)?)?;
                    append(
                        config,
                        &format!(
                            "[[datastores]]\nname = \"{DATASTORE}\"\nkind = \"files\"\npath = \"{}\"\n",
                            path.display()
                        ),
                    );
                }
                let maintenance = s3_table("maintenance", &c, &bucket, &roles.maintenance, &dir)?;
                append(&d.coordinator_config, &format!("\n{maintenance}"));
                dirs = Some((prod, stage));
                Ok(())
            })();
        })),
        ..DeploymentOptions::default()
    });
    setup?;
    let (prod, stage) = dirs.context("datastore directories")?;
    eprintln!("deployment in {}", d.dir.path().display());

    let started = Instant::now();
    write_data(&prod, data_bytes)?;
    eprintln!(
        "wrote {:.1} MiB of random data in {:.0} s",
        mib(data_bytes),
        started.elapsed().as_secs_f64()
    );

    let ciphertext = d.dir.path().join("ciphertext.age");
    // The RGW creates its data pools at the first write into them (about 3 s, seen as a
    // slow CreateMultipartUpload): a warm-up multipart upload as production and a download
    // as staging, removed, so that no timed step pays for it.
    let warm = d.dir.path().join("warm-up");
    fs::write(&warm, vec![7u8; 24 << 20])?;
    let key = format!("{STOCK_PREFIX}/warm-up");
    boto3(
        &c,
        &roles.production,
        ("upload", None),
        &bucket,
        &key,
        &warm,
    )?;
    boto3(
        &c,
        &roles.staging,
        ("download", None),
        &bucket,
        &key,
        Path::new("/dev/null"),
    )?;
    remove_all(&c, &bucket, STOCK_PREFIX)?;
    fs::remove_file(&warm)?;
    // The production agent's settings to measure: `parts_in_flight`, or its default.
    let settings: Vec<Option<usize>> = if args.parts_in_flight.is_empty() {
        vec![None]
    } else {
        args.parts_in_flight.iter().copied().map(Some).collect()
    };
    let label = |n: Option<usize>| n.map_or("default".to_owned(), |n| n.to_string());
    let mut backup: Vec<Figures> = settings.iter().map(|_| Figures::default()).collect();
    let mut cpu_backup: Vec<Vec<f64>> = settings.iter().map(|_| Vec::new()).collect();
    let mut restore = Figures::default();
    let mut cpu_restore = Vec::new();
    // The stock pipeline tar | zstd | age | boto3 from stdin.
    let mut pipeline: Vec<PipelineRun> = Vec::new();
    let mut pipeline_stored = 0u64;
    // boto3's uploads of the ciphertext file: default TransferConfig, 1 and 2 threads.
    let mut upload: [Vec<Transfer>; 3] = Default::default();
    // boto3's downloads: default TransferConfig, 1 thread.
    let mut download: [Vec<Transfer>; 2] = Default::default();
    let mut stored = 0u64;
    for run in 1..=args.runs {
        let mut key = String::new();
        for (i, &n) in settings.iter().enumerate() {
            if i > 0 {
                // One object in the cluster at a time (memstore).
                let removed = remove_all(&c, &bucket, &key)?;
                ensure!(removed >= 2, "{key}: {removed} versions removed");
            }
            set_parts_in_flight(&d.prod_config, n)?;
            let b: FerryRun = time_ferry(
                &mut d,
                "agent-prod",
                args.agent.as_deref(),
                &["backup", "pg-prod", DATASTORE, "--wait"],
            )?;
            backup[i].add_ferry(b);
            cpu_backup[i].push(cpu_seconds(d.procs["agent-prod"].pid())?);
            let (newest, size) = newest_backup(&d)?;
            key = newest;
            let head = c.s3_ok(
                &roles.staging,
                "head_object",
                json!({"Bucket": bucket, "Key": key}),
            );
            let length = head["ContentLength"].as_u64().context("ContentLength")?;
            ensure!(
                length == size,
                "{key}: the RGW stores {length} bytes, the catalog says {size}"
            );
            stored = length;
            if run == 1 && i == 0 {
                let t = boto3(
                    &c,
                    &roles.staging,
                    ("download", None),
                    &bucket,
                    &key,
                    &ciphertext,
                )?;
                ensure!(t.bytes == Some(stored) && fs::metadata(&ciphertext)?.len() == stored);
            }
            eprintln!(
                "run {run}: Ferry backup (parts_in_flight {}) {:.2} s, agent peak RSS {:.1} MiB, {key} {:.1} MiB",
                label(n),
                b.seconds,
                mib(b.peak_rss_bytes),
                mib(stored)
            );
        }

        let r = time_ferry(
            &mut d,
            "agent-stage",
            args.agent.as_deref(),
            &["restore", "pg-stage", "--datastore", DATASTORE, "--wait"],
        )?;
        restore.add_ferry(r);
        cpu_restore.push(cpu_seconds(d.procs["agent-stage"].pid())?);
        if run == 1 {
            check_restored(&prod, &stage)?;
        }
        // The default, then one range at a time (as Ferry's single GET).
        for (k, threads) in [None, Some(1)].into_iter().enumerate() {
            settle()?;
            let dl = boto3(
                &c,
                &roles.staging,
                ("download", threads),
                &bucket,
                &key,
                Path::new("/dev/null"),
            )?;
            ensure!(dl.bytes == Some(stored));
            download[k].push(dl);
        }
        eprintln!(
            "run {run}: Ferry restore {:.2} s (staging agent peak RSS {:.1} MiB), boto3 download {:.2} s (1 thread {:.2} s)",
            r.seconds,
            mib(r.peak_rss_bytes),
            download[0][run - 1].seconds,
            download[1][run - 1].seconds,
        );
        let removed = remove_all(&c, &bucket, &key)?;
        ensure!(
            removed >= 2,
            "{key}: {removed} versions removed, expected the object and its manifest"
        );

        let copy = format!(
            "{STOCK_PREFIX}/{run}/{}",
            key.rsplit('/').next().unwrap_or("copy")
        );
        // The stock pipeline, paying for tar, zstd and age as Ferry does.
        settle()?;
        let p = stock_pipeline(&c, &roles.production, &bucket, &copy, &prod, &d.recipient)?;
        let head = c.s3_ok(
            &roles.staging,
            "head_object",
            json!({"Bucket": bucket, "Key": copy}),
        );
        pipeline_stored = head["ContentLength"]
            .as_u64()
            .with_context(|| format!("{copy}: the stock pipeline stored {head}"))?;
        ensure!(
            pipeline_stored.abs_diff(stored) < stored / 100 + (1 << 20),
            "{copy}: the stock pipeline stored {pipeline_stored} bytes, Ferry {stored}"
        );
        pipeline.push(p);
        remove_all(&c, &bucket, STOCK_PREFIX)?;
        eprintln!(
            "run {run}: stock pipeline tar | zstd | age | boto3 {:.2} s, {:.1} MiB stored",
            p.seconds,
            mib(pipeline_stored)
        );
        // The ciphertext file with the default TransferConfig, then 1 and 2 parts in
        // flight (diagnostics).
        for (k, threads) in [None, Some(1), Some(2)].into_iter().enumerate() {
            settle()?;
            let up = boto3(
                &c,
                &roles.production,
                ("upload", threads),
                &bucket,
                &copy,
                &ciphertext,
            )?;
            let want = fs::metadata(&ciphertext)?.len();
            ensure!(
                up.bytes == Some(want),
                "boto3 uploaded {:?} bytes of {want}",
                up.bytes
            );
            let head = c.s3_ok(
                &roles.staging,
                "head_object",
                json!({"Bucket": bucket, "Key": copy}),
            );
            ensure!(
                head["ContentLength"].as_u64() == Some(want),
                "{copy}: boto3 stored {head}"
            );
            upload[k].push(up);
            remove_all(&c, &bucket, STOCK_PREFIX)?;
            eprintln!(
                "run {run}: boto3 upload ({} threads) {:.2} s; the data pool holds {:.1} MiB after the clean-up",
                threads.unwrap_or(10),
                up.seconds,
                mib(data_pool_bytes(&c))
            );
        }
    }

    let secs = |v: &[Transfer]| v.iter().map(|t| t.seconds).collect::<Vec<_>>();
    let rss = |v: &[Transfer]| median(&v.iter().map(|t| mib(t.peak_rss_bytes)).collect::<Vec<_>>());
    let pipe_secs: Vec<f64> = pipeline.iter().map(|p| p.seconds).collect();
    let pipe_s = median(&pipe_secs);
    let pipe_rss = median(
        &pipeline
            .iter()
            .map(|p| mib(p.peak_rss_bytes))
            .collect::<Vec<_>>(),
    );
    let up_s = median(&secs(&upload[0]));
    let dl_s = median(&secs(&download[0]));
    println!();
    println!(
        "s3-upload: {:.1} MiB of random data in {} file(s), {:.1} MiB stored by Ferry (zstd + age), \
         {:.1} MiB by the stock pipeline; Ceph 16 RGW, {} replica(s) on memstore; medians of {} \
         run(s); MB/s of Ferry's stored object",
        mib(data_bytes),
        data_bytes.div_ceil(FILE_BYTES),
        mib(stored),
        mib(pipeline_stored),
        args.replicas,
        args.runs
    );
    if let Some(agent) = &args.agent {
        println!("agents: {}", agent.display());
    }
    println!();
    println!(
        "| upload | wall s | MB/s | ÷ stock pipeline's throughput | ÷ boto3 from file (10 threads) | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|");
    let mut rows: Vec<(String, f64, f64)> = settings
        .iter()
        .zip(&backup)
        .map(|(&n, f)| {
            (
                format!(
                    "backup: Ferry, `parts_in_flight` {} (agent: files → tar → zstd → age → S3 multipart)",
                    label(n)
                ),
                f.s(),
                f.rss(),
            )
        })
        .collect();
    rows.push((
        "stock pipeline: `tar | zstd -T0 | age -r | upload_fileobj(sys.stdin.buffer)` (default: 10 threads)"
            .into(),
        pipe_s,
        pipe_rss,
    ));
    rows.push((
        "boto3 `upload_fileobj` of the ciphertext file (default: 10 threads)".into(),
        up_s,
        rss(&upload[0]),
    ));
    rows.push((
        "boto3 from file, `max_concurrency=1` (diagnostic)".into(),
        median(&secs(&upload[1])),
        rss(&upload[1]),
    ));
    rows.push((
        "boto3 from file, `max_concurrency=2` (diagnostic)".into(),
        median(&secs(&upload[2])),
        rss(&upload[2]),
    ));
    for (label, s, rss) in rows {
        println!(
            "| {label} | {s:.2} | {:.0} | {} | {} | {rss:.1} |",
            mb(stored) / s,
            ratio(pipe_s, s),
            ratio(up_s, s),
        );
    }
    println!();
    println!("| restore | wall s | MB/s | ÷ boto3 download's throughput | peak RSS MiB |");
    println!("|---|---|---|---|---|");
    let rows = [
        (
            "restore: Ferry (staging agent: S3 → age → zstd → tar → files)",
            restore.s(),
            restore.rss(),
        ),
        (
            "download: boto3 `download_fileobj` to /dev/null (10 threads)",
            dl_s,
            rss(&download[0]),
        ),
        (
            "download: boto3, `max_concurrency=1` (diagnostic)",
            median(&secs(&download[1])),
            rss(&download[1]),
        ),
    ];
    for (label, s, rss) in rows {
        println!(
            "| {label} | {s:.2} | {:.0} | {} | {rss:.1} |",
            mb(stored) / s,
            ratio(dl_s, s),
        );
    }
    println!();
    let list = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (&n, (f, cpu)) in settings.iter().zip(backup.iter().zip(&cpu_backup)) {
        let peak_max = f.rss_mib.iter().copied().fold(0.0, f64::max);
        println!(
            "Ferry backup, parts_in_flight {}: per run {} s; production agent CPU {} s; peak RSS {} MiB \
             (bound 64 MiB: {}); throughput {} of the stock pipeline's, {} of boto3's from file \
             (target ≥ 0.90×: {})",
            label(n),
            list(&f.seconds),
            list(cpu),
            list(&f.rss_mib),
            if peak_max < 64.0 {
                "within"
            } else {
                "EXCEEDED"
            },
            ratio(pipe_s, f.s()),
            ratio(up_s, f.s()),
            if pipe_s / f.s() >= 0.9 && up_s / f.s() >= 0.9 {
                "met against both"
            } else if pipe_s / f.s() >= 0.9 {
                "met against the pipeline only"
            } else {
                "MISSED"
            }
        );
    }
    println!(
        "per run, s: stock pipeline {} (peak RSS of its largest process {} MiB); boto3 upload {} \
         (1 thread {}; 2 threads {}); Ferry restore {}; boto3 download {} (1 thread {})",
        list(&pipe_secs),
        list(
            &pipeline
                .iter()
                .map(|p| mib(p.peak_rss_bytes))
                .collect::<Vec<_>>()
        ),
        list(&secs(&upload[0])),
        list(&secs(&upload[1])),
        list(&secs(&upload[2])),
        list(&restore.seconds),
        list(&secs(&download[0])),
        list(&secs(&download[1])),
    );
    println!(
        "staging agent per restore: CPU {} s, peak RSS {} MiB",
        list(&cpu_restore),
        list(&restore.rss_mib),
    );
    Ok(())
}
