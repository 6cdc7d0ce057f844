//! Limiter hot path: one admission decision plus one latency sample, single-threaded and with
//! two threads contending on one key and on many keys, against a naive baseline
//! (`Mutex<HashMap<String, _>>`, one lock for everything, the key hashed under it) written for
//! this comparison. Both sides run the same estimator maths, so the difference is the
//! structure: per-key locks on separate cache lines and lookups outside any lock.
//!
//! Run: `cargo bench --bench limiter`. Results: docs/benchmarks.md.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::limiter::decision::reject_probability;
use sluice::limiter::fleet::Fleet;
use sluice::limiter::{
    Estimator, Limiter, LimiterConfig, Mode, Priority, Scope, Shedding, Signal, SplitMix64,
    Thresholds, Uniform,
};

const MODELS: [&str; 8] = [
    "meta-llama/Llama-3.1-8B-Instruct",
    "mistralai/Mistral-7B-Instruct-v0.3",
    "Qwen/Qwen2.5-7B-Instruct",
    "google/gemma-2-9b-it",
    "microsoft/Phi-3-mini-4k-instruct",
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
    "ibm-granite/granite-3.0-8b-instruct",
    "tiiuae/falcon-7b-instruct",
];

fn thresholds() -> Thresholds {
    Thresholds {
        ttft: 1.0,
        itl: 0.05,
        time_constant: 15.0,
    }
}

fn config() -> LimiterConfig {
    LimiterConfig {
        mode: Mode::Enforce,
        scope: Scope::PerModel,
        defaults: thresholds(),
        models: MODELS
            .iter()
            .map(|m| (m.to_string(), thresholds()))
            .collect(),
        shedding: Shedding::default(),
    }
}

/// The naive baseline: one global lock around a String-keyed map.
struct Naive {
    map: Mutex<HashMap<String, [Estimator; 2]>>,
    th: Thresholds,
    shed: Shedding,
}

impl Naive {
    fn new() -> Self {
        Naive {
            map: Mutex::new(HashMap::new()),
            th: thresholds(),
            shed: Shedding::default(),
        }
    }

    fn decide_and_record(&self, model: &str, now: f64, sample: f64, rng: &mut SplitMix64) -> bool {
        let mut map = self.map.lock().unwrap();
        let state = map.entry(model.to_owned()).or_default();
        let tau = self.th.time_constant;
        let r = (state[0].read(now, tau) / self.th.ttft).max(state[1].read(now, tau) / self.th.itl);
        let p = reject_probability(r, self.shed.max_reject_probability, self.shed.ramp);
        let admit = p == 0.0 || rng.next_f64() >= p;
        state[1]
            .record(sample, now, tau, self.shed.max_evidence)
            .unwrap();
        admit
    }
}

/// A limiter with every model busy, as under load: 10 requests in flight, the engine last
/// met the thresholds at 8 (so no work-conservation shortcut; past the concurrency ceiling
/// of 8, without a queue, so the ceiling's conditions are all evaluated and none binds):
/// every decision takes the whole path.
fn busy_limiter() -> Limiter {
    let l = Limiter::new(config());
    make_busy(&l);
    l
}

fn make_busy(l: &Limiter) {
    for m in MODELS {
        let k = l.key(m);
        for _ in 0..10 {
            l.begin_request(k);
        }
        l.record(k, Signal::Itl, 0.02, Duration::ZERO).unwrap();
        l.record_first_token(k, 0.1, 8, Duration::ZERO).unwrap();
    }
}

/// sluice: resolve the key, decide, record one ITL sample.
#[inline]
fn sluice_op(l: &Limiter, model: &str, now: Duration, sample: f64, rng: &mut SplitMix64) -> bool {
    let k = l.key(model);
    let d = l.decide(k, Priority::Standard, now, rng);
    l.record(k, Signal::Itl, sample, now).unwrap();
    d.admitted()
}

