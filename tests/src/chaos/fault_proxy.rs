//! A fault-injecting HTTP proxy for the DynamoDB API, on 127.0.0.1 port 0, in front of DynamoDB
//! Local. Each request is, with the configured probability, answered with one fault instead of
//! (or after) being forwarded:
//!
//! | fault | what the client sees | forwarded? |
//! |---|---|---|
//! | `ProvisionedThroughputExceeded` | 400 with that `__type` | no |
//! | `Throttling` | 400 `ThrottlingException` | no |
//! | `InternalServerError` | 500 `InternalServerError` | no |
//! | `Latency` | the real answer, 200–800 ms late | yes |
//! | `DropBeforeForward` | the connection closes, no answer | no |
//! | `DropAfterCommit` | the connection closes, no answer | **yes — the write happened** |
//!
//! The last one is the nasty one: the store committed, the caller cannot know. It is what a
//! retry after a lost answer must recognise. The proxy speaks just enough HTTP/1.1 for the AWS
//! SDK (keep-alive, `Content-Length` bodies); requests are forwarded with their headers as sent,
//! so the signature and `Host` stay intact.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// One kind of injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DynamoFault {
    /// 400 `ProvisionedThroughputExceededException`.
    ProvisionedThroughputExceeded,
    /// 400 `ThrottlingException`.
    Throttling,
    /// 500 `InternalServerError`.
    InternalServerError,
    /// Forwarded, answered late.
    Latency,
    /// Connection closed before forwarding.
    DropBeforeForward,
    /// Forwarded (committed), then the connection closed without the answer.
    DropAfterCommit,
}

impl DynamoFault {
    /// Every kind, in the order they are drawn.
    pub const ALL: [DynamoFault; 6] = [
        DynamoFault::ProvisionedThroughputExceeded,
        DynamoFault::Throttling,
        DynamoFault::InternalServerError,
        DynamoFault::Latency,
        DynamoFault::DropBeforeForward,
        DynamoFault::DropAfterCommit,
    ];

    /// A short label for tables.
    pub fn label(self) -> &'static str {
        match self {
            DynamoFault::ProvisionedThroughputExceeded => "400 ProvisionedThroughputExceeded",
            DynamoFault::Throttling => "400 ThrottlingException",
            DynamoFault::InternalServerError => "500 InternalServerError",
            DynamoFault::Latency => "added latency 200-800 ms",
            DynamoFault::DropBeforeForward => "connection dropped",
            DynamoFault::DropAfterCommit => "answer lost after commit",
        }
    }
}

struct ProxyState {
    upstream: String,
    /// Fault probability in per-mille (0 = a transparent proxy).
    rate_per_mille: AtomicU32,
    rng: Mutex<StdRng>,
    injected: Mutex<BTreeMap<DynamoFault, u64>>,
    forwarded: AtomicU32,
    client: reqwest::Client,
}

/// The running proxy; stops when dropped.
pub struct FaultProxy {
    url: String,
    state: Arc<ProxyState>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FaultProxy {
    /// Starts a transparent proxy to `upstream` (`http://127.0.0.1:port`); faults are drawn from
    /// a generator seeded with `seed` once a rate is set.
    pub async fn start(upstream: &str, seed: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("proxy bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("proxy addr: {e}"));
        let state = Arc::new(ProxyState {
            upstream: upstream.trim_end_matches('/').to_string(),
            rate_per_mille: AtomicU32::new(0),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            injected: Mutex::new(BTreeMap::new()),
            forwarded: AtomicU32::new(0),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap_or_default(),
        });
        let shared = state.clone();
        let server = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(serve_connection(socket, shared.clone()));
            }
        });
        Self {
            url: format!("http://{addr}"),
            state,
            server,
        }
    }

    /// The endpoint to give the SDK instead of DynamoDB Local's.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Sets the fault probability per request (0.0 turns the faults off).
    pub fn set_rate(&self, rate: f64) {
        let per_mille = (rate.clamp(0.0, 1.0) * 1000.0).round() as u32;
        self.state.rate_per_mille.store(per_mille, Ordering::SeqCst);
    }

    /// Faults injected so far, by kind.
    pub fn injected(&self) -> BTreeMap<DynamoFault, u64> {
        self.state
            .injected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Requests forwarded to DynamoDB Local so far (including late and unanswered ones).
    pub fn forwarded(&self) -> u32 {
        self.state.forwarded.load(Ordering::SeqCst)
    }
}

