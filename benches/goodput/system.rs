//! What the goodput benchmark runs: workloads, the limiters compared, the processes under
//! test and one measured run.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use sluice::loadgen::arrivals::Phase;
use sluice::loadgen::report::Report;
use sluice::loadgen::{LoadgenArgs, run_load};

use crate::common::process::ChildProcess;
use crate::common::{ENGINE, spawn, spawn_gateway};

/// Seconds per sweep point (more when needed for `min_requests`).
pub const POINT_SECONDS: f64 = 15.0;

/// A family of requests, with the SLOs that suit it and the thresholds the README's advice
/// gives for those SLOs (TTFT at half its SLO, ITL at 80 % of its SLO).
#[derive(Debug, Clone)]
pub struct Workload {
    pub name: &'static str,
    pub prompt_chars: (u32, u32),
    pub output_tokens: (u32, u32),
    /// Gamma burstiness of arrivals (1 = Poisson).
    pub burstiness: f64,
    pub ttft_slo: Duration,
    pub itl_slo: Duration,
    pub ttft_threshold: &'static str,
    pub itl_threshold: &'static str,
    /// Requests per point at least.
    pub min_requests: f64,
    /// Where the capacity search starts, req/s.
    pub capacity_range: (f64, f64),
}

/// The main workload: short prompts, short answers, Poisson arrivals.
pub const CHAT: Workload = Workload {
    name: "chat",
    prompt_chars: (200, 1000),
    output_tokens: (16, 48),
    burstiness: 1.0,
    ttft_slo: Duration::from_millis(500),
    itl_slo: Duration::from_millis(50),
    ttft_threshold: "250ms",
    itl_threshold: "40ms",
    min_requests: 300.0,
    capacity_range: (10.0, 120.0),
};

/// The other families of the workload issue.
pub fn families() -> Vec<Workload> {
    vec![
        Workload {
            name: "long prompts",
            prompt_chars: (4000, 8000),
            output_tokens: (8, 16),
            // Prefill alone takes 200–400 ms on this engine.
            ttft_slo: Duration::from_secs(1),
            ttft_threshold: "500ms",
            capacity_range: (10.0, 150.0),
            ..CHAT
        },
        Workload {
            name: "long generations",
            output_tokens: (256, 512),
            min_requests: 100.0,
            capacity_range: (1.0, 10.0),
            ..CHAT
        },
        Workload {
            name: "bursty",
            burstiness: 4.0,
            capacity_range: (10.0, 60.0),
            ..CHAT
        },
    ]
}

/// One way of protecting the engine.
#[derive(Debug, Clone)]
pub enum Limiter {
    None,
    /// Client-side cap on requests in flight (`loadgen --max-inflight`).
    Cap(usize),
    /// Client-side Gradient2-style adaptive limit (`loadgen --gradient`).
    Gradient,
    /// `gateways` sluice gateways with this shedding configuration, sharing the engine.
    Sluice {
        shed: Shedding,
        gateways: usize,
    },
}

impl Limiter {
    pub fn sluice(shed: Shedding) -> Self {
        Limiter::Sluice { shed, gateways: 1 }
    }

    pub fn name(&self) -> String {
        match self {
            Limiter::None => "no limiter".into(),
            Limiter::Cap(n) => format!("in-flight cap {n}"),
            Limiter::Gradient => "gradient".into(),
            Limiter::Sluice { shed, gateways: 1 } => shed.name.clone(),
            Limiter::Sluice { shed, gateways } => format!("{} ×{gateways} gateways", shed.name),
        }
    }
}

/// A gateway's shedding configuration.
#[derive(Debug, Clone)]
pub struct Shedding {
    pub name: String,
    /// p_max, ramp, maxEvidence; None leaves `spec.shedding` out (the CRD's defaults).
    pub knobs: Option<(f64, f64, u32)>,
    /// timeConstant; None: the CRD's default.
    pub tau: Option<String>,
    /// TTFT threshold; None: the workload's.
    pub ttft: Option<String>,
    /// `spec.shedding.adaptiveConcurrency`.
    pub adaptive: bool,
    /// `spec.upstream.engineMetrics` (the simulated engine publishes vLLM's names), read
    /// every 250 ms.
    pub signals: bool,
    /// `spec.queue.maxWait`; None: no queue.
    pub queue: Option<String>,
}

