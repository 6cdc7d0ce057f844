//! A small HTTP client and helpers to start `sluice sim-engine` and `sluice gateway` as real
//! processes on 127.0.0.1.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::ChildProcess;
pub use super::files::{PolicyFile, policy_yaml};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A pooling client that lets idle connections go after 10 s: the gateway closes keep-alive
/// connections idle for 30 s (`--header-read-timeout`), and a client that kept them longer
/// would sometimes send on one the gateway had just closed (`IncompleteMessage`).
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(10))
        .build(HttpConnector::new())
}

/// An address where nothing listens (port 1, tcpmux, is never served here): connecting is
/// refused at once.
pub const CLOSED: &str = "http://127.0.0.1:1";

pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    }
}

pub async fn send(
    c: &HttpClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let resp = start(c, method, url, headers, body).await;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

/// A long streamed chat request for the sim engine's `sim-llm` through `gateway`, held in
/// flight (after its first chunk arrived) until the returned body is dropped: load on the
/// model's key, without which the gateway sheds nothing. `max_tokens` 5000: about a minute
/// on the default sim engine.
pub async fn long_stream(c: &HttpClient, gateway: &str) -> hyper::body::Incoming {
    let body = serde_json::json!({"model": "sim-llm", "stream": true, "max_tokens": 5000,
        "messages": [{"role": "user", "content": "hi"}]});
    let url = format!("{gateway}/v1/chat/completions");
    let resp = start(
        c,
        "POST",
        &url,
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await;
    assert_eq!(resp.status(), 200, "the long stream was admitted");
    let mut body = resp.into_body();
    let first = body
        .frame()
        .await
        .expect("a first chunk")
        .expect("no error");
    assert!(first.is_data());
    body
}

/// Sends a request and returns the response with its body still streaming.
pub async fn start(
    c: &HttpClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> hyper::Response<Incoming> {
    let mut b = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        b = b.header("content-type", "application/json");
    }
    c.request(b.body(Full::new(body.into())).unwrap())
        .await
        .expect("request sent")
}

pub async fn post_json(c: &HttpClient, url: &str, body: &serde_json::Value) -> Reply {
    send(c, "POST", url, &[], serde_json::to_vec(body).unwrap()).await
}

pub async fn get(c: &HttpClient, url: &str) -> Reply {
    send(c, "GET", url, &[], Bytes::new()).await
}

/// Polls `url` until it answers 200, failing after `secs`.
pub async fn wait_ok(c: &HttpClient, url: &str, secs: u64, process: &mut ChildProcess) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(Some(status)) = process.child.try_wait() {
            panic!("{} exited early with {status}", process.name);
        }
        let req = hyper::Request::get(url)
            .body(Full::new(Bytes::new()))
            .unwrap();
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), c.request(req)).await
            && r.status() == 200
        {
            return;
        }
        assert!(Instant::now() < deadline, "{url} not ready after {secs}s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `sluice sim-engine` process.
pub struct Sim {
    pub process: ChildProcess,
    pub url: String,
}

impl Sim {
    pub async fn start(c: &HttpClient, extra: &[&str]) -> Sim {
        let mut args = vec!["sim-engine", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let mut process = ChildProcess::sluice(&args, &[("RUST_LOG", "warn,sluice::sim=info")]);
        let url = format!("http://{}", process.listen_addr("simulated engine", 20));
        wait_ok(c, &format!("{url}/health"), 20, &mut process).await;
        Sim { process, url }
    }

    /// An engine with `slots` batch slots and a fixed decode step of `step_ms` (no per-sequence
    /// slowdown): easy to overload predictably.
    pub async fn batch(c: &HttpClient, slots: u32, step_ms: u32) -> Sim {
        let (slots, step) = (slots.to_string(), step_ms.to_string());
        Sim::start(
            c,
            &[
                "--max-num-seqs",
                &slots,
                "--decode-step-ms",
                &step,
                "--decode-step-ms-per-seq",
                "0",
            ],
        )
        .await
    }

    /// POSTs `body` to the engine's `/v1/chat/completions`.
    pub async fn chat(&self, c: &HttpClient, body: &serde_json::Value) -> Reply {
        post_json(c, &format!("{}/v1/chat/completions", self.url), body).await
    }

    pub async fn stats(&self, c: &HttpClient) -> serde_json::Value {
        get(c, &format!("{}/sim/stats", self.url)).await.json()
    }
}

/// A `sluice gateway` process with a policy file.
pub struct Gw {
    pub process: ChildProcess,
    pub url: String,
}

impl Gw {
    pub async fn start(
        c: &HttpClient,
        policy: &Path,
        upstream: Option<&str>,
        extra: &[&str],
    ) -> Gw {
        let policy = policy.to_str().unwrap();
        let mut args = vec![
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--policy-file",
            policy,
            "--reload-interval",
            "100ms",
        ];
        if let Some(u) = upstream {
            args.extend_from_slice(&["--upstream", u]);
        }
        args.extend_from_slice(extra);
        let mut process = ChildProcess::sluice(&args, &[("RUST_LOG", "info")]);
        let url = format!("http://{}", process.listen_addr("gateway", 20));
        wait_ok(c, &format!("{url}/readyz"), 20, &mut process).await;
        Gw { process, url }
    }

    /// A gateway with a policy file of `spec` (lines under `spec:`) in front of `upstream`;
    /// the file lives as long as the returned guard.
    pub async fn with_policy(
        c: &HttpClient,
        upstream: &str,
        spec: &str,
        extra: &[&str],
    ) -> (Gw, PolicyFile) {
        let policy = PolicyFile::new(&policy_yaml(upstream, spec));
        let gw = Gw::start(c, &policy.0, None, extra).await;
        (gw, policy)
    }

    /// POSTs `body` to the gateway's `/v1/chat/completions`.
    pub async fn chat(&self, c: &HttpClient, body: &serde_json::Value) -> Reply {
        post_json(c, &format!("{}/v1/chat/completions", self.url), body).await
    }

    /// A gateway following `namespace/policy` through the API, with the given kubeconfig.
    pub async fn start_k8s(c: &HttpClient, namespace: &str, policy: &str, kubeconfig: &Path) -> Gw {
        let args = [
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--policy",
            policy,
            "--namespace",
            namespace,
        ];
        let mut process = ChildProcess::sluice(
            &args,
            &[
                ("RUST_LOG", "info"),
                ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ],
        );
        let url = format!("http://{}", process.listen_addr("gateway", 30));
        wait_ok(c, &format!("{url}/readyz"), 30, &mut process).await;
        Gw { process, url }
    }

    /// Polls /metrics until `name` (no labels) equals `value`; fails after `secs`.
    pub async fn wait_metric(
        &self,
        c: &HttpClient,
        name: &str,
        labels: &[(&str, &str)],
        value: f64,
        secs: u64,
    ) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let m = self.metrics(c).await;
            if metric(&m, name, labels) == Some(value) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "{name}{labels:?} never reached {value}:\n{m}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The metrics page once `ready` holds for it (fails after `secs`): for changes that
    /// reach several families one after the other.
    pub async fn wait_metrics(
        &self,
        c: &HttpClient,
        secs: u64,
        ready: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let m = self.metrics(c).await;
            if ready(&m) {
                return m;
            }
            assert!(Instant::now() < deadline, "never ready:\n{m}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn metrics(&self, c: &HttpClient) -> String {
        let r = get(c, &format!("{}/metrics", self.url)).await;
        assert_eq!(r.status, 200);
        r.text()
    }
}

/// The value of one sample in Prometheus text format, by metric name and exact label set
/// (labels in any order); None when absent.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let (n, rest) = match series.find('{') {
            Some(i) => (&series[..i], &series[i + 1..series.len() - 1]),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let mut have: Vec<(String, String)> = Vec::new();
        for part in rest.split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once("=\"").expect("label=value");
            have.push((k.to_owned(), v.trim_end_matches('"').to_owned()));
        }
        let matches = labels.len() == have.len()
            && labels
                .iter()
                .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v));
        if matches {
            return Some(value.parse().expect("numeric sample"));
        }
    }
    None
}

