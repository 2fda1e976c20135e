//! Property tests: `decide` driven by random command sequences against an in-memory model of the store
//! (slot -> owner, appointment -> current view), and `generate_slots` over random templates.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use scheduling::{
    AppointmentStatus, AppointmentView, Coding, DecisionErrorKind, EventKind, LocalDate, MAX_SLOTS,
    OpeningPeriod, OpeningRule, SlotTemplate, TemplateError, WallTime, Weekday, decide,
    format_instant_utc, generate_slots, local_offset_minutes, parse_instant_ms,
};

const MIN: i64 = 60_000;
/// 2025-06-02T09:00:00Z
const T0: i64 = 1_748_854_800_000;
const APPOINTMENTS: usize = 4;
const SLOTS: usize = 5;

#[derive(Debug, Clone)]
enum Reason {
    None,
    Valid,
    Invalid,
}

#[derive(Debug, Clone)]
struct Command {
    appointment: usize,
    status: AppointmentStatus,
    /// Keep the current slots and times (so status changes are not all refused as moves).
    keep_shape: bool,
    slots: Vec<usize>,
    /// Start, in minutes after T0; `None` leaves start and end out.
    start_minutes: Option<i64>,
    duration_minutes: i64,
    reason: Reason,
    /// Minutes the clock moves forward before the command.
    advance_minutes: i64,
}

fn command() -> impl Strategy<Value = Command> {
    (
        0..APPOINTMENTS,
        prop::sample::select(AppointmentStatus::ALL.to_vec()),
        prop::bool::weighted(0.6),
        prop::collection::vec(0..SLOTS, 0..3),
        prop::option::weighted(0.9, prop::sample::select(vec![-60i64, 0, 30, 60, 120, 240])),
        prop::sample::select(vec![15i64, 30]),
        prop_oneof![3 => Just(Reason::None), 3 => Just(Reason::Valid), 1 => Just(Reason::Invalid)],
        prop::sample::select(vec![0i64, 0, 0, 10, 45]),
    )
        .prop_map(
            |(
                appointment,
                status,
                keep_shape,
                slots,
                start_minutes,
                duration_minutes,
                reason,
                advance_minutes,
            )| {
                Command {
                    appointment,
                    status,
                    keep_shape,
                    slots,
                    start_minutes,
                    duration_minutes,
                    reason,
                    advance_minutes,
                }
            },
        )
}

fn slot_ref(i: usize) -> String {
    format!("Slot/{i}")
}

#[derive(Default)]
struct Model {
    appointments: BTreeMap<usize, AppointmentView>,
    owner: BTreeMap<String, usize>,
    applied: BTreeMap<usize, usize>,
    appointment_events: BTreeMap<usize, usize>,
    /// Coverage: accepted event kinds, refusals by kind, and changes refused because a slot was taken.
    seen_events: BTreeMap<&'static str, usize>,
    seen_errors: BTreeMap<String, usize>,
    slot_taken: usize,
}

impl Model {
    fn proposed(&self, c: &Command) -> AppointmentView {
        let current = self.appointments.get(&c.appointment);
        let mut v = match current {
            Some(cur) if c.keep_shape => AppointmentView {
                status: c.status,
                ..cur.clone()
            },
            _ => AppointmentView {
                status: c.status,
                start_ms: c.start_minutes.map(|m| T0 + m * MIN),
                end_ms: c.start_minutes.map(|m| T0 + (m + c.duration_minutes) * MIN),
                slots: c.slots.iter().map(|i| slot_ref(*i)).collect(),
                patient: Some(format!("Patient/{}", c.appointment)),
                cancelation_reason: None,
                replaces: None,
            },
        };
        v.cancelation_reason = match c.reason {
            Reason::None => None,
            Reason::Valid => Some(Coding::cancellation_reason("pat")),
            Reason::Invalid => Some(Coding::cancellation_reason("nope")),
        };
        v
    }

