//! Authentication and authorisation over HTTP: the `POST /oauth2/token` endpoint (client credentials with a
//! signed JWT assertion), the layer that requires a Bearer token with the right SMART v2 system scope on every
//! other endpoint (except `/health` and `/fhir/metadata`), per-client rate limits, and the audit trail
//! (AuditEvent JSON kept in the store's key-value table and served read-only to admins at `/fhir/AuditEvent`).
//!
//! Certificate binding (RFC 8705): a client registered with a certificate thumbprint gets tokens only over
//! mutual TLS with that certificate, and its tokens carry `cnf.x5t#S256`; a request with such a token must
//! come over a connection that presented the same certificate. The listener reports the connection's client
//! certificate as [`PeerInfo`] (axum connect info). Keys may also come from a client's JWKS URL, fetched and
//! cached per process ([`fetch_jwks`]).
//!
//! The pure decisions (JWS, JWKS, claims, scopes, which scope a request needs, thumbprints, JWKS caching) live
//! in the `auth` crate; this module does the IO (the store, and fetching JWKS URLs). It never spawns tasks: the
//! binary runs [`write_audit`] with the [`AuditLog`] it gave the [`Guard`].

use crate::search::{parse_pairs, push_json_str};
use crate::{App, FHIR_JSON};
use ::auth::client::{CLIENT_INDEX_NAMESPACE, CLIENT_NAMESPACE, INDEX_KEY};
use ::auth::jwks_cache::{Decision, JwksCache};
use ::auth::token::{HUB_KEY_NAME, HUB_KEY_NAMESPACE};
use ::auth::{
    AccessClaims, Client, HubKey, Interaction, Jwk, Jwks, Jws, Need, OAuthError, OAuthErrorCode,
    Scopes,
};
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use fhir::IssueType;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::{Store, StoreError, Tx};
use tokio::sync::Notify;

/// Key-value namespace of audit pages (key = 16-digit page number, value = one tab-separated line per record,
/// served as AuditEvent JSON).
pub const AUDIT_NAMESPACE: &str = store::LOG_NAMESPACES[0];
/// Key-value namespace of the audit page counter (key `page`).
pub const AUDIT_META_NAMESPACE: &str = store::LOG_NAMESPACES[1];
/// Key-value namespace of used assertion ids (key = `client|jti`, value = the assertion's `exp`).
pub const JTI_NAMESPACE: &str = "auth-jti";
/// Key-value namespace grouping used `jti`s by the minute they expire in, so expired ones are purged.
pub const JTI_BUCKET_NAMESPACE: &str = "auth-jti-bucket";
/// Bytes of audit lines held at most for the writer (a few seconds of requests at well above the measured peak,
/// about 100 bytes each); a request finding the log full waits for room rather than dropping its record.
pub const AUDIT_MAX_BYTES: usize = 64 << 20;
/// How long the audit writer gathers records before writing them as one page.
pub const AUDIT_INTERVAL: Duration = Duration::from_millis(1000);
/// How long a client's revocation state and rate limit are cached by a process.
pub const STATUS_TTL: Duration = Duration::from_secs(1);
/// Identifier system of client ids in AuditEvent agents.
pub const CLIENT_ID_SYSTEM: &str = "urn:carebridge:client-id";
/// Identifier system of ODS organisation codes.
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";

/// Largest JWKS document fetched from a client's URL, bytes.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Time limit of fetching a client's JWKS URL.
pub const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// What the listener knows of a connection: the remote address and, over mutual TLS, the `x5t#S256`
/// thumbprint of the client certificate (the leaf the client presented, verified against the client CA). A
/// listener whose address type is `PeerInfo` serves it as connect info
/// (`into_make_service_with_connect_info::<PeerInfo>()`).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The remote (or, for the listener itself, local) address.
    pub addr: std::net::SocketAddr,
    /// Thumbprint of the client certificate, when one was presented.
    pub cert_thumbprint: Option<Arc<str>>,
}

/// A listener whose connections are described by [`PeerInfo`] (the binary's TLS listener).
pub trait PeerListener: axum::serve::Listener<Addr = PeerInfo> {}

impl<L: PeerListener> axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, L>>
    for PeerInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, L>) -> PeerInfo {
        stream.remote_addr().clone()
    }
}

/// The client certificate thumbprint of the request's connection, if any.
fn peer_thumbprint(ext: &axum::http::Extensions) -> Option<Arc<str>> {
    ext.get::<axum::extract::ConnectInfo<PeerInfo>>()
        .and_then(|c| c.0.cert_thumbprint.clone())
}

/// The authenticated caller, put in the request's extensions for handlers.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Client id.
    pub client_id: Arc<str>,
    /// ODS code of the client's organisation.
    pub org: Arc<str>,
    /// The `cross-org` scope: not confined to its organisation's data.
    pub cross_org: bool,
}

#[derive(Debug, Clone, Copy)]
struct Status {
    active: bool,
    /// Requests per second allowed (0 = no limit).
    rate: f64,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Authentication state of one hub process: its token key, the token URL, caches, and the audit sender.
pub struct Guard {
    key: HubKey,
    token_url: String,
    /// Lifetime of issued access tokens, seconds.
    pub token_lifetime_s: i64,
    /// Requests per second per client when the client record sets none (0 = no limit).
    pub default_rate: f64,
    audit: Option<Arc<AuditLog>>,
    status: Mutex<HashMap<String, (Instant, Status)>>,
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Tokens already verified (by their bytes), so a client reusing its token costs a lookup, not a parse and
    /// a MAC. Bounded: cleared when it reaches [`TOKEN_CACHE_MAX`]. foldhash rather than SipHash over the
    /// ~350-byte key on every request.
    verified: Mutex<HashMap<Box<[u8]>, Arc<Verified>, foldhash::fast::RandomState>>,
    /// Key sets fetched from clients' JWKS URLs.
    jwks: Mutex<JwksCache>,
}

/// Most verified tokens remembered by a process.
const TOKEN_CACHE_MAX: usize = 10_000;

/// A verified access token: who, and the parsed scopes.
#[derive(Debug)]
struct Verified {
    client_id: Arc<str>,
    org: Arc<str>,
    scopes: Scopes,
    exp: i64,
    /// The certificate thumbprint the token is bound to (`cnf.x5t#S256`).
    cnf: Option<Arc<str>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        // The last requests are done: let the audit writer flush and stop.
        if let Some(log) = &self.audit {
            log.close();
        }
    }
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("token_url", &self.token_url)
            .field("token_lifetime_s", &self.token_lifetime_s)
            .finish_non_exhaustive()
    }
}

