//! WAL checkpoints off the writer's path. With SQLite's automatic checkpoint, the commit that crosses the
//! threshold copies the WAL into the database file (and fsyncs it) on the writer thread, stalling every write
//! queued behind it (measured: about an eighth of the writer's time under a steady create load). The writer's
//! automatic checkpoint is therefore only a rare backstop that restarts the WAL file (`WAL_RESTART_PAGES` in
//! schema.rs), and this thread, with a connection of its own, runs a PASSIVE checkpoint (which never blocks
//! readers or the writer) every `INTERVAL`. If the WAL still grows
//! past `TRUNCATE_FRAMES` (checkpoints could not catch up), it asks for a TRUNCATE checkpoint, which waits
//! briefly for the writer and resets the file. The log file (`carebridge-log.db`, attached) is checkpointed the
//! same way.

use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

const INTERVAL: Duration = Duration::from_millis(50);
const TRUNCATE_FRAMES: i64 = 200_000;
/// Within this many frames of the writer's WAL restart (`schema::WAL_RESTART_PAGES`), checkpoint every
/// `NEAR_INTERVAL` instead: the restart copies on the writer thread whatever this thread has not copied yet,
/// while every queued write waits, so the less is left the shorter the stall.
const NEAR_FRAMES: i64 = 4_096;
const NEAR_INTERVAL: Duration = Duration::from_millis(2);

/// Run until `stop` is signalled or dropped, then make a last checkpoint.
pub(crate) fn run(path: &Path, stop: Receiver<()>) {
    let Ok(conn) = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    ) else {
        return;
    };
    let _ = conn.busy_timeout(Duration::from_secs(1));
    // The log file too (the audit trail, written every second): a checkpoint without a schema name covers
    // every attached database.
    let log = path.with_file_name(crate::LOG_FILE);
    let _ = conn.execute("ATTACH DATABASE ?1 AS log", [log.to_string_lossy()]);
    let mut wait = INTERVAL;
    loop {
        let stopping = match stop.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => false,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => true,
        };
        // The second column: frames in the WAL (the first is `busy`, the third the frames checkpointed).
        let frames = conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1))
            .unwrap_or(0);
        wait = if frames >= crate::schema::WAL_RESTART_PAGES - NEAR_FRAMES {
            NEAR_INTERVAL
        } else {
            INTERVAL
        };
        if frames > TRUNCATE_FRAMES {
            let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            });
        }
        if stopping {
            return;
        }
    }
}
