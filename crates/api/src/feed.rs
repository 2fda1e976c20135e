//! Event endpoints: the polling feed `GET /events`, `Subscription/{id}/$replay`, the deliveries list and
//! `/metrics`.

use crate::App;
use crate::error::ApiError;
use crate::handlers::{Reply, check_id, write_error};
use crate::search::parse_pairs;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use fhir::{IssueType, ResourceType};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::{DeliveryQuery, DeliveryState, DeliveryUpdate, Event, SearchQuery, Store};

type AppState<S> = State<Arc<App<S>>>;

const MAX_WAIT: Duration = Duration::from_secs(60);
const MAX_LIMIT: usize = 1000;

fn parse_wait(v: &str) -> Result<Duration, ApiError> {
    let v = v.trim();
    let (num, unit_ms) = if let Some(n) = v.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000)
    } else {
        (v, 1000)
    };
    let n: u64 = num
        .parse()
        .map_err(|_| ApiError::bad_request(format!("wait must be like 30s or 500ms, got '{v}'")))?;
    Ok(Duration::from_millis(n.saturating_mul(unit_ms)).min(MAX_WAIT))
}

/// One CloudEvent (structured, as a JSON value) for the feed.
async fn event_json<S: Store>(app: &App<S>, ev: &Event) -> Result<Value, ApiError> {
    let version = app.store.vread(ev.rtype, &ev.id, ev.version).await?;
    let resource = version
        .as_ref()
        .filter(|v| !v.deleted)
        .map(|v| v.json.as_str());
    let fhir_base = app.fhir_base();
    let body = delivery::cloud_event(&delivery::EnvelopeInput {
        event: ev,
        source: &app.config.public_url,
        fhir_base: &fhir_base,
        resource_json: resource,
    });
    serde_json::from_str(&body).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            IssueType::Exception,
            e.to_string(),
        )
    })
}

/// GET /events?after={cursor}&limit={n}&wait={30s}&type={ce type}&subject={Type/id}: CloudEvents in commit
/// order after the cursor, with the next cursor. With `wait`, an empty answer is held until an event arrives
/// or the time is up (long poll).
pub async fn events<S: Store>(
    State(app): AppState<S>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let mut after: i64 = 0;
    let mut limit: usize = 100;
    let mut wait = Duration::ZERO;
    let mut types: Vec<String> = Vec::new();
    let mut subjects: Vec<String> = Vec::new();
    for (k, v) in parse_pairs(raw.as_deref()) {
        match k.as_str() {
            "after" => {
                after = v.parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "after must be a cursor from a previous answer (a number), got '{v}'"
                    ))
                })?
            }
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .map_err(|_| {
                        ApiError::bad_request(format!("limit must be a number, got '{v}'"))
                    })?
                    .clamp(1, MAX_LIMIT)
            }
            "wait" => wait = parse_wait(&v)?,
            "type" => types.extend(v.split(',').map(str::to_string)),
            "subject" => subjects.extend(v.split(',').map(str::to_string)),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter '{other}' (after, limit, wait, type, subject)"
                )));
            }
        }
    }
    let deadline = Instant::now() + wait;
    let mut commits = app.store.watch_events();
    let stop = crate::stopped(app.config.stopping.clone());
    tokio::pin!(stop);
    let mut cursor = after;
    loop {
        let page = app
            .store
            .events_after(cursor, limit.saturating_mul(4).min(MAX_LIMIT * 4))
            .await?;
        let mut out = Vec::new();
        for ev in &page {
            cursor = ev.seq;
            let type_ok =
                types.is_empty() || types.iter().any(|t| *t == delivery::event_type(&ev.kind));
            let subject_ok = subjects.is_empty() || subjects.contains(&ev.subject);
            if type_ok && subject_ok {
                out.push(event_json(&app, ev).await?);
                if out.len() >= limit {
                    break;
                }
            }
        }
        let now = Instant::now();
        let stopping = *app.config.stopping.borrow();
        if !out.is_empty() || now >= deadline || stopping {
            let body = json!({"events": out, "next": cursor.to_string()});
            return Ok((
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response());
        }
        if page.is_empty() {
            // Nothing new at all: sleep until a commit appends events or the wait is over.
            tokio::select! {
                _ = tokio::time::timeout(deadline - now, commits.changed()) => {},
                _ = &mut stop => {},
            }
        }
    }
}

fn parameters(body: &[u8]) -> Result<Vec<Value>, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    if v.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(ApiError::bad_request("$replay takes a Parameters resource").at("resourceType"));
    }
    Ok(v.get("parameter")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default())
}

