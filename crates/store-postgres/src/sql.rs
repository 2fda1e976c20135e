//! Every SQL statement of the backend, as async functions over a [`Conn`]: the writer thread runs them (with
//! `block_on` on its own runtime) on the write connection inside its transaction, reads run them on a pooled
//! connection. Statements are prepared once per connection.
//!
//! Statements cost more here than in SQLite (a message exchange with the server, and executor set-up for
//! every table a statement touches), so the writer reads a resource's current version, its rid (a fresh one
//! for a new resource) and its subject's sequence in one statement and remembers them for the job: a read,
//! put and event of one resource cost one round trip. Their rows are held back and written for the whole
//! batch by a few pipelined statements (`pending.rs`).

use std::collections::BTreeSet;

use store::{
    Clause, Cmp, Delivery, DeliveryCounts, DeliveryQuery, DeliveryState, DeliveryUpdate, Event,
    HistoryQuery, IdempotencyRecord, IndexValue, MULTI_VALUED, NewEvent, Predicate, Put,
    ResourceType, Result, SearchQuery, SearchResult, SortField, StoreError, Stored, WIDE,
};
use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, ToSql, Type};

use crate::conn::{Conn, db};
use crate::pending::{self, EventRow, JobBuf, Seen};

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn usize_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn get<'a, T: FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T> {
    row.try_get(idx).map_err(db)
}

fn rtype_of(row: &Row, idx: usize) -> Result<ResourceType> {
    let s: &str = get(row, idx)?;
    ResourceType::parse(s)
        .ok_or_else(|| StoreError::Backend(format!("unknown resource type {s:?} in the database")))
}

/// PostgreSQL text cannot hold U+0000; refuse it up front (SQLite would have stored it).
fn no_nul(what: &str, s: &str) -> Result<()> {
    if s.contains('\0') {
        Err(StoreError::Invalid(format!(
            "{what} contains a NUL character"
        )))
    } else {
        Ok(())
    }
}

/// Columns: rtype, id, version, last_updated_ms, deleted, json.
fn stored_from_row(row: &Row) -> Result<Stored> {
    Ok(Stored {
        rtype: rtype_of(row, 0)?,
        id: get(row, 1)?,
        version: to_u64(get(row, 2)?),
        last_updated_ms: get(row, 3)?,
        deleted: get(row, 4)?,
        json: get(row, 5)?,
    })
}

// ---------------------------------------------------------------------------------------------------------
// Point reads

pub(crate) async fn read_current(
    c: &Conn,
    rtype: ResourceType,
    id: &str,
) -> Result<Option<Stored>> {
    no_nul("id", id)?;
    let row = c
        .query_opt(
            "SELECT r.rtype, r.id, v.version, v.last_updated_ms, v.deleted, v.json
             FROM resources r JOIN versions v ON v.rid = r.rid AND v.version = r.version
             WHERE r.rtype = $1 AND r.id = $2",
            &[&rtype.as_str(), &id],
        )
        .await?;
    row.as_ref().map(stored_from_row).transpose()
}

pub(crate) async fn read_version(
    c: &Conn,
    rtype: ResourceType,
    id: &str,
    version: u64,
) -> Result<Option<Stored>> {
    no_nul("id", id)?;
    let row = c
        .query_opt(
            "SELECT r.rtype, r.id, v.version, v.last_updated_ms, v.deleted, v.json
             FROM resources r JOIN versions v ON v.rid = r.rid
             WHERE r.rtype = $1 AND r.id = $2 AND v.version = $3",
            &[&rtype.as_str(), &id, &to_i64(version)],
        )
        .await?;
    row.as_ref().map(stored_from_row).transpose()
}

// ---------------------------------------------------------------------------------------------------------
// Writes (only ever called by the writer, inside its transaction). Resources, versions, index rows, subjects
// and events go to the job's buffer (`pending.rs`); reads of them look at the buffers first.

/// Inside the writer: the current version of a resource, its rid (a fresh one from the identity sequence
/// when it was never stored: a gap in the sequence when it is not then created is harmless) and the
/// `last_seq` of its subject (`Type/id`), in one round trip. Always one row.
const READ_FOR_WRITE: &str = "
SELECT COALESCE(r.rid, nextval(pg_get_serial_sequence('resources', 'rid'))), v.version,
       v.last_updated_ms, v.deleted, v.json, COALESCE(s.last_seq, 0)
FROM (SELECT 1) AS one
LEFT JOIN resources r ON r.rtype = $1 AND r.id = $2
LEFT JOIN versions v ON v.rid = r.rid AND v.version = r.version
LEFT JOIN subjects s ON s.subject = $3";

/// Read `rtype/id` from the database for the writer, remembering its state and subject seq in `seen`.
async fn read_for_write(
    c: &Conn,
    seen: &mut Seen,
    rtype: ResourceType,
    id: &str,
) -> Result<(i64, Option<Stored>)> {
    no_nul("id", id)?;
    let subject = format!("{rtype}/{id}");
    let row = c
        .query_one(READ_FOR_WRITE, &[&rtype.as_str(), &id, &subject])
        .await?;
    remember(seen, rtype, id, subject, &row, 0)
}

/// Record a row of [`READ_FOR_WRITE`]'s shape (from column `at` on) as what the database holds.
fn remember(
    seen: &mut Seen,
    rtype: ResourceType,
    id: &str,
    subject: String,
    row: &Row,
    at: usize,
) -> Result<(i64, Option<Stored>)> {
    let rid: i64 = get(row, at)?;
    let version: Option<i64> = get(row, at + 1)?;
    let last_seq: i64 = get(row, at + 5)?;
    seen.subjects.entry(subject).or_insert(last_seq);
    let stored = match version {
        None => None,
        Some(version) => Some(Stored {
            rtype,
            id: id.to_string(),
            version: to_u64(version),
            last_updated_ms: get(row, at + 2)?,
            deleted: get(row, at + 3)?,
            json: get(row, at + 4)?,
        }),
    };
    seen.resources
        .insert((rtype, id.to_string()), (rid, stored.clone()));
    Ok((rid, stored))
}

/// [`READ_FOR_WRITE`] for many resources at once: one row per key, led by its position (from 1).
const READ_AHEAD: &str = "
SELECT k.n, COALESCE(r.rid, nextval(pg_get_serial_sequence('resources', 'rid'))), v.version,
       v.last_updated_ms, v.deleted, v.json, COALESCE(s.last_seq, 0)
FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS k(rtype, id, subject, n)
LEFT JOIN resources r ON r.rtype = k.rtype COLLATE \"C\" AND r.id = k.id COLLATE \"C\"
LEFT JOIN versions v ON v.rid = r.rid AND v.version = r.version
LEFT JOIN subjects s ON s.subject = k.subject COLLATE \"C\"";

