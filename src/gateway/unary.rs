//! How unary (non-streaming) requests reach each upstream.
//!
//! - **assembled** (`spec.upstream.streamUnary: true`, the default, once the upstream is known
//!   to stream usage): the gateway asks for a stream with `stream_options.include_usage` and
//!   assembles the unary JSON ([`super::assemble`]), so unary traffic gives TTFT and ITL
//!   samples like streamed traffic.
//! - **passthrough**: the request is relayed as the client sent it and the upstream's unary
//!   answer returned unchanged. It is still admitted or shed by what the other traffic
//!   measured, and its duration is recorded in `sluice_request_duration_seconds`, but it gives
//!   no TTFT or ITL samples.
//!
//! No answer may lose its token counts, and some servers ignore `stream_options` (llama-cpp-
//! python's): an assembled answer from a stream without the usage chunk would say
//! `usage: null`. So an upstream is assembled for only once a probe showed it streams usage:
//! the first unary request to an upstream starts a one-token streamed request of the same
//! model and endpoint in the background (`--usage-probe`, on by default) and is itself passed
//! through, as is every unary request until the probe answers. A probe that shows no usage
//! keeps the upstream in passthrough; one that fails (an error status, a timeout) is retried
//! after [`RETRY_FAILED`]. The answer is re-checked every [`RECHECK`], and forgotten when the
//! upstream is unreachable (a restart may bring another server). An assembled stream that
//! still lacks usage (the server changed without a restart the gateway saw) switches the
//! upstream to passthrough at once; only that answer has `usage: null`, logged.
//! `sluice_unary_mode{mode}` counts the fleet's endpoints in each mode. The Responses API reports
//! usage in its final event without being asked: it is always assembled.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::BodyExt;
use parking_lot::RwLock;

use super::Gateway;
use super::measure::Api;
use crate::openai::sse::{SseEvent, SseParser};
use crate::policy::source::Snapshot;

/// How often an upstream's answer is checked again.
pub const RECHECK: Duration = Duration::from_secs(600);
/// How long after a failed probe the next one starts.
pub const RETRY_FAILED: Duration = Duration::from_secs(60);
/// The longest a probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// What is known of an upstream's streams (times on the gateway's clock).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Known {
    /// A probe is under way.
    Probing,
    /// Its streams carry usage (checked then).
    Usage(Duration),
    /// Its streams lack usage (checked then).
    NoUsage(Duration),
    /// The probe failed then.
    Failed(Duration),
}

/// How the next unary request to an upstream goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Assemble,
    PassThrough,
    /// Pass it through and start a probe ([`probe`]).
    Probe,
}

/// What the gateway knows of each upstream (by URL).
#[derive(Debug)]
pub struct UnaryModes {
    known: RwLock<HashMap<Uri, Known>>,
    /// Probe before assembling (`--usage-probe`); without it an upstream is assembled for
    /// until a stream lacks usage.
    probe: bool,
}

impl Default for UnaryModes {
    fn default() -> Self {
        UnaryModes::new(true)
    }
}

impl UnaryModes {
    pub fn new(probe: bool) -> Self {
        UnaryModes {
            known: RwLock::default(),
            probe,
        }
    }

    /// How the next unary request to `upstream` goes at `now`.
    pub fn plan(&self, upstream: &Uri, now: Duration) -> Plan {
        let fresh = |at: Duration, ttl: Duration| now.saturating_sub(at) < ttl;
        let known = self.known.read().get(upstream).copied();
        match known {
            Some(Known::Usage(at)) if fresh(at, RECHECK) || !self.probe => return Plan::Assemble,
            Some(Known::NoUsage(at)) if fresh(at, RECHECK) => return Plan::PassThrough,
            Some(Known::Failed(at)) if fresh(at, RETRY_FAILED) => return Plan::PassThrough,
            Some(Known::Probing) => return Plan::PassThrough,
            None if !self.probe => return Plan::Assemble,
            // Without probes, an answer past its re-check is tried by assembling again.
            _ if !self.probe => {
                self.known.write().remove(upstream);
                return Plan::Assemble;
            }
            _ => {}
        }
        // Unknown or due: one request starts the probe (under the write lock, so only one).
        let mut map = self.known.write();
        if map.get(upstream).copied() != known {
            return Plan::PassThrough; // another request got here first
        }
        map.insert(upstream.clone(), Known::Probing);
        Plan::Probe
    }

    /// Whether unary requests to `upstream` are assembled now (for the metric).
    pub fn mode(&self, upstream: &Uri, now: Duration) -> &'static str {
        match self.known.read().get(upstream) {
            Some(Known::Usage(_)) => "assembled",
            Some(Known::NoUsage(at)) if now.saturating_sub(*at) < RECHECK => "passthrough",
            None if !self.probe => "assembled",
            _ => "probing",
        }
    }

    /// The probe of `upstream` found its streams carry usage (`Some(true)`), lack it
    /// (`Some(false)`), or failed (`None`).
    pub fn probed(&self, upstream: &Uri, now: Duration, usage: Option<bool>) {
        let known = match usage {
            Some(true) => Known::Usage(now),
            Some(false) => {
                tracing::warn!(%upstream, "the upstream's streams lack the usage chunk asked for (stream_options.include_usage): its unary requests are passed through (admitted, but not measured)");
                Known::NoUsage(now)
            }
            None => Known::Failed(now),
        };
        self.known.write().insert(upstream.clone(), known);
    }

    /// An assembled stream from `upstream` lacked its usage: pass its unary requests through
    /// from now on. Returns true the first time.
    pub fn lacks_usage(&self, upstream: &Uri, now: Duration) -> bool {
        let previous = self
            .known
            .write()
            .insert(upstream.clone(), Known::NoUsage(now));
        let first = !matches!(previous, Some(Known::NoUsage(_)));
        if first {
            tracing::warn!(
                %upstream,
                "the upstream ended a stream without the usage chunk asked for (stream_options.include_usage): that response has usage null, and its unary requests are passed through from now on (admitted, but not measured)"
            );
        }
        first
    }

    /// `upstream` could not be reached: what is known of it may not hold for what answers
    /// next.
    pub fn forget(&self, upstream: &Uri) {
        let mut map = self.known.write();
        if !matches!(map.get(upstream), Some(Known::Probing)) {
            map.remove(upstream);
        }
    }
}

