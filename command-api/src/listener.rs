//! The listener below the router: accepts connections and serves each with hyper (HTTP/1.1 and
//! HTTP/2), and keeps every connection to its time limits (ADR 0024).
//!
//! hyper alone cannot: its protocol detection (`hyper_util`'s `auto` builder) waits forever for
//! a first byte, or for the rest of the HTTP/2 preface, before any of its timers starts; HTTP/2
//! has no idle timeout at all; and HTTP/1's header-read timer also runs while a kept-alive
//! connection waits for its next request, so it cannot be both a short slow-headers guard and an
//! idle timeout longer than the load balancer's. So each connection has a watchdog that knows
//! what the connection is doing — reading bytes, serving requests (counted from the call into
//! the router until the response body has gone out), or nothing — and closes it when
//! * it has served nothing `HEADER_READ_TIMEOUT_SEC` after it was accepted (it sent nothing,
//!   only the HTTP/2 preface or settings, or headers too slowly);
//! * an HTTP/1 request head that started arriving is still incomplete `HEADER_READ_TIMEOUT_SEC`
//!   after its first byte;
//! * it has been idle, no request open, for `IDLE_TIMEOUT_SEC` (HTTP/2 pings and window updates
//!   do not count as activity).
//!
//! Request heads too large for hyper are answered from the connection's reader with the envelope
//! ([`crate::head_guard`]).
//!
//! Request bodies have their own deadline (`BODY_READ_TIMEOUT_SEC`, [`crate::edge::body_deadline`]).
//! A client address may hold at most `MAX_CONNECTIONS_PER_ADDRESS` connections; further ones are
//! closed on arrival. The trusted proxies are exempt: every request behind the load balancer
//! arrives from its few addresses.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;

use crate::head_guard::{HeadScan, Refusal, MAX_DRAIN_BYTES};
use crate::network::TrustedProxies;

/// Limits of the listener itself, below the router.
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    /// A client must send a request's complete headers within this: from the connection's
    /// start for its first request, from the first byte of each later HTTP/1 request head.
    pub header_read_timeout: Duration,
    /// A connection with no request open for this long is closed (keep-alive idle timeout).
    pub idle_timeout: Duration,
    /// Connections served at once; more wait in the kernel's accept backlog.
    pub max_connections: usize,
    /// Connections one client address may hold (0: no cap); never applies to the proxies.
    pub max_connections_per_address: usize,
    /// Proxy hops in front (`TRUSTED_PROXY_HOPS`): with no networks listed, any peer is taken
    /// for a proxy once this is above 0.
    pub trusted_proxy_hops: usize,
    /// The proxies' networks (`TRUSTED_PROXIES`).
    pub trusted_proxies: TrustedProxies,
    /// Counts refused and timed-out connections, when given.
    pub metrics: Option<crate::metrics::ApiMetrics>,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            max_connections: 4096,
            max_connections_per_address: 256,
            trusted_proxy_hops: 0,
            trusted_proxies: TrustedProxies::default(),
            metrics: None,
        }
    }
}