/// Sends a JSON POST and reads the whole body: the status, or what went wrong (refused, reset,
/// a body cut short) as text, for tests that count failures instead of stopping at the first.
pub async fn try_post_json(
    c: &HttpClient,
    url: &str,
    body: &serde_json::Value,
) -> Result<u16, String> {
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
        .unwrap();
    try_request(c, req).await
}

/// [`try_post_json`] for a GET.
pub async fn try_get(c: &HttpClient, url: &str) -> Result<u16, String> {
    try_request(
        c,
        hyper::Request::get(url)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

async fn try_request(c: &HttpClient, req: hyper::Request<Full<Bytes>>) -> Result<u16, String> {
    let resp = c.request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    Ok(status)
}

/// Opens a new 30-token stream to `{base}/v1/chat/completions` (model sim-llm) every 50 ms
/// (20 req/s) until one is shed; returns the 429 once every stream started has ended, each
/// with 200 or 429. Fails after 400 streams without one. (With nothing in flight nothing is
/// shed, so requests one at a time would never see one.)
pub async fn stream_until_shed(c: &HttpClient, base: &str) -> Reply {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut burst = Vec::new();
    let shed = loop {
        let (c, url, tx) = (c.clone(), format!("{base}/v1/chat/completions"), tx.clone());
        burst.push(tokio::spawn(async move {
            let body = serde_json::json!({"model": "sim-llm", "stream": true, "max_tokens": 30, "messages": [{"role": "user", "content": "go"}]});
            let r = post_json(&c, &url, &body).await;
            let s = r.status;
            let _ = tx.send(r);
            s
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Ok(r) = rx.try_recv()
            && r.status == 429
        {
            break r;
        }
        assert!(burst.len() < 400, "no 429 after 20 s of overload");
    };
    for b in burst {
        let s = b.await.unwrap();
        assert!(s == 200 || s == 429, "{s}");
    }
    shed
}

/// A chat completion request for the simulated engine's model.
pub fn chat_request(max_tokens: u32, stream: bool) -> serde_json::Value {
    serde_json::json!({"model": "sim-llm", "max_tokens": max_tokens, "stream": stream,
           "messages": [{"role": "user", "content": "What is goodput?"}]})
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: ").map(str::to_owned))
        .collect()
}