impl Guard {
    /// `secret` is the hub's stored token key ([`hub_secret`]); `public_url` the hub's base URL (the token
    /// endpoint is `<public_url>/oauth2/token`, the assertions' `aud`); `audit` receives an audit line per
    /// request when set (run [`write_audit`] on it).
    pub fn new(
        secret: &str,
        public_url: &str,
        audit: Option<Arc<AuditLog>>,
    ) -> Result<Guard, String> {
        Ok(Guard {
            key: HubKey::from_secret(secret, public_url)?,
            token_url: format!("{public_url}/oauth2/token"),
            token_lifetime_s: 300,
            default_rate: 0.0,
            audit,
            status: Mutex::default(),
            buckets: Mutex::default(),
            verified: Mutex::default(),
            jwks: Mutex::default(),
        })
    }

    /// The token endpoint's URL (the `aud` assertions must carry).
    pub fn token_url(&self) -> &str {
        &self.token_url
    }

    async fn audit(&self, line: &AuditLine<'_>) {
        if let Some(log) = &self.audit {
            log.append(line).await;
        }
    }

    /// Verify an access token (cached per process until it expires, by its bytes: a cached token is not even
    /// checked for UTF-8 again).
    fn verify(&self, token: &[u8]) -> Result<Arc<Verified>, String> {
        let now = now_s();
        if let Ok(map) = self.verified.lock()
            && let Some(v) = map.get(token)
        {
            return if v.exp > now {
                Ok(v.clone())
            } else {
                Err("the token has expired".into())
            };
        }
        let text = std::str::from_utf8(token).map_err(|_| "the token is not text".to_string())?;
        let c = self.key.verify(text, now)?;
        let v = Arc::new(Verified {
            scopes: Scopes::parse(&c.scope).unwrap_or_default(),
            client_id: c.client_id.into(),
            org: c.org.into(),
            exp: c.exp,
            cnf: c.cnf_x5t.map(Into::into),
        });
        if let Ok(mut map) = self.verified.lock() {
            if map.len() >= TOKEN_CACHE_MAX {
                map.clear();
            }
            map.insert(token.into(), v.clone());
        }
        Ok(v)
    }

    async fn client_status<S: Store>(&self, store: &S, id: &str) -> Status {
        if let Ok(map) = self.status.lock()
            && let Some((at, s)) = map.get(id)
            && at.elapsed() < STATUS_TTL
        {
            return *s;
        }
        let status = match store.kv_get(CLIENT_NAMESPACE, id).await {
            Ok(Some(text)) => match Client::from_json(&text) {
                Some(c) => Status {
                    active: !c.revoked,
                    rate: c.rate_limit.unwrap_or(self.default_rate),
                },
                None => Status {
                    active: false,
                    rate: 0.0,
                },
            },
            Ok(None) => Status {
                active: false,
                rate: 0.0,
            },
            // The store is failing: keep the last known state rather than locking everyone out.
            Err(_) => {
                if let Ok(map) = self.status.lock()
                    && let Some((_, s)) = map.get(id)
                {
                    return *s;
                }
                Status {
                    active: false,
                    rate: 0.0,
                }
            }
        };
        if let Ok(mut map) = self.status.lock() {
            map.insert(id.to_string(), (Instant::now(), status));
        }
        status
    }

    /// The key `kid` of the key set at `url`: cached, else fetched (again at most once per
    /// [`auth::jwks_cache::MIN_REFETCH_MS`] when the `kid` is unknown). The error says why, for the client.
    async fn remote_key(&self, url: &str, kid: &str) -> Result<Jwk, String> {
        for _ in 0..2 {
            let decision = match self.jwks.lock() {
                Ok(c) => c.decide(url, kid, now_ms()),
                Err(_) => return Err("the JWKS cache is unavailable".into()),
            };
            match decision {
                Decision::Use(k) => return Ok(k),
                Decision::Unknown => break,
                Decision::Failed(e) => {
                    return Err(format!(
                        "the client's JWKS URL {url} could not be fetched: {e}"
                    ));
                }
                Decision::Fetch => {
                    let fetched = fetch_jwks(url).await;
                    let Ok(mut cache) = self.jwks.lock() else {
                        return Err("the JWKS cache is unavailable".into());
                    };
                    match fetched {
                        Ok((doc, max_age)) => match Jwks::from_json(&doc) {
                            Ok(j) => cache.fetched(url, j, max_age, now_ms()),
                            Err(e) => cache.failed(url, format!("unusable key set: {e}"), now_ms()),
                        },
                        Err(e) => cache.failed(url, e, now_ms()),
                    }
                }
            }
        }
        Err(format!(
            "kid {kid} is not a key of the client's JWKS URL {url}"
        ))
    }

    /// Take one request from the client's bucket; `Some(seconds)` to wait when it is empty.
    fn take(&self, id: &str, rate: f64) -> Option<u64> {
        if rate <= 0.0 {
            return None;
        }
        let mut map = self.buckets.lock().ok()?;
        let now = Instant::now();
        if !map.contains_key(id) {
            map.insert(
                id.to_string(),
                Bucket {
                    tokens: rate.max(1.0),
                    at: now,
                },
            );
        }
        let b = map.get_mut(id)?;
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(rate.max(1.0));
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            None
        } else {
            Some(((1.0 - b.tokens) / rate).ceil().max(1.0) as u64)
        }
    }
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Fetch a JWKS document from `url` (http or https): the JSON and the response's `Cache-Control` max-age.
/// Errors say what failed (connection, status, size, not JSON).
pub async fn fetch_jwks(url: &str) -> Result<(Value, Option<i64>), String> {
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(format!("{url} is not an http(s) URL"));
    }
    let http = reqwest::Client::builder()
        .timeout(JWKS_FETCH_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))?;
    let chain = |e: &dyn std::error::Error| {
        let mut s = e.to_string();
        let mut src = e.source();
        while let Some(c) = src {
            s.push_str(": ");
            s.push_str(&c.to_string());
            src = c.source();
        }
        s
    };
    let mut res = http
        .get(url)
        .header(header::ACCEPT, "application/json, application/jwk-set+json")
        .send()
        .await
        .map_err(|e| chain(&e))?;
    if !res.status().is_success() {
        return Err(format!("GET {url} answered {}", res.status()));
    }
    let max_age = res
        .headers()
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .and_then(::auth::jwks_cache::max_age);
    let mut body = Vec::new();
    while let Some(chunk) = res.chunk().await.map_err(|e| chain(&e))? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_JWKS_BYTES {
            return Err(format!(
                "the key set at {url} is larger than {MAX_JWKS_BYTES} bytes"
            ));
        }
    }
    let doc = serde_json::from_slice::<Value>(&body)
        .map_err(|e| format!("the key set at {url} is not JSON: {e}"))?;
    Ok((doc, max_age))
}

