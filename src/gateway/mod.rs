//! `sluice gateway`: the OpenAI-compatible proxy that measures TTFT and ITL on the streams it
//! relays and sheds new requests when their moving averages cross the policy's thresholds.
//!
//! - [`handlers`]: the request handlers: read and check a request, admit it, forward it.
//! - [`intake`]: taking a request's body in within its size, time and memory limits.
//! - [`admission`]: the admit/shed decision, priorities and the random source.
//! - [`relay`]: forwarding, relaying and measuring streams, unary assembly.
//! - [`measure`]: outcome counting, waiting requests and TTFT/ITL samples.
//! - [`error`]: every answer the gateway gives on its own.
//! - [`assemble`]: unary responses assembled from upstream streams.
//! - [`upstream`]: the pooled upstream client and header rules.
//!
//! Stream framing and token timing live in [`crate::openai`], shared with the load generator.
//!
//! The policy comes from a [`PolicyStore`] fed by a policy source; every request reads the
//! snapshot in force. SIGTERM turns /readyz to 503, keeps serving new requests for
//! `--drain-delay`, then stops accepting, lets in-flight requests finish up to
//! `--drain-timeout`, and exits 0.

pub mod admission;
pub mod api_key;
pub mod assemble;
pub mod body;
pub mod budget;
pub mod client_keys;
pub mod error;
pub mod fair;
pub mod handlers;
pub mod intake;
pub mod measure;
pub mod metrics;
pub mod queue;
pub mod relay;
mod server;
pub mod tenancy;
pub mod unary;
pub mod upstream;

pub use admission::RandomSource;
pub use server::{serve, serve_metrics};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};

use crate::gateway::metrics::GatewayMetrics;
use crate::limiter::{Clock, MonotonicClock};
use crate::policy::config::endpoint_label;
use crate::policy::duration::parse_duration;
use crate::policy::source::{PolicyStore, load_and_poll_file};

/// Command-line configuration of `sluice gateway`: the policy comes from a file
/// (`--policy-file`) or from the Kubernetes API (`--policy NAME`).
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["policy_file", "policy"])))]
pub struct GatewayArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// RateLimitPolicy YAML file; re-read when it changes.
    #[arg(long)]
    pub policy_file: Option<PathBuf>,
    /// Name of the RateLimitPolicy to follow through the Kubernetes API (in-cluster config or
    /// KUBECONFIG); every change applies without a restart.
    #[arg(long)]
    pub policy: Option<String>,
    /// Namespace of `--policy` (default: the pod's namespace, else the kubeconfig's).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
    /// Upstream base URL, overriding the policy's spec.upstream.url and endpoints (http or
    /// https, no user-info: the key goes in --upstream-api-key-file). Repeat it for a fleet of
    /// endpoints, each with its own admission (as spec.upstream.endpoints).
    #[arg(long, value_parser = crate::policy::config::upstream_url)]
    pub upstream: Vec<http::Uri>,
    /// How often the policy file is checked for changes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub reload_interval: Duration,
    /// Longest time in-flight requests may take to finish after SIGTERM (after the drain
    /// delay).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// After SIGTERM, how long /readyz reports 503 while new requests are still accepted and
    /// served, so load balancers stop sending before the listener closes.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain_delay: Duration,
    /// Largest request body accepted (bytes); larger ones get 413.
    #[arg(long, default_value_t = 16 << 20)]
    pub max_body_bytes: usize,
    /// Longest wait for a request's headers, and for the next request on an idle keep-alive
    /// connection; then the connection is closed (slow or idle clients hold nothing longer).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// Longest time to receive a request body; then 408.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub body_read_timeout: Duration,
    /// Serve /metrics on this address only, not on the API port (e.g. a port only the
    /// monitoring network reaches).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Most requests the gateway holds at once (bodies read or being read, streams relayed);
    /// above it new requests get 503 with Retry-After, before their body is read.
    #[arg(long, default_value_t = 1024)]
    pub max_inflight: usize,
    /// Most bytes of request bodies the gateway holds at once (being read, or read and not yet
    /// taken by the upstream); a request whose body would go past it gets 503 with
    /// Retry-After. With the pod's default 1 GiB memory limit, 256 MiB of bodies (at most
    /// twice that in memory while they are read) leaves room for everything else.
    #[arg(long, default_value_t = 256 << 20)]
    pub max_body_memory: usize,
    /// API key sent upstream as `Authorization: Bearer <key>` instead of the client's header
    /// (surrounding whitespace ignored).
    #[arg(long, env = "SLUICE_UPSTREAM_API_KEY", hide_env_values = true)]
    pub upstream_api_key: Option<api_key::SecretString>,
    /// File holding the upstream API key (as the operator mounts it from the policy's
    /// Secret); re-read every --reload-interval, so a rotated key applies without a restart.
    #[arg(
        long,
        env = "SLUICE_UPSTREAM_API_KEY_FILE",
        conflicts_with = "upstream_api_key"
    )]
    pub upstream_api_key_file: Option<PathBuf>,
    /// Directory of client API keys, one file per client (name → key), for policies with
    /// `spec.clientAuth` (the operator mounts the policy's Secret here); re-read every
    /// --reload-interval. Without it, a policy that requires client keys refuses every request.
    #[arg(long, env = "SLUICE_CLIENT_KEYS_DIR")]
    pub client_keys_dir: Option<PathBuf>,
    /// Assemble unary requests from streams only once a one-token probe showed the upstream
    /// streams usage (passing them through until then), so no answer loses its token counts.
    /// `--usage-probe=false` assembles at once, and an upstream whose stream lacks usage
    /// costs that one answer its counts.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub usage_probe: bool,
}

