//! `ferry-core`: what the agent, the coordinator and the `ferry` CLI share, without a
//! database driver, an SSH library or gRPC.
//!
//! Modules:
//! - [`layout`]: the backup server layout (`<root>/<environment>/<date>/<file>`) and the
//!   one name and date check every crate applies to what could leave it.
//! - [`manifest`]: the `.json` sidecar beside every stored archive.
//! - [`config`]: reading a daemon's TOML config and [`config::ConfigError`], which names
//!   the file and the field.
//! - [`restore_set`]: what the restore of a backup set came to (whole, partly, none).
//! - [`secrets`]: secret files (owner-only, 0600/0400) and datastore passwords.
//! - [`telemetry`]: the log format, the tracing subscriber, the shutdown signal, and an
//!   error told in one line with its causes.
//! - [`audit`]: the hash-chained audit log's entries and the chain check
//!   (`ferry audit --verify`).
//! - [`bounded`]: [`Bounded`], how an error or log line echoes untrusted input (cut to
//!   100 characters).
//! - [`crypto`]: age encryption to recipients and decryption with identities (the agents'
//!   archives, the coordinator's self-backups).
//! - [`wal`]: the layout of archived PostgreSQL WAL, the strict check of its file names,
//!   and the `.json` record beside each archived file.

pub mod audit;
pub mod bounded;
pub mod config;
pub mod crypto;
pub mod layout;
pub mod manifest;
pub mod oplog;
pub mod restore_set;
pub mod secrets;
pub mod telemetry;
pub mod wal;

pub use bounded::Bounded;
