//! Prometheus metrics of the gateway: one registry per gateway (no global state), families
//! named after design §3 and Prometheus conventions (base units, `_total` counters).
//!
//! Label values are bounded: `model` is the limiter's key label (policy models, at most
//! `max_dynamic_keys` others, then `other`), `endpoint` one of a fixed set, `outcome` one of
//! [`Outcome`]. Gauges that describe the limiter (averages, thresholds, reject probability)
//! are computed from its state when scraped.

use std::time::Duration;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::limiter::Limiter;

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
        }
    }
}

/// The gateway's metric families.
#[derive(Clone)]
pub struct GatewayMetrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub ttft: HistogramVec,
    pub itl: HistogramVec,
    pub ttft_ema: GaugeVec,
    pub itl_ema: GaugeVec,
    pub waiting: GaugeVec,
    pub ttft_waiting: GaugeVec,
    pub ttft_threshold: GaugeVec,
    pub itl_threshold: GaugeVec,
    pub pressure: GaugeVec,
    pub reject_probability: GaugeVec,
    pub inflight: IntGaugeVec,
    pub policy_generation: IntGauge,
    pub policy_reloads: IntCounterVec,
    pub policy_last_reload_success: Gauge,
    pub policy_source_up: IntGauge,
    pub policy_present: IntGauge,
}

fn buckets(secs: &[f64]) -> Vec<f64> {
    secs.to_vec()
}

