//! The gateway as a real process of the built binary on 127.0.0.1, around its traffic: an
//! upstream that is down, slow or failing, a client that disconnects, hot reload of the policy
//! file, SIGTERM draining, the demo, a rollout under steady load, a self-referencing upstream
//! and a separate metrics port.

mod support;

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use serde_json::json;
use support::http::{
    Gw, PolicyFile, Sim, chat_request as chat, client, get, metric, policy_yaml, post_json,
    sse_data as sse_events, start,
};
use support::metrics::chat_requests;

/// Starts a streamed chat completion of `max_tokens` through the gateway at `url`; the
/// response as its head arrives.
async fn stream_chat(
    c: &support::http::HttpClient,
    url: &str,
    max_tokens: u32,
) -> hyper::Response<hyper::body::Incoming> {
    let body = serde_json::to_vec(&chat(max_tokens, true)).unwrap();
    start(c, "POST", &format!("{url}/v1/chat/completions"), &[], body).await
}

/// A simulated engine that gives a token every 20 ms, whatever its load.
async fn sim_20ms_per_token(c: &support::http::HttpClient) -> Sim {
    Sim::start(
        c,
        &["--decode-step-ms", "20", "--decode-step-ms-per-seq", "0"],
    )
    .await
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
        chat_requests(&m, "sim-llm", false, "upstream_error"),
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
    let sim = sim_20ms_per_token(&c).await;
    let (gw, _policy) = Gw::with_policy(&c, &sim.url, "", &[]).await;
    let resp = stream_chat(&c, &gw.url, 1000).await;
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
    assert_eq!(chat_requests(&m, "sim-llm", true, "cancelled"), Some(1.0));
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

/// The stderr of a gateway started on `listen` with a policy whose upstream is `upstream`,
/// which must fail.
fn gateway_fails(upstream: &str, listen: &str) -> String {
    let policy = PolicyFile::new(&policy_yaml(upstream, ""));
    support::sluice_fails(&[
        "gateway",
        "--listen",
        listen,
        "--policy-file",
        policy.0.to_str().unwrap(),
    ])
}

#[test]
fn a_fleet_naming_an_endpoint_twice_or_the_gateway_itself_is_refused_at_start() {
    let policy = PolicyFile::new(&policy_yaml("http://127.0.0.1:9", ""));
    let err = support::sluice_fails(&[
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--policy-file",
        policy.0.to_str().unwrap(),
        "--upstream",
        "http://127.0.0.1:9",
        "--upstream",
        "http://127.0.0.1:9/v1",
    ]);
    assert!(err.contains("given twice (127.0.0.1:9)"), "{err}");
    // An endpoint of the policy's list that is the gateway's own address: requests would loop.
    let doc = policy_yaml("http://127.0.0.1:9", "").replace(
        "upstream: {url: 'http://127.0.0.1:9'}",
        "upstream: {url: 'http://127.0.0.1:9', endpoints: ['http://127.0.0.1:9', 'http://localhost:18081']}",
    );
    let policy = PolicyFile::new(&doc);
    let err = support::sluice_fails(&[
        "gateway",
        "--listen",
        "0.0.0.0:18081",
        "--policy-file",
        policy.0.to_str().unwrap(),
    ]);
    assert!(
        err.contains("localhost:18081") && err.contains("loop"),
        "{err}"
    );
}

#[tokio::test]
async fn an_invalid_policy_file_at_start_is_a_clear_error() {
    let err = gateway_fails("ftp://nowhere", "127.0.0.1:0");
    assert!(err.contains("spec.upstream.url"), "{err}");
}

#[test]
fn an_upstream_with_credentials_in_its_url_is_refused_at_start_without_echoing_them() {
    let err = gateway_fails("http://user:s3cret@127.0.0.1:9", "127.0.0.1:0");
    assert!(err.contains("must not carry credentials"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
    let policy = PolicyFile::new(&policy_yaml("http://127.0.0.1:9", ""));
    let err = support::sluice_fails(&[
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--policy-file",
        policy.0.to_str().unwrap(),
        "--upstream",
        "http://user:s3cret@127.0.0.1:9",
    ]);
    assert!(err.contains("must not carry credentials"), "{err}");
}

#[tokio::test]
async fn sigterm_drains_in_flight_streams_and_exits_zero() {
    let c = client();
    let sim = sim_20ms_per_token(&c).await;
    let (mut gw, _policy) = Gw::with_policy(
        &c,
        &sim.url,
        "",
        &["--drain-timeout", "20s", "--drain-delay", "0s"],
    )
    .await;
    let resp = stream_chat(&c, &gw.url, 40).await;
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
    // Not ready while draining, as soon as the signal is handled (and still serving).
    support::eventually(5, "/readyz 503 while draining", || async {
        (get(&c, &format!("{}/readyz", gw.url)).await.status == 503).then_some(())
    })
    .await;
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
    let stderr = gateway_fails("http://localhost:18080", "0.0.0.0:18080");
    assert!(stderr.contains("requests would loop"), "{stderr}");
}

#[tokio::test]
async fn metrics_can_live_on_their_own_port_only() {
    let c = client();
    let sim = Sim::start(&c, &[]).await;
    let (mut gw, _policy) = Gw::with_policy(
        &c,
        &sim.url,
        "",
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--header-read-timeout",
            "1s",
        ],
    )
    .await;
    let addr = gw.process.listen_addr("gateway metrics", 20);
    assert_eq!(
        get(&client(), &format!("{}/metrics", gw.url)).await.status,
        404
    );
    let m = get(&client(), &format!("http://{addr}/metrics")).await;
    assert_eq!(m.status, 200);
    assert!(
        m.text().contains("sluice_policy_generation 1"),
        "{}",
        m.text()
    );
    assert_eq!(
        get(&client(), &format!("http://{addr}/v1/models"))
            .await
            .status,
        404
    );
    assert_eq!(
        get(&client(), &format!("{}/v1/models", gw.url))
            .await
            .status,
        200
    );
    // The metrics port has the API port's limits: a connection that says nothing is closed at
    // the header-read timeout, not held. (The 1 s timeout closes idle pooled connections as
    // well, so each request above takes a client, and a connection, of its own.)
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut silent, &mut buf),
    )
    .await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a silent connection to the metrics port was still open after 10 s: {read:?}"
    );
}
