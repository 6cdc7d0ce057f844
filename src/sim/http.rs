//! The simulated engine's OpenAI HTTP surface: chat and text completions (streamed exactly
//! like vLLM's server, or unary), the Responses API (`/v1/responses`: `response.created`,
//! `response.output_text.delta` events and `response.completed` with the whole response, or
//! that response unary), `/v1/models` and `/stats`.

use super::*;
use crate::openai::{ApiError, SSE_DONE, sse_json, unix_now};

pub(super) fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/responses", post(responses))
        .route("/v1/models", get(models))
        .route("/sim/stats", get(stats))
        .route("/metrics", get(metrics))
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

/// The queue in vLLM's metric names (Prometheus text), as an engine publishes it for
/// `spec.upstream.engineMetrics`: requests waiting for a slot, requests in the batch, and the
/// batch's fill as the KV-cache use (the simulated engine has no KV cache: slots stand in).
async fn metrics(State(s): State<AppState>) -> Response {
    let st = &s.stats;
    let (queued, active) = (
        st.queued.load(Ordering::Relaxed),
        st.active.load(Ordering::Relaxed),
    );
    let model = s.config.models.first().map_or("sim-llm", |m| m.as_str());
    let fill = active as f64 / s.config.max_num_seqs.max(1) as f64;
    let page = format!(
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{model_name=\"{model}\"}} {queued}\n\
         # HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{model_name=\"{model}\"}} {active}\n\
         # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{{model_name=\"{model}\"}} {fill}\n"
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], page).into_response()
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
    Response,
}

async fn responses(State(s): State<AppState>, body: Bytes) -> Response {
    generate(s, Kind::Response, body).await
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
        // `input`: a string, or a list of messages as in chat.
        Kind::Response => match req.get("input")? {
            Value::String(s) => Some(s.len()),
            Value::Array(_) => prompt_chars(
                Kind::Chat,
                &json!({"messages": req.get("input").cloned().unwrap_or_default()}),
            ),
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
            Kind::Response => "`input` must be a string or a list of messages",
        });
    };
    let prompt_tokens = (chars / 4).max(1) as u32;
    let max_tokens = req
        .get("max_completion_tokens")
        .or_else(|| req.get("max_tokens"))
        .or_else(|| req.get("max_output_tokens"))
        .and_then(Value::as_u64)
        .map(|n| n.clamp(1, 1 << 20) as u32)
        .unwrap_or(s.config.default_max_tokens);
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = !s.config.ignore_stream_usage
        && req
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
    // The text depends on what was asked, not on how (stream or not), like greedy decoding.
    let asked = match kind {
        Kind::Chat => req.get("messages"),
        Kind::Completion => req.get("prompt"),
        Kind::Response => req.get("input"),
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
            Kind::Response => format!("resp_sim{n:016x}"),
        },
        created: unix_now(),
        model,
        kind,
        prompt_tokens,
        max_tokens,
    };
    // Nothing of the request is needed from here on: a queued request holds no parsed copy.
    drop((req, body));
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
            (Kind::Response, _) => "response",
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
            _ => self.chunk(json!({
                "index": 0, "text": delta.get("content").and_then(Value::as_str).unwrap_or(""),
                "logprobs": null, "finish_reason": finish, "stop_reason": null,
            })),
        }
    }

    /// The Responses API's response object, `in_progress` (no output yet) or complete.
    fn response(&self, done: Option<(&str, u32)>) -> Value {
        let Some((text, n)) = done else {
            return json!({
                "id": self.id, "object": "response", "created_at": self.created,
                "model": self.model, "status": "in_progress", "output": [], "usage": null,
            });
        };
        let incomplete = self.finish_reason(n) == "length";
        json!({
            "id": self.id, "object": "response", "created_at": self.created, "model": self.model,
            "status": if incomplete { "incomplete" } else { "completed" },
            "incomplete_details": if incomplete { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "output": [{
                "type": "message", "id": format!("msg_{}", self.id), "role": "assistant",
                "status": if incomplete { "incomplete" } else { "completed" },
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }],
            "usage": {
                "input_tokens": self.prompt_tokens, "output_tokens": n,
                "total_tokens": self.prompt_tokens + n,
            },
        })
    }
}

/// One Responses API stream event: `event:` and `data:` lines.
fn response_event(kind: &str, mut data: Value) -> Bytes {
    data["type"] = json!(kind);
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

fn responses_stream(meta: Meta, mut rx: mpsc::UnboundedReceiver<&'static str>) -> Body {
    async_stream_body(move |tx| async move {
        tx.send(response_event(
            "response.created",
            json!({"response": meta.response(None)}),
        ))?;
        let (mut text, mut n) = (String::new(), 0u32);
        let item = format!("msg_{}", meta.id);
        while let Some(word) = rx.recv().await {
            text.push_str(word);
            n += 1;
            tx.send(response_event(
                "response.output_text.delta",
                json!({"item_id": item, "output_index": 0, "content_index": 0, "delta": word}),
            ))?;
        }
        let done = meta.response(Some((&text, n)));
        let kind = if done["status"] == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        tx.send(response_event(kind, json!({"response": done})))?;
        Ok(())
    })
}

fn stream_response(
    meta: Meta,
    rx: mpsc::UnboundedReceiver<&'static str>,
    include_usage: bool,
) -> Response {
    let stream = if meta.kind == Kind::Response {
        responses_stream(meta, rx)
    } else {
        chat_stream(meta, rx, include_usage)
    };
    let mut resp = Response::new(stream);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn chat_stream(
    meta: Meta,
    mut rx: mpsc::UnboundedReceiver<&'static str>,
    include_usage: bool,
) -> Body {
    async_stream_body(move |tx| async move {
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
    })
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
    if meta.kind == Kind::Response {
        return axum::Json(meta.response(Some((&text, n)))).into_response();
    }
    let finish = meta.finish_reason(n);
    let choice = match meta.kind {
        Kind::Chat => json!({
            "index": 0, "message": {"role": "assistant", "content": text},
            "logprobs": null, "finish_reason": finish,
        }),
        _ => json!({
            "index": 0, "text": text, "logprobs": null, "finish_reason": finish, "stop_reason": null,
        }),
    };
    axum::Json(json!({
        "id": meta.id, "object": meta.object(false), "created": meta.created,
        "model": meta.model, "choices": [choice], "usage": meta.usage(n),
    }))
    .into_response()
}
