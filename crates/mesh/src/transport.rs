//! How one HTTP exchange reaches MESH.
//!
//! Two transports, chosen once per client:
//! - [`Direct`] (the normal case): HTTP/1.1 straight over hyper's connection API, plain or rustls TLS (optional
//!   client certificate), with a small pool of kept-alive connections. A MESH client talks to one host, so it
//!   needs none of a general client's layers (URL re-parsing, redirect and retry policies, proxy matching);
//!   skipping them roughly halves the client's CPU per request.
//! - reqwest, when a proxy is set in the environment (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, either case):
//!   NHS networks often reach MESH through one, and reqwest implements proxies (CONNECT tunnels, `NO_PROXY`).
//!
//! Both follow no redirects (credentials go only to the configured host) and retry nothing themselves: retries
//! and the reconciliation of uncertain sends belong to [`crate::MeshClient`].

use crate::config::Mailbox;
use crate::error::{Error, Result};
use crate::request::{Method, Request};
use crate::response::Response;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Why one HTTP exchange produced no response.
pub(crate) enum Failure {
    /// The request certainly did not reach the server (connection refused, DNS, TLS handshake).
    NotSent(String),
    /// It may have: timeout, reset, broken body.
    Uncertain(String),
}

/// Kept-alive connections idle longer than this are closed rather than reused.
const IDLE: Duration = Duration::from_secs(60);
/// At most this many idle connections are kept per client.
const MAX_IDLE: usize = 8;

pub(crate) enum Transport {
    Direct(Direct),
    Proxied {
        http: reqwest::Client,
        base: reqwest::Url,
    },
}

/// The proxy variables reqwest reads from the environment.
const PROXY_VARS: [&str; 6] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
];

fn proxy_configured() -> bool {
    PROXY_VARS
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
}

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::Config(format!("reading {what} {}: {e}", path.display())))
}

pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let part = c.to_string();
        if !s.contains(&part) {
            s.push_str(": ");
            s.push_str(&part);
        }
        cur = c.source();
    }
    s
}

