//! The followers' rules, event by event, without a cluster or a file system.

use super::*;

const VALID: &str = "apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: p}\nspec:\n  upstream: {url: 'http://127.0.0.1:9'}\n  defaults: {ttft: 1s, itl: 50ms}\n";

fn policy(generation: i64, ttft: &str) -> RateLimitPolicy {
    let text = VALID.replace("ttft: 1s", &format!("ttft: {ttft}"));
    let mut p = super::super::config::parse_policy_yaml(&text).unwrap();
    p.metadata.generation = Some(generation);
    p
}

fn applied(c: Option<Change>) -> i64 {
    match c {
        Some(Change::Apply { generation, .. }) => generation,
        other => panic!("expected Apply, got {other:?}"),
    }
}

#[test]
fn a_new_generation_applies_and_a_status_only_update_is_ignored() {
    let mut f = PolicyFollower::new();
    assert!(!f.up() && !f.present());
    assert_eq!(f.on_event(WatchEvent::Init), None);
    assert_eq!(applied(f.on_event(WatchEvent::Apply(&policy(1, "1s")))), 1);
    assert_eq!(f.on_event(WatchEvent::InitDone), None);
    assert!(f.up() && f.present());
    // The operator writes status: same generation, nothing to do.
    let mut status_only = policy(1, "1s");
    status_only.status = Some(Default::default());
    assert_eq!(f.on_event(WatchEvent::Apply(&status_only)), None);
    assert_eq!(applied(f.on_event(WatchEvent::Apply(&policy(2, "2s")))), 2);
}

#[test]
fn an_invalid_generation_is_rejected_once() {
    let mut f = PolicyFollower::new();
    applied(f.on_event(WatchEvent::Apply(&policy(1, "1s"))));
    let bad = policy(2, "0s");
    match f.on_event(WatchEvent::Apply(&bad)) {
        Some(Change::Reject(e)) => assert!(e.contains("spec.defaults.ttft"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(f.on_event(WatchEvent::Apply(&bad)), None);
}

#[test]
fn an_object_missing_from_a_relist_counts_as_deleted() {
    let mut f = PolicyFollower::new();
    applied(f.on_event(WatchEvent::Apply(&policy(3, "1s"))));
    assert_eq!(f.on_event(WatchEvent::Init), None);
    assert_eq!(f.on_event(WatchEvent::InitDone), Some(Change::Deleted));
    assert!(!f.present() && f.up());
    // Reported once: the next empty relist says nothing.
    f.on_event(WatchEvent::Init);
    assert_eq!(f.on_event(WatchEvent::InitDone), None);
}

#[test]
fn a_recreated_object_at_generation_1_is_applied_again() {
    let mut f = PolicyFollower::new();
    applied(f.on_event(WatchEvent::Apply(&policy(1, "1s"))));
    assert_eq!(f.on_event(WatchEvent::Delete), Some(Change::Deleted));
    assert!(!f.present());
    // Same generation number as before the delete, new object.
    assert_eq!(applied(f.on_event(WatchEvent::Apply(&policy(1, "3s")))), 1);
    assert!(f.present());
}

#[test]
fn an_error_incident_is_reported_once_and_its_end_once() {
    let mut f = PolicyFollower::new();
    applied(f.on_event(WatchEvent::Apply(&policy(1, "1s"))));
    assert_eq!(
        f.on_event(WatchEvent::Error("connection refused")),
        Some(Change::Failed("connection refused".into()))
    );
    assert!(!f.up());
    for _ in 0..50 {
        assert_eq!(f.on_event(WatchEvent::Error("connection refused")), None);
        assert_eq!(f.on_event(WatchEvent::Error("403 forbidden")), None);
    }
    assert!(f.present(), "an outage is not a deletion");
    // The watch relists after reconnecting.
    assert_eq!(f.on_event(WatchEvent::Init), Some(Change::Recovered));
    assert!(f.up());
    assert_eq!(f.on_event(WatchEvent::Apply(&policy(1, "1s"))), None);
    assert_eq!(f.on_event(WatchEvent::InitDone), None);
    // A new incident is reported again.
    assert!(matches!(
        f.on_event(WatchEvent::Error("timeout")),
        Some(Change::Failed(_))
    ));
    // An update that arrives with the recovery is applied (the recovery is implied).
    assert_eq!(applied(f.on_event(WatchEvent::Apply(&policy(2, "1s")))), 2);
    assert!(f.up());
}

#[test]
fn a_file_reports_changes_invalid_versions_and_read_errors_once() {
    let mut f = FileFollower::new(VALID.as_bytes().to_vec());
    assert_eq!(f.on_read(Ok(VALID.as_bytes().to_vec())), None);
    let v2 = VALID.replace("ttft: 1s", "ttft: 2s").into_bytes();
    assert_eq!(applied(f.on_read(Ok(v2.clone()))), 2);
    assert_eq!(f.on_read(Ok(v2.clone())), None);
    let bad = VALID.replace("ttft: 1s", "ttft: soon").into_bytes();
    assert!(matches!(
        f.on_read(Ok(bad.clone())),
        Some(Change::Reject(_))
    ));
    assert_eq!(f.on_read(Ok(bad)), None, "unchanged bytes: not again");
    let gone = || Err(std::io::Error::from(std::io::ErrorKind::NotFound));
    assert!(matches!(f.on_read(gone()), Some(Change::Failed(_))));
    assert!(!f.up());
    assert_eq!(f.on_read(gone()), None, "the same error once");
    // Back, with a new valid version: applied as generation 3.
    let v3 = VALID.replace("ttft: 1s", "ttft: 3s").into_bytes();
    assert_eq!(applied(f.on_read(Ok(v3.clone()))), 3);
    assert!(f.up());
    // Gone and back unchanged: only the recovery.
    assert!(matches!(f.on_read(gone()), Some(Change::Failed(_))));
    assert_eq!(f.on_read(Ok(v3)), Some(Change::Recovered));
}
