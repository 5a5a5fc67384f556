//! MongoDB end to end against a real MongoDB-wire server (SecantusDB): backup through the
//! coordinator, restore into staging with a database renamed, every document byte-identical
//! and every index present; the stored file is a well-formed mongodump archive after stock
//! `age -d | zstd -d`, also to a reader that is not Ferry's (`tools/check_mongo_archive.py`,
//! from mongo-tools' `common/archive`); an altered file is refused before any collection is
//! dropped.

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
        let stage = client(&f.stage.uri()).await;
        let left = raw_documents(&f.stage.uri(), "app", "items").await;
        assert_eq!(left.len(), 1, "staging's collection was replaced");
        let dbs = stage.list_database_names().await.unwrap();
        assert!(
            !dbs.iter().any(|d| d.contains("__ferry_")),
            "scratch databases left: {dbs:?}"
        );
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
