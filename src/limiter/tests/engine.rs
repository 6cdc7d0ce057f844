//! The engine's word on its batch (`limiter::engine`): a full batch caps admission at the
//! batch the engine runs, before any latency is late; the word lapses by itself.

use super::*;
use crate::limiter::fleet::{Fleet, Room};

/// Never under the draw of a `p < 1` rejection: only a certain one sheds.
const LUCKY: f64 = 0.999;

fn admit(l: &Limiter, k: KeyId, p: Priority, now: Duration) -> Verdict {
    l.admit(k, p, now, &mut Sequence::new(vec![LUCKY])).verdict
}

#[test]
fn a_cold_burst_is_admitted_whole_without_the_engines_word_and_capped_at_its_batch_with_it() {
    // Without it: nothing is late yet, so twelve requests on an idle engine all go in.
    let l = Limiter::new(adaptive());
    let k = l.key("llama");
    for i in 0..12 {
        assert_eq!(admit(&l, k, Priority::Standard, SEC), Verdict::Admit, "{i}");
    }
    // With it: four run, the fifth waits in the engine, which says so; the sixth is shed.
    let l = Limiter::new(adaptive());
    let k = l.key("llama");
    for _ in 0..5 {
        assert_eq!(admit(&l, k, Priority::Standard, SEC), Verdict::Admit);
    }
    l.engine().report(true, Some(4.0), None, SEC * 2);
    for _ in 0..3 {
        assert_eq!(admit(&l, k, Priority::Standard, SEC), Verdict::Reject);
    }
    let d = l.admit(
        k,
        Priority::Standard,
        SEC,
        &mut Sequence::new(vec![LUCKY, 0.0]),
    );
    assert_eq!(d.reject_probability, 1.0, "no probe past the batch: {d:?}");
    assert!(d.retry_after.is_some());
    assert_eq!(
        admit(&l, k, Priority::Critical, SEC),
        Verdict::Admit,
        "critical"
    );
    // Requests end: below the batch, the gateway's own rules decide again.
    for _ in 0..3 {
        l.end_request(k, SEC);
    }
    assert_eq!(l.in_flight(k), 3);
    assert_eq!(admit(&l, k, Priority::Standard, SEC), Verdict::Admit);
}

#[test]
fn the_word_lapses_by_itself_and_a_batch_that_is_not_full_caps_nothing() {
    let l = Limiter::new(adaptive());
    let k = l.key("llama");
    for _ in 0..8 {
        admit(&l, k, Priority::Standard, SEC);
    }
    l.engine().report(true, Some(8.0), None, SEC * 2);
    assert_eq!(admit(&l, k, Priority::Standard, SEC), Verdict::Reject);
    // No new reading for three intervals (scrapes failing): fail open.
    assert_eq!(admit(&l, k, Priority::Standard, SEC * 2), Verdict::Admit);
    l.engine().report(false, Some(8.0), None, SEC * 10);
    assert_eq!(admit(&l, k, Priority::Standard, SEC * 3), Verdict::Admit);
    // A batch larger than the ceiling raises it: nine in flight of a batch of sixteen.
    l.engine().report(true, Some(16.0), None, SEC * 10);
    assert_eq!(admit(&l, k, Priority::Standard, SEC * 3), Verdict::Admit);
    assert_eq!(l.in_flight(k), 11);
}

#[test]
fn a_reload_keeps_the_engines_word_and_a_fleet_routes_around_a_full_endpoint() {
    let l = Limiter::new(adaptive());
    let k = l.key("llama");
    for _ in 0..4 {
        admit(&l, k, Priority::Standard, SEC);
    }
    l.engine().report(true, Some(4.0), None, SEC * 2);
    let next = Limiter::carry_over(adaptive(), &l);
    let k2 = next.key("llama");
    assert_eq!(admit(&next, k2, Priority::Standard, SEC), Verdict::Reject);

    let fleet = Fleet::new(&adaptive(), &["a".into(), "b".into()]);
    let mut rng = Sequence::new(vec![0.1, 0.7, LUCKY]);
    for _ in 0..4 {
        let a = fleet.limiter(0);
        a.admit(a.key("llama"), Priority::Standard, SEC, &mut rng);
    }
    fleet
        .limiter(0)
        .engine()
        .report(true, Some(4.0), None, SEC * 2);
    for i in 0..6 {
        let r = fleet.admit("llama", Priority::Standard, SEC, &mut rng);
        assert_eq!((r.endpoint, r.decision.verdict), (1, Verdict::Admit), "{i}");
    }
}

