//! Fair shedding's cost per request (`gateway::fair`): one decision (`offer`: the tenant's
//! rate updated and compared with the model's fair share, under one lock: all an admitted
//! request pays) and, for a shed request, its second lock (`shed`), with 1, 10 and 100 active
//! tenants on a model; and the fair
//! share's recomputation (a sort over the tenants), which runs at most every 100 ms, forced
//! on every call to show its cost.
//!
//! And the whole decision a request pays, the limiter's with and without fairness before it.
//!
//! Run: `cargo bench --bench fair`. Results: docs/benchmarks.md.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::gateway::fair::{self, FairBook};
use sluice::limiter::{
    Limiter, LimiterConfig, Mode, Priority, Scope, Shedding, Signal, SplitMix64, Thresholds,
};

const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// A book where `n` tenants have used the model for a minute, the first one heavily (so a
/// fair share is in force), and their names.
fn book(n: usize) -> (FairBook, Vec<Arc<str>>) {
    let book = FairBook::default();
    let names: Vec<Arc<str>> = (0..n).map(|i| format!("tenant-{i:03}").into()).collect();
    for step in 0..600u64 {
        let now = Duration::from_millis(step * 100);
        for (i, t) in names.iter().enumerate() {
            let cost = if i == 0 { 50_000 } else { 500 };
            let (under, c) = book.offer(MODEL, t, 1.0, (cost, Some(0)), now);
            if !under && i == 0 && step % 4 != 0 {
                book.shed(MODEL, t, (c, now), now);
            }
        }
    }
    (book, names)
}

fn per_request(c: &mut Criterion) {
    let mut g = c.benchmark_group("fair");
    for n in [1, 10, 100] {
        let (book, names) = book(n);
        let mut t = 60_000_000_000u64; // ns
        let mut i = 0;
        g.bench_function(format!("offer/{n} tenants"), |b| {
            b.iter(|| {
                t += 100;
                i = (i + 1) % names.len();
                let now = Duration::from_nanos(t);
                book.offer(black_box(MODEL), &names[i], 1.0, (300, Some(200)), now)
            })
        });
        g.bench_function(format!("offer+shed/{n} tenants"), |b| {
            b.iter(|| {
                t += 100;
                i = (i + 1) % names.len();
                let now = Duration::from_nanos(t);
                let (under, cost) =
                    book.offer(black_box(MODEL), &names[i], 1.0, (300, Some(200)), now);
                book.shed(MODEL, &names[i], (cost, now), now);
                under
            })
        });
        // Every call 100 ms after the last: the share is recomputed each time.
        g.bench_function(format!("offer, recomputing/{n} tenants"), |b| {
            b.iter(|| {
                t += 100_000_000;
                i = (i + 1) % names.len();
                let now = Duration::from_nanos(t);
                book.offer(black_box(MODEL), &names[i], 1.0, (300, Some(200)), now)
            })
        });
    }
    g.finish();
}

/// The decision a request pays before going upstream: the limiter's alone (a busy key, as in
/// `benches/limiter.rs`) against the same with fair shedding's `offer` before it, 100 tenants.
fn with_the_limiter(c: &mut Criterion) {
    let mut g = c.benchmark_group("fair/hot path");
    let th = Thresholds {
        ttft: 1.0,
        itl: 0.05,
        time_constant: 15.0,
    };
    let l = Limiter::new(LimiterConfig {
        mode: Mode::Enforce,
        scope: Scope::PerModel,
        defaults: th,
        models: [(MODEL.to_string(), th)].into_iter().collect(),
        shedding: Shedding::default(),
    });
    let k = l.key(MODEL);
    for _ in 0..10 {
        l.begin_request(k);
    }
    l.record(k, Signal::Itl, 0.02, Duration::ZERO).unwrap();
    l.record_first_token(k, 0.1, 8, Duration::ZERO).unwrap();
    let (book, names) = book(100);
    let mut rng = SplitMix64::new(1);
    let mut t = 60_000_000_000u64;
    let mut i = 0;
    g.bench_function("limiter decide", |b| {
        b.iter(|| {
            t += 100;
            let now = Duration::from_nanos(t);
            l.decide(l.key(black_box(MODEL)), Priority::Standard, now, &mut rng)
        })
    });
    g.bench_function("offer + limiter decide/100 tenants", |b| {
        b.iter(|| {
            t += 100;
            i = (i + 1) % names.len();
            let now = Duration::from_nanos(t);
            let key = l.key(black_box(MODEL));
            let label = l.label(key);
            let (under, _) = book.offer(label, &names[i], 1.0, (300, Some(200)), now);
            l.decide(key, fair::gate(Priority::Standard, under).0, now, &mut rng)
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = per_request, with_the_limiter
}
criterion_main!(benches);
