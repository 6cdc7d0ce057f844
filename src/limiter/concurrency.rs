//! What the limiter knows about concurrency, per key: the requests in flight, the concurrency
//! at which the engine last met the thresholds, the latency the engine gives at low
//! concurrency, and the rates of first tokens and of requests ending.
//!
//! - **Good concurrency `G`.** A request whose first token came within the TTFT threshold, at
//!   a moment the ITL average was within its threshold, shows that the engine met both at the
//!   concurrency the request was admitted at (the requests in flight then, itself included):
//!   `G` rises to that count. A first token that misses a threshold at or below `G` lowers it
//!   by 1/16, and `G` halves after `8τ` without a change, so it is forgotten when the engine
//!   or the load changes.
//! - **Work conservation.** With nothing in flight, or fewer requests in flight than `G`, no
//!   request is shed whatever the latency: admitting cannot build a queue there, and the
//!   latency seen is what the engine gives at that concurrency.
//! - **Ceiling.** Latency lags admissions: at the onset of an overload the requests admitted
//!   before the first late token are already queued, and a controller that waits for the
//!   latency to cross its threshold holds the queue at the threshold. So a request finding
//!   `max(4, G)` or more requests in flight is shed with probability `p_max` once a queue is
//!   starting: the pressure is at 0.5 (latency at half a threshold), or the requests waiting
//!   for a first token, this one included, would take longer than the TTFT threshold to get
//!   a slot at the rate the engine frees slots (requests ending; first tokens before any has
//!   ended). The second only counts once a request admitted above `G` has missed a threshold
//!   in the last `8τ`: the engine showed its limit there (at low load requests also end
//!   slowly, because few arrive). With long generations a slot frees rarely: one request
//!   admitted into a full batch waits longer than the threshold while the latency signals
//!   are still low. A request past the ceiling is shed always (no probe) when the second
//!   condition holds, or while the requests already waiting would take longer than the
//!   threshold to get a slot, or have waited longer than it on average: a probe would only
//!   wait past the threshold, and with long generations hold a slot for seconds without
//!   meeting the SLO. (Probing resumes when the evidence lapses: after `8τ` without a miss
//!   above `G` the next request at the ceiling is admitted, and renews the evidence if it
//!   misses.) Otherwise it is shed with probability `p_max`, and `G` moves as a learned
//!   concurrency limit: up to the concurrency of each probe (the `1 − p_max` admitted past the
//!   ceiling) whose first token comes in time, down by 1/16 for each late one. Without a
//!   queue the ceiling does not bind: a client raising its concurrency on an engine that
//!   answers fast is not shed, and `G` follows it up. In the spirit of Envoy's adaptive
//!   concurrency and Netflix's Gradient2, but anchored on the policy's absolute thresholds
//!   instead of a drifting minimum latency. (Measured in `benches/goodput.rs`: a ceiling of
//!   1.5·G or 1.2·G instead of G let the queue grow to the threshold; a ceiling binding from
//!   pressure 0.3 held the engine below its capacity, from 0.8 let the onset queue build; the
//!   slot rule closed most of the gap to a hand-tuned cap on long generations. See
//!   docs/benchmarks.md.)
//! - **Low-concurrency baseline.** Samples taken with at most 4 requests in flight measure
//!   what the engine gives when it is nearly idle (after 8 samples). When that baseline is
//!   above a threshold, the threshold is unreachable for this engine: shedding cannot bring
//!   latency under it, only starve the engine. The limiter then compares that signal with
//!   `1.5 × baseline` instead (shedding still protects against queues and overload), exports
//!   `sluice_thresholds_unreachable{model} 1` and logs once per incident.

/// Samples taken with at most this many requests in flight form the low-concurrency
/// baseline; it is also the smallest ceiling.
pub const LOW_CONCURRENCY: u32 = 4;
/// The ceiling binds once the TTFT signal has come this far from the engine's
/// low-concurrency TTFT (0) towards the threshold (1), i.e. once latency shows the start of a
/// queue, not while the engine answers fast (a client raising its concurrency on an idle
/// engine is not shed); or, after the engine showed its limit, once a new request would wait
/// past the threshold for a slot (see [`super::Limiter::decide`]).
pub const CEILING_PRESSURE: f64 = 0.5;
/// An unreachable threshold is replaced by this many times the low-concurrency baseline.
pub const UNREACHABLE_MARGIN: f64 = 1.5;
/// The good concurrency halves after this many time constants without a rise.
pub const FORGET_TAUS: f64 = 8.0;
/// Weight of a new sample in the baseline once it has this many samples (count-based mean
/// before that).
pub const BASELINE_SAMPLES: f64 = 32.0;
/// The baseline speaks once it has this many samples (one slow request at low concurrency,
/// say a long prompt, does not make a threshold unreachable).
pub const MIN_BASELINE_SAMPLES: f64 = 8.0;

