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

use super::RateLimitPolicy;
use super::follow::{PolicyFollower, WatchEvent};
use super::source::PolicyStore;

/// Follows `namespace/name` until the task is dropped.
pub async fn watch_policy(
    client: kube::Client,
    namespace: String,
    name: String,
    store: Arc<PolicyStore>,
) {
    let api: Api<RateLimitPolicy> = Api::namespaced(client, &namespace);
    let source = format!("{namespace}/{name}");
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut follower = PolicyFollower::new();
    store.set_source(false, false);
    while let Some(item) = events.next().await {
        let error;
        let event = match &item {
            Err(e) => {
                error = e.to_string();
                WatchEvent::Error(&error)
            }
            Ok(Event::Init) => WatchEvent::Init,
            Ok(Event::InitApply(p) | Event::Apply(p)) => WatchEvent::Apply(p),
            Ok(Event::Delete(_)) => WatchEvent::Delete,
            Ok(Event::InitDone) => WatchEvent::InitDone,
        };
        if let Some(change) = follower.on_event(event) {
            store.handle(&source, change);
        }
        store.set_source(follower.up(), follower.present());
    }
}
