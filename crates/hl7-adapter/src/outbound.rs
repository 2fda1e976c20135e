//! Outbound HL7 v2: SIU messages for appointment events and ADT A28/A31 for patient events, built from the
//! stored FHIR resources.
//!
//! The message control id (MSH-10) is derived from the outbox event (`CB<seq>`), so a retried delivery is a
//! resend of the same message and a receiver that deduplicates on MSH-10 applies it once.

use hl7::Delimiters;
use serde_json::Value;

use crate::dtm;
use crate::map::{FILLER_SYSTEM, PLACER_SYSTEM};

/// What the sender puts in MSH-3/4 and what it addresses in MSH-5/6.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub sending_application: String,
    pub sending_facility: String,
    pub receiving_application: String,
    pub receiving_facility: String,
}

impl Default for Envelope {
    fn default() -> Self {
        Envelope {
            sending_application: "CAREBRIDGE".into(),
            sending_facility: "CAREBRIDGE".into(),
            receiving_application: String::new(),
            receiving_facility: String::new(),
        }
    }
}

/// The SIU trigger for an appointment event kind, or `None` when the event has no SIU equivalent.
pub fn siu_trigger(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "appointment.booked" => "S12",
        "appointment.rescheduled" => "S13",
        "appointment.updated"
        | "appointment.arrived"
        | "appointment.checked-in"
        | "appointment.fulfilled" => "S14",
        "appointment.cancelled" => "S15",
        "appointment.entered-in-error" => "S17",
        "appointment.noshow" => "S26",
        _ => return None,
    })
}

/// The ADT trigger for a patient event kind.
pub fn adt_trigger(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "patient.registered" => "A28",
        "patient.updated" | "patient.merged" => "A31",
        _ => return None,
    })
}

/// A segment under construction: fields of repetitions of components, escaped on output.
struct Seg {
    name: &'static str,
    fields: Vec<String>,
}

impl Seg {
    fn new(name: &'static str) -> Seg {
        Seg {
            name,
            fields: Vec::new(),
        }
    }

    /// Set field `n` (1-based) to components (escaped, joined with `^`, trailing empties dropped).
    fn f(mut self, n: usize, components: &[&str]) -> Seg {
        let d = Delimiters::default();
        let escaped: Vec<String> = components.iter().map(|c| hl7::escape(c, &d)).collect();
        let mut text = escaped.join("^");
        while text.ends_with('^') {
            text.pop();
        }
        self.set_raw(n, text);
        self
    }

    /// Set field `n` to repetitions.
    fn reps(mut self, n: usize, reps: &[Vec<&str>]) -> Seg {
        let d = Delimiters::default();
        let text: Vec<String> = reps
            .iter()
            .map(|r| {
                let mut t = r
                    .iter()
                    .map(|c| hl7::escape(c, &d))
                    .collect::<Vec<_>>()
                    .join("^");
                while t.ends_with('^') {
                    t.pop();
                }
                t
            })
            .collect();
        self.set_raw(n, text.join("~"));
        self
    }

    fn set_raw(&mut self, n: usize, text: String) {
        if self.fields.len() < n {
            self.fields.resize(n, String::new());
        }
        if let Some(slot) = self.fields.get_mut(n.saturating_sub(1)) {
            *slot = text;
        }
    }

    fn encode(&self) -> String {
        let mut s = self.name.to_owned();
        for f in &self.fields {
            s.push('|');
            s.push_str(f);
        }
        s
    }
}

fn msh(env: &Envelope, now_ms: i64, msg_type: &[&str], control_id: &str) -> String {
    let d = Delimiters::default();
    let e = |s: &str| hl7::escape(s, &d);
    format!(
        "MSH|^~\\&|{}|{}|{}|{}|{}||{}|{}|P|2.5.1|||AL|NE|GBR|UNICODE UTF-8",
        e(&env.sending_application),
        e(&env.sending_facility),
        e(&env.receiving_application),
        e(&env.receiving_facility),
        dtm::format_ms(now_ms),
        msg_type.iter().map(|c| e(c)).collect::<Vec<_>>().join("^"),
        e(control_id),
    )
}

