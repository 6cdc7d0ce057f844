//! The RateLimitPolicy CRD against a real kube-apiserver: it installs, the example is accepted,
//! every invalid case is refused by the API server itself with a message naming the field (and
//! by the Rust validation naming the same field), kubectl shows printer columns and field docs,
//! and server-side apply by two field managers behaves as Kubernetes documents.

mod support;

use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use sluice::policy::{PolicyConfig, RateLimitPolicy};
use support::{TestNamespace, client, ensure_crd, kubectl_ok};

fn example(ns: &str) -> RateLimitPolicy {
    let text = std::fs::read_to_string(format!("{}/examples/policy.yaml", support::REPO)).unwrap();
    let mut p: RateLimitPolicy = serde_yaml::from_str(&text).unwrap();
    p.metadata.namespace = Some(ns.to_owned());
    p
}

/// A valid policy document as JSON, with `spec` fields overridden by `patch` (a JSON merge).
fn policy_json(name: &str, patch: serde_json::Value) -> serde_json::Value {
    let mut doc = json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": name},
        "spec": {"upstream": {"url": "http://127.0.0.1:8000"}}
    });
    merge(&mut doc["spec"], &patch);
    doc
}

fn merge(into: &mut serde_json::Value, patch: &serde_json::Value) {
    match (into, patch) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

#[tokio::test]
async fn crd_installs_and_the_example_policy_is_accepted_with_defaults() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = TestNamespace::new(&client, "crd-example").await;
    let api: Api<RateLimitPolicy> = Api::namespaced(client.clone(), &ns.name);
    let created = api
        .create(&PostParams::default(), &example(&ns.name))
        .await
        .expect("example accepted");
    assert_eq!(created.spec.models.len(), 2);
    // Server-side defaulting from the schema fills what the example left out.
    assert_eq!(created.spec.shedding.max_evidence, 200);
    assert!(created.spec.upstream.stream_unary);
    // What the API server stored is valid for the gateway too.
    PolicyConfig::try_from(&created.spec).expect("stored object validates in Rust");

    // A minimal policy gets every documented default from the API server.
    let minimal: RateLimitPolicy =
        serde_json::from_value(policy_json("minimal", json!({}))).unwrap();
    let m = api.create(&PostParams::default(), &minimal).await.unwrap();
    assert_eq!(m.spec.defaults.ttft, "1s");
    assert_eq!(m.spec.defaults.itl, "50ms");
    assert_eq!(m.spec.defaults.time_constant, "4s");
    assert_eq!(m.spec.upstream.timeout, "600s");
    assert_eq!(m.spec.shedding.ramp, 1.5);
}

