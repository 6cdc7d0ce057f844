//! The limiter's configuration: thresholds per key, the shape of shedding, mode and scope.
//! Built from a validated policy (`policy::PolicyConfig`); a reload swaps it without touching
//! the per-key state (see [`super::state`]).

use std::time::Duration;

/// Enforce or only observe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Enforce,
    Shadow,
}

/// What shares one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    #[default]
    PerModel,
    Global,
}

/// The two latency signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Time to first token: request sent upstream → first content-bearing chunk.
    Ttft = 0,
    /// Inter-token latency: gap between consecutive content-bearing chunks of one stream.
    Itl = 1,
}

/// Thresholds of one key, all in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// TTFT threshold, seconds (> 0).
    pub ttft: f64,
    /// ITL threshold, seconds (> 0).
    pub itl: f64,
    /// Time constant τ of both moving averages, seconds (≥ 1 in policies).
    pub time_constant: f64,
}

/// Shape of shedding and Retry-After.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shedding {
    /// `p_max ∈ (0, 1]`.
    pub max_reject_probability: f64,
    /// `ramp ≥ 1`: pressure at which `p_max` is reached.
    pub ramp: f64,
    /// Evidence cap in samples (≥ 1).
    pub max_evidence: f64,
    /// Factor (> 1) by which a sheddable request's pressure is scaled up.
    pub sheddable_factor: f64,
    /// Retry-After is stretched by a uniform factor in `[1, 1 + jitter)`.
    pub retry_after_jitter: f64,
    /// Longest Retry-After.
    pub retry_after_cap: Duration,
    /// Use the good concurrency: work conservation below it, the ceiling at it (see
    /// [`super::concurrency`]). Without it, a key with nothing in flight still admits.
    pub adaptive_concurrency: bool,
}

impl Default for Shedding {
    fn default() -> Self {
        Shedding {
            max_reject_probability: 0.95,
            ramp: 1.5,
            max_evidence: 200.0,
            sheddable_factor: 1.25,
            retry_after_jitter: 0.2,
            retry_after_cap: Duration::from_secs(60),
            adaptive_concurrency: true,
        }
    }
}

/// Everything a limiter needs, validated (see `policy::PolicyConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct LimiterConfig {
    pub mode: Mode,
    pub scope: Scope,
    pub defaults: Thresholds,
    /// Per-model thresholds; names are unique.
    pub models: Vec<(String, Thresholds)>,
    pub shedding: Shedding,
}
