//! A resumable reader of the broker's live event stream (`GET /v1/admin/events/stream`,
//! server-sent events). Each event's `id` is its feed key; after any disconnect (the server ends
//! streams after `SSE_MAX_LIFETIME_SEC`, restarts, or a proxy cuts the connection) the reader
//! reconnects with `Last-Event-ID` set to the last id it delivered, and the server replays what
//! was missed, so a consumer sees every event once and in order. Heartbeats are SSE comments and
//! are skipped.

use std::ops::ControlFlow;
use std::time::Duration;

use reqwest::Method;

use crate::backoff::RetryPolicy;
use crate::client::{transport_error, Broker, Call, Reply};
use crate::failure::Failure;

/// The stream's path.
pub const STREAM_PATH: &str = "/v1/admin/events/stream";

/// One event of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedEvent {
    /// The SSE `id` (`{occurred_at}#{event_id}`), what a resume starts after.
    pub id: Option<String>,
    /// The SSE `data`: the event envelope as JSON, plus its `key`.
    pub data: String,
}

/// Splits a byte stream into SSE events (the parts of the format the broker uses: `id`, `data`,
/// comments; `event` and `retry` are read and ignored).
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: Vec<u8>,
    id: Option<String>,
    data: Vec<String>,
}

impl SseParser {
    /// Feeds a chunk; returns the events it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<FeedEvent> {
        self.buffer.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() {
                    events.push(FeedEvent {
                        id: self.id.take(),
                        data: self.data.join("\n"),
                    });
                    self.data.clear();
                }
                self.id = None;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line, ""),
            };
            match field {
                "id" => self.id = Some(value.to_string()),
                "data" => self.data.push(value.to_string()),
                _ => {}
            }
        }
        events
    }
}

/// Follows the live feed from a position, reconnecting and resuming as needed.
#[derive(Debug)]
pub struct LiveFeed {
    broker: Broker,
    last_id: Option<String>,
}

impl LiveFeed {
    /// A reader that starts after `since` (an event id or an RFC 3339 time), or at "now".
    /// `broker` should have no total request timeout: a stream stays open for minutes.
    pub fn new(broker: Broker, since: Option<String>) -> Self {
        Self {
            broker,
            last_id: since.filter(|s| !s.trim().is_empty()),
        }
    }

    /// The id of the last event delivered (what to resume from).
    pub fn last_id(&self) -> Option<&str> {
        self.last_id.as_deref()
    }

    /// Delivers events to `on_event` until it breaks. Connection failures, 5xx, 429 and the
    /// subscriber cap's 503 are waited out (honouring `Retry-After`); a 4xx that no retry can
    /// change (bad token, bad `Last-Event-ID`) ends the follow with its failure.
    pub async fn follow(
        &mut self,
        mut on_event: impl FnMut(&FeedEvent) -> ControlFlow<()>,
    ) -> Result<(), Failure> {
        // Reconnects never give up on their own: following is what this reader is for.
        let policy = RetryPolicy::within(Duration::from_secs(u32::MAX as u64));
        let mut attempt = 0u32;
        loop {
            let mut call = Call::new(Method::GET, STREAM_PATH);
            if let Some(id) = &self.last_id {
                call.headers.push(("Last-Event-ID", id.clone()));
            }
            let mut retry_after = None;
            match self.broker.request(&call).send().await {
                Ok(response) if response.status().is_success() => {
                    let mut response = response;
                    let mut parser = SseParser::default();
                    loop {
                        match response.chunk().await {
                            Ok(Some(chunk)) => {
                                for event in parser.push(&chunk) {
                                    attempt = 0;
                                    if let Some(id) = &event.id {
                                        self.last_id = Some(id.clone());
                                    }
                                    if on_event(&event).is_break() {
                                        return Ok(());
                                    }
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                eprintln!(
                                    "brokerctl: live feed interrupted: {}",
                                    transport_error(&e)
                                );
                                break;
                            }
                        }
                    }
                }
                Ok(response) => {
                    let status = response.status();
                    retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let body = response.json().await.unwrap_or(serde_json::Value::Null);
                    let reply = Reply {
                        status,
                        body,
                        retry_after,
                    };
                    if !(status.as_u16() == 429 || status.is_server_error()) {
                        return Err(reply.failure());
                    }
                    eprintln!("brokerctl: live feed: {}", reply.describe());
                }
                Err(e) => eprintln!("brokerctl: live feed unreachable: {}", transport_error(&e)),
            }
            attempt += 1;
            let wait = policy
                .wait_after(attempt, retry_after)
                .unwrap_or(policy.cap);
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events split across chunks, CRLF line ends and heartbeat comments parse into whole events.
    #[test]
    fn parser_handles_split_chunks_and_comments() {
        let mut parser = SseParser::default();
        assert!(parser.push(b":heartbeat\n\nid: a#1\nda").is_empty());
        let events = parser.push(b"ta: {\"x\":1}\r\n\r\ndata: two\ndata: lines\n\n");
        assert_eq!(
            events,
            vec![
                FeedEvent {
                    id: Some("a#1".into()),
                    data: "{\"x\":1}".into()
                },
                FeedEvent {
                    id: None,
                    data: "two\nlines".into()
                },
            ]
        );
    }
}
