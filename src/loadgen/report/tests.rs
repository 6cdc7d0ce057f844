//! Report tests on synthetic request results.
use super::*;
use std::time::Duration;

fn r(at: f64, outcome: Outcome, ttft: f64, tpot: f64, priority: &'static str) -> RequestResult {
    RequestResult {
        at,
        priority,
        outcome,
        ttft: Some(ttft),
        tpot: Some(tpot),
        gaps: vec![tpot; 3],
        tokens: 4,
        retried: false,
    }
}

#[test]
fn goodput_counts_only_requests_within_both_slos_and_429s_are_misses() {
    let results = vec![
        r(0.1, Outcome::Ok, 0.5, 0.02, "standard"), // good
        r(0.2, Outcome::Ok, 1.5, 0.02, "standard"), // TTFT miss
        r(1.1, Outcome::Ok, 0.5, 0.09, "standard"), // ITL miss
        r(1.2, Outcome::Rejected, 0.0, 0.0, "sheddable"),
        r(2.5, Outcome::Error, 0.0, 0.0, "standard"),
        r(3.5, Outcome::Ok, 0.2, 0.01, "critical"), // good
    ];
    let phases = [Phase {
        rate: 1.5,
        duration: Duration::from_secs(4),
    }];
    let rep = Report::new(&results, &phases, 4.0, 1.0, 0.05);
    assert_eq!(
        (rep.sent, rep.ok, rep.good, rep.rejected, rep.errors),
        (6, 4, 2, 1, 1)
    );
    assert_eq!(rep.goodput_rps, 0.5);
    assert!((rep.attainment_offered - 2.0 / 6.0).abs() < 1e-12);
    assert!((rep.attainment_admitted - 2.0 / 5.0).abs() < 1e-12);
    assert_eq!(rep.by_priority["sheddable"].rejected, 1);
    assert_eq!(rep.by_priority["critical"].good, 1);
    assert_eq!(
        rep.series.iter().map(|s| s.offered).collect::<Vec<_>>(),
        [2, 2, 1, 1]
    );
    assert_eq!(rep.ttft_s.unwrap().p50, 0.5);
    let table = rep.table();
    assert!(
        table.contains("goodput") && table.contains("0.50 req/s"),
        "{table}"
    );
    let svg = rep.svg();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{svg}");
}

#[test]
fn recovery_is_measured_after_the_peak_phase() {
    let phases = [
        Phase {
            rate: 1.0,
            duration: Duration::from_secs(2),
        },
        Phase {
            rate: 5.0,
            duration: Duration::from_secs(2),
        },
        Phase {
            rate: 1.0,
            duration: Duration::from_secs(12),
        },
    ];
    let mut results = Vec::new();
    for t in 0..16 {
        // Bad in the peak and for two seconds after it.
        let bad = (2..6).contains(&t);
        results.push(r(
            t as f64 + 0.5,
            Outcome::Ok,
            if bad { 5.0 } else { 0.1 },
            0.01,
            "standard",
        ));
    }
    // Recovered when a 3-s window from second 6 is ≥ 90% good.
    let rep = Report::new(&results, &phases, 16.0, 1.0, 0.05);
    assert_eq!(rep.recovery_s, Some(2.0));
    assert_eq!(rep.relapses, Some(0));
    // A bad second after the recovery is a relapse (oscillation).
    results[10].ttft = Some(5.0);
    let rep = Report::new(&results, &phases, 16.0, 1.0, 0.05);
    assert_eq!((rep.recovery_s, rep.relapses), (Some(2.0), Some(1)));
    let single = [Phase {
        rate: 1.0,
        duration: Duration::from_secs(16),
    }];
    assert_eq!(
        Report::new(&results, &single, 16.0, 1.0, 0.05).recovery_s,
        None
    );
}
