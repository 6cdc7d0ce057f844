//! Gateways follow their RateLimitPolicy through a real kube-apiserver: threshold patches
//! apply live (and change admission), the gateway runs under exactly the Role the operator
//! gives it, and a deleted policy keeps serving until it is recreated. The gateway and the
//! simulated engine are real processes on 127.0.0.1.

mod support;

use std::time::Instant;

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use sluice::policy::RateLimitPolicy;
use support::http::{Sim, client as http_client, long_stream, metric, post_json};
use support::{TestNamespace, apply_gateway_rbac, client, ensure_crd, impersonating_kubeconfig};

fn chat() -> Value {
    json!({"model": "sim-llm", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]})
}

/// A hard-cliff policy (reject everything once TTFT averages above `ttft`) in front of `upstream`.
fn policy(name: &str, upstream: &str, ttft: &str) -> RateLimitPolicy {
    serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": name},
        "spec": {
            "upstream": {"url": upstream},
            "defaults": {"ttft": ttft, "itl": "1s", "timeConstant": "1s"},
            "models": [{"name": "sim-llm"}],
            "shedding": {"maxRejectProbability": 1, "ramp": 1, "maxEvidence": 1}
        }
    }))
    .unwrap()
}

async fn set_ttft(api: &Api<RateLimitPolicy>, name: &str, ttft: &str) -> i64 {
    let patch = json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": name},
        "spec": {"defaults": {"ttft": ttft}}
    });
    let p = api
        .patch(
            name,
            &PatchParams::apply("sluice-tests-tuner").force(),
            &Patch::Apply(&patch),
        )
        .await
        .unwrap();
    p.metadata.generation.unwrap()
}

#[tokio::test]
async fn threshold_patches_apply_live_under_the_gateways_own_role() {
    let k = client().await;
    ensure_crd(&k).await;
    let ns = TestNamespace::new(&k, "watch-patch").await;
    let c = http_client();
    let sim = Sim::start(&c, &[]).await;
    let api: Api<RateLimitPolicy> = Api::namespaced(k.clone(), &ns.name);
    api.create(&PostParams::default(), &policy("llama", &sim.url, "1ms"))
        .await
        .unwrap();
    let (mut gw, _kc) = support::watched_gateway(&k, &c, &ns.name, "llama").await;
    gw.wait_metric(&c, "sluice_policy_generation", &[], 1.0, 10)
        .await;
    let url = format!("{}/v1/chat/completions", gw.url);

    // 1 ms TTFT: a long stream is measured far above it and stays in flight; the next request
    // is shed.
    let _load = long_stream(&c, &gw.url).await;
    gw.wait_metric(
        &c,
        "sluice_ttft_seconds_count",
        &[("model", "sim-llm")],
        1.0,
        10,
    )
    .await;
    assert_eq!(post_json(&c, &url, &chat()).await.status, 429);

    // Raise the threshold: applied without a restart, and the same request is admitted.
    let t = Instant::now();
    let generation = set_ttft(&api, "llama", "1h").await;
    assert_eq!(generation, 2);
    let m = gw
        .wait_metric(&c, "sluice_policy_generation", &[], 2.0, 10)
        .await;
    eprintln!("patch → applied in {:?}", t.elapsed());
    assert_eq!(
        metric(&m, "sluice_ttft_threshold_seconds", &[("model", "sim-llm")]),
        Some(3600.0)
    );
    // The average survived the reload (same model, unrelated edit).
    assert!(metric(&m, "sluice_ttft_ema_seconds", &[("model", "sim-llm")]).unwrap() > 0.001);
    assert_eq!(post_json(&c, &url, &chat()).await.status, 200);

    // And back: shed again.
    set_ttft(&api, "llama", "1ms").await;
    gw.wait_metric(&c, "sluice_policy_generation", &[], 3.0, 10)
        .await;
    let r = post_json(&c, &url, &chat()).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(
        gw.process.child.try_wait().unwrap().is_none(),
        "the gateway restarted"
    );
}

