//! Prometheus metrics on `GET /metrics`, served over plain HTTP on `metrics_listen` when
//! it is configured. Bind it to an address only the Prometheus server reaches: it names
//! hosts, datastores and sizes.
//!
//! The format follows the request's `Accept` header ([`Format::negotiate`]): OpenMetrics
//! 1.0.0 when it prefers `application/openmetrics-text` (as Prometheus itself asks),
//! else the text exposition format 0.0.4 with `# HELP` and `# TYPE` for every family
//! (what `promtool check metrics` and older scrapers read). Both are written here
//! (<https://prometheus.io/docs/instrumenting/exposition_formats/>,
//! <https://github.com/OpenObservability/OpenMetrics/blob/main/specification/OpenMetrics.md>).
//!
//! Series (labels `environment`, `agent`, `datastore`; `kind` is `backup`, `restore` or
//! `verify`), one per kind that ever finished on the datastore, so a verify never hides
//! the last restore drill:
//! - `ferry_last_success_timestamp_seconds`: when the newest succeeded job of that kind
//!   finished (UTC).
//! - `ferry_last_success_duration_seconds`: how long it ran on the agent (for a staging
//!   restore, the restore time objective measured).
//! - `ferry_last_success_stored_bytes`: its stored size.
//! - `ferry_last_job_succeeded`: 1 if the newest job of that kind that finished succeeded,
//!   0 if it failed (absent before the first; a running or cancelled job changes nothing).
//! - `ferry_last_restore_rpo_seconds` (`kind="restore"` only): the recovery point of the
//!   newest succeeded restore: how old the restored backup was when the restore finished
//!   (the restore's end minus the backup's end), seconds; for a restore to a point in time
//!   T, T minus the commit of the last transaction it replayed (what was lost of T).
//! - `ferry_backup_set_complete{environment}`: 1 if the newest backup set of a production
//!   environment is complete, 0 if a member is missing.
//! - `ferry_last_complete_set_timestamp_seconds{environment}`: the end of the newest
//!   complete set's last member backup (what a restore drill would take).
//! - `ferry_backups_unopenable{environment}`: backups no staging agent's identity opens
//!   ([`crate::catalog::keys`]).
//! - `ferry_backups_unlocked{environment}` (with a `[maintenance]` target with Object
//!   Lock): catalog records whose objects could not be locked yet (`ferry backups` shows
//!   `NOT LOCKED`; the next `ferry prune` locks them), 0 when all are.
//! - `ferry_copy_lag_seconds{environment, target}` (environments with `copy_to`): the
//!   age of the oldest backup the copy target lacks, 0 when it lacks none (alert
//!   `FerryCopyBehind` past 26 h); `ferry_copy_lacking{environment, target}`: how many it
//!   lacks; `ferry_copy_last_failed{environment, target}`: 1 if the copier's last attempt
//!   there failed (its error in `ferry status`), else 0.
//! - `ferry_archive_lag_seconds{environment, datastore}` (datastores whose WAL is archived,
//!   with `[maintenance]`): now minus the push time of the newest archived WAL segment, as
//!   last scanned ([`crate::catalog::archive`]; alert `FerryArchiveBehind` past 5 minutes);
//!   `ferry_archive_scan_failed{environment, datastore}`: 1 if the last scan failed. Oplog
//!   slices likewise (now minus the newest slice's end); `ferry_archive_gap{environment,
//!   datastore}`: 1 while the newest chain of slices started after a gap and no backup of
//!   the datastore finished since (alert `FerryOplogGap`), else 0.
//! - `ferry_self_backup_last_success_timestamp_seconds` and `ferry_self_backup_last_failed`
//!   (with `[self_backup]`): the coordinator's own backup since it started (alert
//!   `FerrySelfBackupFailed`).
//! - `ferry_jobs_total{kind, outcome}`: jobs finished since the coordinator started, every
//!   kind (`backup`, `restore`, `verify`) and outcome (`succeeded`, `failed`) from 0.
//!
//! The per-datastore series are read from the store at each scrape (two point lookups per
//! datastore), so they survive a restart; the counter counts from the start.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::dispatch::Coordinator;
use crate::model::{Job, JobKind, JobState};
use crate::store::StoreError;

/// The job kinds counted by `ferry_jobs_total`, in label order.
const KINDS: [JobKind; 3] = [JobKind::Backup, JobKind::Restore, JobKind::Verify];
/// The outcomes counted by `ferry_jobs_total`.
const OUTCOMES: [&str; 2] = ["succeeded", "failed"];

/// The coordinator's counters (kept for the process's life). Every kind and outcome of
/// `ferry_jobs_total` exists from the start at 0, so `increase()` sees a series' first
/// event (a series born at 1 has no increase).
#[derive(Debug, Default)]
pub struct Counters {
    /// Jobs finished, `[kind][outcome]` in [`KINDS`] and [`OUTCOMES`] order.
    jobs: [[AtomicU64; 2]; 3],
}

