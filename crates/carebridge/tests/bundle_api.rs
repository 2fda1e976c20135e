//! `POST /fhir` with batch and transaction Bundles, in-process: a transaction that books a slot through
//! `urn:uuid` references, all-or-nothing rollback (resources and outbox events), conditional create inside a
//! transaction, a batch whose bad entry does not stop the others, refused Bundle types, `Idempotency-Key`,
//! and the library entry point `api::bundle::process_bundle`.

// Test code: a failed expectation is a test failure.
#![allow(clippy::expect_used)]

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use serde_json::{Value, json};
use store::Store;
use tower::ServiceExt;

mod inproc;
use inproc::Hub;

const NHS: &str = "https://fhir.nhs.uk/Id/nhs-number";
/// A Monday far enough ahead to stay in the future.
const START: &str = "2031-03-03T09:00:00Z";
const END: &str = "2031-03-03T09:15:00Z";

fn hub() -> Hub {
    inproc::hub("bundle-test")
}

struct Res {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
    raw: String,
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
    Res {
        status,
        headers,
        body: serde_json::from_str(&raw).unwrap_or(Value::Null),
        raw,
    }
}

async fn post_bundle(h: &Hub, bundle: &Value) -> Res {
    call(h, "POST", "/fhir", &[], Some(bundle)).await
}

async fn get(h: &Hub, uri: &str) -> Res {
    call(h, "GET", uri, &[], None).await
}

/// How many live resources a search finds.
async fn count(h: &Hub, query: &str) -> u64 {
    let r = get(
        h,
        &format!(
            "{query}{}_summary=count",
            if query.contains('?') { "&" } else { "?" }
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.raw);
    r.body["total"].as_u64().expect("total")
}

fn patient(nhs: &str, family: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": NHS, "value": nhs}],
        "name": [{"family": family, "given": ["Test"]}],
        "gender": "female",
        "birthDate": "1980-02-03"
    })
}

fn entry(full_url: &str, resource: Value, method: &str, url: &str) -> Value {
    json!({"fullUrl": full_url, "resource": resource, "request": {"method": method, "url": url}})
}

fn appointment(patient_ref: &str, slot_ref: &str) -> Value {
    json!({
        "resourceType": "Appointment",
        "status": "booked",
        "start": START,
        "end": END,
        "slot": [{"reference": slot_ref}],
        "participant": [{"actor": {"reference": patient_ref}, "status": "accepted"}]
    })
}

/// A transaction that registers a patient, a practitioner, an active schedule and a free slot, and books
/// the slot, all linked through `urn:uuid` fullUrls. The appointment is deliberately listed first.
fn booking_transaction(nhs: &str) -> Value {
    json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            entry("urn:uuid:7f000001-0000-4000-8000-000000000005",
                appointment("urn:uuid:7f000001-0000-4000-8000-000000000001", "urn:uuid:7f000001-0000-4000-8000-000000000004"),
                "POST", "Appointment"),
            entry("urn:uuid:7f000001-0000-4000-8000-000000000001", patient(nhs, "Okafor"), "POST", "Patient"),
            entry("urn:uuid:7f000001-0000-4000-8000-000000000002",
                json!({"resourceType": "Practitioner", "name": [{"family": "Lind", "given": ["Ada"]}]}),
                "POST", "Practitioner"),
            entry("urn:uuid:7f000001-0000-4000-8000-000000000003",
                json!({"resourceType": "Schedule", "active": true,
                       "actor": [{"reference": "urn:uuid:7f000001-0000-4000-8000-000000000002"}]}),
                "POST", "Schedule"),
            entry("urn:uuid:7f000001-0000-4000-8000-000000000004",
                json!({"resourceType": "Slot", "status": "free", "start": START, "end": END,
                       "schedule": {"reference": "urn:uuid:7f000001-0000-4000-8000-000000000003"}}),
                "POST", "Slot"),
        ]
    })
}

fn id_of(entry: &Value) -> String {
    entry["resource"]["id"].as_str().expect("id").to_string()
}

