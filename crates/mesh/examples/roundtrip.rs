//! Round trip through a MESH server (normally a local mesh-sandbox): N sends from one mailbox, one inbox listing
//! on the other, then download + acknowledge of each message, checking every body. Prints one JSON line with the
//! wall-clock times and this process's CPU time (utime + stime from /proc/self/stat), for benchmarks.
//!
//! ```text
//! cargo run --release -p mesh --example roundtrip -- --url http://127.0.0.1:8700 --shared-key TestKey --n 100
//! ```
//! Options: --url, --shared-key, --password [password], --from [X26ABC1], --to [X26ABC2],
//! --workflow [TEST_WORKFLOW], --n [100], --size [bytes per payload, 120], --chunk-size [bytes].

use mesh::config::SizeValue;
use mesh::{MailboxConfig, MeshClient, SendOptions};
use std::collections::{HashMap, HashSet};
use std::time::Instant;

/// The allocator of the `carebridge` binary, which runs this client in the hub.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CPU seconds (user, system) of this process. /proc reports clock ticks in USER_HZ, which Linux fixes at 100
/// for user space whatever the kernel's internal tick rate.
fn cpu_seconds() -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return (0.0, 0.0);
    };
    // Fields after the parenthesised command name (which may contain spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 100.0
    };
    (tick(11), tick(12))
}

fn arg(args: &HashMap<String, String>, name: &str, default: &str) -> String {
    args.get(name)
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn mailbox(url: &str, id: &str, password: &str, key: &str, chunk: Option<u64>) -> MailboxConfig {
    MailboxConfig {
        url: Some(url.to_string()),
        mailbox: id.to_string(),
        password: Some(password.to_string()),
        shared_key: Some(key.to_string()),
        chunk_size: chunk.map(SizeValue::Bytes),
        timeout: Some("60s".into()),
        ..Default::default()
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mut args = HashMap::new();
    for pair in raw.chunks(2) {
        match pair {
            [k, v] if k.starts_with("--") => {
                args.insert(k.trim_start_matches("--").to_string(), v.clone());
            }
            _ => return Err(format!("usage: roundtrip --name value ...; got {pair:?}").into()),
        }
    }
    let url = arg(&args, "url", "http://127.0.0.1:8700");
    let key = arg(&args, "shared-key", "TestKey");
    let password = arg(&args, "password", "password");
    let from = arg(&args, "from", "X26ABC1");
    let to = arg(&args, "to", "X26ABC2");
    let workflow = arg(&args, "workflow", "TEST_WORKFLOW");
    let n: usize = arg(&args, "n", "100").parse()?;
    let size: usize = arg(&args, "size", "120").parse()?;
    let chunk: Option<u64> = args.get("chunk-size").map(|c| c.parse()).transpose()?;

    let sender = MeshClient::new(&mailbox(&url, &from, &password, &key, chunk))?;
    let receiver = MeshClient::new(&mailbox(&url, &to, &password, &key, chunk))?;
    sender.handshake().await?;
    receiver.handshake().await?;

    let started = Instant::now();
    let (u0, s0) = cpu_seconds();
    let mut sent = HashMap::new();
    for i in 0..n {
        let mut body = format!("MSH|^~\\&|HUB|RXX|GP|Y01|20300101120000||ADT^A08|RT{i:06}|P|2.4\r")
            .into_bytes();
        body.resize(size.max(body.len()), b'x');
        let id = sender
            .send(
                &to,
                &body,
                SendOptions {
                    workflow_id: workflow.clone(),
                    local_id: Some(format!("roundtrip-{}-{i}", std::process::id())),
                    ..Default::default()
                },
            )
            .await?;
        sent.insert(id, body);
    }
    let t_send = started.elapsed();

    let listed: HashSet<String> = receiver.inbox(None).await?.into_iter().collect();
    let t_list = started.elapsed();
    let missing = sent.keys().filter(|id| !listed.contains(*id)).count();
    if missing > 0 {
        return Err(format!("{missing} sent messages are not in {to}'s inbox").into());
    }

    for (id, body) in &sent {
        let msg = receiver.download(id).await?;
        if &msg.body != body {
            return Err(format!("message {id}: body differs").into());
        }
        receiver.ack(id).await?;
    }
    let elapsed = started.elapsed();
    let (u1, s1) = cpu_seconds();
    let secs = elapsed.as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "client": "carebridge-mesh",
            "n": n,
            "bytes": size,
            "send_s": t_send.as_secs_f64(),
            "list_s": (t_list - t_send).as_secs_f64(),
            "download_ack_s": (elapsed - t_list).as_secs_f64(),
            "elapsed_s": secs,
            "msgs_per_s": if secs > 0.0 { n as f64 / secs } else { 0.0 },
            "cpu_user_s": u1 - u0,
            "cpu_sys_s": s1 - s0,
            "cpu_s": (u1 - u0) + (s1 - s0),
        })
    );
    Ok(())
}
