//! Request handlers: admission before the upstream is contacted, forwarding over the pooled
//! client, TTFT/ITL measurement on relayed streams, unary assembly, and the error contract of
//! design §3 (OpenAI-shaped JSON: 400 malformed, 413 too large, 429 shed with Retry-After and
//! retry-after-ms, 502 upstream unreachable or broken stream, 504 upstream timeout, upstream
//! 4xx/5xx passed through unchanged).

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use prometheus::{Histogram, IntGauge};
use serde_json::{Map, Value, json};

use super::Gateway;
use super::assemble::{self, Assembler};
use super::sse::{EventKind, SseParser, classify, classify_value};
use super::upstream;
use crate::limiter::decision::{retry_after_header_ms, retry_after_header_secs};
use crate::limiter::{KeyId, Priority, Signal, SplitMix64, Verdict};
use crate::metrics::{Outcome, RequestMetrics};
use crate::openai::ApiError;
use crate::policy::source::Snapshot;

/// Which API a request is for (the `endpoint` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Models,
    Other,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Models => "models",
            Endpoint::Other => "other",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            _ => "/v1/completions",
        }
    }
}

thread_local! {
    static RNG: RefCell<SplitMix64> = RefCell::new(SplitMix64::new(seed()));
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let here = &t as *const u64 as u64;
    t ^ here.rotate_left(32)
}

/// Counts a request's outcome, its duration and in-flight gauge, once, when dropped: a
/// response body dropped before it finished (client gone) counts as `cancelled`.
struct Tracker {
    gw: Arc<Gateway>,
    model: String,
    endpoint: Endpoint,
    stream: bool,
    shadow: bool,
    outcome: Option<Outcome>,
    start: Instant,
    inflight: IntGauge,
    duration: Histogram,
}

impl Tracker {
    fn new(
        gw: &Arc<Gateway>,
        model: &str,
        endpoint: Endpoint,
        stream: bool,
        shadow: bool,
        start: Instant,
    ) -> Self {
        let inflight = gw.metrics.inflight.with_label_values(&[model]);
        inflight.inc();
        Tracker {
            duration: gw.metrics.request_duration.with_label_values(&[model]),
            gw: gw.clone(),
            model: model.to_owned(),
            endpoint,
            stream,
            shadow,
            outcome: None,
            start,
            inflight,
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        self.outcome.get_or_insert(outcome);
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let outcome = match self.outcome {
            Some(Outcome::Success) if self.shadow => Outcome::ShadowRejected,
            Some(o) => o,
            None => Outcome::Cancelled,
        };
        if matches!(outcome, Outcome::Success | Outcome::ShadowRejected) {
            self.duration.observe(self.start.elapsed().as_secs_f64());
        }
        count(&self.gw, &self.model, self.endpoint, self.stream, outcome);
        self.inflight.dec();
    }
}

fn count(gw: &Gateway, model: &str, endpoint: Endpoint, stream: bool, outcome: Outcome) {
    gw.metrics
        .requests
        .with_label_values(&[
            model,
            endpoint.label(),
            if stream { "true" } else { "false" },
            outcome.as_str(),
        ])
        .inc();
}

/// A request waiting for its first token, counted in the limiter it was admitted by until
/// the first token arrives or the request ends without one.
struct Waiting {
    snap: Arc<Snapshot>,
    key: KeyId,
    since: Duration,
}

impl Waiting {
    fn begin(snap: &Arc<Snapshot>, key: KeyId, now: Duration) -> Self {
        snap.limiter.begin_wait(key, now);
        Waiting {
            snap: snap.clone(),
            key,
            since: now,
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.snap.limiter.end_wait(self.key, self.since);
    }
}

/// Records TTFT and ITL samples of one stream into the policy in force.
struct Sampler {
    gw: Arc<Gateway>,
    snap: Arc<Snapshot>,
    key: KeyId,
    model: String,
    /// When the request was sent upstream (limiter clock).
    sent: Duration,
    /// When the last content-bearing chunk arrived.
    last: Option<Duration>,
    /// Until the first content-bearing chunk.
    waiting: Option<Waiting>,
    metrics: RequestMetrics,
}

impl Sampler {
    /// `n` content-bearing events arrived together now. The first ever gives TTFT; later
    /// batches give `n` ITL samples of (gap since the previous content) / n, so events
    /// coalesced into one read are not counted as zero-latency tokens.
    fn on_content(&mut self, n: usize) {
        let now = self.gw.clock.now();
        self.waiting = None;
        {
            // A reload swaps the limiter: follow it (state was carried over).
            let current = self.gw.store.peek();
            if let Some(cur) = current.as_ref().filter(|c| !Arc::ptr_eq(c, &self.snap)) {
                self.snap = cur.clone();
                self.key = self.snap.limiter.key(&self.model);
            }
        }
        let limiter = &self.snap.limiter;
        match self.last {
            None => {
                let ttft = now.saturating_sub(self.sent).as_secs_f64();
                let _ = limiter.record(self.key, Signal::Ttft, ttft, now);
                self.metrics.ttft.observe(ttft);
            }
            Some(last) => {
                let gap = now.saturating_sub(last).as_secs_f64() / n as f64;
                for _ in 0..n {
                    let _ = limiter.record(self.key, Signal::Itl, gap, now);
                    self.metrics.itl.observe(gap);
                }
            }
        }
        self.last = Some(now);
    }
}

/// Feeds relayed bytes to the parser and the sampler; remembers how the stream ended.
struct Observer {
    parser: SseParser,
    measuring: bool,
    sampler: Option<Sampler>,
    saw_done: bool,
    saw_error: bool,
    assembler: Option<Assembler>,
}

impl Observer {
    fn new(sampler: Option<Sampler>, assembler: Option<Assembler>) -> Self {
        Observer {
            parser: SseParser::default(),
            measuring: true,
            sampler,
            saw_done: false,
            saw_error: false,
            assembler,
        }
    }

