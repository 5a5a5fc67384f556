//! The restore side: the archive applied into scratch databases beside the targets, the
//! oplog window replayed, counts and indexes checked, then every namespace moved into
//! place ([`super::swap`]); the operator's smoke checks.

use std::collections::{BTreeMap, HashMap};
use std::io;

use bson::{Bson, Document, RawArrayBuf, RawDocumentBuf, doc, rawdoc};
use futures::FutureExt;
use futures::future::BoxFuture;
use mongodb::Client;
use tokio::sync::mpsc;

use super::archive::{ArchiveReader, CollectionMetadata, Item, Namespace};
use super::oplog::{Replay, ReplayReport};
use super::slices::OplogPlan;
use super::{ChannelReader, ChannelWriter, MAIN, Mongo, swap, tgt};
use crate::datastore::common::smoke::{SmokeError, run_smoke};
use crate::datastore::{PartSink, PointInTime, RestoreError, RestoreSession, Restorer};
use crate::pipeline::chunks;
use ferry_core::manifest::Manifest;

/// Bytes of raw documents per `insert` command on restore ([`InsertBatch`]). The batch is
/// held about three times while it is sent (the `documents` array, the driver's copy of the
/// command, the message): 8 MiB put the staging agent's peak at 75 MiB restoring 256 KiB
/// documents (bench/ `mongo-dump --restore`); 2 MiB left 10.4 MiB of a four-job restore's
/// heap there (heaptrack, bench/ concurrent-jobs).
const INSERT_BYTES: usize = 1024 * 1024;

impl Restorer for Mongo {
    /// The archive goes into scratch databases beside the targets.
    fn stages_part(&self, _manifest: &Manifest) -> bool {
        true
    }

    fn smoke(&self) -> BoxFuture<'_, Result<Vec<String>, RestoreError>> {
        async move {
            let client = self.client().await.map_err(RestoreError::from)?;
            run_smoke(&self.cfg.smoke, |c| {
                let client = client.clone();
                async move {
                    let ns = c.ns.as_deref().unwrap_or_default();
                    let (db, coll) = ns.split_once('.').ok_or_else(|| {
                        SmokeError::Check(format!("{ns:?} is not database.collection"))
                    })?;
                    let filter: Document = match c.filter.as_deref() {
                        None => doc! {},
                        Some(f) => {
                            let v: serde_json::Value = serde_json::from_str(f)
                                .map_err(|e| SmokeError::Check(format!("filter {f}: {e}")))?;
                            match Bson::try_from(v)
                                .map_err(|e| SmokeError::Check(format!("filter {f}: {e}")))?
                            {
                                Bson::Document(d) => d,
                                _ => {
                                    return Err(SmokeError::Check(format!(
                                        "filter {f} is not a document"
                                    )));
                                }
                            }
                        }
                    };
                    let target = format!("{}.{coll}", self.target_db(db));
                    let n = client
                        .database(&self.target_db(db))
                        .collection::<Document>(coll)
                        .count_documents(filter.clone())
                        .await
                        .map_err(|e| SmokeError::Query {
                            query: target.clone(),
                            reason: e.to_string(),
                        })?;
                    Ok((
                        format!("{target} count {filter}"),
                        i64::try_from(n).unwrap_or(i64::MAX),
                    ))
                }
            })
            .await
        }
        .boxed()
    }

    fn begin<'a>(
        &'a self,
        main: &'a Manifest,
        job_id: &'a str,
        namespaces: &'a [String],
    ) -> BoxFuture<'a, Result<Box<dyn RestoreSession>, RestoreError>> {
        async move {
            let session = self.start(main, job_id, namespaces).await?;
            Ok(Box::new(session) as Box<dyn RestoreSession>)
        }
        .boxed()
    }

    /// The dump restored as by [`Restorer::begin`], then the oplog slices of `to.oplog`
    /// replayed after its window, up to `to.time`.
    fn begin_to_time<'a>(
        &'a self,
        main: &'a Manifest,
        job_id: &'a str,
        to: &'a PointInTime,
    ) -> BoxFuture<'a, Result<Box<dyn RestoreSession>, RestoreError>> {
        async move {
            let plan = to.oplog.clone().ok_or_else(|| {
                RestoreError::Manifest(format!(
                    "{}: a MongoDB restore to a point in time replays oplog slices, and none were found",
                    main.file
                ))
            })?;
            let mut session = self.start(main, job_id, &[]).await?;
            session.pitr = Some(Pitr {
                time: to.time,
                plan,
                done: Default::default(),
            });
            Ok(Box::new(session) as Box<dyn RestoreSession>)
        }
        .boxed()
    }
}

