//! The operator as a real process against a real kube-apiserver, under exactly the chart's
//! RBAC rules: owned objects and their spec, status, no rollout on threshold edits, drift
//! correction, garbage collection, and leader election between two replicas.
//!
//! The local control plane has no kubelet or scheduler: gateway Pods are created by the
//! ReplicaSet controller but never run. Where a test needs a Ready gateway it marks those Pods
//! Ready through their status subresource, as a kubelet would; the ReplicaSet and Deployment
//! controllers (kube-controller-manager) then report the Deployment available.

mod support;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use sluice::policy::RateLimitPolicy;
use support::http::{client as http_client, get, metric};
use support::operator::{Env, accepted, condition, lease_holder, owned, start_operator};
use support::{TestNamespace, client, ensure_crd, eventually, operator_identity};

fn policy(name: &str, replicas: i32) -> RateLimitPolicy {
    serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": name},
        "spec": {
            "upstream": {"url": "http://vllm.inference.svc.cluster.local:8000"},
            "gateway": {"replicas": replicas, "port": 8000, "metricsPort": 9100,
                        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}},
            "defaults": {"ttft": "1s", "itl": "50ms"}
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn a_policy_becomes_a_hardened_gateway_with_status() {
    let fx = Env::new("op-create").await;
    let _op = fx.operator(&[]);
    let created = fx.create(&policy("llama", 2)).await;
    let p = accepted(&fx.api, "llama").await;
    let (k, ns, api) = (fx.k.clone(), &fx.ns, fx.api.clone());
    let uid = created.uid().unwrap();
    let name = "llama-sluice";

    // Owned objects, each controlled by the policy.
    let d: Deployment = owned(&k, &ns.name, name).await;
    let svc: Service = owned(&k, &ns.name, name).await;
    let sa: ServiceAccount = owned(&k, &ns.name, name).await;
    let role: Role = owned(&k, &ns.name, name).await;
    let rb: RoleBinding = owned(&k, &ns.name, name).await;
    let pdb: PodDisruptionBudget = owned(&k, &ns.name, name).await;
    for owners in [
        d.owner_references(),
        svc.owner_references(),
        sa.owner_references(),
        role.owner_references(),
        rb.owner_references(),
        pdb.owner_references(),
    ] {
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].uid, uid);
        assert_eq!(owners[0].kind, "RateLimitPolicy");
        assert_eq!(owners[0].controller, Some(true));
    }
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some(name));
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("example.test/sluice:dev"));
    let args = c.args.as_ref().unwrap();
    assert_eq!(&args[..3], ["gateway", "--policy", "llama"]);
    assert!(
        args.contains(&"--upstream".to_owned())
            && args.contains(&"http://vllm.inference.svc.cluster.local:8000/".to_owned()),
        "{args:?}"
    );
    assert!(args.contains(&"0.0.0.0:8000".to_owned()), "{args:?}");
    // Metrics on their own port, never the API's.
    assert!(
        args.contains(&"--metrics-listen=0.0.0.0:9100".to_owned()),
        "{args:?}"
    );
    let env = c.env.as_ref().unwrap();
    assert_eq!(env[0].name, "POD_NAMESPACE");
    assert_eq!(
        env[0]
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "metadata.namespace"
    );
    assert_eq!(
        c.readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/readyz")
    );
    assert_eq!(
        c.liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/healthz")
    );
    let ports: Vec<_> = c
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.as_deref().unwrap(), p.container_port))
        .collect();
    assert_eq!(ports, [("http", 8000), ("metrics", 9100)]);
    assert!(
        c.resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()
            .contains_key("cpu")
    );
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_owned()][..])
    );
    assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    let ann = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap();
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/port"], "9100");
    let svc_ports = svc.spec.as_ref().unwrap().ports.as_ref().unwrap();
    assert_eq!(
        svc_ports.iter().map(|p| p.port).collect::<Vec<_>>(),
        [8000],
        "the Service exposes the API only"
    );
    assert_eq!(
        role.rules.as_ref().unwrap()[0].resource_names.as_deref(),
        Some(&["llama".to_owned()][..])
    );

    // Status: accepted, not ready (no pod runs yet), endpoint.
    let s = p.status.as_ref().unwrap();
    assert_eq!(
        s.endpoint.as_deref(),
        Some(format!("http://llama-sluice.{}.svc:8000/v1", ns.name).as_str())
    );
    assert_eq!(condition(&p, "Ready").status, "False");

    // Mark the gateway Pods Ready, as a kubelet would: the Deployment becomes available and
    // the policy Ready.
    let pods: Api<Pod> = Api::namespaced(k.clone(), &ns.name);
    let list = eventually(30, "gateway pods created", || async {
        let l = pods
            .list(&ListParams::default().labels("sluice.dev/policy=llama"))
            .await
            .ok()?;
        (l.items.len() == 2).then_some(l)
    })
    .await;
    for pod in list.items {
        let status = json!({"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
        pods.patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .unwrap();
    }
    let p = eventually(60, "policy Ready=True", || async {
        let p = api.get("llama").await.ok()?;
        (p.status
            .as_ref()?
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"))
        .then_some(p)
    })
    .await;
    assert_eq!(p.status.as_ref().unwrap().ready_replicas, Some(2));

    // The operator's identity is minimal: it cannot list Secrets (it may only get one, to
    // read the opt-in annotation of a policy's apiKeySecretRef).
    let as_operator = support::client_from(&fx.id.kubeconfig.0).await;
    let secrets: Api<Secret> = Api::namespaced(as_operator, &ns.name);
    match secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403),
        other => panic!("the operator can list secrets: {other:?}"),
    }
}

