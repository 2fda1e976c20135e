//! Property test: random command sequences (book, reschedule, status changes, merges, direct slot writes,
//! deletes, concurrent bookers racing) against a real SQLite store; after every command the whole store must
//! satisfy the booking invariants (see `common::check_invariants`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::sync::Arc;

use common::*;
use fhir::ResourceType as RT;
use proptest::prelude::*;
use serde_json::{Value, json};
use store::Store;
use store_sqlite::SqliteStore;

const SLOTS: usize = 6;
const APPOINTMENTS: u8 = 5;
const PATIENTS: u8 = 4;
const STATUSES: [&str; 10] = [
    "proposed",
    "pending",
    "booked",
    "arrived",
    "fulfilled",
    "cancelled",
    "noshow",
    "entered-in-error",
    "checked-in",
    "waitlist",
];

#[derive(Debug, Clone)]
enum Cmd {
    /// Write `a{appt}` as booked (or another initial status) for `p{patient}` over slots first..first+len.
    Book {
        appt: u8,
        patient: u8,
        first: usize,
        len: usize,
        status: &'static str,
        skew: bool,
    },
    /// Rewrite `a{appt}`'s slots and times (keeping everything else, status included).
    Move {
        appt: u8,
        first: usize,
        len: usize,
    },
    Transition {
        appt: u8,
        to: &'static str,
        reason: bool,
    },
    Merge {
        source: u8,
        target: u8,
    },
    /// `n` bookers race for the same slots at once.
    Race {
        first: usize,
        len: usize,
        n: usize,
    },
    SlotWrite {
        slot: usize,
        status: &'static str,
    },
    DeleteSlot {
        slot: usize,
    },
    DeleteAppointment {
        appt: u8,
    },
}

fn cmd() -> impl Strategy<Value = Cmd> {
    let slot = 0..SLOTS;
    let len = 1..3usize;
    prop_oneof![
        4 => (0..APPOINTMENTS, 0..PATIENTS, slot.clone(), len.clone(),
              prop::sample::select(vec!["booked", "booked", "booked", "pending", "proposed"]), prop::bool::weighted(0.1))
            .prop_map(|(appt, patient, first, len, status, skew)| Cmd::Book { appt, patient, first, len, status, skew }),
        2 => (0..APPOINTMENTS, slot.clone(), len.clone()).prop_map(|(appt, first, len)| Cmd::Move { appt, first, len }),
        3 => (0..APPOINTMENTS, prop::sample::select(STATUSES.to_vec()), any::<bool>())
            .prop_map(|(appt, to, reason)| Cmd::Transition { appt, to, reason }),
        1 => (0..PATIENTS, 0..PATIENTS).prop_map(|(source, target)| Cmd::Merge { source, target }),
        1 => (slot.clone(), len, 2..6usize).prop_map(|(first, len, n)| Cmd::Race { first, len, n }),
        1 => (slot.clone(), prop::sample::select(vec!["free", "busy", "busy-unavailable", "busy-tentative"]))
            .prop_map(|(slot, status)| Cmd::SlotWrite { slot, status }),
        1 => slot.prop_map(|slot| Cmd::DeleteSlot { slot }),
        1 => (0..APPOINTMENTS).prop_map(|appt| Cmd::DeleteAppointment { appt }),
    ]
}

struct World {
    /// (start, end) of slot `m{i}`: m0 has started (so no-show and arrival can be recorded), the rest follow
    /// back to back.
    slots: Vec<(i64, i64)>,
}

impl World {
    fn range(&self, first: usize, len: usize) -> (Vec<String>, i64, i64) {
        let last = (first + len - 1).min(SLOTS - 1);
        let ids = (first..=last).map(|i| format!("m{i}")).collect();
        (ids, self.slots[first].0, self.slots[last].1)
    }
}

async fn setup(store: &Arc<SqliteStore>) -> World {
    write(store, RT::Schedule, "sch", schedule_json(true))
        .await
        .unwrap();
    let t = at(0);
    let mut slots = vec![(t - 30 * MIN, t + 30 * MIN)];
    for i in 0..(SLOTS as i64 - 1) {
        let s = t + 30 * MIN + i * 15 * MIN;
        slots.push((s, s + 15 * MIN));
    }
    for (i, (s, e)) in slots.iter().enumerate() {
        write(
            store,
            RT::Slot,
            &format!("m{i}"),
            slot_json("sch", *s, *e, "free"),
        )
        .await
        .unwrap();
    }
    for p in 0..PATIENTS {
        write(
            store,
            RT::Patient,
            &format!("p{p}"),
            patient_json(&nhs(u32::from(p))),
        )
        .await
        .unwrap();
    }
    World { slots }
}

fn booking(
    world: &World,
    status: &str,
    patient: &str,
    first: usize,
    len: usize,
    skew: bool,
) -> Value {
    let (ids, start, end) = world.range(first, len);
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let start = if skew { start + MIN } else { start };
    appointment_json(status, Some(patient), &ids, Some(start), Some(end))
}

