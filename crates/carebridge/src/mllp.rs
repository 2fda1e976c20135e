//! The HL7 v2 MLLP listener and client.
//!
//! Listener: every connection is read through `hl7::mllp::Decoder` (bounded by the maximum message size);
//! each message is handed to `hl7_adapter::Ingest`, which commits its effect and record before returning the
//! ACK, so an ACK is written to the socket only after the commit is durable. Messages of one connection are
//! applied in the order they arrive, also when the sender sends ahead of its ACKs: up to [`PIPELINE`] of them
//! are then in flight and share the store's write batches, and their ACKs go back in the same order. A store
//! failure closes the connection without an ACK (the sender resends; the resend is deduplicated); a sender that
//! closes its side still gets the ACKs of what it sent. Idle connections are closed after the idle timeout.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use hl7_adapter::Ingest;
use store::Store;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::{MllpConfig, TlsFiles};

/// A TLS acceptor from PEM files; with a client CA, clients must present a certificate it signed.
pub fn tls_acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor> {
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(
        tls_server_config(files)?,
    )))
}

/// The rustls server configuration of a listener (shared by MLLP and HTTP, which adds ALPN).
pub fn tls_server_config(files: &TlsFiles) -> Result<tokio_rustls::rustls::ServerConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .with_context(|| format!("reading {}", files.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing the certificates in {}", files.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("reading the private key in {}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("reading {}", ca.display()))?
            {
                roots
                    .add(c.with_context(|| format!("parsing {}", ca.display()))?)
                    .with_context(|| format!("adding a CA from {}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .context("building the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(certs, key)
        .context("the TLS certificate and key do not match")
}

/// Accept connections until `stop` turns true.
pub async fn serve<S: Store>(
    listener: TcpListener,
    ingest: Arc<Ingest<S>>,
    cfg: MllpConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
    audit: Option<Arc<api::auth::AuditLog>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let (ingest, cfg, stop, tls, audit) = (
                    ingest.clone(),
                    cfg.clone(),
                    stop.clone(),
                    tls.clone(),
                    audit.clone(),
                );
                tokio::spawn(async move {
                    let result = match tls {
                        Some(acceptor) => {
                            match tokio::time::timeout(cfg.idle_timeout, acceptor.accept(stream))
                                .await
                            {
                                Ok(Ok(tls_stream)) => {
                                    connection(tls_stream, ingest, cfg, audit, stop).await
                                }
                                Ok(Err(e)) => Err(anyhow!("TLS handshake refused: {e}")),
                                Err(_) => Err(anyhow!("TLS handshake timed out")),
                            }
                        }
                        None => connection(stream, ingest, cfg, audit, stop).await,
                    };
                    if let Err(e) = result {
                        tracing::info!(%peer, error = %e, "MLLP connection closed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "MLLP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Messages of one connection that may be in flight at once: read and handed to the store while earlier
/// ones are still being committed. A sender that waits for each ACK (most engines) has one in flight; one
/// that sends ahead gets its messages committed in the same write batches. Beyond this many the connection
/// stops reading until the oldest is acknowledged.
const PIPELINE: usize = 32;

/// One message's way from frame to ACK text.
type Pending<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<String>> + Send + 'a>>;

/// The messages of a connection in arrival order, each still running or finished with its ACK.
enum InFlight<'a> {
    Running(Pending<'a>),
    Done(Result<String>),
}

/// Poll every running message, oldest first, and return the ACKs (or the failure) that are now ready at the
/// front of the queue, in order. Ready when at least one is.
///
/// Order: a message's future is first polled only after every earlier one has been polled at least once
/// (new ones are pushed at the back, and each pass polls front to back). Its first poll runs up to handing
/// its write to the store's writer queue, which is first come first served, so messages of one connection
/// are applied in the order they arrived even when several are in flight. Cancel-safe: the futures stay in
/// the queue.
fn ready_acks<'q, 'a>(
    queue: &'q mut std::collections::VecDeque<InFlight<'a>>,
) -> impl std::future::Future<Output = Vec<Result<String>>> + 'q {
    std::future::poll_fn(move |cx| {
        for item in queue.iter_mut() {
            if let InFlight::Running(f) = item
                && let std::task::Poll::Ready(r) = f.as_mut().poll(cx)
            {
                *item = InFlight::Done(r);
            }
        }
        let mut out = Vec::new();
        while matches!(queue.front(), Some(InFlight::Done(_))) {
            if let Some(InFlight::Done(r)) = queue.pop_front() {
                out.push(r);
            }
        }
        if out.is_empty() {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(out)
        }
    })
}

/// Handle one decoded frame (or a framing error): the ACK to send once the message's effect is durable.
async fn one_message<S: Store>(
    frame: std::result::Result<Vec<u8>, hl7::mllp::FrameError>,
    ingest: &Ingest<S>,
    audit: Option<&api::auth::AuditLog>,
) -> Result<String> {
    match frame {
        Ok(bytes) => {
            let started = std::time::Instant::now();
            let handled = ingest
                .handle(&bytes)
                .await
                .map_err(|e| anyhow!("store failure, message not acknowledged: {e}"))?;
            tracing::debug!(
                message_type = %handled.message_type,
                outcome = handled.outcome.as_str(),
                duplicate = handled.duplicate,
                micros = started.elapsed().as_micros() as u64,
                "HL7 message"
            );
            if let Some(log) = audit {
                audit_message(log, &handled).await;
            }
            Ok(handled.ack)
        }
        Err(e) => {
            let err = hl7::ParseError {
                code: hl7::ErrorCode::SegmentSequence,
                segment: None,
                field: None,
                message: format!("MLLP frame refused: {e}"),
            };
            Ok(hl7::reject_unparseable(
                b"",
                "ACKFRAME",
                &hl7_adapter::dtm::format_ms(now_ms()),
                &err,
            ))
        }
    }
}

async fn connection<S: Store, IO: AsyncRead + AsyncWrite + Unpin>(
    mut stream: IO,
    ingest: Arc<Ingest<S>>,
    cfg: MllpConfig,
    audit: Option<Arc<api::auth::AuditLog>>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut decoder = hl7::mllp::Decoder::new(cfg.max_message_size);
    let mut buf = vec![0u8; 64 * 1024];
    let mut queue: std::collections::VecDeque<InFlight<'_>> = std::collections::VecDeque::new();
    // `stopping`: the hub is shutting down, start nothing new. `eof`: the sender closed its side, so start what
    // it sent and read no more. Either way, what is in flight is finished and acknowledged before returning.
    let (mut stopping, mut eof) = (false, false);
    loop {
        while !stopping
            && queue.len() < PIPELINE
            && let Some(frame) = decoder.next_frame()
        {
            queue.push_back(InFlight::Running(Box::pin(one_message(
                frame,
                &ingest,
                audit.as_deref(),
            ))));
        }
        if queue.is_empty() {
            if stopping || eof {
                return Ok(());
            }
            // Nothing in flight: wait for bytes, the idle timeout or the stop signal.
            let read = tokio::select! {
                r = tokio::time::timeout(cfg.idle_timeout, stream.read(&mut buf)) => r,
                _ = stop.changed() => return Ok(()),
            };
            match read {
                Err(_) => bail!("idle for {} s", cfg.idle_timeout.as_secs()),
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(n)) => decoder.feed(buf.get(..n).unwrap_or_default()),
                Ok(Err(e)) => return Err(e.into()),
            }
            continue;
        }
        // Messages in flight: send ACKs as the oldest finish; meanwhile keep reading while there is room, so
        // that messages sent ahead join the store's next write batch.
        let reading = !stopping && !eof && queue.len() < PIPELINE;
        tokio::select! {
            acks = ready_acks(&mut queue) => {
                for ack in acks {
                    stream.write_all(&hl7::mllp::frame(ack?.as_bytes())).await?;
                }
            }
            r = stream.read(&mut buf), if reading => match r {
                Ok(0) => eof = true,
                Ok(n) => decoder.feed(buf.get(..n).unwrap_or_default()),
                Err(e) => return Err(e.into()),
            },
            _ = stop.changed(), if !stopping => stopping = true,
        }
    }
}

/// The audit line of one message: who sent it, its control id, its type and the ACK code (never its content).
async fn audit_message(log: &api::auth::AuditLog, h: &hl7_adapter::Handled) {
    use hl7_adapter::Outcome;
    let (code, status) = match h.outcome {
        Outcome::Applied | Outcome::Stale | Outcome::Parked => ("AA", 200),
        Outcome::Error | Outcome::DeadLetter => ("AE", 422),
        Outcome::Rejected => ("AR", 400),
    };
    let sender = format!("{}^{}", h.sending_application, h.sending_facility);
    let detail = format!(
        "{} {code} {}{}",
        h.message_type,
        h.outcome.as_str(),
        if h.duplicate { " duplicate" } else { "" }
    );
    log.record_message(&api::auth::MessageAudit {
        channel: api::auth::Channel::Hl7,
        sender: &sender,
        org: &h.sending_facility,
        message_id: &h.control_id,
        status,
        detail: &detail,
    })
    .await;
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// An MLLP client connection: send one message, wait for its ACK.
pub struct Client {
    stream: TcpStream,
    decoder: hl7::mllp::Decoder,
    timeout: Duration,
}

impl Client {
    pub async fn connect(addr: &str, timeout: Duration) -> Result<Client> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connecting to {addr} timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
        let _ = stream.set_nodelay(true);
        Ok(Client {
            stream,
            decoder: hl7::mllp::Decoder::new(16 << 20),
            timeout,
        })
    }

    /// Send `message` (encoded HL7) and return the raw ACK.
    pub async fn send(&mut self, message: &[u8]) -> Result<Vec<u8>> {
        self.stream.write_all(&hl7::mllp::frame(message)).await?;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if let Some(frame) = self.decoder.next_frame() {
                return frame.map_err(|e| anyhow!("bad MLLP frame from peer: {e}"));
            }
            let n = tokio::time::timeout(self.timeout, self.stream.read(&mut buf))
                .await
                .map_err(|_| anyhow!("no ACK within {} s", self.timeout.as_secs()))??;
            if n == 0 {
                bail!("the peer closed the connection before acknowledging");
            }
            self.decoder.feed(buf.get(..n).unwrap_or_default());
        }
    }
}

/// Every second, apply parked messages whose appointment appeared by another route and dead-letter those
/// past their deadline.
pub async fn sweep_parked<S: Store>(ingest: Arc<Ingest<S>>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
        if let Err(e) = ingest.sweep().await {
            tracing::warn!(error = %e, "sweeping parked HL7 messages failed");
        }
    }
}

/// Deliver one outbox event to an MLLP endpoint as an SIU (appointment events) or ADT A28/A31 (patient
/// events) message: AA/CA = delivered, AE/CE or no ACK = retry, AR/CR = dead at once. Events with no HL7
/// equivalent (other resource types) count as delivered without sending anything.
pub async fn deliver<S: Store>(
    store: &S,
    cfg: &crate::deliver::Config,
    addr: &str,
    event: &store::Event,
) -> Result<u16, (Option<u16>, Option<i64>, String, bool)> {
    use hl7_adapter::outbound;
    use store::ResourceType as RT;
    let fail = |e: String| (None, None, e, false);
    let internal = |e: store::StoreError| (None, None, format!("hub error: {e}"), false);
    let version = store
        .vread(event.rtype, &event.id, event.version)
        .await
        .map_err(internal)?
        .filter(|v| !v.deleted);
    let Some(version) = version else {
        return Ok(200);
    };
    let resource: serde_json::Value =
        serde_json::from_str(&version.json).map_err(|e| fail(e.to_string()))?;
    let env = outbound::Envelope::default();
    let control_id = format!("CB{}", event.seq);
    let now = event.time_ms;
    let message = match (
        event.rtype,
        outbound::siu_trigger(&event.kind),
        outbound::adt_trigger(&event.kind),
    ) {
        (RT::Appointment, Some(trigger), _) => {
            let mut patient = None;
            let mut actors = Vec::new();
            for p in resource["participant"].as_array().into_iter().flatten() {
                let Some(reference) = p["actor"]["reference"].as_str() else {
                    continue;
                };
                let Some((ty, id)) = reference.split_once('/') else {
                    continue;
                };
                let Some(rtype) = RT::parse(ty) else { continue };
                let found = store
                    .read(rtype, id)
                    .await
                    .map_err(internal)?
                    .filter(|s| !s.deleted);
                let Some(found) = found else { continue };
                let json: serde_json::Value =
                    serde_json::from_str(&found.json).map_err(|e| fail(e.to_string()))?;
                if rtype == RT::Patient {
                    patient = Some(json);
                } else {
                    actors.push((reference.to_owned(), json));
                }
            }
            outbound::siu(
                &env,
                trigger,
                &control_id,
                now,
                &resource,
                patient.as_ref(),
                &actors,
            )
        }
        (RT::Patient, _, Some(trigger)) => {
            outbound::adt(&env, trigger, &control_id, now, &resource)
        }
        _ => return Ok(200),
    };
    let mut client = Client::connect(addr, cfg.timeout)
        .await
        .map_err(|e| fail(format!("{e:#}")))?;
    let ack = client
        .send(message.as_bytes())
        .await
        .map_err(|e| fail(format!("{e:#}")))?;
    let parsed =
        hl7::Message::parse(&ack).map_err(|e| fail(format!("unreadable ACK: {}", e.message)))?;
    let code = parsed.get("MSA-1").unwrap_or_default();
    let text = parsed
        .get("ERR-8")
        .or_else(|| parsed.get("MSA-3"))
        .unwrap_or_default();
    match code.as_str() {
        "AA" | "CA" => Ok(200),
        "AR" | "CR" => Err((
            None,
            None,
            format!("the receiver rejected the message ({code}): {text}"),
            true,
        )),
        other => Err((
            None,
            None,
            format!("the receiver answered {other}: {text}"),
            false,
        )),
    }
}