/// The hub's token key: read from the store, or created (once, race-free) on first use.
pub async fn hub_secret<S: Store>(store: &S) -> Result<String, StoreError> {
    if let Some(s) = store.kv_get(HUB_KEY_NAMESPACE, HUB_KEY_NAME).await? {
        return Ok(s);
    }
    let fresh = HubKey::generate_secret().map_err(StoreError::Backend)?;
    store
        .write(move |tx| {
            if let Some(s) = tx.kv_get(HUB_KEY_NAMESPACE, HUB_KEY_NAME)? {
                return Ok(s);
            }
            tx.kv_put(HUB_KEY_NAMESPACE, HUB_KEY_NAME, Some(&fresh))?;
            Ok(fresh)
        })
        .await
}

/// The registered client ids, in registration order.
pub fn client_ids(tx: &mut dyn Tx) -> Result<Vec<String>, StoreError> {
    Ok(tx
        .kv_get(CLIENT_INDEX_NAMESPACE, INDEX_KEY)?
        .and_then(|t| serde_json::from_str::<Vec<String>>(&t).ok())
        .unwrap_or_default())
}

/// One client record.
pub fn get_client(tx: &mut dyn Tx, id: &str) -> Result<Option<Client>, StoreError> {
    Ok(tx
        .kv_get(CLIENT_NAMESPACE, id)?
        .and_then(|t| Client::from_json(&t)))
}

/// Store a client record (new or changed), keeping the index of ids.
pub fn put_client(tx: &mut dyn Tx, client: &Client) -> Result<(), StoreError> {
    let mut ids = client_ids(tx)?;
    if !ids.contains(&client.id) {
        ids.push(client.id.clone());
        let text = serde_json::to_string(&ids).map_err(|e| StoreError::Backend(e.to_string()))?;
        tx.kv_put(CLIENT_INDEX_NAMESPACE, INDEX_KEY, Some(&text))?;
    }
    tx.kv_put(CLIENT_NAMESPACE, &client.id, Some(&client.to_json()))
}

/// One stored audit record, parsed back from its line (see `AuditLine`) to be served as an AuditEvent.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    /// When, ms since the epoch.
    pub ms: i64,
    /// Client id (`-` when the caller could not be identified).
    pub client: Arc<str>,
    /// ODS code of the client's organisation ("" when unknown).
    pub org: Arc<str>,
    /// restful-interaction code (`read`, `search-type`, `create`, ...) or `token`.
    pub subtype: &'static str,
    /// C, R, U, D or E.
    pub action: &'static str,
    /// HTTP status of the answer.
    pub status: u16,
    /// `Type/id` of the resource concerned.
    pub what: Option<String>,
    /// `X-Correlation-ID` (else `X-Request-ID`) sent by the caller.
    pub correlation: Option<String>,
    /// Why it was refused.
    pub detail: Option<String>,
}

/// Audit lines waiting for [`write_audit`]: requests append one compact line each to a shared buffer (no
/// allocation per request), and the writer swaps the buffer out once per [`AUDIT_INTERVAL`] and stores it as
/// one page.
#[derive(Debug, Default)]
pub struct AuditLog {
    /// The lines, and how many.
    buf: Mutex<(String, usize)>,
    /// Signalled when the writer has emptied the buffer (for requests waiting for room).
    room: Notify,
    /// Signalled when the log is closed (the writer flushes at once and stops).
    wake: Notify,
    closed: AtomicBool,
}

impl AuditLog {
    /// A new, empty log; give it to [`Guard::new`] and run [`write_audit`] on it.
    pub fn new() -> Arc<AuditLog> {
        Arc::new(AuditLog::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (String, usize)> {
        // Nothing panics while holding the lock; recover the text rather than lose it.
        self.buf.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Append the line when there is room; false when the log is full.
    fn try_push(&self, line: &AuditLine<'_>) -> bool {
        let mut buf = self.lock();
        if buf.0.len() >= AUDIT_MAX_BYTES {
            return false;
        }
        line.push(&mut buf.0);
        buf.1 += 1;
        true
    }

    /// Append one line, waiting for room when the writer is behind (never dropping it).
    async fn append(&self, line: &AuditLine<'_>) {
        // The common case first, without registering for a wake-up.
        if self.try_push(line) {
            return;
        }
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if self.try_push(line) {
                return;
            }
            room.await;
        }
    }

    /// No more lines will come: the writer flushes what is left and returns.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

/// Store the audit log's lines until it is closed. Lines gathered in an interval are written as one page (one
/// key-value row, one compact line per record; ids `<page>-<index>`), so auditing every read costs one row
/// per interval and about 100 bytes per request. Pages are never updated or deleted.
pub async fn write_audit<S: Store>(store: Arc<S>, log: Arc<AuditLog>) {
    let mut spare = String::new();
    loop {
        let closed = log.closed.load(Ordering::SeqCst);
        if !closed {
            // Gather for an interval without waking per request: one wake-up, one commit and one fsync per
            // interval keep auditing off the read path's budget. A crash loses at most this interval of lines.
            tokio::select! {
                () = tokio::time::sleep(AUDIT_INTERVAL) => {}
                () = log.wake.notified() => {}
            }
        }
        let (text, lines) = std::mem::replace(&mut *log.lock(), (spare, 0));
        log.room.notify_waiters();
        if text.is_empty() {
            spare = text;
            if closed {
                return;
            }
            continue;
        }
        let result = store
            .write(move |tx| {
                let page: u64 = tx
                    .kv_get(AUDIT_META_NAMESPACE, "page")?
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0)
                    + 1;
                tx.kv_put(AUDIT_NAMESPACE, &format!("{page:016}"), Some(&text))?;
                tx.kv_put(AUDIT_META_NAMESPACE, "page", Some(&page.to_string()))?;
                Ok(text)
            })
            .await;
        spare = match result {
            Ok(mut text) => {
                text.clear();
                text
            }
            Err(e) => {
                tracing::error!(error = %e, records = lines, "could not append audit records");
                String::new()
            }
        };
    }
}

/// Where a message applied by an adapter came from, for its audit line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// HL7 v2 over MLLP (or inside a MESH message): the id is MSH-10.
    Hl7,
    /// MESH: the id is the MESH message id.
    Mesh,
}

/// The audit facts of one inbound message applied by an adapter (no HTTP client involved).
#[derive(Debug, Clone, Copy)]
pub struct MessageAudit<'a> {
    pub channel: Channel,
    /// Who sent it: `MSH-3^MSH-4`, or the sending MESH mailbox.
    pub sender: &'a str,
    /// The sender's organisation when known (MSH-4 is often an ODS code), else "".
    pub org: &'a str,
    /// HL7 control id (MSH-10) or MESH message id.
    pub message_id: &'a str,
    /// 200 when applied (or a duplicate answered again), 4xx when refused.
    pub status: u16,
    /// What happened, for people (`ADT^A28 AA`, `workflow X: applied`); no patient data.
    pub detail: &'a str,
}

