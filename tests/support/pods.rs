//! Helpers of tests/k8s_pods.rs: the namespace guard, kubectl and helm against the real-pods
//! cluster, pods' readiness, DNS resolution as a pod does it, Prometheus with Kubernetes
//! discovery.

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use super::http::client as http_client;
use super::{ChildProcess, REPO, TempDir, kubeconfig_path, kubectl_ok, tool};

pub const APPS: &str = "inference";
pub const SYSTEM: &str = "sluice-system";

/// The cluster's namespace name; panics unless this process runs inside it.
pub fn inside_the_cluster_namespace() -> String {
    let ns = std::env::var("SLUICE_NETNS").unwrap_or_else(|_| {
        panic!("SLUICE_NETNS is not set: run this test through `scripts/cluster.sh exec` (scripts/test.sh does)")
    });
    let pinned = std::fs::metadata(format!("/run/netns/{ns}")).unwrap_or_else(|e| {
        panic!("network namespace {ns} does not exist ({e}): is the cluster up?")
    });
    let mine = std::fs::metadata("/proc/self/ns/net").unwrap();
    assert_eq!(
        (pinned.dev(), pinned.ino()),
        (mine.dev(), mine.ino()),
        "this test is not inside network namespace {ns}: pod and Service addresses must never be \
         addressed from outside it; run it with `scripts/cluster.sh exec`"
    );
    ns
}

pub fn apply(yaml: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(tool("kubectl"))
        .env("KUBECONFIG", kubeconfig_path())
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

pub fn apply_ok(yaml: &str) {
    let out = apply(yaml);
    assert!(
        out.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn json_of(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&kubectl_ok(&all)).unwrap()
}

/// `kubectl rollout status` of a Deployment in the apps namespace; fails after `secs`.
pub fn rollout_status(deployment: &str, secs: u32) {
    kubectl_ok(&[
        "rollout",
        "status",
        "-n",
        APPS,
        &format!("deployment/{deployment}"),
        &format!("--timeout={secs}s"),
    ]);
}

/// Every pod of the `llama` policy's gateway, terminating ones included.
pub fn llama_pods() -> Vec<Value> {
    let pods = json_of(&[
        "get",
        "pods",
        "-n",
        APPS,
        "-l",
        "app.kubernetes.io/instance=llama",
    ]);
    pods["items"].as_array().unwrap().clone()
}

/// Names and IPs of the Ready gateway pods.
pub fn gateway_pods() -> Vec<(String, String)> {
    llama_pods()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter(|p| {
            p["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        })
        .map(|p| {
            let name = p["metadata"]["name"].as_str().unwrap().to_owned();
            let ip = p["status"]["podIP"].as_str().unwrap_or_default().to_owned();
            (name, ip)
        })
        .collect()
}

pub const SIM_ENGINE: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: sim-engine, namespace: inference}
spec:
  replicas: 1
  selector: {matchLabels: {app: sim-engine}}
  template:
    metadata: {labels: {app: sim-engine}}
    spec:
      securityContext: {runAsNonRoot: true, seccompProfile: {type: RuntimeDefault}}
      containers:
      - name: engine
        image: ghcr.io/sluice-dev/sluice:dev
        imagePullPolicy: Never
        args: [sim-engine, --listen, "0.0.0.0:8000", --max-num-seqs, "2", --decode-step-ms, "15"]
        ports: [{name: http, containerPort: 8000}]
        readinessProbe: {httpGet: {path: /v1/models, port: http}, periodSeconds: 2}
        securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
---
apiVersion: v1
kind: Service
metadata: {name: sim-engine, namespace: inference}
spec:
  selector: {app: sim-engine}
  ports: [{name: http, port: 8000, targetPort: http}]
"#;

/// `command` in a private mount namespace whose /etc/resolv.conf names the cluster's CoreDNS:
/// it resolves Service names as a pod does.
pub fn with_cluster_dns(program: &str, args: &[&str]) -> Output {
    let resolv = std::env::var("SLUICE_CLUSTER_RESOLV_CONF")
        .expect("SLUICE_CLUSTER_RESOLV_CONF (scripts/cluster.sh env)");
    Command::new("unshare")
        .args([
            "--mount",
            "sh",
            "-c",
            "mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"",
        ])
        .arg(&resolv)
        .arg(program)
        .args(args)
        .output()
        .unwrap()
}

/// The official client, resolving the gateway's Service name through the cluster's DNS.
pub fn openai_by_dns_name(base: &str, scenario: &str) {
    let python =
        std::env::var("SLUICE_PYTHON").expect("SLUICE_PYTHON: the venv of tests/requirements.txt");
    let script = format!("{REPO}/tests/openai_client.py");
    let out = with_cluster_dns(&python, &[&script, base, scenario]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai {scenario} via {base}: {}...{}",
        String::from_utf8_lossy(&out.stdout),
        &err[err.len().saturating_sub(1500)..]
    );
}

/// Prometheus with Kubernetes pod discovery (the API server through the admin kubeconfig),
/// keeping pods annotated `prometheus.io/scrape: "true"`; returns it and its listen address.
pub async fn prometheus() -> (ChildProcess, String, TempDir) {
    let dir =
        TempDir(std::env::temp_dir().join(format!("sluice-pods-prom-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let config = dir.0.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            r#"global: {{scrape_interval: 1s}}
scrape_configs:
- job_name: pods
  kubernetes_sd_configs:
  - role: pod
    kubeconfig_file: {kc}
    namespaces: {{names: [{APPS}, {SYSTEM}]}}
  relabel_configs:
  - {{source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape], action: keep, regex: "true"}}
  - source_labels: [__meta_kubernetes_pod_ip, __meta_kubernetes_pod_annotation_prometheus_io_port]
    regex: (.+);(.+)
    replacement: $1:$2
    target_label: __address__
  - {{source_labels: [__meta_kubernetes_pod_name], target_label: pod}}
"#,
            kc = kubeconfig_path().display()
        ),
    )
    .unwrap();
    let listen = "127.0.0.1:9090".to_owned();
    let mut prom = ChildProcess::new(
        // Built by scripts/k8s-env.sh with Kubernetes discovery (Debian's build has none).
        Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        "prometheus".into(),
        None,
    );
    super::http::wait_ok(
        &http_client(),
        &format!("http://{listen}/-/ready"),
        60,
        &mut prom,
    )
    .await;
    (prom, listen, dir)
}
