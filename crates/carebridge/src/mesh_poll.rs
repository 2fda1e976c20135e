//! MESH inbound: `serve` polls every configured mailbox (`[[mesh.mailboxes]]`) and applies what partners send.
//!
//! Per message id in the inbox, oldest first:
//! 1. a record in key-value namespace [`NS`] (key `MAILBOX/MESSAGE_ID`) that is final means the message was
//!    applied before and only its MESH acknowledgement was lost: acknowledge it again, apply nothing;
//! 2. otherwise download it (every chunk) and dispatch on the body: `MSH|` goes to the HL7 v2 pipeline
//!    (`hl7_adapter::Ingest`, itself idempotent on MSH-3/4/10), a FHIR `transaction` or `batch` Bundle to
//!    `api::bundle::process_bundle`, a FHIR `message` Bundle's resources (all but its MessageHeader) as one
//!    transaction ([`message_as_transaction`]), anything else is kept as unrecognised; a MESH `REPORT` (non-delivery report) is recorded and logged as a warning;
//! 3. the final record (outcome, ACK code or HTTP status, and the raw body when it needs an operator) is
//!    committed, and only then is the message acknowledged on MESH.
//!
//! Exactly once across crashes: HL7 is deduplicated by the adapter, so a crash between its commit and the
//! record just replays the original ACK. A FHIR Bundle cannot be replayed safely (a POST would create twice),
//! so every write `process_bundle` makes goes through [`Marked`], a store wrapper that commits a marker in the
//! SAME transaction as the effect: a transaction Bundle found marked after a restart is not applied again, and a
//! batch is applied one entry at a time with the done entries listed in the marker.
//!
//! Failure policy: a message that cannot be applied for a reason that will not change by itself (HL7 AE/AR,
//! a Bundle refused with a 4xx, an unrecognised body, a REPORT) is recorded with its raw
//! body and error, listed for the operator (`carebridge mesh-inbound`) and then acknowledged, so MESH stops
//! offering it and the sender is not told "undelivered" after five days for a file the hub did receive. A
//! failure that may pass (store unavailable, a 5xx, a download error) is not acknowledged: the message stays in
//! the inbox and is retried at the next poll, its attempts counted in its record.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use store::{Store, Tx};
use tokio::sync::watch;

/// Key-value namespace of inbound message records, keyed `MAILBOX/MESSAGE_ID`.
pub const NS: &str = "mesh-inbound";
/// Key-value namespace of the operator lists ([`RECENT`], [`ATTENTION`]): JSON arrays of record keys.
pub const INDEX_NS: &str = "mesh-inbound-index";
/// The most recent records (at most [`INDEX_CAP`]).
pub const RECENT: &str = "recent";
/// Records an operator must look at: failures, unrecognised or unsupported payloads, REPORTs.
pub const ATTENTION: &str = "attention";
/// Length of each operator list; the oldest keys drop off (their records stay).
pub const INDEX_CAP: usize = 1000;
/// Largest body kept in a record; a larger message that needs an operator is left in the MESH inbox instead.
const MAX_KEPT_BODY: usize = 64 << 20;
/// Inbox ids per poll; a full page means poll again at once (MESH's guidance).
const PAGE: usize = 500;

/// What was done with one inbound MESH message, as stored in [`NS`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub mailbox: String,
    pub message_id: String,
    /// `applying` (a Bundle's effect committed, record not final yet), `retrying` (a passing failure) or
    /// `done` (final; the message is or will be acknowledged).
    pub state: String,
    /// `hl7`, `fhir-transaction`, `fhir-batch`, `fhir-message`, `report` or `unrecognised`.
    pub kind: String,
    /// HL7: the adapter's outcome (`applied`, `stale`, `parked`, `error`, `rejected`, `dead-letter`); FHIR:
    /// `applied`, `partial` (a batch with failed entries) or `refused`; `unsupported`, `unrecognised`,
    /// `report`; `failed` while retrying.
    pub outcome: String,
    /// Listed for the operator.
    pub attention: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// HL7: MSA-1 of the ACK the adapter produced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_code: Option<String>,
    /// HL7: the message was a resend (same MSH-3/4/10) and changed nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// FHIR: the HTTP status `process_bundle` answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// FHIR: the response Bundle (or OperationOutcome).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<Value>,
    /// Batch entries (indexes) already applied; written in the same transaction as each entry's effect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries_done: Vec<usize>,
    /// `DATA` or `REPORT`.
    pub message_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_name: Option<String>,
    /// REPORT: the `mex-status*` and `mex-linkedmsgid` headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<Value>,
    /// Size of the payload in bytes.
    pub bytes: usize,
    /// The raw payload (UTF-8 text, or base64 when `bodyBase64`), kept when the message needs an operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub body_base64: bool,
    /// Processing attempts that hit a passing failure.
    #[serde(default)]
    pub attempts: u32,
    /// When the record was last written (ms since the epoch).
    pub updated_ms: i64,
}

