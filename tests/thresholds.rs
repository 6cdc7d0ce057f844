//! A careless user's thresholds against real processes: an ITL threshold (40 ms) below what
//! the engine gives even when idle (a 60 ms decode step, 16 slots). At low load nothing may
//! be shed (the engine has room, and every request meets the user's real SLO); past capacity
//! the gateway must still shed and keep goodput.

mod support;

use support::http::{Gw, PolicyFile, Sim, client, metric, policy_yaml};
use support::loadgen::loadgen;

/// The user's SLO is ITL ≤ 100 ms and TTFT ≤ 1 s; the policy guessed 40 ms and 500 ms.
const POLICY: &str = "models: [{name: sim-llm, ttft: 500ms, itl: 40ms, timeConstant: 4s}]";
const SLO: [&str; 4] = ["--ttft-slo", "1s", "--itl-slo", "100ms"];
/// 16–48 tokens at 60 ms + 1 ms per sequence: about 2.5 s a request, so 16 slots serve
/// about 6.5 requests per second.
const SHAPE: [&str; 4] = ["--output-tokens", "16-48", "--prompt-chars", "200-1000"];

async fn system(c: &support::http::HttpClient) -> (Sim, Gw, PolicyFile) {
    let sim = Sim::start(
        c,
        &[
            "--max-num-seqs",
            "16",
            "--decode-step-ms",
            "60",
            "--decode-step-ms-per-seq",
            "1",
        ],
    )
    .await;
    let policy = PolicyFile::new(&policy_yaml(&sim.url, POLICY));
    let gw = Gw::start(c, &policy.0, None, &[]).await;
    (sim, gw, policy)
}

fn run(gw: &Gw, rate: &str, duration: &str, seed: &str) -> serde_json::Value {
    let mut args = vec!["--rate", rate, "--duration", duration, "--seed", seed];
    args.extend_from_slice(&SLO);
    args.extend_from_slice(&SHAPE);
    args.extend_from_slice(&["--timeout", "30s"]);
    let r = loadgen(&gw.url, &args).0;
    eprintln!(
        "{rate} req/s: sent {} good {} shed {} goodput {:.2} req/s, admitted attainment {:.3}, ITL p50 {}",
        r["sent"],
        r["good"],
        r["rejected"],
        r["goodput_rps"].as_f64().unwrap_or(0.0),
        r["attainment_admitted"].as_f64().unwrap_or(0.0),
        r["itl_s"]["p50"]
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_itl_threshold_sheds_nothing_at_low_load() {
    let c = client();
    let (_sim, gw, _policy) = system(&c).await;
    let r = run(&gw, "0.5", "60s", "3");
    let (sent, rejected, good) = (
        r["sent"].as_u64().unwrap(),
        r["rejected"].as_u64().unwrap(),
        r["good"].as_u64().unwrap(),
    );
    assert!(sent >= 15, "{r}");
    // At most 1 %: with about 30 requests, none.
    assert!(rejected * 100 <= sent, "shed {rejected} of {sent}: {r}");
    assert_eq!(good, sent, "every request meets the user's real SLO: {r}");
    let itl = r["itl_s"]["p50"].as_f64().unwrap();
    assert!(
        itl > 0.06,
        "the engine really is slower than the threshold: {itl}"
    );
    let m = gw.metrics(&c).await;
    let unreachable = metric(&m, "sluice_thresholds_unreachable", &[("model", "sim-llm")]);
    assert_eq!(unreachable, Some(1.0), "{m}");
    let warnings = gw.process.warnings();
    let incident: Vec<_> = warnings
        .iter()
        .filter(|l| l.contains("they are unreachable"))
        .collect();
    assert_eq!(incident.len(), 1, "logged once per incident: {warnings:#?}");
    assert!(
        incident[0].contains("itl_low_concurrency_ms=6"),
        "{}",
        incident[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_itl_threshold_still_sheds_past_capacity_and_keeps_goodput() {
    let c = client();
    let (_sim, gw, _policy) = system(&c).await;
    // Three times what 16 slots serve.
    let r = run(&gw, "19.5", "20s", "5");
    let (sent, rejected) = (r["sent"].as_u64().unwrap(), r["rejected"].as_u64().unwrap());
    let goodput = r["goodput_rps"].as_f64().unwrap();
    assert!(rejected * 2 >= sent, "shed {rejected} of {sent}: {r}");
    assert!(goodput >= 5.5, "goodput {goodput} req/s of about 6.5: {r}");
    let admitted = r["attainment_admitted"].as_f64().unwrap();
    assert!(admitted >= 0.9, "admitted requests meet the SLO: {r}");
}
