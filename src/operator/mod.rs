//! `sluice operator`: reconciles each RateLimitPolicy into a running, hardened gateway.
//!
//! Per policy it owns (controller owner references, so deletion cascades): a ServiceAccount,
//! a Role and RoleBinding letting the gateway get/list/watch only its own policy, a Service, a
//! Deployment, and a PodDisruptionBudget when `replicas > 1`. Everything is written with
//! server-side apply under one field manager; the controller also watches what it owns, so a
//! hand edit or deletion of an owned object is corrected. The pod template carries only what
//! the pods need to start (image, upstream, port, resources, the policy's name): thresholds,
//! time constants, mode and shedding reach the gateways through their watch, so editing them
//! rolls nothing. Status: `observedGeneration`, conditions `Accepted` (with the validation
//! error) and `Ready` (Deployment available), replica counts and the endpoint; Events on
//! failures. Failed reconciles are retried with exponential backoff per policy.
//!
//! - [`reconcile`]: one reconcile, its context and errors.
//! - [`status`]: the status patches, as pure functions.
//! - [`objects`]: builders of the owned objects; [`names`]: their names and label values.
//! - [`metrics`]: the operator's metrics (its API requests by verb among them).
//! - [`owned`]: the owned objects' watch caches, from which reconcile reads ownership.
//! - `controller`: one controller per watched namespace, with those watches.
//! - [`leader`]: Lease-based leader election (expiry on the observer's clock, renew deadline,
//!   call timeouts, release on shutdown).
//!
//! This module wires them: the controllers, the metrics server ([`app`]) and `run`.

pub mod admission;
mod controller;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod objects;
pub mod owned;
pub mod reconcile;
pub mod secret_use;
pub mod status;

pub use metrics::OperatorMetrics;
pub use reconcile::{Context, ReconcileError};

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::{Api, ListParams};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;

use crate::policy::RateLimitPolicy;
use crate::policy::duration::parse_duration;

/// The field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "sluice-operator";

/// Command-line configuration of `sluice operator`.
#[derive(Debug, Clone, clap::Args)]
pub struct OperatorArgs {
    /// Namespaces to watch, comma-separated (default: all namespaces).
    #[arg(long, value_delimiter = ',')]
    pub watch_namespaces: Vec<String>,
    /// Gateway image for policies that do not set spec.gateway.image.
    #[arg(long, env = "SLUICE_GATEWAY_IMAGE", default_value = concat!("ghcr.io/sluice-dev/sluice:", env!("CARGO_PKG_VERSION")))]
    pub gateway_image: String,
    /// Other images policies may name in spec.gateway.image, comma-separated: exact
    /// references, or prefixes ending in `*` (e.g. `registry.example/sluice:*`). By default a
    /// policy may name only --gateway-image: a policy's author must not run code of their own
    /// choosing with the gateway's identity and Secrets.
    #[arg(long, env = "SLUICE_ALLOWED_GATEWAY_IMAGES", value_delimiter = ',')]
    pub allowed_gateway_images: Vec<String>,
    /// Let policies place their gateway pods with spec.gateway.nodeSelector and tolerations
    /// (off: a policy that sets them is not accepted).
    #[arg(long, env = "SLUICE_ALLOW_GATEWAY_SCHEDULING")]
    pub allow_gateway_scheduling: bool,
    /// Elect a leader on a Lease so several replicas can run; only the leader reconciles.
    #[arg(long)]
    pub leader_elect: bool,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "sluice-operator")]
    pub lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace, else the kubeconfig's).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// How long a leader's claim lasts without renewal.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// This replica's identity in the Lease (default: the pod name, else host name and PID).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8081")]
    pub metrics_listen: SocketAddr,
    /// Reconciles running at once (bounds the load a burst of policies puts on the API server).
    #[arg(long, default_value_t = 16)]
    pub max_concurrent_reconciles: u16,
}

/// How long a stopping operator waits for the reconciles in flight (within the pod's default
/// 30 s termination grace period).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Aborts a background task when dropped (when `run` returns).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the operator's HTTP server reads.
#[derive(Clone)]
pub struct AppState {
    pub metrics: OperatorMetrics,
    /// The controllers' caches of policies (one per watched namespace, or one for all).
    pub stores: Arc<Mutex<Vec<Store<RateLimitPolicy>>>>,
}

/// The operator's `/metrics`, `/healthz` and `/readyz`.
pub fn app(state: AppState) -> axum::Router {
    async fn metrics(axum::extract::State(s): axum::extract::State<AppState>) -> String {
        let n: usize = s
            .stores
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.state().len())
            .sum();
        s.metrics.policies.set(n as i64);
        s.metrics.render()
    }
    axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/readyz", axum::routing::get(|| async { "ok" }))
        .with_state(state)
}

/// Fails with an instruction when the CRD is not installed.
async fn check_crd(client: &Client, namespaces: &[String]) -> anyhow::Result<()> {
    let api: Api<RateLimitPolicy> = match namespaces.first() {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => anyhow::bail!(
            "the RateLimitPolicy CRD (ratelimitpolicies.sluice.dev) is not installed; install it with \
             `sluice crd | kubectl apply --server-side -f -` or the sluice Helm chart, then restart the operator"
        ),
        Err(e) => anyhow::bail!("cannot list RateLimitPolicies: {e}"),
    }
}

