//! `ferry status`.

use ferry_proto::v1;
use ferry_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use crate::format::{self, bytes, duration_ms, time};
use crate::{Output, status_error};

/// The last restore drill of a staging datastore: `pass RTO 2.1 s RPO 6h 2m`, or
/// `FAIL: ...`; `-` for production rows or before the first restore. A verify since does
/// not hide it.
fn drill(d: &v1::DatastoreStatus) -> (String, serde_json::Value) {
    let Some(j) = d.last_drill.as_ref() else {
        return ("-".into(), serde_json::Value::Null);
    };
    if matches!(v1::JobState::try_from(j.state), Ok(v1::JobState::Failed)) {
        return (
            "FAIL".into(),
            serde_json::json!({"passed": false, "error": j.error}),
        );
    }
    let Some(r) = &j.result else {
        return ("pass".into(), serde_json::json!({"passed": true}));
    };
    // A drill to an instant T: the recovery point is measured against T.
    let anchor = if j.to_time_unix_ms != 0 {
        j.to_time_unix_ms
    } else {
        j.finished_unix_ms
    };
    let rpo_ms = (r.data_finished_unix_ms != 0).then(|| anchor - r.data_finished_unix_ms);
    let to = if j.to_time_unix_ms != 0 {
        format!(" to {}", time(j.to_time_unix_ms))
    } else {
        String::new()
    };
    (
        format!(
            "pass{to} RTO {} RPO {}",
            if r.duration_ms < 60_000 {
                format!("{:.1}s", r.duration_ms as f64 / 1000.0)
            } else {
                duration_ms(r.duration_ms as i64)
            },
            rpo_ms.map_or_else(|| "?".into(), duration_ms)
        ),
        serde_json::json!({
            "passed": true,
            "rto_seconds": r.duration_ms as f64 / 1000.0,
            "rpo_seconds": rpo_ms.map(|ms| ms as f64 / 1000.0),
            "to_time": (j.to_time_unix_ms != 0).then(|| time(j.to_time_unix_ms)),
        }),
    )
}

