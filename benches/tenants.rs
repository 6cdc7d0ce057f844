//! Tenants, whole system: one simulated engine (16 slots), sluice in front of it, two clients
//! sharing it. "light" offers a quarter of the engine's capacity C, "heavy" three times it.
//!
//! - **C** is measured first, in the same run: the goodput of a closed loop holding the engine's
//!   16 slots busy.
//! - **One tenant**: the same total load (3.25 C) from one anonymous client: the goodput to
//!   compare the two-tenant total with.
//! - **Two tenants, no tenancy**: the clients are not told apart (no `clientAuth`): each is shed
//!   alike (sluice before fair shedding).
//! - **Two tenants, fair**: `clientAuth` names them, so fair shedding runs.
//! - **Budget**: a client with `requestsPerMinute: 120` offering twice that (4 req/s, under C,
//!   so nothing is shed for load) for `SLUICE_TENANTS_BUDGET_SECONDS` (default 180): the
//!   requests it gets served against 2 a second.
//!
//! - **Peer**: LiteLLM's proxy with per-key rpm limits (heavy's set to what the engine has
//!   left after light), for both loads, when `SLUICE_TENANTS_LITELLM` names its executable
//!   (see `tenants/litellm.rs`).
//!
//! Each load runs `SLUICE_TENANTS_SECONDS` (default 60) with seeds 1..=`SLUICE_TENANTS_SEEDS`
//! (default 2). Results: stdout (a markdown table), `target/tenants/results.json`, and
//! `target/tenants/timeline.svg`: each tenant's goodput second by second in the first seed's
//! two-tenant runs.
//! Run: `cargo bench --bench tenants`.

mod common;
#[path = "tenants/litellm.rs"]
mod litellm;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use sluice::loadgen::report::Report;
use sluice::loadgen::{ApiKey, LoadgenArgs, run_load};

use common::plot::{COLORS, Chart, Series, stack};
use common::process::ChildProcess;
use common::{spawn, spawn_gateway};

const TTFT_SLO: Duration = Duration::from_secs(1);
const ITL_SLO: Duration = Duration::from_millis(50);

fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.parse().ok()
}

fn load(url: &str, key: Option<&str>, rate: f64, secs: f64, seed: u64) -> LoadgenArgs {
    LoadgenArgs {
        api_key: key.map(|k| ApiKey(k.into())),
        output_tokens: (100, 200),
        ttft_slo: TTFT_SLO,
        itl_slo: ITL_SLO,
        ..common::loadgen(url, rate, secs, seed)
    }
}

struct Setup {
    _procs: Vec<ChildProcess>,
    engine: String,
    gateway: Option<String>,
}

async fn engine(seed: u64) -> (ChildProcess, String) {
    let seed = seed.to_string();
    let mut args = vec!["sim-engine", "--listen", "127.0.0.1:0", "--seed", &seed];
    // `common::ENGINE`'s step times, with 16 slots.
    args.extend_from_slice(common::ENGINE);
    args[6] = "16";
    spawn(&args, "simulated engine", "/health").await
}

/// The engine and a gateway whose policy adds `spec` (with the client keys in `keys`).
async fn system(spec: Option<&str>, keys: &Path, dir: &Path, seed: u64) -> Setup {
    let (e, url) = engine(seed).await;
    let Some(spec) = spec else {
        return Setup {
            _procs: vec![e],
            engine: url,
            gateway: None,
        };
    };
    let policy = dir.join("policy.yaml");
    let doc = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: bench}}\nspec:\n  upstream: {{url: '{url}'}}\n  defaults: {{ttft: 500ms, itl: 40ms}}\n{spec}"
    );
    std::fs::write(&policy, doc).expect("write policy");
    let (gw, gw_url) = if spec.contains("clientAuth") {
        spawn(
            &[
                "gateway",
                "--listen",
                "127.0.0.1:0",
                "--policy-file",
                policy.to_str().unwrap(),
                "--client-keys-dir",
                keys.to_str().unwrap(),
            ],
            "gateway",
            "/readyz",
        )
        .await
    } else {
        spawn_gateway(&policy).await
    };
    Setup {
        _procs: vec![gw, e],
        engine: url,
        gateway: Some(gw_url),
    }
}

fn summary(r: &Report) -> Value {
    json!({
        "offered_rps": r.offered_rps,
        "goodput_rps": r.goodput_rps,
        "shed": r.reject_rate,
        "sent": r.sent,
        "rejected": r.rejected,
        "ok": r.ok,
        "ttft_p99_s": r.ttft_s.as_ref().map(|p| p.p99),
    })
}

