//! HTTP/1.1 request framing on a byte stream, using `httparse` for the request head.
//!
//! Supported: `Content-Length` bodies up to [`MAX_BODY_BYTES`], keep-alive and
//! `Connection: close`, pipelined requests, `Expect: 100-continue`, HTTP/1.0 (closes after
//! the answer). Not supported: `Transfer-Encoding` (answered 411, since every client the
//! API expects, curl and `pmsnap ctl`, sends `Content-Length`).
//!
//! Any framing error ends the connection after the error answer: once framing is lost,
//! the next request's start cannot be found.

use std::io::{self, ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use super::error::ApiError;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Largest accepted request head (request line and headers).
pub const MAX_HEAD_BYTES: usize = 16 << 10;
/// Most headers in one request.
pub const MAX_HEADERS: usize = 64;
/// Time a client has to send a complete request once it sent its first byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a keep-alive connection may sit idle between requests before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One framed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRequest {
    /// Method token as sent (`GET`, `PUT`, ...).
    pub method: String,
    /// Request target as sent (`/v1/status`).
    pub target: String,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
    /// The connection closes after this request's answer (`Connection: close`, or
    /// HTTP/1.0 without `keep-alive`).
    pub close: bool,
}

/// Why no request could be read.
#[derive(Debug)]
pub enum ReadError {
    /// The request is malformed or over a limit: answer this error, then close.
    Http(ApiError),
    /// The connection broke, went idle too long, or the server is stopping: close
    /// without an answer.
    Closed,
}

/// A connection's read buffer and stream. Bytes after one request (a pipelined next
/// request) stay in the buffer for the next call.
#[derive(Debug)]
pub struct HttpConn<S> {
    stream: S,
    buf: Vec<u8>,
}

impl<S: Read + Write> HttpConn<S> {
    /// Wrap a stream. If it has a read timeout, reads that time out are retried until the
    /// request deadline, checking `should_stop` in between.
    pub fn new(stream: S) -> Self {
        HttpConn {
            stream,
            buf: Vec::with_capacity(4096),
        }
    }

    /// The stream, to write answers.
    pub fn stream(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Read more bytes into the buffer. `Ok(false)` on end of stream.
    fn fill(&mut self, deadline: Instant, should_stop: &dyn Fn() -> bool) -> Result<bool, Tick> {
        let mut chunk = [0u8; 8192];
        loop {
            if should_stop() {
                return Err(Tick::Stop);
            }
            if Instant::now() >= deadline {
                return Err(Tick::Deadline);
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => return Err(Tick::Broken),
            }
        }
    }

    /// Read the next request. `Ok(None)` when the client closed the connection cleanly
    /// between requests.
    pub fn read_request(
        &mut self,
        should_stop: &dyn Fn() -> bool,
    ) -> Result<Option<RawRequest>, ReadError> {
        let idle_deadline = Instant::now() + IDLE_TIMEOUT;
        let mut deadline = idle_deadline;
        let mut started = !self.buf.is_empty();
        if started {
            deadline = Instant::now() + REQUEST_TIMEOUT;
        }
        // Read the head.
        let head = loop {
            if !self.buf.is_empty() {
                if !started {
                    started = true;
                    deadline = Instant::now() + REQUEST_TIMEOUT;
                }
                if let Some(head) = parse_head(&self.buf)? {
                    break head;
                }
            }
            match self.fill(deadline, should_stop) {
                Ok(true) => {}
                Ok(false) if self.buf.is_empty() => return Ok(None),
                Ok(false) => {
                    return Err(ReadError::Http(ApiError::BadRequest(
                        "connection closed in the middle of the request head".to_string(),
                    )))
                }
                Err(Tick::Deadline) if started => {
                    return Err(ReadError::Http(ApiError::RequestTimeout))
                }
                Err(_) => return Err(ReadError::Closed),
            }
        };
        let total = head.head_len + head.content_length;
        if self.buf.len() < total && head.expect_continue {
            self.stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .map_err(|_| ReadError::Closed)?;
        }
        while self.buf.len() < total {
            match self.fill(deadline, should_stop) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(ReadError::Http(ApiError::BadRequest(format!(
                        "connection closed after {} of {} body bytes",
                        self.buf.len() - head.head_len,
                        head.content_length
                    ))))
                }
                Err(Tick::Deadline) => return Err(ReadError::Http(ApiError::RequestTimeout)),
                Err(_) => return Err(ReadError::Closed),
            }
        }
        let body = self.buf[head.head_len..total].to_vec();
        self.buf.drain(..total);
        Ok(Some(RawRequest {
            method: head.method,
            target: head.target,
            body,
            close: head.close,
        }))
    }
}

