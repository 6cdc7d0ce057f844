//! One reconcile of one RateLimitPolicy: validate, write `Accepted`, apply the owned
//! objects with server-side apply, write status; failures are counted by what failed and
//! retried with exponential backoff per policy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};

use super::metrics::OperatorMetrics;
use super::secret_use::{self, SecretUse};
use super::{FIELD_MANAGER, objects, status};
use crate::policy::{PolicyConfig, RateLimitPolicy};
use apply::{apply, apply_keeping, ours};

/// What reconcile needs.
pub struct Context {
    pub client: Client,
    pub gateway_image: String,
    /// What policies may set in their pods beyond the operator's defaults.
    pub admission: super::admission::PodAdmission,
    pub recorder: Recorder,
    pub metrics: OperatorMetrics,
    /// Consecutive failures per policy, for the retry backoff.
    pub failures: DashMap<ObjectRef<RateLimitPolicy>, u32>,
    /// The owned objects' watch caches and what was last applied to them.
    pub owners: super::owned::Owners,
}

/// Why a reconcile failed (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("the policy has no namespace")]
    NoNamespace,
    /// A request about an owned object (or a Secret's metadata) failed: the apply, the
    /// existence check before a first apply, or a delete.
    #[error("the API request for {kind} {name} failed: {source}")]
    Api {
        kind: String,
        name: String,
        source: kube::Error,
    },
    #[error("cannot update the policy status: {0}")]
    Status(kube::Error),
    #[error(
        "{kind} {name} already exists and is not owned by this RateLimitPolicy; it is left alone (rename or delete it)"
    )]
    NameConflict { kind: String, name: String },
    #[error("Secret {secret} is not used: {why}; the gateway runs without it")]
    SecretNotAllowed { secret: String, why: String },
}

impl ReconcileError {
    /// The `Ready=False` reason this error shows in the policy's status, if it is about the
    /// owned objects.
    pub fn ready_reason(&self) -> Option<&'static str> {
        match self {
            ReconcileError::Api { .. } => Some("ApplyFailed"),
            ReconcileError::NameConflict { .. } => Some("NameConflict"),
            ReconcileError::SecretNotAllowed { .. } => Some("SecretNotAllowed"),
            ReconcileError::NoNamespace | ReconcileError::Status(_) => None,
        }
    }

    /// The `error` label of `sluice_operator_reconciles_total`: the kind of the object that
    /// failed to apply, `status`, or `namespace`.
    pub fn metric_label(&self) -> &str {
        match self {
            ReconcileError::NoNamespace => "namespace",
            ReconcileError::Api { kind, .. } => kind,
            ReconcileError::Status(_) => "status",
            ReconcileError::NameConflict { .. } => "conflict",
            ReconcileError::SecretNotAllowed { .. } => "secret",
        }
    }
}

/// Checks that the Secret `secret` opted in to `policy` for each of `uses`; `Ok(Some(refusal))`
/// when it did not (or does not exist). Reads only the Secret's metadata, once.
async fn check_secret(
    client: &Client,
    ns: &str,
    policy: &str,
    secret: &str,
    uses: &[SecretUse<'_>],
) -> Result<Option<ReconcileError>, ReconcileError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let meta = api
        .get_metadata_opt(secret)
        .await
        .map_err(|source| ReconcileError::Api {
            kind: "Secret".into(),
            name: secret.to_owned(),
            source,
        })?;
    let why = match meta {
        None => "it does not exist".to_owned(),
        Some(m) => match uses
            .iter()
            .try_for_each(|u| secret_use::allows(m.annotations(), policy, *u))
        {
            Ok(()) => return Ok(None),
            Err(why) => why,
        },
    };
    Ok(Some(ReconcileError::SecretNotAllowed {
        secret: secret.to_owned(),
        why,
    }))
}

/// Publishes a Warning Event on the policy (best effort; the note is cut at 1000 characters).
async fn warn(ctx: &Context, policy: &RateLimitPolicy, reason: &str, action: &str, note: &str) {
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    let _ = ctx.recorder.publish(&event, &policy.object_ref(&())).await;
}

pub(super) async fn reconcile(
    policy: Arc<RateLimitPolicy>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let start = Instant::now();
    let result = reconcile_policy(&policy, &ctx).await;
    ctx.metrics.duration.observe(start.elapsed().as_secs_f64());
    match &result {
        Ok((_, valid)) => {
            ctx.metrics
                .reconciled(if *valid { "success" } else { "invalid" }, "");
            ctx.failures.remove(&ObjectRef::from_obj(&*policy));
        }
        Err(e) => {
            ctx.metrics.reconciled("error", e.metric_label());
            let reason = match e {
                ReconcileError::NameConflict { .. } => "NameConflict",
                _ => "ReconcileFailed",
            };
            warn(&ctx, &policy, reason, "Reconcile", &e.to_string()).await;
        }
    }
    result.map(|(a, _)| a)
}

