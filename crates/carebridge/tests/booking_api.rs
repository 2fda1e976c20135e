//! The booking engine through the FHIR REST API, in-process: availability, booking races, reschedule by PUT
//! and JSON Patch, transitions, cancel-and-rebook, merge, and golden OperationOutcomes of refused changes.
//! Set `UPDATE_GOLDEN=1` to rewrite the golden files after checking the new output by hand.
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
    inproc::hub("booking-test")
}

struct Res {
    status: StatusCode,
    body: Value,
    raw: String,
}

async fn call_ct(h: &Hub, method: &str, uri: &str, ct: &str, body: Option<&Value>) -> Res {
    let mut req = Request::builder().method(method).uri(uri);
    let body = match body {
        Some(b) => {
            req = req.header("content-type", ct);
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
    let bytes = axum::body::to_bytes(res.into_body(), 64 << 20)
        .await
        .expect("body");
    let raw = String::from_utf8_lossy(&bytes).into_owned();
    Res {
        status,
        body: serde_json::from_str(&raw).unwrap_or(Value::Null),
        raw,
    }
}

async fn call(h: &Hub, method: &str, uri: &str, body: Option<&Value>) -> Res {
    call_ct(h, method, uri, "application/fhir+json", body).await
}

async fn create(h: &Hub, resource: Value) -> String {
    let rtype = resource["resourceType"].as_str().expect("type").to_string();
    let r = call(h, "POST", &format!("/fhir/{rtype}"), Some(&resource)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.raw);
    r.body["id"].as_str().expect("id").to_string()
}

/// Compare an OperationOutcome with `tests/golden/<name>.json`.
fn golden(name: &str, actual: &Value) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{name}.json"));
    let pretty = serde_json::to_string_pretty(actual).expect("json") + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, &pretty).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "missing golden file {} ({e}); run with UPDATE_GOLDEN=1",
            path.display()
        )
    });
    assert_eq!(pretty, expected, "golden {name} differs; actual:\n{pretty}");
}

const DAY: &str = "2030-03-04"; // a Monday, far enough ahead to stay in the future

/// `$generate-slots` Parameters: Monday 09:00-10:00 of `DAY`, slots of `minutes`.
fn monday_slots(minutes: u32) -> Value {
    json!({"resourceType": "Parameters", "parameter": [
        {"name": "daysOfWeek", "valueCode": "mon"},
        {"name": "openingTime", "valueString": "09:00-10:00"},
        {"name": "slotMinutes", "valuePositiveInt": minutes},
        {"name": "start", "valueDate": DAY},
        {"name": "end", "valueDate": DAY}
    ]})
}

struct Clinic {
    patient: String,
    schedule: String,
    slots: Vec<(String, String, String)>, // (id, start, end)
}

