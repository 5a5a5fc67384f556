//! Operating Ferry (issue 5) end to end: the audit log records every operator command and
//! every order with the operator's certificate name, and `ferry audit --verify` proves it
//! intact, and finds an entry edited in the coordinator's store.

use ferry_tests::*;
use redb::ReadableTable;

/// The audit table as the coordinator's store defines it.
const AUDIT: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("audit");

#[test]
fn audit_log_records_commands_and_orders_and_detects_an_edited_entry() {
    let mut d = Deployment::start();
    d.ferry_ok(&["backup", "pg-prod", "--wait"]);
    let refused = d.ferry(&["backup", "pg-stage"]);
    assert!(!refused.status.success());

    let log = d.ferry_json(&["audit"]);
    let entries = log.as_array().unwrap();
    let find = |who: &str, action: &str, target: &str| {
        entries.iter().find(|e| {
            e["who"] == who
                && e["action"] == action
                && e["target"].as_str().unwrap().contains(target)
        })
    };
    let trigger = find("operator", "trigger backup", "pg-prod/*").expect("the operator's backup");
    assert!(
        trigger["outcome"]
            .as_str()
            .unwrap()
            .starts_with("ok: jobs "),
        "{trigger}"
    );
    let order = find("coordinator", "order backup", "pg-prod/postgres").expect("the order");
    assert!(
        order["outcome"].as_str().unwrap().contains("sent"),
        "{order}"
    );
    let done = find("coordinator", "backup finished", "pg-prod/postgres").expect("the outcome");
    assert_eq!(done["outcome"], "succeeded");
    let no = find("operator", "trigger backup", "pg-stage/*").expect("the refused command");
    assert!(
        no["outcome"].as_str().unwrap().starts_with("refused: "),
        "{no}"
    );

    let ok = d.ferry_ok(&["audit", "--verify"]);
    assert!(ok.contains("audit log intact"), "{ok}");

    // Someone with access to the store file rewrites what the operator did.
    d.kill("coordinator");
    let store = d.dir.path().join("coordinator.redb");
    {
        let db = redb::Database::open(&store).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(AUDIT).unwrap();
            let seq = trigger["seq"].as_u64().unwrap();
            let mut e: serde_json::Value =
                serde_json::from_slice(t.get(seq).unwrap().unwrap().value()).unwrap();
            e["who"] = serde_json::json!("somebody-else");
            let bytes = serde_json::to_vec(&e).unwrap();
            t.insert(seq, bytes.as_slice()).unwrap();
        }
        tx.commit().unwrap();
    }
    d.start_coordinator();
    let out = d.ferry(&["audit", "--verify"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("entry {} was edited", trigger["seq"])),
        "{text}"
    );
}