/// Why [`HttpConn::fill`] got no bytes.
enum Tick {
    Deadline,
    Stop,
    Broken,
}

/// A parsed request head.
#[derive(Debug)]
struct Head {
    method: String,
    target: String,
    head_len: usize,
    content_length: usize,
    close: bool,
    expect_continue: bool,
}

/// Parse a request head from `buf`. `Ok(None)` if more bytes are needed.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, ReadError> {
    let too_large = || {
        ReadError::Http(ApiError::HeadersTooLarge {
            max: MAX_HEAD_BYTES,
            max_headers: MAX_HEADERS,
        })
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => return Err(too_large()),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(too_large()),
        Err(e) => {
            return Err(ReadError::Http(ApiError::BadRequest(format!(
                "malformed HTTP request: {e}"
            ))))
        }
    };
    if head_len > MAX_HEAD_BYTES {
        return Err(too_large());
    }
    let bad = |msg: String| ReadError::Http(ApiError::BadRequest(msg));
    // A complete parse always sets method, path and version.
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(bad("incomplete request line".to_string()));
    };
    let mut content_length: Option<u64> = None;
    let mut conn_close = version == 0;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| bad(format!("header {} is not UTF-8", h.name)))?
            .trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let len: u64 = value
                .parse()
                .map_err(|_| bad(format!("invalid Content-Length {value:?}")))?;
            if content_length.is_some_and(|prev| prev != len) {
                return Err(bad("conflicting Content-Length headers".to_string()));
            }
            content_length = Some(len);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ReadError::Http(ApiError::LengthRequired(format!(
                "Transfer-Encoding {value:?} is not supported; send the body with Content-Length"
            ))));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    conn_close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && version == 0 {
                    conn_close = false;
                }
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    let len = content_length.unwrap_or(0);
    if len > MAX_BODY_BYTES as u64 {
        return Err(ReadError::Http(ApiError::PayloadTooLarge {
            len,
            max: MAX_BODY_BYTES,
        }));
    }
    Ok(Some(Head {
        method: method.to_string(),
        target: target.to_string(),
        head_len,
        // Bounded by MAX_BODY_BYTES above, so it fits in usize.
        content_length: len as usize,
        close: conn_close,
        expect_continue,
    }))
}

