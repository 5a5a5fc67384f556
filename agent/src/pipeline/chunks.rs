//! The pipeline's ends of the chunk channel ([`ferry_storage::chunk`], which gives its
//! bound and buffer pool): [`ChunkWriter`] cuts the stages' output into chunks for a
//! storage session's upload, [`ChunkReader`] reads the chunks a session downloads.

use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

pub use ferry_storage::chunk::{
    CHANNEL_CHUNKS, CHUNK_BYTES, READ_CHUNK_BYTES, buffer, channel, read_buffer, recycle,
};

use crate::job::Progress;

/// Collects writes into [`CHUNK_BYTES`] chunks and sends them; blocks while the channel
/// is full. Fails with `BrokenPipe` once the receiver is gone (the transport failed), and
/// with `Other("job cancelled")` once the job is cancelled.
pub struct ChunkWriter {
    buf: Vec<u8>,
    tx: Option<SyncSender<Vec<u8>>>,
    progress: Progress,
}

impl ChunkWriter {
    /// Writes into `tx`, counting written bytes in `progress`.
    pub fn new(tx: SyncSender<Vec<u8>>, progress: Progress) -> Self {
        Self {
            buf: buffer(),
            tx: Some(tx),
            progress,
        }
    }

    fn send(&mut self) -> io::Result<()> {
        self.progress.check_cancelled()?;
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, buffer());
        let n = chunk.len() as u64;
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| io::Error::other("chunk writer already finished"))?;
        let stopped = || io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped");
        match tx.try_send(chunk) {
            Ok(()) => {}
            Err(TrySendError::Disconnected(_)) => return Err(stopped()),
            // The channel is full: the dump waits for the upload (see
            // `Progress::held_by_upload`) until the transport takes a chunk.
            Err(TrySendError::Full(chunk)) => {
                self.progress.set_held_by_upload(true);
                let sent = tx.send(chunk);
                self.progress.set_held_by_upload(false);
                sent.map_err(|_| stopped())?;
            }
        }
        self.progress.inner.written.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Sends the last partial chunk and closes the channel, which tells the transport
    /// that the stream is complete.
    ///
    /// # Errors
    /// As for `write`.
    pub fn finish(mut self) -> io::Result<()> {
        self.send()?;
        self.tx = None;
        Ok(())
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK_BYTES - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK_BYTES {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads the chunks a transport thread downloads; EOF when the sender closes after the
/// last chunk. A transport failure drops the sender early: the reader then sees EOF
/// too soon, and the caller must check the transport's result (the hash check also
/// catches it).
pub struct ChunkReader {
    rx: Receiver<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
    progress: Progress,
}

impl ChunkReader {
    /// Reads from `rx`, counting read bytes in `progress`.
    pub fn new(rx: Receiver<Vec<u8>>, progress: Progress) -> Self {
        Self {
            rx,
            current: Vec::new(),
            pos: 0,
            progress,
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.progress.check_cancelled()?;
        while self.pos == self.current.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.progress
                        .inner
                        .read
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    recycle(std::mem::replace(&mut self.current, chunk));
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len() - self.pos);
        out[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
    use tokio_util::sync::CancellationToken;

    #[test]
    fn a_dump_is_streaming_for_the_coordinator_only_while_the_upload_holds_it_up() {
        let progress = Progress::new(CancellationToken::new());
        progress.set_streaming(true);
        progress.inner.read.store(1, Ordering::Relaxed);
        let (tx, rx) = channel();
        let writer = {
            let progress = progress.clone();
            std::thread::spawn(move || {
                let mut w = ChunkWriter::new(tx, progress);
                for _ in 0..CHANNEL_CHUNKS + 2 {
                    w.write_all(&vec![7; CHUNK_BYTES]).unwrap();
                }
                w.finish().unwrap();
            })
        };
        // Nobody takes the chunks (a stalled server): the writer is held up once the
        // channel is full.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !progress.streaming() {
            assert!(Instant::now() < deadline, "never held up by the upload");
            std::thread::sleep(Duration::from_millis(5));
        }
        // The upload takes everything: the writer ends, no longer held up.
        let chunks: Vec<Vec<u8>> = rx.iter().collect();
        writer.join().unwrap();
        assert_eq!(chunks.len(), CHANNEL_CHUNKS + 2);
        assert!(!progress.streaming());
    }
}
