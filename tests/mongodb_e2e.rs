//! MongoDB end to end against a real MongoDB-wire server (SecantusDB): backup through the
//! coordinator, restore into staging with a database renamed, every document byte-identical
//! and every index present; the stored file is a well-formed mongodump archive after stock
//! `age -d | zstd -d`, also to a reader that is not Ferry's (`tools/check_mongo_archive.py`,
//! from mongo-tools' `common/archive`); an altered file is refused before any collection is
//! dropped; writes of every kind during the dump window are replayed from the oplog so that
//! staging equals production byte for byte, and an entry the replay cannot apply fails the
//! restore naming it, the target untouched, as does a document the server refuses on
//! insert (its `writeErrors` in a reply with `ok: 1`).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use bson::{Bson, Document, RawDocumentBuf, doc, oid::ObjectId, spec::BinarySubtype};
use ferry_tests::*;
use futures::TryStreamExt;
use mongodb::Client;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

async fn client(uri: &str) -> Client {
    Client::with_uri_str(uri).await.unwrap()
}

/// Two databases, 100,000 documents in all, BSON types beyond JSON, a document near
/// 16 MiB, unique and compound indexes, a capped collection, a validator and a view.
async fn seed(uri: &str) {
    let c = client(uri).await;
    let app = c.database("app");
    app.run_command(doc! {"create": "events", "capped": true, "size": 10_000_000i64})
        .await
        .unwrap();
    app.run_command(doc! {"create": "users", "validator": {"$jsonSchema": {"bsonType": "object", "required": ["email"]}}})
        .await
        .unwrap();
    let users: Vec<Document> = (0..60_000i64)
        .map(|i| {
            doc! {
                "_id": ObjectId::new(),
                "email": format!("user{i}@example.com"),
                "balance": Bson::Decimal128(format!("{}.{:02}", i, i % 100).parse().unwrap()),
                "joined": bson::DateTime::from_millis(1_700_000_000_000 + i * 1000),
                "key": Bson::Binary(bson::Binary { subtype: BinarySubtype::Generic, bytes: (i as u32).to_le_bytes().to_vec() }),
                "tags": [["a", i % 7], {"nested": [1, 2, {"deep": i}]}],
                "n": i,
            }
        })
        .collect();
    for chunk in users.chunks(5_000) {
        app.collection::<Document>("users")
            .insert_many(chunk)
            .await
            .unwrap();
    }
    app.run_command(doc! {"createIndexes": "users", "indexes": [
        {"key": {"email": 1}, "name": "email_unique", "unique": true},
        {"key": {"n": 1, "joined": -1}, "name": "n_joined"},
    ]})
    .await
    .unwrap();
    let events: Vec<Document> = (0..10_000i32)
        .map(|i| doc! {"_id": i, "kind": "login", "at": i})
        .collect();
    app.collection::<Document>("events")
        .insert_many(events)
        .await
        .unwrap();
    app.run_command(doc! {"create": "active_users", "viewOn": "users", "pipeline": [{"$match": {"n": {"$lt": 10}}}]})
        .await
        .unwrap();
    let shop = c.database("shop");
    let orders: Vec<Document> = (0..29_999i32)
        .map(|i| doc! {"_id": i, "item": format!("item-{}", i % 500), "qty": i % 9, "price": 1.5 * f64::from(i)})
        .collect();
    for chunk in orders.chunks(5_000) {
        shop.collection::<Document>("orders")
            .insert_many(chunk)
            .await
            .unwrap();
    }
    // One document near the 16 MiB limit.
    let big = vec![7u8; 15 * 1024 * 1024];
    shop.collection::<Document>("blobs")
        .insert_one(doc! {"_id": "big", "data": Bson::Binary(bson::Binary { subtype: BinarySubtype::Generic, bytes: big })})
        .await
        .unwrap();
}

/// Every document of a collection as raw bytes, ordered by those bytes.
async fn raw_documents(uri: &str, db: &str, coll: &str) -> Vec<Vec<u8>> {
    let c = client(uri).await;
    let mut docs: Vec<Vec<u8>> = c
        .database(db)
        .collection::<RawDocumentBuf>(coll)
        .find(doc! {})
        .await
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.into_bytes())
        .collect();
    docs.sort();
    docs
}

async fn indexes(uri: &str, db: &str, coll: &str) -> BTreeMap<String, Document> {
    let c = client(uri).await;
    let specs: Vec<Document> = c
        .database(db)
        .run_cursor_command(doc! {"listIndexes": coll})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    specs
        .into_iter()
        .map(|mut s| {
            s.remove("ns");
            (s.get_str("name").unwrap().to_owned(), s)
        })
        .collect()
}

async fn collection_options(uri: &str, db: &str) -> BTreeMap<String, Document> {
    let c = client(uri).await;
    let specs: Vec<Document> = c
        .database(db)
        .run_cursor_command(doc! {"listCollections": 1})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    specs
        .into_iter()
        .map(|s| {
            (
                s.get_str("name").unwrap().to_owned(),
                s.get_document("options").cloned().unwrap_or_default(),
            )
        })
        .collect()
}

struct MongoFleet {
    d: Deployment,
    prod: MongoServer,
    stage: MongoServer,
}

fn deploy() -> MongoFleet {
    let mut servers = None;
    let d = Deployment::start_with(DEFAULT_DATA, |d| {
        let prod = MongoServer::start(&d.dir.path().join("mongo-prod"));
        let stage = MongoServer::start(&d.dir.path().join("mongo-stage"));
        append(&d.prod_config, &prod.datastore_toml());
        append(
            &d.stage_config,
            &format!(
                "[[datastores]]\nname = \"mongo\"\nkind = \"mongodb\"\nuri = \"{}\"\nrename = {{ shop = \"shop_staging\" }}\n",
                stage.uri()
            ),
        );
        servers = Some((prod, stage));
    });
    let (prod, stage) = servers.unwrap();
    MongoFleet { d, prod, stage }
}

