//! `command-api`: tracing → config → adapters → serve.

use anyhow::Context;
use command_api::config::Config;
use command_api::startup;
use runtime::LogFormat;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = runtime::parse_settings();
    runtime::init_tracing(config.log.format_or(LogFormat::Json));
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
    command_api::run(app, listener, runtime::shutdown_signal()).await?;
    service.stop().await;
    Ok(())
}
