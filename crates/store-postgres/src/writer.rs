//! The writer thread: the only owner of this process's write connection. Jobs arrive on a channel; the
//! writer takes the first, drains whatever else is already queued (group commit), runs every job of the
//! batch in one transaction, COMMITs once, and only then completes the jobs.
//!
//! Serialised across processes: each batch transaction starts with `pg_advisory_xact_lock(WRITE_LOCK)`, so
//! at most one batch of any process sharing the database is between its first statement and its COMMIT.
//! That makes every closure run as if alone, as on SQLite's single writer: conditional creates and slot
//! claims see every earlier commit, `subject_seq` is gap-free, and the outbox `seq` (max + 1) increases in
//! commit order, so a reader at cursor N never misses a lower seq committed later.
//!
//! Clock: the batch reads `store_clock` under the lock and hands out `max(system time, newest instant handed
//! out by any process)`; the COMMIT statement raises `store_clock` to the newest instant the batch used. A
//! resource's version order and `lastUpdated` order therefore agree even across processes whose clocks differ.
//!
//! Held-back rows: a job's resource rows, versions, index rows, subjects and events go to its buffer
//! (`pending.rs`) and are written for the whole batch by a few pipelined statements sent together with the
//! COMMIT (or with a search of their resource type inside the batch); the job's reads see them through the
//! buffers. Kv, idempotency and delivery changes are written directly. What the batch read from the
//! database (rid, version, subject seq) is remembered for the batch ([`Seen`]), so a read, put and event
//! of one resource cost one round trip, and a resource read by several jobs is read once.
//!
//! Each job is all-or-nothing. A failed job whose changes were all held back loses its buffer and nothing
//! else happens. If it had changed the database (a direct write, a flush of its rows, a failed statement),
//! the writer rolls back to the savepoint taken at the start of the batch (keeping the write lock), replays
//! the recorded direct changes of the jobs before it (checked to come out identical), marks their buffers
//! unwritten (the next flush writes them again) and runs the rest of the batch with one SAVEPOINT per job.
//! [`crate::PgOptions::savepoint_per_write`] gives every job its own savepoint from the start instead (each
//! one is a PostgreSQL subtransaction, and more than 64 of them in a transaction overflow the per-backend
//! subtransaction cache, which slows every other session's snapshots).
//!
//! After a COMMIT that kept at least one appended event, the writer publishes the batch's highest seq on the
//! store's events watch before answering the jobs; the same COMMIT carries `NOTIFY carebridge_events` so
//! other processes' watches hear of it.
//!
//! The closures are synchronous: each store operation is `block_on` of the async statement on the writer's
//! own current-thread runtime, which also drives the connection (what the synchronous `postgres` crate does
//! internally), so reads and writes share one set of SQL functions.

use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use store::{
    DeliveryUpdate, Event, IdempotencyRecord, NewEvent, Put, ReadAhead, ResourceType, Result,
    SearchQuery, StoreError, Stored, Tx,
};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::Config;

use crate::conn::Conn;
use crate::pending::{self, JobBuf, Seen, Written};
use crate::{schema, sql};

/// Transaction advisory lock serialising write batches of every process ("CBWRITE").
pub(crate) const WRITE_LOCK: i64 = 0x4342_5752_4954_4500;
/// At most this many resources are read ahead per round (a bound on the statement, not on correctness: a
/// resource left out is read when the job asks for it).
const READ_AHEAD_MAX: usize = 1024;
/// At most this many searches are answered ahead per batch (each is a statement of its own).
const SEARCH_AHEAD_MAX: usize = 256;
/// The channel other processes' stores LISTEN on; the payload is the batch's highest outbox seq.
pub(crate) const EVENTS_CHANNEL: &str = "carebridge_events";

/// Completes a job once the fate of its transaction is known: `None` = committed, `Some(e)` = not committed.
type Finish = Box<dyn FnOnce(Option<StoreError>)>;

/// What running a job produced.
pub(crate) struct Outcome {
    /// The closure returned `Ok` (its changes are to be kept).
    ok: bool,
    finish: Finish,
}

/// A type-erased write: the closure and the channel its caller awaits.
pub(crate) trait Job: Send {
    /// Run the closure (panics are caught and become [`StoreError::Backend`]).
    fn run(self: Box<Self>, tx: &mut dyn Tx) -> Outcome;
    /// Answer without running (the transaction could not even start).
    fn fail(self: Box<Self>, err: StoreError);
    /// What the closure said it will read.
    fn ahead(&self) -> &ReadAhead;
}

