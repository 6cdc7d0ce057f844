//! Which Secrets a policy may use, on a real kube-apiserver: only those whose owner opted in,
//! for the one use, key and hosts the annotations name (`operator::secret_use`).

mod support;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use support::operator::{Env, owned, policy_with, ready_reason, ready_saying};

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
async fn a_secret_counts_only_where_it_opted_in_to_the_policy_with() {
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
        .create(&PostParams::default(), &policy_with("s", reference))
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
        .create(&PostParams::default(), &policy_with("m", missing))
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
        .create(&PostParams::default(), &policy_with("c", spec))
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