async fn reconcile_policy(
    policy: &RateLimitPolicy,
    ctx: &Context,
) -> Result<(Action, bool), ReconcileError> {
    let ns = policy.namespace().ok_or(ReconcileError::NoNamespace)?;
    let name = policy.name_any();
    if policy.metadata.deletion_timestamp.is_some() {
        // Being deleted: the garbage collector removes what it owned; re-applying would fight it.
        return Ok((Action::await_change(), true));
    }
    let generation = policy.metadata.generation;
    let previous = policy
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let api: Api<RateLimitPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    let status_pp = PatchParams::apply(FIELD_MANAGER).force();
    let now = Time(k8s_openapi::jiff::Timestamp::now());

    let config = match PolicyConfig::try_from(&policy.spec) {
        Ok(c) => c,
        Err(e) => {
            let message = e.to_string();
            tracing::warn!(policy = %format!("{ns}/{name}"), error = %message, "policy not accepted");
            let Some(status) = status::invalid(generation, &message, &previous, &now) else {
                return Ok((Action::await_change(), false));
            };
            api.patch_status(&name, &status_pp, &Patch::Apply(&status))
                .await
                .map_err(ReconcileError::Status)?;
            warn(ctx, policy, "InvalidSpec", "Validate", &message).await;
            return Ok((Action::await_change(), false));
        }
    };

    if let Err(refusal) = ctx.admission.check(policy.spec.gateway.as_ref()) {
        tracing::warn!(policy = %format!("{ns}/{name}"), reason = refusal.reason, error = %refusal.message, "policy not accepted");
        let Some(status) = status::not_allowed(
            generation,
            refusal.reason,
            &refusal.message,
            &previous,
            &now,
        ) else {
            return Ok((Action::await_change(), false));
        };
        api.patch_status(&name, &status_pp, &Patch::Apply(&status))
            .await
            .map_err(ReconcileError::Status)?;
        warn(ctx, policy, refusal.reason, "Validate", &refusal.message).await;
        return Ok((Action::await_change(), false));
    }

    if let Some(status) = status::accepted(generation, &previous, &now) {
        api.patch_status(&name, &status_pp, &Patch::Apply(&status))
            .await
            .map_err(ReconcileError::Status)?;
    }
    // What discovery the gateways get: the Role's grant and the status condition.
    let discovery = crate::discovery::plan(&config.upstream, &ns);
    let applied = apply_objects(policy, ctx, &ns, (&config, discovery.discovers)).await;
    let (deployment, replicas, port) = match applied {
        Ok(a) => a,
        Err(e) => {
            if let Some(reason) = e.ready_reason() {
                let message: String = e.to_string().chars().take(1000).collect();
                let status = status::not_applied(generation, &previous, reason, &message, &now);
                if let Err(se) = api
                    .patch_status(&name, &status_pp, &Patch::Apply(&status))
                    .await
                {
                    tracing::warn!(policy = %format!("{ns}/{name}"), error = %se, "cannot record the apply failure in status");
                }
            }
            return Err(e);
        }
    };
    let status = status::reconciled(
        generation,
        &previous,
        &deployment.status.clone().unwrap_or_default(),
        replicas,
        &objects::gateway_endpoint(&ns, &name, port),
        &discovery,
        &now,
    );
    // A resync of an unchanged policy writes nothing.
    if !status::unchanged(policy.status.as_ref(), &status) {
        api.patch_status(&name, &status_pp, &Patch::Apply(&status))
            .await
            .map_err(ReconcileError::Status)?;
    }
    Ok((Action::requeue(Duration::from_secs(300)), true))
}

