//! The gateway and the simulated engine as real processes of the built binary on 127.0.0.1:
//! proxying, measurement, shedding, Shadow mode, metrics, the error contract, hot reload,
//! client disconnects and graceful shutdown.

mod support;

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use serde_json::{Value, json};
use support::http::{
    Gw, PolicyFile, Sim, client, get, metric, policy_yaml, post_json, send, start,
};

fn chat(max_tokens: u32, stream: bool) -> Value {
    json!({"model": "sim-llm", "max_tokens": max_tokens, "stream": stream,
           "messages": [{"role": "user", "content": "What is goodput?"}]})
}

/// Drops the parts that differ between two calls (ids, timestamps).
fn without_ids(mut v: Value) -> Value {
    v.as_object_mut().unwrap().remove("id");
    v.as_object_mut().unwrap().remove("created");
    v
}

fn sse_events(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: ").map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn streams_and_unary_responses_pass_through_and_are_measured() {
    let c = client();
    let sim = Sim::start(&c, &["--max-num-seqs", "4"]).await;
    let (gw, _policy) = Gw::with_policy(&c, &sim.url, "defaults: {ttft: 5s, itl: 1s}", &[]).await;

    // Streaming chat: the engine's events arrive unchanged, ending with [DONE].
    let r = gw.chat(&c, &chat(5, true)).await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = sse_events(&r.body);
    assert_eq!(events.len(), 1 + 5 + 1 + 1, "{events:?}"); // role, 5 tokens, finish, DONE
    assert_eq!(events.last().unwrap(), "[DONE]");
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");

    // Unary chat through the gateway (assembled from a stream) equals the engine's own
    // unary answer to the same request.
    let via_gw = gw.chat(&c, &chat(7, false)).await;
    let direct = sim.chat(&c, &chat(7, false)).await;
    assert_eq!(via_gw.status, 200, "{}", via_gw.text());
    assert_eq!(without_ids(via_gw.json()), without_ids(direct.json()));

    // Completions, unary and streaming.
    let req = json!({"model": "sim-llm", "prompt": "Once upon a time", "max_tokens": 4});
    let via_gw = post_json(&c, &format!("{}/v1/completions", gw.url), &req).await;
    let direct = post_json(&c, &format!("{}/v1/completions", sim.url), &req).await;
    assert_eq!(without_ids(via_gw.json()), without_ids(direct.json()));
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let r = post_json(&c, &format!("{}/v1/completions", gw.url), &sreq).await;
    assert_eq!(sse_events(&r.body).len(), 4 + 1 + 1);

    // /v1/models is proxied.
    let models = get(&c, &format!("{}/v1/models", gw.url)).await;
    assert_eq!(models.json()["data"][0]["id"], "sim-llm");

    // Metrics: 4 successful generations measured (TTFT once each, ITL per later token).
    let m = gw.metrics(&c).await;
    let ok = |endpoint: &str, stream: &str| {
        metric(
            &m,
            "sluice_requests_total",
            &[
                ("model", "sim-llm"),
                ("endpoint", endpoint),
                ("stream", stream),
                ("outcome", "success"),
            ],
        )
    };
    assert_eq!(ok("chat_completions", "true"), Some(1.0));
    assert_eq!(ok("chat_completions", "false"), Some(1.0));
    assert_eq!(ok("completions", "false"), Some(1.0));
    assert_eq!(ok("completions", "true"), Some(1.0));
    assert_eq!(
        metric(&m, "sluice_ttft_seconds_count", &[("model", "sim-llm")]),
        Some(4.0)
    );
    assert_eq!(
        metric(&m, "sluice_itl_seconds_count", &[("model", "sim-llm")]),
        Some((4 + 6 + 3 + 3) as f64)
    );
    let ema = metric(&m, "sluice_itl_ema_seconds", &[("model", "sim-llm")]).unwrap();
    assert!(ema > 0.005 && ema < 0.2, "ITL average {ema}");
    assert_eq!(
        metric(&m, "sluice_reject_probability", &[("model", "sim-llm")]),
        Some(0.0)
    );
    assert_eq!(
        metric(&m, "sluice_inflight_requests", &[("model", "sim-llm")]),
        Some(0.0)
    );
}

