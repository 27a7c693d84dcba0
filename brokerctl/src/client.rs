//! The HTTP side: one request with the bearer token and the caller headers, and the retry loop
//! around it. Every command is safe to repeat: allocation replays its claim (same caller and
//! idempotency key), mark-for-deletion and the admin reads are idempotent, and a job run that is
//! repeated finds nothing left to do. That is what makes retrying a 5xx or a timeout safe.

use std::time::Duration;

use hmac::{KeyInit, Mac};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::backoff::RetryPolicy;
use crate::failure::Failure;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// A bearer token; never printed.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// Wraps a token (surrounding whitespace, such as a file's trailing newline, is dropped).
    pub fn new(raw: &str) -> Result<Self, Failure> {
        let token = raw.trim();
        if token.is_empty() {
            return Err(Failure::BadInput("the token is empty".into()));
        }
        Ok(Self(token.to_string()))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Who a track request acts for.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The student (`X-Instruqt-Sandbox-ID`).
    pub id: String,
    /// Per-track credentials: the secret the caller id is signed with (`X-Caller-Signature`).
    pub secret: Option<Token>,
}

impl Caller {
    /// `t=<now>,v1=<hex HMAC-SHA256 of "t\nMETHOD\npath\ncaller">` under the track's secret,
    /// when there is one: the signature covers this one request and expires with the broker's
    /// window (`CALLER_SIGNATURE_WINDOW_SEC`).
    fn signature(&self, method: &Method, path: &str) -> Option<String> {
        let secret = self.secret.as_ref()?;
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let mut mac = HmacSha256::new_from_slice(secret.0.as_bytes()).ok()?;
        mac.update(format!("{t}\n{method}\n{path}\n{}", self.id).as_bytes());
        Some(format!(
            "t={t},v1={}",
            hex::encode(mac.finalize().into_bytes())
        ))
    }
}

/// One request to send (and maybe resend).
#[derive(Debug, Clone)]
pub struct Call {
    /// HTTP method.
    pub method: Method,
    /// Path below the base URL, starting with `/`.
    pub path: String,
    /// Query parameters.
    pub query: Vec<(String, String)>,
    /// Extra headers.
    pub headers: Vec<(&'static str, String)>,
    /// The caller, for track routes.
    pub caller: Option<Caller>,
    /// A JSON body, for the routes that take one.
    pub body: Option<Value>,
}

impl Call {
    /// A call without query or caller.
    pub fn new(method: Method, path: impl Into<String>) -> Self {
        Self {
            method,
            path: path.into(),
            query: Vec::new(),
            headers: Vec::new(),
            caller: None,
            body: None,
        }
    }

    /// Adds a query parameter when `value` is set.
    pub fn param(mut self, name: &str, value: Option<&str>) -> Self {
        if let Some(value) = value {
            self.query.push((name.to_string(), value.to_string()));
        }
        self
    }
}

/// A response: status, JSON body (`null` when there was none) and `Retry-After`.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// The body as JSON.
    pub body: Value,
    /// The `Retry-After` header, in seconds.
    pub retry_after: Option<Duration>,
}

impl Reply {
    /// The error envelope's `detail.code`, if any.
    pub fn code(&self) -> &str {
        self.body["detail"]["code"].as_str().unwrap_or("")
    }

    /// `CODE: message` from the error envelope, or the status.
    pub fn describe(&self) -> String {
        match self.body["detail"]["message"].as_str() {
            Some(message) => format!("{} {}: {message}", self.status.as_u16(), self.code()),
            None => format!("HTTP {}", self.status),
        }
    }

    /// The failure a non-success reply stands for (when no retry changed it).
    pub fn failure(&self) -> Failure {
        let what = self.describe();
        if self.code() == "UNKNOWN_PREFIX" {
            return Failure::UnknownPrefix(what);
        }
        match self.status.as_u16() {
            400 | 405 | 413 | 414 | 422 => Failure::BadInput(what),
            401 | 403 => Failure::Auth(what),
            404 => Failure::NotFound(what),
            409 => Failure::Refused(what),
            429 | 500..=599 => Failure::Server(what),
            _ => Failure::Unexpected(what),
        }
    }
}

/// Which replies are worth another attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// 429, 5xx and transport errors.
    Transient,
    /// Those, and 409 when no sandbox is free yet (`NO_SANDBOXES_AVAILABLE`,
    /// `TRACK_ALLOCATION_LIMIT`): one may be released any moment.
    TransientAndNoSandbox,
}