    fn observe(&mut self, bytes: &[u8]) {
        if !self.measuring {
            return;
        }
        let mut content = 0;
        let (mut done, mut error) = (false, false);
        let assembler = &mut self.assembler;
        self.measuring = self.parser.feed(bytes, |event| {
            let kind = match assembler.as_mut() {
                // Assembling: parse once, classify and keep the same value.
                Some(a) if event != b"[DONE]" => match serde_json::from_slice::<Value>(event) {
                    Ok(v) => {
                        let kind = classify_value(&v);
                        if matches!(kind, EventKind::Content | EventKind::Empty) {
                            a.push(&v);
                        }
                        kind
                    }
                    Err(_) => EventKind::Unparsed,
                },
                _ => classify(event),
            };
            match kind {
                EventKind::Content => content += 1,
                EventKind::Done => done = true,
                EventKind::Error => error = true,
                EventKind::Empty | EventKind::Unparsed => {}
            }
        });
        self.saw_done |= done;
        self.saw_error |= error;
        if let Some(s) = self.sampler.as_mut().filter(|_| content > 0) {
            s.on_content(content);
        }
    }
}

fn with_rng<T>(f: impl FnOnce(&mut SplitMix64) -> T) -> T {
    RNG.with(|r| f(&mut r.borrow_mut()))
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

/// Reads the request body up to the limit (413 beyond it).
async fn read_body(gw: &Gateway, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("request body is larger than {} bytes", gw.max_body_bytes),
        )
        .code("request_too_large")
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > gw.max_body_bytes) {
        return Err(too_large());
    }
    match Limited::new(body, gw.max_body_bytes).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(_) => Err(bad_request("the request body could not be read")),
    }
}

