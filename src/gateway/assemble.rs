//! Assembles the ordinary non-streaming response from an OpenAI stream, so the gateway can ask
//! the upstream for a stream (to measure TTFT and ITL) while the client asked for a unary
//! response. The result has the shape the upstream would have returned: `id`, `object`
//! (`chat.completion` or `text_completion`), `created`, `model`, `system_fingerprint` when
//! present, `choices` (chat: `message` with `role`, `content`, `reasoning_content` and
//! `tool_calls` merged by index; completions: `text`), each with its `logprobs` merged across
//! chunks (every array in them concatenated: chat's `content` and `refusal`, completions'
//! `tokens`, `token_logprobs`, `top_logprobs` and `text_offset`) and the choice's last
//! `finish_reason` (and any other per-choice fields such as vLLM's `stop_reason`), `usage` from
//! the usage chunk, and every other top-level field an engine adds (llama.cpp's `timings`,
//! vLLM's `prompt_logprobs`, ...), last non-null value winning.
//!
//! What it cannot make up: a `usage` the upstream never sent. [`Assembler::has_usage`] tells
//! the gateway, which then relays that upstream's unary requests as they are (see
//! `super::unary`).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// Chat or text completion, or a Responses API response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
    /// The Responses API: its final event (`response.completed`, or `response.incomplete`)
    /// carries the whole response object, which is the unary answer.
    Response,
}

#[derive(Debug, Default)]
struct ToolCall {
    id: Option<Value>,
    kind: Option<Value>,
    name: String,
    arguments: String,
}

#[derive(Debug, Default)]
struct Choice {
    role: Option<String>,
    content: Option<String>,
    reasoning: Option<String>,
    text: String,
    tool_calls: BTreeMap<u64, ToolCall>,
    /// Logprobs merged across chunks: None if no chunk had the field (then the answer has
    /// none either, as the engine's own unary answer would not), null while every chunk had
    /// null.
    logprobs: Option<Value>,
    /// Other per-choice fields (finish_reason, stop_reason, ...): last non-null value wins.
    extra: Map<String, Value>,
}

