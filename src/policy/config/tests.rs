//! Validation tests: valid documents parse with defaults applied; each invalid case names
//! its field precisely.

use super::*;

mod features;

const MINIMAL: &str = "
apiVersion: sluice.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: p}
spec:
  upstream: {url: http://127.0.0.1:8000}
";

/// A minimal valid policy with `spec` lines appended (indented two spaces) — the builder the
/// invalid cases start from.
fn with_spec(extra: &str) -> String {
    let mut doc = MINIMAL.to_owned();
    for line in extra.lines() {
        doc.push_str("  ");
        doc.push_str(line);
        doc.push('\n');
    }
    doc
}

fn errors_of(doc: &str) -> Vec<FieldError> {
    match PolicyConfig::from_yaml(doc) {
        Err(PolicyError::Invalid(e)) => e,
        other => panic!("expected validation errors, got {other:?}"),
    }
}

fn assert_single_error(doc: &str, field: &str, needle: &str) {
    let errors = errors_of(doc);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].field, field, "{errors:?}");
    assert!(
        errors[0].message.contains(needle),
        "message {:?} lacks {needle:?}",
        errors[0].message
    );
}

#[test]
fn the_example_policy_is_valid() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/policy.yaml"))
            .unwrap();
    let (policy, config) = PolicyConfig::from_yaml(&text).unwrap();
    assert_eq!(policy.metadata.name.as_deref(), Some("llama"));
    assert_eq!(
        config.upstream.url.host(),
        Some("vllm.inference.svc.cluster.local")
    );
    assert_eq!(config.upstream.timeout, Duration::from_secs(600));
    let l = &config.limiter;
    assert_eq!(l.models.len(), 2);
    assert_eq!(l.models[0].0, "meta-llama/Llama-3.1-8B-Instruct");
    assert_eq!(l.models[0].1.ttft, 0.8);
    assert_eq!(l.models[0].1.itl, 0.03);
    assert_eq!(l.models[0].1.time_constant, 4.0, "inherited from defaults");
    assert_eq!(l.models[1].1.time_constant, 2.0);
    assert_eq!(l.shedding.max_reject_probability, 0.95);
}

#[test]
fn a_minimal_policy_gets_the_documented_defaults() {
    let (_, c) = PolicyConfig::from_yaml(MINIMAL).unwrap();
    assert_eq!(c.limiter.mode, limiter::Mode::Enforce);
    assert_eq!(c.limiter.scope, limiter::Scope::PerModel);
    assert_eq!(
        c.limiter.defaults,
        Thresholds {
            ttft: 1.0,
            itl: 0.05,
            time_constant: 4.0
        }
    );
    assert_eq!(c.limiter.shedding.ramp, 1.5);
    assert_eq!(c.limiter.shedding.max_evidence, 200.0);
    assert!(c.upstream.stream_unary);
    assert_eq!(c.upstream.timeout, Duration::from_secs(600));
}

#[test]
fn shadow_global_and_https_parse() {
    let doc = "
apiVersion: sluice.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: p}
spec:
  upstream: {url: 'https://api.example.internal/', streamUnary: false}
  mode: Shadow
  scope: Global
  shedding: {maxRejectProbability: 1, ramp: 1}
";
    let (_, c) = PolicyConfig::from_yaml(doc).unwrap();
    assert_eq!(c.limiter.mode, limiter::Mode::Shadow);
    assert_eq!(c.limiter.scope, limiter::Scope::Global);
    assert!(!c.upstream.stream_unary);
    assert_eq!(c.limiter.shedding.max_reject_probability, 1.0);
}

#[test]
fn zero_threshold_is_rejected() {
    assert_single_error(
        &with_spec("defaults: {ttft: 0s}"),
        "spec.defaults.ttft",
        "greater than 0",
    );
    assert_single_error(
        &with_spec("models: [{name: m, itl: 0ms}]"),
        "spec.models[0].itl",
        "greater than 0",
    );
}

#[test]
fn negative_threshold_is_rejected_as_a_bad_duration() {
    assert_single_error(
        &with_spec("defaults: {itl: -5ms}"),
        "spec.defaults.itl",
        "\"-5ms\" is not a duration",
    );
}

