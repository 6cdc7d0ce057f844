use std::time::Duration;

use super::*;

/// vLLM's page (excerpt of its exposition: HELP/TYPE lines, one series per model, histograms
/// around the gauges).
const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 12.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 4.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.91
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.35
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="m"} 0.0
vllm:time_to_first_token_seconds_count{model_name="m"} 1033.0
"#;

const SGLANG: &str = "# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs{model_name=\"qwen\",tp_rank=\"0\"} 31\n# TYPE sglang:num_queue_reqs gauge\nsglang:num_queue_reqs{model_name=\"qwen\",tp_rank=\"0\"} 7\n# TYPE sglang:token_usage gauge\nsglang:token_usage{model_name=\"qwen\",tp_rank=\"0\"} 0.62\n";

const LLAMACPP: &str = "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.\n# TYPE llamacpp:prompt_tokens_total counter\nllamacpp:prompt_tokens_total 6172\n# HELP llamacpp:requests_processing Number of requests processing.\n# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 4\n# HELP llamacpp:requests_deferred Number of requests deferred.\n# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 2\n";

const TGI: &str = "# TYPE tgi_queue_size gauge\ntgi_queue_size 5\n# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size 32\n# TYPE tgi_request_count counter\ntgi_request_count 880\n";

const TRTLLM: &str = "trtllm_num_requests_waiting{model_name=\"m\"} 1\ntrtllm_num_requests_running{model_name=\"m\"} 64\ntrtllm_kv_cache_utilization{model_name=\"m\"} 0.97\n";

fn reading(waiting: f64, running: f64, kv: Option<f64>) -> Signals {
    Signals {
        waiting: Some(waiting),
        running: Some(running),
        kv_cache: kv,
    }
}

#[test]
fn each_engines_names_are_read_and_auto_recognises_them() {
    for (page, kind, want) in [
        (VLLM, EngineKind::Vllm, reading(3.0, 16.0, Some(0.91))),
        (SGLANG, EngineKind::Sglang, reading(7.0, 31.0, Some(0.62))),
        (LLAMACPP, EngineKind::Llamacpp, reading(2.0, 4.0, None)),
        (TGI, EngineKind::Tgi, reading(5.0, 32.0, None)),
        (TRTLLM, EngineKind::Trtllm, reading(1.0, 64.0, Some(0.97))),
    ] {
        assert_eq!(parse(page, kind), Ok((kind, want)), "{kind:?}");
        assert_eq!(
            parse(page, EngineKind::Auto),
            Ok((kind, want)),
            "auto {kind:?}"
        );
    }
}

#[test]
fn a_page_of_another_engine_or_of_nothing_known_is_an_error_naming_what_was_looked_for() {
    let e = parse(TGI, EngineKind::Vllm).unwrap_err();
    assert!(e.to_string().contains("vllm:num_requests_waiting"), "{e}");
    assert_eq!(parse("up 1\n", EngineKind::Auto), Err(ParseError::Unknown));
    assert_eq!(parse("", EngineKind::Auto), Err(ParseError::Unknown));
}

#[test]
fn hostile_values_are_dropped_and_garbage_lines_skipped() {
    let page = "vllm:num_requests_waiting NaN\n\
                vllm:num_requests_waiting -3\n\
                vllm:num_requests_waiting +Inf\n\
                vllm:num_requests_running 1e400\n\
                vllm:num_requests_running{a=\"}\\\" x\"} 6\n\
                vllm:num_requests_running{unterminated=\"x 9\n\
                vllm:kv_cache_usage_perc 75\n\
                \u{0}\u{ff}garbage{{{{ 1 2 3\n\
                vllm:num_requests_running\n\
                vllm:num_requests_running 2 1700000000000\n";
    let (_, s) = parse(page, EngineKind::Auto).unwrap();
    // 1e400 is infinite; the quoted brace and the escaped quote do not end the labels.
    assert_eq!(s.running, Some(8.0));
    assert_eq!(s.waiting, None, "no usable waiting value");
    assert_eq!(s.kv_cache, None, "a percentage is not a ratio");
    let only_nan = "vllm:num_requests_waiting NaN\nvllm:num_requests_running -1\n";
    assert!(matches!(
        parse(only_nan, EngineKind::Auto),
        Err(ParseError::Missing { .. })
    ));
}