impl Counters {
    /// Counts a job that reached a final state (`succeeded`, else `failed`).
    pub fn job_finished(&self, job: &Job) {
        let kind = KINDS.iter().position(|k| *k == job.kind).unwrap_or(0);
        let outcome = usize::from(job.state != JobState::Succeeded);
        self.jobs[kind][outcome].fetch_add(1, Ordering::Relaxed);
    }

    /// Jobs of `kind` counted with `outcome` (`succeeded` or `failed`) so far.
    pub fn jobs(&self, kind: JobKind, outcome: &str) -> u64 {
        let k = KINDS.iter().position(|k| *k == kind).unwrap_or(0);
        OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .map_or(0, |o| self.jobs[k][o].load(Ordering::Relaxed))
    }
}

/// Which text format a scrape gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text exposition format 0.0.4 (`text/plain; version=0.0.4`): `# HELP` and
    /// `# TYPE` for every family, counters named with their `_total` suffix.
    Text,
    /// OpenMetrics 1.0.0 (`application/openmetrics-text`): counter families named without
    /// `_total`, their samples with it, and a final `# EOF`.
    OpenMetrics,
}

impl Format {
    /// The format for a request's `Accept` header: OpenMetrics when it prefers
    /// `application/openmetrics-text` (by `q`, then order) to `text/plain` and `*/*`, else
    /// the 0.0.4 text format (also without a header, or when it names neither).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let mut best: Option<(f32, Format)> = None;
        for range in accept.unwrap_or_default().split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .and_then(|(_, v)| v.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            let format = match media.as_str() {
                "application/openmetrics-text" => Format::OpenMetrics,
                "text/plain" | "text/*" | "*/*" => Format::Text,
                _ => continue,
            };
            if q > 0.0 && best.is_none_or(|(b, _)| q > b) {
                best = Some((q, format));
            }
        }
        best.map_or(Format::Text, |(_, f)| f)
    }

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// A metric family's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Type {
    Gauge,
    Counter,
}

/// One metric family of one scrape: its name (a counter's without `_total`), help, type
/// and samples (labels in order, value).
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Type,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

impl Family {
    fn gauge(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            kind: Type::Gauge,
            samples: Vec::new(),
        }
    }
}

/// A sample value as both formats write it (`NaN`, `+Inf`, `-Inf`, else a decimal).
fn value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}

/// Escapes a label value: `\`, `"` and line feeds (both formats).
fn escape_label(s: &str) -> String {
    s.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// Writes `families` in `format`.
fn encode(families: &[Family], format: Format) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for f in families {
        let (family, sample, kind) = match (f.kind, format) {
            (Type::Gauge, _) => (f.name.to_owned(), f.name.to_owned(), "gauge"),
            (Type::Counter, Format::Text) => {
                let total = format!("{}_total", f.name);
                (total.clone(), total, "counter")
            }
            (Type::Counter, Format::OpenMetrics) => {
                (f.name.to_owned(), format!("{}_total", f.name), "counter")
            }
        };
        let help = f.help.replace('\\', r"\\").replace('\n', r"\n");
        let _ = writeln!(out, "# HELP {family} {help}");
        let _ = writeln!(out, "# TYPE {family} {kind}");
        for (labels, v) in &f.samples {
            out.push_str(&sample);
            if !labels.is_empty() {
                let inner: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                    .collect();
                let _ = write!(out, "{{{}}}", inner.join(","));
            }
            let _ = writeln!(out, " {}", value(*v));
        }
    }
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
    out
}

