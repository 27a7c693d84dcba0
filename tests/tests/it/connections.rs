//! Connections over real TCP (service on port 0, embedded store): silent, preface-only and slow
//! clients are cut off so that `MAX_CONNECTIONS` of them cannot lock anyone out; a kept-alive
//! connection outlives the header timeout until its idle timeout; a body that trickles is
//! refused with 408; one address cannot hold more than its share of connections, while the
//! trusted proxies are never capped. Timing never decides a test alone: each waits on a
//! condition with a deadline several times what it needs.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use tests::app::{spawn_app_with, AppOptions, Backend, Sent, TestApp, TRACK_TOKEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The HTTP/2 connection preface a client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty HTTP/2 SETTINGS frame (length 0, type 4, no flags, stream 0).
const H2_EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
/// Far more than any wait below needs, even on a machine twice as slow.
const DEADLINE: Duration = Duration::from_secs(30);

fn address(app: &TestApp) -> SocketAddr {
    app.url
        .trim_start_matches("http://")
        .parse()
        .unwrap_or_else(|e| panic!("the app's address: {e}"))
}

/// A connection to `app` from the loopback address `from` (127.0.0.x: Linux routes the whole
/// 127/8 to the loopback interface, so each is a distinct client address).
async fn connect_from(app: &TestApp, from: [u8; 4]) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("socket: {e}"));
    socket
        .bind(SocketAddr::from((from, 0)))
        .unwrap_or_else(|e| panic!("bind {from:?}: {e}"));
    socket
        .connect(address(app))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

/// Waits until the server closes `stream` (end of file or a reset), at most [`DEADLINE`];
/// returns what it sent before closing.
async fn closed_by_server(stream: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = tokio::time::timeout(DEADLINE, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "{what}: still open after {DEADLINE:?}");
    received
}

/// Sends one `GET /healthz` on `stream` and reads its whole response (status and body); empty
/// when the server closed the connection instead.
async fn get_healthz(stream: &mut TcpStream) -> String {
    if stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: broker\r\n\r\n")
        .await
        .is_err()
    {
        return String::new();
    }
    read_response(stream).await
}

/// Reads one HTTP/1.1 response with a `content-length` from `stream`.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let complete = tokio::time::timeout(DEADLINE, async {
        loop {
            let text = String::from_utf8_lossy(&received).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if body.len() >= length {
                    return text;
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return String::from_utf8_lossy(&received).to_string(),
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    complete.unwrap_or_else(|_| panic!("no complete response within {DEADLINE:?}"))
}

/// The value of `series` (name with labels, as rendered) on `/metrics`.
async fn sample(app: &TestApp, series: &str) -> f64 {
    let text = app
        .client
        .get(format!("{}/metrics", app.url))
        .sent()
        .await
        .text()
        .await
        .unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// With `MAX_CONNECTIONS` sockets held by clients that send nothing or only the HTTP/2 preface
/// (and settings), a real client is still served within seconds: the silent connections are
/// closed after the header-read timeout, although protocol detection never finished on them.
#[tokio::test]
async fn silent_connections_cannot_lock_clients_out() {
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(|c| {
        c.max_connections = 6;
        c.max_connections_per_address = 0;
        c.header_read_timeout_sec = 1;
    });
    let app = spawn_app_with(options).await;
    let mut held = Vec::new();
    for i in 0..6 {
        let mut stream = connect_from(&app, [127, 0, 0, 1]).await;
        match i % 3 {
            0 => {}
            1 => stream.write_all(H2_PREFACE).await.unwrap_or_default(),
            _ => {
                stream.write_all(H2_PREFACE).await.unwrap_or_default();
                stream
                    .write_all(H2_EMPTY_SETTINGS)
                    .await
                    .unwrap_or_default();
            }
        }
        held.push(stream);
    }
    // Every slot is taken: this client waits in the backlog until a silent one is closed.
    let started = tokio::time::Instant::now();
    let served = tokio::time::timeout(
        DEADLINE,
        app.client.get(format!("{}/healthz", app.url)).sent(),
    )
    .await
    .unwrap_or_else(|_| panic!("the real client was not served within {DEADLINE:?}"));
    assert_eq!(served.status(), StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "served only after {:?}",
        started.elapsed()
    );
    for (i, stream) in held.iter_mut().enumerate() {
        closed_by_server(stream, &format!("silent connection {i}")).await;
    }
    assert!(
        sample(
            &app,
            "broker_connections_timed_out_total{phase=\"first_request\"}"
        )
        .await
            >= 6.0,
        "the closings are counted"
    );
    app.stop().await;
}

/// A kept-alive HTTP/1.1 connection stays usable after idling longer than the header-read
/// timeout (the relation the defaults keep with the load balancer: idle timeout above its
/// idle timeout, see `listener::tests::default_idle_timeout_outlasts_the_load_balancer`), and
/// the server closes it once the idle timeout passes.
#[tokio::test]
async fn kept_alive_connection_outlives_the_header_timeout() {
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(|c| {
        c.header_read_timeout_sec = 1;
        c.idle_timeout_sec = 10;
    });
    let app = spawn_app_with(options).await;
    let mut stream = connect_from(&app, [127, 0, 0, 1]).await;
    let first = get_healthz(&mut stream).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // Three header timeouts of silence: hyper's own header timer alone would have closed it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = get_healthz(&mut stream).await;
    assert!(
        second.starts_with("HTTP/1.1 200"),
        "the idle connection was closed before the idle timeout: {second:?}"
    );
    closed_by_server(&mut stream, "an idle connection past the idle timeout").await;
    assert!(sample(&app, "broker_connections_timed_out_total{phase=\"idle\"}").await >= 1.0);
    app.stop().await;
}

/// On a kept-alive connection, a request head that starts and then stalls is cut off after the
/// header-read timeout, not left to the (longer) idle timeout.
#[tokio::test]
async fn slow_headers_on_a_kept_alive_connection_are_cut_off() {
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(|c| {
        c.header_read_timeout_sec = 1;
        c.idle_timeout_sec = 120;
    });
    let app = spawn_app_with(options).await;
    let mut stream = connect_from(&app, [127, 0, 0, 1]).await;
    let first = get_healthz(&mut stream).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: broker\r\nX-Slow: ")
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let started = tokio::time::Instant::now();
    closed_by_server(&mut stream, "a stalled request head").await;
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "closed only after {:?}: the idle timeout, not the header timeout",
        started.elapsed()
    );
    assert!(
        sample(
            &app,
            "broker_connections_timed_out_total{phase=\"headers\"}"
        )
        .await
            >= 1.0
    );
    app.stop().await;
}

/// A request body that trickles in is refused with 408 `BODY_TIMEOUT` after
/// `BODY_READ_TIMEOUT_SEC`, and the connection closed; other clients are served meanwhile.
#[tokio::test]
async fn trickled_body_is_refused_with_408() {
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(|c| c.body_read_timeout_sec = 1);
    let app = spawn_app_with(options).await;
    let mut stream = connect_from(&app, [127, 0, 0, 1]).await;
    let head = format!(
        "POST /v1/sandboxes/any/extend HTTP/1.1\r\nHost: broker\r\nAuthorization: Bearer {TRACK_TOKEN}\r\nX-Instruqt-Sandbox-ID: slow-student\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{{"
    );
    stream
        .write_all(head.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let (mut reader, mut writer) = stream.into_split();
    // One byte every 200 ms: the body would take 80 s to arrive.
    let trickle = tokio::spawn(async move {
        for _ in 0..399 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if writer.write_all(b" ").await.is_err() {
                return;
            }
        }
    });
    let (status, _, _) = app
        .client
        .get(format!("{}/healthz", app.url))
        .sent_json()
        .await;
    assert_eq!(status, StatusCode::OK, "another client is served meanwhile");
    let mut received = Vec::new();
    let read = tokio::time::timeout(DEADLINE, reader.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "the trickling request was not cut off");
    let answer = String::from_utf8_lossy(&received);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"BODY_TIMEOUT\""), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    trickle.abort();
    app.stop().await;
}

