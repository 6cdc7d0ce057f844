//! The operator against a real kube-apiserver with the names users actually give policies
//! (dots, leading digits, the longest names), objects that already exist under the gateway's
//! name, and objects the API server refuses: every valid policy gets its gateway or a status
//! that says why not, and nothing it does not own is touched.

mod support;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};
use sluice::operator::names::{gateway_name, label_value};
use sluice::policy::RateLimitPolicy;
use support::operator::{Env, owned};
use support::{eventually, kubectl_ok};

fn policy(name: &str, extra: serde_json::Value) -> RateLimitPolicy {
    let mut spec = json!({"upstream": {"url": "http://vllm.inference.svc:8000"}});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": name}, "spec": spec
    }))
    .unwrap()
}

/// Waits until the policy's Ready condition has `reason`; returns its message.
async fn ready_reason(api: &Api<RateLimitPolicy>, name: &str, reason: &str) -> String {
    ready_saying(api, name, reason, "").await
}

/// Waits for `Ready` with this reason and a message containing `says`; returns the message.
async fn ready_saying(api: &Api<RateLimitPolicy>, name: &str, reason: &str, says: &str) -> String {
    eventually(
        30,
        &format!("{name}: Ready reason {reason}, {says:?}"),
        || async {
            let p = api.get(name).await.ok()?;
            let s = p.status.as_ref()?;
            let ready = s.conditions.iter().find(|c| c.type_ == "Ready")?;
            (ready.reason == reason
                && s.observed_generation == p.metadata.generation
                && ready.message.contains(says))
            .then(|| ready.message.clone())
        },
    )
    .await
}

/// Merges these annotations into the Secret `name`.
async fn annotate(secrets: &Api<k8s_openapi::api::core::v1::Secret>, name: &str, a: Value) {
    let patch = json!({"metadata": {"annotations": a}});
    secrets
        .patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn every_valid_policy_name_gets_its_gateway_and_a_status() {
    let fx = Env::new("op-names").await;
    let _op = fx.operator(&[]);
    let names = [
        "llama-3.1-8b".to_owned(),
        "8b-chat".to_owned(),
        "a.b".to_owned(),
        "a-b".to_owned(), // the same as "a.b" after sanitising
        "n".repeat(63),
        "n".repeat(64),
        format!("{}.{}", "m".repeat(126), "m".repeat(126)), // 253 characters
    ];
    for n in &names {
        fx.api
            .create(&PostParams::default(), &policy(n, json!({})))
            .await
            .unwrap_or_else(|e| panic!("the API server refused {n}: {e}"));
    }
    for n in &names {
        // No pods run here, so the Deployment is never available: Ready=False, never blank.
        ready_reason(&fx.api, n, "DeploymentNotAvailable").await;
        let p = fx.api.get(n).await.unwrap();
        let uid = p.uid().unwrap();
        let gw = gateway_name(n);
        let svc: Service = owned(&fx.k, &fx.ns.name, &gw).await;
        let dep: Deployment = owned(&fx.k, &fx.ns.name, &gw).await;
        for refs in [svc.owner_references(), dep.owner_references()] {
            assert_eq!(refs[0].uid, uid, "{n}: owner of {gw}");
        }
        assert_eq!(
            svc.labels()["sluice.dev/policy"],
            label_value(n),
            "{n}: label"
        );
        let endpoint = p.status.unwrap().endpoint.unwrap();
        assert!(
            endpoint.starts_with(&format!("http://{gw}.{}.svc:", fx.ns.name)),
            "{n}: endpoint {endpoint}"
        );
    }
    // `kubectl get rlp` shows a value in every READY cell.
    let table = kubectl_ok(&["get", "rlp", "-n", &fx.ns.name, "--no-headers"]);
    assert_eq!(table.lines().count(), names.len(), "{table}");
    for line in table.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&cols[4..6], ["True", "False"], "{line}");
    }
}

