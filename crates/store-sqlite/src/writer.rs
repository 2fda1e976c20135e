//! The writer thread: the only owner of the read-write connection. Jobs arrive on a channel; the writer
//! takes the first, drains whatever else is already queued (group commit), runs each job inside its own
//! SAVEPOINT of one `BEGIN IMMEDIATE` transaction, COMMITs once, and only then completes the jobs.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::Connection;
use store::{
    Event, IdempotencyRecord, NewEvent, Put, ResourceType, Result, SearchQuery, StoreError, Stored,
    Tx,
};
use tokio::sync::{mpsc, oneshot};

use crate::sql;

/// Completes a job once the fate of its transaction is known: `None` = committed, `Some(e)` = not committed.
type Finish = Box<dyn FnOnce(Option<StoreError>)>;

/// What running a job produced.
pub(crate) struct Outcome {
    /// The closure returned `Ok` (its savepoint is to be kept).
    ok: bool,
    finish: Finish,
}

/// A type-erased write: the closure and the channel its caller awaits.
pub(crate) trait Job: Send {
    /// Run the closure (panics are caught and become [`StoreError::Backend`]).
    fn run(self: Box<Self>, tx: &mut dyn Tx) -> Outcome;
    /// Answer without running (the transaction could not even start).
    fn fail(self: Box<Self>, err: StoreError);
}

pub(crate) struct WriteJob<F, T> {
    pub(crate) f: F,
    pub(crate) reply: oneshot::Sender<Result<T>>,
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
        let WriteJob { f, reply } = *self;
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

    fn fail(self: Box<Self>, err: StoreError) {
        let _ = self.reply.send(Err(err));
    }
}

pub(crate) type JobBox = Box<dyn Job>;

/// The [`Tx`] handed to a closure: the write connection, inside the batch transaction and the job's savepoint.
struct WriteTx<'c> {
    conn: &'c Connection,
    now_ms: i64,
}

impl Tx for WriteTx<'_> {
    fn now_ms(&self) -> i64 {
        self.now_ms
    }
    fn read(&mut self, rtype: ResourceType, id: &str) -> Result<Option<Stored>> {
        sql::read_current(self.conn, rtype, id)
    }
    fn search(&mut self, query: &SearchQuery) -> Result<Vec<Stored>> {
        sql::search(self.conn, query, false).map(|r| r.resources)
    }
    fn put(&mut self, put: Put) -> Result<Stored> {
        sql::put(self.conn, self.now_ms, put)
    }
    fn delete(
        &mut self,
        rtype: ResourceType,
        id: &str,
        expected_version: Option<u64>,
    ) -> Result<Option<Stored>> {
        sql::delete(self.conn, self.now_ms, rtype, id, expected_version)
    }
    fn append_event(&mut self, event: NewEvent) -> Result<Event> {
        sql::append_event(self.conn, self.now_ms, event)
    }
    fn idempotency_get(&mut self, key: &str) -> Result<Option<IdempotencyRecord>> {
        sql::idempotency_get(self.conn, key)
    }
    fn idempotency_put(&mut self, record: IdempotencyRecord) -> Result<()> {
        sql::idempotency_put(self.conn, record)
    }
}

pub(crate) struct Writer {
    pub(crate) conn: Connection,
    pub(crate) jobs: mpsc::Receiver<JobBox>,
    pub(crate) max_batch: usize,
    /// The last timestamp handed out: the writer's clock never goes backwards, so within a resource version
    /// order and `lastUpdated` order agree even if the system clock steps back.
    pub(crate) last_ms: i64,
}

fn system_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Writer {
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
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.execute([]))
            .map(|_| ())
            .map_err(sql::db)
    }

    /// Roll back whatever is open, ignoring errors (used on failure paths only).
    fn rollback_all(&self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    fn run_batch(&mut self, batch: &mut Vec<JobBox>) {
        let mut jobs = batch.drain(..);
        // Jobs run in the open transaction, with an error to report instead of success if it is set.
        let mut done: Vec<Outcome> = Vec::new();
        let mut open = false;
        while let Some(job) = jobs.next() {
            if !open {
                if let Err(e) = self.exec("BEGIN IMMEDIATE") {
                    self.rollback_all();
                    job.fail(e.clone());
                    for job in jobs.by_ref() {
                        job.fail(e.clone());
                    }
                    return;
                }
                open = true;
            }
            if let Err(e) = self.exec("SAVEPOINT job") {
                job.fail(e);
                continue;
            }
            let now_ms = self.tick();
            let mut tx = WriteTx {
                conn: &self.conn,
                now_ms,
            };
            // `run` catches the closure's panics itself; this guard is for anything else.
            let outcome =
                catch_unwind(AssertUnwindSafe(|| job.run(&mut tx))).unwrap_or_else(|_| Outcome {
                    ok: false,
                    finish: Box::new(|_| {}),
                });

            let mut keep = outcome.ok;
            if keep && self.exec("RELEASE job").is_err() {
                keep = false;
            }
            if !keep && !self.conn.is_autocommit() {
                let _ = self
                    .exec("ROLLBACK TO job")
                    .and_then(|()| self.exec("RELEASE job"));
            }
            if self.conn.is_autocommit() {
                // SQLite aborted the whole transaction (I/O error, disk full...): the changes of every job
                // run so far in this batch are gone. Report that, then start afresh for the rest.
                let err = StoreError::Backend("the transaction was aborted by the database".into());
                for o in done.drain(..) {
                    (o.finish)(Some(err.clone()));
                }
                (outcome.finish)(Some(err));
                open = false;
                continue;
            }
            if keep {
                done.push(outcome);
            } else {
                // Its changes are rolled back; it can be answered now (its own error, or the release error).
                (outcome.finish)(Some(StoreError::Backend(
                    "could not release the job's savepoint".into(),
                )));
            }
        }
        if !open {
            return;
        }
        match self.exec("COMMIT") {
            Ok(()) => {
                for o in done {
                    (o.finish)(None);
                }
            }
            Err(e) => {
                self.rollback_all();
                let err = StoreError::Backend(format!("commit failed: {e}"));
                for o in done {
                    (o.finish)(Some(err.clone()));
                }
            }
        }
    }
}
