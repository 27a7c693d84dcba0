//! `command-api`: tracing → config → adapters → serve.

use anyhow::Context;
use clap::Parser;
use command_api::config::Config;
use command_api::startup;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    startup::init_tracing(&config.log_format);
    let service = startup::build(&config, std::sync::Arc::new(domain::SystemClock))
        .await
        .context("start-up failed")?;
    let listener = tokio::net::TcpListener::bind(config.bind_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.bind_addr))?;
    let addr = listener.local_addr()?;
    startup::print_banner(&config, addr);
    let app = command_api::app(
        service.state.clone(),
        std::time::Duration::from_secs(config.request_timeout_sec),
    );
    command_api::run_with(
        app,
        listener,
        startup::shutdown_signal(),
        command_api::ListenerLimits::from_config(&config),
    )
    .await?;
    service.stop().await;
    Ok(())
}
