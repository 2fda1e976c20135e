//! Writes held back until the batch commits: the resource rows, versions, search-index rows, subjects and
//! outbox events of the jobs of a batch, written together by one fixed-shape statement per table, pipelined
//! ([`flush`]), instead of one statement (or several) per write.
//!
//! Why: on PostgreSQL the cost of a write is dominated by per-statement work in the server (executor set-up
//! of every table and index a statement touches, planning, a round trip), not by the rows. Measured with
//! 32 concurrent writers, a put + event cost three statements touching twelve tables; held back, the rows
//! of a whole batch go in a few statements sent together (one round trip). A flush inside a batch writes
//! only what is not in the database yet: before that, each search of a batch of creates rewrote every
//! state of the batch so far (measured: Patient creates through the API went from ~150/s to ~800/s).
//!
//! Each job keeps its own [`JobBuf`]. A job's reads see what earlier jobs of the batch (and the job itself)
//! wrote through the overlay (`lookup`); a search inside a transaction first flushes everything held back,
//! since it reads the index tables. A failed job's buffer is simply dropped; if rows of it had already been
//! flushed (or it changed other tables directly), the writer rolls back and marks the kept buffers unwritten
//! (see [`Written`]), so the next flush writes them again.
//! Values are explicit in the buffers (rid, version, seq, subject_seq, instants), so writing them again
//! gives the same rows.

use std::collections::{BTreeMap, HashMap};

use store::{
    IndexEntry, IndexValue, Predicate, ResourceType, Result, SearchQuery, StoreError, Stored,
};

use tokio_postgres::Statement;
use tokio_postgres::types::ToSql;

use crate::conn::{Conn, Params, db};

/// The current state of a resource as written by a job of the batch.
#[derive(Clone)]
pub(crate) struct Current {
    pub(crate) rid: i64,
    pub(crate) stored: Stored,
}

/// One version row.
struct VersionRow {
    rid: i64,
    rtype: ResourceType,
    version: i64,
    last_updated_ms: i64,
    deleted: bool,
    json: String,
}

/// One outbox row.
pub(crate) struct EventRow {
    pub(crate) seq: i64,
    pub(crate) subject: String,
    pub(crate) subject_seq: i64,
    pub(crate) kind: String,
    pub(crate) rtype: ResourceType,
    pub(crate) id: String,
    pub(crate) version: i64,
    pub(crate) time_ms: i64,
    pub(crate) data: String,
}

/// What one job wrote to the held-back tables.
#[derive(Default)]
pub(crate) struct JobBuf {
    /// Latest state per resource (the overlay for reads and for the next version number).
    resources: HashMap<(ResourceType, String), Current>,
    versions: Vec<VersionRow>,
    /// Index rows per rid, replacing the previous ones (empty for a tombstone).
    index: Vec<(i64, ResourceType, Vec<IndexEntry>)>,
    /// Latest `last_seq` per subject.
    subjects: HashMap<String, i64>,
    events: Vec<EventRow>,
    /// How much of this buffer is in the database.
    pub(crate) written: Written,
}

/// What the writer read from the database during one batch (not rows to write), so that reading a
/// resource, putting it and appending its event cost one round trip, and a resource read by several jobs
/// of a batch (a schedule, a patient) is read once.
///
/// Valid for the whole batch: the write lock keeps other processes out, and inside the batch resources
/// and subjects change only through buffers, which are looked at first. A row of a buffer that was
/// flushed and then dropped (its job failed) was removed by the rollback that dropped it, so what the
/// database returns for a key no buffer holds is always its state from before the batch.
#[derive(Default)]
pub(crate) struct Seen {
    /// Per resource: its rid (a fresh one from the identity sequence when never stored) and its current
    /// version (`None` when never stored).
    pub(crate) resources: HashMap<(ResourceType, String), (i64, Option<Stored>)>,
    /// Per subject: its `last_seq` (0 when it has no event yet).
    pub(crate) subjects: HashMap<String, i64>,
    /// Searches the jobs said they will run ([`store::ReadAhead::searches`]), answered at the batch's start
    /// (see [`answerable_ahead`] and [`JobBuf::may_change`] for when such an answer may be used).
    pub(crate) searches: Vec<(SearchQuery, Vec<Stored>)>,
}