impl Shedding {
    fn policy(&self, upstream: &str, w: &Workload) -> String {
        let tau = self
            .tau
            .as_ref()
            .map(|t| format!(", timeConstant: {t}"))
            .unwrap_or_default();
        let ttft = self.ttft.as_deref().unwrap_or(w.ttft_threshold);
        let mut doc = format!(
            "apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: bench}}\nspec:\n  upstream: {{url: '{upstream}'{}}}\n  defaults: {{ttft: {ttft}, itl: {}{tau}}}\n",
            if self.signals {
                ", engineMetrics: {}"
            } else {
                ""
            },
            w.itl_threshold
        );
        if let Some(wait) = &self.queue {
            let _ = writeln!(doc, "  queue: {{maxWait: {wait}, maxRequests: 1024}}");
        }
        let (p_max, ramp, evidence) = self.knobs.unwrap_or((0.95, 1.5, 200));
        let _ = writeln!(
            doc,
            "  shedding: {{maxRejectProbability: {p_max}, ramp: {ramp}, maxEvidence: {evidence}, adaptiveConcurrency: {}}}",
            self.adaptive
        );
        doc
    }
}

/// sluice with the CRD's defaults.
pub fn sluice_default() -> Shedding {
    Shedding {
        name: "sluice".into(),
        knobs: None,
        tau: None,
        ttft: None,
        adaptive: true,
        signals: false,
        queue: None,
    }
}

/// sluice before the adaptive concurrency: the latency signals alone (the previous default).
pub fn latency_only() -> Shedding {
    Shedding {
        name: "latency only".into(),
        adaptive: false,
        ..sluice_default()
    }
}

/// The original limiter's hard cliff on the same signals.
pub fn cliff() -> Shedding {
    Shedding {
        name: "hard cliff".into(),
        knobs: Some((1.0, 1.0, 1_000_000)),
        adaptive: false,
        ..sluice_default()
    }
}

/// Extra sluice settings from `SLUICE_GOODPUT_VARIANTS`: `;`-separated
/// `name:p_max:ramp:max_evidence:tau[:ttft_threshold[:adaptive[:signals[:max_wait]]]]`
/// (`signals`: `true` reads the engine's metrics; `max_wait`: a queue of that wait).
pub fn variants() -> Vec<Shedding> {
    let Ok(spec) = std::env::var("SLUICE_GOODPUT_VARIANTS") else {
        return Vec::new();
    };
    spec.split(';')
        .filter(|s| !s.trim().is_empty())
        .map(|v| {
            let f: Vec<&str> = v.trim().split(':').collect();
            assert!(
                f.len() >= 5,
                "variant {v:?}: expected name:p_max:ramp:max_evidence:tau[:ttft[:adaptive]]"
            );
            Shedding {
                name: f[0].into(),
                knobs: Some((
                    f[1].parse().expect("p_max"),
                    f[2].parse().expect("ramp"),
                    f[3].parse().expect("max_evidence"),
                )),
                tau: Some(f[4].into()),
                ttft: f.get(5).filter(|t| !t.is_empty()).map(|t| t.to_string()),
                adaptive: f.get(6).is_none_or(|a| *a != "false"),
                signals: f.get(7).is_some_and(|a| *a == "true"),
                queue: f.get(8).filter(|t| !t.is_empty()).map(|t| t.to_string()),
            }
        })
        .collect()
}

/// A running system under test: the engine and its gateways; `urls` is where load goes.
struct System {
    urls: Vec<String>,
    metrics_url: Option<String>,
    _procs: Vec<ChildProcess>,
}

async fn start(limiter: &Limiter, w: &Workload, seed: u64, dir: &Path) -> System {
    let seed_s = seed.to_string();
    let mut args = vec!["sim-engine", "--listen", "127.0.0.1:0", "--seed", &seed_s];
    args.extend_from_slice(ENGINE);
    let (engine, engine_url) = spawn(&args, "simulated engine", "/health").await;
    let Limiter::Sluice { shed, gateways } = limiter else {
        return System {
            urls: vec![engine_url],
            metrics_url: None,
            _procs: vec![engine],
        };
    };
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, shed.policy(&engine_url, w)).expect("write policy");
    let mut procs = Vec::new();
    let mut urls = Vec::new();
    for _ in 0..*gateways {
        let (gw, url) = spawn_gateway(&policy).await;
        procs.push(gw);
        urls.push(url);
    }
    // The gateways stop before the engine.
    procs.push(engine);
    System {
        metrics_url: Some(format!("{}/metrics", urls[0])),
        urls,
        _procs: procs,
    }
}

fn args(
    url: &str,
    limiter: &Limiter,
    w: &Workload,
    schedule: Vec<Phase>,
    seed: u64,
) -> LoadgenArgs {
    let (rate, secs) = (schedule[0].rate, schedule[0].duration.as_secs_f64());
    LoadgenArgs {
        schedule: Some(sluice::loadgen::Schedule(schedule)),
        burstiness: w.burstiness,
        prompt_chars: w.prompt_chars,
        output_tokens: w.output_tokens,
        ttft_slo: w.ttft_slo,
        itl_slo: w.itl_slo,
        // SLUICE_GOODPUT_RETRIES: retries of a shed request (the OpenAI SDKs make 2).
        max_retries: crate::env_num("SLUICE_GOODPUT_RETRIES"),
        max_inflight: match limiter {
            Limiter::Cap(n) => Some(*n),
            _ => None,
        },
        gradient: matches!(limiter, Limiter::Gradient),
        // (Requests still waiting after 30 s are misses either way, so a no-limiter run
        // drains in bounded time.)
        ..crate::common::loadgen(url, rate, secs, seed)
    }
}

