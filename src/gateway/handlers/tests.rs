use super::*;
use proptest::prelude::*;

#[test]
fn model_names_are_bounded() {
    let ok = format!(r#"{{"model": "{}"}}"#, "m".repeat(MAX_MODEL_BYTES));
    assert!(parse_completion(ok.as_bytes()).is_ok());
    let long = format!(
        r#"{{"model": "{}", "stream": true}}"#,
        "m".repeat(MAX_MODEL_BYTES + 1)
    );
    match parse_completion(long.as_bytes()) {
        Err((true, GatewayError::BadRequest { param, message })) => {
            assert_eq!(param, Some("model"));
            assert!(message.contains("257 bytes"), "{message}");
        }
        other => panic!("{:?}", other.map(|r| r.model)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any body is either a completion request or a 400 naming what is wrong: no panic,
    /// no other status.
    #[test]
    fn any_body_parses_or_is_a_400(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Err((_, e)) = parse_completion(&body) {
            prop_assert_eq!(e.api_error().status, StatusCode::BAD_REQUEST);
        }
    }

    /// JSON-shaped bodies with odd members: the same.
    #[test]
    fn json_shaped_bodies_parse_or_are_a_400(
        model in prop_oneof![Just(serde_json::Value::Null), any::<i64>().prop_map(serde_json::Value::from),
                             ".{0,300}".prop_map(serde_json::Value::from)],
        stream in prop_oneof![Just(serde_json::Value::Null), any::<bool>().prop_map(serde_json::Value::from),
                              ".{0,8}".prop_map(serde_json::Value::from)],
    ) {
        let body = serde_json::json!({"model": model, "stream": stream}).to_string();
        match parse_completion(body.as_bytes()) {
            Ok(r) => {
                prop_assert!(!r.model.is_empty() && r.model.len() <= MAX_MODEL_BYTES);
            }
            Err((_, e)) => prop_assert_eq!(e.api_error().status, StatusCode::BAD_REQUEST),
        }
    }
}
