//! Fair shedding among tenants: when the latency gate must shed part of a model's traffic, it
//! takes it from the tenants using more than their fair share.
//!
//! - **Use** is what costs the engine: tokens, prompt plus output, as a moving rate (tokens a
//!   second, time constant [`WINDOW`]). A request counts at arrival with its estimate (prompt
//!   bytes / 4, plus the tenant's mean output so far, at most the request's `max_tokens`;
//!   `max_tokens` or [`DEFAULT_OUTPUT`] before any is known), whether it is then admitted or
//!   shed: the rate is what a tenant *offers*. When a served request ends,
//!   the difference between its estimate and the tokens it really used (the usage the gateway
//!   read, else the content events it relayed) is settled into the same rate, as if counted
//!   at its true cost when it arrived (the correction decays with the time since).
//! - **Fair shares** are max-min fair among the tenants active on the model, weighted
//!   (`spec.tenants.clients.<name>.weight`, default 1), over the token rate the gate admits
//!   now: the share per unit of weight `α` solves `Σ min(useᵢ, wᵢ·α) = admitted`. A tenant
//!   using less than its share leaves the rest to the others. While every tenant fits (nothing
//!   is being shed), `α` is infinite and no one is over.
//! - **The rule**: a `standard` request of a tenant at or under its share, while another is
//!   over its own, is not shed: when the gate would shed it, it waits for the next free slot
//!   ahead of every other `standard` request, at most the model's TTFT threshold, and then
//!   goes as `critical` would ([`super::queue`]); meanwhile no other request of the model
//!   takes a slot by the gate's draw. It does not pass the concurrency ceiling at once, which
//!   would put it in the engine's queue exactly when that is longest. The tenants
//!   over their share take the gate's decision as before, so the gate's feedback on latency
//!   acts on them alone. Since the tenants under their share use at most the admitted rate
//!   between them, this cannot admit more than the gate does. `critical` is never shed; `sheddable` requests take the gate's decision
//!   whatever the tenant (priorities rank first).
//! - **Cost**: one lock per decision (this book's), and a second for a request shed; `α` is
//!   recomputed from all of a model's tenants at most every [`RECOMPUTE`] (a sort), otherwise
//!   a decision updates its tenant's rate and compares it with the cached `α`. Tenants idle
//!   for 6 windows are forgotten.
//!
//! Fairness only runs where there can be more than one tenant: with `clientAuth` or a trusted
//! tenant header. Tenant names come from the Secret and the policy (see [`super::budget`]).
//!
//! (A tenant just over its share is shed at the gate's rate, which can leave it below its share
//! for a while; the gate's rate is the one that keeps the latency in bounds, and a fairer split
//! among the tenants over their shares would need the gate to admit by tenant.)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::limiter::Priority;

/// The time constant of the use rates, seconds.
pub const WINDOW: f64 = 10.0;
/// How often a model's fair share is recomputed at most, seconds.
pub const RECOMPUTE: f64 = 0.1;
/// The share of the offered use that may go unadmitted with everyone still counted as within
/// their share (rounding, and estimates not yet settled).
const FITS: f64 = 0.01;
/// The output a request is expected to use when it sets no `max_tokens`.
pub const DEFAULT_OUTPUT: u64 = 256;
/// Most output tokens a request's estimate counts for fairness (a client's `max_tokens` of
/// 10⁹ must not swamp the admitted rate until it is settled).
pub const MAX_OUTPUT_ESTIMATE: u64 = 32_768;

/// The weight of a served request's output in its tenant's mean output.
const OUTPUT_MEAN_WEIGHT: f64 = 0.2;
/// A request's estimated use at arrival: `prompt_bytes / 4` (about four bytes a token of
/// English; JSON framing included) plus `max_output`, or [`DEFAULT_OUTPUT`] without one.
pub fn estimate(prompt_bytes: usize, max_output: Option<u64>) -> (u64, u64) {
    let prompt = (prompt_bytes as u64).div_ceil(4);
    (prompt, max_output.unwrap_or(DEFAULT_OUTPUT))
}

