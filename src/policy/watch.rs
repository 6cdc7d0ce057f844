//! The Kubernetes policy source: a kube-runtime watcher on exactly one RateLimitPolicy (field
//! selector on its name), feeding the same [`PolicyStore`] as the policy file.
//!
//! - Each new `metadata.generation` is validated and applied (or rejected, keeping the last
//!   good policy); status-only updates do not bump the generation and are ignored.
//! - Watch errors (API server down, RBAC, network) keep the last good policy; the gateway
//!   stays ready. One log line when an incident starts and one when it ends, however long it
//!   lasts; the watcher reconnects with exponential backoff and relists, so the object's
//!   current state is re-read after every reconnect and no update is missed.
//! - A deleted policy (or one missing from a relist) is reported and the last policy keeps
//!   serving; a recreated one is picked up.

use std::sync::Arc;

use futures_util::StreamExt;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};

use super::source::PolicyStore;
use super::{PolicyConfig, RateLimitPolicy};
use crate::metrics::GatewayMetrics;

/// Follows `namespace/name` until the task is dropped.
pub async fn watch_policy(
    client: kube::Client,
    namespace: String,
    name: String,
    store: Arc<PolicyStore>,
    metrics: GatewayMetrics,
) {
    let api: Api<RateLimitPolicy> = Api::namespaced(client, &namespace);
    let source = format!("{namespace}/{name}");
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut last_generation: Option<i64> = None;
    let mut in_error = false;
    let mut present_in_relist = false;
    metrics.policy_source_up.set(0);
    while let Some(item) = events.next().await {
        let event = match item {
            Ok(e) => e,
            Err(e) => {
                if !in_error {
                    tracing::warn!(%source, error = %e, "policy watch failed; keeping the last good policy and retrying with backoff");
                    metrics
                        .policy_reloads
                        .with_label_values(&["watch_error"])
                        .inc();
                    in_error = true;
                }
                metrics.policy_source_up.set(0);
                continue;
            }
        };
        if in_error {
            tracing::info!(%source, "policy watch recovered; resyncing");
            in_error = false;
        }
        metrics.policy_source_up.set(1);
        match event {
            Event::Init => present_in_relist = false,
            Event::InitApply(p) | Event::Apply(p) => {
                present_in_relist = true;
                metrics.policy_present.set(1);
                let generation = p.metadata.generation.unwrap_or(0);
                if last_generation == Some(generation) {
                    continue;
                }
                last_generation = Some(generation);
                match PolicyConfig::try_from(&p.spec) {
                    Ok(config) => {
                        store.apply(generation, source.clone(), config);
                    }
                    Err(e) => store.reject(&source, &e),
                }
            }
            Event::Delete(_) => deleted(&source, &metrics, &mut last_generation),
            Event::InitDone => {
                if !present_in_relist {
                    deleted(&source, &metrics, &mut last_generation);
                }
            }
        }
    }
}

fn deleted(source: &str, metrics: &GatewayMetrics, last_generation: &mut Option<i64>) {
    if metrics.policy_present.get() != 0 || last_generation.is_some() {
        tracing::warn!(%source, "policy not found (deleted?); keeping the last policy until it is recreated");
    }
    metrics.policy_present.set(0);
    // A recreated object starts again at generation 1: apply it even if it matches.
    *last_generation = None;
}
