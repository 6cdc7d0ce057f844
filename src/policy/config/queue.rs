//! `spec.queue`, checked.

use std::time::Duration;

use crate::policy::crd::{MAX_QUEUE_REQUESTS, MAX_QUEUE_WAIT_SECS, QueueSpec};

/// The admission queue of a policy (see [`crate::gateway::queue`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Longest wait for room; more than 0, at most 60 s.
    pub max_wait: Duration,
    /// Most requests waiting at once; 1 to 10000.
    pub max_requests: usize,
}

pub(super) fn queue(spec: Option<&QueueSpec>, c: &mut super::Checker) -> Option<QueueConfig> {
    let spec = spec?;
    if !(1..=MAX_QUEUE_REQUESTS).contains(&spec.max_requests) {
        c.fail(
            "spec.queue.maxRequests",
            format!(
                "{} must be between 1 and {MAX_QUEUE_REQUESTS}",
                spec.max_requests
            ),
        );
    }
    let field = "spec.queue.maxWait";
    let max_wait = c.duration(field, &spec.max_wait, Duration::ZERO)?;
    if max_wait > Duration::from_secs(MAX_QUEUE_WAIT_SECS) {
        c.fail(
            field,
            format!("{:?} must be at most {MAX_QUEUE_WAIT_SECS}s", spec.max_wait),
        );
        return None;
    }
    Some(QueueConfig {
        max_wait,
        max_requests: spec.max_requests as usize,
    })
}
