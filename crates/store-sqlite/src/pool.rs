//! A small pool of read-only connections, checked out for the duration of one read on the calling thread.
//! Connections are opened on demand up to the limit; beyond it a caller waits for one to come back
//! (reads take microseconds).

use std::path::PathBuf;
use std::sync::{Condvar, Mutex, MutexGuard};

use rusqlite::Connection;
use store::Result;

use crate::schema;

pub(crate) struct ReadPool {
    path: PathBuf,
    max: usize,
    /// Whether its connections read the database file through a memory map (see [`schema::open_reader_mapped`]).
    mapped: bool,
    state: Mutex<State>,
    returned: Condvar,
}

struct State {
    idle: Vec<Connection>,
    /// Connections in existence (idle or checked out).
    open: usize,
}

/// Gives the connection back even if the read panics.
struct Checkout<'p> {
    pool: &'p ReadPool,
    conn: Option<Connection>,
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.lock().idle.push(conn);
            self.pool.returned.notify_one();
        }
    }
}

impl ReadPool {
    pub(crate) fn new(path: PathBuf, max: usize, mapped: bool) -> ReadPool {
        ReadPool {
            path,
            max: max.max(1),
            mapped,
            state: Mutex::new(State {
                idle: Vec::new(),
                open: 0,
            }),
            returned: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn checkout(&self) -> Result<Connection> {
        let mut state = self.lock();
        loop {
            if let Some(conn) = state.idle.pop() {
                return Ok(conn);
            }
            if state.open < self.max {
                state.open += 1;
                drop(state);
                return schema::open_reader_mapped(&self.path, self.mapped).inspect_err(|_| {
                    self.lock().open -= 1;
                    self.returned.notify_one();
                });
            }
            state = self
                .returned
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Run `f` with a read connection.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
        let checkout = Checkout {
            pool: self,
            conn: Some(self.checkout()?),
        };
        match &checkout.conn {
            Some(conn) => f(conn),
            None => Err(store::StoreError::Backend(
                "read pool invariant broken".into(),
            )),
        }
    }
}
