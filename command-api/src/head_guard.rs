//! Request heads too large for the HTTP layer, answered with the error envelope.
//!
//! hyper refuses an HTTP/1 request head that overflows its read buffer with a bare 431, and a
//! request target over 64 KiB with a bare 414: an empty body, no request id, nothing a person
//! can act on. Both limits are fixed inside hyper (the URI one cannot be raised at all), so the
//! connection's reader looks at each head before hyper does. A head whose request line passes
//! [`MAX_REQUEST_LINE_BYTES`], or whose whole size passes [`MAX_HEAD_BYTES`], is never handed to
//! hyper: the reader answers it with the envelope (414 `URI_TOO_LONG` or 431
//! `HEADERS_TOO_LARGE`, a fresh request id, logged), reads and discards the rest of that head
//! (bounded by [`MAX_DRAIN_BYTES`] and the header-read timeout, so the client is not reset before
//! it reads the answer), and ends the connection.
//!
//! The scan keeps a few counters per connection and copies nothing: hyper's buffer still never
//! holds more than [`crate::edge::HTTP1_READ_BUFFER_BYTES`], and a refused head costs the answer's
//! few hundred bytes and an 8 KiB stack buffer while it is drained.
//! Heads between [`crate::edge::MAX_HEADER_BYTES`] and [`MAX_HEAD_BYTES`] still reach the edge
//! middleware, which refuses them with the same envelope and the request's own id.
//!
//! The scan follows HTTP/1 framing (a head, then a `Content-Length` body), so every head of a
//! kept-alive or pipelined connection is measured on its own. What it cannot follow is left to
//! hyper's own limits for the rest of the connection: an HTTP/2 connection (its preface is a
//! request line `PRI * HTTP/2.0`), a chunked body, a length it cannot read.

use axum::http::StatusCode;

use crate::error::ApiError;

/// Longest request line (method, target and version) read: a longer one is 414 `URI_TOO_LONG`.
/// Below hyper's own limit on the target (64 KiB less 2 bytes), so hyper never answers it.
pub const MAX_REQUEST_LINE_BYTES: usize = 64 * 1024 - 2;
/// Largest request head (request line and header block) read: a larger one is 431
/// `HEADERS_TOO_LARGE`. Below hyper's read buffer, so hyper never answers it.
pub const MAX_HEAD_BYTES: usize =
    crate::edge::HTTP1_READ_BUFFER_BYTES - crate::edge::MAX_HEADER_BYTES;
/// Most bytes of a refused head read and discarded before the connection is closed anyway.
pub const MAX_DRAIN_BYTES: usize = 8 * 1024 * 1024;

/// The request line of the HTTP/2 connection preface.
const HTTP2_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0";

/// Why a head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Oversized {
    /// The request line passed [`MAX_REQUEST_LINE_BYTES`].
    RequestLine,
    /// The head passed [`MAX_HEAD_BYTES`].
    Head,
}

impl Oversized {
    /// The label of `broker_connections_refused_total{reason}`.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::RequestLine => "uri_too_long",
            Self::Head => "head_too_large",
        }
    }

    /// The error this refusal answers.
    pub(crate) fn error(self) -> ApiError {
        match self {
            Self::RequestLine => ApiError::uri_too_long(MAX_REQUEST_LINE_BYTES),
            Self::Head => ApiError::headers_too_large(
                crate::edge::MAX_HEADER_BYTES,
                crate::edge::MAX_HEADER_COUNT,
            ),
        }
    }

    /// The whole HTTP/1.1 answer: status line, headers and the envelope with `request_id`.
    pub(crate) fn answer(self, request_id: &str) -> Vec<u8> {
        let error = self.error();
        let body = serde_json::to_vec(&error.body(request_id)).unwrap_or_default();
        let status: StatusCode = error.status;
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             x-request-id: {request_id}\r\nx-content-type-options: nosniff\r\n\
             cache-control: no-store\r\nconnection: close\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or_default(),
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }
}

