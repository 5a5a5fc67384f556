//! The audit entry on the wire ([`v1::AuditEntry`]) and in the domain
//! ([`ferry_core::audit::AuditEntry`]): the same fields, so the CLI verifies the chain on
//! exactly what the coordinator stored.

use ferry_core::audit::AuditEntry;

use crate::v1;

impl From<AuditEntry> for v1::AuditEntry {
    fn from(e: AuditEntry) -> Self {
        v1::AuditEntry {
            seq: e.seq,
            at_ms: e.at_ms,
            who: e.who,
            action: e.action,
            target: e.target,
            outcome: e.outcome,
            prev_hash: e.prev_hash,
            hash: e.hash,
        }
    }
}

impl From<v1::AuditEntry> for AuditEntry {
    fn from(e: v1::AuditEntry) -> Self {
        AuditEntry {
            seq: e.seq,
            at_ms: e.at_ms,
            who: e.who,
            action: e.action,
            target: e.target,
            outcome: e.outcome,
            prev_hash: e.prev_hash,
            hash: e.hash,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_crosses_the_wire_and_still_verifies() {
        let first = AuditEntry::next(None, 1, "alice", "trigger backup", "pg-prod", "ok");
        let second = AuditEntry::next(Some(&first), 2, "schedule", "order backup", "db", "ok");
        let back: Vec<AuditEntry> = [first, second]
            .into_iter()
            .map(v1::AuditEntry::from)
            .map(AuditEntry::from)
            .collect();
        assert_eq!(ferry_core::audit::verify(&back), Ok(2));
    }
}
