//! The discovery task: a kube-runtime watcher and reflector on the EndpointSlices of the
//! Service the policy in force names (label `kubernetes.io/service-name`, in the Service's
//! namespace; the gateway needs only list and watch there), feeding the [`Follower`] and
//! handing what it decides to the [`PolicyStore`]. It restarts on the new Service when a
//! reload changes it and idles while the policy discovers nothing. One log line per change:
//! the endpoints (with those that came and went), the watch failing, falling back to the
//! Service URL, recovering.

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::watcher::{self, Event, watcher};
use kube::runtime::{WatchStreamExt, reflector};

use super::{Change, Follower, SERVICE_NAME_LABEL, ServiceRef};
use crate::limiter::Clock;
use crate::policy::source::PolicyStore;

/// Follows the Service of the policy in force until the task is dropped. `client` is the
/// gateway's API client when it has one (`--policy`); otherwise one is made from the
/// in-cluster configuration or KUBECONFIG when a policy first names a Service, and without
/// either the Service URL is served (logged once per Service).
pub async fn follow(client: Option<kube::Client>, store: Arc<PolicyStore>, clock: Arc<dyn Clock>) {
    let mut targets = store.discovery_target();
    let mut client = client;
    loop {
        let target = targets.borrow_and_update().clone();
        if let Some(service) = target {
            if client.is_none() {
                match kube::Client::try_default().await {
                    Ok(c) => client = Some(c),
                    Err(e) => tracing::warn!(
                        service = %service.describe(),
                        error = %e,
                        "cannot discover the Service's endpoints: no Kubernetes configuration; serving the Service URL"
                    ),
                }
            }
            if let Some(c) = &client {
                tokio::select! {
                    _ = follow_service(c.clone(), &service, &store, &clock) => {}
                    changed = targets.changed() => if changed.is_err() { return },
                }
                continue;
            }
        }
        if targets.changed().await.is_err() {
            return;
        }
    }
}

/// Watches the slices of `service` until the stream ends (it does not: the watcher retries
/// with backoff).
async fn follow_service(
    client: kube::Client,
    service: &ServiceRef,
    store: &PolicyStore,
    clock: &Arc<dyn Clock>,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &service.namespace);
    let config =
        watcher::Config::default().labels(&format!("{SERVICE_NAME_LABEL}={}", service.name));
    let (reader, writer) = reflector::store();
    let mut events = reflector(writer, watcher(api, config).default_backoff()).boxed();
    let mut follower = Follower::new();
    let mut listed = false;
    let name = service.describe();
    tracing::info!(service = %name, "discovering the Service's endpoints from its EndpointSlices");
    while let Some(item) = events.next().await {
        let change = match &item {
            Err(e) => follower.on_error(&e.to_string(), clock.now()),
            Ok(Event::Init | Event::InitApply(_)) => continue,
            Ok(Event::InitDone) => {
                listed = true;
                follower.on_slices(reader.state().iter().map(|s| &**s), service)
            }
            Ok(Event::Apply(_) | Event::Delete(_)) if listed => {
                follower.on_slices(reader.state().iter().map(|s| &**s), service)
            }
            Ok(_) => continue,
        };
        let before = labels(store, service);
        store.discovered(service, follower.served().clone(), follower.up());
        match change {
            None => {}
            Some(Change::Endpoints(found)) => {
                let now: Vec<&str> = found.endpoints.iter().map(|e| e.label.as_str()).collect();
                let added: Vec<&&str> = (now.iter())
                    .filter(|l| !before.iter().any(|b| b == **l))
                    .collect();
                let gone: Vec<&String> = (before.iter())
                    .filter(|b| !now.contains(&b.as_str()))
                    .collect();
                if found.endpoints.is_empty() {
                    tracing::warn!(service = %name, "the Service has no ready endpoint: requests get 503 no_endpoints until one is ready");
                } else {
                    tracing::info!(service = %name, endpoints = now.len(), ?added, ?gone, "the Service's endpoints changed");
                }
                if found.unmatched_slices > 0 {
                    tracing::warn!(service = %name, slices = found.unmatched_slices, port = service.port, port_name = ?service.port_name, "EndpointSlices without the port to use (set spec.upstream.portName to the Service port's name)");
                }
                if found.left_out > 0 {
                    tracing::warn!(service = %name, left_out = found.left_out, "more endpoints than the gateway routes to; the first by name are used");
                }
            }
            Some(Change::NoSlices) => {
                tracing::warn!(service = %name, "the Service has no EndpointSlice (ExternalName, no selector, or not created yet); serving the Service URL")
            }
            Some(Change::Recovered) => {
                tracing::info!(service = %name, "the EndpointSlice watch works again")
            }
            Some(Change::Failing(e)) => {
                tracing::warn!(service = %name, error = %e, "the EndpointSlice watch failed; keeping what is served and retrying with backoff")
            }
            Some(Change::FallBack(e)) => {
                tracing::warn!(service = %name, error = %e, "the EndpointSlice watch failed; serving the Service URL until it works again")
            }
        }
    }
}

/// The labels of the endpoints served for `service` now.
fn labels(store: &PolicyStore, service: &ServiceRef) -> Vec<String> {
    match store.load() {
        Some(s) if s.config.upstream.endpoints.first() != Some(&service.url) => (0..s.fleet.len())
            .map(|i| s.fleet.label(i).to_owned())
            .collect(),
        _ => Vec::new(),
    }
}
