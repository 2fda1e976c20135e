//! In-process tests of the FHIR REST API over the embedded store (the router driven directly, no sockets).
//! The same behaviours are exercised over real HTTP by a real FHIR client library in `tests/python`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use store::Store;
use tower::ServiceExt;

mod inproc;
use inproc::Hub;

fn hub() -> Hub {
    inproc::hub("api-test")
}

struct Res {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
    raw: String,
}

impl Res {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn call(
    h: &Hub,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Res {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/fhir+json");
            Body::from(b.to_string())
        }
        None => Body::empty(),
    };
    let res = h
        .app
        .clone()
        .oneshot(req.body(body).expect("request"))
        .await
        .expect("response");
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = axum::body::to_bytes(res.into_body(), 64 << 20)
        .await
        .expect("body");
    let raw = String::from_utf8_lossy(&bytes).into_owned();
    let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
    Res {
        status,
        headers,
        body,
        raw,
    }
}

fn patient(nhs: &str, family: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs}],
        "name": [{"use": "official", "family": family, "given": ["Jo"]}],
        "gender": "female",
        "birthDate": "1980-04-01",
        "address": [{"postalCode": "LS1 4AP"}]
    })
}

fn strip_meta(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("id");
        o.remove("meta");
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_read_update_delete_history() {
    let h = hub();
    let p = patient("9000000009", "Smith");
    let r = call(&h, "POST", "/fhir/Patient", &[], Some(&p)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.raw);
    assert_eq!(r.header("etag"), "W/\"1\"");
    assert!(r.header("last-modified").ends_with("GMT"));
    let id = r.body["id"].as_str().expect("id").to_string();
    assert_eq!(
        r.header("location"),
        format!("http://hub.test/fhir/Patient/{id}/_history/1")
    );
    assert_eq!(r.body["meta"]["versionId"], "1");
    assert_eq!(strip_meta(r.body.clone()), p);

    let read = call(&h, "GET", &format!("/fhir/Patient/{id}"), &[], None).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.body, r.body);

    let mut changed = read.body.clone();
    changed["gender"] = json!("male");
    let up = call(
        &h,
        "PUT",
        &format!("/fhir/Patient/{id}"),
        &[("if-match", "W/\"1\"")],
        Some(&changed),
    )
    .await;
    assert_eq!(up.status, StatusCode::OK, "{}", up.raw);
    assert_eq!(up.header("etag"), "W/\"2\"");

    let stale = call(
        &h,
        "PUT",
        &format!("/fhir/Patient/{id}"),
        &[("if-match", "W/\"1\"")],
        Some(&changed),
    )
    .await;
    assert_eq!(
        stale.status,
        StatusCode::PRECONDITION_FAILED,
        "{}",
        stale.raw
    );
    assert_eq!(stale.body["resourceType"], "OperationOutcome");

    let v1 = call(
        &h,
        "GET",
        &format!("/fhir/Patient/{id}/_history/1"),
        &[],
        None,
    )
    .await;
    assert_eq!(v1.body["gender"], "female");

    let del = call(&h, "DELETE", &format!("/fhir/Patient/{id}"), &[], None).await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    let gone = call(&h, "GET", &format!("/fhir/Patient/{id}"), &[], None).await;
    assert_eq!(gone.status, StatusCode::GONE);

    let hist = call(
        &h,
        "GET",
        &format!("/fhir/Patient/{id}/_history"),
        &[],
        None,
    )
    .await;
    assert_eq!(hist.body["type"], "history");
    let methods: Vec<&str> = hist.body["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["request"]["method"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(methods, ["DELETE", "PUT", "POST"]);

    // Events: registered, updated, deleted with a gap-free per-subject sequence, in the same order.
    let events = h.store.events_after(0, 100).await.expect("events");
    let mine: Vec<(String, i64)> = events
        .iter()
        .filter(|e| e.subject == format!("Patient/{id}"))
        .map(|e| (e.kind.clone(), e.subject_seq))
        .collect();
    assert_eq!(
        mine,
        [
            ("patient.registered".to_string(), 1),
            ("patient.updated".to_string(), 2),
            ("patient.deleted".to_string(), 3)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_as_create_and_id_mismatch() {
    let h = hub();
    let mut p = patient("9000000025", "Jones");
    p["id"] = json!("pat-1");
    let r = call(&h, "PUT", "/fhir/Patient/pat-1", &[], Some(&p)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.raw);
    let r = call(&h, "PUT", "/fhir/Patient/pat-2", &[], Some(&p)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["issue"][0]["expression"][0], "Patient.id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_conditional_creates_make_one_resource() {
    let h = Arc::new(hub());
    let p = patient("9000000033", "Race");
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let h = h.clone();
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let r = call(
                &h,
                "POST",
                "/fhir/Patient",
                &[(
                    "if-none-exist",
                    "identifier=https://fhir.nhs.uk/Id/nhs-number|9000000033",
                )],
                Some(&p),
            )
            .await;
            (r.status, r.body["id"].as_str().unwrap_or("").to_string())
        }));
    }
    let mut ids = std::collections::HashSet::new();
    let mut created = 0;
    for t in tasks {
        let (status, id) = t.await.expect("task");
        assert!(
            status == StatusCode::CREATED || status == StatusCode::OK,
            "{status}"
        );
        created += usize::from(status == StatusCode::CREATED);
        ids.insert(id);
    }
    assert_eq!(created, 1);
    assert_eq!(ids.len(), 1);
    let count = call(
        &h,
        "GET",
        "/fhir/Patient?identifier=9000000033&_summary=count",
        &[],
        None,
    )
    .await;
    assert_eq!(count.body["total"], 1, "{}", count.raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_replays_and_refuses_reuse() {
    let h = hub();
    let p = patient("9111231130", "Key");
    let a = call(
        &h,
        "POST",
        "/fhir/Patient",
        &[("idempotency-key", "k-1")],
        Some(&p),
    )
    .await;
    let b = call(
        &h,
        "POST",
        "/fhir/Patient",
        &[("idempotency-key", "k-1")],
        Some(&p),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(b.status, StatusCode::CREATED);
    assert_eq!(a.body["id"], b.body["id"]);
    assert_eq!(b.header("idempotent-replayed"), "true");
    let other = patient("9990548609", "Other");
    let c = call(
        &h,
        "POST",
        "/fhir/Patient",
        &[("idempotency-key", "k-1")],
        Some(&other),
    )
    .await;
    assert_eq!(c.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", c.raw);
    let all = call(&h, "GET", "/fhir/Patient?_summary=count", &[], None).await;
    assert_eq!(all.body["total"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_resources_are_refused_with_locations_and_nothing_is_stored() {
    let h = hub();
    let bad = patient("9000000001", "Bad");
    let r = call(&h, "POST", "/fhir/Patient", &[], Some(&bad)).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.raw);
    assert_eq!(r.body["resourceType"], "OperationOutcome");
    let exprs: Vec<String> = r.body["issue"]
        .as_array()
        .expect("issues")
        .iter()
        .flat_map(|i| i["expression"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e.as_str().map(str::to_string))
        .collect();
    assert!(
        exprs.iter().any(|e| e == "Patient.identifier[0].value"),
        "{exprs:?}"
    );

    let r = call(&h, "POST", "/fhir/Patient", &[], None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let not_json = Request::builder()
        .method("POST")
        .uri("/fhir/Patient")
        .header("content-type", "application/fhir+json")
        .body(Body::from("{not json"))
        .expect("req");
    let res = h.app.clone().oneshot(not_json).await.expect("res");
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);

    let all = call(&h, "GET", "/fhir/Patient?_summary=count", &[], None).await;
    assert_eq!(all.body["total"], 0);
    assert!(
        h.store
            .events_after(0, 10)
            .await
            .expect("events")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_negotiation_and_request_ids() {
    let h = hub();
    let r = call(
        &h,
        "GET",
        "/fhir/metadata",
        &[("accept", "application/fhir+xml")],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_ACCEPTABLE);
    assert_eq!(r.body["resourceType"], "OperationOutcome");
    let req = Request::builder()
        .method("POST")
        .uri("/fhir/Patient")
        .header("content-type", "application/fhir+xml")
        .body(Body::from("<Patient/>"))
        .expect("req");
    let res = h.app.clone().oneshot(req).await.expect("res");
    assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let r = call(
        &h,
        "GET",
        "/fhir/metadata",
        &[("x-request-id", "abc"), ("x-correlation-id", "flow-1")],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-request-id"), "abc");
    assert_eq!(r.header("x-correlation-id"), "flow-1");
    assert_eq!(r.body["fhirVersion"], "4.0.1");
    let r = call(&h, "GET", "/health", &[], None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!r.header("x-request-id").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_paging_sort_summary_and_prefer() {
    let h = hub();
    let numbers = [
        "9000000009",
        "9000000025",
        "9000000033",
        "9111231130",
        "9990548609",
    ];
    for (i, n) in numbers.iter().enumerate() {
        let mut p = patient(n, &format!("Family{i}"));
        p["birthDate"] = json!(format!("19{}0-01-01", 5 + i));
        let r = call(
            &h,
            "POST",
            "/fhir/Patient",
            &[("prefer", "return=minimal")],
            Some(&p),
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED);
        assert!(r.raw.is_empty());
    }
    let r = call(
        &h,
        "GET",
        "/fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|9111231130",
        &[],
        None,
    )
    .await;
    assert_eq!(
        r.body["entry"].as_array().map(Vec::len),
        Some(1),
        "{}",
        r.raw
    );
    assert_eq!(r.body["entry"][0]["search"]["mode"], "match");

    let r = call(
        &h,
        "GET",
        "/fhir/Patient?_count=2&_sort=-birthdate",
        &[],
        None,
    )
    .await;
    let fams: Vec<&str> = r.body["entry"]
        .as_array()
        .expect("e")
        .iter()
        .map(|e| e["resource"]["name"][0]["family"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(fams, ["Family4", "Family3"]);
    let next = r.body["link"]
        .as_array()
        .expect("links")
        .iter()
        .find(|l| l["relation"] == "next")
        .expect("next link");
    let next_url = next["url"]
        .as_str()
        .expect("url")
        .replace("http://hub.test", "");
    let r2 = call(&h, "GET", &next_url, &[], None).await;
    let fams: Vec<&str> = r2.body["entry"]
        .as_array()
        .expect("e")
        .iter()
        .map(|e| e["resource"]["name"][0]["family"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(fams, ["Family2", "Family1"]);

    let r = call(
        &h,
        "GET",
        "/fhir/Patient?birthdate=ge1970-01-01&_summary=count",
        &[],
        None,
    )
    .await;
    assert_eq!(r.body["total"], 3, "{}", r.raw);
    let r = call(&h, "GET", "/fhir/Patient?family=family1", &[], None).await;
    assert_eq!(
        r.body["entry"].as_array().map(Vec::len),
        Some(1),
        "{}",
        r.raw
    );
    let r = call(&h, "GET", "/fhir/Patient?colour=blue", &[], None).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.body["issue"][0]["diagnostics"]
            .as_str()
            .unwrap_or("")
            .contains("colour")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn include_follows_references() {
    let h = hub();
    let org = call(&h, "POST", "/fhir/Organization", &[], Some(&json!({
        "resourceType": "Organization",
        "identifier": [{"system": "https://fhir.nhs.uk/Id/ods-organisation-code", "value": "RR8"}],
        "name": "Leeds Teaching Hospitals"
    }))).await;
    assert_eq!(org.status, StatusCode::CREATED, "{}", org.raw);
    // ODS system spelling normalised on input.
    assert_eq!(
        org.body["identifier"][0]["system"],
        "https://fhir.nhs.uk/Id/ods-organization-code"
    );
    let org_id = org.body["id"].as_str().expect("id");
    let sched = call(
        &h,
        "POST",
        "/fhir/Schedule",
        &[],
        Some(&json!({
            "resourceType": "Schedule",
            "active": true,
            "actor": [{"reference": format!("Organization/{org_id}")}]
        })),
    )
    .await;
    assert_eq!(sched.status, StatusCode::CREATED, "{}", sched.raw);
    let r = call(
        &h,
        "GET",
        &format!("/fhir/Schedule?actor=Organization/{org_id}&_include=Schedule:actor"),
        &[],
        None,
    )
    .await;
    let modes: Vec<&str> = r.body["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["search"]["mode"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(modes, ["match", "include"], "{}", r.raw);
}
