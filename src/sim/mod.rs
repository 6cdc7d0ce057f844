//! `sluice sim-engine`: an OpenAI-compatible inference server that simulates a GPU server's
//! timing without a GPU, for demos, tests and benchmarks (after the idea of Dynamo's mocker).
//!
//! Model: continuous batching. Up to `max_num_seqs` sequences decode together; further
//! requests wait in a FIFO queue. A sequence admitted to the batch first prefills for
//! `prefill_ms_per_token × prompt_tokens` (prompt tokens estimated as characters / 4), then
//! receives one token per decode step. A step takes
//! `decode_step_ms + decode_step_ms_per_seq × active_sequences`, so
//! TTFT = queue wait + prefill (+ up to one step), ITL = the step time, and capacity is finite:
//! offered load beyond it builds the queue and TTFT grows without bound — real overload.
//!
//! Output: `max_tokens` (or `max_completion_tokens`, or `--default-max-tokens`) tokens, each a
//! word drawn deterministically from the prompt and `--seed`, so identical requests get
//! identical text. Streams exactly like vLLM's OpenAI server: a role chunk, content chunks, a
//! finish chunk, a usage chunk when `stream_options.include_usage`, then `data: [DONE]`.
//! A client that disconnects frees its batch slot at the next step.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::random::SplitMix64;

mod http;
use http::router;

/// Timing and identity of the simulated server.
#[derive(Debug, Clone, clap::Args)]
pub struct SimConfig {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Model name served (repeatable).
    #[arg(long = "model", default_values_t = vec!["sim-llm".to_string()])]
    pub models: Vec<String>,
    /// Sequences decoding together; the rest wait in a FIFO queue.
    #[arg(long, default_value_t = 16)]
    pub max_num_seqs: usize,
    /// Base time of one decode step, ms.
    #[arg(long, default_value_t = 10.0)]
    pub decode_step_ms: f64,
    /// Extra decode step time per active sequence, ms (ITL = base + this × active).
    #[arg(long, default_value_t = 1.0)]
    pub decode_step_ms_per_seq: f64,
    /// Prefill time per prompt token, ms (prompt tokens ≈ characters / 4).
    #[arg(long, default_value_t = 0.2)]
    pub prefill_ms_per_token: f64,
    /// Output tokens when the request sets no max_tokens.
    #[arg(long, default_value_t = 64)]
    pub default_max_tokens: u32,
    /// Seed of the generated text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Never send a usage chunk in streams, whatever `stream_options.include_usage` asks (as
    /// llama-cpp-python's server does): for testing how the gateway copes.
    #[arg(long)]
    pub ignore_stream_usage: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            listen: "127.0.0.1:8000".parse().unwrap(),
            models: vec!["sim-llm".into()],
            max_num_seqs: 16,
            decode_step_ms: 10.0,
            decode_step_ms_per_seq: 1.0,
            prefill_ms_per_token: 0.2,
            default_max_tokens: 64,
            seed: 0,
            ignore_stream_usage: false,
        }
    }
}

/// Counters of the simulated engine, served at `GET /sim/stats`.
#[derive(Debug, Default)]
pub struct SimStats {
    pub queued: AtomicU64,
    pub active: AtomicU64,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub requests: AtomicU64,
}

/// A request waiting for or holding a batch slot.
struct Job {
    prompt_tokens: u32,
    max_tokens: u32,
    text_seed: u64,
    /// Tokens to the request handler; dropped when the sequence finishes.
    tx: mpsc::UnboundedSender<&'static str>,
}

struct Active {
    job: Job,
    ready_at: Instant,
    emitted: u32,
    rng: SplitMix64,
}

#[derive(Clone)]
struct AppState {
    config: Arc<SimConfig>,
    stats: Arc<SimStats>,
    queue: mpsc::UnboundedSender<Job>,
    next_id: Arc<AtomicU64>,
}

const WORDS: &[&str] = &[
    " the", " a", " model", " token", " latency", " server", " queue", " batch", " of", " and",
    " to", " stream", " first", " time", " is", " fast", " slow", " GPU", " request", " answer",
    " in", " it", " we", " load", " shed", " keep", " goodput", " high", ".", ",",
];

/// Runs the batch scheduler until the job channel closes.
async fn scheduler(
    config: Arc<SimConfig>,
    stats: Arc<SimStats>,
    mut rx: mpsc::UnboundedReceiver<Job>,
) {
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut active: Vec<Active> = Vec::new();
    let mut open = true;
    loop {
        // Take in everything submitted so far.
        while let Ok(job) = rx.try_recv() {
            queue.push_back(job);
        }
        if active.is_empty() && queue.is_empty() {
            if !open {
                return;
            }
            match rx.recv().await {
                Some(job) => queue.push_back(job),
                None => open = false,
            }
            continue;
        }
        let now = Instant::now();
        while active.len() < config.max_num_seqs {
            let Some(job) = queue.pop_front() else { break };
            let prefill = Duration::from_secs_f64(
                config.prefill_ms_per_token * f64::from(job.prompt_tokens) / 1000.0,
            );
            active.push(Active {
                rng: SplitMix64::new(job.text_seed),
                job,
                ready_at: now + prefill,
                emitted: 0,
            });
        }
        stats.queued.store(queue.len() as u64, Ordering::Relaxed);
        stats.active.store(active.len() as u64, Ordering::Relaxed);
        let step_ms = config.decode_step_ms + config.decode_step_ms_per_seq * active.len() as f64;
        tokio::time::sleep(Duration::from_secs_f64(step_ms.max(0.0) / 1000.0)).await;
        let now = Instant::now();
        active.retain_mut(|seq| {
            if seq.job.tx.is_closed() {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            if now < seq.ready_at {
                return true;
            }
            let word = WORDS[(seq.rng.next_u64() % WORDS.len() as u64) as usize];
            if seq.job.tx.send(word).is_err() {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            seq.emitted += 1;
            if seq.emitted >= seq.job.max_tokens {
                stats.completed.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            true
        });
        // Waiting requests whose clients left never take a slot.
        queue.retain(|job| {
            let keep = !job.tx.is_closed();
            if !keep {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            keep
        });
        stats.queued.store(queue.len() as u64, Ordering::Relaxed);
        stats.active.store(active.len() as u64, Ordering::Relaxed);
    }
}

/// A running simulated engine.
pub struct SimEngine {
    pub addr: SocketAddr,
    pub stats: Arc<SimStats>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl SimEngine {
    /// Binds `config.listen` and serves until [`SimEngine::stop`] (or the runtime ends).
    pub async fn start(config: SimConfig) -> std::io::Result<SimEngine> {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let config = Arc::new(config);
        let stats = Arc::new(SimStats::default());
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(scheduler(config.clone(), stats.clone(), rx));
        let state = AppState {
            config,
            stats: stats.clone(),
            queue: tx,
            next_id: Arc::new(AtomicU64::new(1)),
        };
        let app = router(state);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(crate::nodelay(listener), app)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.await;
                })
                .await
        });
        Ok(SimEngine {
            addr,
            stats,
            shutdown: Some(stop_tx),
            task,
        })
    }

    /// Stops accepting and waits for open responses to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = self.task.await;
    }
}

/// `sluice sim-engine`: serve until Ctrl-C / SIGTERM.
pub async fn run(config: SimConfig) -> anyhow::Result<()> {
    let engine = SimEngine::start(config.clone()).await?;
    tracing::info!(addr = %engine.addr, models = ?config.models, max_num_seqs = config.max_num_seqs, "simulated engine listening");
    crate::shutdown_signal().await;
    engine.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests;
