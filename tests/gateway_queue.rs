//! The admission queue (`spec.queue`) through the real router and relay, in this process,
//! with an injected clock and a seeded random source (see `support::inproc`): order, dispatch
//! when a request ends, expiry with a Retry-After that counts the queue ahead, eviction from
//! a full queue, a client going away, and queued bodies held against the memory budget.
//!
//! Expiry is on the gateway's clock: the tests advance it and then try the queue (as a
//! request's end, an engine reading or the waiter's own timer would); the `maxWait` timers
//! themselves never fire within a test.

mod support;

use std::time::Duration;

use sluice::gateway::GatewayOptions;
use support::http::metric;
use support::inproc::{InProc, Outcome, Sent};

const MS: Duration = Duration::from_millis(1);
const SHEDDABLE: (&str, &str) = ("x-sluice-priority", "sheddable");

/// The labels of `sluice_requests_total` for streamed chat requests of `m` ending `outcome`.
fn requests(outcome: &str) -> [(&str, &str); 4] {
    [
        ("model", "other"),
        ("endpoint", "chat_completions"),
        ("stream", "true"),
        ("outcome", outcome),
    ]
}

/// The hard cliff on the latency signals alone (as in tests/gateway_admission.rs), with the
/// priority header trusted and a queue.
fn policy(max_wait: &str, max_requests: usize) -> String {
    format!(
        "defaults: {{ttft: 1s, itl: 1s, timeConstant: 4s}}\nshedding: {{maxRejectProbability: 1, ramp: 1, adaptiveConcurrency: false}}\npriority: {{trustHeader: true}}\nqueue: {{maxWait: {max_wait}, maxRequests: {max_requests}}}"
    )
}

/// A gateway whose TTFT average for `m` reads 3 s against 1 s, with five requests in flight
/// (held until the returned load is dropped): every new standard request is shed.
async fn overloaded(spec: &str, options: GatewayOptions) -> (InProc, support::inproc::Busy) {
    let g = InProc::start_with(spec, options).await;
    let load = g.busy("m", 5).await;
    assert_eq!(g.stream("m", &[], 3000 * MS, &[]).await.status, 200);
    (g, load)
}

async fn gauge(g: &InProc, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&g.metrics().await, name, labels).unwrap_or(0.0)
}

async fn answer(sent: Sent) -> Outcome {
    tokio::time::timeout(Duration::from_secs(10), sent)
        .await
        .expect("answered")
        .unwrap()
}

#[tokio::test]
async fn waiting_requests_go_in_priority_then_arrival_order_as_requests_end() {
    let (g, load) = overloaded(&policy("60s", 8), GatewayOptions::default()).await;
    let s = g.send("m", &[SHEDDABLE], "s", 0);
    g.queued(1).await;
    let a = g.send("m", &[], "a", 0);
    g.queued(2).await;
    let b = g.send("m", &[], "b", 0);
    g.queued(3).await;
    // Without the queue each of them would have been 429 already.
    assert_eq!(
        gauge(&g, "sluice_requests_total", &requests("rejected")).await,
        0.0
    );
    // The five in flight end: the last end leaves nothing in flight, room for one.
    drop(load);
    let first = g.arrival().await;
    assert_eq!(first.body["user"], "a", "standard before sheddable");
    g.queued(2).await;
    // One in flight with the TTFT average over its threshold: no room for another until it
    // ends; then the next in order.
    drop(first);
    let second = g.arrival().await;
    assert_eq!(second.body["user"], "b", "then arrival order");
    drop(second);
    let third = g.arrival().await;
    assert_eq!(third.body["user"], "s");
    drop(third);
    for sent in [a, b, s] {
        assert_eq!(answer(sent).await.status, 200);
    }
    g.queued(0).await;
    let m = g.metrics().await;
    let admitted = [("outcome", "admitted")];
    assert_eq!(
        metric(&m, "sluice_queue_wait_seconds_count", &admitted),
        Some(3.0)
    );
}

