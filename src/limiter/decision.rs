//! The shedding decision's maths (the first memoryless ramp, extended by the goodput
//! benchmark): from the pressure ratio to a rejection probability, the integral, and from a
//! wait to the Retry-After value. Pure functions of numbers: the wait itself is read from a
//! key's state by `KeyState::retry_wait` (in `state`), which uses nothing from here.
//!
//! ```text
//! r        = max(TTFT signal / T_ttft, E_itl / T_itl) · f_priority   # f = 1, sheddable: > 1
//! ramp(r)  = 0                                   if r ≤ 1
//!          = p_max · min(1, (r − 1)/(ramp − 1))  otherwise        # ramp = 1: p_max at once
//! p_reject = min(p_max, 1 − (1 − ramp(r)) · exp(I))                # I ≤ 0, see `integrate`
//! ```
//! The TTFT signal is the larger of the moving average and the estimate from requests still
//! waiting for their first token (see `KeyState::waiting_ttft` in the parent module).
//! `ramp(r)` alone was sluice's first, memoryless curve; the goodput benchmark showed it flapping
//! under overload (shut while stale samples drain, wide open — and flooding the server — the
//! moment they have), so the admitted fraction also carries an integral `I` of the pressure's
//! distance from 1, as PIE (RFC 8033) does for packet queues, on a logarithmic scale so the
//! loop's gain does not grow with the overload. Critical requests are never shed.
//! `p_max < 1` lets probe requests through while shedding, so fresh samples keep arriving and
//! the gate opens as soon as the server recovers. `ramp = 1` is the hard cliff, without `I`.
//!
//! Retry-After is the wait from every signal that can shed (`Wait`): the time until the
//! averages fall back to their thresholds with no new samples, until the integral is back at
//! 0, until the requests waiting for a first token have drained, until the requests in flight
//! are back under the concurrency ceiling. At least 100 ms, stretched by a uniform jitter
//! factor in `[1, 1 + jitter)` so rejected clients do not return in lockstep, then capped;
//! whole seconds for the `Retry-After` header (at least 1) and milliseconds for
//! `retry-after-ms`.

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

/// The rejection probability with memory. The admitted fraction is the product of the
/// memoryless ramp's (`1 − reject_probability(r)`, which reacts at once to pressure above
/// the threshold) and `exp(integral)`, a log-domain integral of the pressure's distance from 1
/// ([`integrate`]). Under steady overload the integral settles where the admitted load keeps
/// the pressure at 1, whatever the overload, and when a burst of pressure passes the gate
/// reopens only as far as the integral says, instead of flooding the server again (the
/// memoryless curve alone flaps between open and shut). Working on the logarithm of the
/// admitted fraction makes each step a relative change of the admitted load, so the loop's
/// gain does not grow with the offered load. `ramp = 1` is the hard cliff (no integral).
#[inline]
pub fn reject_probability_pi(pressure: f64, integral: f64, shed: &super::Shedding) -> f64 {
    let (p_max, ramp) = (shed.max_reject_probability, shed.ramp);
    let p = reject_probability(pressure, p_max, ramp);
    if ramp <= 1.0 || integral == 0.0 {
        return p;
    }
    (1.0 - (1.0 - p) * integral.exp()).clamp(0.0, p_max)
}

/// The smallest admitted fraction the integral alone may hold the gate at, so that with
/// `maxRejectProbability: 1` (where `ln(1 − p_max)` is −∞) it stays bounded: it never sinks
/// below `ln(0.001)` ≈ −6.9, and returns from there to 0 within 6.9 · (ramp − 1) time constants
/// once the pressure is gone (3.5 τ at the default ramp 1.5).
pub const MIN_ADMITTED_FRACTION: f64 = 1e-3;

/// The integral (the log of the admitted fraction it allows, in
/// `[ln(max(1 − p_max, MIN_ADMITTED_FRACTION)), 0]`) after `dt_tau` time constants at
/// `pressure`: it falls by up to 1 per time constant while the pressure is at or past the
/// ramp's end, and rises by up to 1/(ramp − 1) per time constant when there is no pressure at
/// all. Stays 0 for the hard cliff.
#[inline]
pub fn integrate(integral: f64, pressure: f64, dt_tau: f64, shed: &super::Shedding) -> f64 {
    let (p_max, ramp) = (shed.max_reject_probability, shed.ramp);
    if pressure.is_nan() || ramp <= 1.0 {
        return 0.0;
    }
    let error = (pressure.min(ramp) - 1.0) / (ramp - 1.0);
    let next = integral - error * dt_tau;
    if next >= 0.0 {
        return 0.0; // the common case without pressure: no logarithm to take
    }
    next.max((1.0 - p_max).max(MIN_ADMITTED_FRACTION).ln())
}

/// The shortest Retry-After: a client told to come back sooner would find the same state.
pub const MIN_RETRY_AFTER: Duration = Duration::from_millis(100);

