//! The gauges computed when scraped: per key of the limiter (averages, thresholds, pressure,
//! reject probability), the policy source's state, and how unary requests reach the upstream.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, GaugeVec, IntCounterVec, IntGaugeVec, Opts};

use std::time::Duration;

use crate::gateway::unary::UnaryModes;
use crate::limiter::fleet::Fleet;
use crate::limiter::{Clock, KeyReading};
use crate::policy::source::PolicyStore;

/// The limiter's and the policy source's gauges, computed from the [`PolicyStore`] when
/// scraped.
pub(super) struct StateCollector {
    store: Arc<PolicyStore>,
    clock: Arc<dyn Clock>,
    unary: Arc<UnaryModes>,
    descs: Vec<Desc>,
}

/// Per-model gauges: name and help.
pub(super) const MODEL_GAUGES: [(&str, &str); 11] = [
    (
        "sluice_ttft_ema_seconds",
        "Moving average of TTFT (samples clamped at ramp × threshold).",
    ),
    (
        "sluice_itl_ema_seconds",
        "Moving average of ITL (samples clamped at ramp × threshold).",
    ),
    (
        "sluice_waiting_requests",
        "Admitted requests still waiting for their first token.",
    ),
    (
        "sluice_ttft_waiting_estimate_seconds",
        "TTFT estimated from the requests waiting for their first token (twice their mean age); the TTFT signal is the larger of this and the moving average.",
    ),
    (
        "sluice_ttft_threshold_seconds",
        "TTFT threshold of the policy.",
    ),
    (
        "sluice_itl_threshold_seconds",
        "ITL threshold of the policy.",
    ),
    (
        "sluice_pressure_ratio",
        "max(TTFT signal / TTFT threshold, ITL average / ITL threshold), where the TTFT signal is the larger of the moving average and the waiting-request estimate; above 1 the gate sheds.",
    ),
    (
        "sluice_reject_probability",
        "Probability that a standard-priority request is shed now (pressure ramp and shedding integral).",
    ),
    (
        "sluice_limiter_in_flight_requests",
        "Admitted requests of the key not finished yet, as the limiter counts them.",
    ),
    (
        "sluice_good_concurrency",
        "Requests in flight G at which the engine last met both thresholds (learned from first tokens, forgotten over time): below it nothing is shed; once a queue starts, a request finding max(G, 4) or more in flight is shed with probability maxRejectProbability.",
    ),
    (
        "sluice_thresholds_unreachable",
        "1 while the engine misses a threshold even with at most 4 requests in flight: the limiter compares that signal with 1.5 times the low-concurrency latency instead. Raise the threshold.",
    ),
];

/// Per-endpoint gauges (labels `upstream`, `model`): name and help.
pub(super) const UPSTREAM_GAUGES: [(&str, &str); 4] = [
    (
        "sluice_upstream_in_flight_requests",
        "Admitted requests of the model on the endpoint not finished yet.",
    ),
    (
        "sluice_upstream_waiting_requests",
        "Requests of the model on the endpoint still waiting for their first token.",
    ),
    (
        "sluice_upstream_pressure_ratio",
        "The endpoint's pressure for the model (as sluice_pressure_ratio, from its own averages).",
    ),
    (
        "sluice_upstream_concurrency_ceiling",
        "The endpoint's concurrency ceiling for the model: max(good concurrency, 4); once a queue starts, a request finding this many in flight there finds no room.",
    ),
];

pub(super) const UPSTREAM_ROUTED: (&str, &str) = (
    "sluice_upstream_requests_total",
    "Requests routed to each endpoint of the upstream (admitted there; shadow-rejected included), by its pod name (discovered) or host:port.",
);

pub(super) const UPSTREAM_UP: (&str, &str) = (
    "sluice_upstream_up",
    "1 while the endpoint takes new requests; 0 while it is ejected after failures in a row (connections refused, 5xx answers).",
);

