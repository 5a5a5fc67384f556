//! Notifications (`[[notify]]`): webhooks on what needs a human, beside the Prometheus
//! alerts (for teams without Alertmanager, or as a second path).
//!
//! Events ([`EventKind`]):
//! - `job_failed`: a backup, verify or operator's restore failed for good (after its
//!   retries);
//! - `drill_failed`: a scheduled restore (a drill) failed for good;
//! - `schedule_missed`: a schedule's runs were missed while the coordinator was down (one
//!   catch-up run is made);
//! - `set_incomplete`: at an environment's `set_deadline` (UTC), today's backup set lacks a
//!   member;
//! - `copy_lag`: a copy target lacks a backup older than [`COPY_LAG_BOUND_SECONDS`] (the
//!   `FerryCopyBehind` alert's bound);
//! - `archive_lag`: a datastore's newest archived WAL segment or oplog slice is older than
//!   [`ARCHIVE_LAG_BOUND_SECONDS`] (`FerryArchiveBehind`'s), or its oplog chain broke;
//! - `self_backup_failed`: the coordinator's self-backup failed on a target or on all.
//!
//! The lags are told once when they cross their bound, and again only after they came back
//! under it.
//!
//! Each hook has a queue of its own ([`QUEUE`] events) and a task that posts them one by
//! one: `format = "json"` posts the [`Event`] as JSON, `format = "slack"` posts `{"text":
//! "..."}` (Slack's incoming webhooks, Mattermost, Rocket.Chat). A post that fails (no
//! connection, a timeout of [`REQUEST_TIMEOUT`], a status other than 2xx) is retried after
//! 1, 2, 4 and 8 s ([`ATTEMPTS`] in all), then dropped and logged. Nothing waits on a hook:
//! an event for a full queue is dropped and logged, so a receiver that is down never holds
//! up dispatch. The body holds no secret: a hook's token (`token_file`) goes in the
//! `Authorization` header, and logs name a hook by its scheme, host and port only (a Slack
//! URL's path is its secret).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Posts per event and hook, the first included.
pub const ATTEMPTS: u32 = 5;
/// How long one post may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Events waiting per hook; more are dropped.
pub const QUEUE: usize = 256;
/// A copy target lacking a backup older than this (seconds) is told (`copy_lag`).
pub const COPY_LAG_BOUND_SECONDS: i64 = 26 * 3600;
/// An archive whose newest file is older than this (seconds) is told (`archive_lag`).
pub const ARCHIVE_LAG_BOUND_SECONDS: i64 = 300;
/// How often the lags and the set deadlines are looked at.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(15);

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A backup, verify or operator's restore failed for good.
    JobFailed,
    /// A scheduled restore (a drill) failed for good.
    DrillFailed,
    /// A schedule's runs were missed while the coordinator was down.
    ScheduleMissed,
    /// At its deadline, today's backup set of an environment lacks a member.
    SetIncomplete,
    /// A copy target is behind by more than [`COPY_LAG_BOUND_SECONDS`].
    CopyLag,
    /// An archive is behind by more than [`ARCHIVE_LAG_BOUND_SECONDS`], or its chain broke.
    ArchiveLag,
    /// The coordinator's self-backup failed on a target or on all.
    SelfBackupFailed,
}

impl EventKind {
    /// The snake_case name, as in the config and the JSON body.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::JobFailed => "job_failed",
            EventKind::DrillFailed => "drill_failed",
            EventKind::ScheduleMissed => "schedule_missed",
            EventKind::SetIncomplete => "set_incomplete",
            EventKind::CopyLag => "copy_lag",
            EventKind::ArchiveLag => "archive_lag",
            EventKind::SelfBackupFailed => "self_backup_failed",
        }
    }
}

/// One notification: the JSON body of a `format = "json"` hook.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// What happened.
    pub event: EventKind,
    /// When the coordinator saw it (RFC 3339, UTC).
    pub at: DateTime<Utc>,
    /// The environment concerned, if one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// The agent concerned, if one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The datastore concerned, if one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datastore: Option<String>,
    /// The job concerned, if one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// What happened, in one line for a human (at most 2,000 characters).
    pub summary: String,
}

impl Event {
    /// An event of `kind` now, with `summary` cut to 2,000 characters.
    pub fn new(kind: EventKind, summary: impl Into<String>) -> Event {
        let mut summary: String = summary.into();
        if summary.chars().count() > 2000 {
            summary = summary.chars().take(2000).collect::<String>() + "…";
        }
        Event {
            event: kind,
            at: Utc::now(),
            environment: None,
            agent: None,
            datastore: None,
            job_id: None,
            summary,
        }
    }

