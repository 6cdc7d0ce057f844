//! The admission queue (`spec.queue`): a request the limiter would shed waits up to `maxWait`
//! for room instead of getting 429 at once.
//!
//! - **Order**: priority first, then arrival. `critical` is never shed, so never waits;
//!   `standard` goes before `sheddable`, and both wait at most `maxWait`.
//! - **Tenants under their fair share** ([`super::fair`]): a `standard` request of a tenant
//!   at or under its share, while another is over its own, waits here whenever the gate
//!   sheds it, with or without `spec.queue`, ranked ahead of every other `standard` request.
//!   Its room is a free slot ([`Room::Slot`]: the concurrency ceiling would not refuse it,
//!   whatever the latency pressure's draw says), so it takes the next slot a request frees,
//!   before any new arrival. It waits at most the model's TTFT threshold (a longer wait
//!   would miss it anyway); then it goes upstream as `critical` would (`outcome="promoted"`),
//!   so it is never shed for fairness' sake. While one waits, no other `standard` or
//!   `sheddable` request of the model takes a slot by chance (the draw of the latency gate):
//!   those are admitted only where there is room for sure, so the slot a request frees goes
//!   to the waiter. A request finding the
//!   queue full (`maxRequests`) is shed, unless it outranks the last one waiting (the newest of
//!   the lowest priority), which is then shed in its place.
//! - **Room** ([`crate::limiter::fleet::Fleet::admit_queued`]): an endpoint whose limiter
//!   admits the request for sure (below its ceiling, no pressure), else one whose engine
//!   reports nothing waiting (with `engineMetrics`), one request more than the gateway had in
//!   flight there at that reading.
//! - **Events, not polling**: the queue is tried when a request ends (its
//!   [`super::admission::Active`] is dropped), after a scrape round in which an engine
//!   reported nothing waiting, when a request arrives, and at a waiter's deadline. Each try
//!   takes the queue's lock once and goes through the waiters in order, trying each model
//!   once: a model with no room is skipped for the rest of the pass.
//! - **Expiry**: a request still waiting at `maxWait` (on the gateway's clock) gets 429
//!   `outcome="expired"`, with a Retry-After of the limiter's own for it (given when it was
//!   first shed) plus the time the requests still ahead of it would take at the rate the queue
//!   was served while it waited, capped like every Retry-After.
//! - **Resources**: a waiting request holds its place among the gateway's in-flight requests
//!   (`--max-inflight`) and its body's share of `--max-body-memory`; a client that goes away
//!   leaves the queue at once (its handler is dropped).
//!
//! The time spent waiting is part of the TTFT the client sees
//! (`sluice_request_duration_seconds`), not of the engine's TTFT the limiter measures (which
//! starts when the request goes upstream).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{HistogramVec, IntGauge};
use tokio::sync::oneshot;

use super::admission::{Admitted, settle};
use super::error::GatewayError;
use crate::limiter::fleet::{Room, Routed};
use crate::limiter::{Clock, Priority};
use crate::policy::crd::DEFAULT_MAX_REQUESTS;
use crate::policy::source::{PolicyStore, Snapshot};

/// A waiter's place: its rank (0 first: [`rank`]) and its arrival.
type Place = (u8, u64);

/// How a wait ended without room.
#[derive(Debug)]
enum Left {
    /// At `maxWait`, with this many still ahead of it.
    Expired { ahead: usize },
    /// Pushed out of a full queue by a request of higher priority.
    Evicted,
}

struct Waiter {
    model: Box<str>,
    /// The label of the limiter key the model falls under.
    label: Box<str>,
    priority: Priority,
    room: Room,
    deadline: Duration,
    tx: oneshot::Sender<Result<(Arc<Snapshot>, Routed), Left>>,
}

/// The gateway's admission queue (one for all policies it serves; the policy in force gives
/// its limits).
pub struct AdmissionQueue {
    store: Arc<PolicyStore>,
    clock: Arc<dyn Clock>,
    waiters: Mutex<BTreeMap<Place, Waiter>>,
    next: AtomicU64,
    len: AtomicUsize,
    /// Of them, requests of tenants under their fair share.
    fair: AtomicUsize,
    /// Requests sent on from the queue, ever (for the rate in Retry-After).
    served: AtomicU64,
    depth: IntGauge,
    wait: HistogramVec,
}