/// Read `keys` (none of them in `seen` yet) from the database in one round trip, remembering each as
/// [`read_for_write`] would. Keys that cannot be stored (a NUL in the id) are left out: a read of one
/// reports the error as usual.
pub(crate) async fn read_ahead(
    c: &Conn,
    seen: &mut Seen,
    keys: &[(ResourceType, String)],
) -> Result<()> {
    let keys: Vec<&(ResourceType, String)> =
        keys.iter().filter(|(_, id)| !id.contains('\0')).collect();
    if keys.is_empty() {
        return Ok(());
    }
    let rtypes: Vec<&str> = keys.iter().map(|(t, _)| t.as_str()).collect();
    let ids: Vec<&str> = keys.iter().map(|(_, id)| id.as_str()).collect();
    let subjects: Vec<String> = keys.iter().map(|(t, id)| format!("{t}/{id}")).collect();
    let rows = c.query(READ_AHEAD, &[&rtypes, &ids, &subjects]).await?;
    for row in &rows {
        let n: i64 = get(row, 0)?;
        let i = usize::try_from(n - 1).unwrap_or(usize::MAX);
        let (Some(key), Some(subject)) = (keys.get(i), subjects.get(i)) else {
            return Err(StoreError::Backend(format!(
                "read-ahead answered row {n} of {}",
                keys.len()
            )));
        };
        remember(seen, key.0, &key.1, subject.clone(), row, 1)?;
    }
    Ok(())
}

/// The rid and current version of a resource in the database as of the batch's start: what the batch
/// already read, else one read.
async fn in_db(
    c: &Conn,
    seen: &mut Seen,
    rtype: ResourceType,
    id: &str,
) -> Result<(i64, Option<Stored>)> {
    match seen.resources.get(&(rtype, id.to_string())) {
        Some(known) => Ok(known.clone()),
        None => read_for_write(c, seen, rtype, id).await,
    }
}

/// (rid, current version or 0, live) of a resource as the transaction sees it: buffers first, then the
/// database.
async fn state_in_tx(
    c: &Conn,
    own: &JobBuf,
    kept: &[JobBuf],
    seen: &mut Seen,
    rtype: ResourceType,
    id: &str,
) -> Result<(i64, u64, bool)> {
    if let Some(cur) = pending::lookup(own, kept, rtype, id) {
        return Ok((cur.rid, cur.stored.version, !cur.stored.deleted));
    }
    let (rid, stored) = in_db(c, seen, rtype, id).await?;
    Ok(match stored {
        Some(s) => (rid, s.version, !s.deleted),
        None => (rid, 0, false),
    })
}

/// The current version of a resource as the transaction sees it (buffers first, then the database).
pub(crate) async fn read_in_tx(
    c: &Conn,
    own: &JobBuf,
    kept: &[JobBuf],
    seen: &mut Seen,
    rtype: ResourceType,
    id: &str,
) -> Result<Option<Stored>> {
    match pending::lookup(own, kept, rtype, id) {
        Some(cur) => Ok(Some(cur.stored.clone())),
        None => Ok(in_db(c, seen, rtype, id).await?.1),
    }
}

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

pub(crate) async fn put(
    c: &Conn,
    own: &mut JobBuf,
    kept: &[JobBuf],
    seen: &mut Seen,
    now_ms: i64,
    put: Put,
) -> Result<Stored> {
    let rtype = put.rtype;
    if put.id.is_empty() {
        return Err(StoreError::Invalid(format!("{rtype}: empty id")));
    }
    no_nul("id", &put.id)?;
    for e in &put.index {
        match &e.value {
            IndexValue::Token { system, code } => {
                no_nul(e.param, code)?;
                no_nul(e.param, system.as_deref().unwrap_or(""))?;
            }
            IndexValue::String { value, exact } => {
                no_nul(e.param, value)?;
                no_nul(e.param, exact)?;
            }
            IndexValue::Reference(s) => no_nul(e.param, s)?,
            IndexValue::Date { .. } => {}
        }
    }
    let (rid, current, live) = state_in_tx(c, own, kept, seen, rtype, &put.id).await?;
    check_expected(
        rtype,
        &put.id,
        put.expected_version,
        if live { current } else { 0 },
    )?;
    let version = current + 1;
    let json = put.stamp(version, &fhir::format_instant_ms(now_ms))?;
    let Put { id, index, .. } = put;
    let stored = Stored {
        rtype,
        id,
        version,
        last_updated_ms: now_ms,
        deleted: false,
        json,
    };
    own.put(rid, stored.clone(), index);
    Ok(stored)
}

#[expect(
    clippy::too_many_arguments,
    reason = "the writer's transaction state is passed in parts so that the borrows stay apart"
)]
pub(crate) async fn delete(
    c: &Conn,
    own: &mut JobBuf,
    kept: &[JobBuf],
    seen: &mut Seen,
    now_ms: i64,
    rtype: ResourceType,
    id: &str,
    expected_version: Option<u64>,
) -> Result<Option<Stored>> {
    no_nul("id", id)?;
    let current = match state_in_tx(c, own, kept, seen, rtype, id).await? {
        (_, 0, _) => None,
        (rid, version, live) => Some((rid, version, !live)),
    };
    let live_version = match current {
        Some((_, v, false)) => v,
        _ => 0,
    };
    check_expected(rtype, id, expected_version, live_version)?;
    let Some((rid, current_version, false)) = current else {
        return Ok(None);
    };
    let tombstone = Stored {
        rtype,
        id: id.to_string(),
        version: current_version + 1,
        last_updated_ms: now_ms,
        deleted: true,
        json: String::new(),
    };
    own.put(rid, tombstone.clone(), Vec::new());
    Ok(Some(tombstone))
}

/// Append an event: the next gap-free `subject_seq` (buffers first, then `subjects`) and the next global
/// `seq` (`next_seq`, which the writer read as max + 1 under the write lock, so seqs follow commit order).
pub(crate) async fn append_event(
    c: &Conn,
    own: &mut JobBuf,
    kept: &[JobBuf],
    seen: &mut Seen,
    next_seq: &mut i64,
    now_ms: i64,
    event: NewEvent,
) -> Result<Event> {
    let NewEvent {
        subject,
        kind,
        rtype,
        id,
        version,
        data,
    } = event;
    no_nul("event subject", &subject)?;
    no_nul("event kind", &kind)?;
    no_nul("event id", &id)?;
    let data_text = serde_json::to_string(&data)
        .map_err(|e| StoreError::Invalid(format!("event data: {e}")))?;
    let last = match pending::subject_seq(own, kept, &subject)
        .or_else(|| seen.subjects.get(&subject).copied())
    {
        Some(n) => n,
        None => {
            let n = c
                .query_opt(
                    "SELECT last_seq FROM subjects WHERE subject = $1",
                    &[&subject],
                )
                .await?
                .map(|r| get::<i64>(&r, 0))
                .transpose()?
                .unwrap_or(0);
            seen.subjects.insert(subject.clone(), n);
            n
        }
    };
    let seq = *next_seq;
    *next_seq += 1;
    let event = Event {
        seq,
        subject,
        subject_seq: last + 1,
        kind,
        rtype,
        id,
        version,
        time_ms: now_ms,
        data,
    };
    own.event(EventRow {
        seq,
        subject: event.subject.clone(),
        subject_seq: event.subject_seq,
        kind: event.kind.clone(),
        rtype,
        id: event.id.clone(),
        version: to_i64(version),
        time_ms: now_ms,
        data: data_text,
    });
    Ok(event)
}

