//! Relay: one admitted request forwarded over the pooled client, its response relayed as it
//! arrives (measured when it is a stream) or assembled into the unary JSON the client asked
//! for. Upstream errors (4xx/5xx) and unary upstream answers are relayed unchanged and
//! unmeasured; dropping a relayed body (client gone) drops the upstream body, which closes the
//! upstream connection and so cancels the request there.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::Gateway;
use super::admission::{Admitted, admit_elsewhere};
use super::assemble::{self, Assembler};
use super::error::GatewayError;
use super::measure::{Observer, Sampler, Tracker};
use super::upstream;
use crate::gateway::metrics::Outcome;
use crate::limiter::Priority;
use crate::policy::source::Snapshot;

/// One request to forward.
pub struct Forward<'a> {
    pub gw: &'a Arc<Gateway>,
    /// The policy the request was admitted under (upstream endpoints and timeouts).
    pub snap: &'a Arc<Snapshot>,
    /// The endpoint of the policy's fleet the request goes to.
    pub endpoint: usize,
    /// The model and priority it was admitted for, to admit it again on another endpoint if
    /// this one cannot be reached; None for a request that was not admitted (no model).
    pub admission: Option<(&'a str, Priority)>,
    pub method: Method,
    pub path_and_query: &'a str,
    /// The client's headers (filtered by [`upstream::request`]).
    pub headers: &'a HeaderMap,
    pub body: Bytes,
    pub tracker: Tracker,
    /// Measures the response stream, when it is one.
    pub sampler: Option<Sampler>,
    /// Assemble the upstream stream into a unary answer of this kind.
    pub assemble: Option<assemble::Kind>,
    /// The body's share of the gateway's body-memory budget: given back once the upstream has
    /// answered (it has read the body by then).
    pub body_permit: Option<super::intake::BodyPermit>,
}

/// Another endpoint for a request whose endpoint `failed` could not be reached: admitted
/// there (with its guard), or shed when the rest of the fleet has no room; None when there is
/// no other endpoint.
fn elsewhere(
    gw: &Arc<Gateway>,
    snap: &Arc<Snapshot>,
    admission: Option<(&str, Priority)>,
    failed: usize,
) -> Option<Result<(usize, Option<Admitted>), GatewayError>> {
    match admission {
        None => {
            let now = gw.clock.now();
            let next = gw.random.with(|r| snap.fleet.any(now, r, Some(failed)))?;
            Some(Ok((next, None)))
        }
        Some((model, priority)) => {
            let a = admit_elsewhere(gw, snap.clone(), model, priority, failed)?;
            Some(a.map(|a| (a.endpoint, Some(a))).map_err(|(_, e)| e))
        }
    }
}

