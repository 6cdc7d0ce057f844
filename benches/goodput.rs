//! Goodput under overload: sluice against baselines on the simulated engine (the goodput
//! issue and the admission issue).
//!
//! 1. Capacity C*: the highest Poisson rate at which ≥ 90 % of requests meet both SLOs with
//!    no limiter (binary search); the oracle line is min(λ, C*).
//! 2. `sweep`: 0.5, 1, 1.5, 2, 3 and 4 × C* for each limiter, at least 300 requests per point,
//!    three seeds; median and spread. Limiters: none (direct to the engine); sluice with the
//!    latency signals only (`adaptiveConcurrency: false`, the previous default); sluice's
//!    defaults; a static in-flight cap tuned in hindsight (`loadgen --max-inflight`); and a
//!    Gradient2-style adaptive limit (`loadgen --gradient`), the adaptive peer.
//! 3. `step`: 0.5 → 3 → 0.5 × C*: goodput, reject probability and moving averages per
//!    second; recovery time, relapses and when shedding ends, for each limiter.
//! 4. `gateways`: 1, 2 and 4 sluice gateways in front of one engine, the load split evenly.
//! 5. `families`: long prompts, long generations and bursty arrivals, each with its own C*
//!    and tuned cap, at 2× and 4× C*.
//!
//! Every run starts a fresh `sluice sim-engine` process (and fresh `sluice gateway`
//! processes for the gateway-based limiters) on 127.0.0.1; the load generators run in this
//! process.
//!
//! Run: `cargo bench --bench goodput` (about 75 minutes on 2 cores). Environment:
//! - `SLUICE_GOODPUT_OUT`: output directory (default `target/goodput`): `results.json`,
//!   `sweep.svg`, `step.svg`, `summary.md`.
//! - `SLUICE_GOODPUT_PARTS`: comma list of `capacity,sweep,step,gateways,families` (default
//!   all).
//! - `SLUICE_GOODPUT_CAPACITY`: skip the search and use this C* (req/s).
//! - `SLUICE_GOODPUT_SEEDS`: seeds per point (default 3); `SLUICE_GOODPUT_FAMILY_SEEDS` for
//!   the families (default 1).
//! - `SLUICE_GOODPUT_FAMILIES`: only the families whose names start with one of these
//!   (comma list, e.g. `long generations`); `SLUICE_GOODPUT_FAMILY_CAPACITY` and
//!   `SLUICE_GOODPUT_FAMILY_CAP` skip their capacity search and cap tuning (for one family).
//! - `SLUICE_GOODPUT_POINT_SECONDS`: seconds per constant-rate point at least (default 15;
//!   more for a steady state with long generations, whose requests last about 10 s).
//! - `SLUICE_GOODPUT_LOADS`: multiples of C* for the sweep (default 0.5,1,1.5,2,3,4).
//! - `SLUICE_GOODPUT_CAP`: skip the in-flight cap tuning and use this cap.
//! - `SLUICE_GOODPUT_LIMITERS`: only the limiters whose names start with one of these
//!   (default `no,latency,sluice,in-flight,gradient`; `hard` adds the original hard cliff),
//!   in the sweep and the families.
//! - `SLUICE_GOODPUT_VARIANTS`: extra sluice settings to compare (in the sweep and the
//!   families), `;`-separated
//!   `name:p_max:ramp:max_evidence:tau[:ttft_threshold[:adaptive[:signals[:max_wait]]]]`
//!   (`signals` `true`: `engineMetrics`; `max_wait`: an admission queue of that wait).
//! - `SLUICE_GOODPUT_FAMILY_LOADS`: multiples of each family's C* (default 2,4).
//! - `SLUICE_GOODPUT_REPLOT`: a `results.json` whose families are plotted again into the
//!   output directory (`family-<name>.svg`); nothing is run.
//! - `SLUICE_GOODPUT_RETRIES`: retries of a shed request after its Retry-After (default 0;
//!   the OpenAI SDKs make 2): the 429s left are the failures a user sees.
//!
//! Results and the choice of defaults: docs/benchmarks.md.

#[path = "goodput/charts.rs"]
mod charts;
#[path = "common/mod.rs"]
mod common;
#[path = "goodput/system.rs"]
mod system;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use sluice::loadgen::arrivals::Phase;

