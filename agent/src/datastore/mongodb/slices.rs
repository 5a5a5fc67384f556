//! Continuous archiving of a replica set's oplog: a production agent reads `local.oplog.rs`
//! every second and closes a slice every `oplog_slice_seconds`, stored as
//! [`ferry_core::oplog`] lays it out (`<datastore>-oplog/<from>-<to>.bson.zst.age` and its
//! record), as Percona Backup for MongoDB saves oplog slices between its full dumps.
//!
//! Where the chain has reached (the last entry's timestamp and the last slice's end) is
//! kept in `<state_dir>/oplog-<datastore>.json`, written after each slice is committed, so
//! that a restarted agent continues the chain: a production agent may not read the target
//! back (an S3 writer may only put). Each read asks for the entries from that timestamp on
//! (`ts >= upto`, as `mongodump --oplog` checks its window's start): when the oplog no
//! longer holds the entry there, it rolled over while the agent was down or behind, and
//! the entries in between are lost. That gap is logged as an error and ends the chain: the
//! next slice starts a new one ([`SliceRecord::chain_start`] says why), from which a
//! restore to a point in time needs a dump made after it.
//!
//! Memory: a slice's entries are held until it is written, at most [`MAX_SLICE_BYTES`]
//! (a slice closes early when it reaches it, never between entries that share a
//! timestamp: a transaction's). While the target cannot be reached, the pending slice is
//! retried and no more is read: the oplog keeps the entries.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bson::{RawDocumentBuf, Timestamp, doc};
use chrono::{DateTime, Utc};
use mongodb::Client;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::Mongo;
use crate::config::{Keys, Settings};
use crate::datastore::Datastore;
use crate::job::Progress;
use crate::pipeline::{chunks, compress, hash};
use ferry_core::layout::StoredFile;
use ferry_core::oplog::{self, OplogTs, SLICE_RECORD_VERSION, SliceRecord};
use ferry_storage::{TargetError, WriteSession};

/// Most bytes of entries a slice holds before it closes early.
pub const MAX_SLICE_BYTES: usize = 16 * 1024 * 1024;

/// How often the oplog is read within a slice.
const POLL: Duration = Duration::from_secs(1);

/// Longest wait between attempts after a failure (the server or the target unreachable).
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Largest record read back when a slice's name is already taken.
const MAX_RECORD_BYTES: u64 = 64 * 1024;

/// Where the chain of a datastore's slices has reached, kept between slices and restarts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainState {
    /// The replica set read.
    pub replica_set: String,
    /// The greatest entry archived ([`SliceRecord::upto`]).
    pub upto: Option<OplogTs>,
    /// The last slice's end ([`SliceRecord::to`]), UTC.
    pub to: DateTime<Utc>,
    /// When the chain started ([`SliceRecord::chain_started`]), UTC.
    pub chain_started: DateTime<Utc>,
    /// Whether it started after a gap ([`SliceRecord::chain_gap`]).
    pub chain_gap: bool,
}

/// `<state_dir>/oplog-<datastore>.json`.
pub fn state_path(state_dir: &Path, datastore: &str) -> PathBuf {
    state_dir.join(format!("oplog-{datastore}.json"))
}

/// Reads the chain's state, `None` when there is none yet.
///
/// # Errors
/// A message for a file that cannot be read or parsed.
pub fn load_state(path: &Path) -> Result<Option<ChainState>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Writes the chain's state whole or not at all (a file beside it, synced, renamed over).
///
/// # Errors
/// The file system's.
pub fn save_state(path: &Path, state: &ChainState) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(state).expect("state serialises"))?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn ts(t: Timestamp) -> OplogTs {
    OplogTs {
        t: t.time,
        i: t.increment,
    }
}

fn bson_ts(t: OplogTs) -> Timestamp {
    Timestamp {
        time: t.t,
        increment: t.i,
    }
}

/// A slice read and not yet written.
struct Slice {
    replica_set: String,
    chain_start: Option<String>,
    chain_started: DateTime<Utc>,
    chain_gap: bool,
    after: Option<OplogTs>,
    first: Option<OplogTs>,
    last: Option<OplogTs>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    entries: u64,
    bytes: Vec<u8>,
}

