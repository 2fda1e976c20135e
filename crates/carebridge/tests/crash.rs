//! Crash and shutdown behaviour of `carebridge serve`, driven over real HTTP.
//!
//! - `acknowledged_creates_survive_sigkill`: writers POST Patients on keep-alive connections, the server is
//!   SIGKILLed mid-stream and restarted on the same data dir; every create that was acknowledged (201) must be
//!   there at version 1, and the type history must agree exactly with what is stored.
//! - `sigterm_drains_in_flight_requests_and_exits_zero`: SIGTERM while requests are in flight; the process
//!   exits 0, and every request that got a response got a complete one.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use common::{Conn, HttpError, Server, TempDir, nhs_numbers, origin_form, parse_location, patient};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const WRITERS: u32 = 8;
/// Safety bound on every request loop (the loops normally end when the server goes away).
const LOOP_LIMIT: Duration = Duration::from_secs(30);

/// What one writer thread saw.
#[derive(Default)]
struct WriterReport {
    /// Requests whose bytes were written to a socket (may or may not have been stored).
    sent: usize,
    /// id -> NHS number of every create answered 201.
    acked: BTreeMap<String, String>,
    /// Problems that are failures whatever the timing (bad status before the stop, truncated responses...).
    failures: Vec<String>,
    /// Complete responses received after the stop signal was sent.
    responses_after_stop: usize,
}

/// POST Patients in a loop on a keep-alive connection until the server goes away (after `stopping` is set).
fn writer(
    addr: SocketAddr,
    thread_no: u32,
    stopping: Arc<AtomicBool>,
    gone: Arc<AtomicBool>,
) -> WriterReport {
    let mut report = WriterReport::default();
    let mut numbers = nhs_numbers(900_000_000 + thread_no * 10_000_000);
    let started = Instant::now();
    let mut conn: Option<Conn> = None;
    while started.elapsed() < LOOP_LIMIT && !gone.load(Ordering::SeqCst) {
        let c = match conn.as_mut() {
            Some(c) if !c.closed => c,
            _ => match Conn::connect(addr) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    if !stopping.load(Ordering::SeqCst) {
                        report
                            .failures
                            .push(format!("connect failed before the stop: {e}"));
                    }
                    break;
                }
            },
        };
        let nhs = numbers.next().expect("NHS numbers");
        let was_stopping = stopping.load(Ordering::SeqCst);
        report.sent += 1;
        match c.post_json("/fhir/Patient", &patient(&nhs, "Crashtest")) {
            Ok(res) => {
                if was_stopping {
                    report.responses_after_stop += 1;
                }
                if res.status == 201 {
                    match res.header("location").and_then(parse_location) {
                        Some((t, id, 1)) if t == "Patient" => {
                            report.acked.insert(id, nhs);
                        }
                        other => report.failures.push(format!(
                            "201 with a bad Location {:?} (parsed {other:?})",
                            res.header("location")
                        )),
                    }
                    if res.header("etag") != Some("W/\"1\"") {
                        report.failures.push(format!(
                            "201 with ETag {:?}, expected W/\"1\"",
                            res.header("etag")
                        ));
                    }
                } else if !stopping.load(Ordering::SeqCst) {
                    report.failures.push(format!(
                        "POST /fhir/Patient -> {} {}",
                        res.status,
                        res.text()
                    ));
                }
            }
            Err(HttpError::Incomplete(m)) => {
                // Only a SIGKILL may cut a response; record it, the caller decides.
                report.failures.push(format!(
                    "incomplete response (stopping={}): {m}",
                    stopping.load(Ordering::SeqCst)
                ));
                conn = None;
            }
            Err(HttpError::NoResponse(e)) => {
                if !stopping.load(Ordering::SeqCst) {
                    report
                        .failures
                        .push(format!("no response before the stop: {e}"));
                    break;
                }
                conn = None; // reconnect; the connect fails once the listener is gone
            }
        }
    }
    report
}

/// Every page of a Bundle-returning GET, following `next` links.
fn all_pages(conn: &mut Conn, first: &str) -> Vec<Value> {
    let mut url = first.to_string();
    let mut pages = Vec::new();
    for _ in 0..1000 {
        let res = conn.get(&url).unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(res.status, 200, "GET {url}: {}", res.text());
        let bundle = res.json();
        let next = bundle["link"]
            .as_array()
            .and_then(|links| links.iter().find(|l| l["relation"] == "next"))
            .and_then(|l| l["url"].as_str())
            .map(origin_form);
        pages.push(bundle);
        match next {
            Some(n) => url = n,
            None => return pages,
        }
    }
    panic!("more than 1000 pages from {first}");
}

