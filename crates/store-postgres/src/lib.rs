//! PostgreSQL backend of the Carebridge storage port ([`store::Store`]).
//!
//! Why it exists: a deployment that runs several hub processes (or wants the database on its own server,
//! with its backups and replicas) keeps the same data model as the embedded SQLite store in PostgreSQL:
//! versioned resources with history, the search index, the outbox, idempotency records, named values and
//! event deliveries. It passes the same conformance suite (`store::conformance`).
//!
//! Invariants:
//! - Only this crate touches the PostgreSQL driver; no driver type appears in its public API (errors are
//!   [`store::StoreError`]).
//! - Writes of every process sharing a database are serialised: each write batch is one transaction that
//!   first takes `pg_advisory_xact_lock(WRITE_LOCK)`. So a closure sees every earlier commit (conditional
//!   creates and slot claims are race-free), `subject_seq` is gap-free and the outbox `seq` (max + 1 under
//!   the lock) increases in commit order. Within a process one writer thread groups queued writes into one
//!   transaction (group commit); each closure stays all-or-nothing (see `writer.rs`). The rows of a batch's
//!   resources, versions, index entries and events are held back and written by one fixed-shape statement
//!   per table, pipelined with the COMMIT (or with a search inside the batch) in one round trip
//!   (`pending.rs`); reads inside the batch see them. A created resource's index rows are inserted
//!   plainly; those an update keeps are left as they are (only removed rows are deleted, only new ones
//!   inserted). What the batch reads from the database
//!   (a resource's rid, version and subject seq) is remembered until the batch ends, which the write lock
//!   makes safe.
//! - A write is acknowledged only after COMMIT returned (the server's `synchronous_commit` decides what that
//!   survives; the default survives power loss).
//! - A write's clock never goes behind the newest instant any process handed out (`store_clock`), so a
//!   resource's version order and `lastUpdated` order agree.
//! - [`Store::watch_events`] follows commits of every process: this process's writer publishes before it
//!   acknowledges; other processes' commits arrive through `LISTEN carebridge_events` (the COMMIT carries a
//!   NOTIFY) and, as a fallback, a poll of the highest seq every [`PgOptions::poll_interval`].
//! - The schema is versioned (`schema_migrations`, append-only migrations) and changed only by [`migrate`]:
//!   [`PgStore::connect`] refuses a database that is not migrated to exactly this binary's version.
//! - Text that is compared or sorted uses the `"C"` collation (code point order, like SQLite's `BINARY`);
//!   resource JSON is stored as text, byte for byte.
//!
//! Connection strings: key-value (`host=/run/postgresql port=5432 user=carebridge dbname=carebridge`) or URL
//! (`postgres://carebridge@/carebridge?host=/run/postgresql`, `postgres://user:password@db:5432/name`). A
//! host that is a directory path means the Unix socket in it (much faster than TCP loopback). No TLS.

mod conn;
mod pending;
mod reads;
mod schema;
mod sql;
pub mod testing;
mod writer;

use std::future::Future;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use store::{
    Delivery, DeliveryCounts, DeliveryQuery, Event, HistoryQuery, ReadAhead, ResourceType, Result,
    SearchQuery, SearchResult, Store, StoreError, Stored, Tx,
};
use tokio::sync::{mpsc, oneshot, watch};

pub use schema::{MigrateReport, SchemaStatus};

use conn::Conn;
use reads::ReadPool;
use writer::{JobBox, WriteJob, Writer};

/// Tuning of a [`PgStore`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Connections kept for reads (at least 1); each carries many concurrent reads (pipelined).
    pub read_connections: usize,
    /// Most writes committed together in one transaction (at least 1).
    pub max_batch: usize,
    /// Give every write its own SAVEPOINT instead of recording its changes for a replay (see `writer.rs`).
    pub savepoint_per_write: bool,
    /// How often the highest committed outbox seq is polled, in case a notification was missed.
    pub poll_interval: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            read_connections: 4,
            max_batch: 256,
            savepoint_per_write: false,
            poll_interval: Duration::from_millis(500),
        }
    }
}

/// Run `f` on a fresh current-thread runtime on a thread of its own, so the blocking entry points of this
/// crate work whether or not the caller is inside an async runtime.
fn on_own_runtime<T: Send>(
    f: impl FnOnce(&tokio::runtime::Runtime) -> Result<T> + Send,
) -> Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| StoreError::Unavailable(format!("cannot start a runtime: {e}")))?;
                f(&rt)
            })
            .join()
            .unwrap_or_else(|_| Err(StoreError::Backend("a database task panicked".into())))
    })
}

/// Connect once for a maintenance task; the connection lives as long as the runtime.
async fn open_once(url: &str) -> Result<Conn> {
    let config = conn::parse_url(url)?;
    let (c, connection) = Conn::open(&config).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(c)
}

