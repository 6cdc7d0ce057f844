//! The status a reconcile writes, as pure functions of the spec's validation, the
//! Deployment's status and the previous conditions, so every rule is unit-tested:
//! `lastTransitionTime` moves only when a condition's status does, an invalid spec is
//! reported once per generation and message, and a PodDisruptionBudget exists only above one
//! replica.

use k8s_openapi::api::apps::v1::DeploymentStatus;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::{Value, json};

/// A condition; its transition time is kept from `previous` when its status is unchanged.
pub fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    previous: &[Condition],
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time,
    }
}

fn patch(status: Value) -> Value {
    json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy", "status": status})
}

/// The status patch of a policy whose spec is invalid, or None when exactly this error was
/// already reported for this generation (no write, no duplicate Event).
pub fn invalid(
    generation: Option<i64>,
    message: &str,
    previous: &[Condition],
    now: &Time,
) -> Option<Value> {
    not_accepted(
        generation,
        "InvalidSpec",
        message,
        "the spec is not valid; nothing is deployed for it",
        previous,
        now,
    )
}

/// The status patch of a valid policy that asks for more than the operator allows (an image
/// or pod placement the admin did not allow: `reason`), or None when already reported.
pub fn not_allowed(
    generation: Option<i64>,
    reason: &str,
    message: &str,
    previous: &[Condition],
    now: &Time,
) -> Option<Value> {
    not_accepted(
        generation,
        reason,
        message,
        "the operator does not run what the spec asks for; nothing new is deployed for it",
        previous,
        now,
    )
}

fn not_accepted(
    generation: Option<i64>,
    reason: &str,
    message: &str,
    ready_message: &str,
    previous: &[Condition],
    now: &Time,
) -> Option<Value> {
    let already_reported = previous.iter().any(|c| {
        c.type_ == "Accepted"
            && c.status == "False"
            && c.reason == reason
            && c.message == message
            && c.observed_generation == generation
    });
    if already_reported {
        return None;
    }
    let c = |t, msg| condition(t, false, reason, msg, generation, previous, now);
    Some(patch(json!({
        "observedGeneration": generation,
        "conditions": [c("Accepted", message), c("Ready", ready_message)],
    })))
}

/// The status patch that records a valid spec before its objects are applied, or None when
/// `Accepted=True` is already recorded for this generation. Ready keeps its previous value
/// (no flapping on a new generation); a policy seen for the first time is `Reconciling`.
pub fn accepted(generation: Option<i64>, previous: &[Condition], now: &Time) -> Option<Value> {
    let done = previous.iter().any(|c| {
        c.type_ == "Accepted" && c.status == "True" && c.observed_generation == generation
    });
    if done {
        return None;
    }
    let ready = previous
        .iter()
        .find(|c| c.type_ == "Ready")
        .cloned()
        .unwrap_or_else(|| {
            condition(
                "Ready",
                false,
                "Reconciling",
                "applying the gateway objects",
                generation,
                previous,
                now,
            )
        });
    Some(patch(json!({
        "observedGeneration": generation,
        "conditions": [
            condition("Accepted", true, "Valid", "the spec is valid", generation, previous, now),
            ready,
        ],
    })))
}

/// The status patch of a valid policy whose objects could not be applied: `Ready=False`
/// with `reason` (`ApplyFailed`, `NameConflict`) and a message naming the object and the
/// API server's answer.
pub fn not_applied(
    generation: Option<i64>,
    previous: &[Condition],
    reason: &str,
    message: &str,
    now: &Time,
) -> Value {
    patch(json!({
        "observedGeneration": generation,
        "conditions": [
            condition("Accepted", true, "Valid", "the spec is valid", generation, previous, now),
            condition("Ready", false, reason, message, generation, previous, now),
        ],
    }))
}

