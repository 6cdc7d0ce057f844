//! Goodput under overload on a real engine: llama.cpp's `llama-server` (4 slots, continuous
//! batching) serving Gemma 3 270M Q4_K_M on the machine's CPU, as `scripts/llama.sh` installs
//! it. The same method as `benches/goodput.rs` on the simulated engine, smaller:
//!
//! 1. capacity search without a limiter: C* = the highest rate with ≥ 90 % of requests meeting
//!    both SLOs (seed 1);
//! 2. the static in-flight cap tuned in hindsight at 2× C* (best of 2, 4, 6, 8, 12);
//! 3. no limiter, sluice (CRD defaults), sluice reading llama-server's own metrics
//!    (`engineMetrics`: `--metrics` and `/props`) and the tuned cap at 2× and 3× C*, seeds 1–3.
//!
//! Every run starts a fresh llama-server (and a fresh gateway for sluice) on 127.0.0.1; the
//! load generator runs in this process. The 2 shared cores keep absolute numbers small: the
//! ratios are what matter.
//!
//! Run: `source "$(scripts/llama.sh)" && cargo bench --bench goodput_llama` (about 25
//! minutes). `SLUICE_LLAMA_CAPACITY` skips the search, `SLUICE_LLAMA_CAP` the cap tuning,
//! `SLUICE_LLAMA_SEEDS` sets the seeds per point (default 3), `SLUICE_LLAMA_LIMITERS` the
//! limiters (names' prefixes, comma-separated; default all: no limiter, sluice, sluice + engine
//! signals, the tuned cap). Results: docs/benchmarks.md.

#[path = "common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::time::Duration;

use common::llama::LlamaServer;
use common::process::ChildProcess;

use sluice::loadgen::arrivals::Phase;
use sluice::loadgen::report::Report;
use sluice::loadgen::{LoadgenArgs, Schedule, run_load};

const TTFT_SLO: Duration = Duration::from_secs(2);
const ITL_SLO: Duration = Duration::from_millis(150);
/// Thresholds as the docs advise: TTFT at half its SLO, ITL at 80 % of its SLO.
const POLICY: &str = "defaults: {ttft: 1s, itl: 120ms}";
const PROMPT_CHARS: (u32, u32) = (100, 400);
const OUTPUT_TOKENS: (u32, u32) = (16, 32);
const POINT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
enum Limiter {
    None,
    Sluice,
    /// sluice reading llama-server's own metrics (`engineMetrics`, its slots from /props).
    Signals,
    Cap(usize),
}

impl Limiter {
    fn name(self) -> String {
        match self {
            Limiter::None => "no limiter".into(),
            Limiter::Sluice => "sluice".into(),
            Limiter::Signals => "sluice + engine signals".into(),
            Limiter::Cap(n) => format!("in-flight cap {n}"),
        }
    }
}

