//! Shared pieces of Ferry's benchmarks (see `bench/README.md`): current and peak RSS and CPU
//! time of a running process, medians and percentiles, byte counts in human units, and a
//! deterministic random generator.
//!
//! Each benchmark is a binary of this crate, run by hand with
//! `cargo run --release -p ferry-bench --bin NAME`. It starts its own servers and the real
//! ferry binaries through the test harness (`ferry-tests`), which builds them in the same
//! profile (`--release` here).

use std::fs;

/// Peak resident set size of process `pid`, in bytes: `VmHWM` of `/proc/PID/status`, the
/// same figure that `/usr/bin/time -v` prints as "Maximum resident set size" when the
/// process exits (see proc(5)).
///
/// # Errors
/// The process is gone, or its status file has no `VmHWM` line.
pub fn peak_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    proc_status_bytes(pid, "VmHWM")
}

/// Current resident set size of process `pid`, in bytes: `VmRSS` of `/proc/PID/status`.
///
/// # Errors
/// The process is gone, or its status file has no `VmRSS` line.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    proc_status_bytes(pid, "VmRSS")
}

/// A `kB` line `field` of `/proc/PID/status`, in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/status has no {field} line"))?;
    Ok(kib * 1024)
}

/// CPU time (user + system) of process `pid` so far, all its threads, seconds
/// (`/proc/PID/stat`; `std::process::id()` for this process). Children count only through
/// their own pid (reaped ones are not added).
///
/// # Errors
/// The process is gone, or its stat file cannot be parsed.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let close = stat
        .rfind(')')
        .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/stat has no command name"))?;
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    anyhow::ensure!(fields.len() > 12, "/proc/{pid}/stat is too short");
    // utime and stime are fields 14 and 15 of proc(5), 11 and 12 after the name.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // Clock ticks of 1/100 s (USER_HZ on Linux).
    Ok(ticks as f64 / 100.0)
}