pub(crate) struct WriteJob<F, T> {
    pub(crate) f: F,
    pub(crate) reply: oneshot::Sender<Result<T>>,
    pub(crate) ahead: ReadAhead,
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

impl<F, T> Job for WriteJob<F, T>
where
    F: FnOnce(&mut dyn Tx) -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    fn run(self: Box<Self>, tx: &mut dyn Tx) -> Outcome {
        let WriteJob { f, reply, .. } = *self;
        let result = catch_unwind(AssertUnwindSafe(move || f(tx))).unwrap_or_else(|payload| {
            Err(StoreError::Backend(format!(
                "write closure panicked: {}",
                panic_message(payload.as_ref())
            )))
        });
        let ok = result.is_ok();
        let finish: Finish = Box::new(move |not_committed| {
            let answer = match (not_committed, result) {
                (_, Err(own)) => Err(own),
                (Some(e), Ok(_)) => Err(e),
                (None, Ok(v)) => Ok(v),
            };
            // The caller may have gone away (future dropped): nothing to do then.
            let _ = reply.send(answer);
        });
        Outcome { ok, finish }
    }

    fn ahead(&self) -> &ReadAhead {
        &self.ahead
    }

    fn fail(self: Box<Self>, err: StoreError) {
        let _ = self.reply.send(Err(err));
    }
}

pub(crate) type JobBox = Box<dyn Job>;

/// A change a job made directly in the database (not held back in its buffer), recorded so that it can be
/// made again identically after a rollback.
enum Change {
    Idempotency(IdempotencyRecord),
    Kv {
        namespace: String,
        key: String,
        value: Option<String>,
    },
    Enqueue {
        subscription: String,
        seq: i64,
        subject: String,
    },
    UpdateDelivery {
        subscription: String,
        seq: i64,
        update: DeliveryUpdate,
    },
    RequeueDead {
        subscription: String,
        count: u64,
    },
}

/// The [`Tx`] handed to a closure: the write connection, inside the batch transaction.
struct WriteTx<'c> {
    conn: &'c Conn,
    rt: &'c Runtime,
    now_ms: i64,
    /// Set when a statement failed inside the database (not a refused precondition): PostgreSQL has then
    /// aborted the transaction, so the job is rolled back and fails even if its closure ignores the error.
    broken: Option<StoreError>,
    /// Record direct changes for a replay (only when the job runs without a savepoint).
    record: bool,
    changes: Vec<Change>,
    /// The highest outbox seq this job appended, for the events watch.
    last_seq: Option<i64>,
    /// Deliveries this job enqueued or requeued (growth of the delivery tables, for the [`Analyzer`]).
    deliveries: u64,
    /// This job's held-back rows, and those of the jobs kept before it in the batch.
    own: JobBuf,
    kept: &'c mut Vec<JobBuf>,
    /// What the batch read from the database (see [`Seen`]).
    seen: &'c mut Seen,
    next_seq: &'c mut i64,
    /// The job changed the database itself (a direct write, or a flush that wrote its own rows): undoing
    /// it needs a rollback, not just dropping its buffer.
    touched: bool,
}

impl WriteTx<'_> {
    /// The buffers of this batch so far: the kept jobs' and this job's.
    fn bufs(&self) -> impl Iterator<Item = &JobBuf> {
        self.kept.iter().chain(std::iter::once(&self.own))
    }

    /// Whether a write of this batch so far could make `found`, `query`'s answer read at the batch's start,
    /// wrong now ([`JobBuf::may_change`]).
    fn batch_may_change(&self, query: &SearchQuery, found: &[Stored]) -> bool {
        self.bufs().any(|b| b.may_change(query, found))
    }

    /// Whether a version written in this batch so far could match `query` ([`JobBuf::may_match`]).
    fn batch_may_match(&self, query: &SearchQuery) -> bool {
        self.bufs().any(|b| b.may_match(query))
    }

    /// Whether this batch so far wrote one of the `rtype` resources `found` ([`JobBuf::wrote_any`]).
    fn batch_wrote_any(&self, rtype: ResourceType, found: &[Stored]) -> bool {
        self.bufs().any(|b| b.wrote_any(rtype, found))
    }

    fn watch<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e @ (StoreError::Backend(_) | StoreError::Unavailable(_))) = &r {
            self.broken.get_or_insert_with(|| e.clone());
        }
        r
    }

    /// A direct write: whatever its outcome, the database may have changed.
    fn direct<T>(&mut self, r: Result<T>) -> Result<T> {
        self.touched = true;
        self.watch(r)
    }
}

