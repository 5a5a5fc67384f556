//! MongoDB continuous archiving against a real MongoDB-wire server (SecantusDB, a one-node
//! replica set): the production agent closes an oplog slice every `oplog_slice_seconds`;
//! the slices, read back with stock `age -d | zstd -d` and pymongo's BSON decoder (not
//! Ferry's), hold every entry of the server's oplog once, in order, chained without a hole
//! across an agent restart; a chain whose entry the oplog no longer holds is reported as a
//! gap and a new chain starts. `ferry restore --to-time T` restores the newest dump
//! finished by T and replays the slices after its oplog window up to T: writes of every
//! kind made after the dump, staging equal to production as it was at T; an instant beyond
//! the newest slice is refused naming the newest it can reach, and an altered slice fails
//! the restore before anything is put in place.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bson::{RawDocumentBuf, doc};
use ferry_tests::*;
use futures::TryStreamExt;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

struct Fleet {
    d: Deployment,
    prod: MongoServer,
    stage: Option<MongoServer>,
    state_dir: PathBuf,
}

/// A deployment whose production agent archives `mongo`'s oplog every 2 seconds.
fn deploy() -> Fleet {
    deploy_with(false)
}

/// [`deploy`], with a staging MongoDB server restored to if `staging`.
fn deploy_with(staging: bool) -> Fleet {
    deploy_opts(staging, false, None)
}

/// [`deploy_with`], the backup server in a network namespace of its own if `netns` (so a
/// test can cut its link; the agent's calls then fail after 5 s without progress), and
/// production copied to `copy` (a bucket of the shared Ceph cluster, `offsite`) if given.
fn deploy_opts(staging: bool, netns: bool, copy: Option<&str>) -> Fleet {
    let mut server = None;
    let mut state = None;
    let mut stage = None;
    let d = Deployment::start_with_options(DeploymentOptions {
        backup_server_netns: netns,
        io_timeout_seconds: netns.then_some(5),
        tweak: Some(Box::new(|d: &mut Deployment| {
            if staging {
                let s = MongoServer::start(&d.dir.path().join("mongo-stage"));
                append(&d.stage_config, &s.datastore_toml());
                stage = Some(s);
            }
            d.add_maintenance();
            if let Some(bucket) = copy {
                let c = CephCluster::shared();
                append(
                    &d.coordinator_config,
                    &format!(
                        "\n[[environments]]\nname = \"production\"\ncopy_to = [\"offsite\"]\n{}",
                        s3_table(
                            "copies.offsite",
                            c,
                            bucket,
                            &c.roles().maintenance,
                            d.dir.path(),
                            ""
                        )
                    ),
                );
            }
            let prod = MongoServer::start(&d.dir.path().join("mongo-prod"));
            let state_dir = d.dir.path().join("prod-state");
            set_top_level(
                &d.prod_config,
                "state_dir",
                &toml_str(&state_dir.display().to_string()),
            );
            append(
                &d.prod_config,
                &format!("{}oplog_slice_seconds = 2\n", prod.datastore_toml()),
            );
            server = Some(prod);
            state = Some(state_dir);
        })),
        ..DeploymentOptions::default()
    });
    Fleet {
        d,
        prod: server.unwrap(),
        stage,
        state_dir: state.unwrap(),
    }
}

/// One stored slice: its record, and its entries as pymongo decodes them after stock
/// `age -d | zstd -d`.
struct Stored {
    name: String,
    record: serde_json::Value,
    entries: Vec<serde_json::Value>,
}

fn oplog_dir(d: &Deployment) -> PathBuf {
    d.sshd.root().join("production/mongo-oplog")
}

/// `(ts.t, ts.i)` of a record's `after`/`upto`/`first`/`last`.
fn tsj(v: &serde_json::Value) -> Option<(u64, u64)> {
    Some((v.get("t")?.as_u64()?, v.get("i")?.as_u64()?))
}

