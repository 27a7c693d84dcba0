//! `projector`: poll the event stream into the view, print the table definitions, rebuild or
//! verify the view. Everything lives in [`projector::cli`]; this only wires it up.

use std::process::ExitCode;

use clap::Parser;
use projector::cli::{init_tracing, run, shutdown_signal, Cli};

#[tokio::main]
async fn main() -> ExitCode {
    init_tracing(false);
    run(Cli::parse(), shutdown_signal()).await
}
