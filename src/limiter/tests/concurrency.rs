//! Work conservation, the good concurrency, the ceiling, unreachable thresholds and
//! Retry-After from every signal, on the manual clock.

use super::*;

const ALWAYS: f64 = 0.0;

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// A key whose averages sit far above both thresholds (r = 1.5: p = p_max).
fn hot(l: &Limiter, k: KeyId, now: Duration) {
    for _ in 0..10 {
        l.record(k, Signal::Ttft, 5.0, now).unwrap();
        l.record(k, Signal::Itl, 5.0, now).unwrap();
    }
}

#[test]
fn nothing_is_shed_with_nothing_in_flight_whatever_the_latency() {
    let l = Limiter::new(adaptive());
    let k = l.key("llama");
    hot(&l, k, SEC);
    let d = l.decide(k, Priority::Standard, SEC, &mut Sequence::new(vec![ALWAYS]));
    assert_eq!(d.verdict, Verdict::Admit);
    assert!(d.pressure >= 1.5, "the pressure is still reported: {d:?}");
    // One request in flight, above the good concurrency (0): the latency gate decides.
    l.begin_request(k);
    let d = l.decide(
        k,
        Priority::Standard,
        SEC,
        &mut Sequence::new(vec![ALWAYS, 0.0]),
    );
    assert_eq!(d.verdict, Verdict::Reject);
    // It finishes: nothing in flight again.
    l.end_request(k, SEC);
    assert_eq!(l.in_flight(k), 0);
    let d = l.decide(k, Priority::Standard, SEC, &mut Sequence::new(vec![ALWAYS]));
    assert_eq!(d.verdict, Verdict::Admit);
}

#[test]
fn below_the_good_concurrency_nothing_is_shed_and_it_is_learned_from_first_tokens() {
    let l = Limiter::new(adaptive()); // llama: TTFT 0.5 s, ITL 30 ms, τ 10 s
    let k = l.key("llama");
    // Six requests in flight; the sixth got its first token in 0.2 s with ITL at 20 ms: the
    // engine met both thresholds at concurrency 6.
    for _ in 0..6 {
        l.begin_request(k);
    }
    l.record(k, Signal::Itl, 0.02, SEC).unwrap();
    let c = l.begin_wait(k, SEC);
    assert_eq!(c, 6);
    l.end_wait(k, SEC);
    l.record_first_token(k, 0.2, c, SEC).unwrap();
    let reading = l.readings(SEC).find(|r| r.label == "llama").unwrap();
    assert_eq!((reading.in_flight, reading.good_concurrency), (6, 6.0));
    // Latency then jumps far above the thresholds (a long prompt, a noisy neighbour); with
    // 5 in flight, fewer than 6, the next request is admitted anyway.
    let t = SEC * 2;
    for _ in 0..10 {
        l.record(k, Signal::Ttft, 5.0, t).unwrap();
    }
    l.end_request(k, t);
    let d = l.decide(k, Priority::Standard, t, &mut Sequence::new(vec![ALWAYS]));
    assert_eq!(d.verdict, Verdict::Admit, "{d:?}");
    // At 6 the latency gate decides again.
    l.begin_request(k);
    let d = l.decide(
        k,
        Priority::Standard,
        t,
        &mut Sequence::new(vec![ALWAYS, 0.0]),
    );
    assert_eq!(d.verdict, Verdict::Reject, "{d:?}");
    // A first token that misses at concurrency ≤ G lowers G by 1/16; one above G does not.
    l.record_first_token(k, 2.0, 7, t).unwrap();
    assert_eq!(l.readings(t).next().unwrap().good_concurrency, 6.0);
    l.record_first_token(k, 2.0, 3, t).unwrap();
    let g = l.readings(t).next().unwrap().good_concurrency;
    assert!((g - 6.0 * 15.0 / 16.0).abs() < 1e-9, "{g}");
    // And it is forgotten: halved after 8τ = 80 s without a change.
    let later = t + Duration::from_secs(81);
    let g2 = l.readings(later).next().unwrap().good_concurrency;
    assert!((g2 - g / 2.0).abs() < 1e-9, "{g2}");
}

