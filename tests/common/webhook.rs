//! A webhook receiver for notification tests: a plain HTTP/1.1 server on a loopback port,
//! written here from RFC 9112 (request line, headers, a `Content-Length` body; every reply
//! `Connection: close`), that records every request and answers the first `fail_first`
//! with `500`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request received.
#[derive(Clone, Debug)]
pub struct Received {
    /// The request target, e.g. `/hook`.
    pub path: String,
    /// Header names (lower case) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body as text.
    pub body: String,
    /// The status answered.
    pub status: u16,
}

impl Received {
    /// The body as JSON (panics if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    /// The value of header `name` (lower case), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The receiver; it runs until the test process ends.
pub struct Webhook {
    port: u16,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Webhook {
    /// Starts a receiver that answers the first `fail_first` requests with 500, the others
    /// with 200.
    pub fn start(fail_first: usize) -> Webhook {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let (log, count) = (received.clone(), Arc::new(AtomicUsize::new(0)));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let Some(mut r) = read_request(&mut conn) else {
                    continue;
                };
                r.status = if count.fetch_add(1, Ordering::SeqCst) < fail_first {
                    500
                } else {
                    200
                };
                let reason = if r.status == 200 {
                    "OK"
                } else {
                    "Internal Server Error"
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    r.status
                );
                log.lock().unwrap().push(r);
            }
        });
        Webhook { port, received }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits (up to `timeout`) for a request with a 200 answer whose body contains
    /// `needle`; panics naming what came instead.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Received {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self
                .received()
                .into_iter()
                .find(|r| r.status == 200 && r.body.contains(needle))
            {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no request with {needle:?} in {timeout:?}: {:#?}",
                self.received()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn read_request(conn: &mut std::net::TcpStream) -> Option<Received> {
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (name, value) = h.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Received {
        path,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        status: 0,
    })
}
