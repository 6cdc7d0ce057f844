//! Slow and idle clients against a gateway process: connections that trickle their headers,
//! send nothing, or stall their body are closed (or answered 408) within the configured
//! timeouts, while normal requests keep being served.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::http::{Gw, Sim, client, post_json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection; what it sent, and when it closed, or None
/// if it was still open after `limit`.
async fn until_closed(
    mut r: impl AsyncRead + Unpin,
    limit: Duration,
) -> Option<(Vec<u8>, Instant)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, r.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some((out, Instant::now())),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed_on_time_while_others_are_served() {
    let c = client();
    let sim = Sim::start(&c, &[]).await;
    let (gw, _policy) = Gw::with_policy(
        &c,
        &sim.url,
        "",
        &["--header-read-timeout", "2s", "--body-read-timeout", "2s"],
    )
    .await;
    let addr = gw.url.trim_start_matches("http://").to_owned();
    let start = Instant::now();

    // 400 clients trickle a header byte every 300 ms for as long as they are let; 100 connect
    // and say nothing.
    let mut closed = Vec::new();
    for i in 0..500 {
        let s = TcpStream::connect(&addr).await.unwrap();
        let (r, mut w) = s.into_split();
        if i < 400 {
            tokio::spawn(async move {
                let head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-slow: ";
                if w.write_all(head).await.is_err() {
                    return;
                }
                while w.write_all(b"a").await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            });
        } else {
            tokio::spawn(async move {
                // Keep the write half open, silent.
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(w);
            });
        }
        closed.push(tokio::spawn(until_closed(r, Duration::from_secs(15))));
    }

    // Meanwhile, ordinary requests are served.
    let body = json!({"model": "sim-llm", "max_tokens": 2,
        "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..10 {
        let r = post_json(&c, &format!("{}/v1/chat/completions", gw.url), &body).await;
        assert_eq!(r.status, 200, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A body that stalls is answered 408 at the body timeout.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"model\":")
        .await
        .unwrap();
    let (answer, _) = until_closed(&mut s, Duration::from_secs(10))
        .await
        .expect("the stalled body is answered and closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");

    let mut latest = Duration::ZERO;
    for (i, h) in closed.into_iter().enumerate() {
        let (_, at) = h
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("connection {i} still open after 15 s"));
        latest = latest.max(at - start);
    }
    // Each held at most the 2 s timeout past its last start, plus scheduling slack on two
    // shared cores; without the timeout they would be held for as long as they trickle.
    assert!(
        latest < Duration::from_secs(8),
        "last closed after {latest:?}"
    );

    // And the gateway still serves.
    let r = post_json(&c, &format!("{}/v1/chat/completions", gw.url), &body).await;
    assert_eq!(r.status, 200);
}
