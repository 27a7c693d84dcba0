//! `command-api`: settings → tracing → adapters → serve. A start-up failure is one line on stderr
//! (the error chain joined with `: `) and exit code 1, not a multi-line report with a backtrace.

use std::process::ExitCode;

use anyhow::Context;
use command_api::config::Config;
use command_api::startup;

/// mimalloc instead of the system allocator: a request allocates and frees many small objects
/// across threads, which glibc's malloc spent a fifth of the request path's CPU on (ADR 0020).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let mut config: Config = runtime::parse_settings();
    runtime::init_tracing(config.log.service_format());
    // Before the banner, which tells whether the dev tokens apply.
    if let Err(problem) = config.read_secret_files() {
        eprintln!("command-api: {problem}");
        return ExitCode::FAILURE;
    }
    match serve(&config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(target: "startup", error = format!("{e:#}"), "command-api stopped");
            eprintln!("command-api: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: &Config) -> anyhow::Result<()> {
    // The port first: a busy one stops start-up before any store is opened or job started.
    let listener = startup::bind(config.bind_addr).await?;
    let addr = listener.local_addr()?;
    let service = startup::build(config, std::sync::Arc::new(domain::SystemClock))
        .await
        .context("start-up failed")?;
    startup::print_banner(config, addr);
    let app = command_api::app(
        service.state.clone(),
        std::time::Duration::from_secs(config.request_timeout_sec),
    );
    command_api::run_with(
        app,
        listener,
        runtime::shutdown_signal(),
        command_api::ListenerLimits::from_config(config).counted_in(&service.state.metrics),
    )
    .await?;
    service.stop().await;
    Ok(())
}
