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
use super::assemble::{self, Assembler};
use super::error::GatewayError;
use super::measure::{Observer, Sampler, Tracker};
use super::upstream;
use crate::metrics::Outcome;
use crate::policy::source::Snapshot;

/// One request to forward.
pub struct Forward<'a> {
    pub gw: &'a Arc<Gateway>,
    /// The policy the request was admitted under (upstream URL and timeout).
    pub snap: &'a Snapshot,
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
}

/// Forwards one request and relays (or assembles) the response.
pub async fn forward(f: Forward<'_>) -> Response {
    let Forward {
        gw,
        snap,
        mut tracker,
        mut sampler,
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
    let Ok(uri) = upstream::target(&snap.config.upstream.url, f.path_and_query) else {
        return fail(
            &mut tracker,
            GatewayError::bad_request("the request path cannot be forwarded"),
        );
    };
    let key = gw.api_key.current();
    let client_auth = f.snap.config.client_auth.is_some();
    let Ok(req) = upstream::request(
        f.method,
        uri,
        f.headers,
        key.as_deref(),
        client_auth,
        f.body,
    ) else {
        return fail(
            &mut tracker,
            GatewayError::bad_request("the request headers cannot be forwarded"),
        );
    };
    if let Some(s) = sampler.as_mut() {
        s.sent();
    }
    let resp = match tokio::time::timeout_at(deadline, gw.client.request(req)).await {
        Err(_) => return fail(&mut tracker, GatewayError::UpstreamTimeout(timeout)),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, upstream = %snap.config.upstream.url, "upstream request failed");
            return fail(&mut tracker, GatewayError::UpstreamUnreachable);
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
    let deadline = Deadline {
        at: deadline,
        timeout,
    };
    if !status.is_success() || !is_sse {
        // Errors, and unary upstream responses (or an upstream that ignored `stream`), are
        // relayed unchanged and unmeasured.
        return relay(status, headers, resp.into_body(), tracker, None, deadline);
    }
    match f.assemble {
        None => relay(
            status,
            headers,
            resp.into_body(),
            tracker,
            sampler,
            deadline,
        ),
        Some(kind) => assembled(resp.into_body(), tracker, sampler, kind, deadline).await,
    }
}

/// When the whole request must be over, and the timeout that set it (for messages).
#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: tokio::time::Instant,
    timeout: Duration,
}

/// State of a relayed body.
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
    deadline: Deadline,
) -> Response {
    let state = Relay {
        body,
        observer: sampler.map(|s| Observer::new(Some(s), None)),
        tracker,
        deadline: Box::pin(tokio::time::sleep_until(deadline.at)),
        timeout: deadline.timeout,
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
                        let complete = st.observer.as_ref().is_none_or(Observer::complete);
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
    deadline: Deadline,
) -> Response {
    let mut obs = Observer::new(sampler, Some(Assembler::new(kind)));
    let mut fail = |e: GatewayError| {
        tracker.finish(Outcome::UpstreamError);
        e.into_response()
    };
    loop {
        match tokio::time::timeout_at(deadline.at, body.frame()).await {
            Err(_) => return fail(GatewayError::UpstreamTimeout(deadline.timeout)),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, "upstream stream broke");
                return fail(GatewayError::BrokenStream);
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    obs.observe(&data);
                }
            }
        }
    }
    if !obs.complete() {
        return fail(GatewayError::BrokenStream);
    }
    tracker.finish(Outcome::Success);
    let value = obs.assembler.take().expect("assembler set").finish();
    axum::Json(value).into_response()
}
