//! End-to-end flows of the booking engine on a real SQLite store.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::sync::Arc;

use booking::scheduling::{LocalDate, OpeningPeriod, OpeningRule, SlotTemplate, Weekday};
use booking::{BookingError, Outcome, event_kind};
use common::*;
use fhir::ResourceType as RT;
use serde_json::{Value, json};
use store::{Store, StoreError};
use store_sqlite::SqliteStore;

/// Schedule `sch` (active) with four contiguous 15-minute slots `s1`..`s4` starting an hour from now, an
/// inactive schedule `off` with slot `x1`, and patients `p1`, `p2`. Returns the start of `s1`.
async fn setup(store: &Arc<SqliteStore>) -> i64 {
    write(store, RT::Schedule, "sch", schedule_json(true))
        .await
        .unwrap();
    write(store, RT::Schedule, "off", schedule_json(false))
        .await
        .unwrap();
    let t0 = at(60);
    for i in 0..4 {
        let start = t0 + i * 15 * MIN;
        let id = format!("s{}", i + 1);
        write(
            store,
            RT::Slot,
            &id,
            slot_json("sch", start, start + 15 * MIN, "free"),
        )
        .await
        .unwrap();
    }
    write(
        store,
        RT::Slot,
        "x1",
        slot_json("off", t0, t0 + 15 * MIN, "free"),
    )
    .await
    .unwrap();
    write(store, RT::Patient, "p1", patient_json(&nhs(0)))
        .await
        .unwrap();
    write(store, RT::Patient, "p2", patient_json(&nhs(1)))
        .await
        .unwrap();
    t0
}

