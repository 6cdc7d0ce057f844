use super::*;

const MS: Duration = Duration::from_millis(1);

/// Drives a book for `secs` seconds in steps of 10 ms: each tenant `(name, weight, tokens a
/// second offered, fraction admitted)` offers a request of 10 tokens whenever its offered
/// tokens are due; the admitted fraction is applied as a deterministic share of its requests.
/// Returns the last answer of `offer` per tenant.
fn drive(book: &FairBook, tenants: &[(&str, f64, f64, f64)], secs: u64) -> Vec<bool> {
    let names: Vec<Arc<str>> = tenants.iter().map(|t| t.0.into()).collect();
    let mut due = vec![0.0; tenants.len()];
    let mut admitted = vec![0.0; tenants.len()];
    let mut last = vec![false; tenants.len()];
    for step in 0..secs * 100 {
        let now = MS * 10 * step as u32;
        for (i, &(_, weight, rate, fraction)) in tenants.iter().enumerate() {
            due[i] += rate / 100.0;
            while due[i] >= 10.0 {
                due[i] -= 10.0;
                last[i] = book.offer("m", &names[i], weight, (10, Some(0)), now).0;
                admitted[i] += fraction;
                let admit = admitted[i] >= 1.0;
                admitted[i] -= f64::from(u8::from(admit));
                if !admit {
                    book.shed("m", &names[i], (10.0, now), now);
                }
            }
        }
    }
    last
}

fn share_of(book: &FairBook, tenant: &str, at: Duration) -> Standing {
    (book.standings(at).into_iter())
        .find(|s| &*s.tenant == tenant)
        .unwrap()
}

#[test]
fn nothing_shed_means_no_one_is_over_and_no_one_is_favoured() {
    let book = FairBook::default();
    let last = drive(
        &book,
        &[("a", 1.0, 100.0, 1.0), ("b", 1.0, 1000.0, 1.0)],
        60,
    );
    assert_eq!(last, [false, false]);
    assert!(share_of(&book, "b", MS * 60_000).fair_share.is_infinite());
}

#[test]
fn a_light_tenant_is_under_its_share_while_a_heavy_one_is_shed() {
    let book = FairBook::default();
    // The gate admits 300 of heavy's 3000 tokens a second; light's 100 all pass.
    let last = drive(
        &book,
        &[("light", 1.0, 100.0, 1.0), ("heavy", 1.0, 3000.0, 0.1)],
        60,
    );
    assert_eq!(last, [true, false], "light under its share, heavy over");
    let now = MS * 60_000;
    let (light, heavy) = (share_of(&book, "light", now), share_of(&book, "heavy", now));
    // Admitted 400 a second: light's 100 fits, heavy's share is the remaining 300.
    assert!((light.use_rate - 100.0).abs() < 5.0, "{light:?}");
    assert!((heavy.fair_share - 300.0).abs() < 15.0, "{heavy:?}");
    assert!((heavy.shed_fraction - 0.9).abs() < 0.02, "{heavy:?}");
    assert_eq!(light.shed_fraction, 0.0);
}

#[test]
fn weights_scale_a_tenants_share() {
    // They offer 550 and 600 a second and 767 are admitted: with equal weights each may use
    // 383 and both are over; with weight 3, `a` may use 575 and is within it, leaving 217.
    for (weight, a_under) in [(1.0, false), (3.0, true)] {
        let book = FairBook::default();
        let tenants = [
            ("a", weight, 550.0, 2.0 / 3.0),
            ("b", 1.0, 600.0, 2.0 / 3.0),
        ];
        let last = drive(&book, &tenants, 60);
        assert_eq!(last, [a_under, false], "weight {weight}");
        let b = share_of(&book, "b", MS * 60_000);
        let want = if a_under { 217.0 } else { 383.0 };
        assert!((b.fair_share - want).abs() < 20.0, "weight {weight}: {b:?}");
    }
}

