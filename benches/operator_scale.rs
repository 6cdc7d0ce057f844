//! Operator at scale: 2,000 RateLimitPolicies (`SLUICE_SCALE_policies`) created at once
//! against the local control plane; time until all are Accepted with their Deployments in
//! place, reconciles per second, the operator process's peak RSS, and the API server's
//! requests by verb and resource over the run (`apiserver_request_total`).
//!
//! Needs a cluster: `source "$(scripts/k8s-env.sh up)" && cargo bench --bench operator_scale`.
//! `SLUICE_OPERATOR_BIN` runs another operator binary (an older build, for a comparison in
//! the same session). Results: docs/benchmarks.md.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use sluice::policy::RateLimitPolicy;

/// The API server's `apiserver_request_total` summed by (verb, resource[/subresource]) for
/// the kinds the operator touches.
async fn api_requests(client: &kube::Client) -> std::collections::BTreeMap<(String, String), f64> {
    let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(req).await.unwrap();
    let kinds = [
        "deployments",
        "services",
        "serviceaccounts",
        "roles",
        "rolebindings",
        "poddisruptionbudgets",
        "ratelimitpolicies",
        "secrets",
    ];
    let label = |line: &str, name: &str| {
        let start = line.find(&format!("{name}=\""))? + name.len() + 2;
        let end = line[start..].find('"')? + start;
        Some(line[start..end].to_owned())
    };
    let mut out = std::collections::BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let (Some(verb), Some(resource)) = (label(line, "verb"), label(line, "resource")) else {
            continue;
        };
        if !kinds.contains(&resource.as_str()) || verb == "WATCH" {
            continue;
        }
        let sub = label(line, "subresource").unwrap_or_default();
        let what = if sub.is_empty() {
            resource
        } else {
            format!("{resource}/{sub}")
        };
        let v: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *out.entry((verb, what)).or_insert(0.0) += v;
    }
    out
}

fn main() {
    let policies: usize = std::env::var("SLUICE_SCALE_policies")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let binary = std::env::var("SLUICE_OPERATOR_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_sluice").to_owned());
    let rt = common::runtime();
    rt.block_on(async {
        let (client, path) = common::cluster().await;
        let ns = format!("scale-bench-{}", std::process::id());
        let nsobj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &nsobj)
            .await
            .unwrap();

        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let before = api_requests(&client).await;
        let mut operator = std::process::Command::new(&binary)
            .args([
                "operator",
                "--watch-namespaces",
                &ns,
                "--metrics-listen",
                &format!("127.0.0.1:{port}"),
            ])
            .env("KUBECONFIG", &path)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;

        let api: Api<RateLimitPolicy> = Api::namespaced(client.clone(), &ns);
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        let t0 = Instant::now();
        futures_util::stream::iter(0..policies)
            .for_each_concurrent(32, |i| {
                let api = api.clone();
                async move {
                    let p: RateLimitPolicy = serde_json::from_value(json!({
                        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
                        "metadata": {"name": format!("p{i:04}")},
                        "spec": {"upstream": {"url": "http://vllm.inference.svc:8000"}}
                    }))
                    .unwrap();
                    api.create(&PostParams::default(), &p).await.unwrap();
                }
            })
            .await;
        let created = t0.elapsed();
        let converged = loop {
            let ps = api.list(&ListParams::default()).await.unwrap();
            let accepted = ps
                .items
                .iter()
                .filter(|p| {
                    p.status.as_ref().is_some_and(|s| {
                        s.observed_generation == p.metadata.generation
                            && s.conditions
                                .iter()
                                .any(|c| c.type_ == "Accepted" && c.status == "True")
                    })
                })
                .count();
            let deps = deployments
                .list_metadata(&ListParams::default())
                .await
                .unwrap()
                .items
                .len();
            if accepted == policies && deps == policies {
                break t0.elapsed();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(600),
                "not converged after 10 min: {accepted} accepted, {deps} deployments"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let after = api_requests(&client).await;
        let status = std::fs::read_to_string(format!("/proc/{}/status", operator.id())).unwrap();
        let hwm = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .unwrap()
            .to_owned();
        let metrics = String::from_utf8(
            std::process::Command::new("curl")
                .args(["-s", &format!("http://127.0.0.1:{port}/metrics")])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        // Every series of successful reconciles, whatever other labels it carries (an `error`
        // label joined `result` once, and a lookup of the exact series counted 0 from then on).
        let reconciles: f64 = metrics
            .lines()
            .filter(|l| {
                l.starts_with("sluice_operator_reconciles_total{")
                    && l.contains("result=\"success\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(
            reconciles >= policies as f64,
            "counted {reconciles} successful reconciles for {policies} converged policies: \
             sluice_operator_reconciles_total changed its name or labels?\n{metrics}"
        );
        println!(
            "{policies} policies: created in {:.1} s; all Accepted with Deployments after {:.1} s",
            created.as_secs_f64(),
            converged.as_secs_f64()
        );
        println!(
            "successful reconciles: {reconciles} ({:.0}/s over the convergence time)",
            reconciles / converged.as_secs_f64()
        );
        println!(
            "operator peak RSS: {}",
            hwm.trim_start_matches("VmHWM:").trim()
        );
        println!("operator: {binary}");
        println!("API requests during the run (apiserver_request_total, without watches; POST ratelimitpolicies are the bench's creates, PUT .../status and POST pods/replicasets the controller manager's):");
        for ((verb, what), n) in &after {
            let d = n - before.get(&(verb.clone(), what.clone())).copied().unwrap_or(0.0);
            if d > 0.0 {
                println!("  {verb:<7} {what:<30} {d:>8.0}  ({:.2} per policy)", d / policies as f64);
            }
        }
        let _ = operator.kill();
        let _ = operator.wait();
        let _ = Api::<Namespace>::all(client.clone())
            .delete(&ns, &DeleteParams::default())
            .await;
    });
}