#[test]
fn a_reading_is_fresh_for_three_intervals_and_each_change_is_said_once() {
    let i = Duration::from_millis(250);
    let t = Duration::from_secs(100);
    let mut e = EngineSignal::default();
    assert_eq!(e.fresh(t, i), None);
    let ok = || Ok((EngineKind::Vllm, reading(0.0, 2.0, None)));
    assert_eq!(e.on_scrape(ok(), t), Some(Change::Up(EngineKind::Vllm)));
    assert_eq!(e.on_scrape(ok(), t + i), None);
    assert!(e.up());
    assert_eq!(e.fresh(t + i * 4, i), Some(reading(0.0, 2.0, None)));
    assert_eq!(
        e.fresh(t + i * 4 + Duration::from_millis(1), i),
        None,
        "stale"
    );
    let down = e.on_scrape(Err("timeout".into()), t + i * 2);
    assert_eq!(down, Some(Change::Down("timeout".into())));
    assert_eq!(e.on_scrape(Err("timeout".into()), t + i * 3), None, "once");
    assert!(!e.up());
    assert_eq!(
        e.on_scrape(ok(), t + i * 9),
        Some(Change::Up(EngineKind::Vllm))
    );
    // The first scrape failing is said too.
    let mut e = EngineSignal::default();
    assert!(matches!(
        e.on_scrape(Err("refused".into()), t),
        Some(Change::Down(_))
    ));
}

#[test]
fn the_batch_is_what_ran_when_the_queue_started_and_full_means_waiting_or_kv_at_the_mark() {
    let t = Duration::from_secs(1);
    let mut e = EngineSignal::default();
    let at = |e: &mut EngineSignal, w: f64, r: f64, kv: Option<f64>| {
        e.on_scrape(Ok((EngineKind::Vllm, reading(w, r, kv))), t);
        e.full(0.95)
    };
    assert_eq!(e.full(0.95), (false, None), "no reading: not full");
    assert_eq!(at(&mut e, 0.0, 3.0, Some(0.5)), (false, None));
    assert_eq!(
        at(&mut e, 2.0, 4.0, None),
        (true, Some(4.0)),
        "the queue starts at 4"
    );
    assert_eq!(
        at(&mut e, 5.0, 6.0, None),
        (true, Some(4.0)),
        "held while it stays"
    );
    assert_eq!(
        at(&mut e, 0.0, 6.0, Some(0.96)),
        (true, Some(4.0)),
        "KV at the mark"
    );
    assert_eq!(
        at(&mut e, 1.0, 7.0, None),
        (true, Some(7.0)),
        "a new start learns again"
    );
}

#[test]
fn llama_cpps_slot_count_is_asked_for_once_and_makes_a_batch_of_that_many_full() {
    assert_eq!(
        parse_slots(r#"{"total_slots": 4, "model_path": "m"}"#),
        Some(4.0)
    );
    for bad in [
        r#"{"total_slots": 0}"#,
        r#"{"total_slots": -1}"#,
        r#"{"total_slots": 1e9}"#,
        r#"{"total_slots": "4"}"#,
        r#"{}"#,
        "<html>",
    ] {
        assert_eq!(parse_slots(bad), None, "{bad}");
    }
    let t = Duration::from_secs(100);
    let llama = |w: f64, r: f64| Ok((EngineKind::Llamacpp, reading(w, r, None)));
    // Not before a reading shows llama.cpp, and never for another engine.
    let mut e = EngineSignal::default();
    assert!(!e.wants_slots(t));
    e.on_scrape(Ok((EngineKind::Vllm, reading(0.0, 1.0, None))), t);
    assert!(!e.wants_slots(t));
    e.on_scrape(llama(0.0, 1.0), t);
    assert!(e.wants_slots(t));
    // A failed answer: asked again only after SLOTS_RETRY.
    e.on_slots(None, t);
    assert!(!e.wants_slots(t + SLOTS_RETRY - Duration::from_millis(1)));
    assert!(e.wants_slots(t + SLOTS_RETRY));
    e.on_slots(Some(2.0), t + SLOTS_RETRY);
    assert!(!e.wants_slots(t * 10), "known: not asked again");
    assert_eq!(e.slots(), Some(2.0));
    // One of two slots running: not full, one more may go; both running: full at 2.
    assert_eq!(e.full(0.95), (false, Some(2.0)));
    assert_eq!(e.open(0.95), Some(1.0));
    e.on_scrape(llama(0.0, 2.0), t);
    assert_eq!(e.full(0.95), (true, Some(2.0)));
    e.on_scrape(llama(3.0, 2.0), t);
    assert_eq!(e.full(0.95), (true, Some(2.0)), "deferred requests: full");
    assert_eq!(e.open(0.95), None);
}