/// Applies the owned objects (the Role granting EndpointSlices when the gateways
/// `discovers`); returns the Deployment as applied, the replicas and the port.
async fn apply_objects(
    policy: &RateLimitPolicy,
    ctx: &Context,
    ns: &str,
    (config, discovers): (&PolicyConfig, bool),
) -> Result<(Deployment, i32, i32), ReconcileError> {
    let ns = ns.to_owned();
    let name = policy.name_any();
    let owner = policy
        .controller_owner_ref(&())
        .expect("a stored policy has a name and uid");
    let gateway = policy.spec.gateway.as_ref();
    let port = gateway
        .and_then(|g| g.port)
        .unwrap_or(objects::GATEWAY_PORT);
    let replicas = gateway.and_then(|g| g.replicas).unwrap_or(1);
    let image = gateway
        .and_then(|g| g.image.as_deref())
        .unwrap_or(&ctx.gateway_image);
    let c = &ctx.client;
    // A Secret reference counts only where the Secret opted in, for every endpoint the key
    // would be sent to: otherwise whoever may write a policy could send any Secret of the
    // namespace to an upstream URL of their choosing.
    let (api_key, mut refused) = match config.upstream.api_key_secret.as_ref() {
        None => (None, None),
        Some(r) => {
            let uses: Vec<SecretUse> = (config.upstream.endpoints.iter())
                .map(|upstream| SecretUse::UpstreamKey {
                    key: &r.key,
                    upstream,
                })
                .collect();
            match check_secret(c, &ns, &name, &r.name, &uses).await? {
                None => (Some(r), None),
                Some(refusal) => (None, Some(refusal)),
            }
        }
    };
    // The clients' keys are read by the gateway only, but the same opt-in applies: a policy
    // must not make the gateway mount a Secret it was not given. Without it the gateway has
    // no keys and (auth being required) refuses every request: it fails closed.
    let client_keys = match config.client_auth.as_ref() {
        None => None,
        Some(a) => match check_secret(c, &ns, &name, &a.secret, &[SecretUse::ClientKeys]).await? {
            None => Some(a.secret.as_str()),
            Some(refusal) => {
                refused = refused.or(Some(refusal));
                None
            }
        },
    };
    apply(
        ctx,
        &ns,
        objects::gateway_service_account(&ns, &name),
        &owner,
    )
    .await?;
    // Discovery of a Service in the policy's namespace; one elsewhere needs a Role there,
    // which the operator cannot own (owner references stay within a namespace).
    let role = objects::gateway_role(&ns, &name, discovers);
    apply(ctx, &ns, role, &owner).await?;
    apply(ctx, &ns, objects::gateway_role_binding(&ns, &name), &owner).await?;
    let uid = &owner.uid;
    apply(
        ctx,
        &ns,
        objects::gateway_service(&ns, &name, uid, port),
        &owner,
    )
    .await?;
    let deployment = apply_keeping(
        ctx,
        &ns,
        objects::gateway_deployment(&objects::GatewayPodSpec {
            namespace: &ns,
            policy: &name,
            uid,
            image,
            upstreams: &config.upstream.endpoints,
            port,
            replicas,
            gateway,
            api_key,
            client_keys,
            upstream_timeout: config.upstream.timeout,
        }),
        &owner,
        objects::keep_selector,
    )
    .await?;
    let pdb_name = objects::gateway_name(&name);
    if status::wants_pdb(replicas) {
        apply(ctx, &ns, objects::gateway_pdb(&ns, &name, uid), &owner).await?;
    } else {
        // Only a PDB this policy owns is removed; someone else's stays (and is a conflict).
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(c.clone(), &ns);
        if let Some(pdb) = ctx.owners.cached::<PodDisruptionBudget>(&ns, &pdb_name) {
            ours(&*pdb, &owner)?;
            match pdbs.delete(&pdb_name, &DeleteParams::default()).await {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(source) => {
                    return Err(ReconcileError::Api {
                        kind: "PodDisruptionBudget".into(),
                        name: pdb_name,
                        source,
                    });
                }
            }
        }
    }
    match refused {
        Some(e) => Err(e),
        None => Ok((deployment, replicas, port)),
    }
}

/// Forgets the failure counts of policies that no longer exist (`live` says which do). The
/// controller never reconciles a deleted policy (it is gone from its store, and sluice puts no
/// finalizer on policies), so a policy deleted while failing would otherwise keep its entry
/// for as long as the operator runs.
pub(super) fn prune_failures(
    failures: &DashMap<ObjectRef<RateLimitPolicy>, u32>,
    live: impl Fn(&ObjectRef<RateLimitPolicy>) -> bool,
) {
    failures.retain(|policy, _| live(policy));
}

pub(super) fn error_policy(
    policy: Arc<RateLimitPolicy>,
    error: &ReconcileError,
    ctx: Arc<Context>,
) -> Action {
    let mut n = ctx
        .failures
        .entry(ObjectRef::from_obj(&*policy))
        .or_insert(0);
    *n += 1;
    let delay = Duration::from_millis(500 * 2u64.saturating_pow((*n).min(10)))
        .min(Duration::from_secs(300));
    tracing::warn!(policy = %format!("{}/{}", policy.namespace().unwrap_or_default(), policy.name_any()), %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

mod apply;
#[cfg(test)]
mod mock_api;
#[cfg(test)]
mod mocked;
#[cfg(test)]
mod tests;