pub(crate) async fn idempotency_get(c: &Conn, key: &str) -> Result<Option<IdempotencyRecord>> {
    no_nul("idempotency key", key)?;
    let Some(row) = c
        .query_opt(
            "SELECT request_hash, status, headers_json, body, created_ms FROM idempotency WHERE key = $1",
            &[&key],
        )
        .await?
    else {
        return Ok(None);
    };
    let headers_json: &str = get(&row, 2)?;
    let headers: Vec<(String, String)> = serde_json::from_str(headers_json)
        .map_err(|e| StoreError::Backend(format!("idempotency record {key}: bad headers: {e}")))?;
    Ok(Some(IdempotencyRecord {
        key: key.to_string(),
        request_hash: get(&row, 0)?,
        status: u16::try_from(get::<i32>(&row, 1)?).unwrap_or(0),
        headers,
        body: get(&row, 3)?,
        created_ms: get(&row, 4)?,
    }))
}

pub(crate) async fn idempotency_put(c: &Conn, record: IdempotencyRecord) -> Result<()> {
    no_nul("idempotency key", &record.key)?;
    no_nul("idempotency response", &record.body)?;
    let headers =
        serde_json::to_string(&record.headers).map_err(|e| StoreError::Invalid(e.to_string()))?;
    no_nul("idempotency headers", &headers)?;
    c.execute(
        "INSERT INTO idempotency (key, request_hash, status, headers_json, body, created_ms)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (key) DO UPDATE SET request_hash = EXCLUDED.request_hash, status = EXCLUDED.status,
             headers_json = EXCLUDED.headers_json, body = EXCLUDED.body, created_ms = EXCLUDED.created_ms",
        &[
            &record.key,
            &record.request_hash,
            &i32::from(record.status),
            &headers,
            &record.body,
            &record.created_ms,
        ],
    )
    .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Named values

pub(crate) async fn kv_get(c: &Conn, namespace: &str, key: &str) -> Result<Option<String>> {
    no_nul("namespace", namespace)?;
    no_nul("key", key)?;
    let row = c
        .query_opt(
            "SELECT value FROM kv WHERE namespace = $1 AND key = $2",
            &[&namespace, &key],
        )
        .await?;
    row.as_ref().map(|r| get(r, 0)).transpose()
}

pub(crate) async fn kv_put(
    c: &Conn,
    namespace: &str,
    key: &str,
    value: Option<&str>,
) -> Result<()> {
    no_nul("namespace", namespace)?;
    no_nul("key", key)?;
    match value {
        Some(value) => {
            no_nul("value", value)?;
            c.execute(
                "INSERT INTO kv (namespace, key, value) VALUES ($1, $2, $3)
                 ON CONFLICT (namespace, key) DO UPDATE SET value = EXCLUDED.value",
                &[&namespace, &key, &value],
            )
            .await?
        }
        None => {
            c.execute(
                "DELETE FROM kv WHERE namespace = $1 AND key = $2",
                &[&namespace, &key],
            )
            .await?
        }
    };
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// Deliveries
//
// Invariant kept by every write below: `delivery_heads` holds exactly one row per (subscription, subject)
// with a pending delivery, naming the lowest pending seq of that subject and that delivery's
// next_attempt_ms.

const PENDING: i32 = 0;
const DELIVERED: i32 = 1;
const DEAD: i32 = 2;

fn state_code(state: DeliveryState) -> i32 {
    match state {
        DeliveryState::Pending => PENDING,
        DeliveryState::Delivered => DELIVERED,
        DeliveryState::Dead => DEAD,
    }
}

fn state_from_code(code: i32) -> Result<DeliveryState> {
    match code {
        PENDING => Ok(DeliveryState::Pending),
        DELIVERED => Ok(DeliveryState::Delivered),
        DEAD => Ok(DeliveryState::Dead),
        other => Err(StoreError::Backend(format!(
            "unknown delivery state {other} in the database"
        ))),
    }
}

fn u32_i32(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Columns (of `deliveries d`).
macro_rules! delivery_columns {
    () => {
        "d.subscription, d.seq, d.subject, d.state, d.attempts, d.next_attempt_ms, d.created_ms, \
         d.updated_ms, d.last_status, d.last_error"
    };
}

fn delivery_from_row(row: &Row) -> Result<Delivery> {
    Ok(Delivery {
        subscription: get(row, 0)?,
        seq: get(row, 1)?,
        subject: get(row, 2)?,
        state: state_from_code(get(row, 3)?)?,
        attempts: u32::try_from(get::<i32>(row, 4)?).unwrap_or(0),
        next_attempt_ms: get(row, 5)?,
        created_ms: get(row, 6)?,
        updated_ms: get(row, 7)?,
        last_status: get::<Option<i32>>(row, 8)?.map(|s| u16::try_from(s).unwrap_or(0)),
        last_error: get(row, 9)?,
    })
}

/// Make the head row of (subscription, subject) name its lowest pending delivery, or remove it: one
/// statement (it runs after the statement that changed the delivery, so it sees that change).
const REFRESH_HEAD: &str = "
WITH low AS (
    SELECT seq, next_attempt_ms FROM deliveries
    WHERE subscription = $1::text AND subject = $2::text AND state = 0 ORDER BY seq LIMIT 1
), gone AS (
    DELETE FROM delivery_heads
    WHERE subscription = $1::text AND subject = $2::text AND NOT EXISTS (SELECT 1 FROM low)
)
INSERT INTO delivery_heads (subscription, subject, seq, next_attempt_ms)
SELECT $1::text, $2::text, low.seq, low.next_attempt_ms FROM low
ON CONFLICT (subscription, subject)
DO UPDATE SET seq = EXCLUDED.seq, next_attempt_ms = EXCLUDED.next_attempt_ms";

async fn refresh_head(c: &Conn, subscription: &str, subject: &str) -> Result<()> {
    c.execute(REFRESH_HEAD, &[&subscription, &subject]).await?;
    Ok(())
}

/// The delivery row and (if it is the subject's new lowest pending seq) its head, in one statement.
const ENQUEUE: &str = "
WITH ins AS (
    INSERT INTO deliveries (subscription, seq, subject, state, attempts, next_attempt_ms, created_ms,
        updated_ms, last_status, last_error)
    VALUES ($1::text, $2::bigint, $3::text, 0, 0, $4::bigint, $4::bigint, $4::bigint, NULL, NULL)
    ON CONFLICT (subscription, seq) DO NOTHING
    RETURNING seq
), head AS (
    INSERT INTO delivery_heads (subscription, subject, seq, next_attempt_ms)
    SELECT $1::text, $3::text, ins.seq, $4::bigint FROM ins
    ON CONFLICT (subscription, subject) DO UPDATE
        SET seq = EXCLUDED.seq, next_attempt_ms = EXCLUDED.next_attempt_ms
        WHERE EXCLUDED.seq < delivery_heads.seq
)
SELECT COUNT(*) FROM ins";

/// Enqueue (pending, due at `now_ms`); false when the delivery already exists (then nothing changes).
pub(crate) async fn enqueue_delivery(
    c: &Conn,
    now_ms: i64,
    subscription: &str,
    seq: i64,
    subject: &str,
) -> Result<bool> {
    no_nul("subscription", subscription)?;
    no_nul("subject", subject)?;
    let row = c
        .query_one(ENQUEUE, &[&subscription, &seq, &subject, &now_ms])
        .await?;
    Ok(get::<i64>(&row, 0)? > 0)
}

/// [`ENQUEUE`] for many events in one statement: every new delivery row, and per subject the head of its
/// lowest new seq (when lower than the subject's head). Returns the seqs inserted (an existing delivery, or
/// a repeat of a seq earlier in `seqs`, is not).
const ENQUEUE_MANY: &str = "
WITH ins AS (
    INSERT INTO deliveries (subscription, seq, subject, state, attempts, next_attempt_ms, created_ms,
        updated_ms, last_status, last_error)
    SELECT $1::text, e.seq, e.subject, 0, 0, $4::bigint, $4::bigint, $4::bigint, NULL, NULL
    FROM unnest($2::bigint[], $3::text[]) AS e(seq, subject)
    ON CONFLICT (subscription, seq) DO NOTHING
    RETURNING seq, subject
), head AS (
    INSERT INTO delivery_heads (subscription, subject, seq, next_attempt_ms)
    SELECT $1::text, subject, MIN(seq), $4::bigint FROM ins GROUP BY subject
    ON CONFLICT (subscription, subject) DO UPDATE
        SET seq = EXCLUDED.seq, next_attempt_ms = EXCLUDED.next_attempt_ms
        WHERE EXCLUDED.seq < delivery_heads.seq
)
SELECT seq FROM ins";

/// Enqueue many deliveries of `subscription` (pending, due at `now_ms`) in one round trip; the seqs that
/// were new.
pub(crate) async fn enqueue_deliveries(
    c: &Conn,
    now_ms: i64,
    subscription: &str,
    seqs: &[i64],
    subjects: &[&str],
) -> Result<BTreeSet<i64>> {
    no_nul("subscription", subscription)?;
    for subject in subjects {
        no_nul("subject", subject)?;
    }
    let rows = c
        .query(ENQUEUE_MANY, &[&subscription, &seqs, &subjects, &now_ms])
        .await?;
    rows.iter().map(|r| get::<i64>(r, 0)).collect()
}

/// Apply an attempt's outcome or a requeue. `Invalid` (before any change) when the delivery is unknown.
pub(crate) async fn update_delivery(
    c: &Conn,
    now_ms: i64,
    subscription: &str,
    seq: i64,
    update: &DeliveryUpdate,
) -> Result<()> {
    no_nul("subscription", subscription)?;
    let subject: Option<String> = c
        .query_opt(
            "SELECT subject FROM deliveries WHERE subscription = $1 AND seq = $2",
            &[&subscription, &seq],
        )
        .await?
        .map(|r| get(&r, 0))
        .transpose()?;
    let Some(subject) = subject else {
        return Err(StoreError::Invalid(format!(
            "no delivery of event {seq} to subscription {subscription}"
        )));
    };
    match update {
        DeliveryUpdate::Delivered { attempts, status } => {
            c.execute(
                "UPDATE deliveries SET state = 1, attempts = $3, updated_ms = $4, last_status = $5,
                     last_error = NULL
                 WHERE subscription = $1 AND seq = $2",
                &[
                    &subscription,
                    &seq,
                    &u32_i32(*attempts),
                    &now_ms,
                    &i32::from(*status),
                ],
            )
            .await?
        }
        DeliveryUpdate::Retry {
            attempts,
            next_attempt_ms,
            status,
            error,
        } => {
            no_nul("error", error)?;
            c.execute(
                "UPDATE deliveries SET state = 0, attempts = $3, next_attempt_ms = $4, updated_ms = $5,
                     last_status = $6, last_error = $7
                 WHERE subscription = $1 AND seq = $2",
                &[
                    &subscription,
                    &seq,
                    &u32_i32(*attempts),
                    next_attempt_ms,
                    &now_ms,
                    &status.map(i32::from),
                    error,
                ],
            )
            .await?
        }
        DeliveryUpdate::Dead {
            attempts,
            status,
            error,
        } => {
            no_nul("error", error)?;
            c.execute(
                "UPDATE deliveries SET state = 2, attempts = $3, updated_ms = $4, last_status = $5,
                     last_error = $6
                 WHERE subscription = $1 AND seq = $2",
                &[
                    &subscription,
                    &seq,
                    &u32_i32(*attempts),
                    &now_ms,
                    &status.map(i32::from),
                    error,
                ],
            )
            .await?
        }
        DeliveryUpdate::Requeue => {
            c.execute(
                "UPDATE deliveries SET state = 0, attempts = 0, next_attempt_ms = $3, updated_ms = $3
                 WHERE subscription = $1 AND seq = $2",
                &[&subscription, &seq, &now_ms],
            )
            .await?
        }
    };
    refresh_head(c, subscription, &subject).await
}

/// Requeue every dead delivery of `subscription` (pending, no attempts, due at `now_ms`); how many.
pub(crate) async fn requeue_dead(c: &Conn, now_ms: i64, subscription: &str) -> Result<u64> {
    no_nul("subscription", subscription)?;
    let rows = c
        .query(
            "UPDATE deliveries SET state = 0, attempts = 0, next_attempt_ms = $2, updated_ms = $2
             WHERE subscription = $1 AND state = 2
             RETURNING subject",
            &[&subscription, &now_ms],
        )
        .await?;
    let n = rows.len();
    let mut distinct = BTreeSet::new();
    for r in &rows {
        distinct.insert(get::<String>(r, 0)?);
    }
    for subject in &distinct {
        refresh_head(c, subscription, subject).await?;
    }
    Ok(u64::try_from(n).unwrap_or(u64::MAX))
}

/// The heads due at `now_ms`, earliest first.
///
/// Sent unprepared (planned each time, for the tables' current size), as is [`due_deliveries_for`]: the
/// delivery tables go from empty to tens of thousands of rows in a second (a `$replay`), and a prepared
/// statement's generic plan made while they were small (a nested loop of whole-table scans) was kept until
/// autovacuum next analyzed them. Measured: a replay of 20,000 events delivered nothing in 20 s; 3,000 went
/// at 192/s, each poll taking about 250 ms.
pub(crate) async fn due_deliveries(c: &Conn, now_ms: i64, limit: usize) -> Result<Vec<Delivery>> {
    let rows = c
        .query_typed(
            concat!(
                "SELECT ",
                delivery_columns!(),
                " FROM delivery_heads h JOIN deliveries d ON d.subscription = h.subscription AND d.seq = h.seq
                 WHERE h.next_attempt_ms <= $1
                 ORDER BY h.next_attempt_ms, h.seq LIMIT $2"
            ),
            &[(&now_ms, Type::INT8), (&usize_i64(limit), Type::INT8)],
        )
        .await?;
    rows.iter().map(delivery_from_row).collect()
}

/// Due heads of one subscription.
pub(crate) async fn due_deliveries_for(
    c: &Conn,
    subscription: &str,
    now_ms: i64,
    limit: usize,
) -> Result<Vec<Delivery>> {
    no_nul("subscription", subscription)?;
    let rows = c
        .query_typed(
            concat!(
                "SELECT ",
                delivery_columns!(),
                " FROM delivery_heads h JOIN deliveries d ON d.subscription = h.subscription AND d.seq = h.seq
                 WHERE h.subscription = $1 AND h.next_attempt_ms <= $2
                 ORDER BY h.next_attempt_ms, h.seq LIMIT $3"
            ),
            &[
                (&subscription, Type::TEXT),
                (&now_ms, Type::INT8),
                (&usize_i64(limit), Type::INT8),
            ],
        )
        .await?;
    rows.iter().map(delivery_from_row).collect()
}

/// The earliest next attempt of any head.
pub(crate) async fn next_due_ms(c: &Conn) -> Result<Option<i64>> {
    let row = c
        .query_one("SELECT MIN(next_attempt_ms) FROM delivery_heads", &[])
        .await?;
    get(&row, 0)
}

pub(crate) async fn deliveries(c: &Conn, q: &DeliveryQuery) -> Result<Vec<Delivery>> {
    let mut f = Frag::default();
    f.push(concat!(
        "SELECT ",
        delivery_columns!(),
        " FROM deliveries d WHERE "
    ));
    if let Some(subscription) = &q.subscription {
        no_nul("subscription", subscription)?;
        f.arg("d.subscription = ", subscription.clone());
        f.push(" AND ");
    }
    if let Some(state) = q.state {
        f.arg("d.state = ", state_code(state));
        f.push(" AND ");
    }
    f.arg("d.seq > ", q.after_seq);
    f.push(" ORDER BY d.seq, d.subscription");
    f.arg(" LIMIT ", usize_i64(q.limit));
    let rows = c.query(&f.sql, &f.params()).await?;
    rows.iter().map(delivery_from_row).collect()
}

pub(crate) async fn delivery_counts(c: &Conn, subscription: &str) -> Result<DeliveryCounts> {
    no_nul("subscription", subscription)?;
    let rows = c
        .query(
            "SELECT state, COUNT(*) FROM deliveries WHERE subscription = $1 GROUP BY state",
            &[&subscription],
        )
        .await?;
    let mut counts = DeliveryCounts::default();
    for r in &rows {
        let n = to_u64(get(r, 1)?);
        match state_from_code(get(r, 0)?)? {
            DeliveryState::Pending => counts.pending = n,
            DeliveryState::Delivered => counts.delivered = n,
            DeliveryState::Dead => counts.dead = n,
        }
    }
    Ok(counts)
}

/// The highest outbox seq (0 when empty).
pub(crate) async fn last_event_seq(c: &Conn) -> Result<i64> {
    let row = c
        .query_one("SELECT COALESCE(MAX(seq), 0)::bigint FROM outbox", &[])
        .await?;
    get(&row, 0)
}

// ---------------------------------------------------------------------------------------------------------
// Search

type Arg = Box<dyn ToSql + Sync + Send>;

/// A value a [`Frag`] binds, with the type it is sent as when the statement goes unprepared
/// ([`Conn::query_typed`]).
trait Bind: ToSql + Sync + Send + 'static {
    const TYPE: Type;
}
impl Bind for i64 {
    const TYPE: Type = Type::INT8;
}
impl Bind for i32 {
    const TYPE: Type = Type::INT4;
}
impl Bind for String {
    const TYPE: Type = Type::TEXT;
}
impl Bind for &'static str {
    const TYPE: Type = Type::TEXT;
}

/// A SQL text with its numbered (`$n`) parameters, in order.
#[derive(Default)]
struct Frag {
    sql: String,
    args: Vec<Arg>,
    types: Vec<Type>,
}

impl Frag {
    fn push(&mut self, sql: &str) {
        self.sql.push_str(sql);
    }
    /// Append `sql` followed by the placeholder of a new parameter `v`.
    fn arg<V: Bind>(&mut self, sql: &str, v: V) {
        self.args.push(Box::new(v));
        self.types.push(V::TYPE);
        self.sql.push_str(sql);
        self.sql.push('$');
        self.sql.push_str(&self.args.len().to_string());
    }
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
    /// The parameters with their types, for [`Conn::query_typed`].
    fn typed_params(&self) -> Vec<(&(dyn ToSql + Sync), Type)> {
        self.params()
            .into_iter()
            .zip(self.types.iter().cloned())
            .collect()
    }
    /// Rows of the statement: planned for these values ([`Conn::query_typed`]) when `per_values`, else from
    /// the connection's prepared statements.
    async fn query(&self, c: &Conn, per_values: bool) -> Result<Vec<Row>> {
        if per_values {
            c.query_typed(&self.sql, &self.typed_params()).await
        } else {
            c.query(&self.sql, &self.params()).await
        }
    }
}

/// Whether a search is planned for its values on every run (sent unprepared) rather than from a prepared
/// statement: when it has several clauses, or a clause whose values decide how many rows it reads (a date or
/// `_lastUpdated` range, a string prefix).
///
/// Why: PostgreSQL plans a prepared statement for its values five times, then may switch to a generic plan
/// made without them if that looks no costlier on average. For a search that choice is wrong: whether
/// `start=ge{day}&start=lt{next day}` or `schedule=..` should drive depends on the values. With the generic
/// plan, one day's free slots of a schedule of 50,000 went from a few milliseconds to 80-800 ms (every slot
/// of the type walked in id order). Planning costs about a millisecond per search of four clauses; a search
/// by one identifier keeps its prepared plan.
fn plan_per_values(q: &SearchQuery) -> bool {
    q.clauses.len() > 1
        || q.clauses.iter().any(|c| {
            c.any_of.iter().any(|p| match p {
                Predicate::Date { .. } | Predicate::LastUpdated { .. } => true,
                Predicate::String { exact, .. } => exact.is_none(),
                Predicate::Id(_) | Predicate::Token { .. } | Predicate::Reference(_) => false,
            })
        })
}

/// `[low, high]` compared with the query range per FHIR's prefix rules; `low`/`high` are column names (the
/// same column for an instant such as `last_updated_ms`).
fn range_cmp(f: &mut Frag, low: &str, high: &str, cmp: Cmp, qlo: i64, qhi: i64) {
    match cmp {
        Cmp::Eq => {
            f.arg(&format!("({low} >= "), qlo);
            f.arg(&format!(" AND {high} <= "), qhi);
            f.push(")");
        }
        Cmp::Ne => {
            f.arg(&format!("NOT ({low} >= "), qlo);
            f.arg(&format!(" AND {high} <= "), qhi);
            f.push(")");
        }
        Cmp::Gt => f.arg(&format!("{high} > "), qhi),
        Cmp::Lt => f.arg(&format!("{low} < "), qlo),
        Cmp::Ge => f.arg(&format!("{high} >= "), qlo),
        Cmp::Le => f.arg(&format!("{low} <= "), qhi),
        Cmp::Sa => f.arg(&format!("{low} > "), qhi),
        Cmp::Eb => f.arg(&format!("{high} < "), qlo),
        Cmp::Ap => {
            f.arg(&format!("({low} <= "), qhi);
            f.arg(&format!(" AND {high} >= "), qlo);
            f.push(")");
        }
    }
}

/// ` = $n` or ` IN ($n, ...)`: the index rows a search on `param` reads (its own, and those of the
/// parameters `fhir::also_indexed_under` names).
fn param_is(f: &mut Frag, rtype: ResourceType, param: &str) {
    let also = fhir::also_indexed_under(rtype, param);
    if also.is_empty() {
        f.arg(" = ", param.to_string());
        return;
    }
    f.arg(" IN (", param.to_string());
    for other in also {
        f.arg(", ", other.to_string());
    }
    f.push(")");
}

/// `SELECT rid FROM idx_* WHERE ...` for an index-table predicate, appended to `f`; false for `Id` /
/// `LastUpdated`.
fn index_subquery(f: &mut Frag, rtype: ResourceType, param: &str, p: &Predicate) -> bool {
    let head = |f: &mut Frag, table: &str, param: &str| {
        f.arg(
            &format!("SELECT rid FROM {table} WHERE rtype = "),
            rtype.as_str(),
        );
        f.push(" AND param");
        param_is(f, rtype, param);
    };
    match p {
        Predicate::Id(_) | Predicate::LastUpdated { .. } => return false,
        Predicate::Token { system, code } => {
            head(f, "idx_token", param);
            if let Some(code) = code {
                f.arg(" AND code = ", code.clone());
            }
            if let Some(system) = system {
                f.arg(" AND system = ", system.clone());
            }
        }
        Predicate::String { value, exact } => {
            head(f, "idx_string", param);
            if let Some(exact) = exact {
                f.arg(" AND value = ", value.clone());
                f.arg(" AND exact = ", exact.clone());
            } else if !value.is_empty() {
                f.arg(" AND value >= ", value.clone());
                if let Some(upper) = fhir::string_prefix_upper_bound(value) {
                    f.arg(" AND value < ", upper);
                }
            }
        }
        Predicate::Date {
            cmp,
            low_ms,
            high_ms,
        } => {
            head(f, "idx_date", param);
            f.push(" AND ");
            range_cmp(f, "low_ms", "high_ms", *cmp, *low_ms, *high_ms);
        }
        Predicate::Reference(target) => match store::reference_rows(rtype, param, target) {
            Some(rows) => {
                head(f, "idx_reference", rows);
                f.arg(" AND target = ", target.clone());
            }
            None => f.push("SELECT rid FROM idx_reference WHERE false"),
        },
    }
    true
}

fn predicate_has_nul(p: &Predicate) -> bool {
    let nul = |s: &str| s.contains('\0');
    match p {
        Predicate::Id(s) | Predicate::Reference(s) => nul(s),
        Predicate::String { value, exact } => nul(value) || exact.as_deref().is_some_and(nul),
        Predicate::Token { system, code } => {
            system.as_deref().is_some_and(nul) || code.as_deref().is_some_and(nul)
        }
        Predicate::LastUpdated { .. } | Predicate::Date { .. } => false,
    }
}

/// One clause: its alternatives ORed. Index-table alternatives share one `r.rid IN (... UNION ALL ...)`.
fn clause_sql(f: &mut Frag, rtype: ResourceType, clause: &Clause) {
    let mut terms = 0;
    f.push("(");
    let mut subs: Vec<&Predicate> = Vec::new();
    for p in &clause.any_of {
        match p {
            Predicate::Id(id) => {
                if terms > 0 {
                    f.push(" OR ");
                }
                f.arg("r.id = ", id.clone());
                terms += 1;
            }
            Predicate::LastUpdated {
                cmp,
                low_ms,
                high_ms,
            } => {
                if terms > 0 {
                    f.push(" OR ");
                }
                range_cmp(
                    f,
                    "r.last_updated_ms",
                    "r.last_updated_ms",
                    *cmp,
                    *low_ms,
                    *high_ms,
                );
                terms += 1;
            }
            other => subs.push(other),
        }
    }
    if !subs.is_empty() {
        if terms > 0 {
            f.push(" OR ");
        }
        f.push("r.rid IN (");
        for (i, p) in subs.into_iter().enumerate() {
            if i > 0 {
                f.push(" UNION ALL ");
            }
            index_subquery(f, rtype, &clause.param, p);
        }
        f.push(")");
        terms += 1;
    }
    if terms == 0 {
        f.push("FALSE"); // no alternatives: nothing matches
    }
    f.push(")");
}

/// A date parameter whose range clauses a search reads as one range over a single index row.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Combined<'q> {
    param: &'q str,
    /// Also bound the row's start from below (`store::instant_start_floor`).
    bounded: bool,
}

