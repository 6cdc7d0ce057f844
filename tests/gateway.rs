//! The gateway and the simulated engine as real processes of the built binary on 127.0.0.1:
//! proxying, measurement, shedding, Shadow mode, metrics and the error contract. (Upstream
//! failures, hot reload, disconnects, shutdown, rollouts and ports: `gateway_process.rs`.)

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::http::{
    Gw, Sim, chat_request as chat, client, get, metric, post_json, send, sse_data as sse_events,
};
use support::metrics::chat_requests;

/// Drops the parts that differ between two calls (ids, timestamps).
fn without_ids(mut v: Value) -> Value {
    v.as_object_mut().unwrap().remove("id");
    v.as_object_mut().unwrap().remove("created");
    v
}

#[tokio::test]
async fn streams_and_unary_responses_pass_through_and_are_measured() {
    let c = client();
    let sim = Sim::start(&c, &["--max-num-seqs", "4"]).await;
    // Assembled from the first unary request on (the usage probe has its own tests in
    // tests/engines.rs and gateway::unary).
    let probe_off = ["--usage-probe=false"];
    let (gw, _policy) =
        Gw::with_policy(&c, &sim.url, "defaults: {ttft: 5s, itl: 1s}", &probe_off).await;

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
    assert!(chat_requests(&m, "sim-llm", false, "rejected").unwrap() >= 1.0);
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
    let shadow = chat_requests(&m, "sim-llm", true, "shadow_rejected");
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
    assert_eq!(chat_requests(&m, "", false, "client_error"), Some(8.0));
}