impl Slice {
    /// A slice without entries yet, continuing from `after` since `from`, in the chain that
    /// started at `chain` (with `gap` if it did after one); `chain_start` says why a chain
    /// starts with this slice.
    fn new(
        replica_set: &str,
        chain_start: Option<String>,
        after: Option<OplogTs>,
        from: DateTime<Utc>,
        (chain, gap): (DateTime<Utc>, bool),
    ) -> Slice {
        Slice {
            replica_set: replica_set.to_owned(),
            chain_start,
            chain_started: chain,
            chain_gap: gap,
            after,
            first: None,
            last: None,
            from,
            to: from,
            entries: 0,
            bytes: Vec::new(),
        }
    }

    fn upto(&self) -> Option<OplogTs> {
        self.last.or(self.after)
    }
}

/// What one read of the oplog found.
struct Read {
    /// The oplog no longer holds the entry asked to continue from; the oldest it holds.
    gap: Option<Option<OplogTs>>,
    /// The slice is full: more entries wait.
    full: bool,
    /// `wall` of the last entry appended, milliseconds since the epoch.
    last_wall: Option<i64>,
}

/// Ships one datastore's oplog until `shutdown`.
pub struct Shipper {
    settings: Arc<Settings>,
    mongo: Mongo,
    interval: Duration,
    state_path: PathBuf,
}

impl Shipper {
    /// A shipper for `mongo`, whose `oplog_slice_seconds` is `seconds`.
    pub fn new(settings: Arc<Settings>, mongo: Mongo, seconds: u64) -> Shipper {
        let state_path = state_path(&settings.state_dir, mongo.name());
        Shipper {
            settings,
            mongo,
            interval: Duration::from_secs(seconds),
            state_path,
        }
    }

