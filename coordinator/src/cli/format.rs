//! Formatting for human output: sizes, durations, times, tables, and jobs as JSON.

use ferry_proto::v1;

/// `1.5 GiB`, `312 KiB`, `17 B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// `2d 3h`, `4h 10m`, `12m 5s`, `40s`.
pub fn duration_ms(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    let (d, h, m, sec) = (s / 86400, s % 86400 / 3600, s % 3600 / 60, s % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {sec}s")
    } else {
        format!("{sec}s")
    }
}

/// RFC 3339 UTC to the second, or `-` for 0.
pub fn time(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| "-".into())
}

/// Lower-case job state name.
pub fn state(s: i32) -> &'static str {
    match v1::JobState::try_from(s) {
        Ok(v1::JobState::Queued) => "queued",
        Ok(v1::JobState::Running) => "running",
        Ok(v1::JobState::Succeeded) => "succeeded",
        Ok(v1::JobState::Failed) => "failed",
        Ok(v1::JobState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

/// Lower-case job kind name.
pub fn kind(k: i32) -> &'static str {
    match v1::JobKind::try_from(k) {
        Ok(v1::JobKind::Backup) => "backup",
        Ok(v1::JobKind::Restore) => "restore",
        Ok(v1::JobKind::Verify) => "verify",
        _ => "unknown",
    }
}

/// Lower-case role name.
pub fn role(r: i32) -> &'static str {
    ferry_proto::Role::try_from(r)
        .map(|r| r.as_str())
        .unwrap_or("unknown")
}

/// Prints rows as a left-aligned table with a header.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

/// A job as JSON for `--output json`.
pub fn job_json(j: &v1::Job) -> serde_json::Value {
    serde_json::json!({
        "id": j.id,
        "kind": kind(j.kind),
        "agent": j.agent,
        "datastore": j.datastore,
        "state": state(j.state),
        "attempt": j.attempt,
        "trigger": j.trigger,
        "date": (!j.date.is_empty()).then_some(&j.date),
        "created": time(j.created_unix_ms),
        "scheduled": (j.scheduled_unix_ms != 0).then(|| time(j.scheduled_unix_ms)),
        "scheduled_unix_ms": (j.scheduled_unix_ms != 0).then_some(j.scheduled_unix_ms),
        "started": (j.started_unix_ms != 0).then(|| time(j.started_unix_ms)),
        "finished": (j.finished_unix_ms != 0).then(|| time(j.finished_unix_ms)),
        "progress": j.progress.as_ref().map(|p| serde_json::json!({
            "stage": p.stage, "bytes_read": p.bytes_read, "bytes_written": p.bytes_written,
            "rate_bytes_per_second": p.rate_bytes_per_second,
        })),
        "result": j.result.as_ref().map(|r| serde_json::json!({
            "stored_path": r.stored_path, "size_bytes": r.size_bytes, "sha256": r.sha256,
            "duration_ms": r.duration_ms, "bytes_uncompressed": r.bytes_uncompressed,
            "environment": r.environment, "date": r.date, "kind": r.kind, "summary": r.summary,
        })),
        "error": (!j.error.is_empty()).then_some(&j.error),
    })
}

/// Prints JSON, pretty.
pub fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("JSON"));
}