impl ProxyState {
    /// The fault for the next request, if one is drawn.
    fn draw(&self) -> Option<(DynamoFault, Duration)> {
        let rate = self.rate_per_mille.load(Ordering::SeqCst);
        if rate == 0 {
            return None;
        }
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        if rng.random_range(0..1000) >= rate {
            return None;
        }
        let fault = DynamoFault::ALL[rng.random_range(0..DynamoFault::ALL.len())];
        let delay = Duration::from_millis(rng.random_range(200..=800));
        drop(rng);
        *self
            .injected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(fault)
            .or_default() += 1;
        Some((fault, delay))
    }
}

/// A parsed request: the head's lines and the body.
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

async fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).await.ok()? == 0 {
            return None;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        let (name, value) = (name.trim().to_string(), value.trim().to_string());
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse().ok()?;
        }
        headers.push((name, value));
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).await.ok()?;
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

fn error_response(status: u16, error_type: &str, message: &str) -> Vec<u8> {
    let body = serde_json::json!({ "__type": error_type, "message": message }).to_string();
    let reason = if status == 500 {
        "Internal Server Error"
    } else {
        "Bad Request"
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/x-amz-json-1.0\r\nx-amzn-requestid: chaos-proxy\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Forwards `request` and renders the answer; `None` when DynamoDB Local did not answer.
async fn forward(state: &ProxyState, request: Request) -> Option<Vec<u8>> {
    state.forwarded.fetch_add(1, Ordering::SeqCst);
    let method = reqwest::Method::from_bytes(request.method.as_bytes()).ok()?;
    let mut builder = state
        .client
        .request(method, format!("{}{}", state.upstream, request.path));
    for (name, value) in &request.headers {
        let skip = ["content-length", "connection", "transfer-encoding"]
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h));
        if !skip {
            builder = builder.header(name, value);
        }
    }
    let response = builder.body(request.body).send().await.ok()?;
    let status = response.status();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in response.headers() {
        let name = name.as_str();
        if ["content-length", "connection", "transfer-encoding"].contains(&name) {
            continue;
        }
        head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap_or("")));
    }
    let body = response.bytes().await.ok()?;
    head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut out = head.into_bytes();
    out.extend_from_slice(&body);
    Some(out)
}

async fn serve_connection(socket: TcpStream, state: Arc<ProxyState>) {
    let mut reader = BufReader::new(socket);
    while let Some(request) = read_request(&mut reader).await {
        let answer = match state.draw() {
            None => forward(&state, request).await,
            Some((DynamoFault::ProvisionedThroughputExceeded, _)) => Some(error_response(
                400,
                "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",
                "The level of configured provisioned throughput for the table was exceeded (injected)",
            )),
            Some((DynamoFault::Throttling, _)) => Some(error_response(
                400,
                "com.amazon.coral.availability#ThrottlingException",
                "Rate of requests exceeds the allowed throughput (injected)",
            )),
            Some((DynamoFault::InternalServerError, _)) => Some(error_response(
                500,
                "com.amazonaws.dynamodb.v20120810#InternalServerError",
                "Internal server error (injected)",
            )),
            Some((DynamoFault::Latency, delay)) => {
                tokio::time::sleep(delay).await;
                forward(&state, request).await
            }
            Some((DynamoFault::DropBeforeForward, _)) => None,
            Some((DynamoFault::DropAfterCommit, _)) => {
                let _ = forward(&state, request).await;
                None
            }
        };
        let Some(bytes) = answer else {
            // Closing without an answer: the client sees the connection end mid-exchange.
            return;
        };
        if reader.get_mut().write_all(&bytes).await.is_err() {
            return;
        }
    }
}
