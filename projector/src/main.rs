//! `projector`: poll the event stream into the view, print the table definitions, rebuild or
//! verify the view. Everything lives in [`projector::cli`]; this only wires it up.

use std::process::ExitCode;

use projector::cli::{run, Cli, LogFormat};

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = runtime::parse_settings();
    runtime::init_tracing(cli.log.format_or(LogFormat::Text));
    run(cli, runtime::shutdown_signal()).await
}
