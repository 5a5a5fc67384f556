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

/// What a [`HashingReader`] and its [`DigestHandle`] share: the reader, the hash and the
/// count of bytes read so far.
struct Shared<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

/// A reader that hashes and counts what is read from `inner`.
pub struct HashingReader<R> {
    state: Arc<Mutex<Shared<R>>>,
}

/// The digest of a [`HashingReader`] that was moved into another stage (a decryptor):
/// its hash so far, or, after that stage failed half-way, the hash of the whole input
/// ([`DigestHandle::drain`]).
pub struct DigestHandle<R>(Arc<Mutex<Shared<R>>>);

impl<R: Read> DigestHandle<R> {
    /// The SHA-256 (lowercase hex) and byte count of what was read so far.
    pub fn finish(self) -> (String, u64) {
        let state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        (hex::encode(state.hasher.clone().finalize()), state.bytes)
    }

    /// Reads the rest of the input, hashing it, then [`DigestHandle::finish`]: the
    /// digest of the whole input even when the stage reading it stopped early.
    ///
    /// # Errors
    /// Reading the rest of the input failed.
    pub fn drain(self) -> io::Result<(String, u64)> {
        let mut rest = HashingReader {
            state: self.0.clone(),
        };
        io::copy(&mut rest, &mut io::sink())?;
        Ok(self.finish())
    }
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            state: Arc::new(Mutex::new(Shared {
                inner,
                hasher: Sha256::new(),
                bytes: 0,
            })),
        }
    }

    /// Wraps `inner`, with a handle that gives the digest once the reader has been
    /// consumed by another stage.
    pub fn shared(inner: R) -> (Self, DigestHandle<R>) {
        let r = Self::new(inner);
        let handle = DigestHandle(r.state.clone());
        (r, handle)
    }

    /// Reads to the end and returns the SHA-256 (lowercase hex) and byte count.
    ///
    /// # Errors
    /// Reading `inner` failed.
    pub fn finish(self) -> io::Result<(String, u64)> {
        DigestHandle(self.state).drain()
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let n = state.inner.read(buf)?;
        state.hasher.update(&buf[..n]);
        state.bytes += n as u64;
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
        // A stage that stops after one byte: the handle still hashes the whole input.
        let (mut r, digest) = HashingReader::shared(&b"abc"[..]);
        let mut one = [0u8; 1];
        r.read_exact(&mut one).unwrap();
        drop(r);
        assert_eq!(digest.drain().unwrap(), (hex, 3));
    }
}
