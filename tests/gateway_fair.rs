//! Tenants in the latency gate and their token budgets, through the real router and relay in
//! this process with an injected clock and a seeded random source (see `support::inproc`):
//! a light tenant is served while a heavy one over its fair share is shed, priorities rank
//! before fairness, and token budgets are held at the estimate and settled to the tokens
//! relayed, with OpenAI's token headers.

mod support;

use std::time::Duration;

use support::http::{client, metric, send};
use support::inproc::InProc;

const MS: Duration = Duration::from_millis(1);
const LIGHT: (&str, &str) = ("x-tenant", "light");
const HEAVY: (&str, &str) = ("x-tenant", "heavy");

/// Over a TTFT of 1 s the gate sheds half of the standard requests (a cliff at p = 0.5, no
/// concurrency rules).
fn policy(tenants: &str) -> String {
    format!(
        "defaults: {{ttft: 1s, itl: 1s, timeConstant: 4s}}\nshedding: {{maxRejectProbability: 0.5, ramp: 1, adaptiveConcurrency: false}}\ntenants: {{header: x-tenant, trustHeader: true, {tenants}}}"
    )
}

/// Every stream the engine serves takes 1.5 s to its first token: the gate stays half shut.
const SLOW: Duration = Duration::from_millis(1500);

#[tokio::test]
async fn a_light_tenant_is_served_while_a_heavy_one_over_its_share_is_shed() {
    let g = InProc::start(&policy("clients: {light: {}, heavy: {}}")).await;
    // Load in flight, so that work conservation (nothing in flight) does not apply.
    let _load = g.busy("m", 10).await;
    assert_eq!(g.stream("m", &[LIGHT], MS, &[]).await.status, 200);
    // Heavy comes first: until some of its requests are shed, no one is over a share.
    let mut heavy_shed = 0;
    for _ in 0..8 {
        heavy_shed += usize::from(g.stream("m", &[HEAVY], SLOW, &[]).await.status == 429);
    }
    assert!(heavy_shed > 0);
    // Then heavy sends 4 requests for each of light's; the gate sheds about half of heavy's.
    let mut light_shed = 0;
    for i in 8..68 {
        heavy_shed += usize::from(g.stream("m", &[HEAVY], SLOW, &[]).await.status == 429);
        if i % 4 == 3 {
            light_shed += usize::from(g.stream("m", &[LIGHT], SLOW, &[]).await.status == 429);
        }
    }
    assert_eq!(light_shed, 0, "light stays under its share");
    assert!((24..=44).contains(&heavy_shed), "{heavy_shed} of 68");
    let m = g.metrics().await;
    let gauge = |name: &str, t: &str| {
        let labels = [("model", "other"), ("tenant", t)];
        metric(&m, name, &labels).unwrap_or_else(|| panic!("{name} {t}: {m}"))
    };
    let heavy_share = gauge("sluice_tenant_fair_share_tokens_per_second", "heavy");
    let heavy_use = gauge("sluice_tenant_use_tokens_per_second", "heavy");
    assert!(heavy_share.is_finite() && heavy_use > heavy_share, "{m}");
    assert!(gauge("sluice_tenant_use_tokens_per_second", "light") < heavy_share);
    assert!(gauge("sluice_tenant_shed_ratio", "heavy") > 0.2, "{m}");
    assert_eq!(gauge("sluice_tenant_shed_ratio", "light"), 0.0);
    // Priorities rank first: light's sheddable requests take the gate's word.
    let sheddable = [LIGHT, ("x-sluice-priority", "sheddable")];
    let mut shed = 0;
    for _ in 0..10 {
        shed += usize::from(g.stream("m", &sheddable, SLOW, &[]).await.status == 429);
    }
    assert!(shed >= 2, "{shed} of 10 sheddable requests shed");
    let m = g.metrics().await;
    let requests = |t: &str, o: &str| {
        metric(
            &m,
            "sluice_tenant_requests_total",
            &[("tenant", t), ("outcome", o)],
        )
    };
    assert_eq!(
        requests("light", "rejected").unwrap_or(0.0),
        shed as f64,
        "{m}"
    );
    assert_eq!(requests("heavy", "rejected"), Some(heavy_shed as f64));
    assert_eq!(requests("heavy", "success"), Some(68.0 - heavy_shed as f64));
}