#[test]
fn bad_durations_are_rejected() {
    assert_single_error(
        &with_spec("defaults: {ttft: 1.5s}"),
        "spec.defaults.ttft",
        "not a duration",
    );
    assert_single_error(
        &MINIMAL.replace("8000}", "8000, timeout: '10'}"),
        "spec.upstream.timeout",
        "not a duration",
    );
    assert_single_error(
        &with_spec("defaults: {timeConstant: 500ms}"),
        "spec.defaults.timeConstant",
        "at least 1s",
    );
}

#[test]
fn duplicate_model_names_are_rejected() {
    assert_single_error(
        &with_spec("models: [{name: a}, {name: b}, {name: a, ttft: 2s}]"),
        "spec.models[2].name",
        "duplicate model name \"a\" (first at spec.models[0])",
    );
}

#[test]
fn probability_outside_zero_one_is_rejected() {
    for p in ["0", "-0.1", "1.01", ".nan"] {
        assert_single_error(
            &with_spec(&format!("shedding: {{maxRejectProbability: {p}}}")),
            "spec.shedding.maxRejectProbability",
            "greater than 0 and at most 1",
        );
    }
}

#[test]
fn ramp_below_one_is_rejected() {
    assert_single_error(
        &with_spec("shedding: {ramp: 0.9}"),
        "spec.shedding.ramp",
        "at least 1",
    );
}

#[test]
fn non_http_upstreams_are_rejected() {
    for url in ["ftp://host/", "vllm:8000", "http://", "/v1", "not a url"] {
        let doc = MINIMAL.replace("http://127.0.0.1:8000", url);
        assert_single_error(&doc, "spec.upstream.url", "http:// or https://");
    }
}

#[test]
fn upstreams_with_credentials_in_the_url_are_rejected_without_echoing_them() {
    for url in [
        "http://user:pw@127.0.0.1:8000",
        "https://token@engine.example/v1",
        "ftp://user:pw@host/",
    ] {
        let doc = MINIMAL.replace("http://127.0.0.1:8000", url);
        assert_single_error(&doc, "spec.upstream.url", "must not carry credentials");
        let err = PolicyConfig::from_yaml(&doc).unwrap_err().to_string();
        assert!(!err.contains("pw@") && !err.contains("token@"), "{err}");
    }
}

#[test]
fn endpoints_are_served_instead_of_the_url_and_each_host_and_port_comes_once() {
    let url = |u: &str| u.parse::<http::Uri>().unwrap();
    let (_, c) = PolicyConfig::from_yaml(MINIMAL).unwrap();
    assert_eq!(c.upstream.endpoints, [url("http://127.0.0.1:8000")]);
    let doc = MINIMAL.replace(
        "{url: http://127.0.0.1:8000}",
        "{url: http://127.0.0.1:8000, endpoints: [http://10.0.0.1:8000, 'https://e2/v1']}",
    );
    let (_, c) = PolicyConfig::from_yaml(&doc).unwrap();
    assert_eq!(
        c.upstream.endpoints,
        [url("http://10.0.0.1:8000"), url("https://e2/v1")]
    );
    let labels: Vec<String> = c.upstream.endpoints.iter().map(endpoint_label).collect();
    assert_eq!(labels, ["10.0.0.1:8000", "e2:443"]);
    // The same host and port twice (the default port spelled out): refused, naming both.
    let twice = MINIMAL.replace(
        "{url: http://127.0.0.1:8000}",
        "{url: http://127.0.0.1:8000, endpoints: ['http://e:80', 'http://e/v1']}",
    );
    assert_single_error(
        &twice,
        "spec.upstream.endpoints[1]",
        "e:80 is already endpoints[0]",
    );
    for (bad, needle) in [
        ("ftp://e/", "http:// or https://"),
        ("http://u:pw@e/", "must not carry credentials"),
    ] {
        let doc = MINIMAL.replace(
            "{url: http://127.0.0.1:8000}",
            &format!("{{url: http://127.0.0.1:8000, endpoints: [http://ok:1, '{bad}']}}"),
        );
        assert_single_error(&doc, "spec.upstream.endpoints[1]", needle);
        assert!(
            !PolicyConfig::from_yaml(&doc)
                .unwrap_err()
                .to_string()
                .contains("pw@")
        );
    }
    let many: Vec<String> = (0..65).map(|i| format!("'http://e{i}:8000'")).collect();
    let doc = MINIMAL.replace(
        "{url: http://127.0.0.1:8000}",
        &format!(
            "{{url: http://127.0.0.1:8000, endpoints: [{}]}}",
            many.join(", ")
        ),
    );
    assert_single_error(&doc, "spec.upstream.endpoints", "at most 64 endpoints");
}