fn single_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("decide+record/1 thread");
    let l = busy_limiter();
    let naive = Naive::new();
    let mut rng = SplitMix64::new(1);
    let mut t = 0u64;
    g.bench_function("sluice", |b| {
        b.iter(|| {
            t += 100;
            sluice_op(
                &l,
                black_box(MODELS[0]),
                Duration::from_nanos(t),
                0.02,
                &mut rng,
            )
        })
    });
    g.bench_function("naive Mutex<HashMap>", |b| {
        b.iter(|| {
            t += 100;
            naive.decide_and_record(black_box(MODELS[0]), t as f64 * 1e-9, 0.02, &mut rng)
        })
    });
    // The decision alone on a resolved key (what a request pays before going upstream).
    let k = l.key(MODELS[0]);
    g.bench_function("sluice decide only", |b| {
        b.iter(|| {
            t += 100;
            l.decide(
                black_box(k),
                Priority::Standard,
                Duration::from_nanos(t),
                &mut rng,
            )
        })
    });
    // A request's whole count in flight: admitted and counted under one lock, then ended;
    // against deciding and counting separately (before #25, and racy).
    g.bench_function("sluice admit+end", |b| {
        b.iter(|| {
            t += 100;
            let now = Duration::from_nanos(t);
            let d = l.admit(black_box(k), Priority::Standard, now, &mut rng);
            if d.admitted() {
                l.end_request(k, now);
            }
            d
        })
    });
    g.bench_function("sluice decide+begin+end (before)", |b| {
        b.iter(|| {
            t += 100;
            let now = Duration::from_nanos(t);
            let d = l.decide(black_box(k), Priority::Standard, now, &mut rng);
            if d.admitted() {
                l.begin_request(k);
                l.end_request(k, now);
            }
            d
        })
    });
    g.finish();
}

/// Runs `op(thread, i)` `iters` times on each of two threads; returns the wall time.
fn two_threads<F>(iters: u64, op: F) -> Duration
where
    F: Fn(usize, u64, &mut SplitMix64) + Send + Sync + 'static,
{
    let op = Arc::new(op);
    let barrier = Arc::new(Barrier::new(3));
    let handles: Vec<_> = (0..2)
        .map(|thread| {
            let (op, barrier) = (op.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut rng = SplitMix64::new(thread as u64 + 7);
                barrier.wait();
                for i in 0..iters {
                    op(thread, i, &mut rng);
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for h in handles {
        h.join().unwrap();
    }
    start.elapsed()
}

fn contended(c: &mut Criterion) {
    for (name, spread) in [("one key", false), ("many keys", true)] {
        let mut g = c.benchmark_group(format!("decide+record/2 threads/{name}"));
        let model = move |thread: usize, i: u64| {
            if spread {
                MODELS[(thread * 4 + (i as usize & 3)) % MODELS.len()]
            } else {
                MODELS[0]
            }
        };
        let l = Arc::new(busy_limiter());
        g.bench_function("sluice", |b| {
            b.iter_custom(|iters| {
                let l = l.clone();
                two_threads(iters, move |th, i, rng| {
                    black_box(sluice_op(
                        &l,
                        model(th, i),
                        Duration::from_nanos(i * 100),
                        0.02,
                        rng,
                    ));
                })
            })
        });
        let naive = Arc::new(Naive::new());
        g.bench_function("naive Mutex<HashMap>", |b| {
            b.iter_custom(|iters| {
                let naive = naive.clone();
                two_threads(iters, move |th, i, rng| {
                    black_box(naive.decide_and_record(model(th, i), i as f64 * 1e-7, 0.02, rng));
                })
            })
        });
        g.finish();
    }
}

/// A fleet of `n` endpoints, each as busy as [`busy_limiter`] (the adaptive path in full on
/// every endpoint looked at).
fn busy_fleet(n: usize) -> Fleet {
    let labels: Vec<String> = (0..n).map(|i| format!("10.0.0.{i}:8000")).collect();
    let f = Fleet::new(&config(), &labels);
    for i in 0..n {
        make_busy(f.limiter(i));
    }
    f
}

/// Admitting (and ending) a request on a fleet of 1, 3 and 16 endpoints against the limiter
/// alone: what routing per endpoint adds to a request.
fn fleet(c: &mut Criterion) {
    let mut g = c.benchmark_group("admit+end");
    let mut rng = SplitMix64::new(1);
    let mut t = 0u64;
    let l = busy_limiter();
    g.bench_function("limiter alone (key + admit + end)", |b| {
        b.iter(|| {
            t += 100;
            let now = Duration::from_nanos(t);
            let k = l.key(black_box(MODELS[0]));
            let d = l.admit(k, Priority::Standard, now, &mut rng);
            if d.admitted() {
                l.end_request(k, now);
            }
            d
        })
    });
    for n in [1, 3, 16] {
        let f = busy_fleet(n);
        g.bench_function(format!("fleet of {n}"), |b| {
            b.iter(|| {
                t += 100;
                let now = Duration::from_nanos(t);
                let r = f.admit(black_box(MODELS[0]), Priority::Standard, now, &mut rng);
                if r.decision.admitted() {
                    f.limiter(r.endpoint).end_request(r.key, now);
                }
                r.decision
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = single_thread, contended, fleet
}
criterion_main!(benches);
