//! A client-side adaptive concurrency limit in the manner of Netflix's Gradient2
//! (concurrency-limits' `Gradient2Limit`), the adaptive peer in sluice's goodput benchmark
//! (`loadgen --gradient`). Written here from the published algorithm, with its default
//! parameters except the smallest limit (Netflix's 20 would never let a 4-slot engine's
//! limit go below its capacity):
//!
//! ```text
//! per latency sample (here: a request's TTFT, the latency a queue adds to), with the
//! requests in flight:
//!   long     = exponential average of samples (window 600, a plain mean over the first 10);
//!              if long / sample > 2, long × 0.95 (recovers from a long-past overload)
//!   if in flight < limit / 2: no change (the client, not the server, limits)
//!   gradient = clamp(tolerance · long / sample, 0.5, 1)          # tolerance 1.5
//!   limit    = (1 − s) · limit + s · (limit · gradient + queue)  # s = 0.2, queue 4
//!   limit    = clamp(limit, 4, 1000)                             # starts at 20
//! ```
//!
//! A request that would exceed the limit is not sent and counts as shed, as with
//! `--max-inflight`. Its anchor is the long-run average latency, which drifts up under a
//! sustained overload; sluice anchors on the policy's absolute thresholds instead.

use std::sync::{Arc, Mutex};

const INITIAL: f64 = 20.0;
const MIN: f64 = 4.0;
const MAX: f64 = 1000.0;
const SMOOTHING: f64 = 0.2;
const TOLERANCE: f64 = 1.5;
const QUEUE: f64 = 4.0;
const WINDOW: f64 = 600.0;
const WARMUP: u32 = 10;

#[derive(Debug)]
struct State {
    limit: f64,
    in_flight: u32,
    long: f64,
    samples: u32,
}

/// The shared limit.
#[derive(Debug, Clone)]
pub struct Gradient(Arc<Mutex<State>>);

impl Default for Gradient {
    fn default() -> Self {
        Gradient(Arc::new(Mutex::new(State {
            limit: INITIAL,
            in_flight: 0,
            long: 0.0,
            samples: 0,
        })))
    }
}

/// A request admitted by the limit, in flight until dropped.
#[derive(Debug)]
pub struct Permit(Gradient);

impl Drop for Permit {
    fn drop(&mut self) {
        let mut st = self.0.0.lock().expect("not poisoned");
        st.in_flight = st.in_flight.saturating_sub(1);
    }
}

impl Permit {
    /// The request's latency sample, seconds.
    pub fn sample(&self, seconds: f64) {
        self.0.sample(seconds);
    }
}

impl Gradient {
    /// A permit, or None when the requests in flight are at the limit.
    pub fn try_acquire(&self) -> Option<Permit> {
        let mut st = self.0.lock().expect("not poisoned");
        if f64::from(st.in_flight) >= st.limit.floor() {
            return None;
        }
        st.in_flight += 1;
        Some(Permit(self.clone()))
    }

    /// The current limit.
    pub fn limit(&self) -> f64 {
        self.0.lock().expect("not poisoned").limit
    }

    fn sample(&self, rtt: f64) {
        if !(rtt.is_finite() && rtt > 0.0) {
            return;
        }
        let mut st = self.0.lock().expect("not poisoned");
        st.samples = st.samples.saturating_add(1);
        st.long = if st.samples <= WARMUP {
            st.long + (rtt - st.long) / f64::from(st.samples)
        } else {
            st.long + (rtt - st.long) * 2.0 / (WINDOW + 1.0)
        };
        if st.long / rtt > 2.0 {
            st.long *= 0.95;
        }
        if f64::from(st.in_flight) < st.limit / 2.0 {
            return;
        }
        let gradient = (TOLERANCE * st.long / rtt).clamp(0.5, 1.0);
        let next = st.limit * gradient + QUEUE;
        st.limit = ((1.0 - SMOOTHING) * st.limit + SMOOTHING * next).clamp(MIN, MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_admits_up_to_itself_and_grows_while_latency_holds() {
        let g = Gradient::default();
        let permits: Vec<_> = (0..20).map(|_| g.try_acquire().unwrap()).collect();
        assert!(
            g.try_acquire().is_none(),
            "20 in flight at the initial limit"
        );
        // Steady latency at the limit: gradient 1, the limit grows by s · queue = 0.8.
        permits[0].sample(0.1);
        assert!((g.limit() - 20.8).abs() < 1e-9, "{}", g.limit());
        drop(permits);
        assert!(g.try_acquire().is_some());
    }

    #[test]
    fn the_limit_falls_when_latency_rises_and_holds_when_the_client_limits() {
        let g = Gradient::default();
        let permits: Vec<_> = (0..20).map(|_| g.try_acquire().unwrap()).collect();
        for _ in 0..10 {
            permits[0].sample(0.1); // long average 0.1
        }
        let before = g.limit();
        permits[0].sample(1.0); // 10× the average: gradient 0.5 (clamped)
        let expect = 0.8 * before + 0.2 * (before * 0.5 + 4.0);
        assert!(
            (g.limit() - expect).abs() < 1e-9,
            "{} vs {expect}",
            g.limit()
        );
        // With fewer than half the limit in flight, samples do not move it.
        drop(permits);
        let one = g.try_acquire().unwrap();
        let held = g.limit();
        one.sample(5.0);
        assert_eq!(g.limit(), held);
        // A jump in latency takes it down (to the floor of 4 at most) ...
        let permits: Vec<_> = std::iter::from_fn(|| g.try_acquire()).collect();
        for _ in 0..40 {
            permits[0].sample(50.0);
        }
        let low = g.limit();
        assert!((MIN..held / 2.0).contains(&low), "{low} from {held}");
        // ... until the long average has drifted up to the new latency: then it grows again
        // (Gradient2's drift under a lasting overload).
        for _ in 0..2000 {
            permits[0].sample(50.0);
        }
        assert!(g.limit() > low, "{} after {low}", g.limit());
    }
}
