//! The latency limiter: per key (model), the signals compared with the policy's thresholds
//! and the decision to admit or shed a new request.
//!
//! - TTFT signal: the larger of the moving average of time to first token and twice the mean
//!   age of the requests still waiting for their first token (it rises while a queue builds,
//!   where the average lags by the TTFT itself).
//! - ITL signal: the moving average of inter-token gaps.
//! - Samples above `ramp × threshold` are recorded at that ceiling (not for the hard cliff),
//!   so a burst's backlog cannot hold the gate shut long after the queue drained.
//! - Pressure `r` = the larger signal/threshold ratio; the rejection probability combines a
//!   ramp in `r` with a log-domain integral of persistent pressure ([`decision`]).
//! - Before any of that, concurrency ([`concurrency`]): nothing is shed with nothing in flight
//!   or fewer in flight than the concurrency at which the engine last met the thresholds;
//!   once a queue starts, a request beyond that concurrency is shed; a threshold the engine
//!   misses even at low concurrency is replaced by its low-concurrency latency with a margin.
//!   (The founding design compared latency alone; the goodput benchmark and a careless
//!   user's thresholds showed why these come first: see docs/benchmarks.md.)
//!
//! Modules:
//! - [`estimator`]: the fading-evidence time-weighted moving average and its maths
//!   (read/write consistency, evidence cap, time to fall to a level).
//! - [`decision`]: pressure → rejection probability, the integral, Retry-After, priorities.
//! - [`concurrency`]: requests in flight, the good concurrency, the ceiling, the
//!   low-concurrency baseline and unreachable thresholds.
//! - [`config`]: thresholds, shedding parameters, mode and scope.
//! - [`state`]: the per-key state, in cells shared across reloads.
//! - [`crate::clock`], [`crate::random`] (at the crate root): injected time and randomness,
//!   so tests are exact.
//!
//! A [`Limiter`] is built from one validated [`LimiterConfig`]; it holds the thresholds and
//! shedding parameters of that policy and, per key, a shared cell of state. A policy reload
//! builds a new limiter with [`Limiter::carry_over`], which shares the cell of every key
//! that remains (by label): the moving averages, the requests waiting for their first token
//! and the shedding integral all carry on under the new thresholds, so editing a threshold
//! during an overload does not reopen the gate. A model removed from the policy loses its
//! state; so does `other`.
//!
//! Keys: under [`Scope::PerModel`] every model named in the policy has its own key; every
//! other model string shares the key labelled [`OTHER_LABEL`] (with the default
//! thresholds). No key, and so no metric label, is ever made from a client's text: client
//! input cannot grow memory or metric label sets, or write into dashboards. (An earlier
//! design gave the first 32 unknown names keys of their own; a client could then choose 32
//! label values of its own.) Under [`Scope::Global`] there is one key, [`GLOBAL_LABEL`].
//!
//! Hot path: [`Limiter::key`] is one hash lookup that never allocates; [`Limiter::decide`] and
//! [`Limiter::record`] lock one key's small mutex for a copy or an update of two estimators
//! (never across an `.await`: the API is synchronous) and allocate nothing. Each key's state
//! cell is cache-line aligned so different keys do not contend (reaching it through the
//! shared pointer costs about 3 ns per decision, see docs/benchmarks.md); the locks are
//! parking_lot's, which spin briefly before parking, right for critical sections of a few
//! tens of nanoseconds. The maps from model names to keys use foldhash.

pub mod concurrency;
pub mod config;
pub mod decision;
pub mod engine;
pub mod estimator;
pub mod fleet;
mod readings;
mod record;
mod reload;
pub mod state;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use config::{LimiterConfig, Mode, Scope, Shedding, Signal, Thresholds};
use state::StateCell;

// The clock and the random sources live at the crate root (the operator, the simulated
// engine and the load generator use them too); re-exported where the limiter's API needs them.
pub use crate::clock::{Clock, ManualClock, MonotonicClock};
pub use crate::random::{SplitMix64, Uniform};
pub use decision::{Decision, Priority, UnknownPriority, Verdict};
pub use estimator::{Estimator, InvalidSample};
pub use readings::KeyReading;

/// Label of the key shared by every model the policy does not name.
pub const OTHER_LABEL: &str = "other";
/// Label of the single key under [`Scope::Global`].
pub const GLOBAL_LABEL: &str = "global";

/// A resolved key; valid for the limiter that produced it (and, by label, after a reload).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(u32);

/// One key: its label and thresholds under this policy, and its state (shared with the
/// limiters of earlier and later versions of the policy).
struct KeyEntry {
    label: Box<str>,
    thresholds: Thresholds,
    /// Set once the key has been handed out (the `other` key starts unused).
    in_use: AtomicBool,
    state: Arc<StateCell>,
}

impl KeyEntry {
    fn new(label: &str, thresholds: Thresholds, in_use: bool) -> Self {
        KeyEntry {
            label: label.into(),
            thresholds,
            in_use: AtomicBool::new(in_use),
            state: Arc::default(),
        }
    }

