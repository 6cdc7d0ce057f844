//! The RateLimitPolicy: its custom resource types ([`crd`]), Gateway API durations
//! ([`duration`]), and validation into the [`PolicyConfig`] the gateway runs on
//! ([`config`]).

pub mod config;
pub mod crd;
mod document;
pub mod duration;
pub mod follow;
pub mod source;
pub mod watch;

pub use config::{PolicyConfig, PolicyError, UpstreamConfig};
pub use crd::{RateLimitPolicy, RateLimitPolicySpec, RateLimitPolicyStatus};

use kube::CustomResourceExt;

/// The CustomResourceDefinition of RateLimitPolicy as YAML, exactly as `sluice crd` prints it
/// and as `crds/ratelimitpolicies.sluice.dev.yaml` holds it.
pub fn crd_yaml() -> String {
    let crd = RateLimitPolicy::crd();
    serde_yaml::to_string(&crd).expect("a CRD always serializes to YAML")
}