/// Each invalid case: the spec change, the field the API server must name, and the field
/// the Rust validation names (which starts with the API server's).
fn invalid_cases() -> Vec<(&'static str, serde_json::Value, &'static str)> {
    vec![
        (
            "zero-ttft",
            json!({"defaults": {"ttft": "0s"}}),
            "spec.defaults.ttft",
        ),
        (
            "negative-itl",
            json!({"defaults": {"itl": "-5ms"}}),
            "spec.defaults.itl",
        ),
        (
            "bad-duration",
            json!({"models": [{"name": "m", "ttft": "1.5s"}]}),
            "spec.models[0].ttft",
        ),
        (
            "short-tau",
            json!({"defaults": {"timeConstant": "500ms"}}),
            "spec.defaults.timeConstant",
        ),
        (
            "dup-model",
            json!({"models": [{"name": "a"}, {"name": "b"}, {"name": "a"}]}),
            "spec.models[2]",
        ),
        (
            "p-zero",
            json!({"shedding": {"maxRejectProbability": 0}}),
            "spec.shedding.maxRejectProbability",
        ),
        (
            "p-above-one",
            json!({"shedding": {"maxRejectProbability": 1.5}}),
            "spec.shedding.maxRejectProbability",
        ),
        (
            "ramp-below-one",
            json!({"shedding": {"ramp": 0.5}}),
            "spec.shedding.ramp",
        ),
        (
            "ftp-upstream",
            json!({"upstream": {"url": "ftp://models.example/"}}),
            "spec.upstream.url",
        ),
        (
            "no-scheme-upstream",
            json!({"upstream": {"url": "vllm:8000"}}),
            "spec.upstream.url",
        ),
        (
            // 120 characters, 360 bytes: within a character count of 256, over the bytes.
            "model-name-over-256-bytes",
            json!({"models": [{"name": "模".repeat(120)}]}),
            "spec.models[0].name",
        ),
        (
            "credentials-in-upstream",
            json!({"upstream": {"url": "https://user:sk-live@api.example.com/v1"}}),
            "spec.upstream.url",
        ),
        (
            "ftp-endpoint",
            json!({"upstream": {"url": "http://e:8000", "endpoints": ["http://e0:8000", "ftp://e1/"]}}),
            "spec.upstream.endpoints",
        ),
        (
            "credentials-in-an-endpoint",
            json!({"upstream": {"url": "http://e:8000", "endpoints": ["http://k:sk-live@e0:8000"]}}),
            "spec.upstream.endpoints",
        ),
        (
            "65-endpoints",
            json!({"upstream": {"url": "http://e:8000",
                "endpoints": (0..65).map(|i| format!("http://e{i}:8000")).collect::<Vec<_>>()}}),
            "spec.upstream.endpoints",
        ),
        (
            "bad-port-name",
            json!({"upstream": {"url": "http://e.ns.svc:8000", "portName": "HTTP_port"}}),
            "spec.upstream.portName",
        ),
        (
            "engine-metrics-interval-too-short",
            json!({"upstream": {"url": "http://e:8000", "engineMetrics": {"interval": "10ms"}}}),
            "spec.upstream.engineMetrics.interval",
        ),
        (
            "engine-metrics-relative-path",
            json!({"upstream": {"url": "http://e:8000", "engineMetrics": {"path": "metrics"}}}),
            "spec.upstream.engineMetrics.path",
        ),
        (
            "queue-wait-over-a-minute",
            json!({"queue": {"maxWait": "61s"}}),
            "spec.queue.maxWait",
        ),
        (
            "queue-of-nothing",
            json!({"queue": {"maxWait": "100ms", "maxRequests": 0}}),
            "spec.queue.maxRequests",
        ),
        (
            "tenant-header-not-a-header",
            json!({"tenants": {"header": "x tenant", "trustHeader": true}}),
            "spec.tenants.header",
        ),
        (
            "tenant-weight-zero",
            json!({"tenants": {"clients": {"web": {"weight": 0}}}}),
            "spec.tenants.clients",
        ),
        (
            "tenant-tokens-over-the-cap",
            json!({"tenants": {"default": {"tokensPerMinute": 10_000_000_001_u64}}}),
            "spec.tenants.default.tokensPerMinute",
        ),
        (
            "global-with-models",
            json!({"scope": "Global", "models": [{"name": "a"}]}),
            "spec.models",
        ),
        (
            "metrics-port-on-the-default-api-port",
            json!({"gateway": {"metricsPort": 8080}}),
            "spec.gateway.metricsPort",
        ),
        (
            "metrics-port-equals-port",
            json!({"gateway": {"port": 8000, "metricsPort": 8000}}),
            "spec.gateway.metricsPort",
        ),
        (
            "client-classes-without-auth",
            json!({"priority": {"clients": {"batch": "sheddable"}}}),
            "spec.priority.clients",
        ),
    ]
}

#[tokio::test]
async fn the_api_server_refuses_every_invalid_case_naming_the_field() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = TestNamespace::new(&client, "crd-invalid").await;
    let api: Api<RateLimitPolicy> = Api::namespaced(client.clone(), &ns.name);
    for (name, patch, field) in invalid_cases() {
        let doc = policy_json(name, patch);
        let policy: RateLimitPolicy = serde_json::from_value(doc.clone()).unwrap();
        let err = api
            .create(&PostParams::default(), &policy)
            .await
            .expect_err(&format!(
                "{name}: the API server accepted an invalid policy"
            ));
        let kube::Error::Api(status) = err else {
            panic!("{name}: expected an API error, got {err}");
        };
        assert_eq!(status.code, 422, "{name}: {}", status.message);
        assert!(
            status.message.contains(field),
            "{name}: message does not name {field}: {}",
            status.message
        );
        // The same document is refused by the Rust validation, naming the same field.
        let yaml = serde_yaml::to_string(&doc).unwrap();
        let rust = PolicyConfig::from_yaml(&yaml).expect_err(&format!("{name}: Rust accepted it"));
        assert!(
            rust.field_errors()
                .iter()
                .any(|e| e.field.starts_with(field)),
            "{name}: Rust validation names other fields: {rust}"
        );
    }
}

