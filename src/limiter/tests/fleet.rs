//! Routing over a fleet of endpoints: room first, power of two choices, shedding only when
//! every endpoint is over, the soonest Retry-After, reload carry-over by label.

use super::*;
use crate::limiter::fleet::Fleet;

fn labels(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("10.0.0.{i}:8000")).collect()
}

/// `endpoint`'s `llama` key: `in_flight` requests, good concurrency `good`, and moving
/// averages at `ttft` (threshold 0.5 s) with ITL within its threshold.
fn set(f: &Fleet, endpoint: usize, in_flight: u32, good: f64, ttft: f64, now: Duration) {
    let l = f.limiter(endpoint);
    let k = l.key("llama");
    for _ in 0..20 {
        l.record(k, Signal::Ttft, ttft, now).unwrap();
        l.record(k, Signal::Itl, 0.01, now).unwrap();
    }
    let mut st = l.entries[k.0 as usize].lock();
    st.conc.in_flight = in_flight;
    st.conc.good = good;
    st.conc.raised_at = now.as_secs_f64();
}

fn in_flight(f: &Fleet) -> Vec<u32> {
    (0..f.len())
        .map(|i| f.limiter(i).in_flight(f.limiter(i).key("llama")))
        .collect()
}

/// What `endpoint`'s limiter alone decides for a standard request with the draw `u` (counts
/// nothing).
fn alone(f: &Fleet, endpoint: usize, u: f64) -> Decision {
    let l = f.limiter(endpoint);
    l.decide(
        l.key("llama"),
        Priority::Standard,
        SEC,
        &mut Sequence::new(vec![u]),
    )
}

/// Draws that pick endpoints `a` then `b` (of `n`) as the two choices, then `rest`.
fn choose(n: usize, a: usize, b: usize, rest: &[f64]) -> Sequence {
    let b = if b > a { b - 1 } else { b };
    let mut v = vec![
        (a as f64 + 0.5) / n as f64,
        (b as f64 + 0.5) / (n - 1) as f64,
    ];
    v.extend_from_slice(rest);
    Sequence::new(v)
}

#[test]
fn a_request_goes_to_the_drawn_endpoint_with_room_and_less_pressure() {
    let f = Fleet::new(&adaptive(), &labels(3));
    // Endpoint 1 is over its thresholds with as many in flight as it served well: no room.
    set(&f, 1, 8, 8.0, 0.8, SEC);
    set(&f, 0, 2, 8.0, 0.3, SEC);
    let r = f.admit(
        "llama",
        Priority::Standard,
        SEC,
        &mut choose(3, 1, 0, &[0.0]),
    );
    assert_eq!((r.endpoint, r.decision.verdict), (0, Verdict::Admit));
    assert_eq!(in_flight(&f), [3, 8, 0], "counted where it was admitted");
    // Both drawn endpoints have room: the one with less pressure, then fewer in flight.
    set(&f, 2, 3, 8.0, 0.1, SEC);
    let r = f.admit("llama", Priority::Standard, SEC, &mut choose(3, 0, 2, &[]));
    assert_eq!(r.endpoint, 2, "pressure 0.2 beats 0.6");
    let g = Fleet::new(&adaptive(), &labels(2));
    set(&g, 0, 3, 8.0, 0.2, SEC);
    set(&g, 1, 1, 8.0, 0.2, SEC);
    let r = g.admit("llama", Priority::Standard, SEC, &mut choose(2, 0, 1, &[]));
    assert_eq!(r.endpoint, 1, "same pressure: fewer in flight");
}

#[test]
fn a_request_is_admitted_while_any_endpoint_has_room_even_one_not_drawn() {
    let f = Fleet::new(&adaptive(), &labels(4));
    for e in 0..3 {
        set(&f, e, 8, 8.0, 0.8, SEC);
    }
    set(&f, 3, 5, 8.0, 0.4, SEC);
    // The draws pick 0 and 1, both full; a third draw would shed everything (0.0 < p).
    let r = f.admit(
        "llama",
        Priority::Standard,
        SEC,
        &mut choose(4, 0, 1, &[0.0]),
    );
    assert_eq!((r.endpoint, r.decision.verdict), (3, Verdict::Admit));
    assert_eq!(in_flight(&f), [8, 8, 8, 6]);
}