    #[inline]
    fn lock(&self) -> parking_lot::MutexGuard<'_, state::KeyState> {
        self.state.lock()
    }

    #[inline]
    fn mark_used(&self) {
        if !self.in_use.load(Ordering::Relaxed) {
            self.in_use.store(true, Ordering::Relaxed);
        }
    }
}

/// A new request's treatment before the draw (see [`Limiter::assess`]).
#[derive(Debug, Clone, Copy)]
struct Assessment {
    pressure: f64,
    /// 0: admitted for sure (work conservation, or no pressure).
    reject_probability: f64,
    /// The priority's pressure factor.
    factor: f64,
    /// The concurrency ceiling, when the request would be over it.
    over_ceiling: Option<f64>,
}

/// The per-key moving averages and the admission decision.
pub struct Limiter {
    config: LimiterConfig,
    named: HashMap<Box<str>, u32, foldhash::fast::RandomState>,
    other: u32,
    entries: Box<[KeyEntry]>,
    /// The engine's word on its batch, shared across reloads like the keys' state.
    engine: Arc<engine::EngineGate>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("config", &self.config)
            .field("keys", &self.key_count())
            .finish()
    }
}

impl Limiter {
    /// A limiter with no evidence yet.
    pub fn new(config: LimiterConfig) -> Self {
        let mut entries = Vec::new();
        let mut named = HashMap::default();
        let other = match config.scope {
            Scope::Global => {
                entries.push(KeyEntry::new(GLOBAL_LABEL, config.defaults, true));
                0
            }
            Scope::PerModel => {
                for (name, t) in &config.models {
                    named.insert(name.as_str().into(), entries.len() as u32);
                    entries.push(KeyEntry::new(name, *t, true));
                }
                entries.push(KeyEntry::new(OTHER_LABEL, config.defaults, false));
                entries.len() as u32 - 1
            }
        };
        Limiter {
            config,
            named,
            other,
            entries: entries.into_boxed_slice(),
            engine: Arc::default(),
        }
    }

    pub fn config(&self) -> &LimiterConfig {
        &self.config
    }

    fn other_key(&self) -> KeyId {
        let entry = &self.entries[self.other as usize];
        entry.mark_used();
        KeyId(self.other)
    }

    /// The key of a request for `model`.
    #[inline]
    pub fn key(&self, model: &str) -> KeyId {
        if self.config.scope == Scope::Global {
            return KeyId(0);
        }
        if let Some(&i) = self.named.get(model) {
            return KeyId(i);
        }
        self.other_key()
    }

    /// The metric label of a key.
    pub fn label(&self, key: KeyId) -> &str {
        &self.entries[key.0 as usize].label
    }

    /// Number of keys handed out so far (named, and `other` once used).
    /// The engine's word on its batch (written by the engine-metrics scrape loop).
    pub fn engine(&self) -> &engine::EngineGate {
        &self.engine
    }

    pub fn key_count(&self) -> usize {
        self.entries
            .iter()
            .filter(|s| s.in_use.load(Ordering::Relaxed))
            .count()
    }

    /// Thresholds of a key.
    pub fn thresholds(&self, key: KeyId) -> Thresholds {
        self.entries[key.0 as usize].thresholds
    }

    /// Requests of a key waiting for their first token, and the TTFT estimated from their
    /// ages at `now` (seconds).
    pub fn waiting(&self, key: KeyId, now: Duration) -> (u32, f64) {
        let st = *self.entries[key.0 as usize].lock();
        (st.waiting, st.waiting_ttft(now.as_secs_f64()))
    }

    /// The moving averages `(ttft, itl)` of a key at `now`, seconds.
    pub fn averages(&self, key: KeyId, now: Duration) -> (f64, f64) {
        let entry = &self.entries[key.0 as usize];
        let [ttft, itl] = entry.lock().est;
        let (now, tau) = (now.as_secs_f64(), entry.thresholds.time_constant);
        (ttft.read(now, tau), itl.read(now, tau))
    }

    /// Whether a new request of `priority` on `key` at `now` would be admitted or shed; counts
    /// nothing (see [`Limiter::admit`]).
    #[inline]
    pub fn decide<R: Uniform + ?Sized>(
        &self,
        key: KeyId,
        priority: Priority,
        now: Duration,
        rng: &mut R,
    ) -> Decision {
        self.decide_counting(key, priority, now, rng, (false, true))
    }

    /// Admits or sheds a new request of `priority` on `key` at `now`, and counts an admitted
    /// one (shadow-rejected included) in flight under the same lock, so that concurrent
    /// admissions each see the ones before them: deciding and then calling
    /// [`Limiter::begin_request`] lets every racing request see the same count, and the
    /// work-conservation rule and the ceiling overshoot by up to the number of threads. Call
    /// [`Limiter::end_request`] when an admitted request ends.
    #[inline]
    pub fn admit<R: Uniform + ?Sized>(
        &self,
        key: KeyId,
        priority: Priority,
        now: Duration,
        rng: &mut R,
    ) -> Decision {
        self.decide_counting(key, priority, now, rng, (true, true))
    }

