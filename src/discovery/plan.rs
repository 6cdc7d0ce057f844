//! What discovery a policy gets, said in its status by the operator (condition `Discovery`):
//! whether its gateways follow a Service's EndpointSlices, and if not, why, so a user who
//! expected a fleet sees what to change without reading gateway logs.

use super::ServiceRef;
use crate::policy::UpstreamConfig;

/// The `Discovery` condition of a policy: its status, reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The gateways follow the EndpointSlices of a Service (and the operator lets them).
    pub discovers: bool,
    pub reason: &'static str,
    pub message: String,
}

/// What discovery the upstream of a policy in `namespace` gets.
pub fn plan(upstream: &UpstreamConfig, namespace: &str) -> Plan {
    let says = |discovers, reason, message: String| Plan {
        discovers,
        reason,
        message,
    };
    let served = "the gateways send every request to its URL, one upstream";
    if let [_, _, ..] = upstream.endpoints.as_slice() {
        let n = upstream.endpoints.len();
        let m = format!("spec.upstream.endpoints lists {n} endpoints: the gateways route to them");
        return says(false, "EndpointsListed", m);
    }
    let Some(url) = upstream.endpoints.first() else {
        return says(false, "NotAService", "no upstream URL".to_owned());
    };
    if !upstream.discovery {
        let m = format!("spec.upstream.discovery is None: {served}");
        return says(false, "Disabled", m);
    }
    if url.scheme_str() == Some("https") {
        let m = format!(
            "{url} is https, which is not discovered (an engine pod's certificate names the Service, not the pod's IP): {served}"
        );
        return says(false, "Https", m);
    }
    match ServiceRef::of(url, upstream.port_name.as_deref(), Some(namespace)) {
        Some(s) if s.namespace == namespace => {
            let m = format!(
                "the gateways follow the EndpointSlices of Service {} and route to each ready pod",
                s.describe()
            );
            says(true, "EndpointSlices", m)
        }
        Some(s) => {
            let m = format!(
                "Service {} is not in the policy's namespace {namespace}, where the gateways may watch EndpointSlices: {served}",
                s.describe()
            );
            says(false, "OtherNamespace", m)
        }
        None => {
            let m = format!(
                "{url} does not name a Service of the cluster (http://<service>.<namespace>.svc[.cluster.local], or http://<service> of this namespace): {served}"
            );
            says(false, "NotAService", m)
        }
    }
}
