//! Storage port of Carebridge.
//!
//! Why it exists: every capability (FHIR REST, booking, delivery, HL7, MESH) needs the same small set of
//! storage primitives: versioned resources with history, a search index, an outbox of domain events written
//! in the same transaction as the change, and idempotency records. This crate names those primitives as a
//! trait so that the embedded backend (SQLite) and the production backend (PostgreSQL) are interchangeable,
//! and the domain code is written once.
//!
//! Invariants:
//! - No driver types in the public API: errors carry meaning ([`StoreError`]), never a SQL error type.
//! - A write is a closure run inside one backend transaction ([`Store::write`]); if it returns `Err`, none of
//!   its changes are kept. Events appended through [`Tx::append_event`] commit or vanish with the change.
//! - When [`Store::write`] returns `Ok`, the change is durable (survives a process crash).

use std::future::Future;

pub use fhir::{IndexEntry, IndexValue, ResourceType};
use serde_json::Value;

pub mod conformance;
mod matching;
mod query;
mod stamp;
pub mod url;
pub use matching::{matches, range_matches};
pub use query::*;
pub use stamp::{Body, stamp};

/// Key-value namespaces that hold append-only logs (the audit trail and its page counter). A backend may keep
/// them apart from everything else: the embedded store puts them in a database file of their own, so that
/// appending to them (every second, megabytes under load) neither grows the main file nor invalidates the
/// page caches of its readers.
pub const LOG_NAMESPACES: [&str; 2] = ["audit", "audit-meta"];

/// One version of a resource as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub rtype: ResourceType,
    pub id: String,
    /// 1-based version number; `meta.versionId` is its decimal form.
    pub version: u64,
    /// Milliseconds since the Unix epoch (UTC) of this version.
    pub last_updated_ms: i64,
    /// True for a delete tombstone (then `json` is empty).
    pub deleted: bool,
    /// The resource JSON with `id`, `meta.versionId` and `meta.lastUpdated` set. Empty for a tombstone.
    pub json: String,
}

impl Stored {
    /// `meta.lastUpdated` / `Last-Modified` as an RFC 3339 instant with millisecond precision.
    pub fn last_updated(&self) -> String {
        fhir::format_instant_ms(self.last_updated_ms)
    }
}

/// What a writer asks to store as a new version.
#[derive(Debug, Clone)]
pub struct Put {
    pub rtype: ResourceType,
    pub id: String,
    /// The resource; the backend sets `id`, `meta.versionId` and `meta.lastUpdated` before storing it.
    pub resource: Value,
    /// Search index rows for this version (replace the previous version's rows).
    pub index: Vec<IndexEntry>,
    /// If set, the current version must be exactly this, else [`StoreError::VersionConflict`].
    /// `Some(0)` means "must not exist yet (or be deleted)".
    pub expected_version: Option<u64>,
    /// `Body::new` of `resource`, when the caller built it before the write (off the single writer); the
    /// backend then stores it instead of serialising `resource` again.
    pub body: Option<Body>,
}

impl Put {
    /// The text to store as `version` of this resource, last updated at `last_updated`.
    pub fn stamp(&self, version: u64, last_updated: &str) -> Result<String> {
        match &self.body {
            Some(body) if body.rtype() == self.rtype => body.stamp(&self.id, version, last_updated),
            Some(body) => Err(StoreError::Invalid(format!(
                "{}/{}: the prepared body is of a {}",
                self.rtype,
                self.id,
                body.rtype()
            ))),
            None => stamp(self.rtype, &self.id, version, last_updated, &self.resource),
        }
    }
}

/// A domain event to append to the outbox inside the current transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// The ordering key, e.g. `Appointment/123` or `Patient/9`.
    pub subject: String,
    /// Event kind, e.g. `appointment.booked`, `patient.registered`, `organization.updated`.
    pub kind: String,
    pub rtype: ResourceType,
    pub id: String,
    /// The resource version the event refers to.
    pub version: u64,
    /// Extra facts (reason, old and new times, ...). `Value::Null` when there are none.
    pub data: Value,
}

