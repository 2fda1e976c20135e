//! Throughput check of the PostgreSQL store (not a test; prints numbers), the counterpart of store-sqlite's
//! `write_bench` (same resource, index rows and event per write).
//!
//! `CAREBRIDGE_TEST_DATABASE_URL=... cargo run --release -p store-postgres --example pg_write_bench [puts] [tasks] [fail_every]`
//!
//! On a fresh database of that server, for each way of isolating writes inside a group-committed batch
//! (recorded changes replayed after a failure, the default; a SAVEPOINT per write): `puts` creates (default
//! 20,000) from `tasks` concurrent tasks (default 32), reporting puts/s and p50/p99 latency; then, on the
//! first 10,000 rows, point reads/s and identifier searches/s from one task. With `fail_every` = N > 0,
//! every Nth put is followed by a write that puts a resource and then fails (rolled back). With
//! `PG_BENCH_KEEP` set the databases are kept (for EXPLAIN), else dropped.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use store::{IndexEntry, IndexValue, NewEvent, Predicate, Put, ResourceType, SearchQuery, Store};
use store_postgres::testing::TestDatabase;
use store_postgres::{PgOptions, PgStore};

const NHS: &str = "https://fhir.nhs.uk/Id/nhs-number";

fn patient(n: usize) -> (Value, Vec<IndexEntry>) {
    let nhs = format!("{:010}", 9_000_000_000u64 + n as u64);
    let family = format!("family{n:06}");
    let resource = json!({
        "resourceType": "Patient",
        "meta": {"profile": ["https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient"]},
        "identifier": [
            {"system": NHS, "value": nhs,
             "extension": [{"url": "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-NHSNumberVerificationStatus",
                            "valueCodeableConcept": {"coding": [{"system": "https://fhir.hl7.org.uk/CodeSystem/UKCore-NHSNumberVerificationStatusEngland", "code": "01", "display": "Number present and verified"}]}}]},
            {"system": "https://example.nhs.uk/Id/local-mrn", "value": format!("MRN{n:08}")}
        ],
        "active": true,
        "name": [{"use": "official", "family": family, "given": ["Alexandra", "Jane"], "prefix": ["Ms"]}],
        "telecom": [{"system": "phone", "value": "01632 960587", "use": "home"}, {"system": "email", "value": format!("patient{n}@example.com")}],
        "gender": "female",
        "birthDate": "1984-07-19",
        "address": [{"use": "home", "line": ["1 Example Street", "Flat 2"], "city": "Leeds", "district": "West Yorkshire", "postalCode": "LS1 4AP", "country": "GB"}],
        "generalPractitioner": [{"reference": "Organization/Y12345", "identifier": {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "Y12345"}}],
        "managingOrganization": {"reference": "Organization/RR8"},
        "contact": [{"relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0131", "code": "N", "display": "Next-of-Kin"}]}],
                     "name": {"family": "Doe", "given": ["John"]}, "telecom": [{"system": "phone", "value": "01632 960123"}]}]
    });
    let tok = |param, system: &str, code: &str| IndexEntry {
        param,
        value: IndexValue::Token {
            system: Some(system.to_string()),
            code: code.to_string(),
        },
    };
    let index = vec![
        tok("identifier", NHS, &nhs),
        tok(
            "identifier",
            "https://example.nhs.uk/Id/local-mrn",
            &format!("MRN{n:08}"),
        ),
        tok(
            "gender",
            "http://hl7.org/fhir/administrative-gender",
            "female",
        ),
        IndexEntry {
            param: "family",
            value: IndexValue::String {
                exact: family.to_uppercase(),
                value: family,
            },
        },
        IndexEntry {
            param: "given",
            value: IndexValue::String {
                value: "alexandra".into(),
                exact: "Alexandra".into(),
            },
        },
        IndexEntry {
            param: "birthdate",
            value: IndexValue::Date {
                low_ms: 459_043_200_000,
                high_ms: 459_129_599_999,
            },
        },
        IndexEntry {
            param: "general-practitioner",
            value: IndexValue::Reference("Organization/Y12345".into()),
        },
        IndexEntry {
            param: "organization",
            value: IndexValue::Reference("Organization/RR8".into()),
        },
    ];
    (resource, index)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn bench(
    server: &str,
    savepoint_per_write: bool,
    puts: usize,
    tasks: usize,
    fail_every: usize,
) {
    let db = TestDatabase::create(server, "bench").unwrap();
    store_postgres::migrate(db.url()).unwrap();
    let store = Arc::new(
        PgStore::connect(
            db.url(),
            PgOptions {
                savepoint_per_write,
                ..PgOptions::default()
            },
        )
        .unwrap(),
    );
    let mode = if savepoint_per_write {
        "savepoint per write"
    } else {
        "replay on failure"
    };
    let json_len = serde_json::to_string(&patient(0).0).unwrap().len();

    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                for n in (t..puts).step_by(tasks) {
                    let (resource, index) = patient(n);
                    let id = format!("p{n}");
                    let put = Put {
                        rtype: ResourceType::Patient,
                        id: id.clone(),
                        resource,
                        index,
                        expected_version: None,
                        body: None,
                    };
                    let t0 = Instant::now();
                    store
                        .write(move |tx| {
                            let s = tx.put(put)?;
                            tx.append_event(NewEvent {
                                subject: format!("Patient/{id}"),
                                kind: "patient.registered".into(),
                                rtype: ResourceType::Patient,
                                id,
                                version: s.version,
                                data: Value::Null,
                            })
                        })
                        .await
                        .unwrap();
                    lat.push(t0.elapsed());
                    if fail_every > 0 && n % fail_every == 0 {
                        let (resource, index) = patient(n);
                        let r: store::Result<()> = store
                            .write(move |tx| {
                                tx.put(Put {
                                    rtype: ResourceType::Patient,
                                    id: format!("failed{n}"),
                                    resource,
                                    index,
                                    expected_version: None,
                                    body: None,
                                })?;
                                Err(store::StoreError::Conflict("refused".into()))
                            })
                            .await;
                        assert!(r.is_err());
                    }
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::with_capacity(puts);
    for h in handles {
        lat.extend(h.await.unwrap());
    }
    let elapsed = start.elapsed();
    lat.sort();
    let failing = if fail_every > 0 {
        format!(" (+ {} failing writes)", puts.div_ceil(fail_every))
    } else {
        String::new()
    };
    println!(
        "PostgreSQL, {mode}: {puts} puts{failing} ({json_len} B JSON, 8 index rows, 1 event) from {tasks} tasks \
         in {:.2} s: {:.0} puts/s, latency p50 {:.2} ms, p99 {:.2} ms",
        elapsed.as_secs_f64(),
        puts as f64 / elapsed.as_secs_f64(),
        pct(&lat, 0.50).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
    );

    let rows = puts.min(10_000);
    let n_reads = 20_000;
    let t0 = Instant::now();
    for i in 0..n_reads {
        let id = format!("p{}", (i * 7919) % rows);
        assert!(
            store
                .read(ResourceType::Patient, &id)
                .await
                .unwrap()
                .is_some()
        );
    }
    let e = t0.elapsed();
    println!(
        "  point reads (one task): {:.0}/s ({:.1} µs each)",
        n_reads as f64 / e.as_secs_f64(),
        e.as_secs_f64() * 1e6 / n_reads as f64
    );
    let n_search = 10_000;
    let t0 = Instant::now();
    for i in 0..n_search {
        let n = (i * 7919) % rows;
        let q = SearchQuery::new(ResourceType::Patient).with(
            "identifier",
            Predicate::Token {
                system: Some(NHS.into()),
                code: Some(format!("{:010}", 9_000_000_000u64 + n as u64)),
            },
        );
        assert_eq!(store.search(&q).await.unwrap().resources.len(), 1);
    }
    let e = t0.elapsed();
    println!(
        "  identifier searches (one task): {:.0}/s ({:.1} µs each)",
        n_search as f64 / e.as_secs_f64(),
        e.as_secs_f64() * 1e6 / n_search as f64
    );
    let n_family = 2_000;
    let t0 = Instant::now();
    for i in 0..n_family {
        let q = SearchQuery::new(ResourceType::Patient).with(
            "family",
            Predicate::String {
                value: format!("family{:05}", (i * 31) % (rows / 10)),
                exact: None,
            },
        );
        assert_eq!(
            store.search(&q).await.unwrap().resources.len(),
            10.min(rows)
        );
    }
    let e = t0.elapsed();
    println!(
        "  family prefix searches (10 hits each, one task): {:.0}/s ({:.1} µs each)",
        n_family as f64 / e.as_secs_f64(),
        e.as_secs_f64() * 1e6 / n_family as f64
    );
    drop(store);
    if std::env::var_os("PG_BENCH_KEEP").is_some() {
        println!("  kept database {}", db.name());
        std::mem::forget(db);
    }
}

fn main() {
    let Ok(server) = std::env::var(store_postgres::testing::TEST_DATABASE_ENV) else {
        eprintln!(
            "set {} (e.g. from `cargo xtask pg`)",
            store_postgres::testing::TEST_DATABASE_ENV
        );
        std::process::exit(2);
    };
    let mut args = std::env::args().skip(1);
    let puts: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let tasks: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(32);
    let fail_every: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        bench(&server, false, puts, tasks, fail_every).await;
        bench(&server, true, puts, tasks, fail_every).await;
    });
}
