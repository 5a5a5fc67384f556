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
    /// Set while the stage waits for the upload to take a chunk (the channel is full).
    pub held_by_upload: AtomicBool,
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

    /// Marks the span in which the stage streams a dump to the backup server (see
    /// [`Progress::streaming`]).
    pub fn set_streaming(&self, on: bool) {
        self.inner.streaming.store(on, Ordering::Relaxed);
    }

    /// Marks the time the stage waits for the upload to take a chunk: the chunk channel to
    /// the transport is full.
    pub fn set_held_by_upload(&self, on: bool) {
        self.inner.held_by_upload.store(on, Ordering::Relaxed);
    }

    /// Whether the byte counters are now the measure of this stage's progress: a dump is
    /// streaming to the backup server ([`Progress::set_streaming`]), some bytes were read,
    /// and the dump is held up by the upload ([`Progress::set_held_by_upload`]). The
    /// coordinator then takes progress reports whose counters did not move for no sign of
    /// life (`agent_timeout_seconds`): the backup server takes nothing. A dump that waits
    /// for its source (a slow database) is not held by the upload and reports `false`,
    /// as do stages measured otherwise (waiting for a slot, the commit, tools such as
    /// pgBackRest or rsync, a restore): each of their reports is a sign of life.
    pub fn streaming(&self) -> bool {
        self.inner.streaming.load(Ordering::Relaxed)
            && self.inner.held_by_upload.load(Ordering::Relaxed)
            && self.inner.read.load(Ordering::Relaxed) > 0
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
