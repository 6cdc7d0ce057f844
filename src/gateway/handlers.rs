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
use super::tenancy::{Tenancy, tenant_of};
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
    /// The request's tenant, where the policy has tenants.
    tenancy: Option<Tenancy>,
}

impl Accepted {
    /// Answers with the gateway's own `e` after the request was accepted: counted for the
    /// model (label `model`) and the tenant, whose budget gets back what load shedding took.
    fn refuse(
        &self,
        gw: &Gateway,
        model: &str,
        api: Api,
        stream: bool,
        e: GatewayError,
    ) -> Response {
        if let Some(t) = &self.tenancy {
            t.refused(gw, &e);
        }
        refuse(gw, model, api, stream, e)
    }

    /// How the latency gate sees the request ([`super::fair::gate`]: its priority, and
    /// whether it waits for a slot when shed), after its tokens are held against its tenant's
    /// budget.
    fn gate(
        &mut self,
        gw: &Gateway,
        model: &str,
        prompt_bytes: usize,
        max_output: Option<u64>,
    ) -> Result<(Priority, bool), GatewayError> {
        match &mut self.tenancy {
            Some(t) => t.before_gate(
                gw,
                &self.snap,
                model,
                self.priority,
                prompt_bytes,
                max_output,
            ),
            None => Ok((self.priority, false)),
        }
    }

    /// The gate's verdict, for fair shedding.
    fn gated(&self, gw: &Gateway, admitted: bool) {
        if let Some(t) = &self.tenancy {
            t.gated(gw, admitted);
        }
    }
}

/// Adds the tenant's `x-ratelimit-*` headers to an answer.
fn with_quota(mut resp: Response, charge: Option<Arc<Charge>>) -> Response {
    if let Some(c) = charge {
        c.insert_headers(resp.headers_mut());
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
    let tenant = tenant_of(&snap, client, headers);
    let now = gw.clock.now();
    let charge = match (&snap.config.tenants, &tenant) {
        (Some(config), Some(t)) => budget::charge(&gw.budgets, config, t.clone(), now),
        _ => Ok(None),
    };
    let tenancy = match (charge, tenant) {
        (Ok(c), Some(t)) => Some(Tenancy::new(t, c)),
        (Ok(_), None) => None,
        (Err((e, quota)), t) => {
            let t = t.expect("a budget has a tenant");
            gw.metrics.over_budget.with_label_values(&[&t]).inc();
            Tenancy::new(t, None).refused(gw, &e);
            let mut resp = refuse(gw, "", api, false, e);
            quota.insert(resp.headers_mut(), budget::Unit::Requests.as_str());
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
        tenancy,
    })
}

async fn completion(gw: Arc<Gateway>, api: Api, headers: HeaderMap, body: Body) -> Response {
    let start = Instant::now();
    let acc = match accept(&gw, api, &headers, body).await {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let charge = acc.tenancy.as_ref().and_then(|t| t.charge.clone());
    let resp = accepted_completion(gw, api, headers, acc, start).await;
    with_quota(resp, charge)
}

async fn accepted_completion(
    gw: Arc<Gateway>,
    api: Api,
    headers: HeaderMap,
    mut acc: Accepted,
    start: Instant,
) -> Response {
    let bytes = acc.bytes.clone();
    let req = match parse_completion(&bytes) {
        Ok(r) => r,
        Err((stream, e)) => return acc.refuse(&gw, "", api, stream, e),
    };
    let max_output = req.head.max_output;
    let gate = match acc.gate(&gw, &req.model, bytes.len(), max_output) {
        Ok(p) => p,
        Err(e) => return acc.refuse(&gw, "", api, req.stream, e),
    };
    let admitted = admit_or_wait(&gw, acc.snap.clone(), &req.model, gate).await;
    acc.gated(&gw, admitted.is_ok());
    let a = match admitted {
        Ok(a) => a,
        Err((label, e)) => return acc.refuse(&gw, &label, api, req.stream, e),
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
    let measured = req.stream || assemble;
    let spend = acc.tenancy.map(|t| t.spend(measured));
    let used = spend.as_ref().and_then(|s| s.used());
    let tracker = Tracker::new(acc.place, &a.label, api, req.stream, a.shadow, start)
        .holding(a.active)
        .spending(spend);
    let sampler = measured
        .then(|| Sampler::start(&gw, &a.snap, a.endpoint, a.key, &req.model).counting(used));
    let body = if assemble {
        // The client's body is let go once rewritten: one copy is held, not two. (The
        // Responses API reports usage in its final event without being asked.)
        streaming_body(&acc.bytes, &req.head, api != Api::Responses)
    } else {
        acc.bytes.clone()
    };
    let model = req.model.to_string();
    drop(req);
    drop((acc.bytes, bytes));
    let kind = match api {
        Api::Chat => assemble::Kind::Chat,
        Api::Responses => assemble::Kind::Response,
        _ => assemble::Kind::Completion,
    };
    forward(Forward {
        gw: &gw,
        snap: &a.snap,
        endpoint: a.endpoint,
        admission: Some((&model, a.priority)),
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

pub async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    gw.metrics
        .client_keys_invalid
        .set(gw.client_keys.invalid() as i64);
    // The budget is counted in KiB permits (see `intake`).
    let permits = gw.max_body_memory.div_ceil(1024);
    let held = permits.saturating_sub(gw.body_memory.available_permits()) * 1024;
    gw.metrics.body_memory.set(held as i64);
    let snap = gw.store.load();
    let tenants = snap.as_ref().and_then(|s| s.config.tenants.as_ref());
    let gauge = &gw.metrics.tenant_budget_remaining;
    for (tenant, unit, left) in gw.budgets.remaining(tenants, gw.clock.now()) {
        let labels = [&*tenant, unit.as_str()];
        match left {
            Some(left) => gauge
                .with_label_values(&labels)
                .set(i64::try_from(left).unwrap_or(i64::MAX)),
            None => drop(gauge.remove_label_values(&labels)),
        }
    }
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

mod passthrough;
pub use passthrough::passthrough;

#[cfg(test)]
mod tests;
