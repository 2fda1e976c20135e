//! Every SQL statement of the backend, as functions over a `&Connection`: the writer thread calls them on
//! the write connection, reads call them on a pooled read-only connection. Statements go through
//! `prepare_cached`, so each distinct SQL text is parsed once per connection.

use rusqlite::types::{ToSqlOutput, Type};
use rusqlite::{Connection, OptionalExtension, Row, params, params_from_iter};
use serde_json::Value;
use store::{
    Clause, Cmp, Delivery, DeliveryCounts, DeliveryQuery, DeliveryState, DeliveryUpdate, Event,
    HistoryQuery, IdempotencyRecord, IndexValue, MULTI_VALUED, NewEvent, Predicate, Put,
    ResourceType, Result, SearchQuery, SearchResult, SortField, StoreError, Stored, WIDE,
};

/// A driver error as a [`StoreError`] (the text is for logs).
pub(crate) fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn usize_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn parse_rtype(row: &Row<'_>, idx: usize) -> rusqlite::Result<ResourceType> {
    let s: String = row.get(idx)?;
    ResourceType::parse(&s).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            Type::Text,
            format!("unknown resource type {s:?}").into(),
        )
    })
}

/// Columns: rtype, id, version, last_updated_ms, deleted, json.
fn stored_from_row(row: &Row<'_>) -> rusqlite::Result<Stored> {
    Ok(Stored {
        rtype: parse_rtype(row, 0)?,
        id: row.get(1)?,
        version: to_u64(row.get(2)?),
        last_updated_ms: row.get(3)?,
        deleted: row.get(4)?,
        json: row.get(5)?,
    })
}

// ---------------------------------------------------------------------------------------------------------
// Point reads

pub(crate) fn read_current(
    conn: &Connection,
    rtype: ResourceType,
    id: &str,
) -> Result<Option<Stored>> {
    conn.prepare_cached(
        "SELECT r.rtype, r.id, v.version, v.last_updated_ms, v.deleted, v.json
         FROM resources r JOIN versions v ON v.rid = r.rid AND v.version = r.version
         WHERE r.rtype = ?1 AND r.id = ?2",
    )
    .and_then(|mut s| {
        s.query_row(params![rtype.as_str(), id], stored_from_row)
            .optional()
    })
    .map_err(db)
}

pub(crate) fn read_version(
    conn: &Connection,
    rtype: ResourceType,
    id: &str,
    version: u64,
) -> Result<Option<Stored>> {
    conn.prepare_cached(
        "SELECT r.rtype, r.id, v.version, v.last_updated_ms, v.deleted, v.json
         FROM resources r JOIN versions v ON v.rid = r.rid
         WHERE r.rtype = ?1 AND r.id = ?2 AND v.version = ?3",
    )
    .and_then(|mut s| {
        s.query_row(
            params![rtype.as_str(), id, to_i64(version)],
            stored_from_row,
        )
        .optional()
    })
    .map_err(db)
}

/// (rid, version, deleted) of the current version.
fn current_state(
    conn: &Connection,
    rtype: ResourceType,
    id: &str,
) -> Result<Option<(i64, u64, bool)>> {
    conn.prepare_cached("SELECT rid, version, deleted FROM resources WHERE rtype = ?1 AND id = ?2")
        .and_then(|mut s| {
            s.query_row(params![rtype.as_str(), id], |r| {
                Ok((r.get(0)?, to_u64(r.get(1)?), r.get(2)?))
            })
            .optional()
        })
        .map_err(db)
}

// ---------------------------------------------------------------------------------------------------------
// Writes (only ever called on the writer thread, inside its transaction)

fn check_expected(
    rtype: ResourceType,
    id: &str,
    expected: Option<u64>,
    live_version: u64,
) -> Result<()> {
    match expected {
        Some(expected) if expected != live_version => Err(StoreError::VersionConflict {
            rtype,
            id: id.to_string(),
            expected,
            actual: live_version,
        }),
        _ => Ok(()),
    }
}

fn insert_version(
    conn: &Connection,
    rid: i64,
    rtype: ResourceType,
    version: u64,
    now_ms: i64,
    deleted: bool,
    json: &str,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO versions (rid, rtype, version, last_updated_ms, deleted, json) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut s| s.execute(params![rid, rtype.as_str(), to_i64(version), now_ms, deleted, json]))
    .map_err(db)?;
    Ok(())
}

fn update_current(
    conn: &Connection,
    rid: i64,
    version: u64,
    now_ms: i64,
    deleted: bool,
) -> Result<()> {
    conn.prepare_cached(
        "UPDATE resources SET version = ?2, last_updated_ms = ?3, deleted = ?4 WHERE rid = ?1",
    )
    .and_then(|mut s| s.execute(params![rid, to_i64(version), now_ms, deleted]))
    .map_err(db)?;
    Ok(())
}

fn remove_index(conn: &Connection, rid: i64) -> Result<()> {
    for sql in [
        "DELETE FROM idx_token WHERE rid = ?1",
        "DELETE FROM idx_string WHERE rid = ?1",
        "DELETE FROM idx_date WHERE rid = ?1",
        "DELETE FROM idx_reference WHERE rid = ?1",
    ] {
        conn.prepare_cached(sql)
            .and_then(|mut s| s.execute([rid]))
            .map_err(db)?;
    }
    Ok(())
}

/// Most rows one index INSERT writes (so at most this many statement texts per table are cached).
const ROWS_PER_INSERT: usize = 16;

/// The four index tables: name, columns after `rtype`, and values bound per row (besides `rtype`, `rid`).
const INDEX_TABLES: [(&str, &str, usize); 4] = [
    ("idx_token", "param, code, system", 3),
    ("idx_string", "param, value, exact", 3),
    ("idx_date", "param, low_ms, high_ms", 3),
    ("idx_reference", "param, target", 2),
];

/// `INSERT OR IGNORE` of `rows` rows into index table `table` (of [`INDEX_TABLES`]): `?1` is `rtype`, `?2` the
/// `rid`, then each row's own values.
fn index_insert_sql(table: usize, rows: usize) -> &'static str {
    static SQL: std::sync::OnceLock<Vec<Vec<String>>> = std::sync::OnceLock::new();
    let all = SQL.get_or_init(|| {
        INDEX_TABLES
            .iter()
            .map(|(name, columns, per_row)| {
                (1..=ROWS_PER_INSERT)
                    .map(|n| {
                        let values: Vec<String> = (0..n)
                            .map(|i| {
                                let own: Vec<String> = (0..*per_row)
                                    .map(|k| format!("?{}", 3 + i * per_row + k))
                                    .collect();
                                format!("(?1, {}, ?2)", own.join(", "))
                            })
                            .collect();
                        format!(
                            "INSERT OR IGNORE INTO {name} (rtype, {columns}, rid) VALUES {}",
                            values.join(", ")
                        )
                    })
                    .collect()
            })
            .collect()
    });
    all.get(table)
        .and_then(|t| t.get(rows.saturating_sub(1)))
        .map_or("", String::as_str)
}

