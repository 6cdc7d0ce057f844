//! Engine signals (`spec.upstream.engineMetrics`) with real processes: a gateway reads the
//! simulated engine's queue from its metrics page (vLLM's names) and exports it per endpoint;
//! a hostile metrics page (garbage, NaN and negative values, over 4 MiB, too slow) is
//! ignored with one log line, `sluice_engine_metrics_up` 0, and the gateway keeps serving.

mod support;

use std::time::Duration;

use axum::routing::{get, post};
use serde_json::json;
use support::http::{Gw, PolicyFile, Sim, client, long_stream, metric, post_json, start};

fn policy(url: &str, path: &str) -> String {
    format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: p}}\nspec:\n  upstream: {{url: '{url}', engineMetrics: {{path: {path}, interval: 100ms}}}}\n  models: [{{name: sim-llm}}]\n"
    )
}

#[tokio::test]
async fn the_engines_queue_is_read_from_its_metrics_page_per_endpoint() {
    let c = client();
    let sim = Sim::batch(&c, 2, 50).await;
    let file = PolicyFile::new(&policy(&sim.url, "/metrics"));
    let gw = Gw::start(&c, &file.0, None, &[]).await;
    let upstream = sim.url.trim_start_matches("http://");
    let at = [("upstream", upstream)];
    gw.wait_metric(&c, "sluice_engine_metrics_up", &at, 1.0, 10)
        .await;
    let m = gw.metrics(&c).await;
    assert_eq!(
        metric(&m, "sluice_engine_running_requests", &at),
        Some(0.0),
        "{m}"
    );
    assert_eq!(metric(&m, "sluice_engine_waiting_requests", &at), Some(0.0));
    assert_eq!(
        metric(&m, "sluice_engine_kv_cache_usage_ratio", &at),
        Some(0.0)
    );

    // Two streams fill the two slots; two more wait in the engine's queue, sent to it
    // directly (through the gateway the second would be shed once the engine says its batch
    // of two is full: that is the next test's matter, this one is the reading).
    let _a = long_stream(&c, &gw.url).await;
    let _b = long_stream(&c, &gw.url).await;
    let queued = [held_stream(&c, &sim.url), held_stream(&c, &sim.url)];
    // The reading mirrors the engine's own count.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let m = loop {
        let stats = support::http::get(&c, &format!("{}/sim/stats", sim.url))
            .await
            .json();
        let (waiting, active) = (stats["queued"].as_f64(), stats["active"].as_f64());
        let m = gw.metrics(&c).await;
        let read = (
            metric(&m, "sluice_engine_waiting_requests", &at),
            metric(&m, "sluice_engine_running_requests", &at),
        );
        if active == Some(2.0) && waiting == Some(2.0) && read == (waiting, active) {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the engine's queue never showed in the gateway's reading: engine {stats}, read {read:?}\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        metric(&m, "sluice_engine_kv_cache_usage_ratio", &at),
        Some(1.0)
    );
    for q in queued {
        q.abort();
    }
    let warned = gw.process.warnings();
    assert!(
        !warned.iter().any(|l| l.contains("engine metrics")),
        "{warned:#?}"
    );
}