fn instant(v: &Value) -> Option<String> {
    v.as_str()
        .and_then(fhir::parse_instant_ms)
        .map(dtm::format_ms)
}

/// PID from a FHIR Patient (NHS number first as `^^^NHS^NH`, other identifiers as `^^^<authority>^MR`).
fn pid(patient: &Value) -> Seg {
    let mut ids: Vec<(String, String, String)> = Vec::new();
    for i in patient["identifier"].as_array().into_iter().flatten() {
        let (Some(sys), Some(val)) = (i["system"].as_str(), i["value"].as_str()) else {
            continue;
        };
        if sys == fhir::NHS_NUMBER_SYSTEM {
            ids.insert(0, (val.to_owned(), "NHS".into(), "NH".into()));
        } else {
            let authority = sys
                .strip_prefix(crate::map::MRN_SYSTEM_PREFIX)
                .unwrap_or(sys);
            ids.push((val.to_owned(), authority.to_owned(), "MR".into()));
        }
    }
    let id_reps: Vec<Vec<&str>> = ids
        .iter()
        .map(|(v, a, t)| vec![v.as_str(), "", "", a.as_str(), t.as_str()])
        .collect();
    let name = patient["name"].get(0).cloned().unwrap_or(Value::Null);
    let family = name["family"].as_str().unwrap_or_default();
    let given: Vec<&str> = name["given"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let birth = patient["birthDate"]
        .as_str()
        .unwrap_or_default()
        .replace('-', "");
    let gender = match patient["gender"].as_str() {
        Some("male") => "M",
        Some("female") => "F",
        Some("other") => "O",
        Some("unknown") => "U",
        _ => "",
    };
    let addr = patient["address"].get(0).cloned().unwrap_or(Value::Null);
    let line = |n: usize| {
        addr["line"]
            .get(n)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (l1, l2) = (line(0), line(1));
    let mut seg = Seg::new("PID")
        .f(1, &["1"])
        .reps(3, &id_reps)
        .f(
            5,
            &[
                family,
                given.first().copied().unwrap_or_default(),
                given.get(1).copied().unwrap_or_default(),
            ],
        )
        .f(7, &[&birth])
        .f(8, &[gender]);
    if !addr.is_null() {
        seg = seg.f(
            11,
            &[
                &l1,
                &l2,
                addr["city"].as_str().unwrap_or_default(),
                addr["district"].as_str().unwrap_or_default(),
                addr["postalCode"].as_str().unwrap_or_default(),
                addr["country"].as_str().unwrap_or_default(),
            ],
        );
    }
    seg
}

fn ident_of<'a>(appt: &'a Value, system: &str) -> Option<&'a str> {
    appt["identifier"]
        .as_array()?
        .iter()
        .find(|i| i["system"].as_str() == Some(system))
        .and_then(|i| i["value"].as_str())
}

/// An EI from our `namespace:id` identifier value.
fn ei(value: &str) -> (String, String) {
    match value.split_once(':') {
        Some((ns, id)) => (id.to_owned(), ns.to_owned()),
        None => (value.to_owned(), String::new()),
    }
}

