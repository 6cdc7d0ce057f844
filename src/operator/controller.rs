//! One controller per watched namespace (or one for all): the policies' watch, the owned
//! kinds' watches feeding the caches reconcile reads ownership from, and the run loop.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};

use super::{Context, owned, reconcile};
use crate::policy::RateLimitPolicy;

/// One controller over `ns` (or all namespaces); returns its store and the future to run.
pub(super) fn controller(
    client: &Client,
    ns: Option<&str>,
    concurrency: u16,
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> (
    Store<RateLimitPolicy>,
    futures_util::future::BoxFuture<'static, ()>,
) {
    fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    // Each owned kind's watch feeds a cache (read by reconcile for ownership) and triggers
    // the owning policy's reconcile.
    fn cached<K>(
        client: &Client,
        ns: Option<&str>,
    ) -> (
        Store<K>,
        impl futures_util::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
    )
    where
        K: owned::Owned,
    {
        let (reader, writer) = kube::runtime::reflector::store();
        let config =
            watcher::Config::default().labels("app.kubernetes.io/managed-by=sluice-operator");
        let stream = watcher::watcher(api::<K>(client, ns), config)
            .default_backoff()
            // The managed fields are most of an object's size and never read here.
            .modify(|o: &mut K| o.meta_mut().managed_fields = None)
            .reflect(writer)
            .touched_objects();
        (reader, stream)
    }
    let (deployments, d) = cached::<Deployment>(client, ns);
    let (services, s) = cached::<Service>(client, ns);
    let (service_accounts, sa) = cached::<ServiceAccount>(client, ns);
    let (roles, r) = cached::<Role>(client, ns);
    let (role_bindings, rb) = cached::<RoleBinding>(client, ns);
    let (pdbs, pdb) = cached::<PodDisruptionBudget>(client, ns);
    ctx.owners.stores.write().unwrap().push(owned::OwnedStores {
        deployments,
        services,
        service_accounts,
        roles,
        role_bindings,
        pdbs,
    });
    let c = Controller::new(
        api::<RateLimitPolicy>(client, ns),
        watcher::Config::default(),
    )
    .owns_stream(d)
    .owns_stream(s)
    .owns_stream(sa)
    .owns_stream(r)
    .owns_stream(rb)
    .owns_stream(pdb)
    // Bounded concurrency keeps a burst of policies from flooding the API server; a short
    // debounce folds the burst of events that one reconcile's own writes and the
    // Deployment's status updates cause into one follow-up reconcile.
    .with_config(
        kube::runtime::controller::Config::default()
            .concurrency(concurrency)
            .debounce(Duration::from_millis(500)),
    )
    .graceful_shutdown_on(shutdown);
    let store = c.store();
    let fut = Box::pin(
        c.run(reconcile::reconcile, reconcile::error_policy, ctx)
            .for_each(|_| futures_util::future::ready(())),
    );
    (store, fut)
}