impl Tx for WriteTx<'_> {
    fn now_ms(&self) -> i64 {
        self.now_ms
    }
    fn read(&mut self, rtype: ResourceType, id: &str) -> Result<Option<Stored>> {
        let r = self.rt.block_on(sql::read_in_tx(
            self.conn, &self.own, self.kept, self.seen, rtype, id,
        ));
        self.watch(r)
    }
    fn search(&mut self, query: &SearchQuery) -> Result<Vec<Stored>> {
        // A search a job said it would run was answered at the batch's start (under the write lock, so no
        // other process has written since). That answer stands unless a write of this batch could change
        // it; then the search runs below, after the held-back rows are written.
        if pending::answerable_ahead(query)
            && let Some((_, found)) = self.seen.searches.iter().find(|(q, _)| q == query)
            && !self.batch_may_change(query, found)
        {
            return Ok(found.clone());
        }
        // The held-back rows are written first (the search reads the index tables), in the same round
        // trip: the flush's statements are sent before the search's, and the server runs them in order.
        // Unless none of them is of the searched type, which is all a search reads.
        let relevant = self.own.unwritten_of(query.rtype)
            || self.kept.iter().any(|b| b.unwritten_of(query.rtype));
        if !relevant {
            let r = self.rt.block_on(sql::search(self.conn, query, false));
            return self.watch(r).map(|r| r.resources);
        }
        // A token search that no version written in this batch could match: the database's answer stands
        // without writing the held-back rows first, unless it holds a resource this batch wrote (then the
        // search runs again below, after the flush). Spares a batch of creates a flush per search.
        if pending::answerable_ahead(query) && !self.batch_may_match(query) {
            let r = self.rt.block_on(sql::search(self.conn, query, false));
            let found = self.watch(r)?.resources;
            if !self.batch_wrote_any(query.rtype, &found) {
                return Ok(found);
            }
        }
        let own_rows = self.own.unwritten();
        let mut bufs: Vec<&mut JobBuf> = self.kept.iter_mut().collect();
        bufs.push(&mut self.own);
        let conn = self.conn;
        let (flushed, found) = self.rt.block_on(async {
            let statements = match pending::prepare(conn).await {
                Ok(s) => s,
                Err(e) => return (Err(e), Err(StoreError::Backend("not searched".into()))),
            };
            tokio::join!(
                biased;
                pending::flush(conn, &statements, &mut bufs),
                sql::search(conn, query, false)
            )
        });
        let wrote = self.watch(flushed)?;
        if wrote && own_rows {
            self.touched = true;
        }
        self.watch(found).map(|r| r.resources)
    }
    fn put(&mut self, put: Put) -> Result<Stored> {
        let r = self.rt.block_on(sql::put(
            self.conn,
            &mut self.own,
            self.kept,
            self.seen,
            self.now_ms,
            put,
        ));
        self.watch(r)
    }
    fn put_at(&mut self, put: Put, last_updated_ms: i64) -> Result<Stored> {
        let r = self.rt.block_on(sql::put(
            self.conn,
            &mut self.own,
            self.kept,
            self.seen,
            last_updated_ms,
            put,
        ));
        self.watch(r)
    }
    fn delete(
        &mut self,
        rtype: ResourceType,
        id: &str,
        expected_version: Option<u64>,
    ) -> Result<Option<Stored>> {
        let r = self.rt.block_on(sql::delete(
            self.conn,
            &mut self.own,
            self.kept,
            self.seen,
            self.now_ms,
            rtype,
            id,
            expected_version,
        ));
        self.watch(r)
    }
    fn append_event(&mut self, event: NewEvent) -> Result<Event> {
        let r = self.rt.block_on(sql::append_event(
            self.conn,
            &mut self.own,
            self.kept,
            self.seen,
            self.next_seq,
            self.now_ms,
            event,
        ));
        let appended = self.watch(r)?;
        self.last_seq = self.last_seq.max(Some(appended.seq));
        Ok(appended)
    }
    fn idempotency_get(&mut self, key: &str) -> Result<Option<IdempotencyRecord>> {
        let r = self.rt.block_on(sql::idempotency_get(self.conn, key));
        self.watch(r)
    }
    fn idempotency_put(&mut self, record: IdempotencyRecord) -> Result<()> {
        let copy = self.record.then(|| record.clone());
        let r = self.rt.block_on(sql::idempotency_put(self.conn, record));
        self.direct(r)?;
        if let Some(record) = copy {
            self.changes.push(Change::Idempotency(record));
        }
        Ok(())
    }
    fn kv_get(&mut self, namespace: &str, key: &str) -> Result<Option<String>> {
        let r = self.rt.block_on(sql::kv_get(self.conn, namespace, key));
        self.watch(r)
    }
    fn kv_put(&mut self, namespace: &str, key: &str, value: Option<&str>) -> Result<()> {
        let r = self
            .rt
            .block_on(sql::kv_put(self.conn, namespace, key, value));
        self.direct(r)?;
        if self.record {
            self.changes.push(Change::Kv {
                namespace: namespace.to_string(),
                key: key.to_string(),
                value: value.map(str::to_string),
            });
        }
        Ok(())
    }
    fn enqueue_delivery(&mut self, subscription: &str, event: &Event) -> Result<bool> {
        let r = self.rt.block_on(sql::enqueue_delivery(
            self.conn,
            self.now_ms,
            subscription,
            event.seq,
            &event.subject,
        ));
        let inserted = self.direct(r)?;
        self.deliveries += u64::from(inserted);
        // A refused (existing) delivery changed nothing: nothing to replay.
        if self.record && inserted {
            self.changes.push(Change::Enqueue {
                subscription: subscription.to_string(),
                seq: event.seq,
                subject: event.subject.clone(),
            });
        }
        Ok(inserted)
    }
    fn enqueue_deliveries(&mut self, subscription: &str, events: &[Event]) -> Result<Vec<bool>> {
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        let subjects: Vec<&str> = events.iter().map(|e| e.subject.as_str()).collect();
        let r = self.rt.block_on(sql::enqueue_deliveries(
            self.conn,
            self.now_ms,
            subscription,
            &seqs,
            &subjects,
        ));
        let mut new = self.direct(r)?;
        // In order: the first event of a seq takes it, a repeat finds it taken.
        let enqueued: Vec<bool> = events.iter().map(|e| new.remove(&e.seq)).collect();
        for (event, _) in events.iter().zip(&enqueued).filter(|(_, n)| **n) {
            self.deliveries += 1;
            if self.record {
                self.changes.push(Change::Enqueue {
                    subscription: subscription.to_string(),
                    seq: event.seq,
                    subject: event.subject.clone(),
                });
            }
        }
        Ok(enqueued)
    }
    fn update_delivery(
        &mut self,
        subscription: &str,
        seq: i64,
        update: DeliveryUpdate,
    ) -> Result<()> {
        let r = self.rt.block_on(sql::update_delivery(
            self.conn,
            self.now_ms,
            subscription,
            seq,
            &update,
        ));
        self.direct(r)?;
        if self.record {
            self.changes.push(Change::UpdateDelivery {
                subscription: subscription.to_string(),
                seq,
                update,
            });
        }
        Ok(())
    }
    fn delivery(&mut self, subscription: &str, seq: i64) -> Result<Option<store::Delivery>> {
        let q = store::DeliveryQuery {
            subscription: Some(subscription.to_string()),
            state: None,
            after_seq: seq - 1,
            limit: 1,
        };
        let found = self.rt.block_on(sql::deliveries(self.conn, &q))?;
        Ok(found.into_iter().find(|d| d.seq == seq))
    }
    fn requeue_dead(&mut self, subscription: &str) -> Result<u64> {
        let r = self
            .rt
            .block_on(sql::requeue_dead(self.conn, self.now_ms, subscription));
        let count = self.direct(r)?;
        self.deliveries += count;
        if self.record && count > 0 {
            self.changes.push(Change::RequeueDead {
                subscription: subscription.to_string(),
                count,
            });
        }
        Ok(count)
    }
}

