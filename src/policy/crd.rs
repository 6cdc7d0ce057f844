//! The `RateLimitPolicy` custom resource (`sluice.dev/v1alpha1`), as Rust types from which the
//! CRD (schema, CEL rules, printer columns, field docs for `kubectl explain`) is generated.
//!
//! Fields keep the user's text (durations are Gateway API strings); [`super::PolicyConfig`]
//! is the validated, parsed form. The API server enforces the same rules as the Rust
//! validation through OpenAPI bounds and `x-kubernetes-validations` CEL rules, so a bad
//! object is refused by `kubectl apply` before any gateway sees it.

// kube's `printcolumn(...)` arguments repeat keys by design (one set per column).
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration::DURATION_PATTERN;

/// Most per-model entries a policy may list (bounds CEL cost and metric label sets).
pub const MAX_MODELS: usize = 128;

/// Longest model name, in bytes of UTF-8 (not characters): the same bound in the CRD (a CEL
/// rule), in the policy's validation and for a client's `model` at the gateway.
pub const MAX_MODEL_NAME_BYTES: usize = 256;

mod access;
mod gateway;
mod queue;
mod tenants;
mod upstream;
pub use access::{ClientAuthSpec, PriorityClass, PrioritySpec, SecretKeyRef, SecretRef};
pub use gateway::{DEFAULT_GATEWAY_PORT, DEFAULT_METRICS_PORT, GatewaySpec, metrics_port};
pub use queue::{DEFAULT_MAX_REQUESTS, MAX_QUEUE_REQUESTS, MAX_QUEUE_WAIT_SECS, QueueSpec};
pub use tenants::{
    BudgetSpec, MAX_REQUESTS_PER_MINUTE, MAX_TOKENS_PER_MINUTE, MAX_WEIGHT, TenantsSpec,
};
pub use upstream::{DiscoverySpec, EngineMetricsSpec, UpstreamSpec};

/// Spec of a RateLimitPolicy: where the inference server is, how the gateway pods run, and the
/// latency targets that decide when new requests are shed.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "RateLimitPolicy",
    plural = "ratelimitpolicies",
    singular = "ratelimitpolicy",
    shortname = "rlp",
    category = "sluice",
    namespaced,
    status = "RateLimitPolicyStatus",
    derive = "PartialEq",
    doc = "RateLimitPolicy keeps an OpenAI-compatible inference server inside its latency targets: \
           a sluice gateway in front of it measures time-to-first-token (TTFT) and inter-token \
           latency (ITL) and sheds new requests with HTTP 429 when they cross the thresholds \
           declared here (TTFT: the larger of its moving average and an estimate from the \
           requests still waiting for their first token; ITL: its moving average).",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(
        name = "TTFT",
        type_ = "string",
        description = "default TTFT threshold",
        json_path = ".spec.defaults.ttft"
    ),
    printcolumn(
        name = "ITL",
        type_ = "string",
        description = "default ITL threshold",
        json_path = ".spec.defaults.itl"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        description = "why the gateway is or is not ready",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = "1"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        priority = "1"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoint",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!has(self.scope) || self.scope != 'Global' || !has(self.models) || size(self.models) == 0").message("per-model entries have no effect with scope Global; remove them or use scope PerModel").field_path(".models"))]
