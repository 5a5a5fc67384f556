//! `ferry`: the operator CLI (see the `ferry_cli` library).

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

/// The exit code after a closed pipe (`ferry jobs | head -1`): what a shell reports for a
/// process that SIGPIPE ended, 128 + 13, without the message.
const CLOSED_PIPE: u8 = 141;

fn main() -> ExitCode {
    let cli = ferry_cli::Cli::parse();
    ferry_proto::tls::install_crypto_provider();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(ferry_cli::run(cli)) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) if ferry_cli::is_broken_pipe(&e) => ExitCode::from(CLOSED_PIPE),
        Err(e) => {
            // An error and its causes as one line, each cause once: many errors (TLS
            // files, transport errors) show their source in their own message too.
            let text = ferry_core::telemetry::error_text(e.as_ref());
            // Nowhere to say it if stderr is closed too.
            let _ = writeln!(std::io::stderr(), "ferry: error: {text}");
            ExitCode::from(2)
        }
    }
}
