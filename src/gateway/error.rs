//! Every answer the gateway gives on its own (not relayed from upstream), in one place: the
//! OpenAI-shaped JSON error of each case, its status, and the outcome it counts as.
//!
//! | case | status | `code` |
//! |---|---|---|
//! | malformed request, unforwardable path or headers | 400 | — |
//! | no valid client API key where the policy requires one | 401 + `WWW-Authenticate` | `invalid_api_key` |
//! | body over the limit | 413 | `request_too_large` |
//! | body not received within the body-read timeout | 408 | `request_timeout` |
//! | shed | 429 + `Retry-After` (s) + `retry-after-ms` | `rate_limit_exceeded` |
//! | no policy loaded yet | 503 | — |
//! | at the gateway's in-flight limit | 503 + `Retry-After: 1` | `overloaded` |
//! | at the gateway's body-memory limit | 503 + `Retry-After: 1` | `overloaded` |
//! | a discovered Service with no ready endpoint | 503 + `Retry-After: 5` | `no_endpoints` |
//! | upstream unreachable | 502 | `upstream_unreachable` |
//! | upstream refused the gateway's own API key (its 401/403) | 502 | `upstream_auth_failed` |
//! | upstream stream broke (unary assembly) | 502 | `upstream_broken_stream` |
//! | an upstream event over 4 MiB (unary assembly) | 502 | `upstream_event_too_large` |
//! | upstream timeout | 504 | `upstream_timeout` |
//! | upstream silent past the stream idle timeout | 504 | `upstream_idle_timeout` |
//! | unknown path | 404 | `not_found` |
//! | known path, wrong method | 405 + `Allow` | `method_not_allowed` |

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::gateway::metrics::Outcome;
use crate::limiter::decision::{retry_after_header_ms, retry_after_header_secs};
use crate::openai::ApiError;

/// The Retry-After of a 503 `no_endpoints`: about the time a replaced pod takes to be ready.
pub const NO_ENDPOINTS_RETRY: Duration = Duration::from_secs(5);

/// Why the gateway answers instead of the upstream.
#[derive(Debug, Clone, PartialEq)]
pub enum GatewayError {
    /// The request is malformed (400); `param` names the offending field or header.
    BadRequest {
        message: String,
        param: Option<&'static str>,
    },
    /// The policy requires a client API key and the request has no valid one (401).
    Unauthorized,
    /// The body is larger than `limit` bytes (413).
    TooLarge { limit: usize },
    /// The body did not arrive within the body-read timeout (408).
    BodyTimeout(Duration),
    /// Shed by the latency gate (429).
    Shed {
        model: String,
        retry_after: Duration,
    },
    /// Waited `waited` in the admission queue without room (429, `outcome="expired"`).
    Expired {
        model: String,
        retry_after: Duration,
        waited: Duration,
    },
    /// The tenant has spent its budget on this pod (429, `type` the budget's unit: `requests`
    /// or `tokens`).
    OverBudget {
        tenant: String,
        unit: &'static str,
        limit: u64,
        retry_after: Duration,
    },
    /// The request's token estimate alone exceeds its tenant's token budget on this pod: it
    /// could never be admitted (429 `type: tokens`, as OpenAI answers, without Retry-After).
    TooLargeForBudget {
        tenant: String,
        limit: u64,
        requested: u64,
    },
    /// No valid policy has been loaded yet (503).
    NotReady,
    /// The gateway holds `limit` requests already (503 with Retry-After).
    Overloaded { limit: usize },
    /// The gateway holds `limit` bytes of request bodies already (503 with Retry-After).
    BodyMemory { limit: usize },
    /// The discovered Service has no ready endpoint (503 with Retry-After).
    NoEndpoints { service: String },
    /// The upstream could not be reached (502).
    UpstreamUnreachable,
    /// The upstream answered 401 or 403 to the gateway's own API key (502): the gateway's
    /// credentials are wrong, not the client's, and the upstream's message is not relayed.
    UpstreamAuth,
    /// The upstream stream ended before `[DONE]`, broke or carried an error (502).
    BrokenStream,
    /// A unary answer was being assembled from a stream with an event over
    /// [`crate::openai::sse::MAX_EVENT_BYTES`], which the gateway does not keep (502).
    EventTooLarge,
    /// The upstream did not answer within the policy's timeout (504).
    UpstreamTimeout(Duration),
    /// The upstream sent nothing for the policy's stream idle timeout (504).
    UpstreamIdle(Duration),
    /// No route for this path (404).
    NotFound { path: String },
    /// The path exists but not with this method (405).
    MethodNotAllowed { method: String, path: String },
}