/// A moving rate of events (tokens, requests): each adds `x / WINDOW` and the sum decays with
/// time constant `WINDOW`, so a steady `λ` a second of `x` reads `λ·x`.
#[derive(Debug, Clone, Copy, Default)]
struct Meter {
    rate: f64,
    at: f64,
}

impl Meter {
    fn read(&self, now: f64) -> f64 {
        self.rate * (-(now - self.at).max(0.0) / WINDOW).exp()
    }

    fn add(&mut self, x: f64, now: f64) {
        self.rate = (self.read(now) + x / WINDOW).max(0.0);
        self.at = now.max(self.at);
    }

    /// Adds `x` at `now` as if it had been added at `at`: what is left of it after the decay
    /// since. (A correction to an amount added at `at`, such as a request's estimate settled
    /// when it ends, must not take back more than is left of the estimate.)
    fn add_since(&mut self, x: f64, at: f64, now: f64) {
        self.add(x * (-(now - at).max(0.0) / WINDOW).exp(), now);
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct TenantUse {
    /// Tokens offered a second.
    offered: Meter,
    weight: f64,
    /// Requests a second, and those shed, for the shed fraction.
    requests: Meter,
    shed: Meter,
    last: f64,
    /// The mean output of its requests served (a moving mean), once one is.
    output: Option<f64>,
}

/// One model's tenants and their shares.
#[derive(Debug)]
struct Shares {
    tenants: HashMap<Arc<str>, TenantUse, foldhash::fast::RandomState>,
    /// Tokens admitted a second.
    admitted: Meter,
    /// The fair share per unit of weight, tokens a second; infinite while every tenant fits.
    alpha: f64,
    alpha_at: f64,
    /// Reused by the recomputation: (use / weight, use, weight).
    scratch: Vec<(f64, f64, f64)>,
}

impl Shares {
    fn new() -> Self {
        Shares {
            tenants: HashMap::default(),
            admitted: Meter::default(),
            alpha: f64::INFINITY,
            alpha_at: f64::NEG_INFINITY,
            scratch: Vec::new(),
        }
    }

    /// Water-filling: the share per unit of weight at which the active tenants' capped use
    /// adds up to the admitted rate.
    fn recompute(&mut self, now: f64) {
        self.tenants.retain(|_, t| now - t.last < 6.0 * WINDOW);
        self.scratch.clear();
        let mut weights = 0.0;
        for t in self.tenants.values() {
            let r = t.offered.read(now);
            if r > 1e-6 {
                self.scratch.push((r / t.weight, r, t.weight));
                weights += t.weight;
            }
        }
        self.alpha_at = now;
        self.alpha = f64::INFINITY;
        if self.scratch.len() < 2 {
            return;
        }
        let mut left = self.admitted.read(now);
        let offered: f64 = self.scratch.iter().map(|t| t.1).sum();
        if left >= (1.0 - FITS) * offered {
            return; // nothing (to speak of) is shed: everyone fits
        }
        self.scratch.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
        for &(per_weight, r, w) in &self.scratch {
            let level = left / weights;
            if per_weight > level {
                self.alpha = level;
                return;
            }
            left -= r;
            weights -= w;
        }
    }
}

/// The tenants' use, per model label of the limiter (names from the policy: bounded).
#[derive(Debug, Default)]
pub struct FairBook {
    models: Mutex<HashMap<Box<str>, Shares, foldhash::fast::RandomState>>,
}

/// A tenant's standing on a model, for the metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Standing {
    pub model: String,
    pub tenant: Arc<str>,
    /// Tokens offered a second.
    pub use_rate: f64,
    /// Its fair share, tokens a second (infinite while nothing is shed).
    pub fair_share: f64,
    /// The fraction of its recent requests shed.
    pub shed_fraction: f64,
}

impl FairBook {
    /// A request of `tenant` (of `weight`) for the model labelled `model` at `now`, of
    /// `prompt` estimated tokens and allowed `max_output`: counts it in the tenant's use at
    /// its estimated cost (the prompt plus the tenant's mean output so far, at most
    /// `max_output`), and says whether the tenant is then at or under its fair share while
    /// another is over (then a `standard` request the gate sheds waits for the next free
    /// slot; see the module docs), and the cost it was counted at.
    pub fn offer(
        &self,
        model: &str,
        tenant: &Arc<str>,
        weight: f64,
        (prompt, max_output): (u64, Option<u64>),
        now: Duration,
    ) -> (bool, f64) {
        let now = now.as_secs_f64();
        let mut models = self.models.lock();
        let shares = match models.get_mut(model) {
            Some(s) => s,
            None => models.entry(model.into()).or_insert_with(Shares::new),
        };
        let t = match shares.tenants.get_mut(tenant) {
            Some(t) => t,
            None => shares.tenants.entry(tenant.clone()).or_default(),
        };
        let output = match (t.output, max_output) {
            (Some(mean), Some(max)) => mean.min(max as f64),
            (Some(mean), None) => mean,
            (None, max) => max.unwrap_or(DEFAULT_OUTPUT).min(MAX_OUTPUT_ESTIMATE) as f64,
        };
        let cost = prompt as f64 + output;
        shares.admitted.add(cost, now);
        t.offered.add(cost, now);
        t.requests.add(1.0, now);
        t.weight = weight;
        t.last = now;
        let per_weight = t.offered.read(now) / weight;
        if now - shares.alpha_at >= RECOMPUTE {
            shares.recompute(now);
        }
        (shares.alpha.is_finite() && per_weight <= shares.alpha, cost)
    }

