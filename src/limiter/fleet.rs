//! A fleet of endpoints serving one policy: a [`Limiter`] per endpoint (so every (model,
//! endpoint) pair has its own moving averages, waiting requests, requests in flight, learned
//! ceiling and integral), and the choice of the endpoint a new request goes to.
//!
//! Routing a request of some priority at some time:
//! 1. An endpoint has *room* when its limiter would admit the request for sure: work
//!    conservation (nothing in flight, or fewer than the concurrency at which it last met the
//!    thresholds), `critical`, or no pressure at all. Two endpoints are drawn at random (power
//!    of two choices: no herd on the single least-loaded endpoint, which every gateway
//!    replica would pick at once), and the request goes to the one with room and the lower
//!    pressure, ties to the one with fewer requests in flight.
//! 2. If neither of the two has room, every other endpoint is asked, least pressure first:
//!    a request is admitted whenever some endpoint has room.
//! 3. Only when no endpoint has room does the shedding draw happen, once, on the endpoint
//!    with the lowest rejection probability (the fleet sheds no more than its best endpoint
//!    would), of those the one expected to free a slot first; a request shed there gets the
//!    Retry-After of the endpoint expected to free first, the shortest wait over the fleet.
//!
//! Each "has room" check and the admission that counts the request in flight happen under
//! one lock of that endpoint's key (`Limiter::admit_if_room`), so racing requests cannot
//! overfill an endpoint between the check and the count. With one endpoint the fleet is
//! exactly the single limiter: `admit` is one call to [`Limiter::admit`].
//!
//! Endpoints that fail are ejected for a while ([`health`]): routing leaves them out, unless
//! every endpoint is ejected (then it ignores ejection rather than refuse everything). A
//! request whose endpoint could not be reached is routed once more, among the others
//! ([`Fleet::admit_elsewhere`]).
//!
//! A reload ([`Fleet::carry_over`]) keeps the state of every endpoint that remains (by label,
//! host:port), as [`Limiter::carry_over`] keeps every model's, and its health; a new endpoint
//! starts with the good concurrency of the median endpoint that remains (no warm-up storm, no
//! trickle) and learns its own from there.

pub mod health;
mod room;
pub use room::Room;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{Decision, KeyId, Limiter, LimiterConfig, Priority, Uniform, Verdict};
use crate::signals::EngineSignal;

/// One endpoint: its label (`host:port`), its limiter, the requests routed to it, its health
/// and its engine signal (the last three shared across reloads, like the limiter's state).
#[derive(Debug)]
struct Member {
    label: Box<str>,
    limiter: Limiter,
    routed: Arc<AtomicU64>,
    health: Arc<HealthCell>,
    signal: Arc<parking_lot::Mutex<EngineSignal>>,
}

/// An endpoint's health, and when its ejection ends (seconds, as f64 bits) for routing to
/// read without the lock.
#[derive(Debug, Default)]
struct HealthCell {
    state: parking_lot::Mutex<health::Health>,
    until: AtomicU64,
}

impl HealthCell {
    #[inline]
    fn ejected(&self, now: f64) -> bool {
        now < f64::from_bits(self.until.load(Ordering::Relaxed))
    }
}

/// The limiters of a policy's endpoints, in the order of its endpoint list.
#[derive(Debug)]
pub struct Fleet {
    members: Box<[Member]>,
}

/// Where a request was admitted (or, shed, which endpoint decided), and the decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Routed {
    /// Index into the fleet (and the policy's endpoint list).
    pub endpoint: usize,
    pub key: KeyId,
    pub decision: Decision,
}

/// An endpoint's treatment of a new request, read under its key's lock.
#[derive(Debug, Clone, Copy)]
struct Look {
    endpoint: usize,
    pressure: f64,
    reject_probability: f64,
    in_flight: u32,
}

impl Look {
    fn room(&self) -> bool {
        self.reject_probability == 0.0
    }

