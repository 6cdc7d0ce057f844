//! `sluice loadgen`: drives an OpenAI-compatible endpoint the way `vllm bench serve` does and
//! reports goodput — requests per second of offered load that met both latency SLOs, with
//! 429s counted as misses.
//!
//! - Arrivals: Poisson or bursty Gamma at `--rate` for `--duration`, or a `--schedule` of
//!   phases (`5@30s,20@30s,5@30s`); see [`arrivals`].
//! - Requests: streaming chat completions with prompt and output lengths drawn uniformly from
//!   `--prompt-chars` and `--output-tokens` ranges, priorities from `--priority-mix`; with
//!   `--honor-retry-after` a shed request waits its `retry-after-ms` and retries (the retry's
//!   outcome is the request's), with `--max-retries N` up to N times (the OpenAI SDKs' 2).
//! - Per request: TTFT (send → first content chunk) and TPOT (mean gap between content chunks,
//!   the "ITL" compared with `--itl-slo`); a request is good when it succeeded and both are
//!   within their SLOs.
//! - Report ([`report`]): goodput, SLO attainment over offered and over admitted requests,
//!   p50/p90/p99 TTFT and ITL, the 429 rate, per-priority results, a per-second time series and
//!   the recovery time after the peak phase; a summary table on stdout, JSON (`--json`), an SVG
//!   plot (`--svg`), and a progress line on stderr while it runs.

mod args;
pub mod arrivals;
pub mod gradient;
pub mod report;

pub use args::{ApiKey, Endpoint, LoadgenArgs, PriorityMix, Schedule};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

use crate::limiter::Priority;
use crate::openai::sse::{EventKind, SseEvent, SseParser, classify};
use crate::openai::timing::{StreamTimer, Timing};
use crate::random::{SplitMix64, Uniform};
use arrivals::{Phase, arrival_times};
use report::{Outcome, RequestResult};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const WORDS: &[&str] = &[
    "the", "model", "serves", "tokens", "under", "load", "and", "keeps", "latency", "low",
];

fn prompt(chars: u32, rng: &mut SplitMix64) -> String {
    let mut s = String::with_capacity(chars as usize + 8);
    while s.len() < chars as usize {
        s.push_str(WORDS[(rng.next_u64() % WORDS.len() as u64) as usize]);
        s.push(' ');
    }
    s.truncate(chars as usize);
    s
}

fn draw(range: (u32, u32), rng: &mut SplitMix64) -> u32 {
    range.0 + (rng.next_u64() % u64::from(range.1 - range.0 + 1)) as u32
}

/// One planned request.
#[derive(Debug, Clone)]
struct Planned {
    at: Duration,
    priority: Priority,
    body: Bytes,
}

fn plan(args: &LoadgenArgs, schedule: &[Phase]) -> Vec<Planned> {
    let times = arrival_times(schedule, args.burstiness, args.seed);
    let mut rng = SplitMix64::new(args.seed ^ 0x5eed);
    let total: f64 = args
        .priority_mix
        .as_ref()
        .map(|m| m.0.iter().map(|(_, w)| w).sum())
        .unwrap_or(1.0);
    times
        .into_iter()
        .map(|at| {
            let priority = match &args.priority_mix {
                None => Priority::Standard,
                Some(PriorityMix(mix)) => {
                    let mut u = rng.next_f64() * total;
                    mix.iter()
                        .find(|(_, w)| {
                            u -= w;
                            u < 0.0
                        })
                        .map(|(p, _)| *p)
                        .unwrap_or(mix[mix.len() - 1].0)
                }
            };
            let max_tokens = draw(args.output_tokens, &mut rng);
            let text = prompt(draw(args.prompt_chars, &mut rng), &mut rng);
            let mut body = json!({
                "model": args.model,
                "stream": true,
                "stream_options": {"include_usage": true},
                "max_tokens": max_tokens,
            });
            match args.endpoint {
                Endpoint::Chat => {
                    body["messages"] = json!([{"role": "user", "content": text}]);
                }
                Endpoint::Completions => body["prompt"] = json!(text),
            }
            Planned {
                at,
                priority,
                body: Bytes::from(serde_json::to_vec(&body).expect("JSON serializes")),
            }
        })
        .collect()
}

/// A client-side limit on requests in flight (the benchmark's baselines).
enum ClientLimit {
    None,
    /// `--max-inflight`: a static cap.
    Cap(Arc<tokio::sync::Semaphore>),
    /// `--gradient`: an adaptive limit.
    Gradient(gradient::Gradient),
}

/// A request's place under the client-side limit, held until it ends.
enum Permit {
    None,
    Cap(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit),
    Gradient(gradient::Permit),
}

/// Where requests go: the endpoint's URL and the `Authorization` header, if any.
struct Target {
    /// Parsed once: every request clones it.
    url: hyper::Uri,
    auth: Option<hyper::header::HeaderValue>,
}

