//! The S3 write session: a part streamed into a multipart upload of its final key,
//! invisible until [`WriteSession::commit`] completes it.
//!
//! A staged part's [`Staged::partial`] is `<key>#<upload id>` (layout paths have no `#`).

use std::collections::VecDeque;
use std::sync::mpsc::Receiver;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use md5::{Digest, Md5};

use super::Conn;
use crate::{Aborter, PartialFate, Staged, TargetError, WriteSession};
use ferry_core::layout::StoredFile;
use ferry_core::manifest::Manifest;

/// The first parts' size, bytes (8 MiB; S3's minimum is 5 MiB but for the last part).
pub const FIRST_PART_BYTES: u64 = 8 << 20;

/// Parts of one size before the size doubles.
pub const PARTS_PER_SIZE: u64 = 1000;

/// The most parts of a multipart upload (S3's limit).
pub const MAX_PARTS: u64 = 10_000;

/// The size of part `index` (0-based) of a stream, bytes: [`FIRST_PART_BYTES`], doubled
/// every [`PARTS_PER_SIZE`] parts, up to 4 GiB (S3's maximum is 5 GiB). The first 10,000
/// parts hold about 7.8 TiB (5 TiB needs 9,250 of them); a 4 GiB stream is 512 parts of
/// 8 MiB, so memory stays `parts_in_flight` 8 MiB parts for any common backup.
pub fn part_size(index: u64) -> u64 {
    FIRST_PART_BYTES << (index / PARTS_PER_SIZE).min(9)
}

/// `<key>#<upload id>`, a staged part's [`Staged::partial`].
pub(crate) fn partial_name(key: &str, upload_id: &str) -> String {
    format!("{key}#{upload_id}")
}

/// `(key, upload id)` of a [`partial_name`].
pub(crate) fn split_partial(partial: &str) -> Option<(&str, &str)> {
    partial.rsplit_once('#')
}

/// [`super::S3Config::parts_in_flight`] when the config does not say: 3, 24 MiB of parts,
/// which keeps the agent's peak RSS under issue 17's 64 MiB (59 MiB measured) and uploads
/// to Ceph RGW here at least as fast as `tar | zstd | age | boto3`; each more part in
/// flight adds 8 MiB (see `bench/README.md`, s3-upload).
pub const DEFAULT_PARTS_IN_FLIGHT: usize = 3;

/// The most `UploadPart` requests of one upload in flight at once that a config may ask
/// for (16: 128 MiB of parts at 8 MiB each).
pub const MAX_PARTS_IN_FLIGHT: usize = 16;

/// One part sent: its number and MD5.
#[derive(Clone, Debug)]
struct SentPart {
    number: i32,
    md5: [u8; 16],
}

/// A part's upload running on the runtime, and its bytes: the buffer of a later part once
/// the upload is done and the SDK has let go of them.
struct InFlight {
    handle: tokio::task::JoinHandle<Result<(), TargetError>>,
    data: bytes::Bytes,
}

/// The parts of one multipart upload being sent: those in flight, oldest first, at most
/// `limit` of them, and a spare buffer taken back from a finished one. The next part fills
/// only while fewer than `limit` are in flight, so at most `limit` part buffers exist.
struct Parts {
    in_flight: VecDeque<InFlight>,
    limit: usize,
    spare: Option<Vec<u8>>,
    /// Part buffers allocated, for the log: `limit` when every buffer was reused.
    allocated: usize,
    /// Every part sent, in order.
    sent: Vec<SentPart>,
}

impl Parts {
    fn new(limit: usize) -> Parts {
        Parts {
            in_flight: VecDeque::with_capacity(limit),
            limit: limit.max(1),
            spare: None,
            allocated: 0,
            sent: Vec::new(),
        }
    }

    /// An empty buffer of at least `size` bytes: the spare one if it is large enough.
    fn buffer(&mut self, size: usize) -> Vec<u8> {
        match self.spare.take() {
            Some(mut buf) if buf.capacity() >= size => {
                buf.clear();
                buf
            }
            _ => {
                self.allocated += 1;
                Vec::with_capacity(size)
            }
        }
    }