#[test]
fn the_ceiling_binds_once_a_queue_starts_and_grows_with_first_tokens_in_time() {
    let l = Limiter::new(adaptive()); // llama: TTFT 0.5 s
    let k = l.key("llama");
    // An idle engine answering fast: a client jumping to 30 requests at once is not shed,
    // though nothing is known of the engine's concurrency yet.
    l.record(k, Signal::Ttft, 0.05, SEC).unwrap();
    for _ in 0..30 {
        let d = l.decide(k, Priority::Standard, SEC, &mut Sequence::new(vec![ALWAYS]));
        assert_eq!(d.verdict, Verdict::Admit, "{d:?}");
        l.begin_request(k);
    }
    // A queue starts (TTFT at 60 % of its threshold, under it): on a cold key the ceiling is 4,
    // and the 31st request is shed with p_max before the latency crosses the threshold.
    for _ in 0..20 {
        l.record(k, Signal::Ttft, 0.3, SEC).unwrap();
    }
    let d = l.decide(
        k,
        Priority::Standard,
        SEC,
        &mut Sequence::new(vec![ALWAYS, 0.0]),
    );
    assert_eq!(d.verdict, Verdict::Reject, "{d:?}");
    assert_eq!(d.reject_probability, 0.9);
    assert!(d.pressure < 1.0);
    let d = l.decide(k, Priority::Standard, SEC, &mut Sequence::new(vec![0.95]));
    assert_eq!(d.verdict, Verdict::Admit, "p_max < 1 lets probes through");
    let d = l.decide(k, Priority::Critical, SEC, &mut Sequence::new(vec![ALWAYS]));
    assert_eq!(
        d.verdict,
        Verdict::Admit,
        "critical requests pass the ceiling"
    );
    // A probe's first token in time at concurrency 31: G = 31, the ceiling is 31; with 30 in
    // flight (< G) nothing is shed.
    l.record_first_token(k, 0.3, 31, SEC).unwrap();
    let d = l.decide(k, Priority::Standard, SEC, &mut Sequence::new(vec![ALWAYS]));
    assert_eq!(d.verdict, Verdict::Admit, "30 in flight, G 31: {d:?}");
    // Below G even a sheddable request is admitted: work conservation comes first.
    for _ in 0..6 {
        l.end_request(k, SEC);
    }
    let d = l.decide(
        k,
        Priority::Sheddable,
        SEC,
        &mut Sequence::new(vec![ALWAYS]),
    );
    assert_eq!(d.verdict, Verdict::Admit, "24 in flight: {d:?}");
    // Back at G with the queue still there: the ceiling binds.
    for _ in 0..7 {
        l.begin_request(k);
    }
    let d = l.decide(
        k,
        Priority::Standard,
        SEC,
        &mut Sequence::new(vec![ALWAYS, 0.0]),
    );
    assert_eq!(d.verdict, Verdict::Reject, "31 in flight: at the ceiling");
}

#[test]
fn a_first_token_in_time_does_not_count_while_the_itl_average_is_over() {
    let l = Limiter::new(adaptive()); // ITL threshold 30 ms
    let k = l.key("llama");
    for _ in 0..10 {
        l.begin_request(k);
    }
    for _ in 0..10 {
        l.record(k, Signal::Itl, 0.05, SEC).unwrap(); // 10 in flight: not the baseline
    }
    l.record_first_token(k, 0.1, 10, SEC).unwrap();
    assert_eq!(l.readings(SEC).next().unwrap().good_concurrency, 0.0);
}

/// A request of the misconfigured-threshold scenario: the engine gives ITL 60 ms + 1 ms per
/// sequence, TTFT 0.1 s, 30 tokens.
struct Req {
    since: Duration,
    concurrency: u32,
    first: Duration,
    tokens: u32,
    next: Duration,
}

#[test]
fn an_unreachable_itl_threshold_sheds_nothing_at_low_load_and_is_reported() {
    // The policy asks for ITL ≤ 40 ms from an engine that gives 61 ms alone; 0.5 req/s.
    let mut c = adaptive();
    c.models[0].1 = th(1.0, 0.04, 4.0);
    let l = Limiter::new(c.clone());
    let k = l.key("llama");
    let mut rng = SplitMix64::new(7);
    let clock = ManualClock::starting_at(SEC);
    let mut next_arrival = clock.now();
    let mut active: Vec<Req> = Vec::new();
    let (mut admitted, mut shed) = (0u32, 0u32);
    let step = ms(5);
    while admitted + shed < 1000 {
        let now = clock.now();
        if now >= next_arrival {
            let d = l.decide(k, Priority::Standard, now, &mut rng);
            if d.admitted() {
                admitted += 1;
                l.begin_request(k);
                let concurrency = l.begin_wait(k, now);
                active.push(Req {
                    since: now,
                    concurrency,
                    first: now + ms(100),
                    tokens: 0,
                    next: now + ms(100),
                });
            } else {
                shed += 1;
            }
            let gap = -(1.0 - rng.next_f64()).ln() / 0.5;
            next_arrival = now + Duration::from_secs_f64(gap);
        }
        let n = active.len() as u64;
        for r in active.iter_mut().filter(|r| now >= r.next) {
            if r.tokens == 0 {
                l.end_wait(k, r.since);
                let ttft = (r.first - r.since).as_secs_f64();
                l.record_first_token(k, ttft, r.concurrency, now).unwrap();
            } else {
                l.record(k, Signal::Itl, (60 + n) as f64 / 1e3, now)
                    .unwrap();
            }
            r.tokens += 1;
            r.next = now + ms(60 + n);
        }
        active.retain(|r| {
            let done = r.tokens >= 30;
            if done {
                l.end_request(k, now);
            }
            !done
        });
        clock.advance(step);
    }
    assert!(
        f64::from(shed) <= 0.01 * f64::from(admitted + shed),
        "shed {shed} of 1000"
    );
    let now = clock.now();
    let r = l.readings(now).find(|r| r.label == "llama").unwrap();
    assert!(r.unreachable, "{r:?}");
    assert!(r.itl > 0.06, "the engine's ITL is measured as it is: {r:?}");
    // The user raises the threshold to what the engine can do: reachable again, at once.
    c.models[0].1.itl = 0.1;
    let next = Limiter::carry_over(c, &l);
    assert!(!next.readings(now).any(|r| r.unreachable));
}

