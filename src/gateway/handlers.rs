//! The request handlers: read and check the request, admit it ([`super::admission`]), forward
//! it ([`super::relay`]); every answer of the gateway's own is a [`GatewayError`].

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::Gateway;
use super::admission::{admit_or_wait, request_priority};
use super::assemble;
use super::body::{BodyError, RequestHead, streaming_body};
use super::budget::{self, Charge};
use super::error::GatewayError;
use super::intake::{BodyPermit, read_body, unread_body};
use super::measure::{Api, InflightPlace, Sampler, Tracker, count};
use super::relay::{Forward, forward};
use super::unary::{self, Plan};
use crate::limiter::Priority;
use crate::policy::source::Snapshot;

/// Counts a request answered by the gateway itself (label `model` when known) and answers.
fn refuse(gw: &Gateway, model: &str, api: Api, stream: bool, e: GatewayError) -> Response {
    if let Some(outcome) = e.outcome() {
        count(&gw.metrics, model, api, stream, outcome);
    }
    e.into_response()
}

pub async fn chat_completions(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    completion(gw, Api::Chat, headers, body).await
}

pub async fn completions(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    completion(gw, Api::Completions, headers, body).await
}

pub async fn responses(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Body) -> Response {
    completion(gw, Api::Responses, headers, body).await
}

impl From<BodyError> for GatewayError {
    fn from(e: BodyError) -> Self {
        match e.param {
            Some(p) => GatewayError::bad_param(p, e.message),
            None => GatewayError::bad_request(e.message),
        }
    }
}

/// The parts of a completion request the gateway acts on, borrowed from its body.
struct CompletionRequest<'a> {
    head: RequestHead<'a>,
    model: Cow<'a, str>,
    stream: bool,
}

/// Reads a completion request's head; the error says whether the request asked to stream
/// (as far as that could be read), for its metric.
fn parse_completion(bytes: &[u8]) -> Result<CompletionRequest<'_>, (bool, GatewayError)> {
    let head = RequestHead::parse(bytes).map_err(|e| (false, e.into()))?;
    let stream = head.stream().map_err(|e| (false, e.into()))?;
    let model = match head.model() {
        Some(m) if !m.is_empty() => m,
        _ => {
            let e = GatewayError::bad_param(
                "model",
                "`model` is required and must be a non-empty string",
            );
            return Err((stream, e));
        }
    };
    check_model_name(&model).map_err(|e| (stream, e))?;
    Ok(CompletionRequest {
        head,
        model,
        stream,
    })
}

/// Longest model name accepted (bytes), as in the policy's `models[].name`: a client's text
/// reaches the limiter's keys and metric labels, so it is bounded before anything else.
pub const MAX_MODEL_BYTES: usize = crate::policy::crd::MAX_MODEL_NAME_BYTES;

fn check_model_name(model: &str) -> Result<(), GatewayError> {
    if model.len() > MAX_MODEL_BYTES {
        return Err(GatewayError::bad_param(
            "model",
            format!(
                "`model` is {} bytes long; at most {MAX_MODEL_BYTES} are accepted",
                model.len()
            ),
        ));
    }
    Ok(())
}

/// A request let in: the policy in force, its priority (its client authenticated when the
/// policy says so), its place among the gateway's in-flight requests, and its body.
struct Accepted {
    snap: Arc<Snapshot>,
    priority: Priority,
    place: InflightPlace,
    bytes: Bytes,
    /// The body's share of the body-memory budget, until the upstream has the body.
    body_permit: Option<BodyPermit>,
    /// The request taken from its tenant's budget, where it has one.
    charge: Option<Arc<Charge>>,
}

impl Accepted {
    /// Gives the tenant's request back when `e` is load shedding, not the client's doing.
    fn refund_if_shed(&self, gw: &Gateway, e: &GatewayError) {
        if let (Some(c), GatewayError::Shed { .. } | GatewayError::Expired { .. }) =
            (&self.charge, e)
        {
            c.refund(&gw.budgets);
        }
    }
}

/// Adds the tenant's `x-ratelimit-*` headers to an answer.
fn with_quota(mut resp: Response, charge: Option<budget::Quota>) -> Response {
    if let Some(q) = charge {
        q.insert(resp.headers_mut());
    }
    resp
}