#[test]
fn only_a_full_fleet_sheds_once_on_its_best_endpoint_with_the_soonest_retry_after() {
    // The latency gate alone, so the three endpoints shed with different probabilities.
    let f = Fleet::new(&config(), &labels(3));
    // All over; endpoint 2 least (r = 1.2), endpoint 0 most (r = 1.5, the clamp).
    set(&f, 0, 8, 8.0, 1.0, SEC);
    set(&f, 1, 8, 8.0, 0.7, SEC);
    set(&f, 2, 8, 8.0, 0.6, SEC);
    let p: Vec<f64> = (0..3)
        .map(|e| alone(&f, e, 1.0 - 1e-9).reject_probability)
        .collect();
    assert!(p[2] > 0.0 && p[2] < p[1] && p[1] <= p[0], "{p:?}");
    // A draw just above endpoint 2's probability admits there (and only there).
    let r = f.admit(
        "llama",
        Priority::Standard,
        SEC,
        &mut choose(3, 0, 1, &[p[2] + 1e-6]),
    );
    assert_eq!((r.endpoint, r.decision.verdict), (2, Verdict::Admit));
    assert_eq!(in_flight(&f), [8, 8, 9]);
    // A draw below sheds, with the shortest Retry-After of the three.
    let alone: Vec<Duration> = (0..3)
        .map(|e| alone(&f, e, 0.0).retry_after.unwrap())
        .collect();
    let r = f.admit(
        "llama",
        Priority::Standard,
        SEC,
        &mut choose(3, 0, 1, &[0.0, 0.0]),
    );
    assert_eq!(r.decision.verdict, Verdict::Reject);
    assert_eq!(
        r.decision.retry_after,
        alone.iter().min().copied(),
        "{alone:?}"
    );
    assert_eq!(in_flight(&f), [8, 8, 9], "a shed request counts nowhere");
    // Critical requests always have room (never shed for load): the less pressed of the two.
    let r = f.admit(
        "llama",
        Priority::Critical,
        SEC,
        &mut choose(3, 0, 1, &[0.0]),
    );
    assert_eq!((r.endpoint, r.decision.verdict), (1, Verdict::Admit));
}

#[test]
fn shadow_mode_serves_what_a_full_fleet_would_shed() {
    let mut c = adaptive();
    c.mode = Mode::Shadow;
    let f = Fleet::new(&c, &labels(2));
    set(&f, 0, 8, 8.0, 1.0, SEC);
    set(&f, 1, 8, 8.0, 1.0, SEC);
    let r = f.admit(
        "llama",
        Priority::Standard,
        SEC,
        &mut choose(2, 0, 1, &[0.0, 0.0]),
    );
    assert_eq!(r.decision.verdict, Verdict::ShadowReject);
    assert_eq!(in_flight(&f).iter().sum::<u32>(), 17, "served anyway");
}

#[test]
fn one_endpoint_decides_exactly_as_the_limiter_alone() {
    let f = Fleet::new(&adaptive(), &labels(1));
    let l = Limiter::new(adaptive());
    let k = l.key("llama");
    let mut t = SEC;
    let (mut a, mut b) = (SplitMix64::new(3), SplitMix64::new(3));
    for i in 0..400u32 {
        let ttft = 0.2 + f64::from(i % 40) * 0.02;
        for lim in [f.limiter(0), &l] {
            lim.record_first_token(k, ttft, 1 + i % 9, t).unwrap();
            if i % 3 == 0 {
                lim.end_request(k, t);
            }
        }
        let routed = f.admit("llama", Priority::Standard, t, &mut a);
        assert_eq!(
            routed.decision,
            l.admit(k, Priority::Standard, t, &mut b),
            "at {i}"
        );
        t += Duration::from_millis(50);
    }
}

