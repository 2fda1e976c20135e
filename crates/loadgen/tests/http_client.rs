//! The HTTP client against a scripted raw-TCP server: framing (Content-Length, chunked, read-to-close),
//! keep-alive reuse, reconnection, and malformed responses reported as errors rather than panics.

#![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]

use loadgen::http::{Client, Error};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serve each accepted connection with `replies` in order (one per request head read), then close it; stop
/// after `max_connections` connections and return how many were served.
async fn scripted(
    replies: Vec<&'static [u8]>,
    max_connections: usize,
) -> (String, tokio::task::JoinHandle<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = tokio::spawn(async move {
        let mut connections = 0;
        while let Ok((mut sock, _)) = listener.accept().await {
            connections += 1;
            let replies = replies.clone();
            for reply in replies {
                // Read one request head (and a small body if any: good enough for these tests).
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = sock.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    seen.extend_from_slice(&buf[..n]);
                }
                if seen.is_empty() {
                    break;
                }
                let _ = sock.write_all(reply).await;
            }
            drop(sock);
            if connections >= max_connections {
                break;
            }
        }
        connections
    });
    (addr, handle)
}

#[tokio::test]
async fn content_length_chunked_and_keep_alive() {
    let (addr, server) = scripted(vec![
        b"HTTP/1.1 201 Created\r\nLocation: /fhir/Patient/a/_history/1\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: t\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    ], 1)
    .await;
    let mut c = Client::connect(&addr).await.unwrap();
    let r = c
        .request(
            "POST",
            "/fhir/Patient",
            &[("Content-Type", "application/fhir+json")],
            b"{}",
        )
        .await
        .unwrap();
    assert_eq!((r.status, r.body.as_slice()), (201, &b"hello"[..]));
    assert_eq!(r.header("LOCATION"), Some("/fhir/Patient/a/_history/1"));
    let r = c.request("GET", "/x", &[], b"").await.unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"abcde"[..]));
    let r = c.request("GET", "/y", &[], b"").await.unwrap();
    assert_eq!((r.status, r.body.len()), (204, 0));
    let r = c.request("GET", "/z", &[], b"").await.unwrap();
    assert!(!r.is_success());
    drop(c);
    assert_eq!(
        server.await.unwrap(),
        1,
        "all four requests on one connection"
    );
}

#[tokio::test]
async fn read_to_close_then_reconnect() {
    let (addr, server) = scripted(
        vec![b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close"],
        2,
    )
    .await;
    let mut c = Client::connect(&addr).await.unwrap();
    let r = c.request("GET", "/", &[], b"").await.unwrap();
    assert_eq!(r.body, b"until close");
    let r = c.request("GET", "/", &[], b"").await.unwrap();
    assert_eq!(r.status, 200);
    drop(c);
    assert_eq!(
        server.await.unwrap(),
        2,
        "the closed connection was replaced"
    );
}

#[tokio::test]
async fn malformed_responses_are_errors() {
    let cases: [&'static [u8]; 4] = [
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ];
    for reply in cases {
        let (addr, _server) = scripted(vec![reply], 1).await;
        let mut c = Client::connect(&addr).await.unwrap();
        match c.request("GET", "/", &[], b"").await {
            Err(Error::Protocol(_)) => {}
            other => panic!(
                "expected a protocol error for {:?}, got {other:?}",
                String::from_utf8_lossy(reply)
            ),
        }
    }
}
