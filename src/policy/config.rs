//! Validation of a RateLimitPolicy spec into the [`PolicyConfig`] a gateway runs on.
//!
//! The rules are the ones the CRD schema makes the API server enforce (OpenAPI bounds and
//! CEL rules in [`super::crd`]); they are checked again here because policies also come from
//! local files, and because an object written while the CRD was older must not reach the
//! limiter unchecked. Every violation is reported with its field path, all at once.

mod queue;
mod tenants;
mod url;
pub use super::document::parse_policy_yaml;
pub use queue::QueueConfig;
pub use tenants::{Budget, TenantsConfig};
pub use url::{EngineMetricsConfig, UpstreamConfig, endpoint_label, upstream_url};

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use super::crd::{
    DiscoverySpec, MAX_MODEL_NAME_BYTES, MAX_MODELS, ModeSpec, PriorityClass, RateLimitPolicy,
    RateLimitPolicySpec, ScopeSpec,
};
use super::duration::parse_duration;
use crate::limiter::{self, LimiterConfig, Priority, Thresholds};

/// The `apiVersion` of RateLimitPolicy documents.
pub const API_VERSION: &str = "sluice.dev/v1alpha1";
/// The `kind` of RateLimitPolicy documents.
pub const KIND: &str = "RateLimitPolicy";

/// A validated policy: where to forward, and the limiter's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    pub upstream: UpstreamConfig,
    pub limiter: LimiterConfig,
    /// Whether a client's `x-sluice-priority: critical` counts (`spec.priority.trustHeader`).
    pub trust_priority_header: bool,
    /// Client authentication (`spec.clientAuth`, `spec.priority.clients`).
    pub client_auth: Option<ClientAuthConfig>,
    /// The admission queue (`spec.queue`); None: a request that would be shed is shed.
    pub queue: Option<QueueConfig>,
    /// Tenants and their budgets (`spec.tenants`); None: no budgets.
    pub tenants: Option<TenantsConfig>,
}

/// Who the clients are and the priority class of each.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientAuthConfig {
    /// The Secret holding one API key per client.
    pub secret: String,
    /// Refuse requests without a valid key (401).
    pub required: bool,
    /// Priority class by client name; others are standard.
    pub classes: HashMap<String, Priority>,
}

impl From<PriorityClass> for Priority {
    fn from(c: PriorityClass) -> Self {
        match c {
            PriorityClass::Critical => Priority::Critical,
            PriorityClass::Standard => Priority::Standard,
            PriorityClass::Sheddable => Priority::Sheddable,
        }
    }
}

/// `spec.clientAuth` with the classes of `spec.priority.clients`, checked.
fn client_auth(spec: &RateLimitPolicySpec, c: &mut Checker) -> Option<ClientAuthConfig> {
    let clients = spec.priority.as_ref().map(|p| &p.clients);
    for name in clients.into_iter().flatten().map(|(n, _)| n) {
        if !secret_data_key(name) {
            c.fail(
                format!("spec.priority.clients[{name:?}]"),
                "must be a Secret data key: 1 to 253 of a-z, A-Z, 0-9, '-', '_', '.'",
            );
        }
    }
    let Some(auth) = &spec.client_auth else {
        if clients.is_some_and(|m| !m.is_empty()) {
            c.fail(
                "spec.priority.clients",
                "priority classes of clients need clientAuth to know who the clients are",
            );
        }
        return None;
    };
    if auth.secret_ref.name.is_empty() {
        c.fail("spec.clientAuth.secretRef.name", "must not be empty");
    }
    Some(ClientAuthConfig {
        secret: auth.secret_ref.name.clone(),
        required: auth.required,
        classes: clients
            .into_iter()
            .flatten()
            .map(|(n, class)| (n.clone(), (*class).into()))
            .collect(),
    })
}

/// Whether `name` can be a key of a Secret's data (and so a client's name).
fn secret_data_key(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// One violated rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.models[1].ttft`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a policy cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The spec breaks one or more rules.
    #[error("invalid RateLimitPolicy: {}", join(.0))]
    Invalid(Vec<FieldError>),
    /// The document is not YAML of a RateLimitPolicy.
    #[error("cannot read RateLimitPolicy YAML: {0}")]
    Yaml(String),
    /// The document is some other kind of object.
    #[error(
        "expected apiVersion {API_VERSION} and kind {KIND}, found apiVersion {api_version:?} and kind {kind:?}"
    )]
    WrongKind { api_version: String, kind: String },
}

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl PolicyError {
    /// The violated rules (empty for YAML and kind errors).
    pub fn field_errors(&self) -> &[FieldError] {
        match self {
            PolicyError::Invalid(e) => e,
            _ => &[],
        }
    }
}

