//! `sluice loadgen` as a real process against the simulated engine and a shedding gateway.

mod support;

use support::http::{Gw, PolicyFile, Sim, client, policy_yaml};
use support::loadgen::{loadgen, loadgen_env};

#[tokio::test]
async fn an_engine_below_capacity_meets_every_slo() {
    let c = client();
    let sim = Sim::batch(&c, 32, 5).await;
    let (r, table) = loadgen(
        &sim.url,
        &[
            "--rate",
            "10",
            "--duration",
            "3s",
            "--prompt-chars",
            "50-200",
            "--output-tokens",
            "4-8",
            "--seed",
            "7",
        ],
    );
    let sent = r["sent"].as_u64().unwrap();
    assert!(
        (15..=50).contains(&sent),
        "Poisson at 10/s for 3 s sent {sent}"
    );
    assert_eq!(r["good"], r["sent"], "{r}");
    assert_eq!(r["rejected"], 0);
    assert!((r["goodput_rps"].as_f64().unwrap() - sent as f64 / 3.0).abs() < 1e-9);
    assert_eq!(r["attainment_offered"], 1.0);
    let itl = r["itl_s"]["p50"].as_f64().unwrap();
    assert!(itl > 0.003 && itl < 0.05, "ITL p50 {itl}");
    assert_eq!(r["series"].as_array().unwrap().len(), 3);
    assert!(table.contains("goodput"), "{table}");
}

#[tokio::test]
async fn shed_requests_count_as_misses_through_a_shedding_gateway() {
    let c = client();
    let sim = Sim::batch(&c, 2, 10).await;
    let policy = PolicyFile::new(&policy_yaml(
        &sim.url,
        // The load generator's critical requests count as critical: trusted here.
        "defaults: {ttft: 200ms, itl: 1s, timeConstant: 1s}\npriority: {trustHeader: true}",
    ));
    let gw = Gw::start(&c, &policy.0, None, &[]).await;
    // Offered far beyond two slots of 30-token streams (~3 req/s).
    let (r, _) = loadgen(
        &gw.url,
        &[
            "--rate",
            "20",
            "--duration",
            "4s",
            "--output-tokens",
            "30-30",
            "--prompt-chars",
            "100-100",
            "--ttft-slo",
            "500ms",
            "--itl-slo",
            "100ms",
            "--priority-mix",
            "standard=0.8,critical=0.2",
            "--metrics-url",
            &format!("{}/metrics", gw.url),
        ],
    );
    let (sent, rejected, good) = (
        r["sent"].as_u64().unwrap(),
        r["rejected"].as_u64().unwrap(),
        r["good"].as_u64().unwrap(),
    );
    assert!(rejected > 0, "nothing shed: {r}");
    assert!(good < sent);
    assert!(
        r["attainment_admitted"].as_f64().unwrap() >= r["attainment_offered"].as_f64().unwrap()
    );
    assert!(r["goodput_rps"].as_f64().unwrap() < r["offered_rps"].as_f64().unwrap());
    assert_eq!(
        r["by_priority"]["critical"]["rejected"], 0,
        "critical requests are never shed: {r}"
    );
    // The gateway's gauges were sampled once a second and show the gate closing.
    let gauges = r["gauges"].as_array().expect("gauges sampled");
    assert!(gauges.len() >= 3, "{gauges:?}");
    let max = |k: &str| {
        gauges
            .iter()
            .map(|g| g[k].as_f64().unwrap())
            .fold(0.0, f64::max)
    };
    assert!(
        max("pressure") > 1.0 && max("ttft_ema_s") > 0.2,
        "{gauges:?}"
    );
    assert!(max("reject_probability") > 0.0, "{gauges:?}");
}

#[tokio::test]
async fn the_in_flight_cap_sends_at_most_n_concurrent_requests_and_counts_the_rest_as_shed() {
    let c = client();
    // Two slots of 10 ms steps: every 20-token request takes at least 200 ms.
    let sim = Sim::batch(&c, 2, 10).await;
    let (r, _) = loadgen(
        &sim.url,
        &[
            "--rate",
            "50",
            "--duration",
            "2s",
            "--output-tokens",
            "20-20",
            "--prompt-chars",
            "50-50",
            "--max-inflight",
            "3",
            "--seed",
            "3",
        ],
    );
    let (sent, rejected, errors) = (
        r["sent"].as_u64().unwrap(),
        r["rejected"].as_u64().unwrap(),
        r["errors"].as_u64().unwrap(),
    );
    assert_eq!(errors, 0, "{r}");
    assert!(rejected > 0, "{r}");
    // At most 3 at a time, each at least 200 ms, over about 2 s: no more than ~33 sent on.
    assert!(
        sent - rejected <= 36,
        "{} admitted past a cap of 3: {r}",
        sent - rejected
    );
    let stats = sim.stats(&c).await;
    assert_eq!(
        stats["requests"].as_u64().unwrap(),
        sent - rejected,
        "{stats}"
    );
}

