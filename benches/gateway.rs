//! Gateway overhead against calling the simulated engine directly and against nginx as a plain
//! reverse proxy, in one run on this machine: added p50/p99 latency per unary request (with and
//! without stream assembly), per streamed token, and the highest unary request rate each path
//! sustains (closed loop).
//!
//! Run: `SLUICE_NGINX=$(scripts/nginx.sh) cargo bench --bench gateway` (the engine, the
//! gateways and the client in one process on 127.0.0.1, nginx — Debian's package, unpacked by
//! the script — as a child process with 2 workers; the engine answers instantly for the latency
//! and rate runs, so what is measured is the proxy path). Results: docs/benchmarks.md.

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sluice::gateway::{self, Gateway, GatewayOptions};
use sluice::limiter::MonotonicClock;
use sluice::policy::PolicyConfig;
use sluice::policy::source::PolicyStore;
use sluice::sim::{SimConfig, SimEngine};

use common::nginx::{Balance, Nginx};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const REQUESTS: usize = 3000;
const CONCURRENCY: usize = 32;
const RATE_SECONDS: u64 = 5;

async fn engine(step_ms: f64) -> SimEngine {
    SimEngine::start(SimConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_num_seqs: 1024,
        decode_step_ms: step_ms,
        decode_step_ms_per_seq: 0.0,
        prefill_ms_per_token: 0.0,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

/// A gateway in front of `upstream`; thresholds so high that nothing is shed.
async fn gateway(upstream: &str, stream_unary: bool) -> String {
    gateway_fleet(&[upstream.to_owned()], stream_unary).await
}

/// A gateway in front of the fleet `upstreams` (one: the single-upstream path).
async fn gateway_fleet(upstreams: &[String], stream_unary: bool) -> String {
    let endpoints = match upstreams {
        [_] => String::new(),
        many => format!(", endpoints: ['{}']", many.join("', '")),
    };
    let upstream = &upstreams[0];
    let doc = format!(
        "apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: bench}}\nspec:\n  upstream: {{url: '{upstream}', streamUnary: {stream_unary}{endpoints}}}\n  defaults: {{ttft: 1h, itl: 1h}}\n"
    );
    let (_, config) = PolicyConfig::from_yaml(&doc).unwrap();
    let store = Arc::new(PolicyStore::new(vec![]));
    store.apply(1, "bench".into(), config);
    let gw = Gateway::new(
        store,
        Arc::new(MonotonicClock::new()),
        GatewayOptions {
            max_body_bytes: 1 << 20,
            ..GatewayOptions::default()
        },
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(gateway::serve(
        listener,
        gateway::router(gw.clone()),
        gw,
        std::future::pending(),
        Duration::from_secs(1),
    ));
    url
}

fn nginx(upstream_port: u16) -> Nginx {
    Nginx::start(&[upstream_port], Balance::RoundRobin)
}

fn body(stream: bool, max_tokens: u32) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"sim-llm","max_tokens":{max_tokens},"stream":{stream},"messages":[{{"role":"user","content":"How fast is the proxy?"}}]}}"#
    ))
}

async fn unary(c: &HttpClient, base: &str) -> Duration {
    let t = Instant::now();
    let req = hyper::Request::post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(body(false, 1)))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    t.elapsed()
}