#[tokio::test]
async fn an_existing_object_under_the_gateways_name_is_left_alone() {
    let fx = Env::new("op-conflict").await;
    let _op = fx.operator(&[]);
    let services: Api<Service> = Api::namespaced(fx.k.clone(), &fx.ns.name);
    let theirs: Service = serde_json::from_value(json!({
        "metadata": {"name": "c-sluice", "labels": {"team": "search"}},
        "spec": {"ports": [{"port": 7000}], "selector": {"app": "search"}}
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &theirs)
        .await
        .unwrap();
    fx.api
        .create(&PostParams::default(), &policy("c", json!({})))
        .await
        .unwrap();
    let message = ready_reason(&fx.api, "c", "NameConflict").await;
    assert!(message.contains("Service c-sluice"), "{message}");
    // The Warning Event is published after the status is written.
    eventually(30, "a NameConflict event", || async {
        let events = kubectl_ok(&["get", "events", "-n", &fx.ns.name]);
        events.contains("NameConflict").then_some(())
    })
    .await;
    let after = services.get("c-sluice").await.unwrap();
    assert!(after.owner_references().is_empty(), "taken over: {after:?}");
    assert_eq!(
        after.labels().get("team").map(String::as_str),
        Some("search")
    );
    assert!(!after.labels().contains_key("sluice.dev/policy"));
    assert_eq!(after.spec.unwrap().ports.unwrap()[0].port, 7000);

    // Deleting the policy collects what it owns, and not the Service.
    let sas: Api<ServiceAccount> = Api::namespaced(fx.k.clone(), &fx.ns.name);
    assert!(sas.get_opt("c-sluice").await.unwrap().is_some());
    fx.api.delete("c", &DeleteParams::default()).await.unwrap();
    eventually(30, "the policy's own objects collected", || async {
        sas.get_opt("c-sluice")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(services.get_opt("c-sluice").await.unwrap().is_some());
}

#[tokio::test]
async fn an_object_the_api_server_refuses_shows_in_status() {
    let fx = Env::new("op-refused").await;
    let _op = fx.operator(&[]);
    // Valid for the CRD's schema (quantities are int-or-string there), refused in a Deployment.
    let bad = policy(
        "r",
        json!({"gateway": {"resources": {"limits": {"memory": "lots"}}}}),
    );
    fx.api.create(&PostParams::default(), &bad).await.unwrap();
    let message = ready_reason(&fx.api, "r", "ApplyFailed").await;
    assert!(message.contains("Deployment r-sluice"), "{message}");
    assert!(message.contains("quantities must match"), "{message}");
    let p = fx.api.get("r").await.unwrap();
    let accepted = p
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Accepted")
        .unwrap();
    assert_eq!(accepted.status, "True");
    let wide = kubectl_ok(&["get", "rlp", "r", "-n", &fx.ns.name, "-o", "wide"]);
    assert!(wide.contains("ApplyFailed"), "{wide}");
}

#[tokio::test]
async fn a_policy_runs_only_images_and_placement_the_admin_allows() {
    let fx = Env::new("op-admission").await;
    let _op = fx.operator(&["--allowed-gateway-images", "registry.example/sluice:*"]);
    // Any image of the author's choosing would run with the gateway's identity and Secrets.
    let evil = json!({"gateway": {"image": "attacker.example/shell:latest"}});
    fx.api
        .create(&PostParams::default(), &policy("evil", evil))
        .await
        .unwrap();
    let message = ready_reason(&fx.api, "evil", "ImageNotAllowed").await;
    assert!(message.contains("nothing new is deployed"), "{message}");
    let p = fx.api.get("evil").await.unwrap();
    let accepted = support::operator::condition(&p, "Accepted");
    assert_eq!(
        (accepted.status.as_str(), accepted.reason.as_str()),
        ("False", "ImageNotAllowed")
    );
    assert!(
        accepted.message.contains("attacker.example/shell:latest"),
        "{}",
        accepted.message
    );
    // Control-plane placement is the admin's to allow too.
    let placed = json!({"gateway": {"tolerations": [{"operator": "Exists"}],
        "nodeSelector": {"node-role.kubernetes.io/control-plane": ""}}});
    fx.api
        .create(&PostParams::default(), &policy("placed", placed))
        .await
        .unwrap();
    ready_reason(&fx.api, "placed", "SchedulingNotAllowed").await;
    // An allowed image is applied; the refused policies got nothing.
    let ok = json!({"gateway": {"image": "registry.example/sluice:1.2"}});
    fx.api
        .create(&PostParams::default(), &policy("ok", ok))
        .await
        .unwrap();
    support::operator::accepted(&fx.api, "ok").await;
    let d: Deployment = owned(&fx.k, &fx.ns.name, "ok-sluice").await;
    let pod = d.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        pod.containers[0].image.as_deref(),
        Some("registry.example/sluice:1.2")
    );
    let deployments: Api<Deployment> = Api::namespaced(fx.k.clone(), &fx.ns.name);
    for refused in ["evil-sluice", "placed-sluice"] {
        assert!(
            deployments.get_opt(refused).await.unwrap().is_none(),
            "{refused}"
        );
    }
}

#[tokio::test]
async fn a_secret_counts_only_where_it_opted_in_to_the_policy() {
    use k8s_openapi::api::core::v1::Secret;
    let fx = Env::new("op-secret").await;
    let _op = fx.operator(&[]);
    let secrets: Api<Secret> = Api::namespaced(fx.k.clone(), &fx.ns.name);
    let key: Secret = serde_json::from_value(json!({
        "metadata": {"name": "upstream-key"},
        "stringData": {"api-key": "sk-live\n"}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &key).await.unwrap();
    let reference = json!({"upstream": {"url": "http://vllm.inference.svc:8000",
        "apiKeySecretRef": {"name": "upstream-key", "key": "api-key"}}});
    fx.api
        .create(&PostParams::default(), &policy("s", reference))
        .await
        .unwrap();
    // The refusal names the annotation that would allow it.
    ready_saying(
        &fx.api,
        "s",
        "SecretNotAllowed",
        "sluice.dev/upstream-key-for: s/api-key",
    )
    .await;
    let mounts_key = |d: &Deployment| {
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let args = pod.containers[0].args.clone().unwrap_or_default();
        let volume = pod.volumes.iter().flatten().any(|v| {
            v.projected.as_ref().is_some_and(|p| {
                p.sources
                    .iter()
                    .flatten()
                    .any(|s| s.secret.as_ref().is_some_and(|s| s.name == "upstream-key"))
            })
        });
        (volume, args.contains(&"--upstream-api-key-file".to_owned()))
    };
    let d: Deployment = owned(&fx.k, &fx.ns.name, "s-sluice").await;
    assert_eq!(
        mounts_key(&d),
        (false, false),
        "a refused Secret is not mounted"
    );

    // Opened for the policy's client keys, or for another of its keys, or with the retired
    // all-uses annotation: still not an upstream key.
    let not_upstream = json!({"sluice.dev/client-keys-for": "s",
        "sluice.dev/allowed-policies": "*", "sluice.dev/upstream-key-for": "s/other"});
    annotate(&secrets, "upstream-key", not_upstream).await;
    ready_saying(&fx.api, "s", "SecretNotAllowed", "no longer honoured").await;
    // The right key, but the hosts it may go to do not include the policy's upstream.
    let wrong_host = json!({"sluice.dev/upstream-key-for": "other/api-key, s/api-key",
        "sluice.dev/upstream-hosts": "vllm.inference.svc:9000, api.example.com"});
    annotate(&secrets, "upstream-key", wrong_host).await;
    ready_saying(&fx.api, "s", "SecretNotAllowed", "vllm.inference.svc:8000").await;
    let d: Deployment = owned(&fx.k, &fx.ns.name, "s-sluice").await;
    assert_eq!(mounts_key(&d), (false, false), "a wrong host gets no key");

    // The Secret's owner opts in for this host: the next retry mounts it as a file.
    let hosts = json!({"sluice.dev/upstream-hosts": "api.example.com, vllm.inference.svc"});
    annotate(&secrets, "upstream-key", hosts).await;
    ready_reason(&fx.api, "s", "DeploymentNotAvailable").await;
    let d: Deployment = owned(&fx.k, &fx.ns.name, "s-sluice").await;
    assert_eq!(mounts_key(&d), (true, true));
    let env = d.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap_or_default();
    assert!(
        env.iter().all(|e| e
            .value_from
            .as_ref()
            .is_none_or(|v| v.secret_key_ref.is_none())),
        "the key must not be an env var: {env:?}"
    );

    // A reference to a Secret that does not exist says so.
    let missing = json!({"upstream": {"url": "http://vllm.inference.svc:8000",
        "apiKeySecretRef": {"name": "nope", "key": "api-key"}}});
    fx.api
        .create(&PostParams::default(), &policy("m", missing))
        .await
        .unwrap();
    let message = ready_reason(&fx.api, "m", "SecretNotAllowed").await;
    assert!(message.contains("does not exist"), "{message}");
}

#[tokio::test]
async fn client_keys_are_mounted_as_a_directory_once_their_secret_opted_in() {
    use k8s_openapi::api::core::v1::Secret;
    let fx = Env::new("op-clients").await;
    let _op = fx.operator(&[]);
    let secrets: Api<Secret> = Api::namespaced(fx.k.clone(), &fx.ns.name);
    let keys: Secret = serde_json::from_value(json!({
        "metadata": {"name": "llm-clients"},
        "stringData": {"checkout": "sk-a", "batch": "sk-b"}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &keys).await.unwrap();
    let spec = json!({"upstream": {"url": "http://vllm.inference.svc:8000"},
        "clientAuth": {"secretRef": {"name": "llm-clients"}},
        "priority": {"clients": {"checkout": "critical", "batch": "sheddable"}}});
    fx.api
        .create(&PostParams::default(), &policy("c", spec))
        .await
        .unwrap();
    let message = ready_reason(&fx.api, "c", "SecretNotAllowed").await;
    assert!(message.contains("llm-clients"), "{message}");
    let mounted = |d: &Deployment| {
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let args = pod.containers[0].args.clone().unwrap_or_default();
        let volume = pod.volumes.iter().flatten().find(|v| {
            v.secret
                .as_ref()
                .is_some_and(|s| s.secret_name.as_deref() == Some("llm-clients"))
        });
        let mount = volume.and_then(|v| {
            pod.containers[0]
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == v.name)
                .map(|m| m.mount_path.clone())
        });
        let arg = args
            .iter()
            .find_map(|a| a.strip_prefix("--client-keys-dir="))
            .map(str::to_owned);
        (mount, arg)
    };
    let d: Deployment = owned(&fx.k, &fx.ns.name, "c-sluice").await;
    assert_eq!(mounted(&d), (None, None), "a refused Secret is not mounted");

    // An upstream-key opt-in, or the retired all-uses one, does not open client keys.
    let other_uses = json!({"sluice.dev/upstream-key-for": "c/checkout",
        "sluice.dev/upstream-hosts": "vllm.inference.svc", "sluice.dev/allowed-policies": "c"});
    annotate(&secrets, "llm-clients", other_uses).await;
    ready_saying(&fx.api, "c", "SecretNotAllowed", "no longer honoured").await;
    let d: Deployment = owned(&fx.k, &fx.ns.name, "c-sluice").await;
    assert_eq!(mounted(&d), (None, None));

    annotate(
        &secrets,
        "llm-clients",
        json!({"sluice.dev/client-keys-for": "c"}),
    )
    .await;
    ready_reason(&fx.api, "c", "DeploymentNotAvailable").await;
    let d: Deployment = owned(&fx.k, &fx.ns.name, "c-sluice").await;
    let dir = sluice::operator::objects::CLIENT_KEYS_DIR.to_owned();
    assert_eq!(mounted(&d), (Some(dir.clone()), Some(dir)));
}
