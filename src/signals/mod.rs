//! Engine signals: what an inference engine publishes about its own queue on its Prometheus
//! `/metrics` page (`spec.upstream.engineMetrics`), read per endpoint.
//!
//! | engine | waiting | running | KV-cache use |
//! |---|---|---|---|
//! | vLLM | `vllm:num_requests_waiting` | `vllm:num_requests_running` | `vllm:kv_cache_usage_perc` |
//! | SGLang | `sglang:num_queue_reqs` | `sglang:num_running_reqs` | `sglang:token_usage` |
//! | llama.cpp (`--metrics`) | `llamacpp:requests_deferred` | `llamacpp:requests_processing` | none |
//! | TGI | `tgi_queue_size` | `tgi_batch_current_size` | none |
//! | TensorRT-LLM (`trtllm-serve`) | `trtllm_num_requests_waiting` | `trtllm_num_requests_running` | `trtllm_kv_cache_utilization` |
//!
//! This module is the synchronous core: the parser of a page ([`parse`]), which takes the sum
//! of a gauge over its series (one per model in vLLM) and drops any value that is not a finite,
//! non-negative number (a KV-cache use must also be at most 1), and the per-endpoint state
//! ([`EngineSignal`]) that says whether a reading is fresh. The scrape loop ([`scrape`]) is a
//! thin shell that fetches each endpoint's page within a time and size bound.
//!
//! Engine signals are a helper and fail open: a scrape that fails, or a reading older than
//! three intervals, is ignored, and the gateway's own measurements decide alone. The
//! gateway's own in-flight counts stay authoritative (engine gauges lag: vLLM's are reported
//! stuck at 0 for seconds under load).

pub mod scrape;

#[cfg(test)]
mod tests;

use std::time::Duration;

/// Which engine's metric names to read (`spec.upstream.engineMetrics.engine`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    schemars::JsonSchema,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Recognised from the names on the page.
    #[default]
    Auto,
    Vllm,
    Sglang,
    Llamacpp,
    Tgi,
    Trtllm,
}

impl EngineKind {
    /// The engines `Auto` recognises, in the order it tries them.
    pub const KNOWN: [EngineKind; 5] = [
        EngineKind::Vllm,
        EngineKind::Sglang,
        EngineKind::Llamacpp,
        EngineKind::Tgi,
        EngineKind::Trtllm,
    ];

    /// The metric names of (waiting, running, KV-cache use).
    pub fn names(self) -> (&'static str, &'static str, Option<&'static str>) {
        match self {
            EngineKind::Vllm => (
                "vllm:num_requests_waiting",
                "vllm:num_requests_running",
                Some("vllm:kv_cache_usage_perc"),
            ),
            EngineKind::Sglang => (
                "sglang:num_queue_reqs",
                "sglang:num_running_reqs",
                Some("sglang:token_usage"),
            ),
            EngineKind::Llamacpp => (
                "llamacpp:requests_deferred",
                "llamacpp:requests_processing",
                None,
            ),
            EngineKind::Tgi => ("tgi_queue_size", "tgi_batch_current_size", None),
            EngineKind::Trtllm => (
                "trtllm_num_requests_waiting",
                "trtllm_num_requests_running",
                Some("trtllm_kv_cache_utilization"),
            ),
            EngineKind::Auto => ("", "", None),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Auto => "auto",
            EngineKind::Vllm => "vllm",
            EngineKind::Sglang => "sglang",
            EngineKind::Llamacpp => "llamacpp",
            EngineKind::Tgi => "tgi",
            EngineKind::Trtllm => "trtllm",
        }
    }
}

/// One reading of an engine's queue; a field the page lacks (or had no usable value for) is
/// None.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Signals {
    /// Requests the engine holds but has not started (its queue).
    pub waiting: Option<f64>,
    /// Requests in its running batch.
    pub running: Option<f64>,
    /// KV-cache use, 0 to 1.
    pub kv_cache: Option<f64>,
}

/// Why a page gave no reading.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    #[error(
        "no metric of a known engine (vLLM, SGLang, llama.cpp with --metrics, TGI, TensorRT-LLM) on the page"
    )]
    Unknown,
    #[error("none of {engine}'s queue metrics ({waiting}, {running}) has a usable value")]
    Missing {
        engine: &'static str,
        waiting: &'static str,
        running: &'static str,
    },
}