    /// Apply one command the way the service layer would: decide, then claim atomically (all or nothing).
    fn step(&mut self, c: &Command, now: i64) {
        let id = c.appointment;
        let proposed = self.proposed(c);
        let current = self.appointments.get(&id);
        let from = current.map(|v| v.status);
        match decide(current, &proposed, now) {
            Ok(d) => {
                // Every accepted change is allowed by the policy, and never revives a terminal appointment.
                match from {
                    None => assert!(proposed.status.is_initial()),
                    Some(f) => {
                        assert!(
                            f.can_transition_to(proposed.status),
                            "{f} -> {}",
                            proposed.status
                        );
                        if f.is_terminal() {
                            assert_eq!(proposed.status, AppointmentStatus::EnteredInError);
                        }
                    }
                }
                if proposed.status == AppointmentStatus::EnteredInError {
                    assert!(!d.notify_patient);
                }
                // The store refuses the whole change if any slot to claim is taken (SlotTaken -> 409).
                if d.claim
                    .iter()
                    .any(|s| self.owner.get(s).is_some_and(|o| *o != id))
                {
                    self.slot_taken += 1;
                    return;
                }
                for e in &d.events {
                    *self.seen_events.entry(e.kind.as_str()).or_default() += 1;
                }
                for s in &d.release {
                    assert_eq!(
                        self.owner.remove(s),
                        Some(id),
                        "released a slot it did not hold: {s}"
                    );
                }
                for s in &d.claim {
                    assert_eq!(
                        self.owner.insert(s.clone(), id),
                        None,
                        "claimed a slot twice: {s}"
                    );
                }
                let appointment_events = d
                    .events
                    .iter()
                    .filter(|e| e.kind.is_appointment_event())
                    .count();
                let released = d
                    .events
                    .iter()
                    .filter(|e| e.kind == EventKind::SlotReleased)
                    .count();
                assert_eq!(appointment_events, 1);
                assert_eq!(released, d.release.len());
                *self.applied.entry(id).or_default() += 1;
                *self.appointment_events.entry(id).or_default() += appointment_events;
                self.appointments.insert(id, proposed);
            }
            Err(e) => {
                let name = format!("{:?}", e.kind);
                let name = name.split([' ', '{']).next().unwrap_or_default().to_owned();
                *self.seen_errors.entry(name).or_default() += 1;
                let to = proposed.status;
                let from_text = from.map_or("(new)", AppointmentStatus::as_str);
                assert!(
                    e.to_string().ends_with(&format!("({from_text} -> {to})")),
                    "{e}"
                );
                assert!(matches!(e.http_status(), 409 | 422));
                match e.kind {
                    DecisionErrorKind::IllegalTransition => {
                        assert!(from.is_some_and(|f| f != to && !f.can_transition_to(to)));
                    }
                    DecisionErrorKind::ChangeToTerminal => {
                        assert!(from.is_some_and(|f| f == to && f.is_terminal()))
                    }
                    DecisionErrorKind::InvalidInitialStatus => {
                        assert!(from.is_none() && !to.is_initial())
                    }
                    _ => assert!(from.is_none_or(|f| f.can_transition_to(to))),
                }
            }
        }
    }

    fn check_invariants(&self) {
        // Every busy slot has a holder that lists it and holds slots.
        for (slot, owner) in &self.owner {
            let a = &self.appointments[owner];
            assert!(
                a.status.holds_slots(),
                "{slot} busy for a {} appointment",
                a.status
            );
            assert!(
                a.slots.contains(slot),
                "{slot} busy for an appointment that does not list it"
            );
        }
        // Every holding appointment owns every slot it lists, so no slot has two holders.
        for (id, a) in &self.appointments {
            if a.status.holds_slots() {
                for s in &a.slots {
                    assert_eq!(
                        self.owner.get(s),
                        Some(id),
                        "{s} of holding appointment {id} not owned by it"
                    );
                }
            }
        }
        // One appointment event per applied change.
        assert_eq!(self.applied, self.appointment_events);
    }
}

