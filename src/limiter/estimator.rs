//! The fading-evidence time-weighted moving average of TTFT and ITL samples.
//!
//! State: decayed sums `S` (of sample values) and `W` (of sample weights, each sample
//! weighing 1) and the time `t` of the last update; `τ` is the time constant and
//! `decay(Δ) = exp(-Δ/τ)`. With `d = decay(now − t)`, `S_d = S·d`, `W_d = W·d`:
//!
//! ```text
//! read(now)      = S_d / max(W_d, 1)
//! record(v, now) = if W_d < 1 { S_d := S_d · W_d }        // faded: the read, at weight W_d
//!                  if W_d > cap − 1 { scale S_d, W_d by (cap − 1)/W_d }
//!                  S := S_d + v;  W := W_d + 1;  t := now
//! ```
//!
//! While samples keep coming (`W_d ≥ 1`) the read is exactly the exponentially weighted mean
//! `Σ vᵢ e^{-(now−tᵢ)/τ} / Σ e^{-(now−tᵢ)/τ}`: unbiased (a constant stream of `v` reads `v`
//! whatever the sample rate) and unchanged by the passage of time alone. When the evidence
//! fades below one sample's worth, the read becomes `m · W_d` (the mean scaled by the evidence
//! left), which decays toward zero at rate 1/τ, so an idle limiter reopens.
//!
//! **Read/write consistency.** A simpler formula writes `S := S_d + v` in the faded
//! regime too. The read then counts the missing weight `1 − W_d` as zero-valued evidence but
//! the write drops it: after a long idle gap (say `m = 100`, `W_d = 0.009`, read `0.9`), one
//! sample `0.9` produced `(0.9 + 0.9)/1.009 ≈ 1.78` — the read said "below the threshold of 1"
//! and the next sample put it back above: flapping. Here the write builds on exactly what the
//! read reports: the faded state is the read value carrying weight `W_d`, so the new estimate
//! `(W_d·read + v)/(W_d + 1)` always lies between the read and the new sample.
//!
//! The price of consistency: a write that finds the evidence faded carries the (lowered)
//! read forward, so samples sparser than one per `τ·ln 2` read low in steady state (about
//! 0.80·v at one sample per τ, pinned by a test). Denser streams find `W_d ≥ 1` at every
//! write and are exact. At such rates a server is idle by the limiter's standards, and
//! reading low there only admits.
//!
//! **Evidence cap.** Capping `W` at `cap` (scaling `S` with it, so the mean is unchanged)
//! bounds how long old evidence holds the read up after traffic stops: the read starts to
//! fall after at most `τ·ln(cap)`. At high sample rates it also makes each new sample weigh
//! at least `1/cap`.
//!
//! **Time to fall to a level** (for Retry-After), with no new samples: the read stays at the
//! mean until `W_d` reaches 1 (after `τ·ln W_d`), then decays as `e^{-Δ/τ}`, so
//! `Δ(level) = τ·(ln max(W_d, 1) + ln(read/level))` when `read > level`, else 0.

/// Why a latency sample was not recorded.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum InvalidSample {
    #[error("latency sample is not a number")]
    NaN,
    #[error("latency sample is infinite")]
    Infinite,
    #[error("latency sample {0} is negative")]
    Negative(f64),
}

/// One moving average. Plain data (`Copy`); callers provide `τ`, the evidence cap and the time,
/// all in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Estimator {
    /// Decayed sum of sample values as of `t` (seconds of latency).
    sum: f64,
    /// Decayed sum of sample weights as of `t` (samples; each sample weighs 1).
    weight: f64,
    /// Time of the last update, seconds on the limiter's clock.
    t: f64,
}

impl Estimator {
    /// `(S_d, W_d)`: the state decayed to `now`. Time running backwards counts as no time.
    #[inline]
    fn decayed(&self, now: f64, tau: f64) -> (f64, f64) {
        let dt = now - self.t;
        if dt <= 0.0 {
            return (self.sum, self.weight);
        }
        let d = (-dt / tau).exp();
        (self.sum * d, self.weight * d)
    }