fn parse_priority(headers: &HeaderMap) -> Result<Priority, ApiError> {
    match headers.get(Priority::HEADER) {
        None => Ok(Priority::Standard),
        Some(v) => v.to_str().ok().and_then(|s| s.parse().ok()).ok_or_else(|| {
            bad_request(format!(
                "invalid {} header {:?}: expected critical, standard or sheddable",
                Priority::HEADER,
                String::from_utf8_lossy(v.as_bytes())
            ))
            .param(Priority::HEADER)
        }),
    }
}

fn not_ready() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable",
        "the gateway has no valid rate-limit policy loaded yet",
    )
}

/// An admitted request.
struct Admitted {
    snap: Arc<Snapshot>,
    key: KeyId,
    label: String,
    shadow: bool,
}

/// Admission: the decision is taken before the upstream is contacted.
fn admit(
    gw: &Gateway,
    snap: Arc<Snapshot>,
    model: &str,
    priority: Priority,
    endpoint: Endpoint,
    stream: bool,
) -> Result<Admitted, Box<Response>> {
    let key = snap.limiter.key(model);
    let label = snap.limiter.label(key).to_owned();
    let d = with_rng(|r| snap.limiter.decide(key, priority, gw.clock.now(), r));
    if d.verdict == Verdict::Reject {
        count(gw, &label, endpoint, stream, Outcome::Rejected);
        let retry = d.retry_after.unwrap_or(Duration::from_secs(1));
        let secs = retry_after_header_secs(retry);
        let mut resp = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            format!(
                "The inference server for model {model:?} is over its latency targets; retry after {secs} s."
            ),
        )
        .code("rate_limit_exceeded")
        .into_response();
        let h = resp.headers_mut();
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        h.insert(
            "retry-after-ms",
            HeaderValue::from(retry_after_header_ms(retry)),
        );
        return Err(Box::new(resp));
    }
    Ok(Admitted {
        snap,
        key,
        label,
        shadow: d.verdict == Verdict::ShadowReject,
    })
}

pub async fn chat_completions(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    completion(gw, Endpoint::Chat, headers, body).await
}

pub async fn completions(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    completion(gw, Endpoint::Completions, headers, body).await
}

async fn completion(
    gw: Arc<Gateway>,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = Instant::now();
    let fail = |gw: &Gateway, e: ApiError, stream: bool| {
        count(gw, "", endpoint, stream, Outcome::ClientError);
        e.into_response()
    };
    let bytes = match read_body(&gw, &headers, body).await {
        Ok(b) => b,
        Err(e) => return fail(&gw, e, false),
    };
    let mut req: Map<String, Value> = match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return fail(
                &gw,
                bad_request("the request body must be a JSON object"),
                false,
            );
        }
        Err(e) => {
            return fail(
                &gw,
                bad_request(format!("the request body is not valid JSON: {e}")),
                false,
            );
        }
    };
    let client_stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let model = match req.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => {
            return fail(
                &gw,
                bad_request("`model` is required and must be a non-empty string").param("model"),
                client_stream,
            );
        }
    };
    let priority = match parse_priority(&headers) {
        Ok(p) => p,
        Err(e) => return fail(&gw, e, client_stream),
    };
    let Some(snap) = gw.store.load() else {
        return not_ready().into_response();
    };
    let a = match admit(&gw, snap, &model, priority, endpoint, client_stream) {
        Ok(a) => a,
        Err(resp) => return *resp,
    };
    let up = &a.snap.config.upstream;
    let assemble = !client_stream && up.stream_unary;
    let body = if assemble {
        req.insert("stream".into(), Value::Bool(true));
        let options = req.entry("stream_options").or_insert_with(|| json!({}));
        if let Some(o) = options.as_object_mut() {
            o.insert("include_usage".into(), Value::Bool(true));
        } else {
            *options = json!({"include_usage": true});
        }
        Bytes::from(serde_json::to_vec(&req).expect("JSON map serializes"))
    } else {
        bytes
    };
    let tracker = Tracker::new(&gw, &a.label, endpoint, client_stream, a.shadow, start);
    let sampler = (client_stream || assemble).then(|| {
        let sent = gw.clock.now();
        Sampler {
            metrics: RequestMetrics::new(&gw.metrics, &a.label),
            gw: gw.clone(),
            waiting: Some(Waiting::begin(&a.snap, a.key, sent)),
            snap: a.snap.clone(),
            key: a.key,
            model: model.clone(),
            sent,
            last: None,
        }
    });
    let kind = if endpoint == Endpoint::Chat {
        assemble::Kind::Chat
    } else {
        assemble::Kind::Completion
    };
    forward(
        &gw,
        &a.snap,
        Method::POST,
        endpoint.path(),
        &headers,
        body,
        tracker,
        sampler,
        assemble.then_some(kind),
    )
    .await
}