    /// The gate shed a request offered with `cost` at `offered` (offers count as admitted
    /// until then, so an admitted request takes one lock): it leaves the model's admitted rate
    /// and counts in the tenant's shed fraction.
    pub fn shed(&self, model: &str, tenant: &str, (cost, offered): (f64, Duration), now: Duration) {
        let now = now.as_secs_f64();
        let mut models = self.models.lock();
        let Some(shares) = models.get_mut(model) else {
            return;
        };
        shares.admitted.add_since(-cost, offered.as_secs_f64(), now);
        if let Some(t) = shares.tenants.get_mut(tenant) {
            t.shed.add(1.0, now);
        }
    }

    /// Settles a served request offered at `offered`: it used `delta` tokens more (or fewer)
    /// than estimated, of which `output` were output (None: not measured). The correction is
    /// what is left of it since the offer, as if the request had been counted at its true
    /// cost then.
    pub fn settle(
        &self,
        model: &str,
        tenant: &str,
        (delta, offered): (f64, Duration),
        output: Option<u64>,
        now: Duration,
    ) {
        let (at, now) = (offered.as_secs_f64(), now.as_secs_f64());
        let mut models = self.models.lock();
        let Some(shares) = models.get_mut(model) else {
            return;
        };
        shares.admitted.add_since(delta, at, now);
        if let Some(t) = shares.tenants.get_mut(tenant) {
            t.offered.add_since(delta, at, now);
            if let Some(out) = output.map(|o| o as f64) {
                t.output = Some(t.output.map_or(out, |m| m + OUTPUT_MEAN_WEIGHT * (out - m)));
            }
        }
    }

    /// Every tenant's standing at `now`.
    pub fn standings(&self, now: Duration) -> Vec<Standing> {
        let now = now.as_secs_f64();
        let models = self.models.lock();
        let mut out = Vec::new();
        for (model, shares) in models.iter() {
            for (tenant, t) in &shares.tenants {
                let requests = t.requests.read(now);
                out.push(Standing {
                    model: model.to_string(),
                    tenant: tenant.clone(),
                    use_rate: t.offered.read(now),
                    fair_share: shares.alpha * t.weight,
                    shed_fraction: if requests > 0.0 {
                        (t.shed.read(now) / requests).min(1.0)
                    } else {
                        0.0
                    },
                });
            }
        }
        out
    }
}

/// How the latency gate sees a request: its priority, and whether, when shed, it waits for
/// the next free slot ahead of the other `standard` requests ([`super::queue`]): a `standard`
/// request of a tenant at or under its fair share while another is over its own.
pub fn gate(priority: Priority, under_share: bool) -> (Priority, bool) {
    (priority, under_share && priority == Priority::Standard)
}

#[cfg(test)]
mod tests;