/// The parameters of `q` whose range clauses can be read as one range: a date parameter that FHIR allows
/// once per resource (`fhir::single_valued`, such as `Slot.start`) with two or more clauses, each a single
/// date comparison, and never stored with several values (`store::MULTI_VALUED`). For an instant parameter
/// never stored wider than an instant (`store::WIDE`), the range is also bounded from below.
///
/// Why: PostgreSQL estimates each clause's selectivity on its own. `start=ge{day}` and `start=lt{next day}`
/// each match a large share of a schedule's slots, so their product looked large, and the planner walked
/// every slot of the type in id order and tested each (119 ms for one day of a schedule of 50,000 slots).
/// As one range over `idx_date_lookup`, the estimate is the day's rows and the plan starts from them (1.2 ms).
///
/// The kv lookup and the search are separate statements: a put committed between them that first gives a
/// parameter several rows may be missed by this one search, as if the search had run just before it.
async fn combined_ranges<'q>(c: &Conn, q: &'q SearchQuery) -> Result<Vec<Combined<'q>>> {
    let mut out = Vec::new();
    for (i, clause) in q.clauses.iter().enumerate() {
        if q.clauses[..i].iter().any(|c| c.param == clause.param)
            || !fhir::single_valued(q.rtype, &clause.param)
        {
            continue;
        }
        let mut same = q.clauses.iter().filter(|c| c.param == clause.param);
        if same.clone().count() < 2
            || !same.all(|c| matches!(c.any_of.as_slice(), [Predicate::Date { .. }]))
        {
            continue;
        }
        let Some(bounded) = regular_bound(c, q.rtype, &clause.param).await? else {
            continue;
        };
        out.push(Combined {
            param: &clause.param,
            bounded,
        });
    }
    Ok(out)
}

