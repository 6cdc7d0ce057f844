//! Prometheus metrics of the gateway: one registry per gateway (no global state), families
//! named after Prometheus conventions (base units, `_total` counters).
//!
//! Label values are bounded and never a client's text: `model` is the limiter's key label
//! (a model named in the policy, `other`, or `global`), `endpoint` one of a fixed set, `outcome` one of
//! [`Outcome`]. Gauges that describe the limiter (averages, thresholds, reject probability)
//! and the policy source are computed from their state when scraped, by a
//! [`prometheus::core::Collector`]: nothing is reset or re-set per scrape, so concurrent
//! scrapes (an HA Prometheus pair) each see every series.

use std::sync::Arc;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::gateway::unary::UnaryModes;
use crate::limiter::Clock;
use crate::policy::source::PolicyStore;

mod fair;
mod state;
use crate::gateway::fair::FairBook;
use fair::FairCollector;
use state::StateCollector;

/// How a request ended, the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Shed with 429.
    Rejected,
    /// Shadow mode: would have been shed, was served.
    ShadowRejected,
    /// 4xx from the gateway's own checks or passed through from upstream.
    ClientError,
    /// Upstream unreachable, timed out, broken stream or 5xx.
    UpstreamError,
    /// The client went away before the response was complete.
    Cancelled,
    /// Refused with 503: the gateway was at its in-flight limit.
    Overloaded,
    /// Shed with 429 after waiting in the admission queue for `maxWait` without room.
    Expired,
    /// Refused with 429: the tenant's budget on this pod was spent (`spec.tenants`).
    OverBudget,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Rejected => "rejected",
            Outcome::ShadowRejected => "shadow_rejected",
            Outcome::ClientError => "client_error",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Cancelled => "cancelled",
            Outcome::Overloaded => "overloaded",
            Outcome::Expired => "expired",
            Outcome::OverBudget => "over_budget",
        }
    }
}

/// The gateway's metric families: request counters and histograms updated as requests
/// pass, and the limiter's and policy source's gauges computed from the policy store at
/// scrape time.
#[derive(Clone)]
pub struct GatewayMetrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub ttft: HistogramVec,
    pub itl: HistogramVec,
    pub inflight: IntGaugeVec,
    pub upstream_errors: IntCounterVec,
    /// Entries of the client key directory left out of the set in force (set from the keys
    /// when scraped).
    pub client_keys_invalid: IntGauge,
    /// Bytes of request bodies held against `--max-body-memory` (set when scraped).
    pub body_memory: IntGauge,
    /// Requests waiting in the admission queue.
    pub queue_depth: IntGauge,
    /// Time spent in the admission queue, by how the wait ended.
    pub queue_wait: HistogramVec,
    /// Requests refused for a spent budget, by tenant.
    pub over_budget: IntCounterVec,
    /// Requests by tenant and outcome (where there are tenants).
    pub tenant_requests: IntCounterVec,
    /// Tokens used by tenant.
    pub tenant_tokens: IntCounterVec,
    /// What a tenant's budget on this pod has left, by unit, as of its last request.
    pub tenant_budget_remaining: IntGaugeVec,
}