#[tokio::test]
async fn the_gateway_role_allows_its_own_policy_and_nothing_else() {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::ListParams;
    let k = client().await;
    ensure_crd(&k).await;
    let ns = TestNamespace::new(&k, "watch-rbac").await;
    let api: Api<RateLimitPolicy> = Api::namespaced(k.clone(), &ns.name);
    api.create(
        &PostParams::default(),
        &policy("mine", "http://127.0.0.1:9", "1s"),
    )
    .await
    .unwrap();
    api.create(
        &PostParams::default(),
        &policy("theirs", "http://127.0.0.1:9", "1s"),
    )
    .await
    .unwrap();
    let sa = apply_gateway_rbac(&k, &ns.name, "mine").await;
    let kc = impersonating_kubeconfig(&ns.name, &sa);
    let as_gateway = support::client_from(&kc.0).await;
    let gw_api: Api<RateLimitPolicy> = Api::namespaced(as_gateway.clone(), &ns.name);

    assert_eq!(
        gw_api.get("mine").await.unwrap().metadata.name.as_deref(),
        Some("mine")
    );
    let own = gw_api
        .list(&ListParams::default().fields("metadata.name=mine"))
        .await
        .unwrap();
    assert_eq!(own.items.len(), 1);

    let forbidden = |r: Result<(), kube::Error>, what: &str| match r {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{what}: {}", s.message),
        other => panic!("{what}: expected 403, got {other:?}"),
    };
    forbidden(gw_api.get("theirs").await.map(|_| ()), "get another policy");
    forbidden(
        gw_api.list(&ListParams::default()).await.map(|_| ()),
        "list all policies",
    );
    forbidden(
        gw_api
            .list(&ListParams::default().fields("metadata.name=theirs"))
            .await
            .map(|_| ()),
        "list another policy",
    );
    let secrets: Api<Secret> = Api::namespaced(as_gateway.clone(), &ns.name);
    forbidden(
        secrets.list(&ListParams::default()).await.map(|_| ()),
        "list secrets",
    );
    let patch = json!({"spec": {"mode": "Shadow"}});
    forbidden(
        gw_api
            .patch("mine", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ()),
        "write its own policy",
    );
}

#[tokio::test]
async fn a_deleted_policy_keeps_serving_and_a_recreated_one_is_picked_up() {
    let k = client().await;
    ensure_crd(&k).await;
    let ns = TestNamespace::new(&k, "watch-delete").await;
    let c = http_client();
    let sim = Sim::start(&c, &[]).await;
    let api: Api<RateLimitPolicy> = Api::namespaced(k.clone(), &ns.name);
    api.create(&PostParams::default(), &policy("p", &sim.url, "30s"))
        .await
        .unwrap();
    let (gw, _kc) = support::watched_gateway(&k, &c, &ns.name, "p").await;
    let url = format!("{}/v1/chat/completions", gw.url);
    gw.wait_metric(&c, "sluice_policy_present", &[], 1.0, 10)
        .await;
    assert_eq!(post_json(&c, &url, &chat()).await.status, 200);

    api.delete("p", &DeleteParams::default()).await.unwrap();
    let m = gw
        .wait_metric(&c, "sluice_policy_present", &[], 0.0, 10)
        .await;
    assert_eq!(
        metric(&m, "sluice_ttft_threshold_seconds", &[("model", "sim-llm")]),
        Some(30.0)
    );
    assert_eq!(
        post_json(&c, &url, &chat()).await.status,
        200,
        "still serving"
    );
    assert_eq!(
        support::http::get(&c, &format!("{}/readyz", gw.url))
            .await
            .status,
        200
    );

    api.create(&PostParams::default(), &policy("p", &sim.url, "20s"))
        .await
        .unwrap();
    gw.wait_metric(&c, "sluice_policy_present", &[], 1.0, 10)
        .await;
    gw.wait_metric(
        &c,
        "sluice_ttft_threshold_seconds",
        &[("model", "sim-llm")],
        20.0,
        10,
    )
    .await;
    assert_eq!(post_json(&c, &url, &chat()).await.status, 200);
}