/// A stub engine on 127.0.0.1 whose chat answers a tiny stream and whose metrics pages are
/// hostile: `/garbage`, `/nan`, `/huge` (5 MiB), `/slow` (30 s).
async fn hostile_engine() -> (String, tokio::task::JoinHandle<()>) {
    let chat = || async {
        let events = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"sim-llm\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}\n\ndata: [DONE]\n\n";
        ([("content-type", "text/event-stream")], events)
    };
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route(
            "/garbage",
            get(|| async { "<html>\u{0}\u{1}{{{{ not metrics </html>" }),
        )
        .route(
            "/nan",
            get(|| async { "vllm:num_requests_waiting NaN\nvllm:num_requests_running -4\n" }),
        )
        .route(
            "/huge",
            get(|| async { "vllm:num_requests_running 1\n".repeat(200_000) }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "vllm:num_requests_running 1\n"
            }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let task = tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (url, task)
}

#[tokio::test]
async fn a_hostile_metrics_page_is_ignored_with_one_log_line_and_requests_are_served() {
    let c = client();
    let (url, _engine) = hostile_engine().await;
    let upstream = url.trim_start_matches("http://").to_owned();
    for (path, says) in [
        ("/garbage", "no metric of a known engine"),
        ("/nan", "has a usable value"),
        ("/huge", "over 4194304 bytes"),
        ("/slow", "no complete page within 75 ms"),
        ("/missing", "404"),
    ] {
        let file = PolicyFile::new(&policy(&url, path));
        let gw = Gw::start(&c, &file.0, None, &[]).await;
        let at = [("upstream", upstream.as_str())];
        gw.wait_metric(&c, "sluice_engine_metrics_up", &at, 0.0, 10)
            .await;
        // Several scrapes later: still one line, and no reading exported.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let lines: Vec<String> = (gw.process.warnings().into_iter())
            .filter(|l| l.contains("engine metrics unusable"))
            .collect();
        assert_eq!(lines.len(), 1, "{path}: {lines:#?}");
        assert!(
            lines[0].contains(says) && lines[0].contains(&upstream),
            "{path}: {}",
            lines[0]
        );
        let m = gw.metrics(&c).await;
        assert_eq!(
            metric(&m, "sluice_engine_running_requests", &at),
            None,
            "{path}"
        );
        let chat = json!({"model": "sim-llm", "stream": true,
            "messages": [{"role": "user", "content": "hi"}]});
        let r = post_json(&c, &format!("{}/v1/chat/completions", gw.url), &chat).await;
        assert_eq!(r.status, 200, "{path}: fail open");
    }
}

/// A stream that is held open (never read) until the task is aborted.
fn held_stream(c: &support::http::HttpClient, gateway: &str) -> tokio::task::JoinHandle<()> {
    let (c, url) = (c.clone(), format!("{gateway}/v1/chat/completions"));
    tokio::spawn(async move {
        let body = json!({"model": "sim-llm", "stream": true, "max_tokens": 5000,
            "messages": [{"role": "user", "content": "hi"}]});
        let _held = start(&c, "POST", &url, &[], body.to_string()).await;
        std::future::pending::<()>().await
    })
}

/// Requests counted with `outcome` in `sluice_requests_total`, over every label set.
fn outcomes(m: &str, outcome: &str) -> f64 {
    m.lines()
        .filter(|l| l.starts_with("sluice_requests_total{"))
        .filter(|l| l.contains(&format!("outcome=\"{outcome}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_burst_on_a_full_batch_is_capped_at_the_batch_the_engine_runs() {
    let c = client();
    for signals in [false, true] {
        let sim = Sim::batch(&c, 4, 50).await;
        // Thresholds the engine meets at every concurrency: latency alone never sheds here.
        let mut doc = policy(&sim.url, "/metrics") + "  defaults: {ttft: 5s, itl: 1s}\n";
        if !signals {
            doc = doc.replace(", engineMetrics: {path: /metrics, interval: 100ms}", "");
        }
        let file = PolicyFile::new(&doc);
        let gw = Gw::start(&c, &file.0, None, &[]).await;
        let at = [("upstream", sim.url.trim_start_matches("http://"))];
        // Four streams run in the four slots; a fifth waits in the engine.
        let mut open = Vec::new();
        for _ in 0..4 {
            open.push(long_stream(&c, &gw.url).await);
        }
        let mut held = vec![held_stream(&c, &gw.url)];
        support::eventually(10, "the fifth request queued in the engine", || async {
            let stats = support::http::get(&c, &format!("{}/sim/stats", sim.url))
                .await
                .json();
            let m = gw.metrics(&c).await;
            let read = metric(&m, "sluice_engine_waiting_requests", &at);
            (stats["queued"] == 1 && (!signals || read == Some(1.0))).then_some(())
        })
        .await;
        // Seven more, one after another.
        for _ in 0..7 {
            held.push(held_stream(&c, &gw.url));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let inflight = [("model", "sim-llm")];
        if signals {
            // The engine said its batch of four is full: none of the seven is sent to wait.
            let m = support::eventually(10, "seven shed", || async {
                let m = gw.metrics(&c).await;
                (outcomes(&m, "rejected") == 7.0).then_some(m)
            })
            .await;
            let n = metric(&m, "sluice_limiter_in_flight_requests", &inflight);
            assert_eq!(n, Some(5.0), "{m}");
        } else {
            // Nothing is late yet: all twelve are admitted, eight to wait for a slot.
            let m = gw
                .wait_metric(&c, "sluice_limiter_in_flight_requests", &inflight, 12.0, 10)
                .await;
            assert_eq!(outcomes(&m, "rejected"), 0.0);
        }
        for h in held {
            h.abort();
        }
        drop(open);
    }
}

#[tokio::test]
async fn with_a_queue_a_burst_on_a_full_batch_waits_for_slots_instead_of_429() {
    let c = client();
    let sim = Sim::batch(&c, 4, 50).await;
    let doc = policy(&sim.url, "/metrics")
        + "  defaults: {ttft: 5s, itl: 1s}\n  queue: {maxWait: 30s, maxRequests: 16}\n";
    let file = PolicyFile::new(&doc);
    let gw = Gw::start(&c, &file.0, None, &[]).await;
    let at = [("upstream", sim.url.trim_start_matches("http://"))];
    gw.wait_metric(&c, "sluice_engine_metrics_up", &at, 1.0, 10)
        .await;
    // Four streams in the four slots.
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(long_stream(&c, &gw.url).await);
    }
    // Eight short requests, one after another: the gateway's own rules let a few through
    // to wait in the engine (its concurrency G, learned on the generous thresholds, and a
    // probe before the engine's word that its batch is full, read every 100 ms, arrives);
    // from then on it holds the rest (not 429).
    let mut short = Vec::new();
    for _ in 0..8 {
        let (c, url) = (c.clone(), format!("{}/v1/chat/completions", gw.url));
        let body = json!({"model": "sim-llm", "stream": true, "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}]});
        short.push(tokio::spawn(async move {
            post_json(&c, &url, &body).await.status
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let inflight = [("model", "sim-llm")];
    let m = support::eventually(10, "all twelve in flight or waiting", || async {
        let m = gw.metrics(&c).await;
        let n = metric(&m, "sluice_limiter_in_flight_requests", &inflight)?;
        let q = metric(&m, "sluice_queue_requests", &[])?;
        let w = metric(&m, "sluice_engine_waiting_requests", &at)?;
        (n + q == 12.0 && w == n - 4.0).then_some(m)
    })
    .await;
    let waiting = metric(&m, "sluice_queue_requests", &[]).unwrap();
    assert!(
        waiting >= 4.0,
        "most held in the gateway, not sent to wait in the engine: {m}"
    );
    assert_eq!(outcomes(&m, "rejected"), 0.0, "{m}");
    // The four streams end: slots free, and the waiting requests go as they do, each served.
    drop(open);
    for s in short {
        let status = tokio::time::timeout(Duration::from_secs(20), s).await;
        assert_eq!(status.expect("served within maxWait").unwrap(), 200);
    }
    let m = gw.metrics(&c).await;
    let admitted = [("outcome", "admitted")];
    let from_queue = metric(&m, "sluice_queue_wait_seconds_count", &admitted);
    assert_eq!(from_queue, Some(waiting), "{m}");
    assert_eq!(
        outcomes(&m, "rejected") + outcomes(&m, "expired"),
        0.0,
        "{m}"
    );
    assert_eq!(metric(&m, "sluice_queue_requests", &[]), Some(0.0));
}