/// Insert `entries` as index rows of `rid`: one statement per table for up to [`ROWS_PER_INSERT`] rows (the
/// benchmark's UK Core Patient has 17 rows; one statement per row cost a statement's fixed overhead each time).
fn insert_index<'e>(
    conn: &Connection,
    rid: i64,
    rtype: ResourceType,
    entries: impl IntoIterator<Item = &'e store::IndexEntry>,
) -> Result<()> {
    let mut by_table: [Vec<ToSqlOutput<'e>>; 4] = Default::default();
    for e in entries {
        if !store::stored_row(rtype, e) {
            continue;
        }
        let (table, values): (usize, [ToSqlOutput<'e>; 3]) = match &e.value {
            IndexValue::Token { system, code } => (
                0,
                [
                    ToSqlOutput::from(e.param),
                    code.as_str().into(),
                    system.as_deref().unwrap_or("").into(),
                ],
            ),
            IndexValue::String { value, exact } => (
                1,
                [
                    ToSqlOutput::from(e.param),
                    value.as_str().into(),
                    exact.as_str().into(),
                ],
            ),
            IndexValue::Date { low_ms, high_ms } => (
                2,
                [
                    ToSqlOutput::from(e.param),
                    (*low_ms).into(),
                    (*high_ms).into(),
                ],
            ),
            IndexValue::Reference(target) => (
                3,
                [
                    ToSqlOutput::from(e.param),
                    target.as_str().into(),
                    ToSqlOutput::from(0),
                ],
            ),
        };
        let per_row = INDEX_TABLES[table].2;
        by_table[table].extend(values.into_iter().take(per_row));
    }
    let rt = rtype.as_str();
    for (table, values) in by_table.iter().enumerate() {
        let per_row = INDEX_TABLES[table].2;
        for chunk in values.chunks(per_row * ROWS_PER_INSERT) {
            let sql = index_insert_sql(table, chunk.len() / per_row);
            let head = [ToSqlOutput::from(rt), ToSqlOutput::from(rid)];
            conn.prepare_cached(sql)
                .and_then(|mut s| s.execute(params_from_iter(head.iter().chain(chunk))))
                .map_err(db)?;
        }
    }
    Ok(())
}

/// One index row of a resource as stored (the table is implied by the variant; `system` '' = none).
enum IdxRow {
    Token(String, String, String),
    String(String, String, String),
    Date(String, i64, i64),
    Reference(String, String),
}

impl IdxRow {
    /// Whether this stored row is the one `e` would insert.
    fn is(&self, e: &store::IndexEntry) -> bool {
        match (self, &e.value) {
            (IdxRow::Token(p, c, s), IndexValue::Token { system, code }) => {
                p == e.param && c == code && s == system.as_deref().unwrap_or("")
            }
            (IdxRow::String(p, v, x), IndexValue::String { value, exact }) => {
                p == e.param && v == value && x == exact
            }
            (IdxRow::Date(p, l, h), IndexValue::Date { low_ms, high_ms }) => {
                p == e.param && l == low_ms && h == high_ms
            }
            (IdxRow::Reference(p, t), IndexValue::Reference(target)) => p == e.param && t == target,
            _ => false,
        }
    }
}

/// The index rows of `rid`, from the four tables in one statement (each part is read through its table's
/// `(rid, param)` index, which covers every column).
fn index_rows(conn: &Connection, rid: i64) -> Result<Vec<IdxRow>> {
    let mut rows = Vec::new();
    conn.prepare_cached(
        "SELECT 0, param, code, system, 0, 0 FROM idx_token WHERE rid = ?1
         UNION ALL SELECT 1, param, value, exact, 0, 0 FROM idx_string WHERE rid = ?1
         UNION ALL SELECT 2, param, '', '', low_ms, high_ms FROM idx_date WHERE rid = ?1
         UNION ALL SELECT 3, param, target, '', 0, 0 FROM idx_reference WHERE rid = ?1",
    )
    .and_then(|mut s| {
        let mut q = s.query([rid])?;
        while let Some(r) = q.next()? {
            let table: i64 = r.get(0)?;
            let (param, text): (String, String) = (r.get(1)?, r.get(2)?);
            rows.push(match table {
                0 => IdxRow::Token(param, text, r.get(3)?),
                1 => IdxRow::String(param, text, r.get(3)?),
                2 => IdxRow::Date(param, r.get(4)?, r.get(5)?),
                _ => IdxRow::Reference(param, text),
            });
        }
        Ok(())
    })
    .map_err(db)?;
    Ok(rows)
}

/// Replace the index rows of a live resource with `entries`, deleting and inserting only the rows that
/// differ. An update usually changes one value (a status), and rows left alone leave their b-tree pages
/// clean: nothing of them goes to the WAL at COMMIT.
fn update_index(
    conn: &Connection,
    rid: i64,
    rtype: ResourceType,
    entries: &[store::IndexEntry],
) -> Result<()> {
    let mut old = index_rows(conn, rid)?;
    let mut added = Vec::new();
    for e in entries.iter().filter(|e| store::stored_row(rtype, e)) {
        match old.iter().position(|o| o.is(e)) {
            // Kept: it stays in the table (a duplicate entry finds no second row and is inserted, ignored).
            Some(i) => {
                old.swap_remove(i);
            }
            None => added.push(e),
        }
    }
    let rt = rtype.as_str();
    for row in &old {
        let r = match row {
            IdxRow::Token(p, code, system) => conn
                .prepare_cached(
                    "DELETE FROM idx_token WHERE rtype = ?1 AND param = ?2 AND code = ?3 AND system = ?4 AND rid = ?5",
                )
                .and_then(|mut s| s.execute(params![rt, p, code, system, rid])),
            IdxRow::String(p, v, x) => conn
                .prepare_cached(
                    "DELETE FROM idx_string WHERE rtype = ?1 AND param = ?2 AND value = ?3 AND exact = ?4 AND rid = ?5",
                )
                .and_then(|mut s| s.execute(params![rt, p, v, x, rid])),
            IdxRow::Date(p, low, high) => conn
                .prepare_cached(
                    "DELETE FROM idx_date WHERE rtype = ?1 AND param = ?2 AND low_ms = ?3 AND high_ms = ?4 AND rid = ?5",
                )
                .and_then(|mut s| s.execute(params![rt, p, low, high, rid])),
            IdxRow::Reference(p, t) => conn
                .prepare_cached(
                    "DELETE FROM idx_reference WHERE rtype = ?1 AND param = ?2 AND target = ?3 AND rid = ?4",
                )
                .and_then(|mut s| s.execute(params![rt, p, t, rid])),
        };
        r.map_err(db)?;
    }
    insert_index(conn, rid, rtype, added)
}

/// What a put wrote, enough to write it again identically (see the writer's replay).
pub(crate) struct PutRecord {
    pub(crate) rtype: ResourceType,
    pub(crate) id: String,
    pub(crate) version: u64,
    pub(crate) now_ms: i64,
    pub(crate) json: String,
    pub(crate) index: Vec<store::IndexEntry>,
}

/// Also hands back the resource's `Value`, so the writer can have it freed off its own thread.
pub(crate) fn put(conn: &Connection, now_ms: i64, put: Put) -> Result<(Stored, PutRecord, Value)> {
    if put.id.is_empty() {
        return Err(StoreError::Invalid(format!("{}: empty id", put.rtype)));
    }
    let current = current_state(conn, put.rtype, &put.id)?;
    let live_version = match current {
        Some((_, v, false)) => v,
        _ => 0,
    };
    check_expected(put.rtype, &put.id, put.expected_version, live_version)?;
    let version = current.map_or(0, |(_, v, _)| v) + 1;
    let json = put.stamp(version, &fhir::format_instant_ms(now_ms))?;
    let Put {
        rtype,
        id,
        index,
        resource,
        ..
    } = put;
    let record = PutRecord {
        rtype,
        id,
        version,
        now_ms,
        json,
        index,
    };
    write_put(conn, current, &record)?;
    let stored = Stored {
        rtype,
        id: record.id.clone(),
        version,
        last_updated_ms: now_ms,
        deleted: false,
        json: record.json.clone(),
    };
    Ok((stored, record, resource))
}

/// Write a put again, in a transaction whose state is the one the original put saw.
pub(crate) fn replay_put(conn: &Connection, record: &PutRecord) -> Result<()> {
    let current = current_state(conn, record.rtype, &record.id)?;
    if current.map_or(0, |(_, v, _)| v) + 1 != record.version {
        return Err(StoreError::Backend(format!(
            "replay of {}/{} diverged",
            record.rtype, record.id
        )));
    }
    write_put(conn, current, record)
}

/// List in [`MULTI_VALUED`] / [`WIDE`] what this put makes irregular (see `store::irregular_dates`).
fn note_irregular_dates(conn: &Connection, r: &PutRecord) -> Result<()> {
    for (namespace, key) in store::irregular_dates(r.rtype, &r.index) {
        conn.prepare_cached("INSERT OR IGNORE INTO kv (namespace, key, value) VALUES (?1, ?2, '')")
            .and_then(|mut s| s.execute(params![namespace, key]))
            .map_err(db)?;
    }
    Ok(())
}

/// Whether `Type param` is listed in kv namespace `namespace`.
fn listed(conn: &Connection, namespace: &str, rtype: ResourceType, param: &str) -> Result<bool> {
    conn.prepare_cached("SELECT 1 FROM kv WHERE namespace = ?1 AND key = ?2")
        .and_then(|mut s| {
            s.query_row(params![namespace, format!("{rtype} {param}")], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
        })
        .map(|v| v.is_some())
        .map_err(db)
}

fn write_put(conn: &Connection, current: Option<(i64, u64, bool)>, r: &PutRecord) -> Result<()> {
    note_irregular_dates(conn, r)?;
    let rid = match current {
        Some((rid, _, _)) => {
            update_current(conn, rid, r.version, r.now_ms, false)?;
            rid
        }
        None => {
            conn.prepare_cached(
                "INSERT INTO resources (rtype, id, version, last_updated_ms, deleted) VALUES (?1, ?2, ?3, ?4, 0)",
            )
            .and_then(|mut s| {
                s.execute(params![r.rtype.as_str(), r.id, to_i64(r.version), r.now_ms])
            })
            .map_err(db)?;
            conn.last_insert_rowid()
        }
    };
    insert_version(conn, rid, r.rtype, r.version, r.now_ms, false, &r.json)?;
    match current {
        // A live resource has index rows: keep those that stay. (A tombstone or a new resource has none.)
        Some((_, _, false)) => update_index(conn, rid, r.rtype, &r.index),
        _ => insert_index(conn, rid, r.rtype, &r.index),
    }
}

pub(crate) fn delete(
    conn: &Connection,
    now_ms: i64,
    rtype: ResourceType,
    id: &str,
    expected_version: Option<u64>,
) -> Result<Option<Stored>> {
    let current = current_state(conn, rtype, id)?;
    let live_version = match current {
        Some((_, v, false)) => v,
        _ => 0,
    };
    check_expected(rtype, id, expected_version, live_version)?;
    let Some((rid, current_version, false)) = current else {
        return Ok(None);
    };
    let version = current_version + 1;
    update_current(conn, rid, version, now_ms, true)?;
    insert_version(conn, rid, rtype, version, now_ms, true, "")?;
    remove_index(conn, rid)?;
    Ok(Some(Stored {
        rtype,
        id: id.to_string(),
        version,
        last_updated_ms: now_ms,
        deleted: true,
        json: String::new(),
    }))
}

pub(crate) fn append_event(conn: &Connection, now_ms: i64, event: NewEvent) -> Result<Event> {
    let NewEvent {
        subject,
        kind,
        rtype,
        id,
        version,
        data,
    } = event;
    // Read, then write the next number (a plain read and a plain write cost SQLite less than one upsert
    // with RETURNING, which goes through a temporary table).
    let last: Option<i64> = conn
        .prepare_cached("SELECT last_seq FROM subjects WHERE subject = ?1")
        .and_then(|mut s| s.query_row([&subject], |r| r.get(0)).optional())
        .map_err(db)?;
    let subject_seq = last.unwrap_or(0) + 1;
    conn.prepare_cached("INSERT OR REPLACE INTO subjects (subject, last_seq) VALUES (?1, ?2)")
        .and_then(|mut s| s.execute(params![subject, subject_seq]))
        .map_err(db)?;
    let data_text = serde_json::to_string(&data)
        .map_err(|e| StoreError::Invalid(format!("event data: {e}")))?;
    conn.prepare_cached(
        "INSERT INTO outbox (subject, subject_seq, kind, rtype, id, version, time_ms, data)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .and_then(|mut s| {
        s.execute(params![
            subject,
            subject_seq,
            kind,
            rtype.as_str(),
            id,
            to_i64(version),
            now_ms,
            data_text
        ])
    })
    .map_err(db)?;
    let seq = conn.last_insert_rowid();
    Ok(Event {
        seq,
        subject,
        subject_seq,
        kind,
        rtype,
        id,
        version,
        time_ms: now_ms,
        data,
    })
}

pub(crate) fn idempotency_get(conn: &Connection, key: &str) -> Result<Option<IdempotencyRecord>> {
    let row = conn
        .prepare_cached(
            "SELECT request_hash, status, headers_json, body, created_ms FROM idempotency WHERE key = ?1",
        )
        .and_then(|mut s| {
            s.query_row([key], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?, r.get(3)?, r.get(4)?))
            })
            .optional()
        })
        .map_err(db)?;
    let Some((request_hash, status, headers_json, body, created_ms)) = row else {
        return Ok(None);
    };
    let headers: Vec<(String, String)> = serde_json::from_str(&headers_json)
        .map_err(|e| StoreError::Backend(format!("idempotency record {key}: bad headers: {e}")))?;
    Ok(Some(IdempotencyRecord {
        key: key.to_string(),
        request_hash,
        status: u16::try_from(status).unwrap_or(0),
        headers,
        body,
        created_ms,
    }))
}

