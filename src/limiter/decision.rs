//! The shedding decision (design §2): from the pressure ratio to a rejection probability,
//! and from the estimator state to Retry-After.
//!
//! ```text
//! r        = max(E_ttft / T_ttft, E_itl / T_itl) · f_priority   # f = 1, sheddable: > 1
//! p_reject = 0                                   if r ≤ 1
//!          = p_max · min(1, (r − 1)/(ramp − 1))  otherwise        # ramp = 1: p_max at once
//! ```
//! Critical requests are never shed. `p_max < 1` lets probe requests through while shedding,
//! so fresh samples keep arriving and the gate opens as soon as the server recovers.
//!
//! Retry-After is the time until `r` falls back to 1 with no new samples (the larger of the
//! two signals' times, see [`super::estimator`]), stretched by a uniform jitter factor in
//! `[1, 1 + jitter)` so rejected clients do not return in lockstep, then capped; whole seconds
//! for the `Retry-After` header (at least 1) and milliseconds for `retry-after-ms`.

use std::str::FromStr;
use std::time::Duration;

/// Request priority, from the `x-sluice-priority` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Priority {
    /// Never shed by the latency gate.
    Critical,
    #[default]
    Standard,
    /// Shed first: its pressure is scaled up by the policy's sheddable factor.
    Sheddable,
}

impl Priority {
    pub const HEADER: &'static str = "x-sluice-priority";

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Standard => "standard",
            Priority::Sheddable => "sheddable",
        }
    }
}

/// An `x-sluice-priority` value that is not one of the three classes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown priority {0:?}: expected critical, standard or sheddable")]
pub struct UnknownPriority(pub String);

impl FromStr for Priority {
    type Err = UnknownPriority;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            v if v.eq_ignore_ascii_case("critical") => Ok(Priority::Critical),
            v if v.eq_ignore_ascii_case("standard") => Ok(Priority::Standard),
            v if v.eq_ignore_ascii_case("sheddable") => Ok(Priority::Sheddable),
            _ => Err(UnknownPriority(s.to_owned())),
        }
    }
}

/// What happens to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    /// Rejected: answer 429 with Retry-After.
    Reject,
    /// Shadow mode: would have been rejected, admitted anyway and counted.
    ShadowReject,
}

/// One admission decision; plain data, no allocation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub verdict: Verdict,
    /// Pressure ratio `r` for this request's priority (≥ 0; 1 means at the threshold).
    pub pressure: f64,
    /// Probability with which a request like this one is rejected now.
    pub reject_probability: f64,
    /// Set for Reject and ShadowReject: when to come back, jittered and capped.
    pub retry_after: Option<Duration>,
}

impl Decision {
    pub fn admitted(&self) -> bool {
        self.verdict != Verdict::Reject
    }
}

/// `p_reject(r)` for `p_max ∈ (0, 1]` and `ramp ≥ 1`.
#[inline]
pub fn reject_probability(pressure: f64, p_max: f64, ramp: f64) -> f64 {
    if pressure.is_nan() || pressure <= 1.0 {
        return 0.0;
    }
    if ramp <= 1.0 {
        return p_max;
    }
    p_max * ((pressure - 1.0) / (ramp - 1.0)).min(1.0)
}

/// Retry-After from the un-jittered wait in seconds, a uniform draw `u ∈ [0, 1)`, the jitter
/// fraction and the cap. Always at least 1 ms, at most `cap`.
#[inline]
pub fn retry_after(wait_secs: f64, u: f64, jitter: f64, cap: Duration) -> Duration {
    let cap_secs = cap.as_secs_f64();
    let secs = if wait_secs.is_finite() {
        (wait_secs * (1.0 + jitter * u)).min(cap_secs)
    } else {
        cap_secs
    };
    Duration::from_secs_f64(secs.max(0.001))
}

/// The `Retry-After` header value: whole seconds, rounded up, at least 1.
pub fn retry_after_header_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

/// The `retry-after-ms` header value: milliseconds, rounded up, at least 1.
pub fn retry_after_header_ms(d: Duration) -> u64 {
    (d.as_secs_f64() * 1000.0).ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probability_is_zero_at_or_below_the_threshold() {
        for r in [0.0, 0.5, 0.999, 1.0] {
            assert_eq!(reject_probability(r, 0.95, 1.5), 0.0, "r={r}");
        }
        assert_eq!(reject_probability(f64::NAN, 0.95, 1.5), 0.0);
    }

    #[test]
    fn probability_ramps_linearly_to_p_max_then_holds() {
        assert!((reject_probability(1.25, 0.9, 1.5) - 0.45).abs() < 1e-12);
        assert!((reject_probability(1.5, 0.9, 1.5) - 0.9).abs() < 1e-12);
        assert_eq!(reject_probability(10.0, 0.9, 1.5), 0.9);
        assert_eq!(reject_probability(f64::INFINITY, 0.9, 1.5), 0.9);
    }

    #[test]
    fn hard_cliff_rejects_everything_past_the_threshold() {
        assert_eq!(reject_probability(1.0, 1.0, 1.0), 0.0);
        assert_eq!(reject_probability(1.000_001, 1.0, 1.0), 1.0);
        assert_eq!(reject_probability(7.0, 1.0, 1.0), 1.0);
    }

    #[test]
    fn priority_parses_case_insensitively_and_refuses_unknown_values() {
        assert_eq!("critical".parse(), Ok(Priority::Critical));
        assert_eq!("Standard".parse(), Ok(Priority::Standard));
        assert_eq!(" SHEDDABLE ".parse(), Ok(Priority::Sheddable));
        let err = "urgent".parse::<Priority>().unwrap_err();
        assert_eq!(err, UnknownPriority("urgent".into()));
        assert!(err.to_string().contains("critical, standard or sheddable"));
    }

    #[test]
    fn retry_after_is_jittered_capped_and_rounded_up() {
        let cap = Duration::from_secs(60);
        assert_eq!(retry_after(2.0, 0.0, 0.2, cap), Duration::from_secs(2));
        let d = retry_after(2.0, 0.5, 0.2, cap);
        assert!((d.as_secs_f64() - 2.2).abs() < 1e-9);
        assert_eq!(retry_after(1e9, 0.3, 0.2, cap), cap);
        assert_eq!(retry_after(f64::INFINITY, 0.3, 0.2, cap), cap);
        assert_eq!(retry_after(0.0, 0.3, 0.2, cap), Duration::from_millis(1));
        assert_eq!(retry_after_header_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_header_secs(Duration::from_millis(2001)), 3);
        assert_eq!(retry_after_header_ms(Duration::from_micros(1500)), 2);
    }
}