/// The first few failures and how many there were in all (a broken server fails every request).
fn summarize(failures: &[String]) -> String {
    let mut out: Vec<String> = failures.iter().take(10).cloned().collect();
    if failures.len() > 10 {
        out.push(format!("... and {} more", failures.len() - 10));
    }
    out.join("\n")
}

fn entries(pages: &[Value]) -> Vec<Value> {
    pages
        .iter()
        .flat_map(|p| p["entry"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// `http://.../fhir/Patient/ID` -> ID
fn id_of_full_url(full_url: &str) -> String {
    full_url.rsplit('/').next().unwrap_or("").to_string()
}

#[test]
fn acknowledged_creates_survive_sigkill() {
    let dir = TempDir::new("crash");
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &dir.path().join("server-1.log"));
    let addr = server.addr;

    let stopping = Arc::new(AtomicBool::new(false));
    let gone = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let (s, g) = (stopping.clone(), gone.clone());
            thread::spawn(move || writer(addr, t, s, g))
        })
        .collect();

    thread::sleep(Duration::from_millis(1500));
    stopping.store(true, Ordering::SeqCst);
    let status = server.kill9();
    gone.store(true, Ordering::SeqCst);
    assert!(
        !status.success(),
        "a SIGKILLed server cannot exit successfully ({status})"
    );
    let log1 = server.log_text();

    let mut sent = 0;
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    let mut failures = Vec::new();
    for w in writers {
        let r = w.join().expect("writer thread panicked");
        sent += r.sent;
        acked.extend(r.acked);
        // A response cut off by SIGKILL is expected; anything else is not.
        failures.extend(
            r.failures
                .into_iter()
                .filter(|f| !f.starts_with("incomplete response (stopping=true)")),
        );
    }
    assert!(
        failures.is_empty(),
        "writers saw failures before the kill:\n{}\nserver log:\n{log1}",
        summarize(&failures)
    );
    assert!(
        acked.len() >= WRITERS as usize,
        "only {} creates acknowledged in 1.5 s by {WRITERS} writers; the test proves little (log:\n{log1})",
        acked.len()
    );
    eprintln!(
        "sent {sent} creates, {} acknowledged before SIGKILL",
        acked.len()
    );

    let mut server = Server::start(&data, &dir.path().join("server-2.log"));
    let mut conn = server.conn();

    // 1. Every acknowledged create is there, at version 1, with what was sent.
    for (id, nhs) in &acked {
        let res = conn
            .get(&format!("/fhir/Patient/{id}"))
            .unwrap_or_else(|e| panic!("GET Patient/{id}: {e}"));
        assert_eq!(
            res.status,
            200,
            "acknowledged Patient/{id} after restart: {}",
            res.text()
        );
        assert_eq!(res.header("etag"), Some("W/\"1\""), "Patient/{id}");
        let body = res.json();
        assert_eq!(body["id"], id.as_str());
        assert_eq!(body["meta"]["versionId"], "1", "Patient/{id}: {body}");
        assert_eq!(
            body["identifier"][0]["value"],
            nhs.as_str(),
            "Patient/{id} holds another NHS number"
        );
        if conn.closed {
            conn = server.conn();
        }
    }

    // 2. What is stored (search) and what history says was created agree exactly, and cover the acked ones.
    let stored: BTreeSet<String> =
        entries(&all_pages(&mut conn, "/fhir/Patient?_count=1000&_sort=_id"))
            .iter()
            .map(|e| e["resource"]["id"].as_str().unwrap_or_default().to_string())
            .collect();
    let count_res = conn
        .get("/fhir/Patient?_summary=count")
        .expect("_summary=count");
    assert_eq!(count_res.status, 200, "{}", count_res.text());
    assert_eq!(
        count_res.json()["total"].as_u64(),
        Some(stored.len() as u64),
        "_summary=count vs paged search"
    );

    let history = entries(&all_pages(&mut conn, "/fhir/Patient/_history?_count=1000"));
    let mut history_ids = BTreeSet::new();
    for e in &history {
        let id = id_of_full_url(e["fullUrl"].as_str().unwrap_or_default());
        assert_eq!(e["request"]["method"], "POST", "history entry {e}");
        assert_eq!(e["response"]["etag"], "W/\"1\"", "history entry {e}");
        assert_eq!(e["resource"]["id"], id.as_str(), "history entry {e}");
        assert!(
            history_ids.insert(id.clone()),
            "Patient/{id} appears twice in _history"
        );
    }
    // 3. The outbox agrees with the store: exactly one `patient.registered` event (version 1, subject_seq 1) per
    //    stored create, strictly increasing seq, and no event for a create the crash rolled back. Read through
    //    the storage port after stopping the server (the outbox has no HTTP feed yet).
    server.sigterm();
    let exit = server
        .wait_exit(Duration::from_secs(10))
        .expect("server exits after SIGTERM");
    assert!(exit.success(), "server exit after SIGTERM: {exit:?}");
    let events = outbox_events(&data);
    let mut event_ids = BTreeSet::new();
    let mut last_seq = 0;
    for e in &events {
        assert!(
            e.seq > last_seq,
            "outbox seq not increasing: {} after {last_seq}",
            e.seq
        );
        last_seq = e.seq;
        assert_eq!(e.kind, "patient.registered", "{e:?}");
        assert_eq!((e.version, e.subject_seq), (1, 1), "{e:?}");
        assert_eq!(e.subject, format!("Patient/{}", e.id), "{e:?}");
        assert!(
            event_ids.insert(e.id.clone()),
            "two events for Patient/{}",
            e.id
        );
    }
    assert_eq!(
        event_ids, stored,
        "outbox events and stored Patients differ"
    );
    assert_eq!(
        history_ids, stored,
        "type _history and the stored Patients differ"
    );
    let missing: Vec<_> = acked.keys().filter(|id| !stored.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged creates lost by the crash: {missing:?}"
    );
    assert!(
        stored.len() <= sent,
        "{} stored but only {sent} requests were sent",
        stored.len()
    );
    eprintln!(
        "{} stored after restart ({} acknowledged, {sent} sent)",
        stored.len(),
        acked.len()
    );
}

