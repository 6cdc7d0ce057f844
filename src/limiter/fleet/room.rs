//! What the fleet asks of one endpoint's limiter: whether a request would be admitted for
//! sure (and admitting it under the same lock), how long a shed request should wait, and, for
//! a new endpoint, where to start.

use std::time::Duration;

use super::super::{Decision, KeyId, Limiter, Priority, Verdict};

/// What counts as room for a request waiting in the admission queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// The limiter would admit it for sure: no draw at all.
    Sure,
    /// The concurrency ceiling would not refuse a `standard` request: a slot is free,
    /// whatever the latency pressure's draw says (a tenant under its fair share).
    Slot,
}

impl Limiter {
    /// For a new endpoint: each key starts with the good concurrency of the median endpoint
    /// of `others` (the lower one of an even count), with its age, so it takes that many
    /// requests at once instead of learning from nothing, and then learns its own.
    pub(crate) fn start_like(&self, others: &[&Limiter]) {
        for (i, entry) in self.entries.iter().enumerate() {
            let mut seen: Vec<(f64, f64)> = others
                .iter()
                .filter_map(|o| o.entries.get(i))
                .map(|e| {
                    let st = e.lock();
                    (st.conc.good, st.conc.raised_at)
                })
                .collect();
            seen.sort_by(|a, b| a.0.total_cmp(&b.0));
            if let Some(&(good, raised_at)) = seen.get(seen.len().saturating_sub(1) / 2) {
                let mut st = entry.lock();
                st.conc.good = good;
                st.conc.raised_at = raised_at;
            }
        }
    }

    /// Marks `key` (resolved by another limiter of the same policy) as used here.
    #[inline]
    pub(crate) fn use_key(&self, key: KeyId) {
        self.entries[key.0 as usize].mark_used();
    }

    /// `(pressure, reject probability, in flight)` of a new request of `priority` on `key` at
    /// `now`; a reject probability of 0 means it would be admitted for sure.
    pub(crate) fn look(&self, key: KeyId, priority: Priority, now: Duration) -> (f64, f64, u32) {
        let entry = &self.entries[key.0 as usize];
        let mut st = entry.lock();
        let a = self.assess(&mut st, &entry.thresholds, priority, now.as_secs_f64());
        (a.pressure, a.reject_probability, st.conc.in_flight)
    }

    /// Admits a request of `priority` on `key` at `now` and counts it in flight, under one
    /// lock, if it would be admitted for sure; otherwise counts nothing.
    pub(crate) fn admit_if_room(
        &self,
        key: KeyId,
        priority: Priority,
        now: Duration,
    ) -> Option<Decision> {
        self.admit_if(key, priority, now, |a| a.reject_probability == 0.0)
    }

    /// Admits a `standard` request on `key` at `now` and counts it in flight, under one lock,
    /// if the concurrency ceiling would not refuse it, whatever the draw on the latency
    /// pressure would say: a slot is free (for a tenant under its fair share,
    /// [`crate::gateway::fair`]); otherwise counts nothing.
    pub(crate) fn admit_if_slot(&self, key: KeyId, now: Duration) -> Option<Decision> {
        self.admit_if(key, Priority::Standard, now, |a| a.over_ceiling.is_none())
    }

    fn admit_if(
        &self,
        key: KeyId,
        priority: Priority,
        now: Duration,
        room: impl Fn(&super::super::Assessment) -> bool,
    ) -> Option<Decision> {
        let entry = &self.entries[key.0 as usize];
        let mut st = entry.lock();
        let a = self.assess(&mut st, &entry.thresholds, priority, now.as_secs_f64());
        if !room(&a) {
            return None;
        }
        st.conc.in_flight += 1;
        Some(Decision {
            verdict: Verdict::Admit,
            pressure: a.pressure,
            reject_probability: 0.0,
            retry_after: None,
        })
    }

    /// Admits a request on `key` at `now` and counts it in flight, under one lock, if the
    /// engine says nothing waits in it and the gateway has no more requests in flight on the
    /// key than the engine runs (see [`super::super::engine::EngineGate::open`]).
    pub(crate) fn admit_if_engine_room(&self, key: KeyId, now: Duration) -> Option<Decision> {
        let running = self.engine.open(now.as_secs_f64())?;
        let entry = &self.entries[key.0 as usize];
        let mut st = entry.lock();
        if f64::from(st.conc.in_flight) > running {
            return None;
        }
        st.conc.in_flight += 1;
        Some(Decision {
            verdict: Verdict::Admit,
            pressure: 0.0,
            reject_probability: 0.0,
            retry_after: None,
        })
    }

    /// The wait, in seconds, before a request of `priority` shed on `key` at `now` is worth
    /// retrying here (before jitter and cap).
    pub(crate) fn shed_wait(&self, key: KeyId, priority: Priority, now: Duration) -> f64 {
        let entry = &self.entries[key.0 as usize];
        let th = entry.thresholds;
        let now = now.as_secs_f64();
        let mut st = entry.lock();
        let a = self.assess(&mut st, &th, priority, now);
        if a.reject_probability == 0.0 {
            return 0.0;
        }
        let st = *st;
        st.retry_wait(
            st.effective(&th),
            a.factor,
            a.over_ceiling,
            now,
            th.time_constant,
            &self.config.shedding,
        )
    }
}
