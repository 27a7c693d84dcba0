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

/// The log setting. Unset, the services ([`LogArgs::service_format`]) write text to a terminal and
/// JSON to anything else, and the command-line tools write text ([`LogArgs::format_or`]).
#[derive(Debug, Clone, Default, Args)]
pub struct LogArgs {
    /// `json` or `text` logs. Default: the services (command-api, jobs) write text when stderr is
    /// a terminal and JSON lines otherwise (a file, a pipe, a log collector); the command-line
    /// tools write text. In text, the access log's line per answered request is left out unless
    /// `RUST_LOG` asks for it (`RUST_LOG=info,access=info`); refusals and errors still show.
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

    /// The format of a long-running service: the configured one, else text when stderr is a
    /// terminal (a person is reading, and one JSON object per request would scroll the start-up
    /// banner away) and JSON when it is not (the CloudWatch metric filters read JSON).
    pub fn service_format(&self) -> LogFormat {
        self.service_format_for(std::io::IsTerminal::is_terminal(&std::io::stderr()))
    }

    fn service_format_for(&self, terminal: bool) -> LogFormat {
        self.format_or(if terminal {
            LogFormat::Text
        } else {
            LogFormat::Json
        })
    }
}

/// The filter used when `RUST_LOG` is unset. Text is for a person at a terminal: the access log's
/// `info` line per answered request is dropped there (its warnings and errors, the refusals and
/// failures, stay), so the banner and the lines that matter are not scrolled away. JSON keeps
/// every line, for the log queries that count requests.
fn default_filter(format: LogFormat) -> &'static str {
    match format {
        LogFormat::Json => "info",
        LogFormat::Text => "info,access=warn",
    }
}

/// Sets up logging on stderr (stdout stays free for command output), filtered by `RUST_LOG`
/// (default: see [`default_filter`]). A second call keeps the first set-up (tests start many
/// services).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter(format)));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Unset, a service logs text to a terminal and JSON elsewhere; a configured format always
    /// wins, whatever stderr is.
    #[test]
    fn services_log_text_to_a_terminal_and_json_elsewhere() {
        let unset = LogArgs::default();
        assert_eq!(unset.service_format_for(true), LogFormat::Text);
        assert_eq!(unset.service_format_for(false), LogFormat::Json);
        let json = LogArgs {
            log_format: Some(LogFormat::Json),
        };
        assert_eq!(json.service_format_for(true), LogFormat::Json);
        let text = LogArgs {
            log_format: Some(LogFormat::Text),
        };
        assert_eq!(text.service_format_for(false), LogFormat::Text);
    }

    /// Text leaves out the access log's line per answered request (not its warnings and errors);
    /// JSON keeps every line.
    #[test]
    fn text_logs_leave_out_one_line_per_request() {
        assert_eq!(default_filter(LogFormat::Json), "info");
        let text = default_filter(LogFormat::Text);
        assert!(text.starts_with("info,"), "{text}");
        assert!(text.contains("access=warn"), "{text}");
    }
}
