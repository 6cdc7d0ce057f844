//! sluice as real pods, from its own image (`scripts/image.sh`), on the single-node cluster of
//! `scripts/cluster.sh`: `helm install`; the operator pod becomes Ready; a policy and a
//! sim-engine Deployment are applied in a namespace that enforces Pod Security `restricted`;
//! the gateway pods pass their readiness probes; the official `openai` client reaches the
//! gateway Service by its DNS name (CoreDNS); overload is shed; `kubectl patch` applies live;
//! Prometheus finds the pods through Kubernetes service discovery; two replicas share the load;
//! `kubectl rollout restart` under steady load fails no request; the gateways route to each
//! engine pod, discovered from the engine Service's EndpointSlices, and the engine scaled
//! 1 -> 3 -> 1 -> 3 and restarted under steady load fails no request; `helm uninstall` leaves
//! nothing behind.
//!
//! It runs only inside the cluster's network namespace, where pod and Service addresses exist
//! (outside it they would be routed off this machine): scripts/test.sh runs it with
//! `scripts/cluster.sh exec cargo test --test k8s_pods`. Anywhere else it fails at once.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::http::{client as http_client, get, metric};
use support::pods::{
    APPS, SIM_ENGINE, SYSTEM, SteadyLoad, apply, apply_ok, gateway_pods,
    inside_the_cluster_namespace, json_of, llama_pods, openai_by_dns_name, prometheus, ready_pods,
    rollout_status, with_cluster_dns,
};
use support::{REPO, eventually, helm, kubectl, kubectl_ok};
const GATEWAY: &str = "llama-sluice";

