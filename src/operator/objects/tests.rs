use super::*;

#[test]
fn pods_drain_for_as_long_as_a_request_may_run() {
    let d = gateway_deployment(&GatewayPodSpec {
        namespace: "ns",
        policy: "p",
        uid: "u-1",
        image: "img",
        upstreams: &["http://u:8000/".parse().unwrap()],
        port: 8080,
        replicas: 1,
        gateway: None,
        api_key: None,
        client_keys: None,
        upstream_timeout: std::time::Duration::from_millis(600_500),
    });
    let template = d.spec.unwrap().template;
    let d_annotations = template.metadata.and_then(|m| m.annotations);
    let pod = template.spec.unwrap();
    // 5 s drain delay + 601 s (the timeout, rounded up) + 5 s margin.
    assert_eq!(pod.termination_grace_period_seconds, Some(611));
    let args = pod.containers[0].args.clone().unwrap();
    assert!(args.contains(&"--drain-delay=5s".to_owned()), "{args:?}");
    assert!(
        args.contains(&"--drain-timeout=10m1s".to_owned()),
        "{args:?}"
    );
    assert!(pod.volumes.is_none(), "no key, no volume");
    // Metrics on their own port, and the scrape annotation names it.
    assert!(
        args.contains(&"--metrics-listen=0.0.0.0:9090".to_owned()),
        "{args:?}"
    );
    let ports: Vec<_> = pod.containers[0]
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap(), p.container_port))
        .collect();
    assert_eq!(ports, [("http".into(), 8080), ("metrics".into(), 9090)]);
    let annotations = d_annotations.unwrap();
    assert_eq!(annotations["prometheus.io/port"], "9090");
    let res = pod.containers[0].resources.clone().unwrap();
    assert_eq!(
        res,
        default_resources(),
        "defaults when the policy sets none"
    );
    assert_eq!(res.limits.unwrap()["memory"].0, "1Gi");
}

/// `sluice gateway`'s own command line, as the binary parses it.
#[derive(clap::Parser, Debug)]
struct GatewayCommandLine {
    #[command(flatten)]
    args: crate::gateway::GatewayArgs,
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
    /// Whatever valid spec the operator reads, the gateway it starts accepts its arguments
    /// (a 28h upstream timeout once became `--drain-timeout=100800s`, six digits, and every
    /// gateway pod refused to start).
    #[test]
    fn every_argument_written_for_a_valid_spec_is_accepted_by_the_gateway(
        timeout in "([0-9]{1,5}(h|m|s|ms)){1,4}",
        name in "[a-z0-9]([a-z0-9.-]{0,60}[a-z0-9])?",
    ) {
        use clap::Parser;
        let upstream_timeout = crate::policy::duration::parse_duration(&timeout).unwrap();
        let d = gateway_deployment(&GatewayPodSpec {
            namespace: "ns",
            policy: &name,
            uid: "u-1",
            image: "img",
            upstreams: &[
                "http://engine.inference.svc:8000/v1".parse().unwrap(),
                "http://10.0.0.7:8000".parse().unwrap(),
            ],
            port: 8080,
            replicas: 1,
            gateway: None,
            api_key: None,
            client_keys: None,
            upstream_timeout,
        });
        let args = d.spec.unwrap().template.spec.unwrap().containers[0].args.clone().unwrap();
        proptest::prop_assert_eq!(args[0].as_str(), "gateway");
        let parsed = GatewayCommandLine::try_parse_from(
            std::iter::once("sluice-gateway").chain(args[1..].iter().map(String::as_str)),
        );
        let parsed = parsed.map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{args:?}: {e}")))?;
        proptest::prop_assert!(parsed.args.drain_timeout >= upstream_timeout.min(crate::policy::duration::MAX_FORMATTED));
        proptest::prop_assert_eq!(parsed.args.policy.as_deref(), Some(name.as_str()));
        let served: Vec<String> = parsed.args.upstream.iter().map(|u| u.to_string()).collect();
        proptest::prop_assert_eq!(served, ["http://engine.inference.svc:8000/v1", "http://10.0.0.7:8000/"]);
    }
}

#[test]
fn a_policy_without_a_memory_limit_still_gets_one() {
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let q = |s: &str| Quantity(s.to_owned());
    // Emptied, or with only a CPU limit: the default memory limit is added.
    for set in [
        ResourceRequirements::default(),
        ResourceRequirements {
            limits: Some(BTreeMap::from([("cpu".to_owned(), q("2"))])),
            ..Default::default()
        },
    ] {
        let r = with_memory_limit(set.clone());
        let limits = r.limits.unwrap();
        assert_eq!(limits["memory"], q("1Gi"), "{set:?}");
        assert_eq!(
            limits.get("cpu"),
            set.limits.as_ref().and_then(|l| l.get("cpu"))
        );
    }
    // A limit the policy sets is kept.
    let own = ResourceRequirements {
        limits: Some(BTreeMap::from([("memory".to_owned(), q("512Mi"))])),
        ..Default::default()
    };
    assert_eq!(with_memory_limit(own).limits.unwrap()["memory"], q("512Mi"));
}