#[tokio::test]
async fn kubectl_shows_printer_columns_and_field_docs() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = TestNamespace::new(&client, "crd-kubectl").await;
    let api: Api<RateLimitPolicy> = Api::namespaced(client.clone(), &ns.name);
    api.create(&PostParams::default(), &example(&ns.name))
        .await
        .unwrap();

    let table = kubectl_ok(&["get", "rlp", "-n", &ns.name]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "MODE", "TTFT", "ITL", "ACCEPTED", "READY", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], ["llama", "Enforce", "1s", "50ms"], "{table}");
    let wide = kubectl_ok(&[
        "get",
        "ratelimitpolicies.sluice.dev",
        "-n",
        &ns.name,
        "-o",
        "wide",
    ]);
    assert!(wide.lines().next().unwrap().contains("ENDPOINT"), "{wide}");

    let explain = kubectl_ok(&["explain", "rlp.spec.defaults"]);
    assert!(
        explain.contains("Time-to-first-token threshold"),
        "{explain}"
    );
    assert!(explain.contains("timeConstant"), "{explain}");
    let explain = kubectl_ok(&["explain", "rlp"]);
    assert!(
        explain.contains("RateLimitPolicy keeps an OpenAI-compatible inference server"),
        "{explain}"
    );
}

#[tokio::test]
async fn server_side_apply_by_two_field_managers() {
    let client = client().await;
    ensure_crd(&client).await;
    let ns = TestNamespace::new(&client, "crd-ssa").await;
    let api: Api<RateLimitPolicy> = Api::namespaced(client.clone(), &ns.name);
    let pp = |manager: &str| PatchParams::apply(manager);

    // The platform team owns the upstream and the defaults; the model team owns its model.
    let platform = policy_json("shared", json!({"defaults": {"ttft": "1s"}}));
    api.patch("shared", &pp("platform"), &Patch::Apply(&platform))
        .await
        .unwrap();
    let models = json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": "shared"},
        "spec": {"upstream": {"url": "http://127.0.0.1:8000"}, "models": [{"name": "llama", "ttft": "800ms"}]}
    });
    api.patch("shared", &pp("model-team"), &Patch::Apply(&models))
        .await
        .unwrap();
    // A second model team adds its entry: `models` is a list-map keyed by name, so entries
    // merge instead of replacing each other.
    let more = json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": "shared"},
        "spec": {"upstream": {"url": "http://127.0.0.1:8000"}, "models": [{"name": "mistral", "itl": "40ms"}]}
    });
    api.patch("shared", &pp("other-team"), &Patch::Apply(&more))
        .await
        .unwrap();
    let p = api.get("shared").await.unwrap();
    let names: Vec<&str> = p.spec.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["llama", "mistral"]);

    // Changing a field another manager owns is a conflict...
    let grab = json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": "shared"},
        "spec": {"upstream": {"url": "http://127.0.0.1:8000"}, "defaults": {"ttft": "2s"}}
    });
    let err = api
        .patch("shared", &pp("model-team"), &Patch::Apply(&grab))
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("expected a conflict, got {err}")
    };
    assert_eq!(status.code, 409, "{}", status.message);
    assert!(
        status.message.contains("platform"),
        "the conflict names the owner: {}",
        status.message
    );
    assert_eq!(api.get("shared").await.unwrap().spec.defaults.ttft, "1s");

    // ...until forced, which moves ownership; the model team's apply no longer lists
    // llama, so server-side apply removes the entry it owned.
    api.patch("shared", &pp("model-team").force(), &Patch::Apply(&grab))
        .await
        .unwrap();
    let p = api.get("shared").await.unwrap();
    assert_eq!(p.spec.defaults.ttft, "2s");
    let names: Vec<&str> = p.spec.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["mistral"]);
    let owners: Vec<String> = p
        .metadata
        .managed_fields
        .unwrap()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        owners.contains(&"platform".to_owned()) && owners.contains(&"model-team".to_owned()),
        "{owners:?}"
    );
}
