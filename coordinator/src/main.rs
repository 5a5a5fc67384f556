//! `ferry-coordinator`: parse flags, set up logging, load config, run; and the fleet PKI.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry_coordinator::config::CoordinatorConfig;
use ferry_core::telemetry::{self, LogFormat};
use tokio_util::sync::CancellationToken;

/// Ferry's coordinator: inventory, schedules, dispatch, job history and catalog.
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
    /// Serve the CLI, run schedules and dispatch jobs.
    Serve {
        /// The coordinator's config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a config file and exit.
    Check {
        /// The coordinator's config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// The fleet's certificate authority and certificates.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Write a self-backup now (`[self_backup]`: the store, the config and the public PKI
    /// encrypted to the escrow recipients, the CA key beside it) to the primary and every
    /// copy target. With the coordinator stopped (a running one holds the store and makes
    /// its own on `[self_backup] cron`).
    SelfBackup {
        /// The coordinator's config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Bring a new coordinator up from a self-backup: its store (jobs, catalog, audit
    /// chain) written to the config's `store` (which must not exist), the config and
    /// certificates it held beside it in `restored-state-<stamp>/`.
    RestoreState {
        /// The new coordinator's config file (its `[maintenance]` or `[copies.<name>]`
        /// name where the self-backups are).
        #[arg(long)]
        config: PathBuf,
        /// The escrow identity (age, `AGE-SECRET-KEY-1...`, mode 0600).
        #[arg(long)]
        identity: PathBuf,
        /// The target to read: `primary` or a copy's name.
        #[arg(long = "from", default_value = "primary")]
        from: String,
        /// The self-backup's date (YYYY-MM-DD, UTC); the newest if not given.
        #[arg(long)]
        date: Option<chrono::NaiveDate>,
        /// Also decrypt the escrowed CA key into `restored-state-<stamp>/pki/ca.key`.
        #[arg(long)]
        with_ca_key: bool,
    },
    /// The backup catalog in the coordinator's store.
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
    },
}

#[derive(Subcommand)]
enum CatalogCommand {
    /// Rebuild the catalog from the manifests on the storage targets (`[maintenance]` and
    /// the copy targets), replacing it in one transaction; jobs and the audit log stay.
    /// Run it with the coordinator stopped (a running one holds the store).
    Rebuild {
        /// The coordinator's config file.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create the fleet CA (DIR/ca.pem, DIR/ca.key); never overwrites one.
    Init {
        /// Directory for the CA files (created 0700).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a certificate (DIR/NAME.pem, DIR/NAME.key) signed by the fleet CA.
    Issue {
        /// Directory holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// The name: an agent id, `coordinator`, or an operator's name.
        #[arg(long)]
        name: String,
        /// Extra subject alternative names (host names or IP addresses).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Validity, days: 1 to 3650.
        #[arg(
            long,
            default_value_t = 825,
            allow_negative_numbers = true,
            value_parser = clap::value_parser!(u32).range(1..=i64::from(ferry_coordinator::pki::MAX_DAYS))
        )]
        days: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_tracing(cli.log_format);
    ferry_proto::tls::install_crypto_provider();
    let result = match cli.command {
        Command::Serve { config } => tokio::runtime::Runtime::new()
            .expect("tokio runtime")
            .block_on(async move {
                let settings = CoordinatorConfig::load(&config)?.build(&config)?;
                let shutdown = CancellationToken::new();
                telemetry::cancel_on_signal(shutdown.clone())
                    .context("installing the SIGTERM handler")?;
                ferry_coordinator::run(settings, shutdown).await
            }),
        Command::Check { config } => CoordinatorConfig::load(&config)
            .and_then(|c| c.build(&config))
            .map(|s| {
                println!(
                    "config {}: valid ({} agents, {} operators, {} schedules)",
                    config.display(),
                    s.agents.len(),
                    s.operators.len(),
                    s.schedules.len()
                )
            })
            .map_err(Into::into),
        Command::Pki { command } => pki(command),
        Command::Catalog {
            command: CatalogCommand::Rebuild { config },
        } => catalog_rebuild(&config),
        Command::SelfBackup { config } => self_backup(&config),
        Command::RestoreState {
            config,
            identity,
            from,
            date,
            with_ca_key,
        } => restore_state(&config, &identity, &from, date, with_ca_key),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain, each cause once (many errors show their source too).
            let text = telemetry::error_text(e.as_ref());
            eprintln!("ferry-coordinator: error: {text}");
            ExitCode::FAILURE
        }
    }
}

fn pki(command: PkiCommand) -> anyhow::Result<()> {
    use ferry_coordinator::pki;
    match command {
        PkiCommand::Init { dir } => {
            let files = pki::init_ca(&dir)?;
            println!("{}\n{}", files.cert.display(), files.key.display());
        }
        PkiCommand::Issue {
            dir,
            name,
            sans,
            days,
        } => {
            let files = pki::issue(&dir, &name, &sans, days)?;
            println!("{}\n{}", files.cert.display(), files.key.display());
        }
    }
    Ok(())
}

/// `ferry-coordinator catalog rebuild --config FILE`.
fn catalog_rebuild(config: &std::path::Path) -> anyhow::Result<()> {
    use ferry_coordinator::catalog::rebuild;
    use ferry_coordinator::store::{RedbStore, Store};
    let settings = CoordinatorConfig::load(config)?.build(config)?;
    // First: a running coordinator holds the store, and nothing is read for nothing.
    let store = RedbStore::open(&settings.store).with_context(|| {
        format!(
            "opening {} (stop the coordinator first: a running one holds it)",
            settings.store.display()
        )
    })?;
    let today = (chrono::Utc::now() + ferry_coordinator::dispatch::CLOCK_TOLERANCE).date_naive();
    let rebuilt = rebuild::scan(&settings, today)?;
    let before = store.replace_backups(&rebuilt.records)?;
    let summary = format!(
        "{} backups from {} dated folders (the catalog held {before}); {} not rebuilt",
        rebuilt.records.len(),
        rebuilt.folders,
        rebuilt.skipped.len()
    );
    store.append_audit("ferry-coordinator", "catalog rebuild", "catalog", &summary)?;
    println!(
        "Rebuilt the catalog of {}: {summary}.",
        settings.store.display()
    );
    for line in &rebuilt.skipped {
        println!("not rebuilt: {line}");
    }
    Ok(())
}

/// `ferry-coordinator self-backup --config FILE`.
fn self_backup(config: &std::path::Path) -> anyhow::Result<()> {
    use ferry_coordinator::store::{RedbStore, Store};
    let settings = CoordinatorConfig::load(config)?.build(config)?;
    let store = RedbStore::open(&settings.store).with_context(|| {
        format!(
            "opening {} (a running coordinator holds it and writes its self-backups on \
             [self_backup] cron)",
            settings.store.display()
        )
    })?;
    let report = ferry_coordinator::state::self_backup(&settings, &store, chrono::Utc::now())?;
    let summary = report.summary();
    let outcome = if report.written.is_empty() {
        format!("FAILED: {summary}")
    } else {
        summary.clone()
    };
    store.append_audit(
        "ferry-coordinator",
        "self-backup",
        "coordinator state",
        &outcome,
    )?;
    for w in &report.written {
        println!(
            "{}: {}{} ({} old self-backup folders removed)",
            w.target,
            w.path,
            if w.ca_key {
                " and the escrowed CA key"
            } else {
                ""
            },
            w.pruned
        );
    }
    if report.written.is_empty() || !report.failed.is_empty() {
        anyhow::bail!("self-backup: {summary}");
    }
    println!("Self-backup: {summary}.");
    Ok(())
}

/// `ferry-coordinator restore-state ...`.
fn restore_state(
    config: &std::path::Path,
    identity: &std::path::Path,
    from: &str,
    date: Option<chrono::NaiveDate>,
    with_ca_key: bool,
) -> anyhow::Result<()> {
    let settings = CoordinatorConfig::load(config)?.build(config)?;
    let r = ferry_coordinator::state::restore_state(&settings, from, identity, date, with_ca_key)?;
    println!(
        "Restored {} from {from}: {} jobs, {} catalog records, {} audit entries (the chain \
         verified), into {}; the config and certificates it held are in {}.",
        r.path,
        r.counts.jobs,
        r.counts.backups,
        r.counts.audit,
        settings.store.display(),
        r.beside.display()
    );
    Ok(())
}
