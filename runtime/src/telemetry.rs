//! Logs and metrics exposition shared by every binary.

use std::future::Future;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use clap::{Args, ValueEnum};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, event fields flattened (what the CloudWatch metric filters read).
    Json,
    /// Compact human-readable text.
    Text,
}

/// The log setting. Unset, services log JSON and the command-line tools text; each binary passes
/// its own default to [`LogArgs::format_or`].
#[derive(Debug, Clone, Default, Args)]
pub struct LogArgs {
    /// `json` or `text` logs (default: json for the services, text for the command-line tools).
    #[arg(
        long,
        env = "LOG_FORMAT",
        value_enum,
        ignore_case = true,
        global = true
    )]
    pub log_format: Option<LogFormat>,
}

impl LogArgs {
    /// The configured format, or `default` when unset.
    pub fn format_or(&self, default: LogFormat) -> LogFormat {
        self.log_format.unwrap_or(default)
    }
}

/// Sets up logging on stderr (stdout stays free for command output), filtered by `RUST_LOG`
/// (default `info`). A second call keeps the first set-up (tests start many services).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .compact()
            .try_init(),
    };
}

/// `GET /metrics` (Prometheus text format) and `GET /healthz` over `registry`, for the processes
/// that have no API of their own (`jobs worker`, `projector poll`).
pub fn metrics_router(registry: Registry) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(registry)
}

/// Serves [`metrics_router`] on `listener` until `shutdown` resolves.
pub async fn serve_metrics(
    listener: TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, metrics_router(registry))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn render_metrics(State(registry): State<Registry>) -> impl IntoResponse {
    let encoder = TextEncoder::new();
    let mut body = Vec::new();
    match encoder.encode(&registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoder.format_type().to_string())],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain".to_string())],
            format!("encoding metrics failed: {e}").into_bytes(),
        ),
    }
}
