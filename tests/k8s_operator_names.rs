//! The operator against a real kube-apiserver with the names users actually give policies
//! (dots, leading digits, the longest names), objects that already exist under the gateway's
//! name, and objects the API server refuses: every valid policy gets its gateway or a status
//! that says why not, and nothing it does not own is touched.

mod support;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use sluice::operator::names::{gateway_name, label_value};
use support::operator::{Env, owned, policy_with, ready_reason};
use support::{eventually, kubectl_ok};

#[tokio::test]
async fn every_valid_policy_name_gets_its_gateway_and_a_status() {
    let fx = Env::new("op-names").await;
    let _op = fx.operator(&[]);
    let names = [
        "llama-3.1-8b".to_owned(),
        "8b-chat".to_owned(),
        "a.b".to_owned(),
        "a-b".to_owned(), // the same as "a.b" after sanitising
        "n".repeat(63),
        "n".repeat(64),
        format!("{}.{}", "m".repeat(126), "m".repeat(126)), // 253 characters
    ];
    for n in &names {
        fx.api
            .create(&PostParams::default(), &policy_with(n, json!({})))
            .await
            .unwrap_or_else(|e| panic!("the API server refused {n}: {e}"));
    }
    for n in &names {
        // No pods run here, so the Deployment is never available: Ready=False, never blank.
        ready_reason(&fx.api, n, "DeploymentNotAvailable").await;
        let p = fx.api.get(n).await.unwrap();
        let uid = p.uid().unwrap();
        let gw = gateway_name(n);
        let svc: Service = owned(&fx.k, &fx.ns.name, &gw).await;
        let dep: Deployment = owned(&fx.k, &fx.ns.name, &gw).await;
        for refs in [svc.owner_references(), dep.owner_references()] {
            assert_eq!(refs[0].uid, uid, "{n}: owner of {gw}");
        }
        assert_eq!(
            svc.labels()["sluice.dev/policy"],
            label_value(n),
            "{n}: label"
        );
        let endpoint = p.status.unwrap().endpoint.unwrap();
        assert!(
            endpoint.starts_with(&format!("http://{gw}.{}.svc:", fx.ns.name)),
            "{n}: endpoint {endpoint}"
        );
    }
    // `kubectl get rlp` shows a value in every READY cell.
    let table = kubectl_ok(&["get", "rlp", "-n", &fx.ns.name, "--no-headers"]);
    assert_eq!(table.lines().count(), names.len(), "{table}");
    for line in table.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&cols[4..6], ["True", "False"], "{line}");
    }
}

