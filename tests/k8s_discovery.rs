//! Discovery against a real kube-apiserver: a gateway process following a policy that names a
//! Service of its namespace (by its bare name) turns that Service's EndpointSlices into its fleet, under exactly
//! the Role the operator gives it; a Service of another namespace is refused by RBAC and the
//! Service URL is served; the operator grants list/watch on EndpointSlices only for its own
//! namespace, under the chart's rules.
//!
//! The slices are written by hand with addresses of TEST-NET-1 (192.0.2.0/24, documentation
//! only): the API server refuses loopback addresses in EndpointSlices, so nothing is sent to
//! these endpoints here; only answers the gateway gives itself are requested. Traffic over a
//! discovered fleet is tested in `gateway_discovery`.

mod support;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::Role;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use sluice::policy::RateLimitPolicy;
use support::http::{client as http_client, get, metric, post_json};
use support::operator::{Env, owned, policy_with};
use support::{TestNamespace, client, ensure_crd, eventually, gateway_rbac};

fn policy(name: &str, url: &str) -> RateLimitPolicy {
    serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": name},
        "spec": {"upstream": {"url": url}, "models": [{"name": "sim-llm"}]}
    }))
    .unwrap()
}

/// A slice of Service `engine` on port 8000 with (pod, address, ready, terminating).
fn slice(name: &str, endpoints: &[(&str, &str, bool, bool)]) -> EndpointSlice {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(pod, addr, ready, terminating)| {
            json!({"addresses": [addr],
                   "conditions": {"ready": ready, "serving": ready, "terminating": terminating},
                   "targetRef": {"kind": "Pod", "name": pod}})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "engine"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
        "endpoints": eps
    }))
    .unwrap()
}

async fn put(api: &Api<EndpointSlice>, s: &EndpointSlice) {
    let name = s.metadata.name.clone().unwrap();
    let pp = PatchParams::apply("sluice-tests").force();
    api.patch(&name, &pp, &Patch::Apply(s)).await.unwrap();
}