#[test]
fn an_unreachable_threshold_still_sheds_queues() {
    let mut c = adaptive();
    c.models[0].1 = th(0.5, 0.04, 4.0);
    let l = Limiter::new(c);
    let k = l.key("llama");
    // Alone, ITL 60 ms: the baseline says 40 ms is unreachable; compared with 90 ms instead.
    l.begin_request(k);
    for _ in 0..40 {
        l.record(k, Signal::Itl, 0.06, SEC).unwrap();
    }
    let r = l.readings(SEC).next().unwrap();
    assert!(
        r.unreachable && (r.pressure - 0.06 / 0.09).abs() < 1e-9,
        "{r:?}"
    );
    // Busy now (8 in flight at G 8, under the ceiling as pressure < 0.5): requests queue and the waiting estimate
    // reaches 1 s: the TTFT threshold is reachable and still sheds.
    busy(&l, k, SEC);
    l.begin_wait(k, SEC);
    let t = SEC + ms(500);
    let d = l.decide(
        k,
        Priority::Standard,
        t,
        &mut Sequence::new(vec![ALWAYS, 0.0]),
    );
    assert_eq!(d.verdict, Verdict::Reject, "{d:?}");
    assert!((d.pressure - 2.0).abs() < 1e-9, "{d:?}");
    // And an ITL far above the replacement still sheds too.
    let l = Limiter::new(adaptive());
    let k = l.key("llama"); // ITL 30 ms
    l.begin_request(k);
    for _ in 0..40 {
        l.record(k, Signal::Itl, 0.06, SEC).unwrap();
    }
    busy(&l, k, SEC);
    for _ in 0..200 {
        l.record(k, Signal::Itl, 0.2, SEC).unwrap();
    }
    let d = l.decide(
        k,
        Priority::Standard,
        SEC,
        &mut Sequence::new(vec![ALWAYS, 0.0]),
    );
    assert_eq!(d.verdict, Verdict::Reject, "{d:?}");
}

#[test]
fn a_tightened_threshold_forgets_the_good_concurrency_a_loosened_one_keeps_it() {
    let l = Limiter::new(adaptive()); // llama: TTFT 0.5 s
    let k = l.key("llama");
    l.record_first_token(k, 0.3, 6, SEC).unwrap();
    let good = |l: &Limiter| {
        l.readings(SEC)
            .find(|r| r.label == "llama")
            .unwrap()
            .good_concurrency
    };
    assert_eq!(good(&l), 6.0);
    let mut c = adaptive();
    c.models[0].1.ttft = 0.6;
    let looser = Limiter::carry_over(c, &l);
    assert_eq!(good(&looser), 6.0, "met 0.5 s, so meets 0.6 s");
    let mut c = adaptive();
    c.models[0].1.ttft = 0.2;
    let tighter = Limiter::carry_over(c, &looser);
    assert_eq!(
        good(&tighter),
        0.0,
        "0.3 s first tokens say nothing about 0.2 s"
    );
}

#[test]
fn a_burst_admitted_at_low_counts_does_not_make_the_baseline() {
    let l = Limiter::new(adaptive()); // llama: TTFT 0.5 s
    let k = l.key("llama");
    // Thirty requests arrive together: the first four are admitted at counts 1–4, but queue
    // behind the rest at the engine; their first tokens come late, with 30 in flight.
    for _ in 0..30 {
        l.begin_request(k);
    }
    for c in [1, 2, 3, 4, 1, 2, 3, 4] {
        l.record_first_token(k, 2.0, c, SEC).unwrap();
    }
    let r = l.readings(SEC).next().unwrap();
    assert!(!r.unreachable, "{r:?}");
}

