//! The official `openai` Python package as a real client of the gateway (process-level:
//! simulated engine and gateway run as the built binary on 127.0.0.1). The Python interpreter
//! comes from the venv that scripts/test.sh installs (`SLUICE_PYTHON`).

mod support;

use std::process::Command;

use support::http::{Gw, PolicyFile, Sim, client, get, metric, policy_yaml};

fn python() -> String {
    std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| {
        panic!(
            "SLUICE_PYTHON is not set: it names the Python of a venv with tests/requirements.txt \
             installed; scripts/test.sh creates it"
        )
    })
}

fn run_scenario(base: &str, scenario: &str) -> String {
    let out = Command::new(python())
        .arg(format!("{}/tests/openai_client.py", support::REPO))
        .args([base, scenario])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "openai client scenario {scenario} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}");
    stdout
}

#[tokio::test]
async fn openai_sdk_streams_unary_and_completions() {
    let c = client();
    let sim = Sim::start(&c, &[]).await;
    let policy = PolicyFile::new(&policy_yaml(&sim.url, ""));
    let gw = Gw::start(&c, &policy.0, None, &[]).await;
    for scenario in ["chat_streaming", "chat_unary", "completions", "models"] {
        run_scenario(&gw.url, scenario);
    }
}

#[tokio::test]
async fn openai_sdk_sees_rate_limit_errors_and_honours_retry_after_ms() {
    let c = client();
    let sim = Sim::start(&c, &[]).await;
    // A hard cliff at 1 ms TTFT: once one request is measured, every request is shed until the
    // average has decayed back to the threshold (about τ·ln(TTFT / 1 ms) ≈ 3 s).
    let policy = PolicyFile::new(&policy_yaml(
        &sim.url,
        "defaults: {ttft: 1ms, itl: 1s, timeConstant: 1s}\nshedding: {maxRejectProbability: 1, ramp: 1, maxEvidence: 1}",
    ));
    let gw = Gw::start(&c, &policy.0, None, &[]).await;
    run_scenario(&gw.url, "rate_limited");
    let m = get(&c, &format!("{}/metrics", gw.url)).await.text();
    let rejected = metric(
        &m,
        "sluice_requests_total",
        &[
            ("model", "sim-llm"),
            ("endpoint", "chat_completions"),
            ("stream", "false"),
            ("outcome", "rejected"),
        ],
    );
    assert!(rejected.unwrap_or(0.0) >= 3.0, "{m}");
}

#[tokio::test]
async fn openai_sdk_sees_a_spent_budget_as_a_rate_limit_error_with_openais_headers() {
    let c = client();
    let sim = Sim::start(&c, &[]).await;
    let policy = PolicyFile::new(&policy_yaml(
        &sim.url,
        "tenants: {default: {requestsPerMinute: 2, tokensPerMinute: 600}}",
    ));
    // Unary answers assembled at once: their usage is what the tokens are settled to.
    let gw = Gw::start(&c, &policy.0, None, &["--usage-probe=false"]).await;
    let out = run_scenario(&gw.url, "over_budget");
    let usage: f64 = (out.lines())
        .find_map(|l| l.strip_prefix("usage_total="))
        .and_then(|n| n.trim().parse().ok())
        .expect("the scenario prints the usage it saw");
    let m = get(&c, &format!("{}/metrics", gw.url)).await.text();
    let tokens = metric(&m, "sluice_tenant_tokens_total", &[("tenant", "anonymous")]);
    assert_eq!(tokens, Some(usage), "settled to the usage the SDK saw: {m}");
    let over = metric(
        &m,
        "sluice_tenant_over_budget_total",
        &[("tenant", "anonymous")],
    );
    assert_eq!(over, Some(1.0), "{m}");
}