async fn clinic(h: &Hub) -> Clinic {
    let practitioner = create(
        h,
        json!({"resourceType": "Practitioner", "name": [{"family": "Gose", "given": ["Sandra"]}]}),
    )
    .await;
    let patient = create(
        h,
        json!({
            "resourceType": "Patient",
            "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9000000009"}],
            "name": [{"family": "Smith"}]
        }),
    )
    .await;
    let schedule = create(
        h,
        json!({"resourceType": "Schedule", "active": true, "actor": [{"reference": format!("Practitioner/{practitioner}")}]}),
    )
    .await;
    let generated = call(
        h,
        "POST",
        &format!("/fhir/Schedule/{schedule}/$generate-slots"),
        Some(&monday_slots(15)),
    )
    .await;
    assert_eq!(generated.status, StatusCode::OK, "{}", generated.raw);
    assert_eq!(
        generated.body["parameter"][0]["valueInteger"], 4,
        "{}",
        generated.raw
    );
    // Idempotent: the same range again creates nothing.
    let again = call(
        h,
        "POST",
        &format!("/fhir/Schedule/{schedule}/$generate-slots"),
        Some(&monday_slots(15)),
    )
    .await;
    assert_eq!(
        again.body["parameter"][0]["valueInteger"], 0,
        "{}",
        again.raw
    );
    assert_eq!(
        again.body["parameter"][1]["valueInteger"], 4,
        "{}",
        again.raw
    );

    // Free slots of the practitioner, through the chained parameter, with their schedule included.
    let found = call(
        h,
        "GET",
        &format!(
            "/fhir/Slot?status=free&start=ge{DAY}T00:00:00Z&start=lt{DAY}T23:59:59Z&schedule.actor=Practitioner/{practitioner}&_include=Slot:schedule&_sort=start"
        ),
        None,
    )
    .await;
    assert_eq!(found.status, StatusCode::OK, "{}", found.raw);
    let entries = found.body["entry"].as_array().expect("entries");
    let slots: Vec<(String, String, String)> = entries
        .iter()
        .filter(|e| e["search"]["mode"] == "match")
        .map(|e| {
            let r = &e["resource"];
            (
                r["id"].as_str().unwrap_or("").to_string(),
                r["start"].as_str().unwrap_or("").to_string(),
                r["end"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(slots.len(), 4, "{}", found.raw);
    // March 2030 is GMT: 09:00 local is 09:00Z.
    assert!(slots[0].1.starts_with(&format!("{DAY}T09:00")), "{slots:?}");
    assert!(
        entries
            .iter()
            .any(|e| e["search"]["mode"] == "include" && e["resource"]["id"] == schedule.as_str())
    );
    Clinic {
        patient,
        schedule,
        slots,
    }
}

fn appointment(patient: &str, slot: &(String, String, String), status: &str) -> Value {
    json!({
        "resourceType": "Appointment",
        "status": status,
        "start": slot.1,
        "end": slot.2,
        "slot": [{"reference": format!("Slot/{}", slot.0)}],
        "participant": [{"actor": {"reference": format!("Patient/{patient}")}, "status": "accepted"}]
    })
}

async fn slot_status(h: &Hub, id: &str) -> String {
    let r = call(h, "GET", &format!("/fhir/Slot/{id}"), None).await;
    r.body["status"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_bookings_of_one_slot_make_one() {
    let h = Arc::new(hub());
    let c = clinic(&h).await;
    let slot = c.slots[0].clone();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let h = h.clone();
        let body = appointment(&c.patient, &slot, "booked");
        tasks.push(tokio::spawn(async move {
            call(&h, "POST", "/fhir/Appointment", Some(&body)).await
        }));
    }
    let mut created = 0;
    let mut conflicts = 0;
    for t in tasks {
        let r = t.await.expect("task");
        match r.status {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => {
                conflicts += 1;
                assert!(
                    r.raw.contains(&format!("Slot/{}", slot.0)),
                    "409 must name the slot: {}",
                    r.raw
                );
            }
            other => panic!("unexpected {other}: {}", r.raw),
        }
    }
    assert_eq!((created, conflicts), (1, 63));
    assert_eq!(slot_status(&h, &slot.0).await, "busy");
    let booked = call(
        &h,
        "GET",
        &format!("/fhir/Appointment?slot=Slot/{}&_summary=count", slot.0),
        None,
    )
    .await;
    assert_eq!(booked.body["total"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reschedule_cancel_rebook_and_transitions() {
    let h = hub();
    let c = clinic(&h).await;
    let (s0, s1, s2) = (c.slots[0].clone(), c.slots[1].clone(), c.slots[2].clone());
    let appt = create(&h, appointment(&c.patient, &s0, "booked")).await;
    assert_eq!(slot_status(&h, &s0.0).await, "busy");

    // Reschedule in place with JSON Patch: old slot released, new one claimed, same id, version 2.
    let patch = json!([
        {"op": "replace", "path": "/slot/0/reference", "value": format!("Slot/{}", s1.0)},
        {"op": "replace", "path": "/start", "value": s1.1},
        {"op": "replace", "path": "/end", "value": s1.2}
    ]);
    let r = call_ct(
        &h,
        "PATCH",
        &format!("/fhir/Appointment/{appt}"),
        "application/json-patch+json",
        Some(&patch),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.raw);
    assert_eq!(r.body["meta"]["versionId"], "2");
    assert_eq!(slot_status(&h, &s0.0).await, "free");
    assert_eq!(slot_status(&h, &s1.0).await, "busy");

    // Reschedule with PUT.
    let mut moved = r.body.clone();
    moved["slot"] = json!([{"reference": format!("Slot/{}", s2.0)}]);
    moved["start"] = json!(s2.1);
    moved["end"] = json!(s2.2);
    let r = call(
        &h,
        "PUT",
        &format!("/fhir/Appointment/{appt}"),
        Some(&moved),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.raw);
    assert_eq!(slot_status(&h, &s1.0).await, "free");
    assert_eq!(slot_status(&h, &s2.0).await, "busy");

    // Cancel through $transition with a reason from the R4 code system.
    let r = call(
        &h,
        "POST",
        &format!("/fhir/Appointment/{appt}/$transition"),
        Some(&json!({"resourceType": "Parameters", "parameter": [
            {"name": "status", "valueCode": "cancelled"},
            {"name": "reason", "valueCoding": {"system": "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason", "code": "pat"}}
        ]})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.raw);
    assert_eq!(r.body["status"], "cancelled");
    assert_eq!(slot_status(&h, &s2.0).await, "free");

    // A late message that would revive it is refused, naming both states.
    let mut revive = r.body.clone();
    revive["status"] = json!("booked");
    revive
        .as_object_mut()
        .expect("obj")
        .remove("cancelationReason");
    let r = call(
        &h,
        "PUT",
        &format!("/fhir/Appointment/{appt}"),
        Some(&revive),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.raw);
    golden("refused-cancelled-to-booked", &r.body);

    // Cancel and rebook: the new appointment records the one it replaces.
    let mut rebook = appointment(&c.patient, &s2, "booked");
    rebook["extension"] = json!([{
        "url": "http://hl7.org/fhir/5.0/StructureDefinition/extension-Appointment.previousAppointment",
        "valueReference": {"reference": format!("Appointment/{appt}")}
    }]);
    let appt2 = create(&h, rebook).await;
    // Did not attend: noshow, never folded into cancelled; the slot stays busy (the time was used).
    let r = call(
        &h,
        "POST",
        &format!("/fhir/Appointment/{appt2}/$transition"),
        Some(&json!({"resourceType": "Parameters", "parameter": [{"name": "status", "valueCode": "noshow"}]})),
    )
    .await;
    // The appointment is in 2030, so a no-show now is refused: it has not started yet.
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.raw);
    let why = r.body["issue"][0]["diagnostics"].as_str().unwrap_or("");
    assert!(
        why.contains("before the appointment starts") && why.ends_with("(booked -> noshow)"),
        "{why}"
    );
    for to in ["arrived", "checked-in", "fulfilled"] {
        let r = call(
            &h,
            "POST",
            &format!("/fhir/Appointment/{appt2}/$transition"),
            Some(&json!({"resourceType": "Parameters", "parameter": [{"name": "status", "valueCode": to}]})),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{to}: {}", r.raw);
    }
    // A change to a fulfilled appointment is refused.
    let current = call(&h, "GET", &format!("/fhir/Appointment/{appt2}"), None).await;
    let mut edit = current.body.clone();
    edit["comment"] = json!("late edit");
    let r = call(
        &h,
        "PUT",
        &format!("/fhir/Appointment/{appt2}"),
        Some(&edit),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.raw);
    golden("refused-change-to-fulfilled", &r.body);
    let r = call(
        &h,
        "POST",
        &format!("/fhir/Appointment/{appt2}/$transition"),
        Some(&json!({"resourceType": "Parameters", "parameter": [
            {"name": "status", "valueCode": "cancelled"},
            {"name": "reason", "valueCoding": {"system": "http://terminology.hl7.org/CodeSystem/appointment-cancellation-reason", "code": "not-a-code"}}
        ]})),
    )
    .await;
    assert!(
        r.status == StatusCode::CONFLICT || r.status == StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        r.raw
    );
    golden("refused-fulfilled-to-cancelled", &r.body);

    // History shows every transition of the first appointment.
    let hist = call(
        &h,
        "GET",
        &format!("/fhir/Appointment/{appt}/_history"),
        None,
    )
    .await;
    let statuses: Vec<&str> = hist.body["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["resource"]["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(statuses, ["cancelled", "booked", "booked", "booked"]);

    // Events of the first appointment, in order and gap-free.
    let events = h.store.events_after(0, 1000).await.expect("events");
    let kinds: Vec<(String, i64)> = events
        .iter()
        .filter(|e| e.subject == format!("Appointment/{appt}"))
        .map(|e| (e.kind.clone(), e.subject_seq))
        .collect();
    assert_eq!(
        kinds,
        [
            ("appointment.booked".to_string(), 1),
            ("appointment.rescheduled".to_string(), 2),
            ("appointment.rescheduled".to_string(), 3),
            ("appointment.cancelled".to_string(), 4)
        ]
    );
    let cancelled = events
        .iter()
        .find(|e| e.kind == "appointment.cancelled")
        .expect("cancel event");
    assert_eq!(
        cancelled.data["reason"]["code"], "pat",
        "{:?}",
        cancelled.data
    );
    assert!(
        events
            .iter()
            .any(|e| e.kind == "slot.released" && e.subject == format!("Slot/{}", s0.0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn booking_refusals_are_precise() {
    let h = hub();
    let c = clinic(&h).await;
    let s0 = c.slots[0].clone();
    // Times that do not match the slot.
    let mut wrong = appointment(&c.patient, &s0, "booked");
    wrong["end"] = json!(c.slots[1].2);
    let r = call(&h, "POST", "/fhir/Appointment", Some(&wrong)).await;
    assert!(r.status.is_client_error(), "{}", r.raw);
    golden("refused-times-do-not-match-slot", &r.body);
    // An unknown slot.
    let ghost = ("ghost".to_string(), s0.1.clone(), s0.2.clone());
    let r = call(
        &h,
        "POST",
        "/fhir/Appointment",
        Some(&appointment(&c.patient, &ghost, "booked")),
    )
    .await;
    assert!(r.status.is_client_error(), "{}", r.raw);
    golden("refused-unknown-slot", &r.body);
    // A proposed appointment holds no slot.
    let id = create(&h, appointment(&c.patient, &s0, "proposed")).await;
    assert_eq!(slot_status(&h, &s0.0).await, "free");
    let _ = id;
    // A slot cannot be made busy by a direct write.
    let slot = call(&h, "GET", &format!("/fhir/Slot/{}", s0.0), None).await;
    let mut busy = slot.body.clone();
    busy["status"] = json!("busy");
    let r = call(&h, "PUT", &format!("/fhir/Slot/{}", s0.0), Some(&busy)).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.raw);
    // Nothing changed: still free, and the schedule still has all its slots.
    assert_eq!(slot_status(&h, &s0.0).await, "free");
    let count = call(
        &h,
        "GET",
        &format!("/fhir/Slot?schedule=Schedule/{}&_summary=count", c.schedule),
        None,
    )
    .await;
    assert_eq!(count.body["total"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nhs_number_is_unique_and_merge_moves_future_appointments() {
    let h = hub();
    let c = clinic(&h).await;
    let dup = call(
        &h,
        "POST",
        "/fhir/Patient",
        Some(&json!({
            "resourceType": "Patient",
            "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9000000009"}]
        })),
    )
    .await;
    assert_eq!(dup.status, StatusCode::CONFLICT, "{}", dup.raw);
    assert!(
        dup.raw.contains(&format!("Patient/{}", c.patient)),
        "409 points at the existing patient: {}",
        dup.raw
    );

    let other = create(
        &h,
        json!({"resourceType": "Patient", "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9000000025"}]}),
    )
    .await;
    let appt = create(&h, appointment(&c.patient, &c.slots[3], "booked")).await;
    let r = call(
        &h,
        "POST",
        "/fhir/Patient/$merge",
        Some(&json!({"resourceType": "Parameters", "parameter": [
            {"name": "source-patient", "valueReference": {"reference": format!("Patient/{}", c.patient)}},
            {"name": "target-patient", "valueReference": {"reference": format!("Patient/{other}")}}
        ]})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.raw);
    let source = call(&h, "GET", &format!("/fhir/Patient/{}", c.patient), None).await;
    assert_eq!(source.body["active"], false);
    assert_eq!(source.body["link"][0]["type"], "replaced-by");
    let moved = call(&h, "GET", &format!("/fhir/Appointment/{appt}"), None).await;
    assert_eq!(
        moved.body["participant"][0]["actor"]["reference"],
        format!("Patient/{other}")
    );
    let by_patient = call(
        &h,
        "GET",
        &format!("/fhir/Appointment?patient=Patient/{other}&_summary=count"),
        None,
    )
    .await;
    assert_eq!(by_patient.body["total"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_slot_filters_specialty_service_type_and_delivery_channel() {
    let h = hub();
    let schedule = create(
        &h,
        json!({
            "resourceType": "Schedule", "active": true,
            "actor": [{"reference": "Location/clinic"}],
            "serviceType": [{"coding": [{"system": "http://snomed.info/sct", "code": "394802001"}]}],
            "specialty": [{"coding": [{"system": "https://fhir.hl7.org.uk/CodeSystem/UKCore-PracticeSettingCode", "code": "110"}]}]
        }),
    )
    .await;
    let r = call(
        &h,
        "POST",
        &format!("/fhir/Schedule/{schedule}/$generate-slots"),
        Some(&monday_slots(30)),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.raw);
    // A video slot in the same schedule, with the UK Core delivery channel.
    create(
        &h,
        json!({
            "resourceType": "Slot", "status": "free",
            "schedule": {"reference": format!("Schedule/{schedule}")},
            "start": format!("{DAY}T11:00:00Z"), "end": format!("{DAY}T11:30:00Z"),
            "extension": [{"url": "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-DeliveryChannel",
                           "valueCodeableConcept": {"coding": [{"system": "https://fhir.hl7.org.uk/CodeSystem/UKCore-DeliveryChannel", "code": "Video"}]}}]
        }),
    )
    .await;
    let count = |q: String| {
        let h = &h;
        async move {
            let r = call(
                h,
                "GET",
                &format!("/fhir/Slot?status=free&{q}&_summary=count"),
                None,
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.raw);
            r.body["total"].as_u64().unwrap_or(u64::MAX)
        }
    };
    assert_eq!(
        count("specialty=110".into()).await,
        2,
        "generated slots copy the schedule's specialty"
    );
    assert_eq!(
        count("service-type=http://snomed.info/sct|394802001".into()).await,
        2
    );
    assert_eq!(count("delivery-channel=Video".into()).await, 1);
    assert_eq!(count("schedule.actor=Location/clinic".into()).await, 3);
    assert_eq!(count(format!("start=ge{DAY}T10:00:00Z")).await, 1);
}
