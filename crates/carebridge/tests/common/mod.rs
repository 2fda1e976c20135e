//! Shared helpers for integration tests that spawn the `carebridge` binary.
//!
//! - [`TempDir`]: a unique directory under the system temp dir, removed on drop (kept when the test panicked,
//!   or when `CAREBRIDGE_KEEP_TEST_DIRS` is set, so a failure can be inspected).
//! - [`Server`]: `carebridge serve --http 127.0.0.1:0 --data-dir DIR`, with the bound address parsed from the
//!   `listening on http://IP:PORT` line it prints on stdout; killed (SIGKILL) on drop if still running.
//! - [`Conn`]: a tiny blocking HTTP/1.1 client over one keep-alive `std::net::TcpStream` (Content-Length and
//!   chunked bodies), which tells a complete response from a truncated one.
//! - [`nhs_number`]: valid (modulus 11) NHS numbers from a counter, for unique test identifiers.
//!
//! No crates beyond the package's own dependencies (`serde_json`) and std.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
#![allow(dead_code)]

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Path of the binary under test (built by cargo for integration tests).
pub const BIN: &str = env!("CARGO_BIN_EXE_carebridge");

/// How long a server may take to print its `listening on` line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A unique temporary directory, removed on drop unless the test failed.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let n = UNIQUE.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!(
            "carebridge-{label}-{}-{nanos}-{n}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("CAREBRIDGE_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping test directory {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running `carebridge serve` process.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// `http://IP:PORT`
    pub base: String,
    /// File receiving the server's stderr (its logs).
    pub log: PathBuf,
    pub data_dir: PathBuf,
}

impl Server {
    /// Start `carebridge serve` on a free loopback port with the given data dir; stderr goes to `log`.
    pub fn start(data_dir: &Path, log: &Path) -> Server {
        let stderr = std::fs::File::create(log)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let mut child = Command::new(BIN)
            .args(["serve", "--http", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env_remove("CAREBRIDGE_HTTP")
            .env_remove("CAREBRIDGE_DATA_DIR")
            .env_remove("CAREBRIDGE_CONFIG")
            .env_remove("CAREBRIDGE_PUBLIC_URL")
            // These tests are about storage and shutdown, not authentication (loopback only).
            .env("CAREBRIDGE_AUTH", "none")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {BIN}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        // A thread reads stdout for the whole life of the process (so it never blocks on a full pipe) and
        // hands over the first `listening on` line.
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent && line.contains("listening on http://") {
                    let _ = tx.send(line.clone());
                    sent = true;
                }
            }
        });
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let line = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => break line,
                Err(mpsc::RecvTimeoutError::Timeout)
                | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!(
                            "carebridge exited with {status} before listening; stderr:\n{}",
                            read_log(log)
                        );
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        panic!(
                            "carebridge printed no 'listening on' line within {STARTUP_TIMEOUT:?}; stderr:\n{}",
                            read_log(log)
                        );
                    }
                }
            }
        };
        let addr = parse_listening(&line)
            .unwrap_or_else(|| panic!("cannot parse the address in {line:?}"));
        Server {
            child: Some(child),
            addr,
            base: format!("http://{addr}"),
            log: log.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("server already reaped")
    }

    pub fn conn(&self) -> Conn {
        Conn::connect(self.addr).unwrap_or_else(|e| panic!("connecting to {}: {e}", self.addr))
    }

    /// SIGKILL the process (`Child::kill`) and reap it.
    pub fn kill9(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("server already reaped");
        child.kill().expect("SIGKILL");
        child.wait().expect("reaping the killed server")
    }

    /// Send SIGTERM through the `kill` command (no libc in tests).
    pub fn sigterm(&self) {
        let pid = self.pid().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("running kill -TERM");
        assert!(status.success(), "kill -TERM {pid} failed: {status}");
    }

    /// Wait for the process to exit, up to `timeout`; `None` if still running then (it is then SIGKILLed).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take().expect("server already reaped");
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return None;
                }
            }
        }
    }

    /// The server's stderr so far (for failure messages).
    pub fn log_text(&self) -> String {
        read_log(&self.log)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn read_log(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Keep failure messages readable: the last 8 KiB.
    match text.char_indices().rev().nth(8 * 1024) {
        Some((i, _)) => format!("...{}", &text[i..]),
        None => text,
    }
}

/// `... listening on http://127.0.0.1:40123 (...)` -> 127.0.0.1:40123
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listening on http://")? + "listening on http://".len()..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '/')
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// A received HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): status {} body {}",
                self.status,
                self.text()
            )
        })
    }
}

