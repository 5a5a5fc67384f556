//! Backup sets: everything one environment backed up on one date. A set's members are the
//! datastores of that environment's production agents (as they describe themselves, plus
//! any a schedule names); the set is complete when every member has a successful backup
//! dated that day in the catalog. A staging restore of all its datastores takes the newest
//! complete set, so that PostgreSQL, MongoDB and the files come from the same night.

use std::collections::BTreeSet;

use crate::model::BackupRecord;

/// One member of a set.
#[derive(Clone, Debug, PartialEq)]
pub struct SetMember {
    /// Production agent id.
    pub agent: String,
    /// Datastore name.
    pub datastore: String,
    /// Its newest successful backup of that date, if any.
    pub backup: Option<BackupRecord>,
}

/// One environment's backups of one date.
#[derive(Clone, Debug, PartialEq)]
pub struct BackupSet {
    /// Environment.
    pub environment: String,
    /// `YYYY-MM-DD`.
    pub date: String,
    /// Expected members, in `expected` order, then any other datastore backed up that day.
    pub members: Vec<SetMember>,
}

impl BackupSet {
    /// Every expected member has a backup.
    pub fn complete(&self) -> bool {
        self.members.iter().all(|m| m.backup.is_some())
    }

    /// `agent/datastore` of the members without a backup.
    pub fn missing(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.backup.is_none())
            .map(|m| format!("{}/{}", m.agent, m.datastore))
            .collect()
    }

    /// Stored bytes of all members.
    pub fn size_bytes(&self) -> u64 {
        self.members
            .iter()
            .filter_map(|m| m.backup.as_ref())
            .map(|b| b.size_bytes)
            .sum()
    }

    /// When the set's newest member backup finished (its manifest's end, UTC ms); 0
    /// for a set without backups.
    pub fn finished_ms(&self) -> i64 {
        self.members
            .iter()
            .filter_map(|m| m.backup.as_ref().map(|b| b.finished_ms))
            .max()
            .unwrap_or_default()
    }

    /// Whether `datastore` has a backup in this set (on any agent).
    pub fn has(&self, datastore: &str) -> bool {
        self.members
            .iter()
            .any(|m| m.datastore == datastore && m.backup.is_some())
    }
}

/// The sets of `environment`, newest first: one for every date with at least one backup
/// in `backups`, with `expected` (`(agent, datastore)`) as its members. Newest is by when
/// the set's backups finished ([`BackupSet::finished_ms`], their manifests' ends), then
/// by date: not by the date alone, which an agent's clock that ran ahead got wrong.
pub fn build(
    environment: &str,
    expected: &[(String, String)],
    backups: &[BackupRecord],
) -> Vec<BackupSet> {
    let of_env: Vec<&BackupRecord> = backups
        .iter()
        .filter(|b| b.environment == environment)
        .collect();
    let dates: BTreeSet<&str> = of_env.iter().map(|b| b.date.as_str()).collect();
    let mut sets: Vec<BackupSet> = dates
        .into_iter()
        .rev()
        .map(|date| {
            let newest = |agent: &str, datastore: &str| {
                of_env
                    .iter()
                    .filter(|b| b.date == date && b.agent == agent && b.datastore == datastore)
                    .max_by_key(|b| b.finished_ms)
                    .map(|b| (*b).clone())
            };
            let mut members: Vec<SetMember> = expected
                .iter()
                .map(|(agent, datastore)| SetMember {
                    agent: agent.clone(),
                    datastore: datastore.clone(),
                    backup: newest(agent, datastore),
                })
                .collect();
            let others: BTreeSet<(&str, &str)> = of_env
                .iter()
                .filter(|b| b.date == date)
                .map(|b| (b.agent.as_str(), b.datastore.as_str()))
                .filter(|(a, d)| !expected.iter().any(|(ea, ed)| ea == a && ed == d))
                .collect();
            for (agent, datastore) in others {
                members.push(SetMember {
                    agent: agent.to_owned(),
                    datastore: datastore.to_owned(),
                    backup: newest(agent, datastore),
                });
            }
            BackupSet {
                environment: environment.to_owned(),
                date: date.to_owned(),
                members,
            }
        })
        .collect();
    sets.sort_by(|a, b| {
        b.finished_ms()
            .cmp(&a.finished_ms())
            .then(b.date.cmp(&a.date))
    });
    sets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(date: &str, datastore: &str, ms: i64) -> BackupRecord {
        BackupRecord {
            environment: "production".into(),
            date: date.into(),
            datastore: datastore.into(),
            kind: "postgres".into(),
            agent: "db1".into(),
            stored_path: format!("/{date}/{datastore}"),
            size_bytes: 10,
            bytes_uncompressed: 20,
            sha256: String::new(),
            finished_ms: ms,
            job_id: format!("{date}{datastore}{ms}"),
            missing: None,
            retain_until_ms: None,
            lock_error: None,
            copies: Vec::new(),
            recipients: Vec::new(),
        }
    }

    #[test]
    fn a_set_with_a_missing_member_is_incomplete_and_the_newest_complete_is_found() {
        let expected = vec![
            ("db1".to_owned(), "postgres".to_owned()),
            ("db1".to_owned(), "mongo".to_owned()),
        ];
        let backups = vec![
            rec("2026-11-23", "postgres", 1),
            rec("2026-11-23", "mongo", 2),
            rec("2026-11-24", "postgres", 3),
            rec("2026-11-24", "mongo", 4),
            rec("2026-11-24", "mongo", 5),
            rec("2026-11-25", "postgres", 6),
            rec("2026-11-25", "files", 7),
        ];
        let sets = build("production", &expected, &backups);
        assert_eq!(sets[0].date, "2026-11-25");
        assert!(!sets[0].complete());
        assert_eq!(sets[0].missing(), ["db1/mongo"]);
        // A datastore backed up but not expected is listed after the expected ones.
        assert_eq!(sets[0].members[2].datastore, "files");
        let newest_complete = sets.iter().find(|s| s.complete()).unwrap();
        assert_eq!(newest_complete.date, "2026-11-24");
        // The newer of two mongo backups that day.
        assert_eq!(
            newest_complete.members[1]
                .backup
                .as_ref()
                .unwrap()
                .finished_ms,
            5
        );
        assert_eq!(newest_complete.size_bytes(), 20);
    }

    #[test]
    fn the_newest_set_is_the_one_that_finished_last_not_the_latest_folder_name() {
        let expected = vec![("db1".to_owned(), "postgres".to_owned())];
        // A clock a day ahead named 2026-11-26 a backup that finished before the one of
        // 2026-11-25, made once the clock was right.
        let backups = vec![
            rec("2026-11-26", "postgres", 10),
            rec("2026-11-25", "postgres", 20),
        ];
        let sets = build("production", &expected, &backups);
        assert_eq!(sets[0].date, "2026-11-25");
        assert_eq!(sets[0].finished_ms(), 20);
        assert_eq!(sets[1].date, "2026-11-26");
    }
}