pub(crate) fn idempotency_put(conn: &Connection, record: IdempotencyRecord) -> Result<()> {
    let headers =
        serde_json::to_string(&record.headers).map_err(|e| StoreError::Invalid(e.to_string()))?;
    conn.prepare_cached(
        "INSERT INTO idempotency (key, request_hash, status, headers_json, body, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (key) DO UPDATE SET request_hash = excluded.request_hash, status = excluded.status,
             headers_json = excluded.headers_json, body = excluded.body, created_ms = excluded.created_ms",
    )
    .and_then(|mut s| {
        s.execute(params![record.key, record.request_hash, record.status, headers, record.body, record.created_ms])
    })
    .map_err(db)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Named values

/// True for the namespaces kept in the log file (attached as `log`).
pub(crate) fn in_log(namespace: &str) -> bool {
    store::LOG_NAMESPACES.contains(&namespace)
}

pub(crate) fn kv_get(conn: &Connection, namespace: &str, key: &str) -> Result<Option<String>> {
    let get = |sql: &str| {
        conn.prepare_cached(sql)
            .and_then(|mut s| {
                s.query_row(params![namespace, key], |r| r.get(0))
                    .optional()
            })
            .map_err(db)
    };
    if in_log(namespace) {
        // Values written before the log file existed are still in the main file.
        if let Some(v) = get("SELECT value FROM log.kv WHERE namespace = ?1 AND key = ?2")? {
            return Ok(Some(v));
        }
    }
    get("SELECT value FROM kv WHERE namespace = ?1 AND key = ?2")
}

pub(crate) fn kv_put(
    conn: &Connection,
    namespace: &str,
    key: &str,
    value: Option<&str>,
) -> Result<()> {
    let log = in_log(namespace);
    let r = match value {
        Some(value) => conn
            .prepare_cached(if log {
                "INSERT INTO log.kv (namespace, key, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value"
            } else {
                "INSERT INTO kv (namespace, key, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value"
            })
            .and_then(|mut s| s.execute(params![namespace, key, value])),
        None => conn
            .prepare_cached(if log {
                "DELETE FROM log.kv WHERE namespace = ?1 AND key = ?2"
            } else {
                "DELETE FROM kv WHERE namespace = ?1 AND key = ?2"
            })
            .and_then(|mut s| s.execute(params![namespace, key])),
    };
    if log && value.is_none() {
        // Also forget a value from before the log file existed.
        conn.prepare_cached("DELETE FROM kv WHERE namespace = ?1 AND key = ?2")
            .and_then(|mut s| s.execute(params![namespace, key]))
            .map_err(db)?;
    }
    r.map(|_| ()).map_err(db)
}

// ---------------------------------------------------------------------------------------------------------
// Deliveries
//
// Invariant kept by every write below: `delivery_heads` holds exactly one row per (subscription, subject)
// with a pending delivery, naming the lowest pending seq of that subject and that delivery's
// next_attempt_ms. Writes restore it with `refresh_head` (one index seek) after changing a delivery.

const PENDING: i64 = 0;
const DELIVERED: i64 = 1;
const DEAD: i64 = 2;

fn state_code(state: DeliveryState) -> i64 {
    match state {
        DeliveryState::Pending => PENDING,
        DeliveryState::Delivered => DELIVERED,
        DeliveryState::Dead => DEAD,
    }
}

fn state_from_code(row: &Row<'_>, idx: usize) -> rusqlite::Result<DeliveryState> {
    match row.get::<_, i64>(idx)? {
        PENDING => Ok(DeliveryState::Pending),
        DELIVERED => Ok(DeliveryState::Delivered),
        DEAD => Ok(DeliveryState::Dead),
        other => Err(rusqlite::Error::FromSqlConversionFailure(
            idx,
            Type::Integer,
            format!("unknown delivery state {other}").into(),
        )),
    }
}

fn u32_i64(n: u32) -> i64 {
    i64::from(n)
}

/// Columns (of `deliveries d`): subscription, seq, subject, state, attempts, next_attempt_ms, created_ms,
/// updated_ms, last_status, last_error.
macro_rules! delivery_columns {
    () => {
        "d.subscription, d.seq, d.subject, d.state, d.attempts, d.next_attempt_ms, d.created_ms, \
         d.updated_ms, d.last_status, d.last_error"
    };
}

/// The lowest pending delivery of a (subscription, subject): one seek on `deliveries_subject`.
pub(crate) const LOWEST_PENDING: &str = "SELECT seq, next_attempt_ms FROM deliveries
     WHERE subscription = ?1 AND subject = ?2 AND state = 0 ORDER BY seq LIMIT 1";

/// Due heads, earliest first: a range of `delivery_heads_due` in index order, then each delivery by key.
pub(crate) const DUE_DELIVERIES: &str = concat!(
    "SELECT ",
    delivery_columns!(),
    " FROM delivery_heads h CROSS JOIN deliveries d ON d.subscription = h.subscription AND d.seq = h.seq
     WHERE h.next_attempt_ms <= ?1
     ORDER BY h.next_attempt_ms, h.seq LIMIT ?2"
);

pub(crate) const DUE_DELIVERIES_FOR: &str = concat!(
    "SELECT ",
    delivery_columns!(),
    " FROM delivery_heads h INDEXED BY delivery_heads_sub_due
       CROSS JOIN deliveries d ON d.subscription = h.subscription AND d.seq = h.seq
     WHERE h.subscription = ?1 AND h.next_attempt_ms <= ?2
     ORDER BY h.next_attempt_ms, h.seq LIMIT ?3"
);

pub(crate) const NEXT_DUE: &str = "SELECT MIN(next_attempt_ms) FROM delivery_heads";

pub(crate) const DELIVERY_COUNTS: &str =
    "SELECT state, COUNT(*) FROM deliveries WHERE subscription = ?1 GROUP BY state";

fn delivery_from_row(row: &Row<'_>) -> rusqlite::Result<Delivery> {
    Ok(Delivery {
        subscription: row.get(0)?,
        seq: row.get(1)?,
        subject: row.get(2)?,
        state: state_from_code(row, 3)?,
        attempts: u32::try_from(row.get::<_, i64>(4)?).unwrap_or(u32::MAX),
        next_attempt_ms: row.get(5)?,
        created_ms: row.get(6)?,
        updated_ms: row.get(7)?,
        last_status: row
            .get::<_, Option<i64>>(8)?
            .map(|s| u16::try_from(s).unwrap_or(0)),
        last_error: row.get(9)?,
    })
}

/// Make the head row of (subscription, subject) name its lowest pending delivery, or remove it.
fn refresh_head(conn: &Connection, subscription: &str, subject: &str) -> Result<()> {
    let lowest: Option<(i64, i64)> = conn
        .prepare_cached(LOWEST_PENDING)
        .and_then(|mut s| {
            s.query_row(params![subscription, subject], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
        })
        .map_err(db)?;
    let r = match lowest {
        Some((seq, next_attempt_ms)) => conn
            .prepare_cached(
                "INSERT INTO delivery_heads (subscription, subject, seq, next_attempt_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (subscription, subject)
                 DO UPDATE SET seq = excluded.seq, next_attempt_ms = excluded.next_attempt_ms",
            )
            .and_then(|mut s| s.execute(params![subscription, subject, seq, next_attempt_ms])),
        None => conn
            .prepare_cached("DELETE FROM delivery_heads WHERE subscription = ?1 AND subject = ?2")
            .and_then(|mut s| s.execute(params![subscription, subject])),
    };
    r.map(|_| ()).map_err(db)
}

/// Enqueue (pending, due at `now_ms`); false when the delivery already exists (then nothing changes).
pub(crate) fn enqueue_delivery(
    conn: &Connection,
    now_ms: i64,
    subscription: &str,
    seq: i64,
    subject: &str,
) -> Result<bool> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO deliveries (subscription, seq, subject, state, attempts, next_attempt_ms, created_ms,
                 updated_ms, last_status, last_error)
             VALUES (?1, ?2, ?3, 0, 0, ?4, ?4, ?4, NULL, NULL)
             ON CONFLICT (subscription, seq) DO NOTHING",
        )
        .and_then(|mut s| s.execute(params![subscription, seq, subject, now_ms]))
        .map_err(db)?;
    if inserted == 0 {
        return Ok(false);
    }
    // A new subject head, or (only if seqs arrive out of order) a lower one than the current head.
    conn.prepare_cached(
        "INSERT INTO delivery_heads (subscription, subject, seq, next_attempt_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (subscription, subject) DO UPDATE
             SET seq = excluded.seq, next_attempt_ms = excluded.next_attempt_ms
             WHERE excluded.seq < delivery_heads.seq",
    )
    .and_then(|mut s| s.execute(params![subscription, subject, seq, now_ms]))
    .map_err(db)?;
    Ok(true)
}

