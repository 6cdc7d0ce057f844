//! Limiter tests with a manual clock and injected randomness.

use super::*;
use crate::random::Sequence;

mod admit;
mod concurrency;
mod engine;
mod fleet;
mod reload;
mod retry;

const SEC: Duration = Duration::from_secs(1);

fn th(ttft: f64, itl: f64, tau: f64) -> Thresholds {
    Thresholds {
        ttft,
        itl,
        time_constant: tau,
    }
}

/// A config builder for tests: defaults 1 s / 50 ms / τ 10 s, one named model "llama"; the
/// latency gate alone (see [`adaptive`]).
fn config() -> LimiterConfig {
    LimiterConfig {
        mode: Mode::Enforce,
        scope: Scope::PerModel,
        defaults: th(1.0, 0.05, 10.0),
        models: vec![("llama".into(), th(0.5, 0.03, 10.0))],
        shedding: Shedding {
            max_reject_probability: 0.9,
            ramp: 1.5,
            max_evidence: 200.0,
            sheddable_factor: 1.25,
            retry_after_jitter: 0.0,
            retry_after_cap: Duration::from_secs(60),
            adaptive_concurrency: false,
        },
    }
}

/// [`config`] with the adaptive concurrency (work conservation and the ceiling).
fn adaptive() -> LimiterConfig {
    let mut c = config();
    c.shedding.adaptive_concurrency = true;
    c
}

/// [`config`] with the hard cliff: `p_max = 1`, `ramp = 1`.
fn cliff_config() -> LimiterConfig {
    let mut c = config();
    c.shedding.max_reject_probability = 1.0;
    c.shedding.ramp = 1.0;
    c
}

/// Eight requests in flight (more than the low-concurrency baseline counts), as many as the
/// engine last served within the thresholds.
fn busy(l: &Limiter, key: KeyId, now: Duration) {
    let mut st = l.entries[key.0 as usize].lock();
    st.conc.in_flight = 8;
    st.conc.good = 8.0;
    st.conc.raised_at = now.as_secs_f64();
}

/// Feeds `n` samples of each signal at `now` so the averages equal the values, with the key
/// [`busy`].
fn load(l: &Limiter, key: KeyId, ttft: f64, itl: f64, now: Duration, n: usize) {
    busy(l, key, now);
    for _ in 0..n {
        l.record(key, Signal::Ttft, ttft, now).unwrap();
        l.record(key, Signal::Itl, itl, now).unwrap();
    }
}

#[test]
fn below_threshold_admits_with_zero_probability() {
    let l = Limiter::new(config());
    let k = l.key("llama");
    load(&l, k, 0.5, 0.03, SEC, 1); // exactly at both thresholds: r = 1
    let d = l.decide(k, Priority::Standard, SEC, &mut Sequence::new(vec![0.0]));
    assert_eq!(d.verdict, Verdict::Admit);
    assert_eq!(d.reject_probability, 0.0);
    assert!((d.pressure - 1.0).abs() < 1e-12);
    assert_eq!(d.retry_after, None);
}

#[test]
fn the_binding_signal_sets_the_pressure() {
    let l = Limiter::new(config());
    let k = l.key("llama");
    load(&l, k, 0.25, 0.036, SEC, 10); // ttft ratio 0.5, itl ratio 1.2
    let d = l.decide(k, Priority::Standard, SEC, &mut Sequence::new(vec![0.99]));
    assert!((d.pressure - 1.2).abs() < 1e-9, "{}", d.pressure);
    assert!((d.reject_probability - 0.9 * 0.4).abs() < 1e-9);
}

#[test]
fn probability_at_ramp_end_and_beyond_and_draws_decide() {
    let l = Limiter::new(config());
    let k = l.key("llama");
    load(&l, k, 0.75, 0.0, SEC, 10); // r = 1.5 = ramp
    let d = l.decide(
        k,
        Priority::Standard,
        SEC,
        &mut Sequence::new(vec![0.899, 0.0]),
    );
    assert_eq!(d.verdict, Verdict::Reject);
    assert!((d.reject_probability - 0.9).abs() < 1e-12);
    let d = l.decide(k, Priority::Standard, SEC, &mut Sequence::new(vec![0.9]));
    assert_eq!(
        d.verdict,
        Verdict::Admit,
        "a draw ≥ p admits (the probe trickle)"
    );
    load(&l, k, 5.0, 0.0, SEC, 200); // r ≈ 10
    let d = l.decide(
        k,
        Priority::Standard,
        SEC,
        &mut Sequence::new(vec![0.5, 0.0]),
    );
    assert!((d.reject_probability - 0.9).abs() < 1e-12);
    assert_eq!(d.verdict, Verdict::Reject);
}