fn user_agent() -> String {
    format!(
        "carebridge-mesh/{};{};{}",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

impl Transport {
    pub(crate) fn new(mailbox: &Mailbox) -> Result<Transport> {
        let base = reqwest::Url::parse(&mailbox.base_url)
            .ok()
            .filter(|u| u.has_host() && !u.cannot_be_a_base())
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| {
                Error::Config(format!("MESH URL {} is not a base URL", mailbox.base_url))
            })?;
        if proxy_configured() {
            Ok(Transport::Proxied {
                http: reqwest_client(mailbox)?,
                base,
            })
        } else {
            Ok(Transport::Direct(Direct::new(mailbox, &base)?))
        }
    }

    /// One exchange. `authorization` is the request's fresh `NHSMESH` token.
    pub(crate) async fn execute(
        &self,
        req: &Request,
        authorization: String,
    ) -> std::result::Result<Response, Failure> {
        match self {
            Transport::Direct(d) => d.execute(req, authorization).await,
            Transport::Proxied { http, base } => proxied(http, base, req, authorization).await,
        }
    }
}

/// HTTP/1.1 over hyper's connection API to the one MESH host.
pub(crate) struct Direct {
    host: String,
    port: u16,
    /// `Host` header value.
    authority: http::HeaderValue,
    /// The base URL's path without its trailing slash ("" for the root).
    prefix: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    user_agent: http::HeaderValue,
    timeout: Duration,
    connect_timeout: Duration,
    idle: Mutex<Vec<(SendRequest<Full<Bytes>>, Instant)>>,
}

impl Direct {
    fn new(mailbox: &Mailbox, base: &reqwest::Url) -> Result<Direct> {
        let bad = || Error::Config(format!("MESH URL {} is not a base URL", mailbox.base_url));
        let port = base.port_or_known_default().ok_or_else(bad)?;
        // For connecting and TLS: an IPv6 literal without its brackets.
        let host = match base.host().ok_or_else(bad)? {
            url::Host::Domain(d) => d.to_string(),
            url::Host::Ipv4(ip) => ip.to_string(),
            url::Host::Ipv6(ip) => ip.to_string(),
        };
        let authority = match (base.host_str(), base.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            (None, _) => return Err(bad()),
        };
        let tls = if base.scheme() == "https" {
            let name = ServerName::try_from(host.clone())
                .map_err(|e| Error::Config(format!("MESH host name {host}: {e}")))?;
            Some((
                tokio_rustls::TlsConnector::from(Arc::new(tls_config(mailbox)?)),
                name,
            ))
        } else {
            None
        };
        Ok(Direct {
            port,
            authority: http::HeaderValue::from_str(&authority).map_err(|_| bad())?,
            prefix: base.path().trim_end_matches('/').to_string(),
            host,
            tls,
            user_agent: http::HeaderValue::from_str(&user_agent()).map_err(|_| bad())?,
            timeout: mailbox.timeout,
            connect_timeout: Duration::from_secs(30).min(mailbox.timeout),
            idle: Mutex::new(Vec::new()),
        })
    }

    fn build(
        &self,
        req: &Request,
        authorization: String,
    ) -> std::result::Result<http::Request<Full<Bytes>>, Failure> {
        let method = match req.method {
            Method::Get => http::Method::GET,
            Method::Post => http::Method::POST,
            Method::Put => http::Method::PUT,
        };
        let mut path = String::with_capacity(self.prefix.len() + req.path.len());
        path.push_str(&self.prefix);
        path.push_str(&req.path);
        let body = if req.method == Method::Get {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&req.body)
        };
        let mut b = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.authority.clone())
            .header(http::header::USER_AGENT, self.user_agent.clone())
            .header(http::header::AUTHORIZATION, authorization);
        for (n, v) in &req.headers {
            b = b.header(n.as_str(), v.as_str());
        }
        if req.method != Method::Get {
            b = b.header(http::header::CONTENT_LENGTH, body.len());
        }
        b.body(Full::new(body))
            .map_err(|e| Failure::NotSent(format!("building the request: {e}")))
    }

    /// An idle kept-alive connection, if one is still open and fresh.
    fn checkout(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((s, since)) = idle.pop() {
            if !s.is_closed() && since.elapsed() < IDLE {
                return Some(s);
            }
        }
        None
    }

    fn checkin(&self, s: SendRequest<Full<Bytes>>) {
        if s.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((s, Instant::now()));
        }
    }

    async fn connect(&self) -> std::result::Result<SendRequest<Full<Bytes>>, Failure> {
        let not_sent = |what: &str, e: &dyn std::error::Error| {
            Failure::NotSent(format!("{what} {}:{}: {}", self.host, self.port, chain(e)))
        };
        let work = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| not_sent("connecting to", &e))?;
            let _ = tcp.set_nodelay(true);
            let handshake = match &self.tls {
                None => http1(tcp).await,
                Some((connector, name)) => {
                    let stream = connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|e| not_sent("TLS handshake with", &e))?;
                    http1(stream).await
                }
            };
            handshake.map_err(|e| not_sent("HTTP handshake with", &e))
        };
        match tokio::time::timeout(self.connect_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(Failure::NotSent(format!(
                "connecting to {}:{}: timed out after {:?}",
                self.host, self.port, self.connect_timeout
            ))),
        }
    }

    async fn execute(
        &self,
        req: &Request,
        authorization: String,
    ) -> std::result::Result<Response, Failure> {
        let request = self.build(req, authorization)?;
        match tokio::time::timeout(self.timeout, self.exchange(request)).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Uncertain(format!(
                "no complete answer within {:?}",
                self.timeout
            ))),
        }
    }

    async fn exchange(
        &self,
        mut request: http::Request<Full<Bytes>>,
    ) -> std::result::Result<Response, Failure> {
        // A kept-alive connection may have been closed by the server meanwhile: when hyper gives the request
        // back unsent, it goes out on a fresh connection (the same rule as any HTTP client's pool).
        while let Some(mut s) = self.checkout() {
            if s.ready().await.is_err() {
                continue;
            }
            match s.try_send_request(request).await {
                Ok(resp) => return self.finish(s, resp).await,
                Err(mut e) => match e.take_message() {
                    Some(back) => request = back,
                    None => {
                        return Err(Failure::Uncertain(format!(
                            "sending the request: {}",
                            chain(e.error())
                        )));
                    }
                },
            }
        }
        let mut s = self.connect().await?;
        let resp = s
            .send_request(request)
            .await
            .map_err(|e| Failure::Uncertain(format!("sending the request: {}", chain(&e))))?;
        self.finish(s, resp).await
    }

    /// Read the whole answer, then give the connection back to the pool.
    async fn finish(
        &self,
        s: SendRequest<Full<Bytes>>,
        resp: http::Response<hyper::body::Incoming>,
    ) -> std::result::Result<Response, Failure> {
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| Failure::Uncertain(format!("reading the response body: {}", chain(&e))))?
            .to_bytes();
        self.checkin(s);
        let headers = parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        Ok(Response::new(parts.status.as_u16(), headers, body.into()))
    }
}

/// Start HTTP/1.1 on a connected stream; its connection task runs on the current runtime.
async fn http1<IO>(io: IO) -> hyper::Result<SendRequest<Full<Bytes>>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(send)
}

