//! Test support for tests against a real Kubernetes API server (the local control plane of
//! `scripts/k8s-env.sh`, or any cluster named by `SLUICE_TEST_KUBECONFIG`) and for running the
//! `sluice` binary as a child process.
//!
//! Nothing here skips: a test that needs the cluster and does not find it fails, saying what
//! is missing and how to provide it.
#![allow(dead_code, unused_imports)] // each test crate uses a different part

pub mod files;
mod identity;
pub use files::{TempDir, TempFile};
pub use identity::{
    apply_gateway_rbac, client_from, gateway_rbac, impersonating_kubeconfig, watched_gateway,
};
pub mod http;
pub mod inproc;
pub mod llama;
pub mod loadgen;
pub mod metrics;
pub mod operator;
pub mod pods;
mod process;
pub mod relay;

pub use process::ChildProcess;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

const HOW: &str = "run the suite with scripts/test.sh (it starts the local control plane), or \
                   `scripts/k8s-env.sh install && source $(scripts/k8s-env.sh up)` first, or set \
                   SLUICE_TEST_KUBECONFIG to a test cluster's kubeconfig";

/// The kubeconfig of the test cluster. Panics (fails the test) when there is none.
pub fn kubeconfig_path() -> PathBuf {
    let path = std::env::var_os("SLUICE_TEST_KUBECONFIG").unwrap_or_else(|| {
        panic!("SLUICE_TEST_KUBECONFIG is not set: no Kubernetes cluster for this test; {HOW}")
    });
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "SLUICE_TEST_KUBECONFIG={} does not exist; {HOW}",
        path.display()
    );
    path
}

/// A client for the test cluster, checked to answer.
pub async fn client() -> Client {
    let path = kubeconfig_path();
    let kc = Kubeconfig::read_from(&path).expect("readable kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("usable kubeconfig");
    let client = Client::try_from(config).expect("client");
    client.apiserver_version().await.unwrap_or_else(|e| {
        panic!(
            "the API server in {} does not answer: {e}; {HOW}",
            path.display()
        )
    });
    client
}

/// The directory of kubectl, helm and kubeconform built by `scripts/k8s-env.sh install`.
pub fn tool(name: &str) -> PathBuf {
    let dir = std::env::var_os("SLUICE_K8S_BIN")
        .unwrap_or_else(|| panic!("SLUICE_K8S_BIN is not set, so {name} cannot be found; {HOW}"));
    let p = PathBuf::from(dir).join(name);
    assert!(
        p.is_file(),
        "{} is missing; run scripts/k8s-env.sh install",
        p.display()
    );
    p
}

/// Runs kubectl against the test cluster.
pub fn kubectl(args: &[&str]) -> Output {
    Command::new(tool("kubectl"))
        .env("KUBECONFIG", kubeconfig_path())
        .args(args)
        .output()
        .expect("kubectl runs")
}

/// Runs helm against the test cluster and returns stdout; fails the test with stderr when
/// helm fails.
pub fn helm(args: &[&str]) -> String {
    let out = Command::new(tool("helm"))
        .env("KUBECONFIG", kubeconfig_path())
        .args(args)
        .output()
        .unwrap();
    succeeded("helm", args, out)
}

/// The stdout of a tool's run; fails the test with its stderr when it failed.
fn succeeded(tool: &str, args: &[&str], out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{tool} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs kubectl and returns stdout; fails the test with stderr when kubectl fails.
pub fn kubectl_ok(args: &[&str]) -> String {
    succeeded("kubectl", args, kubectl(args))
}

/// Installs (server-side applies) the CRD from `crds/` and waits until it is Established.
pub async fn ensure_crd(client: &Client) {
    let text =
        std::fs::read_to_string(format!("{REPO}/crds/ratelimitpolicies.sluice.dev.yaml")).unwrap();
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).unwrap();
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.metadata.name.clone().unwrap();
    api.patch(
        &name,
        &PatchParams::apply("sluice-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("CRD applies");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = api.get(&name).await.unwrap();
        let established = c
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
        if established {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "CRD {name} not Established after 30s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

static NS_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A namespace of its own for one test, deleted when dropped (also when the test fails).
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub async fn new(client: &Client, prefix: &str) -> Self {
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NS_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let api: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"sluice.dev/test": "true"}}
        }))
        .unwrap();
        api.create(&PostParams::default(), &ns)
            .await
            .expect("namespace created");
        TestNamespace { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Synchronous on purpose: Drop also runs while a failing test unwinds.
        let _ = kubectl(&[
            "delete",
            "namespace",
            &self.name,
            "--wait=false",
            "--ignore-not-found",
        ]);
    }
}

