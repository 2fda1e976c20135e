//! MESH outbound: the `mesh://MAILBOX?workflow_id=WF[&from=MAILBOX]` channel of `message` Subscriptions.
//!
//! The delivery runner (`deliver.rs`) hands each due delivery of such a subscription to [`deliver`], so
//! per-subject order, retries and dead letters are the runner's. One delivery is one MESH message: the resource
//! version as FHIR JSON (`channel.payload` absent or `application/fhir+json`), or the CloudEvent of the event
//! (`application/cloudevents+json`, also used for deletions, which have no resource to send); any other payload
//! (HL7 v2 over MESH is not built yet) makes the delivery a dead letter at once.
//!
//! Invariants:
//! - the `Mex-LocalID` is stable per (subscription, event seq) ([`local_id`]), so an attempt whose outcome is
//!   uncertain is settled by tracking instead of sending again: the client tracks within one attempt, and an
//!   attempt that may follow an unrecorded one (a retry, or a delivery older than this process) asks MESH for
//!   the LocalID before sending;
//! - delivered means MESH accepted the message (202 and a message id); the id is recorded in key-value
//!   namespace [`NS`] (`SUBSCRIPTION/SEQ`) and [`BY_ID_NS`] (message id -> `SUBSCRIPTION/SEQ`, so a REPORT
//!   about it names the delivery) before the runner marks the delivery delivered.

use std::sync::{Arc, OnceLock};

use mesh::{MeshClient, SendOptions};
use serde_json::json;
use store::{Delivery, Event, Store};

/// Key-value namespace of sent messages, keyed `SUBSCRIPTION/SEQ`.
pub const NS: &str = "mesh-outbound";
/// Key-value namespace mapping a sent MESH message id to its `SUBSCRIPTION/SEQ`.
pub const BY_ID_NS: &str = "mesh-outbound-id";

/// The configured mailboxes, installed once by `serve` before the delivery runner starts. A process-wide
/// registry keeps the runner's configuration untouched by MESH.
static SENDERS: OnceLock<Senders> = OnceLock::new();

struct Senders {
    clients: Vec<Arc<MeshClient>>,
    /// Deliveries created before this instant may have been attempted by an earlier process.
    started_ms: i64,
}

/// Make the configured mailboxes available to `mesh://` deliveries (the first one is the default sender).
pub fn install(clients: Vec<Arc<MeshClient>>) {
    let _ = SENDERS.set(Senders {
        clients,
        started_ms: now_ms(),
    });
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A parsed `mesh://` endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Recipient mailbox (upper case).
    pub to: String,
    /// `Mex-WorkflowID`.
    pub workflow_id: String,
    /// Sending mailbox; `None` means the first configured one.
    pub from: Option<String>,
}

/// Parse what follows `mesh://`: `MAILBOX?workflow_id=WF[&from=MAILBOX]`.
pub fn parse_endpoint(rest: &str) -> Result<Target, String> {
    let (mailbox, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mailbox = mailbox.trim_end_matches('/');
    let mut workflow_id = None;
    let mut from = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v);
        match k {
            "workflow_id" if !v.is_empty() => workflow_id = Some(v),
            "from" if !v.is_empty() => from = Some(v.to_ascii_uppercase()),
            _ => return Err(format!("unknown or empty parameter '{k}' in mesh://{rest}")),
        }
    }
    if mailbox.is_empty() || !mailbox.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(format!("'mesh://{rest}' names no mailbox"));
    }
    let workflow_id = workflow_id.ok_or_else(|| format!("'mesh://{rest}' has no workflow_id"))?;
    Ok(Target {
        to: mailbox.to_ascii_uppercase(),
        workflow_id,
        from,
    })
}

/// `%XX` escapes decoded (a malformed escape is kept as written).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `Mex-LocalID` of a delivery: the same for every attempt of it, different for every other delivery.
pub fn local_id(subscription: &str, seq: i64) -> String {
    format!("carebridge-{subscription}-{seq}")
}

/// (HTTP status, Retry-After in ms, error text, permanent): the runner's `SendError`.
type SendError = (Option<u16>, Option<i64>, String, bool);

