use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

use super::*;

fn uri(s: &str) -> http::Uri {
    s.parse().unwrap()
}

fn service() -> ServiceRef {
    ServiceRef::of(&uri("http://engine.inference.svc:8000/v1"), None, None).unwrap()
}

/// An endpoint: address, pod, ready, terminating (None: not said).
type Ep<'a> = (&'a str, Option<&'a str>, Option<bool>, Option<bool>);

/// A slice of `ports` (name, number) with `endpoints`.
fn slice(name: &str, ports: serde_json::Value, endpoints: &[Ep<'_>]) -> EndpointSlice {
    let eps: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|(addr, pod, ready, terminating)| {
            let mut e = json!({"addresses": [addr], "conditions": {}});
            if let Some(r) = ready {
                e["conditions"]["ready"] = json!(r);
            }
            if let Some(t) = terminating {
                e["conditions"]["terminating"] = json!(t);
            }
            if let Some(p) = pod {
                e["targetRef"] = json!({"kind": "Pod", "name": p, "namespace": "inference"});
            }
            e
        })
        .collect();
    let family = if endpoints.iter().any(|e| e.0.contains(':')) {
        "IPv6"
    } else {
        "IPv4"
    };
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {SERVICE_NAME_LABEL: "engine"}},
        "addressType": family,
        "ports": ports,
        "endpoints": eps,
    }))
    .unwrap()
}

fn http_port(n: u16) -> serde_json::Value {
    json!([{"name": "http", "port": n, "protocol": "TCP"}])
}

fn labels(d: &Discovered) -> Vec<&str> {
    d.endpoints.iter().map(|e| e.label.as_str()).collect()
}

#[test]
fn only_http_urls_naming_a_cluster_service_are_discovered() {
    let s = service();
    assert_eq!(
        (s.name.as_str(), s.namespace.as_str(), s.port),
        ("engine", "inference", 8000)
    );
    for (url, found) in [
        ("http://engine.inference.svc.cluster.local:8000", true),
        ("http://engine.inference.svc.:8000", true),
        ("http://engine.inference.svc", true),
        ("https://engine.inference.svc:8443", false),
        ("http://engine:8000", false),
        ("http://engine.inference:8000", false),
        ("http://a.b.engine.inference.svc:8000", false),
        ("http://engine.inference.svc.example.com:8000", false),
        ("http://Engine.inference.svc:8000", false),
        ("http://10.0.0.5:8000", false),
        ("http://.inference.svc:8000", false),
    ] {
        assert_eq!(
            ServiceRef::of(&uri(url), None, None).is_some(),
            found,
            "{url}"
        );
    }
    assert_eq!(
        ServiceRef::of(&uri("http://e.ns.svc"), None, None)
            .unwrap()
            .port,
        80
    );
}

#[test]
fn a_bare_service_name_is_the_service_of_the_policys_namespace() {
    let of = |url: &str, ns| ServiceRef::of(&uri(url), None, ns);
    let s = of("http://engine:8000/v1", Some("inference")).unwrap();
    assert_eq!(
        (s.name.as_str(), s.namespace.as_str(), s.port),
        ("engine", "inference", 8000)
    );
    assert_eq!(s.url, uri("http://engine:8000/v1"), "served as written");
    // A name qualified elsewhere keeps its own namespace.
    let other = of("http://engine.other.svc:8000", Some("inference")).unwrap();
    assert_eq!(other.namespace, "other");
    for (url, ns) in [
        ("http://engine:8000", None), // no namespace known (a policy file)
        ("http://localhost:8000", Some("inference")),
        ("http://engine.inference:8000", Some("inference")), // may be a domain
        ("http://Engine:8000", Some("inference")),
        ("https://engine:8443", Some("inference")),
        ("http://127.0.0.1:8000", Some("inference")),
        ("http://[::1]:8000", Some("inference")),
    ] {
        assert_eq!(of(url, ns), None, "{url} in {ns:?}");
    }
}

