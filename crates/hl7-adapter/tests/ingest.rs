//! The adapter against the embedded store: exactly-once, ACK codes, mapping through the booking engine, and
//! late or out-of-order messages.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use hl7_adapter::{Ingest, Options, Outcome};
use serde_json::Value;
use store::{Predicate, ResourceType as RT, SearchQuery, Store};
use store_sqlite::SqliteStore;

struct Env {
    _dir: tempdir::Dir,
    store: Arc<SqliteStore>,
    ingest: Ingest<SqliteStore>,
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    pub fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!(
            "cb-hl7-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

fn env(name: &str) -> Env {
    env_with(name, Options::default())
}

fn env_with(name: &str, opts: Options) -> Env {
    let dir = tempdir::new(name);
    let store = Arc::new(SqliteStore::open(&dir.0, Default::default()).unwrap());
    let ingest = Ingest::new(store.clone(), opts);
    Env {
        _dir: dir,
        store,
        ingest,
    }
}

const NHS: &str = "9449305552";

fn adt(trigger: &str, control: &str, time: &str, pid3: &str, family: &str) -> String {
    format!(
        "MSH|^~\\&|PAS|RXX|HUB|RXX|{time}||ADT^{trigger}^ADT_A05|{control}|P|2.4\rEVN|{trigger}|{time}\rPID|1||{pid3}||{family}^Jane^Q||19800102|F|||1 High Street^^Leeds^^LS1 1AA^GBR\rPV1|1|N\r"
    )
}

/// An SIU message for appointment `placer` at `start` (HHMM on 2030-03-04, local time) lasting 30 minutes.
fn siu(trigger: &str, control: &str, time: &str, placer: &str, start_hhmm: &str) -> String {
    let h: u32 = start_hhmm[..2].parse().unwrap();
    let m: u32 = start_hhmm[2..].parse().unwrap();
    let end = format!("{:02}{:02}", h + (m + 30) / 60, (m + 30) % 60);
    format!(
        "MSH|^~\\&|PAS|RXX|HUB|RXX|{time}||SIU^{trigger}^SIU_S12|{control}|P|2.5.1\r\
SCH|{placer}^PAS|F{placer}^PAS||||pat-cpp^Patient cancelled^HL70276|ROUTINE^Routine||30|min|^^^20300304{start_hhmm}^20300304{end}|||||||||||||||Booked\r\
TQ1|1||||||20300304{start_hhmm}00|20300304{end}00\r\
PID|1||{NHS}^^^NHS^NH~M123^^^RXX^MR||Smith^Jane||19800102|F\r\
RGS|1\r\
AIS|1||OPD^Outpatients^L\r\
AIP|1||C123^Jones^Anna^^^^^^GMC|||20300304{start_hhmm}00|||30|min\r\
AIL|1||CLINIC1^ROOM2^^RXX|||20300304{start_hhmm}00|||30|min\r"
    )
}

async fn ack_code(env: &Env, msg: &str) -> (String, hl7_adapter::Handled) {
    let h = env.ingest.handle(msg.as_bytes()).await.unwrap();
    let ack = hl7::Message::parse(h.ack.as_bytes()).unwrap();
    (ack.get("MSA-1").unwrap_or_default(), h)
}

async fn event_count(store: &SqliteStore) -> usize {
    store.events_after(0, 100_000).await.unwrap().len()
}

async fn appointments(store: &SqliteStore) -> Vec<Value> {
    let r = store
        .search(&SearchQuery::new(RT::Appointment))
        .await
        .unwrap();
    r.resources
        .iter()
        .map(|s| serde_json::from_str(&s.json).unwrap())
        .collect()
}

async fn slot_statuses(store: &SqliteStore) -> Vec<(String, String)> {
    let r = store.search(&SearchQuery::new(RT::Slot)).await.unwrap();
    let mut v: Vec<(String, String)> = r
        .resources
        .iter()
        .map(|s| {
            let j: Value = serde_json::from_str(&s.json).unwrap();
            (
                j["start"].as_str().unwrap().to_owned(),
                j["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adt_registers_and_a_resend_changes_nothing() {
    let env = env("resend");
    let msg = adt(
        "A28",
        "C1",
        "20300101120000",
        &format!("{NHS}^^^NHS^NH"),
        "Smith",
    );
    let (code, first) = ack_code(&env, &msg).await;
    assert_eq!(code, "AA");
    assert_eq!(first.outcome, Outcome::Applied);
    let events = event_count(&env.store).await;
    assert_eq!(events, 1, "patient.registered");
    let (code, again) = ack_code(&env, &msg).await;
    assert_eq!(code, "AA");
    assert!(again.duplicate);
    assert_eq!(
        again.ack, first.ack,
        "a resend gets the original ACK byte for byte"
    );
    assert_eq!(
        event_count(&env.store).await,
        events,
        "nothing applied twice"
    );

    // The HN variant of the NHS number type finds the same patient; an A31 updates it.
    let upd = adt(
        "A31",
        "C2",
        "20300101130000",
        &format!("{NHS}^^^^HN"),
        "Smythe",
    );
    assert_eq!(ack_code(&env, &upd).await.0, "AA");
    let q = SearchQuery::new(RT::Patient).with(
        "identifier",
        Predicate::Token {
            system: Some(fhir::NHS_NUMBER_SYSTEM.into()),
            code: Some(NHS.into()),
        },
    );
    let found = env.store.search(&q).await.unwrap().resources;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].version, 2);
    assert!(found[0].json.contains("Smythe"));

    // An older A08/A31 (by EVN-2) than the last applied one changes nothing.
    let old = adt(
        "A31",
        "C3",
        "20300101125000",
        &format!("{NHS}^^^NHS^NH"),
        "Older",
    );
    let (code, h) = ack_code(&env, &old).await;
    assert_eq!(code, "AA");
    assert_eq!(h.outcome, Outcome::Stale);
    let found = env.store.search(&q).await.unwrap().resources;
    assert_eq!(found[0].version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_leave_the_store_unchanged() {
    let env = env("refuse");
    // Invalid NHS number (check digit): AE naming PID-3.
    let bad = adt(
        "A28",
        "B1",
        "20300101120000",
        "9449305553^^^NHS^NH",
        "Smith",
    );
    let (code, h) = ack_code(&env, &bad).await;
    assert_eq!(code, "AE");
    let ack = hl7::Message::parse(h.ack.as_bytes()).unwrap();
    assert!(
        ack.get("ERR-2").unwrap_or_default().contains("PID"),
        "{}",
        h.ack
    );
    assert!(
        ack.get("ERR-8").unwrap_or_default().contains("NHS number"),
        "{}",
        h.ack
    );
    // Structural: no patient identifier at all.
    let empty = adt("A28", "B2", "20300101120000", "", "Smith");
    assert_eq!(ack_code(&env, &empty).await.0, "AR");
    // Unsupported message type.
    let orm = "MSH|^~\\&|PAS|RXX|HUB|RXX|20300101120000||ORM^O01|B3|P|2.4\rPID|1||1^^^X^MR\r";
    assert_eq!(ack_code(&env, orm).await.0, "AR");
    // Not HL7 at all.
    assert_eq!(ack_code(&env, "hello").await.0, "AR");
    assert_eq!(event_count(&env.store).await, 0);
    // A resend of the refused message gets the same AE.
    let (code, again) = ack_code(&env, &bad).await;
    assert_eq!(code, "AE");
    assert!(again.duplicate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn siu_books_reschedules_and_cancels_through_the_booking_engine() {
    let env = env("siu");
    let (code, h) = ack_code(&env, &siu("S12", "S1", "20300101090000", "A1", "0930")).await;
    assert_eq!(code, "AA", "{}", h.ack);
    let appts = appointments(&env.store).await;
    assert_eq!(appts.len(), 1);
    assert_eq!(appts[0]["status"], "booked");
    // 09:30 London in March 2030 is GMT.
    assert_eq!(appts[0]["start"], "2030-03-04T09:30:00.000Z");
    assert_eq!(
        slot_statuses(&env.store).await,
        [("2030-03-04T09:30:00.000Z".into(), "busy".into())]
    );

    let (code, _) = ack_code(&env, &siu("S13", "S2", "20300101100000", "A1", "1100")).await;
    assert_eq!(code, "AA");
    assert_eq!(
        slot_statuses(&env.store).await,
        [
            ("2030-03-04T09:30:00.000Z".into(), "free".into()),
            ("2030-03-04T11:00:00.000Z".into(), "busy".into())
        ]
    );
    // A second appointment in the held slot is refused with AE and changes nothing.
    let before = event_count(&env.store).await;
    let (code, h) = ack_code(&env, &siu("S12", "S3", "20300101100500", "A2", "1100")).await;
    assert_eq!(code, "AE", "{}", h.ack);
    assert_eq!(event_count(&env.store).await, before);

    let (code, _) = ack_code(&env, &siu("S15", "S4", "20300101110000", "A1", "1100")).await;
    assert_eq!(code, "AA");
    let a = &appointments(&env.store).await[0];
    assert_eq!(a["status"], "cancelled");
    assert_eq!(a["cancelationReason"]["coding"][0]["code"], "pat-cpp");
    assert!(
        slot_statuses(&env.store)
            .await
            .iter()
            .all(|(_, s)| s == "free")
    );
    // A newer S13 cannot revive the cancelled appointment.
    let (code, _) = ack_code(&env, &siu("S13", "S5", "20300101120000", "A1", "1200")).await;
    assert_eq!(code, "AE");
    assert_eq!(appointments(&env.store).await[0]["status"], "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shuffled_sequences_end_in_the_same_state() {
    let msgs = [
        siu("S12", "P1", "20300101090000", "Q1", "0930"),
        siu("S13", "P2", "20300101100000", "Q1", "1000"),
        siu("S15", "P3", "20300101110000", "Q1", "1000"),
    ];
    let orders = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    for (n, order) in orders.iter().enumerate() {
        let env = env(&format!("shuffle{n}"));
        for &i in order {
            let (code, h) = ack_code(&env, &msgs[i]).await;
            assert_eq!(code, "AA", "order {order:?}, message {i}: {}", h.ack);
        }
        let appts = appointments(&env.store).await;
        assert_eq!(appts.len(), 1, "order {order:?}");
        assert_eq!(appts[0]["status"], "cancelled", "order {order:?}");
        assert!(
            slot_statuses(&env.store)
                .await
                .iter()
                .all(|(_, s)| s == "free"),
            "order {order:?}: {:?}",
            slot_statuses(&env.store).await
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_modifications_and_parked_timeouts() {
    let env = env_with("stale", Options { park_timeout_ms: 0 });
    assert_eq!(
        ack_code(&env, &siu("S12", "T1", "20300101090000", "R1", "0930"))
            .await
            .0,
        "AA"
    );
    assert_eq!(
        ack_code(&env, &siu("S13", "T2", "20300101100000", "R1", "1000"))
            .await
            .0,
        "AA"
    );
    let version = env
        .store
        .search(&SearchQuery::new(RT::Appointment))
        .await
        .unwrap()
        .resources[0]
        .version;
    // An S14 older than the reschedule changes nothing.
    let (code, h) = ack_code(&env, &siu("S14", "T3", "20300101093000", "R1", "0930")).await;
    assert_eq!(code, "AA");
    assert_eq!(h.outcome, Outcome::Stale);
    let after = env
        .store
        .search(&SearchQuery::new(RT::Appointment))
        .await
        .unwrap()
        .resources;
    assert_eq!(after[0].version, version);

    // A cancel for an appointment that never arrives: parked, then (timeout 0) a dead letter at the sweep.
    let orphan = siu("S15", "T4", "20300101100000", "NEVER", "1000");
    let (code, h) = ack_code(&env, &orphan).await;
    assert_eq!(code, "AA");
    assert_eq!(h.outcome, Outcome::Parked);
    assert_eq!(env.ingest.sweep().await.unwrap(), 1);
    let (code, h) = ack_code(&env, &orphan).await;
    assert_eq!(code, "AE", "a resend of a dead letter gets its AE");
    assert_eq!(h.outcome, Outcome::DeadLetter);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noshow_entered_in_error_and_merge() {
    let env = env("misc");
    // A no-show can only be recorded once the appointment has started (and a booking must not end in the
    // past): this one started 10 minutes ago.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let (start, end) = (
        hl7_adapter::dtm::format_ms(now - 600_000),
        hl7_adapter::dtm::format_ms(now + 1_200_000),
    );
    let started = |m: String| {
        let m = m.replace(
            "TQ1|1||||||20300304093000|20300304100000",
            &format!("TQ1|1||||||{start}|{end}"),
        );
        m.replace("^^^203003040930^203003041000", "")
    };
    let (code, h) = ack_code(
        &env,
        &started(siu("S12", "M1", "20200101090000", "N1", "0930")),
    )
    .await;
    assert_eq!(code, "AA", "{}", h.ack);
    let (code, h) = ack_code(
        &env,
        &started(siu("S26", "M2", "20200101100000", "N1", "0930")),
    )
    .await;
    assert_eq!(code, "AA", "{}", h.ack);
    assert_eq!(appointments(&env.store).await[0]["status"], "noshow");
    assert_eq!(
        ack_code(&env, &siu("S12", "M3", "20300101090000", "N2", "1030"))
            .await
            .0,
        "AA"
    );
    assert_eq!(
        ack_code(&env, &siu("S17", "M4", "20300101100000", "N2", "1030"))
            .await
            .0,
        "AA"
    );
    let statuses: Vec<String> = appointments(&env.store)
        .await
        .iter()
        .map(|a| a["status"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        statuses.contains(&"entered-in-error".to_owned()),
        "{statuses:?}"
    );

    // A40: the MRN-only duplicate merges into the NHS-numbered patient.
    assert_eq!(
        ack_code(
            &env,
            &adt("A28", "M5", "20300101110000", "DUP9^^^RXX^MR", "Dupe")
        )
        .await
        .0,
        "AA"
    );
    let a40 = format!(
        "MSH|^~\\&|PAS|RXX|HUB|RXX|20300101120000||ADT^A40^ADT_A39|M6|P|2.4\rEVN|A40|20300101120000\rPID|1||{NHS}^^^NHS^NH||Smith^Jane\rMRG|DUP9^^^RXX^MR\r"
    );
    let (code, h) = ack_code(&env, &a40).await;
    assert_eq!(code, "AA", "{}", h.ack);
    let q = SearchQuery::new(RT::Patient).with(
        "identifier",
        Predicate::Token {
            system: Some("urn:carebridge:hl7:mrn:RXX".into()),
            code: Some("DUP9".into()),
        },
    );
    let dup = &env.store.search(&q).await.unwrap().resources[0];
    assert!(dup.json.contains("\"active\":false"), "{}", dup.json);
    assert!(dup.json.contains("replaced-by"));
}