#[test]
fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let dir = TempDir::new("sigterm");
    let data = dir.path().join("data");
    let mut server = Server::start(&data, &dir.path().join("server-1.log"));
    let addr = server.addr;

    // Some data so searches return sizeable bodies (a truncated body is then easy to see).
    {
        let mut c = server.conn();
        for nhs in nhs_numbers(990_000_000).take(40) {
            let res = c
                .post_json("/fhir/Patient", &patient(&nhs, "Drain"))
                .expect("seeding");
            assert_eq!(res.status, 201, "seeding: {}", res.text());
        }
    }

    let stopping = Arc::new(AtomicBool::new(false));
    let gone = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for t in 0..4u32 {
        let (s, g) = (stopping.clone(), gone.clone());
        handles.push(thread::spawn(move || writer(addr, t, s, g)));
    }
    for _ in 0..4 {
        let (s, g) = (stopping.clone(), gone.clone());
        handles.push(thread::spawn(move || reader(addr, s, g)));
    }

    // One request certainly in flight at SIGTERM: headers and half the body sent before the signal, the rest
    // after it. A graceful stop must still answer it completely.
    let mut held = server.conn();
    let held_body = serde_json::to_vec(&patient(
        &nhs_numbers(980_000_000).next().expect("nhs"),
        "Held",
    ))
    .expect("json");
    let (first, rest) = held_body.split_at(held_body.len() / 2);
    let head = format!(
        "POST /fhir/Patient HTTP/1.1\r\nHost: {addr}\r\nAccept: application/fhir+json\r\n\
         Content-Type: application/fhir+json\r\nContent-Length: {}\r\n\r\n",
        held_body.len()
    );
    held.write_raw(head.as_bytes())
        .expect("sending the held request's head");
    held.write_raw(first).expect("sending half the held body");

    thread::sleep(Duration::from_millis(700));
    stopping.store(true, Ordering::SeqCst);
    server.sigterm();
    thread::sleep(Duration::from_millis(300));
    let held_result = held
        .write_raw(rest)
        .map_err(HttpError::NoResponse)
        .and_then(|()| held.read());
    let status = server.wait_exit(Duration::from_secs(15));
    gone.store(true, Ordering::SeqCst);
    let log = server.log_text();

    let mut acked = BTreeMap::new();
    let mut failures = Vec::new();
    let mut after_stop = 0;
    let mut sent = 0;
    for h in handles {
        let r = h.join().expect("client thread panicked");
        sent += r.sent;
        after_stop += r.responses_after_stop;
        acked.extend(r.acked);
        failures.extend(r.failures);
    }
    let status = status
        .unwrap_or_else(|| panic!("the server did not exit within 15 s of SIGTERM; log:\n{log}"));
    match &held_result {
        Ok(res) if res.status == 201 => match res.header("location").and_then(parse_location) {
            Some((_, id, 1)) => {
                acked.insert(id, "held".to_string());
            }
            other => failures.push(format!("held request: 201 with Location {other:?}")),
        },
        Ok(res) => failures.push(format!("held request -> {} {}", res.status, res.text())),
        Err(e) => failures.push(format!(
            "the request in flight at SIGTERM got no complete response: {e}"
        )),
    }
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}; log:\n{log}"
    );
    assert!(
        failures.is_empty(),
        "client failures around SIGTERM:\n{}\nserver log:\n{log}",
        summarize(&failures)
    );
    eprintln!(
        "{sent} requests, {after_stop} complete responses after SIGTERM, {} creates acknowledged",
        acked.len()
    );

    // Everything acknowledged before or during the drain is durable.
    let server = Server::start(&data, &dir.path().join("server-2.log"));
    let mut conn = server.conn();
    for id in acked.keys() {
        let res = conn
            .get(&format!("/fhir/Patient/{id}"))
            .expect("GET after restart");
        assert_eq!(
            res.status,
            200,
            "acknowledged Patient/{id} after a graceful stop: {}",
            res.text()
        );
    }
}

