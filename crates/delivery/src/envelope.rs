//! Message bodies: a CloudEvents 1.0 structured event, or an R4 Subscriptions Backport notification Bundle.

use serde_json::{Value, json};
use store::Event;

/// What an envelope is built from.
#[derive(Debug, Clone, Copy)]
pub struct EnvelopeInput<'a> {
    pub event: &'a Event,
    /// The hub's public base URL (CloudEvents `source`).
    pub source: &'a str,
    /// The FHIR base URL, for full URLs of resources.
    pub fhir_base: &'a str,
    /// The JSON of the resource version the event refers to (absent for a deletion).
    pub resource_json: Option<&'a str>,
}

/// The event id: stable across retries and the same for every consumer of the event.
pub fn event_id(event: &Event) -> String {
    format!("evt-{}", event.seq)
}

/// CloudEvents `type` of an event kind: `carebridge.appointment.booked.v1`.
pub fn event_type(kind: &str) -> String {
    format!("carebridge.{kind}.v1")
}

fn json_str(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// A CloudEvents 1.0 structured-mode event (`application/cloudevents+json`). `data` is the resource version
/// as stored (copied byte for byte); the event's own facts (a cancellation reason, the previous times of a
/// reschedule) travel as the string extension `eventdata` (compact JSON) when there are any.
pub fn cloud_event(input: &EnvelopeInput<'_>) -> String {
    let ev = input.event;
    let mut out = String::with_capacity(256 + input.resource_json.map_or(0, str::len));
    out.push_str("{\"specversion\":\"1.0\",\"id\":");
    out.push_str(&json_str(&event_id(ev)));
    out.push_str(",\"source\":");
    out.push_str(&json_str(input.source));
    out.push_str(",\"type\":");
    out.push_str(&json_str(&event_type(&ev.kind)));
    out.push_str(",\"subject\":");
    out.push_str(&json_str(&ev.subject));
    out.push_str(",\"time\":");
    out.push_str(&json_str(&fhir::format_instant_ms(ev.time_ms)));
    out.push_str(",\"sequence\":");
    out.push_str(&json_str(&ev.subject_seq.to_string()));
    out.push_str(",\"resourceversion\":");
    out.push_str(&json_str(&ev.version.to_string()));
    if !ev.data.is_null() {
        out.push_str(",\"eventdata\":");
        out.push_str(&json_str(&ev.data.to_string()));
    }
    if let Some(resource) = input.resource_json {
        out.push_str(",\"datacontenttype\":\"application/fhir+json\",\"data\":");
        out.push_str(resource);
    }
    out.push('}');
    out
}

/// An R4 Subscriptions Backport `history` Bundle: a `Parameters` subscription status first (with
/// `events-since-subscription-start` and the `notification-event`), then the resource version.
pub fn notification_bundle(
    input: &EnvelopeInput<'_>,
    subscription_id: &str,
    events_since_start: u64,
) -> String {
    let ev = input.event;
    let full_url = format!("{}/{}/{}", input.fhir_base, ev.rtype, ev.id);
    let status = json!({
        "resourceType": "Parameters",
        "meta": {"profile": ["http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"]},
        "parameter": [
            {"name": "subscription", "valueReference": {"reference": format!("{}/Subscription/{subscription_id}", input.fhir_base)}},
            {"name": "topic", "valueCanonical": event_type(&ev.kind)},
            {"name": "status", "valueCode": "active"},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "events-since-subscription-start", "valueString": events_since_start.to_string()},
            {"name": "notification-event", "part": [
                {"name": "event-number", "valueString": events_since_start.to_string()},
                {"name": "timestamp", "valueInstant": fhir::format_instant_ms(ev.time_ms)},
                {"name": "focus", "valueReference": {"reference": format!("{}/{}", ev.rtype, ev.id)}}
            ]}
        ]
    });
    let mut out = String::with_capacity(1024 + input.resource_json.map_or(0, str::len));
    out.push_str("{\"resourceType\":\"Bundle\",\"id\":");
    out.push_str(&json_str(&event_id(ev)));
    out.push_str(",\"type\":\"history\",\"timestamp\":");
    out.push_str(&json_str(&fhir::format_instant_ms(ev.time_ms)));
    out.push_str(",\"entry\":[{\"fullUrl\":");
    out.push_str(&json_str(&format!("urn:uuid:status-{}", event_id(ev))));
    out.push_str(",\"resource\":");
    out.push_str(&status.to_string());
    out.push_str(",\"request\":{\"method\":\"GET\",\"url\":");
    out.push_str(&json_str(&format!(
        "Subscription/{subscription_id}/$status"
    )));
    out.push_str("},\"response\":{\"status\":\"200\"}},{\"fullUrl\":");
    out.push_str(&json_str(&full_url));
    match input.resource_json {
        Some(resource) => {
            out.push_str(",\"resource\":");
            out.push_str(resource);
            out.push_str(",\"request\":{\"method\":\"PUT\",\"url\":");
            out.push_str(&json_str(&format!("{}/{}", ev.rtype, ev.id)));
            out.push_str("},\"response\":{\"status\":\"200\",\"etag\":");
            out.push_str(&json_str(&format!("W/\"{}\"", ev.version)));
            out.push_str("}}");
        }
        None => {
            out.push_str(",\"request\":{\"method\":\"DELETE\",\"url\":");
            out.push_str(&json_str(&format!("{}/{}", ev.rtype, ev.id)));
            out.push_str("},\"response\":{\"status\":\"204\"}}");
        }
    }
    out.push_str("]}");
    out
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]
mod tests {
    use super::*;
    use fhir::ResourceType;

    fn event() -> Event {
        Event {
            seq: 42,
            subject: "Appointment/a1".into(),
            subject_seq: 3,
            kind: "appointment.cancelled".into(),
            rtype: ResourceType::Appointment,
            id: "a1".into(),
            version: 3,
            time_ms: 1_795_486_505_000,
            data: json!({"reason": {"code": "pat"}}),
        }
    }

    #[test]
    fn cloud_event_fields() {
        let ev = event();
        let body = cloud_event(&EnvelopeInput {
            event: &ev,
            source: "http://hub",
            fhir_base: "http://hub/fhir",
            resource_json: Some(r#"{"resourceType":"Appointment","id":"a1","x":1.50}"#),
        });
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], "evt-42");
        assert_eq!(v["type"], "carebridge.appointment.cancelled.v1");
        assert_eq!(v["subject"], "Appointment/a1");
        assert_eq!(v["sequence"], "3");
        assert_eq!(v["time"], "2026-11-24T02:15:05.000Z");
        assert_eq!(v["datacontenttype"], "application/fhir+json");
        assert!(
            body.contains(r#""x":1.50"#),
            "data copied byte for byte: {body}"
        );
        let data: Value =
            serde_json::from_str(v["eventdata"].as_str().expect("eventdata")).expect("json");
        assert_eq!(data["reason"]["code"], "pat");
    }

    #[test]
    fn notification_bundle_shape() {
        let ev = event();
        let body = notification_bundle(
            &EnvelopeInput {
                event: &ev,
                source: "http://hub",
                fhir_base: "http://hub/fhir",
                resource_json: None,
            },
            "s1",
            7,
        );
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["type"], "history");
        assert_eq!(v["entry"][0]["resource"]["resourceType"], "Parameters");
        assert_eq!(
            v["entry"][0]["resource"]["parameter"][4]["valueString"],
            "7"
        );
        assert_eq!(v["entry"][1]["request"]["method"], "DELETE");
    }
}
