//! The bytes `ssh-transport` moves: [`PATTERN_BYTES`] of pseudo-random bytes repeated, the
//! same in every run and every process. Shared with its russh client (`bench/russh`, which
//! includes this file), so it uses the standard library only.

/// The size of the pieces uploaded, bytes: Ferry's chunk (`ferry_storage::chunk::CHUNK_BYTES`,
/// checked by the benchmark).
pub const PIECE_BYTES: usize = 512 * 1024;

/// The random bytes repeated, a multiple of [`PIECE_BYTES`]: 64 MiB, far beyond any
/// compressor's window (and SSH's compression is off).
pub const PATTERN_BYTES: usize = 128 * PIECE_BYTES;

/// `total` bytes of data.
pub struct Data {
    pattern: Vec<u8>,
    total: u64,
}

impl Data {
    /// Generates the pattern (xorshift64*, as `ferry_bench::Xorshift`, with a fixed seed).
    pub fn new(total: u64) -> Data {
        let mut x: u64 = 0x5eed_f0e1_9e37_79b9;
        let mut pattern = Vec::with_capacity(PATTERN_BYTES);
        while pattern.len() < PATTERN_BYTES {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            pattern.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        Data { pattern, total }
    }

    /// Its size, bytes.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The data in pieces of [`PIECE_BYTES`] (the last one may be shorter).
    pub fn pieces(&self) -> impl Iterator<Item = &[u8]> + '_ {
        (0..self.total).step_by(PIECE_BYTES).map(move |at| {
            let n = (self.total - at).min(PIECE_BYTES as u64) as usize;
            let p = (at % PATTERN_BYTES as u64) as usize;
            &self.pattern[p..p + n]
        })
    }

    /// A checker of a download, from the first byte.
    pub fn verifier(&self) -> Verifier<'_> {
        Verifier { data: self, at: 0 }
    }
}

/// A download that is not the data.
fn invalid(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message)
}

/// Compares downloaded bytes, in order, with the data.
pub struct Verifier<'a> {
    data: &'a Data,
    at: u64,
}

impl Verifier<'_> {
    /// Checks the next bytes of the download.
    ///
    /// # Errors
    /// `InvalidData`: they differ from the data, or go past its end (where, in words).
    pub fn feed(&mut self, mut got: &[u8]) -> std::io::Result<()> {
        if self.at + got.len() as u64 > self.data.total {
            return Err(invalid(format!(
                "the download is longer than the {} bytes uploaded",
                self.data.total
            )));
        }
        while !got.is_empty() {
            let p = (self.at % PATTERN_BYTES as u64) as usize;
            let n = got.len().min(PATTERN_BYTES - p);
            if got[..n] != self.data.pattern[p..p + n] {
                return Err(invalid(format!(
                    "the download differs from the upload in bytes {}..{}",
                    self.at,
                    self.at + n as u64
                )));
            }
            self.at += n as u64;
            got = &got[n..];
        }
        Ok(())
    }

    /// Checks that the whole data came; its size.
    ///
    /// # Errors
    /// `InvalidData`: the download ended early.
    pub fn finish(self) -> std::io::Result<u64> {
        if self.at != self.data.total {
            return Err(invalid(format!(
                "the download ended after {} of {} bytes",
                self.at, self.data.total
            )));
        }
        Ok(self.at)
    }
}