/// Apply an attempt's outcome or a requeue. `Invalid` (before any change) when the delivery is unknown.
pub(crate) fn update_delivery(
    conn: &Connection,
    now_ms: i64,
    subscription: &str,
    seq: i64,
    update: &DeliveryUpdate,
) -> Result<()> {
    let subject: Option<String> = conn
        .prepare_cached("SELECT subject FROM deliveries WHERE subscription = ?1 AND seq = ?2")
        .and_then(|mut s| {
            s.query_row(params![subscription, seq], |r| r.get(0))
                .optional()
        })
        .map_err(db)?;
    let Some(subject) = subject else {
        return Err(StoreError::Invalid(format!(
            "no delivery of event {seq} to subscription {subscription}"
        )));
    };
    let r = match update {
        DeliveryUpdate::Delivered { attempts, status } => conn
            .prepare_cached(
                "UPDATE deliveries SET state = 1, attempts = ?3, updated_ms = ?4, last_status = ?5,
                     last_error = NULL
                 WHERE subscription = ?1 AND seq = ?2",
            )
            .and_then(|mut s| {
                s.execute(params![subscription, seq, u32_i64(*attempts), now_ms, status])
            }),
        DeliveryUpdate::Retry {
            attempts,
            next_attempt_ms,
            status,
            error,
        } => conn
            .prepare_cached(
                "UPDATE deliveries SET state = 0, attempts = ?3, next_attempt_ms = ?4, updated_ms = ?5,
                     last_status = ?6, last_error = ?7
                 WHERE subscription = ?1 AND seq = ?2",
            )
            .and_then(|mut s| {
                s.execute(params![
                    subscription,
                    seq,
                    u32_i64(*attempts),
                    next_attempt_ms,
                    now_ms,
                    status,
                    error
                ])
            }),
        DeliveryUpdate::Dead {
            attempts,
            status,
            error,
        } => conn
            .prepare_cached(
                "UPDATE deliveries SET state = 2, attempts = ?3, updated_ms = ?4, last_status = ?5,
                     last_error = ?6
                 WHERE subscription = ?1 AND seq = ?2",
            )
            .and_then(|mut s| {
                s.execute(params![subscription, seq, u32_i64(*attempts), now_ms, status, error])
            }),
        DeliveryUpdate::Requeue => conn
            .prepare_cached(
                "UPDATE deliveries SET state = 0, attempts = 0, next_attempt_ms = ?3, updated_ms = ?3
                 WHERE subscription = ?1 AND seq = ?2",
            )
            .and_then(|mut s| s.execute(params![subscription, seq, now_ms])),
    };
    r.map_err(db)?;
    refresh_head(conn, subscription, &subject)
}

/// Requeue every dead delivery of `subscription` (pending, no attempts, due at `now_ms`); how many.
pub(crate) fn requeue_dead(conn: &Connection, now_ms: i64, subscription: &str) -> Result<u64> {
    let subjects: Vec<String> = conn
        .prepare_cached(
            "UPDATE deliveries SET state = 0, attempts = 0, next_attempt_ms = ?2, updated_ms = ?2
             WHERE subscription = ?1 AND state = 2
             RETURNING subject",
        )
        .and_then(|mut s| {
            s.query_map(params![subscription, now_ms], |r| r.get(0))?
                .collect()
        })
        .map_err(db)?;
    let n = subjects.len();
    let distinct: std::collections::BTreeSet<String> = subjects.into_iter().collect();
    for subject in &distinct {
        refresh_head(conn, subscription, subject)?;
    }
    Ok(u64::try_from(n).unwrap_or(u64::MAX))
}