/// The slices stored so far, in name order, each decrypted with the stock tools and its
/// BSON split and decoded by pymongo (`bson.decode_file_iter`, raw documents): `[{ "t", "i", "op", "ns", "raw" }]`,
/// `raw` the entry's bytes in hex.
fn stored_slices(d: &Deployment) -> Vec<Stored> {
    let dir = oplog_dir(d);
    let mut names: Vec<String> = fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".bson.zst.age"))
        .filter(|n| dir.join(format!("{n}.json")).exists())
        .collect();
    names.sort();
    let python = PathBuf::from(venv()).join("bin/python");
    let age = require("age", "age");
    require("zstd", "zstd");
    names
        .into_iter()
        .map(|name| {
            let record: serde_json::Value =
                serde_json::from_slice(&fs::read(dir.join(format!("{name}.json"))).unwrap())
                    .unwrap();
            let out = Command::new("bash")
                .arg("-c")
                .arg(format!(
                    "set -o pipefail; {} -d -i {} {} | zstd -d | {} -c '{}'",
                    age.display(),
                    d.identity.display(),
                    dir.join(&name).display(),
                    python.display(),
                    "import sys, json, bson\n\
                     from bson.raw_bson import RawBSONDocument\n\
                     opts = bson.CodecOptions(document_class=RawBSONDocument)\n\
                     out = []\n\
                     for e in bson.decode_file_iter(sys.stdin.buffer, opts):\n\
                     \u{20}   out.append({\"t\": e[\"ts\"].time, \"i\": e[\"ts\"].inc, \"op\": e[\"op\"], \"ns\": e[\"ns\"], \"raw\": e.raw.hex()})\n\
                     print(json.dumps(out))"
                ))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
            Stored {
                name,
                record,
                entries,
            }
        })
        .collect()
}

/// The server's oplog entries after `after` (`ts > after`), as raw bytes in hex, in order.
fn server_entries(prod: &MongoServer, after: Option<(u64, u64)>) -> Vec<(u64, u64, String)> {
    runtime().block_on(async {
        let c = mongodb::Client::with_uri_str(prod.uri()).await.unwrap();
        let docs: Vec<RawDocumentBuf> = c
            .database("local")
            .collection::<RawDocumentBuf>("oplog.rs")
            .find(doc! {})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        docs.into_iter()
            .map(|d| {
                let ts = d.get_timestamp("ts").unwrap();
                (
                    u64::from(ts.time),
                    u64::from(ts.increment),
                    hex::encode(d.as_bytes()),
                )
            })
            .filter(|(t, i, _)| after.is_none_or(|a| (*t, *i) > a))
            .collect()
    })
}

/// Writes of several kinds to `app.items`, tagged `round`.
fn write_round(prod: &MongoServer, round: i32) {
    runtime().block_on(async {
        let c = mongodb::Client::with_uri_str(prod.uri()).await.unwrap();
        let items = c.database("app").collection::<bson::Document>("items");
        let base = round * 100;
        items
            .insert_many((0..20).map(|i| doc! {"_id": base + i, "round": round, "n": i}))
            .await
            .unwrap();
        items
            .update_many(
                doc! {"round": round, "n": {"$lt": 5}},
                doc! {"$set": {"odd": true}, "$inc": {"n": 100}},
            )
            .await
            .unwrap();
        items
            .replace_one(doc! {"_id": base + 7}, doc! {"replaced": round})
            .await
            .unwrap();
        items
            .delete_many(doc! {"round": round, "n": {"$gte": 15}})
            .await
            .unwrap();
    });
}

