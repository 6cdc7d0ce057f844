use super::*;

#[test]
fn failure_counts_of_deleted_policies_are_forgotten() {
    let failures = DashMap::new();
    let kept = ObjectRef::<RateLimitPolicy>::new("kept").within("ns");
    let deleted = ObjectRef::<RateLimitPolicy>::new("deleted").within("ns");
    failures.insert(kept.clone(), 3);
    failures.insert(deleted.clone(), 7);
    prune_failures(&failures, |p| *p == kept);
    assert_eq!(failures.len(), 1);
    assert_eq!(failures.get(&kept).map(|n| *n), Some(3));
}

#[test]
fn errors_name_what_failed_for_the_metric() {
    let apply = ReconcileError::Api {
        kind: "Deployment".into(),
        name: "x-sluice".into(),
        source: kube::Error::LinesCodecMaxLineLengthExceeded,
    };
    assert_eq!(apply.metric_label(), "Deployment");
    assert!(apply.to_string().contains("Deployment x-sluice"), "{apply}");
    let status = ReconcileError::Status(kube::Error::LinesCodecMaxLineLengthExceeded);
    assert_eq!(status.metric_label(), "status");
    assert_eq!(ReconcileError::NoNamespace.metric_label(), "namespace");
    assert_eq!(apply.ready_reason(), Some("ApplyFailed"));
    assert_eq!(status.ready_reason(), None);
    let conflict = ReconcileError::NameConflict {
        kind: "Service".into(),
        name: "p-sluice".into(),
    };
    assert_eq!(conflict.ready_reason(), Some("NameConflict"));
    assert_eq!(conflict.metric_label(), "conflict");
    assert!(
        conflict
            .to_string()
            .starts_with("Service p-sluice already exists")
    );
}
