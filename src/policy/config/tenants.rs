//! `spec.tenants`, checked.

use std::collections::HashMap;

use crate::policy::crd::{BudgetSpec, MAX_REQUESTS_PER_MINUTE, RateLimitPolicySpec};

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

/// A tenant's budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Budget {
    /// Requests a minute, over all gateway pods; None: no request budget.
    pub requests_per_minute: Option<u32>,
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
    Budget {
        requests_per_minute: rpm,
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