    /// Room first, then less pressure, then fewer in flight.
    fn order(&self, other: &Look) -> std::cmp::Ordering {
        (!self.room(), self.pressure, self.in_flight)
            .partial_cmp(&(!other.room(), other.pressure, other.in_flight))
            .unwrap_or(std::cmp::Ordering::Equal)
    }
}

impl Fleet {
    /// A fleet of endpoints labelled `labels`, each with a fresh limiter for `config`.
    pub fn new(config: &LimiterConfig, labels: &[String]) -> Self {
        Fleet::carry_over(config, labels, None)
    }

    /// A fleet for `config` and `labels` keeping, for every endpoint of `previous` that
    /// remains (by label), its state ([`Limiter::carry_over`]). A fleet may be empty (a
    /// discovered Service with no ready endpoint): it admits nothing, and its users answer
    /// before asking it to route ([`Fleet::admit`] panics on it).
    pub fn carry_over(config: &LimiterConfig, labels: &[String], previous: Option<&Fleet>) -> Self {
        let members = labels
            .iter()
            .map(|label| {
                let before = previous.and_then(|p| Some(&p.members[p.position(label)?]));
                Member {
                    label: label.as_str().into(),
                    limiter: match before {
                        Some(old) => Limiter::carry_over(config.clone(), &old.limiter),
                        None => Limiter::new(config.clone()),
                    },
                    routed: before.map(|old| old.routed.clone()).unwrap_or_default(),
                    health: before.map(|old| old.health.clone()).unwrap_or_default(),
                    signal: before.map(|old| old.signal.clone()).unwrap_or_default(),
                }
            })
            .collect::<Vec<Member>>();
        // A new endpoint starts at the typical concurrency of the endpoints that stay.
        let kept: Vec<&Limiter> = (members.iter())
            .filter(|m| previous.is_some_and(|p| p.position(&m.label).is_some()))
            .map(|m| &m.limiter)
            .collect();
        if !kept.is_empty() {
            for m in &members {
                if previous.is_some_and(|p| p.position(&m.label).is_none()) {
                    m.limiter.start_like(&kept);
                }
            }
        }
        Fleet {
            members: members.into_boxed_slice(),
        }
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The endpoint's label (`host:port`).
    pub fn label(&self, endpoint: usize) -> &str {
        &self.members[endpoint].label
    }

    /// The endpoint's engine signal (`spec.upstream.engineMetrics`).
    pub fn signal(&self, endpoint: usize) -> &parking_lot::Mutex<EngineSignal> {
        &self.members[endpoint].signal
    }

    /// The endpoint's limiter.
    pub fn limiter(&self, endpoint: usize) -> &Limiter {
        &self.members[endpoint].limiter
    }

    /// The index of the endpoint labelled `label`.
    pub fn position(&self, label: &str) -> Option<usize> {
        self.members.iter().position(|m| &*m.label == label)
    }

    /// The endpoints' labels and limiters.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Limiter)> {
        self.members.iter().map(|m| (&*m.label, &m.limiter))
    }

    /// Requests routed to the endpoint (admitted there, shadow-rejected included) since it
    /// joined the fleet.
    pub fn routed(&self, endpoint: usize) -> u64 {
        self.members[endpoint].routed.load(Ordering::Relaxed)
    }

    /// Routes a new request for `model` of `priority` at `now` (see the module docs): admitted
    /// (and counted in flight) on an endpoint, or shed. Call [`Limiter::end_request`] on the
    /// endpoint's limiter when an admitted request ends.
    pub fn admit<R: Uniform + ?Sized>(
        &self,
        model: &str,
        priority: Priority,
        now: Duration,
        rng: &mut R,
    ) -> Routed {
        self.route(model, priority, now, rng, (None, true))
            .expect("an empty fleet is answered before routing")
    }

    /// [`Fleet::admit`] without the draw ([`Limiter::admit_for_sure`]): admitted only where
    /// there is room for sure, otherwise shed (a tenant under its fair share waits for the
    /// next slot, and no request takes it by chance before it).
    pub fn admit_for_sure<R: Uniform + ?Sized>(
        &self,
        model: &str,
        priority: Priority,
        now: Duration,
        rng: &mut R,
    ) -> Routed {
        self.route(model, priority, now, rng, (None, false))
            .expect("an empty fleet is answered before routing")
    }

