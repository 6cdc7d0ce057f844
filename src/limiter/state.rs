//! Per-key state: the moving averages, the requests waiting for their first token and the
//! shedding integral. It lives in its own reference-counted cell, apart from the thresholds
//! and shedding parameters of the policy in force: a reload builds a new [`super::Limiter`]
//! that shares the cells of every key that remains (by label), so a policy edit during an
//! overload changes the thresholds the state is compared with and nothing else.

use parking_lot::{Mutex, MutexGuard};

use super::concurrency::Concurrency;
use super::config::{Shedding, Thresholds};
use super::decision;
use super::estimator::Estimator;

/// One key's state, alone on its cache lines so different keys do not contend.
#[repr(align(128))]
#[derive(Debug, Default)]
pub(crate) struct StateCell(Mutex<KeyState>);

impl StateCell {
    #[inline]
    pub(crate) fn lock(&self) -> MutexGuard<'_, KeyState> {
        self.0.lock()
    }
}

/// A key's moving averages and its requests still waiting for their first token.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct KeyState {
    /// `[ttft, itl]`.
    pub(crate) est: [Estimator; 2],
    /// Admitted requests without a first token yet.
    pub(crate) waiting: u32,
    /// Sum of their start times (seconds on the limiter clock).
    pub(crate) waiting_since: f64,
    /// Log of the admitted fraction the integral part allows, in
    /// `[ln(max(1 − p_max, MIN_ADMITTED_FRACTION)), 0]` (see [`super::decision::integrate`]).
    pub(crate) integral: f64,
    /// When `integral` was last brought up to date (seconds); None before the first decision.
    pub(crate) integrated_at: Option<f64>,
    /// Requests in flight, the good concurrency, the low-concurrency baseline.
    pub(crate) conc: Concurrency,
}

impl KeyState {
    /// TTFT estimated from the requests still waiting for their first token: twice their
    /// mean age. A request's age is a lower bound on its TTFT, and for a steady flow the age
    /// of a waiting request is spread evenly over its wait, so twice the mean age estimates
    /// the TTFT that requests see right now (length-biased: E[T²]/E[T] ≥ E[T]). Unlike the
    /// moving average of finished first tokens, which lags the queue by the TTFT itself,
    /// it rises while a queue builds and falls as soon as it drains.
    #[inline]
    pub(crate) fn waiting_ttft(&self, now: f64) -> f64 {
        if self.waiting == 0 {
            return 0.0;
        }
        (2.0 * (now - self.waiting_since / f64::from(self.waiting))).max(0.0)
    }

    /// The TTFT signal compared with the threshold: the larger of the moving average and the
    /// estimate from waiting requests.
    #[inline]
    pub(crate) fn ttft(&self, now: f64, tau: f64) -> f64 {
        self.est[0].read(now, tau).max(self.waiting_ttft(now))
    }

    /// The thresholds the signals are compared with: the policy's, or for a threshold the
    /// engine cannot meet even at low concurrency, its low-concurrency latency with a margin
    /// (see [`super::concurrency`]).
    #[inline]
    pub(crate) fn effective(&self, th: &Thresholds) -> (f64, f64) {
        (
            self.conc.effective(0, th.ttft),
            self.conc.effective(1, th.itl),
        )
    }

    /// How far the TTFT signal has come from the engine's low-concurrency TTFT (0 before it is
    /// known) towards the effective threshold: 0 with no queue, 1 at the threshold.
    #[inline]
    pub(crate) fn queue(&self, now: f64, th: &Thresholds) -> f64 {
        let threshold = self.conc.effective(0, th.ttft);
        let base = self.conc.baseline[0].get().unwrap_or(0.0).min(threshold);
        let span = (threshold - base).max(1e-9 * threshold);
        (self.ttft(now, th.time_constant) - base) / span
    }

    /// Pressure ratio of a standard-priority request at `now` (seconds).
    #[inline]
    pub(crate) fn pressure(&self, now: f64, th: &Thresholds) -> f64 {
        let tau = th.time_constant;
        let (ttft, itl) = self.effective(th);
        (self.ttft(now, tau) / ttft).max(self.est[1].read(now, tau) / itl)
    }

    /// The integral brought up to `now` (seconds) at `pressure`.
    #[inline]
    pub(crate) fn integral_at(&self, pressure: f64, now: f64, tau: f64, shed: &Shedding) -> f64 {
        let dt = self.integrated_at.map_or(0.0, |t| (now - t).max(0.0));
        decision::integrate(self.integral, pressure, dt / tau, shed)
    }
    /// The wait before a request shed at `now` is worth retrying, from every signal that can
    /// shed: the largest of
    /// - the time until each moving average falls back to its effective threshold / `factor`
    ///   (the priority's pressure factor) with no new samples (see [`super::estimator`]);
    /// - while the integral sheds, the time it needs to return to 0 with no pressure at all
    ///   (it rises by 1/(ramp − 1) per τ);
    /// - the time the requests waiting for their first token need to get a slot at the rate
    ///   the engine frees slots (their estimated TTFT before that rate is known);
    /// - over the concurrency `ceiling` (when the request was over it), the time for enough
    ///   requests to finish to bring the requests in flight under it, at the same rate.
    pub(crate) fn retry_wait(
        &self,
        effective: (f64, f64),
        factor: f64,
        ceiling: Option<f64>,
        now: f64,
        tau: f64,
        shed: &Shedding,
    ) -> f64 {
        let [ttft, itl] = self.est;
        let (t_ttft, t_itl) = effective;
        let averages = ttft
            .seconds_until_at_most(t_ttft / factor, now, tau)
            .max(itl.seconds_until_at_most(t_itl / factor, now, tau));
        let integral = -self.integral * (shed.ramp - 1.0).max(0.0) * tau;
        let rate = self.conc.slot_rate(now, tau);
        let drain = |n: f64| {
            if rate > 0.0 {
                n / rate
            } else {
                self.waiting_ttft(now)
            }
        };
        let waiting = if self.waiting > 0 {
            drain(f64::from(self.waiting))
        } else {
            0.0
        };
        let crowd = ceiling.map_or(0.0, |c| {
            drain((f64::from(self.conc.in_flight) - c + 1.0).max(1.0))
        });
        averages.max(integral).max(waiting).max(crowd)
    }
}
