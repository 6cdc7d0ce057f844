//! The load generator's report: goodput and SLO attainment, latency percentiles, 429 rate,
//! per-priority results, a per-second time series, the recovery time after the peak phase,
//! and its renderings (table, JSON, SVG).

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::arrivals::Phase;

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    /// 429 (after the retry, with --honor-retry-after).
    Rejected,
    /// Anything else: connection errors, other statuses, broken streams, timeouts.
    Error,
}

/// One request's measurements (seconds).
#[derive(Debug, Clone)]
pub struct RequestResult {
    /// Send time, seconds from the start.
    pub at: f64,
    pub priority: &'static str,
    pub outcome: Outcome,
    pub ttft: Option<f64>,
    /// Mean gap between content chunks (time per output token).
    pub tpot: Option<f64>,
    pub gaps: Vec<f64>,
    pub tokens: u32,
    pub retried: bool,
}

impl RequestResult {
    /// A request the client-side in-flight cap refused to send (counted as shed).
    pub(crate) fn capped(at: f64, priority: &'static str) -> RequestResult {
        RequestResult {
            at,
            priority,
            outcome: Outcome::Rejected,
            ttft: None,
            tpot: None,
            gaps: Vec::new(),
            tokens: 0,
            retried: false,
        }
    }

    /// Succeeded within both SLOs (a one-token answer has no gap and meets the ITL SLO).
    pub fn good(&self, ttft_slo: f64, itl_slo: f64) -> bool {
        self.outcome == Outcome::Ok
            && self.ttft.is_some_and(|t| t <= ttft_slo)
            && self.tpot.is_none_or(|t| t <= itl_slo)
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

fn percentiles(mut v: Vec<f64>) -> Option<Percentiles> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    Some(Percentiles {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
    })
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Group {
    pub sent: usize,
    pub good: usize,
    pub rejected: usize,
    pub errors: usize,
    /// good / sent.
    pub attainment: f64,
}

/// One second of the run (requests by send time).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Second {
    pub t: u64,
    pub offered: usize,
    pub good: usize,
    pub rejected: usize,
    pub errors: usize,
}

/// A sample of the gateway's limiter gauges (`--metrics-url`), `t` seconds into the run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GaugeSample {
    pub t: f64,
    pub ttft_ema_s: f64,
    pub itl_ema_s: f64,
    pub pressure: f64,
    pub reject_probability: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub duration_s: f64,
    pub ttft_slo_s: f64,
    pub itl_slo_s: f64,
    pub sent: usize,
    pub ok: usize,
    pub good: usize,
    pub rejected: usize,
    pub errors: usize,
    pub offered_rps: f64,
    /// Requests per second that met both SLOs (429s are misses).
    pub goodput_rps: f64,
    /// good / sent.
    pub attainment_offered: f64,
    /// good / (sent − rejected).
    pub attainment_admitted: f64,
    pub reject_rate: f64,
    pub ttft_s: Option<Percentiles>,
    /// Over every inter-token gap of successful requests.
    pub itl_s: Option<Percentiles>,
    pub by_priority: BTreeMap<String, Group>,
    pub series: Vec<Second>,
    /// Seconds after the peak phase until attainment (3 s window) is back at 90%.
    pub recovery_s: Option<f64>,
    /// After recovery, how many later 3-second windows fell below 90% attainment again
    /// (oscillation); None when there was no recovery.
    pub relapses: Option<usize>,
    /// The gateway's gauges once a second (with --metrics-url).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gauges: Vec<GaugeSample>,
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

impl Report {
    pub fn new(
        results: &[RequestResult],
        schedule: &[Phase],
        duration: f64,
        ttft_slo: f64,
        itl_slo: f64,
    ) -> Report {
        let good = |r: &RequestResult| r.good(ttft_slo, itl_slo);
        let count = |f: &dyn Fn(&RequestResult) -> bool| results.iter().filter(|r| f(r)).count();
        let (sent, ok) = (results.len(), count(&|r| r.outcome == Outcome::Ok));
        let n_good = count(&good);
        let rejected = count(&|r| r.outcome == Outcome::Rejected);
        let errors = count(&|r| r.outcome == Outcome::Error);
        let mut by_priority: BTreeMap<String, Group> = BTreeMap::new();
        for r in results {
            let g = by_priority.entry(r.priority.to_owned()).or_default();
            g.sent += 1;
            g.good += usize::from(good(r));
            g.rejected += usize::from(r.outcome == Outcome::Rejected);
            g.errors += usize::from(r.outcome == Outcome::Error);
        }
        for g in by_priority.values_mut() {
            g.attainment = ratio(g.good, g.sent);
        }
        let seconds = duration.ceil() as usize;
        let mut series: Vec<Second> = (0..seconds.max(1))
            .map(|t| Second {
                t: t as u64,
                offered: 0,
                good: 0,
                rejected: 0,
                errors: 0,
            })
            .collect();
        for r in results {
            let last = series.len() - 1;
            let s = &mut series[(r.at as usize).min(last)];
            s.offered += 1;
            s.good += usize::from(good(r));
            s.rejected += usize::from(r.outcome == Outcome::Rejected);
            s.errors += usize::from(r.outcome == Outcome::Error);
        }
        let ok_results = results.iter().filter(|r| r.outcome == Outcome::Ok);
        let recovery = recovery(&series, schedule);
        Report {
            duration_s: duration,
            ttft_slo_s: ttft_slo,
            itl_slo_s: itl_slo,
            sent,
            ok,
            good: n_good,
            rejected,
            errors,
            offered_rps: sent as f64 / duration,
            goodput_rps: n_good as f64 / duration,
            attainment_offered: ratio(n_good, sent),
            attainment_admitted: ratio(n_good, sent - rejected),
            reject_rate: ratio(rejected, sent),
            ttft_s: percentiles(ok_results.clone().filter_map(|r| r.ttft).collect()),
            itl_s: percentiles(ok_results.flat_map(|r| r.gaps.iter().copied()).collect()),
            by_priority,
            recovery_s: recovery.map(|r| r.0),
            relapses: recovery.map(|r| r.1),
            gauges: Vec::new(),
            series,
        }
    }