/// SIU message for an appointment event. `patient` is the appointment's patient when known; `actors` maps
/// each practitioner/location reference to its resource (for names and identifiers).
pub fn siu(
    env: &Envelope,
    trigger: &str,
    control_id: &str,
    now_ms: i64,
    appointment: &Value,
    patient: Option<&Value>,
    actors: &[(String, Value)],
) -> String {
    let mut segs = vec![msh(env, now_ms, &["SIU", trigger, "SIU_S12"], control_id)];
    let appt_id = appointment["id"].as_str().unwrap_or_default();
    let (placer_id, placer_ns) = ident_of(appointment, PLACER_SYSTEM)
        .map(ei)
        .unwrap_or_default();
    let (filler_id, filler_ns) = match ident_of(appointment, FILLER_SYSTEM) {
        Some(v) => ei(v),
        None => (appt_id.to_owned(), env.sending_facility.clone()),
    };
    let start = instant(&appointment["start"]).unwrap_or_default();
    let end = instant(&appointment["end"]).unwrap_or_default();
    let minutes = match (
        appointment["start"]
            .as_str()
            .and_then(fhir::parse_instant_ms),
        appointment["end"].as_str().and_then(fhir::parse_instant_ms),
    ) {
        (Some(s), Some(e)) => ((e - s) / 60_000).to_string(),
        _ => String::new(),
    };
    let status = appointment["status"].as_str().unwrap_or_default();
    let filler_status = match status {
        "booked" => "Booked",
        "cancelled" => "Cancelled",
        "noshow" => "Noshow",
        "entered-in-error" => "Deleted",
        "fulfilled" => "Complete",
        "arrived" | "checked-in" => "Started",
        "pending" | "proposed" => "Pending",
        "waitlist" => "Waitlist",
        _ => "",
    };
    let reason = &appointment["cancelationReason"]["coding"][0];
    let mut sch = Seg::new("SCH")
        .f(1, &[&placer_id, &placer_ns])
        .f(2, &[&filler_id, &filler_ns])
        .f(9, &[&minutes])
        .f(10, &["min"])
        .f(11, &["", "", "", &start, &end])
        .f(25, &[filler_status]);
    if trigger == "S15" {
        sch = sch.f(
            6,
            &[
                reason["code"].as_str().unwrap_or("other"),
                appointment["cancelationReason"]["text"]
                    .as_str()
                    .unwrap_or_default(),
                "HL70000",
            ],
        );
    }
    if let Some(text) = appointment["reasonCode"][0]["text"].as_str() {
        sch = sch.f(7, &["", text]);
    }
    segs.push(sch.encode());
    segs.push(
        Seg::new("TQ1")
            .f(1, &["1"])
            .f(7, &[&start])
            .f(8, &[&end])
            .encode(),
    );
    if let Some(p) = patient {
        segs.push(pid(p).encode());
    }
    segs.push(Seg::new("RGS").f(1, &["1"]).encode());
    let mut n_ail = 0;
    let mut n_aip = 0;
    for (reference, res) in actors {
        let id = res["identifier"][0]["value"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| reference.rsplit('/').next().unwrap_or_default().to_owned());
        if reference.starts_with("Practitioner/") {
            n_aip += 1;
            let family = res["name"][0]["family"].as_str().unwrap_or_default();
            let given = res["name"][0]["given"][0].as_str().unwrap_or_default();
            segs.push(
                Seg::new("AIP")
                    .f(1, &[&n_aip.to_string()])
                    .f(3, &[&id, family, given])
                    .f(6, &[&start])
                    .f(9, &[&minutes])
                    .f(10, &["min"])
                    .f(12, &[filler_status])
                    .encode(),
            );
        } else if reference.starts_with("Location/") {
            n_ail += 1;
            let name = res["name"].as_str().unwrap_or_default();
            segs.push(
                Seg::new("AIL")
                    .f(1, &[&n_ail.to_string()])
                    .f(3, &[&id, "", "", "", "", "", "", "", name])
                    .f(6, &[&start])
                    .f(9, &[&minutes])
                    .f(10, &["min"])
                    .f(12, &[filler_status])
                    .encode(),
            );
        }
    }
    let mut out = segs.join("\r");
    out.push('\r');
    out
}

/// ADT A28 (new person) or A31 (update person) for a patient event.
pub fn adt(
    env: &Envelope,
    trigger: &str,
    control_id: &str,
    now_ms: i64,
    patient: &Value,
) -> String {
    let segs = [
        msh(env, now_ms, &["ADT", trigger, "ADT_A05"], control_id),
        Seg::new("EVN")
            .f(1, &[trigger])
            .f(2, &[&dtm::format_ms(now_ms)])
            .encode(),
        pid(patient).encode(),
        Seg::new("PV1").f(1, &["1"]).f(2, &["N"]).encode(),
    ];
    let mut out = segs.join("\r");
    out.push('\r');
    out
}