/// For a single-valued date parameter: `None` when it was ever stored with several values for one resource
/// (listed under `store::MULTI_VALUED`), else whether its rows' start may be bounded from below (an
/// `fhir::instant_param` not listed under `store::WIDE`).
async fn regular_bound(c: &Conn, rtype: ResourceType, param: &str) -> Result<Option<bool>> {
    let key = format!("{rtype} {param}");
    let rows = c
        .query(
            "SELECT namespace FROM kv WHERE namespace IN ($1, $2) AND key = $3",
            &[&MULTI_VALUED, &WIDE, &key],
        )
        .await?;
    let mut listed = Vec::with_capacity(rows.len());
    for row in &rows {
        listed.push(get::<String>(row, 0)?);
    }
    if listed.iter().any(|n| n == MULTI_VALUED) {
        return Ok(None);
    }
    Ok(Some(
        fhir::instant_param(rtype, param) && !listed.iter().any(|n| n == WIDE),
    ))
}

/// A search sorted by one single-valued date parameter only, read through that parameter's index row
/// joined as `s`: its range clauses test `s`, and the page is `ORDER BY s.low_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SortRow<'q> {
    param: &'q str,
    /// Also bound `s.low_ms` from below (`store::instant_start_floor`).
    bounded: bool,
    descending: bool,
}