#[test]
fn the_role_is_narrowed_to_the_policy() {
    let r = gateway_role("ns", "llama", false);
    let rules = r.rules.unwrap();
    assert_eq!(rules.len(), 1, "no discovery: the policy alone");
    let rule = &rules[0];
    assert_eq!(
        rule.resource_names.as_deref(),
        Some(&["llama".to_owned()][..])
    );
    assert_eq!(rule.verbs, ["get", "list", "watch"]);
    // Discovering a Service: list and watch EndpointSlices, nothing else of them.
    let rules = gateway_role("ns", "llama", true).rules.unwrap();
    assert_eq!(rules.len(), 2);
    assert_eq!(
        rules[1].api_groups.as_deref(),
        Some(&["discovery.k8s.io".to_owned()][..])
    );
    assert_eq!(
        rules[1].resources.as_deref(),
        Some(&["endpointslices".to_owned()][..])
    );
    assert_eq!(rules[1].verbs, ["list", "watch"]);
    let b = gateway_role_binding("ns", "llama");
    assert_eq!(b.role_ref.name, "llama-sluice");
    assert_eq!(b.subjects.unwrap()[0].name, "llama-sluice");
}

#[test]
fn pods_are_selected_by_their_policys_uid_and_an_old_selector_is_kept() {
    // Two policies whose shortened label is the same: a name over 63 characters and one
    // named exactly its label.
    let long = "l".repeat(70);
    let twin = label_value(&long);
    assert_eq!(label_value(&twin), twin);
    let upstreams: Vec<http::Uri> = vec!["http://u:8000/".parse().unwrap()];
    let spec = |policy: &'static str, uid: &'static str| GatewayPodSpec {
        namespace: "ns",
        policy,
        uid,
        image: "img",
        upstreams: &upstreams,
        port: 8080,
        replicas: 2,
        gateway: None,
        api_key: None,
        client_keys: None,
        upstream_timeout: std::time::Duration::from_secs(60),
    };
    let long: &'static str = Box::leak(long.into_boxed_str());
    let twin: &'static str = Box::leak(twin.into_boxed_str());
    let (a, b) = (
        gateway_deployment(&spec(long, "uid-a")),
        gateway_deployment(&spec(twin, "uid-b")),
    );
    let pods = |d: &k8s_openapi::api::apps::v1::Deployment| {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .clone()
            .unwrap()
    };
    let selects = |sel: &BTreeMap<String, String>, labels: &BTreeMap<String, String>| {
        sel.iter().all(|(k, v)| labels.get(k) == Some(v))
    };
    assert_eq!(pods(&a)[POLICY_LABEL], pods(&b)[POLICY_LABEL]);
    for (uid, own, other) in [("uid-a", &a, &b), ("uid-b", &b, &a)] {
        let policy = if uid == "uid-a" { long } else { twin };
        let service = gateway_service("ns", policy, uid, 8080)
            .spec
            .unwrap()
            .selector
            .unwrap();
        let pdb = gateway_pdb("ns", policy, uid)
            .spec
            .unwrap()
            .selector
            .unwrap()
            .match_labels
            .unwrap();
        let deployment = own
            .spec
            .as_ref()
            .unwrap()
            .selector
            .match_labels
            .clone()
            .unwrap();
        for sel in [&service, &pdb, &deployment] {
            assert!(selects(sel, &pods(own)), "{uid}: {sel:?}");
            assert!(
                !selects(sel, &pods(other)),
                "{uid} selects the other's pods: {sel:?}"
            );
        }
    }

    // A Deployment from before the UID label keeps its (immutable) selector; its pods get
    // the UID label, which the Service selects.
    let mut old = gateway_deployment(&spec(twin, "uid-b"));
    let legacy = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "sluice-gateway".to_owned(),
        ),
        (POLICY_LABEL.to_owned(), twin.to_owned()),
    ]);
    old.spec.as_mut().unwrap().selector.match_labels = Some(legacy.clone());
    let mut new = gateway_deployment(&spec(twin, "uid-b"));
    keep_selector(&mut new, &old);
    assert_eq!(
        new.spec.as_ref().unwrap().selector.match_labels,
        Some(legacy.clone())
    );
    assert!(
        selects(&legacy, &pods(&new)),
        "the template still matches the kept selector"
    );
    assert_eq!(pods(&new)[POLICY_UID_LABEL], "uid-b");
}
