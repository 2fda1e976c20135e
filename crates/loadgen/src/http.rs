//! A minimal HTTP/1.1 keep-alive client on a raw tokio `TcpStream`.
//!
//! Why it exists: a load generator must cost the machine as little CPU as possible (the server under test shares
//! it), and must measure the server, not a client library's pooling or retry policy. This client holds exactly
//! one connection, sends one request at a time, and parses the status line, headers and a `Content-Length`,
//! chunked or read-to-close body.
//!
//! Invariants: never panics on what a server sends (every malformed or truncated response is an [`Error`]);
//! after any error the connection is dropped and the next request opens a new one; a request on a reused
//! connection that the server had already closed (EOF before any response byte) is retried once on a fresh one.

use std::fmt;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head (status line + headers) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest response body accepted.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// Why a request produced no response.
#[derive(Debug)]
pub enum Error {
    /// Connecting, writing or reading failed.
    Io(std::io::Error),
    /// The server's bytes are not a valid HTTP/1.x response (or the connection closed mid-response).
    Protocol(String),
    /// No complete response within the client's timeout.
    Timeout,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "i/o error: {e}"),
            Error::Protocol(m) => write!(f, "protocol error: {m}"),
            Error::Timeout => f.write_str("timed out"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e)
    }
}

fn protocol(msg: impl Into<String>) -> Error {
    Error::Protocol(msg.into())
}

/// A complete response. Header names are lower-cased; values are as sent (trimmed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// One open connection plus the bytes read from it but not yet consumed.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    pos: usize,
    /// Whether at least one response has been read on this connection.
    reused: bool,
}

