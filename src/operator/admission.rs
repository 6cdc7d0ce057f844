//! What a policy may put into its gateway pods beyond what the operator itself chooses.
//!
//! Whoever may write a RateLimitPolicy must not get more than a gateway: the pods run with the
//! gateway's identity and with the Secrets the policy was given mounted. So the image must be
//! one the cluster admin allows (by default only the operator's own `--gateway-image`), and
//! placing the pods with `nodeSelector` and `tolerations` (onto control-plane nodes, say) is
//! the admin's to allow. A policy asking for more is not accepted (`Accepted=False` with the
//! reason), and nothing is applied for it.

use crate::policy::crd::GatewaySpec;

/// What the cluster admin lets policies set in their gateway pods (operator flags).
#[derive(Debug, Clone, Default)]
pub struct PodAdmission {
    /// The operator's own gateway image: always allowed.
    pub default_image: String,
    /// Other images a policy may name: exact references, or prefixes ending in `*`
    /// (`registry.example/sluice:*`).
    pub allowed_images: Vec<String>,
    /// Whether policies may set `nodeSelector` and `tolerations`.
    pub allow_scheduling: bool,
}

/// Why the operator does not accept a policy's gateway settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The condition reason: `ImageNotAllowed` or `SchedulingNotAllowed`.
    pub reason: &'static str,
    pub message: String,
}

impl PodAdmission {
    /// Whether `image` may run as a gateway.
    pub fn image_allowed(&self, image: &str) -> bool {
        image == self.default_image
            || self
                .allowed_images
                .iter()
                .any(|a| match a.strip_suffix('*') {
                    Some(prefix) => image.starts_with(prefix),
                    None => image == a,
                })
    }

    /// Checks what the policy's `spec.gateway` asks for.
    pub fn check(&self, gateway: Option<&GatewaySpec>) -> Result<(), Refusal> {
        let Some(g) = gateway else { return Ok(()) };
        if let Some(image) = g.image.as_deref().filter(|i| !self.image_allowed(i)) {
            return Err(Refusal {
                reason: "ImageNotAllowed",
                message: format!(
                    "spec.gateway.image {image:?} is not an image the operator runs: only its own \
                     --gateway-image and the ones its --allowed-gateway-images list; remove \
                     spec.gateway.image or ask the cluster admin to allow it"
                ),
            });
        }
        let selects = g.node_selector.as_ref().is_some_and(|m| !m.is_empty());
        let tolerates = g.tolerations.as_ref().is_some_and(|t| !t.is_empty());
        if !self.allow_scheduling && (selects || tolerates) {
            return Err(Refusal {
                reason: "SchedulingNotAllowed",
                message: "spec.gateway.nodeSelector and spec.gateway.tolerations are the cluster \
                          admin's to allow (operator flag --allow-gateway-scheduling); remove \
                          them"
                    .to_owned(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(allowed: &[&str], allow_scheduling: bool) -> PodAdmission {
        PodAdmission {
            default_image: "ghcr.io/sluice-dev/sluice:1.0".into(),
            allowed_images: allowed.iter().map(|s| s.to_string()).collect(),
            allow_scheduling,
        }
    }

    fn gateway(yaml: &str) -> GatewaySpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn only_the_operators_image_and_the_allowed_ones_run() {
        let a = admission(
            &["registry.example/sluice:*", "mirror.example/sluice:1.0"],
            false,
        );
        assert_eq!(a.check(None), Ok(()));
        for ok in [
            "ghcr.io/sluice-dev/sluice:1.0",
            "registry.example/sluice:1.1",
            "mirror.example/sluice:1.0",
        ] {
            assert_eq!(
                a.check(Some(&gateway(&format!("image: {ok}")))),
                Ok(()),
                "{ok}"
            );
        }
        for bad in [
            "attacker.example/shell:latest",
            "ghcr.io/sluice-dev/sluice:1.0-evil",
            "mirror.example/sluice:1.01",
            "registry.example/other:1",
        ] {
            let r = a
                .check(Some(&gateway(&format!("image: {bad}"))))
                .unwrap_err();
            assert_eq!(r.reason, "ImageNotAllowed", "{bad}");
            assert!(r.message.contains(bad), "{}", r.message);
        }
        // By default, nothing but the operator's own image.
        let strict = admission(&[], false);
        assert!(!strict.image_allowed("registry.example/sluice:1.1"));
    }

    #[test]
    fn placement_is_the_admins_to_allow() {
        let control_plane = "nodeSelector: {node-role.kubernetes.io/control-plane: ''}";
        let tolerate_all = "tolerations: [{operator: Exists}]";
        for spec in [control_plane, tolerate_all] {
            let r = admission(&[], false)
                .check(Some(&gateway(spec)))
                .unwrap_err();
            assert_eq!(r.reason, "SchedulingNotAllowed", "{spec}");
            assert_eq!(admission(&[], true).check(Some(&gateway(spec))), Ok(()));
        }
        // Empty ones ask for nothing.
        let empty = gateway("nodeSelector: {}\ntolerations: []");
        assert_eq!(admission(&[], false).check(Some(&empty)), Ok(()));
    }
}
