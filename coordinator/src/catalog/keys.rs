//! `ferry keys`: the recipients the catalog's backups were encrypted to, the staging agents
//! holding each one's identity, and the backups no staging agent can open, for rotating
//! keys by epochs (README, "Key rotation"): add the new recipient to production, give the
//! staging agents the new identity beside the old, let a drill restore with the new one
//! only, and retire the old identity once no backup in the catalog (what retention keeps)
//! needs it.
//!
//! A backup is opened by a staging agent that restores its environment (its Describe's
//! `source_environment`) and holds an identity whose fingerprint is among the backup's
//! recipients. While a staging agent of an environment has not described its identities
//! (not answered yet, or an older build), that environment's backups are not counted as
//! unopenable: what the agent can open is not known.

use std::collections::{BTreeMap, BTreeSet};

use crate::dispatch::Coordinator;
use crate::model::BackupRecord;
use crate::store::StoreError;

/// One recipient fingerprint and what depends on it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeyUse {
    /// `sha256:` + 16 hex digits.
    pub fingerprint: String,
    /// Catalog records encrypted to it.
    pub backups: u32,
    /// The oldest and newest of them (UTC ms of their end).
    pub oldest_ms: i64,
    /// See `oldest_ms`.
    pub newest_ms: i64,
    /// Staging agents holding its identity, by id.
    pub staging_agents: Vec<String>,
}

/// What [`report`] found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeyReport {
    /// Every fingerprint a backup or a staging agent names, sorted.
    pub keys: Vec<KeyUse>,
    /// Dated archives no staging agent can open, newest first.
    pub unopenable: Vec<BackupRecord>,
    /// Dated archives whose recipients are not known.
    pub unknown: u32,
    /// Staging agents whose identities are not known.
    pub undescribed: Vec<String>,
}

impl KeyReport {
    /// How many unopenable backups each environment has (only those with some).
    pub fn unopenable_by_environment(&self) -> BTreeMap<String, u32> {
        let mut out = BTreeMap::new();
        for r in &self.unopenable {
            *out.entry(r.environment.clone()).or_insert(0) += 1;
        }
        out
    }
}

/// A staging agent as [`report`] sees it: its id, the environment it restores, and the
/// fingerprints of its identities (`None` until it described them).
pub type Staging = (String, String, Option<Vec<String>>);

/// Matches `records` (the catalog) with the staging agents' identities.
pub fn report(records: &[BackupRecord], staging: &[Staging]) -> KeyReport {
    let mut out = KeyReport::default();
    let mut keys: BTreeMap<String, KeyUse> = BTreeMap::new();
    let mut blind: BTreeSet<&str> = BTreeSet::new();
    for (id, env, fps) in staging {
        match fps {
            Some(fps) if !fps.is_empty() => {
                for fp in fps {
                    let k = keys.entry(fp.clone()).or_default();
                    k.staging_agents.push(id.clone());
                }
            }
            _ => {
                out.undescribed.push(id.clone());
                blind.insert(env);
            }
        }
    }
    for r in records.iter().filter(|r| r.is_archive()) {
        if r.recipients.is_empty() {
            out.unknown += 1;
            continue;
        }
        for fp in &r.recipients {
            let k = keys.entry(fp.clone()).or_default();
            if k.backups == 0 || r.finished_ms < k.oldest_ms {
                k.oldest_ms = r.finished_ms;
            }
            k.newest_ms = k.newest_ms.max(r.finished_ms);
            k.backups += 1;
        }
        let opened = staging.iter().any(|(_, env, fps)| {
            *env == r.environment
                && fps
                    .as_ref()
                    .is_some_and(|fps| fps.iter().any(|f| r.recipients.contains(f)))
        });
        if !opened && !blind.contains(r.environment.as_str()) {
            out.unopenable.push(r.clone());
        }
    }
    out.keys = keys
        .into_iter()
        .map(|(fingerprint, k)| KeyUse { fingerprint, ..k })
        .collect();
    out.unopenable
        .sort_by_key(|r| std::cmp::Reverse(r.finished_ms));
    out
}

impl Coordinator {
    /// [`report`] of the catalog and the staging agents as they last described
    /// themselves.
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn keys(&self) -> Result<KeyReport, StoreError> {
        let records = self.backups(None).await?;
        let staging: Vec<Staging> = self
            .agents
            .all()
            .filter(|a| a.role.may_restore())
            .map(|a| {
                let described = self.agents.state(&a.id).described;
                let env = described
                    .as_ref()
                    .map(|d| d.source_environment.clone())
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "production".to_owned());
                (
                    a.id.clone(),
                    env,
                    described.map(|d| d.identity_fingerprints),
                )
            })
            .collect();
        Ok(report(&records, &staging))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(env: &str, ms: i64, recipients: &[&str]) -> BackupRecord {
        BackupRecord {
            environment: env.into(),
            date: "2026-12-05".into(),
            datastore: "pg".into(),
            kind: "postgres".into(),
            agent: "pg-prod".into(),
            stored_path: format!("/b/{env}/2026-12-05/pg_backup_{ms}.age"),
            size_bytes: 1,
            bytes_uncompressed: 1,
            sha256: String::new(),
            finished_ms: ms,
            job_id: format!("j{ms}"),
            missing: None,
            retain_until_ms: None,
            lock_error: None,
            copies: Vec::new(),
            recipients: recipients.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn a_rotation_shows_which_backups_need_the_old_key_and_who_opens_them() {
        let records = [
            record("production", 1, &["old"]),
            record("production", 2, &["old", "new"]),
            record("production", 3, &["new"]),
            record("production", 4, &[]),
        ];
        // Both identities on stage-a, only the new on stage-b.
        let staging = |a: &[&str], b: &[&str]| -> Vec<Staging> {
            vec![
                (
                    "stage-a".into(),
                    "production".into(),
                    Some(a.iter().map(|s| (*s).to_owned()).collect()),
                ),
                (
                    "stage-b".into(),
                    "production".into(),
                    Some(b.iter().map(|s| (*s).to_owned()).collect()),
                ),
            ]
        };
        let r = report(&records, &staging(&["old", "new"], &["new"]));
        assert!(r.unopenable.is_empty());
        assert_eq!(r.unknown, 1);
        let old = r.keys.iter().find(|k| k.fingerprint == "old").unwrap();
        assert_eq!((old.backups, old.oldest_ms, old.newest_ms), (2, 1, 2));
        assert_eq!(old.staging_agents, ["stage-a"]);
        // The old identity retired everywhere while backup 1 still needs it: unopenable.
        let r = report(&records, &staging(&["new"], &["new"]));
        assert_eq!(
            r.unopenable
                .iter()
                .map(|b| b.finished_ms)
                .collect::<Vec<_>>(),
            [1]
        );
        // A staging agent not described yet: nothing is counted unopenable for its
        // environment.
        let mut s = staging(&["new"], &["new"]);
        s[1].2 = None;
        let r = report(&records, &s);
        assert!(r.unopenable.is_empty());
        assert_eq!(r.undescribed, ["stage-b"]);
        // Another environment's staging agent opens nothing here.
        let r = report(
            &records,
            &[(
                "qa".into(),
                "qa".into(),
                Some(vec!["old".into(), "new".into()]),
            )],
        );
        assert_eq!(r.unopenable.len(), 3);
    }
}