/// A mean over samples, weighting the last [`BASELINE_SAMPLES`] or so (no time decay: it is
/// only fed at low concurrency, which may not come back for a long time).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SampleMean {
    mean: f64,
    count: f64,
}

impl SampleMean {
    #[inline]
    pub fn add(&mut self, v: f64) {
        self.count = (self.count + 1.0).min(BASELINE_SAMPLES);
        self.mean += (v - self.mean) / self.count;
    }

    /// The mean; None before [`MIN_BASELINE_SAMPLES`] samples.
    #[inline]
    pub fn get(&self) -> Option<f64> {
        (self.count >= MIN_BASELINE_SAMPLES).then_some(self.mean)
    }
}

/// Events per second, from an exponentially decayed count.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rate {
    count: f64,
    t: f64,
    /// Time of the first event: until τ has passed the count is divided by the time since.
    first: f64,
    /// Events counted, up to 2.
    n: u8,
}

impl Rate {
    #[inline]
    pub fn tick(&mut self, now: f64, tau: f64) {
        let dt = now - self.t;
        if dt > 0.0 {
            self.count *= (-dt / tau).exp();
            self.t = now;
        }
        self.count += 1.0;
        if self.n == 0 {
            self.first = now;
        }
        self.n = self.n.saturating_add(1).min(2);
    }

    /// Events per second at `now`; 0 before two events. The decayed count of a steady rate
    /// `λ` that began at `first` is `λ·τ·(1 − e^{−(now − first)/τ})`.
    pub fn per_second(&self, now: f64, tau: f64) -> f64 {
        if self.n < 2 {
            return 0.0;
        }
        let count = self.count * (-(now - self.t).max(0.0) / tau).exp();
        let span = tau * (1.0 - (-(now - self.first).max(0.0) / tau).exp());
        count / span.max(1e-3)
    }
}

/// One key's concurrency knowledge (plain data, inside the key's state).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Concurrency {
    /// Admitted requests not finished yet.
    pub in_flight: u32,
    /// Good concurrency `G` as of `raised_at`.
    pub good: f64,
    /// When `good` last changed.
    pub raised_at: f64,
    /// `[ttft, itl]` at low concurrency.
    pub baseline: [SampleMean; 2],
    /// First tokens per second.
    pub first_tokens: Rate,
    /// Requests ended per second: the rate at which the engine frees a slot.
    pub completions: Rate,
    /// When a first token last missed a threshold at a concurrency above `G` (the engine
    /// showed its limit there); None before that.
    pub limit_seen: Option<f64>,
}

impl Concurrency {
    /// The good concurrency at `now`, with the forgetting applied (not stored).
    #[inline]
    pub fn good_at(&self, now: f64, tau: f64) -> f64 {
        let idle = now - self.raised_at;
        if idle > FORGET_TAUS * tau {
            self.good * 0.5f64.powf((idle / (FORGET_TAUS * tau)).floor())
        } else {
            self.good
        }
    }

    /// A request admitted at `concurrency` missed a threshold: if that is not above the good
    /// concurrency, the engine no longer meets the thresholds there, and `G` falls by 1/16
    /// (gradually: one long prompt must not undo what many requests showed).
    #[inline]
    pub fn missed(&mut self, concurrency: u32, now: f64, tau: f64) {
        let g = self.good_at(now, tau);
        if f64::from(concurrency) <= g {
            self.good = g * (1.0 - 1.0 / 16.0);
            self.raised_at = now;
        } else {
            self.limit_seen = Some(now);
        }
    }

    /// A request admitted at `concurrency` met both thresholds.
    #[inline]
    pub fn met(&mut self, concurrency: u32, now: f64, tau: f64) {
        let g = self.good_at(now, tau);
        let c = f64::from(concurrency);
        if c >= g {
            self.good = c;
            self.raised_at = now;
        } else if g != self.good {
            self.good = g; // the forgetting, made permanent
            self.raised_at = now;
        }
    }

    /// Requests in flight from which one is shed with probability `p_max`.
    #[inline]
    pub fn ceiling(&self, now: f64, tau: f64) -> f64 {
        self.good_at(now, tau).max(f64::from(LOW_CONCURRENCY))
    }

    /// Slots freed per second: the rate of requests ending, or before two have ended (the
    /// first seconds of long generations), the rate of first tokens; 0 while both are
    /// unknown.
    #[inline]
    pub fn slot_rate(&self, now: f64, tau: f64) -> f64 {
        match self.completions.per_second(now, tau) {
            r if r > 0.0 => r,
            _ => self.first_tokens.per_second(now, tau),
        }
    }

    /// Whether `waiting` requests, each starting when a slot frees, take longer than
    /// `threshold` seconds to start: a request admitted behind them would wait past it.
    /// (False while the rate is unknown.)
    #[inline]
    pub fn queue_outlasts(&self, waiting: u32, now: f64, tau: f64, threshold: f64) -> bool {
        let rate = self.slot_rate(now, tau);
        rate > 0.0 && f64::from(waiting) > rate * threshold
    }