#[tokio::test]
async fn helm_install_to_real_pods_to_uninstall() {
    inside_the_cluster_namespace();
    let c = http_client();

    // Namespaces that enforce Pod Security "restricted" through the API server's admission.
    for ns in [SYSTEM, APPS] {
        apply_ok(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{pod-security.kubernetes.io/enforce: restricted}}}}\n"
        ));
    }
    let privileged = apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: privileged, namespace: inference}\nspec:\n  containers:\n  - {name: c, image: ghcr.io/sluice-dev/sluice:dev, securityContext: {privileged: true}}\n",
    );
    let why = String::from_utf8_lossy(&privileged.stderr);
    assert!(
        !privileged.status.success() && why.contains("violates PodSecurity"),
        "a privileged pod was not refused by Pod Security admission: {why}"
    );

    // 1. helm install with the image built here; the operator pod becomes Ready (real probes).
    let chart = format!("{REPO}/charts/sluice");
    helm(&[
        "install",
        "sluice",
        &chart,
        "--namespace",
        SYSTEM,
        "--set",
        "image.tag=dev",
        "--set",
        "image.pullPolicy=Never",
        "--wait",
        "--timeout",
        "120s",
    ]);
    let manifest = helm(&["get", "manifest", "sluice", "--namespace", SYSTEM]);
    kubectl_ok(&[
        "wait",
        "-n",
        SYSTEM,
        "--for=condition=Ready",
        "pod",
        "-l",
        "app.kubernetes.io/name=sluice-operator",
        "--timeout=60s",
    ]);

    // 2. A sim engine, and the example policy pointed at it by its Service name.
    apply_ok(SIM_ENGINE);
    let policy = std::fs::read_to_string(format!("{REPO}/examples/policy.yaml"))
        .unwrap()
        .replace(
            "http://vllm.inference.svc.cluster.local:8000",
            "http://sim-engine.inference.svc.cluster.local:8000",
        );
    apply_ok(&policy);

    // 3. Two gateway pods pass their readiness probes.
    rollout_status("sim-engine", 90);
    eventually(
        60,
        "the operator created the gateway Deployment",
        || async {
            kubectl(&["get", "deployment", GATEWAY, "-n", APPS])
                .status
                .success()
                .then_some(())
        },
    )
    .await;
    rollout_status(GATEWAY, 90);
    let pods = eventually(60, "two Ready gateway pods", || async {
        let p = gateway_pods();
        (p.len() == 2).then_some(p)
    })
    .await;
    let generation =
        json_of(&["get", "deployment", GATEWAY, "-n", APPS])["metadata"]["generation"].clone();
    // Their logs through the API server and the kubelet: the policy came from the API, and the
    // upstream is the sim engine's Service name.
    let logs = kubectl_ok(&["logs", "-n", APPS, &pods[0].0]);
    assert!(
        logs.contains("policy applied") && logs.contains("sim-engine.inference.svc.cluster.local"),
        "{logs}"
    );

    // 4. The official client through the Service, by DNS name (once kube-proxy routes it).
    let service_ip = json_of(&["get", "service", GATEWAY, "-n", APPS])["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_owned();
    let service = format!("http://{service_ip}:8080");
    eventually(30, "the gateway Service routes to a Ready pod", || async {
        (support::http::try_get(&c, &format!("{service}/readyz")).await == Ok(200)).then_some(())
    })
    .await;
    let host = format!("{GATEWAY}.{APPS}.svc.cluster.local");
    eventually(
        30,
        "CoreDNS resolves the gateway Service's name",
        || async {
            let out = with_cluster_dns("getent", &["hosts", &host]);
            String::from_utf8_lossy(&out.stdout)
                .starts_with(&service_ip)
                .then_some(())
        },
    )
    .await;
    let by_name = format!("http://{host}:8080");
    openai_by_dns_name(&by_name, "chat_streaming");
    openai_by_dns_name(&by_name, "chat_unary");

    // 5. Overload (a new stream every 50 ms against two slots) is shed with 429 + Retry-After.
    let shed = support::http::stream_until_shed(&c, &service).await;
    assert!(shed.header("retry-after").is_some());

    // 6. kubectl patch applies live: every pod reports the new threshold, none restarted.
    let patch = r#"[{"op":"replace","path":"/spec/models/1/ttft","value":"1h"}]"#;
    kubectl_ok(&[
        "patch", "rlp", "llama", "-n", APPS, "--type", "json", "-p", patch,
    ]);
    for (name, ip) in &pods {
        eventually(
            30,
            &format!("{name} applied the patched threshold"),
            || async {
                let text = get(&c, &format!("http://{ip}:9090/metrics")).await.text();
                (metric(
                    &text,
                    "sluice_ttft_threshold_seconds",
                    &[("model", "sim-llm")],
                ) == Some(3600.0))
                .then_some(())
            },
        )
        .await;
    }
    assert_eq!(gateway_pods(), pods, "the patch replaced gateway pods");
    assert_eq!(
        json_of(&["get", "deployment", GATEWAY, "-n", APPS])["metadata"]["generation"],
        generation,
        "the patch changed the gateway Deployment (a rollout)"
    );

    // 7. Both replicas serve traffic sent to the Service (kube-proxy spreads connections at
    // random: with only the few connections above, one pod may have had none, so more
    // requests follow, each on a connection of its own, until both have served). Their
    // metrics are on the metrics port only: the API port, which every client reaches, has none.
    let served = |text: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.starts_with("sluice_requests_total{") && l.contains("outcome=\"success\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    for (name, ip) in &pods {
        let api = get(&c, &format!("http://{ip}:8080/metrics")).await;
        assert_eq!(api.status, 404, "{name} serves /metrics on its API port");
    }
    eventually(
        60,
        "both gateway pods served requests sent to the Service",
        || async {
            let mut idle = Vec::new();
            for (name, ip) in &pods {
                let text = get(&c, &format!("http://{ip}:9090/metrics")).await.text();
                if served(&text) < 1.0 {
                    idle.push(name.clone());
                }
            }
            if idle.is_empty() {
                return Some(());
            }
            for _ in 0..5 {
                let fresh = support::http::client();
                let _ = support::http::try_get(&fresh, &format!("{service}/v1/models")).await;
            }
            None
        },
    )
    .await;

    // 8. Prometheus discovers the annotated pods through the API and scrapes them.
    let prom = prometheus().await;
    let up: Value = eventually(
        60,
        "Prometheus scraped 3 pods (2 gateways, the operator)",
        || async {
            let v = get(&c, &format!("http://{}/api/v1/query?query=up", prom.1))
                .await
                .json();
            let r = v["data"]["result"].as_array()?.clone();
            (r.len() >= 3 && r.iter().all(|s| s["value"][1] == "1")).then_some(v)
        },
    )
    .await;
    let scraped: Vec<&str> = up["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["metric"]["pod"].as_str().unwrap())
        .collect();
    for (name, _) in &pods {
        assert!(
            scraped.contains(&name.as_str()),
            "{name} not scraped: {scraped:?}"
        );
    }
    drop(prom);

    // 9. kubectl rollout restart under steady load: no request fails.
    let load = SteadyLoad::start(&c, &service);
    tokio::time::sleep(Duration::from_secs(2)).await;
    kubectl_ok(&[
        "rollout",
        "restart",
        "-n",
        APPS,
        &format!("deployment/{GATEWAY}"),
    ]);
    rollout_status(GATEWAY, 120);
    eventually(60, "the old gateway pods gone", || async {
        (llama_pods().len() == 2).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.until_ok(20, 60).await;
    let seen = load.stop().await;
    let new_pods = gateway_pods();
    assert!(
        new_pods.iter().all(|p| !pods.contains(p)),
        "the restart kept old pods: {new_pods:?}"
    );
    assert!(
        seen.failed.is_empty() && seen.shed == 0,
        "requests failed during the rollout: {:?}, {} shed",
        seen.failed,
        seen.shed
    );

    // 10. The engine as a fleet: the sim engine's Service is in the policy's namespace, so the
    // gateways route to its pods themselves, from its EndpointSlices. Scaled 1 -> 3 -> 1 -> 3
    // and restarted under steady load, no request fails; each pod serves, named in metrics.
    engine_fleet(&c, &new_pods, 1).await;
    let load = SteadyLoad::start(&c, &service);
    for replicas in [3, 1, 3] {
        kubectl_ok(&[
            "scale",
            "-n",
            APPS,
            "deployment/sim-engine",
            &format!("--replicas={replicas}"),
        ]);
        rollout_status("sim-engine", 90);
        engine_fleet(&c, &new_pods, replicas).await;
    }
    eventually(
        60,
        "every engine pod served through the gateways",
        || async {
            let mut routed = std::collections::HashMap::<String, f64>::new();
            for (_, ip) in &new_pods {
                let text = get(&c, &format!("http://{ip}:9090/metrics")).await.text();
                for (engine, _) in ready_pods("app=sim-engine") {
                    let n = metric(
                        &text,
                        "sluice_upstream_requests_total",
                        &[("upstream", &engine)],
                    );
                    *routed.entry(engine).or_default() += n.unwrap_or(0.0);
                }
            }
            (routed.len() == 3 && routed.values().all(|n| *n > 0.0)).then_some(())
        },
    )
    .await;
    kubectl_ok(&["rollout", "restart", "-n", APPS, "deployment/sim-engine"]);
    rollout_status("sim-engine", 120);
    engine_fleet(&c, &new_pods, 3).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Enough answers to prove something (71 in 25 s here, 48 once on a busier machine: a
    // request that met a pod going away took up to 4 s).
    load.until_ok(50, 60).await;
    let seen = load.stop().await;
    assert!(
        seen.failed.is_empty(),
        "requests failed while the engine scaled and restarted: {:?} ({} ok, {} shed, slowest {:?})",
        seen.failed,
        seen.ok,
        seen.shed,
        seen.slowest
    );

    // 11. Delete the policy, then helm uninstall: nothing the chart created is left.
    kubectl_ok(&[
        "delete",
        "rlp",
        "llama",
        "-n",
        APPS,
        "--wait=true",
        "--timeout=60s",
    ]);
    eventually(
        60,
        "the gateway Deployment and pods garbage-collected",
        || async {
            let left = json_of(&[
                "get",
                "deployments,pods",
                "-n",
                APPS,
                "-l",
                "app.kubernetes.io/instance=llama",
            ]);
            left["items"].as_array()?.is_empty().then_some(())
        },
    )
    .await;
    helm(&[
        "uninstall",
        "sluice",
        "--namespace",
        SYSTEM,
        "--wait",
        "--timeout",
        "120s",
    ]);
    for doc in manifest.split("\n---") {
        let Ok(obj) = serde_yaml::from_str::<Value>(doc) else {
            continue;
        };
        let (Some(kind), Some(name)) = (obj["kind"].as_str(), obj["metadata"]["name"].as_str())
        else {
            continue;
        };
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or(SYSTEM);
        let out = kubectl(&[
            "get",
            kind,
            name,
            "-n",
            ns,
            "--ignore-not-found",
            "-o",
            "name",
        ]);
        assert!(
            out.status.success() && out.stdout.is_empty(),
            "helm uninstall left {kind}/{name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    eventually(60, "the operator pod gone", || async {
        json_of(&["get", "pods", "-n", SYSTEM])["items"]
            .as_array()?
            .is_empty()
            .then_some(())
    })
    .await;
}

/// Waits until every gateway pod in `gateways` serves the sim engine's `replicas` Ready pods
/// as its fleet, each under its pod name, from a working EndpointSlice watch.
async fn engine_fleet(
    c: &support::http::HttpClient,
    gateways: &[(String, String)],
    replicas: usize,
) {
    eventually(
        90,
        &format!("every gateway routes to {replicas} engine pods"),
        || async {
            let engines = ready_pods("app=sim-engine");
            if engines.len() != replicas {
                return None;
            }
            for (_, ip) in gateways {
                let text = get(c, &format!("http://{ip}:9090/metrics")).await.text();
                let n = metric(&text, "sluice_upstream_discovered_endpoints", &[]);
                let up = metric(&text, "sluice_upstream_discovery_up", &[]);
                if n != Some(replicas as f64) || up != Some(1.0) {
                    return None;
                }
                for (engine, _) in &engines {
                    metric(&text, "sluice_upstream_up", &[("upstream", engine)])?;
                }
            }
            Some(())
        },
    )
    .await;
}