/// The record key of a message.
pub fn key(mailbox: &str, message_id: &str) -> String {
    format!("{mailbox}/{message_id}")
}

/// What the body of a DATA message is, judged from its bytes alone.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// An HL7 v2 message (`MSH|` after an optional BOM and whitespace).
    Hl7,
    /// A FHIR Bundle of type `transaction` or `batch`.
    Bundle { batch: bool, bundle: Value },
    /// A FHIR Bundle of type `message`: not applied (see the module docs).
    MessageBundle,
    /// Anything else, with the reason.
    Unrecognised(String),
}

/// Classify a payload. Never panics on any bytes.
pub fn classify(body: &[u8]) -> Payload {
    let trimmed = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let start = trimmed
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(trimmed.len());
    let trimmed = trimmed.get(start..).unwrap_or_default();
    if trimmed.starts_with(b"MSH|") {
        return Payload::Hl7;
    }
    if trimmed.is_empty() {
        return Payload::Unrecognised("empty body".into());
    }
    if !trimmed.starts_with(b"{") {
        return Payload::Unrecognised("neither HL7 v2 (MSH|) nor a FHIR JSON Bundle".into());
    }
    let json: Value = match serde_json::from_slice(trimmed) {
        Ok(v) => v,
        Err(e) => return Payload::Unrecognised(format!("not valid JSON: {e}")),
    };
    let rtype = json.get("resourceType").and_then(Value::as_str);
    if rtype != Some("Bundle") {
        return Payload::Unrecognised(format!(
            "a FHIR {} is not applied from MESH (send a transaction or batch Bundle)",
            rtype.unwrap_or("JSON object without resourceType")
        ));
    }
    match json.get("type").and_then(Value::as_str) {
        Some("transaction") => Payload::Bundle {
            batch: false,
            bundle: json,
        },
        Some("batch") => Payload::Bundle {
            batch: true,
            bundle: json,
        },
        Some("message") => Payload::MessageBundle,
        other => Payload::Unrecognised(format!(
            "a Bundle of type '{}' is not applied (only transaction and batch are)",
            other.unwrap_or("?")
        )),
    }
}

/// A store that commits a marker in the same transaction as every write made through it. `process_bundle` runs
/// on it, so "this Bundle's effect committed" is known after a crash without applying the Bundle again.
pub struct Marked<S> {
    inner: Arc<S>,
    mark: Mark,
}

/// What [`Marked`] adds to every write closure.
type Mark = Arc<dyn Fn(&mut dyn Tx) -> store::Result<()> + Send + Sync>;

impl<S: Store> Marked<S> {
    /// Wrap `inner`; `mark` runs at the end of every successful write closure, in its transaction.
    pub fn new(
        inner: Arc<S>,
        mark: impl Fn(&mut dyn Tx) -> store::Result<()> + Send + Sync + 'static,
    ) -> Self {
        Marked {
            inner,
            mark: Arc::new(mark),
        }
    }
}

impl<S: Store> Store for Marked<S> {
    fn write<T, F>(&self, f: F) -> impl Future<Output = store::Result<T>> + Send
    where
        F: FnOnce(&mut dyn Tx) -> store::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let mark = self.mark.clone();
        self.inner.write(move |tx| {
            let out = f(tx)?;
            mark(tx)?;
            Ok(out)
        })
    }
    fn read(
        &self,
        rtype: store::ResourceType,
        id: &str,
    ) -> impl Future<Output = store::Result<Option<store::Stored>>> + Send {
        self.inner.read(rtype, id)
    }
    fn vread(
        &self,
        rtype: store::ResourceType,
        id: &str,
        version: u64,
    ) -> impl Future<Output = store::Result<Option<store::Stored>>> + Send {
        self.inner.vread(rtype, id, version)
    }
    fn history(
        &self,
        query: &store::HistoryQuery,
    ) -> impl Future<Output = store::Result<store::SearchResult>> + Send {
        self.inner.history(query)
    }
    fn search(
        &self,
        query: &store::SearchQuery,
    ) -> impl Future<Output = store::Result<store::SearchResult>> + Send {
        self.inner.search(query)
    }
    fn events_after(
        &self,
        after: i64,
        limit: usize,
    ) -> impl Future<Output = store::Result<Vec<store::Event>>> + Send {
        self.inner.events_after(after, limit)
    }
    fn watch_events(&self) -> watch::Receiver<i64> {
        self.inner.watch_events()
    }
    fn kv_get(
        &self,
        namespace: &str,
        key: &str,
    ) -> impl Future<Output = store::Result<Option<String>>> + Send {
        self.inner.kv_get(namespace, key)
    }
    fn due_deliveries(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> impl Future<Output = store::Result<Vec<store::Delivery>>> + Send {
        self.inner.due_deliveries(now_ms, limit)
    }
    fn due_deliveries_for(
        &self,
        subscription: &str,
        now_ms: i64,
        limit: usize,
    ) -> impl Future<Output = store::Result<Vec<store::Delivery>>> + Send {
        self.inner.due_deliveries_for(subscription, now_ms, limit)
    }
    fn next_due_ms(&self) -> impl Future<Output = store::Result<Option<i64>>> + Send {
        self.inner.next_due_ms()
    }
    fn deliveries(
        &self,
        query: &store::DeliveryQuery,
    ) -> impl Future<Output = store::Result<Vec<store::Delivery>>> + Send {
        self.inner.deliveries(query)
    }
    fn delivery_counts(
        &self,
        subscription: &str,
    ) -> impl Future<Output = store::Result<store::DeliveryCounts>> + Send {
        self.inner.delivery_counts(subscription)
    }
}

