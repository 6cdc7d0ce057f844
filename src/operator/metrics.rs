//! The operator's metrics (own registry): reconciles by result and failing object kind,
//! their duration, the policies watched and leadership.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Operator metrics.
#[derive(Clone)]
pub struct OperatorMetrics {
    registry: Registry,
    /// `result`: success, invalid, error; `error`: what failed ([`super::ReconcileError::metric_label`]), empty unless `result="error"`.
    pub reconciles: IntCounterVec,
    pub duration: Histogram,
    pub policies: IntGauge,
    pub leader: IntGauge,
    /// Requests to the API server by `verb`: get, list, watch, create, patch, update, delete.
    pub api_requests: IntCounterVec,
}

impl OperatorMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let m = OperatorMetrics {
            reconciles: IntCounterVec::new(
                Opts::new(
                    "sluice_operator_reconciles_total",
                    "Reconciles by result (success, invalid, error) and, for errors, what failed (the object kind applied, status, namespace).",
                ),
                &["result", "error"],
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
            api_requests: IntCounterVec::new(
                Opts::new(
                    "sluice_operator_api_requests_total",
                    "Requests the operator sent to the Kubernetes API server, by verb (get, list, watch, create, patch, update, delete).",
                ),
                &["verb"],
            )
            .unwrap(),
            registry,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.reconciles.clone()),
            Box::new(m.duration.clone()),
            Box::new(m.policies.clone()),
            Box::new(m.leader.clone()),
            Box::new(m.api_requests.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("unique metric names");
        }
        m
    }

    /// Counts one reconcile; `error` is empty unless `result` is `error`.
    pub fn reconciled(&self, result: &str, error: &str) {
        self.reconciles.with_label_values(&[result, error]).inc();
    }

    /// Counts one request to the API server by its verb, as the API server names them: a GET
    /// with `watch=true` is a watch, one without a name (the path ends in the resource) a
    /// list (told apart by the path's shape: `/api/v1/.../<resource>/<name>` has a name).
    pub fn api_request<B>(&self, req: &http::Request<B>) {
        let verb = api_verb(req.method(), req.uri());
        self.api_requests.with_label_values(&[verb]).inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
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

/// The Kubernetes verb of a request.
fn api_verb(method: &http::Method, uri: &http::Uri) -> &'static str {
    let query = uri.query().unwrap_or("");
    match *method {
        http::Method::GET
            if query
                .split('&')
                .any(|p| p == "watch=true" || p == "watch=1") =>
        {
            "watch"
        }
        http::Method::GET if names_a_collection(uri.path()) => "list",
        http::Method::GET => "get",
        http::Method::POST => "create",
        http::Method::PATCH => "patch",
        http::Method::PUT => "update",
        http::Method::DELETE => "delete",
        _ => "other",
    }
}

/// Whether a path names a collection: `/api/v1/<resource>`, `/api/v1/namespaces/<ns>/<resource>`,
/// `/apis/<group>/<version>/<resource>` or `/apis/<group>/<version>/namespaces/<ns>/<resource>`
/// (not `/api/v1/namespaces/<ns>` itself, which is a namespace).
fn names_a_collection(path: &str) -> bool {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match parts.first() {
        Some(&"api") => &parts[parts.len().min(2)..],
        Some(&"apis") => &parts[parts.len().min(3)..],
        _ => return false,
    };
    matches!(rest, [_] | ["namespaces", _, _])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_the_api_servers_verbs() {
        let verb = |m: &str, u: &str| api_verb(&m.parse().unwrap(), &u.parse().unwrap());
        assert_eq!(
            verb("GET", "/apis/apps/v1/namespaces/n/deployments/d"),
            "get"
        );
        assert_eq!(
            verb(
                "GET",
                "/apis/apps/v1/namespaces/n/deployments?labelSelector=a"
            ),
            "list"
        );
        assert_eq!(
            verb(
                "GET",
                "/apis/apps/v1/deployments?watch=true&resourceVersion=1"
            ),
            "watch"
        );
        assert_eq!(verb("GET", "/api/v1/namespaces/n/secrets/s"), "get");
        assert_eq!(verb("GET", "/api/v1/namespaces"), "list");
        assert_eq!(verb("GET", "/api/v1/namespaces/n"), "get");
        assert_eq!(verb("POST", "/api/v1/namespaces/n/services"), "create");
        assert_eq!(
            verb(
                "PATCH",
                "/apis/sluice.dev/v1alpha1/namespaces/n/ratelimitpolicies/p/status"
            ),
            "patch"
        );
        assert_eq!(
            verb("PUT", "/apis/coordination.k8s.io/v1/namespaces/n/leases/l"),
            "update"
        );
        assert_eq!(
            verb(
                "DELETE",
                "/apis/policy/v1/namespaces/n/poddisruptionbudgets/p"
            ),
            "delete"
        );
    }
}