/// Why a request got no complete response.
#[derive(Debug)]
pub enum HttpError {
    /// Connecting, sending, or the connection closed before a single byte of the response came back.
    NoResponse(io::Error),
    /// A response started (some bytes arrived) but was cut off or malformed.
    Incomplete(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::NoResponse(e) => write!(f, "no response: {e}"),
            HttpError::Incomplete(m) => write!(f, "incomplete response: {m}"),
        }
    }
}

/// One keep-alive HTTP/1.1 connection.
pub struct Conn {
    addr: SocketAddr,
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    /// The server said `Connection: close` (or closed): the next request needs a new connection.
    pub closed: bool,
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Conn {
            addr,
            writer: stream,
            reader,
            closed: false,
        })
    }

    pub fn get(&mut self, path: &str) -> Result<Response, HttpError> {
        self.request("GET", path, &[], None)
    }

    pub fn post_json(
        &mut self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Response, HttpError> {
        let bytes = serde_json::to_vec(body).expect("serialising JSON");
        self.request(
            "POST",
            path,
            &[("Content-Type", "application/fhir+json")],
            Some(&bytes),
        )
    }

    /// Send one request and read its response. `path` is origin-form (`/fhir/Patient?x=y`).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response, HttpError> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/fhir+json\r\n",
            self.addr
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            head.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if let Some(b) = body {
            bytes.extend_from_slice(b);
        }
        self.writer
            .write_all(&bytes)
            .map_err(HttpError::NoResponse)?;
        self.writer.flush().map_err(HttpError::NoResponse)?;
        self.read_response(method == "HEAD")
    }

    /// Write raw bytes (e.g. the first half of a request, to hold it in flight).
    pub fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes)?;
        self.writer.flush()
    }

    /// Read one response to a request written with [`Conn::write_raw`].
    pub fn read(&mut self) -> Result<Response, HttpError> {
        self.read_response(false)
    }

    fn read_response(&mut self, head_only: bool) -> Result<Response, HttpError> {
        let mut status_line = String::new();
        match self.reader.read_line(&mut status_line) {
            Ok(0) => {
                self.closed = true;
                return Err(HttpError::NoResponse(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed",
                )));
            }
            Ok(_) => {}
            Err(e) => {
                self.closed = true;
                return Err(HttpError::NoResponse(e));
            }
        }
        let incomplete = |m: String| HttpError::Incomplete(m);
        if !status_line.ends_with("\r\n") {
            self.closed = true;
            return Err(incomplete(format!("truncated status line {status_line:?}")));
        }
        let mut parts = status_line.trim_end().splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| incomplete(format!("bad status line {status_line:?}")))?;
        if !version.starts_with("HTTP/1.") {
            return Err(incomplete(format!("bad status line {status_line:?}")));
        }
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).map_err(|e| {
                self.closed = true;
                incomplete(format!("reading headers: {e}"))
            })?;
            if n == 0 || !line.ends_with("\r\n") {
                self.closed = true;
                return Err(incomplete(format!(
                    "headers cut off after {} lines",
                    headers.len()
                )));
            }
            let line = line.trim_end_matches("\r\n");
            if line.is_empty() {
                break;
            }
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| incomplete(format!("bad header line {line:?}")))?;
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        if find("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
            self.closed = true;
        }
        let no_body = head_only || status == 204 || status == 304 || (100..200).contains(&status);
        let body = if no_body {
            Vec::new()
        } else if find("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            self.read_chunked().map_err(|e| {
                self.closed = true;
                incomplete(format!("chunked body: {e}"))
            })?
        } else if let Some(len) = find("content-length") {
            let len: usize = len
                .parse()
                .map_err(|_| incomplete(format!("bad content-length {len:?}")))?;
            let mut body = vec![0; len];
            self.reader.read_exact(&mut body).map_err(|e| {
                self.closed = true;
                incomplete(format!("body cut off (content-length {len}): {e}"))
            })?;
            body
        } else {
            // Delimited by close.
            self.closed = true;
            let mut body = Vec::new();
            self.reader
                .read_to_end(&mut body)
                .map_err(|e| incomplete(format!("close-delimited body: {e}")))?;
            body
        };
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let mut size_line = String::new();
            if self.reader.read_line(&mut size_line)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "eof in chunk size",
                ));
            }
            let size_hex = size_line.trim_end().split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size {size_line:?}"),
                )
            })?;
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    let mut line = String::new();
                    if self.reader.read_line(&mut line)? == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "eof in trailers",
                        ));
                    }
                    if line == "\r\n" {
                        return Ok(body);
                    }
                }
            }
            let start = body.len();
            body.resize(start + size, 0);
            self.reader.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            self.reader.read_exact(&mut crlf)?;
            if &crlf != b"\r\n" {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "chunk not followed by CRLF",
                ));
            }
        }
    }
}

