//! The scheduler's timing model in virtual time (tokio's paused clock): TTFT grows with the
//! queue, ITL is the step time for the batch size, disconnected clients free their slots.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Job, SimConfig, SimStats, scheduler};

fn config(max_num_seqs: usize) -> SimConfig {
    SimConfig {
        max_num_seqs,
        decode_step_ms: 10.0,
        decode_step_ms_per_seq: 5.0,
        prefill_ms_per_token: 0.0,
        ..SimConfig::default()
    }
}

fn job(max_tokens: u32) -> (Job, mpsc::UnboundedReceiver<&'static str>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Job {
            prompt_tokens: 1,
            max_tokens,
            text_seed: 1,
            tx,
        },
        rx,
    )
}

/// Arrival times (ms since `t0`) of every token of `rx`.
async fn arrivals(mut rx: mpsc::UnboundedReceiver<&'static str>, t0: Instant) -> Vec<u64> {
    let mut out = Vec::new();
    while rx.recv().await.is_some() {
        out.push(t0.elapsed().as_millis() as u64);
    }
    out
}

#[tokio::test(start_paused = true)]
async fn batch_slots_queue_and_step_time_follow_the_model() {
    let stats = Arc::new(SimStats::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let t0 = Instant::now();
    let mut receivers = Vec::new();
    for _ in 0..4 {
        let (j, r) = job(3);
        tx.send(j).unwrap();
        receivers.push(r);
    }
    tokio::spawn(scheduler(Arc::new(config(2)), stats.clone(), rx));
    let tasks: Vec<_> = receivers
        .into_iter()
        .map(|r| tokio::spawn(arrivals(r, t0)))
        .collect();
    let mut times = Vec::new();
    for t in tasks {
        times.push(t.await.unwrap());
    }
    // Two slots: the first two decode together (step 10 + 5×2 = 20 ms); the others wait for
    // them to finish, so their first token comes 60 ms later.
    assert_eq!(times[0], [20, 40, 60]);
    assert_eq!(times[1], [20, 40, 60]);
    assert_eq!(times[2], [80, 100, 120]);
    assert_eq!(times[3], [80, 100, 120]);
    assert_eq!(
        stats.completed.load(std::sync::atomic::Ordering::Relaxed),
        4
    );
}

#[tokio::test(start_paused = true)]
async fn prefill_delays_the_first_token_and_a_lone_sequence_steps_faster() {
    let stats = Arc::new(SimStats::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let mut c = config(4);
    c.prefill_ms_per_token = 1.0;
    let (mut j, r) = job(2);
    j.prompt_tokens = 50; // 50 ms of prefill
    let t0 = Instant::now();
    tx.send(j).unwrap();
    tokio::spawn(scheduler(Arc::new(c), stats, rx));
    // Steps of 15 ms (one sequence): at 15, 30, 45 still prefilling; tokens at 60, 75.
    assert_eq!(arrivals(r, t0).await, [60, 75]);
}

#[tokio::test(start_paused = true)]
async fn a_disconnected_client_frees_its_slot() {
    let stats = Arc::new(SimStats::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let (j1, r1) = job(1000);
    let (j2, r2) = job(1);
    let t0 = Instant::now();
    tx.send(j1).unwrap();
    tx.send(j2).unwrap();
    tokio::spawn(scheduler(Arc::new(config(1)), stats.clone(), rx));
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(r1);
    // The waiting request gets the slot at the next step instead of after 1000 tokens.
    let t = arrivals(r2, t0).await;
    assert_eq!(t.len(), 1);
    assert!(t[0] <= 100, "{t:?}");
    assert_eq!(
        stats.cancelled.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}