#[tokio::test]
async fn the_only_tenant_sending_takes_the_gates_word() {
    let g = InProc::start(&policy("clients: {light: {}}")).await;
    let _load = g.busy("m", 10).await;
    assert_eq!(g.stream("m", &[LIGHT], SLOW, &[]).await.status, 200);
    let mut shed = 0;
    for _ in 0..20 {
        shed += usize::from(g.stream("m", &[LIGHT], SLOW, &[]).await.status == 429);
    }
    assert!(
        (5..=15).contains(&shed),
        "{shed} of 20: about half, as without tenants"
    );
}

/// The body `InProc::stream` sends, whose bytes are its prompt estimate × 4.
fn stream_body_bytes() -> u64 {
    let body = serde_json::json!({"model": "m", "stream": true,
        "messages": [{"role": "user", "content": "hi"}]});
    body.to_string().len() as u64
}

#[tokio::test]
async fn tokens_are_held_at_the_estimate_and_settled_to_the_tokens_relayed() {
    let g = InProc::start(&policy("default: {tokensPerMinute: 1200}")).await;
    let prompt = stream_body_bytes().div_ceil(4);
    // No max_tokens: the estimate is the prompt plus 256 output tokens.
    let first = g.stream("m", &[], MS, &[MS, MS]).await;
    assert_eq!(first.status, 200);
    let header = |o: &support::inproc::Outcome, n: &str| o.header(n).unwrap();
    assert_eq!(header(&first, "x-ratelimit-limit-tokens"), "1200");
    let held = 1200 - prompt - 256;
    assert_eq!(
        header(&first, "x-ratelimit-remaining-tokens"),
        held.to_string()
    );
    // It used its prompt and three content events: the rest came back when it ended.
    let second = g.stream("m", &[], MS, &[]).await;
    let settled = 1200 - (prompt + 3);
    assert_eq!(
        header(&second, "x-ratelimit-remaining-tokens"),
        (settled - prompt - 256).to_string()
    );
    let m = g.metrics().await;
    let tokens = metric(&m, "sluice_tenant_tokens_total", &[("tenant", "anonymous")]);
    assert_eq!(tokens, Some((2 * prompt + 4) as f64), "{m}");
    // A max_tokens that could never fit is refused outright and takes nothing.
    let c = client();
    let url = format!("{}/v1/chat/completions", g.url);
    let huge = r#"{"model":"m","stream":true,"max_tokens":1000000000,"messages":[]}"#;
    let r = send(&c, "POST", &url, &[], huge).await;
    assert_eq!(r.status, 429);
    let e = r.json();
    assert_eq!(e["error"]["type"], "tokens");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Request too large")
    );
    assert!(r.header("retry-after").is_none(), "waiting would not help");
    // Four requests held open hold four estimates: what is left is less than a fifth.
    let left = 1200 - (prompt + 3) - (prompt + 1);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(g.hold("m").await);
    }
    assert!(left - 4 * (prompt + 256) < prompt + 256);
    let spent = g.stream("m", &[], MS, &[]).await;
    assert_eq!(spent.status, 429);
    let e = spent.body.as_ref().unwrap();
    assert_eq!(e["error"]["type"], "tokens");
    assert_eq!(e["error"]["code"], "rate_limit_exceeded");
    assert!(spent.retry_after() > Duration::ZERO);
}

#[tokio::test]
async fn a_stream_reporting_its_usage_is_settled_to_it() {
    let g = InProc::start(&policy("default: {tokensPerMinute: 1200}")).await;
    let prompt = stream_body_bytes().div_ceil(4);
    // Three content events relayed, but the usage chunk says 5 prompt and 7 completion
    // tokens: the usage is what the engine spent (counting events would settle prompt + 3).
    let gaps = [MS, MS];
    let first = g
        .stream_reporting("m", &[], (MS, &gaps), Some((5, 7)))
        .await;
    assert_eq!(first.status, 200);
    let second = g.stream("m", &[], MS, &[]).await;
    assert_eq!(
        second.header("x-ratelimit-remaining-tokens").unwrap(),
        (1200 - 12 - prompt - 256).to_string()
    );
    let m = g.metrics().await;
    let tokens = metric(&m, "sluice_tenant_tokens_total", &[("tenant", "anonymous")]);
    assert_eq!(tokens, Some((12 + prompt + 1) as f64), "{m}");
}

#[tokio::test]
async fn the_budget_left_is_read_at_each_scrape() {
    let g = InProc::start(&policy("default: {requestsPerMinute: 10}")).await;
    let left = |m: &str| {
        let labels = [("tenant", "anonymous"), ("unit", "requests")];
        metric(m, "sluice_tenant_budget_remaining", &labels)
    };
    for _ in 0..3 {
        assert_eq!(g.stream("m", &[], MS, &[]).await.status, 200);
    }
    assert_eq!(left(&g.metrics().await), Some(7.0));
    // Idle past the minute: the budget refilled, without another request to say so.
    g.clock.advance(Duration::from_secs(121));
    assert_eq!(left(&g.metrics().await), Some(10.0));
    // The policy drops the budget: nothing left to show.
    g.reload(&policy("clients: {light: {}}"));
    let m = g.metrics().await;
    assert_eq!(left(&m), None, "{m}");
}

