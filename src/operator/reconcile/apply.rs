//! Server-side apply of the objects a policy owns, never over an object it does not own.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::super::FIELD_MANAGER;
use super::ReconcileError;

pub(super) async fn apply<K>(
    client: &Client,
    ns: &str,
    obj: K,
    owner: &OwnerReference,
) -> Result<K, ReconcileError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    apply_keeping(client, ns, obj, owner, |_, _| {}).await
}

/// Server-side applies `obj` after `keep` has taken from the existing object (ours) what
/// cannot change.
pub(super) async fn apply_keeping<K>(
    client: &Client,
    ns: &str,
    mut obj: K,
    owner: &OwnerReference,
    keep: impl FnOnce(&mut K, &K),
) -> Result<K, ReconcileError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    obj.meta_mut().owner_references = Some(vec![owner.clone()]);
    let name = obj.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    if let Some(existing) = ensure_ours(&api, &name, owner).await? {
        keep(&mut obj, &existing);
    }
    let mut value = serde_json::to_value(&obj).expect("object serializes");
    value["apiVersion"] = json!(K::api_version(&()));
    value["kind"] = json!(K::kind(&()));
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&value),
    )
    .await
    .map_err(|source| ReconcileError::Apply {
        kind: K::kind(&()).to_string(),
        name,
        source,
    })
}

/// Fails with [`ReconcileError::NameConflict`] when an object called `name` exists and this
/// policy is not its controller: it is neither overwritten nor, later, garbage-collected.
/// Returns the object when it exists (and is ours).
pub(super) async fn ensure_ours<K>(
    api: &Api<K>,
    name: &str,
    owner: &OwnerReference,
) -> Result<Option<K>, ReconcileError>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let existing = api
        .get_opt(name)
        .await
        .map_err(|source| ReconcileError::Apply {
            kind: K::kind(&()).to_string(),
            name: name.to_owned(),
            source,
        })?;
    let Some(existing) = existing else {
        return Ok(None);
    };
    let ours = existing
        .owner_references()
        .iter()
        .any(|r| r.uid == owner.uid && r.controller == Some(true));
    if !ours {
        return Err(ReconcileError::NameConflict {
            kind: K::kind(&()).to_string(),
            name: name.to_owned(),
        });
    }
    Ok(Some(existing))
}