/// Sends one streaming request and measures it.
async fn send_once(
    client: &HttpClient,
    target: &Target,
    p: &Planned,
    timeout: Duration,
    first_token: &(dyn Fn(f64) + Sync),
) -> (RequestResult, Option<Duration>) {
    let start = Instant::now();
    let mut result = RequestResult {
        at: p.at.as_secs_f64(),
        priority: p.priority.as_str(),
        outcome: Outcome::Error,
        ttft: None,
        tpot: None,
        gaps: Vec::new(),
        tokens: 0,
        retried: false,
    };
    let mut req = hyper::Request::post(target.url.clone())
        .header("content-type", "application/json")
        .header(Priority::HEADER, p.priority.as_str());
    if let Some(auth) = &target.auth {
        req = req.header(hyper::header::AUTHORIZATION, auth.clone());
    }
    let req = req
        .body(Full::new(p.body.clone()))
        .expect("a parsed URI and valid header values");
    let work = async {
        let resp = client.request(req).await.map_err(|_| ())?;
        let status = resp.status().as_u16();
        if status == 429 {
            let retry = resp
                .headers()
                .get("retry-after-ms")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<f64>().ok())
                .map(|ms| Duration::from_secs_f64(ms / 1000.0));
            return Ok::<_, ()>((Outcome::Rejected, retry));
        }
        if status != 200 {
            return Ok((Outcome::Error, None));
        }
        let mut body = resp.into_body();
        let mut parser = SseParser::default();
        let mut timer = StreamTimer::new(Duration::ZERO);
        let mut done = false;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Ok((Outcome::Error, None));
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let mut n = 0usize;
            parser.feed(&data, |e| match e {
                SseEvent::Data(e) => match classify(e) {
                    EventKind::Content => n += 1,
                    EventKind::Done => done = true,
                    _ => {}
                },
                SseEvent::TooLarge => n += 1,
            });
            match timer.on_content(n, start.elapsed()) {
                Some(Timing::Ttft(s)) => {
                    result.ttft = Some(s);
                    first_token(s);
                }
                Some(Timing::Gaps { gap, count }) => {
                    result.gaps.extend(std::iter::repeat_n(gap, count))
                }
                None => {}
            }
            result.tokens += n as u32;
        }
        Ok((if done { Outcome::Ok } else { Outcome::Error }, None))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok((outcome, retry))) => {
            result.outcome = outcome;
            if !result.gaps.is_empty() {
                result.tpot = Some(result.gaps.iter().sum::<f64>() / result.gaps.len() as f64);
            }
            (result, retry)
        }
        _ => (result, None),
    }
}

/// One sample of a gateway's limiter gauges for `model` at `t` seconds into the run (the series
/// labelled with the model if the policy names it, else `other`, else `global`); None if the
/// endpoint did not answer or has none of these series.
async fn scrape(
    client: &HttpClient,
    url: &str,
    model: &str,
    t: f64,
) -> Option<report::GaugeSample> {
    let req = hyper::Request::get(url)
        .body(Full::new(Bytes::new()))
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(1), client.request(req))
        .await
        .ok()?
        .ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    let text = std::str::from_utf8(&body).ok()?;
    [
        model,
        crate::limiter::OTHER_LABEL,
        crate::limiter::GLOBAL_LABEL,
    ]
    .into_iter()
    .find_map(|m| {
        let label = format!("{{model=\"{m}\"}}");
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(label.as_str()))
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        Some(report::GaugeSample {
            t,
            ttft_ema_s: value("sluice_ttft_ema_seconds")?,
            itl_ema_s: value("sluice_itl_ema_seconds")?,
            pressure: value("sluice_pressure_ratio")?,
            reject_probability: value("sluice_reject_probability")?,
        })
    })
}