/// The status patch of a valid policy whose objects were applied; `discovery` says whether
/// its gateways follow its Service's pods, and why not (condition `Discovery`).
pub fn reconciled(
    generation: Option<i64>,
    previous: &[Condition],
    deployment: &DeploymentStatus,
    replicas: i32,
    endpoint: &str,
    discovery: &crate::discovery::Plan,
    now: &Time,
) -> Value {
    let available = deployment.conditions.as_ref().is_some_and(|cs| {
        cs.iter()
            .any(|c| c.type_ == "Available" && c.status == "True")
    });
    let ready = deployment.ready_replicas.unwrap_or(0);
    let reason = if available {
        "DeploymentAvailable"
    } else {
        "DeploymentNotAvailable"
    };
    let message = format!("{ready}/{replicas} gateway replicas ready");
    patch(json!({
        "observedGeneration": generation,
        "conditions": [
            condition("Accepted", true, "Valid", "the spec is valid", generation, previous, now),
            condition("Ready", available, reason, &message, generation, previous, now),
            condition(
                "Discovery",
                discovery.discovers,
                discovery.reason,
                &discovery.message,
                generation,
                previous,
                now
            ),
        ],
        "replicas": deployment.replicas.unwrap_or(0),
        "readyReplicas": ready,
        "endpoint": endpoint,
    }))
}

/// Whether applying the status patch `patch` would leave the policy's status `current` as it
/// is (the operator is its only writer): then a resync writes nothing.
pub fn unchanged(current: Option<&crate::policy::RateLimitPolicyStatus>, patch: &Value) -> bool {
    let Some(current) = current else {
        return false;
    };
    let Ok(mut new) =
        serde_json::from_value::<crate::policy::RateLimitPolicyStatus>(patch["status"].clone())
    else {
        return false;
    };
    let mut current = current.clone();
    current.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    new.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    new == current
}