#[tokio::test]
async fn the_services_ready_endpoints_become_the_fleet_under_the_gateways_own_role() {
    let k = client().await;
    ensure_crd(&k).await;
    let ns = TestNamespace::new(&k, "discovery").await;
    let c = http_client();
    // The Service by its bare name: the one of the policy's namespace, as a pod there resolves it.
    let service_url = "http://engine:8000";
    let api: Api<RateLimitPolicy> = Api::namespaced(k.clone(), &ns.name);
    api.create(&PostParams::default(), &policy("p", service_url))
        .await
        .unwrap();
    let sa = gateway_rbac(&k, &ns.name, "p", true).await;
    let kc = support::impersonating_kubeconfig(&ns.name, &sa);
    let gw = support::http::Gw::start_k8s(&c, &ns.name, "p", &kc.0).await;
    let service_label = "engine:8000".to_owned();

    // No slice yet: the Service URL, from a working watch.
    gw.wait_metric(&c, "sluice_upstream_discovery_up", &[], 1.0, 20)
        .await;
    let m = gw
        .wait_metric(
            &c,
            "sluice_upstream_up",
            &[("upstream", &service_label)],
            1.0,
            5,
        )
        .await;
    assert_eq!(
        metric(&m, "sluice_upstream_discovered_endpoints", &[]),
        Some(0.0)
    );

    let slices: Api<EndpointSlice> = Api::namespaced(k.clone(), &ns.name);
    let a = [
        ("engine-0", "192.0.2.10", true, false),
        ("engine-1", "192.0.2.11", true, false),
        ("engine-2", "192.0.2.12", false, false),
        ("engine-3", "192.0.2.13", false, true),
    ];
    put(&slices, &slice("engine-a", &a)).await;
    put(
        &slices,
        &slice("engine-b", &[("engine-4", "192.0.2.14", true, false)]),
    )
    .await;
    // (The discovered count and the fleet's gauges change one after the other: wait for both.)
    let gone = ["engine-2", "engine-3", service_label.as_str()];
    let m = gw
        .wait_metrics(&c, 10, |m| {
            metric(m, "sluice_upstream_discovered_endpoints", &[]) == Some(3.0)
                && (gone.iter())
                    .all(|g| metric(m, "sluice_upstream_up", &[("upstream", g)]).is_none())
        })
        .await;
    for pod in ["engine-0", "engine-1", "engine-4"] {
        assert_eq!(
            metric(&m, "sluice_upstream_up", &[("upstream", pod)]),
            Some(1.0),
            "{m}"
        );
    }
    for gone in gone {
        assert_eq!(
            metric(&m, "sluice_upstream_up", &[("upstream", gone)]),
            None,
            "{m}"
        );
    }

    // engine-1 stops being ready: it leaves the fleet.
    let mut a2 = a;
    a2[1].2 = false;
    put(&slices, &slice("engine-a", &a2)).await;
    let m = gw
        .wait_metrics(&c, 10, |m| {
            metric(m, "sluice_upstream_discovered_endpoints", &[]) == Some(2.0)
                && metric(m, "sluice_upstream_up", &[("upstream", "engine-1")]).is_none()
        })
        .await;
    assert_eq!(
        metric(&m, "sluice_upstream_up", &[("upstream", "engine-0")]),
        Some(1.0)
    );

    // No ready endpoint anywhere: 503 no_endpoints, the gateway itself stays ready.
    put(
        &slices,
        &slice("engine-a", &[("engine-0", "192.0.2.10", false, true)]),
    )
    .await;
    put(&slices, &slice("engine-b", &[])).await;
    gw.wait_metric(&c, "sluice_upstream_discovered_endpoints", &[], 0.0, 10)
        .await;
    let chat = json!({"model": "sim-llm", "messages": [{"role": "user", "content": "hi"}]});
    let r = post_json(&c, &format!("{}/v1/chat/completions", gw.url), &chat).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "no_endpoints");
    assert_eq!(r.headers["retry-after"], "5");
    assert_eq!(get(&c, &format!("{}/readyz", gw.url)).await.status, 200);
    assert_eq!(
        metric(&gw.metrics(&c).await, "sluice_upstream_discovery_up", &[]),
        Some(1.0)
    );

    // Every slice gone (the Service deleted, or made ExternalName): the Service URL again.
    slices
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .unwrap();
    gw.wait_metric(
        &c,
        "sluice_upstream_up",
        &[("upstream", &service_label)],
        1.0,
        10,
    )
    .await;
    // The log line is written after the switch the metric shows: wait for it to be read.
    let logged = eventually(10, "the fallback logged", || async {
        let w = gw.process.warnings();
        w.iter()
            .any(|l| l.contains("has no EndpointSlice"))
            .then_some(())
    });
    logged.await;
    let warned = gw.process.warnings();
    let once = |what: &str| warned.iter().filter(|l| l.contains(what)).count();
    assert_eq!(once("no ready endpoint"), 1, "{warned:#?}");
    assert_eq!(once("has no EndpointSlice"), 1, "{warned:#?}");
}

