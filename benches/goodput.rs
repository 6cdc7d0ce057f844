//! Goodput under overload: sluice against baselines on the simulated engine (the goodput issue).
//!
//! 1. Capacity C*: the highest Poisson rate at which ≥ 90 % of requests meet both SLOs with
//!    no limiter (binary search); the oracle line is min(λ, C*).
//! 2. A sweep of 0.5, 1, 1.5, 2, 3 and 4 × C* for four limiters — none (direct to the
//!    engine), the hard-cliff moving average (p_max = 1, ramp = 1, evidence uncapped), sluice's
//!    defaults, and a static in-flight cap tuned in hindsight (`loadgen --max-inflight`) — with
//!    at least 300 requests per point and three seeds; median and spread.
//! 3. A step 0.5 → 3 → 0.5 × C*: goodput, reject probability and moving averages per second;
//!    recovery time and relapses (oscillation) for each limiter.
//!
//! Every run starts a fresh `sluice sim-engine` process (and a fresh `sluice gateway` process
//! for the limiters that use one) on 127.0.0.1; the load generator runs in this process.
//!
//! Run: `cargo bench --bench goodput` (about 40 minutes on 2 cores). Environment:
//! - `SLUICE_GOODPUT_OUT`: output directory (default `target/goodput`): `results.json`,
//!   `sweep.svg`, `step.svg`, `summary.md`.
//! - `SLUICE_GOODPUT_PARTS`: comma list of `capacity,sweep,step` (default all).
//! - `SLUICE_GOODPUT_CAPACITY`: skip the search and use this C* (req/s).
//! - `SLUICE_GOODPUT_SEEDS`: seeds per point (default 3).
//! - `SLUICE_GOODPUT_LOADS`: multiples of C* for the sweep (default 0.5,1,1.5,2,3,4).
//! - `SLUICE_GOODPUT_CAP`: skip the in-flight cap tuning and use this cap.
//! - `SLUICE_GOODPUT_VARIANTS`: extra sluice settings to compare, `;`-separated
//!   `name:p_max:ramp:max_evidence:tau[:ttft_threshold]` (e.g. `slow:0.95:1.5:200:10s`).
//!
//! Results and the choice of defaults: docs/benchmarks.md.

#[path = "common/mod.rs"]
mod common;

use common::process::ChildProcess;
use common::spawn;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use sluice::loadgen::arrivals::Phase;
use sluice::loadgen::report::Report;
use sluice::loadgen::{LoadgenArgs, run_load};

use common::ENGINE;
const PROMPT_CHARS: (u32, u32) = (200, 1000);
const OUTPUT_TOKENS: (u32, u32) = (16, 48);
const TTFT_SLO: Duration = Duration::from_millis(500);
const ITL_SLO: Duration = Duration::from_millis(50);
/// Seconds per sweep point (more when needed for 300 requests).
const POINT_SECONDS: f64 = 15.0;
const MIN_REQUESTS: f64 = 300.0;

/// One way of protecting the engine.
#[derive(Debug, Clone)]
enum Limiter {
    None,
    /// Client-side cap on requests in flight.
    Cap(usize),
    /// A sluice gateway with this shedding configuration.
    Sluice(Shedding),
}

#[derive(Debug, Clone)]
struct Shedding {
    name: String,
    /// p_max, ramp, maxEvidence; None leaves `spec.shedding` out (the CRD's defaults).
    knobs: Option<(f64, f64, u32)>,
    /// timeConstant; None: the CRD's default.
    tau: Option<String>,
    ttft: String,
    itl: String,
}

impl Shedding {
    fn policy(&self, upstream: &str) -> String {
        let tau = self
            .tau
            .as_ref()
            .map(|t| format!(", timeConstant: {t}"))
            .unwrap_or_default();
        let mut doc = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: bench}}\nspec:\n  upstream: {{url: '{upstream}'}}\n  defaults: {{ttft: {}, itl: {}{tau}}}\n",
            self.ttft, self.itl
        );
        if let Some((p_max, ramp, evidence)) = self.knobs {
            let _ = writeln!(
                doc,
                "  shedding: {{maxRejectProbability: {p_max}, ramp: {ramp}, maxEvidence: {evidence}}}"
            );
        }
        doc
    }
}

impl Limiter {
    fn name(&self) -> String {
        match self {
            Limiter::None => "no limiter".into(),
            Limiter::Cap(n) => format!("in-flight cap {n}"),
            Limiter::Sluice(s) => s.name.clone(),
        }
    }
}

/// Thresholds as the docs advise: TTFT at half its SLO, ITL at 80 % of its SLO.
const TTFT_THRESHOLD: &str = "250ms";
const ITL_THRESHOLD: &str = "40ms";

