//! Upstreams that misbehave the way real servers do, scripted in this process (127.0.0.1:0),
//! in front of a gateway process: a stream that goes silent, one that ends after its
//! finish_reason without `[DONE]`, one that breaks. Each has a defined answer, a log line and a
//! count in `sluice_upstream_errors_total{reason}`.

mod support;

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use support::http::{Gw, client, metric, post_json};

fn chunk(v: Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// The stub's behaviour is chosen by the request's model.
async fn scripted(body: Bytes) -> Response {
    let req: Value = serde_json::from_slice(&body).unwrap();
    let model = req["model"].as_str().unwrap().to_owned();
    let first = chunk(
        json!({"id": "s", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": null}]}),
    );
    let finish =
        chunk(json!({"id": "s", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}));
    let usage = chunk(
        json!({"id": "s", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}),
    );
    // Each frame after a pause, so what came before it has reached the gateway.
    let pause = Duration::from_millis(100);
    let frames: Vec<Option<Result<Bytes, std::io::Error>>> = match model.as_str() {
        // Finish reason and usage, then the connection ends without [DONE].
        "no-done" => vec![Some(Ok(first)), Some(Ok(finish)), Some(Ok(usage))],
        // One chunk, then nothing more (the stream stays open: `None` waits an hour).
        "silent" => vec![Some(Ok(first)), None],
        // One chunk, then the body breaks.
        "broken" => vec![
            Some(Ok(first)),
            Some(Err(std::io::Error::other("engine crashed"))),
        ],
        other => panic!("unscripted model {other}"),
    };
    let stream = futures_util::stream::iter(frames).then(move |f| async move {
        match f {
            Some(f) => {
                tokio::time::sleep(pause).await;
                f
            }
            None => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(Bytes::new())
            }
        }
    });
    (
        [("content-type", "text/event-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

use futures_util::StreamExt;

async fn stub() -> String {
    let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(scripted));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn request(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_upstream_streams_get_defined_answers_and_are_counted() {
    let c = client();
    let upstream = stub().await;
    let (gw, _policy) = Gw::with_policy(
        &c,
        &upstream,
        "defaults: {ttft: 60s, itl: 60s}\nmodels: [{name: no-done}, {name: silent}, {name: broken}]",
        // The unary path under test is assembly, from the first request on.
        &["--usage-probe=false"],
    )
    .await;
    let url = format!("{}/v1/chat/completions", gw.url);

    // After the finish_reason, a missing [DONE] does not spoil a unary answer.
    let r = post_json(&c, &url, &request("no-done", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], "Hi");
    assert_eq!(r.json()["usage"]["total_tokens"], 2);

    // A broken stream: a unary request gets 502, a streamed one its chunk and then an error
    // event saying why.
    let r = post_json(&c, &url, &request("broken", false)).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "upstream_broken_stream");
    let r = post_json(&c, &url, &request("broken", true)).await;
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.contains("\"Hi\""), "{text}");
    assert!(text.contains("upstream_broken_stream"), "{text}");

    let m = gw.metrics(&c).await;
    let errors = |reason| metric(&m, "sluice_upstream_errors_total", &[("reason", reason)]);
    assert_eq!(errors("broken_stream"), Some(2.0), "{m}");
    assert_eq!(errors("incomplete_stream"), None, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_stream_is_cut_at_the_idle_timeout() {
    let c = client();
    let upstream = stub().await;
    let doc = support::http::policy_yaml(
        &upstream,
        "defaults: {ttft: 60s, itl: 60s}\nmodels: [{name: silent}]",
    )
    .replace("'}", "', streamIdleTimeout: 500ms, timeout: 60s}");
    let policy = support::http::PolicyFile::new(&doc);
    let gw = Gw::start(&c, &policy.0, None, &["--usage-probe=false"]).await;
    let url = format!("{}/v1/chat/completions", gw.url);

    let t = Instant::now();
    let r = post_json(&c, &url, &request("silent", false)).await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_idle_timeout");
    let waited = t.elapsed();
    assert!(waited < Duration::from_secs(10), "cut after {waited:?}");

    let r = post_json(&c, &url, &request("silent", true)).await;
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.contains("\"Hi\""), "{text}");
    assert!(text.contains("upstream_idle_timeout"), "{text}");
    let m = gw.metrics(&c).await;
    assert_eq!(
        metric(
            &m,
            "sluice_upstream_errors_total",
            &[("reason", "idle_timeout")]
        ),
        Some(2.0),
        "{m}"
    );
}