#[tokio::test]
async fn an_existing_object_under_the_gateways_name_is_left_alone() {
    let fx = Env::new("op-conflict").await;
    let _op = fx.operator(&[]);
    let services: Api<Service> = Api::namespaced(fx.k.clone(), &fx.ns.name);
    let theirs: Service = serde_json::from_value(json!({
        "metadata": {"name": "c-sluice", "labels": {"team": "search"}},
        "spec": {"ports": [{"port": 7000}], "selector": {"app": "search"}}
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &theirs)
        .await
        .unwrap();
    fx.api
        .create(&PostParams::default(), &policy_with("c", json!({})))
        .await
        .unwrap();
    let message = ready_reason(&fx.api, "c", "NameConflict").await;
    assert!(message.contains("Service c-sluice"), "{message}");
    // The Warning Event is published after the status is written.
    eventually(30, "a NameConflict event", || async {
        let events = kubectl_ok(&["get", "events", "-n", &fx.ns.name]);
        events.contains("NameConflict").then_some(())
    })
    .await;
    let after = services.get("c-sluice").await.unwrap();
    assert!(after.owner_references().is_empty(), "taken over: {after:?}");
    assert_eq!(
        after.labels().get("team").map(String::as_str),
        Some("search")
    );
    assert!(!after.labels().contains_key("sluice.dev/policy"));
    assert_eq!(after.spec.unwrap().ports.unwrap()[0].port, 7000);

    // Deleting the policy collects what it owns, and not the Service.
    let sas: Api<ServiceAccount> = Api::namespaced(fx.k.clone(), &fx.ns.name);
    assert!(sas.get_opt("c-sluice").await.unwrap().is_some());
    fx.api.delete("c", &DeleteParams::default()).await.unwrap();
    eventually(30, "the policy's own objects collected", || async {
        sas.get_opt("c-sluice")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(services.get_opt("c-sluice").await.unwrap().is_some());
}

#[tokio::test]
async fn an_object_the_api_server_refuses_shows_in_status() {
    let fx = Env::new("op-refused").await;
    let _op = fx.operator(&[]);
    // Valid for the CRD's schema (quantities are int-or-string there), refused in a Deployment.
    let bad = policy_with(
        "r",
        json!({"gateway": {"resources": {"limits": {"memory": "lots"}}}}),
    );
    fx.api.create(&PostParams::default(), &bad).await.unwrap();
    let message = ready_reason(&fx.api, "r", "ApplyFailed").await;
    assert!(message.contains("Deployment r-sluice"), "{message}");
    assert!(message.contains("quantities must match"), "{message}");
    let p = fx.api.get("r").await.unwrap();
    let accepted = p
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Accepted")
        .unwrap();
    assert_eq!(accepted.status, "True");
    let wide = kubectl_ok(&["get", "rlp", "r", "-n", &fx.ns.name, "-o", "wide"]);
    assert!(wide.contains("ApplyFailed"), "{wide}");
}

#[tokio::test]
async fn a_policy_runs_only_images_and_placement_the_admin_allows() {
    let fx = Env::new("op-admission").await;
    let _op = fx.operator(&["--allowed-gateway-images", "registry.example/sluice:*"]);
    // Any image of the author's choosing would run with the gateway's identity and Secrets.
    let evil = json!({"gateway": {"image": "attacker.example/shell:latest"}});
    fx.api
        .create(&PostParams::default(), &policy_with("evil", evil))
        .await
        .unwrap();
    let message = ready_reason(&fx.api, "evil", "ImageNotAllowed").await;
    assert!(message.contains("nothing new is deployed"), "{message}");
    let p = fx.api.get("evil").await.unwrap();
    let accepted = support::operator::condition(&p, "Accepted");
    assert_eq!(
        (accepted.status.as_str(), accepted.reason.as_str()),
        ("False", "ImageNotAllowed")
    );
    assert!(
        accepted.message.contains("attacker.example/shell:latest"),
        "{}",
        accepted.message
    );
    // Control-plane placement is the admin's to allow too.
    let placed = json!({"gateway": {"tolerations": [{"operator": "Exists"}],
        "nodeSelector": {"node-role.kubernetes.io/control-plane": ""}}});
    fx.api
        .create(&PostParams::default(), &policy_with("placed", placed))
        .await
        .unwrap();
    ready_reason(&fx.api, "placed", "SchedulingNotAllowed").await;
    // An allowed image is applied; the refused policies got nothing.
    let ok = json!({"gateway": {"image": "registry.example/sluice:1.2"}});
    fx.api
        .create(&PostParams::default(), &policy_with("ok", ok))
        .await
        .unwrap();
    support::operator::accepted(&fx.api, "ok").await;
    let d: Deployment = owned(&fx.k, &fx.ns.name, "ok-sluice").await;
    let pod = d.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        pod.containers[0].image.as_deref(),
        Some("registry.example/sluice:1.2")
    );
    let deployments: Api<Deployment> = Api::namespaced(fx.k.clone(), &fx.ns.name);
    for refused in ["evil-sluice", "placed-sluice"] {
        assert!(
            deployments.get_opt(refused).await.unwrap().is_none(),
            "{refused}"
        );
    }
}

#[tokio::test]
async fn a_policy_named_like_anothers_short_label_selects_only_its_own_pods() {
    use k8s_openapi::api::core::v1::Pod;
    use sluice::operator::objects::POLICY_UID_LABEL;
    let fx = Env::new("op-twins").await;
    let _op = fx.operator(&[]);
    // A name over 63 characters is labelled by a prefix and a hash; the twin is named exactly
    // that label, so both carry the same `sluice.dev/policy` label.
    let long = format!("twin-{}", "x".repeat(70));
    let twin = label_value(&long);
    for n in [&long, &twin] {
        fx.api
            .create(&PostParams::default(), &policy_with(n, json!({})))
            .await
            .unwrap();
    }
    let services: Api<Service> = Api::namespaced(fx.k.clone(), &fx.ns.name);
    let pods: Api<Pod> = Api::namespaced(fx.k.clone(), &fx.ns.name);
    for n in [&long, &twin] {
        ready_reason(&fx.api, n, "DeploymentNotAvailable").await;
        let uid = fx.api.get(n).await.unwrap().uid().unwrap();
        let selector = services
            .get(&gateway_name(n))
            .await
            .unwrap()
            .spec
            .unwrap()
            .selector
            .unwrap();
        assert_eq!(
            selector.get(POLICY_UID_LABEL),
            Some(&uid),
            "{n}: {selector:?}"
        );
        let query: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
        // The replica set controller creates the pod (no kubelet runs it): the Service's
        // selector finds it, and only it, although both policies' pods share the short label.
        let selected = eventually(30, &format!("{n}: the pod of its Service"), || async {
            let list = pods
                .list(&kube::api::ListParams::default().labels(&query.join(",")))
                .await
                .ok()?;
            (!list.items.is_empty()).then_some(list.items)
        })
        .await;
        assert_eq!(selected.len(), 1, "{n}: {selected:?}");
        assert_eq!(selected[0].labels().get(POLICY_UID_LABEL), Some(&uid));
        assert_eq!(selected[0].labels().get("sluice.dev/policy"), Some(&twin));
    }
}

#[tokio::test]
async fn a_deployment_from_before_the_uid_selector_keeps_its_selector_and_gets_the_label() {
    let fx = Env::new("op-legacy").await;
    // The policy and the Deployment an older operator made for it, selected by the short
    // label; the operator starts after them.
    let p = fx
        .api
        .create(&PostParams::default(), &policy_with("old", json!({})))
        .await
        .unwrap();
    let legacy = json!({"app.kubernetes.io/name": "sluice-gateway", "sluice.dev/policy": "old"});
    let owner = json!([{"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "name": "old", "uid": p.uid().unwrap(), "controller": true}]);
    let old: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "old-sluice", "ownerReferences": owner},
        "spec": {"selector": {"matchLabels": legacy}, "template": {
            "metadata": {"labels": legacy},
            "spec": {"containers": [{"name": "gateway", "image": "old"}]}}}
    }))
    .unwrap();
    let deployments: Api<Deployment> = Api::namespaced(fx.k.clone(), &fx.ns.name);
    deployments
        .create(&PostParams::default(), &old)
        .await
        .unwrap();
    let _op = fx.operator(&[]);
    // Applied (an apply that changed the immutable selector would be ApplyFailed).
    ready_reason(&fx.api, "old", "DeploymentNotAvailable").await;
    let d = deployments.get("old-sluice").await.unwrap().spec.unwrap();
    let kept = serde_json::to_value(&d.selector.match_labels).unwrap();
    assert_eq!(kept, legacy, "the selector is immutable and kept");
    let labels = d.template.metadata.unwrap().labels.unwrap();
    let uid = p.uid().unwrap();
    assert_eq!(
        labels.get(sluice::operator::objects::POLICY_UID_LABEL),
        Some(&uid)
    );
    let service: Service = owned(&fx.k, &fx.ns.name, "old-sluice").await;
    let selector = service.spec.unwrap().selector.unwrap();
    assert_eq!(
        selector.get(sluice::operator::objects::POLICY_UID_LABEL),
        Some(&uid)
    );
}