/// Forwards one request and relays (or assembles) the response.
pub async fn forward(f: Forward<'_>) -> Response {
    let Forward {
        gw,
        snap,
        mut tracker,
        mut sampler,
        body_permit,
        ..
    } = f;
    let fail = |tracker: &mut Tracker, e: GatewayError| {
        if let Some(o) = e.outcome() {
            tracker.finish(o);
        }
        e.into_response()
    };
    let timeout = snap.config.upstream.timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let key = gw.api_key.current();
    let client_auth = snap.config.client_auth.is_some();
    let client = gw.pools.get(snap.config.upstream.pool_idle_timeout);
    let faults = Faults(gw.metrics.upstream_errors.clone());
    let mut endpoint = f.endpoint;
    let mut retried = false;
    let (resp, url) = loop {
        let url = snap.endpoint_url(endpoint);
        let Ok(uri) = upstream::target(url, f.path_and_query) else {
            return fail(
                &mut tracker,
                GatewayError::bad_request("the request path cannot be forwarded"),
            );
        };
        let Ok(req) = upstream::request(
            f.method.clone(),
            uri,
            f.headers,
            key.as_deref(),
            client_auth,
            f.body.clone(),
        ) else {
            return fail(
                &mut tracker,
                GatewayError::bad_request("the request headers cannot be forwarded"),
            );
        };
        if let Some(s) = sampler.as_mut() {
            s.sent();
        }
        match tokio::time::timeout_at(deadline, client.request(req)).await {
            Err(_) => {
                faults.count("timeout");
                return fail(&mut tracker, GatewayError::UpstreamTimeout(timeout));
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, upstream = %url, "upstream request failed");
                faults.count("unreachable");
                gw.unary.forget(url);
                snap.fleet.report(endpoint, false, gw.clock.now());
                // Nothing of the request reached the endpoint: once, on another.
                if e.is_connect() && !retried && snap.fleet.len() > 1 {
                    retried = true;
                    match elsewhere(gw, snap, f.admission, endpoint) {
                        Some(Ok((next, active))) => {
                            if let Some(a) = active {
                                if let Some(s) = sampler.as_mut() {
                                    s.moved(next, a.key);
                                }
                                tracker.hold_instead(a.active);
                            }
                            endpoint = next;
                            continue;
                        }
                        Some(Err(e)) => return fail(&mut tracker, e),
                        None => {}
                    }
                }
                return fail(&mut tracker, GatewayError::UpstreamUnreachable);
            }
            Ok(Ok(r)) => break (r, url),
        }
    };
    snap.fleet
        .report(endpoint, !resp.status().is_server_error(), gw.clock.now());
    drop(body_permit);
    let status = resp.status();
    if key.is_some() && matches!(status.as_u16(), 401 | 403) {
        // The upstream refused the gateway's own key: not the client's fault, and its message
        // is about that key (OpenAI's echoes its last characters), so it stays in the log.
        let body = upstream_message(resp.into_body(), deadline).await;
        tracing::warn!(%status, upstream = %url, body = %body, "the upstream refused the gateway's API key");
        faults.count("upstream_auth");
        return fail(&mut tracker, GatewayError::UpstreamAuth);
    }
    let headers = upstream::response_headers(resp.headers());
    let is_sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !status.is_success() {
        if status.is_server_error() {
            faults.count("status_5xx");
            tracing::warn!(%status, upstream = %url, "the upstream answered with a server error");
        }
        tracker.finish(if status.is_client_error() {
            Outcome::ClientError
        } else {
            Outcome::UpstreamError
        });
    }
    let limits = Limits {
        at: deadline,
        timeout,
        idle: snap.config.upstream.stream_idle_timeout,
        faults,
        upstream: url.clone(),
    };
    if !status.is_success() || !is_sse {
        // Errors, and unary upstream responses (or an upstream that ignored `stream`), are
        // relayed unchanged and unmeasured.
        return relay(status, headers, resp.into_body(), tracker, None, limits);
    }
    match f.assemble {
        None => relay(status, headers, resp.into_body(), tracker, sampler, limits),
        Some(kind) => assembled(gw, resp.into_body(), tracker, sampler, kind, limits).await,
    }
}

/// At most the first KiB of an upstream's error body, as text for a log line (read until the
/// request's deadline at the latest).
async fn upstream_message(mut body: Incoming, deadline: tokio::time::Instant) -> String {
    const MAX: usize = 1024;
    let mut out = Vec::new();
    while out.len() < MAX {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    out.extend_from_slice(&d);
                }
            }
            _ => break,
        }
    }
    out.truncate(MAX);
    String::from_utf8_lossy(&out).into_owned()
}

/// Counts upstream faults by reason (`sluice_upstream_errors_total`).
#[derive(Clone)]
struct Faults(prometheus::IntCounterVec);

impl Faults {
    fn count(&self, reason: &str) {
        self.0.with_label_values(&[reason]).inc();
    }
}

/// The limits of one response: when the whole request must be over (and the timeout that set
/// it), and the longest silence allowed within it.
struct Limits {
    at: tokio::time::Instant,
    timeout: Duration,
    idle: Duration,
    faults: Faults,
    upstream: http::Uri,
}

/// What the next read of an upstream body gave.
enum Next {
    Frame(hyper::body::Frame<Bytes>),
    End,
    Broke(hyper::Error),
    /// The whole-request timeout passed.
    Timeout,
    /// Nothing arrived for the idle timeout.
    Idle,
}

impl Limits {
    async fn next(&self, body: &mut Incoming) -> Next {
        let idle = tokio::time::Instant::now() + self.idle;
        match tokio::time::timeout_at(self.at.min(idle), body.frame()).await {
            Ok(Some(Ok(f))) => Next::Frame(f),
            Ok(None) => Next::End,
            Ok(Some(Err(e))) => Next::Broke(e),
            Err(_) if idle < self.at => Next::Idle,
            Err(_) => Next::Timeout,
        }
    }

    /// Logs and counts why a response ended early; the error its client gets.
    fn fault(&self, next: &Next) -> GatewayError {
        let upstream = &self.upstream;
        match next {
            Next::Broke(e) => {
                tracing::warn!(error = %e, %upstream, "the upstream broke its response stream");
                self.faults.count("broken_stream");
                GatewayError::BrokenStream
            }
            Next::Idle => {
                tracing::warn!(idle = ?self.idle, %upstream, "the upstream sent nothing for the stream idle timeout");
                self.faults.count("idle_timeout");
                GatewayError::UpstreamIdle(self.idle)
            }
            _ => {
                tracing::warn!(timeout = ?self.timeout, %upstream, "the upstream response exceeded the timeout");
                self.faults.count("timeout");
                GatewayError::UpstreamTimeout(self.timeout)
            }
        }
    }
}