/// Collects violations while walking the spec.
#[derive(Default)]
struct Checker {
    errors: Vec<FieldError>,
}

impl Checker {
    fn fail(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    /// A duration that must be at least `min` (and positive when `min` is zero).
    fn duration(&mut self, field: &str, text: &str, min: Duration) -> Option<Duration> {
        match parse_duration(text) {
            Err(e) => {
                self.fail(field, e.to_string());
                None
            }
            Ok(d) if min.is_zero() && d.is_zero() => {
                self.fail(field, format!("{text:?} must be greater than 0"));
                None
            }
            Ok(d) if d < min => {
                self.fail(
                    field,
                    format!("{text:?} must be at least {}s", min.as_secs()),
                );
                None
            }
            Ok(d) => Some(d),
        }
    }

    fn thresholds(
        &mut self,
        path: &str,
        ttft: Option<&str>,
        itl: Option<&str>,
        time_constant: Option<&str>,
        fallback: Thresholds,
    ) -> Thresholds {
        let mut t = fallback;
        if let Some(d) =
            ttft.and_then(|v| self.duration(&format!("{path}.ttft"), v, Duration::ZERO))
        {
            t.ttft = d.as_secs_f64();
        }
        if let Some(d) = itl.and_then(|v| self.duration(&format!("{path}.itl"), v, Duration::ZERO))
        {
            t.itl = d.as_secs_f64();
        }
        let tc_field = format!("{path}.timeConstant");
        if let Some(d) = time_constant.and_then(|v| self.duration(&tc_field, v, MIN_TIME_CONSTANT))
        {
            t.time_constant = d.as_secs_f64();
        }
        t
    }
}

/// Shortest allowed time constant.
pub const MIN_TIME_CONSTANT: Duration = Duration::from_secs(1);

impl TryFrom<&RateLimitPolicySpec> for PolicyConfig {
    type Error = PolicyError;