#[test]
fn past_the_ceiling_no_probe_is_let_through_while_the_queue_outlasts_the_threshold() {
    let l = Limiter::new(adaptive()); // llama: TTFT 0.5 s, p_max 0.9
    let k = l.key("llama");
    // 10 first tokens per second, in time at concurrency 6 (TTFT 0.3 s: the ceiling binds).
    let mut t = SEC;
    l.record(k, Signal::Itl, 0.01, t).unwrap();
    for _ in 0..100 {
        l.record_first_token(k, 0.3, 6, t).unwrap();
        t += Duration::from_millis(100);
    }
    for _ in 0..9 {
        l.begin_request(k);
    }
    // Two waiting for a first token drain in 0.2 s, within the threshold: probes (1 − p_max).
    l.begin_wait(k, t);
    l.begin_wait(k, t);
    let d = l.decide(k, Priority::Standard, t, &mut Sequence::new(vec![0.5]));
    assert_eq!(d.reject_probability, 0.9, "{d:?}");
    // Ten drain in 1 s, past the threshold: a probe would only wait there. None.
    for _ in 0..8 {
        l.begin_wait(k, t);
    }
    let d = l.decide(
        k,
        Priority::Standard,
        t,
        &mut Sequence::new(vec![0.95, 0.0]),
    );
    assert_eq!(
        (d.verdict, d.reject_probability),
        (Verdict::Reject, 1.0),
        "{d:?}"
    );
}

#[test]
fn with_long_generations_the_ceiling_binds_before_the_latency_shows_a_queue() {
    let l = Limiter::new(adaptive()); // llama: TTFT 0.5 s, p_max 0.9, τ 10 s
    let k = l.key("llama");
    // Eight in flight, first tokens in 50 ms at concurrency 8 (G = 8), ten a second: the
    // latency signals show no queue.
    let mut t = SEC;
    l.record(k, Signal::Itl, 0.01, t).unwrap();
    for _ in 0..8 {
        l.begin_request(k);
    }
    for _ in 0..20 {
        l.record_first_token(k, 0.05, 8, t).unwrap();
        t += ms(100);
    }
    // Before two requests have ended, slots are taken to free as fast as first tokens come:
    // the ninth would start within the threshold and is admitted.
    let admit =
        |l: &Limiter, t| l.decide(k, Priority::Standard, t, &mut Sequence::new(vec![ALWAYS]));
    assert_eq!(admit(&l, t).verdict, Verdict::Admit);
    // Generations last eight seconds: one request ends (and the next takes its slot) a second.
    for _ in 0..30 {
        l.end_request(k, t);
        l.begin_request(k);
        l.record_first_token(k, 0.05, 8, t).unwrap();
        t += SEC;
    }
    let r = l.readings(t).next().unwrap();
    assert!(r.pressure < 0.2 && r.good_concurrency == 8.0, "{r:?}");
    // Requests end slowly, but nothing says the engine is full (at low load they end slowly
    // because few arrive): a ninth is admitted.
    assert_eq!(admit(&l, t).verdict, Verdict::Admit);
    // One admitted at concurrency 9 got its first token after 0.8 s: the engine's limit.
    l.record_first_token(k, 0.8, 9, t).unwrap();
    // A ninth request would wait a second for a slot, twice the threshold: shed, and no
    // probe either (it would hold a slot for eight seconds after missing the SLO).
    let d = admit(&l, t);
    assert_eq!(
        (d.verdict, d.reject_probability),
        (Verdict::Reject, 1.0),
        "{d:?}"
    );
    let wait = d.retry_after.unwrap().as_secs_f64();
    assert!(
        (1.0..1.5).contains(&wait),
        "a slot frees in about 1 s: {wait}"
    );
    // With seven in flight a slot is free: admitted (the work conservation below G).
    l.end_request(k, t);
    assert_eq!(admit(&l, t).verdict, Verdict::Admit);
    l.begin_request(k);
    // The evidence lapses after 8τ without another miss above G: the next request at the
    // ceiling is admitted again (if the engine grew, it starts at once and G rises).
    let seen = t;
    while t < seen + 8 * 10 * SEC {
        l.end_request(k, t);
        l.begin_request(k);
        l.record_first_token(k, 0.05, 8, t).unwrap();
        t += SEC;
    }
    assert_eq!(admit(&l, t - SEC).reject_probability, 1.0, "still fresh");
    assert_eq!(admit(&l, t + SEC).verdict, Verdict::Admit, "lapsed");
}
