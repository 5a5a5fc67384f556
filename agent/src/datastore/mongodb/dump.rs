//! The backup side: every collection and view of the chosen databases, with options and
//! indexes, written in the mongodump archive format from the driver's raw batches, and on
//! a replica set the oplog over the dump window.

use std::collections::{BTreeMap, HashMap};

use bson::{Bson, Document, RawDocumentBuf, doc};
use futures::FutureExt;
use futures::TryStreamExt;
use futures::future::BoxFuture;
use mongodb::Client;
use tokio::sync::mpsc;

use super::archive::{self, ArchiveWriter, CollectionMetadata, Header, Namespace};
use super::{ChannelReader, MAIN, Mongo, SEGMENT_BYTES, src};
use crate::datastore::{DumpError, DumpOutcome, DumpStream, Dumper, Part};
use crate::pipeline::chunks;
use ferry_core::manifest::Source;

/// Bytes of documents the dump asks for per cursor batch (the server's own cap is 16 MiB;
/// the driver holds a batch twice while it splits it into documents, so the smaller bound
/// keeps the agent's memory low). Turned into a document count with `collStats`'
/// `avgObjSize`. 2 MiB: with four jobs at once on one agent (`bench/` concurrent-jobs,
/// issue 20) the driver's batches of 4 MiB were the largest holder of the agent's heap
/// after zstd.
const BATCH_BYTES: f64 = 2.0 * 1024.0 * 1024.0;
/// Databases never dumped.
const SYSTEM_DATABASES: [&str; 3] = ["admin", "local", "config"];

