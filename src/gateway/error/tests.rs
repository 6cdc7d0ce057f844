use super::*;
use http_body_util::BodyExt;

async fn body(resp: Response) -> serde_json::Value {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn shed_answer_carries_both_retry_headers_and_an_openai_error() {
    let e = GatewayError::Shed {
        model: "m".into(),
        retry_after: Duration::from_millis(2300),
    };
    assert_eq!(e.outcome(), Some(Outcome::Rejected));
    let resp = e.into_response();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()[header::RETRY_AFTER], "3", "rounded up");
    assert_eq!(resp.headers()["retry-after-ms"], "2300");
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    let v = body(resp).await;
    assert_eq!(v["error"]["type"], "rate_limit_exceeded");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(v["error"]["message"].as_str().unwrap().contains("\"m\""));
}

#[tokio::test]
async fn each_case_has_its_status_code_and_outcome() {
    let cases = [
        (
            GatewayError::bad_param("model", "x"),
            400,
            None,
            Some(Outcome::ClientError),
        ),
        (
            GatewayError::TooLarge { limit: 10 },
            413,
            Some("request_too_large"),
            Some(Outcome::ClientError),
        ),
        (
            GatewayError::BodyTimeout(Duration::from_secs(60)),
            408,
            Some("request_timeout"),
            Some(Outcome::ClientError),
        ),
        (GatewayError::NotReady, 503, None, None),
        (
            GatewayError::NoEndpoints {
                service: "ns/engine:8000".into(),
            },
            503,
            Some("no_endpoints"),
            Some(Outcome::UpstreamError),
        ),
        (
            GatewayError::Unauthorized,
            401,
            Some("invalid_api_key"),
            Some(Outcome::ClientError),
        ),
        (
            GatewayError::Overloaded { limit: 8 },
            503,
            Some("overloaded"),
            Some(Outcome::Overloaded),
        ),
        (
            GatewayError::BodyMemory { limit: 1024 },
            503,
            Some("overloaded"),
            Some(Outcome::Overloaded),
        ),
        (
            GatewayError::UpstreamUnreachable,
            502,
            Some("upstream_unreachable"),
            Some(Outcome::UpstreamError),
        ),
        (
            GatewayError::BrokenStream,
            502,
            Some("upstream_broken_stream"),
            Some(Outcome::UpstreamError),
        ),
        (
            GatewayError::UpstreamTimeout(Duration::from_millis(1500)),
            504,
            Some("upstream_timeout"),
            Some(Outcome::UpstreamError),
        ),
        (
            GatewayError::UpstreamIdle(Duration::from_secs(60)),
            504,
            Some("upstream_idle_timeout"),
            Some(Outcome::UpstreamError),
        ),
        (
            GatewayError::MethodNotAllowed {
                method: "GET".into(),
                path: "/v1/chat/completions".into(),
            },
            405,
            Some("method_not_allowed"),
            None,
        ),
        (
            GatewayError::NotFound { path: "/x".into() },
            404,
            Some("not_found"),
            None,
        ),
    ];
    for (e, status, code, outcome) in cases {
        assert_eq!(e.outcome(), outcome, "{e:?}");
        let resp = e.clone().into_response();
        assert_eq!(resp.status().as_u16(), status, "{e:?}");
        let retry = match e {
            GatewayError::Overloaded { .. } | GatewayError::BodyMemory { .. } => Some("1"),
            GatewayError::NoEndpoints { .. } => Some("5"),
            _ => None,
        };
        let header = resp.headers().get(header::RETRY_AFTER);
        assert_eq!(header.map(|h| h.to_str().unwrap()), retry, "{e:?}");
        let v = body(resp).await;
        assert_eq!(v["error"]["code"].as_str(), code, "{e:?}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let v = body(GatewayError::bad_param("model", "x").into_response()).await;
    assert_eq!(v["error"]["param"], "model");
    assert_eq!(v["error"]["type"], "invalid_request_error");
}
