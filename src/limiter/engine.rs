//! The engine's own word on its batch (`spec.upstream.engineMetrics`, see [`crate::signals`]):
//! written by the scrape loop after each reading, read by every decision of the endpoint's
//! limiter with two atomic loads.
//!
//! An engine that reports requests waiting (or its KV cache at [`KV_FULL`] or above) has a
//! full batch: a request sent now would queue in the engine. While it says so, a request
//! finding as many requests in flight as the ceiling, or as the batch the engine ran when its
//! queue started, is shed outright (no probe past the ceiling): that batch size stands in for
//! the good concurrency before any first token has taught it, which is what closes the cold
//! onset (a burst on an idle engine is otherwise admitted whole, since nothing is late yet).
//! Below that count the gateway's own rules decide, on its own in-flight counts (engine
//! gauges lag). A report is valid for three scrape intervals: when scrapes fail or stop, the
//! word lapses by itself and the limiter decides alone (fail open).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// KV-cache use at which an engine's batch counts as full.
pub const KV_FULL: f64 = 0.95;

/// The engine's last word: full until a time (seconds, f64 bits; 0 when it is not full), and
/// the batch it ran when its queue started (f32 bits); or open (nothing waiting, KV cache
/// below [`KV_FULL`]) until a time, with the requests it ran then.
#[derive(Debug, Default)]
pub struct EngineGate {
    full_until: AtomicU64,
    batch: AtomicU32,
    open_until: AtomicU64,
    running: AtomicU32,
}

impl EngineGate {
    /// A reading: the batch is `full` (with `batch` requests running when its queue started,
    /// if known), valid until `until`.
    /// `open` is the requests it runs when it reports nothing waiting (and that count).
    pub fn report(&self, full: bool, batch: Option<f64>, open: Option<f64>, until: Duration) {
        let secs = until.as_secs_f64();
        let full_until = if full { secs } else { 0.0 };
        self.batch
            .store((batch.unwrap_or(0.0) as f32).to_bits(), Ordering::Relaxed);
        self.full_until
            .store(full_until.to_bits(), Ordering::Relaxed);
        let open_until = if open.is_some() && !full { secs } else { 0.0 };
        (self.running).store((open.unwrap_or(0.0) as f32).to_bits(), Ordering::Relaxed);
        self.open_until
            .store(open_until.to_bits(), Ordering::Relaxed);
    }

    /// While the engine says nothing waits at `now` (seconds): the requests it ran then. The
    /// admission queue sends a waiting request to such an engine while the gateway has no
    /// more in flight there than that count: one more per reading, never a burst on a
    /// reading that is already old.
    #[inline]
    pub fn open(&self, now: f64) -> Option<f64> {
        let until = f64::from_bits(self.open_until.load(Ordering::Relaxed));
        (now < until).then(|| f64::from(f32::from_bits(self.running.load(Ordering::Relaxed))))
    }

    /// While the engine says its batch is full at `now` (seconds): the batch it ran when its
    /// queue started (0 if unknown).
    #[inline]
    pub fn full(&self, now: f64) -> Option<f64> {
        let until = f64::from_bits(self.full_until.load(Ordering::Relaxed));
        (now < until).then(|| f64::from(f32::from_bits(self.batch.load(Ordering::Relaxed))))
    }
}