impl AuditLog {
    /// Record an inbound message an adapter applied or refused.
    pub async fn record_message(&self, m: &MessageAudit<'_>) {
        let (subtype, prefix) = match m.channel {
            Channel::Hl7 => ("hl7-message", "hl7:"),
            Channel::Mesh => ("mesh-message", "mesh:"),
        };
        let client = format!("{prefix}{}", m.sender);
        self.append(&AuditLine {
            ms: now_ms(),
            client: &client,
            org: m.org,
            subtype,
            action: "E",
            status: m.status,
            what: None,
            correlation: Some(m.message_id).filter(|s| !s.is_empty()),
            detail: Some(m.detail).filter(|s| !s.is_empty()),
        })
        .await;
    }
}

/// One request's audit facts, borrowed from the request: what [`AuditLog`] stores as a line.
#[derive(Debug, Clone, Copy)]
struct AuditLine<'a> {
    ms: i64,
    client: &'a str,
    org: &'a str,
    subtype: &'static str,
    action: &'static str,
    status: u16,
    /// `Type/id` of the resource concerned, as its two parts.
    what: Option<(&'a str, &'a str)>,
    correlation: Option<&'a str>,
    detail: Option<&'a str>,
}

/// Append `s` with tabs and line breaks turned into spaces (the line's field and record separators).
fn push_field(out: &mut String, s: &str) {
    if s.bytes().any(|b| matches!(b, b'\t' | b'\n' | b'\r')) {
        out.extend(s.chars().map(|c| {
            if matches!(c, '\t' | '\n' | '\r') {
                ' '
            } else {
                c
            }
        }));
    } else {
        out.push_str(s);
    }
}

/// Append the decimal digits of `n` (without the formatting machinery: this runs for every request).
fn push_int(out: &mut String, n: i64) {
    if n < 0 {
        let _ = write!(out, "{n}");
        return;
    }
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // ASCII digits: always UTF-8.
    out.push_str(std::str::from_utf8(digits.get(i..).unwrap_or_default()).unwrap_or_default());
}

impl AuditLine<'_> {
    /// The stored form: one line of tab-separated fields (tabs and line breaks inside a field become spaces).
    fn push(&self, out: &mut String) {
        push_int(out, self.ms);
        out.push('\t');
        push_field(out, self.client);
        out.push('\t');
        push_field(out, self.org);
        out.push('\t');
        out.push_str(self.subtype);
        out.push('\t');
        out.push_str(self.action);
        out.push('\t');
        push_int(out, i64::from(self.status));
        out.push('\t');
        if let Some((t, id)) = self.what {
            push_field(out, t);
            out.push('/');
            push_field(out, id);
        }
        out.push('\t');
        push_field(out, self.correlation.unwrap_or(""));
        out.push('\t');
        push_field(out, self.detail.unwrap_or(""));
        out.push('\n');
    }
}

impl AuditRecord {
    /// The stored form (see [`AuditLine::push`]).
    #[cfg(test)]
    fn push_line(&self, out: &mut String) {
        AuditLine {
            ms: self.ms,
            client: &self.client,
            org: &self.org,
            subtype: self.subtype,
            action: self.action,
            status: self.status,
            what: self.what.as_deref().and_then(|w| w.split_once('/')),
            correlation: self.correlation.as_deref(),
            detail: self.detail.as_deref(),
        }
        .push(out);
    }

    /// Parse one stored line.
    fn from_line(line: &str) -> Option<AuditRecord> {
        let f: Vec<&str> = line.split('\t').collect();
        let [ms, client, org, subtype, action, status, what, corr, detail] = f.as_slice() else {
            return None;
        };
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Some(AuditRecord {
            ms: ms.parse().ok()?,
            client: (*client).into(),
            org: (*org).into(),
            subtype: match *subtype {
                "read" => "read",
                "search-type" => "search-type",
                "create" => "create",
                "update" => "update",
                "patch" => "patch",
                "delete" => "delete",
                "transaction" => "transaction",
                "token" => "token",
                "hl7-message" => "hl7-message",
                "mesh-message" => "mesh-message",
                _ => "operation",
            },
            action: match *action {
                "C" => "C",
                "R" => "R",
                "U" => "U",
                "D" => "D",
                _ => "E",
            },
            status: status.parse().ok()?,
            what: opt(what),
            correlation: opt(corr),
            detail: opt(detail),
        })
    }

    /// True when the record matches the search parameter `k=v`.
    fn matches(&self, k: &str, v: &str) -> bool {
        match k {
            "agent" => &*self.client == v || &*self.org == v,
            "entity" => self.what.as_deref() == Some(v),
            "outcome" => outcome_code(self.status) == v,
            "subtype" => self.subtype == v,
            "action" => self.action == v,
            _ => false,
        }
    }
}

fn outcome_code(status: u16) -> &'static str {
    match status {
        0..400 => "0",
        400..500 => "4",
        _ => "8",
    }
}

