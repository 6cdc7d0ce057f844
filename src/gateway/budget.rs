//! Tenants' budgets (`spec.tenants`): requests and tokens a minute per tenant, counted in a
//! sliding window per gateway pod ([`window`]), and OpenAI's rate-limit headers on every
//! answer.
//!
//! - **Who**: a client authenticated by `clientAuth` is the tenant of its name; otherwise,
//!   where the policy trusts `tenants.header`, the header's value if `tenants.clients` lists
//!   it; everyone else is one tenant, [`ANONYMOUS`]. Names (and so metric labels and budgets)
//!   come only from the Secret and the policy, never from request text.
//! - **Budget**: `requestsPerMinute` and `tokensPerMinute` of the tenant's entry, else of
//!   `tenants.default`; none set, no budget. Each of the `gateway.replicas` pods enforces an
//!   even share (at least one a minute): a request fits while what the tenant used in the last
//!   60 s (this minute's count plus the previous minute's, weighted by its overlap) leaves
//!   room for it. A whole share may come at once; over any stretch of minutes a client gets
//!   its share a minute, within a few percent (a token bucket of a minute's capacity would
//!   let a whole extra minute through). Approximate while pods come and go.
//! - **Counting**: a request takes one from its tenant's request budget when the gateway
//!   accepts it (before its body is read) and gives it back if the limiter sheds it: load
//!   shedding does not spend a client's budget. Tokens: see [`Charge::reserve_tokens`] and
//!   [`super::tenancy`].
//! - **Over budget**: 429 with `type: requests` (or `tokens`), `code: rate_limit_exceeded`
//!   (load shedding's type is `rate_limit_exceeded`: the two can be told apart), and
//!   `Retry-After` / `retry-after-ms` for when the request fits.
//! - **Headers**: every answer to a tenant with a budget carries
//!   `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`: this pod's share, what is left
//!   of it, and until nothing counts any more, as OpenAI writes it (`6m0s`, `1.5s`, `20ms`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use parking_lot::Mutex;

use super::error::GatewayError;
use crate::policy::config::{Budget, TenantsConfig};

pub mod window;
use window::Window;

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
    /// This pod's share of the budget a minute.
    pub limit: u64,
    pub remaining: u64,
    /// Until nothing used counts against it any more.
    pub reset: Duration,
}

impl Quota {
    /// Adds OpenAI's `x-ratelimit-{limit,remaining,reset}-{unit}` headers (`unit`:
    /// `requests` or `tokens`).
    pub fn insert(&self, h: &mut HeaderMap, unit: &str) {
        let name = |what: &str| {
            http::HeaderName::try_from(format!("x-ratelimit-{what}-{unit}")).expect("a header name")
        };
        h.insert(name("limit"), HeaderValue::from(self.limit));
        h.insert(name("remaining"), HeaderValue::from(self.remaining));
        let reset = HeaderValue::from_str(&openai_duration(self.reset)).expect("ASCII");
        h.insert(name("reset"), reset);
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

/// The windows of the tenants seen, one lock for all (a few names, a few instructions each).
#[derive(Debug, Default)]
pub struct Budgets {
    windows: Mutex<Windows>,
}

#[derive(Debug, Default)]
struct Windows {
    requests: HashMap<Arc<str>, Window>,
    tokens: HashMap<Arc<str>, Window>,
}

/// Which of a tenant's budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Requests,
    Tokens,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Requests => "requests",
            Unit::Tokens => "tokens",
        }
    }
}

impl Windows {
    fn of(&mut self, unit: Unit) -> &mut HashMap<Arc<str>, Window> {
        match unit {
            Unit::Requests => &mut self.requests,
            Unit::Tokens => &mut self.tokens,
        }
    }
}

/// This pod's share of `per_minute` shared by `replicas` pods: at least 1 unless the budget
/// is 0 (a share under one request a minute still lets one through each minute).
fn share(per_minute: u64, replicas: u32) -> f64 {
    let share = per_minute as f64 / f64::from(replicas.max(1));
    share.max(f64::from(u8::from(per_minute > 0)))
}

/// The quota of a window at `now`, under `limit`.
fn quota(w: &Window, limit: f64, now: f64) -> Quota {
    Quota {
        limit: limit.floor() as u64,
        remaining: (limit - w.used(now)).clamp(0.0, limit).floor() as u64,
        reset: secs(w.reset(now)),
    }
}