/// The [`SortRow`] of `q`, when its only sort key is a single-valued date parameter never stored with
/// several values (so each resource has at most one row of it, and `MIN(low_ms)` is that row's `low_ms`).
///
/// Why: the general statement sorts by a per-resource `MIN` subquery, so every match is found and its key
/// computed before the first row of the page: the next ten free slots of a schedule of 50,000 took about
/// 320 ms. Joined, PostgreSQL can read `idx_date_lookup` in `low_ms` order from the range's start and stop
/// once the page is full. Resources without the parameter sort after all others and are not in the join,
/// so only a full page is the answer; a short one is asked again of the general statement.
///
/// `combined` (this search's [`combined_ranges`]) already says for its parameters what kv lists, so the
/// lookup is not made twice.
async fn sort_row<'q>(
    c: &Conn,
    q: &'q SearchQuery,
    combined: &[Combined<'q>],
) -> Result<Option<SortRow<'q>>> {
    let Some((param, descending)) = store::single_date_sort(q) else {
        return Ok(None);
    };
    let bounded = match combined.iter().find(|m| m.param == param) {
        Some(m) => Some(m.bounded),
        None => regular_bound(c, q.rtype, param).await?,
    };
    Ok(bounded.map(|bounded| SortRow {
        param,
        bounded,
        descending,
    }))
}