/// Append the R4 AuditEvent of `r` (with `id`) to `out` as JSON.
fn push_audit_event(out: &mut String, id: &str, r: &AuditRecord) {
    let outcome = outcome_code(r.status);
    out.push_str("{\"resourceType\":\"AuditEvent\",\"id\":");
    push_json_str(out, id);
    out.push_str(if matches!(r.subtype, "hl7-message" | "mesh-message") {
        // An inbound message applied by an adapter: DICOM "Import".
        ",\"type\":{\"system\":\"http://dicom.nema.org/resources/ontology/DCM\",\"code\":\"110107\",\
         \"display\":\"Import\"},\"subtype\":[{\"system\":\""
    } else {
        ",\"type\":{\"system\":\"http://terminology.hl7.org/CodeSystem/audit-event-type\",\"code\":\"rest\",\
         \"display\":\"RESTful Operation\"},\"subtype\":[{\"system\":\""
    });
    out.push_str(
        if matches!(r.subtype, "token" | "hl7-message" | "mesh-message") {
            "urn:carebridge:audit-subtype"
        } else {
            "http://hl7.org/fhir/restful-interaction"
        },
    );
    out.push_str("\",\"code\":");
    push_json_str(out, r.subtype);
    out.push_str("}],\"action\":");
    push_json_str(out, r.action);
    out.push_str(",\"recorded\":");
    push_json_str(out, &fhir::format_instant_ms(r.ms));
    out.push_str(",\"outcome\":\"");
    out.push_str(outcome);
    out.push_str("\",\"outcomeDesc\":");
    match &r.detail {
        Some(d) => push_json_str(out, &format!("{} {d}", r.status)),
        None => push_json_str(out, &r.status.to_string()),
    }
    out.push_str(",\"agent\":[{\"who\":{\"identifier\":{\"system\":\"");
    out.push_str(CLIENT_ID_SYSTEM);
    out.push_str("\",\"value\":");
    push_json_str(out, &r.client);
    out.push_str("}},\"requestor\":true}");
    if !r.org.is_empty() {
        out.push_str(",{\"who\":{\"identifier\":{\"system\":\"");
        out.push_str(ODS_SYSTEM);
        out.push_str("\",\"value\":");
        push_json_str(out, &r.org);
        out.push_str("}},\"requestor\":false}");
    }
    out.push_str("],\"source\":{\"observer\":{\"display\":\"carebridge\"}}");
    if r.what.is_some() || r.correlation.is_some() {
        out.push_str(",\"entity\":[");
        if let Some(w) = &r.what {
            out.push_str("{\"what\":{\"reference\":");
            push_json_str(out, w);
            out.push_str("}}");
        }
        if let Some(c) = &r.correlation {
            if r.what.is_some() {
                out.push(',');
            }
            out.push_str("{\"what\":{\"identifier\":{\"system\":\"");
            out.push_str(match r.subtype {
                "hl7-message" => "urn:carebridge:hl7-control-id",
                "mesh-message" => "urn:carebridge:mesh-message-id",
                _ => "urn:carebridge:correlation-id",
            });
            out.push_str("\",\"value\":");
            push_json_str(out, c);
            out.push_str("}}}");
        }
        out.push(']');
    }
    out.push('}');
}

/// `X-Correlation-ID` (else `X-Request-ID`), at most 200 characters of it.
fn correlation(headers: &HeaderMap) -> Option<&str> {
    [&crate::X_CORRELATION_ID, &crate::X_REQUEST_ID]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .map(|s| s.char_indices().nth(200).map_or(s, |(i, _)| &s[..i]))
}

fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    // Bytes, not `HeaderValue::to_str` (which checks each byte of the ~350-byte token on every request): a
    // token with unusual bytes simply fails verification.
    let v = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = v.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    Some(token.trim_ascii())
}

fn unauthorized(description: &str) -> Response {
    let mut res = crate::ApiError::new(
        StatusCode::UNAUTHORIZED,
        IssueType::Login,
        format!("a valid Bearer access token is required: {description}"),
    )
    .into_response();
    let challenge = format!(
        "Bearer realm=\"carebridge\", error=\"invalid_token\", error_description=\"{}\"",
        description.replace(['"', '\\'], "'")
    );
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        res.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    res
}

fn forbidden(scope: &str) -> Response {
    crate::ApiError::new(
        StatusCode::FORBIDDEN,
        IssueType::Forbidden,
        format!("the access token lacks the scope {scope} needed for this interaction"),
    )
    .into_response()
}

/// (subtype, action) of a request for its audit record.
fn interaction_of(need: &Need, method: &str) -> (&'static str, &'static str) {
    match need {
        Need::Bundle => ("transaction", "E"),
        Need::Admin => ("operation", "E"),
        Need::Scopes(list) | Need::CrossOrg(list) => match list.first().map(|(_, i)| *i) {
            Some(Interaction::Create) => ("create", "C"),
            Some(Interaction::Read) => ("read", "R"),
            Some(Interaction::Update) if method == "PATCH" => ("patch", "U"),
            Some(Interaction::Update) => ("update", "U"),
            Some(Interaction::Delete) => ("delete", "D"),
            Some(Interaction::Search) => ("search-type", "R"),
            None => ("operation", "E"),
        },
        Need::Open | Need::Authenticated => ("operation", "E"),
    }
}

/// `Type/id` of the resource a request or its response names (path, else `Location`).
fn subject_of<'a>(path: &'a str, res: &'a Response) -> Option<(&'a str, &'a str)> {
    let mut segs = path.strip_prefix("/fhir/")?.split('/');
    if let (Some(t), Some(id)) = (segs.next(), segs.next())
        && !id.is_empty()
        && !id.starts_with('_')
        && !id.starts_with('$')
    {
        return Some((t, id));
    }
    let loc = res.headers().get(header::LOCATION)?.to_str().ok()?;
    let after = loc.split("/fhir/").nth(1)?;
    let mut parts = after.split('/');
    Some((parts.next()?, parts.next()?))
}