impl Mongo {
    /// [`Restorer::begin`]'s session.
    async fn start(
        &self,
        main: &Manifest,
        job_id: &str,
        namespaces: &[String],
    ) -> Result<MongoRestore, RestoreError> {
        {
            crate::datastore::expect_main(main, "mongodb", &MAIN, "a MongoDB archive")?;
            let client = self.client().await.map_err(RestoreError::from)?;
            if let Some(counts) = main.counts.get("namespaces").and_then(|n| n.as_object())
                && let Some(missing) = namespaces.iter().find(|n| !counts.contains_key(*n))
            {
                return Err(RestoreError::Manifest(format!(
                    "namespace {missing} is not in {}; it holds {}",
                    main.file,
                    counts.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
            // Every database of the archive is restored into a scratch database beside
            // its target, checked, and only then moved into place. Its marker, written
            // first, names it as this job's ([`swap`]).
            let mut scratch = self.clone();
            let mut scratch_dbs = BTreeMap::new();
            let all: Vec<&String> = main
                .counts
                .get("namespaces")
                .and_then(|n| n.as_object())
                .map(|n| n.keys().collect())
                .unwrap_or_default();
            if let Some(ns) = all
                .iter()
                .find(|ns| ns.split_once('.').is_some_and(|(_, c)| c == swap::MARKER))
            {
                return Err(RestoreError::Manifest(format!(
                    "{} holds {ns}, a collection name Ferry keeps for the marker of its scratch databases; \
                     restore it with stock mongorestore (README, \"When Ferry is gone\")",
                    main.file
                )));
            }
            let sources: std::collections::BTreeSet<&str> = all
                .iter()
                .filter_map(|k| k.split_once('.').map(|(d, _)| d))
                .collect();
            // scratch database → its target
            let mut made: BTreeMap<String, String> = BTreeMap::new();
            for db in sources {
                let target = self.target_db(db);
                let name = swap::scratch_name(&target, job_id);
                match made.get(&name) {
                    Some(other) if *other == target => {}
                    Some(other) => {
                        return Err(RestoreError::Target(format!(
                            "the scratch databases of {other} and {target} would both be {name} (a name is cut \
                             to fit MongoDB's 63 bytes): make their first characters differ with `rename`"
                        )));
                    }
                    None => {
                        client.database(&name).drop().await.map_err(tgt)?;
                        swap::create(&client, &name, (&self.cfg.name, job_id), (db, &target))
                            .await?;
                        made.insert(name.clone(), target);
                    }
                }
                scratch.cfg.rename.insert(db.to_owned(), name.clone());
                scratch_dbs.insert(db.to_owned(), name);
            }
            Ok(MongoRestore {
                mongo: self.clone(),
                scratch,
                scratch_dbs,
                client,
                only: namespaces.to_vec(),
                replaced: Replaced::default(),
                replay: Default::default(),
                committed: false,
                pitr: None,
            })
        }
    }
}

/// A restore to a point in time: the slices to replay after the dump's window, and what
/// their replay did.
#[derive(Clone)]
struct Pitr {
    time: chrono::DateTime<chrono::Utc>,
    plan: OplogPlan,
    done: std::sync::Arc<std::sync::Mutex<Option<SlicesReplayed>>>,
}

/// What the replay of the slices did.
#[derive(Clone, Debug, Default)]
struct SlicesReplayed {
    slices: usize,
    entries: u64,
    /// `wall` of the last entry applied, UTC.
    last: Option<chrono::DateTime<chrono::Utc>>,
}

/// `wall` of an oplog entry (its `ts` seconds without one), UTC.
fn entry_wall(entry: &Document) -> Option<chrono::DateTime<chrono::Utc>> {
    match entry.get_datetime("wall") {
        Ok(w) => chrono::DateTime::from_timestamp_millis(w.timestamp_millis()),
        Err(_) => entry
            .get_timestamp("ts")
            .ok()
            .and_then(|t| chrono::DateTime::from_timestamp(i64::from(t.time), 0)),
    }
}

/// Replays `pitr`'s slices after the dump's window into `replay`: every entry after the
/// window's last one whose `wall` is at or before the instant, strictly in order.
async fn replay_slices(pitr: &Pitr, replay: &mut Replay) -> Result<SlicesReplayed, RestoreError> {
    let mut done = SlicesReplayed::default();
    let end = pitr.plan.window_end;
    for slice in &pitr.plan.slices {
        let bytes = (pitr.plan.fetch)(slice.clone())
            .await
            .map_err(RestoreError::Manifest)?;
        done.slices += 1;
        let mut rest = bytes.as_slice();
        while !rest.is_empty() {
            let entry = Document::from_reader(&mut rest).map_err(|e| {
                RestoreError::Manifest(format!("{}: an entry that is not BSON: {e}", slice.path))
            })?;
            let ts = entry.get_timestamp("ts").map_err(|e| {
                RestoreError::Manifest(format!("{}: an entry without its ts: {e}", slice.path))
            })?;
            if (ts.time, ts.increment) <= (end.t, end.i) {
                continue;
            }
            let wall = entry_wall(&entry).ok_or_else(|| {
                RestoreError::Manifest(format!("{}: an entry without a time", slice.path))
            })?;
            if wall > pitr.time {
                return Ok(done);
            }
            replay.apply(&entry).await?;
            done.entries += 1;
            done.last = Some(wall);
        }
    }
    Ok(done)
}

/// A MongoDB restore in progress.
struct MongoRestore {
    mongo: Mongo,
    /// `mongo` with every archive database mapped to its scratch database.
    scratch: Mongo,
    /// Every database of the archive → its scratch database.
    scratch_dbs: BTreeMap<String, String>,
    client: Client,
    /// Only these `db.collection` namespaces; all when empty.
    only: Vec<String>,
    /// Target namespaces replaced so far by the final moves.
    replaced: Replaced,
    /// What the oplog replay did, once the archive has been applied.
    replay: std::sync::Arc<std::sync::Mutex<Option<ReplayReport>>>,
    /// Whether a marker was set to `swapping` (the commit point, [`swap`]): from then on
    /// a failure keeps the scratch databases, for the agent to finish the move.
    committed: bool,
    /// A restore to a point in time: the slices replayed after the dump.
    pitr: Option<Pitr>,
}

/// The target namespaces a restore has dropped so far, shared with its applier task.
pub(super) type Replaced = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

#[derive(Debug, Default)]
struct RestoreStats {
    documents: i64,
    /// `None` when the archive holds no oplog.
    oplog: Option<ReplayReport>,
}

/// Parses a collection's metadata from an archive's prelude (canonical Extended JSON, as
/// mongodump writes to `<coll>.metadata.json`) into a document; empty metadata is an
/// empty document. Public for the fuzz target `fuzz/fuzz_targets/mongo_archive.rs`.
///
/// # Errors
/// [`RestoreError::Manifest`] naming the namespace: not JSON, or not a document.
pub fn parse_metadata(m: &CollectionMetadata) -> Result<Document, RestoreError> {
    if m.metadata.is_empty() {
        return Ok(doc! {});
    }
    let json: serde_json::Value = serde_json::from_str(&m.metadata).map_err(|e| {
        RestoreError::Manifest(format!("metadata of {}.{}: {e}", m.db, m.collection))
    })?;
    match Bson::try_from(json) {
        Ok(Bson::Document(d)) => Ok(d),
        _ => Err(RestoreError::Manifest(format!(
            "metadata of {}.{} is not a document",
            m.db, m.collection
        ))),
    }
}

async fn prepare_namespace(
    client: &Client,
    target_db: &str,
    m: &CollectionMetadata,
    replaced: &Replaced,
) -> Result<(), RestoreError> {
    let meta = parse_metadata(m)?;
    let db = client.database(target_db);
    replaced
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(format!("{target_db}.{}", m.collection));
    db.collection::<Document>(&m.collection)
        .drop()
        .await
        .map_err(tgt)?;
    let mut create = doc! {"create": &m.collection};
    if let Ok(options) = meta.get_document("options") {
        for (k, v) in options {
            create.insert(k.clone(), v.clone());
        }
    }
    db.run_command(create)
        .await
        .map_err(|e| RestoreError::Target(format!("creating {target_db}.{}: {e}", m.collection)))?;
    Ok(())
}

async fn build_indexes(
    client: &Client,
    target_db: &str,
    m: &CollectionMetadata,
) -> Result<(), RestoreError> {
    let meta = parse_metadata(m)?;
    let specs: Vec<Document> = meta
        .get_array("indexes")
        .map(|a| a.iter().filter_map(|i| i.as_document().cloned()).collect())
        .unwrap_or_default();
    let specs: Vec<Document> = specs
        .into_iter()
        .filter(|s| s.get_str("name").ok() != Some("_id_"))
        .map(|mut s| {
            s.remove("ns");
            s
        })
        .collect();
    if specs.is_empty() {
        return Ok(());
    }
    client
        .database(target_db)
        .run_command(doc! {"createIndexes": &m.collection, "indexes": specs})
        .await
        .map_err(|e| {
            RestoreError::Target(format!("indexes of {target_db}.{}: {e}", m.collection))
        })?;
    Ok(())
}

/// The documents of one `insert` command being gathered: the command's `documents` array,
/// built from the archive's raw BSON without parsing it (the driver's `insert_many` would
/// serialise every document again, and hold them twice more while it builds its message).
#[derive(Default)]
pub(super) struct InsertBatch {
    documents: RawArrayBuf,
    /// Bytes of the documents in `documents`.
    bytes: usize,
    /// Documents in `documents`.
    count: usize,
}

impl InsertBatch {
    /// Whether adding a document of `bytes` bytes should wait for a flush first: the batch
    /// would pass [`INSERT_BYTES`] or [`INSERT_DOCUMENTS`]. A batch takes one document
    /// whatever its size.
    fn full_before(&self, bytes: usize) -> bool {
        self.count > 0 && (self.bytes + bytes > INSERT_BYTES || self.count >= INSERT_DOCUMENTS)
    }

    fn push(&mut self, document: RawDocumentBuf) {
        self.bytes += document.as_bytes().len();
        self.count += 1;
        self.documents.push(document);
    }
}

/// Most bytes of a server's error message quoted in a restore's error.
const MAX_ERROR_BYTES: usize = 512;

/// Most documents per `insert` command (MongoDB's `maxWriteBatchSize` is 100,000).
const INSERT_DOCUMENTS: usize = 10_000;

/// Sends `batch` (then empty) to `target_db.coll` as one `insert` command
/// (<https://www.mongodb.com/docs/manual/reference/command/insert/>), ordered, and checks
/// its reply: an empty batch sends nothing.
///
/// # Errors
/// [`RestoreError::Target`] naming the collection: the command failed, or its reply holds
/// `writeErrors` or a `writeConcernError`, or counts other than the documents sent (`n`).
async fn flush_inserts(
    client: &Client,
    target_db: &str,
    coll: &str,
    batch: &mut InsertBatch,
) -> Result<(), RestoreError> {
    if batch.count == 0 {
        return Ok(());
    }
    let InsertBatch {
        documents, count, ..
    } = std::mem::take(batch);
    let mut command = rawdoc! {"insert": coll, "ordered": true};
    command.append("documents", documents);
    let failed =
        |e: String| RestoreError::Target(format!("inserting into {target_db}.{coll}: {e}"));
    let reply = client
        .database(target_db)
        .run_raw_command(command)
        .await
        .map_err(|e| failed(e.to_string()))?;
    insert_reply_problem(&reply, count).map_or(Ok(()), |e| Err(failed(e)))
}

/// What is wrong with the reply to an `insert` command that sent `sent` documents, if
/// anything: a reply with `ok: 1` may still hold `writeErrors` (the first is named, with
/// how many there were) or a `writeConcernError`, and `n` is the documents inserted.
fn insert_reply_problem(reply: &Document, sent: usize) -> Option<String> {
    if let Ok(errors) = reply.get_array("writeErrors")
        && !errors.is_empty()
    {
        let first = errors
            .first()
            .and_then(|e| e.as_document())
            .map(|e| {
                format!(
                    "code {}: {}",
                    e.get("code").map(ToString::to_string).unwrap_or_default(),
                    e.get_str("errmsg").unwrap_or_default()
                )
            })
            .unwrap_or_default();
        return Some(format!(
            "{} of {sent} documents refused, the first with {}",
            errors.len(),
            &first[..first.floor_char_boundary(MAX_ERROR_BYTES)]
        ));
    }
    if let Ok(e) = reply.get_document("writeConcernError") {
        let message = e.get_str("errmsg").unwrap_or_default();
        return Some(format!(
            "write concern error: {}",
            &message[..message.floor_char_boundary(MAX_ERROR_BYTES)]
        ));
    }
    let n = match reply.get("n") {
        Some(Bson::Int32(n)) => i64::from(*n),
        Some(Bson::Int64(n)) => *n,
        Some(Bson::Double(n)) => *n as i64,
        _ => -1,
    };
    (usize::try_from(n).ok() != Some(sent))
        .then(|| format!("the server reports {n} documents inserted of {sent} sent"))
}

/// The async side of a restore: applies parsed archive items into the scratch databases
/// (`mongo` maps each archive database to its scratch database, as `scratch_dbs` does):
/// collections as they stream, views before the oplog replay (or at the end without one),
/// then the oplog window replayed ([`oplog`]).
async fn apply_items(
    mongo: Mongo,
    scratch_dbs: BTreeMap<String, String>,
    client: Client,
    prelude: Vec<CollectionMetadata>,
    mut items: mpsc::Receiver<Vec<Item>>,
    (only, pitr): (Vec<String>, Option<Pitr>),
    replaced: Replaced,
) -> Result<RestoreStats, RestoreError> {
    let meta: HashMap<Namespace, CollectionMetadata> = prelude
        .iter()
        .map(|m| ((m.db.clone(), m.collection.clone()), m.clone()))
        .collect();
    let mut prepared: std::collections::HashSet<Namespace> = Default::default();
    let mut pending: HashMap<Namespace, InsertBatch> = HashMap::new();
    let mut stats = RestoreStats::default();
    let is_oplog = |ns: &Namespace| ns.0.is_empty() && ns.1 == "oplog";
    let wanted =
        |db: &str, coll: &str| only.is_empty() || only.iter().any(|n| *n == format!("{db}.{coll}"));
    let known: std::collections::BTreeSet<String> = prelude
        .iter()
        .filter(|m| !m.db.is_empty() && wanted(&m.db, &m.collection))
        .map(|m| format!("{}.{}", m.db, m.collection))
        .collect();
    let mut replay: Option<Replay> = None;
    let new_replay = || {
        Replay::new(
            client.clone(),
            scratch_dbs.clone(),
            only.clone(),
            known.clone(),
        )
    };
    let mut views_made = false;
    // Views once the collections they read from exist, and before the oplog, which may
    // drop or create some.
    let make_views = async |client: &Client| -> Result<(), RestoreError> {
        for m in prelude
            .iter()
            .filter(|m| m.kind == "view" && wanted(&m.db, &m.collection))
        {
            prepare_namespace(client, &mongo.target_db(&m.db), m, &replaced).await?;
        }
        Ok(())
    };
    while let Some(batch) = items.recv().await {
        for item in batch {
            let ns = match &item {
                Item::Document { ns, .. } | Item::End(ns) => ns.clone(),
            };
            if !is_oplog(&ns) && !wanted(&ns.0, &ns.1) {
                continue;
            }
            // A view's (empty) segment and EOF marker: views are made from the prelude.
            if meta.get(&ns).is_some_and(|m| m.kind == "view") {
                continue;
            }
            if !is_oplog(&ns) && !prepared.contains(&ns) {
                let m = meta.get(&ns).ok_or_else(|| {
                    RestoreError::Manifest(format!(
                        "archive holds {}.{}, which its prelude does not list",
                        ns.0, ns.1
                    ))
                })?;
                prepare_namespace(&client, &mongo.target_db(&ns.0), m, &replaced).await?;
                prepared.insert(ns.clone());
            }
            match item {
                Item::Document { bytes, .. } if is_oplog(&ns) => {
                    let entry = Document::from_reader(bytes.as_slice()).map_err(|e| {
                        RestoreError::Manifest(format!("an oplog entry of the archive: {e}"))
                    })?;
                    if !views_made {
                        make_views(&client).await?;
                        views_made = true;
                    }
                    replay.get_or_insert_with(new_replay).apply(&entry).await?;
                }
                Item::Document { bytes, .. } => {
                    let raw = RawDocumentBuf::from_bytes(bytes)
                        .map_err(|e| RestoreError::Manifest(e.to_string()))?;
                    let slot = pending.entry(ns.clone()).or_default();
                    if slot.full_before(raw.as_bytes().len()) {
                        flush_inserts(&client, &mongo.target_db(&ns.0), &ns.1, slot).await?;
                    }
                    slot.push(raw);
                    stats.documents += 1;
                }
                Item::End(_) if is_oplog(&ns) => {}
                Item::End(_) => {
                    if let Some(mut docs) = pending.remove(&ns) {
                        flush_inserts(&client, &mongo.target_db(&ns.0), &ns.1, &mut docs).await?;
                    }
                    build_indexes(&client, &mongo.target_db(&ns.0), &meta[&ns]).await?;
                }
            }
        }
    }
    if !views_made {
        make_views(&client).await?;
    }
    if prelude
        .iter()
        .any(|m| is_oplog(&(m.db.clone(), m.collection.clone())))
    {
        let mut replay = replay.unwrap_or_else(new_replay);
        if let Some(p) = &pitr {
            let done = replay_slices(p, &mut replay).await?;
            *p.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(done);
        }
        replay.finish()?;
        stats.oplog = Some(replay.report);
    } else if pitr.is_some() {
        return Err(RestoreError::Manifest(
            "the archive holds no oplog window: it cannot start a restore to a point in time"
                .into(),
        ));
    }
    Ok(stats)
}

impl MongoRestore {
    /// Drops every scratch database of this restore (best effort: a leftover is logged).
    async fn drop_scratch(&self) {
        for name in self.scratch_dbs.values() {
            if let Err(e) = self.client.database(name).drop().await {
                tracing::warn!(database = %name, error = %e, "Could not drop a scratch database.");
            }
        }
    }
}

/// Whether the server keeps a collection's options across `renameCollection` (MongoDB
/// does; some wire-compatible servers do not): renames a small capped probe collection
/// within `db` and looks. The probe is dropped.
pub(super) async fn rename_keeps_options(client: &Client, db: &str) -> bool {
    let probe = "ferry_rename_probe";
    let d = client.database(db);
    let created = d
        .run_command(doc! {"create": probe, "capped": true, "size": 4096i64})
        .await;
    let renamed = created.is_ok()
        && client
            .database("admin")
            .run_command(doc! {
                "renameCollection": format!("{db}.{probe}"),
                "to": format!("{db}.{probe}_2"),
                "dropTarget": true,
            })
            .await
            .is_ok();
    let keeps = renamed
        && collection_options(client, db, &format!("{probe}_2"))
            .await
            .is_ok_and(|o| o.get_bool("capped").unwrap_or(false));
    for name in [probe.to_owned(), format!("{probe}_2")] {
        let _ = d.collection::<Document>(&name).drop().await;
    }
    keeps
}

/// The `listCollections` entry of collection or view `db.coll` (`name`, `type`,
/// `options`, `info`), `None` if there is none.
pub(super) async fn collection_spec(
    client: &Client,
    db: &str,
    coll: &str,
) -> Result<Option<Document>, RestoreError> {
    let spec = client
        .database(db)
        .run_command(doc! {"listCollections": 1, "filter": {"name": coll}})
        .await
        .map_err(|e| RestoreError::Target(format!("listing {db}.{coll}: {e}")))?;
    Ok(spec
        .get_document("cursor")
        .ok()
        .and_then(|c| c.get_array("firstBatch").ok())
        .and_then(|b| b.first())
        .and_then(|v| v.as_document())
        .cloned())
}

/// The `options` of collection or view `db.coll` as `listCollections` reports them.
pub(super) async fn collection_options(
    client: &Client,
    db: &str,
    coll: &str,
) -> Result<Document, RestoreError> {
    Ok(collection_spec(client, db, coll)
        .await?
        .and_then(|d| d.get_document("options").ok().cloned())
        .unwrap_or_default())
}

/// Replaces collection `to` (database, collection) with a copy of `from`: created with
/// `options`, documents copied as raw BSON in [`INSERT_BYTES`] batches, the indexes
/// rebuilt, the source dropped.
pub(super) async fn copy_collection(
    client: &Client,
    (from, from_coll): (&str, &str),
    (to, coll): (&str, &str),
    options: Document,
) -> Result<(), RestoreError> {
    let target = client.database(to);
    target
        .collection::<Document>(coll)
        .drop()
        .await
        .map_err(tgt)?;
    let mut create = doc! {"create": coll};
    for (k, v) in options {
        create.insert(k, v);
    }
    target
        .run_command(create)
        .await
        .map_err(|e| RestoreError::Target(format!("creating {to}.{coll}: {e}")))?;
    let source = client
        .database(from)
        .collection::<RawDocumentBuf>(from_coll);
    let mut cursor = source.find(doc! {}).await.map_err(tgt)?;
    let mut batch = InsertBatch::default();
    while cursor.advance().await.map_err(tgt)? {
        let d = cursor.current();
        if batch.full_before(d.as_bytes().len()) {
            flush_inserts(client, to, coll, &mut batch).await?;
        }
        batch.push(d.to_raw_document_buf());
    }
    flush_inserts(client, to, coll, &mut batch).await?;
    let listed = client
        .database(from)
        .run_command(doc! {"listIndexes": from_coll})
        .await
        .map_err(tgt)?;
    let indexes: Vec<Document> = listed
        .get_document("cursor")
        .ok()
        .and_then(|c| c.get_array("firstBatch").ok())
        .into_iter()
        .flatten()
        .filter_map(|i| i.as_document().cloned())
        .filter(|i| i.get_str("name").ok() != Some("_id_"))
        .map(|mut i| {
            i.remove("ns");
            i.remove("v");
            i
        })
        .collect();
    if !indexes.is_empty() {
        target
            .run_command(doc! {"createIndexes": coll, "indexes": indexes})
            .await
            .map_err(|e| RestoreError::Target(format!("indexes of {to}.{coll}: {e}")))?;
    }
    client
        .database(from)
        .collection::<Document>(from_coll)
        .drop()
        .await
        .map_err(tgt)?;
    Ok(())
}

impl RestoreSession for MongoRestore {
    fn part<'a>(
        &'a mut self,
        manifest: &'a Manifest,
    ) -> BoxFuture<'a, Result<PartSink, RestoreError>> {
        async move {
            if manifest.format != MAIN.format {
                return Err(RestoreError::Manifest(format!(
                    "{}: not a MongoDB archive",
                    manifest.file
                )));
            }
            let (byte_tx, byte_rx) = mpsc::channel::<Vec<u8>>(chunks::CHANNEL_CHUNKS);
            let (item_tx, item_rx) = mpsc::channel::<Vec<Item>>(2);
            let (prelude_tx, prelude_rx) = tokio::sync::oneshot::channel();
            // Parse on a blocking thread; apply on the runtime.
            let parser = tokio::task::spawn_blocking(move || -> io::Result<()> {
                let mut reader = ArchiveReader::new(ChannelReader {
                    rx: byte_rx,
                    current: Vec::new(),
                    pos: 0,
                })?;
                let _ = prelude_tx.send(reader.collections.clone());
                let mut batch = Vec::new();
                let mut bytes = 0;
                while let Some(item) = reader.next_item()? {
                    if let Item::Document { bytes: b, .. } = &item {
                        bytes += b.len();
                    }
                    let end = matches!(item, Item::End(_));
                    batch.push(item);
                    if bytes >= chunks::READ_CHUNK_BYTES || end {
                        bytes = 0;
                        if item_tx.blocking_send(std::mem::take(&mut batch)).is_err() {
                            return Err(io::Error::other("the restore stopped"));
                        }
                    }
                }
                if !batch.is_empty() {
                    let _ = item_tx.blocking_send(batch);
                }
                Ok(())
            });
            let mongo = self.scratch.clone();
            let scratch_dbs = self.scratch_dbs.clone();
            let report = self.replay.clone();
            let client = self.client.clone();
            let only = self.only.clone();
            let pitr = self.pitr.clone();
            // Scratch namespaces: nothing live is replaced while the archive streams.
            let replaced = Replaced::default();
            let applier = tokio::spawn(async move {
                let prelude = prelude_rx.await.map_err(|_| {
                    RestoreError::Manifest("the archive has no readable prelude".into())
                })?;
                apply_items(
                    mongo,
                    scratch_dbs,
                    client,
                    prelude,
                    item_rx,
                    (only, pitr),
                    replaced,
                )
                .await
            });
            let finish = async move {
                let parsed = parser.await.map_err(tgt)?;
                let applied = applier.await.map_err(tgt)?;
                // The parser's error (truncation, CRC) explains an applier that saw the end early.
                parsed.map_err(|e| RestoreError::Manifest(format!("archive: {e}")))?;
                let stats = applied?;
                match &stats.oplog {
                    Some(r) => tracing::info!(
                        documents = stats.documents,
                        oplog_applied = r.applied,
                        oplog_superseded = r.superseded,
                        oplog_noops = r.noops,
                        oplog_outside = r.outside,
                        "MongoDB archive applied and its oplog replayed."
                    ),
                    None => tracing::info!(documents = stats.documents, "MongoDB archive applied."),
                }
                *report.lock().unwrap_or_else(|e| e.into_inner()) = stats.oplog;
                Ok(())
            };
            Ok(PartSink {
                writer: Box::new(ChannelWriter {
                    tx: byte_tx,
                    buf: chunks::read_buffer(),
                }),
                finish: finish.boxed(),
            })
        }
        .boxed()
    }

    fn commit<'a>(&'a mut self, main: &'a Manifest) -> BoxFuture<'a, Result<String, RestoreError>> {
        async move {
            let namespaces = main
                .counts
                .get("namespaces")
                .and_then(|n| n.as_object())
                .ok_or_else(|| RestoreError::Manifest(format!("manifest of {} has no namespace counts", main.file)))?;
            let replay = self.replay.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let (changed, ddl) = match &replay {
                Some(r) => (r.changed.clone(), r.ddl.clone()),
                None => Default::default(),
            };
            let selected = |ns: &String| self.only.is_empty() || self.only.contains(ns);
            // Checked beside the live data. A namespace the oplog replay wrote to has the
            // count of the window's end, not the dump's; one a command changed (dropped,
            // renamed, re-indexed) has the indexes the oplog gave it.
            let mut diffs = Vec::new();
            for (ns, c) in namespaces.iter().filter(|(ns, _)| selected(ns)) {
                if c["type"] == "view" || ddl.contains(ns) {
                    continue;
                }
                let Some((db, coll)) = ns.split_once('.') else { continue };
                let target = self.scratch.target_db(db);
                let collection = self.client.database(&target).collection::<Document>(coll);
                let expected = c["documents"].as_i64().unwrap_or(-1);
                if !changed.contains(ns) {
                    let found = collection.count_documents(doc! {}).await.map_err(tgt)? as i64;
                    if found != expected {
                        diffs.push(format!("{target}.{coll}: {expected} documents in the manifest, {found} restored"));
                    }
                }
                let names: Vec<String> = collection
                    .list_index_names()
                    .await
                    .map_err(tgt)?;
                for want in c["indexes"].as_array().into_iter().flatten().filter_map(|v| v.as_str()) {
                    if !names.iter().any(|n| n == want) {
                        diffs.push(format!("{target}.{coll}: index {want} is missing"));
                    }
                }
            }
            if !diffs.is_empty() {
                return Err(RestoreError::Mismatch(diffs.join("; ")));
            }
            // Verified beside the live data: move each namespace into place (the archive's,
            // and those the oplog created, dropped or renamed), recreating the views (a view
            // cannot be renamed) and dropping in the target what the oplog dropped; then
            // drop the scratch databases. The plan of each move goes into its scratch
            // database's marker first, then every marker is set to `swapping`, the commit
            // point: a stop from then on is finished by the agent's recovery ([`swap`]).
            let chosen: BTreeMap<String, Option<&serde_json::Value>> = namespaces
                .iter()
                .filter(|(ns, _)| selected(ns))
                .map(|(ns, c)| (ns.clone(), Some(c)))
                .chain(ddl.iter().filter(|ns| selected(ns)).map(|ns| (ns.clone(), None)))
                .fold(BTreeMap::new(), |mut all, (ns, c)| {
                    let slot = all.entry(ns).or_insert(None);
                    *slot = slot.or(c);
                    all
                });
            // scratch database → (its target, its plan)
            let mut plans: BTreeMap<String, (String, swap::Plan)> = self
                .scratch_dbs
                .iter()
                .map(|(db, name)| (name.clone(), (self.mongo.target_db(db), swap::Plan::default())))
                .collect();
            for ns in chosen.keys() {
                let Some((db, coll)) = ns.split_once('.') else { continue };
                let Some(name) = self.scratch_dbs.get(db) else { continue };
                let (_, plan) = plans.get_mut(name).expect("every scratch database has a plan");
                match collection_spec(&self.client, name, coll).await? {
                    // Dropped (or renamed away) by the oplog: so in the target too.
                    None => plan.drops.push(coll.to_owned()),
                    Some(spec) if spec.get_str("type") == Ok("view") => plan.views.push(coll.to_owned()),
                    Some(_) => plan.moves.push(coll.to_owned()),
                }
            }
            for (name, (_, plan)) in &plans {
                swap::set_plan(&self.client, name, plan).await?;
            }
            for name in plans.keys() {
                swap::set_state(&self.client, name, swap::State::Swapping).await?;
                self.committed = true;
            }
            let mut rename_keeps: Option<bool> = None;
            let (mut moved, mut dropped, mut total) = (0usize, 0usize, 0i64);
            for (name, (target, plan)) in &plans {
                let done = swap::move_into_place(
                    &self.client,
                    (name, target),
                    plan,
                    &mut rename_keeps,
                    &self.replaced,
                )
                .await?;
                moved += done.namespaces;
                dropped += done.dropped;
                total += done.documents;
            }
            self.drop_scratch().await;
            let mut summary = format!(
                "{moved} namespaces, {total} documents restored, counts and indexes equal to the manifest"
            );
            if let Some(r) = replay {
                summary.push_str(&format!(
                    " where the oplog did not change them; oplog: {} entries applied",
                    r.applied
                ));
                let mut notes = Vec::new();
                if r.superseded > 0 {
                    notes.push(format!(
                        "{} of them updates of documents a later entry deletes",
                        r.superseded
                    ));
                }
                if r.noops > 0 {
                    notes.push(format!("{} no-ops", r.noops));
                }
                if r.outside > 0 {
                    notes.push(format!("{} entries of other namespaces skipped", r.outside));
                }
                if dropped > 0 {
                    notes.push(format!("{dropped} namespaces dropped as in the source"));
                }
                if !notes.is_empty() {
                    summary.push_str(&format!(" ({})", notes.join("; ")));
                }
            }
            if let Some(p) = &self.pitr {
                let done = p.done.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default();
                summary.push_str(&format!(
                    "; replayed to {}: {} oplog slices, {} entries after the dump's window{}",
                    p.time.to_rfc3339(),
                    done.slices,
                    done.entries,
                    done.last
                        .map(|l| format!(", the last written at {}", l.to_rfc3339()))
                        .unwrap_or_default()
                ));
            }
            Ok(summary)
        }
        .boxed()
    }

    fn recovered_to(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.pitr.as_ref().and_then(|p| {
            p.done
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()?
                .last
        })
    }

    fn target_state(&self) -> Option<String> {
        if !self.committed {
            return None;
        }
        let replaced = self.replaced.lock().unwrap_or_else(|e| e.into_inner());
        let done = if replaced.is_empty() {
            "no namespace was replaced yet".to_owned()
        } else {
            format!(
                "these namespaces were already replaced by their restored, verified copies: {}",
                replaced.join(", ")
            )
        };
        let scratch: std::collections::BTreeSet<&String> = self.scratch_dbs.values().collect();
        Some(format!(
            "the restore was verified and its move into place had begun ({done}); the rest of it is in {}, \
             which the agent moves into place when it starts and before the next restore of this datastore",
            scratch.into_iter().cloned().collect::<Vec<_>>().join(", ")
        ))
    }

    fn abort<'a>(&'a mut self) -> BoxFuture<'a, ()> {
        async move {
            if self.committed {
                // Past the commit point: targets may be partly replaced, and the previous
                // data of those is gone. The scratch databases stay for the agent's
                // recovery to finish the move ([`swap::recover`]), never a half-replaced
                // target for good.
                tracing::warn!(databases = ?self.scratch_dbs.values().collect::<Vec<_>>(),
                    "Restore stopped while moving into place; its scratch databases are kept for the agent to finish the move.");
                return;
            }
            self.drop_scratch().await;
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_insert_reply_is_accepted_only_when_it_counts_every_document_sent() {
        assert_eq!(insert_reply_problem(&doc! {"n": 3, "ok": 1.0}, 3), None);
        assert_eq!(insert_reply_problem(&doc! {"n": 3_i64, "ok": 1}, 3), None);
        assert_eq!(
            insert_reply_problem(&doc! {"n": 2, "ok": 1.0}, 3).as_deref(),
            Some("the server reports 2 documents inserted of 3 sent")
        );
        assert_eq!(
            insert_reply_problem(&doc! {"ok": 1.0}, 1).as_deref(),
            Some("the server reports -1 documents inserted of 1 sent")
        );
    }

    #[test]
    fn write_errors_in_an_ok_reply_fail_the_insert_with_a_bounded_message() {
        let long = "é".repeat(10_000);
        let reply = doc! {
            "n": 1,
            "writeErrors": [
                {"index": 1, "code": 11000, "errmsg": format!("E11000 duplicate key {long}")},
                {"index": 2, "code": 11000, "errmsg": "E11000 duplicate key"},
            ],
            "ok": 1.0,
        };
        let problem = insert_reply_problem(&reply, 3).unwrap();
        assert!(
            problem.starts_with(
                "2 of 3 documents refused, the first with code 11000: E11000 duplicate key é"
            ),
            "{problem}"
        );
        assert!(problem.len() < 600, "{}", problem.len());

        let reply = doc! {"n": 3, "writeConcernError": {"code": 64, "errmsg": "waiting for replication timed out"}, "ok": 1};
        assert_eq!(
            insert_reply_problem(&reply, 3).as_deref(),
            Some("write concern error: waiting for replication timed out")
        );
    }

    #[test]
    fn a_batch_takes_documents_up_to_its_bounds_and_one_document_whatever_its_size() {
        let mut batch = InsertBatch::default();
        assert!(
            !batch.full_before(INSERT_BYTES * 4),
            "an empty batch takes any document"
        );
        let doc = rawdoc! {"_id": 1, "v": "x".repeat(1000)};
        batch.push(doc.clone());
        assert!(!batch.full_before(INSERT_BYTES - doc.as_bytes().len()));
        assert!(batch.full_before(INSERT_BYTES - doc.as_bytes().len() + 1));
        let mut many = InsertBatch::default();
        for _ in 0..INSERT_DOCUMENTS {
            many.push(rawdoc! {"_id": 1});
        }
        assert!(many.full_before(1));
        assert_eq!(many.documents.into_iter().count(), INSERT_DOCUMENTS);
    }
}
