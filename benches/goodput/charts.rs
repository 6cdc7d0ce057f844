//! The goodput benchmark's plots (see `common::plot` for the drawing).

use std::collections::BTreeMap;

use serde_json::Value;
use sluice::loadgen::arrivals::Phase;

use crate::common::plot::{COLORS, Chart, Series, stack};

/// `(median, min, max)`; the median of an even count is the mean of the middle two.
pub fn median_spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n.is_multiple_of(2) {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    };
    (median, v[0], v[n - 1])
}

/// Goodput against offered load: the median of the seeds per limiter, their spread as bars,
/// and the oracle min(λ, C*).
pub fn sweep(points: &[Value], c_star: f64, names: &[String], slo: (u128, u128)) -> String {
    let x_max = points
        .iter()
        .map(|p| p["load"].as_f64().unwrap_or(0.0))
        .fold(1.0, f64::max);
    let mut series = vec![Series {
        name: "oracle min(λ, C*)".into(),
        color: "#000000",
        points: vec![(0.0, 0.0), (1.0, c_star), (x_max, c_star)],
        dashed: true,
        ..Series::default()
    }];
    for (i, name) in names.iter().enumerate() {
        let mut by_load: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
        for p in points.iter().filter(|p| p["limiter"] == name.as_str()) {
            by_load
                .entry((p["load"].as_f64().unwrap_or(0.0) * 1000.0) as u64)
                .or_default()
                .push(p["goodput_rps"].as_f64().unwrap_or(0.0));
        }
        let mut s = Series {
            name: name.clone(),
            color: COLORS[i % COLORS.len()],
            ..Series::default()
        };
        for (m, v) in by_load {
            let (med, lo, hi) = median_spread(v);
            let x = m as f64 / 1000.0;
            s.points.push((x, med));
            s.bars.push((x, lo, hi));
        }
        series.push(s);
    }
    Chart {
        title: format!(
            "Goodput against offered load (TTFT ≤ {} ms, ITL ≤ {} ms; C* = {c_star:.1} req/s)",
            slo.0, slo.1
        ),
        x_label: "offered load (multiples of C*)".into(),
        y_label: "goodput (req/s meeting both SLOs)".into(),
        x_max,
        y_max: c_star * 1.2,
        x_suffix: "×".into(),
        series,
        ..Chart::default()
    }
    .svg()
}

/// One panel per limiter of the step run: offered and good requests per second (left axis)
/// and, for gateways, the reject probability (right axis).
pub fn step(steps: &BTreeMap<String, Value>, phases: &[Phase]) -> String {
    let secs: f64 = phases.iter().map(|p| p.duration.as_secs_f64()).sum();
    let y_max = phases.iter().map(|p| p.rate).fold(1.0, f64::max) * 1.1;
    let mut edges = Vec::new();
    let mut at = 0.0;
    for (i, p) in phases.iter().enumerate() {
        if i > 0 {
            edges.push((at, format!("{:.0} req/s", p.rate)));
        }
        at += p.duration.as_secs_f64();
    }
    let charts: Vec<Chart> = steps
        .iter()
        .map(|(name, r)| {
            let series_of = |key: &str| -> Vec<(f64, f64)> {
                r["series"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|s| {
                                (
                                    s["t"].as_f64().unwrap_or(0.0) + 0.5,
                                    s[key].as_f64().unwrap_or(0.0),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let mut series = vec![
                Series {
                    name: "offered (req/s)".into(),
                    color: "#999999",
                    points: series_of("offered"),
                    ..Series::default()
                },
                Series {
                    name: "met both SLOs (req/s)".into(),
                    color: "#2a9d2a",
                    points: series_of("good"),
                    ..Series::default()
                },
            ];
            if let Some(g) = r["gauges"].as_array().filter(|g| !g.is_empty()) {
                series.push(Series {
                    name: "reject probability".into(),
                    color: "#d62728",
                    points: g
                        .iter()
                        .map(|g| {
                            (
                                g["t"].as_f64().unwrap_or(0.0),
                                g["reject_probability"].as_f64().unwrap_or(0.0),
                            )
                        })
                        .filter(|(t, _)| *t <= secs)
                        .collect(),
                    right: true,
                    ..Series::default()
                });
            }
            let recovery = r["recovery_s"]
                .as_f64()
                .map(|s| format!("{s:.0} s"))
                .unwrap_or("none".into());
            Chart {
                title: format!("{name}: recovery {recovery} after the step down"),
                x_label: "time (s)".into(),
                y_label: "requests per second".into(),
                x_max: secs,
                y_max,
                y2: Some(("reject probability".into(), 1.0)),
                series,
                marks: edges.clone(),
                height: 170.0,
                ..Chart::default()
            }
        })
        .collect();
    stack(&charts)
}
