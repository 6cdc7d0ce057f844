//! Recording: latency samples and first tokens, requests in flight and requests waiting for
//! their first token; the unreachable-threshold incident log.

use std::time::Duration;

use super::{InvalidSample, KeyEntry, KeyId, Limiter, Signal, concurrency};

impl Limiter {
    /// Records a latency sample (seconds) taken at `now`. A TTFT sample recorded here counts
    /// as a first token but teaches nothing about concurrency: the gateway records first
    /// tokens with [`Limiter::record_first_token`].
    #[inline]
    pub fn record(
        &self,
        key: KeyId,
        signal: Signal,
        seconds: f64,
        now: Duration,
    ) -> Result<(), InvalidSample> {
        self.record_with(key, signal, seconds, None, now)
    }

    /// Records the TTFT of a request admitted when `concurrency` requests (itself included)
    /// were in flight: a TTFT within the threshold, with the ITL average within its own, shows
    /// that the engine meets both at that concurrency (see [`concurrency`]).
    #[inline]
    pub fn record_first_token(
        &self,
        key: KeyId,
        seconds: f64,
        concurrency: u32,
        now: Duration,
    ) -> Result<(), InvalidSample> {
        self.record_with(key, Signal::Ttft, seconds, Some(concurrency), now)
    }

    fn record_with(
        &self,
        key: KeyId,
        signal: Signal,
        seconds: f64,
        concurrency: Option<u32>,
        now: Duration,
    ) -> Result<(), InvalidSample> {
        let entry = &self.entries[key.0 as usize];
        let th = entry.thresholds;
        let shed = &self.config.shedding;
        let (now, tau) = (now.as_secs_f64(), th.time_constant);
        let mut st = entry.lock();
        // Beyond ramp × threshold a sample cannot shed more, only keep the gate shut longer
        // after the server recovers: record it at that ceiling (not for the hard cliff).
        let clamped = if shed.ramp > 1.0 && seconds.is_finite() {
            let threshold = match signal {
                Signal::Ttft => th.ttft,
                Signal::Itl => th.itl,
            };
            seconds.min(shed.ramp * st.conc.effective(signal as usize, threshold))
        } else {
            seconds
        };
        st.est[signal as usize].record(clamped, now, tau, shed.max_evidence)?;
        // At low concurrency the raw sample also feeds the baseline (the clamp would hide an
        // unreachable threshold).
        let low = match (signal, concurrency) {
            (Signal::Itl, _) => st.conc.in_flight <= concurrency::LOW_CONCURRENCY,
            // Admitted at low concurrency and still there at its first token (a burst that
            // arrives together is admitted at low counts but queues behind itself).
            (Signal::Ttft, Some(c)) => c.max(st.conc.in_flight) <= concurrency::LOW_CONCURRENCY,
            (Signal::Ttft, None) => false,
        };
        let was = low.then(|| st.conc.unreachable(th.ttft, th.itl));
        if low {
            st.conc.baseline[signal as usize].add(seconds);
        }
        if signal == Signal::Ttft {
            st.conc.first_tokens.tick(now, tau);
            if let Some(c) = concurrency {
                let (ttft, itl) = st.effective(&th);
                if seconds <= ttft && st.est[1].read(now, tau) <= itl {
                    st.conc.met(c, now, tau);
                } else {
                    st.conc.missed(c, now, tau);
                }
            }
        }
        let Some(was) = was else { return Ok(()) };
        let now_unreachable = st.conc.unreachable(th.ttft, th.itl);
        if was != now_unreachable {
            let [t, i] = st.conc.baseline.map(|b| b.get().unwrap_or(0.0));
            drop(st);
            self.incident(entry, now_unreachable, t, i);
        }
        Ok(())
    }

    /// Logs a key's thresholds becoming unreachable (once per incident) or reachable again.
    #[cold]
    fn incident(&self, entry: &KeyEntry, unreachable: bool, ttft: f64, itl: f64) {
        let th = entry.thresholds;
        if unreachable {
            tracing::warn!(
                model = %entry.label,
                ttft_low_concurrency_ms = ttft * 1e3,
                itl_low_concurrency_ms = itl * 1e3,
                ttft_threshold_ms = th.ttft * 1e3,
                itl_threshold_ms = th.itl * 1e3,
                "the engine misses the policy's thresholds even with at most {} requests in flight: \
                 they are unreachable, so the limiter compares latency with {}× the engine's \
                 low-concurrency latency instead until they are met or raised (see \
                 sluice_thresholds_unreachable)",
                concurrency::LOW_CONCURRENCY,
                concurrency::UNREACHABLE_MARGIN,
            );
        } else {
            tracing::info!(model = %entry.label, "the policy's thresholds are reachable again");
        }
    }

    /// An admitted request is in flight until [`Limiter::end_request`] (the gateway's
    /// request guard calls both).
    #[inline]
    pub fn begin_request(&self, key: KeyId) {
        self.entries[key.0 as usize].lock().conc.in_flight += 1;
    }

    /// An admitted request finished at `now`, however it ended (its slot in the engine is
    /// free again).
    #[inline]
    pub fn end_request(&self, key: KeyId, now: Duration) {
        let entry = &self.entries[key.0 as usize];
        let tau = entry.thresholds.time_constant;
        let mut st = entry.lock();
        st.conc.in_flight = st.conc.in_flight.saturating_sub(1);
        st.conc.completions.tick(now.as_secs_f64(), tau);
    }

    /// Requests of a key in flight now.
    pub fn in_flight(&self, key: KeyId) -> u32 {
        self.entries[key.0 as usize].lock().conc.in_flight
    }

    /// An admitted request was sent upstream at `now` and waits for its first token. Call
    /// [`Limiter::end_wait`] with the same `now` exactly once when the first token arrives or
    /// the request ends without one (the gateway's measurement guard does this). Returns the
    /// requests in flight (the concurrency this request was admitted at, itself included).
    #[inline]
    pub fn begin_wait(&self, key: KeyId, now: Duration) -> u32 {
        let mut st = self.entries[key.0 as usize].lock();
        st.waiting += 1;
        st.waiting_since += now.as_secs_f64();
        st.conc.in_flight
    }

    /// The request that began waiting at `since` stopped waiting.
    #[inline]
    pub fn end_wait(&self, key: KeyId, since: Duration) {
        let mut st = self.entries[key.0 as usize].lock();
        st.waiting = st.waiting.saturating_sub(1);
        st.waiting_since = if st.waiting == 0 {
            0.0
        } else {
            st.waiting_since - since.as_secs_f64()
        };
    }
}
