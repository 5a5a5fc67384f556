//! A MongoDB wire-protocol server for the tests: SecantusDB (a one-node replica set
//! `secantus`) from the venv that `scripts/install-deps` makes, on a free loopback port,
//! killed on drop, with synchronous helpers to seed it and to read what a user would
//! compare ([`MongoServer::contents`]); and [`check_mongo_archive`], the archive checker
//! that is not Ferry's.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::{Proc, free_port, tail};

/// The venv holding SecantusDB and pymongo: `$FERRY_VENV`, by default `/opt/ferry-test/venv`.
pub fn venv() -> String {
    std::env::var("FERRY_VENV").unwrap_or_else(|_| "/opt/ferry-test/venv".into())
}

/// Runs `tests/tools/check_mongo_archive.py` (an independent reader written from
/// mongo-tools' `common/archive`, see its header) with the venv's Python on the plaintext
/// archive at `archive`. Returns `Ok(summary)`, the checker's JSON summary (namespaces with
/// their types, document counts, UUIDs and indexes; the oplog's entry count), or
/// `Err(why)`, the violation it found.
pub fn check_mongo_archive(archive: &Path) -> Result<serde_json::Value, String> {
    let python = PathBuf::from(venv()).join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/install-deps (it makes the venv with pymongo)",
        python.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/check_mongo_archive.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(archive)
        .output()
        .unwrap_or_else(|e| panic!("{} {}: {e}", python.display(), script.display()));
    match out.status.code() {
        Some(0) => Ok(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "the checker printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })),
        Some(1) => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        _ => panic!(
            "the checker failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// One collection or view as [`MongoServer::contents`] reads it: its type and options
/// (`"collection {}"`), its index names, and its documents as raw BSON, sorted.
pub type NamespaceContents = (String, Vec<String>, Vec<Vec<u8>>);

/// A SecantusDB server (see the module docs).
pub struct MongoServer {
    port: u16,
    proc: Proc,
}

impl MongoServer {
    /// Starts a server storing its data in `dir/data`, its log in `dir/server.log`.
    /// The venv is `$FERRY_VENV`, by default `/opt/ferry-test/venv`.
    pub fn start(dir: &Path) -> MongoServer {
        let venv = venv();
        let server = PathBuf::from(&venv).join("bin/secantusd-py");
        assert!(
            server.exists(),
            "{} is missing: run scripts/install-deps (it installs SecantusDB from PyPI into {venv})",
            server.display()
        );
        fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let mut cmd = Command::new(server);
        cmd.args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--storage-path",
        ])
        .arg(dir.join("data"));
        let mut proc = Proc::spawn(cmd, &dir.join("server.log"));
        proc.wait_port(port, "SecantusDB");
        MongoServer { port, proc }
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The connection string (`directConnection=true`).
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// A `[[datastores]]` entry named `mongo` for this server, to append to an agent's
    /// config.
    pub fn datastore_toml(&self) -> String {
        format!(
            "[[datastores]]\nname = \"mongo\"\nkind = \"mongodb\"\nuri = \"{}\"\n",
            self.uri()
        )
    }

    /// The last 30 lines of its log.
    pub fn log(&self) -> String {
        tail(&self.proc.log, 30)
    }

    /// Runs `f` with a client of this server, on a runtime of its own (the tests are
    /// synchronous); panics naming the server on an error.
    fn with_client<T, F>(&self, f: impl FnOnce(mongodb::Client) -> F) -> T
    where
        F: std::future::Future<Output = mongodb::error::Result<T>>,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = mongodb::Client::with_uri_str(self.uri()).await?;
            f(client).await
        })
        .unwrap_or_else(|e| panic!("MongoDB at {}: {e}\n{}", self.uri(), self.log()))
    }

    /// Its databases' names, sorted.
    pub fn databases(&self) -> Vec<String> {
        let mut names = self.with_client(|c| async move { c.list_database_names().await });
        names.sort();
        names
    }

    /// Documents in `db.coll` (0 if it does not exist).
    pub fn count(&self, db: &str, coll: &str) -> u64 {
        self.with_client(|c| async move {
            c.database(db)
                .collection::<bson::Document>(coll)
                .count_documents(bson::doc! {})
                .await
        })
    }

    /// Inserts `docs` into `db.coll`, 5,000 at a time.
    pub fn insert(&self, db: &str, coll: &str, docs: &[bson::Document]) {
        self.with_client(|c| async move {
            for chunk in docs.chunks(5_000) {
                c.database(db)
                    .collection::<bson::Document>(coll)
                    .insert_many(chunk)
                    .await?;
            }
            Ok(())
        })
    }

    /// Runs `command` in `db`.
    pub fn run(&self, db: &str, command: bson::Document) -> bson::Document {
        self.with_client(|c| async move { c.database(db).run_command(command).await })
    }

    /// What a user compares of database `db`: for each collection and view (not
    /// `system.*`), by name, its type and options, its index names, and every document as
    /// raw BSON, sorted by those bytes.
    pub fn contents(&self, db: &str) -> BTreeMap<String, NamespaceContents> {
        use futures::TryStreamExt;
        self.with_client(|c| async move {
            let d = c.database(db);
            let specs: Vec<bson::Document> = d
                .run_cursor_command(bson::doc! {"listCollections": 1})
                .await?
                .try_collect()
                .await?;
            let mut out = BTreeMap::new();
            for spec in specs {
                let name = spec.get_str("name").unwrap_or_default().to_owned();
                if name.starts_with("system.") {
                    continue;
                }
                let kind = spec.get_str("type").unwrap_or("collection").to_owned();
                let options = spec.get_document("options").cloned().unwrap_or_default();
                let (mut indexes, mut docs) = (Vec::new(), Vec::new());
                if kind != "view" {
                    let coll = d.collection::<bson::RawDocumentBuf>(&name);
                    indexes = coll.list_index_names().await?;
                    indexes.sort();
                    docs = coll
                        .find(bson::doc! {})
                        .await?
                        .try_collect::<Vec<_>>()
                        .await?
                        .into_iter()
                        .map(|d| d.into_bytes())
                        .collect();
                    docs.sort();
                }
                out.insert(name, (format!("{kind} {options}"), indexes, docs));
            }
            Ok(out)
        })
    }
}