/// The name and value of a sample line of the Prometheus text format (`name{labels} value
/// [timestamp]`); None for comments, blank and malformed lines.
fn sample(line: &str) -> Option<(&str, f64)> {
    let line = line.trim_start();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .unwrap_or(line.len());
    let (name, mut rest) = line.split_at(name_end);
    if rest.starts_with('{') {
        // Skip the labels: a '}' inside a quoted label value does not close them.
        let (mut quoted, mut escaped, mut end) = (false, false, None);
        for (i, c) in rest.char_indices().skip(1) {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '}' if !quoted => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        rest = &rest[end? + 1..];
    }
    let value: f64 = rest.split_ascii_whitespace().next()?.parse().ok()?;
    Some((name, value))
}

/// Reads the queue of `kind` (or, with [`EngineKind::Auto`], of the engine whose metric names
/// are on the page) from a metrics page. A gauge with several series (one per model) is
/// summed; the KV-cache use is the largest. A value that is NaN, infinite or negative is
/// dropped, as is a KV-cache use over 1; a page with no usable waiting or running count is an
/// error.
pub fn parse(page: &str, kind: EngineKind) -> Result<(EngineKind, Signals), ParseError> {
    let kind = match kind {
        EngineKind::Auto => detect(page).ok_or(ParseError::Unknown)?,
        k => k,
    };
    let (waiting_name, running_name, kv_name) = kind.names();
    let mut s = Signals::default();
    let add = |slot: &mut Option<f64>, v: f64| *slot = Some(slot.unwrap_or(0.0) + v);
    for (name, v) in page.lines().filter_map(sample) {
        if !v.is_finite() || v < 0.0 {
            continue;
        }
        if name == waiting_name {
            add(&mut s.waiting, v);
        } else if name == running_name {
            add(&mut s.running, v);
        } else if Some(name) == kv_name && v <= 1.0 {
            s.kv_cache = Some(s.kv_cache.map_or(v, |k: f64| k.max(v)));
        }
    }
    if s.waiting.is_none() && s.running.is_none() {
        return Err(ParseError::Missing {
            engine: kind.as_str(),
            waiting: waiting_name,
            running: running_name,
        });
    }
    Ok((kind, s))
}

/// The engine whose waiting or running metric is on the page.
fn detect(page: &str) -> Option<EngineKind> {
    let names: Vec<&str> = page.lines().filter_map(sample).map(|(n, _)| n).collect();
    EngineKind::KNOWN.into_iter().find(|k| {
        let (w, r, _) = k.names();
        names.iter().any(|n| *n == w || *n == r)
    })
}

/// What a scrape changed about an endpoint's signal, for one log line.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The first usable reading, or the first after failures.
    Up(EngineKind),
    /// The first failure after usable readings (or the first scrape failing).
    Down(String),
}

/// An endpoint's engine signal: its last reading and when it was taken, and the batch the
/// engine ran when its queue last started.
#[derive(Debug, Default)]
pub struct EngineSignal {
    last: Option<(Duration, EngineKind, Signals)>,
    up: Option<bool>,
    batch: Option<f64>,
    /// The engine's slot count, where it publishes one (llama.cpp's `/props` `total_slots`),
    /// and when it was last asked for.
    slots: Option<f64>,
    slots_asked: Option<Duration>,
}

/// How long after a failed `/props` request it is tried again.
pub const SLOTS_RETRY: Duration = Duration::from_secs(30);

/// The slot count in a llama.cpp `/props` answer (`total_slots`, 1 to 65536).
pub fn parse_slots(props: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(props).ok()?;
    let n = v.get("total_slots")?.as_u64()?;
    (1..=65_536).contains(&n).then_some(n as f64)
}

impl EngineSignal {
    /// The result of a scrape at `now`.
    pub fn on_scrape(
        &mut self,
        result: Result<(EngineKind, Signals), String>,
        now: Duration,
    ) -> Option<Change> {
        match result {
            Ok((kind, s)) => {
                let queued = s.waiting.is_some_and(|w| w > 0.0);
                let was_queued = (self.last.as_ref()).is_some_and(|l| l.2.waiting > Some(0.0));
                if queued && !was_queued {
                    self.batch = s.running;
                }
                self.last = Some((now, kind, s));
                (self.up != Some(true)).then(|| {
                    self.up = Some(true);
                    Change::Up(kind)
                })
            }
            Err(e) => (self.up != Some(false)).then(|| {
                self.up = Some(false);
                Change::Down(e)
            }),
        }
    }

    /// The last reading, when it is at most three `interval`s old at `now`; None otherwise
    /// (the signal is then ignored).
    pub fn fresh(&self, now: Duration, interval: Duration) -> Option<Signals> {
        let (at, _, s) = self.last?;
        (now.saturating_sub(at) <= interval * 3).then_some(s)
    }

    /// Whether the engine's batch is full by its last reading (requests waiting, the KV cache
    /// at `kv_full` or above, or as many running as it has slots, where it publishes its slot
    /// count), and its batch: the slot count, else the batch it ran when its queue last
    /// started.
    pub fn full(&self, kv_full: f64) -> (bool, Option<f64>) {
        let Some((_, _, s)) = &self.last else {
            return (false, None);
        };
        let full = s.waiting.is_some_and(|w| w > 0.0)
            || s.kv_cache.is_some_and(|k| k >= kv_full)
            || s.running.zip(self.slots).is_some_and(|(r, n)| r >= n);
        (full, self.slots.or(self.batch))
    }

    /// Whether the engine's slot count should be asked for at `now`: an engine that has one
    /// (llama.cpp), not known yet, not asked for within [`SLOTS_RETRY`].
    pub fn wants_slots(&self, now: Duration) -> bool {
        let llama = matches!(self.last, Some((_, EngineKind::Llamacpp, _)));
        let due = (self.slots_asked).is_none_or(|at| now.saturating_sub(at) >= SLOTS_RETRY);
        llama && self.slots.is_none() && due
    }

    /// The answer to asking for the slot count at `now` (None: no usable answer).
    pub fn on_slots(&mut self, slots: Option<f64>, now: Duration) {
        self.slots_asked = Some(now);
        self.slots = slots.or(self.slots);
    }

    /// The engine's slot count, when known.
    pub fn slots(&self) -> Option<f64> {
        self.slots
    }

    /// When the last reading shows nothing waiting and the KV cache under `kv_full`: the
    /// requests running (None when the engine does not report both counts).
    pub fn open(&self, kv_full: f64) -> Option<f64> {
        let (_, _, s) = self.last.as_ref()?;
        let kv_ok = s.kv_cache.is_none_or(|k| k < kv_full);
        (s.waiting == Some(0.0) && kv_ok)
            .then_some(s.running)
            .flatten()
    }

    /// Whether the last scrape gave a reading.
    pub fn up(&self) -> bool {
        self.up == Some(true)
    }
}
