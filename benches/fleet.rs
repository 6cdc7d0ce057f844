//! A fleet of engines behind one gateway: per-endpoint admission against the ways a fleet is
//! fronted without it, at 1×, 2× and 4× the fleet's capacity, in one run.
//!
//! Run: `SLUICE_NGINX=$(scripts/nginx.sh) cargo bench --bench fleet` (about 25 minutes;
//! writes `target/fleet/{summary.md, goodput.svg}`). Everything runs on 127.0.0.1: three
//! fresh `sluice sim-engine` processes per run (16 batch slots each; two at full speed, one at
//! half speed), the gateways and nginx in front of them, and `sluice loadgen`'s library in the
//! bench process.
//!
//! Workload: Poisson arrivals, prompts of 500–3000 characters, 32–128 output tokens,
//! streaming, Retry-After ignored, 30 s client timeout; SLOs TTFT ≤ 1 s and ITL ≤ 60 ms
//! (thresholds 500 ms and 48 ms, the policy page's advice). Goodput = requests/s meeting
//! both. The fleet's capacity is the oracle: the sum of each engine's own capacity (the
//! highest rate it serves alone with ≥ 90 % of requests meeting both SLOs, to 3 %).
//!
//! Compared at each load:
//! - **sluice, per endpoint**: one gateway listing the three engines (`upstream.endpoints`);
//! - **sluice → Service**: one gateway in front of a connection-level balancer that sends each
//!   new connection to a random engine, as kube-proxy does (today's path in a cluster);
//! - **Service, no limiter**: the load generator straight at that balancer;
//! - **nginx least_conn, no limiter**;
//! - **sluice → nginx least_conn**.

mod common;

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use common::balancer::Balancer;
use common::nginx::{Balance, Nginx};
use common::plot::{COLORS, Chart, Series};
use common::process::ChildProcess;
use common::{spawn, spawn_gateway};
use sluice::loadgen::report::Report;
use sluice::loadgen::{LoadgenArgs, run_load};

const FAST: &[&str] = &[
    "--max-num-seqs",
    "16",
    "--decode-step-ms",
    "6",
    "--decode-step-ms-per-seq",
    "0.6",
    "--prefill-ms-per-token",
    "0.2",
];
const SLOW: &[&str] = &[
    "--max-num-seqs",
    "16",
    "--decode-step-ms",
    "12",
    "--decode-step-ms-per-seq",
    "1.2",
    "--prefill-ms-per-token",
    "0.4",
];
const TTFT_SLO: Duration = Duration::from_secs(1);
const ITL_SLO: Duration = Duration::from_millis(60);
const LOADS: [f64; 3] = [1.0, 2.0, 4.0];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Front {
    PerEndpoint,
    SluiceService,
    Service,
    LeastConn,
    SluiceLeastConn,
    /// Per endpoint, each engine's queue read from its metrics page (`engineMetrics`).
    PerEndpointSignals,
}

impl Front {
    const ALL: [Front; 6] = [
        Front::PerEndpoint,
        Front::SluiceService,
        Front::Service,
        Front::LeastConn,
        Front::SluiceLeastConn,
        Front::PerEndpointSignals,
    ];

    fn name(self) -> &'static str {
        match self {
            Front::PerEndpoint => "sluice, per endpoint",
            Front::SluiceService => "sluice → Service",
            Front::Service => "Service, no limiter",
            Front::LeastConn => "nginx least_conn, no limiter",
            Front::SluiceLeastConn => "sluice → nginx least_conn",
            Front::PerEndpointSignals => "sluice, per endpoint, engine signals",
        }
    }
}

fn env_num(name: &str) -> Option<f64> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: not a number")))
}

fn args(url: &str, rate: f64, secs: f64, seed: u64) -> LoadgenArgs {
    LoadgenArgs {
        prompt_chars: (500, 3000),
        output_tokens: (32, 128),
        ttft_slo: TTFT_SLO,
        itl_slo: ITL_SLO,
        ..common::loadgen(url, rate, secs, seed)
    }
}

