//! Running the datastores' command-line tools: where they are, and the tail of their
//! stderr for error messages.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// A running tool that is killed (SIGKILL) and reaped if dropped before it was waited for
/// to its end: a job dropped at the agent's shutdown leaves neither the tool running nor
/// a zombie behind.
pub struct ReapedChild(Option<tokio::process::Child>);

impl ReapedChild {
    /// How long a drop waits for the killed tool to be reaped.
    const REAP_WAIT: Duration = Duration::from_secs(2);

    /// Owns `child`.
    pub fn new(child: tokio::process::Child) -> Self {
        Self(Some(child))
    }

    /// Its process id, until it has been reaped.
    pub fn id(&self) -> Option<u32> {
        self.0.as_ref().and_then(tokio::process::Child::id)
    }

    /// Waits for it to exit, and reaps it.
    ///
    /// # Errors
    /// The OS error of waiting.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self.0.as_mut() {
            Some(child) => child.wait().await,
            None => Err(std::io::Error::other("the tool was already reaped")),
        }
    }
}

impl Drop for ReapedChild {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let pid = child.id();
        let _ = child.start_kill();
        // SIGKILL is not caught: the tool is gone within milliseconds.
        let deadline = Instant::now() + Self::REAP_WAIT;
        while let Ok(None) = child.try_wait() {
            if Instant::now() >= deadline {
                tracing::warn!(pid, "A killed tool was not reaped in time.");
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        tracing::debug!(pid, "Killed and reaped a tool its job dropped.");
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

/// A tool run that did not give what was asked of it.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// It could not be started (not installed, not executable, `bin_dir` wrong).
    #[error("not started: {0}")]
    NotStarted(std::io::Error),
    /// It exited unsuccessfully.
    #[error("{status}: {stderr}")]
    Failed {
        /// The exit status as [`describe_status`] words it, e.g. `exit code 1`.
        status: String,
        /// The last 5 lines of its stderr, joined by ` | `.
        stderr: String,
    },
    /// It exited successfully but its output is not what was expected: what is wrong.
    #[error("exit code 0: {0}")]
    Output(String),
    /// It was killed because its job was cancelled.
    #[error("cancelled: job cancelled")]
    Cancelled,
}

impl ToolError {
    /// How the run ended, for messages: `not started`, `exit code 1`, `killed by signal
    /// 9`, `exit code 0` (output not understood), `cancelled`.
    pub fn status(&self) -> String {
        match self {
            ToolError::NotStarted(_) => "not started".into(),
            ToolError::Failed { status, .. } => status.clone(),
            ToolError::Output(_) => "exit code 0".into(),
            ToolError::Cancelled => "cancelled".into(),
        }
    }

    /// What went wrong: the OS error, the tail of the tool's stderr, what is wrong with
    /// its output, or `job cancelled`.
    pub fn detail(&self) -> String {
        match self {
            ToolError::NotStarted(e) => e.to_string(),
            ToolError::Failed { stderr, .. } => stderr.clone(),
            ToolError::Output(what) => what.clone(),
            ToolError::Cancelled => "job cancelled".into(),
        }
    }
}

/// Runs `cmd` to its end and returns its stdout; if the future is dropped first (a
/// cancelled or stopped job), the tool is killed and reaped ([`ReapedChild`]).
///
/// # Errors
/// [`ToolError::NotStarted`] (also when its output cannot be read or it cannot be
/// waited for), or [`ToolError::Failed`] with the exit status as [`describe_status`]
/// words it and the last 5 lines of its stderr joined by ` | `.
pub async fn output(mut cmd: tokio::process::Command) -> Result<Vec<u8>, ToolError> {
    use std::process::Stdio;
    use tokio::io::AsyncReadExt;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ToolError::NotStarted)?;
    let (mut stdout, mut stderr) = (
        child.stdout.take().expect("stdout is piped"),
        child.stderr.take().expect("stderr is piped"),
    );
    let mut child = ReapedChild::new(child);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (read_out, read_err) =
        tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
    read_out.and(read_err).map_err(ToolError::NotStarted)?;
    let status = child.wait().await.map_err(ToolError::NotStarted)?;
    if status.success() {
        return Ok(out);
    }
    let text = String::from_utf8_lossy(&err);
    let tail: Vec<&str> = text.lines().rev().take(5).collect();
    Err(ToolError::Failed {
        status: describe_status(status),
        stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
    })
}

/// [`output`], unless the job is cancelled first: then the tool is killed and the error
/// is [`ToolError::Cancelled`].
///
/// # Errors
/// As [`output`], and [`ToolError::Cancelled`].
pub async fn output_until_cancelled(
    cmd: tokio::process::Command,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Vec<u8>, ToolError> {
    tokio::select! {
        r = output(cmd) => r,
        () = cancel.cancelled() => Err(ToolError::Cancelled),
    }
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

/// Runs an operator's command (`argv`, the config's `field`, e.g. `stop_command`) to its
/// end.
///
/// # Errors
/// [`RestoreError::Target`](crate::datastore::RestoreError::Target) if `argv` is empty, else [`RestoreError::Tool`](crate::datastore::RestoreError::Tool) naming
/// `field`, with the command's exit status and the tail of its stderr.
pub async fn run_command(
    argv: &[String],
    field: &str,
) -> Result<(), crate::datastore::RestoreError> {
    use crate::datastore::RestoreError;
    let Some((program, args)) = argv.split_first() else {
        return Err(RestoreError::Target(format!("{field} is empty")));
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args);
    output(cmd)
        .await
        .map(drop)
        .map_err(RestoreError::tool(field))
}

/// `(uid, gid)` of the OS user `name`, from `/etc/passwd` (passwd(5)).
///
/// # Errors
/// The file cannot be read, or has no such user.
pub fn os_user_ids(name: &str) -> std::io::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == name)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .ok_or_else(|| std::io::Error::other(format!("no OS user {name:?} in /etc/passwd")))
}

/// The id of the OS group `name`, from `/etc/group` (group(5)).
///
/// # Errors
/// The file cannot be read, or has no such group.
pub fn os_group_id(name: &str) -> std::io::Result<u32> {
    let groups = std::fs::read_to_string("/etc/group")?;
    groups
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[0] == name)
        .and_then(|f| f[2].parse().ok())
        .ok_or_else(|| {
            std::io::Error::other(format!(
                "no OS group {} in /etc/group",
                ferry_core::Bounded(name)
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::DumpError;

    #[tokio::test]
    async fn a_tool_whose_run_is_dropped_is_killed_and_reaped_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(format!("echo $$ > {}; exec sleep 30", pid_file.display()));
        let mut run = Box::pin(output(cmd));
        // Run it until the tool has started, then drop the run (a stopped job).
        let pid = loop {
            tokio::select! {
                r = &mut run => panic!("the tool ended: {r:?}"),
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            if let Some(pid) = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
            {
                break pid;
            }
        };
        drop(run);
        // Neither running nor a zombie: reaped, so /proc has no entry for it.
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "the dropped tool {pid} is left: {:?}",
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
        );
    }

    #[tokio::test]
    async fn a_tool_that_fails_or_cannot_start_says_how_and_names_itself_in_a_dump_error() {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", "echo first >&2; echo last >&2; exit 3"]);
        let e = output(cmd).await.unwrap_err();
        assert!(matches!(e, ToolError::Failed { .. }), "{e:?}");
        assert_eq!(
            (e.status(), e.detail()),
            ("exit code 3".into(), "first | last".into())
        );
        assert_eq!(
            DumpError::tool("sh -c")(e).to_string(),
            "sh -c failed (exit code 3): first | last"
        );

        let missing = tokio::process::Command::new("/nonexistent/ferry-test-tool");
        let e = output(missing).await.unwrap_err();
        assert!(matches!(e, ToolError::NotStarted(_)), "{e:?}");
        assert_eq!(e.status(), "not started");

        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", "echo out"]);
        assert_eq!(output(cmd).await.unwrap(), b"out\n");
    }
}