/// Lets a request in, in order: a policy (503 before one is loaded), the client and its
/// priority (401, or 400 for a bad priority header), an endpoint (503 `no_endpoints` when
/// the discovered Service has none ready), a place among the in-flight requests
/// (503), the body (413, 408): nothing of an unauthenticated client's body is read.
async fn accept(
    gw: &Arc<Gateway>,
    api: Api,
    headers: &HeaderMap,
    body: Body,
) -> Result<Accepted, Box<Response>> {
    let refused = |e| Box::new(unread_body(headers, refuse(gw, "", api, false, e)));
    let Some(snap) = gw.store.load() else {
        let resp = GatewayError::NotReady.into_response();
        return Err(Box::new(unread_body(headers, resp)));
    };
    let (priority, client) = request_priority(&snap, &gw.client_keys, headers).map_err(refused)?;
    if snap.fleet.is_empty() {
        gw.metrics
            .upstream_errors
            .with_label_values(&["no_endpoints"])
            .inc();
        let service = crate::policy::config::endpoint_label(&snap.config.upstream.url);
        return Err(refused(GatewayError::NoEndpoints { service }));
    }
    let tenants = snap.config.tenants.as_ref();
    let now = gw.clock.now();
    let charge = match budget::charge(&gw.budgets, tenants, client, headers, now) {
        Ok(c) => c,
        Err((e, quota)) => {
            if let GatewayError::OverBudget { tenant, .. } = &e {
                gw.metrics.over_budget.with_label_values(&[tenant]).inc();
            }
            let resp = with_quota(refuse(gw, "", api, false, e), Some(quota));
            return Err(Box::new(unread_body(headers, resp)));
        }
    };
    let place = InflightPlace::acquire(gw).ok_or_else(|| {
        refused(GatewayError::Overloaded {
            limit: gw.max_inflight,
        })
    })?;
    let (bytes, body_permit) = read_body(gw, headers, body).await.map_err(refused)?;
    Ok(Accepted {
        snap,
        priority,
        place,
        bytes,
        body_permit,
        charge: charge.map(Arc::new),
    })
}