impl GatewayError {
    /// A 400 without a parameter.
    pub fn bad_request(message: impl Into<String>) -> Self {
        GatewayError::BadRequest {
            message: message.into(),
            param: None,
        }
    }

    /// A 400 naming the offending field or header.
    pub fn bad_param(param: &'static str, message: impl Into<String>) -> Self {
        GatewayError::BadRequest {
            message: message.into(),
            param: Some(param),
        }
    }

    /// How the request counts in `sluice_requests_total`; None for answers that are not
    /// counted (no policy loaded yet, unknown paths).
    pub fn outcome(&self) -> Option<Outcome> {
        match self {
            GatewayError::BadRequest { .. }
            | GatewayError::Unauthorized
            | GatewayError::TooLarge { .. }
            | GatewayError::BodyTimeout(_) => Some(Outcome::ClientError),
            GatewayError::Shed { .. } => Some(Outcome::Rejected),
            GatewayError::Expired { .. } => Some(Outcome::Expired),
            GatewayError::OverBudget { .. } | GatewayError::TooLargeForBudget { .. } => {
                Some(Outcome::OverBudget)
            }
            GatewayError::Overloaded { .. } | GatewayError::BodyMemory { .. } => {
                Some(Outcome::Overloaded)
            }
            GatewayError::UpstreamUnreachable
            | GatewayError::NoEndpoints { .. }
            | GatewayError::UpstreamAuth
            | GatewayError::BrokenStream
            | GatewayError::EventTooLarge
            | GatewayError::UpstreamTimeout(_)
            | GatewayError::UpstreamIdle(_) => Some(Outcome::UpstreamError),
            GatewayError::NotReady
            | GatewayError::NotFound { .. }
            | GatewayError::MethodNotAllowed { .. } => None,
        }
    }

