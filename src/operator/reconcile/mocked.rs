//! Every branch of one reconcile, against a scripted API server (no cluster): accepted and
//! applied, an invalid spec, an apply that fails, someone else's object, a Secret that did not
//! opt in, and the retry backoff. The same paths run against a real API server in
//! `tests/k8s_*.rs`; these pin the exact requests each branch sends.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};

use super::mock_api::{self, Script, Seen, failure};
use super::*;
use crate::operator::admission::PodAdmission;
use crate::operator::metrics::OperatorMetrics;

const IMAGE: &str = "sluice:test";

fn policy(spec: Value) -> Value {
    let mut full = json!({
        "upstream": {"url": "http://engine.ns.svc:8000"},
        "defaults": {"ttft": "1s", "itl": "50ms"},
    });
    if let (Some(full), Value::Object(extra)) = (full.as_object_mut(), spec) {
        full.extend(extra);
    }
    json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": "p", "namespace": "ns", "uid": "uid-1", "generation": 1,
                     "resourceVersion": "7"},
        "spec": full,
    })
}

struct Run {
    result: Result<Action, ReconcileError>,
    seen: Vec<Seen>,
    ctx: Arc<Context>,
    policy: Arc<RateLimitPolicy>,
    log: Arc<std::sync::Mutex<Vec<Seen>>>,
}