/// Waits until a stored slice's record ends (`to`) after `at`.
fn wait_slice_after(d: &Deployment, at: chrono::DateTime<chrono::Utc>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let dir = oplog_dir(d);
        let done = fs::read_dir(&dir).into_iter().flatten().flatten().any(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.ends_with(".json")
                && fs::read(e.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|r| r["to"].as_str().map(str::to_owned))
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
                    .is_some_and(|t| t > at)
        });
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no oplog slice ends after {at}: {:?}\n{}",
            d.sshd.files(),
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every stored entry, in chain order, checked against the records: each slice continues
/// the previous one (`after` = its `upto`), its record's counts, first and last are its
/// entries', and `chain_start` is set exactly on the slices listed in `starts`.
fn check_chain(slices: &[Stored], starts: &[usize]) -> Vec<(u64, u64, String)> {
    let mut all = Vec::new();
    let mut upto: Option<(u64, u64)> = None;
    for (k, s) in slices.iter().enumerate() {
        let r = &s.record;
        assert_eq!(
            r["chain_start"].is_string(),
            starts.contains(&k),
            "slice {k} {}: chain_start {}",
            s.name,
            r["chain_start"]
        );
        if k > 0 && !starts.contains(&k) {
            assert_eq!(
                tsj(&r["after"]),
                upto,
                "slice {k} {} continues the chain",
                s.name
            );
        }
        assert_eq!(
            r["entries"].as_u64().unwrap() as usize,
            s.entries.len(),
            "{}",
            s.name
        );
        let ts: Vec<(u64, u64)> = s
            .entries
            .iter()
            .map(|e| (e["t"].as_u64().unwrap(), e["i"].as_u64().unwrap()))
            .collect();
        assert_eq!(tsj(&r["first"]), ts.first().copied(), "{}", s.name);
        assert_eq!(tsj(&r["last"]), ts.last().copied(), "{}", s.name);
        if let Some(a) = tsj(&r["after"]) {
            assert!(
                ts.iter().all(|t| *t > a),
                "{}: entries after `after`",
                s.name
            );
        }
        upto = tsj(&r["upto"]);
        assert_eq!(upto, ts.last().copied().or(tsj(&r["after"])), "{}", s.name);
        for e in &s.entries {
            all.push((
                e["t"].as_u64().unwrap(),
                e["i"].as_u64().unwrap(),
                e["raw"].as_str().unwrap().to_owned(),
            ));
        }
    }
    all
}

fn state_file(f: &Fleet) -> PathBuf {
    f.state_dir.join("oplog-mongo.json")
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(p).unwrap()).unwrap()
}

#[test]
fn oplog_slices_hold_every_entry_once_in_order_across_an_agent_restart_and_a_gap_starts_a_new_chain()
 {
    let mut f = deploy();
    // The chain starts at the oplog's newest entry when the agent first reads it.
    wait_slice_after(&f.d, chrono::Utc::now());
    write_round(&f.prod, 1);
    write_round(&f.prod, 2);
    wait_slice_after(&f.d, chrono::Utc::now());

    // The agent down while the application writes: the next slices continue the chain.
    f.d.kill("agent-prod");
    write_round(&f.prod, 3);
    f.d.start_agent("agent-prod");
    write_round(&f.prod, 4);
    wait_slice_after(&f.d, chrono::Utc::now());

    let slices = stored_slices(&f.d);
    assert!(slices.len() >= 3, "{}", slices.len());
    let stored = check_chain(&slices, &[0]);
    let expected = server_entries(&f.prod, tsj(&slices[0].record["after"]));
    assert!(
        expected.len() >= 4 * 4,
        "the writes are in the server's oplog: {}",
        expected.len()
    );
    assert_eq!(
        stored.len(),
        expected.len(),
        "every entry of the oplog after the chain's start, once"
    );
    assert_eq!(stored, expected, "byte for byte, in order");
    let kinds: std::collections::BTreeSet<String> = slices
        .iter()
        .flat_map(|s| {
            s.entries
                .iter()
                .map(|e| e["op"].as_str().unwrap().to_owned())
        })
        .collect();
    for op in ["i", "u", "d"] {
        assert!(kinds.contains(op), "{op} among {kinds:?}");
    }
    // `ferry status` shows the newest slice and its lag, read from the archive.
    let archive = wait_archive_status(&f.d, |a| a["lag_seconds"].as_i64().is_some_and(|l| l < 60));
    assert_eq!(archive["kind"], "oplog", "{archive}");
    assert!(archive["gap_since"].is_null(), "{archive}");
    let state = read_json(&state_file(&f));
    assert_eq!(
        tsj(&state["upto"]),
        tsj(&slices.last().unwrap().record["upto"]),
        "the state names where the newest slice ended"
    );

    // A gap: the chain's entry is no longer in the oplog. SecantusDB's oplog is a read-only
    // view that never rolls over, so the state is pointed at an entry it never held, which
    // is what the agent sees after a rollover: its entry gone, newer ones there.
    f.d.kill("agent-prod");
    let mut state = read_json(&state_file(&f));
    let (t, _) = tsj(&state["upto"]).unwrap();
    state["upto"] = serde_json::json!({"t": t - 1, "i": 4_000_000});
    fs::write(state_file(&f), serde_json::to_vec(&state).unwrap()).unwrap();
    let before = stored_slices(&f.d).len();
    f.d.start_agent("agent-prod");
    write_round(&f.prod, 5);
    wait_slice_after(&f.d, chrono::Utc::now());
    let slices = stored_slices(&f.d);
    let gap = &slices[before];
    let why = gap.record["chain_start"].as_str().unwrap_or_default();
    assert!(
        why.starts_with("gap:") && why.contains(&format!("Timestamp({}, 4000000)", t - 1)),
        "{}: {why}",
        gap.name
    );
    check_chain(&slices, &[0, before]);
    let log = f.d.log_tail("agent-prod");
    assert!(log.contains("Oplog gap"), "{log}");
    let after_gap: Vec<_> = slices[before..]
        .iter()
        .flat_map(|s| s.entries.iter())
        .map(|e| e["raw"].as_str().unwrap().to_owned())
        .collect();
    // The coordinator reports the gap until a backup of the datastore has finished.
    let archive = wait_archive_status(&f.d, |a| a["gap_since"].is_string());
    assert!(
        f.d.ferry_ok(&["status"]).contains("GAP: a new chain since"),
        "{archive}"
    );
    f.d.ferry_ok(&["backup", "pg-prod", "mongo", "--wait"]);
    wait_archive_status(&f.d, |a| a["gap_since"].is_null());
    let round5 = server_entries(&f.prod, tsj(&gap.record["after"]));
    assert_eq!(
        after_gap,
        round5.into_iter().map(|(_, _, r)| r).collect::<Vec<_>>(),
        "the new chain holds every entry after its start"
    );
}