/// The heads due at `now_ms`, earliest first.
pub(crate) fn due_deliveries(
    conn: &Connection,
    now_ms: i64,
    limit: usize,
) -> Result<Vec<Delivery>> {
    conn.prepare_cached(DUE_DELIVERIES)
        .and_then(|mut s| {
            s.query_map(params![now_ms, usize_i64(limit)], delivery_from_row)?
                .collect()
        })
        .map_err(db)
}

/// Due heads of one subscription.
pub(crate) fn due_deliveries_for(
    conn: &Connection,
    subscription: &str,
    now_ms: i64,
    limit: usize,
) -> Result<Vec<Delivery>> {
    conn.prepare_cached(DUE_DELIVERIES_FOR)
        .and_then(|mut s| {
            s.query_map(
                params![subscription, now_ms, usize_i64(limit)],
                delivery_from_row,
            )?
            .collect()
        })
        .map_err(db)
}

/// The earliest next attempt of any head.
pub(crate) fn next_due_ms(conn: &Connection) -> Result<Option<i64>> {
    conn.prepare_cached(NEXT_DUE)
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(db)
}

/// The listing statement of `q` (without a subscription it scans and sorts: an operator's query).
pub(crate) fn deliveries_sql(q: &DeliveryQuery) -> Frag<'_> {
    let mut f = Frag::default();
    f.push(concat!(
        "SELECT ",
        delivery_columns!(),
        " FROM deliveries d WHERE "
    ));
    if let Some(subscription) = &q.subscription {
        f.arg("d.subscription = ? AND ", subscription.as_str());
    }
    if let Some(state) = q.state {
        f.arg("d.state = ? AND ", state_code(state));
    }
    f.arg("d.seq > ?", q.after_seq);
    f.push(" ORDER BY d.seq, d.subscription");
    f.arg(" LIMIT ?", usize_i64(q.limit));
    f
}

pub(crate) fn deliveries(conn: &Connection, q: &DeliveryQuery) -> Result<Vec<Delivery>> {
    let f = deliveries_sql(q);
    conn.prepare_cached(&f.sql)
        .and_then(|mut s| {
            s.query_map(params_from_iter(f.args.iter()), delivery_from_row)?
                .collect()
        })
        .map_err(db)
}

pub(crate) fn delivery_counts(conn: &Connection, subscription: &str) -> Result<DeliveryCounts> {
    let rows: Vec<(DeliveryState, i64)> = conn
        .prepare_cached(DELIVERY_COUNTS)
        .and_then(|mut s| {
            s.query_map([subscription], |r| Ok((state_from_code(r, 0)?, r.get(1)?)))?
                .collect()
        })
        .map_err(db)?;
    let mut counts = DeliveryCounts::default();
    for (state, n) in rows {
        let n = to_u64(n);
        match state {
            DeliveryState::Pending => counts.pending = n,
            DeliveryState::Delivered => counts.delivered = n,
            DeliveryState::Dead => counts.dead = n,
        }
    }
    Ok(counts)
}

/// The highest outbox seq (0 when empty).
pub(crate) fn last_event_seq(conn: &Connection) -> Result<i64> {
    conn.prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM outbox")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(db)
}

/// The newest stored instant (the writer's clock never goes behind it).
pub(crate) fn newest_instant(conn: &Connection) -> Result<i64> {
    let v: Option<i64> = conn
        .prepare_cached("SELECT last_updated_ms FROM versions ORDER BY vid DESC LIMIT 1")
        .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
        .map_err(db)?;
    Ok(v.unwrap_or(0))
}

// ---------------------------------------------------------------------------------------------------------
// Search

/// The smallest string greater than every string that starts with `prefix` (byte order of UTF-8 = code point
/// order), or `None` when no such bound exists (empty prefix or only `char::MAX`).
pub(crate) fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let mut next = u32::from(last) + 1;
        if (0xD800..=0xDFFF).contains(&next) {
            next = 0xE000;
        }
        if let Some(c) = char::from_u32(next) {
            chars.push(c);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// A SQL fragment with its positional (`?`) arguments, in text order.
#[derive(Default)]
pub(crate) struct Frag<'a> {
    pub(crate) sql: String,
    pub(crate) args: Vec<ToSqlOutput<'a>>,
}

impl<'a> Frag<'a> {
    fn push(&mut self, sql: &str) {
        self.sql.push_str(sql);
    }
    fn arg(&mut self, sql: &str, v: impl Into<ToSqlOutput<'a>>) {
        self.sql.push_str(sql);
        self.args.push(v.into());
    }
    fn append(&mut self, other: Frag<'a>) {
        self.sql.push_str(&other.sql);
        self.args.extend(other.args);
    }
}

/// `[low, high]` compared with the query range per FHIR's prefix rules; `low`/`high` are column names (the
/// same column for an instant such as `last_updated_ms`).
fn range_cmp(f: &mut Frag<'_>, low: &str, high: &str, cmp: Cmp, qlo: i64, qhi: i64) {
    match cmp {
        Cmp::Eq => {
            f.arg(&format!("({low} >= ?"), qlo);
            f.arg(&format!(" AND {high} <= ?)"), qhi);
        }
        Cmp::Ne => {
            f.arg(&format!("NOT ({low} >= ?"), qlo);
            f.arg(&format!(" AND {high} <= ?)"), qhi);
        }
        Cmp::Gt => f.arg(&format!("{high} > ?"), qhi),
        Cmp::Lt => f.arg(&format!("{low} < ?"), qlo),
        Cmp::Ge => f.arg(&format!("{high} >= ?"), qlo),
        Cmp::Le => f.arg(&format!("{low} <= ?"), qhi),
        Cmp::Sa => f.arg(&format!("{low} > ?"), qhi),
        Cmp::Eb => f.arg(&format!("{high} < ?"), qlo),
        Cmp::Ap => {
            f.arg(&format!("({low} <= ?"), qhi);
            f.arg(&format!(" AND {high} >= ?)"), qlo);
        }
    }
}

/// ` = ?` or ` IN (?, ...)`: the index rows a search on `param` reads (its own, and those of the parameters
/// `fhir::also_indexed_under` names).
fn param_is<'a>(f: &mut Frag<'a>, rtype: ResourceType, param: &'a str) {
    let also = fhir::also_indexed_under(rtype, param);
    if also.is_empty() {
        f.arg(" = ?", param);
        return;
    }
    f.arg(" IN (?", param);
    for other in also {
        f.arg(", ?", *other);
    }
    f.push(")");
}

/// `SELECT rid FROM idx_* WHERE ...` for an index-table predicate; `None` for `Id` / `LastUpdated`.
fn index_subquery<'a>(rtype: ResourceType, param: &'a str, p: &'a Predicate) -> Option<Frag<'a>> {
    let mut f = Frag::default();
    let head = |f: &mut Frag<'a>, table: &str, param: &'a str| {
        f.arg(
            &format!("SELECT rid FROM {table} WHERE rtype = ?"),
            rtype.as_str(),
        );
        f.push(" AND param");
        param_is(f, rtype, param);
    };
    match p {
        Predicate::Id(_) | Predicate::LastUpdated { .. } => return None,
        Predicate::Token { system, code } => {
            head(&mut f, "idx_token", param);
            if let Some(code) = code {
                f.arg(" AND code = ?", code.as_str());
            }
            if let Some(system) = system {
                f.arg(" AND system = ?", system.as_str());
            }
        }
        Predicate::String { value, exact } => {
            head(&mut f, "idx_string", param);
            if let Some(exact) = exact {
                f.arg(" AND value = ?", value.as_str());
                f.arg(" AND exact = ?", exact.as_str());
            } else if !value.is_empty() {
                f.arg(" AND value >= ?", value.as_str());
                if let Some(upper) = prefix_upper_bound(value) {
                    f.arg(" AND value < ?", upper);
                }
            }
        }
        Predicate::Date {
            cmp,
            low_ms,
            high_ms,
        } => {
            head(&mut f, "idx_date", param);
            f.push(" AND ");
            range_cmp(&mut f, "low_ms", "high_ms", *cmp, *low_ms, *high_ms);
        }
        Predicate::Reference(target) => match store::reference_rows(rtype, param, target) {
            Some(rows) => {
                head(&mut f, "idx_reference", rows);
                f.arg(" AND target = ?", target.as_str());
            }
            None => f.push("SELECT rid FROM idx_reference WHERE 0"),
        },
    }
    Some(f)
}

