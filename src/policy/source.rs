//! Policy sources publish validated snapshots; the gateway reads the current one per request.
//!
//! [`PolicyStore`] holds the snapshot in an `ArcSwapOption`: readers `load` without locks, a
//! source `apply`s a new validated policy (the limiter of each endpoint is rebuilt with
//! [`Fleet::carry_over`], so the state of every endpoint and key that remains carries on
//! under the new thresholds) or
//! `reject`s an invalid one (the last good snapshot stays; the error is logged and counted).
//! Sources: [`load_and_poll_file`] (a local YAML file, polled) and [`super::watch`] (the
//! Kubernetes API); both decide what changed with the state machines of [`super::follow`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;

use super::follow::{Change, FileFollower};
use super::{PolicyConfig, PolicyError};
use crate::discovery::{Served, ServiceRef};
use crate::limiter::fleet::Fleet;

/// One policy in force.
#[derive(Debug)]
pub struct Snapshot {
    /// `metadata.generation` (Kubernetes) or the count of applied versions (file).
    pub generation: i64,
    /// Where the policy came from, for logs: `file:/path` or `namespace/name`.
    pub source: String,
    pub config: PolicyConfig,
    /// A limiter per endpoint of `config.upstream.endpoints`, in the same order.
    pub fleet: Fleet,
}

impl Snapshot {
    /// The URL of endpoint `i` of the fleet.
    pub fn endpoint_url(&self, i: usize) -> &http::Uri {
        &self.config.upstream.endpoints[i]
    }
}

/// Counters and flags of the policy source, read by the metrics at scrape time.
#[derive(Debug, Default)]
pub struct SourceStatus {
    /// Versions applied.
    pub applied: AtomicU64,
    /// Versions rejected as invalid (or unreadable files).
    pub rejected: AtomicU64,
    /// Incidents of the Kubernetes watch.
    pub watch_errors: AtomicU64,
    /// Whether the last load succeeded.
    pub last_ok: AtomicBool,
    /// Whether the source (file or watch) is readable now.
    pub up: AtomicBool,
    /// Whether the policy object exists.
    pub present: AtomicBool,
}

/// The current policy snapshot and its bookkeeping.
pub struct PolicyStore {
    current: ArcSwapOption<Snapshot>,
    status: SourceStatus,
    /// Replaces `spec.upstream.url` and `endpoints` of every policy (`--upstream`, one or
    /// more); empty: the policy's own.
    upstream_override: Vec<http::Uri>,
    /// Where this gateway listens: a policy whose upstream is this address is refused.
    listen: Option<std::net::SocketAddr>,
    /// The Service the policy in force discovers, and what it serves; held while a snapshot
    /// is built, so a policy reload and a discovery change never overwrite each other.
    discovery: parking_lot::Mutex<Discovery>,
    /// The Service to discover, for the discovery task ([`crate::discovery::watch`]).
    target: tokio::sync::watch::Sender<Option<ServiceRef>>,
    /// The namespace of the policy followed through the API server (None: a policy file).
    namespace: Option<String>,
}

#[derive(Debug, Default)]
struct Discovery {
    target: Option<ServiceRef>,
    served: Served,
    up: bool,
}

/// Whether `url` addresses a gateway listening on `listen`: the same port on the same IP, or
/// on a loopback name or address when the gateway listens on all interfaces or loopback.
pub fn points_at(url: &http::Uri, listen: std::net::SocketAddr) -> bool {
    let default_port = if url.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    if url.port_u16().unwrap_or(default_port) != listen.port() || listen.port() == 0 {
        return false;
    }
    let host = url
        .host()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']');
    let local_name = host.eq_ignore_ascii_case("localhost");
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => {
            ip == listen.ip()
                || (listen.ip().is_unspecified() && (ip.is_loopback() || ip.is_unspecified()))
                || (ip.is_loopback() && listen.ip().is_loopback())
        }
        Err(_) => local_name && (listen.ip().is_unspecified() || listen.ip().is_loopback()),
    }
}

