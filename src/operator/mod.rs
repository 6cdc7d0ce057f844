//! The operator's side of sluice: the objects it owns per RateLimitPolicy.
//!
//! - [`objects`]: builders of the gateway's ServiceAccount, Role and RoleBinding (and names).

pub mod objects;