/// Bring the database's schema up to this binary's version (what `carebridge migrate` runs). Safe to run
/// from several processes at once (an advisory lock makes them take turns); a no-op when up to date.
/// Refuses a database whose schema is newer than this binary.
pub fn migrate(url: &str) -> Result<MigrateReport> {
    on_own_runtime(|rt| {
        rt.block_on(async {
            let c = open_once(url).await?;
            schema::migrate(&c).await
        })
    })
}

/// The database's schema version next to this binary's (for `carebridge migrate --status` and health
/// checks). Changes nothing.
pub fn schema_status(url: &str) -> Result<SchemaStatus> {
    on_own_runtime(|rt| {
        rt.block_on(async {
            let c = open_once(url).await?;
            schema::status(&c).await
        })
    })
}

/// Run a read on a pooled connection: `on_pool!(pool, |c| future using c)`. A read that failed because its
/// connection had died (noticed only when used) runs once more on a fresh one.
macro_rules! on_pool {
    ($pool:expr, |$c:ident| $body:expr) => {{
        let $c = $pool.get().await?;
        match $body.await {
            Err(StoreError::Unavailable(_)) if $c.is_closed() => {
                let $c = $pool.get().await?;
                $body.await
            }
            other => other,
        }
    }};
}

/// The PostgreSQL store. Dropping it stops the writer after the writes already queued, then closes every
/// connection.
pub struct PgStore {
    jobs: Option<mpsc::Sender<JobBox>>,
    writer: Option<JoinHandle<()>>,
    reads: Arc<ReadPool>,
    /// The highest committed outbox seq (of any process).
    events: Arc<watch::Sender<i64>>,
    /// Dropping it stops the I/O thread (read connections, LISTEN, poll).
    io_stop: Option<oneshot::Sender<()>>,
    io: Option<JoinHandle<()>>,
}

impl PgStore {
    /// Open the store on the database named by `url`. Refuses ([`StoreError::Unavailable`]) a database that
    /// is not migrated to this binary's schema version (run [`migrate`] first) or whose schema is newer.
    pub fn connect(url: &str, options: PgOptions) -> Result<PgStore> {
        let config = conn::parse_url(url)?;
        let events = Arc::new(watch::Sender::new(0));
        let max_batch = options.max_batch.max(1);

        // The writer thread: connect and check the schema there, then serve jobs.
        let (tx, rx) = mpsc::channel(max_batch.saturating_mul(4));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<i64>>();
        let writer_config = config.clone();
        let writer_events = events.clone();
        let savepoint_per_write = options.savepoint_per_write;
        let writer = std::thread::Builder::new()
            .name("carebridge-pg-writer".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(StoreError::Unavailable(format!(
                            "cannot start the writer's runtime: {e}"
                        ))));
                        return;
                    }
                };
                let mut writer = Writer {
                    rt,
                    config: writer_config.clone(),
                    conn: None,
                    jobs: rx,
                    max_batch,
                    savepoint_per_write,
                    last_ms: 0,
                    next_seq: 1,
                    analyzer: writer::Analyzer::new(writer_config.clone()),
                    events: writer_events,
                };
                match writer.start() {
                    Ok(seq) => {
                        let _ = ready_tx.send(Ok(seq));
                        writer.run();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start the writer thread: {e}")))?;
        let last_seq = ready_rx.recv().unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the writer thread stopped while starting".into(),
            ))
        });
        let last_seq = match last_seq {
            Ok(seq) => seq,
            Err(e) => {
                let _ = writer.join();
                return Err(e);
            }
        };
        writer::publish(&events, last_seq);

        // The I/O thread: read connections, LISTEN, poll.
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (io_stop, io_stopped) = oneshot::channel::<()>();
        let io = std::thread::Builder::new()
            .name("carebridge-pg-io".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => {
                        let _ = handle_tx.send(Ok(rt.handle().clone()));
                        let _ = rt.block_on(io_stopped);
                    }
                    Err(e) => {
                        let _ = handle_tx.send(Err(StoreError::Unavailable(format!(
                            "cannot start the store's I/O runtime: {e}"
                        ))));
                    }
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start the I/O thread: {e}")))?;
        let handle = handle_rx.recv().unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the I/O thread stopped while starting".into(),
            ))
        });
        let handle = match handle {
            Ok(handle) => handle,
            Err(e) => {
                // Stop the writer (it has no jobs) before reporting.
                drop(tx);
                let _ = writer.join();
                let _ = io.join();
                return Err(e);
            }
        };
        let reads = Arc::new(ReadPool::new(
            config.clone(),
            handle.clone(),
            options.read_connections,
        ));
        handle.spawn(reads::listen(config, events.clone()));
        handle.spawn(reads::poll(
            reads.clone(),
            events.clone(),
            options.poll_interval,
        ));
        Ok(PgStore {
            jobs: Some(tx),
            writer: Some(writer),
            reads,
            events,
            io_stop: Some(io_stop),
            io: Some(io),
        })
    }

    /// The schema version this binary writes.
    pub fn schema_version() -> i64 {
        schema::latest_version()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish the queued jobs and return.
        self.jobs = None;
        if let Some(handle) = self.writer.take() {
            // A closure holding the last reference to the store may drop it on the writer thread itself.
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
        }
        self.io_stop = None;
        if let Some(handle) = self.io.take()
            && handle.thread().id() != std::thread::current().id()
        {
            let _ = handle.join();
        }
    }
}

