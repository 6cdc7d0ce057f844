//! Measurement of the requests the gateway relays: how each one ends (the outcome counters,
//! duration and in-flight gauge), the requests still waiting for their first token, and the
//! TTFT/ITL samples of each stream ([`StreamTimer`]) fed to the limiter of the policy in
//! force.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntGauge};
use serde_json::Value;

use super::Gateway;
use super::admission::Active;
use super::assemble::Assembler;
use super::tenancy::{Spend, Used};
use crate::gateway::metrics::{GatewayMetrics, Outcome, RequestMetrics};
use crate::limiter::{KeyId, Signal};
use crate::openai::sse::{EventKind, SseEvent, SseParser, classify_value, measure};
use crate::openai::timing::{StreamTimer, Timing};
use crate::policy::source::Snapshot;

/// Which API a request is for (the `endpoint` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
    /// The Responses API (`/v1/responses`).
    Responses,
    Models,
    Other,
}

impl Api {
    pub fn label(self) -> &'static str {
        match self {
            Api::Chat => "chat_completions",
            Api::Completions => "completions",
            Api::Responses => "responses",
            Api::Models => "models",
            Api::Other => "other",
        }
    }

    /// The upstream path of a completion endpoint.
    pub fn path(self) -> &'static str {
        match self {
            Api::Chat => "/v1/chat/completions",
            Api::Responses => "/v1/responses",
            _ => "/v1/completions",
        }
    }
}

/// Counts one request in `sluice_requests_total`.
pub fn count(m: &GatewayMetrics, model: &str, api: Api, stream: bool, outcome: Outcome) {
    m.requests
        .with_label_values(&[
            model,
            api.label(),
            if stream { "true" } else { "false" },
            outcome.as_str(),
        ])
        .inc();
}

/// One of the gateway's `max_inflight` places, held from before the body is read until the
/// response is complete (or the client is gone).
pub struct InflightPlace(Arc<Gateway>);

impl InflightPlace {
    /// A place, or None when all are taken.
    pub fn acquire(gw: &Arc<Gateway>) -> Option<Self> {
        let held = gw
            .inflight
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let place = InflightPlace(gw.clone());
        (held < gw.max_inflight).then_some(place)
    }
}

