//! The backup catalog: what the backup server holds, as the coordinator recorded it
//! (stored in the [`crate::store::Store`]), and what is decided from it.
//!
//! Modules:
//! - [`sets`]: backup sets, everything one environment backed up on one date.
//! - [`retention`]: the GFS retention policy of dated folders.
//! - [`prune`]: `ferry prune`, the policy carried out on the backup server.

pub mod prune;
pub mod retention;
pub mod sets;
