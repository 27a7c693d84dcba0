//! `brokerctl` entry point: parses the command line, runs the command, exits with its code.

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = brokerctl::cli::Cli::parse();
    match brokerctl::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("brokerctl: {failure}");
            std::process::ExitCode::from(failure.exit_code())
        }
    }
}