/// The last thing seen when the retry budget ran out.
#[derive(Debug)]
pub enum GaveUp {
    /// The service answered with a retryable reply each time.
    Reply(Reply),
    /// The service could not be reached (or did not answer in time).
    Unreachable(String),
}

/// The broker's HTTP client.
#[derive(Debug, Clone)]
pub struct Broker {
    http: reqwest::Client,
    base: String,
    token: Token,
}

impl Broker {
    /// A client of the service at `base` (e.g. `http://127.0.0.1:8080`) with `token`, each request
    /// bounded by `timeout`.
    pub fn new(base: &str, token: Token, timeout: Duration) -> Result<Self, Failure> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .timeout(timeout)
            .user_agent(concat!("brokerctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Failure::Unexpected(format!("HTTP client: {e}")))?;
        Ok(Self::with_client(http, base, token))
    }

    /// A client over an existing `reqwest::Client` (the live feed uses one without a total
    /// request timeout, since a stream stays open).
    pub fn with_client(http: reqwest::Client, base: &str, token: Token) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            token,
        }
    }

    /// The request builder of `call`, authenticated.
    pub fn request(&self, call: &Call) -> reqwest::RequestBuilder {
        let url = format!("{}{}", self.base, call.path);
        // The signature covers the path the server receives (a base URL may carry a prefix).
        let signed_path = reqwest::Url::parse(&url)
            .map(|u| u.path().to_string())
            .unwrap_or_else(|_| call.path.clone());
        let mut request = self
            .http
            .request(call.method.clone(), url)
            .bearer_auth(&self.token.0)
            .query(&call.query);
        for (name, value) in &call.headers {
            request = request.header(*name, value);
        }
        if let Some(body) = &call.body {
            request = request.json(body);
        }
        if let Some(caller) = &call.caller {
            request = request.header("X-Instruqt-Sandbox-ID", &caller.id);
            if let Some(signature) = caller.signature(&call.method, &signed_path) {
                request = request.header("X-Caller-Signature", signature);
            }
        }
        request
    }

    /// Sends `call` once.
    pub async fn send(&self, call: &Call) -> Result<Reply, reqwest::Error> {
        let response = self.request(call).send().await?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = response.bytes().await?;
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Reply {
            status,
            body,
            retry_after,
        })
    }

    /// Sends `call` until it gets a reply that is not worth retrying, or the policy's deadline
    /// passes. `on_retry` hears about each wait (scripts log it on stderr).
    pub async fn send_with_retries(
        &self,
        call: &Call,
        retry: Retry,
        policy: &RetryPolicy,
        mut on_retry: impl FnMut(&str, Duration),
    ) -> Result<Reply, GaveUp> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let (outcome, retry_after, why) = match self.send(call).await {
                Ok(reply) if !retryable(&reply, retry) => return Ok(reply),
                Ok(reply) => {
                    let why = reply.describe();
                    let retry_after = reply.retry_after;
                    (GaveUp::Reply(reply), retry_after, why)
                }
                Err(e) => {
                    let why = transport_error(&e);
                    (GaveUp::Unreachable(why.clone()), None, why)
                }
            };
            match policy.wait_after(attempt, retry_after) {
                Some(wait) => {
                    on_retry(&why, wait);
                    tokio::time::sleep(wait).await;
                }
                None => return Err(outcome),
            }
        }
    }
}

fn retryable(reply: &Reply, retry: Retry) -> bool {
    match reply.status.as_u16() {
        429 | 500 | 502 | 503 | 504 => true,
        409 => {
            retry == Retry::TransientAndNoSandbox
                && matches!(
                    reply.code(),
                    "NO_SANDBOXES_AVAILABLE" | "TRACK_ALLOCATION_LIMIT"
                )
        }
        _ => false,
    }
}

/// A transport error with its cause chain (reqwest's own message alone says little).
pub fn transport_error(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl GaveUp {
    /// The failure to report: `no_sandbox` is what a run of 409/429 replies means to the command
    /// (allocation: no sandbox in time); otherwise it is the reply's own failure.
    pub fn into_failure(self, no_sandbox: bool) -> Failure {
        match self {
            GaveUp::Unreachable(why) => Failure::Server(format!("unreachable: {why}")),
            GaveUp::Reply(reply) if no_sandbox && matches!(reply.status.as_u16(), 409 | 429) => {
                Failure::NoSandbox(reply.describe())
            }
            GaveUp::Reply(reply) => reply.failure(),
        }
    }
}
