//! Leader election on a `coordination.k8s.io/v1` Lease, so two operator replicas can run and
//! only one reconciles.
//!
//! The rules (after client-go's leaderelection, with every deadline enforced):
//! - **Expiry on the observer's own clock.** A candidate remembers the lease record it last
//!   saw and *when, on its own monotonic clock,* that record last changed. It may take the
//!   lease only when the record has not changed for a whole `leaseDurationSeconds` of its own
//!   time (or has no holder). The holder's timestamps are never compared with the local wall
//!   clock, so clock skew between machines cannot shorten a lease.
//! - **Renew deadline shorter than the lease.** The leader renews every `retry` and stops
//!   leading when it has not renewed successfully for `renew_deadline` (2/3 of the lease) —
//!   before any other candidate can see the lease expire, which takes a full lease duration
//!   after the last renewal it observed.
//! - **Every API call has a timeout** (`retry`, and never past the renew deadline): a
//!   partitioned leader whose calls hang still gives up in time.
//! - **Release on shutdown.** A leader that stops cleanly clears the holder, so a standby takes
//!   over at once instead of after a lease duration.
//!
//! Updates carry the `resourceVersion` they read, so two candidates racing for an expired
//! lease cannot both win (the loser gets 409 Conflict).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use parking_lot::Mutex;

use crate::clock::Clock;

/// The record a candidate compares between reads: any change means the holder is alive.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<Timestamp>,
    transitions: Option<i32>,
    duration_secs: i32,
}

impl Record {
    fn of(spec: &LeaseSpec) -> Self {
        Record {
            holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
            renew_time: spec.renew_time.as_ref().map(|t| t.0),
            transitions: spec.lease_transitions,
            duration_secs: spec.lease_duration_seconds.unwrap_or(15).max(1),
        }
    }
}

/// What a candidate has observed of the lease, on its own clock.
#[derive(Debug, Default)]
pub struct Observer {
    last: Option<(Record, Duration)>,
}

/// What an observation allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// Held by someone that renewed within the lease duration (as seen here).
    Held,
    /// No holder, or not renewed for a whole lease duration of local time: may be taken.
    Free,
}

impl Observer {
    /// Records a read of the lease at local time `now` and says whether it may be taken.
    fn observe(&mut self, record: Record, now: Duration) -> Observation {
        let changed_at = match &self.last {
            Some((seen, at)) if *seen == record => *at,
            _ => now,
        };
        let free = record.holder.is_none()
            || now.saturating_sub(changed_at) >= Duration::from_secs(record.duration_secs as u64);
        self.last = Some((record, changed_at));
        if free {
            Observation::Free
        } else {
            Observation::Held
        }
    }

    /// Takes a record this candidate just wrote as seen now.
    fn wrote(&mut self, record: Record, now: Duration) {
        self.last = Some((record, now));
    }
}

/// Timing of an election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub lease_duration: Duration,
    /// The leader stops leading when it could not renew for this long (< lease duration).
    pub renew_deadline: Duration,
    /// Between attempts; also the timeout of each API call.
    pub retry: Duration,
}

impl Timing {
    /// client-go's proportions: renew deadline 2/3 of the lease, retry 1/5 of it.
    pub fn for_lease(lease_duration: Duration) -> Self {
        Timing {
            lease_duration,
            renew_deadline: lease_duration * 2 / 3,
            retry: lease_duration / 5,
        }
    }
}

/// One candidate for leadership.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    clock: Arc<dyn Clock>,
    observer: Mutex<Observer>,
}

/// Whether this candidate holds the lease after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Leading,
    Standby,
}

/// Why an attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    #[error("{0}")]
    Api(#[from] kube::Error),
    #[error("the API server did not answer within {0:?}")]
    Timeout(Duration),
}

impl LeaderElector {
    pub fn new(
        api: Api<Lease>,
        name: &str,
        identity: &str,
        timing: Timing,
        clock: Arc<dyn Clock>,
    ) -> Self {
        LeaderElector {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            timing,
            clock,
            observer: Mutex::new(Observer::default()),
        }
    }