    /// The moving average at `now`, in the samples' unit; 0 with no evidence.
    #[inline]
    pub fn read(&self, now: f64, tau: f64) -> f64 {
        let (s, w) = self.decayed(now, tau);
        s / w.max(1.0)
    }

    /// The evidence left at `now`, in samples.
    #[inline]
    pub fn evidence(&self, now: f64, tau: f64) -> f64 {
        self.decayed(now, tau).1
    }

    /// Records sample `v` taken at `now`. `cap ≥ 1` bounds the evidence. A NaN, infinite or
    /// negative sample is refused and leaves the state as it was.
    #[inline]
    pub fn record(&mut self, v: f64, now: f64, tau: f64, cap: f64) -> Result<(), InvalidSample> {
        if v.is_nan() {
            return Err(InvalidSample::NaN);
        }
        if v.is_infinite() {
            return Err(InvalidSample::Infinite);
        }
        if v < 0.0 {
            return Err(InvalidSample::Negative(v));
        }
        let (mut s, mut w) = self.decayed(now, tau);
        if w < 1.0 {
            // Faded: the read is `s`; carry it forward at the weight that is left.
            s *= w;
        }
        let keep = (cap - 1.0).max(0.0);
        if w > keep {
            if keep == 0.0 {
                s = 0.0;
                w = 0.0;
            } else {
                s *= keep / w;
                w = keep;
            }
        }
        self.sum = s + v;
        self.weight = w + 1.0;
        if now > self.t {
            self.t = now;
        }
        Ok(())
    }

    /// Seconds from `now` until the read falls to `level` or below if no sample arrives
    /// (0 if it already is; infinite for a non-positive level above a positive read).
    pub fn seconds_until_at_most(&self, level: f64, now: f64, tau: f64) -> f64 {
        let (s, w) = self.decayed(now, tau);
        let read = s / w.max(1.0);
        if read <= level {
            return 0.0;
        }
        if level <= 0.0 {
            return f64::INFINITY;
        }
        tau * (w.max(1.0).ln() + (read / level).ln())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CAP: f64 = 1e12; // effectively uncapped unless a test says otherwise

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * (1.0 + a.abs().max(b.abs()))
    }

    #[test]
    fn exact_values_against_hand_computed_closed_forms() {
        let tau = 10.0;
        let mut e = Estimator::default();
        assert_eq!(e.read(0.0, tau), 0.0, "no evidence reads 0");
        e.record(1.0, 0.0, tau, CAP).unwrap();
        assert_eq!(e.read(0.0, tau), 1.0);
        // Second sample one τ later: S = e⁻¹·1 + 3, W = e⁻¹ + 1 (W_d = e⁻¹ < 1, so the faded
        // read e⁻¹ is carried at weight e⁻¹: S_d = e⁻¹·e⁻¹).
        e.record(3.0, 10.0, tau, CAP).unwrap();
        let d = (-1.0f64).exp();
        let expect = (d * d + 3.0) / (d + 1.0);
        assert!(
            close(e.read(10.0, tau), expect),
            "{} vs {expect}",
            e.read(10.0, tau)
        );
        // Two samples at the same instant: the plain mean, and time alone does not change it
        // while the evidence stays ≥ 1.
        let mut e = Estimator::default();
        e.record(1.0, 5.0, tau, CAP).unwrap();
        e.record(3.0, 5.0, tau, CAP).unwrap();
        assert!(close(e.read(5.0, tau), 2.0));
        assert!(close(e.read(5.0 + tau * 2f64.ln() * 0.5, tau), 2.0));
        // After W_d has fallen to 1 (τ·ln 2 later) the read decays as e^{-Δ/τ}.
        let t1 = 5.0 + tau * 2f64.ln();
        assert!(close(e.read(t1, tau), 2.0));
        assert!(close(e.read(t1 + tau, tau), 2.0 * d));
    }

