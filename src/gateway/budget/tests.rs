use super::*;

const SEC: Duration = Duration::from_secs(1);

#[test]
fn a_budget_admits_its_share_in_any_minute_and_says_when_more_fits() {
    let b = Budgets::default();
    let t: Arc<str> = "team-a".into();
    // 120 a minute over two pods: 60 here, all at once if they come at once.
    for i in 0..60 {
        let q = b.take(&t, 120, 2, SEC * 100).unwrap();
        assert_eq!((q.limit, q.remaining), (60, 59 - i));
    }
    let (q, wait) = b.take(&t, 120, 2, SEC * 100).unwrap_err();
    // One more fits a sixtieth into the next minute (this one's 60 then weigh 59).
    assert_eq!((q.remaining, wait), (0, SEC * 61));
    assert_eq!(
        q.reset,
        SEC * 120,
        "nothing counts once two minutes have passed"
    );
    let (_, wait) = b.take(&t, 120, 2, SEC * 100 + SEC / 2).unwrap_err();
    assert_eq!(wait, SEC * 61 - SEC / 2);
    assert_eq!(b.take(&t, 120, 2, SEC * 161).unwrap().remaining, 0);
    // A shed request's one comes back.
    b.refund("team-a", 120, 2, SEC * 161);
    assert_eq!(b.take(&t, 120, 2, SEC * 161).unwrap().remaining, 0);
    // Other tenants have their own.
    let other: Arc<str> = "team-b".into();
    assert_eq!(b.take(&other, 120, 2, SEC * 161).unwrap().remaining, 59);
}

#[test]
fn a_budget_of_zero_refuses_everything_and_a_tiny_one_still_lets_one_through() {
    let b = Budgets::default();
    let t: Arc<str> = "none".into();
    let (q, wait) = b.take(&t, 0, 1, SEC).unwrap_err();
    assert_eq!((q.limit, q.remaining, wait), (0, 0, SEC * 60));
    // 1 a minute over 4 pods: a share of one, so one request a minute here.
    let t: Arc<str> = "tiny".into();
    assert!(b.take(&t, 1, 4, SEC).is_ok());
    let (_, wait) = b.take(&t, 1, 4, SEC).unwrap_err();
    assert_eq!(wait, SEC * 120, "once this minute's one no longer counts");
}

#[test]
fn durations_are_written_as_openai_writes_them() {
    assert_eq!(openai_duration(Duration::from_millis(20)), "20ms");
    assert_eq!(openai_duration(Duration::from_millis(1500)), "1.5s");
    assert_eq!(openai_duration(SEC), "1s");
    assert_eq!(openai_duration(SEC * 360), "6m0s");
    assert_eq!(openai_duration(Duration::from_millis(61_250)), "1m1.25s");
}

#[test]
fn the_tenant_is_the_client_else_a_listed_trusted_header_else_anonymous() {
    let mut config = TenantsConfig {
        header: Some(http::HeaderName::from_static("x-tenant")),
        ..TenantsConfig::default()
    };
    config.clients.insert("batch".into(), Default::default());
    let mut h = HeaderMap::new();
    assert_eq!(&*tenant(&config, None, &h), ANONYMOUS);
    h.insert("x-tenant", "batch".parse().unwrap());
    assert_eq!(&*tenant(&config, None, &h), "batch");
    assert_eq!(
        &*tenant(&config, Some("web".into()), &h),
        "web",
        "the key wins"
    );
    h.insert("x-tenant", "made-up-1234".parse().unwrap());
    assert_eq!(&*tenant(&config, None, &h), ANONYMOUS, "not listed");
    config.header = None;
    h.insert("x-tenant", "batch".parse().unwrap());
    assert_eq!(&*tenant(&config, None, &h), ANONYMOUS, "not trusted");
}

fn tokens_config(tpm: u64, replicas: u32) -> TenantsConfig {
    TenantsConfig {
        default: Budget {
            tokens_per_minute: Some(tpm),
            ..Budget::default()
        },
        replicas,
        ..TenantsConfig::default()
    }
}

/// What tenant `t` has left of its token budget at `now`, as a scrape reads it.
fn tokens_left(b: &Budgets, config: &TenantsConfig, now: Duration) -> Option<u64> {
    let left = b.remaining(Some(config), now);
    let t = left
        .iter()
        .find(|(t, unit, _)| &**t == "t" && *unit == Unit::Tokens);
    t.expect("tenant t's token window").2
}

