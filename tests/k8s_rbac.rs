//! The operator's RBAC is least privilege, asserted on a real kube-apiserver: under exactly
//! the chart's rules (`charts/sluice/files/operator-*.yaml`) every right it does not use is
//! refused with 403, and the rights it uses work (the operator's other tests run under the
//! same rules).

mod support;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use sluice::policy::RateLimitPolicy;
use support::operator::{Env, accepted};

fn forbidden<T: std::fmt::Debug>(r: Result<T, kube::Error>, what: &str) {
    match r {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what}: expected 403, got {other:?}"),
    }
}

fn allowed<T: std::fmt::Debug>(r: Result<T, kube::Error>, what: &str) {
    match r {
        Err(kube::Error::Api(s)) if s.code == 403 => panic!("{what}: refused: {s:?}"),
        _ => {}
    }
}

#[tokio::test]
async fn every_right_the_operator_does_not_use_is_refused() {
    let fx = Env::new("rbac").await;
    let _op = fx.operator(&[]);
    let p: RateLimitPolicy = serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": "p"},
        "spec": {"upstream": {"url": "http://vllm.inference.svc:8000"}}
    }))
    .unwrap();
    fx.api.create(&PostParams::default(), &p).await.unwrap();
    accepted(&fx.api, "p").await;

    let me = support::client_from(&fx.id.kubeconfig.0).await;
    let ns = fx.ns.name.as_str();
    let dp = DeleteParams::default();
    let pp = PostParams::default();

    // Owned objects: never replaced or deleted by the operator (apply and GC do that).
    let deployments: Api<Deployment> = Api::namespaced(me.clone(), ns);
    let d = deployments.get("p-sluice").await.unwrap();
    forbidden(
        deployments.replace("p-sluice", &pp, &d).await,
        "update deployments",
    );
    forbidden(
        deployments.delete("p-sluice", &dp).await,
        "delete deployments",
    );
    let services: Api<Service> = Api::namespaced(me.clone(), ns);
    let s = services.get("p-sluice").await.unwrap();
    forbidden(
        services.replace("p-sluice", &pp, &s).await,
        "update services",
    );
    forbidden(services.delete("p-sluice", &dp).await, "delete services");
    let sas: Api<ServiceAccount> = Api::namespaced(me.clone(), ns);
    forbidden(sas.delete("p-sluice", &dp).await, "delete serviceaccounts");
    let roles: Api<Role> = Api::namespaced(me.clone(), ns);
    forbidden(roles.delete("p-sluice", &dp).await, "delete roles");
    let bindings: Api<RoleBinding> = Api::namespaced(me.clone(), ns);
    forbidden(
        bindings.delete("p-sluice", &dp).await,
        "delete rolebindings",
    );

    // Policies: read and watched, status applied; nothing else.
    let policies: Api<RateLimitPolicy> = Api::namespaced(me.clone(), ns);
    allowed(policies.list(&ListParams::default()).await, "list policies");
    let mine = policies.get("p").await.unwrap();
    forbidden(policies.replace("p", &pp, &mine).await, "update policies");
    forbidden(
        policies
            .patch(
                "p",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"mode": "Shadow"}})),
            )
            .await,
        "patch policies",
    );
    forbidden(policies.delete("p", &dp).await, "delete policies");
    forbidden(policies.create(&pp, &mine).await, "create policies");
    forbidden(policies.get_status("p").await, "get policies/status");
    forbidden(
        policies.replace_status("p", &pp, &mine).await,
        "update policies/status",
    );

    // Secrets: one by name (its metadata), never a list.
    let secrets: Api<Secret> = Api::namespaced(me.clone(), ns);
    forbidden(secrets.list(&ListParams::default()).await, "list secrets");
    allowed(secrets.get_metadata_opt("anything").await, "get secrets");

    // EndpointSlices: list and watch only, held to grant them to gateways; never read one by
    // name or written.
    let slices: Api<EndpointSlice> = Api::namespaced(me.clone(), ns);
    allowed(
        slices.list(&ListParams::default()).await,
        "list endpointslices",
    );
    forbidden(slices.get("anything").await, "get endpointslices");
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "s"}, "addressType": "IPv4", "endpoints": []
    }))
    .unwrap();
    forbidden(slices.create(&pp, &slice).await, "create endpointslices");

    // Leases: only in its own namespace.
    let lease: Lease =
        serde_json::from_value(json!({"metadata": {"name": "sluice-operator-rbac-test"}})).unwrap();
    let elsewhere: Api<Lease> = Api::namespaced(me.clone(), "default");
    forbidden(
        elsewhere.create(&pp, &lease).await,
        "create leases in another namespace",
    );
    forbidden(
        elsewhere.get_opt("sluice-operator").await,
        "get leases in another namespace",
    );
    let own: Api<Lease> = Api::namespaced(me.clone(), ns);
    allowed(
        own.create(&pp, &lease).await,
        "create leases in its namespace",
    );
    forbidden(
        own.delete("sluice-operator-rbac-test", &dp).await,
        "delete leases",
    );
}
