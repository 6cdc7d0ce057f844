//! The path a user takes, end to end against the local control plane: `helm install` the
//! chart; the operator runs (as a real process) with the chart's ServiceAccount identity;
//! `kubectl apply` the example policy; the gateway (a real process, with the gateway
//! ServiceAccount identity the operator created) fronts a simulated engine; the official
//! `openai` client talks to it; overload is shed with 429; `kubectl patch` changes behaviour
//! without a restart; `/metrics` passes `promtool check metrics` and a real Prometheus server
//! (scraping 127.0.0.1 only) records the gateway's series; `helm uninstall` and deleting the
//! policy clean up.

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, Role, RoleBinding};
use kube::api::Api;
use serde_json::{Value, json};
use sluice::policy::RateLimitPolicy;
use support::http::{Gw, Sim, client as http_client, get, metric, post_json};
use support::{
    ChildProcess, TestNamespace, client, eventually, impersonating_kubeconfig, kubectl, kubectl_ok,
    tool,
};

fn prometheus_bin(name: &str) -> PathBuf {
    let dir = std::env::var("SLUICE_PROMETHEUS_BIN").unwrap_or_else(|_| {
        panic!("SLUICE_PROMETHEUS_BIN is not set: it names the directory of prometheus and promtool (scripts/test.sh unpacks Debian's package)")
    });
    let p = PathBuf::from(dir).join(name);
    assert!(p.is_file(), "{} is missing", p.display());
    p
}