#[tokio::test]
async fn transaction_books_a_slot_through_urn_uuid_references() {
    let h = hub();
    let r = post_bundle(&h, &booking_transaction("9000000009")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.raw);
    assert_eq!(r.body["resourceType"], "Bundle");
    assert_eq!(r.body["type"], "transaction-response");
    let entries = r.body["entry"].as_array().expect("entries");
    assert_eq!(entries.len(), 5, "{}", r.raw);
    // One response entry per request entry, in request order.
    let types: Vec<&str> = entries
        .iter()
        .map(|e| e["resource"]["resourceType"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        types,
        ["Appointment", "Patient", "Practitioner", "Schedule", "Slot"]
    );
    for e in entries {
        let resp = &e["response"];
        assert_eq!(resp["status"], "201 Created", "{e}");
        let id = id_of(e);
        let rtype = e["resource"]["resourceType"].as_str().expect("type");
        assert_eq!(
            resp["location"],
            format!("http://hub.test/fhir/{rtype}/{id}/_history/1")
        );
        assert_eq!(resp["etag"], "W/\"1\"");
        assert!(
            resp["lastModified"]
                .as_str()
                .is_some_and(|s| s.ends_with('Z')),
            "{e}"
        );
        assert_eq!(e["fullUrl"], format!("http://hub.test/fhir/{rtype}/{id}"));
    }
    let (appt, patient, practitioner, schedule, slot) = (
        id_of(&entries[0]),
        id_of(&entries[1]),
        id_of(&entries[2]),
        id_of(&entries[3]),
        id_of(&entries[4]),
    );

    // References were rewritten to the server-assigned ids, at every depth, in what was stored.
    let stored = get(&h, &format!("/fhir/Appointment/{appt}")).await;
    assert_eq!(stored.status, StatusCode::OK);
    assert_eq!(stored.body["slot"][0]["reference"], format!("Slot/{slot}"));
    assert_eq!(
        stored.body["participant"][0]["actor"]["reference"],
        format!("Patient/{patient}")
    );
    let sched = get(&h, &format!("/fhir/Schedule/{schedule}")).await;
    assert_eq!(
        sched.body["actor"][0]["reference"],
        format!("Practitioner/{practitioner}")
    );
    assert!(!stored.raw.contains("urn:uuid"), "{}", stored.raw);

    // The booking claimed the slot (the Slot entry came after the Appointment in the Bundle).
    let s = get(&h, &format!("/fhir/Slot/{slot}")).await;
    assert_eq!(s.body["status"], "busy", "{}", s.raw);
    assert_eq!(s.body["meta"]["versionId"], "2");
    // Searchable by the rewritten references.
    assert_eq!(
        count(&h, &format!("/fhir/Appointment?patient=Patient/{patient}")).await,
        1
    );

    // The outbox got every event of the transaction, the booking's included.
    let events = h.store.events_after(0, 100).await.expect("events");
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    for kind in [
        "patient.registered",
        "practitioner.created",
        "schedule.created",
        "slot.created",
        "appointment.booked",
        "slot.claimed",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    let booked = kinds.iter().position(|k| *k == "appointment.booked");
    let claimed = kinds.iter().position(|k| *k == "slot.claimed");
    assert!(booked < claimed, "{kinds:?}");
}

#[tokio::test]
async fn a_refused_last_entry_leaves_the_store_unchanged() {
    let h = hub();
    // The same booking, plus a second appointment for the same slot as the last entry: the slot is taken
    // by then, so the booking engine refuses it and nothing of the transaction may remain.
    let mut bundle = booking_transaction("9000000025");
    let entries = bundle["entry"].as_array_mut().expect("entries");
    entries.push(entry(
        "urn:uuid:7f000001-0000-4000-8000-000000000006",
        appointment(
            "urn:uuid:7f000001-0000-4000-8000-000000000001",
            "urn:uuid:7f000001-0000-4000-8000-000000000004",
        ),
        "POST",
        "Appointment",
    ));
    let r = post_bundle(&h, &bundle).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.raw);
    assert_eq!(r.body["resourceType"], "OperationOutcome", "{}", r.raw);
    let issue = &r.body["issue"][0];
    assert_eq!(issue["severity"], "error");
    assert!(
        issue["diagnostics"]
            .as_str()
            .is_some_and(|d| d.starts_with("Bundle.entry[5] (POST Appointment)")),
        "{}",
        r.raw
    );
    assert!(
        issue["expression"].as_array().is_some_and(|x| x
            .iter()
            .all(|e| e.as_str().is_some_and(|e| e.starts_with("Bundle.entry[5]")))),
        "{}",
        r.raw
    );

    // Nothing was written: no resources of any type, no outbox events.
    for t in ["Patient", "Practitioner", "Schedule", "Slot", "Appointment"] {
        assert_eq!(count(&h, &format!("/fhir/{t}")).await, 0, "{t}");
        let history = get(&h, &format!("/fhir/{t}/_history")).await;
        assert!(
            history.body["entry"].as_array().is_none_or(Vec::is_empty),
            "{}",
            history.raw
        );
    }
    assert!(
        h.store
            .events_after(0, 100)
            .await
            .expect("events")
            .is_empty()
    );

    // An invalid last resource is refused before the store, located inside the Bundle.
    let mut bundle = booking_transaction("9000000025");
    let entries = bundle["entry"].as_array_mut().expect("entries");
    entries.push(entry(
        "urn:uuid:7f000001-0000-4000-8000-000000000007",
        json!({"resourceType": "Appointment", "status": "sleeping", "participant": [
            {"actor": {"reference": "urn:uuid:7f000001-0000-4000-8000-000000000001"}, "status": "accepted"}]}),
        "POST",
        "Appointment",
    ));
    let r = post_bundle(&h, &bundle).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.raw);
    let exprs: Vec<&str> = r.body["issue"]
        .as_array()
        .expect("issues")
        .iter()
        .flat_map(|i| i["expression"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    assert!(
        exprs.contains(&"Bundle.entry[5].resource.status"),
        "{}",
        r.raw
    );
    assert!(
        h.store
            .events_after(0, 100)
            .await
            .expect("events")
            .is_empty()
    );

    // A stale ifMatch on the last entry: 412, and the earlier entries of the transaction are undone too.
    let created = call(
        &h,
        "POST",
        "/fhir/Patient",
        &[],
        Some(&patient("9000000033", "Stale")),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.raw);
    let pid = created.body["id"].as_str().expect("id").to_string();
    let mut changed = created.body.clone();
    changed["name"][0]["family"] = json!("Changed");
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        entry("urn:uuid:1", json!({"resourceType": "Organization", "name": "Practice"}), "POST", "Organization"),
        {"resource": changed, "request": {"method": "PUT", "url": format!("Patient/{pid}"), "ifMatch": "W/\"7\""}}
    ]});
    let r = post_bundle(&h, &bundle).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED, "{}", r.raw);
    assert!(
        r.raw.contains("Bundle.entry[1].request.ifMatch"),
        "{}",
        r.raw
    );
    assert_eq!(count(&h, "/fhir/Organization").await, 0);
    let p = get(&h, &format!("/fhir/Patient/{pid}")).await;
    assert_eq!(p.body["meta"]["versionId"], "1");
    assert_eq!(h.store.events_after(0, 100).await.expect("events").len(), 1);
}