    fn try_from(spec: &RateLimitPolicySpec) -> Result<Self, PolicyError> {
        let mut c = Checker::default();

        let url = upstream_url(&spec.upstream.url)
            .map_err(|m| c.fail("spec.upstream.url", m))
            .ok();
        let timeout = c.duration(
            "spec.upstream.timeout",
            &spec.upstream.timeout,
            Duration::ZERO,
        );
        let pool_idle_timeout = c.duration(
            "spec.upstream.poolIdleTimeout",
            &spec.upstream.pool_idle_timeout,
            Duration::ZERO,
        );
        let stream_idle_timeout = c.duration(
            "spec.upstream.streamIdleTimeout",
            &spec.upstream.stream_idle_timeout,
            Duration::ZERO,
        );
        let endpoints = url::endpoints(&spec.upstream.endpoints, &mut c);
        let port_name = url::port_name(spec.upstream.port_name.as_ref(), &mut c);
        let engine_metrics = url::engine_metrics(spec.upstream.engine_metrics.as_ref(), &mut c);
        if let Some(r) = &spec.upstream.api_key_secret_ref {
            if r.name.is_empty() {
                c.fail("spec.upstream.apiKeySecretRef.name", "must not be empty");
            }
            if r.key.is_empty() {
                c.fail("spec.upstream.apiKeySecretRef.key", "must not be empty");
            }
        }

        let client_auth = client_auth(spec, &mut c);
        let queue = queue::queue(spec.queue.as_ref(), &mut c);
        let tenants = tenants::tenants(spec, &mut c);

        if let Some(g) = &spec.gateway {
            if let Some(r) = g.replicas.filter(|r| !(0..=1000).contains(r)) {
                c.fail(
                    "spec.gateway.replicas",
                    format!("{r} must be between 0 and 1000"),
                );
            }
            if let Some(p) = g.port.filter(|p| !(1..=65535).contains(p)) {
                c.fail(
                    "spec.gateway.port",
                    format!("{p} must be between 1 and 65535"),
                );
            }
            match g.metrics_port {
                Some(p) if !(1..=65535).contains(&p) => c.fail(
                    "spec.gateway.metricsPort",
                    format!("{p} must be between 1 and 65535"),
                ),
                Some(p) if p == g.port.unwrap_or(super::crd::DEFAULT_GATEWAY_PORT) => c.fail(
                    "spec.gateway.metricsPort",
                    "metricsPort and port must differ (port defaults to 8080)",
                ),
                _ => {}
            }
        }

        // Placeholders, used only when the defaults are invalid (an error anyway).
        let placeholder = Thresholds {
            ttft: 1.0,
            itl: 0.05,
            time_constant: 4.0,
        };
        let d = &spec.defaults;
        let defaults = c.thresholds(
            "spec.defaults",
            Some(&d.ttft),
            Some(&d.itl),
            Some(&d.time_constant),
            placeholder,
        );

        if spec.models.len() > MAX_MODELS {
            c.fail(
                "spec.models",
                format!(
                    "{} entries; at most {MAX_MODELS} are allowed",
                    spec.models.len()
                ),
            );
        }
        if spec.scope == ScopeSpec::Global && !spec.models.is_empty() {
            c.fail(
                "spec.models",
                "per-model entries have no effect with scope Global; remove them or use scope PerModel",
            );
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut models = Vec::with_capacity(spec.models.len());
        for (i, m) in spec.models.iter().enumerate() {
            let path = format!("spec.models[{i}]");
            if m.name.is_empty() {
                c.fail(format!("{path}.name"), "must not be empty");
            } else if m.name.len() > MAX_MODEL_NAME_BYTES {
                c.fail(
                    format!("{path}.name"),
                    format!("must be at most {MAX_MODEL_NAME_BYTES} bytes of UTF-8"),
                );
            }
            if let Some(first) = seen.insert(&m.name, i) {
                c.fail(
                    format!("{path}.name"),
                    format!(
                        "duplicate model name {:?} (first at spec.models[{first}])",
                        m.name
                    ),
                );
            }
            let t = c.thresholds(
                &path,
                m.ttft.as_deref(),
                m.itl.as_deref(),
                m.time_constant.as_deref(),
                defaults,
            );
            models.push((m.name.clone(), t));
        }

        let s = &spec.shedding;
        let p_max = s.max_reject_probability;
        if !(p_max > 0.0 && p_max <= 1.0) {
            c.fail(
                "spec.shedding.maxRejectProbability",
                format!("{p_max} must be greater than 0 and at most 1"),
            );
        }
        if !(s.ramp >= 1.0 && s.ramp.is_finite()) {
            c.fail(
                "spec.shedding.ramp",
                format!("{} must be at least 1", s.ramp),
            );
        }
        if !(1..=1_000_000).contains(&s.max_evidence) {
            c.fail(
                "spec.shedding.maxEvidence",
                format!("{} must be between 1 and 1000000", s.max_evidence),
            );
        }

        match (url, timeout, pool_idle_timeout, stream_idle_timeout) {
            (Some(url), Some(timeout), Some(pool_idle_timeout), Some(stream_idle_timeout))
                if c.errors.is_empty() =>
            {
                Ok(PolicyConfig {
                    trust_priority_header: spec.priority.as_ref().is_some_and(|p| p.trust_header),
                    client_auth,
                    queue,
                    tenants,
                    upstream: UpstreamConfig {
                        endpoints: url::served(&url, endpoints),
                        url,
                        timeout,
                        stream_unary: spec.upstream.stream_unary,
                        pool_idle_timeout,
                        stream_idle_timeout,
                        api_key_secret: spec.upstream.api_key_secret_ref.clone(),
                        discovery: spec.upstream.discovery == DiscoverySpec::EndpointSlices,
                        port_name,
                        engine_metrics,
                    },
                    limiter: LimiterConfig {
                        mode: match spec.mode {
                            ModeSpec::Enforce => limiter::Mode::Enforce,
                            ModeSpec::Shadow => limiter::Mode::Shadow,
                        },
                        scope: match spec.scope {
                            ScopeSpec::PerModel => limiter::Scope::PerModel,
                            ScopeSpec::Global => limiter::Scope::Global,
                        },
                        defaults,
                        models,
                        shedding: limiter::Shedding {
                            max_reject_probability: p_max,
                            ramp: s.ramp,
                            max_evidence: f64::from(s.max_evidence),
                            adaptive_concurrency: s.adaptive_concurrency,
                            ..limiter::Shedding::default()
                        },
                    },
                })
            }
            _ => Err(PolicyError::Invalid(c.errors)),
        }
    }
}

impl PolicyConfig {
    /// Reads and validates a RateLimitPolicy YAML document.
    pub fn from_yaml(text: &str) -> Result<(RateLimitPolicy, PolicyConfig), PolicyError> {
        let policy = parse_policy_yaml(text)?;
        let config = PolicyConfig::try_from(&policy.spec)?;
        Ok((policy, config))
    }
}

#[cfg(test)]
mod tests;