async fn run(limiter: Limiter, rate: f64, seed: u64) -> Report {
    let llama = LlamaServer::start(4);
    let dir = std::env::temp_dir().join(format!("sluice-goodput-llama-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut procs: Vec<ChildProcess> = Vec::new();
    let url = match limiter {
        Limiter::Sluice | Limiter::Signals => {
            let signals = match limiter {
                Limiter::Signals => ", engineMetrics: {interval: 250ms}",
                _ => "",
            };
            let policy = dir.join("policy.yaml");
            std::fs::write(
                &policy,
                format!(
                    "apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: llama}}\nspec:\n  upstream: {{url: '{}'{signals}}}\n  {POLICY}\n  models: [{{name: gemma}}]\n",
                    llama.url
                ),
            )
            .unwrap();
            let (gw, url) = common::spawn_gateway(&policy).await;
            procs.push(gw);
            url
        }
        _ => llama.url.clone(),
    };
    let args = LoadgenArgs {
        model: "gemma".into(),
        schedule: Some(Schedule(vec![Phase {
            rate,
            duration: POINT,
        }])),
        prompt_chars: PROMPT_CHARS,
        output_tokens: OUTPUT_TOKENS,
        ttft_slo: TTFT_SLO,
        itl_slo: ITL_SLO,
        max_inflight: match limiter {
            Limiter::Cap(n) => Some(n),
            _ => None,
        },
        ..common::loadgen(&url, rate, POINT.as_secs_f64(), seed)
    };
    let report = run_load(&args).await.expect("load generator runs");
    // The gateway stops before the engine; then its policy file goes.
    drop(procs);
    drop(llama);
    let _ = std::fs::remove_dir_all(&dir);
    report
}

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: not a number")))
}

fn main() {
    common::runtime().block_on(async {
        let mut log = String::new();
        let c_star = match env::<f64>("SLUICE_LLAMA_CAPACITY") {
            Some(c) => c,
            None => {
                let (mut lo, mut hi) = (0.5f64, 16.0f64);
                while hi / lo > 1.05 {
                    let mid = (lo * hi).sqrt();
                    let r = run(Limiter::None, mid, 1).await;
                    let line = format!(
                        "capacity probe {mid:.2} req/s: attainment {:.1} %, TTFT p90 {:.0} ms, ITL p90 {:.0} ms",
                        r.attainment_offered * 100.0,
                        r.ttft_s.map(|p| p.p90 * 1000.0).unwrap_or(f64::NAN),
                        r.itl_s.map(|p| p.p90 * 1000.0).unwrap_or(f64::NAN)
                    );
                    eprintln!("{line}");
                    let _ = writeln!(log, "{line}");
                    if r.attainment_offered >= 0.9 {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                lo
            }
        };
        let _ = writeln!(log, "C* = {c_star:.2} req/s");
        eprintln!("C* = {c_star:.2} req/s");
        let cap = match env::<usize>("SLUICE_LLAMA_CAP") {
            Some(n) => n,
            None => {
                let mut best = (0, -1.0);
                for n in [2, 4, 6, 8, 12] {
                    let r = run(Limiter::Cap(n), 2.0 * c_star, 1).await;
                    let line = format!("cap {n} at 2x: goodput {:.2} req/s", r.goodput_rps);
                    eprintln!("{line}");
                    let _ = writeln!(log, "{line}");
                    if r.goodput_rps > best.1 {
                        best = (n, r.goodput_rps);
                    }
                }
                best.0
            }
        };
        let seeds: u64 = env("SLUICE_LLAMA_SEEDS").unwrap_or(3);
        let mut limiters = vec![
            Limiter::None,
            Limiter::Sluice,
            Limiter::Signals,
            Limiter::Cap(cap),
        ];
        if let Ok(only) = std::env::var("SLUICE_LLAMA_LIMITERS") {
            let only: Vec<&str> = only.split(',').map(str::trim).collect();
            limiters.retain(|l| only.iter().any(|o| l.name().starts_with(o)));
        }
        let mut table = format!(
            "| load × C* | {} |\n|---|{}\n",
            limiters.iter().map(|l| l.name()).collect::<Vec<_>>().join(" | "),
            "---|".repeat(limiters.len())
        );
        for m in [2.0, 3.0] {
            let mut row = format!("| {m} |");
            for &l in &limiters {
                let mut g = Vec::new();
                for seed in 1..=seeds {
                    let r = run(l, m * c_star, seed).await;
                    eprintln!(
                        "{m}x {:<18} seed {seed}: goodput {:.2} req/s, shed {:.1} %, errors {}, TTFT p99 {:.0} ms",
                        l.name(),
                        r.goodput_rps,
                        r.reject_rate * 100.0,
                        r.errors,
                        r.ttft_s.map(|p| p.p99 * 1000.0).unwrap_or(f64::NAN)
                    );
                    g.push(r.goodput_rps);
                }
                g.sort_by(f64::total_cmp);
                let _ = write!(
                    row,
                    " {:.2} ({:.2}–{:.2}) |",
                    g[g.len() / 2],
                    g[0],
                    g[g.len() - 1]
                );
            }
            eprintln!("{row}");
            table.push_str(&row);
            table.push('\n');
        }
        let _ = writeln!(
            log,
            "\nGoodput, req/s: median (min–max) of {seeds} seeds; tuned cap {cap}\n\n{table}"
        );
        println!("{log}");
    });
}
