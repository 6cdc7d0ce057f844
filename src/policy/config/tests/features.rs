//! The optional features of a policy: discovery, engine metrics, the admission queue,
//! tenants' budgets.

use super::*;

#[test]
fn discovery_is_on_by_default_and_a_port_name_must_be_a_service_port_name() {
    let (_, c) = PolicyConfig::from_yaml(MINIMAL).unwrap();
    assert!(c.upstream.discovery);
    assert_eq!(c.upstream.port_name, None);
    let off = MINIMAL.replace(
        "{url: http://127.0.0.1:8000}",
        "{url: http://127.0.0.1:8000, discovery: None, portName: http-api}",
    );
    let (_, c) = PolicyConfig::from_yaml(&off).unwrap();
    assert!(!c.upstream.discovery);
    assert_eq!(c.upstream.port_name.as_deref(), Some("http-api"));
    for bad in ["HTTP", "-http", "http_api", "'h p'"] {
        let doc = MINIMAL.replace(
            "{url: http://127.0.0.1:8000}",
            &format!("{{url: http://127.0.0.1:8000, portName: {bad}}}"),
        );
        assert_single_error(&doc, "spec.upstream.portName", "Service port name");
    }
}

#[test]
fn engine_metrics_default_to_auto_every_250ms_and_bad_paths_and_intervals_are_refused() {
    let with = |m: &str| {
        MINIMAL.replace(
            "{url: http://127.0.0.1:8000}",
            &format!("{{url: http://127.0.0.1:8000, engineMetrics: {m}}}"),
        )
    };
    let (_, c) = PolicyConfig::from_yaml(&with("{}")).unwrap();
    let m = c.upstream.engine_metrics.unwrap();
    assert_eq!(m.engine, crate::signals::EngineKind::Auto);
    assert_eq!(
        (m.path.as_str(), m.interval),
        ("/metrics", Duration::from_millis(250))
    );
    let (_, c) =
        PolicyConfig::from_yaml(&with("{engine: sglang, path: /m, interval: 1s}")).unwrap();
    assert_eq!(
        c.upstream.engine_metrics.unwrap().engine,
        crate::signals::EngineKind::Sglang
    );
    let (_, c) = PolicyConfig::from_yaml(MINIMAL).unwrap();
    assert_eq!(c.upstream.engine_metrics, None, "off unless set");
    for (m, field, needle) in [
        ("{interval: 10ms}", "interval", "between 50ms and 60s"),
        ("{interval: 2m}", "interval", "between 50ms and 60s"),
        ("{path: metrics}", "path", "starting with /"),
        ("{path: '/a b'}", "path", "starting with /"),
    ] {
        let field = format!("spec.upstream.engineMetrics.{field}");
        assert_single_error(&with(m), &field, needle);
    }
}

#[test]
fn a_queue_is_off_unless_set_and_its_wait_and_size_are_bounded() {
    let (_, c) = PolicyConfig::from_yaml(MINIMAL).unwrap();
    assert_eq!(c.queue, None, "off unless set");
    let with = |q: &str| format!("{MINIMAL}  queue: {q}\n");
    let (_, c) = PolicyConfig::from_yaml(&with("{maxWait: 250ms}")).unwrap();
    let q = c.queue.unwrap();
    assert_eq!(
        (q.max_wait, q.max_requests),
        (Duration::from_millis(250), 64)
    );
    for (q, field, needle) in [
        ("{maxWait: 0s}", "maxWait", "greater than 0"),
        ("{maxWait: 61s}", "maxWait", "at most 60s"),
        ("{maxWait: soon}", "maxWait", ""),
        (
            "{maxWait: 1s, maxRequests: 0}",
            "maxRequests",
            "between 1 and 10000",
        ),
        (
            "{maxWait: 1s, maxRequests: 10001}",
            "maxRequests",
            "between 1 and 10000",
        ),
    ] {
        assert_single_error(&with(q), &format!("spec.queue.{field}"), needle);
    }
}

#[test]
fn tenants_budgets_are_per_name_with_a_default_and_a_header_needs_trust() {
    let with = |t: &str| format!("{MINIMAL}  tenants: {t}\n");
    let (_, c) = PolicyConfig::from_yaml(MINIMAL).unwrap();
    assert_eq!(c.tenants, None, "off unless set");
    let doc = with(
        "{header: x-tenant, trustHeader: true, default: {requestsPerMinute: 60}, clients: {batch: {requestsPerMinute: 0}}}",
    );
    let (_, c) = PolicyConfig::from_yaml(&doc).unwrap();
    let t = c.tenants.unwrap();
    assert_eq!(t.header.as_ref().map(|h| h.as_str()), Some("x-tenant"));
    assert_eq!(t.budget("batch").requests_per_minute, Some(0));
    assert_eq!(t.budget("anyone").requests_per_minute, Some(60));
    assert_eq!(t.budget("anyone").weight, 1, "weights default to 1");
    assert_eq!(t.replicas, 1);
    let doc = with(
        "{default: {tokensPerMinute: 0}, clients: {web: {tokensPerMinute: 5000000000, weight: 4}}}",
    );
    let t = PolicyConfig::from_yaml(&doc).unwrap().1.tenants.unwrap();
    assert_eq!(t.budget("web").tokens_per_minute, Some(5_000_000_000));
    assert_eq!((t.budget("web").weight, t.budget("x").weight), (4, 1));
    assert_eq!(t.budget("x").tokens_per_minute, Some(0));
    let doc = format!("{}  gateway: {{replicas: 3}}\n", with("{}"));
    let (_, c) = PolicyConfig::from_yaml(&doc).unwrap();
    assert_eq!(c.tenants.unwrap().replicas, 3);
    for (t, field, needle) in [
        ("{header: x-tenant}", "header", "trustHeader: true"),
        ("{trustHeader: true}", "trustHeader", "names no header"),
        (
            "{header: authorization, trustHeader: true}",
            "header",
            "other than",
        ),
        (
            "{header: 'a b', trustHeader: true}",
            "header",
            "HTTP header name",
        ),
        (
            "{clients: {'a b': {}}}",
            "clients[\"a b\"]",
            "Secret data key",
        ),
        (
            "{default: {requestsPerMinute: 10000001}}",
            "default.requestsPerMinute",
            "at most",
        ),
        (
            "{default: {tokensPerMinute: 10000000001}}",
            "default.tokensPerMinute",
            "at most",
        ),
        (
            "{clients: {web: {weight: 0}}}",
            "clients[\"web\"].weight",
            "between 1 and 1000",
        ),
        (
            "{default: {weight: 1001}}",
            "default.weight",
            "between 1 and 1000",
        ),
    ] {
        assert_single_error(&with(t), &format!("spec.tenants.{field}"), needle);
    }
}
