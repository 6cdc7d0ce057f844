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
//! - [`objects`]: builders of the owned objects.
//! - [`leader`]: Lease-based leader election.

pub mod leader;
pub mod objects;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use serde_json::json;

use crate::policy::duration::parse_duration;
use crate::policy::{PolicyConfig, RateLimitPolicy};

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

/// Operator metrics (own registry).
#[derive(Clone)]
pub struct OperatorMetrics {
    registry: Registry,
    pub reconciles: IntCounterVec,
    pub duration: Histogram,
    pub policies: IntGauge,
    pub leader: IntGauge,
}

impl OperatorMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = OperatorMetrics {
            reconciles: IntCounterVec::new(
                Opts::new(
                    "sluice_operator_reconciles_total",
                    "Reconciles by result (success, invalid, error).",
                ),
                &["result"],
            )
            .unwrap(),
            duration: Histogram::with_opts(
                HistogramOpts::new(
                    "sluice_operator_reconcile_duration_seconds",
                    "Time of one reconcile.",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
            )
            .unwrap(),
            policies: IntGauge::new(
                "sluice_operator_policies",
                "RateLimitPolicies the operator watches.",
            )
            .unwrap(),
            leader: IntGauge::new(
                "sluice_operator_leader",
                "1 while this replica leads (or runs without election).",
            )
            .unwrap(),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.reconciles.clone()),
            Box::new(m.duration.clone()),
            Box::new(m.policies.clone()),
            Box::new(m.leader.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("unique metric names");
        }
        m
    }

    fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding");
        String::from_utf8(out).expect("UTF-8")
    }
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// What reconcile needs.
pub struct Context {
    pub client: Client,
    pub gateway_image: String,
    pub recorder: Recorder,
    pub metrics: OperatorMetrics,
    /// Consecutive failures per policy, for the retry backoff.
    pub failures: DashMap<ObjectRef<RateLimitPolicy>, u32>,
}

/// Why a reconcile failed (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("the policy has no namespace")]
    NoNamespace,
    #[error("cannot apply {kind} {name}: {source}")]
    Apply {
        kind: String,
        name: String,
        source: kube::Error,
    },
    #[error("cannot update the policy status: {0}")]
    Status(kube::Error),
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    previous: &[Condition],
) -> Condition {
    let status = if ok { "True" } else { "False" };
    // The transition time only moves when the status does.
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now()));
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time,
    }
}

async fn apply<K>(
    client: &Client,
    ns: &str,
    mut obj: K,
    owner: &OwnerReference,
) -> Result<K, ReconcileError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    obj.meta_mut().owner_references = Some(vec![owner.clone()]);
    let name = obj.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let mut value = serde_json::to_value(&obj).expect("object serializes");
    value["apiVersion"] = json!(K::api_version(&()));
    value["kind"] = json!(K::kind(&()));
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&value),
    )
    .await
    .map_err(|source| ReconcileError::Apply {
        kind: K::kind(&()).to_string(),
        name,
        source,
    })
}

async fn reconcile(
    policy: Arc<RateLimitPolicy>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let start = Instant::now();
    let result = reconcile_policy(&policy, &ctx).await;
    ctx.metrics.duration.observe(start.elapsed().as_secs_f64());
    match &result {
        Ok((_, valid)) => {
            ctx.metrics
                .reconciles
                .with_label_values(&[if *valid { "success" } else { "invalid" }])
                .inc();
            ctx.failures.remove(&ObjectRef::from_obj(&*policy));
        }
        Err(e) => {
            ctx.metrics.reconciles.with_label_values(&["error"]).inc();
            let _ = ctx
                .recorder
                .publish(
                    &Event {
                        type_: EventType::Warning,
                        reason: "ReconcileFailed".into(),
                        note: Some(e.to_string().chars().take(1000).collect()),
                        action: "Reconcile".into(),
                        secondary: None,
                    },
                    &policy.object_ref(&()),
                )
                .await;
        }
    }
    result.map(|(a, _)| a)
}

