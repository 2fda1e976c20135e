//! Connections, pragmas and numbered schema migrations (tracked in `PRAGMA user_version`).

use std::path::Path;
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use store::{Result, StoreError};

use crate::sql::db;

/// Migration `i` (0-based) brings the schema from version `i` to `i + 1`. Append only: never edit a released
/// migration, add a new one.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: resources with full history, search index, outbox, idempotency.
    r#"
    -- One row per (type, id): the current version's metadata. Small rows, so updates are cheap; the JSON of
    -- every version (the current one included) lives in `versions`, written exactly once.
    CREATE TABLE resources (
        rid             INTEGER PRIMARY KEY,
        rtype           TEXT    NOT NULL,
        id              TEXT    NOT NULL,
        version         INTEGER NOT NULL,
        last_updated_ms INTEGER NOT NULL,
        deleted         INTEGER NOT NULL,
        UNIQUE (rtype, id)
    );
    CREATE INDEX resources_type_updated ON resources (rtype, last_updated_ms);

    -- Every version ever written, tombstones included (json = '' for a tombstone). `vid` follows commit order.
    CREATE TABLE versions (
        vid             INTEGER PRIMARY KEY,
        rid             INTEGER NOT NULL,
        rtype           TEXT    NOT NULL,
        version         INTEGER NOT NULL,
        last_updated_ms INTEGER NOT NULL,
        deleted         INTEGER NOT NULL,
        json            TEXT    NOT NULL,
        UNIQUE (rid, version)
    );
    CREATE INDEX versions_type_updated ON versions (rtype, last_updated_ms);

    -- Search index of the current live version of each resource. `system` is '' when the value has none.
    CREATE TABLE idx_token (
        rtype  TEXT    NOT NULL,
        param  TEXT    NOT NULL,
        code   TEXT    NOT NULL,
        system TEXT    NOT NULL,
        rid    INTEGER NOT NULL,
        PRIMARY KEY (rtype, param, code, system, rid)
    ) WITHOUT ROWID;
    CREATE INDEX idx_token_rid ON idx_token (rid, param);

    CREATE TABLE idx_string (
        rtype TEXT    NOT NULL,
        param TEXT    NOT NULL,
        value TEXT    NOT NULL,
        rid   INTEGER NOT NULL,
        PRIMARY KEY (rtype, param, value, rid)
    ) WITHOUT ROWID;
    CREATE INDEX idx_string_rid ON idx_string (rid, param);

    CREATE TABLE idx_date (
        rtype   TEXT    NOT NULL,
        param   TEXT    NOT NULL,
        low_ms  INTEGER NOT NULL,
        high_ms INTEGER NOT NULL,
        rid     INTEGER NOT NULL,
        PRIMARY KEY (rtype, param, low_ms, high_ms, rid)
    ) WITHOUT ROWID;
    CREATE INDEX idx_date_high ON idx_date (rtype, param, high_ms);
    CREATE INDEX idx_date_rid ON idx_date (rid, param);

    CREATE TABLE idx_reference (
        rtype  TEXT    NOT NULL,
        param  TEXT    NOT NULL,
        target TEXT    NOT NULL,
        rid    INTEGER NOT NULL,
        PRIMARY KEY (rtype, param, target, rid)
    ) WITHOUT ROWID;
    CREATE INDEX idx_reference_rid ON idx_reference (rid, param);

    -- Transactional outbox. AUTOINCREMENT: a seq is never reused, even after old events are pruned.
    CREATE TABLE outbox (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        subject     TEXT    NOT NULL,
        subject_seq INTEGER NOT NULL,
        kind        TEXT    NOT NULL,
        rtype       TEXT    NOT NULL,
        id          TEXT    NOT NULL,
        version     INTEGER NOT NULL,
        time_ms     INTEGER NOT NULL,
        data        TEXT    NOT NULL,
        UNIQUE (subject, subject_seq)
    );
    CREATE TABLE subjects (
        subject  TEXT    PRIMARY KEY,
        last_seq INTEGER NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE idempotency (
        key          TEXT    PRIMARY KEY,
        request_hash TEXT    NOT NULL,
        status       INTEGER NOT NULL,
        headers_json TEXT    NOT NULL,
        body         TEXT    NOT NULL,
        created_ms   INTEGER NOT NULL
    );

    -- Fixed planner statistics describing a large store (see PLANNER_STATS in schema.rs).
    ANALYZE;
    DELETE FROM sqlite_stat1;
    INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES
        ('resources', NULL, '1000000'),
        ('resources', 'sqlite_autoindex_resources_1', '1000000 100000 1'),
        ('resources', 'resources_type_updated', '1000000 100000 2'),
        ('versions', NULL, '3000000'),
        ('versions', 'sqlite_autoindex_versions_1', '3000000 3 1'),
        ('versions', 'versions_type_updated', '3000000 300000 2'),
        ('idx_token', 'idx_token', '5000000 500000 50000 5 1 1'),
        ('idx_token', 'idx_token_rid', '5000000 5 2'),
        ('idx_string', 'idx_string', '3000000 300000 50000 3 1'),
        ('idx_string', 'idx_string_rid', '3000000 3 2'),
        ('idx_date', 'idx_date', '2000000 200000 50000 3 1 1'),
        ('idx_date', 'idx_date_high', '2000000 200000 50000 3'),
        ('idx_date', 'idx_date_rid', '2000000 2 1'),
        ('idx_reference', 'idx_reference', '3000000 300000 50000 20 1'),
        ('idx_reference', 'idx_reference_rid', '3000000 3 2'),
        ('outbox', NULL, '10000000'),
        ('outbox', 'sqlite_autoindex_outbox_1', '10000000 10 1'),
        ('subjects', 'subjects', '1000000 1'),
        ('idempotency', NULL, '1000000'),
        ('idempotency', 'sqlite_autoindex_idempotency_1', '1000000 1');
    "#,
    // 2: small named values, and event delivery (one row per (subscription, event), plus the head of each
    // (subscription, subject) queue).
    r#"
    CREATE TABLE kv (
        namespace TEXT NOT NULL,
        key       TEXT NOT NULL,
        value     TEXT NOT NULL,
        PRIMARY KEY (namespace, key)
    ) WITHOUT ROWID;

    -- One delivery of outbox event `seq` to a subscription. state: 0 pending, 1 delivered, 2 dead.
    CREATE TABLE deliveries (
        subscription    TEXT    NOT NULL,
        seq             INTEGER NOT NULL,
        subject         TEXT    NOT NULL,
        state           INTEGER NOT NULL,
        attempts        INTEGER NOT NULL,
        next_attempt_ms INTEGER NOT NULL,
        created_ms      INTEGER NOT NULL,
        updated_ms      INTEGER NOT NULL,
        last_status     INTEGER,
        last_error      TEXT,
        PRIMARY KEY (subscription, seq)
    ) WITHOUT ROWID;
    -- The lowest pending seq of a subject (to advance its head); listing by state.
    CREATE INDEX deliveries_subject ON deliveries (subscription, subject, state, seq);
    CREATE INDEX deliveries_state ON deliveries (subscription, state, seq);

    -- Exactly one row per (subscription, subject) with a pending delivery: its lowest pending seq and that
    -- delivery's next_attempt_ms. Due work is read from here only, so deliveries queued behind a failing
    -- subject (or subscriber) cost nothing when looking for work.
    CREATE TABLE delivery_heads (
        subscription    TEXT    NOT NULL,
        subject         TEXT    NOT NULL,
        seq             INTEGER NOT NULL,
        next_attempt_ms INTEGER NOT NULL,
        PRIMARY KEY (subscription, subject)
    ) WITHOUT ROWID;
    CREATE INDEX delivery_heads_due ON delivery_heads (next_attempt_ms, seq);

    -- Fixed planner statistics (see PLANNER_STATS).
    INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES
        ('kv', 'kv', '100000 1000 1'),
        ('deliveries', 'deliveries', '10000000 100000 1'),
        ('deliveries', 'deliveries_subject', '10000000 100000 10 5 1'),
        ('deliveries', 'deliveries_state', '10000000 100000 50000 1'),
        ('delivery_heads', 'delivery_heads', '100000 1000 1'),
        ('delivery_heads', 'delivery_heads_due', '100000 2 1');
    "#,
    // 3: due work per subscription, so a subscriber with a large backlog never hides another's due work.
    r#"
    CREATE INDEX delivery_heads_sub_due ON delivery_heads (subscription, next_attempt_ms, seq);
    INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES
        ('delivery_heads', 'delivery_heads_sub_due', '100000 1000 2 1');
    "#,
    // 4: a string index row holds the normalised value and the value as sent (for `:exact`) together; before,
    // each was a row of its own (the second under `param:exact`). `string_rows_v4` fills the new table from
    // the old one's `:exact` rows before `idx_string_v3` is dropped, and drops the `name` rows that repeat a
    // `family` or `given` row (a `name` search now reads those too) and the Appointment `patient`,
    // `practitioner` and `location` rows (answered from `actor`).
    r#"
    DROP INDEX idx_string_rid;
    ALTER TABLE idx_string RENAME TO idx_string_v3;
    CREATE TABLE idx_string (
        rtype TEXT    NOT NULL,
        param TEXT    NOT NULL,
        value TEXT    NOT NULL,
        exact TEXT    NOT NULL,
        rid   INTEGER NOT NULL,
        PRIMARY KEY (rtype, param, value, exact, rid)
    ) WITHOUT ROWID;
    CREATE INDEX idx_string_rid ON idx_string (rid, param);
    DELETE FROM sqlite_stat1 WHERE tbl IN ('idx_string', 'idx_string_v3');
    INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES
        ('idx_string', 'idx_string', '3000000 300000 50000 3 2 1'),
        ('idx_string', 'idx_string_rid', '3000000 3 2');
    "#,
    // 5: list the date parameters stored irregularly before writes listed them (`store::irregular_dates`):
    // several rows for one resource under `store:multi-valued`, a row wider than an instant under
    // `store:wide`. Listing a parameter the searches never combine is harmless (it is never looked up).
    r#"
    INSERT OR IGNORE INTO kv (namespace, key, value)
    SELECT DISTINCT 'store:multi-valued', rtype || ' ' || param, '' FROM idx_date
    GROUP BY rtype, param, rid HAVING count(*) > 1;
    INSERT OR IGNORE INTO kv (namespace, key, value)
    SELECT DISTINCT 'store:wide', rtype || ' ' || param, '' FROM idx_date WHERE high_ms - low_ms > 999;
    "#,
];