    /// A summary table for the terminal.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let ms = |v: f64| format!("{:.0} ms", v * 1000.0);
        let _ = writeln!(
            t,
            "offered           {:>10.2} req/s  ({} requests over {:.0} s)",
            self.offered_rps, self.sent, self.duration_s
        );
        let _ = writeln!(
            t,
            "goodput           {:>10.2} req/s  (TTFT <= {}, ITL <= {})",
            self.goodput_rps,
            ms(self.ttft_slo_s),
            ms(self.itl_slo_s)
        );
        let _ = writeln!(
            t,
            "SLO attainment    {:>9.1} %  of offered, {:.1} % of admitted",
            self.attainment_offered * 100.0,
            self.attainment_admitted * 100.0
        );
        let _ = writeln!(
            t,
            "shed (429)        {:>9.1} %  ({} requests; {} other errors)",
            self.reject_rate * 100.0,
            self.rejected,
            self.errors
        );
        if let Some(p) = self.ttft_s {
            let _ = writeln!(
                t,
                "TTFT p50/p90/p99  {} / {} / {}",
                ms(p.p50),
                ms(p.p90),
                ms(p.p99)
            );
        }
        if let Some(p) = self.itl_s {
            let _ = writeln!(
                t,
                "ITL  p50/p90/p99  {} / {} / {}",
                ms(p.p50),
                ms(p.p90),
                ms(p.p99)
            );
        }
        if let Some(r) = self.recovery_s {
            let _ = writeln!(
                t,
                "recovery          {r:>10.0} s after the peak phase, {} relapses below 90 % after it",
                self.relapses.unwrap_or(0)
            );
        }
        if self.by_priority.len() > 1 {
            for (p, g) in &self.by_priority {
                let _ = writeln!(
                    t,
                    "  {p:<10} sent {:>5}  good {:>5}  shed {:>5}  attainment {:>5.1} %",
                    g.sent,
                    g.good,
                    g.rejected,
                    g.attainment * 100.0
                );
            }
        }
        t
    }

    /// The per-second series as an SVG line chart: offered, good and shed requests per second.
    pub fn svg(&self) -> String {
        let (w, h, pad) = (800.0, 300.0, 40.0);
        let n = self.series.len().max(2) as f64;
        let ymax = self
            .series
            .iter()
            .map(|s| s.offered)
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        let x = |t: f64| pad + (w - 2.0 * pad) * t / (n - 1.0);
        let y = |v: f64| h - pad - (h - 2.0 * pad) * v / ymax;
        let line = |f: &dyn Fn(&Second) -> usize, color: &str, label: &str, row: f64| {
            let pts: Vec<String> = self
                .series
                .iter()
                .map(|s| format!("{:.1},{:.1}", x(s.t as f64), y(f(s) as f64)))
                .collect();
            format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n<text x=\"{}\" y=\"{}\" fill=\"{color}\" font-size=\"12\">{label}</text>\n",
                pts.join(" "),
                w - pad - 120.0,
                pad + row * 14.0
            )
        };
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"black\"/>\n<text x=\"{pad}\" y=\"{}\" font-size=\"12\">requests/s by send second (max {ymax:.0}); goodput {:.2} req/s, attainment {:.0} %</text>\n",
            h - pad,
            w - pad,
            h - pad,
            h - pad,
            pad - 10.0,
            self.goodput_rps,
            self.attainment_offered * 100.0
        );
        svg += &line(&|s| s.offered, "#777777", "offered", 0.0);
        svg += &line(&|s| s.good, "#2a9d2a", "met both SLOs", 1.0);
        svg += &line(&|s| s.rejected, "#d62728", "shed (429)", 2.0);
        svg += "</svg>\n";
        svg
    }
}

/// Seconds after the end of the highest-rate phase until the attainment of requests sent in a
/// 3-second window is back at 90 %, and how many times the sliding window fell below 90 %
/// again after that (None without a later phase, or if it never recovers).
fn recovery(series: &[Second], schedule: &[Phase]) -> Option<(f64, usize)> {
    let peak = schedule
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.rate.total_cmp(&b.1.rate))?
        .0;
    if peak + 1 >= schedule.len() {
        return None;
    }
    let end: f64 = schedule[..=peak]
        .iter()
        .map(|p| p.duration.as_secs_f64())
        .sum();
    let start = end.ceil() as usize;
    // None for a window without requests.
    let met = |s: usize| {
        let w = &series[s..s + 3];
        let (good, offered) = (
            w.iter().map(|x| x.good).sum::<usize>(),
            w.iter().map(|x| x.offered).sum::<usize>(),
        );
        (offered > 0).then_some(good as f64 >= 0.9 * offered as f64)
    };
    let last = series.len().saturating_sub(2);
    let recovered = (start..last).find(|&s| met(s) == Some(true))?;
    let (mut relapses, mut up) = (0, true);
    for s in recovered + 1..last {
        if let Some(now) = met(s) {
            relapses += usize::from(up && !now);
            up = now;
        }
    }
    Some((recovered as f64 - end, relapses))
}

#[cfg(test)]
mod tests;