fn cliff() -> Shedding {
    Shedding {
        name: "hard cliff".into(),
        knobs: Some((1.0, 1.0, 1_000_000)),
        tau: None,
        ttft: TTFT_THRESHOLD.into(),
        itl: ITL_THRESHOLD.into(),
    }
}

fn sluice_default() -> Shedding {
    Shedding {
        name: "sluice".into(),
        knobs: None,
        tau: None,
        ttft: TTFT_THRESHOLD.into(),
        itl: ITL_THRESHOLD.into(),
    }
}

fn variants() -> Vec<Shedding> {
    let Ok(spec) = std::env::var("SLUICE_GOODPUT_VARIANTS") else {
        return Vec::new();
    };
    spec.split(';')
        .filter(|s| !s.trim().is_empty())
        .map(|v| {
            let f: Vec<&str> = v.trim().split(':').collect();
            assert!(
                f.len() >= 5,
                "variant {v:?}: expected name:p_max:ramp:max_evidence:tau[:ttft]"
            );
            Shedding {
                name: f[0].into(),
                knobs: Some((
                    f[1].parse().expect("p_max"),
                    f[2].parse().expect("ramp"),
                    f[3].parse().expect("max_evidence"),
                )),
                tau: Some(f[4].into()),
                ttft: f.get(5).unwrap_or(&TTFT_THRESHOLD).to_string(),
                itl: ITL_THRESHOLD.into(),
            }
        })
        .collect()
}

/// A running system under test: engine (+ gateway); `url` is where load goes.
struct System {
    url: String,
    metrics_url: Option<String>,
    max_inflight: Option<usize>,
    _procs: Vec<ChildProcess>,
}

async fn start(limiter: &Limiter, seed: u64, dir: &Path) -> System {
    let seed_s = seed.to_string();
    let mut args = vec!["sim-engine", "--listen", "127.0.0.1:0", "--seed", &seed_s];
    args.extend_from_slice(ENGINE);
    let (engine, engine_url) = spawn(&args, "simulated engine", "/health").await;
    match limiter {
        Limiter::None | Limiter::Cap(_) => System {
            url: engine_url,
            metrics_url: None,
            max_inflight: match limiter {
                Limiter::Cap(n) => Some(*n),
                _ => None,
            },
            _procs: vec![engine],
        },
        Limiter::Sluice(s) => {
            let policy = dir.join("policy.yaml");
            std::fs::write(&policy, s.policy(&engine_url)).expect("write policy");
            let (gw, url) = common::spawn_gateway(&policy).await;
            System {
                metrics_url: Some(format!("{url}/metrics")),
                url,
                max_inflight: None,
                // The gateway stops before the engine.
                _procs: vec![gw, engine],
            }
        }
    }
}

fn args(sys: &System, schedule: Vec<Phase>, seed: u64) -> LoadgenArgs {
    LoadgenArgs {
        url: sys.url.clone(),
        model: "sim-llm".into(),
        endpoint: sluice::loadgen::Endpoint::Chat,
        api_key: None,
        rate: schedule[0].rate,
        duration: schedule[0].duration,
        schedule: Some(sluice::loadgen::Schedule(schedule)),
        burstiness: 1.0,
        prompt_chars: PROMPT_CHARS,
        output_tokens: OUTPUT_TOKENS,
        ttft_slo: TTFT_SLO,
        itl_slo: ITL_SLO,
        priority_mix: None,
        honor_retry_after: false,
        max_inflight: sys.max_inflight,
        metrics_url: sys.metrics_url.clone(),
        // Requests still waiting after 30 s are misses either way; the client gives up
        // (as real clients do) so a no-limiter run drains in bounded time.
        timeout: Duration::from_secs(30),
        seed,
        json: None,
        svg: None,
        quiet: true,
    }
}

async fn run(limiter: &Limiter, schedule: Vec<Phase>, seed: u64, dir: &Path) -> Report {
    let sys = start(limiter, seed, dir).await;
    run_load(&args(&sys, schedule, seed))
        .await
        .expect("load generator runs")
}

fn constant(rate: f64) -> Vec<Phase> {
    let secs = POINT_SECONDS.max(MIN_REQUESTS / rate);
    vec![Phase {
        rate,
        duration: Duration::from_secs_f64(secs),
    }]
}

