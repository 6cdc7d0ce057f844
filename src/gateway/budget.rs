//! Tenants' budgets (`spec.tenants`): requests a minute per tenant, as a token bucket per
//! gateway pod, and OpenAI's rate-limit headers on every answer.
//!
//! - **Who**: a client authenticated by `clientAuth` is the tenant of its name; otherwise,
//!   where the policy trusts `tenants.header`, the header's value if `tenants.clients` lists
//!   it; everyone else is one tenant, [`ANONYMOUS`]. Names (and so metric labels and buckets)
//!   come only from the Secret and the policy, never from request text.
//! - **Budget**: `requestsPerMinute` of the tenant's entry, else of `tenants.default`; none
//!   set, no budget. Each of the `gateway.replicas` pods enforces an even share: a bucket of
//!   `rpm / replicas` requests, refilled continuously at that many a minute (so a burst of the
//!   whole share is allowed after a quiet minute). Approximate while pods come and go.
//! - **Counting**: a request takes one from its tenant's bucket when the gateway accepts it
//!   (before its body is read) and gives it back if the limiter sheds it: load shedding does
//!   not spend a client's budget.
//! - **Over budget**: 429 with `type: requests`, `code: rate_limit_exceeded` (load shedding's
//!   type is `rate_limit_exceeded`: the two can be told apart), and `Retry-After` /
//!   `retry-after-ms` for one request to refill.
//! - **Headers**: every answer to a tenant with a budget carries `x-ratelimit-limit-requests`
//!   (this pod's share), `x-ratelimit-remaining-requests` and `x-ratelimit-reset-requests`
//!   (until the bucket is full again, as OpenAI writes it: `6m0s`, `1.5s`, `20ms`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use parking_lot::Mutex;

use super::error::GatewayError;
use crate::policy::config::TenantsConfig;

/// The tenant of requests from no known client.
pub const ANONYMOUS: &str = "anonymous";

/// The tenant of a request: its authenticated client's name, else the trusted header's value
/// when the policy lists it, else [`ANONYMOUS`].
pub fn tenant(config: &TenantsConfig, client: Option<Arc<str>>, headers: &HeaderMap) -> Arc<str> {
    if let Some(name) = client {
        return name;
    }
    let named = (config.header.as_ref())
        .and_then(|h| headers.get(h)?.to_str().ok())
        .filter(|v| config.clients.contains_key(*v));
    named.map_or_else(|| ANONYMOUS.into(), Into::into)
}

/// What a tenant has left on this pod, for the headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    /// This pod's share of the requests a minute.
    pub limit: u32,
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset: Duration,
}

impl Quota {
    /// Adds OpenAI's `x-ratelimit-*-requests` headers.
    pub fn insert(&self, h: &mut HeaderMap) {
        h.insert("x-ratelimit-limit-requests", HeaderValue::from(self.limit));
        h.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from(self.remaining),
        );
        let reset = HeaderValue::from_str(&openai_duration(self.reset)).expect("ASCII");
        h.insert("x-ratelimit-reset-requests", reset);
    }
}

/// A duration as OpenAI's rate-limit headers write it: `20ms`, `1.5s`, `6m0s`.
pub fn openai_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (m, s) = (ms / 60_000, (ms % 60_000) as f64 / 1000.0);
    match m {
        0 => format!("{s}s"),
        m => format!("{m}m{s}s"),
    }
}

#[derive(Debug)]
struct Bucket {
    /// Requests left (fractional while refilling).
    tokens: f64,
    /// When `tokens` was counted, seconds.
    at: f64,
}

/// The buckets of the tenants seen, one lock for all (a few names, a few instructions each).
#[derive(Debug, Default)]
pub struct Budgets {
    buckets: Mutex<HashMap<Arc<str>, Bucket>>,
}

/// A bucket's shape on this pod: `rpm` a minute shared by `replicas` pods.
#[derive(Debug, Clone, Copy)]
struct Shape {
    /// Requests it holds when full (at least 1 unless the budget is 0).
    capacity: f64,
    /// Requests it gains a second.
    per_second: f64,
}

impl Shape {
    fn new(rpm: u32, replicas: u32) -> Self {
        let share = f64::from(rpm) / f64::from(replicas.max(1));
        Shape {
            capacity: share.max(f64::from(u8::from(rpm > 0))),
            per_second: share / 60.0,
        }
    }

    /// How long until `n` more requests have refilled (a minute for a budget of 0).
    fn refill(&self, n: f64) -> Duration {
        match self.per_second {
            r if r > 0.0 => Duration::from_secs_f64((n.max(0.0) / r).min(3600.0)),
            _ => Duration::from_secs(60),
        }
    }

    /// The quota of a bucket holding `tokens`.
    fn quota(&self, tokens: f64) -> Quota {
        Quota {
            limit: self.capacity.floor() as u32,
            remaining: tokens.floor() as u32,
            reset: self.refill(self.capacity - tokens),
        }
    }
}

impl Budgets {
    /// Takes one request from `tenant`'s bucket of `rpm` a minute shared by `replicas` pods at
    /// `now`: what is left, or, when nothing is, the quota and the wait for one request.
    pub fn take(
        &self,
        tenant: &Arc<str>,
        rpm: u32,
        replicas: u32,
        now: Duration,
    ) -> Result<Quota, (Quota, Duration)> {
        let shape = Shape::new(rpm, replicas);
        let now = now.as_secs_f64();
        let mut buckets = self.buckets.lock();
        let b = buckets.entry(tenant.clone()).or_insert(Bucket {
            tokens: shape.capacity,
            at: now,
        });
        b.tokens = (b.tokens + (now - b.at).max(0.0) * shape.per_second).min(shape.capacity);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(shape.quota(b.tokens))
        } else {
            Err((shape.quota(b.tokens), shape.refill(1.0 - b.tokens)))
        }
    }

    /// Gives back the request `tenant` took (its request was shed, not served); what it has
    /// left then.
    pub fn refund(&self, tenant: &str, rpm: u32, replicas: u32) -> Option<Quota> {
        let shape = Shape::new(rpm, replicas);
        let mut buckets = self.buckets.lock();
        let b = buckets.get_mut(tenant)?;
        b.tokens = (b.tokens + 1.0).min(shape.capacity);
        Some(shape.quota(b.tokens))
    }
}

