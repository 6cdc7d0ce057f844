//! A fleet of endpoints behind one gateway (`spec.upstream.endpoints`), through the real
//! router and relay in this process, with stub upstreams driven chunk by chunk and a manual
//! clock (see `support::inproc`): each endpoint's samples are exactly the clock steps the test
//! makes, so which endpoint has room, and when the fleet is full, are pinned, not timed.

mod support;

use std::time::Duration;

use sluice::gateway::GatewayOptions;
use support::http::metric;
use support::inproc::{Held, InProc};

const MS: Duration = Duration::from_millis(1);

/// The hard cliff on the latency signals alone: an endpoint with a request in flight has no
/// room once its pressure is over 1 (with nothing in flight it always has).
const CLIFF: &str = "defaults: {ttft: 1s, itl: 1s, timeConstant: 4s}\nshedding: {maxRejectProbability: 1, ramp: 1, adaptiveConcurrency: false}";

/// The latency ramp: an endpoint has room while its pressure is at most 1.
const RAMP: &str =
    "defaults: {ttft: 1s, itl: 1s, timeConstant: 4s}\nshedding: {adaptiveConcurrency: false}";

const TOKEN: &str = r#"{"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}"#;

/// Two held requests, on endpoints 0 and 1 (in that order): with nothing measured yet, the
/// second goes to the endpoint with fewer in flight.
async fn one_on_each(g: &InProc) -> [Held; 2] {
    let a = g.hold("m").await;
    let b = g.hold("m").await;
    assert_ne!(a.upstream(), b.upstream(), "ties go to fewer in flight");
    if a.upstream() == 0 { [a, b] } else { [b, a] }
}

/// The first token of `held` now, read through the gateway (which has measured it then).
async fn first_token(held: &mut Held) {
    held.send(TOKEN);
    held.read(1).await;
}

fn label(url: &str) -> &str {
    url.trim_start_matches("http://")
}

#[tokio::test]
async fn requests_go_to_the_endpoint_with_room_and_less_pressure() {
    let g = InProc::start_fleet(2, RAMP, GatewayOptions::default()).await;
    let [mut slow, mut fast] = one_on_each(&g).await;
    // Endpoint 1 answers in 100 ms, endpoint 0 in 800 ms: both under the threshold, both with
    // room, one request in flight on each.
    g.clock.advance(100 * MS);
    first_token(&mut fast).await;
    g.clock.advance(700 * MS);
    first_token(&mut slow).await;
    for i in 0..6 {
        let o = g.stream("m", &[], 10 * MS, &[]).await;
        assert_eq!((o.status, o.upstream), (200, Some(1)), "request {i}");
    }
    let m = g.metrics().await;
    let routed = |u: &str| {
        metric(
            &m,
            "sluice_upstream_requests_total",
            &[("upstream", label(u))],
        )
    };
    assert_eq!(routed(&g.upstreams[0]), Some(1.0), "{m}");
    assert_eq!(routed(&g.upstreams[1]), Some(7.0), "{m}");
    let pressure = |u: &str| {
        let labels = [("upstream", label(u)), ("model", "other")];
        metric(&m, "sluice_upstream_pressure_ratio", &labels).unwrap()
    };
    assert!(pressure(&g.upstreams[0]) > 0.7, "{m}");
    assert!(pressure(&g.upstreams[1]) < 0.2, "{m}");
    // The model's own gauges describe the fleet: in flight summed over the endpoints.
    let in_flight = metric(
        &m,
        "sluice_limiter_in_flight_requests",
        &[("model", "other")],
    );
    assert_eq!(in_flight, Some(2.0), "{m}");
    slow.finish().await;
    fast.finish().await;
}

#[tokio::test]
async fn only_a_full_fleet_sheds_with_the_soonest_retry_after_and_a_freed_endpoint_admits() {
    let g = InProc::start_fleet(2, CLIFF, GatewayOptions::default()).await;
    let [mut e0, mut e1] = one_on_each(&g).await;
    // Endpoint 1's first token after 2 s, endpoint 0's after 3 s; both still streaming.
    g.clock.advance(2000 * MS);
    first_token(&mut e1).await;
    g.clock.advance(1000 * MS);
    first_token(&mut e0).await;
    let shed = g.stream("m", &[], MS, &[]).await;
    assert_eq!(shed.status, 429, "neither endpoint has room");
    // Endpoint 1's average (2 s, one second old) is back at 1 s after 4·ln 2 − 1 = 1.773 s,
    // endpoint 0's (3 s, new) after 4·ln 3 = 4.394 s: the soonest, stretched by a jitter
    // factor in [1, 1.2).
    let retry = shed.retry_after();
    assert!(
        (1772 * MS..=2128 * MS).contains(&retry),
        "retry-after-ms {retry:?}"
    );
    // Endpoint 1's stream ends: with nothing in flight it has room again, endpoint 0 none.
    e1.finish().await;
    let o = g.stream("m", &[], 10 * MS, &[]).await;
    assert_eq!((o.status, o.upstream), (200, Some(1)));
    e0.finish().await;
}

