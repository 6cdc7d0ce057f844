//! Server-side apply of the objects a policy owns, never over an object it does not own.
//!
//! Whether an object exists and whose it is comes from the watch caches
//! ([`super::super::owned::Owners`]), not from a GET before every apply. An object the caches
//! do not have (a new policy's, or someone else's, which the label-filtered caches never hold)
//! is read once: someone else's is a `NameConflict`; a missing one is applied without force,
//! so one created in between with other values is a conflict too, not a takeover. An object
//! whose cached version is still the one the last apply returned, with the same desired
//! content, is not written at all; the operator's own objects are applied with force, so hand
//! edits are corrected.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::super::FIELD_MANAGER;
use super::super::owned::{Owned, digest};
use super::{Context, ReconcileError};

pub(super) async fn apply<K: Owned>(
    ctx: &Context,
    ns: &str,
    obj: K,
    owner: &OwnerReference,
) -> Result<K, ReconcileError> {
    apply_keeping(ctx, ns, obj, owner, |_, _| {}).await
}

fn failed<K: Owned>(name: &str) -> impl FnOnce(kube::Error) -> ReconcileError + '_ {
    move |source| ReconcileError::Api {
        kind: K::kind(&()).to_string(),
        name: name.to_owned(),
        source,
    }
}

/// Applies `obj` after `keep` has taken from the existing object (ours) what cannot change.
pub(super) async fn apply_keeping<K: Owned>(
    ctx: &Context,
    ns: &str,
    mut obj: K,
    owner: &OwnerReference,
    keep: impl Fn(&mut K, &K),
) -> Result<K, ReconcileError> {
    obj.meta_mut().owner_references = Some(vec![owner.clone()]);
    let name = obj.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    if let Some(existing) = ctx.owners.cached::<K>(ns, &name) {
        ours(&*existing, owner)?;
        keep(&mut obj, &existing);
        let value = apply_value(&obj);
        let d = digest(&value);
        if ctx.owners.unchanged(&*existing, d) {
            return Ok((*existing).clone());
        }
        return patch(ctx, &api, &name, &value, d, true).await;
    }
    let force = match api.get_opt(&name).await.map_err(failed::<K>(&name))? {
        // Ours, and the cache has not caught up yet.
        Some(existing) => {
            ours(&existing, owner)?;
            keep(&mut obj, &existing);
            true
        }
        None => false,
    };
    let value = apply_value(&obj);
    match patch(ctx, &api, &name, &value, digest(&value), force).await {
        Err(ReconcileError::Api {
            source: kube::Error::Api(e),
            ..
        }) if e.code == 409 => Err(ReconcileError::NameConflict {
            kind: K::kind(&()).to_string(),
            name,
        }),
        other => other,
    }
}

/// The object as an apply patch (with its apiVersion and kind).
fn apply_value<K: Owned>(obj: &K) -> serde_json::Value {
    let mut value = serde_json::to_value(obj).expect("object serializes");
    value["apiVersion"] = json!(K::api_version(&()));
    value["kind"] = json!(K::kind(&()));
    value
}

/// Server-side applies an object of this policy, remembering what the API server returned;
/// `force` takes fields another manager set (hand edits of the operator's own objects).
async fn patch<K: Owned>(
    ctx: &Context,
    api: &Api<K>,
    name: &str,
    value: &serde_json::Value,
    digest: u64,
    force: bool,
) -> Result<K, ReconcileError> {
    let mut params = PatchParams::apply(FIELD_MANAGER);
    params.force = force;
    let applied = api
        .patch(name, &params, &Patch::Apply(value))
        .await
        .map_err(failed::<K>(name))?;
    ctx.owners.record(&applied, digest);
    Ok(applied)
}

/// [`ReconcileError::NameConflict`] unless this policy is the object's controller: an object
/// that is not its own is neither overwritten nor, later, garbage-collected.
pub(super) fn ours<K: Owned>(existing: &K, owner: &OwnerReference) -> Result<(), ReconcileError> {
    let ours = existing
        .owner_references()
        .iter()
        .any(|r| r.uid == owner.uid && r.controller == Some(true));
    if ours {
        Ok(())
    } else {
        Err(ReconcileError::NameConflict {
            kind: K::kind(&()).to_string(),
            name: existing.name_any(),
        })
    }
}