impl PolicyStore {
    pub fn new(upstream_override: Vec<http::Uri>) -> Self {
        PolicyStore {
            current: ArcSwapOption::empty(),
            status: SourceStatus::default(),
            upstream_override,
            listen: None,
            discovery: Default::default(),
            target: tokio::sync::watch::Sender::new(None),
            namespace: None,
        }
    }

    /// The policy's namespace: a bare Service name in its upstream URL names a Service there
    /// ([`ServiceRef::of`]).
    pub fn in_namespace(mut self, namespace: Option<String>) -> Self {
        self.namespace = namespace;
        self
    }

    /// Refuses policies whose upstream is `listen` itself (a request loop).
    pub fn listening_on(mut self, listen: std::net::SocketAddr) -> Self {
        self.listen = Some(listen);
        self
    }

    /// Why `config` cannot be put in force here, if it cannot.
    fn refusal(&self, config: &PolicyConfig) -> Option<String> {
        let listen = self.listen?;
        let served = match self.upstream_override.is_empty() {
            true => &config.upstream.endpoints,
            false => &self.upstream_override,
        };
        let url = served.iter().find(|url| points_at(url, listen))?;
        Some(format!(
            "the upstream {url} is this gateway itself ({listen}): requests would loop"
        ))
    }

    /// The source's counters and flags.
    pub fn status(&self) -> &SourceStatus {
        &self.status
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

    /// Records whether the source is readable and the object exists.
    pub fn set_source(&self, up: bool, present: bool) {
        self.status.up.store(up, Ordering::Relaxed);
        self.status.present.store(present, Ordering::Relaxed);
    }

    /// Puts a validated policy in force.
    pub fn apply(
        &self,
        generation: i64,
        source: String,
        mut config: PolicyConfig,
    ) -> Arc<Snapshot> {
        if let Some(url) = self.upstream_override.first() {
            config.upstream.url = url.clone();
            config.upstream.endpoints = self.upstream_override.clone();
        }
        let mut d = self.discovery.lock();
        let target = ServiceRef::of_upstream(&config.upstream, self.namespace.as_deref());
        if d.target != target {
            *d = Discovery {
                target: target.clone(),
                ..Discovery::default()
            };
            self.target.send_replace(target);
        }
        let snap = self.build(generation, source, config, &d);
        self.status.applied.fetch_add(1, Ordering::Relaxed);
        self.status.last_ok.store(true, Ordering::Relaxed);
        tracing::info!(
            source = %snap.source,
            generation,
            upstream = %snap.config.upstream.url,
            endpoints = snap.fleet.len(),
            discovery = d.target.as_ref().map(|t| t.describe()),
            mode = ?snap.config.limiter.mode,
            "policy applied"
        );
        snap
    }

    /// Builds and puts in force the snapshot of `config` with the endpoints `d` discovered
    /// (or, discovering nothing yet, the Service URL); every endpoint that remains keeps its
    /// state.
    fn build(
        &self,
        generation: i64,
        source: String,
        mut config: PolicyConfig,
        d: &Discovery,
    ) -> Arc<Snapshot> {
        let labels: Vec<String> = match (&d.target, &d.served) {
            (Some(_), Served::Endpoints(list)) => {
                config.upstream.endpoints = list.iter().map(|e| e.url.clone()).collect();
                list.iter().map(|e| e.label.clone()).collect()
            }
            (Some(service), Served::ServiceUrl) => {
                config.upstream.endpoints = vec![service.url.clone()];
                vec![super::config::endpoint_label(&service.url)]
            }
            (None, _) => (config.upstream.endpoints.iter())
                .map(super::config::endpoint_label)
                .collect(),
        };
        let previous = self.current.load_full();
        let fleet = Fleet::carry_over(
            &config.limiter,
            &labels,
            previous.as_ref().map(|p| &p.fleet),
        );
        let snap = Arc::new(Snapshot {
            generation,
            source,
            config,
            fleet,
        });
        self.current.store(Some(snap.clone()));
        snap
    }

    /// The Service the policy in force discovers (None: none), as it changes.
    pub fn discovery_target(&self) -> tokio::sync::watch::Receiver<Option<ServiceRef>> {
        self.target.subscribe()
    }

    /// Serves what discovery found for `service` (`up`: from a working watch); ignored when
    /// the policy in force no longer discovers `service`.
    pub fn discovered(&self, service: &ServiceRef, served: Served, up: bool) {
        let mut d = self.discovery.lock();
        if d.target.as_ref() != Some(service) {
            return;
        }
        d.up = up;
        if d.served == served {
            return;
        }
        d.served = served;
        if let Some(cur) = self.load() {
            self.build(cur.generation, cur.source.clone(), cur.config.clone(), &d);
        }
    }

    /// The discovered Service's state for metrics: whether its watch works and how many of
    /// its endpoints are served (0 while the Service URL is); None without discovery.
    pub fn discovery_state(&self) -> Option<(bool, usize)> {
        Self::state_of(&self.discovery.lock())
    }

    /// The policy in force together with the discovery state it was built from: both are
    /// read under the discovery lock, which every rebuild holds, so a scrape never shows the
    /// new endpoint count beside the old fleet.
    pub fn load_with_discovery(&self) -> (Option<Arc<Snapshot>>, Option<(bool, usize)>) {
        let d = self.discovery.lock();
        (self.load(), Self::state_of(&d))
    }

    fn state_of(d: &Discovery) -> Option<(bool, usize)> {
        d.target.as_ref()?;
        let n = match &d.served {
            Served::Endpoints(list) => list.len(),
            Served::ServiceUrl => 0,
        };
        Some((d.up, n))
    }

    /// Records that a new version of the policy could not be used; the last good one stays.
    pub fn reject(&self, source: &str, error: &dyn std::fmt::Display) {
        self.status.rejected.fetch_add(1, Ordering::Relaxed);
        self.status.last_ok.store(false, Ordering::Relaxed);
        match self.load() {
            Some(s) => {
                tracing::error!(%source, %error, kept_generation = s.generation, "policy rejected; keeping the last good policy")
            }
            None => {
                tracing::error!(%source, %error, "policy rejected; no policy loaded yet, not ready")
            }
        }
    }

    /// Carries out what a follower decided about `source`.
    pub fn handle(&self, source: &str, change: Change) {
        match change {
            Change::Apply { generation, config } => match self.refusal(&config) {
                None => {
                    self.apply(generation, source.to_owned(), *config);
                }
                Some(why) => self.reject(source, &why),
            },
            Change::Reject(e) => self.reject(source, &e),
            Change::Failed(e) if source.starts_with("file:") => self.reject(source, &e),
            Change::Failed(e) => {
                self.status.watch_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%source, error = %e, "policy watch failed; keeping the last good policy and retrying with backoff");
            }
            Change::Recovered => tracing::info!(%source, "policy source recovered; resyncing"),
            Change::Deleted => {
                tracing::warn!(%source, "policy not found (deleted?); keeping the last policy until it is recreated")
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
    #[error("{path}: {why}")]
    Refused { path: PathBuf, why: String },
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
/// each changed, valid version ([`FileFollower`]). An invalid or unreadable version is
/// reported once and the last good policy stays in force. Runs until the task is dropped.
pub async fn load_and_poll_file(
    path: PathBuf,
    store: Arc<PolicyStore>,
    interval: Duration,
) -> Result<impl std::future::Future<Output = ()>, FileError> {
    let (bytes, config) = read_policy_file(&path)?;
    let source = format!("file:{}", path.display());
    if let Some(why) = store.refusal(&config) {
        return Err(FileError::Refused { path, why });
    }
    store.apply(1, source.clone(), config);
    store.set_source(true, true);
    let mut follower = FileFollower::new(bytes);
    Ok(async move {
        let read = move || std::fs::read(&path);
        super::follow::poll(interval, read, |read| {
            if let Some(change) = follower.on_read(read) {
                store.handle(&source, change);
            }
            store.set_source(follower.up(), true);
        })
        .await;
    })
}

#[cfg(test)]
mod tests;