    /// The body for `format`.
    pub fn body(&self, format: NotifyFormat) -> serde_json::Value {
        match format {
            NotifyFormat::Json => serde_json::to_value(self).expect("an event serializes"),
            NotifyFormat::Slack => serde_json::json!({
                "text": format!("Ferry {}: {}", self.event.name(), self.summary),
            }),
        }
    }
}

/// A hook's body format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyFormat {
    /// The [`Event`] as JSON.
    #[default]
    Json,
    /// `{"text": "Ferry <event>: <summary>"}` (Slack-compatible incoming webhooks).
    Slack,
}

/// `[[notify]]` in `coordinator.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyEntry {
    /// Where to post: `https://...`, or `http://` to a loopback address.
    pub url: String,
    /// `json` (the default) or `slack`.
    #[serde(default)]
    pub format: NotifyFormat,
    /// The events posted; every one if absent.
    pub events: Option<Vec<EventKind>>,
    /// A file (mode 0600 or 0400) whose content is sent as `Authorization: Bearer ...`.
    pub token_file: Option<PathBuf>,
}

/// A validated hook.
pub struct Hook {
    /// `scheme://host:port`, for logs (never the path, which may be a secret).
    pub name: String,
    url: reqwest::Url,
    format: NotifyFormat,
    events: Option<BTreeSet<EventKind>>,
    token: Option<String>,
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hook")
            .field("name", &self.name)
            .field("format", &self.format)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl NotifyEntry {
    /// Checks the entry: a URL that is `https`, or `http` to a loopback address; a token
    /// file that is owner-only.
    ///
    /// # Errors
    /// A message naming what is wrong (never the URL's path or the token).
    pub fn build(&self) -> Result<Hook, String> {
        let url = reqwest::Url::parse(&self.url).map_err(|e| format!("url: not a URL: {e}"))?;
        let host = url.host_str().unwrap_or_default().to_owned();
        let loopback = host == "localhost"
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        match url.scheme() {
            "https" => {}
            "http" if loopback => {}
            other => {
                return Err(format!(
                    "url: {other}:// to {host}: use https (http only to a loopback address)"
                ));
            }
        }
        let token = match &self.token_file {
            Some(p) => Some(
                ferry_core::secrets::read_secret_file(p)
                    .map_err(|e| format!("token_file: {e}"))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        Ok(Hook {
            name: format!(
                "{}://{host}:{}",
                url.scheme(),
                url.port_or_known_default().unwrap_or_default()
            ),
            url,
            format: self.format,
            events: self.events.as_ref().map(|e| e.iter().copied().collect()),
            token,
        })
    }
}

/// The hooks' queues, and what the lags last were (so that a lag is told once).
#[derive(Default)]
pub struct Notifier {
    queues: Vec<(Arc<Hook>, tokio::sync::mpsc::Sender<Event>)>,
    /// Keys of the lags over their bound when last looked at.
    over: Mutex<BTreeSet<String>>,
    /// The last date whose set deadline was checked, per environment.
    deadlines: Mutex<BTreeMap<String, chrono::NaiveDate>>,
}

impl Notifier {
    /// Starts one posting task per hook on `tasks`, ending at `shutdown`.
    pub fn start(
        hooks: Vec<Arc<Hook>>,
        shutdown: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Notifier {
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client with rustls");
        let mut queues = Vec::new();
        for hook in hooks {
            let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
            tasks.spawn(post_loop(
                hook.clone(),
                client.clone(),
                rx,
                shutdown.clone(),
            ));
            queues.push((hook, tx));
        }
        Notifier {
            queues,
            ..Notifier::default()
        }
    }

    /// Queues `event` for every hook that wants it; never waits (a full queue drops it,
    /// logged).
    pub fn notify(&self, event: Event) {
        for (hook, tx) in &self.queues {
            if hook
                .events
                .as_ref()
                .is_some_and(|e| !e.contains(&event.event))
            {
                continue;
            }
            if tx.try_send(event.clone()).is_err() {
                tracing::warn!(hook = %hook.name, event = event.event.name(),
                    "A notification was dropped: the hook's queue is full (its receiver is down or slow).");
            }
        }
    }

    /// Tells `event` if `key` is over its bound now (`over`) and was not when last looked
    /// at; forgets `key` once it is back under.
    pub fn edge(&self, key: &str, over: bool, event: impl FnOnce() -> Event) {
        let mut set = self.over.lock().expect("notifier lock");
        if over {
            if set.insert(key.to_owned()) {
                drop(set);
                self.notify(event());
            }
        } else {
            set.remove(key);
        }
    }

    /// Whether the deadline of `environment` for `date` was checked already.
    pub fn deadline_checked(&self, environment: &str, date: chrono::NaiveDate) -> bool {
        let map = self.deadlines.lock().expect("notifier lock");
        map.get(environment).is_some_and(|d| *d >= date)
    }

    /// Records that the deadline of `environment` for `date` was checked (once per date).
    pub fn check_deadline(&self, environment: &str, date: chrono::NaiveDate) {
        let mut map = self.deadlines.lock().expect("notifier lock");
        map.insert(environment.to_owned(), date);
    }
}

/// Posts `hook`'s events one by one, each retried as the module's doc says, until shutdown.
async fn post_loop(
    hook: Arc<Hook>,
    client: reqwest::Client,
    mut rx: tokio::sync::mpsc::Receiver<Event>,
    shutdown: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            e = rx.recv() => match e { Some(e) => e, None => return },
            _ = shutdown.cancelled() => return,
        };
        let body = event.body(hook.format);
        let mut wait = Duration::from_secs(1);
        for attempt in 1..=ATTEMPTS {
            let mut request = client.post(hook.url.clone()).json(&body);
            if let Some(t) = &hook.token {
                request = request.bearer_auth(t);
            }
            let outcome = tokio::select! {
                r = request.send() => r,
                _ = shutdown.cancelled() => return,
            };
            let error = match outcome {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => Some(format!("HTTP {}", r.status())),
                // Without the URL: its path may be the hook's secret.
                Err(e) => Some(e.without_url().to_string()),
            };
            let Some(error) = error else {
                tracing::info!(hook = %hook.name, event = event.event.name(), attempt,
                    "Notification posted.");
                break;
            };
            if attempt == ATTEMPTS {
                tracing::error!(hook = %hook.name, event = event.event.name(), %error,
                    "A notification could not be posted; dropped after {ATTEMPTS} attempts.");
                break;
            }
            tracing::warn!(hook = %hook.name, event = event.event.name(), attempt, %error,
                "Could not post a notification; retrying.");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
            wait *= 2;
        }
    }
}

impl crate::dispatch::Coordinator {
    /// Sets `event`'s agent, datastore and the agent's environment (from the inventory).
    pub fn about(&self, event: &mut Event, agent: &str, datastore: Option<&str>) {
        event.environment = self
            .settings
            .agents
            .get(agent)
            .map(|a| a.environment.clone());
        event.agent = Some(agent.to_owned());
        event.datastore = datastore.map(str::to_owned);
    }

    /// Looks at the lags and the set deadlines now, telling what crossed its bound
    /// ([`EventKind::CopyLag`], [`EventKind::ArchiveLag`], [`EventKind::SetIncomplete`]).
    pub async fn check_notifications(&self) {
        if self.notifier.queues.is_empty() {
            return;
        }
        let now = Utc::now();
        let now_ms = now.timestamp_millis();
        if let Ok(copies) = self.copy_status(now_ms).await {
            for c in copies {
                let key = format!("copy\0{}\0{}", c.environment, c.target);
                self.notifier
                    .edge(&key, c.lag_seconds > COPY_LAG_BOUND_SECONDS, || {
                        let mut e = Event::new(
                            EventKind::CopyLag,
                            format!(
                                "copy target {} of {} lacks {} backup(s), the oldest {} s old \
                                 (bound {COPY_LAG_BOUND_SECONDS} s){}",
                                c.target,
                                c.environment,
                                c.lacking,
                                c.lag_seconds,
                                c.progress
                                    .last_error
                                    .as_deref()
                                    .map(|e| format!("; last error: {e}"))
                                    .unwrap_or_default()
                            ),
                        );
                        e.environment = Some(c.environment.clone());
                        e
                    });
            }
        }
        for a in self.archive_status() {
            let lag = a.lag_seconds(now_ms);
            let broken = a.gap_since_ms.is_some();
            let key = format!("archive\0{}\0{}", a.environment, a.datastore);
            self.notifier
                .edge(&key, lag > ARCHIVE_LAG_BOUND_SECONDS || broken, || {
                    let mut e = Event::new(
                        EventKind::ArchiveLag,
                        if broken {
                            format!(
                                "the {} archive of {} in {} has a gap: its chain broke, a \
                                 new one started",
                                a.kind, a.datastore, a.environment
                            )
                        } else {
                            format!(
                                "the {} archive of {} in {} is {lag} s behind (newest {}; \
                                 bound {ARCHIVE_LAG_BOUND_SECONDS} s)",
                                a.kind,
                                a.datastore,
                                a.environment,
                                if a.newest_file.is_empty() {
                                    "none"
                                } else {
                                    &a.newest_file
                                }
                            )
                        },
                    );
                    e.environment = Some(a.environment.clone());
                    e.datastore = Some(a.datastore.clone());
                    e
                });
        }
        for (env, deadline) in &self.settings.set_deadlines {
            let today = now.date_naive();
            if now.time() < *deadline || self.notifier.deadline_checked(env, today) {
                continue;
            }
            // Until the agents described their datastores the set's members are not known:
            // checked at the next look.
            if self.expected_members(env).is_empty() {
                continue;
            }
            let Ok(sets) = self.sets(Some(env)).await else {
                continue;
            };
            self.notifier.check_deadline(env, today);
            let date = today.format("%Y-%m-%d").to_string();
            let (complete, missing) = match sets.iter().find(|s| s.date == date) {
                Some(s) => (s.complete(), s.missing()),
                None => (
                    false,
                    self.expected_members(env)
                        .into_iter()
                        .map(|(a, d)| format!("{a}/{d}"))
                        .collect(),
                ),
            };
            if !complete {
                let mut e = Event::new(
                    EventKind::SetIncomplete,
                    format!(
                        "the backup set of {env} for {date} is incomplete at its deadline \
                         {deadline} UTC: no backup of {}",
                        missing.join(", ")
                    ),
                );
                e.environment = Some(env.clone());
                self.notifier.notify(e);
            }
        }
    }

    /// Runs [`Coordinator::check_notifications`] every [`CHECK_INTERVAL`] until shutdown.
    pub async fn run_notification_checks(self: Arc<Self>) {
        if self.notifier.queues.is_empty() {
            return;
        }
        loop {
            self.check_notifications().await;
            tokio::select! {
                _ = tokio::time::sleep(CHECK_INTERVAL) => {}
                _ = self.shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_are_https_or_loopback_http_and_never_named_with_their_path() {
        let entry = |url: &str| NotifyEntry {
            url: url.into(),
            format: NotifyFormat::Slack,
            events: None,
            token_file: None,
        };
        let hook = entry("https://hooks.slack.com/services/T0/B0/SECRET")
            .build()
            .unwrap();
        assert_eq!(hook.name, "https://hooks.slack.com:443");
        assert!(!format!("{hook:?}").contains("SECRET"));
        assert!(entry("http://127.0.0.1:9/x").build().is_ok());
        assert!(entry("http://[::1]:9/x").build().is_ok());
        let e = entry("http://hooks.example/x").build().unwrap_err();
        assert!(e.contains("use https"), "{e}");
        assert!(entry("ftp://x/").build().is_err());
    }

    #[test]
    fn a_lag_is_told_once_until_it_comes_back_under_its_bound() {
        let n = Notifier::default();
        let mut told = 0;
        for over in [true, true, false, true] {
            n.edge("k", over, || {
                told += 1;
                Event::new(EventKind::CopyLag, "x")
            });
        }
        assert_eq!(told, 2);
        let today = chrono::NaiveDate::from_ymd_opt(2026, 12, 5).unwrap();
        assert!(!n.deadline_checked("production", today));
        n.check_deadline("production", today);
        assert!(n.deadline_checked("production", today));
        assert!(!n.deadline_checked("production", today.succ_opt().unwrap()));
    }

    #[test]
    fn bodies_carry_the_event_and_nothing_else() {
        let mut e = Event::new(EventKind::DrillFailed, "restore of pg failed");
        e.agent = Some("pg-stage".into());
        let json = e.body(NotifyFormat::Json);
        assert_eq!(json["event"], "drill_failed");
        assert_eq!(json["agent"], "pg-stage");
        assert!(json.get("environment").is_none());
        assert_eq!(
            e.body(NotifyFormat::Slack)["text"],
            "Ferry drill_failed: restore of pg failed"
        );
        let long = Event::new(EventKind::JobFailed, "x".repeat(1_000_000));
        assert!(long.summary.len() < 2010);
    }
}
