//! Reading a request body without parsing it into a tree.
//!
//! The gateway acts on three top-level members of a request (`model`, `stream`,
//! `stream_options`) and forwards everything else as the client sent it. [`RequestHead`]
//! walks the top level once, validating the JSON syntax of every value (a malformed body is a
//! 400 here, not an engine's problem) but keeping nothing but borrowed slices of those three
//! members: a 16 MiB body costs no allocation beyond itself. (Parsing it into a
//! `serde_json::Value` took about 16× its size, for the whole request.)
//!
//! A member the gateway reads that appears twice is refused: the gateway and the engine must
//! not read different values of `model` or `stream` from one body.
//!
//! [`streaming_body`] writes the upstream body of a unary request that is assembled from a
//! stream: the client's members in their order and bytes, then `"stream":true` and
//! `stream_options` with `include_usage` set (keeping the client's other options).

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use serde::Deserializer;
use serde::de::{self, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The members of a request the gateway reads, borrowed from its bytes.
#[derive(Debug, Default)]
pub struct RequestHead<'a> {
    pub model: Option<&'a RawValue>,
    pub stream: Option<&'a RawValue>,
    pub stream_options: Option<&'a RawValue>,
    /// The largest output a client allowed: `max_tokens`, `max_completion_tokens` or
    /// `max_output_tokens` (the Responses API), whichever is given (the largest of them); a
    /// value that is not a whole number is left to the engine to refuse.
    pub max_output: Option<u64>,
}

/// Why a body is not a request the gateway can read; the message names the problem for the
/// client's 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError {
    /// The member at fault, if one is.
    pub param: Option<&'static str>,
    pub message: String,
}

impl BodyError {
    fn new(param: Option<&'static str>, message: impl Into<String>) -> Self {
        BodyError {
            param,
            message: message.into(),
        }
    }
}

/// A member key, borrowed unless it had escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Calls `f` with each top-level member of the JSON object in `bytes`, its value unparsed.
/// `Err` carries serde_json's message (a syntax error or "not an object").
fn walk_members<'a>(
    bytes: &'a [u8],
    mut f: impl FnMut(&str, &'a RawValue) -> Result<(), String>,
) -> Result<(), String> {
    struct Walk<F>(F);
    impl<'de, F: FnMut(&str, &'de RawValue) -> Result<(), String>> Visitor<'de> for Walk<F> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
            while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
                let v: &'de RawValue = map.next_value()?;
                (self.0)(&k, v).map_err(de::Error::custom)?;
            }
            Ok(())
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.deserialize_map(Walk(&mut f))
        .and_then(|()| de.end())
        .map_err(|e| e.to_string())
}

impl<'a> RequestHead<'a> {
    /// The head of a request body, or the 400 that refuses it: not JSON, not an object, or a
    /// member the gateway reads given twice.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, BodyError> {
        let mut head = RequestHead::default();
        let mut duplicate = None;
        walk_members(bytes, |k, v| {
            let (slot, name) = match k {
                "model" => (&mut head.model, "model"),
                "stream" => (&mut head.stream, "stream"),
                "stream_options" => (&mut head.stream_options, "stream_options"),
                "max_tokens" | "max_completion_tokens" | "max_output_tokens" => {
                    let n = whole_number(v.get());
                    head.max_output = head.max_output.max(n);
                    return Ok(());
                }
                _ => return Ok(()),
            };
            if slot.replace(v).is_some() {
                duplicate = Some(name);
                // Stops the walk; the error is built below.
                return Err(String::new());
            }
            Ok(())
        })
        .map_err(|e| match duplicate {
            Some(name) => BodyError::new(Some(name), format!("`{name}` is given more than once")),
            None if e.contains("expected a JSON object") => {
                BodyError::new(None, "the request body must be a JSON object")
            }
            None => BodyError::new(None, format!("the request body is not valid JSON: {e}")),
        })?;
        Ok(head)
    }

    /// `stream`: absent or null is false; anything but a boolean is refused.
    pub fn stream(&self) -> Result<bool, BodyError> {
        match self.stream.map(RawValue::get) {
            None | Some("null") => Ok(false),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(_) => Err(BodyError::new(Some("stream"), "`stream` must be a boolean")),
        }
    }

    /// `model` as a string, if it is one (escapes decoded).
    pub fn model(&self) -> Option<Cow<'a, str>> {
        let raw: &'a str = self.model?.get();
        let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
        if inner.contains('\\') {
            serde_json::from_str::<String>(raw).ok().map(Cow::Owned)
        } else {
            Some(Cow::Borrowed(inner))
        }
    }
}