use charts::median_spread;
use system::{CHAT, Limiter, Point, Workload, constant, run};

const CAPS: &[usize] = &[32, 40, 48, 64, 96];

fn env_list(name: &str) -> Option<Vec<String>> {
    std::env::var(name)
        .ok()
        .map(|s| s.split(',').map(|x| x.trim().to_owned()).collect())
}

fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: not a number")))
}

fn main() {
    let rt = common::runtime();
    rt.block_on(bench());
}

/// Runs every limiter at every load with `seeds` seeds; the table (median, min–max) and the
/// points.
async fn sweep(
    w: &Workload,
    c_star: f64,
    loads: &[f64],
    limiters: &[Limiter],
    seeds: u64,
    dir: &Path,
) -> (String, Vec<Value>) {
    let names: Vec<String> = limiters.iter().map(Limiter::name).collect();
    let mut table = format!(
        "| load × C* | oracle | {} |\n|---|---|{}\n",
        names.join(" | "),
        "---|".repeat(limiters.len())
    );
    let mut points = Vec::new();
    for &m in loads {
        let rate = m * c_star;
        let mut row = format!("| {m} | {:.1} |", rate.min(c_star));
        for l in limiters {
            let mut goodputs = Vec::new();
            for seed in 1..=seeds {
                let p = Point::of(&run(l, w, constant(rate, w), seed, dir).await);
                eprintln!(
                    "{} {m:>4.1}x {:<24} seed {seed}: goodput {:6.2} req/s, shed {:5.1} %, admitted in SLO {:5.1} %, TTFT p50 {:6.0} ms p99 {:6.0} ms",
                    w.name,
                    l.name(),
                    p.goodput_rps,
                    p.reject_rate * 100.0,
                    p.attainment_admitted * 100.0,
                    p.ttft_p50_s * 1000.0,
                    p.ttft_p99_s * 1000.0
                );
                goodputs.push(p.goodput_rps);
                let mut v = serde_json::to_value(p).expect("serializes");
                v["load"] = json!(m);
                v["rate"] = json!(rate);
                v["limiter"] = json!(l.name());
                v["seed"] = json!(seed);
                v["workload"] = json!(w.name);
                points.push(v);
            }
            let (med, lo, hi) = median_spread(goodputs);
            let _ = write!(row, " {med:.1} ({lo:.1}–{hi:.1}) |");
        }
        table.push_str(&row);
        table.push('\n');
        eprintln!("{row}");
    }
    (table, points)
}

/// Seconds after `from` until the last second with a shed request has passed (0 if none).
fn shedding_ends(series: &Value, from: f64) -> f64 {
    series
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| {
            s["t"].as_f64().unwrap_or(0.0) >= from && s["rejected"].as_u64().unwrap_or(0) > 0
        })
        .map(|s| s["t"].as_f64().unwrap_or(0.0) + 1.0 - from)
        .fold(0.0, f64::max)
}

/// Writes `<out>/family-<name>.svg`: goodput against load for each limiter of a family.
fn family_svg(family: &Value, out: &Path) {
    let points = family["points"].as_array().cloned().unwrap_or_default();
    let mut names: Vec<String> = Vec::new();
    for p in &points {
        let n = p["limiter"].as_str().unwrap_or_default().to_owned();
        if !names.contains(&n) {
            names.push(n);
        }
    }
    let slo = family["slo_ms"].as_array().map_or((500, 50), |v| {
        let ms = |i: usize| v.get(i).and_then(Value::as_u64).unwrap_or(0) as u128;
        (ms(0), ms(1))
    });
    let c = family["capacity_rps"].as_f64().unwrap_or(0.0);
    let name = family["workload"]
        .as_str()
        .unwrap_or("family")
        .replace(' ', "-");
    let svg = charts::sweep(&points, c, &names, slo);
    std::fs::write(out.join(format!("family-{name}.svg")), svg).expect("write family svg");
}