pub(super) const POLICY_GAUGES: [(&str, &str); 4] = [
    (
        "sluice_policy_generation",
        "Generation of the policy in force (metadata.generation, or reload count for files).",
    ),
    (
        "sluice_policy_last_reload_successful",
        "1 if the last policy load succeeded, 0 if the last good policy is kept after an error.",
    ),
    (
        "sluice_policy_source_up",
        "1 while the policy source (file or Kubernetes watch) is readable.",
    ),
    (
        "sluice_policy_present",
        "1 while the policy object exists; 0 after it was deleted (the last policy keeps serving).",
    ),
];

/// Engine signals per endpoint (present only with `spec.upstream.engineMetrics`).
pub(super) const ENGINE_GAUGES: [(&str, &str); 5] = [
    (
        "sluice_engine_metrics_up",
        "1 while the endpoint's engine metrics page gives a reading at most three intervals old; 0 while it fails or is stale (the signal is then ignored: the gateway's own measurements decide alone).",
    ),
    (
        "sluice_engine_waiting_requests",
        "Requests the engine reports queued (not started), from its last fresh reading.",
    ),
    (
        "sluice_engine_running_requests",
        "Requests the engine reports in its running batch, from its last fresh reading.",
    ),
    (
        "sluice_engine_kv_cache_usage_ratio",
        "KV-cache use the engine reports (0 to 1), from its last fresh reading; absent for engines that publish none (llama.cpp, TGI).",
    ),
    (
        "sluice_engine_slots",
        "The engine's batch slots where it publishes them (llama.cpp's /props total_slots): its batch is full when that many run.",
    ),
];

/// The engine-signal series of every endpoint: up, and the fresh reading.
fn engine_families(fleet: &Fleet, now: Duration, interval: Duration) -> Vec<MetricFamily> {
    let gauges = ENGINE_GAUGES
        .map(|(name, help)| GaugeVec::new(Opts::new(name, help), &["upstream"]).unwrap());
    for (i, (label, _)) in fleet.iter().enumerate() {
        let signal = fleet.signal(i).lock();
        let fresh = signal.fresh(now, interval);
        let up = signal.up() && fresh.is_some();
        gauges[0]
            .with_label_values(&[label])
            .set(f64::from(u8::from(up)));
        let Some(s) = fresh.filter(|_| up) else {
            continue;
        };
        let slots = signal.slots();
        for (g, v) in gauges[1..]
            .iter()
            .zip([s.waiting, s.running, s.kv_cache, slots])
        {
            if let Some(v) = v {
                g.with_label_values(&[label]).set(v);
            }
        }
    }
    gauges.iter().flat_map(|g| g.collect()).collect()
}

/// Discovery of a Service's endpoints (present only while the policy discovers one).
pub(super) const DISCOVERY_GAUGES: [(&str, &str); 2] = [
    (
        "sluice_upstream_discovery_up",
        "1 while the endpoints of the upstream Service come from a working EndpointSlice watch; 0 while the watch fails (no Kubernetes configuration, RBAC, API server down) and the gateway keeps what it knew or serves the Service URL.",
    ),
    (
        "sluice_upstream_discovered_endpoints",
        "Ready endpoints of the upstream Service served as a fleet; 0 while the Service URL itself is served (discovery not synced or failing) and while the Service has none ready (503 no_endpoints).",
    ),
];

pub(super) const RELOADS: (&str, &str) = (
    "sluice_policy_reloads_total",
    "Policy loads by result: success, error (invalid policy), watch_error (an incident of the Kubernetes watch).",
);

