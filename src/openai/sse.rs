//! Incremental parsing of OpenAI server-sent-event streams, for measuring them as they pass
//! through: which events carry content (a token), which one ends the stream, and the JSON of
//! each event when a unary response is being assembled.
//!
//! An event ends with a blank line (lines end with CR, LF or CRLF, mixed); its `data:` lines
//! are joined.
//! Content-bearing: a chat delta with non-empty `content`, `reasoning_content` or
//! `tool_calls`, a completion choice with non-empty `text`, or a Responses API
//! `response.output_text.delta` (or reasoning or function-call arguments delta) with a
//! non-empty `delta`. The role chunk, the finish chunk and the usage chunk carry none. A
//! Responses stream has no `[DONE]`: its `response.completed` (or `response.incomplete`) event
//! ends it, and `response.failed` or an `error` event is an error.
//!
//! An event's token usage is read where it has one: the chunk's `usage` (the last chunk of a
//! stream whose request set `stream_options.include_usage`; on every chunk with vLLM's
//! continuous usage stats, the last one counting) or a Responses event's `response.usage`. A
//! `usage` of another shape is ignored, never a reason to miss the event's tokens.

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
    /// A chat or completion chunk's usage (the last chunk, when the request asked for
    /// `stream_options.include_usage`).
    #[serde(default)]
    usage: Option<Lenient<UsageView>>,
    /// A Responses API event's response (`response.completed` carries its usage).
    #[serde(default)]
    response: Option<Lenient<ResponseView>>,
}

/// A field read when it has the expected shape, else ignored: an odd `usage` must not make
/// the event's tokens go uncounted.
#[derive(Deserialize)]
#[serde(untagged)]
enum Lenient<T> {
    Read(T),
    Other(IgnoredAny),
}

impl<T> Lenient<T> {
    fn read(&self) -> Option<&T> {
        match self {
            Lenient::Read(t) => Some(t),
            Lenient::Other(_) => None,
        }
    }
}

#[derive(Deserialize)]
struct ResponseView {
    #[serde(default)]
    usage: Option<Lenient<UsageView>>,
}

/// Token counts, as chat and completions name them or as the Responses API does.
#[derive(Deserialize)]
struct UsageView {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: Option<u64>,
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
    measure(data).0
}

/// Classifies the JSON payload of one event and reads the token usage it reports, if any:
/// prompt and completion tokens (`input_tokens` and `output_tokens` in a Responses API
/// event's `response`).
pub fn measure(data: &[u8]) -> (EventKind, Option<(u64, u64)>) {
    if data == b"[DONE]" {
        return (EventKind::Done, None);
    }
    match serde_json::from_slice::<ChunkView>(data) {
        Ok(chunk) => (chunk.kind(), chunk.usage()),
        Err(_) => (EventKind::Unparsed, None),
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
    fn usage(&self) -> Option<(u64, u64)> {
        let usage = match &self.response {
            Some(r) => r.read()?.usage.as_ref()?,
            None => self.usage.as_ref()?,
        };
        let u = usage.read()?;
        Some((u.prompt_tokens?, u.completion_tokens?))
    }

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

/// One event of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SseEvent<'a> {
    /// The event's `data:` lines, joined with `\n` (events without data are not reported).
    Data(&'a [u8]),
    /// An event longer than [`MAX_EVENT_BYTES`]: its bytes were relayed but not kept, and
    /// parsing went on after it.
    TooLarge,
}

/// Splits a byte stream into events, as the SSE specification reads it: lines end with CR,
/// LF or CRLF (mixed freely, and a CRLF may be split between two reads), an empty line ends
/// an event, and only `data:` fields are kept. Memory is bounded: an event over
/// [`MAX_EVENT_BYTES`] is skipped to its end and reported as [`SseEvent::TooLarge`].
#[derive(Debug, Default)]
pub struct SseParser {
    /// The current line, until its line ending arrives.
    line: Vec<u8>,
    /// Whether the current line has any bytes (kept or not).
    line_started: bool,
    /// The current event's `data:` values, joined with `\n`.
    data: Vec<u8>,
    has_data: bool,
    /// The last byte read was a CR: an LF right after it ends the same line.
    after_cr: bool,
    /// The current event outgrew [`MAX_EVENT_BYTES`]; its bytes are dropped until it ends.
    skipping: bool,
}

/// Longest event the parser keeps (bytes); a longer one is skipped, not measured.
pub const MAX_EVENT_BYTES: usize = 4 << 20;

impl SseParser {
    /// Feeds bytes; calls `on_event` for each event they complete.
    pub fn feed(&mut self, bytes: &[u8], mut on_event: impl FnMut(SseEvent<'_>)) {
        let mut i = 0;
        if self.after_cr && !bytes.is_empty() {
            self.after_cr = false;
            if bytes[0] == b'\n' {
                i = 1;
            }
        }
        while i < bytes.len() {
            let rest = &bytes[i..];
            let Some(p) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
                self.push(rest);
                break;
            };
            self.push(&rest[..p]);
            i += p + 1;
            if rest[p] == b'\r' {
                match bytes.get(i) {
                    Some(b'\n') => i += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            self.end_line(&mut on_event);
        }
    }

    /// Bytes of the current line.
    fn push(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.line_started = true;
        if self.skipping {
            return;
        }
        if self.line.len() + bytes.len() > MAX_EVENT_BYTES {
            self.skip();
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    fn skip(&mut self) {
        self.skipping = true;
        self.line = Vec::new();
        self.data = Vec::new();
        self.has_data = false;
    }

    fn end_line(&mut self, on_event: &mut impl FnMut(SseEvent<'_>)) {
        if !self.line_started {
            // An empty line: the event ends.
            if std::mem::take(&mut self.skipping) {
                on_event(SseEvent::TooLarge);
            } else if self.has_data && !self.data.is_empty() {
                on_event(SseEvent::Data(&self.data));
            }
            self.data.clear();
            self.has_data = false;
            return;
        }
        self.line_started = false;
        if !self.skipping
            && let Some(value) = self.line.strip_prefix(b"data:")
        {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            if self.data.len() + value.len() + 1 > MAX_EVENT_BYTES {
                self.skip();
            } else {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
        }
        self.line.clear();
    }
}

#[cfg(test)]
mod tests;