/// Highest rate with ≥ 90 % attainment and no limiter, to within 2 % (seed 1).
async fn capacity(dir: &Path, log: &mut String) -> f64 {
    let (mut lo, mut hi) = (10.0f64, 120.0f64);
    while hi / lo > 1.02 {
        let mid = (lo * hi).sqrt();
        let r = run(&Limiter::None, constant(mid), 1, dir).await;
        let _ = writeln!(
            log,
            "capacity probe {mid:.1} req/s: attainment {:.1} %, TTFT p90 {:.0} ms",
            r.attainment_offered * 100.0,
            r.ttft_s.map(|p| p.p90 * 1000.0).unwrap_or(f64::NAN)
        );
        eprintln!("{}", log.lines().last().unwrap_or_default());
        if r.attainment_offered >= 0.9 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// `(median, min, max)`; the median of an even count is the mean of the middle two.
fn median_spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n.is_multiple_of(2) {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    };
    (median, v[0], v[n - 1])
}

fn env_list(name: &str) -> Option<Vec<String>> {
    std::env::var(name)
        .ok()
        .map(|s| s.split(',').map(|x| x.trim().to_owned()).collect())
}

fn main() {
    let rt = common::runtime();
    rt.block_on(bench());
}

async fn bench() {
    let out = PathBuf::from(
        std::env::var("SLUICE_GOODPUT_OUT").unwrap_or_else(|_| "target/goodput".into()),
    );
    std::fs::create_dir_all(&out).expect("create output directory");
    let parts = env_list("SLUICE_GOODPUT_PARTS")
        .unwrap_or_else(|| vec!["capacity".into(), "sweep".into(), "step".into()]);
    let seeds: u64 = std::env::var("SLUICE_GOODPUT_SEEDS")
        .ok()
        .map(|s| s.parse().expect("SLUICE_GOODPUT_SEEDS"))
        .unwrap_or(3);
    let loads: Vec<f64> = env_list("SLUICE_GOODPUT_LOADS")
        .map(|v| v.iter().map(|x| x.parse().expect("load")).collect())
        .unwrap_or_else(|| vec![0.5, 1.0, 1.5, 2.0, 3.0, 4.0]);
    let mut log = String::new();
    let mut results = json!({"engine": ENGINE, "prompt_chars": PROMPT_CHARS, "output_tokens": OUTPUT_TOKENS,
        "ttft_slo_s": TTFT_SLO.as_secs_f64(), "itl_slo_s": ITL_SLO.as_secs_f64()});

    let c_star = match std::env::var("SLUICE_GOODPUT_CAPACITY") {
        Ok(v) => v.parse().expect("SLUICE_GOODPUT_CAPACITY"),
        Err(_) if parts.iter().any(|p| p == "capacity") => capacity(&out, &mut log).await,
        Err(_) => panic!("set SLUICE_GOODPUT_CAPACITY or include the capacity part"),
    };
    let _ = writeln!(log, "C* = {c_star:.1} req/s");
    eprintln!("C* = {c_star:.1} req/s");
    results["capacity_rps"] = json!(c_star);

    // The in-flight cap, tuned in hindsight at 2 × C* (seed 1) over multiples of the batch size.
    let cap = match std::env::var("SLUICE_GOODPUT_CAP") {
        Ok(v) => v.parse().expect("SLUICE_GOODPUT_CAP"),
        Err(_) => {
            let mut best = (0usize, -1.0f64);
            for n in [32, 40, 48, 64, 96] {
                let r = run(&Limiter::Cap(n), constant(2.0 * c_star), 1, &out).await;
                let _ = writeln!(log, "cap {n} at 2x: goodput {:.2} req/s", r.goodput_rps);
                eprintln!("{}", log.lines().last().unwrap_or_default());
                if r.goodput_rps > best.1 {
                    best = (n, r.goodput_rps);
                }
            }
            best.0
        }
    };
    results["tuned_cap"] = json!(cap);

    let mut limiters = vec![
        Limiter::None,
        Limiter::Sluice(cliff()),
        Limiter::Sluice(sluice_default()),
        Limiter::Cap(cap),
    ];
    if let Some(only) = env_list("SLUICE_GOODPUT_LIMITERS") {
        limiters.retain(|l| only.iter().any(|o| l.name().starts_with(o.as_str())));
    }
    limiters.extend(variants().into_iter().map(Limiter::Sluice));

    if parts.iter().any(|p| p == "sweep") {
        let mut sweep = Vec::new();
        let names: Vec<String> = limiters.iter().map(|l| l.name()).collect();
        let mut table = format!(
            "| load × C* | oracle | {} |\n|---|---|{}\n",
            names.join(" | "),
            "---|".repeat(limiters.len())
        );
        for &m in &loads {
            let rate = m * c_star;
            let mut row = format!("| {m} | {:.1} |", rate.min(c_star));
            for l in &limiters {
                let mut goodputs = Vec::new();
                for seed in 1..=seeds {
                    let r = run(l, constant(rate), seed, &out).await;
                    eprintln!(
                        "{:>5.1}x {:<16} seed {seed}: goodput {:6.2} req/s, shed {:5.1} %, TTFT p99 {:6.0} ms",
                        m,
                        l.name(),
                        r.goodput_rps,
                        r.reject_rate * 100.0,
                        r.ttft_s.map(|p| p.p99 * 1000.0).unwrap_or(f64::NAN)
                    );
                    goodputs.push(r.goodput_rps);
                    sweep.push(json!({
                        "load": m, "rate": rate, "limiter": l.name(), "seed": seed,
                        "goodput_rps": r.goodput_rps, "reject_rate": r.reject_rate,
                        "attainment_offered": r.attainment_offered,
                        "attainment_admitted": r.attainment_admitted,
                        "ttft_s": r.ttft_s, "itl_s": r.itl_s, "sent": r.sent,
                        "errors": r.errors,
                    }));
                }
                let (med, lo, hi) = median_spread(goodputs);
                let _ = write!(row, " {med:.1} ({lo:.1}–{hi:.1}) |");
            }
            table.push_str(&row);
            table.push('\n');
            eprintln!("{row}");
        }
        let _ = writeln!(
            log,
            "\nGoodput, req/s: median (min–max) of {seeds} seeds\n\n{table}"
        );
        results["sweep"] = json!(sweep);
        std::fs::write(out.join("sweep.svg"), sweep_svg(&sweep, c_star, &limiters))
            .expect("write sweep.svg");
    }

    if parts.iter().any(|p| p == "step") {
        let phases = vec![
            Phase {
                rate: 0.5 * c_star,
                duration: Duration::from_secs(20),
            },
            Phase {
                rate: 3.0 * c_star,
                duration: Duration::from_secs(20),
            },
            Phase {
                rate: 0.5 * c_star,
                duration: Duration::from_secs(30),
            },
        ];
        let mut steps = BTreeMap::new();
        let mut table = String::from(
            "| limiter | goodput | recovery after the step | relapses |\n|---|---|---|---|\n",
        );
        for l in &limiters {
            let r = run(l, phases.clone(), 1, &out).await;
            let _ = writeln!(
                table,
                "| {} | {:.1} req/s | {} | {} |",
                l.name(),
                r.goodput_rps,
                r.recovery_s
                    .map(|s| format!("{s:.0} s"))
                    .unwrap_or_else(|| "not within the run".into()),
                r.relapses.map(|n| n.to_string()).unwrap_or("—".into())
            );
            eprintln!("{}", table.lines().last().unwrap_or_default());
            steps.insert(
                l.name(),
                serde_json::to_value(&r).expect("report serializes"),
            );
        }
        let _ = writeln!(
            log,
            "\nStep 0.5 → 3 → 0.5 × C* (20 s, 20 s, 30 s), seed 1\n\n{table}"
        );
        std::fs::write(out.join("step.svg"), step_svg(&steps, &phases)).expect("write step.svg");
        results["step"] = json!(steps);
    }

    std::fs::write(
        out.join("results.json"),
        serde_json::to_vec_pretty(&results).expect("serializes"),
    )
    .expect("write results.json");
    std::fs::write(out.join("summary.md"), &log).expect("write summary.md");
    println!("{log}");
}

const COLORS: &[&str] = &[
    "#777777", "#d62728", "#2a9d2a", "#1f77b4", "#9467bd", "#ff7f0e", "#8c564b",
];

/// Goodput against offered load (median of the seeds) for each limiter, with the oracle.
fn sweep_svg(sweep: &[Value], c_star: f64, limiters: &[Limiter]) -> String {
    let (w, h, pad) = (720.0, 420.0, 50.0);
    let xmax = sweep
        .iter()
        .map(|p| p["load"].as_f64().unwrap_or(0.0))
        .fold(1.0, f64::max);
    let ymax = c_star * 1.15;
    let x = |m: f64| pad + (w - 2.0 * pad) * m / xmax;
    let y = |v: f64| h - pad - (h - 2.0 * pad) * v / ymax;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{pad}\" y=\"20\" font-size=\"14\">Goodput (req/s meeting TTFT ≤ {} ms and ITL ≤ {} ms) against offered load, C* = {c_star:.1} req/s</text>\n<line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"black\"/>\n",
        TTFT_SLO.as_millis(),
        ITL_SLO.as_millis(),
        h - pad,
        w - pad,
        h - pad,
        h - pad,
    );
    for m in 0..=(xmax.ceil() as usize) {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{m}×</text>",
            x(m as f64),
            h - pad + 16.0
        );
    }
    for i in 0..=4 {
        let v = ymax * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text>",
            pad - 4.0,
            y(v) + 4.0
        );
    }
    let _ = writeln!(
        svg,
        "<polyline fill=\"none\" stroke=\"black\" stroke-dasharray=\"4 4\" points=\"{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}\"/>",
        x(0.0),
        y(0.0),
        x(1.0),
        y(c_star),
        x(xmax),
        y(c_star)
    );
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\">oracle min(λ, C*)</text>",
        w - pad - 150.0,
        pad + 10.0
    );
    for (i, l) in limiters.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut by_load: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
        for p in sweep.iter().filter(|p| p["limiter"] == l.name()) {
            by_load
                .entry((p["load"].as_f64().unwrap_or(0.0) * 1000.0) as u64)
                .or_default()
                .push(p["goodput_rps"].as_f64().unwrap_or(0.0));
        }
        let pts: Vec<String> = by_load
            .iter()
            .map(|(m, v)| {
                let (med, _, _) = median_spread(v.clone());
                format!("{:.1},{:.1}", x(*m as f64 / 1000.0), y(med))
            })
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            pts.join(" ")
        );
        for (m, v) in &by_load {
            let (_, lo, hi) = median_spread(v.clone());
            let xm = x(*m as f64 / 1000.0);
            let _ = writeln!(
                svg,
                "<line x1=\"{xm:.1}\" y1=\"{:.1}\" x2=\"{xm:.1}\" y2=\"{:.1}\" stroke=\"{color}\"/>",
                y(lo),
                y(hi)
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{}</text>",
            w - pad - 150.0,
            pad + 26.0 + 16.0 * i as f64,
            l.name()
        );
    }
    svg + "</svg>\n"
}