#[x_kube(validation = Rule::new("!has(self.priority) || !has(self.priority.clients) || size(self.priority.clients) == 0 || has(self.clientAuth)").message("priority classes of clients need clientAuth to know who the clients are").field_path(".priority.clients"))]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicySpec {
    /// The OpenAI-compatible inference server (vLLM, SGLang, TGI, llama.cpp, ...) that the
    /// gateway forwards requests to.
    pub upstream: UpstreamSpec,

    /// How the operator runs the gateway pods for this policy. Changing these fields rolls the
    /// gateway pods; thresholds, time constants, mode and shedding reach the running pods
    /// through the API without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewaySpec>,

    /// Enforce sheds requests with HTTP 429; Shadow computes every decision and records it in
    /// metrics but rejects nothing (for tuning thresholds on live traffic).
    #[serde(default)]
    pub mode: ModeSpec,

    /// PerModel keeps separate moving averages and decisions per requested model; Global shares
    /// one set across all models.
    #[serde(default)]
    pub scope: ScopeSpec,

    /// Thresholds and time constant for every model without its own entry in `models`.
    #[serde(default)]
    pub defaults: ThresholdsSpec,

    /// Per-model overrides, keyed by the `model` field of OpenAI requests. Any field left out
    /// takes its value from `defaults`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub models: Vec<ModelThresholds>,

    /// How hard the gateway sheds once the moving averages cross their thresholds.
    #[serde(default)]
    pub shedding: SheddingSpec,

    /// Who may claim a request priority with the `x-sluice-priority` header, and the
    /// priority class of each authenticated client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<PrioritySpec>,

    /// Client authentication: the API keys the gateway accepts, from a Secret. When set, the
    /// client's `Authorization` header is never forwarded upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuthSpec>,

    /// A short admission queue: a request the limiter would shed waits up to `maxWait` for
    /// room (priority first, then arrival) instead of getting 429 at once. Off unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueSpec>,

    /// Who the tenants are (`clientAuth` names, or a trusted header) and the budget of each:
    /// a tenant over its budget gets 429 `rate_limit_exceeded` of type `requests`, and every
    /// answer carries OpenAI's `x-ratelimit-*-requests` headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenants: Option<TenantsSpec>,
}

/// Enforce or only observe.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ModeSpec {
    /// Shed requests with HTTP 429.
    #[default]
    Enforce,
    /// Record decisions in metrics, reject nothing.
    Shadow,
}

/// What shares one set of moving averages.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ScopeSpec {
    /// One set per requested model.
    #[default]
    PerModel,
    /// One set for all models.
    Global,
}

/// Latency thresholds and the time constant of the moving averages compared with them.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ThresholdsSpec {
    /// Time-to-first-token threshold: shedding starts when the TTFT signal exceeds it. The
    /// signal is the larger of the moving average of TTFT (request sent upstream to first
    /// content chunk; samples above ramp × threshold are recorded at that ceiling) and twice
    /// the mean age of the requests still waiting for their first token, which rises while a
    /// queue builds. Set it below the TTFT your users need. Gateway API duration.
    #[serde(default = "default_ttft")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("must be greater than 0"))]
    pub ttft: String,

    /// Inter-token-latency threshold: shedding starts when the moving average of the gap
    /// between consecutive content chunks exceeds it (samples above ramp × threshold are
    /// recorded at that ceiling). Gateway API duration.
    #[serde(default = "default_itl")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("must be greater than 0"))]
    pub itl: String,

    /// Time constant τ of the moving averages (a sample's weight falls to 1/e after τ) and of
    /// the shedding integral. Longer is steadier, shorter reacts faster. At least 1s.
    /// Gateway API duration.
    #[serde(default = "default_time_constant")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s')").message("must be at least 1s"))]
    pub time_constant: String,
}

/// Thresholds of one model; any field left out takes the policy's default.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelThresholds {
    /// Model name exactly as clients send it in the request's `model` field; at most 256
    /// bytes of UTF-8 (a name in CJK script: about 85 characters).
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("size(bytes(self)) <= 256").message("must be at most 256 bytes of UTF-8"))]
    pub name: String,

    /// TTFT threshold of this model. Gateway API duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("must be greater than 0"))]
    pub ttft: Option<String>,

    /// ITL threshold of this model. Gateway API duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("must be greater than 0"))]
    pub itl: Option<String>,

    /// Time constant of this model's moving averages, at least 1s. Gateway API duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s')").message("must be at least 1s"))]
    pub time_constant: Option<String>,
}

