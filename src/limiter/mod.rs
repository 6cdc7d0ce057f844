//! The latency limiter: per-key moving averages of time-to-first-token (TTFT) and
//! inter-token latency (ITL), and the decision to admit or shed a new request.
//!
//! - [`estimator`]: the fading-evidence time-weighted moving average and its maths
//!   (read/write consistency, evidence cap, time to fall to a level).
//! - [`decision`]: pressure → rejection probability, Retry-After, priorities.
//! - [`clock`], [`random`]: injected time and randomness, so tests are exact.
//!
//! A [`Limiter`] is built from one validated [`LimiterConfig`] and is immutable apart from
//! the estimator state: a policy reload builds a new limiter with [`Limiter::carry_over`],
//! which keeps the state of every key that still exists, and the server swaps an `Arc`.
//!
//! Keys: under [`Scope::PerModel`] every model named in the policy has its own key; other
//! model strings get a key of their own (with the default thresholds) until
//! `max_dynamic_keys` are in use, and then all share the key labelled [`OTHER_LABEL`], so
//! arbitrary client input cannot grow memory or metric label sets without bound. Under
//! [`Scope::Global`] there is one key, [`GLOBAL_LABEL`].
//!
//! Hot path: [`Limiter::key`] is a hash lookup (no allocation unless a new dynamic key is
//! created, at most `max_dynamic_keys` times per limiter); [`Limiter::decide`] and
//! [`Limiter::record`] lock one key's small mutex for a copy or an update of two estimators
//! (never across an `.await`: the API is synchronous) and allocate nothing. Key slots are
//! cache-line aligned so different keys do not contend; the locks are parking_lot's, which
//! spin briefly before parking, right for critical sections of a few tens of nanoseconds.

pub mod clock;
pub mod decision;
pub mod estimator;
pub mod fxhash;
pub mod random;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::{Mutex, MutexGuard};

pub use clock::{Clock, ManualClock, MonotonicClock};
pub use decision::{Decision, Priority, UnknownPriority, Verdict};
pub use estimator::{Estimator, InvalidSample};
pub use fxhash::{FxBuildHasher, FxHasher};
pub use random::{SplitMix64, Uniform};

/// Label of the key shared by unknown models once `max_dynamic_keys` are in use.
pub const OTHER_LABEL: &str = "other";
/// Label of the single key under [`Scope::Global`].
pub const GLOBAL_LABEL: &str = "global";

/// Enforce or only observe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Enforce,
    Shadow,
}

/// What shares one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    #[default]
    PerModel,
    Global,
}

/// The two latency signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Time to first token: request sent upstream → first content-bearing chunk.
    Ttft = 0,
    /// Inter-token latency: gap between consecutive content-bearing chunks of one stream.
    Itl = 1,
}

/// Thresholds of one key, all in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// TTFT threshold, seconds (> 0).
    pub ttft: f64,
    /// ITL threshold, seconds (> 0).
    pub itl: f64,
    /// Time constant τ of both moving averages, seconds (≥ 1 in policies).
    pub time_constant: f64,
}

/// Shape of shedding and Retry-After.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shedding {
    /// `p_max ∈ (0, 1]`.
    pub max_reject_probability: f64,
    /// `ramp ≥ 1`: pressure at which `p_max` is reached.
    pub ramp: f64,
    /// Evidence cap in samples (≥ 1).
    pub max_evidence: f64,
    /// Factor (> 1) by which a sheddable request's pressure is scaled up.
    pub sheddable_factor: f64,
    /// Retry-After is stretched by a uniform factor in `[1, 1 + jitter)`.
    pub retry_after_jitter: f64,
    /// Longest Retry-After.
    pub retry_after_cap: Duration,
}

impl Default for Shedding {
    fn default() -> Self {
        Shedding {
            max_reject_probability: 0.95,
            ramp: 1.5,
            max_evidence: 200.0,
            sheddable_factor: 1.25,
            retry_after_jitter: 0.2,
            retry_after_cap: Duration::from_secs(60),
        }
    }
}

/// Everything a limiter needs, validated (see `policy::PolicyConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct LimiterConfig {
    pub mode: Mode,
    pub scope: Scope,
    pub defaults: Thresholds,
    /// Per-model thresholds; names are unique.
    pub models: Vec<(String, Thresholds)>,
    pub shedding: Shedding,
    /// How many unknown model names get a key of their own before they share `other`.
    pub max_dynamic_keys: usize,
}

/// Default bound on distinct unknown model keys.
pub const DEFAULT_MAX_DYNAMIC_KEYS: usize = 32;

/// A resolved key; valid for the limiter that produced it (and, by label, after a reload).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(u32);

