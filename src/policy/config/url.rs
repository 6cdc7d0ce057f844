//! The upstream of a policy: its URL (and `sluice gateway --upstream`'s), its endpoints, and
//! the validated upstream configuration.

use std::time::Duration;

use super::super::crd::SecretKeyRef;

/// The validated upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Base URL (scheme http or https, with a host).
    pub url: http::Uri,
    /// What is served: `spec.upstream.endpoints`, or `url` alone; never empty, each host and
    /// port once.
    pub endpoints: Vec<http::Uri>,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// Measure unary requests by streaming them upstream.
    pub stream_unary: bool,
    /// How long idle upstream connections are kept.
    pub pool_idle_timeout: Duration,
    /// Longest silence within a response stream.
    pub stream_idle_timeout: Duration,
    pub api_key_secret: Option<SecretKeyRef>,
    /// Discover the endpoints of a Service URL from its EndpointSlices
    /// (`spec.upstream.discovery`; see [`crate::discovery`]).
    pub discovery: bool,
    /// The Service port to discover, by name (`spec.upstream.portName`).
    pub port_name: Option<String>,
    /// Engine signals to read (`spec.upstream.engineMetrics`; see [`crate::signals`]).
    pub engine_metrics: Option<EngineMetricsConfig>,
}

/// `spec.upstream.engineMetrics`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineMetricsConfig {
    pub engine: crate::signals::EngineKind,
    /// Path of the metrics page (starts with `/`).
    pub path: String,
    /// Between 50 ms and 60 s.
    pub interval: Duration,
}

/// `spec.upstream.engineMetrics`, checked.
pub(super) fn engine_metrics(
    spec: Option<&crate::policy::crd::EngineMetricsSpec>,
    c: &mut super::Checker,
) -> Option<EngineMetricsConfig> {
    let spec = spec?;
    if !spec.path.starts_with('/')
        || spec.path.len() > 256
        || spec.path.parse::<http::uri::PathAndQuery>().is_err()
    {
        c.fail(
            "spec.upstream.engineMetrics.path",
            format!("{:?} must be a path starting with /", spec.path),
        );
    }
    let field = "spec.upstream.engineMetrics.interval";
    let interval = match crate::policy::duration::parse_duration(&spec.interval) {
        Err(e) => {
            c.fail(field, e.to_string());
            None
        }
        Ok(d) if d < Duration::from_millis(50) || d > Duration::from_secs(60) => {
            c.fail(
                field,
                format!("{:?} must be between 50ms and 60s", spec.interval),
            );
            None
        }
        Ok(d) => Some(d),
    }?;
    Some(EngineMetricsConfig {
        engine: spec.engine,
        path: spec.path.clone(),
        interval,
    })
}

/// An upstream base URL: http or https, with a host, and without user-info. Credentials in a
/// URL would be logged and written into the gateway Deployment's arguments, and were never
/// sent: the upstream's key belongs in `upstream.apiKeySecretRef`. (Also the parser of
/// `sluice gateway --upstream`.)
pub fn upstream_url(text: &str) -> Result<http::Uri, String> {
    let bad = || format!("{text:?} must be an http:// or https:// URL with a host");
    if text
        .parse::<http::Uri>()
        .is_ok_and(|u| u.authority().is_some_and(|a| a.as_str().contains('@')))
    {
        return Err(
            "the URL must not carry credentials (user:password@); put the upstream's key in \
             upstream.apiKeySecretRef (or --upstream-api-key-file)"
                .to_owned(),
        );
    }
    let uri: http::Uri = text.parse().map_err(|_| bad())?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(bad()),
    }
    match uri.host() {
        Some(h) if !h.is_empty() => Ok(uri),
        _ => Err(bad()),
    }
}

/// The label of an endpoint in metrics and logs: `host:port`, the port defaulting to the
/// scheme's.
pub fn endpoint_label(url: &http::Uri) -> String {
    let port = url
        .port_u16()
        .unwrap_or(if url.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    format!("{}:{port}", url.host().unwrap_or_default())
}

/// The most endpoints a policy may list.
pub const MAX_ENDPOINTS: usize = 64;

/// `spec.upstream.endpoints`, validated: each an upstream URL, each host and port once.
pub(super) fn endpoints(list: &[String], c: &mut super::Checker) -> Vec<http::Uri> {
    if list.len() > MAX_ENDPOINTS {
        c.fail(
            "spec.upstream.endpoints",
            format!(
                "at most {MAX_ENDPOINTS} endpoints; this list has {}",
                list.len()
            ),
        );
        return Vec::new();
    }
    let mut out: Vec<http::Uri> = Vec::new();
    for (i, text) in list.iter().enumerate() {
        let field = format!("spec.upstream.endpoints[{i}]");
        match upstream_url(text) {
            Err(m) => c.fail(&field, m),
            Ok(u) => match out
                .iter()
                .position(|o| endpoint_label(o) == endpoint_label(&u))
            {
                Some(j) => c.fail(
                    &field,
                    format!(
                        "{} is already endpoints[{j}]: each host and port may be listed once",
                        endpoint_label(&u)
                    ),
                ),
                None => out.push(u),
            },
        }
    }
    out
}

/// What a policy serves: its endpoints, or its URL alone.
pub(super) fn served(url: &http::Uri, endpoints: Vec<http::Uri>) -> Vec<http::Uri> {
    if endpoints.is_empty() {
        vec![url.clone()]
    } else {
        endpoints
    }
}

/// `spec.upstream.portName`, checked: a Service port name.
pub(super) fn port_name(name: Option<&String>, c: &mut super::Checker) -> Option<String> {
    let name = name?;
    if !crate::discovery::dns_label(name) {
        c.fail(
            "spec.upstream.portName",
            format!("{name:?} must be a Service port name: lowercase letters, digits and '-'"),
        );
    }
    Some(name.clone())
}
