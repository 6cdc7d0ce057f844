//! Leader election between operator processes on a real kube-apiserver, in the two ways it
//! must never produce two leaders or a long gap: a leader cut off from the API server (its
//! traffic held by a paused relay) gives up before a standby takes over, and a leader that
//! stops cleanly finishes the reconciles in flight and hands over at once.

mod support;

use std::time::{Duration, Instant};

use kube::api::{Api, PostParams};
use serde_json::json;
use sluice::policy::RateLimitPolicy;
use support::operator::{Env, accepted, lease_holder};
use support::relay::Relay;
use support::{TempFile, eventually};

fn policy(name: &str) -> RateLimitPolicy {
    serde_json::from_value(json!({
        "apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": name},
        "spec": {"upstream": {"url": "http://vllm.inference.svc:8000"}}
    }))
    .unwrap()
}

fn elect(
    fx: &Env,
    kubeconfig: &std::path::Path,
    id: &str,
    lease: &str,
) -> support::operator::Operator {
    support::operator::start_operator(
        &fx.ns.name,
        kubeconfig,
        &[
            "--leader-elect",
            "--lease-namespace",
            &fx.ns.name,
            "--lease-duration",
            lease,
            "--identity",
            id,
        ],
    )
}

/// The kubeconfig `path` with its server replaced by `addr` (the same TLS name, 127.0.0.1).
fn through(path: &std::path::Path, addr: std::net::SocketAddr) -> (TempFile, std::net::SocketAddr) {
    let text = std::fs::read_to_string(path).unwrap();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("server: https://"))
        .expect("a server line");
    let server: std::net::SocketAddr = line
        .trim()
        .trim_start_matches("server: https://")
        .parse()
        .unwrap();
    let out = TempFile(path.with_extension("relayed"));
    std::fs::write(
        &out.0,
        text.replace(&format!("https://{server}"), &format!("https://{addr}")),
    )
    .unwrap();
    (out, server)
}

// Multi-threaded: starting a process blocks its thread while it waits for the log line, and
// the relay must keep serving meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_gives_up_before_a_standby_takes_over() {
    let fx = Env::new("leader-partition").await;
    // Replica a reaches the API server only through a relay the test can pause.
    let (_, server) = through(&fx.id.kubeconfig.0, "127.0.0.1:1".parse().unwrap());
    let relay = Relay::start(server).await;
    let (a_kc, _) = through(&fx.id.kubeconfig.0, relay.addr);
    let mut a = elect(&fx, &a_kc.0, "replica-a", "3s");
    eventually(30, "a leads", || async {
        (lease_holder(&fx.k, &fx.ns.name).await.as_deref() == Some("replica-a")).then_some(())
    })
    .await;
    let _b = elect(&fx, &fx.id.kubeconfig.0, "replica-b", "3s");
    fx.api
        .create(&PostParams::default(), &policy("first"))
        .await
        .unwrap();
    accepted(&fx.api, "first").await;

    // Cut a off. It must stop leading (exit) before b holds the lease.
    relay.pause();
    let cut = Instant::now();
    let (mut a_exit, mut b_lead) = (None, None);
    while a_exit.is_none() || b_lead.is_none() {
        assert!(
            cut.elapsed() < Duration::from_secs(30),
            "a exited: {a_exit:?}, b leads: {b_lead:?}"
        );
        if a_exit.is_none()
            && let Some(status) = a.process.child.try_wait().unwrap()
        {
            assert!(
                !status.success(),
                "a gives up leadership with an error status"
            );
            a_exit = Some(cut.elapsed());
        }
        if b_lead.is_none()
            && lease_holder(&fx.k, &fx.ns.name).await.as_deref() == Some("replica-b")
        {
            b_lead = Some(cut.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (a_exit, b_lead) = (a_exit.unwrap(), b_lead.unwrap());
    assert!(
        a_exit < b_lead,
        "two leaders: a exited at {a_exit:?}, b led at {b_lead:?}"
    );
    // b reconciles now.
    fx.api
        .create(&PostParams::default(), &policy("second"))
        .await
        .unwrap();
    accepted(&fx.api, "second").await;
}

#[tokio::test]
async fn a_leader_that_stops_cleanly_hands_over_at_once() {
    let fx = Env::new("leader-release").await;
    // A long lease: without the release b would wait 60 s.
    let mut a = elect(&fx, &fx.id.kubeconfig.0, "replica-a", "60s");
    eventually(30, "a leads", || async {
        (lease_holder(&fx.k, &fx.ns.name).await.as_deref() == Some("replica-a")).then_some(())
    })
    .await;
    let _b = elect(&fx, &fx.id.kubeconfig.0, "replica-b", "60s");
    a.process.terminate();
    assert!(a.process.wait_exit(20).success());
    eventually(
        20,
        "b leads well before a 60 s lease could expire",
        || async {
            (lease_holder(&fx.k, &fx.ns.name).await.as_deref() == Some("replica-b")).then_some(())
        },
    )
    .await;
    let api: Api<RateLimitPolicy> = fx.api.clone();
    api.create(&PostParams::default(), &policy("after"))
        .await
        .unwrap();
    accepted(&api, "after").await;
}

#[tokio::test]
async fn a_stopped_leader_finishes_its_reconciles_in_flight_then_releases_the_lease() {
    let fx = Env::new("leader-drain").await;
    let mut a = elect(&fx, &fx.id.kubeconfig.0, "replica-a", "60s");
    eventually(30, "a leads", || async {
        (lease_holder(&fx.k, &fx.ns.name).await.as_deref() == Some("replica-a")).then_some(())
    })
    .await;
    // A burst: with 16 reconciles at a time, many are between their first status write
    // (Ready=Reconciling) and their last when the signal comes.
    let names: Vec<String> = (0..40).map(|i| format!("burst-{i}")).collect();
    for n in &names {
        fx.api
            .create(&PostParams::default(), &policy(n))
            .await
            .unwrap();
    }
    let reconciling = |p: &RateLimitPolicy| {
        p.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.reason == "Reconciling")
        })
    };
    eventually(30, "a reconcile in flight", || async {
        let list = fx.api.list(&Default::default()).await.ok()?;
        list.items.iter().any(reconciling).then_some(())
    })
    .await;
    a.process.terminate();
    assert!(a.process.wait_exit(30).success());
    // Every reconcile that started wrote its last status: none is left half done.
    let list = fx.api.list(&Default::default()).await.unwrap();
    let cut: Vec<_> = list
        .items
        .iter()
        .filter(|p| reconciling(p))
        .map(|p| p.metadata.name.clone())
        .collect();
    assert!(cut.is_empty(), "reconciles cut by the stop: {cut:?}");
    // And the lease is free for the next leader at once.
    let holder = lease_holder(&fx.k, &fx.ns.name).await;
    assert!(
        holder.as_deref().is_none_or(str::is_empty),
        "lease still held by {holder:?}"
    );
}