/// Forwards one request and relays (or assembles) the response.
#[allow(clippy::too_many_arguments)]
async fn forward(
    gw: &Arc<Gateway>,
    snap: &Snapshot,
    method: Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
    mut tracker: Tracker,
    mut sampler: Option<Sampler>,
    assemble: Option<assemble::Kind>,
) -> Response {
    let timeout = snap.config.upstream.timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let uri = match upstream::target(&snap.config.upstream.url, path_and_query) {
        Ok(u) => u,
        Err(_) => {
            tracker.finish(Outcome::ClientError);
            return bad_request("the request path cannot be forwarded").into_response();
        }
    };
    let req = match upstream::request(method, uri, headers, gw.api_key.as_ref(), body) {
        Ok(r) => r,
        Err(_) => {
            tracker.finish(Outcome::ClientError);
            return bad_request("the request headers cannot be forwarded").into_response();
        }
    };
    if let Some(s) = sampler.as_mut() {
        s.sent = gw.clock.now();
    }
    let resp = match tokio::time::timeout_at(deadline, gw.client.request(req)).await {
        Err(_) => {
            tracker.finish(Outcome::UpstreamError);
            return upstream_timeout(timeout).into_response();
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, upstream = %snap.config.upstream.url, "upstream request failed");
            tracker.finish(Outcome::UpstreamError);
            return ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "the inference server could not be reached",
            )
            .code("upstream_unreachable")
            .into_response();
        }
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    let headers = upstream::response_headers(resp.headers());
    let is_sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !status.is_success() {
        tracker.finish(if status.is_client_error() {
            Outcome::ClientError
        } else {
            Outcome::UpstreamError
        });
    }
    if !status.is_success() || !is_sse {
        // Errors, and unary upstream responses (or an upstream that ignored `stream`), are
        // relayed unchanged and unmeasured.
        return relay(
            status,
            headers,
            resp.into_body(),
            tracker,
            None,
            deadline,
            timeout,
        );
    }
    match assemble {
        None => relay(
            status,
            headers,
            resp.into_body(),
            tracker,
            sampler,
            deadline,
            timeout,
        ),
        Some(kind) => assembled(resp.into_body(), tracker, sampler, kind, deadline, timeout).await,
    }
}

fn upstream_timeout(timeout: Duration) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "upstream_error",
        format!(
            "the inference server did not answer within {} s",
            timeout.as_secs_f64()
        ),
    )
    .code("upstream_timeout")
}

/// State of a relayed body; dropping it (client gone) drops the upstream body, which closes
/// the upstream connection and so cancels the request there.
struct Relay {
    body: Incoming,
    tracker: Tracker,
    observer: Option<Observer>,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    ended: bool,
}

