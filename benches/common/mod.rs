//! Setup shared by the whole-system benchmarks.
#![allow(dead_code)] // each bench uses a different part

#[path = "../../tests/support/process.rs"]
pub mod process;

#[path = "../../tests/support/llama.rs"]
pub mod llama;

pub mod balancer;
pub mod nginx;
pub mod plot;

use process::ChildProcess;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

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

/// A quiet load generator's arguments for `url`: `rate` a second of chat requests for `secs`
/// (Poisson arrivals), `seed`; the benches set what they measure (prompts, outputs, SLOs,
/// limits) with struct update syntax.
pub fn loadgen(url: &str, rate: f64, secs: f64, seed: u64) -> sluice::loadgen::LoadgenArgs {
    sluice::loadgen::LoadgenArgs {
        url: url.into(),
        model: "sim-llm".into(),
        endpoint: sluice::loadgen::Endpoint::Chat,
        api_key: None,
        rate,
        duration: Duration::from_secs_f64(secs),
        schedule: None,
        burstiness: 1.0,
        prompt_chars: (200, 1000),
        output_tokens: (32, 128),
        ttft_slo: Duration::from_secs(1),
        itl_slo: Duration::from_millis(50),
        priority_mix: None,
        honor_retry_after: false,
        max_retries: None,
        max_inflight: None,
        gradient: false,
        metrics_url: None,
        // Requests still waiting after 30 s are misses either way; the client gives up.
        timeout: Duration::from_secs(30),
        seed,
        json: None,
        svg: None,
        quiet: true,
    }
}

/// The engine: 32 batch slots, decode step 6 ms + 0.6 ms per active sequence (25 ms with a
/// full batch), prefill 0.2 ms per prompt token.
pub const ENGINE: &[&str] = &[
    "--max-num-seqs",
    "32",
    "--decode-step-ms",
    "6",
    "--decode-step-ms-per-seq",
    "0.6",
    "--prefill-ms-per-token",
    "0.2",
];

/// A `sluice` child process on 127.0.0.1:0 (its log at warn, plus the line that says where it
/// listens); the URL it serves once it answers `ready_path` with 200.
pub async fn spawn(args: &[&str], what: &str, ready_path: &str) -> (ChildProcess, String) {
    let mut p = ChildProcess::sluice(
        args,
        &[("RUST_LOG", "warn,sluice::sim=info,sluice::gateway=info")],
    );
    let url = format!("http://{}", p.listen_addr(what, 20));
    ready(&mut p, &url, ready_path, 20).await;
    (p, url)
}

/// Waits until `p` answers `ready_path` at `url` with 200 (fails after `secs`, or when the
/// process exits).
pub async fn ready(p: &mut ChildProcess, url: &str, ready_path: &str, secs: u64) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("{} exited early: {status}", p.name);
        }
        let req = hyper::Request::get(format!("{url}{ready_path}"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), client.request(req)).await
            && r.status() == 200
        {
            return;
        }
        assert!(Instant::now() < deadline, "{url} not ready after {secs} s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `sluice gateway` process on 127.0.0.1:0 following the policy file `policy`; the URL it
/// serves once ready.
pub async fn spawn_gateway(policy: &std::path::Path) -> (ChildProcess, String) {
    spawn(
        &[
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--policy-file",
            policy.to_str().expect("utf-8 path"),
        ],
        "gateway",
        "/readyz",
    )
    .await
}
