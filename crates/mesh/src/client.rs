//! The HTTP shell: [`MeshClient`] runs the pure builders and parsers over reqwest (rustls, optional mutual TLS),
//! adds a fresh `NHSMESH` token to every attempt, retries what is safe to retry, and reconciles uncertain sends.
//!
//! Retries: connection failures, 425, 429 and 5xx are retried with a doubling backoff, except the first chunk of
//! a send (`POST /outbox`), which is never repeated blindly (a repeat could deliver the message twice). When its
//! outcome is uncertain (timeout or broken connection after the request may have been written, or a 5xx), the
//! client asks MESH for a message with the send's LocalID and resends only when there is none.

use crate::auth::{self, TokenInput};
use crate::chunk;
use crate::config::{Mailbox, MailboxConfig};
use crate::error::{Error, Result};
use crate::request::{self, ClientInfo, Request, SendMeta};
use crate::response::{self, InboundMessage, LookupResult, Response, Tracking};
use crate::transport::{Failure, Transport};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Options of one send. `workflow_id` is required; a LocalID is generated when absent.
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// `Mex-WorkflowID`.
    pub workflow_id: String,
    /// `Mex-Subject`.
    pub subject: Option<String>,
    /// `Mex-LocalID`; must be unique per message (it is how an uncertain send is reconciled).
    pub local_id: Option<String>,
    /// `Mex-FileName`.
    pub file_name: Option<String>,
    /// `Mex-Content-Type` of the payload.
    pub content_type: Option<String>,
    /// gzip the chunks: `None` compresses chunked messages only, `Some(b)` forces it on or off.
    pub compress: Option<bool>,
}

/// What a send did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// MESH message id.
    pub message_id: String,
    /// The LocalID used (generated when the options had none).
    pub local_id: String,
    /// Number of chunks uploaded.
    pub chunks: u32,
    /// Whether the chunks were gzipped.
    pub compressed: bool,
    /// True when the first chunk's outcome was uncertain and tracking by LocalID found the message.
    pub reconciled: bool,
}

/// How often and how patiently requests are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per request, first included (at least 1).
    pub attempts: u32,
    /// Delay before the second attempt; doubles per attempt.
    pub base_delay: Duration,
    /// Longest delay between attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }
}

/// An async MESH client for one mailbox.
pub struct MeshClient {
    transport: Transport,
    mailbox: Mailbox,
    count: AtomicU64,
    client_info: ClientInfo,
    retry: RetryPolicy,
}

impl std::fmt::Debug for MeshClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshClient")
            .field("mailbox", &self.mailbox)
            .finish_non_exhaustive()
    }
}

fn os_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

impl MeshClient {
    /// Build a client from a configured mailbox (secrets from the process environment, certificates from disk).
    pub fn new(config: &MailboxConfig) -> Result<MeshClient> {
        MeshClient::from_mailbox(config.resolve()?)
    }

    /// Build a client from a resolved mailbox.
    pub fn from_mailbox(mailbox: Mailbox) -> Result<MeshClient> {
        let transport = Transport::new(&mailbox)?;
        Ok(MeshClient {
            transport,
            mailbox,
            count: AtomicU64::new(0),
            client_info: ClientInfo {
                client_version: format!("carebridge-mesh=={}", env!("CARGO_PKG_VERSION")),
                os_name: std::env::consts::OS.to_string(),
                os_version: os_version(),
                os_architecture: std::env::consts::ARCH.to_string(),
            },
            retry: RetryPolicy::default(),
        })
    }

    /// Replace the retry policy (tests use short delays).
    pub fn with_retry(mut self, retry: RetryPolicy) -> MeshClient {
        self.retry = RetryPolicy {
            attempts: retry.attempts.max(1),
            ..retry
        };
        self
    }

    /// The mailbox id.
    pub fn mailbox(&self) -> &str {
        &self.mailbox.mailbox
    }

    /// The resolved mailbox settings.
    pub fn settings(&self) -> &Mailbox {
        &self.mailbox
    }

    /// The configured inbox poll interval.
    pub fn poll_interval(&self) -> Duration {
        self.mailbox.poll_interval
    }

    fn token(&self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let nonce = uuid::Uuid::new_v4().to_string();
        let timestamp = auth::timestamp(now);
        auth::authorization(&TokenInput {
            mailbox: &self.mailbox.mailbox,
            password: &self.mailbox.password,
            shared_key: &self.mailbox.shared_key,
            nonce: &nonce,
            count: self.count.fetch_add(1, Ordering::Relaxed),
            timestamp: &timestamp,
        })
    }