/// The concurrency ceiling on, a request over it shed with probability `p`, and, with
/// `queue`, a queue for the other standard requests.
fn ceiling_policy(p: f64, queue: &str) -> String {
    format!(
        "defaults: {{ttft: 1s, itl: 1s, timeConstant: 4s}}\nshedding: {{maxRejectProbability: {p}, ramp: 1}}\ntenants: {{header: x-tenant, trustHeader: true, clients: {{light: {{}}, heavy: {{}}}}}}\n{queue}"
    )
}

async fn gauge(g: &InProc, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&g.metrics().await, name, labels).unwrap_or(0.0)
}

/// Five requests of heavy held at the engine, waiting `wait` for their first token: more than the
/// concurrency ceiling (4 before more is learnt), with the TTFT read from their ages over its
/// threshold of 1 s (read as twice their mean age). At 3 s (more than twice the threshold)
/// the ceiling refuses every `standard` request; below 2 s, it sheds them with the policy's
/// `maxRejectProbability`.
async fn over_the_ceiling(g: &InProc, wait: Duration) -> Vec<support::inproc::Held> {
    let mut load = Vec::new();
    for _ in 0..5 {
        load.push(g.hold_as("m", &[HEAVY]).await);
    }
    g.clock.advance(wait);
    load
}

#[tokio::test]
async fn a_promoted_request_retried_on_another_endpoint_goes_there_as_critical() {
    let g = InProc::start(&ceiling_policy(1.0, "")).await;
    warm(&g).await;
    let load = over_the_ceiling(&g, 3000 * MS).await;
    for _ in 0..20 {
        assert_eq!(g.stream("m", &[HEAVY], MS, &[]).await.status, 429);
    }
    // (The fair share is recomputed at most every 100 ms.)
    g.clock.advance(200 * MS);
    let light = g.send("m", &[LIGHT], "light", 0);
    g.queued(1).await;
    // An endpoint joins that refuses connections: with room, it is where the promoted request
    // goes first; it is then retried on the engine, still over its ceiling, where a standard
    // request would be shed (maxRejectProbability 1).
    let dead = support::refused();
    g.reload_endpoints(&[&dead, &g.upstream], &ceiling_policy(1.0, ""));
    g.clock.advance(1001 * MS);
    let arrived = tokio::time::timeout(Duration::from_secs(10), g.arrival()).await;
    let promoted = arrived.expect("the promoted request reached the engine");
    assert_eq!(promoted.body["user"], "light");
    drop(promoted);
    let o = tokio::time::timeout(Duration::from_secs(10), light).await;
    assert_eq!(o.expect("answered").unwrap().status, 200);
    let m = g.metrics().await;
    let unreachable = [("reason", "unreachable")];
    let refusals = metric(&m, "sluice_upstream_errors_total", &unreachable);
    assert_eq!(
        refusals,
        Some(1.0),
        "tried on the refusing endpoint first: {m}"
    );
    drop(load);
}

/// Heavy's and light's first requests, on an idle engine, all admitted (the tenants' mean
/// outputs are known from then on).
async fn warm(g: &InProc) {
    for _ in 0..10 {
        assert_eq!(g.stream("m", &[HEAVY], MS, &[]).await.status, 200);
    }
    assert_eq!(g.stream("m", &[LIGHT], MS, &[]).await.status, 200);
}

/// A request of `tenant` that waits in the gateway: sent again while the gate admits it by
/// chance (those are let go at once).
async fn waits(g: &InProc, tenant: (&str, &str)) -> support::inproc::Sent {
    for _ in 0..20 {
        let sent = g.send("m", &[tenant], tenant.1, 0);
        for _ in 0..500 {
            if gauge(g, "sluice_queue_requests", &[]).await == 1.0 {
                return sent;
            }
            if sent.is_finished() {
                break;
            }
            tokio::time::sleep(10 * MS).await;
        }
        assert_eq!(sent.await.unwrap().status, 200, "admitted by chance");
        drop(g.arrival().await);
    }
    panic!("{} never waited", tenant.1);
}