#[test]
fn a_reload_keeps_each_endpoints_state_by_label_and_a_new_one_starts_afresh() {
    let f = Fleet::new(&adaptive(), &labels(3));
    for e in 0..3 {
        set(&f, e, e as u32 + 1, 8.0, 0.3, SEC);
    }
    // 10.0.0.1 goes, 10.0.0.9 comes, the order changes.
    let next_labels = vec![
        "10.0.0.2:8000".to_owned(),
        "10.0.0.9:8000".to_owned(),
        "10.0.0.0:8000".to_owned(),
    ];
    let mut c = adaptive();
    c.models[0].1.ttft = 0.6;
    let next = Fleet::carry_over(&c, &next_labels, Some(&f));
    assert_eq!(in_flight(&next), [3, 0, 1]);
    assert_eq!(next.position("10.0.0.0:8000"), Some(2));
    assert_eq!(next.position("10.0.0.1:8000"), None);
    let k = next.limiter(0).key("llama");
    assert_eq!(
        next.limiter(0).thresholds(k).ttft,
        0.6,
        "the new thresholds"
    );
    // The state is shared, not copied: a request ending on the old fleet's endpoint counts.
    f.limiter(2).end_request(k, SEC);
    assert_eq!(in_flight(&next)[0], 2);
}