/// Renders the metrics for one scrape in `format`.
///
/// # Errors
/// The store cannot be read.
pub async fn render(c: &Arc<Coordinator>, format: Format) -> Result<String, StoreError> {
    let states = c.datastore_states().await?;
    let mut last_success = Family::gauge(
        "ferry_last_success_timestamp_seconds",
        "When the newest succeeded job of a datastore and kind finished, seconds since the epoch (UTC)",
    );
    let mut duration = Family::gauge(
        "ferry_last_success_duration_seconds",
        "How long the newest succeeded job of a datastore and kind ran on its agent, seconds",
    );
    let mut stored = Family::gauge(
        "ferry_last_success_stored_bytes",
        "Stored size of the backup of the newest succeeded job of a datastore and kind, bytes",
    );
    let mut succeeded = Family::gauge(
        "ferry_last_job_succeeded",
        "1 if the newest finished job of a datastore and kind succeeded, 0 if it failed",
    );
    let mut rpo = Family::gauge(
        "ferry_last_restore_rpo_seconds",
        "Age of the backup restored by the newest succeeded restore when it finished (restore end minus backup end), seconds",
    );
    for (agent, datastore, latest) in &states {
        for (kind, jobs) in &latest.by_kind {
            let labels = vec![
                ("environment", agent.environment.clone()),
                ("agent", agent.id.clone()),
                ("datastore", datastore.clone()),
                ("kind", kind.to_string()),
            ];
            if let Some(job) = &jobs.last_success {
                let finished_ms = job.finished_ms.unwrap_or_default();
                last_success
                    .samples
                    .push((labels.clone(), finished_ms as f64 / 1000.0));
                if let Some(r) = &job.result {
                    duration
                        .samples
                        .push((labels.clone(), r.duration_ms as f64 / 1000.0));
                    stored.samples.push((labels.clone(), r.size_bytes as f64));
                    if *kind == JobKind::Restore
                        && let Some((_, rpo_ms)) =
                            r.rto_rpo_ms(job.to_time_ms.unwrap_or(finished_ms))
                    {
                        rpo.samples.push((labels.clone(), rpo_ms as f64 / 1000.0));
                    }
                }
            }
            if let Some(job) = &jobs.last_outcome {
                let ok = f64::from(u8::from(job.state == JobState::Succeeded));
                succeeded.samples.push((labels, ok));
            }
        }
    }
    let mut set_complete = Family::gauge(
        "ferry_backup_set_complete",
        "1 if the newest backup set of an environment is complete, 0 if a member is missing",
    );
    let mut complete_at = Family::gauge(
        "ferry_last_complete_set_timestamp_seconds",
        "When the newest complete backup set's last member finished, seconds since the epoch",
    );
    let all_sets = c.sets(None).await?;
    for env in c.production_environments() {
        let sets: Vec<_> = all_sets.iter().filter(|s| s.environment == env).collect();
        let labels = vec![("environment", env.clone())];
        if let Some(newest) = sets.first() {
            set_complete
                .samples
                .push((labels.clone(), f64::from(u8::from(newest.complete()))));
        }
        if let Some(done) = sets.iter().find(|s| s.complete()) {
            let end = done
                .members
                .iter()
                .filter_map(|m| m.backup.as_ref().map(|b| b.finished_ms))
                .max()
                .unwrap_or_default();
            complete_at.samples.push((labels, end as f64 / 1000.0));
        }
    }
    let mut unlocked = Family::gauge(
        "ferry_backups_unlocked",
        "Backups on a target with Object Lock whose objects could not be locked yet",
    );
    if c.settings
        .maintenance
        .as_ref()
        .is_some_and(|t| t.object_lock())
    {
        let backups = c.backups(None).await?;
        for env in c.production_environments() {
            let n = backups
                .iter()
                .filter(|b| b.environment == env && b.lock_error.is_some())
                .count();
            unlocked
                .samples
                .push((vec![("environment", env.clone())], n as f64));
        }
    }
    let mut unopenable = Family::gauge(
        "ferry_backups_unopenable",
        "Backups in the catalog that no staging agent's identity can open (ferry keys)",
    );
    let by_environment = c.keys().await?.unopenable_by_environment();
    for env in c.production_environments() {
        let n = by_environment.get(&env).copied().unwrap_or(0);
        unopenable
            .samples
            .push((vec![("environment", env)], f64::from(n)));
    }
    let mut copy_lag = Family::gauge(
        "ferry_copy_lag_seconds",
        "Age of the oldest backup a copy target lacks, seconds; 0 when it lacks none",
    );
    let mut copy_lacking = Family::gauge(
        "ferry_copy_lacking",
        "Backups in the catalog that a copy target lacks",
    );
    let mut copy_failed = Family::gauge(
        "ferry_copy_last_failed",
        "1 if the last copy attempt to the copy target failed, else 0",
    );
    for s in c.copy_status(ferry_proto::now_unix_ms()).await? {
        let labels = vec![("environment", s.environment), ("target", s.target)];
        copy_lag
            .samples
            .push((labels.clone(), s.lag_seconds as f64));
        copy_lacking
            .samples
            .push((labels.clone(), f64::from(s.lacking)));
        copy_failed.samples.push((
            labels,
            if s.progress.last_error.is_some() {
                1.0
            } else {
                0.0
            },
        ));
    }
    let mut archive_lag = Family::gauge(
        "ferry_archive_lag_seconds",
        "Now minus the push time of the newest archived WAL segment (or the end of the newest oplog slice), seconds",
    );
    let mut archive_failed = Family::gauge(
        "ferry_archive_scan_failed",
        "1 if the last scan of the WAL archive failed (the lag is then the last scan's), else 0",
    );
    let mut archive_gap = Family::gauge(
        "ferry_archive_gap",
        "1 if the newest chain of oplog slices started after a gap and no backup of the datastore finished since, else 0",
    );
    let now_ms = ferry_proto::now_unix_ms();
    for a in c.archive_status() {
        if a.kind == "oplog" {
            archive_gap.samples.push((
                vec![
                    ("environment", a.environment.clone()),
                    ("datastore", a.datastore.clone()),
                ],
                f64::from(u8::from(a.gap_since_ms.is_some())),
            ));
        }
        let labels = vec![
            ("environment", a.environment.clone()),
            ("datastore", a.datastore.clone()),
        ];
        archive_lag
            .samples
            .push((labels.clone(), a.lag_seconds(now_ms) as f64));
        archive_failed
            .samples
            .push((labels, f64::from(u8::from(a.error.is_some()))));
    }
    let mut jobs = Family {
        name: "ferry_jobs",
        help: "Jobs finished since the coordinator started, by kind and outcome",
        kind: Type::Counter,
        samples: Vec::new(),
    };
    for kind in KINDS {
        for outcome in OUTCOMES {
            jobs.samples.push((
                vec![("kind", kind.to_string()), ("outcome", outcome.to_owned())],
                c.counters.jobs(kind, outcome) as f64,
            ));
        }
    }
    let mut self_success = Family::gauge(
        "ferry_self_backup_last_success_timestamp_seconds",
        "When the coordinator's newest self-backup to every target finished (since it started)",
    );
    let mut self_failed = Family::gauge(
        "ferry_self_backup_last_failed",
        "1 if the coordinator's newest self-backup failed on a target or on all",
    );
    if c.settings.self_backup.is_some() {
        let p = c
            .self_backups
            .lock()
            .expect("self-backup progress lock")
            .clone();
        if let Some(ms) = p.last_success_ms {
            self_success.samples.push((Vec::new(), ms as f64 / 1000.0));
        }
        self_failed
            .samples
            .push((Vec::new(), f64::from(u8::from(p.last_error.is_some()))));
    }
    let families = [
        set_complete,
        complete_at,
        last_success,
        duration,
        stored,
        succeeded,
        rpo,
        unlocked,
        unopenable,
        copy_lag,
        copy_lacking,
        copy_failed,
        archive_lag,
        archive_failed,
        archive_gap,
        self_success,
        self_failed,
        jobs,
    ];
    Ok(encode(&families, format))
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
///
/// # Errors
/// Accepting connections failed.
pub async fn serve(
    c: Arc<Coordinator>,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::IntoResponse;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: HeaderMap| {
            let c = c.clone();
            async move {
                let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
                let format = Format::negotiate(accept);
                match render(&c, format).await {
                    Ok(text) => (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, format.content_type())],
                        text,
                    )
                        .into_response(),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("job store: {e}"))
                        .into_response(),
                }
            }
        }),
    );
    if let Ok(listen) = listener.local_addr() {
        tracing::info!(%listen, "Metrics serving on /metrics.");
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_follows_accept_and_defaults_to_the_0_0_4_text() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                          version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        for text in [
            None,
            Some(""),
            Some("text/plain;version=0.0.4"),
            Some("text/plain;version=0.0.4;q=0.9, application/openmetrics-text;q=0.5"),
            Some("*/*"),
            Some("application/json"),
            Some("application/openmetrics-text;q=0, text/plain"),
        ] {
            assert_eq!(Format::negotiate(text), Format::Text, "{text:?}");
        }
    }

    #[test]
    fn counters_are_total_in_0_0_4_and_a_family_of_their_own_in_openmetrics() {
        let counters = Counters::default();
        let families = [
            Family {
                name: "ferry_jobs",
                help: "Jobs",
                kind: Type::Counter,
                samples: vec![(vec![("kind", "backup".into())], 0.0)],
            },
            Family {
                samples: vec![(vec![("agent", "a\"b\\c\nd".into())], 1.5)],
                ..Family::gauge("ferry_g", "A gauge")
            },
            Family::gauge("ferry_empty", "No samples yet"),
        ];
        assert_eq!(
            encode(&families, Format::Text),
            "# HELP ferry_jobs_total Jobs\n# TYPE ferry_jobs_total counter\n\
             ferry_jobs_total{kind=\"backup\"} 0\n\
             # HELP ferry_g A gauge\n# TYPE ferry_g gauge\nferry_g{agent=\"a\\\"b\\\\c\\nd\"} 1.5\n\
             # HELP ferry_empty No samples yet\n# TYPE ferry_empty gauge\n"
        );
        let om = encode(&families, Format::OpenMetrics);
        assert!(
            om.starts_with(
                "# HELP ferry_jobs Jobs\n# TYPE ferry_jobs counter\nferry_jobs_total{kind=\"backup\"} 0\n"
            ),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert_eq!(counters.jobs(JobKind::Verify, "failed"), 0);
        assert_eq!(value(f64::INFINITY), "+Inf");
        assert_eq!(value(1e21), "1000000000000000000000");
    }
}
