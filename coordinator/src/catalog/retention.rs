//! Retention of dated backup folders: grandfather-father-son, as restic's
//! `forget --keep-daily/--keep-weekly/--keep-monthly` (<https://restic.readthedocs.io/en/stable/060_forget.html>):
//! going from the newest date back, a date is kept for `daily` if it is the newest of one
//! of the `keep_daily` most recent days that have backups, for `weekly` if it is the newest
//! of one of the `keep_weekly` most recent ISO weeks that have backups, for `monthly` the
//! same per calendar month. The newest date is always kept, whatever the policy. A date
//! kept for no reason is removed.

use std::collections::BTreeSet;

use chrono::{Datelike, NaiveDate};

/// How many periods of each kind keep a dated folder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// The newest date of each of this many most recent days with backups.
    pub keep_daily: u32,
    /// The newest date of each of this many most recent ISO weeks with backups.
    pub keep_weekly: u32,
    /// The newest date of each of this many most recent months with backups.
    pub keep_monthly: u32,
}

/// What the policy says of one date.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The dated folder's date.
    pub date: NaiveDate,
    /// Why it is kept (`newest`, `daily`, `weekly`, `monthly`); empty: it is removed.
    pub keep: Vec<&'static str>,
}

impl Decision {
    /// Whether the folder goes.
    pub fn remove(&self) -> bool {
        self.keep.is_empty()
    }
}

/// Applies `policy` to `dates` (any order, duplicates ignored); the decisions, newest
/// first.
pub fn plan(dates: &[NaiveDate], policy: &Policy) -> Vec<Decision> {
    let dates: BTreeSet<NaiveDate> = dates.iter().copied().collect();
    let mut out: Vec<Decision> = dates
        .iter()
        .rev()
        .map(|&date| Decision {
            date,
            keep: Vec::new(),
        })
        .collect();
    if let Some(first) = out.first_mut() {
        first.keep.push("newest");
    }
    type Bucket = fn(NaiveDate) -> (i32, u32);
    let buckets: [(&'static str, u32, Bucket); 3] = [
        ("daily", policy.keep_daily, |d| (d.year(), d.ordinal())),
        ("weekly", policy.keep_weekly, |d| {
            let w = d.iso_week();
            (w.year(), w.week())
        }),
        ("monthly", policy.keep_monthly, |d| (d.year(), d.month())),
    ];
    for (reason, count, bucket) in buckets {
        let mut seen = 0u32;
        let mut last: Option<(i32, u32)> = None;
        for d in out.iter_mut() {
            if seen >= count {
                break;
            }
            let b = bucket(d.date);
            if last != Some(b) {
                // The newest date of a period not seen yet.
                last = Some(b);
                seen += 1;
                d.keep.push(reason);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    /// 100 days of nightly backups, 2026-01-01 to 2026-04-10.
    fn hundred_days() -> Vec<NaiveDate> {
        (0..100)
            .map(|i| day("2026-01-01") + chrono::Days::new(i))
            .collect()
    }

    #[test]
    fn gfs_over_a_hundred_days_keeps_exactly_the_expected_dates() {
        let policy = Policy {
            keep_daily: 7,
            keep_weekly: 4,
            keep_monthly: 3,
        };
        let kept: Vec<String> = plan(&hundred_days(), &policy)
            .into_iter()
            .filter(|d| !d.remove())
            .map(|d| d.date.to_string())
            .collect();
        assert_eq!(
            kept,
            [
                // 7 days: 2026-04-10 (a Friday) back to 2026-04-04.
                "2026-04-10",
                "2026-04-09",
                "2026-04-08",
                "2026-04-07",
                "2026-04-06",
                "2026-04-05",
                "2026-04-04",
                // 4 ISO weeks, each period counted whether or not a daily keeps its
                // newest date: week 15 (2026-04-10), 14 (2026-04-05), then the Sundays
                // ending weeks 13 and 12.
                "2026-03-29",
                "2026-03-22",
                // 3 months: April (2026-04-10), March and February's last days.
                "2026-03-31",
                "2026-02-28",
            ]
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .rev()
            .map(str::to_owned)
            .collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_newest_date_is_kept_even_by_an_empty_policy() {
        let d = plan(&hundred_days(), &Policy::default());
        assert_eq!(d[0].date, day("2026-04-10"));
        assert_eq!(d[0].keep, ["newest"]);
        assert_eq!(d.iter().filter(|d| !d.remove()).count(), 1);
    }

    #[test]
    fn periods_without_backups_do_not_count() {
        // Backups on three days months apart: keep_daily 2 keeps the two newest.
        let dates = [day("2026-01-05"), day("2026-03-05"), day("2026-06-05")];
        let d = plan(
            &dates,
            &Policy {
                keep_daily: 2,
                ..Policy::default()
            },
        );
        let kept: Vec<NaiveDate> = d.iter().filter(|d| !d.remove()).map(|d| d.date).collect();
        assert_eq!(kept, [day("2026-06-05"), day("2026-03-05")]);
    }
}
