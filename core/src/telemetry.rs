//! How a Ferry program reports, the same in every binary: the `--log-format` flag's
//! [`LogFormat`], the tracing subscriber ([`init_tracing`]: `FERRY_LOG` filter, stderr,
//! colours only on a terminal), the shutdown signal ([`cancel_on_signal`]: SIGTERM or
//! ctrl-c cancels one [`CancellationToken`]), and an error with its causes told in one
//! line ([`error_text`], [`join_causes`]).

use std::io::IsTerminal;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// The environment variable holding the tracing filter, in `tracing_subscriber`'s
/// `EnvFilter` syntax (e.g. `debug`, `ferry_agent=debug,info`). Default `info`.
pub const LOG_FILTER_ENV: &str = "FERRY_LOG";

/// How log events are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum LogFormat {
    /// One line of text per event, for people.
    #[default]
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the process's tracing subscriber: events to stderr in `format`, filtered by
/// [`LOG_FILTER_ENV`] (`info` when unset or not a valid filter), with ANSI colours only
/// when stderr is a terminal (a log file, systemd's journal or a redirect gets plain text).
///
/// # Panics
/// If a global subscriber is already installed: call it once, from `main`.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env(LOG_FILTER_ENV)
        .unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Cancels `token` at the first SIGTERM or SIGINT (ctrl-c), logging `Shutting down.`:
/// the one shutdown signal a daemon hands to every task. Both handlers are registered
/// before this returns, so a signal any time after it is caught; the returned task ends
/// once the token is cancelled (by a signal or by anyone else).
///
/// # Errors
/// A handler cannot be registered (the I/O error of `signal`).
///
/// # Panics
/// Outside a tokio runtime.
pub fn cancel_on_signal(token: CancellationToken) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            () = token.cancelled() => return,
        }
        tracing::info!("Shutting down.");
        token.cancel();
    }))
}

/// Joins an error's message and its causes with `: `, each cause once: a cause whose text
/// is already shown (an error that prints its source in its own message, or a wrapper
/// that repeats it) is left out, and one that repeats the part before it and adds to it
/// takes its place.
pub fn join_causes(parts: impl IntoIterator<Item = String>) -> String {
    let mut shown: Vec<String> = Vec::new();
    for part in parts {
        if part.is_empty() || shown.iter().any(|s| s.contains(part.as_str())) {
            continue;
        }
        match shown.last_mut() {
            Some(last) if part.contains(last.as_str()) => *last = part,
            _ => shown.push(part),
        }
    }
    shown.join(": ")
}

/// An error and its sources (`Error::source`, as `anyhow`'s `chain`) as one line,
/// [`join_causes`]: what `main` prints before exiting non-zero.
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    join_causes(std::iter::successors(Some(e), |e| (*e).source()).map(ToString::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_joined_once() {
        let parts = |p: &[&str]| join_causes(p.iter().map(|s| (*s).to_owned()));
        assert_eq!(
            parts(&[
                "cannot reach the coordinator at https://h:1",
                "transport error",
                "tcp connect error",
                "tcp connect error",
                "Connection refused (os error 111)",
            ]),
            "cannot reach the coordinator at https://h:1: transport error: tcp connect error: \
             Connection refused (os error 111)"
        );
        assert_eq!(
            parts(&[
                "cannot read TLS CA certificate file x: No such file or directory (os error 2)",
                "No such file or directory (os error 2)",
            ]),
            "cannot read TLS CA certificate file x: No such file or directory (os error 2)"
        );
        assert_eq!(
            parts(&[
                "transport error",
                "dns error",
                "dns error: failed to lookup"
            ]),
            "transport error: dns error: failed to lookup"
        );
    }

    /// The handlers are in place when `cancel_on_signal` returns: a SIGTERM sent at once
    /// cancels the token instead of ending this test process (the default action).
    #[tokio::test]
    async fn sigterm_cancels_the_shutdown_token() {
        let token = CancellationToken::new();
        let task = cancel_on_signal(token.clone()).unwrap();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        tokio::time::timeout(std::time::Duration::from_secs(10), token.cancelled())
            .await
            .expect("the token is cancelled within 10 s of SIGTERM");
        task.await.unwrap();
    }

    #[test]
    fn an_error_is_told_with_each_of_its_sources_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("cannot read config x.toml: {0}")]
        struct Outer(#[source] std::io::Error);
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        assert_eq!(
            error_text(&Outer(io)),
            "cannot read config x.toml: no such file"
        );
    }
}