#[tokio::test]
async fn a_reload_keeps_each_endpoints_state_and_a_removed_endpoint_drains() {
    let g = InProc::start_fleet(3, CLIFF, GatewayOptions::default()).await;
    let mut full = g.hold("m").await;
    let a = full.upstream();
    g.clock.advance(3000 * MS);
    first_token(&mut full).await; // endpoint a: over its threshold, one in flight: no room
    let (b, c) = match a {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    // Endpoint b leaves the policy; a and c stay, a still without room: everything goes to c.
    let kept = [g.upstreams[a].as_str(), g.upstreams[c].as_str()];
    g.reload_endpoints(&kept, CLIFF);
    for i in 0..4 {
        let o = g.stream("m", &[], 10 * MS, &[]).await;
        assert_eq!((o.status, o.upstream), (200, Some(c)), "request {i}");
    }
    let m = g.metrics().await;
    let routed = |u: &str| {
        metric(
            &m,
            "sluice_upstream_requests_total",
            &[("upstream", label(u))],
        )
    };
    assert_eq!(
        routed(&g.upstreams[b]),
        None,
        "a removed endpoint leaves the scrape"
    );
    assert_eq!(routed(&g.upstreams[a]), Some(1.0), "{m}");
    assert_eq!(routed(&g.upstreams[c]), Some(4.0), "{m}");
    // Endpoint a leaves too: its stream goes on to the end; nothing new reaches it.
    g.reload_endpoints(&[g.upstreams[c].as_str()], CLIFF);
    g.clock.advance(20 * MS);
    full.send(TOKEN);
    full.read(1).await;
    for _ in 0..3 {
        let o = g.stream("m", &[], 10 * MS, &[]).await;
        assert_eq!((o.status, o.upstream), (200, Some(c)));
    }
    full.finish().await;
}

/// An endpoint that reads each request and closes the connection without answering: the
/// request was written, so it must not be sent anywhere else.
async fn cut_after_reading() -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncReadExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
        }
    });
    (url, task)
}

fn up(m: &str, url: &str) -> Option<f64> {
    metric(m, "sluice_upstream_up", &[("upstream", label(url))])
}

#[tokio::test]
async fn a_refused_connection_is_retried_on_another_endpoint_and_the_endpoint_is_ejected() {
    let g = InProc::start(CLIFF).await;
    let dead = support::refused();
    g.reload_endpoints(&[&dead, &g.upstream], CLIFF);
    // Every request is served, whichever endpoint it was routed to first.
    for i in 0..20 {
        let o = g.stream("m", &[], 10 * MS, &[]).await;
        assert_eq!((o.status, o.upstream), (200, Some(0)), "request {i}");
    }
    let m = g.metrics().await;
    let unreachable = metric(
        &m,
        "sluice_upstream_errors_total",
        &[("reason", "unreachable")],
    );
    assert_eq!(unreachable, Some(5.0), "five refusals eject it: {m}");
    assert_eq!(up(&m, &dead), Some(0.0), "{m}");
    assert_eq!(up(&m, &g.upstream), Some(1.0), "{m}");
    // After the ejection (10 s) it is tried again; refused once more, it is ejected at once
    // (for 20 s), and that request is still served.
    g.clock.advance(Duration::from_secs(10));
    let mut seen = 0.0;
    for _ in 0..20 {
        assert_eq!(g.stream("m", &[], 10 * MS, &[]).await.status, 200);
        let m = g.metrics().await;
        seen = metric(
            &m,
            "sluice_upstream_errors_total",
            &[("reason", "unreachable")],
        )
        .unwrap();
        if seen > 5.0 {
            assert_eq!(up(&m, &dead), Some(0.0), "{m}");
            break;
        }
    }
    assert_eq!(seen, 6.0, "tried again once after its ejection");
}

#[tokio::test]
async fn a_request_that_reached_an_endpoint_is_never_sent_to_another() {
    let g = InProc::start(CLIFF).await;
    let (cut, _task) = cut_after_reading().await;
    g.reload_endpoints(&[&cut, &g.upstream], CLIFF);
    let (mut cut_short, mut served) = (0, 0);
    for _ in 0..30 {
        // A request the stub receives must come back 200 (Outcome asserts it); one cut short
        // is a 502 that reached no other endpoint.
        let o = g.stream("m", &[], 10 * MS, &[]).await;
        match o.status {
            502 => {
                assert_eq!(o.upstream, None);
                cut_short += 1;
            }
            200 => served += 1,
            s => panic!("status {s}"),
        }
    }
    assert_eq!(cut_short, 5, "five failures in a row eject the endpoint");
    assert_eq!(served, 25);
    assert_eq!(up(&g.metrics().await, &cut), Some(0.0));
}