/// `r.rid IN (SELECT rid FROM idx_date WHERE ...)`: the rows of `combined.param` that satisfy every one of
/// its range clauses at once.
fn combined_sql(f: &mut Frag, q: &SearchQuery, combined: &Combined<'_>) {
    f.push("r.rid IN (");
    let mut first = true;
    for clause in q.clauses.iter().filter(|c| c.param == combined.param) {
        let [
            p @ Predicate::Date {
                cmp,
                low_ms,
                high_ms,
            },
        ] = clause.any_of.as_slice()
        else {
            continue;
        };
        if first {
            index_subquery(f, q.rtype, combined.param, p);
            first = false;
        } else {
            f.push(" AND ");
            range_cmp(f, "low_ms", "high_ms", *cmp, *low_ms, *high_ms);
        }
        if let Some(t) =
            store::instant_start_floor(*cmp, *low_ms, *high_ms).filter(|_| combined.bounded)
        {
            f.arg(" AND low_ms >= ", t);
        }
    }
    f.push(")");
}

/// `FROM resources r WHERE ...` of a search (live resources of the type matching every clause); the range
/// clauses of each parameter of `combined` as one. With `sort`, its parameter's index row is joined as `s`
/// and its single-comparison clauses test that row.
fn from_where(
    f: &mut Frag,
    q: &SearchQuery,
    combined: &[Combined<'_>],
    sort: Option<&SortRow<'_>>,
) {
    if let Some(sort) = sort {
        f.push(" FROM resources r JOIN idx_date s ON s.rid = r.rid");
        f.arg(" WHERE s.rtype = ", q.rtype.as_str());
        f.push(" AND s.param");
        param_is(f, q.rtype, sort.param);
        f.arg(" AND r.rtype = ", q.rtype.as_str());
    } else {
        f.arg(" FROM resources r WHERE r.rtype = ", q.rtype.as_str());
    }
    f.push(" AND NOT r.deleted");
    for (i, clause) in q.clauses.iter().enumerate() {
        if let (
            Some(sort),
            [
                Predicate::Date {
                    cmp,
                    low_ms,
                    high_ms,
                },
            ],
        ) = (sort, clause.any_of.as_slice())
            && sort.param == clause.param
        {
            f.push(" AND ");
            range_cmp(f, "s.low_ms", "s.high_ms", *cmp, *low_ms, *high_ms);
            if let Some(t) =
                store::instant_start_floor(*cmp, *low_ms, *high_ms).filter(|_| sort.bounded)
            {
                f.arg(" AND s.low_ms >= ", t);
            }
            continue;
        }
        if let Some(cmb) = combined.iter().find(|m| m.param == clause.param) {
            if !q.clauses[..i].iter().any(|c| c.param == clause.param) {
                f.push(" AND ");
                combined_sql(f, q, cmb);
            }
            continue;
        }
        f.push(" AND ");
        clause_sql(f, q.rtype, clause);
    }
}

/// `ORDER BY` of a search. A parameter sorts by its smallest indexed value; PostgreSQL's COALESCE cannot mix
/// text and numbers, so each index table gives its own key (a parameter has values in one table only).
fn order_by(f: &mut Frag, q: &SearchQuery) {
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
                // The parameter's kind says which index table holds its values: one subquery, not four.
                let kind = fhir::search_param(q.rtype, name).map(|p| p.kind);
                let table = match kind {
                    Some(fhir::ParamKind::String) => Some(0),
                    Some(fhir::ParamKind::Date) => Some(1),
                    Some(fhir::ParamKind::Token) => Some(2),
                    Some(fhir::ParamKind::Reference) => Some(3),
                    None => None,
                };
                let keys = [
                    "(SELECT MIN(s.value) FROM idx_string s WHERE s.rid = r.rid AND s.param",
                    "(SELECT MIN(d.low_ms) FROM idx_date d WHERE d.rid = r.rid AND d.param",
                    "(SELECT MIN(t.code) FROM idx_token t WHERE t.rid = r.rid AND t.param",
                    "(SELECT MIN(x.target) FROM idx_reference x WHERE x.rid = r.rid AND x.param",
                ];
                let mut first = true;
                for (i, key) in keys.iter().enumerate() {
                    if table.is_some_and(|t| t != i) {
                        continue;
                    }
                    if !first {
                        f.push(", ");
                    }
                    first = false;
                    f.push(key);
                    param_is(f, q.rtype, name);
                    f.push(")");
                    f.push(dir);
                    f.push(" NULLS LAST");
                }
            }
        }
        f.push(", ");
    }
    f.push("r.id ASC");
}

/// Whether a value of the query holds a NUL character (which PostgreSQL's text cannot; [`search`] refuses
/// such a query without sending it).
pub(crate) fn has_nul(q: &SearchQuery) -> bool {
    q.clauses
        .iter()
        .any(|cl| cl.param.contains('\0') || cl.any_of.iter().any(predicate_has_nul))
}

