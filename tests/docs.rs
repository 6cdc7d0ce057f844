//! The reference pages under docs/ name every flag of each command and every field of the
//! RateLimitPolicy spec, as the code defines them (clap's argument definitions and the
//! generated CRD schema): a flag or field added without its documentation fails here.

use std::path::Path;

fn page(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The long flags (`--name`) an argument struct defines.
fn flags<A: clap::Args>() -> Vec<String> {
    A::augment_args(clap::Command::new("sluice"))
        .get_arguments()
        .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
        .collect()
}

/// Whether `text` names `flag` itself (not a longer flag it is a prefix of).
fn names_flag(text: &str, flag: &str) -> bool {
    text.match_indices(flag).any(|(i, _)| {
        let next = text[i + flag.len()..].chars().next();
        !next.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
    })
}

#[test]
fn every_flag_of_every_command_is_in_its_page() {
    let commands = [
        ("gateway.md", flags::<sluice::gateway::GatewayArgs>()),
        ("operator.md", flags::<sluice::operator::OperatorArgs>()),
        ("loadgen.md", flags::<sluice::loadgen::LoadgenArgs>()),
        ("sim-engine.md", flags::<sluice::sim::SimConfig>()),
    ];
    for (name, flags) in commands {
        assert!(!flags.is_empty(), "{name}: no flags read");
        let text = page(name);
        let missing: Vec<_> = flags.iter().filter(|f| !names_flag(&text, f)).collect();
        assert!(
            missing.is_empty(),
            "docs/{name} does not document {missing:?}"
        );
    }
}

/// The property names of the spec schema, with their paths; Kubernetes' own types
/// (resources, tolerations, node selectors) are documented by Kubernetes.
fn fields(schema: &serde_json::Value, path: &str, out: &mut Vec<(String, String)>) {
    let schema = schema.get("items").unwrap_or(schema);
    let Some(props) = schema.get("properties").and_then(|p| p.as_object()) else {
        return;
    };
    for (name, sub) in props {
        let p = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}.{name}")
        };
        out.push((p.clone(), name.clone()));
        if !["resources", "tolerations", "nodeSelector"].contains(&name.as_str()) {
            fields(sub, &p, out);
        }
    }
}

#[test]
fn every_field_of_the_spec_is_in_the_policy_page() {
    let crd: serde_json::Value = serde_yaml::from_str(&sluice::policy::crd_yaml()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut all = Vec::new();
    fields(spec, "", &mut all);
    assert!(all.len() > 20, "read {} fields", all.len());
    let text = page("policy.md");
    let missing: Vec<_> = all
        .iter()
        .filter(|(_, name)| {
            // As written in the page: `name`, a.name in a path, or {name, ...} in a list.
            !["`", ".", "{", ", "]
                .iter()
                .any(|before| text.contains(&format!("{before}{name}")))
        })
        .map(|(p, _)| p)
        .collect();
    assert!(
        missing.is_empty(),
        "docs/policy.md does not document {missing:?}"
    );
}
