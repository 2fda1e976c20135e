//! Webhook receivers on loopback ports.
//!
//! [`Receiver`]: a minimal HTTP/1.1 server that reads each request completely (`Content-Length` or chunked),
//! answers `200 OK` on the same keep-alive connection, and records per delivery the commit-to-receipt latency
//! (receipt instant minus the CloudEvent's `time`) and the event id (to count distinct deliveries and
//! duplicates). [`DeadReceiver`]: accepts connections and reads what is sent, but never answers.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 16 * 1024 * 1024;
const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

/// What a receiver has recorded since its last [`Receiver::reset`].
#[derive(Debug, Default, Clone)]
pub struct Recorded {
    /// Commit-to-receipt latency (ms) of each first receipt of an event.
    pub latencies_ms: Vec<f64>,
    /// Distinct event ids received.
    pub ids: HashSet<String>,
    /// Receipts of an id already received.
    pub duplicates: u64,
    /// Requests whose body had no readable `id` and `time`.
    pub unparsable: u64,
    /// Requests read (all of them).
    pub requests: u64,
    pub connections: u64,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
}

impl Recorded {
    pub fn distinct(&self) -> u64 {
        self.ids.len() as u64
    }
}

/// A fast webhook endpoint.
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<Recorded>>,
    stop: watch::Sender<bool>,
}

