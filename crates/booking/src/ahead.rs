//! What a write of the booking engine is going to read, told to the store before it runs
//! ([`store::ReadAhead`]): a store that pays a round trip per read inside a write fetches these for a whole
//! group commit at once. Only a hint; the writes read what they read either way.

use fhir::ResourceType as RT;
use serde_json::Value;
use store::{ReadAhead, Stored};

use crate::util::local_id;

/// For a create or update of `rtype/id` with `resource` as its new content: the resource itself and, for
/// an Appointment, the Slots and Patients it names; then the Schedules of those Slots, and what the
/// current version of the Appointment names (the slots a reschedule releases). For an active Patient, the
/// searches for another active Patient holding one of its NHS numbers.
pub fn for_write(rtype: RT, id: &str, resource: &Value) -> ReadAhead {
    let mut keys = vec![(rtype, id.to_string())];
    let mut searches = Vec::new();
    match rtype {
        RT::Appointment => keys.extend(named_by_appointment(resource)),
        RT::Patient => searches = crate::patient::holder_searches(resource),
        _ => {}
    }
    ReadAhead {
        keys,
        follow: Some(follow),
        searches,
    }
}

/// For `$transition` of `Appointment/{id}`: the appointment, then its Slots and Patient.
pub fn for_transition(id: &str) -> ReadAhead {
    ReadAhead {
        keys: vec![(RT::Appointment, id.to_string())],
        follow: Some(follow),
        searches: Vec::new(),
    }
}

/// Where a stored resource leads a booking write: an Appointment to its Slots and Patients, a Slot to its
/// Schedule.
fn follow(found: &Stored) -> Vec<(RT, String)> {
    let parsed = || serde_json::from_str::<Value>(&found.json).ok();
    match found.rtype {
        RT::Appointment => parsed().map(|v| named_by_appointment(&v)),
        RT::Slot => {
            parsed().map(|v| named(v.get("schedule"), "/reference", RT::Schedule).collect())
        }
        _ => None,
    }
    .unwrap_or_default()
}

/// The Slots and the Patient participants an Appointment names by relative reference.
fn named_by_appointment(appointment: &Value) -> Vec<(RT, String)> {
    named(appointment.get("slot"), "/reference", RT::Slot)
        .chain(named(
            appointment.get("participant"),
            "/actor/reference",
            RT::Patient,
        ))
        .collect()
}

/// The `rtype` ids referenced (as `Type/id`) at `pointer` in `element`, or in each item when it is a list.
fn named<'a>(
    element: Option<&'a Value>,
    pointer: &'a str,
    rtype: RT,
) -> impl Iterator<Item = (RT, String)> + 'a {
    let items: &'a [Value] = match element {
        Some(Value::Array(list)) => list,
        Some(one) => std::slice::from_ref(one),
        None => &[],
    };
    items
        .iter()
        .filter_map(move |item| item.pointer(pointer).and_then(Value::as_str))
        .filter_map(move |r| local_id(r, rtype))
        .map(move |id| (rtype, id.to_string()))
}

#[cfg(test)]
#[allow(clippy::expect_used, reason = "tests")]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored(rtype: RT, id: &str, json: Value) -> Stored {
        Stored {
            rtype,
            id: id.into(),
            version: 1,
            last_updated_ms: 0,
            deleted: false,
            json: json.to_string(),
        }
    }

    #[test]
    fn a_booking_names_its_slots_and_patient_and_slots_lead_to_schedules() {
        let appt = json!({
            "resourceType": "Appointment", "status": "booked",
            "slot": [{"reference": "Slot/s1"}, {"reference": "Slot/s2"}, {"reference": "https://elsewhere/Slot/x"}],
            "participant": [
                {"actor": {"reference": "Patient/p1"}, "status": "accepted"},
                {"actor": {"reference": "Practitioner/d1"}, "status": "accepted"}
            ]
        });
        let ahead = for_write(RT::Appointment, "a1", &appt);
        assert_eq!(
            ahead.keys,
            vec![
                (RT::Appointment, "a1".to_string()),
                (RT::Slot, "s1".to_string()),
                (RT::Slot, "s2".to_string()),
                (RT::Patient, "p1".to_string()),
            ]
        );
        let follow = ahead.follow.expect("a follow-up round");
        let slot = stored(
            RT::Slot,
            "s1",
            json!({"resourceType": "Slot", "schedule": {"reference": "Schedule/sc"}}),
        );
        assert_eq!(follow(&slot), vec![(RT::Schedule, "sc".to_string())]);
        let stored_appt = stored(RT::Appointment, "a1", appt);
        assert_eq!(follow(&stored_appt).len(), 3);
        assert!(
            follow(&stored(
                RT::Patient,
                "p1",
                json!({"resourceType": "Patient"})
            ))
            .is_empty()
        );
        assert!(
            follow(&Stored {
                json: "not json".into(),
                ..slot
            })
            .is_empty()
        );
    }

    #[test]
    fn other_writes_name_only_themselves() {
        let ahead = for_write(RT::Patient, "p", &json!({"resourceType": "Patient"}));
        assert_eq!(ahead.keys, vec![(RT::Patient, "p".to_string())]);
        assert_eq!(
            for_transition("a").keys,
            vec![(RT::Appointment, "a".to_string())]
        );
    }
}