    /// Reads and writes slices until `shutdown`; a failure (the server or the target
    /// unreachable) is logged and retried with back-off, the pending slice kept. A slice
    /// being read at the shutdown is dropped: the chain's state still names its start, so
    /// the next run reads it again.
    pub async fn run(self, shutdown: CancellationToken) {
        let datastore = self.mongo.name().to_owned();
        tracing::info!(datastore, seconds = self.interval.as_secs(), state = %self.state_path.display(),
            "Shipping the oplog in slices.");
        let mut session: Option<Box<dyn WriteSession>> = None;
        let mut pending: Option<Slice> = None;
        let mut client: Option<Client> = None;
        let mut backoff = Duration::from_secs(1);
        while !shutdown.is_cancelled() {
            let step = async {
                if pending.is_none() {
                    let c = match &client {
                        Some(c) => c.clone(),
                        None => {
                            let (c, member) =
                                self.mongo.read_client().await.map_err(|e| e.to_string())?;
                            tracing::info!(datastore = %self.mongo.name(), %member,
                                "Reading the oplog for slices.");
                            client = Some(c.clone());
                            c
                        }
                    };
                    match self.read_slice(&c, &shutdown).await {
                        Ok(Some(s)) => pending = Some(s),
                        Ok(None) => return Ok(()),
                        Err(e) => {
                            client = None;
                            return Err(e);
                        }
                    }
                }
                let slice = pending.take().expect("a slice is pending");
                let (kept, written) = self.write(session.take(), &slice).await;
                session = kept;
                match written {
                    Ok(state) => {
                        save_state(&self.state_path, &state).map_err(|e| {
                            format!(
                                "the slice was written but the chain's state {} was not: {e}",
                                self.state_path.display()
                            )
                        })?;
                        Ok(())
                    }
                    Err(e) => {
                        pending = Some(slice);
                        Err(e)
                    }
                }
            };
            match step.await {
                Ok(()) => backoff = Duration::from_secs(1),
                Err(e) => {
                    tracing::warn!(datastore, error = %e, retry_seconds = backoff.as_secs(),
                        "Oplog slice failed; retrying.");
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        tracing::info!(datastore, "Oplog shipping stopped.");
    }

    /// Reads one slice: from the chain's state (or the oplog's newest entry for a new
    /// chain) until the interval has passed or the slice is full. `None` at the shutdown.
    async fn read_slice(
        &self,
        client: &Client,
        shutdown: &CancellationToken,
    ) -> Result<Option<Slice>, String> {
        let datastore = self.mongo.name();
        let replica_set = replica_set(client).await?;
        let state = load_state(&self.state_path)?;
        let mut slice = match state {
            Some(s) if s.replica_set == replica_set => Slice::new(
                &replica_set,
                None,
                s.upto,
                s.to,
                (s.chain_started, s.chain_gap),
            ),
            other => {
                let why = match other {
                    Some(s) => format!(
                        "the replica set is {replica_set:?}, the chain's was {:?}",
                        s.replica_set
                    ),
                    None => "the first slice of this datastore on this agent".to_owned(),
                };
                let now = Utc::now();
                Slice::new(
                    &replica_set,
                    Some(why),
                    newest_entry(client).await?,
                    now,
                    (now, false),
                )
            }
        };
        let ends = tokio::time::Instant::now() + self.interval;
        loop {
            let polled = Utc::now();
            let read = read_after(client, &mut slice).await?;
            if let Some(oldest) = read.gap {
                // The entries this slice read before the gap are dropped with it: the
                // chain they continued ends at the gap all the same.
                let lost_from = slice.upto().map_or_else(String::new, |a| a.to_string());
                let oldest = oldest.map_or_else(|| "nothing".to_owned(), |o| o.to_string());
                tracing::error!(datastore, after = %lost_from, next = %oldest,
                    "Oplog gap: the oplog no longer holds the entry the chain had reached; the entries in between are lost. A new chain starts: a restore to a later instant needs a dump made after now.");
                let why = format!(
                    "gap: the oplog no longer held {lost_from}, where the chain had reached (the next entry it held was {oldest}: it rolled over while the agent was down or behind)"
                );
                let now = Utc::now();
                slice = Slice::new(
                    &replica_set,
                    Some(why),
                    newest_entry(client).await?,
                    now,
                    (now, true),
                );
                continue;
            }
            if read.full {
                let wall = read
                    .last_wall
                    .and_then(DateTime::from_timestamp_millis)
                    .unwrap_or(polled);
                slice.to = wall.max(slice.from);
                return Ok(Some(slice));
            }
            slice.to = polled.max(slice.from);
            let now = tokio::time::Instant::now();
            if now >= ends {
                return Ok(Some(slice));
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(None),
                () = tokio::time::sleep(POLL.min(ends - now)) => {}
            }
        }
    }

    /// Writes `slice` and its record; the chain's state after it.
    async fn write(
        &self,
        session: Option<Box<dyn WriteSession>>,
        slice: &Slice,
    ) -> (Option<Box<dyn WriteSession>>, Result<ChainState, String>) {
        let settings = self.settings.clone();
        let datastore = self.mongo.name().to_owned();
        let record = SliceRecord {
            record_version: SLICE_RECORD_VERSION,
            datastore: datastore.clone(),
            agent: settings.id.clone(),
            hostname: settings.hostname.clone(),
            environment: settings.environment.clone(),
            replica_set: slice.replica_set.clone(),
            chain_start: slice.chain_start.clone(),
            chain_started: slice.chain_started,
            chain_gap: slice.chain_gap,
            after: slice.after,
            upto: slice.upto(),
            first: slice.first,
            last: slice.last,
            from: slice.from,
            to: slice.to,
            entries: slice.entries,
            bytes: slice.bytes.len() as u64,
            sha256: String::new(),
            bytes_stored: 0,
            sha256_stored: String::new(),
            compression: compress::EXTENSION.to_owned(),
            encryption: "age".to_owned(),
            recipients: Vec::new(),
            written: Utc::now(),
            version_id: None,
        };
        let bytes = slice.bytes.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let mut session = session;
            let written = write_slice(&settings, &mut session, record, &bytes);
            (session, written)
        })
        .await;
        match joined {
            Ok((session, Ok(path))) => {
                tracing::info!(datastore = self.mongo.name(), path, entries = slice.entries,
                    upto = ?slice.upto(), "Oplog slice archived.");
                (
                    session,
                    Ok(ChainState {
                        replica_set: slice.replica_set.clone(),
                        upto: slice.upto(),
                        to: slice.to,
                        chain_started: slice.chain_started,
                        chain_gap: slice.chain_gap,
                    }),
                )
            }
            Ok((session, Err(e))) => (session, Err(e)),
            Err(e) => (None, Err(format!("the slice's writer panicked: {e}"))),
        }
    }
}

/// The replica set's name (`hello`'s `setName`).
///
/// # Errors
/// The server's, or a server that is not a replica set member (it has no oplog).
async fn replica_set(client: &Client) -> Result<String, String> {
    let hello = client
        .database("admin")
        .run_command(doc! {"hello": 1})
        .await
        .map_err(|e| format!("hello: {e}"))?;
    hello.get_str("setName").map(str::to_owned).map_err(|_| {
        "the server is not a replica set member: it keeps no oplog to archive (oplog_slice_seconds needs a replica set)".to_owned()
    })
}

/// The timestamp of the oplog's newest entry, `None` for an empty oplog.
async fn newest_entry(client: &Client) -> Result<Option<OplogTs>, String> {
    let newest = client
        .database("local")
        .collection::<bson::Document>("oplog.rs")
        .find_one(doc! {})
        .sort(doc! {"$natural": -1})
        .await
        .map_err(|e| format!("reading the oplog's newest entry: {e}"))?;
    Ok(newest.and_then(|d| d.get_timestamp("ts").ok()).map(ts))
}

/// Appends to `slice` the entries after its greatest, until the oplog has no more or
/// the slice is full (never between entries that share a timestamp).
async fn read_after(client: &Client, slice: &mut Slice) -> Result<Read, String> {
    let upto = slice.upto();
    let filter = match upto {
        Some(u) => doc! {"ts": {"$gte": bson_ts(u)}},
        None => doc! {},
    };
    let err = |e: mongodb::error::Error| format!("reading local.oplog.rs: {e}");
    let mut cursor = client
        .database("local")
        .collection::<RawDocumentBuf>("oplog.rs")
        .find(filter)
        .await
        .map_err(err)?;
    let mut read = Read {
        gap: None,
        full: false,
        last_wall: None,
    };
    let mut seen_upto = upto.is_none();
    let mut previous = upto;
    while cursor.advance().await.map_err(err)? {
        let entry = cursor.current();
        let t = ts(entry
            .get_timestamp("ts")
            .map_err(|e| format!("an oplog entry without its ts: {e}"))?);
        if Some(t) == upto {
            seen_upto = true;
            continue;
        }
        if !seen_upto {
            read.gap = Some(Some(t));
            return Ok(read);
        }
        if previous.is_some_and(|p| t < p) {
            return Err(format!(
                "the oplog returned {t} after {}: out of order",
                previous.expect("checked")
            ));
        }
        if slice.bytes.len() + entry.as_bytes().len() > MAX_SLICE_BYTES
            && slice.entries > 0
            && previous != Some(t)
        {
            read.full = true;
            return Ok(read);
        }
        slice.bytes.extend_from_slice(entry.as_bytes());
        slice.entries += 1;
        slice.first.get_or_insert(t);
        slice.last = Some(t);
        previous = Some(t);
        read.last_wall = entry
            .get_datetime("wall")
            .ok()
            .map(bson::DateTime::timestamp_millis)
            .or(Some(i64::from(t.t) * 1000));
    }
    if !seen_upto {
        // The entry is gone and nothing newer is there either.
        read.gap = Some(None);
    }
    Ok(read)
}

/// Compresses, encrypts and uploads a slice's entries, then commits them with `record`
/// (checksums filled in). A name already taken with a record of the same entries (the
/// state was not saved after an earlier write) is success; with others, an error.
/// Returns the stored path.
fn write_slice(
    settings: &Settings,
    session: &mut Option<Box<dyn WriteSession>>,
    mut record: SliceRecord,
    bytes: &[u8],
) -> Result<String, String> {
    let Keys::Encrypt(enc) = &settings.keys else {
        return Err(format!(
            "agent {} has role {}: it may not archive the oplog",
            settings.id, settings.role
        ));
    };
    let env_dir = settings
        .backup_server
        .environment_dir(&settings.environment);
    let file = StoredFile {
        dir: oplog::oplog_dir(&env_dir, &record.datastore),
        name: oplog::slice_name(record.from, record.to),
    };
    let target = |e: TargetError| e.to_string();
    let mut s = match session.take() {
        Some(s) if !s.aborted() => s,
        _ => settings.backup_server.write().map_err(target)?,
    };
    let sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(bytes))
    };
    match s.read_back(&file.manifest_path(), MAX_RECORD_BYTES) {
        Ok(Some(found)) => {
            let found = SliceRecord::from_slice(&file.manifest_path(), &found)
                .map_err(|e| e.to_string())?;
            *session = Some(s);
            return if found.sha256 == sha256 && found.after == record.after {
                Ok(file.path())
            } else {
                Err(format!(
                    "{} is already taken by a slice of other entries (sha256 {}, ours {sha256})",
                    file.path(),
                    found.sha256
                ))
            };
        }
        Ok(None) | Err(TargetError::Unsupported { .. }) => {}
        Err(e) => return Err(e.to_string()),
    }
    let job_id = format!("oplog{}", ulid::Ulid::new());
    let progress = Progress::new(CancellationToken::new());
    let (tx, rx) = chunks::channel();
    let (staged, produced) = std::thread::scope(|scope| {
        let producer = scope.spawn(|| -> io::Result<(String, u64)> {
            let sink = chunks::ChunkWriter::new(tx, progress.clone());
            let hashed = hash::HashingWriter::new(sink);
            let encrypted = enc.wrap(hashed)?;
            let mut compressed =
                compress::Compressor::new(encrypted, settings.compression_level, 0)?;
            crate::pipeline::copy(&mut &bytes[..], &mut compressed)?;
            let encrypted = compressed.finish()?;
            let hashed = encrypted.finish()?;
            let (sink, stored_sha, stored) = hashed.finish();
            sink.finish()?;
            Ok((stored_sha, stored))
        });
        let staged = s.stage(&file, &job_id, rx);
        (staged, producer.join())
    });
    let staged = match staged {
        Ok(st) => st,
        Err(e) => return Err(target(e)),
    };
    let checked = match produced {
        Ok(Ok((sha, stored))) if stored == staged.bytes => Ok(sha),
        Ok(Ok((_, stored))) => Err(format!(
            "{} holds {} bytes, {stored} were produced",
            staged.partial, staged.bytes
        )),
        Ok(Err(e)) => Err(format!("compress/encrypt: {e}")),
        Err(_) => Err("the compress/encrypt thread panicked".to_owned()),
    };
    let sha256_stored = match checked {
        Ok(sha) => sha,
        Err(e) => {
            let _ = s.abandon(std::slice::from_ref(&staged.partial));
            *session = Some(s);
            return Err(e);
        }
    };
    record.sha256 = sha256;
    record.bytes_stored = staged.bytes;
    record.sha256_stored = sha256_stored;
    record.recipients = enc.describe().into_iter().map(|r| r.fingerprint).collect();
    s.commit(&job_id, &[(staged, record.to_json())])
        .map_err(target)?;
    *session = Some(s);
    Ok(file.path())
}

