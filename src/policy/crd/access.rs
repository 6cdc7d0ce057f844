//! Who may use what: client API keys (`spec.clientAuth`), request priorities
//! (`spec.priority`) and the Secrets they and the upstream key name.

use std::collections::BTreeMap;

use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::default_true;

/// API keys the gateway accepts from its clients (`Authorization: Bearer <key>`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientAuthSpec {
    /// Secret in the policy's namespace with one entry per client: the entry's name is the
    /// client's name (as in `priority.clients`), its value that client's API key. The
    /// operator mounts it into the gateway pods; a rotated or added key reaches running pods
    /// without a restart. The Secret must carry the annotation
    /// `sluice.dev/client-keys-for` naming this policy.
    pub secret_ref: SecretRef,

    /// Refuse requests without a valid key with 401 (default). With false, requests without
    /// a key (or with an unknown one) are served as anonymous `standard` clients, and a valid
    /// key only raises a client to its class in `priority.clients`.
    #[serde(default = "default_true")]
    pub required: bool,
}

/// A Secret in the policy's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A request priority class.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PriorityClass {
    /// Never shed.
    Critical,
    /// Shed as the policy says.
    Standard,
    /// Shed first (its pressure counts 1.25× higher).
    Sheddable,
}

/// Request priorities. Any client may lower its own request to `sheddable`; a `critical`
/// claim (never shed) counts only where it can be trusted, otherwise it is served as
/// `standard`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PrioritySpec {
    /// Trust the client's `x-sluice-priority: critical`. Turn on only behind an
    /// authenticating proxy that sets the header itself and strips it from clients.
    #[serde(default)]
    pub trust_header: bool,

    /// Priority class of each client authenticated by `clientAuth`, by its name in the
    /// Secret: the class its requests get, and the highest one its `x-sluice-priority`
    /// header may claim. Clients not listed, and anonymous ones, are `standard`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 1000))]
    pub clients: BTreeMap<String, PriorityClass>,
}

/// A key in a Secret in the policy's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}