/// Where the scan of a connection's bytes is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Before a head: empty lines may precede its request line.
    Between,
    /// Inside a request line.
    RequestLine,
    /// Inside the header block.
    Headers,
    /// Inside a body of known length: this many bytes are left.
    Body(u64),
    /// Not scanned any more: HTTP/2, a chunked body or a length the scan cannot follow. hyper's
    /// own limits apply from there on.
    Off,
}

/// The header fields that frame a body, as the scan recognises them.
const CONTENT_LENGTH: &[u8] = b"content-length";
const TRANSFER_ENCODING: &[u8] = b"transfer-encoding";

/// One header line as it goes by: which framing field it may be, and its value.
#[derive(Debug, Clone, Copy, Default)]
struct FieldLine {
    /// Bytes of the name so far (`None` once the `:` was seen).
    name: Option<usize>,
    /// Whether the name still matches `content-length` / `transfer-encoding`.
    length: bool,
    encoding: bool,
}

/// The scan of one connection's incoming bytes. It follows HTTP/1 framing (each head, then a
/// `Content-Length` body), so each head is measured on its own, pipelined ones included.
#[derive(Debug)]
pub(crate) struct HeadScan {
    scan: Scan,
    /// Bytes of the current head so far, leading empty lines included.
    head: usize,
    /// Bytes of the current request line so far.
    line: usize,
    /// The request line's first bytes, to recognise the HTTP/2 preface (and its `\r`).
    start: [u8; HTTP2_PREFACE_LINE.len() + 1],
    /// Line feeds in a row (carriage returns ignored): two end a head.
    newlines: u8,
    /// The header line being read.
    field: FieldLine,
    /// The head's `Content-Length` (`None`: none yet; several values must agree).
    length: Option<u64>,
    /// The value of the `Content-Length` line being read.
    length_value: Option<u64>,
    /// The head has a `Transfer-Encoding`, or a length the scan cannot read.
    unframed: bool,
}

impl HeadScan {
    /// A scan at the start of a connection.
    pub(crate) fn new() -> Self {
        Self {
            scan: Scan::Between,
            head: 0,
            line: 0,
            start: [0; HTTP2_PREFACE_LINE.len() + 1],
            newlines: 0,
            field: FieldLine::default(),
            length: None,
            length_value: None,
            unframed: false,
        }
    }

    /// Reads `bytes`, just received, in order. `Some` when the head they belong to is too
    /// large: those bytes must not reach hyper.
    pub(crate) fn read(&mut self, bytes: &[u8]) -> Option<Oversized> {
        let mut rest = bytes;
        while let Some((&byte, tail)) = rest.split_first() {
            match self.scan {
                Scan::Off => return None,
                Scan::Body(left) => {
                    let taken = left.min(rest.len() as u64);
                    let left = left - taken;
                    self.scan = if left == 0 {
                        Scan::Between
                    } else {
                        Scan::Body(left)
                    };
                    // `taken` is at most `rest.len()`, a `usize`.
                    rest = &rest[taken as usize..];
                    continue;
                }
                Scan::Between => {
                    self.head += 1;
                    if byte != b'\r' && byte != b'\n' {
                        self.scan = Scan::RequestLine;
                        self.line = 1;
                        self.start[0] = byte;
                    }
                }
                Scan::RequestLine => {
                    self.head += 1;
                    if byte == b'\n' {
                        let len = self.line.min(self.start.len());
                        let line = self.start[..len]
                            .strip_suffix(b"\r")
                            .unwrap_or(&self.start[..len]);
                        if self.line <= self.start.len() && line == HTTP2_PREFACE_LINE {
                            self.scan = Scan::Off;
                            return None;
                        }
                        self.scan = Scan::Headers;
                        self.newlines = 1;
                        self.start_field();
                    } else {
                        if self.line < self.start.len() {
                            self.start[self.line] = byte;
                        }
                        self.line += 1;
                        if self.line > MAX_REQUEST_LINE_BYTES {
                            return Some(Oversized::RequestLine);
                        }
                    }
                }
                Scan::Headers => {
                    self.head += 1;
                    match byte {
                        b'\n' => {
                            self.newlines += 1;
                            self.end_field();
                            self.start_field();
                        }
                        b'\r' => {}
                        _ => {
                            self.newlines = 0;
                            self.field_byte(byte);
                        }
                    }
                    if self.newlines >= 2 {
                        self.end_head();
                    }
                }
            }
            if self.head > MAX_HEAD_BYTES {
                return Some(Oversized::Head);
            }
            rest = tail;
        }
        None
    }