impl Conn {
    async fn open(addr: &str) -> Result<Conn, Error> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(16 * 1024),
            pos: 0,
            reused: false,
        })
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    /// Read more bytes; `Ok(0)` means the server closed the connection.
    async fn fill(&mut self) -> Result<usize, Error> {
        if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.reserve(16 * 1024);
        Ok(self.stream.read_buf(&mut self.buf).await?)
    }

    /// Read until `n` unconsumed bytes are buffered.
    async fn fill_to(&mut self, n: usize) -> Result<(), Error> {
        while self.pending().len() < n {
            if self.fill().await? == 0 {
                return Err(protocol(
                    "connection closed in the middle of a response body",
                ));
            }
        }
        Ok(())
    }

    /// Read one CRLF-terminated line (without the CRLF).
    async fn line(&mut self) -> Result<String, Error> {
        loop {
            if let Some(i) = find(self.pending(), b"\r\n") {
                let line = String::from_utf8_lossy(&self.pending()[..i]).into_owned();
                self.consume(i + 2);
                return Ok(line);
            }
            if self.pending().len() > MAX_HEAD {
                return Err(protocol("line too long in a chunked body"));
            }
            if self.fill().await? == 0 {
                return Err(protocol(
                    "connection closed in the middle of a chunked body",
                ));
            }
        }
    }

    /// Read a response head. `Ok(None)`: the server closed the connection before sending any byte.
    async fn head(&mut self) -> Result<Option<(u16, bool, Vec<(String, String)>)>, Error> {
        let mut scanned = 0;
        let end = loop {
            if let Some(i) = find(&self.pending()[scanned..], b"\r\n\r\n") {
                break scanned + i;
            }
            scanned = self.pending().len().saturating_sub(3);
            if self.pending().len() > MAX_HEAD {
                return Err(protocol(format!(
                    "response head larger than {MAX_HEAD} bytes"
                )));
            }
            if self.fill().await? == 0 {
                if self.pending().is_empty() {
                    return Ok(None);
                }
                return Err(protocol(
                    "connection closed in the middle of a response head",
                ));
            }
        };
        let text = std::str::from_utf8(&self.pending()[..end])
            .map_err(|_| protocol("response head is not UTF-8"))?;
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        if !version.starts_with("HTTP/1.") {
            return Err(protocol(format!(
                "not an HTTP/1.x status line: {:?}",
                truncate(status_line, 80)
            )));
        }
        let http10 = version == "HTTP/1.0";
        let status = parts
            .next()
            .and_then(|s| s.parse::<u16>().ok())
            .filter(|s| (100..1000).contains(s))
            .ok_or_else(|| protocol(format!("bad status line: {:?}", truncate(status_line, 80))))?;
        let mut headers = Vec::new();
        for line in lines {
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| protocol(format!("bad header line: {:?}", truncate(line, 80))))?;
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        self.consume(end + 4);
        Ok(Some((status, http10, headers)))
    }

    /// Read a body of exactly `n` bytes.
    async fn sized_body(&mut self, n: usize) -> Result<Vec<u8>, Error> {
        if n > MAX_BODY {
            return Err(protocol(format!(
                "Content-Length {n} exceeds the {MAX_BODY}-byte limit"
            )));
        }
        self.fill_to(n).await?;
        let body = self.pending()[..n].to_vec();
        self.consume(n);
        Ok(body)
    }

    async fn chunked_body(&mut self) -> Result<Vec<u8>, Error> {
        let mut body = Vec::new();
        loop {
            let line = self.line().await?;
            let size_hex = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| protocol(format!("bad chunk size {size_hex:?}")))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.line().await?.is_empty() {}
                return Ok(body);
            }
            if body.len() + size > MAX_BODY {
                return Err(protocol(format!(
                    "chunked body exceeds the {MAX_BODY}-byte limit"
                )));
            }
            self.fill_to(size + 2).await?;
            body.extend_from_slice(&self.pending()[..size]);
            if &self.pending()[size..size + 2] != b"\r\n" {
                return Err(protocol("chunk not followed by CRLF"));
            }
            self.consume(size + 2);
        }
    }

    async fn body_to_close(&mut self) -> Result<Vec<u8>, Error> {
        while self.fill().await? > 0 {
            if self.pending().len() > MAX_BODY {
                return Err(protocol(format!("body exceeds the {MAX_BODY}-byte limit")));
            }
        }
        let body = self.pending().to_vec();
        self.consume(body.len());
        Ok(body)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// What a single attempt on one connection produced.
enum Attempt {
    Done(Response, bool),
    /// The reused connection had been closed by the server before answering.
    Stale,
}

/// Headers sent with every request of this process (e.g. `Authorization: Bearer ...` from `--token`).
static DEFAULT_HEADERS: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();

/// Set the headers every [`Client`] request carries (once per process; later calls are ignored).
pub fn set_default_headers(headers: Vec<(String, String)>) {
    let _ = DEFAULT_HEADERS.set(headers);
}

/// An HTTP/1.1 client over one keep-alive connection (reopened when the server closes it).
pub struct Client {
    addr: String,
    conn: Option<Conn>,
    timeout: Duration,
    out: Vec<u8>,
}

impl Client {
    /// Connect to `addr` (`host:port`), which is also sent as the `Host` header.
    pub async fn connect(addr: &str) -> Result<Client, Error> {
        let conn = Conn::open(addr).await?;
        Ok(Client {
            addr: addr.to_string(),
            conn: Some(conn),
            timeout: Duration::from_secs(30),
            out: Vec::with_capacity(4096),
        })
    }

    /// Time limit for one request, from writing it to the end of the response body (default 30 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Send one request and read its complete response. `path` is the request target (path and query).
    /// `Host` and (for a non-empty body, or POST/PUT/PATCH) `Content-Length` are added.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response, Error> {
        self.out.clear();
        self.out.extend_from_slice(
            format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.addr).as_bytes(),
        );
        for (k, v) in headers {
            self.out
                .extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
        }
        for (k, v) in DEFAULT_HEADERS.get().into_iter().flatten() {
            self.out
                .extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
        }
        if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
            self.out
                .extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
        }
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(body);
        let head_only = method == "HEAD";
        match tokio::time::timeout(self.timeout, self.exchange(head_only)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                self.conn = None;
                Err(Error::Timeout)
            }
        }
    }

    async fn exchange(&mut self, head_only: bool) -> Result<Response, Error> {
        for _ in 0..2 {
            let mut conn = match self.conn.take() {
                Some(c) => c,
                None => Conn::open(&self.addr).await?,
            };
            match attempt(&mut conn, &self.out, head_only).await? {
                Attempt::Done(resp, keep) => {
                    if keep {
                        conn.reused = true;
                        self.conn = Some(conn);
                    }
                    return Ok(resp);
                }
                Attempt::Stale => continue,
            }
        }
        Err(protocol("server closed the connection without answering"))
    }
}

async fn attempt(conn: &mut Conn, request: &[u8], head_only: bool) -> Result<Attempt, Error> {
    let reused = conn.reused;
    if let Err(e) = conn.stream.write_all(request).await {
        return if reused {
            Ok(Attempt::Stale)
        } else {
            Err(e.into())
        };
    }
    loop {
        let (status, http10, headers) = match conn.head().await {
            Ok(Some(h)) => h,
            Ok(None) if reused => return Ok(Attempt::Stale),
            Ok(None) => return Err(protocol("server closed the connection without answering")),
            Err(Error::Io(e)) if reused && e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Ok(Attempt::Stale);
            }
            Err(e) => return Err(e),
        };
        if (100..200).contains(&status) && status != 101 {
            continue; // interim response (100 Continue, 103 Early Hints)
        }
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.to_ascii_lowercase())
        };
        let connection = get("connection").unwrap_or_default();
        let mut keep = if http10 {
            connection.contains("keep-alive")
        } else {
            !connection.contains("close")
        };
        let body = if head_only || status == 204 || status == 304 {
            Vec::new()
        } else if get("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
            conn.chunked_body().await?
        } else if let Some(len) = get("content-length") {
            let n = len
                .trim()
                .parse::<usize>()
                .map_err(|_| protocol(format!("bad Content-Length {len:?}")))?;
            conn.sized_body(n).await?
        } else {
            keep = false;
            conn.body_to_close().await?
        };
        return Ok(Attempt::Done(
            Response {
                status,
                headers,
                body,
            },
            keep,
        ));
    }
}
