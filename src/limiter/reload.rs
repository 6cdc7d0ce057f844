//! Policy reloads: a new limiter that shares the per-key state of the previous one.

use std::sync::atomic::Ordering;

use super::{Limiter, Scope};
use crate::limiter::LimiterConfig;

impl Limiter {
    /// A limiter for `config` that shares `previous`'s state cell with every key that
    /// remains, by label: named models of the new policy (whether they were named or unknown
    /// before), unknown-model keys within the new `max_dynamic_keys`, and `other`. A model
    /// removed from the policy loses its state (a request for it later starts a fresh
    /// unknown-model key); so does everything when the scope changes.
    pub fn carry_over(config: LimiterConfig, previous: &Limiter) -> Self {
        let mut next = Limiter::new(config);
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
            let target = if next.config.scope == Scope::Global || i as u32 == previous.other {
                Some(if i as u32 == previous.other {
                    next.other
                } else {
                    0
                })
            } else if let Some(&j) = next.named.get(&**label) {
                Some(j)
            } else if previous.named.contains_key(&**label) {
                None // removed from the policy
            } else {
                next.adopt_dynamic(label)
            };
            if let Some(j) = target {
                let to = &mut next.slots[j as usize];
                to.state = slot.state.clone();
                to.mark_used();
            }
        }
        next
    }

    /// Gives an unknown-model key carried over from the previous policy a dynamic slot, if
    /// one is left.
    fn adopt_dynamic(&mut self, label: &str) -> Option<u32> {
        let n = *self.dynamic_used.get_mut();
        if n >= self.config.max_dynamic_keys {
            return None;
        }
        *self.dynamic_used.get_mut() = n + 1;
        let i = self.first_dynamic + n as u32;
        let _ = self.slots[i as usize].label.set(label.into());
        self.dynamic.insert(label.into(), i);
        Some(i)
    }
}