/// Relays an upstream body as it arrives, measuring it when a sampler is given.
fn relay(
    status: StatusCode,
    headers: HeaderMap,
    body: Incoming,
    tracker: Tracker,
    sampler: Option<Sampler>,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Response {
    let state = Relay {
        body,
        observer: sampler.map(|s| Observer::new(Some(s), None)),
        tracker,
        deadline: Box::pin(tokio::time::sleep_until(deadline)),
        timeout,
        ended: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        if st.ended {
            return None;
        }
        loop {
            tokio::select! {
                frame = st.body.frame() => match frame {
                    None => {
                        // A measured stream must end with [DONE]; otherwise it broke.
                        let complete = st.observer.as_ref().is_none_or(|o| o.saw_done && !o.saw_error);
                        st.tracker.finish(if complete { Outcome::Success } else { Outcome::UpstreamError });
                        return None;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "upstream stream broke");
                        st.tracker.finish(Outcome::UpstreamError);
                        st.ended = true;
                        return Some((Err(std::io::Error::other("upstream stream broke")), st));
                    }
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            if let Some(o) = st.observer.as_mut() {
                                o.observe(&data);
                            }
                            return Some((Ok(data), st));
                        }
                    }
                },
                _ = &mut st.deadline => {
                    tracing::warn!(timeout = ?st.timeout, "upstream stream exceeded the timeout");
                    st.tracker.finish(Outcome::UpstreamError);
                    st.ended = true;
                    return Some((Err(std::io::Error::other("upstream timeout")), st));
                }
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// Reads a whole upstream stream, measuring it, and answers with the assembled unary JSON.
async fn assembled(
    mut body: Incoming,
    mut tracker: Tracker,
    sampler: Option<Sampler>,
    kind: assemble::Kind,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Response {
    let mut obs = Observer::new(sampler, Some(Assembler::new(kind)));
    let broken = || {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "the inference server's response stream broke before it was complete",
        )
        .code("upstream_broken_stream")
    };
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                tracker.finish(Outcome::UpstreamError);
                return upstream_timeout(timeout).into_response();
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, "upstream stream broke");
                tracker.finish(Outcome::UpstreamError);
                return broken().into_response();
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    obs.observe(&data);
                }
            }
        }
    }
    if !obs.saw_done || obs.saw_error || !obs.measuring {
        tracker.finish(Outcome::UpstreamError);
        return broken().into_response();
    }
    tracker.finish(Outcome::Success);
    let value = obs.assembler.take().expect("assembler set").finish();
    axum::Json(value).into_response()
}

/// Other `/v1/*` requests (and `GET /v1/models`): proxied unchanged; admitted by the body's
/// `model` when there is one.
pub async fn passthrough(
    State(gw): State<Arc<Gateway>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = Instant::now();
    let endpoint = if uri.path() == "/v1/models" {
        Endpoint::Models
    } else {
        Endpoint::Other
    };
    let bytes = match read_body(&gw, &headers, body).await {
        Ok(b) => b,
        Err(e) => {
            count(&gw, "", endpoint, false, Outcome::ClientError);
            return e.into_response();
        }
    };
    let model = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.get("model").and_then(Value::as_str).map(str::to_owned));
    let Some(snap) = gw.store.load() else {
        return not_ready().into_response();
    };
    let (label, shadow) = match &model {
        Some(m) => {
            let priority = match parse_priority(&headers) {
                Ok(p) => p,
                Err(e) => {
                    count(&gw, "", endpoint, false, Outcome::ClientError);
                    return e.into_response();
                }
            };
            match admit(&gw, snap.clone(), m, priority, endpoint, false) {
                Ok(a) => (a.label, a.shadow),
                Err(resp) => return *resp,
            }
        }
        None => (String::new(), false),
    };
    let tracker = Tracker::new(&gw, &label, endpoint, false, shadow, start);
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    forward(&gw, &snap, method, pq, &headers, bytes, tracker, None, None).await
}

pub async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    let snap = gw.store.load();
    let text = gw
        .metrics
        .render(snap.as_deref().map(|s| &s.limiter), gw.clock.now());
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

pub async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    match gw.store.load() {
        Some(s) => format!("ok: policy generation {}\n", s.generation).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no valid policy loaded\n").into_response(),
    }
}

pub async fn not_found(uri: Uri) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("unknown path {}", uri.path()),
    )
    .code("not_found")
    .into_response()
}
