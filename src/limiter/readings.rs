//! What the metrics read of a limiter: the current values of every key in use.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{Limiter, Thresholds, decision};

/// Current values of one key, for metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyReading<'a> {
    pub label: &'a str,
    pub thresholds: Thresholds,
    /// Moving average of TTFT, seconds.
    pub ttft: f64,
    /// Moving average of ITL, seconds.
    pub itl: f64,
    /// Requests waiting for their first token.
    pub waiting: u32,
    /// TTFT estimated from their ages (twice the mean age), seconds.
    pub waiting_ttft: f64,
    /// Pressure ratio of a standard-priority request.
    pub pressure: f64,
    /// Rejection probability of a standard-priority request (latency and integral; the
    /// concurrency ceiling and work conservation depend on the requests in flight).
    pub reject_probability: f64,
    /// Admitted requests not finished yet.
    pub in_flight: u32,
    /// The concurrency at which the engine last met the thresholds (see [`super::concurrency`]).
    pub good_concurrency: f64,
    /// The engine misses a threshold even at low concurrency.
    pub unreachable: bool,
    /// The concurrency ceiling: max(good concurrency, 4) (see [`super::concurrency`]).
    pub ceiling: f64,
}

impl Limiter {
    /// Readings of every key in use, for metrics.
    pub fn readings(&self, now: Duration) -> impl Iterator<Item = KeyReading<'_>> + '_ {
        let shed = self.config.shedding;
        self.entries
            .iter()
            .filter(|s| s.in_use.load(Ordering::Relaxed))
            .map(move |entry| {
                let label = &*entry.label;
                let st = *entry.lock();
                let th = entry.thresholds;
                let (n, tau) = (now.as_secs_f64(), th.time_constant);
                let (t, i) = (st.est[0].read(n, tau), st.est[1].read(n, tau));
                let pressure = st.pressure(n, &th);
                // The integral as the next decision would see it: without traffic it is only
                // brought up to date by decisions, and the gauge must not freeze at its last
                // value.
                let integral = st.integral_at(pressure, n, tau, &shed);
                KeyReading {
                    label,
                    thresholds: th,
                    ttft: t,
                    itl: i,
                    waiting: st.waiting,
                    waiting_ttft: st.waiting_ttft(n),
                    pressure,
                    reject_probability: decision::reject_probability_pi(pressure, integral, &shed),
                    in_flight: st.conc.in_flight,
                    good_concurrency: st.conc.good_at(n, tau),
                    unreachable: st.conc.unreachable(th.ttft, th.itl),
                    ceiling: st.conc.ceiling(n, tau),
                }
            })
    }
}