/// The step run per limiter: good requests per second (by send second) and, for gateways, the
/// reject probability.
fn step_svg(steps: &BTreeMap<String, Value>, phases: &[Phase]) -> String {
    let (w, panel, pad) = (720.0, 150.0, 50.0);
    let secs: f64 = phases.iter().map(|p| p.duration.as_secs_f64()).sum();
    let ymax = phases.iter().map(|p| p.rate).fold(1.0, f64::max) * 1.1;
    let h = pad + panel * steps.len() as f64 + 20.0;
    let x = |t: f64| pad + (w - 2.0 * pad) * t / secs;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{pad}\" y=\"20\" font-size=\"14\">Step 0.5 → 3 → 0.5 × C*: offered (grey), met both SLOs (green) per second; reject probability (red, 0–1)</text>\n"
    );
    for (i, (name, r)) in steps.iter().enumerate() {
        let top = pad + panel * i as f64;
        let bottom = top + panel - 25.0;
        let y = |v: f64| bottom - (bottom - top - 10.0) * v / ymax;
        let yp = |p: f64| bottom - (bottom - top - 10.0) * p;
        let _ = writeln!(
            svg,
            "<text x=\"{pad}\" y=\"{}\">{name}: recovery {}, relapses {}</text>\n<line x1=\"{pad}\" y1=\"{bottom}\" x2=\"{}\" y2=\"{bottom}\" stroke=\"black\"/>",
            top + 4.0,
            r["recovery_s"]
                .as_f64()
                .map(|s| format!("{s:.0} s"))
                .unwrap_or("—".into()),
            r["relapses"]
                .as_u64()
                .map(|n| n.to_string())
                .unwrap_or("—".into()),
            w - pad
        );
        let series = r["series"].as_array().cloned().unwrap_or_default();
        for (key, color) in [("offered", "#999999"), ("good", "#2a9d2a")] {
            let pts: Vec<String> = series
                .iter()
                .map(|s| {
                    format!(
                        "{:.1},{:.1}",
                        x(s["t"].as_f64().unwrap_or(0.0) + 0.5),
                        y(s[key].as_f64().unwrap_or(0.0))
                    )
                })
                .collect();
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>",
                pts.join(" ")
            );
        }
        if let Some(gauges) = r["gauges"].as_array() {
            let pts: Vec<String> = gauges
                .iter()
                .filter(|g| g["t"].as_f64().unwrap_or(0.0) <= secs)
                .map(|g| {
                    format!(
                        "{:.1},{:.1}",
                        x(g["t"].as_f64().unwrap_or(0.0)),
                        yp(g["reject_probability"].as_f64().unwrap_or(0.0))
                    )
                })
                .collect();
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"#d62728\" stroke-width=\"1\" points=\"{}\"/>",
                pts.join(" ")
            );
        }
    }
    svg + "</svg>\n"
}
