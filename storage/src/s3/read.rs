//! The S3 read session: [`super::maintain::S3Maintain`]'s list, size and small reads, and
//! its own sizes and streamed reads of the current version of a key or of the version a
//! manifest names (`HeadObject`, `GetObject` with `versionId`).

use std::sync::mpsc::SyncSender;

use super::Conn;
use super::maintain::S3Maintain;
use crate::chunk::CHUNK_BYTES;
use crate::{ReadSession, TargetError};

/// The read session of an [`super::S3Target`].
pub struct S3Read {
    conn: Conn,
    listing: S3Maintain,
}

impl S3Read {
    pub(crate) fn new(conn: Conn) -> S3Read {
        S3Read {
            listing: S3Maintain::new(conn.clone()),
            conn,
        }
    }
}

impl ReadSession for S3Read {
    fn list(&mut self, dir: &str) -> Result<Vec<String>, TargetError> {
        self.listing.list(dir)
    }

    fn size(&mut self, path: &str) -> Result<Option<u64>, TargetError> {
        self.listing.size(path)
    }

    fn read_small(&mut self, path: &str, max: u64) -> Result<Vec<u8>, TargetError> {
        self.listing.read_small(path, max)
    }

    /// `HeadObject` of `version_id` of `path` (its current version without one).
    fn size_version(
        &mut self,
        path: &str,
        version_id: Option<&str>,
    ) -> Result<Option<u64>, TargetError> {
        let r = self.conn.call(
            "head object",
            path,
            self.conn
                .client
                .head_object()
                .bucket(&self.conn.config.bucket)
                .key(Conn::key(path))
                .set_version_id(version_id.map(str::to_owned))
                .send(),
        );
        match r {
            Ok(o) => Ok(Some(o.content_length().unwrap_or(0).max(0) as u64)),
            Err(TargetError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn download(&mut self, path: &str, chunks: SyncSender<Vec<u8>>) -> Result<u64, TargetError> {
        self.download_version(path, None, chunks)
    }

    /// `GetObject` of `version_id` of `path` (its current version without one), streamed
    /// in chunks of [`CHUNK_BYTES`].
    fn download_version(
        &mut self,
        path: &str,
        version_id: Option<&str>,
        chunks: SyncSender<Vec<u8>>,
    ) -> Result<u64, TargetError> {
        let out = self.conn.call(
            "get object",
            path,
            self.conn
                .client
                .get_object()
                .bucket(&self.conn.config.bucket)
                .key(Conn::key(path))
                .set_version_id(version_id.map(str::to_owned))
                .send(),
        )?;
        if let Some(v) = version_id {
            tracing::debug!(path, version = v, "Reading the version a manifest names.");
        }
        let mut body = out.body;
        let mut total = 0u64;
        let mut buf = crate::chunk::buffer();
        loop {
            let cancel = self.conn.cancel.clone();
            let next = super::runtime().block_on(async {
                tokio::select! {
                    _ = cancel.cancelled() => None,
                    n = body.try_next() => Some(n),
                }
            });
            let bytes = match next {
                None => return Err(self.conn.cancelled("read", path)),
                Some(Ok(Some(bytes))) => bytes,
                Some(Ok(None)) => {
                    if !buf.is_empty() {
                        // A receiver that hung up wanted no more: Ok either way.
                        let _ = chunks.send(buf);
                    }
                    return Ok(total);
                }
                Some(Err(e)) => {
                    return Err(TargetError::Io {
                        addr: self.conn.addr.clone(),
                        op: "read",
                        path: path.to_owned(),
                        message: e.to_string(),
                    });
                }
            };
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let take = (CHUNK_BYTES - buf.len()).min(rest.len());
                buf.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                total += take as u64;
                if buf.len() == CHUNK_BYTES {
                    let full = std::mem::replace(&mut buf, crate::chunk::buffer());
                    if chunks.send(full).is_err() {
                        return Ok(total);
                    }
                }
            }
        }
    }
}