/// One run: a fresh engine (and gateways), the schedule offered by one load generator per
/// gateway, each with an equal share of the rate (independent Poisson or gamma streams, as a
/// round-robin Service splits clients), their reports.
pub async fn run(
    limiter: &Limiter,
    w: &Workload,
    schedule: Vec<Phase>,
    seed: u64,
    dir: &Path,
) -> Vec<Report> {
    let sys = start(limiter, w, seed, dir).await;
    let n = sys.urls.len() as f64;
    let share: Vec<Phase> = schedule
        .iter()
        .map(|p| Phase {
            rate: p.rate / n,
            duration: p.duration,
        })
        .collect();
    let runs = sys.urls.iter().enumerate().map(|(i, url)| {
        let mut a = args(url, limiter, w, share.clone(), seed * 1000 + i as u64);
        if i == 0 {
            a.metrics_url = sys.metrics_url.clone();
        }
        async move { run_load(&a).await.expect("load generator runs") }
    });
    futures_util::future::join_all(runs).await
}

/// A constant rate for at least [`POINT_SECONDS`] (or `SLUICE_GOODPUT_POINT_SECONDS`) and the
/// workload's request count.
pub fn constant(rate: f64, w: &Workload) -> Vec<Phase> {
    let least = crate::env_num("SLUICE_GOODPUT_POINT_SECONDS").unwrap_or(POINT_SECONDS);
    let secs = least.max(w.min_requests / rate);
    vec![Phase {
        rate,
        duration: Duration::from_secs_f64(secs),
    }]
}

/// The numbers of one point, over every load generator of the run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Point {
    pub goodput_rps: f64,
    pub reject_rate: f64,
    pub attainment_admitted: f64,
    pub sent: usize,
    pub errors: usize,
    /// Largest TTFT p99 of the load generators, seconds (queue time included).
    pub ttft_p99_s: f64,
    /// Largest TTFT p50 of the load generators, seconds.
    pub ttft_p50_s: f64,
}

impl Point {
    pub fn of(reports: &[Report]) -> Point {
        let sum = |f: fn(&Report) -> usize| reports.iter().map(f).sum::<usize>();
        let (sent, rejected, good) = (sum(|r| r.sent), sum(|r| r.rejected), sum(|r| r.good));
        Point {
            goodput_rps: reports.iter().map(|r| r.goodput_rps).sum(),
            reject_rate: rejected as f64 / sent.max(1) as f64,
            attainment_admitted: good as f64 / (sent - rejected).max(1) as f64,
            sent,
            errors: sum(|r| r.errors),
            ttft_p99_s: reports
                .iter()
                .filter_map(|r| r.ttft_s.map(|p| p.p99))
                .fold(0.0, f64::max),
            ttft_p50_s: reports
                .iter()
                .filter_map(|r| r.ttft_s.map(|p| p.p50))
                .fold(0.0, f64::max),
        }
    }
}

/// Highest rate with ≥ 90 % attainment and no limiter, to within 2 % (seed 1).
pub async fn capacity(w: &Workload, dir: &Path, log: &mut String) -> f64 {
    let (mut lo, mut hi) = w.capacity_range;
    while hi / lo > 1.02 {
        let mid = (lo * hi).sqrt();
        let r = &run(&Limiter::None, w, constant(mid, w), 1, dir).await[0];
        let _ = writeln!(
            log,
            "{}: capacity probe {mid:.1} req/s: attainment {:.1} %, TTFT p90 {:.0} ms",
            w.name,
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

/// The in-flight cap with the best goodput at 2 × C* (seed 1), tuned in hindsight.
pub async fn tune_cap(
    w: &Workload,
    c_star: f64,
    caps: &[usize],
    dir: &Path,
    log: &mut String,
) -> usize {
    let mut best = (0usize, -1.0f64);
    for &n in caps {
        let p = Point::of(&run(&Limiter::Cap(n), w, constant(2.0 * c_star, w), 1, dir).await);
        let _ = writeln!(
            log,
            "{}: cap {n} at 2x: goodput {:.2} req/s",
            w.name, p.goodput_rps
        );
        eprintln!("{}", log.lines().last().unwrap_or_default());
        if p.goodput_rps > best.1 {
            best = (n, p.goodput_rps);
        }
    }
    best.0
}
