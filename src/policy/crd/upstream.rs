//! Where the gateway forwards to (`spec.upstream`).

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::super::duration::DURATION_PATTERN;
use super::{SecretKeyRef, default_true};

/// The inference server behind the gateway.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamSpec {
    /// Base URL of the OpenAI-compatible server, e.g. `http://vllm.inference.svc:8000`
    /// (requests to `/v1/...` are forwarded to `<url>/v1/...`).
    /// No `user:password@`: the upstream's key belongs in `apiKeySecretRef`.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''").message("must be an http:// or https:// URL with a host"))]
    #[x_kube(validation = Rule::new("!self.matches('^[^:/?#]+://[^/?#]*@')").message("must not carry credentials (user:password@); put the upstream's key in upstream.apiKeySecretRef"))]
    pub url: String,

    /// The engine's replicas, for a gateway that routes to each one itself: base URLs like
    /// `url`'s, one per replica (`http://10.0.0.5:8000`), at most 64, each host and port once.
    /// With a list, the requests go to these endpoints, and not to `url`. Each endpoint has
    /// its own latency averages and admission; a request goes to one with room and is shed
    /// only when all of them are over (see "A fleet of endpoints" in docs/gateway.md). An
    /// upstream key is sent to every endpoint: the Secret's `sluice.dev/upstream-hosts` must
    /// list each host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 2048)))]
    #[x_kube(validation = Rule::new("self.all(u, isURL(u) && url(u).getScheme() in ['http', 'https'] && url(u).getHostname() != '')").message("each endpoint must be an http:// or https:// URL with a host"))]
    #[x_kube(validation = Rule::new("self.all(u, !u.matches('^[^:/?#]+://[^/?#]*@'))").message("endpoints must not carry credentials (user:password@); put the upstream's key in upstream.apiKeySecretRef"))]
    pub endpoints: Vec<String>,

    /// How the gateway finds the engine's replicas when `url` names a Service of the cluster
    /// (`http://<service>.<namespace>.svc[.cluster.local][:port]`): EndpointSlices (the
    /// default) follows the Service's ready, not terminating endpoints and routes to each pod
    /// itself, as with `endpoints`; None sends everything to `url` (an external host, or a
    /// mesh that must see one Service). The gateway needs list/watch on endpointslices in the
    /// Service's namespace: the operator grants it when that is the policy's namespace.
    #[serde(default, skip_serializing_if = "is_default")]
    pub discovery: DiscoverySpec,

    /// The name of the Service port to discover (EndpointSlice ports are named after the
    /// Service's): needed only for a Service with several ports whose target port is not the
    /// URL's port. Without it, the port equal to the URL's, else the Service's only port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("must be a Service port name: lowercase letters, digits and '-'"))]
    pub port_name: Option<String>,

    /// Read each endpoint's own queue from its metrics page (vLLM, SGLang, llama.cpp with
    /// `--metrics`, TGI, TensorRT-LLM): waiting and running requests and KV-cache use,
    /// exported per endpoint as sluice_engine_*. While an engine reports requests waiting
    /// (or KV-cache use at 95 % or more), no request is admitted to it past the batch it runs.
    /// A page that cannot be read or parsed, or a reading older than three intervals, is
    /// ignored (fail open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_metrics: Option<EngineMetricsSpec>,

    /// Longest time a request may take upstream (whole stream included) before the gateway
    /// answers 504. Gateway API duration format.
    #[serde(default = "default_upstream_timeout")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("must be greater than 0"))]
    pub timeout: String,

    /// Secret key holding an API key the gateway sends upstream as `Authorization: Bearer`,
    /// replacing the client's header. Without it the client's header is forwarded. The
    /// Secret must opt in with the annotations `sluice.dev/upstream-key-for:
    /// <policy>/<key>` and `sluice.dev/upstream-hosts` listing the URL's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<SecretKeyRef>,

    /// Ask the upstream for a stream even when the client asked for a unary response, and
    /// assemble the unary response in the gateway, so unary traffic yields TTFT and ITL
    /// samples too. Turn off for upstreams that cannot stream: unary requests are then
    /// relayed as they are and give the limiter no samples (they are still admitted or shed
    /// by what streamed traffic measured; their duration is only recorded in
    /// sluice_request_duration_seconds).
    #[serde(default = "default_true")]
    pub stream_unary: bool,

    /// How long an idle connection to the upstream is kept for reuse. Keep it under the
    /// server's own keep-alive timeout (uvicorn, under vLLM and llama-cpp-python, closes idle
    /// connections after 5 s), or a request can be sent on a connection the server is closing.
    #[serde(default = "default_pool_idle_timeout")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("must be greater than 0"))]
    pub pool_idle_timeout: String,

    /// Longest silence within a response stream (no byte from the upstream) before the gateway
    /// gives up on it: a streamed response is cut with an error event, a unary one answered
    /// 504 `upstream_idle_timeout`; counted in sluice_upstream_errors_total{reason="idle_timeout"}.
    /// The whole-request `timeout` applies as well.
    #[serde(default = "default_stream_idle_timeout")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("must be greater than 0"))]
    pub stream_idle_timeout: String,
}

/// How the endpoints of a Service upstream are found.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DiscoverySpec {
    /// From the Service's EndpointSlices, each ready pod an endpoint.
    #[default]
    EndpointSlices,
    /// None: the URL is the only endpoint.
    None,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn default_upstream_timeout() -> String {
    "600s".into()
}

fn default_pool_idle_timeout() -> String {
    "4s".into()
}

fn default_stream_idle_timeout() -> String {
    "60s".into()
}

/// Which engine's metrics to read, where and how often.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EngineMetricsSpec {
    /// The engine's metric names to read; auto recognises them on the page.
    #[serde(default)]
    pub engine: crate::signals::EngineKind,
    /// Path of the metrics page on each endpoint's host and port.
    #[serde(default = "default_metrics_path")]
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("must start with /"))]
    pub path: String,
    /// How often each endpoint's page is read (50ms to 60s); a scrape gives up after three
    /// quarters of it.
    #[serde(default = "default_metrics_interval")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('50ms') && duration(self) <= duration('60s')").message("must be between 50ms and 60s"))]
    pub interval: String,
}

fn default_metrics_path() -> String {
    "/metrics".into()
}

fn default_metrics_interval() -> String {
    "250ms".into()
}
