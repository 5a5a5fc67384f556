//! The S3 read session: list, size, small reads and streamed reads of the current version
//! of a key or of the version a manifest names (`ListObjectsV2`, `HeadObject`, `GetObject`
//! with `versionId`). The maintain session reads through it too.

use std::sync::mpsc::SyncSender;

use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

use super::Conn;
use crate::chunk::READ_CHUNK_BYTES;
use crate::{ReadSession, TargetError};

/// The read session of an [`super::S3Target`].
pub struct S3Read {
    conn: Conn,
}

impl S3Read {
    pub(crate) fn new(conn: Conn) -> S3Read {
        S3Read { conn }
    }

    /// The objects and folders directly under the key prefix `prefix` (ending in `/`):
    /// `(name, size, last modified)` of each object, and each folder's name.
    #[allow(clippy::type_complexity)]
    pub(super) fn list_dir(
        &self,
        prefix: &str,
    ) -> Result<(Vec<(String, u64, Option<u64>)>, Vec<String>), TargetError> {
        let (mut objects, mut folders) = (Vec::new(), Vec::new());
        let mut token: Option<String> = None;
        loop {
            let page = self.conn.call(
                "list",
                prefix,
                self.conn
                    .client
                    .list_objects_v2()
                    .bucket(&self.conn.config.bucket)
                    .prefix(prefix)
                    .delimiter("/")
                    .set_continuation_token(token.clone())
                    .send(),
            )?;
            for o in page.contents() {
                if let Some(name) = o.key().and_then(|k| k.strip_prefix(prefix)) {
                    objects.push((
                        name.to_owned(),
                        o.size().unwrap_or(0).max(0) as u64,
                        o.last_modified().map(|t| t.secs().max(0) as u64),
                    ));
                }
            }
            for p in page.common_prefixes() {
                if let Some(name) = p.prefix().and_then(|k| k.strip_prefix(prefix)) {
                    folders.push(name.trim_end_matches('/').to_owned());
                }
            }
            token = self.conn.next_page(
                "list",
                prefix,
                page.is_truncated(),
                page.next_continuation_token(),
            )?;
            if token.is_none() {
                return Ok((objects, folders));
            }
        }
    }

    /// `GetObject` of `version_id` of `path` (its current version without one).
    fn get(
        &self,
        path: &str,
        version_id: Option<&str>,
    ) -> Result<aws_sdk_s3::operation::get_object::GetObjectOutput, TargetError> {
        self.conn.call(
            "get object",
            path,
            self.conn
                .client
                .get_object()
                .bucket(&self.conn.config.bucket)
                .key(Conn::key(path))
                .set_version_id(version_id.map(str::to_owned))
                .send(),
        )
    }

    /// The next piece of `body`, `None` at its end.
    ///
    /// # Errors
    /// [`TargetError`] cancelled when the session's cancel fires while waiting; I/O naming
    /// `path` when the stream fails.
    fn next_piece(&self, body: &mut ByteStream, path: &str) -> Result<Option<Bytes>, TargetError> {
        let cancel = self.conn.cancel.clone();
        let next = super::runtime().block_on(async {
            tokio::select! {
                _ = cancel.cancelled() => None,
                n = body.try_next() => Some(n),
            }
        });
        match next {
            None => Err(self.conn.cancelled("read", path)),
            Some(Ok(piece)) => Ok(piece),
            Some(Err(e)) => Err(TargetError::Io {
                addr: self.conn.addr.clone(),
                op: "read",
                path: path.to_owned(),
                message: e.to_string(),
            }),
        }
    }
}

impl ReadSession for S3Read {
    fn list(&mut self, dir: &str) -> Result<Vec<String>, TargetError> {
        let prefix = format!("{}/", Conn::key(dir).trim_end_matches('/'));
        let (objects, folders) = self.list_dir(&prefix)?;
        Ok(objects
            .into_iter()
            .map(|(n, _, _)| n)
            .chain(folders)
            .collect())
    }

    fn size(&mut self, path: &str) -> Result<Option<u64>, TargetError> {
        self.size_version(path, None)
    }

    fn read_small(&mut self, path: &str, max: u64) -> Result<Vec<u8>, TargetError> {
        let out = self.get(path, None)?;
        let too_large = |size| TargetError::TooLarge {
            addr: self.conn.addr.clone(),
            path: path.to_owned(),
            size,
            max,
        };
        let size = out.content_length().unwrap_or(0).max(0) as u64;
        if size > max {
            return Err(too_large(size));
        }
        let mut body = out.body;
        let mut data = Vec::with_capacity(size as usize);
        while let Some(bytes) = self.next_piece(&mut body, path)? {
            data.extend_from_slice(&bytes);
            if data.len() as u64 > max {
                return Err(too_large(data.len() as u64));
            }
        }
        Ok(data)
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
    /// in chunks of [`READ_CHUNK_BYTES`].
    fn download_version(
        &mut self,
        path: &str,
        version_id: Option<&str>,
        chunks: SyncSender<Vec<u8>>,
    ) -> Result<u64, TargetError> {
        let mut body = self.get(path, version_id)?.body;
        if let Some(v) = version_id {
            tracing::debug!(path, version = v, "Reading the version a manifest names.");
        }
        let mut total = 0u64;
        let mut buf = crate::chunk::read_buffer();
        while let Some(bytes) = self.next_piece(&mut body, path)? {
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let take = (READ_CHUNK_BYTES - buf.len()).min(rest.len());
                buf.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                total += take as u64;
                if buf.len() == READ_CHUNK_BYTES {
                    let full = std::mem::replace(&mut buf, crate::chunk::read_buffer());
                    if chunks.send(full).is_err() {
                        return Ok(total);
                    }
                }
            }
        }
        if !buf.is_empty() {
            // A receiver that hung up wanted no more: Ok either way.
            let _ = chunks.send(buf);
        }
        Ok(total)
    }
}
