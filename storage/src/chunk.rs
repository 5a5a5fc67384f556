//! The hand-off between the pipeline's thread and a session's thread: a bounded channel
//! of byte chunks of [`CHUNK_BYTES`] (written) or [`READ_CHUNK_BYTES`] (read back). Its bound is what gives back-pressure and keeps
//! memory constant: at most `CHANNEL_CHUNKS + 2` chunks exist at once.
//!
//! Chunk buffers are reused: the receiving thread gives a consumed chunk back with
//! [`recycle`] and the sending thread takes one with [`buffer`]. Without that, every chunk
//! is allocated on one thread and freed on another, and glibc's per-thread arenas keep the
//! freed memory out of reach of the allocating thread: the agent's peak RSS grew by about
//! 10 MiB in the 1 GiB MongoDB dump of `bench/` (`mongo-dump`).

use std::sync::Mutex;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

/// Size of one chunk written (a backup's upload), bytes. 512 KiB: SFTP writes of a few
/// KiB are slow (ssh2-rs#206), 64 KiB and up are not; four backups at once held twelve
/// 1 MiB chunks at their peak (heaptrack over bench/ concurrent-jobs), 12.6 MiB of the
/// 64 MiB bound.
pub const CHUNK_BYTES: usize = 512 * 1024;

/// Size of one chunk read back (a download, and the hand-off to a restore tool), bytes.
/// Smaller than [`CHUNK_BYTES`] because restores run several at once on a staging agent
/// (issue 20's bound: 64 MiB with four jobs; heaptrack over `bench/` concurrent-jobs put
/// 14.7 MiB of its restore peak in 1 MiB download chunks), and because libssh2 reads
/// ahead four times what one read asks for (`sftp_read`, libssh2 1.11): 256 KiB reads
/// keep 1 MiB in flight per download, enough for a backup server on the same network
/// (1 MiB per round trip: 100 MB/s at 10 ms).
pub const READ_CHUNK_BYTES: usize = 256 * 1024;

/// Chunks in flight between the two threads: 2, so at most four chunks exist. The
/// agent's peak RSS in `bench/` s3-upload (3 parts in flight) was 1.9 MiB lower than with
/// 4; 1 saved 0.9 MiB more, at a throughput not measured.
pub const CHANNEL_CHUNKS: usize = 2;

/// Spare buffers kept for reuse, at most [`SPARE_BUFFERS`] of each size.
static SPARE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
static SPARE_READ: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// The most spare buffers kept of each size (8 MiB and 4 MiB at most: jobs running at
/// once share them).
const SPARE_BUFFERS: usize = 16;

/// An empty buffer with room for at least [`CHUNK_BYTES`]: a recycled one if there is one.
pub fn buffer() -> Vec<u8> {
    take(&SPARE, CHUNK_BYTES)
}

/// An empty buffer with room for [`READ_CHUNK_BYTES`] (and less than [`CHUNK_BYTES`]): a
/// recycled one if there is one.
pub fn read_buffer() -> Vec<u8> {
    take(&SPARE_READ, READ_CHUNK_BYTES)
}

/// A spare buffer of `spare`, or a new one with room for `bytes`.
fn take(spare: &Mutex<Vec<Vec<u8>>>, bytes: usize) -> Vec<u8> {
    spare
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop()
        .unwrap_or_else(|| Vec::with_capacity(bytes))
}

/// Gives back a buffer that is no longer needed, for [`buffer`] or [`read_buffer`] to hand
/// out again: kept if its capacity is from [`CHUNK_BYTES`] to 4 × that (for [`buffer`]) or
/// from [`READ_CHUNK_BYTES`] to less than [`CHUNK_BYTES`] (for [`read_buffer`]), and fewer
/// than `SPARE_BUFFERS` of its size are kept; otherwise freed.
pub fn recycle(mut buf: Vec<u8>) {
    let spare = match buf.capacity() {
        c if (CHUNK_BYTES..=4 * CHUNK_BYTES).contains(&c) => &SPARE,
        c if (READ_CHUNK_BYTES..CHUNK_BYTES).contains(&c) => &SPARE_READ,
        _ => return,
    };
    buf.clear();
    let mut spare = spare.lock().unwrap_or_else(|e| e.into_inner());
    if spare.len() < SPARE_BUFFERS {
        spare.push(buf);
    }
}

/// A bounded chunk channel of [`CHANNEL_CHUNKS`].
pub fn channel() -> (SyncSender<Vec<u8>>, Receiver<Vec<u8>>) {
    sync_channel(CHANNEL_CHUNKS)
}