#[tokio::test]
async fn threshold_edits_roll_nothing_and_upstream_edits_roll_the_pods() {
    let fx = Env::new("op-edit").await;
    let _op = fx.operator(&[]);
    fx.create(&policy("p", 1)).await;
    let (k, ns, api) = (fx.k.clone(), &fx.ns, fx.api.clone());
    let deployments: Api<Deployment> = Api::namespaced(k.clone(), &ns.name);
    let before = deployments.get("p-sluice").await.unwrap();

    let edit = json!({"spec": {"defaults": {"ttft": "2s", "timeConstant": "30s"}, "mode": "Shadow", "shedding": {"ramp": 2.0}}});
    api.patch("p", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .unwrap();
    accepted(&api, "p").await;
    let after = deployments.get("p-sluice").await.unwrap();
    assert_eq!(
        after.metadata.generation, before.metadata.generation,
        "threshold edit rolled the pods"
    );
    assert_eq!(
        after.spec.unwrap().template,
        before.spec.clone().unwrap().template
    );

    let edit = json!({"spec": {"upstream": {"url": "http://sglang.inference.svc:30000"}}});
    api.patch("p", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .unwrap();
    accepted(&api, "p").await;
    let rolled = deployments.get("p-sluice").await.unwrap();
    assert!(rolled.metadata.generation > before.metadata.generation);
    let args = rolled.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(
        args.contains(&"http://sglang.inference.svc:30000/".to_owned()),
        "{args:?}"
    );
}

#[tokio::test]
async fn drift_in_owned_objects_is_corrected_and_deletion_cascades() {
    let fx = Env::new("op-drift").await;
    let _op = fx.operator(&[]);
    fx.create(&policy("p", 1)).await;
    let (k, ns, api) = (fx.k.clone(), &fx.ns, fx.api.clone());
    let services: Api<Service> = Api::namespaced(k.clone(), &ns.name);
    let deployments: Api<Deployment> = Api::namespaced(k.clone(), &ns.name);
    let old_uid = services.get("p-sluice").await.unwrap().uid();

    services
        .delete("p-sluice", &DeleteParams::default())
        .await
        .unwrap();
    eventually(30, "Service recreated", || async {
        let s = services.get("p-sluice").await.ok()?;
        (s.uid() != old_uid).then_some(())
    })
    .await;

    let scale = json!({"spec": {"replicas": 5}});
    deployments
        .patch("p-sluice", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .unwrap();
    eventually(30, "replicas corrected back to 1", || async {
        let d = deployments.get("p-sluice").await.ok()?;
        (d.spec?.replicas == Some(1)).then_some(())
    })
    .await;

    // Deleting the policy garbage-collects everything it owned (kube-controller-manager).
    api.delete("p", &DeleteParams::foreground()).await.unwrap();
    eventually(60, "owned objects garbage-collected", || async {
        let gone = deployments.get_opt("p-sluice").await.ok()?.is_none()
            && services.get_opt("p-sluice").await.ok()?.is_none()
            && Api::<ServiceAccount>::namespaced(k.clone(), &ns.name)
                .get_opt("p-sluice")
                .await
                .ok()?
                .is_none()
            && Api::<Role>::namespaced(k.clone(), &ns.name)
                .get_opt("p-sluice")
                .await
                .ok()?
                .is_none()
            && Api::<RoleBinding>::namespaced(k.clone(), &ns.name)
                .get_opt("p-sluice")
                .await
                .ok()?
                .is_none();
        gone.then_some(())
    })
    .await;
}

#[tokio::test]
async fn two_replicas_elect_one_leader_and_fail_over_when_it_dies() {
    let k = client().await;
    ensure_crd(&k).await;
    let ns = TestNamespace::new(&k, "op-leader").await;
    let id = operator_identity(&k, &ns.name).await;
    let c = http_client();
    let le = [
        "--leader-elect",
        "--lease-namespace",
        &ns.name,
        "--lease-duration",
        "3s",
    ];
    let a = start_operator(
        &ns.name,
        &id.kubeconfig.0,
        &[&le[..], &["--identity", "replica-a"]].concat(),
    );
    let holder = eventually(30, "a leader", || lease_holder(&k, &ns.name)).await;
    assert_eq!(holder, "replica-a");
    let b = start_operator(
        &ns.name,
        &id.kubeconfig.0,
        &[&le[..], &["--identity", "replica-b"]].concat(),
    );

    let api: Api<RateLimitPolicy> = Api::namespaced(k.clone(), &ns.name);
    api.create(&PostParams::default(), &policy("first", 1))
        .await
        .unwrap();
    accepted(&api, "first").await;
    let reconciles = |url: String| {
        let c = c.clone();
        async move {
            let m = get(&c, &url).await.text();
            (
                metric(
                    &m,
                    "sluice_operator_reconciles_total",
                    &[("result", "success"), ("error", "")],
                )
                .unwrap_or(0.0),
                metric(&m, "sluice_operator_leader", &[]).unwrap_or(-1.0),
            )
        }
    };
    let (_, _) = eventually(10, "replica b serves metrics", || async {
        let r = get(&c, &b.metrics_url).await;
        (r.status == 200).then_some(((), ()))
    })
    .await;
    let (a_count, a_leader) = reconciles(a.metrics_url.clone()).await;
    let (b_count, b_leader) = reconciles(b.metrics_url.clone()).await;
    assert!(
        a_count >= 1.0 && a_leader == 1.0,
        "a: {a_count} reconciles, leader {a_leader}"
    );
    assert_eq!((b_count, b_leader), (0.0, 0.0), "the standby reconciled");

    // The leader dies without releasing the lease; b takes over once it expires.
    let mut a = a;
    a.process.child.kill().unwrap();
    a.process.child.wait().unwrap();
    let t = std::time::Instant::now();
    eventually(30, "replica-b leads", || async {
        (lease_holder(&k, &ns.name).await.as_deref() == Some("replica-b")).then_some(())
    })
    .await;
    eprintln!("failover took {:?}", t.elapsed());
    api.create(&PostParams::default(), &policy("second", 1))
        .await
        .unwrap();
    accepted(&api, "second").await;
    let (b_count, b_leader) = reconciles(b.metrics_url.clone()).await;
    assert!(
        b_count >= 1.0 && b_leader == 1.0,
        "b: {b_count} reconciles, leader {b_leader}"
    );
}
