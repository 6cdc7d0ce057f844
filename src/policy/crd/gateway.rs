//! How the operator runs a policy's gateway pods (`spec.gateway`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// The gateway pods' API port when `spec.gateway.port` is not set.
pub const DEFAULT_GATEWAY_PORT: i32 = 8080;
/// Their metrics port when `spec.gateway.metricsPort` is not set (9091 where `port` is 9090).
pub const DEFAULT_METRICS_PORT: i32 = 9090;

/// The gateway pods' metrics port: `metricsPort`, or 9090, or 9091 where the API has 9090.
pub fn metrics_port(gateway: Option<&GatewaySpec>) -> i32 {
    let port = gateway.and_then(|g| g.port).unwrap_or(DEFAULT_GATEWAY_PORT);
    match gateway.and_then(|g| g.metrics_port) {
        Some(p) => p,
        None if port == DEFAULT_METRICS_PORT => DEFAULT_METRICS_PORT + 1,
        None => DEFAULT_METRICS_PORT,
    }
}

/// How the operator runs the gateway pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.metricsPort) || self.metricsPort != (has(self.port) ? self.port : 8080)").message("metricsPort and port must differ (port defaults to 8080)").field_path(".metricsPort"))]
pub struct GatewaySpec {
    /// Number of gateway pods. Each pod measures and sheds on its own traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: Option<i32>,
    /// Gateway container image; defaults to the operator's `--gateway-image`. Another runs
    /// only if the operator's `--allowed-gateway-images` lists it (else `ImageNotAllowed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,
    /// Port the gateway listens on and its Service exposes (default 8080).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Port of the gateway pods' `/metrics` (default 9090; 9091 where `port` is 9090), apart
    /// from the API port so that whoever can reach the API cannot read model names, traffic
    /// and shedding; the pods' `prometheus.io/port` annotation names it. Not exposed by the
    /// Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub metrics_port: Option<i32>,
    /// Compute resources of the gateway container; a memory limit is always set (1Gi where
    /// none is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node selector of the gateway pods; only with the operator's
    /// `--allow-gateway-scheduling` (else `SchedulingNotAllowed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations of the gateway pods; only with the operator's `--allow-gateway-scheduling`
    /// (else `SchedulingNotAllowed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
}