/// Writes of the kinds a replay must apply beyond [`write_round`]: `$unset`, `$push`,
/// `$rename`, a collection created with an index, a transaction over two collections, a
/// collection dropped, tagged `round`.
fn write_kinds(prod: &MongoServer, round: i32) {
    runtime().block_on(async {
        let c = mongodb::Client::with_uri_str(prod.uri()).await.unwrap();
        let app = c.database("app");
        let items = app.collection::<bson::Document>("items");
        let base = round * 100;
        items
            .update_one(
                doc! {"_id": base + 1},
                doc! {"$unset": {"n": ""}, "$push": {"tags": {"$each": ["a", round]}}},
            )
            .await
            .unwrap();
        items
            .update_one(
                doc! {"_id": base + 2},
                doc! {"$rename": {"n": "m"}, "$set": {"deep.x.y": round}},
            )
            .await
            .unwrap();
        let fresh = format!("made{round}");
        app.create_collection(&fresh).await.unwrap();
        app.collection::<bson::Document>(&fresh)
            .create_index(mongodb::IndexModel::builder().keys(doc! {"k": 1}).build())
            .await
            .unwrap();
        app.collection::<bson::Document>(&fresh)
            .insert_many((0..5).map(|k| doc! {"k": k, "round": round}))
            .await
            .unwrap();
        let mut session = c.start_session().await.unwrap();
        session.start_transaction().await.unwrap();
        items
            .insert_one(doc! {"_id": base + 50, "txn": round})
            .session(&mut session)
            .await
            .unwrap();
        app.collection::<bson::Document>("ledger")
            .insert_one(doc! {"round": round, "txn": true})
            .session(&mut session)
            .await
            .unwrap();
        session.commit_transaction().await.unwrap();
        if round > 1 {
            app.collection::<bson::Document>(&format!("made{}", round - 1))
                .drop()
                .await
                .unwrap();
        }
    });
}

