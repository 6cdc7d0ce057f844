//! Incremental parsing of OpenAI server-sent-event streams, for measuring them as they pass
//! through: which events carry content (a token), which one ends the stream, and the JSON of
//! each event when a unary response is being assembled.
//!
//! An event ends with a blank line (`\n\n` or `\r\n\r\n`); its `data:` lines are joined.
//! Content-bearing: a chat delta with non-empty `content`, `reasoning_content` or
//! `tool_calls`, a completion choice with non-empty `text`, or a Responses API
//! `response.output_text.delta` (or reasoning or function-call arguments delta) with a
//! non-empty `delta`. The role chunk, the finish chunk and the usage chunk carry none. A
//! Responses stream has no `[DONE]`: its `response.completed` (or `response.incomplete`) event
//! ends it, and `response.failed` or an `error` event is an error.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::IgnoredAny;

/// What one event was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A chunk with at least one token.
    Content,
    /// A chunk without tokens (role, finish, usage).
    Empty,
    /// `data: [DONE]`.
    Done,
    /// An `{"error": ...}` object sent mid-stream.
    Error,
    /// Not JSON (ignored for measurement, relayed unchanged).
    Unparsed,
}

#[derive(Deserialize)]
struct ChunkView<'a> {
    #[serde(default, borrow)]
    choices: Vec<ChoiceView<'a>>,
    /// A Responses API event's type.
    #[serde(default, borrow, rename = "type")]
    event: Option<Cow<'a, str>>,
    /// A Responses API delta event's text.
    #[serde(default, borrow)]
    delta: Option<Cow<'a, str>>,
    /// `"error": null` is no error (deserializes to None).
    #[serde(default)]
    error: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct ChoiceView<'a> {
    #[serde(default, borrow)]
    delta: Option<DeltaView<'a>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct DeltaView<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(default)]
    tool_calls: Option<Vec<IgnoredAny>>,
}

/// Classifies the JSON payload of one event.
pub fn classify(data: &[u8]) -> EventKind {
    if data == b"[DONE]" {
        return EventKind::Done;
    }
    match serde_json::from_slice::<ChunkView>(data) {
        Ok(chunk) => chunk.kind(),
        Err(_) => EventKind::Unparsed,
    }
}

/// Classifies an event already parsed as JSON (the unary-assembly path parses every event
/// anyway); the same rules as [`classify`], read through the same view.
pub fn classify_value(v: &serde_json::Value) -> EventKind {
    match ChunkView::deserialize(v) {
        Ok(chunk) => chunk.kind(),
        // A JSON value that is not a chunk (e.g. a bare string): nothing to measure.
        Err(_) => EventKind::Unparsed,
    }
}

impl ChunkView<'_> {
    /// The one set of rules: an error object, else content when any choice carries a token.
    fn kind(&self) -> EventKind {
        if self.error.is_some() {
            return EventKind::Error;
        }
        if let Some(event) = self.event.as_deref() {
            return match event {
                "response.output_text.delta"
                | "response.reasoning_text.delta"
                | "response.function_call_arguments.delta"
                    if self.delta.as_ref().is_some_and(|d| !d.is_empty()) =>
                {
                    EventKind::Content
                }
                "response.completed" | "response.incomplete" => EventKind::Done,
                "response.failed" | "error" => EventKind::Error,
                _ => EventKind::Empty,
            };
        }
        let non_empty = |s: &Option<Cow<str>>| s.as_ref().is_some_and(|s| !s.is_empty());
        let has_content = self.choices.iter().any(|c| {
            non_empty(&c.text)
                || c.delta.as_ref().is_some_and(|d| {
                    non_empty(&d.content)
                        || non_empty(&d.reasoning_content)
                        || d.tool_calls.as_ref().is_some_and(|t| !t.is_empty())
                })
        });
        if has_content {
            EventKind::Content
        } else {
            EventKind::Empty
        }
    }
}

/// Splits a byte stream into events.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for an event end.
    scanned: usize,
}

/// Longest event the parser buffers before giving up on measuring a stream (bytes).
pub const MAX_EVENT_BYTES: usize = 4 << 20;

