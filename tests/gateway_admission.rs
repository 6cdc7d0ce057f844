//! Admission through the real router and relay, in this process, with an injected clock and
//! a seeded random source (see `support::inproc`): the samples the gateway takes are exactly
//! the clock steps the test makes, so the values of Retry-After and the moment the gate
//! reopens are pinned, not timed.

mod support;

use std::time::Duration;

use support::http::metric;
use support::inproc::InProc;

const MS: Duration = Duration::from_millis(1);

/// The hard cliff (every request shed while the pressure is above 1; no integral, no sample
/// ceiling), on the latency signals alone: the simplest curve to pin numbers on. (The
/// adaptive concurrency is pinned in the limiter's unit tests and tests/thresholds.rs.)
const CLIFF: &str = "defaults: {ttft: 1s, itl: 1s, timeConstant: 4s}\nshedding: {maxRejectProbability: 1, ramp: 1, adaptiveConcurrency: false}";

/// Requests in flight on the key of `m` (5: more than the low-concurrency baseline counts),
/// so that shedding applies at all: with nothing in flight nothing is shed.
const LOAD: usize = 5;

#[tokio::test]
async fn retry_after_is_when_the_ttft_average_falls_back_to_the_threshold() {
    let g = InProc::start(CLIFF).await;
    let _load = g.busy("m", LOAD).await;
    // One stream with a first token after 3 s: the TTFT average reads 3 s.
    assert_eq!(g.stream("m", &[], 3000 * MS, &[]).await.status, 200);
    let shed = g.stream("m", &[], MS, &[]).await;
    assert_eq!(shed.status, 429);
    // One sample's worth of evidence decays as 3·e^(−Δ/4s): back at 1 s after 4·ln 3 =
    // 4.394 s, stretched by a jitter factor in [1, 1.2).
    let retry = shed.retry_after();
    assert!(
        (4394 * MS..=5273 * MS).contains(&retry),
        "retry-after-ms {retry:?}"
    );
    let secs: u64 = shed.header("retry-after").unwrap().parse().unwrap();
    assert_eq!(secs, retry.as_millis().div_ceil(1000) as u64);
    let error = shed.body.as_ref().unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");

    // Just before the average is back under 1 s the gate is still shut ...
    g.clock.advance(4390 * MS);
    assert_eq!(g.stream("m", &[], MS, &[]).await.status, 429);
    // ... and just after, it admits.
    g.clock.advance(5 * MS);
    assert_eq!(g.stream("m", &[], 100 * MS, &[]).await.status, 200);
}

#[tokio::test]
async fn itl_sheds_on_its_own() {
    let g = InProc::start(CLIFF.replace("itl: 1s", "itl: 50ms").as_str()).await;
    let _load = g.busy("m", LOAD).await;
    // Fast first token, then 4 tokens 60 ms apart: the ITL average reads 60 ms > 50 ms.
    let gaps = [60 * MS; 4];
    assert_eq!(g.stream("m", &[], 10 * MS, &gaps).await.status, 200);
    let m = g.metrics().await;
    // (Samples this sparse, under one per τ·ln 2, read slightly low: see the estimator.)
    let itl = metric(&m, "sluice_itl_ema_seconds", &[("model", "other")]).unwrap();
    assert!((0.059..=0.06).contains(&itl), "{itl}");
    let ttft = metric(&m, "sluice_ttft_ema_seconds", &[("model", "other")]).unwrap();
    assert!(ttft < 0.01, "{ttft}");
    assert_eq!(g.stream("m", &[], MS, &[]).await.status, 429);
}

