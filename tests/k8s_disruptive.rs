//! Tests that disturb the shared control plane, so they live in their own test binary (cargo
//! runs test binaries one after another) and run one at a time: an API-server outage while
//! the gateway serves traffic, and an invalid object that got past the API server's
//! validation (written while the CRD had no schema rules).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use sluice::policy::RateLimitPolicy;
use support::http::{Gw, HttpClient, Sim, client as http_client, metric, post_json};
use support::{TestNamespace, client, ensure_crd, k8s_env};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn chat() -> Value {
    json!({"model": "sim-llm", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
}

fn policy(upstream: &str, ttft: &str) -> RateLimitPolicy {
    serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": "p"},
        "spec": {"upstream": {"url": upstream}, "defaults": {"ttft": ttft}}
    }))
    .unwrap()
}

/// A namespace with policy `p` (TTFT 30 s) in front of a simulated engine and a gateway
/// process following it under the gateway's identity.
struct Watched {
    gw: Gw,
    _kc: support::TempFile,
    api: Api<RateLimitPolicy>,
    _sim: Sim,
    c: HttpClient,
    ns: TestNamespace,
    k: Client,
}

impl Watched {
    async fn start(prefix: &str) -> Watched {
        let k = client().await;
        ensure_crd(&k).await;
        let ns = TestNamespace::new(&k, prefix).await;
        let c = http_client();
        let sim = Sim::start(&c, &[]).await;
        let api: Api<RateLimitPolicy> = Api::namespaced(k.clone(), &ns.name);
        api.create(&PostParams::default(), &policy(&sim.url, "30s"))
            .await
            .unwrap();
        let (gw, _kc) = support::watched_gateway(&k, &c, &ns.name, "p").await;
        Watched {
            gw,
            _kc,
            api,
            _sim: sim,
            c,
            ns,
            k,
        }
    }
}

/// Restarts kube-apiserver if a test stopped it and failed before starting it again.
struct ApiServerGuard {
    stopped: bool,
}

impl Drop for ApiServerGuard {
    fn drop(&mut self) {
        if self.stopped {
            k8s_env("start-apiserver");
        }
    }
}

#[tokio::test]
async fn an_api_server_outage_fails_no_request_and_the_watch_resyncs() {
    let _serial = SERIAL.lock().await;
    let w = Watched::start("outage").await;
    let (gw, c, ns) = (&w.gw, w.c.clone(), &w.ns);
    gw.wait_metric(&c, "sluice_policy_source_up", &[], 1.0, 10)
        .await;

    // Traffic runs through the whole outage.
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(tokio::sync::Notify::new());
    let traffic = {
        let (c, url, ok, failed, stop) = (
            c.clone(),
            format!("{}/v1/chat/completions", gw.url),
            ok.clone(),
            failed.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let body = chat();
            loop {
                tokio::select! {
                    _ = stop.notified() => return,
                    r = post_json(&c, &url, &body) => {
                        if r.status == 200 { ok.fetch_add(1, Ordering::Relaxed); } else { failed.fetch_add(1, Ordering::Relaxed); }
                    }
                }
            }
        })
    };

    let mut guard = ApiServerGuard { stopped: true };
    k8s_env("stop-apiserver");
    gw.wait_metric(&c, "sluice_policy_source_up", &[], 0.0, 30)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        support::http::get(&c, &format!("{}/readyz", gw.url))
            .await
            .status,
        200,
        "ready during the outage"
    );
    k8s_env("start-apiserver");
    guard.stopped = false;

    // The watch reconnects (backoff) and an edit made after the restart is applied.
    let m = gw
        .wait_metric(&c, "sluice_policy_source_up", &[], 1.0, 60)
        .await;
    assert_eq!(
        metric(
            &m,
            "sluice_policy_reloads_total",
            &[("result", "watch_error")]
        ),
        Some(1.0),
        "one incident, counted once"
    );
    let k = client().await;
    let api: Api<RateLimitPolicy> = Api::namespaced(k.clone(), &ns.name);
    let patch = json!({"spec": {"defaults": {"ttft": "20s"}}});
    api.patch("p", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    gw.wait_metric(&c, "sluice_policy_generation", &[], 2.0, 30)
        .await;

    stop.notify_one();
    traffic.await.unwrap();
    assert!(
        ok.load(Ordering::Relaxed) > 10,
        "too little traffic to show anything"
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the API outage"
    );
}

/// The CRD with its validation removed (spec preserved as-is), as an older or hand-edited CRD
/// would be.
fn permissive_crd() -> CustomResourceDefinition {
    let text = std::fs::read_to_string(format!(
        "{}/crds/ratelimitpolicies.sluice.dev.yaml",
        support::REPO
    ))
    .unwrap();
    let mut crd: Value = serde_yaml::from_str(&text).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"] =
        json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    serde_json::from_value(crd).unwrap()
}

/// Puts the real CRD back when dropped (also when the test fails).
struct RestoreCrd;

