//! The generated CRD: `crds/` and the chart's copy match the Rust types, `sluice crd` prints
//! the same, and the schema carries the CEL rules, bounds and printer columns.

use std::process::Command;

use sluice::policy::crd_yaml;

const REPO_CRD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/crds/ratelimitpolicies.sluice.dev.yaml"
);
const CHART_CRD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/charts/sluice/crds/ratelimitpolicies.sluice.dev.yaml"
);
const FIX: &str = "regenerate with: cargo run -- crd > crds/ratelimitpolicies.sluice.dev.yaml && cp crds/ratelimitpolicies.sluice.dev.yaml charts/sluice/crds/";

#[test]
fn crds_directory_matches_the_rust_types() {
    let on_disk = std::fs::read_to_string(REPO_CRD)
        .expect("crds/ratelimitpolicies.sluice.dev.yaml is missing");
    assert!(
        on_disk == crd_yaml(),
        "crds/ has drifted from the Rust types; {FIX}"
    );
}

#[test]
fn chart_crd_is_the_same_file() {
    let chart = std::fs::read_to_string(CHART_CRD).expect("the chart's CRD is missing");
    let repo = std::fs::read_to_string(REPO_CRD).unwrap();
    assert!(
        chart == repo,
        "charts/sluice/crds differs from crds/; {FIX}"
    );
}

#[test]
fn sluice_crd_prints_the_crd() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), crd_yaml());
}

fn crd() -> serde_json::Value {
    serde_yaml::from_str(&crd_yaml()).unwrap()
}

fn spec_schema() -> serde_json::Value {
    crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
}

fn rules(v: &serde_json::Value) -> Vec<String> {
    v["x-kubernetes-validations"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| r["rule"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn names_scope_and_subresources() {
    let c = crd();
    assert_eq!(c["metadata"]["name"], "ratelimitpolicies.sluice.dev");
    assert_eq!(c["spec"]["group"], "sluice.dev");
    assert_eq!(c["spec"]["scope"], "Namespaced");
    assert_eq!(c["spec"]["names"]["kind"], "RateLimitPolicy");
    assert_eq!(c["spec"]["names"]["shortNames"][0], "rlp");
    let v = &c["spec"]["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    assert!(v["subresources"]["status"].is_object());
}

#[test]
fn schema_carries_the_cel_rules() {
    let s = spec_schema();
    let p = &s["properties"];
    assert!(
        rules(&p["upstream"]["properties"]["url"])[0]
            .contains("url(self).getScheme() in ['http', 'https']")
    );
    assert_eq!(
        rules(&p["upstream"]["properties"]["timeout"]),
        ["duration(self) > duration('0s')"]
    );
    for field in ["ttft", "itl"] {
        assert_eq!(
            rules(&p["defaults"]["properties"][field]),
            ["duration(self) > duration('0s')"]
        );
        assert_eq!(
            rules(&p["models"]["items"]["properties"][field]),
            ["duration(self) > duration('0s')"]
        );
    }
    assert_eq!(
        rules(&p["defaults"]["properties"]["timeConstant"]),
        ["duration(self) >= duration('1s')"]
    );
    assert_eq!(
        rules(&p["shedding"]["properties"]["maxRejectProbability"]),
        ["self > 0.0 && self <= 1.0"]
    );
    assert_eq!(rules(&p["shedding"]["properties"]["ramp"]), ["self >= 1.0"]);
    // Model names are bounded in bytes, as the policy's validation and the gateway count.
    let max = sluice::policy::crd::MAX_MODEL_NAME_BYTES;
    assert_eq!(
        rules(&p["models"]["items"]["properties"]["name"]),
        [format!("size(bytes(self)) <= {max}")]
    );
    assert_eq!(sluice::gateway::handlers::MAX_MODEL_BYTES, max);
    assert!(rules(&s)[0].contains("self.scope != 'Global'"));
}

#[test]
fn schema_carries_bounds_defaults_and_list_semantics() {
    let s = spec_schema();
    let p = &s["properties"];
    let pattern = sluice::policy::duration::DURATION_PATTERN;
    assert_eq!(p["defaults"]["properties"]["ttft"]["pattern"], pattern);
    assert_eq!(p["defaults"]["properties"]["ttft"]["default"], "1s");
    assert_eq!(p["defaults"]["properties"]["itl"]["default"], "50ms");
    assert_eq!(p["mode"]["default"], "Enforce");
    assert_eq!(p["mode"]["enum"], serde_json::json!(["Enforce", "Shadow"]));
    // Unique model names: a list-map keyed by name (the API server refuses duplicates, and
    // server-side apply merges entries per model).
    assert_eq!(p["models"]["x-kubernetes-list-type"], "map");
    assert_eq!(
        p["models"]["x-kubernetes-list-map-keys"],
        serde_json::json!(["name"])
    );
    assert_eq!(p["models"]["maxItems"], 128);
    assert_eq!(s["required"], serde_json::json!(["upstream"]));
    assert!(
        p["defaults"]["properties"]["ttft"]["description"]
            .as_str()
            .unwrap()
            .contains("Time-to-first-token threshold"),
        "kubectl explain shows field docs"
    );
}

#[test]
fn printer_columns() {
    let cols = crd()["spec"]["versions"][0]["additionalPrinterColumns"].clone();
    let names: Vec<&str> = cols
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "Mode", "TTFT", "ITL", "Accepted", "Ready", "Reason", "Replicas", "Endpoint", "Age"
        ]
    );
    assert_eq!(
        cols[3]["jsonPath"],
        ".status.conditions[?(@.type==\"Accepted\")].status"
    );
}