/// Write all of `bytes`, retrying timed-out writes until `deadline`.
pub fn write_all_until<W: Write>(w: &mut W, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    while !bytes.is_empty() {
        match w.write(bytes) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) && Instant::now() < deadline => {}
            Err(e) => return Err(e),
        }
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A stream fed in chunks; an empty chunk is a timed-out read.
    struct Fake {
        chunks: VecDeque<Vec<u8>>,
        written: Vec<u8>,
    }

    impl Fake {
        fn new(chunks: &[&[u8]]) -> HttpConn<Fake> {
            HttpConn::new(Fake {
                chunks: chunks.iter().map(|c| c.to_vec()).collect(),
                written: Vec::new(),
            })
        }
    }

    impl Read for Fake {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            match self.chunks.pop_front() {
                None => Ok(0),
                Some(c) if c.is_empty() => Err(ErrorKind::WouldBlock.into()),
                Some(mut c) => {
                    let n = c.len().min(out.len());
                    out[..n].copy_from_slice(&c[..n]);
                    if n < c.len() {
                        self.chunks.push_front(c.split_off(n));
                    }
                    Ok(n)
                }
            }
        }
    }

    impl Write for Fake {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn never() -> bool {
        false
    }

    fn http_err(r: Result<Option<RawRequest>, ReadError>) -> ApiError {
        match r {
            Err(ReadError::Http(e)) => e,
            other => panic!("expected an HTTP error, got {other:?}"),
        }
    }

    #[test]
    fn reads_split_and_pipelined_requests() {
        let mut c = Fake::new(&[
            b"POST /v1/snapshots HT",
            b"",
            b"TP/1.1\r\nContent-Length: 4\r\n\r\nab",
            b"cdGET /v1/status HTTP/1.1\r\n\r\nGET /v1/stats HTTP/1.1\r\nConnection: close\r\n\r\n",
        ]);
        let r = c.read_request(&never).expect("ok").expect("request");
        assert_eq!(
            (r.method.as_str(), r.target.as_str()),
            ("POST", "/v1/snapshots")
        );
        assert_eq!(r.body, b"abcd");
        assert!(!r.close);
        let r = c.read_request(&never).expect("ok").expect("request");
        assert_eq!(
            (r.target.as_str(), r.body.len(), r.close),
            ("/v1/status", 0, false)
        );
        let r = c.read_request(&never).expect("ok").expect("request");
        assert_eq!((r.target.as_str(), r.close), ("/v1/stats", true));
        assert!(c.read_request(&never).expect("clean EOF").is_none());
    }

    #[test]
    fn http10_closes_unless_keep_alive() {
        let mut c =
            Fake::new(&[b"GET / HTTP/1.0\r\n\r\nGET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"]);
        assert!(c.read_request(&never).expect("ok").expect("req").close);
        assert!(!c.read_request(&never).expect("ok").expect("req").close);
    }

    #[test]
    fn expect_continue_gets_interim_answer() {
        let mut c = Fake::new(&[
            b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
            b"{}",
        ]);
        let r = c.read_request(&never).expect("ok").expect("req");
        assert_eq!(r.body, b"{}");
        assert_eq!(c.stream().written, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn framing_errors() {
        let cases: Vec<(&[u8], &str)> = vec![
            (b"GARBAGE\r\n\r\n", "bad_request"),
            (b"\x00\x01\x02\x03\r\n\r\n", "bad_request"),
            (b"GET /\xff HTTP/1.1\r\n\r\n", "bad_request"),
            (
                b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                "bad_request",
            ),
            (
                b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                "bad_request",
            ),
            (
                b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "bad_request",
            ),
            (b"GET / HTTP/1.1\r\nX: \xff\r\n\r\n", "bad_request"),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "length_required",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n",
                "payload_too_large",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                "bad_request",
            ),
            (b"GET / HTTP/1.1\r\n", "bad_request"),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab",
                "bad_request",
            ),
        ];
        for (bytes, code) in cases {
            let mut c = Fake::new(&[bytes]);
            let e = http_err(c.read_request(&never));
            assert_eq!(
                e.code(),
                code,
                "{:?}: {e:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn body_at_the_limit_is_accepted() {
        let mut req =
            format!("POST /x HTTP/1.1\r\nContent-Length: {MAX_BODY_BYTES}\r\n\r\n").into_bytes();
        req.extend(std::iter::repeat_n(b'a', MAX_BODY_BYTES));
        let mut c = Fake::new(&[&req]);
        let r = c.read_request(&never).expect("ok").expect("req");
        assert_eq!(r.body.len(), MAX_BODY_BYTES);
    }

    #[test]
    fn oversized_heads_are_431() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        let mut c = Fake::new(&[&big]);
        assert_eq!(http_err(c.read_request(&never)).code(), "headers_too_large");

        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend(format!("H{i}: v\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        let mut c = Fake::new(&[&many]);
        assert_eq!(http_err(c.read_request(&never)).code(), "headers_too_large");
    }

    #[test]
    fn stop_flag_ends_a_waiting_read() {
        let mut c = Fake::new(&[b"", b"", b""]);
        assert!(matches!(c.read_request(&|| true), Err(ReadError::Closed)));
    }

    #[test]
    fn write_all_until_handles_short_writes() {
        struct OneByte(Vec<u8>);
        impl Write for OneByte {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.push(b[0]);
                Ok(1)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w = OneByte(Vec::new());
        write_all_until(&mut w, b"hello", Instant::now() + Duration::from_secs(1)).expect("ok");
        assert_eq!(w.0, b"hello");
    }

    proptest::proptest! {
        /// Arbitrary bytes, split arbitrarily, give requests, a clean end or an HTTP
        /// error; never a panic, and never a request body over the limit.
        #[test]
        fn framing_never_panics(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048),
            split in 0usize..2048,
        ) {
            let split = split.min(bytes.len());
            let mut c = Fake::new(&[&bytes[..split], b"", &bytes[split..]]);
            for _ in 0..8 {
                match c.read_request(&never) {
                    Ok(Some(r)) => proptest::prop_assert!(r.body.len() <= MAX_BODY_BYTES),
                    Ok(None) | Err(_) => break,
                }
            }
        }

        /// A valid request survives any split into two reads.
        #[test]
        fn any_split_of_a_valid_request_parses(split in 0usize..80) {
            let req = b"POST /v1/snapshots HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"name\":1}";
            let split = split.min(req.len());
            let mut c = Fake::new(&[&req[..split], b"", &req[split..]]);
            let r = c.read_request(&never).expect("valid").expect("request");
            proptest::prop_assert_eq!(r.body, b"{\"name\":1}".to_vec());
        }
    }
}