/// One client address holds at most `MAX_CONNECTIONS_PER_ADDRESS` connections: more are closed
/// on arrival, unanswered, while another address is served; a trusted proxy's address
/// (`TRUSTED_PROXIES`) is never capped.
#[tokio::test]
async fn connections_per_address_are_capped_except_for_proxies() {
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(|c| {
        c.max_connections_per_address = 2;
        c.header_read_timeout_sec = 60;
        c.trusted_proxy_hops = 1;
        c.trusted_proxies = "127.0.0.3/32".parse().unwrap_or_default();
    });
    let app = spawn_app_with(options).await;
    let attacker = [127, 0, 0, 2];
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = connect_from(&app, attacker).await;
        // Served, so the connection is surely accepted and counted before the next one.
        let answer = get_healthz(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        held.push(stream);
    }
    let mut third = connect_from(&app, attacker).await;
    let _ = third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: broker\r\n\r\n")
        .await;
    let answer = closed_by_server(&mut third, "a connection over the address's cap").await;
    assert!(
        answer.is_empty(),
        "the refused connection was answered: {answer:?}"
    );
    assert_eq!(
        sample(
            &app,
            "broker_connections_refused_total{reason=\"per_address\"}"
        )
        .await,
        1.0
    );

    // The victim at another address is served.
    let mut victim = connect_from(&app, [127, 0, 0, 1]).await;
    let answer = get_healthz(&mut victim).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The proxy carries many clients: four connections, all served.
    let mut proxy = Vec::new();
    for _ in 0..4 {
        let mut stream = connect_from(&app, [127, 0, 0, 3]).await;
        let answer = get_healthz(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        proxy.push(stream);
    }
    // The attacker's slots come back when its connections end.
    held.clear();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut again = connect_from(&app, attacker).await;
        let answer = get_healthz(&mut again).await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the address's slots never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}

/// With `TRUSTED_PROXIES` listed, a client that is not one of them cannot pick its rate-limit
/// address by writing `X-Forwarded-For`: every forged value shares its own address's bucket.
#[tokio::test]
async fn forwarded_for_counts_only_from_listed_proxies() {
    let mut options = AppOptions::new(Backend::Embedded);
    options.configure = Box::new(|c| {
        c.unauth_rate_limit_rps = 0.01;
        c.unauth_rate_limit_burst = 2.0;
        c.trusted_proxy_hops = 1;
        c.trusted_proxies = "127.0.0.3/32".parse().unwrap_or_default();
    });
    let app = spawn_app_with(options).await;
    let mut statuses = Vec::new();
    for forged in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
        let (status, _, _) = app
            .client
            .get(format!("{}/v1/admin/stats", app.url))
            .header("X-Forwarded-For", forged)
            .sent_json()
            .await;
        statuses.push(status);
    }
    assert_eq!(
        statuses,
        [
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
            StatusCode::TOO_MANY_REQUESTS
        ],
        "forged addresses shared the direct client's bucket"
    );
    app.stop().await;
}
