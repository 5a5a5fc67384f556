//! `ferry-agent`: parse flags, set up logging, load config, run.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_agent::config::{AgentConfig, Keys};
use ferry_agent::pipeline::encrypt;
use ferry_core::telemetry::{self, LogFormat};
use tokio_util::sync::CancellationToken;

/// jemalloc with one arena and no decay (configured in `.cargo/config.toml`) instead of
/// glibc's malloc, whose per-thread arenas (tokio's workers and blocking
/// threads, the SFTP thread) keep freed memory that the other threads cannot reuse.
/// Measured with `bench/` `mongo-dump` (1 GiB): see `bench/README.md`.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Ferry's agent: backs up (production) or restores (staging) this host's datastores on
/// orders from the coordinator.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve orders from the coordinator.
    Run {
        /// The agent's config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Create an age X25519 identity (for staging) and print its recipient (for production).
    Keygen {
        /// Where to write the identity; mode 0600, never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Validate the config, reach each datastore and the backup server, say what was found.
    /// A staging agent lists its source environment's folder (what its restores read).
    Check {
        /// The agent's config file.
        #[arg(long)]
        config: PathBuf,
        /// Only validate the config and the local files it names (keys, certificates,
        /// secret files and their modes); reach no datastore and no backup server.
        #[arg(long)]
        offline: bool,
    },
    /// Hand one WAL file to the running production agent, which archives it; for
    /// PostgreSQL's `archive_command = 'ferry-agent wal-push %p'`. Exits non-zero, saying
    /// why, when the agent is unreachable or did not archive the file (PostgreSQL keeps it
    /// and retries).
    WalPush {
        /// The file, as PostgreSQL names it (`%p`, relative to the data directory).
        path: PathBuf,
        /// The agent's `[wal] socket`.
        #[arg(long, default_value = ferry_agent::config::DEFAULT_WAL_SOCKET)]
        socket: PathBuf,
        /// The datastore whose WAL it is; needed only when the agent has several
        /// physical PostgreSQL datastores.
        #[arg(long, default_value = "")]
        datastore: String,
    },
    /// Fetch one archived WAL file through the running staging agent, which reads and
    /// decrypts it; for a restored cluster's `restore_command = 'ferry-agent wal-get %f
    /// %p'`. Exits non-zero when the file is not archived (PostgreSQL then ends recovery or
    /// tries another source) or cannot be fetched.
    WalGet {
        /// The file's name (`%f`).
        name: String,
        /// Where to write it (`%p`, relative to the data directory).
        path: PathBuf,
        /// The agent's `[wal] socket`.
        #[arg(long, default_value = ferry_agent::config::DEFAULT_WAL_SOCKET)]
        socket: PathBuf,
        /// The datastore whose WAL it is; needed only when the agent has several
        /// physical PostgreSQL datastores.
        #[arg(long, default_value = "")]
        datastore: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // No runtime, no logging set-up: PostgreSQL runs these once per WAL file and logs what
    // they print.
    let wal = match &cli.command {
        Command::WalPush {
            path,
            socket,
            datastore,
        } => Some((
            "wal-push",
            ferry_agent::wal::push(socket, datastore, path).map(drop),
        )),
        Command::WalGet {
            name,
            path,
            socket,
            datastore,
        } => Some((
            "wal-get",
            ferry_agent::wal::get(socket, datastore, name, path).map(drop),
        )),
        _ => None,
    };
    if let Some((what, result)) = wal {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "ferry-agent {what}: error: {}",
                    ferry_core::telemetry::error_text(&e)
                );
                ExitCode::FAILURE
            }
        };
    }
    telemetry::init_tracing(cli.log_format);
    ferry_proto::tls::install_crypto_provider();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(run(cli.command));
    // What is left (a job past the stop grace) is dropped, its tools killed; a thread
    // blocked on the backup server is not waited for.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config } => {
            let settings = AgentConfig::load(&config)?.build(&config)?;
            let shutdown = CancellationToken::new();
            telemetry::cancel_on_signal(shutdown.clone())
                .context("installing the SIGTERM handler")?;
            ferry_agent::run(settings, shutdown).await
        }
        Command::Keygen { out } => {
            let (identity, recipient) = encrypt::generate_identity();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .with_context(|| {
                    format!("cannot create {} (it must not exist yet)", out.display())
                })?;
            writeln!(
                f,
                "# created: {}\n# public key: {recipient}\n{identity}",
                chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )?;
            println!("{recipient}");
            Ok(())
        }
        Command::Check { config, offline } => check(&config, offline).await,
        Command::WalPush { .. } | Command::WalGet { .. } => {
            unreachable!("wal-push and wal-get run without the runtime")
        }
    }
}

async fn check(path: &std::path::Path, offline: bool) -> anyhow::Result<()> {
    let settings = AgentConfig::load(path)?.build(path)?;
    println!("config {}: valid", path.display());
    println!(
        "agent {} role {} environment {}",
        settings.id, settings.role, settings.environment
    );
    match &settings.keys {
        Keys::Encrypt(e) => {
            for r in e.describe() {
                println!("recipient {} ({})", r.recipient, r.fingerprint);
            }
        }
        Keys::Decrypt(_) => println!("identity: loaded"),
    }
    if offline {
        for ds in settings.datastores.values() {
            println!(
                "datastore {} ({}): not reached (--offline)",
                ds.name(),
                ds.kind()
            );
        }
        println!("backup server: not reached (--offline)");
        return Ok(());
    }
    let mut failed = false;
    for ds in settings.datastores.values() {
        match ds.check().await {
            Ok(found) => println!("datastore {} ({}): {found}", ds.name(), ds.kind()),
            Err(e) => {
                failed = true;
                println!("datastore {} ({}): FAILED: {e}", ds.name(), ds.kind());
            }
        }
        for (tool, version) in ds.tool_versions() {
            println!("  {tool}: {version}");
        }
    }
    let server = settings.backup_server.clone();
    // Production writes into its own environment's folder; staging reads the source
    // environment's, which is what its restores need.
    let (env, purpose) = match &settings.source_environment {
        Some(source) => (source.clone(), "readable: restores read from it"),
        None => (settings.environment.clone(), "backups are written here"),
    };
    let writes = settings.source_environment.is_none();
    let reached = tokio::task::spawn_blocking(move || -> Result<String, String> {
        let dir = server.environment_dir(&env);
        let found = if writes {
            // What production may do there (on S3 it may only put, not list).
            server
                .check_write(&env)
                .map_err(|e| format!("cannot check {dir} for writing: {e}"))?
        } else {
            let mut s = server.read().map_err(|e| e.to_string())?;
            let n = s
                .list(&dir)
                .map_err(|e| format!("cannot list {dir}: {e}"))?
                .len();
            format!("{dir} holds {n} entries")
        };
        Ok(format!(
            "reached {}, {found} ({purpose})",
            server.describe()
        ))
    })
    .await?;
    match reached {
        Ok(m) => println!("backup server: {m}"),
        Err(e) => {
            failed = true;
            println!("backup server: FAILED: {e}");
        }
    }
    if failed {
        anyhow::bail!("some checks failed");
    }
    Ok(())
}