/// One clause: its alternatives ORed. When the clause drives the search (`drives`), its index-table
/// alternatives share one `r.rid IN (... UNION ALL ...)`, the set SQLite materialises and walks; otherwise each
/// is a correlated `EXISTS (... AND rid = r.rid)`, a point lookup per candidate through the table's
/// `(rid, param)` index (or its full primary key), so a large set is never materialised just to be checked.
fn clause_sql(rtype: ResourceType, clause: &Clause, drives: bool) -> Frag<'_> {
    let mut terms: Vec<Frag<'_>> = Vec::new();
    let mut subs: Vec<Frag<'_>> = Vec::new();
    for p in &clause.any_of {
        match p {
            Predicate::Id(id) => {
                let mut f = Frag::default();
                f.arg("r.id = ?", id.as_str());
                terms.push(f);
            }
            Predicate::LastUpdated {
                cmp,
                low_ms,
                high_ms,
            } => {
                let mut f = Frag::default();
                range_cmp(
                    &mut f,
                    "r.last_updated_ms",
                    "r.last_updated_ms",
                    *cmp,
                    *low_ms,
                    *high_ms,
                );
                terms.push(f);
            }
            other if !drives => {
                if let Some(sub) = index_subquery(rtype, &clause.param, other) {
                    let mut f = Frag::default();
                    f.push("EXISTS (");
                    f.append(sub);
                    f.push(" AND rid = r.rid)");
                    terms.push(f);
                }
            }
            other => subs.extend(index_subquery(rtype, &clause.param, other)),
        }
    }
    if !subs.is_empty() {
        let mut f = Frag::default();
        f.push("r.rid IN (");
        for (i, s) in subs.into_iter().enumerate() {
            if i > 0 {
                f.push(" UNION ALL ");
            }
            f.append(s);
        }
        f.push(")");
        terms.push(f);
    }
    let mut out = Frag::default();
    if terms.is_empty() {
        out.push("0"); // no alternatives: nothing matches
        return out;
    }
    out.push("(");
    for (i, t) in terms.into_iter().enumerate() {
        if i > 0 {
            out.push(" OR ");
        }
        out.append(t);
    }
    out.push(")");
    out
}

/// `FROM resources r WHERE ...` of a search (live resources of the type matching every clause), every
/// clause as a set to walk (see [`clause_sql`]): what a search of one clause needs.
#[cfg(test)]
pub(crate) fn from_where(q: &SearchQuery) -> Frag<'_> {
    from_where_driven(q, None)
}

/// What drives a search of several clauses (see [`choose_driver_within`]).
pub(crate) enum Driver<'a> {
    /// This clause is the set to walk; the others are checked per candidate.
    Clause(usize),
    /// These index rows (`SELECT rid ...`, exactly the resources matching the clauses it stands for) are the
    /// set to walk; every clause is checked per candidate.
    Rows(Frag<'a>),
}

/// [`from_where`] driven by `driver` (`None`: every clause a set to walk).
pub(crate) fn from_where_driven<'a>(q: &'a SearchQuery, driver: Option<Driver<'a>>) -> Frag<'a> {
    let mut f = Frag::default();
    f.arg(" FROM resources r WHERE r.rtype = ?", q.rtype.as_str());
    f.push(" AND r.deleted = 0");
    let walked = match &driver {
        None => None,
        Some(Driver::Clause(i)) => Some(*i),
        Some(Driver::Rows(_)) => Some(usize::MAX),
    };
    if let Some(Driver::Rows(rows)) = driver {
        f.push(" AND r.rid IN (");
        f.append(rows);
        f.push(")");
    }
    for (i, clause) in q.clauses.iter().enumerate() {
        f.push(" AND ");
        f.append(clause_sql(q.rtype, clause, walked.is_none_or(|d| d == i)));
    }
    f
}

/// Index rows each clause's cursor may read while [`choose_driver_within`] looks for the narrowest clause;
/// past it, every clause is a set to walk, as before.
const RACE_LIMIT: usize = 20_000;
/// [`RACE_LIMIT`] for a search that can be answered in the order of its sort key (see
/// [`search_in_sort_order`]).
const RACE_LIMIT_SORTED: usize = 4_096;
/// Rows a cursor reads per turn.
const RACE_STEP: usize = 64;

/// [`choose_driver_within`] with [`RACE_LIMIT`] (for tests).
#[cfg(test)]
pub(crate) fn choose_driver<'a>(
    conn: &Connection,
    q: &'a SearchQuery,
) -> Result<Option<Driver<'a>>> {
    choose_driver_within(conn, q, RACE_LIMIT)
}

/// Which clause of a search of several should drive it: the one with the fewest index rows. `None` (every
/// clause a set to walk) when fewer than two clauses are read from the index tables (a clause with an `_id`
/// or `_lastUpdated` alternative is answered from the resources row and never drives), or when no clause
/// ends within `limit` rows ([`RACE_LIMIT`], or [`RACE_LIMIT_SORTED`] for a search
/// that can be answered in the order of its sort key).
///
/// How: a cursor per clause over its index rows, each read [`RACE_STEP`] rows in turn; the first to run out
/// is the narrowest. That costs at most the number of clauses times the narrowest clause's rows, whatever the
/// wide ones hold. Range clauses on one date parameter that FHIR allows once per resource
/// (`fhir::single_valued`, such as `Slot.start`) also race as one combined range over a single index row,
/// unless a resource was ever stored with several values of it (listed under [`MULTI_VALUED`]).
///
/// The kv lookups and the search are separate statements: a put committed between them that first gives a
/// parameter several rows may be missed by this one search, as if the search had run just before it.
///
/// Why: SQLite's statistics here are fixed numbers (see `PLANNER_STATS`), so it cannot tell a narrow clause
/// (slots before a date) from a wide one (every free slot of a schedule). As sets to walk, every clause's
/// whole set was materialised: one day's free slots of a schedule of 50,000 slots cost tens of milliseconds,
/// most of it for the two wide sets. Driven by the narrowest clause, with the others looked up per candidate,
/// the work follows the narrowest set.
fn choose_driver_within<'a>(
    conn: &Connection,
    q: &'a SearchQuery,
    limit: usize,
) -> Result<Option<Driver<'a>>> {
    if q.clauses.len() < 2 {
        return Ok(None);
    }
    let mut probes: Vec<(Option<usize>, Frag<'a>)> = Vec::new();
    // Range clauses on one single-valued date parameter (`start=ge..&start=lt..`): one index row must satisfy
    // them all, so together they are one range, often far narrower than either alone.
    for (i, clause) in q.clauses.iter().enumerate() {
        if q.clauses[..i].iter().any(|c| c.param == clause.param)
            || !fhir::single_valued(q.rtype, &clause.param)
        {
            continue;
        }
        if listed(conn, MULTI_VALUED, q.rtype, &clause.param)? {
            continue;
        }
        // An instant's row spans at most INSTANT_WIDTH_MS, so a row ending at or after t starts at or after
        // t - INSTANT_WIDTH_MS: that lower bound lets the range be read from where it begins in the index
        // (ordered by start) instead of from the parameter's first row.
        let narrow = fhir::instant_param(q.rtype, &clause.param)
            && !listed(conn, WIDE, q.rtype, &clause.param)?;
        let ranges: Vec<&Predicate> = q
            .clauses
            .iter()
            .filter(|c| c.param == clause.param)
            .filter_map(|c| match c.any_of.as_slice() {
                [p @ Predicate::Date { .. }] => Some(p),
                _ => None,
            })
            .collect();
        let same = q.clauses.iter().filter(|c| c.param == clause.param).count();
        if ranges.len() < 2 || ranges.len() != same {
            continue;
        }
        let mut merged = None;
        for p in ranges {
            match (&mut merged, p) {
                (None, _) => merged = index_subquery(q.rtype, &clause.param, p),
                (
                    Some(f),
                    Predicate::Date {
                        cmp,
                        low_ms,
                        high_ms,
                    },
                ) => {
                    f.push(" AND ");
                    range_cmp(f, "low_ms", "high_ms", *cmp, *low_ms, *high_ms);
                }
                _ => {}
            }
            if let (
                true,
                Some(f),
                Predicate::Date {
                    cmp,
                    low_ms,
                    high_ms,
                },
            ) = (narrow, &mut merged, p)
                && let Some(t) = store::instant_start_floor(*cmp, *low_ms, *high_ms)
            {
                f.arg(" AND low_ms >= ?", t);
            }
        }
        probes.extend(merged.map(|m| (None, m)));
    }
    for (i, clause) in q.clauses.iter().enumerate() {
        let subs: Option<Vec<Frag<'_>>> = clause
            .any_of
            .iter()
            .map(|p| index_subquery(q.rtype, &clause.param, p))
            .collect();
        let Some(subs) = subs.filter(|v| !v.is_empty()) else {
            continue;
        };
        let mut probe = Frag::default();
        for (j, sub) in subs.into_iter().enumerate() {
            if j > 0 {
                probe.push(" UNION ALL ");
            }
            probe.append(sub);
        }
        probes.push((Some(i), probe));
    }
    if probes.len() < 2 {
        return Ok(None);
    }
    let mut statements = Vec::with_capacity(probes.len());
    for (_, probe) in &probes {
        statements.push(conn.prepare_cached(&probe.sql).map_err(db)?);
    }
    let mut cursors = Vec::with_capacity(probes.len());
    for (statement, (_, probe)) in statements.iter_mut().zip(&probes) {
        cursors.push(
            statement
                .query(params_from_iter(probe.args.iter()))
                .map_err(db)?,
        );
    }
    let mut read = 0;
    let mut winner = None;
    'race: while read < limit {
        for (k, rows) in cursors.iter_mut().enumerate() {
            for _ in 0..RACE_STEP {
                if rows.next().map_err(db)?.is_none() {
                    winner = Some(k);
                    break 'race;
                }
            }
        }
        read += RACE_STEP;
    }
    drop(cursors);
    drop(statements);
    Ok(winner.and_then(|k| {
        let (clause, rows) = probes.into_iter().nth(k)?;
        Some(match clause {
            Some(i) => Driver::Clause(i),
            None => Driver::Rows(rows),
        })
    }))
}

