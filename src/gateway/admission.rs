//! Admission: the admit/shed decision taken before the upstream is contacted, the request's
//! priority, and the random source the decision draws from.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use parking_lot::Mutex;

use super::error::GatewayError;
use crate::limiter::{KeyId, Priority, SplitMix64, Verdict};
use crate::policy::source::Snapshot;

/// Where the shedding coin flips and the Retry-After jitter come from.
#[derive(Debug)]
pub enum RandomSource {
    /// A generator per thread, seeded from the time: no contention (production).
    PerThread,
    /// One seeded generator behind a lock: the same seed gives the same decisions (tests).
    Seeded(Mutex<SplitMix64>),
}

thread_local! {
    static RNG: RefCell<SplitMix64> = RefCell::new(SplitMix64::new(time_seed()));
}

fn time_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let here = &t as *const u64 as u64;
    t ^ here.rotate_left(32)
}

impl RandomSource {
    /// A seeded source.
    pub fn seeded(seed: u64) -> Self {
        RandomSource::Seeded(Mutex::new(SplitMix64::new(seed)))
    }

    /// Runs `f` with the generator.
    pub fn with<T>(&self, f: impl FnOnce(&mut SplitMix64) -> T) -> T {
        match self {
            RandomSource::PerThread => RNG.with(|r| f(&mut r.borrow_mut())),
            RandomSource::Seeded(m) => f(&mut m.lock()),
        }
    }
}

/// The `x-sluice-priority` header (standard when absent).
pub fn parse_priority(headers: &HeaderMap) -> Result<Priority, GatewayError> {
    match headers.get(Priority::HEADER) {
        None => Ok(Priority::Standard),
        Some(v) => v.to_str().ok().and_then(|s| s.parse().ok()).ok_or_else(|| {
            GatewayError::bad_param(
                Priority::HEADER,
                format!(
                    "invalid {} header {:?}: expected critical, standard or sheddable",
                    Priority::HEADER,
                    String::from_utf8_lossy(v.as_bytes())
                ),
            )
        }),
    }
}

/// The priority a request is served at: a client may always lower its own priority
/// (`sheddable`), but a `critical` claim counts only when the policy trusts the header;
/// otherwise it is served as `standard`.
pub fn effective_priority(claimed: Priority, trust_header: bool) -> Priority {
    match claimed {
        Priority::Critical if !trust_header => Priority::Standard,
        p => p,
    }
}

/// An admitted request: the policy it was admitted under and its key.
#[derive(Debug)]
pub struct Admitted {
    pub snap: Arc<Snapshot>,
    pub key: KeyId,
    /// The key's metric label.
    pub label: String,
    /// Would have been shed; served because the policy is in shadow mode.
    pub shadow: bool,
}

/// Admits a request for `model` at `now` (at its effective priority), or sheds it. A shed request's error carries its
/// Retry-After; its label is the key's, for counting.
pub fn admit(
    snap: Arc<Snapshot>,
    model: &str,
    priority: Priority,
    now: Duration,
    random: &RandomSource,
) -> Result<Admitted, (String, GatewayError)> {
    let priority = effective_priority(priority, snap.config.trust_priority_header);
    let key = snap.limiter.key(model);
    let label = snap.limiter.label(key).to_owned();
    let d = random.with(|r| snap.limiter.decide(key, priority, now, r));
    if d.verdict == Verdict::Reject {
        let retry_after = d.retry_after.unwrap_or(Duration::from_secs(1));
        return Err((
            label,
            GatewayError::Shed {
                model: model.to_owned(),
                retry_after,
            },
        ));
    }
    Ok(Admitted {
        snap,
        key,
        label,
        shadow: d.verdict == Verdict::ShadowReject,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::Uniform;

    #[test]
    fn priority_header_parses_or_names_itself_in_the_error() {
        let mut h = HeaderMap::new();
        assert_eq!(parse_priority(&h), Ok(Priority::Standard));
        h.insert(Priority::HEADER, " Sheddable ".parse().unwrap());
        assert_eq!(parse_priority(&h), Ok(Priority::Sheddable));
        h.insert(Priority::HEADER, "urgent".parse().unwrap());
        match parse_priority(&h) {
            Err(GatewayError::BadRequest { message, param }) => {
                assert_eq!(param, Some(Priority::HEADER));
                assert!(message.contains("\"urgent\""), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_a_trusted_header_makes_a_request_critical() {
        use Priority::*;
        assert_eq!(effective_priority(Critical, false), Standard);
        assert_eq!(effective_priority(Critical, true), Critical);
        for trust in [false, true] {
            assert_eq!(
                effective_priority(Sheddable, trust),
                Sheddable,
                "lowering is free"
            );
            assert_eq!(effective_priority(Standard, trust), Standard);
        }
    }

    #[test]
    fn seeded_sources_repeat_and_per_thread_sources_draw_in_range() {
        let (a, b) = (RandomSource::seeded(7), RandomSource::seeded(7));
        let xs: Vec<f64> = (0..5).map(|_| a.with(|r| r.next_f64())).collect();
        let ys: Vec<f64> = (0..5).map(|_| b.with(|r| r.next_f64())).collect();
        assert_eq!(xs, ys);
        assert!(xs.windows(2).all(|w| w[0] != w[1]));
        let p = RandomSource::PerThread;
        for _ in 0..100 {
            let x = p.with(|r| r.next_f64());
            assert!((0.0..1.0).contains(&x));
        }
    }
}
