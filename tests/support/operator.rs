//! The operator as a process in a test namespace under exactly the chart's RBAC rules.

use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use sluice::policy::RateLimitPolicy;

use super::{
    ChildProcess, OperatorIdentity, TestNamespace, client, ensure_crd, eventually,
    operator_identity,
};

/// An operator process and its metrics URL.
pub struct Operator {
    pub process: ChildProcess,
    pub metrics_url: String,
}

/// An operator process for `ns` under `kubeconfig`, its metrics on 127.0.0.1:0.
pub fn start_operator(ns: &str, kubeconfig: &std::path::Path, extra: &[&str]) -> Operator {
    let mut args = vec![
        "operator",
        "--watch-namespaces",
        ns,
        "--metrics-listen",
        "127.0.0.1:0",
        "--gateway-image",
        "example.test/sluice:dev",
    ];
    args.extend_from_slice(extra);
    let mut process = ChildProcess::sluice(
        &args,
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("RUST_LOG", "info"),
        ],
    );
    let addr = process.listen_addr("operator metrics", 30);
    Operator {
        process,
        metrics_url: format!("http://{addr}/metrics"),
    }
}

/// Waits until the operator accepted the current generation of `name` and applied its
/// objects (see [`applied`]).
pub async fn accepted(api: &Api<RateLimitPolicy>, name: &str) -> RateLimitPolicy {
    eventually(30, "policy Accepted=True and applied", || async {
        let p = api.get(name).await.ok()?;
        applied(&p).then_some(p)
    })
    .await
}

/// Whether the status says the current generation is accepted and its objects were applied:
/// `Accepted` is written before the objects, so the `Ready` condition of this generation
/// (with any reason but `Reconciling`) is what follows the apply.
pub fn applied(p: &RateLimitPolicy) -> bool {
    let Some(s) = p.status.as_ref() else {
        return false;
    };
    let current = |c: &&k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition| {
        c.observed_generation == p.metadata.generation
    };
    s.observed_generation == p.metadata.generation
        && s.conditions
            .iter()
            .filter(current)
            .any(|c| c.type_ == "Accepted" && c.status == "True")
        && s.conditions
            .iter()
            .filter(current)
            .any(|c| c.type_ == "Ready" && c.reason != "Reconciling")
}

/// An owned object the operator must have created.
pub async fn owned<K>(k: &Client, ns: &str, name: &str) -> K
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(k.clone(), ns)
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("{} {name}: {e}", K::kind(&())))
}

/// A condition of the policy's status (panics when absent).
pub fn condition<'a>(
    p: &'a RateLimitPolicy,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    p.status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap()
}

/// A test namespace, the operator's identity in it (the chart's rules) and the policies API;
/// fields drop in order: the identity's binding, then the namespace.
pub struct Env {
    pub api: Api<RateLimitPolicy>,
    pub id: OperatorIdentity,
    pub ns: TestNamespace,
    pub k: Client,
}

impl Env {
    pub async fn new(prefix: &str) -> Env {
        let k = client().await;
        ensure_crd(&k).await;
        let ns = TestNamespace::new(&k, prefix).await;
        let id = operator_identity(&k, &ns.name).await;
        let api = Api::namespaced(k.clone(), &ns.name);
        Env { api, id, ns, k }
    }

    /// An operator process for this namespace under the chart's identity.
    pub fn operator(&self, extra: &[&str]) -> Operator {
        start_operator(&self.ns.name, &self.id.kubeconfig.0, extra)
    }

    /// Creates `p` and waits until the operator accepted it.
    pub async fn create(&self, p: &RateLimitPolicy) -> RateLimitPolicy {
        let created = self.api.create(&PostParams::default(), p).await.unwrap();
        accepted(&self.api, &created.name_any()).await;
        created
    }
}

/// The holder of the operator's Lease in `ns`, if any.
pub async fn lease_holder(k: &Client, ns: &str) -> Option<String> {
    Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(k.clone(), ns)
        .get_opt("sluice-operator")
        .await
        .ok()??
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

/// A policy upstream of `http://vllm.inference.svc:8000` with `extra` merged into its spec.
pub fn policy_with(name: &str, extra: serde_json::Value) -> RateLimitPolicy {
    let mut spec = serde_json::json!({"upstream": {"url": "http://vllm.inference.svc:8000"}});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": name}, "spec": spec
    }))
    .unwrap()
}

/// Waits until the policy's Ready condition has `reason`; returns its message.
pub async fn ready_reason(api: &Api<RateLimitPolicy>, name: &str, reason: &str) -> String {
    ready_saying(api, name, reason, "").await
}

/// Waits for `Ready` with this reason and a message containing `says`; returns the message.
pub async fn ready_saying(
    api: &Api<RateLimitPolicy>,
    name: &str,
    reason: &str,
    says: &str,
) -> String {
    eventually(
        30,
        &format!("{name}: Ready reason {reason}, {says:?}"),
        || async {
            let p = api.get(name).await.ok()?;
            let s = p.status.as_ref()?;
            let ready = s.conditions.iter().find(|c| c.type_ == "Ready")?;
            (ready.reason == reason
                && s.observed_generation == p.metadata.generation
                && ready.message.contains(says))
            .then(|| ready.message.clone())
        },
    )
    .await
}
