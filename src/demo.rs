//! `sluice demo`: a simulated engine and a gateway in one process on 127.0.0.1, with the
//! example policy, so sluice can be tried without a cluster or a GPU.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, MonotonicClock};
use crate::gateway::{self, Gateway};
use crate::policy::source::{PolicyStore, load_and_poll_file};
use crate::sim::{SimConfig, SimEngine};

/// The example policy shipped with sluice (examples/policy.yaml).
pub const EXAMPLE_POLICY: &str = include_str!("../examples/policy.yaml");

/// Options of `sluice demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Address of the gateway.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Address of the simulated engine.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub engine_listen: SocketAddr,
    /// Sequences the simulated engine decodes together (its capacity).
    #[arg(long, default_value_t = 8)]
    pub max_num_seqs: usize,
}

/// Runs until Ctrl-C.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let engine = SimEngine::start(SimConfig {
        listen: args.engine_listen,
        max_num_seqs: args.max_num_seqs,
        decode_step_ms: 10.0,
        decode_step_ms_per_seq: 2.0,
        ..SimConfig::default()
    })
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "cannot start the simulated engine on {}: {e}",
            args.engine_listen
        )
    })?;

    let policy_path =
        std::env::temp_dir().join(format!("sluice-demo-policy-{}.yaml", std::process::id()));
    std::fs::write(&policy_path, EXAMPLE_POLICY)?;
    let upstream: http::Uri = format!("http://{}", engine.addr).parse()?;
    let store = Arc::new(PolicyStore::new(vec![upstream]));
    let watcher =
        load_and_poll_file(policy_path.clone(), store.clone(), Duration::from_secs(1)).await?;
    let watch_task = tokio::spawn(watcher);
    let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::new());
    let gw = Gateway::new(store, clock, gateway::GatewayOptions::default())?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, engine = %engine.addr, "gateway listening");

    println!(
        r#"
sluice demo
  gateway (OpenAI-compatible): http://{addr}/v1
  simulated engine:            http://{engine}/v1   (max {seqs} sequences at once)
  metrics:                     http://{addr}/metrics
  policy (edit it; changes apply live): {policy}

Try it:
  curl -N http://{addr}/v1/chat/completions -H 'content-type: application/json' \
    -d '{{"model": "sim-llm", "stream": true, "max_tokens": 32, "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  python3 - <<'PY'
  from openai import OpenAI
  client = OpenAI(base_url="http://{addr}/v1", api_key="unused")
  for chunk in client.chat.completions.create(model="sim-llm", stream=True, max_tokens=32,
                                              messages=[{{"role": "user", "content": "Hello!"}}]):
      print(chunk.choices[0].delta.content or "", end="", flush=True) if chunk.choices else None
  PY

Overload it (more concurrent streams than the engine's {seqs} slots) and watch
sluice_ttft_ema_seconds and sluice_reject_probability on /metrics, and 429s with Retry-After.
Ctrl-C stops.
"#,
        engine = engine.addr,
        seqs = args.max_num_seqs,
        policy = policy_path.display(),
    );
    gateway::serve(
        listener,
        gateway::router(gw.clone()),
        gw,
        crate::shutdown_signal(),
        Duration::from_secs(5),
    )
    .await?;
    watch_task.abort();
    engine.stop().await;
    let _ = std::fs::remove_file(&policy_path);
    println!("sluice demo stopped");
    Ok(())
}