/// A job that ran and is to be kept: how to answer it, and (without a savepoint) its changes.
struct Kept {
    finish: Finish,
    now_ms: i64,
    changes: Vec<Change>,
    /// The highest outbox seq the job appended.
    last_seq: Option<i64>,
    /// Deliveries the job enqueued or requeued.
    deliveries: u64,
}

pub(crate) struct Writer {
    pub(crate) rt: Runtime,
    pub(crate) config: Config,
    /// The write connection; `None` after it was lost (reconnected at the next batch).
    pub(crate) conn: Option<Conn>,
    pub(crate) jobs: mpsc::Receiver<JobBox>,
    pub(crate) max_batch: usize,
    pub(crate) savepoint_per_write: bool,
    /// The last instant handed out (never goes backwards).
    pub(crate) last_ms: i64,
    /// The outbox seq the next event gets (max + 1, read under the write lock when a batch begins).
    pub(crate) next_seq: i64,
    /// The highest committed outbox seq, published after each COMMIT that appended events.
    pub(crate) events: Arc<watch::Sender<i64>>,
    pub(crate) analyzer: Analyzer,
}

/// Fewest resource versions written before the writer asks for fresh statistics.
const ANALYZE_MIN_ROWS: u64 = 2_000;

/// Refreshes the planner's statistics after bulk growth.
///
/// Why: PostgreSQL's autovacuum analyzes a table only at its next round (a minute apart by default) after 10%
/// growth. A store that grows from empty to tens of thousands of rows in seconds (slots generated for a year,
/// an import) is searched meanwhile with plans made for empty tables, which join the index tables by nested
/// scans: a page of 1,000 slots took seconds instead of a quarter of a second. So once the versions this
/// process committed since the last ANALYZE reach half the table (at least [`ANALYZE_MIN_ROWS`]), one
/// `ANALYZE` runs on a connection of its own, in a thread of its own, never inside a write batch. The
/// threshold grows with the table, so a large store is analyzed rarely.
///
/// Deliveries enqueued or requeued count as growth too: a `$replay` puts tens of thousands of rows into the
/// delivery tables at once, and the dispatcher's and writer's prepared statements on them (a delivery by
/// primary key, the next due time) had generic plans made while they were empty, whole-table scans kept
/// until the next ANALYZE (which invalidates them): each took milliseconds instead of microseconds.
///
/// Past a tenth of the table (autovacuum's own threshold) it also runs, at most once per
/// [`ANALYZE_EVERY`]: the slots of a schedule generated into a large store have a reference value absent from
/// the statistics, estimated at one row, so a day search was driven through all 50,000 of them (700 ms
/// instead of 8 ms) until autovacuum's next round, up to a minute later. Rate-limited, so a store growing
/// from empty is not analyzed at every tenth.
pub(crate) struct Analyzer {
    config: Config,
    running: Arc<std::sync::atomic::AtomicBool>,
    /// Versions and deliveries committed by this process since the last ANALYZE started.
    grown: u64,
    /// Rows of `versions` at the last ANALYZE (PostgreSQL's estimate when the store opened).
    base: u64,
    /// When the last ANALYZE started.
    last: Option<std::time::Instant>,
}