/// The layer in front of every route: open routes pass; every other request needs a valid Bearer token of this
/// hub, of a client that is not revoked, within its rate limit, with the scope the interaction needs. Each
/// request (allowed or refused) is audited.
pub(crate) async fn layer<S: Store>(
    State(app): State<Arc<App<S>>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(guard) = app.config.auth.clone() else {
        return next.run(req).await;
    };
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut need = ::auth::required(method.as_str(), &path, req.uri().query().unwrap_or(""));
    if need == Need::Open {
        return next.run(req).await;
    }
    let (subtype, action) = interaction_of(&need, method.as_str());
    // A refusal: logged, audited (without a subject), answered with `res`.
    let refused = async |headers: &HeaderMap,
                         client: &str,
                         org: &str,
                         status: u16,
                         detail: &str| {
        tracing::info!(client = %client, method = %method, path = %path, status, reason = %detail, "request refused");
        guard
            .audit(&AuditLine {
                ms: now_ms(),
                client,
                org,
                subtype,
                action,
                status,
                what: None,
                correlation: correlation(headers),
                detail: Some(detail),
            })
            .await;
    };
    let verified = match bearer(req.headers()) {
        None => Err("no Bearer token".to_string()),
        Some(t) => guard.verify(t),
    };
    let caller = match verified {
        Ok(c) => c,
        Err(e) => {
            refused(req.headers(), "-", "", 401, &e).await;
            return unauthorized(&e);
        }
    };
    if let Some(bound) = &caller.cnf
        && !::auth::cert::matches(bound, peer_thumbprint(req.extensions()).as_deref())
    {
        let e = "the token is bound to a client certificate this connection did not present";
        refused(req.headers(), &caller.client_id, &caller.org, 401, e).await;
        return unauthorized(e);
    }
    let status = guard.client_status(&*app.store, &caller.client_id).await;
    if !status.active {
        refused(
            req.headers(),
            &caller.client_id,
            &caller.org,
            401,
            "client revoked or unknown",
        )
        .await;
        return unauthorized("the client has been revoked");
    }
    if let Some(wait) = guard.take(&caller.client_id, status.rate) {
        refused(
            req.headers(),
            &caller.client_id,
            &caller.org,
            429,
            "rate limit",
        )
        .await;
        let mut res = crate::ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            IssueType::TooCostly,
            format!("rate limit of {} requests per second exceeded", status.rate),
        )
        .into_response();
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(wait));
        return res;
    }
    // Bundles are decided per entry, and POST _search may carry _include in its body: read the body first.
    let needs_body = need == Need::Bundle || (method == "POST" && path.ends_with("/_search"));
    let mut req = if needs_body {
        let (parts, body) = req.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, crate::bundle::MAX_BODY_BYTES).await else {
            return crate::ApiError::bad_request("request body too large or unreadable")
                .into_response();
        };
        if need == Need::Bundle {
            need = bundle_need(&bytes);
        } else {
            let q = format!(
                "{}&{}",
                parts.uri.query().unwrap_or(""),
                String::from_utf8_lossy(&bytes)
            );
            need = ::auth::required(method.as_str(), &path, &q);
        }
        Request::from_parts(parts, Body::from(bytes))
    } else {
        req
    };
    if let Some(missing) = need.missing(&caller.scopes) {
        refused(
            req.headers(),
            &caller.client_id,
            &caller.org,
            403,
            &format!("missing scope {missing}"),
        )
        .await;
        return forbidden(&missing);
    }
    let corr = correlation(req.headers()).map(str::to_string);
    req.extensions_mut().insert(Caller {
        client_id: caller.client_id.clone(),
        org: caller.org.clone(),
        cross_org: caller.scopes.is_cross_org(),
    });
    let res = next.run(req).await;
    guard
        .audit(&AuditLine {
            ms: now_ms(),
            client: &caller.client_id,
            org: &caller.org,
            subtype,
            action,
            status: res.status().as_u16(),
            what: subject_of(&path, &res),
            correlation: corr.as_deref(),
            detail: None,
        })
        .await;
    res
}

/// Everything the entries of a Bundle need, together.
fn bundle_need(body: &[u8]) -> Need {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        // Not JSON: the Bundle handler refuses it without touching data.
        return Need::Authenticated;
    };
    let mut all = Vec::new();
    let mut cross_org = false;
    for entry in v
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let r = entry.get("request");
        let m = r
            .and_then(|r| r.get("method"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let u = r
            .and_then(|r| r.get("url"))
            .and_then(Value::as_str)
            .unwrap_or("");
        match ::auth::bundle_entry(m, u) {
            Need::Scopes(list) => all.extend(list),
            Need::CrossOrg(list) => {
                cross_org = true;
                all.extend(list)
            }
            Need::Admin => return Need::Admin,
            _ => {}
        }
    }
    if cross_org {
        Need::CrossOrg(all)
    } else {
        Need::Scopes(all)
    }
}

