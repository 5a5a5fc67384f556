//! Progress counters shared between the pipeline threads and the job's event loop, and
//! the job's cancellation flag.

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio_util::sync::CancellationToken;

/// The counters behind a [`Progress`] handle.
#[derive(Default)]
pub struct Counters {
    /// Bytes read from the source.
    pub read: AtomicU64,
    /// Bytes written to the sink.
    pub written: AtomicU64,
    /// Current stage name.
    pub stage: Mutex<&'static str>,
    /// Set while the stage streams data between a datastore and the backup server.
    pub streaming: AtomicBool,
}

/// A cheap, cloneable handle on one job's counters and cancellation.
#[derive(Clone)]
pub struct Progress {
    /// The counters.
    pub inner: Arc<Counters>,
    /// Cancelled when the operator cancels the job or the agent shuts down.
    pub cancel: CancellationToken,
}

impl Progress {
    /// New counters at zero, stage `starting`.
    pub fn new(cancel: CancellationToken) -> Self {
        let inner = Arc::new(Counters::default());
        *inner.stage.lock().expect("stage lock") = "starting";
        Self { inner, cancel }
    }

    /// Sets the current stage, e.g. `dump`, `verify`, `restore`.
    pub fn set_stage(&self, stage: &'static str) {
        *self.inner.stage.lock().expect("stage lock") = stage;
    }

    /// The current stage.
    pub fn stage(&self) -> &'static str {
        *self.inner.stage.lock().expect("stage lock")
    }

    /// Sets both counters back to zero (a new stage over the same bytes).
    pub fn reset(&self) {
        self.inner.read.store(0, Ordering::Relaxed);
        self.inner.written.store(0, Ordering::Relaxed);
    }

    /// Marks the span in which the stage streams a dump to the backup server: once the
    /// dump's first byte is read and until `false`, counters that do not move mean the job
    /// is making no progress (see [`Progress::streaming`]).
    pub fn set_streaming(&self, on: bool) {
        self.inner.streaming.store(on, Ordering::Relaxed);
    }

    /// Whether the byte counters are the measure of this stage's progress: set with
    /// [`Progress::set_streaming`] and some bytes read. The coordinator then takes progress
    /// reports whose counters did not move for no sign of life (`agent_timeout_seconds`).
    /// Stages measured otherwise (waiting, a dump tool before its first byte, the commit,
    /// tools such as pgBackRest or rsync, a restore) report `false`.
    pub fn streaming(&self) -> bool {
        self.inner.streaming.load(Ordering::Relaxed) && self.inner.read.load(Ordering::Relaxed) > 0
    }

    /// (bytes read, bytes written).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.inner.read.load(Ordering::Relaxed),
            self.inner.written.load(Ordering::Relaxed),
        )
    }

    /// An error once the job is cancelled.
    ///
    /// # Errors
    /// `io::Error` `Other("job cancelled")`.
    pub fn check_cancelled(&self) -> io::Result<()> {
        if self.cancel.is_cancelled() {
            Err(io::Error::other("job cancelled"))
        } else {
            Ok(())
        }
    }
}

/// Counts bytes read from `inner` into `progress`'s `read` counter.
pub struct CountingReader<R> {
    inner: R,
    progress: Progress,
}

impl<R: Read> CountingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R, progress: Progress) -> Self {
        Self { inner, progress }
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.progress.check_cancelled()?;
        let n = self.inner.read(buf)?;
        self.progress
            .inner
            .read
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}