#[test]
fn what_an_idle_or_light_tenant_leaves_goes_to_the_others() {
    let book = FairBook::default();
    // 110 admitted among three: `a` uses 10, so `b` and `c` may use 50 each, not 110/3.
    let tenants = [
        ("a", 1.0, 10.0, 1.0),
        ("b", 1.0, 100.0, 0.5),
        ("c", 1.0, 100.0, 0.5),
    ];
    let last = drive(&book, &tenants, 60);
    assert_eq!(last, [true, false, false]);
    let c = share_of(&book, "c", MS * 60_000);
    assert!((c.fair_share - 50.0).abs() < 4.0, "{c:?}");
    // `a` goes quiet: after six windows it is forgotten, and the others share alone.
    let t = MS * 60_000 + Duration::from_secs_f64(7.0 * WINDOW);
    book.offer("m", &"b".into(), 1.0, (10, Some(0)), t);
    assert!(book.standings(t).iter().all(|s| &*s.tenant != "a"));
}

#[test]
fn a_settled_request_corrects_its_tenants_use_and_the_admitted_rate() {
    let book = FairBook::default();
    let t: Arc<str> = "a".into();
    // No output known yet: the prompt plus max_tokens (or 256 without one).
    let (_, cost) = book.offer("m", &t, 1.0, (100, Some(900)), MS);
    assert_eq!(cost, 1000.0);
    assert_eq!(book.offer("m", &t, 1.0, (100, None), MS).1, 356.0);
    book.shed("m", "a", (356.0, MS), MS);
    // It used 100: 900 fewer than estimated, 40 of them output.
    book.settle("m", "a", (-900.0, MS), Some(40), MS);
    let s = share_of(&book, "a", MS);
    assert!((s.use_rate - 456.0 / WINDOW).abs() < 1e-6, "{s:?}");
    // From now on its estimate is its mean output, at most its max_tokens.
    assert_eq!(book.offer("m", &t, 1.0, (100, None), MS).1, 140.0);
    assert_eq!(book.offer("m", &t, 1.0, (100, Some(8)), MS).1, 108.0);
    // A correction never makes a rate negative; unknown models and tenants are ignored.
    book.settle("m", "a", (-1e9, MS), None, MS);
    assert_eq!(share_of(&book, "a", MS).use_rate, 0.0);
    book.settle("nope", "a", (5.0, MS), None, MS);
    book.shed("m", "nope", (5.0, MS), MS);
}

#[test]
fn only_standard_requests_under_their_share_wait_for_a_slot() {
    use Priority::*;
    assert_eq!(gate(Standard, true), (Standard, true));
    assert_eq!(gate(Standard, false), (Standard, false));
    assert_eq!(
        gate(Sheddable, true),
        (Sheddable, false),
        "priorities rank first"
    );
    assert_eq!(
        gate(Critical, true),
        (Critical, false),
        "never shed: never waits"
    );
}

#[test]
fn estimates_count_prompt_bytes_by_four_and_the_output_allowed() {
    assert_eq!(estimate(0, None), (0, DEFAULT_OUTPUT));
    assert_eq!(estimate(401, Some(16)), (101, 16));
    assert_eq!(estimate(4, Some(u64::MAX)), (1, u64::MAX));
}

#[test]
fn a_long_request_is_settled_by_what_is_left_of_its_estimate_not_below_zero_for_others() {
    // Two tenants offer the same 274 tokens at once; `a` ends at once, `b` 3 s later, each
    // having used 19. Settled as if counted at 19 then, both read the same use, and the
    // admitted rate equals their sum (before, `b`'s correction took back the whole 255 from a
    // rate decayed since, hit zero and left the admitted rate short of the use: a shedding
    // that never happened, and a finite fair share).
    let book = FairBook::default();
    let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
    let t0 = Duration::from_secs(100);
    let t1 = t0 + Duration::from_secs(3);
    for t in [&a, &b] {
        assert_eq!(book.offer("m", t, 1.0, (18, None), t0).1, 274.0);
    }
    book.settle("m", "a", (-255.0, t0), Some(1), t0);
    book.settle("m", "b", (-255.0, t0), Some(1), t1);
    let (sa, sb) = (share_of(&book, "a", t1), share_of(&book, "b", t1));
    let expected = 19.0 / WINDOW * (-3.0 / WINDOW).exp();
    assert!((sa.use_rate - expected).abs() < 1e-9, "{sa:?}");
    assert!((sb.use_rate - expected).abs() < 1e-9, "{sb:?}");
    // A third request after 100 ms recomputes the share: everything offered was admitted.
    let t2 = t1 + Duration::from_millis(100);
    assert!(
        !book.offer("m", &a, 1.0, (18, None), t2).0,
        "no one is under a share"
    );
    assert!(share_of(&book, "b", t2).fair_share.is_infinite());
}
