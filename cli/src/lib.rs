//! `ferry-cli`: the `ferry` operator CLI, a thin gRPC client of the coordinator over
//! mTLS. One [`Command`] enum whose doc comments are the help, one file per subcommand;
//! human tables by default, `--output json` for scripts. It depends on `ferry-proto` and
//! `ferry-core` only: no database driver, SSH library or store.
//!
//! Modules (private):
//! - `commands`: one module per subcommand (`status`, `agents`, `jobs`, `job`, `audit`,
//!   `prune`, `backups`, `keys`, `backup`, `restore` and `verify`), and `watch`, the progress of
//!   `--wait`.
//! - `connect`: the coordinator's URL and the TLS files checked before connecting.
//! - `format`: tables, sizes, times and JSON.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

mod commands;
mod connect;
mod format;

use commands::{agents, audit, backup, backups, job, jobs, keys, prune, restore, status};

/// Ferry's operator CLI: ask the coordinator about backups, jobs and agents, and order
/// backups and restores.
#[derive(Parser)]
#[command(name = "ferry", version)]
pub struct Cli {
    /// The coordinator's gRPC URL.
    #[arg(
        long,
        env = "FERRY_COORDINATOR",
        default_value = "https://127.0.0.1:7400",
        global = true
    )]
    pub coordinator: String,
    /// The fleet CA certificate (PEM).
    #[arg(long, env = "FERRY_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Your operator certificate (PEM), issued by `ferry-coordinator pki issue`.
    #[arg(long, env = "FERRY_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// Your operator private key (PEM).
    #[arg(long, env = "FERRY_KEY", global = true)]
    pub key: Option<PathBuf>,
    /// The name in the coordinator's certificate.
    #[arg(
        long,
        env = "FERRY_SERVER_NAME",
        default_value = "coordinator",
        global = true
    )]
    pub server_name: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human, global = true)]
    pub output: Output,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Tables for people.
    Human,
    /// JSON for scripts.
    Json,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Per environment and datastore: the last successful backup or restore, its age and
    /// size, the last job, and the next scheduled run.
    Status,
    /// The inventory's agents: reachable or not (each is called again unless it was in the
    /// last 2 s), when each was last reached, and what they reported.
    Agents,
    /// Recent jobs, newest first.
    Jobs {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One job in full.
    Job {
        /// The job id.
        id: String,
    },
    /// The audit log: every operator command and every order, who, what, when, outcome.
    Audit {
        /// The newest this many entries (0 for all).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Check the whole hash chain instead; exit 1 if an entry was edited, removed or
        /// reordered.
        #[arg(long)]
        verify: bool,
    },
    /// Apply the `[[retention]]` policies (GFS: keep_daily, keep_weekly, keep_monthly) to
    /// the dated folders: list every date and why it is kept, and remove those that go
    /// (with the coordinator's `[maintenance]` key; never the newest date or the newest
    /// complete set). With that key it also lists and removes what failed uploads left:
    /// partial files of ended jobs, and orphan data files that no manifest completes.
    /// --dry-run only lists.
    Prune {
        /// Only this environment.
        #[arg(long = "env")]
        environment: Option<String>,
        /// List only; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The recipients the catalog's backups were encrypted to (fingerprints), how many
    /// backups need each, and the staging agents holding its identity; then the backups no
    /// staging agent can open (exit 1 if any). For rotating keys: an identity is retired
    /// once no backup needs it.
    Keys,
    /// Stored backups, newest first, each `ok` or `MISSING` when a restore or verify of it
    /// found its file gone from the backup server; with --sets, per environment and date
    /// the backup set: every production datastore's backup, and whether the set is
    /// complete.
    Backups {
        /// Only this environment.
        #[arg(long = "env")]
        environment: Option<String>,
        /// Show backup sets instead of single backups.
        #[arg(long)]
        sets: bool,
    },
    /// Back up a production agent's datastore (all of them if none is named).
    Backup {
        /// Agent id.
        agent: String,
        /// Datastore name.
        datastore: Option<String>,
        /// `full` or `diff`, for a pgBackRest datastore (needs DATASTORE).
        #[arg(long = "type", value_parser = ["full", "diff"])]
        backup_type: Option<String>,
        /// Wait for the end, with progress; exit non-zero if a job fails.
        #[arg(long)]
        wait: bool,
    },
    /// Restore the newest backup (or a date's) into a staging agent's datastores.
    Restore {
        /// Agent id (or --env).
        #[arg(required_unless_present = "env")]
        agent: Option<String>,
        /// Every staging agent of this environment instead of one agent, e.g. with
        /// --to-time: the whole environment restored to one instant.
        #[arg(long, conflicts_with_all = ["agent", "datastore"])]
        env: Option<String>,
        /// Only this datastore.
        #[arg(long)]
        datastore: Option<String>,
        /// The backup date, YYYY-MM-DD; the newest if absent.
        #[arg(long)]
        date: Option<String>,
        /// Only this namespace, `database.collection` (MongoDB; repeatable; needs --datastore).
        #[arg(long = "ns")]
        namespaces: Vec<String>,
        /// Check every datastore's backup first (manifests readable, every file on the
        /// backup server with its manifest's size) and restore none unless all pass.
        /// Without it, a datastore whose backup fails is reported and the others are
        /// restored (the set is then restored partly).
        #[arg(long)]
        all_or_nothing: bool,
        /// Read the backup from this storage target: a copy's name (`copy_to`), or
        /// `primary`. Without it the agent reads the primary, and a copy when the primary
        /// cannot be reached (the job's summary says which it read).
        #[arg(long)]
        from: Option<String>,
        /// Restore to this instant: a physical PostgreSQL datastore whose WAL is archived
        /// from the newest base backup that finished by then, with the archived WAL
        /// replayed up to it; any other datastore from its newest backup finished by then.
        /// RFC 3339 (`2026-12-05T07:30:00Z`, `...+01:00`) or `YYYY-MM-DD HH:MM:SS[.fff]` in
        /// UTC.
        #[arg(long, value_parser = parse_instant)]
        to_time: Option<i64>,
        /// Wait for the end, with progress; exit non-zero if a job fails.
        #[arg(long)]
        wait: bool,
    },
    /// On a staging agent, download the newest backup of its datastores (or, with --date,
    /// every backup the catalog lists for that date, one job each) and check each file's
    /// SHA-256 and that it decrypts and decompresses to its end, without restoring
    /// anything.
    Verify {
        /// Agent id (a staging agent: it holds the identity).
        agent: String,
        /// Only this datastore.
        #[arg(long)]
        datastore: Option<String>,
        /// The backup date, YYYY-MM-DD; the newest if absent.
        #[arg(long)]
        date: Option<String>,
        /// Read the backup from this storage target: a copy's name (`copy_to`), or
        /// `primary`. Without it the agent reads the primary, and a copy when the primary
        /// cannot be reached (the job's summary says which it read).
        #[arg(long)]
        from: Option<String>,
        /// Wait for the end; exit non-zero if a check fails.
        #[arg(long)]
        wait: bool,
    },
}

/// Parses `--to-time`: RFC 3339 with its offset, or `YYYY-MM-DD HH:MM:SS[.fff]` (also with a
/// `T`) in UTC; UTC milliseconds since the Unix epoch.
///
/// # Errors
/// A text saying which forms are taken.
pub fn parse_instant(text: &str) -> Result<i64, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_millis());
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(text, format) {
            return Ok(t.and_utc().timestamp_millis());
        }
    }
    Err(format!(
        "{text:?} is not an instant: give RFC 3339 (2026-12-05T07:30:00Z) or \
         YYYY-MM-DD HH:MM:SS in UTC"
    ))
}

