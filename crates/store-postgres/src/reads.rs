//! The read side: a few connections shared by every read (tokio-postgres pipelines concurrent queries on
//! one connection, so a "pool" is a fixed set of connections used in turn), and the watch of committed outbox
//! events fed by LISTEN and by a slow poll.
//!
//! The connections live on the store's I/O runtime (a thread of its own), so a store works whatever runtime
//! its callers use, and keeps working when the runtime that created it is gone. A lost connection is opened
//! again by the next read that picks it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use store::{Result, StoreError};
use tokio::runtime::Handle;
use tokio::sync::{Mutex, watch};
use tokio_postgres::{AsyncMessage, Config};

use crate::conn::Conn;
use crate::sql;
use crate::writer::{EVENTS_CHANNEL, publish};

pub(crate) struct ReadPool {
    config: Config,
    io: Handle,
    slots: Vec<Mutex<Option<Arc<Conn>>>>,
    next: AtomicUsize,
}

/// Connect on the I/O runtime and leave the connection's driver running there.
async fn open_on(io: &Handle, config: &Config) -> Result<Conn> {
    let config = config.clone();
    io.spawn(async move {
        let (conn, connection) = Conn::open(&config).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(conn)
    })
    .await
    .map_err(|e| StoreError::Unavailable(format!("the store's I/O runtime has stopped: {e}")))?
}

impl ReadPool {
    pub(crate) fn new(config: Config, io: Handle, size: usize) -> ReadPool {
        ReadPool {
            config,
            io,
            slots: (0..size.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// The next connection in turn, opened (again) if needed.
    pub(crate) async fn get(&self) -> Result<Arc<Conn>> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[i].lock().await;
        if let Some(conn) = slot.as_ref()
            && !conn.is_closed()
        {
            return Ok(conn.clone());
        }
        let conn = Arc::new(open_on(&self.io, &self.config).await?);
        *slot = Some(conn.clone());
        Ok(conn)
    }
}

/// LISTEN for other processes' commits, reconnecting after a lost connection. Runs until the I/O runtime
/// stops.
pub(crate) async fn listen(config: Config, events: Arc<watch::Sender<i64>>) {
    loop {
        if let Ok((conn, mut connection)) = Conn::open(&config).await {
            let feed = events.clone();
            let driver = tokio::spawn(async move {
                loop {
                    match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                        Some(Ok(AsyncMessage::Notification(n))) => {
                            if let Ok(seq) = n.payload().parse::<i64>() {
                                publish(&feed, seq);
                            }
                        }
                        Some(Ok(_)) => {}
                        None | Some(Err(_)) => break,
                    }
                }
            });
            if conn
                .batch(&format!("LISTEN {EVENTS_CHANNEL}"))
                .await
                .is_ok()
            {
                // Keep `conn` (the client) alive while the driver runs.
                let _ = driver.await;
            } else {
                driver.abort();
            }
            drop(conn);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The fallback for missed notifications (a LISTEN connection being re-established): read the highest seq
/// every `interval`.
pub(crate) async fn poll(pool: Arc<ReadPool>, events: Arc<watch::Sender<i64>>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Ok(conn) = pool.get().await
            && let Ok(seq) = sql::last_event_seq(&conn).await
        {
            publish(&events, seq);
        }
    }
}