/// `sluice operator`.
pub async fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let metrics = OperatorMetrics::new();
    let config = kube::Config::infer().await.map_err(|e| {
        anyhow::anyhow!("no Kubernetes configuration (in-cluster or KUBECONFIG): {e}")
    })?;
    // Every request the operator makes is counted by verb (sluice_operator_api_requests_total).
    let counted = metrics.clone();
    let client = kube::client::ClientBuilder::try_from(config)?
        .with_layer(&tower::util::MapRequestLayer::new(
            move |req: http::Request<kube::client::Body>| {
                counted.api_request(&req);
                req
            },
        ))
        .build();
    check_crd(&client, &args.watch_namespaces).await?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_else(|_| "sluice".into());
        format!("{}-{}", host.trim(), std::process::id())
    });
    let stores: Arc<Mutex<Vec<Store<RateLimitPolicy>>>> = Arc::default();

    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.metrics_listen))?;
    tracing::info!(addr = %listener.local_addr()?, "operator metrics listening");
    let state = AppState {
        metrics: metrics.clone(),
        stores: stores.clone(),
    };
    tokio::spawn(async move { axum::serve(listener, app(state)).await });

    let elector = if args.leader_elect {
        let ns = args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let e = leader::LeaderElector::new(
            Api::<Lease>::namespaced(client.clone(), &ns),
            &args.lease_name,
            &identity,
            leader::Timing::for_lease(args.lease_duration),
            Arc::new(crate::clock::MonotonicClock::new()),
        );
        tokio::select! {
            _ = e.acquire() => {}
            _ = crate::shutdown_signal() => return Ok(()),
        }
        Some(e)
    } else {
        None
    };
    metrics.leader.set(1);

    let ctx = Arc::new(Context {
        client: client.clone(),
        gateway_image: args.gateway_image.clone(),
        admission: admission::PodAdmission {
            default_image: args.gateway_image.clone(),
            allowed_images: args.allowed_gateway_images.clone(),
            allow_scheduling: args.allow_gateway_scheduling,
        },
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(identity.clone()),
            },
        ),
        metrics: metrics.clone(),
        failures: DashMap::new(),
        owners: owned::Owners::default(),
    });
    // A watch, not a Notify: the controllers see the stop even if they poll after it is sent.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut runs = Vec::new();
    let namespaces: Vec<Option<&str>> = if args.watch_namespaces.is_empty() {
        vec![None]
    } else {
        args.watch_namespaces
            .iter()
            .map(|n| Some(n.as_str()))
            .collect()
    };
    for ns in namespaces {
        let mut stopped = stopped.clone();
        let (store, fut) = controller::controller(
            &client,
            ns,
            args.max_concurrent_reconciles,
            ctx.clone(),
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        );
        stores.lock().unwrap().push(store);
        runs.push(fut);
    }
    // Failure counts of deleted policies are dropped against the controllers' stores once a
    // minute (the controller never reconciles a policy that is gone).
    let pruning = tokio::spawn({
        let (ctx, stores) = (ctx.clone(), stores.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let stores = stores.lock().unwrap().clone();
                reconcile::prune_failures(&ctx.failures, |p| {
                    stores.iter().any(|s| s.get(p).is_some())
                });
                ctx.owners.prune();
            }
        }
    });
    let _pruning = AbortOnDrop(pruning);
    tracing::info!(namespaces = ?args.watch_namespaces, image = %args.gateway_image, "operator reconciling");
    let mut all = std::pin::pin!(futures_util::future::join_all(runs));
    // Renews the lease until it is lost (and keeps renewing while a stop drains).
    let mut lost = std::pin::pin!(async {
        match &elector {
            Some(e) => e.hold().await,
            None => std::future::pending().await,
        }
    });
    enum End {
        Done,
        Signal,
        Lost,
    }
    let end = tokio::select! {
        _ = &mut all => End::Done,
        _ = crate::shutdown_signal() => End::Signal,
        _ = &mut lost => End::Lost,
    };
    match end {
        End::Done => Ok(()),
        End::Signal => {
            // The controllers start nothing new and finish the reconciles in flight (a
            // reconcile cut between its writes would leave a status that says Accepted and
            // nothing else); only then is the lease released for the next leader.
            tracing::info!("operator stopping: finishing the reconciles in flight");
            let _ = stop.send(true);
            tokio::select! {
                _ = &mut all => {}
                _ = &mut lost => {
                    metrics.leader.set(0);
                    tracing::warn!("lost leadership while stopping; the reconciles in flight are cancelled");
                    return Ok(());
                }
                _ = tokio::time::sleep(SHUTDOWN_GRACE) => {
                    tracing::warn!(grace = ?SHUTDOWN_GRACE, "reconciles still in flight after the grace period; stopping anyway");
                }
            }
            if let Some(e) = &elector {
                e.release().await;
            }
            tracing::info!("operator stopped");
            Ok(())
        }
        // Another replica may lead already: stop reconciling at once (`all` is dropped on
        // return, cancelling what is in flight).
        End::Lost => {
            metrics.leader.set(0);
            anyhow::bail!("lost leadership; exiting so this replica restarts as a candidate")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn the_app_serves_metrics_with_the_reconcile_labels_and_probes() {
        let state = AppState {
            metrics: OperatorMetrics::new(),
            stores: Arc::default(),
        };
        state.metrics.reconciled("success", "");
        state.metrics.reconciled("error", "Deployment");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app(state)).await });
        let m = get(addr, "/metrics").await;
        assert!(m.starts_with("HTTP/1.1 200"), "{m}");
        assert!(
            m.contains(r#"sluice_operator_reconciles_total{error="Deployment",result="error"} 1"#),
            "{m}"
        );
        assert!(m.contains("sluice_operator_policies 0"), "{m}");
        for probe in ["/healthz", "/readyz"] {
            assert!(get(addr, probe).await.starts_with("HTTP/1.1 200"));
        }
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