    /// The OpenAI-shaped body and status.
    pub fn api_error(&self) -> ApiError {
        use GatewayError as E;
        let upstream = |status, message: String, code| {
            ApiError::new(status, "upstream_error", message).code(code)
        };
        match self {
            E::BadRequest { message, param } => {
                let e = ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
                match param {
                    Some(p) => e.param(p),
                    None => e,
                }
            }
            E::Unauthorized => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "Missing or incorrect API key: send `Authorization: Bearer <key>` with a key this gateway accepts.",
            )
            .code("invalid_api_key"),
            E::TooLarge { limit } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("request body is larger than {limit} bytes"),
            )
            .code("request_too_large"),
            E::BodyTimeout(t) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!(
                    "the request body did not arrive within {} s",
                    t.as_secs_f64()
                ),
            )
            .code("request_timeout"),
            E::Shed { model, retry_after } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                format!(
                    "The inference server for model {model:?} is over its latency targets; retry after {} s.",
                    retry_after_header_secs(*retry_after)
                ),
            )
            .code("rate_limit_exceeded"),
            E::Expired {
                model,
                retry_after,
                waited,
            } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                format!(
                    "The inference server for model {model:?} is over its latency targets and had no room for this request within {} ms in the queue; retry after {} s.",
                    waited.as_millis(),
                    retry_after_header_secs(*retry_after)
                ),
            )
            .code("rate_limit_exceeded"),
            E::OverBudget {
                tenant,
                unit,
                limit,
                retry_after,
            } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                unit,
                format!(
                    "Rate limit reached for {tenant:?} on {unit} per minute: limit {limit} on this gateway pod; retry after {} s.",
                    retry_after_header_secs(*retry_after)
                ),
            )
            .code("rate_limit_exceeded"),
            E::TooLargeForBudget {
                tenant,
                limit,
                requested,
            } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "tokens",
                format!(
                    "Request too large for {tenant:?} on tokens per minute: limit {limit} on this gateway pod, requested {requested} (the prompt's bytes / 4 plus max_tokens). Lower max_tokens or the prompt."
                ),
            )
            .code("rate_limit_exceeded"),
            E::Overloaded { limit } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                format!("the gateway is serving {limit} requests, its limit; retry after 1 s"),
            )
            .code("overloaded"),
            E::BodyMemory { limit } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                format!(
                    "the gateway holds {limit} bytes of request bodies, its limit; retry after 1 s"
                ),
            )
            .code("overloaded"),
            E::NotReady => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "the gateway has no valid rate-limit policy loaded yet",
            ),
            E::NoEndpoints { service } => upstream(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the inference server {service} has no ready endpoint; retry after {} s",
                    NO_ENDPOINTS_RETRY.as_secs()
                ),
                "no_endpoints",
            ),
            E::UpstreamUnreachable => upstream(
                StatusCode::BAD_GATEWAY,
                "the inference server could not be reached".into(),
                "upstream_unreachable",
            ),
            E::UpstreamAuth => upstream(
                StatusCode::BAD_GATEWAY,
                "the inference server refused the gateway's credentials".into(),
                "upstream_auth_failed",
            ),
            E::BrokenStream => upstream(
                StatusCode::BAD_GATEWAY,
                "the inference server's response stream broke before it was complete".into(),
                "upstream_broken_stream",
            ),
            E::EventTooLarge => upstream(
                StatusCode::BAD_GATEWAY,
                format!(
                    "an event of the inference server's stream is over {} bytes, more than the \
                     gateway assembles into a unary answer; ask for \"stream\": true",
                    crate::openai::sse::MAX_EVENT_BYTES
                ),
                "upstream_event_too_large",
            ),
            E::UpstreamTimeout(t) => upstream(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the inference server did not answer within {} s",
                    t.as_secs_f64()
                ),
                "upstream_timeout",
            ),
            E::UpstreamIdle(t) => upstream(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "the inference server sent nothing for {} s",
                    t.as_secs_f64()
                ),
                "upstream_idle_timeout",
            ),
            E::NotFound { path } => ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("unknown path {path}"),
            )
            .code("not_found"),
            E::MethodNotAllowed { method, path } => ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                format!("{method} is not allowed on {path}"),
            )
            .code("method_not_allowed"),
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let mut resp = self.api_error().into_response();
        if let GatewayError::Unauthorized = self {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"sluice\""),
            );
        }
        if let GatewayError::Overloaded { .. } | GatewayError::BodyMemory { .. } = self {
            let h = resp.headers_mut();
            h.insert(header::RETRY_AFTER, HeaderValue::from(1u64));
            h.insert("retry-after-ms", HeaderValue::from(1000u64));
        }
        if let GatewayError::NoEndpoints { .. } = self {
            let h = resp.headers_mut();
            h.insert(
                header::RETRY_AFTER,
                HeaderValue::from(NO_ENDPOINTS_RETRY.as_secs()),
            );
            h.insert(
                "retry-after-ms",
                HeaderValue::from(NO_ENDPOINTS_RETRY.as_millis() as u64),
            );
        }
        if let GatewayError::Shed { retry_after, .. }
        | GatewayError::Expired { retry_after, .. }
        | GatewayError::OverBudget { retry_after, .. } = self
        {
            let h = resp.headers_mut();
            h.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_header_secs(retry_after)),
            );
            h.insert(
                "retry-after-ms",
                HeaderValue::from(retry_after_header_ms(retry_after)),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests;