/// Search on any connection. `want_total` is honoured only when `with_total` (outside transactions).
pub(crate) async fn search(c: &Conn, q: &SearchQuery, with_total: bool) -> Result<SearchResult> {
    if has_nul(q) {
        return Err(StoreError::Invalid(
            "a search value contains a NUL character".into(),
        ));
    }
    let combined = combined_ranges(c, q).await?;
    let total = if with_total && q.want_total {
        let mut f = Frag::default();
        f.push("SELECT COUNT(*)");
        from_where(&mut f, q, &combined, None);
        let rows = f.query(c, plan_per_values(q)).await?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::Backend("COUNT(*) returned no row".into()))?;
        Some(to_u64(get(row, 0)?))
    } else {
        None
    };
    if q.count == 0 {
        return Ok(SearchResult {
            resources: Vec::new(),
            total,
        });
    }
    // The JSON is a subquery of the select list: PostgreSQL evaluates such costly columns after the sort and
    // limit, so only the page's rows are fetched from `versions`.
    const COLUMNS: &str = "SELECT r.id, r.version, r.last_updated_ms, \
         (SELECT v.json FROM versions v WHERE v.rid = r.rid AND v.version = r.version)";
    if let Some(sort) = sort_row(c, q, &combined).await? {
        let mut f = Frag::default();
        f.push(COLUMNS);
        from_where(&mut f, q, &combined, Some(&sort));
        f.push(if sort.descending {
            " ORDER BY s.low_ms DESC, r.id ASC"
        } else {
            " ORDER BY s.low_ms ASC, r.id ASC"
        });
        f.arg(" LIMIT ", usize_i64(q.count));
        f.arg(" OFFSET ", usize_i64(q.offset));
        let rows = f.query(c, true).await?;
        if rows.len() == q.count {
            return Ok(SearchResult {
                resources: page_of(q.rtype, &rows)?,
                total,
            });
        }
    }
    let mut f = Frag::default();
    f.push(COLUMNS);
    from_where(&mut f, q, &combined, None);
    order_by(&mut f, q);
    f.arg(" LIMIT ", usize_i64(q.count));
    f.arg(" OFFSET ", usize_i64(q.offset));
    let rows = f.query(c, plan_per_values(q)).await?;
    Ok(SearchResult {
        resources: page_of(q.rtype, &rows)?,
        total,
    })
}

/// The resources of a page's rows (id, version, last_updated_ms, json).
fn page_of(rtype: ResourceType, rows: &[Row]) -> Result<Vec<Stored>> {
    let mut resources = Vec::with_capacity(rows.len());
    for row in rows {
        resources.push(Stored {
            rtype,
            id: get(row, 0)?,
            version: to_u64(get(row, 1)?),
            last_updated_ms: get(row, 2)?,
            deleted: false,
            json: get::<Option<String>>(row, 3)?.unwrap_or_default(),
        });
    }
    Ok(resources)
}

pub(crate) async fn history(c: &Conn, q: &HistoryQuery) -> Result<SearchResult> {
    let since = q.since_ms.unwrap_or(i64::MIN);
    let rtype = q.rtype.as_str();
    let (count, page) = match &q.id {
        Some(id) => {
            no_nul("id", id)?;
            let count = c
                .query_one(
                    "SELECT COUNT(*) FROM resources r JOIN versions v ON v.rid = r.rid
                     WHERE r.rtype = $1 AND r.id = $2 AND v.last_updated_ms >= $3",
                    &[&rtype, id, &since],
                )
                .await?;
            let page = if q.count == 0 {
                Vec::new()
            } else {
                c.query(
                    "SELECT r.rtype, r.id, v.version, v.last_updated_ms, v.deleted, v.json
                     FROM resources r JOIN versions v ON v.rid = r.rid
                     WHERE r.rtype = $1 AND r.id = $2 AND v.last_updated_ms >= $3
                     ORDER BY v.last_updated_ms DESC, v.version DESC LIMIT $4 OFFSET $5",
                    &[
                        &rtype,
                        id,
                        &since,
                        &usize_i64(q.count),
                        &usize_i64(q.offset),
                    ],
                )
                .await?
            };
            (count, page)
        }
        None => {
            let count = c
                .query_one(
                    "SELECT COUNT(*) FROM versions v WHERE v.rtype = $1 AND v.last_updated_ms >= $2",
                    &[&rtype, &since],
                )
                .await?;
            let page = if q.count == 0 {
                Vec::new()
            } else {
                c.query(
                    "SELECT r.rtype, r.id, v.version, v.last_updated_ms, v.deleted, v.json
                     FROM versions v JOIN resources r ON r.rid = v.rid
                     WHERE v.rtype = $1 AND v.last_updated_ms >= $2
                     ORDER BY v.last_updated_ms DESC, v.vid DESC LIMIT $3 OFFSET $4",
                    &[&rtype, &since, &usize_i64(q.count), &usize_i64(q.offset)],
                )
                .await?
            };
            (count, page)
        }
    };
    let total: i64 = get(&count, 0)?;
    let resources = page
        .iter()
        .map(stored_from_row)
        .collect::<Result<Vec<_>>>()?;
    Ok(SearchResult {
        resources,
        total: Some(to_u64(total)),
    })
}

pub(crate) async fn events_after(c: &Conn, after: i64, limit: usize) -> Result<Vec<Event>> {
    let rows = c
        .query(
            "SELECT seq, subject, subject_seq, kind, rtype, id, version, time_ms, data
             FROM outbox WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&after, &usize_i64(limit)],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let seq: i64 = get(r, 0)?;
            let data: &str = get(r, 8)?;
            Ok(Event {
                seq,
                subject: get(r, 1)?,
                subject_seq: get(r, 2)?,
                kind: get(r, 3)?,
                rtype: rtype_of(r, 4)?,
                id: get(r, 5)?,
                version: to_u64(get(r, 6)?),
                time_ms: get(r, 7)?,
                data: serde_json::from_str(data).map_err(|err| {
                    StoreError::Backend(format!("outbox event {seq}: bad data: {err}"))
                })?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Slot?schedule=..&start=ge..&start=lt..` with `start` combined reads `idx_date` once, bounded from
    /// below when asked; not combined, once per clause.
    #[test]
    fn combined_range_clauses_read_the_date_index_once() {
        let day = |cmp: Cmp, ms: i64| Predicate::Date {
            cmp,
            low_ms: ms,
            high_ms: ms,
        };
        let q = SearchQuery::new(ResourceType::Slot)
            .with("schedule", Predicate::Reference("Schedule/a".into()))
            .with("start", day(Cmp::Ge, 86_400_000))
            .with("start", day(Cmp::Lt, 2 * 86_400_000));
        let sql = |combined: &[Combined<'_>]| {
            let mut f = Frag::default();
            from_where(&mut f, &q, combined, None);
            (
                f.sql.matches("FROM idx_date").count(),
                f.sql.contains("low_ms >= "),
                f.args.len(),
            )
        };
        let bounded = Combined {
            param: "start",
            bounded: true,
        };
        let unbounded = Combined {
            param: "start",
            bounded: false,
        };
        // rtype; schedule: rtype, param, target; start: rtype, param, two comparisons (+ the floor).
        assert_eq!(sql(&[bounded]), (1, true, 9));
        assert_eq!(sql(&[unbounded]), (1, false, 8));
        assert_eq!(sql(&[]), (2, false, 10));
    }
}
