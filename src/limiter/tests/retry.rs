//! Retry-After: from the averages, the waiting requests and the concurrency ceiling, jittered,
//! at least 100 ms and capped.

use super::*;

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

const ALWAYS: f64 = 0.0;

#[test]
fn retry_after_is_when_a_read_falls_back_to_the_threshold() {
    let clock = ManualClock::starting_at(Duration::from_secs(100));
    let l = Limiter::new(config());
    let k = l.key("llama");
    busy(&l, k, clock.now());
    for _ in 0..50 {
        l.record(k, Signal::Ttft, 0.7, clock.now()).unwrap(); // r_ttft = 1.4
        l.record(k, Signal::Itl, 0.039, clock.now()).unwrap(); // r_itl = 1.3
        clock.advance(Duration::from_millis(20));
    }
    let d = l.decide(
        k,
        Priority::Standard,
        clock.now(),
        &mut Sequence::new(vec![0.0, 0.0]),
    );
    assert_eq!(d.verdict, Verdict::Reject);
    let retry = d.retry_after.unwrap();
    // Just before Retry-After the pressure is still above 1; at it, exactly 1.
    let start = clock.now();
    clock.set(start + retry - Duration::from_millis(50));
    let before = l.decide(
        k,
        Priority::Standard,
        clock.now(),
        &mut Sequence::new(vec![0.99]),
    );
    assert!(before.pressure > 1.0, "{}", before.pressure);
    clock.set(start + retry);
    let at = l.decide(
        k,
        Priority::Standard,
        clock.now(),
        &mut Sequence::new(vec![0.5]),
    );
    assert!((at.pressure - 1.0).abs() < 1e-6, "{}", at.pressure);
    // Only the integral's memory of the decay's tail above 1 still sheds (a little).
    assert!(
        at.reject_probability < 0.1 && at.reject_probability <= before.reject_probability,
        "{at:?} after {before:?}"
    );
    assert_eq!(at.verdict, Verdict::Admit);
}

#[test]
fn retry_after_is_jittered_and_capped() {
    let mut c = config();
    c.shedding.retry_after_jitter = 0.2;
    c.shedding.retry_after_cap = Duration::from_secs(5);
    let l = Limiter::new(c);
    let k = l.key("llama");
    load(&l, k, 0.6, 0.0, SEC, 1); // one sample: W = 1, wait = τ·ln(1.2)
    let base = 10.0 * 1.2f64.ln();
    let d = l.decide(
        k,
        Priority::Standard,
        SEC,
        &mut Sequence::new(vec![0.0, 0.5]),
    );
    let got = d.retry_after.unwrap().as_secs_f64();
    assert!((got - base * 1.1).abs() < 1e-6, "{got} vs {}", base * 1.1);
    load(&l, k, 500.0, 0.0, SEC, 10);
    let d = l.decide(
        k,
        Priority::Standard,
        SEC,
        &mut Sequence::new(vec![0.0, 0.99]),
    );
    assert_eq!(d.retry_after, Some(Duration::from_secs(5)));
}

#[test]
fn retry_after_follows_the_waiting_requests_when_they_alone_shed() {
    // The onset of an overload: averages under their thresholds, the integral at 0, but
    // requests have waited long for their first token. Retry-After is their drain time.
    let mut c = adaptive();
    c.shedding.retry_after_jitter = 0.0;
    let l = Limiter::new(c);
    let k = l.key("llama"); // TTFT threshold 0.5 s, τ 10 s
    busy(&l, k, SEC);
    // First tokens arrive at 20 per second for 10 s, all within the threshold.
    let mut t = SEC;
    for _ in 0..200 {
        l.record(k, Signal::Ttft, 0.2, t).unwrap();
        t += ms(50);
    }
    // 30 requests wait, sent 0.6 s ago: waiting estimate 1.2 s, pressure 2.4.
    for _ in 0..30 {
        l.begin_wait(k, t - ms(600));
    }
    let d = l.decide(
        k,
        Priority::Standard,
        t,
        &mut Sequence::new(vec![ALWAYS, 0.0]),
    );
    assert_eq!(d.verdict, Verdict::Reject);
    let (ttft, _) = l.averages(k, t);
    assert!(
        ttft < 0.5,
        "the average is still under its threshold: {ttft}"
    );
    // 30 waiting at about 20 first tokens per second: 1.5 s (not the 1 ms of old).
    let got = d.retry_after.unwrap().as_secs_f64();
    assert!((got - 1.5).abs() < 0.1, "{got}");
}

#[test]
fn retry_after_over_the_ceiling_is_the_time_to_get_back_under_it() {
    let mut c = adaptive();
    c.shedding.retry_after_jitter = 0.0;
    let l = Limiter::new(c);
    let k = l.key("llama");
    let mut t = SEC;
    // 10 first tokens per second for 10 s, in time at concurrency 6 (TTFT 0.3 s, pressure
    // 0.6: the ceiling binds): G = 6, the ceiling 6.
    l.record(k, Signal::Itl, 0.01, t).unwrap();
    for _ in 0..100 {
        l.record_first_token(k, 0.3, 6, t).unwrap();
        t += ms(100);
    }
    for _ in 0..9 {
        l.begin_request(k);
    }
    let d = l.decide(
        k,
        Priority::Standard,
        t,
        &mut Sequence::new(vec![ALWAYS, 0.0]),
    );
    assert_eq!(d.verdict, Verdict::Reject);
    // 9 in flight, under 6 after 4 finish: 0.4 s at 10 per second.
    let got = d.retry_after.unwrap().as_secs_f64();
    assert!((got - 0.4).abs() < 0.05, "{got}");
}

#[test]
fn retry_after_is_at_least_100_ms() {
    let mut c = adaptive();
    c.shedding.retry_after_jitter = 0.0;
    let l = Limiter::new(c);
    let k = l.key("llama");
    // Just over the threshold with one sample: the average is back under it within
    // τ·ln(1.01) = 0.1 s minus a little; the floor holds.
    busy(&l, k, SEC);
    l.record(k, Signal::Ttft, 0.504, SEC).unwrap();
    let d = l.decide(
        k,
        Priority::Standard,
        SEC,
        &mut Sequence::new(vec![ALWAYS, 0.0]),
    );
    assert_eq!(d.verdict, Verdict::Reject);
    assert_eq!(d.retry_after, Some(decision::MIN_RETRY_AFTER));
}
