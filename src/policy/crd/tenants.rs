//! Who the tenants are and their budgets (`spec.tenants`).

use std::collections::BTreeMap;

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Most budgets per minute may be (requests).
pub const MAX_REQUESTS_PER_MINUTE: u32 = 10_000_000;
/// Most budgets per minute may be (tokens).
pub const MAX_TOKENS_PER_MINUTE: u64 = 10_000_000_000;
/// Largest fair-shedding weight.
pub const MAX_WEIGHT: u32 = 1000;

/// The clients sharing the service and what each may use.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TenantsSpec {
    /// A request header naming the tenant, set by an authenticating proxy in front of the
    /// gateway (e.g. `x-tenant`). Read only with `trustHeader`, and only for the names listed
    /// in `clients`; other values are the `anonymous` tenant. A client authenticated by
    /// `clientAuth` is its own tenant whatever the header says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9-]+$')").message("must be an HTTP header name"))]
    pub header: Option<String>,

    /// Trust `header`: only behind a proxy that sets it itself and strips it from clients.
    #[serde(default)]
    pub trust_header: bool,

    /// The budget of every tenant not listed in `clients`, each on its own (authenticated
    /// clients by their name in the Secret, everyone else together as `anonymous`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<BudgetSpec>,

    /// Budgets by tenant name (a client's name in the `clientAuth` Secret, or a value of
    /// `header`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 1000))]
    pub clients: BTreeMap<String, BudgetSpec>,
}

/// What a tenant may use, per gateway pod's share (see the README on replicas).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BudgetSpec {
    /// Requests a minute (0 refuses every request); unset: no request budget. Counted over
    /// any 60 s (a sliding window): a whole minute's worth may come at once. Split evenly over
    /// `gateway.replicas`: each pod enforces its share (at least one a minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000000))]
    pub requests_per_minute: Option<u32>,

    /// Tokens a minute, prompt plus output (0 refuses every request); unset: no token budget.
    /// A request is admitted against an estimate (its body's bytes / 4, plus `max_tokens`, or
    /// 256 without one) and settled to the tokens it used when it ends (the usage the gateway
    /// read, else the output events it relayed). A request whose estimate alone exceeds this
    /// pod's share is refused with 429 "Request too large". Split evenly over
    /// `gateway.replicas` like `requestsPerMinute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000000000_u64))]
    pub tokens_per_minute: Option<u64>,

    /// The tenant's weight in fair shedding, 1 to 1000 (default 1): when the gateway sheds,
    /// a tenant's fair share of the tokens admitted is proportional to its weight, and the
    /// tenants over their share are shed first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: Option<u32>,
}
