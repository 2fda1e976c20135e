//! Writes to the hub: Patients created open-loop at a fixed rate or closed-loop as fast as possible, and the
//! few control requests (create a Subscription, `$replay`, `/metrics`).

use loadgen::http::{Client, Response};
use loadgen::patient::{NhsNumbers, patient_json};
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

const FHIR_JSON: &str = "application/fhir+json";
/// Per-request time limit of every request the bench makes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Where created Patients get their index and NHS number from (distinct within one hub).
pub struct Patients {
    next: AtomicU64,
    nhs: NhsNumbers,
}

impl Patients {
    pub fn new() -> Arc<Patients> {
        Arc::new(Patients {
            next: AtomicU64::new(0),
            nhs: NhsNumbers::starting_at(0),
        })
    }

    fn body(&self) -> String {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        patient_json(i, &self.nhs.next_number())
    }
}

async fn client(addr: &str) -> Result<Client, String> {
    let mut c = Client::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    c.set_timeout(REQUEST_TIMEOUT);
    Ok(c)
}

/// One request on a fresh connection.
pub async fn request(addr: &str, method: &str, path: &str, body: &str) -> Result<Response, String> {
    let mut c = client(addr).await?;
    let headers: &[(&str, &str)] = if body.is_empty() {
        &[]
    } else {
        &[("Content-Type", FHIR_JSON)]
    };
    c.request(method, path, headers, body.as_bytes())
        .await
        .map_err(|e| format!("{method} {path}: {e}"))
}

fn expect(resp: &Response, status: u16, what: &str) -> Result<Value, String> {
    if resp.status != status {
        return Err(format!(
            "{what}: HTTP {} {}",
            resp.status,
            String::from_utf8_lossy(&resp.body)
                .chars()
                .take(400)
                .collect::<String>()
        ));
    }
    serde_json::from_slice(&resp.body).map_err(|e| format!("{what}: the answer is not JSON: {e}"))
}

