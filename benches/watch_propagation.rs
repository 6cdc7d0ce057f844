//! Policy propagation through the Kubernetes watch: time from sending a threshold patch until the gateway's policy store has applied that generation (what
//! `sluice_policy_generation` on /metrics shows), over 50 patches.
//!
//! Needs a cluster: run after `source "$(scripts/k8s-env.sh up)"`, as
//! `cargo bench --bench watch_propagation`. Results: docs/benchmarks.md.

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use sluice::policy::RateLimitPolicy;
use sluice::policy::source::PolicyStore;

const PATCHES: usize = 50;

fn main() {
    let rt = common::runtime();
    rt.block_on(async {
        let (client, _) = common::cluster().await;

        let api: Api<RateLimitPolicy> = Api::namespaced(client.clone(), "default");
        let _ = api
            .delete("propagation-bench", &DeleteParams::default())
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let policy: RateLimitPolicy = serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
            "metadata": {"name": "propagation-bench"},
            "spec": {"upstream": {"url": "http://127.0.0.1:9"}}
        }))
        .unwrap();
        api.create(&PostParams::default(), &policy).await.unwrap();

        let store = Arc::new(PolicyStore::new(vec![]));
        let generation = || store.load().map_or(0, |s| s.generation);
        tokio::spawn(sluice::policy::watch::watch_policy(
            client.clone(),
            "default".into(),
            "propagation-bench".into(),
            store.clone(),
        ));
        while generation() != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut delays = Vec::new();
        for i in 0..PATCHES {
            let patch = json!({"spec": {"defaults": {"ttft": format!("{}ms", 500 + i)}}});
            let t = Instant::now();
            let p = api
                .patch(
                    "propagation-bench",
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .unwrap();
            let target = p.metadata.generation.unwrap();
            while generation() < target {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            delays.push(t.elapsed());
        }
        api.delete("propagation-bench", &DeleteParams::default())
            .await
            .unwrap();
        delays.sort();
        let pct = |p: f64| delays[((delays.len() - 1) as f64 * p).round() as usize];
        println!("{PATCHES} patches: patch sent → generation applied");
        println!("| p50 | p99 | max |");
        println!("|---|---|---|");
        println!(
            "| {:.2} ms | {:.2} ms | {:.2} ms |",
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            delays.last().unwrap().as_secs_f64() * 1e3
        );
    });
}