impl ListenerLimits {
    /// The limits a configuration sets.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            header_read_timeout: Duration::from_secs(config.header_read_timeout_sec.max(1)),
            idle_timeout: Duration::from_secs(config.idle_timeout_sec.max(1)),
            max_connections: config.max_connections.max(1),
            max_connections_per_address: config.max_connections_per_address,
            trusted_proxy_hops: config.trusted_proxy_hops,
            trusted_proxies: config.trusted_proxies.clone(),
            metrics: None,
        }
    }

    /// These limits, counting refused and timed-out connections in `metrics`.
    pub fn counted_in(mut self, metrics: &crate::metrics::ApiMetrics) -> Self {
        self.metrics = Some(metrics.clone());
        self
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains in-flight requests.
pub async fn run(
    app: Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    run_with(app, listener, shutdown, ListenerLimits::default()).await
}

/// [`run`] with explicit listener limits. hyper is driven directly (rather than through
/// `axum::serve`) because only there can each connection be watched.
pub async fn run_with(
    app: Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: ListenerLimits,
) -> io::Result<()> {
    let limits = Arc::new(limits);
    let max_connections = limits.max_connections.clamp(1, u32::MAX as usize);
    let connections = Arc::new(Semaphore::new(max_connections));
    let per_address = Arc::new(AddressSlots::default());
    let (closing, _) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(target: "listener", error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let peer_ip = crate::network::canonical(peer.ip());
        let slot = if limits.max_connections_per_address == 0
            || limits
                .trusted_proxies
                .is_proxy(peer_ip, limits.trusted_proxy_hops)
        {
            None
        } else {
            match per_address.take(peer_ip, limits.max_connections_per_address) {
                Some(slot) => Some(slot),
                None => {
                    // Closed before a byte is read: the cheapest answer to a flood, and the
                    // permit goes back at once. No log line per refusal (that would be the
                    // flood's amplifier); the counter shows it.
                    if let Some(metrics) = &limits.metrics {
                        metrics
                            .connections_refused
                            .with_label_values(&["per_address"])
                            .inc();
                    }
                    drop(stream);
                    continue;
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let limits = limits.clone();
        let closing = closing.subscribe();
        tokio::spawn(async move {
            let _permit = permit;
            let _slot = slot;
            serve_connection(app, stream, peer, &limits, closing).await;
        });
    }
    drop(listener);
    let _ = closing.send(true);
    // Every connection task holds a permit until it ends: having them all back means drained.
    let _ = connections.acquire_many(max_connections as u32).await;
    Ok(())
}

/// Serves one connection until it ends, the server shuts down, or its watchdog expires.
async fn serve_connection(
    app: Router,
    stream: TcpStream,
    peer: SocketAddr,
    limits: &ListenerLimits,
    mut closing: watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;

    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        stream,
        activity: activity.clone(),
        scan: HeadScan::new(),
        refusal: None,
        metrics: limits.metrics.clone(),
    });
    let tracked = activity.clone();
    let service =
        hyper::service::service_fn(move |req: axum::http::Request<hyper::body::Incoming>| {
            let open = tracked.request_started(req.version() == axum::http::Version::HTTP_2);
            let mut req = req.map(axum::body::Body::new);
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            let response = app.clone().oneshot(req);
            async move {
                // The request stays open until its response body has gone out (or is dropped):
                // a long response or a live stream is not an idle connection.
                response.await.map(|response| {
                    response.map(|body| axum::body::Body::new(Tracked { body, _open: open }))
                })
            }
        });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper's own timer runs from the end of each response, idle time included; set past
        // the watchdog's deadlines it never closes a connection the watchdog keeps, and stays
        // a backstop.
        .header_read_timeout(limits.idle_timeout + limits.header_read_timeout)
        .max_buf_size(crate::edge::HTTP1_READ_BUFFER_BYTES)
        .max_headers(crate::edge::HTTP1_MAX_HEADERS);
    builder.http2().timer(TokioTimer::new());
    let conn = builder.serve_connection_with_upgrades(io, service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = closing.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
        phase = activity.expired(limits) => {
            if let Some(metrics) = &limits.metrics {
                metrics.connections_timed_out.with_label_values(&[phase.as_str()]).inc();
            }
            if phase == Phase::Idle && activity.is_http2() {
                // GOAWAY tells an HTTP/2 client that no stream it may be opening right now
                // was processed, so it retries safely. An HTTP/1 connection has nothing to
                // say: it is closed as it is dropped.
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(limits.header_read_timeout, conn).await;
            }
        }
    }
}

/// Why a watchdog closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No request within the header-read timeout of the connection's start.
    FirstRequest,
    /// An HTTP/1 request head not complete within the header-read timeout of its first byte.
    Headers,
    /// No request open for the idle timeout.
    Idle,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Self::FirstRequest => "first_request",
            Self::Headers => "headers",
            Self::Idle => "idle",
        }
    }
}

