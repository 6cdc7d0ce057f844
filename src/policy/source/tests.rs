use super::*;

#[test]
fn an_upstream_that_is_the_gateway_itself_is_recognised() {
    let any: std::net::SocketAddr = "0.0.0.0:8080".parse().unwrap();
    let lo: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let u = |s: &str| s.parse::<http::Uri>().unwrap();
    for url in [
        "http://127.0.0.1:8080",
        "http://localhost:8080/v1",
        "http://[::1]:8080",
    ] {
        assert!(points_at(&u(url), any), "{url}");
        assert!(points_at(&u(url), lo), "{url}");
    }
    for url in [
        "http://127.0.0.1:8000",
        "http://vllm.inference.svc:8080",
        "http://10.0.0.5:8080",
        "https://localhost",
    ] {
        assert!(!points_at(&u(url), any), "{url}");
    }
    assert!(points_at(
        &u("http://localhost"),
        "0.0.0.0:80".parse().unwrap()
    ));
    assert!(!points_at(
        &u("http://127.0.0.1:0"),
        "127.0.0.1:0".parse().unwrap()
    ));
}

#[test]
fn a_looping_policy_is_refused_and_the_last_good_one_stays() {
    let yaml = |url: &str| {
        format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: p}}\nspec:\n  upstream: {{url: '{url}'}}\n"
        )
    };
    let store = PolicyStore::new(vec![]).listening_on("0.0.0.0:8080".parse().unwrap());
    let (_, good) = PolicyConfig::from_yaml(&yaml("http://vllm:8000")).unwrap();
    let (_, looping) = PolicyConfig::from_yaml(&yaml("http://localhost:8080")).unwrap();
    store.handle(
        "t",
        Change::Apply {
            generation: 1,
            config: Box::new(good),
        },
    );
    store.handle(
        "t",
        Change::Apply {
            generation: 2,
            config: Box::new(looping),
        },
    );
    assert_eq!(store.load().unwrap().generation, 1);
    assert_eq!(store.status().rejected.load(Ordering::Relaxed), 1);
}

fn policy(upstream: &str) -> PolicyConfig {
    let yaml = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: p}}\nspec:\n  upstream: {upstream}\n"
    );
    PolicyConfig::from_yaml(&yaml).unwrap().1
}

fn pods(names: &[&str]) -> Served {
    Served::Endpoints(
        (names.iter().enumerate())
            .map(|(i, n)| crate::discovery::Endpoint {
                url: format!("http://10.1.0.{i}:8000/").parse().unwrap(),
                label: (*n).to_owned(),
            })
            .collect(),
    )
}

fn labels(store: &PolicyStore) -> Vec<String> {
    let s = store.load().unwrap();
    (0..s.fleet.len())
        .map(|i| s.fleet.label(i).to_owned())
        .collect()
}

#[test]
fn a_service_url_is_served_itself_until_discovery_finds_its_pods() {
    let store = PolicyStore::new(vec![]);
    let mut target = store.discovery_target();
    store.apply(
        1,
        "t".into(),
        policy("{url: 'http://engine.inference.svc:8000'}"),
    );
    let service = target
        .borrow_and_update()
        .clone()
        .expect("the Service to discover");
    assert_eq!(service.describe(), "inference/engine:8000");
    assert_eq!(labels(&store), ["engine.inference.svc:8000"]);
    assert_eq!(store.discovery_state(), Some((false, 0)));

    store.discovered(&service, pods(&["engine-0", "engine-1"]), true);
    assert_eq!(labels(&store), ["engine-0", "engine-1"]);
    let s = store.load().unwrap();
    assert_eq!(s.endpoint_url(1).to_string(), "http://10.1.0.1:8000/");
    assert_eq!(
        (s.generation, store.status().applied.load(Ordering::Relaxed)),
        (1, 1)
    );
    assert_eq!(store.discovery_state(), Some((true, 2)));

    // A pod's state carries over when the set changes, as a model's does on a reload.
    let fleet = &store.load().unwrap().fleet;
    let key = fleet.limiter(1).key("m");
    fleet.limiter(1).admit(
        key,
        crate::limiter::Priority::Standard,
        Duration::ZERO,
        &mut crate::random::SplitMix64::new(1),
    );
    store.discovered(&service, pods(&["engine-1", "engine-2"]), true);
    let fleet = &store.load().unwrap().fleet;
    let k = fleet.limiter(0).key("m");
    assert_eq!(
        fleet.limiter(0).in_flight(k),
        1,
        "engine-1 kept its request in flight"
    );

    // A policy reload keeps the discovered endpoints; the Service URL comes back only on
    // fallback, and an empty set is an empty fleet.
    store.apply(
        2,
        "t".into(),
        policy("{url: 'http://engine.inference.svc:8000', timeout: 5s}"),
    );
    assert_eq!(labels(&store), ["engine-1", "engine-2"]);
    store.discovered(&service, Served::Endpoints(vec![]), true);
    assert!(store.load().unwrap().fleet.is_empty());
    store.discovered(&service, Served::ServiceUrl, false);
    assert_eq!(labels(&store), ["engine.inference.svc:8000"]);
    assert_eq!(store.discovery_state(), Some((false, 0)));
}

#[test]
fn discovery_is_off_for_none_for_lists_and_for_other_hosts_and_stale_news_is_ignored() {
    let store = PolicyStore::new(vec![]);
    let target = store.discovery_target();
    store.apply(
        1,
        "t".into(),
        policy("{url: 'http://engine.inference.svc:8000'}"),
    );
    let service = target.borrow().clone().unwrap();
    for upstream in [
        "{url: 'http://engine.inference.svc:8000', discovery: None}",
        "{url: 'http://engine.inference.svc:8000', endpoints: ['http://10.0.0.1:8000', 'http://10.0.0.2:8000']}",
        "{url: 'http://vllm.example.com:8000'}",
        "{url: 'https://engine.inference.svc:8443'}",
    ] {
        store.apply(2, "t".into(), policy(upstream));
        assert_eq!(*target.borrow(), None, "{upstream}");
        assert_eq!(store.discovery_state(), None, "{upstream}");
        // News about the Service of an earlier policy changes nothing.
        let before = labels(&store);
        store.discovered(&service, pods(&["engine-0"]), true);
        assert_eq!(labels(&store), before, "{upstream}");
    }
    // `--upstream` with a Service URL discovers it (the operator passes the URL that way).
    let store = PolicyStore::new(vec!["http://engine.other.svc:9000".parse().unwrap()]);
    store.apply(
        1,
        "t".into(),
        policy("{url: 'http://vllm.example.com:8000'}"),
    );
    let t = store.discovery_target().borrow().clone().unwrap();
    assert_eq!(t.describe(), "other/engine:9000");
}