    /// [`Limiter::admit`] without the draw: admitted only for sure (a reject probability of
    /// 0), otherwise shed with the Retry-After a shed request gets. For a request that must
    /// not take a slot by chance while a tenant under its fair share waits for one.
    pub fn admit_for_sure<R: Uniform + ?Sized>(
        &self,
        key: KeyId,
        priority: Priority,
        now: Duration,
        rng: &mut R,
    ) -> Decision {
        self.decide_counting(key, priority, now, rng, (true, false))
    }

    /// Decides, counting an admitted request in flight (`count`) and drawing against the
    /// reject probability (`draw`; without it any probability above 0 sheds).
    fn decide_counting<R: Uniform + ?Sized>(
        &self,
        key: KeyId,
        priority: Priority,
        now: Duration,
        rng: &mut R,
        (count, draw): (bool, bool),
    ) -> Decision {
        let entry = &self.entries[key.0 as usize];
        let th = entry.thresholds;
        let shed = &self.config.shedding;
        let (now, tau) = (now.as_secs_f64(), th.time_constant);
        // Each signal is read once, under the lock that also brings the integral up to date;
        // the lock is held through the decision (a few tens of nanoseconds: cheaper than
        // copying the state out) and released before the cold Retry-After maths.
        let mut st = entry.lock();
        let a = self.assess(&mut st, &th, priority, now);
        let admit = Decision {
            verdict: Verdict::Admit,
            pressure: a.pressure,
            reject_probability: a.reject_probability,
            retry_after: None,
        };
        if a.reject_probability == 0.0 || (draw && rng.next_f64() >= a.reject_probability) {
            st.conc.in_flight += u32::from(count);
            return admit;
        }
        let st = {
            let copy = *st;
            if self.config.mode == Mode::Shadow {
                st.conc.in_flight += u32::from(count); // served anyway
            }
            drop(st);
            copy
        };
        let wait = st.retry_wait(st.effective(&th), a.factor, a.over_ceiling, now, tau, shed);
        Decision {
            verdict: match self.config.mode {
                Mode::Enforce => Verdict::Reject,
                Mode::Shadow => Verdict::ShadowReject,
            },
            retry_after: Some(self.retry_after(wait, rng)),
            ..admit
        }
    }

    /// The Retry-After of a request shed after a wait of `wait` seconds: jittered and capped.
    pub(crate) fn retry_after<R: Uniform + ?Sized>(&self, wait: f64, rng: &mut R) -> Duration {
        let shed = &self.config.shedding;
        decision::retry_after(
            wait,
            rng.next_f64(),
            shed.retry_after_jitter,
            shed.retry_after_cap,
        )
    }

    /// How a new request of `priority` would be treated at `now` (seconds), with the key's
    /// state locked: brings the integral up to date, and decides everything but the draw.
    #[inline]
    fn assess(
        &self,
        st: &mut state::KeyState,
        th: &Thresholds,
        priority: Priority,
        now: f64,
    ) -> Assessment {
        let shed = &self.config.shedding;
        let tau = th.time_constant;
        let standard = st.pressure(now, th);
        st.integral = st.integral_at(standard, now, tau, shed);
        st.integrated_at = Some(now);
        let factor = match priority {
            Priority::Sheddable => shed.sheddable_factor,
            _ => 1.0,
        };
        let pressure = standard * factor;
        let sure = Assessment {
            pressure,
            reject_probability: 0.0,
            factor,
            over_ceiling: None,
        };
        let in_flight = f64::from(st.conc.in_flight);
        // Work conservation: nothing in flight, or fewer than the engine last served within
        // the thresholds: admitting cannot build a queue.
        let adaptive = shed.adaptive_concurrency;
        if priority == Priority::Critical
            || in_flight == 0.0
            || (adaptive && in_flight < st.conc.good_at(now, tau))
        {
            return sure;
        }
        // The engine says its batch is full: the ceiling is at least that batch (`engine`),
        // with no low-concurrency floor under the engine's own count.
        let full = self.engine.full(now);
        let ceiling = match full {
            Some(batch) if batch > 0.0 => st.conc.good_at(now, tau).max(batch),
            _ => st.conc.ceiling(now, tau),
        };
        let t_ttft = st.effective(th).0;
        // The engine has shown its limit above G, and a request admitted now would wait
        // longer than the threshold for a slot; or the engine says so itself.
        let at_ceiling = adaptive && in_flight >= ceiling;
        let slots_full = at_ceiling
            && (full.is_some() || st.conc.slot_wait_exceeds(st.waiting, now, tau, t_ttft));
        let over_ceiling =
            at_ceiling && (slots_full || st.queue(now, th) >= concurrency::CEILING_PRESSURE);
        let p_ceiling = if !over_ceiling {
            0.0
        } else if slots_full
            || st.conc.queue_outlasts(st.waiting, now, tau, t_ttft)
            || st.waiting_ttft(now) > 2.0 * t_ttft
        {
            1.0 // a probe would wait past the threshold: none
        } else {
            shed.max_reject_probability
        };
        Assessment {
            reject_probability: decision::reject_probability_pi(pressure, st.integral, shed)
                .max(p_ceiling),
            over_ceiling: over_ceiling.then_some(ceiling),
            ..sure
        }
    }
}

#[cfg(test)]
mod tests;
