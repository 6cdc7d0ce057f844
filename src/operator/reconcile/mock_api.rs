//! A scripted API server for reconcile tests without a cluster: a `tower-test` mock service
//! behind a real `kube::Client`, as kube-rs's controller-rs example tests its reconciler. Each
//! request is recorded and answered by the test's script, falling back to what an empty
//! namespace answers: a GET finds nothing, an apply or a create returns what it was sent, and a
//! status write returns the policy with that status.

use std::sync::{Arc, Mutex};

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

/// One request the mock API server received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// The path without the query.
    pub path: String,
    pub query: String,
    pub body: Value,
}

impl Seen {
    /// `"PATCH deployments/p-sluice"`: the verb and the last two path segments.
    pub fn short(&self) -> String {
        let mut tail: Vec<&str> = self.path.rsplit('/').take(2).collect();
        tail.reverse();
        format!("{} {}", self.method, tail.join("/"))
    }
}

/// A script's answer: `None` falls back to the empty namespace's answer.
pub type Script = Box<dyn Fn(&Seen) -> Option<(u16, Value)> + Send + Sync>;

/// A client talking to the mock, and the requests it has answered so far.
pub fn client(policy: Value, script: Script) -> (kube::Client, Arc<Mutex<Vec<Seen>>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Some((request, respond)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap_or_default();
            let seen = Seen {
                method: parts.method.to_string(),
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().unwrap_or_default().to_owned(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let (code, answer) = script(&seen).unwrap_or_else(|| empty_namespace(&policy, &seen));
            log.lock().unwrap().push(seen);
            let response = Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap();
            respond.send_response(response);
        }
    });
    (kube::Client::new(service, "default"), seen)
}

/// The API server's `Status` for a failure.
pub fn failure(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
               "reason": reason, "message": message, "code": code}),
    )
}

/// What an API server with nothing in the namespace answers.
fn empty_namespace(policy: &Value, seen: &Seen) -> (u16, Value) {
    match seen.method.as_str() {
        "PATCH" if seen.path.ends_with("/status") => {
            let mut object = policy.clone();
            object["status"] = seen.body["status"].clone();
            (200, object)
        }
        "GET" => failure(404, "NotFound", "not found"),
        "PATCH" | "POST" | "PUT" => {
            let mut object = seen.body.clone();
            object["metadata"]["resourceVersion"] = json!("1");
            (if seen.method == "POST" { 201 } else { 200 }, object)
        }
        _ => failure(405, "MethodNotAllowed", "not scripted"),
    }
}