#[tokio::test]
async fn under_its_share_a_request_waits_for_the_next_free_slot_ahead_of_the_others_not_past_the_ceiling()
 {
    let g = InProc::start(&ceiling_policy(1.0, "")).await;
    warm(&g).await;
    // Then the engine is over the ceiling, and heavy, going on, is shed whole and over its
    // share.
    let load = over_the_ceiling(&g, 3000 * MS).await;
    for _ in 0..20 {
        assert_eq!(g.stream("m", &[HEAVY], MS, &[]).await.status, 429);
    }
    // With a queue for the others, heavy's next request waits in it; then light's, under its
    // share, waits too (shed by the ceiling, not sent past it as before), ahead of heavy's.
    g.reload(&ceiling_policy(
        1.0,
        "queue: {maxWait: 60s, maxRequests: 8}",
    ));
    let heavy = g.send("m", &[HEAVY], "heavy", 0);
    g.queued(1).await;
    // (The fair share is recomputed at most every 100 ms.)
    g.clock.advance(200 * MS);
    let light = g.send("m", &[LIGHT], "light", 0);
    g.queued(2).await;
    assert_eq!(
        gauge(
            &g,
            "sluice_limiter_in_flight_requests",
            &[("model", "other")]
        )
        .await,
        5.0,
        "nothing past the ceiling"
    );
    // The five end: light takes the first slot, heavy the next.
    drop(load);
    let first = g.arrival().await;
    assert_eq!(first.body["user"], "light");
    drop(first);
    let second = g.arrival().await;
    assert_eq!(second.body["user"], "heavy");
    drop(second);
    for sent in [light, heavy] {
        let o = tokio::time::timeout(Duration::from_secs(10), sent).await;
        assert_eq!(o.expect("answered").unwrap().status, 200);
    }

    // No slot within the TTFT threshold (1 s): light's request goes anyway, not shed.
    let load = over_the_ceiling(&g, 3000 * MS).await;
    let light = g.send("m", &[LIGHT], "light-2", 0);
    g.queued(1).await;
    g.clock.advance(1001 * MS);
    // (Any event tries the queue: here a heavy request arriving, which is shed into it.)
    let heavy = g.send("m", &[HEAVY], "heavy-2", 0);
    let promoted = g.arrival().await;
    assert_eq!(promoted.body["user"], "light-2");
    drop(promoted);
    let o = tokio::time::timeout(Duration::from_secs(10), light).await;
    assert_eq!(o.expect("answered").unwrap().status, 200);
    let m = g.metrics().await;
    let wait = |o: &str| metric(&m, "sluice_queue_wait_seconds_count", &[("outcome", o)]);
    assert_eq!(wait("promoted"), Some(1.0), "{m}");
    let rejected = [("tenant", "light"), ("outcome", "rejected")];
    assert_eq!(metric(&m, "sluice_tenant_requests_total", &rejected), None);
    drop(load);
    heavy.abort();
}

#[tokio::test]
async fn while_a_tenant_under_its_share_waits_no_one_else_takes_a_slot_by_chance() {
    let g = InProc::start(&ceiling_policy(0.5, "")).await;
    warm(&g).await;
    // Over the ceiling, with the TTFT read at 1.4 s (1.8 s below): a standard request is
    // shed with probability 0.5, so some of heavy's get in by chance.
    let load = over_the_ceiling(&g, 700 * MS).await;
    let mut in_by_chance = Vec::new();
    for _ in 0..12 {
        if g.send("m", &[HEAVY], "heavy", 0).await.unwrap().status == 200 {
            in_by_chance.push(g.arrival().await);
        }
    }
    assert!(
        (2..=10).contains(&in_by_chance.len()),
        "{} of 12",
        in_by_chance.len()
    );
    // Light's request, under its share, waits for a slot; meanwhile none of heavy's gets one
    // by chance.
    g.clock.advance(200 * MS);
    let light = waits(&g, LIGHT).await;
    // (Nor of another model under the same limiter key, `other`: they share its slots.)
    for i in 0..20 {
        let model = ["m", "m2"][i % 2];
        let o = g.send(model, &[HEAVY], "heavy", 0).await.unwrap();
        assert_eq!(o.status, 429, "{model} {i}");
    }
    // The load ends: the slot goes to light.
    drop((load, in_by_chance));
    let first = g.arrival().await;
    assert_eq!(first.body["user"], "light");
    drop(first);
    let o = tokio::time::timeout(Duration::from_secs(10), light).await;
    assert_eq!(o.expect("answered").unwrap().status, 200);
    // With no one waiting, heavy is admitted again.
    assert_eq!(g.stream("m", &[HEAVY], MS, &[]).await.status, 200);
}
