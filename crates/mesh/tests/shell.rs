//! The HTTP shell against a scripted loopback server: retries, fresh tokens, and the reconciliation of a send
//! whose first chunk had an uncertain outcome (never resent while MESH may hold it).

#![allow(clippy::unwrap_used, reason = "tests")]

use mesh::{Error, MailboxConfig, MeshClient, RetryPolicy, SendOptions};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

enum Reply {
    Respond(u16, &'static str, String),
    /// Read the request, then close the connection without answering.
    Drop,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// Serve on a loopback port; `script(request, index)` decides each answer. Every answer closes the
/// connection, so each request is on a fresh connection (no pooled-connection retries inside the HTTP stack).
async fn serve(script: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) -> (String, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let log2 = log.clone();
    let script = Arc::new(script);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let log = log2.clone();
            let script = script.clone();
            tokio::spawn(async move {
                let Some(seen) = read_request(&mut sock).await else {
                    return;
                };
                let index = {
                    let mut l = log.lock().unwrap();
                    l.push(seen.clone());
                    l.len() - 1
                };
                match script(&seen, index) {
                    Reply::Drop => {
                        let _ = sock.shutdown().await;
                    }
                    Reply::Respond(status, ct, body) => {
                        let head = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: {ct}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = sock.write_all(head.as_bytes()).await;
                        let _ = sock.write_all(body.as_bytes()).await;
                        let _ = sock.shutdown().await;
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), log)
}

async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        let n = sock.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = sock.read(&mut tmp).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    Some(Seen {
        method,
        path,
        headers,
        body,
    })
}

fn client(url: &str, chunk_size: Option<u64>) -> MeshClient {
    let cfg = MailboxConfig {
        url: Some(url.to_string()),
        mailbox: "X26ABC1".into(),
        password: Some("password".into()),
        shared_key: Some("TestKey".into()),
        chunk_size: chunk_size.map(mesh::config::SizeValue::Bytes),
        timeout: Some("5s".into()),
        ..Default::default()
    };
    MeshClient::new(&cfg).unwrap().with_retry(RetryPolicy {
        attempts: 3,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
    })
}

fn opts(local: &str) -> SendOptions {
    SendOptions {
        workflow_id: "TEST_WORKFLOW".into(),
        local_id: Some(local.into()),
        ..Default::default()
    }
}

const V2: &str = "application/vnd.mesh.v2+json";

fn posts_to_outbox(log: &Log) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .filter(|s| s.method == "POST" && s.path.ends_with("/outbox"))
        .count()
}

#[tokio::test]
async fn uncertain_first_chunk_found_by_local_id_is_not_resent() {
    let (url, log) = serve(|req, _| {
        if req.method == "POST" {
            Reply::Drop
        } else if req.path == "/messageexchange/X26ABC1/outbox/tracking/local-42" {
            Reply::Respond(
                200,
                "application/json",
                r#"{"messageId":"M-RECON","localId":"local-42","status":"Accepted"}"#.into(),
            )
        } else {
            Reply::Respond(404, "application/json", "{}".into())
        }
    })
    .await;
    let sent = client(&url, None)
        .send_detailed("X26ABC2", b"hello", opts("local-42"))
        .await
        .unwrap();
    assert_eq!(sent.message_id, "M-RECON");
    assert!(sent.reconciled);
    assert_eq!(posts_to_outbox(&log), 1, "{:?}", log.lock().unwrap());
}

#[tokio::test]
async fn uncertain_first_chunk_absent_from_tracking_is_resent_once() {
    // The first POST is lost (connection closed unanswered); tracking finds nothing; the resend is accepted.
    let (url, log) = serve(|req, i| {
        if req.method == "POST" && i == 0 {
            Reply::Drop
        } else if req.method == "POST" {
            Reply::Respond(202, V2, r#"{"message_id":"M2"}"#.into())
        } else {
            Reply::Respond(404, "application/json", "{}".into())
        }
    })
    .await;
    let sent = client(&url, None)
        .send_detailed("X26ABC2", b"hello", opts("local-7"))
        .await
        .unwrap();
    assert_eq!(sent.message_id, "M2");
    assert!(!sent.reconciled);
    let seen = log.lock().unwrap().clone();
    let kinds: Vec<String> = seen
        .iter()
        .map(|s| format!("{} {}", s.method, s.path))
        .collect();
    assert_eq!(
        kinds,
        [
            "POST /messageexchange/X26ABC1/outbox",
            "GET /messageexchange/X26ABC1/outbox/tracking/local-7",
            "POST /messageexchange/X26ABC1/outbox",
        ]
    );
    // Each attempt has its own token (nonce and count differ).
    let tokens: Vec<&str> = seen
        .iter()
        .map(|s| s.header("authorization").unwrap())
        .collect();
    assert!(tokens.iter().all(|t| t.starts_with("NHSMESH X26ABC1:")));
    assert_ne!(tokens[0], tokens[2]);
    assert_eq!(seen[0].body, b"hello");
    assert_eq!(seen[2].body, b"hello");
}

#[tokio::test]
async fn unresolvable_uncertainty_is_reported_not_resent() {
    let (url, log) = serve(|req, _| {
        if req.method == "POST" {
            Reply::Respond(502, "text/html", "<h1>bad gateway</h1>".into())
        } else {
            Reply::Respond(403, "application/json", "".into())
        }
    })
    .await;
    let err = client(&url, None)
        .send("X26ABC2", b"hello", opts("local-9"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::SendUncertain { local_id, reason } if local_id == "local-9" && reason.contains("502")),
        "{err}"
    );
    assert_eq!(posts_to_outbox(&log), 1);
}

#[tokio::test]
async fn refusal_of_first_chunk_is_final() {
    let (url, log) = serve(|_, _| {
        Reply::Respond(
            417,
            V2,
            r#"{"detail":[{"event":"SEND","code":"12","msg":"Unregistered to address"}]}"#.into(),
        )
    })
    .await;
    let err = client(&url, None)
        .send("NOBODY", b"hello", opts("l"))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(417));
    assert_eq!(err.mesh_code(), Some("12"));
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn other_requests_retry_on_5xx_and_lost_connections() {
    let (url, log) = serve(|_, i| match i {
        0 => Reply::Respond(503, "text/plain", "busy".into()),
        1 => Reply::Drop,
        _ => Reply::Respond(200, V2, r#"{"messages":["A","B"],"links":{}}"#.into()),
    })
    .await;
    let ids = client(&url, None).inbox(None).await.unwrap();
    assert_eq!(ids, ["A", "B"]);
    assert_eq!(log.lock().unwrap().len(), 3);

    let (url, log) = serve(|_, _| Reply::Respond(503, "text/plain", "busy".into())).await;
    let err = client(&url, None).inbox(None).await.unwrap_err();
    assert_eq!(err.status(), Some(503));
    assert_eq!(
        log.lock().unwrap().len(),
        3,
        "three attempts, then the 503 is reported"
    );
}

#[tokio::test]
async fn chunked_send_with_lost_answer_on_last_chunk() {
    // Chunk 3's first answer is lost; its retry meets 423 "finalised", which proves it was stored.
    let (url, log) = serve(|req, i| {
        if req.path.ends_with("/outbox") || req.path.ends_with("/outbox/MC/2") {
            Reply::Respond(202, V2, r#"{"message_id":"MC"}"#.into())
        } else if i == 2 {
            Reply::Drop
        } else {
            Reply::Respond(423, V2, "{}".into())
        }
    })
    .await;
    let payload: Vec<u8> = (0..2500u32).map(|i| (i % 7) as u8).collect();
    let sent = client(&url, Some(1000))
        .send_detailed("X26ABC2", &payload, opts("chunky"))
        .await
        .unwrap();
    assert_eq!(sent.message_id, "MC");
    assert_eq!(sent.chunks, 3);
    assert!(sent.compressed);
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(seen[0].header("mex-chunk-range"), Some("1:3"));
    assert_eq!(seen[0].header("content-encoding"), Some("gzip"));
    assert_eq!(seen[1].header("mex-chunk-range"), Some("2:3"));
    assert_eq!(seen[3].header("mex-chunk-range"), Some("3:3"));
    let joined: Vec<u8> = [&seen[0], &seen[1], &seen[2]]
        .iter()
        .flat_map(|s| mesh::chunk::gunzip(&s.body).unwrap())
        .collect();
    assert_eq!(joined, payload);
}

#[tokio::test]
async fn inbox_follows_next_links_and_refuses_foreign_ones() {
    let (url, _log) = serve(|req, _| {
        if req.path.contains("continue_from=p2") {
            Reply::Respond(200, V2, r#"{"messages":["C"],"links":{}}"#.into())
        } else {
            Reply::Respond(
                200,
                V2,
                r#"{"messages":["A","B"],"links":{"next":"/messageexchange/X26ABC1/inbox?continue_from=p2"}}"#
                    .into(),
            )
        }
    })
    .await;
    assert_eq!(
        client(&url, None).inbox(None).await.unwrap(),
        ["A", "B", "C"]
    );
    assert_eq!(client(&url, None).inbox(Some(2)).await.unwrap(), ["A", "B"]);

    let (url, log) = serve(|_, _| {
        Reply::Respond(
            200,
            V2,
            r#"{"messages":["A"],"links":{"next":"http://elsewhere.invalid/messageexchange/X26ABC1/inbox"}}"#.into(),
        )
    })
    .await;
    assert!(matches!(
        client(&url, None).inbox(None).await,
        Err(Error::Malformed(_))
    ));
    assert_eq!(log.lock().unwrap().len(), 1);

    let (url, _log) = serve(|_, _| {
        Reply::Respond(
            200,
            V2,
            r#"{"messages":["A"],"links":{"next":"/messageexchange/X26ABC1/inbox?continue_from=same"}}"#.into(),
        )
    })
    .await;
    assert!(matches!(
        client(&url, None).inbox(None).await,
        Err(Error::Malformed(m)) if m.contains("repeats")
    ));
}

#[tokio::test]
async fn connection_refused_is_a_transport_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let err = client(&url, None).handshake().await.unwrap_err();
    assert!(matches!(err, Error::Transport(_)), "{err}");
    // A refused connection proves the first chunk was not sent, so a send just fails (no tracking needed).
    let err = client(&url, None)
        .send("X26ABC2", b"x", opts("l"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Transport(_)), "{err}");
}

/// Serve on a loopback port, keeping each connection open for up to `per_connection` answers (200, `{}`), then
/// closing it while idle, as servers do after their keep-alive limit. Returns the URL, the number of
/// connections accepted and the request log.
async fn serve_kept_alive(per_connection: usize) -> (String, Arc<Mutex<usize>>, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let connections = Arc::new(Mutex::new(0usize));
    let (log2, connections2) = (log.clone(), connections.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            *connections2.lock().unwrap() += 1;
            let log = log2.clone();
            tokio::spawn(async move {
                for _ in 0..per_connection {
                    let Some(seen) = read_request(&mut sock).await else {
                        return;
                    };
                    log.lock().unwrap().push(seen);
                    let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                    if sock.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
                let _ = sock.shutdown().await;
            });
        }
    });
    (format!("http://{addr}"), connections, log)
}

#[tokio::test]
async fn requests_share_a_kept_alive_connection() {
    let (url, connections, log) = serve_kept_alive(100).await;
    let c = client(&url, None);
    for _ in 0..5 {
        c.handshake().await.unwrap();
    }
    assert_eq!(log.lock().unwrap().len(), 5);
    assert_eq!(
        *connections.lock().unwrap(),
        1,
        "one connection for five requests"
    );
}

#[tokio::test]
async fn a_connection_the_server_closed_while_idle_is_replaced_without_a_retry() {
    // One answer per connection, closed afterwards without `connection: close`: the client only learns of the
    // close when the connection is idle in its pool, and must open a new one rather than fail or resend.
    let (url, connections, log) = serve_kept_alive(1).await;
    let c = client(&url, None);
    for _ in 0..3 {
        c.handshake().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = log.lock().unwrap();
    assert_eq!(seen.len(), 3, "each handshake reached the server once");
    assert_eq!(*connections.lock().unwrap(), 3);
    // Every request carried its own token (nonce and count change), as MESH requires.
    let tokens: std::collections::HashSet<_> = seen
        .iter()
        .map(|s| s.header("authorization").unwrap().to_string())
        .collect();
    assert_eq!(tokens.len(), 3);
}

/// The half of `a_proxy_from_the_environment_carries_every_request` that runs in a child process with the proxy
/// variables set (the environment is process-wide, and this crate forbids the `unsafe` of `set_var`). In a
/// normal run the variable is absent and there is nothing to do.
#[tokio::test]
async fn proxied_child() {
    let Ok(target) = std::env::var("MESH_TEST_PROXIED_URL") else {
        return;
    };
    client(&target, None).handshake().await.unwrap();
}

#[tokio::test]
async fn a_proxy_from_the_environment_carries_every_request() {
    let (proxy, log) = serve(|_, _| Reply::Respond(200, "application/json", "{}".into())).await;
    let exe = std::env::current_exe().unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(exe)
            .args(["proxied_child", "--exact", "--nocapture"])
            .env("HTTP_PROXY", &proxy)
            .env("MESH_TEST_PROXIED_URL", "http://mesh.invalid:9")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "child failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = log.lock().unwrap();
    assert_eq!(seen.len(), 1, "the handshake went through the proxy");
    // A forward proxy gets the absolute URL of the MESH host, which itself was never resolved.
    assert_eq!(
        seen[0].path,
        "http://mesh.invalid:9/messageexchange/X26ABC1"
    );
    assert!(
        seen[0]
            .header("authorization")
            .is_some_and(|a| a.starts_with("NHSMESH "))
    );
}
