//! Soak: the gateway under sustained overload from many clients, checked for what must never
//! happen rather than for speed.
//!
//! A `sluice sim-engine` (the goodput benchmark's engine, C* ≈ 37 req/s) behind a `sluice
//! gateway` (the goodput benchmark's thresholds, CRD defaults otherwise); 200 concurrent
//! clients, each sending streamed chat requests back to back for 60 s (prompts of 200–1000
//! characters, 16–48 output tokens). A shed client waits `SLUICE_SOAK_PAUSE_MS` (default 500)
//! before its next request, which puts the offered load at about 10× C*; nothing else slows
//! the clients. Every answer is classified; the gateway's resident memory is sampled every
//! second.
//!
//! Pass criteria (the process exits non-zero otherwise): every request answered with a
//! complete 200 stream, a 429 or a 503 `overloaded`; no connection error or reset, no broken
//! stream, no other status; resident memory in the last 10 s at most 1.25× the highest of the
//! first 10 s after warm-up (flat, not growing with the request count).
//!
//! Run: `cargo bench --bench soak` (about 75 s). `SLUICE_SOAK_SECS`, `SLUICE_SOAK_CLIENTS`
//! change the duration and the number of clients. Results: docs/benchmarks.md.

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{ENGINE, spawn};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sluice::limiter::SplitMix64;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: not a number")))
        .unwrap_or(default)
}

/// How one request ended.
fn classify(status: u16, body: &[u8], body_error: bool) -> String {
    match status {
        200 if body_error => "200 broken stream".into(),
        200 if body.windows(12).any(|w| w == b"data: [DONE]") => "200".into(),
        200 => "200 without [DONE]".into(),
        429 => "429".into(),
        503 if body.windows(10).any(|w| w == b"overloaded") => "503 overloaded".into(),
        s => format!("{s}"),
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn main() {
    let secs: u64 = env_or("SLUICE_SOAK_SECS", 60);
    let clients: usize = env_or("SLUICE_SOAK_CLIENTS", 200);
    let pause = Duration::from_millis(env_or("SLUICE_SOAK_PAUSE_MS", 500));
    common::runtime().block_on(async move {
        let (engine, engine_url) = spawn(
            &[&["sim-engine", "--listen", "127.0.0.1:0"], ENGINE].concat(),
            "simulated engine",
            "/health",
        )
        .await;
        let dir = std::env::temp_dir().join(format!("sluice-soak-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let policy = dir.join("policy.yaml");
        std::fs::write(
            &policy,
            format!(
                "apiVersion: sluice.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: soak}}\nspec:\n  upstream: {{url: '{engine_url}'}}\n  defaults: {{ttft: 250ms, itl: 40ms}}\n  models: [{{name: sim-llm}}]\n"
            ),
        )
        .unwrap();
        let (gw, url) = common::spawn_gateway(&policy).await;
        let pid = gw.pid();

        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(clients)
            .build_http();
        let counts: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
        let start = Instant::now();
        let end = start + Duration::from_secs(secs);
        let tasks: Vec<_> = (0..clients)
            .map(|i| {
                let (client, counts, url) = (client.clone(), counts.clone(), url.clone());
                tokio::spawn(async move {
                    let mut rng = SplitMix64::new(i as u64 + 1);
                    while Instant::now() < end {
                        let prompt = "x".repeat(200 + (rng.next_u64() % 801) as usize);
                        let max_tokens = 16 + rng.next_u64() % 33;
                        let body = serde_json::json!({"model": "sim-llm", "stream": true,
                            "max_tokens": max_tokens,
                            "messages": [{"role": "user", "content": prompt}]});
                        let req = hyper::Request::post(format!("{url}/v1/chat/completions"))
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body.to_string())))
                            .unwrap();
                        let what = match client.request(req).await {
                            Err(e) => format!("connection error: {e}"),
                            Ok(r) => {
                                let status = r.status().as_u16();
                                match r.into_body().collect().await {
                                    Ok(b) => classify(status, &b.to_bytes(), false),
                                    Err(_) => classify(status, b"", true),
                                }
                            }
                        };
                        let shed = what == "429" || what == "503 overloaded";
                        *counts.lock().unwrap().entry(what).or_default() += 1;
                        if shed {
                            tokio::time::sleep(pause).await;
                        }
                    }
                })
            })
            .collect();

        let mut rss = Vec::new();
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_secs(1)).await;
            rss.push(rss_bytes(pid));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let elapsed = start.elapsed().as_secs_f64();
        let counts = counts.lock().unwrap().clone();
        let total: u64 = counts.values().sum();
        let served = counts.get("200").copied().unwrap_or(0);
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        // The first 5 s are warm-up (pools, allocator arenas); then compare the first and
        // last 10 s.
        let early = rss.iter().skip(5).take(10).max().copied().unwrap_or(0);
        let late = rss.iter().rev().take(10).max().copied().unwrap_or(0);
        println!(
            "soak: {clients} clients, {elapsed:.1} s, {total} requests ({:.0} req/s offered, {:.1} req/s served, C* ≈ 36.7)",
            total as f64 / elapsed,
            served as f64 / elapsed
        );
        for (what, n) in &counts {
            println!("  {what}: {n}");
        }
        println!(
            "  gateway RSS: {:.1} MiB at 5–15 s, {:.1} MiB in the last 10 s, samples {:?}",
            mib(early),
            mib(late),
            rss.iter().map(|b| mib(*b).round() as u64).collect::<Vec<_>>()
        );
        drop(gw);
        drop(engine);
        let _ = std::fs::remove_dir_all(&dir);

        let allowed = ["200", "429", "503 overloaded"];
        let bad: Vec<_> = counts
            .iter()
            .filter(|(w, _)| !allowed.contains(&w.as_str()))
            .collect();
        assert!(bad.is_empty(), "answers outside 200/429/503: {bad:?}");
        assert!(served > 0, "nothing was served");
        assert!(
            late as f64 <= 1.25 * early as f64,
            "gateway RSS grew: {:.1} → {:.1} MiB",
            mib(early),
            mib(late)
        );
        println!("soak: passed");
    });
}
