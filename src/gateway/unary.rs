//! How unary (non-streaming) requests reach each upstream.
//!
//! - **assembled** (the default, `spec.upstream.streamUnary: true`): the gateway asks for a
//!   stream with `stream_options.include_usage` and assembles the unary JSON
//!   ([`super::assemble`]), so unary traffic gives TTFT and ITL samples like streamed traffic.
//! - **passthrough**: the request is relayed as the client sent it and the upstream's unary
//!   answer returned unchanged. It is still admitted or shed by what the other traffic
//!   measured, and its duration is recorded in `sluice_request_duration_seconds`, but it gives
//!   no TTFT or ITL samples.
//!
//! An upstream that ends a stream without the usage chunk that was asked for (servers that
//! ignore `stream_options`, such as llama-cpp-python's) would lose its clients' token counts
//! in assembly. The first such stream is detected: that request is answered with what the
//! stream carried (`usage: null`, logged as a warning) and every later unary request to that
//! upstream is passed through, until the gateway restarts. `sluice_unary_mode{mode}` shows the
//! mode of the policy's upstream.

use std::collections::HashSet;

use http::Uri;
use parking_lot::RwLock;

/// The upstreams (by URL) whose unary requests are passed through because their streams
/// lack usage.
#[derive(Debug, Default)]
pub struct UnaryModes {
    passthrough: RwLock<HashSet<Uri>>,
}

impl UnaryModes {
    /// Whether unary requests to `upstream` are assembled from a stream (when the policy
    /// allows it).
    pub fn assembles(&self, upstream: &Uri) -> bool {
        !self.passthrough.read().contains(upstream)
    }

    /// `upstream` sent a stream without the usage it was asked for: pass its unary requests
    /// through from now on. Returns true the first time.
    pub fn lacks_usage(&self, upstream: &Uri) -> bool {
        let first = self.passthrough.write().insert(upstream.clone());
        if first {
            tracing::warn!(
                %upstream,
                "the upstream ended a stream without the usage chunk asked for (stream_options.include_usage): that response has usage null, and its unary requests are passed through from now on (admitted, but not measured)"
            );
        }
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upstream_without_usage_switches_to_passthrough_once() {
        let m = UnaryModes::default();
        let (a, b): (Uri, Uri) = ("http://a".parse().unwrap(), "http://b".parse().unwrap());
        assert!(m.assembles(&a));
        assert!(m.lacks_usage(&a));
        assert!(!m.lacks_usage(&a), "reported once");
        assert!(!m.assembles(&a));
        assert!(m.assembles(&b), "per upstream");
    }
}