impl std::fmt::Debug for AdmissionQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmissionQueue")
            .field("len", &self.len())
            .finish()
    }
}

/// `critical` (never waits), then `standard` requests of tenants under their fair share,
/// other `standard`, `sheddable`.
fn rank(p: Priority, fair: bool) -> u8 {
    match p {
        Priority::Critical => 0,
        Priority::Standard if fair => FAIR,
        Priority::Standard => 2,
        Priority::Sheddable => 3,
    }
}

/// The rank of a `standard` request of a tenant under its fair share.
const FAIR: u8 = 1;

/// The waiters of tenants under their fair share.
fn fair(waiters: &BTreeMap<Place, Waiter>) -> impl Iterator<Item = &Waiter> {
    waiters.range((FAIR, 0)..(FAIR + 1, 0)).map(|(_, w)| w)
}

impl AdmissionQueue {
    /// An empty queue for the policies of `store`, timed by `clock`, reporting its depth and
    /// waits in `depth` and `wait` (`outcome` label).
    pub fn new(
        store: Arc<PolicyStore>,
        clock: Arc<dyn Clock>,
        depth: IntGauge,
        wait: HistogramVec,
    ) -> Self {
        AdmissionQueue {
            store,
            clock,
            waiters: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
            len: AtomicUsize::new(0),
            fair: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            depth,
            wait,
        }
    }

    /// Requests waiting now.
    #[inline]
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a request of a tenant under its fair share waits for a slot of the limiter key
    /// `model` falls under in `snap` (models sharing a key share its slots): then no other
    /// `standard` or `sheddable` request takes one by chance
    /// ([`crate::limiter::fleet::Fleet::admit_for_sure`]).
    pub fn fair_waiting(&self, snap: &Snapshot, model: &str) -> bool {
        if self.fair.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let first = snap.fleet.limiter(0);
        let label = first.label(first.key(model));
        fair(&self.waiters.lock()).any(|w| &*w.label == label)
    }

    /// Records the queue's length (and how many of its waiters are fair), under its lock.
    fn set_len(&self, waiters: &BTreeMap<Place, Waiter>) {
        let n = waiters.len();
        self.fair.store(fair(waiters).count(), Ordering::Relaxed);
        self.len.store(n, Ordering::Relaxed);
        self.depth.set(n as i64);
    }

    /// A request of `priority` for `model`, which the limiter shed (`shed`) under `snap`,
    /// waits for room when the policy has a queue, or when it is `fair` (a `standard`
    /// request of a tenant under its fair share): admitted when room comes, or the error that
    /// answers it (`shed` itself without a queue, or when the queue is full; a `fair` one's
    /// caller sends it on anyway).
    pub async fn wait(
        self: &Arc<Self>,
        snap: &Snapshot,
        model: &str,
        (priority, fair): (Priority, bool),
        shed: GatewayError,
    ) -> Result<Admitted, GatewayError> {
        let GatewayError::Shed { retry_after, .. } = &shed else {
            return Err(shed);
        };
        let first = snap.fleet.limiter(0);
        let key = first.key(model);
        let (max_wait, max_requests, room) = match (snap.config.queue, fair) {
            (q, true) => {
                let ttft = first.thresholds(key).ttft;
                let n = q.map_or(DEFAULT_MAX_REQUESTS as usize, |q| q.max_requests);
                (Duration::from_secs_f64(ttft), n, Room::Slot)
            }
            (Some(q), false) => (q.max_wait, q.max_requests, Room::Sure),
            (None, false) => return Err(shed),
        };
        let retry_after = *retry_after;
        let start = self.clock.now();
        let (tx, rx) = oneshot::channel();
        let place = (
            rank(priority, fair),
            self.next.fetch_add(1, Ordering::Relaxed),
        );
        let evicted = {
            let mut waiters = self.waiters.lock();
            let evicted = if waiters.len() < max_requests {
                None
            } else if waiters.last_key_value().is_some_and(|(p, _)| p.0 > place.0) {
                waiters.pop_last().map(|(_, w)| w)
            } else {
                return Err(shed);
            };
            let waiter = Waiter {
                model: model.into(),
                label: first.label(key).into(),
                priority,
                room,
                deadline: start + max_wait,
                tx,
            };
            waiters.insert(place, waiter);
            self.set_len(&waiters);
            evicted
        };
        if let Some(w) = evicted {
            let _ = w.tx.send(Err(Left::Evicted));
        }
        let served_before = self.served.load(Ordering::Relaxed);
        let mut guard = Leave {
            queue: self,
            place,
            start,
            outcome: "cancelled",
        };
        // Room may have come between the shed and the insertion.
        self.dispatch();
        let mut rx = rx;
        let result = tokio::select! {
            r = &mut rx => r,
            () = tokio::time::sleep(max_wait) => {
                self.dispatch();
                rx.await
            }
        };
        let waited = self.clock.now().saturating_sub(start);
        let left = match result {
            Ok(Ok((snap, routed))) => {
                guard.outcome = "admitted";
                let asked = (model, priority);
                return settle(snap, routed, asked, &self.clock, self).map_err(|(_, e)| e);
            }
            Ok(Err(left)) => left,
            // (Every waiter taken out of the queue is answered; this is not expected.)
            Err(_) => Left::Evicted,
        };
        match left {
            Left::Evicted => {
                guard.outcome = "evicted";
                Err(shed)
            }
            Left::Expired { .. } if fair => {
                guard.outcome = "promoted";
                Err(shed)
            }
            Left::Expired { ahead } => {
                guard.outcome = "expired";
                let served = self.served.load(Ordering::Relaxed) - served_before;
                let per_request = waited.as_secs_f64() / served.max(1) as f64;
                let behind = Duration::from_secs_f64(per_request * ahead as f64);
                let cap = snap.config.limiter.shedding.retry_after_cap;
                Err(GatewayError::Expired {
                    model: model.to_owned(),
                    retry_after: (retry_after + behind).min(cap.max(retry_after)),
                    waited,
                })
            }
        }
    }