#[tokio::test]
async fn the_api_key_is_sent_never_printed_and_completions_can_be_driven() {
    let c = client();
    let sim = Sim::batch(&c, 32, 5).await;
    let keys = support::TempDir::client_keys("loadgen-keys", &[("bench", "sk-loadgen-secret")]);
    let (gw, _policy) = Gw::with_policy(
        &c,
        &sim.url,
        "clientAuth: {secretRef: {name: clients}}",
        &["--client-keys-dir", keys.arg()],
    )
    .await;
    let quick = [
        "--rate",
        "10",
        "--duration",
        "1s",
        "--prompt-chars",
        "50-100",
        "--output-tokens",
        "2-4",
        "--seed",
        "3",
    ];
    // Without the key every request is refused (401 counts as an error).
    let (r, _) = loadgen(&gw.url, &quick);
    assert_eq!(r["ok"], 0, "{r}");
    // With it, from the environment as the OpenAI SDK reads it, or from the flag.
    let (r, out) = loadgen_env(&gw.url, &quick, &[("OPENAI_API_KEY", "sk-loadgen-secret")]);
    assert_eq!(r["ok"], r["sent"], "{r}");
    assert!(!out.contains("sk-loadgen-secret"), "{out}");
    let completions = [
        &quick[..],
        &[
            "--endpoint",
            "completions",
            "--api-key",
            "sk-loadgen-secret",
        ],
    ]
    .concat();
    let (r, out) = loadgen(&gw.url, &completions);
    assert_eq!(r["ok"], r["sent"], "{r}");
    assert!(!out.contains("sk-loadgen-secret"), "{out}");
    let m = gw.metrics(&c).await;
    let completions_served = support::http::metric(
        &m,
        "sluice_requests_total",
        &[
            ("model", "sim-llm"),
            ("endpoint", "completions"),
            ("stream", "true"),
            ("outcome", "success"),
        ],
    );
    assert_eq!(completions_served, r["sent"].as_f64(), "{m}");
}

#[test]
fn a_bad_url_is_a_clear_error_not_a_panic() {
    for (url, says) in [
        ("127.0.0.1:8080", "no http:// scheme"),
        ("not a url", "is not a URL"),
        ("https://127.0.0.1:8080", "https is not supported"),
        ("http://", "is not a URL"),
    ] {
        for flag in ["--url", "--metrics-url"] {
            let mut args = vec!["loadgen", "--duration", "1s", flag, url];
            if flag != "--url" {
                args.extend(["--url", "http://127.0.0.1:9"]);
            }
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
                .args(&args)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{flag} {url}: {err}");
            assert!(
                err.contains(flag) && err.contains(says) && !err.contains("panicked"),
                "{flag} {url}: {err}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shed_request_is_retried_as_often_as_asked_after_its_retry_after() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    // An endpoint that sheds everything, asking for a 20 ms wait.
    let hits = Arc::new(AtomicU64::new(0));
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post({
            let hits = hits.clone();
            move || async move {
                hits.fetch_add(1, Ordering::SeqCst);
                (
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after-ms", "20"), ("retry-after", "1")],
                    r#"{"error":{"message":"shed","type":"rate_limit_exceeded","code":"rate_limit_exceeded"}}"#,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    for (extra, sends) in [
        (&[][..], 1),
        (&["--honor-retry-after"][..], 2),
        (&["--max-retries", "2"][..], 3),
        (&["--honor-retry-after", "--max-retries", "0"][..], 1),
    ] {
        hits.store(0, Ordering::SeqCst);
        let (url, extra) = (url.clone(), extra.to_vec());
        let (r, _) = tokio::task::spawn_blocking(move || {
            let mut args = vec!["--rate", "20", "--duration", "1s", "--seed", "1"];
            args.extend(extra);
            loadgen(&url, &args)
        })
        .await
        .unwrap();
        let sent = r["sent"].as_u64().unwrap();
        assert!(sent > 5, "{r}");
        assert_eq!(r["rejected"].as_u64().unwrap(), sent, "{r}");
        assert_eq!(
            hits.load(Ordering::SeqCst),
            sent * sends,
            "{sends} sends each: {r}"
        );
    }
    server.abort();
}
