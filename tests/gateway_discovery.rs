//! A discovered Service through the real router and relay in this process: what the
//! EndpointSlice watch decides (`sluice::discovery::Served`, fed to the store as the watch
//! task does) becomes the fleet requests are routed over, with stub upstreams on 127.0.0.1
//! standing in for the pods (a real kube-apiserver refuses loopback addresses in
//! EndpointSlices; the watch itself is tested against one in `k8s_discovery`).

mod support;

use std::time::Duration;

use sluice::discovery::{Endpoint, Served, ServiceRef};
use sluice::gateway::GatewayOptions;
use sluice::policy::PolicyConfig;
use support::http::{get, metric, policy_yaml};
use support::inproc::InProc;

const SPEC: &str =
    "defaults: {ttft: 1s, itl: 1s, timeConstant: 4s}\nshedding: {adaptiveConcurrency: false}";

/// The gateway with a policy naming the Service `engine.inference.svc:8000`, and the Service.
async fn discovering() -> (InProc, ServiceRef) {
    let g = InProc::start_fleet(2, SPEC, GatewayOptions::default()).await;
    let doc = policy_yaml("http://engine.inference.svc:8000", SPEC);
    let (_, config) = PolicyConfig::from_yaml(&doc).unwrap();
    g.store.apply(7, "test".into(), config);
    let service = g.store.discovery_target().borrow().clone().unwrap();
    (g, service)
}

/// The stubs `which` as pods `engine-<i>`.
fn pods(g: &InProc, which: &[usize]) -> Served {
    Served::Endpoints(
        which
            .iter()
            .map(|&i| Endpoint {
                url: g.upstreams[i].parse().unwrap(),
                label: format!("engine-{i}"),
            })
            .collect(),
    )
}

#[tokio::test]
async fn requests_go_to_the_discovered_pods_and_a_pod_that_leaves_drains() {
    let (g, service) = discovering().await;
    g.store.discovered(&service, pods(&g, &[0, 1]), true);
    // Nothing measured yet: the second request goes to the pod with fewer in flight.
    let a = g.hold("m").await;
    let b = g.hold("m").await;
    assert_ne!(a.upstream(), b.upstream(), "one on each pod");
    let (on0, mut on1) = if a.upstream() == 0 { (a, b) } else { (b, a) };
    let m = g.metrics().await;
    assert_eq!(
        metric(&m, "sluice_upstream_discovered_endpoints", &[]),
        Some(2.0)
    );
    assert_eq!(metric(&m, "sluice_upstream_discovery_up", &[]), Some(1.0));
    for pod in ["engine-0", "engine-1"] {
        let routed = metric(&m, "sluice_upstream_requests_total", &[("upstream", pod)]);
        assert_eq!(routed, Some(1.0), "{m}");
    }

    // engine-1 goes (scale-down): its stream goes on to the end, every new request goes to
    // engine-0.
    g.store.discovered(&service, pods(&g, &[0]), true);
    for _ in 0..4 {
        let o = g.stream("m", &[], Duration::from_millis(10), &[]).await;
        assert_eq!((o.status, o.upstream), (200, Some(0)));
    }
    on1.send(r#"{"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}"#);
    on1.read(1).await;
    on1.finish().await;
    on0.finish().await;
    let m = g.metrics().await;
    let gone = metric(&m, "sluice_upstream_up", &[("upstream", "engine-1")]);
    assert_eq!(gone, None, "a pod that left leaves the scrape:\n{m}");
    let routed = metric(
        &m,
        "sluice_upstream_requests_total",
        &[("upstream", "engine-0")],
    );
    assert_eq!(routed, Some(5.0), "{m}");
}

#[tokio::test]
async fn no_ready_pod_is_a_503_no_endpoints_with_retry_after_and_readyz_stays_ok() {
    let (g, service) = discovering().await;
    g.store
        .discovered(&service, Served::Endpoints(vec![]), true);
    let o = g.stream("m", &[], Duration::from_millis(10), &[]).await;
    assert_eq!(o.status, 503);
    assert_eq!(o.header("retry-after").as_deref(), Some("5"));
    assert_eq!(o.header("retry-after-ms").as_deref(), Some("5000"));
    let body = o.body.unwrap();
    assert_eq!(body["error"]["code"], "no_endpoints", "{body}");
    assert!(o.upstream.is_none(), "nothing reached a stub");
    let models = get(&support::http::client(), &format!("{}/v1/models", g.url)).await;
    assert_eq!(models.status, 503, "passed-through paths too");
    let ready = get(&support::http::client(), &format!("{}/readyz", g.url)).await;
    assert_eq!(
        ready.status, 200,
        "the engine's absence must not restart the gateway"
    );
    let m = g.metrics().await;
    let errors = metric(
        &m,
        "sluice_upstream_errors_total",
        &[("reason", "no_endpoints")],
    );
    assert_eq!(errors, Some(2.0), "{m}");
    assert_eq!(
        metric(&m, "sluice_upstream_discovered_endpoints", &[]),
        Some(0.0)
    );

    // A pod becomes ready: served at once.
    g.store.discovered(&service, pods(&g, &[1]), true);
    let o = g.stream("m", &[], Duration::from_millis(10), &[]).await;
    assert_eq!((o.status, o.upstream), (200, Some(1)));
}