async fn bench() {
    let out = PathBuf::from(
        std::env::var("SLUICE_GOODPUT_OUT").unwrap_or_else(|_| "target/goodput".into()),
    );
    std::fs::create_dir_all(&out).expect("create output directory");
    // Plots again from a run's results.json, runs nothing.
    if let Ok(path) = std::env::var("SLUICE_GOODPUT_REPLOT") {
        let text = std::fs::read_to_string(&path).expect("read results.json");
        let results: Value = serde_json::from_str(&text).expect("results.json");
        for f in results["families"].as_array().into_iter().flatten() {
            family_svg(f, &out);
        }
        return;
    }
    let parts = env_list("SLUICE_GOODPUT_PARTS").unwrap_or_else(|| {
        ["capacity", "sweep", "step", "gateways", "families"]
            .map(String::from)
            .to_vec()
    });
    let part = |name: &str| parts.iter().any(|p| p == name);
    let seeds: u64 = env_num("SLUICE_GOODPUT_SEEDS").unwrap_or(3);
    let loads: Vec<f64> = env_list("SLUICE_GOODPUT_LOADS")
        .map(|v| v.iter().map(|x| x.parse().expect("load")).collect())
        .unwrap_or_else(|| vec![0.5, 1.0, 1.5, 2.0, 3.0, 4.0]);
    let w = CHAT;
    let mut log = String::new();
    let mut results = json!({"engine": common::ENGINE, "prompt_chars": w.prompt_chars,
        "output_tokens": w.output_tokens, "ttft_slo_s": w.ttft_slo.as_secs_f64(),
        "itl_slo_s": w.itl_slo.as_secs_f64()});

    let c_star = match env_num("SLUICE_GOODPUT_CAPACITY") {
        Some(v) => v,
        None if part("capacity") => system::capacity(&w, &out, &mut log).await,
        None => panic!("set SLUICE_GOODPUT_CAPACITY or include the capacity part"),
    };
    let _ = writeln!(log, "C* = {c_star:.1} req/s");
    eprintln!("C* = {c_star:.1} req/s");
    results["capacity_rps"] = json!(c_star);
    let cap = match env_num("SLUICE_GOODPUT_CAP") {
        Some(v) => v,
        None => system::tune_cap(&w, c_star, CAPS, &out, &mut log).await,
    };
    results["tuned_cap"] = json!(cap);

    let mut limiters = vec![
        Limiter::None,
        Limiter::sluice(system::cliff()),
        Limiter::sluice(system::latency_only()),
        Limiter::sluice(system::sluice_default()),
        Limiter::Cap(cap),
        Limiter::Gradient,
    ];
    // The hard cliff (the first limiter) only when asked for by name.
    let only = env_list("SLUICE_GOODPUT_LIMITERS").unwrap_or_else(|| {
        ["no", "latency", "sluice", "in-flight", "gradient"]
            .map(String::from)
            .to_vec()
    });
    limiters.retain(|l| only.iter().any(|o| l.name().starts_with(o.as_str())));
    limiters.extend(system::variants().into_iter().map(Limiter::sluice));
    let names: Vec<String> = limiters.iter().map(Limiter::name).collect();
    let slo = (w.ttft_slo.as_millis(), w.itl_slo.as_millis());

    if part("sweep") {
        let (table, points) = sweep(&w, c_star, &loads, &limiters, seeds, &out).await;
        let _ = writeln!(
            log,
            "\nGoodput, req/s: median (min–max) of {seeds} seeds\n\n{table}"
        );
        std::fs::write(
            out.join("sweep.svg"),
            charts::sweep(&points, c_star, &names, slo),
        )
        .expect("write sweep.svg");
        results["sweep"] = json!(points);
    }

    if part("step") {
        let phases = [(0.5, 20), (3.0, 20), (0.5, 30)].map(|(m, s)| Phase {
            rate: m * c_star,
            duration: Duration::from_secs(s),
        });
        let down = 40.0;
        let mut steps = BTreeMap::new();
        let mut table = String::from(
            "| limiter | goodput over the run | during the 3× phase | recovery after the step down | relapses | shedding ends after the step down |\n|---|---|---|---|---|---|\n",
        );
        for l in &limiters {
            let mut reports = run(l, &w, phases.to_vec(), 1, &out).await;
            let r = reports.swap_remove(0);
            let v = serde_json::to_value(&r).expect("report serializes");
            let peak: f64 = v["series"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| (20.0..40.0).contains(&s["t"].as_f64().unwrap_or(-1.0)))
                .map(|s| s["good"].as_f64().unwrap_or(0.0))
                .sum::<f64>()
                / 20.0;
            let _ = writeln!(
                table,
                "| {} | {:.1} req/s | {peak:.1} req/s | {} | {} | {:.0} s |",
                l.name(),
                r.goodput_rps,
                r.recovery_s
                    .map(|s| format!("{s:.0} s"))
                    .unwrap_or_else(|| "not within the run".into()),
                r.relapses.map(|n| n.to_string()).unwrap_or("—".into()),
                shedding_ends(&v["series"], down)
            );
            eprintln!("{}", table.lines().last().unwrap_or_default());
            steps.insert(l.name(), v);
        }
        let _ = writeln!(
            log,
            "\nStep 0.5 → 3 → 0.5 × C* (20 s, 20 s, 30 s), seed 1\n\n{table}"
        );
        std::fs::write(out.join("step.svg"), charts::step(&steps, &phases))
            .expect("write step.svg");
        results["step"] = json!(steps);
    }

    if part("gateways") {
        let fleets: Vec<Limiter> = [1, 2, 4]
            .map(|gateways| Limiter::Sluice {
                shed: system::sluice_default(),
                gateways,
            })
            .to_vec();
        let (table, points) = sweep(&w, c_star, &[2.0, 4.0], &fleets, seeds, &out).await;
        let _ = writeln!(
            log,
            "\nGateways sharing one engine, goodput req/s: median (min–max) of {seeds} seeds\n\n{table}"
        );
        results["gateways"] = json!(points);
    }

    if part("families") {
        let family_seeds: u64 = env_num("SLUICE_GOODPUT_FAMILY_SEEDS").unwrap_or(1);
        let mut all = Vec::new();
        let pick = env_list("SLUICE_GOODPUT_FAMILIES");
        for f in system::families() {
            if pick
                .as_ref()
                .is_some_and(|p| !p.iter().any(|n| f.name.starts_with(n.as_str())))
            {
                continue;
            }
            let c = match env_num("SLUICE_GOODPUT_FAMILY_CAPACITY") {
                Some(v) => v,
                None => system::capacity(&f, &out, &mut log).await,
            };
            let cap = match env_num("SLUICE_GOODPUT_FAMILY_CAP") {
                Some(v) => v,
                None => system::tune_cap(&f, c, &[32, 40, 48, 64], &out, &mut log).await,
            };
            let mut limiters = vec![
                Limiter::None,
                Limiter::sluice(system::sluice_default()),
                Limiter::Cap(cap),
                Limiter::Gradient,
            ];
            limiters.retain(|l| only.iter().any(|o| l.name().starts_with(o.as_str())));
            limiters.extend(system::variants().into_iter().map(Limiter::sluice));
            let family_loads: Vec<f64> = env_list("SLUICE_GOODPUT_FAMILY_LOADS")
                .map(|v| v.iter().map(|x| x.parse().expect("load")).collect())
                .unwrap_or_else(|| vec![2.0, 4.0]);
            let (table, points) = sweep(&f, c, &family_loads, &limiters, family_seeds, &out).await;
            let _ = writeln!(
                log,
                "\n{}: prompts {:?} chars, outputs {:?} tokens, burstiness {}, SLO TTFT {} ms / ITL {} ms, thresholds {} / {}; C* = {c:.1} req/s; goodput req/s, median (min–max) of {family_seeds} seeds\n\n{table}",
                f.name,
                f.prompt_chars,
                f.output_tokens,
                f.burstiness,
                f.ttft_slo.as_millis(),
                f.itl_slo.as_millis(),
                f.ttft_threshold,
                f.itl_threshold
            );
            let slo_ms = (f.ttft_slo.as_millis(), f.itl_slo.as_millis());
            let family = json!({"workload": f.name, "capacity_rps": c, "tuned_cap": cap,
                "slo_ms": slo_ms, "points": points});
            family_svg(&family, &out);
            all.push(family);
        }
        results["families"] = json!(all);
    }

    std::fs::write(
        out.join("results.json"),
        serde_json::to_vec_pretty(&results).expect("serializes"),
    )
    .expect("write results.json");
    std::fs::write(out.join("summary.md"), &log).expect("write summary.md");
    println!("{log}");
}