    #[test]
    fn steady_state_is_unbiased_whatever_the_sample_rate() {
        for (interval, tau) in [(0.001, 15.0), (0.05, 15.0), (1.0, 15.0), (0.2, 1.0)] {
            let mut e = Estimator::default();
            let mut t = 0.0;
            for _ in 0..20_000 {
                e.record(0.25, t, tau, CAP).unwrap();
                t += interval;
            }
            let r = e.read(t - interval, tau);
            // The "decay the value on every write" pitfall would read about half.
            assert!((r - 0.25).abs() < 1e-9, "interval {interval}: read {r}");
        }
    }

    #[test]
    fn samples_sparser_than_tau_read_low_by_the_closed_form() {
        // The price of read/write consistency: at one sample per τ every write lands in the
        // faded regime. Steady state: W* = 1/(1−q), W_d = q·W*, S* = v/(1 − q·W_d) with
        // q = e⁻¹, so the read just after a sample is S*/W* ≈ 0.80·v.
        let (tau, v) = (10.0, 1.0);
        let mut e = Estimator::default();
        for i in 0..200 {
            e.record(v, i as f64 * tau, tau, CAP).unwrap();
        }
        let q = (-1.0f64).exp();
        let w_star = 1.0 / (1.0 - q);
        let s_star = v / (1.0 - q * q * w_star);
        let r = e.read(199.0 * tau, tau);
        assert!(close(r, s_star / w_star), "{r} vs {}", s_star / w_star);
        assert!((r - 0.80).abs() < 0.01);
    }

    #[test]
    fn idle_decay_follows_the_closed_form() {
        let tau = 15.0;
        let mut e = Estimator::default();
        for i in 0..100 {
            e.record(2.0, i as f64 * 0.01, tau, CAP).unwrap();
        }
        let t0 = 0.99;
        let w0 = e.evidence(t0, tau);
        assert!(w0 > 1.0);
        // The mean (2, less the start-up carry of the first, faded sample: see the module
        // docs) holds until the evidence decays to one sample, then decays at 1/τ.
        let m = e.read(t0, tau);
        assert!((m - 2.0).abs() < 1e-3, "{m}");
        let t_fade = t0 + tau * w0.ln();
        assert!(close(e.read(t_fade - 0.001, tau), m));
        for k in [0.5, 1.0, 3.0] {
            let r = e.read(t_fade + k * tau, tau);
            assert!(close(r, m * (-k).exp()), "k={k}: {r}");
        }
        assert!(e.read(t_fade + 50.0 * tau, tau) < 1e-20);
    }

    #[test]
    fn a_sample_below_the_threshold_after_idle_never_pushes_the_read_above_it() {
        // The pitfall: a high mean faded by idleness reads below the threshold;
        // a new sample below the threshold must keep it there.
        let (tau, threshold) = (10.0, 1.0);
        let mut e = Estimator::default();
        e.record(100.0, 0.0, tau, CAP).unwrap();
        // Find the moment the faded read is 0.9 (m·e^{-Δ/τ} = 0.9).
        let t = tau * (100.0f64 / 0.9).ln();
        let before = e.read(t, tau);
        assert!(close(before, 0.9));
        e.record(0.9, t, tau, CAP).unwrap();
        let after = e.read(t, tau);
        assert!(after <= threshold, "read {after} went above the threshold");
        assert!(
            close(after, 0.9),
            "between read 0.9 and sample 0.9: {after}"
        );
        // The seed formula would have produced (0.9 + 0.9)/(1 + W_d) ≈ 1.79.
    }

    #[test]
    fn evidence_cap_bounds_weight_and_time_held_shut() {
        let (tau, cap) = (10.0, 200.0);
        let mut e = Estimator::default();
        for i in 0..100_000 {
            e.record(5.0, i as f64 * 0.001, tau, cap).unwrap();
        }
        let now = 99.999;
        assert!(e.evidence(now, tau) <= cap + 1e-9);
        assert!(
            close(e.read(now, tau), 5.0),
            "the cap keeps the mean unbiased"
        );
        // Read starts falling at most τ·ln(cap) after the last sample.
        let fall = now + tau * cap.ln();
        assert!(e.read(fall + tau, tau) < 5.0 * (-0.99f64).exp());
        // cap = 1: every sample replaces the last.
        let mut e = Estimator::default();
        e.record(5.0, 0.0, tau, 1.0).unwrap();
        e.record(1.0, 0.0, tau, 1.0).unwrap();
        assert_eq!(e.read(0.0, tau), 1.0);
    }