impl GatewayMetrics {
    /// The families of a gateway reading its policy and limiter state from `store`.
    pub fn new(
        store: Arc<PolicyStore>,
        clock: Arc<dyn Clock>,
        unary: Arc<UnaryModes>,
        fair: Arc<FairBook>,
    ) -> Self {
        let registry = Registry::new();
        let hist = |name: &str, help: &str, b: &[f64]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(b.to_vec()),
                &["model"],
            )
            .unwrap()
        };
        let m = GatewayMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "sluice_requests_total",
                    "Requests by model, endpoint, streaming and outcome.",
                ),
                &["model", "endpoint", "stream", "outcome"],
            )
            .unwrap(),
            request_duration: hist(
                "sluice_request_duration_seconds",
                "Time from request received to response complete, admitted requests.",
                &[
                    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                    300.0,
                ],
            ),
            ttft: hist(
                "sluice_ttft_seconds",
                "Time to first token: request sent upstream to first content-bearing chunk.",
                &[
                    0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0,
                ],
            ),
            itl: hist(
                "sluice_itl_seconds",
                "Inter-token latency: gap between consecutive content-bearing chunks.",
                &[
                    0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
                ],
            ),
            inflight: IntGaugeVec::new(
                Opts::new("sluice_inflight_requests", "Requests being served."),
                &["model"],
            )
            .unwrap(),
            upstream_errors: IntCounterVec::new(
                Opts::new(
                    "sluice_upstream_errors_total",
                    "Upstream faults by reason: unreachable, timeout (the policy's upstream timeout), idle_timeout (a stream silent for longer than streamIdleTimeout), broken_stream (the connection broke mid-response), incomplete_stream (ended without [DONE] or a finish_reason), error_event (an error event in the stream), status_5xx, upstream_auth (a 401 or 403 to the gateway's own API key), event_too_large (an event over 4 MiB in a stream assembled into a unary answer), no_endpoints (the discovered Service had no ready endpoint: 503).",
                ),
                &["reason"],
            )
            .unwrap(),
            client_keys_invalid: IntGauge::new(
                "sluice_client_keys_invalid",
                "Entries of the client key directory left out of the keys in force: an empty key, a key two clients share (every copy), a file that cannot be read. 0 when every entry is in force.",
            )
            .unwrap(),
            body_memory: IntGauge::new(
                "sluice_body_memory_bytes",
                "Bytes of request bodies the gateway holds now (being read, or read and not yet taken by the upstream), in KiB-rounded reservations against --max-body-memory.",
            )
            .unwrap(),
            queue_depth: IntGauge::new(
                "sluice_queue_requests",
                "Requests waiting in the admission queue (spec.queue) for room.",
            )
            .unwrap(),
            queue_wait: HistogramVec::new(
                HistogramOpts::new(
                    "sluice_queue_wait_seconds",
                    "Time requests spent in the admission queue, by outcome: admitted (sent upstream), expired (429 at maxWait), evicted (429: a request of higher priority took its place in a full queue), cancelled (the client went away), promoted (a request of a tenant under its fair share that found no free slot within the TTFT threshold, sent upstream anyway).",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                ]),
                &["outcome"],
            )
            .unwrap(),
            over_budget: IntCounterVec::new(
                Opts::new(
                    "sluice_tenant_over_budget_total",
                    "Requests refused with 429 because their tenant had spent its requestsPerMinute on this gateway pod (spec.tenants), by tenant (names from the clientAuth Secret and the policy, or anonymous).",
                ),
                &["tenant"],
            )
            .unwrap(),
            tenant_requests: IntCounterVec::new(
                Opts::new(
                    "sluice_tenant_requests_total",
                    "Requests by tenant and outcome (as in sluice_requests_total), where the policy has tenants (spec.tenants or clientAuth). Tenant names come from the clientAuth Secret and the policy, or are anonymous.",
                ),
                &["tenant", "outcome"],
            )
            .unwrap(),
            tenant_tokens: IntCounterVec::new(
                Opts::new(
                    "sluice_tenant_tokens_total",
                    "Tokens used by the tenant's admitted requests, prompt plus output: the usage the gateway read, else the prompt's estimate (bytes / 4) plus one token per content event relayed, else the estimate.",
                ),
                &["tenant"],
            )
            .unwrap(),
            tenant_budget_remaining: IntGaugeVec::new(
                Opts::new(
                    "sluice_tenant_budget_remaining",
                    "What the tenant's budget on this gateway pod has left, read at each scrape, by unit (requests, tokens).",
                ),
                &["tenant", "unit"],
            )
            .unwrap(),
            registry,
        };
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(m.requests.clone()),
            Box::new(m.request_duration.clone()),
            Box::new(m.ttft.clone()),
            Box::new(m.itl.clone()),
            Box::new(m.inflight.clone()),
            Box::new(m.upstream_errors.clone()),
            Box::new(m.client_keys_invalid.clone()),
            Box::new(m.body_memory.clone()),
            Box::new(m.queue_depth.clone()),
            Box::new(m.queue_wait.clone()),
            Box::new(m.over_budget.clone()),
            Box::new(m.tenant_requests.clone()),
            Box::new(m.tenant_tokens.clone()),
            Box::new(m.tenant_budget_remaining.clone()),
            Box::new(FairCollector::new(fair, clock.clone())),
            Box::new(StateCollector::new(store, clock, unary)),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }

    /// The text exposition. Each call reads the state afresh: concurrent scrapes share
    /// nothing mutable.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding does not fail");
        String::from_utf8(out).expect("exposition is UTF-8")
    }
}

/// Per-request metric handles resolved once (label lookups off the per-chunk path).
pub struct RequestMetrics {
    pub ttft: Histogram,
    pub itl: Histogram,
}

