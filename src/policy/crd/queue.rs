//! The admission queue (`spec.queue`): a request the limiter would shed waits a short while
//! for room instead of being answered 429 at once.

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::super::duration::DURATION_PATTERN;

/// Most requests a queue may hold (`maxRequests`).
pub const MAX_QUEUE_REQUESTS: u32 = 10_000;
/// Longest `maxWait`.
pub const MAX_QUEUE_WAIT_SECS: u64 = 60;

/// How long a request the limiter would shed may wait for room, and how many may wait.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QueueSpec {
    /// Longest a request waits for room (more than 0, at most 60s); then it gets 429
    /// with a Retry-After that counts the queue ahead of it. The wait is part of the TTFT the
    /// client sees: start with a fraction of the TTFT threshold (a quarter to a half).
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s') && duration(self) <= duration('60s')").message("must be greater than 0 and at most 60s"))]
    pub max_wait: String,
    /// Most requests waiting at once (1 to 10000). A request finding the queue full is shed,
    /// unless it outranks the last one waiting, which is then shed in its place.
    #[serde(default = "default_max_requests")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_requests: u32,
}

/// `maxRequests` when the policy leaves it out (also how many requests of tenants under
/// their fair share may wait where the policy has no queue).
pub const DEFAULT_MAX_REQUESTS: u32 = 64;

fn default_max_requests() -> u32 {
    DEFAULT_MAX_REQUESTS
}