/// Runs `sluice args...` to completion, expecting it to fail; returns its stderr.
pub fn sluice_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .output()
        .expect("sluice runs");
    assert!(
        !out.status.success(),
        "sluice {} succeeded; expected a failure",
        args.join(" ")
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `scripts/k8s-env.sh <command>` against the local control plane (fails the test when
/// the suite runs against an external cluster, whose API server it cannot stop).
pub fn k8s_env(command: &str) {
    assert_eq!(
        std::env::var("SLUICE_K8S_LOCAL").as_deref(),
        Ok("1"),
        "this test stops and restarts kube-apiserver, which needs the local control plane of \
         scripts/k8s-env.sh (SLUICE_K8S_LOCAL=1), not an external cluster"
    );
    let status = Command::new(format!("{REPO}/scripts/k8s-env.sh"))
        .arg(command)
        .status()
        .expect("k8s-env.sh runs");
    assert!(status.success(), "scripts/k8s-env.sh {command} failed");
}

/// An identity with exactly the operator's ClusterRole rules (`charts/sluice/files/operator-rules.yaml`):
/// a ServiceAccount in `namespace` bound to a ClusterRole with those rules; returns an
/// impersonating kubeconfig. The ClusterRoleBinding is deleted when the result is dropped.
pub struct OperatorIdentity {
    pub kubeconfig: TempFile,
    binding: String,
}

impl Drop for OperatorIdentity {
    fn drop(&mut self) {
        let _ = kubectl(&[
            "delete",
            "clusterrolebinding",
            &self.binding,
            "--ignore-not-found",
            "--wait=false",
        ]);
    }
}

pub async fn operator_identity(client: &Client, namespace: &str) -> OperatorIdentity {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    let rules: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(format!("{REPO}/charts/sluice/files/operator-rules.yaml"))
            .unwrap(),
    )
    .unwrap();
    let pp = PatchParams::apply("sluice-tests").force();
    let role: ClusterRole = serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "sluice-operator-test"}, "rules": rules
    }))
    .unwrap();
    Api::<ClusterRole>::all(client.clone())
        .patch("sluice-operator-test", &pp, &Patch::Apply(&role))
        .await
        .unwrap();
    let sa: ServiceAccount = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sluice-operator"}
    }))
    .unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .patch("sluice-operator", &pp, &Patch::Apply(&sa))
        .await
        .unwrap();
    let binding = format!("sluice-operator-{namespace}");
    let crb: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": binding},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "sluice-operator-test"},
        "subjects": [{"kind": "ServiceAccount", "name": "sluice-operator", "namespace": namespace}]
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(&binding, &pp, &Patch::Apply(&crb))
        .await
        .unwrap();
    // Leader election rights only in its own namespace (the chart's Role there).
    let leader_rules: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(format!(
            "{REPO}/charts/sluice/files/operator-leader-rules.yaml"
        ))
        .unwrap(),
    )
    .unwrap();
    let role: Role = serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "sluice-operator-leader-election"}, "rules": leader_rules
    }))
    .unwrap();
    Api::<Role>::namespaced(client.clone(), namespace)
        .patch("sluice-operator-leader-election", &pp, &Patch::Apply(&role))
        .await
        .unwrap();
    let rb: RoleBinding = serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "sluice-operator-leader-election"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sluice-operator-leader-election"},
        "subjects": [{"kind": "ServiceAccount", "name": "sluice-operator", "namespace": namespace}]
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), namespace)
        .patch("sluice-operator-leader-election", &pp, &Patch::Apply(&rb))
        .await
        .unwrap();
    OperatorIdentity {
        kubeconfig: impersonating_kubeconfig(namespace, "sluice-operator"),
        binding,
    }
}

/// Polls `check` every 100 ms until it returns Some, failing with `what` after `secs`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The URL of a port on 127.0.0.1 where nothing listens: connections are refused.
pub fn refused() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}
