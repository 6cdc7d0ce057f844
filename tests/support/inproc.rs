//! The gateway's router served in this process on 127.0.0.1:0, in front of a stub upstream
//! (also on 127.0.0.1:0) whose streams the test drives chunk by chunk, with a
//! [`ManualClock`] and a seeded random source: every TTFT and ITL sample the gateway takes is
//! exactly the time the test advanced the clock by, so shedding and Retry-After are exact.
//!
//! Synchronisation: the stub hands each request it receives to the test ([`Arrival`]); the
//! test advances the clock, pushes a chunk and waits until the client has received it through
//! the gateway, which has then measured it (the relay observes a chunk before passing it on).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use sluice::gateway::{self, Gateway, GatewayOptions, RandomSource};
use sluice::limiter::ManualClock;
use sluice::policy::PolicyConfig;
use sluice::policy::source::PolicyStore;
use tokio::sync::{Mutex, mpsc};

use super::http::{HttpClient, client, policy_yaml};

mod held;
pub use held::Held;

/// A request that reached the stub upstream; its response stream is open until dropped.
pub struct Arrival {
    /// Which stub upstream it reached (the index in [`InProc::upstreams`]).
    pub upstream: usize,
    pub body: serde_json::Value,
    /// The `Authorization` header the upstream received.
    pub authorization: Option<String>,
    chunks: mpsc::UnboundedSender<Bytes>,
}

impl Arrival {
    fn send(&self, data: &str) {
        let _ = self.chunks.send(Bytes::from(format!("data: {data}\n\n")));
    }
}

#[derive(Clone)]
struct Stub {
    index: usize,
    arrivals: mpsc::UnboundedSender<Arrival>,
    /// Embeddings requests: their response is held open until the sender is dropped.
    held: mpsc::UnboundedSender<mpsc::UnboundedSender<Bytes>>,
}