fn run_openai(base: &str, scenario: &str) {
    let python =
        std::env::var("SLUICE_PYTHON").expect("SLUICE_PYTHON: the venv of tests/requirements.txt");
    let out = Command::new(python)
        .arg(format!("{}/tests/openai_client.py", support::REPO))
        .args([base, scenario])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai scenario {scenario}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn helm_install_to_shed_traffic_to_prometheus_to_uninstall() {
    let k = client().await;
    let c = http_client();
    let system = TestNamespace::new(&k, "sluice-system").await;
    let apps = TestNamespace::new(&k, "inference").await;
    let release = format!("sluice-e2e-{}", std::process::id());
    let chart = format!("{}/charts/sluice", support::REPO);

    // 1. helm install (the CRD comes from the chart's crds/ when it is not installed yet).
    let kc = support::kubeconfig_path();
    let notes = support::helm(&[
        "install",
        &release,
        &chart,
        "--namespace",
        &system.name,
        "--wait=false",
    ]);
    assert!(
        notes.contains("kubectl get rlp"),
        "NOTES tell the next command: {notes}"
    );
    let fullname = if release.contains("sluice") {
        release.clone()
    } else {
        format!("{release}-sluice")
    };
    Api::<ServiceAccount>::namespaced(k.clone(), &system.name)
        .get(&fullname)
        .await
        .expect("the chart's ServiceAccount");
    Api::<ClusterRole>::all(k.clone())
        .get(&fullname)
        .await
        .expect("the chart's ClusterRole");
    support::ensure_crd(&k).await;

    // 2. The operator, with the chart's identity.
    let operator_kc = impersonating_kubeconfig(&system.name, &fullname);
    let _operator = ChildProcess::sluice(
        &[
            "operator",
            "--watch-namespaces",
            &apps.name,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[("KUBECONFIG", operator_kc.0.to_str().unwrap())],
    );

    // 3. kubectl apply -f examples/policy.yaml (into this test's namespace).
    let example = std::fs::read_to_string(format!("{}/examples/policy.yaml", support::REPO))
        .unwrap()
        .replace("namespace: inference", &format!("namespace: {}", apps.name));
    let mut apply = Command::new(tool("kubectl"))
        .args(["apply", "-f", "-"])
        .env("KUBECONFIG", &kc)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    apply
        .stdin
        .take()
        .unwrap()
        .write_all(example.as_bytes())
        .unwrap();
    assert!(
        apply.wait().unwrap().success(),
        "kubectl apply of the example policy failed"
    );
    let policies: Api<RateLimitPolicy> = Api::namespaced(k.clone(), &apps.name);
    eventually(30, "example policy Accepted and applied", || async {
        let p = policies.get("llama").await.ok()?;
        support::operator::applied(&p).then_some(())
    })
    .await;
    Api::<Deployment>::namespaced(k.clone(), &apps.name)
        .get("llama-sluice")
        .await
        .expect("gateway Deployment");
    Api::<Service>::namespaced(k.clone(), &apps.name)
        .get("llama-sluice")
        .await
        .expect("gateway Service");
    Api::<Role>::namespaced(k.clone(), &apps.name)
        .get("llama-sluice")
        .await
        .expect("gateway Role");
    Api::<RoleBinding>::namespaced(k.clone(), &apps.name)
        .get("llama-sluice")
        .await
        .expect("gateway RoleBinding");
    let table = kubectl_ok(&["get", "rlp", "-n", &apps.name]);
    assert!(table.contains("llama") && table.contains("True"), "{table}");

    // 4. A gateway with the gateway identity in front of a simulated engine (two slots).
    let sim = Sim::batch(&c, 2, 15).await;
    let gw_kc = impersonating_kubeconfig(&apps.name, "llama-sluice");
    let mut gw_process = ChildProcess::sluice(
        &[
            "gateway",
            "--policy",
            "llama",
            "--namespace",
            &apps.name,
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &sim.url,
        ],
        &[("KUBECONFIG", gw_kc.0.to_str().unwrap())],
    );
    let gw_addr = gw_process.listen_addr("gateway", 30);
    let port = gw_addr.port();
    let gw_url = format!("http://{gw_addr}");
    support::http::wait_ok(&c, &format!("{gw_url}/readyz"), 30, &mut gw_process).await;
    let gw = Gw {
        process: gw_process,
        url: gw_url.clone(),
    };

    // 5. The official client works through it.
    run_openai(&gw.url, "chat_streaming");
    run_openai(&gw.url, "chat_unary");

    // 6. Prometheus scrapes the gateway (127.0.0.1 only).
    // Removed when the guard drops, after Prometheus (declared later) has stopped.
    let prom_dir =
        support::TempDir(std::env::temp_dir().join(format!("sluice-prom-{}", std::process::id())));
    let tmp = prom_dir.0.clone();
    std::fs::create_dir_all(&tmp).unwrap();
    let config = tmp.join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global: {{scrape_interval: 1s}}\nscrape_configs:\n- job_name: sluice-gateway\n  static_configs:\n  - targets: ['127.0.0.1:{port}']\n"),
    )
    .unwrap();
    // Prometheus does not report the port it was given, so this one is bound and released
    // (the only such port left in the suite).
    let prom_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let prom_listen = format!("127.0.0.1:{prom_port}");
    let mut prom = ChildProcess::new(
        Command::new(prometheus_bin("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                tmp.join("data").display()
            ))
            .arg(format!("--web.listen-address={prom_listen}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        "prometheus".into(),
        None,
    );
    support::http::wait_ok(&c, &format!("http://{prom_listen}/-/ready"), 60, &mut prom).await;

    // 7. Overload: a new stream every 50 ms (20 req/s) against two batch slots that serve
    // about 4 req/s → 429s once the queue shows. (With nothing in flight nothing is shed, so
    // requests one at a time would never see one.)
    let one = json!({"model": "sim-llm", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]});
    let shed = support::http::stream_until_shed(&c, &gw.url).await;
    assert!(shed.header("retry-after").is_some());

    // 8. kubectl patch the threshold (sim-llm's TTFT to 1h): admitted again, no restart.
    let patch = r#"[{"op":"replace","path":"/spec/models/1/ttft","value":"1h"}]"#;
    kubectl_ok(&[
        "patch", "rlp", "llama", "-n", &apps.name, "--type", "json", "-p", patch,
    ]);
    gw.wait_metric(
        &c,
        "sluice_ttft_threshold_seconds",
        &[("model", "sim-llm")],
        3600.0,
        30,
    )
    .await;
    // The shedding integral carries over the reload (a patch does not reopen the gate at
    // once); with the pressure now near 0 it winds down within ~1.5 τ (τ = 2 s here).
    eventually(20, "admitted after the threshold was raised", || async {
        let r = post_json(&c, &format!("{}/v1/chat/completions", gw.url), &one).await;
        (r.status == 200).then_some(())
    })
    .await;
    gw.wait_metric(
        &c,
        "sluice_reject_probability",
        &[("model", "sim-llm")],
        0.0,
        20,
    )
    .await;

    // 9. /metrics passes promtool, and Prometheus has recorded the series.
    let text = gw.metrics(&c).await;
    let mut promtool = Command::new(prometheus_bin("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        metric(
            &text,
            "sluice_requests_total",
            &[
                ("model", "sim-llm"),
                ("endpoint", "chat_completions"),
                ("stream", "true"),
                ("outcome", "rejected")
            ]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    let query = format!(
        "http://{prom_listen}/api/v1/query?query=sluice_requests_total%7Boutcome%3D%22rejected%22%7D"
    );
    let series: Value = eventually(30, "Prometheus recorded sluice_requests_total", || async {
        let v = get(&c, &query).await.json();
        (!v["data"]["result"].as_array()?.is_empty()).then_some(v)
    })
    .await;
    assert_eq!(
        series["data"]["result"][0]["metric"]["job"],
        "sluice-gateway"
    );
    let up = get(
        &c,
        &format!("http://{prom_listen}/api/v1/query?query=sluice_ttft_ema_seconds"),
    )
    .await
    .json();
    assert!(!up["data"]["result"].as_array().unwrap().is_empty(), "{up}");

    // 10. Clean up the way a user would.
    let out = kubectl(&["delete", "rlp", "llama", "-n", &apps.name, "--wait=true"]);
    assert!(out.status.success());
    eventually(60, "gateway objects garbage-collected", || async {
        Api::<Deployment>::namespaced(k.clone(), &apps.name)
            .get_opt("llama-sluice")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    support::helm(&["uninstall", &release, "--namespace", &system.name]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Api::<ClusterRole>::all(k.clone())
        .get_opt(&fullname)
        .await
        .unwrap()
        .is_some()
    {
        assert!(
            Instant::now() < deadline,
            "helm uninstall left the ClusterRole"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        Api::<ServiceAccount>::namespaced(k.clone(), &system.name)
            .get_opt(&fullname)
            .await
            .unwrap()
            .is_none()
    );
    drop(prom);
}