/// State of a relayed body.
struct Relay {
    body: Incoming,
    tracker: Tracker,
    observer: Option<Observer>,
    limits: Limits,
    ended: bool,
}

/// The SSE event that tells a streaming client why its stream ends early (OpenAI's SDKs raise
/// it as an API error).
fn error_event(e: &GatewayError) -> Bytes {
    Bytes::from(format!("data: {}\n\n", e.api_error().body()))
}

/// Relays an upstream body as it arrives, measuring it when a sampler is given. A stream that
/// breaks, stalls past the idle timeout or outlasts the request timeout ends early: a measured
/// (SSE) stream with an error event, any other body by aborting the response.
fn relay(
    status: StatusCode,
    headers: HeaderMap,
    body: Incoming,
    tracker: Tracker,
    sampler: Option<Sampler>,
    limits: Limits,
) -> Response {
    let state = Relay {
        body,
        observer: sampler.map(|s| Observer::new(Some(s), None)),
        tracker,
        limits,
        ended: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        if st.ended {
            return None;
        }
        loop {
            match st.limits.next(&mut st.body).await {
                Next::End => {
                    // A measured stream must end with [DONE]; otherwise it broke.
                    let complete = st.observer.as_ref().is_none_or(Observer::complete);
                    if !complete {
                        let why = if st.observer.as_ref().is_some_and(|o| o.saw_error) {
                            "error_event"
                        } else {
                            "incomplete_stream"
                        };
                        tracing::warn!(upstream = %st.limits.upstream, reason = why, "the upstream stream ended before [DONE]");
                        st.limits.faults.count(why);
                    }
                    st.tracker.finish(if complete {
                        Outcome::Success
                    } else {
                        Outcome::UpstreamError
                    });
                    return None;
                }
                Next::Frame(frame) => {
                    if let Ok(data) = frame.into_data() {
                        if let Some(o) = st.observer.as_mut() {
                            o.observe(&data);
                        }
                        return Some((Ok(data), st));
                    }
                }
                next => {
                    let e = st.limits.fault(&next);
                    st.tracker.finish(Outcome::UpstreamError);
                    st.ended = true;
                    if st.observer.is_some() {
                        return Some((Ok(error_event(&e)), st));
                    }
                    return Some((Err(std::io::Error::other(e.api_error().message)), st));
                }
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// Reads a whole upstream stream, measuring it, and answers with the assembled unary JSON. The
/// answer is complete at `[DONE]`, or when the stream ends after every choice has its
/// finish_reason. A stream without the usage chunk that was asked for switches the upstream's
/// unary requests to passthrough (see [`super::unary`]).
async fn assembled(
    gw: &Gateway,
    mut body: Incoming,
    mut tracker: Tracker,
    sampler: Option<Sampler>,
    kind: assemble::Kind,
    limits: Limits,
) -> Response {
    let mut obs = Observer::new(sampler, Some(Assembler::new(kind)));
    let mut fail = |e: GatewayError| {
        tracker.finish(Outcome::UpstreamError);
        e.into_response()
    };
    loop {
        match limits.next(&mut body).await {
            Next::End => break,
            Next::Frame(frame) => {
                if let Ok(data) = frame.into_data() {
                    obs.observe(&data);
                }
            }
            next => return fail(limits.fault(&next)),
        }
    }
    let assembler = obs.assembler.take().expect("assembler set");
    let finished = obs.saw_done || assembler.finished();
    if obs.too_large > 0 {
        tracing::warn!(upstream = %limits.upstream, events = obs.too_large, "an event of the upstream stream is too large to assemble a unary answer from");
        limits.faults.count("event_too_large");
        return fail(GatewayError::EventTooLarge);
    }
    if obs.saw_error || !finished {
        let why = if obs.saw_error {
            "error_event"
        } else {
            "incomplete_stream"
        };
        tracing::warn!(upstream = %limits.upstream, reason = why, "the upstream stream ended before the answer was complete");
        limits.faults.count(why);
        return fail(GatewayError::BrokenStream);
    }
    match assembler.usage_tokens() {
        Some((prompt, completion)) => obs.usage(prompt, completion),
        None if !assembler.has_usage() => {
            gw.unary.lacks_usage(&limits.upstream, gw.clock.now());
        }
        None => {}
    }
    tracker.finish(Outcome::Success);
    axum::Json(assembler.finish()).into_response()
}