#[test]
fn racing_admissions_never_overfill_an_endpoint() {
    // The hard cliff: an endpoint admits only with nothing in flight (p = 1 otherwise).
    let f = std::sync::Arc::new(Fleet::new(&cliff_config(), &labels(3)));
    for e in 0..3 {
        set(&f, e, 0, 0.0, 2.0, SEC);
    }
    for round in 0..200 {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let admitted: u32 = (0..8)
            .map(|t| {
                let (f, barrier) = (f.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut rng = SplitMix64::new(round * 8 + t);
                    barrier.wait();
                    let r = f.admit("llama", Priority::Standard, SEC, &mut rng);
                    u32::from(r.decision.verdict == Verdict::Admit)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(admitted, 3, "round {round}");
        assert_eq!(in_flight(&f), [1, 1, 1], "round {round}");
        for e in 0..3 {
            f.limiter(e).end_request(f.limiter(e).key("llama"), SEC);
        }
    }
}

#[test]
fn a_full_fleet_draws_on_the_endpoint_that_frees_first_not_the_one_with_fewest_in_flight() {
    // Every endpoint sheds for sure (the cliff). Endpoint 0 has the fewest in flight and
    // recovers last (a slow engine's lower ceiling); endpoint 2 recovers first.
    let f = Fleet::new(&cliff_config(), &labels(3));
    set(&f, 0, 7, 0.0, 2.0, SEC);
    set(&f, 1, 8, 0.0, 1.5, SEC);
    set(&f, 2, 8, 0.0, 0.8, SEC);
    let alone: Vec<Duration> = (0..3)
        .map(|e| {
            let d = alone(&f, e, 0.0);
            assert_eq!(d.verdict, Verdict::Reject, "endpoint {e}");
            d.retry_after.unwrap()
        })
        .collect();
    assert!(alone[2] < alone[1] && alone[1] < alone[0], "{alone:?}");
    let r = f.admit(
        "llama",
        Priority::Standard,
        SEC,
        &mut choose(3, 0, 1, &[0.0, 0.0]),
    );
    assert_eq!((r.endpoint, r.decision.verdict), (2, Verdict::Reject));
    assert_eq!(r.decision.retry_after, Some(alone[2]));
}

#[test]
fn an_ejected_endpoint_takes_nothing_until_its_time_is_up_unless_every_one_is_ejected() {
    use crate::limiter::fleet::health::{BASE_EJECTION, EJECT_AFTER};
    let f = Fleet::new(&adaptive(), &labels(3));
    let mut rng = SplitMix64::new(9);
    for _ in 0..EJECT_AFTER {
        f.report(1, false, SEC);
    }
    assert!(!f.up(1, SEC) && f.up(0, SEC) && f.up(2, SEC));
    let mut to = [0u32; 3];
    for _ in 0..60 {
        let r = f.admit("llama", Priority::Standard, SEC, &mut rng);
        to[r.endpoint] += 1;
        f.limiter(r.endpoint).end_request(r.key, SEC);
    }
    assert_eq!(to[1], 0, "{to:?}");
    assert!(to[0] > 0 && to[2] > 0, "{to:?}");
    // Its time is up: it takes requests again.
    let later = SEC + Duration::from_secs_f64(BASE_EJECTION);
    assert!(f.up(1, later));
    let back = (0..60)
        .map(|_| f.admit("llama", Priority::Standard, later, &mut rng))
        .filter(|r| r.endpoint == 1)
        .count();
    assert!(back > 0);
    // Every endpoint ejected: ejection is ignored rather than refusing everything.
    for e in 0..3 {
        for _ in 0..EJECT_AFTER {
            f.report(e, false, later);
        }
    }
    let r = f.admit("llama", Priority::Critical, later, &mut rng);
    assert_eq!(r.decision.verdict, Verdict::Admit);
}

#[test]
fn a_request_admitted_elsewhere_never_goes_back_to_the_endpoint_that_failed() {
    let f = Fleet::new(&adaptive(), &labels(3));
    let mut rng = SplitMix64::new(4);
    for _ in 0..100 {
        let r = f
            .admit_elsewhere("llama", Priority::Standard, SEC, &mut rng, 2)
            .unwrap();
        assert_ne!(r.endpoint, 2);
        assert_eq!(r.decision.verdict, Verdict::Admit);
        f.limiter(r.endpoint).end_request(r.key, SEC);
        assert_ne!(f.any(SEC, &mut rng, Some(0)), Some(0));
    }
    let one = Fleet::new(&adaptive(), &labels(1));
    assert!(
        one.admit_elsewhere("llama", Priority::Standard, SEC, &mut rng, 0)
            .is_none()
    );
    assert_eq!(one.any(SEC, &mut rng, Some(0)), None);
}

#[test]
fn a_new_endpoint_starts_at_the_typical_good_concurrency_of_the_others() {
    let f = Fleet::new(&adaptive(), &labels(3));
    for (e, good) in [(0, 12.0), (1, 6.0), (2, 9.0)] {
        set(&f, e, 0, good, 0.3, SEC);
    }
    let mut next_labels = labels(3);
    next_labels.push("10.0.0.9:8000".into());
    let next = Fleet::carry_over(&adaptive(), &next_labels, Some(&f));
    let good = |fl: &Fleet, e: usize| {
        let l = fl.limiter(e);
        l.readings(SEC)
            .find(|r| r.label == "llama")
            .unwrap()
            .good_concurrency
    };
    assert_eq!(good(&next, 3), 9.0, "the median of 12, 6, 9");
    assert_eq!(good(&next, 0), 12.0, "the others keep their own");
    // So it takes up to 9 at once (work conservation), though over its thresholds.
    let l = next.limiter(3);
    let k = l.key("llama");
    for _ in 0..20 {
        l.record(k, Signal::Ttft, 0.8, SEC).unwrap();
    }
    for i in 0..9 {
        assert_eq!(
            l.admit(k, Priority::Standard, SEC, &mut Sequence::new(vec![0.0]))
                .verdict,
            Verdict::Admit,
            "request {i}"
        );
    }
    // The first load of a policy has nothing to go by: every endpoint starts afresh.
    let fresh = Fleet::carry_over(&adaptive(), &labels(2), None);
    assert_eq!(good(&fresh, 1), 0.0);
}
