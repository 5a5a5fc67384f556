//! Hashing stage, both directions: SHA-256 (FIPS 180-4) of the stored bytes, as written
//! in the manifest, and a byte count.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

/// A writer that hashes and counts what passes through to `inner`.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// The inner writer, the lower-case hex SHA-256 and the byte count.
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, hex::encode(self.hasher.finalize()), self.bytes)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts what is read from `inner`.
pub struct HashingReader<R> {
    inner: R,
    state: Arc<Mutex<(Sha256, u64)>>,
}

/// The digest of a [`HashingReader`] that was moved into a chain of readers.
pub struct DigestHandle(Arc<Mutex<(Sha256, u64)>>);

impl DigestHandle {
    /// The lower-case hex SHA-256 and byte count of what was read so far.
    pub fn finish(self) -> (String, u64) {
        let state = self.0.lock().expect("digest lock");
        (hex::encode(state.0.clone().finalize()), state.1)
    }
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            state: Arc::new(Mutex::new((Sha256::new(), 0))),
        }
    }

    /// Wraps `inner` and returns a handle that gives the digest after the reader has been
    /// consumed by other stages (decryption, decompression).
    pub fn shared(inner: R) -> (Self, DigestHandle) {
        let r = Self::new(inner);
        let handle = DigestHandle(r.state.clone());
        (r, handle)
    }

    /// Reads `inner` to its end, then returns the lower-case hex SHA-256 and byte count of
    /// everything read through this reader.
    ///
    /// # Errors
    /// From `inner`.
    pub fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(DigestHandle(self.state).finish())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut state = self.state.lock().expect("digest lock");
        state.0.update(&buf[..n]);
        state.1 += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"abc").unwrap();
        let (_, hex, n) = w.finish();
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(n, 3);
        let r = HashingReader::new(&b"abc"[..]);
        assert_eq!(r.finish().unwrap().0, hex);
    }
}
