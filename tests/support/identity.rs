//! Identities for processes under test: a kubeconfig impersonating a ServiceAccount, and the
//! gateway's ServiceAccount and Role as the operator builds them.

use std::sync::atomic::{AtomicU32, Ordering};

use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use super::{TempFile, eventually, http, kubeconfig_path};

/// A kubeconfig for the test cluster that impersonates `system:serviceaccount:<ns>:<sa>` (the
/// admin identity may impersonate), so a process runs with exactly that account's RBAC.
pub fn impersonating_kubeconfig(namespace: &str, service_account: &str) -> TempFile {
    let text = std::fs::read_to_string(kubeconfig_path()).unwrap();
    let mut kc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    for user in kc["users"].as_sequence_mut().expect("users") {
        let u = &mut user["user"];
        u["as"] = format!("system:serviceaccount:{namespace}:{service_account}").into();
        u["as-groups"] = serde_yaml::Value::Sequence(vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{namespace}").into(),
            "system:authenticated".into(),
        ]);
    }
    static N: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "sluice-kc-{}-{}.yaml",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, serde_yaml::to_string(&kc).unwrap()).unwrap();
    TempFile(path)
}

/// A client from a kubeconfig file.
pub async fn client_from(path: &std::path::Path) -> Client {
    let kc = Kubeconfig::read_from(path).unwrap();
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// Server-side applies the gateway's ServiceAccount, Role and RoleBinding (the operator's
/// builders) for `policy` in `namespace`.
pub async fn apply_gateway_rbac(client: &Client, namespace: &str, policy: &str) -> String {
    gateway_rbac(client, namespace, policy, false).await
}

/// The same with the Role of a gateway that `discovers` a Service of its namespace.
pub async fn gateway_rbac(
    client: &Client,
    namespace: &str,
    policy: &str,
    discovers: bool,
) -> String {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    use sluice::operator::objects;
    let pp = PatchParams::apply("sluice-tests").force();
    let name = objects::gateway_name(policy);
    let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    sa.patch(
        &name,
        &pp,
        &Patch::Apply(objects::gateway_service_account(namespace, policy)),
    )
    .await
    .unwrap();
    let role: Api<Role> = Api::namespaced(client.clone(), namespace);
    role.patch(
        &name,
        &pp,
        &Patch::Apply(objects::gateway_role(namespace, policy, discovers)),
    )
    .await
    .unwrap();
    let rb: Api<RoleBinding> = Api::namespaced(client.clone(), namespace);
    rb.patch(
        &name,
        &pp,
        &Patch::Apply(objects::gateway_role_binding(namespace, policy)),
    )
    .await
    .unwrap();
    // RBAC reaches the authorizer's cache a moment after the objects are stored: wait until
    // the API server itself says the gateway may read its policy.
    let user = format!("system:serviceaccount:{namespace}:{name}");
    eventually(10, "the gateway Role in force", || {
        let (client, user) = (client.clone(), user.clone());
        async move {
            use k8s_openapi::api::authorization::v1::{
                ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
            };
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(user),
                    resource_attributes: Some(ResourceAttributes {
                        namespace: Some(namespace.to_owned()),
                        verb: Some("get".into()),
                        group: Some("sluice.dev".into()),
                        resource: Some("ratelimitpolicies".into()),
                        name: Some(policy.to_owned()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let r = Api::<SubjectAccessReview>::all(client)
                .create(&PostParams::default(), &review)
                .await
                .ok()?;
            r.status.is_some_and(|s| s.allowed).then_some(())
        }
    })
    .await;
    name
}

/// A gateway process following `namespace/policy` through the API under exactly the Role the
/// operator gives gateways (impersonating its ServiceAccount). Keep the kubeconfig alive as
/// long as the gateway.
pub async fn watched_gateway(
    k: &Client,
    c: &http::HttpClient,
    namespace: &str,
    policy: &str,
) -> (http::Gw, TempFile) {
    let sa = apply_gateway_rbac(k, namespace, policy).await;
    let kubeconfig = impersonating_kubeconfig(namespace, &sa);
    let gw = http::Gw::start_k8s(c, namespace, policy, &kubeconfig.0).await;
    (gw, kubeconfig)
}
