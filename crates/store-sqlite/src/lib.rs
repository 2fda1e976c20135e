//! Embedded SQLite backend of the Carebridge storage port ([`store::Store`]).
//!
//! Why it exists: a single binary must run with no database server. This crate keeps versioned FHIR
//! resources, their search index, the outbox and idempotency records in one SQLite file
//! (`<dir>/carebridge.db`, WAL mode) and passes the backend conformance suite in `store::conformance`.
//!
//! Invariants:
//! - Only this crate touches rusqlite; no driver type appears in its public API (errors are
//!   [`store::StoreError`]).
//! - The writer thread is the only writer: it owns the single read-write connection. Every write goes
//!   through it as a job; concurrent jobs share one `BEGIN IMMEDIATE` transaction (group commit), and a
//!   closure that fails (or panics) loses only its own changes: the writer rolls back and replays the
//!   recorded changes of the jobs before it, then gives each later job of the batch its own SAVEPOINT (see
//!   `writer.rs` for why not a savepoint per job from the start).
//! - A write is acknowledged only after COMMIT returned: with [`Durability::Fsync`] (the default) only after
//!   the WAL was also fsynced, so it survives power loss; with [`Durability::OsCrash`] it survives a crash of
//!   the process but not of the machine. A sync thread answers committed batches (after the fsync, with
//!   `Fsync`) while the writer goes on with the next batch (pipelined group commit, see `writer.rs`); readers
//!   may see a write from its COMMIT, up to one fsync before it is acknowledged, but the outbox is read
//!   (`events_after`) only up to the last durable event.
//! - Reads never go through the writer: they run inline on the calling thread on a small pool of read-only
//!   connections and see only committed data.
//! - The writer's clock never goes backwards (it starts from the newest stored instant), so a resource's
//!   version order and `lastUpdated` order agree.
//! - The schema is versioned (`PRAGMA user_version`, append-only migrations); a database written by a newer
//!   binary is refused rather than modified.
//!
//! Event delivery (migration 2): `deliveries` (one row per (subscription, outbox seq) with its state and
//! retry bookkeeping) and `delivery_heads` (one row per (subscription, subject) with a pending delivery: the
//! lowest pending seq and its next attempt). Every delivery write keeps the heads exact, so finding due work
//! reads heads only (`ORDER BY next_attempt_ms LIMIT n` on an index): deliveries queued behind a failing
//! subject or subscriber are never scanned. `kv` keeps small named values. The highest durable outbox seq is
//! published on a `tokio::sync::watch` by the sync thread after each COMMIT that appended events (after the
//! fsync, with [`Durability::Fsync`]).
//!
//! Schema (migration 1): `resources` (current version's metadata per type and id, with a stable integer
//! `rid`), `versions` (every version's JSON, tombstones included, written once), `idx_token` / `idx_string`
//! / `idx_date` / `idx_reference` (index rows of the live version, keyed for lookups by
//! `(rtype, param, value)` and deletable by `rid`), `outbox` + `subjects` (events with a global `seq` and a
//! gap-free per-subject `subject_seq`), `idempotency`. Migration 4: a string row holds the normalised value
//! and the value as sent (`exact`, for `:exact`) together, one row per string instead of two, and Patient /
//! Practitioner `name` no longer repeats the rows of `family` and `given` (a `name` search reads all three,
//! see `fhir::also_indexed_under`); Appointment `patient` / `practitioner` / `location` are answered from the
//! `actor` rows (`fhir::stored_as`) and not stored.
//!
//! Query planning: every connection enables SQLite's query planner stability guarantee (plans never depend
//! on bound values; without it SQLite 3.54 re-plans every cached statement on every use), and migration 1
//! seeds fixed `sqlite_stat1` statistics so that index lookups are preferred over type scans at any data
//! size. A search is two statements: the page of matching rows (clauses as `rid IN (SELECT rid FROM idx_*
//! ...)`, sorted, limited), then each row's JSON by primary key.

mod checkpoint;
mod pool;
mod schema;
mod sql;
mod walbuf;
mod writer;

use std::future::{Future, ready};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use std::sync::Arc;