    /// One HTTP exchange with a fresh token.
    async fn execute(&self, req: &Request) -> Result<Response, Failure> {
        self.transport.execute(req, self.token()).await
    }

    /// Run a request that is safe to repeat, retrying connection failures, 425, 429 and 5xx.
    /// Returns the response and how many attempts it took.
    async fn call(&self, req: &Request) -> Result<(Response, u32)> {
        let mut attempt = 1;
        loop {
            let last = attempt >= self.retry.attempts;
            match self.execute(req).await {
                Ok(resp) if !last && retryable(resp.status) => {}
                Ok(resp) => return Ok((resp, attempt)),
                Err(Failure::NotSent(e) | Failure::Uncertain(e)) if last => {
                    return Err(Error::Transport(format!("{e} (after {attempt} attempts)")));
                }
                Err(_) => {}
            }
            tokio::time::sleep(self.retry.delay(attempt)).await;
            attempt += 1;
        }
    }

    /// Check that MESH is reachable and accepts this mailbox's credentials.
    pub async fn handshake(&self) -> Result<()> {
        let (resp, _) = self
            .call(&request::handshake(
                &self.mailbox.mailbox,
                &self.client_info,
            ))
            .await?;
        response::parse_handshake(&resp)
    }

    /// Send `payload` to mailbox `to`; returns the MESH message id.
    pub async fn send(&self, to: &str, payload: &[u8], opts: SendOptions) -> Result<String> {
        self.send_detailed(to, payload, opts)
            .await
            .map(|s| s.message_id)
    }

    /// Send `payload` to mailbox `to`, chunked above the configured chunk size, and report what was done.
    pub async fn send_detailed(&self, to: &str, payload: &[u8], opts: SendOptions) -> Result<Sent> {
        let local_id = opts
            .local_id
            .clone()
            .filter(|l| !l.trim().is_empty())
            .unwrap_or_else(|| format!("carebridge-{}", uuid::Uuid::new_v4()));
        let parts = chunk::split(payload, self.mailbox.chunk_size);
        let total = u32::try_from(parts.len())
            .map_err(|_| Error::Invalid("payload needs more than 2^32 chunks".into()))?;
        let compress = opts.compress.unwrap_or(total > 1);
        let encode = |p: &[u8]| if compress { chunk::gzip(p) } else { p.to_vec() };
        let checksum = chunk::checksum(payload);
        let meta = SendMeta {
            to,
            workflow_id: &opts.workflow_id,
            subject: opts.subject.as_deref(),
            local_id: &local_id,
            file_name: opts.file_name.as_deref(),
            content_type: opts.content_type.as_deref(),
            checksum: Some(&checksum),
        };
        let first = request::send_first(
            &self.mailbox.mailbox,
            &meta,
            encode(parts.first().copied().unwrap_or_default()),
            compress,
            total,
        )?;
        let (message_id, reconciled) = self.send_first_chunk(&first, &local_id).await?;
        for (i, part) in parts.iter().enumerate().skip(1) {
            let number = i as u32 + 1;
            let req = request::send_chunk(
                &self.mailbox.mailbox,
                &message_id,
                number,
                total,
                encode(part),
                compress,
            );
            let (resp, attempts) = self.call(&req).await?;
            if resp.status == 423 && attempts > 1 && number == total {
                // An earlier attempt of the last chunk was stored and closed the upload; the repeat is refused
                // as "finalised". That is the success we were waiting for.
                continue;
            }
            response::parse_chunk_upload(&resp).map_err(|e| match e {
                Error::Refused { status, body } => Error::Refused {
                    status,
                    body: Some(crate::error::MeshErrorBody {
                        description: format!(
                            "chunk {number}/{total} of message {message_id}: {}",
                            body.map(|b| b.to_string()).unwrap_or_default()
                        ),
                        ..Default::default()
                    }),
                },
                other => other,
            })?;
        }
        Ok(Sent {
            message_id,
            local_id,
            chunks: total,
            compressed: compress,
            reconciled,
        })
    }