/// Whether a search may be answered from what was read at the batch's start: only searches whose every
/// predicate is a token of the resource's own parameters (the kind [`JobBuf::may_change`] can reason about;
/// no chained or reverse-chained parameter), from their first result.
pub(crate) fn answerable_ahead(query: &SearchQuery) -> bool {
    query.offset == 0
        && !query.want_total
        && query.clauses.iter().all(|c| {
            !c.param.contains(['.', ':'])
                && c.any_of
                    .iter()
                    .all(|p| matches!(p, Predicate::Token { .. }))
        })
}

/// Whether a resource with index rows `entries` could match `query` (token predicates only; see
/// [`answerable_ahead`]). It errs towards yes: codes are compared without regard to case, and systems are
/// not compared at all.
fn could_match(query: &SearchQuery, entries: &[IndexEntry]) -> bool {
    query.clauses.iter().all(|clause| {
        clause.any_of.iter().any(|p| match p {
            Predicate::Token { code, .. } => entries.iter().any(|e| {
                e.param == clause.param
                    && match &e.value {
                        IndexValue::Token { code: c, .. } => code
                            .as_deref()
                            .is_none_or(|want| c.eq_ignore_ascii_case(want)),
                        _ => false,
                    }
            }),
            _ => true,
        })
    })
}

/// How much of a [`JobBuf`] has been flushed: versions and events are appended rows (written once, from
/// these positions on); resources, index rows and subjects are final states (written again, idempotently,
/// by a flush when this buffer's or an earlier buffer's states are not in the database, which keeps "later
/// jobs win" across buffers). After a rollback the writer sets this back (to the default: nothing written,
/// or to what it was when a savepoint was taken).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Written {
    versions: usize,
    events: usize,
    /// The final states are in the database.
    states: bool,
}

impl JobBuf {
    /// Resource versions this buffer writes.
    pub(crate) fn version_count(&self) -> usize {
        self.versions.len()
    }

    /// True when something of this buffer is not in the database.
    pub(crate) fn unwritten(&self) -> bool {
        (self.has_states() && !self.written.states)
            || self.written.versions < self.versions.len()
            || self.written.events < self.events.len()
    }

    /// True when rows of resources of type `rtype` (resource, version or index rows) are not in the
    /// database. A search reads only rows of its own type (every table it reads is filtered by type, or
    /// joined by rid to a resource of that type), so other held-back rows need not be written before it.
    pub(crate) fn unwritten_of(&self, rtype: ResourceType) -> bool {
        self.versions[self.written.versions..]
            .iter()
            .any(|v| v.rtype == rtype)
            || (!self.written.states
                && (self.resources.keys().any(|(t, _)| *t == rtype)
                    || self.index.iter().any(|(_, t, _)| *t == rtype)))
    }

    /// Whether what this buffer wrote could make `found`, the result of `query` read at the batch's start,
    /// wrong now: it wrote a resource of that result ([`JobBuf::wrote_any`]), or a version that could match
    /// ([`JobBuf::may_match`]). Never says no wrongly; may say yes when the result would in fact be the same.
    pub(crate) fn may_change(&self, query: &SearchQuery, found: &[Stored]) -> bool {
        self.may_match(query) || self.wrote_any(query.rtype, found)
    }

    /// Whether a version this buffer wrote (of any resource of the query's type) could match `query`.
    pub(crate) fn may_match(&self, query: &SearchQuery) -> bool {
        self.index
            .iter()
            .any(|(_, t, entries)| *t == query.rtype && could_match(query, entries))
    }

    /// Whether this buffer wrote one of the `rtype` resources `found`.
    pub(crate) fn wrote_any(&self, rtype: ResourceType, found: &[Stored]) -> bool {
        self.resources
            .keys()
            .any(|(t, id)| *t == rtype && found.iter().any(|s| s.id == *id))
    }

    /// True when the buffer holds final states (resources, index rows, subjects).
    fn has_states(&self) -> bool {
        !self.resources.is_empty() || !self.subjects.is_empty()
    }

    /// A new version (or tombstone) of a resource.
    pub(crate) fn put(&mut self, rid: i64, stored: Stored, index: Vec<IndexEntry>) {
        self.versions.push(VersionRow {
            rid,
            rtype: stored.rtype,
            version: i64::try_from(stored.version).unwrap_or(i64::MAX),
            last_updated_ms: stored.last_updated_ms,
            deleted: stored.deleted,
            json: stored.json.clone(),
        });
        self.index.push((rid, stored.rtype, index));
        self.resources
            .insert((stored.rtype, stored.id.clone()), Current { rid, stored });
        self.written.states = false;
    }