use store::{
    Delivery, DeliveryCounts, DeliveryQuery, Event, HistoryQuery, ResourceType, Result,
    SearchQuery, SearchResult, Store, StoreError, Stored, Tx,
};
use tokio::sync::{mpsc, oneshot, watch};

use pool::ReadPool;
use writer::{JobBox, WriteJob, Writer};

/// The file inside the data directory.
pub const DB_FILE: &str = "carebridge.db";
/// The file beside it holding the append-only log namespaces ([`store::LOG_NAMESPACES`]: the audit trail).
pub const LOG_FILE: &str = "carebridge-log.db";

/// What an acknowledged write survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every batch's WAL frames are fsynced before any write of the batch is acknowledged; survives power loss.
    #[default]
    Fsync,
    /// No fsync at commit (`synchronous=NORMAL`); survives a process crash, not an OS crash or power loss.
    OsCrash,
}

#[derive(Debug, Clone)]
pub struct SqliteOptions {
    pub durability: Durability,
    /// Read-only connections kept for reads (at least 1).
    pub read_connections: usize,
    /// Most writes committed together in one transaction (at least 1).
    pub max_batch: usize,
    /// The writer hands each commit's WAL frames to the kernel in one write (`walbuf.rs`); `false` leaves
    /// them to SQLite (two writes per frame).
    pub wal_buffer: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            durability: Durability::Fsync,
            read_connections: 4,
            max_batch: 256,
            wal_buffer: true,
        }
    }
}

/// Connections of the pool for the outbox's tail and the due deliveries (its readers are the dispatcher, the
/// delivery sender and the event feed's long polls).
const TAIL_CONNECTIONS: usize = 2;

/// The SQLite store. Dropping it stops the writer after the writes already queued, and closes the database.
pub struct SqliteStore {
    jobs: Option<mpsc::Sender<JobBox>>,
    writer: Option<JoinHandle<()>>,
    reads: ReadPool,
    /// For the background readers that look at the outbox's tail and the due deliveries after every commit:
    /// without a memory map (see `schema::open_reader_mapped`).
    tail: ReadPool,
    path: PathBuf,
    /// The highest durable outbox seq (published after each COMMIT that appended events, after its fsync with
    /// [`Durability::Fsync`]); `events_after` reads no further.
    events: Arc<watch::Sender<i64>>,
    /// Dropping it stops the checkpoint thread.
    checkpoint_stop: Option<std::sync::mpsc::Sender<()>>,
    checkpointer: Option<JoinHandle<()>>,
}

impl SqliteStore {
    /// Open (creating if needed) the store in `dir`, migrating the schema to this binary's version.
    /// Refuses ([`StoreError::Unavailable`]) a database whose schema is newer than this binary.
    pub fn open(dir: &Path, options: SqliteOptions) -> Result<SqliteStore> {
        SqliteStore::open_with(dir, options, None)
    }