/// Everything a request handler needs.
pub struct Gateway {
    pub store: Arc<PolicyStore>,
    pub metrics: GatewayMetrics,
    /// Connection pools to the upstream (by the policy's pool idle timeout).
    pub pools: upstream::Pools,
    pub clock: Arc<dyn Clock>,
    pub max_body_bytes: usize,
    pub api_key: Arc<api_key::UpstreamKey>,
    /// Whether unary requests are assembled from streams, per upstream.
    pub unary: Arc<unary::UnaryModes>,
    /// The clients' API keys (none known without `--client-keys-dir`).
    pub client_keys: Arc<client_keys::ClientKeys>,
    /// Set on SIGTERM: /readyz turns 503 so load balancers stop sending.
    pub draining: AtomicBool,
    /// Coin flips of the shedding decision and Retry-After jitter.
    pub random: RandomSource,
    /// See [`GatewayOptions::header_read_timeout`].
    pub header_read_timeout: Duration,
    /// See [`GatewayOptions::body_read_timeout`].
    pub body_read_timeout: Duration,
    /// See [`GatewayOptions::drain_delay`].
    pub drain_delay: Duration,
    /// See [`GatewayOptions::max_inflight`].
    pub max_inflight: usize,
    /// Requests held now (see [`measure::InflightPlace`]).
    pub inflight: std::sync::atomic::AtomicUsize,
    /// See [`GatewayOptions::max_body_memory`].
    pub max_body_memory: usize,
    /// The body-memory budget, one permit per KiB.
    pub body_memory: Arc<tokio::sync::Semaphore>,
    /// Requests waiting for room (`spec.queue`).
    pub queue: Arc<queue::AdmissionQueue>,
    /// The tenants' budgets on this pod (`spec.tenants`).
    pub budgets: budget::Budgets,
    /// The tenants' use, for fair shedding.
    pub fair: Arc<fair::FairBook>,
}