/// Gaps between data frames of one stream as the client sees them.
async fn stream_gaps(c: &HttpClient, base: &str, tokens: u32, gaps: &mut Vec<Duration>) {
    let req = hyper::Request::post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(body(true, tokens)))
        .unwrap();
    let mut b = c.request(req).await.unwrap().into_body();
    let mut last: Option<Instant> = None;
    let mut n = 0;
    while let Some(f) = b.frame().await {
        if f.unwrap().is_data() {
            let now = Instant::now();
            // Skip the first few frames (role chunk, first token: TTFT, not ITL).
            if n >= 2 {
                gaps.push(now - last.unwrap());
            }
            last = Some(now);
            n += 1;
        }
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn max_rate(c: &HttpClient, base: &str) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(RATE_SECONDS);
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (c, base, done) = (c.clone(), base.to_owned(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < end {
                    unary(&c, &base).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / RATE_SECONDS as f64
}

fn main() {
    let rt = common::runtime();
    rt.block_on(async {
        let c: HttpClient = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let fast = engine(0.0).await;
        let direct = format!("http://{}", fast.addr);
        let via = gateway(&direct, true).await;
        let via_plain = gateway(&direct, false).await;
        let nginx = nginx(fast.addr.port());
        // Fleets of 3 and 16 instant engines, one gateway listing them (per-endpoint admission).
        let mut fleet_engines = Vec::new();
        let mut fleet_urls = Vec::new();
        for _ in 0..16 {
            let e = engine(0.0).await;
            fleet_urls.push(format!("http://{}", e.addr));
            fleet_engines.push(e);
        }
        let via3 = gateway_fleet(&fleet_urls[..3], true).await;
        let via16 = gateway_fleet(&fleet_urls, true).await;

        // Warm up connections and caches (and each endpoint's usage probe).
        for _ in 0..200 {
            unary(&c, &direct).await;
            unary(&c, &via).await;
            unary(&c, &via_plain).await;
            unary(&c, &nginx.url).await;
            unary(&c, &via3).await;
            unary(&c, &via16).await;
        }
        let (mut d, mut g, mut p, mut n) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut g3, mut g16) = (Vec::new(), Vec::new());
        for _ in 0..REQUESTS {
            d.push(unary(&c, &direct).await);
            g.push(unary(&c, &via).await);
            p.push(unary(&c, &via_plain).await);
            n.push(unary(&c, &nginx.url).await);
            g3.push(unary(&c, &via3).await);
            g16.push(unary(&c, &via16).await);
        }
        println!("unary request latency, {REQUESTS} sequential requests each (µs):");
        println!("| path | p50 | p99 | added p50 | added p99 |");
        println!("|---|---|---|---|---|");
        let (d50, d99) = (pct(&mut d, 0.5), pct(&mut d, 0.99));
        println!("| direct to engine | {:.0} | {:.0} | | |", us(d50), us(d99));
        for (name, v) in [
            ("gateway, streamUnary (assembled)", &mut g),
            ("gateway, streamUnary: false", &mut p),
            ("nginx, plain reverse proxy", &mut n),
            ("gateway, streamUnary, 3 endpoints", &mut g3),
            ("gateway, streamUnary, 16 endpoints", &mut g16),
        ] {
            let (p50, p99) = (pct(v, 0.5), pct(v, 0.99));
            println!(
                "| {name} | {:.0} | {:.0} | {:.0} | {:.0} |",
                us(p50),
                us(p99),
                us(p50) - us(d50),
                us(p99) - us(d99)
            );
        }

        // Streaming: an engine with 5 ms decode steps; client-side gaps between frames.
        let slow = engine(5.0).await;
        let sdirect = format!("http://{}", slow.addr);
        let svia = gateway(&sdirect, true).await;
        let (mut dg, mut gg) = (Vec::new(), Vec::new());
        for _ in 0..20 {
            stream_gaps(&c, &sdirect, 100, &mut dg).await;
            stream_gaps(&c, &svia, 100, &mut gg).await;
        }
        println!("\nstreamed token gaps at the client, 5 ms engine steps, 20 streams × 100 tokens (µs):");
        println!("| path | p50 | p99 |");
        println!("|---|---|---|");
        println!("| direct to engine | {:.0} | {:.0} |", us(pct(&mut dg, 0.5)), us(pct(&mut dg, 0.99)));
        println!("| through gateway | {:.0} | {:.0} |", us(pct(&mut gg, 0.5)), us(pct(&mut gg, 0.99)));

        println!("\nhighest unary rate, closed loop, {CONCURRENCY} concurrent clients, {RATE_SECONDS} s (req/s):");
        println!("| path | req/s |");
        println!("|---|---|");
        println!("| direct to engine | {:.0} |", max_rate(&c, &direct).await);
        println!("| gateway, streamUnary (assembled) | {:.0} |", max_rate(&c, &via).await);
        println!("| gateway, streamUnary: false | {:.0} |", max_rate(&c, &via_plain).await);
        println!("| nginx, plain reverse proxy | {:.0} |", max_rate(&c, &nginx.url).await);
    });
}