impl RequestMetrics {
    pub fn new(m: &GatewayMetrics, model: &str) -> Self {
        RequestMetrics {
            ttft: m.ttft.with_label_values(&[model]),
            itl: m.itl.with_label_values(&[model]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::state::{MODEL_GAUGES, POLICY_GAUGES, RELOADS};
    use super::*;
    use crate::limiter::ManualClock;
    use crate::policy::PolicyConfig;

    const POLICY: &str = "apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: p}\nspec:\n  upstream: {url: 'http://127.0.0.1:9'}\n  defaults: {ttft: 1s, itl: 50ms}\n  models: [{name: m, ttft: 2s}]\n";

    fn metrics() -> (GatewayMetrics, Arc<PolicyStore>) {
        metrics_of(POLICY)
    }

    /// The numbers the help texts and the CRD's field docs state are the limiter's constants.
    #[test]
    fn the_numbers_in_the_docs_are_the_limiters() {
        use crate::limiter::concurrency::{CEILING_PRESSURE, LOW_CONCURRENCY};
        let help = |name: &str| MODEL_GAUGES.iter().find(|(n, _)| *n == name).unwrap().1;
        let good = help("sluice_good_concurrency");
        assert!(
            good.contains(&format!("max(G, {LOW_CONCURRENCY})")),
            "{good}"
        );
        let crd = crate::policy::crd_yaml();
        assert!(crd.contains(&format!("max({LOW_CONCURRENCY}, G)")));
        // "half way from the engine's low-concurrency TTFT to the threshold"
        assert_eq!(CEILING_PRESSURE, 0.5);
        assert!(crd.contains("half way from the engine's"));
    }

    fn metrics_of(policy: &str) -> (GatewayMetrics, Arc<PolicyStore>) {
        let store = Arc::new(PolicyStore::new(vec![]));
        let (_, config) = PolicyConfig::from_yaml(policy).unwrap();
        store.apply(7, "test".into(), config);
        store.set_source(true, true);
        let clock = ManualClock::default();
        clock.advance(std::time::Duration::from_secs(1));
        (
            GatewayMetrics::new(
                store.clone(),
                Arc::new(clock),
                Arc::default(),
                Arc::default(),
            ),
            store,
        )
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn every_family_is_exported() {
        let (m, _) = metrics();
        // Touch the labelled families so they have a series.
        m.requests
            .with_label_values(&["m", "chat_completions", "true", "success"])
            .inc();
        m.request_duration.with_label_values(&["m"]).observe(0.1);
        m.ttft.with_label_values(&["m"]).observe(0.1);
        m.itl.with_label_values(&["m"]).observe(0.01);
        m.inflight.with_label_values(&["m"]).inc();
        let text = m.render();
        for name in [
            "sluice_requests_total",
            "sluice_request_duration_seconds",
            "sluice_ttft_seconds",
            "sluice_itl_seconds",
            "sluice_inflight_requests",
            RELOADS.0,
        ]
        .into_iter()
        .chain(MODEL_GAUGES.map(|g| g.0))
        .chain(POLICY_GAUGES.map(|g| g.0))
        {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing from:\n{text}"
            );
        }
        assert_eq!(value(&text, "sluice_policy_generation"), Some(7.0));
        assert_eq!(
            value(&text, "sluice_ttft_threshold_seconds{model=\"m\"}"),
            Some(2.0)
        );
        assert_eq!(
            value(&text, "sluice_policy_reloads_total{result=\"success\"}"),
            Some(1.0)
        );
        assert_eq!(value(&text, "sluice_policy_source_up"), Some(1.0));
    }

    #[test]
    fn concurrent_scrapes_each_see_every_series() {
        let models: Vec<String> = (0..20).map(|i| format!("{{name: model-{i}}}")).collect();
        let (m, _) = metrics_of(&POLICY.replace("{name: m, ttft: 2s}", &models.join(", ")));
        let reference = m.render();
        let series = |t: &str| t.lines().filter(|l| !l.starts_with('#')).count();
        let want = series(&reference);
        assert!(want > 20 * 8, "{want}");
        std::thread::scope(|s| {
            let scrapers: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..50).map(|_| series(&m.render())).collect::<Vec<_>>()))
                .collect();
            for h in scrapers {
                for got in h.join().unwrap() {
                    assert_eq!(got, want, "a scrape missed series");
                }
            }
        });
    }

    #[test]
    fn each_endpoint_of_the_fleet_counts_in_its_unary_mode() {
        let urls = [
            "http://10.0.0.1:8000",
            "http://10.0.0.2:8000",
            "http://10.0.0.3:8000",
        ];
        let policy = POLICY.replace(
            "{url: 'http://127.0.0.1:9'}",
            &format!("{{url: '{}', endpoints: [{}]}}", urls[0], urls.join(", ")),
        );
        let (_, config) = PolicyConfig::from_yaml(&policy).unwrap();
        let store = Arc::new(PolicyStore::new(vec![]));
        store.apply(1, "test".into(), config);
        let unary = Arc::new(UnaryModes::new(true));
        let now = std::time::Duration::ZERO;
        unary.probed(&urls[0].parse().unwrap(), now, Some(true));
        unary.probed(&urls[1].parse().unwrap(), now, Some(false));
        let clock = Arc::new(ManualClock::default());
        let text = GatewayMetrics::new(store, clock, unary, Arc::default()).render();
        for mode in ["assembled", "passthrough", "probing"] {
            let series = format!("sluice_unary_mode{{mode=\"{mode}\"}}");
            assert_eq!(value(&text, &series), Some(1.0), "{mode}:\n{text}");
        }
    }

    #[test]
    fn without_a_policy_only_the_source_gauges_speak() {
        let store = Arc::new(PolicyStore::new(vec![]));
        let m = GatewayMetrics::new(
            store.clone(),
            Arc::new(ManualClock::default()),
            Arc::default(),
            Arc::default(),
        );
        let text = m.render();
        assert_eq!(value(&text, "sluice_policy_generation"), Some(0.0));
        assert_eq!(value(&text, "sluice_policy_present"), Some(0.0));
        assert!(!text.contains("sluice_reject_probability{"), "{text}");
        store.reject("test", &"bad");
        let text = m.render();
        assert_eq!(
            value(&text, "sluice_policy_reloads_total{result=\"error\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "sluice_policy_last_reload_successful"),
            Some(0.0)
        );
    }
}