    /// [`SqliteStore::open`], with `sync` instead of what the durability mode does after COMMIT (tests).
    fn open_with(
        dir: &Path,
        options: SqliteOptions,
        sync: Option<writer::SyncFn>,
    ) -> Result<SqliteStore> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
        })?;
        let path = dir.join(DB_FILE);
        let wal_frames = std::sync::Arc::new(checkpoint::WalFrames::default());
        let conn = schema::open_writer(&path, options.wal_buffer, wal_frames.clone())?;
        let last_ms = sql::newest_instant(&conn)?;
        let events = Arc::new(watch::Sender::new(sql::last_event_seq(&conn)?));
        let max_batch = options.max_batch.max(1);
        let (tx, rx) = mpsc::channel(max_batch.saturating_mul(4));
        let sync = match (sync, options.durability) {
            (Some(sync), _) => sync,
            (None, Durability::Fsync) => {
                writer::fsync_wal(path.clone(), path.with_file_name(LOG_FILE))
            }
            (None, Durability::OsCrash) => Box::new(|_| Ok(())),
        };
        let writer = Writer {
            conn,
            jobs: rx,
            max_batch,
            last_ms,
            syncer: writer::Syncer::start(sync, events.clone())?,
        };
        let handle = std::thread::Builder::new()
            .name("carebridge-sqlite-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::Unavailable(format!("cannot start the writer thread: {e}")))?;
        let (stop_tx, stop_rx) = std::sync::mpsc::channel();
        let checkpoint_path = path.clone();
        let checkpointer = std::thread::Builder::new()
            .name("carebridge-sqlite-checkpoint".into())
            .spawn(move || checkpoint::run(&checkpoint_path, stop_rx, wal_frames))
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot start the checkpoint thread: {e}"))
            })?;
        Ok(SqliteStore {
            jobs: Some(tx),
            writer: Some(handle),
            reads: ReadPool::new(path.clone(), options.read_connections, true),
            tail: ReadPool::new(path.clone(), TAIL_CONNECTIONS, false),
            path,
            events,
            checkpoint_stop: Some(stop_tx),
            checkpointer: Some(checkpointer),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version this binary writes (the database's `user_version` after [`SqliteStore::open`]).
    pub fn schema_version() -> i64 {
        schema::latest_version()
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish the queued jobs and return.
        self.jobs = None;
        if let Some(handle) = self.writer.take() {
            // A closure holding the last reference to the store may drop it on the writer thread itself, and a
            // result nobody awaited any more is dropped on the sync thread, which the writer waits for on its way
            // out.
            let here = std::thread::current();
            if handle.thread().id() != here.id() && here.name() != Some(writer::SYNC_THREAD) {
                let _ = handle.join();
            }
        }
        self.checkpoint_stop = None;
        if let Some(handle) = self.checkpointer.take() {
            let _ = handle.join();
        }
    }
}

impl Store for SqliteStore {
    fn write<T, F>(&self, f: F) -> impl Future<Output = Result<T>> + Send
    where
        F: FnOnce(&mut dyn Tx) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: JobBox = Box::new(WriteJob { f, reply });
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
        ready(self.reads.with(|c| sql::read_current(c, rtype, id)))
    }

    fn vread(
        &self,
        rtype: ResourceType,
        id: &str,
        version: u64,
    ) -> impl Future<Output = Result<Option<Stored>>> + Send {
        ready(
            self.reads
                .with(|c| sql::read_version(c, rtype, id, version)),
        )
    }

    fn history(&self, query: &HistoryQuery) -> impl Future<Output = Result<SearchResult>> + Send {
        ready(self.reads.with(|c| sql::history(c, query)))
    }

    fn search(&self, query: &SearchQuery) -> impl Future<Output = Result<SearchResult>> + Send {
        ready(self.reads.with(|c| sql::search(c, query, true)))
    }

    fn events_after(
        &self,
        after: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Event>>> + Send {
        // Only durable events: a batch is visible from its COMMIT but published on the watch after its fsync.
        let upto = *self.events.borrow();
        ready(self.tail.with(|c| sql::events_after(c, after, upto, limit)))
    }

    fn watch_events(&self) -> watch::Receiver<i64> {
        self.events.subscribe()
    }

    fn kv_get(
        &self,
        namespace: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<String>>> + Send {
        ready(self.reads.with(|c| sql::kv_get(c, namespace, key)))
    }

    fn due_deliveries(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Delivery>>> + Send {
        ready(self.tail.with(|c| sql::due_deliveries(c, now_ms, limit)))
    }

    fn due_deliveries_for(
        &self,
        subscription: &str,
        now_ms: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Delivery>>> + Send {
        ready(
            self.tail
                .with(|c| sql::due_deliveries_for(c, subscription, now_ms, limit)),
        )
    }

    fn next_due_ms(&self) -> impl Future<Output = Result<Option<i64>>> + Send {
        ready(self.tail.with(sql::next_due_ms))
    }

    fn deliveries(
        &self,
        query: &DeliveryQuery,
    ) -> impl Future<Output = Result<Vec<Delivery>>> + Send {
        ready(self.reads.with(|c| sql::deliveries(c, query)))
    }

    fn delivery_counts(
        &self,
        subscription: &str,
    ) -> impl Future<Output = Result<DeliveryCounts>> + Send {
        ready(self.reads.with(|c| sql::delivery_counts(c, subscription)))
    }
}

#[cfg(test)]
mod tests;