    #[test]
    fn invalid_samples_are_refused_without_touching_state() {
        let tau = 10.0;
        let mut e = Estimator::default();
        e.record(0.5, 1.0, tau, CAP).unwrap();
        let before = e;
        assert_eq!(e.record(f64::NAN, 2.0, tau, CAP), Err(InvalidSample::NaN));
        assert_eq!(
            e.record(f64::INFINITY, 2.0, tau, CAP),
            Err(InvalidSample::Infinite)
        );
        assert_eq!(
            e.record(f64::NEG_INFINITY, 2.0, tau, CAP),
            Err(InvalidSample::Infinite)
        );
        assert_eq!(
            e.record(-0.1, 2.0, tau, CAP),
            Err(InvalidSample::Negative(-0.1))
        );
        assert_eq!(e, before);
        assert_eq!(e.read(1.0, tau), 0.5);
    }

    #[test]
    fn time_running_backwards_counts_as_no_time() {
        let tau = 10.0;
        let mut e = Estimator::default();
        e.record(1.0, 10.0, tau, CAP).unwrap();
        e.record(3.0, 5.0, tau, CAP).unwrap();
        assert!(close(e.read(10.0, tau), 2.0));
        assert!(close(e.read(0.0, tau), 2.0));
    }

    #[test]
    fn seconds_until_at_most_matches_reads() {
        let tau = 15.0;
        let mut e = Estimator::default();
        for i in 0..50 {
            e.record(3.0, i as f64 * 0.1, tau, 200.0).unwrap();
        }
        let now = 4.9;
        let dt = e.seconds_until_at_most(1.0, now, tau);
        let (w, m) = (e.evidence(now, tau), e.read(now, tau));
        assert!(close(dt, tau * (w.ln() + m.ln())));
        assert!(close(e.read(now + dt, tau), 1.0));
        assert!(e.read(now + dt - 0.01, tau) > 1.0);
        assert_eq!(e.seconds_until_at_most(3.5, now, tau), 0.0);
        assert_eq!(e.seconds_until_at_most(0.0, now, tau), f64::INFINITY);
    }

    proptest! {
        /// While the evidence never fades below one sample, the read is a weighted mean of the
        /// samples since the last fade (a fade carries the faded read forward as a sample);
        /// it is never NaN, never negative and never above the largest sample.
        #[test]
        fn read_stays_within_the_samples(
            tau in 1.0f64..60.0,
            cap in prop_oneof![Just(1e12), 1.0f64..500.0],
            steps in proptest::collection::vec((0.0f64..20.0, 0.0f64..10.0), 1..200),
        ) {
            let mut e = Estimator::default();
            let mut t = 0.0;
            let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
            let mut max_ever = 0.0f64;
            for (gap, v) in steps {
                t += gap;
                let w_before = e.evidence(t, tau);
                let r_before = e.read(t, tau);
                if w_before < 1.0 {
                    // A fade: the window restarts from the faded read (when there is any).
                    if w_before > 0.0 { lo = r_before; hi = r_before; } else { lo = f64::INFINITY; hi = f64::NEG_INFINITY; }
                }
                e.record(v, t, tau, cap).unwrap();
                lo = lo.min(v);
                hi = hi.max(v);
                max_ever = max_ever.max(v);
                let r = e.read(t, tau);
                prop_assert!(!r.is_nan());
                prop_assert!(r >= 0.0);
                prop_assert!(r <= max_ever * (1.0 + 1e-12) + 1e-12);
                prop_assert!(r >= lo * (1.0 - 1e-12) - 1e-12 && r <= hi * (1.0 + 1e-12) + 1e-12,
                    "read {} outside [{}, {}]", r, lo, hi);
                // Reads later in time never rise without a sample.
                let later = e.read(t + gap, tau);
                prop_assert!(later <= r * (1.0 + 1e-12) + 1e-15);
            }
        }
    }
}