    /// Routes a request again, among the endpoints other than `failed` (which it could not
    /// reach); None when there is no other.
    pub fn admit_elsewhere<R: Uniform + ?Sized>(
        &self,
        model: &str,
        priority: Priority,
        now: Duration,
        rng: &mut R,
        failed: usize,
    ) -> Option<Routed> {
        self.route(model, priority, now, rng, (Some(failed), true))
    }

    /// Admits a request waiting in the admission queue, if some endpoint has `room` for it at
    /// `now`: first one with room (the least pressed), then one whose engine says nothing
    /// waits in it ([`crate::limiter::engine::EngineGate::open`]); None when none does (nothing drawn,
    /// nothing counted).
    pub fn admit_queued(
        &self,
        model: &str,
        priority: Priority,
        room: Room,
        now: Duration,
    ) -> Option<Routed> {
        let key = self.members.first()?.limiter.key(model);
        let mut looks: Vec<Look> = (self.eligible(now, None).into_iter())
            .map(|e| self.look(e, key, priority, now))
            .collect();
        looks.sort_by(Look::order);
        let room = looks.iter().find_map(|l| {
            let limiter = self.limiter(l.endpoint);
            let d = match room {
                Room::Sure if l.room() => limiter.admit_if_room(key, priority, now)?,
                Room::Sure => return None,
                Room::Slot => limiter.admit_if_slot(key, now)?,
            };
            Some((l.endpoint, d))
        });
        let (endpoint, decision) = room.or_else(|| {
            looks.iter().find_map(|l| {
                let d = self.limiter(l.endpoint).admit_if_engine_room(key, now)?;
                Some((l.endpoint, d))
            })
        })?;
        self.limiter(endpoint).use_key(key);
        self.count(endpoint, &decision);
        Some(Routed {
            endpoint,
            key,
            decision,
        })
    }

    /// Any endpoint taking requests at `now` (for requests that are not admitted: no model),
    /// other than `avoid`.
    pub fn any<R: Uniform + ?Sized>(
        &self,
        now: Duration,
        rng: &mut R,
        avoid: Option<usize>,
    ) -> Option<usize> {
        let eligible = self.eligible(now, avoid);
        (!eligible.is_empty()).then(|| eligible[draw(rng, eligible.len())])
    }

    /// The endpoints a request may go to: not `avoid`, not ejected; all but `avoid` when every
    /// one is ejected (ejection never closes the fleet).
    fn eligible(&self, now: Duration, avoid: Option<usize>) -> Vec<usize> {
        let secs = now.as_secs_f64();
        let others = (0..self.members.len()).filter(|&i| Some(i) != avoid);
        let up: Vec<usize> = others
            .clone()
            .filter(|&i| !self.members[i].health.ejected(secs))
            .collect();
        if up.is_empty() { others.collect() } else { up }
    }

