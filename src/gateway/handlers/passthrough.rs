//! The passed-through endpoints: admitted by the body's `model` (when there is one), relayed
//! unchanged, not measured.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};

use super::super::Gateway;
use super::super::admission::admit_or_wait;
use super::super::body::RequestHead;
use super::super::error::GatewayError;
use super::super::measure::{Api, Tracker};
use super::super::relay::{Forward, forward};
use super::{Accepted, accept, check_model_name, with_quota};

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
    let charge = acc.tenancy.as_ref().and_then(|t| t.charge.clone());
    let resp = accepted_passthrough(gw, api, method, uri, headers, acc, start).await;
    with_quota(resp, charge)
}

async fn accepted_passthrough(
    gw: Arc<Gateway>,
    api: Api,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    mut acc: Accepted,
    start: Instant,
) -> Response {
    // A body is a JSON object (read like a completion's) or empty (a GET).
    let bytes = acc.bytes.clone();
    let head = if bytes.trim_ascii().is_empty() {
        RequestHead::default()
    } else {
        match RequestHead::parse(&bytes) {
            Ok(h) => h,
            Err(e) => return acc.refuse(&gw, "", api, false, e.into()),
        }
    };
    let model = head.model().map(|m| m.to_string());
    let mut gate = (acc.priority, false);
    // (A request that waited in the queue is admitted under the policy in force by then.)
    let (label, shadow, active, endpoint, snap) = match &model {
        Some(m) => {
            if let Err(e) = check_model_name(m) {
                return acc.refuse(&gw, "", api, false, e);
            }
            // (Embeddings and the like: no output unless the body allows one.)
            let max_output = Some(head.max_output.unwrap_or(0));
            gate = match acc.gate(&gw, m, bytes.len(), max_output) {
                Ok(p) => p,
                Err(e) => return acc.refuse(&gw, "", api, false, e),
            };
            let admitted = admit_or_wait(&gw, acc.snap.clone(), m, gate).await;
            acc.gated(&gw, admitted.is_ok());
            match admitted {
                Ok(a) => {
                    gate.0 = a.priority; // (a retry elsewhere goes at what was admitted)
                    (a.label, a.shadow, Some(a.active), a.endpoint, a.snap)
                }
                Err((label, e)) => return acc.refuse(&gw, &label, api, false, e),
            }
        }
        // Nothing to admit (`GET /v1/models`): any endpoint taking requests answers it.
        None => {
            let now = gw.clock.now();
            let any = gw.random.with(|r| acc.snap.fleet.any(now, r, None));
            (String::new(), false, None, any.unwrap_or(0), acc.snap)
        }
    };
    let spend = acc.tenancy.map(|t| t.spend(false));
    let mut tracker = Tracker::new(acc.place, &label, api, false, shadow, start).spending(spend);
    if let Some(a) = active {
        tracker = tracker.holding(a);
    }
    drop(bytes);
    forward(Forward {
        gw: &gw,
        snap: &snap,
        endpoint,
        admission: model.as_deref().map(|m| (m, gate.0)),
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