#[test]
fn ready_and_not_terminating_endpoints_are_served_by_pod_name_on_the_urls_path() {
    let slices = [
        slice(
            "engine-a",
            http_port(8000),
            &[
                ("10.1.0.7", Some("engine-2"), Some(true), None),
                ("10.1.0.5", Some("engine-0"), None, None), // nil ready = ready
                ("10.1.0.6", Some("engine-1"), Some(false), None),
                ("10.1.0.8", Some("engine-3"), Some(true), Some(true)),
            ],
        ),
        slice(
            "engine-b",
            http_port(8000),
            &[("fd00::9", None, Some(true), None)],
        ),
    ];
    let d = endpoints_of(&slices, &service());
    assert_eq!(labels(&d), ["[fd00::9]:8000", "engine-0", "engine-2"]);
    assert_eq!(d.endpoints[1].url, uri("http://10.1.0.5:8000/v1"));
    assert_eq!(d.endpoints[0].url, uri("http://[fd00::9]:8000/v1"));
    assert_eq!((d.unmatched_slices, d.left_out), (0, 0));
}

#[test]
fn the_port_is_the_named_one_else_the_urls_else_the_only_one() {
    let two = json!([{"name": "metrics", "port": 9090}, {"name": "http", "port": 8080}]);
    let pods = [("10.1.0.5", Some("engine-0"), Some(true), None)];
    let port = |s: &ServiceRef, ports: &serde_json::Value| {
        let d = endpoints_of(&[slice("s", ports.clone(), &pods)], s);
        (
            d.endpoints.first().map(|e| e.url.port_u16().unwrap()),
            d.unmatched_slices,
        )
    };
    // Two ports, none the URL's, no name: nothing to use, and it is counted.
    assert_eq!(port(&service(), &two), (None, 1));
    let named =
        ServiceRef::of(&uri("http://engine.inference.svc:8000"), Some("http"), None).unwrap();
    assert_eq!(port(&named, &two), (Some(8080), 0));
    let by_number = ServiceRef::of(&uri("http://engine.inference.svc:9090"), None, None).unwrap();
    assert_eq!(port(&by_number, &two), (Some(9090), 0));
    // One port (target port 8080 behind Service port 8000): that one.
    assert_eq!(port(&service(), &http_port(8080)), (Some(8080), 0));
    // No ports listed: all ports, the URL's.
    assert_eq!(port(&service(), &serde_json::Value::Null), (Some(8000), 0));
    // A UDP port is never an HTTP endpoint.
    let udp = json!([{"name": "http", "port": 8080, "protocol": "UDP"}]);
    assert_eq!(port(&service(), &udp), (None, 1));
}

#[test]
fn fqdn_slices_duplicates_and_garbage_addresses_are_left_out() {
    let mut fqdn = slice("f", http_port(8000), &[("10.1.0.9", None, None, None)]);
    fqdn.address_type = "FQDN".into();
    let slices = [
        fqdn,
        slice(
            "a",
            http_port(8000),
            &[("10.1.0.5", Some("engine-0"), None, None)],
        ),
        // The same pod in a second slice (slices overlap while the controller moves it).
        slice(
            "b",
            http_port(8000),
            &[("10.1.0.5", Some("engine-0"), None, None)],
        ),
        slice(
            "c",
            http_port(8000),
            &[("not-an-ip", Some("engine-9"), None, None)],
        ),
    ];
    assert_eq!(labels(&endpoints_of(&slices, &service())), ["engine-0"]);
}

#[test]
fn a_huge_service_is_capped_and_the_rest_counted() {
    let addrs: Vec<String> = (0..300)
        .map(|i| format!("10.2.{}.{}", i / 200, i % 200))
        .collect();
    let eps: Vec<_> = addrs
        .iter()
        .map(|a| (a.as_str(), None, None, None))
        .collect();
    let d = endpoints_of(&[slice("big", http_port(8000), &eps)], &service());
    assert_eq!(
        (d.endpoints.len(), d.left_out),
        (MAX_DISCOVERED, 300 - MAX_DISCOVERED)
    );
}

