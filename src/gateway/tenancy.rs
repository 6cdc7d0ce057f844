//! A request's tenant along its way: who it is ([`super::budget::tenant`]), what it took from
//! its budgets ([`super::budget`]), its standing in fair shedding ([`super::fair`]), and, when
//! it ends, the tokens it used settled into both and counted in the tenant's metrics.
//!
//! Tokens used: the prompt and completion counts of the usage the gateway read (a unary
//! answer assembled from a stream); else the prompt's estimate plus one token per content
//! event relayed (one token an event on vLLM, SGLang, TGI and llama.cpp streams); a request
//! the gateway relays without measuring it (a unary answer passed through, `/v1/embeddings`)
//! keeps its estimate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::http::HeaderMap;

use super::Gateway;
use super::budget::{self, ANONYMOUS, Charge};
use super::error::GatewayError;
use super::fair::{self, MAX_OUTPUT_ESTIMATE};
use super::metrics::Outcome;
use crate::limiter::Priority;
use crate::policy::source::Snapshot;

/// The tenant of a request where there can be more than one: with `spec.tenants`, or with
/// `clientAuth` (each client its own, everyone else `anonymous`); None otherwise.
pub fn tenant_of(
    snap: &Snapshot,
    client: Option<Arc<str>>,
    headers: &HeaderMap,
) -> Option<Arc<str>> {
    match (&snap.config.tenants, &snap.config.client_auth) {
        (Some(t), _) => Some(budget::tenant(t, client, headers)),
        (None, Some(_)) => Some(client.unwrap_or_else(|| ANONYMOUS.into())),
        (None, None) => None,
    }
}

/// What the gateway read of a request's token use while relaying it.
#[derive(Debug)]
pub struct Used {
    events: AtomicU64,
    /// From a usage object, `u64::MAX` until one is read.
    prompt: AtomicU64,
    completion: AtomicU64,
}

impl Default for Used {
    fn default() -> Self {
        Used {
            events: AtomicU64::new(0),
            prompt: AtomicU64::new(u64::MAX),
            completion: AtomicU64::new(u64::MAX),
        }
    }
}

impl Used {
    /// `n` content events relayed.
    pub fn events(&self, n: usize) {
        self.events.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The usage the upstream reported.
    pub fn usage(&self, prompt: u64, completion: u64) {
        self.prompt.store(prompt, Ordering::Relaxed);
        self.completion.store(completion, Ordering::Relaxed);
    }
}

/// One request's tenant: its budgets' charge, its fair-shedding standing, its token use.
#[derive(Debug)]
pub struct Tenancy {
    pub tenant: Arc<str>,
    pub charge: Option<Arc<Charge>>,
    /// Estimated prompt and output tokens, once the body is read.
    estimate: Option<(u64, u64)>,
    /// The model label and estimated cost the request was offered to fair shedding with, and
    /// when.
    offered: Option<(String, f64, Duration)>,
    /// Set when the request is relayed and measured.
    pub used: Option<Arc<Used>>,
}

impl Tenancy {
    pub fn new(tenant: Arc<str>, charge: Option<Charge>) -> Self {
        Tenancy {
            tenant,
            charge: charge.map(Arc::new),
            estimate: None,
            offered: None,
            used: None,
        }
    }

    /// Before the latency gate: holds the request's estimated tokens against the tenant's
    /// token budget (the 429 when they are not there), offers it to fair shedding for `model`
    /// and says how the gate sees it ([`fair::gate`]: its priority, and whether it waits for a
    /// slot when shed).
    pub fn before_gate(
        &mut self,
        gw: &Gateway,
        snap: &Snapshot,
        model: &str,
        priority: Priority,
        prompt_bytes: usize,
        max_output: Option<u64>,
    ) -> Result<(Priority, bool), GatewayError> {
        let now = gw.clock.now();
        let (prompt, output) = fair::estimate(prompt_bytes, max_output);
        self.estimate = Some((prompt, output));
        if let Some(c) = &self.charge {
            c.reserve_tokens(&gw.budgets, prompt.saturating_add(output), now)?;
        }
        // (Every endpoint's limiter has the same keys: the first one names the model's.)
        let first = snap.fleet.limiter(0);
        let label = first.label(first.key(model));
        let weight = (snap.config.tenants.as_ref()).map_or(1, |t| t.budget(&self.tenant).weight);
        let estimate = (prompt, max_output);
        let (under, cost) = (gw.fair).offer(label, &self.tenant, f64::from(weight), estimate, now);
        self.offered = Some((label.to_owned(), cost, now));
        Ok(fair::gate(priority, under))
    }