/// What the poller of one mailbox needs.
struct Poller<S> {
    store: Arc<S>,
    client: Arc<mesh::MeshClient>,
    ingest: Arc<hl7_adapter::Ingest<S>>,
    /// FHIR base URL handed to `process_bundle` (for `fullUrl`s and `Location`s in the response).
    fhir_base: String,
    /// Ids seen this run whose workflow the mailbox does not handle (left in the inbox, not downloaded again).
    skipped: HashSet<String>,
    /// The store is shared by several processes: poll only while holding this mailbox's lease.
    shared: bool,
    /// The audit trail (authentication on): one line per message handled.
    audit: Option<Arc<api::auth::AuditLog>>,
}

/// Start one polling task per mailbox (and, when `sweep` is set because no MLLP listener runs one, the sweep
/// of parked HL7 messages). The tasks stop when `stop` turns true.
#[allow(
    clippy::too_many_arguments,
    reason = "the serve command's wiring, each argument named at its one caller"
)]
pub fn spawn<S: Store>(
    store: Arc<S>,
    clients: &[Arc<mesh::MeshClient>],
    hl7: hl7_adapter::Options,
    fhir_base: String,
    sweep: bool,
    shared: bool,
    audit: Option<Arc<api::auth::AuditLog>>,
    stop: watch::Receiver<bool>,
) {
    let ingest = Arc::new(hl7_adapter::Ingest::new(store.clone(), hl7));
    if sweep {
        tokio::spawn(crate::mllp::sweep_parked(ingest.clone(), stop.clone()));
    }
    for client in clients {
        let poller = Poller {
            store: store.clone(),
            client: client.clone(),
            ingest: ingest.clone(),
            fhir_base: fhir_base.clone(),
            skipped: HashSet::new(),
            shared,
            audit: audit.clone(),
        };
        tokio::spawn(poller.run(stop.clone()));
    }
}

/// Event kind raised when MESH reports that a message the hub sent for a Subscription was not delivered.
pub const REPORT_EVENT: &str = "mesh.report";

/// The `mesh.report` event of a final REPORT record that names one of the hub's `mesh://` deliveries
/// (`SUBSCRIPTION/SEQ`, from [`crate::mesh_out::BY_ID_NS`]): its subject is that Subscription, its data the
/// MESH status. A REPORT about a message the hub did not send for a Subscription names no resource: it is
/// recorded for the operator (and audited), not raised. The version is filled in by the transaction.
fn report_event(rec: &Record) -> Option<store::NewEvent> {
    if rec.kind != "report" || rec.state != "done" {
        return None;
    }
    let report = rec.report.as_ref()?;
    let field = |k: &str| report.get(k).and_then(Value::as_str);
    let (subscription, seq) = field("delivery")?.split_once('/')?;
    if subscription.is_empty() {
        return None;
    }
    Some(store::NewEvent {
        subject: format!("Subscription/{subscription}"),
        kind: REPORT_EVENT.into(),
        rtype: store::ResourceType::Subscription,
        id: subscription.to_string(),
        version: 0,
        data: serde_json::json!({
            "mailbox": rec.mailbox,
            "reportMessageId": rec.message_id,
            "linkedMessageId": field("mex-linkedmsgid"),
            "eventSeq": seq.parse::<i64>().ok(),
            "statusSuccess": field("mex-statussuccess"),
            "statusEvent": field("mex-statusevent"),
            "statusCode": field("mex-statuscode"),
            "statusDescription": field("mex-statusdescription"),
        }),
    })
}