/// The command generator reaches every outcome: each event kind, each refusal, and a taken slot.
#[test]
fn generator_reaches_every_outcome() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = prop::collection::vec(command(), 1..80);
    let mut total = Model::default();
    for _ in 0..300 {
        let commands = strategy.new_tree(&mut runner).unwrap().current();
        let mut model = Model::default();
        let mut now = T0 - 90 * MIN;
        for c in &commands {
            now += c.advance_minutes * MIN;
            model.step(c, now);
        }
        for (k, n) in model.seen_events {
            *total.seen_events.entry(k).or_default() += n;
        }
        for (k, n) in model.seen_errors {
            *total.seen_errors.entry(k).or_default() += n;
        }
        total.slot_taken += model.slot_taken;
    }
    let kinds = [
        "appointment.booked",
        "appointment.rescheduled",
        "appointment.cancelled",
        "appointment.noshow",
        "appointment.arrived",
        "appointment.checked-in",
        "appointment.fulfilled",
        "appointment.entered-in-error",
        "appointment.updated",
        "slot.released",
    ];
    for k in kinds {
        assert!(
            total.seen_events.get(k).is_some_and(|n| *n > 0),
            "never saw {k}: {:?}",
            total.seen_events
        );
    }
    for k in [
        "IllegalTransition",
        "ChangeToTerminal",
        "InvalidInitialStatus",
        "RescheduleNotAllowed",
        "CancelReasonInvalid",
        "TimesRequired",
        "EndsInPast",
        "NoShowBeforeStart",
    ] {
        assert!(
            total.seen_errors.get(k).is_some_and(|n| *n > 0),
            "never saw {k}: {:?}",
            total.seen_errors
        );
    }
    assert!(total.slot_taken > 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_command_sequences_keep_the_slot_invariants(commands in prop::collection::vec(command(), 1..80)) {
        let mut model = Model::default();
        let mut now = T0 - 90 * MIN;
        for c in &commands {
            now += c.advance_minutes * MIN;
            model.step(c, now);
            model.check_invariants();
        }
    }

    #[test]
    fn instants_round_trip(ms in -62_135_596_800_000i64..253_402_300_799_000) {
        let text = format_instant_utc(ms);
        prop_assert_eq!(parse_instant_ms(&text), Some(ms.div_euclid(1000) * 1000));
    }

    #[test]
    fn instant_parser_never_panics(s in "[0-9T:.Z+-]{0,32}") {
        let _ = parse_instant_ms(&s);
    }

    #[test]
    fn generated_slots_are_sane(
        day_mask in 1u8..128,
        cuts in prop::collection::btree_set(0u32..=96, 2..7),
        slot_minutes in prop::sample::select(vec![5u32, 10, 15, 20, 30, 45, 60, 90]),
        start_day in 0i64..1_100,
        span in 0i64..45,
    ) {
        // Non-overlapping periods from sorted quarter-hour cut points: [c0,c1), [c2,c3), ...
        let cuts: Vec<u32> = cuts.into_iter().collect();
        let periods: Vec<OpeningPeriod> = cuts
            .chunks_exact(2)
            .map(|p| OpeningPeriod {
                start: WallTime::new(p[0] * 15 / 60, p[0] * 15 % 60).unwrap(),
                end: WallTime::new(p[1] * 15 / 60, p[1] * 15 % 60).unwrap(),
            })
            .collect();
        let days: Vec<Weekday> =
            Weekday::ALL.into_iter().enumerate().filter(|(i, _)| day_mask & (1 << i) != 0).map(|(_, d)| d).collect();
        let date = |offset: i64| {
            let text = format_instant_utc(parse_instant_ms("2024-01-01T00:00:00Z").unwrap() + offset * 86_400_000);
            LocalDate::parse(&text[..10]).unwrap()
        };
        let template = SlotTemplate {
            schedule_id: "s".into(),
            rules: vec![OpeningRule { days: days.clone(), periods: periods.clone() }],
            slot_minutes,
            start_date: date(start_day),
            end_date: date(start_day + span),
            max_slots: None,
        };
        // An upper bound on the count: every day of the range, every period filled. A template over the
        // ceiling must be refused, and only then (daylight-saving days can only lose or gain an hour).
        let per_day: i64 = periods.iter().map(|p| i64::from((p.end.minutes() - p.start.minutes()) / slot_minutes)).sum();
        let bound = (span + 1) * per_day;
        let slots = match generate_slots(&template) {
            Ok(slots) => slots,
            Err(TemplateError::TooManySlots { limit }) => {
                prop_assert_eq!(limit, MAX_SLOTS);
                let dst_slack = i64::from(60 / slot_minutes) * i64::try_from(periods.len()).unwrap();
                prop_assert!(bound + dst_slack > i64::try_from(limit).unwrap(),
                    "refused a template of at most {} slots", bound);
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(format!("unexpected error {e:?}"))),
        };
        prop_assert!(slots.len() <= MAX_SLOTS);
        prop_assert_eq!(&generate_slots(&template).unwrap(), &slots);
        for s in &slots {
            prop_assert_eq!(s.end_ms - s.start_ms, i64::from(slot_minutes) * MIN);
            // The local start lies on a chosen weekday, inside a period, and the slot fits in that period.
            let local = s.start_ms + i64::from(local_offset_minutes(s.start_ms)) * MIN;
            let day = local.div_euclid(86_400_000);
            let weekday = Weekday::ALL[usize::try_from((day + 3).rem_euclid(7)).unwrap()];
            prop_assert!(days.contains(&weekday));
            let minute = u32::try_from(local.rem_euclid(86_400_000) / MIN).unwrap();
            prop_assert!(periods.iter().any(|p| p.start.minutes() <= minute && minute + slot_minutes <= p.end.minutes()));
        }
        for pair in slots.windows(2) {
            prop_assert!(pair[0].end_ms <= pair[1].start_ms);
            prop_assert!(pair[0].key < pair[1].key);
        }
    }
}

/// Found by `generated_slots_are_sane`: Monday to Saturday, 00:00-23:15 in five-minute slots, over the 41 days
/// from 2024-01-01 is 36 x 279 = 10,044 slots, more than the ceiling, so the template is refused whole.
#[test]
fn a_template_over_the_ceiling_is_refused_not_truncated() {
    let template = SlotTemplate {
        schedule_id: "s".into(),
        rules: vec![OpeningRule {
            days: Weekday::ALL[..6].to_vec(),
            periods: vec![OpeningPeriod {
                start: WallTime::new(0, 0).unwrap(),
                end: WallTime::new(23, 15).unwrap(),
            }],
        }],
        slot_minutes: 5,
        start_date: LocalDate::parse("2024-01-01").unwrap(),
        end_date: LocalDate::parse("2024-02-10").unwrap(),
        max_slots: None,
    };
    assert_eq!(
        generate_slots(&template),
        Err(TemplateError::TooManySlots { limit: MAX_SLOTS })
    );
    let shorter = SlotTemplate {
        end_date: LocalDate::parse("2024-01-31").unwrap(),
        ..template
    };
    assert_eq!(generate_slots(&shorter).unwrap().len(), 279 * 27);
}