/// Now, to the millisecond, with a pause on either side so that no write shares it.
fn instant() -> (chrono::DateTime<chrono::Utc>, String) {
    std::thread::sleep(Duration::from_millis(300));
    let t = chrono::Utc::now();
    std::thread::sleep(Duration::from_millis(300));
    (t, t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn restore_to(d: &Deployment, t: &str) -> (bool, String) {
    d.restore_to_time("mongo", t)
}

#[test]
fn a_restore_to_a_point_in_time_replays_the_slices_after_the_dump_and_equals_production_at_that_instant()
 {
    let f = deploy_with(true);
    let stage = f.stage.as_ref().unwrap();
    write_round(&f.prod, 1);
    write_kinds(&f.prod, 1);
    let out = f.d.ferry_ok(&["backup", "pg-prod", "mongo", "--wait"]);
    assert!(out.contains("oplog captured"), "{out}");

    // Writes of every kind after the dump; T1 and T2 with production as it was then.
    write_round(&f.prod, 2);
    write_kinds(&f.prod, 2);
    let (t1, t1s) = instant();
    let at_t1 = f.prod.contents("app");
    write_round(&f.prod, 3);
    write_kinds(&f.prod, 3);
    let (t2, t2s) = instant();
    let at_t2 = f.prod.contents("app");
    write_round(&f.prod, 4);
    assert_ne!(at_t1, at_t2);
    assert_ne!(at_t2, f.prod.contents("app"));

    // Beyond the newest slice (written every 2 s, so not yet up to now): refused, naming
    // the newest instant the archive reaches.
    wait_slice_after(&f.d, t2);
    let now = chrono::Utc::now() - chrono::Duration::milliseconds(20);
    let (ok, text) = restore_to(&f.d, &now.to_rfc3339());
    assert!(
        !ok && text.contains("beyond the archived oplog") && text.contains("the newest instant"),
        "{text}"
    );

    wait_slice_after(&f.d, t2 + chrono::Duration::seconds(1));
    let (ok, text) = restore_to(&f.d, &t1s);
    assert!(ok, "{text}\n{}", f.d.logs());
    assert!(
        text.contains("oplog slices") && text.contains("entries after the dump"),
        "{text}"
    );
    assert_eq!(
        stage.contents("app"),
        at_t1,
        "staging equals production at T1 ({t1s})"
    );
    let (ok, text) = restore_to(&f.d, &t2s);
    assert!(ok, "{text}");
    assert_eq!(
        stage.contents("app"),
        at_t2,
        "staging equals production at T2 ({t2s})"
    );

    // Prune: slices that ended over an hour before the kept dump started go (two planted,
    // dated yesterday, as a day of slices would be), those the dump's replay needs stay.
    let dir = oplog_dir(&f.d);
    let yesterday = (chrono::Utc::now() - chrono::Duration::days(1)).format("%Y%m%d");
    let old: Vec<String> = ["100000.000Z-100100.000Z", "100100.000Z-100200.000Z"]
        .iter()
        .map(|r| {
            let (a, b) = r.split_once('-').unwrap();
            format!("{yesterday}T{a}-{yesterday}T{b}.bson.zst.age")
        })
        .collect();
    for name in &old {
        fs::write(dir.join(name), b"old slice").unwrap();
        fs::write(dir.join(format!("{name}.json")), b"{}").unwrap();
    }
    let kept_before: Vec<String> = stored_slices_names(&f.d)
        .into_iter()
        .filter(|n| !old.contains(n))
        .collect();
    let plan = f.d.ferry_ok(&["prune", "--dry-run"]);
    assert!(
        plan.contains("mongo (oplog)") && plan.contains("remove 2 file(s)"),
        "{plan}"
    );
    let out = f.d.ferry_ok(&["prune"]);
    assert!(out.contains("removed 2 file(s)"), "{out}");
    let left = stored_slices_names(&f.d);
    for name in &old {
        assert!(!left.contains(name), "{name} kept: {left:?}");
        assert!(!dir.join(format!("{name}.json")).exists(), "its record too");
    }
    for name in &kept_before {
        assert!(left.contains(name), "{name} removed: {out}");
    }
    assert!(f.d.ferry_ok(&["audit"]).contains("prune oplog"));
    let (ok, text) = restore_to(&f.d, &t2s);
    assert!(ok, "{text}");
    assert_eq!(stage.contents("app"), at_t2, "after the prune, T2 again");

    // An altered slice (one that T2 needs): the restore fails before anything is replaced.
    let needed = stored_slices(&f.d)
        .into_iter()
        .find(|s| {
            s.entries.iter().any(|e| {
                chrono::DateTime::from_timestamp(e["t"].as_i64().unwrap(), 0).unwrap()
                    > t1 - chrono::Duration::seconds(1)
                    && chrono::DateTime::from_timestamp(e["t"].as_i64().unwrap(), 0).unwrap() <= t2
            })
        })
        .expect("a slice with entries between T1 and T2");
    let path = dir.join(&needed.name);
    let mut bytes = fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 0x40;
    fs::write(&path, &bytes).unwrap();
    let before = stage.contents("app");
    let (ok, text) = restore_to(&f.d, &t2s);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&needed.name) && text.contains("altered or damaged"),
        "{text}"
    );
    assert_eq!(stage.contents("app"), before, "staging left as it was");
}