async fn engine(spec: &[&str], seed: u64) -> (ChildProcess, String, u16) {
    let seed = seed.to_string();
    let mut a = vec!["sim-engine", "--listen", "127.0.0.1:0", "--seed", &seed];
    a.extend_from_slice(spec);
    let (p, url) = spawn(&a, "simulated engine", "/health").await;
    let port = url.rsplit(':').next().unwrap().parse().unwrap();
    (p, url, port)
}

fn policy(dir: &Path, url: &str, endpoints: &[String], signals: bool) -> std::path::PathBuf {
    let mut list = if endpoints.is_empty() {
        String::new()
    } else {
        format!(", endpoints: ['{}']", endpoints.join("', '"))
    };
    if signals {
        list.push_str(", engineMetrics: {}");
    }
    // `SLUICE_FLEET_THRESHOLDS=ttft,itl` (durations) replaces the advised 500ms,48ms.
    let th = std::env::var("SLUICE_FLEET_THRESHOLDS").unwrap_or("500ms,48ms".into());
    let (ttft, itl) = th.split_once(',').expect("ttft,itl");
    let doc = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: fleet}}\nspec:\n  upstream: {{url: '{url}'{list}}}\n  defaults: {{ttft: {ttft}, itl: {itl}}}\n"
    );
    let path = dir.join("policy.yaml");
    std::fs::write(&path, doc).unwrap();
    path
}

/// One run of `secs` at `rate` through `front`, on three fresh engines.
async fn run(front: Front, rate: f64, secs: f64, seed: u64, dir: &Path) -> Report {
    let mut procs = Vec::new();
    let (mut urls, mut ports) = (Vec::new(), Vec::new());
    for (i, spec) in [FAST, FAST, SLOW].into_iter().enumerate() {
        let (p, url, port) = engine(spec, seed * 10 + i as u64).await;
        procs.push(p);
        urls.push(url);
        ports.push(port);
    }
    let mut _balancer = None;
    let mut _nginx = None;
    let behind = match front {
        Front::PerEndpoint | Front::PerEndpointSignals => None,
        Front::SluiceService | Front::Service => {
            let b = Balancer::start(&ports, seed).await;
            let url = b.url.clone();
            _balancer = Some(b);
            Some(url)
        }
        Front::LeastConn | Front::SluiceLeastConn => {
            let n = Nginx::start(&ports, Balance::LeastConn);
            let url = n.url.clone();
            _nginx = Some(n);
            Some(url)
        }
    };
    let target = match front {
        Front::Service | Front::LeastConn => behind.unwrap(),
        Front::PerEndpoint | Front::PerEndpointSignals => {
            let signals = front == Front::PerEndpointSignals;
            let (gw, url) = spawn_gateway(&policy(dir, &urls[0], &urls, signals)).await;
            procs.insert(0, gw); // stopped before the engines
            url
        }
        Front::SluiceService | Front::SluiceLeastConn => {
            let (gw, url) = spawn_gateway(&policy(dir, &behind.unwrap(), &[], false)).await;
            procs.insert(0, gw);
            url
        }
    };
    run_load(&args(&target, rate, secs, seed))
        .await
        .expect("load generator runs")
}