    /// Cuts the uploads still in flight short (the multipart upload is aborted after).
    fn abort(&mut self) {
        for part in self.in_flight.drain(..) {
            part.handle.abort();
        }
    }
}

/// The write session of an [`super::S3Target`].
pub struct S3Write {
    conn: Conn,
    /// Multipart uploads it could not abort (the job was cancelled, the link failed).
    unremoved: Vec<String>,
    /// The multipart upload being streamed (`<key>#<upload id>`), until its stage ends:
    /// aborted if the session is dropped before (a panic on its thread).
    open: Option<String>,
    /// Set once a `HeadObject` was refused ([`WriteSession::sees_existing`]).
    blind: bool,
}

impl Drop for S3Write {
    fn drop(&mut self) {
        // Staged uploads stay: the pipeline commits them on another session, or abandons
        // them. One still streaming is never completed: aborted.
        if let Some(partial) = self.open.take() {
            let fate = self.discard(&partial);
            tracing::info!(partial, fate = %fate, "A write session dropped mid-upload.");
        }
    }
}

impl S3Write {
    pub(crate) fn new(conn: Conn) -> S3Write {
        S3Write {
            conn,
            unremoved: Vec::new(),
            open: None,
            blind: false,
        }
    }

    /// Starts part `number` of `data` on the runtime (the caller waited until fewer than
    /// `parts.limit` are in flight, [`S3Write::free_slot`]): its MD5 is sent as
    /// `Content-MD5`, which the server checks.
    fn send_part(
        &mut self,
        key: &str,
        upload_id: &str,
        number: i32,
        data: Vec<u8>,
        parts: &mut Parts,
    ) -> Result<(), TargetError> {
        let md5: [u8; 16] = Md5::digest(&data).into();
        let data = bytes::Bytes::from(data);
        let fut = self
            .conn
            .client
            .upload_part()
            .bucket(&self.conn.config.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .content_length(data.len() as i64)
            .content_md5(STANDARD.encode(md5))
            .body(ByteStream::from(data.clone()))
            .send();
        let (cancel, conn, path) = (self.conn.cancel.clone(), self.conn.clone(), key.to_owned());
        let handle = super::runtime().spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => Err(conn.cancelled("upload part", &path)),
                r = fut => r.map(|_| ()).map_err(|e| conn.err("upload part", &path, e)),
            }
        });
        parts.in_flight.push_back(InFlight { handle, data });
        parts.sent.push(SentPart { number, md5 });
        Ok(())
    }

    /// Waits for the oldest parts in flight until fewer than `parts.limit` are, before the
    /// next part fills: a part waiting whole for a slot would be one more buffer.
    /// Measured in `bench/` s3-upload with 3 in flight: 8.3 MiB less peak RSS than filling
    /// the next part meanwhile; the throughput is in `bench/README.md`.
    fn free_slot(&self, parts: &mut Parts, key: &str) -> Result<(), TargetError> {
        while parts.in_flight.len() >= parts.limit {
            self.wait_oldest(parts, key)?;
        }
        Ok(())
    }

    /// Waits for the oldest part in flight, if any, and keeps its buffer as the spare one
    /// when no one else holds it any more.
    fn wait_oldest(&self, parts: &mut Parts, key: &str) -> Result<(), TargetError> {
        let Some(InFlight { handle, data }) = parts.in_flight.pop_front() else {
            return Ok(());
        };
        let r = match super::runtime().block_on(handle) {
            Ok(r) => r,
            Err(e) => Err(TargetError::Io {
                addr: self.conn.addr.clone(),
                op: "upload part",
                path: key.to_owned(),
                message: format!("the upload task failed: {e}"),
            }),
        };
        // The task has ended, and the request with it: these are the last bytes' owner.
        if let Ok(buf) = data.try_into_mut() {
            parts.spare = Some(Vec::from(buf));
        }
        r
    }

    /// Streams `chunks` into the multipart upload, in parts of [`part_size`], up to
    /// [`super::S3Config::parts_in_flight`] of them in flight; returns the bytes sent once
    /// every part is stored and [`S3Write::check_parts`] agrees.
    fn upload_parts(
        &mut self,
        key: &str,
        upload_id: &str,
        chunks: &Receiver<Vec<u8>>,
    ) -> Result<u64, TargetError> {
        let mut index = 0u64;
        let mut parts = Parts::new(self.conn.config.parts_in_flight);
        let mut part: Vec<u8> = parts.buffer(part_size(0) as usize);
        let mut sent = 0u64;
        let result = (|| {
            while let Ok(chunk) = chunks.recv() {
                if self.conn.cancel.is_cancelled() {
                    return Err(self.conn.cancelled("upload part", key));
                }
                let mut rest = &chunk[..];
                while !rest.is_empty() {
                    let size = part_size(index) as usize;
                    let take = (size - part.len()).min(rest.len());
                    part.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    if part.len() == size {
                        if index + 1 >= MAX_PARTS {
                            return Err(TargetError::Io {
                                addr: self.conn.addr.clone(),
                                op: "upload part",
                                path: key.to_owned(),
                                message: format!(
                                    "the stream is longer than {MAX_PARTS} parts (about 7.8 TiB)"
                                ),
                            });
                        }
                        let full = std::mem::take(&mut part);
                        self.send_part(key, upload_id, (index + 1) as i32, full, &mut parts)?;
                        index += 1;
                        self.free_slot(&mut parts, key)?;
                        part = parts.buffer(part_size(index) as usize);
                    }
                }
                sent += chunk.len() as u64;
                crate::chunk::recycle(chunk);
            }
            // A cancelled job's pipeline hangs up too: its stream is not whole.
            if self.conn.cancel.is_cancelled() {
                return Err(self.conn.cancelled("upload part", key));
            }
            if !part.is_empty() || index == 0 {
                let last = std::mem::take(&mut part);
                self.send_part(key, upload_id, (index + 1) as i32, last, &mut parts)?;
            }
            while !parts.in_flight.is_empty() {
                self.wait_oldest(&mut parts, key)?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            // Parts still in flight are cut short with the upload.
            parts.abort();
            return Err(e);
        }
        tracing::info!(
            key,
            parts = parts.sent.len(),
            parts_in_flight = parts.limit,
            buffers = parts.allocated,
            "Sent every part of a multipart upload."
        );
        self.check_parts(key, upload_id, sent, &parts.sent)?;
        Ok(sent)
    }

    /// Every part of the upload, as the server lists them: `(number, size, ETag)`.
    fn list_parts(
        &self,
        key: &str,
        upload_id: &str,
    ) -> Result<Vec<(i32, u64, String)>, TargetError> {
        let mut out = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let page = self.conn.call(
                "list parts",
                key,
                self.conn
                    .client
                    .list_parts()
                    .bucket(&self.conn.config.bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .set_part_number_marker(marker.clone())
                    .send(),
            )?;
            for p in page.parts() {
                out.push((
                    p.part_number().unwrap_or(0),
                    p.size().unwrap_or(0).max(0) as u64,
                    p.e_tag().unwrap_or_default().trim_matches('"').to_owned(),
                ));
            }
            marker = self.conn.next_page(
                "list parts",
                key,
                page.is_truncated(),
                page.next_part_number_marker(),
            )?;
            if marker.is_none() {
                return Ok(out);
            }
        }
    }

    /// The stored size check: the server's parts are those sent (numbers and MD5s as
    /// ETags) and their sizes add up to `sent` bytes. A part's ETag is its MD5 on Ceph RGW
    /// and on AWS without SSE-KMS or SSE-C; on a bucket encrypting with those, this check
    /// (and the completed object's ETag check) fails every upload.
    fn check_parts(
        &self,
        key: &str,
        upload_id: &str,
        sent: u64,
        sent_parts: &[SentPart],
    ) -> Result<(), TargetError> {
        let listed = self.list_parts(key, upload_id)?;
        let found: u64 = listed.iter().map(|(_, s, _)| s).sum();
        if found != sent {
            return Err(TargetError::SizeMismatch {
                addr: self.conn.addr.clone(),
                path: key.to_owned(),
                sent,
                found,
            });
        }
        let expected: Vec<(i32, String)> = sent_parts
            .iter()
            .map(|p| (p.number, hex::encode(p.md5)))
            .collect();
        let got: Vec<(i32, String)> = listed.into_iter().map(|(n, _, e)| (n, e)).collect();
        if got != expected {
            return Err(TargetError::Io {
                addr: self.conn.addr.clone(),
                op: "list parts",
                path: key.to_owned(),
                message: format!(
                    "the server holds other parts than were sent ({} listed, {} sent, or their \
                     MD5s differ)",
                    got.len(),
                    expected.len()
                ),
            });
        }
        Ok(())
    }

    /// Aborts the multipart upload `partial`; what became of it.
    fn discard(&mut self, partial: &str) -> PartialFate {
        let Some((key, upload_id)) = split_partial(partial) else {
            return PartialFate::Kept(format!("{partial:?} names no multipart upload"));
        };
        let r = self.conn.cleanup(
            "abort multipart upload",
            key,
            self.conn
                .client
                .abort_multipart_upload()
                .bucket(&self.conn.config.bucket)
                .key(key)
                .upload_id(upload_id)
                .send(),
        );
        match r {
            Ok(_) | Err(TargetError::NotFound { .. }) => PartialFate::Removed,
            Err(TargetError::Io { message, .. }) if message.starts_with("NoSuchUpload") => {
                PartialFate::Removed
            }
            Err(e @ TargetError::PermissionDenied { .. }) => PartialFate::Kept(e.to_string()),
            Err(e) => {
                tracing::warn!(partial, error = %e, "Could not abort a failed multipart upload.");
                self.unremoved.push(partial.to_owned());
                PartialFate::Kept(e.to_string())
            }
        }
    }

    /// [`WriteSession::stage`] of `file` (its key is its path).
    fn stage_file(
        &mut self,
        file: &StoredFile,
        chunks: Receiver<Vec<u8>>,
    ) -> Result<Staged, TargetError> {
        let path = file.path();
        let key = Conn::key(&path).to_owned();
        let created = self.conn.call(
            "create multipart upload",
            &key,
            self.conn
                .client
                .create_multipart_upload()
                .bucket(&self.conn.config.bucket)
                .key(&key)
                .send(),
        )?;
        let upload_id = created.upload_id().unwrap_or_default().to_owned();
        let partial = partial_name(&key, &upload_id);
        self.open = Some(partial.clone());
        let written = self.upload_parts(&key, &upload_id, &chunks);
        self.open = None;
        drop(chunks);
        match written {
            Ok(bytes) => Ok(Staged {
                file: file.clone(),
                partial,
                bytes,
            }),
            Err(mut e) => {
                let fate = self.discard(&partial);
                tracing::info!(partial, fate = %fate, "A failed upload's multipart upload.");
                if let TargetError::QuotaExceeded { partial, .. } = &mut e {
                    *partial = fate;
                }
                Err(e)
            }
        }
    }

    /// Proves that these credentials may upload into the folder `dir` without listing or
    /// reading (which production may not): starts a multipart upload of a probe key
    /// `<dir>/.ferry-check.<pid>.<nanoseconds>` and aborts it, so nothing stays. What was
    /// checked, for `ferry-agent check`.
    ///
    /// # Errors
    /// [`TargetError`] of `CreateMultipartUpload` (e.g. [`TargetError::PermissionDenied`]
    /// for credentials that may not put), or [`TargetError::Io`] if the probe's upload
    /// could not be aborted (it is then left for `ferry prune`).
    pub(crate) fn probe(&mut self, dir: &str) -> Result<String, TargetError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let key = format!(
            "{}/.ferry-check.{}.{nanos}",
            Conn::key(dir).trim_end_matches('/'),
            std::process::id()
        );
        let created = self.conn.call(
            "create multipart upload",
            &key,
            self.conn
                .client
                .create_multipart_upload()
                .bucket(&self.conn.config.bucket)
                .key(&key)
                .send(),
        )?;
        let partial = partial_name(&key, created.upload_id().unwrap_or_default());
        match self.discard(&partial) {
            PartialFate::Removed => Ok(format!(
                "put-only credentials: an upload may start in {dir}, listing is not checked \
                 (production may only put): a multipart upload of {key} was started and \
                 aborted, nothing is left"
            )),
            fate => Err(TargetError::Io {
                addr: self.conn.addr.clone(),
                op: "abort multipart upload",
                path: key,
                message: format!(
                    "the check's probe upload could not be aborted ({}); `ferry prune` \
                     with the maintenance keys removes it",
                    match fate {
                        PartialFate::Kept(reason) => reason,
                        _ => "not known whether it was".to_owned(),
                    }
                ),
            }),
        }
    }

    /// Completes the multipart upload of `staged`: its parts as the server lists them,
    /// checked against its size; then the object's ETag against the parts'. Returns the
    /// new version's id, if the bucket is versioned.
    fn complete(&mut self, staged: &Staged) -> Result<Option<String>, TargetError> {
        let Some((key, upload_id)) = split_partial(&staged.partial) else {
            return Err(TargetError::NotFound {
                addr: self.conn.addr.clone(),
                path: staged.partial.clone(),
            });
        };
        let listed = self.list_parts(key, upload_id)?;
        let found: u64 = listed.iter().map(|(_, s, _)| s).sum();
        if found != staged.bytes {
            return Err(TargetError::SizeMismatch {
                addr: self.conn.addr.clone(),
                path: key.to_owned(),
                sent: staged.bytes,
                found,
            });
        }
        let mut md5s = Vec::with_capacity(listed.len() * 16);
        for (_, _, etag) in &listed {
            md5s.extend(hex::decode(etag).unwrap_or_default());
        }
        let expected_etag = format!("{}-{}", hex::encode(Md5::digest(&md5s)), listed.len());
        let parts: Vec<CompletedPart> = listed
            .iter()
            .map(|(n, _, etag)| {
                CompletedPart::builder()
                    .part_number(*n)
                    .e_tag(format!("\"{etag}\""))
                    .build()
            })
            .collect();
        let done = self.conn.call(
            "complete multipart upload",
            key,
            self.conn
                .client
                .complete_multipart_upload()
                .bucket(&self.conn.config.bucket)
                .key(key)
                .upload_id(upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send(),
        )?;
        let etag = done.e_tag().unwrap_or_default().trim_matches('"');
        if !etag.is_empty() && etag != expected_etag {
            return Err(TargetError::Io {
                addr: self.conn.addr.clone(),
                op: "complete multipart upload",
                path: key.to_owned(),
                message: format!(
                    "the object's ETag {etag} is not {expected_etag}, that of the parts sent"
                ),
            });
        }
        let version = done.version_id().map(str::to_owned);
        tracing::info!(key, version = ?version, bytes = staged.bytes, "Completed a multipart upload.");
        Ok(version)
    }
}

impl WriteSession for S3Write {
    fn stage(
        &mut self,
        file: &StoredFile,
        _job_id: &str,
        chunks: Receiver<Vec<u8>>,
    ) -> Result<Staged, TargetError> {
        self.stage_file(file, chunks)
    }

    /// Completes the data parts first, then uploads and completes each manifest with the
    /// version id its part's completion gave (`version_id`; the bytes as given on a bucket
    /// without versioning; a sidecar that is not a backup's manifest, e.g. an archived WAL
    /// file's record, must be a JSON object and gets a top-level `version_id`), the main
    /// part's last: a reader takes a backup for one only by
    /// that manifest, and reads the version it names, whatever a racing writer of the same
    /// key adds.
    fn commit(&mut self, _job_id: &str, parts: &[(Staged, Vec<u8>)]) -> Result<(), TargetError> {
        let failed = |source: TargetError, left: Vec<String>, unsure: Option<String>| {
            if !left.is_empty() {
                // Production may not delete: what was completed stays, without the
                // manifest that completes the backup, for `ferry prune`.
                tracing::warn!(left = ?left, "The commit of a backup failed; what was completed is left without the manifest that completes it.");
            }
            TargetError::Commit {
                source: Box::new(source),
                left,
                unsure,
            }
        };
        let unsure_of = |e: &TargetError, path: String| {
            matches!(e, TargetError::Connect { .. } | TargetError::Stalled { .. }).then_some(path)
        };
        // 1. Every manifest parses (its part's version id goes in): nothing is done if not.
        let mut manifests = Vec::with_capacity(parts.len());
        for (part, json) in parts {
            let path = format!("{}.json", part.file.path());
            match Sidecar::parse(&path, json) {
                Ok(m) => manifests.push(m),
                Err(e) => {
                    let staged: Vec<String> =
                        parts.iter().map(|(s, _)| s.partial.clone()).collect();
                    self.abandon(&staged);
                    let source = TargetError::Io {
                        addr: self.conn.addr.clone(),
                        op: "record the version id in",
                        path,
                        message: e,
                    };
                    return Err(failed(source, Vec::new(), None));
                }
            }
        }
        // 2. The data parts: each completion gives the version id of the new object.
        let mut placed: Vec<String> = Vec::new();
        for (i, (part, _)) in parts.iter().enumerate() {
            match self.complete(part) {
                Ok(version) => manifests[i].set_version_id(version),
                Err(e) => {
                    let unsure = unsure_of(&e, part.file.path());
                    for (rest, _) in &parts[i..] {
                        let _ = self.discard(&rest.partial);
                    }
                    return Err(failed(e, placed, unsure));
                }
            }
            placed.push(part.file.path());
        }
        // 3. Each manifest, with its part's version id, the main part's last.
        for ((part, json), manifest) in parts.iter().zip(&manifests) {
            let file = StoredFile {
                dir: part.file.dir.clone(),
                name: format!("{}.json", part.file.name),
            };
            let bytes = manifest.to_json().unwrap_or_else(|| json.clone());
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let _ = tx.send(bytes);
            drop(tx);
            let staged = match self.stage_file(&file, rx) {
                Ok(s) => s,
                Err(e) => return Err(failed(e, placed, None)),
            };
            if let Err(e) = self.complete(&staged) {
                let unsure = unsure_of(&e, file.path());
                let _ = self.discard(&staged.partial);
                return Err(failed(e, placed, unsure));
            }
            placed.push(file.path());
        }
        Ok(())
    }

    fn abandon(&mut self, partials: &[String]) -> Vec<PartialFate> {
        partials.iter().map(|p| self.discard(p)).collect()
    }

    /// `HeadObject`; production's credentials may not (the bucket policy denies
    /// `GetObject`): a refusal counts as "does not exist", and the bucket's versioning
    /// keeps an existing object from being replaced.
    fn exists(&mut self, path: &str) -> Result<bool, TargetError> {
        let key = Conn::key(path);
        let r = self.conn.call(
            "head object",
            path,
            self.conn
                .client
                .head_object()
                .bucket(&self.conn.config.bucket)
                .key(key)
                .send(),
        );
        match r {
            Ok(_) => Ok(true),
            Err(TargetError::NotFound { .. }) => Ok(false),
            Err(TargetError::PermissionDenied { .. }) => {
                self.blind = true;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn sees_existing(&self) -> bool {
        !self.blind
    }

    fn read_back(&mut self, _path: &str, _max: u64) -> Result<Option<Vec<u8>>, TargetError> {
        // Production's credentials may only put (docs/s3-bucket-policy.json).
        Err(TargetError::Unsupported {
            addr: self.conn.addr.clone(),
            kind: "s3",
            what: "reading an object back with production's put-only credentials",
        })
    }

    fn aborter(&self) -> Aborter {
        let cancel = self.conn.cancel.clone();
        Aborter::new(move || cancel.cancel())
    }

    fn aborted(&self) -> bool {
        self.conn.cancel.is_cancelled()
    }

    fn take_unremoved(&mut self) -> Vec<String> {
        std::mem::take(&mut self.unremoved)
    }
}

/// A part's `.json` sidecar, into which its version id goes: a backup's [`Manifest`], or
/// any other JSON object (e.g. the record of an archived WAL file), which gets a top-level
/// `version_id`.
enum Sidecar {
    Manifest(Box<Manifest>),
    Object(serde_json::Map<String, serde_json::Value>, Option<String>),
}

impl Sidecar {
    /// Parses `json`, stored at `path` (for messages).
    fn parse(path: &str, json: &[u8]) -> Result<Sidecar, String> {
        match Manifest::from_slice(path, json) {
            Ok(m) => Ok(Sidecar::Manifest(Box::new(m))),
            Err(e) => serde_json::from_slice(json)
                .map(|o| Sidecar::Object(o, None))
                .map_err(|_| e.to_string()),
        }
    }

    fn set_version_id(&mut self, version: Option<String>) {
        match self {
            Sidecar::Manifest(m) => m.version_id = version,
            Sidecar::Object(_, v) => *v = version,
        }
    }

    /// The bytes to store, with the version id; `None` without one (the bytes as given).
    fn to_json(&self) -> Option<Vec<u8>> {
        match self {
            Sidecar::Manifest(m) => m.version_id.is_some().then(|| m.to_json()),
            Sidecar::Object(o, Some(v)) => {
                let mut o = o.clone();
                o.insert("version_id".into(), serde_json::Value::String(v.clone()));
                serde_json::to_vec_pretty(&o).ok()
            }
            Sidecar::Object(_, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sidecar_that_is_not_a_manifest_gets_its_version_id_and_keeps_its_fields() {
        let json = br#"{"file": "000000010000000000000003", "bytes": 16777216}"#;
        let mut side = Sidecar::parse("x.json", json).unwrap();
        assert_eq!(side.to_json(), None, "no version: the bytes as given");
        side.set_version_id(Some("v1".into()));
        let out: serde_json::Value = serde_json::from_slice(&side.to_json().unwrap()).unwrap();
        assert_eq!(
            out,
            serde_json::json!({"file": "000000010000000000000003", "bytes": 16777216, "version_id": "v1"})
        );
        assert!(Sidecar::parse("x.json", b"[1, 2]").is_err());
        assert!(Sidecar::parse("x.json", b"not json").is_err());
    }

    #[test]
    fn five_tib_fits_in_ten_thousand_parts_of_at_most_five_gib() {
        let sizes: Vec<u64> = (0..MAX_PARTS).map(part_size).collect();
        let total: u64 = sizes.iter().sum();
        assert!(total >= 5 << 40, "10,000 parts hold only {total} bytes");
        assert!(sizes.iter().all(|&s| (5 << 20..=5 << 30).contains(&s)));
        assert_eq!(sizes[0], 8 << 20);
        // A 4 GiB stream is all 8 MiB parts: memory stays parts_in_flight of them.
        assert_eq!(sizes[..512].iter().sum::<u64>(), 4 << 30);
        assert!(sizes[..512].iter().all(|&s| s == 8 << 20));
        assert!(sizes.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn a_partial_names_its_key_and_upload() {
        let p = partial_name("b/production/2026-12-05/x.age", "2~abc");
        assert_eq!(
            split_partial(&p),
            Some(("b/production/2026-12-05/x.age", "2~abc"))
        );
    }
}
