//! Policy sources publish validated snapshots; the gateway reads the current one per request.
//!
//! [`PolicyStore`] holds the snapshot in an `ArcSwapOption`: readers `load` without locks, a
//! source `apply`s a new validated policy (the limiter is rebuilt with
//! [`Limiter::carry_over`], so the state of every key that remains carries on under the new
//! thresholds) or
//! `reject`s an invalid one (the last good snapshot stays; the error is logged and counted).
//! Sources: [`watch_file`] (a local YAML file, polled) and, later, the Kubernetes API.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;

use super::{PolicyConfig, PolicyError};
use crate::limiter::Limiter;
use crate::metrics::GatewayMetrics;

/// One policy in force.
#[derive(Debug)]
pub struct Snapshot {
    /// `metadata.generation` (Kubernetes) or the count of applied versions (file).
    pub generation: i64,
    /// Where the policy came from, for logs: `file:/path` or `namespace/name`.
    pub source: String,
    pub config: PolicyConfig,
    pub limiter: Limiter,
}

/// The current policy snapshot and its bookkeeping.
pub struct PolicyStore {
    current: ArcSwapOption<Snapshot>,
    metrics: GatewayMetrics,
    /// Replaces `spec.upstream.url` of every policy (`--upstream`).
    upstream_override: Option<http::Uri>,
}

impl PolicyStore {
    pub fn new(metrics: GatewayMetrics, upstream_override: Option<http::Uri>) -> Self {
        PolicyStore {
            current: ArcSwapOption::empty(),
            metrics,
            upstream_override,
        }
    }

    /// The gateway metrics the store reports to.
    pub fn metrics(&self) -> &GatewayMetrics {
        &self.metrics
    }

    /// The policy in force, if any has been loaded.
    #[inline]
    pub fn load(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    /// The policy in force without taking a reference count (for per-chunk checks).
    #[inline]
    pub fn peek(&self) -> arc_swap::Guard<Option<Arc<Snapshot>>> {
        self.current.load()
    }

    /// Puts a validated policy in force.
    pub fn apply(
        &self,
        generation: i64,
        source: String,
        mut config: PolicyConfig,
    ) -> Arc<Snapshot> {
        if let Some(url) = &self.upstream_override {
            config.upstream.url = url.clone();
        }
        let previous = self.current.load_full();
        let limiter = match &previous {
            Some(p) => Limiter::carry_over(config.limiter.clone(), &p.limiter),
            None => Limiter::new(config.limiter.clone()),
        };
        let snap = Arc::new(Snapshot {
            generation,
            source,
            config,
            limiter,
        });
        self.current.store(Some(snap.clone()));
        self.metrics.policy_generation.set(generation);
        self.metrics
            .policy_reloads
            .with_label_values(&["success"])
            .inc();
        self.metrics.policy_last_reload_success.set(1.0);
        tracing::info!(
            source = %snap.source,
            generation,
            upstream = %snap.config.upstream.url,
            mode = ?snap.config.limiter.mode,
            "policy applied"
        );
        snap
    }

    /// Records that a new version of the policy could not be used; the last good one stays.
    pub fn reject(&self, source: &str, error: &dyn std::fmt::Display) {
        self.metrics
            .policy_reloads
            .with_label_values(&["error"])
            .inc();
        self.metrics.policy_last_reload_success.set(0.0);
        match self.load() {
            Some(s) => {
                tracing::error!(%source, %error, kept_generation = s.generation, "policy rejected; keeping the last good policy")
            }
            None => {
                tracing::error!(%source, %error, "policy rejected; no policy loaded yet, not ready")
            }
        }
    }
}

/// Why a policy file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Policy { path: PathBuf, source: PolicyError },
}

/// Reads and validates a policy file.
pub fn read_policy_file(path: &Path) -> Result<(Vec<u8>, PolicyConfig), FileError> {
    let bytes = std::fs::read(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let (_, config) = PolicyConfig::from_yaml(&text).map_err(|source| FileError::Policy {
        path: path.to_owned(),
        source,
    })?;
    Ok((bytes, config))
}

/// Loads `path` now (failing if it is unusable), then re-reads it every `interval` and applies
/// each changed, valid version. An invalid or unreadable version is reported once and the
/// last good policy stays in force. Runs until the task is dropped.
pub async fn load_and_watch_file(
    path: PathBuf,
    store: Arc<PolicyStore>,
    interval: Duration,
) -> Result<impl std::future::Future<Output = ()>, FileError> {
    let (mut last, config) = read_policy_file(&path)?;
    let source = format!("file:{}", path.display());
    let mut generation = 1;
    store.apply(generation, source.clone(), config);
    store.metrics().policy_source_up.set(1);
    store.metrics().policy_present.set(1);
    Ok(async move {
        let mut reported: Option<String> = None;
        loop {
            tokio::time::sleep(interval).await;
            let p = path.clone();
            let read = tokio::task::spawn_blocking(move || (std::fs::read(&p), p)).await;
            let Ok((read, _)) = read else { continue };
            let bytes = match read {
                Ok(b) => b,
                Err(e) => {
                    let msg = e.to_string();
                    store.metrics().policy_source_up.set(0);
                    if reported.as_deref() != Some(&msg) {
                        store.reject(&source, &format!("cannot read the policy file: {msg}"));
                        reported = Some(msg);
                    }
                    continue;
                }
            };
            store.metrics().policy_source_up.set(1);
            if bytes == last {
                continue;
            }
            last = bytes;
            match PolicyConfig::from_yaml(&String::from_utf8_lossy(&last)) {
                Ok((_, config)) => {
                    generation += 1;
                    store.apply(generation, source.clone(), config);
                    reported = None;
                }
                Err(e) => {
                    store.reject(&source, &e);
                    reported = Some(e.to_string());
                }
            }
        }
    })
}