    /// Sends on every waiter that has room now, in order, and answers every one past its
    /// deadline; does nothing when none waits.
    pub fn dispatch(self: &Arc<Self>) {
        if self.is_empty() {
            return;
        }
        let snap = self.store.load();
        let now = self.clock.now();
        let mut done = Vec::new();
        {
            let mut waiters = self.waiters.lock();
            // Models with no room for the waiters seen so far (room for sure is stricter than
            // a free slot, and the waiters looking for a slot come first).
            let mut full: Vec<&str> = Vec::new();
            let mut ahead = 0;
            for (place, w) in waiters.iter() {
                if w.deadline <= now {
                    done.push((*place, Err(Left::Expired { ahead })));
                    continue;
                }
                let Some(snap) = snap.as_ref().filter(|s| !s.fleet.is_empty()) else {
                    ahead += 1;
                    continue;
                };
                if !full.contains(&&*w.model) {
                    if let Some(r) = snap.fleet.admit_queued(&w.model, w.priority, w.room, now) {
                        done.push((*place, Ok((snap.clone(), r))));
                        continue;
                    }
                    full.push(&w.model);
                }
                ahead += 1;
            }
            let sent = done.iter().filter(|d| d.1.is_ok()).count() as u64;
            self.served.fetch_add(sent, Ordering::Relaxed);
            let done: Vec<_> = (done.into_iter())
                .filter_map(|(place, r)| Some((waiters.remove(&place)?, r)))
                .collect();
            self.set_len(&waiters);
            drop(waiters);
            // Outside the lock: a request admitted here whose waiter has just gone away is
            // ended, and the queue tried again.
            let mut freed = false;
            for (w, r) in done {
                if let Err(Ok((snap, routed))) = w.tx.send(r) {
                    snap.fleet
                        .limiter(routed.endpoint)
                        .end_request(routed.key, now);
                    freed = true;
                }
            }
            if freed {
                self.dispatch();
            }
        }
    }
}

/// A waiter's leaving: takes it out of the queue if it is still there (its client went
/// away), and records its wait.
struct Leave<'a> {
    queue: &'a Arc<AdmissionQueue>,
    place: Place,
    start: Duration,
    outcome: &'static str,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let q = self.queue;
        {
            let mut waiters = q.waiters.lock();
            if waiters.remove(&self.place).is_some() {
                q.set_len(&waiters);
            }
        }
        let waited = q.clock.now().saturating_sub(self.start);
        (q.wait.with_label_values(&[self.outcome])).observe(waited.as_secs_f64());
    }
}
