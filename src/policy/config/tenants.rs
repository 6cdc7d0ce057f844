//! `spec.tenants`, checked.

use std::collections::HashMap;

use crate::policy::crd::{
    BudgetSpec, MAX_REQUESTS_PER_MINUTE, MAX_TOKENS_PER_MINUTE, MAX_WEIGHT, RateLimitPolicySpec,
};

/// Who the tenants are and their budgets (see [`crate::gateway::budget`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TenantsConfig {
    /// The header naming the tenant, when trusted (`spec.tenants.header` with `trustHeader`).
    pub header: Option<http::HeaderName>,
    /// The budget of tenants not listed.
    pub default: Budget,
    /// Budgets by tenant name.
    pub clients: HashMap<String, Budget>,
    /// Gateway pods sharing the budgets (`spec.gateway.replicas`, at least 1): each enforces
    /// its share.
    pub replicas: u32,
}

/// A tenant's budget and weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Requests a minute, over all gateway pods; None: no request budget.
    pub requests_per_minute: Option<u32>,
    /// Tokens a minute, over all gateway pods; None: no token budget.
    pub tokens_per_minute: Option<u64>,
    /// Weight in fair shedding (1 to 1000).
    pub weight: u32,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            requests_per_minute: None,
            tokens_per_minute: None,
            weight: 1,
        }
    }
}

impl TenantsConfig {
    /// The budget of tenant `name`.
    pub fn budget(&self, name: &str) -> Budget {
        self.clients.get(name).copied().unwrap_or(self.default)
    }
}

fn budget(spec: Option<&BudgetSpec>, field: &str, c: &mut super::Checker) -> Budget {
    let rpm = spec.and_then(|b| b.requests_per_minute);
    if let Some(n) = rpm.filter(|n| *n > MAX_REQUESTS_PER_MINUTE) {
        c.fail(
            format!("{field}.requestsPerMinute"),
            format!("{n} must be at most {MAX_REQUESTS_PER_MINUTE}"),
        );
    }
    let tpm = spec.and_then(|b| b.tokens_per_minute);
    if let Some(n) = tpm.filter(|n| *n > MAX_TOKENS_PER_MINUTE) {
        c.fail(
            format!("{field}.tokensPerMinute"),
            format!("{n} must be at most {MAX_TOKENS_PER_MINUTE}"),
        );
    }
    let weight = spec.and_then(|b| b.weight).unwrap_or(1);
    if !(1..=MAX_WEIGHT).contains(&weight) {
        c.fail(
            format!("{field}.weight"),
            format!("{weight} must be between 1 and {MAX_WEIGHT}"),
        );
    }
    Budget {
        requests_per_minute: rpm,
        tokens_per_minute: tpm,
        weight: weight.clamp(1, MAX_WEIGHT),
    }
}

pub(super) fn tenants(spec: &RateLimitPolicySpec, c: &mut super::Checker) -> Option<TenantsConfig> {
    let t = spec.tenants.as_ref()?;
    let header = match (&t.header, t.trust_header) {
        (None, true) => {
            c.fail(
                "spec.tenants.trustHeader",
                "names no header: set spec.tenants.header",
            );
            None
        }
        (None, false) => None,
        (Some(_), false) => {
            c.fail(
                "spec.tenants.header",
                "is read only with trustHeader: true (behind a proxy that sets it)",
            );
            None
        }
        (Some(h), true) => match http::HeaderName::try_from(h.as_str()) {
            Ok(n) if !["authorization", "x-sluice-priority", "host"].contains(&n.as_str()) => {
                Some(n)
            }
            _ => {
                c.fail(
                    "spec.tenants.header",
                    format!("{h:?} must be an HTTP header name other than authorization, host and x-sluice-priority"),
                );
                None
            }
        },
    };
    let mut clients = HashMap::new();
    for (name, b) in &t.clients {
        let field = format!("spec.tenants.clients[{name:?}]");
        if !super::secret_data_key(name) {
            c.fail(
                &field,
                "must be a Secret data key: 1 to 253 of a-z, A-Z, 0-9, '-', '_', '.'",
            );
        }
        clients.insert(name.clone(), budget(Some(b), &field, c));
    }
    let replicas = spec.gateway.as_ref().and_then(|g| g.replicas).unwrap_or(1);
    Some(TenantsConfig {
        header,
        default: budget(t.default.as_ref(), "spec.tenants.default", c),
        clients,
        replicas: u32::try_from(replicas).unwrap_or(1).max(1),
    })
}