#[tokio::test]
async fn a_request_still_waiting_at_max_wait_gets_429_with_the_queue_ahead_in_its_retry_after() {
    let (g, _load) = overloaded(&policy("2s", 8), GatewayOptions::default()).await;
    // Sheddable at t0; a standard one a second later, ahead of it in order.
    let s = g.send("m", &[SHEDDABLE], "s", 0);
    g.queued(1).await;
    g.clock.advance(1000 * MS);
    let t = g.send("m", &[], "t", 0);
    g.queued(2).await;
    // At t0 + 2 s the sheddable one has waited maxWait, with one request still ahead of it
    // and none served meanwhile: 2 s per request ahead is added to its own Retry-After.
    g.clock.advance(1000 * MS);
    g.gw.queue.dispatch();
    let s = answer(s).await;
    assert_eq!(s.status, 429);
    let error = s.body.as_ref().unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("within 2000 ms in the queue"), "{message}");
    // Its own, when shed at t0: sheddable pressure 1.25 × 3 e^(−Δ/4s) back at 1 after
    // 4 ln 3.75 = 5.287 s, stretched by a jitter in [1, 1.2); plus 2 s.
    let retry = s.retry_after();
    assert!(
        (7287 * MS..=8345 * MS).contains(&retry),
        "retry-after-ms {retry:?}"
    );
    g.queued(1).await;
    // The standard one at t0 + 3 s, nothing ahead: its own, 4 ln 3 − 1 = 3.394 s at t0 + 1 s.
    g.clock.advance(1000 * MS);
    g.gw.queue.dispatch();
    let t = answer(t).await;
    assert_eq!(t.status, 429);
    let retry = t.retry_after();
    assert!(
        (3394 * MS..=4074 * MS).contains(&retry),
        "retry-after-ms {retry:?}"
    );
    let secs: u64 = t.header("retry-after").unwrap().parse().unwrap();
    assert_eq!(secs, retry.as_millis().div_ceil(1000) as u64);
    let m = g.metrics().await;
    let expired = [("outcome", "expired")];
    assert_eq!(
        metric(&m, "sluice_requests_total", &requests("expired")),
        Some(2.0)
    );
    assert_eq!(
        metric(&m, "sluice_queue_wait_seconds_count", &expired),
        Some(2.0)
    );
    assert_eq!(
        metric(&m, "sluice_queue_wait_seconds_sum", &expired),
        Some(4.0)
    );
    assert_eq!(metric(&m, "sluice_queue_requests", &[]), Some(0.0));
}

#[tokio::test]
async fn a_full_queue_sheds_newcomers_unless_they_outrank_the_last_one_waiting() {
    let (g, _load) = overloaded(&policy("60s", 1), GatewayOptions::default()).await;
    let s = g.send("m", &[SHEDDABLE], "s", 0);
    g.queued(1).await;
    // A standard request takes the sheddable one's place, which is shed at once.
    let t = g.send("m", &[], "t", 0);
    let s = answer(s).await;
    assert_eq!(s.status, 429);
    assert!(s.retry_after() > Duration::ZERO);
    g.queued(1).await;
    // Another standard one finds the queue full of its own rank: shed at once.
    let u = answer(g.send("m", &[], "u", 0)).await;
    assert_eq!(u.status, 429);
    assert_eq!(u.body.unwrap()["error"]["code"], "rate_limit_exceeded");
    let m = g.metrics().await;
    assert_eq!(
        metric(
            &m,
            "sluice_queue_wait_seconds_count",
            &[("outcome", "evicted")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "sluice_requests_total", &requests("rejected")),
        Some(2.0)
    );
    assert_eq!(metric(&m, "sluice_queue_requests", &[]), Some(1.0));
    t.abort();
}

#[tokio::test]
async fn a_client_that_goes_away_leaves_the_queue_at_once() {
    let (g, load) = overloaded(&policy("60s", 8), GatewayOptions::default()).await;
    let gone = g.send("m", &[], "gone", 0);
    g.queued(1).await;
    gone.abort();
    g.queued(0).await;
    let m = g.metrics().await;
    let cancelled = [("outcome", "cancelled")];
    assert_eq!(
        metric(&m, "sluice_queue_wait_seconds_count", &cancelled),
        Some(1.0)
    );
    // Its place is free: room goes to the next request, not to the one that left.
    let next = g.send("m", &[], "next", 0);
    g.queued(1).await;
    drop(load);
    let arrival = g.arrival().await;
    assert_eq!(arrival.body["user"], "next");
    drop(arrival);
    assert_eq!(answer(next).await.status, 200);
}

#[tokio::test]
async fn queued_bodies_are_held_against_the_body_memory_budget() {
    let options = GatewayOptions {
        max_body_memory: 100 << 10,
        ..GatewayOptions::default()
    };
    let (g, _load) = overloaded(&policy("60s", 8), options).await;
    let big = g.send("m", &[], "big", 60_000);
    g.queued(1).await;
    // A second body of the same size does not fit next to the waiting one.
    let refused = answer(g.send("m", &[], "second", 60_000)).await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.body.unwrap()["error"]["code"], "overloaded");
    let held = gauge(&g, "sluice_body_memory_bytes", &[]).await;
    assert!(held >= 60_000.0, "{held}");
    // The waiting one leaves: its body's share is given back, and the next one waits.
    big.abort();
    g.queued(0).await;
    let again = g.send("m", &[], "again", 60_000);
    g.queued(1).await;
    again.abort();
}