impl Drop for RestoreCrd {
    fn drop(&mut self) {
        let path = format!("{}/crds/ratelimitpolicies.sluice.dev.yaml", support::REPO);
        let out = support::kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager",
            "sluice-tests",
            "-f",
            &path,
        ]);
        assert!(
            out.status.success(),
            "restoring the CRD failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn an_invalid_object_that_got_past_the_api_server_keeps_the_last_good_policy() {
    let _serial = SERIAL.lock().await;
    let w = Watched::start("invalid").await;
    let (gw, api, c, k) = (&w.gw, w.api.clone(), w.c.clone(), w.k.clone());
    gw.wait_metric(&c, "sluice_policy_generation", &[], 1.0, 10)
        .await;

    let _restore = RestoreCrd;
    let crds: Api<CustomResourceDefinition> = Api::all(k.clone());
    crds.patch(
        "ratelimitpolicies.sluice.dev",
        &PatchParams::apply("sluice-tests").force(),
        &Patch::Apply(permissive_crd()),
    )
    .await
    .unwrap();
    // A zero TTFT threshold, which the real CRD's CEL rule refuses; retry while the API
    // server's view of the schema catches up.
    let bad = json!({"spec": {"defaults": {"ttft": "0s"}}});
    let mut accepted = false;
    for _ in 0..50 {
        if api
            .patch("p", &PatchParams::default(), &Patch::Merge(&bad))
            .await
            .is_ok()
        {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        accepted,
        "the permissive CRD never accepted the invalid object"
    );

    let m = gw
        .wait_metric(
            &c,
            "sluice_policy_reloads_total",
            &[("result", "error")],
            1.0,
            10,
        )
        .await;
    assert_eq!(
        metric(&m, "sluice_policy_generation", &[]),
        Some(1.0),
        "last good policy kept"
    );
    assert_eq!(
        metric(&m, "sluice_policy_last_reload_successful", &[]),
        Some(0.0)
    );
    assert_eq!(
        support::http::get(&c, &format!("{}/readyz", gw.url))
            .await
            .status,
        200
    );
    let r = post_json(&c, &format!("{}/v1/chat/completions", gw.url), &chat()).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn the_operator_refuses_a_semantically_invalid_policy_and_deploys_nothing() {
    use k8s_openapi::api::apps::v1::Deployment;
    let _serial = SERIAL.lock().await;
    let k = client().await;
    ensure_crd(&k).await;
    let ns = TestNamespace::new(&k, "op-invalid").await;
    let id = support::operator_identity(&k, &ns.name).await;
    let _op = support::ChildProcess::sluice(
        &[
            "operator",
            "--watch-namespaces",
            &ns.name,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[("KUBECONFIG", id.kubeconfig.0.to_str().unwrap())],
    );
    let _restore = RestoreCrd;
    let crds: Api<CustomResourceDefinition> = Api::all(k.clone());
    crds.patch(
        "ratelimitpolicies.sluice.dev",
        &PatchParams::apply("sluice-tests").force(),
        &Patch::Apply(permissive_crd()),
    )
    .await
    .unwrap();
    let api: Api<RateLimitPolicy> = Api::namespaced(k.clone(), &ns.name);
    let bad: RateLimitPolicy = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": "bad"},
        "spec": {"upstream": {"url": "ftp://nowhere"}, "shedding": {"ramp": 0.5}}
    }))
    .unwrap();
    support::eventually(
        10,
        "the permissive CRD accepts the invalid policy",
        || async {
            api.create(&PostParams::default(), &bad)
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    let p = support::eventually(30, "Accepted=False", || async {
        let p = api.get("bad").await.ok()?;
        p.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == "Accepted" && c.status == "False")
            .cloned()
    })
    .await;
    assert_eq!(p.reason, "InvalidSpec");
    assert!(
        p.message.contains("spec.upstream.url") && p.message.contains("spec.shedding.ramp"),
        "{}",
        p.message
    );
    let deployments: Api<Deployment> = Api::namespaced(k.clone(), &ns.name);
    assert!(
        deployments.get_opt("bad-sluice").await.unwrap().is_none(),
        "an invalid policy was deployed"
    );
    // A Warning Event tells kubectl describe users why.
    let events = support::kubectl_ok(&["get", "events", "-n", &ns.name, "-o", "json"]);
    assert!(events.contains("InvalidSpec"), "{events}");
}

#[tokio::test]
async fn the_operator_exits_with_an_instruction_when_the_crd_is_missing() {
    let _serial = SERIAL.lock().await;
    let k = client().await;
    ensure_crd(&k).await;
    let _restore = RestoreCrd;
    let out = support::kubectl(&[
        "delete",
        "crd",
        "ratelimitpolicies.sluice.dev",
        "--wait=true",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kc = support::kubeconfig_path();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["operator", "--metrics-listen", "127.0.0.1:0"])
        .env("KUBECONFIG", &kc)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CRD (ratelimitpolicies.sluice.dev) is not installed")
            && err.contains("sluice crd"),
        "{err}"
    );
}