/// How a [`Gateway`] is set up apart from its policy, metrics and clock.
#[derive(Debug)]
pub struct GatewayOptions {
    /// Largest request body accepted (bytes).
    pub max_body_bytes: usize,
    /// Sent upstream as `Authorization: Bearer <key>` instead of the client's header.
    pub upstream_api_key: Option<api_key::SecretString>,
    /// Or read from this file (first read here; follow it with [`api_key::follow_key_file`]).
    pub upstream_api_key_file: Option<PathBuf>,
    /// Client API keys, one file per client (first read here; follow it with
    /// [`client_keys::follow_keys_dir`]).
    pub client_keys_dir: Option<PathBuf>,
    pub random: RandomSource,
    /// Longest wait for a request's headers (also the idle keep-alive limit).
    pub header_read_timeout: Duration,
    /// Longest time to receive a request body.
    pub body_read_timeout: Duration,
    /// After shutdown starts, how long new requests are still accepted (readiness already
    /// false).
    pub drain_delay: Duration,
    /// Most requests held at once; more get 503 `overloaded`.
    pub max_inflight: usize,
    /// Most bytes of request bodies held at once; more get 503 `overloaded`.
    pub max_body_memory: usize,
    /// Probe an upstream for usage in streams before assembling unary requests.
    pub usage_probe: bool,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            max_body_bytes: 16 << 20,
            upstream_api_key: None,
            upstream_api_key_file: None,
            client_keys_dir: None,
            random: RandomSource::PerThread,
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(60),
            drain_delay: Duration::ZERO,
            max_inflight: 1024,
            max_body_memory: 256 << 20,
            usage_probe: true,
        }
    }
}

impl Gateway {
    /// A gateway serving the policies of `store`, with its own metrics registry.
    pub fn new(
        store: Arc<PolicyStore>,
        clock: Arc<dyn Clock>,
        options: GatewayOptions,
    ) -> anyhow::Result<Arc<Self>> {
        let unary = Arc::new(unary::UnaryModes::new(options.usage_probe));
        let fair = Arc::new(fair::FairBook::default());
        let metrics =
            GatewayMetrics::new(store.clone(), clock.clone(), unary.clone(), fair.clone());
        let api_key = match (&options.upstream_api_key, &options.upstream_api_key_file) {
            (Some(k), _) => Some(api_key::bearer(&k.0)?),
            (None, Some(path)) => Some(api_key::read_key_file(path)?),
            (None, None) => None,
        };
        let client_keys = match &options.client_keys_dir {
            Some(dir) => client_keys::ClientKeys::load(dir)?,
            None => client_keys::ClientKeys::default(),
        };
        let queue = Arc::new(queue::AdmissionQueue::new(
            store.clone(),
            clock.clone(),
            metrics.queue_depth.clone(),
            metrics.queue_wait.clone(),
        ));
        Ok(Arc::new(Gateway {
            queue,
            budgets: budget::Budgets::default(),
            fair,
            client_keys: Arc::new(client_keys),
            unary,
            store,
            metrics,
            pools: upstream::Pools::new(Duration::from_secs(4))?,
            clock,
            max_body_bytes: options.max_body_bytes,
            api_key: Arc::new(api_key::UpstreamKey::new(api_key)),
            draining: AtomicBool::new(false),
            random: options.random,
            header_read_timeout: options.header_read_timeout,
            body_read_timeout: options.body_read_timeout,
            drain_delay: options.drain_delay,
            max_inflight: options.max_inflight,
            inflight: Default::default(),
            max_body_memory: options.max_body_memory,
            body_memory: Arc::new(tokio::sync::Semaphore::new(
                options.max_body_memory.div_ceil(1024),
            )),
        }))
    }
}

/// The gateway's routes: an allow-list of OpenAI endpoints. Chat and text completions and
/// responses are measured and shed; embeddings and models are passed through (admitted by their
/// `model` when they name one, not measured); every other path is a 404 and never reaches
/// the upstream.
pub fn router(gw: Arc<Gateway>) -> Router {
    api_router(gw.clone()).route("/metrics", get(handlers::metrics).with_state(gw))
}

/// The API routes and probes without `/metrics` (for a separate metrics port).
pub fn api_router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/responses", post(handlers::responses))
        // Passed through, admitted by the body's `model` when there is one, unmeasured.
        .route("/v1/embeddings", post(handlers::passthrough))
        .route("/v1/models", get(handlers::passthrough))
        .route("/v1/models/{id}", get(handlers::passthrough))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(handlers::readyz))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .with_state(gw)
}

