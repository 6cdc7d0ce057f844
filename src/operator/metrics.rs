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

    /// Counts one reconcile; `error` is empty unless `result` is `error`.
    pub fn reconciled(&self, result: &str, error: &str) {
        self.reconciles.with_label_values(&[result, error]).inc();
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
