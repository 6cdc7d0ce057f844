//! Setup shared by the whole-system benchmarks.
#![allow(dead_code)] // each bench uses a different part

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// A two-worker runtime, the size of the machine the numbers are recorded on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime starts")
}

/// A client for the cluster of `SLUICE_TEST_KUBECONFIG` with the RateLimitPolicy CRD applied,
/// and the kubeconfig's path (for child processes).
pub async fn cluster() -> (kube::Client, String) {
    let path = std::env::var("SLUICE_TEST_KUBECONFIG")
        .expect("SLUICE_TEST_KUBECONFIG: run after `source \"$(scripts/k8s-env.sh up)\"`");
    let kc = Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let crd: CustomResourceDefinition = serde_yaml::from_str(&sluice::policy::crd_yaml()).unwrap();
    Api::<CustomResourceDefinition>::all(client.clone())
        .patch(
            "ratelimitpolicies.sluice.dev",
            &PatchParams::apply("sluice-bench").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
    // Let the API server establish the CRD.
    tokio::time::sleep(Duration::from_secs(1)).await;
    (client, path)
}