impl Mongo {
    async fn dump_archive(self, tx: mpsc::Sender<Vec<u8>>) -> Result<DumpOutcome, DumpError> {
        let (client, member) = self.read_client().await.map_err(DumpError::from)?;
        let admin = client.database("admin");
        let version = admin
            .run_command(doc! {"buildInfo": 1})
            .await
            .map_err(src)?
            .get_str("version")
            .unwrap_or("0.0.0")
            .to_owned();
        let hello = admin.run_command(doc! {"hello": 1}).await.map_err(src)?;
        let replica_set = hello.get_str("setName").ok().map(str::to_owned);
        let oplog = client.database("local").collection::<Document>("oplog.rs");
        let last_ts = || async {
            oplog
                .find_one(doc! {})
                .sort(doc! {"$natural": -1})
                .await
                .map_err(src)
                .map(|d| d.and_then(|d| d.get_timestamp("ts").ok()))
        };
        let start_ts = match &replica_set {
            Some(_) => last_ts().await?,
            None => None,
        };

        let wanted: Vec<String> = match &self.cfg.databases {
            Some(list) => list.clone(),
            None => client
                .list_database_names()
                .await
                .map_err(src)?
                .into_iter()
                .filter(|d| !SYSTEM_DATABASES.contains(&d.as_str()))
                .collect(),
        };
        // The prelude needs every namespace first.
        let mut prelude = Vec::new();
        let mut indexes: HashMap<Namespace, Vec<String>> = HashMap::new();
        for db_name in &wanted {
            let db = client.database(db_name);
            let specs: Vec<Document> = db
                .run_cursor_command(doc! {"listCollections": 1})
                .await
                .map_err(src)?
                .try_collect()
                .await
                .map_err(src)?;
            let mut specs = specs;
            specs.sort_by(|a, b| {
                a.get_str("name")
                    .unwrap_or("")
                    .cmp(b.get_str("name").unwrap_or(""))
            });
            for spec in specs {
                let name = spec.get_str("name").map_err(src)?.to_owned();
                if name.starts_with("system.") {
                    continue;
                }
                let kind = spec.get_str("type").unwrap_or("collection").to_owned();
                let mut meta = doc! {};
                let index_specs: Vec<Document> = if kind == "view" {
                    Vec::new()
                } else {
                    db.run_cursor_command(doc! {"listIndexes": &name})
                        .await
                        .map_err(src)?
                        .try_collect()
                        .await
                        .map_err(src)?
                };
                indexes.insert(
                    (db_name.clone(), name.clone()),
                    index_specs
                        .iter()
                        .filter_map(|i| i.get_str("name").ok().map(str::to_owned))
                        .collect(),
                );
                meta.insert("indexes", index_specs);
                // As mongodump does (mongo-tools `common/db/namespaces.go`, GetUUID): the
                // hex of the UUID the server reports as binary subtype 4, where
                // `mongorestore --preserveUUID` looks for it.
                if let Ok(Bson::Binary(uuid)) = spec
                    .get_document("info")
                    .map(|i| i.get("uuid").cloned().unwrap_or(Bson::Null))
                    && uuid.subtype == bson::spec::BinarySubtype::Uuid
                {
                    meta.insert("uuid", hex::encode(&uuid.bytes));
                }
                meta.insert("collectionName", &name);
                meta.insert("type", &kind);
                meta.insert(
                    "options",
                    spec.get_document("options").cloned().unwrap_or_default(),
                );
                prelude.push(CollectionMetadata {
                    db: db_name.clone(),
                    collection: name,
                    metadata: Bson::Document(meta).into_canonical_extjson().to_string(),
                    size: 0,
                    kind,
                });
            }
        }
        if replica_set.is_some() {
            prelude.push(CollectionMetadata {
                db: String::new(),
                collection: "oplog".into(),
                metadata: String::new(),
                size: 0,
                kind: String::new(),
            });
        }
        let header = Header {
            concurrent_collections: 1,
            version: archive::FORMAT_VERSION.into(),
            server_version: version.clone(),
            tool_version: format!("ferry-agent {}", env!("CARGO_PKG_VERSION")),
        };
        let mut writer = ArchiveWriter::new(chunks::buffer(), &header, &prelude).map_err(src)?;
        let send = |buf: Vec<u8>| {
            let tx = tx.clone();
            async move {
                tx.send(buf)
                    .await
                    .map_err(|_| DumpError::Source("the pipeline stopped reading the dump".into()))
            }
        };
        let mut counts = BTreeMap::new();
        let mut docs = Vec::with_capacity(SEGMENT_BYTES);
        for meta in prelude
            .iter()
            .filter(|m| m.kind == "collection" || m.kind == "timeseries")
        {
            let coll = client
                .database(&meta.db)
                .collection::<RawDocumentBuf>(&meta.collection);
            let mut find = coll.find(doc! {});
            if let Some(n) = batch_size(&client, &meta.db, &meta.collection).await {
                find = find.batch_size(n);
            }
            let mut cursor = find.await.map_err(src)?;
            // The documents of the segment being filled, back to back: one buffer reused
            // for every segment, instead of a copy of each document.
            let mut n = 0i64;
            while cursor.advance().await.map_err(src)? {
                let doc = cursor.current().as_bytes();
                if !docs.is_empty() && docs.len() + doc.len() > SEGMENT_BYTES {
                    writer
                        .write_segment(&meta.db, &meta.collection, [&docs[..]])
                        .map_err(src)?;
                    docs.clear();
                    send(std::mem::replace(writer.get_mut(), chunks::buffer())).await?;
                }
                docs.extend_from_slice(doc);
                n += 1;
            }
            if !docs.is_empty() {
                writer
                    .write_segment(&meta.db, &meta.collection, [&docs[..]])
                    .map_err(src)?;
                docs.clear();
            }
            writer
                .end_namespace(&meta.db, &meta.collection)
                .map_err(src)?;
            send(std::mem::replace(writer.get_mut(), chunks::buffer())).await?;
            counts.insert(
                format!("{}.{}", meta.db, meta.collection),
                serde_json::json!({
                    "documents": n,
                    "indexes": indexes.get(&(meta.db.clone(), meta.collection.clone())).cloned().unwrap_or_default(),
                    "type": meta.kind,
                }),
            );
        }
        for meta in prelude.iter().filter(|m| m.kind == "view") {
            // No documents, but a segment and an EOF marker all the same, as mongodump
            // writes: stock mongorestore wants every namespace of the prelude closed.
            writer
                .end_namespace(&meta.db, &meta.collection)
                .map_err(src)?;
            counts.insert(
                format!("{}.{}", meta.db, meta.collection),
                serde_json::json!({"documents": 0, "indexes": [], "type": "view"}),
            );
        }
        let mut oplog_info = serde_json::Value::Null;
        if replica_set.is_some() {
            let end_ts = last_ts().await?;
            // As mongodump (`mongodump/oplog_dump.go`): the window starts at the entry at
            // the dump's start, `ts >= start`, so the oplog namespace is never empty (stock
            // `mongorestore --oplogReplay` fails on an empty one). The restore applies that
            // entry again; its effect is already in the dumped documents, and replaying it
            // changes nothing.
            let mut filter = doc! {};
            if let Some(s) = start_ts {
                filter.insert("ts", doc! {"$gte": s});
            }
            let mut entries = 0i64;
            if let Some(e) = end_ts {
                let mut range = filter.get_document("ts").cloned().unwrap_or_default();
                range.insert("$lte", e);
                filter.insert("ts", range);
                let raw_oplog = client
                    .database("local")
                    .collection::<RawDocumentBuf>("oplog.rs");
                let mut cursor = raw_oplog.find(filter).await.map_err(src)?;
                let mut first = None;
                while cursor.advance().await.map_err(src)? {
                    if entries == 0 {
                        first = cursor.current().get_timestamp("ts").ok();
                    }
                    let entry = cursor.current().as_bytes();
                    if !docs.is_empty() && docs.len() + entry.len() > SEGMENT_BYTES {
                        writer
                            .write_segment("", "oplog", [&docs[..]])
                            .map_err(src)?;
                        docs.clear();
                        send(std::mem::replace(writer.get_mut(), chunks::buffer())).await?;
                    }
                    docs.extend_from_slice(entry);
                    entries += 1;
                }
                if !docs.is_empty() {
                    writer
                        .write_segment("", "oplog", [&docs[..]])
                        .map_err(src)?;
                }
                // The window's first entry is the one at the start, unless the oplog rolled
                // over meanwhile (what mongodump checks too): entries are missing then.
                if let Some(s) = start_ts
                    && first != Some(s)
                {
                    return Err(DumpError::Source(format!(
                        "the oplog no longer holds its entry at the dump's start, Timestamp({}, {}): \
                         it rolled over during the dump, so writes made meanwhile are missing; \
                         enlarge the oplog (replSetResizeOplog) or back up when there are fewer writes",
                        s.time, s.increment
                    )));
                }
            }
            writer.end_namespace("", "oplog").map_err(src)?;
            let ts = |t: Option<bson::Timestamp>| {
                t.map(|t| serde_json::json!({"t": t.time, "i": t.increment}))
            };
            oplog_info =
                serde_json::json!({"start": ts(start_ts), "end": ts(end_ts), "entries": entries});
        }
        send(writer.finish().map_err(src)?).await?;
        let documents: i64 = counts
            .values()
            .filter_map(|v| v["documents"].as_i64())
            .sum();
        let summary = format!(
            "{} namespaces, {documents} documents{}, read from {member}",
            counts.len(),
            if replica_set.is_some() {
                ", oplog captured"
            } else {
                ", not point-in-time (standalone)"
            }
        );
        Ok(DumpOutcome {
            source: Source {
                tool: "ferry-agent (mongodb driver)".into(),
                tool_version: env!("CARGO_PKG_VERSION").into(),
                server_version: version,
            },
            counts: serde_json::json!({
                "namespaces": counts,
                "point_in_time": replica_set.is_some(),
                "replica_set": replica_set,
                "read_from": member,
                "oplog": oplog_info,
            }),
            summary,
        })
    }
}