#[test]
fn observed_reject_rate_matches_probability() {
    let l = Limiter::new(config());
    let k = l.key("llama");
    load(&l, k, 0.625, 0.0, SEC, 10); // r = 1.25 → p = 0.45
    let mut rng = SplitMix64::new(42);
    let n = 20_000;
    let rejected = (0..n)
        .filter(|_| !l.decide(k, Priority::Standard, SEC, &mut rng).admitted())
        .count();
    let rate = rejected as f64 / n as f64;
    assert!((rate - 0.45).abs() < 0.015, "rate {rate}");
}

#[test]
fn hard_cliff_rejects_every_request_past_the_threshold() {
    let l = Limiter::new(cliff_config());
    let k = l.key("llama");
    load(&l, k, 0.51, 0.0, SEC, 10);
    let mut rng = SplitMix64::new(1);
    for _ in 0..1000 {
        assert_eq!(
            l.decide(k, Priority::Standard, SEC, &mut rng).verdict,
            Verdict::Reject
        );
    }
}

#[test]
fn shadow_mode_never_rejects_but_reports() {
    let mut c = config();
    c.mode = Mode::Shadow;
    let l = Limiter::new(c);
    let k = l.key("llama");
    load(&l, k, 5.0, 0.0, SEC, 10);
    let d = l.decide(k, Priority::Standard, SEC, &mut Sequence::new(vec![0.0]));
    assert_eq!(d.verdict, Verdict::ShadowReject);
    assert!(d.admitted());
    assert!(d.reject_probability > 0.0);
    assert!(d.retry_after.is_some());
}

#[test]
fn critical_is_never_shed_and_sheddable_is_shed_first() {
    let l = Limiter::new(config());
    let k = l.key("llama");
    load(&l, k, 50.0, 1.0, SEC, 10); // recorded at the ramp end: r = 1.5
    let d = l.decide(k, Priority::Critical, SEC, &mut Sequence::new(vec![0.0]));
    assert_eq!(d.verdict, Verdict::Admit);
    assert_eq!(d.reject_probability, 0.0);
    assert!(
        (d.pressure - 1.5).abs() < 1e-9,
        "critical still reports the pressure"
    );

    let l = Limiter::new(config());
    let k = l.key("llama");
    load(&l, k, 0.45, 0.0, SEC, 10); // r = 0.9: standard admitted, sheddable at 1.125
    let std = l.decide(k, Priority::Standard, SEC, &mut Sequence::new(vec![0.0]));
    assert_eq!(std.verdict, Verdict::Admit);
    assert_eq!(std.reject_probability, 0.0);
    let shed = l.decide(
        k,
        Priority::Sheddable,
        SEC,
        &mut Sequence::new(vec![0.0, 0.0]),
    );
    assert_eq!(shed.verdict, Verdict::Reject);
    assert!((shed.pressure - 1.125).abs() < 1e-9);
    assert!((shed.reject_probability - 0.9 * 0.25).abs() < 1e-9);
}

#[test]
fn an_idle_limiter_reopens() {
    let mut c = config();
    c.shedding.retry_after_cap = Duration::from_secs(3600);
    let l = Limiter::new(c);
    let k = l.key("llama");
    load(&l, k, 5.0, 0.5, SEC, 200);
    let d = l.decide(
        k,
        Priority::Standard,
        SEC,
        &mut Sequence::new(vec![0.0, 0.0]),
    );
    assert_eq!(d.verdict, Verdict::Reject);
    let later = SEC + d.retry_after.unwrap() + SEC;
    let d = l.decide(k, Priority::Standard, later, &mut Sequence::new(vec![0.0]));
    assert_eq!(d.verdict, Verdict::Admit);
    assert!(d.pressure < 1.0);
}