/// Check digit of the first nine digits by modulus 11, or `None` when it would be 10 (no valid number).
pub fn nhs_check_digit(nine: &[u8; 9]) -> Option<u8> {
    let sum: u32 = nine
        .iter()
        .enumerate()
        .map(|(i, d)| u32::from(*d) * (10 - i as u32))
        .sum();
    match 11 - (sum % 11) {
        11 => Some(0),
        10 => None,
        d => Some(d as u8),
    }
}

/// Valid NHS numbers (modulus 11, not repdigits) in increasing order from the nine-digit stem `base`
/// (e.g. 900_000_000 for the 900 test range); stems with no valid check digit are skipped.
pub fn nhs_numbers(base: u32) -> impl Iterator<Item = String> {
    (base..1_000_000_000).filter_map(|stem| {
        let s = format!("{stem:09}");
        let nine: [u8; 9] = s
            .as_bytes()
            .iter()
            .map(|b| b - b'0')
            .collect::<Vec<_>>()
            .try_into()
            .ok()?;
        let full = format!("{s}{}", nhs_check_digit(&nine)?);
        let repdigit = full.bytes().all(|b| b == full.as_bytes()[0]);
        (!repdigit).then_some(full)
    })
}

/// The `n`-th number of [`nhs_numbers`]`(base)`.
pub fn nhs_number(base: u32, n: usize) -> String {
    nhs_numbers(base).nth(n).expect("NHS numbers exhausted")
}

/// A small valid UK Core Patient with the given NHS number.
pub fn patient(nhs: &str, family: &str) -> serde_json::Value {
    serde_json::json!({
        "resourceType": "Patient",
        "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs}],
        "name": [{"use": "official", "family": family, "given": ["Test"]}],
        "gender": "unknown",
        "birthDate": "1970-01-01"
    })
}

/// `http://IP:PORT/fhir/Patient/ID/_history/1` -> (`Patient`, `ID`, 1)
pub fn parse_location(location: &str) -> Option<(String, String, u64)> {
    let path = &location[location.find("/fhir/")? + "/fhir/".len()..];
    let parts: Vec<&str> = path.split('/').collect();
    match parts.as_slice() {
        [t, id, "_history", v] => Some((t.to_string(), id.to_string(), v.parse().ok()?)),
        _ => None,
    }
}

/// Origin-form path of an absolute URL on the server (`http://IP:PORT/fhir/x?y` -> `/fhir/x?y`).
pub fn origin_form(url: &str) -> String {
    match url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    {
        Some(rest) => rest
            .find('/')
            .map(|i| rest[i..].to_string())
            .unwrap_or_else(|| "/".into()),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_nhs_numbers() {
        for n in [
            "9000000009",
            "9000000025",
            "9000000033",
            "9111231130",
            "9990548609",
        ] {
            let nine: [u8; 9] = n.as_bytes()[..9]
                .iter()
                .map(|b| b - b'0')
                .collect::<Vec<_>>()
                .try_into()
                .unwrap();
            assert_eq!(nhs_check_digit(&nine), Some(n.as_bytes()[9] - b'0'), "{n}");
        }
        assert_eq!(nhs_number(900_000_000, 0), "9000000009");
    }

    #[test]
    fn listening_line() {
        let line = "carebridge 0.1.0 listening on http://127.0.0.1:40123 (FHIR base http://127.0.0.1:40123/fhir, ...)";
        assert_eq!(
            parse_listening(line),
            Some("127.0.0.1:40123".parse().unwrap())
        );
    }
}