#[test]
fn the_follower_serves_each_new_set_once_and_keeps_it_through_a_short_outage() {
    let s = service();
    let one = [slice(
        "a",
        http_port(8000),
        &[("10.1.0.5", Some("engine-0"), None, None)],
    )];
    let mut f = Follower::new();
    assert_eq!(
        f.served(),
        &Served::ServiceUrl,
        "nothing known: the Service URL"
    );
    assert!(
        matches!(f.on_slices(&one, &s), Some(Change::Endpoints(d)) if labels(&d) == ["engine-0"])
    );
    assert!(f.up());
    assert_eq!(f.on_slices(&one, &s), None, "the same set: nothing to do");

    let t = Duration::from_secs(100);
    assert_eq!(f.on_error("down", t), Some(Change::Failing("down".into())));
    assert!(!f.up());
    assert_eq!(
        f.on_error("down", t + Duration::from_secs(30)),
        None,
        "one line per incident"
    );
    assert!(
        matches!(f.served(), Served::Endpoints(l) if l.len() == 1),
        "kept"
    );
    assert_eq!(f.on_slices(&one, &s), Some(Change::Recovered));
    assert!(f.up());

    // Failing for STALE_AFTER: the endpoints may be gone, serve the Service URL.
    assert!(f.on_error("down", t).is_some());
    let stale = f.on_error("down", t + STALE_AFTER);
    assert!(
        matches!(stale, Some(Change::FallBack(ref why)) if why.contains("60 s")),
        "{stale:?}"
    );
    assert_eq!(f.served(), &Served::ServiceUrl);
    assert!(
        matches!(f.on_slices(&one, &s), Some(Change::Endpoints(_))),
        "back on recovery"
    );
}

#[test]
fn no_ready_endpoint_is_an_empty_fleet_but_no_slice_at_all_is_the_service_url() {
    let s = service();
    let mut f = Follower::new();
    let none_ready = [slice(
        "a",
        http_port(8000),
        &[("10.1.0.5", Some("e-0"), Some(false), None)],
    )];
    assert!(
        matches!(f.on_slices(&none_ready, &s), Some(Change::Endpoints(d)) if d.endpoints.is_empty())
    );
    assert_eq!(f.served(), &Served::Endpoints(vec![]));
    // A failing watch with nothing to serve falls back at once: the pods may be back.
    assert_eq!(
        f.on_error("down", Duration::ZERO),
        Some(Change::FallBack("down".into()))
    );
    assert_eq!(f.served(), &Served::ServiceUrl);
    let mut f = Follower::new();
    assert_eq!(
        f.on_slices(&[], &s),
        None,
        "nothing listed, already the Service URL"
    );
    assert!(f.on_slices(&none_ready, &s).is_some());
    assert_eq!(f.on_slices(&[], &s), Some(Change::NoSlices));
    assert_eq!(f.served(), &Served::ServiceUrl);
}

#[test]
fn a_failure_before_the_first_list_keeps_the_service_url_and_says_so_once() {
    let mut f = Follower::new();
    let forbidden = "endpointslices is forbidden";
    assert_eq!(
        f.on_error(forbidden, Duration::ZERO),
        Some(Change::Failing(forbidden.into()))
    );
    assert_eq!(f.on_error(forbidden, Duration::from_secs(600)), None);
    assert_eq!(f.served(), &Served::ServiceUrl);
}

#[test]
fn the_status_says_whether_the_gateways_discover_and_why_not() {
    let plan_of = |upstream: &str| {
        let yaml = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: p}}\nspec:\n  upstream: {upstream}\n"
        );
        let (_, config) = crate::policy::PolicyConfig::from_yaml(&yaml).unwrap();
        plan(&config.upstream, "inference")
    };
    for (upstream, discovers, reason, says) in [
        (
            "{url: http://engine:8000}",
            true,
            "EndpointSlices",
            "Service inference/engine:8000",
        ),
        (
            "{url: http://engine.inference.svc.cluster.local:8000}",
            true,
            "EndpointSlices",
            "Service inference/engine:8000",
        ),
        (
            "{url: http://engine.other.svc:8000}",
            false,
            "OtherNamespace",
            "not in the policy's namespace inference",
        ),
        (
            "{url: http://engine:8000, discovery: None}",
            false,
            "Disabled",
            "discovery is None",
        ),
        (
            "{url: https://engine.inference.svc:8443}",
            false,
            "Https",
            "certificate",
        ),
        (
            "{url: http://vllm.example.com:8000}",
            false,
            "NotAService",
            "http://vllm.example.com:8000/ does not name a Service",
        ),
        (
            "{url: http://a:8000, endpoints: [http://a:8000, http://b:8000]}",
            false,
            "EndpointsListed",
            "lists 2 endpoints",
        ),
    ] {
        let p = plan_of(upstream);
        assert_eq!((p.discovers, p.reason), (discovers, reason), "{upstream}");
        assert!(p.message.contains(says), "{upstream}: {}", p.message);
    }
}