#[test]
fn unknown_models_share_other_with_the_default_thresholds() {
    let l = Limiter::new(config());
    let named = l.key("llama");
    assert_eq!(l.label(named), "llama");
    assert_eq!(l.thresholds(named).ttft, 0.5);
    assert_eq!(
        l.key_count(),
        1,
        "`other` is not reported before it is used"
    );
    let a = l.key("mistral");
    assert_eq!(l.label(a), OTHER_LABEL);
    assert_eq!(l.thresholds(a), config().defaults);
    assert_eq!(l.key("LLAMA"), a, "names are exact");
    assert_eq!(l.key_count(), 2);
    let labels: Vec<&str> = l.readings(SEC).map(|r| r.label).collect();
    assert_eq!(labels, ["llama", "other"]);
}

#[test]
fn no_label_comes_from_client_text_under_100k_random_model_names() {
    let l = Limiter::new(config());
    let mut rng = SplitMix64::new(9);
    let mut name = String::new();
    for _ in 0..100_000 {
        name.clear();
        use std::fmt::Write;
        write!(name, "model-{:016x}", rng.next_u64()).unwrap();
        let k = l.key(&name);
        l.record(k, Signal::Ttft, 0.1, SEC).unwrap();
    }
    assert_eq!(l.key_count(), 2);
    let labels: Vec<&str> = l.readings(SEC).map(|r| r.label).collect();
    assert_eq!(labels, ["llama", "other"]);
}

#[test]
fn global_scope_shares_one_key() {
    let mut c = config();
    c.scope = Scope::Global;
    c.models.clear();
    let l = Limiter::new(c);
    assert_eq!(l.key("a"), l.key("b"));
    assert_eq!(l.label(l.key("a")), GLOBAL_LABEL);
    l.record(l.key("a"), Signal::Ttft, 1.25, SEC).unwrap();
    assert_eq!(l.averages(l.key("zzz"), SEC).0, 1.25);
}

#[test]
fn invalid_samples_are_refused_and_change_nothing() {
    let l = Limiter::new(config());
    let k = l.key("llama");
    l.record(k, Signal::Itl, 0.02, SEC).unwrap();
    assert_eq!(
        l.record(k, Signal::Itl, f64::NAN, SEC),
        Err(InvalidSample::NaN)
    );
    assert!(l.record(k, Signal::Ttft, -1.0, SEC).is_err());
    assert_eq!(l.averages(k, SEC), (0.0, 0.02));
}

#[test]
fn requests_waiting_for_their_first_token_raise_the_ttft_signal_until_they_stop_waiting() {
    let l = Limiter::new(config());
    let k = l.key("llama"); // TTFT threshold 0.5 s
    busy(&l, k, SEC);
    l.begin_wait(k, SEC);
    l.begin_wait(k, 2 * SEC);
    // At 3 s the ages are 2 s and 1 s: twice the mean age is 3 s.
    let at = 3 * SEC;
    assert_eq!(l.waiting(k, at), (2, 3.0));
    let d = l.decide(
        k,
        Priority::Standard,
        at,
        &mut Sequence::new(vec![0.0, 0.0]),
    );
    assert!((d.pressure - 6.0).abs() < 1e-9, "{}", d.pressure);
    assert_eq!(d.verdict, Verdict::Reject);
    let reading = l.readings(at).find(|r| r.label == "llama").unwrap();
    assert_eq!((reading.waiting, reading.waiting_ttft), (2, 3.0));
    assert_eq!(reading.ttft, 0.0, "the moving average has no samples");
    l.end_wait(k, SEC);
    assert_eq!(l.waiting(k, at), (1, 2.0));
    l.end_wait(k, 2 * SEC);
    assert_eq!(l.waiting(k, at), (0, 0.0));
}

#[test]
fn samples_beyond_the_ramp_end_are_recorded_at_it_except_for_the_hard_cliff() {
    let l = Limiter::new(config());
    let k = l.key("llama"); // TTFT threshold 0.5 s, ramp 1.5
    l.record(k, Signal::Ttft, 10.0, SEC).unwrap();
    assert!((l.averages(k, SEC).0 - 0.75).abs() < 1e-12);
    let cliff = Limiter::new(cliff_config());
    let k = cliff.key("llama");
    cliff.record(k, Signal::Ttft, 10.0, SEC).unwrap();
    assert_eq!(cliff.averages(k, SEC).0, 10.0);
}