/// Shortest time between two ANALYZE runs started past a tenth of the table (not half).
const ANALYZE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

impl Analyzer {
    pub(crate) fn new(config: Config) -> Analyzer {
        Analyzer {
            config,
            running: Arc::default(),
            grown: 0,
            base: 0,
            last: None,
        }
    }

    /// A batch that wrote `rows` resource versions and deliveries was committed.
    fn committed(&mut self, rows: u64) {
        use std::sync::atomic::Ordering;
        self.grown += rows;
        let due = self.grown >= ANALYZE_MIN_ROWS.max(self.base / 2)
            || (self.grown >= ANALYZE_MIN_ROWS.max(self.base / 10)
                && self.last.is_none_or(|t| t.elapsed() >= ANALYZE_EVERY));
        if !due || self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        self.last = Some(std::time::Instant::now());
        self.base += self.grown;
        self.grown = 0;
        let (config, running) = (self.config.clone(), self.running.clone());
        let started = std::thread::Builder::new()
            .name("carebridge-pg-analyze".into())
            .spawn(move || {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    let result: Result<()> = rt.block_on(async {
                        let (conn, connection) = Conn::open(&config).await?;
                        tokio::spawn(async move {
                            let _ = connection.await;
                        });
                        conn.batch("ANALYZE").await
                    });
                    if let Err(e) = result {
                        eprintln!("carebridge: refreshing PostgreSQL statistics failed: {e}");
                    }
                }
                running.store(false, Ordering::Release);
            });
        if started.is_err() {
            self.running.store(false, Ordering::Release);
        }
    }
}

fn system_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn diverged(what: &str) -> StoreError {
    StoreError::Backend(format!("replay after a failed write diverged ({what})"))
}

/// Raise the watch to `seq` (never lower it).
pub(crate) fn publish(events: &watch::Sender<i64>, seq: i64) {
    events.send_if_modified(|current| {
        let newer = seq > *current;
        if newer {
            *current = seq;
        }
        newer
    });
}

/// A resource's key: its type and id.
type Key = (ResourceType, String);

/// The first round of reads ahead: every key the jobs named, once (up to [`READ_AHEAD_MAX`]), and the set
/// of keys asked for (a key left out is neither asked nor refused: the job reads it when it needs it).
fn first_round(aheads: &[&ReadAhead]) -> (Vec<Key>, HashSet<Key>) {
    let mut asked = HashSet::new();
    let mut round = Vec::new();
    for key in aheads.iter().flat_map(|a| a.keys.iter()) {
        if round.len() < READ_AHEAD_MAX && asked.insert(key.clone()) {
            round.push(key.clone());
        }
    }
    (round, asked)
}

/// The searches the jobs said they will run that can be answered ahead (each once, up to
/// [`SEARCH_AHEAD_MAX`]). Not one the search would refuse (a NUL in a value): its error must be its own
/// write's, not the whole batch's.
fn searches_ahead(aheads: &[&ReadAhead]) -> Vec<SearchQuery> {
    let mut out: Vec<SearchQuery> = Vec::new();
    for q in aheads.iter().flat_map(|a| a.searches.iter()) {
        if out.len() < SEARCH_AHEAD_MAX
            && pending::answerable_ahead(q)
            && !sql::has_nul(q)
            && !out.contains(q)
        {
            out.push(q.clone());
        }
    }
    out
}

/// Parse one column of the batch's opening query.
fn parse_i64(what: &str, v: Option<&str>) -> Result<i64> {
    let v = v.ok_or_else(|| {
        StoreError::Backend(format!(
            "{what} is missing (was the schema changed by hand?)"
        ))
    })?;
    v.parse::<i64>()
        .map_err(|e| StoreError::Backend(format!("{what} is {v:?}: {e}")))
}

impl Writer {
    /// Open the write connection and check the schema; returns the highest committed outbox seq.
    pub(crate) fn start(&mut self) -> Result<i64> {
        self.connect()?;
        let conn = self.conn()?;
        let status = self.rt.block_on(schema::status(conn))?;
        status.check()?;
        let rows = self.rt.block_on(conn.query_one(
            "SELECT GREATEST(reltuples, 0)::bigint FROM pg_class WHERE relname = 'versions'",
            &[],
        ))?;
        let seq = self.rt.block_on(sql::last_event_seq(conn))?;
        self.analyzer.base = rows.try_get::<_, i64>(0).map_or(0, |n| n.max(0) as u64);
        Ok(seq)
    }

