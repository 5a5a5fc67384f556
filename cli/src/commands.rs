//! One module per subcommand of [`crate::Command`]: each asks the coordinator, then prints
//! a table or, with `--output json`, JSON. `restore` also serves `verify`; `watch` follows
//! the jobs of `backup --wait`, `restore --wait` and `verify --wait`.

pub(crate) mod agents;
pub(crate) mod audit;
pub(crate) mod backup;
pub(crate) mod backups;
pub(crate) mod job;
pub(crate) mod jobs;
pub(crate) mod keys;
pub(crate) mod prune;
pub(crate) mod restore;
pub(crate) mod status;
pub(crate) mod watch;
