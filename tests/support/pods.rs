//! Helpers of tests/k8s_pods.rs: the namespace guard, kubectl and helm against the real-pods
//! cluster, pods' readiness, DNS resolution as a pod does it, Prometheus with Kubernetes
//! discovery.

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

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
    ready_pods("app.kubernetes.io/instance=llama")
}

/// Names and IPs of the Ready pods of the apps namespace matching `selector`, not terminating.
pub fn ready_pods(selector: &str) -> Vec<(String, String)> {
    let pods = json_of(&["get", "pods", "-n", APPS, "-l", selector]);
    pods["items"]
        .as_array()
        .unwrap()
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

/// Two clients sending short chat requests to `url` one after another (20 ms apart) until
/// stopped, counting what came back.
pub struct SteadyLoad {
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<(Vec<String>, Duration)>>,
    pub ok: Arc<AtomicU64>,
    pub shed: Arc<AtomicU64>,
}

/// What a [`SteadyLoad`] saw: answers 200, 429, and every other outcome (5xx, broken).
pub struct LoadResult {
    pub ok: u64,
    pub shed: u64,
    pub failed: Vec<String>,
    /// The longest any one request took.
    pub slowest: Duration,
}

impl SteadyLoad {
    pub fn start(c: &super::http::HttpClient, url: &str) -> SteadyLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, shed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let workers = (0..2)
            .map(|_| {
                let (c, stop, ok, shed) = (c.clone(), stop.clone(), ok.clone(), shed.clone());
                let url = format!("{url}/v1/chat/completions");
                tokio::spawn(async move {
                    let body = serde_json::json!({"model": "sim-llm", "max_tokens": 3,
                        "messages": [{"role": "user", "content": "hi"}]});
                    let (mut failed, mut slowest) = (Vec::new(), Duration::ZERO);
                    while !stop.load(Ordering::SeqCst) {
                        let sent = std::time::Instant::now();
                        let answer = super::http::try_post_json(&c, &url, &body).await;
                        slowest = slowest.max(sent.elapsed());
                        match answer {
                            Ok(200) => ok.fetch_add(1, Ordering::SeqCst),
                            Ok(429) => shed.fetch_add(1, Ordering::SeqCst),
                            other => {
                                failed.push(format!("{other:?}"));
                                0
                            }
                        };
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    (failed, slowest)
                })
            })
            .collect();
        SteadyLoad {
            stop,
            workers,
            ok,
            shed,
        }
    }

    /// Keeps the load on until `n` requests were answered 200 since it started (at most
    /// `secs`): how long the steps under it took varies with the machine, the proof needs
    /// enough answers across them.
    pub async fn until_ok(&self, n: u64, secs: u64) {
        let what = format!("{n} requests answered under the load");
        super::eventually(secs, &what, || async {
            (self.ok.load(Ordering::SeqCst) >= n).then_some(())
        })
        .await;
    }

    pub async fn stop(self) -> LoadResult {
        self.stop.store(true, Ordering::SeqCst);
        let (mut failed, mut slowest) = (Vec::new(), Duration::ZERO);
        for w in self.workers {
            let (f, s) = w.await.unwrap();
            failed.extend(f);
            slowest = slowest.max(s);
        }
        LoadResult {
            ok: self.ok.load(Ordering::SeqCst),
            shed: self.shed.load(Ordering::SeqCst),
            failed,
            slowest,
        }
    }
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
