//! A watchdog over one SSH connection's TCP socket: when a call on the connection makes
//! no progress for the I/O timeout, it shuts the socket down (`shutdown(2)`, both
//! directions), which makes the blocked libssh2 call return at once with an error, and
//! every later call on that connection fail at once.
//!
//! libssh2's own session timeout does not bound every blocking call: a stalled server
//! (its session processes stopped, a disk that hangs) kept an upload waiting far beyond
//! `io_timeout_seconds`, and then each clean-up call (closing the file, the channel) waited
//! a full timeout of its own (issue 15). The watchdog does not depend on what libssh2
//! does inside a call: it only sees when a call started, when it last moved bytes, and
//! when it ended.
//!
//! The transport marks the spans in which it waits for the server with [`Watchdog::busy`],
//! the spans in between in which it waits for the rest of the pipeline (the next chunk of
//! a dump, a slow restore tool) with [`Watchdog::idle`], and each piece of progress inside
//! a busy span (bytes written or read) with [`Watchdog::progress`].

use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The watchdog of one connection; stops its thread on drop.
pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    socket: TcpStream,
    addr: String,
    state: Mutex<State>,
    wake: Condvar,
}

struct State {
    /// Open busy spans.
    busy: u32,
    /// Open idle spans (inside busy ones): while any is open, nothing is timed.
    idle: u32,
    /// The last progress, or the start or end of a span.
    since: Instant,
    /// How long a busy span may go without progress.
    limit: Duration,
    /// The limit that was exceeded, once the socket was shut down for a stall.
    fired: Option<Duration>,
    /// The socket was shut down because the job was cancelled ([`Aborter::abort`]).
    aborted: bool,
    stop: bool,
}

impl State {
    fn watching(&self) -> bool {
        self.busy > 0 && self.idle == 0
    }
}

/// An open busy or idle span; closes it on drop.
#[must_use = "the span ends when the guard is dropped"]
pub struct Span {
    shared: Arc<Shared>,
    busy: bool,
}

impl Drop for Span {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if self.busy {
            st.busy = st.busy.saturating_sub(1);
        } else {
            st.idle = st.idle.saturating_sub(1);
        }
        st.since = Instant::now();
        drop(st);
        self.shared.wake.notify_one();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shut(&self, st: &mut State, limit: Duration) {
        if st.fired.is_none() && !st.aborted {
            st.fired = Some(limit);
            let _ = self.socket.shutdown(Shutdown::Both);
        }
    }
}

/// Shuts a watched connection down from another thread, e.g. when the job using it is
/// cancelled while a call on it waits for a stalled server.
#[derive(Clone)]
pub struct Aborter(Arc<Shared>);

impl Aborter {
    /// Shuts the socket down now (unless the watchdog already did): the blocked call and
    /// every later one fail at once.
    pub fn abort(&self) {
        let mut st = self.0.lock();
        if st.fired.is_none() && !st.aborted {
            st.aborted = true;
            let _ = self.0.socket.shutdown(Shutdown::Both);
        }
    }
}