/// Light and heavy at `rates`, at once, through `url` (with their keys, if any).
async fn two(
    url: &str,
    keys: Option<(&str, &str)>,
    (light, heavy): (f64, f64),
    secs: f64,
    seed: u64,
) -> (Report, Report) {
    let (la, ha) = (
        load(url, keys.map(|k| k.0), light, secs, seed * 10 + 1),
        load(url, keys.map(|k| k.1), heavy, secs, seed * 10 + 2),
    );
    let (l, h) = futures_util::join!(run_load(&la), run_load(&ha));
    (l.unwrap(), h.unwrap())
}

fn row(name: &str, seed: u64, l: &Report, h: &Report) -> String {
    format!(
        "| {name} | {seed} | {:.2} / {:.2} / {:.2} | {:.1} % | {:.2} | {:.1} % | {:.2} |\n",
        l.offered_rps,
        l.ok as f64 / l.duration_s,
        l.goodput_rps,
        l.reject_rate * 100.0,
        h.goodput_rps,
        h.reject_rate * 100.0,
        l.goodput_rps + h.goodput_rps
    )
}

/// Requests a second over a 5 s window, centred, from a run's per-second counts.
fn smoothed(
    r: &Report,
    count: impl Fn(&sluice::loadgen::report::Second) -> usize,
) -> Vec<(f64, f64)> {
    let n = r.series.len();
    (0..n)
        .map(|i| {
            let w = &r.series[i.saturating_sub(2)..(i + 3).min(n)];
            let sum: usize = w.iter().map(&count).sum();
            (r.series[i].t as f64, sum as f64 / w.len() as f64)
        })
        .collect()
}

/// A panel of one two-tenant run: light's offered rate and goodput, heavy's goodput.
fn timeline(name: &str, l: &Report, h: &Report, c: f64) -> Chart {
    let line = |name: &str, color, points, dashed| Series {
        name: name.into(),
        color,
        points,
        dashed,
        ..Series::default()
    };
    Chart {
        title: format!("{name}: goodput by tenant (engine capacity C = {c:.2} req/s)"),
        x_label: "time (s)".into(),
        y_label: "req/s (5 s window)".into(),
        x_max: l.duration_s.max(h.duration_s).ceil(),
        y_max: c * 1.3,
        series: vec![
            line("light offered", COLORS[3], smoothed(l, |s| s.offered), true),
            line("light goodput", COLORS[3], smoothed(l, |s| s.good), false),
            line("heavy goodput", COLORS[1], smoothed(h, |s| s.good), false),
            line(
                "capacity C",
                COLORS[0],
                vec![(0.0, c), (l.duration_s, c)],
                true,
            ),
        ],
        height: 220.0,
        ..Chart::default()
    }
}

fn main() {
    common::runtime().block_on(bench());
}

