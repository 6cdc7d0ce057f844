//! Policy reloads: a new limiter that shares the per-key state of the previous one.

use std::sync::atomic::Ordering;

use super::Limiter;
use crate::limiter::LimiterConfig;

impl Limiter {
    /// A limiter for `config` that shares `previous`'s state cell with every key that
    /// remains, by label (a tightened threshold forgets the good concurrency, learned against
    /// the old ones): the models named in both policies, and `other`. A model removed
    /// from the policy loses its state (its requests join `other`), and a model newly named
    /// starts afresh (`other` keeps its state); everything starts afresh when the scope
    /// changes.
    pub fn carry_over(config: LimiterConfig, previous: &Limiter) -> Self {
        let mut next = Limiter::new(config);
        next.engine = previous.engine.clone();
        if next.config.scope != previous.config.scope {
            return next;
        }
        for (i, entry) in previous.entries.iter().enumerate() {
            if !entry.in_use.load(Ordering::Relaxed) {
                continue;
            }
            let target = if i as u32 == previous.other {
                Some(next.other)
            } else {
                next.named.get(&*entry.label).copied()
            };
            if let Some(j) = target {
                let to = &mut next.entries[j as usize];
                to.state = entry.state.clone();
                to.mark_used();
                // The good concurrency was learned against the old thresholds: still evidence
                // under looser ones, none under tighter ones.
                let (old, new) = (entry.thresholds, to.thresholds);
                if new.ttft < old.ttft || new.itl < old.itl {
                    to.state.lock().conc.good = 0.0;
                }
            }
        }
        next
    }
}