/// Runs the load and returns the report.
pub async fn run_load(args: &LoadgenArgs) -> anyhow::Result<report::Report> {
    let schedule = args.schedule.clone().map(|s| s.0).unwrap_or_else(|| {
        vec![Phase {
            rate: args.rate,
            duration: args.duration,
        }]
    });
    anyhow::ensure!(args.burstiness > 0.0, "--burstiness must be positive");
    // Checked again for library callers (the CLI checks them while parsing): a bad URL is an
    // error here, not a panic in every request task.
    args::parse_http_url(&args.url).map_err(|e| anyhow::anyhow!("--url {e}"))?;
    if let Some(m) = &args.metrics_url {
        args::parse_http_url(m).map_err(|e| anyhow::anyhow!("--metrics-url {e}"))?;
    }
    let planned = plan(args, &schedule);
    let total = planned.len();
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(4096)
        .build(HttpConnector::new());
    let auth = match &args.api_key {
        None => None,
        Some(ApiKey(key)) => {
            let mut v = hyper::header::HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| anyhow::anyhow!("the API key is not valid in an HTTP header"))?;
            v.set_sensitive(true);
            Some(v)
        }
    };
    let url = format!("{}{}", args.url.trim_end_matches('/'), args.endpoint.path());
    let target = Arc::new(Target {
        url: url
            .parse()
            .map_err(|e| anyhow::anyhow!("--url {url:?}: {e}"))?,
        auth,
    });
    let (sent, done, shed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let progress = (!args.quiet).then(|| {
        let (sent, done, shed) = (sent.clone(), done.clone(), shed.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let d = done.load(Ordering::Relaxed) as usize;
                let width = 30;
                let filled = (d * width).checked_div(total).unwrap_or(width);
                eprint!(
                    "\r[{}{}] {d}/{total} done, {} sent, {} shed   ",
                    "#".repeat(filled),
                    ".".repeat(width - filled),
                    sent.load(Ordering::Relaxed),
                    shed.load(Ordering::Relaxed)
                );
            }
        })
    });
    let client_limit = match (args.max_inflight, args.gradient) {
        (Some(_), true) => {
            anyhow::bail!("--max-inflight and --gradient are two client-side limits: choose one")
        }
        (Some(n), false) => ClientLimit::Cap(Arc::new(tokio::sync::Semaphore::new(n))),
        (None, true) => ClientLimit::Gradient(gradient::Gradient::default()),
        (None, false) => ClientLimit::None,
    };
    let start = tokio::time::Instant::now();
    let gauges = Arc::new(std::sync::Mutex::new(Vec::new()));
    let scraper = args.metrics_url.clone().map(|metrics_url| {
        let (client, model, gauges) = (client.clone(), args.model.clone(), gauges.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(start, Duration::from_secs(1));
            loop {
                tick.tick().await;
                let t = start.elapsed().as_secs_f64();
                if let Some(g) = scrape(&client, &metrics_url, &model, t).await {
                    gauges.lock().expect("not poisoned").push(g);
                }
            }
        })
    });
    let mut tasks = Vec::with_capacity(total);
    for p in planned {
        tokio::time::sleep_until(start + p.at).await;
        let (client, target, sent, done, shed) = (
            client.clone(),
            target.clone(),
            sent.clone(),
            done.clone(),
            shed.clone(),
        );
        let timeout = args.timeout;
        let retries = (args.max_retries).unwrap_or(u32::from(args.honor_retry_after));
        sent.fetch_add(1, Ordering::Relaxed);
        let permit = match &client_limit {
            ClientLimit::None => Some(Permit::None),
            ClientLimit::Cap(sem) => sem.clone().try_acquire_owned().ok().map(Permit::Cap),
            ClientLimit::Gradient(g) => g.try_acquire().map(Permit::Gradient),
        };
        let Some(permit) = permit else {
            shed.fetch_add(1, Ordering::Relaxed);
            done.fetch_add(1, Ordering::Relaxed);
            tasks.push(tokio::spawn(async move {
                RequestResult::capped(p.at.as_secs_f64(), p.priority.as_str())
            }));
            continue;
        };
        tasks.push(tokio::spawn(async move {
            let first_token = |ttft: f64| {
                if let Permit::Gradient(g) = &permit {
                    g.sample(ttft);
                }
            };
            let (mut r, mut wait) = send_once(&client, &target, &p, timeout, &first_token).await;
            let mut tries = 0;
            while r.outcome == Outcome::Rejected {
                shed.fetch_add(1, Ordering::Relaxed);
                let Some(after) = wait.filter(|_| tries < retries) else {
                    break;
                };
                tries += 1;
                tokio::time::sleep(after).await;
                let (again, next) = send_once(&client, &target, &p, timeout, &first_token).await;
                (r, wait) = (
                    RequestResult {
                        at: r.at,
                        retried: true,
                        ..again
                    },
                    next,
                );
            }
            drop(permit);
            done.fetch_add(1, Ordering::Relaxed);
            r
        }));
    }
    let mut results = Vec::with_capacity(total);
    for t in tasks {
        results.push(t.await?);
    }
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    if let Some(task) = scraper {
        task.abort();
    }
    let gauges = std::mem::take(&mut *gauges.lock().expect("not poisoned"));
    let duration: f64 = schedule.iter().map(|p| p.duration.as_secs_f64()).sum();
    let mut report = report::Report::new(
        &results,
        &schedule,
        duration,
        args.ttft_slo.as_secs_f64(),
        args.itl_slo.as_secs_f64(),
    );
    report.gauges = gauges;
    Ok(report)
}

/// `sluice loadgen`.
pub async fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    let report = run_load(&args).await?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, report.svg())?;
    }
    Ok(())
}