impl Store for PgStore {
    fn write<T, F>(&self, f: F) -> impl Future<Output = Result<T>> + Send
    where
        F: FnOnce(&mut dyn Tx) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.write_reading(ReadAhead::default(), f)
    }

    fn reads_ahead(&self) -> bool {
        true
    }

    fn write_reading<T, F>(&self, ahead: ReadAhead, f: F) -> impl Future<Output = Result<T>> + Send
    where
        F: FnOnce(&mut dyn Tx) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: JobBox = Box::new(WriteJob { f, reply, ahead });
        let jobs = self.jobs.clone();
        async move {
            let Some(jobs) = jobs else {
                return Err(StoreError::Unavailable("the store is closed".into()));
            };
            if jobs.send(job).await.is_err() {
                return Err(StoreError::Unavailable("the writer has stopped".into()));
            }
            answer.await.unwrap_or_else(|_| {
                Err(StoreError::Unavailable(
                    "the writer stopped mid-write".into(),
                ))
            })
        }
    }

    fn read(
        &self,
        rtype: ResourceType,
        id: &str,
    ) -> impl Future<Output = Result<Option<Stored>>> + Send {
        let id = id.to_string();
        let pool = self.reads.clone();
        async move { on_pool!(pool, |c| sql::read_current(&c, rtype, &id)) }
    }

    fn vread(
        &self,
        rtype: ResourceType,
        id: &str,
        version: u64,
    ) -> impl Future<Output = Result<Option<Stored>>> + Send {
        let id = id.to_string();
        let pool = self.reads.clone();
        async move { on_pool!(pool, |c| sql::read_version(&c, rtype, &id, version)) }
    }

    fn history(&self, query: &HistoryQuery) -> impl Future<Output = Result<SearchResult>> + Send {
        let query = query.clone();
        let pool = self.reads.clone();
        async move { on_pool!(pool, |c| sql::history(&c, &query)) }
    }

    fn search(&self, query: &SearchQuery) -> impl Future<Output = Result<SearchResult>> + Send {
        let query = query.clone();
        let pool = self.reads.clone();
        async move { on_pool!(pool, |c| sql::search(&c, &query, true)) }
    }

    fn events_after(
        &self,
        after: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Event>>> + Send {
        let pool = self.reads.clone();
        async move { on_pool!(pool, |c| sql::events_after(&c, after, limit)) }
    }

    fn watch_events(&self) -> watch::Receiver<i64> {
        self.events.subscribe()
    }

    fn kv_get(
        &self,
        namespace: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<String>>> + Send {
        let (namespace, key) = (namespace.to_string(), key.to_string());
        let pool = self.reads.clone();
        async move { on_pool!(pool, |c| sql::kv_get(&c, &namespace, &key)) }
    }

    fn due_deliveries(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Delivery>>> + Send {
        let pool = self.reads.clone();
        async move { on_pool!(pool, |c| sql::due_deliveries(&c, now_ms, limit)) }
    }

    fn due_deliveries_for(
        &self,
        subscription: &str,
        now_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Delivery>>> + Send {
        let subscription = subscription.to_string();
        let pool = self.reads.clone();
        async move {
            on_pool!(pool, |c| sql::due_deliveries_for(
                &c,
                &subscription,
                now_ms,
                limit
            ))
        }
    }

    fn next_due_ms(&self) -> impl Future<Output = Result<Option<i64>>> + Send {
        let pool = self.reads.clone();
        async move { on_pool!(pool, |c| sql::next_due_ms(&c)) }
    }

    fn deliveries(
        &self,
        query: &DeliveryQuery,
    ) -> impl Future<Output = Result<Vec<Delivery>>> + Send {
        let query = query.clone();
        let pool = self.reads.clone();
        async move { on_pool!(pool, |c| sql::deliveries(&c, &query)) }
    }

    fn delivery_counts(
        &self,
        subscription: &str,
    ) -> impl Future<Output = Result<DeliveryCounts>> + Send {
        let subscription = subscription.to_string();
        let pool = self.reads.clone();
        async move { on_pool!(pool, |c| sql::delivery_counts(&c, &subscription)) }
    }
}