/// Merges one chunk's logprobs into the accumulated ones: arrays are concatenated, other
/// values replaced.
fn merge_logprobs(acc: &mut Map<String, Value>, chunk: &Map<String, Value>) {
    for (k, v) in chunk {
        match (acc.get_mut(k), v) {
            (Some(Value::Array(have)), Value::Array(more)) => have.extend(more.iter().cloned()),
            (Some(_), Value::Null) => {}
            _ => {
                acc.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Accumulates stream chunks.
#[derive(Debug)]
pub struct Assembler {
    kind: Kind,
    head: Map<String, Value>,
    choices: BTreeMap<u64, Choice>,
    usage: Option<Value>,
    /// The Responses API's final response object.
    response: Option<Value>,
}

impl Assembler {
    pub fn new(kind: Kind) -> Self {
        Assembler {
            kind,
            head: Map::new(),
            choices: BTreeMap::new(),
            usage: None,
            response: None,
        }
    }

    /// Whether the stream carried a usage chunk.
    pub fn has_usage(&self) -> bool {
        match self.kind {
            Kind::Response => self
                .response
                .as_ref()
                .is_some_and(|r| r.get("usage").is_some_and(|u| !u.is_null())),
            _ => self.usage.is_some(),
        }
    }

    /// The prompt and completion tokens of the usage the stream carried (`input_tokens` and
    /// `output_tokens` in the Responses API).
    pub fn usage_tokens(&self) -> Option<(u64, u64)> {
        let (usage, names) = match self.kind {
            Kind::Response => (
                self.response.as_ref()?.get("usage")?,
                ["input_tokens", "output_tokens"],
            ),
            _ => (self.usage.as_ref()?, ["prompt_tokens", "completion_tokens"]),
        };
        let n = |k: &str| usage.get(k)?.as_u64();
        Some((n(names[0])?, n(names[1])?))
    }

    /// Whether every choice has a finish_reason: the answer is complete even if the stream
    /// then ends without `[DONE]`.
    pub fn finished(&self) -> bool {
        if self.kind == Kind::Response {
            return self.response.is_some();
        }
        !self.choices.is_empty()
            && self
                .choices
                .values()
                .all(|c| c.extra.get("finish_reason").is_some_and(|f| !f.is_null()))
    }

    /// Adds one chunk (the JSON of one `data:` event).
    pub fn push(&mut self, chunk: &Value) {
        let Some(obj) = chunk.as_object() else { return };
        if self.kind == Kind::Response {
            let last = matches!(
                obj.get("type").and_then(Value::as_str),
                Some("response.completed" | "response.incomplete")
            );
            if let Some(r) = obj.get("response").filter(|_| last) {
                self.response = Some(r.clone());
            }
            return;
        }
        for (key, v) in obj {
            match key.as_str() {
                "object" | "choices" | "usage" => {}
                // The first value of the response's identity; the last of anything else.
                "id" | "created" | "model" | "system_fingerprint" => {
                    if !v.is_null() {
                        self.head.entry(key).or_insert_with(|| v.clone());
                    }
                }
                _ => {
                    if !v.is_null() || !self.head.contains_key(key) {
                        self.head.insert(key.clone(), v.clone());
                    }
                }
            }
        }
        if let Some(u) = obj.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(u.clone());
        }
        let Some(choices) = obj.get("choices").and_then(Value::as_array) else {
            return;
        };
        for c in choices {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(0);
            let acc = self.choices.entry(index).or_default();
            if let Some(t) = c.get("text").and_then(Value::as_str) {
                acc.text.push_str(t);
            }
            if let Some(d) = c.get("delta").and_then(Value::as_object) {
                if let Some(r) = d.get("role").and_then(Value::as_str) {
                    acc.role = Some(r.to_owned());
                }
                if let Some(t) = d.get("content").and_then(Value::as_str) {
                    acc.content.get_or_insert_with(String::new).push_str(t);
                }
                if let Some(t) = d.get("reasoning_content").and_then(Value::as_str) {
                    acc.reasoning.get_or_insert_with(String::new).push_str(t);
                }
                for tc in d
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let i = tc.get("index").and_then(Value::as_u64).unwrap_or(0);
                    let call = acc.tool_calls.entry(i).or_default();
                    if let Some(id) = tc.get("id").filter(|v| !v.is_null()) {
                        call.id = Some(id.clone());
                    }
                    if let Some(t) = tc.get("type").filter(|v| !v.is_null()) {
                        call.kind = Some(t.clone());
                    }
                    if let Some(f) = tc.get("function") {
                        if let Some(n) = f.get("name").and_then(Value::as_str) {
                            call.name.push_str(n);
                        }
                        if let Some(a) = f.get("arguments").and_then(Value::as_str) {
                            call.arguments.push_str(a);
                        }
                    }
                }
            }
            match (c.get("logprobs"), &mut acc.logprobs) {
                (None, _) => {}
                (Some(Value::Object(l)), Some(Value::Object(have))) => merge_logprobs(have, l),
                (Some(l), have) => {
                    if !l.is_null() || have.is_none() {
                        *have = Some(l.clone());
                    }
                }
            }
            if let Some(o) = c.as_object() {
                for (k, v) in o {
                    if matches!(k.as_str(), "index" | "delta" | "text" | "logprobs") {
                        continue;
                    }
                    // Last non-null value wins; a field only ever null stays null.
                    if !v.is_null() || !acc.extra.contains_key(k) {
                        acc.extra.insert(k.clone(), v.clone());
                    }
                }
            }
        }
    }

    /// The non-streaming response.
    pub fn finish(self) -> Value {
        if self.kind == Kind::Response {
            return self.response.unwrap_or(Value::Null);
        }
        let mut out = Map::new();
        out.insert(
            "id".into(),
            self.head.get("id").cloned().unwrap_or(Value::Null),
        );
        out.insert(
            "object".into(),
            json!(match self.kind {
                Kind::Chat => "chat.completion",
                _ => "text_completion",
            }),
        );
        for (key, v) in &self.head {
            if key != "id" {
                out.insert(key.clone(), v.clone());
            }
        }
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .map(|(index, c)| {
                let mut choice = Map::new();
                choice.insert("index".into(), json!(index));
                match self.kind {
                    Kind::Chat => {
                        let mut message = Map::new();
                        message.insert(
                            "role".into(),
                            json!(c.role.as_deref().unwrap_or("assistant")),
                        );
                        message.insert(
                            "content".into(),
                            c.content.map_or(Value::Null, Value::String),
                        );
                        if let Some(r) = c.reasoning {
                            message.insert("reasoning_content".into(), Value::String(r));
                        }
                        if !c.tool_calls.is_empty() {
                            let calls: Vec<Value> = c
                                .tool_calls
                                .into_values()
                                .map(|t| {
                                    json!({
                                        "id": t.id.unwrap_or(Value::Null),
                                        "type": t.kind.unwrap_or_else(|| json!("function")),
                                        "function": {"name": t.name, "arguments": t.arguments},
                                    })
                                })
                                .collect();
                            message.insert("tool_calls".into(), Value::Array(calls));
                        }
                        choice.insert("message".into(), Value::Object(message));
                    }
                    _ => {
                        choice.insert("text".into(), Value::String(c.text));
                    }
                }
                if let Some(l) = c.logprobs {
                    choice.insert("logprobs".into(), l);
                }
                choice.entry("finish_reason").or_insert(Value::Null);
                for (k, v) in c.extra {
                    choice.insert(k, v);
                }
                Value::Object(choice)
            })
            .collect();
        out.insert("choices".into(), Value::Array(choices));
        out.insert("usage".into(), self.usage.unwrap_or(Value::Null));
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_chat_with_tool_calls_and_usage() {
        let mut a = Assembler::new(Kind::Chat);
        for chunk in [
            json!({"id": "c1", "object": "chat.completion.chunk", "created": 7, "model": "m",
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}),
            json!({"id": "c1", "created": 7, "model": "m",
                   "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": null}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"content": "lo"}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_", "arguments": "{\"a\""}}]}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"name": "weather", "arguments": ":1}"}}]}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
            json!({"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}),
        ] {
            a.push(&chunk);
        }
        assert_eq!(
            a.finish(),
            json!({
                "id": "c1", "object": "chat.completion", "created": 7, "model": "m",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello", "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"a\":1}"}}
                    ]},
                    "finish_reason": "tool_calls"
                }],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
            })
        );
    }

    #[test]
    fn assembles_completions_with_several_choices() {
        let mut a = Assembler::new(Kind::Completion);
        a.push(&json!({"id": "x", "created": 1, "model": "m", "choices": [{"index": 1, "text": "b"}, {"index": 0, "text": "a"}]}));
        a.push(&json!({"id": "x", "choices": [{"index": 0, "text": "!", "finish_reason": "stop", "stop_reason": null}]}));
        a.push(
            &json!({"id": "x", "choices": [{"index": 1, "text": "", "finish_reason": "length"}]}),
        );
        let v = a.finish();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], "a!");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["choices"][1]["text"], "b");
        assert_eq!(v["choices"][1]["finish_reason"], "length");
        assert_eq!(v["usage"], Value::Null);
    }

    #[test]
    fn logprobs_and_engine_fields_are_kept() {
        let mut a = Assembler::new(Kind::Chat);
        let tok = |t: &str, l: f64| json!({"token": t, "logprob": l, "top_logprobs": [{"token": t, "logprob": l}]});
        a.push(&json!({"id": "c", "created": 1, "model": "m", "system_fingerprint": "b0",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "logprobs": {"content": [tok("Hi", -0.5)]}, "finish_reason": null}]}));
        a.push(&json!({"id": "c", "choices": [{"index": 0, "delta": {"content": "!"}, "logprobs": {"content": [tok("!", -1.0)]}, "finish_reason": null}]}));
        assert!(!a.finished());
        a.push(&json!({"id": "c", "choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}]}));
        assert!(a.finished() && !a.has_usage());
        a.push(
            &json!({"id": "c", "choices": [], "usage": {"completion_tokens": 2},
            "timings": {"predicted_n": 2}, "service_tier": null}),
        );
        assert!(a.has_usage());
        let v = a.finish();
        assert_eq!(
            v["choices"][0]["logprobs"],
            json!({"content": [tok("Hi", -0.5), tok("!", -1.0)]})
        );
        assert_eq!(v["timings"], json!({"predicted_n": 2}));
        assert_eq!(v["system_fingerprint"], "b0");
        assert_eq!(v["service_tier"], Value::Null);
        assert_eq!(v["object"], "chat.completion");

        let mut c = Assembler::new(Kind::Completion);
        for (t, l, off) in [("a", -0.1, 0), ("b", -0.2, 1)] {
            c.push(&json!({"id": "x", "choices": [{"index": 0, "text": t, "logprobs": {
                "tokens": [t], "token_logprobs": [l], "top_logprobs": [{t: l}], "text_offset": [off]}}]}));
        }
        assert_eq!(
            c.finish()["choices"][0]["logprobs"],
            json!({"tokens": ["a", "b"], "token_logprobs": [-0.1, -0.2], "top_logprobs": [{"a": -0.1}, {"b": -0.2}], "text_offset": [0, 1]})
        );
    }
}