#[test]
fn the_metrics_port_must_differ_from_the_api_port() {
    assert_single_error(
        &with_spec("gateway: {port: 8000, metricsPort: 8000}"),
        "spec.gateway.metricsPort",
        "must differ",
    );
    assert_single_error(
        &with_spec("gateway: {metricsPort: 8080}"),
        "spec.gateway.metricsPort",
        "must differ",
    );
    // An API on 9090 (a policy older than metricsPort) moves the default metrics port instead.
    assert!(PolicyConfig::from_yaml(&with_spec("gateway: {port: 9090}")).is_ok());
    use crate::policy::crd::{GatewaySpec, metrics_port};
    let g = |port, metrics_port| GatewaySpec {
        port,
        metrics_port,
        ..GatewaySpec::default()
    };
    assert_eq!(metrics_port(None), 9090);
    assert_eq!(metrics_port(Some(&g(Some(9090), None))), 9091);
    assert_eq!(metrics_port(Some(&g(Some(8000), Some(9200)))), 9200);
}

#[test]
fn per_model_entries_with_global_scope_are_rejected() {
    assert_single_error(
        &with_spec("scope: Global\nmodels: [{name: a}]"),
        "spec.models",
        "no effect with scope Global",
    );
}

#[test]
fn client_priority_classes_need_client_auth_and_secret_key_names() {
    assert_single_error(
        &with_spec("priority: {clients: {batch: sheddable}}"),
        "spec.priority.clients",
        "need clientAuth",
    );
    assert_single_error(
        &with_spec("clientAuth: {secretRef: {name: keys}}\npriority: {clients: {'a/b': critical}}"),
        "spec.priority.clients[\"a/b\"]",
        "Secret data key",
    );
    let (_, c) = PolicyConfig::from_yaml(&with_spec(
        "clientAuth: {secretRef: {name: keys}, required: false}\npriority: {clients: {checkout: critical, batch.jobs: sheddable}}",
    ))
    .unwrap();
    let auth = c.client_auth.unwrap();
    assert_eq!((auth.secret.as_str(), auth.required), ("keys", false));
    assert_eq!(auth.classes["checkout"], Priority::Critical);
    assert_eq!(auth.classes["batch.jobs"], Priority::Sheddable);
    let (_, c) =
        PolicyConfig::from_yaml(&with_spec("clientAuth: {secretRef: {name: keys}}")).unwrap();
    assert!(c.client_auth.unwrap().required, "required by default");
    assert!(
        PolicyConfig::from_yaml(MINIMAL)
            .unwrap()
            .1
            .client_auth
            .is_none()
    );
}

#[test]
fn every_violation_is_reported_at_once() {
    let errors = errors_of(&with_spec(
        "defaults: {ttft: 0s, itl: fast}\nshedding: {ramp: 0, maxRejectProbability: 2}",
    ));
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.defaults.ttft",
            "spec.defaults.itl",
            "spec.shedding.maxRejectProbability",
            "spec.shedding.ramp"
        ]
    );
    let text = PolicyError::Invalid(errors).to_string();
    assert!(
        text.starts_with("invalid RateLimitPolicy: spec.defaults.ttft: "),
        "{text}"
    );
}

#[test]
fn other_documents_and_broken_yaml_are_refused_clearly() {
    let err = PolicyConfig::from_yaml("apiVersion: v1\nkind: ConfigMap\n").unwrap_err();
    assert!(matches!(err, PolicyError::WrongKind { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("found apiVersion \"v1\" and kind \"ConfigMap\"")
    );
    let err = PolicyConfig::from_yaml("spec: [unclosed").unwrap_err();
    assert!(matches!(err, PolicyError::Yaml(_)), "{err}");
    let err = PolicyConfig::from_yaml(
        &MINIMAL.replace("upstream: {url: http://127.0.0.1:8000}", "mode: Loud"),
    )
    .unwrap_err();
    assert!(matches!(err, PolicyError::Yaml(_)), "{err}");
    assert!(
        err.to_string().contains("upstream") || err.to_string().contains("Loud"),
        "{err}"
    );
}
