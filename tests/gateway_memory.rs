//! The gateway's memory under many large requests at once, as a process: what it holds per
//! request is about the request's bytes, not a parsed copy many times their size; and a
//! response event larger than the SSE parser keeps, in this process.

mod support;

use bytes::Bytes;
use http_body_util::BodyExt;
use support::http::{Gw, Sim, client, send};

/// A kibibyte-rounded figure from `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in bytes.
fn proc_status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} missing from /proc/{pid}/status"));
    let kib: u64 = line
        .trim_start_matches(field)
        .trim_start_matches(':')
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}

/// A streamed chat request of about `size` bytes: a long conversation of short messages, the
/// shape that costs most once parsed into a tree.
fn long_conversation(size: usize) -> Bytes {
    let message = r#"{"role":"user","content":"hello there"},"#;
    let mut body = String::with_capacity(size + 128);
    body.push_str(r#"{"model":"sim-llm","stream":true,"max_tokens":1,"messages":["#);
    while body.len() + message.len() < size {
        body.push_str(message);
    }
    body.pop();
    body.push_str("]}");
    Bytes::from(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_large_requests_at_once_cost_about_their_bytes() {
    // `SLUICE_MEMORY_REQUESTS=1000` is the benchmark of docs/benchmarks.md.
    let n: usize = std::env::var("SLUICE_MEMORY_REQUESTS").map_or(100, |v| v.parse().unwrap());
    const SIZE: usize = 1 << 20;
    let c = client();
    // Two slots and no prefill cost: the requests queue at the engine, so they are all in the
    // gateway at the same time.
    let sim = Sim::start(
        &c,
        &[
            "--max-num-seqs",
            "2",
            "--prefill-ms-per-token",
            "0",
            "--decode-step-ms",
            "20",
        ],
    )
    .await;
    // Shadow mode: the queue this builds is the point, not something to shed.
    // A body-memory budget above what is sent: this measures what a held byte costs (the
    // budget, 256 MiB by default, is what caps the total; tests/gateway_slow.rs).
    let budget = (2 * n * SIZE).to_string();
    let (gw, _policy) = Gw::with_policy(
        &c,
        &sim.url,
        "mode: Shadow",
        &["--max-body-memory", &budget],
    )
    .await;
    let url = format!("{}/v1/chat/completions", gw.url);
    let body = long_conversation(SIZE);
    let warm = send(&c, "POST", &url, &[], body.clone()).await;
    assert_eq!(warm.status, 200, "{}", warm.text());
    let pid = gw.process.pid();
    let before = proc_status(pid, "VmHWM");

    let requests: Vec<_> = (0..n)
        .map(|_| {
            let (c, url, body) = (c.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                let r = support::http::start(&c, "POST", &url, &[], body).await;
                let status = r.status().as_u16();
                r.into_body().collect().await.unwrap();
                status
            })
        })
        .collect();
    for r in requests {
        assert_eq!(r.await.unwrap(), 200);
    }
    let peak = proc_status(pid, "VmHWM");
    let grown = peak.saturating_sub(before);
    // Each request's bytes, read once and handed to the engine: at most about twice the
    // bytes in flight (the body and its contiguous copy while it is collected). A parsed
    // tree of these bodies took about 10× their size, held for the whole stream.
    let bound = 2 * n * SIZE;
    assert!(
        grown < bound as u64,
        "peak RSS grew by {} MiB for {n} requests of {} MiB (bound {} MiB; before {} MiB)",
        grown >> 20,
        SIZE >> 20,
        bound >> 20,
        before >> 20
    );
    eprintln!(
        "peak RSS {} MiB, grown by {} MiB for {n} × {} MiB",
        peak >> 20,
        grown >> 20,
        SIZE >> 20
    );
}

#[tokio::test]
async fn an_event_over_the_parser_limit_ends_the_wait_and_leaves_the_stream_healthy() {
    use std::time::Duration;
    use support::http::metric;
    let g = support::inproc::InProc::start("defaults: {ttft: 1s, itl: 1s}").await;
    let mut h = g.hold("m").await;
    let waiting = |m: &str| metric(m, "sluice_waiting_requests", &[("model", "other")]);
    assert_eq!(waiting(&g.metrics().await), Some(1.0));
    // The first event is 5 MiB, over the 4 MiB the parser keeps: a huge first delta.
    g.clock.advance(Duration::from_millis(300));
    let text = "x".repeat(5 << 20);
    let event = format!(r#"{{"choices":[{{"index":0,"delta":{{"content":"{text}"}}}}]}}"#);
    h.send(&event);
    h.read(event.len()).await;
    // It counted as the first token: no longer waiting (it used to wait, inflating the
    // waiting-TTFT estimate, until the stream ended), and the TTFT was sampled.
    let m = g.metrics().await;
    assert_eq!(
        waiting(&m),
        Some(0.0),
        "still waiting after its first output"
    );
    let ttft_count = metric(&m, "sluice_ttft_seconds_count", &[("model", "other")]);
    assert_eq!(ttft_count, Some(1.0));
    // Tokens after it are still measured, and [DONE] makes it a success, not a broken stream.
    g.clock.advance(Duration::from_millis(20));
    h.send(r#"{"choices":[{"index":0,"delta":{"content":"y"}}]}"#);
    h.read(1).await;
    h.send("[DONE]");
    h.finish().await;
    let m = g.metrics().await;
    let itl_count = metric(&m, "sluice_itl_seconds_count", &[("model", "other")]);
    assert_eq!(itl_count, Some(1.0));
    let success = [
        ("model", "other"),
        ("endpoint", "chat_completions"),
        ("stream", "true"),
        ("outcome", "success"),
    ];
    assert_eq!(
        metric(&m, "sluice_requests_total", &success),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "sluice_upstream_errors_total",
            &[("reason", "incomplete_stream")]
        ),
        None
    );
}