#[test]
fn a_queued_request_goes_where_there_is_room_then_one_at_a_time_where_the_engine_says_nothing_waits()
 {
    let fleet = Fleet::new(&config(), &["a".into()]);
    let l = fleet.limiter(0);
    let k = l.key("llama");
    // Eight in flight and the TTFT average at four times its threshold: no room.
    load(l, k, 2.0, 0.01, SEC, 20);
    let queued = |now| fleet.admit_queued("llama", Priority::Standard, Room::Sure, now);
    assert_eq!(queued(SEC), None);
    // The engine says it is full: still none.
    l.engine().report(true, Some(8.0), None, SEC * 2);
    assert_eq!(queued(SEC), None);
    // It runs eight and holds none waiting: one more than the gateway has there goes ...
    l.engine().report(false, None, Some(8.0), SEC * 2);
    let r = queued(SEC);
    assert_eq!(
        r.map(|r| (r.endpoint, r.decision.verdict)),
        Some((0, Verdict::Admit))
    );
    assert_eq!(l.in_flight(k), 9);
    // ... and no more on that reading: nine in flight, more than it ran.
    assert_eq!(queued(SEC), None);
    // A newer reading that counts the one sent: room for one more again.
    l.engine().report(false, None, Some(9.0), SEC * 3);
    assert!(queued(SEC).is_some());
    assert_eq!(queued(SEC), None);
    // The word lapses (no reading for three intervals): nothing on its account.
    l.engine().report(false, None, Some(100.0), SEC * 3);
    assert_eq!(queued(SEC * 3), None);
    assert_eq!(l.in_flight(k), 10);
    // Every request ends: the limiter's own room (nothing in flight) takes the next.
    for _ in 0..10 {
        l.end_request(k, SEC * 3);
    }
    let r = queued(SEC * 3).expect("room");
    assert_eq!(r.decision.reject_probability, 0.0);
    assert_eq!(l.in_flight(k), 1);
}

#[test]
fn a_waiter_for_a_slot_takes_one_the_ceiling_leaves_whatever_the_pressure_draws() {
    let fleet = Fleet::new(&adaptive(), &["a".into()]);
    let l = fleet.limiter(0);
    let k = l.key("llama");
    let slot = |now| fleet.admit_queued("llama", Priority::Standard, Room::Slot, now);
    let sure = |now| fleet.admit_queued("llama", Priority::Standard, Room::Sure, now);
    // Eight in flight, G = 8, the ITL average at twice its threshold and the TTFT one under
    // it: the draw sheds some, but nothing queues in the engine, so the ceiling refuses none.
    load(l, k, 0.1, 0.06, SEC, 20);
    assert!(l.look(k, Priority::Standard, SEC).1 > 0.0, "the draw sheds");
    assert_eq!(sure(SEC), None);
    let r = slot(SEC).expect("a slot");
    assert_eq!((r.endpoint, r.decision.verdict), (0, Verdict::Admit));
    assert_eq!(l.in_flight(k), 9);
    // The TTFT average at four times its threshold: requests queue in the engine, the ceiling
    // refuses, and a slot waiter takes nothing ...
    load(l, k, 2.0, 0.01, SEC, 20);
    assert_eq!(slot(SEC), None);
    assert_eq!(l.in_flight(k), 8);
    // ... until a request ends below G: work conservation, room for both kinds.
    l.end_request(k, SEC);
    assert!(slot(SEC).is_some());
    l.end_request(k, SEC);
    assert!(sure(SEC).is_some());
}

#[test]
fn admitted_for_sure_never_takes_a_slot_by_the_draw() {
    let l = Limiter::new(config());
    let k = l.key("llama");
    // Eight in flight and the TTFT average at twice its threshold: the draw sheds some.
    load(&l, k, 1.0, 0.01, SEC, 20);
    let lucky = || Sequence::new(vec![LUCKY, 0.5]);
    let d = l.admit_for_sure(k, Priority::Standard, SEC, &mut lucky());
    assert_eq!(d.verdict, Verdict::Reject, "{d:?}");
    assert!(d.retry_after.is_some());
    assert_eq!(l.in_flight(k), 8, "nothing counted");
    // The same draw admits by chance.
    let d = l.admit(k, Priority::Standard, SEC, &mut lucky());
    assert_eq!(d.verdict, Verdict::Admit);
    assert_eq!(l.in_flight(k), 9);
    // Room for sure (critical, or no pressure): admitted without a draw.
    let d = l.admit_for_sure(k, Priority::Critical, SEC, &mut lucky());
    assert_eq!(d.verdict, Verdict::Admit);
    assert_eq!(l.in_flight(k), 10);
}
