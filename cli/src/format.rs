//! Formatting for human output: sizes, durations, times, tables, and jobs as JSON. Output
//! goes through [`outln!`], [`table`] and [`print_json`], which return the write's error
//! (a closed pipe, `ferry jobs | head -1`) instead of panicking as `println!` does.

use std::io::Write;

use ferry_proto::v1;

/// `writeln!` to stdout, returning the [`std::io::Result`].
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}
pub(crate) use outln;

/// `text` with control characters (newline, tab, escape sequences...) and the invisible
/// characters that reorder or hide text (bidirectional overrides, zero-width ones)
/// written as escapes (`\n`, `\t`, `\u{1b}`), so that a value cannot split a table row
/// or drive the terminal.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control()
                || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}'
                    | '\u{2066}'..='\u{2069}' | '\u{feff}') =>
            {
                out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out
}

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

/// Prints rows as a left-aligned table with a header, each cell [`escape`]d: one row is
/// one line whatever the values hold.
///
/// # Errors
/// Writing to stdout failed (a closed pipe).
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> std::io::Result<()> {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| r.iter().map(|c| escape(c)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = std::io::stdout().lock();
    let mut line = |cells: &[String]| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        writeln!(out, "{}", s.join("  ").trim_end())
    };
    line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>())?;
    for r in &rows {
        line(r)?;
    }
    Ok(())
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
        "file": (!j.file.is_empty()).then_some(&j.file),
        "set": (!j.set_environment.is_empty()).then(|| serde_json::json!({
            "environment": j.set_environment, "date": j.date,
        })),
        "all_or_nothing": j.all_or_nothing,
        "to_time": (j.to_time_unix_ms != 0).then(|| time(j.to_time_unix_ms)),
        "to_time_unix_ms": (j.to_time_unix_ms != 0).then_some(j.to_time_unix_ms),
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
            "target": (!r.target.is_empty()).then_some(&r.target),
        })),
        "error": (!j.error.is_empty()).then_some(&j.error),
    })
}

/// Prints JSON, pretty.
///
/// # Errors
/// Writing to stdout failed (a closed pipe).
pub fn print_json(v: &serde_json::Value) -> std::io::Result<()> {
    outln!("{}", serde_json::to_string_pretty(v).expect("JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_invisible_characters_are_escaped() {
        assert_eq!(
            escape("post\ngres\t\u{1b}[2J\u{202e}x é"),
            "post\\ngres\\t\\u{1b}[2J\\u{202e}x é"
        );
    }
}