impl StateCollector {
    pub(super) fn new(
        store: Arc<PolicyStore>,
        clock: Arc<dyn Clock>,
        unary: Arc<UnaryModes>,
    ) -> Self {
        let mut descs = Vec::new();
        for (name, help) in MODEL_GAUGES {
            descs.extend(model_gauge(name, help).desc().into_iter().cloned());
        }
        for (name, help) in POLICY_GAUGES.into_iter().chain(DISCOVERY_GAUGES) {
            descs.extend(Gauge::new(name, help).unwrap().desc().into_iter().cloned());
        }
        for (name, help) in ENGINE_GAUGES {
            let g = GaugeVec::new(Opts::new(name, help), &["upstream"]).unwrap();
            descs.extend(g.desc().into_iter().cloned());
        }
        for (name, help) in UPSTREAM_GAUGES {
            let g = GaugeVec::new(Opts::new(name, help), &["upstream", "model"]).unwrap();
            descs.extend(g.desc().into_iter().cloned());
        }
        let routed = IntCounterVec::new(
            Opts::new(UPSTREAM_ROUTED.0, UPSTREAM_ROUTED.1),
            &["upstream"],
        );
        descs.extend(routed.unwrap().desc().into_iter().cloned());
        let up = IntGaugeVec::new(Opts::new(UPSTREAM_UP.0, UPSTREAM_UP.1), &["upstream"]);
        descs.extend(up.unwrap().desc().into_iter().cloned());
        descs.extend(reloads().desc().into_iter().cloned());
        descs.extend(unary_mode().desc().into_iter().cloned());
        StateCollector {
            store,
            clock,
            unary,
            descs,
        }
    }
}

/// Per-model readings of the whole fleet: with one endpoint, its readings; with several, the
/// counts (waiting, in flight, good concurrency) summed over the endpoints, and the averages,
/// the pressure and the reject probability of the endpoint with the least pressure (where the
/// next request goes); unreachable when it is on any endpoint.
fn fleet_readings(fleet: &Fleet, now: Duration) -> Vec<KeyReading<'_>> {
    let mut by_model: Vec<KeyReading<'_>> = Vec::new();
    for (_, limiter) in fleet.iter() {
        for r in limiter.readings(now) {
            match by_model.iter_mut().find(|m| m.label == r.label) {
                None => by_model.push(r),
                Some(m) => {
                    let (waiting, in_flight) = (m.waiting + r.waiting, m.in_flight + r.in_flight);
                    let good = m.good_concurrency + r.good_concurrency;
                    let unreachable = m.unreachable || r.unreachable;
                    if r.pressure < m.pressure {
                        *m = r;
                    }
                    m.waiting = waiting;
                    m.in_flight = in_flight;
                    m.good_concurrency = good;
                    m.unreachable = unreachable;
                }
            }
        }
    }
    by_model
}

/// The per-endpoint series (`upstream` = the endpoint's host:port): requests routed, up, and per
/// model in flight, waiting, pressure and the concurrency ceiling. An endpoint that leaves
/// the policy leaves the scrape.
fn upstream_families(fleet: &Fleet, now: Duration) -> Vec<MetricFamily> {
    let routed = IntCounterVec::new(
        Opts::new(UPSTREAM_ROUTED.0, UPSTREAM_ROUTED.1),
        &["upstream"],
    )
    .unwrap();
    let up = IntGaugeVec::new(Opts::new(UPSTREAM_UP.0, UPSTREAM_UP.1), &["upstream"]).unwrap();
    let gauges = UPSTREAM_GAUGES
        .map(|(name, help)| GaugeVec::new(Opts::new(name, help), &["upstream", "model"]).unwrap());
    for (i, (label, limiter)) in fleet.iter().enumerate() {
        routed.with_label_values(&[label]).inc_by(fleet.routed(i));
        up.with_label_values(&[label])
            .set(i64::from(fleet.up(i, now)));
        for r in limiter.readings(now) {
            let values = [
                f64::from(r.in_flight),
                f64::from(r.waiting),
                r.pressure,
                r.ceiling,
            ];
            for (g, v) in gauges.iter().zip(values) {
                g.with_label_values(&[label, r.label]).set(v);
            }
        }
    }
    let mut out = routed.collect();
    out.extend(up.collect());
    for g in &gauges {
        out.extend(g.collect());
    }
    out
}