/// The rustls settings: the mailbox's CA bundle replacing the system roots when given (as the official client's
/// `verify=` does: MESH servers are issued by the NHS's own CAs), else the platform's verifier; the client
/// certificate when given; HTTP/1.1 by ALPN.
fn tls_config(mailbox: &Mailbox) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS settings: {e}")))?;
    let builder = match &mailbox.ca_bundle {
        Some(ca) => {
            let pem = read(ca, "CA bundle")?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert =
                    cert.map_err(|e| Error::Config(format!("CA bundle {}: {e}", ca.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| Error::Config(format!("CA bundle {}: {e}", ca.display())))?;
            }
            if roots.is_empty() {
                return Err(Error::Config(format!(
                    "CA bundle {} holds no certificate",
                    ca.display()
                )));
            }
            builder.with_root_certificates(roots)
        }
        None => {
            let verifier = rustls_platform_verifier::Verifier::new(provider)
                .map_err(|e| Error::Config(format!("the system's TLS roots: {e}")))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
        }
    };
    let mut config = match &mailbox.client_identity {
        Some((cert, key)) => {
            let certs_pem = read(cert, "client certificate")?;
            let certs = CertificateDer::pem_slice_iter(&certs_pem)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| {
                    Error::Config(format!("client certificate {}: {e}", cert.display()))
                })?;
            if certs.is_empty() {
                return Err(Error::Config(format!(
                    "client certificate {} holds no certificate",
                    cert.display()
                )));
            }
            let key_pem = read(key, "client key")?;
            let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| Error::Config(format!("client key {}: {e}", key.display())))?;
            builder.with_client_auth_cert(certs, key_der).map_err(|e| {
                Error::Config(format!(
                    "client certificate {} / key {}: {e}",
                    cert.display(),
                    key.display()
                ))
            })?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The reqwest client of the proxied transport (proxies from the environment, rustls, no redirects).
fn reqwest_client(mailbox: &Mailbox) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(mailbox.timeout)
        .connect_timeout(Duration::from_secs(30).min(mailbox.timeout))
        .pool_idle_timeout(IDLE)
        .no_gzip()
        .redirect(reqwest::redirect::Policy::none())
        .retry(reqwest::retry::never())
        .user_agent(user_agent());
    if let Some((cert, key)) = &mailbox.client_identity {
        let mut pem = read(cert, "client certificate")?;
        pem.push(b'\n');
        pem.extend_from_slice(&read(key, "client key")?);
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
            Error::Config(format!(
                "client certificate {} / key {}: {}",
                cert.display(),
                key.display(),
                chain(&e)
            ))
        })?;
        builder = builder.identity(identity);
    }
    if let Some(ca) = &mailbox.ca_bundle {
        let certs = reqwest::Certificate::from_pem_bundle(&read(ca, "CA bundle")?)
            .map_err(|e| Error::Config(format!("CA bundle {}: {}", ca.display(), chain(&e))))?;
        if certs.is_empty() {
            return Err(Error::Config(format!(
                "CA bundle {} holds no certificate",
                ca.display()
            )));
        }
        builder = builder.tls_certs_only(certs);
    }
    builder
        .build()
        .map_err(|e| Error::Config(format!("building the HTTP client: {}", chain(&e))))
}

async fn proxied(
    http: &reqwest::Client,
    base: &reqwest::Url,
    req: &Request,
    authorization: String,
) -> std::result::Result<Response, Failure> {
    let mut url = base.clone();
    let (path, query) = match req.path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (req.path.as_str(), None),
    };
    if url.path() == "/" {
        url.set_path(path);
    } else {
        let joined = format!("{}{path}", url.path().trim_end_matches('/'));
        url.set_path(&joined);
    }
    url.set_query(query);
    let method = match req.method {
        Method::Get => reqwest::Method::GET,
        Method::Post => reqwest::Method::POST,
        Method::Put => reqwest::Method::PUT,
    };
    let mut rb = http
        .request(method, url)
        .header("Authorization", authorization);
    for (n, v) in &req.headers {
        rb = rb.header(n.as_str(), v.as_str());
    }
    if req.method != Method::Get {
        rb = rb.body(req.body.clone());
    }
    let classify = |e: reqwest::Error| {
        let msg = chain(&e);
        if e.is_connect() || e.is_builder() {
            Failure::NotSent(msg)
        } else {
            Failure::Uncertain(msg)
        }
    };
    let resp = rb.send().await.map_err(classify)?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = resp
        .bytes()
        .await
        .map_err(|e| Failure::Uncertain(format!("reading the response body: {e}")))?
        .to_vec();
    Ok(Response::new(status, headers, body))
}