    pub(crate) fn event(&mut self, row: EventRow) {
        self.subjects.insert(row.subject.clone(), row.subject_seq);
        self.events.push(row);
        self.written.states = false;
    }
}

/// The latest state of a resource written in the batch: the job's own buffer first, then earlier jobs'.
pub(crate) fn lookup<'a>(
    own: &'a JobBuf,
    kept: &'a [JobBuf],
    rtype: ResourceType,
    id: &str,
) -> Option<&'a Current> {
    let key = (rtype, id.to_string());
    std::iter::once(own)
        .chain(kept.iter().rev())
        .find_map(|b| b.resources.get(&key))
}

/// The latest `last_seq` of a subject written in the batch.
pub(crate) fn subject_seq(own: &JobBuf, kept: &[JobBuf], subject: &str) -> Option<i64> {
    std::iter::once(own)
        .chain(kept.iter().rev())
        .find_map(|b| b.subjects.get(subject).copied())
}

/// The held-back rows go in with one fixed-shape statement per table (rows as arrays through `unnest`),
/// so each is prepared and planned once per connection whatever the row count. A flush sends only the
/// statements that have rows, all at once (pipelined on the connection): about one round trip.
const INSERT_RESOURCES: &str = "
INSERT INTO resources (rid, rtype, id, version, last_updated_ms, deleted)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::boolean[])
ON CONFLICT (rid) DO UPDATE
    SET version = EXCLUDED.version, last_updated_ms = EXCLUDED.last_updated_ms, deleted = EXCLUDED.deleted";
const INSERT_VERSIONS: &str = "
INSERT INTO versions (rid, rtype, version, last_updated_ms, deleted, json)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::boolean[], $6::text[])";
/// Make the index rows of the rids in `$1` exactly the rows given (deduplicated), touching only what
/// changed: a row of those rids that is not given is deleted, a given row that is not there is inserted,
/// and a row that stays (most of an update's: a Slot that becomes busy changes one token of several) is
/// neither deleted nor written again, so it costs an index probe instead of a dead heap tuple, a new one,
/// two index entries and their WAL. Every part runs on the statement's snapshot: the DELETE never sees the
/// rows the INSERT adds, and the INSERT sees the rows the DELETE keeps. The INSERT compares with `old`,
/// the rows of those rids read through the rid index, never with the whole table: a generic plan made
/// while the table was empty hashes what it compares with, and hashing the table made every flush read
/// all of it (Patient creates fell from 1,431/s to 404/s). The DELETE reads those rows again by rid rather
/// than by the row ids `old` holds: a delete by row id was planned as a sequential scan of a table that was
/// empty at planning time. The given rows' text is compared in the columns' collation ("C").
///
/// `replace_rows!(table, [text column, ...], [other column, ...], "unnest arguments")` is that statement for
/// `table`, whose columns are its text columns (compared in "C") and then the others, ending with `rid`; the
/// rows are given as `$2...` in that order, and `$1` holds the rids.
macro_rules! replace_rows {
    ($table:literal, [$($text:literal),+], [$first:literal $(, $other:literal)*], $arrays:literal) => {
        concat!(
            "WITH n AS (SELECT ", $($text, " COLLATE \"C\" AS ", $text, ", ",)+ $first $(, ", ", $other)*,
            " FROM unnest(", $arrays, ") AS n(", $($text, ", ",)+ $first $(, ", ", $other)*, ")), ",
            "old AS MATERIALIZED (SELECT ", $($text, ", ",)+ $first $(, ", ", $other)*, " FROM ", $table,
            " WHERE rid = ANY($1::bigint[])), ",
            "d AS (DELETE FROM ", $table, " t WHERE t.rid = ANY($1::bigint[]) AND NOT EXISTS (",
            "SELECT 1 FROM n WHERE ", $("n.", $text, " = t.", $text, " AND ",)+ "n.", $first, " = t.", $first
            $(, " AND n.", $other, " = t.", $other)*, ")) ",
            "INSERT INTO ", $table, " (", $($text, ", ",)+ $first $(, ", ", $other)*, ") ",
            "SELECT * FROM n WHERE NOT EXISTS (SELECT 1 FROM old t WHERE ",
            $("t.", $text, " = n.", $text, " AND ",)+ "t.", $first, " = n.", $first
            $(, " AND t.", $other, " = n.", $other)*, ")"
        )
    };
}
const REPLACE_TOKENS: &str = replace_rows!(
    "idx_token",
    ["rtype", "param", "code", "system"],
    ["rid"],
    "$2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[]"
);
const REPLACE_STRINGS: &str = replace_rows!(
    "idx_string",
    ["rtype", "param", "value", "exact"],
    ["rid"],
    "$2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[]"
);
const REPLACE_DATES: &str = replace_rows!(
    "idx_date",
    ["rtype", "param"],
    ["low_ms", "high_ms", "rid"],
    "$2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[]"
);
const REPLACE_REFERENCES: &str = replace_rows!(
    "idx_reference",
    ["rtype", "param", "target"],
    ["rid"],
    "$2::text[], $3::text[], $4::text[], $5::bigint[]"
);
/// Index rows of resources created in the flush (their first version is in it): nothing of theirs can be
/// in the table yet, so there is nothing to compare with or delete.
const INSERT_TOKENS: &str = "
INSERT INTO idx_token (rtype, param, code, system, rid)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])";
const INSERT_STRINGS: &str = "
INSERT INTO idx_string (rtype, param, value, exact, rid)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])";
const INSERT_DATES: &str = "
INSERT INTO idx_date (rtype, param, low_ms, high_ms, rid)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[])";
const INSERT_REFERENCES: &str = "
INSERT INTO idx_reference (rtype, param, target, rid)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])";
const UPSERT_SUBJECTS: &str = "
INSERT INTO subjects (subject, last_seq)
SELECT * FROM unnest($1::text[], $2::bigint[])
ON CONFLICT (subject) DO UPDATE SET last_seq = EXCLUDED.last_seq";
const INSERT_EVENTS: &str = "
INSERT INTO outbox (seq, subject, subject_seq, kind, rtype, id, version, time_ms, data)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                     $7::bigint[], $8::bigint[], $9::text[])";