    fn start_field(&mut self) {
        self.field = FieldLine {
            name: Some(0),
            length: true,
            encoding: true,
        };
        self.length_value = None;
    }

    fn field_byte(&mut self, byte: u8) {
        match self.field.name {
            Some(at) if byte == b':' => {
                self.field.length &= at == CONTENT_LENGTH.len();
                self.field.encoding &= at == TRANSFER_ENCODING.len();
                self.field.name = None;
                if self.field.encoding {
                    self.unframed = true;
                }
            }
            Some(at) => {
                let lower = byte.to_ascii_lowercase();
                self.field.length &= CONTENT_LENGTH.get(at) == Some(&lower);
                self.field.encoding &= TRANSFER_ENCODING.get(at) == Some(&lower);
                self.field.name = Some(at + 1);
            }
            None if self.field.length => match byte {
                b'0'..=b'9' => {
                    let digit = u64::from(byte - b'0');
                    let value = self.length_value.unwrap_or(0);
                    match value.checked_mul(10).and_then(|v| v.checked_add(digit)) {
                        Some(value) => self.length_value = Some(value),
                        None => self.unframed = true,
                    }
                }
                b' ' | b'\t' => {}
                // A list (`5, 5`) or anything else: hyper decides; the scan stops following.
                _ => self.unframed = true,
            },
            None => {}
        }
    }

    fn end_field(&mut self) {
        if self.field.name.is_none() && self.field.length {
            match (self.length, self.length_value) {
                (_, None) => self.unframed = true,
                (None, value) => self.length = value,
                (Some(seen), Some(value)) if seen != value => self.unframed = true,
                _ => {}
            }
        }
        self.field = FieldLine::default();
    }

    /// The head ended: its body (if any) follows, then the next head.
    fn end_head(&mut self) {
        self.scan = match (self.unframed, self.length) {
            (true, _) => Scan::Off,
            (false, Some(length)) if length > 0 => Scan::Body(length),
            _ => Scan::Between,
        };
        self.head = 0;
        self.line = 0;
        self.newlines = 0;
        self.length = None;
        self.length_value = None;
        self.unframed = false;
    }

    /// While a refused head is drained: whether `bytes` finish it (an empty line).
    pub(crate) fn drain(&mut self, bytes: &[u8]) -> bool {
        for &byte in bytes {
            match byte {
                b'\n' => self.newlines += 1,
                b'\r' => {}
                _ => self.newlines = 0,
            }
            if self.newlines >= 2 {
                return true;
            }
        }
        false
    }
}

/// A refused head being answered and drained.
#[derive(Debug)]
pub(crate) struct Refusal {
    /// The answer, and how much of it went out.
    pub(crate) answer: Vec<u8>,
    pub(crate) written: usize,
    /// Bytes of the head read and discarded since the refusal.
    pub(crate) drained: usize,
    /// The head ended, the client closed, or the drain bound was reached.
    pub(crate) drain_done: bool,
}