    fn connect(&mut self) -> Result<()> {
        let (conn, connection) = self.rt.block_on(Conn::open(&self.config))?;
        self.rt.spawn(async move {
            let _ = connection.await;
        });
        // Every statement of the writer is planned once per connection: the plans do not depend on values
        // (lookups by key, arrays of rows), and re-planning cost more than running them.
        self.rt
            .block_on(conn.batch("SET plan_cache_mode = force_generic_plan"))?;
        self.conn = Some(conn);
        Ok(())
    }

    fn conn(&self) -> Result<&Conn> {
        self.conn
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("no database connection".into()))
    }

    fn lost(&self) -> bool {
        self.conn.as_ref().is_none_or(Conn::is_closed)
    }

    /// Run until every sender is gone (the store was dropped) and the queue is empty.
    pub(crate) fn run(mut self) {
        let mut batch: Vec<JobBox> = Vec::with_capacity(self.max_batch);
        while let Some(first) = self.jobs.blocking_recv() {
            batch.push(first);
            while batch.len() < self.max_batch {
                match self.jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.run_batch(&mut batch);
        }
    }

    fn tick(&mut self) -> i64 {
        self.last_ms = self.last_ms.max(system_ms());
        self.last_ms
    }

    fn exec(&self, sql: &str) -> Result<()> {
        let conn = self.conn()?;
        self.rt.block_on(conn.batch(sql))
    }

    /// Start the batch transaction: take the write lock, catch up with the shared clock and the outbox,
    /// set the savepoint a failed job rolls back to, and read ahead what the batch's jobs said they will
    /// read ([`ReadAhead`]) into `seen`. Reconnects first if the connection was lost.
    ///
    /// Two round trips at most: the first round of reads ahead (the keys the jobs named) is sent right
    /// behind BEGIN and the lock in the same round trip (the server runs them in order, so the reads see
    /// the database under the lock, as a job's own first read would); the second round (where the found
    /// resources lead) follows. The reads ahead are fetched for the transaction's start, before any job.
    fn begin(&mut self, seen: &mut Seen, aheads: &[&ReadAhead]) -> Result<()> {
        let (first, mut asked) = first_round(aheads);
        let searches = searches_ahead(aheads);
        let opened = match self.try_begin(seen, &first, &searches) {
            // A connection that died while idle is noticed only when used: connect again, once.
            Err(_) if self.lost() => {
                *seen = Seen::default();
                self.try_begin(seen, &first, &searches)
            }
            other => other,
        };
        opened.and_then(|()| self.follow_round(seen, aheads, &mut asked))
    }

    fn try_begin(
        &mut self,
        seen: &mut Seen,
        first: &[Key],
        searches: &[SearchQuery],
    ) -> Result<()> {
        if self.lost() {
            self.conn = None;
            self.connect()?;
        }
        let conn = self.conn()?;
        let (opened, read, searched) = self.rt.block_on(async {
            let begin = async {
                let messages = conn
                    .client
                    .simple_query(&format!(
                        "BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK}); \
                         SELECT last_ms, (SELECT COALESCE(MAX(seq), 0) FROM outbox) FROM store_clock; \
                         SAVEPOINT batch"
                    ))
                    .await
                    .map_err(crate::conn::db)?;
                let row = messages.iter().rev().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                    _ => None,
                });
                let row = row.ok_or_else(|| {
                    StoreError::Backend(
                        "store_clock is empty (was the schema changed by hand?)".into(),
                    )
                })?;
                Ok((
                    parse_i64("store_clock.last_ms", row.get(0))?,
                    parse_i64("the highest outbox seq", row.get(1))?,
                ))
            };
            // Sent after the BEGIN (biased: polled second, so queued behind it on the connection).
            let read = async {
                if first.is_empty() {
                    Ok(())
                } else {
                    sql::read_ahead(conn, seen, first).await
                }
            };
            // The searches told ahead, behind those in the same round trip.
            let search = async {
                let mut answers = Vec::with_capacity(searches.len());
                let results = crate::conn::join_in_order(
                    searches
                        .iter()
                        .map(|q| sql::search(conn, q, false))
                        .collect(),
                )
                .await;
                for (q, r) in searches.iter().zip(results) {
                    answers.push((q.clone(), r?.resources));
                }
                Ok::<_, StoreError>(answers)
            };
            tokio::join!(biased; begin, read, search)
        });
        let read = read.and_then(|()| {
            searched.map(|answers| {
                seen.searches = answers;
            })
        });
        match opened.and_then(|o| read.map(|()| o)) {
            Ok((clock, max_seq)) => {
                self.last_ms = self.last_ms.max(clock);
                self.next_seq = max_seq + 1;
                Ok(())
            }
            Err(e) => {
                self.rollback_all();
                Err(e)
            }
        }
    }

    /// The second round of reads ahead: where the resources found in the first lead
    /// ([`ReadAhead::follow`]), except what was read or asked for already.
    fn follow_round(
        &self,
        seen: &mut Seen,
        aheads: &[&ReadAhead],
        asked: &mut HashSet<Key>,
    ) -> Result<()> {
        let mut round: Vec<Key> = Vec::new();
        for ahead in aheads {
            let Some(follow) = ahead.follow else { continue };
            for key in &ahead.keys {
                if let Some((_, Some(found))) = seen.resources.get(key)
                    && !found.deleted
                {
                    for next in follow(found) {
                        if round.len() < READ_AHEAD_MAX
                            && !seen.resources.contains_key(&next)
                            && asked.insert(next.clone())
                        {
                            round.push(next);
                        }
                    }
                }
            }
        }
        if round.is_empty() {
            return Ok(());
        }
        let conn = self.conn()?;
        let read = self.rt.block_on(sql::read_ahead(conn, seen, &round));
        if read.is_err() {
            // Only a SELECT failed, but the transaction is unusable.
            self.rollback_all();
        }
        read
    }

    /// Roll back whatever is open, ignoring errors.
    fn rollback_all(&self) {
        if let Some(conn) = &self.conn
            && !conn.is_closed()
        {
            let _ = self.rt.block_on(conn.batch("ROLLBACK"));
        }
    }

    /// Make the recorded direct changes of `kept` again, in order, checking that they come out the same.
    /// (Held-back rows need no replay: the buffers are written again by the next flush.)
    fn replay(&self, kept: &[Kept]) -> Result<()> {
        let conn = self.conn()?;
        let rt = &self.rt;
        for job in kept {
            for change in &job.changes {
                match change {
                    Change::Idempotency(record) => {
                        rt.block_on(sql::idempotency_put(conn, record.clone()))?;
                    }
                    Change::Kv {
                        namespace,
                        key,
                        value,
                    } => rt.block_on(sql::kv_put(conn, namespace, key, value.as_deref()))?,
                    Change::Enqueue {
                        subscription,
                        seq,
                        subject,
                    } => {
                        if !rt.block_on(sql::enqueue_delivery(
                            conn,
                            job.now_ms,
                            subscription,
                            *seq,
                            subject,
                        ))? {
                            return Err(diverged("delivery enqueue"));
                        }
                    }
                    Change::UpdateDelivery {
                        subscription,
                        seq,
                        update,
                    } => rt
                        .block_on(sql::update_delivery(
                            conn,
                            job.now_ms,
                            subscription,
                            *seq,
                            update,
                        ))
                        .map_err(|e| match e {
                            StoreError::Backend(_) | StoreError::Unavailable(_) => e,
                            _ => diverged("delivery update"),
                        })?,
                    Change::RequeueDead {
                        subscription,
                        count,
                    } => {
                        if rt.block_on(sql::requeue_dead(conn, job.now_ms, subscription))? != *count
                        {
                            return Err(diverged("requeue of dead deliveries"));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn run_batch(&mut self, batch: &mut Vec<JobBox>) {
        let mut jobs = batch.drain(..);
        let mut kept: Vec<Kept> = Vec::new();
        // The held-back rows of the kept jobs, in the same order.
        let mut bufs: Vec<JobBuf> = Vec::new();
        let mut seen = Seen::default();
        let mut open = false;
        // Off until a job of this batch has to be undone by a rollback (unless configured on); then every
        // job gets its own savepoint.
        let mut savepoints = self.savepoint_per_write;
        while let Some(job) = jobs.next() {
            if !open {
                // A new transaction (the first, or after the batch's one was given up): other processes may
                // have committed since anything was read.
                seen = Seen::default();
                let aheads: Vec<&ReadAhead> = std::iter::once(job.ahead())
                    .chain(jobs.as_slice().iter().map(|j| j.ahead()))
                    .collect();
                if let Err(e) = self.begin(&mut seen, &aheads) {
                    // Nothing began, or only a SELECT failed but the transaction is unusable (rolled
                    // back): give up on the batch.
                    job.fail(e.clone());
                    for job in jobs.by_ref() {
                        job.fail(e.clone());
                    }
                    return;
                }
                open = true;
            }
            if savepoints && let Err(e) = self.exec("SAVEPOINT job") {
                // The transaction is unusable: give up on the batch so far.
                self.rollback_all();
                open = false;
                for k in kept.drain(..) {
                    (k.finish)(Some(e.clone()));
                }
                bufs.clear();
                job.fail(e);
                continue;
            }
            // What the kept buffers had written when this job's savepoint was taken.
            let written_before: Vec<Written> = if savepoints {
                bufs.iter().map(|b| b.written).collect()
            } else {
                Vec::new()
            };
            let seq_before = self.next_seq;
            let now_ms = self.tick();
            let Some(conn) = self.conn.as_ref() else {
                job.fail(StoreError::Unavailable("no database connection".into()));
                continue;
            };
            let mut tx = WriteTx {
                conn,
                rt: &self.rt,
                now_ms,
                broken: None,
                record: !savepoints,
                changes: Vec::new(),
                last_seq: None,
                deliveries: 0,
                own: JobBuf::default(),
                kept: &mut bufs,
                seen: &mut seen,
                next_seq: &mut self.next_seq,
                touched: false,
            };
            // `run` catches the closure's panics itself; this guard is for anything else.
            let outcome =
                catch_unwind(AssertUnwindSafe(|| job.run(&mut tx))).unwrap_or_else(|_| Outcome {
                    ok: false,
                    finish: Box::new(|_| {}),
                });
            // Why the job's changes must go although its closure returned Ok.
            let mut veto = tx.broken.take();
            let changes = std::mem::take(&mut tx.changes);
            let last_seq = tx.last_seq;
            let deliveries = tx.deliveries;
            let touched = tx.touched || veto.is_some();
            let own = std::mem::take(&mut tx.own);

            if self.lost() {
                // The connection went away mid-transaction: everything of this batch so far is gone.
                let err = StoreError::Unavailable("the database connection was lost".into());
                for k in kept.drain(..) {
                    (k.finish)(Some(err.clone()));
                }
                bufs.clear();
                (outcome.finish)(Some(veto.unwrap_or(err)));
                open = false;
                continue;
            }
            let keep = outcome.ok && veto.is_none();
            if savepoints {
                if keep && let Err(e) = self.exec("RELEASE SAVEPOINT job") {
                    veto = Some(e);
                }
                if !keep || veto.is_some() {
                    // Undo the job: its rows go with its buffer; what it (or a flush during it) wrote goes
                    // with the savepoint.
                    self.next_seq = seq_before;
                    for (b, w) in bufs.iter_mut().zip(&written_before) {
                        b.written = *w;
                    }
                    if let Err(e) = self.exec("ROLLBACK TO SAVEPOINT job; RELEASE SAVEPOINT job") {
                        // The job's changes may still be there: give up on the whole transaction.
                        self.rollback_all();
                        open = false;
                        for k in kept.drain(..) {
                            (k.finish)(Some(e.clone()));
                        }
                        bufs.clear();
                    }
                }
            } else if !keep {
                self.next_seq = seq_before;
                if touched {
                    // The job changed the database: back to the start of the batch (the write lock stays
                    // held), redo the direct changes of the jobs before it (their held-back rows are written
                    // again by the next flush), and use savepoints for the rest of the batch so that a batch
                    // replays at most once.
                    savepoints = !kept.is_empty();
                    for b in &mut bufs {
                        b.written = Written::default();
                    }
                    let redone = self
                        .exec("ROLLBACK TO SAVEPOINT batch")
                        .and_then(|()| self.replay(&kept));
                    if let Err(e) = redone {
                        self.rollback_all();
                        open = false;
                        for k in kept.drain(..) {
                            (k.finish)(Some(e.clone()));
                        }
                        bufs.clear();
                    }
                }
                // Otherwise its changes were only in its buffer, which is dropped here.
            }
            if keep && veto.is_none() {
                kept.push(Kept {
                    finish: outcome.finish,
                    now_ms,
                    changes,
                    last_seq,
                    deliveries,
                });
                bufs.push(own);
            } else {
                // Its changes are gone; it can be answered now (its own error, else the veto).
                (outcome.finish)(Some(veto.unwrap_or_else(|| {
                    StoreError::Backend("the write was rolled back".into())
                })));
            }
        }
        if !open {
            return;
        }
        let last_seq = kept.iter().filter_map(|k| k.last_seq).max();
        let notify = last_seq
            .map(|seq| format!("NOTIFY {EVENTS_CHANNEL}, '{seq}'; "))
            .unwrap_or_default();
        let commit = format!(
            "UPDATE store_clock SET last_ms = GREATEST(last_ms, {}); {notify}COMMIT",
            self.last_ms
        );
        // The last held-back rows and the COMMIT in one round trip (sent in that order). If a flush
        // statement fails, the transaction is aborted and PostgreSQL turns the COMMIT into a ROLLBACK, so
        // the flush's error decides.
        let versions: usize = bufs.iter().map(JobBuf::version_count).sum();
        let deliveries: u64 = kept.iter().map(|k| k.deliveries).sum();
        let committed = match self.conn() {
            Ok(conn) => {
                let mut all: Vec<&mut JobBuf> = bufs.iter_mut().collect();
                self.rt.block_on(async {
                    let statements = pending::prepare(conn).await?;
                    let (flushed, commit) = tokio::join!(
                        biased;
                        pending::flush(conn, &statements, &mut all),
                        conn.batch(&commit)
                    );
                    flushed.and(commit)
                })
            }
            Err(e) => Err(e),
        };
        match committed {
            Ok(()) => {
                // Publish the new outbox position before anyone hears of the commit.
                if let Some(seq) = last_seq {
                    publish(&self.events, seq);
                }
                for k in kept {
                    (k.finish)(None);
                }
                self.analyzer.committed(versions as u64 + deliveries);
            }
            Err(e) => {
                self.rollback_all();
                let err = StoreError::Backend(format!("commit failed: {e}"));
                for k in kept {
                    (k.finish)(Some(err.clone()));
                }
            }
        }
    }
}