async fn reconcile_policy(
    policy: &RateLimitPolicy,
    ctx: &Context,
) -> Result<(Action, bool), ReconcileError> {
    let ns = policy.namespace().ok_or(ReconcileError::NoNamespace)?;
    let name = policy.name_any();
    if policy.metadata.deletion_timestamp.is_some() {
        // Being deleted: the garbage collector removes what it owned; re-applying would fight it.
        return Ok((Action::await_change(), true));
    }
    let generation = policy.metadata.generation;
    let previous = policy
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let api: Api<RateLimitPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    let status_pp = PatchParams::apply(FIELD_MANAGER).force();

    let config = match PolicyConfig::try_from(&policy.spec) {
        Ok(c) => c,
        Err(e) => {
            let message = e.to_string();
            tracing::warn!(policy = %format!("{ns}/{name}"), error = %message, "policy not accepted");
            let status = json!({
                "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
                "status": {
                    "observedGeneration": generation,
                    "conditions": [
                        condition("Accepted", false, "InvalidSpec", &message, generation, &previous),
                        condition("Ready", false, "InvalidSpec", "the spec is not valid; nothing is deployed for it", generation, &previous),
                    ],
                }
            });
            let already_reported = previous.iter().any(|c| {
                c.type_ == "Accepted"
                    && c.status == "False"
                    && c.message == message
                    && c.observed_generation == generation
            });
            if already_reported {
                return Ok((Action::await_change(), false));
            }
            api.patch_status(&name, &status_pp, &Patch::Apply(&status))
                .await
                .map_err(ReconcileError::Status)?;
            let _ = ctx
                .recorder
                .publish(
                    &Event {
                        type_: EventType::Warning,
                        reason: "InvalidSpec".into(),
                        note: Some(message.chars().take(1000).collect()),
                        action: "Validate".into(),
                        secondary: None,
                    },
                    &policy.object_ref(&()),
                )
                .await;
            return Ok((Action::await_change(), false));
        }
    };

    let owner = policy
        .controller_owner_ref(&())
        .expect("a stored policy has a name and uid");
    let gateway = policy.spec.gateway.as_ref();
    let port = gateway
        .and_then(|g| g.port)
        .unwrap_or(objects::GATEWAY_PORT);
    let replicas = gateway.and_then(|g| g.replicas).unwrap_or(1);
    let image = gateway
        .and_then(|g| g.image.as_deref())
        .unwrap_or(&ctx.gateway_image);
    let c = &ctx.client;
    apply(c, &ns, objects::gateway_service_account(&ns, &name), &owner).await?;
    apply(c, &ns, objects::gateway_role(&ns, &name), &owner).await?;
    apply(c, &ns, objects::gateway_role_binding(&ns, &name), &owner).await?;
    apply(c, &ns, objects::gateway_service(&ns, &name, port), &owner).await?;
    let deployment = apply(
        c,
        &ns,
        objects::gateway_deployment(&objects::GatewayPodSpec {
            namespace: &ns,
            policy: &name,
            image,
            upstream: &config.upstream.url.to_string(),
            port,
            replicas,
            gateway,
            api_key: config.upstream.api_key_secret.as_ref(),
        }),
        &owner,
    )
    .await?;
    let pdb_name = objects::gateway_name(&name);
    if replicas > 1 {
        apply(c, &ns, objects::gateway_pdb(&ns, &name), &owner).await?;
    } else {
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(c.clone(), &ns);
        match pdbs.delete(&pdb_name, &DeleteParams::default()).await {
            Ok(_) | Err(kube::Error::Api(_)) => {}
            Err(source) => {
                return Err(ReconcileError::Apply {
                    kind: "PodDisruptionBudget".into(),
                    name: pdb_name,
                    source,
                });
            }
        }
    }

    let ds = deployment.status.clone().unwrap_or_default();
    let available = ds.conditions.as_ref().is_some_and(|cs| {
        cs.iter()
            .any(|c| c.type_ == "Available" && c.status == "True")
    });
    let ready_replicas = ds.ready_replicas.unwrap_or(0);
    let ready_message = format!("{ready_replicas}/{replicas} gateway replicas ready");
    let status = json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "status": {
            "observedGeneration": generation,
            "conditions": [
                condition("Accepted", true, "Valid", "the spec is valid", generation, &previous),
                condition("Ready", available, if available { "DeploymentAvailable" } else { "DeploymentNotAvailable" }, &ready_message, generation, &previous),
            ],
            "replicas": ds.replicas.unwrap_or(0),
            "readyReplicas": ready_replicas,
            "endpoint": objects::gateway_endpoint(&ns, &name, port),
        }
    });
    api.patch_status(&name, &status_pp, &Patch::Apply(&status))
        .await
        .map_err(ReconcileError::Status)?;
    Ok((Action::requeue(Duration::from_secs(300)), true))
}

