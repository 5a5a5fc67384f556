//! The role split of DESIGN.md: production hosts only back up, staging hosts only restore.

use std::fmt;

/// What a host may do. Never both on one host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// May dump its datastores and upload; may not restore, read or delete backups.
    Production,
    /// May download and restore; may not dump, upload or delete.
    Staging,
}

impl Role {
    /// The lower-case name used in config files and messages: `production` or `staging`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Production => "production",
            Role::Staging => "staging",
        }
    }

    /// Whether this role may run backups.
    pub fn may_backup(self) -> bool {
        self == Role::Production
    }

    /// Whether this role may run restores.
    pub fn may_restore(self) -> bool {
        self == Role::Staging
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A wire role that is not production or staging.
#[derive(Debug, thiserror::Error)]
#[error("role {0} is neither production nor staging")]
pub struct UnknownRole(pub i32);

impl TryFrom<i32> for Role {
    type Error = UnknownRole;

    fn try_from(value: i32) -> Result<Self, Self::Error> {
        match crate::v1::Role::try_from(value) {
            Ok(crate::v1::Role::Production) => Ok(Role::Production),
            Ok(crate::v1::Role::Staging) => Ok(Role::Staging),
            _ => Err(UnknownRole(value)),
        }
    }
}

impl From<Role> for crate::v1::Role {
    fn from(role: Role) -> Self {
        match role {
            Role::Production => crate::v1::Role::Production,
            Role::Staging => crate::v1::Role::Staging,
        }
    }
}

impl From<Role> for i32 {
    fn from(role: Role) -> Self {
        crate::v1::Role::from(role) as i32
    }
}