#[test]
fn mongodb_backup_then_restore_is_byte_identical_with_indexes_and_options() {
    let f = deploy();
    let rt = runtime();
    rt.block_on(seed(&f.prod.uri()));

    let out = f.d.ferry_ok(&["backup", "pg-prod", "mongo", "--wait"]);
    assert!(out.contains("100000 documents"), "{out}");
    let (name, manifest) = f.d.todays_backup("mongo", "archive.zst.age");
    assert_eq!(
        manifest["counts"]["namespaces"]["app.users"]["documents"],
        60_000
    );
    assert_eq!(
        manifest["counts"]["point_in_time"], true,
        "SecantusDB is a replica set"
    );

    let out =
        f.d.ferry_ok(&["restore", "pg-stage", "--datastore", "mongo", "--wait"]);
    assert!(out.contains("equal to the manifest"), "{out}");
    rt.block_on(async {
        for (db, target, coll) in [
            ("app", "app", "users"),
            ("app", "app", "events"),
            ("shop", "shop_staging", "orders"),
            ("shop", "shop_staging", "blobs"),
        ] {
            let source = raw_documents(&f.prod.uri(), db, coll).await;
            let restored = raw_documents(&f.stage.uri(), target, coll).await;
            assert_eq!(source.len(), restored.len(), "{db}.{coll}");
            assert!(
                source == restored,
                "{db}.{coll}: restored documents differ from the source"
            );
            assert_eq!(
                indexes(&f.prod.uri(), db, coll).await,
                indexes(&f.stage.uri(), target, coll).await,
                "{db}.{coll} indexes"
            );
        }
        let src = collection_options(&f.prod.uri(), "app").await;
        let dst = collection_options(&f.stage.uri(), "app").await;
        assert_eq!(dst["events"].get_bool("capped").ok(), Some(true));
        assert_eq!(
            src["users"].get_document("validator"),
            dst["users"].get_document("validator")
        );
        assert_eq!(
            src["active_users"].get_str("viewOn"),
            dst["active_users"].get_str("viewOn")
        );
    });

    // The stored file, decrypted with stock age and zstd, is a well-formed archive.
    let script = format!(
        "set -o pipefail; age -d -i {} {} | zstd -d",
        f.d.identity.display(),
        f.d.sshd.root().join(&name).display()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut reader =
        ferry_agent::datastore::mongodb::archive::ArchiveReader::new(&out.stdout[..]).unwrap();
    assert_eq!(reader.header.version, "0.1");
    let mut documents = 0;
    while let Some(item) = reader.next_item().unwrap() {
        if let ferry_agent::datastore::mongodb::archive::Item::Document { ns, .. } = item
            && !ns.0.is_empty()
        {
            documents += 1;
        }
    }
    assert_eq!(documents, 100_000);
}

#[test]
fn altered_mongodb_archive_is_refused_before_any_collection_is_dropped() {
    let f = deploy();
    let rt = runtime();
    rt.block_on(async {
        let c = client(&f.prod.uri()).await;
        let docs: Vec<Document> = (0..1000i32).map(|i| doc! {"_id": i}).collect();
        c.database("app")
            .collection::<Document>("items")
            .insert_many(docs)
            .await
            .unwrap();
        let s = client(&f.stage.uri()).await;
        s.database("app")
            .collection::<Document>("items")
            .insert_one(doc! {"_id": "keep"})
            .await
            .unwrap();
    });
    f.d.ferry_ok(&["backup", "pg-prod", "mongo", "--wait"]);
    let archive =
        f.d.sshd
            .final_files()
            .into_iter()
            .find(|p| p.contains("mongo_backup_") && p.ends_with(".age"))
            .unwrap();
    let path = f.d.sshd.root().join(archive);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    let mut bytes = fs::read(&path).unwrap();
    let n = bytes.len();
    bytes.truncate(n - 100);
    fs::write(&path, bytes).unwrap();
    let out =
        f.d.ferry(&["restore", "pg-stage", "--datastore", "mongo", "--wait"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("does not match its manifest"));
    rt.block_on(async {
        let s = client(&f.stage.uri()).await;
        let left: Vec<Document> = s
            .database("app")
            .collection::<Document>("items")
            .find(doc! {})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(
            left,
            vec![doc! {"_id": "keep"}],
            "the target collection was touched"
        );
    });
}

#[test]
fn selective_restore_touches_only_the_named_namespace() {
    let f = deploy();
    let rt = runtime();
    rt.block_on(async {
        let c = client(&f.prod.uri()).await;
        for coll in ["wanted", "other"] {
            let docs: Vec<Document> = (0..500i32).map(|i| doc! {"_id": i, "from": coll}).collect();
            c.database("app")
                .collection::<Document>(coll)
                .insert_many(docs)
                .await
                .unwrap();
        }
        let s = client(&f.stage.uri()).await;
        s.database("app")
            .collection::<Document>("other")
            .insert_one(doc! {"_id": "keep"})
            .await
            .unwrap();
    });
    f.d.ferry_ok(&["backup", "pg-prod", "mongo", "--wait"]);

    let out =
        f.d.ferry(&["restore", "pg-stage", "--ns", "app.wanted", "--wait"]);
    assert!(
        !out.status.success(),
        "--ns without --datastore was accepted"
    );
    let out = f.d.ferry(&[
        "restore",
        "pg-stage",
        "--datastore",
        "mongo",
        "--ns",
        "nodot",
        "--wait",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("database.collection"));

    let out = f.d.ferry_ok(&[
        "restore",
        "pg-stage",
        "--datastore",
        "mongo",
        "--ns",
        "app.wanted",
        "--wait",
    ]);
    assert!(out.contains("1 namespaces"), "{out}");
    rt.block_on(async {
        assert_eq!(
            raw_documents(&f.stage.uri(), "app", "wanted").await,
            raw_documents(&f.prod.uri(), "app", "wanted").await
        );
        let other: Vec<Document> = client(&f.stage.uri())
            .await
            .database("app")
            .collection::<Document>("other")
            .find(doc! {})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(
            other,
            vec![doc! {"_id": "keep"}],
            "a namespace not asked for was restored"
        );
    });
}

#[test]
fn mongodb_restore_is_verified_beside_the_target_and_leaves_it_as_it_was_on_a_mismatch() {
    let f = deploy();
    let rt = runtime();
    rt.block_on(async {
        let prod = client(&f.prod.uri()).await;
        let docs: Vec<Document> = (0..500i32).map(|i| doc! {"_id": i, "v": "new"}).collect();
        prod.database("app")
            .collection::<Document>("items")
            .insert_many(docs)
            .await
            .unwrap();
        let stage = client(&f.stage.uri()).await;
        stage
            .database("app")
            .collection::<Document>("items")
            .insert_one(doc! {"_id": "staging's own", "v": "old"})
            .await
            .unwrap();
    });
    f.d.ferry_ok(&["backup", "pg-prod", "mongo", "--wait"]);
    // The manifest promises one document more than the archive holds.
    f.d.edit_todays_manifest("mongo", "archive.zst.age", |m| {
        m["counts"]["namespaces"]["app.items"]["documents"] = serde_json::json!(501);
    });

    let out =
        f.d.ferry(&["restore", "pg-stage", "--datastore", "mongo", "--wait"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("differs from the manifest"), "{text}");
    assert!(text.contains("the target was left as it was"), "{text}");
    rt.block_on(async {
        let left = raw_documents(&f.stage.uri(), "app", "items").await;
        assert_eq!(left.len(), 1, "staging's collection was replaced");
        assert_no_scratch_databases(&f.stage.uri()).await;
    });
}

/// The stored archive of a database with a view, a capped collection and an empty
/// collection, dumped with no write in its oplog window, passes a reader that is not
/// Ferry's (`tests/tools/check_mongo_archive.py`, written from mongo-tools'
/// `common/archive`): every namespace of the prelude, the view included, is closed by an
/// EOF whose CRC matches its documents; the oplog namespace holds the window's start entry;
/// each collection's metadata keeps its UUID as mongodump writes it.
#[test]
fn stored_mongodb_archive_passes_an_independent_mongo_tools_reader() {
    let f = deploy();
    let rt = runtime();
    rt.block_on(async {
        let app = client(&f.prod.uri()).await.database("app");
        app.run_command(doc! {"create": "events", "capped": true, "size": 65_536i64})
            .await
            .unwrap();
        let events: Vec<Document> = (0..50i32).map(|i| doc! {"_id": i, "at": i}).collect();
        app.collection::<Document>("events")
            .insert_many(events)
            .await
            .unwrap();
        app.run_command(doc! {"create": "empty"}).await.unwrap();
        let users: Vec<Document> = (0..200i32)
            .map(|i| doc! {"_id": i, "name": format!("user {i}"), "n": i})
            .collect();
        app.collection::<Document>("users")
            .insert_many(users)
            .await
            .unwrap();
        app.run_command(doc! {"create": "first_users", "viewOn": "users", "pipeline": [{"$match": {"n": {"$lt": 10}}}]})
            .await
            .unwrap();
    });
    f.d.ferry_ok(&["backup", "pg-prod", "mongo", "--wait"]);
    let (name, manifest) = f.d.todays_backup("mongo", "archive.zst.age");
    let plain = age_zstd_decrypt(&f.d.sshd.root().join(&name), &f.d.identity);
    let archive = f.d.dir.path().join("mongo.archive");
    fs::write(&archive, plain).unwrap();

    let summary = check_mongo_archive(&archive).unwrap_or_else(|e| panic!("{e}"));
    let ns = &summary["namespaces"];
    assert_eq!(ns["app.users"]["documents"], 200, "{summary}");
    assert_eq!(ns["app.events"]["documents"], 50, "{summary}");
    assert_eq!(ns["app.events"]["options"]["capped"], true, "{summary}");
    assert_eq!(ns["app.empty"]["documents"], 0, "{summary}");
    assert_eq!(ns["app.first_users"]["type"], "view", "{summary}");
    assert_eq!(ns["app.first_users"]["documents"], 0, "{summary}");
    for coll in ["app.users", "app.events", "app.empty"] {
        let uuid = ns[coll]["uuid"].as_str().unwrap_or_default();
        assert_eq!(uuid.len(), 32, "{coll} has no collection UUID: {summary}");
    }
    // Nothing was written during the dump: the oplog holds the window's start entry only.
    let oplog = &summary["oplog"];
    assert_eq!(oplog["entries"], 1, "{summary}");
    assert_eq!(
        manifest["counts"]["oplog"]["entries"], 1,
        "{}",
        manifest["counts"]
    );
    let start = &manifest["counts"]["oplog"]["start"];
    assert_eq!(
        (&oplog["first"][0], &oplog["first"][1]),
        (&start["t"], &start["i"]),
        "the window does not start at the entry at the dump's start: {summary}"
    );
}

/// The independent checker refuses what stock mongorestore refuses, on archives written
/// here byte by byte with Ferry's writer: a view without its segment and EOF (what Ferry
/// wrote before), an empty oplog namespace (likewise), a wrong CRC, a namespace reopened
/// after its EOF, a truncated file; and accepts the same archive written whole.
#[test]
fn the_independent_archive_checker_refuses_what_mongorestore_refuses() {
    use ferry_agent::datastore::mongodb::archive::{
        ArchiveWriter, CollectionMetadata, FORMAT_VERSION, Header,
    };
    let dir = tempfile::tempdir().unwrap();
    let header = Header {
        concurrent_collections: 1,
        version: FORMAT_VERSION.into(),
        server_version: "8.0.4".into(),
        tool_version: "test".into(),
    };
    let meta = |db: &str, coll: &str, kind: &str| CollectionMetadata {
        db: db.into(),
        collection: coll.into(),
        metadata: format!(
            r#"{{"indexes":[],"collectionName":"{coll}","type":"{kind}","options":{{}}}}"#
        ),
        size: 0,
        kind: kind.into(),
    };
    let prelude = [
        meta("app", "users", "collection"),
        meta("app", "first_users", "view"),
        meta("", "oplog", ""),
    ];
    let bson = |d: Document| {
        let mut out = Vec::new();
        d.to_writer(&mut out).unwrap();
        out
    };
    let user = bson(doc! {"_id": 1, "name": "a"});
    let entry =
        bson(doc! {"ts": bson::Timestamp { time: 1, increment: 1 }, "op": "n", "ns": "", "o": {}});
    // (view closed, oplog entries, extra bytes after the archive)
    let write = |close_view: bool, oplog: &[&[u8]], tail: &[u8]| {
        let mut w = ArchiveWriter::new(Vec::new(), &header, &prelude).unwrap();
        w.write_segment("app", "users", [user.as_slice()]).unwrap();
        w.end_namespace("app", "users").unwrap();
        if close_view {
            w.end_namespace("app", "first_users").unwrap();
        }
        w.write_segment("", "oplog", oplog.iter().copied()).unwrap();
        w.end_namespace("", "oplog").unwrap();
        let mut bytes = w.finish().unwrap();
        bytes.extend_from_slice(tail);
        bytes
    };
    let check = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        fs::write(&path, bytes).unwrap();
        check_mongo_archive(&path)
    };
    let good = write(true, &[&entry], &[]);
    let summary = check("good", &good).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(summary["namespaces"]["app.users"]["documents"], 1);
    assert_eq!(summary["oplog"]["entries"], 1);

    let refused = |name: &str, bytes: &[u8], why: &str| {
        let e = check(name, bytes).expect_err(name);
        assert!(e.contains(why), "{name}: {e}");
    };
    refused(
        "view not closed",
        &write(false, &[&entry], &[]),
        "archive finished before all collections were seen: ['app.first_users']",
    );
    refused(
        "empty oplog",
        &write(true, &[], &[]),
        "the oplog namespace holds no entry",
    );
    let mut bad_crc = good.clone();
    let at = bad_crc.windows(5).position(|w| w == b"name\0").unwrap();
    bad_crc[at + 9] ^= 1;
    refused("bad crc", &bad_crc, "CRC mismatch for app.users");
    let mut reopened = good.clone();
    reopened.extend_from_slice(&bson(
        doc! {"db": "app", "collection": "users", "EOF": false, "CRC": 0i64},
    ));
    reopened.extend_from_slice(&[0xff; 4]);
    refused(
        "reopened",
        &reopened,
        "a header for app.users after its EOF",
    );
    refused("truncated", &good[..good.len() - 2], "truncated");
}

/// [`deploy`] with the backup server in a network namespace of its own, so a test can cut
/// its link and hold a dump (and so its oplog window) open.
fn deploy_with_cuttable_backup_server() -> MongoFleet {
    let mut servers = None;
    let d = Deployment::start_with_options(DeploymentOptions {
        backup_server_netns: true,
        tweak: Some(Box::new(|d: &mut Deployment| {
            let prod = MongoServer::start(&d.dir.path().join("mongo-prod"));
            let stage = MongoServer::start(&d.dir.path().join("mongo-stage"));
            append(&d.prod_config, &prod.datastore_toml());
            append(&d.stage_config, &stage.datastore_toml());
            servers = Some((prod, stage));
        })),
        ..DeploymentOptions::default()
    });
    let (prod, stage) = servers.unwrap();
    MongoFleet { d, prod, stage }
}

/// Documents of `app.zz_big`, dumped last but one (names sort), each of 256 KiB that does
/// not compress: 48 MiB, more than the pipeline and the sockets buffer, so a cut link stops
/// the dump while its cursor is open.
const BIG_DOCS: i32 = 192;

/// `n` bytes of a fixed pseudo-random sequence (xorshift) starting from `seed`.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// Production before the dump: `app.a_docs` (100 documents of nested documents and
/// arrays), `app.a_dropped`, `app.a_renamed`, `app.a_indexed` (with an index `k_1`),
/// `app.zz_big` and `app.zzz_after` (dumped after it). Staging: its own `app.a_docs` and
/// `app.a_dropped`, and `app.staging_only`, which the backup does not hold.
async fn seed_for_replay(prod: &str, stage: &str) {
    let app = client(prod).await.database("app");
    let docs: Vec<Document> = (0..100i32)
        .map(|i| {
            doc! {
                "_id": i, "n": i, "s": format!("text {i}"), "arr": [1, 2, 3],
                "sub": {"a": 1, "b": [{"x": 1}, {"x": 2}]}, "items": [{"x": 1}, {"x": 2}],
                "tags": ["t"], "m": {"1": "one"},
            }
        })
        .collect();
    app.collection::<Document>("a_docs")
        .insert_many(docs)
        .await
        .unwrap();
    app.run_command(
        doc! {"createIndexes": "a_docs", "indexes": [{"key": {"n": 1}, "name": "n_1"}]},
    )
    .await
    .unwrap();
    for coll in ["a_dropped", "a_renamed", "a_indexed", "zzz_after"] {
        let docs: Vec<Document> = (0..20i32).map(|i| doc! {"_id": i, "k": i}).collect();
        app.collection::<Document>(coll)
            .insert_many(docs)
            .await
            .unwrap();
    }
    app.run_command(
        doc! {"createIndexes": "a_indexed", "indexes": [{"key": {"k": 1}, "name": "k_1"}]},
    )
    .await
    .unwrap();
    for chunk in (0..BIG_DOCS).collect::<Vec<_>>().chunks(16) {
        let docs: Vec<Document> = chunk
            .iter()
            .map(|&i| {
                doc! {"_id": i, "data": Bson::Binary(bson::Binary { subtype: BinarySubtype::Generic, bytes: noise(i as u64 + 1, 256 * 1024) })}
            })
            .collect();
        app.collection::<Document>("zz_big")
            .insert_many(docs)
            .await
            .unwrap();
    }
    let staging = client(stage).await.database("app");
    for coll in ["a_docs", "a_dropped", "staging_only"] {
        staging
            .collection::<Document>(coll)
            .insert_one(doc! {"_id": "staging's own"})
            .await
            .unwrap();
    }
}

/// Writes of every kind, as an application would during a dump: modifiers of every sort,
/// positional and array updates, pipeline updates, replacements, upserts, inserts and
/// deletes, a transaction, a collection created, one dropped and one renamed, indexes
/// created and dropped, a validator changed, and updates of the collection being dumped.
async fn write_every_kind(uri: &str) {
    let c = client(uri).await;
    let app = c.database("app");
    let docs = app.collection::<Document>("a_docs");
    let set = |id: i32, update: Document| (id, update);
    for (id, update) in [
        set(1, doc! {"$set": {"n": 100}}),
        set(2, doc! {"$set": {"z": 1, "y": 2}}),
        set(3, doc! {"$set": {"sub.c.d": 1, "sub.a": 5}}),
        set(4, doc! {"$unset": {"s": "", "sub.a": ""}}),
        set(5, doc! {"$inc": {"n": 7}, "$mul": {"sub.a": 3}}),
        set(6, doc! {"$push": {"arr": 4}}),
        set(
            6,
            doc! {"$push": {"arr": {"$each": [5, 6], "$position": 0}}},
        ),
        set(7, doc! {"$addToSet": {"tags": "new"}}),
        set(7, doc! {"$addToSet": {"tags": "t"}}),
        set(9, doc! {"$inc": {"arr.$[]": 10}}),
        set(21, doc! {"$set": {"arr.6": "far"}}),
        set(22, doc! {"$pop": {"arr": 1}}),
        set(23, doc! {"$pull": {"arr": 2}}),
        set(24, doc! {"$rename": {"s": "renamed_s"}}),
        set(25, doc! {"$unset": {"arr.0": ""}}),
        set(26, doc! {"$set": {"m.2": "two", "m.1": "uno"}}),
        set(27, doc! {"$min": {"n": -1}, "$max": {"top": 9}}),
        set(28, doc! {"$currentDate": {"seen": true}}),
        set(32, doc! {"$set": {"sub": {"whole": 1}}}),
        set(33, doc! {"$set": {"p": 1}}),
        set(33, doc! {"$unset": {"p": ""}}),
        set(33, doc! {"$set": {"q": 1}}),
        set(33, doc! {"$set": {"p": 2}}),
        set(34, doc! {"$set": {"sub.b.1.x": 200, "sub.b.3": {"x": 4}}}),
    ] {
        let r = docs.update_one(doc! {"_id": id}, update.clone()).await;
        let r = r.unwrap_or_else(|e| panic!("update {update} of {id}: {e}"));
        assert_eq!(r.matched_count, 1, "update {update} of {id}");
    }
    docs.update_one(
        doc! {"_id": 8, "items.x": 2},
        doc! {"$set": {"items.$.x": 20}},
    )
    .await
    .unwrap();
    docs.update_many(
        doc! {"_id": {"$gte": 10, "$lt": 20}},
        doc! {"$inc": {"n": 1000}},
    )
    .await
    .unwrap();
    docs.update_one(
        doc! {"_id": 29},
        vec![doc! {"$set": {"total": {"$add": ["$n", 1]}}}],
    )
    .await
    .unwrap();
    docs.update_one(
        doc! {"_id": 30},
        vec![doc! {"$project": {"n": 1, "only": "this"}}],
    )
    .await
    .unwrap();
    docs.replace_one(
        doc! {"_id": 31},
        doc! {"replaced": true, "list": [1, {"a": 2}]},
    )
    .await
    .unwrap();
    docs.update_one(doc! {"_id": 500}, doc! {"$set": {"upserted": 1}})
        .upsert(true)
        .await
        .unwrap();
    docs.delete_one(doc! {"_id": 40}).await.unwrap();
    docs.delete_many(doc! {"_id": {"$gte": 90}}).await.unwrap();
    docs.insert_one(doc! {"_id": 600, "fresh": 1})
        .await
        .unwrap();
    docs.update_one(doc! {"_id": 600}, doc! {"$set": {"fresh": 2}})
        .await
        .unwrap();
    docs.delete_one(doc! {"_id": 600}).await.unwrap();
    let fresh: Vec<Document> = (601..611i32).map(|i| doc! {"_id": i, "fresh": i}).collect();
    docs.insert_many(fresh).await.unwrap();
    let mut session = c.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    docs.insert_one(doc! {"_id": 700, "in": "transaction"})
        .session(&mut session)
        .await
        .unwrap();
    docs.update_one(doc! {"_id": 50}, doc! {"$set": {"in": "transaction"}})
        .session(&mut session)
        .await
        .unwrap();
    session.commit_transaction().await.unwrap();

    app.run_command(doc! {"create": "b_created", "capped": true, "size": 65_536i64})
        .await
        .unwrap();
    let created: Vec<Document> = (0..30i32).map(|i| doc! {"_id": i, "c": i}).collect();
    app.collection::<Document>("b_created")
        .insert_many(created)
        .await
        .unwrap();
    app.run_command(doc! {"createIndexes": "b_created", "indexes": [{"key": {"c": -1}, "name": "c_-1", "unique": true}]})
        .await
        .unwrap();
    // Created by its first insert, with no create command.
    app.collection::<Document>("b_implicit")
        .insert_one(doc! {"_id": 1, "implicit": true})
        .await
        .unwrap();
    app.collection::<Document>("a_dropped")
        .drop()
        .await
        .unwrap();
    c.database("admin")
        .run_command(doc! {"renameCollection": "app.a_renamed", "to": "app.a_renamed_to"})
        .await
        .unwrap();
    app.collection::<Document>("a_renamed_to")
        .insert_one(doc! {"_id": "after the rename"})
        .await
        .unwrap();
    app.run_command(doc! {"createIndexes": "a_docs", "indexes": [{"key": {"s": 1}, "name": "s_1", "sparse": true}]})
        .await
        .unwrap();
    app.run_command(doc! {"dropIndexes": "a_indexed", "index": "k_1"})
        .await
        .unwrap();
    app.run_command(doc! {"collMod": "a_indexed", "validator": {"k": {"$exists": true}}})
        .await
        .unwrap();

    // The collection being dumped: a document already read, two not yet read, one of
    // them then deleted.
    let big = app.collection::<Document>("zz_big");
    for id in [0, BIG_DOCS - 1, BIG_DOCS - 2] {
        big.update_one(doc! {"_id": id}, doc! {"$set": {"touched": id}})
            .await
            .unwrap();
    }
    big.delete_one(doc! {"_id": BIG_DOCS - 2}).await.unwrap();
    // A collection not dumped yet: the dump reads it without this document, whose update
    // the replay then finds nothing to apply to until the delete that follows.
    let after = app.collection::<Document>("zzz_after");
    after
        .update_one(doc! {"_id": 3}, doc! {"$set": {"k": 30}})
        .await
        .unwrap();
    after.delete_one(doc! {"_id": 3}).await.unwrap();
}

/// Whether the server has a cursor open on `ns` (`currentOp`'s idle cursors).
async fn cursor_open(uri: &str, ns: &str) -> bool {
    let ops = client(uri)
        .await
        .database("admin")
        .run_command(doc! {"currentOp": 1})
        .await
        .unwrap();
    ops.get_array("inprog").unwrap().iter().any(|op| {
        op.as_document()
            .is_some_and(|op| op.get_str("type") == Ok("idleCursor") && op.get_str("ns") == Ok(ns))
    })
}

/// The names of the collections and views of `db`, without `except`.
async fn collection_names(uri: &str, db: &str, except: &[&str]) -> Vec<String> {
    let mut names = client(uri)
        .await
        .database(db)
        .list_collection_names()
        .await
        .unwrap();
    names.retain(|n| !except.contains(&n.as_str()));
    names.sort();
    names
}

/// The number in `text` after `before`, e.g. 57 for `("...oplog: 57 entries", "oplog: ")`.
fn number_after(text: &str, before: &str) -> Option<u64> {
    let at = text.find(before)? + before.len();
    text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

#[test]
fn writes_during_the_dump_window_are_replayed_so_staging_equals_production_byte_for_byte() {
    let f = deploy_with_cuttable_backup_server();
    let rt = runtime();
    rt.block_on(seed_for_replay(&f.prod.uri(), &f.stage.uri()));
    let netns =
        f.d.netns
            .as_ref()
            .expect("the backup server has its own namespace");

    std::thread::scope(|s| {
        let backup = s.spawn(|| f.d.ferry_ok(&["backup", "pg-prod", "mongo", "--wait"]));
        rt.block_on(async {
            // The dump reads app.zz_big last: every other collection is dumped already.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while !cursor_open(&f.prod.uri(), "app.zz_big").await {
                assert!(
                    !backup.is_finished() && std::time::Instant::now() < deadline,
                    "the dump never opened a cursor on app.zz_big"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            // Held open: with the backup server unreachable the dump stops reading.
            netns.cut();
            write_every_kind(&f.prod.uri()).await;
            assert!(
                cursor_open(&f.prod.uri(), "app.zz_big").await,
                "the dump finished app.zz_big before the writes did: the writes may fall \
                 outside its oplog window; make app.zz_big larger"
            );
            netns.restore();
        });
        backup.join().unwrap();
    });

    let (_, manifest) = f.d.todays_backup("mongo", "archive.zst.age");
    let oplog = &manifest["counts"]["oplog"];
    let ts = |v: &serde_json::Value| bson::Timestamp {
        time: v["t"].as_u64().unwrap() as u32,
        increment: v["i"].as_u64().unwrap() as u32,
    };
    let (start, end) = (ts(&oplog["start"]), ts(&oplog["end"]));
    // What the replay must apply: the window's entries of the restored database, no-ops
    // aside (the window starts at the entry at the dump's start, ts >= start).
    let (captured, expected) = rt.block_on(async {
        let entries: Vec<Document> = client(&f.prod.uri())
            .await
            .database("local")
            .collection::<Document>("oplog.rs")
            .find(doc! {"ts": {"$gte": start, "$lte": end}})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let applied = entries
            .iter()
            .filter(|e| e.get_str("op") != Ok("n"))
            .filter(|e| e.get_str("ns").is_ok_and(|ns| ns.starts_with("app.")))
            .count() as u64;
        (entries.len() as u64, applied)
    });
    assert_eq!(oplog["entries"].as_u64(), Some(captured), "{oplog}");
    assert!(expected > 60, "only {expected} entries in the window");

    let out =
        f.d.ferry_ok(&["restore", "pg-stage", "--datastore", "mongo", "--wait"]);
    assert_eq!(
        number_after(&out, "oplog: "),
        Some(expected),
        "the restore's count of applied oplog entries: {out}"
    );
    assert!(
        out.contains("1 of them updates of documents a later entry deletes"),
        "{out}"
    );
    rt.block_on(async {
        let (prod, stage) = (f.prod.uri(), f.stage.uri());
        let names = collection_names(&prod, "app", &[]).await;
        assert_eq!(
            names,
            [
                "a_docs",
                "a_indexed",
                "a_renamed_to",
                "b_created",
                "b_implicit",
                "zz_big",
                "zzz_after"
            ],
            "production after the writes"
        );
        assert_eq!(
            collection_names(&stage, "app", &["staging_only"]).await,
            names,
            "staging's collections (a_dropped and a_renamed must be gone, b_created, \
             b_implicit and a_renamed_to there)"
        );
        for coll in &names {
            let source = raw_documents(&prod, "app", coll).await;
            let restored = raw_documents(&stage, "app", coll).await;
            assert_eq!(source.len(), restored.len(), "app.{coll}: document count");
            for (a, b) in source.iter().zip(&restored) {
                assert!(
                    a == b,
                    "app.{coll}: production has {:?}, staging {:?}",
                    RawDocumentBuf::from_bytes(a.clone()).unwrap().to_document(),
                    RawDocumentBuf::from_bytes(b.clone()).unwrap().to_document(),
                );
            }
            assert_eq!(
                indexes(&prod, "app", coll).await,
                indexes(&stage, "app", coll).await,
                "app.{coll} indexes"
            );
        }
        let (src, dst) = (
            collection_options(&prod, "app").await,
            collection_options(&stage, "app").await,
        );
        for coll in &names {
            assert_eq!(src[coll], dst[coll], "app.{coll} options");
        }
        assert_eq!(
            raw_documents(&stage, "app", "staging_only").await.len(),
            1,
            "a collection the backup does not hold was touched"
        );
        assert_no_scratch_databases(&stage).await;
    });
}

/// Rewrites today's stored MongoDB backup with `extra` appended to its oplog namespace,
/// re-encrypted to the staging recipient, its manifest updated to match (as someone with
/// write access to the backup server could, or as the backup of a server writing entries
/// SecantusDB does not, such as mongod).
fn append_to_stored_oplog(d: &Deployment, extra: &[Document]) {
    append_to_stored_namespace(d, ("", "oplog"), extra, |m| {
        let entries = m["counts"]["oplog"]["entries"].as_i64().unwrap_or(0);
        m["counts"]["oplog"]["entries"] = serde_json::json!(entries + extra.len() as i64);
    });
}

/// Rewrites today's stored MongoDB backup with `extra` appended to namespace `ns`
/// (database, collection; `("", "oplog")` for the oplog window), re-encrypted to the
/// staging recipient, its manifest's checksum and sizes updated and then `edit`ed.
fn append_to_stored_namespace(
    d: &Deployment,
    ns: (&str, &str),
    extra: &[Document],
    edit: impl FnOnce(&mut serde_json::Value),
) {
    use ferry_agent::datastore::mongodb::archive::{ArchiveReader, ArchiveWriter, Item};
    let (name, _) = d.todays_backup("mongo", "archive.zst.age");
    let stored = d.sshd.root().join(&name);
    let plain = age_zstd_decrypt(&stored, &d.identity);
    let mut reader = ArchiveReader::new(&plain[..]).unwrap();
    let mut items = Vec::new();
    while let Some(item) = reader.next_item().unwrap() {
        items.push(item);
    }
    let mut writer = ArchiveWriter::new(Vec::new(), &reader.header, &reader.collections).unwrap();
    let documents: Vec<Vec<u8>> = extra
        .iter()
        .map(|e| {
            let mut bytes = Vec::new();
            e.to_writer(&mut bytes).unwrap();
            bytes
        })
        .collect();
    let mut appended = false;
    for item in items {
        match item {
            Item::Document { ns, bytes } => writer
                .write_segment(&ns.0, &ns.1, [bytes.as_slice()])
                .unwrap(),
            Item::End(end) => {
                if (end.0.as_str(), end.1.as_str()) == ns {
                    writer
                        .write_segment(&end.0, &end.1, documents.iter().map(Vec::as_slice))
                        .unwrap();
                    appended = true;
                }
                writer.end_namespace(&end.0, &end.1).unwrap();
            }
        }
    }
    assert!(appended, "the stored archive has no namespace {ns:?}");
    let plain = writer.finish().unwrap();
    let crafted = zstd_age_encrypt(&plain, &d.recipient);
    chmod(&stored, 0o640);
    fs::write(&stored, &crafted).unwrap();
    let sum = Command::new("sha256sum").arg(&stored).output().unwrap();
    let sha256 = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    d.edit_todays_manifest("mongo", "archive.zst.age", |m| {
        m["sha256"] = serde_json::json!(sha256);
        m["bytes_stored"] = serde_json::json!(crafted.len());
        m["bytes_uncompressed"] = serde_json::json!(plain.len());
        edit(m);
    });
}

/// A fleet whose production holds `app.items` (100 documents, `_id` 0 to 99), backed up
/// today, and whose staging holds `app.items` with one document, `{_id: "keep"}`.
fn items_backed_up_and_a_staging_document() -> (MongoFleet, tokio::runtime::Runtime) {
    let f = deploy();
    let rt = runtime();
    rt.block_on(async {
        let docs: Vec<Document> = (0..100i32).map(|i| doc! {"_id": i}).collect();
        client(&f.prod.uri())
            .await
            .database("app")
            .collection::<Document>("items")
            .insert_many(docs)
            .await
            .unwrap();
        client(&f.stage.uri())
            .await
            .database("app")
            .collection::<Document>("items")
            .insert_one(doc! {"_id": "keep"})
            .await
            .unwrap();
    });
    f.d.ferry_ok(&["backup", "pg-prod", "mongo", "--wait"]);
    (f, rt)
}

/// Staging's `app.items` is still only `{_id: "keep"}` and no scratch database is left.
fn assert_staging_document_alone(f: &MongoFleet, rt: &tokio::runtime::Runtime) {
    rt.block_on(async {
        let left = raw_documents(&f.stage.uri(), "app", "items").await;
        let keep = RawDocumentBuf::from_document(&doc! {"_id": "keep"}).unwrap();
        assert_eq!(left, vec![keep.into_bytes()], "the target was touched");
        assert_no_scratch_databases(&f.stage.uri()).await;
    });
}

/// No database of the server at `uri` has `__ferry_` in its name.
async fn assert_no_scratch_databases(uri: &str) {
    let dbs = client(uri).await.list_database_names().await.unwrap();
    assert!(
        !dbs.iter().any(|d| d.contains("__ferry_")),
        "scratch databases left: {dbs:?}"
    );
}

/// A document the server refuses while the archive is inserted (here a second document
/// with an `_id` the collection already holds; the manifest's count left as it was, so
/// only the insert's reply can tell) fails the restore, naming the collection and the
/// server's error, and the target is unchanged: the server's `writeErrors` in a reply
/// with `ok: 1` are not taken for success.
#[test]
fn a_document_the_server_refuses_on_insert_fails_the_restore_naming_it_with_the_target_unchanged() {
    let (f, rt) = items_backed_up_and_a_staging_document();
    append_to_stored_namespace(&f.d, ("app", "items"), &[doc! {"_id": 7}], |_| {});

    let text =
        f.d.ferry_failing(&["restore", "pg-stage", "--datastore", "mongo", "--wait"]);
    for part in [
        ".items: 1 of ",
        "documents refused, the first with code 11000",
        "duplicate key",
        "the target was left as it was",
    ] {
        assert!(text.contains(part), "{part:?} is not in: {text}");
    }
    assert_staging_document_alone(&f, &rt);
}

#[test]
fn an_oplog_entry_the_replay_cannot_apply_fails_the_restore_naming_it_with_the_target_unchanged() {
    let (f, rt) = items_backed_up_and_a_staging_document();
    let (_, manifest) = f.d.todays_backup("mongo", "archive.zst.age");
    let end = &manifest["counts"]["oplog"]["end"];
    let ts = bson::Timestamp {
        time: end["t"].as_u64().unwrap() as u32,
        increment: end["i"].as_u64().unwrap() as u32 + 1,
    };
    // A command of MongoDB 4.x that changes data and that the replay does not know.
    append_to_stored_oplog(
        &f.d,
        &[doc! {"ts": ts, "t": 1i64, "op": "c", "ns": "app.$cmd", "o": {"emptycapped": "items"}}],
    );

    let text =
        f.d.ferry_failing(&["restore", "pg-stage", "--datastore", "mongo", "--wait"]);
    for part in [
        format!("Timestamp({}, {})", ts.time, ts.increment),
        "op c".into(),
        "ns app.$cmd".into(),
        "emptycapped".into(),
        "the target was left as it was".into(),
    ] {
        assert!(text.contains(&part), "{part:?} is not in: {text}");
    }
    assert_staging_document_alone(&f, &rt);
}

/// Entries as mongod writes them, which SecantusDB does not: `$v: 2` diffs in the
/// `doc_diff` format with nested document and array sub-diffs, inside an `applyOps`; `$v: 1`
/// modifiers; a `createIndexes` with its spec inline; a `dropDatabase`. Appended to a
/// stored archive's oplog, they are applied to the scratch databases like any other: each
/// document comes out as mongod would make it, byte for byte.
#[test]
fn mongod_oplog_forms_doc_diffs_apply_ops_and_drop_database_are_replayed() {
    let f = deploy();
    let rt = runtime();
    rt.block_on(async {
        let prod = client(&f.prod.uri()).await;
        let docs: Vec<Document> = (0..10i32)
            .map(|i| doc! {"_id": i, "a": {"b": 1, "c": [1, 2, 3], "e": [{"k": 1}]}, "x": 1})
            .collect();
        prod.database("app")
            .collection::<Document>("items")
            .insert_many(docs)
            .await
            .unwrap();
        let gone: Vec<Document> = (0..3i32).map(|i| doc! {"_id": i}).collect();
        prod.database("gone")
            .collection::<Document>("g")
            .insert_many(gone)
            .await
            .unwrap();
        client(&f.stage.uri())
            .await
            .database("gone")
            .collection::<Document>("g")
            .insert_one(doc! {"_id": "staging's own"})
            .await
            .unwrap();
    });
    f.d.ferry_ok(&["backup", "pg-prod", "mongo", "--wait"]);
    let (_, manifest) = f.d.todays_backup("mongo", "archive.zst.age");
    let end = &manifest["counts"]["oplog"]["end"];
    let ts = |k: u32| bson::Timestamp {
        time: end["t"].as_u64().unwrap() as u32 + 1,
        increment: k,
    };
    append_to_stored_oplog(
        &f.d,
        &[
            doc! {"ts": ts(1), "t": 1i64, "op": "c", "ns": "admin.$cmd", "o": {"applyOps": [
                {"op": "u", "ns": "app.items", "o2": {"_id": 1}, "o": {"$v": 2, "diff": {
                    "d": {"x": false},
                    "u": {"y": "new"},
                    "sa": {"i": {"d": 4}, "sc": {"a": true, "l": 2, "u1": 20}, "se": {"a": true, "s0": {"u": {"k": 2}}, "u2": "padded"}},
                }}},
                {"op": "i", "ns": "app.items", "o": {"_id": 100, "new": true}},
            ]}},
            doc! {"ts": ts(2), "t": 1i64, "op": "u", "ns": "app.items", "o2": {"_id": 2}, "o": {"$v": 1, "$set": {"x": 5}, "$unset": {"a": true}}},
            doc! {"ts": ts(3), "t": 1i64, "op": "c", "ns": "app.$cmd", "o": {"createIndexes": "items", "v": 2, "key": {"x": 1}, "name": "x_1"}},
            doc! {"ts": ts(4), "t": 1i64, "op": "c", "ns": "gone.$cmd", "o": {"dropDatabase": 1}},
            doc! {"ts": ts(5), "t": 1i64, "op": "d", "ns": "app.items", "o": {"_id": 3}},
        ],
    );

    let out =
        f.d.ferry_ok(&["restore", "pg-stage", "--datastore", "mongo", "--wait"]);
    let applied = number_after(&out, "oplog: ").unwrap_or_else(|| panic!("{out}"));
    // The window's own entries, and the six operations appended.
    assert!(applied > 6, "{out}");
    rt.block_on(async {
        let stage = client(&f.stage.uri()).await;
        let items = stage.database("app").collection::<RawDocumentBuf>("items");
        let get = |id: i32| {
            let items = items.clone();
            async move {
                items
                    .find_one(doc! {"_id": id})
                    .await
                    .unwrap()
                    .map(|d| d.into_bytes())
            }
        };
        let bytes = |d: Document| {
            let mut out = Vec::new();
            d.to_writer(&mut out).unwrap();
            Some(out)
        };
        assert_eq!(
            get(1).await,
            bytes(doc! {
                "_id": 1,
                "a": {"b": 1, "c": [1, 20], "e": [{"k": 2}, Bson::Null, "padded"], "d": 4},
                "y": "new",
            }),
            "the doc_diff update"
        );
        assert_eq!(get(100).await, bytes(doc! {"_id": 100, "new": true}));
        assert_eq!(
            get(2).await,
            bytes(doc! {"_id": 2, "x": 5}),
            "the $v: 1 update"
        );
        assert_eq!(get(3).await, None, "the delete");
        assert_eq!(
            get(4).await,
            bytes(doc! {"_id": 4, "a": {"b": 1, "c": [1, 2, 3], "e": [{"k": 1}]}, "x": 1})
        );
        assert!(
            indexes(&f.stage.uri(), "app", "items")
                .await
                .contains_key("x_1"),
            "the createIndexes"
        );
        let dbs = stage.list_database_names().await.unwrap();
        assert!(
            !dbs.iter().any(|d| d == "gone" || d.contains("__ferry_")),
            "the dropped database's namespace, or a scratch database, is left: {dbs:?}"
        );
    });
}

/// `read_preference`: a dump reads from the member the preference chooses, and says which.
/// SecantusDB is a one-member replica set, so no secondary can be tested here (README says
/// so): `secondaryPreferred` with tags no member has falls back to the primary, and
/// `secondary` fails naming the preference, which proves the preference is applied.
#[test]
fn a_read_preference_chooses_the_member_read_and_secondary_without_one_fails_naming_it() {
    let mut servers = None;
    let d = Deployment::start_with(DEFAULT_DATA, |d| {
        let prod = MongoServer::start(&d.dir.path().join("mongo-prod"));
        let stage = MongoServer::start(&d.dir.path().join("mongo-stage"));
        let rs = format!("mongodb://127.0.0.1:{}/?replicaSet=secantus", prod.port());
        append(
            &d.prod_config,
            &format!(
                "[[datastores]]\nname = \"mongo\"\nkind = \"mongodb\"\nuri = \"{rs}\"\n\
                 read_preference = \"secondaryPreferred\"\n\
                 read_preference_tags = [{{ use = \"backup\" }}]\n\n\
                 [[datastores]]\nname = \"mongo-secondary\"\nkind = \"mongodb\"\nuri = \"{rs}\"\n\
                 read_preference = \"secondary\"\n"
            ),
        );
        append(
            &d.stage_config,
            &format!(
                "[[datastores]]\nname = \"mongo\"\nkind = \"mongodb\"\nuri = \"{}\"\n",
                stage.uri()
            ),
        );
        servers = Some((prod, stage));
    });
    let (prod, stage) = servers.unwrap();
    let rt = runtime();
    let docs: Vec<Document> = (0..500).map(|i| doc! {"_id": i, "n": i * 7}).collect();
    prod.insert("app", "users", &docs);
    let out = d.ferry_ok(&["backup", "pg-prod", "mongo", "--wait"]);
    assert!(
        out.contains(&format!(
            "read from primary 127.0.0.1:{} (read_preference = \"secondaryPreferred\", tags",
            prod.port()
        )),
        "{out}"
    );
    let (_, manifest) = d.todays_backup("mongo", "archive.zst.age");
    assert!(
        manifest["counts"]["read_from"]
            .as_str()
            .unwrap()
            .starts_with("primary 127.0.0.1:"),
        "{manifest}"
    );
    let out = d.ferry_ok(&["restore", "pg-stage", "--datastore", "mongo", "--wait"]);
    assert!(out.contains("equal to the manifest"), "{out}");
    rt.block_on(async {
        let source = raw_documents(&prod.uri(), "app", "users").await;
        assert_eq!(source, raw_documents(&stage.uri(), "app", "users").await);
    });

    let out = d.ferry(&["backup", "pg-prod", "mongo-secondary", "--wait"]);
    assert!(!out.status.success());
    let jobs = d.ferry_json(&["jobs"]);
    let failed = &jobs.as_array().unwrap()[0];
    assert_eq!(failed["datastore"], "mongo-secondary");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("no replica set member matches read_preference = \"secondary\""),
        "{error}"
    );
}