/// The irregular date parameters a batch's index rows show (`store::irregular_dates`), listed in kv with
/// those rows. Listings are never removed, so writing one again changes nothing.
const LIST_IRREGULAR: &str = "
INSERT INTO kv (namespace, key, value)
SELECT n, k, '' FROM unnest($1::text[], $2::text[]) AS l(n, k)
ON CONFLICT (namespace, key) DO NOTHING";

/// Every statement a flush may send, prepared before any is sent (so that they go out in this order).
const FLUSH_STATEMENTS: [&str; 13] = [
    INSERT_RESOURCES,
    INSERT_VERSIONS,
    REPLACE_TOKENS,
    REPLACE_STRINGS,
    REPLACE_DATES,
    REPLACE_REFERENCES,
    INSERT_TOKENS,
    INSERT_STRINGS,
    INSERT_DATES,
    INSERT_REFERENCES,
    UPSERT_SUBJECTS,
    INSERT_EVENTS,
    LIST_IRREGULAR,
];

/// The prepared statements of a flush, in [`FLUSH_STATEMENTS`] order.
pub(crate) struct FlushStatements([Statement; 13]);

/// Prepare every statement a flush may send (from the connection's cache once done). Given them, a
/// [`flush`] future sends all its statements on its first poll, without waiting for anything, so a
/// statement polled after it (pipelined with `join!`) reaches the server after them and sees their rows.
pub(crate) async fn prepare(c: &Conn) -> Result<FlushStatements> {
    let mut prepared = Vec::with_capacity(FLUSH_STATEMENTS.len());
    for sql in FLUSH_STATEMENTS {
        prepared.push(c.statement(sql).await?);
    }
    prepared
        .try_into()
        .map(FlushStatements)
        .map_err(|_| StoreError::Backend("flush statements missing".into()))
}

/// Run `statement` when `rows` is true; else nothing.
async fn exec_if(c: &Conn, rows: bool, statement: &Statement, params: &Params<'_>) -> Result<()> {
    if rows {
        c.client.execute(statement, params).await.map_err(db)?;
    }
    Ok(())
}