/// Polls `ferry status --output json` until the archive status of `mongo` satisfies `ok`;
/// returns it.
fn wait_archive_status(
    d: &Deployment,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status: serde_json::Value =
            serde_json::from_str(&d.ferry_ok(&["status", "--output", "json"])).unwrap();
        let found = status["archives"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["datastore"] == "mongo").cloned());
        match found {
            Some(a) if ok(&a) => return a,
            other => assert!(
                Instant::now() < deadline,
                "no archive status of mongo as expected: {other:?}\n{}",
                d.log_tail("coordinator")
            ),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The names of the stored slices (data files), sorted.
fn stored_slices_names(d: &Deployment) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(oplog_dir(d))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".bson.zst.age"))
        .collect();
    names.sort();
    names
}

#[test]
fn with_the_backup_server_unreachable_slices_wait_and_the_chain_has_every_entry_once_it_is_back() {
    let f = deploy_opts(false, true, None);
    wait_slice_after(&f.d, chrono::Utc::now());
    write_round(&f.prod, 1);
    let netns = f.d.netns.as_ref().expect("the backup server's namespace");
    netns.cut();
    write_round(&f.prod, 2);
    // Until a slice's upload has failed (the agent's calls give up after 5 s without
    // progress) and been retried.
    let deadline = Instant::now() + Duration::from_secs(90);
    while !f
        .d
        .log_tail("agent-prod")
        .contains("Oplog slice failed; retrying.")
    {
        assert!(
            Instant::now() < deadline,
            "no failed slice logged while the link is cut:\n{}",
            f.d.log_tail("agent-prod")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    write_round(&f.prod, 3);
    netns.restore();
    write_round(&f.prod, 4);
    wait_slice_after(&f.d, chrono::Utc::now());

    let slices = stored_slices(&f.d);
    let stored = check_chain(&slices, &[0]);
    let expected = server_entries(&f.prod, tsj(&slices[0].record["after"]));
    assert!(expected.len() >= 4 * 4, "{}", expected.len());
    assert_eq!(
        stored, expected,
        "every entry once, in order, after the outage"
    );
}

#[test]
fn oplog_slices_are_copied_to_the_copy_target_byte_for_byte_with_their_records() {
    let c = CephCluster::shared();
    let bucket = c.ferry_copy_bucket("slices");
    let f = deploy_opts(false, false, Some(&bucket));
    write_round(&f.prod, 1);
    wait_slice_after(&f.d, chrono::Utc::now());
    let before = stored_slices_names(&f.d);
    // A backup wakes the copier: the dump, then the archived slices the copy lacks.
    f.d.ferry_ok(&["backup", "pg-prod", "mongo", "--wait"]);
    let dir = oplog_dir(&f.d);
    let key = |name: &str| format!("ferry/production/mongo-oplog/{name}");
    let m = &c.roles().maintenance;
    let deadline = Instant::now() + Duration::from_secs(60);
    for name in &before {
        for object in [name.clone(), format!("{name}.json")] {
            let got = loop {
                match c.s3(
                    m,
                    "get_object",
                    serde_json::json!({"Bucket": bucket, "Key": key(&object)}),
                ) {
                    Ok(v) => break v,
                    Err(e) => assert!(
                        Instant::now() < deadline,
                        "{object} not copied: {e}\n{}",
                        f.d.log_tail("coordinator")
                    ),
                }
                std::thread::sleep(Duration::from_millis(500));
            };
            let local = fs::read(dir.join(&object)).unwrap();
            if object.ends_with(".json") {
                // The record as on the primary, but for the version id the copy target gave
                // its own copy.
                let primary: serde_json::Value = serde_json::from_slice(&local).unwrap();
                let mut copied: serde_json::Value =
                    serde_json::from_str(got["Body"].as_str().unwrap()).unwrap();
                assert!(copied["version_id"].is_string(), "{copied}");
                copied.as_object_mut().unwrap().remove("version_id");
                assert_eq!(copied, primary, "{object}");
            } else {
                assert_eq!(
                    got["BodySha256"].as_str().unwrap(),
                    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&local)),
                    "{object} byte for byte"
                );
            }
        }
    }
}
