//! API keys from files, as the operator mounts them from the policy's Secrets: the upstream
//! key and the clients' keys, with a gateway process in front of a stub upstream (in this
//! process, on 127.0.0.1:0) that records the `Authorization` header of every request it gets.

mod support;

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::HeaderMap;
use support::TempFile;
use support::http::{Gw, client, metric, send};

/// A stub upstream answering `GET /v1/models`; returns its URL and the headers it saw.
async fn recording_upstream() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    async fn models(State(seen): State<Arc<Mutex<Vec<String>>>>, h: HeaderMap) -> &'static str {
        let auth = h
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        seen.lock().unwrap().push(auth);
        r#"{"object":"list","data":[]}"#
    }
    let app = axum::Router::new()
        .route("/v1/models", axum::routing::get(models))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

/// A gateway in front of `upstream` with its upstream key in a file (`sluice-<name>-key-<pid>`)
/// holding `contents`; the file lives as long as the returned guard.
async fn with_key_file(
    upstream: &str,
    name: &str,
    contents: &str,
) -> (Gw, support::http::PolicyFile, TempFile) {
    let path = std::env::temp_dir().join(format!("sluice-{name}-key-{}", std::process::id()));
    let key = TempFile(path);
    std::fs::write(&key.0, contents).unwrap();
    let args = ["--upstream-api-key-file", key.0.to_str().unwrap()];
    let (gw, policy) = Gw::with_policy(&client(), upstream, "", &args).await;
    (gw, policy, key)
}

#[tokio::test]
async fn a_rotated_key_file_applies_without_a_restart_and_a_broken_one_keeps_the_last_key() {
    let c = client();
    let (upstream, seen) = recording_upstream().await;
    // As `echo sk-one > key` writes it: the trailing newline is not part of the key.
    let (gw, _policy, key) = with_key_file(&upstream, "test", "sk-one\n").await;
    let last_auth = || async {
        let r = send(
            &c,
            "GET",
            &format!("{}/v1/models", gw.url),
            &[("authorization", "Bearer client-key")],
            "",
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        seen.lock().unwrap().last().cloned().unwrap()
    };
    assert_eq!(
        last_auth().await,
        "Bearer sk-one",
        "the client's header is replaced"
    );

    std::fs::write(&key.0, "sk-two").unwrap();
    support::eventually(10, "the rotated key in use", || async {
        (last_auth().await == "Bearer sk-two").then_some(())
    })
    .await;

    // An emptied file is refused (once read, the gateway says so); the gateway keeps
    // sending the last good key.
    std::fs::write(&key.0, "\n").unwrap();
    support::eventually(10, "the emptied key file reported", || async {
        let said = gw.process.warnings();
        said.iter()
            .any(|l| l.contains("keeping the last good upstream API key") && l.contains("empty"))
            .then_some(())
    })
    .await;
    assert_eq!(last_auth().await, "Bearer sk-two");
}

#[test]
fn an_unusable_key_file_at_start_is_a_clear_error() {
    let missing = std::env::temp_dir().join("sluice-test-no-such-key");
    let stderr = support::sluice_fails(&[
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--policy-file",
        &format!("{}/examples/policy.yaml", support::REPO),
        "--upstream-api-key-file",
        missing.to_str().unwrap(),
    ]);
    assert!(
        stderr.contains("cannot read the upstream API key file"),
        "{stderr}"
    );
}

#[tokio::test]
async fn client_keys_rotate_without_a_restart_and_never_go_upstream() {
    let c = client();
    let (upstream, seen) = recording_upstream().await;
    let keys = support::TempDir::client_keys("test-clients", &[("alice", "sk-alice-1")]);
    let dir = keys.0.clone();
    let (gw, _policy) = Gw::with_policy(
        &c,
        &upstream,
        "clientAuth: {secretRef: {name: clients}}",
        &["--client-keys-dir", dir.to_str().unwrap()],
    )
    .await;
    let status = |key: &'static str| {
        let (c, url) = (c.clone(), format!("{}/v1/models", gw.url));
        async move {
            let auth = format!("Bearer {key}");
            send(&c, "GET", &url, &[("authorization", auth.as_str())], "")
                .await
                .status
        }
    };
    assert_eq!(status("sk-alice-1").await, 200);
    assert_eq!(status("sk-bob").await, 401);
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [""],
        "the client's key is not forwarded"
    );

    // Rotation: alice's new key works and the old one stops; a new client appears.
    std::fs::write(dir.join("alice"), "sk-alice-2").unwrap();
    std::fs::write(dir.join("bob"), "sk-bob").unwrap();
    support::eventually(10, "the rotated keys in force", || async {
        (status("sk-alice-2").await == 200 && status("sk-bob").await == 200).then_some(())
    })
    .await;
    assert_eq!(status("sk-alice-1").await, 401);

    // Revocation while another entry is bad: bob's key removed and carol's empty. Removals
    // apply whatever else is wrong (the whole last set used to stay, bob's key with it); the
    // bad entry is left out and counted.
    std::fs::remove_file(dir.join("bob")).unwrap();
    std::fs::write(dir.join("carol"), "\n").unwrap();
    support::eventually(10, "bob's key revoked", || async {
        (status("sk-bob").await == 401).then_some(())
    })
    .await;
    assert_eq!(status("sk-alice-2").await, 200);
    let m = gw.metrics(&c).await;
    assert_eq!(
        metric(&m, "sluice_client_keys_invalid", &[]),
        Some(1.0),
        "{m}"
    );
    std::fs::write(dir.join("carol"), "sk-carol").unwrap();
    support::eventually(10, "carol's key in force", || async {
        (status("sk-carol").await == 200).then_some(())
    })
    .await;
    let m = gw.metrics(&c).await;
    assert_eq!(
        metric(&m, "sluice_client_keys_invalid", &[]),
        Some(0.0),
        "{m}"
    );
}