impl Watchdog {
    /// Starts watching `socket` (a handle on the connection's socket, e.g. from
    /// [`TcpStream::try_clone`]) of the server at `addr` (`host:port`, for the log) with
    /// `limit`: a busy span without progress for that long shuts the socket down.
    ///
    /// # Errors
    /// The thread could not be started.
    pub fn start(socket: TcpStream, addr: &str, limit: Duration) -> std::io::Result<Watchdog> {
        let shared = Arc::new(Shared {
            socket,
            addr: addr.to_owned(),
            state: Mutex::new(State {
                busy: 0,
                idle: 0,
                since: Instant::now(),
                limit,
                fired: None,
                aborted: false,
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let watched = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-ssh-watchdog".into())
            .spawn(move || watch(&watched))?;
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    /// Opens a span in which the transport waits for the server: it must make progress
    /// at least once every limit.
    pub fn busy(&self) -> Span {
        let mut st = self.shared.lock();
        st.busy += 1;
        st.since = Instant::now();
        drop(st);
        self.shared.wake.notify_one();
        Span {
            shared: self.shared.clone(),
            busy: true,
        }
    }

    /// Opens a span in which the transport waits for something else than the server (the
    /// pipeline's next chunk, a reader that has not taken the last one): not timed.
    pub fn idle(&self) -> Span {
        let mut st = self.shared.lock();
        st.idle += 1;
        drop(st);
        self.shared.wake.notify_one();
        Span {
            shared: self.shared.clone(),
            busy: false,
        }
    }

    /// Records progress (bytes moved) in the current busy span.
    pub fn progress(&self) {
        self.shared.lock().since = Instant::now();
    }

    /// The limit that was exceeded, if the watchdog shut the socket down.
    pub fn fired(&self) -> Option<Duration> {
        self.shared.lock().fired
    }

    /// Whether the connection was shut down by an [`Aborter`].
    pub fn aborted(&self) -> bool {
        self.shared.lock().aborted
    }

    /// A handle that shuts the connection down from another thread.
    pub fn aborter(&self) -> Aborter {
        Aborter(self.shared.clone())
    }

    /// Shuts the socket down now (the connection is known to be broken, e.g. libssh2
    /// timed out on its own): later calls fail at once instead of waiting again.
    pub fn shut_down(&self) {
        let mut st = self.shared.lock();
        let limit = st.limit;
        self.shared.shut(&mut st, limit);
    }

    /// For closing the connection: from now on everything is timed (a busy span that
    /// lasts until the watchdog is dropped) with at most `limit`.
    pub fn closing(&self, limit: Duration) {
        let mut st = self.shared.lock();
        st.busy += 1;
        st.idle = 0;
        st.limit = st.limit.min(limit);
        st.since = Instant::now();
        drop(st);
        self.shared.wake.notify_one();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(shared: &Shared) {
    let mut st = shared.lock();
    loop {
        if st.stop {
            return;
        }
        if st.fired.is_some() || st.aborted || !st.watching() {
            st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            continue;
        }
        let deadline = st.since + st.limit;
        let now = Instant::now();
        if now >= deadline {
            let limit = st.limit;
            shared.shut(&mut st, limit);
            tracing::warn!(
                server = %shared.addr,
                timeout_seconds = limit.as_secs(),
                "The backup server made no progress for the I/O timeout; closing the connection."
            );
            continue;
        }
        st = shared
            .wake
            .wait_timeout(st, deadline - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    /// A connection to a local listener that accepts and never sends: (client, server).
    fn silent_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn a_blocked_read_returns_once_the_limit_passes_without_progress() {
        let (mut client, _server) = silent_pair();
        let dog = Watchdog::start(
            client.try_clone().unwrap(),
            "test",
            Duration::from_millis(300),
        )
        .unwrap();
        let started = Instant::now();
        let span = dog.busy();
        let mut buf = [0u8; 16];
        // Blocks until the watchdog shuts the socket down: then reads end of stream.
        let n = client.read(&mut buf).unwrap_or(0);
        drop(span);
        assert_eq!(n, 0);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        assert_eq!(dog.fired(), Some(Duration::from_millis(300)));
    }

    #[test]
    fn progress_and_idle_spans_are_not_stalls() {
        let (client, _server) = silent_pair();
        let dog = Watchdog::start(
            client.try_clone().unwrap(),
            "test",
            Duration::from_millis(300),
        )
        .unwrap();
        let busy = dog.busy();
        for _ in 0..6 {
            std::thread::sleep(Duration::from_millis(100));
            dog.progress();
        }
        {
            let _idle = dog.idle();
            std::thread::sleep(Duration::from_millis(600));
        }
        std::thread::sleep(Duration::from_millis(100));
        drop(busy);
        // Outside any busy span: not timed either.
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(dog.fired(), None);
    }
}
