//! Builders of the Kubernetes objects a RateLimitPolicy's gateway needs. The same builders are
//! used by the operator and by the tests that run a gateway under exactly this identity.

use std::collections::BTreeMap;

use kube::api::ObjectMeta;

use crate::policy::duration::format_duration;

pub use super::names::{fnv1a_64, gateway_name, label_value};

/// Where the gateway pods find the upstream API key (a projected Secret).
pub const API_KEY_DIR: &str = "/var/run/sluice/upstream";
/// The key's file name in [`API_KEY_DIR`].
pub const API_KEY_FILE: &str = "api-key";

/// Where the gateway pods find the clients' API keys (the `spec.clientAuth` Secret, one file
/// per client).
pub const CLIENT_KEYS_DIR: &str = "/var/run/sluice/clients";

/// Label on every object the operator creates for a policy.
pub const POLICY_LABEL: &str = "sluice.dev/policy";

/// Label of the gateway pods carrying their policy's UID: the gateway Service, the PDB and new
/// Deployments select by it. [`POLICY_LABEL`] cannot be unique: a name over 63 characters is
/// shortened to a prefix and a hash, and another policy may be named exactly that.
pub const POLICY_UID_LABEL: &str = "sluice.dev/policy-uid";

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
        (POLICY_LABEL.to_owned(), label_value(policy)),
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

mod rbac;
pub use rbac::{gateway_role, gateway_role_binding, gateway_service_account};

#[cfg(test)]
mod tests;

/// Default gateway port.
pub const GATEWAY_PORT: i32 = crate::policy::crd::DEFAULT_GATEWAY_PORT;

/// What the pod template is built from (nothing else: thresholds, time constants, mode and
/// shedding reach the pods through the watch and must not roll them).
#[derive(Debug, Clone)]
pub struct GatewayPodSpec<'a> {
    pub namespace: &'a str,
    pub policy: &'a str,
    /// The policy's UID (the pods' [`POLICY_UID_LABEL`]).
    pub uid: &'a str,
    pub image: &'a str,
    /// What the gateway serves (`--upstream` each): the policy's endpoints, or its URL.
    pub upstreams: &'a [http::Uri],
    pub port: i32,
    pub replicas: i32,
    pub gateway: Option<&'a crate::policy::crd::GatewaySpec>,
    pub api_key: Option<&'a crate::policy::crd::SecretKeyRef>,
    /// The Secret of the clients' API keys (`spec.clientAuth`).
    pub client_keys: Option<&'a str>,
    /// The policy's upstream timeout: the longest a request may run, so the longest drain.
    pub upstream_timeout: std::time::Duration,
}

/// How long a terminating gateway keeps accepting while endpoints catch up (`--drain-delay`).
pub const DRAIN_DELAY_SECS: u64 = 5;

/// The labels that select one policy's gateway pods, and only its own.
pub fn pod_selector(uid: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "sluice-gateway".to_owned(),
        ),
        (POLICY_UID_LABEL.to_owned(), uid.to_owned()),
    ])
}

/// Keeps the selector of a Deployment created before [`POLICY_UID_LABEL`] existed (selectors
/// are immutable, and an apply that changes one is refused). Its pods carry the UID label
/// too, so the Service and the PDB select them by it; the Deployment's own selector stays as
/// it was until the Deployment is deleted and the operator creates it again.
pub fn keep_selector(
    new: &mut k8s_openapi::api::apps::v1::Deployment,
    existing: &k8s_openapi::api::apps::v1::Deployment,
) {
    let Some(old) = existing.spec.as_ref().map(|s| s.selector.clone()) else {
        return;
    };
    if let Some(spec) = new.spec.as_mut() {
        spec.selector = old;
    }
}

/// Resources of gateway pods whose policy sets none: a request that schedules them anywhere and
/// a memory limit, so a gateway under a flood of large bodies is OOM-killed alone instead of
/// starving its node.
pub fn default_resources() -> k8s_openapi::api::core::v1::ResourceRequirements {
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let q = |s: &str| Quantity(s.to_owned());
    k8s_openapi::api::core::v1::ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), q("100m")),
            ("memory".to_owned(), q("128Mi")),
        ])),
        limits: Some(BTreeMap::from([("memory".to_owned(), q("1Gi"))])),
        ..Default::default()
    }
}

/// A policy's resources with a memory limit whatever it says: without one, a gateway pod could
/// take a node's memory (the default 1Gi is added where the policy sets none).
fn with_memory_limit(
    mut r: k8s_openapi::api::core::v1::ResourceRequirements,
) -> k8s_openapi::api::core::v1::ResourceRequirements {
    let default = default_resources().limits.unwrap_or_default();
    let limits = r.limits.get_or_insert_with(BTreeMap::new);
    if !limits.contains_key("memory") {
        limits.insert("memory".to_owned(), default["memory"].clone());
    }
    r
}

fn drain_secs(timeout: std::time::Duration) -> u64 {
    timeout.as_secs_f64().ceil().max(1.0) as u64
}