impl Receiver {
    pub async fn start() -> std::io::Result<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(Recorded::default()));
        let (stop, stopped) = watch::channel(false);
        let st = state.clone();
        tokio::spawn(async move {
            let mut stopped_accept = stopped.clone();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stopped_accept.changed() => return,
                };
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                if let Ok(mut s) = st.lock() {
                    s.connections += 1;
                }
                let (st, mut stopped) = (st.clone(), stopped.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = serve(stream, &st) => {},
                        _ = stopped.changed() => {},
                    }
                });
            }
        });
        Ok(Receiver { addr, state, stop })
    }

    /// The webhook URL to register.
    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Forget everything recorded so far.
    pub fn reset(&self) {
        if let Ok(mut s) = self.state.lock() {
            let connections = s.connections;
            *s = Recorded::default();
            s.connections = connections;
        }
    }

    pub fn distinct(&self) -> u64 {
        self.state.lock().map_or(0, |s| s.distinct())
    }

    pub fn snapshot(&self) -> Recorded {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Serve one connection until the peer closes it or sends something that is not HTTP/1.1.
async fn serve(mut stream: TcpStream, state: &Mutex<Recorded>) {
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    loop {
        // Head.
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i;
            }
            if buf.len() > MAX_HEAD {
                return;
            }
            buf.reserve(16 * 1024);
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        let Ok(head) = std::str::from_utf8(&buf[..head_end]) else {
            return;
        };
        let mut length: Option<usize> = None;
        let mut chunked = false;
        for line in head.split("\r\n").skip(1) {
            let Some((k, v)) = line.split_once(':') else {
                return;
            };
            let (k, v) = (k.trim(), v.trim());
            if k.eq_ignore_ascii_case("content-length") {
                match v.parse::<usize>() {
                    Ok(n) if n <= MAX_BODY => length = Some(n),
                    _ => return,
                }
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.to_ascii_lowercase().contains("chunked");
            }
        }
        buf.drain(..head_end + 4);
        // Body.
        let body: Vec<u8> = if chunked {
            match chunked_body(&mut stream, &mut buf).await {
                Some(b) => b,
                None => return,
            }
        } else {
            let n = length.unwrap_or(0);
            while buf.len() < n {
                buf.reserve(n - buf.len());
                match stream.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
            buf.drain(..n).collect()
        };
        let at = Instant::now();
        let wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        if stream.write_all(OK).await.is_err() {
            return;
        }
        let parsed = top_level_strings(&body, ["id", "time"]);
        let Ok(mut s) = state.lock() else { return };
        s.requests += 1;
        match parsed {
            [Some(id), Some(time)] => match fhir::parse_instant_ms(time) {
                Some(t) => {
                    if s.ids.insert(id.to_string()) {
                        s.latencies_ms.push(wall_ms - t as f64);
                        s.first.get_or_insert(at);
                        s.last = Some(at);
                    } else {
                        s.duplicates += 1;
                    }
                }
                None => s.unparsable += 1,
            },
            _ => s.unparsable += 1,
        }
    }
}

/// Read a chunked body (and its trailers) from `buf` + `stream`, leaving what follows in `buf`.
async fn chunked_body(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = find(buf, b"\r\n") {
                break i;
            }
            if buf.len() > MAX_HEAD {
                return None;
            }
            buf.reserve(16 * 1024);
            if stream.read_buf(buf).await.ok()? == 0 {
                return None;
            }
        };
        let line = std::str::from_utf8(&buf[..line_end]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailers up to the empty line.
            loop {
                let end = loop {
                    if let Some(i) = find(buf, b"\r\n") {
                        break i;
                    }
                    if buf.len() > MAX_HEAD {
                        return None;
                    }
                    if stream.read_buf(buf).await.ok()? == 0 {
                        return None;
                    }
                };
                buf.drain(..end + 2);
                if end == 0 {
                    return Some(body);
                }
            }
        }
        if body.len() + size > MAX_BODY {
            return None;
        }
        while buf.len() < size + 2 {
            buf.reserve(size + 2 - buf.len());
            if stream.read_buf(buf).await.ok()? == 0 {
                return None;
            }
        }
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

/// The string values of the given keys of a JSON object's top level (not of nested objects), without
/// parsing the whole document into a tree: a CloudEvent's `data` (the resource) has keys named `id` too.
/// Values with escapes are returned raw (event ids and instants never contain any).
pub fn top_level_strings<'a, const N: usize>(
    body: &'a [u8],
    keys: [&str; N],
) -> [Option<&'a str>; N] {
    let mut out = [None; N];
    let mut depth = 0usize;
    let mut i = 0;
    // At depth 1: whether the next string is a key, and the key just read (if wanted).
    let mut expect_key = false;
    let mut want: Option<usize> = None;
    let mut after_colon = false;
    while i < body.len() {
        match body[i] {
            b'"' => {
                let start = i + 1;
                let mut j = start;
                while j < body.len() && body[j] != b'"' {
                    j += if body[j] == b'\\' { 2 } else { 1 };
                }
                if j >= body.len() {
                    return out;
                }
                if depth == 1 {
                    let s = std::str::from_utf8(&body[start..j]).ok();
                    if expect_key {
                        want = s.and_then(|s| keys.iter().position(|k| *k == s));
                        expect_key = false;
                    } else if after_colon {
                        if let Some(k) = want.take() {
                            out[k] = s;
                        }
                        after_colon = false;
                    }
                }
                i = j + 1;
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                if depth == 1 {
                    expect_key = true;
                } else if depth == 2 {
                    after_colon = false;
                    want = None;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b':' if depth == 1 => after_colon = true,
            b',' if depth == 1 => {
                expect_key = true;
                after_colon = false;
                want = None;
            }
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ if depth == 1 => {
                // A number, true, false or null value.
                after_colon = false;
                want = None;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// Accepts connections and reads whatever is sent, never answering: the hub's requests time out.
pub struct DeadReceiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<(u64, u64)>>,
    stop: watch::Sender<bool>,
}

impl DeadReceiver {
    pub async fn start() -> std::io::Result<DeadReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new((0u64, 0u64)));
        let (stop, stopped) = watch::channel(false);
        let st = state.clone();
        tokio::spawn(async move {
            let mut stopped_accept = stopped.clone();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stopped_accept.changed() => return,
                };
                let Ok((mut stream, _)) = accepted else {
                    continue;
                };
                if let Ok(mut s) = st.lock() {
                    s.0 += 1;
                }
                let (st, mut stopped) = (st.clone(), stopped.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        tokio::select! {
                            r = stream.read(&mut buf) => match r {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    // Count request lines seen (POST at the start of a read or after a CRLF).
                                    let posts = buf[..n].windows(5).filter(|w| w == b"POST ").count() as u64;
                                    if let Ok(mut s) = st.lock() {
                                        s.1 += posts;
                                    }
                                }
                            },
                            _ = stopped.changed() => return,
                        }
                    }
                });
            }
        });
        Ok(DeadReceiver { addr, state, stop })
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// (connections accepted, requests seen).
    pub fn counts(&self) -> (u64, u64) {
        self.state.lock().map_or((0, 0), |s| *s)
    }
}

impl Drop for DeadReceiver {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn top_level_only() {
        let body = br#"{"specversion":"1.0","n":12,"ok":true,"nested":{"id":"no","time":"no"},"arr":[{"id":"x"}],"id":"evt-7","time":"2026-01-02T03:04:05.678Z","data":{"resourceType":"Patient","id":"abc"}}"#;
        assert_eq!(
            top_level_strings(body, ["id", "time"]),
            [Some("evt-7"), Some("2026-01-02T03:04:05.678Z")]
        );
        let s = br#"{ "id" : "a\"b", "time": null }"#;
        assert_eq!(top_level_strings(s, ["id", "time"]), [Some("a\\\"b"), None]);
        assert_eq!(top_level_strings(b"[1,2]", ["id"]), [None]);
        assert_eq!(top_level_strings(b"{\"id\":", ["id"]), [None]);
    }
}