/// Write what of `bufs` (in job order) is not in the database yet: new versions and events, and the final
/// state of every resource, index and subject (later jobs win). Returns whether anything was written.
pub(crate) async fn flush(
    c: &Conn,
    statements: &FlushStatements,
    bufs: &mut [&mut JobBuf],
) -> Result<bool> {
    if !bufs.iter().any(|b| b.unwritten()) {
        return Ok(false);
    }
    // Final state per rid (resources, index rows) and per subject; every version and event.
    let mut resources: BTreeMap<i64, (ResourceType, &str, i64, i64, bool)> = BTreeMap::new();
    let mut index: BTreeMap<i64, (ResourceType, &[IndexEntry])> = BTreeMap::new();
    let mut subjects: BTreeMap<&str, i64> = BTreeMap::new();
    let mut ver = VersionCols::default();
    let mut ev = EventCols::default();
    // Final states are rewritten from the first buffer whose states are not in the database on: the ones
    // before it are there already, and every later one is written again after it so that later jobs still
    // win. (Without this, each flush inside a batch rewrote every state of the batch so far.)
    let first_stale = bufs
        .iter()
        .position(|b| b.has_states() && !b.written.states)
        .unwrap_or(bufs.len());
    for (n, b) in bufs.iter().enumerate() {
        let states = n >= first_stale;
        for cur in b.resources.values().filter(|_| states) {
            let s = &cur.stored;
            let version = i64::try_from(s.version).unwrap_or(i64::MAX);
            match resources.get(&cur.rid) {
                Some(&(_, _, v, _, _)) if v > version => {}
                _ => {
                    resources.insert(
                        cur.rid,
                        (
                            s.rtype,
                            s.id.as_str(),
                            version,
                            s.last_updated_ms,
                            s.deleted,
                        ),
                    );
                }
            }
        }
        for v in &b.versions[b.written.versions..] {
            ver.rid.push(v.rid);
            ver.rtype.push(v.rtype.as_str());
            ver.version.push(v.version);
            ver.last_updated_ms.push(v.last_updated_ms);
            ver.deleted.push(v.deleted);
            ver.json.push(v.json.as_str());
        }
        for (rid, rtype, entries) in b.index.iter().filter(|_| states) {
            index.insert(*rid, (*rtype, entries.as_slice()));
        }
        for (subject, seq) in b.subjects.iter().filter(|_| states) {
            let e = subjects.entry(subject.as_str()).or_insert(*seq);
            *e = (*e).max(*seq);
        }
        for e in &b.events[b.written.events..] {
            ev.seq.push(e.seq);
            ev.subject.push(e.subject.as_str());
            ev.subject_seq.push(e.subject_seq);
            ev.kind.push(e.kind.as_str());
            ev.rtype.push(e.rtype.as_str());
            ev.id.push(e.id.as_str());
            ev.version.push(e.version);
            ev.time_ms.push(e.time_ms);
            ev.data.push(e.data.as_str());
        }
    }
    let mut res = ResourceCols::default();
    for (rid, (rtype, id, version, last_updated_ms, deleted)) in &resources {
        res.rid.push(*rid);
        res.rtype.push(rtype.as_str());
        res.id.push(id);
        res.version.push(*version);
        res.last_updated_ms.push(*last_updated_ms);
        res.deleted.push(*deleted);
    }
    // Resources created in this flush (their version 1 is in it) have no index rows in the table yet:
    // theirs are inserted plainly; the others' are diffed against what the table holds.
    let created: std::collections::HashSet<i64> = ver
        .rid
        .iter()
        .zip(&ver.version)
        .filter(|&(_, v)| *v == 1)
        .map(|(rid, _)| *rid)
        .collect();
    let mut idx = IndexCols::default();
    let mut new_idx = IndexCols::default();
    let touched: Vec<i64> = index
        .keys()
        .copied()
        .filter(|rid| !created.contains(rid))
        .collect();
    let (mut list_ns, mut list_key): (Vec<&str>, Vec<String>) = (Vec::new(), Vec::new());
    for (rid, (rtype, entries)) in &index {
        if created.contains(rid) {
            new_idx.add(*rid, *rtype, entries);
        } else {
            idx.add(*rid, *rtype, entries);
        }
        for (namespace, key) in store::irregular_dates(*rtype, entries) {
            list_ns.push(namespace);
            list_key.push(key);
        }
    }
    let (subj_name, subj_seq): (Vec<&str>, Vec<i64>) = subjects.into_iter().unzip();
    let [
        insert_resources,
        insert_versions,
        replace_tokens,
        replace_strings,
        replace_dates,
        replace_references,
        insert_tokens,
        insert_strings,
        insert_dates,
        insert_references,
        upsert_subjects,
        insert_events,
        list_irregular,
    ] = &statements.0;
    let idx_rows = !touched.is_empty();
    // Each future sends its request on its first poll, and `join!` polls them in order: the statements go
    // out together and the server runs them one after the other (different tables, so order is free).
    let p_insert_resources: [&(dyn ToSql + Sync); 6] = [
        &res.rid,
        &res.rtype,
        &res.id,
        &res.version,
        &res.last_updated_ms,
        &res.deleted,
    ];
    let p_insert_versions: [&(dyn ToSql + Sync); 6] = [
        &ver.rid,
        &ver.rtype,
        &ver.version,
        &ver.last_updated_ms,
        &ver.deleted,
        &ver.json,
    ];
    let p_replace_tokens: [&(dyn ToSql + Sync); 6] = [
        &touched,
        &idx.tok_rtype,
        &idx.tok_param,
        &idx.tok_code,
        &idx.tok_system,
        &idx.tok_rid,
    ];
    let p_replace_strings: [&(dyn ToSql + Sync); 6] = [
        &touched,
        &idx.str_rtype,
        &idx.str_param,
        &idx.str_value,
        &idx.str_exact,
        &idx.str_rid,
    ];
    let p_replace_dates: [&(dyn ToSql + Sync); 6] = [
        &touched,
        &idx.date_rtype,
        &idx.date_param,
        &idx.date_low,
        &idx.date_high,
        &idx.date_rid,
    ];
    let p_replace_references: [&(dyn ToSql + Sync); 5] = [
        &touched,
        &idx.ref_rtype,
        &idx.ref_param,
        &idx.ref_target,
        &idx.ref_rid,
    ];
    let p_insert_tokens: [&(dyn ToSql + Sync); 5] = [
        &new_idx.tok_rtype,
        &new_idx.tok_param,
        &new_idx.tok_code,
        &new_idx.tok_system,
        &new_idx.tok_rid,
    ];
    let p_insert_strings: [&(dyn ToSql + Sync); 5] = [
        &new_idx.str_rtype,
        &new_idx.str_param,
        &new_idx.str_value,
        &new_idx.str_exact,
        &new_idx.str_rid,
    ];
    let p_insert_dates: [&(dyn ToSql + Sync); 5] = [
        &new_idx.date_rtype,
        &new_idx.date_param,
        &new_idx.date_low,
        &new_idx.date_high,
        &new_idx.date_rid,
    ];
    let p_insert_references: [&(dyn ToSql + Sync); 4] = [
        &new_idx.ref_rtype,
        &new_idx.ref_param,
        &new_idx.ref_target,
        &new_idx.ref_rid,
    ];
    let p_upsert_subjects: [&(dyn ToSql + Sync); 2] = [&subj_name, &subj_seq];
    let p_insert_events: [&(dyn ToSql + Sync); 9] = [
        &ev.seq,
        &ev.subject,
        &ev.subject_seq,
        &ev.kind,
        &ev.rtype,
        &ev.id,
        &ev.version,
        &ev.time_ms,
        &ev.data,
    ];
    let p_list_irregular: [&(dyn ToSql + Sync); 2] = [&list_ns, &list_key];
    let results = tokio::join!(
        biased;
        exec_if(c, !res.rid.is_empty(), insert_resources, &p_insert_resources),
        exec_if(c, !ver.rid.is_empty(), insert_versions, &p_insert_versions),
        exec_if(c, idx_rows, replace_tokens, &p_replace_tokens),
        exec_if(c, idx_rows, replace_strings, &p_replace_strings),
        exec_if(c, idx_rows, replace_dates, &p_replace_dates),
        exec_if(c, idx_rows, replace_references, &p_replace_references),
        exec_if(c, !new_idx.tok_rid.is_empty(), insert_tokens, &p_insert_tokens),
        exec_if(c, !new_idx.str_rid.is_empty(), insert_strings, &p_insert_strings),
        exec_if(c, !new_idx.date_rid.is_empty(), insert_dates, &p_insert_dates),
        exec_if(c, !new_idx.ref_rid.is_empty(), insert_references, &p_insert_references),
        exec_if(c, !subj_name.is_empty(), upsert_subjects, &p_upsert_subjects),
        exec_if(c, !ev.seq.is_empty(), insert_events, &p_insert_events),
        exec_if(c, !list_ns.is_empty(), list_irregular, &p_list_irregular),
    );
    results.0?;
    results.1?;
    results.2?;
    results.3?;
    results.4?;
    results.5?;
    results.6?;
    results.7?;
    results.8?;
    results.9?;
    results.10?;
    results.11?;
    results.12?;
    for b in bufs.iter_mut() {
        b.written = Written {
            versions: b.versions.len(),
            events: b.events.len(),
            states: true,
        };
    }
    Ok(true)
}