/// The median of `values` (the mean of the middle two for an even count).
///
/// # Panics
/// `values` is empty.
pub fn median(values: &[f64]) -> f64 {
    assert!(!values.is_empty(), "median of nothing");
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `p`-th percentile of `values` (`p` in 0..=100), nearest-rank: the smallest value
/// with at least `p` % of the values at or below it. `percentile(v, 95.0)` of 20 values is
/// the 19th smallest.
///
/// # Panics
/// `values` is empty.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    assert!(!values.is_empty(), "percentile of nothing");
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// A deterministic pseudo-random generator (xorshift64*, Vigna 2016), so that every run of
/// a benchmark generates the same data. Seed it with a non-zero value.
pub struct Xorshift(pub u64);

impl Xorshift {
    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0; slightly biased for huge `n`, fine for benchmarks).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `bytes` in MiB (2^20 bytes).
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Bytes that process `pid` and its reaped children caused to be written to storage:
/// `write_bytes` of `/proc/PID/io` (see proc(5)). Writes into a pipe or a socket are not
/// counted; a file written and read back is.
///
/// # Errors
/// The process is gone, or its io file has no `write_bytes` line.
pub fn io_write_bytes(pid: u32) -> anyhow::Result<u64> {
    let io = fs::read_to_string(format!("/proc/{pid}/io"))?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/io has no write_bytes line"))
}

/// Lets the machine settle before a timed step: `sync`, so that the writeback of what an
/// earlier step wrote (a restored tree, a scratch database) is not charged to this one.
///
/// # Errors
/// `sync` cannot be run.
pub fn settle() -> anyhow::Result<()> {
    let status = std::process::Command::new("sync").status()?;
    anyhow::ensure!(status.success(), "sync failed: {status}");
    Ok(())
}

/// One timed run of a shell pipeline ([`run_pipeline`]).
#[derive(Clone, Copy, Debug)]
pub struct PipelineRun {
    /// Wall time, seconds.
    pub seconds: f64,
    /// Peak RSS of its largest process, bytes (`/usr/bin/time`'s `%M`).
    pub peak_rss_bytes: u64,
    /// Bytes its processes wrote to local storage (`%O`, 512-byte blocks).
    pub disk_written_bytes: u64,
}

/// Runs `script` as `bash -o pipefail -c SCRIPT` under `/usr/bin/time` and returns its
/// wall time, the peak RSS of its largest process and the bytes it wrote to local
/// storage.
///
/// # Errors
/// `/usr/bin/time` is missing (Debian package `time`), or the pipeline failed (its
/// stderr is in the error).
pub fn run_pipeline(script: &str) -> anyhow::Result<PipelineRun> {
    let report = tempfile::NamedTempFile::new()?;
    let cpu = CpuWatch::when_asked();
    let started = std::time::Instant::now();
    let out = std::process::Command::new("/usr/bin/time")
        .arg("-o")
        .arg(report.path())
        .args(["-f", "%M %O", "bash", "-o", "pipefail", "-c", script])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run /usr/bin/time (install `time`): {e}"))?;
    let seconds = started.elapsed().as_secs_f64();
    CpuWatch::print(cpu, script);
    if !out.status.success() {
        anyhow::bail!(
            "pipeline failed ({}): {script}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = fs::read_to_string(report.path())?;
    let mut fields = text
        .lines()
        .last()
        .unwrap_or("")
        .split_whitespace()
        .map(|f| f.parse::<u64>().unwrap_or(0));
    Ok(PipelineRun {
        seconds,
        peak_rss_bytes: fields.next().unwrap_or(0) * 1024,
        disk_written_bytes: fields.next().unwrap_or(0) * 512,
    })
}

/// The OpenSSH client command line (for a shell script) that logs in to `sshd` as its
/// backup user with `key` and the pinned host key, no user config, and runs `remote`
/// there: `ssh -F /dev/null -i KEY ... ferrybk@HOST 'REMOTE'`. `remote` must not hold a
/// single quote.
pub fn ssh_command(sshd: &ferry_tests::Sshd, key: &std::path::Path, remote: &str) -> String {
    assert!(!remote.contains('\''), "no single quotes in {remote:?}");
    format!(
        "ssh -F /dev/null -i {} -p {} -o UserKnownHostsFile={} -o GlobalKnownHostsFile=/dev/null \
         -o StrictHostKeyChecking=yes -o BatchMode=yes -o IdentitiesOnly=yes {}@{} '{remote}'",
        key.display(),
        sshd.port(),
        sshd.known_hosts().display(),
        sshd.user(),
        sshd.host()
    )
}

/// `a / b`, printed as a ratio with two decimals and a `×`.
pub fn ratio(a: f64, b: f64) -> String {
    format!("{:.2}×", a / b)
}

/// Bytes in MB (10^6 bytes), the unit of throughputs.
pub fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// One method's figures over the runs of a benchmark: wall seconds, peak RSS (MiB) and
/// bytes written to local storage of each run, and the stored size of its last run.
#[derive(Default)]
pub struct Figures {
    /// Wall time of each run, seconds.
    pub seconds: Vec<f64>,
    /// Peak RSS of each run, MiB.
    pub rss_mib: Vec<f64>,
    /// Bytes written to local storage in each run.
    pub disk_bytes: Vec<f64>,
    /// Bytes stored on the backup server by the last run (0: nothing stored).
    pub stored: u64,
}

impl Figures {
    /// Records one timed Ferry job.
    pub fn add_ferry(&mut self, run: FerryRun) {
        self.add(run.seconds, run.peak_rss_bytes, run.disk_written_bytes);
    }

    /// Records one run.
    pub fn add(&mut self, seconds: f64, rss_bytes: u64, disk_bytes: u64) {
        self.seconds.push(seconds);
        self.rss_mib.push(mib(rss_bytes));
        self.disk_bytes.push(disk_bytes as f64);
    }

    /// The median wall time, seconds.
    ///
    /// # Panics
    /// No run was recorded.
    pub fn s(&self) -> f64 {
        median(&self.seconds)
    }

    /// The median peak RSS, MiB.
    ///
    /// # Panics
    /// No run was recorded.
    pub fn rss(&self) -> f64 {
        median(&self.rss_mib)
    }

    /// The median bytes written to local storage.
    ///
    /// # Panics
    /// No run was recorded.
    pub fn disk(&self) -> f64 {
        median(&self.disk_bytes)
    }
}

/// One timed Ferry job ([`time_ferry`]): wall seconds of the CLI run, the agent's peak
/// RSS and the bytes it (and its reaped children) wrote to local storage.
#[derive(Clone, Copy, Debug)]
pub struct FerryRun {
    /// Wall time of `ferry ... --wait`, seconds.
    pub seconds: f64,
    /// The agent's peak RSS (`VmHWM`), bytes.
    pub peak_rss_bytes: u64,
    /// The agent's `write_bytes` over the run.
    pub disk_written_bytes: u64,
}

/// Restarts `agent` (`agent-prod` or `agent-stage`) of `d` as `build` (`None`: this
/// workspace's binary; else another build, e.g. the one before a change), lets the machine
/// [`settle`], then times `ferry ARGS` (which should `--wait`).
///
/// # Errors
/// The CLI failed, or the agent's `/proc` files cannot be read.
pub fn time_ferry(
    d: &mut ferry_tests::Deployment,
    agent: &'static str,
    build: Option<&std::path::Path>,
    args: &[&str],
) -> anyhow::Result<FerryRun> {
    d.agent_bin = build.map(std::path::Path::to_owned);
    d.start_agent(agent);
    d.agent_bin = None;
    let pid = d.procs[agent].pid();
    let io0 = io_write_bytes(pid)?;
    settle()?;
    let cpu = CpuWatch::when_asked();
    let started = std::time::Instant::now();
    ferry_ok(d, args)?;
    let seconds = started.elapsed().as_secs_f64();
    CpuWatch::print(cpu, &format!("ferry {}", args.join(" ")));
    Ok(FerryRun {
        seconds,
        peak_rss_bytes: peak_rss_bytes(pid)?,
        disk_written_bytes: io_write_bytes(pid)? - io0,
    })
}

/// Runs the `ferry` CLI of deployment `d` with `args`.
///
/// # Errors
/// It exits non-zero: its output and the tails of the deployment's logs are in the error.
pub fn ferry_ok(d: &ferry_tests::Deployment, args: &[&str]) -> anyhow::Result<()> {
    let out = d.ferry(args);
    if !out.status.success() {
        anyhow::bail!(
            "ferry {args:?} failed:\n{}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            d.logs()
        );
    }
    Ok(())
}

/// The newest archive of `datastore` on deployment `d`'s backup server (its main part,
/// `<datastore>_backup_...age`), by its manifest's `finished` (RFC 3339, UTC), not by
/// name: the layout names a day's second backup by the minute and a third in the same
/// minute by the second (`T2339Z` sorts after `T233931Z`). Its absolute path and its
/// manifest.
///
/// # Errors
/// There is none, or a manifest is unreadable.
pub fn newest_archive(
    d: &ferry_tests::Deployment,
    datastore: &str,
) -> anyhow::Result<(std::path::PathBuf, serde_json::Value)> {
    use anyhow::Context as _;
    type Finished = chrono::DateTime<chrono::Utc>;
    let mut newest: Option<(Finished, std::path::PathBuf, serde_json::Value)> = None;
    for f in d.sshd.final_files() {
        if !(f.contains(&format!("/{datastore}_backup_")) && f.ends_with(".age")) {
            continue;
        }
        let path = d.sshd.root().join(f);
        let manifest: serde_json::Value =
            serde_json::from_slice(&fs::read(format!("{}.json", path.display()))?)?;
        let finished: Finished = serde_json::from_value(manifest["finished"].clone())
            .with_context(|| format!("{}.json: finished", path.display()))?;
        if newest.as_ref().is_none_or(|(f, _, _)| finished > *f) {
            newest = Some((finished, path, manifest));
        }
    }
    let (_, path, manifest) =
        newest.ok_or_else(|| anyhow::anyhow!("no stored archive of {datastore}"))?;
    Ok((path, manifest))
}

/// Inserts `documents` documents into `db.collection` at MongoDB `uri`, `per_batch` to an
/// `insert_many`, document `i` made by `document(i, rng)` with one [`Xorshift`] seeded
/// alike in every benchmark (so a seeding is the same from run to run); returns their
/// BSON bytes.
///
/// # Errors
/// The driver's.
pub async fn insert_documents(
    uri: &str,
    (db, collection): (&str, &str),
    documents: u64,
    per_batch: usize,
    mut document: impl FnMut(u64, &mut Xorshift) -> bson::RawDocumentBuf,
) -> anyhow::Result<u64> {
    let client = mongodb::Client::with_uri_str(uri).await?;
    let coll = client
        .database(db)
        .collection::<bson::RawDocumentBuf>(collection);
    let mut rng = Xorshift(0x9E37_79B9_7F4A_7C15);
    let mut bytes = 0u64;
    let mut batch = Vec::with_capacity(per_batch);
    for i in 0..documents {
        let d = document(i, &mut rng);
        bytes += d.as_bytes().len() as u64;
        batch.push(d);
        if batch.len() == per_batch || i + 1 == documents {
            coll.insert_many(std::mem::take(&mut batch)).await?;
        }
    }
    Ok(bytes)
}

/// CPU time spent by every process of the machine while it runs, sampled from
/// `/proc/PID/stat` (`utime` + `stime`) every 100 ms, so a process that ends between two
/// samples (a short `psql`) is counted up to its last sample; and the machine's idle time
/// from `/proc/stat`. Started by [`CpuWatch::start`], read by [`CpuWatch::stop`]: where a
/// step's cores went (the tool's work, the server's, the pipeline's), not how long it took.
pub struct CpuWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(std::collections::BTreeMap<String, f64>, f64)>,
}

/// Clock ticks per second of `/proc` CPU times (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// Every process's (command name, `utime + stime` in ticks, start time in ticks after
/// boot), by PID. A kernel worker renames itself as it works, so a process is known by its
/// PID and start time, not its name.
fn process_ticks() -> std::collections::HashMap<u32, (String, u64, u64)> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "PID (COMM) STATE ..."; COMM may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // Fields 14, 15 (utime, stime) and 22 (starttime) of proc(5), counted from STATE
        // (field 3) at index 0.
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        out.insert(pid, (comm, ticks(11) + ticks(12), ticks(19)));
    }
    out
}