    fn route<R: Uniform + ?Sized>(
        &self,
        model: &str,
        priority: Priority,
        now: Duration,
        rng: &mut R,
        (avoid, by_chance): (Option<usize>, bool),
    ) -> Option<Routed> {
        let first = &self.members.first()?.limiter;
        let key = first.key(model);
        let decide = |l: &Limiter, rng: &mut R| match by_chance {
            true => l.admit(key, priority, now, rng),
            false => l.admit_for_sure(key, priority, now, rng),
        };
        if self.members.len() == 1 && avoid.is_none() {
            let decision = decide(first, rng);
            self.count(0, &decision);
            return Some(Routed {
                endpoint: 0,
                key,
                decision,
            });
        }
        let admitted = |endpoint: usize, decision| {
            self.members[endpoint].limiter.use_key(key);
            self.count(endpoint, &decision);
            Routed {
                endpoint,
                key,
                decision,
            }
        };
        let eligible = self.eligible(now, avoid);
        let n = eligible.len();
        if n <= 1 {
            let &e = eligible.first()?;
            return Some(admitted(e, decide(self.limiter(e), rng)));
        }
        let look = |endpoint: usize| self.look(endpoint, key, priority, now);
        // Two choices.
        let a = draw(rng, n);
        let mut b = draw(rng, n - 1);
        if b >= a {
            b += 1;
        }
        let (a, b) = (eligible[a], eligible[b]);
        let mut two = [look(a), look(b)];
        two.sort_by(Look::order);
        for l in two.iter().filter(|l| l.room()) {
            if let Some(d) = self.limiter(l.endpoint).admit_if_room(key, priority, now) {
                return Some(admitted(l.endpoint, d));
            }
        }
        // Neither had room: any endpoint with room, least pressure first.
        let mut all: Vec<Look> = (eligible.iter().copied())
            .filter(|&i| i != a && i != b)
            .map(look)
            .collect();
        all.extend(two);
        all.sort_by(Look::order);
        for l in all.iter().filter(|l| l.room()) {
            if let Some(d) = self.limiter(l.endpoint).admit_if_room(key, priority, now) {
                return Some(admitted(l.endpoint, d));
            }
        }
        // The fleet is full: one draw, on the endpoint that sheds least, of those the one
        // expected to free a slot first (not merely the one with fewest in flight, which is
        // the slowest engine's: its ceiling is lowest).
        let waits: Vec<(usize, f64, f64)> = (all.iter())
            .map(|l| {
                let wait = self.limiter(l.endpoint).shed_wait(key, priority, now);
                (l.endpoint, l.reject_probability, wait)
            })
            .collect();
        let &(best, _, _) = waits
            .iter()
            .min_by(|x, y| {
                (x.1, x.2)
                    .partial_cmp(&(y.1, y.2))
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .expect("at least one endpoint");
        let mut decision = decide(self.limiter(best), rng);
        if decision.verdict == Verdict::Reject {
            let soonest = waits.iter().map(|w| w.2).fold(f64::INFINITY, f64::min);
            decision.retry_after = Some(self.limiter(best).retry_after(soonest, rng));
        }
        Some(admitted(best, decision))
    }

    /// The outcome of a request sent to `endpoint` at `now`: `false` for a connection that
    /// could not be made or a 5xx answer. Ejects the endpoint after failures in a row, and
    /// logs an ejection and a return once each.
    pub fn report(&self, endpoint: usize, ok: bool, now: Duration) {
        let change = {
            let cell = &self.members[endpoint].health;
            let mut h = cell.state.lock();
            let change = if ok {
                h.success()
            } else {
                h.failure(now.as_secs_f64())
            };
            cell.until.store(h.until().to_bits(), Ordering::Relaxed);
            change
        };
        let upstream = self.label(endpoint);
        match change {
            Some(health::Change::Ejected { seconds, failures }) => tracing::warn!(
                %upstream,
                failures,
                ejected_for_s = seconds,
                "endpoint ejected after failures in a row: no new requests go to it until then, when it is tried again"
            ),
            Some(health::Change::Returned) => {
                tracing::info!(%upstream, "endpoint answered again after its ejection: back in the fleet")
            }
            None => {}
        }
    }

    /// Whether `endpoint` takes new requests at `now` (not ejected).
    pub fn up(&self, endpoint: usize, now: Duration) -> bool {
        !self.members[endpoint].health.ejected(now.as_secs_f64())
    }

    #[inline]
    fn count(&self, endpoint: usize, decision: &Decision) {
        if decision.verdict != Verdict::Reject {
            self.members[endpoint]
                .routed
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn look(&self, endpoint: usize, key: KeyId, priority: Priority, now: Duration) -> Look {
        let (pressure, reject_probability, in_flight) =
            self.limiter(endpoint).look(key, priority, now);
        Look {
            endpoint,
            pressure,
            reject_probability,
            in_flight,
        }
    }
}

/// A uniform index below `n` (> 0).
fn draw<R: Uniform + ?Sized>(rng: &mut R, n: usize) -> usize {
    (rng.next_f64() * n as f64) as usize % n
}
