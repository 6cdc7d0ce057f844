//! The policy sources as synchronous state machines: what each event of a Kubernetes watch or
//! each read of a policy file changes, decided without I/O so every rule is unit-tested
//! without a cluster. The async loops in [`super::watch`] and [`super::source`] only feed
//! events in and hand the [`Change`]s to the [`super::source::PolicyStore`].

use super::{PolicyConfig, PolicyError, RateLimitPolicy};

/// What a source event changes.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A new valid version to put in force.
    Apply {
        generation: i64,
        config: Box<PolicyConfig>,
    },
    /// A new version that cannot be used; the last good policy stays.
    Reject(String),
    /// The source failed (first failure of an incident only).
    Failed(String),
    /// The source works again after a failure.
    Recovered,
    /// The object is gone (first time only); the last policy keeps serving.
    Deleted,
}

/// One event of the Kubernetes watch on a single RateLimitPolicy.
#[derive(Debug, Clone, Copy)]
pub enum WatchEvent<'a> {
    /// The watch failed (API server down, RBAC, network); it retries with backoff.
    Error(&'a str),
    /// A relist starts.
    Init,
    /// The object as listed or updated.
    Apply(&'a RateLimitPolicy),
    /// The object was deleted.
    Delete,
    /// The relist is complete.
    InitDone,
}

/// Follows one RateLimitPolicy through its watch events.
#[derive(Debug, Default)]
pub struct PolicyFollower {
    last_generation: Option<i64>,
    failing: bool,
    seen_in_relist: bool,
    present: bool,
    up: bool,
}

impl PolicyFollower {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the watch currently works.
    pub fn up(&self) -> bool {
        self.up
    }

    /// Whether the object exists, as far as the watch knows.
    pub fn present(&self) -> bool {
        self.present
    }

    pub fn on_event(&mut self, event: WatchEvent<'_>) -> Option<Change> {
        if let WatchEvent::Error(e) = event {
            self.up = false;
            if self.failing {
                return None;
            }
            self.failing = true;
            return Some(Change::Failed(e.to_owned()));
        }
        self.up = true;
        let recovered = std::mem::take(&mut self.failing);
        let change = match event {
            WatchEvent::Error(_) => unreachable!("handled above"),
            WatchEvent::Init => {
                self.seen_in_relist = false;
                None
            }
            WatchEvent::Apply(p) => self.apply(p),
            WatchEvent::Delete => self.deleted(),
            WatchEvent::InitDone if !self.seen_in_relist => self.deleted(),
            WatchEvent::InitDone => None,
        };
        // A change outranks the recovery: the loop logs the recovery either way from `up`.
        change.or(recovered.then_some(Change::Recovered))
    }

    fn apply(&mut self, p: &RateLimitPolicy) -> Option<Change> {
        self.seen_in_relist = true;
        self.present = true;
        // Status-only updates do not bump the generation.
        let generation = p.metadata.generation.unwrap_or(0);
        if self.last_generation == Some(generation) {
            return None;
        }
        self.last_generation = Some(generation);
        Some(match PolicyConfig::try_from(&p.spec) {
            Ok(config) => Change::Apply {
                generation,
                config: Box::new(config),
            },
            Err(e) => Change::Reject(e.to_string()),
        })
    }

    fn deleted(&mut self) -> Option<Change> {
        let was_known = self.present || self.last_generation.is_some();
        self.present = false;
        // A recreated object starts again at generation 1: apply it even if it matches.
        self.last_generation = None;
        was_known.then_some(Change::Deleted)
    }
}

/// Follows a policy file through periodic reads; generations count applied versions.
#[derive(Debug)]
pub struct FileFollower {
    last: Vec<u8>,
    generation: i64,
    /// The error last reported, so a persisting one is reported once.
    reported: Option<String>,
    up: bool,
}

impl FileFollower {
    /// A follower whose generation 1 is `bytes` (already applied).
    pub fn new(bytes: Vec<u8>) -> Self {
        FileFollower {
            last: bytes,
            generation: 1,
            reported: None,
            up: true,
        }
    }

    /// Whether the file was readable at the last read.
    pub fn up(&self) -> bool {
        self.up
    }

    /// The result of one read of the file.
    pub fn on_read(&mut self, read: std::io::Result<Vec<u8>>) -> Option<Change> {
        let bytes = match read {
            Ok(b) => b,
            Err(e) => {
                self.up = false;
                let msg = format!("cannot read the policy file: {e}");
                if self.reported.as_deref() == Some(&msg) {
                    return None;
                }
                self.reported = Some(msg.clone());
                return Some(Change::Failed(msg));
            }
        };
        let recovered = !std::mem::replace(&mut self.up, true);
        if bytes == self.last {
            if recovered {
                self.reported = None;
                return Some(Change::Recovered);
            }
            return None;
        }
        self.last = bytes;
        match PolicyConfig::from_yaml(&String::from_utf8_lossy(&self.last)) {
            Ok((_, config)) => {
                self.generation += 1;
                self.reported = None;
                Some(Change::Apply {
                    generation: self.generation,
                    config: Box::new(config),
                })
            }
            Err(e) => {
                let e: PolicyError = e;
                self.reported = Some(e.to_string());
                Some(Change::Reject(e.to_string()))
            }
        }
    }
}

/// Every `interval`, reads a file (or directory) with `read` on the blocking pool and hands
/// the result to `on_read`: the one polling loop of the policy file, the upstream key file and
/// the client key directory. Runs until the task is dropped.
pub async fn poll<T, R, F>(interval: std::time::Duration, read: R, mut on_read: F)
where
    T: Send + 'static,
    R: Fn() -> T + Clone + Send + 'static,
    F: FnMut(T),
{
    loop {
        tokio::time::sleep(interval).await;
        if let Ok(result) = tokio::task::spawn_blocking(read.clone()).await {
            on_read(result);
        }
    }
}

#[cfg(test)]
mod tests;