/// Seconds as a Duration, at most an hour.
fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, 3600.0))
}

impl Budgets {
    /// Takes one request from `tenant`'s budget of `rpm` a minute shared by `replicas` pods at
    /// `now`: what is left, or, when nothing is, the quota and the wait for one request.
    pub fn take(
        &self,
        tenant: &Arc<str>,
        rpm: u32,
        replicas: u32,
        now: Duration,
    ) -> Result<Quota, (Quota, Duration)> {
        self.take_n(Unit::Requests, tenant, u64::from(rpm), replicas, 1.0, now)
    }

    /// Takes `n` of `unit` from `tenant`'s budget of `per_minute` shared by `replicas` pods at
    /// `now`, when they fit under it in the last 60 s; else the quota and the wait until they
    /// do (a minute for a budget of 0).
    pub fn take_n(
        &self,
        unit: Unit,
        tenant: &Arc<str>,
        per_minute: u64,
        replicas: u32,
        n: f64,
        now: Duration,
    ) -> Result<Quota, (Quota, Duration)> {
        let limit = share(per_minute, replicas);
        let now = now.as_secs_f64();
        let mut windows = self.windows.lock();
        let w = (windows.of(unit).entry(tenant.clone())).or_insert_with(|| Window::new(now));
        w.roll(now);
        match w.wait(limit, n, now) {
            0.0 if n <= limit => {
                w.add(n, limit);
                Ok(quota(w, limit, now))
            }
            wait if wait.is_finite() => Err((quota(w, limit, now), secs(wait))),
            _ => Err((quota(w, limit, now), Duration::from_secs(60))),
        }
    }

    /// Gives `n` of `unit` back to `tenant` (a negative `n` takes more: a request that used
    /// more tokens than it was admitted for, owed into the coming minute); what it has left
    /// then.
    pub fn give(
        &self,
        unit: Unit,
        tenant: &str,
        per_minute: u64,
        replicas: u32,
        n: f64,
        now: Duration,
    ) -> Option<Quota> {
        let limit = share(per_minute, replicas);
        let now = now.as_secs_f64();
        let mut windows = self.windows.lock();
        let w = windows.of(unit).get_mut(tenant)?;
        w.roll(now);
        w.add(-n, limit);
        Some(quota(w, limit, now))
    }

    /// What each tenant seen has left of each budget at `now` under `config`, None where
    /// `config` sets that budget no more. Read at every scrape: a budget that refilled while
    /// its tenant was idle shows full.
    pub fn remaining(
        &self,
        config: Option<&TenantsConfig>,
        now: Duration,
    ) -> Vec<(Arc<str>, Unit, Option<u64>)> {
        let now = now.as_secs_f64();
        let windows = self.windows.lock();
        let units = [
            (Unit::Requests, &windows.requests),
            (Unit::Tokens, &windows.tokens),
        ];
        let mut out = Vec::with_capacity(windows.requests.len() + windows.tokens.len());
        for (unit, map) in units {
            for (tenant, w) in map {
                let per_minute = config.and_then(|c| {
                    let b = c.budget(tenant);
                    let per_minute = match unit {
                        Unit::Requests => b.requests_per_minute.map(u64::from),
                        Unit::Tokens => b.tokens_per_minute,
                    };
                    Some(share(per_minute?, c.replicas))
                });
                let left = per_minute.map(|limit| {
                    // Read as of now, without moving the tenant's window (a request does).
                    let mut w = w.clone();
                    w.roll(now);
                    quota(&w, limit, now).remaining
                });
                out.push((tenant.clone(), unit, left));
            }
        }
        out
    }

    /// Gives back the request `tenant` took (its request was shed, not served); what it has
    /// left then.
    pub fn refund(&self, tenant: &str, rpm: u32, replicas: u32, now: Duration) -> Option<Quota> {
        self.give(Unit::Requests, tenant, u64::from(rpm), replicas, 1.0, now)
    }
}

/// What was taken from a tenant's budgets for one request, and what is left.
#[derive(Debug)]
pub struct Charge {
    pub tenant: Arc<str>,
    budget: Budget,
    replicas: u32,
    state: Mutex<ChargeState>,
}