impl GatewayMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "sluice_requests_total",
                "Requests by model, endpoint, streaming and outcome.",
            ),
            &["model", "endpoint", "stream", "outcome"],
        )
        .unwrap();
        let hist = |name: &str, help: &str, b: Vec<f64>| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(b), &["model"]).unwrap()
        };
        let request_duration = hist(
            "sluice_request_duration_seconds",
            "Time from request received to response complete, admitted requests.",
            buckets(&[
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
            ]),
        );
        let ttft = hist(
            "sluice_ttft_seconds",
            "Time to first token: request sent upstream to first content-bearing chunk.",
            buckets(&[
                0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0,
            ]),
        );
        let itl = hist(
            "sluice_itl_seconds",
            "Inter-token latency: gap between consecutive content-bearing chunks.",
            buckets(&[
                0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
            ]),
        );
        let gauge =
            |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &["model"]).unwrap();
        let m = GatewayMetrics {
            requests,
            request_duration,
            ttft,
            itl,
            ttft_ema: gauge("sluice_ttft_ema_seconds", "Moving average of TTFT compared with the threshold."),
            itl_ema: gauge("sluice_itl_ema_seconds", "Moving average of ITL compared with the threshold."),
            waiting: gauge("sluice_waiting_requests", "Admitted requests still waiting for their first token."),
            ttft_waiting: gauge(
                "sluice_ttft_waiting_estimate_seconds",
                "TTFT estimated from the requests waiting for their first token (twice their mean age); the TTFT signal is the larger of this and the moving average.",
            ),
            ttft_threshold: gauge("sluice_ttft_threshold_seconds", "TTFT threshold of the policy."),
            itl_threshold: gauge("sluice_itl_threshold_seconds", "ITL threshold of the policy."),
            pressure: gauge("sluice_pressure_ratio", "max(TTFT average/threshold, ITL average/threshold)."),
            reject_probability: gauge(
                "sluice_reject_probability",
                "Probability that a standard-priority request is shed now.",
            ),
            inflight: IntGaugeVec::new(
                Opts::new("sluice_inflight_requests", "Requests being served."),
                &["model"],
            )
            .unwrap(),
            policy_generation: IntGauge::new(
                "sluice_policy_generation",
                "Generation of the policy in force (metadata.generation, or reload count for files).",
            )
            .unwrap(),
            policy_reloads: IntCounterVec::new(
                Opts::new(
                    "sluice_policy_reloads_total",
                    "Policy loads by result: success, error (invalid policy), watch_error (an incident of the Kubernetes watch).",
                ),
                &["result"],
            )
            .unwrap(),
            policy_last_reload_success: Gauge::new(
                "sluice_policy_last_reload_successful",
                "1 if the last policy load succeeded, 0 if the last good policy is kept after an error.",
            )
            .unwrap(),
            policy_source_up: IntGauge::new(
                "sluice_policy_source_up",
                "1 while the policy source (file or Kubernetes watch) is readable.",
            )
            .unwrap(),
            policy_present: IntGauge::new(
                "sluice_policy_present",
                "1 while the policy object exists; 0 after it was deleted (the last policy keeps serving).",
            )
            .unwrap(),
            registry,
        };
        // Every family is registered exactly once: a family left out here would silently
        // vanish from /metrics, so the list is checked by a test.
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.requests.clone()),
            Box::new(m.request_duration.clone()),
            Box::new(m.ttft.clone()),
            Box::new(m.itl.clone()),
            Box::new(m.ttft_ema.clone()),
            Box::new(m.itl_ema.clone()),
            Box::new(m.waiting.clone()),
            Box::new(m.ttft_waiting.clone()),
            Box::new(m.ttft_threshold.clone()),
            Box::new(m.itl_threshold.clone()),
            Box::new(m.pressure.clone()),
            Box::new(m.reject_probability.clone()),
            Box::new(m.inflight.clone()),
            Box::new(m.policy_generation.clone()),
            Box::new(m.policy_reloads.clone()),
            Box::new(m.policy_last_reload_success.clone()),
            Box::new(m.policy_source_up.clone()),
            Box::new(m.policy_present.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }

    /// The text exposition, with the limiter gauges refreshed from `limiter` at `now`.
    pub fn render(&self, limiter: Option<&Limiter>, now: Duration) -> String {
        for g in [
            &self.ttft_ema,
            &self.itl_ema,
            &self.waiting,
            &self.ttft_waiting,
            &self.ttft_threshold,
            &self.itl_threshold,
            &self.pressure,
            &self.reject_probability,
        ] {
            g.reset();
        }
        if let Some(l) = limiter {
            for r in l.readings(now) {
                let labels = [r.label];
                self.ttft_ema.with_label_values(&labels).set(r.ttft);
                self.itl_ema.with_label_values(&labels).set(r.itl);
                self.waiting
                    .with_label_values(&labels)
                    .set(f64::from(r.waiting));
                self.ttft_waiting
                    .with_label_values(&labels)
                    .set(r.waiting_ttft);
                self.ttft_threshold
                    .with_label_values(&labels)
                    .set(r.thresholds.ttft);
                self.itl_threshold
                    .with_label_values(&labels)
                    .set(r.thresholds.itl);
                self.pressure.with_label_values(&labels).set(r.pressure);
                self.reject_probability
                    .with_label_values(&labels)
                    .set(r.reject_probability);
            }
        }
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding does not fail");
        String::from_utf8(out).expect("exposition is UTF-8")
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Per-request metric handles resolved once (label lookups off the per-chunk path).
pub struct RequestMetrics {
    pub ttft: Histogram,
    pub itl: Histogram,
    pub duration: Histogram,
}

impl RequestMetrics {
    pub fn new(m: &GatewayMetrics, model: &str) -> Self {
        RequestMetrics {
            ttft: m.ttft.with_label_values(&[model]),
            itl: m.itl.with_label_values(&[model]),
            duration: m.request_duration.with_label_values(&[model]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_exported() {
        let m = GatewayMetrics::new();
        // Touch the labelled families so they have a series.
        m.requests
            .with_label_values(&["m", "chat_completions", "true", "success"])
            .inc();
        m.request_duration.with_label_values(&["m"]).observe(0.1);
        m.ttft.with_label_values(&["m"]).observe(0.1);
        m.itl.with_label_values(&["m"]).observe(0.01);
        m.inflight.with_label_values(&["m"]).inc();
        m.policy_reloads.with_label_values(&["success"]).inc();
        let limiter = Limiter::new(crate::limiter::LimiterConfig {
            mode: crate::limiter::Mode::Enforce,
            scope: crate::limiter::Scope::PerModel,
            defaults: crate::limiter::Thresholds {
                ttft: 1.0,
                itl: 0.05,
                time_constant: 15.0,
            },
            models: vec![(
                "m".into(),
                crate::limiter::Thresholds {
                    ttft: 1.0,
                    itl: 0.05,
                    time_constant: 15.0,
                },
            )],
            shedding: crate::limiter::Shedding::default(),
            max_dynamic_keys: 4,
        });
        let text = m.render(Some(&limiter), Duration::from_secs(1));
        for name in [
            "sluice_requests_total",
            "sluice_request_duration_seconds",
            "sluice_ttft_seconds",
            "sluice_itl_seconds",
            "sluice_ttft_ema_seconds",
            "sluice_itl_ema_seconds",
            "sluice_waiting_requests",
            "sluice_ttft_waiting_estimate_seconds",
            "sluice_ttft_threshold_seconds",
            "sluice_itl_threshold_seconds",
            "sluice_pressure_ratio",
            "sluice_reject_probability",
            "sluice_inflight_requests",
            "sluice_policy_generation",
            "sluice_policy_reloads_total",
            "sluice_policy_last_reload_successful",
            "sluice_policy_source_up",
            "sluice_policy_present",
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing from:\n{text}"
            );
        }
    }
}
