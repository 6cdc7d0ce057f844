//! Builders of the Kubernetes objects a RateLimitPolicy's gateway needs. The same builders are
//! used by the operator and by the tests that run a gateway under exactly this identity.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::ObjectMeta;

/// Label on every object the operator creates for a policy.
pub const POLICY_LABEL: &str = "sluice.dev/policy";

/// Name of the gateway's Deployment, Service, ServiceAccount, Role and RoleBinding for a
/// policy: `<policy>-sluice`, shortened with a hash when it would exceed a DNS-1035 label
/// (63 characters; Service names must be one).
pub fn gateway_name(policy: &str) -> String {
    let name = format!("{policy}-sluice");
    if name.len() <= 63 {
        return name;
    }
    use std::hash::BuildHasher;
    let h = crate::limiter::FxBuildHasher::default().hash_one(policy);
    let head: String = policy.chars().take(45).collect();
    format!(
        "{}-{:08x}-sluice",
        head.trim_end_matches(['-', '.']),
        h as u32
    )
}

fn labels(policy: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "sluice-gateway".to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "sluice-operator".to_owned(),
        ),
        (POLICY_LABEL.to_owned(), policy.to_owned()),
    ])
}

fn meta(namespace: &str, policy: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(gateway_name(policy)),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels(policy)),
        ..ObjectMeta::default()
    }
}

/// The gateway pods' ServiceAccount (no API token automounted unless the pod asks).
pub fn gateway_service_account(namespace: &str, policy: &str) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(namespace, policy),
        ..ServiceAccount::default()
    }
}

/// The gateway may get, list and watch its own RateLimitPolicy and nothing else:
/// `resourceNames` narrows list and watch too, because the gateway's watch selects the object
/// with `fieldSelector=metadata.name=<policy>`.
pub fn gateway_role(namespace: &str, policy: &str) -> Role {
    Role {
        metadata: meta(namespace, policy),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["sluice.dev".to_owned()]),
            resources: Some(vec!["ratelimitpolicies".to_owned()]),
            resource_names: Some(vec![policy.to_owned()]),
            verbs: vec!["get".to_owned(), "list".to_owned(), "watch".to_owned()],
            ..PolicyRule::default()
        }]),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_a_dns_label_and_stay_distinct() {
        assert_eq!(gateway_name("llama"), "llama-sluice");
        let long = "a".repeat(200);
        let n = gateway_name(&long);
        assert!(n.len() <= 63, "{n}");
        assert!(n.ends_with("-sluice"));
        assert_ne!(gateway_name(&format!("{long}x")), n);
    }

    #[test]
    fn the_role_is_narrowed_to_the_policy() {
        let r = gateway_role("ns", "llama");
        let rule = &r.rules.unwrap()[0];
        assert_eq!(
            rule.resource_names.as_deref(),
            Some(&["llama".to_owned()][..])
        );
        assert_eq!(rule.verbs, ["get", "list", "watch"]);
        let b = gateway_role_binding("ns", "llama");
        assert_eq!(b.role_ref.name, "llama-sluice");
        assert_eq!(b.subjects.unwrap()[0].name, "llama-sluice");
    }
}