#[tokio::test]
async fn a_service_in_another_namespace_is_refused_by_rbac_and_its_url_is_served() {
    let k = client().await;
    ensure_crd(&k).await;
    let ns = TestNamespace::new(&k, "discovery-own").await;
    let other = TestNamespace::new(&k, "discovery-other").await;
    let c = http_client();
    let service_url = format!("http://engine.{}.svc:8000", other.name);
    let api: Api<RateLimitPolicy> = Api::namespaced(k.clone(), &ns.name);
    api.create(&PostParams::default(), &policy("p", &service_url))
        .await
        .unwrap();
    let elsewhere: Api<EndpointSlice> = Api::namespaced(k.clone(), &other.name);
    put(
        &elsewhere,
        &slice("engine-a", &[("engine-0", "192.0.2.10", true, false)]),
    )
    .await;
    let sa = gateway_rbac(&k, &ns.name, "p", true).await;
    let kc = support::impersonating_kubeconfig(&ns.name, &sa);

    // The Role: list and watch in its own namespace, nothing elsewhere, nothing more.
    let me = support::client_from(&kc.0).await;
    let own: Api<EndpointSlice> = Api::namespaced(me.clone(), &ns.name);
    own.list(&ListParams::default())
        .await
        .expect("list its own namespace's slices");
    let refused = |r: Result<(), kube::Error>, what: &str| match r {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{what}: {}", s.message),
        other => panic!("{what}: expected 403, got {other:?}"),
    };
    let theirs: Api<EndpointSlice> = Api::namespaced(me.clone(), &other.name);
    refused(
        theirs.list(&ListParams::default()).await.map(|_| ()),
        "list elsewhere",
    );
    refused(own.get("engine-a").await.map(|_| ()), "get");
    let mine = slice("mine", &[]);
    refused(
        own.create(&PostParams::default(), &mine).await.map(|_| ()),
        "create",
    );

    let gw = support::http::Gw::start_k8s(&c, &ns.name, "p", &kc.0).await;
    let label = format!("engine.{}.svc:8000", other.name);
    gw.wait_metric(&c, "sluice_upstream_up", &[("upstream", &label)], 1.0, 20)
        .await;
    let warned = eventually(20, "the refusal logged", || async {
        let w = gw.process.warnings();
        w.iter()
            .any(|l| l.contains("EndpointSlice watch failed"))
            .then_some(())
    });
    warned.await;
    let m = gw.metrics(&c).await;
    assert_eq!(
        metric(&m, "sluice_upstream_discovery_up", &[]),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "sluice_upstream_up", &[("upstream", "engine-0")]),
        None
    );
    // The watch retries with backoff; the incident is one line however long it lasts.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let w = gw.process.warnings();
    let lines: Vec<_> = w
        .iter()
        .filter(|l| l.contains("EndpointSlice watch failed"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("forbidden"), "{}", lines[0]);
}

#[tokio::test]
async fn the_operator_grants_endpointslices_only_for_a_service_of_the_policys_namespace() {
    let fx = Env::new("discovery-rbac").await;
    let _op = fx.operator(&[]);
    let url = format!("http://engine.{}.svc.cluster.local:8000", fx.ns.name);
    fx.create(&policy_with("p", json!({"upstream": {"url": url}})))
        .await;
    let rules = |r: Role| {
        let rules = r.rules.unwrap_or_default();
        rules
            .iter()
            .any(|r| r.resources.as_deref() == Some(&["endpointslices".to_owned()][..]))
    };
    let grants = || async {
        let r: Role = owned(&fx.k, &fx.ns.name, "p-sluice").await;
        rules(r)
    };
    // The policy's status says so: condition Discovery, with the reason when it is False.
    let said = |status: &'static str, reason: &'static str| {
        let api = fx.api.clone();
        async move {
            let p = api.get("p").await.unwrap();
            let conditions = p.status.map(|s| s.conditions).unwrap_or_default();
            let c = conditions.iter().find(|c| c.type_ == "Discovery")?;
            (c.status == status && c.reason == reason).then_some(())
        }
    };
    eventually(30, "the Role grants endpointslices", || async {
        grants().await.then_some(())
    })
    .await;
    eventually(30, "Discovery=True", || said("True", "EndpointSlices")).await;
    // Taken away, then granted again: for the full name, then for the bare one.
    for (upstream, reason, again) in [
        (
            json!({"url": "http://engine.elsewhere.svc:8000"}),
            "OtherNamespace",
            url.as_str(),
        ),
        (
            json!({"url": url, "discovery": "None"}),
            "Disabled",
            "http://engine:8000",
        ),
    ] {
        let patch = json!({"spec": {"upstream": upstream}});
        fx.api
            .patch("p", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        eventually(30, &format!("no endpointslices for {upstream}"), || async {
            (!grants().await).then_some(())
        })
        .await;
        eventually(30, &format!("Discovery=False, {reason}"), || {
            said("False", reason)
        })
        .await;
        let back = json!({"spec": {"upstream": {"url": again, "discovery": "EndpointSlices"}}});
        fx.api
            .patch("p", &PatchParams::default(), &Patch::Merge(&back))
            .await
            .unwrap();
        eventually(30, &format!("granted again for {again}"), || async {
            grants().await.then_some(())
        })
        .await;
        eventually(30, "Discovery=True again", || {
            said("True", "EndpointSlices")
        })
        .await;
    }
}
