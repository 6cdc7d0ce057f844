//! Tenants' request budgets (`spec.tenants`) through the real router and relay, in this
//! process, with an injected clock (see `support::inproc`): OpenAI's rate-limit headers on
//! every answer, 429 of type `requests` once a tenant's share is spent, room again with the clock,
//! tenants from a trusted header only when the policy lists them, each pod's share of a
//! budget, and load shedding that spends no budget.

mod support;

use std::time::Duration;

use support::http::metric;
use support::inproc::{InProc, Outcome};

const MS: Duration = Duration::from_millis(1);
/// A first token at once: the clock stands still, so the budgets' numbers are exact.
const NOW: Duration = Duration::ZERO;
const BATCH: (&str, &str) = ("x-tenant", "batch");

fn policy(extra: &str) -> String {
    format!(
        "defaults: {{ttft: 1s, itl: 1s, timeConstant: 4s}}\nshedding: {{maxRejectProbability: 1, ramp: 1, adaptiveConcurrency: false}}\ntenants: {{header: x-tenant, trustHeader: true, default: {{requestsPerMinute: 2}}, clients: {{batch: {{requestsPerMinute: 3}}}}}}{extra}"
    )
}

fn quota(o: &Outcome) -> (String, String, String) {
    let h = |n: &str| o.header(n).unwrap_or_else(|| panic!("{n} missing: {o:?}"));
    (
        h("x-ratelimit-limit-requests"),
        h("x-ratelimit-remaining-requests"),
        h("x-ratelimit-reset-requests"),
    )
}

#[tokio::test]
async fn a_tenant_past_its_requests_per_minute_gets_429_of_type_requests_with_openai_headers() {
    let g = InProc::start(&policy("")).await;
    // 3 a minute, all at once if they come at once; every answer says what is left.
    for left in ["2", "1", "0"] {
        let ok = g.stream("m", &[BATCH], NOW, &[]).await;
        assert_eq!(ok.status, 200);
        let (limit, remaining, _) = quota(&ok);
        assert_eq!((limit.as_str(), remaining.as_str()), ("3", left));
    }
    let refused = g.stream("m", &[BATCH], NOW, &[]).await;
    assert_eq!(refused.status, 429);
    let error = &refused.body.as_ref().unwrap()["error"];
    assert_eq!(error["type"], "requests", "told apart from load shedding");
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert!(error["message"].as_str().unwrap().contains("\"batch\""));
    // One more fits a third into the next minute, when this minute's 3 weigh 2.
    assert_eq!(refused.retry_after(), 80_000 * MS);
    assert_eq!(refused.header("retry-after").as_deref(), Some("80"));
    assert_eq!(
        quota(&refused),
        ("3".into(), "0".into(), "2m0s".into()),
        "nothing counts after two minutes"
    );
    // Anonymous has its own budget, the default's 2; so has an unlisted header value.
    for _ in 0..2 {
        assert_eq!(g.stream("m", &[], NOW, &[]).await.status, 200);
    }
    let unlisted = g.stream("m", &[("x-tenant", "made-up")], NOW, &[]).await;
    assert_eq!(unlisted.status, 429, "an unlisted name is anonymous");
    // 80 s later the batch tenant has one again.
    g.clock.advance(80_000 * MS);
    let again = g.stream("m", &[BATCH], MS, &[]).await;
    assert_eq!(again.status, 200);
    assert_eq!(quota(&again).1, "0");
    let m = g.metrics().await;
    let over = |t: &str| metric(&m, "sluice_tenant_over_budget_total", &[("tenant", t)]);
    assert_eq!((over("batch"), over("anonymous")), (Some(1.0), Some(1.0)));
    let over_budget: f64 = (m.lines())
        .filter(|l| {
            l.starts_with("sluice_requests_total{") && l.contains("outcome=\"over_budget\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(over_budget, 2.0, "{m}");
}

#[tokio::test]
async fn unary_answers_carry_the_headers_and_each_pod_enforces_its_share() {
    // 4 a minute over two gateway pods: 2 here.
    let g =
        InProc::start(&policy("").replace("requestsPerMinute: 3", "requestsPerMinute: 4")).await;
    g.reload(
        &policy("\ngateway: {replicas: 2}").replace("requestsPerMinute: 3", "requestsPerMinute: 4"),
    );
    let c = support::http::client();
    let models = format!("{}/v1/models", g.url);
    let first = support::http::send(&c, "GET", &models, &[BATCH], "").await;
    assert_eq!(
        first.header("x-ratelimit-limit-requests").as_deref(),
        Some("2"),
        "{}",
        first.status
    );
    assert_eq!(
        first.header("x-ratelimit-remaining-requests").as_deref(),
        Some("1")
    );
    assert_eq!(
        first.header("x-ratelimit-reset-requests").as_deref(),
        Some("2m0s")
    );
    let ok = g.stream("m", &[BATCH], NOW, &[]).await;
    assert_eq!(quota(&ok).1, "0");
    assert_eq!(g.stream("m", &[BATCH], NOW, &[]).await.status, 429);
}

#[tokio::test]
async fn load_shedding_spends_no_budget() {
    // Anonymous (the load below) without a budget.
    let g = InProc::start(&policy("").replace("default: {requestsPerMinute: 2}, ", "")).await;
    let _load = g.busy("m", 5).await;
    // One of its three spent on a stream whose TTFT (3 s) closes the gate.
    assert_eq!(g.stream("m", &[BATCH], 3000 * MS, &[]).await.status, 200);
    // Shed five times by the latency gate: 429 of load shedding's type, budget untouched.
    for _ in 0..5 {
        let shed = g.stream("m", &[BATCH], MS, &[]).await;
        assert_eq!(shed.status, 429);
        assert_eq!(
            shed.body.as_ref().unwrap()["error"]["type"],
            "rate_limit_exceeded"
        );
        assert_eq!(quota(&shed).1, "2", "given back: {shed:?}");
    }
    // The gate reopens (the average back under 1 s after 4 ln 3 s): two left, as before.
    g.clock.advance(4400 * MS);
    assert_eq!(g.stream("m", &[BATCH], 100 * MS, &[]).await.status, 200);
}

#[tokio::test]
async fn a_client_rotating_tenant_names_is_one_anonymous_tenant_with_one_budget() {
    let g = InProc::start(&policy("")).await;
    // Made-up names, each new: all anonymous, sharing the default's 2 a minute.
    let mut statuses = Vec::new();
    for i in 0..6 {
        let name = format!("rotating-{i}");
        let o = g
            .stream("m", &[("x-tenant", name.as_str())], NOW, &[])
            .await;
        statuses.push(o.status);
    }
    assert_eq!(statuses, [200, 200, 429, 429, 429, 429]);
    // No metric label, and no budget, was made from the names the client sent.
    let m = g.metrics().await;
    assert!(!m.contains("rotating-"), "{m}");
    let requests = |o: &str| {
        metric(
            &m,
            "sluice_tenant_requests_total",
            &[("tenant", "anonymous"), ("outcome", o)],
        )
    };
    assert_eq!(
        (requests("success"), requests("over_budget")),
        (Some(2.0), Some(4.0))
    );
}
