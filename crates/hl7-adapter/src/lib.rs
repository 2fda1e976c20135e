//! The HL7 v2 adapter: inbound ADT and SIU messages applied to the FHIR model through the booking engine,
//! exactly once, and outbound SIU/ADT messages built from the hub's events.
//!
//! Why it exists: most trust PAS systems speak HL7 v2. The `hl7` crate parses and encodes; this crate gives
//! the messages meaning: [`map`] reads what a message asks for, [`apply`] applies it inside one store
//! transaction with its record and its ACK, [`Ingest`] drives that from raw frames, and [`outbound`] turns
//! appointment and patient events into SIU and ADT messages.
//!
//! Invariants:
//! - Every change goes through `booking` (the same rules as the FHIR API) inside a store write; the ACK is
//!   produced in that transaction and returned only after the commit is durable.
//! - A message is applied at most once: it is keyed by (MSH-3, MSH-4, MSH-10) and a resend gets the stored
//!   original ACK without any change, across restarts.
//! - A refusal leaves the store as it was (the write is rolled back, then only the message's record and its
//!   AE/AR ACK are written).
//! - No sockets here (the listener lives in the binary); never panics on any input.

pub mod apply;
pub mod dtm;
pub mod map;
pub mod outbound;
pub mod resources;

use std::sync::{Arc, Mutex};

use hl7::Message;
use store::{Store, StoreError};

pub use apply::{Options, Outcome, Processed};
pub use map::{Intent, Mapped, Refusal};

/// What [`Ingest::handle`] returns for one inbound frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Handled {
    /// The ACK to send back (encoded, not framed).
    pub ack: String,
    pub outcome: Outcome,
    pub duplicate: bool,
    /// `MSH-9` as `ADT^A31` (empty when unparseable).
    pub message_type: String,
    /// `MSH-3` sending application (empty when unparseable).
    pub sending_application: String,
    /// `MSH-4` sending facility (empty when unparseable).
    pub sending_facility: String,
    /// `MSH-10` message control id (empty when unparseable).
    pub control_id: String,
}

/// Applies raw inbound messages to a store (see the crate docs).
pub struct Ingest<S> {
    store: Arc<S>,
    opts: Options,
}

impl<S: Store> Ingest<S> {
    pub fn new(store: Arc<S>, opts: Options) -> Self {
        Ingest { store, opts }
    }

    /// Parse, apply and record one message; returns its ACK once everything is committed. An error means
    /// the store failed (no ACK should be sent: the sender will retry).
    pub async fn handle(&self, frame: &[u8]) -> Result<Handled, StoreError> {
        let msg = match Message::parse(frame) {
            Ok(m) => m,
            Err(e) => {
                let now = now_ms();
                let ack =
                    hl7::reject_unparseable(frame, &format!("ACKR{now}"), &dtm::format_ms(now), &e);
                let raw = String::from_utf8_lossy(frame).into_owned();
                let detail = e.message.clone();
                let key = format!("unparsed:{}", sha_hex(frame));
                let ack2 = ack.clone();
                self.store
                    .write(move |tx| {
                        let rec = serde_json::json!({
                            "receivedMs": tx.now_ms(), "type": "", "outcome": "rejected",
                            "detail": detail, "touched": [], "ack": ack2, "message": raw,
                        });
                        tx.kv_put(apply::NS_INBOUND, &key, Some(&rec.to_string()))
                    })
                    .await?;
                return Ok(Handled {
                    ack,
                    outcome: Outcome::Rejected,
                    duplicate: false,
                    message_type: String::new(),
                    sending_application: String::new(),
                    sending_facility: String::new(),
                    control_id: String::new(),
                });
            }
        };
        let mapped = map::intent(&msg);
        let message_type = match &mapped {
            Ok(m) => m.message_type.clone(),
            Err(_) => {
                let (c, t, _) = msg.message_type();
                format!("{}^{}", c.unwrap_or_default(), t.unwrap_or_default())
            }
        };
        let raw = msg.encode();
        let sending_application = msg.sending_application().unwrap_or_default();
        let sending_facility = msg.sending_facility().unwrap_or_default();
        let control_id = msg.control_id().unwrap_or_default();
        let msg = Arc::new(msg);
        let slot: apply::RefusalSlot = Arc::new(Mutex::new(None));
        let mut prepared = apply::Prepared::of(&mapped, self.store.reads_ahead());
        let ahead = prepared.take_ahead();
        let result = {
            let (msg, raw, slot, opts) =
                (msg.clone(), raw.clone(), slot.clone(), self.opts.clone());
            self.store
                .write_reading(ahead, move |tx| {
                    apply::process(tx, &msg, &raw, &mapped, prepared, &opts, &slot)
                })
                .await
        };
        let processed = match result {
            Ok(p) => p,
            Err(e) => {
                let refusal = slot.lock().ok().and_then(|mut s| s.take());
                match refusal {
                    Some(r) => {
                        let msg = msg.clone();
                        self.store
                            .write(move |tx| apply::record_refusal(tx, &msg, &raw, &r))
                            .await?
                    }
                    None => return Err(e),
                }
            }
        };
        if !processed.unpark.is_empty() {
            self.unpark(&processed.unpark).await?;
        }
        Ok(Handled {
            ack: processed.ack,
            outcome: processed.outcome,
            duplicate: processed.duplicate,
            message_type,
            sending_application,
            sending_facility,
            control_id,
        })
    }

    /// Apply the parked messages under these identifier keys whose appointment now exists, oldest first,
    /// each in its own transaction; dead-letter those whose deadline passed. Returns how many were settled.
    pub async fn unpark(&self, idents: &[String]) -> Result<usize, StoreError> {
        let mut settled = 0;
        for ident in idents {
            loop {
                let slot: apply::RefusalSlot = Arc::new(Mutex::new(None));
                let step = {
                    let (ident, slot) = (ident.clone(), slot.clone());
                    self.store
                        .write(move |tx| apply::unpark_one(tx, &ident, &slot))
                        .await
                };
                match step {
                    Ok(apply::UnparkStep::Applied { .. }) => settled += 1,
                    Ok(apply::UnparkStep::Done | apply::UnparkStep::Waiting) => break,
                    Err(e) => {
                        let Some(r) = slot.lock().ok().and_then(|mut s| s.take()) else {
                            return Err(e);
                        };
                        let ident = ident.clone();
                        self.store
                            .write(move |tx| apply::dead_letter_parked(tx, &ident, &r))
                            .await?;
                        settled += 1;
                    }
                }
            }
        }
        Ok(settled)
    }

    /// Visit every identifier with parked messages (the periodic sweep: appointments created by other
    /// routes, and deadlines).
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        let idents: Vec<String> = self
            .store
            .write(|tx| apply::parked_index(tx))
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        self.unpark(&idents).await
    }
}

fn sha_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
