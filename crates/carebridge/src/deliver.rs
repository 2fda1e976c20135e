//! The delivery runner: fans outbox events out to matching Subscriptions (durably, as delivery rows) and sends
//! them to rest-hook endpoints, signed, with retries, dead letters and per-subject order.
//!
//! Two tasks share a cache of subscriptions:
//! - the dispatcher reads the outbox after its cursor, in commit order, and for every event enqueues one
//!   delivery per active subscription whose criteria the resource version matches, advancing the cursor in
//!   the same transaction (so a crash neither loses nor duplicates a fan-out);
//! - the sender claims due deliveries — at most one per (subscription, subject), the head of that subject's
//!   queue, which is what keeps per-subject order — and runs each as its own task under a global and a
//!   per-subscription limit, so a slow or dead endpoint delays nobody else.

use api::metrics::Metrics;
use delivery::{EnvelopeInput, Outcome, RetryPolicy};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use store::{
    DeliveryQuery, DeliveryState, DeliveryUpdate, Event, ResourceType, SearchQuery, Store,
};
use tokio::sync::{Notify, Semaphore, watch};

const NS: &str = "delivery";
const CURSOR: &str = "cursor";
const START_NS: &str = "subscription-start";
const COUNT_NS: &str = "subscription-count";
const NUMBER_NS: &str = "delivery-number";

#[derive(Debug, Clone)]
pub struct Config {
    pub policy: RetryPolicy,
    pub timeout: Duration,
    pub max_in_flight: usize,
    pub per_subscription: usize,
    /// The hub's public base URL (CloudEvents `source`).
    pub public_url: String,
    /// Several processes share the store: the dispatcher runs under a lease and each attempt first claims
    /// its delivery (so exactly one process makes it).
    pub shared: bool,
}

/// How long the dispatcher's lease lasts without renewal (another process takes over after it).
const DISPATCH_LEASE_MS: i64 = 5_000;

/// What the runner needs of a Subscription.
#[derive(Debug, Clone)]
struct Sub {
    id: String,
    active: bool,
    query: SearchQuery,
    endpoint: String,
    payload: Option<String>,
    headers: Vec<(String, String)>,
    /// Events with a seq above this are delivered (the seq of the subscription's creation event).
    start: Option<i64>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn random() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(now_ms())
}