/// `sluice gateway`.
pub async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    let labels: Vec<String> = args.upstream.iter().map(endpoint_label).collect();
    if let Some(i) = (1..labels.len()).find(|&i| labels[..i].contains(&labels[i])) {
        anyhow::bail!(
            "--upstream {} is given twice ({}): each host and port may be listed once",
            args.upstream[i],
            labels[i]
        );
    }
    // Following a policy through the API server: its client and namespace.
    let followed = match (&args.policy_file, &args.policy) {
        (None, Some(name)) => {
            let client = kube::Client::try_default().await.map_err(|e| {
                anyhow::anyhow!(
                    "no Kubernetes configuration for --policy (in-cluster or KUBECONFIG): {e}"
                )
            })?;
            let namespace = args
                .namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_owned());
            Some((client, namespace, name))
        }
        _ => None,
    };
    let store = PolicyStore::new(args.upstream.clone()).listening_on(args.listen);
    let store = Arc::new(store.in_namespace(followed.as_ref().map(|(_, ns, _)| ns.clone())));
    let mut kube_client = None;
    if let Some(path) = &args.policy_file {
        let watcher = load_and_poll_file(path.clone(), store.clone(), args.reload_interval).await?;
        tokio::spawn(watcher);
    } else if let Some((client, namespace, name)) = followed {
        tracing::info!(%namespace, policy = %name, "following the RateLimitPolicy through the Kubernetes API");
        kube_client = Some(client.clone());
        tokio::spawn(crate::policy::watch::watch_policy(
            client,
            namespace,
            name.clone(),
            store.clone(),
        ));
    }
    let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::new());
    let gw = Gateway::new(
        store,
        clock,
        GatewayOptions {
            max_body_bytes: args.max_body_bytes,
            upstream_api_key: args.upstream_api_key.clone(),
            upstream_api_key_file: args.upstream_api_key_file.clone(),
            client_keys_dir: args.client_keys_dir.clone(),
            random: RandomSource::PerThread,
            header_read_timeout: args.header_read_timeout,
            body_read_timeout: args.body_read_timeout,
            drain_delay: args.drain_delay,
            max_inflight: args.max_inflight,
            max_body_memory: args.max_body_memory,
            usage_probe: args.usage_probe,
        },
    )?;
    let queue = gw.queue.clone();
    tokio::spawn(crate::signals::scrape::run(
        gw.store.clone(),
        gw.pools.scraper(),
        gw.clock.clone(),
        move || queue.dispatch(),
    ));
    tokio::spawn(crate::discovery::watch::follow(
        kube_client,
        gw.store.clone(),
        gw.clock.clone(),
    ));
    if let Some(path) = &args.upstream_api_key_file {
        tokio::spawn(api_key::follow_key_file(
            path.clone(),
            gw.api_key.clone(),
            args.reload_interval,
        ));
    }
    if let Some(dir) = &args.client_keys_dir {
        tracing::info!(dir = %dir.display(), clients = gw.client_keys.len(), "client API keys loaded");
        tokio::spawn(client_keys::follow_keys_dir(
            dir.clone(),
            gw.client_keys.clone(),
            args.reload_interval,
        ));
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "gateway listening");
    let app = match args.metrics_listen {
        None => router(gw.clone()),
        Some(addr) => {
            // /metrics only on its own port, e.g. one that only the monitoring network reaches.
            let metrics = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
            tracing::info!(addr = %metrics.local_addr()?, "gateway metrics listening");
            let app = Router::new()
                .route("/metrics", get(handlers::metrics))
                .with_state(gw.clone());
            tokio::spawn(serve_metrics(metrics, app, gw.clone()));
            api_router(gw.clone())
        }
    };
    serve(
        listener,
        app,
        gw,
        crate::shutdown_signal(),
        args.drain_timeout,
    )
    .await?;
    tracing::info!("gateway stopped");
    Ok(())
}