#[tokio::test]
async fn conditional_create_inside_a_transaction_reuses_the_existing_id() {
    let h = hub();
    let existing = call(
        &h,
        "POST",
        "/fhir/Patient",
        &[],
        Some(&patient("9111231130", "Known")),
    )
    .await;
    assert_eq!(existing.status, StatusCode::CREATED, "{}", existing.raw);
    let pid = existing.body["id"].as_str().expect("id").to_string();

    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:9d5bbd4c-0d0a-4a44-9a49-5f8f9d7a0001",
         "resource": patient("9111231130", "Duplicate"),
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": format!("identifier={NHS}|9111231130")}},
        {"fullUrl": "urn:uuid:9d5bbd4c-0d0a-4a44-9a49-5f8f9d7a0002",
         "resource": {"resourceType": "Schedule", "active": true,
                      "actor": [{"reference": "urn:uuid:9d5bbd4c-0d0a-4a44-9a49-5f8f9d7a0001"}]},
         "request": {"method": "POST", "url": "Schedule"}},
        {"request": {"method": "GET", "url": format!("Schedule?actor=Patient/{pid}")}}
    ]});
    let r = post_bundle(&h, &bundle).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.raw);
    let entries = r.body["entry"].as_array().expect("entries");
    assert_eq!(entries[0]["response"]["status"], "200 OK", "{}", r.raw);
    assert_eq!(id_of(&entries[0]), pid);
    assert_eq!(entries[0]["resource"]["name"][0]["family"], "Known");
    assert_eq!(
        entries[0]["response"]["location"],
        format!("http://hub.test/fhir/Patient/{pid}/_history/1")
    );
    assert_eq!(entries[1]["response"]["status"], "201 Created");
    assert_eq!(
        entries[1]["resource"]["actor"][0]["reference"],
        format!("Patient/{pid}")
    );
    // The GET ran last, inside the transaction: it sees the schedule the transaction created.
    assert_eq!(entries[2]["response"]["status"], "200 OK");
    assert_eq!(entries[2]["resource"]["type"], "searchset");
    assert_eq!(entries[2]["resource"]["total"], 1, "{}", r.raw);
    assert_eq!(
        entries[2]["resource"]["entry"][0]["resource"]["id"],
        entries[1]["resource"]["id"]
    );
    assert_eq!(
        count(&h, &format!("/fhir/Patient?identifier={NHS}|9111231130")).await,
        1
    );

    // Without a match the entry creates, and references follow the new id.
    let mut again = bundle.clone();
    again["entry"][0]["request"]["ifNoneExist"] = json!(format!("identifier={NHS}|9990548609"));
    again["entry"][0]["resource"] = patient("9990548609", "New");
    again["entry"][2]["request"]["url"] =
        json!("Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|9990548609");
    let r = post_bundle(&h, &again).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.raw);
    let entries = r.body["entry"].as_array().expect("entries");
    assert_eq!(entries[0]["response"]["status"], "201 Created");
    let new_id = id_of(&entries[0]);
    assert_ne!(new_id, pid);
    assert_eq!(
        entries[1]["resource"]["actor"][0]["reference"],
        format!("Patient/{new_id}")
    );
    assert_eq!(entries[2]["resource"]["total"], 1, "{}", r.raw);

    // A condition that matches several resources fails the whole transaction with 412.
    for family in ["Twin", "Twin"] {
        let p = json!({"resourceType": "Patient", "name": [{"family": family}]});
        assert_eq!(
            call(&h, "POST", "/fhir/Patient", &[], Some(&p))
                .await
                .status,
            StatusCode::CREATED
        );
    }
    let before = h.store.events_after(0, 1000).await.expect("events").len();
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        entry("urn:uuid:a", json!({"resourceType": "Organization", "name": "Kept out"}), "POST", "Organization"),
        {"resource": {"resourceType": "Patient", "name": [{"family": "Twin"}]},
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": "family=Twin"}}
    ]});
    let r = post_bundle(&h, &bundle).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED, "{}", r.raw);
    assert!(
        r.raw.contains("Bundle.entry[1].request.ifNoneExist"),
        "{}",
        r.raw
    );
    assert_eq!(
        h.store.events_after(0, 1000).await.expect("events").len(),
        before
    );
}

