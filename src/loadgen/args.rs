//! The options of `sluice loadgen` and their parsers.

use std::path::PathBuf;
use std::time::Duration;

use super::arrivals::{Phase, parse_schedule};
use crate::limiter::Priority;
use crate::policy::duration::parse_duration;

/// Options of `sluice loadgen`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    /// Base URL of the OpenAI-compatible server (the gateway or the engine), e.g. http://127.0.0.1:8080
    #[arg(long, value_parser = parse_http_url)]
    pub url: String,
    /// Model to request.
    #[arg(long, default_value = "sim-llm")]
    pub model: String,
    /// The API to drive: `chat` (/v1/chat/completions, one user message) or `completions`
    /// (/v1/completions, a prompt).
    #[arg(long, value_enum, default_value_t = Endpoint::Chat)]
    pub endpoint: Endpoint,
    /// API key sent as `Authorization: Bearer` (as the OpenAI SDK and `vllm bench serve`
    /// take it); never printed.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<ApiKey>,
    /// Offered load in requests per second (with --duration).
    #[arg(long, default_value_t = 5.0)]
    pub rate: f64,
    /// How long to offer --rate.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Phases RATE@DURATION,... instead of --rate/--duration (e.g. 5@30s,20@30s,5@30s).
    #[arg(long, value_parser = |s: &str| parse_schedule(s).map(Schedule))]
    pub schedule: Option<Schedule>,
    /// Gamma burstiness of arrivals: 1 = Poisson, above 1 burstier.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Prompt length range in characters, MIN-MAX.
    #[arg(long, default_value = "200-2000", value_parser = parse_range)]
    pub prompt_chars: (u32, u32),
    /// Output length range in tokens (max_tokens), MIN-MAX.
    #[arg(long, default_value = "32-256", value_parser = parse_range)]
    pub output_tokens: (u32, u32),
    /// TTFT SLO.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub ttft_slo: Duration,
    /// ITL (time per output token) SLO.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub itl_slo: Duration,
    /// Priority mix, e.g. critical=0.1,standard=0.7,sheddable=0.2 (sent as x-sluice-priority).
    #[arg(long, value_parser = |s: &str| parse_mix(s).map(PriorityMix))]
    pub priority_mix: Option<PriorityMix>,
    /// Retry shed requests after their retry-after-ms (once per request; see --max-retries).
    #[arg(long)]
    pub honor_retry_after: bool,
    /// Retry a shed request up to N times, each after its retry-after-ms, as the official
    /// OpenAI SDKs do (they retry twice by default); the last answer is the request's.
    /// Overrides --honor-retry-after's one retry.
    #[arg(long)]
    pub max_retries: Option<u32>,
    /// Client-side concurrency cap: a request that would be the (N+1)-th in flight is not sent
    /// and counts as shed. The "static in-flight cap" baseline of the goodput benchmark (what a
    /// proxy's max-concurrent-requests limit does).
    #[arg(long, conflicts_with = "gradient")]
    pub max_inflight: Option<usize>,
    /// Client-side adaptive concurrency limit in the manner of Netflix's Gradient2, on each
    /// request's TTFT: a request over the limit is not sent and counts as shed. The adaptive
    /// peer of the goodput benchmark.
    #[arg(long)]
    pub gradient: bool,
    /// A sluice gateway's /metrics URL to sample every second during the run: the moving
    /// averages, pressure and reject probability of --model go into the report's `gauges`.
    #[arg(long, value_parser = parse_http_url)]
    pub metrics_url: Option<String>,
    /// Per-request timeout.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Seed of arrivals, lengths and priorities.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the full report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write an SVG plot of the time series here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}

/// The API `sluice loadgen` drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

/// An API key: shown as `[redacted]` wherever the options are printed.
#[derive(Clone)]
pub struct ApiKey(pub String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::str::FromStr for ApiKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let key = s.trim();
        if key.is_empty() {
            return Err("the API key is empty".into());
        }
        Ok(ApiKey(key.to_owned()))
    }
}

/// A parsed `--schedule` (a newtype, so clap takes it as one value).
#[derive(Debug, Clone)]
pub struct Schedule(pub Vec<Phase>);

/// A parsed `--priority-mix`.
#[derive(Debug, Clone)]
pub struct PriorityMix(pub Vec<(Priority, f64)>);

fn parse_range(s: &str) -> Result<(u32, u32), String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: u32 = a
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: expected MIN-MAX"))?;
    let b: u32 = b
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: expected MIN-MAX"))?;
    if a == 0 || b < a {
        return Err(format!("{s:?}: expected 0 < MIN <= MAX"));
    }
    Ok((a, b))
}

/// An `http://host[:port][/path]` URL (the load generator speaks plain HTTP/1.1), or why not.
pub fn parse_http_url(s: &str) -> Result<String, String> {
    let expected = "expected a URL like http://127.0.0.1:8080";
    let uri: hyper::Uri = s
        .parse()
        .map_err(|e| format!("{s:?} is not a URL ({e}): {expected}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{s:?}: https is not supported (the load generator speaks plain HTTP; point it at the gateway's or engine's http:// address)"
            ));
        }
        _ => return Err(format!("{s:?} has no http:// scheme: {expected}")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{s:?} has no host: {expected}"));
    }
    Ok(s.to_owned())
}

fn parse_mix(s: &str) -> Result<Vec<(Priority, f64)>, String> {
    let mix: Result<Vec<_>, String> = s
        .split(',')
        .map(|p| {
            let (name, w) = p
                .split_once('=')
                .ok_or_else(|| format!("{p:?}: expected NAME=WEIGHT"))?;
            let prio: Priority = name
                .parse()
                .map_err(|e: crate::limiter::UnknownPriority| e.to_string())?;
            let w: f64 = w.parse().map_err(|_| format!("{w:?} is not a weight"))?;
            if !(w >= 0.0 && w.is_finite()) {
                return Err(format!("weight {w} must be non-negative"));
            }
            Ok((prio, w))
        })
        .collect();
    let mix = mix?;
    if mix.iter().map(|(_, w)| w).sum::<f64>() <= 0.0 {
        return Err("the weights sum to zero".into());
    }
    Ok(mix)
}

#[cfg(test)]
mod tests {
    use super::parse_http_url;

    #[test]
    fn only_plain_http_urls_with_a_host_are_targets() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://[::1]:8080/",
            "http://gateway.ns.svc:8080/base",
        ] {
            assert_eq!(parse_http_url(ok).as_deref(), Ok(ok));
        }
        for (bad, says) in [
            ("", "is not a URL"),
            ("127.0.0.1:8080", "no http:// scheme"),
            ("/v1/chat/completions", "no http:// scheme"),
            ("ftp://127.0.0.1", "no http:// scheme"),
            ("https://127.0.0.1", "https is not supported"),
            ("http://exa mple", "is not a URL"),
        ] {
            let e = parse_http_url(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