fn error_policy(policy: Arc<RateLimitPolicy>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    let mut n = ctx
        .failures
        .entry(ObjectRef::from_obj(&*policy))
        .or_insert(0);
    *n += 1;
    let delay = Duration::from_millis(500 * 2u64.saturating_pow((*n).min(10)))
        .min(Duration::from_secs(300));
    tracing::warn!(policy = %format!("{}/{}", policy.namespace().unwrap_or_default(), policy.name_any()), %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// One controller over `ns` (or all namespaces); returns its store and the future to run.
fn controller(
    client: &Client,
    ns: Option<&str>,
    concurrency: u16,
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> (
    Store<RateLimitPolicy>,
    futures_util::future::BoxFuture<'static, ()>,
) {
    fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=sluice-operator");
    let c = Controller::new(
        api::<RateLimitPolicy>(client, ns),
        watcher::Config::default(),
    )
    .owns(api::<Deployment>(client, ns), owned.clone())
    .owns(api::<Service>(client, ns), owned.clone())
    .owns(api::<ServiceAccount>(client, ns), owned.clone())
    .owns(api::<Role>(client, ns), owned.clone())
    .owns(api::<RoleBinding>(client, ns), owned.clone())
    .owns(api::<PodDisruptionBudget>(client, ns), owned)
    // Bounded concurrency keeps a burst of policies from flooding the API server; a short
    // debounce folds the burst of events that one reconcile's own writes and the
    // Deployment's status updates cause into one follow-up reconcile.
    .with_config(
        kube::runtime::controller::Config::default()
            .concurrency(concurrency)
            .debounce(Duration::from_millis(500)),
    )
    .graceful_shutdown_on(shutdown);
    let store = c.store();
    let fut = Box::pin(
        c.run(reconcile, error_policy, ctx)
            .for_each(|_| futures_util::future::ready(())),
    );
    (store, fut)
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
    let client = Client::try_default().await.map_err(|e| {
        anyhow::anyhow!("no Kubernetes configuration (in-cluster or KUBECONFIG): {e}")
    })?;
    check_crd(&client, &args.watch_namespaces).await?;
    let metrics = OperatorMetrics::new();
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_else(|_| "sluice".into());
        format!("{}-{}", host.trim(), std::process::id())
    });
    let stores: Arc<std::sync::Mutex<Vec<Store<RateLimitPolicy>>>> = Arc::default();

    // /metrics, /healthz, /readyz.
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.metrics_listen))?;
    {
        let (metrics, stores) = (metrics.clone(), stores.clone());
        let app = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let (metrics, stores) = (metrics.clone(), stores.clone());
                    async move {
                        let n: usize = stores.lock().unwrap().iter().map(|s| s.state().len()).sum();
                        metrics.policies.set(n as i64);
                        metrics.render()
                    }
                }),
            )
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .route("/readyz", axum::routing::get(|| async { "ok" }));
        tokio::spawn(async move { axum::serve(listener, app).await });
    }

    let elector = if args.leader_elect {
        let ns = args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let e = leader::LeaderElector::new(
            Api::<Lease>::namespaced(client.clone(), &ns),
            &args.lease_name,
            &identity,
            args.lease_duration,
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
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(identity.clone()),
            },
        ),
        metrics: metrics.clone(),
        failures: DashMap::new(),
    });
    let stop = Arc::new(tokio::sync::Notify::new());
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
        let stop = stop.clone();
        let (store, fut) = controller(
            &client,
            ns,
            args.max_concurrent_reconciles,
            ctx.clone(),
            async move { stop.notified().await },
        );
        stores.lock().unwrap().push(store);
        runs.push(fut);
    }
    tracing::info!(namespaces = ?args.watch_namespaces, image = %args.gateway_image, "operator reconciling");
    let all = futures_util::future::join_all(runs);
    let lost = async {
        match &elector {
            Some(e) => e.hold().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = all => Ok(()),
        _ = crate::shutdown_signal() => {
            stop.notify_waiters();
            tracing::info!("operator stopping");
            Ok(())
        }
        _ = lost => {
            metrics.leader.set(0);
            anyhow::bail!("lost leadership; exiting so this replica restarts as a candidate")
        }
    }
}