#[test]
fn what_is_left_is_read_at_the_scrape_and_follows_the_policy() {
    let b = Budgets::default();
    let config = tokens_config(600, 1);
    let c = charge(&b, &config, "t".into(), SEC).unwrap().unwrap();
    c.reserve_tokens(&b, 600, SEC).unwrap();
    assert_eq!(tokens_left(&b, &config, SEC), Some(0));
    // Idle for two minutes: nothing used counts any more, whatever the last request saw.
    assert_eq!(tokens_left(&b, &config, SEC * 121), Some(600));
    // A pod's share follows the replicas; a policy without the budget has none to show.
    assert_eq!(
        tokens_left(&b, &tokens_config(600, 3), SEC * 121),
        Some(200)
    );
    assert_eq!(tokens_left(&b, &TenantsConfig::default(), SEC * 121), None);
    let none = b.remaining(None, SEC * 121);
    assert!(none.iter().all(|(_, _, left)| left.is_none()), "{none:?}");
}

#[test]
fn tokens_are_held_at_the_estimate_and_settled_to_what_was_used() {
    let b = Budgets::default();
    // 6000 tokens a minute over two pods: 3000 here.
    let config = tokens_config(6000, 2);
    let c = charge(&b, &config, "t".into(), SEC).unwrap().unwrap();
    c.reserve_tokens(&b, 1000, SEC).unwrap();
    assert_eq!(tokens_left(&b, &config, SEC), Some(2000));
    // It used 200: 800 come back.
    c.settle_tokens(&b, 200, SEC);
    assert_eq!(tokens_left(&b, &config, SEC), Some(2800));
    let mut h = HeaderMap::new();
    c.insert_headers(&mut h);
    assert_eq!(h["x-ratelimit-limit-tokens"], "3000");
    assert_eq!(h["x-ratelimit-remaining-tokens"], "2800");
    assert_eq!(
        h["x-ratelimit-reset-tokens"], "2m0s",
        "used this minute: counts for two"
    );
    assert!(
        h.get("x-ratelimit-limit-requests").is_none(),
        "no request budget"
    );
    // One that used more than it held: the rest is owed into the next minute.
    let c = charge(&b, &config, "t".into(), SEC).unwrap().unwrap();
    c.reserve_tokens(&b, 2800, SEC).unwrap();
    c.settle_tokens(&b, 1e9 as u64, SEC);
    assert_eq!(tokens_left(&b, &config, SEC), Some(0));
    let c = charge(&b, &config, "t".into(), SEC).unwrap().unwrap();
    match c.reserve_tokens(&b, 10, SEC) {
        Err(GatewayError::OverBudget {
            unit, retry_after, ..
        }) => {
            assert_eq!(unit, "tokens");
            // Next minute, once this one's 10⁹ weigh less than 2990.
            assert!(
                retry_after > SEC * 119 && retry_after <= SEC * 120,
                "{retry_after:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_shed_request_gives_its_tokens_back_and_one_too_large_takes_nothing() {
    let b = Budgets::default();
    let config = tokens_config(600, 1);
    let c = charge(&b, &config, "t".into(), SEC).unwrap().unwrap();
    c.reserve_tokens(&b, 500, SEC).unwrap();
    c.refund(&b, SEC);
    assert_eq!(tokens_left(&b, &config, SEC), Some(600));
    // max_tokens of 10⁹: refused outright, nothing held, no Retry-After to wait for.
    let c = charge(&b, &config, "t".into(), SEC).unwrap().unwrap();
    match c.reserve_tokens(&b, 1_000_000_000, SEC) {
        Err(GatewayError::TooLargeForBudget {
            limit, requested, ..
        }) => assert_eq!((limit, requested), (600, 1_000_000_000)),
        other => panic!("{other:?}"),
    }
    c.reserve_tokens(&b, 600, SEC)
        .expect("the whole bucket is still there");
    // A budget of 0 refuses even a request of no tokens.
    let c = charge(&b, &tokens_config(0, 1), "z".into(), SEC)
        .unwrap()
        .unwrap();
    assert!(c.reserve_tokens(&b, 1, SEC).is_err());
}