/// Retry-After from the un-jittered wait in seconds, a uniform draw `u ∈ [0, 1)`, the jitter
/// fraction and the cap: `max(wait, 100 ms) · (1 + jitter·u)`, at most `cap`.
#[inline]
pub fn retry_after(wait_secs: f64, u: f64, jitter: f64, cap: Duration) -> Duration {
    let cap_secs = cap.as_secs_f64();
    let secs = if wait_secs.is_finite() {
        (wait_secs.max(MIN_RETRY_AFTER.as_secs_f64()) * (1.0 + jitter * u)).min(cap_secs)
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
    fn the_integral_is_bounded_even_when_everything_may_be_shed() {
        let shed = crate::limiter::Shedding {
            max_reject_probability: 1.0,
            ..crate::limiter::Shedding::default()
        };
        let floor = MIN_ADMITTED_FRACTION.ln();
        // An hour of overload, in one step and in many.
        assert_eq!(integrate(0.0, 10.0, 900.0, &shed), floor);
        let mut i = 0.0;
        for _ in 0..10_000 {
            i = integrate(i, 3.0, 0.1, &shed);
        }
        assert!(i.is_finite() && i >= floor, "{i}");
        // Without pressure it is back at 0 within 6.9 · (ramp − 1) = 3.45 τ.
        let back = integrate(i, 0.0, 3.46, &shed);
        assert_eq!(back, 0.0);
        assert!(integrate(i, 0.0, 3.0, &shed) < 0.0);
        // The probability it gives stays below 1 at the floor: probes get through unless the
        // ramp itself is at p_max = 1.
        let p = reject_probability_pi(1.0, floor, &shed);
        assert!((p - 0.999).abs() < 1e-9, "{p}");
        // p_max below 1 keeps its own, higher floor.
        let usual = crate::limiter::Shedding::default();
        assert_eq!(integrate(0.0, 10.0, 900.0, &usual), (1.0f64 - 0.95).ln());
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
        assert_eq!(retry_after(0.0, 0.0, 0.2, cap), MIN_RETRY_AFTER);
        let d = retry_after(0.01, 0.5, 0.2, cap);
        assert!(
            (d.as_secs_f64() - 0.11).abs() < 1e-9,
            "the floor is jittered too"
        );
        assert_eq!(retry_after_header_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_header_secs(Duration::from_millis(2001)), 3);
        assert_eq!(retry_after_header_ms(Duration::from_micros(1500)), 2);
    }

    fn shed(p_max: f64, ramp: f64) -> crate::limiter::Shedding {
        crate::limiter::Shedding {
            max_reject_probability: p_max,
            ramp,
            ..Default::default()
        }
    }

    #[test]
    fn the_integral_moves_by_the_ramp_slope_per_time_constant_and_stays_in_bounds() {
        let s = shed(0.9, 1.5);
        // At the ramp's end (or beyond: clamped) it falls by 1 per τ.
        assert!((integrate(0.0, 1.5, 0.5, &s) + 0.5).abs() < 1e-12);
        assert!((integrate(0.0, 9.0, 0.5, &s) + 0.5).abs() < 1e-12);
        // Never below ln(1 − p_max), never above 0.
        assert!((integrate(-2.0, 1.5, 10.0, &s) - 0.1f64.ln()).abs() < 1e-12);
        assert_eq!(integrate(-0.3, 0.0, 10.0, &s), 0.0);
        // With no pressure it rises by 1/(ramp − 1) = 2 per τ; at r = 1 it holds.
        assert!((integrate(-1.0, 0.0, 0.25, &s) + 0.5).abs() < 1e-12);
        assert_eq!(integrate(-1.0, 1.0, 3.0, &s), -1.0);
        // The hard cliff has none; NaN pressure resets it.
        assert_eq!(integrate(-1.0, 2.0, 1.0, &shed(1.0, 1.0)), 0.0);
        assert_eq!(integrate(-1.0, f64::NAN, 1.0, &s), 0.0);
    }

    #[test]
    fn the_admitted_fraction_is_the_product_of_the_ramp_and_the_integral() {
        let s = shed(0.9, 1.5);
        // With no integral it is the memoryless ramp.
        for r in [0.5, 1.0, 1.25, 1.5, 3.0] {
            assert!(
                (reject_probability_pi(r, 0.0, &s) - reject_probability(r, 0.9, 1.5)).abs() < 1e-12
            );
        }
        // Below the threshold the integral alone sheds: admitted fraction exp(I).
        assert!((reject_probability_pi(0.5, (0.5f64).ln(), &s) - 0.5).abs() < 1e-12);
        // Both: 1 − (1 − 0.45) · 0.5.
        assert!((reject_probability_pi(1.25, (0.5f64).ln(), &s) - 0.725).abs() < 1e-12);
        // Never above p_max.
        assert_eq!(reject_probability_pi(3.0, (0.1f64).ln(), &s), 0.9);
        // The hard cliff ignores the integral.
        let cliff = shed(1.0, 1.0);
        assert_eq!(reject_probability_pi(0.9, -3.0, &cliff), 0.0);
        assert_eq!(reject_probability_pi(1.1, 0.0, &cliff), 1.0);
    }
}