/// The machine's idle time (`idle` + `iowait` of the `cpu` line of `/proc/stat`), ticks.
fn idle_ticks() -> u64 {
    fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_owned();
            let f: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            Some(f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0))
        })
        .unwrap_or(0)
}

impl CpuWatch {
    /// Starts sampling when the environment has `FERRY_BENCH_CPU=1`, which
    /// [`run_pipeline`] and [`time_ferry`] honour (then [`CpuWatch::print`]).
    pub fn when_asked() -> Option<CpuWatch> {
        (std::env::var("FERRY_BENCH_CPU").as_deref() == Ok("1")).then(CpuWatch::start)
    }

    /// Prints the [`CpuWatch::report`] of `watch`, if any, to stderr after `what`.
    pub fn print(watch: Option<CpuWatch>, what: &str) {
        if let Some(watch) = watch {
            let what: String = what.chars().take(100).collect();
            eprintln!("  cpu of {what}: {}", watch.report());
        }
    }

    /// Starts sampling.
    pub fn start() -> CpuWatch {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let before = process_ticks();
            let idle0 = idle_ticks();
            let mut last = before.clone();
            loop {
                for (pid, seen) in process_ticks() {
                    last.insert(pid, seen);
                }
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let idle = idle_ticks().saturating_sub(idle0) as f64 / TICKS_PER_SECOND;
            let mut by_name = std::collections::BTreeMap::new();
            for (pid, (comm, ticks, started)) in last {
                let start = match before.get(&pid) {
                    Some((_, t, s)) if *s == started => *t,
                    _ => 0,
                };
                let used = ticks.saturating_sub(start);
                if used > 0 {
                    *by_name.entry(comm).or_insert(0.0) += used as f64 / TICKS_PER_SECOND;
                }
            }
            (by_name, idle)
        });
        CpuWatch { stop, thread }
    }

    /// Stops sampling and returns the CPU seconds used per command name, and the idle
    /// seconds of all cores together, since [`CpuWatch::start`].
    pub fn stop(self) -> (std::collections::BTreeMap<String, f64>, f64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }

    /// [`CpuWatch::stop`] as one line: `idle 1.2 s; postgres 10.3 s, ferry-agent 4.1 s, ...`,
    /// processes with at least 0.1 s, the busiest first.
    pub fn report(self) -> String {
        let (by_name, idle) = self.stop();
        let mut rows: Vec<(String, f64)> = by_name.into_iter().filter(|(_, s)| *s >= 0.1).collect();
        rows.sort_by(|a, b| b.1.total_cmp(&a.1));
        let rows: Vec<String> = rows.iter().map(|(n, s)| format!("{n} {s:.1} s")).collect();
        format!("idle {idle:.1} s; {}", rows.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 95.0), 19.0);
        assert_eq!(percentile(&v, 50.0), 10.0);
        assert_eq!(percentile(&v, 100.0), 20.0);
        assert_eq!(percentile(&[7.0], 95.0), 7.0);
    }

    #[test]
    fn current_rss_is_at_most_the_peak() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).unwrap() <= peak_rss_bytes(pid).unwrap());
    }

    #[test]
    fn peak_rss_of_this_process_is_plausible() {
        let rss = peak_rss_bytes(std::process::id()).unwrap();
        assert!(rss > 1024 * 1024, "{rss}");
    }
}
