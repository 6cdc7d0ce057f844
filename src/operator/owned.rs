//! The watch caches of the objects the operator owns (reflector stores fed by the same watches
//! that trigger reconciles), and what reconcile reads from them: whether an object under a
//! gateway's name exists and whose it is, without a GET, and whether it is still exactly what
//! the operator last applied, so that an unchanged policy's resync writes nothing.

use std::sync::RwLock;

use dashmap::DashMap;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Resource;
use kube::runtime::reflector::{ObjectRef, Store};

/// The stores of one controller's watches (one namespace, or all).
#[derive(Clone)]
pub struct OwnedStores {
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    pub service_accounts: Store<ServiceAccount>,
    pub roles: Store<Role>,
    pub role_bindings: Store<RoleBinding>,
    pub pdbs: Store<PodDisruptionBudget>,
}

/// A kind the operator owns, and its store.
pub trait Owned:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + serde::Serialize
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    fn store(stores: &OwnedStores) -> &Store<Self>;
}

macro_rules! owned {
    ($($kind:ty => $field:ident),* $(,)?) => {$(
        impl Owned for $kind {
            fn store(stores: &OwnedStores) -> &Store<Self> {
                &stores.$field
            }
        }
    )*};
}

owned!(
    Deployment => deployments,
    Service => services,
    ServiceAccount => service_accounts,
    Role => roles,
    RoleBinding => role_bindings,
    PodDisruptionBudget => pdbs,
);

/// What the operator knows of its objects.
#[derive(Default)]
pub struct Owners {
    /// The watch caches (they hold only objects labelled as the operator's).
    pub stores: RwLock<Vec<OwnedStores>>,
    /// Per object: a digest of what was last applied and the resourceVersion the API server
    /// returned for it. While both match, applying again would change nothing.
    applied: DashMap<(&'static str, String, String), (u64, String)>,
}

impl Owners {
    /// The cached object `ns/name` of kind `K`, if a watch has it.
    pub fn cached<K: Owned>(&self, ns: &str, name: &str) -> Option<std::sync::Arc<K>> {
        let key = ObjectRef::<K>::new(name).within(ns);
        self.stores
            .read()
            .unwrap()
            .iter()
            .find_map(|s| K::store(s).get(&key))
    }

    /// Whether `desired` (digest `digest`) was applied and `current` is still the object the
    /// API server returned then.
    pub fn unchanged<K: Owned>(&self, current: &K, digest: u64) -> bool {
        let Some(rv) = current.meta().resource_version.as_deref() else {
            return false;
        };
        self.applied
            .get(&key::<K>(current))
            .is_some_and(|e| e.0 == digest && e.1 == rv)
    }

    /// Records what was applied and what the API server returned.
    pub fn record<K: Owned>(&self, returned: &K, digest: u64) {
        if let Some(rv) = returned.meta().resource_version.clone() {
            self.applied.insert(key::<K>(returned), (digest, rv));
        }
    }

    /// Forgets what was applied to objects that are gone from the watch caches.
    pub fn prune(&self) {
        let stores = self.stores.read().unwrap().clone();
        self.applied.retain(|(kind, ns, name), _| {
            stores.iter().any(|s| match *kind {
                "Deployment" => has(&s.deployments, ns, name),
                "Service" => has(&s.services, ns, name),
                "ServiceAccount" => has(&s.service_accounts, ns, name),
                "Role" => has(&s.roles, ns, name),
                "RoleBinding" => has(&s.role_bindings, ns, name),
                "PodDisruptionBudget" => has(&s.pdbs, ns, name),
                _ => false,
            })
        });
    }
}

fn has<K: Owned>(store: &Store<K>, ns: &str, name: &str) -> bool {
    store.get(&ObjectRef::new(name).within(ns)).is_some()
}

fn key<K: Owned>(obj: &K) -> (&'static str, String, String) {
    let m = obj.meta();
    (
        kind::<K>(),
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    )
}

/// The kind's name as a static string (the key of [`Owners::applied`]).
fn kind<K: Owned>() -> &'static str {
    match K::kind(&()) {
        std::borrow::Cow::Borrowed(k) => k,
        std::borrow::Cow::Owned(_) => "other",
    }
}

/// A digest of the object to apply (FNV-1a over its JSON).
pub fn digest(value: &serde_json::Value) -> u64 {
    super::names::fnv1a_64(value.to_string().as_bytes())
}