impl Run {
    async fn new(policy: Value, script: Script) -> Run {
        let (client, log) = mock_api::client(policy.clone(), script);
        let ctx = Arc::new(Context {
            client: client.clone(),
            gateway_image: IMAGE.into(),
            admission: PodAdmission {
                default_image: IMAGE.into(),
                allowed_images: vec![],
                allow_scheduling: false,
            },
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: "sluice-test".into(),
                    instance: None,
                },
            ),
            metrics: OperatorMetrics::new(),
            failures: DashMap::new(),
            owners: Default::default(),
        });
        let policy: Arc<RateLimitPolicy> = Arc::new(serde_json::from_value(policy).unwrap());
        let result = reconcile(policy.clone(), ctx.clone()).await;
        let seen = std::mem::take(&mut *log.lock().unwrap());
        Run {
            result,
            seen,
            ctx,
            policy,
            log,
        }
    }

    /// Reconciles `policy` again with the same operator state (caches, failure counts).
    async fn again(self, policy: RateLimitPolicy) -> Run {
        let policy = Arc::new(policy);
        let result = reconcile(policy.clone(), self.ctx.clone()).await;
        let seen = std::mem::take(&mut *self.log.lock().unwrap());
        Run {
            result,
            seen,
            policy,
            ..self
        }
    }

    fn requests(&self) -> Vec<String> {
        self.seen.iter().map(Seen::short).collect()
    }

    /// The last status written: its `Ready` condition's status and reason.
    fn ready(&self) -> (String, String) {
        let status = self
            .seen
            .iter()
            .rev()
            .find(|s| s.path.ends_with("/status"))
            .expect("a status write");
        let ready = status.body["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .expect("a Ready condition");
        (
            ready["status"].as_str().unwrap().into(),
            ready["reason"].as_str().unwrap().into(),
        )
    }

    /// The reasons of the Events published on the policy.
    fn events(&self) -> Vec<String> {
        self.seen
            .iter()
            .filter(|s| s.path.ends_with("/events"))
            .map(|s| s.body["reason"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn sent(&self, short: &str) -> &Seen {
        self.seen
            .iter()
            .find(|s| s.short() == short)
            .unwrap_or_else(|| panic!("no {short} in {:?}", self.requests()))
    }

    fn metrics(&self) -> String {
        self.ctx.metrics.render()
    }
}

fn no_script() -> Script {
    Box::new(|_| None)
}

/// The requests a new policy's first reconcile sends: `Accepted`, then for each owned object
/// a GET (is the name free?) and an apply, then `Ready`.
const FIRST_RECONCILE: [&str; 12] = [
    "PATCH p/status",
    "GET serviceaccounts/p-sluice",
    "PATCH serviceaccounts/p-sluice",
    "GET roles/p-sluice",
    "PATCH roles/p-sluice",
    "GET rolebindings/p-sluice",
    "PATCH rolebindings/p-sluice",
    "GET services/p-sluice",
    "PATCH services/p-sluice",
    "GET deployments/p-sluice",
    "PATCH deployments/p-sluice",
    "PATCH p/status",
];

#[tokio::test]
async fn a_new_policy_is_accepted_then_applied_without_force_then_reported() {
    let run = Run::new(policy(json!({})), no_script()).await;
    assert_eq!(
        run.result.as_ref().unwrap(),
        &Action::requeue(Duration::from_secs(300))
    );
    assert_eq!(run.requests(), FIRST_RECONCILE);
    let first = &run.seen[0].body["status"]["conditions"];
    assert!(
        first
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Accepted" && c["status"] == "True"),
        "{first}"
    );
    // A name nobody holds is applied without force: one created in between is a conflict.
    let owned = run.seen.iter().filter(|s| !s.path.ends_with("/status"));
    for s in owned.filter(|s| s.method == "PATCH") {
        assert!(!s.query.contains("force=true"), "{} {}", s.path, s.query);
    }
    let deployment = &run.sent("PATCH deployments/p-sluice").body;
    assert_eq!(deployment["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        IMAGE
    );
    assert_eq!(run.ready().0, "False", "no pod is ready yet");
    assert!(run.events().is_empty(), "{:?}", run.events());
    assert!(
        run.metrics()
            .contains(r#"sluice_operator_reconciles_total{error="",result="success"} 1"#),
        "{}",
        run.metrics()
    );
}

#[tokio::test]
async fn an_invalid_spec_is_reported_with_an_event_and_nothing_is_applied() {
    let run = Run::new(
        policy(json!({"defaults": {"ttft": "0s", "itl": "50ms"}})),
        no_script(),
    )
    .await;
    assert_eq!(run.result.as_ref().unwrap(), &Action::await_change());
    assert_eq!(run.requests()[0], "PATCH p/status");
    assert_eq!(run.ready(), ("False".into(), "InvalidSpec".into()));
    assert_eq!(run.events(), ["InvalidSpec"]);
    assert!(
        !run.requests().iter().any(|r| r.contains("p-sluice")),
        "{:?}",
        run.requests()
    );
    assert!(run.metrics().contains(r#"result="invalid""#));
}

#[tokio::test]
async fn a_failed_apply_is_apply_failed_in_status_and_retried_with_a_growing_backoff() {
    let script: Script = Box::new(|s| {
        (s.short() == "PATCH deployments/p-sluice")
            .then(|| failure(500, "InternalError", "etcd is down"))
    });
    let run = Run::new(policy(json!({})), script).await;
    let err = run.result.as_ref().unwrap_err();
    assert!(
        matches!(err, ReconcileError::Api { kind, .. } if kind == "Deployment"),
        "{err}"
    );
    assert_eq!(run.ready(), ("False".into(), "ApplyFailed".into()));
    assert_eq!(run.events(), ["ReconcileFailed"]);
    assert!(
        run.metrics()
            .contains(r#"sluice_operator_reconciles_total{error="Deployment",result="error"} 1"#),
        "{}",
        run.metrics()
    );
    // 1 s, 2 s, 4 s, ... up to 5 minutes; a success forgets the count.
    let mut delays = Vec::new();
    for _ in 0..12 {
        delays.push(error_policy(run.policy.clone(), err, run.ctx.clone()));
    }
    let secs = |s| Action::requeue(Duration::from_secs(s));
    assert_eq!(delays[..4], [secs(1), secs(2), secs(4), secs(8)]);
    assert_eq!(delays[11], secs(300));
    let ok = Run::new(policy(json!({})), no_script()).await;
    ok.ctx.failures.insert(ObjectRef::from_obj(&*ok.policy), 5);
    assert!(reconcile(ok.policy.clone(), ok.ctx.clone()).await.is_ok());
    assert!(ok.ctx.failures.is_empty());
}

#[tokio::test]
async fn someone_elses_object_under_the_name_is_a_conflict_and_is_left_alone() {
    let script: Script = Box::new(|s| {
        (s.short() == "GET services/p-sluice").then(|| {
            let theirs = json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "p-sluice", "namespace": "ns", "resourceVersion": "3"}});
            (200, theirs)
        })
    });
    let run = Run::new(policy(json!({})), script).await;
    assert!(
        matches!(run.result, Err(ReconcileError::NameConflict { ref kind, .. }) if kind == "Service")
    );
    let requests = run.requests();
    assert!(!requests.contains(&"PATCH services/p-sluice".to_owned()));
    assert!(
        !requests.iter().any(|r| r.contains("deployments")),
        "{requests:?}"
    );
    assert_eq!(run.ready(), ("False".into(), "NameConflict".into()));
    assert_eq!(run.events(), ["NameConflict"]);
}

#[tokio::test]
async fn a_name_taken_between_the_check_and_the_apply_is_a_conflict_not_a_takeover() {
    let script: Script = Box::new(|s| {
        (s.short() == "PATCH roles/p-sluice")
            .then(|| failure(409, "Conflict", "Apply failed with 1 conflict"))
    });
    let run = Run::new(policy(json!({})), script).await;
    assert!(
        matches!(run.result, Err(ReconcileError::NameConflict { ref kind, .. }) if kind == "Role"),
        "{:?}",
        run.result
    );
    assert!(!run.sent("PATCH roles/p-sluice").query.contains("force"));
    assert_eq!(run.ready(), ("False".into(), "NameConflict".into()));
}

fn secret_metadata(annotations: Value) -> (u16, Value) {
    (
        200,
        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
               "metadata": {"name": "key", "namespace": "ns", "annotations": annotations}}),
    )
}

/// Whether the Deployment the run applied gives the gateway the Secret `key`.
fn mounts_key(run: &Run) -> bool {
    run.sent("PATCH deployments/p-sluice")
        .body
        .to_string()
        .contains(r#""name":"key""#)
}

#[tokio::test]
async fn a_secret_without_the_opt_in_is_not_given_to_the_gateway() {
    let spec = json!({"upstream": {"url": "http://engine.ns.svc:8000",
                                   "apiKeySecretRef": {"name": "key", "key": "token"}}});
    let refuse: Script = Box::new(|s| {
        (s.short() == "GET secrets/key").then(|| secret_metadata(json!({"other": "x"})))
    });
    let run = Run::new(policy(spec.clone()), refuse).await;
    assert!(
        matches!(run.result, Err(ReconcileError::SecretNotAllowed { .. })),
        "{:?}",
        run.result
    );
    assert!(!mounts_key(&run), "the refused Secret reached the pod spec");
    assert_eq!(run.ready(), ("False".into(), "SecretNotAllowed".into()));

    let allow: Script = Box::new(|s| {
        (s.short() == "GET secrets/key").then(|| {
            secret_metadata(json!({"sluice.dev/upstream-key-for": "p/token",
                                   "sluice.dev/upstream-hosts": "engine.ns.svc:8000"}))
        })
    });
    let run = Run::new(policy(spec), allow).await;
    assert!(run.result.is_ok(), "{:?}", run.result);
    assert!(mounts_key(&run), "the opted-in Secret is mounted");
}

#[tokio::test]
async fn an_upstream_key_goes_to_a_fleet_only_if_the_secret_lists_every_endpoints_host() {
    let spec = json!({"upstream": {"url": "http://engine.ns.svc:8000",
        "endpoints": ["http://engine-0.ns.svc:8000", "http://elsewhere.example:8000"],
        "apiKeySecretRef": {"name": "key", "key": "token"}}});
    let hosts = |hosts: &'static str| -> Script {
        Box::new(move |s| {
            (s.short() == "GET secrets/key").then(|| {
                secret_metadata(json!({"sluice.dev/upstream-key-for": "p/token",
                                       "sluice.dev/upstream-hosts": hosts}))
            })
        })
    };
    let run = Run::new(policy(spec.clone()), hosts("engine-0.ns.svc")).await;
    assert!(
        matches!(run.result, Err(ReconcileError::SecretNotAllowed { ref why, .. }) if why.contains("elsewhere.example")),
        "{:?}",
        run.result
    );
    assert!(!mounts_key(&run));
    assert_eq!(
        run.requests()
            .iter()
            .filter(|r| *r == "GET secrets/key")
            .count(),
        1,
        "the Secret is read once"
    );
    let run = Run::new(
        policy(spec),
        hosts("engine-0.ns.svc, elsewhere.example:8000"),
    )
    .await;
    assert!(run.result.is_ok(), "{:?}", run.result);
    assert!(mounts_key(&run));
    // The gateway is told the endpoints, not the policy's url.
    let args = run.sent("PATCH deployments/p-sluice").body["spec"]["template"]["spec"]
        ["containers"][0]["args"]
        .to_string();
    assert!(args.contains(r#""--upstream","http://engine-0.ns.svc:8000/","--upstream","http://elsewhere.example:8000/""#), "{args}");
    assert!(!args.contains("http://engine.ns.svc:8000"), "{args}");
}

/// A watch cache holding `objects`.
fn store<K: crate::operator::owned::Owned>(objects: Vec<K>) -> kube::runtime::reflector::Store<K> {
    let mut writer = kube::runtime::reflector::store::Writer::<K>::default();
    for o in objects {
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(o));
    }
    writer.as_reader()
}

/// The objects the run applied of kind `K`, as the API server returned them.
fn applied<K: crate::operator::owned::Owned>(run: &Run, resource: &str) -> Vec<K> {
    run.seen
        .iter()
        .filter(|s| s.method == "PATCH" && s.path.contains(&format!("/{resource}/")))
        .map(|s| {
            let mut o = s.body.clone();
            o["metadata"]["resourceVersion"] = json!("1");
            serde_json::from_value(o).unwrap()
        })
        .collect()
}

#[tokio::test]
async fn a_resync_of_an_unchanged_policy_sends_no_request_and_a_hand_edit_is_corrected() {
    let first = Run::new(policy(json!({})), no_script()).await;
    assert!(first.result.is_ok());
    // The watches now hold what was applied; the policy holds the status that was written.
    let stores = crate::operator::owned::OwnedStores {
        deployments: store(applied(&first, "deployments")),
        services: store(applied(&first, "services")),
        service_accounts: store(applied(&first, "serviceaccounts")),
        roles: store(applied(&first, "roles")),
        role_bindings: store(applied(&first, "rolebindings")),
        pdbs: store(vec![]),
    };
    first
        .ctx
        .owners
        .stores
        .write()
        .unwrap()
        .push(stores.clone());
    let last_status = first
        .seen
        .iter()
        .rev()
        .find(|s| s.path.ends_with("/status"));
    let mut resync = (*first.policy).clone();
    resync.status = serde_json::from_value(last_status.unwrap().body["status"].clone()).unwrap();
    let run = first.again(resync.clone()).await;
    assert!(run.result.is_ok(), "{:?}", run.result);
    assert!(run.seen.is_empty(), "a resync sent {:?}", run.requests());

    // Someone edits the Service (a new resourceVersion): only the Service is applied again,
    // with force, and nothing is read first.
    let mut edited = (*stores.services.state()[0]).clone();
    edited.metadata.resource_version = Some("2".into());
    run.ctx.owners.stores.write().unwrap()[0].services = store(vec![edited]);
    let run = run.again(resync).await;
    assert_eq!(run.requests(), ["PATCH services/p-sluice"]);
    assert!(
        run.seen[0].query.contains("force=true"),
        "{}",
        run.seen[0].query
    );
}
