//! The audit log: every operator command and every order sent to an agent, with who (the
//! client certificate's name, or `schedule`), what, when and the outcome, appended to the
//! store's `audit` table. Entries are hash-chained: each holds the SHA-256 of the previous
//! entry's hash and its own fields, so editing, removing or reordering an entry breaks
//! every hash after it, which [`verify`] finds (`ferry audit --verify`).
//!
//! The chain proves the log was not edited after the fact by someone who cannot also
//! recompute every later hash; anchoring the newest hash elsewhere (an operator's note, a
//! ticket) makes a rewrite of the whole chain detectable too.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `prev_hash` of the first entry: 64 zeros.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log, from 1.
    pub seq: u64,
    /// When, UTC milliseconds since the epoch.
    pub at_ms: i64,
    /// Who: the client certificate's common name, `schedule`, or `coordinator`.
    pub who: String,
    /// What, e.g. `trigger backup`, `order restore`, `job finished`.
    pub action: String,
    /// On what, e.g. `pg-prod/postgres` or a job id.
    pub target: String,
    /// `ok`, `refused: ...`, `failed: ...`, or the job ids created.
    pub outcome: String,
    /// The previous entry's `hash` ([`GENESIS`] for the first).
    pub prev_hash: String,
    /// SHA-256 (hex) over `prev_hash` and the fields above ([`AuditEntry::compute_hash`]).
    pub hash: String,
}

impl AuditEntry {
    /// A new entry after `prev` (`None` for the first), its hash computed.
    pub fn next(
        prev: Option<&AuditEntry>,
        at_ms: i64,
        who: &str,
        action: &str,
        target: &str,
        outcome: &str,
    ) -> AuditEntry {
        let mut e = AuditEntry {
            seq: prev.map_or(1, |p| p.seq + 1),
            at_ms,
            who: who.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            outcome: outcome.to_owned(),
            prev_hash: prev.map_or_else(|| GENESIS.to_owned(), |p| p.hash.clone()),
            hash: String::new(),
        };
        e.hash = e.compute_hash();
        e
    }

    /// SHA-256 (lower-case hex) of the fields, each length-prefixed so that no two field
    /// lists hash alike: `prev_hash`, `seq`, `at_ms`, `who`, `action`, `target`, `outcome`.
    pub fn compute_hash(&self) -> String {
        let mut h = Sha256::new();
        for field in [
            self.prev_hash.as_str(),
            &self.seq.to_string(),
            &self.at_ms.to_string(),
            &self.who,
            &self.action,
            &self.target,
            &self.outcome,
        ] {
            h.update((field.len() as u64).to_be_bytes());
            h.update(field.as_bytes());
        }
        hex::encode(h.finalize())
    }
}

/// Where an audit log's hash chain breaks: the first entry that does not hold.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// An entry is missing or out of order: another sequence number is in its place.
    #[error("entry {expected} is missing: found seq {found} in its place")]
    Missing {
        /// The sequence number due at that position (from 1).
        expected: u64,
        /// The one found there.
        found: u64,
    },
    /// An entry's `prev_hash` is not the previous entry's `hash` (that entry was edited
    /// and rehashed, or entries were removed).
    #[error("entry {seq} does not follow entry {}: its prev_hash is not that entry's hash", .seq - 1)]
    NotFollowing {
        /// The entry's sequence number (at least 1).
        seq: u64,
    },
    /// An entry's fields do not match its `hash`.
    #[error("entry {seq} was edited: its content does not match its hash")]
    Edited {
        /// The entry's sequence number.
        seq: u64,
    },
}

/// Checks a whole log, oldest first: sequence numbers 1, 2, 3..., each `prev_hash` equal to
/// the previous `hash`, each `hash` recomputed. Returns the number of entries.
///
/// # Errors
/// [`ChainError`]: the first entry that breaks the chain, by its `seq`, and how.
pub fn verify(entries: &[AuditEntry]) -> Result<usize, ChainError> {
    let mut prev: Option<&AuditEntry> = None;
    for (i, e) in entries.iter().enumerate() {
        let want_seq = i as u64 + 1;
        if e.seq != want_seq {
            return Err(ChainError::Missing {
                expected: want_seq,
                found: e.seq,
            });
        }
        let want_prev = prev.map_or(GENESIS, |p| p.hash.as_str());
        if e.prev_hash != want_prev {
            return Err(ChainError::NotFollowing { seq: e.seq });
        }
        if e.compute_hash() != e.hash {
            return Err(ChainError::Edited { seq: e.seq });
        }
        prev = Some(e);
    }
    Ok(entries.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: usize) -> Vec<AuditEntry> {
        let mut v: Vec<AuditEntry> = Vec::new();
        for i in 0..n {
            let e = AuditEntry::next(
                v.last(),
                i as i64,
                "alice",
                "trigger backup",
                "pg-prod",
                "ok",
            );
            v.push(e);
        }
        v
    }

    #[test]
    fn an_intact_chain_verifies() {
        assert_eq!(verify(&chain(5)), Ok(5));
        assert_eq!(verify(&[]), Ok(0));
    }

    #[test]
    fn an_edit_a_removal_or_a_rehash_is_found() {
        let mut edited = chain(5);
        edited[2].who = "mallory".into();
        let e = verify(&edited).unwrap_err();
        assert_eq!(e, ChainError::Edited { seq: 3 });
        assert!(e.to_string().contains("entry 3 was edited"), "{e}");

        let mut removed = chain(5);
        removed.remove(1);
        let e = verify(&removed).unwrap_err();
        assert!(e.to_string().contains("entry 2 is missing"), "{e}");

        let mut rehashed = chain(5);
        rehashed[2].outcome = "refused".into();
        rehashed[2].hash = rehashed[2].compute_hash();
        let e = verify(&rehashed).unwrap_err();
        assert!(
            e.to_string()
                .contains("entry 4 does not follow entry 3: its prev_hash"),
            "{e}"
        );
    }

    #[test]
    fn fields_are_length_prefixed() {
        let a = AuditEntry::next(None, 0, "ab", "c", "", "");
        let b = AuditEntry::next(None, 0, "a", "bc", "", "");
        assert_ne!(a.hash, b.hash);
    }
}