/// One engine's capacity: the highest rate it serves alone with ≥ 90 % of requests meeting
/// both SLOs, to within 3 %.
async fn capacity(spec: &[&str], (mut lo, mut hi): (f64, f64), secs: f64, log: &mut String) -> f64 {
    while hi / lo > 1.03 {
        let mid = (lo * hi).sqrt();
        let (p, url, _) = engine(spec, 1).await;
        let r = run_load(&args(&url, mid, secs, 1))
            .await
            .expect("load generator runs");
        drop(p);
        let _ = writeln!(
            log,
            "capacity probe {mid:.2} req/s: attainment {:.1} %",
            r.attainment_offered * 100.0
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

async fn bench() {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fleet");
    std::fs::create_dir_all(&out).unwrap();
    let dir = tempfile_dir();
    let secs = env_num("SLUICE_FLEET_POINT_SECONDS").unwrap_or(30.0);
    let mut log = String::new();
    let probe = env_num("SLUICE_FLEET_PROBE_SECONDS").unwrap_or(20.0);
    // `SLUICE_FLEET_CAPACITY=fast,slow` skips the search (a run's numbers, for quick checks).
    let known: Option<Vec<f64>> = std::env::var("SLUICE_FLEET_CAPACITY")
        .ok()
        .map(|v| v.split(',').map(|x| x.parse().expect("capacity")).collect());
    let (fast, slow) = match known.as_deref() {
        Some([f, s]) => (*f, *s),
        _ => (
            capacity(FAST, (2.0, 20.0), probe, &mut log).await,
            capacity(SLOW, (0.5, 10.0), probe, &mut log).await,
        ),
    };
    let fleet = 2.0 * fast + slow;
    let _ = writeln!(
        log,
        "capacity: fast engine {fast:.2} req/s, slow engine {slow:.2} req/s, fleet {fleet:.2} req/s"
    );
    eprintln!("{}", log.lines().last().unwrap_or_default());
    let mut table = String::from(
        "| front | load | offered req/s | goodput req/s | % of the fleet's capacity | shed | errors | TTFT p99 |\n|---|---|---|---|---|---|---|---|\n",
    );
    let mut series: Vec<Series> = Vec::new();
    // `SLUICE_FLEET_FRONTS=0,1` runs some of the fronts (indices into Front::ALL), and
    // `SLUICE_FLEET_LOADS=2` some of the loads.
    let pick = |name: &str| -> Option<Vec<f64>> {
        std::env::var(name)
            .ok()
            .map(|v| v.split(',').map(|x| x.parse().expect(name)).collect())
    };
    let fronts = pick("SLUICE_FLEET_FRONTS");
    let loads = pick("SLUICE_FLEET_LOADS").unwrap_or(LOADS.to_vec());
    for (i, front) in Front::ALL.into_iter().enumerate() {
        if fronts.as_ref().is_some_and(|f| !f.contains(&(i as f64))) {
            continue;
        }
        let mut points = Vec::new();
        for &load in &loads {
            let r = run(front, load * fleet, secs, 1, &dir).await;
            let pct = r.goodput_rps / fleet * 100.0;
            let line = format!(
                "| {} | {load}× | {:.1} | {:.2} | {pct:.0} % | {:.0} % | {} | {} |",
                front.name(),
                load * fleet,
                r.goodput_rps,
                r.rejected as f64 / r.sent.max(1) as f64 * 100.0,
                r.errors,
                r.ttft_s
                    .map(|p| format!("{:.0} ms", p.p99 * 1000.0))
                    .unwrap_or("—".into()),
            );
            eprintln!("{line}");
            table.push_str(&line);
            table.push('\n');
            points.push((load, r.goodput_rps));
        }
        series.push(Series {
            name: front.name().into(),
            color: COLORS[(i + 1) % COLORS.len()],
            points,
            ..Series::default()
        });
    }
    series.push(Series {
        name: "fleet capacity (oracle)".into(),
        color: COLORS[0],
        points: vec![(0.0, fleet), (4.0, fleet)],
        dashed: true,
        ..Series::default()
    });
    let chart = Chart {
        title: format!(
            "Fleet goodput (2 fast + 1 half-speed engine, capacity {fleet:.1} req/s; TTFT ≤ 1 s, ITL ≤ 60 ms)"
        ),
        x_label: "offered load (multiples of the fleet's capacity)".into(),
        y_label: "goodput (req/s meeting both SLOs)".into(),
        x_max: 4.0,
        y_max: fleet * 1.6,
        x_suffix: "×".into(),
        series,
        ..Chart::default()
    };
    std::fs::write(out.join("goodput.svg"), chart.svg()).unwrap();
    let summary = format!("{log}\n{table}");
    std::fs::write(out.join("summary.md"), &summary).unwrap();
    println!("{summary}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sluice-fleet-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn main() {
    common::runtime().block_on(bench());
}