#[tokio::test]
async fn batch_applies_good_entries_and_reports_the_bad_one() {
    let h = hub();
    let known = call(
        &h,
        "POST",
        "/fhir/Patient",
        &[],
        Some(&patient("9000000009", "Batch")),
    )
    .await;
    let kid = known.body["id"].as_str().expect("id").to_string();
    let doomed = call(
        &h,
        "POST",
        "/fhir/Organization",
        &[],
        Some(&json!({"resourceType": "Organization", "name": "Gone"})),
    )
    .await;
    let oid = doomed.body["id"].as_str().expect("id").to_string();

    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": patient("9000000025", "Good"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "gender": "sometimes"}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Location", "id": "loc-1", "name": "Clinic room 1", "status": "active"},
         "request": {"method": "PUT", "url": "Location/loc-1"}},
        {"request": {"method": "DELETE", "url": format!("Organization/{oid}")}},
        {"request": {"method": "GET", "url": format!("Patient/{kid}")}},
        {"request": {"method": "GET", "url": "Patient?family=Good"}},
        {"request": {"method": "GET", "url": "Patient/does-not-exist"}},
        {"request": {"method": "PATCH", "url": format!("Patient/{kid}")}}
    ]});
    let r = post_bundle(&h, &bundle).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.raw);
    assert_eq!(r.body["type"], "batch-response");
    let e = r.body["entry"].as_array().expect("entries");
    assert_eq!(e.len(), 8);
    let status = |i: usize| {
        e[i]["response"]["status"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(status(0), "201 Created");
    assert_eq!(status(1), "422 Unprocessable Entity");
    assert_eq!(
        e[1]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert!(
        e[1]["response"]["outcome"]
            .to_string()
            .contains("Patient.gender"),
        "{}",
        r.raw
    );
    assert!(e[1].get("resource").is_none());
    assert_eq!(status(2), "201 Created");
    assert_eq!(status(3), "204 No Content");
    assert_eq!(e[3]["response"]["etag"], "W/\"2\"");
    assert_eq!(status(4), "200 OK");
    assert_eq!(e[4]["resource"]["id"], kid.as_str());
    assert_eq!(e[4]["response"]["etag"], "W/\"1\"");
    assert_eq!(status(5), "200 OK");
    assert_eq!(e[5]["resource"]["type"], "searchset");
    assert_eq!(e[5]["resource"]["total"], 1, "{}", r.raw);
    assert_eq!(status(6), "404 Not Found");
    assert_eq!(
        e[6]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(status(7), "400 Bad Request");

    // The good entries were applied, the bad one was not.
    assert_eq!(count(&h, "/fhir/Patient?family=Good").await, 1);
    assert_eq!(count(&h, "/fhir/Patient").await, 2);
    assert_eq!(get(&h, "/fhir/Location/loc-1").await.status, StatusCode::OK);
    assert_eq!(
        get(&h, &format!("/fhir/Organization/{oid}")).await.status,
        StatusCode::GONE
    );
}

#[tokio::test]
async fn bundles_of_other_types_and_malformed_bundles_are_refused() {
    let h = hub();
    for kind in ["collection", "message", "document", "searchset"] {
        let b = json!({"resourceType": "Bundle", "type": kind, "entry": [
            {"resource": patient("9000000009", "X"), "request": {"method": "POST", "url": "Patient"}}
        ]});
        let r = post_bundle(&h, &b).await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{kind}: {}",
            r.raw
        );
        assert_eq!(r.body["issue"][0]["code"], "not-supported");
        assert_eq!(r.body["issue"][0]["expression"][0], "Bundle.type");
        assert!(r.raw.contains(kind));
    }
    let r = post_bundle(&h, &json!({"resourceType": "Bundle"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.raw);
    let r = post_bundle(&h, &patient("9000000009", "NotABundle")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.raw);
    assert!(r.raw.contains("POST /fhir/Patient"), "{}", r.raw);
    let r = call(
        &h,
        "POST",
        "/fhir",
        &[("content-type", "application/fhir+json")],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.raw);

    // Transaction entries that cannot be processed fail the whole transaction before anything is written.
    let cases = [
        (
            json!({"resource": patient("9000000009", "A")}),
            "Bundle.entry[0].request",
        ),
        (
            json!({"resource": patient("9000000009", "A"), "request": {"method": "POST", "url": "Patient/1"}}),
            "Bundle.entry[0].request.url",
        ),
        (
            json!({"request": {"method": "DELETE", "url": "Patient?family=A"}}),
            "Bundle.entry[0].request.url",
        ),
        (
            json!({"resource": {"resourceType": "Appointment", "status": "proposed",
                    "participant": [{"actor": {"reference": "urn:uuid:nowhere"}, "status": "accepted"}]},
                   "request": {"method": "POST", "url": "Appointment"}}),
            "Bundle.entry[0].resource.participant[0].actor.reference",
        ),
        (
            json!({"resource": patient("9000000009", "A"), "request": {"method": "POST", "url": "Organization"}}),
            "Bundle.entry[0].resource.resourceType",
        ),
    ];
    for (bad, at) in cases {
        let b = json!({"resourceType": "Bundle", "type": "transaction", "entry": [bad]});
        let r = post_bundle(&h, &b).await;
        assert!(r.status.is_client_error(), "{at}: {}", r.raw);
        assert!(r.raw.contains(at), "expected {at} in {}", r.raw);
    }
    assert!(
        h.store
            .events_after(0, 100)
            .await
            .expect("events")
            .is_empty()
    );

    // The CapabilityStatement says what POST /fhir does.
    let cs = get(&h, "/fhir/metadata").await;
    let codes: Vec<&str> = cs.body["rest"][0]["interaction"]
        .as_array()
        .expect("system interactions")
        .iter()
        .filter_map(|i| i["code"].as_str())
        .collect();
    assert_eq!(codes, ["transaction", "batch"]);
}

#[tokio::test]
async fn idempotency_key_replays_a_transaction() {
    let h = hub();
    let bundle = booking_transaction("9000000033");
    let key = [("idempotency-key", "bundle-key-1")];
    let first = call(&h, "POST", "/fhir", &key, Some(&bundle)).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.raw);
    let events = h.store.events_after(0, 100).await.expect("events").len();
    let again = call(&h, "POST", "/fhir", &key, Some(&bundle)).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.raw);
    assert_eq!(
        again
            .headers
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    assert_eq!(again.body, first.body);
    assert_eq!(
        h.store.events_after(0, 100).await.expect("events").len(),
        events
    );
    assert_eq!(count(&h, "/fhir/Appointment").await, 1);
    // The same key with another Bundle is refused.
    let other = booking_transaction("9000000009");
    let r = call(&h, "POST", "/fhir", &key, Some(&other)).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.raw);
    assert_eq!(count(&h, "/fhir/Patient").await, 1);
}

#[tokio::test]
async fn process_bundle_is_the_same_without_http() {
    let h = hub();
    let done = api::bundle::process_bundle(
        &h.store,
        "http://hub.test",
        booking_transaction("9000000009"),
    )
    .await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(done.body["type"], "transaction-response");
    let slot = id_of(&done.body["entry"][4]);
    assert!(
        done.body["entry"][4]["response"]["location"]
            .as_str()
            .is_some_and(|l| l.starts_with("http://hub.test/fhir/Slot/")),
        "{}",
        done.body
    );
    assert_eq!(
        get(&h, &format!("/fhir/Slot/{slot}")).await.body["status"],
        "busy"
    );

    // Refusals come back as status + OperationOutcome, never as a panic or an Err.
    let refused = api::bundle::process_bundle(
        &h.store,
        "http://hub.test/fhir",
        json!({"resourceType": "Bundle", "type": "message"}),
    )
    .await;
    assert_eq!(refused.status, 422);
    assert_eq!(refused.body["resourceType"], "OperationOutcome");
    let not_json_object =
        api::bundle::process_bundle(&h.store, "http://hub.test", json!([1, 2])).await;
    assert_eq!(not_json_object.status, 400);

    // A batch through the library: the GET entry is answered like a REST read.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": format!("http://hub.test/fhir/Slot/{slot}")}},
        {"request": {"method": "GET", "url": "http://elsewhere.example/fhir/Slot/1"}}
    ]});
    let done = api::bundle::process_bundle(&h.store, "http://hub.test", batch).await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(done.body["entry"][0]["resource"]["status"], "busy");
    assert_eq!(
        done.body["entry"][1]["response"]["status"],
        "400 Bad Request"
    );
}

#[tokio::test]
async fn the_base_with_a_trailing_slash_takes_bundles_too() {
    let h = hub();
    let empty = json!({"resourceType": "Bundle", "type": "batch"});
    let r = call(&h, "POST", "/fhir/", &[], Some(&empty)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.raw);
    assert_eq!(r.body["type"], "batch-response");
    assert_eq!(r.body["entry"], json!([]));
    // Prefer: return=minimal leaves the resources out of the response entries.
    let r = call(
        &h,
        "POST",
        "/fhir",
        &[("prefer", "return=minimal")],
        Some(&booking_transaction("9000000009")),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.raw);
    for e in r.body["entry"].as_array().expect("entries") {
        assert!(e.get("resource").is_none(), "{e}");
        assert!(e["response"]["location"].as_str().is_some(), "{e}");
    }
    // Content negotiation applies there as on /fhir.
    let r = call(
        &h,
        "POST",
        "/fhir/",
        &[("accept", "application/fhir+xml")],
        Some(&empty),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_ACCEPTABLE, "{}", r.raw);
}