/// Runs the CLI; the returned code is the process's exit code (1 when a waited-for job
/// failed).
///
/// # Errors
/// Connection and request errors, with the coordinator's message.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    let mut client = connect::client(&cli).await?;
    let out = cli.output;
    match cli.command {
        Command::Status => status::run(&mut client, out).await,
        Command::Agents => agents::run(&mut client, out).await,
        Command::Keys => keys::run(&mut client, out).await,
        Command::Jobs { limit } => jobs::run(&mut client, out, limit).await,
        Command::Job { id } => job::run(&mut client, out, &id).await,
        Command::Backups {
            environment,
            sets: false,
        } => backups::run(&mut client, out, environment).await,
        Command::Backups {
            environment,
            sets: true,
        } => backups::sets(&mut client, out, environment).await,
        Command::Audit { limit, verify } => audit::run(&mut client, out, limit, verify).await,
        Command::Prune {
            environment,
            dry_run,
        } => prune::run(&mut client, out, environment, dry_run).await,
        Command::Backup {
            agent,
            datastore,
            backup_type,
            wait,
        } => backup::run(&mut client, out, agent, (datastore, backup_type), wait).await,
        Command::Restore {
            agent,
            env,
            datastore,
            date,
            namespaces,
            all_or_nothing,
            from,
            to_time,
            wait,
        } => {
            restore::run(
                &mut client,
                out,
                agent.unwrap_or_default(),
                restore::Order {
                    environment: env,
                    datastore,
                    date,
                    namespaces,
                    from,
                    to_time_ms: to_time,
                    verify_only: false,
                    all_or_nothing,
                },
                wait,
            )
            .await
        }
        Command::Verify {
            agent,
            datastore,
            date,
            from,
            wait,
        } => {
            restore::run(
                &mut client,
                out,
                agent,
                restore::Order {
                    datastore,
                    date,
                    from,
                    verify_only: true,
                    ..restore::Order::default()
                },
                wait,
            )
            .await
        }
    }
}

/// Turns a gRPC error into an error whose message is the coordinator's.
pub(crate) fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", ferry_proto::status::describe_status(&s))
}

/// Whether `e` comes from writing to a closed pipe (`ferry jobs | head -1`): the reader
/// has what it wanted, so the CLI exits without a message.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