fn order_by(q: &SearchQuery) -> Frag<'_> {
    let mut f = Frag::default();
    f.push(" ORDER BY ");
    for s in &q.sort {
        let dir = if s.descending { " DESC" } else { " ASC" };
        match &s.field {
            SortField::Id => {
                f.push("r.id");
                f.push(dir);
            }
            SortField::LastUpdated => {
                f.push("r.last_updated_ms");
                f.push(dir);
            }
            SortField::Param(name) => {
                // The smallest value of the parameter, from whichever table holds it (each subquery reads the
                // rows a search on `name` reads, see `param_is`).
                let keys = [
                    "COALESCE((SELECT MIN(s.value) FROM idx_string s WHERE s.rid = r.rid AND s.param",
                    ", (SELECT MIN(d.low_ms) FROM idx_date d WHERE d.rid = r.rid AND d.param",
                    ", (SELECT MIN(t.code) FROM idx_token t WHERE t.rid = r.rid AND t.param",
                    ", (SELECT MIN(x.target) FROM idx_reference x WHERE x.rid = r.rid AND x.param",
                ];
                for key in keys {
                    f.push(key);
                    param_is(&mut f, q.rtype, name);
                    f.push(")");
                }
                f.push(")");
                f.push(dir);
                f.push(" NULLS LAST");
            }
        }
        f.push(", ");
    }
    f.push("r.id ASC");
    f
}

/// Index rows a lookup search reads before it gives the query to the single statement instead.
const LOOKUP_LIMIT: usize = 256;

/// The fast path of [`search`] for one clause of index-table alternatives in id order, the shape of an
/// identifier search, of a reference lookup and of the NHS-number check every Patient write makes. Each
/// alternative's rows are read through its table's primary key, the resources by rowid, and the page is cut
/// here. The one statement of the general path answers the same, but builds a temporary b-tree for the
/// `rid IN (...)` set and a sorter for `ORDER BY`, both created and dropped on every search: about a third of
/// the cost of a search that finds one resource.
///
/// `None` (nothing read that matters) when the query has another shape, or when its alternatives match
/// more than [`LOOKUP_LIMIT`] index rows: the statement, which never holds all matches at once, does better.
pub(crate) fn search_by_lookup(
    conn: &Connection,
    q: &SearchQuery,
    with_total: bool,
) -> Result<Option<SearchResult>> {
    let [clause] = q.clauses.as_slice() else {
        return Ok(None);
    };
    if q.sort
        .iter()
        .any(|s| !matches!(s.field, SortField::Id) || s.descending)
    {
        return Ok(None);
    }
    let mut rids: Vec<i64> = Vec::new();
    for p in &clause.any_of {
        let Some(mut sub) = index_subquery(q.rtype, &clause.param, p) else {
            return Ok(None);
        };
        sub.arg(" LIMIT ?", usize_i64(LOOKUP_LIMIT + 1));
        let mut stmt = conn.prepare_cached(&sub.sql).map_err(db)?;
        let mut rows = stmt.query(params_from_iter(sub.args.iter())).map_err(db)?;
        while let Some(row) = rows.next().map_err(db)? {
            rids.push(row.get(0).map_err(db)?);
            if rids.len() > LOOKUP_LIMIT {
                return Ok(None);
            }
        }
    }
    rids.sort_unstable();
    rids.dedup();
    let mut matches: Vec<(String, i64, i64, i64)> = Vec::with_capacity(rids.len());
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, version, last_updated_ms FROM resources WHERE rid = ?1 AND rtype = ?2 AND deleted = 0",
        )
        .map_err(db)?;
    for rid in rids {
        let row = stmt
            .query_row(params![rid, q.rtype.as_str()], |r| {
                Ok((r.get(0)?, rid, r.get(1)?, r.get(2)?))
            })
            .optional()
            .map_err(db)?;
        matches.extend(row);
    }
    // `ORDER BY r.id` compares with SQLite's BINARY collation: bytewise, as `str` does.
    matches.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let total = (with_total && q.want_total).then(|| to_u64(usize_i64(matches.len())));
    let page = matches.into_iter().skip(q.offset).take(q.count);
    Ok(Some(SearchResult {
        resources: with_json(conn, q.rtype, page)?,
        total,
    }))
}

/// The resources of a page of matches `(id, rid, version, last_updated_ms)`, with their JSON read by
/// primary key.
fn with_json(
    conn: &Connection,
    rtype: ResourceType,
    page: impl Iterator<Item = (String, i64, i64, i64)>,
) -> Result<Vec<Stored>> {
    let mut stmt = conn
        .prepare_cached("SELECT json FROM versions WHERE rid = ?1 AND version = ?2")
        .map_err(db)?;
    let mut resources = Vec::new();
    for (id, rid, version, last_updated_ms) in page {
        let json: String = stmt
            .query_row(params![rid, version], |r| r.get(0))
            .map_err(db)?;
        resources.push(Stored {
            rtype,
            id,
            version: to_u64(version),
            last_updated_ms,
            deleted: false,
            json,
        });
    }
    Ok(resources)
}

/// Search on any connection. `want_total` is honoured only when `with_total` (outside transactions).
pub(crate) fn search(conn: &Connection, q: &SearchQuery, with_total: bool) -> Result<SearchResult> {
    match search_by_lookup(conn, q, with_total)? {
        Some(found) => Ok(found),
        None => search_statement(conn, q, with_total),
    }
}

/// The general path of [`search`]: one statement for the page (and one for the total).
pub(crate) fn search_statement(
    conn: &Connection,
    q: &SearchQuery,
    with_total: bool,
) -> Result<SearchResult> {
    // A search that can be answered in sort order races its clauses for less long: a clause only a few
    // thousand rows wide is worth walking, a wider one is not when the page can be filled in order.
    let in_order = sort_walk_param(conn, q)?;
    let limit = if in_order.is_some() {
        RACE_LIMIT_SORTED
    } else {
        RACE_LIMIT
    };
    let driver = choose_driver_within(conn, q, limit)?;
    if driver.is_none()
        && let Some((name, descending)) = in_order
        && let Some(found) = search_in_sort_order(conn, q, with_total, name, descending)?
    {
        return Ok(found);
    }
    search_driven(conn, q, with_total, driver)
}

/// The parameter (and direction) a search can be answered in the order of: its only sort key, a date
/// parameter held once per resource (see [`search_in_sort_order`]).
fn sort_walk_param<'a>(conn: &Connection, q: &'a SearchQuery) -> Result<Option<(&'a str, bool)>> {
    match store::single_date_sort(q) {
        Some((name, _)) if q.count == 0 || listed(conn, MULTI_VALUED, q.rtype, name)? => Ok(None),
        found => Ok(found),
    }
}