fn conflict_message(e: &BookingError) -> String {
    assert_eq!(e.http_status(), 409, "{e:?}");
    e.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn book_claims_slots_atomically_with_events() {
    let env = env("book");
    let store = &env.store;
    let t0 = setup(store).await;

    let out = write(
        store,
        RT::Appointment,
        "a1",
        appointment_json(
            "booked",
            Some("p1"),
            &["s1", "s2"],
            Some(t0),
            Some(t0 + 30 * MIN),
        ),
    )
    .await
    .unwrap();
    assert!(matches!(out, Outcome::Created(ref s) if s.version == 1));
    assert_eq!(slot_status(store, "s1").await, "busy");
    assert_eq!(slot_status(store, "s2").await, "busy");
    assert_eq!(slot_status(store, "s3").await, "free");

    assert_eq!(
        events_of(store, "Appointment/a1").await,
        [("appointment.booked".to_owned(), 1)]
    );
    let booked = last_event(store, "Appointment/a1").await;
    assert_eq!(booked.data["slots"], json!(["Slot/s1", "Slot/s2"]));
    assert_eq!(booked.data["patient"], json!("Patient/p1"));
    assert_eq!(booked.version, 1);
    for s in ["Slot/s1", "Slot/s2"] {
        assert_eq!(
            events_of(store, s).await,
            [
                ("slot.created".to_owned(), 1),
                ("slot.claimed".to_owned(), 2)
            ]
        );
        assert_eq!(
            last_event(store, s).await.data["appointment"],
            json!("Appointment/a1")
        );
    }
    assert_eq!(
        events_of(store, "Patient/p1").await,
        [("patient.registered".to_owned(), 1)]
    );

    // A second booking of a held slot: 409 naming the slot (and its holder); nothing written.
    let before = events(store).await.len();
    let e = write(
        store,
        RT::Appointment,
        "a2",
        appointment_json(
            "booked",
            Some("p2"),
            &["s2", "s3"],
            Some(t0 + 15 * MIN),
            Some(t0 + 45 * MIN),
        ),
    )
    .await
    .unwrap_err();
    let msg = conflict_message(&e);
    assert!(
        msg.contains("Slot/s2") && msg.contains("Appointment/a1"),
        "{msg}"
    );
    assert_eq!(e.expression().as_deref(), Some("Appointment.slot[0]"));
    assert_eq!(slot_status(store, "s3").await, "free");
    assert_eq!(events(store).await.len(), before);
    assert!(store.read(RT::Appointment, "a2").await.unwrap().is_none());
    check_invariants(store).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn booking_checks_slots_schedule_times_and_patient() {
    let env = env("checks");
    let store = &env.store;
    let t0 = setup(store).await;
    let q = 15 * MIN;
    let book = |id: &str, patient: Option<&str>, slots: &[&str], start: i64, end: i64| {
        let json = appointment_json("booked", patient, slots, Some(start), Some(end));
        let id = id.to_owned();
        let store = store.clone();
        async move { write(&store, RT::Appointment, &id, json).await }
    };

    let e = book("a", Some("p1"), &["nope"], t0, t0 + q)
        .await
        .unwrap_err();
    assert_eq!(e.http_status(), 422);
    assert!(e.to_string().contains("Slot/nope does not exist"), "{e}");

    let e = book("a", Some("p1"), &["x1"], t0, t0 + q)
        .await
        .unwrap_err();
    assert_eq!(e.http_status(), 409);
    assert!(
        e.to_string().contains("Schedule/off") && e.to_string().contains("not active"),
        "{e}"
    );

    // Start or end that do not match the slots.
    let e = book("a", Some("p1"), &["s1"], t0 + MIN, t0 + q)
        .await
        .unwrap_err();
    assert_eq!(
        (e.http_status(), e.expression().as_deref()),
        (422, Some("Appointment.start"))
    );
    let e = book("a", Some("p1"), &["s1", "s2"], t0, t0 + q)
        .await
        .unwrap_err();
    assert_eq!(
        (e.http_status(), e.expression().as_deref()),
        (422, Some("Appointment.end"))
    );
    // Not contiguous.
    let e = book("a", Some("p1"), &["s1", "s3"], t0, t0 + 3 * q)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("contiguous"), "{e}");
    // No patient, unknown patient.
    let e = book("a", None, &["s1"], t0, t0 + q).await.unwrap_err();
    assert_eq!(
        (e.http_status(), e.expression().as_deref()),
        (422, Some("Appointment.participant"))
    );
    let e = book("a", Some("ghost"), &["s1"], t0, t0 + q)
        .await
        .unwrap_err();
    assert_eq!(e.http_status(), 422);
    // A slot that is blocked (busy-unavailable) cannot be claimed.
    write(
        store,
        RT::Slot,
        "blk",
        slot_json("sch", t0 + 4 * q, t0 + 5 * q, "busy-unavailable"),
    )
    .await
    .unwrap();
    let e = book("a", Some("p1"), &["blk"], t0 + 4 * q, t0 + 5 * q)
        .await
        .unwrap_err();
    assert!(conflict_message(&e).contains("Slot/blk is not free (status busy-unavailable)"));
    // A booking in the past is the state machine's 422.
    let e = book("a", Some("p1"), &[], at(-30), at(-15))
        .await
        .unwrap_err();
    assert!(
        matches!(e, BookingError::Decision(_)) && e.http_status() == 422,
        "{e:?}"
    );
    // A walk-in without slots is fine and claims nothing.
    book("walkin", Some("p1"), &[], t0, t0 + q).await.unwrap();

    // Proposed / pending / waitlist hold nothing.
    for (id, status) in [("pr", "proposed"), ("pe", "pending"), ("wl", "waitlist")] {
        let json = appointment_json(status, Some("p2"), &["s1"], Some(t0), Some(t0 + q));
        write(store, RT::Appointment, id, json).await.unwrap();
        assert_eq!(
            events_of(store, &format!("Appointment/{id}")).await,
            [("appointment.updated".to_owned(), 1)]
        );
    }
    assert_eq!(slot_status(store, "s1").await, "free");
    // pending -> booked claims.
    let json = appointment_json("booked", Some("p2"), &["s1"], Some(t0), Some(t0 + q));
    assert!(matches!(
        write(store, RT::Appointment, "pe", json).await.unwrap(),
        Outcome::Updated(_)
    ));
    assert_eq!(slot_status(store, "s1").await, "busy");
    assert_eq!(
        events_of(store, "Appointment/pe").await,
        [
            ("appointment.updated".to_owned(), 1),
            ("appointment.booked".to_owned(), 2)
        ]
    );
    check_invariants(store).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reschedule_in_place_swaps_slots_in_one_transaction() {
    let env = env("resched");
    let store = &env.store;
    let t0 = setup(store).await;
    let q = 15 * MIN;
    write(
        store,
        RT::Appointment,
        "a",
        appointment_json("booked", Some("p1"), &["s1"], Some(t0), Some(t0 + q)),
    )
    .await
    .unwrap();
    write(
        store,
        RT::Appointment,
        "b",
        appointment_json(
            "booked",
            Some("p2"),
            &["s3"],
            Some(t0 + 2 * q),
            Some(t0 + 3 * q),
        ),
    )
    .await
    .unwrap();

    // Into a taken slot: refused, nothing changes.
    let e = write(
        store,
        RT::Appointment,
        "a",
        appointment_json(
            "booked",
            Some("p1"),
            &["s3"],
            Some(t0 + 2 * q),
            Some(t0 + 3 * q),
        ),
    )
    .await
    .unwrap_err();
    assert!(conflict_message(&e).contains("Slot/s3"));
    assert_eq!(slot_status(store, "s1").await, "busy");
    assert_eq!(
        store
            .read(RT::Appointment, "a")
            .await
            .unwrap()
            .unwrap()
            .version,
        1
    );

    // s1 -> s2: same id, version 2, s1 released, s2 claimed.
    let out = write(
        store,
        RT::Appointment,
        "a",
        appointment_json(
            "booked",
            Some("p1"),
            &["s2"],
            Some(t0 + q),
            Some(t0 + 2 * q),
        ),
    )
    .await
    .unwrap();
    assert!(matches!(out, Outcome::Updated(ref s) if s.version == 2 && s.id == "a"));
    assert_eq!(slot_status(store, "s1").await, "free");
    assert_eq!(slot_status(store, "s2").await, "busy");
    let ev = last_event(store, "Appointment/a").await;
    assert_eq!(
        (ev.kind.as_str(), ev.subject_seq, ev.version),
        ("appointment.rescheduled", 2, 2)
    );
    assert_eq!(ev.data["previous"]["start"], json!(ts(t0)));
    assert_eq!(ev.data["start"], json!(ts(t0 + q)));
    assert_eq!(
        events_of(store, "Slot/s1").await,
        [
            ("slot.created".to_owned(), 1),
            ("slot.claimed".to_owned(), 2),
            ("slot.released".to_owned(), 3)
        ]
    );
    assert_eq!(
        events_of(store, "Slot/s2").await,
        [
            ("slot.created".to_owned(), 1),
            ("slot.claimed".to_owned(), 2)
        ]
    );
    // Extending over a kept slot: s2 kept, s1 claimed again.
    write(
        store,
        RT::Appointment,
        "a",
        appointment_json(
            "booked",
            Some("p1"),
            &["s1", "s2"],
            Some(t0),
            Some(t0 + 2 * q),
        ),
    )
    .await
    .unwrap();
    assert_eq!(events_of(store, "Slot/s2").await.len(), 2);
    assert_eq!(slot_status(store, "s1").await, "busy");
    // Times that no longer match the (same) slots: refused.
    let e = write(
        store,
        RT::Appointment,
        "a",
        appointment_json(
            "booked",
            Some("p1"),
            &["s1", "s2"],
            Some(t0 + MIN),
            Some(t0 + 2 * q),
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(e.http_status(), 422);
    check_invariants(store).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_rebook_and_illegal_transitions() {
    let env = env("cancel");
    let store = &env.store;
    let t0 = setup(store).await;
    let q = 15 * MIN;
    write(
        store,
        RT::Appointment,
        "a",
        appointment_json("booked", Some("p1"), &["s1"], Some(t0), Some(t0 + q)),
    )
    .await
    .unwrap();

    // An invalid reason is the state machine's 422; nothing changes.
    let e = transition(store, "a", "cancelled", Some("weather"))
        .await
        .unwrap_err();
    assert_eq!(
        (e.http_status(), e.expression().as_deref()),
        (422, Some("Appointment.cancelationReason"))
    );
    assert_eq!(slot_status(store, "s1").await, "busy");
    // A reason with another status.
    assert_eq!(
        transition(store, "a", "arrived", Some("pat"))
            .await
            .unwrap_err()
            .http_status(),
        422
    );
    assert_eq!(
        transition(store, "a", "no-show", None)
            .await
            .unwrap_err()
            .http_status(),
        422
    );
    assert!(matches!(
        transition(store, "zz", "cancelled", None)
            .await
            .unwrap_err(),
        BookingError::NotFound {
            rtype: RT::Appointment,
            ..
        }
    ));

    let s = transition(store, "a", "cancelled", Some("pat-cpp"))
        .await
        .unwrap();
    assert_eq!(s.version, 2);
    let j: Value = serde_json::from_str(&s.json).unwrap();
    assert_eq!(
        j["cancelationReason"]["coding"][0]["code"],
        json!("pat-cpp")
    );
    assert_eq!(slot_status(store, "s1").await, "free");
    let ev = last_event(store, "Appointment/a").await;
    assert_eq!(ev.kind, "appointment.cancelled");
    assert_eq!(ev.data["reason"]["code"], json!("pat-cpp"));
    assert_eq!(last_event(store, "Slot/s1").await.kind, "slot.released");

    // A late booked after the cancel: 409 naming both states.
    let e = write(
        store,
        RT::Appointment,
        "a",
        appointment_json("booked", Some("p1"), &["s1"], Some(t0), Some(t0 + q)),
    )
    .await
    .unwrap_err();
    assert!(
        conflict_message(&e).contains("(cancelled -> booked)"),
        "{e}"
    );
    assert_eq!(e.expression().as_deref(), Some("Appointment.status"));

    // Cancel-and-rebook: the new appointment names the one it replaces.
    let mut rebook = appointment_json(
        "booked",
        Some("p1"),
        &["s2"],
        Some(t0 + q),
        Some(t0 + 2 * q),
    );
    rebook["extension"] = json!([{
        "url": booking::scheduling::PREVIOUS_APPOINTMENT_EXTENSION,
        "valueReference": {"reference": "Appointment/a"}
    }]);
    write(store, RT::Appointment, "b", rebook.clone())
        .await
        .unwrap();
    assert_eq!(
        last_event(store, "Appointment/b").await.data["replaces"],
        json!("Appointment/a")
    );
    rebook["extension"][0]["valueReference"]["reference"] = json!("Appointment/missing");
    let e = write(store, RT::Appointment, "c", rebook)
        .await
        .unwrap_err();
    assert_eq!(
        (e.http_status(), e.expression().as_deref()),
        (422, Some("Appointment.extension"))
    );

    // Deleting: a booked appointment is refused, a cancelled one is fine (and releases nothing).
    let e = delete(store, RT::Appointment, "b").await.unwrap_err();
    assert!(conflict_message(&e).contains("cancel it"));
    let d = delete(store, RT::Appointment, "a").await.unwrap().unwrap();
    assert!(d.deleted);
    assert_eq!(
        last_event(store, "Appointment/a").await.kind,
        "appointment.deleted"
    );
    assert_eq!(slot_status(store, "s2").await, "busy");
    assert!(delete(store, RT::Appointment, "a").await.unwrap().is_none());
    check_invariants(store).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attendance_noshow_and_entered_in_error() {
    let env = env("attend");
    let store = &env.store;
    setup(store).await;
    // Slots that have started (but not ended), so attendance and no-show can be recorded now.
    let (a0, a1, a2) = (at(-10), at(20), at(50));
    write(store, RT::Slot, "n1", slot_json("sch", a0, a1, "free"))
        .await
        .unwrap();
    write(store, RT::Slot, "n2", slot_json("sch", a1, a2, "free"))
        .await
        .unwrap();
    write(store, RT::Slot, "n3", slot_json("sch", a0, a1, "free"))
        .await
        .unwrap();
    write(
        store,
        RT::Appointment,
        "ns",
        appointment_json("booked", Some("p1"), &["n1"], Some(a0), Some(a1)),
    )
    .await
    .unwrap();
    write(
        store,
        RT::Appointment,
        "ok",
        appointment_json("booked", Some("p2"), &["n3"], Some(a0), Some(a1)),
    )
    .await
    .unwrap();
    write(
        store,
        RT::Appointment,
        "future",
        appointment_json("booked", Some("p2"), &["n2"], Some(a1), Some(a2)),
    )
    .await
    .unwrap();

    // No-show keeps the slot and is never folded into cancelled.
    transition(store, "ns", "noshow", None).await.unwrap();
    assert_eq!(slot_status(store, "n1").await, "busy");
    assert_eq!(
        last_event(store, "Appointment/ns").await.kind,
        "appointment.noshow"
    );
    let e = transition(store, "ns", "cancelled", None)
        .await
        .unwrap_err();
    assert!(conflict_message(&e).contains("(noshow -> cancelled)"));
    // Not before the start.
    let e = transition(store, "future", "noshow", None)
        .await
        .unwrap_err();
    assert_eq!(e.http_status(), 409);

    for (to, kind) in [
        ("arrived", "appointment.arrived"),
        ("checked-in", "appointment.checked-in"),
        ("fulfilled", "appointment.fulfilled"),
    ] {
        transition(store, "ok", to, None).await.unwrap();
        assert_eq!(last_event(store, "Appointment/ok").await.kind, kind);
        assert_eq!(slot_status(store, "n3").await, "busy");
    }
    let e = transition(store, "ok", "arrived", None).await.unwrap_err();
    assert!(conflict_message(&e).contains("(fulfilled -> arrived)"));

    // Entered-in-error releases silently (no patient notification is the delivery layer's concern).
    transition(store, "ns", "entered-in-error", None)
        .await
        .unwrap();
    assert_eq!(slot_status(store, "n1").await, "free");
    assert_eq!(
        events_of(store, "Appointment/ns").await,
        [
            ("appointment.booked".to_owned(), 1),
            ("appointment.noshow".to_owned(), 2),
            ("appointment.entered-in-error".to_owned(), 3)
        ]
    );
    assert_eq!(last_event(store, "Slot/n1").await.kind, "slot.released");
    let e = transition(store, "ns", "entered-in-error", None)
        .await
        .unwrap_err();
    assert_eq!(e.http_status(), 409);
    check_invariants(store).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_active_patient_per_nhs_number() {
    let env = env("nhs");
    let store = &env.store;
    let n = nhs(5);
    write(store, RT::Patient, "p1", patient_json(&n))
        .await
        .unwrap();
    for spelling in [
        n.clone(),
        format!("{} {} {}", &n[..3], &n[3..6], &n[6..]),
        format!("{}-{}-{}", &n[..3], &n[3..6], &n[6..]),
    ] {
        let e = write(store, RT::Patient, "p2", patient_json(&spelling))
            .await
            .unwrap_err();
        match &e {
            BookingError::Duplicate { existing, .. } => {
                assert_eq!(existing.as_deref(), Some("Patient/p1"))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.http_status(), 409);
        assert_eq!(e.issues().len(), 2);
    }
    // Updating p1 itself is fine; an inactive record with the same number is fine.
    assert!(matches!(
        write(store, RT::Patient, "p1", patient_json(&n))
            .await
            .unwrap(),
        Outcome::Updated(_)
    ));
    let mut inactive = patient_json(&n);
    inactive["active"] = json!(false);
    write(store, RT::Patient, "old", inactive).await.unwrap();
    // Updating another patient to p1's number is refused; re-activating "old" too.
    write(store, RT::Patient, "p3", patient_json(&nhs(6)))
        .await
        .unwrap();
    let e = write(store, RT::Patient, "p3", patient_json(&n))
        .await
        .unwrap_err();
    assert!(matches!(e, BookingError::Duplicate { .. }));
    let e = write(store, RT::Patient, "old", patient_json(&n))
        .await
        .unwrap_err();
    assert!(matches!(e, BookingError::Duplicate { .. }));
    assert_eq!(
        events_of(store, "Patient/p1").await,
        [
            ("patient.registered".to_owned(), 1),
            ("patient.updated".to_owned(), 2)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_moves_future_appointments() {
    let env = env("merge");
    let store = &env.store;
    let t0 = setup(store).await;
    let q = 15 * MIN;
    write(
        store,
        RT::Slot,
        "past",
        slot_json("sch", at(-10), at(5), "free"),
    )
    .await
    .unwrap();
    write(
        store,
        RT::Appointment,
        "fut",
        appointment_json("booked", Some("p1"), &["s1"], Some(t0), Some(t0 + q)),
    )
    .await
    .unwrap();
    write(
        store,
        RT::Appointment,
        "started",
        appointment_json("booked", Some("p1"), &["past"], Some(at(-10)), Some(at(5))),
    )
    .await
    .unwrap();
    write(
        store,
        RT::Appointment,
        "other",
        appointment_json(
            "booked",
            Some("p2"),
            &["s2"],
            Some(t0 + q),
            Some(t0 + 2 * q),
        ),
    )
    .await
    .unwrap();

    // Refusals first.
    assert_eq!(
        merge(store, "p1", "p1").await.unwrap_err().http_status(),
        422
    );
    assert!(matches!(
        merge(store, "p1", "zz").await.unwrap_err(),
        BookingError::NotFound { .. }
    ));
    assert!(matches!(
        merge(store, "zz", "p1").await.unwrap_err(),
        BookingError::NotFound { .. }
    ));

    let r = merge(store, "p1", "p2").await.unwrap();
    assert_eq!(r.appointments.len(), 1);
    assert_eq!(r.appointments[0].id, "fut");
    let p1 = read_json(store, RT::Patient, "p1").await;
    assert_eq!(p1["active"], json!(false));
    assert_eq!(
        p1["link"],
        json!([{"other": {"reference": "Patient/p2"}, "type": "replaced-by"}])
    );
    let p2 = read_json(store, RT::Patient, "p2").await;
    assert_eq!(
        p2["link"],
        json!([{"other": {"reference": "Patient/p1"}, "type": "replaces"}])
    );
    let fut = read_json(store, RT::Appointment, "fut").await;
    assert_eq!(
        fut["participant"][1]["actor"]["reference"],
        json!("Patient/p2")
    );
    assert_eq!(fut["status"], json!("booked"));
    let started = read_json(store, RT::Appointment, "started").await;
    assert_eq!(
        started["participant"][1]["actor"]["reference"],
        json!("Patient/p1")
    );
    assert_eq!(
        store
            .read(RT::Appointment, "other")
            .await
            .unwrap()
            .unwrap()
            .version,
        1
    );

    assert_eq!(
        events_of(store, "Patient/p1").await,
        [
            ("patient.registered".to_owned(), 1),
            ("patient.merged".to_owned(), 2)
        ]
    );
    assert_eq!(
        last_event(store, "Patient/p1").await.data,
        json!({"target": "Patient/p2"})
    );
    assert_eq!(
        events_of(store, "Patient/p2").await,
        [
            ("patient.registered".to_owned(), 1),
            ("patient.updated".to_owned(), 2)
        ]
    );
    let ev = last_event(store, "Appointment/fut").await;
    assert_eq!(
        (ev.kind.as_str(), ev.subject_seq),
        ("appointment.updated", 2)
    );
    assert_eq!(ev.data["mergedFrom"], json!("Patient/p1"));
    // The slot stays held by the moved appointment.
    assert_eq!(slot_status(store, "s1").await, "busy");

    // Merging again, or into the merged record: 409. Booking for the merged record: 409 pointing at p2.
    assert_eq!(
        merge(store, "p1", "p2").await.unwrap_err().http_status(),
        409
    );
    write(store, RT::Patient, "p3", patient_json(&nhs(7)))
        .await
        .unwrap();
    let e = merge(store, "p3", "p1").await.unwrap_err();
    assert!(conflict_message(&e).contains("Patient/p2"), "{e}");
    let e = write(
        store,
        RT::Appointment,
        "x",
        appointment_json(
            "booked",
            Some("p1"),
            &["s3"],
            Some(t0 + 2 * q),
            Some(t0 + 3 * q),
        ),
    )
    .await
    .unwrap_err();
    assert!(
        conflict_message(&e).contains("merged into Patient/p2"),
        "{e}"
    );
    check_invariants(store).await.unwrap();
}

fn template(schedule: &str) -> SlotTemplate {
    SlotTemplate {
        schedule_id: schedule.to_owned(),
        rules: vec![OpeningRule {
            days: vec![Weekday::Mon, Weekday::Tue],
            periods: vec![OpeningPeriod::parse("09:00-10:00").unwrap()],
        }],
        slot_minutes: 15,
        start_date: LocalDate::new(2030, 6, 3).unwrap(),
        end_date: LocalDate::new(2030, 6, 3).unwrap(),
        max_slots: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_slots_is_idempotent() {
    let env = env("generate");
    let store = &env.store;
    let mut sched = schedule_json(true);
    sched["serviceType"] =
        json!([{"coding": [{"system": "https://example.org/st", "code": "gp"}]}]);
    write(store, RT::Schedule, "gp1", sched).await.unwrap();

    let r = generate(store, "gp1", template("gp1")).await.unwrap();
    assert_eq!((r.created, r.skipped, r.slots.len()), (4, 0, 4));
    // 09:00 BST = 08:00Z.
    let slot = read_json(store, RT::Slot, "gp1-20300603T0800Z").await;
    assert_eq!(slot["status"], json!("free"));
    assert_eq!(slot["schedule"]["reference"], json!("Schedule/gp1"));
    assert_eq!(slot["serviceType"][0]["coding"][0]["code"], json!("gp"));
    assert_eq!(
        events_of(store, "Slot/gp1-20300603T0800Z").await,
        [("slot.created".to_owned(), 1)]
    );

    let mut wider = template("gp1");
    wider.end_date = LocalDate::new(2030, 6, 4).unwrap();
    let r = generate(store, "gp1", wider).await.unwrap();
    assert_eq!((r.created, r.skipped), (4, 4));
    let r = generate(store, "gp1", template("gp1")).await.unwrap();
    assert_eq!((r.created, r.skipped), (0, 4));

    // A generated slot can be booked.
    write(store, RT::Patient, "p", patient_json(&nhs(3)))
        .await
        .unwrap();
    let start = fhir::parse_instant_ms("2030-06-03T08:00:00Z").unwrap();
    write(
        store,
        RT::Appointment,
        "a",
        appointment_json(
            "booked",
            Some("p"),
            &["gp1-20300603T0800Z", "gp1-20300603T0815Z"],
            Some(start),
            Some(start + 30 * MIN),
        ),
    )
    .await
    .unwrap();

    assert!(matches!(
        generate(store, "nope", template("nope")).await.unwrap_err(),
        BookingError::NotFound { .. }
    ));
    assert_eq!(
        generate(store, "gp1", template("other"))
            .await
            .unwrap_err()
            .http_status(),
        422
    );
    let mut bad = template("gp1");
    bad.slot_minutes = 0;
    assert_eq!(
        generate(store, "gp1", bad).await.unwrap_err().http_status(),
        422
    );
    write(store, RT::Schedule, "off", schedule_json(false))
        .await
        .unwrap();
    assert_eq!(
        generate(store, "off", template("off"))
            .await
            .unwrap_err()
            .http_status(),
        409
    );
    check_invariants(store).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_slot_and_schedule_writes_keep_the_invariant() {
    let env = env("guards");
    let store = &env.store;
    let t0 = setup(store).await;
    let q = 15 * MIN;
    // Only bookings make slots busy.
    let e = write(store, RT::Slot, "new", slot_json("sch", t0, t0 + q, "busy"))
        .await
        .unwrap_err();
    assert_eq!(
        (e.http_status(), e.expression().as_deref()),
        (409, Some("Slot.status"))
    );
    let e = write(
        store,
        RT::Slot,
        "s4",
        slot_json("sch", t0 + 3 * q, t0 + 4 * q, "busy"),
    )
    .await
    .unwrap_err();
    assert_eq!(e.http_status(), 409);
    write(
        store,
        RT::Slot,
        "s4",
        slot_json("sch", t0 + 3 * q, t0 + 4 * q, "busy-unavailable"),
    )
    .await
    .unwrap();
    assert_eq!(last_event(store, "Slot/s4").await.kind, "slot.updated");

    write(
        store,
        RT::Appointment,
        "a",
        appointment_json("booked", Some("p1"), &["s1"], Some(t0), Some(t0 + q)),
    )
    .await
    .unwrap();
    // Held slot: status/time changes refused naming the appointment; a comment is fine.
    for status in ["free", "busy-unavailable"] {
        let e = write(store, RT::Slot, "s1", slot_json("sch", t0, t0 + q, status))
            .await
            .unwrap_err();
        assert!(conflict_message(&e).contains("Appointment/a"), "{e}");
    }
    let e = write(
        store,
        RT::Slot,
        "s1",
        slot_json("sch", t0 + MIN, t0 + q, "busy"),
    )
    .await
    .unwrap_err();
    assert_eq!(e.expression().as_deref(), Some("Slot.start"));
    let mut commented = slot_json("sch", t0, t0 + q, "busy");
    commented["comment"] = json!("room 3");
    write(store, RT::Slot, "s1", commented).await.unwrap();
    // Delete guards.
    let e = delete(store, RT::Slot, "s1").await.unwrap_err();
    assert!(conflict_message(&e).contains("Appointment/a"));
    let e = delete(store, RT::Schedule, "sch").await.unwrap_err();
    assert!(conflict_message(&e).contains("Slot/s1"));
    delete(store, RT::Slot, "s2").await.unwrap().unwrap();
    assert_eq!(last_event(store, "Slot/s2").await.kind, "slot.deleted");
    // After the cancel both deletes go through.
    transition(store, "a", "cancelled", None).await.unwrap();
    delete(store, RT::Slot, "s1").await.unwrap().unwrap();
    delete(store, RT::Schedule, "sch").await.unwrap().unwrap();
    assert_eq!(
        last_event(store, "Schedule/sch").await.kind,
        "schedule.deleted"
    );
    check_invariants(store).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_match_is_checked_first_and_plain_types_get_change_events() {
    let env = env("ifmatch");
    let store = &env.store;
    let t0 = setup(store).await;
    // A stale If-Match wins over the business rule the body would break (busy slot).
    let e = try_write(
        store,
        RT::Slot,
        "s1",
        slot_json("sch", t0, t0 + 15 * MIN, "busy"),
        Some(7),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::VersionConflict {
                expected: 7,
                actual: 1,
                ..
            }
        ),
        "{e:?}"
    );
    let e = try_write(store, RT::Patient, "p1", patient_json(&nhs(0)), Some(0))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::VersionConflict { .. }));
    try_write(store, RT::Patient, "p1", patient_json(&nhs(0)), Some(1))
        .await
        .unwrap()
        .unwrap();

    let role = json!({"resourceType": "PractitionerRole", "active": true});
    write(store, RT::PractitionerRole, "r1", role.clone())
        .await
        .unwrap();
    write(store, RT::PractitionerRole, "r1", role)
        .await
        .unwrap();
    assert_eq!(
        events_of(store, "PractitionerRole/r1").await,
        [
            ("practitioner-role.created".to_owned(), 1),
            ("practitioner-role.updated".to_owned(), 2)
        ]
    );
    assert_eq!(
        event_kind(RT::HealthcareService, "deleted"),
        "healthcare-service.deleted"
    );
    assert_eq!(event_kind(RT::Patient, "created"), "patient.registered");
    assert_eq!(event_kind(RT::Patient, "updated"), "patient.updated");
    assert_eq!(
        event_kind(RT::Organization, "created"),
        "organization.created"
    );
    let e = write(store, RT::Organization, "bad id!", json!({}))
        .await
        .unwrap_err();
    assert_eq!(e.http_status(), 422);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bookings_of_one_slot_book_it_once() {
    let env = env("race");
    let store = &env.store;
    let t0 = setup(store).await;
    let before = events(store).await.len();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let store = store.clone();
        let json = appointment_json("booked", Some("p1"), &["s1"], Some(t0), Some(t0 + 15 * MIN));
        tasks.push(tokio::spawn(async move {
            write(&store, RT::Appointment, &format!("r{i}"), json).await
        }));
    }
    let mut ok = Vec::new();
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(o) => ok.push(o.into_stored().id),
            Err(e) => {
                assert_eq!(e.http_status(), 409, "{e:?}");
                assert!(e.to_string().contains("Slot/s1"), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!((ok.len(), refused), (1, 63));
    assert_eq!(slot_status(store, "s1").await, "busy");
    // Exactly the winner's events: appointment.booked + slot.claimed.
    let new: Vec<_> = events(store).await.into_iter().skip(before).collect();
    assert_eq!(new.len(), 2);
    assert_eq!(new[0].subject, format!("Appointment/{}", ok[0]));
    assert_eq!(new[1].kind, "slot.claimed");
    check_invariants(store).await.unwrap();
}