/// Create a rest-hook Subscription on every Patient change; returns its id.
pub async fn create_subscription(addr: &str, endpoint: &str) -> Result<String, String> {
    let body = serde_json::json!({
        "resourceType": "Subscription", "status": "requested", "reason": "bench", "criteria": "Patient",
        "channel": {"type": "rest-hook", "endpoint": endpoint, "payload": "application/cloudevents+json"},
        "extension": [{"url": "urn:carebridge:subscription-signing-secret",
                       "valueString": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}]
    });
    let resp = request(addr, "POST", "/fhir/Subscription", &body.to_string()).await?;
    let v = expect(&resp, 201, "creating the Subscription")?;
    let status = v.get("status").and_then(Value::as_str).unwrap_or("");
    if status != "active" {
        return Err(format!(
            "the new Subscription's status is {status:?}, not active"
        ));
    }
    v.get("id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| "the created Subscription has no id".to_string())
}

/// `$replay` from event 1: (requeued, enqueued).
pub async fn replay_from_1(addr: &str, sub: &str) -> Result<(u64, u64), String> {
    let body =
        r#"{"resourceType":"Parameters","parameter":[{"name":"sequence","valueInteger":1}]}"#;
    let resp = request(
        addr,
        "POST",
        &format!("/fhir/Subscription/{sub}/$replay"),
        body,
    )
    .await?;
    let v = expect(&resp, 200, "$replay")?;
    let get = |name: &str| {
        v.get("parameter")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
            .and_then(|p| p.get("valueInteger"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Ok((get("requeued"), get("enqueued")))
}

/// Create one Patient (closed, single request).
pub async fn create_one(addr: &str, patients: &Patients) -> Result<(), String> {
    let resp = request(addr, "POST", "/fhir/Patient", &patients.body()).await?;
    expect(&resp, 201, "creating a Patient").map(|_| ())
}

/// `GET /metrics` and how long it took.
pub async fn metrics(addr: &str) -> Result<(String, Duration), String> {
    let t = Instant::now();
    let resp = request(addr, "GET", "/metrics", "").await?;
    if resp.status != 200 {
        return Err(format!("GET /metrics: HTTP {}", resp.status));
    }
    Ok((
        String::from_utf8_lossy(&resp.body).into_owned(),
        t.elapsed(),
    ))
}

/// Sum of a Prometheus metric's samples whose labels include every `labels` pair.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            if !(rest.is_empty() || rest.starts_with('{')) {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0
}

/// What a batch of creates produced.
#[derive(Debug, Default)]
pub struct Created {
    /// Requests sent.
    pub sent: u64,
    /// 201 answers.
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// From when each request was due (open loop: its scheduled instant) to its answer, in ms.
    pub latencies_ms: Vec<f64>,
    /// How late the last request was sent relative to its schedule (open loop), in ms.
    pub max_send_lag_ms: f64,
    pub elapsed: Duration,
}

impl Created {
    fn merge(&mut self, o: Created) {
        self.sent += o.sent;
        self.ok += o.ok;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        self.latencies_ms.extend(o.latencies_ms);
        self.max_send_lag_ms = self.max_send_lag_ms.max(o.max_send_lag_ms);
    }

    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn record(&mut self, r: Result<Response, loadgen::http::Error>, due: Instant) {
        self.sent += 1;
        match r {
            Ok(resp) if resp.status == 201 => {
                self.ok += 1;
                self.latencies_ms.push(due.elapsed().as_secs_f64() * 1000.0);
            }
            Ok(resp) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| {
                    format!(
                        "HTTP {} {}",
                        resp.status,
                        String::from_utf8_lossy(&resp.body)
                            .chars()
                            .take(200)
                            .collect::<String>()
                    )
                });
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// Create Patients open-loop: request i is due at start + i / rate, for `duration`, over `connections`
/// keep-alive connections (a request waits for a free connection when all are busy; its latency counts from
/// when it was due). Bounded: pacing stops after `duration`, stragglers are abandoned after `grace`.
pub async fn open_loop(
    addr: &str,
    patients: Arc<Patients>,
    rate: f64,
    duration: Duration,
    connections: usize,
    grace: Duration,
) -> Created {
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let (tx, rx) = tokio::sync::mpsc::channel::<Instant>(total.max(1) as usize);
    let rx = Arc::new(Mutex::new(rx));
    let start = Instant::now() + Duration::from_millis(20);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (rx, patients, addr) = (rx.clone(), patients.clone(), addr.to_string());
        workers.spawn(async move {
            let mut out = Created::default();
            let mut c = match client(&addr).await {
                Ok(c) => c,
                Err(e) => {
                    out.first_error = Some(e);
                    return out;
                }
            };
            loop {
                let due = { rx.lock().await.recv().await };
                let Some(due) = due else { return out };
                let lag = due.elapsed().as_secs_f64() * 1000.0;
                out.max_send_lag_ms = out.max_send_lag_ms.max(lag);
                let body = patients.body();
                let r = c
                    .request(
                        "POST",
                        "/fhir/Patient",
                        &[("Content-Type", FHIR_JSON)],
                        body.as_bytes(),
                    )
                    .await;
                out.record(r, due);
            }
        });
    }
    let interval = Duration::from_secs_f64(1.0 / rate);
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due.into()).await;
        if tx.send(due).await.is_err() {
            break;
        }
    }
    drop(tx);
    let mut created = Created::default();
    let collect = async {
        while let Some(r) = workers.join_next().await {
            if let Ok(c) = r {
                created.merge(c);
            }
        }
    };
    let _ = tokio::time::timeout(grace, collect).await;
    workers.abort_all();
    created.elapsed = start.elapsed();
    created
}

/// Create `n` Patients as fast as `connections` connections allow (closed loop); stops at `limit`.
pub async fn closed_loop(
    addr: &str,
    patients: Arc<Patients>,
    n: u64,
    connections: usize,
    limit: Duration,
) -> Created {
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (issued, patients, addr) = (issued.clone(), patients.clone(), addr.to_string());
        workers.spawn(async move {
            let mut out = Created::default();
            let mut c = match client(&addr).await {
                Ok(c) => c,
                Err(e) => {
                    out.first_error = Some(e);
                    return out;
                }
            };
            while issued.fetch_add(1, Ordering::Relaxed) < n {
                let due = Instant::now();
                let body = patients.body();
                let r = c
                    .request(
                        "POST",
                        "/fhir/Patient",
                        &[("Content-Type", FHIR_JSON)],
                        body.as_bytes(),
                    )
                    .await;
                out.record(r, due);
            }
            out
        });
    }
    let mut created = Created::default();
    let collect = async {
        while let Some(r) = workers.join_next().await {
            if let Ok(c) = r {
                created.merge(c);
            }
        }
    };
    let timed_out = tokio::time::timeout(limit, collect).await.is_err();
    workers.abort_all();
    created.elapsed = start.elapsed();
    if timed_out && created.first_error.is_none() {
        created.first_error = Some(format!("seeding stopped at the {limit:?} limit"));
    }
    created
}
