//! Running the datastores' command-line tools: where they are, and the tail of their
//! stderr for error messages.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};

/// Where a kind's tools live: `bin_dir/<tool>` if configured, else `<tool>` on `PATH`.
#[derive(Clone, Debug, Default)]
pub struct ToolPaths {
    bin_dir: Option<PathBuf>,
}

impl ToolPaths {
    /// Tools in `bin_dir`, or on `PATH` when `None`.
    pub fn new(bin_dir: Option<PathBuf>) -> Self {
        Self { bin_dir }
    }

    /// The path to run for `tool`.
    pub fn path(&self, tool: &str) -> PathBuf {
        match &self.bin_dir {
            Some(dir) => dir.join(tool),
            None => PathBuf::from(tool),
        }
    }

    /// `tool --version`'s first line, or the error.
    pub fn version(&self, tool: &str) -> String {
        self.version_with(tool, &["--version"])
    }

    /// The first line `tool ARGS` prints (e.g. `etcdctl version`), or the error.
    pub fn version_with(&self, tool: &str, args: &[&str]) -> String {
        match std::process::Command::new(self.path(tool))
            .args(args)
            .output()
        {
            Ok(out) => String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned(),
            Err(e) => format!("unavailable: {e}"),
        }
    }
}

/// Keeps the last lines of a child's stderr (at most [`StderrTail::MAX_BYTES`]), read by a
/// thread of its own so the child never blocks on a full pipe.
#[derive(Clone, Default)]
pub struct StderrTail {
    lines: Arc<Mutex<Vec<String>>>,
    reader: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl StderrTail {
    /// Most bytes kept.
    pub const MAX_BYTES: usize = 4096;

    /// Starts a thread reading `stderr` to its end.
    pub fn spawn(stderr: impl Read + Send + 'static) -> Self {
        let tail = Self::default();
        let lines = tail.lines.clone();
        let handle = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = lines.lock().expect("stderr lock");
                l.push(line);
                while l.iter().map(|s| s.len() + 1).sum::<usize>() > Self::MAX_BYTES && l.len() > 1
                {
                    l.remove(0);
                }
            }
        });
        *tail.reader.lock().expect("stderr lock") = Some(handle);
        tail
    }

    /// Waits until the child's stderr is closed and fully read (call after the child
    /// exited, so that the tail is complete).
    pub fn wait(&self) {
        let handle = self.reader.lock().expect("stderr lock").take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// The lines kept so far, joined by ` | `; `(no output)` if none.
    pub fn text(&self) -> String {
        let l = self.lines.lock().expect("stderr lock");
        if l.is_empty() {
            "(no output)".into()
        } else {
            l.join(" | ")
        }
    }

    /// The lines kept so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("stderr lock").clone()
    }
}

/// Runs `cmd` to its end and returns its stdout; on failure `(status, stderr tail)`: the
/// exit status as [`describe_status`] words it (or `not started`), and the last 5
/// lines of its stderr joined by ` | `.
///
/// # Errors
/// The command could not start or exited non-zero.
pub async fn output(mut cmd: tokio::process::Command) -> Result<Vec<u8>, (String, String)> {
    let out = cmd
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| ("not started".to_owned(), e.to_string()))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let text = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = text.lines().rev().take(5).collect();
    Err((
        describe_status(out.status),
        tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
    ))
}

/// Formats an exit status for messages: `exit code 1` or `killed by signal 9`.
pub fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}
