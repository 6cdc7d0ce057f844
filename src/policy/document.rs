//! Reading a policy document ([`parse_policy_yaml`]), and the fields it names that a
//! RateLimitPolicy does not have.
//!
//! The API server drops them (its structural schema prunes unknown fields) and `kubectl`
//! warns. A policy file read by the gateway has no such warning, and serde ignores them: a
//! misspelt `clientAuht:`, or a `clientAuth:` indented outside `spec:`, would leave the gateway
//! running without client authentication. So the file source refuses them, naming each one,
//! checked against the CRD's own schema (generated from the Rust types, so never out of date).

use std::sync::OnceLock;

use kube::CustomResourceExt;
use serde_json::Value;

use super::config::{API_VERSION, FieldError, KIND, PolicyError};
use super::crd::RateLimitPolicy;

/// The top-level fields of any Kubernetes object.
const OBJECT_FIELDS: [&str; 5] = ["apiVersion", "kind", "metadata", "spec", "status"];

fn schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let crd = serde_json::to_value(RateLimitPolicy::crd()).expect("a CRD serializes");
        crd.pointer("/spec/versions/0/schema/openAPIV3Schema/properties/spec")
            .cloned()
            .expect("the CRD has a schema for spec")
    })
}

/// The JSON paths of the fields of `doc` that a RateLimitPolicy does not have.
pub fn unknown_fields(doc: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Value::Object(top) = doc {
        for (k, v) in top {
            if !OBJECT_FIELDS.contains(&k.as_str()) {
                out.push(k.clone());
            } else if k == "spec" {
                walk(v, schema(), "spec", &mut out);
            }
        }
    }
    out
}

fn walk(v: &Value, schema: &Value, path: &str, out: &mut Vec<String>) {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    match v {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties").filter(|a| a.is_object());
            if props.is_none() && extra.is_none() {
                return; // a schema this walk does not read (anyOf, free-form): no claim
            }
            for (k, child) in map {
                let sub = format!("{path}.{k}");
                match (props.and_then(|p| p.get(k)), extra) {
                    (Some(s), _) | (None, Some(s)) => walk(child, s, &sub, out),
                    (None, None) => out.push(sub),
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    walk(item, s, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

/// Reads a RateLimitPolicy YAML document (as `kubectl apply -f` takes it), refusing fields a
/// RateLimitPolicy does not have (see the module docs); the spec's rules are checked by
/// [`super::config::PolicyConfig`].
pub fn parse_policy_yaml(text: &str) -> Result<RateLimitPolicy, PolicyError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Header {
        #[serde(default)]
        api_version: String,
        #[serde(default)]
        kind: String,
    }
    let header: Header =
        serde_yaml::from_str(text).map_err(|e| PolicyError::Yaml(e.to_string()))?;
    if header.api_version != API_VERSION || header.kind != KIND {
        return Err(PolicyError::WrongKind {
            api_version: header.api_version,
            kind: header.kind,
        });
    }
    // Typed first, so a type error names its line; then the names the types ignored.
    let policy: RateLimitPolicy =
        serde_yaml::from_str(text).map_err(|e| PolicyError::Yaml(e.to_string()))?;
    let doc: serde_json::Value =
        serde_yaml::from_str(text).map_err(|e| PolicyError::Yaml(e.to_string()))?;
    let unknown = unknown_fields(&doc);
    if !unknown.is_empty() {
        let message =
            "is not a RateLimitPolicy field (misspelt, or indented under the wrong parent?)";
        let errors = (unknown.into_iter())
            .map(|field| FieldError {
                field,
                message: message.into(),
            })
            .collect();
        return Err(PolicyError::Invalid(errors));
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(spec: &str) -> Value {
        let text = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: p}}\nspec:\n  upstream: {{url: 'http://e:8000'}}\n{spec}"
        );
        serde_yaml::from_str(&text).unwrap()
    }

    #[test]
    fn misspelt_and_misplaced_fields_are_named_and_real_ones_pass() {
        let ok = doc(
            "  models: [{name: m, ttft: 1s}]\n  clientAuth: {secretRef: {name: c}}\n  tenants: {clients: {web: {weight: 2}}, default: {tokensPerMinute: 5}}\n",
        );
        assert_eq!(unknown_fields(&ok), Vec::<String>::new());
        let typo = doc("  clientAuht: {secretRef: {name: c}}\n  models: [{name: m, ttfft: 1s}]\n");
        assert_eq!(
            unknown_fields(&typo),
            ["spec.clientAuht", "spec.models[0].ttfft"]
        );
        let mut misplaced = doc("");
        misplaced["clientAuth"] = serde_json::json!({"secretRef": {"name": "c"}});
        assert_eq!(unknown_fields(&misplaced), ["clientAuth"]);
        let nested = doc("  tenants: {clients: {web: {wieght: 2}}}\n");
        assert_eq!(unknown_fields(&nested), ["spec.tenants.clients.web.wieght"]);
    }

    #[test]
    fn a_policy_file_with_a_field_it_does_not_have_is_refused_naming_it() {
        let text = "apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: p}\nspec:\n  upstream: {url: 'http://e:8000'}\nclientAuth: {secretRef: {name: c}}\n";
        let e = crate::policy::config::PolicyConfig::from_yaml(text).unwrap_err();
        let fields: Vec<&str> = e.field_errors().iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["clientAuth"]);
        assert!(
            e.to_string().contains("is not a RateLimitPolicy field"),
            "{e}"
        );
    }
}