async fn bench() {
    let secs: f64 = env_num("SLUICE_TENANTS_SECONDS").unwrap_or(60.0);
    let budget_secs: f64 = env_num("SLUICE_TENANTS_BUDGET_SECONDS").unwrap_or(180.0);
    let seeds: u64 = env_num("SLUICE_TENANTS_SEEDS").unwrap_or(2);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tenants");
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    let _ = std::fs::remove_dir_all(&keys);
    std::fs::create_dir_all(&keys).unwrap();
    for (name, key) in [
        ("light", "sk-light"),
        ("heavy", "sk-heavy"),
        ("metered", "sk-metered"),
    ] {
        std::fs::write(keys.join(name), format!("{key}\n")).unwrap();
    }
    // C: a closed loop of 16 in flight straight at the engine.
    let s = system(None, &keys, &dir, 1).await;
    let mut cap = load(&s.engine, None, 60.0, 30.0, 1);
    cap.max_inflight = Some(16);
    let c = run_load(&cap).await.unwrap().goodput_rps;
    drop(s);
    eprintln!("capacity C = {c:.2} req/s");
    let (light, heavy) = (0.25 * c, 3.0 * c);
    let fair = "  clientAuth: {secretRef: {name: clients}}\n";
    let peer = std::env::var("SLUICE_TENANTS_LITELLM").ok();
    if peer.is_none() {
        eprintln!("SLUICE_TENANTS_LITELLM is not set: the LiteLLM peer is not run");
    }
    let mut runs = Vec::new();
    let mut table = String::from(
        "| run | seed | light offered / served / goodput (req/s) | light shed | heavy goodput | heavy shed | total goodput |\n|---|---|---|---|---|---|---|\n",
    );
    let mut panels = Vec::new();
    for seed in 1..=seeds {
        let s = system(Some(""), &keys, &dir, seed).await;
        let gw = s.gateway.clone().unwrap();
        let one = run_load(&load(&gw, None, light + heavy, secs, seed))
            .await
            .unwrap();
        drop(s);
        table.push_str(&format!(
            "| one tenant at 3.25 C | {seed} | | | | | {:.2} |\n",
            one.goodput_rps
        ));
        runs.push(json!({"run": "one tenant", "seed": seed, "total": summary(&one)}));
        for (name, spec, keyed) in [("no tenancy", "", false), ("fair", fair, true)] {
            let s = system(Some(spec), &keys, &dir, seed).await;
            let gw = s.gateway.clone().unwrap();
            let keys = keyed.then_some(("sk-light", "sk-heavy"));
            let (l, h) = two(&gw, keys, (light, heavy), secs, seed).await;
            drop(s);
            if seed == 1 {
                panels.push(timeline(&format!("two tenants, {name}"), &l, &h, c));
            }
            table.push_str(&row(&format!("two tenants, {name}"), seed, &l, &h));
            runs.push(
                json!({"run": name, "seed": seed, "light": summary(&l), "heavy": summary(&h)}),
            );
            eprintln!("{table}");
        }
        // The peer, configured as a user would: heavy limited to what the engine has left
        // after light (in requests a minute), light to twice what it sends.
        if let Some(litellm) = &peer {
            let (e, engine_url) = engine(seed).await;
            let heavy_rpm = ((c - light) * 60.0).round() as u64;
            let light_rpm = (light * 120.0).round() as u64;
            let limits = [
                ("sk-light", Some(light_rpm), None),
                ("sk-heavy", Some(heavy_rpm), None),
            ];
            let (p, url) = litellm::start(litellm, &engine_url, &limits, &dir).await;
            let keys = Some(("sk-light", "sk-heavy"));
            let (l, h) = two(&url, keys, (light, heavy), secs, seed).await;
            drop((p, e));
            let name = format!("two tenants, LiteLLM rpm (light {light_rpm}, heavy {heavy_rpm})");
            table.push_str(&row(&name, seed, &l, &h));
            runs.push(
                json!({"run": "litellm", "seed": seed, "light": summary(&l), "heavy": summary(&h),
                "light_rpm": light_rpm, "heavy_rpm": heavy_rpm}),
            );
            eprintln!("{table}");
        }
    }
    // The budget: 120 a minute, offered 4 a second.
    let spec = format!("{fair}  tenants: {{clients: {{metered: {{requestsPerMinute: 120}}}}}}\n");
    let s = system(Some(&spec), &keys, &dir, 1).await;
    let gw = s.gateway.clone().unwrap();
    let r = run_load(&load(&gw, Some("sk-metered"), 4.0, budget_secs, 7))
        .await
        .unwrap();
    drop(s);
    let want = 2.0 * budget_secs;
    let got = r.ok as f64;
    let budget = format!(
        "budget 120/min offered 4/s for {budget_secs} s: served {got} of {} sent (budget {want}: {:+.1} %), {} refused",
        r.sent,
        (got / want - 1.0) * 100.0,
        r.rejected
    );
    runs.push(json!({"run": "budget", "served": got, "budget": want, "sent": r.sent, "rejected": r.rejected}));
    let mut budget = format!("sluice: {budget}");
    if let Some(litellm) = &peer {
        let (e, engine_url) = engine(1).await;
        let limits = [("sk-metered", Some(120), None)];
        let (p, url) = litellm::start(litellm, &engine_url, &limits, &dir).await;
        let r = run_load(&load(&url, Some("sk-metered"), 4.0, budget_secs, 7))
            .await
            .unwrap();
        drop((p, e));
        let got = r.ok as f64;
        budget.push_str(&format!(
            "\nLiteLLM: served {got} of {} sent (budget {want}: {:+.1} %), {} refused",
            r.sent,
            (got / want - 1.0) * 100.0,
            r.rejected
        ));
        runs.push(json!({"run": "budget litellm", "served": got, "budget": want, "sent": r.sent, "rejected": r.rejected}));
    }
    println!(
        "capacity C = {c:.2} req/s; light {light:.2}, heavy {heavy:.2} req/s\n\n{table}\n{budget}"
    );
    std::fs::write(dir.join("timeline.svg"), stack(&panels)).unwrap();
    let out = json!({"capacity_rps": c, "seconds": secs, "runs": runs});
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&out).unwrap(),
    )
    .unwrap();
}