#[derive(Default)]
struct ResourceCols<'a> {
    rid: Vec<i64>,
    rtype: Vec<&'a str>,
    id: Vec<&'a str>,
    version: Vec<i64>,
    last_updated_ms: Vec<i64>,
    deleted: Vec<bool>,
}

#[derive(Default)]
struct VersionCols<'a> {
    rid: Vec<i64>,
    rtype: Vec<&'a str>,
    version: Vec<i64>,
    last_updated_ms: Vec<i64>,
    deleted: Vec<bool>,
    json: Vec<&'a str>,
}

#[derive(Default)]
struct EventCols<'a> {
    seq: Vec<i64>,
    subject: Vec<&'a str>,
    subject_seq: Vec<i64>,
    kind: Vec<&'a str>,
    rtype: Vec<&'a str>,
    id: Vec<&'a str>,
    version: Vec<i64>,
    time_ms: Vec<i64>,
    data: Vec<&'a str>,
}

/// Index rows as columns, deduplicated per rid (the tables have no unique keys).
#[derive(Default)]
struct IndexCols<'a> {
    tok_rtype: Vec<&'a str>,
    tok_param: Vec<&'a str>,
    tok_code: Vec<&'a str>,
    tok_system: Vec<&'a str>,
    tok_rid: Vec<i64>,
    str_rtype: Vec<&'a str>,
    str_param: Vec<&'a str>,
    str_value: Vec<&'a str>,
    str_exact: Vec<&'a str>,
    str_rid: Vec<i64>,
    date_rtype: Vec<&'a str>,
    date_param: Vec<&'a str>,
    date_low: Vec<i64>,
    date_high: Vec<i64>,
    date_rid: Vec<i64>,
    ref_rtype: Vec<&'a str>,
    ref_param: Vec<&'a str>,
    ref_target: Vec<&'a str>,
    ref_rid: Vec<i64>,
}