/// One key's state, alone on its cache lines.
#[repr(align(128))]
struct Slot {
    label: OnceLock<Box<str>>,
    thresholds: Thresholds,
    /// Set once the key has been handed out (the `other` key and dynamic keys start unused).
    in_use: AtomicBool,
    /// `[ttft, itl]`.
    state: Mutex<[Estimator; 2]>,
}

impl Slot {
    fn new(label: Option<&str>, thresholds: Thresholds, in_use: bool) -> Self {
        let cell = OnceLock::new();
        if let Some(l) = label {
            let _ = cell.set(l.into());
        }
        Slot {
            label: cell,
            thresholds,
            in_use: AtomicBool::new(in_use),
            state: Mutex::new([Estimator::default(); 2]),
        }
    }

    #[inline]
    fn lock(&self) -> MutexGuard<'_, [Estimator; 2]> {
        self.state.lock()
    }

    #[inline]
    fn mark_used(&self) {
        if !self.in_use.load(Ordering::Relaxed) {
            self.in_use.store(true, Ordering::Relaxed);
        }
    }
}

/// Current values of one key, for metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeyReading<'a> {
    pub label: &'a str,
    pub thresholds: Thresholds,
    /// Moving average of TTFT, seconds.
    pub ttft: f64,
    /// Moving average of ITL, seconds.
    pub itl: f64,
    /// Pressure ratio of a standard-priority request.
    pub pressure: f64,
    /// Rejection probability of a standard-priority request.
    pub reject_probability: f64,
}

