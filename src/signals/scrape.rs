//! The scrape loop: every `interval`, each endpoint of the policy in force has its metrics page
//! fetched (one request at a time per endpoint, so one connection each; a timeout of three
//! quarters of the interval; at most [`MAX_PAGE_BYTES`]), parsed ([`super::parse`]) and
//! recorded in the endpoint's [`super::EngineSignal`]. One log line per endpoint when its
//! signal is first usable, when it fails, and when it is usable again; the upstream API key is
//! never sent to the metrics page.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::{Change, parse, parse_slots};
use crate::gateway::upstream::HttpClient;
use crate::limiter::Clock;
use crate::policy::source::PolicyStore;

/// The largest metrics page read; a longer one is a failed scrape.
pub const MAX_PAGE_BYTES: usize = 4 << 20;

/// The metrics page of the endpoint at `base`: its scheme and authority, and `path`.
pub fn metrics_url(base: &http::Uri, path: &str) -> Option<http::Uri> {
    http::Uri::builder()
        .scheme(base.scheme()?.clone())
        .authority(base.authority()?.clone())
        .path_and_query(path)
        .build()
        .ok()
}

/// Fetches the page at `url` within `timeout`, at most [`MAX_PAGE_BYTES`] of UTF-8.
pub async fn fetch(
    client: &HttpClient,
    url: http::Uri,
    timeout: Duration,
) -> Result<String, String> {
    let page = async {
        let req = http::Request::get(url)
            .header(http::header::ACCEPT, "text/plain")
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("cannot fetch it: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("it answered {}", resp.status()));
        }
        let mut body = resp.into_body();
        let mut page = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("the page broke off: {e}"))?;
            if let Ok(data) = frame.into_data() {
                if page.len() + data.len() > MAX_PAGE_BYTES {
                    return Err(format!("the page is over {MAX_PAGE_BYTES} bytes"));
                }
                page.extend_from_slice(&data);
            }
        }
        String::from_utf8(page).map_err(|_| "the page is not UTF-8".to_owned())
    };
    tokio::time::timeout(timeout, page)
        .await
        .map_err(|_| format!("no complete page within {} ms", timeout.as_millis()))?
}

/// Scrapes the endpoints of the policy in force until the task is dropped (idle while the
/// policy has no `engineMetrics`); calls `on_room` after a round in which an engine reported
/// nothing waiting.
pub async fn run(
    store: Arc<PolicyStore>,
    client: HttpClient,
    clock: Arc<dyn Clock>,
    on_room: impl Fn(),
) {
    loop {
        let started = Instant::now();
        let Some(snap) = store.load() else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let Some(config) = snap.config.upstream.engine_metrics.clone() else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let timeout = config.interval * 3 / 4;
        let now = clock.now();
        let scrapes = (0..snap.fleet.len()).map(|i| {
            let (client, path, snap) = (&client, &config.path, &snap);
            // llama.cpp publishes its slot count on /props, not on its metrics page.
            let props = snap.fleet.signal(i).lock().wants_slots(now);
            async move {
                let url = |path| metrics_url(snap.endpoint_url(i), path);
                let result = match url(path) {
                    Some(url) => fetch(client, url, timeout).await,
                    None => Err("the endpoint's URL has no host".to_owned()),
                };
                let slots = match url("/props").filter(|_| props) {
                    Some(u) => Some(
                        fetch(client, u, timeout)
                            .await
                            .ok()
                            .and_then(|p| parse_slots(&p)),
                    ),
                    None => None,
                };
                (i, result, slots)
            }
        });
        let mut opened = false;
        for (i, page, slots) in futures_util::future::join_all(scrapes).await {
            let reading = page.and_then(|p| parse(&p, config.engine).map_err(|e| e.to_string()));
            let now = clock.now();
            let ok = reading.is_ok();
            let mut signal = snap.fleet.signal(i).lock();
            if let Some(slots) = slots {
                signal.on_slots(slots, now);
                if let Some(n) = slots {
                    tracing::info!(upstream = %snap.fleet.label(i), slots = n, "engine slot count read from /props: its batch is full when that many run");
                }
            }
            let change = signal.on_scrape(reading, now);
            if ok {
                // Valid for three intervals: if scrapes stop, the word lapses by itself.
                let kv_full = crate::limiter::engine::KV_FULL;
                let ((full, batch), open) = (signal.full(kv_full), signal.open(kv_full));
                let gate = snap.fleet.limiter(i).engine();
                gate.report(full, batch, open, now + config.interval * 3);
                opened |= open.is_some();
            }
            drop(signal);
            let upstream = snap.fleet.label(i);
            match change {
                None => {}
                Some(Change::Up(kind)) => tracing::info!(
                    %upstream,
                    engine = kind.as_str(),
                    "engine metrics read: a full batch caps admission at the batch it runs"
                ),
                Some(Change::Down(error)) => tracing::warn!(
                    %upstream,
                    %error,
                    "engine metrics unusable: ignored, the gateway's own measurements decide alone"
                ),
            }
        }
        if opened {
            // An engine with room: requests waiting in the admission queue may go.
            on_room();
        }
        tokio::time::sleep(config.interval.saturating_sub(started.elapsed())).await;
    }
}
