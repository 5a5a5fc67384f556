//! Compression stage, both directions: zstd (RFC 8878), in the stage's own thread.
//! Backup wraps a writer, restore wraps a reader.

use std::io::{self, Read, Write};

/// The suffix in stored file names for this compression.
pub const EXTENSION: &str = "zst";

/// zstd level used for backups: 3, zstd's default, the best speed/size trade-off measured
/// here.
pub const LEVEL: i32 = 3;

/// A zstd encoder writing compressed bytes into `inner`; call [`Compressor::finish`].
///
/// It compresses in the caller's thread (zstd's `nbWorkers` = 0), whatever the host's
/// cores, so its memory is bounded and the same on every host: one context (a 2 MiB
/// window at level 3, its tables and 128 KiB blocks). zstd's multithreaded encoder with
/// 1 MiB jobs held 5.9 MiB more with 1 worker and 11.6 MiB more with 2 (the agent's peak
/// RSS in `bench/` s3-upload, 3 parts in flight), one more job's input and output for each
/// further worker (a 16-core host had 4), and stores about 3 % more on text (each job
/// starts without its predecessor's history: 92,783,430 against 90,116,809 bytes for a
/// 267 MB tar of `/usr/share/doc` and `/usr/lib/python3`, zstd 1.5.4's CLI). One thread
/// at level 3 compresses that tar at 370 MB/s and random data at 1.7 GB/s here (2 workers:
/// 470 MB/s), above what a target takes (S3 here 50 to 100 MB/s, SFTP about 120 MB/s).
pub struct Compressor<W: Write>(zstd::stream::write::Encoder<'static, W>);

impl<W: Write> Compressor<W> {
    /// Wraps `inner` with a level-[`LEVEL`] encoder that writes a content checksum, so
    /// `zstd -d` detects corruption on its own.
    ///
    /// # Errors
    /// The encoder cannot be set up (out of memory).
    pub fn new(inner: W) -> io::Result<Self> {
        let mut enc = zstd::stream::write::Encoder::new(inner, LEVEL)?;
        enc.include_checksum(true)?;
        Ok(Self(enc))
    }

    /// Flushes the last frame and returns the inner writer.
    ///
    /// # Errors
    /// From the inner writer.
    pub fn finish(self) -> io::Result<W> {
        self.0.finish()
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
    fn round_trip() {
        let data: Vec<u8> = (0..3_000_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let mut c = Compressor::new(Vec::new()).unwrap();
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
