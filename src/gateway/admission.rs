//! Admission: the admit/shed decision taken before the upstream is contacted, the request's
//! priority, and the random source the decision draws from.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use parking_lot::Mutex;

use super::Gateway;
use super::client_keys::ClientKeys;
use super::error::GatewayError;
use super::queue::AdmissionQueue;
use crate::limiter::fleet::Routed;
use crate::limiter::{Clock, KeyId, Priority, SplitMix64, Verdict};
use crate::policy::source::Snapshot;

/// Where the shedding coin flips and the Retry-After jitter come from.
#[derive(Debug)]
pub enum RandomSource {
    /// A generator per thread, seeded by `fastrand` (from the OS's hashing seed, the time and
    /// the thread): no contention (production).
    PerThread,
    /// One seeded generator behind a lock: the same seed gives the same decisions (tests).
    Seeded(Mutex<SplitMix64>),
}

thread_local! {
    static RNG: RefCell<SplitMix64> = RefCell::new(SplitMix64::new(fastrand::u64(..)));
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

/// The `x-sluice-priority` header, if sent.
pub fn parse_priority(headers: &HeaderMap) -> Result<Option<Priority>, GatewayError> {
    match headers.get(Priority::HEADER) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| {
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

/// How urgent a priority is, for comparing claims with what a client may claim.
fn rank(p: Priority) -> u8 {
    match p {
        Priority::Sheddable => 0,
        Priority::Standard => 1,
        Priority::Critical => 2,
    }
}

/// The priority a request is served at, from the header's claim and the client's class
/// (`standard` for anonymous clients and clients the policy does not list):
/// - without a claim, the client's class;
/// - with one, the claim, but never above the client's class: any client may lower its own
///   priority (`sheddable`), only a `critical` client may claim `critical`;
/// - where the policy trusts the header (an authenticating proxy sets it), the claim.
pub fn effective_priority(
    claimed: Option<Priority>,
    class: Priority,
    trust_header: bool,
) -> Priority {
    match claimed {
        None => class,
        Some(p) if trust_header || rank(p) <= rank(class) => p,
        Some(_) => class,
    }
}

/// Headers that decide who a request is and how urgent it is may come once. With two copies
/// (a proxy appending its own `x-sluice-priority` after the client's, a second
/// `Authorization`) which one counts would be up to the reader: the request gets 400.
pub fn refuse_repeated(headers: &HeaderMap) -> Result<(), GatewayError> {
    for name in ["authorization", Priority::HEADER] {
        if headers.get_all(name).iter().nth(1).is_some() {
            return Err(GatewayError::bad_param(
                name,
                format!("the {name} header may be sent once; this request has more than one"),
            ));
        }
    }
    Ok(())
}

/// Who the client is, when the policy authenticates clients (its name), and the priority
/// its request is served at; or the 400 (bad or repeated header) or 401 (no valid key where
/// one is required) that refuses it.
pub fn request_priority(
    snap: &Snapshot,
    keys: &ClientKeys,
    headers: &HeaderMap,
) -> Result<(Priority, Option<Arc<str>>), GatewayError> {
    refuse_repeated(headers)?;
    let claimed = parse_priority(headers)?;
    let (class, client) = match &snap.config.client_auth {
        None => (Priority::Standard, None),
        Some(auth) => match keys.authenticate(headers) {
            Some(name) => (
                auth.classes.get(&*name).copied().unwrap_or_default(),
                Some(name),
            ),
            None if auth.required => return Err(GatewayError::Unauthorized),
            None => (Priority::Standard, None),
        },
    };
    let trusted = snap.config.trust_priority_header;
    Ok((effective_priority(claimed, class, trusted), client))
}

/// An admitted request: the policy it was admitted under, the endpoint of the policy's fleet
/// it goes to, and its key there.
#[derive(Debug)]
pub struct Admitted {
    pub snap: Arc<Snapshot>,
    /// Index into the snapshot's fleet and `config.upstream.endpoints`.
    pub endpoint: usize,
    pub key: KeyId,
    /// The key's metric label.
    pub label: String,
    /// Would have been shed; served because the policy is in shadow mode.
    pub shadow: bool,
    /// The priority it was admitted at (`critical` for a fair waiter promoted when its wait
    /// ran out): a retry on another endpoint goes at the same.
    pub priority: Priority,
    /// Counts the request in its key's requests in flight until dropped.
    pub active: Active,
}

/// An admitted request in flight, counted by the limiter from admission until dropped (the
/// request's tracker holds it until the response is complete or the client is gone).
pub struct Active {
    snap: Arc<Snapshot>,
    endpoint: usize,
    key: KeyId,
    clock: Arc<dyn Clock>,
    /// Tried when the request ends: a slot may have freed for a waiting request.
    queue: Arc<AdmissionQueue>,
}

impl std::fmt::Debug for Active {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Active").field("key", &self.key).finish()
    }
}

impl Active {
    /// The guard of a request the limiter counted in flight when it admitted it.
    fn admitted(
        snap: &Arc<Snapshot>,
        endpoint: usize,
        key: KeyId,
        clock: &Arc<dyn Clock>,
        queue: &Arc<AdmissionQueue>,
    ) -> Self {
        Active {
            snap: snap.clone(),
            endpoint,
            key,
            clock: clock.clone(),
            queue: queue.clone(),
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        let limiter = self.snap.fleet.limiter(self.endpoint);
        limiter.end_request(self.key, self.clock.now());
        self.queue.dispatch();
    }
}

/// Admits a request for `model` at `now` at `priority` (see [`request_priority`]) on an
/// endpoint of the policy's fleet with room, or sheds it when none has room
/// ([`crate::limiter::fleet`]). A shed request's error carries its Retry-After; its label is
/// the key's, for counting. While a request of a tenant under its fair share waits for a
/// slot of the model, no other `standard` or `sheddable` request takes one by chance: those
/// are admitted only where there is room for sure ([`Fleet::admit_for_sure`]).
///
/// [`Fleet::admit_for_sure`]: crate::limiter::fleet::Fleet::admit_for_sure
pub fn admit(
    gw: &Gateway,
    snap: Arc<Snapshot>,
    model: &str,
    (priority, fair): (Priority, bool),
) -> Result<Admitted, (String, GatewayError)> {
    let now = gw.clock.now();
    let by_chance = fair || priority == Priority::Critical || !gw.queue.fair_waiting(&snap, model);
    let routed = gw.random.with(|r| match by_chance {
        true => snap.fleet.admit(model, priority, now, r),
        false => snap.fleet.admit_for_sure(model, priority, now, r),
    });
    settle(snap, routed, (model, priority), &gw.clock, &gw.queue)
}

/// [`admit`], and when the request is shed and the policy has a queue, or it is `fair` (a
/// `standard` request of a tenant under its fair share, [`super::fair`]), its wait for room
/// there ([`AdmissionQueue::wait`]). A `fair` request finding no slot in time goes upstream as
/// `critical` would: it is not shed.
pub async fn admit_or_wait(
    gw: &Gateway,
    snap: Arc<Snapshot>,
    model: &str,
    (priority, fair): (Priority, bool),
) -> Result<Admitted, (String, GatewayError)> {
    // The policy is kept past the decision only where a shed request may wait.
    let queued = (fair || snap.config.queue.is_some()).then(|| snap.clone());
    match (admit(gw, snap, model, (priority, fair)), queued) {
        (Err((label, e @ GatewayError::Shed { .. })), Some(snap)) => {
            match gw.queue.wait(&snap, model, (priority, fair), e).await {
                Err(GatewayError::Shed { .. }) if fair => {
                    // (Under the policy in force by then, as a waiter admitted from the queue.)
                    let now = gw.store.load().filter(|s| !s.fleet.is_empty());
                    admit(gw, now.unwrap_or(snap), model, (Priority::Critical, false))
                }
                waited => waited.map_err(|e| (label, e)),
            }
        }
        (other, _) => other,
    }
}

/// Admits a request again, on an endpoint other than `failed` (which could not be reached);
/// None when the fleet has no other.
pub fn admit_elsewhere(
    gw: &Gateway,
    snap: Arc<Snapshot>,
    model: &str,
    priority: Priority,
    failed: usize,
) -> Option<Result<Admitted, (String, GatewayError)>> {
    let now = gw.clock.now();
    let routed =
        (gw.random).with(|r| snap.fleet.admit_elsewhere(model, priority, now, r, failed))?;
    Some(settle(
        snap,
        routed,
        (model, priority),
        &gw.clock,
        &gw.queue,
    ))
}

/// The admitted request (or the shed one's error) of a routing decision under `snap` for
/// `model` at `priority`.
pub(super) fn settle(
    snap: Arc<Snapshot>,
    routed: Routed,
    (model, priority): (&str, Priority),
    clock: &Arc<dyn Clock>,
    queue: &Arc<AdmissionQueue>,
) -> Result<Admitted, (String, GatewayError)> {
    let (endpoint, key, d) = (routed.endpoint, routed.key, routed.decision);
    let label = snap.fleet.limiter(endpoint).label(key).to_owned();
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
        active: Active::admitted(&snap, endpoint, key, clock, queue),
        snap,
        endpoint,
        key,
        label,
        shadow: d.verdict == Verdict::ShadowReject,
        priority,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::Uniform;

    #[test]
    fn priority_header_parses_or_names_itself_in_the_error() {
        let mut h = HeaderMap::new();
        assert_eq!(parse_priority(&h), Ok(None));
        h.insert(Priority::HEADER, " Sheddable ".parse().unwrap());
        assert_eq!(parse_priority(&h), Ok(Some(Priority::Sheddable)));
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
    fn a_repeated_priority_or_authorization_header_is_refused_naming_it() {
        let mut h = HeaderMap::new();
        h.append(Priority::HEADER, "sheddable".parse().unwrap());
        h.append("authorization", "Bearer a".parse().unwrap());
        assert_eq!(refuse_repeated(&h), Ok(()));
        for name in [Priority::HEADER, "authorization"] {
            let mut twice = h.clone();
            twice.append(name, "critical".parse().unwrap());
            match refuse_repeated(&twice) {
                Err(GatewayError::BadRequest { param, message }) => {
                    assert_eq!(param, Some(name));
                    assert!(message.contains("more than one"), "{message}");
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_claim_counts_up_to_the_clients_class_or_when_the_header_is_trusted() {
        use Priority::*;
        let all = [Critical, Standard, Sheddable];
        for class in all {
            assert_eq!(effective_priority(None, class, false), class, "no claim");
            assert_eq!(effective_priority(None, class, true), class, "no claim");
            for claim in all {
                assert_eq!(
                    effective_priority(Some(claim), class, true),
                    claim,
                    "trusted"
                );
            }
            assert_eq!(
                effective_priority(Some(Sheddable), class, false),
                Sheddable,
                "lowering is free"
            );
        }
        // Anonymous and unlisted clients are standard: their `critical` is not believed.
        assert_eq!(
            effective_priority(Some(Critical), Standard, false),
            Standard
        );
        assert_eq!(
            effective_priority(Some(Critical), Critical, false),
            Critical
        );
        assert_eq!(
            effective_priority(Some(Standard), Critical, false),
            Standard
        );
        assert_eq!(
            effective_priority(Some(Standard), Sheddable, false),
            Sheddable
        );
        assert_eq!(
            effective_priority(Some(Critical), Sheddable, false),
            Sheddable
        );
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
