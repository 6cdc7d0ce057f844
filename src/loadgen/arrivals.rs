//! Arrival processes and the rate schedule of the load generator.
//!
//! Inter-arrival gaps follow a Gamma distribution with shape `k = 1 / burstiness` and mean
//! `1 / rate` (as `vllm bench serve` does): burstiness 1 is a Poisson process, above 1 arrivals
//! come in bursts, below 1 they are more regular. Gamma samples use Marsaglia & Tsang's method
//! ("A simple method for generating gamma variables", ACM TOMS 2000) with Box–Muller normals.

use std::time::Duration;

use crate::policy::duration::parse_duration;
use crate::random::{SplitMix64, Uniform};

/// One phase of a schedule: `rate` requests per second for `duration`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Phase {
    pub rate: f64,
    pub duration: Duration,
}

/// Parses `RATE@DURATION[,RATE@DURATION...]`, e.g. `5@30s,20@30s,5@30s`.
pub fn parse_schedule(text: &str) -> Result<Vec<Phase>, String> {
    let phases: Result<Vec<Phase>, String> = text
        .split(',')
        .map(|part| {
            let (rate, dur) = part
                .trim()
                .split_once('@')
                .ok_or_else(|| format!("{part:?}: expected RATE@DURATION, e.g. 10@30s"))?;
            let rate: f64 = rate
                .parse()
                .map_err(|_| format!("{rate:?} is not a rate in requests/s"))?;
            if !(rate > 0.0 && rate.is_finite()) {
                return Err(format!("rate {rate} must be positive"));
            }
            let duration = parse_duration(dur).map_err(|e| e.to_string())?;
            if duration.is_zero() {
                return Err(format!("{part:?}: the duration must be positive"));
            }
            Ok(Phase { rate, duration })
        })
        .collect();
    let phases = phases?;
    if phases.is_empty() {
        return Err("empty schedule".into());
    }
    Ok(phases)
}

/// A standard normal sample (Box–Muller).
fn normal(rng: &mut SplitMix64) -> f64 {
    let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
    let u2 = rng.next_f64();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// A Gamma(shape, 1) sample.
pub fn gamma(shape: f64, rng: &mut SplitMix64) -> f64 {
    if shape < 1.0 {
        // Boost: Gamma(k) = Gamma(k + 1) · U^(1/k).
        let u = rng.next_f64().max(f64::MIN_POSITIVE);
        return gamma(shape + 1.0, rng) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = rng.next_f64();
        if u < 1.0 - 0.0331 * x.powi(4) || u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
            return d * v;
        }
    }
}

/// Send times (offsets from the start) of every request of a schedule.
pub fn arrival_times(schedule: &[Phase], burstiness: f64, seed: u64) -> Vec<Duration> {
    let mut rng = SplitMix64::new(seed);
    let shape = 1.0 / burstiness;
    let mut out = Vec::new();
    let mut phase_start = 0.0;
    for p in schedule {
        let end = phase_start + p.duration.as_secs_f64();
        let mut t = phase_start;
        loop {
            // Mean gap 1/rate: Gamma(k, θ) with θ = 1/(rate·k).
            t += gamma(shape, &mut rng) / (p.rate * shape);
            if t >= end {
                break;
            }
            out.push(Duration::from_secs_f64(t));
        }
        phase_start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_and_errors_are_clear() {
        let s = parse_schedule("5@30s, 20@1m,5@500ms").unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[1],
            Phase {
                rate: 20.0,
                duration: Duration::from_secs(60)
            }
        );
        assert!(parse_schedule("5").unwrap_err().contains("RATE@DURATION"));
        assert!(parse_schedule("-1@3s").unwrap_err().contains("positive"));
        assert!(parse_schedule("x@3s").unwrap_err().contains("not a rate"));
        assert!(parse_schedule("1@3").is_err());
    }

    #[test]
    fn gamma_has_the_right_mean_and_variance() {
        let mut rng = SplitMix64::new(3);
        for shape in [0.5, 1.0, 4.0] {
            let n = 200_000;
            let xs: Vec<f64> = (0..n).map(|_| gamma(shape, &mut rng)).collect();
            let mean = xs.iter().sum::<f64>() / n as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            assert!(
                (mean - shape).abs() / shape < 0.02,
                "shape {shape}: mean {mean}"
            );
            assert!(
                (var - shape).abs() / shape < 0.05,
                "shape {shape}: variance {var}"
            );
        }
    }

    #[test]
    fn arrivals_follow_the_schedule_rate() {
        let s = parse_schedule("10@100s,40@100s").unwrap();
        for burstiness in [1.0, 3.0] {
            let t = arrival_times(&s, burstiness, 11);
            let first = t.iter().filter(|d| d.as_secs_f64() < 100.0).count();
            let second = t.len() - first;
            assert!(
                (first as f64 - 1000.0).abs() < 150.0,
                "burstiness {burstiness}: {first}"
            );
            assert!(
                (second as f64 - 4000.0).abs() < 400.0,
                "burstiness {burstiness}: {second}"
            );
            assert!(t.windows(2).all(|w| w[0] <= w[1]));
        }
        assert_eq!(
            arrival_times(&s, 1.0, 5),
            arrival_times(&s, 1.0, 5),
            "deterministic per seed"
        );
    }
}