/// Staging: one slice a restore to a point in time replays, as listed on the target.
#[derive(Clone, Debug)]
pub struct SliceToReplay {
    /// Its stored path.
    pub path: String,
    /// Its record.
    pub record: SliceRecord,
}

/// Staging: fetches one slice's entries (BSON back to back), checked against its record
/// (the stored bytes' and the entries' SHA-256 and sizes); a message otherwise.
pub type SliceFetcher = Arc<
    dyn Fn(SliceToReplay) -> futures::future::BoxFuture<'static, Result<Vec<u8>, String>>
        + Send
        + Sync,
>;

/// Staging: how a MongoDB restore to a point in time goes on from the dump: the slices
/// that hold every entry from the dump's oplog window's end to the instant, in order.
#[derive(Clone)]
pub struct OplogPlan {
    /// The last entry of the dump's oplog window: entries up to it are in the dump.
    pub window_end: OplogTs,
    /// The slices, in chain order.
    pub slices: Vec<SliceToReplay>,
    /// Reads a slice.
    pub fetch: SliceFetcher,
}

impl std::fmt::Debug for OplogPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OplogPlan")
            .field("window_end", &self.window_end)
            .field("slices", &self.slices)
            .finish_non_exhaustive()
    }
}

/// Staging: picks, from the slices stored (`listed`, in name order), the chain that holds
/// every entry after `window_end` up to `time`: from a slice that continues from at or
/// before `window_end`, each next one continuing the previous (`after` = its `upto`, no
/// `chain_start`), up to the first whose `to` is at or after `time`.
///
/// # Errors
/// A message saying what is missing: `time` beyond the newest slice (naming the newest
/// instant the archive reaches), no chain reaching back to the dump, or a gap between.
pub fn plan_chain(
    listed: &[SliceToReplay],
    window_end: OplogTs,
    time: DateTime<Utc>,
    dir: &str,
) -> Result<Vec<SliceToReplay>, String> {
    let Some(newest) = listed.iter().max_by_key(|s| s.record.to) else {
        return Err(format!(
            "no oplog slice is archived under {dir}: a restore to a point in time replays them \
             (set oplog_slice_seconds on the production datastore)"
        ));
    };
    if newest.record.to < time {
        return Err(format!(
            "{} is beyond the archived oplog: the newest slice under {dir} ends at {}, the newest \
             instant a restore can reach",
            time.to_rfc3339(),
            newest.record.to.to_rfc3339()
        ));
    }
    let mut chain: Vec<SliceToReplay> = Vec::new();
    let mut broken: Option<String> = None;
    for s in listed {
        let r = &s.record;
        let continues = chain
            .last()
            .is_some_and(|p: &SliceToReplay| r.chain_start.is_none() && r.after == p.record.upto);
        if !continues {
            if let Some(p) = chain.last() {
                broken = Some(format!(
                    "{} does not continue {}{}",
                    s.path,
                    p.path,
                    r.chain_start
                        .as_deref()
                        .map(|w| format!(" ({w})"))
                        .unwrap_or_default()
                ));
            }
            chain.clear();
            if r.after.is_none_or(|a| a <= window_end) && r.upto.is_none_or(|u| u >= window_end) {
                chain.push(s.clone());
            } else if r.after.is_some_and(|a| a > window_end) && broken.is_none() {
                broken = Some(format!(
                    "{} starts after the dump's last oplog entry {window_end}{}",
                    s.path,
                    r.chain_start
                        .as_deref()
                        .map(|w| format!(" ({w})"))
                        .unwrap_or_default()
                ));
            }
        } else {
            chain.push(s.clone());
        }
        if !chain.is_empty() && r.to >= time {
            return Ok(chain);
        }
    }
    Err(format!(
        "the oplog slices under {dir} do not hold every entry from the dump's last oplog entry \
         {window_end} to {}{}: a restore to that instant needs a dump made after the gap",
        time.to_rfc3339(),
        broken.map(|b| format!(": {b}")).unwrap_or_default()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_state_reads_back_as_saved_and_is_absent_before_the_first_slice() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(dir.path(), "mongo");
        assert_eq!(path, dir.path().join("oplog-mongo.json"));
        assert_eq!(load_state(&path), Ok(None));
        let state = ChainState {
            replica_set: "rs0".into(),
            upto: Some(OplogTs {
                t: 1_796_465_569,
                i: 7,
            }),
            to: DateTime::from_timestamp_millis(1_796_465_570_123).unwrap(),
            chain_started: DateTime::from_timestamp(1_796_465_000, 0).unwrap(),
            chain_gap: false,
        };
        save_state(&path, &state).unwrap();
        assert_eq!(load_state(&path), Ok(Some(state)));
        std::fs::write(&path, b"{").unwrap();
        assert!(load_state(&path).unwrap_err().contains("oplog-mongo.json"));
    }

    fn slice(
        name: &str,
        after: Option<u32>,
        last: Option<u32>,
        to: i64,
        chain_start: Option<&str>,
    ) -> SliceToReplay {
        let at = |t: u32| OplogTs { t, i: 1 };
        SliceToReplay {
            path: name.to_owned(),
            record: SliceRecord {
                record_version: SLICE_RECORD_VERSION,
                datastore: "mongo".into(),
                agent: "a".into(),
                hostname: "h".into(),
                environment: "production".into(),
                replica_set: "rs0".into(),
                chain_start: chain_start.map(str::to_owned),
                chain_started: DateTime::from_timestamp(0, 0).unwrap(),
                chain_gap: false,
                after: after.map(at),
                upto: last.or(after).map(at),
                first: last.map(at),
                last: last.map(at),
                from: DateTime::from_timestamp(to - 60, 0).unwrap(),
                to: DateTime::from_timestamp(to, 0).unwrap(),
                entries: u64::from(last.is_some()),
                bytes: 0,
                sha256: String::new(),
                bytes_stored: 0,
                sha256_stored: String::new(),
                compression: "zst".into(),
                encryption: "age".into(),
                recipients: Vec::new(),
                written: DateTime::from_timestamp(to, 0).unwrap(),
                version_id: None,
            },
        }
    }

    fn names(chain: &[SliceToReplay]) -> Vec<&str> {
        chain.iter().map(|s| s.path.as_str()).collect()
    }

    #[test]
    fn the_chain_runs_from_the_slice_holding_the_dumps_end_to_the_first_reaching_the_instant() {
        let at = |t: i64| DateTime::from_timestamp(t, 0).unwrap();
        let w = OplogTs { t: 150, i: 1 };
        let listed = vec![
            slice("a", Some(50), Some(100), 1000, Some("first")),
            slice("b", Some(100), Some(200), 1060, None),
            slice("c", Some(200), None, 1120, None),
            slice("d", Some(200), Some(300), 1180, None),
            slice("e", Some(300), Some(400), 1240, None),
        ];
        assert_eq!(
            names(&plan_chain(&listed, w, at(1100), "dir").unwrap()),
            ["b", "c"]
        );
        assert_eq!(
            names(&plan_chain(&listed, w, at(1180), "dir").unwrap()),
            ["b", "c", "d"]
        );
        // Beyond the newest slice's end: refused, naming that end.
        let e = plan_chain(&listed, w, at(1241), "dir").unwrap_err();
        assert!(
            e.contains("beyond the archived oplog") && e.contains("1970-01-01T00:20:40"),
            "{e}"
        );
        // A gap between the dump and the instant: refused, naming the slice after it.
        let mut gapped = listed.clone();
        gapped[3] = slice("d", Some(250), Some(300), 1180, Some("gap: lost"));
        let e = plan_chain(&gapped, w, at(1200), "dir").unwrap_err();
        assert!(e.contains("d does not continue c (gap: lost)"), "{e}");
        // A dump made after the gap starts from the new chain.
        let later = OplogTs { t: 260, i: 1 };
        assert_eq!(
            names(&plan_chain(&gapped, later, at(1200), "dir").unwrap()),
            ["d", "e"]
        );
        // Slices that all start after the dump's end do not hold it.
        let e = plan_chain(&listed[3..], w, at(1200), "dir").unwrap_err();
        assert!(
            e.contains("d starts after the dump's last oplog entry"),
            "{e}"
        );
        assert!(
            plan_chain(&[], w, at(1200), "dir")
                .unwrap_err()
                .contains("no oplog slice")
        );
    }
}