/// GET searches in a loop (larger bodies than creates); every response must be complete JSON.
fn reader(addr: SocketAddr, stopping: Arc<AtomicBool>, gone: Arc<AtomicBool>) -> WriterReport {
    let mut report = WriterReport::default();
    let started = Instant::now();
    let mut conn: Option<Conn> = None;
    while started.elapsed() < LOOP_LIMIT && !gone.load(Ordering::SeqCst) {
        let c = match conn.as_mut() {
            Some(c) if !c.closed => c,
            _ => match Conn::connect(addr) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    if !stopping.load(Ordering::SeqCst) {
                        report
                            .failures
                            .push(format!("connect failed before SIGTERM: {e}"));
                    }
                    break;
                }
            },
        };
        let was_stopping = stopping.load(Ordering::SeqCst);
        report.sent += 1;
        match c.get("/fhir/Patient?family=Drain&_count=40") {
            Ok(res) => {
                if was_stopping {
                    report.responses_after_stop += 1;
                }
                let parsed: Result<Value, _> = serde_json::from_slice(&res.body);
                match (res.status, parsed) {
                    (200, Ok(b)) if b["resourceType"] == "Bundle" => {}
                    (status, Ok(b))
                        if stopping.load(Ordering::SeqCst)
                            && b["resourceType"] == "OperationOutcome" =>
                    {
                        // A complete refusal during the drain (e.g. 503) is a complete response.
                        let _ = status;
                    }
                    (status, _) => report
                        .failures
                        .push(format!("search -> {status}: {}", res.text())),
                }
            }
            Err(HttpError::Incomplete(m)) => {
                report
                    .failures
                    .push(format!("incomplete search response: {m}"));
                conn = None;
            }
            Err(HttpError::NoResponse(e)) => {
                if !stopping.load(Ordering::SeqCst) {
                    report
                        .failures
                        .push(format!("no response before SIGTERM: {e}"));
                    break;
                }
                conn = None;
            }
        }
    }
    report
}

/// A supervisor may stop the hub the moment it reports readiness: SIGTERM right after the `listening on` line
/// must still be a graceful stop (exit 0), so the handler has to be in place before that line is printed.
#[test]
fn sigterm_right_after_listening_exits_zero() {
    let dir = TempDir::new("early-sigterm");
    let mut codes = Vec::new();
    for round in 0..5 {
        let data = dir.path().join(format!("data-{round}"));
        let mut server = Server::start(&data, &dir.path().join(format!("server-{round}.log")));
        server.sigterm();
        let status = server.wait_exit(Duration::from_secs(10));
        codes.push(
            status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "still running after 10 s".into()),
        );
    }
    assert!(
        codes.iter().all(|c| c == "exit status: 0"),
        "SIGTERM right after 'listening on' did not stop the server gracefully in every round: {codes:?}"
    );
}

/// Every outbox event of a stopped hub's embedded store, read through the storage port.
fn outbox_events(data: &std::path::Path) -> Vec<store::Event> {
    use store::Store;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let st = store_sqlite::SqliteStore::open(data, store_sqlite::SqliteOptions::default())
            .expect("reopen store");
        let mut out = Vec::new();
        loop {
            let after = out.last().map(|e: &store::Event| e.seq).unwrap_or(0);
            let page = st.events_after(after, 1000).await.expect("events");
            if page.is_empty() {
                break;
            }
            out.extend(page);
        }
        out
    })
}