impl<'a> IndexCols<'a> {
    fn add(&mut self, rid: i64, rtype: ResourceType, entries: &'a [IndexEntry]) {
        let rt = rtype.as_str();
        let mut tokens = std::collections::BTreeSet::new();
        let mut strings = std::collections::BTreeSet::new();
        let mut dates = std::collections::BTreeSet::new();
        let mut refs = std::collections::BTreeSet::new();
        for e in entries.iter().filter(|e| store::stored_row(rtype, e)) {
            match &e.value {
                IndexValue::Token { system, code } => {
                    tokens.insert((e.param, code.as_str(), system.as_deref().unwrap_or("")));
                }
                IndexValue::String { value, exact } => {
                    strings.insert((e.param, value.as_str(), exact.as_str()));
                }
                IndexValue::Date { low_ms, high_ms } => {
                    dates.insert((e.param, *low_ms, *high_ms));
                }
                IndexValue::Reference(t) => {
                    refs.insert((e.param, t.as_str()));
                }
            }
        }
        for (param, code, system) in tokens {
            self.tok_rtype.push(rt);
            self.tok_param.push(param);
            self.tok_code.push(code);
            self.tok_system.push(system);
            self.tok_rid.push(rid);
        }
        for (param, value, exact) in strings {
            self.str_rtype.push(rt);
            self.str_param.push(param);
            self.str_value.push(value);
            self.str_exact.push(exact);
            self.str_rid.push(rid);
        }
        for (param, low, high) in dates {
            self.date_rtype.push(rt);
            self.date_param.push(param);
            self.date_low.push(low);
            self.date_high.push(high);
            self.date_rid.push(rid);
        }
        for (param, target) in refs {
            self.ref_rtype.push(rt);
            self.ref_param.push(param);
            self.ref_target.push(target);
            self.ref_rid.push(rid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_rows_spells_out_the_diff_statement() {
        assert_eq!(
            super::REPLACE_REFERENCES,
            "WITH n AS (SELECT rtype COLLATE \"C\" AS rtype, param COLLATE \"C\" AS param, \
             target COLLATE \"C\" AS target, rid FROM unnest($2::text[], $3::text[], $4::text[], \
             $5::bigint[]) AS n(rtype, param, target, rid)), \
             old AS MATERIALIZED (SELECT rtype, param, target, rid FROM idx_reference \
             WHERE rid = ANY($1::bigint[])), \
             d AS (DELETE FROM idx_reference t WHERE t.rid = ANY($1::bigint[]) AND NOT EXISTS (\
             SELECT 1 FROM n WHERE n.rtype = t.rtype AND n.param = t.param AND n.target = t.target \
             AND n.rid = t.rid)) \
             INSERT INTO idx_reference (rtype, param, target, rid) \
             SELECT * FROM n WHERE NOT EXISTS (SELECT 1 FROM old t WHERE t.rtype = n.rtype \
             AND t.param = n.param AND t.target = n.target AND t.rid = n.rid)"
        );
    }

    fn token(param: &'static str, system: Option<&str>, code: &str) -> IndexEntry {
        IndexEntry {
            param,
            value: IndexValue::Token {
                system: system.map(str::to_string),
                code: code.to_string(),
            },
        }
    }

    fn identifier(code: &str) -> SearchQuery {
        SearchQuery::new(ResourceType::Patient).with(
            "identifier",
            Predicate::Token {
                system: Some("urn:a".into()),
                code: Some(code.into()),
            },
        )
    }

    #[test]
    fn a_search_told_ahead_is_answered_again_whenever_a_write_could_change_it() {
        let q = identifier("X1");
        assert!(answerable_ahead(&q));
        assert!(!answerable_ahead(&q.clone().with(
            "family",
            Predicate::String {
                value: "smith".into(),
                exact: None
            }
        )));
        let mut paged = q.clone();
        paged.offset = 100;
        assert!(!answerable_ahead(&paged));
        let chained = SearchQuery::new(ResourceType::Appointment).with(
            "patient.identifier",
            Predicate::Token {
                system: None,
                code: Some("X1".into()),
            },
        );
        assert!(!answerable_ahead(&chained));

        // Could match: the same code in any case and under any system; not: another code or parameter.
        assert!(could_match(&q, &[token("identifier", Some("urn:a"), "X1")]));
        assert!(could_match(&q, &[token("identifier", Some("urn:b"), "x1")]));
        assert!(could_match(&q, &[token("identifier", None, "X1")]));
        assert!(!could_match(
            &q,
            &[token("identifier", Some("urn:a"), "X2")]
        ));
        assert!(!could_match(&q, &[token("gender", Some("urn:a"), "X1")]));
        assert!(!could_match(&q, &[]));

        let stored = |id: &str, rtype: ResourceType| Stored {
            rtype,
            id: id.into(),
            version: 1,
            last_updated_ms: 0,
            deleted: false,
            json: String::new(),
        };
        let mut buf = JobBuf::default();
        assert!(!buf.may_change(&q, &[]));
        // A Patient of the answer was written (even to a version that no longer matches).
        buf.put(7, stored("p1", ResourceType::Patient), Vec::new());
        assert!(buf.may_change(&q, &[stored("p1", ResourceType::Patient)]));
        assert!(!buf.may_change(&q, &[stored("p2", ResourceType::Patient)]));
        // A version of another resource that could match.
        buf.put(
            8,
            stored("p3", ResourceType::Patient),
            vec![token("identifier", Some("urn:a"), "x1")],
        );
        assert!(buf.may_change(&q, &[]));
        // Writes of another type never change a Patient search.
        let mut other = JobBuf::default();
        other.put(
            9,
            stored("p1", ResourceType::Practitioner),
            vec![token("identifier", Some("urn:a"), "X1")],
        );
        assert!(!other.may_change(&q, &[stored("p1", ResourceType::Patient)]));
    }
}