    fn spec(&self, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let now = Timestamp::now();
        let taking_over =
            previous.and_then(|p| p.holder_identity.as_deref()) != Some(&self.identity);
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timing.lease_duration.as_secs().max(1) as i32),
            acquire_time: if taking_over {
                Some(MicroTime(now))
            } else {
                previous.and_then(|p| p.acquire_time.clone())
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if taking_over && previous.is_some() {
                transitions + 1
            } else {
                transitions
            }),
            ..LeaseSpec::default()
        }
    }

    /// An API call bounded by `limit`.
    async fn call<T>(
        &self,
        limit: Duration,
        f: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, ElectionError> {
        match tokio::time::timeout(limit, f).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(ElectionError::Timeout(limit)),
        }
    }

    /// One attempt to acquire or renew the lease; every call takes at most `limit`.
    async fn attempt(&self, limit: Duration) -> Result<Attempt, ElectionError> {
        let existing = self.call(limit, self.api.get_opt(&self.name)).await?;
        let now = self.clock.now();
        let Some(lease) = existing else {
            let spec = self.spec(None);
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec.clone()),
            };
            return match self
                .call(limit, self.api.create(&PostParams::default(), &lease))
                .await
            {
                Ok(_) => {
                    self.observer.lock().wrote(Record::of(&spec), now);
                    Ok(Attempt::Leading)
                }
                Err(ElectionError::Api(kube::Error::Api(s))) if s.code == 409 => {
                    Ok(Attempt::Standby)
                }
                Err(e) => Err(e),
            };
        };
        let current = lease.spec.clone().unwrap_or_default();
        let mine = current.holder_identity.as_deref() == Some(&self.identity);
        let seen = self.observer.lock().observe(Record::of(&current), now);
        if !mine && seen == Observation::Held {
            return Ok(Attempt::Standby);
        }
        let spec = self.spec(Some(&current));
        let updated = Lease {
            metadata: lease.metadata.clone(),
            spec: Some(spec.clone()),
        };
        match self
            .call(
                limit,
                self.api
                    .replace(&self.name, &PostParams::default(), &updated),
            )
            .await
        {
            Ok(_) => {
                self.observer.lock().wrote(Record::of(&spec), now);
                Ok(Attempt::Leading)
            }
            Err(ElectionError::Api(kube::Error::Api(s))) if s.code == 409 => Ok(Attempt::Standby),
            Err(e) => Err(e),
        }
    }

    /// One attempt with the usual call timeout.
    pub async fn try_acquire_or_renew(&self) -> Result<Attempt, ElectionError> {
        self.attempt(self.timing.retry).await
    }

    /// Waits until this candidate leads.
    pub async fn acquire(&self) {
        let mut logged = false;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Leading) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became the leader");
                    return;
                }
                Ok(Attempt::Standby) => {
                    if !logged {
                        tracing::info!(lease = %self.name, "another replica leads; standing by");
                        logged = true;
                    }
                }
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "leader election attempt failed")
                }
            }
            tokio::time::sleep(self.timing.retry).await;
        }
    }

    /// Renews the lease until it cannot for `renew_deadline` (or another holder took it);
    /// then returns, and the caller must stop acting as the leader at once. Call right after
    /// [`LeaderElector::acquire`].
    pub async fn hold(&self) {
        let mut renewed = self.clock.now();
        loop {
            tokio::time::sleep(self.timing.retry).await;
            let started = self.clock.now();
            let left = self
                .timing
                .renew_deadline
                .saturating_sub(started.saturating_sub(renewed));
            if left.is_zero() {
                tracing::error!(lease = %self.name, deadline = ?self.timing.renew_deadline, "lease not renewed within the renew deadline; giving up leadership");
                return;
            }
            match self.attempt(left.min(self.timing.retry)).await {
                Ok(Attempt::Leading) => renewed = started,
                Ok(Attempt::Standby) => {
                    tracing::error!(lease = %self.name, "lost the lease to another replica");
                    return;
                }
                Err(e) => tracing::warn!(lease = %self.name, error = %e, "cannot renew the lease"),
            }
        }
    }

    /// Clears the holder if this candidate holds the lease, so a standby takes over at once.
    pub async fn release(&self) {
        let limit = self.timing.retry;
        let Ok(Some(lease)) = self.call(limit, self.api.get_opt(&self.name)).await else {
            return;
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return;
        }
        let released = Lease {
            metadata: lease.metadata.clone(),
            spec: Some(LeaseSpec {
                holder_identity: None,
                lease_duration_seconds: Some(1),
                renew_time: Some(MicroTime(Timestamp::now())),
                ..spec
            }),
        };
        match self
            .call(
                limit,
                self.api
                    .replace(&self.name, &PostParams::default(), &released),
            )
            .await
        {
            Ok(_) => tracing::info!(lease = %self.name, "released the lease"),
            Err(e) => tracing::warn!(lease = %self.name, error = %e, "cannot release the lease"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn record(holder: &str, renewed_secs: i64) -> Record {
        Record {
            holder: Some(holder.to_owned()).filter(|h| !h.is_empty()),
            renew_time: Some(Timestamp::from_second(renewed_secs).unwrap()),
            transitions: Some(0),
            duration_secs: 10,
        }
    }

    #[test]
    fn a_lease_is_free_only_after_a_whole_duration_of_local_time_without_change() {
        let mut o = Observer::default();
        // The holder's clock is an hour behind ours: its renew time looks long expired, but
        // only what this observer saw, and when, counts.
        let skewed = record("a", 0);
        assert_eq!(o.observe(skewed.clone(), 100 * S), Observation::Held);
        assert_eq!(o.observe(skewed.clone(), 109 * S), Observation::Held);
        assert_eq!(o.observe(skewed.clone(), 110 * S), Observation::Free);
        // An hour ahead: a renewal at any timestamp restarts the wait.
        let mut o = Observer::default();
        assert_eq!(o.observe(record("a", 7200), 100 * S), Observation::Held);
        assert_eq!(o.observe(record("a", 7201), 109 * S), Observation::Held);
        assert_eq!(o.observe(record("a", 7201), 118 * S), Observation::Held);
        assert_eq!(o.observe(record("a", 7201), 119 * S), Observation::Free);
    }

    #[test]
    fn a_released_or_holderless_lease_is_free_at_once() {
        let mut o = Observer::default();
        assert_eq!(o.observe(record("", 0), 5 * S), Observation::Free);
        assert_eq!(o.observe(record("a", 1), 6 * S), Observation::Held);
        assert_eq!(o.observe(record("", 2), 7 * S), Observation::Free);
    }

    #[test]
    fn the_leader_gives_up_before_anyone_may_take_over() {
        let t = Timing::for_lease(Duration::from_secs(15));
        assert_eq!(t.renew_deadline, Duration::from_secs(10));
        assert_eq!(t.retry, Duration::from_secs(3));
        assert!(t.renew_deadline + t.retry <= t.lease_duration);
    }
}
