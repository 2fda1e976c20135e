//! WAL checkpoints off the writer's path. With SQLite's automatic checkpoint, the commit that crosses the
//! threshold copies the WAL into the database file (and fsyncs it) on the writer thread, stalling every write
//! queued behind it (measured: about an eighth of the writer's time under a steady create load). The writer's
//! automatic checkpoint is therefore only a rare backstop that restarts the WAL file (`WAL_RESTART_PAGES` in
//! schema.rs), and this thread, with a connection of its own, runs PASSIVE checkpoints (which never block
//! readers or the writer).
//!
//! When: the writer's WAL hook publishes the main WAL's frame count after every commit ([`WalFrames`]), and
//! this thread, looking at it every [`TICK`], checkpoints once [`STEP_FRAMES`] frames were added since its
//! last checkpoint, or [`MAX_INTERVAL`] after it when anything was added, and at every tick within
//! [`NEAR_FRAMES`] of the writer's restart (which copies on the writer thread whatever this thread has not
//! copied yet, while every queued write waits). Each checkpoint fsyncs the WAL and the database file, so
//! fewer of them leave the disk to the commits' own fsyncs: against a checkpoint every 50 ms, MLLP ingest at
//! window 1 went from 3,729-3,916 to 3,939-4,030 messages/s (p99 3.4-3.9 -> 2.9-3.0 ms) and Patient creates
//! from 6,708-6,770 to 6,981-7,328/s in alternating runs.
//!
//! If the WAL still grows past `TRUNCATE_FRAMES` (checkpoints could not catch up), it asks for a TRUNCATE
//! checkpoint, which waits briefly for the writer and resets the file. The log file (`carebridge-log.db`,
//! attached) is checkpointed with the main one.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

/// How often the thread looks at the frame count while the WAL grows.
const TICK: Duration = Duration::from_millis(10);
/// How often it looks while nothing is written.
const IDLE_TICK: Duration = Duration::from_millis(100);
/// Frames added since the last checkpoint that make the next one due (64 MiB of 4 KiB pages).
const STEP_FRAMES: i64 = 16_384;
/// The longest a written WAL goes without a checkpoint.
const MAX_INTERVAL: Duration = Duration::from_secs(1);
const TRUNCATE_FRAMES: i64 = 200_000;
/// Within this many frames of the writer's WAL restart (`schema::WAL_RESTART_PAGES`), checkpoint at every
/// tick.
const NEAR_FRAMES: i64 = 4_096;

/// What the writer's WAL hook tells the checkpoint thread.
#[derive(Debug, Default)]
pub(crate) struct WalFrames {
    /// Frames in the main database's WAL after the last commit (smaller again after a restart).
    pub(crate) main: AtomicI64,
    /// Commits that wrote WAL frames, the log file's included.
    pub(crate) commits: AtomicU64,
}

impl WalFrames {
    /// Called by the writer's WAL hook after a commit of database `db` left `frames` frames in its WAL.
    pub(crate) fn committed(&self, db: &std::ffi::CStr, frames: i64) {
        if db == c"main" {
            self.main.store(frames, Ordering::Relaxed);
        }
        self.commits.fetch_add(1, Ordering::Relaxed);
    }
}

/// When the next checkpoint is due, given what the WAL hook published.
#[derive(Debug)]
struct Schedule {
    /// The main WAL's frame count at the last checkpoint.
    frames: i64,
    /// The commit count at the last checkpoint.
    commits: u64,
    at: Instant,
}

impl Schedule {
    /// Whether to checkpoint now, the WAL holding `frames` frames after `commits` commits.
    fn due(&self, frames: i64, commits: u64, now: Instant) -> bool {
        if commits == self.commits {
            return false;
        }
        // A restart starts the count again from the WAL's beginning.
        let added = if frames < self.frames {
            frames
        } else {
            frames - self.frames
        };
        added >= STEP_FRAMES
            || frames >= crate::schema::WAL_RESTART_PAGES - NEAR_FRAMES
            || now.duration_since(self.at) >= MAX_INTERVAL
    }
}

/// How much the thread lowers its scheduling priority (raises its nice value, at most to 19): its work is never
/// on a write's path, so on a busy machine it gives way to the writer, the sync thread and the request
/// threads. In alternating runs, MLLP ingest at window 1 went from 4,601-4,770 to 4,840-5,124 messages/s;
/// with the thread reniced by hand, Patient creates at C=32 went from 6,705-8,223/s (p99 9.2-14.9 ms) to
/// 7,076-8,432/s (p99 8.7-9.8 ms).
pub(crate) const NICENESS: i32 = 10;

/// Run until `stop` is signalled or dropped, then make a last checkpoint.
pub(crate) fn run(path: &Path, stop: Receiver<()>, wal: Arc<WalFrames>) {
    // Linux keeps a nice value per thread: this lowers this thread's only, from wherever the hub was started.
    let me = Some(rustix::thread::gettid());
    if let Ok(current) = rustix::process::getpriority_process(me) {
        let _ = rustix::process::setpriority_process(me, (current + NICENESS).min(19));
    }
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
    let mut last = Schedule {
        frames: 0,
        commits: 0,
        at: Instant::now(),
    };
    let mut wait = IDLE_TICK;
    loop {
        let stopping = match stop.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => false,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => true,
        };
        let commits = wal.commits.load(Ordering::Relaxed);
        let frames = wal.main.load(Ordering::Relaxed);
        let now = Instant::now();
        wait = if commits == last.commits {
            IDLE_TICK
        } else {
            TICK
        };
        if stopping || last.due(frames, commits, now) {
            let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0));
            last = Schedule {
                frames,
                commits,
                at: now,
            };
            if frames > TRUNCATE_FRAMES {
                let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    r.get::<_, i64>(0)
                });
            }
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(frames: i64, commits: u64, start: Instant) -> Schedule {
        Schedule {
            frames,
            commits,
            at: start,
        }
    }

    #[test]
    fn a_checkpoint_is_due_after_a_step_of_frames_a_restart_s_approach_or_a_second() {
        let t0 = Instant::now();
        let soon = t0 + Duration::from_millis(20);
        let last = at(1_000, 10, t0);
        // Nothing committed since: never, however long ago.
        assert!(!last.due(1_000, 10, t0 + Duration::from_secs(5)));
        // A few frames shortly after: not yet; a second after: yes.
        assert!(!last.due(1_200, 11, soon));
        assert!(last.due(1_200, 11, t0 + MAX_INTERVAL));
        // A step of frames: at once.
        assert!(!last.due(1_000 + STEP_FRAMES - 1, 11, soon));
        assert!(last.due(1_000 + STEP_FRAMES, 11, soon));
        // Near the writer's restart: at every tick.
        let near = crate::schema::WAL_RESTART_PAGES - NEAR_FRAMES;
        assert!(at(near, 10, t0).due(near + 1, 11, soon));
        // After a restart the count starts again: frames written since count from zero.
        assert!(!at(60_000, 10, t0).due(500, 11, soon));
        assert!(at(60_000, 10, t0).due(STEP_FRAMES, 11, soon));
    }
}