/// A search sorted by one single-valued date parameter (`_sort=start`) with no narrow clause to drive it (say
/// the next free slots of a schedule): walk that parameter's index rows in order, check every clause per row,
/// and stop once the page is full, instead of finding and sorting every match. `None` when the search is not
/// of that shape, or when the page is not full: resources without the parameter sort after all others, so a
/// short page may lack some of them, and the general statement answers instead.
pub(crate) fn search_in_sort_order(
    conn: &Connection,
    q: &SearchQuery,
    with_total: bool,
    name: &str,
    descending: bool,
) -> Result<Option<SearchResult>> {
    let mut page = Frag::default();
    page.push("SELECT r.rid, r.id, r.version, r.last_updated_ms FROM idx_date d JOIN resources r ON r.rid = d.rid");
    page.arg(" WHERE d.rtype = ?", q.rtype.as_str());
    page.arg(" AND d.param = ?", name);
    page.arg(" AND r.rtype = ?", q.rtype.as_str());
    page.push(" AND r.deleted = 0");
    for clause in &q.clauses {
        page.push(" AND ");
        page.append(clause_sql(q.rtype, clause, false));
    }
    page.push(if descending {
        " ORDER BY d.low_ms DESC, r.id ASC"
    } else {
        " ORDER BY d.low_ms ASC, r.id ASC"
    });
    page.arg(" LIMIT ?", usize_i64(q.count));
    page.arg(" OFFSET ?", usize_i64(q.offset));
    let rows = page_rows(conn, &page)?;
    if rows.len() < q.count {
        return Ok(None);
    }
    let total = if with_total && q.want_total {
        Some(count_matches(conn, &from_where_driven(q, None))?)
    } else {
        None
    };
    Ok(Some(SearchResult {
        resources: with_json(conn, q.rtype, rows.into_iter())?,
        total,
    }))
}

/// `SELECT COUNT(*)` of a search's `FROM ... WHERE ...`.
fn count_matches(conn: &Connection, filter: &Frag<'_>) -> Result<u64> {
    let sql = format!("SELECT COUNT(*){}", filter.sql);
    let n: i64 = conn
        .prepare_cached(&sql)
        .and_then(|mut s| s.query_row(params_from_iter(filter.args.iter()), |r| r.get(0)))
        .map_err(db)?;
    Ok(to_u64(n))
}

/// The matches `(id, rid, version, last_updated_ms)` of a page statement selecting
/// `r.rid, r.id, r.version, r.last_updated_ms`.
fn page_rows(conn: &Connection, page: &Frag<'_>) -> Result<Vec<(String, i64, i64, i64)>> {
    conn.prepare_cached(&page.sql)
        .and_then(|mut s| {
            s.query_map(params_from_iter(page.args.iter()), |r| {
                Ok((r.get(1)?, r.get(0)?, r.get(2)?, r.get(3)?))
            })?
            .collect()
        })
        .map_err(db)
}

/// [`search_statement`] driven by clause `driver` (`None`: every clause a set to walk). Whichever the driver,
/// the answer is the same; only the work differs.
pub(crate) fn search_driven(
    conn: &Connection,
    q: &SearchQuery,
    with_total: bool,
    driver: Option<Driver<'_>>,
) -> Result<SearchResult> {
    let filter = from_where_driven(q, driver);
    let total = if with_total && q.want_total {
        Some(count_matches(conn, &filter)?)
    } else {
        None
    };
    if q.count == 0 {
        return Ok(SearchResult {
            resources: Vec::new(),
            total,
        });
    }

    // Phase 1: the page of matches, with small columns only (no JSON through the sorter).
    let mut page = Frag::default();
    page.push("SELECT r.rid, r.id, r.version, r.last_updated_ms");
    page.append(filter);
    page.append(order_by(q));
    page.arg(" LIMIT ?", usize_i64(q.count));
    page.arg(" OFFSET ?", usize_i64(q.offset));
    let rows = page_rows(conn, &page)?;

    // Phase 2: the JSON of each, by primary key.
    Ok(SearchResult {
        resources: with_json(conn, q.rtype, rows.into_iter())?,
        total,
    })
}

pub(crate) fn history(conn: &Connection, q: &HistoryQuery) -> Result<SearchResult> {
    let since = q.since_ms.unwrap_or(i64::MIN);
    let (count_sql, page_sql, args): (&str, &str, Vec<ToSqlOutput<'_>>) = match &q.id {
        Some(id) => (
            "SELECT COUNT(*) FROM resources r JOIN versions v ON v.rid = r.rid
             WHERE r.rtype = ?1 AND r.id = ?2 AND v.last_updated_ms >= ?3",
            "SELECT r.rtype, r.id, v.version, v.last_updated_ms, v.deleted, v.json
             FROM resources r JOIN versions v ON v.rid = r.rid
             WHERE r.rtype = ?1 AND r.id = ?2 AND v.last_updated_ms >= ?3
             ORDER BY v.last_updated_ms DESC, v.version DESC LIMIT ?4 OFFSET ?5",
            vec![q.rtype.as_str().into(), id.as_str().into(), since.into()],
        ),
        None => (
            "SELECT COUNT(*) FROM versions v WHERE v.rtype = ?1 AND v.last_updated_ms >= ?2",
            "SELECT r.rtype, r.id, v.version, v.last_updated_ms, v.deleted, v.json
             FROM versions v CROSS JOIN resources r ON r.rid = v.rid
             WHERE v.rtype = ?1 AND v.last_updated_ms >= ?2
             ORDER BY v.last_updated_ms DESC, v.vid DESC LIMIT ?3 OFFSET ?4",
            vec![q.rtype.as_str().into(), since.into()],
        ),
    };
    let total: i64 = conn
        .prepare_cached(count_sql)
        .and_then(|mut s| s.query_row(params_from_iter(args.iter()), |r| r.get(0)))
        .map_err(db)?;
    let mut page_args = args;
    page_args.push(usize_i64(q.count).into());
    page_args.push(usize_i64(q.offset).into());
    let resources = if q.count == 0 {
        Vec::new()
    } else {
        conn.prepare_cached(page_sql)
            .and_then(|mut s| {
                s.query_map(params_from_iter(page_args.iter()), stored_from_row)?
                    .collect()
            })
            .map_err(db)?
    };
    Ok(SearchResult {
        resources,
        total: Some(to_u64(total)),
    })
}

/// Events with `after < seq <= upto`, in order.
pub(crate) fn events_after(
    conn: &Connection,
    after: i64,
    upto: i64,
    limit: usize,
) -> Result<Vec<Event>> {
    let rows: Vec<(Event, String)> = conn
        .prepare_cached(
            "SELECT seq, subject, subject_seq, kind, rtype, id, version, time_ms, data
             FROM outbox WHERE seq > ?1 AND seq <= ?3 ORDER BY seq LIMIT ?2",
        )
        .and_then(|mut s| {
            s.query_map(params![after, usize_i64(limit), upto], |r| {
                Ok((
                    Event {
                        seq: r.get(0)?,
                        subject: r.get(1)?,
                        subject_seq: r.get(2)?,
                        kind: r.get(3)?,
                        rtype: parse_rtype(r, 4)?,
                        id: r.get(5)?,
                        version: to_u64(r.get(6)?),
                        time_ms: r.get(7)?,
                        data: Value::Null,
                    },
                    r.get(8)?,
                ))
            })?
            .collect()
        })
        .map_err(db)?;
    rows.into_iter()
        .map(|(mut e, data)| {
            e.data = serde_json::from_str(&data).map_err(|err| {
                StoreError::Backend(format!("outbox event {}: bad data: {err}", e.seq))
            })?;
            Ok(e)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::prefix_upper_bound;

    #[test]
    fn prefix_bounds() {
        assert_eq!(prefix_upper_bound("smi").as_deref(), Some("smj"));
        assert_eq!(prefix_upper_bound("").as_deref(), None);
        assert_eq!(prefix_upper_bound("zo\u{eb}").as_deref(), Some("zo\u{ec}"));
        assert_eq!(
            prefix_upper_bound("a\u{d7ff}").as_deref(),
            Some("a\u{e000}")
        );
        assert_eq!(prefix_upper_bound("a\u{10ffff}").as_deref(), Some("b"));
        assert_eq!(prefix_upper_bound("\u{10ffff}").as_deref(), None);
    }
}