async fn subscription_query<S: Store>(store: &S, id: &str) -> Result<SearchQuery, ApiError> {
    let current = store.read(ResourceType::Subscription, id).await?;
    let Some(s) = current.filter(|s| !s.deleted) else {
        return Err(ApiError::not_found(format!(
            "Subscription/{id} is not known"
        )));
    };
    let v: Value =
        serde_json::from_str(&s.json).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let criteria = v.get("criteria").and_then(Value::as_str).unwrap_or("");
    Ok(store::url::parse_criteria(criteria)?)
}

async fn event_matches<S: Store>(store: &S, q: &SearchQuery, ev: &Event) -> Result<bool, ApiError> {
    if ev.rtype != q.rtype {
        return Ok(false);
    }
    if q.clauses.is_empty() {
        return Ok(true);
    }
    let Some(v) = store
        .vread(ev.rtype, &ev.id, ev.version)
        .await?
        .filter(|v| !v.deleted)
    else {
        return Ok(false);
    };
    let json: Value = serde_json::from_str(&v.json).unwrap_or(Value::Null);
    Ok(store::matches(
        q,
        &ev.id,
        v.last_updated_ms,
        &fhir::index_entries(ev.rtype, &json),
    ))
}

/// POST /fhir/Subscription/{id}/$replay with Parameters: `deadLetters` (boolean: every dead letter), `event`
/// (integer: one delivery by its event number), or `sequence` (integer) / `since` (instant): every matching
/// event from that point, delivered again (already delivered ones included).
pub async fn replay<S: Store>(
    State(app): AppState<S>,
    Path((rtype, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Reply, ApiError> {
    if rtype != "Subscription" {
        return Err(ApiError::not_found(format!(
            "$replay is defined on Subscription, not {rtype}"
        )));
    }
    check_id(&id)?;
    let ps = parameters(&body)?;
    let get = |name: &str| {
        ps.iter()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
    };
    let query = subscription_query(app.store.as_ref(), &id).await?;
    let sub = id.clone();
    let (requeued, enqueued) = if get("deadLetters")
        .and_then(|p| p.get("valueBoolean"))
        .and_then(Value::as_bool)
        == Some(true)
    {
        let n = app
            .store
            .write(move |tx| tx.requeue_dead(&sub))
            .await
            .map_err(write_error)?;
        (n, 0)
    } else if let Some(seq) = get("event")
        .and_then(|p| p.get("valueInteger"))
        .and_then(Value::as_i64)
    {
        app.store
            .write(move |tx| tx.update_delivery(&sub, seq, DeliveryUpdate::Requeue))
            .await
            .map_err(write_error)?;
        (1, 0)
    } else {
        let from_seq = get("sequence")
            .and_then(|p| p.get("valueInteger"))
            .and_then(Value::as_i64);
        let since = get("since")
            .and_then(|p| p.get("valueInstant").or_else(|| p.get("valueDateTime")))
            .and_then(Value::as_str);
        let since_ms = match since {
            Some(s) => Some(fhir::parse_instant_ms(s).ok_or_else(|| {
                ApiError::bad_request(format!("since must be an instant, got '{s}'"))
            })?),
            None => None,
        };
        if from_seq.is_none() && since_ms.is_none() {
            return Err(ApiError::bad_request(
                "name what to replay: deadLetters, event, sequence or since",
            )
            .at("Parameters.parameter"));
        }
        replay_from(app.store.as_ref(), &sub, &query, from_seq, since_ms).await?
    };
    Ok(Reply {
        status: 200,
        headers: vec![("content-type".into(), crate::FHIR_JSON.into())],
        body: json!({"resourceType": "Parameters", "parameter": [
            {"name": "requeued", "valueInteger": requeued},
            {"name": "enqueued", "valueInteger": enqueued}
        ]})
        .to_string(),
    })
}

fn delivery_json(d: &store::Delivery) -> Value {
    json!({
        "subscription": d.subscription,
        "event": d.seq,
        "subject": d.subject,
        "state": d.state.as_str(),
        "attempts": d.attempts,
        "nextAttempt": (d.state == DeliveryState::Pending).then(|| fhir::format_instant_ms(d.next_attempt_ms)),
        "created": fhir::format_instant_ms(d.created_ms),
        "updated": fhir::format_instant_ms(d.updated_ms),
        "lastStatus": d.last_status,
        "lastError": d.last_error,
    })
}

/// GET /admin/deliveries?subscription={id}&state=pending|delivered|dead&after={event}&limit={n}
pub async fn deliveries<S: Store>(
    State(app): AppState<S>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let mut q = DeliveryQuery {
        limit: 100,
        ..Default::default()
    };
    for (k, v) in parse_pairs(raw.as_deref()) {
        match k.as_str() {
            "subscription" => q.subscription = Some(v),
            "state" => {
                q.state = Some(DeliveryState::parse(&v).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "state must be pending, delivered or dead, got '{v}'"
                    ))
                })?)
            }
            "after" => {
                q.after_seq = v
                    .parse()
                    .map_err(|_| ApiError::bad_request("after must be an event number"))?
            }
            "limit" => {
                q.limit = v
                    .parse::<usize>()
                    .map_err(|_| ApiError::bad_request("limit must be a number"))?
                    .clamp(1, MAX_LIMIT)
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter '{other}' (subscription, state, after, limit)"
                )));
            }
        }
    }
    let list = app.store.deliveries(&q).await?;
    let body = json!({"deliveries": list.iter().map(delivery_json).collect::<Vec<_>>()});
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response())
}

