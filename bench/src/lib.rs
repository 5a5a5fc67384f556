//! Shared pieces of Ferry's benchmarks (see `bench/README.md`): current and peak RSS of a
//! running process, medians and percentiles, byte counts in human units, and a
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