    /// Whether a request admitted now, behind `waiting` others, would wait longer than
    /// `threshold` for a slot: only once the engine has shown its limit above `G` within the
    /// last `8τ` (at low load requests end slowly because few arrive, not because the engine
    /// is full).
    #[inline]
    pub fn slot_wait_exceeds(&self, waiting: u32, now: f64, tau: f64, threshold: f64) -> bool {
        self.limit_seen
            .is_some_and(|t| now - t <= FORGET_TAUS * tau)
            && self.queue_outlasts(waiting + 1, now, tau, threshold)
    }

    /// The threshold a signal is compared with: the policy's, or `margin × baseline` when the
    /// baseline shows it unreachable.
    #[inline]
    pub fn effective(&self, signal: usize, threshold: f64) -> f64 {
        match self.baseline[signal].get() {
            Some(b) if b > threshold => b * UNREACHABLE_MARGIN,
            _ => threshold,
        }
    }

    /// Whether the low-concurrency baseline exceeds either threshold.
    #[inline]
    pub fn unreachable(&self, ttft: f64, itl: f64) -> bool {
        let over = |i: usize, t: f64| self.baseline[i].get().is_some_and(|b| b > t);
        over(0, ttft) || over(1, itl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_mean_weights_recent_samples_after_warming_up() {
        let mut m = SampleMean::default();
        assert_eq!(m.get(), None);
        for v in [1.0, 3.0, 1.0, 3.0, 1.0, 3.0, 1.0] {
            m.add(v);
        }
        assert_eq!(m.get(), None, "seven samples are not enough");
        m.add(3.0);
        assert_eq!(m.get(), Some(2.0));
        for _ in 0..1000 {
            m.add(10.0);
        }
        assert!((m.get().unwrap() - 10.0).abs() < 1e-9);
        m.add(42.0);
        assert!((m.get().unwrap() - (10.0 + 32.0 / 32.0)).abs() < 1e-9);
    }

    #[test]
    fn the_rate_counts_events_per_second() {
        let (tau, mut r) = (4.0, Rate::default());
        assert_eq!(r.per_second(0.0, tau), 0.0);
        for i in 0..4000 {
            r.tick(i as f64 * 0.01, tau); // 100 per second for 40 s
        }
        let got = r.per_second(39.99, tau);
        assert!((got - 100.0).abs() < 2.0, "{got}");
        // Over the first second, not diluted by the τ window.
        let mut r = Rate::default();
        for i in 0..=20 {
            r.tick(i as f64 * 0.05, tau);
        }
        let got = r.per_second(1.0, tau);
        assert!((got - 20.0).abs() < 3.0, "{got}");
    }

    #[test]
    fn good_concurrency_rises_falls_under_pressure_and_is_forgotten() {
        let tau = 4.0;
        let mut c = Concurrency::default();
        assert_eq!(
            c.ceiling(0.0, tau),
            4.0,
            "a cold key starts at the smallest ceiling"
        );
        c.met(10, 1.0, tau);
        c.met(6, 1.5, tau);
        assert_eq!(
            c.good_at(1.5, tau),
            10.0,
            "a lower concurrency does not lower it"
        );
        assert_eq!(c.ceiling(1.5, tau), 10.0);
        // A miss above G says nothing about G; at or below it, G falls by 1/16.
        c.missed(11, 2.0, tau);
        assert_eq!(c.good, 10.0);
        c.missed(10, 2.0, tau);
        c.missed(3, 2.0, tau);
        assert!((c.good - 10.0 * (15.0f64 / 16.0).powi(2)).abs() < 1e-9);
        // Raised again, then idle: halves after 8τ, quarters after 16τ.
        c.met(20, 6.0, tau);
        assert_eq!(c.good_at(6.0 + 31.9, tau), 20.0);
        assert_eq!(c.good_at(6.0 + 32.1, tau), 10.0);
        assert_eq!(c.good_at(6.0 + 64.1, tau), 5.0);
    }

    #[test]
    fn an_unreachable_threshold_is_replaced_by_the_baseline_with_a_margin() {
        let mut c = Concurrency::default();
        assert_eq!(
            c.effective(1, 0.04),
            0.04,
            "no baseline: the policy's threshold"
        );
        assert!(!c.unreachable(0.5, 0.04));
        for _ in 0..8 {
            c.baseline[1].add(0.03);
        }
        assert_eq!(c.effective(1, 0.04), 0.04);
        assert!(!c.unreachable(0.5, 0.04));
        let mut c = Concurrency::default();
        for _ in 0..8 {
            c.baseline[1].add(0.06);
        }
        assert!((c.effective(1, 0.04) - 0.09).abs() < 1e-12);
        assert!(c.unreachable(0.5, 0.04));
        assert!(
            !c.unreachable(0.5, 0.1),
            "a raised threshold is reachable again"
        );
    }
}