/// Crash-test hook: when the environment variable `MESH_POLL_FAILPOINT` names this point (`after-apply`:
/// an effect committed, its final record not; `after-record`: recorded, not acknowledged on MESH; `after-send`:
/// an outbound message accepted by MESH, not recorded), the process aborts there, as a kill -9 would. Read
/// once; unset in normal operation.
pub(crate) fn failpoint(point: &str) {
    static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if POINT
        .get_or_init(|| std::env::var("MESH_POLL_FAILPOINT").ok())
        .as_deref()
        == Some(point)
    {
        eprintln!("carebridge: MESH_POLL_FAILPOINT {point}: aborting");
        std::process::abort();
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Why a message was not finished this time (it stays in the inbox).
enum Pending {
    /// A failure that may pass; counted in the record when there is something to record.
    Retry(String),
    /// Nothing to do now (gone from MESH, or skipped by the workflow filter).
    Skip,
}

impl<S: Store> Poller<S> {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mailbox = self.client.mailbox().to_string();
        let interval = self.client.poll_interval().max(Duration::from_millis(50));
        tracing::info!(%mailbox, every_ms = interval.as_millis() as u64, "MESH: polling the inbox");
        loop {
            if *stop.borrow() {
                return;
            }
            // Several processes on one PostgreSQL store: one polls each mailbox at a time (a lease of a few
            // poll intervals, renewed every poll; another process takes over when the holder dies).
            if self.shared {
                let ttl = i64::try_from(interval.as_millis())
                    .unwrap_or(1_000)
                    .saturating_mul(5)
                    .max(5_000);
                let name = format!("mesh-poll/{mailbox}");
                if !crate::lease::hold(self.store.as_ref(), &name, ttl).await {
                    tokio::select! {
                        _ = tokio::time::sleep(interval) => {}
                        _ = stop.changed() => return,
                    }
                    continue;
                }
            }
            let again = match self.poll_once(&stop).await {
                Ok(full_page) => full_page,
                Err(e) => {
                    tracing::warn!(%mailbox, error = %e, "MESH: polling the inbox failed; retrying at the next poll");
                    false
                }
            };
            if again {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// One inbox listing and its messages; true when the page was full (poll again at once).
    async fn poll_once(&mut self, stop: &watch::Receiver<bool>) -> Result<bool, mesh::Error> {
        let ids = self.client.inbox(Some(PAGE)).await?;
        let full = ids.len() >= PAGE;
        let mut progressed = false;
        for id in ids {
            if *stop.borrow() {
                return Ok(false);
            }
            if self.skipped.contains(&id) {
                continue;
            }
            match self.process(&id).await {
                Ok(()) => progressed = true,
                Err(Pending::Skip) => {}
                Err(Pending::Retry(why)) => {
                    tracing::warn!(mailbox = %self.client.mailbox(), message_id = %id, error = %why,
                        "MESH: message not processed; it stays in the inbox and is retried at the next poll");
                }
            }
        }
        // A full page of messages that were all skipped or failing would spin: wait for the interval then.
        Ok(full && progressed)
    }

    /// Process one message to the end (recorded and acknowledged), or say why not.
    async fn process(&mut self, id: &str) -> Result<(), Pending> {
        let mailbox = self.client.mailbox().to_string();
        let key = key(&mailbox, id);
        let existing = self
            .store
            .kv_get(NS, &key)
            .await
            .map_err(|e| Pending::Retry(format!("reading its record: {e}")))?
            .and_then(|t| serde_json::from_str::<Record>(&t).ok());
        if let Some(r) = &existing
            && r.state == "done"
        {
            // Applied and recorded before; only the acknowledgement was lost.
            return self.acknowledge(id).await;
        }
        let msg = match self.client.download(id).await {
            Ok(m) => m,
            Err(mesh::Error::Refused {
                status: 404 | 410, ..
            }) => return Err(Pending::Skip),
            Err(e) => return Err(Pending::Retry(format!("download: {e}"))),
        };
        let workflows = &self.client.settings().workflows;
        if !workflows.is_empty()
            && !msg
                .workflow_id
                .as_deref()
                .is_some_and(|w| workflows.iter().any(|x| x == w))
        {
            tracing::info!(%mailbox, message_id = %id, workflow = msg.workflow_id.as_deref().unwrap_or(""),
                "MESH: workflow not handled by this mailbox; left in the inbox");
            self.skipped.insert(id.to_string());
            return Err(Pending::Skip);
        }
        let mut rec = existing.unwrap_or_default();
        rec.mailbox = mailbox.clone();
        rec.message_id = id.to_string();
        rec.message_type = msg.message_type.as_str().to_string();
        rec.workflow_id = msg.workflow_id.clone();
        rec.from = msg.from.clone();
        rec.local_id = msg.local_id.clone();
        rec.subject = msg.subject.clone();
        rec.file_name = msg.file_name.clone();
        rec.bytes = msg.body.len();
        let outcome = if msg.message_type == mesh::MessageType::Data {
            self.apply(&key, &msg, &mut rec).await
        } else {
            self.report(&msg, &mut rec).await;
            Ok(())
        };
        if let Err(why) = outcome {
            rec.state = "retrying".into();
            rec.outcome = "failed".into();
            rec.attention = true;
            rec.attempts += 1;
            rec.detail = Some(why.clone());
            // Best effort: the message stays in the inbox whether or not this is written.
            let _ = self.commit(&key, &rec).await;
            return Err(Pending::Retry(why));
        }
        rec.state = "done".into();
        if rec.attention {
            if msg.body.len() > MAX_KEPT_BODY {
                rec.state = "retrying".into();
                rec.detail = Some(format!(
                    "{} (body of {} bytes too large to keep: left in the MESH inbox)",
                    rec.detail.clone().unwrap_or_default(),
                    msg.body.len()
                ));
                let _ = self.commit(&key, &rec).await;
                self.skipped.insert(id.to_string());
                return Err(Pending::Skip);
            }
            match String::from_utf8(msg.body.clone()) {
                Ok(text) => rec.body = Some(text),
                Err(_) => {
                    use base64::Engine as _;
                    rec.body = Some(base64::engine::general_purpose::STANDARD.encode(&msg.body));
                    rec.body_base64 = true;
                }
            }
            tracing::warn!(%mailbox, message_id = %id, kind = %rec.kind, outcome = %rec.outcome,
                detail = rec.detail.as_deref().unwrap_or(""), "MESH: inbound message needs an operator (carebridge mesh-inbound)");
        } else {
            tracing::debug!(%mailbox, message_id = %id, kind = %rec.kind, outcome = %rec.outcome, "MESH: inbound message applied");
        }
        self.commit(&key, &rec)
            .await
            .map_err(|e| Pending::Retry(format!("recording the outcome: {e}")))?;
        if let Some(log) = &self.audit {
            // What was done, never the payload or the adapter's error text (which may quote patient data).
            let detail = format!(
                "{} workflow={} kind={} outcome={}{}",
                rec.message_type,
                rec.workflow_id.as_deref().unwrap_or(""),
                rec.kind,
                rec.outcome,
                if rec.duplicate { " duplicate" } else { "" }
            );
            log.record_message(&api::auth::MessageAudit {
                channel: api::auth::Channel::Mesh,
                sender: rec.from.as_deref().unwrap_or(""),
                org: "",
                message_id: &rec.message_id,
                status: if rec.attention { 422 } else { 200 },
                detail: &detail,
            })
            .await;
        }
        failpoint("after-record");
        self.acknowledge(id).await
    }

    /// Write the record (and its operator-list entries) in one transaction; a final REPORT about one of the
    /// hub's own deliveries also raises its event there (so exactly once, with the record).
    async fn commit(&self, key: &str, rec: &Record) -> store::Result<()> {
        let (key, mut rec) = (key.to_string(), rec.clone());
        let event = report_event(&rec);
        self.store
            .write(move |tx| {
                rec.updated_ms = tx.now_ms();
                let text = serde_json::to_string(&rec)
                    .map_err(|e| store::StoreError::Backend(e.to_string()))?;
                tx.kv_put(NS, &key, Some(&text))?;
                push_index(tx, RECENT, &key)?;
                if rec.attention {
                    push_index(tx, ATTENTION, &key)?;
                }
                if let Some(mut ev) = event {
                    ev.version = tx.read(ev.rtype, &ev.id)?.map_or(0, |s| s.version);
                    tx.append_event(ev)?;
                }
                Ok(())
            })
            .await
    }

    async fn acknowledge(&self, id: &str) -> Result<(), Pending> {
        match self.client.ack(id).await {
            Ok(())
            | Err(mesh::Error::Refused {
                status: 404 | 410, ..
            }) => Ok(()),
            Err(e) => Err(Pending::Retry(format!(
                "acknowledging (applied and recorded; acknowledged again at the next poll): {e}"
            ))),
        }
    }

    /// A REPORT: record its status headers; link it to the outbound delivery it is about, when it is ours.
    async fn report(&self, msg: &mesh::InboundMessage, rec: &mut Record) {
        let mut report = serde_json::Map::new();
        for (k, v) in &msg.headers {
            if k.starts_with("mex-status") || k == "mex-linkedmsgid" {
                report.insert(k.clone(), Value::String(v.clone()));
            }
        }
        let linked = msg.headers.get("mex-linkedmsgid").cloned();
        let delivery = match &linked {
            Some(l) => self
                .store
                .kv_get(crate::mesh_out::BY_ID_NS, l)
                .await
                .ok()
                .flatten(),
            None => None,
        };
        if let Some(d) = &delivery {
            report.insert("delivery".into(), Value::String(d.clone()));
        }
        rec.kind = "report".into();
        rec.outcome = "report".into();
        rec.attention = true;
        let text = |k: &str| msg.headers.get(k).map(String::as_str).unwrap_or("");
        rec.detail = Some(format!(
            "{} {} {}: {}{}",
            text("mex-statussuccess"),
            text("mex-statusevent"),
            text("mex-statuscode"),
            text("mex-statusdescription"),
            linked
                .as_deref()
                .map(|l| format!(
                    " (message {l}{})",
                    delivery
                        .as_deref()
                        .map(|d| format!(", delivery {d}"))
                        .unwrap_or_default()
                ))
                .unwrap_or_default()
        ));
        rec.report = Some(Value::Object(report));
        tracing::warn!(mailbox = %rec.mailbox, message_id = %rec.message_id,
            report = rec.detail.as_deref().unwrap_or(""), "MESH: report received");
    }

    /// Apply a DATA message; fills `rec`. An `Err` is a failure that may pass (not acknowledged).
    async fn apply(
        &self,
        key: &str,
        msg: &mesh::InboundMessage,
        rec: &mut Record,
    ) -> Result<(), String> {
        match classify(&msg.body) {
            Payload::Hl7 => {
                rec.kind = "hl7".into();
                let handled = self
                    .ingest
                    .handle(&msg.body)
                    .await
                    .map_err(|e| format!("store failure: {e}"))?;
                failpoint("after-apply");
                rec.outcome = handled.outcome.as_str().to_string();
                rec.duplicate = handled.duplicate;
                let (code, text) = ack_fields(&handled.ack);
                rec.ack_code = code;
                rec.detail = text.filter(|t| !t.is_empty());
                rec.attention = matches!(
                    handled.outcome,
                    hl7_adapter::Outcome::Error
                        | hl7_adapter::Outcome::Rejected
                        | hl7_adapter::Outcome::DeadLetter
                );
                Ok(())
            }
            Payload::Bundle {
                batch: false,
                bundle,
            } => {
                rec.kind = "fhir-transaction".into();
                self.apply_transaction(key, bundle, rec).await
            }
            Payload::Bundle {
                batch: true,
                bundle,
            } => {
                rec.kind = "fhir-batch".into();
                self.apply_batch(key, bundle, rec).await
            }
            Payload::MessageBundle => {
                // A message is one unit: its resources (every entry but the MessageHeader) are applied together,
                // as a transaction (an entry with an id is an update-as-create, one without is a create).
                rec.kind = "fhir-message".into();
                let bundle: Value = serde_json::from_slice(&msg.body).unwrap_or(Value::Null);
                self.apply_transaction(key, message_as_transaction(&bundle), rec)
                    .await
            }
            Payload::Unrecognised(why) => {
                rec.kind = "unrecognised".into();
                rec.outcome = "unrecognised".into();
                rec.attention = true;
                rec.detail = Some(why);
                Ok(())
            }
        }
    }

    /// A transaction Bundle, exactly once: a marker commits with its effect.
    async fn apply_transaction(
        &self,
        key: &str,
        bundle: Value,
        rec: &mut Record,
    ) -> Result<(), String> {
        if rec.state == "applying" {
            // Its effect committed before a restart; the response was lost with the process.
            rec.outcome = "applied".into();
            rec.detail = Some("applied before a restart; the response was not kept".into());
            return Ok(());
        }
        let marker = applying(rec, key);
        let marked = Arc::new(Marked::new(self.store.clone(), move |tx| {
            tx.kv_put(NS, &marker.0, Some(&marker.1))
        }));
        let resp = api::bundle::process_bundle(&marked, &self.fhir_base, bundle).await;
        failpoint("after-apply");
        rec.http_status = Some(resp.status);
        if resp.status >= 500 {
            return Err(format!(
                "the transaction failed with {}: {}",
                resp.status,
                summary(&resp.body)
            ));
        }
        if resp.status >= 400 {
            rec.outcome = "refused".into();
            rec.attention = true;
            rec.detail = Some(summary(&resp.body));
        } else {
            rec.outcome = "applied".into();
        }
        rec.response = Some(resp.body);
        Ok(())
    }

    /// A batch, one entry at a time: each entry's effect commits with the entry's index added to the record, so
    /// after a crash only the entries not yet applied run.
    async fn apply_batch(&self, key: &str, bundle: Value, rec: &mut Record) -> Result<(), String> {
        let entries = bundle
            .get("entry")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut out = Vec::with_capacity(entries.len());
        let mut failed = 0usize;
        for (i, entry) in entries.into_iter().enumerate() {
            if rec.entries_done.contains(&i) {
                out.push(serde_json::json!({"response": {"status": "200 OK",
                    "outcome": outcome_text("information", "applied before a restart; the response was not kept")}}));
                continue;
            }
            let mut single = serde_json::Map::new();
            single.insert("resourceType".into(), Value::String("Bundle".into()));
            single.insert("type".into(), Value::String("batch".into()));
            single.insert("entry".into(), Value::Array(vec![entry]));
            let base = {
                let mut r = rec.clone();
                r.state = "applying".into();
                r.kind = "fhir-batch".into();
                r
            };
            let key2 = key.to_string();
            let marked = Arc::new(Marked::new(self.store.clone(), move |tx| {
                let mut current = tx
                    .kv_get(NS, &key2)?
                    .and_then(|t| serde_json::from_str::<Record>(&t).ok())
                    .unwrap_or_else(|| base.clone());
                if !current.entries_done.contains(&i) {
                    current.entries_done.push(i);
                }
                current.state = "applying".into();
                current.updated_ms = tx.now_ms();
                let text = serde_json::to_string(&current)
                    .map_err(|e| store::StoreError::Backend(e.to_string()))?;
                tx.kv_put(NS, &key2, Some(&text))
            }));
            let resp =
                api::bundle::process_bundle(&marked, &self.fhir_base, Value::Object(single)).await;
            failpoint("after-apply");
            if resp.status >= 500 {
                return Err(format!(
                    "batch entry {i} failed with {}: {}",
                    resp.status,
                    summary(&resp.body)
                ));
            }
            let entry_resp = resp
                .body
                .get("entry")
                .and_then(Value::as_array)
                .and_then(|a| a.first())
                .cloned()
                .unwrap_or_else(|| serde_json::json!({"response": {"status": resp.status.to_string(), "outcome": resp.body}}));
            let status = entry_resp
                .pointer("/response/status")
                .and_then(Value::as_str)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse::<u16>().ok())
                .unwrap_or(resp.status);
            if status >= 500 {
                return Err(format!(
                    "batch entry {i} failed with {status}: {}",
                    summary(&entry_resp)
                ));
            }
            if status >= 400 || resp.status >= 400 {
                failed += 1;
            }
            if !rec.entries_done.contains(&i) {
                rec.entries_done.push(i);
            }
            out.push(entry_resp);
        }
        rec.http_status = Some(200);
        rec.response = Some(serde_json::json!({
            "resourceType": "Bundle", "type": "batch-response", "entry": out
        }));
        if failed > 0 {
            rec.outcome = "partial".into();
            rec.attention = true;
            rec.detail = Some(format!("{failed} batch entr(y/ies) refused"));
        } else {
            rec.outcome = "applied".into();
        }
        Ok(())
    }
}

/// The marker committed with a transaction Bundle's effect: (key, record in state `applying`).
fn applying(rec: &Record, key: &str) -> (String, String) {
    let mut r = rec.clone();
    r.state = "applying".into();
    r.kind = "fhir-transaction".into();
    r.outcome = "applied".into();
    r.updated_ms = now_ms();
    (
        key.to_string(),
        serde_json::to_string(&r).unwrap_or_default(),
    )
}

fn outcome_text(severity: &str, text: &str) -> Value {
    serde_json::json!({"resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": "informational", "diagnostics": text}]})
}

/// The first diagnostics of an OperationOutcome (or of a response entry), else the JSON cut short.
fn summary(v: &Value) -> String {
    let issues = v
        .get("issue")
        .or_else(|| v.pointer("/response/outcome/issue"))
        .and_then(Value::as_array);
    if let Some(text) = issues
        .into_iter()
        .flatten()
        .filter_map(|i| i.get("diagnostics").and_then(Value::as_str))
        .next()
    {
        return text.to_string();
    }
    let mut s = v.to_string();
    if s.len() > 300 {
        let mut cut = 300;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// (MSA-1, ERR-8 or MSA-3) of an encoded ACK.
fn ack_fields(ack: &str) -> (Option<String>, Option<String>) {
    match hl7::Message::parse(ack.as_bytes()) {
        Ok(m) => (
            m.get("MSA-1"),
            m.get("ERR-8")
                .filter(|t| !t.is_empty())
                .or_else(|| m.get("MSA-3")),
        ),
        Err(_) => (None, None),
    }
}

/// Append `entry` to an operator list (once), dropping the oldest past [`INDEX_CAP`].
fn push_index(tx: &mut dyn Tx, list: &str, entry: &str) -> store::Result<()> {
    let mut keys: Vec<String> = tx
        .kv_get(INDEX_NS, list)?
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    if keys.iter().any(|k| k == entry) {
        return Ok(());
    }
    keys.push(entry.to_string());
    if keys.len() > INDEX_CAP {
        let extra = keys.len() - INDEX_CAP;
        keys.drain(..extra);
    }
    let text =
        serde_json::to_string(&keys).map_err(|e| store::StoreError::Backend(e.to_string()))?;
    tx.kv_put(INDEX_NS, list, Some(&text))
}

/// A FHIR `message` Bundle as a `transaction`: every entry but the MessageHeader, each an update-as-create
/// (`PUT Type/id`) when it has an id, else a create (`POST Type`, its `fullUrl` kept so references resolve).
pub fn message_as_transaction(message: &Value) -> Value {
    let entries: Vec<Value> = message
        .get("entry")
        .and_then(Value::as_array)
        .map(|es| {
            es.iter()
                .filter(|e| {
                    e["resource"]["resourceType"]
                        .as_str()
                        .is_some_and(|t| t != "MessageHeader")
                })
                .map(|e| {
                    let r = &e["resource"];
                    let rtype = r["resourceType"].as_str().unwrap_or_default();
                    let request = match r["id"].as_str() {
                        Some(id) => {
                            serde_json::json!({"method": "PUT", "url": format!("{rtype}/{id}")})
                        }
                        None => serde_json::json!({"method": "POST", "url": rtype}),
                    };
                    let mut out = serde_json::json!({"resource": r, "request": request});
                    if let Some(f) = e.get("fullUrl") {
                        out["fullUrl"] = f.clone();
                    }
                    out
                })
                .collect()
        })
        .unwrap_or_default();
    serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn a_final_report_about_a_delivery_raises_an_event_on_its_subscription() {
        let mut rec = Record {
            mailbox: "X26ABC2".into(),
            message_id: "REPORT1".into(),
            state: "done".into(),
            kind: "report".into(),
            report: Some(serde_json::json!({
                "mex-linkedmsgid": "SENT1", "mex-statuscode": "14", "mex-statussuccess": "ERROR",
                "delivery": "sub-9/42",
            })),
            ..Default::default()
        };
        let ev = report_event(&rec).unwrap();
        assert_eq!(ev.subject, "Subscription/sub-9");
        assert_eq!((ev.kind.as_str(), ev.id.as_str()), (REPORT_EVENT, "sub-9"));
        assert_eq!(ev.data["linkedMessageId"], "SENT1");
        assert_eq!(ev.data["eventSeq"], 42);
        assert_eq!(ev.data["statusCode"], "14");
        rec.state = "retrying".into();
        assert!(
            report_event(&rec).is_none(),
            "only once, with the final record"
        );
        rec.state = "done".into();
        rec.report = Some(serde_json::json!({"mex-linkedmsgid": "NOT-OURS"}));
        assert!(
            report_event(&rec).is_none(),
            "no delivery of ours: recorded, not raised"
        );
        rec.kind = "hl7".into();
        assert!(report_event(&rec).is_none());
    }

    #[test]
    fn classifies_hl7_after_bom_and_whitespace() {
        assert_eq!(classify(b"MSH|^~\\&|A"), Payload::Hl7);
        assert_eq!(classify(b"\xEF\xBB\xBF\r\n  MSH|^~\\&|A"), Payload::Hl7);
        assert!(matches!(classify(b"MSA|AA"), Payload::Unrecognised(_)));
        assert!(matches!(classify(b""), Payload::Unrecognised(_)));
        assert!(matches!(classify(b" \n"), Payload::Unrecognised(_)));
    }

    #[test]
    fn classifies_bundles_by_type() {
        let b = |t: &str| format!(r#"{{"resourceType":"Bundle","type":"{t}","entry":[]}}"#);
        assert!(matches!(
            classify(b("transaction").as_bytes()),
            Payload::Bundle { batch: false, .. }
        ));
        assert!(matches!(
            classify(b("batch").as_bytes()),
            Payload::Bundle { batch: true, .. }
        ));
        assert_eq!(classify(b("message").as_bytes()), Payload::MessageBundle);
        assert!(
            matches!(classify(b("collection").as_bytes()), Payload::Unrecognised(w) if w.contains("collection"))
        );
        assert!(
            matches!(classify(br#"{"resourceType":"Patient"}"#), Payload::Unrecognised(w) if w.contains("Patient"))
        );
        assert!(matches!(classify(b"{not json"), Payload::Unrecognised(w) if w.contains("JSON")));
        assert!(matches!(
            classify(b"\x00\xff\xfe garbage"),
            Payload::Unrecognised(_)
        ));
    }

    #[test]
    fn summary_prefers_diagnostics_and_cuts_long_json() {
        let oo = serde_json::json!({"resourceType":"OperationOutcome","issue":[{"severity":"error","diagnostics":"slot taken"}]});
        assert_eq!(summary(&oo), "slot taken");
        let long = serde_json::json!({"x": "é".repeat(400)});
        assert!(summary(&long).len() <= 300);
    }

    #[test]
    fn ack_fields_read_code_and_text() {
        let ack =
            "MSH|^~\\&|HUB|RXX|PAS|RXX|20300101||ACK^A28^ACK|A1|P|2.4\rMSA|AE|M1|bad NHS number\r";
        let (code, text) = ack_fields(ack);
        assert_eq!(code.as_deref(), Some("AE"));
        assert_eq!(text.as_deref(), Some("bad NHS number"));
        assert_eq!(ack_fields("garbage"), (None, None));
    }

    #[test]
    fn record_round_trips_and_omits_empty_fields() {
        let r = Record {
            mailbox: "X26ABC2".into(),
            message_id: "M1".into(),
            state: "done".into(),
            kind: "hl7".into(),
            outcome: "applied".into(),
            message_type: "DATA".into(),
            ..Default::default()
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(
            !text.contains("body") && !text.contains("entriesDone"),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), r);
    }

    #[test]
    fn message_bundle_becomes_a_transaction_without_its_header() {
        let msg = serde_json::json!({"resourceType": "Bundle", "type": "message", "entry": [
            {"fullUrl": "urn:uuid:h", "resource": {"resourceType": "MessageHeader"}},
            {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient"}},
            {"resource": {"resourceType": "Organization", "id": "o1"}},
            {"resource": "not an object"}
        ]});
        let tx = message_as_transaction(&msg);
        assert_eq!(tx["type"], "transaction");
        let entries = tx["entry"].as_array().unwrap();
        assert_eq!(entries.len(), 2, "{tx}");
        assert_eq!(entries[0]["fullUrl"], "urn:uuid:p");
        assert_eq!(
            entries[0]["request"],
            serde_json::json!({"method": "POST", "url": "Patient"})
        );
        assert_eq!(
            entries[1]["request"],
            serde_json::json!({"method": "PUT", "url": "Organization/o1"})
        );
        assert_eq!(
            message_as_transaction(&Value::Null)["entry"],
            serde_json::json!([])
        );
    }
}
