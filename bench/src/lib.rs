//! Shared pieces of Ferry's benchmarks (see `bench/README.md`): peak RSS of a running
//! process, medians, and byte counts in human units.
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
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/status has no VmHWM line"))?;
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
    fn peak_rss_of_this_process_is_plausible() {
        let rss = peak_rss_bytes(std::process::id()).unwrap();
        assert!(rss > 1024 * 1024, "{rss}");
    }
}