/// The per-key moving averages and the admission decision.
pub struct Limiter {
    config: LimiterConfig,
    named: HashMap<Box<str>, u32, FxBuildHasher>,
    dynamic: DashMap<Box<str>, u32, FxBuildHasher>,
    dynamic_used: AtomicUsize,
    first_dynamic: u32,
    other: u32,
    slots: Box<[Slot]>,
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
        let mut slots = Vec::new();
        let mut named = HashMap::default();
        let (first_dynamic, other);
        match config.scope {
            Scope::Global => {
                slots.push(Slot::new(Some(GLOBAL_LABEL), config.defaults, true));
                first_dynamic = 1;
                other = 0;
            }
            Scope::PerModel => {
                for (name, t) in &config.models {
                    named.insert(name.as_str().into(), slots.len() as u32);
                    slots.push(Slot::new(Some(name), *t, true));
                }
                first_dynamic = slots.len() as u32;
                for _ in 0..config.max_dynamic_keys {
                    slots.push(Slot::new(None, config.defaults, false));
                }
                other = slots.len() as u32;
                slots.push(Slot::new(Some(OTHER_LABEL), config.defaults, false));
            }
        }
        Limiter {
            config,
            named,
            dynamic: DashMap::default(),
            dynamic_used: AtomicUsize::new(0),
            first_dynamic,
            other,
            slots: slots.into_boxed_slice(),
        }
    }

    /// A limiter for `config` that keeps `previous`'s moving averages for every key that
    /// exists in both (by label). Models dropped from the policy keep their state under a
    /// dynamic key with the default thresholds while dynamic keys remain.
    pub fn carry_over(config: LimiterConfig, previous: &Limiter) -> Self {
        let next = Limiter::new(config);
        if next.config.scope != previous.config.scope {
            return next;
        }
        for (i, slot) in previous.slots.iter().enumerate() {
            if !slot.in_use.load(Ordering::Relaxed) {
                continue;
            }
            let Some(label) = slot.label.get() else {
                continue;
            };
            let key = if i as u32 == previous.other {
                next.other_key()
            } else {
                next.key(label)
            };
            let state = *slot.lock();
            *next.slots[key.0 as usize].lock() = state;
        }
        next
    }

    pub fn config(&self) -> &LimiterConfig {
        &self.config
    }

    fn other_key(&self) -> KeyId {
        let slot = &self.slots[self.other as usize];
        slot.mark_used();
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
        if let Some(i) = self.dynamic.get(model) {
            return KeyId(*i);
        }
        self.new_dynamic_key(model)
    }

    #[cold]
    fn new_dynamic_key(&self, model: &str) -> KeyId {
        if self.dynamic_used.load(Ordering::Relaxed) >= self.config.max_dynamic_keys {
            return self.other_key();
        }
        // The entry holds its shard's lock, so one model never gets two slots.
        let index = *self.dynamic.entry(model.into()).or_insert_with(|| {
            let n = self.dynamic_used.fetch_add(1, Ordering::Relaxed);
            if n >= self.config.max_dynamic_keys {
                return self.other;
            }
            let i = self.first_dynamic + n as u32;
            let slot = &self.slots[i as usize];
            let _ = slot.label.set(model.into());
            slot.mark_used();
            i
        });
        if index == self.other {
            // Lost a race for the last dynamic key: do not remember this name.
            self.dynamic.remove(model);
            return self.other_key();
        }
        KeyId(index)
    }

    /// The metric label of a key.
    pub fn label(&self, key: KeyId) -> &str {
        self.slots[key.0 as usize]
            .label
            .get()
            .map(|l| &**l)
            .unwrap_or(OTHER_LABEL)
    }

    /// Number of keys handed out so far (named, dynamic, `other`).
    pub fn key_count(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.in_use.load(Ordering::Relaxed))
            .count()
    }

    /// Thresholds of a key.
    pub fn thresholds(&self, key: KeyId) -> Thresholds {
        self.slots[key.0 as usize].thresholds
    }

    /// Records a latency sample (seconds) taken at `now`.
    #[inline]
    pub fn record(
        &self,
        key: KeyId,
        signal: Signal,
        seconds: f64,
        now: Duration,
    ) -> Result<(), InvalidSample> {
        let slot = &self.slots[key.0 as usize];
        let tau = slot.thresholds.time_constant;
        let cap = self.config.shedding.max_evidence;
        slot.lock()[signal as usize].record(seconds, now.as_secs_f64(), tau, cap)
    }

    /// The moving averages `(ttft, itl)` of a key at `now`, seconds.
    pub fn averages(&self, key: KeyId, now: Duration) -> (f64, f64) {
        let slot = &self.slots[key.0 as usize];
        let [ttft, itl] = *slot.lock();
        let (now, tau) = (now.as_secs_f64(), slot.thresholds.time_constant);
        (ttft.read(now, tau), itl.read(now, tau))
    }

    /// Admits or sheds a new request of `priority` on `key` at `now`.
    #[inline]
    pub fn decide<R: Uniform + ?Sized>(
        &self,
        key: KeyId,
        priority: Priority,
        now: Duration,
        rng: &mut R,
    ) -> Decision {
        let slot = &self.slots[key.0 as usize];
        let [ttft, itl] = *slot.lock();
        let th = slot.thresholds;
        let shed = &self.config.shedding;
        let (now, tau) = (now.as_secs_f64(), th.time_constant);
        let factor = match priority {
            Priority::Sheddable => shed.sheddable_factor,
            _ => 1.0,
        };
        let pressure = (ttft.read(now, tau) / th.ttft).max(itl.read(now, tau) / th.itl) * factor;
        let admit = Decision {
            verdict: Verdict::Admit,
            pressure,
            reject_probability: 0.0,
            retry_after: None,
        };
        if priority == Priority::Critical {
            return admit;
        }
        let p = decision::reject_probability(pressure, shed.max_reject_probability, shed.ramp);
        if p == 0.0 || rng.next_f64() >= p {
            return Decision {
                reject_probability: p,
                ..admit
            };
        }
        // Time until the pressure is back at 1: each signal read ≤ threshold / factor.
        let wait = ttft
            .seconds_until_at_most(th.ttft / factor, now, tau)
            .max(itl.seconds_until_at_most(th.itl / factor, now, tau));
        let retry = decision::retry_after(
            wait,
            rng.next_f64(),
            shed.retry_after_jitter,
            shed.retry_after_cap,
        );
        Decision {
            verdict: match self.config.mode {
                Mode::Enforce => Verdict::Reject,
                Mode::Shadow => Verdict::ShadowReject,
            },
            pressure,
            reject_probability: p,
            retry_after: Some(retry),
        }
    }

    /// Readings of every key in use, for metrics.
    pub fn readings(&self, now: Duration) -> impl Iterator<Item = KeyReading<'_>> + '_ {
        let shed = self.config.shedding;
        self.slots
            .iter()
            .filter(|s| s.in_use.load(Ordering::Relaxed))
            .filter_map(move |slot| {
                let label = slot.label.get()?;
                let [ttft, itl] = *slot.lock();
                let th = slot.thresholds;
                let (n, tau) = (now.as_secs_f64(), th.time_constant);
                let (t, i) = (ttft.read(n, tau), itl.read(n, tau));
                let pressure = (t / th.ttft).max(i / th.itl);
                Some(KeyReading {
                    label,
                    thresholds: th,
                    ttft: t,
                    itl: i,
                    pressure,
                    reject_probability: decision::reject_probability(
                        pressure,
                        shed.max_reject_probability,
                        shed.ramp,
                    ),
                })
            })
    }
}

#[cfg(test)]
mod tests;