async fn run(store: &Arc<SqliteStore>, world: &World, cmd: &Cmd) {
    match cmd {
        Cmd::Book {
            appt,
            patient,
            first,
            len,
            status,
            skew,
        } => {
            let json = booking(world, status, &format!("p{patient}"), *first, *len, *skew);
            let _ = write(store, RT::Appointment, &format!("a{appt}"), json).await;
        }
        Cmd::Move { appt, first, len } => {
            let id = format!("a{appt}");
            let Some(current) = store
                .read(RT::Appointment, &id)
                .await
                .unwrap()
                .filter(|s| !s.deleted)
            else {
                return;
            };
            let mut json: Value = serde_json::from_str(&current.json).unwrap();
            let (ids, start, end) = world.range(*first, *len);
            json["slot"] = Value::Array(
                ids.iter()
                    .map(|s| json!({"reference": format!("Slot/{s}")}))
                    .collect(),
            );
            json["start"] = json!(ts(start));
            json["end"] = json!(ts(end));
            let _ = write(store, RT::Appointment, &id, json).await;
        }
        Cmd::Transition { appt, to, reason } => {
            let reason = (*reason).then_some("prov");
            let _ = transition(store, &format!("a{appt}"), to, reason).await;
        }
        Cmd::Merge { source, target } => {
            let _ = merge(store, &format!("p{source}"), &format!("p{target}")).await;
        }
        Cmd::Race { first, len, n } => {
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let mut tasks = Vec::new();
            for k in 0..*n {
                let store = store.clone();
                let json = booking(
                    world,
                    "booked",
                    &format!("p{}", k % usize::from(PATIENTS)),
                    *first,
                    *len,
                    false,
                );
                let id = format!(
                    "race{}",
                    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                );
                tasks.push(tokio::spawn(async move {
                    write(&store, RT::Appointment, &id, json).await.is_ok()
                }));
            }
            let mut won = 0;
            for t in tasks {
                if t.await.unwrap() {
                    won += 1;
                }
            }
            assert!(won <= 1, "{won} racers booked the same slots");
        }
        Cmd::SlotWrite { slot, status } => {
            let (s, e) = world.slots[*slot];
            let _ = write(
                store,
                RT::Slot,
                &format!("m{slot}"),
                slot_json("sch", s, e, status),
            )
            .await;
        }
        Cmd::DeleteSlot { slot } => {
            let _ = delete(store, RT::Slot, &format!("m{slot}")).await;
        }
        Cmd::DeleteAppointment { appt } => {
            let _ = delete(store, RT::Appointment, &format!("a{appt}")).await;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_under_random_commands(cmds in prop::collection::vec(cmd(), 1..30)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let env = env("model");
            let store = &env.store;
            let world = setup(store).await;
            for (i, c) in cmds.iter().enumerate() {
                run(store, &world, c).await;
                if let Err(violation) = check_invariants(store).await {
                    panic!("after command {i} ({c:?}): {violation}");
                }
            }
        });
    }
}

/// The random commands must actually exercise the engine: a fixed sequence reaching every kind of change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripted_sequence_reaches_every_event_kind() {
    let env = env("script");
    let store = &env.store;
    let world = setup(store).await;
    let script = [
        Cmd::Book {
            appt: 0,
            patient: 0,
            first: 0,
            len: 1,
            status: "booked",
            skew: false,
        },
        Cmd::Book {
            appt: 1,
            patient: 1,
            first: 1,
            len: 2,
            status: "booked",
            skew: false,
        },
        Cmd::Move {
            appt: 1,
            first: 2,
            len: 2,
        },
        Cmd::Transition {
            appt: 0,
            to: "noshow",
            reason: false,
        },
        Cmd::Transition {
            appt: 1,
            to: "cancelled",
            reason: true,
        },
        Cmd::Book {
            appt: 2,
            patient: 2,
            first: 3,
            len: 1,
            status: "booked",
            skew: false,
        },
        Cmd::Transition {
            appt: 2,
            to: "arrived",
            reason: false,
        },
        Cmd::Transition {
            appt: 2,
            to: "checked-in",
            reason: false,
        },
        Cmd::Transition {
            appt: 2,
            to: "fulfilled",
            reason: false,
        },
        Cmd::Transition {
            appt: 0,
            to: "entered-in-error",
            reason: false,
        },
        Cmd::Book {
            appt: 3,
            patient: 3,
            first: 5,
            len: 1,
            status: "booked",
            skew: false,
        },
        Cmd::Merge {
            source: 3,
            target: 0,
        },
        Cmd::Race {
            first: 4,
            len: 1,
            n: 5,
        },
    ];
    for c in &script {
        run(store, &world, c).await;
        check_invariants(store).await.unwrap();
    }
    let kinds: std::collections::BTreeSet<String> =
        events(store).await.into_iter().map(|e| e.kind).collect();
    for k in [
        "appointment.booked",
        "appointment.rescheduled",
        "appointment.noshow",
        "appointment.cancelled",
        "appointment.arrived",
        "appointment.checked-in",
        "appointment.fulfilled",
        "appointment.entered-in-error",
        "appointment.updated",
        "patient.merged",
        "slot.claimed",
        "slot.released",
    ] {
        assert!(kinds.contains(k), "{k} missing from {kinds:?}");
    }
}