/// Whether a policy with `replicas` gateway replicas gets a PodDisruptionBudget (one replica
/// or none: a PDB would block node drains, so an existing one is deleted).
pub fn wants_pdb(replicas: i32) -> bool {
    replicas > 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DeploymentCondition;
    use k8s_openapi::jiff::Timestamp;

    #[test]
    fn a_status_equal_to_the_patch_needs_no_write() {
        let previous = [condition(
            "Ready",
            false,
            "Reconciling",
            "",
            Some(1),
            &[],
            &at(5),
        )];
        let dep = DeploymentStatus {
            replicas: Some(2),
            ready_replicas: Some(1),
            ..DeploymentStatus::default()
        };
        let patch = reconciled(Some(1), &previous, &dep, 2, "http://e/v1", &plan(), &at(10));
        let mut written: crate::policy::RateLimitPolicyStatus =
            serde_json::from_value(patch["status"].clone()).unwrap();
        assert!(!unchanged(None, &patch));
        written.conditions.reverse(); // order does not matter
        assert!(unchanged(Some(&written), &patch));
        // The next reconcile computes the same status from what was written: no write.
        let again = reconciled(
            Some(1),
            &written.conditions,
            &dep,
            2,
            "http://e/v1",
            &plan(),
            &at(20),
        );
        assert!(unchanged(Some(&written), &again));
        // A pod more is ready: a write.
        let more = DeploymentStatus {
            ready_replicas: Some(2),
            ..dep.clone()
        };
        let changed = reconciled(
            Some(1),
            &written.conditions,
            &more,
            2,
            "http://e/v1",
            &plan(),
            &at(20),
        );
        assert!(!unchanged(Some(&written), &changed));
    }

    fn plan() -> crate::discovery::Plan {
        crate::discovery::Plan {
            discovers: false,
            reason: "NotAService",
            message: "m".into(),
        }
    }

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn conditions(v: &Value) -> Vec<Condition> {
        serde_json::from_value(v["status"]["conditions"].clone()).unwrap()
    }

    fn deployment(available: bool, ready: i32) -> DeploymentStatus {
        DeploymentStatus {
            replicas: Some(2),
            ready_replicas: Some(ready),
            conditions: Some(vec![DeploymentCondition {
                type_: "Available".into(),
                status: if available { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn transition_time_moves_only_when_the_status_does() {
        let first = reconciled(
            Some(1),
            &[],
            &deployment(false, 0),
            2,
            "e",
            &plan(),
            &at(100),
        );
        let c1 = conditions(&first);
        assert_eq!(c1[1].status, "False");
        assert_eq!(c1[1].message, "0/2 gateway replicas ready");
        assert_eq!(c1[1].last_transition_time, at(100));
        // Later, still not ready but one replica more: message changes, time stays.
        let second = reconciled(
            Some(1),
            &c1,
            &deployment(false, 1),
            2,
            "e",
            &plan(),
            &at(200),
        );
        let c2 = conditions(&second);
        assert_eq!(c2[1].message, "1/2 gateway replicas ready");
        assert_eq!(c2[1].last_transition_time, at(100));
        assert_eq!(c2[0].last_transition_time, at(100), "Accepted unchanged");
        // Ready: the Ready condition transitions now.
        let third = reconciled(
            Some(2),
            &c2,
            &deployment(true, 2),
            2,
            "e",
            &plan(),
            &at(300),
        );
        let c3 = conditions(&third);
        assert_eq!(
            (c3[1].status.as_str(), c3[1].reason.as_str()),
            ("True", "DeploymentAvailable")
        );
        assert_eq!(c3[1].last_transition_time, at(300));
        assert_eq!(c3[0].observed_generation, Some(2));
        assert_eq!(third["status"]["readyReplicas"], 2);
        assert_eq!(third["status"]["endpoint"], "e");
    }

    #[test]
    fn an_invalid_spec_is_reported_once_per_generation_and_message() {
        let v = invalid(Some(3), "spec.defaults.ttft: must be > 0", &[], &at(10)).unwrap();
        let cs = conditions(&v);
        assert_eq!(cs[0].type_, "Accepted");
        assert_eq!(
            (cs[0].status.as_str(), cs[0].reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert_eq!(cs[1].type_, "Ready");
        assert_eq!(cs[1].status, "False");
        assert_eq!(v["status"]["observedGeneration"], 3);
        assert_eq!(
            invalid(Some(3), "spec.defaults.ttft: must be > 0", &cs, &at(20)),
            None
        );
        // Another message, or the same one at a new generation, is reported again.
        assert!(invalid(Some(3), "spec.defaults.itl: must be > 0", &cs, &at(20)).is_some());
        let again = invalid(Some(4), "spec.defaults.ttft: must be > 0", &cs, &at(20)).unwrap();
        assert_eq!(conditions(&again)[0].last_transition_time, at(10));
        // Valid again: Accepted transitions back to True.
        let ok = reconciled(Some(5), &cs, &deployment(true, 2), 2, "e", &plan(), &at(30));
        assert_eq!(conditions(&ok)[0].last_transition_time, at(30));
    }

    #[test]
    fn accepted_is_written_once_per_generation_and_keeps_ready() {
        let first = accepted(Some(1), &[], &at(10)).unwrap();
        let c = conditions(&first);
        assert_eq!(
            (c[0].type_.as_str(), c[0].status.as_str()),
            ("Accepted", "True")
        );
        assert_eq!(
            (c[1].type_.as_str(), c[1].reason.as_str()),
            ("Ready", "Reconciling")
        );
        assert_eq!(first["status"]["observedGeneration"], 1);
        assert_eq!(accepted(Some(1), &c, &at(20)), None, "already recorded");
        // A healthy policy's new generation: Accepted moves on, Ready stays as it was.
        let ready = conditions(&reconciled(
            Some(1),
            &c,
            &deployment(true, 2),
            2,
            "e",
            &plan(),
            &at(30),
        ));
        let next = conditions(&accepted(Some(2), &ready, &at(40)).unwrap());
        assert_eq!(next[0].observed_generation, Some(2));
        assert_eq!(next[1], ready[1]);
    }

    #[test]
    fn an_apply_failure_is_ready_false_with_its_reason_and_message() {
        let c = conditions(&accepted(Some(1), &[], &at(10)).unwrap());
        let v = not_applied(
            Some(1),
            &c,
            "NameConflict",
            "Service p-sluice exists",
            &at(20),
        );
        let c = conditions(&v);
        assert_eq!(c[0].status, "True");
        assert_eq!(c[1].status, "False");
        assert_eq!(c[1].reason, "NameConflict");
        assert_eq!(c[1].message, "Service p-sluice exists");
        assert_eq!(c[1].last_transition_time, at(10), "still False since 10");
    }

    #[test]
    fn a_pdb_only_above_one_replica() {
        assert!(!wants_pdb(0));
        assert!(!wants_pdb(1));
        assert!(wants_pdb(2));
    }
}