/// What one connection is doing, as its watchdog sees it.
struct Activity {
    state: Mutex<ActivityState>,
    changed: Notify,
}

struct ActivityState {
    /// Requests called into the router whose response has not gone out completely.
    open: usize,
    /// Whether any request was called yet.
    served: bool,
    /// Whether the connection speaks HTTP/2 (known from its first request).
    http2: bool,
    /// When `open` last fell to 0 (the connection's start before any request).
    idle_since: Instant,
    /// When the first byte arrived after `idle_since` (an HTTP/1 request head starting).
    head_started: Option<Instant>,
}

impl Activity {
    fn new() -> Self {
        Self {
            state: Mutex::new(ActivityState {
                open: 0,
                served: false,
                http2: false,
                idle_since: Instant::now(),
                head_started: None,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        // The state is plain counters: a panic elsewhere cannot leave it half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_http2(&self) -> bool {
        self.lock().http2
    }

    /// Bytes arrived from the client.
    fn bytes_read(&self) {
        let mut state = self.lock();
        if state.open == 0 && state.served && state.head_started.is_none() {
            state.head_started = Some(Instant::now());
            drop(state);
            self.changed.notify_one();
        }
    }

    /// A request was called into the router; open until the returned guard drops.
    fn request_started(self: &Arc<Self>, http2: bool) -> OpenRequest {
        let mut state = self.lock();
        state.open += 1;
        state.served = true;
        state.http2 = http2;
        state.head_started = None;
        drop(state);
        self.changed.notify_one();
        OpenRequest(self.clone())
    }

    fn request_ended(&self) {
        let mut state = self.lock();
        state.open = state.open.saturating_sub(1);
        if state.open == 0 {
            state.idle_since = Instant::now();
            state.head_started = None;
        }
        drop(state);
        self.changed.notify_one();
    }

    /// The next deadline and what it is for; `None` while a request is open.
    fn deadline(&self, limits: &ListenerLimits) -> Option<(Instant, Phase)> {
        let state = self.lock();
        if state.open > 0 {
            None
        } else if !state.served {
            Some((
                state.idle_since + limits.header_read_timeout,
                Phase::FirstRequest,
            ))
        } else if let (Some(started), false) = (state.head_started, state.http2) {
            Some((started + limits.header_read_timeout, Phase::Headers))
        } else {
            Some((state.idle_since + limits.idle_timeout, Phase::Idle))
        }
    }

    /// Resolves when the connection has overstayed: see the module docs.
    async fn expired(&self, limits: &ListenerLimits) -> Phase {
        loop {
            // Registered before the state is read, so a change in between still wakes it.
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            match self.deadline(limits) {
                None => changed.await,
                Some((at, _)) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {
                            // Re-read: a request may have started at the last moment.
                            if let Some((due, phase)) = self.deadline(limits) {
                                if due <= Instant::now() {
                                    return phase;
                                }
                            }
                        }
                        () = changed => {}
                    }
                }
            }
        }
    }
}

/// One open request of a connection (see [`Activity::request_started`]).
struct OpenRequest(Arc<Activity>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// A response body that keeps its request open until it is sent or dropped.
struct Tracked {
    body: axum::body::Body,
    _open: OpenRequest,
}

impl HttpBody for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's socket, telling its [`Activity`] when bytes arrive, and answering request
/// heads too large for hyper itself ([`crate::head_guard`]).
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
    scan: HeadScan,
    /// Set once a head was refused: from then on hyper reads nothing more and writes nothing.
    refusal: Option<Refusal>,
    metrics: Option<crate::metrics::ApiMetrics>,
}

impl Watched {
    /// Sends the refusal's answer and discards the rest of the refused head; then reports the
    /// end of the stream to hyper, which ends the connection.
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(refusal) = self.refusal.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        while refusal.written < refusal.answer.len() {
            match Pin::new(&mut self.stream).poll_write(cx, &refusal.answer[refusal.written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(n)) => refusal.written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        // Closing with unread bytes would reset the connection, and the client could lose the
        // answer: read the head to its end first (the watchdog bounds how long that may take).
        let mut scratch = [0u8; 8 * 1024];
        while !refusal.drain_done {
            let mut discard = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.stream).poll_read(cx, &mut discard) {
                Poll::Ready(Ok(())) => {
                    let bytes = discard.filled();
                    refusal.drained += bytes.len();
                    refusal.drain_done = bytes.is_empty()
                        || self.scan.drain(bytes)
                        || refusal.drained >= MAX_DRAIN_BYTES;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if refusal.written < refusal.answer.len() {
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.refusal.is_some() {
            return self.poll_refusal(cx);
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
            let this = &mut *self;
            if let Some(why) = this.scan.read(&buf.filled()[before..]) {
                // None of these bytes reach hyper: it never sees a head it would refuse bare.
                buf.set_filled(before);
                let request_id = uuid::Uuid::new_v4().to_string();
                tracing::warn!(
                    target: "listener",
                    request_id = %request_id,
                    reason = why.reason(),
                    "request head refused before parsing"
                );
                if let Some(metrics) = &this.metrics {
                    metrics
                        .connections_refused
                        .with_label_values(&[why.reason()])
                        .inc();
                }
                this.refusal = Some(Refusal::new(why, &request_id));
                return this.poll_refusal(cx);
            }
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.refusal.is_some() {
            // The refusal has answered; whatever hyper would add is dropped.
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.refusal.is_some() {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Open connections per client address. Entries exist only while a connection is open, so the
/// map is bounded by `MAX_CONNECTIONS`.
#[derive(Default)]
struct AddressSlots(Mutex<HashMap<IpAddr, usize>>);

impl AddressSlots {
    /// A slot for one more connection from `ip`, unless it already holds `max`.
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            slots: self.clone(),
            ip,
        })
    }
}

/// One open connection of an address; gives its slot back when the connection ends.
struct AddressSlot {
    slots: Arc<AddressSlots>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.slots.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults keep an idle connection open longer than the load balancer's 60 s idle
    /// timeout (so it never reuses a connection the server is closing), cut slow or silent
    /// clients off well before, and cap connections per address below the total.
    #[test]
    fn default_idle_timeout_outlasts_the_load_balancer() {
        let limits = ListenerLimits::from_config(&crate::config::Config::defaults());
        assert!(limits.idle_timeout > Duration::from_secs(61), "{limits:?}");
        assert!(
            limits.header_read_timeout <= Duration::from_secs(10),
            "{limits:?}"
        );
        assert!(
            limits.idle_timeout > limits.header_read_timeout,
            "{limits:?}"
        );
        assert!(
            (1..limits.max_connections).contains(&limits.max_connections_per_address),
            "{limits:?}"
        );
        let defaults = ListenerLimits::default();
        assert_eq!(
            (defaults.header_read_timeout, defaults.idle_timeout),
            (limits.header_read_timeout, limits.idle_timeout),
            "the library default and the setting's default agree"
        );
    }

    /// An address gets its slots back as connections end; other addresses are not affected.
    #[test]
    fn address_slots_are_counted_and_returned() {
        let slots = Arc::new(AddressSlots::default());
        let a: IpAddr = [192, 0, 2, 1].into();
        let b: IpAddr = [192, 0, 2, 2].into();
        let first = slots.take(a, 2);
        let second = slots.take(a, 2);
        assert!(first.is_some() && second.is_some());
        assert!(slots.take(a, 2).is_none(), "a third is refused");
        assert!(slots.take(b, 2).is_some(), "another address is not");
        drop(first);
        assert!(slots.take(a, 2).is_some(), "a slot came back");
        drop(second);
    }
}