/// Drives `n` concurrent streams of `tokens` tokens each, with the given `x-sluice-priority`
/// header (if any); returns how many got each status.
async fn burst(
    c: &support::http::HttpClient,
    url: &str,
    n: usize,
    tokens: u32,
    priority: Option<&'static str>,
) -> (usize, usize) {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (c, url) = (c.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let headers: Vec<(&str, &str)> = priority
                .map(|p| ("x-sluice-priority", p))
                .into_iter()
                .collect();
            send(
                &c,
                "POST",
                &format!("{url}/v1/chat/completions"),
                &headers,
                serde_json::to_vec(&chat(tokens, true)).unwrap(),
            )
            .await
            .status
        }));
    }
    let (mut ok, mut shed) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            200 => ok += 1,
            429 => shed += 1,
            s => panic!("unexpected status {s}"),
        }
    }
    (ok, shed)
}

#[tokio::test]
async fn overload_is_shed_with_retry_after_then_the_gate_reopens() {
    let c = client();
    // Two batch slots, 15 ms per step: 30 streams of 30 tokens queue for seconds.
    let sim = Sim::batch(&c, 2, 15).await;
    let (gw, _policy) = Gw::with_policy(
        &c,
        &sim.url,
        "defaults: {ttft: 200ms, itl: 1s, timeConstant: 1s}\nshedding: {maxRejectProbability: 0.95, ramp: 1.5, maxEvidence: 20}\npriority: {trustHeader: true}",
        &[],
    )
    .await;

    let load = {
        let (c, url) = (c.clone(), gw.url.clone());
        // Critical, so all 30 are admitted and queue at the engine whatever the limiter
        // decides (a burst the limiter sheds at the door leaves no queue for the requests
        // below to meet).
        tokio::spawn(async move { burst(&c, &url, 30, 30, Some("critical")).await })
    };
    // Once the queue shows in the TTFT signal, new requests are shed with Retry-After. A new
    // request every 100 ms, none waiting for the one before: one that gets through (with
    // probability 1 - maxRejectProbability) queues behind the burst for seconds, and the
    // next must not wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut probes = Vec::new();
    let shed = loop {
        let (pc, url, tx) = (c.clone(), gw.url.clone(), tx.clone());
        probes.push(tokio::spawn(async move {
            let r = post_json(&pc, &format!("{url}/v1/chat/completions"), &chat(1, false)).await;
            let status = r.status;
            let _ = tx.send(r);
            status
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(r) = rx.try_recv()
            && r.status == 429
        {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "never shed under overload:\n{}",
            gw.metrics(&c).await
        );
    };
    let secs: u64 = shed.header("retry-after").unwrap().parse().unwrap();
    let ms: u64 = shed.header("retry-after-ms").unwrap().parse().unwrap();
    assert!((1..=60).contains(&secs), "Retry-After {secs}");
    assert!(
        (1..=60_000).contains(&ms) && secs == ms.div_ceil(1000).max(1),
        "{secs} s vs {ms} ms"
    );
    let body = shed.json();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "rate_limit_exceeded");
    let m = gw.metrics(&c).await;
    assert!(metric(&m, "sluice_reject_probability", &[("model", "sim-llm")]).unwrap() > 0.0);
    // The TTFT signal past its 200 ms threshold: the average of measured first tokens, or
    // (sooner, while the queue builds) the estimate from the requests still waiting.
    let ttft_signal = metric(&m, "sluice_ttft_ema_seconds", &[("model", "sim-llm")])
        .unwrap()
        .max(
            metric(
                &m,
                "sluice_ttft_waiting_estimate_seconds",
                &[("model", "sim-llm")],
            )
            .unwrap(),
        );
    assert!(ttft_signal > 0.2, "{m}");
    // Critical requests are never shed.
    let r = send(
        &c,
        "POST",
        &format!("{}/v1/chat/completions", gw.url),
        &[("x-sluice-priority", "critical")],
        serde_json::to_vec(&chat(1, false)).unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "critical was shed: {}", r.text());

    let (ok, _) = load.await.unwrap();
    assert!(ok >= 1);
    for p in probes {
        let status = p.await.unwrap();
        assert!(status == 200 || status == 429, "{status}");
    }
    // After the load stops, the averages fade and the gate reopens.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = gw.metrics(&c).await;
        if metric(&m, "sluice_reject_probability", &[("model", "sim-llm")]) == Some(0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "the gate did not reopen:\n{m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = gw.chat(&c, &chat(1, false)).await;
    assert_eq!(r.status, 200);
    let m = gw.metrics(&c).await;
    assert!(
        metric(
            &m,
            "sluice_requests_total",
            &[
                ("model", "sim-llm"),
                ("endpoint", "chat_completions"),
                ("stream", "false"),
                ("outcome", "rejected")
            ]
        )
        .unwrap()
            >= 1.0
    );
}

#[tokio::test]
async fn shadow_mode_never_rejects_but_counts() {
    let c = client();
    let sim = Sim::batch(&c, 1, 10).await;
    let (gw, _policy) = Gw::with_policy(
        &c,
        &sim.url,
        "mode: Shadow\ndefaults: {ttft: 50ms, itl: 1ms, timeConstant: 1s}",
        &[],
    )
    .await;
    // Every token takes 10 ms against a 1 ms ITL threshold: far over, yet nothing is shed.
    let (ok, shed) = burst(&c, &gw.url, 6, 10, None).await;
    assert_eq!((ok, shed), (6, 0));
    let (ok, shed) = burst(&c, &gw.url, 6, 2, None).await;
    assert_eq!((ok, shed), (6, 0));
    let m = gw.metrics(&c).await;
    let shadow = metric(
        &m,
        "sluice_requests_total",
        &[
            ("model", "sim-llm"),
            ("endpoint", "chat_completions"),
            ("stream", "true"),
            ("outcome", "shadow_rejected"),
        ],
    );
    assert!(
        shadow.unwrap_or(0.0) >= 1.0,
        "shadow rejections not counted:\n{m}"
    );
    assert!(metric(&m, "sluice_reject_probability", &[("model", "sim-llm")]).unwrap() > 0.0);
}

#[tokio::test]
async fn client_errors_are_openai_shaped() {
    let c = client();
    let sim = Sim::start(&c, &[]).await;
    let (gw, _policy) = Gw::with_policy(&c, &sim.url, "", &["--max-body-bytes", "1024"]).await;
    let url = format!("{}/v1/chat/completions", gw.url);

    let r = send(&c, "POST", &url, &[], "{not json").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );

    let r = post_json(&c, &url, &json!({"messages": []})).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "model");

    // The gateway and the engine must not read different models or modes from one body.
    for (body, param) in [
        (
            r#"{"model":"other","model":"sim-llm","messages":[]}"#,
            "model",
        ),
        (
            r#"{"model":"sim-llm","stream":false,"stream":true}"#,
            "stream",
        ),
        (r#"{"model":"sim-llm","stream":"yes"}"#, "stream"),
    ] {
        let r = send(&c, "POST", &url, &[], body).await;
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(r.json()["error"]["param"], param, "{body}");
    }
    let r = send(
        &c,
        "POST",
        &format!("{}/v1/embeddings", gw.url),
        &[],
        r#"{"model":"sim-llm","input":"x","model":"big"}"#,
    )
    .await;
    assert_eq!(r.status, 400, "a passed-through body is read the same way");
    assert_eq!(r.json()["error"]["param"], "model");
    let r = send(&c, "POST", &format!("{}/v1/embeddings", gw.url), &[], "[1]").await;
    assert_eq!(r.status, 400);

    // A model name past 256 bytes never reaches the limiter or a metric label.
    let r = post_json(&c, &url, &json!({"model": "m".repeat(257), "messages": []})).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "model");
    let r = send(
        &c,
        "POST",
        &format!("{}/v1/embeddings", gw.url),
        &[],
        json!({"model": "m".repeat(300), "input": "x"}).to_string(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(!gw.metrics(&c).await.contains(&"m".repeat(257)));

    let big =
        json!({"model": "sim-llm", "messages": [{"role": "user", "content": "x".repeat(2000)}]});
    let r = post_json(&c, &url, &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "request_too_large");

    let r = send(
        &c,
        "POST",
        &url,
        &[("x-sluice-priority", "urgent")],
        serde_json::to_vec(&chat(1, false)).unwrap(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "x-sluice-priority");

    // Upstream 4xx passes through unchanged (unknown model → the engine's 404).
    let r = post_json(
        &c,
        &url,
        &json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");

    let r = get(&c, &format!("{}/nothing", gw.url)).await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]["message"].is_string());

    // Only the allow-listed OpenAI endpoints reach the upstream; traversal never does.
    for path in [
        "/v1/files",
        "/v1/fine_tuning/jobs",
        "/v1/models/..",
        "/v1/models/%2e%2e",
        "/v1/models/a%2Fb",
        "/v1/models/../../admin",
    ] {
        let r = get(&c, &format!("{}{path}", gw.url)).await;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.json()["error"]["code"], "not_found", "{path}");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("unknown path"),
            "{path}: {}",
            r.text()
        );
    }
    assert_eq!(get(&c, &format!("{}/v1/models", gw.url)).await.status, 200);

    // A known path with the wrong method: 405, OpenAI-shaped, with Allow.
    let r = get(&c, &format!("{}/v1/chat/completions", gw.url)).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["error"]["code"], "method_not_allowed");
    assert_eq!(r.headers["allow"], "POST");

    let m = gw.metrics(&c).await;
    assert_eq!(
        metric(
            &m,
            "sluice_requests_total",
            &[
                ("model", ""),
                ("endpoint", "chat_completions"),
                ("stream", "false"),
                ("outcome", "client_error")
            ]
        ),
        Some(8.0)
    );
}

