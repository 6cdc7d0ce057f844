//! The gateway's identity: its ServiceAccount, and a Role with exactly what it reads.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};

use super::{gateway_name, meta};

/// The gateway pods' ServiceAccount (no API token automounted unless the pod asks).
pub fn gateway_service_account(namespace: &str, policy: &str) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(namespace, policy),
        ..ServiceAccount::default()
    }
}

/// The gateway may get, list and watch its own RateLimitPolicy and nothing else:
/// `resourceNames` narrows list and watch too, because the gateway's watch selects the object
/// with `fieldSelector=metadata.name=<policy>`. When it `discovers` the endpoints of a Service
/// of its own namespace ([`crate::discovery`]), it may also list and watch the namespace's
/// EndpointSlices (RBAC cannot narrow them to one Service's label).
pub fn gateway_role(namespace: &str, policy: &str, discovers: bool) -> Role {
    let mut rules = vec![PolicyRule {
        api_groups: Some(vec!["sluice.dev".to_owned()]),
        resources: Some(vec!["ratelimitpolicies".to_owned()]),
        resource_names: Some(vec![policy.to_owned()]),
        verbs: vec!["get".to_owned(), "list".to_owned(), "watch".to_owned()],
        ..PolicyRule::default()
    }];
    if discovers {
        rules.push(PolicyRule {
            api_groups: Some(vec!["discovery.k8s.io".to_owned()]),
            resources: Some(vec!["endpointslices".to_owned()]),
            verbs: vec!["list".to_owned(), "watch".to_owned()],
            ..PolicyRule::default()
        });
    }
    Role {
        metadata: meta(namespace, policy),
        rules: Some(rules),
    }
}

/// Binds [`gateway_role`] to [`gateway_service_account`].
pub fn gateway_role_binding(namespace: &str, policy: &str) -> RoleBinding {
    let name = gateway_name(policy);
    RoleBinding {
        metadata: meta(namespace, policy),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name,
            namespace: Some(namespace.to_owned()),
            ..Subject::default()
        }]),
    }
}
