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

use crate::limiter::SplitMix64;
use crate::openai::{ApiError, SSE_DONE, sse_json, unix_now};

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

fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/sim/stats", get(stats))
        .route("/health", get(|| async { "ok" }))
        .with_state(state)
}

async fn models(State(s): State<AppState>) -> Response {
    let created = unix_now();
    let data: Vec<Value> = s
        .config
        .models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": created, "owned_by": "sluice-sim"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn stats(State(s): State<AppState>) -> Response {
    let st = &s.stats;
    axum::Json(json!({
        "queued": st.queued.load(Ordering::Relaxed),
        "active": st.active.load(Ordering::Relaxed),
        "completed": st.completed.load(Ordering::Relaxed),
        "cancelled": st.cancelled.load(Ordering::Relaxed),
        "requests": st.requests.load(Ordering::Relaxed),
    }))
    .into_response()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat(State(s): State<AppState>, body: Bytes) -> Response {
    generate(s, Kind::Chat, body).await
}

async fn completions(State(s): State<AppState>, body: Bytes) -> Response {
    generate(s, Kind::Completion, body).await
}

fn bad_request(msg: impl Into<String>) -> Response {
    ApiError::new(StatusCode::BAD_REQUEST, "BadRequestError", msg).into_response()
}

/// Characters of the prompt: message contents (strings or text parts) or the prompt text.
fn prompt_chars(kind: Kind, req: &Value) -> Option<usize> {
    match kind {
        Kind::Chat => {
            let msgs = req.get("messages")?.as_array()?;
            Some(
                msgs.iter()
                    .map(|m| match m.get("content") {
                        Some(Value::String(s)) => s.len(),
                        Some(Value::Array(parts)) => parts
                            .iter()
                            .filter_map(|p| p.get("text").and_then(Value::as_str))
                            .map(str::len)
                            .sum(),
                        _ => 0,
                    })
                    .sum(),
            )
        }
        Kind::Completion => match req.get("prompt")? {
            Value::String(s) => Some(s.len()),
            Value::Array(a) => Some(a.iter().filter_map(Value::as_str).map(str::len).sum()),
            _ => None,
        },
    }
}

async fn generate(s: AppState, kind: Kind, body: Bytes) -> Response {
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        _ => return bad_request("request body is not a JSON object"),
    };
    let Some(model) = req.get("model").and_then(Value::as_str).map(str::to_owned) else {
        return bad_request("`model` is required");
    };
    if !s.config.models.contains(&model) {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFoundError",
            format!("The model `{model}` does not exist."),
        )
        .param("model")
        .code("model_not_found")
        .into_response();
    }
    let Some(chars) = prompt_chars(kind, &req) else {
        return bad_request(match kind {
            Kind::Chat => "`messages` must be a list of messages",
            Kind::Completion => "`prompt` must be a string or a list of strings",
        });
    };
    let prompt_tokens = (chars / 4).max(1) as u32;
    let max_tokens = req
        .get("max_completion_tokens")
        .or_else(|| req.get("max_tokens"))
        .and_then(Value::as_u64)
        .map(|n| n.clamp(1, 1 << 20) as u32)
        .unwrap_or(s.config.default_max_tokens);
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    // The text depends on what was asked, not on how (stream or not), like greedy decoding.
    let asked = match kind {
        Kind::Chat => req.get("messages"),
        Kind::Completion => req.get("prompt"),
    };
    let text_seed = foldhash::fast::FixedState::with_seed(s.config.seed)
        .hash_one((&model, asked.map(Value::to_string)));

    let (tx, rx) = mpsc::unbounded_channel();
    s.stats.requests.fetch_add(1, Ordering::Relaxed);
    if s.queue
        .send(Job {
            prompt_tokens,
            max_tokens,
            text_seed,
            tx,
        })
        .is_err()
    {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailableError",
            "engine is shutting down",
        )
        .into_response();
    }
    let n = s.next_id.fetch_add(1, Ordering::Relaxed);
    let meta = Meta {
        id: match kind {
            Kind::Chat => format!("chatcmpl-sim{n:016x}"),
            Kind::Completion => format!("cmpl-sim{n:016x}"),
        },
        created: unix_now(),
        model,
        kind,
        prompt_tokens,
        max_tokens,
    };
    if stream {
        stream_response(meta, rx, include_usage)
    } else {
        unary_response(meta, rx).await
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: u32,
    max_tokens: u32,
}

impl Meta {
    fn object(&self, stream: bool) -> &'static str {
        match (self.kind, stream) {
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn finish_reason(&self, completion_tokens: u32) -> &'static str {
        if completion_tokens >= self.max_tokens {
            "length"
        } else {
            "stop"
        }
    }

    fn usage(&self, completion_tokens: u32) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
        })
    }

    fn chunk(&self, choice: Value) -> Value {
        json!({
            "id": self.id, "object": self.object(true), "created": self.created,
            "model": self.model, "choices": [choice],
        })
    }

    fn delta(&self, delta: Value, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => self.chunk(
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}),
            ),
            Kind::Completion => self.chunk(json!({
                "index": 0, "text": delta.get("content").and_then(Value::as_str).unwrap_or(""),
                "logprobs": null, "finish_reason": finish, "stop_reason": null,
            })),
        }
    }
}

fn stream_response(
    meta: Meta,
    mut rx: mpsc::UnboundedReceiver<&'static str>,
    include_usage: bool,
) -> Response {
    let stream = async_stream_body(move |tx| async move {
        let mut n = 0u32;
        while let Some(word) = rx.recv().await {
            if n == 0 && meta.kind == Kind::Chat {
                tx.send(sse_json(
                    &meta.delta(json!({"role": "assistant", "content": ""}), None),
                ))?;
            }
            n += 1;
            tx.send(sse_json(&meta.delta(json!({"content": word}), None)))?;
        }
        let finish = meta.finish_reason(n);
        tx.send(sse_json(&meta.delta(json!({}), Some(finish))))?;
        if include_usage {
            let mut usage = json!({
                "id": meta.id, "object": meta.object(true), "created": meta.created,
                "model": meta.model, "choices": [],
            });
            usage["usage"] = meta.usage(n);
            tx.send(sse_json(&usage))?;
        }
        tx.send(Bytes::from_static(SSE_DONE))?;
        Ok(())
    });
    let mut resp = Response::new(stream);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// A body fed by a task; dropping the body (client gone) ends the task at its next send.
fn async_stream_body<F, Fut>(produce: F) -> Body
where
    F: FnOnce(mpsc::UnboundedSender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = Result<(), mpsc::error::SendError<Bytes>>> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let fut = produce(tx);
    tokio::spawn(async move {
        let _ = fut.await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Body::from_stream(stream)
}

async fn unary_response(meta: Meta, mut rx: mpsc::UnboundedReceiver<&'static str>) -> Response {
    let mut text = String::new();
    let mut n = 0u32;
    while let Some(word) = rx.recv().await {
        text.push_str(word);
        n += 1;
    }
    let finish = meta.finish_reason(n);
    let choice = match meta.kind {
        Kind::Chat => json!({
            "index": 0, "message": {"role": "assistant", "content": text},
            "logprobs": null, "finish_reason": finish,
        }),
        Kind::Completion => json!({
            "index": 0, "text": text, "logprobs": null, "finish_reason": finish, "stop_reason": null,
        }),
    };
    axum::Json(json!({
        "id": meta.id, "object": meta.object(false), "created": meta.created,
        "model": meta.model, "choices": [choice], "usage": meta.usage(n),
    }))
    .into_response()
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