/// A JSON number that is a whole number at least 0, saturating at `u64::MAX` (`1e30` is
/// huge, not invalid); None for anything else.
fn whole_number(raw: &str) -> Option<u64> {
    if let Ok(n) = raw.parse::<u64>() {
        return Some(n);
    }
    let f: f64 = raw.parse().ok()?;
    (f.is_finite() && f >= 0.0 && f.fract() == 0.0).then_some(f as u64)
}

/// Appends `"key":` with the key escaped as JSON.
fn push_key(out: &mut Vec<u8>, key: &str) {
    serde_json::to_writer(&mut *out, key).expect("a string serializes");
    out.push(b':');
}

/// The upstream body of a unary request assembled from a stream: `body`'s members except
/// `stream` (and, with `include_usage`, `stream_options`), as they were, then `"stream":true`
/// and, with `include_usage`, `stream_options` with `include_usage: true` (the client's other
/// options kept). `body` must have passed [`RequestHead::parse`].
pub fn streaming_body(body: &[u8], head: &RequestHead<'_>, include_usage: bool) -> Bytes {
    let mut out = Vec::with_capacity(body.len() + 64);
    out.push(b'{');
    walk_members(body, |k, v| {
        if k != "stream" && !(include_usage && k == "stream_options") {
            push_key(&mut out, k);
            out.extend_from_slice(v.get().as_bytes());
            out.push(b',');
        }
        Ok(())
    })
    .expect("the body was parsed before");
    if !include_usage {
        out.extend_from_slice(br#""stream":true}"#);
        return Bytes::from(out);
    }
    out.extend_from_slice(br#""stream":true,"stream_options":{"#);
    // An object keeps its other members; anything else (null, a wrong type) is replaced.
    if let Some(options) = head.stream_options.filter(|o| o.get().starts_with('{')) {
        walk_members(options.get().as_bytes(), |k, v| {
            if k != "include_usage" {
                push_key(&mut out, k);
                out.extend_from_slice(v.get().as_bytes());
                out.push(b',');
            }
            Ok(())
        })
        .expect("a parsed object");
    }
    out.extend_from_slice(br#""include_usage":true}}"#);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn upgraded(body: &str) -> Value {
        let head = RequestHead::parse(body.as_bytes()).unwrap();
        serde_json::from_slice(&streaming_body(body.as_bytes(), &head, true)).unwrap()
    }

    #[test]
    fn reads_the_three_members_and_nothing_else() {
        let body = r#"{"messages":[{"role":"user","content":"hi"}],"model":"m\u00e9","stream":true,"n":2}"#;
        let head = RequestHead::parse(body.as_bytes()).unwrap();
        assert_eq!(head.model().as_deref(), Some("mé"));
        assert_eq!(head.stream(), Ok(true));
        assert!(head.stream_options.is_none());
    }

    #[test]
    fn stream_is_a_boolean_or_absent() {
        for (body, want) in [
            (r#"{}"#, Ok(false)),
            (r#"{"stream":null}"#, Ok(false)),
            (r#"{"stream":false}"#, Ok(false)),
            (r#"{"stream": true }"#, Ok(true)),
        ] {
            assert_eq!(RequestHead::parse(body.as_bytes()).unwrap().stream(), want);
        }
        for body in [
            r#"{"stream":"true"}"#,
            r#"{"stream":1}"#,
            r#"{"stream":[]}"#,
        ] {
            let e = RequestHead::parse(body.as_bytes())
                .unwrap()
                .stream()
                .unwrap_err();
            assert_eq!(e.param, Some("stream"), "{body}");
        }
    }

    #[test]
    fn malformed_bodies_are_refused_with_the_reason() {
        for (body, says) in [
            ("", "not valid JSON"),
            ("[1,2]", "must be a JSON object"),
            ("\"x\"", "must be a JSON object"),
            (r#"{"model":"m""#, "not valid JSON"),
            (r#"{"model":"m","x":[1,}"#, "not valid JSON"),
            (r#"{"model":"m"} {}"#, "not valid JSON"),
            (r#"{"model":"m","x":tru}"#, "not valid JSON"),
        ] {
            let e = RequestHead::parse(body.as_bytes()).unwrap_err();
            assert!(e.message.contains(says), "{body}: {e:?}");
        }
    }

    #[test]
    fn a_member_the_gateway_reads_may_not_be_given_twice() {
        for (body, param) in [
            (r#"{"model":"a","model":"b"}"#, "model"),
            (r#"{"stream":false,"x":1,"stream":true}"#, "stream"),
            (
                r#"{"stream_options":{},"stream_options":null}"#,
                "stream_options",
            ),
        ] {
            let e = RequestHead::parse(body.as_bytes()).unwrap_err();
            assert_eq!(e.param, Some(param), "{body}: {e:?}");
        }
        // Members the gateway does not read pass as they are (the engine decides).
        assert!(RequestHead::parse(br#"{"n":1,"n":2}"#).is_ok());
    }

    #[test]
    fn model_of_another_type_is_none() {
        for body in [
            r#"{"model":1}"#,
            r#"{"model":null}"#,
            r#"{"model":{"a":1}}"#,
        ] {
            assert_eq!(RequestHead::parse(body.as_bytes()).unwrap().model(), None);
        }
    }

    #[test]
    fn the_streaming_body_keeps_every_other_member_as_sent() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"a\"b\u00e9"}],"temperature":0.10000000000000001,"logprobs":true,"stream":false,"we\"ird":{"k":[1,2.5e3]}}"#;
        let out = upgraded(body);
        assert_eq!(out["stream"], true);
        assert_eq!(out["stream_options"], json!({"include_usage": true}));
        let mut want: Value = serde_json::from_str(body).unwrap();
        want["stream"] = json!(true);
        want["stream_options"] = json!({"include_usage": true});
        assert_eq!(out, want);
        // Numbers keep their text (no float round trip).
        let head = RequestHead::parse(body.as_bytes()).unwrap();
        let bytes = streaming_body(body.as_bytes(), &head, true);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.contains("0.10000000000000001"), "{text}");
        assert!(text.contains(r#""we\"ird":{"k":[1,2.5e3]}"#), "{text}");
    }

    #[test]
    fn stream_options_keep_the_clients_other_options() {
        let out =
            upgraded(r#"{"stream_options":{"include_usage":false,"continuous_usage_stats":true}}"#);
        assert_eq!(
            out["stream_options"],
            json!({"continuous_usage_stats": true, "include_usage": true})
        );
        for odd in ["null", "1", "\"x\"", "[]"] {
            let out = upgraded(&format!(r#"{{"model":"m","stream_options":{odd}}}"#));
            assert_eq!(
                out["stream_options"],
                json!({"include_usage": true}),
                "{odd}"
            );
            assert_eq!(out["model"], "m");
        }
        assert_eq!(
            upgraded("{}"),
            json!({"stream": true, "stream_options": {"include_usage": true}})
        );
    }

    #[test]
    fn the_largest_output_allowed_is_read_from_any_of_its_three_names() {
        let max = |b: &str| RequestHead::parse(b.as_bytes()).unwrap().max_output;
        assert_eq!(max(r#"{"model":"m"}"#), None);
        assert_eq!(max(r#"{"max_tokens":32}"#), Some(32));
        assert_eq!(
            max(r#"{"max_completion_tokens":8,"max_tokens":64}"#),
            Some(64)
        );
        assert_eq!(max(r#"{"max_output_tokens":1e3}"#), Some(1000));
        assert_eq!(max(r#"{"max_tokens":1e300}"#), Some(u64::MAX), "saturates");
        for odd in ["-1", "1.5", "\"8\"", "null", "[]"] {
            assert_eq!(max(&format!(r#"{{"max_tokens":{odd}}}"#)), None, "{odd}");
        }
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                proptest::collection::btree_map(".{0,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Any object, members of any name (escapes included) and value: the upstream body
        /// is the same object with `stream` and `stream_options.include_usage` set.
        #[test]
        fn the_streaming_body_is_the_object_with_streaming_set(
            members in proptest::collection::btree_map(".{0,10}", json_value(), 0..8),
            options in proptest::option::of(json_value()),
        ) {
            let mut obj: serde_json::Map<String, Value> = members.into_iter().collect();
            if let Some(o) = options {
                obj.insert("stream_options".into(), o);
            }
            let body = serde_json::to_vec(&obj).unwrap();
            let head = RequestHead::parse(&body).unwrap();
            let out: Value = serde_json::from_slice(&streaming_body(&body, &head, true)).unwrap();
            // (Reparsed, so both sides read the numbers through the same parser.)
            let mut want: serde_json::Map<String, Value> = serde_json::from_slice(&body).unwrap();
            let obj = want.clone();
            want.insert("stream".into(), json!(true));
            let mut o = match obj.get("stream_options") {
                Some(Value::Object(o)) => o.clone(),
                _ => serde_json::Map::new(),
            };
            o.insert("include_usage".into(), json!(true));
            want.insert("stream_options".into(), Value::Object(o));
            proptest::prop_assert_eq!(out, Value::Object(want));
        }
    }
}