    /// The gate's verdict (after any wait in the queue).
    pub fn gated(&self, gw: &Gateway, admitted: bool) {
        if let (Some((label, cost, at)), false) = (&self.offered, admitted) {
            (gw.fair).shed(label, &self.tenant, (*cost, *at), gw.clock.now());
        }
    }

    /// The request is answered by the gateway itself with `e`: a request shed gives back what
    /// it took from the budgets; counted in the tenant's requests.
    pub fn refused(&self, gw: &Gateway, e: &GatewayError) {
        // Shed by the gate, or refused for tokens after its request was taken: the budget
        // gets back what was taken; the client's own errors keep it spent.
        let given_back = matches!(
            e,
            GatewayError::Shed { .. }
                | GatewayError::Expired { .. }
                | GatewayError::OverBudget { .. }
                | GatewayError::TooLargeForBudget { .. }
        );
        if let (Some(c), true) = (&self.charge, given_back) {
            c.refund(&gw.budgets, gw.clock.now());
        }
        if let Some(o) = e.outcome() {
            count(gw, &self.tenant, o);
        }
    }

    /// The request was admitted and is relayed: its ending settles its tokens.
    pub fn spend(mut self, measured: bool) -> Spend {
        let used = measured.then(|| Arc::new(Used::default()));
        self.used = used.clone();
        Spend { tenancy: self }
    }
}

/// Counts a request of `tenant` that ended with `outcome` (the budget it has left is read
/// at each scrape: [`super::budget::Budgets::remaining`]).
fn count(gw: &Gateway, tenant: &str, outcome: Outcome) {
    (gw.metrics.tenant_requests)
        .with_label_values(&[tenant, outcome.as_str()])
        .inc();
}

/// An admitted request's tenancy until it ends ([`Spend::finish`], from its tracker).
#[derive(Debug)]
pub struct Spend {
    tenancy: Tenancy,
}

impl Spend {
    /// What the relay records the request's use into, when it is measured.
    pub fn used(&self) -> Option<Arc<Used>> {
        self.tenancy.used.clone()
    }

    /// The request ended with `outcome`: its tokens used are settled into its budget and its
    /// tenant's fair-shedding use, and counted.
    pub fn finish(self, gw: &Gateway, outcome: Outcome) {
        let t = &self.tenancy;
        let (prompt_est, output_est) = t.estimate.unwrap_or((0, 0));
        let (prompt, output, measured) = match &t.used {
            Some(u) => {
                let p = u.prompt.load(Ordering::Relaxed);
                let c = u.completion.load(Ordering::Relaxed);
                match (p, c) {
                    (u64::MAX, _) | (_, u64::MAX) => {
                        (prompt_est, u.events.load(Ordering::Relaxed), true)
                    }
                    (p, c) => (p, c, true),
                }
            }
            None => (prompt_est, output_est.min(MAX_OUTPUT_ESTIMATE), false),
        };
        let used = prompt.saturating_add(output);
        let now = gw.clock.now();
        if let Some((label, cost, at)) = &t.offered {
            let output = measured.then_some(output);
            let delta = (used as f64 - cost, *at);
            (gw.fair).settle(label, &t.tenant, delta, output, now);
        }
        if let Some(c) = &t.charge {
            c.settle_tokens(&gw.budgets, used, now);
        }
        gw.metrics
            .tenant_tokens
            .with_label_values(&[&t.tenant])
            .inc_by(used);
        count(gw, &t.tenant, outcome);
    }
}