impl Drop for InflightPlace {
    fn drop(&mut self) {
        self.0
            .inflight
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Counts an admitted request's outcome, its duration and in-flight gauge, once, when
/// dropped: a response body dropped before it finished (client gone) counts as `cancelled`.
/// It holds the request's in-flight place until then.
pub struct Tracker {
    place: InflightPlace,
    /// The limiter's count of the request, when it was admitted by the latency gate.
    active: Option<Active>,
    model: String,
    api: Api,
    stream: bool,
    shadow: bool,
    outcome: Option<Outcome>,
    /// The request's tenancy, settled when it ends.
    spend: Option<Spend>,
    start: Instant,
    inflight: IntGauge,
    duration: Histogram,
}

impl Tracker {
    pub fn new(
        place: InflightPlace,
        model: &str,
        api: Api,
        stream: bool,
        shadow: bool,
        start: Instant,
    ) -> Self {
        let m = &place.0.metrics;
        let inflight = m.inflight.with_label_values(&[model]);
        inflight.inc();
        Tracker {
            duration: m.request_duration.with_label_values(&[model]),
            model: model.to_owned(),
            api,
            stream,
            shadow,
            outcome: None,
            spend: None,
            start,
            inflight,
            place,
            active: None,
        }
    }

    /// Holds the limiter's count of the request for as long as the request lasts.
    pub fn holding(mut self, active: Active) -> Self {
        self.active = Some(active);
        self
    }

    /// Settles the request's tenancy when it ends.
    pub fn spending(mut self, spend: Option<Spend>) -> Self {
        self.spend = spend;
        self
    }

    /// The request was admitted again elsewhere: holds that count instead (the old one ends).
    pub fn hold_instead(&mut self, active: Active) {
        self.active = Some(active);
    }

    /// Sets the outcome (the first one set wins).
    pub fn finish(&mut self, outcome: Outcome) {
        self.outcome.get_or_insert(outcome);
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let outcome = match self.outcome {
            Some(Outcome::Success) if self.shadow => Outcome::ShadowRejected,
            Some(o) => o,
            None => Outcome::Cancelled,
        };
        if matches!(outcome, Outcome::Success | Outcome::ShadowRejected) {
            self.duration.observe(self.start.elapsed().as_secs_f64());
        }
        count(
            &self.place.0.metrics,
            &self.model,
            self.api,
            self.stream,
            outcome,
        );
        if let Some(s) = self.spend.take() {
            s.finish(&self.place.0, outcome);
        }
        self.inflight.dec();
    }
}

/// A request waiting for its first token, counted in its key's state until the first token
/// arrives or the request ends without one.
struct Waiting {
    snap: Arc<Snapshot>,
    endpoint: usize,
    key: KeyId,
    since: Duration,
    /// Requests of the key in flight when this one began waiting, itself included.
    concurrency: u32,
}

impl Waiting {
    fn begin(snap: &Arc<Snapshot>, endpoint: usize, key: KeyId, now: Duration) -> Self {
        let concurrency = snap.fleet.limiter(endpoint).begin_wait(key, now);
        Waiting {
            snap: snap.clone(),
            endpoint,
            key,
            since: now,
            concurrency,
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let limiter = self.snap.fleet.limiter(self.endpoint);
        limiter.end_wait(self.key, self.since);
    }
}

/// Records the TTFT and ITL samples of one stream into the policy in force.
pub struct Sampler {
    gw: Arc<Gateway>,
    snap: Arc<Snapshot>,
    /// The endpoint of the snapshot's fleet the request went to.
    endpoint: usize,
    key: KeyId,
    model: String,
    timer: StreamTimer,
    /// Where the request's token use is counted, for its tenant.
    used: Option<Arc<Used>>,
    /// Until the first content-bearing chunk.
    waiting: Option<Waiting>,
    metrics: RequestMetrics,
}

impl Sampler {
    /// Starts measuring a request for `model` admitted on `key` of `snap`'s `endpoint`; it
    /// counts as waiting for its first token from now.
    pub fn start(
        gw: &Arc<Gateway>,
        snap: &Arc<Snapshot>,
        endpoint: usize,
        key: KeyId,
        model: &str,
    ) -> Self {
        let now = gw.clock.now();
        let label = snap.fleet.limiter(endpoint).label(key);
        Sampler {
            metrics: RequestMetrics::new(&gw.metrics, label),
            gw: gw.clone(),
            waiting: Some(Waiting::begin(snap, endpoint, key, now)),
            snap: snap.clone(),
            endpoint,
            key,
            model: model.to_owned(),
            timer: StreamTimer::new(now),
            used: None,
        }
    }

    /// Counts the stream's content events (and its usage, if read) into `used`.
    pub fn counting(mut self, used: Option<Arc<Used>>) -> Self {
        self.used = used;
        self
    }

    /// The request goes to `endpoint` (key `key`) of the same snapshot instead: it waits for
    /// its first token there.
    pub fn moved(&mut self, endpoint: usize, key: KeyId) {
        let now = self.gw.clock.now();
        self.waiting = None; // ends the wait where it was
        self.endpoint = endpoint;
        self.key = key;
        self.waiting = Some(Waiting::begin(&self.snap, endpoint, key, now));
    }

    /// The request left for the upstream now.
    pub fn sent(&mut self) {
        self.timer.sent_at(self.gw.clock.now());
    }

    /// `n` content-bearing events arrived together now.
    fn on_content(&mut self, n: usize) {
        if let Some(u) = &self.used {
            u.events(n);
        }
        let now = self.gw.clock.now();
        let Some(timing) = self.timer.on_content(n, now) else {
            return;
        };
        let concurrency = self.waiting.take().map(|w| w.concurrency);
        // A reload swaps the limiters: follow the endpoint's for its thresholds (the key's
        // state is the same one, shared by label). An endpoint the new policy dropped keeps
        // its old limiter: nothing reads it any more.
        if let Some(cur) = self
            .gw
            .store
            .peek()
            .as_ref()
            .filter(|c| !Arc::ptr_eq(c, &self.snap))
            && let Some(e) = cur.fleet.position(self.snap.fleet.label(self.endpoint))
        {
            self.snap = cur.clone();
            self.endpoint = e;
            self.key = self.snap.fleet.limiter(e).key(&self.model);
        }
        let limiter = self.snap.fleet.limiter(self.endpoint);
        match timing {
            Timing::Ttft(ttft) => {
                let _ = match concurrency {
                    Some(c) => limiter.record_first_token(self.key, ttft, c, now),
                    None => limiter.record(self.key, Signal::Ttft, ttft, now),
                };
                self.metrics.ttft.observe(ttft);
            }
            Timing::Gaps { gap, count } => {
                for _ in 0..count {
                    let _ = limiter.record(self.key, Signal::Itl, gap, now);
                    self.metrics.itl.observe(gap);
                }
            }
        }
    }
}

/// Feeds relayed bytes to the parser, the sampler and the assembler; remembers how the stream
/// ended.
pub struct Observer {
    parser: SseParser,
    /// Events over the parser's limit (relayed, not kept): each counts as one carrying
    /// content (an event that large carries output), so the request stops waiting for its
    /// first token and the stream stays measured; an answer being assembled lacks them.
    pub too_large: u32,
    sampler: Option<Sampler>,
    pub saw_done: bool,
    pub saw_error: bool,
    pub assembler: Option<Assembler>,
}

impl Observer {
    pub fn new(sampler: Option<Sampler>, assembler: Option<Assembler>) -> Self {
        Observer {
            parser: SseParser::default(),
            too_large: 0,
            sampler,
            saw_done: false,
            saw_error: false,
            assembler,
        }
    }

    /// The upstream reported the request's usage: counted for its tenant.
    pub fn usage(&self, prompt: u64, completion: u64) {
        if let Some(u) = self.sampler.as_ref().and_then(|s| s.used.as_ref()) {
            u.usage(prompt, completion);
        }
    }

    /// The stream ended with `[DONE]` and without an error event.
    pub fn complete(&self) -> bool {
        self.saw_done && !self.saw_error
    }

    pub fn observe(&mut self, bytes: &[u8]) {
        let mut content = 0;
        let (mut done, mut error, mut too_large) = (false, false, 0);
        let mut usage = None;
        let assembler = &mut self.assembler;
        self.parser.feed(bytes, |event| {
            let event = match event {
                SseEvent::Data(d) => d,
                SseEvent::TooLarge => {
                    too_large += 1;
                    content += 1;
                    return;
                }
            };
            let kind = match assembler.as_mut() {
                // Assembling: parse once, classify and keep the same value.
                Some(a) if event != b"[DONE]" => match serde_json::from_slice::<Value>(event) {
                    Ok(v) => {
                        let kind = classify_value(&v);
                        // (A Responses stream's final event is its Done, and the answer.)
                        if matches!(
                            kind,
                            EventKind::Content | EventKind::Empty | EventKind::Done
                        ) {
                            a.push(&v);
                        }
                        kind
                    }
                    Err(_) => EventKind::Unparsed,
                },
                // Relaying a stream: the usage it carries settles its tokens.
                _ => {
                    let (kind, u) = measure(event);
                    usage = u.or(usage);
                    kind
                }
            };
            match kind {
                EventKind::Content => content += 1,
                EventKind::Done => done = true,
                EventKind::Error => error = true,
                EventKind::Empty | EventKind::Unparsed => {}
            }
        });
        self.saw_done |= done;
        self.saw_error |= error;
        self.too_large += too_large;
        if let Some((prompt, completion)) = usage {
            self.usage(prompt, completion);
        }
        if let Some(s) = self.sampler.as_mut() {
            s.on_content(content);
        }
    }
}
