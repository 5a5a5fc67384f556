//! Compression stage, both directions: zstd (RFC 8878), in the stage's thread or with
//! workers from the agent's [`WorkerPool`] (`compression_workers`, shared by its backups).
//! Backup wraps a writer, restore wraps a reader.

use std::io::{self, Read, Write};

/// The suffix in stored file names for this compression.
pub const EXTENSION: &str = "zst";

/// zstd level used for backups unless the config says otherwise (`compression_level`): 3,
/// zstd's default, the best speed/size trade-off measured here.
pub const LEVEL: i32 = 3;

/// The fastest level a config may ask for: zstd's level 1 (its negative levels store much
/// more for little time saved on the dumps measured in `bench/`).
pub const MIN_LEVEL: i32 = 1;

/// The highest level a config may ask for. Each level up costs CPU and memory: one
/// encoder's tables, measured as zstd 1.5's CLI peak RSS less its level-1 figure on a
/// `pg_dump` of `bench/` pg-pipeline's table, are about 2 MiB at level 3, 4.5 at 5 and 6,
/// 7.5 at 7 and 8, 15 at 9, and the agent holds one per backup compressing in its stages
/// thread and one per worker. The agent's bound of 64 MiB with `max_concurrent_jobs` jobs
/// at once is measured at the default level: at 9, four backups at once and two workers
/// need about 75 MiB more. Above 9 the tables pass 30 MiB per encoder and the window a
/// restore's decoder holds grows past 4 MiB.
pub const MAX_LEVEL: i32 = 9;

/// The most [`Compressor::new`] workers a config may ask for.
pub const MAX_WORKERS: u32 = 4;

/// Bytes of input per job of the multithreaded encoder: 1 MiB instead of zstd's default
/// (4 × the 2 MiB window at level 3, 8 MiB), because every worker holds its job's input
/// and output. Measured with `bench/` (`mongo-dump`): the agent's peak RSS drops from
/// 105 to 57 MiB, the stored size grows by under 1 %.
const JOB_BYTES: u32 = 1024 * 1024;

/// The agent's zstd worker threads, shared by the backups running at once:
/// `compression_workers` bounds their sum, not each backup's, so the memory they hold
/// (about 6 MiB a worker, [`Compressor::new`]) does not grow with `max_concurrent_jobs`. A
/// backup takes what is free when it starts ([`WorkerPool::take`]), at most the pool's
/// size; the others compress in their stages thread. Cheap to clone (one pool).
#[derive(Clone, Debug, Default)]
pub struct WorkerPool {
    free: std::sync::Arc<std::sync::Mutex<u32>>,
}

impl WorkerPool {
    /// A pool of `size` workers, all free.
    pub fn new(size: u32) -> Self {
        Self {
            free: std::sync::Arc::new(std::sync::Mutex::new(size)),
        }
    }

    /// Takes every free worker (0 when others' backups hold them all); they return to the
    /// pool when the [`Workers`] are dropped.
    pub fn take(&self) -> Workers {
        let mut free = self
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = *free;
        *free = 0;
        Workers {
            pool: self.clone(),
            n,
        }
    }
}

/// Workers taken from a [`WorkerPool`] for one backup's [`Compressor`].
#[derive(Debug)]
pub struct Workers {
    pool: WorkerPool,
    n: u32,
}

impl Workers {
    /// How many were taken.
    pub fn count(&self) -> u32 {
        self.n
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        let mut free = self
            .pool
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *free += self.n;
    }
}

/// A zstd encoder writing compressed bytes into `inner`; call [`Compressor::finish`].
/// Holds its [`Workers`] until dropped.
pub struct Compressor<W: Write>(zstd::stream::write::Encoder<'static, W>, Option<Workers>);

impl<W: Write> Compressor<W> {
    /// Wraps `inner` with an encoder at zstd `level` ([`MIN_LEVEL`] to [`MAX_LEVEL`], the
    /// config's `compression_level`, default [`LEVEL`]) that writes a content checksum, so
    /// `zstd -d` detects corruption on its own. `workers` (0 to [`MAX_WORKERS`]) threads
    /// compress beside the caller, in jobs of 1 MiB; with 0 the caller's thread compresses.
    ///
    /// Memory, the agent's peak RSS in `bench/` s3-upload (3 parts in flight): 1 worker
    /// 5.9 MiB more than 0, 2 workers 11.6 MiB more; each further one holds one more
    /// job's input and output and its context. Speed and size, zstd 1.5.4's CLI at level 3
    /// on a 267 MB tar of `/usr/share/doc` and `/usr/lib/python3`: 0 workers 370 MB/s and
    /// 90,116,809 bytes (jobs start without their predecessor's history), 2 workers
    /// 470 MB/s and 92,783,434 bytes; random data 1.7 GB/s with 0.
    ///
    /// # Errors
    /// The encoder cannot be set up (out of memory, a level zstd refuses).
    pub fn new(inner: W, level: i32, workers: u32) -> io::Result<Self> {
        let mut enc = zstd::stream::write::Encoder::new(inner, level)?;
        enc.include_checksum(true)?;
        if workers > 0 {
            enc.multithread(workers.min(MAX_WORKERS))?;
            enc.set_parameter(zstd::stream::raw::CParameter::JobSize(JOB_BYTES))?;
        }
        Ok(Self(enc, None))
    }

    /// [`Compressor::new`] with the workers taken from the agent's pool, which return to
    /// it when this compressor is finished or dropped.
    ///
    /// # Errors
    /// As [`Compressor::new`].
    pub fn with_workers(inner: W, level: i32, workers: Workers) -> io::Result<Self> {
        let mut c = Self::new(inner, level, workers.count())?;
        c.1 = Some(workers);
        Ok(c)
    }

    /// Flushes the last frame and returns the inner writer.
    ///
    /// # Errors
    /// From the inner writer.
    pub fn finish(self) -> io::Result<W> {
        let Self(enc, workers) = self;
        let inner = enc.finish();
        drop(workers);
        inner
    }
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// A zstd decoder reading from `inner`.
pub fn decompressor<R: Read>(inner: R) -> io::Result<impl Read> {
    zstd::stream::read::Decoder::new(inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_bounds_the_workers_of_backups_at_once() {
        let pool = WorkerPool::new(2);
        let first = pool.take();
        let second = pool.take();
        assert_eq!((first.count(), second.count()), (2, 0));
        drop(first);
        let third = pool.take();
        assert_eq!(third.count(), 2, "returned when the first backup ended");
        let mut out = Vec::new();
        let c = Compressor::with_workers(&mut out, LEVEL, third).unwrap();
        assert_eq!(pool.take().count(), 0, "held by the compressor");
        c.finish().unwrap();
        assert_eq!(pool.take().count(), 2, "returned at finish");
    }

    #[test]
    fn round_trip() {
        let data: Vec<u8> = (0..3_000_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let mut c = Compressor::new(Vec::new(), LEVEL, 2).unwrap();
        c.write_all(&data).unwrap();
        let packed = c.finish().unwrap();
        assert!(packed.len() < data.len() / 4);
        let mut out = Vec::new();
        decompressor(&packed[..])
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);
    }
}