#[test]
fn persistent_pressure_integrates_to_the_floor_and_the_gate_reopens_when_it_ends() {
    let l = Limiter::new(config());
    let k = l.key("llama"); // TTFT threshold 0.5 s, τ 10 s, p_max 0.9, ramp 1.5
    let never = || Sequence::new(vec![0.999_999, 0.0]);
    // r = 1.25 held: the first decision is the ramp's 0.45 ...
    load(&l, k, 0.625, 0.0, SEC, 10);
    let d = l.decide(k, Priority::Standard, SEC, &mut never());
    assert!((d.reject_probability - 0.45).abs() < 1e-9, "{d:?}");
    // ... one τ later the integral has fallen by (1.25 − 1)/(1.5 − 1) = 0.5.
    let t = SEC + Duration::from_secs(10);
    load(&l, k, 0.625, 0.0, t, 10);
    let d = l.decide(k, Priority::Standard, t, &mut never());
    let expect = 1.0 - 0.55 * (-0.5f64).exp();
    assert!((d.reject_probability - expect).abs() < 1e-9, "{d:?}");
    // Held much longer, it stops at p_max: a trickle of probes always gets through.
    let t = t + Duration::from_secs(100);
    load(&l, k, 0.625, 0.0, t, 10);
    let d = l.decide(k, Priority::Standard, t, &mut never());
    assert!((d.reject_probability - 0.9).abs() < 1e-9, "{d:?}");
    // The pressure falls below 1 with fresh samples under the threshold: the integral
    // alone keeps most of the gate shut (no flood on reopening) ...
    load(&l, k, 0.45, 0.0, t, 2000);
    let d = l.decide(k, Priority::Standard, t, &mut never());
    assert!(
        d.pressure < 1.0 && (d.reject_probability - 0.9).abs() < 1e-9,
        "{d:?}"
    );
    // A request shed by the integral is told to come back when it would be 0 again:
    // ln(1/0.1) · (ramp − 1) · τ = 2.3 · 0.5 · 10 s.
    let d = l.decide(k, Priority::Standard, t, &mut Sequence::new(vec![0.0, 0.0]));
    assert_eq!(d.verdict, Verdict::Reject);
    let expect = 10f64.ln() * 0.5 * 10.0;
    assert!(
        (d.retry_after.unwrap().as_secs_f64() - expect).abs() < 0.01,
        "{d:?}"
    );
    // ... and with no pressure it rises by 1/(ramp − 1) = 2 per τ from ln(0.1): fully open
    // within 1.2 τ.
    let t = t + Duration::from_secs(1000);
    // The metrics' reading, taken before any new decision, already shows the open gate.
    let reading = l.readings(t).find(|r| r.label == "llama").unwrap();
    assert_eq!(reading.reject_probability, 0.0, "{reading:?}");
    busy(&l, k, t); // (the good concurrency of 1000 s ago is forgotten; a fresh one)
    let d = l.decide(k, Priority::Standard, t, &mut never());
    assert!(d.pressure < 1e-6, "{d:?}");
    assert_eq!(d.reject_probability, 0.0, "{d:?}");
}

#[test]
fn the_hard_cliff_has_no_memory() {
    let l = Limiter::new(cliff_config());
    let k = l.key("llama");
    load(&l, k, 5.0, 0.0, SEC, 10);
    let d = l.decide(
        k,
        Priority::Standard,
        SEC,
        &mut Sequence::new(vec![0.5, 0.0]),
    );
    assert_eq!((d.reject_probability, d.verdict), (1.0, Verdict::Reject));
    let t = SEC + Duration::from_secs(60);
    load(&l, k, 0.4, 0.0, t, 200);
    let d = l.decide(k, Priority::Standard, t, &mut Sequence::new(vec![0.5]));
    assert!(d.pressure <= 1.0, "{d:?}");
    assert_eq!((d.reject_probability, d.verdict), (0.0, Verdict::Admit));
}