    /// Upload the first chunk; never repeated unless MESH proves it did not get it.
    async fn send_first_chunk(&self, req: &Request, local_id: &str) -> Result<(String, bool)> {
        let mut attempt = 1;
        loop {
            let last = attempt >= self.retry.attempts;
            let reason = match self.execute(req).await {
                // Rate limited or too early: nothing was stored.
                Ok(resp) if (resp.status == 425 || resp.status == 429) && !last => None,
                Ok(resp) if resp.status >= 500 => Some(format!("HTTP {}", resp.status)),
                Ok(resp) => return response::parse_send(&resp).map(|id| (id, false)),
                Err(Failure::NotSent(e)) if last => {
                    return Err(Error::Transport(format!("{e} (after {attempt} attempts)")));
                }
                Err(Failure::NotSent(_)) => None,
                Err(Failure::Uncertain(e)) => Some(e),
            };
            tokio::time::sleep(self.retry.delay(attempt)).await;
            if let Some(reason) = reason {
                // The server may have stored the message: ask before sending it again.
                match self.track_local_id(local_id).await {
                    Ok(Some(t)) => return Ok((t.message_id, true)),
                    Ok(None) if !last => {}
                    Ok(None) => {
                        return Err(Error::Transport(format!(
                            "{reason}; not stored by MESH after {attempt} attempts"
                        )));
                    }
                    Err(e) => {
                        return Err(Error::SendUncertain {
                            local_id: local_id.to_string(),
                            reason: format!("{reason}; tracking by LocalID failed: {e}"),
                        });
                    }
                }
            }
            attempt += 1;
        }
    }

    /// Message ids in the inbox, following `links.next` over every page, up to `max` ids when given.
    pub async fn inbox(&self, max: Option<usize>) -> Result<Vec<String>> {
        let page_size = max.filter(|m| *m < 500).map(|m| m.max(10) as u32);
        let mut req = request::inbox(&self.mailbox.mailbox, page_size);
        let mut ids = Vec::new();
        let mut seen_links = HashSet::new();
        loop {
            let (resp, _) = self.call(&req).await?;
            let page = response::parse_inbox(&resp)?;
            ids.extend(page.messages);
            if let Some(m) = max
                && ids.len() >= m
            {
                ids.truncate(m);
                return Ok(ids);
            }
            let Some(next) = page.next else {
                return Ok(ids);
            };
            if !seen_links.insert(next.clone()) {
                return Err(Error::Malformed(format!(
                    "inbox: links.next '{next}' repeats (paging loop)"
                )));
            }
            req = request::inbox_next(&self.mailbox.mailbox, &next)?;
        }
    }

    /// Download a message: every chunk, joined and gunzipped, checksum verified when it is ours.
    pub async fn download(&self, message_id: &str) -> Result<InboundMessage> {
        let mb = &self.mailbox.mailbox;
        let (resp, _) = self.call(&request::download(mb, message_id, 1)).await?;
        let first = response::parse_download(&resp, 1, None)?;
        let total = first.range.total;
        let mut chunks = vec![first];
        for n in 2..=total {
            let (resp, _) = self.call(&request::download(mb, message_id, n)).await?;
            chunks.push(response::parse_download(&resp, n, Some(total))?);
        }
        response::assemble(message_id, chunks)
    }

    /// Acknowledge a downloaded message (removes it from the inbox).
    pub async fn ack(&self, message_id: &str) -> Result<()> {
        let (resp, _) = self
            .call(&request::acknowledge(&self.mailbox.mailbox, message_id))
            .await?;
        response::parse_ack(&resp)
    }

    /// Tracking of a message this mailbox sent, by message id.
    pub async fn track(&self, message_id: &str) -> Result<Tracking> {
        let (resp, _) = self
            .call(&request::track(&self.mailbox.mailbox, message_id))
            .await?;
        response::parse_tracking(&resp)
    }

    /// Tracking by LocalID: `None` when this mailbox sent no message with it.
    pub async fn track_local_id(&self, local_id: &str) -> Result<Option<Tracking>> {
        let (resp, _) = self
            .call(&request::track_local_id(&self.mailbox.mailbox, local_id))
            .await?;
        response::parse_tracking_local(&resp)
    }

    /// Mailboxes that receive `workflow_id` for the organisation `ods_code`.
    pub async fn lookup(&self, ods_code: &str, workflow_id: &str) -> Result<Vec<LookupResult>> {
        let (resp, _) = self.call(&request::lookup(ods_code, workflow_id)).await?;
        response::parse_lookup(&resp)
    }
}

fn retryable(status: u16) -> bool {
    matches!(status, 425 | 429 | 500 | 502 | 503 | 504)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy {
            attempts: 5,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(350),
        };
        assert_eq!(p.delay(1), Duration::from_millis(100));
        assert_eq!(p.delay(2), Duration::from_millis(200));
        assert_eq!(p.delay(3), Duration::from_millis(350));
        assert_eq!(p.delay(40), Duration::from_millis(350));
    }

    #[test]
    fn retryable_statuses() {
        for s in [425, 429, 500, 502, 503, 504] {
            assert!(retryable(s));
        }
        for s in [200, 202, 400, 403, 404, 410, 417, 423] {
            assert!(!retryable(s));
        }
    }
}