/// Send one delivery to a `mesh://` endpoint (`rest` is what follows the scheme). Ok = MESH accepted it.
pub async fn deliver<S: Store>(
    store: &S,
    cfg: &crate::deliver::Config,
    subscription: &str,
    rest: &str,
    payload: Option<&str>,
    d: &Delivery,
    event: &Event,
) -> Result<u16, SendError> {
    let fail = |e: String| (None, None, e, false);
    let internal = |e: store::StoreError| (None, None, format!("hub error: {e}"), false);
    let target = parse_endpoint(rest).map_err(|e| (None, None, e, true))?;
    let senders = SENDERS.get().ok_or_else(|| {
        fail("no MESH mailbox is configured ([[mesh.mailboxes]] in --config)".into())
    })?;
    let client = match &target.from {
        Some(from) => senders
            .clients
            .iter()
            .find(|c| c.mailbox().eq_ignore_ascii_case(from))
            .ok_or_else(|| fail(format!("mailbox {from} is not configured")))?,
        None => senders
            .clients
            .first()
            .ok_or_else(|| fail("no MESH mailbox is configured".into()))?,
    };
    if let Some(other) =
        payload.filter(|p| !matches!(*p, "application/fhir+json" | "application/cloudevents+json"))
    {
        return Err((
            None,
            None,
            format!(
                "channel.payload '{other}' cannot be sent over MESH (use application/fhir+json or \
                 application/cloudevents+json)"
            ),
            true,
        ));
    }
    let record_key = format!("{subscription}/{}", d.seq);
    if store
        .kv_get(NS, &record_key)
        .await
        .map_err(internal)?
        .is_some()
    {
        // Sent and recorded by an earlier attempt whose outcome was not recorded.
        return Ok(202);
    }
    let local = local_id(subscription, d.seq);
    if d.attempts > 0 || d.created_ms < senders.started_ms {
        // An earlier attempt may have reached MESH without its outcome being recorded.
        match client.track_local_id(&local).await {
            Ok(Some(t)) => {
                record(
                    store,
                    &record_key,
                    &t.message_id,
                    &local,
                    &target,
                    client,
                    0,
                    true,
                )
                .await
                .map_err(internal)?;
                return Ok(202);
            }
            Ok(None) => {}
            Err(e) => {
                return Err(fail(format!(
                    "tracking LocalID {local} before resending: {e}"
                )));
            }
        }
    }
    let version = store
        .vread(event.rtype, &event.id, event.version)
        .await
        .map_err(internal)?
        .filter(|v| !v.deleted);
    let (body, content_type, file_name) = match (payload, &version) {
        (None | Some("application/fhir+json"), Some(v)) => (
            v.json.clone(),
            "application/fhir+json",
            format!(
                "{}-{}-{}.json",
                event.rtype.as_str(),
                event.id,
                event.version
            ),
        ),
        _ => {
            let fhir_base = format!("{}/fhir", cfg.public_url);
            let input = delivery::EnvelopeInput {
                event,
                source: &cfg.public_url,
                fhir_base: &fhir_base,
                resource_json: version.as_ref().map(|v| v.json.as_str()),
            };
            (
                delivery::cloud_event(&input),
                "application/cloudevents+json",
                format!("event-{}.json", event.seq),
            )
        }
    };
    let opts = SendOptions {
        workflow_id: target.workflow_id.clone(),
        subject: Some(event.kind.clone()),
        local_id: Some(local.clone()),
        file_name: Some(file_name),
        content_type: Some(content_type.to_string()),
        compress: None,
    };
    let sent = client
        .send_detailed(&target.to, body.as_bytes(), opts)
        .await
        .map_err(|e| match e {
            // Unknown recipient (417) or a request MESH will never take (400): retrying cannot help.
            mesh::Error::Refused {
                status: s @ (400 | 417),
                ..
            } => (Some(s), None, e.to_string(), true),
            mesh::Error::Refused { status, .. } => (Some(status), None, e.to_string(), false),
            mesh::Error::Invalid(_) => (None, None, e.to_string(), true),
            other => fail(other.to_string()),
        })?;
    crate::mesh_poll::failpoint("after-send");
    record(
        store,
        &record_key,
        &sent.message_id,
        &local,
        &target,
        client,
        sent.chunks,
        sent.reconciled,
    )
    .await
    .map_err(internal)?;
    tracing::debug!(subscription, seq = d.seq, message_id = %sent.message_id, to = %target.to, "MESH: sent");
    Ok(202)
}

#[allow(clippy::too_many_arguments, reason = "one record, written once")]
async fn record<S: Store>(
    store: &S,
    key: &str,
    message_id: &str,
    local_id: &str,
    target: &Target,
    client: &MeshClient,
    chunks: u32,
    reconciled: bool,
) -> store::Result<()> {
    let value = json!({
        "messageId": message_id,
        "localId": local_id,
        "from": client.mailbox(),
        "to": target.to,
        "workflowId": target.workflow_id,
        "chunks": chunks,
        "reconciled": reconciled,
        "sentMs": now_ms(),
    })
    .to_string();
    let (key, id) = (key.to_string(), message_id.to_string());
    store
        .write(move |tx| {
            tx.kv_put(NS, &key, Some(&value))?;
            tx.kv_put(BY_ID_NS, &id, Some(&key))
        })
        .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("x26abc1?workflow_id=TEST_WORKFLOW").unwrap(),
            Target {
                to: "X26ABC1".into(),
                workflow_id: "TEST_WORKFLOW".into(),
                from: None
            }
        );
        let t = parse_endpoint("X26ABC1?workflow_id=WF%201&from=x26abc2").unwrap();
        assert_eq!(t.workflow_id, "WF 1");
        assert_eq!(t.from.as_deref(), Some("X26ABC2"));
        for bad in [
            "X26ABC1",
            "X26ABC1?workflow_id=",
            "?workflow_id=WF",
            "X 1?workflow_id=WF",
            "X1?workflow_id=WF&colour=blue",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn local_ids_are_stable_and_distinct() {
        assert_eq!(local_id("s1", 7), local_id("s1", 7));
        assert_ne!(local_id("s1", 7), local_id("s1", 8));
        assert_ne!(local_id("s1", 7), local_id("s2", 7));
    }
}