async fn completion(gw: Arc<Gateway>, api: Api, headers: HeaderMap, body: Body) -> Response {
    let start = Instant::now();
    let acc = match accept(&gw, api, &headers, body).await {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let charge = acc.charge.clone();
    let resp = accepted_completion(gw, api, headers, acc, start).await;
    with_quota(resp, charge.map(|c| c.quota()))
}

async fn accepted_completion(
    gw: Arc<Gateway>,
    api: Api,
    headers: HeaderMap,
    acc: Accepted,
    start: Instant,
) -> Response {
    let req = match parse_completion(&acc.bytes) {
        Ok(r) => r,
        Err((stream, e)) => return refuse(&gw, "", api, stream, e),
    };
    let a = match admit_or_wait(&gw, acc.snap.clone(), &req.model, acc.priority).await {
        Ok(a) => a,
        Err((label, e)) => {
            acc.refund_if_shed(&gw, &e);
            return refuse(&gw, &label, api, req.stream, e);
        }
    };
    let upstream = &a.snap.config.upstream;
    let assemble = !req.stream
        && upstream.stream_unary
        && (api == Api::Responses
            || match gw
                .unary
                .plan(a.snap.endpoint_url(a.endpoint), gw.clock.now())
            {
                Plan::Assemble => true,
                Plan::PassThrough => false,
                Plan::Probe => {
                    let model = req.model.to_string();
                    let url = a.snap.endpoint_url(a.endpoint).clone();
                    let probe = unary::probe(gw.clone(), a.snap.clone(), url, model, api);
                    tokio::spawn(probe);
                    false
                }
            });
    let tracker =
        Tracker::new(acc.place, &a.label, api, req.stream, a.shadow, start).holding(a.active);
    let sampler = (req.stream || assemble)
        .then(|| Sampler::start(&gw, &a.snap, a.endpoint, a.key, &req.model));
    let body = if assemble {
        // The client's body is let go once rewritten: one copy is held, not two. (The
        // Responses API reports usage in its final event without being asked.)
        streaming_body(&acc.bytes, &req.head, api != Api::Responses)
    } else {
        acc.bytes.clone()
    };
    let model = req.model.to_string();
    drop(req);
    drop(acc.bytes);
    let kind = match api {
        Api::Chat => assemble::Kind::Chat,
        Api::Responses => assemble::Kind::Response,
        _ => assemble::Kind::Completion,
    };
    forward(Forward {
        gw: &gw,
        snap: &a.snap,
        endpoint: a.endpoint,
        admission: Some((&model, acc.priority)),
        method: Method::POST,
        path_and_query: api.path(),
        headers: &headers,
        body,
        tracker,
        sampler,
        assemble: assemble.then_some(kind),
        body_permit: acc.body_permit,
    })
    .await
}

/// The passed-through endpoints (embeddings, models): proxied unchanged, admitted
/// by the body's `model` when there is one, not measured.
pub async fn passthrough(
    State(gw): State<Arc<Gateway>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let start = Instant::now();
    let api = if uri.path() == "/v1/models" {
        Api::Models
    } else {
        Api::Other
    };
    // `/v1/models/{id}` must not smuggle a traversal or an encoded separator upstream.
    if uri
        .path()
        .split('/')
        .any(|seg| seg == "." || seg == ".." || seg.contains('%') || seg.contains('\\'))
    {
        let e = GatewayError::NotFound {
            path: uri.path().to_owned(),
        };
        return e.into_response();
    }
    let acc = match accept(&gw, api, &headers, body).await {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let charge = acc.charge.clone();
    let resp = accepted_passthrough(gw, api, method, uri, headers, acc, start).await;
    with_quota(resp, charge.map(|c| c.quota()))
}

async fn accepted_passthrough(
    gw: Arc<Gateway>,
    api: Api,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    acc: Accepted,
    start: Instant,
) -> Response {
    // A body is a JSON object (read like a completion's) or empty (a GET).
    let head = if acc.bytes.trim_ascii().is_empty() {
        RequestHead::default()
    } else {
        match RequestHead::parse(&acc.bytes) {
            Ok(h) => h,
            Err(e) => return refuse(&gw, "", api, false, e.into()),
        }
    };
    let model = head.model().map(|m| m.to_string());
    // (A request that waited in the queue is admitted under the policy in force by then.)
    let (label, shadow, active, endpoint, snap) = match &model {
        Some(m) => {
            if let Err(e) = check_model_name(m) {
                return refuse(&gw, "", api, false, e);
            }
            match admit_or_wait(&gw, acc.snap.clone(), m, acc.priority).await {
                Ok(a) => (a.label, a.shadow, Some(a.active), a.endpoint, a.snap),
                Err((label, e)) => {
                    acc.refund_if_shed(&gw, &e);
                    return refuse(&gw, &label, api, false, e);
                }
            }
        }
        // Nothing to admit (`GET /v1/models`): any endpoint taking requests answers it.
        None => {
            let now = gw.clock.now();
            let any = gw.random.with(|r| acc.snap.fleet.any(now, r, None));
            (String::new(), false, None, any.unwrap_or(0), acc.snap)
        }
    };
    let mut tracker = Tracker::new(acc.place, &label, api, false, shadow, start);
    if let Some(a) = active {
        tracker = tracker.holding(a);
    }
    forward(Forward {
        gw: &gw,
        snap: &snap,
        endpoint,
        admission: model.as_deref().map(|m| (m, acc.priority)),
        method,
        path_and_query: uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        headers: &headers,
        body: acc.bytes,
        tracker,
        sampler: None,
        assemble: None,
        body_permit: acc.body_permit,
    })
    .await
}

pub async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    gw.metrics
        .client_keys_invalid
        .set(gw.client_keys.invalid() as i64);
    // The budget is counted in KiB permits (see `intake`).
    let permits = gw.max_body_memory.div_ceil(1024);
    let held = permits.saturating_sub(gw.body_memory.available_permits()) * 1024;
    gw.metrics.body_memory.set(held as i64);
    let mut resp = gw.metrics.render().into_response();
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

/// A known path with a method it does not serve (axum adds the `Allow` header).
pub async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    GatewayError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
    .into_response()
}

pub async fn not_found(uri: Uri) -> Response {
    GatewayError::NotFound {
        path: uri.path().to_owned(),
    }
    .into_response()
}

#[cfg(test)]
mod tests;