/// Sends the one-token probe to the upstream endpoint `url` for `model` on `api` and records
/// what it shows.
pub async fn probe(gw: Arc<Gateway>, snap: Arc<Snapshot>, url: Uri, model: String, api: Api) {
    let usage = tokio::time::timeout(PROBE_TIMEOUT, streams_usage(&gw, &snap, &url, &model, api))
        .await
        .ok()
        .flatten();
    if usage.is_none() {
        tracing::warn!(upstream = %url, retry_in = ?RETRY_FAILED, "the usage probe failed; unary requests are passed through meanwhile");
    }
    gw.unary.probed(&url, gw.clock.now(), usage);
}

/// Whether a one-token stream of `model` carries a usage chunk; None when it cannot be told.
async fn streams_usage(
    gw: &Gateway,
    snap: &Snapshot,
    url: &Uri,
    model: &str,
    api: Api,
) -> Option<bool> {
    let upstream = &snap.config.upstream;
    let body = match api {
        Api::Completions => serde_json::json!({"model": model, "prompt": "Hi",
            "max_tokens": 1, "stream": true, "stream_options": {"include_usage": true}}),
        _ => serde_json::json!({"model": model, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 1, "stream": true, "stream_options": {"include_usage": true}}),
    };
    let uri = super::upstream::target(url, api.path()).ok()?;
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    let key = gw.api_key.current();
    let req = super::upstream::request(
        http::Method::POST,
        uri,
        &headers,
        key.as_deref(),
        true,
        Bytes::from(body.to_string()),
    )
    .ok()?;
    let resp = gw
        .pools
        .get(upstream.pool_idle_timeout)
        .request(req)
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let mut body = resp.into_body();
    let (mut parser, mut usage, mut done) = (SseParser::default(), false, false);
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.ok()?.into_data() else {
            continue;
        };
        parser.feed(&data, |e| {
            if let SseEvent::Data(d) = e {
                done |= d == b"[DONE]";
                usage |= serde_json::from_slice::<serde_json::Value>(d)
                    .is_ok_and(|v| v.get("usage").is_some_and(|u| u.is_object()));
            }
        });
    }
    (usage || done).then_some(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn an_upstream_is_assembled_for_only_after_a_probe_showed_usage() {
        let m = UnaryModes::default();
        let (a, b): (Uri, Uri) = ("http://a".parse().unwrap(), "http://b".parse().unwrap());
        assert_eq!(m.mode(&a, S), "probing");
        // The first request starts the one probe; it and the others meanwhile pass through.
        assert_eq!(m.plan(&a, S), Plan::Probe);
        assert_eq!(m.plan(&a, S), Plan::PassThrough);
        m.probed(&a, 2 * S, Some(true));
        assert_eq!(m.plan(&a, 3 * S), Plan::Assemble);
        assert_eq!(m.mode(&a, 3 * S), "assembled");
        // Per upstream.
        assert_eq!(m.plan(&b, 3 * S), Plan::Probe);
        m.probed(&b, 3 * S, Some(false));
        assert_eq!(m.plan(&b, 4 * S), Plan::PassThrough);
        assert_eq!(m.mode(&b, 4 * S), "passthrough");
        // Not sticky: re-checked after RECHECK, passing through while the probe runs.
        let later = 3 * S + RECHECK;
        assert_eq!(m.plan(&b, later), Plan::Probe);
        assert_eq!(m.plan(&b, later), Plan::PassThrough);
        m.probed(&b, later, Some(true));
        assert_eq!(m.plan(&b, later), Plan::Assemble);
    }

    #[test]
    fn a_failed_probe_is_retried_and_an_unreachable_upstream_is_probed_again() {
        let m = UnaryModes::default();
        let a: Uri = "http://a".parse().unwrap();
        assert_eq!(m.plan(&a, S), Plan::Probe);
        m.probed(&a, S, None);
        assert_eq!(m.plan(&a, 2 * S), Plan::PassThrough);
        assert_eq!(m.plan(&a, S + RETRY_FAILED), Plan::Probe);
        m.probed(&a, S + RETRY_FAILED, Some(true));
        assert_eq!(m.plan(&a, S + RETRY_FAILED), Plan::Assemble);
        m.forget(&a);
        assert_eq!(m.plan(&a, S + RETRY_FAILED), Plan::Probe);
    }

    #[test]
    fn a_stream_without_usage_switches_to_passthrough_once() {
        let m = UnaryModes::new(false); // --usage-probe=false: assembled until proven wrong
        let a: Uri = "http://a".parse().unwrap();
        assert_eq!(m.plan(&a, S), Plan::Assemble);
        assert!(m.lacks_usage(&a, S));
        assert!(!m.lacks_usage(&a, S), "reported once");
        assert_eq!(m.plan(&a, 2 * S), Plan::PassThrough);
        assert_eq!(m.mode(&a, 2 * S), "passthrough");
    }
}