pub(crate) async fn run(
    client: &mut CoordinatorClient<Channel>,
    out: Output,
) -> anyhow::Result<i32> {
    let s = client
        .status(v1::StatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if out == Output::Json {
        let rows: Vec<_> = s
            .datastores
            .iter()
            .map(|d| {
                serde_json::json!({
                    "environment": d.environment, "agent": d.agent, "datastore": d.datastore,
                    "role": format::role(d.role),
                    "last_success": d.last_success.as_ref().map(format::job_json),
                    "last_success_age_seconds": d.last_success.as_ref().map(|j| (s.now_unix_ms - j.finished_unix_ms) / 1000),
                    "last_job": d.last_job.as_ref().map(format::job_json),
                    "next_run": (d.next_run_unix_ms != 0).then(|| time(d.next_run_unix_ms)),
                    "last_drill": drill(d).1,
                })
            })
            .collect();
        let copies: Vec<_> = s
            .copies
            .iter()
            .map(|c| {
                serde_json::json!({
                    "environment": c.environment, "target": c.target, "lacking": c.lacking,
                    "lag_seconds": c.lag_seconds,
                    "last_copy": (c.last_copy_unix_ms != 0).then(|| time(c.last_copy_unix_ms)),
                    "last_error": (!c.last_error.is_empty()).then_some(&c.last_error),
                })
            })
            .collect();
        let archives: Vec<_> = s
            .archives
            .iter()
            .map(|a| {
                serde_json::json!({
                    "environment": a.environment, "datastore": a.datastore,
                    "newest_file": a.newest_file, "pushed": time(a.pushed_unix_ms),
                    "lag_seconds": a.lag_seconds,
                    "last_error": (!a.last_error.is_empty()).then_some(&a.last_error),
                    "kind": if a.kind.is_empty() { "wal" } else { a.kind.as_str() },
                    "gap_since": (a.gap_since_unix_ms > 0).then(|| time(a.gap_since_unix_ms)),
                })
            })
            .collect();
        let unopenable: std::collections::BTreeMap<_, _> = s.unopenable_backups.iter().collect();
        format::print_json(&serde_json::json!({
            "now": time(s.now_unix_ms), "datastores": rows, "copies": copies,
            "archives": archives, "unopenable_backups": unopenable,
        }))?;
        return Ok(0);
    }
    let rows = s
        .datastores
        .iter()
        .map(|d| {
            let (when, age, size) = match &d.last_success {
                Some(j) => (
                    time(j.finished_unix_ms),
                    duration_ms(s.now_unix_ms - j.finished_unix_ms),
                    j.result
                        .as_ref()
                        .map(|r| bytes(r.size_bytes))
                        .unwrap_or_default(),
                ),
                None => ("never".into(), "-".into(), "-".into()),
            };
            let last = d
                .last_job
                .as_ref()
                .map(|j| format!("{} {}", format::kind(j.kind), format::state(j.state)))
                .unwrap_or_else(|| "-".into());
            vec![
                d.environment.clone(),
                d.agent.clone(),
                d.datastore.clone(),
                format::role(d.role).into(),
                when,
                age,
                size,
                last,
                drill(d).0,
                time(d.next_run_unix_ms),
            ]
        })
        .collect();
    format::table(
        &[
            "ENVIRONMENT",
            "AGENT",
            "DATASTORE",
            "ROLE",
            "LAST SUCCESS",
            "AGE",
            "SIZE",
            "LAST JOB",
            "LAST DRILL",
            "NEXT RUN",
        ],
        rows,
    )?;
    if !s.copies.is_empty() {
        println!();
        let rows = s
            .copies
            .iter()
            .map(|c| {
                vec![
                    c.environment.clone(),
                    c.target.clone(),
                    c.lacking.to_string(),
                    if c.lacking == 0 {
                        "-".into()
                    } else {
                        duration_ms(c.lag_seconds * 1000)
                    },
                    if c.last_copy_unix_ms == 0 {
                        "-".into()
                    } else {
                        time(c.last_copy_unix_ms)
                    },
                    if c.last_error.is_empty() {
                        "ok".into()
                    } else {
                        format!("FAILED: {}", c.last_error)
                    },
                ]
            })
            .collect();
        format::table(
            &[
                "ENVIRONMENT",
                "COPY TARGET",
                "LACKS",
                "LAG",
                "LAST COPY",
                "STATE",
            ],
            rows,
        )?;
    }
    if !s.archives.is_empty() {
        println!();
        let rows = s
            .archives
            .iter()
            .map(|a| {
                vec![
                    a.environment.clone(),
                    format!(
                        "{} ({})",
                        a.datastore,
                        if a.kind.is_empty() { "wal" } else { &a.kind }
                    ),
                    a.newest_file.clone(),
                    time(a.pushed_unix_ms),
                    duration_ms(a.lag_seconds * 1000),
                    if !a.last_error.is_empty() {
                        format!("SCAN FAILED: {}", a.last_error)
                    } else if a.gap_since_unix_ms > 0 {
                        format!(
                            "GAP: a new chain since {}, entries before it lost; restores after it need a backup made since",
                            time(a.gap_since_unix_ms)
                        )
                    } else {
                        "ok".into()
                    },
                ]
            })
            .collect();
        format::table(
            &[
                "ENVIRONMENT",
                "WAL ARCHIVE OF",
                "NEWEST SEGMENT OR SLICE",
                "UP TO",
                "LAG",
                "STATE",
            ],
            rows,
        )?;
    }
    let unopenable: std::collections::BTreeMap<_, _> = s.unopenable_backups.iter().collect();
    for (env, n) in unopenable {
        println!(
            "\nWARNING: {n} backup(s) of {env} can be opened by no staging agent's identity: \
             `ferry keys` lists them and the recipients they need."
        );
    }
    Ok(0)
}