/// GET /metrics (Prometheus text format).
pub async fn metrics<S: Store>(State(app): AppState<S>) -> Result<Response, ApiError> {
    let mut subs = Vec::new();
    let mut q = SearchQuery::new(ResourceType::Subscription);
    q.count = MAX_LIMIT;
    loop {
        let page = app.store.search(&q).await?;
        let n = page.resources.len();
        subs.extend(page.resources.into_iter().map(|s| s.id));
        if n < q.count {
            break;
        }
        q.offset += n;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let mut counts = Vec::new();
    let mut lags = Vec::new();
    for sub in subs {
        let c = app.store.delivery_counts(&sub).await?;
        counts.push((sub.clone(), DeliveryState::Pending, c.pending));
        counts.push((sub.clone(), DeliveryState::Delivered, c.delivered));
        counts.push((sub.clone(), DeliveryState::Dead, c.dead));
        let oldest = if c.pending > 0 {
            app.store
                .deliveries(&DeliveryQuery {
                    subscription: Some(sub.clone()),
                    state: Some(DeliveryState::Pending),
                    after_seq: 0,
                    limit: 1,
                })
                .await?
        } else {
            Vec::new()
        };
        let lag = oldest
            .first()
            .map_or(0.0, |d| (now - d.created_ms).max(0) as f64 / 1000.0);
        lags.push((sub, lag));
    }
    let last = *app.store.watch_events().borrow();
    let body = crate::metrics::render(&app.config.metrics, &counts, &lags, last);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}

/// Events enqueued by one `Tx::enqueue_deliveries` call of a replay.
const ENQUEUE_CHUNK: usize = 5_000;

/// Deliver again every event of the subscription's criteria from event number `from_seq` and/or time
/// `since_ms` on (already delivered ones included): new deliveries are enqueued, existing ones requeued.
/// Returns (requeued, enqueued). Used by `$replay` and by `carebridge deliveries replay`.
pub async fn replay_from<S: Store>(
    store: &S,
    subscription: &str,
    query: &SearchQuery,
    from_seq: Option<i64>,
    since_ms: Option<i64>,
) -> Result<(u64, u64), ApiError> {
    let sub = subscription.to_string();
    let mut cursor = from_seq.map_or(0, |s| s - 1).max(0);
    let mut picked: Vec<Event> = Vec::new();
    loop {
        let page = store.events_after(cursor, 1000).await?;
        if page.is_empty() {
            break;
        }
        for ev in &page {
            cursor = ev.seq;
            if since_ms.is_some_and(|t| ev.time_ms < t) {
                continue;
            }
            if event_matches(store, query, ev).await? {
                picked.push(ev.clone());
            }
        }
    }
    let total = picked.len() as u64;
    let requeued = store
        .write(move |tx| {
            let mut requeued = 0u64;
            for chunk in picked.chunks(ENQUEUE_CHUNK) {
                let enqueued = tx.enqueue_deliveries(&sub, chunk)?;
                for (ev, new) in chunk.iter().zip(enqueued) {
                    if !new {
                        tx.update_delivery(&sub, ev.seq, DeliveryUpdate::Requeue)?;
                        requeued += 1;
                    }
                }
            }
            Ok(requeued)
        })
        .await
        .map_err(write_error)?;
    Ok((requeued, total - requeued))
}

/// The criteria of a live Subscription, parsed.
pub async fn criteria_of<S: Store>(store: &S, id: &str) -> Result<SearchQuery, ApiError> {
    subscription_query(store, id).await
}