#[derive(Debug, Default)]
struct ChargeState {
    requests: Option<Quota>,
    /// The tokens held for the request, and what the tenant has left.
    tokens: Option<(u64, Quota)>,
}

impl Charge {
    /// Gives the request and its tokens back (it was shed: load shedding spends no budget).
    pub fn refund(&self, budgets: &Budgets, now: Duration) {
        let mut st = self.state.lock();
        if let (Some(rpm), Some(_)) = (self.budget.requests_per_minute, st.requests)
            && let Some(q) = budgets.refund(&self.tenant, rpm, self.replicas, now)
        {
            st.requests = Some(q);
        }
        self.settle_locked(&mut st, budgets, 0, now);
    }

    /// Holds `n` estimated tokens of the request against the tenant's token budget, when it
    /// has one: the 429 when they are not there, or never could be.
    pub fn reserve_tokens(
        &self,
        budgets: &Budgets,
        n: u64,
        now: Duration,
    ) -> Result<(), GatewayError> {
        let Some(tpm) = self.budget.tokens_per_minute else {
            return Ok(());
        };
        let limit = share(tpm, self.replicas);
        let tenant = self.tenant.to_string();
        if n as f64 > limit {
            let limit = limit.floor() as u64;
            return Err(GatewayError::TooLargeForBudget {
                tenant,
                limit,
                requested: n,
            });
        }
        let taken = budgets.take_n(
            Unit::Tokens,
            &self.tenant,
            tpm,
            self.replicas,
            n as f64,
            now,
        );
        match taken {
            Ok(q) => {
                self.state.lock().tokens = Some((n, q));
                Ok(())
            }
            Err((q, retry_after)) => {
                self.state.lock().tokens = Some((0, q));
                Err(GatewayError::OverBudget {
                    tenant,
                    unit: Unit::Tokens.as_str(),
                    limit: q.limit,
                    retry_after,
                })
            }
        }
    }

    /// Settles the tokens held to the `used` ones (0 for a request shed or refused).
    pub fn settle_tokens(&self, budgets: &Budgets, used: u64, now: Duration) {
        self.settle_locked(&mut self.state.lock(), budgets, used, now);
    }

    fn settle_locked(&self, st: &mut ChargeState, budgets: &Budgets, used: u64, now: Duration) {
        let (Some(tpm), Some((held, _))) = (self.budget.tokens_per_minute, st.tokens) else {
            return;
        };
        let back = held as f64 - used as f64;
        if let Some(q) = budgets.give(Unit::Tokens, &self.tenant, tpm, self.replicas, back, now) {
            st.tokens = Some((used, q));
        }
    }

    /// Adds the `x-ratelimit-*` headers of the tenant's budgets, as of the last change.
    pub fn insert_headers(&self, h: &mut HeaderMap) {
        let st = self.state.lock();
        if let Some(q) = st.requests {
            q.insert(h, Unit::Requests.as_str());
        }
        if let Some((_, q)) = st.tokens {
            q.insert(h, Unit::Tokens.as_str());
        }
    }
}

/// Takes a request of `tenant` from its budgets at `now`: None where the policy sets it no
/// budget; the 429 and the tenant's quota when it has no request left.
pub fn charge(
    budgets: &Budgets,
    config: &TenantsConfig,
    tenant: Arc<str>,
    now: Duration,
) -> Result<Option<Charge>, (GatewayError, Quota)> {
    let budget = config.budget(&tenant);
    if budget.requests_per_minute.is_none() && budget.tokens_per_minute.is_none() {
        return Ok(None);
    }
    let replicas = config.replicas;
    let mut state = ChargeState::default();
    if let Some(rpm) = budget.requests_per_minute {
        match budgets.take(&tenant, rpm, replicas, now) {
            Ok(quota) => state.requests = Some(quota),
            Err((quota, retry_after)) => {
                let e = GatewayError::OverBudget {
                    tenant: tenant.to_string(),
                    unit: Unit::Requests.as_str(),
                    limit: quota.limit,
                    retry_after,
                };
                return Err((e, quota));
            }
        }
    }
    Ok(Some(Charge {
        tenant,
        budget,
        replicas,
        state: Mutex::new(state),
    }))
}

#[cfg(test)]
mod tests;