impl SseParser {
    /// Feeds bytes; calls `on_event` with the joined `data:` payload of each complete event.
    /// Returns false when an event exceeds [`MAX_EVENT_BYTES`] (measurement stops; the bytes
    /// are still relayed by the caller).
    pub fn feed(&mut self, bytes: &[u8], mut on_event: impl FnMut(&[u8])) -> bool {
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        let mut i = self.scanned.saturating_sub(3);
        let mut data: Vec<u8> = Vec::new();
        while i < self.buf.len() {
            // An event ends at "\n\n" or "\r\n\r\n" (or "\r\r").
            let end = if self.buf[i..].starts_with(b"\n\n") || self.buf[i..].starts_with(b"\r\r") {
                Some(i + 2)
            } else if self.buf[i..].starts_with(b"\r\n\r\n") {
                Some(i + 4)
            } else {
                None
            };
            if let Some(end) = end {
                data.clear();
                for line in self.buf[start..i].split(|&b| b == b'\n') {
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    if let Some(rest) = line.strip_prefix(b"data:") {
                        if !data.is_empty() {
                            data.push(b'\n');
                        }
                        data.extend_from_slice(rest.strip_prefix(b" ").unwrap_or(rest));
                    }
                }
                if !data.is_empty() {
                    on_event(&data);
                }
                start = end;
                i = end;
            } else {
                i += 1;
            }
        }
        self.buf.drain(..start);
        self.scanned = self.buf.len();
        self.buf.len() <= MAX_EVENT_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, |e| out.push(e.to_vec()));
        }
        out
    }

    #[test]
    fn splits_events_across_arbitrary_chunk_boundaries() {
        let stream = b"data: {\"a\":1}\n\ndata: {\"b\":2}\r\n\r\n: comment\n\ndata: [DONE]\n\n";
        let whole = events(&[stream]);
        assert_eq!(
            whole,
            [
                b"{\"a\":1}".to_vec(),
                b"{\"b\":2}".to_vec(),
                b"[DONE]".to_vec()
            ]
        );
        for cut in 1..stream.len() {
            assert_eq!(
                events(&[&stream[..cut], &stream[cut..]]),
                whole,
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(events(&bytes), whole);
    }

    #[test]
    fn joins_multi_line_data() {
        assert_eq!(events(&[b"data: a\ndata: b\n\n"]), [b"a\nb".to_vec()]);
    }

    #[test]
    fn classifies_responses_api_events() {
        let created =
            br#"{"type":"response.created","response":{"id":"r","status":"in_progress"}}"#;
        let delta = br#"{"type":"response.output_text.delta","item_id":"m","delta":"Hi"}"#;
        let empty = br#"{"type":"response.output_text.delta","item_id":"m","delta":""}"#;
        let args = br#"{"type":"response.function_call_arguments.delta","delta":"{"}"#;
        let done = br#"{"type":"response.completed","response":{"id":"r","usage":{}}}"#;
        let incomplete = br#"{"type":"response.incomplete","response":{"id":"r"}}"#;
        let failed = br#"{"type":"response.failed","response":{"error":{"message":"x"}}}"#;
        let error = br#"{"type":"error","code":"server_error","message":"x"}"#;
        assert_eq!(classify(created), EventKind::Empty);
        assert_eq!(classify(delta), EventKind::Content);
        assert_eq!(classify(empty), EventKind::Empty);
        assert_eq!(classify(args), EventKind::Content);
        assert_eq!(classify(done), EventKind::Done);
        assert_eq!(classify(incomplete), EventKind::Done);
        assert_eq!(classify(failed), EventKind::Error);
        assert_eq!(classify(error), EventKind::Error);
    }

    #[test]
    fn classifies_vllm_chunks() {
        let role = br#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
        let token = br#"{"choices":[{"index":0,"delta":{"content":" hi"},"finish_reason":null}]}"#;
        let finish = br#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#;
        let usage = br#"{"choices":[],"usage":{"prompt_tokens":1}}"#;
        let text = br#"{"choices":[{"index":0,"text":" hi","finish_reason":null}]}"#;
        let tool = br#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}"#;
        let reasoning = br#"{"choices":[{"index":0,"delta":{"reasoning_content":"hmm"}}]}"#;
        let error = br#"{"error":{"message":"boom"}}"#;
        assert_eq!(classify(role), EventKind::Empty);
        assert_eq!(classify(token), EventKind::Content);
        assert_eq!(classify(finish), EventKind::Empty);
        assert_eq!(classify(usage), EventKind::Empty);
        assert_eq!(classify(text), EventKind::Content);
        assert_eq!(classify(tool), EventKind::Content);
        assert_eq!(classify(reasoning), EventKind::Content);
        assert_eq!(classify(error), EventKind::Error);
        assert_eq!(classify(b"[DONE]"), EventKind::Done);
        assert_eq!(classify(b"not json"), EventKind::Unparsed);
        for chunk in [
            &role[..],
            token,
            finish,
            usage,
            text,
            tool,
            reasoning,
            error,
        ] {
            let v: serde_json::Value = serde_json::from_slice(chunk).unwrap();
            assert_eq!(
                classify_value(&v),
                classify(chunk),
                "{}",
                String::from_utf8_lossy(chunk)
            );
        }
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// Bytes that look like SSE often enough to matter: data lines, blank lines, CRs,
        /// JSON fragments and noise.
        fn sse_bytes() -> impl Strategy<Value = Vec<u8>> {
            let piece = prop_oneof![
                Just(b"data: ".to_vec()),
                Just(b"\n".to_vec()),
                Just(b"\r\n".to_vec()),
                Just(b"\r".to_vec()),
                Just(b"[DONE]".to_vec()),
                Just(br#"{"choices":[{"delta":{"content":"x"}}]}"#.to_vec()),
                Just(br#"{"error":{"message":"e"}}"#.to_vec()),
                Just(b": comment".to_vec()),
                proptest::collection::vec(any::<u8>(), 0..16),
            ];
            proptest::collection::vec(piece, 0..64).prop_map(|v| v.concat())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// No input panics, every event classifies, and how the bytes are cut into reads
            /// never changes the events.
            #[test]
            fn chunking_never_changes_the_events(
                bytes in sse_bytes(),
                cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
            ) {
                let whole = events(&[&bytes]);
                let mut points: Vec<usize> =
                    cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
                points.sort_unstable();
                let mut chunks = Vec::new();
                let mut last = 0;
                for p in points {
                    chunks.push(&bytes[last..p]);
                    last = p;
                }
                chunks.push(&bytes[last..]);
                prop_assert_eq!(events(&chunks), whole.clone());
                for e in &whole {
                    let _ = classify(e);
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(e) {
                        prop_assert_eq!(classify_value(&v), classify(e));
                    }
                }
            }
        }
    }
}