impl Refusal {
    /// The refusal of a head that is `why`, answered under `request_id`.
    pub(crate) fn new(why: Oversized, request_id: &str) -> Self {
        Self {
            answer: why.answer(request_id),
            written: 0,
            drained: 0,
            drain_done: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(target_len: usize, header_len: usize) -> Vec<u8> {
        let mut out =
            format!("GET /{} HTTP/1.1\r\nHost: x\r\n", "a".repeat(target_len)).into_bytes();
        if header_len > 0 {
            out.extend_from_slice(format!("X-Big: {}\r\n", "b".repeat(header_len)).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// Ordinary heads pass, in one piece or byte by byte; a body of `Content-Length` bytes is
    /// not part of any head, whatever it holds, and the head after it is measured on its own.
    #[test]
    fn ordinary_heads_and_bodies_pass() {
        let mut scan = HeadScan::new();
        let body = vec![b'z'; 2 * MAX_HEAD_BYTES];
        let mut bytes = format!(
            "POST /v1/x HTTP/1.1\r\nContent-Length:  {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(&body);
        assert_eq!(scan.read(&bytes), None);
        assert_eq!(scan.scan, Scan::Between, "the body was followed to its end");
        for _ in 0..3 {
            assert_eq!(scan.read(&head(100, 900 * 1024)), None);
        }
        let mut scan = HeadScan::new();
        for byte in head(10, 10) {
            assert_eq!(scan.read(&[byte]), None);
        }
        assert_eq!(scan.scan, Scan::Between);
    }

    /// A request line over the limit is 414; a head over the limit is 431, also across reads
    /// and after a body on the same connection.
    #[test]
    fn oversized_heads_are_caught_before_hyper_sees_them() {
        let mut scan = HeadScan::new();
        assert_eq!(
            scan.read(&head(100 * 1024, 0)),
            Some(Oversized::RequestLine)
        );
        let mut scan = HeadScan::new();
        let big = head(10, 1536 * 1024);
        let (first, rest) = big.split_at(MAX_HEAD_BYTES / 2);
        assert_eq!(scan.read(first), None);
        assert_eq!(scan.read(rest), Some(Oversized::Head));
        let mut scan = HeadScan::new();
        assert_eq!(
            scan.read(b"POST / HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc"),
            None
        );
        assert_eq!(scan.read(&big), Some(Oversized::Head));
        let mut scan = HeadScan::new();
        assert_eq!(scan.read(&head(MAX_REQUEST_LINE_BYTES - 20, 0)), None);
    }

    /// What the scan cannot follow (HTTP/2 frames, a chunked body, a length it cannot read)
    /// is left to hyper.
    #[test]
    fn what_the_scan_cannot_follow_is_left_to_hyper() {
        let filler = vec![b'z'; 2 * MAX_HEAD_BYTES];
        for opening in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        ] {
            let mut scan = HeadScan::new();
            assert_eq!(scan.read(opening), None);
            assert_eq!(scan.scan, Scan::Off, "{}", String::from_utf8_lossy(opening));
            assert_eq!(scan.read(&filler), None);
        }
        let mut scan = HeadScan::new();
        assert_eq!(scan.read(b"PRI * HTTP/2.0-not\r\n\r\n"), None);
        assert_eq!(
            scan.scan,
            Scan::Between,
            "only the preface itself is HTTP/2"
        );
    }

    /// The per-connection state is a few counters (what every connection pays for the scan).
    #[test]
    fn the_scan_is_small() {
        assert!(std::mem::size_of::<HeadScan>() <= 128);
    }

    /// The answer is a complete HTTP/1.1 response carrying the envelope and the request id.
    #[test]
    fn the_answer_carries_the_envelope() {
        for (why, status, code) in [
            (Oversized::Head, "431", "HEADERS_TOO_LARGE"),
            (Oversized::RequestLine, "414", "URI_TOO_LONG"),
        ] {
            let answer = String::from_utf8(why.answer("req-1")).unwrap_or_default();
            let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_default();
            assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
            assert!(
                head.contains(&format!("content-length: {}", body.len())),
                "{head}"
            );
            assert!(head.contains("x-request-id: req-1"), "{head}");
            let body: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            assert_eq!(body["detail"]["code"], code, "{body}");
            assert_eq!(body["detail"]["request_id"], "req-1", "{body}");
        }
    }
}
