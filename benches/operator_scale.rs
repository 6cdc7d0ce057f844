//! Operator at scale: 500 RateLimitPolicies created at once against the local control plane;
//! time until all are Accepted with their Deployments in place, reconciles per second, and
//! the operator process's peak RSS.
//!
//! Needs a cluster: `source "$(scripts/k8s-env.sh up)" && cargo bench --bench operator_scale`.
//! Results: docs/benchmarks.md.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use sluice::policy::RateLimitPolicy;

const POLICIES: usize = 500;

fn main() {
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
        let mut operator = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
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
        futures_util::stream::iter(0..POLICIES)
            .for_each_concurrent(32, |i| {
                let api = api.clone();
                async move {
                    let p: RateLimitPolicy = serde_json::from_value(json!({
                        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
                        "metadata": {"name": format!("p{i:03}")},
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
            if accepted == POLICIES && deps == POLICIES {
                break t0.elapsed();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(600),
                "not converged after 10 min: {accepted} accepted, {deps} deployments"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
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
            reconciles >= POLICIES as f64,
            "counted {reconciles} successful reconciles for {POLICIES} converged policies: \
             sluice_operator_reconciles_total changed its name or labels?\n{metrics}"
        );
        println!(
            "{POLICIES} policies: created in {:.1} s; all Accepted with Deployments after {:.1} s",
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
        let _ = operator.kill();
        let _ = operator.wait();
        let _ = Api::<Namespace>::all(client.clone())
            .delete(&ns, &DeleteParams::default())
            .await;
    });
}