/// Embeddings: answered with headers at once, the body held open (load in flight that
/// yields no latency sample).
async fn stub_embeddings(State(stub): State<Stub>) -> Response {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let _ = stub.held.send(tx);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    (
        [("content-type", "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn stub_chat(
    State(stub): State<Stub>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let authorization = headers
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_owned());
    let _ = stub.arrivals.send(Arrival {
        upstream: stub.index,
        body,
        authorization,
        chunks: tx,
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    (
        [("content-type", "text/event-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Requests in flight that yield no samples, held by [`InProc::busy`] until dropped.
pub struct Busy {
    _upstream: Vec<mpsc::UnboundedSender<Bytes>>,
    _bodies: Vec<hyper::body::Incoming>,
}

/// How one streamed request went.
#[derive(Debug)]
pub struct Outcome {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    /// The error body of a refused request.
    pub body: Option<serde_json::Value>,
    /// The `Authorization` header the upstream received (admitted requests).
    pub upstream_authorization: Option<String>,
    /// The stub upstream that served it (admitted requests).
    pub upstream: Option<usize>,
}

impl Outcome {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    }

    /// `retry-after-ms` as a duration.
    pub fn retry_after(&self) -> Duration {
        let ms: u64 = self.header("retry-after-ms").unwrap().parse().unwrap();
        Duration::from_millis(ms)
    }
}

/// A request sent by [`InProc::send`].
pub type Sent = tokio::task::JoinHandle<Outcome>;

/// A gateway and its stub upstream in this process.
pub struct InProc {
    pub url: String,
    /// The first stub upstream.
    pub upstream: String,
    /// Every stub upstream (one unless started with [`InProc::start_fleet`]); with more than
    /// one, the policy lists them all as `spec.upstream.endpoints`.
    pub upstreams: Vec<String>,
    pub clock: ManualClock,
    pub store: Arc<PolicyStore>,
    pub gw: Arc<Gateway>,
    arrivals: Mutex<mpsc::UnboundedReceiver<Arrival>>,
    held: Mutex<mpsc::UnboundedReceiver<mpsc::UnboundedSender<Bytes>>>,
    client: HttpClient,
    generation: std::sync::atomic::AtomicI64,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl InProc {
    /// A gateway with the policy `spec` (YAML lines under `spec:`, the upstream added).
    pub async fn start(spec: &str) -> InProc {
        InProc::start_with(spec, GatewayOptions::default()).await
    }

    /// The same with `options` (their random source is replaced by the seeded one).
    pub async fn start_with(spec: &str, options: GatewayOptions) -> InProc {
        InProc::start_fleet(1, spec, options).await
    }

    /// A gateway in front of `n` stub upstreams, listed as the policy's endpoints.
    pub async fn start_fleet(n: usize, spec: &str, options: GatewayOptions) -> InProc {
        let (tx, rx) = mpsc::unbounded_channel();
        let (held_tx, held_rx) = mpsc::unbounded_channel();
        let (mut upstreams, mut tasks) = (Vec::new(), Vec::new());
        for index in 0..n {
            let app = axum::Router::new()
                .route("/v1/chat/completions", axum::routing::post(stub_chat))
                .route("/v1/embeddings", axum::routing::post(stub_embeddings))
                .with_state(Stub {
                    index,
                    arrivals: tx.clone(),
                    held: held_tx.clone(),
                });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            upstreams.push(format!("http://{}", listener.local_addr().unwrap()));
            tasks.push(tokio::spawn(async move {
                axum::serve(listener, app).await.unwrap();
            }));
        }

        let clock = ManualClock::starting_at(Duration::from_secs(1000));
        let store = Arc::new(PolicyStore::new(vec![]));
        let gw = Gateway::new(
            store.clone(),
            Arc::new(clock.clone()),
            GatewayOptions {
                random: RandomSource::seeded(42),
                ..options
            },
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn({
            let gw = gw.clone();
            async move {
                gateway::serve(
                    listener,
                    gateway::router(gw.clone()),
                    gw,
                    std::future::pending(),
                    Duration::from_secs(1),
                )
                .await
                .unwrap();
            }
        });
        tasks.push(server);
        let me = InProc {
            url,
            upstream: upstreams[0].clone(),
            upstreams,
            clock,
            store,
            gw,
            arrivals: Mutex::new(rx),
            held: Mutex::new(held_rx),
            client: client(),
            generation: 0.into(),
            tasks,
        };
        me.reload(spec);
        me
    }

    /// Puts a new version of the policy in force (as a watch or the file poller would).
    pub fn reload(&self, spec: &str) {
        let served: Vec<&str> = self.upstreams.iter().map(String::as_str).collect();
        self.reload_endpoints(&served, spec);
    }

    /// The same with `endpoints` as the policy's endpoints (none: `upstream` alone).
    pub fn reload_endpoints(&self, endpoints: &[&str], spec: &str) {
        let mut doc = policy_yaml(&self.upstream, spec);
        if endpoints != [self.upstream.as_str()] {
            let from = format!("upstream: {{url: '{}'}}", self.upstream);
            let to = format!(
                "upstream: {{url: '{}', endpoints: ['{}']}}",
                self.upstream,
                endpoints.join("', '")
            );
            doc = doc.replace(&from, &to);
        }
        let (_, config) = PolicyConfig::from_yaml(&doc).unwrap();
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        self.store.apply(generation, "test".into(), config);
    }

    /// A streamed chat request for `model` whose first token comes `ttft` after it reached
    /// the upstream and whose later tokens come `gaps` apart (clock time); refused requests
    /// never reach the upstream.
    pub async fn stream(
        &self,
        model: &str,
        headers: &[(&str, &str)],
        ttft: Duration,
        gaps: &[Duration],
    ) -> Outcome {
        self.stream_reporting(model, headers, (ttft, gaps), None)
            .await
    }

    /// [`InProc::stream`] whose last chunk reports `usage` (prompt, completion tokens), as a
    /// request with `stream_options.include_usage` gets it.
    pub async fn stream_reporting(
        &self,
        model: &str,
        headers: &[(&str, &str)],
        (ttft, gaps): (Duration, &[Duration]),
        usage: Option<(u64, u64)>,
    ) -> Outcome {
        let mut req = hyper::Request::post(format!("{}/v1/chat/completions", self.url))
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = serde_json::json!({"model": model, "stream": true,
            "messages": [{"role": "user", "content": "hi"}]});
        let req = req
            .body(http_body_util::Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let mut response = tokio::spawn(self.client.request(req));
        let mut arrivals = self.arrivals.lock().await;
        let arrival = tokio::select! {
            a = arrivals.recv() => a.expect("stub upstream running"),
            r = &mut response => {
                let r = r.unwrap().expect("gateway answers");
                let (status, headers) = (r.status().as_u16(), r.headers().clone());
                let bytes = r.into_body().collect().await.unwrap().to_bytes();
                return Outcome {
                    status,
                    headers,
                    body: serde_json::from_slice(&bytes).ok(),
                    upstream_authorization: None,
                    upstream: None,
                };
            }
        };
        drop(arrivals);
        let resp = response.await.unwrap().expect("gateway answers");
        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
        assert_eq!(status, 200);
        let mut body = resp.into_body();
        let content = r#"{"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}"#;
        for step in std::iter::once(&ttft).chain(gaps) {
            self.clock.advance(*step);
            arrival.send(content);
            let frame = body.frame().await.expect("a chunk").expect("no error");
            assert!(frame.is_data());
        }
        arrival.send(r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#);
        if let Some((p, c)) = usage {
            let u = serde_json::json!({"choices": [],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}});
            arrival.send(&u.to_string());
        }
        arrival.send("[DONE]");
        let upstream_authorization = arrival.authorization.clone();
        let upstream = Some(arrival.upstream);
        drop(arrival);
        while let Some(f) = body.frame().await {
            f.expect("the stream ends cleanly");
        }
        Outcome {
            status,
            headers,
            body: None,
            upstream_authorization,
            upstream,
        }
    }

    /// A streamed request that reached the upstream and got its response headers, held open
    /// (no token yet) until dropped.
    pub async fn hold(&self, model: &str) -> Held {
        self.hold_as(model, &[]).await
    }

    /// [`InProc::hold`] with request `headers`.
    pub async fn hold_as(&self, model: &str, headers: &[(&str, &str)]) -> Held {
        let body = serde_json::json!({"model": model, "stream": true,
            "messages": [{"role": "user", "content": "hi"}]});
        let mut req = hyper::Request::post(format!("{}/v1/chat/completions", self.url))
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = (req.body(http_body_util::Full::new(Bytes::from(body.to_string())))).unwrap();
        let response = tokio::spawn(self.client.request(req));
        let arrival = self.arrivals.lock().await.recv().await.unwrap();
        let resp = response.await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
        Held {
            arrival,
            body: resp.into_body(),
        }
    }

    /// `n` embeddings requests for `model`, admitted and held open at the upstream: requests
    /// in flight on the model's key (so work conservation does not apply) that yield no
    /// latency sample. Admitted one by one while nothing sheds.
    pub async fn busy(&self, model: &str, n: usize) -> Busy {
        let mut busy = Busy {
            _upstream: Vec::new(),
            _bodies: Vec::new(),
        };
        for _ in 0..n {
            let body = serde_json::json!({"model": model, "input": "hi"});
            let req = hyper::Request::post(format!("{}/v1/embeddings", self.url))
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(Bytes::from(body.to_string())))
                .unwrap();
            let response = tokio::spawn(self.client.request(req));
            busy._upstream
                .push(self.held.lock().await.recv().await.unwrap());
            let resp = response.await.unwrap().unwrap();
            assert_eq!(resp.status(), 200);
            busy._bodies.push(resp.into_body());
        }
        busy
    }

    /// A streamed chat request for `model` with `headers`, tagged `"user": tag` and padded
    /// with `pad` bytes of content, left running: the task ends with the gateway's answer
    /// (its body read when it is an error). Aborting the task closes the connection.
    pub fn send(&self, model: &str, headers: &[(&str, &str)], tag: &str, pad: usize) -> Sent {
        let mut req = hyper::Request::post(format!("{}/v1/chat/completions", self.url))
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = serde_json::json!({"model": model, "stream": true, "user": tag,
            "messages": [{"role": "user", "content": "x".repeat(pad)}]});
        let req = (req.body(http_body_util::Full::new(Bytes::from(body.to_string())))).unwrap();
        let client = self.client.clone();
        tokio::spawn(async move {
            let r = client.request(req).await.expect("gateway answers");
            let (status, headers) = (r.status().as_u16(), r.headers().clone());
            let body = match status {
                200 => None,
                _ => {
                    serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).ok()
                }
            };
            Outcome {
                status,
                headers,
                body,
                upstream_authorization: None,
                upstream: None,
            }
        })
    }

    /// The next request to reach a stub upstream (its response open until dropped).
    pub async fn arrival(&self) -> Arrival {
        self.arrivals.lock().await.recv().await.unwrap()
    }

    /// Waits until `n` requests wait in the gateway's admission queue (sent concurrently).
    pub async fn queued(&self, n: usize) {
        for _ in 0..500 {
            let m = self.metrics().await;
            if super::http::metric(&m, "sluice_queue_requests", &[]) == Some(n as f64) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the queue never held {n}");
    }

    /// The gateway's /metrics text.
    pub async fn metrics(&self) -> String {
        let r = super::http::get(&self.client, &format!("{}/metrics", self.url)).await;
        assert_eq!(r.status, 200);
        r.text()
    }
}

impl Drop for InProc {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
