//! What the operator asks of the API server, counted by the operator itself
//! (`sluice_operator_api_requests_total{verb}`) on a real kube-apiserver: a resync of an
//! unchanged policy sends no request at all (ownership comes from the watch caches, unchanged
//! objects and status are not written), and an object created first and applied after still
//! loses a field the policy drops.

mod support;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use support::eventually;
use support::http::{client, get, metric};
use support::operator::{Env, owned, policy_with, ready_reason};

/// The operator's requests other than watches, and its successful reconciles.
async fn counts(c: &support::http::HttpClient, url: &str) -> (f64, f64) {
    let m = get(c, url).await.text();
    let requests: f64 = ["get", "list", "create", "patch", "update", "delete"]
        .iter()
        .filter_map(|v| metric(&m, "sluice_operator_api_requests_total", &[("verb", v)]))
        .sum();
    let reconciles = metric(
        &m,
        "sluice_operator_reconciles_total",
        &[("result", "success"), ("error", "")],
    )
    .unwrap_or(0.0);
    (requests, reconciles)
}

#[tokio::test]
async fn an_unchanged_policys_resync_sends_no_request() {
    let fx = Env::new("op-quiet").await;
    let op = fx.operator(&[]);
    let c = client();
    fx.api
        .create(&PostParams::default(), &policy_with("quiet", json!({})))
        .await
        .unwrap();
    ready_reason(&fx.api, "quiet", "DeploymentNotAvailable").await;
    // Each round touches the policy's metadata (a reconcile, with nothing to change) and
    // waits for the reconcile. While the Deployment settles (its status moves as its pod is
    // created) a round may still write the new status; once it has settled, a round sends
    // nothing. Before, every reconcile sent 7 GETs and 7 applies.
    let mut rounds = Vec::new();
    for round in 0..10 {
        let (requests, reconciles) = counts(&c, &op.metrics_url).await;
        let touch = json!({"metadata": {"annotations": {"test/round": round.to_string()}}});
        fx.api
            .patch("quiet", &PatchParams::default(), &Patch::Merge(&touch))
            .await
            .unwrap();
        let after = eventually(30, "the reconcile of the touched policy", || async {
            let (r, n) = counts(&c, &op.metrics_url).await;
            (n > reconciles).then_some(r)
        })
        .await;
        rounds.push(after - requests);
        if after == requests {
            break;
        }
    }
    assert_eq!(
        rounds.last(),
        Some(&0.0),
        "API requests per resync, round by round: {rounds:?}"
    );
}

#[tokio::test]
async fn a_field_the_policy_drops_leaves_the_deployment() {
    let fx = Env::new("op-drop").await;
    let _op = fx.operator(&["--allow-gateway-scheduling"]);
    let spec = json!({"gateway": {"nodeSelector": {"disk": "ssd"}}});
    fx.api
        .create(&PostParams::default(), &policy_with("drop", spec))
        .await
        .unwrap();
    ready_reason(&fx.api, "drop", "DeploymentNotAvailable").await;
    let node_selector = |d: Deployment| d.spec.unwrap().template.spec.unwrap().node_selector;
    let d: Deployment = owned(&fx.k, &fx.ns.name, "drop-sluice").await;
    assert_eq!(
        node_selector(d).and_then(|m| m.get("disk").cloned()),
        Some("ssd".to_owned())
    );
    // The object was created and then applied, so the apply owns the field and a policy
    // without it removes it.
    let drop = json!({"spec": {"gateway": null}});
    fx.api
        .patch("drop", &PatchParams::default(), &Patch::Merge(&drop))
        .await
        .unwrap();
    eventually(30, "the nodeSelector is gone", || async {
        let d: Deployment = owned(&fx.k, &fx.ns.name, "drop-sluice").await;
        node_selector(d).is_none_or(|m| m.is_empty()).then_some(())
    })
    .await;
}
