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
use std::sync::atomic::Ordering::Relaxed;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::gateway::unary::UnaryModes;
use crate::limiter::Clock;
use crate::policy::source::PolicyStore;

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
}

impl GatewayMetrics {
    /// The families of a gateway reading its policy and limiter state from `store`.
    pub fn new(store: Arc<PolicyStore>, clock: Arc<dyn Clock>, unary: Arc<UnaryModes>) -> Self {
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
                    "Upstream faults by reason: unreachable, timeout (the policy's upstream timeout), idle_timeout (a stream silent for longer than streamIdleTimeout), broken_stream (the connection broke mid-response), incomplete_stream (ended without [DONE] or a finish_reason), error_event (an error event in the stream), status_5xx.",
                ),
                &["reason"],
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

/// The limiter's and the policy source's gauges, computed from the [`PolicyStore`] when
/// scraped.
struct StateCollector {
    store: Arc<PolicyStore>,
    clock: Arc<dyn Clock>,
    unary: Arc<UnaryModes>,
    descs: Vec<Desc>,
}

/// Per-model gauges: name and help.
const MODEL_GAUGES: [(&str, &str); 8] = [
    (
        "sluice_ttft_ema_seconds",
        "Moving average of TTFT (samples clamped at ramp × threshold).",
    ),
    (
        "sluice_itl_ema_seconds",
        "Moving average of ITL (samples clamped at ramp × threshold).",
    ),
    (
        "sluice_waiting_requests",
        "Admitted requests still waiting for their first token.",
    ),
    (
        "sluice_ttft_waiting_estimate_seconds",
        "TTFT estimated from the requests waiting for their first token (twice their mean age); the TTFT signal is the larger of this and the moving average.",
    ),
    (
        "sluice_ttft_threshold_seconds",
        "TTFT threshold of the policy.",
    ),
    (
        "sluice_itl_threshold_seconds",
        "ITL threshold of the policy.",
    ),
    (
        "sluice_pressure_ratio",
        "max(TTFT signal / TTFT threshold, ITL average / ITL threshold), where the TTFT signal is the larger of the moving average and the waiting-request estimate; above 1 the gate sheds.",
    ),
    (
        "sluice_reject_probability",
        "Probability that a standard-priority request is shed now (pressure ramp and shedding integral).",
    ),
];

const POLICY_GAUGES: [(&str, &str); 4] = [
    (
        "sluice_policy_generation",
        "Generation of the policy in force (metadata.generation, or reload count for files).",
    ),
    (
        "sluice_policy_last_reload_successful",
        "1 if the last policy load succeeded, 0 if the last good policy is kept after an error.",
    ),
    (
        "sluice_policy_source_up",
        "1 while the policy source (file or Kubernetes watch) is readable.",
    ),
    (
        "sluice_policy_present",
        "1 while the policy object exists; 0 after it was deleted (the last policy keeps serving).",
    ),
];

const RELOADS: (&str, &str) = (
    "sluice_policy_reloads_total",
    "Policy loads by result: success, error (invalid policy), watch_error (an incident of the Kubernetes watch).",
);

impl StateCollector {
    fn new(store: Arc<PolicyStore>, clock: Arc<dyn Clock>, unary: Arc<UnaryModes>) -> Self {
        let mut descs = Vec::new();
        for (name, help) in MODEL_GAUGES {
            descs.extend(model_gauge(name, help).desc().into_iter().cloned());
        }
        for (name, help) in POLICY_GAUGES {
            descs.extend(Gauge::new(name, help).unwrap().desc().into_iter().cloned());
        }
        descs.extend(reloads().desc().into_iter().cloned());
        descs.extend(unary_mode().desc().into_iter().cloned());
        StateCollector {
            store,
            clock,
            unary,
            descs,
        }
    }
}

fn model_gauge(name: &str, help: &str) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), &["model"]).unwrap()
}

fn unary_mode() -> IntGaugeVec {
    IntGaugeVec::new(
        Opts::new(
            "sluice_unary_mode",
            "How unary requests reach the policy's upstream: 1 for the mode in use. assembled: asked for as a stream and measured; passthrough: relayed as they are, not measured (streamUnary false, or the upstream's streams lack usage).",
        ),
        &["mode"],
    )
    .unwrap()
}

fn reloads() -> IntCounterVec {
    IntCounterVec::new(Opts::new(RELOADS.0, RELOADS.1), &["result"]).unwrap()
}

impl Collector for StateCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snap = self.store.load();
        let mut out = Vec::new();
        let gauges = MODEL_GAUGES.map(|(name, help)| model_gauge(name, help));
        if let Some(s) = &snap {
            for r in s.limiter.readings(self.clock.now()) {
                let values = [
                    r.ttft,
                    r.itl,
                    f64::from(r.waiting),
                    r.waiting_ttft,
                    r.thresholds.ttft,
                    r.thresholds.itl,
                    r.pressure,
                    r.reject_probability,
                ];
                for (g, v) in gauges.iter().zip(values) {
                    g.with_label_values(&[r.label]).set(v);
                }
            }
        }
        for g in &gauges {
            out.extend(g.collect());
        }
        let st = self.store.status();
        let flag = |b: &std::sync::atomic::AtomicBool| f64::from(u8::from(b.load(Relaxed)));
        let values = [
            snap.as_ref().map_or(0.0, |s| s.generation as f64),
            flag(&st.last_ok),
            flag(&st.up),
            flag(&st.present),
        ];
        for ((name, help), v) in POLICY_GAUGES.into_iter().zip(values) {
            let g = Gauge::new(name, help).unwrap();
            g.set(v);
            out.extend(g.collect());
        }
        let reloads = reloads();
        for (result, n) in [
            ("success", &st.applied),
            ("error", &st.rejected),
            ("watch_error", &st.watch_errors),
        ] {
            reloads.with_label_values(&[result]).inc_by(n.load(Relaxed));
        }
        out.extend(reloads.collect());
        if let Some(s) = &snap {
            let up = &s.config.upstream;
            let assembled = up.stream_unary && self.unary.assembles(&up.url);
            let mode = unary_mode();
            mode.with_label_values(&["assembled"])
                .set(i64::from(assembled));
            mode.with_label_values(&["passthrough"])
                .set(i64::from(!assembled));
            out.extend(mode.collect());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::ManualClock;
    use crate::policy::PolicyConfig;

    const POLICY: &str = "apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: p}\nspec:\n  upstream: {url: 'http://127.0.0.1:9'}\n  defaults: {ttft: 1s, itl: 50ms}\n  models: [{name: m, ttft: 2s}]\n";

    fn metrics() -> (GatewayMetrics, Arc<PolicyStore>) {
        metrics_of(POLICY)
    }

    fn metrics_of(policy: &str) -> (GatewayMetrics, Arc<PolicyStore>) {
        let store = Arc::new(PolicyStore::new(None));
        let (_, config) = PolicyConfig::from_yaml(policy).unwrap();
        store.apply(7, "test".into(), config);
        store.set_source(true, true);
        let clock = ManualClock::default();
        clock.advance(std::time::Duration::from_secs(1));
        (
            GatewayMetrics::new(store.clone(), Arc::new(clock), Arc::default()),
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
    fn without_a_policy_only_the_source_gauges_speak() {
        let store = Arc::new(PolicyStore::new(None));
        let m = GatewayMetrics::new(
            store.clone(),
            Arc::new(ManualClock::default()),
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