/// An event as stored in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Global, strictly increasing position in the outbox (a cursor for feeds).
    pub seq: i64,
    pub subject: String,
    /// 1, 2, 3, ... per subject with no gaps.
    pub subject_seq: i64,
    pub kind: String,
    pub rtype: ResourceType,
    pub id: String,
    pub version: u64,
    pub time_ms: i64,
    pub data: Value,
}

/// A stored response for an `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq)]
pub struct IdempotencyRecord {
    pub key: String,
    /// Hash of (method, path, body) of the first request.
    pub request_hash: String,
    pub status: u16,
    /// Response headers worth replaying (Location, ETag, Last-Modified, Content-Type).
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub created_ms: i64,
}

/// State of one delivery of one outbox event to one subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryState {
    /// Not yet acknowledged by the consumer (never tried, or waiting for a retry).
    Pending,
    /// The consumer answered 2xx.
    Delivered,
    /// Given up after the retry policy: a dead letter, until replayed.
    Dead,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<DeliveryState> {
        match s {
            "pending" => Some(DeliveryState::Pending),
            "delivered" => Some(DeliveryState::Delivered),
            "dead" => Some(DeliveryState::Dead),
            _ => None,
        }
    }
}

/// One delivery of outbox event `seq` to subscription `subscription`.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The Subscription's id.
    pub subscription: String,
    /// The outbox event's global seq.
    pub seq: i64,
    /// The event's subject (ordering key), e.g. `Appointment/1`.
    pub subject: String,
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempts: u32,
    /// Earliest time of the next attempt (pending only).
    pub next_attempt_ms: i64,
    /// When the delivery was enqueued.
    pub created_ms: i64,
    /// When the state last changed.
    pub updated_ms: i64,
    /// HTTP status of the last attempt, if it got one.
    pub last_status: Option<u16>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

/// The result of a delivery attempt (or an operator's replay), applied with [`Tx::update_delivery`].
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryUpdate {
    Delivered {
        attempts: u32,
        status: u16,
    },
    Retry {
        attempts: u32,
        next_attempt_ms: i64,
        status: Option<u16>,
        error: String,
    },
    Dead {
        attempts: u32,
        status: Option<u16>,
        error: String,
    },
    /// Replay: back to pending with no attempts, due now.
    Requeue,
}

/// Which deliveries to list.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeliveryQuery {
    pub subscription: Option<String>,
    pub state: Option<DeliveryState>,
    /// Only deliveries of events with `seq > after_seq`.
    pub after_seq: i64,
    pub limit: usize,
}

