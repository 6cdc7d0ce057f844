//! Deciding and counting a request are one step: concurrent admissions each see the ones
//! before them.

use super::*;

const ALWAYS: f64 = 0.0;

#[test]
fn concurrent_admissions_each_see_the_ones_before_them() {
    // Far above the thresholds and a random source that always sheds when it may: only a
    // request that finds nothing in flight is admitted (work conservation). Threads racing
    // through decide-then-begin all found 0 and all got in; admit counts under the lock.
    let l = Limiter::new(adaptive());
    let k = l.key("llama");
    for _ in 0..10 {
        l.record(k, Signal::Ttft, 5.0, SEC).unwrap();
        l.record(k, Signal::Itl, 5.0, SEC).unwrap();
    }
    const THREADS: usize = 8;
    let barrier = std::sync::Barrier::new(THREADS + 1);
    let done = std::sync::Barrier::new(THREADS + 1);
    let admitted = std::sync::atomic::AtomicUsize::new(0);
    let mut rounds = Vec::new();
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                let mut rng = Sequence::new(vec![ALWAYS]);
                for _ in 0..200 {
                    barrier.wait();
                    if l.admit(k, Priority::Standard, SEC, &mut rng).admitted() {
                        admitted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    done.wait();
                }
            });
        }
        // Asserted after the rounds: a panic here would leave the threads at the barrier.
        for round in 0..200 {
            barrier.wait();
            done.wait();
            let n = admitted.swap(0, std::sync::atomic::Ordering::SeqCst);
            rounds.push((round, n, l.in_flight(k)));
            for _ in 0..n {
                l.end_request(k, SEC);
            }
        }
    });
    let wrong: Vec<_> = rounds.iter().filter(|r| (r.1, r.2) != (1, 1)).collect();
    assert!(
        wrong.is_empty(),
        "(round, admitted, counted in flight): {wrong:?}"
    );
    // A shed request is not counted.
    let mut rng = Sequence::new(vec![ALWAYS]);
    assert!(l.admit(k, Priority::Standard, SEC, &mut rng).admitted());
    assert!(!l.admit(k, Priority::Standard, SEC, &mut rng).admitted());
    assert_eq!(l.in_flight(k), 1);
}