fn oauth_error(e: &OAuthError) -> Response {
    let body = json!({"error": e.code.as_str(), "error_description": e.description});
    let status = StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

/// `POST /oauth2/token`: client credentials with a `private_key_jwt` assertion (RFC 6749 4.4, RFC 7523).
pub(crate) async fn token<S: Store>(
    State(app): State<Arc<App<S>>>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<PeerInfo>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let presented = peer.and_then(|p| p.0.0.cert_thumbprint.clone());
    let Some(guard) = app.config.auth.clone() else {
        return oauth_error(&OAuthError::new(
            OAuthErrorCode::InvalidRequest,
            "authentication is off on this hub (--auth none)",
        ));
    };
    let corr = correlation(&headers);
    match issue(&app, &guard, &headers, &body, presented.as_deref()).await {
        Ok((client, body)) => {
            guard
                .audit(&AuditLine {
                    ms: now_ms(),
                    client: &client.id,
                    org: &client.ods,
                    subtype: "token",
                    action: "E",
                    status: 200,
                    what: None,
                    correlation: corr,
                    detail: None,
                })
                .await;
            (
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                body.to_string(),
            )
                .into_response()
        }
        Err((client, e)) => {
            tracing::info!(client = %client, error = %e, "token refused");
            guard
                .audit(&AuditLine {
                    ms: now_ms(),
                    client: &client,
                    org: "",
                    subtype: "token",
                    action: "E",
                    status: e.code.http_status(),
                    what: None,
                    correlation: corr,
                    detail: Some(&e.to_string()),
                })
                .await;
            oauth_error(&e)
        }
    }
}

async fn issue<S: Store>(
    app: &App<S>,
    guard: &Guard,
    headers: &HeaderMap,
    body: &[u8],
    presented: Option<&str>,
) -> Result<(Client, Value), (String, OAuthError)> {
    use OAuthErrorCode::*;
    let anon = |code, d: String| ("-".to_string(), OAuthError::new(code, d));
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct
        .to_ascii_lowercase()
        .starts_with("application/x-www-form-urlencoded")
    {
        return Err(anon(
            InvalidRequest,
            "the body must be application/x-www-form-urlencoded".into(),
        ));
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| anon(InvalidRequest, "the body is not UTF-8".into()))?;
    let mut form: HashMap<String, String> = HashMap::new();
    for (k, v) in parse_pairs(Some(text)) {
        if form.insert(k.clone(), v).is_some() {
            return Err(anon(InvalidRequest, format!("parameter {k} is repeated")));
        }
    }
    let param = |k: &str| form.get(k).map(String::as_str);
    match param("grant_type") {
        Some("client_credentials") => {}
        Some(g) => {
            return Err(anon(
                UnsupportedGrantType,
                format!("grant_type {g} is not supported (client_credentials)"),
            ));
        }
        None => return Err(anon(InvalidRequest, "grant_type is missing".into())),
    }
    if param("client_assertion_type") != Some(::auth::ASSERTION_TYPE) {
        return Err(anon(
            InvalidRequest,
            format!("client_assertion_type must be {}", ::auth::ASSERTION_TYPE),
        ));
    }
    let assertion = param("client_assertion")
        .ok_or_else(|| anon(InvalidRequest, "client_assertion is missing".into()))?;
    let jws = Jws::parse(assertion)
        .map_err(|e| anon(InvalidRequest, format!("client_assertion: {e}")))?;
    let alg = jws.alg().to_string();
    if alg != "RS512" && alg != "ES384" {
        return Err(anon(
            InvalidClient,
            format!("alg {alg:?} is not accepted (RS512 or ES384)"),
        ));
    }
    let iss = jws
        .claim_str("iss")
        .ok_or_else(|| anon(InvalidClient, "the assertion has no 'iss'".into()))?
        .to_string();
    let named = |code, d: String| (iss.clone(), OAuthError::new(code, d));
    let client = match app.store.kv_get(CLIENT_NAMESPACE, &iss).await {
        Ok(Some(t)) => Client::from_json(&t),
        Ok(None) => None,
        Err(e) => {
            return Err(named(
                InvalidRequest,
                format!("the client store is unavailable: {e}"),
            ));
        }
    }
    .ok_or_else(|| named(InvalidClient, format!("unknown client {iss}")))?;
    if client.revoked {
        return Err(named(
            InvalidClient,
            format!("client {iss} has been revoked"),
        ));
    }
    let kid = jws
        .kid()
        .ok_or_else(|| named(InvalidClient, "the assertion header has no 'kid'".into()))?;
    let jwks = Jwks::from_json(&client.jwks).map_err(|e| {
        named(
            InvalidClient,
            format!("the client's registered JWKS is unusable: {e}"),
        )
    })?;
    let key = match (jwks.find(kid), &client.jwks_url) {
        (Some(k), _) => k.clone(),
        (None, Some(url)) => guard
            .remote_key(url, kid)
            .await
            .map_err(|e| named(InvalidClient, e))?,
        (None, None) => {
            return Err(named(
                InvalidClient,
                format!("kid {kid} is not a registered key of {iss}"),
            ));
        }
    };
    if !key.verify(&alg, jws.signing_input.as_bytes(), &jws.signature) {
        return Err(named(
            InvalidClient,
            format!(
                "the assertion's {alg} signature does not verify with key {kid} (a {} key)",
                key.alg()
            ),
        ));
    }
    let now = now_s();
    let checked = ::auth::check_assertion_claims(&jws.claims, &guard.token_url, now)
        .map_err(|e| (iss.clone(), e))?;
    // RFC 8705: a client bound to a certificate authenticates over mutual TLS with it, too.
    if let Some(bound) = &client.cert_thumbprint
        && !::auth::cert::matches(bound, presented)
    {
        return Err(named(
            InvalidClient,
            match presented {
                None => format!(
                    "client {iss} is bound to a certificate: request tokens over mutual TLS with it"
                ),
                Some(_) => format!(
                    "the client certificate of this connection is not the one {iss} is bound to"
                ),
            },
        ));
    }
    let granted = Scopes::parse(&client.scopes).unwrap_or_default();
    let scope = match param("scope") {
        None | Some("") => granted.to_string(),
        Some(s) => {
            let asked = Scopes::parse(s).map_err(|e| named(InvalidScope, e))?;
            if !asked.is_within(&granted) {
                return Err(named(
                    InvalidScope,
                    format!("scope '{s}' exceeds what {iss} was granted ({granted})"),
                ));
            }
            asked.to_string()
        }
    };
    // Single use: remember the jti until the assertion expires.
    let jti_key = format!("{iss}|{}", checked.jti);
    let exp = checked.exp;
    let fresh = app
        .store
        .write(move |tx| remember_jti(tx, &jti_key, exp, now))
        .await
        .map_err(|e| {
            named(
                InvalidRequest,
                format!("could not record the assertion: {e}"),
            )
        })?;
    if !fresh {
        return Err(named(
            InvalidGrant,
            format!("the assertion's jti {} was already used", checked.jti),
        ));
    }
    let access = AccessClaims {
        client_id: client.id.clone(),
        org: client.ods.clone(),
        scope: scope.clone(),
        iat: now,
        exp: now + guard.token_lifetime_s,
        jti: uuid::Uuid::new_v4().simple().to_string(),
        cnf_x5t: client.cert_thumbprint.clone(),
    };
    let body = json!({
        "access_token": guard.key.mint(&access),
        "expires_in": guard.token_lifetime_s,
        "token_type": "Bearer",
        "scope": scope,
    });
    Ok((client, body))
}

/// Record a used `jti` (false when it was already used) and purge the ones whose assertions have expired.
fn remember_jti(tx: &mut dyn Tx, key: &str, exp: i64, now: i64) -> Result<bool, StoreError> {
    if tx.kv_get(JTI_NAMESPACE, key)?.is_some() {
        return Ok(false);
    }
    tx.kv_put(JTI_NAMESPACE, key, Some(&exp.to_string()))?;
    let minute = (exp + ::auth::LEEWAY_S) / 60 + 1;
    let bucket = minute.to_string();
    let mut list = tx
        .kv_get(JTI_BUCKET_NAMESPACE, &bucket)?
        .unwrap_or_default();
    if !list.is_empty() {
        list.push('\n');
    }
    list.push_str(key);
    tx.kv_put(JTI_BUCKET_NAMESPACE, &bucket, Some(&list))?;
    // Buckets of minutes that have passed hold only expired assertions.
    let current = now / 60;
    let cursor: i64 = tx
        .kv_get(JTI_BUCKET_NAMESPACE, "cursor")?
        .and_then(|c| c.parse().ok())
        .unwrap_or(current - 10);
    let from = cursor.max(current - 30);
    for m in from..current {
        let b = m.to_string();
        if let Some(keys) = tx.kv_get(JTI_BUCKET_NAMESPACE, &b)? {
            for k in keys.lines() {
                tx.kv_put(JTI_NAMESPACE, k, None)?;
            }
            tx.kv_put(JTI_BUCKET_NAMESPACE, &b, None)?;
        }
    }
    tx.kv_put(JTI_BUCKET_NAMESPACE, "cursor", Some(&current.to_string()))?;
    Ok(true)
}

/// `GET /fhir/AuditEvent`: the newest records first, filtered by `agent` (client id or ODS code), `entity`
/// (reference), `outcome`, `subtype`, `action`; `_count` (default 50, at most 1000). Scans at most the newest
/// 200 pages (each one batch of the writer).
pub(crate) async fn audit_search<S: Store>(
    State(app): State<Arc<App<S>>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, crate::ApiError> {
    let mut count = 50usize;
    let mut filters: Vec<(String, String)> = Vec::new();
    for (k, v) in parse_pairs(raw.as_deref()) {
        match k.as_str() {
            "_count" => {
                count = v
                    .parse::<usize>()
                    .map_err(|_| crate::ApiError::bad_request("_count must be a number"))?
                    .min(1000)
            }
            "agent" | "entity" | "outcome" | "subtype" | "action" => filters.push((k, v)),
            _ => {
                return Err(crate::ApiError::new(
                    StatusCode::BAD_REQUEST,
                    IssueType::NotSupported,
                    format!(
                        "AuditEvent search supports _count, agent, entity, outcome, subtype, action (not {k})"
                    ),
                ));
            }
        }
    }
    let last: u64 = app
        .store
        .kv_get(AUDIT_META_NAMESPACE, "page")
        .await?
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut out = String::from("[");
    let mut found = 0usize;
    let mut page = last;
    'pages: while page > 0 && found < count && last - page < 200 {
        let text = app
            .store
            .kv_get(AUDIT_NAMESPACE, &format!("{page:016}"))
            .await?
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate().rev() {
            if found >= count {
                break 'pages;
            }
            let Some(r) = AuditRecord::from_line(line) else {
                continue;
            };
            if !filters.iter().all(|(k, v)| r.matches(k, v)) {
                continue;
            }
            if found > 0 {
                out.push(',');
            }
            let id = format!("{page}-{i}");
            out.push_str("{\"fullUrl\":");
            push_json_str(&mut out, &format!("{}/AuditEvent/{id}", app.fhir_base()));
            out.push_str(",\"resource\":");
            push_audit_event(&mut out, &id, &r);
            out.push_str(",\"search\":{\"mode\":\"match\"}}");
            found += 1;
        }
        page -= 1;
    }
    out.push(']');
    let body = format!("{{\"resourceType\":\"Bundle\",\"type\":\"searchset\",\"entry\":{out}}}");
    Ok(([(header::CONTENT_TYPE, FHIR_JSON)], body).into_response())
}

/// `GET /fhir/AuditEvent/{id}` (`<page>-<index>`).
pub(crate) async fn audit_read<S: Store>(
    State(app): State<Arc<App<S>>>,
    Path(id): Path<String>,
) -> Result<Response, crate::ApiError> {
    let missing = || crate::ApiError::not_found(format!("AuditEvent/{id} does not exist"));
    let (page, index) = id.split_once('-').ok_or_else(missing)?;
    let (page, index) = match (page.parse::<u64>(), index.parse::<usize>()) {
        (Ok(p), Ok(i)) => (p, i),
        _ => return Err(missing()),
    };
    let text = app
        .store
        .kv_get(AUDIT_NAMESPACE, &format!("{page:016}"))
        .await?
        .ok_or_else(missing)?;
    let r = text
        .lines()
        .nth(index)
        .and_then(AuditRecord::from_line)
        .ok_or_else(missing)?;
    let mut out = String::new();
    push_audit_event(&mut out, &format!("{page}-{index}"), &r);
    Ok(([(header::CONTENT_TYPE, FHIR_JSON)], out).into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn record() -> AuditRecord {
        AuditRecord {
            ms: 1_764_000_000_123,
            client: "pas\t1".into(),
            org: "RXX01".into(),
            subtype: "delete",
            action: "D",
            status: 403,
            what: Some("Patient/abc".into()),
            correlation: Some("corr\n42".into()),
            detail: Some("missing scope system/Patient.d".into()),
        }
    }

    #[test]
    fn audit_lines_round_trip_and_render_as_audit_events() {
        let mut line = String::new();
        record().push_line(&mut line);
        assert_eq!(
            line.matches('\n').count(),
            1,
            "one line per record, whatever the fields hold"
        );
        let back = AuditRecord::from_line(line.trim_end_matches('\n')).unwrap();
        assert_eq!(&*back.client, "pas 1");
        assert_eq!(back.correlation.as_deref(), Some("corr 42"));
        assert_eq!(
            (back.subtype, back.action, back.status),
            ("delete", "D", 403)
        );
        assert!(back.matches("agent", "RXX01") && back.matches("outcome", "4"));
        assert!(back.matches("entity", "Patient/abc") && !back.matches("entity", "Patient/x"));
        let mut json = String::new();
        push_audit_event(&mut json, "7-3", &back);
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["resourceType"], "AuditEvent");
        assert_eq!(v["id"], "7-3");
        assert_eq!(v["outcome"], "4");
        assert_eq!(v["recorded"], "2025-11-24T16:00:00.123Z");
        assert_eq!(v["agent"][0]["who"]["identifier"]["value"], "pas 1");
        assert_eq!(v["agent"][0]["requestor"], true);
        assert_eq!(v["agent"][1]["who"]["identifier"]["system"], ODS_SYSTEM);
        assert_eq!(v["entity"][0]["what"]["reference"], "Patient/abc");
        assert_eq!(v["outcomeDesc"], "403 missing scope system/Patient.d");
        assert!(AuditRecord::from_line("not\ta record").is_none());
    }

    #[test]
    fn integers_and_bearer_tokens_are_read_without_the_formatting_machinery() {
        for n in [0i64, 7, 10, 403, 1_764_000_000_123, i64::MAX, -5] {
            let mut out = String::from("x");
            push_int(&mut out, n);
            assert_eq!(out, format!("x{n}"));
        }
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            bearer(&h).map(|t| String::from_utf8_lossy(t).into_owned())
        };
        assert_eq!(with("Bearer abc.def").as_deref(), Some("abc.def"));
        assert_eq!(with("bEARER  abc ").as_deref(), Some("abc"));
        assert_eq!(with("Basic abc"), None);
        assert_eq!(with("Bearer"), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[tokio::test]
    async fn the_audit_log_hands_its_lines_to_the_writer_once() {
        let log = AuditLog::new();
        let line = AuditLine {
            ms: 5,
            client: "c",
            org: "o",
            subtype: "read",
            action: "R",
            status: 200,
            what: Some(("Patient", "p1")),
            correlation: None,
            detail: None,
        };
        log.append(&line).await;
        log.append(&line).await;
        let (text, n) = std::mem::take(&mut *log.lock());
        assert_eq!(n, 2);
        assert_eq!(text, "5\tc\to\tread\tR\t200\tPatient/p1\t\t\n".repeat(2));
        assert!(log.lock().0.is_empty());
    }

    #[test]
    fn rate_buckets_refill() {
        let g = Guard::new(&"A".repeat(43), "http://hub.test", None).unwrap();
        assert_eq!(g.take("c", 0.0), None, "no limit");
        assert_eq!(g.take("c", 2.0), None);
        assert_eq!(g.take("c", 2.0), None);
        assert_eq!(g.take("c", 2.0), Some(1), "burst of one second used up");
        assert_eq!(g.take("other", 2.0), None, "per client");
    }
}