/// Deliveries of one subscription per state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeliveryCounts {
    pub pending: u64,
    pub delivered: u64,
    pub dead: u64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    #[error("{rtype}/{id} not found")]
    NotFound { rtype: ResourceType, id: String },
    #[error("{rtype}/{id} was deleted (version {version})")]
    Gone {
        rtype: ResourceType,
        id: String,
        version: u64,
    },
    #[error("version conflict on {rtype}/{id}: expected {expected}, current {actual}")]
    VersionConflict {
        rtype: ResourceType,
        id: String,
        expected: u64,
        actual: u64,
    },
    /// A uniqueness rule refused the write; `existing` names what is already there (e.g. `Patient/12`).
    #[error("duplicate: {message}")]
    Duplicate {
        message: String,
        existing: Option<String>,
    },
    /// A business conflict decided by domain code inside a write (slot taken, illegal transition...).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The request cannot be expressed against the store (bad search parameter value, ...).
    #[error("invalid: {0}")]
    Invalid(String),
    /// The store is shutting down or its writer has stopped.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Anything else the backend reports; the text is for logs, not for clients.
    #[error("storage failure: {0}")]
    Backend(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Resources a write is going to read, told before it runs ([`Store::write_reading`]). A backend that pays
/// a round trip per read inside a write (PostgreSQL) fetches them for a whole group commit at once; one
/// that does not (SQLite) ignores them. Only a hint: it never changes what a read inside the write returns,
/// and a read it did not foresee works as usual.
#[derive(Debug, Clone, Default)]
pub struct ReadAhead {
    /// Resources (`Type`, id) to fetch; a missing one is fine.
    pub keys: Vec<(ResourceType, String)>,
    /// A second round: given each resource of `keys` that was found, the ones it leads to (its references
    /// the write will follow, such as an Appointment's Slots).
    pub follow: Option<Follow>,
    /// Searches the write will run ([`Tx::search`] with an equal query), such as the lookup of another
    /// Patient holding an NHS number. A backend that answers one from what it read before the batch's first
    /// job must not when a write of the batch so far could change its result; then the search runs as usual.
    pub searches: Vec<SearchQuery>,
}

/// Where a resource read ahead leads ([`ReadAhead::follow`]).
pub type Follow = fn(&Stored) -> Vec<(ResourceType, String)>;

/// Operations available inside one write transaction. Synchronous on purpose: the closure runs on the
/// backend's writer (a dedicated thread for SQLite), so domain logic never awaits while holding locks.
pub trait Tx {
    /// Wall-clock time of this transaction in ms since the epoch (the same for every write in it).
    fn now_ms(&self) -> i64;
    /// The current version (tombstones included, so callers can tell deleted from never-existed).
    fn read(&mut self, rtype: ResourceType, id: &str) -> Result<Option<Stored>>;
    /// Search inside the transaction (sees this transaction's own writes).
    fn search(&mut self, query: &SearchQuery) -> Result<Vec<Stored>>;
    /// Store a new version (create when absent or deleted, update otherwise). Returns what was stored.
    fn put(&mut self, put: Put) -> Result<Stored>;
    /// [`Tx::put`] with a given `meta.lastUpdated` instead of the transaction's time: for imports that keep a
    /// resource's history as it was. Backends that cannot honour it store the transaction's time.
    fn put_at(&mut self, put: Put, last_updated_ms: i64) -> Result<Stored> {
        let _ = last_updated_ms;
        self.put(put)
    }
    /// Delete: writes a tombstone version. Returns `None` when there was nothing live to delete.
    fn delete(
        &mut self,
        rtype: ResourceType,
        id: &str,
        expected_version: Option<u64>,
    ) -> Result<Option<Stored>>;
    /// Append an event to the outbox; assigns `seq` and the next gap-free `subject_seq`.
    fn append_event(&mut self, event: NewEvent) -> Result<Event>;
    fn idempotency_get(&mut self, key: &str) -> Result<Option<IdempotencyRecord>>;
    fn idempotency_put(&mut self, record: IdempotencyRecord) -> Result<()>;

    /// Small named values (cursors, secrets kept out of resources): read one.
    fn kv_get(&mut self, namespace: &str, key: &str) -> Result<Option<String>>;
    /// Set (`Some`) or remove (`None`) one named value.
    fn kv_put(&mut self, namespace: &str, key: &str, value: Option<&str>) -> Result<()>;

    /// Enqueue the delivery of `event` to `subscription` (pending, due now). Idempotent: returns false when
    /// that delivery already exists (in any state), leaving it unchanged.
    fn enqueue_delivery(&mut self, subscription: &str, event: &Event) -> Result<bool>;
    /// [`Tx::enqueue_delivery`] of each of `events` in order; per event, whether it was enqueued (false when
    /// that delivery already existed, or an earlier event of `events` had the same seq). A backend whose
    /// statements cost a round trip each writes them together (a `$replay` of tens of thousands of events).
    fn enqueue_deliveries(&mut self, subscription: &str, events: &[Event]) -> Result<Vec<bool>> {
        events
            .iter()
            .map(|ev| self.enqueue_delivery(subscription, ev))
            .collect()
    }
    /// Record the outcome of an attempt, or requeue a delivery (replay). `NotFound`-free: updating a delivery
    /// that does not exist is `StoreError::Invalid`.
    fn update_delivery(
        &mut self,
        subscription: &str,
        seq: i64,
        update: DeliveryUpdate,
    ) -> Result<()>;
    /// Requeue every dead delivery of a subscription; returns how many.
    fn requeue_dead(&mut self, subscription: &str) -> Result<u64>;
    /// One delivery as this transaction sees it (`None` when it does not exist). Lets a runner claim a
    /// delivery (check it is still pending, then push its next attempt out as a lease) atomically.
    fn delivery(&mut self, subscription: &str, seq: i64) -> Result<Option<Delivery>>;
}

/// Result of a search outside a transaction.
#[derive(Debug, Clone, Default)]
pub struct SearchResult {
    pub resources: Vec<Stored>,
    /// Set when the query asked for a total.
    pub total: Option<u64>,
}

/// A storage backend.
pub trait Store: Send + Sync + 'static {
    /// Run `f` inside one transaction. Concurrent writes may share a physical transaction (group commit);
    /// each closure still sees all-or-nothing semantics: an `Err` rolls back only that closure's changes.
    /// Returns after the commit is durable.
    fn write<T, F>(&self, f: F) -> impl Future<Output = Result<T>> + Send
    where
        F: FnOnce(&mut dyn Tx) -> Result<T> + Send + 'static,
        T: Send + 'static;

    /// Whether [`Store::write_reading`] makes use of what it is told (false: it ignores it, so a caller
    /// need not spend time building a [`ReadAhead`]).
    fn reads_ahead(&self) -> bool {
        false
    }

    /// [`Store::write`], telling the backend ahead what `f` will read (see [`ReadAhead`]).
    fn write_reading<T, F>(&self, ahead: ReadAhead, f: F) -> impl Future<Output = Result<T>> + Send
    where
        F: FnOnce(&mut dyn Tx) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let _ = ahead;
        self.write(f)
    }

    /// Current version, tombstones included.
    fn read(
        &self,
        rtype: ResourceType,
        id: &str,
    ) -> impl Future<Output = Result<Option<Stored>>> + Send;

    /// A specific version.
    fn vread(
        &self,
        rtype: ResourceType,
        id: &str,
        version: u64,
    ) -> impl Future<Output = Result<Option<Stored>>> + Send;

    /// History, newest first: of one resource (`id` set) or of a whole type.
    fn history(&self, query: &HistoryQuery) -> impl Future<Output = Result<SearchResult>> + Send;

    fn search(&self, query: &SearchQuery) -> impl Future<Output = Result<SearchResult>> + Send;

    /// Outbox events with `seq > after`, oldest first, at most `limit`.
    fn events_after(
        &self,
        after: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Event>>> + Send;

    /// The highest committed outbox `seq` (0 when none): changes after each commit that appended events (not
    /// after commits without events), before the writes of that commit are acknowledged. A backend that makes
    /// a commit durable after it becomes visible (the embedded store's pipelined fsync) publishes it once
    /// durable, and [`Store::events_after`] returns nothing beyond it.
    fn watch_events(&self) -> tokio::sync::watch::Receiver<i64>;

    /// A named value as committed (see [`Tx::kv_get`]).
    fn kv_get(
        &self,
        namespace: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<String>>> + Send;

    /// Deliveries to attempt at `now_ms`: for each (subscription, subject) only its pending delivery with the
    /// lowest seq (the head; later ones wait until it is delivered or dead), and only if its
    /// `next_attempt_ms <= now_ms`. Earliest `next_attempt_ms` first (then seq), at most `limit`. Costs
    /// O(log n + limit), however many deliveries wait behind a head.
    fn due_deliveries(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Delivery>>> + Send;

    /// [`Store::due_deliveries`] restricted to one subscription, so a runner can give every subscriber its own
    /// share of the in-flight budget whatever the others' backlogs.
    fn due_deliveries_for(
        &self,
        subscription: &str,
        now_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Delivery>>> + Send;

    /// The earliest `next_attempt_ms` of any head (see [`Store::due_deliveries`]); `None` when nothing is
    /// pending.
    fn next_due_ms(&self) -> impl Future<Output = Result<Option<i64>>> + Send;

    /// Deliveries matching `query`, by seq (then subscription), at most `query.limit`.
    fn deliveries(
        &self,
        query: &DeliveryQuery,
    ) -> impl Future<Output = Result<Vec<Delivery>>> + Send;

    /// How many deliveries of `subscription` are in each state.
    fn delivery_counts(
        &self,
        subscription: &str,
    ) -> impl Future<Output = Result<DeliveryCounts>> + Send;
}
