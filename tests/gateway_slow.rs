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

/// A chat request of exactly `size` bytes (padded with an extra member the engine ignores).
fn sized_request(size: usize) -> String {
    let head =
        r#"{"model":"sim-llm","max_tokens":1,"messages":[{"role":"user","content":"hi"}],"pad":""#;
    let tail = r#""}"#;
    format!("{head}{}{tail}", "x".repeat(size - head.len() - tail.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_the_memory_budget_wait_their_turn_with_503() {
    let c = client();
    let sim = Sim::start(&c, &[]).await;
    // 64 KiB of bodies at once: one 40 000-byte body fits, a second does not.
    let (gw, _policy) = Gw::with_policy(&c, &sim.url, "", &["--max-body-memory", "65536"]).await;
    let addr = gw.url.trim_start_matches("http://").to_owned();
    let body = sized_request(40_000);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    // A slow client: its declared length is reserved before a byte of the body arrives.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&body.as_bytes()[..100]).await.unwrap();
    // 40 000 bytes, reserved in KiB.
    gw.wait_metric(&c, "sluice_body_memory_bytes", &[], 40_960.0, 10)
        .await;

    // A second large body is refused at once, with the in-flight limit's answer, and
    // `Connection: close`: the gateway closes that connection without reading the body, so
    // the pooled client must not reuse it for the next request (it saw IncompleteMessage
    // when the header was missing).
    let refused = support::http::send(
        &c,
        "POST",
        &format!("{}/v1/chat/completions", gw.url),
        &[],
        body.clone(),
    )
    .await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.json()["error"]["code"], "overloaded");
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(refused.headers["connection"], "close");
    // Small bodies still fit beside it.
    let small = json!({"model": "sim-llm", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]});
    let r = post_json(&c, &format!("{}/v1/chat/completions", gw.url), &small).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // The slow body completes and is served; its share is given back.
    slow.write_all(&body.as_bytes()[100..]).await.unwrap();
    let mut answer = vec![0u8; 12];
    slow.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    let r = support::http::send(
        &c,
        "POST",
        &format!("{}/v1/chat/completions", gw.url),
        &[],
        body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    let m = gw.metrics(&c).await;
    let overloaded = support::http::metric(
        &m,
        "sluice_requests_total",
        &[
            ("model", ""),
            ("endpoint", "chat_completions"),
            ("stream", "false"),
            ("outcome", "overloaded"),
        ],
    );
    assert_eq!(overloaded, Some(1.0), "{m}");
}
