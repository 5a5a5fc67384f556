//! `ferry`: the operator CLI (see `ferry_coordinator::cli`).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = ferry_coordinator::cli::Cli::parse();
    ferry_proto::tls::install_crypto_provider();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(ferry_coordinator::cli::run(cli)) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
