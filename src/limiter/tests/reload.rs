//! A policy reload swaps thresholds and shedding parameters; the per-key state (averages,
//! waiting requests, the shedding integral) carries on by label.

use super::*;

const NEVER: f64 = 0.999_999;

/// Puts `llama` (TTFT threshold 0.5 s, τ 10 s) under r = 1.25 for `secs` seconds, one
/// decision per second, and returns the time reached.
fn overload(l: &Limiter, secs: u64) -> Duration {
    let k = l.key("llama");
    let mut t = SEC;
    for _ in 0..secs {
        load(l, k, 0.625, 0.0, t, 10);
        l.decide(
            k,
            Priority::Standard,
            t,
            &mut Sequence::new(vec![NEVER, 0.0]),
        );
        t += SEC;
    }
    t
}

#[test]
fn an_edited_threshold_during_an_overload_keeps_the_integral_and_the_waiters() {
    let l = Limiter::new(config());
    let t = overload(&l, 30);
    let k = l.key("llama");
    l.begin_wait(k, t); // age 0 at t: it does not raise the TTFT signal yet
    let before = l.readings(t).find(|r| r.label == "llama").unwrap();
    assert!(before.reject_probability > 0.8, "{before:?}");

    // `kubectl patch`: the TTFT threshold moves from 0.5 s to 0.55 s (r falls to ~1.14).
    let mut c = config();
    c.models[0].1.ttft = 0.55;
    let next = Limiter::carry_over(c, &l);
    let k2 = next.key("llama");
    assert_eq!(next.thresholds(k2).ttft, 0.55);
    let after = next.readings(t).find(|r| r.label == "llama").unwrap();
    assert_eq!(after.ttft, before.ttft, "the averages carry over");
    assert_eq!(after.waiting, 1, "the waiting request carries over");
    // Without the integral, r = 1.14 alone would give the ramp's ~0.25: the gate stays as
    // shut as the integral says, instead of reopening.
    let ramp_only = decision::reject_probability(after.pressure, 0.9, 1.5);
    assert!(ramp_only < 0.3, "{ramp_only}");
    assert!(
        after.reject_probability > 0.8,
        "reject probability jumped from {} to {}",
        before.reject_probability,
        after.reject_probability
    );
    let d = next.decide(
        k2,
        Priority::Standard,
        t,
        &mut Sequence::new(vec![NEVER, 0.0]),
    );
    assert!(d.reject_probability > 0.8, "{d:?}");

    // The request admitted under the old policy stops waiting through its old limiter; the
    // new one sees it (one shared state, not counted twice or lost).
    l.end_wait(k, t);
    assert_eq!(next.waiting(k2, t).0, 0);
}

#[test]
fn other_carries_over_and_a_model_newly_named_starts_afresh() {
    let l = Limiter::new(config());
    let o = l.key("mistral");
    assert_eq!(l.label(o), OTHER_LABEL);
    load(&l, o, 0.7, 0.04, SEC, 5);

    let mut c = config();
    c.models.push(("mistral".into(), th(2.0, 0.1, 10.0)));
    let next = Limiter::carry_over(c, &l);
    let m2 = next.key("mistral");
    assert_eq!(next.label(m2), "mistral");
    assert_eq!(next.averages(m2, SEC), (0.0, 0.0));
    assert_eq!(next.thresholds(m2).ttft, 2.0);
    let o2 = next.key("anything");
    assert_eq!(
        next.averages(o2, SEC),
        (0.7, 0.04),
        "`other` keeps its state"
    );
}

#[test]
fn a_removed_model_loses_its_state() {
    let l = Limiter::new(config());
    let k = l.key("llama");
    load(&l, k, 0.4, 0.02, SEC, 5);
    overload(&l, 10);
    let mut c = config();
    c.models.clear();
    let next = Limiter::carry_over(c, &l);
    assert_eq!(next.key_count(), 0, "nothing carried over: {next:?}");
    let k2 = next.key("llama");
    assert_eq!(next.label(k2), OTHER_LABEL, "now an unknown model");
    assert_eq!(next.averages(k2, SEC), (0.0, 0.0));
    assert_eq!(next.thresholds(k2), config().defaults);
    let r = next.readings(SEC).find(|r| r.label == OTHER_LABEL).unwrap();
    assert_eq!((r.reject_probability, r.waiting), (0.0, 0));
}

#[test]
fn a_scope_change_starts_afresh() {
    let l = Limiter::new(config());
    let k = l.key("llama");
    load(&l, k, 0.4, 0.02, SEC, 5);
    let mut c = config();
    c.scope = Scope::Global;
    c.models.clear();
    let g = Limiter::carry_over(c.clone(), &l);
    assert_eq!(g.averages(g.key("llama"), SEC), (0.0, 0.0));
    load(&g, g.key("x"), 0.2, 0.01, SEC, 5);
    let g2 = Limiter::carry_over(c, &g);
    assert_eq!(
        g2.averages(g2.key("y"), SEC),
        (0.2, 0.01),
        "global to global"
    );
}

#[test]
fn reloading_again_and_again_grows_nothing() {
    let l = Limiter::new(config());
    for i in 0..10 {
        let k = l.key(&format!("m{i}"));
        load(&l, k, 0.1, 0.0, SEC, 3);
    }
    let mut cur = Limiter::carry_over(config(), &l);
    for _ in 0..5 {
        for i in 0..1000 {
            cur.key(&format!("new{i}"));
        }
        cur = Limiter::carry_over(config(), &cur);
        assert_eq!(cur.key_count(), 2, "llama and other: {cur:?}");
    }
    assert!((cur.averages(cur.key("m3"), SEC).0 - 0.1).abs() < 1e-12);
}