/// The gateway Deployment: hardened pods that follow their policy through the API.
pub fn gateway_deployment(p: &GatewayPodSpec<'_>) -> k8s_openapi::api::apps::v1::Deployment {
    use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
    use k8s_openapi::api::core::v1::{
        Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath,
        ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
        ProjectedVolumeSource, SeccompProfile, SecretProjection, SecretVolumeSource,
        SecurityContext, Volume, VolumeMount, VolumeProjection,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("http".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        ..Probe::default()
    };
    let env = vec![EnvVar {
        name: "POD_NAMESPACE".to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.namespace".to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }];
    // /metrics on a port of its own: whoever reaches the API port (every client) does not
    // read model names, traffic and shedding.
    let metrics_port = crate::policy::crd::metrics_port(p.gateway);
    let mut args = vec![
        "gateway".to_owned(),
        "--policy".to_owned(),
        p.policy.to_owned(),
        "--listen".to_owned(),
        format!("0.0.0.0:{}", p.port),
        format!("--metrics-listen=0.0.0.0:{metrics_port}"),
        format!("--drain-delay={DRAIN_DELAY_SECS}s"),
        format!(
            "--drain-timeout={}",
            format_duration(std::time::Duration::from_secs(drain_secs(
                p.upstream_timeout
            )))
        ),
    ];
    // The operator names the upstreams, after checking them against the Secret's hosts: an
    // edited policy cannot send the key elsewhere before the operator has looked.
    for url in p.upstreams {
        args.extend(["--upstream".to_owned(), url.to_string()]);
    }
    // The key is a file from a projected Secret, not an env var: the kubelet updates the file
    // when the Secret rotates and the gateway re-reads it, with no restart.
    let (mut volumes, mut mounts) = (Vec::new(), Vec::new());
    if let Some(key) = p.api_key {
        volumes.push(Volume {
            name: "upstream-api-key".to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    secret: Some(SecretProjection {
                        name: key.name.clone(),
                        items: Some(vec![KeyToPath {
                            key: key.key.clone(),
                            path: API_KEY_FILE.to_owned(),
                            ..KeyToPath::default()
                        }]),
                        optional: Some(false),
                    }),
                    ..VolumeProjection::default()
                }]),
                default_mode: Some(0o440),
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "upstream-api-key".to_owned(),
            mount_path: API_KEY_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        args.push("--upstream-api-key-file".to_owned());
        args.push(format!("{API_KEY_DIR}/{API_KEY_FILE}"));
    }
    // The clients' keys: the whole Secret, one file per client, updated in place by the
    // kubelet and re-read by the gateway.
    if let Some(secret) = p.client_keys {
        volumes.push(Volume {
            name: "client-keys".to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.to_owned()),
                default_mode: Some(0o440),
                optional: Some(false),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "client-keys".to_owned(),
            mount_path: CLIENT_KEYS_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        args.push(format!("--client-keys-dir={CLIENT_KEYS_DIR}"));
    }
    let mut pod_labels = labels(p.policy);
    pod_labels.insert(POLICY_UID_LABEL.to_owned(), p.uid.to_owned());
    pod_labels.insert(
        "app.kubernetes.io/instance".to_owned(),
        label_value(p.policy),
    );
    let annotations = BTreeMap::from([
        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
        ("prometheus.io/port".to_owned(), metrics_port.to_string()),
        ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
    ]);
    let container = Container {
        name: "gateway".to_owned(),
        image: Some(p.image.to_owned()),
        args: Some(args),
        env: Some(env),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".to_owned()),
                container_port: p.port,
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".to_owned()),
                container_port: metrics_port,
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(probe("/readyz", 5)),
        liveness_probe: Some(probe("/healthz", 10)),
        resources: Some(with_memory_limit(
            p.gateway
                .and_then(|g| g.resources.clone())
                .unwrap_or_else(default_resources),
        )),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Capabilities::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..SeccompProfile::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    Deployment {
        metadata: meta(p.namespace, p.policy),
        spec: Some(DeploymentSpec {
            replicas: Some(p.replicas),
            selector: LabelSelector {
                match_labels: Some(pod_selector(p.uid)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(gateway_name(p.policy)),
                    automount_service_account_token: Some(true),
                    // The drain delay, then every request up to the upstream timeout, then a
                    // margin before the kubelet's SIGKILL.
                    termination_grace_period_seconds: Some(
                        (DRAIN_DELAY_SECS + drain_secs(p.upstream_timeout) + 5) as i64,
                    ),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    node_selector: p.gateway.and_then(|g| g.node_selector.clone()),
                    tolerations: p.gateway.and_then(|g| g.tolerations.clone()),
                    containers: vec![container],
                    volumes: (!volumes.is_empty()).then_some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// The gateway Service (ClusterIP, port `http`).
pub fn gateway_service(
    namespace: &str,
    policy: &str,
    uid: &str,
    port: i32,
) -> k8s_openapi::api::core::v1::Service {
    use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    Service {
        metadata: meta(namespace, policy),
        spec: Some(ServiceSpec {
            selector: Some(pod_selector(uid)),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port,
                target_port: Some(IntOrString::String("http".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// At most one gateway pod down at a time during voluntary disruptions (replicas > 1).
pub fn gateway_pdb(
    namespace: &str,
    policy: &str,
    uid: &str,
) -> k8s_openapi::api::policy::v1::PodDisruptionBudget {
    use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    PodDisruptionBudget {
        metadata: meta(namespace, policy),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(pod_selector(uid)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// The gateway's in-cluster base URL.
pub fn gateway_endpoint(namespace: &str, policy: &str, port: i32) -> String {
    format!("http://{}.{namespace}.svc:{port}/v1", gateway_name(policy))
}