#[tokio::test]
async fn upstream_down_is_502_and_upstream_timeout_is_504() {
    let c = client();
    let (gw, _policy) = Gw::with_policy(&c, support::http::CLOSED, "", &[]).await;
    let r = gw.chat(&c, &chat(1, false)).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "upstream_unreachable");
    assert!(
        !r.text().contains("127.0.0.1"),
        "internal details leaked: {}",
        r.text()
    );

    // An engine whose prefill takes ~2 s against a 1 s upstream timeout.
    let slow = Sim::start(&c, &["--prefill-ms-per-token", "500"]).await;
    let doc = policy_yaml(&slow.url, "").replace("'}", "', timeout: 1s}");
    assert!(doc.contains("timeout: 1s"));
    let policy = PolicyFile::new(&doc);
    let gw2 = Gw::start(&c, &policy.0, None, &[]).await;
    let long_prompt = json!({"model": "sim-llm", "max_tokens": 2, "messages": [{"role": "user", "content": "a long enough prompt"}]});
    let t = Instant::now();
    let r = gw2.chat(&c, &long_prompt).await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
    assert!(t.elapsed() < Duration::from_secs(10));
    let m = gw2.metrics(&c).await;
    assert_eq!(
        metric(
            &m,
            "sluice_requests_total",
            &[
                ("model", "sim-llm"),
                ("endpoint", "chat_completions"),
                ("stream", "false"),
                ("outcome", "upstream_error")
            ]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn upstream_500_passes_through_unchanged() {
    use axum::routing::post;
    let c = client();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(|| async {
            (
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                [("content-type", "application/json"), ("x-upstream", "yes")],
                r#"{"error":{"message":"engine crashed","type":"InternalServerError","param":null,"code":500}}"#,
            )
        }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let (gw, _policy) = Gw::with_policy(&c, &format!("http://{addr}"), "", &[]).await;
    let r = gw.chat(&c, &chat(1, true)).await;
    assert_eq!(r.status, 500);
    assert_eq!(r.header("x-upstream").as_deref(), Some("yes"));
    assert_eq!(r.json()["error"]["message"], "engine crashed");
    server.abort();
}

#[tokio::test]
async fn client_disconnect_mid_stream_cancels_upstream() {
    let c = client();
    let sim = Sim::start(
        &c,
        &["--decode-step-ms", "20", "--decode-step-ms-per-seq", "0"],
    )
    .await;
    let (gw, _policy) = Gw::with_policy(&c, &sim.url, "", &[]).await;
    let resp = start(
        &c,
        "POST",
        &format!("{}/v1/chat/completions", gw.url),
        &[],
        serde_json::to_vec(&chat(1000, true)).unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0;
    while got < 3 {
        let frame = body.frame().await.unwrap().unwrap();
        if frame.is_data() {
            got += 1;
        }
    }
    drop(body); // the client goes away
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = sim.stats(&c).await;
        if s["cancelled"] == 1 && s["active"] == 0 {
            assert_eq!(s["completed"], 0);
            break;
        }
        assert!(Instant::now() < deadline, "upstream not cancelled: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = gw.metrics(&c).await;
    assert_eq!(
        metric(
            &m,
            "sluice_requests_total",
            &[
                ("model", "sim-llm"),
                ("endpoint", "chat_completions"),
                ("stream", "true"),
                ("outcome", "cancelled")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "sluice_inflight_requests", &[("model", "sim-llm")]),
        Some(0.0)
    );
}

#[tokio::test]
async fn policy_file_reloads_live_and_invalid_edits_keep_the_last_good_policy() {
    let c = client();
    let sim = Sim::start(&c, &[]).await;
    let (gw, policy) = Gw::with_policy(&c, &sim.url, "defaults: {ttft: 1s}", &[]).await;
    let m = gw.metrics(&c).await;
    assert_eq!(metric(&m, "sluice_policy_generation", &[]), Some(1.0));
    // Warm up the key so its threshold gauge exists.
    gw.chat(&c, &chat(2, true)).await;

    policy.write(&policy_yaml(&sim.url, "defaults: {ttft: 250ms}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = gw.metrics(&c).await;
        if metric(&m, "sluice_policy_generation", &[]) == Some(2.0) {
            assert_eq!(
                metric(&m, "sluice_ttft_threshold_seconds", &[("model", "sim-llm")]),
                Some(0.25)
            );
            break;
        }
        assert!(Instant::now() < deadline, "valid edit not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    policy.write(&policy_yaml(&sim.url, "defaults: {ttft: 0s}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = gw.metrics(&c).await;
        if metric(&m, "sluice_policy_reloads_total", &[("result", "error")]) == Some(1.0) {
            assert_eq!(metric(&m, "sluice_policy_generation", &[]), Some(2.0));
            assert_eq!(
                metric(&m, "sluice_policy_last_reload_successful", &[]),
                Some(0.0)
            );
            assert_eq!(
                metric(&m, "sluice_ttft_threshold_seconds", &[("model", "sim-llm")]),
                Some(0.25)
            );
            break;
        }
        assert!(Instant::now() < deadline, "invalid edit not reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still serving and ready.
    assert_eq!(get(&c, &format!("{}/readyz", gw.url)).await.status, 200);
    let r = gw.chat(&c, &chat(1, false)).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn an_invalid_policy_file_at_start_is_a_clear_error() {
    let policy = PolicyFile::new(&policy_yaml("ftp://nowhere", ""));
    let err = support::sluice_fails(&[
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--policy-file",
        policy.0.to_str().unwrap(),
    ]);
    assert!(err.contains("spec.upstream.url"), "{err}");
}

#[tokio::test]
async fn sigterm_drains_in_flight_streams_and_exits_zero() {
    let c = client();
    let sim = Sim::start(
        &c,
        &["--decode-step-ms", "20", "--decode-step-ms-per-seq", "0"],
    )
    .await;
    let (mut gw, _policy) = Gw::with_policy(
        &c,
        &sim.url,
        "",
        &["--drain-timeout", "20s", "--drain-delay", "0s"],
    )
    .await;
    let resp = start(
        &c,
        "POST",
        &format!("{}/v1/chat/completions", gw.url),
        &[],
        serde_json::to_vec(&chat(40, true)).unwrap(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    gw.process.terminate();
    // The in-flight stream still completes (40 tokens ≈ 0.8 s).
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("stream completes during drain")
        .to_bytes();
    let events = sse_events(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(events.len(), 1 + 40 + 1 + 1);
    let status = gw.process.wait_exit(20);
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn the_demo_serves_the_example_policy_and_stops_cleanly() {
    let c = client();
    let mut demo = support::ChildProcess::sluice(
        &[
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--engine-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let url = format!("http://{}", demo.listen_addr("gateway", 20));
    support::http::wait_ok(&c, &format!("{url}/readyz"), 20, &mut demo).await;
    let r = post_json(&c, &format!("{url}/v1/chat/completions"), &chat(3, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 3);
    let m = get(&c, &format!("{url}/metrics")).await.text();
    // The example policy's sim-llm entry is in force.
    assert_eq!(
        metric(&m, "sluice_ttft_threshold_seconds", &[("model", "sim-llm")]),
        Some(0.5)
    );
    demo.terminate();
    assert!(demo.wait_exit(20).success());
}

#[tokio::test]
async fn a_rollout_under_steady_load_fails_no_request() {
    let c = client();
    // A client that opens a new connection per request, as new clients arriving do.
    let fresh: support::http::HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http();
    let sim = Sim::start(&c, &[]).await;
    let (mut gw, _policy) = Gw::with_policy(&c, &sim.url, "", &["--drain-delay", "2s"]).await;
    let url = format!("{}/v1/chat/completions", gw.url);
    let load = |client: support::http::HttpClient, url: String, until: Instant| async move {
        let (mut ok, mut failed) = (0, Vec::new());
        while Instant::now() < until {
            let r = support::http::send(
                &client,
                "POST",
                &url,
                &[],
                serde_json::to_vec(&chat(2, false)).unwrap(),
            )
            .await;
            if r.status == 200 {
                ok += 1;
            } else {
                failed.push(r.status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (ok, failed)
    };
    // Load from 1 s before SIGTERM to 1.5 s after it: within the 2 s drain delay, the time a
    // load balancer takes to act on the readiness change.
    let until = Instant::now() + Duration::from_millis(2500);
    let pooled = tokio::spawn(load(c.clone(), url.clone(), until));
    let fresh = tokio::spawn(load(fresh, url.clone(), until));
    tokio::time::sleep(Duration::from_secs(1)).await;
    gw.process.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ready = get(&c, &format!("{}/readyz", gw.url)).await;
    assert_eq!(ready.status, 503, "not ready while draining");
    for h in [pooled, fresh] {
        let (ok, failed) = h.await.unwrap();
        assert!(ok > 20, "only {ok} requests");
        assert!(failed.is_empty(), "failed during the rollout: {failed:?}");
    }
    let status = gw.process.wait_exit(20);
    assert!(status.success(), "exit status {status}");
}

#[test]
fn a_policy_whose_upstream_is_the_gateway_itself_is_refused_at_start() {
    let policy = PolicyFile::new(&policy_yaml("http://localhost:18080", ""));
    let stderr = support::sluice_fails(&[
        "gateway",
        "--listen",
        "0.0.0.0:18080",
        "--policy-file",
        policy.0.to_str().unwrap(),
    ]);
    assert!(stderr.contains("requests would loop"), "{stderr}");
}

#[tokio::test]
async fn metrics_can_live_on_their_own_port_only() {
    let c = client();
    let sim = Sim::start(&c, &[]).await;
    let (mut gw, _policy) =
        Gw::with_policy(&c, &sim.url, "", &["--metrics-listen", "127.0.0.1:0"]).await;
    let addr = gw.process.listen_addr("gateway metrics", 20);
    assert_eq!(get(&c, &format!("{}/metrics", gw.url)).await.status, 404);
    let m = get(&c, &format!("http://{addr}/metrics")).await;
    assert_eq!(m.status, 200);
    assert!(
        m.text().contains("sluice_policy_generation 1"),
        "{}",
        m.text()
    );
    assert_eq!(
        get(&c, &format!("http://{addr}/v1/models")).await.status,
        404
    );
    assert_eq!(get(&c, &format!("{}/v1/models", gw.url)).await.status, 200);
}