/// One request taken from a tenant's budget: whose, and what is left.
#[derive(Debug)]
pub struct Charge {
    tenant: Arc<str>,
    rpm: u32,
    replicas: u32,
    quota: Mutex<Quota>,
}

impl Charge {
    /// Gives the request back (it was shed: load shedding spends no budget).
    pub fn refund(&self, budgets: &Budgets) {
        if let Some(q) = budgets.refund(&self.tenant, self.rpm, self.replicas) {
            *self.quota.lock() = q;
        }
    }

    /// What the tenant has left, as of the charge (or the refund).
    pub fn quota(&self) -> Quota {
        *self.quota.lock()
    }
}

/// Takes a request of `client` (authenticated, if it was) from its tenant's budget at `now`:
/// None where the policy sets no budget for it; the 429 and the tenant's quota when it has
/// none left.
pub fn charge(
    budgets: &Budgets,
    config: Option<&TenantsConfig>,
    client: Option<Arc<str>>,
    headers: &HeaderMap,
    now: Duration,
) -> Result<Option<Charge>, (GatewayError, Quota)> {
    let Some(config) = config else {
        return Ok(None);
    };
    let tenant = tenant(config, client, headers);
    let Some(rpm) = config.budget(&tenant).requests_per_minute else {
        return Ok(None);
    };
    let replicas = config.replicas;
    match budgets.take(&tenant, rpm, replicas, now) {
        Ok(quota) => Ok(Some(Charge {
            tenant,
            rpm,
            replicas,
            quota: Mutex::new(quota),
        })),
        Err((quota, retry_after)) => Err((
            GatewayError::OverBudget {
                tenant: tenant.to_string(),
                limit: quota.limit,
                retry_after,
            },
            quota,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn a_bucket_holds_its_share_refills_by_the_second_and_says_when() {
        let b = Budgets::default();
        let t: Arc<str> = "team-a".into();
        // 120 a minute over two pods: 60 here, one a second.
        for i in 0..60 {
            let q = b.take(&t, 120, 2, SEC * 100).unwrap();
            assert_eq!((q.limit, q.remaining), (60, 59 - i));
        }
        let (q, wait) = b.take(&t, 120, 2, SEC * 100).unwrap_err();
        assert_eq!((q.remaining, wait), (0, SEC));
        assert_eq!(q.reset, SEC * 60, "full again in a minute");
        // Half a second later: still none, half a second to wait.
        let (_, wait) = b.take(&t, 120, 2, SEC * 100 + SEC / 2).unwrap_err();
        assert_eq!(wait, SEC / 2);
        let q = b.take(&t, 120, 2, SEC * 101).unwrap();
        assert_eq!(q.remaining, 0);
        // A shed request's one comes back.
        b.refund("team-a", 120, 2);
        assert_eq!(b.take(&t, 120, 2, SEC * 101).unwrap().remaining, 0);
        // Other tenants have their own.
        let other: Arc<str> = "team-b".into();
        assert_eq!(b.take(&other, 120, 2, SEC * 101).unwrap().remaining, 59);
    }

    #[test]
    fn a_budget_of_zero_refuses_everything_and_a_tiny_one_still_lets_one_through() {
        let b = Budgets::default();
        let t: Arc<str> = "none".into();
        let (q, wait) = b.take(&t, 0, 1, SEC).unwrap_err();
        assert_eq!((q.limit, q.remaining, wait), (0, 0, SEC * 60));
        // 1 a minute over 4 pods: one request, then one every 4 minutes.
        let t: Arc<str> = "tiny".into();
        assert!(b.take(&t, 1, 4, SEC).is_ok());
        let (_, wait) = b.take(&t, 1, 4, SEC).unwrap_err();
        assert_eq!(wait, SEC * 240);
    }

    #[test]
    fn durations_are_written_as_openai_writes_them() {
        assert_eq!(openai_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(openai_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(openai_duration(SEC), "1s");
        assert_eq!(openai_duration(SEC * 360), "6m0s");
        assert_eq!(openai_duration(Duration::from_millis(61_250)), "1m1.25s");
    }

    #[test]
    fn the_tenant_is_the_client_else_a_listed_trusted_header_else_anonymous() {
        let mut config = TenantsConfig {
            header: Some(http::HeaderName::from_static("x-tenant")),
            ..TenantsConfig::default()
        };
        config.clients.insert("batch".into(), Default::default());
        let mut h = HeaderMap::new();
        assert_eq!(&*tenant(&config, None, &h), ANONYMOUS);
        h.insert("x-tenant", "batch".parse().unwrap());
        assert_eq!(&*tenant(&config, None, &h), "batch");
        assert_eq!(
            &*tenant(&config, Some("web".into()), &h),
            "web",
            "the key wins"
        );
        h.insert("x-tenant", "made-up-1234".parse().unwrap());
        assert_eq!(&*tenant(&config, None, &h), ANONYMOUS, "not listed");
        config.header = None;
        h.insert("x-tenant", "batch".parse().unwrap());
        assert_eq!(&*tenant(&config, None, &h), ANONYMOUS, "not trusted");
    }
}