#[tokio::test]
async fn critical_is_never_shed_and_sheddable_goes_first() {
    // Behind an authenticating proxy that sets the header: trusted.
    let g = InProc::start(&format!("{CLIFF}\npriority: {{trustHeader: true}}")).await;
    let _load = g.busy("m", LOAD).await;
    let sheddable = [("x-sluice-priority", "sheddable")];
    let critical = [("x-sluice-priority", "critical")];
    // TTFT 0.9 s against 1 s: standard pressure 0.9, sheddable 0.9 × 1.25 = 1.125.
    assert_eq!(g.stream("m", &[], 900 * MS, &[]).await.status, 200);
    assert_eq!(g.stream("m", &sheddable, MS, &[]).await.status, 429);
    assert_eq!(g.stream("m", &[], MS, &[]).await.status, 200);
    // Far over the threshold: standard is shed, critical still goes through.
    assert_eq!(g.stream("m", &critical, 5000 * MS, &[]).await.status, 200);
    assert_eq!(g.stream("m", &[], MS, &[]).await.status, 429);
    assert_eq!(g.stream("m", &critical, MS, &[]).await.status, 200);
    let m = g.metrics().await;
    let count = |outcome| {
        metric(
            &m,
            "sluice_requests_total",
            &[
                ("model", "other"),
                ("endpoint", "chat_completions"),
                ("stream", "true"),
                ("outcome", outcome),
            ],
        )
        .unwrap_or(0.0)
    };
    assert_eq!((count("success"), count("rejected")), (4.0, 2.0));
}

#[tokio::test]
async fn shadow_mode_serves_what_it_would_shed_and_counts_it() {
    let g = InProc::start(&format!("mode: Shadow\n{CLIFF}")).await;
    let _load = g.busy("m", LOAD).await;
    assert_eq!(g.stream("m", &[], 3000 * MS, &[]).await.status, 200);
    let r = g.stream("m", &[], MS, &[]).await;
    assert_eq!(r.status, 200, "shadow mode rejects nothing");
    assert!(r.header("retry-after").is_none());
    let m = g.metrics().await;
    let shadow = metric(
        &m,
        "sluice_requests_total",
        &[
            ("model", "other"),
            ("endpoint", "chat_completions"),
            ("stream", "true"),
            ("outcome", "shadow_rejected"),
        ],
    );
    assert_eq!(shadow, Some(1.0), "{m}");
}

#[tokio::test]
async fn an_edited_threshold_during_an_overload_does_not_reopen_the_gate() {
    // The default curve (ramp 1.5, p_max 0.95, with the integral), τ 4 s.
    let spec =
        "defaults: {ttft: 1s, itl: 1s, timeConstant: 4s}\nshedding: {adaptiveConcurrency: false}";
    let g = InProc::start(spec).await;
    let _load = g.busy("m", LOAD).await;
    // 30 s of TTFT at 1.25 × the threshold: the integral drives the gate to p_max.
    let mut shed = 0;
    for _ in 0..30 {
        match g.stream("m", &[], 1250 * MS, &[]).await.status {
            200 => {}
            429 => {
                shed += 1;
                g.clock.advance(1000 * MS);
            }
            s => panic!("status {s}"),
        }
    }
    assert!(shed > 10, "only {shed} of 30 shed");
    let reject = |m: &str| metric(m, "sluice_reject_probability", &[("model", "other")]).unwrap();
    let before = reject(&g.metrics().await);
    assert!(before > 0.5, "{before}");

    // `kubectl patch`: the threshold moves to 1.1 s. The ramp alone would give
    // 0.95 · (1.25/1.1 − 1)/0.5 ≈ 0.26; the integral carries on.
    g.reload(
        "defaults: {ttft: 1100ms, itl: 1s, timeConstant: 4s}\nshedding: {adaptiveConcurrency: false}",
    );
    let m = g.metrics().await;
    assert_eq!(metric(&m, "sluice_policy_generation", &[]), Some(2.0));
    assert_eq!(
        metric(&m, "sluice_ttft_threshold_seconds", &[("model", "other")]),
        Some(1.1)
    );
    let after = reject(&m);
    assert!(
        (after - before).abs() < 0.02,
        "reject probability {before} → {after} across the reload"
    );
}