/// The cursor batch size, in documents, that keeps a batch near [`BATCH_BYTES`]: from the
/// collection's average document size (`collStats.avgObjSize`, bytes). `None` (the server's
/// default batches) when the server does not say, e.g. for an empty collection.
async fn batch_size(client: &Client, db: &str, collection: &str) -> Option<u32> {
    let stats = client
        .database(db)
        .run_command(doc! {"collStats": collection})
        .await
        .ok()?;
    let avg = match stats.get("avgObjSize")? {
        Bson::Int32(n) => f64::from(*n),
        Bson::Int64(n) => *n as f64,
        Bson::Double(n) => *n,
        _ => return None,
    };
    (avg >= 1.0).then(|| (BATCH_BYTES / avg).clamp(1.0, 100_000.0) as u32)
}

impl Dumper for Mongo {
    fn parts(&self) -> &'static [Part] {
        &[MAIN]
    }

    fn dump<'a>(&'a self, _part: &'a Part) -> BoxFuture<'a, Result<DumpStream, DumpError>> {
        async move {
            let (tx, rx) = mpsc::channel(2);
            let task = tokio::spawn(self.clone().dump_archive(tx));
            let finish = async move {
                task.await
                    .map_err(|e| DumpError::Source(format!("dump task: {e}")))?
            };
            Ok(DumpStream {
                reader: Box::new(ChannelReader {
                    rx,
                    current: Vec::new(),
                    pos: 0,
                }),
                finish: finish.boxed(),
            })
        }
        .boxed()
    }
}