#[test]
fn a_client_keys_dir_that_cannot_be_read_at_start_is_a_clear_error() {
    let stderr = support::sluice_fails(&[
        "gateway",
        "--listen",
        "127.0.0.1:0",
        "--policy-file",
        &format!("{}/examples/policy.yaml", support::REPO),
        "--client-keys-dir",
        "/nonexistent/sluice-clients",
    ]);
    assert!(
        stderr.contains("cannot read the client keys directory"),
        "{stderr}"
    );
}

/// An upstream that refuses every key, the way OpenAI does: 401, `WWW-Authenticate`, and a
/// message repeating the key's last characters.
async fn refusing_upstream() -> String {
    let refuse = || async {
        (
            axum::http::StatusCode::UNAUTHORIZED,
            [
                ("www-authenticate", "Bearer"),
                ("content-type", "application/json"),
            ],
            r#"{"error":{"message":"Incorrect API key provided: sk-gw-****wxyz","code":"invalid_api_key"}}"#,
        )
    };
    let app = axum::Router::new().route("/v1/models", axum::routing::get(refuse));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

#[tokio::test]
async fn an_upstream_refusing_the_gateways_own_key_is_a_502_that_does_not_echo_it() {
    let c = client();
    let upstream = refusing_upstream().await;
    let (gw, _policy, _key) = with_key_file(&upstream, "refused", "sk-gw-abcdwxyz").await;
    let r = send(&c, "GET", &format!("{}/v1/models", gw.url), &[], "").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_auth_failed");
    assert!(
        !r.text().contains("wxyz"),
        "the upstream's message about the key: {}",
        r.text()
    );
    assert_eq!(
        r.header("www-authenticate"),
        None,
        "the client's credentials are not at fault"
    );
    let m = gw.metrics(&c).await;
    assert_eq!(
        metric(
            &m,
            "sluice_upstream_errors_total",
            &[("reason", "upstream_auth")]
        ),
        Some(1.0)
    );

    // Without a key of the gateway's, the client's own key was refused: relayed unchanged.
    let (plain, _policy) = Gw::with_policy(&c, &upstream, "", &[]).await;
    let r = send(
        &c,
        "GET",
        &format!("{}/v1/models", plain.url),
        &[("authorization", "Bearer sk-mine")],
        "",
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
    assert!(
        r.text().contains("Incorrect API key provided"),
        "{}",
        r.text()
    );
}