/// Data steps of migrations that SQL alone cannot do, run in the migration's transaction after its SQL:
/// `(schema version reached, step)`.
const MIGRATION_STEPS: &[(i64, MigrationStep)] = &[(4, string_rows_v4)];

type MigrationStep = fn(&Connection) -> rusqlite::Result<()>;

/// Migration 4: every old `param:exact` row (the value as sent) becomes one row of `param` with its
/// normalised value beside it. Every string value was indexed in both forms (each string parameter had an
/// `:exact` twin), so the old normalised rows are not needed: the same function derives them again. Then
/// the rows of a parameter that repeat a row of one it also reads (`fhir::also_indexed_under`: Patient
/// `name` and `family`/`given`) go, and so do the rows of reference parameters now answered from another's
/// (`fhir::stored_as`: Appointment `patient` from `actor`); searches find the same resources without them.
fn string_rows_v4(conn: &Connection) -> rusqlite::Result<()> {
    let mut read = conn.prepare(
        "SELECT rtype, substr(param, 1, length(param) - 6), value, rid FROM idx_string_v3
         WHERE param LIKE '%:exact'",
    )?;
    let mut insert = conn.prepare(
        "INSERT OR IGNORE INTO idx_string (rtype, param, value, exact, rid) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut rows = read.query([])?;
    while let Some(r) = rows.next()? {
        let (rtype, param, exact, rid): (String, String, String, i64) =
            (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
        insert.execute(rusqlite::params![
            rtype,
            param,
            fhir::normalize_string(&exact),
            exact,
            rid
        ])?;
    }
    drop(rows);
    for rtype in fhir::ResourceType::ALL {
        let rt = rtype.as_str();
        for def in fhir::search_params(rtype) {
            for also in fhir::also_indexed_under(rtype, def.name) {
                conn.execute(
                    "DELETE FROM idx_string WHERE rtype = ?1 AND param = ?2 AND EXISTS (
                         SELECT 1 FROM idx_string o WHERE o.rtype = ?1 AND o.param = ?3 AND o.value = idx_string.value
                         AND o.exact = idx_string.exact AND o.rid = idx_string.rid)",
                    rusqlite::params![rt, def.name, also],
                )?;
            }
            if fhir::stored_as(rtype, def.name).is_some() {
                conn.execute(
                    "DELETE FROM idx_reference WHERE rtype = ?1 AND param = ?2",
                    rusqlite::params![rt, def.name],
                )?;
            }
        }
    }
    conn.execute_batch("DROP TABLE idx_string_v3")
}

// PLANNER_STATS: migration 1 seeds `sqlite_stat1` with fixed numbers describing a large store (a million
// resources, index lookups by (rtype, param, value) matching a handful of rows) instead of letting ANALYZE
// measure whatever the store holds at the time. Without statistics SQLite prefers scanning a whole type in id
// order (to skip the sort) over an identifier lookup, which costs milliseconds per search at 10,000 rows;
// with statistics measured on a small or skewed store plans would change as the data grows. Fixed numbers
// keep plans predictable. The store never runs ANALYZE itself.

/// The schema version this binary writes.
pub(crate) fn latest_version() -> i64 {
    i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
}

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Page cache per read connection, in KiB (negative = KiB for `PRAGMA cache_size`).
const CACHE_KIB: i64 = 32 * 1024;
const STATEMENT_CACHE: usize = 256;
/// The writer's page cache, in KiB. Smaller than the readers': SQLite walks the writer's whole page-cache
/// hash table at every COMMIT that follows a b-tree rebalance (the rebalance parks a page under a temporary
/// number past the end of the file, and the end-of-transaction truncation then scans every slot), so the
/// cost of each commit grows with this size.
const WRITER_CACHE_KIB: i64 = 8 * 1024;
/// WAL frames after which the writer's own checkpoint (its WAL hook) restarts the WAL file (256 MiB of 4 KiB
/// pages, the most the WAL file grows to in steady use). Each of these checkpoints runs on the writer thread and
/// fsyncs both files, stalling every queued write (40-50 ms under creates once the database file holds a few
/// hundred MB: the pages the checkpoint thread copied since its last complete checkpoint are flushed then),
/// so they should be rare: at 4,096 frames they came several times a second under load; 32,768 gave
/// 3,485-3,844 Patient creates/s (p90 11-13 ms) against 2,614-3,127/s (p90 22-24 ms) in alternating runs;
/// 65,536 took the create p99 from 23-78 ms to 10-13 ms over four 10-second runs on a growing store.
/// (Flushing the database file from the checkpoint thread after every checkpoint instead shortened each
/// stall but cost 5-10% of the creates.)
pub(crate) const WAL_RESTART_PAGES: i64 = 65_536;
/// Largest part of the database file read through a memory map (beyond it, SQLite reads with pread).
const MMAP_BYTES: i64 = 1 << 30;

fn unavailable(path: &Path, e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(format!("cannot open {}: {e}", path.display()))
}

/// Open the single read-write connection (the writer's), switch to WAL and bring the schema up to date.
pub(crate) fn open_writer(
    path: &Path,
    wal_buffer: bool,
    frames_seen: std::sync::Arc<crate::checkpoint::WalFrames>,
) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    // The writer alone writes WAL frames, through the VFS that hands each commit's frames to the kernel in
    // one write (walbuf.rs).
    let opened = match crate::walbuf::name().filter(|_| wal_buffer) {
        Some(vfs) => Connection::open_with_flags_and_vfs(path, flags, vfs),
        None => Connection::open_with_flags(path, flags),
    };
    let mut conn = opened.map_err(|e| unavailable(path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
    wal(&conn, "main", path)?;
    // NORMAL in both durability modes: COMMIT does not wait for the disk. With `Durability::Fsync` the sync
    // thread fsyncs the WAL after COMMIT and before any job of the batch is answered (writer.rs).
    let sync = "NORMAL";
    conn.pragma_update(None, "synchronous", sync).map_err(db)?;
    // The checkpoint thread (checkpoint.rs) keeps the WAL backfilled; the writer's own checkpoint is only
    // the backstop that restarts the WAL file, so it rarely has anything left to copy. This hook is what
    // `wal_autocheckpoint` would install (a PASSIVE checkpoint once a database's WAL holds
    // `WAL_RESTART_PAGES` frames), and it tells the checkpoint thread how far the WAL has grown. Its errors
    // are ignored: an error from a WAL hook becomes the COMMIT's, although the commit is done.
    conn.wal_hook(Some(
        move |wal: &mut rusqlite::hooks::Wal, frames: std::ffi::c_int| {
            let frames = i64::from(frames);
            frames_seen.committed(wal.name(), frames);
            if frames >= WAL_RESTART_PAGES {
                let _ = wal.checkpoint();
            }
            Ok(())
        },
    ))
    .map_err(db)?;
    tune(&conn, WRITER_CACHE_KIB)?;
    migrate(&mut conn)?;
    attach_log(&conn, path, Some(sync))?;
    // Load the planner statistics the migrations may just have written.
    conn.execute_batch("ANALYZE sqlite_schema").map_err(db)?;
    Ok(conn)
}

/// Open a read-only connection reading through a memory map, as the read pool does.
#[cfg(test)]
pub(crate) fn open_reader(path: &Path) -> Result<Connection> {
    open_reader_mapped(path, true)
}

/// Open a read-only connection; `mapped`: read database pages through a memory map.
///
/// The read pool's connections are mapped: after any commit (the audit writer commits every second) SQLite
/// discards every reader's page cache, and re-reading through pread cost each read request a system call
/// and a copy per page. But the map goes with the cache: the first read after a commit unmaps the file and
/// maps it again, and each unmap interrupts the other core to flush its TLB. The readers that look at the
/// outbox's tail and the due deliveries after every commit (the delivery dispatcher and sender) therefore
/// read unmapped: MLLP ingest at window 1 went from 4,550-4,619 to 4,797-4,958 messages/s in alternating
/// runs, their `munmap` calls (0.4 per message) gone. (Never for the writer: it gains nothing, and the
/// file grows under it.)
pub(crate) fn open_reader_mapped(path: &Path, mapped: bool) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| unavailable(path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
    tune(&conn, CACHE_KIB)?;
    attach_log(&conn, path, None)?;
    if mapped {
        conn.pragma_update(None, "mmap_size", MMAP_BYTES)
            .map_err(db)?;
    }
    Ok(conn)
}

/// Switch schema `schema` (the file at `path`) to WAL journal mode, or say why not.
fn wal(conn: &Connection, schema: &str, path: &Path) -> Result<()> {
    let mode: String = conn
        .query_row(&format!("PRAGMA {schema}.journal_mode = WAL"), [], |r| {
            r.get(0)
        })
        .map_err(db)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unavailable(format!(
            "{}: cannot switch to WAL journal mode (got {mode})",
            path.display()
        )));
    }
    Ok(())
}