/// Shape of shedding. First, concurrency: with no request of the model in flight, or fewer
/// than the concurrency G at which the engine last met both thresholds, nothing is shed; once
/// the TTFT signal shows a queue, a request finding max(4, G) in flight is shed with
/// maxRejectProbability (see adaptiveConcurrency); a threshold the engine misses even with at
/// most 4 requests in flight is compared with 1.5 times that low-concurrency latency instead.
/// Then latency: with pressure r = max(TTFT signal / TTFT threshold, ITL average / ITL
/// threshold), the ramp rejects with probability 0 for r ≤ 1 and
/// maxRejectProbability · min(1, (r − 1)/(ramp − 1)) above. An integral I ≤ 0 remembers
/// persistent pressure: it falls by (min(r, ramp) − 1)/(ramp − 1) per time constant while
/// r > 1 and rises back towards 0 when r < 1, and a request is rejected with probability
/// min(maxRejectProbability, 1 − (1 − ramp part) · e^I), so the gate does not flood the
/// server the moment the averages dip. Critical requests are never shed; sheddable ones see
/// their pressure scaled up by 1.25.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SheddingSpec {
    /// Highest rejection probability, in (0, 1]. Below 1 a trickle of requests keeps probing
    /// the server while shedding, so the gate reopens as soon as it recovers. At 1 the ramp
    /// sheds everything past its end, while the integral alone never holds the gate beyond
    /// 99.9 %, so recovery stays within about 7 · (ramp − 1) time constants.
    #[serde(default = "default_max_reject_probability")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("must be greater than 0 and at most 1"))]
    pub max_reject_probability: f64,

    /// Pressure at which the ramp reaches the maximum rejection probability, at least 1. 1
    /// rejects at the maximum as soon as a threshold is crossed (a hard cliff, without the
    /// integral or the sample ceiling).
    #[serde(default = "default_ramp")]
    #[x_kube(validation = Rule::new("self >= 1.0").message("must be at least 1"))]
    pub ramp: f64,

    /// Cap on the evidence (in samples) a moving average accumulates. Bounds how long stale
    /// evidence keeps the gate shut after traffic stops: at most τ·ln(maxEvidence).
    #[serde(default = "default_max_evidence")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_evidence: i32,

    /// Learn the concurrency G at which the engine last met the thresholds (from requests
    /// whose first token came in time) and use it: below G requests in flight nothing is shed
    /// whatever the latency; once the TTFT signal shows a queue (half way from the engine's
    /// low-concurrency TTFT to the threshold), a request finding max(4, G) or more in flight
    /// is shed with maxRejectProbability, before the latency crosses the threshold. Once a
    /// request admitted above G has missed a threshold, the same holds when a new request
    /// would wait longer than the TTFT threshold for a slot at the rate requests end (long
    /// generations), and then none is let through; nor is any (no probe) above the ceiling
    /// while the requests already waiting for a first token would take longer than the TTFT
    /// threshold to get a slot, or have waited longer than it on average. false leaves only
    /// the latency signals (and never sheds with nothing in flight).
    #[serde(default = "default_true")]
    pub adaptive_concurrency: bool,
}

/// Observed state of a RateLimitPolicy, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicyStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted` (the spec is valid) and `Ready` (the gateway Deployment is available).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Gateway pods the Deployment has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Gateway pods that are ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Base URL of the OpenAI-compatible gateway Service, e.g.
    /// `http://llama-sluice.inference.svc:8080/v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

fn default_true() -> bool {
    true
}
fn default_ttft() -> String {
    "1s".into()
}
fn default_itl() -> String {
    "50ms".into()
}
/// Chosen by the goodput benchmark (docs/benchmarks.md), with the shedding defaults below.
fn default_time_constant() -> String {
    "4s".into()
}
pub(crate) fn default_max_reject_probability() -> f64 {
    0.95
}
pub(crate) fn default_ramp() -> f64 {
    1.5
}
pub(crate) fn default_max_evidence() -> i32 {
    200
}

impl Default for ThresholdsSpec {
    fn default() -> Self {
        ThresholdsSpec {
            ttft: default_ttft(),
            itl: default_itl(),
            time_constant: default_time_constant(),
        }
    }
}

impl Default for SheddingSpec {
    fn default() -> Self {
        SheddingSpec {
            max_reject_probability: default_max_reject_probability(),
            ramp: default_ramp(),
            max_evidence: default_max_evidence(),
            adaptive_concurrency: true,
        }
    }
}
