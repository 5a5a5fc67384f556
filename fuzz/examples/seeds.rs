//! Writes the seed corpus `fuzz/corpus/<target>/seed-*` with Ferry's own writers: small
//! mongodump archives (`ArchiveWriter`), manifests (`Manifest::to_json`) and tar streams
//! (`tree::write_tar`). Run from `fuzz/`: `cargo run --example seeds`. Seeds stay tiny
//! (a few KiB in all); the fuzzer grows its working corpus elsewhere (see README.md).

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;

use bson::doc;
use ferry_agent::datastore::common::tree;
use ferry_agent::datastore::mongodb::archive::{
    ArchiveWriter, CollectionMetadata, FORMAT_VERSION, Header,
};
use ferry_core::manifest::{MANIFEST_VERSION, Manifest, RecipientInfo, Source};

fn bson(d: bson::Document) -> Vec<u8> {
    let mut out = Vec::new();
    d.to_writer(&mut out).expect("BSON to memory");
    out
}

fn meta(db: &str, collection: &str, kind: &str) -> CollectionMetadata {
    CollectionMetadata {
        db: db.into(),
        collection: collection.into(),
        metadata: format!(
            r#"{{"indexes":[{{"v":{{"$numberInt":"2"}},"key":{{"_id":{{"$numberInt":"1"}}}},"name":"_id_"}}],"collectionName":"{collection}","type":"{kind}","options":{{}}}}"#
        ),
        size: 0,
        kind: kind.into(),
    }
}

fn archives(dir: &Path) {
    let header = Header {
        concurrent_collections: 1,
        version: FORMAT_VERSION.into(),
        server_version: "8.2.0".into(),
        tool_version: "ferry seeds".into(),
    };
    // Only the prelude: no collections.
    let w = ArchiveWriter::new(Vec::new(), &header, &[]).unwrap();
    fs::write(dir.join("seed-empty"), w.finish().unwrap()).unwrap();
    // Two namespaces interleaved, one empty collection, a view, and an oplog entry.
    let docs: Vec<Vec<u8>> = (0..3)
        .map(|i| bson(doc! {"_id": i, "s": "x".repeat(i as usize), "n": 1.5}))
        .collect();
    let oplog = bson(doc! {"op": "i", "ns": "app.users", "o": {"_id": 9}});
    let mut w = ArchiveWriter::new(
        Vec::new(),
        &header,
        &[
            meta("app", "users", "collection"),
            meta("app", "empty", "collection"),
            meta("logs", "events", "collection"),
            meta("app", "active", "view"),
            meta("", "oplog", "collection"),
        ],
    )
    .unwrap();
    w.write_segment("app", "users", docs[..2].iter().map(Vec::as_slice))
        .unwrap();
    w.write_segment("logs", "events", [docs[2].as_slice()])
        .unwrap();
    w.write_segment("app", "users", [docs[2].as_slice()])
        .unwrap();
    w.end_namespace("app", "users").unwrap();
    w.end_namespace("app", "empty").unwrap();
    w.end_namespace("logs", "events").unwrap();
    w.end_namespace("app", "active").unwrap();
    w.write_segment("", "oplog", [oplog.as_slice()]).unwrap();
    w.end_namespace("", "oplog").unwrap();
    fs::write(dir.join("seed-interleaved"), w.finish().unwrap()).unwrap();
}

fn manifests(dir: &Path) {
    let at = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .with_timezone(&chrono::Utc)
    };
    let main = Manifest {
        manifest_version: MANIFEST_VERSION,
        file: "postgres_backup_2026-02-05T1315Z.pgdump.zst.age".into(),
        datastore: "postgres".into(),
        kind: "postgres".into(),
        part: String::new(),
        format: "pgdump".into(),
        compression: "zst".into(),
        encryption: "age".into(),
        agent: "pg-prod".into(),
        hostname: "db1".into(),
        environment: "production".into(),
        date: "2026-02-05".into(),
        started: at("2026-02-05T13:15:02.5Z"),
        finished: at("2026-02-05T13:16:40Z"),
        source: Source {
            tool: "pg_dump".into(),
            tool_version: "pg_dump (PostgreSQL) 15.14".into(),
            server_version: "15.14".into(),
        },
        bytes_uncompressed: 123_456,
        bytes_stored: 23_456,
        sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        recipients: vec![RecipientInfo {
            recipient: "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p".into(),
            fingerprint: "sha256:4a5ba1e1b5b0c4d2".into(),
        }],
        companions: vec!["postgres-globals_backup_2026-02-05T1315Z.sql.zst.age".into()],
        counts: serde_json::json!({"tables": 2, "rows": {"public.t": 10, "public.u": 0}}),
        version_id: None,
        job_id: None,
        copied: None,
    };
    fs::write(dir.join("seed-main"), main.to_json()).unwrap();
    let companion = Manifest {
        file: main.companions[0].clone(),
        part: "globals".into(),
        format: "sql".into(),
        companions: Vec::new(),
        counts: serde_json::json!({}),
        version_id: None,
        ..main
    };
    fs::write(dir.join("seed-companion"), companion.to_json()).unwrap();
}

fn tars(dir: &Path) {
    let src = tempfile::tempdir().unwrap();
    let s = src.path();
    fs::create_dir_all(s.join("a/b")).unwrap();
    fs::write(s.join("a/b/data.txt"), "data").unwrap();
    fs::write(s.join("top.txt"), "hello").unwrap();
    symlink("a/b/data.txt", s.join("link")).unwrap();
    let mut out = Vec::new();
    tree::write_tar(s, &tree::excludes(&[]).unwrap(), &mut out).unwrap();
    fs::write(dir.join("seed-tree"), out).unwrap();
    // A link out of the tree, then a file written through it: must be refused.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, "up", "..").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(3);
    h.set_mode(0o644);
    b.append_data(&mut h, "up/sentinel", &b"bad"[..]).unwrap();
    fs::write(dir.join("seed-link-out"), b.into_inner().unwrap()).unwrap();
}

fn main() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, write) in [
        ("mongo_archive", archives as fn(&Path)),
        ("manifest", manifests),
        ("tar_unpack", tars),
    ] {
        let dir = corpus.join(target);
        fs::create_dir_all(&dir).unwrap();
        write(&dir);
        println!("wrote {}", dir.display());
    }
}