#[tokio::test]
async fn past_the_in_flight_limit_new_requests_get_503_overloaded() {
    let options = sluice::gateway::GatewayOptions {
        max_inflight: 2,
        ..Default::default()
    };
    let g = InProc::start_with(CLIFF, options).await;
    let a = g.hold("m").await;
    let _b = g.hold("m").await;
    let r = g.stream("m", &[], MS, &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    assert_eq!(r.body.as_ref().unwrap()["error"]["code"], "overloaded");
    let m = g.metrics().await;
    let overloaded = metric(
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
    // A place frees up when a held request ends.
    drop(a);
    support::eventually(5, "a free place", || async {
        (g.stream("m", &[], MS, &[]).await.status == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_untrusted_critical_claim_is_served_as_standard() {
    let g = InProc::start(CLIFF).await;
    let _load = g.busy("m", LOAD).await;
    let critical = [("x-sluice-priority", "critical")];
    assert_eq!(g.stream("m", &[], 5000 * MS, &[]).await.status, 200);
    // Far over the threshold: a client's own "critical" does not get it through ...
    let r = g.stream("m", &critical, MS, &[]).await;
    assert_eq!(r.status, 429, "an anonymous critical claim was honoured");
    // ... while lowering its priority is always allowed (and shed first).
    g.clock.advance(60_000 * MS);
    assert_eq!(g.stream("m", &[], 900 * MS, &[]).await.status, 200);
    let sheddable = [("x-sluice-priority", "sheddable")];
    assert_eq!(g.stream("m", &sheddable, MS, &[]).await.status, 429);
}

#[tokio::test]
async fn metric_labels_are_policy_models_or_other_never_client_text() {
    let g = InProc::start(&format!(
        "{CLIFF}\nmodels: [{{name: named, ttft: 1s, itl: 1s}}]"
    ))
    .await;
    let _load = g.busy("m", LOAD).await;
    for i in 0..40 {
        assert_eq!(
            g.stream(&format!("client-{i}"), &[], MS, &[]).await.status,
            200
        );
    }
    assert_eq!(g.stream("named", &[], MS, &[]).await.status, 200);
    let m = g.metrics().await;
    assert!(
        !m.contains("client-"),
        "a client's model name became a label:\n{m}"
    );
    let served = |model: &str| {
        metric(
            &m,
            "sluice_requests_total",
            &[
                ("model", model),
                ("endpoint", "chat_completions"),
                ("stream", "true"),
                ("outcome", "success"),
            ],
        )
    };
    assert_eq!(served("other"), Some(40.0), "{m}");
    assert_eq!(served("named"), Some(1.0), "{m}");
    // The unknown models share one gate: shedding for one sheds for all of them.
    g.clock.advance(60_000 * MS);
    assert_eq!(g.stream("client-x", &[], 5000 * MS, &[]).await.status, 200);
    assert_eq!(g.stream("client-y", &[], MS, &[]).await.status, 429);
    assert_eq!(g.stream("named", &[], MS, &[]).await.status, 200);
}

fn with_keys(dir: &support::TempDir) -> sluice::gateway::GatewayOptions {
    sluice::gateway::GatewayOptions {
        client_keys_dir: Some(dir.0.clone()),
        ..Default::default()
    }
}

#[tokio::test]
async fn required_client_keys_refuse_others_with_401_and_never_reach_the_upstream() {
    let keys = support::TempDir::client_keys(
        "auth",
        &[("checkout", "sk-checkout"), ("batch", "sk-batch")],
    );
    let spec = format!("{CLIFF}\nclientAuth: {{secretRef: {{name: keys}}}}");
    let g = InProc::start_with(&spec, with_keys(&keys)).await;
    for auth in [
        None,
        Some("Bearer sk-wrong"),
        Some("Bearer sk-checkou"),
        Some("sk-batch"),
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        let r = g.stream("m", &headers, MS, &[]).await;
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(r.body.as_ref().unwrap()["error"]["code"], "invalid_api_key");
        assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
        assert_eq!(
            r.header("connection").as_deref(),
            Some("close"),
            "the body was never read: the connection is not reused"
        );
    }
    let ok = g
        .stream("m", &[("authorization", "Bearer sk-batch")], MS, &[])
        .await;
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.upstream_authorization, None,
        "the client's key is the gateway's business, never the engine's"
    );
    let m = g.metrics().await;
    let refused = metric(
        &m,
        "sluice_requests_total",
        &[
            ("model", ""),
            ("endpoint", "chat_completions"),
            ("stream", "false"),
            ("outcome", "client_error"),
        ],
    );
    assert_eq!(refused, Some(4.0), "{m}");
    // Passed-through endpoints are behind the same door.
    let c = support::http::client();
    let models = support::http::get(&c, &format!("{}/v1/models", g.url)).await;
    assert_eq!(models.status, 401);
    assert_eq!(
        models.header("connection"),
        None,
        "no body: the connection stays"
    );
}

#[tokio::test]
async fn a_second_priority_or_authorization_header_is_a_400_not_a_choice() {
    // Behind a proxy that appends its own priority to the client's, the first copy used to
    // win: the client's `critical`, with the header trusted.
    let keys = support::TempDir::client_keys("repeated", &[("batch", "sk-batch")]);
    let spec = format!(
        "{CLIFF}\nclientAuth: {{secretRef: {{name: keys}}, required: false}}\npriority: {{trustHeader: true}}"
    );
    let g = InProc::start_with(&spec, with_keys(&keys)).await;
    let twice = [
        [
            ("x-sluice-priority", "critical"),
            ("x-sluice-priority", "sheddable"),
        ],
        [
            ("authorization", "Bearer sk-batch"),
            ("authorization", "Bearer other"),
        ],
    ];
    for headers in twice {
        let out = g.stream("m", &headers, MS, &[]).await;
        assert_eq!(out.status, 400, "{headers:?}");
        let error = &out.body.as_ref().unwrap()["error"];
        assert_eq!(error["param"], headers[0].0, "{error}");
    }
    let once = [
        ("authorization", "Bearer sk-batch"),
        ("x-sluice-priority", "sheddable"),
    ];
    assert_eq!(g.stream("m", &once, MS, &[]).await.status, 200);
}

#[tokio::test]
async fn a_clients_class_sets_its_priority_and_caps_its_claims() {
    let keys = support::TempDir::client_keys(
        "classes",
        &[
            ("checkout", "sk-checkout"),
            ("batch", "sk-batch"),
            ("web", "sk-web"),
        ],
    );
    let spec = format!(
        "{CLIFF}\nclientAuth: {{secretRef: {{name: keys}}, required: false}}\npriority: {{clients: {{checkout: critical, batch: sheddable}}}}"
    );
    let g = InProc::start_with(&spec, with_keys(&keys)).await;
    let _load = g.busy("m", LOAD).await;
    let as_ = |key: &'static str| [("authorization", key)];
    let claim =
        |key: &'static str, p: &'static str| [("authorization", key), ("x-sluice-priority", p)];
    // TTFT 0.9 s against 1 s: standard pressure 0.9, sheddable 0.9 × 1.25 = 1.125.
    assert_eq!(
        g.stream("m", &[], 900 * MS, &[]).await.status,
        200,
        "anonymous"
    );
    assert_eq!(
        g.stream("m", &as_("Bearer sk-batch"), MS, &[]).await.status,
        429,
        "batch is sheddable"
    );
    assert_eq!(
        g.stream("m", &claim("Bearer sk-batch", "critical"), MS, &[])
            .await
            .status,
        429,
        "and cannot claim more"
    );
    assert_eq!(
        g.stream("m", &as_("Bearer sk-web"), MS, &[]).await.status,
        200,
        "unlisted: standard"
    );
    // Far over the threshold: only the critical client gets through, with or without a claim.
    assert_eq!(
        g.stream("m", &as_("Bearer sk-checkout"), 5000 * MS, &[])
            .await
            .status,
        200
    );
    assert_eq!(
        g.stream("m", &as_("Bearer sk-checkout"), MS, &[])
            .await
            .status,
        200
    );
    assert_eq!(
        g.stream("m", &claim("Bearer sk-web", "critical"), MS, &[])
            .await
            .status,
        429
    );
    assert_eq!(
        g.stream("m", &[("x-sluice-priority", "critical")], MS, &[])
            .await
            .status,
        429
    );
    assert_eq!(
        g.stream("m", &as_("Bearer sk-wrong"), MS, &[]).await.status,
        429,
        "unknown key: anonymous"
    );
    // A critical client may lower itself.
    assert_eq!(
        g.stream("m", &claim("Bearer sk-checkout", "standard"), MS, &[])
            .await
            .status,
        429
    );
}

#[tokio::test]
async fn with_nothing_in_flight_nothing_is_shed_whatever_the_latency() {
    let g = InProc::start(CLIFF).await;
    // TTFT 5 s against 1 s; then one request at a time: the engine is idle each time.
    assert_eq!(g.stream("m", &[], 5000 * MS, &[]).await.status, 200);
    for _ in 0..5 {
        assert_eq!(g.stream("m", &[], 5000 * MS, &[]).await.status, 200);
    }
    // With one request in flight the same latency sheds.
    let _load = g.busy("m", 1).await;
    assert_eq!(g.stream("m", &[], MS, &[]).await.status, 429);
}
