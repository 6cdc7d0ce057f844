//! Engines behind the gateway, driven by the official `openai` Python client
//! (tests/engine_client.py): llama.cpp's `llama-server` serving Gemma 3 270M (installed by
//! scripts/llama.sh), and the simulated engine. Everything runs on 127.0.0.1; every process is
//! stopped by PID when its test ends, also on failure.

mod support;

use std::process::Command;

use support::http::{Gw, PolicyFile, Sim, client, get, metric, policy_yaml};
use support::llama::LlamaServer;

fn python() -> String {
    std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| {
        panic!("SLUICE_PYTHON is not set: the venv of tests/requirements.txt (scripts/test.sh creates it)")
    })
}

/// Runs a scenario of tests/engine_client.py; fails with its output.
fn scenario(gateway: &str, engine: &str, model: &str, name: &str) {
    let out = Command::new(python())
        .arg(format!("{}/tests/engine_client.py", support::REPO))
        .args([gateway, engine, model, name])
        .output()
        .expect("python runs");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "scenario {name} failed:\n{text}");
    eprintln!("{text}");
}

/// Thresholds no CPU engine here reaches, so the comparison is never shed.
const LENIENT: &str = "defaults: {ttft: 120s, itl: 60s}";

async fn unary_mode(c: &support::http::HttpClient, gw: &Gw, mode: &str) -> Option<f64> {
    let m = get(c, &format!("{}/metrics", gw.url)).await.text();
    metric(&m, "sluice_unary_mode", &[("mode", mode)])
}