fn parse_sub(json: &str, start: Option<i64>) -> Option<Sub> {
    let v: Value = serde_json::from_str(json).ok()?;
    let id = v.get("id")?.as_str()?.to_string();
    let query = store::url::parse_criteria(v.get("criteria")?.as_str()?).ok()?;
    let channel = v.get("channel")?;
    let headers = channel
        .get("header")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|h| {
            h.as_str()?
                .split_once(':')
                .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    Some(Sub {
        id,
        // `error` only reports failures: delivery goes on (and a success flips it back to active). Only `off`
        // pauses a subscription.
        active: v.get("status").and_then(Value::as_str) != Some("off"),
        query,
        endpoint: channel.get("endpoint")?.as_str()?.to_string(),
        payload: channel
            .get("payload")
            .and_then(Value::as_str)
            .map(str::to_string),
        headers,
        start,
    })
}

type Cache = Arc<RwLock<HashMap<String, Sub>>>;

/// Start the runner; it stops when `shutdown` turns true.
pub fn spawn<S: Store>(
    store: Arc<S>,
    cfg: Config,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) {
    let cache: Cache = Arc::new(RwLock::new(HashMap::new()));
    let wake = Arc::new(Notify::new());
    tokio::spawn(dispatcher(
        store.clone(),
        cache.clone(),
        wake.clone(),
        shutdown.clone(),
        cfg.shared,
    ));
    tokio::spawn(sender(store, cfg, cache, wake, metrics, shutdown));
}

async fn load_subscriptions<S: Store>(store: &S, cache: &Cache) -> store::Result<()> {
    let mut offset = 0;
    loop {
        let mut q = SearchQuery::new(ResourceType::Subscription);
        q.count = 500;
        q.offset = offset;
        let page = store.search(&q).await?;
        let n = page.resources.len();
        for s in page.resources {
            let start = store
                .kv_get(START_NS, &s.id)
                .await?
                .and_then(|v| v.parse().ok());
            if let Some(sub) = parse_sub(&s.json, start)
                && let Ok(mut c) = cache.write()
            {
                c.insert(sub.id.clone(), sub);
            }
        }
        if n < 500 {
            return Ok(());
        }
        offset += n;
    }
}

async fn dispatcher<S: Store>(
    store: Arc<S>,
    cache: Cache,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
    cfg_shared: bool,
) {
    let mut commits = store.watch_events();
    let mut cursor: i64 = match store.kv_get(NS, CURSOR).await {
        Ok(v) => v.and_then(|v| v.parse().ok()).unwrap_or(0),
        Err(e) => {
            tracing::error!(error = %e, "delivery: cannot read the dispatch cursor; delivery stopped");
            return;
        }
    };
    if let Err(e) = load_subscriptions(store.as_ref(), &cache).await {
        tracing::error!(error = %e, "delivery: cannot load subscriptions");
    }
    let mut leased = !cfg_shared;
    loop {
        if *shutdown.borrow() {
            return;
        }
        if cfg_shared {
            let held = crate::lease::hold(store.as_ref(), "dispatcher", DISPATCH_LEASE_MS).await;
            if !held {
                // Another process dispatches; keep this process's view of the subscriptions fresh for its
                // sender.
                leased = false;
                let _ = load_subscriptions(store.as_ref(), &cache).await;
                tokio::select! {
                    _ = shutdown.changed() => {},
                    _ = tokio::time::sleep(Duration::from_millis(1_000)) => {},
                }
                continue;
            }
            if !leased {
                // Taking over: another process may have advanced the cursor.
                leased = true;
                if let Ok(Some(v)) = store.kv_get(NS, CURSOR).await {
                    cursor = v.parse().unwrap_or(cursor);
                }
                let _ = load_subscriptions(store.as_ref(), &cache).await;
            }
        }
        let events = match store.events_after(cursor, 500).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "delivery: reading the outbox failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if events.is_empty() {
            tokio::select! {
                _ = commits.changed() => {},
                _ = shutdown.changed() => {},
                _ = tokio::time::sleep(Duration::from_secs(1)) => {},
            }
            continue;
        }
        match dispatch(store.as_ref(), &cache, &events).await {
            Ok(()) => {
                cursor = events.last().map_or(cursor, |e| e.seq);
                wake.notify_one();
            }
            Err(e) => {
                tracing::warn!(error = %e, "delivery: fan-out failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Match one page of events against the subscriptions and enqueue the deliveries, with the new cursor, in
/// one transaction.
async fn dispatch<S: Store>(store: &S, cache: &Cache, events: &[Event]) -> store::Result<()> {
    let mut enqueue: Vec<(String, Event)> = Vec::new();
    let mut starts: Vec<(String, i64)> = Vec::new();
    for ev in events {
        let subs: Vec<Sub> = cache
            .read()
            .map(|c| {
                c.values()
                    .filter(|s| {
                        s.active
                            && s.query.rtype == ev.rtype
                            && s.start.is_some_and(|st| ev.seq > st)
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if !subs.is_empty() {
            // Index entries of the version the event refers to, computed once for every subscription.
            let version = store.vread(ev.rtype, &ev.id, ev.version).await?;
            let entries = match &version {
                Some(v) if !v.deleted => serde_json::from_str::<Value>(&v.json)
                    .map(|json| (fhir::index_entries(ev.rtype, &json), v.last_updated_ms))
                    .ok(),
                _ => None,
            };
            for s in subs {
                let hit = match &entries {
                    _ if s.query.clauses.is_empty() => true,
                    Some((e, lu)) => store::matches(&s.query, &ev.id, *lu, e),
                    None => false,
                };
                if hit {
                    enqueue.push((s.id.clone(), ev.clone()));
                }
            }
        }
        if ev.rtype == ResourceType::Subscription {
            let current = store.vread(ev.rtype, &ev.id, ev.version).await?;
            if let Ok(mut c) = cache.write() {
                match current {
                    Some(v) if !v.deleted => {
                        let start = c.get(&ev.id).and_then(|s| s.start).unwrap_or(ev.seq);
                        if c.get(&ev.id).and_then(|s| s.start).is_none() {
                            starts.push((ev.id.clone(), ev.seq));
                        }
                        if let Some(sub) = parse_sub(&v.json, Some(start)) {
                            c.insert(ev.id.clone(), sub);
                        }
                    }
                    _ => {
                        c.remove(&ev.id);
                    }
                }
            }
        }
    }
    let last = events.last().map_or(0, |e| e.seq);
    store
        .write(move |tx| {
            // Each delivery's number among its subscription's events (`events-since-subscription-start`).
            let mut counters: HashMap<String, u64> = HashMap::new();
            for (sub, ev) in &enqueue {
                if tx.enqueue_delivery(sub, ev)? {
                    let n = match counters.get(sub) {
                        Some(n) => *n,
                        None => tx
                            .kv_get(COUNT_NS, sub)?
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0),
                    } + 1;
                    counters.insert(sub.clone(), n);
                    tx.kv_put(
                        NUMBER_NS,
                        &format!("{sub}/{}", ev.seq),
                        Some(&n.to_string()),
                    )?;
                }
            }
            for (sub, n) in counters {
                tx.kv_put(COUNT_NS, &sub, Some(&n.to_string()))?;
            }
            for (sub, seq) in &starts {
                tx.kv_put(START_NS, sub, Some(&seq.to_string()))?;
            }
            tx.kv_put(NS, CURSOR, Some(&last.to_string()))
        })
        .await
}

struct Limits {
    global: Arc<Semaphore>,
    per_sub: Mutex<HashMap<String, usize>>,
    in_flight: Mutex<HashSet<(String, String)>>,
}

async fn sender<S: Store>(
    store: Arc<S>,
    cfg: Config,
    cache: Cache,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let client = match reqwest::Client::builder()
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
        .pool_max_idle_per_host(64)
        .user_agent(concat!("carebridge/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "delivery: cannot build the HTTP client; delivery stopped");
            return;
        }
    };
    let limits = Arc::new(Limits {
        global: Arc::new(Semaphore::new(cfg.max_in_flight.max(1))),
        per_sub: Mutex::new(HashMap::new()),
        in_flight: Mutex::new(HashSet::new()),
    });
    let cfg = Arc::new(cfg);
    loop {
        if *shutdown.borrow() {
            return;
        }
        // Due work per subscription, each within its own share of the in-flight budget: a subscriber with a
        // large backlog (or a dead endpoint) never hides another's due work.
        let now = now_ms();
        let subs: Vec<String> = cache
            .read()
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default();
        let mut due = Vec::new();
        let mut failed = None;
        for sub in &subs {
            let in_use = limits
                .per_sub
                .lock()
                .map(|p| p.get(sub).copied().unwrap_or(0))
                .unwrap_or(0);
            if in_use >= cfg.per_subscription {
                continue;
            }
            // In-flight heads are still pending, so ask for as many as the whole share.
            match store
                .due_deliveries_for(sub, now, cfg.per_subscription)
                .await
            {
                Ok(d) => due.extend(d),
                Err(e) => failed = Some(e),
            }
        }
        // Deliveries of subscriptions that no longer exist: found by the global scan, ended as dead letters.
        match store.due_deliveries(now, 16).await {
            Ok(d) => due.extend(d.into_iter().filter(|d| !subs.contains(&d.subscription))),
            Err(e) => failed = Some(e),
        }
        if let Some(e) = failed {
            tracing::warn!(error = %e, "delivery: reading due deliveries failed");
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let mut started = 0usize;
        for d in due {
            let key = (d.subscription.clone(), d.subject.clone());
            {
                let Ok(mut inf) = limits.in_flight.lock() else {
                    continue;
                };
                if inf.contains(&key) {
                    continue;
                }
                let Ok(mut per) = limits.per_sub.lock() else {
                    continue;
                };
                let n = per.entry(d.subscription.clone()).or_insert(0);
                if *n >= cfg.per_subscription {
                    continue;
                }
                let Ok(permit) = limits.global.clone().try_acquire_owned() else {
                    break;
                };
                *n += 1;
                inf.insert(key.clone());
                let (store, cfg, cache, wake, metrics, limits, client) = (
                    store.clone(),
                    cfg.clone(),
                    cache.clone(),
                    wake.clone(),
                    metrics.clone(),
                    limits.clone(),
                    client.clone(),
                );
                tokio::spawn(async move {
                    attempt(store.as_ref(), &cfg, &cache, &client, &metrics, d).await;
                    drop(permit);
                    if let Ok(mut inf) = limits.in_flight.lock() {
                        inf.remove(&key);
                    }
                    if let Ok(mut per) = limits.per_sub.lock()
                        && let Some(n) = per.get_mut(&key.0)
                    {
                        *n = n.saturating_sub(1);
                    }
                    wake.notify_one();
                });
                started += 1;
            }
        }
        if started == 0 {
            // Short naps: work can also appear without a wake-up (a `$replay` or a CLI requeue).
            let sleep = match store.next_due_ms().await {
                Ok(Some(t)) => Duration::from_millis(
                    u64::try_from((t - now_ms()).clamp(1, 100)).unwrap_or(100),
                ),
                _ => Duration::from_millis(100),
            };
            tokio::select! {
                _ = wake.notified() => {},
                _ = shutdown.changed() => {},
                _ = tokio::time::sleep(sleep) => {},
            }
        }
    }
}

/// Make one attempt of one delivery and record its outcome.
async fn attempt<S: Store>(
    store: &S,
    cfg: &Config,
    cache: &Cache,
    client: &reqwest::Client,
    metrics: &Metrics,
    d: store::Delivery,
) {
    // The due list was read before earlier attempts finished: make sure this delivery is still the pending
    // one it was (an attempt that just succeeded must not be sent again). With a shared store, claim it: in
    // one write, check it is still due and push its next attempt out by a lease, so no other process sends it
    // meanwhile (a process that dies mid-attempt leaves it to the others once the lease ends).
    if cfg.shared {
        let (sub_id, seq, attempts) = (d.subscription.clone(), d.seq, d.attempts);
        let lease_until =
            now_ms() + i64::try_from(cfg.timeout.as_millis()).unwrap_or(i64::MAX / 2) + 5_000;
        let now = now_ms();
        let claimed = store
            .write(move |tx| match tx.delivery(&sub_id, seq)? {
                Some(x)
                    if x.state == DeliveryState::Pending
                        && x.attempts == attempts
                        && x.next_attempt_ms <= now =>
                {
                    tx.update_delivery(
                        &sub_id,
                        seq,
                        DeliveryUpdate::Retry {
                            attempts,
                            next_attempt_ms: lease_until,
                            status: x.last_status,
                            error: x
                                .last_error
                                .unwrap_or_else(|| "attempt in progress".to_string()),
                        },
                    )?;
                    Ok(true)
                }
                _ => Ok(false),
            })
            .await
            .unwrap_or(false);
        if !claimed {
            return;
        }
    }
    let still_pending = cfg.shared
        || store
            .deliveries(&DeliveryQuery {
                subscription: Some(d.subscription.clone()),
                state: Some(DeliveryState::Pending),
                after_seq: d.seq - 1,
                limit: 1,
            })
            .await
            .map(|l| {
                l.first()
                    .is_some_and(|x| x.seq == d.seq && x.attempts == d.attempts)
            })
            .unwrap_or(false);
    if !still_pending {
        return;
    }
    let mut sub = cache
        .read()
        .ok()
        .and_then(|c| c.get(&d.subscription).cloned());
    if sub.is_none() && cfg.shared {
        // Created or changed by another process since this one last loaded the subscriptions.
        let _ = load_subscriptions(store, cache).await;
        sub = cache
            .read()
            .ok()
            .and_then(|c| c.get(&d.subscription).cloned());
    }
    let attempts = d.attempts + 1;
    let paused = sub.as_ref().is_some_and(|s| !s.active);
    let update = match sub {
        None => DeliveryUpdate::Dead {
            attempts: d.attempts,
            status: None,
            error: "the subscription no longer exists".into(),
        },
        Some(s) if !s.active => DeliveryUpdate::Retry {
            attempts: d.attempts,
            next_attempt_ms: now_ms() + 30_000,
            status: None,
            error: "the subscription is off".into(),
        },
        Some(s) => match send(store, cfg, client, &s, &d).await {
            Ok(status) => DeliveryUpdate::Delivered { attempts, status },
            Err((status, _, error, true)) => DeliveryUpdate::Dead {
                attempts,
                status,
                error,
            },
            Err((status, retry_after, error, false)) => {
                match cfg.policy.after_failure(
                    attempts,
                    d.created_ms,
                    now_ms(),
                    retry_after,
                    random(),
                ) {
                    Outcome::RetryAt(t) => DeliveryUpdate::Retry {
                        attempts,
                        next_attempt_ms: t,
                        status,
                        error,
                    },
                    Outcome::Dead => DeliveryUpdate::Dead {
                        attempts,
                        status,
                        error,
                    },
                }
            }
        },
    };
    let result = match &update {
        DeliveryUpdate::Delivered { .. } => "delivered",
        DeliveryUpdate::Dead { .. } => "dead",
        _ => "failed",
    };
    if !paused {
        metrics.record_attempt(&d.subscription, result);
    }
    let (sub_id, seq) = (d.subscription.clone(), d.seq);
    let status_change = match &update {
        DeliveryUpdate::Dead { error, .. } => Some((
            "error",
            Some(format!("delivery of event {seq} failed: {error}")),
        )),
        DeliveryUpdate::Delivered { .. } => Some(("active", None)),
        _ => None,
    };
    let r = store
        .write(move |tx| {
            let delivered = matches!(update, DeliveryUpdate::Delivered { .. });
            tx.update_delivery(&sub_id, seq, update)?;
            if delivered {
                // The number has been sent; keep the key-value table from growing with every delivery.
                tx.kv_put(NUMBER_NS, &format!("{sub_id}/{seq}"), None)?;
            }
            if let Some((status, error)) = &status_change {
                // Only flips error <-> active; an `off` subscription stays off.
                let current = tx.read(ResourceType::Subscription, &sub_id)?;
                let now = current
                    .as_ref()
                    .filter(|c| !c.deleted)
                    .and_then(|c| serde_json::from_str::<Value>(&c.json).ok())
                    .and_then(|v| v.get("status").and_then(Value::as_str).map(str::to_string));
                let flip = matches!(
                    (now.as_deref(), *status),
                    (Some("active"), "error") | (Some("error"), "active")
                );
                if flip {
                    booking::subscription::set_status(tx, &sub_id, status, error.as_deref())?;
                }
            }
            Ok(())
        })
        .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, subscription = %d.subscription, seq = d.seq, "delivery: recording the outcome failed");
    }
}

/// (HTTP status, Retry-After in ms, error text, permanent). A permanent failure (an HL7 AR) is dead at once.
type SendError = (Option<u16>, Option<i64>, String, bool);

async fn send<S: Store>(
    store: &S,
    cfg: &Config,
    client: &reqwest::Client,
    sub: &Sub,
    d: &store::Delivery,
) -> Result<u16, SendError> {
    let internal = |e: store::StoreError| (None, None, format!("hub error: {e}"), false);
    let event = store
        .events_after(d.seq - 1, 1)
        .await
        .map_err(internal)?
        .into_iter()
        .find(|e| e.seq == d.seq)
        .ok_or((
            None,
            None,
            format!("event {} is no longer in the outbox", d.seq),
            false,
        ))?;
    if let Some(addr) = sub.endpoint.strip_prefix("mllp://") {
        return crate::mllp::deliver(store, cfg, addr.trim_end_matches('/'), &event).await;
    }
    if let Some(rest) = sub.endpoint.strip_prefix("mesh://") {
        let payload = sub.payload.as_deref();
        return crate::mesh_out::deliver(store, cfg, &sub.id, rest, payload, d, &event).await;
    }
    let version = store
        .vread(event.rtype, &event.id, event.version)
        .await
        .map_err(internal)?;
    let resource = version
        .as_ref()
        .filter(|v| !v.deleted)
        .map(|v| v.json.as_str());
    let fhir_base = format!("{}/fhir", cfg.public_url);
    let input = EnvelopeInput {
        event: &event,
        source: &cfg.public_url,
        fhir_base: &fhir_base,
        resource_json: resource,
    };
    let id = delivery::event_id(&event);
    let (content_type, body) = match sub.payload.as_deref() {
        Some("application/cloudevents+json") => (
            "application/cloudevents+json",
            delivery::cloud_event(&input),
        ),
        Some(_) => {
            // The number given when the event was enqueued for this subscription; a replayed delivery that
            // was never enqueued before has none and takes the current count.
            let numbered = store
                .kv_get(NUMBER_NS, &format!("{}/{}", sub.id, d.seq))
                .await
                .map_err(internal)?;
            let n = match numbered.and_then(|v| v.parse().ok()) {
                Some(n) => n,
                None => store
                    .kv_get(COUNT_NS, &sub.id)
                    .await
                    .map_err(internal)?
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            };
            (
                "application/fhir+json",
                delivery::notification_bundle(&input, &sub.id, n),
            )
        }
        None => ("", String::new()),
    };
    let ts = now_ms() / 1000;
    let secret = store
        .kv_get(booking::subscription::SECRET_NAMESPACE, &sub.id)
        .await
        .map_err(internal)?;
    let mut req = client
        .post(&sub.endpoint)
        .header("webhook-id", &id)
        .header("webhook-timestamp", ts.to_string());
    if let Some(secret) = secret {
        let sig = delivery::sign(&secret, &id, ts, body.as_bytes())
            .map_err(|e| (None, None, e.to_string(), false))?;
        req = req.header("webhook-signature", sig);
    }
    if content_type.is_empty() {
        // Id-only signal: CloudEvents binary mode without data.
        req = req
            .header("ce-specversion", "1.0")
            .header("ce-id", &id)
            .header("ce-source", &cfg.public_url)
            .header("ce-type", delivery::event_type(&event.kind))
            .header("ce-subject", &event.subject)
            .header("ce-time", fhir::format_instant_ms(event.time_ms))
            .header("ce-sequence", event.subject_seq.to_string());
    } else {
        req = req.header("content-type", content_type);
    }
    for (name, value) in &sub.headers {
        req = req.header(name.as_str(), value.as_str());
    }
    let res = req.body(body).send().await.map_err(|e| {
        let why = if e.is_timeout() {
            "timed out".to_string()
        } else {
            format!("{e}")
        };
        (None, None, why, false)
    })?;
    let status = res.status().as_u16();
    if res.status().is_success() {
        return Ok(status);
    }
    let retry_after = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .map(|s| s.saturating_mul(1000));
    Err((
        Some(status),
        retry_after,
        format!("the endpoint answered {status}"),
        false,
    ))
}
