//! A fleet of real processes: one `sluice gateway` in front of three simulated engines of
//! different speeds (`--upstream` three times). One engine is killed under load: the only
//! requests that fail are the streams it was serving; every request after it goes to the
//! other two, the first ones sent to the dead engine retried there (connection refused), until
//! it is ejected.

mod support;

use http_body_util::BodyExt;
use support::http::{Gw, PolicyFile, Sim, chat_request, client, metric, policy_yaml, start};

#[tokio::test]
async fn killing_an_engine_under_load_fails_only_the_streams_it_was_serving() {
    let c = client();
    let mut sims = [
        Sim::batch(&c, 16, 10).await,
        Sim::batch(&c, 16, 10).await,
        Sim::batch(&c, 16, 20).await,
    ];
    let urls: Vec<String> = sims.iter().map(|s| s.url.clone()).collect();
    let policy = PolicyFile::new(&policy_yaml(&urls[0], ""));
    let upstreams: Vec<&str> = urls.iter().flat_map(|u| ["--upstream", u]).collect();
    let gw = Gw::start(&c, &policy.0, None, &upstreams).await;
    let chat = format!("{}/v1/chat/completions", gw.url);

    // Twelve long streams (200 tokens: 2–4 s), each with its first chunk read.
    let mut streams = Vec::new();
    for _ in 0..12 {
        let body = chat_request(200, true).to_string();
        let resp = start(&c, "POST", &chat, &[], body).await;
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let first = body
            .frame()
            .await
            .expect("a first chunk")
            .expect("no error");
        let mut text = first.into_data().unwrap().to_vec();
        text.reserve(8192);
        streams.push((body, text));
    }
    // A fast engine: the one new requests would go to most.
    let victim = urls[0].trim_start_matches("http://");
    let m = gw.metrics(&c).await;
    let labels = [("upstream", victim), ("model", "sim-llm")];
    let on_victim = metric(&m, "sluice_upstream_in_flight_requests", &labels).unwrap();
    assert!(on_victim >= 1.0, "no stream went to the first engine: {m}");

    sims[0].process.child.kill().unwrap();
    sims[0].process.child.wait().unwrap();
    let mut failed = 0.0;
    for (mut body, mut text) in streams {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => text.extend_from_slice(&f.into_data().unwrap_or_default()),
                Err(_) => break,
            }
        }
        let text = String::from_utf8_lossy(&text);
        if !text.contains("data: [DONE]") || text.contains("\"error\"") {
            failed += 1.0;
        }
    }
    assert_eq!(failed, on_victim, "only the dead engine's streams fail");

    // Every request after the kill is served, by the two engines left (bursts of ten at
    // once, so that routing sees requests in flight).
    let unary = chat_request(4, false);
    for _ in 0..4 {
        let burst = (0..10).map(|_| gw.chat(&c, &unary));
        for r in futures_util::future::join_all(burst).await {
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
    let m = gw.metrics(&c).await;
    let up = metric(&m, "sluice_upstream_up", &[("upstream", victim)]);
    let refused = metric(
        &m,
        "sluice_upstream_errors_total",
        &[("reason", "unreachable")],
    );
    // Refused connections eject it after five in a row (each of those requests retried; a
    // burst may have sent a few more before the fifth came back).
    assert_eq!(up, Some(0.0), "{m}");
    assert!(refused.is_some_and(|n| n >= 5.0), "{m}");
    let warnings = gw.process.warnings().join("\n");
    assert!(
        warnings.contains("endpoint ejected") && warnings.contains(victim),
        "{warnings}"
    );
}