/// Sends the first unary request (passed through, with the engine's own usage, while the
/// usage probe it starts runs) and waits until the probe has put the upstream in `mode`.
async fn first_unary(c: &support::http::HttpClient, gw: &Gw, model: &str, mode: &str) {
    assert_eq!(unary_mode(c, gw, "probing").await, Some(1.0));
    let body = serde_json::json!({"model": model, "max_tokens": 2,
        "messages": [{"role": "user", "content": "hi"}]});
    let first = gw.chat(c, &body).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert!(
        first.json()["usage"]["completion_tokens"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{}",
        first.text()
    );
    support::eventually(
        60,
        &format!("the usage probe puts the upstream in {mode}"),
        || async { (unary_mode(c, gw, mode).await == Some(1.0)).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn llama_server_answers_the_same_through_the_gateway() {
    let c = client();
    let llama = LlamaServer::start(4);
    let policy = PolicyFile::new(&policy_yaml(
        &llama.url,
        &format!("{LENIENT}\nmodels: [{{name: gemma}}]"),
    ));
    let gw = Gw::start(&c, &policy.0, None, &[]).await;
    first_unary(&c, &gw, "gemma", "assembled").await;
    scenario(&gw.url, &llama.url, "gemma", "compare_logprobs");
    scenario(&gw.url, &llama.url, "gemma", "compare_responses");
    // llama-server streams usage: unary requests stay assembled, and so measured.
    assert_eq!(unary_mode(&c, &gw, "assembled").await, Some(1.0));
    let m = get(&c, &format!("{}/metrics", gw.url)).await.text();
    let ttft = metric(&m, "sluice_ttft_seconds_count", &[("model", "gemma")]).unwrap();
    assert!(
        ttft >= 6.0,
        "unary and streamed requests were measured: {ttft}"
    );
    let errors: f64 = m
        .lines()
        .filter(|l| l.starts_with("sluice_upstream_errors_total"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(errors, 0.0, "{m}");
}

#[tokio::test]
async fn llama_server_overload_is_shed_with_retry_after_and_the_gate_recovers() {
    let c = client();
    let llama = LlamaServer::start(4);
    // A hard cliff at 1 ms TTFT with τ 1 s: every measured request overloads it, and the
    // average is back under the threshold a few seconds later.
    let policy = PolicyFile::new(&policy_yaml(
        &llama.url,
        "defaults: {ttft: 1ms, itl: 60s, timeConstant: 1s}\nmodels: [{name: gemma}]\nshedding: {maxRejectProbability: 1, ramp: 1, maxEvidence: 1}",
    ));
    let gw = Gw::start(&c, &policy.0, None, &[]).await;
    scenario(&gw.url, &llama.url, "gemma", "overload");
    let m = get(&c, &format!("{}/metrics", gw.url)).await.text();
    let shed = metric(
        &m,
        "sluice_requests_total",
        &[
            ("model", "gemma"),
            ("endpoint", "chat_completions"),
            ("stream", "false"),
            ("outcome", "rejected"),
        ],
    );
    assert!(shed.is_some_and(|n| n >= 1.0), "{m}");
}

#[tokio::test]
async fn the_simulated_engine_answers_the_same_through_the_gateway() {
    let c = client();
    let sim = Sim::start(&c, &[]).await;
    let policy = PolicyFile::new(&policy_yaml(&sim.url, LENIENT));
    let gw = Gw::start(&c, &policy.0, None, &[]).await;
    first_unary(&c, &gw, "sim-llm", "assembled").await;
    scenario(&gw.url, &sim.url, "sim-llm", "compare");
    assert_eq!(unary_mode(&c, &gw, "assembled").await, Some(1.0));
}

#[tokio::test]
async fn the_responses_api_is_relayed_and_measured() {
    let c = client();
    let sim = Sim::start(&c, &[]).await;
    let policy = PolicyFile::new(&policy_yaml(&sim.url, LENIENT));
    let gw = Gw::start(&c, &policy.0, None, &[]).await;
    scenario(&gw.url, &sim.url, "sim-llm", "compare_responses");
    let m = get(&c, &format!("{}/metrics", gw.url)).await.text();
    for stream in ["true", "false"] {
        let served = metric(
            &m,
            "sluice_requests_total",
            &[
                ("model", "sim-llm"),
                ("endpoint", "responses"),
                ("stream", stream),
                ("outcome", "success"),
            ],
        );
        assert_eq!(served, Some(1.0), "stream={stream}: {m}");
    }
    // Both were measured: first output-text delta (TTFT) and the gaps between deltas (ITL).
    let ttft = metric(&m, "sluice_ttft_seconds_count", &[("model", "sim-llm")]);
    assert_eq!(ttft, Some(2.0), "{m}");
    let itl = metric(&m, "sluice_itl_seconds_count", &[("model", "sim-llm")]).unwrap();
    assert!(itl >= 2.0, "{m}");
}

#[tokio::test]
async fn an_engine_whose_streams_lack_usage_never_costs_an_answer_its_usage() {
    let c = client();
    let sim = Sim::start(&c, &["--ignore-stream-usage"]).await;
    let policy = PolicyFile::new(&policy_yaml(&sim.url, LENIENT));
    let gw = Gw::start(&c, &policy.0, None, &[]).await;
    // The first unary request is passed through with the engine's own usage while the probe
    // finds the engine's streams lack it (it used to be assembled, answering usage null).
    first_unary(&c, &gw, "sim-llm", "passthrough").await;
    assert_eq!(unary_mode(&c, &gw, "assembled").await, Some(0.0));
    // From then on unary requests are relayed as they are: the engine's own answer, with usage,
    // equal to what it gives directly.
    let body = serde_json::json!({"model": "sim-llm", "max_tokens": 3,
        "messages": [{"role": "user", "content": "hi"}]});
    let second = gw.chat(&c, &body).await;
    assert_eq!(second.json()["usage"]["completion_tokens"], 3);
    scenario(&gw.url, &sim.url, "sim-llm", "compare_unary");
}

/// A streamed request for `gemma` at `url` that got its first token, held open until dropped.
async fn gemma_stream(c: &support::http::HttpClient, url: &str) -> hyper::body::Incoming {
    use http_body_util::BodyExt;
    let body = serde_json::json!({"model": "gemma", "stream": true, "max_tokens": 4000,
        "messages": [{"role": "user", "content": "Count from one to ten thousand in words."}]});
    let headers = [("content-type", "application/json")];
    let url = format!("{url}/v1/chat/completions");
    let resp = support::http::start(c, "POST", &url, &headers, body.to_string()).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    body.frame()
        .await
        .expect("a first event")
        .expect("no error");
    body
}

#[tokio::test]
async fn llama_servers_own_metrics_say_when_its_slots_are_full_and_the_gateway_sheds_there() {
    let c = client();
    let llama = LlamaServer::start(2);
    let doc = policy_yaml(&llama.url, &format!("{LENIENT}\nmodels: [{{name: gemma}}]"));
    let from = format!("upstream: {{url: '{}'}}", llama.url);
    assert!(doc.contains(&from));
    let to = format!(
        "upstream: {{url: '{}', engineMetrics: {{interval: 500ms}}}}",
        llama.url
    );
    let policy = PolicyFile::new(&doc.replace(&from, &to));
    let gw = Gw::start(&c, &policy.0, None, &[]).await;
    let at = [("upstream", llama.url.trim_start_matches("http://"))];
    // `auto` recognises llama.cpp's names (`--metrics`), then its slot count is read from
    // /props.
    gw.wait_metric(&c, "sluice_engine_slots", &at, 2.0, 30)
        .await;
    let m = gw.metrics(&c).await;
    assert_eq!(metric(&m, "sluice_engine_metrics_up", &at), Some(1.0));
    assert_eq!(metric(&m, "sluice_engine_running_requests", &at), Some(0.0));
    assert_eq!(metric(&m, "sluice_engine_waiting_requests", &at), Some(0.0));
    // Two long streams fill both slots (`llamacpp:requests_processing` 2): the batch is full,
    // and a third request is shed outright instead of waiting in the engine for a slot.
    let _a = gemma_stream(&c, &gw.url).await;
    let _b = gemma_stream(&c, &gw.url).await;
    gw.wait_metric(&c, "sluice_engine_running_requests", &at, 2.0, 30)
        .await;
    let body = serde_json::json!({"model": "gemma", "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}]});
    let shed = gw.chat(&c, &body).await;
    assert_eq!(shed.status, 429, "{}", shed.text());
    assert!(shed.header("retry-after").is_some());
    // A request sent to the engine directly waits for a slot: `llamacpp:requests_deferred`
    // 1, read as its queue.
    let _direct = tokio::spawn({
        let (c, url) = (c.clone(), llama.url.clone());
        async move { gemma_stream(&c, &url).await }
    });
    gw.wait_metric(&c, "sluice_engine_waiting_requests", &at, 1.0, 30)
        .await;
}
