//! `carebridge slots generate` and `carebridge deliveries list|replay` on a store written by the test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use serde_json::json;
use std::process::Command;
use store::{ResourceType, Store};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_carebridge"))
}

#[test]
fn slots_generate_is_idempotent_and_deliveries_list_runs() {
    let dir = std::env::temp_dir().join(format!("cb-cli-admin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let st = store_sqlite::SqliteStore::open(&dir, store_sqlite::SqliteOptions::default())
            .expect("store");
        let r = rt.block_on(st.write(|tx| {
            booking::write_resource(
                tx,
                ResourceType::Schedule,
                "clinic-1".into(),
                json!({"resourceType": "Schedule", "id": "clinic-1", "active": true, "actor": [{"reference": "Practitioner/p1"}]}),
                Some(0),
            )
        }));
        assert!(matches!(r, Ok(Ok(_))), "{r:?}");
    }
    let generate = |expect: &str| {
        let out = bin()
            .args([
                "slots",
                "generate",
                "--schedule",
                "clinic-1",
                "--days",
                "mon,tue",
                "--open",
                "09:00-10:00",
            ])
            .args([
                "--slot-minutes",
                "30",
                "--from",
                "2030-03-04",
                "--to",
                "2030-03-10",
                "--data-dir",
            ])
            .arg(&dir)
            .output()
            .expect("run");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(expect), "{text}");
    };
    generate("created 4 slot(s), skipped 0");
    generate("created 0 slot(s), skipped 4");

    let bad = bin()
        .args([
            "slots",
            "generate",
            "--schedule",
            "nope",
            "--days",
            "mon",
            "--open",
            "09:00-10:00",
        ])
        .args([
            "--slot-minutes",
            "30",
            "--from",
            "2030-03-04",
            "--to",
            "2030-03-04",
            "--data-dir",
        ])
        .arg(&dir)
        .output()
        .expect("run");
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("refused"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    let list = bin()
        .args(["deliveries", "list", "--state", "dead", "--data-dir"])
        .arg(&dir)
        .output()
        .expect("run");
    assert!(list.status.success());
    let replay = bin()
        .args(["deliveries", "replay", "--subscription", "s1", "--data-dir"])
        .arg(&dir)
        .output()
        .expect("run");
    assert_eq!(
        replay.status.code(),
        Some(2),
        "replay without a selector is refused"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