/// Attach the log file beside the main one as schema `log` (the writer creates it, in WAL mode, with its
/// one table; readers attach it read-only, as their connection is).
fn attach_log(conn: &Connection, main: &Path, writer_sync: Option<&str>) -> Result<()> {
    let path = main.with_file_name(crate::LOG_FILE);
    conn.execute("ATTACH DATABASE ?1 AS log", [path.to_string_lossy()])
        .map_err(|e| unavailable(&path, e))?;
    if let Some(sync) = writer_sync {
        wal(conn, "log", &path)?;
        conn.pragma_update(Some("log"), "synchronous", sync)
            .map_err(db)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS log.kv (
                namespace TEXT NOT NULL,
                key       TEXT NOT NULL,
                value     TEXT NOT NULL,
                PRIMARY KEY (namespace, key)
            ) WITHOUT ROWID;",
        )
        .map_err(db)?;
    }
    Ok(())
}

/// Settings shared by every connection.
fn tune(conn: &Connection, cache_kib: i64) -> Result<()> {
    conn.pragma_update(None, "cache_size", -cache_kib)
        .map_err(db)?;
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(db)?;
    // Query planner stability guarantee: a plan never depends on bound values. Besides predictable plans,
    // this matters for speed: rusqlite's statement cache calls sqlite3_clear_bindings() when a statement
    // goes back to the cache, and SQLite 3.54 marks most statements with `col = ?` terms as "re-plan when
    // rebound", so without QPSG every cached statement is re-parsed and re-planned on every use (measured:
    // 19 us instead of 4 us per point read).
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(db)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(())
}

/// Apply every migration newer than the database's `user_version`, each in its own transaction. Refuses a
/// database written by a newer binary.
pub(crate) fn migrate(conn: &mut Connection) -> Result<()> {
    let current: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(db)?;
    let latest = latest_version();
    if current > latest {
        return Err(StoreError::Unavailable(format!(
            "database schema version {current} is newer than this binary supports ({latest}); \
             run a newer Carebridge or restore a backup"
        )));
    }
    for (done, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(current).unwrap_or(0))
    {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let version = i64::try_from(done + 1).unwrap_or(i64::MAX);
        tx.execute_batch(sql)
            .and_then(|()| {
                MIGRATION_STEPS
                    .iter()
                    .filter(|(v, _)| *v == version)
                    .try_for_each(|(_, step)| step(&tx))
            })
            .map_err(|e| StoreError::Backend(format!("migration {}: {e}", done + 1)))?;
        tx.pragma_update(None, "user_version", version)
            .map_err(db)?;
        tx.commit().map_err(db)?;
    }
    Ok(())
}