fn model_gauge(name: &str, help: &str) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), &["model"]).unwrap()
}

fn unary_mode() -> IntGaugeVec {
    IntGaugeVec::new(
        Opts::new(
            "sluice_unary_mode",
            "How unary requests reach the policy's upstream: how many of its endpoints are in each mode (1 for the mode in use with one upstream). assembled: asked for as a stream and measured; passthrough: relayed as they are, not measured (streamUnary false, or the upstream's streams lack usage); probing: passed through until a one-token probe shows whether the upstream's streams carry usage.",
        ),
        &["mode"],
    )
    .unwrap()
}

fn reloads() -> IntCounterVec {
    IntCounterVec::new(Opts::new(RELOADS.0, RELOADS.1), &["result"]).unwrap()
}

impl Collector for StateCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (snap, discovery) = self.store.load_with_discovery();
        let mut out = Vec::new();
        let gauges = MODEL_GAUGES.map(|(name, help)| model_gauge(name, help));
        if let Some(s) = &snap {
            let now = self.clock.now();
            for r in fleet_readings(&s.fleet, now) {
                let values = [
                    r.ttft,
                    r.itl,
                    f64::from(r.waiting),
                    r.waiting_ttft,
                    r.thresholds.ttft,
                    r.thresholds.itl,
                    r.pressure,
                    r.reject_probability,
                    f64::from(r.in_flight),
                    r.good_concurrency,
                    f64::from(u8::from(r.unreachable)),
                ];
                for (g, v) in gauges.iter().zip(values) {
                    g.with_label_values(&[r.label]).set(v);
                }
            }
            out.extend(upstream_families(&s.fleet, now));
            if let Some(e) = &s.config.upstream.engine_metrics {
                out.extend(engine_families(&s.fleet, now, e.interval));
            }
        }
        for g in &gauges {
            out.extend(g.collect());
        }
        let st = self.store.status();
        let flag = |b: &std::sync::atomic::AtomicBool| f64::from(u8::from(b.load(Relaxed)));
        let values = [
            snap.as_ref().map_or(0.0, |s| s.generation as f64),
            flag(&st.last_ok),
            flag(&st.up),
            flag(&st.present),
        ];
        for ((name, help), v) in POLICY_GAUGES.into_iter().zip(values) {
            let g = Gauge::new(name, help).unwrap();
            g.set(v);
            out.extend(g.collect());
        }
        if let Some((up, endpoints)) = discovery {
            for ((name, help), v) in DISCOVERY_GAUGES
                .into_iter()
                .zip([f64::from(u8::from(up)), endpoints as f64])
            {
                let g = Gauge::new(name, help).unwrap();
                g.set(v);
                out.extend(g.collect());
            }
        }
        let reloads = reloads();
        for (result, n) in [
            ("success", &st.applied),
            ("error", &st.rejected),
            ("watch_error", &st.watch_errors),
        ] {
            reloads.with_label_values(&[result]).inc_by(n.load(Relaxed));
        }
        out.extend(reloads.collect());
        if let Some(s) = &snap {
            // Each endpoint of the fleet is in one mode (a fleet of pods probes each).
            let now = self.clock.now();
            let modes = ["assembled", "passthrough", "probing"];
            let mut counts = [0i64; 3];
            for i in 0..s.fleet.len() {
                let current = if s.config.upstream.stream_unary {
                    self.unary.mode(s.endpoint_url(i), now)
                } else {
                    "passthrough"
                };
                if let Some(k) = modes.iter().position(|m| *m == current) {
                    counts[k] += 1;
                }
            }
            let mode = unary_mode();
            for (m, n) in modes.iter().zip(counts) {
                mode.with_label_values(&[m]).set(n);
            }
            out.extend(mode.collect());
        }
        out
    }
}
